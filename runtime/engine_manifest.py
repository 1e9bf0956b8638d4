"""Engine manifests: what an engine was built from and for, and the check that refuses a mismatch.

A TensorRT engine only runs on the TensorRT version that built it, and (for TensorRT) on the GPU
architecture it was built on; TensorRT-RTX engines run on the compute capabilities they were
compiled for. Loading the wrong one fails deep inside TensorRT with an unhelpful message, so every
engine carries `<name>.engine.json` and `check_engine` compares it with the running setup first,
naming the exact command that rebuilds the engine.

Torch-free: the serving path imports it.
"""
from __future__ import annotations

import hashlib
import json
import shlex
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ENGINE_MANIFEST_SUFFIX = ".engine.json"
ONNX_MANIFEST_COPY = "onnx_manifest.json"  # an engine folder's copy of the ONNX export's manifest
MANIFEST_VERSION = 1

# Builder name -> the module its wheel installs and how to get it.
BUILDERS: dict[str, dict[str, str]] = {
    "tensorrt": {"module": "tensorrt", "note": "NVIDIA's wheel from pypi.nvidia.com; building needs a GPU"},
    "tensorrt-rtx": {"module": "tensorrt_rtx", "note": "PyPI 'tensorrt-rtx'; builds without a GPU, runs on RTX GPUs"},
}


class EngineMismatchError(RuntimeError):
    """An engine built for another TensorRT, GPU or ONNX graph than the one at hand."""


@dataclass
class EngineManifest:
    """The JSON written beside every engine (field names are the file format)."""

    name: str
    engine_file: str
    onnx_file: str
    onnx_sha256: str
    builder: str
    builder_version: str
    compute_capabilities: list[str]
    precision: str = "fp32"
    export_config: dict[str, Any] = field(default_factory=dict)
    profile: dict[str, list[list[int]]] = field(default_factory=dict)
    build_seconds: float | None = None
    rebuild: str = ""
    # The engine file itself, so that a truncated or corrupted copy is refused with a clear message
    # instead of failing inside TensorRT (empty/None in manifests written before these fields).
    engine_bytes: int | None = None
    engine_sha256: str = ""
    manifest_version: int = MANIFEST_VERSION

    def write(self, path: Path) -> None:
        Path(path).write_text(json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def read(cls, path: Path) -> "EngineManifest":
        path = Path(path)
        if not path.is_file():
            raise EngineMismatchError(f"{path} is missing: every engine needs the manifest written beside it by "
                                      "'skyrt export engine'; rebuild the engine with that command")
        data = json.loads(path.read_text())
        known = {f for f in cls.__dataclass_fields__}
        unknown = sorted(set(data) - known)
        if unknown or data.get("manifest_version") != MANIFEST_VERSION:
            raise EngineMismatchError(f"{path} is not a version-{MANIFEST_VERSION} skyrt engine manifest "
                                      f"(unknown fields {unknown}); rebuild with {data.get('rebuild') or 'skyrt export engine'}")
        return cls(**data)


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def rebuild_command(onnx_dir: Path, out_dir: Path, builder: str) -> str:
    return " ".join(["skyrt", "export", "engine", "--onnx", shlex.quote(str(onnx_dir)), "--out",
                     shlex.quote(str(out_dir)), "--builder", builder])


def _how_to_rebuild(manifest: EngineManifest) -> str:
    return f"rebuild it: {manifest.rebuild}" if manifest.rebuild else "rebuild it with 'skyrt export engine'"


def check_engine(manifest: EngineManifest, *, builder: str, builder_version: str, gpu_compute_capability: str | None,
                 onnx_path: Path | None = None) -> None:
    """Refuse an engine that this TensorRT / GPU / ONNX graph cannot use; the error says how to rebuild.

    gpu_compute_capability: 'major.minor' of the GPU that will run it (None: unknown, not checked).
    onnx_path: when given, the graph the engine must have been built from (hash compared).
    """
    fix = _how_to_rebuild(manifest)
    if manifest.builder != builder:
        raise EngineMismatchError(f"engine {manifest.engine_file} was built by {manifest.builder}, this runtime "
                                  f"uses {builder}; {fix}")
    if manifest.builder_version != builder_version:
        raise EngineMismatchError(f"engine {manifest.engine_file} was built with {builder} {manifest.builder_version}, "
                                  f"this machine has {builder_version}: engines do not move between versions; {fix}")
    if gpu_compute_capability is not None and not _runs_on(manifest, gpu_compute_capability):
        raise EngineMismatchError(
            f"engine {manifest.engine_file} targets compute capability {', '.join(manifest.compute_capabilities)}, "
            f"this GPU is {gpu_compute_capability}; {fix}"
            + (" (on this GPU)" if builder == "tensorrt" else f" --compute-capability {gpu_compute_capability}")
        )
    if onnx_path is not None and file_sha256(onnx_path) != manifest.onnx_sha256:
        raise EngineMismatchError(f"engine {manifest.engine_file} was built from another version of {onnx_path.name} "
                                  f"(sha256 differs): the graph was re-exported since; {fix}")


def check_engine_size(manifest: EngineManifest, path: Path) -> None:
    """Cheap check at load time (no read): the engine file exists and has the size the build wrote."""
    fix = _how_to_rebuild(manifest)
    path = Path(path)
    if not path.is_file():
        raise EngineMismatchError(f"engine file {path} is missing; {fix}")
    size = path.stat().st_size
    if manifest.engine_bytes is not None and size != manifest.engine_bytes:
        raise EngineMismatchError(f"engine file {path} is corrupted: {size} bytes, its manifest says "
                                  f"{manifest.engine_bytes}; {fix}")


def read_engine_bytes(manifest: EngineManifest, path: Path) -> bytes:
    """The engine file's bytes, refused when they are not what the build wrote (sha256 of the bytes
    read anyway for deserialization: one read, no second pass over a multi-GB file)."""
    check_engine_size(manifest, path)
    data = Path(path).read_bytes()
    if manifest.engine_sha256 and hashlib.sha256(data).hexdigest() != manifest.engine_sha256:
        raise EngineMismatchError(f"engine file {path} is corrupted (sha256 differs from its manifest); "
                                  f"{_how_to_rebuild(manifest)}")
    return data


def _runs_on(manifest: EngineManifest, gpu_cc: str) -> bool:
    targets = manifest.compute_capabilities
    return "current" in targets or gpu_cc in targets
