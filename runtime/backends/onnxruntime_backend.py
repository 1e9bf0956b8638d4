"""The onnxruntime backend: runs the exported graphs (export/onnx_export.py) without torch.

Two ways in:
- an EXPORT folder (manifest.json + *.onnx + tokenizer.json, from `skyrt export onnx`): used as is;
  a request whose shapes the export was not made for is refused with the command that makes one;
- a MODEL folder (official or diffusers layout): graphs are exported on first use into a cache
  ($SKYRT_CACHE or ~/.cache/skyrt, under onnx/), keyed by a hash of the model files and the export
  settings, in a subprocess (torch is imported there, never here) with a progress bar. Groups of
  graphs are exported as they are needed: the text encoder at the first prompt, the VAE and DiT
  graphs at the first request of a given size, block size and cache capacity.

Nothing here imports torch, transformers or diffusers: the tokenizer is the `tokenizers` package
reading tokenizer.json, and the host-side inputs (timestep sinusoid, RoPE tables) are numpy ports
of export/dit.py (float64 angles, fp32 tables).

Providers: device "cpu" -> CPUExecutionProvider; "cuda" / "cuda:N" -> CUDAExecutionProvider (with
I/O binding: per-prompt cross K/V stay on the GPU); "tensorrt" -> TensorrtExecutionProvider (+ CUDA).
On the CPU provider, dit_step runs its "ort_cpu" variant when the export has one (attention and GELU
as onnxruntime contrib ops; the plain dit_step.onnx is what TensorRT builds). Intra-op threads do
not spin by default (`spin=True` restores onnxruntime's default; see __init__).
onnxruntime silently falls back to the CPU when a GPU provider cannot start: this backend checks
what each session really got and refuses such a session with an error instead.

Semantics are the torch backend's (runtime/backends/torch_backend.py); tests/test_onnxruntime_backend.py
compares whole rollouts. Run them: python -m pytest tests/test_onnxruntime_backend.py -q
"""
from __future__ import annotations

import functools
import hashlib
import html
import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .base import Backend, ModelSpec, StreamingDecoder, TextContext

MANIFEST = "manifest.json"
FORMAT = "skyrt-onnx"
ROPE_THETA = 10000.0
SPATIAL = 8  # VAE pixels per latent
PATCH = 2  # DiT patch (1, 2, 2)
# Which graphs an exporting backend makes together (export/onnx_export.py GRAPH_GROUPS).
GROUP_OF = {"text_encoder": "text", "cross_kv": "text", "dit_window": "window", "dit_window_causal": "window_causal",
            "dit_step": "step", "vae_decode_first": "vae", "vae_decode_step": "vae", "vae_encode_first": "vae",
            "vae_encode_step": "vae"}
GROUP_GRAPHS = {g: tuple(k for k, v in GROUP_OF.items() if v == g) for g in set(GROUP_OF.values())}
# Bumped when the exporter writes different graphs for a group, so cached exports are made again:
# step 2 = dit_step's export formulation plus its ORT-CPU variant (export/onnx_export.py).
GROUP_REVISION = {"step": 2}
_NP_DTYPES = {"float32": np.float32, "float16": np.float16, "int64": np.int64, "bool": np.bool_}
# ORT's CPU provider has no bfloat16 MatMul (it refuses bf16 MatMul nodes): bf16 exports are for TensorRT.
ORT_PRECISIONS = ("fp32", "fp16")
ORT_CPU_VARIANT = "ort_cpu"  # manifest key of a graph's CPU-provider variant (export/onnx_export.py)


# ----------------------------------------------------------------------------------------------
# Host-side inputs: numpy ports of export/dit.py (tests compare them with the torch originals)


def timestep_sinusoid(t: np.ndarray, dim: int) -> np.ndarray:
    """[...] timesteps -> [..., dim] float32, cos half first; float64 angles like export/dit.py."""
    half = dim // 2
    freqs = np.power(10000.0, -np.arange(half, dtype=np.float64) / half)
    angles = np.asarray(t, dtype=np.float64)[..., None] * freqs
    return np.concatenate([np.cos(angles), np.sin(angles)], axis=-1).astype(np.float32)


def rope_axis_pairs(head_dim: int) -> tuple[int, int, int]:
    hw = head_dim // 6
    return head_dim // 2 - 2 * hw, hw, hw


def _axis_inv_freq(pairs: int) -> np.ndarray:
    return 1.0 / ROPE_THETA ** (np.arange(pairs, dtype=np.float64) * 2 / (2 * pairs))


@functools.lru_cache(maxsize=64)
def rope_cos_sin(head_dim: int, first_position: int, frames: int, h: int, w: int,
                 max_positions: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """Real RoPE tables (cos, sin), each float32 [frames*h*w, head_dim//2], for frames at temporal
    positions first_position.. on an h x w TOKEN grid (export/dit.py rope_cos_sin). Read-only arrays
    (cached: a rollout asks for the same few position ranges over and over)."""
    last = first_position + frames - 1
    if first_position < 0 or last >= max_positions:
        raise ValueError(f"frame positions {first_position}..{last} fall outside the trained RoPE table "
                         f"[0, {max_positions}); rebase the positions")
    pt, ph, pw = rope_axis_pairs(head_dim)
    pos = np.arange(first_position, first_position + frames, dtype=np.float64)
    ang_t = pos[:, None] * _axis_inv_freq(pt)
    ang_h = np.arange(h, dtype=np.float64)[:, None] * _axis_inv_freq(ph)
    ang_w = np.arange(w, dtype=np.float64)[:, None] * _axis_inv_freq(pw)
    angles = np.concatenate([
        np.broadcast_to(ang_t[:, None, None, :], (frames, h, w, pt)),
        np.broadcast_to(ang_h[None, :, None, :], (frames, h, w, ph)),
        np.broadcast_to(ang_w[None, None, :, :], (frames, h, w, pw)),
    ], axis=-1).reshape(frames * h * w, head_dim // 2)
    cos, sin = np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)
    cos.flags.writeable = sin.flags.writeable = False
    return cos, sin


# ----------------------------------------------------------------------------------------------
# Tokenizer (no transformers): tokenizer.json + the official prompt cleaning


def clean_prompt(text: str) -> str:
    """The official prompt cleaning, as export/text_encoder.py clean_prompt (torch-free copy):
    ftfy.fix_text, html.unescape twice, strip, whitespace runs -> one space, strip."""
    import ftfy

    text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text)).strip()
    return re.sub(r"\s+", " ", text).strip()


class PromptTokenizer:
    """tokenizer.json -> (input_ids, attention_mask) int64 [1, text_len], padded right, truncated with
    </s> kept: what TextEncoder.tokenize (transformers) gives."""

    def __init__(self, path: str | Path, text_len: int, pad_id: int = 0, pad_token: str = "<pad>", clean: bool = True):
        from tokenizers import Tokenizer

        self.text_len = int(text_len)
        self.clean = clean
        self._tok = Tokenizer.from_file(str(path))
        self._tok.enable_truncation(max_length=self.text_len)
        self._tok.enable_padding(length=self.text_len, pad_id=pad_id, pad_token=pad_token, direction="right")

    def __call__(self, prompt: str) -> tuple[np.ndarray, np.ndarray]:
        text = clean_prompt(prompt) if self.clean else prompt
        enc = self._tok.encode(text, add_special_tokens=True)
        ids = np.asarray(enc.ids, dtype=np.int64)[None]
        mask = np.asarray(enc.attention_mask, dtype=np.int64)[None]
        return ids, mask


# ----------------------------------------------------------------------------------------------
# Export folders


def is_export_folder(path: str | Path) -> bool:
    path = Path(path).expanduser()
    if not (path / MANIFEST).is_file():
        return False
    try:
        return json.loads((path / MANIFEST).read_text()).get("format") == FORMAT
    except (OSError, ValueError):
        return False


def read_manifest(path: str | Path) -> dict:
    path = Path(path).expanduser()
    manifest = json.loads((path / MANIFEST).read_text())
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{path / MANIFEST} is not a skyrt ONNX export manifest")
    return manifest


def export_folder_spec(path: str | Path) -> ModelSpec:
    """The ModelSpec of an export folder (layout 'onnx'; the DiT config comes from the manifest)."""
    path = Path(path).expanduser()
    return ModelSpec(path=path, layout="onnx", dit_config=read_manifest(path)["model"]["dit_config"])


@dataclass
class _Graph:
    """One graph of one export folder."""

    name: str
    folder: Path
    entry: dict

    @property
    def path(self) -> Path:
        return self.folder / self.entry["file"]

    def path_for(self, provider: str) -> Path:
        """The file to run on `provider`: dit_step's onnxruntime-CPU variant (contrib ops, see
        export/onnx_export.py ORT_CPU_VARIANT) on the CPU provider when the export has one, else the
        graph itself (what TensorRT builds)."""
        variant = self.entry.get(ORT_CPU_VARIANT)
        if variant is not None and provider in variant.get("providers", ()):
            return self.folder / variant["file"]
        return self.path

    def input_dtype(self, name: str):
        for spec in self.entry["inputs"]:
            if spec["name"] == name:
                return _NP_DTYPES[spec["dtype"]]
        raise KeyError(f"{self.name} has no input {name!r}")

    def input_shape(self, name: str) -> list:
        return next(s["shape"] for s in self.entry["inputs"] if s["name"] == name)

    def matches(self, needs: dict) -> bool:
        static = self.entry.get("shape_config", {})  # the static shapes the graph was exported for
        return all(static.get(k) == v for k, v in needs.items())


def default_cache_root() -> Path:
    return Path(os.environ.get("SKYRT_CACHE", Path.home() / ".cache" / "skyrt")).expanduser()


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


@dataclass
class OrtPrompt:
    """kv_prompt's result: stacked cross-attention K/V [layers, 1, Lt, N, Dh] (numpy, or OrtValues
    on the GPU with a CUDA provider)."""

    k: Any
    v: Any


class OnnxRuntimeStreamingDecoder(StreamingDecoder):
    """vae_decode_first, then vae_decode_step, with the causal-conv caches carried between calls."""

    def __init__(self, backend: "OnnxRuntimeBackend"):
        self.backend = backend
        self.reset()

    def reset(self) -> None:
        self._caches: dict[str, np.ndarray] | None = None

    def decode_next(self, mu_frame: np.ndarray) -> np.ndarray:
        """Raw latent frame [16, 1, h, w] -> pixels [3, 1 (first) or 4, H, W] in [-1, 1]."""
        _, _, h, w = mu_frame.shape
        first = self._caches is None
        graph = self.backend._graph("vae_decode_first" if first else "vae_decode_step",
                                    height=h * SPATIAL, width=w * SPATIAL)
        if first:
            self._caches = self.backend._zero_caches(graph)
        pixels, self._caches = self.backend._vae_call(graph, "z", mu_frame[None], self._caches)
        return pixels[0]


class OnnxRuntimeBackend(Backend):
    """Runs the exported graphs with onnxruntime; see the module docstring."""

    name = "onnxruntime"

    def __init__(self, model: ModelSpec, device: str = "cpu", providers: Sequence | None = None,
                 precision: str = "fp32", cache_dir: str | Path | None = None, threads: int | None = None,
                 export_options: dict | None = None, progress: bool = True, spin: bool = False):
        """threads: intra-op threads (None = onnxruntime's choice, one per core). spin: let idle intra-op
        threads busy-wait for the next op (onnxruntime's default). Off here: with any other process or
        thread on the cores (the server's decoder and HTTP threads, a training job), spinning workers
        take their time slices; measured on this 2-core machine under load, the benchmark step took
        1.5-1.9x longer with spinning (benchmarks/backends.py records both)."""
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
            self.source = Path(model.path)  # a model folder: export on demand into the cache
            from ..text_cache import tree_sha256

            self.cache_root = Path(cache_dir).expanduser() if cache_dir else default_cache_root()
            self.model_hash = tree_sha256([self.source], memo_file=self.cache_root / "file-hashes.json")
        self._read_dit_layout(model.dit_config)

    def _read_dit_layout(self, cfg: dict) -> None:
        """What the host side needs from the DiT config (official config.json names)."""
        self.num_layers, self.num_heads = int(cfg["num_layers"]), int(cfg["num_heads"])
        self.head_dim = int(cfg["dim"]) // self.num_heads
        self.freq_dim = int(cfg.get("freq_dim", 256))
        self.rope_max_positions = int(cfg.get("rope_max_positions", 1024))

    # ---- graphs and sessions ------------------------------------------------------------------
    def _add_folder(self, folder: Path) -> None:
        if folder not in self._folders:
            manifest = read_manifest(folder)
            if manifest.get("precision", "fp32") not in ORT_PRECISIONS:
                raise ValueError(f"{folder} holds {manifest['precision']} graphs; onnxruntime runs "
                                 f"{' or '.join(ORT_PRECISIONS)} (export with --precision fp16, or build engines)")
            self._manifests[folder] = manifest
            self._folders.append(folder)

    def _find(self, name: str, needs: dict) -> _Graph | None:
        for folder in self._folders:
            entry = self._manifests[folder]["graphs"].get(name)
            if entry is not None:
                graph = _Graph(name, folder, entry)
                if graph.matches(needs):
                    return graph
        return None

    def _graph(self, name: str, **needs) -> _Graph:
        """The graph `name` exported for the static shapes `needs` (exporting it first from a model folder)."""
        graph = self._find(name, needs)
        if graph is None and self.source is not None:
            self._add_folder(self._export_group(GROUP_OF[name], needs))
            graph = self._find(name, needs)
        if graph is None:
            have = [self._manifests[f]["graphs"][name].get("shape_config") for f in self._folders
                    if name in self._manifests[f]["graphs"]]
            flags = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in needs.items())
            raise ValueError(
                f"the ONNX export has no {name} graph for {needs or 'this request'} (it has: {have or 'none'}); "
                f"export one with: skyrt export onnx --model MODEL_DIR --out DIR {flags}".rstrip())
        return graph

    def _session(self, graph: _Graph):
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

    def _run(self, graph: _Graph, feeds: dict, keep_on_device: Sequence[str] = ()) -> list:
        """Run a graph; outputs in manifest order (numpy, or OrtValues for `keep_on_device` on a GPU)."""
        session = self._session(graph)
        output_names = [o["name"] for o in graph.entry["outputs"]]
        if not self._on_gpu:
            return session.run(output_names, feeds)
        # I/O binding: OrtValue inputs already on the device are bound without a copy, and outputs
        # that the next calls read again (cross K/V) stay on the device.
        binding = session.io_binding()
        for name, value in feeds.items():
            if isinstance(value, self._ort.OrtValue):
                binding.bind_ortvalue_input(name, value)
            else:
                binding.bind_cpu_input(name, np.ascontiguousarray(value))
        device_id = self._device_id()
        for name in output_names:
            binding.bind_output(name, "cuda" if name in keep_on_device else "cpu",
                                device_id if name in keep_on_device else 0)
        session.run_with_iobinding(binding)
        values = binding.get_outputs()
        return [v if name in keep_on_device else v.numpy() for name, v in zip(output_names, values)]

    def _device_id(self) -> int:
        first = self.providers[0]
        return int(first[1].get("device_id", 0)) if isinstance(first, (tuple, list)) else 0

    # ---- exporting from a model folder --------------------------------------------------------
    def _export_group(self, group: str, needs: dict) -> Path:
        """Export the graphs of `group` for `needs` into the cache (once; a subprocess imports torch)."""
        graphs = GROUP_GRAPHS[group]
        settings = {"format": FORMAT, "group": group, "graphs": sorted(graphs), "needs": needs,
                    "precision": self.precision, "options": self.export_options}
        if group in GROUP_REVISION:
            settings["revision"] = GROUP_REVISION[group]
        key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
        target = self.cache_root / "onnx" / self.model_hash[:16] / f"{group}-{key}"
        if is_export_folder(target):
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.parent / f".{target.name}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        options = {**self.export_options, **needs, "precision": self.precision}
        if group == "window_causal":
            options["window_attention"] = "causal"
        cmd = [sys.executable, "-m", "skyrt.export.export_cli", "onnx", "--model", str(self.source), "--out", str(tmp),
               "--graphs", ",".join(graphs), "--model-hash", self.model_hash]
        for k, v in options.items():
            cmd += [f"--{k.replace('_', '-')}", str(v)]
        if not self.progress:
            cmd.append("--no-progress")
        result = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
        if result.returncode != 0:
            shutil.rmtree(tmp, ignore_errors=True)
            raise RuntimeError(f"exporting {', '.join(graphs)} failed (exit {result.returncode}): {' '.join(cmd)}\n"
                               f"{result.stdout}")
        try:
            os.replace(tmp, target)
        except OSError:  # another process finished the same export first
            shutil.rmtree(tmp, ignore_errors=True)
        return target

    # ---- text ---------------------------------------------------------------------------------
    def _text_graph(self) -> _Graph:
        return self._graph("text_encoder")

    def text_encoder_hash(self) -> str:
        """Identifies the text encoder for the text-embedding cache: the graph, tokenizer and text_len."""
        graph = self._text_graph()
        manifest = self._manifests[graph.folder]
        parts = [graph.entry["sha256"][graph.entry["file"]], manifest.get("tokenizer_sha256", ""),
                 str(manifest["model"]["text_encoder"]["text_len"]), self.name]
        return hashlib.sha256("|".join(parts).encode()).hexdigest()

    def context_from_array(self, array: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(array, dtype=np.float32)

    def encode_text(self, prompt: str) -> TextContext:
        graph = self._text_graph()
        if self._tokenizer is None:
            manifest = self._manifests[graph.folder]
            tok = manifest["tokenizer"]
            info = manifest["model"]["text_encoder"]
            self._tokenizer = PromptTokenizer(graph.folder / tok["file"], info["text_len"], pad_id=tok["pad_id"],
                                              pad_token=tok["pad_token"], clean=info.get("clean", True))
        ids, mask = self._tokenizer(prompt)
        (context,) = self._run(graph, {"input_ids": ids, "attention_mask": mask})
        return TextContext(prompt=prompt, value=context)  # [1, text_len, text_dim] float32

    def _cross_kv(self, context: TextContext) -> OrtPrompt:
        """Cross-attention K/V of a context, computed once and remembered on the context object."""
        memo = context.__dict__.get("_onnxruntime_cross_kv")
        if memo is not None and memo[0] == id(self):
            return memo[1]
        graph = self._graph("cross_kv")
        k, v = self._run(graph, {"context": np.ascontiguousarray(context.value, dtype=np.float32)},
                         keep_on_device=("cross_k", "cross_v"))
        prompt = OrtPrompt(k, v)
        context.__dict__["_onnxruntime_cross_kv"] = (id(self), prompt)
        return prompt

    # ---- DiT ----------------------------------------------------------------------------------
    def _fps_feed(self, fps_class: int | None) -> dict:
        if not self.model.inject_sample_info:
            return {}
        if fps_class not in (0, 1):
            raise ValueError(f"this checkpoint uses the fps embedding: fps_class must be 0 (16 fps) or 1, "
                             f"got {fps_class}")
        return {"fps": np.array([fps_class], dtype=np.int64)}

    def predict_velocity(self, latents, timesteps, context, fps_class, causal_block_size):
        _, frames, h, w = latents.shape
        size = dict(height=h * SPATIAL, width=w * SPATIAL)
        if causal_block_size is None:
            graph = self._graph("dit_window", **size)
        else:
            if frames % causal_block_size:
                raise ValueError(f"{frames} latent frames are not whole causal blocks of {causal_block_size}")
            graph = self._graph("dit_window_causal", **size, block_frames=causal_block_size)
        prompt = self._cross_kv(context)
        cos, sin = rope_cos_sin(self.head_dim, 0, frames, h // PATCH, w // PATCH, self.rope_max_positions)
        feeds = {"latents": np.ascontiguousarray(latents, dtype=np.float32)[None],
                 "t_emb": timestep_sinusoid(np.asarray(timesteps, np.float32)[None], self.freq_dim),
                 "cross_k": prompt.k, "cross_v": prompt.v, "rope_cos": cos, "rope_sin": sin,
                 **self._fps_feed(fps_class)}
        (velocity,) = self._run(graph, feeds)
        return velocity[0]

    def kv_layout(self) -> tuple[int, int, int]:
        return self.num_layers, self.num_heads, self.head_dim

    def kv_prompt(self, context: TextContext) -> OrtPrompt:
        """Per-layer cross-attention K/V of a prompt, computed once."""
        return self._cross_kv(context)

    def kv_step(self, latents, timesteps, prompt, cache, slot_valid, first_position, fps_class, block_size):
        """dit_step on the runtime's numpy cache (a view on the CPU, no copy with fp32 graphs): returns
        velocity [16, f, h, w] and the active tokens' K, V [layers, tokens, heads, head_dim] float32."""
        _, frames, h, w = latents.shape
        layers, slots, tokens, heads, head_dim = cache.k.shape
        if frames % block_size:
            raise ValueError(f"{frames} active latent frames are not whole blocks of {block_size}")
        graph = self._graph("dit_step", height=h * SPATIAL, width=w * SPATIAL, block_frames=block_size,
                            cache_blocks=slots)
        cache_dtype = graph.input_dtype("cache_k")
        shape = (layers, 1, slots * tokens, heads, head_dim)
        cos, sin = rope_cos_sin(self.head_dim, int(first_position), frames, h // PATCH, w // PATCH,
                                self.rope_max_positions)
        feeds = {"latents": np.ascontiguousarray(latents, dtype=np.float32)[None],
                 "t_emb": timestep_sinusoid(np.asarray(timesteps, np.float32)[None], self.freq_dim),
                 "cross_k": prompt.k, "cross_v": prompt.v,
                 # fp16 graphs take an fp16 cache: a converted copy per call (the runtime keeps fp32 K/V)
                 "cache_k": np.asarray(cache.k.reshape(shape), dtype=cache_dtype),
                 "cache_v": np.asarray(cache.v.reshape(shape), dtype=cache_dtype),
                 "slot_valid": np.asarray(slot_valid, dtype=bool).reshape(1, slots),
                 "rope_cos": cos, "rope_sin": sin, **self._fps_feed(fps_class)}
        velocity, new_k, new_v = self._run(graph, feeds)
        return (velocity[0], np.asarray(new_k[:, 0], dtype=np.float32), np.asarray(new_v[:, 0], dtype=np.float32))

    # ---- VAE ----------------------------------------------------------------------------------
    # Caches travel by name (cache_00 in, new_cache_00 out): a first-step graph may lack some cache
    # inputs (the first encoder chunk never reads the temporal downsampler's cache, and the exporter
    # drops inputs that nothing reads), so positions differ between the first and later graphs.
    def _zero_caches(self, graph: _Graph) -> dict[str, np.ndarray]:
        return {s["name"]: np.zeros(s["shape"], _NP_DTYPES[s["dtype"]]) for s in graph.entry["inputs"][1:]}

    def _vae_call(self, graph: _Graph, name: str, x: np.ndarray, caches: dict[str, np.ndarray]):
        """(pixels or mu, caches for the next step) of one VAE graph call."""
        feeds = {name: np.ascontiguousarray(x, dtype=np.float32)}
        feeds.update({s["name"]: caches[s["name"]] for s in graph.entry["inputs"][1:]})
        out, *new = self._run(graph, feeds)
        names = [o["name"] for o in graph.entry["outputs"][1:]]
        return out, {n[len("new_"):]: value for n, value in zip(names, new)}

    def vae_encode(self, pixels: np.ndarray) -> np.ndarray:
        """Pixels [3, T, H, W] in [-1, 1] (T = 1 + 4k) -> raw VAE mean [16, F, H/8, W/8]."""
        _, frames, height, width = pixels.shape
        if frames % 4 != 1:
            raise ValueError(f"the VAE encodes 1 + 4k frames, got {frames}")
        first = self._graph("vae_encode_first", height=height, width=width)
        step = self._graph("vae_encode_step", height=height, width=width)
        mu, caches = self._vae_call(first, "pixels", pixels[None, :, :1], self._zero_caches(first))
        out = [mu]
        for start in range(1, frames, 4):
            mu, caches = self._vae_call(step, "pixels", pixels[None, :, start:start + 4], caches)
            out.append(mu)
        return np.concatenate(out, axis=2)[0]

    def vae_decode(self, mu: np.ndarray) -> np.ndarray:
        """Raw latents [16, F, h, w] -> pixels [3, 1 + 4(F - 1), H, W] (streamed: equals a whole decode)."""
        decoder = self.streaming_decoder()
        return np.concatenate([decoder.decode_next(mu[:, i:i + 1]) for i in range(mu.shape[1])], axis=1)

    def streaming_decoder(self) -> StreamingDecoder:
        return OnnxRuntimeStreamingDecoder(self)


__all__ = ["OnnxRuntimeBackend", "OnnxRuntimeStreamingDecoder", "OrtPrompt", "PromptTokenizer", "clean_prompt",
           "export_folder_spec", "is_export_folder", "read_manifest", "rope_cos_sin", "session_providers",
           "timestep_sinusoid"]
