"""The onnxruntime backend: runs the exported graphs (export/onnx_export.py) without torch.

Two ways in:
- an EXPORT folder (manifest.json + *.onnx + tokenizer.json, from `skyrt export onnx`): used as is;
  a request whose shapes the export was not made for is refused with the command that makes one;
- a MODEL folder (official or diffusers layout): graphs are exported on first use into a cache
  ($SKYRT_CACHE or ~/.cache/skyrt, under onnx/), keyed by a hash of the model files and the export
  settings, in a subprocess (torch is imported there, never here) with a progress bar. Groups of
  graphs are exported as they are needed: the text encoder at the first prompt, the VAE and DiT
  graphs at the first request of a given size, block size and cache capacity.

Nothing here imports torch, transformers or diffusers (exported_graphs.py holds the host logic this
backend shares with TensorRT: tokenizer, float64 time sinusoid, RoPE tables, graph lookup).

Providers: device "cpu" -> CPUExecutionProvider; "cuda" / "cuda:N" -> CUDAExecutionProvider;
"tensorrt" -> TensorrtExecutionProvider (+ CUDA). The DiT's one entry, a stream session's step in
every mode (exported_graphs.py GraphKVStreamSession), and the streaming VAE run through I/O binding
on skyrt._core.Buffers of the provider's device: on CUDA the ring, the latents, the velocity, the prompt K/V and the VAE caches
never leave the GPU (device OrtValues bound by address; one binding per shape, made once); on the
CPU the same binding code reads and writes the core's host buffers without a copy.
On the CPU provider, each DiT graph runs its "ort_cpu" variant when the export has one (attention and
GELU as onnxruntime contrib ops; the plain graph is what TensorRT builds). Intra-op threads do
not spin by default (`spin=True` restores onnxruntime's default; see __init__).
onnxruntime silently falls back to the CPU when a GPU provider cannot start: this backend checks
what each session really got and refuses such a session with an error instead.

Semantics are the torch backend's (export/torch_backend.py); tests/test_onnxruntime_backend.py
compares whole rollouts. Run them: python -m pytest tests/test_onnxruntime_backend.py -q
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from ..rope import rope_cos_sin, timestep_sinusoid
from .base import ModelSpec
from .bound_decoders import BoundStreamingDecoder
from .exported_graphs import (ExportedGraphBackend, PromptTokenizer, clean_prompt, export_folder_spec,
                              is_export_folder, read_manifest)
from .graph_files import GraphFile

# ORT's CPU provider has no bfloat16 MatMul (it refuses bf16 MatMul nodes): bf16 exports are for TensorRT.
ORT_PRECISIONS = ("fp32", "fp16")
_ORT_ELEMENT = {"float32": np.float32, "float16": np.float16, "uint8": np.bool_, "int64": np.int64}


# ----------------------------------------------------------------------------------------------
# Providers


def session_providers(device: str = "cpu", providers: Sequence | None = None) -> list:
    """The provider list for `device` ('cpu', 'cuda', 'cuda:N', 'tensorrt'), or `providers` as given;
    refuses providers this onnxruntime build does not have (it would silently run on the CPU)."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    if providers is None:
        dev = str(device).lower()
        if dev == "cpu":
            providers = ["CPUExecutionProvider"]
        elif dev.startswith("cuda"):
            index = int(dev.split(":", 1)[1]) if ":" in dev else 0
            providers = [("CUDAExecutionProvider", {"device_id": index}), "CPUExecutionProvider"]
        elif dev in ("tensorrt", "trt"):
            providers = [("TensorrtExecutionProvider", {"device_id": 0}), ("CUDAExecutionProvider", {"device_id": 0}),
                         "CPUExecutionProvider"]
        else:
            raise ValueError(f"device={device!r}: the onnxruntime backend takes 'cpu', 'cuda', 'cuda:N' or 'tensorrt'")
    names = [p[0] if isinstance(p, (tuple, list)) else p for p in providers]
    missing = [n for n in names if n not in available]
    if missing:
        raise RuntimeError(
            f"onnxruntime here has no {', '.join(missing)} (available: {', '.join(available)}); it would run on the "
            "CPU instead. Install onnxruntime-gpu (with CUDA/cuDNN) for device='cuda', or use device='cpu'")
    return list(providers)


def _provider_name(p) -> str:
    return p[0] if isinstance(p, (tuple, list)) else p


# ----------------------------------------------------------------------------------------------
# The backend


OnnxRuntimeStreamingDecoder = BoundStreamingDecoder  # the VAE caches stay in bound buffers between frames


@dataclass
class _Bound:
    """An I/O binding prepared once for one key of a session, with the addresses it was made for."""

    session: Any
    binding: Any
    addresses: tuple

    def close(self) -> None:
        self.binding.clear_binding_inputs()
        self.binding.clear_binding_outputs()


class OnnxRuntimeBackend(ExportedGraphBackend):
    """Runs the exported graphs with onnxruntime; see the module docstring."""

    name = "onnxruntime"

    def __init__(self, model: ModelSpec, device: str = "cpu", providers: Sequence | None = None,
                 precision: str = "fp32", cache_dir: str | Path | None = None, threads: int | None = None,
                 export_options: dict | None = None, progress: bool = True, spin: bool = False,
                 decoder: str = "wan", decoder_path: str | Path | None = None):
        """threads: intra-op threads (None = onnxruntime's choice, one per core). spin: let idle intra-op
        threads busy-wait for the next op (onnxruntime's default). Off here: with any other process or
        thread on the cores (the server's decoder and HTTP threads, a training job), spinning workers
        take their time slices; measured on this 2-core machine under load, the benchmark step took
        1.5-1.9x longer with spinning (benchmarks/backends.py records both).
        decoder, decoder_path: ExportedGraphBackend._choose_decoder ("wan" or "tiny")."""
        super().__init__(model)
        import onnxruntime as ort

        if precision not in ORT_PRECISIONS:
            raise ValueError(f"precision={precision!r}: the onnxruntime backend runs {' or '.join(ORT_PRECISIONS)} "
                             "graphs (no bfloat16 MatMul on its CPU provider)")
        self._ort = ort
        self.device = device
        self.providers = session_providers(device, providers)
        self.precision = precision
        self.threads = threads
        self.spin = bool(spin)
        self.progress = progress
        self.export_options = dict(export_options or {})
        self._sessions: dict[Path, Any] = {}
        self._folders: list[Path] = []
        self._manifests: dict[Path, dict] = {}
        self._tokenizer: PromptTokenizer | None = None
        if model.layout == "onnx" or is_export_folder(model.path):
            self.source = None  # a fixed export folder
            self._add_folder(Path(model.path))
        else:
            self._use_model_folder(Path(model.path), cache_dir)  # export on demand into the cache
        self._read_dit_layout(model.dit_config)
        self._choose_decoder(decoder, decoder_path, model.path, cache_dir, progress)

    def _add_folder(self, folder: Path) -> None:
        if folder not in self._folders:
            manifest = read_manifest(folder)
            if manifest.get("precision", "fp32") not in ORT_PRECISIONS:
                raise ValueError(f"{folder} holds {manifest['precision']} graphs; onnxruntime runs "
                                 f"{' or '.join(ORT_PRECISIONS)} (export with --precision fp16, or build engines)")
            self._manifests[folder] = manifest
            self._folders.append(folder)

    # ---- graphs and sessions ------------------------------------------------------------------
    def _session(self, graph: GraphFile):
        session = self._sessions.get(graph.path)
        if session is None:
            ort = self._ort
            options = ort.SessionOptions()
            options.log_severity_level = 3  # ORT warns about fp16 constant folding; nothing actionable
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            if self.threads:
                options.intra_op_num_threads = int(self.threads)
            options.add_session_config_entry("session.intra_op.allow_spinning", "1" if self.spin else "0")
            wanted = _provider_name(self.providers[0])
            session = ort.InferenceSession(str(graph.path_for(wanted)), sess_options=options,
                                           providers=self.providers)
            if session.get_providers()[0] != wanted:
                raise RuntimeError(f"onnxruntime created the {graph.name} session on {session.get_providers()} "
                                   f"instead of {wanted} (a silent fallback); refusing. Check the CUDA/TensorRT "
                                   "installation or use device='cpu'")
            self._sessions[graph.path] = session
        return session

    @property
    def _on_gpu(self) -> bool:
        return _provider_name(self.providers[0]) != "CPUExecutionProvider"

    def _run(self, graph: GraphFile, feeds: dict) -> list:
        """Run a graph on host arrays (text encoder, VAE encoder); outputs in manifest order as numpy
        (a GPU provider copies them in and out)."""
        return self._session(graph).run([o["name"] for o in graph.entry["outputs"]], feeds)

    def _device_id(self) -> int:
        first = self.providers[0]
        return int(first[1].get("device_id", 0)) if isinstance(first, (tuple, list)) else 0

    def memory_device(self) -> str:
        return f"cuda:{self._device_id()}" if self._on_gpu else "cpu"

    def synchronize(self) -> None:
        """The core's kernels run on the default stream, onnxruntime on its own: wait for them."""
        if self._on_gpu:
            from skyrt import _core

            _core.synchronize(self.memory_device(), 0)

    def _run_bound(self, graph: GraphFile, inputs: Mapping[str, Any], outputs: Mapping[str, Any], cache: dict,
                   key: tuple) -> None:
        """I/O binding by address: every Buffer bound where it lies (device_type cpu or cuda), outputs
        written in place; the binding is made once per key and run again while the addresses hold."""
        addresses = tuple((n, b.ptr, tuple(b.shape)) for n, b in (*inputs.items(), *outputs.items()))
        bound = cache.get(key)
        if bound is None or bound.addresses != addresses:
            session = self._session(graph)
            binding = session.io_binding()
            for name, buf in inputs.items():
                binding.bind_input(name, *_ort_place(buf), _ORT_ELEMENT[buf.dtype], list(buf.shape), buf.ptr)
            for name, buf in outputs.items():
                binding.bind_output(name, *_ort_place(buf), _ORT_ELEMENT[buf.dtype], list(buf.shape), buf.ptr)
            bound = cache[key] = _Bound(session, binding, addresses)
        bound.session.run_with_iobinding(bound.binding)


def _ort_place(buffer) -> tuple[str, int]:
    """(device_type, device_id) of a Buffer for an onnxruntime binding."""
    device = buffer.device
    return ("cpu", 0) if device == "cpu" else ("cuda", int(device.split(":")[1]))


__all__ = ["OnnxRuntimeBackend", "OnnxRuntimeStreamingDecoder", "PromptTokenizer", "clean_prompt",
           "export_folder_spec", "is_export_folder", "read_manifest", "rope_cos_sin", "session_providers",
           "timestep_sinusoid"]
