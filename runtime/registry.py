"""Torch-side code the torch-free runtime reaches by name, never by an import statement.

skyrt.runtime (numpy, the C++ core, onnxruntime, TensorRT, the server) must run where torch is not
installed, so it never imports skyrt.export: where it needs torch-side code (the torch backend,
exporting graphs on first use, reading a checkpoint's config, writing the tiny random default
model) it asks this registry for it by name. Names map to "module:attribute" paths imported with
importlib only when asked; a missing package gives an ImportError naming the extra that brings it.

tests/test_layers.py enforces the rule (it walks every import of skyrt.runtime).
"""
from __future__ import annotations

import importlib
from typing import Any

# name -> (dotted path "module:attribute", the pip extra that brings what the module imports)
ENTRIES: dict[str, tuple[str, str]] = {
    # backends, by the names skyrt.load(backend=...) takes
    "backend:torch": ("skyrt.export.torch_backend:TorchBackend", "export"),
    "backend:onnxruntime": ("skyrt.runtime.backends.onnxruntime_backend:OnnxRuntimeBackend", "ort"),
    "backend:tensorrt": ("skyrt.runtime.backends.tensorrt_backend:TensorRTBackend", "tensorrt"),
    # the tiny random-weight default model, written into the cache when the package ships no demo model
    "default_model:write": ("skyrt.export.tiny:ensure_default_model", "export"),
    # a causal-family checkpoint's DiT config, read off its tensors' shapes
    "causal:checkpoint_config": ("skyrt.export.causal_checkpoint:checkpoint_config", "export"),
    # a captioner checkpoint folder: its files checked, every missing one named (reads JSON only)
    "captioner:inspect_checkpoint": ("skyrt.export.captioner.loader:inspect_captioner_folder", "export"),
    # building engines from exported graphs (TensorRT / TensorRT-RTX; no torch)
    "engine:import_builder": ("skyrt.export.engine:import_builder", "tensorrt"),
    "engine:first_use_options": ("skyrt.export.engine:first_use_build_options", "tensorrt"),
    "engine:write_folder": ("skyrt.export.engine:write_engine_folder", "tensorrt"),
    "engine:write_tiny_decoder_folder": ("skyrt.export.engine:write_tiny_decoder_engine_folder", "tensorrt"),
    # subcommands whose modules the CLI imports only when it builds its parser: `skyrt export` (its
    # module imports torch only when an export runs) and `skyrt fleet` (Ray only when a fleet command runs)
    "cli:export_parser": ("skyrt.export.export_cli:add_parser", "export"),
    "cli:fleet_parser": ("skyrt.runtime.fleet.cli:add_parser", "fleet"),
}

# The exporter: the runtime runs it in a subprocess (`python -m EXPORTER ...`) so that the calling
# process never imports torch; this is the module name handed to `-m`, nothing here imports it.
EXPORTER = "skyrt.export.export_cli"
EXPORTER_EXTRA = "export"


class MissingExtraError(ImportError):
    """What a registered name needs is not installed; the message names the extra to install."""


def path_of(name: str) -> str:
    """The dotted "module:attribute" path registered under `name`."""
    try:
        return ENTRIES[name][0]
    except KeyError:
        raise KeyError(f"nothing is registered as {name!r}; known: {', '.join(sorted(ENTRIES))}") from None


def resolve(name: str) -> Any:
    """Import what `name` is registered as and return it (a class or function).

    Raises MissingExtraError naming `pip install 'skyrt[EXTRA]'` when the module (or a package it
    imports) is not installed."""
    target, extra = ENTRIES.get(name, (None, None))
    if target is None:
        path_of(name)  # raises the KeyError listing the known names
    module_name, attribute = target.split(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        raise MissingExtraError(f"{name} ({module_name}) needs the '{err.name}' module, which is not installed "
                                f"here: pip install 'skyrt[{extra}]'") from err
    return getattr(module, attribute)


def backend_class(name: str) -> type:
    """The Backend class of `name` ("torch", "onnxruntime", "tensorrt")."""
    key = f"backend:{name}"
    if key not in ENTRIES:
        raise ValueError(f"unknown backend {name!r}; available here: {', '.join(BACKENDS)}")
    return resolve(key)


BACKENDS = tuple(key.split(":", 1)[1] for key in ENTRIES if key.startswith("backend:"))

__all__ = ["BACKENDS", "ENTRIES", "EXPORTER", "MissingExtraError", "backend_class", "path_of", "resolve"]
