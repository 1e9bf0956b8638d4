"""The captioner's engines under TensorRT: a CaptionerBackend (captioner/decoding.py) for an engine
folder built by `skyrt export engine --onnx <captioner export> --out DIR`, or for a captioner export
whose engines are built into the cache on first use (as the DiT backend does).

    vision            pixel patches + rotary / window tables -> features
    decoder_prefill   the prompt's embeddings, no past      -> logits + present K/V (kept on the GPU)
    decoder_decode    one token's embedding + past K/V       -> logits + present K/V (kept on the GPU)

Every engine manifest is checked (TensorRT version, builder, ONNX hash, file size) before the GPU
is touched, and again against the GPU's compute capability once it is. The K/V cache never leaves
the device: two K/V sets sized for the decoder profiles' longest sequence are allocated once, and
each decoder call reads its past from one and writes its presents into the other (ping-pong), so a
token costs no allocation and no copy; only the last position's logits come back.

The vision engine takes exactly the video size fixed at export (its profile pins every axis):
other sizes and still images are refused with that size named; onnxruntime takes any size.

NOT EXECUTED in skyrt's CI (no GPU there): the folder and manifest checks, the builds, the profile
checks and the ping-pong bookkeeping (with stand-in engines) are tested; the engine runs are what
`benchmarks/gpu_validate.py --sections captioner` checks against onnxruntime on a GPU.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from ..engine_manifest import ENGINE_MANIFEST_SUFFIX, EngineManifest, check_engine, check_engine_size, read_engine_bytes
from .config import is_captioner_export

CAPTIONER_ENGINES = ("vision", "decoder_prefill", "decoder_decode")
ONNX_MANIFEST_COPY = "onnx_manifest.json"
CACHE_PREFIX = "captioner-"  # captioner engine folders in the engine cache: captioner-<key>


def is_captioner_engine_folder(path: str | Path) -> bool:
    """An engine folder whose ONNX manifest copy is a captioner export."""
    copy = Path(path) / ONNX_MANIFEST_COPY
    if not copy.is_file():
        return False
    return "captioner" in json.loads(copy.read_text())


def read_captioner_engines(folder: Path, builder: str = "auto") -> tuple[dict, dict[str, EngineManifest], str]:
    """(ONNX manifest copy, engine manifests by graph name, builder) of a captioner engine folder, with
    every refusal that needs no GPU: missing engines, mixed or wrong builders, wrong sizes."""
    folder = Path(folder)
    if not is_captioner_engine_folder(folder):
        raise FileNotFoundError(f"{folder} is not a captioner engine folder (needs {ONNX_MANIFEST_COPY} of a captioner "
                                "export): skyrt export engine --onnx CAPTIONER_ONNX_DIR --out " + str(folder))
    onnx_manifest = json.loads((folder / ONNX_MANIFEST_COPY).read_text())
    engines = {m.name: m for m in map(EngineManifest.read, sorted(folder.glob(f"*{ENGINE_MANIFEST_SUFFIX}")))}
    missing = [name for name in CAPTIONER_ENGINES if name not in engines]
    if missing:
        raise FileNotFoundError(f"{folder} lacks the {', '.join(missing)} engine(s): rebuild with skyrt export engine "
                                f"--onnx CAPTIONER_ONNX_DIR --out {folder}")
    builders = {engines[name].builder for name in CAPTIONER_ENGINES}
    if builder == "auto":
        if len(builders) != 1:
            raise ValueError(f"{folder} mixes engines from {sorted(builders)}; rebuild them with one builder")
        builder = builders.pop()
    for name in CAPTIONER_ENGINES:
        manifest = engines[name]
        entry = onnx_manifest["graphs"][name]
        if manifest.onnx_sha256 != entry["sha256"][entry["file"]]:
            raise ValueError(f"engine {manifest.engine_file} was built from another export of {name}; rebuild it: "
                             f"{manifest.rebuild}")
        check_engine_size(manifest, folder / manifest.engine_file)
    return onnx_manifest, engines, builder


def captioner_engines_for(onnx_dir: Path, cache_root: Path, builder: str = "auto", progress: bool = True) -> Path:
    """The cached engine folder of a captioner ONNX export, built on first use (TensorRT-RTX builds
    without a GPU), keyed and built exactly like the DiT's (artifact_cache.cached_engine_folder)."""
    from ..artifact_cache import cached_engine_folder, engine_build_options

    options, trt = engine_build_options(builder, Path(cache_root))
    return cached_engine_folder(Path(onnx_dir), Path(cache_root), options, trt.__version__, prefix=CACHE_PREFIX,
                                progress=progress)


def captioner_engine_folder(path: str | Path, cache_root: Path, builder: str = "auto", progress: bool = True) -> Path:
    """An engine folder as given, or the cached engines of a captioner export (built on first use);
    anything else is refused with what was expected."""
    path = Path(path).expanduser()
    if is_captioner_engine_folder(path):
        return path
    if is_captioner_export(path):
        return captioner_engines_for(path, cache_root, builder, progress)
    raise FileNotFoundError(f"{path} is neither a captioner engine folder (skyrt export engine --onnx "
                            "CAPTIONER_ONNX_DIR --out DIR) nor a captioner export (skyrt export onnx --captioner "
                            "CHECKPOINT --out DIR); open_captioner(CHECKPOINT, backend='tensorrt') does both")


# ------------------------------------------------------------------------------------------------
# Shapes: what the engines' profiles take


def profile_violations(profile: Mapping[str, list], shapes: Mapping[str, tuple[int, ...]]) -> list[str]:
    """Inputs whose shape lies outside an engine's (min, opt, max) profile, each as 'name shape not
    within min..max'; inputs without a profile entry (static) are not checked here."""
    bad = []
    for name, shape in shapes.items():
        if name not in profile:
            continue
        low, _, high = (tuple(int(d) for d in s) for s in profile[name])
        shape = tuple(int(d) for d in shape)
        if len(shape) != len(low) or any(not lo <= d <= hi for d, lo, hi in zip(shape, low, high)):
            bad.append(f"{name} {list(shape)} not within {list(low)}..{list(high)}")
    return bad


def check_vision_shapes(manifest: EngineManifest, onnx_entry: dict, feeds: Mapping[str, Any]) -> None:
    """Refuse vision inputs of another size than the export's, saying which size the engine takes."""
    bad = profile_violations(manifest.profile, {k: tuple(v.shape) for k, v in feeds.items()})
    if bad:
        raise ValueError(f"the vision engine takes only the video size fixed at export: grid (t, h, w) "
                         f"{onnx_entry.get('grid_thw')} = {onnx_entry.get('num_frames')} frames read at "
                         f"{onnx_entry.get('frame_size')} (height, width); got {'; '.join(bad)}. Caption videos with "
                         "the default frame sampling, or use backend='onnxruntime' for images and other sizes")


def kv_capacity(engines: Mapping[str, EngineManifest]) -> int:
    """The most tokens the decoder engines can hold: the prefill profile's longest prompt, or the
    decode profile's longest past plus its one new token."""
    prefill = engines["decoder_prefill"].profile["inputs_embeds"][2][1]
    decode = engines["decoder_decode"].profile
    decode = decode["past_key_0"][2][2] + decode["inputs_embeds"][2][1]
    return int(max(prefill, decode))


# ------------------------------------------------------------------------------------------------
# The K/V cache on the device


@dataclass(frozen=True)
class TrtKVCache:
    """Where a sequence's K/V lives: which of the two K/V sets, how many tokens, and the decoder call
    that wrote it (`serial`): a later call overwrites the other set, so only the newest cache is valid."""

    slot: int
    tokens: int
    serial: int


class KVPingPong:
    """Two K/V sets on the device, each one buffer of 2 * layers regions of [1, kv_heads, capacity,
    head_dim]; region 2i holds layer i's keys, 2i + 1 its values, the first `tokens` positions
    contiguous (the layout TensorRT writes a [1, kv_heads, tokens, head_dim] present in)."""

    def __init__(self, bases: tuple[Any, Any], layers: int, kv_heads: int, capacity: int, head_dim: int, dtype):
        """bases: two DeviceArrays of at least `set_bytes(...)` bytes each (owned by the caller)."""
        self.bases, self.layers, self.kv_heads = bases, layers, kv_heads
        self.capacity, self.head_dim, self.dtype = capacity, head_dim, np.dtype(dtype)
        self.region_bytes = kv_heads * capacity * head_dim * self.dtype.itemsize

    @staticmethod
    def set_bytes(layers: int, kv_heads: int, capacity: int, head_dim: int, dtype) -> int:
        return 2 * layers * kv_heads * capacity * head_dim * np.dtype(dtype).itemsize

    def views(self, slot: int, tokens: int) -> list:
        """The 2 * layers [1, kv_heads, tokens, head_dim] arrays of set `slot` (views: never freed)."""
        from ..cuda_mem import DeviceArray

        if not 0 <= tokens <= self.capacity:
            raise ValueError(f"{tokens} tokens do not fit the decoder engines' {self.capacity}-token K/V cache "
                             "(the export's max_total_tokens); shorten max_new_tokens or export with a larger limit")
        base = self.bases[slot].ptr
        shape = (1, self.kv_heads, tokens, self.head_dim)
        return [DeviceArray(shape, self.dtype, base + i * self.region_bytes) for i in range(2 * self.layers)]


# ------------------------------------------------------------------------------------------------
# The backend


class TrtCaptionerBackend:
    """CaptionerBackend on TensorRT engines (module docstring): engine_dir is an engine folder; see
    `captioner_engine_folder` for an export folder. Opens the GPU (a clear CudaError without one)."""

    def __init__(self, engine_dir: str | Path, builder: str = "auto"):
        from ..backends.tensorrt_backend import TrtEngine
        from ..cuda_mem import DeviceArray, Stream, compute_capability
        from ..registry import resolve

        self.dir = Path(engine_dir)
        onnx_manifest, manifests, builder = read_captioner_engines(self.dir, builder)
        trt = resolve("engine:import_builder")(builder)  # export code, torch-free, reached by name
        for manifest in manifests.values():  # before the GPU: version and builder
            check_engine(manifest, builder=builder, builder_version=trt.__version__, gpu_compute_capability=None)
        self.stream = Stream()  # a clear CudaError on a machine without a GPU
        gpu = compute_capability()
        for manifest in manifests.values():
            check_engine(manifest, builder=builder, builder_version=trt.__version__, gpu_compute_capability=gpu)
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))

        def load(name: str) -> Any:
            path = self.dir / manifests[name].engine_file
            return TrtEngine.deserialize(trt, runtime, read_engine_bytes(manifests[name], path), path, self.stream.handle,
                                         "cuda:0")

        engines = {name: load(name) for name in CAPTIONER_ENGINES}
        cfg = onnx_manifest["captioner"]
        dtype = engines["decoder_decode"].dtypes["present_key_0"]
        size = KVPingPong.set_bytes(cfg["num_layers"], cfg["num_kv_heads"], kv_capacity(manifests), cfg["head_dim"],
                                    dtype)
        bases = (DeviceArray.empty((size,), np.uint8), DeviceArray.empty((size,), np.uint8))
        self._wire(engines, manifests, onnx_manifest, bases, dtype)

    def _wire(self, engines: Mapping[str, Any], manifests: Mapping[str, EngineManifest], onnx_manifest: dict,
              bases: tuple[Any, Any], dtype) -> None:
        """Everything after the GPU is open (kept apart so tests drive it with stand-in engines)."""
        cfg = onnx_manifest["captioner"]
        self.engines, self.manifests, self.onnx_manifest = dict(engines), dict(manifests), onnx_manifest
        self.num_layers = cfg["num_layers"]
        self.kv = KVPingPong(bases, cfg["num_layers"], cfg["num_kv_heads"], kv_capacity(manifests), cfg["head_dim"],
                             dtype)
        self.dtype = np.dtype(dtype)
        self.past_names = [n for i in range(self.num_layers) for n in (f"past_key_{i}", f"past_value_{i}")]
        self.present_names = [n for i in range(self.num_layers) for n in (f"present_key_{i}", f"present_value_{i}")]
        self._serial = 0

    def vision(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        engine = self.engines["vision"]
        feeds = {k: v for k, v in feeds.items() if k in engine.inputs}
        check_vision_shapes(self.manifests["vision"], self.onnx_manifest["graphs"]["vision"], feeds)
        outputs = engine.run(feeds)
        return outputs[engine.outputs.index("features")]

    def empty_cache(self) -> TrtKVCache:
        return TrtKVCache(slot=0, tokens=0, serial=self._serial)

    def decoder(self, embeds: np.ndarray, position_ids: np.ndarray, cache: TrtKVCache):
        """Prefill when the cache is empty, else a decode step: past K/V read from one set, presents
        written into the other; returns the last logits (host) and the cache now in the other set."""
        if cache.tokens and cache.serial != self._serial:
            raise ValueError("this K/V cache was overwritten by a later decoder call: the TensorRT captioner keeps "
                             "one sequence at a time; continue from the cache the last call returned")
        name = "decoder_prefill" if cache.tokens == 0 else "decoder_decode"
        engine = self.engines[name]
        total = cache.tokens + int(embeds.shape[1])
        feeds: dict[str, Any] = {"inputs_embeds": embeds.astype(self.dtype, copy=False), "position_ids": position_ids}
        feeds.update(zip(self.past_names, self.kv.views(cache.slot, cache.tokens)))
        presents = dict(zip(self.present_names, self.kv.views(1 - cache.slot, total)))
        bad = profile_violations(self.manifests[name].profile, {k: tuple(v.shape) for k, v in feeds.items()})
        if bad:
            raise ValueError(f"the {name} engine cannot take {'; '.join(bad)} (its profile is fixed at export: "
                             "max_prompt_tokens, max_total_tokens)")
        outputs = dict(zip(engine.outputs, engine.run(feeds, out=presents)))
        self._serial += 1
        return outputs["logits"], TrtKVCache(slot=1 - cache.slot, tokens=total, serial=self._serial)
