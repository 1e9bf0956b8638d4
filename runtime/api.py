"""`skyrt.load`: a model, ONNX export or engine folder (or the built-in default) -> a ready Pipeline."""
from __future__ import annotations

from pathlib import Path

from .backends import get_backend
from .backends.base import ModelSpec
from .default_model import DEMO_META, default_model_dir, recommended_sampling
from .model_folder import inspect_model_folder
from .pipeline import Pipeline


def source_spec(model_dir: str | Path | None, backend: str = "torch") -> ModelSpec:
    """What `backend` is given, without loading anything: a model folder (official or diffusers
    layout) for every backend, an ONNX export folder for onnxruntime and tensorrt, an engine folder
    for tensorrt. None is the built-in default model."""
    if backend == "tensorrt":
        from .backends.tensorrt_backend import engine_folder_spec

        return engine_folder_spec(model_dir)
    path = default_model_dir() if model_dir is None else Path(model_dir).expanduser()
    if backend == "onnxruntime":
        from .backends.onnxruntime_backend import export_folder_spec, is_export_folder

        if is_export_folder(path):
            return export_folder_spec(path)
    return inspect_model_folder(path)


def load(model_dir: str | Path | None = None, backend: str = "torch", device: str = "cpu", preset: str | None = None,
         text_cache: str | Path | None = None, decoder: str = "wan", decoder_path: str | Path | None = None,
         **options) -> Pipeline:
    """Load a model for `backend` (this is `skyrt.load`).

    Args:
        model_dir: see `source_spec`; None uses skyrt's built-in default model.
        backend: "torch" (reference), "onnxruntime" (exports ONNX into the cache on first use from a
            model folder) or "tensorrt" (also builds engines into the cache on first use).
        device: torch device for the torch backend ("cpu", "cuda"); onnxruntime: "cpu", "cuda[:N]",
            "tensorrt"; TensorRT engines always run on the GPU.
        preset: a causal Wan2.1 family ("self-forcing", "causvid", "causvid-warp4", "longlive",
            "causal-forcing-framewise", "causal-forcing-chunkwise", "rolling-forcing"; see
            runtime/causal_family.py): `model_dir` holds its checkpoint beside the Wan2.1 VAE and umT5
            files, and the pipeline runs its own sampler with its recommended settings. A model folder's
            demo_model.json recommendation is a layer of every request too, under the preset and the
            keywords a call passes (runtime/resolve.py). With onnxruntime / tensorrt a preset runs from
            its export folder (`skyrt export onnx --preset`), whose manifest names it: preset= may be
            left unset there. The options
            checkpoint=, lora=, lora_alpha=, use_ema= override which files (and how) it loads.
        text_cache: a folder where prompt embeddings are kept, so no prompt is ever encoded twice
            (runtime/text_cache.py).
        decoder: which decoder turns latents into pixels: "wan" (the Wan2.1 VAE, default) or "tiny"
            (TAEHV's taew2_1, several times cheaper, slightly lower quality; torch, onnxruntime and tensorrt
            backends): its weights are the model folder's taew2_1.safetensors or taew2_1.pth, or `decoder_path`
            (on onnxruntime also an export folder of it: `skyrt export onnx --tiny-decoder`; on tensorrt an
            export folder, whose engine is built on first use, or an engine folder of it: `skyrt export
            engine --onnx TINY_EXPORT --out DIR`).
        options: passed to the backend (e.g. precision, cache_dir, builder).
    """
    options.update(_decoder_options(backend, decoder, decoder_path))
    if backend == "tensorrt" and device == "cpu":
        device = "cuda"  # engines only run on the GPU; "cpu" is merely skyrt.load's default
    preset = _export_preset(model_dir, backend, preset)
    if preset is not None:
        pipe = _load_preset(model_dir, backend, device, preset, options)
    else:
        spec = source_spec(model_dir, backend)
        pipe = Pipeline(get_backend(backend, spec, device=device, **options), **_recommendation(spec.path))
    if text_cache is not None:
        from .text_cache import enable_text_cache

        enable_text_cache(pipe.backend, text_cache)
    return pipe


def _decoder_options(backend: str, decoder: str, decoder_path) -> dict:
    """The backend options of a decoder choice: none for the default, the torch backend's otherwise."""
    if decoder not in ("wan", "tiny"):
        raise ValueError(f"decoder={decoder!r}: choose 'wan' (the Wan2.1 VAE) or 'tiny' (TAEHV's taew2_1)")
    if decoder == "wan" and decoder_path is None:
        return {}
    if backend not in ("torch", "onnxruntime", "tensorrt"):
        raise ValueError(f"decoder='tiny' runs on the torch, onnxruntime and tensorrt backends, not {backend!r}")
    return {"decoder": decoder, "decoder_path": None if decoder_path is None else str(decoder_path)}


EXPORTED_GRAPH_BACKENDS = ("onnxruntime", "tensorrt")


def export_manifest(model_dir, backend: str) -> dict | None:
    """The ONNX manifest of an export folder (onnxruntime, tensorrt) or engine folder (tensorrt), else None."""
    if model_dir is None or backend not in EXPORTED_GRAPH_BACKENDS:
        return None
    import json

    from . import artifact_cache
    from .backends.exported_graphs import is_export_folder, read_manifest
    from .engine_manifest import ONNX_MANIFEST_COPY

    path = Path(model_dir).expanduser()
    if is_export_folder(path):
        return read_manifest(path)
    if backend == "tensorrt" and artifact_cache.is_engine_folder(path):
        return json.loads((path / ONNX_MANIFEST_COPY).read_text())
    return None


def _export_preset(model_dir, backend: str, preset: str | None) -> str | None:
    """The preset to run: the one an export (or engine) folder was made for (`skyrt export onnx --preset`),
    else the caller's. A different preset than the export's is refused (its graphs bake in the block,
    ring and weights of the one it was made for)."""
    manifest = export_manifest(model_dir, backend)
    exported = None if manifest is None or manifest.get("preset") is None else manifest["preset"]["name"]
    if exported is not None and preset is not None and preset != exported:
        raise ValueError(f"{model_dir} is an export of the {exported} preset, not {preset}: pass preset={exported!r} "
                         f"(or leave it unset), or export {preset} with: skyrt export onnx --preset {preset} "
                         "--model FOLDER --out DIR")
    return exported or preset


def _load_preset(model_dir, backend: str, device: str, name: str, options: dict) -> Pipeline:
    from .causal_family import FAMILY_OPTIONS, causal_model_spec, get_preset

    preset = get_preset(name)
    if model_dir is None:
        raise ValueError(f"preset {name!r} needs a model folder holding its checkpoint ({preset.repo})")
    if backend != "torch":
        return _load_exported_preset(model_dir, backend, device, preset, options)
    family = {k: options.pop(k) for k in FAMILY_OPTIONS if k in options}
    spec = causal_model_spec(model_dir, preset, **family)
    return Pipeline(get_backend(backend, spec, device=device, **options), preset=preset, **_recommendation(spec.path))


def _load_exported_preset(model_dir, backend: str, device: str, preset, options: dict) -> Pipeline:
    """A preset on onnxruntime / TensorRT: from its export folder (or engine folder), no torch imported."""
    from .causal_family import FAMILY_OPTIONS

    manifest = export_manifest(model_dir, backend)
    if manifest is None or manifest.get("preset") is None:
        # A model folder would be exported as the official layout: the Wan2.1 base, not the family's weights.
        raise ValueError(f"preset {preset.name!r} on the {backend} backend runs from its export: make one with "
                         f"skyrt export onnx --preset {preset.name} --model {model_dir} --out EXPORT_DIR "
                         f"(then skyrt.load(EXPORT_DIR, backend={backend!r}))")
    given = [k for k in FAMILY_OPTIONS if k in options]
    if given:
        raise ValueError(f"{', '.join(given)}: the {preset.name} export already holds its weights (LoRA merged); "
                         "pass them to skyrt export onnx --preset instead")
    spec = source_spec(model_dir, backend)
    return Pipeline(get_backend(backend, spec, device=device, **options), preset=preset, **_recommendation(spec.path))


def _recommendation(folder: Path) -> dict:
    """Pipeline's recommendation arguments: the settings a model folder recommends (its demo_model.json),
    a layer under the preset and the caller's keywords (runtime/resolve.py)."""
    recommended = recommended_sampling(folder) if Path(folder).is_dir() else {}
    return {"recommendation": recommended, "recommendation_from": str(Path(folder) / DEMO_META) if recommended else ""}
