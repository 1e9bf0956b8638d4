"""The one cache of what is made from a model folder on first use: exported graphs, then engines.

    model folder --(exporter, in a subprocess)--> ONNX export folder --(TensorRT builder)--> engine folder

Everything a backend (or the captioner) makes on first use goes through here, torch-free:
- the root: `cache_root()` ($SKYRT_CACHE, else ~/.cache/skyrt);
- the key of an entry: a hash of what decides its contents (`settings_key`): the model folder's
  files (`model_hash`, remembered by size and mtime in file-hashes.json so a 30 GB checkpoint is
  read once), the exporter's revision and options; for engines the ONNX files' hashes, the
  builder, its version, the targets and the build options (`engine_cache_key`);
- publishing: an entry is made in a staging folder beside it and renamed into place when complete
  (`publish`), so a crash never leaves a half entry that looks usable, and when two processes make
  the same entry at once the first rename wins and the other's staging folder is dropped;
- exporting: `python -m skyrt.export.export_cli onnx ...` in a subprocess (`run_exporter`), so the
  calling process (a server) never imports torch;
- building: engines from an export folder (`cached_engine_folder`), with the builder reached through
  runtime/registry.py.

Layout under the root: onnx/<model hash>/<group>-<key> (DiT graph groups), captioner/<model hash>/
<precision>-<key>, engines/<builder>-<version>/<prefix><key>, engines/timing-<version>.cache,
file-hashes.json.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Callable, Iterable, Sequence

from .engine_manifest import ENGINE_MANIFEST_SUFFIX, ONNX_MANIFEST_COPY, file_sha256
from .registry import EXPORTER, resolve

ONNX_CACHE = "onnx"
CAPTIONER_CACHE = "captioner"
ENGINE_CACHE = "engines"
FILE_HASHES = "file-hashes.json"


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """`cache_dir` when given, else $SKYRT_CACHE, else ~/.cache/skyrt."""
    if cache_dir:
        return Path(cache_dir).expanduser()
    return Path(os.environ.get("SKYRT_CACHE", Path.home() / ".cache" / "skyrt")).expanduser()


# ----------------------------------------------------------------------------------------------
# Hashing model folders (the first part of every key)


def tree_sha256(paths: Iterable[str | Path], memo_file: str | Path | None = None) -> str:
    """One sha256 over the files under `paths` (files or folders): relative names and contents.

    Hidden files are skipped. `memo_file` (a json file) remembers each file's hash by (path, size,
    mtime) so a 30 GB checkpoint is read once, not at every start.
    """
    memo: dict[str, str] = {}
    memo_path = Path(memo_file) if memo_file else None
    if memo_path and memo_path.is_file():
        try:
            memo = json.loads(memo_path.read_text())
        except (OSError, ValueError):
            memo = {}
    digest = hashlib.sha256()
    changed = False
    for root in map(Path, paths):
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        for path in files:
            rel = path.name if path == root else path.relative_to(root).as_posix()
            if any(part.startswith(".") for part in Path(rel).parts):
                continue
            stat = path.stat()
            stamp = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
            if stamp not in memo:
                memo[stamp] = file_sha256(path)
                changed = True
            digest.update(f"{root.name}/{rel}\0{memo[stamp]}\0".encode())
    if memo_path and changed:
        _atomic_write_bytes(memo_path, json.dumps(memo).encode())
    return digest.hexdigest()


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def model_hash(folder: str | Path, root: Path) -> str:
    """sha256 of a model folder's files; each file's hash is remembered under `root` by (path, size,
    mtime), so later starts read nothing."""
    return tree_sha256([Path(folder)], memo_file=Path(root) / FILE_HASHES)


def settings_key(settings: dict) -> str:
    """16 hex digits of the sha256 of `settings` (JSON, sorted keys)."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def publish(target: Path, make: Callable[[Path], None], is_complete: Callable[[Path], bool]) -> Path:
    """`target`, made first when not `is_complete`: `make(staging)` fills a staging folder beside it,
    which is renamed to `target` once complete. A failed make leaves nothing behind; a rename that
    loses to another process making the same entry keeps the other's (complete) entry."""
    target = Path(target)
    if is_complete(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.parent / f".{target.name}.tmp-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        make(staging)
        os.replace(staging, target)
    except OSError:
        if not is_complete(target):  # not merely another process finishing the same entry first
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def run_exporter(args: Sequence[str], what: str) -> None:
    """`python -m skyrt.export.export_cli ARGS` in a subprocess (torch is imported there, never here);
    its progress (stderr) goes to the user, a failure raises RuntimeError with its output."""
    cmd = [sys.executable, "-m", EXPORTER, *map(str, args)]
    result = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"exporting {what} failed (exit {result.returncode}): {' '.join(cmd)}\n{result.stdout}")


def _option_flags(options: dict) -> list[str]:
    flags = []
    for k, v in options.items():
        flags += [f"--{k.replace('_', '-')}", str(v)]
    return flags


# ----------------------------------------------------------------------------------------------
# model folder -> exported graphs


def exported_graph_group(source: Path, source_hash: str, root: Path, group: str, graphs: Sequence[str],
                         settings: dict, options: dict, progress: bool,
                         is_complete: Callable[[Path], bool]) -> Path:
    """The export folder of one group of DiT / text / VAE graphs of model folder `source`:
    onnx/<source hash>/<group>-<key of settings>, exported first when absent.

    settings: what decides the graphs (the key); options: the exporter's flags (--name value)."""
    target = Path(root) / ONNX_CACHE / source_hash[:16] / f"{group}-{settings_key(settings)}"

    def export(staging: Path) -> None:
        args = ["onnx", "--model", source, "--out", staging, "--graphs", ",".join(graphs), "--model-hash",
                source_hash, *_option_flags(options)]
        run_exporter(args + ([] if progress else ["--no-progress"]), ", ".join(graphs))

    return publish(target, export, is_complete)


def exported_captioner(source: Path, root: Path, settings: dict, precision: str, progress: bool,
                       is_complete: Callable[[Path], bool],
                       before_export: Callable[[Path], None] | None = None) -> Path:
    """The ONNX export of a captioner checkpoint folder: captioner/<source hash>/<precision>-<key of
    settings>, exported first (in a subprocess) when absent. `settings` holds what decides the graphs
    (format, precision, frame count and size); `before_export(target)` runs only when the entry is
    missing, to refuse early (e.g. naming the missing export extra)."""
    source_hash = model_hash(source, root)
    target = Path(root) / CAPTIONER_CACHE / source_hash[:16] / f"{precision}-{settings_key(settings)}"
    if is_complete(target):
        return target
    if before_export is not None:
        before_export(target)
    if progress:
        print(f"skyrt: exporting the captioner {source} to ONNX in {target} (first use only)", file=sys.stderr)

    def export(staging: Path) -> None:
        args = ["onnx", "--captioner", source, "--out", staging, "--precision", precision]
        run_exporter(args + ([] if progress else ["--no-progress"]), "the captioner")

    return publish(target, export, is_complete)


# ----------------------------------------------------------------------------------------------
# exported graphs -> engines


def engine_cache_key(onnx_manifest: dict, options, builder_version: str) -> str:
    """What decides whether cached engines fit: the ONNX files' hashes, builder and version, target
    compute capabilities and builder options (export/engine.py BuildOptions)."""
    parts = {
        "onnx": {name: entry["sha256"] for name, entry in sorted(onnx_manifest["graphs"].items())},
        "builder": options.builder, "version": builder_version, "targets": list(options.compute_capabilities),
        "optimization_level": options.optimization_level, "workspace_gib": options.workspace_gib,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def engine_build_options(builder: str, root: Path, compute_capabilities: Sequence[str] | None = None,
                         optimization_level: int = 3):
    """(BuildOptions, builder module) for engines built on first use under `root`: the DiT backend
    and the captioner share them, so both key and build their engines alike."""
    timing_dir = Path(root) / ENGINE_CACHE
    return resolve("engine:first_use_options")(builder, timing_dir, compute_capabilities, optimization_level)


def is_engine_folder(path: str | Path) -> bool:
    """An engine folder: the ONNX manifest copy and at least one engine manifest."""
    path = Path(path)
    return (path / ONNX_MANIFEST_COPY).is_file() and any(path.glob(f"*{ENGINE_MANIFEST_SUFFIX}"))


def cached_engine_folder(onnx_dir: Path, root: Path, options, builder_version: str, prefix: str = "",
                         progress: bool = True) -> Path:
    """The engine folder of an ONNX export in the cache, engines/<builder>-<version>/<prefix><key>,
    built first when absent (the key: engine_cache_key)."""
    manifest = json.loads((Path(onnx_dir) / "manifest.json").read_text())
    key = engine_cache_key(manifest, options, builder_version)
    target = Path(root) / ENGINE_CACHE / f"{options.builder}-{builder_version}" / f"{prefix}{key}"
    return build_engine_folder(Path(onnx_dir), target, options, progress=progress)


def build_engine_folder(onnx_dir: Path, target: Path, options, progress: bool = True) -> Path:
    """Engines for every graph of `onnx_dir` in `target` (built in a staging folder, published whole)."""
    build = resolve("engine:write_folder")

    def make(staging: Path) -> None:
        build(Path(onnx_dir), staging, options, progress=progress, final_dir=target)

    return publish(Path(target), make, is_engine_folder)


TINY_DECODER_ENGINE_PREFIX = "tiny-decoder-"


def cached_tiny_decoder_engine(tiny_dir: Path, root: Path, options, builder_version: str,
                               progress: bool = True) -> Path:
    """The engine folder of a tiny decoder step graph export (runtime/tiny_decoder.py) in the cache,
    engines/<builder>-<version>/tiny-decoder-<key>, built first when absent; the key hashes the graph file
    as engine_cache_key does the DiT's (builder, version, targets and options too)."""
    from .tiny_decoder import STEP_GRAPH, read_tiny_export

    graph = Path(tiny_dir) / read_tiny_export(tiny_dir)["graph"]["file"]
    key = engine_cache_key({"graphs": {STEP_GRAPH: {"sha256": {graph.name: file_sha256(graph)}}}}, options,
                           builder_version)
    target = Path(root) / ENGINE_CACHE / f"{options.builder}-{builder_version}" / f"{TINY_DECODER_ENGINE_PREFIX}{key}"
    build = resolve("engine:write_tiny_decoder_folder")

    def make(staging: Path) -> None:
        build(Path(tiny_dir), staging, options, progress=progress, final_dir=target)

    return publish(target, make, lambda path: (path / f"{STEP_GRAPH}{ENGINE_MANIFEST_SUFFIX}").is_file())


__all__ = ["CAPTIONER_CACHE", "ENGINE_CACHE", "ONNX_CACHE", "build_engine_folder", "cache_root",
           "cached_engine_folder", "cached_tiny_decoder_engine", "engine_build_options", "engine_cache_key", "exported_captioner",
           "exported_graph_group", "is_engine_folder", "model_hash", "publish", "run_exporter", "settings_key",
           "tree_sha256"]
