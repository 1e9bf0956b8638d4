"""What every backend that runs skyrt's exported graphs shares, torch-free: onnxruntime and TensorRT.

- Export folders and their manifest (export/onnx_export.py writes them): which graph serves which
  static shapes; a model folder's graphs are exported on demand into the cache (runtime/
  artifact_cache.py: a subprocess imports torch, never this process).
- Host-side inputs: the time sinusoid and RoPE tables (runtime/rope.py, the one definition) and the
  tokenizer (`tokenizers` reading tokenizer.json, the official prompt cleaning).
- `ExportedGraphBackend`: text encoder and VAE in terms of one `_run(graph, feeds)` that each backend
  implements (onnxruntime sessions, TensorRT engines). Neither backend subclasses the other; both
  subclass this.
- `GraphKVStreamSession`: the backend's one DiT entry, a stream session's step on the rollout core's
  buffers, for every mode: dit_step against the ring (runtime/kvcache.py), or a window graph, the same
  step with no cache inputs (window mode, runtime/pipeline.py). Every graph input and output is a
  skyrt._core.Buffer bound by address, allocated once per stream (t_emb, RoPE tables, slot validity,
  fps, the prompt K/V slots), the core's own buffers (latents, velocity, new K/V, the ring) bound
  directly; cond and uncond run as one batch-2 call. A backend supplies `_run_bound(graph, inputs,
  outputs, cache)`; the session never allocates after warm-up.

Semantics are the torch backend's (export/torch_backend.py); tests/test_onnxruntime_backend.py
compares whole rollouts, tests/test_graph_sessions.py the buffer discipline.
"""
from __future__ import annotations

import abc
import hashlib
import json
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from ..latents import PATCH_SPATIAL as PATCH, SPATIAL_FACTOR as SPATIAL, TEMPORAL_FACTOR
from ..prompt import clean_prompt
from ..rope import rope_cos_sin, timestep_sinusoid
from .. import artifact_cache
from .bound_decoders import BoundStreamingDecoder, BoundTinyStreamingDecoder
from .graph_files import NP_DTYPES, GraphFile
from .base import Backend, KVStepCall, KVStreamSession, KVStreamSpec, ModelSpec, StreamingDecoder, TextContext

MANIFEST = "manifest.json"
FORMAT = "skyrt-onnx"
# Which graphs an exporting backend makes together (export/onnx_export.py GRAPH_GROUPS).
GROUP_OF = {"text_encoder": "text", "cross_kv": "text", "dit_window": "window", "dit_window_causal": "window_causal",
            "dit_step": "step", "dit_step_full": "step_full", "vae_decode_first": "vae", "vae_decode_step": "vae", "vae_encode_first": "vae",
            "vae_encode_step": "vae"}
GROUP_GRAPHS = {g: tuple(k for k, v in GROUP_OF.items() if v == g) for g in set(GROUP_OF.values())}
# Bumped when the exporter writes different graphs for a group, so cached exports are made again:
# step 2 = dit_step's export formulation plus its ORT-CPU variant (export/onnx_export.py); window 2 =
# the window graphs traced from the step (CachedStep with no cache) plus their ORT-CPU variants.
GROUP_REVISION = {"step": 2, "window": 2, "window_causal": 2}


# ----------------------------------------------------------------------------------------------
# Tokenizer (no transformers): tokenizer.json + the official prompt cleaning


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


# ----------------------------------------------------------------------------------------------
# The shared backend


class ExportedGraphBackend(Backend):
    """Text encoder, VAE and the DiT stream session (every mode) of an exported-graph backend.

    A subclass sets (in __init__) source, precision, export_options, progress, cache_root and
    model_hash (model folders), _folders, _manifests, _tokenizer, then calls _read_dit_layout and
    _choose_decoder, and implements _add_folder, _run and _run_bound."""

    # ---- what a subclass implements ------------------------------------------------------------
    @abc.abstractmethod
    def _add_folder(self, folder: Path) -> None:
        """Read an export (or engine) folder's manifest into _folders / _manifests, refusing what this
        backend cannot run."""

    @abc.abstractmethod
    def _run(self, graph: "GraphFile", feeds: dict) -> list:
        """Run a graph on host arrays (or values this backend keeps on its device); outputs in
        manifest order as host numpy arrays."""

    @abc.abstractmethod
    def _run_bound(self, graph: "GraphFile", inputs: Mapping[str, Any], outputs: Mapping[str, Any], cache: dict,
                   key: tuple) -> None:
        """Run a graph reading `inputs` and writing `outputs` (skyrt._core.Buffers, by address; shapes
        as given). `cache` is the calling session's, for what may be prepared once per `key` and
        reused while the session lives (I/O bindings, CUDA graphs); the session releases it."""

    def memory_device(self) -> str:
        """Where this backend's graphs read and write ("cpu", "cuda:N"): the rollout core's device."""
        return "cpu"

    def stream_handle(self) -> int:
        """The CUDA stream the core's kernels share with this backend (0: the default, or none)."""
        return 0

    def synchronize(self) -> None:
        """Wait until the core's work is done before another stream reads it (a no-op on one stream)."""

    # ---- the decoder: the Wan2.1 VAE graphs, or the tiny decoder's step graph ---------------------
    _tiny = None  # a TinyDecoderSource when decoder="tiny"

    def _choose_decoder(self, decoder: str, decoder_path, model_folder, cache_dir, progress: bool) -> None:
        """decoder: "wan" (the exported Wan2.1 VAE graphs) or "tiny" (TAEHV's taew2_1 step graph,
        runtime/backends/bound_decoders.py): decoder_path is its weights file (exported on first use) or an
        export folder of it, else the model folder's taew2_1 file. Encoding stays the Wan2.1 VAE's."""
        if decoder == "tiny":
            from ..tiny_decoder import TinyDecoderSource

            self._tiny = TinyDecoderSource(decoder_path, model_folder, cache_dir, progress)
        elif decoder != "wan" or decoder_path is not None:
            raise ValueError(f"decoder={decoder!r}, decoder_path={decoder_path!r}: decoder_path needs decoder='tiny'")

    def tiny_decoder_folder(self, latent_h: int, latent_w: int) -> Path:
        """The folder of the tiny decoder's step graph for latents h x w (its tiny_decoder.json names the
        graph and its I/O): here the ONNX export; a backend that runs something else (engines) overrides."""
        return self._tiny.folder_for(latent_h, latent_w)

    def streaming_decoder(self) -> StreamingDecoder:
        """A fresh streaming decoder on bound buffers: the tiny decoder's, or the Wan2.1 VAE's."""
        if self._tiny is not None:

            return BoundTinyStreamingDecoder(self, self._tiny)
        return BoundStreamingDecoder(self)

    def _read_dit_layout(self, cfg: dict) -> None:
        """What the host side needs from the DiT config (official config.json names)."""
        self.num_layers, self.num_heads = int(cfg["num_layers"]), int(cfg["num_heads"])
        self.head_dim = int(cfg["dim"]) // self.num_heads
        self.freq_dim = int(cfg.get("freq_dim", 256))
        self.rope_max_positions = int(cfg.get("rope_max_positions", 1024))

    # ---- graphs and sessions ------------------------------------------------------------------
    def _find(self, name: str, needs: dict) -> GraphFile | None:
        for folder in self._folders:
            entry = self._manifests[folder]["graphs"].get(name)
            if entry is not None:
                graph = GraphFile(name, folder, entry)
                if graph.matches(needs):
                    return graph
        return None

    def _graph(self, name: str, **needs) -> GraphFile:
        """The graph `name` exported for the static shapes `needs` (exporting it first from a model folder)."""
        graph = self._find(name, needs)
        if graph is None and self.source is not None:
            self._add_folder(self._export_group(GROUP_OF[name], needs))
            graph = self._find(name, needs)
        if graph is None:
            have = [self._manifests[f]["graphs"][name].get("shape_config") for f in self._folders
                    if name in self._manifests[f]["graphs"]]
            flags = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in needs.items())
            preset = next((m["preset"]["name"] for m in self._manifests.values() if m.get("preset")), None)
            if preset is not None:  # a preset's export: its block is fixed, its ring is sink + window
                raise ValueError(
                    f"the {preset} export has no {name} graph for {needs} (it has: {have or 'none'}): its size and "
                    f"ring (sink + window blocks = cache_blocks) are baked in; request those, or export them with: "
                    f"skyrt export onnx --preset {preset} --model MODEL_DIR --out DIR --height H --width W "
                    "--sink-blocks S --window-blocks W")
            raise ValueError(
                f"the ONNX export has no {name} graph for {needs or 'this request'} (it has: {have or 'none'}); "
                f"export one with: skyrt export onnx --model MODEL_DIR --out DIR {flags}".rstrip())
        return graph

    # ---- exporting from a model folder --------------------------------------------------------
    def _export_group(self, group: str, needs: dict) -> Path:
        """Export the graphs of `group` for `needs` into the cache (once; a subprocess imports torch)."""
        graphs = GROUP_GRAPHS[group]
        settings = {"format": FORMAT, "group": group, "graphs": sorted(graphs), "needs": needs,
                    "precision": self.precision, "options": self.export_options}
        if group in GROUP_REVISION:
            settings["revision"] = GROUP_REVISION[group]
        options = {**self.export_options, **needs, "precision": self.precision}
        if group == "window_causal":
            options["window_attention"] = "causal"
        return artifact_cache.exported_graph_group(self.source, self.model_hash, self.cache_root, group, graphs,
                                                   settings, options, self.progress, is_export_folder)

    def _use_model_folder(self, path: Path, cache_dir: str | Path | None) -> None:
        """Graphs of model folder `path` are exported group by group on first use into the cache."""
        self.source = path
        self.cache_root = artifact_cache.cache_root(cache_dir)
        self.model_hash = artifact_cache.model_hash(path, self.cache_root)

    # ---- text ---------------------------------------------------------------------------------
    def _text_graph(self) -> GraphFile:
        return self._graph("text_encoder")

    def text_encoder_hash(self) -> str:
        """Identifies the text encoder for the text-embedding cache: the graph, tokenizer and text_len."""
        graph = self._text_graph()
        manifest = self._manifests[graph.folder]
        parts = [graph.entry["sha256"][graph.entry["file"]], manifest.get("tokenizer_sha256", ""),
                 str(manifest["model"]["text_encoder"]["text_len"]), self.name]
        return hashlib.sha256("|".join(parts).encode()).hexdigest()

    def context_from_array(self, array: np.ndarray) -> np.ndarray:
        """Contexts are host float32 arrays here."""
        return np.ascontiguousarray(array, dtype=np.float32)

    def run_text_encoder(self, prompt: str) -> TextContext:
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

    def kv_layout(self) -> tuple[int, int, int]:
        return self.num_layers, self.num_heads, self.head_dim

    # ---- VAE ----------------------------------------------------------------------------------
    # Caches travel by name (cache_00 in, new_cache_00 out): a first-step graph may lack some cache
    # inputs (the first encoder chunk never reads the temporal downsampler's cache, and the exporter
    # drops inputs that nothing reads), so positions differ between the first and later graphs.
    def _zero_caches(self, graph: GraphFile) -> dict[str, np.ndarray]:
        return {s["name"]: np.zeros(s["shape"], NP_DTYPES[s["dtype"]]) for s in graph.entry["inputs"][1:]}

    def _vae_call(self, graph: GraphFile, name: str, x: np.ndarray, caches: dict[str, np.ndarray]):
        """(pixels or mu, caches for the next step) of one VAE graph call."""
        feeds = {name: np.ascontiguousarray(x, dtype=np.float32)}
        feeds.update({s["name"]: caches[s["name"]] for s in graph.entry["inputs"][1:]})
        out, *new = self._run(graph, feeds)
        names = [o["name"] for o in graph.entry["outputs"][1:]]
        return out, {n[len("new_"):]: value for n, value in zip(names, new)}

    def vae_encode(self, pixels: np.ndarray) -> np.ndarray:
        """Pixels [3, T, H, W] in [-1, 1] (T = 1 + 4k) -> raw VAE mean [16, F, H/8, W/8]."""
        _, frames, height, width = pixels.shape
        if frames % TEMPORAL_FACTOR != 1:
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

    # ---- the DiT: one stream session, every mode ----------------------------------------------
    def open_kv_stream(self, spec: KVStreamSpec) -> KVStreamSession:
        return GraphKVStreamSession(self, spec)

    def dit_graph(self, spec: KVStreamSpec) -> GraphFile:
        """The DiT step graph of a stream: dit_step against a ring of spec.slots, or with no cache
        (spec.slots == 0, window mode) dit_window / dit_window_causal, the same step without cache inputs."""
        h, w = spec.latent_size
        size = dict(height=h * SPATIAL, width=w * SPATIAL)
        if spec.slots:
            return self._graph("dit_step", **size, block_frames=spec.causal_block_size, cache_blocks=spec.slots)
        if spec.block_causal:
            return self._graph("dit_window_causal", **size, block_frames=spec.causal_block_size)
        return self._graph("dit_window", **size)



# ----------------------------------------------------------------------------------------------
# The KV-cached stream on the rollout core's buffers


def graph_io_shape(spec: dict, sizes: Mapping[str, int]) -> list[int]:
    """A manifest input/output shape with its named (dynamic) axes filled from `sizes`."""
    try:
        return [int(sizes[d]) if isinstance(d, str) else int(d) for d in spec["shape"]]
    except KeyError as err:
        raise ValueError(f"{spec['name']}: no size for its axis {err} (have {dict(sizes)})") from None


def _io_spec(graph: "GraphFile", name: str, kind: str) -> dict:
    for spec in graph.entry[kind]:
        if spec["name"] == name:
            return spec
    raise ValueError(f"the {graph.name} graph has no {kind[:-1]} {name!r}; re-export it with this skyrt")


class GraphKVStreamSession(KVStreamSession):
    """One stream of an exported-graph backend, every mode: its DiT step graph (`dit_graph`: dit_step
    against the ring, or a window graph with no cache inputs) and cross_kv bound to Buffers.

    Allocated once, here, on the backend's memory device (skyrt._core.Buffer.allocate, counted by
    skyrt._core.memory_stats): t_emb [B * F_max * freq_dim], rope_cos / rope_sin [F_max * tokens *
    head_dim / 2], slot_valid [B * slots] (dit_step), fps [B] (fps models), the prompt contexts [B, Lt,
    text_dim] and the prompt K/V slots cross_k / cross_v [layers, B, Lt, heads, head_dim]. A step's
    inputs are the first elements of these shaped for its F frames (so one buffer serves every F), plus
    the core's latents_in (and cache_k, cache_v); its outputs are the core's velocity (and new_k, new_v).
    Per step only the small host inputs (t_emb, RoPE, slot validity) are copied up; nothing is allocated
    after the first step of each frame count (the backend prepares a binding or a CUDA graph once per F)."""

    def __init__(self, backend: ExportedGraphBackend, spec: KVStreamSpec):
        super().__init__(spec)
        from skyrt import _core

        self._core_mod = _core
        self.backend = backend
        h, w = spec.latent_size
        self.cached = spec.slots > 0  # False: window mode, a step with no cached context
        self.step_graph = backend.dit_graph(spec)
        self._full_graph: GraphFile | None = None  # dit_step_full, at the first call that needs it
        self.cross_graph = backend._graph("cross_kv")
        self.device, self.stream = backend.memory_device(), backend.stream_handle()
        if self.cached:
            self.kv_dtype = _io_spec(self.step_graph, "cache_k", "inputs")["dtype"]
        self._check_graph_io()
        self.tokens_per_frame = (h // PATCH) * (w // PATCH)
        B, f_max = spec.contexts, spec.max_frames
        context = _io_spec(self.cross_graph, "context", "inputs")
        self.context_shape = graph_io_shape(context, {"batch": B})  # [B, Lt, text_dim]
        cross = _io_spec(self.cross_graph, "cross_k", "outputs")
        self.cross_shape = graph_io_shape(cross, {"batch": B})  # [layers, B, Lt, heads, head_dim]
        self.buffers: dict[str, Any] = {}
        self._bindings: dict = {}  # the backend's per-key state (I/O bindings, CUDA graphs)
        try:
            alloc = self._allocate
            alloc("t_emb", [B * f_max * backend.freq_dim], "float32")
            alloc("rope_cos", [f_max * self.tokens_per_frame * (backend.head_dim // 2)], "float32")
            alloc("rope_sin", [f_max * self.tokens_per_frame * (backend.head_dim // 2)], "float32")
            if self.cached:
                alloc("slot_valid", [B * spec.slots], "bool")
            alloc("context", self.context_shape, "float32")
            alloc("cross_k", self.cross_shape, cross["dtype"])
            alloc("cross_v", self.cross_shape, cross["dtype"])
            if spec.fps_class is not None:
                alloc("fps", [B], "int64")
                _core.upload(self.buffers["fps"], np.full(B, spec.fps_class, np.int64), self.stream)
            # Host staging arrays, reused every step (host memory; nothing crosses per step but these).
            self._t_host = np.empty((B, f_max, backend.freq_dim), np.float32)
            self._valid_host = np.empty((B, spec.slots), np.bool_)
            self._context_host = np.empty(self.context_shape, np.float32)
        except BaseException:
            self.close()
            raise

    def _allocate(self, name: str, shape: list[int], dtype: str) -> None:
        self.buffers[name] = self._core_mod.Buffer.allocate(shape, dtype, self.device, True, self.stream)

    def _check_graph_io(self) -> None:
        """The step graph's inputs and outputs are the ones this session binds, by name, and the core
        keeps latents and velocity in float32 and new K/V in the ring's dtype: refuse a graph that would
        need other bindings or conversions (it comes from an export this runtime does not know)."""
        g, fix = self.step_graph, "re-export it with this skyrt (skyrt export onnx)"
        ring = ("cache_k", "cache_v", "slot_valid") if self.cached else ()
        fps = ("fps",) if self.spec.fps_class is not None else ()
        inputs = {"latents", "t_emb", "cross_k", "cross_v", "rope_cos", "rope_sin", *ring, *fps}
        outputs = {"velocity", *(("new_k", "new_v") if self.cached else ())}
        for kind, bound in (("inputs", inputs), ("outputs", outputs)):
            names = {spec["name"] for spec in g.entry[kind]}
            if names != bound:
                raise ValueError(f"the {g.name} graph's {kind} are {sorted(names)}, this stream binds "
                                 f"{sorted(bound)}: {fix}")
        wanted = {("inputs", "latents"): "float32", ("outputs", "velocity"): "float32"}
        if self.cached:
            wanted.update({("outputs", "new_k"): self.kv_dtype, ("outputs", "new_v"): self.kv_dtype,
                           ("inputs", "cache_v"): self.kv_dtype})
        for (kind, name), dtype in wanted.items():
            got = _io_spec(g, name, kind)["dtype"]
            if got != dtype:
                raise ValueError(f"the {g.name} graph's {name} is {got}, the rollout core needs {dtype}: {fix}")
        if self.kv_dtype not in ("float32", "float16"):
            raise ValueError(f"the dit_step graph's cache is {self.kv_dtype}; the rollout core keeps float32 or "
                             "float16 K/V (export with --precision fp16 or fp32)")

    def _shaped(self, name: str, shape: list[int]):
        return self.buffers[name].slice(shape, 0)

    # ---- prompts -------------------------------------------------------------------------------
    def set_prompts(self, contexts: list[TextContext]) -> None:
        """cross_kv of every context at once (batch B) into the prompt K/V slots."""
        if len(contexts) != self.spec.contexts:
            raise ValueError(f"{len(contexts)} prompt contexts for a stream of {self.spec.contexts}")
        for b, context in enumerate(contexts):
            self._context_host[b] = np.asarray(context.value, np.float32).reshape(self.context_shape[1:])
        core = self._core_mod
        core.upload(self.buffers["context"], self._context_host, self.stream)
        self.backend._run_bound(self.cross_graph, {"context": self.buffers["context"]},
                                {"cross_k": self.buffers["cross_k"], "cross_v": self.buffers["cross_v"]},
                                self._bindings, ("cross_kv",))

    # ---- one DiT step --------------------------------------------------------------------------
    def _graph_for(self, call: KVStepCall) -> GraphFile:
        """The step graph of a call: dit_step (block-causal in the stream's blocks, baked in), or
        dit_step_full (full attention among the call's frames: LongLive's recache chunk, Rolling-Forcing's
        window), looked up (exported from a model folder) at its first use."""
        block = self.spec.causal_block_size
        attention = call.causal_block_size or block
        if not self.cached or attention == block or call.frames <= block:  # window mode: its one graph  # one block: block-causal == full attention
            return self.step_graph
        if attention >= call.frames:
            if self._full_graph is None:
                h, w = self.spec.latent_size
                self._full_graph = self.backend._graph("dit_step_full", height=h * SPATIAL, width=w * SPATIAL,
                                                       block_frames=block, cache_blocks=self.spec.slots)
            return self._full_graph
        raise ValueError(f"a step of {call.frames} frames in attention blocks of {attention}: the exported graphs "
                         f"attend block-causally in blocks of {block} (dit_step) or fully (dit_step_full)")

    def step(self, call: KVStepCall) -> None:
        graph = self._graph_for(call)
        if call.want_kv and not self.cached:
            raise ValueError("a window step (no cached context) has no K/V to commit: want_kv needs a KV stream")
        backend, core, B, f = self.backend, self.core, self.spec.contexts, call.frames
        tokens = f * self.tokens_per_frame
        t_host = self._t_host[:, :f]
        t_host[:] = timestep_sinusoid(np.asarray(call.timesteps, np.float32), backend.freq_dim)[None]
        cos, sin = rope_cos_sin(backend.head_dim, int(call.position), f, *self._token_grid(),
                                backend.rope_max_positions)
        upload = self._core_mod.upload
        upload(self.buffers["t_emb"], np.ascontiguousarray(t_host), self.stream)
        upload(self.buffers["rope_cos"], cos, self.stream)
        upload(self.buffers["rope_sin"], sin, self.stream)
        inputs = {"latents": core.buffer("latents_in", f),
                  "t_emb": self._shaped("t_emb", [B, f, backend.freq_dim]),
                  "cross_k": self.buffers["cross_k"], "cross_v": self.buffers["cross_v"],
                  "rope_cos": self._shaped("rope_cos", [tokens, backend.head_dim // 2]),
                  "rope_sin": self._shaped("rope_sin", [tokens, backend.head_dim // 2])}
        if "fps" in self.buffers:
            inputs["fps"] = self.buffers["fps"]
        outputs = {"velocity": core.buffer("velocity", f)}
        if self.cached:
            self._bind_ring(call, inputs, outputs)
        backend.synchronize()
        backend._run_bound(graph, inputs, outputs, self._bindings, (graph.name, f))

    def _bind_ring(self, call: KVStepCall, inputs: dict, outputs: dict) -> None:
        """dit_step's extra I/O: the ring and its slot validity in, the step's new K/V out."""
        f, B = call.frames, self.spec.contexts
        self._valid_host[:] = np.asarray(call.slot_valid, np.bool_)[None]
        self._core_mod.upload(self.buffers["slot_valid"], self._valid_host, self.stream)
        inputs.update({"cache_k": self.core.buffer("cache_k"), "cache_v": self.core.buffer("cache_v"),
                       "slot_valid": self._shaped("slot_valid", [B, self.spec.slots])})
        outputs.update({"new_k": self.core.buffer("new_k", f), "new_v": self.core.buffer("new_v", f)})

    def _token_grid(self) -> tuple[int, int]:
        h, w = self.spec.latent_size
        return h // PATCH, w // PATCH

    # ---- lifetime ------------------------------------------------------------------------------
    def close(self) -> None:
        """Release the bindings / CUDA graphs and every buffer of this session now (idempotent)."""
        bindings, self._bindings = getattr(self, "_bindings", {}), {}
        for value in bindings.values():
            closer = getattr(value, "close", None)
            if closer is not None:
                closer()
        for buffer in getattr(self, "buffers", {}).values():
            buffer.close()
        self.buffers = {}
        super().close()
