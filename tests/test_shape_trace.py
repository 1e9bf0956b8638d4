"""The exporter's shape-only trace (export/shape_trace.py, export_onnx(trace="shapes")) against the
computing trace it replaces, on a tiny random model: the ONNX graphs must be the same (every node,
its attributes and every initializer's bytes), and onnxruntime CPU must give the same outputs
(<= 1e-5; identical graphs give 0) on random inputs. fp32 and fp16, with fps inputs (DF-1.3B has
them), the DiT graphs a causal preset exports (dit_step block-causal, dit_step_full) and a window graph.

Run: python -m pytest tests/test_shape_trace.py -q
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from checkpoints import randomize_scaled_  # noqa: E402
from skyrt.export import dit as D  # noqa: E402
from skyrt.export.loaders import load_components  # noqa: E402
from skyrt.export.onnx_export import OnnxProfile, export_onnx  # noqa: E402
from skyrt.export.shape_trace import activation, is_activation, shape_only  # noqa: E402
from skyrt.export.tiny import write_official_checkpoint  # noqa: E402
from skyrt.runtime.model_folder import inspect_model_folder  # noqa: E402

GRAPHS = ["cross_kv", "dit_step", "dit_step_full", "dit_window_causal"]
# block of 3 frames against a 3-slot ring, 2 blocks in flight, a 9-frame full step: a preset's graphs in small
PROFILE = OnnxProfile(height=32, width=48, block_frames=3, cache_blocks=3, max_active_blocks=2, window_frames=6,
                      full_step_frames=9, window_attention="causal")
CFG = replace(D.TINY, inject_sample_info=True)
TOL = 1e-5


@pytest.fixture(scope="module")
def components(tmp_path_factory):
    folder = write_official_checkpoint(tmp_path_factory.mktemp("shape-trace") / "model", dit_config=CFG)
    dit, vae, text_encoder = load_components(inspect_model_folder(folder))
    randomize_scaled_(dit, 3)
    return folder, (dit.eval(), vae.eval(), text_encoder)


def _export(components, out: Path, precision: str, trace: str, graphs: list[str]) -> dict:
    folder, parts = components
    return export_onnx(folder, out, replace(PROFILE, precision=precision), graphs=graphs, progress=False,
                       components=parts, trace=trace, ort_cpu=False)


def _graph_without_names(path: Path):
    """The graph as ONNX holds it, with nothing that is only a label (doc strings)."""
    model = onnx.load(str(path))
    for node in model.graph.node:
        node.doc_string = ""
    return model.graph


def _feeds(session, seed: int) -> dict:
    """Random inputs of the session's shapes (dynamic axes at their traced example sizes)."""
    rng = np.random.default_rng(seed)
    frames, tokens_per_frame = 6, (32 // 16) * (48 // 16)  # the traced 2 blocks; 2 x 3 tokens a frame
    sizes = {"batch": 2, "frames": frames, "tokens": frames * tokens_per_frame,
             "active_tokens": frames * tokens_per_frame}
    out = {}
    for i in session.get_inputs():
        shape = [sizes[d] if isinstance(d, str) else d for d in i.shape]
        if i.type == "tensor(bool)":
            out[i.name] = rng.random(shape) < 0.6
        elif i.type == "tensor(int64)":
            out[i.name] = rng.integers(0, 2, shape)
        else:
            dtype = np.float16 if i.type == "tensor(float16)" else np.float32
            out[i.name] = rng.standard_normal(shape).astype(dtype)
    return out


# fp32: every graph the shape trace covers in a preset export; fp16 / bf16 (the engine precisions): the
# step graph (bf16 is not run: onnxruntime's CPU provider has no bf16 MatMul; the graphs must be equal).
CASES = [("fp32", GRAPHS), ("fp16", ["dit_step"]), ("bf16", ["dit_step_full"])]


@pytest.mark.parametrize("precision,graphs", CASES, ids=[c[0] for c in CASES])
def test_shape_trace_writes_the_same_graphs(components, tmp_path, precision, graphs):
    computed = _export(components, tmp_path / "compute", precision, "compute", graphs)
    light = _export(components, tmp_path / "shapes", precision, "shapes", graphs)
    for name in graphs:
        a, b = tmp_path / "compute" / f"{name}.onnx", tmp_path / "shapes" / f"{name}.onnx"
        assert _graph_without_names(a) == _graph_without_names(b), f"{name}: the shape-only trace differs"
        assert computed["graphs"][name]["profile"] == light["graphs"][name]["profile"]
        assert computed["graphs"][name]["outputs"] == light["graphs"][name]["outputs"]
        if precision == "bf16":
            continue
        sa, sb = (ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]) for p in (a, b))
        feeds = _feeds(sa, seed=len(name))
        for x, y in zip(sa.run(None, feeds), sb.run(None, feeds)):
            assert np.isfinite(x.astype(np.float32)).all()
            assert float(np.abs(x.astype(np.float32) - y.astype(np.float32)).max()) <= TOL, name


def test_activations_cost_nothing_and_weights_stay_real():
    """Within shape_only, an op that reads an activation is not computed (a stride-0 view, the right
    shape and dtype), one that reads only real tensors is."""
    weight = torch.randn(8, 4)
    with shape_only():
        x = activation((1 << 20, 8), torch.float16)  # 16 MB if it were real
        y = x @ weight.half()
        real = weight * 2
    assert is_activation(y) and y.shape == (1 << 20, 4) and y.dtype == torch.float16
    assert y.untyped_storage().nbytes() <= 2
    assert not is_activation(real) and torch.equal(real, weight + weight)
