"""The torch backend's KV-cached step at fixed shapes, and its CUDA graphs.

The default torch step (export/torch_backend.py, TorchKVStreamSession) attends to the ring's VALID
slots only: a gather (index_select) of the cached K/V whenever they do not lead the ring, i.e. a new
[layers, B, S_valid, N, Dh] tensor per step, whose shape changes while the ring fills. A CUDA graph
cannot hold either. `StaticKVStep` is the same step at shapes fixed per step key:

- attention over the WHOLE ring with an additive bias, 0 over the valid slots' tokens and -inf over
  the others (and the block-causal pattern among the active frames where it applies). exp(-inf) = 0,
  so this is the gathered step up to summation order (the ring is zeroed at allocation and evicted
  data is finite, so masked keys never inject NaN); tests/test_static_step.py checks <= 1e-6 fp32;
- static inputs per step key (active frames f, attention pattern): latents [B, 16, f, H, W] in the
  compute dtype, the timestep sinusoid [B, f, freq_dim] fp32 (computed on the host in float64, as the
  exported graphs take it), RoPE cos/sin [f*h*w, Dh/2] fp32, the per-slot bias [slots]; allocated at
  the key's first step, then only copied into (on a GPU through pinned host staging, asynchronously);
- static prompt K/V: every prompt padded to the context length (-inf bias on the padding), so a prompt
  switch copies into the same buffers instead of changing shapes;
- the ring is read in place (the rollout core's memory, which does not move while the stream lives).

`compute(key)` reads nothing but those buffers, the ring and the prompt K/V: it is what gets captured.
`TorchCudaGraphs` is the torch.cuda.CUDAGraph mechanism for runtime/step_graphs.py's StepGraphs (one
graph per step key, replayed on torch's current stream, the rollout core's). NOT EXECUTED in skyrt's CI
(no GPU): benchmarks/gpu_validate.py --mode torch-only runs it against the eager step.

Shapes: B prompt contexts (cond, uncond), S = slots * tokens_per_slot cache tokens, L = f*h*w active
tokens; ring K/V [layers, B, S, N, Dh].
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Hashable, Optional, Sequence

import numpy as np
import torch

from skyrt.runtime.rope import rope_tables, timestep_sinusoid

from .dit import CrossKV, WanDiT, batch_cross_kv, block_causal_mask
from .onnx_export import _SinusoidCachedStep

FULL = "full"  # the attention key of a step whose active frames all see each other


def attention_key(frames: int, causal_block_size: Optional[int]) -> Hashable:
    """The attention part of a step key: FULL when the active frames attend to each other fully
    (no block size, or one block), else the block size (block-causal among them)."""
    return FULL if causal_block_size is None or frames <= causal_block_size else int(causal_block_size)


@dataclass
class _StaticIO:
    """One step key's static inputs (see the module docstring for shapes) and host staging."""

    latents: torch.Tensor  # [B, 16, f, H, W] compute dtype
    t_emb: torch.Tensor  # [B, f, freq_dim] fp32
    cos: torch.Tensor  # [L, Dh/2] fp32
    sin: torch.Tensor  # [L, Dh/2] fp32
    slot_bias: Optional[torch.Tensor]  # [slots] compute dtype, 0 / -inf; None for a window step
    active_bias: Optional[torch.Tensor]  # [1, L] zeros (FULL) or [L, L] 0 / -inf, compute dtype; None: no mask
    staging: dict[str, torch.Tensor]  # host copies of t_emb / cos / sin / slot_bias (pinned on a GPU)


class StaticKVStep:
    """The KV-cached step over fixed-shape buffers (module docstring).

    dit: the model; ring_k / ring_v [layers, B, S, N, Dh] (the core's memory) or None for a window step;
    slots, tokens_per_slot: the ring's layout; fps [B] long classes or None; grid (h, w) in tokens."""

    def __init__(self, dit: WanDiT, ring_k: Optional[torch.Tensor], ring_v: Optional[torch.Tensor], slots: int,
                 tokens_per_slot: int, fps: Optional[torch.Tensor], device: torch.device):
        self.dit, self.device = dit, torch.device(device)
        self.step = _SinusoidCachedStep(dit)
        self.ring_k, self.ring_v = ring_k, ring_v
        self.slots, self.tokens_per_slot = int(slots), int(tokens_per_slot)
        self.fps = fps
        self.cross: Optional[list[CrossKV]] = None
        self._io: dict[Hashable, _StaticIO] = {}
        self._pinned = self.device.type == "cuda"
        # the last host-to-device copy out of the staging buffers: waited on before they are rewritten
        self._copied = torch.cuda.Event() if self._pinned else None
        self._copy_pending = False

    # ---- prompts ----------------------------------------------------------------------------------
    def set_prompts(self, prompts: Sequence[list[CrossKV]], length: int) -> bool:
        """Per-context cross K/V lists -> the static prompt K/V, each prompt padded to `length` keys.
        Copied into the existing buffers when the shapes match; True when they had to be (re)allocated
        (the first prompt, or another shape: a graph holding the old ones must be dropped)."""
        new = batch_cross_kv(list(prompts), length=length)
        if self.cross is not None and _same_shapes(self.cross, new):
            for old_kv, new_kv in zip(self.cross, new):
                for old, value in zip(old_kv, new_kv):
                    if old is not None:
                        old.copy_(value)
            return False
        self.cross = new
        return True

    # ---- per step -----------------------------------------------------------------------------
    def load(self, key: Hashable, latents: torch.Tensor, timesteps: np.ndarray, position: int,
             slot_valid: Optional[np.ndarray]) -> None:
        """Copy one step's inputs into key's static buffers (allocated at the key's first step):
        latents [B, 16, f, H, W] (the core's, any float dtype), timesteps [f], the RoPE position of the
        first active frame, slot_valid bool [slots] (ignored for a window step)."""
        io = self._io.get(key)
        if io is None:
            io = self._io[key] = self._allocate(key, latents.shape)
        cfg, f = self.dit.config, latents.shape[2]
        patch_h, patch_w = cfg.patch_size[1:]
        # RoPE of the active tokens (cached_step.active_rope's tables, from numpy: no torch temporaries)
        cos, sin = rope_tables(cfg.head_dim, np.arange(f) + int(position), latents.shape[3] // patch_h,
                               latents.shape[4] // patch_w, cfg.rope_max_positions)
        host = {"t_emb": timestep_sinusoid(np.asarray(timesteps, np.float32), cfg.freq_dim),  # [f, freq]
                "cos": cos, "sin": sin}
        if io.slot_bias is not None:
            valid = np.asarray(slot_valid, bool).reshape(-1)
            if valid.shape[0] != self.slots:
                raise ValueError(f"slot_valid has {valid.shape[0]} slots, the ring {self.slots}")
            host["slot_bias"] = np.where(valid, np.float32(0.0), np.float32(-np.inf))
        if self._copy_pending:  # the staging still feeds the previous step's copies
            self._copied.synchronize()
        for name, array in host.items():
            io.staging[name].copy_(torch.from_numpy(array))
        io.latents.copy_(latents)
        io.t_emb.copy_(io.staging["t_emb"], non_blocking=self._pinned)  # [f, freq] broadcast over B
        io.cos.copy_(io.staging["cos"], non_blocking=self._pinned)
        io.sin.copy_(io.staging["sin"], non_blocking=self._pinned)
        if io.slot_bias is not None:
            io.slot_bias.copy_(io.staging["slot_bias"], non_blocking=self._pinned)
        if self._pinned:
            self._copied.record()
            self._copy_pending = True

    def compute(self, key: Hashable):
        """The step of `key` on its static buffers: (velocity [B, out, f, H, W] fp32, new_k, new_v
        [layers, B, L, N, Dh] compute dtype, or None, None for a window step). Only device work on
        tensors that do not move: capturable."""
        io = self._io[key]
        bias = self._bias(io)
        return self.step(io.latents, io.t_emb, self.cross, self.ring_k, self.ring_v, None, io.cos, io.sin,
                         fps=self.fps, attention_bias=bias)

    def addresses(self) -> tuple:
        """(name, address, shape) of what compute reads outside its per-key buffers: ring and prompt K/V."""
        out = []
        for name, t in (("cache_k", self.ring_k), ("cache_v", self.ring_v)):
            if t is not None:
                out.append((name, t.data_ptr(), tuple(t.shape)))
        for layer, kv in enumerate(self.cross or ()):
            out.append((f"cross/{layer}", tuple(None if t is None else t.data_ptr() for t in kv)))
        return tuple(out)

    def static_inputs(self, key: Hashable) -> dict[str, torch.Tensor]:
        """Key's static input tensors by name (tests check they never move)."""
        io = self._io[key]
        named = {"latents": io.latents, "t_emb": io.t_emb, "cos": io.cos, "sin": io.sin}
        if io.slot_bias is not None:
            named["slot_bias"] = io.slot_bias
        return named

    # ---- inside -----------------------------------------------------------------------------------
    def _bias(self, io: _StaticIO) -> Optional[torch.Tensor]:
        """The self-attention bias [1, 1, 1 or L, S + L] (or [1, 1, L, L] for a window step, None when
        nothing is masked), built on the device from the static buffers."""
        if io.slot_bias is None:
            return None if io.active_bias is None else io.active_bias[None, None]
        S, L = self.slots * self.tokens_per_slot, io.active_bias.shape[-1]
        key_bias = io.slot_bias[:, None].expand(self.slots, self.tokens_per_slot).reshape(1, S)  # [1, S]
        if io.active_bias.shape[0] == 1:  # FULL: one key row serves every query
            return torch.cat([key_bias, io.active_bias], dim=1)[None, None]  # [1, 1, 1, S + L]
        return torch.cat([key_bias.expand(L, S), io.active_bias], dim=1)[None, None]  # [1, 1, L, S + L]

    def _allocate(self, key: Hashable, latent_shape) -> _StaticIO:
        B, C, f, H, W = (int(d) for d in latent_shape)
        cfg, dev, dtype = self.dit.config, self.device, self.dit.compute_dtype
        _, patch_h, patch_w = cfg.patch_size
        hw = (H // patch_h) * (W // patch_w)
        L = f * hw
        attention = key[1] if isinstance(key, tuple) else FULL
        active_bias = None
        if attention != FULL:
            allowed = block_causal_mask(f, hw, attention, dev)  # [L, L] bool, built once per key
            active_bias = torch.zeros(L, L, dtype=dtype, device=dev).masked_fill(~allowed, float("-inf"))
        elif self.ring_k is not None:
            active_bias = torch.zeros(1, L, dtype=dtype, device=dev)
        half = cfg.head_dim // 2
        pin = dict(pin_memory=True) if self._pinned else {}
        staging = {"t_emb": torch.empty(f, cfg.freq_dim, **pin), "cos": torch.empty(L, half, **pin),
                   "sin": torch.empty(L, half, **pin)}
        slot_bias = None
        if self.ring_k is not None:
            slot_bias = torch.zeros(self.slots, dtype=dtype, device=dev)
            staging["slot_bias"] = torch.empty(self.slots, **pin)
        return _StaticIO(latents=torch.zeros(B, C, f, H, W, dtype=dtype, device=dev),
                         t_emb=torch.zeros(B, f, cfg.freq_dim, device=dev), cos=torch.zeros(L, half, device=dev),
                         sin=torch.zeros(L, half, device=dev), slot_bias=slot_bias, active_bias=active_bias,
                         staging=staging)


def _same_shapes(a: list[CrossKV], b: list[CrossKV]) -> bool:
    """Whether two per-layer CrossKV lists hold tensors of the same shapes and dtypes (None alike)."""
    def sig(kvs):
        return [tuple(None if t is None else (tuple(t.shape), t.dtype) for t in kv) for kv in kvs]
    return sig(a) == sig(b)


class _TorchGraph:
    """A captured torch.cuda.CUDAGraph and the outputs its replays write."""

    def __init__(self, graph, outputs):
        self.graph, self.outputs = graph, outputs

    def replay(self) -> None:
        self.graph.replay()  # on torch's current stream: the rollout core's

    def close(self) -> None:
        self.graph.reset()
        self.outputs = None


class TorchCudaGraphs:
    """runtime/step_graphs.py's GraphMechanism over torch.cuda.CUDAGraph on `device`.

    Warm-ups and captures run on one side stream (cuBLAS keeps its workspaces per stream, so the
    warm-up prepares what the capture uses), ordered after and before torch's current stream. Every
    graph of a stream shares one memory pool: safe because each replay's outputs are consumed (copied
    into the core's buffers) before another graph of the stream is replayed."""

    def __init__(self, device):
        self.device = torch.device(device)
        self.side = torch.cuda.Stream(self.device)
        self.pool = torch.cuda.graph_pool_handle()

    def warmup(self, fn):
        current = torch.cuda.current_stream(self.device)
        self.side.wait_stream(current)
        with torch.cuda.stream(self.side):
            outputs = fn()
        current.wait_stream(self.side)
        return outputs

    def capture(self, fn) -> _TorchGraph:
        graph = torch.cuda.CUDAGraph()
        current = torch.cuda.current_stream(self.device)
        self.side.wait_stream(current)
        with torch.cuda.graph(graph, pool=self.pool, stream=self.side):
            outputs = fn()
        current.wait_stream(self.side)
        return _TorchGraph(graph, outputs)


__all__ = ["FULL", "StaticKVStep", "TorchCudaGraphs", "attention_key"]
