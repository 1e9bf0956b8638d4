"""The small interface between the rollout driver and whatever runs the networks.

All arrays crossing it are numpy float32 with channels first: latents [16, F, h, w] (one video,
no batch axis), pixels [3, T, H, W] in [-1, 1]. Text contexts are opaque handles so a backend can
keep them on its device.

Every rollout mode keeps its state in skyrt._core.RolloutCore, on one device; a backend joins it
through a `KVStreamSession` (open_kv_stream): it computes the prompt K/V once per prompt and runs the
DiT step on the core's buffers, reading latents_in and the ring K/V, writing velocity and new K/V,
allocating nothing per step. That session's `step` is a backend's one DiT entry: kvcache mode and the
causal-family presets (runtime/kvcache.py) step against the ring, window mode (runtime/pipeline.py)
is a step with no cached context (spec.slots == 0) over every frame of the window.
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
    # among them (window mode of a bidirectional checkpoint, slots == 0).
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
    def vae_encode(self, pixels: np.ndarray) -> np.ndarray:
        """Pixels [3, T, H, W] in [-1, 1] (T = 1 + 4k) -> raw VAE mean [16, F, h, w]."""

    @abc.abstractmethod
    def vae_decode(self, mu: np.ndarray) -> np.ndarray:
        """Raw latents [16, F, h, w] -> pixels [3, 1 + 4(F - 1), H, W] clamped to [-1, 1]."""

    @abc.abstractmethod
    def streaming_decoder(self) -> StreamingDecoder:
        """A fresh streaming VAE decoder."""

    # -- the DiT: one stream session, every mode ------------------------------------------------------
    def kv_layout(self) -> tuple[int, int, int]:
        """(layers, heads, head_dim) of the DiT's self-attention."""
        raise NotImplementedError(f"the {self.name} backend has no DiT stream session")

    @abc.abstractmethod
    def open_kv_stream(self, spec: KVStreamSpec) -> KVStreamSession:
        """This backend's side of one stream, its one DiT entry: the step on the rollout core's buffers.
        spec.slots > 0: a KV-cached stream (runtime/kvcache.py) stepping against the ring; spec.slots
        == 0: one window of window mode (runtime/pipeline.py), every frame of the window at its own
        timestep, no cached context, attention as spec.block_causal says."""
