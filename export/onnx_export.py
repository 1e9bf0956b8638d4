"""ONNX export of every network skyrt runs, plus the manifest.json that the runtimes read.

What it writes (one folder per export; `skyrt export onnx --model DIR --out DIR`):

| graph              | inputs -> outputs (B = 1)                                                              |
|--------------------|-----------------------------------------------------------------------------------------|
| text_encoder       | input_ids, attention_mask int64 [1, Lt] -> context fp32 [1, Lt, text_dim] (zero past the |
|                    | prompt's length, the official `context * mask`)                                         |
| cross_kv           | context fp32 [1, Lt, text_dim] -> cross_k, cross_v [layers, 1, Lt, N, Dh] (once a prompt) |
| dit_window         | latents fp32 [1, 16, F, h, w], t_emb fp32 [1, F, freq_dim], (fps int64 [1]), cross_k,    |
|                    | cross_v, rope_cos, rope_sin fp32 [F*h*w/4, Dh/2] -> velocity fp32 [1, 16, F, h, w]      |
|                    | window mode's step: dit_step with no cache inputs (CachedStep with cache None)          |
| dit_window_causal  | the same with the block-causal mask of `block_frames` baked in                          |
| dit_step           | the KV-cached step (export/cached_step.py): dit_window's inputs plus cache_k, cache_v    |
|                    | [layers, 1, S, N, Dh] and slot_valid bool [1, slots] -> velocity, new_k, new_v           |
|                    | [layers, 1, F*h*w/4, N, Dh]; block-causal in blocks of `block_frames` (baked in)         |
| <dit>.ort_cpu      | each DiT graph again for onnxruntime's CPU provider only: attention as com.microsoft     |
|                    | MultiHeadAttention, GELU as FastGelu (contrib ops; TensorRT cannot build them). Not a     |
|                    | graph of its own: the "ort_cpu" entry of the graph's manifest entry (fp32/fp16 exports)  |
| vae_decode_first   | z fp32 [1, 16, 1, h, w] + every causal-conv cache -> pixels [1, 3, 1, H, W] + caches     |
| vae_decode_step    | the same for every later latent frame -> pixels [1, 3, 4, H, W] + caches                 |
| vae_encode_first   | pixels [1, 3, 1, H, W] + encoder caches -> mu [1, 16, 1, h, w] + caches                  |
| vae_encode_step    | pixels [1, 3, 4, H, W] + encoder caches -> mu + caches (any 1 + 4k clip: first, then     |
|                    | steps; equals the whole-clip encode, see export/vae.py)                                 |

Shapes are static (H x W pixels, cache capacity S = cache_blocks * tokens_per_block, text_len)
except the latent-frame axis F of the two DiT graphs: the rollouts call them with a varying number
of frames (DF windows slide and shrink; blocks in flight ramp up and down), so F is dynamic, with
the range a TensorRT profile needs recorded in the manifest (F a multiple of block_frames for the
block-causal graphs). Host-side inputs, so that no graph needs float64 or position logic:
- t_emb is the float64 sinusoid of the timesteps cast to fp32 (fp32 angles at t ~ 1000 would be
  off by ~1e-4 rad), runtime/rope.py timestep_sinusoid: the torch model uses the same function;
- RoPE cos/sin are real-valued tables of the active tokens' positions (runtime/rope.py rope_tables).

The three DiT graphs are traced from CachedStep's export formulation (export/cached_step.py `_CachedGraphOps`: one
q/k/v Gemm, RoPE as a pair-swap MatMul, the softmax scale folded into q, constant-shape reshapes).
On the benchmark step (benchmarks/backends.py: dim 256, 4 layers, 256 active tokens against 1280
cached; 660 nodes after ORT's optimizer before, 411 in the ORT CPU variant) the ORT CPU variant takes
9-16% less CPU time per call than the previous SDPA-traced graph, the plain graph 3-4% less (this
machine under load, interleaved runs, spinning off); both == torch within 3e-6.

Precision: fp32 graphs are the reference. fp16 graphs (`--precision fp16`) hold the big matmuls,
attention and the K/V caches in fp16; norms, RoPE, the modulation tables and the time/fps
embeddings stay fp32 (their weights are kept fp32 too): TensorRT builds strongly typed networks, so
the precision has to be in the graph. bf16 graphs are the same with bfloat16 for TensorRT (8-bit
significand: 8x coarser than fp16, but fp32's range); onnxruntime's CPU provider has no bf16
MatMul, so they are built into engines in the tests but not run here. The umT5 encoder and the VAE
stay fp32 in every export (umT5 is known to overflow in fp16; the VAE's RMS norm sums squares over
channels in the input dtype). tests/test_onnx_export.py holds the fp16 tolerance of each graph.
fp8 graphs (`--precision fp8`) are the fp16 graphs with the GEMM weights of cross_kv and the DiT step
graphs stored as FP8 E4M3 behind DequantizeLinear (export/quantize.py, weight-only, per-output-channel
scales; the time embedding and the head stay fp16/fp32); the manifest records what was kept and why.
TensorRT(-RTX) builds them for compute capability 8.9+ only; onnxruntime's backend does not run them
(tests/test_fp8_quantize.py checks the Q/DQ graphs on ORT-CPU against torch directly).

Classifier-free guidance: the DiT graphs (and cross_kv) take batch 1 or 2 (a dynamic axis, TensorRT
profile 1..2), traced at 1 and checked at 2 by the tests. One batch-2 call against two batch-1
calls of dit_step, measured once with ORT CPU on a 2-core machine (2 active frames, a full 9-slot
cache, 30 interleaved repeats, medians; the machine was shared, load ~3.5):
    tiny model     (dim 32, 2 layers, 32x32 px):    2 x batch 1: 1.33 ms   batch 2: 0.62 ms
    small model    (dim 256, 4 layers, 64x64 px):   2 x batch 1: 29.1 ms   batch 2: 23.1 ms
    DF-1.3B width  (dim 1536, 2 layers, 128x128):   2 x batch 1: 756 ms    batch 2: 624 ms
Batch 2 wins (1.2-2x: weights are read once, per-call overhead halves), so the graphs carry it, and
the runtime's one DiT entry (a stream session's step on the rollout core's buffers, batch = the
stream's prompt contexts) runs cond and uncond as one batch-2 call in every mode.

External data: a graph whose weights exceed `external_data_threshold` bytes (default 1.8 GB, under
protobuf's 2 GiB limit) is written as `<name>.onnx` + `<name>.onnx.data`; onnx.checker runs on the
path so external data is checked too. TensorRT must parse such graphs from the file.

Run the tests: python -m pytest tests/test_onnx_export.py -q
"""
from __future__ import annotations


import contextlib
import copy
import json
import os
import shutil
import time
import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import nn

from .cached_step import CachedStep
from .dit import CrossKV, WanDiT, cast_dit
from .shape_trace import shape_only
from .vae import WanVAE
from skyrt.runtime.engine_manifest import file_sha256 as sha256_file  # one owner of file hashing

FORMAT = "skyrt-onnx"
FORMAT_VERSION = 1
DEFAULT_OPSET = 18
EXTERNAL_DATA_THRESHOLD = 1_800_000_000  # bytes of weights; protobuf refuses messages over 2 GiB
PRECISIONS = ("fp32", "fp16", "bf16", "fp8")
# fp8 = the fp16 export with the DiT graphs' GEMM weights as FP8 E4M3 + DequantizeLinear (export/quantize.py,
# weight-only): FP8 is a GEMM-only type in TensorRT(-RTX), so everything else stays as in the fp16 graphs.
FP8_BASE_PRECISION = "fp16"
FP8_GRAPHS = ("cross_kv", "dit_window", "dit_window_causal", "dit_step", "dit_step_full")
WINDOW_ATTENTION = ("full", "causal", "both")

# Every graph, in export order. Groups are what a lazily exporting runtime asks for together, and
# the profile fields each graph is specialised on (its static shapes).
GRAPHS = ("text_encoder", "cross_kv", "dit_window", "dit_window_causal", "dit_step", "dit_step_full",
          "vae_decode_first", "vae_decode_step", "vae_encode_first", "vae_encode_step")
GRAPH_PROFILE_FIELDS: dict[str, tuple[str, ...]] = {
    "text_encoder": (),
    "cross_kv": (),
    "dit_window": ("height", "width"),
    "dit_window_causal": ("height", "width", "block_frames"),
    "dit_step": ("height", "width", "block_frames", "cache_blocks"),
    "dit_step_full": ("height", "width", "block_frames", "cache_blocks"),
    "vae_decode_first": ("height", "width"),
    "vae_decode_step": ("height", "width"),
    "vae_encode_first": ("height", "width"),
    "vae_encode_step": ("height", "width"),
}
GRAPH_GROUPS: dict[str, tuple[str, ...]] = {
    "text": ("text_encoder", "cross_kv"),
    "window": ("dit_window",),
    "window_causal": ("dit_window_causal",),
    "step": ("dit_step",),
    "step_full": ("dit_step_full",),
    "vae": ("vae_decode_first", "vae_decode_step", "vae_encode_first", "vae_encode_step"),
}

# The measurement behind the batch axis (module docstring), copied into every manifest.
CFG_BATCH = {
    "graphs_take_batch": [1, 2],
    "runtime_uses_batch": [1, 2],
    "why": "batch 2 is faster on ORT CPU: a stream session's step runs cond and uncond as one call",
    "ort_cpu_2core_ms": {
        "tiny (dim 32, 2 layers, 32x32)": {"two_batch1_calls": 1.33, "one_batch2_call": 0.62},
        "small (dim 256, 4 layers, 64x64)": {"two_batch1_calls": 29.1, "one_batch2_call": 23.1},
        "DF-1.3B width (dim 1536, 2 layers, 128x128)": {"two_batch1_calls": 756.0, "one_batch2_call": 624.0},
    },
}

_ONNX_DTYPES = {1: "float32", 10: "float16", 16: "bfloat16", 7: "int64", 6: "int32", 9: "bool"}


# ----------------------------------------------------------------------------------------------
# Export settings


@dataclass(frozen=True)
class OnnxProfile:
    """What an export is specialised on. Pixel height/width; frame counts are LATENT frames.

    block_frames: causal block size (baked into dit_step and dit_window_causal).
    cache_blocks: ring slots of the KV cache (sink + window blocks), S = cache_blocks * block tokens.
    max_active_blocks: most blocks one dit_step call denoises together (TensorRT profile maximum;
        onnxruntime takes any count).
    window_frames: most latent frames one dit_window call sees (base_num_frames 97 -> 25).
    window_attention: which window graphs to export: full attention (the released checkpoints),
        block-causal, or both.
    """

    height: int = 544
    width: int = 960
    block_frames: int = 1
    cache_blocks: int = 9
    max_active_blocks: int = 6
    window_frames: int = 25
    window_attention: str = "full"
    # Most latent frames of a dit_step_full call (0: no such graph): the KV-cached step with full
    # attention among its frames, for LongLive's recache chunk and Rolling-Forcing's window.
    full_step_frames: int = 0
    precision: str = "fp32"
    opset: int = DEFAULT_OPSET
    external_data_threshold: int = EXTERNAL_DATA_THRESHOLD

    def __post_init__(self):
        for name in ("height", "width"):
            value = getattr(self, name)
            if value <= 0 or value % 16:
                raise ValueError(f"{name}={value} must be a positive multiple of 16 (VAE 8x, patch 2)")
        for name in ("block_frames", "cache_blocks", "max_active_blocks", "window_frames"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if self.full_step_frames < 0:
            raise ValueError(f"full_step_frames={self.full_step_frames} must be >= 0 (0: no dit_step_full graph)")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision={self.precision!r} is not one of {PRECISIONS}")
        if self.window_attention not in WINDOW_ATTENTION:
            raise ValueError(f"window_attention={self.window_attention!r} is not one of {WINDOW_ATTENTION}")
        if self.opset < 17:
            raise ValueError(f"opset={self.opset}: skyrt exports need opset 17 or newer")

    @property
    def latent_size(self) -> tuple[int, int]:
        return self.height // 8, self.width // 8

    def default_graphs(self) -> tuple[str, ...]:
        """Every graph of a full export; the window graphs follow `window_attention`."""
        skip = {"full": {"dit_window_causal"}, "causal": {"dit_window"}, "both": set()}[self.window_attention]
        if not self.full_step_frames:
            skip = skip | {"dit_step_full"}
        return tuple(g for g in GRAPHS if g not in skip)

    def shape_config(self, graph: str) -> dict:
        """The profile fields `graph` is specialised on (what a runtime must match)."""
        return {k: getattr(self, k) for k in GRAPH_PROFILE_FIELDS[graph]}


# ----------------------------------------------------------------------------------------------
# Graph modules: thin wrappers around the torch reference (same modules, same weights)


def _cross_list(cross_k: torch.Tensor, cross_v: torch.Tensor) -> list[CrossKV]:
    """Stacked [layers, B, Lt, N, Dh] K/V -> one CrossKV per layer."""
    return [CrossKV(cross_k[i], cross_v[i]) for i in range(cross_k.shape[0])]


class CrossKVGraph(nn.Module):
    """context [B, Lt, text_dim] fp32 -> (cross_k, cross_v) [layers, B, Lt, N, Dh] in the compute dtype."""

    def __init__(self, dit: WanDiT):
        super().__init__()
        self.dit = dit

    def forward(self, context: torch.Tensor):
        kvs = self.dit.cross_attention_kv(context)
        return torch.stack([kv.k for kv in kvs]), torch.stack([kv.v for kv in kvs])


class _SinusoidCachedStep(CachedStep):
    """CachedStep whose `t` argument is already the sinusoid [B, f, freq_dim] (host-side float64)."""

    def embed_time(self, t_emb, fps):
        return self.dit.embed_sinusoid(t_emb, fps, check_fps=False)


class StepGraph(nn.Module):
    """The KV-cached step (export/cached_step.py) with stacked cross K/V and per-slot validity.

    slot_valid bool [B, slots] is expanded to tokens in the graph (slots * tokens_per_block = S).
    block_frames None: full attention among the step's frames (dit_step_full)."""

    def __init__(self, dit: WanDiT, block_frames: Optional[int], tokens_per_block: int, graph: str = "onnx"):
        super().__init__()
        self.step = _SinusoidCachedStep(dit, graph=graph)
        self.block_frames = block_frames
        self.tokens_per_block = tokens_per_block

    def forward(self, latents, t_emb, cross_k, cross_v, cache_k, cache_v, slot_valid, rope_cos, rope_sin, fps=None):
        batch, slots = slot_valid.shape
        valid = slot_valid[:, :, None].expand(batch, slots, self.tokens_per_block).reshape(batch, -1)  # [B, S]
        return self.step(latents, t_emb, _cross_list(cross_k, cross_v), cache_k, cache_v, valid, rope_cos,
                         rope_sin, fps=fps, causal_block_size=self.block_frames)


class WindowStepGraph(nn.Module):
    """Window mode's DiT step: StepGraph with no cache inputs (CachedStep with cache None, S = 0), every
    frame of the window active at RoPE positions from 0, velocity out (no K/V: nothing is committed).

    causal_block_size None = full attention among the frames, k = block-causal in blocks of k (baked in)."""

    def __init__(self, dit: WanDiT, causal_block_size: Optional[int] = None, graph: str = "onnx"):
        super().__init__()
        self.step = _SinusoidCachedStep(dit, graph=graph)
        self.causal_block_size = causal_block_size

    def forward(self, latents, t_emb, cross_k, cross_v, rope_cos, rope_sin, fps=None):
        velocity, _, _ = self.step(latents, t_emb, _cross_list(cross_k, cross_v), None, None, None, rope_cos, rope_sin,
                                   fps=fps, causal_block_size=self.causal_block_size)
        return velocity


class TextEncoderGraph(nn.Module):
    """umT5 (transformers UMT5EncoderModel): ids, mask [B, Lt] -> context [B, Lt, d_model] fp32, zeroed
    past each prompt's length (TextEncoder.encode semantics)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return hidden.float() * attention_mask.to(torch.float32).unsqueeze(-1)


class VAEStepGraph(nn.Module):
    """WanVAE.decode_step (z, *caches) -> (pixels, *caches), or with encode=True WanVAE.encode_step
    (pixels, *caches) -> (mu, *caches): flat tensors in and out."""

    def __init__(self, vae: WanVAE, first: bool, encode: bool = False):
        super().__init__()
        self.vae, self.first, self.encode = vae, first, encode

    def forward(self, x, *caches):
        step = self.vae.encode_step if self.encode else self.vae.decode_step
        out, new = step(x, caches, self.first)
        return (out, *new)


# ----------------------------------------------------------------------------------------------
# Example inputs and I/O names per graph


@dataclass
class GraphSpec:
    """Everything torch.onnx.export needs for one graph, plus manifest extras."""

    name: str
    module: nn.Module
    args: tuple
    input_names: list[str]
    output_names: list[str]
    dynamic_axes: dict = field(default_factory=dict)
    ranges: dict = field(default_factory=dict)  # dynamic axis name -> (min, opt, max)
    info: dict = field(default_factory=dict)  # graph-specific manifest fields


def _frame_ranges(min_frames: int, max_frames: int, tokens_per_frame: int) -> dict:
    """(min, opt, max) of the latent-frame axis and of the token axis that follows it (opt = max: the
    steady state of a rollout runs full windows / every block in flight)."""
    return {"frames": (min_frames, max_frames, max_frames),
            "tokens": (min_frames * tokens_per_frame, max_frames * tokens_per_frame, max_frames * tokens_per_frame),
            "active_tokens": (min_frames * tokens_per_frame, max_frames * tokens_per_frame,
                              max_frames * tokens_per_frame)}


def _trt_profile(spec: GraphSpec) -> dict:
    """input name -> [min, opt, max] shapes for every input with a dynamic axis (what a TensorRT
    optimization profile takes; export/engine.py reads it from the manifest)."""
    profile = {}
    for name, arg in zip(spec.input_names, spec.args):
        axes = spec.dynamic_axes.get(name)
        if not axes:
            continue
        shapes = [list(arg.shape) for _ in range(3)]
        for axis, axis_name in axes.items():
            for i in range(3):
                shapes[i][axis] = int(spec.ranges[axis_name][i])
        profile[name] = shapes
    return profile


def _dit_inputs(dit: WanDiT, frames: int, h: int, w: int, gen: torch.Generator):
    """Example latents, t_emb, cross K/V, RoPE (and fps) for a DiT graph of `frames` latent frames."""
    from .dit import rope_cos_sin, timestep_sinusoid

    cfg = dit.config
    latents = torch.randn(1, cfg.in_dim, frames, h, w, generator=gen)
    t_emb = timestep_sinusoid(torch.rand(1, frames, generator=gen) * 1000, cfg.freq_dim)
    context = torch.randn(1, cfg.text_len, cfg.text_dim, generator=gen)
    with torch.no_grad():
        cross_k, cross_v = CrossKVGraph(dit)(context)
    cos, sin = rope_cos_sin(cfg.head_dim, range(frames), h // cfg.patch_size[1], w // cfg.patch_size[2])
    fps = torch.ones(1, dtype=torch.long) if cfg.inject_sample_info else None
    return latents, t_emb, cross_k, cross_v, cos, sin, fps


# Axis of the batch in each DiT-graph tensor (the stacked per-layer tensors carry layers first).
_BATCH_AXIS = {"cross_k": 1, "cross_v": 1, "cache_k": 1, "cache_v": 1, "new_k": 1, "new_v": 1}
_NO_BATCH = ("rope_cos", "rope_sin")


def _with_batch_axis(spec: GraphSpec) -> GraphSpec:
    """Make the batch axis dynamic (1 or 2: classifier-free guidance may stack cond and uncond, see
    the module docstring); traced at batch 1, checked at batch 2 by tests/test_onnx_export.py."""
    for name in spec.input_names + spec.output_names:
        if name not in _NO_BATCH:
            spec.dynamic_axes.setdefault(name, {})[_BATCH_AXIS.get(name, 0)] = "batch"
    spec.ranges["batch"] = (1, 1, 2)
    return spec


def build_graph_spec(name: str, dit: WanDiT, vae: WanVAE, text_encoder, profile: OnnxProfile) -> GraphSpec:
    """The module, example inputs and I/O names of graph `name` (see the table in the docstring)."""
    spec = _build_graph_spec(name, dit, vae, text_encoder, profile)
    return _with_batch_axis(spec) if name in ("cross_kv", "dit_window", "dit_window_causal", "dit_step",
                                                  "dit_step_full") else spec


def _build_graph_spec(name: str, dit: WanDiT, vae: WanVAE, text_encoder, profile: OnnxProfile) -> GraphSpec:
    gen = torch.Generator().manual_seed(0)
    h, w = profile.latent_size
    if dit is not None:  # the VAE and text graphs need no DiT
        cfg = dit.config
        tokens_per_frame = (h // cfg.patch_size[1]) * (w // cfg.patch_size[2])
        fps_in = ["fps"] if cfg.inject_sample_info else []
    frames_axis = {"latents": {2: "frames"}, "t_emb": {1: "frames"}, "rope_cos": {0: "tokens"},
                   "rope_sin": {0: "tokens"}, "velocity": {2: "frames"}}

    if name == "text_encoder":
        text_len = text_encoder.text_len
        ids = torch.randint(3, text_encoder.model.config.vocab_size, (1, text_len), generator=gen)
        mask = torch.zeros(1, text_len, dtype=torch.long)
        mask[:, : max(1, text_len // 2)] = 1  # padded like a real prompt, so the mask path is traced
        ids = ids * mask
        return GraphSpec(name, TextEncoderGraph(text_encoder.model), (ids, mask), ["input_ids", "attention_mask"],
                         ["context"], info={"precision": "fp32", "text_len": text_len})

    if name == "cross_kv":
        context = torch.randn(1, cfg.text_len, cfg.text_dim, generator=gen)
        return GraphSpec(name, CrossKVGraph(dit), (context,), ["context"], ["cross_k", "cross_v"])

    if name in ("dit_window", "dit_window_causal"):
        block = profile.block_frames if name == "dit_window_causal" else None
        # Trace with two blocks so the block-causal mask is a graph of the (dynamic) frame count.
        frames = 2 * (block or 1)
        latents, t_emb, ck, cv, cos, sin, fps = _dit_inputs(dit, frames, h, w, gen)
        args = (latents, t_emb, ck, cv, cos, sin) + ((fps,) if fps is not None else ())
        max_frames = profile.window_frames if block is None else max(block, profile.window_frames // block * block)
        return GraphSpec(name, WindowStepGraph(dit, block), args,
                         ["latents", "t_emb", "cross_k", "cross_v", "rope_cos", "rope_sin"] + fps_in, ["velocity"],
                         frames_axis, _frame_ranges(block or 1, max_frames, tokens_per_frame),
                         info={"causal_block_size": block, "frames_multiple_of": block or 1})

    if name in ("dit_step", "dit_step_full"):
        full = name == "dit_step_full"
        block = profile.block_frames
        tokens_per_block = block * tokens_per_frame
        frames = 2 * block  # two blocks in flight: the block-causal mask among active tokens is traced
        latents, t_emb, ck, cv, cos, sin, fps = _dit_inputs(dit, frames, h, w, gen)
        dtype = dit.compute_dtype
        shape = (cfg.num_layers, 1, profile.cache_blocks * tokens_per_block, cfg.num_heads, cfg.head_dim)
        cache_k = torch.randn(shape, generator=gen).to(dtype)
        cache_v = torch.randn(shape, generator=gen).to(dtype)
        slot_valid = torch.zeros(1, profile.cache_blocks, dtype=torch.bool)
        slot_valid[:, : (profile.cache_blocks + 1) // 2] = True
        args = (latents, t_emb, ck, cv, cache_k, cache_v, slot_valid, cos, sin) + ((fps,) if fps is not None else ())
        axes = {**frames_axis, "new_k": {2: "active_tokens"}, "new_v": {2: "active_tokens"}}
        if full:  # any frame count (a recache chunk grows block by block until the ring is full)
            min_frames, max_frames, multiple = 1, max(profile.full_step_frames, 1), 1
        else:
            min_frames, max_frames, multiple = block, profile.max_active_blocks * block, block
        return GraphSpec(name, StepGraph(dit, None if full else block, tokens_per_block), args,
                         ["latents", "t_emb", "cross_k", "cross_v", "cache_k", "cache_v", "slot_valid", "rope_cos",
                          "rope_sin"] + fps_in, ["velocity", "new_k", "new_v"], axes,
                         _frame_ranges(min_frames, max_frames, tokens_per_frame),
                         info={"causal_block_size": None if full else block, "frames_multiple_of": multiple,
                               "tokens_per_block": tokens_per_block, "cache_slots": profile.cache_blocks})

    if name.startswith("vae_decode"):
        first = name == "vae_decode_first"
        specs = vae.decoder_cache_specs
        caches = [torch.randn(s.shape(1, profile.height, profile.width), generator=gen) * (0 if first else 1)
                  for s in specs]
        z = torch.randn(1, vae.config.z_dim, 1, h, w, generator=gen)
        names = [f"cache_{i:02d}" for i in range(len(specs))]
        return GraphSpec(name, VAEStepGraph(vae, first), (z, *caches), ["z"] + names,
                         ["pixels"] + [f"new_{n}" for n in names],
                         info={"precision": "fp32", "caches": [s.name for s in specs],
                               "pixel_frames": 1 if first else vae.config.temporal_factor})

    if name.startswith("vae_encode"):
        first = name == "vae_encode_first"
        specs = vae.encoder_cache_specs
        caches = [torch.randn(s.shape(1, profile.height, profile.width), generator=gen) * (0 if first else 1)
                  for s in specs]
        frames = 1 if first else vae.config.temporal_factor
        pixels = torch.rand(1, 3, frames, profile.height, profile.width, generator=gen) * 2 - 1
        names = [f"cache_{i:02d}" for i in range(len(specs))]
        return GraphSpec(name, VAEStepGraph(vae, first, encode=True), (pixels, *caches), ["pixels"] + names,
                         ["mu"] + [f"new_{n}" for n in names],
                         info={"precision": "fp32", "caches": [s.name for s in specs], "pixel_frames": frames})

    raise ValueError(f"unknown graph {name!r}; known: {', '.join(GRAPHS)}")


# ----------------------------------------------------------------------------------------------
# Writing one graph


def value_info(values) -> list[dict]:
    """ONNX graph inputs/outputs -> [{"name", "shape" (ints, or names of dynamic axes), "dtype"}]."""
    out = []
    for v in values:
        t = v.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else d.dim_param for d in t.shape.dim]
        out.append({"name": v.name, "shape": dims, "dtype": _ONNX_DTYPES.get(t.elem_type, str(t.elem_type))})
    return out


class _ShapeRecorder(nn.Module):
    """Runs a graph module and remembers its output shapes (seen while tracing: no second run)."""

    def __init__(self, inner: nn.Module, shapes_only: bool = False):
        super().__init__()
        self.inner = inner
        self.shapes_only = shapes_only  # trace without computing the activations (export/shape_trace.py)
        self.shapes: list[tuple[int, ...]] = []

    def forward(self, *args):
        if self.shapes_only:
            with shape_only():
                out = self.inner(*args)
        else:
            out = self.inner(*args)
        self.shapes = [tuple(int(d) for d in o.shape) for o in (out if isinstance(out, (tuple, list)) else (out,))]
        return out


def _name_output_dims(model, spec: GraphSpec, shapes: list[tuple[int, ...]]) -> None:
    """Give every output its static size (seen while tracing the example inputs) or its dynamic axis
    name: the tracer leaves names like 'Reshapevelocity_dim_0', which help neither TensorRT nor users."""
    for value, shape in zip(model.graph.output, shapes):
        axes = spec.dynamic_axes.get(value.name, {})
        dims = value.type.tensor_type.shape.dim
        del dims[:]
        for axis, size in enumerate(shape):
            dim = dims.add()
            if axis in axes:
                dim.dim_param = axes[axis]
            else:
                dim.dim_value = int(size)


def _initializer_bytes(model, base_dir: Optional[Path] = None) -> int:
    """Bytes of the graph's initializers, in the proto or (base_dir: not loaded yet) in external files."""
    from onnx import numpy_helper
    from onnx.external_data_helper import ExternalDataInfo, uses_external_data

    total = 0
    for init in model.graph.initializer:
        if uses_external_data(init):
            info = ExternalDataInfo(init)
            total += info.length if info.length else (Path(base_dir) / info.location).stat().st_size - (info.offset or 0)
        elif init.HasField("raw_data"):
            total += len(init.raw_data)
        else:
            total += numpy_helper.to_array(init).nbytes
    return total


def _save_external_streamed(model, src_dir: Path, out_dir: Path, data_name: str, size_threshold: int = 1024) -> None:
    """What onnx.save_model(save_as_external_data=True, all_tensors_to_one_file=True, location=data_name,
    size_threshold=...) writes for `model` once its external data (in src_dir: torch's export) were
    loaded, without loading them all: one initializer at a time is read, appended to out_dir/data_name
    (onnx's own writer: the same offsets) and dropped. The same files; the peak is one tensor instead
    of the whole model's weights in the proto (2.8 GB at the real 1.3B in fp16).
    The caller saves the graph (tensors' data now external) with onnx.save_model."""
    import sys

    from onnx.external_data_helper import (_get_attribute_tensors, _get_initializer_tensors,
                                           load_external_data_for_tensor, save_external_data, set_external_data,
                                           uses_external_data)

    for tensor in _get_initializer_tensors(model):  # onnx writes initializers first, in this order
        if uses_external_data(tensor):
            load_external_data_for_tensor(tensor, str(src_dir))
        # sys.getsizeof: onnx's own size test (convert_model_to_external_data)
        if tensor.HasField("raw_data") and sys.getsizeof(tensor.raw_data) >= size_threshold:
            set_external_data(tensor, data_name)
            save_external_data(tensor, str(out_dir))
            tensor.ClearField("raw_data")
    for tensor in _get_attribute_tensors(model):  # attributes stay in the graph (convert_attribute=False)
        if uses_external_data(tensor):
            load_external_data_for_tensor(tensor, str(src_dir))


def export_graph(spec: GraphSpec, out_dir: Path, opset: int, external_data_threshold: int,
                 shapes_only: bool = False) -> dict:
    """Trace `spec` with the legacy (TorchScript) exporter, write <out_dir>/<name>.onnx (external data
    past the threshold), run onnx.checker on the path, and return its manifest entry.

    shapes_only: trace without computing the activations (export/shape_trace.py; the same graph,
    for graphs in SHAPE_TRACE_GRAPHS, whose spec.args may then be uncomputed tensors)."""
    import onnx
    from onnx.external_data_helper import load_external_data_for_model

    tmp = out_dir / f".tmp-{spec.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        recorder = _ShapeRecorder(spec.module, shapes_only).eval()
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # TracerWarnings on shape checks that are static by design
            torch.onnx.export(recorder, spec.args, str(tmp / "graph.onnx"), dynamo=False,
                              opset_version=opset, input_names=spec.input_names, output_names=spec.output_names,
                              dynamic_axes=spec.dynamic_axes or None, do_constant_folding=True)
        # the weights stay in torch's files until written out one by one (_save_external_streamed)
        model = onnx.load(str(tmp / "graph.onnx"), load_external_data=False)
        _name_output_dims(model, spec, recorder.shapes)
        target = out_dir / f"{spec.name}.onnx"
        data_name = f"{spec.name}.onnx.data"
        for stale in (target, out_dir / data_name):
            stale.unlink(missing_ok=True)
        external = _initializer_bytes(model, tmp) > external_data_threshold
        if external:
            _save_external_streamed(model, tmp, out_dir, data_name, size_threshold=1024)
        else:
            load_external_data_for_model(model, str(tmp))
        onnx.save_model(model, str(target))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    onnx.checker.check_model(str(target), full_check=False)  # path-based: covers external data
    files = [target.name] + ([data_name] if external else [])
    return {
        "file": target.name,
        "external_data": data_name if external else None,
        "sha256": {f: sha256_file(out_dir / f) for f in files},
        "inputs": value_info(model.graph.input),
        "outputs": value_info(model.graph.output),
        "dynamic_axes": spec.dynamic_axes,
        "profile": _trt_profile(spec),
        **spec.info,
    }


TRACES = ("compute", "shapes")  # export_onnx(trace=...): how graphs are traced
# What trace="shapes" covers: the graphs with no control flow on tensor values (export/cached_step.py,
# CrossKVGraph), checked equal to the computing trace by tests/test_shape_trace.py.
SHAPE_TRACE_GRAPHS = ("cross_kv", "dit_window", "dit_window_causal", "dit_step", "dit_step_full")
ORT_CPU_VARIANT = "ort_cpu"  # the manifest key of a DiT step graph's onnxruntime-CPU variant
DIT_STEP_GRAPHS = ("dit_window", "dit_window_causal", "dit_step", "dit_step_full")  # CachedStep's graphs, each with that variant
ORT_CPU_PRECISIONS = ("fp32", "fp16")  # what ORT's CPU provider runs (no bf16 MatMul)
ORT_CPU_CONTRIB_OPS = ["com.microsoft.MultiHeadAttention", "com.microsoft.FastGelu"]


def _ort_cpu_module(module: nn.Module) -> nn.Module:
    """The same DiT step graph module in CachedStep's "onnx-ort" formulation (same weights)."""
    dit = module.step.dit
    if isinstance(module, WindowStepGraph):
        return WindowStepGraph(dit, module.causal_block_size, graph="onnx-ort")
    return StepGraph(dit, module.block_frames, module.tokens_per_block, graph="onnx-ort")


def export_ort_cpu_step(spec: GraphSpec, out_dir: Path, profile: OnnxProfile, shapes_only: bool = False) -> dict:
    """A DiT step graph (dit_step, dit_window, dit_window_causal) again, attention and GELU as
    onnxruntime contrib ops (CachedStep graph="onnx-ort"), into <out_dir>/<name>.ort_cpu.onnx; returns
    the "ort_cpu" entry of the graph's manifest entry. Same inputs, outputs and semantics as <name>.onnx;
    only onnxruntime's CPU provider runs it (the onnxruntime backend picks it there); TensorRT engines
    are built from <name>.onnx."""
    variant = replace(spec, name=f"{spec.name}.{ORT_CPU_VARIANT}", module=_ort_cpu_module(spec.module))
    entry = export_graph(variant, out_dir, profile.opset, profile.external_data_threshold, shapes_only)
    return {"file": entry["file"], "external_data": entry["external_data"], "sha256": entry["sha256"],
            "providers": ["CPUExecutionProvider"], "contrib_ops": ORT_CPU_CONTRIB_OPS,
            "why": "MultiHeadAttention's CPU kernel skips the transposes and the separate bias/softmax "
                   "passes, FastGelu replaces nine elementwise ops; TensorRT cannot build contrib ops"}


def quantize_entry_fp8(out_dir: Path, entry: dict) -> dict:
    """Quantize a just-exported graph file in place to FP8 weights (export/quantize.py, weight-only);
    returns the manifest fields that change: precision, base precision, sha256 and the fp8 summary."""
    from .quantize import quantize_onnx_fp8

    path = out_dir / entry["file"]
    report = quantize_onnx_fp8(path, path, mode="weights")
    files = [entry["file"]] + ([entry["external_data"]] if entry.get("external_data") else [])
    summary = report.to_dict()
    return {"precision": "fp8", "base_precision": FP8_BASE_PRECISION,
            "sha256": {f: sha256_file(out_dir / f) for f in files},
            "fp8": {"mode": report.mode, "opset": report.opset, "quantized": summary["quantized_count"],
                    "kept": {w.weight: w.reason for w in report.weights if not w.quantized},
                    "initializer_bytes_before": report.initializer_bytes_before,
                    "initializer_bytes_after": report.initializer_bytes_after}}


# ----------------------------------------------------------------------------------------------
# A whole export


def export_onnx(
    model_dir: str | Path,
    out_dir: str | Path,
    profile: OnnxProfile = OnnxProfile(),
    graphs: Optional[Sequence[str]] = None,
    progress: bool = True,
    model_hash: Optional[str] = None,
    components: Optional[tuple] = None,
    model_spec=None,
    manifest_extra: Optional[dict] = None,
    trace: str = "compute",
    ort_cpu: bool = True,
) -> dict:
    """Export `graphs` (default: every graph of `profile`) of the model folder into `out_dir`.

    Writes <graph>.onnx files, tokenizer.json and manifest.json (returned as a dict). `components`
    (dit, vae, text_encoder) skips loading the folder (tests pass modules they already hold).
    `model_spec` (a runtime ModelSpec) is the folder as already inspected (a causal preset's folder,
    export/preset_export.py); `manifest_extra` adds top-level manifest fields (its "preset").
    `trace` "shapes": the DiT graphs and cross_kv are traced without computing their activations
    (export/shape_trace.py: the same graphs, at a fraction of the memory; what the real 1.3B shape
    needs), "compute" (default): by running them once. `ort_cpu` False: no onnxruntime-CPU variants
    of the DiT graphs (a TensorRT-only export).
    """
    from tqdm.auto import tqdm

    from skyrt.runtime.model_folder import inspect_model_folder

    from .loaders import load_components

    spec = model_spec if model_spec is not None else inspect_model_folder(model_dir)
    graphs = list(graphs or profile.default_graphs())
    unknown = [g for g in graphs if g not in GRAPHS]
    if unknown:
        raise ValueError(f"unknown graph(s) {', '.join(unknown)}; known: {', '.join(GRAPHS)}")
    traced_precision = FP8_BASE_PRECISION if profile.precision == "fp8" else profile.precision
    # a folder loaded here goes straight into the traced dtypes (causal layout: tensor by tensor, no
    # fp32 model in between: 5.7 GB + its cast at the real 1.3B); cast_dit below is then a no-op
    low_memory = components is None and traced_precision != "fp32"
    dit, vae, text_encoder = components or load_components(
        spec, dtype=torch.float32, export_precision=traced_precision if low_memory else None)
    cfg = dit.config
    if cfg.model_type != "t2v":
        raise ValueError(f"model_type={cfg.model_type!r}: the ONNX export covers t2v DiTs (SkyReels-V2 DF); "
                         "i2v (CLIP image tokens) is not exported yet")
    if cfg.patch_size != (1, 2, 2):
        raise ValueError(f"patch_size={cfg.patch_size}: the runtime assumes (1, 2, 2)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if trace not in TRACES:
        raise ValueError(f"trace={trace!r} is not one of {TRACES}")
    # a folder loaded here is ours: cast in place (a 1.3B fp32 DiT is 5.7 GB; its copy would double it)
    graph_dit = cast_dit(dit, traced_precision, in_place=components is None)
    del dit

    entries = {}
    bar = tqdm(graphs, desc="export onnx", unit="graph", disable=not progress)
    for name in bar:
        bar.set_postfix_str(name)
        start = time.perf_counter()
        shapes_only = trace == "shapes" and name in SHAPE_TRACE_GRAPHS
        with shape_only(inputs=True) if shapes_only else contextlib.nullcontext():  # uncomputed example inputs
            gspec = build_graph_spec(name, graph_dit, vae, text_encoder, profile)
        entry = export_graph(gspec, out, profile.opset, profile.external_data_threshold, shapes_only)
        if name in DIT_STEP_GRAPHS and profile.precision in ORT_CPU_PRECISIONS and ort_cpu:
            entry[ORT_CPU_VARIANT] = export_ort_cpu_step(gspec, out, profile, shapes_only)
        del gspec  # its example inputs (GBs at the real shape when computed)
        if profile.precision == "fp8" and name in FP8_GRAPHS:
            entry.update(quantize_entry_fp8(out, entry))
        entry.setdefault("precision", profile.precision)
        entry["shape_config"] = profile.shape_config(name)
        entry["export_seconds"] = round(time.perf_counter() - start, 3)
        entries[name] = entry
    bar.close()

    tokenizer = None
    if "text_encoder" in graphs:
        tokenizer = {"file": "tokenizer.json", "pad_token": text_encoder.tokenizer.pad_token,
                     "pad_id": int(text_encoder.tokenizer.pad_token_id)}
        _save_tokenizer(text_encoder.tokenizer, out / tokenizer["file"])

    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "versions": _versions(),
        "precision": profile.precision,
        "export_config": asdict(profile),
        "model": {
            "hash": model_hash,
            "layout": spec.layout,
            "dit_config": cfg.to_official(),
            "vae_config": asdict(vae.config),
            "text_encoder": {"text_len": text_encoder.text_len, "d_model": text_encoder.d_model,
                             "vocab_size": int(text_encoder.model.config.vocab_size), "clean": text_encoder.clean},
        },
        "tokenizer": tokenizer,
        "cfg_batch": CFG_BATCH,
        "graphs": entries,
        **(manifest_extra or {}),
    }
    if tokenizer:
        manifest["tokenizer_sha256"] = sha256_file(out / tokenizer["file"])
    text = json.dumps(manifest, indent=2) + "\n"
    tmp = out / f".manifest.json.tmp-{os.getpid()}"
    tmp.write_text(text)
    os.replace(tmp, out / "manifest.json")  # a manifest is only ever complete
    return json.loads(text)  # exactly what a reader gets (json turns int axis keys into strings)


def _save_tokenizer(tokenizer, path: Path) -> None:
    """The fast tokenizer's tokenizer.json, without padding/truncation state (the runtime sets them)."""
    backend = copy.deepcopy(tokenizer.backend_tokenizer)
    backend.no_padding()
    backend.no_truncation()
    backend.save(str(path))


def _versions() -> dict:
    import onnx

    import skyrt

    return {"skyrt": skyrt.__version__, "torch": torch.__version__, "onnx": onnx.__version__}


def profile_from_options(**options) -> OnnxProfile:
    """An OnnxProfile from keyword options (None values keep the defaults)."""
    return replace(OnnxProfile(), **{k: v for k, v in options.items() if v is not None})


__all__ = ["GRAPHS", "GRAPH_GROUPS", "GRAPH_PROFILE_FIELDS", "OnnxProfile", "build_graph_spec", "cast_dit",
           "export_graph", "export_onnx", "profile_from_options", "sha256_file"]
