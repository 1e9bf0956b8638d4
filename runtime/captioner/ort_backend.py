"""The captioner's exported graphs under onnxruntime (a CaptionerBackend, see decoding.py)."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np


class OrtCaptionerBackend:
    """The exported graphs under onnxruntime; the K/V cache is the list of present tensors."""

    def __init__(self, onnx_dir: str | Path, manifest: dict, threads: int | None = None,
                 providers: Sequence[str] | None = None):
        import onnxruntime as ort

        self.dir = Path(onnx_dir)
        self.manifest = manifest
        options = ort.SessionOptions()
        options.log_severity_level = 3
        if threads:
            options.intra_op_num_threads = threads
        providers = list(providers or ["CPUExecutionProvider"])
        graphs = manifest["graphs"]
        self.vision_session = ort.InferenceSession(str(self.dir / graphs["vision"]["file"]), options,
                                                   providers=providers)
        self.decoder_session = ort.InferenceSession(str(self.dir / graphs["decoder_prefill"]["file"]), options,
                                                    providers=providers)
        if "CUDAExecutionProvider" in providers and "CUDAExecutionProvider" not in self.decoder_session.get_providers():
            # onnxruntime-gpu quietly runs on the CPU when CUDA is missing: say so.
            raise RuntimeError("onnxruntime fell back to the CPU: CUDAExecutionProvider is not available here")
        self.vision_names = {i.name for i in self.vision_session.get_inputs()}
        cfg = manifest["captioner"]
        self.num_layers = cfg["num_layers"]
        self.kv_shape = (1, cfg["num_kv_heads"], 0, cfg["head_dim"])
        self.dtype = np.float16 if manifest["precision"] == "fp16" else np.float32
        self.present_names = [n for i in range(self.num_layers) for n in (f"present_key_{i}", f"present_value_{i}")]

    def vision(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        feeds = {k: v for k, v in feeds.items() if k in self.vision_names}
        return self.vision_session.run(["features"], feeds)[0]

    def empty_cache(self) -> list[np.ndarray]:
        return [np.zeros(self.kv_shape, dtype=self.dtype) for _ in range(2 * self.num_layers)]

    def decoder(self, embeds: np.ndarray, position_ids: np.ndarray, cache: list[np.ndarray]):
        feeds = {"inputs_embeds": embeds.astype(self.dtype, copy=False), "position_ids": position_ids}
        for i in range(self.num_layers):
            feeds[f"past_key_{i}"] = cache[2 * i]
            feeds[f"past_value_{i}"] = cache[2 * i + 1]
        outputs = self.decoder_session.run(["logits", *self.present_names], feeds)
        return outputs[0], outputs[1:]

