"""The small interface between the rollout driver and whatever runs the networks.

All arrays crossing it are numpy float32 with channels first: latents [16, F, h, w] (one video,
no batch axis), pixels [3, T, H, W] in [-1, 1]. Text contexts are opaque handles so a backend can
keep them on its device.

The KV-cached rollout (runtime/kvcache.py) keeps a stream's state in skyrt._core.RolloutCore, on
one device; a backend joins it through a `KVStreamSession` (open_kv_stream): it computes the prompt
K/V once per prompt and runs the DiT step on the core's buffers, reading latents_in and the ring
K/V, writing velocity and new K/V, allocating nothing per step. That session's `step` is the one DiT
entry of every KV-cached stream, the causal-family presets' included. The older per-call methods
(kv_prompt, kv_step / kv_step_many on a HostKVCache) remain only for the frozen test oracles
(tests/kvcache_numpy_reference.py, tests/causal_rollout_reference.py) and benchmarks/backends.py.
"""
from __future__ import annotations

import abc
import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np


@dataclass(frozen=True)
class ModelSpec:
    """What the runtime needs to know about a model folder, without loading any weights.

    `dit_config` uses the official config.json field names (dim, num_heads, text_len, ...).
    """

    path: Path
    layout: str  # "official", "diffusers", or "causal" (a causal-family preset's folder)
    dit_config: dict[str, Any] = field(default_factory=dict)
    family: Any = None  # layout "causal": the files a preset loads (runtime.causal_family.CausalFiles)

    @property
    def text_len(self) -> int:
        return int(self.dit_config.get("text_len", 512))

    @property
    def inject_sample_info(self) -> bool:
        return bool(self.dit_config.get("inject_sample_info", False))

    @property
    def num_frame_per_block(self) -> int:
        return int(self.dit_config.get("num_frame_per_block", 1))


_context_serials = itertools.count(1)


@dataclass
class TextContext:
    """Encoded prompt(s): `value` is backend-native ([1, text_len, text_dim], zero-padded).

    `serial` is unique per context in this process: what a backend keys what it derives from a
    context on (cross-attention K/V, a device slot), instead of storing it on the context."""

    prompt: str
    value: Any
    serial: int = field(default_factory=lambda: next(_context_serials), compare=False, repr=False)


class StreamingDecoder(abc.ABC):
    """Decodes raw latents one frame at a time with the VAE's causal caches (== whole decode)."""

    @abc.abstractmethod
    def reset(self) -> None: ...

    @abc.abstractmethod
    def decode_next(self, mu_frame: np.ndarray) -> np.ndarray:
        """Raw latent frame [16, 1, h, w] -> pixels [3, n, H, W] (n = 1 for the first frame, else 4)."""

    def close(self) -> None:
        """Release what the decoder holds on its device now (a decoder used again re-acquires it)."""

    # -- snapshot and resume (runtime/snapshot.py): the causal caches as host arrays, and back --
    def export_state(self) -> dict[str, np.ndarray]:
        """The decoder's caches now as {name: host array} ({} before the first frame)."""
        raise NotImplementedError(f"{type(self).__name__} cannot save its caches: this backend's stream "
                                  "cannot be snapshotted")

    def import_state(self, arrays: dict[str, np.ndarray]) -> None:
        """Continue from `export_state`'s arrays ({}: from the first frame). Arrays of other names or
        shapes are a ValueError."""
        raise NotImplementedError(f"{type(self).__name__} cannot restore its caches")


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
        from skyrt import _core

        _core.kv_write_block(self.k, slot, np.ascontiguousarray(k, np.float32))
        _core.kv_write_block(self.v, slot, np.ascontiguousarray(v, np.float32))

    def rebase(self, shift: int) -> None:
        """Rotate every cached key by -shift positions (temporal RoPE part only)."""
        from skyrt import _core

        _core.kv_rope_rebase(self.k, shift)


@dataclass(frozen=True)
class KVStreamSpec:
    """The shape of one stream's KV-cached DiT step, fixed when the stream starts."""

    contexts: int  # prompt contexts per step: 1, or 2 with classifier-free guidance (cond, uncond)
    causal_block_size: int  # latent frames per block (a ring slot; the block-causal attention mask)
    max_frames: int  # most latent frames one step sees (blocks in flight, or a recache chunk, in frames)
    slots: int  # ring KV cache slots (sink + window blocks)
    latent_size: tuple[int, int]  # (h, w)
    layers: int
    heads: int
    head_dim: int
    fps_class: int | None  # the fps embedding's class, None when the model has none
    # True: the step's frames attend block-causally in blocks of causal_block_size; False: full attention
    # among them (window mode of a bidirectional checkpoint: a window session, `open_window_stream`).
    block_causal: bool = True


@dataclass
class KVStepCall:
    """One DiT step on the core's buffers: `frames` latent frames at per-frame `timesteps` [frames]
    float32 from RoPE position `position`, against the ring slots where `slot_valid` [slots] is True.
    want_velocity / want_kv: which outputs the caller reads (a commit reads only the K/V).
    causal_block_size: the attention blocks among the step's frames, None = the stream's; LongLive's
    recache passes `frames` (full attention over its chunk)."""

    frames: int
    timesteps: np.ndarray
    position: int
    slot_valid: np.ndarray
    want_velocity: bool = True
    want_kv: bool = False
    causal_block_size: int | None = None


class KVStreamSession(abc.ABC):
    """A backend's side of one KV-cached stream: set up once (I/O buffers, prompt K/V slots, graphs),
    then `step` per schedule row on the rollout core's buffers; `close` releases it all.

    The core's buffers (core.buffer(name, frames)): latents_in [B, 16, F, h, w] float32 (the same
    latents for every context), velocity [B, 16, F, h, w] float32, new_k / new_v [layers, B,
    F * tokens_per_frame, heads, head_dim] and cache_k / cache_v [layers, B, slots * tokens_per_block,
    heads, head_dim] in `kv_dtype`. B = spec.contexts, prompt context b is batch row b.
    """

    device: str = "cpu"  # where the core must keep the stream ("cpu", "cuda:N")
    stream: int = 0  # the CUDA stream the core's kernels and this session's work share
    kv_dtype: str = "float32"  # the ring's dtype: what the step graph reads

    def __init__(self, spec: KVStreamSpec):
        self.spec = spec
        self.core = None

    def bind(self, core) -> None:
        """The rollout core whose buffers every step reads and writes (before the first prompt)."""
        self.core = core

    @abc.abstractmethod
    def set_prompts(self, contexts: list[TextContext]) -> None:
        """Prompt K/V of each context (cond, then uncond), computed once per prompt switch."""

    @abc.abstractmethod
    def step(self, call: KVStepCall) -> None:
        """velocity[:, :, :F] (and new_k / new_v) <- DiT(latents_in[:, :, :F], ...)."""

    def close(self) -> None:
        """Release what the session holds (idempotent)."""
        self.core = None


class VelocityWindowSession(KVStreamSession):
    """A window-mode session (`Backend.open_window_stream`) over the backend's predict_velocity, on host
    memory: reads latents_in, runs one predict_velocity per prompt context with the window's attention
    (spec.block_causal), writes velocity. The default for backends whose DiT step cannot run a window:
    the exported graphs' dit_step bakes in block-causal attention and a fixed ring capacity."""

    def __init__(self, backend: "Backend", spec: KVStreamSpec):
        super().__init__(spec)
        self.backend = backend
        self.contexts: list[TextContext] = []

    def set_prompts(self, contexts: list[TextContext]) -> None:
        self.contexts = list(contexts)

    def step(self, call: KVStepCall) -> None:
        f = call.frames
        x = self.core.buffer("latents_in", f).numpy()[0]  # [16, f, h, w]: every context sees the same latents
        velocity = self.core.buffer("velocity", f).numpy()  # [B, 16, f, h, w]
        block = self.spec.causal_block_size if self.spec.block_causal else None
        for b, context in enumerate(self.contexts):
            velocity[b] = self.backend.predict_velocity(x, call.timesteps, context, self.spec.fps_class, block)


class Backend(abc.ABC):
    """Runs the networks. Implementations: torch (export/torch_backend.py, the reference),
    onnxruntime and TensorRT (runtime/backends/)."""

    name: str = "abstract"
    # An on-disk text-embedding cache (runtime/text_cache.py CachedTextEncoder) that encode_text reads
    # through; set by enable_text_cache, None: every prompt runs the text encoder.
    text_cache: Any = None

    def __init__(self, model: ModelSpec):
        self.model = model

    def encode_text(self, prompt: str) -> TextContext:
        """One prompt's context, zero-padded to the model's text_len: from the text cache when one is
        set (a miss runs the encoder and stores the result), else run_text_encoder."""
        if self.text_cache is not None:
            return self.text_cache.encode_text(prompt)
        return self.run_text_encoder(prompt)

    @abc.abstractmethod
    def run_text_encoder(self, prompt: str) -> TextContext:
        """umT5-encode one prompt, zero-padded to the model's text_len (no cache)."""

    # -- what the text cache needs: an identity for the encoder, contexts to and from numpy ------
    @abc.abstractmethod
    def text_encoder_hash(self) -> str:
        """sha256 hex identifying this backend's text encoder: equal hashes mean equal contexts for
        every prompt (the text cache's key). It covers the encoder's weights and tokenizer and what
        changes the last bits of a context (backend, dtype)."""

    def context_to_array(self, value: Any) -> np.ndarray:
        """A context's value as float32 numpy [1, text_len, text_dim] (what the text cache stores)."""
        return np.asarray(value, dtype=np.float32)

    def context_from_array(self, array: np.ndarray) -> Any:
        """A context value of this backend from float32 numpy [1, text_len, text_dim] (a text cache
        hit): the inverse of context_to_array."""
        return array

    @abc.abstractmethod
    def predict_velocity(
        self,
        latents: np.ndarray,
        timesteps: np.ndarray,
        context: TextContext,
        fps_class: int | None,
        causal_block_size: int | None,
    ) -> np.ndarray:
        """DiT forward: latents [16, F, h, w], per-frame timesteps [F] -> flow velocity [16, F, h, w].

        causal_block_size None means full attention inside the window (the official default).
        """

    @abc.abstractmethod
    def vae_encode(self, pixels: np.ndarray) -> np.ndarray:
        """Pixels [3, T, H, W] in [-1, 1] (T = 1 + 4k) -> raw VAE mean [16, F, h, w]."""

    @abc.abstractmethod
    def vae_decode(self, mu: np.ndarray) -> np.ndarray:
        """Raw latents [16, F, h, w] -> pixels [3, 1 + 4(F - 1), H, W] clamped to [-1, 1]."""

    @abc.abstractmethod
    def streaming_decoder(self) -> StreamingDecoder:
        """A fresh streaming VAE decoder."""

    # -- the KV-cached stream (mode="kvcache", causal presets); backends without it cannot run them --
    def kv_layout(self) -> tuple[int, int, int]:
        """(layers, heads, head_dim) of the DiT's self-attention."""
        raise NotImplementedError(f"the {self.name} backend has no KV-cached step; use mode='window'")

    # the per-call KV-cached step: for the frozen test oracles and benchmarks/backends.py only
    def kv_prompt(self, context: TextContext) -> Any:
        """Per-layer cross-attention K/V of one prompt context, computed once per prompt (opaque)."""
        raise NotImplementedError(f"the {self.name} backend has no KV-cached step; use mode='window'")

    def kv_step(self, latents: np.ndarray, timesteps: np.ndarray, prompt: Any, cache: Any, slot_valid: np.ndarray,
                first_position: int, fps_class: int | None, causal_block_size: int) -> tuple[np.ndarray, Any, Any]:
        """Active latents [16, f, h, w] at per-frame timesteps [f] against `cache` (slots where
        slot_valid [slots] is True) at RoPE positions first_position.. -> (velocity [16, f, h, w],
        new_k, new_v): the active tokens' K/V in whatever form this backend's cache.write takes."""
        raise NotImplementedError(f"the {self.name} backend has no KV-cached step; use mode='window'")

    def kv_step_many(self, latents: np.ndarray, timesteps: np.ndarray, prompts: list, caches: list,
                     slot_valid: np.ndarray, first_position: int, fps_class: int | None,
                     causal_block_size: int) -> list[tuple[np.ndarray, Any, Any]]:
        """kv_step of the same latents under several prompts, each against its own cache (sharing
        slot_valid): classifier-free guidance's cond and uncond. One kv_step each here; a backend
        that can run them as one batch overrides this."""
        return [self.kv_step(latents, timesteps, prompt, cache, slot_valid, first_position, fps_class,
                             causal_block_size)
                for prompt, cache in zip(prompts, caches)]

    def new_kv_cache(self, layers: int, slots: int, tokens_per_block: int, heads: int, head_dim: int):
        """A ring cache for one prompt context; host memory unless the backend keeps it on its device."""
        return HostKVCache(layers, slots, tokens_per_block, heads, head_dim)

    def open_window_stream(self, spec: KVStreamSpec) -> KVStreamSession:
        """This backend's side of one window of window mode (runtime/pipeline.py): a step on the core's
        buffers with no cached context (spec.slots == 0), every frame of the window at its own timestep,
        attention as spec.block_causal says. Here: predict_velocity behind VelocityWindowSession; a
        backend whose stream session can run it overrides this."""
        return VelocityWindowSession(self, spec)

    def open_kv_stream(self, spec: KVStreamSpec) -> KVStreamSession:
        """This backend's side of one KV-cached stream (runtime/kvcache.py): the DiT step on the rollout
        core's buffers. A backend with a KV-cached step implements it."""
        raise NotImplementedError(f"the {self.name} backend has no KV-cached stream; use mode='window'")
