"""The torch reference backend: skyrt.export's modules, fp32 on the CPU by default.

This is the oracle-checked path (tests compare it with diffusers); engines are checked against it.
"""
from __future__ import annotations

import numpy as np
import torch

from .base import Backend, ModelSpec, StreamingDecoder, TextContext


class TorchStreamingDecoder(StreamingDecoder):
    """Wraps skyrt.export.vae.StreamingDecoder for numpy in/out."""

    def __init__(self, vae, device: torch.device):
        from skyrt.export.vae import StreamingDecoder as _Decoder

        self._decoder = _Decoder(vae)
        self._device = device

    def reset(self) -> None:
        self._decoder.reset()

    @torch.inference_mode()
    def decode_next(self, mu_frame: np.ndarray) -> np.ndarray:
        z = torch.from_numpy(np.ascontiguousarray(mu_frame))[None].to(self._device)  # [1, 16, 1, h, w]
        return self._decoder.decode_next(z)[0].float().cpu().numpy()


class TorchBackend(Backend):
    """Runs the DiT, VAE and umT5 reference modules with torch."""

    name = "torch"

    def __init__(self, model: ModelSpec, device: str = "cpu", dtype: torch.dtype = torch.float32):
        super().__init__(model)
        from skyrt.export.loaders import load_components

        self.device = torch.device(device)
        self.dtype = dtype
        self.dit, self.vae, self.text_encoder = load_components(model, dtype=dtype, device=self.device)

    @torch.inference_mode()
    def encode_text(self, prompt: str) -> TextContext:
        context = self.text_encoder.encode([prompt]).to(self.device, self.dtype)  # [1, text_len, text_dim]
        return TextContext(prompt=prompt, value=context)

    @torch.inference_mode()
    def predict_velocity(self, latents, timesteps, context, fps_class, causal_block_size):
        x = torch.from_numpy(np.ascontiguousarray(latents))[None].to(self.device, self.dtype)  # [1, 16, F, h, w]
        t = torch.from_numpy(np.asarray(timesteps, dtype=np.float32))[None].to(self.device)  # [1, F]
        fps = None if fps_class is None else torch.tensor([fps_class], device=self.device)
        v = self.dit(x, t, context.value, fps=fps, causal_block_size=causal_block_size)
        return v[0].float().cpu().numpy()

    @torch.inference_mode()
    def vae_encode(self, pixels: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(np.ascontiguousarray(pixels))[None].to(self.device)  # [1, 3, T, H, W]
        return self.vae.encode(x)[0].float().cpu().numpy()

    @torch.inference_mode()
    def vae_decode(self, mu: np.ndarray) -> np.ndarray:
        z = torch.from_numpy(np.ascontiguousarray(mu))[None].to(self.device)  # [1, 16, F, h, w]
        return self.vae.decode(z)[0].float().cpu().numpy()

    def streaming_decoder(self) -> StreamingDecoder:
        return TorchStreamingDecoder(self.vae, self.device)

    # ---- KV-cached step (mode="kvcache") --------------------------------------------------------
    def kv_layout(self) -> tuple[int, int, int]:
        cfg = self.dit.config
        return cfg.num_layers, cfg.num_heads, cfg.head_dim

    @torch.inference_mode()
    def kv_prompt(self, context: TextContext):
        """Per-layer cross-attention K/V of a prompt, computed once."""
        return self.dit.cross_attention_kv(context.value, collapse_padding=True)

    @torch.inference_mode()
    def kv_step(self, latents, timesteps, prompt, cache, slot_valid, first_position, fps_class, block_size):
        """CachedStep on numpy buffers (zero-copy on the CPU): returns velocity [16, f, h, w] and the
        active tokens' K, V [layers, tokens, heads, head_dim]."""
        from skyrt.export.cached_step import CachedStep, active_rope

        if getattr(self, "_cached_step", None) is None:
            self._cached_step = CachedStep(self.dit)
        layers, slots, tokens, heads, head_dim = cache.k.shape
        x = torch.from_numpy(np.ascontiguousarray(latents))[None].to(self.device, self.dtype)  # [1, 16, f, h, w]
        t = torch.from_numpy(np.asarray(timesteps, np.float32))[None].to(self.device)  # [1, f]
        patch_h, patch_w = self.dit.config.patch_size[1:]
        cos, sin = active_rope(self.dit, first_position, x.shape[2], x.shape[3] // patch_h, x.shape[4] // patch_w)
        # Eager torch can skip what an engine must mask: attend only to the valid slots (a view when
        # they lead the ring, a gather otherwise), so a filling cache costs what it holds.
        ck, cv = (self._valid_slots(torch.from_numpy(c), np.asarray(slot_valid, bool)) for c in (cache.k, cache.v))
        ck = ck.to(self.device).reshape(layers, 1, -1, heads, head_dim)  # [layers, 1, S_valid, N, Dh]
        cv = cv.to(self.device).reshape(layers, 1, -1, heads, head_dim)
        fps = None if fps_class is None else torch.tensor([fps_class], device=self.device)
        v, new_k, new_v = self._cached_step(x, t, prompt, ck, cv, None, cos.to(self.device), sin.to(self.device),
                                            fps=fps, causal_block_size=block_size)
        return v[0].float().cpu().numpy(), new_k[:, 0].float().cpu().numpy(), new_v[:, 0].float().cpu().numpy()

    @staticmethod
    def _valid_slots(cache: torch.Tensor, slot_valid: np.ndarray) -> torch.Tensor:
        """cache [layers, slots, tokens, N, Dh] -> only the valid slots [layers, n_valid, tokens, N, Dh]."""
        index = np.flatnonzero(slot_valid)
        if len(index) == len(slot_valid):
            return cache
        if len(index) == 0 or index[-1] == len(index) - 1:
            return cache[:, : len(index)]
        return cache.index_select(1, torch.from_numpy(index))
