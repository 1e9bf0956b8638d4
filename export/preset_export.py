"""ONNX export of a causal-family preset (Self-Forcing, CausVid, LongLive, Causal-Forcing, Rolling-Forcing).

    skyrt export onnx --preset longlive --model FOLDER --out DIR [--height 480 --width 832]
                      [--sink-blocks 1 --window-blocks 3] [--precision fp32|fp16|bf16] [--lora-alpha A]

The preset's folder (runtime/causal_family.py: the family's checkpoint, and LongLive's LoRA, beside the
Wan2.1 VAE and umT5 files) is read by export/causal_checkpoint.py, the LoRA merged into the weights
before tracing, and exported as the same graph family as a DF model's (export/onnx_export.py):

| graph            | what the preset's stream runs on it                                                 |
|------------------|--------------------------------------------------------------------------------------|
| text_encoder     | umT5 (the family's prompts are Wan2.1 umT5 contexts)                                 |
| cross_kv         | the prompt K/V, once per prompt                                                      |
| dit_step         | every denoising step and every clean-pass commit: block-causal in the preset's        |
|                  | blocks, against the ring of sink + window blocks (cache in, new K/V out as tensors)  |
| dit_step_full    | the same step with full attention among its frames: the recache chunk of a prompt    |
|                  | switch (LongLive's recache, up to sink + window + 1 blocks; every preset but          |
|                  | Rolling-Forcing) or Rolling-Forcing's window of staggered blocks                      |
| vae_decode_*     | the streaming Wan2.1 VAE decoder (and its encoder, for image starts)                 |

The manifest records the preset (name, ring, the files it was made from) under "preset": skyrt.load
of the folder with an exported-graph backend runs the preset's sampler (runtime/api.py) with no torch.

Every preset's cache is expressible: Rolling-Forcing's sink re-rotation is an in-place rotation of the
core's ring (skyrt._core.RollingCache) and which slots a call sees is the step's slot_valid input, so
its graphs are the same two.

Run its tests: python -m pytest tests/test_preset_export.py -q
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Optional, Sequence

from skyrt.runtime.causal_family import CausalPreset, causal_model_spec, get_preset

from .onnx_export import OnnxProfile, export_onnx

# The graphs of a preset's export, in order.
PRESET_GRAPHS = ("text_encoder", "cross_kv", "dit_step", "dit_step_full", "vae_decode_first", "vae_decode_step",
                 "vae_encode_first", "vae_encode_step")


def blocks_in_flight(preset: CausalPreset) -> int:
    """Most blocks one denoising step of the preset runs: one (a block at a time), or Rolling-Forcing's
    window of one block per step (the DF async schedule with ar_step 1)."""
    return len(preset.sampling.denoising_step_list) if preset.rolling_cache is not None else 1


def full_step_frames(preset: CausalPreset, ring) -> int:
    """Most latent frames of a full-attention step (dit_step_full): Rolling-Forcing's window of
    staggered blocks, else the recache chunk of a prompt switch (LongLive's recache, which every other
    preset runs: sink + window + 1 blocks)."""
    block = preset.sampling.causal_block_size
    if preset.rolling_cache is not None:
        return blocks_in_flight(preset) * block
    return (ring.sink_blocks + ring.window_blocks + 1) * block


def preset_ring(preset: CausalPreset, sink_blocks: Optional[int], window_blocks: Optional[int]):
    """The preset's ring (a runtime KVSettings, validated), with what the caller overrides."""
    ring = preset.ring
    ring = replace(ring, **{k: int(v) for k, v in (("sink_blocks", sink_blocks), ("window_blocks", window_blocks))
                            if v is not None})
    ring.validate(preset.sampling.causal_block_size)
    return ring


def preset_profile(preset: CausalPreset, ring, height: Optional[int] = None, width: Optional[int] = None,
                   precision: str = "fp32", **options) -> OnnxProfile:
    """The OnnxProfile of a preset's export: its block, ring, blocks in flight and full-step frames baked in."""
    block = preset.sampling.causal_block_size
    profile = OnnxProfile(height=height or preset.height, width=width or preset.width, block_frames=block,
                          cache_blocks=ring.sink_blocks + ring.window_blocks,
                          max_active_blocks=blocks_in_flight(preset), window_frames=block,
                          full_step_frames=full_step_frames(preset, ring), precision=precision)
    return replace(profile, **{k: v for k, v in options.items() if v is not None})


def preset_graphs(profile: OnnxProfile) -> list[str]:
    return list(PRESET_GRAPHS)


def export_preset_onnx(model_dir: str | Path, out_dir: str | Path, preset_name: str, *,
                       height: Optional[int] = None, width: Optional[int] = None,
                       sink_blocks: Optional[int] = None, window_blocks: Optional[int] = None,
                       precision: str = "fp32", graphs: Optional[Sequence[str]] = None, progress: bool = True,
                       opset: Optional[int] = None, external_data_threshold: Optional[int] = None,
                       model_hash: Optional[str] = None, components: Optional[tuple] = None,
                       trace: str = "compute", ort_cpu: bool = True, **family) -> dict:
    """Export preset `preset_name`'s graphs of model folder `model_dir` into `out_dir` (manifest returned).

    family: checkpoint=, lora=, lora_alpha=, use_ema= (runtime/causal_family.py find_causal_files).
    components (dit, vae, text_encoder): skip loading (tests pass modules they already hold).
    trace, ort_cpu: as export_onnx's (trace="shapes" is what the real 1.3B shape needs in memory)."""
    preset = get_preset(preset_name)
    spec = causal_model_spec(model_dir, preset, **{k: v for k, v in family.items() if v is not None})
    ring = preset_ring(preset, sink_blocks, window_blocks)
    profile = preset_profile(preset, ring, height, width, precision, opset=opset,
                             external_data_threshold=external_data_threshold)
    wanted = list(graphs) if graphs else preset_graphs(profile)
    unknown = [g for g in wanted if g not in PRESET_GRAPHS]
    if unknown:
        raise ValueError(f"graph(s) {', '.join(unknown)} are not part of a preset export; choose from "
                         f"{', '.join(preset_graphs(profile))}")
    files = spec.family
    record = {"name": preset.name, "repo": preset.repo, "sink_blocks": ring.sink_blocks,
              "window_blocks": ring.window_blocks, "causal_block_size": profile.block_frames,
              "height": profile.height, "width": profile.width, "checkpoint": files.checkpoint.name,
              "use_ema": files.use_ema, "lora": None if files.lora is None else files.lora.name,
              "lora_alpha": files.lora_alpha, "lora_merged": files.lora is not None}
    return export_onnx(model_dir, out_dir, profile, graphs=wanted, progress=progress, model_hash=model_hash,
                       components=components, model_spec=spec, manifest_extra={"preset": record}, trace=trace,
                       ort_cpu=ort_cpu)


def manifest_preset(manifest: dict) -> Optional[str]:
    """The preset an export manifest was made for (None: a DF model's export)."""
    record = manifest.get("preset")
    return None if record is None else record["name"]


__all__ = ["PRESET_GRAPHS", "blocks_in_flight", "export_preset_onnx", "full_step_frames", "manifest_preset",
           "preset_profile", "preset_ring"]
