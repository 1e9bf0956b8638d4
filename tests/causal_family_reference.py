"""Run the causal Wan2.1 families' OWN inference loops on tiny random checkpoints; store the results as fixtures.

Development-time only: their code cannot run in CI (it is not a dependency, and it needs CUDA). The
fixtures it writes (tests/fixtures/causal_family/: recipes.json + one .npz per case) let
tests/test_causal_family.py check skyrt against their loops without their code.

    git clone https://github.com/guandeh17/Self-Forcing; git clone https://github.com/tianweiy/CausVid
    git clone https://github.com/NVlabs/LongLive && git -C LongLive checkout 57f39c1~1   # LongLive 1 (Wan2.1)
    pip install omegaconf einops easydict peft          # their imports, beside skyrt's test extras
    python tests/causal_family_reference.py --repo self-forcing=Self-Forcing --repo causvid=CausVid \
        --repo longlive=LongLive [--case NAME ...]

For every case (RECIPES below) it writes the family's checkpoint file(s) from the recipe
(tests/causal_checkpoints.py: seeded weights, their key layout), then in a subprocess with the repo on
sys.path (the three repos share module names) builds THEIR pipeline from THEIR config file, loads the
checkpoint the way their inference.py does (torch.load, `load_state_dict(sd['generator' or
'generator_ema'])`, for LongLive peft's configure_lora_for_model + set_peft_model_state_dict), draws the
initial noise with torch, runs their `inference(...)` with return_latents=True and records every
re-noise draw (torch.randn_like) in order.

What is patched, from the outside, and why (nothing of their sampler, cache or model math):
- `attention` / `flash_attention` in their wan modules -> torch SDPA in the input dtype: flash-attention
  is CUDA-only and their SDPA fallback casts to bfloat16; everything runs in float32 here (their
  pipelines run bfloat16 on the GPU);
- `demo_utils.memory` / `utils.memory` -> a stub (the real ones call torch.cuda at import); .cuda(),
  device="cuda" tensors and torch.cuda.current_device() (a default argument of wan's T5EncoderModel,
  evaluated at import) -> CPU;
- WanModel / CausalWanModel.from_pretrained("wan_models/...") -> the tiny config (then their own
  load_state_dict puts the checkpoint's weights in, strictly);
- the 1.3B constants of their pipelines: frame_seq_length 1560 -> the tiny token count per frame, the
  KV cache's [12 heads, 128] -> the tiny heads, self-attention's max_attention_size
  (local_attn_size * 1560) -> local_attn_size * tiny frame tokens;
- torchvision (imported at module level by their I2V, CLIP and video-writing modules) -> an empty stub;
- the umT5 text encoder and the VAE -> stubs: the text encoder returns the recipe's prompt embeddings
  (skyrt's umT5 and VAE have their own oracle tests); the VAE's pixels are not compared.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import types
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
TINY_DIT = dict(dim=32, num_heads=2, ffn_dim=64, num_layers=2, freq_dim=32, text_dim=32, text_len=512)
LATENT = dict(height=4, width=6)  # latent size: 2 x 3 tokens per frame after the (1, 2, 2) patch

RECIPES = [
    dict(name="self_forcing", family="self-forcing", config=["configs/default_config.yaml",
                                                             "configs/self_forcing_dmd.yaml"],
         checkpoint=dict(file="checkpoints/self_forcing_dmd.pt", entries={"generator": 11, "generator_ema": 12}),
         use_ema=True, frames=12, prompts=[dict(tokens=5, seed=21)], noise_seed=31),
    # Self-Forcing's own model with local attention and a sink (model_kwargs its CausalWanModel takes;
    # none of its released configs sets them): their rolling eviction, in place.
    dict(name="self_forcing_window", family="self-forcing", config=["configs/default_config.yaml",
                                                                    "configs/self_forcing_dmd.yaml"],
         overrides={"model_kwargs": {"local_attn_size": 9, "sink_size": 3}},
         checkpoint=dict(file="self_forcing_dmd.pt", entries={"generator_ema": 13}),
         use_ema=True, frames=18, prompts=[dict(tokens=7, seed=22)], noise_seed=32),
    dict(name="causvid", family="causvid", config=["configs/wan_causal_dmd.yaml"],
         checkpoint=dict(file="autoregressive_checkpoint/model.pt", entries={"generator": 14}),
         use_ema=False, frames=12, prompts=[dict(tokens=4, seed=23)], noise_seed=33),
    dict(name="longlive", family="longlive", config=["configs/longlive_inference.yaml"],
         overrides={"adapter": {"rank": 4, "alpha": 8}},
         checkpoint=dict(file="models/longlive_base.pt", entries={"generator": 15}),
         lora=dict(file="models/lora.pt", rank=4, alpha=8, seed=16),
         use_ema=False, frames=21, prompts=[dict(tokens=6, seed=24)], noise_seed=34),
    # LongLive's interactive pipeline: prompt switches with KV recache at frames 6 (the chunk starts at
    # frame 0: everything recomputed) and 18 (the sink keeps its K/V).
    dict(name="longlive_switch", family="longlive", config=["configs/longlive_interactive_inference.yaml"],
         overrides={"adapter": {"rank": 4, "alpha": 8}},
         checkpoint=dict(file="models/longlive_base.pt", entries={"generator": 15}),
         lora=dict(file="models/lora.pt", rank=4, alpha=8, seed=16),
         use_ema=False, frames=24, prompts=[dict(tokens=6, seed=24), dict(tokens=3, seed=25), dict(tokens=8, seed=26)],
         switch_frames=[6, 18], noise_seed=35),
]
REPO_OF = {"self-forcing": "self-forcing", "causvid": "causvid", "longlive": "longlive"}
SAMPLING_KEYS = ("denoising_step_list", "warp_denoising_step", "timestep_shift", "num_frame_per_block",
                 "context_noise", "local_attn_size", "sink_size")


# ================================================================================ parent: skyrt side
def parent(args) -> int:
    sys.path.insert(0, str(HERE))
    from causal_checkpoints import FIXTURES, RECIPES as RECIPES_JSON, weights_digest, write_family_files

    repos = dict(item.split("=", 1) for item in args.repo)
    chosen = [r for r in RECIPES if not args.case or r["name"] in args.case]
    existing = {r["name"]: r for r in json.loads(RECIPES_JSON.read_text())} if RECIPES_JSON.is_file() else {}
    FIXTURES.mkdir(parents=True, exist_ok=True)
    for recipe in chosen:
        repo = Path(repos[REPO_OF[recipe["family"]]]).resolve()
        recipe = dict(recipe, dit=TINY_DIT, latent=dict(LATENT, frames=recipe["frames"]))
        with tempfile.TemporaryDirectory() as tmp:
            paths = write_family_files(recipe, Path(tmp))
            job = dict(recipe=recipe, repo=str(repo), paths={k: str(v) for k, v in paths.items()},
                       out=str(FIXTURES / f"{recipe['name']}.npz"))
            (Path(tmp) / "job.json").write_text(json.dumps(job))
            print(f"== {recipe['name']}: their code in {repo}", flush=True)
            subprocess.run([sys.executable, __file__, "--child", str(Path(tmp) / "job.json")], check=True)
            result = json.loads((Path(tmp) / "job.json.result").read_text())
        recipe.update(result, weights_sha256=weights_digest(recipe))
        existing[recipe["name"]] = recipe
        RECIPES_JSON.write_text(json.dumps([existing[k] for k in sorted(existing)], indent=1) + "\n")
        print(f"   wrote {job['out']} ({Path(job['out']).stat().st_size // 1024} KiB)")
    return 0


# ================================================================================ child: their code
def child(job_path: str) -> int:
    job = json.loads(Path(job_path).read_text())
    recipe, repo = job["recipe"], Path(job["repo"])
    import torch

    torch.set_grad_enabled(False)
    torch.set_num_threads(2)
    _install_import_patches(repo)
    cfg, pipeline_cls = _their_config_and_pipeline(recipe, repo)
    tiny = recipe["dit"]
    tokens_per_frame = (recipe["latent"]["height"] // 2) * (recipe["latent"]["width"] // 2)
    _patch_model_constructors(recipe["family"], tiny)

    sys.path.insert(0, str(HERE))
    from causal_checkpoints import prompt_context, prompt_rows

    rows = prompt_rows(recipe)
    contexts = {f"prompt {i}": torch.from_numpy(prompt_context(r, tiny["text_len"])) for i, r in enumerate(rows)}
    pipe = _build_pipeline(recipe["family"], pipeline_cls, cfg, contexts)
    _patch_1_3b_constants(pipe, tiny, tokens_per_frame)
    _load_their_way(pipe, cfg, recipe, job["paths"])

    # Their inference.py: set_seed(seed), then noise = torch.randn([B, F, 16, H, W]).
    torch.manual_seed(recipe["noise_seed"])
    lat = recipe["latent"]
    noise = torch.randn([1, lat["frames"], 16, lat["height"], lat["width"]])
    draws = []
    real_randn_like = torch.randn_like

    def recording_randn_like(x, *a, **k):
        out = real_randn_like(x, *a, **k)
        draws.append(out.clone())
        return out

    torch.randn_like = recording_randn_like
    prompts = list(contexts)
    if recipe.get("switch_frames"):
        _, latents = pipe.inference(noise, text_prompts_list=[[p] for p in prompts],
                                    switch_frame_indices=recipe["switch_frames"], return_latents=True)
    else:
        _, latents = pipe.inference(noise=noise, text_prompts=prompts[:1], return_latents=True)
    torch.randn_like = real_randn_like

    sched = pipe.scheduler
    steps = torch.as_tensor(pipe.denoising_step_list).float().numpy()
    np.savez(job["out"],
             initial_noise=noise[0].permute(1, 0, 2, 3).numpy(),  # [16, F, h, w] (skyrt's layout)
             renoise=torch.stack(draws).permute(0, 2, 1, 3, 4).numpy(),  # [draws, 16, b, h, w]
             latents=latents[0].permute(1, 0, 2, 3).float().numpy(),  # [16, F, h, w]
             step_timesteps=steps, grid_sigmas=sched.sigmas.float().numpy(),
             grid_timesteps=sched.timesteps.float().numpy(),
             **{f"prompt_rows_{i}": r for i, r in enumerate(rows)})
    result = {"sampling": _their_sampling(recipe["family"], cfg), "repo_commit": _commit(repo), "draws": len(draws)}
    Path(job_path + ".result").write_text(json.dumps(result))
    print(f"   their loop: {len(draws)} re-noise draws, latents {tuple(latents.shape)}, "
          f"sampling {result['sampling']}")
    return 0


def _install_import_patches(repo: Path) -> None:
    """Their repos on sys.path; CUDA-only imports replaced before anything of theirs is imported."""
    import torch

    sys.path.insert(0, str(repo))
    for name in ("utils", "demo_utils", "causvid"):  # namespace packages of theirs (no __init__.py)
        if (repo / name).is_dir() and not (repo / name / "__init__.py").exists():
            package = types.ModuleType(name)
            package.__path__ = [str(repo / name)]
            sys.modules[name] = package
    # Libraries that probe for torchvision by import spec: imported before the stub goes in.
    import diffusers.configuration_utils  # noqa: F401
    import diffusers.models.modeling_utils  # noqa: F401
    import peft  # noqa: F401
    import transformers  # noqa: F401

    for name in ("torchvision", "torchvision.transforms", "torchvision.transforms.functional", "torchvision.io",
                 "torchvision.utils"):  # imported by their I2V / CLIP / video-writing modules, unused here
        stub = types.ModuleType(name)
        stub.__getattr__ = lambda attr, name=name: _unavailable(name, attr)
        sys.modules[name] = stub
        parent, _, child_name = name.rpartition(".")
        if parent:
            setattr(sys.modules[parent], child_name, stub)
    memory = types.ModuleType("memory")  # FramePack's memory helpers call torch.cuda at import
    memory.cpu = memory.gpu = torch.device("cpu")
    memory.gpu_complete_modules = []
    memory.get_cuda_free_memory_gb = lambda device=None: 1e6
    memory.log_gpu_memory = lambda *a, **k: None
    memory.move_model_to_device_with_memory_preservation = lambda *a, **k: None
    memory.DynamicSwapInstaller = types.SimpleNamespace(install_model=lambda *a, **k: None)
    sys.modules["utils.memory"] = sys.modules["demo_utils.memory"] = memory
    torch.cuda.current_device = lambda: 0  # wan's T5EncoderModel default argument, evaluated at import
    torch.Tensor.cuda = lambda self, *a, **k: self  # CausVid: timesteps(...).cuda()
    real_ones = torch.ones

    def ones(*size, device=None, **kw):  # CausVid's add_noise: torch.ones([B], device="cuda")
        return real_ones(*size, device="cpu" if str(device).startswith("cuda") else device, **kw)

    torch.ones = ones


def _unavailable(module: str, attr: str):
    if attr.startswith("__"):
        raise AttributeError(attr)  # no __file__, __version__, ...: library probes see a bare module

    def fail(*a, **k):
        raise AssertionError(f"{module}.{attr} is stubbed out in this reference run (torchvision is not installed)")
    return fail


def _sdpa(q, k, v, *args, **kwargs):
    """Their attention(q, k, v) [B, L, N, D] as plain SDPA in the inputs' dtype (no bf16 cast, no mask:
    their KV-cache paths pass none)."""
    import torch

    for name in ("q_lens", "k_lens"):
        if kwargs.get(name) is not None:
            raise AssertionError(f"{name} given: this stand-in does not mask")
    out = torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2).contiguous()


def _their_config_and_pipeline(recipe, repo: Path):
    from omegaconf import OmegaConf

    cfg = OmegaConf.merge(*[OmegaConf.load(repo / f) for f in recipe["config"]])
    if recipe.get("overrides"):
        cfg = OmegaConf.merge(cfg, OmegaConf.create(recipe["overrides"]))
    if recipe["family"] == "causvid":
        import causvid.models.wan.causal_inference as ci

        return cfg, ci.InferencePipeline
    import pipeline as their_pipeline

    cls = "InteractiveCausalInferencePipeline" if recipe.get("switch_frames") else "CausalInferencePipeline"
    return cfg, getattr(their_pipeline, cls)


def _patch_model_constructors(family: str, tiny: dict) -> None:
    """from_pretrained('wan_models/...') -> the tiny config; their attention -> float32 SDPA."""
    if family == "causvid":
        import causvid.models.wan.causal_model as causal
        import causvid.models.wan.wan_base.modules.model as base
    else:
        import wan.modules.causal_model as causal
        import wan.modules.model as base
    causal.attention = _sdpa
    base.flash_attention = _sdpa
    kwargs = dict(model_type="t2v", text_len=tiny["text_len"], dim=tiny["dim"], ffn_dim=tiny["ffn_dim"],
                  freq_dim=tiny["freq_dim"], text_dim=tiny["text_dim"], num_heads=tiny["num_heads"],
                  num_layers=tiny["num_layers"])
    causal.CausalWanModel.from_pretrained = classmethod(lambda cls, path, **kw: cls(**kwargs, **kw))
    base.WanModel.from_pretrained = classmethod(lambda cls, path, **kw: cls(**kwargs, **kw))


class _TextStub:
    """Their WanTextEncoder's interface: text_prompts -> {"prompt_embeds": [B, text_len, text_dim]}."""

    def __init__(self, contexts):
        self.contexts = contexts

    def __call__(self, text_prompts):
        import torch

        return {"prompt_embeds": torch.stack([self.contexts[p] for p in text_prompts])}

    def to(self, *a, **k):
        return self


class _VAEStub:
    """Their WanVAEWrapper's decode interface; the pixels are not compared."""

    def decode_to_pixel(self, latent, *a, **k):
        return latent

    def to(self, *a, **k):
        return self


def _build_pipeline(family: str, cls, cfg, contexts):
    import torch

    if family == "causvid":
        import causvid.models.wan.causal_inference as ci

        ci.get_text_encoder_wrapper = lambda model_name: (lambda: _TextStub(contexts))
        ci.get_vae_wrapper = lambda model_name: (lambda: _VAEStub())
        pipe = cls(cfg, device="cpu")
    else:
        pipe = cls(cfg, device=torch.device("cpu"), text_encoder=_TextStub(contexts), vae=_VAEStub())
    return pipe


def _patch_1_3b_constants(pipe, tiny: dict, tokens_per_frame: int) -> None:
    """frame_seq_length, the cache's [12, 128] heads and max_attention_size are written for the 1.3B model."""
    import torch

    heads, head_dim = tiny["num_heads"], tiny["dim"] // tiny["num_heads"]
    pipe.frame_seq_length = tokens_per_frame
    original = pipe._initialize_kv_cache

    def initialize_kv_cache(*a, **k):
        original(*a, **k)
        for cache in pipe.kv_cache1:
            for name in ("k", "v"):
                cache[name] = torch.zeros(cache[name].shape[:2] + (heads, head_dim), dtype=cache[name].dtype)

    pipe._initialize_kv_cache = initialize_kv_cache
    for module in pipe.generator.model.modules():
        local = getattr(module, "local_attn_size", None)
        if hasattr(module, "max_attention_size") and isinstance(local, int) and local != -1:
            module.max_attention_size = local * tokens_per_frame


def _load_their_way(pipe, cfg, recipe, paths) -> None:
    """The checkpoint loading of their inference scripts."""
    import torch

    state_dict = torch.load(paths["checkpoint"], map_location="cpu")
    entry = "generator_ema" if recipe["use_ema"] else "generator"
    pipe.generator.load_state_dict(state_dict[entry], strict=True)
    if recipe.get("lora"):  # LongLive inference.py
        import peft
        from utils.lora_utils import configure_lora_for_model

        pipe.generator.model = configure_lora_for_model(pipe.generator.model, model_name="generator",
                                                        lora_config=cfg.adapter, is_main_process=False)
        lora = torch.load(paths["lora"], map_location="cpu")
        before = {k: v.clone() for k, v in pipe.generator.model.state_dict().items() if "lora_" in k}
        result = peft.set_peft_model_state_dict(pipe.generator.model, lora["generator_lora"])
        after = pipe.generator.model.state_dict()
        if getattr(result, "unexpected_keys", None) or any(torch.equal(v, after[k]) for k, v in before.items()):
            raise AssertionError(f"the recipe's LoRA did not load into every adapter: {result}")
        pipe.is_lora_enabled = True


def _their_sampling(family: str, cfg) -> dict:
    """Their config's sampler settings, under the names skyrt's CausalSampling takes."""
    steps = [float(s) for s in cfg.denoising_step_list]
    if family == "causvid":
        steps = steps[:-1]  # their pipeline asserts the list ends with 0 and drops it
        shift = 8.0  # CausalWanDiffusionWrapper's FlowMatchScheduler(shift=8.0)
    else:
        shift = float(cfg.model_kwargs.timestep_shift)
    kwargs = cfg.get("model_kwargs", {}) or {}
    return dict(denoising_step_list=steps, warp_denoising_step=bool(cfg.warp_denoising_step), timestep_shift=shift,
                num_frame_per_block=int(cfg.num_frame_per_block), context_noise=float(cfg.get("context_noise", 0)),
                local_attn_size=int(kwargs.get("local_attn_size", -1)), sink_size=int(kwargs.get("sink_size", 0)))


def _commit(repo: Path) -> str:
    out = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True)
    return out.stdout.strip() or "unknown (not a git checkout)"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repo", action="append", default=[], metavar="FAMILY=PATH",
                   help="self-forcing=..., causvid=..., longlive=... (LongLive 1, the Wan2.1 version)")
    p.add_argument("--case", action="append", default=[], help="run only these recipes (default: all)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    return child(args.child) if args.child else parent(args)


if __name__ == "__main__":
    sys.exit(main())
