"""FROZEN REFERENCE: the per-call DiT entries the backends offered before a stream session's `step` became
their one DiT entry (issue 33), kept as test oracles and for benchmarks/backends.py. Not used by the
runtime.

- `predict_velocity(backend, latents, timesteps, context, fps_class, causal_block_size)`: one prompt
  context's window forward, host arrays in and out: the torch backend's WanDiT.forward (the module
  tests/test_dit.py checks against diffusers and the official code), or an exported-graph backend's
  dit_window / dit_window_causal graph run on host arrays.
- `kv_prompt`, `kv_step`, `kv_step_many`, `new_kv_cache` and `HostKVCache`: the per-call KV-cached step on
  one host cache per prompt context (the torch backend's CachedStep; onnxruntime's dit_step on host arrays).
- `VelocityWindowSession`: a window-mode stream session over any velocity function of predict_velocity's
  signature (what window mode ran on the exported-graph backends before their window graphs became the
  step with no cache; tests/test_window_core.py runs an analytic velocity through it).

Shapes: latents [16, F, h, w] (one video, no batch axis), timesteps [F] float32, caches k, v [layers,
slots, tokens_per_block, heads, head_dim] float32 (skyrt._core.KVRing's slot layout).
"""
from __future__ import annotations

from typing import Any, Callable

import numpy as np

from skyrt import _core
from skyrt.runtime.backends.base import KVStepCall, KVStreamSession, KVStreamSpec, TextContext
from skyrt.runtime.latents import PATCH_SPATIAL as PATCH, SPATIAL_FACTOR as SPATIAL
from skyrt.runtime.rope import rope_cos_sin, timestep_sinusoid


class HostKVCache:
    """One prompt context's ring K/V buffers in host memory, laid out for skyrt._core.KVRing slots:
    k, v [layers, slots, tokens_per_block, heads, head_dim] float32, allocated once."""

    def __init__(self, layers: int, slots: int, tokens_per_block: int, heads: int, head_dim: int):
        shape = (layers, slots, tokens_per_block, heads, head_dim)
        # Zeros, not garbage: masked slots must hold finite values (NaN would poison the softmax).
        self.k = np.zeros(shape, np.float32)
        self.v = np.zeros(shape, np.float32)

    def write(self, slot: int, k: np.ndarray, v: np.ndarray) -> None:
        """k, v [layers, tokens_per_block, heads, head_dim] (what kv_step returned) -> slot."""
        _core.kv_write_block(self.k, slot, np.ascontiguousarray(k, np.float32))
        _core.kv_write_block(self.v, slot, np.ascontiguousarray(v, np.float32))

    def rebase(self, shift: int) -> None:
        """Rotate every cached key by -shift positions (temporal RoPE part only)."""
        _core.kv_rope_rebase(self.k, shift)


def new_kv_cache(backend, layers: int, slots: int, tokens_per_block: int, heads: int, head_dim: int) -> HostKVCache:
    """A ring cache for one prompt context, in host memory."""
    return HostKVCache(layers, slots, tokens_per_block, heads, head_dim)


def _is_torch(backend) -> bool:
    return backend.name == "torch"


def _fps_feed(backend, fps_class: int | None) -> dict:
    if not backend.model.inject_sample_info:
        return {}
    if fps_class not in (0, 1):
        raise ValueError(f"this checkpoint uses the fps embedding: fps_class must be 0 (16 fps) or 1, got {fps_class}")
    return {"fps": np.array([fps_class], dtype=np.int64)}


# ------------------------------------------------------------------------------------------ window forward
def predict_velocity(backend, latents: np.ndarray, timesteps: np.ndarray, context: TextContext,
                     fps_class: int | None, causal_block_size: int | None) -> np.ndarray:
    """DiT forward: latents [16, F, h, w], per-frame timesteps [F] -> flow velocity [16, F, h, w].
    causal_block_size None means full attention inside the window (the official default)."""
    if _is_torch(backend):
        return _torch_predict_velocity(backend, latents, timesteps, context, fps_class, causal_block_size)
    return _graph_predict_velocity(backend, latents, timesteps, context, fps_class, causal_block_size)


def _torch_predict_velocity(backend, latents, timesteps, context, fps_class, causal_block_size):
    import torch

    with torch.inference_mode():
        x = torch.from_numpy(np.ascontiguousarray(latents))[None].to(backend.device, backend.dtype)  # [1, 16, F, h, w]
        t = torch.from_numpy(np.asarray(timesteps, dtype=np.float32))[None].to(backend.device)  # [1, F]
        fps = None if fps_class is None else torch.tensor([fps_class], device=backend.device)
        v = backend.dit(x, t, context.value, fps=fps, causal_block_size=causal_block_size)
        return v[0].float().cpu().numpy()


def _graph_predict_velocity(backend, latents, timesteps, context, fps_class, causal_block_size):
    _, frames, h, w = latents.shape
    size = dict(height=h * SPATIAL, width=w * SPATIAL)
    if causal_block_size is None:
        graph = backend._graph("dit_window", **size)
    else:
        if frames % causal_block_size:
            raise ValueError(f"{frames} latent frames are not whole causal blocks of {causal_block_size}")
        graph = backend._graph("dit_window_causal", **size, block_frames=causal_block_size)
    cross_k, cross_v = _graph_cross_kv(backend, context)
    cos, sin = rope_cos_sin(backend.head_dim, 0, frames, h // PATCH, w // PATCH, backend.rope_max_positions)
    feeds = {"latents": np.ascontiguousarray(latents, dtype=np.float32)[None],
             "t_emb": timestep_sinusoid(np.asarray(timesteps, np.float32)[None], backend.freq_dim),
             "cross_k": cross_k, "cross_v": cross_v, "rope_cos": cos, "rope_sin": sin,
             **_fps_feed(backend, fps_class)}
    (velocity,) = backend._run(graph, feeds)
    return velocity[0]


def _graph_cross_kv(backend, context: TextContext):
    """cross_k, cross_v [layers, 1, Lt, N, Dh] of one context through the cross_kv graph (host arrays)."""
    graph = backend._graph("cross_kv")
    return backend._run(graph, {"context": np.ascontiguousarray(context.value, dtype=np.float32)})


# ------------------------------------------------------------------------------------------ per-call KV step
def kv_prompt(backend, context: TextContext) -> Any:
    """Per-layer cross-attention K/V of one prompt context, computed once per prompt (opaque)."""
    if _is_torch(backend):
        import torch

        with torch.inference_mode():
            return backend.dit.cross_attention_kv(context.value, collapse_padding=True)
    return _graph_cross_kv(backend, context)


def kv_step(backend, latents: np.ndarray, timesteps: np.ndarray, prompt: Any, cache: HostKVCache,
            slot_valid: np.ndarray, first_position: int, fps_class: int | None,
            causal_block_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Active latents [16, f, h, w] at per-frame timesteps [f] against `cache` (slots where slot_valid
    [slots] is True) at RoPE positions first_position.. -> (velocity [16, f, h, w], new_k, new_v [layers,
    tokens, heads, head_dim] float32: the active tokens' K/V, what cache.write takes)."""
    if _is_torch(backend):
        return kv_step_many(backend, latents, timesteps, [prompt], [cache], slot_valid, first_position, fps_class,
                            causal_block_size)[0]
    return _graph_kv_step(backend, latents, timesteps, prompt, cache, slot_valid, first_position, fps_class,
                          causal_block_size)


def kv_step_many(backend, latents, timesteps, prompts: list, caches: list, slot_valid, first_position: int,
                 fps_class: int | None, causal_block_size: int) -> list:
    """kv_step of the same latents under several prompts, each against its own cache (sharing slot_valid):
    classifier-free guidance's cond and uncond. The torch backend runs them as one batch (shorter prompts
    padded under a -inf bias); an exported-graph backend, one kv_step each."""
    if not _is_torch(backend):
        return [kv_step(backend, latents, timesteps, p, c, slot_valid, first_position, fps_class, causal_block_size)
                for p, c in zip(prompts, caches)]
    import torch

    from skyrt.export.cached_step import CachedStep, active_rope
    from skyrt.export.dit import batch_cross_kv
    from skyrt.export.torch_backend import valid_slots

    with torch.inference_mode():
        step = CachedStep(backend.dit)
        batch = len(prompts)
        layers, slots, tokens, heads, head_dim = caches[0].k.shape
        x = torch.from_numpy(np.ascontiguousarray(latents))[None].to(backend.device, backend.dtype)  # [1, 16, f, h, w]
        x = x.expand(batch, *x.shape[1:])  # [B, 16, f, h, w]
        t = torch.from_numpy(np.asarray(timesteps, np.float32))[None].to(backend.device).expand(batch, -1)  # [B, f]
        patch_h, patch_w = backend.dit.config.patch_size[1:]
        cos, sin = active_rope(backend.dit, first_position, x.shape[2], x.shape[3] // patch_h, x.shape[4] // patch_w)
        valid = np.asarray(slot_valid, bool)
        ck, cv = ([valid_slots(torch.from_numpy(getattr(c, name)), valid, 1).reshape(layers, 1, -1, heads, head_dim)
                   for c in caches] for name in ("k", "v"))
        ck = (ck[0] if batch == 1 else torch.cat(ck, dim=1)).to(backend.device)  # [layers, B, S_valid, N, Dh]
        cv = (cv[0] if batch == 1 else torch.cat(cv, dim=1)).to(backend.device)
        fps = None if fps_class is None else torch.full((batch,), fps_class, device=backend.device)
        cross = prompts[0] if batch == 1 else batch_cross_kv(prompts)
        v, new_k, new_v = step(x, t, cross, ck, cv, None, cos.to(backend.device), sin.to(backend.device), fps=fps,
                               causal_block_size=causal_block_size)
        v, new_k, new_v = v.float().cpu().numpy(), new_k.float().cpu().numpy(), new_v.float().cpu().numpy()
        return [(v[b], new_k[:, b], new_v[:, b]) for b in range(batch)]


def _graph_kv_step(backend, latents, timesteps, prompt, cache, slot_valid, first_position, fps_class,
                   causal_block_size):
    """dit_step on host arrays: the cache converted to the graph's dtype per call."""
    _, frames, h, w = latents.shape
    layers, slots, tokens, heads, head_dim = cache.k.shape
    if frames % causal_block_size:
        raise ValueError(f"{frames} active latent frames are not whole blocks of {causal_block_size}")
    graph = backend._graph("dit_step", height=h * SPATIAL, width=w * SPATIAL, block_frames=causal_block_size,
                           cache_blocks=slots)
    cache_dtype = graph.input_dtype("cache_k")
    shape = (layers, 1, slots * tokens, heads, head_dim)
    cos, sin = rope_cos_sin(backend.head_dim, int(first_position), frames, h // PATCH, w // PATCH,
                            backend.rope_max_positions)
    cross_k, cross_v = prompt
    feeds = {"latents": np.ascontiguousarray(latents, dtype=np.float32)[None],
             "t_emb": timestep_sinusoid(np.asarray(timesteps, np.float32)[None], backend.freq_dim),
             "cross_k": cross_k, "cross_v": cross_v,
             "cache_k": np.asarray(cache.k.reshape(shape), dtype=cache_dtype),
             "cache_v": np.asarray(cache.v.reshape(shape), dtype=cache_dtype),
             "slot_valid": np.asarray(slot_valid, dtype=bool).reshape(1, slots),
             "rope_cos": cos, "rope_sin": sin, **_fps_feed(backend, fps_class)}
    velocity, new_k, new_v = backend._run(graph, feeds)
    return velocity[0], np.asarray(new_k[:, 0], dtype=np.float32), np.asarray(new_v[:, 0], dtype=np.float32)


# ------------------------------------------------------------------------------------------ window session
Velocity = Callable[..., np.ndarray]  # predict_velocity's signature without the backend


class VelocityWindowSession(KVStreamSession):
    """A window-mode session on host memory over `velocity(latents, timesteps, context, fps_class,
    causal_block_size)` (default: this module's predict_velocity on `backend`): reads latents_in, runs
    one velocity call per prompt context with the window's attention (spec.block_causal), writes velocity."""

    def __init__(self, backend, spec: KVStreamSpec, velocity: Velocity | None = None):
        super().__init__(spec)
        self.backend = backend
        self.velocity = velocity or (lambda *args: predict_velocity(backend, *args))
        self.contexts: list[TextContext] = []

    def set_prompts(self, contexts: list[TextContext]) -> None:
        self.contexts = list(contexts)

    def step(self, call: KVStepCall) -> None:
        f = call.frames
        x = self.core.buffer("latents_in", f).numpy()[0]  # [16, f, h, w]: every context sees the same latents
        velocity = self.core.buffer("velocity", f).numpy()  # [B, 16, f, h, w]
        block = self.spec.causal_block_size if self.spec.block_causal else None
        for b, context in enumerate(self.contexts):
            velocity[b] = self.velocity(x, call.timesteps, context, self.spec.fps_class, block)
