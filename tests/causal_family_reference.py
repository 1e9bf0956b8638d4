"""Run the causal Wan2.1 families' OWN inference loops on tiny random checkpoints; store the results as fixtures.

Development-time only: their code cannot run in CI (it is not a dependency, and it needs CUDA). The
fixtures it writes (tests/fixtures/causal_family/: recipes.json + one .npz per case) let
tests/test_causal_family.py check skyrt against their loops without their code.

    git clone https://github.com/guandeh17/Self-Forcing; git clone https://github.com/tianweiy/CausVid
    git clone https://github.com/NVlabs/LongLive && git -C LongLive checkout 57f39c1~1   # LongLive 1 (Wan2.1)
    git clone https://github.com/thu-ml/Causal-Forcing; git clone https://github.com/TencentARC/RollingForcing
    pip install omegaconf einops easydict peft          # their imports, beside skyrt's test extras (peft: LongLive)
    python tests/causal_family_reference.py --repo self-forcing=Self-Forcing --repo causvid=CausVid \
        --repo longlive=LongLive --repo causal-forcing=Causal-Forcing --repo rolling-forcing=RollingForcing \
        [--case NAME ...]

For every case (RECIPES below) it writes the family's checkpoint file(s) from the recipe
(tests/causal_checkpoints.py: seeded weights, their key layout), then in a subprocess with the repo on
sys.path (the repos share module names) builds THEIR pipeline from THEIR config files (default_config.yaml
merged under the model's, as their inference.py does), loads the checkpoint the way their inference.py
does (torch.load, `load_state_dict(sd['generator' or 'generator_ema'])`; for LongLive peft's
configure_lora_for_model + set_peft_model_state_dict; for Causal-Forcing a strict load, then on failure the
leading "model._fsdp_wrapped_module." renamed "model." and strict=False, checked here to have missed no
key; for Rolling-Forcing's EMA every "_fsdp_wrapped_module." removed, then strict), draws the initial noise
with torch, runs their `inference(...)` (Rolling-Forcing: `inference_rolling_forcing(...)`) with
return_latents=True and records every re-noise draw (torch.randn_like) in order, with the timestep
add_noise received for it.

What each loop does (read from their code at the commits in recipes.json):
- Self-Forcing, CausVid, LongLive, Causal-Forcing: one block of `num_frame_per_block` frames at a time,
  every step of the list on it (x0, then re-noise to the next step), then a clean pass of its x0 at
  t = context_noise that writes its K/V to the cache (runtime/causal_rollout.py's docstring).
  Causal-Forcing is Self-Forcing's pipeline plus an optional first-block step list that only its 1- and
  2-step Causal Forcing++ configs set; frame-wise = 1 frame per block, chunk-wise = 3; global attention
  over a 21-frame cache (32760 tokens at 1.3B).
- Rolling-Forcing: a rolling window of len(steps) = 5 blocks at staggered noise levels in ONE DiT call,
  full attention inside the window, block 0 as a re-rotated sink and a 24-frame cache written by a clean
  pass of the window's oldest block (tests/rolling_forcing_reference.py's docstring has the details). Each
  re-noised block draws torch.randn_like over the whole window and keeps its own frames: the fixture keeps
  those slices (renoise [draws, 16, 3, h, w]) with the block and step of each (renoise_block, renoise_step).

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
  (local_attn_size * 1560) -> local_attn_size * tiny frame tokens. For Causal-Forcing and Rolling-Forcing
  the same constants are scaled by ratio instead, read off their code as it runs: a cache tensor their
  _initialize_* methods allocate [B, n * 1560, 12, 128] is allocated [B, n * tiny frame tokens, tiny
  heads, tiny head dim] (at 1.3B size their caches are ~13 GB of zeros, too much for this machine; the
  frame counts n are recorded in recipes.json's code_constants), their global max_attention_size 32760 ->
  21 frames of tiny tokens, and Rolling-Forcing's frame_length 1560, block_length 3 * 1560 and
  max_attention_size 21 * 1560 -> the same frame counts of tiny tokens;
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
    # Causal-Forcing: their frame-wise 4-step release (one latent frame per block), loaded --use_ema as
    # their README does. The file holds only 'generator_ema' (their trainer saves the EMA alone once it
    # runs), keyed "model._fsdp_wrapped_module.*"; their inference.py loads it through its fallback.
    dict(name="causal_forcing_framewise", family="causal-forcing-framewise",
         config=["configs/default_config.yaml", "configs/causal_forcing_dmd_framewise.yaml"],
         checkpoint=dict(file="checkpoints/framewise/causal_forcing.pt", entries={"generator_ema": 41},
                         key_prefix={"generator_ema": "model._fsdp_wrapped_module."}),
         use_ema=True, frames=10, prompts=[dict(tokens=5, seed=42)], noise_seed=43),
    # Causal-Forcing's chunk-wise 4-step release (3 frames per block), loaded without --use_ema (their README).
    dict(name="causal_forcing_chunkwise", family="causal-forcing-chunkwise",
         config=["configs/default_config.yaml", "configs/causal_forcing_dmd_chunkwise.yaml"],
         checkpoint=dict(file="checkpoints/chunkwise/causal_forcing.pt", entries={"generator": 44}),
         use_ema=False, frames=12, prompts=[dict(tokens=6, seed=45)], noise_seed=46),
    # Rolling-Forcing: 11 blocks, so their 24-frame cache evicts (blocks 8-10) and the clean pass loses the
    # sink (blocks 7-10); loaded --use_ema (their README) from a file with both entries (their trainer's save()).
    dict(name="rolling_forcing", family="rolling-forcing",
         config=["configs/default_config.yaml", "configs/rolling_forcing_dmd.yaml"],
         checkpoint=dict(file="checkpoints/rolling_forcing_dmd.pt", entries={"generator": 47, "generator_ema": 48},
                         key_prefix={"generator_ema": "model._fsdp_wrapped_module."}),
         use_ema=True, frames=33, prompts=[dict(tokens=7, seed=49)], noise_seed=50),
]
REPO_OF = {"self-forcing": "self-forcing", "causvid": "causvid", "longlive": "longlive",
           "causal-forcing-framewise": "causal-forcing", "causal-forcing-chunkwise": "causal-forcing",
           "rolling-forcing": "rolling-forcing"}
NEW_FAMILIES = ("causal-forcing-framewise", "causal-forcing-chunkwise", "rolling-forcing")
WAN_FRAME_TOKENS, WAN_HEADS, WAN_HEAD_DIM = 1560, 12, 128  # the 1.3B constants written into their code
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
    _install_import_patches(repo, recipe["family"])
    cfg, pipeline_cls = _their_config_and_pipeline(recipe, repo)
    tiny = recipe["dit"]
    tokens_per_frame = (recipe["latent"]["height"] // 2) * (recipe["latent"]["width"] // 2)
    _patch_model_constructors(recipe["family"], tiny)

    sys.path.insert(0, str(HERE))
    from causal_checkpoints import prompt_context, prompt_rows

    rows = prompt_rows(recipe)
    contexts = {f"prompt {i}": torch.from_numpy(prompt_context(r, tiny["text_len"])) for i, r in enumerate(rows)}
    pipe = _build_pipeline(recipe["family"], pipeline_cls, cfg, contexts)
    if recipe["family"] in NEW_FAMILIES:
        code_constants = _patch_1_3b_constants_by_ratio(pipe, tiny, tokens_per_frame)
    else:
        code_constants = {}
        _patch_1_3b_constants(pipe, tiny, tokens_per_frame)
    _load_their_way(pipe, cfg, recipe, job["paths"])

    # Their inference.py: set_seed(seed), then noise = torch.randn([B, F, 16, H, W]).
    torch.manual_seed(recipe["noise_seed"])
    lat = recipe["latent"]
    noise = torch.randn([1, lat["frames"], 16, lat["height"], lat["width"]])
    draws, noised_to = [], []
    real_randn_like = torch.randn_like

    def recording_randn_like(x, *a, **k):
        out = real_randn_like(x, *a, **k)
        draws.append(out.clone())
        return out

    real_add_noise = pipe.scheduler.add_noise

    def recording_add_noise(x0, noise, timestep):  # which timestep each draw noises to (a cross-check)
        noised_to.append(float(timestep.flatten()[0]))
        return real_add_noise(x0, noise, timestep)

    torch.randn_like = recording_randn_like
    if recipe["family"] in NEW_FAMILIES:  # (the older families' fixtures were recorded without it)
        pipe.scheduler.add_noise = recording_add_noise
    prompts = list(contexts)
    if recipe["family"] == "rolling-forcing":  # their inference.py
        _, latents = pipe.inference_rolling_forcing(noise=noise, text_prompts=prompts[:1], return_latents=True)
    elif recipe.get("switch_frames"):
        _, latents = pipe.inference(noise, text_prompts_list=[[p] for p in prompts],
                                    switch_frame_indices=recipe["switch_frames"], return_latents=True)
    else:
        _, latents = pipe.inference(noise=noise, text_prompts=prompts[:1], return_latents=True)
    torch.randn_like = real_randn_like
    pipe.scheduler.add_noise = real_add_noise

    sched = pipe.scheduler
    steps = torch.as_tensor(pipe.denoising_step_list).float().numpy()
    extra = {}
    if recipe["family"] == "rolling-forcing":
        draws, extra = _rolling_draw_slices(draws, noised_to, steps, lat["frames"], int(cfg.num_frame_per_block))
    elif recipe["family"] in NEW_FAMILIES and len(draws) != len(noised_to):
        raise AssertionError(f"{len(draws)} randn_like draws but {len(noised_to)} add_noise calls")
    np.savez(job["out"],
             initial_noise=noise[0].permute(1, 0, 2, 3).numpy(),  # [16, F, h, w] (skyrt's layout)
             renoise=torch.stack(draws).permute(0, 2, 1, 3, 4).numpy(),  # [draws, 16, b, h, w]
             **extra,
             latents=latents[0].permute(1, 0, 2, 3).float().numpy(),  # [16, F, h, w]
             step_timesteps=steps, grid_sigmas=sched.sigmas.float().numpy(),
             grid_timesteps=sched.timesteps.float().numpy(),
             **{f"prompt_rows_{i}": r for i, r in enumerate(rows)})
    result = {"sampling": _their_sampling(recipe["family"], cfg), "repo_commit": _commit(repo), "draws": len(draws)}
    if code_constants:
        result["code_constants"] = code_constants
    Path(job_path + ".result").write_text(json.dumps(result))
    print(f"   their loop: {len(draws)} re-noise draws, latents {tuple(latents.shape)}, "
          f"sampling {result['sampling']}")
    return 0


def _install_import_patches(repo: Path, family: str) -> None:
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
    import transformers  # noqa: F401

    if family == "longlive":
        import peft  # noqa: F401  (only LongLive's code imports it)

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

    # Rolling-Forcing's `pipeline` exports its rolling pipeline under the same name (their inference.py)
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


def _patch_1_3b_constants_by_ratio(pipe, tiny: dict, tokens_per_frame: int) -> dict:
    """The 1.3B constants of Causal-Forcing's and Rolling-Forcing's code, scaled to the tiny model, read
    off their code rather than restated: every cache tensor their _initialize_* methods allocate as
    [B, n * 1560, 12, 128] is allocated [B, n * tiny frame tokens, tiny heads, tiny head dim] (their
    cache sizes at 1.3B, 30 layers x K and V x [1, 32760..37440, 12, 128] fp32, are ~13 GB here);
    Rolling-Forcing's self-attention lengths (frame_length 1560, block_length 3 * 1560,
    max_attention_size 21 * 1560 tokens) and Self-Forcing's max_attention_size (32760 tokens with global
    attention) become the same frame counts of tiny tokens. Returns those frame counts as their code has them."""
    import torch

    heads, head_dim = tiny["num_heads"], tiny["dim"] // tiny["num_heads"]
    pipe.frame_seq_length = tokens_per_frame
    real_zeros = torch.zeros
    constants: dict[str, int] = {}  # filled as their code runs (the caches are allocated by inference())

    def tiny_zeros(*size, **kw):
        shape = list(size[0]) if len(size) == 1 and isinstance(size[0], (list, tuple)) else list(size)
        if len(shape) == 4 and shape[2:] == [WAN_HEADS, WAN_HEAD_DIM]:
            if shape[1] % WAN_FRAME_TOKENS == 0:
                constants["kv_cache_frames"] = shape[1] // WAN_FRAME_TOKENS
                shape[1] = shape[1] // WAN_FRAME_TOKENS * tokens_per_frame
            shape[2:] = [heads, head_dim]
        return real_zeros(shape, **kw)

    def with_tiny_zeros(method):
        def run(*a, **k):
            torch.zeros = tiny_zeros
            try:
                return method(*a, **k)
            finally:
                torch.zeros = real_zeros
        return run

    pipe._initialize_kv_cache = with_tiny_zeros(pipe._initialize_kv_cache)
    pipe._initialize_crossattn_cache = with_tiny_zeros(pipe._initialize_crossattn_cache)
    for module in pipe.generator.model.modules():
        if hasattr(module, "block_length"):  # Rolling-Forcing's CausalWanSelfAttention
            for name in ("frame_length", "block_length", "max_attention_size"):
                frames, rest = divmod(getattr(module, name), WAN_FRAME_TOKENS)
                assert rest == 0, f"{name}={getattr(module, name)} is not whole 1.3B frames"
                constants.setdefault(f"{name}_frames", frames)
                setattr(module, name, frames * tokens_per_frame)
        elif hasattr(module, "max_attention_size"):  # Self-Forcing's layer (Causal-Forcing's): 32760 = 21 frames
            frames, rest = divmod(module.max_attention_size, WAN_FRAME_TOKENS)
            assert rest == 0, f"max_attention_size={module.max_attention_size} is not whole 1.3B frames"
            constants.setdefault("max_attention_size_frames", frames)
            module.max_attention_size = frames * tokens_per_frame
    return constants


def _rolling_draw_slices(draws, noised_to, steps, frames: int, block: int):
    """Rolling-Forcing re-noises each block of a window from its own torch.randn_like over the WHOLE
    window's x0 [n, 16, h, w] and keeps only that block's frames: the kept slices, in draw order, with the
    block and the step each one noises to. Which block a draw belongs to follows their window formula
    (window w holds blocks max(0, w - L + 1)..min(N - 1, w), L = len(steps); block j is at step w - j;
    blocks at the last step draw nothing); the frame count of every draw and the timestep add_noise got
    are checked against it."""
    blocks, window = frames // block, len(steps)
    kept, block_of, step_of = [], [], []
    for w in range(blocks + window - 1):
        start, end = max(0, w - window + 1), min(blocks - 1, w)
        for j in range(start, end + 1):
            if w - j == window - 1:
                continue
            k = len(kept)
            draw = draws[k]
            assert draw.shape[0] == (end - start + 1) * block, f"draw {k}: {tuple(draw.shape)} vs window {start}..{end}"
            assert abs(noised_to[k] - float(steps[w - j + 1])) < 1e-3, f"draw {k} noised to {noised_to[k]}"
            kept.append(draw[(j - start) * block : (j - start + 1) * block])
            block_of.append(j)
            step_of.append(w - j + 1)
    assert len(kept) == len(draws), f"{len(draws)} draws, their window formula accounts for {len(kept)}"
    return kept, dict(renoise_block=np.array(block_of, np.int64), renoise_step=np.array(step_of, np.int64))


def _load_their_way(pipe, cfg, recipe, paths) -> None:
    """The checkpoint loading of their inference scripts."""
    import torch

    state_dict = torch.load(paths["checkpoint"], map_location="cpu")
    entry = "generator_ema" if recipe["use_ema"] else "generator"
    if recipe["family"].startswith("causal-forcing"):
        _load_causal_forcing_way(pipe, state_dict[entry])
        return
    if recipe["family"] == "rolling-forcing" and recipe["use_ema"]:  # their remove_fsdp_prefix, then strict
        state_dict[entry] = {k.replace("_fsdp_wrapped_module.", ""): v for k, v in state_dict[entry].items()}
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


def _load_causal_forcing_way(pipe, gen_sd) -> None:
    """Causal-Forcing's inference.py: a strict load, and on failure the leading
    "model._fsdp_wrapped_module." renamed "model." and loaded with strict=False. Their strict=False would
    leave any key it misses at the from_pretrained weights; this run checks nothing was missed."""
    try:
        pipe.generator.load_state_dict(gen_sd)
        return
    except RuntimeError:
        pass
    fixed = {}
    for k, v in gen_sd.items():
        if k.startswith("model._fsdp_wrapped_module."):
            k = k.replace("model._fsdp_wrapped_module.", "model.", 1)
        fixed[k] = v
    result = pipe.generator.load_state_dict(fixed, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise AssertionError(f"their fallback load left keys out: {result}")


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
                   help="self-forcing=..., causvid=..., longlive=... (LongLive 1, the Wan2.1 version), "
                        "causal-forcing=..., rolling-forcing=...")
    p.add_argument("--case", action="append", default=[], help="run only these recipes (default: all)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    return child(args.child) if args.child else parent(args)


if __name__ == "__main__":
    sys.exit(main())
