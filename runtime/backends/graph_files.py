"""One graph of an ONNX export folder as the exported-graph backends see it: its manifest entry, the file
to run per provider, its I/O dtypes and static shapes. Shared by the backends and their bound decoders."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

NP_DTYPES = {"float32": np.float32, "float16": np.float16, "int64": np.int64, "bool": np.bool_}
# ORT's CPU provider has no bfloat16 MatMul (it refuses bf16 MatMul nodes): bf16 exports are for TensorRT.
ORT_CPU_VARIANT = "ort_cpu"  # manifest key of a graph's CPU-provider variant (export/onnx_export.py)


@dataclass
class GraphFile:
    """One graph of one export folder."""

    name: str
    folder: Path
    entry: dict

    @property
    def path(self) -> Path:
        return self.folder / self.entry["file"]

    def path_for(self, provider: str) -> Path:
        """The file to run on `provider`: a DiT graph's onnxruntime-CPU variant (contrib ops, see
        export/onnx_export.py ORT_CPU_VARIANT) on the CPU provider when the export has one, else the
        graph itself (what TensorRT builds)."""
        variant = self.entry.get(ORT_CPU_VARIANT)
        if variant is not None and provider in variant.get("providers", ()):
            return self.folder / variant["file"]
        return self.path

    def input_dtype(self, name: str):
        for spec in self.entry["inputs"]:
            if spec["name"] == name:
                return NP_DTYPES[spec["dtype"]]
        raise KeyError(f"{self.name} has no input {name!r}")

    def input_shape(self, name: str) -> list:
        return next(s["shape"] for s in self.entry["inputs"] if s["name"] == name)

    def matches(self, needs: dict) -> bool:
        static = self.entry.get("shape_config", {})  # the static shapes the graph was exported for
        return all(static.get(k) == v for k, v in needs.items())


__all__ = ["GraphFile", "NP_DTYPES", "ORT_CPU_VARIANT"]
