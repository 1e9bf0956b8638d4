"""Build TensorRT / TensorRT-RTX engines from skyrt's ONNX graphs, each with a JSON manifest.

    skyrt export engine --onnx DIR --out DIR --builder tensorrt-rtx      # no GPU needed
    skyrt export engine --onnx DIR --out DIR --builder tensorrt          # on the GPU that will run it

Both builders share one API (`tensorrt` and `tensorrt_rtx` modules). What differs, and why:
- TensorRT-RTX compiles ahead of time for the compute capabilities it is told (Turing to Blackwell
  RTX parts) and builds without a GPU; TensorRT builds for the GPU it runs on and needs one.
- TensorRT 10.12+/11 networks here are strongly typed: precision comes from the ONNX graph (export
  fp16/bf16 graphs); there are no builder precision flags to set.
- The timing cache matters to TensorRT (minutes saved on rebuilds); TensorRT-RTX ignores it.
- FP8 graphs (export/quantize.py Q/DQ) build only for compute capability 8.9+ (FP8 GEMMs: Ada,
  Blackwell): an fp8 graph's targets are those of the asked ones (FP8_COMPUTE_CAPABILITIES by default).

Every engine gets `<name>.engine.json`: the ONNX file's sha256, the export config and precision
from the ONNX manifest, the optimization profile, the builder's name and version, the compute
capabilities it targets, and the engine file's size and sha256. `skyrt.runtime.engine_manifest`
refuses an engine whose manifest does not match the running TensorRT or GPU, or whose file is
corrupted, and prints the command that rebuilds it.

This module imports no torch: it runs wherever the TensorRT wheel does.
"""
from __future__ import annotations

import hashlib
import importlib
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterable, Sequence

from skyrt.runtime.engine_manifest import (BUILDERS, ENGINE_MANIFEST_SUFFIX, ONNX_MANIFEST_COPY, EngineManifest,
                                           file_sha256, rebuild_command)

# Compute capabilities TensorRT-RTX builds for by default: RTX 30xx to 50xx (Ampere, Ada,
# Blackwell) and the workstation parts of those generations; SM80 (A100) is a datacenter part, but
# harmless. Turing (7.5, RTX 20xx) is in TensorRT-RTX's ComputeCapability enum and can be asked for,
# but TensorRT-RTX 1.7 cannot compile fp32 (or bf16) GEMMs for it ("FP32 GEMM is not supported"),
# and every skyrt export keeps fp32 matmuls (umT5, VAE, time embedding): seen here on all 9 graphs
# in fp32 and bf16 and 8 of 9 in fp16, so a default that included it failed every build.
RTX_COMPUTE_CAPABILITIES = ("8.0", "8.6", "8.9", "12.0")
# FP8 (E4M3) is a GEMM type of Ada (8.9) and later only: TensorRT-RTX 1.7 refuses a graph with FP8
# Q/DQ for other targets ("Cannot compile for target(s) sm80, sm86, because the model contains
# HW-specific datatypes: fp8_e4m3"), so fp8 graphs get these targets (of the ones asked).
FP8_COMPUTE_CAPABILITIES = ("8.9", "12.0")
TIMING_CACHE_FILE = "timing.cache"


class EngineBuildError(RuntimeError):
    """An ONNX graph that TensorRT could not parse or build; the message carries TensorRT's errors."""


@dataclass(frozen=True)
class GraphSpec:
    """One ONNX graph to build: its file and, for dynamic inputs, the optimization profile.

    profile: input name -> (min, opt, max) shapes; static inputs need no entry.
    """

    name: str
    onnx_path: Path
    profile: dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]] = field(default_factory=dict)
    export_config: dict[str, Any] = field(default_factory=dict)
    precision: str = "fp32"


@dataclass(frozen=True)
class BuildOptions:
    """Builder knobs. `compute_capabilities` only applies to TensorRT-RTX (None = all RTX targets)."""

    builder: str = "tensorrt-rtx"
    optimization_level: int = 3  # TensorRT's default; 5 searches longer for faster kernels
    workspace_gib: float | None = None  # cap on the builder's scratch memory (None = TensorRT decides)
    compute_capabilities: Sequence[str] | None = None
    timing_cache: Path | None = None  # TensorRT only; default <out>/timing.cache


def import_builder(builder: str):
    """The TensorRT module of `builder`, or an error that names the pip package to install."""
    if builder not in BUILDERS:
        raise ValueError(f"builder must be one of {', '.join(BUILDERS)}, got {builder!r}")
    module = BUILDERS[builder]["module"]
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ImportError(
            f"the {builder} builder needs the '{module}' module: pip install \"skyrt[{builder}]\" "
            f"({BUILDERS[builder]['note']})"
        ) from err


def pick_builder(choice: str = "auto") -> str:
    """'auto' -> standard TensorRT when its module imports (it builds for the GPU at hand, with the
    timing cache), else TensorRT-RTX (no GPU needed to build); a named builder is returned as is."""
    if choice != "auto":
        if choice not in BUILDERS:
            raise ValueError(f"builder must be 'auto' or one of {', '.join(BUILDERS)}, got {choice!r}")
        return choice
    try:
        importlib.import_module(BUILDERS["tensorrt"]["module"])
    except ImportError:
        return "tensorrt-rtx"
    return "tensorrt"


def build_targets(options: BuildOptions, precision: str | None = None) -> list[str]:
    """The compute capabilities an engine built with `options` runs on: TensorRT-RTX compiles for the
    ones asked (default: every RTX generation; for an fp8 graph those of 8.9 and later, default
    FP8_COMPUTE_CAPABILITIES); TensorRT for the GPU it builds on ('current' when that cannot be read)."""
    if options.builder != "tensorrt-rtx":
        return [gpu_compute_capability() or "current"]
    if precision != "fp8":
        return list(options.compute_capabilities or RTX_COMPUTE_CAPABILITIES)
    asked = list(options.compute_capabilities or FP8_COMPUTE_CAPABILITIES)
    fp8 = [cc for cc in asked if _cc_tuple(cc) >= (8, 9)]
    if not fp8:
        raise ValueError(f"fp8 engines need compute capability 8.9 or later (FP8 GEMMs: Ada, Blackwell); asked for "
                         f"{', '.join(asked)}: add --compute-capability 8.9 (or 12.0), or export fp16")
    return fp8


def _cc_tuple(cc: str) -> tuple[int, int]:
    major, _, minor = str(cc).partition(".")
    return int(major), int(minor or 0)


def first_use_build_options(builder: str, timing_dir: Path, compute_capabilities: Sequence[str] | None = None,
                            optimization_level: int = 3) -> tuple[BuildOptions, Any]:
    """(BuildOptions, builder module) for engines built on first use into skyrt's cache (runtime/
    artifact_cache.py): `builder` picked ('auto' as pick_builder), the targets fixed (they are part
    of the cache key), standard TensorRT's timing cache at timing_dir/timing-<version>.cache (one per
    version, shared by every build)."""
    builder = pick_builder(builder)
    trt = import_builder(builder)
    # TensorRT-RTX default: every RTX target, not just the GPU present. Measured here: the
    # tiny model's 9 engines take 6.9 s and 44.72 MB for 4 targets vs 6.8 s and 44.71 MB for one,
    # so portability is free and one cache entry serves any RTX GPU.
    timing = Path(timing_dir) / f"timing-{trt.__version__}.cache" if builder == "tensorrt" else None
    options = BuildOptions(builder=builder, optimization_level=optimization_level,
                           compute_capabilities=list(compute_capabilities) if compute_capabilities else None,
                           timing_cache=timing)
    return replace(options, compute_capabilities=build_targets(options)), trt


def graphs_from_onnx_manifest(onnx_dir: Path) -> list[GraphSpec]:
    """GraphSpecs for every graph listed in an ONNX export folder's manifest.json.

    Dynamic input dimensions (strings or -1 in the manifest) need a profile under the graph's
    "profile" entry; skyrt's export writes static shapes, so most graphs need none.
    """
    onnx_dir = Path(onnx_dir)
    manifest_path = onnx_dir / "manifest.json"
    if not manifest_path.is_file():
        raise FileNotFoundError(f"{manifest_path} not found: export the ONNX graphs first (skyrt export onnx "
                                "--model DIR --out DIR)")
    manifest = json.loads(manifest_path.read_text())
    export_config = manifest.get("export_config", manifest.get("config", {}))
    specs = []
    for name, graph in _manifest_graphs(manifest):
        profile = {k: tuple(tuple(int(d) for d in s) for s in v) for k, v in graph.get("profile", {}).items()}
        specs.append(GraphSpec(name=name, onnx_path=onnx_dir / graph["file"], profile=profile,
                               export_config=export_config,
                               precision=graph.get("precision", manifest.get("precision", "fp32"))))
    return specs


def _manifest_graphs(manifest: dict) -> Iterable[tuple[str, dict]]:
    graphs = manifest.get("graphs", {})
    if isinstance(graphs, dict):
        return graphs.items()
    return ((g["name"], g) for g in graphs)


def build_engines(graphs: Sequence[GraphSpec], out_dir: Path, options: BuildOptions = BuildOptions(),
                  progress: bool = True, final_dir: Path | None = None) -> list[Path]:
    """Build one engine per graph into out_dir (with manifests); returns the engine paths.

    final_dir: where the engines will live when out_dir is a staging folder that is renamed once
    complete (the engine cache does that); the manifests' rebuild command names it."""
    from tqdm.auto import tqdm

    trt = import_builder(options.builder)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    logger = collecting_logger(trt)
    paths = []
    for spec in tqdm(graphs, desc=f"build {options.builder} engines", unit="engine", disable=not progress):
        paths.append(build_engine(trt, logger, spec, out_dir, options, final_dir))
    return paths


def prepare_engine_folder(onnx_dir: Path, engine_dir: Path) -> None:
    """What an engine folder holds beside the engines: the ONNX manifest (as onnx_manifest.json), the
    tokenizer and (for the captioner) the token embedding table the host side reads."""
    manifest = json.loads((Path(onnx_dir) / "manifest.json").read_text())
    (Path(engine_dir) / ONNX_MANIFEST_COPY).write_text(json.dumps(manifest, indent=2) + "\n")
    for entry in (manifest.get("tokenizer"), manifest.get("embeddings")):
        name = (entry or {}).get("file")
        if name:
            shutil.copy2(Path(onnx_dir) / name, Path(engine_dir) / name)


def write_engine_folder(onnx_dir: Path, out_dir: Path, options: BuildOptions, progress: bool = True,
                        final_dir: Path | None = None, graphs: Sequence[GraphSpec] | None = None) -> list[Path]:
    """An engine folder: engines of `graphs` (default: every graph of the ONNX export `onnx_dir`) in
    out_dir, and the ONNX manifest and tokenizer beside them (prepare_engine_folder)."""
    specs = graphs_from_onnx_manifest(onnx_dir) if graphs is None else graphs
    paths = build_engines(specs, out_dir, options, progress=progress, final_dir=final_dir)
    prepare_engine_folder(onnx_dir, out_dir)
    return paths


def write_tiny_decoder_engine_folder(tiny_dir: Path, out_dir: Path, options: BuildOptions, progress: bool = True,
                                     final_dir: Path | None = None) -> Path:
    """The tiny decoder's step graph export (`skyrt export onnx --tiny-decoder`, runtime/tiny_decoder.py)
    as an engine folder: tiny_decoder_step.engine (+ manifest) and the export's tiny_decoder.json beside
    it (the graph's I/O, which the TensorRT backend's streaming decoder binds). Returns the engine path."""
    from skyrt.runtime.tiny_decoder import EXPORT_MANIFEST, STEP_GRAPH, read_tiny_export

    manifest = read_tiny_export(tiny_dir)
    spec = GraphSpec(name=STEP_GRAPH, onnx_path=Path(tiny_dir) / manifest["graph"]["file"],
                     export_config={"tiny_decoder": {"latent": manifest["latent"], "weights": manifest["weights"]}})
    (path,) = build_engines([spec], out_dir, options, progress=progress, final_dir=final_dir)
    shutil.copy2(Path(tiny_dir) / EXPORT_MANIFEST, Path(out_dir) / EXPORT_MANIFEST)
    return path


def build_engine(trt, logger, spec: GraphSpec, out_dir: Path, options: BuildOptions,
                 final_dir: Path | None = None) -> Path:
    """Parse spec.onnx_path from its file (so >2 GB external data works), build, write engine + manifest.
    `logger` from collecting_logger: its errors go into the EngineBuildError of a failed build."""
    logger.errors.clear()
    builder = trt.Builder(logger)
    network = builder.create_network(_strongly_typed_flags(trt))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(spec.onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise EngineBuildError(f"TensorRT ({options.builder}) could not parse {spec.onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.builder_optimization_level = options.optimization_level
    if options.workspace_gib is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(options.workspace_gib * 2**30))
    _add_profile(trt, builder, network, config, spec)
    targets = _set_targets(trt, config, options, spec.precision)
    cache_path = None if options.builder == "tensorrt-rtx" else (options.timing_cache or out_dir / TIMING_CACHE_FILE)
    if cache_path is not None:
        _load_timing_cache(config, cache_path)
    started = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        errors = "; ".join(logger.errors) or "no error logged"
        raise EngineBuildError(f"TensorRT ({options.builder}) failed to build {spec.onnx_path}: {errors} (set "
                               "SKYRT_TRT_VERBOSE=1 for the whole builder log)")
    build_s = time.perf_counter() - started
    if cache_path is not None:
        cache_path.write_bytes(bytes(config.get_timing_cache().serialize()))
    engine_path = out_dir / f"{spec.name}.engine"
    data = bytes(serialized)
    engine_path.write_bytes(data)
    manifest = EngineManifest(
        name=spec.name, engine_file=engine_path.name, onnx_file=str(spec.onnx_path.name),
        onnx_sha256=file_sha256(spec.onnx_path), export_config=spec.export_config, precision=spec.precision,
        profile={k: [list(s) for s in v] for k, v in spec.profile.items()}, builder=options.builder,
        builder_version=trt.__version__, compute_capabilities=targets, build_seconds=round(build_s, 3),
        rebuild=rebuild_command(spec.onnx_path.parent, final_dir or out_dir, options.builder),
        engine_bytes=len(data), engine_sha256=hashlib.sha256(data).hexdigest(),
    )
    manifest.write(out_dir / f"{spec.name}{ENGINE_MANIFEST_SUFFIX}")
    return engine_path


def collecting_logger(trt):
    """A TensorRT logger that prints warnings and errors (every message with SKYRT_TRT_VERBOSE=1) to
    stderr and keeps the errors in `.errors`, so that a failed build says why in its exception."""
    verbose = os.environ.get("SKYRT_TRT_VERBOSE", "") not in ("", "0")
    shown = int(trt.ILogger.Severity.VERBOSE if verbose else trt.ILogger.Severity.WARNING)
    errors_up_to = int(trt.ILogger.Severity.ERROR)  # INTERNAL_ERROR (0) and ERROR (1)

    class CollectingLogger(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)  # pybind11 trampolines need the base initialised explicitly
            self.errors: list[str] = []

        def log(self, severity, msg):
            if int(severity) <= errors_up_to:
                self.errors.append(msg)
            if int(severity) <= shown:
                print(f"[TensorRT] {msg}", file=sys.stderr)

    return CollectingLogger()


def _strongly_typed_flags(trt) -> int:
    # TensorRT-RTX and TensorRT 11 are strongly typed whatever the flag; TensorRT 10 needs it asked for.
    flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    return 0 if flag is None else 1 << int(flag)


def _add_profile(trt, builder, network, config, spec: GraphSpec) -> None:
    """One optimization profile: the spec's shapes for dynamic inputs; refuse dynamic inputs without one."""
    dynamic = [network.get_input(i) for i in range(network.num_inputs)
               if any(d < 0 for d in network.get_input(i).shape)]
    if not dynamic:
        return
    missing = [t.name for t in dynamic if t.name not in spec.profile]
    if missing:
        raise EngineBuildError(f"{spec.onnx_path.name}: dynamic inputs {missing} have no optimization profile; "
                               "give (min, opt, max) shapes in the ONNX manifest's 'profile' entry")
    profile = builder.create_optimization_profile()
    for tensor in dynamic:
        profile.set_shape(tensor.name, *spec.profile[tensor.name])
    config.add_optimization_profile(profile)


def _set_targets(trt, config, options: BuildOptions, precision: str | None = None) -> list[str]:
    """TensorRT-RTX: the compute capabilities to compile for (build_targets). TensorRT: the GPU it builds on."""
    wanted = build_targets(options, precision)
    if options.builder != "tensorrt-rtx":
        return wanted
    config.num_compute_capabilities = len(wanted)
    for index, cc in enumerate(wanted):
        member = "SM" + cc.replace(".", "")
        if member not in trt.ComputeCapability.__members__:
            raise ValueError(f"TensorRT-RTX {trt.__version__} cannot target compute capability {cc}; "
                             f"choose from {', '.join(RTX_COMPUTE_CAPABILITIES)}")
        config.set_compute_capability(trt.ComputeCapability.__members__[member], index)
    return wanted


def _load_timing_cache(config, path: Path) -> None:
    data = path.read_bytes() if path.is_file() else b""
    cache = config.create_timing_cache(data)
    config.set_timing_cache(cache, ignore_mismatch=False)


def gpu_compute_capability() -> str | None:
    """'major.minor' of CUDA device 0 via cuda-python, or None when there is no GPU or no cuda-python."""
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        return None
    try:
        err, major = cudart.cudaDeviceGetAttribute(cudart.cudaDeviceAttr.cudaDevAttrComputeCapabilityMajor, 0)
        err2, minor = cudart.cudaDeviceGetAttribute(cudart.cudaDeviceAttr.cudaDevAttrComputeCapabilityMinor, 0)
    except Exception:  # a driver-less machine raises from inside the bindings
        return None
    if int(err) or int(err2):
        return None
    return f"{major}.{minor}"
