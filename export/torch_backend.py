"""The torch reference backend: skyrt.export's modules, fp32 on the CPU by default.

It lives with the torch code; the runtime reaches it by name (runtime/registry.py, "backend:torch"),
so `skyrt.load(..., backend="torch")` works while skyrt.runtime never imports torch.

This is the oracle-checked path (tests compare it with diffusers); engines are checked against it.

The DiT's one entry, a stream session's step in every mode (TorchKVStreamSession: against the ring, or
with no cache for a window of window mode), runs on the rollout core's own buffers, seen as torch
tensors without a copy (numpy views on the CPU, __cuda_array_interface__ on a GPU): latents in, the
ring K/V read in place, velocity and new K/V written in place, on the core's CUDA stream (torch's
current stream). With a CUDA device nothing of the stream's state crosses to the host.
"""
from __future__ import annotations

import hashlib

import numpy as np
import torch

from skyrt.runtime.artifact_cache import tree_sha256
from skyrt.runtime.model_folder import text_encoder_files

from skyrt.runtime.backends.base import (Backend, KVStepCall, KVStreamSession, KVStreamSpec, ModelSpec,
                                         StreamingDecoder, TextContext)


def _export_tensors(tensors) -> dict[str, np.ndarray]:
    """A decoder's list of cache tensors (None before the first frame) as {"cache/i": host array}."""
    if tensors is None:
        return {}
    return {f"cache/{i:03d}": t.detach().float().cpu().numpy() for i, t in enumerate(tensors)}


def _latent_size(arrays: dict[str, np.ndarray]) -> tuple[int, int]:
    """(h, w) of the latent frames a saved decoder decoded: its smallest caches are at latent size."""
    return min(tuple(int(d) for d in a.shape[-2:]) for a in arrays.values())


def _import_tensors(arrays: dict[str, np.ndarray], like: list | None, device) -> list | None:
    """{"cache/i": array} back as tensors on `device`; `like`: the zero caches of this decoder, whose
    names, shapes and dtypes the arrays must have. {} -> None (the next frame is the first)."""
    if not arrays:
        return None
    names = [f"cache/{i:03d}" for i in range(len(like))]
    if sorted(arrays) != names:
        raise ValueError(f"the saved decoder has caches {sorted(arrays)[:3]}..., this decoder {names[:3]}...")
    out = []
    for name, zero in zip(names, like):
        if tuple(arrays[name].shape) != tuple(zero.shape):
            raise ValueError(f"decoder cache {name} is {arrays[name].shape}, this decoder's {tuple(zero.shape)}")
        out.append(torch.from_numpy(np.array(arrays[name])).to(device=device, dtype=zero.dtype))
    return out


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

    def export_state(self) -> dict[str, np.ndarray]:
        return _export_tensors(self._decoder.caches)

    def import_state(self, arrays: dict[str, np.ndarray]) -> None:
        like = None
        if arrays:
            height, width = _latent_size(arrays)
            like = self._decoder.vae.decoder_cache_init(1, height, width, torch.float32, self._device)
        self._decoder.caches = _import_tensors(arrays, like, self._device)


class TorchTinyStreamingDecoder(StreamingDecoder):
    """Wraps skyrt.export.tiny_vae.TinyStreamingDecoder (TAEHV's decoder) for numpy in/out."""

    def __init__(self, tiny, device: torch.device):
        from skyrt.export.tiny_vae import TinyStreamingDecoder

        self._decoder = TinyStreamingDecoder(tiny)
        self._device = device

    def reset(self) -> None:
        self._decoder.reset()

    def decode_next(self, mu_frame: np.ndarray) -> np.ndarray:
        z = torch.from_numpy(np.ascontiguousarray(mu_frame))[None].to(self._device)  # [1, 16, 1, h, w]
        return self._decoder.decode_next(z)[0].float().cpu().numpy()

    def export_state(self) -> dict[str, np.ndarray]:
        return _export_tensors(self._decoder.memories)

    def import_state(self, arrays: dict[str, np.ndarray]) -> None:
        like = None
        if arrays:
            h, w = _latent_size(arrays)
            like = self._decoder.step.tiny.zero_memories(1, h, w, torch.zeros(1, device=self._device))
        self._decoder.memories = _import_tensors(arrays, like, self._device)


class TorchBackend(Backend):
    """Runs the DiT, VAE and umT5 reference modules with torch.

    decoder: "wan" (the Wan2.1 VAE's decoder, default) or "tiny" (TAEHV's taew2_1, export/tiny_vae.py:
    the model folder's taew2_1.safetensors / taew2_1.pth, or the file `decoder_path`), for vae_decode
    and the streaming decoder. Encoding (I2V, V2V) always uses the Wan2.1 VAE."""

    name = "torch"

    def __init__(self, model: ModelSpec, device: str = "cpu", dtype: torch.dtype = torch.float32,
                 decoder: str = "wan", decoder_path: str | None = None, cuda_graphs: bool = False,
                 fixed_shapes: bool | None = None, graph_warmup: int = 2):
        super().__init__(model)
        from skyrt.export.loaders import load_components
        from skyrt.export.tiny_vae import open_decoder

        self.device = torch.device(device)
        self.dtype = dtype
        self._set_step_options(cuda_graphs, fixed_shapes, graph_warmup)
        self.tiny_decoder = open_decoder(decoder, decoder_path, model.path, self.device)  # None: the Wan VAE's
        self.dit, self.vae, self.text_encoder = load_components(model, dtype=dtype, device=self.device)

    # set on the class so that tests can inject a stand-in: device -> a runtime/step_graphs.py
    # GraphMechanism (None: skyrt.export.static_step.TorchCudaGraphs)
    graph_mechanism = None

    def _set_step_options(self, cuda_graphs: bool, fixed_shapes: bool | None, graph_warmup: int) -> None:
        """cuda_graphs: one CUDA graph per step shape (needs a CUDA device; elsewhere the fixed-shape
        step runs eagerly, and `cuda_graphs_off` says why). fixed_shapes: the step over the whole ring
        with an additive mask and static buffers (export/static_step.py); default: on with cuda_graphs."""
        import warnings

        self.fixed_shapes = bool(cuda_graphs) if fixed_shapes is None else bool(fixed_shapes)
        if cuda_graphs and not self.fixed_shapes:
            raise ValueError("cuda_graphs=True needs the fixed-shape step: leave fixed_shapes unset or True")
        self.graph_warmup = int(graph_warmup)
        self.cuda_graphs, self.cuda_graphs_off = bool(cuda_graphs), None
        if cuda_graphs and self.device.type != "cuda":
            self.cuda_graphs = False
            self.cuda_graphs_off = (f"cuda_graphs=True needs a CUDA device, this backend runs on {self.device}: "
                                    "the fixed-shape step runs eagerly (pass device='cuda' for CUDA graphs)")
            warnings.warn(self.cuda_graphs_off, RuntimeWarning, stacklevel=3)

    @classmethod
    def from_modules(cls, dit, vae=None, text_encoder=None, device: str = "cpu",
                     dtype: torch.dtype = torch.float32, cuda_graphs: bool = False,
                     fixed_shapes: bool | None = None, graph_warmup: int = 2) -> "TorchBackend":
        """A backend over modules already in memory (no model folder: e.g. random weights of a real
        architecture for benchmarks/gpu_validate.py). Without a VAE or text encoder, only the DiT
        paths work (contexts come as TextContext(prompt, value=[1, text_len, text_dim] tensors))."""
        from pathlib import Path

        backend = cls.__new__(cls)
        Backend.__init__(backend, ModelSpec(path=Path("<in memory>"), layout="official",
                                            dit_config=dit.config.to_official()))
        backend.device, backend.dtype = torch.device(device), dtype
        backend._set_step_options(cuda_graphs, fixed_shapes, graph_warmup)
        backend.dit = dit.to(backend.device, dtype).eval()
        backend.vae = None if vae is None else vae.to(backend.device).eval()
        backend.text_encoder = text_encoder
        backend.tiny_decoder = None
        return backend

    @torch.inference_mode()
    def run_text_encoder(self, prompt: str) -> TextContext:
        context = self.text_encoder.encode([prompt]).to(self.device, self.dtype)  # [1, text_len, text_dim]
        return TextContext(prompt=prompt, value=context)

    def text_encoder_hash(self) -> str:
        """The model folder's umT5 and tokenizer files, this backend's name and dtype (contexts of
        other dtypes differ in the last bits)."""
        files = tree_sha256(text_encoder_files(self.model))
        return hashlib.sha256(f"{self.name}|{self.dtype}|{files}".encode()).hexdigest()

    def context_to_array(self, value: torch.Tensor) -> np.ndarray:
        return value.detach().float().cpu().numpy()

    def context_from_array(self, array: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(array).to(self.device, self.dtype)

    @torch.inference_mode()
    def vae_encode(self, pixels: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(np.ascontiguousarray(pixels))[None].to(self.device)  # [1, 3, T, H, W]
        return self.vae.encode(x)[0].float().cpu().numpy()

    @torch.inference_mode()
    def vae_decode(self, mu: np.ndarray) -> np.ndarray:
        z = torch.from_numpy(np.ascontiguousarray(mu))[None].to(self.device)  # [1, 16, F, h, w]
        if self.tiny_decoder is not None:
            from skyrt.export.tiny_vae import decode_raw

            return decode_raw(self.tiny_decoder, z)[0].float().cpu().numpy()
        return self.vae.decode(z)[0].float().cpu().numpy()

    def streaming_decoder(self) -> StreamingDecoder:
        if self.tiny_decoder is not None:
            return TorchTinyStreamingDecoder(self.tiny_decoder, self.device)
        return TorchStreamingDecoder(self.vae, self.device)

    # ---- the DiT: one stream session, every mode ----------------------------------------------
    def kv_layout(self) -> tuple[int, int, int]:
        cfg = self.dit.config
        return cfg.num_layers, cfg.num_heads, cfg.head_dim

    def open_kv_stream(self, spec: KVStreamSpec) -> "TorchKVStreamSession":
        """The stream lives on this backend's device (host memory on the CPU, the GPU with device='cuda'):
        the core's buffers are used in place as torch tensors, cond and uncond run as one batch. A window
        (spec.slots == 0) is the same session's step with no cache."""
        return TorchKVStreamSession(self, spec)



def valid_slots(cache: torch.Tensor, slot_valid: np.ndarray, axis: int) -> torch.Tensor:
    """Only the valid ring slots of `cache` along `axis` (the slots axis): a view when they lead the
    ring (no copy), a gather otherwise."""
    index = np.flatnonzero(slot_valid)
    if len(index) == len(slot_valid):
        return cache
    if len(index) == 0 or index[-1] == len(index) - 1:
        return cache.narrow(axis, 0, len(index))
    return cache.index_select(axis, torch.from_numpy(index).to(cache.device))


def core_tensor(buffer) -> torch.Tensor:
    """A skyrt._core.Buffer as a torch tensor over the same memory (no copy): numpy on the host,
    __cuda_array_interface__ on a GPU."""
    if buffer.device == "cpu":
        return torch.from_numpy(buffer.numpy())
    return torch.as_tensor(buffer, device=buffer.device)


class TorchKVStreamSession(KVStreamSession):
    """The torch backend's side of a KV-cached stream, on the CPU or a GPU.

    Reads latents_in and the ring K/V and writes velocity / new K/V of the rollout core in place; the
    prompt K/V are computed once per prompt (batched for CFG). On a GPU the core's kernels run on torch's
    current stream, so core and DiT work are ordered without a host sync; nothing comes back to the
    host but the clean blocks the caller reads.
    """

    def __init__(self, backend: TorchBackend, spec: KVStreamSpec):
        super().__init__(spec)
        from skyrt.export.cached_step import CachedStep

        self.backend = backend
        dev = backend.device
        self.device = "cpu" if dev.type == "cpu" else f"cuda:{dev.index or 0}"
        self.stream = 0 if dev.type == "cpu" else torch.cuda.current_stream(dev).cuda_stream
        # fp32 models keep an fp32 ring; bf16/fp16 models an fp16 one (the core has no bf16 storage)
        self.kv_dtype = "float32" if backend.dtype == torch.float32 else "float16"
        self._step = CachedStep(backend.dit)
        self._cross = None
        self._fps = None if spec.fps_class is None else torch.full((spec.contexts,), spec.fps_class, device=dev)
        self._block = spec.causal_block_size if spec.block_causal else None  # None: full attention among the frames
        # backend.fixed_shapes: the step over static buffers and the whole ring (export/static_step.py),
        # made with the first prompts (it needs the core's ring); backend.cuda_graphs: through StepGraphs
        self.static = None
        self.graphs = None
        if backend.cuda_graphs:
            from skyrt.runtime.step_graphs import StepGraphs

            make = backend.graph_mechanism
            if make is None:
                from skyrt.export.static_step import TorchCudaGraphs as make
            self.graphs = StepGraphs(make(dev), warmup=backend.graph_warmup)

    def _view(self, name: str, frames: int | None = None) -> torch.Tensor:
        return core_tensor(self.core.buffer(name, frames))

    @torch.inference_mode()
    def set_prompts(self, contexts: list[TextContext]) -> None:
        from skyrt.export.dit import batch_cross_kv

        prompts = [self.backend.dit.cross_attention_kv(c.value, collapse_padding=True) for c in contexts]
        if self.backend.fixed_shapes:
            self._set_static_prompts(prompts, max(int(c.value.shape[1]) for c in contexts))
            return
        self._cross = prompts[0] if len(prompts) == 1 else batch_cross_kv(prompts)

    def _set_static_prompts(self, prompts: list, length: int) -> None:
        """The fixed-shape step's prompt K/V (padded to `length` keys): copied in place, or reallocated
        (the first prompts, another shape), which drops every captured graph."""
        if self.static is None:
            from skyrt.export.static_step import StaticKVStep

            ring_k, ring_v = self._ring() if self.spec.slots else (None, None)
            self.static = StaticKVStep(self.backend.dit, ring_k, ring_v, self.spec.slots, self._tokens_per_slot(),
                                       self._fps, self.backend.device)
        if self.static.set_prompts(prompts, length) and self.graphs is not None:
            self.graphs.invalidate("the prompt K/V buffers were reallocated (first prompts or another shape)")

    def _tokens_per_slot(self) -> int:
        patch_h, patch_w = self.backend.dit.config.patch_size[1:]
        spec = self.spec
        return (spec.latent_size[0] // patch_h) * (spec.latent_size[1] // patch_w) * spec.causal_block_size

    def _ring(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole ring, cache_k and cache_v [layers, B, slots * tokens_per_slot, N, Dh] (the core's memory)."""
        return self._view("cache_k"), self._view("cache_v")

    @torch.inference_mode()
    def step(self, call: KVStepCall) -> None:
        if self.static is not None:
            return self._static_step(call)
        from skyrt.export.cached_step import active_rope

        spec, dit, dev = self.spec, self.backend.dit, self.backend.device
        f, batch = call.frames, spec.contexts
        x = self._view("latents_in", f).to(self.backend.dtype)  # [B, 16, f, h, w]
        t = torch.from_numpy(np.asarray(call.timesteps, np.float32))[None].to(dev).expand(batch, -1)  # [B, f]
        patch_h, patch_w = dit.config.patch_size[1:]
        cos, sin = active_rope(dit, call.position, f, x.shape[3] // patch_h, x.shape[4] // patch_w)
        ck, cv = self._cache(call.slot_valid) if spec.slots else (None, None)  # None: a window step
        # A call's own block size (LongLive's recache: full attention over its chunk) wins over the stream's.
        v, new_k, new_v = self._step(x, t, self._cross, ck, cv, None, cos.to(dev), sin.to(dev), fps=self._fps,
                                     causal_block_size=call.causal_block_size or self._block)
        self._write_outputs(call, v, new_k, new_v)

    def _static_step(self, call: KVStepCall) -> None:
        """The fixed-shape step: inputs copied into the key's static buffers, the step eager or from the
        key's CUDA graph, its outputs copied into the core's buffers."""
        from skyrt.export.static_step import attention_key

        f = call.frames
        key = (f, attention_key(f, call.causal_block_size or self._block))
        static = self.static
        static.load(key, self._view("latents_in", f), call.timesteps, call.position,
                    call.slot_valid if self.spec.slots else None)
        if self.graphs is None:
            v, new_k, new_v = static.compute(key)
        else:
            v, new_k, new_v = self.graphs.run(key, lambda: static.compute(key), static.addresses())
        self._write_outputs(call, v, new_k, new_v)

    def _write_outputs(self, call: KVStepCall, v, new_k, new_v) -> None:
        f = call.frames
        if call.want_velocity:
            self._view("velocity", f).copy_(v)
        if call.want_kv:
            if new_k is None:
                raise ValueError("a window step (no cached context) has no K/V to commit: want_kv needs a KV stream")
            self._view("new_k", f).copy_(new_k)
            self._view("new_v", f).copy_(new_v)

    def _cache(self, slot_valid) -> tuple[torch.Tensor, torch.Tensor]:
        """The ring's valid slots, [layers, B, S_valid, N, Dh] each: a view when they lead the ring (no
        copy), a gather otherwise."""
        spec, batch = self.spec, self.spec.contexts
        patch_h, patch_w = self.backend.dit.config.patch_size[1:]
        tokens = (spec.latent_size[0] // patch_h) * (spec.latent_size[1] // patch_w) * spec.causal_block_size
        layers, _, _, heads, head_dim = self.core.buffer("cache_k").shape
        valid = np.asarray(slot_valid, bool)
        return tuple(valid_slots(self._view(n).view(layers, batch, spec.slots, tokens, heads, head_dim), valid, 2)
                     .flatten(2, 3) for n in ("cache_k", "cache_v"))

    def close(self) -> None:
        self._cross = None
        if self.graphs is not None:
            self.graphs.close()
            # what the stream's graphs did, per step key (warm-ups, captures, replays): logs and tests
            self.backend.last_graph_stats = dict(self.graphs.stats)
        self.static = None
        super().close()
