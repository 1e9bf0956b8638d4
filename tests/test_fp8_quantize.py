"""FP8 export (export/quantize.py): the Q/DQ graph on onnxruntime-CPU against torch with FP8-rounded weights.

The fixture is the Self-Forcing preset's tiny random checkpoint (tests/causal_checkpoints.py) exported as
dit_step (fp32). The oracle is torch: the same DiT with every quantized weight rounded to FP8 E4M3 by
torch's own float8_e4m3fn cast (per-output-channel amax / 448 scales, written here), run through
CachedStep, must match onnxruntime on the quantized graph to 1e-4; the same graph must differ from
the unquantized one by far more (a quantization that was skipped fails). The error of the FP8 graph
vs the fp32 graph is printed (-s), not asserted tightly: it is the price of FP8, not a bug.
A TensorRT-RTX AOT build of the FP8 graph runs when tensorrt_rtx is installed (built, never run here:
no GPU).

Run: python -m pytest tests/test_fp8_quantize.py -q -s
"""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from causal_checkpoints import load_recipes, write_model_folder  # noqa: E402
from skyrt.export import dit as D  # noqa: E402
from skyrt.export.cached_step import CachedStep, active_rope  # noqa: E402
from skyrt.export.loaders import load_components  # noqa: E402
from skyrt.export.preset_export import export_preset_onnx  # noqa: E402
from skyrt.export.quantize import FP8_MAX, quantize_onnx_fp8  # noqa: E402
from skyrt.runtime.causal_family import causal_model_spec, get_preset  # noqa: E402

TOL = 1e-4
PRESET = "self-forcing"
HEIGHT, WIDTH = 32, 48  # latent 4 x 6, token grid 2 x 3
RING = dict(sink_blocks=1, window_blocks=2)
# The transformer blocks' Linears that the dit_step graph holds (cross_attn.k/v live in cross_kv).
BLOCK_LINEARS = ("self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o", "cross_attn.q", "cross_attn.o",
                 "ffn.0", "ffn.2")


def _session(path: Path):
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(dit, export folder, dit_step entry): the preset's fp32 dit_step, exported from the modules held here."""
    recipe = load_recipes()["self_forcing"]
    folder = write_model_folder(recipe, tmp_path_factory.mktemp("fp8-model") / "model")
    components = load_components(causal_model_spec(folder, get_preset(PRESET)))
    out = tmp_path_factory.mktemp("fp8-onnx")
    manifest = export_preset_onnx(folder, out, PRESET, height=HEIGHT, width=WIDTH, graphs=["dit_step"],
                                  progress=False, components=components, **RING)
    return components[0], out, manifest["graphs"]["dit_step"]


@pytest.fixture(scope="module")
def weight_only(exported, tmp_path_factory):
    _, out, _ = exported
    dst = tmp_path_factory.mktemp("fp8-q") / "dit_step.fp8.onnx"
    return dst, quantize_onnx_fp8(out / "dit_step.onnx", dst)


def torch_fp8_round(weight: torch.Tensor) -> torch.Tensor:
    """weight [out, in] rounded to FP8 E4M3 per output channel by torch's cast: q * s, s = amax / 448."""
    amax = weight.abs().amax(dim=1, keepdim=True)
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    q = (weight / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q.to(torch.float32) * scale


def fake_quant_dit(dit):
    """A copy of dit with the block Linears' weights FP8-rounded (what the weight-only graph holds)."""
    import copy

    out = copy.deepcopy(dit)
    with torch.no_grad():
        for block in out.blocks:
            for name in BLOCK_LINEARS:
                linear = block.get_submodule(name)
                linear.weight.copy_(torch_fp8_round(linear.weight))
    return out


def step_case(dit, entry: dict, seed: int = 0):
    """(torch args of CachedStep, onnx feeds) of one block of active frames against a part-valid ring."""
    block = get_preset(PRESET).sampling.causal_block_size
    tokens_per_block, cfg = entry["tokens_per_block"], dit.config
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 16, block, HEIGHT // 8, WIDTH // 8, generator=g)
    t = torch.rand(1, block, generator=g) * 1000
    context = torch.randn(1, cfg.text_len, cfg.text_dim, generator=g)
    slots = RING["sink_blocks"] + RING["window_blocks"]
    shape = (cfg.num_layers, 1, slots * tokens_per_block, cfg.num_heads, cfg.head_dim)
    cache_k, cache_v = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    slot_valid = torch.tensor([[True, False, True]])
    with torch.no_grad():
        kv = dit.cross_attention_kv(context)  # the unquantized cross K/V feed both sides (cross_kv is its own graph)
    cos, sin = active_rope(dit, 5, block, HEIGHT // 16, WIDTH // 16)
    args = dict(x=x, t=t, kv=kv, cache_k=cache_k, cache_v=cache_v,
                valid=slot_valid.repeat_interleave(tokens_per_block, dim=1), cos=cos, sin=sin, block=block)
    feeds = {"latents": x.numpy(), "t_emb": D.timestep_sinusoid(t, cfg.freq_dim).numpy(),
             "cross_k": torch.stack([r.k for r in kv]).numpy(), "cross_v": torch.stack([r.v for r in kv]).numpy(),
             "cache_k": cache_k.numpy(), "cache_v": cache_v.numpy(), "slot_valid": slot_valid.numpy(),
             "rope_cos": cos.numpy(), "rope_sin": sin.numpy()}
    return args, feeds


def torch_step(dit, a: dict):
    with torch.no_grad():
        return CachedStep(dit)(a["x"], a["t"], a["kv"], a["cache_k"], a["cache_v"], a["valid"], a["cos"], a["sin"],
                               causal_block_size=a["block"])


def test_fp8_graph_equals_torch_with_fp8_rounded_weights(exported, weight_only):
    dit, out, entry = exported
    dst, report = weight_only
    args, feeds = step_case(dit, entry)
    got = _session(dst).run(None, feeds)
    ref = torch_step(fake_quant_dit(dit), args)
    fp32 = _session(out / "dit_step.onnx").run(None, feeds)
    for name, a, b, c in zip(("velocity", "new_k", "new_v"), got, ref, fp32):
        diff = float(np.abs(a - b.numpy()).max())
        vs_fp32 = float(np.abs(a - c).max())
        print(f"{name}: fp8 graph vs torch fp8-rounded {diff:.2e}, vs fp32 graph {vs_fp32:.2e} "
              f"(|fp32| max {np.abs(c).max():.2f})")
        assert diff <= TOL, name
        # A skipped (or partial) quantization would sit within TOL of the fp32 graph.
        assert vs_fp32 > 20 * TOL, name


def test_fp8_initializers_are_fp8_and_dequantize_to_torchs_rounding(exported, weight_only):
    """Exact numpy dequant of the graph's FP8 initializers == torch's FP8 rounding of the block weights,
    and what was kept high precision is the time embedding (3 GEMMs) and the head, unchanged."""
    import ml_dtypes
    from onnx import TensorProto, numpy_helper

    dit, out, _ = exported
    dst, report = weight_only
    model = onnx.load(str(dst))
    inits = {i.name: i for i in model.graph.initializer}
    fp8 = [i for i in model.graph.initializer if i.data_type == TensorProto.FLOAT8E4M3FN]
    cfg = dit.config
    assert len(fp8) == len(report.quantized) == cfg.num_layers * 6  # fused qkv, o, cross q, cross o, ffn.0, ffn.2
    assert all(len(i.dims) == 2 for i in fp8)
    kept = [w for w in report.weights if not w.quantized]
    assert sorted(w.reason.split(" ")[0] for w in kept) == ["output", "time/fps", "time/fps", "time/fps"]
    source = {i.name: i for i in onnx.load(str(out / "dit_step.onnx")).graph.initializer}
    for w in kept:
        assert np.array_equal(numpy_helper.to_array(inits[w.weight]), numpy_helper.to_array(source[w.weight]))
    dequantized = {}
    for choice in report.quantized:
        q = np.frombuffer(inits[f"{choice.weight}_fp8"].raw_data, np.uint8).view(ml_dtypes.float8_e4m3fn)
        scale = numpy_helper.to_array(inits[f"{choice.weight}_fp8_scale"])
        assert choice.axis == 0  # Gemm transB=1: weights [out, in]
        dequantized[choice.weight] = q.reshape(choice.shape).astype(np.float32) * scale[:, None]
    expected = []
    for block in fake_quant_dit(dit).blocks:
        qkv = [block.get_submodule(f"self_attn.{n}").weight for n in "qkv"]
        expected.append(torch.cat(qkv).detach().numpy())
        expected += [block.get_submodule(n).weight.detach().numpy() for n in BLOCK_LINEARS[3:]]
    assert len(expected) == len(dequantized)
    for got, want in zip(dequantized.values(), expected):  # graph order == block order
        assert np.array_equal(got, want)


def _single_gemm(path: Path, weight: np.ndarray, bias: np.ndarray) -> None:
    """A one-Gemm graph y = x @ W.T + b (x [8, in]) written to path."""
    from onnx import TensorProto, helper, numpy_helper

    node = helper.make_node("Gemm", ["x", "w", "b"], ["y"], name="gemm", transB=1)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [8, weight.shape[1]])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [8, weight.shape[0]])],
                              [numpy_helper.from_array(weight, "w"), numpy_helper.from_array(bias, "b")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))


def test_activation_qdq_uses_the_calibrated_amax_and_equals_torch_fake_quant(tmp_path):
    g = torch.Generator().manual_seed(1)
    weight, bias = torch.randn(48, 64, generator=g), torch.randn(48, generator=g)
    samples = [torch.randn(8, 64, generator=g) * s for s in (1.0, 3.0)]
    _single_gemm(tmp_path / "g.onnx", weight.numpy(), bias.numpy())
    report = quantize_onnx_fp8(tmp_path / "g.onnx", tmp_path / "q.onnx", mode="weights+activations",
                               calibration=[{"x": s.numpy()} for s in samples])
    amax = max(float(s.abs().max()) for s in samples)
    (choice,) = report.quantized
    assert choice.activation_scale == pytest.approx(amax / FP8_MAX, rel=1e-6)
    x = torch.randn(8, 64, generator=g) * 2
    got = _session(tmp_path / "q.onnx").run(None, {"x": x.numpy()})[0]
    scale = torch.tensor(choice.activation_scale, dtype=torch.float32)
    x_fq = (x / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).to(torch.float32) * scale
    want = x_fq @ torch_fp8_round(weight).T + bias
    assert float(np.abs(got - want.numpy()).max()) <= 1e-5
    plain = x @ weight.T + bias
    assert float(np.abs(got - plain.numpy()).max()) > 1e-3  # the activation and weight really were rounded


def test_weights_and_activations_on_the_step_graph_runs_and_reports_its_error(exported, tmp_path):
    dit, out, entry = exported
    calibration = [step_case(dit, entry, seed)[1] for seed in (1, 2, 3)]
    report = quantize_onnx_fp8(out / "dit_step.onnx", tmp_path / "wa.onnx", mode="weights+activations",
                               calibration=calibration)
    model = onnx.load(str(tmp_path / "wa.onnx"))
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("QuantizeLinear") == len(report.quantized) and report.calibration_samples == 3
    _, feeds = step_case(dit, entry, seed=0)
    got = _session(tmp_path / "wa.onnx").run(None, feeds)[0]
    fp32 = _session(out / "dit_step.onnx").run(None, feeds)[0]
    err = float(np.abs(got - fp32).max())
    print(f"weights+activations fp8 vs fp32 velocity: max {err:.2e} (|fp32| max {np.abs(fp32).max():.2f})")
    assert np.isfinite(got).all() and err > 20 * TOL


def test_refusals_name_the_fix(exported, tmp_path):
    _, out, _ = exported
    with pytest.raises(ValueError, match="needs calibration"):
        quantize_onnx_fp8(out / "dit_step.onnx", tmp_path / "x.onnx", mode="weights+activations")
    with pytest.raises(ValueError, match="only read with mode='weights\\+activations'"):
        quantize_onnx_fp8(out / "dit_step.onnx", tmp_path / "x.onnx", calibration=[{}])
    with pytest.raises(ValueError, match="mode="):
        quantize_onnx_fp8(out / "dit_step.onnx", tmp_path / "x.onnx", mode="int8")


def test_preset_export_fp8_records_it_in_the_manifest(exported, tmp_path):
    from onnx import TensorProto

    from skyrt.runtime.engine_manifest import file_sha256

    dit, _, _ = exported
    recipe = load_recipes()["self_forcing"]
    folder = write_model_folder(recipe, tmp_path / "model")
    manifest = export_preset_onnx(folder, tmp_path / "onnx", PRESET, height=HEIGHT, width=WIDTH, precision="fp8",
                                  graphs=["cross_kv", "dit_step"], progress=False, **RING)
    assert manifest["precision"] == "fp8"
    for name in ("cross_kv", "dit_step"):
        entry = manifest["graphs"][name]
        assert entry["precision"] == "fp8" and entry["base_precision"] == "fp16" and entry["fp8"]["quantized"] > 0
        assert entry["sha256"][entry["file"]] == file_sha256(tmp_path / "onnx" / entry["file"])
        types = {i.data_type for i in onnx.load(str(tmp_path / "onnx" / entry["file"])).graph.initializer}
        assert TensorProto.FLOAT8E4M3FN in types and TensorProto.FLOAT16 in types
    # cross_kv: each layer's cross K and V projections, and the text embedding MLP's two Linears
    assert manifest["graphs"]["cross_kv"]["fp8"]["quantized"] == 2 * dit.config.num_layers + 2


def test_trt_rtx_builds_the_fp8_graph_for_ada_and_later(exported, weight_only, tmp_path):
    pytest.importorskip("tensorrt_rtx", reason="pip install tensorrt-rtx")
    from skyrt.export.engine import BuildOptions, build_engines, graphs_from_onnx_manifest

    _, out, _ = exported
    dst, _ = weight_only
    spec = next(s for s in graphs_from_onnx_manifest(out) if s.name == "dit_step")
    spec = replace(spec, onnx_path=dst, precision="fp8")
    (path,) = build_engines([spec], tmp_path, BuildOptions(builder="tensorrt-rtx"), progress=False)
    manifest = json.loads((tmp_path / "dit_step.engine.json").read_text())
    assert manifest["precision"] == "fp8" and manifest["compute_capabilities"] == ["8.9", "12.0"]
    assert path.stat().st_size == manifest["engine_bytes"] > 0
    with pytest.raises(ValueError, match="8.9 or later"):
        build_engines([spec], tmp_path, BuildOptions(builder="tensorrt-rtx", compute_capabilities=["8.6"]),
                      progress=False)


def test_fp8_graphs_target_ada_and_later_only():
    from skyrt.export.engine import RTX_COMPUTE_CAPABILITIES, BuildOptions, build_targets

    rtx = BuildOptions(builder="tensorrt-rtx")
    assert build_targets(rtx) == list(RTX_COMPUTE_CAPABILITIES)  # other precisions: every RTX generation
    assert build_targets(rtx, "fp8") == ["8.9", "12.0"]
    assert build_targets(BuildOptions(compute_capabilities=["8.0", "8.6", "8.9", "12.0"]), "fp8") == ["8.9", "12.0"]
    with pytest.raises(ValueError, match="8.9 or later.*--compute-capability 8.9"):
        build_targets(BuildOptions(compute_capabilities=["8.0", "8.6"]), "fp8")
