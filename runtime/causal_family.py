"""Presets of the causal Wan2.1-1.3B family: their sampler settings and where their releases keep weights.

Each preset is read off the family's own inference config and loader (torch-free here):

| preset                   | repo                          | steps (warped?)           | shift | block | attention          | weights            |
|--------------------------|-------------------------------|---------------------------|-------|-------|--------------------|--------------------|
| self-forcing             | guandeh17/Self-Forcing        | 1000 750 500 250 (warped) | 5     | 3     | global             | generator_ema      |
| causvid                  | tianweiy/CausVid              | 1000 757 522 (not warped) | 8     | 3     | global             | generator          |
| causvid-warp4            | tianweiy/CausVid              | 1000 750 500 250 (warped) | 8     | 3     | global             | generator          |
| longlive                 | NVlabs/LongLive (Wan2.1 1.3B) | 1000 750 500 250 (warped) | 5     | 3     | 12 frames, sink 3  | generator + LoRA   |
| causal-forcing-framewise | thu-ml/Causal-Forcing         | 1000 750 500 250 (warped) | 5     | 1     | global (21 frames) | generator_ema (*)  |
| causal-forcing-chunkwise | thu-ml/Causal-Forcing         | 1000 750 500 250 (warped) | 5     | 3     | global (21 frames) | generator          |
| rolling-forcing          | TencentARC/RollingForcing     | 1000 800 600 400 200 (w.) | 5     | 3     | rolling (21 / 24)  | generator_ema (*)  |

All run without classifier-free guidance at 480x832, 16 fps, and context_noise 0 (the clean pass at t=0).

Causal-Forcing (configs/causal_forcing_dmd_{framewise,chunkwise}.yaml over default_config.yaml; the
inference loop is Self-Forcing's CausalInferencePipeline with one addition, an optional
`denoising_step_list_first_chunk` that only its 1- and 2-step Causal Forcing++ configs set, not these
two). Frame-wise: one latent frame per block, the 21-frame cache of their 1.3B code (32760 tokens)
holds 20 finished frames, so skyrt's global ring for it is sink 1 + window 19 frames. (*) Their
trainer's save() writes only 'generator_ema' once the EMA runs, keyed by the FSDP-wrapped generator's
parameter names, "model._fsdp_wrapped_module." + the WanModel key; their inference.py tries a strict
load, then renames that prefix to "model." and loads with strict=False (a key it misses keeps the
base Wan weights, silently); skyrt strips the wrapper names and loads strictly, naming any key that is
missing. The README runs the frame-wise file with --use_ema and the chunk-wise one without.

Rolling-Forcing (TencentARC/RollingForcing, configs/rolling_forcing_dmd.yaml over default_config.yaml;
the inference loop is their pipeline/rolling_forcing_inference.py `inference_rolling_forcing`): each DiT
call denoises a rolling window of 5 blocks at 5 staggered noise levels (the DF async schedule with
ar_step 1 on the rollout core), with full attention inside the window, the sink (block 0's clean K/V)
re-rotated to sit right before the working blocks, and a clean pass of the window's oldest block that
writes the cache: skyrt._core.RollingCache, with their code's 21-frame attention and 24-frame cache
(`rolling_cache`); skyrt's ring for it, sink 1 + window 6 blocks, holds what their cache holds. (*) Their
README runs rolling_forcing_dmd.pt with --use_ema; the EMA entry is keyed like Causal-Forcing's and their
inference.py strips the wrapper names and loads strictly, as skyrt does. Past the RoPE table skyrt
rebases the cache (their absolute positions would fail); a prompt switch with recache is refused (their
code has none).

A model folder for a preset holds the
family's checkpoint (and LoRA) beside the Wan2.1 files: `Wan2.1_VAE.pth`,
`models_t5_umt5-xxl-enc-bf16.pth`, `google/umt5-xxl/` and, optionally, the Wan2.1 `config.json`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .causal_rollout import CausalSampling
from .kvcache import KVSettings
from .model_config import DiTConfig

OUTPUT_FPS = 16  # every family writes its videos at 16 fps
# GenerationRequest settings of the SkyReels-V2 diffusion-forcing rollout that a family's own sampler
# never reads: given by the user with a preset, they are refused (runtime/resolve.py), not dropped.
DF_ONLY_SETTINGS = ("ar_step", "sampler", "base_num_frames", "overlap_history", "overlap_carry", "addnoise_condition",
                    "condition_noise", "causal_attention")


@dataclass(frozen=True)
class CausalPreset:
    """A causal family: its sampler (`sampling`), its release's file names and skyrt's stream defaults."""

    name: str
    repo: str
    sampling: CausalSampling
    checkpoint_names: tuple[str, ...]  # relative to the model folder, first found wins
    use_ema: bool = False  # read 'generator_ema' instead of 'generator' (their --use_ema)
    lora_names: tuple[str, ...] = ()
    lora_rank: int | None = None  # the rank its LoRA config says, with
    lora_alpha: float | None = None  # this alpha (scale = alpha / rank)
    # skyrt's ring for families without local attention: the first 21 frames (their whole cache at
    # 480x832: 7 blocks of 3) are exact; past that skyrt keeps block 0 as a sink and rolls the rest.
    global_ring: KVSettings = KVSettings(sink_blocks=1, window_blocks=5)
    # (attention_frames, cache_frames): Rolling-Forcing's staggered window and cache policy
    # (causal_rollout.rollout_sampling); None: one block at a time against the ring.
    rolling_cache: tuple[int, int] | None = None
    height: int = 480
    width: int = 832

    @property
    def ring(self) -> KVSettings:
        s = self.sampling
        return self.global_ring if s.local_attn_size == -1 else s.ring()

    def sampling_defaults(self) -> dict[str, Any]:
        """The settings this preset sets: its layer of a resolution (runtime/resolve.py), over the
        model folder's recommendation and under what the user sets."""
        return dict(mode="kvcache", num_inference_steps=len(self.sampling.denoising_step_list),
                    shift=self.sampling.timestep_shift, guidance_scale=1.0,
                    causal_block_size=self.sampling.causal_block_size, sink_blocks=self.ring.sink_blocks,
                    window_blocks=self.ring.window_blocks, height=self.height, width=self.width, fps=OUTPUT_FPS)

    def refusal(self, key: str, value: Any) -> tuple[str, str] | None:
        """(why, fix) when the user's `key=value` is something this preset's sampler cannot run; None
        when it can (None values are "not set": they never conflict)."""
        if value is None:
            return None
        steps = self.sampling.denoising_step_list
        if key == "num_inference_steps" and value != len(steps):
            return (f"was distilled for {len(steps)} steps (denoising_step_list {', '.join(f'{s:g}' for s in steps)}) "
                    "and has no other schedule", f"leave it unset or pass {len(steps)}")
        if key == "mode" and value != "kvcache":
            return ("runs its own sampler with a KV cache (mode='kvcache'); mode='window' is the SkyReels-V2 "
                    "diffusion-forcing rollout", "leave it unset or pass 'kvcache'")
        if key in DF_ONLY_SETTINGS:
            return (f"runs its own sampler, which has no {key} (a setting of the SkyReels-V2 diffusion-forcing "
                    "rollout)", "leave it unset")
        return None


PRESETS: dict[str, CausalPreset] = {p.name: p for p in (
    # configs/self_forcing_dmd.yaml + default_config.yaml; README: inference.py --use_ema
    CausalPreset("self-forcing", "guandeh17/Self-Forcing",
                 CausalSampling((1000, 750, 500, 250), warp_denoising_step=True, timestep_shift=5.0),
                 checkpoint_names=("self_forcing_dmd.pt", "checkpoints/self_forcing_dmd.pt"), use_ema=True),
    # configs/wan_causal_dmd.yaml (the trailing 0 of its list is dropped by their pipeline); shift 8 is
    # their CausalWanDiffusionWrapper's scheduler
    CausalPreset("causvid", "tianweiy/CausVid",
                 CausalSampling((1000, 757, 522), warp_denoising_step=False, timestep_shift=8.0),
                 checkpoint_names=("model.pt", "autoregressive_checkpoint/model.pt")),
    # configs/wan_causal_dmd_warp_4step_cfg2.yaml
    CausalPreset("causvid-warp4", "tianweiy/CausVid",
                 CausalSampling((1000, 750, 500, 250), warp_denoising_step=True, timestep_shift=8.0),
                 checkpoint_names=("model.pt", "autoregressive_checkpoint_warp_4step_cfg2/model.pt")),
    # configs/causal_forcing_dmd_framewise.yaml; README: inference.py --use_ema with
    # checkpoints/framewise/causal_forcing.pt (hf download zhuhz22/Causal-Forcing framewise/causal_forcing.pt)
    CausalPreset("causal-forcing-framewise", "thu-ml/Causal-Forcing",
                 CausalSampling((1000, 750, 500, 250), warp_denoising_step=True, timestep_shift=5.0,
                                causal_block_size=1),
                 checkpoint_names=("framewise/causal_forcing.pt", "checkpoints/framewise/causal_forcing.pt"),
                 use_ema=True, global_ring=KVSettings(sink_blocks=1, window_blocks=19)),
    # configs/causal_forcing_dmd_chunkwise.yaml; README: inference.py (no --use_ema) with
    # checkpoints/chunkwise/causal_forcing.pt. Both releases are named causal_forcing.pt: only the folder
    # tells them apart, so neither preset looks for a bare causal_forcing.pt.
    CausalPreset("causal-forcing-chunkwise", "thu-ml/Causal-Forcing",
                 CausalSampling((1000, 750, 500, 250), warp_denoising_step=True, timestep_shift=5.0,
                                causal_block_size=3),
                 checkpoint_names=("chunkwise/causal_forcing.pt", "checkpoints/chunkwise/causal_forcing.pt")),
    # configs/longlive_inference.yaml of LongLive 1 (Wan2.1-T2V-1.3B; before the LongLive 2.0 rewrite)
    CausalPreset("longlive", "NVlabs/LongLive",
                 CausalSampling((1000, 750, 500, 250), warp_denoising_step=True, timestep_shift=5.0,
                                local_attn_size=12, sink_size=3),
                 checkpoint_names=("longlive_base.pt", "models/longlive_base.pt"),
                 lora_names=("lora.pt", "models/lora.pt"), lora_rank=256, lora_alpha=256),
    # configs/rolling_forcing_dmd.yaml; README: inference.py --use_ema with checkpoints/rolling_forcing_dmd.pt.
    # Their self-attention's max_attention_size (21 frames at 480x832) and kv_cache_clean (24 frames):
    # the window call sees sink + working + window within 21 frames, the clean pass the last 21 of the
    # cache; the ring of sink 1 + window 6 blocks holds the 24 frames but the block being written.
    CausalPreset("rolling-forcing", "TencentARC/RollingForcing",
                 CausalSampling((1000, 800, 600, 400, 200), warp_denoising_step=True, timestep_shift=5.0),
                 checkpoint_names=("rolling_forcing_dmd.pt", "checkpoints/rolling_forcing_dmd.pt"), use_ema=True,
                 global_ring=KVSettings(sink_blocks=1, window_blocks=6), rolling_cache=(21, 24)),
)}


def get_preset(name: str) -> CausalPreset:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; available: {', '.join(PRESETS)}")
    return PRESETS[name]


@dataclass(frozen=True)
class CausalFiles:
    """Which files of a model folder a preset loads, and how."""

    preset: str
    checkpoint: Path
    use_ema: bool
    lora: Path | None = None
    lora_alpha: float | None = None
    lora_rank: int | None = None  # the preset's rank, for which lora_alpha is meant
    config_json: dict | None = field(default=None, compare=False)

    def lora_scale(self, rank: int) -> float:
        """alpha / rank; refused when the file's rank is not the one the alpha was given for."""
        if self.lora_rank is not None and rank != self.lora_rank:
            raise ValueError(f"{self.lora} has rank {rank}, the {self.preset} preset's alpha={self.lora_alpha:g} is "
                             f"for rank {self.lora_rank}: pass lora_alpha= (the alpha it was trained with)")
        return float(self.lora_alpha) / rank


def find_causal_files(folder: Path, preset: CausalPreset, checkpoint: str | Path | None = None,
                      lora: str | Path | None = None, lora_alpha: float | None = None,
                      use_ema: bool | None = None) -> CausalFiles:
    """The preset's checkpoint (and LoRA) in `folder`, or the given paths; a clear error when missing."""
    ckpt = Path(checkpoint).expanduser() if checkpoint is not None else _first(folder, preset.checkpoint_names)
    if ckpt is None:
        raise FileNotFoundError(_missing_checkpoint(folder, preset))
    if ckpt.suffix == ".safetensors":
        raise ValueError(f"{ckpt} is a safetensors DiT: a bidirectional Wan2.1 / SkyReels-V2 release, not a "
                         f"{preset.name} checkpoint (their training .pt with a 'generator' entry)")
    lora_path = Path(lora).expanduser() if lora is not None else _first(folder, preset.lora_names)
    if preset.lora_names and lora_path is None:
        raise FileNotFoundError(f"{folder} has no {preset.name} LoRA ({' or '.join(preset.lora_names)}); "
                                "pass lora=PATH")
    rank = preset.lora_rank if lora_alpha is None else None
    alpha = preset.lora_alpha if lora_alpha is None else lora_alpha
    if lora_path is not None and alpha is None:
        raise ValueError(f"a LoRA ({lora_path}) needs its alpha: pass lora_alpha=")
    return CausalFiles(preset.name, ckpt, preset.use_ema if use_ema is None else bool(use_ema), lora_path, alpha,
                       rank, _config_json(folder))


def _first(folder: Path, names: tuple[str, ...]) -> Path | None:
    return next((folder / n for n in names if (folder / n).is_file()), None)


def _config_json(folder: Path) -> dict | None:
    import json

    path = folder / "config.json"
    return json.loads(path.read_text()) if path.is_file() else None


def _missing_checkpoint(folder: Path, preset: CausalPreset) -> str:
    found = sorted(p.name for p in folder.glob("*.safetensors")) if folder.is_dir() else []
    what = (f"; it holds {', '.join(found[:3])}: a bidirectional Wan2.1 / SkyReels-V2 DiT, which the causal "
            f"{preset.name} sampler would run as garbage") if found else ""
    return (f"{folder} has no {preset.name} checkpoint ({' or '.join(preset.checkpoint_names)}, from "
            f"{preset.repo}){what}. Put the family's checkpoint beside the Wan2.1 VAE and umT5 files, or pass "
            "checkpoint=PATH")


def causal_model_spec(folder: str | Path, preset: CausalPreset, **options):
    """The ModelSpec of a preset's model folder (layout 'causal'); options: checkpoint, lora, lora_alpha,
    use_ema. The DiT config is config.json's, else read off the checkpoint's shapes (imports torch)."""
    from .backends.base import ModelSpec

    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"model folder not found: {folder}")
    files = find_causal_files(folder, preset, **options)
    if files.config_json is not None:
        config = DiTConfig.from_official(files.config_json)
    else:
        from .registry import resolve

        config = resolve("causal:checkpoint_config")(files)
    return ModelSpec(path=folder, layout="causal", dit_config=config.to_official(), family=files)


FAMILY_OPTIONS = ("checkpoint", "lora", "lora_alpha", "use_ema")  # skyrt.load options of a preset
