"""The small interface between the rollout driver and whatever runs the networks.

All arrays crossing it are numpy float32 with channels first: latents [16, F, h, w] (one video,
no batch axis), pixels [3, T, H, W] in [-1, 1]. Text contexts are opaque handles so a backend can
keep them on its device.
"""
from __future__ import annotations

import abc
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
    layout: str  # "official" or "diffusers"
    dit_config: dict[str, Any] = field(default_factory=dict)

    @property
    def text_len(self) -> int:
        return int(self.dit_config.get("text_len", 512))

    @property
    def inject_sample_info(self) -> bool:
        return bool(self.dit_config.get("inject_sample_info", False))

    @property
    def num_frame_per_block(self) -> int:
        return int(self.dit_config.get("num_frame_per_block", 1))


@dataclass
class TextContext:
    """Encoded prompt(s): `value` is backend-native ([1, text_len, text_dim], zero-padded)."""

    prompt: str
    value: Any


class StreamingDecoder(abc.ABC):
    """Decodes raw latents one frame at a time with the VAE's causal caches (== whole decode)."""

    @abc.abstractmethod
    def reset(self) -> None: ...

    @abc.abstractmethod
    def decode_next(self, mu_frame: np.ndarray) -> np.ndarray:
        """Raw latent frame [16, 1, h, w] -> pixels [3, n, H, W] (n = 1 for the first frame, else 4)."""


class Backend(abc.ABC):
    """Runs the networks. Implementations: torch (reference); onnxruntime and TensorRT later."""

    name: str = "abstract"

    def __init__(self, model: ModelSpec):
        self.model = model

    @abc.abstractmethod
    def encode_text(self, prompt: str) -> TextContext:
        """umT5-encode one prompt, zero-padded to the model's text_len."""

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
