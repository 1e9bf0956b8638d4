"""The captioner's engines under TensorRT: a CaptionerBackend (runtime/captioner.py) for an engine
folder built by `skyrt export engine --onnx <captioner export> --out DIR`.

    vision            pixel patches + rotary / window tables -> features
    decoder_prefill   the prompt's embeddings, no past      -> logits + present K/V (kept on the GPU)
    decoder_decode    one token's embedding + past K/V       -> logits + present K/V (kept on the GPU)

Every engine manifest is checked (TensorRT version, builder, ONNX hash, file size) before the GPU
is touched, and again against the GPU's compute capability once it is. The K/V cache never leaves
the device between tokens: only the logits of the last position come back.

NOT EXECUTED in skyrt's CI (no GPU there): the folder and manifest checks are tested; the engine
runs are what `benchmarks/gpu_validate.py --sections captioner` checks against onnxruntime on a GPU.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from ..engine_manifest import ENGINE_MANIFEST_SUFFIX, EngineManifest, check_engine, check_engine_size, read_engine_bytes

CAPTIONER_ENGINES = ("vision", "decoder_prefill", "decoder_decode")
ONNX_MANIFEST_COPY = "onnx_manifest.json"


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
    without a GPU), keyed like the DiT's: ONNX hashes, builder and version, targets, options."""
    from skyrt.export.engine import BuildOptions, build_targets, import_builder, pick_builder

    from .tensorrt_backend import ENGINE_CACHE, build_engine_folder, engine_cache_key

    builder = pick_builder(builder)
    trt = import_builder(builder)
    options = BuildOptions(builder=builder)
    options = BuildOptions(builder=builder, compute_capabilities=build_targets(options))
    manifest = json.loads((Path(onnx_dir) / "manifest.json").read_text())
    key = engine_cache_key(manifest, options, trt.__version__)
    target = Path(cache_root) / ENGINE_CACHE / f"{builder}-{trt.__version__}" / f"captioner-{key}"
    return build_engine_folder(Path(onnx_dir), target, options, progress=progress)


class TrtCaptionerBackend:
    """CaptionerBackend on TensorRT engines; the decoder's K/V cache is a list of DeviceArrays."""

    def __init__(self, engine_dir: str | Path, builder: str = "auto"):
        from skyrt.export.engine import import_builder  # torch-free

        from ..cuda_mem import Stream, compute_capability
        from .tensorrt_backend import TrtEngine

        self.dir = Path(engine_dir)
        self.manifest, engines, builder = read_captioner_engines(self.dir, builder)
        trt = import_builder(builder)
        for manifest in engines.values():  # before the GPU: version and builder
            check_engine(manifest, builder=builder, builder_version=trt.__version__, gpu_compute_capability=None)
        self.stream = Stream()  # a clear CudaError on a machine without a GPU
        gpu = compute_capability()
        for manifest in engines.values():
            check_engine(manifest, builder=builder, builder_version=trt.__version__, gpu_compute_capability=gpu)
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))

        def load(name: str) -> Any:
            path = self.dir / engines[name].engine_file
            return TrtEngine(trt, runtime, read_engine_bytes(engines[name], path), path, self.stream)

        self.vision_engine, self.prefill_engine, self.decode_engine = map(load, CAPTIONER_ENGINES)
        cfg = self.manifest["captioner"]
        self.num_layers = cfg["num_layers"]
        self.kv_shape = (1, cfg["num_kv_heads"], 0, cfg["head_dim"])
        self.dtype = np.float16 if self.manifest["precision"] == "fp16" else np.float32
        self.present_names = [n for i in range(self.num_layers) for n in (f"present_key_{i}", f"present_value_{i}")]

    def vision(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        engine = self.vision_engine
        outputs = engine.run({k: v for k, v in feeds.items() if k in engine.inputs})
        return outputs[engine.outputs.index("features")]

    def empty_cache(self) -> list:
        """Zero-length past K/V (host arrays: the prefill profile's past axis is 0)."""
        return [np.zeros(self.kv_shape, dtype=self.dtype) for _ in range(2 * self.num_layers)]

    def decoder(self, embeds: np.ndarray, position_ids: np.ndarray, cache: list):
        """Prefill when there is no past, else one decode step; presents stay on the device."""
        engine = self.prefill_engine if cache[0].shape[2] == 0 else self.decode_engine
        feeds: dict[str, Any] = {"inputs_embeds": embeds.astype(self.dtype, copy=False), "position_ids": position_ids}
        for i in range(self.num_layers):
            feeds[f"past_key_{i}"], feeds[f"past_value_{i}"] = cache[2 * i], cache[2 * i + 1]
        outputs = dict(zip(engine.outputs, engine.run(feeds, keep_on_device=self.present_names)))
        for old in cache:  # the previous step's device copies are no longer needed
            free = getattr(old, "free", None)
            if free is not None:
                free()
        return outputs["logits"], [outputs[name] for name in self.present_names]
