"""The tiny decoder (TAEHV's taew2_1, export/tiny_vae.py) for the exported-graph backends, torch-free.

Its released weights file, and its exported streaming step (one ONNX graph of fixed shape per latent
size): raw latent frame `mu` [1, 16, 1, h, w] and the 9 MemBlock memories `memory_0..8` in, `pixels`
[1, 3, 4, 8h, 8w] in [-1, 1] and `new_memory_0..8` out. A stream starts from zero memories and drops
the first STARTUP_FRAMES frames of its first step (the Wan VAE's frame count: 1, then 4 per latent).

An export is a folder (`skyrt export onnx --tiny-decoder FILE --height H --width W --out DIR`) holding
the graph and `tiny_decoder.json` (format, latent size, the graph's inputs and outputs with shapes, the
weights' sha256). Given the weights file instead, the backend exports it on first use into
$SKYRT_CACHE/tiny_decoder/<weights hash>/<h>x<w>/, in a subprocess (torch is imported there, not here).
"""
from __future__ import annotations

import json
from pathlib import Path

# The released Wan2.1 decoder's file names (madebyollin/taehv: taew2_1.pth in the repository root,
# safetensors/taew2_1.safetensors), looked for in this order in a model folder.
TINY_DECODER_FILES = ("taew2_1.safetensors", "taew2_1.pth")
STARTUP_FRAMES = 3  # raw frames a stream's first step makes before pixel frame 0 (TAEHV drops them)
EXPORT_FORMAT = "skyrt-tiny-decoder"
EXPORT_MANIFEST = "tiny_decoder.json"
STEP_GRAPH = "tiny_decoder_step"
CACHE = "tiny_decoder"


def find_tiny_decoder_file(folder: str | Path) -> Path:
    """The tiny decoder's weights in a model folder (TINY_DECODER_FILES), or a clear error."""
    folder = Path(folder)
    for name in TINY_DECODER_FILES:
        if (folder / name).is_file():
            return folder / name
    raise FileNotFoundError(f"decoder='tiny' needs TAEHV's Wan2.1 decoder in the model folder {folder} "
                            f"(one of {', '.join(TINY_DECODER_FILES)}, from github.com/madebyollin/taehv), "
                            f"or its path as decoder_path=")


def is_tiny_decoder_export(path: str | Path) -> bool:
    manifest = Path(path) / EXPORT_MANIFEST
    try:
        return manifest.is_file() and json.loads(manifest.read_text()).get("format") == EXPORT_FORMAT
    except (OSError, ValueError):
        return False


def read_tiny_export(folder: str | Path) -> dict:
    folder = Path(folder)
    if not is_tiny_decoder_export(folder):
        raise ValueError(f"{folder} is not a tiny decoder export (no {EXPORT_MANIFEST} of format {EXPORT_FORMAT}); "
                         "make one with: skyrt export onnx --tiny-decoder taew2_1.pth --height H --width W --out DIR")
    return json.loads((folder / EXPORT_MANIFEST).read_text())


class TinyDecoderSource:
    """Where an exported-graph backend gets the tiny decoder's step graph for a latent size: an export
    folder given as decoder_path (its one size), else the weights (decoder_path, or the model folder's
    TINY_DECODER_FILES) exported on first use into the cache."""

    def __init__(self, decoder_path: str | Path | None, model_folder: str | Path, cache_dir=None,
                 progress: bool = True):
        self.progress = progress
        self.cache_dir = cache_dir
        path = Path(decoder_path).expanduser() if decoder_path is not None else None
        if path is not None and path.is_dir():
            self.export: Path | None = path
            self.weights: Path | None = None
            read_tiny_export(path)  # refuse a folder that is not an export now, not at the first frame
        else:
            self.export = None
            self.weights = path if path is not None else find_tiny_decoder_file(model_folder)
            if not self.weights.is_file():
                raise FileNotFoundError(f"no tiny decoder weights at {self.weights} (expected taew2_1.pth or "
                                        f"taew2_1.safetensors from github.com/madebyollin/taehv, or an export folder)")

    def folder_for(self, latent_h: int, latent_w: int) -> Path:
        """The export folder of the step graph for latents h x w (exported first when needed)."""
        if self.export is not None:
            manifest = read_tiny_export(self.export)
            if tuple(manifest["latent"]) != (latent_h, latent_w):
                h, w = manifest["latent"]
                raise ValueError(f"the tiny decoder export {self.export} is for {8 * h}x{8 * w} pixels, the stream is "
                                 f"{8 * latent_h}x{8 * latent_w}: export one for it (skyrt export onnx --tiny-decoder "
                                 f"taew2_1.pth --height {8 * latent_h} --width {8 * latent_w} --out DIR) or pass the "
                                 "weights file as decoder_path (exported on first use)")
            return self.export
        return self._cached(latent_h, latent_w)

    def _cached(self, latent_h: int, latent_w: int) -> Path:
        import sys

        from . import artifact_cache

        root = artifact_cache.cache_root(self.cache_dir)
        digest = artifact_cache.tree_sha256([self.weights], memo_file=root / artifact_cache.FILE_HASHES)
        target = root / CACHE / digest[:16] / f"{latent_h}x{latent_w}"

        def export(staging: Path) -> None:
            if self.progress:
                print(f"skyrt: exporting the tiny decoder {self.weights} to ONNX in {target} (first use only)",
                      file=sys.stderr)
            artifact_cache.run_exporter(["onnx", "--tiny-decoder", self.weights, "--out", staging,
                                         "--height", 8 * latent_h, "--width", 8 * latent_w], "the tiny decoder")

        return artifact_cache.publish(target, export, is_tiny_decoder_export)


ENGINE_PREFIX = "tiny-decoder-"


def cached_tiny_decoder_engine(tiny_dir: Path, root: Path, options, builder_version: str,
                               progress: bool = True) -> Path:
    """The engine folder of a tiny decoder step graph export in the engine cache (runtime/artifact_cache.py),
    engines/<builder>-<version>/tiny-decoder-<key>, built first when absent; the key hashes the graph file
    as engine_cache_key does the DiT's (builder, version, targets and options too)."""
    from . import artifact_cache
    from .engine_manifest import ENGINE_MANIFEST_SUFFIX, file_sha256
    from .registry import resolve

    graph = Path(tiny_dir) / read_tiny_export(tiny_dir)["graph"]["file"]
    graph_hashes = {"graphs": {STEP_GRAPH: {"sha256": {graph.name: file_sha256(graph)}}}}
    key = artifact_cache.engine_cache_key(graph_hashes, options, builder_version)
    target = Path(root) / artifact_cache.ENGINE_CACHE / f"{options.builder}-{builder_version}" / f"{ENGINE_PREFIX}{key}"
    build = resolve("engine:write_tiny_decoder_folder")

    def make(staging: Path) -> None:
        build(Path(tiny_dir), staging, options, progress=progress, final_dir=target)

    built = lambda path: (path / f"{STEP_GRAPH}{ENGINE_MANIFEST_SUFFIX}").is_file()  # noqa: E731
    return artifact_cache.publish(target, make, built)


__all__ = ["CACHE", "ENGINE_PREFIX", "cached_tiny_decoder_engine", "EXPORT_FORMAT", "EXPORT_MANIFEST", "STARTUP_FRAMES", "STEP_GRAPH", "TINY_DECODER_FILES",
           "TinyDecoderSource", "find_tiny_decoder_file", "is_tiny_decoder_export", "read_tiny_export"]
