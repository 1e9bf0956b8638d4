"""FP8 (E4M3) quantization of an exported ONNX graph's GEMM weights, as explicit Q/DQ for TensorRT(-RTX).

    report = quantize_onnx_fp8("dit_step.onnx", "dit_step.fp8.onnx")                       # weight-only
    report = quantize_onnx_fp8(src, dst, mode="weights+activations", calibration=[feeds, ...])

What TensorRT-RTX does with it (its "Working with Quantized Types" guide, TensorRT-RTX 1.x): reduced
precision is explicit only — Q/DQ nodes in the ONNX graph (QuantizeLinear / DequantizeLinear with
FLOAT8E4M3FN, opset 19+), no builder precision flags; FP8 is supported for matrix multiplications
only, and only on Ada and later (compute capability 8.9+: RTX 40xx, RTX 50xx / 12.0), so an FP8 engine
is built for those targets only (export/engine.py FP8_COMPUTE_CAPABILITIES).

Two modes:
- "weights" (weight-only): each chosen weight W becomes an FP8 initializer plus a per-output-channel
  float scale and a DequantizeLinear in front of its MatMul/Gemm. The stored weights are 4x smaller
  than fp32 (2x than fp16); the GEMM itself runs in the graph's float type after the dequantize.
- "weights+activations": in addition the GEMM's activation input gets QuantizeLinear ->
  DequantizeLinear with one per-tensor scale, amax / 448 over `calibration` (a list of feed dicts run
  through the unquantized graph on onnxruntime's CPU provider). With both inputs of a GEMM behind
  Q/DQ, TensorRT can run the GEMM itself in FP8 on the tensor cores.

Scales: s[c] = max|W[c, :]| / 448 per output channel c (448 = the largest finite E4M3FN value), so
every channel uses the whole FP8 range; an all-zero channel gets s = 1. q = round_to_nearest_even(W / s)
in E4M3FN (ml_dtypes' cast, the same rounding as torch's float8_e4m3fn); the graph computes q * s.

Which weights are quantized (select_fp8_weights): the 2-D float initializers that are the weight
input of a MatMul or Gemm, i.e. the transformer blocks' attention projections (the fused q/k/v, o, the
cross-attention q and o; in cross_kv, each layer's K/V projections and the text embedding MLP) and FFN
layers. Kept in their original precision,
with the reason recorded in the report:
- the time / fps embedding MLPs and the modulation projection (GEMMs fed only from the graph inputs
  t_emb / fps): they make the scale, shift and gate of every block, so an error there multiplies every
  activation of the step, and they run once per frame, not per token: no speed to win;
- the output head ("head" in the node or weight name): its result is the velocity itself, and it is
  one dim x 64 GEMM;
- weights under MIN_ELEMENTS elements (nothing to save, and TensorRT runs them faster unquantized);
- everything that is not a GEMM weight: norms (LayerNormalization / RMS norm, kept fp32 by the export
  anyway), biases, modulation tables, the patch embedding Conv, RoPE's constant pair-swap matrices
  (Constant nodes, not initializers), and the attention score / value products (activation x
  activation: TensorRT's FP8 attention is a separate fused path that this transform does not ask for).

The transform raises the graph's default-domain opset to 19 when it is lower (FP8 Q/DQ needs 19; the
ops skyrt's exports use mean the same in 18 and 19). A graph whose weights were in external data is
written with external data again. onnx.checker runs on the result.

This module imports no torch (numpy, onnx, ml_dtypes; onnxruntime only for calibration).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

FP8_MAX = 448.0  # largest finite float8 E4M3FN value
FP8_OPSET = 19  # QuantizeLinear / DequantizeLinear take FLOAT8E4M3FN from opset 19
MODES = ("weights", "weights+activations")
MIN_ELEMENTS = 1024  # smaller GEMM weights stay in the graph's precision (see the module docstring)
# Graph inputs whose GEMMs are conditioning embeddings (time / fps MLPs), kept high precision.
CONDITIONING_INPUTS = ("t_emb", "fps")
_GEMM_OPS = ("MatMul", "Gemm")


@dataclass
class Fp8Choice:
    """One GEMM weight considered: quantized (axis = its output-channel axis) or kept (reason)."""

    node: str
    weight: str
    shape: list[int]
    quantized: bool
    reason: str = ""
    axis: int | None = None
    activation: str | None = None  # the GEMM's activation input (the tensor Q/DQ goes on)
    activation_scale: float | None = None
    max_abs_error: float | None = None  # max |dequant(q) - W| of this weight


@dataclass
class Fp8Report:
    """What quantize_onnx_fp8 did: mode, opset, every weight considered, bytes before and after."""

    mode: str
    src: str
    dst: str
    opset: int
    weights: list[Fp8Choice] = field(default_factory=list)
    initializer_bytes_before: int = 0
    initializer_bytes_after: int = 0
    calibration_samples: int = 0

    @property
    def quantized(self) -> list[Fp8Choice]:
        return [w for w in self.weights if w.quantized]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: counts, bytes and the per-weight list (what the export manifest records)."""
        out = asdict(self)
        out["quantized_count"] = len(self.quantized)
        out["kept_count"] = len(self.weights) - len(self.quantized)
        return out


def fp8_quantize_weight(weight: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """(q, scale): q float8_e4m3fn of weight's shape, scale float32 [weight.shape[axis]], with
    weight ~= q * scale broadcast along `axis` (per-output-channel, amax / 448)."""
    import ml_dtypes

    w = np.asarray(weight, np.float32)
    reduce_axes = tuple(a for a in range(w.ndim) if a != axis)
    amax = np.abs(w).max(axis=reduce_axes)
    scale = np.where(amax > 0, amax / np.float32(FP8_MAX), np.float32(1.0)).astype(np.float32)
    shaped = scale.reshape([-1 if a == axis else 1 for a in range(w.ndim)])
    # amax / (amax / 448) can round to a hair above 448: clip so the cast never overflows to NaN.
    q = np.clip(w / shaped, -FP8_MAX, FP8_MAX).astype(ml_dtypes.float8_e4m3fn)
    return q, scale


def fp8_dequantize_weight(q: np.ndarray, scale: np.ndarray, axis: int) -> np.ndarray:
    """q * scale along `axis`, in float32: what the graph's DequantizeLinear computes."""
    shaped = np.asarray(scale, np.float32).reshape([-1 if a == axis else 1 for a in range(q.ndim)])
    return q.astype(np.float32) * shaped


def select_fp8_weights(model) -> list[Fp8Choice]:
    """Every MatMul/Gemm weight initializer of `model` (an onnx ModelProto), quantized or kept with
    the reason (module docstring)."""
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    conditioning_only = _fed_only_by(graph, CONDITIONING_INPUTS)
    uses: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            uses[name] = uses.get(name, 0) + 1
    choices = []
    for node in graph.node:
        if node.op_type not in _GEMM_OPS or len(node.input) < 2 or node.input[1] not in inits:
            continue
        weight = inits[node.input[1]]
        shape = [int(d) for d in weight.dims]
        axis = _output_axis(node)
        choice = Fp8Choice(node=node.name, weight=weight.name, shape=shape, quantized=False, axis=axis,
                           activation=node.input[0])
        choice.reason = _keep_reason(node, weight, shape, axis, conditioning_only, uses)
        choice.quantized = not choice.reason
        choices.append(choice)
    return choices


def _keep_reason(node, weight, shape: list[int], axis: int | None, conditioning_only: set[str],
                 uses: Mapping[str, int]) -> str:
    """Why a GEMM weight stays unquantized ('' = quantize it)."""
    from onnx import TensorProto

    if weight.data_type not in (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16):
        return "not a float weight"
    if len(shape) != 2 or axis is None:
        return "not a 2-D GEMM weight"
    if node.input[0] in conditioning_only:
        return f"time/fps embedding (fed only by {', '.join(CONDITIONING_INPUTS)}): modulates every block"
    if "head" in node.name.lower() or "head" in weight.name.lower():
        return "output head: its result is the velocity itself"
    if int(np.prod(shape)) < MIN_ELEMENTS:
        return f"small ({int(np.prod(shape))} < {MIN_ELEMENTS} elements)"
    if uses.get(weight.name, 0) != 1:
        return "weight shared by several nodes"
    return ""


def _output_axis(node) -> int | None:
    """The output-channel axis of a GEMM's weight: MatMul B [K, N] -> 1; Gemm transB=1 B [N, K] -> 0."""
    if node.op_type == "MatMul":
        return 1
    attrs = {a.name: a.i for a in node.attribute}
    if attrs.get("transA", 0):
        return None  # not what skyrt's exports write; leave it alone
    return 0 if attrs.get("transB", 0) else 1


def _fed_only_by(graph, inputs: Sequence[str]) -> set[str]:
    """Tensors computed only from the graph inputs `inputs` (and constants): the conditioning path."""
    from_other = {i.name for i in graph.input if i.name not in inputs}
    from_cond = {i.name for i in graph.input if i.name in inputs}
    for node in graph.node:  # ONNX nodes are topologically sorted
        names = [n for n in node.input if n]
        if any(n in from_other for n in names):
            from_other.update(node.output)
        elif any(n in from_cond for n in names):
            from_cond.update(node.output)
    return from_cond - from_other


def calibrate_amax(model, tensors: Sequence[str], calibration: Iterable[Mapping[str, np.ndarray]]) -> tuple[dict[str, float], int]:
    """(max |value| of each of `tensors` over the calibration feeds, number of samples), running the
    (unquantized) model on onnxruntime's CPU provider with those tensors as extra outputs."""
    import onnx
    import onnxruntime as ort

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    known = {o.name for o in probe.graph.output}
    types = _tensor_types(probe)
    for name in tensors:
        if name not in known:
            probe.graph.output.append(onnx.helper.make_tensor_value_info(name, types[name], None))
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(probe.SerializeToString(), options, providers=["CPUExecutionProvider"])
    amax = {name: 0.0 for name in tensors}
    samples = 0
    for feeds in calibration:
        values = session.run(list(tensors), dict(feeds))
        for name, value in zip(tensors, values):
            amax[name] = max(amax[name], float(np.abs(np.asarray(value, np.float32)).max()))
        samples += 1
    if samples == 0:
        raise ValueError("mode='weights+activations' needs calibration: a non-empty list of feed dicts "
                         "(graph input name -> array) that the graph sees in use")
    return amax, samples


def _tensor_types(model) -> dict[str, int]:
    """Element type of every tensor: from initializers, inputs and onnx shape inference."""
    import onnx

    inferred = onnx.shape_inference.infer_shapes(model)
    types = {i.name: i.data_type for i in model.graph.initializer}
    for vi in [*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output]:
        types[vi.name] = vi.type.tensor_type.elem_type
    return types


def quantize_model_fp8(model, mode: str = "weights", calibration: Iterable[Mapping[str, np.ndarray]] | None = None,
                       src: str = "", dst: str = "") -> Fp8Report:
    """Quantize `model` (an onnx ModelProto, changed in place) as quantize_onnx_fp8 does; the report."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    if mode not in MODES:
        raise ValueError(f"mode={mode!r}: choose {' or '.join(repr(m) for m in MODES)}")
    if calibration is not None and mode == "weights":
        raise ValueError("calibration is only read with mode='weights+activations' (weight-only needs none)")
    graph = model.graph
    _name_nodes(graph)
    report = Fp8Report(mode=mode, src=src, dst=dst, opset=_raise_opset(model),
                       initializer_bytes_before=_initializer_bytes(graph))
    report.weights = select_fp8_weights(model)
    chosen = report.quantized
    if not chosen:
        raise ValueError(f"{src or 'the graph'} has no GEMM weight to quantize (kept: "
                         f"{sorted({w.reason for w in report.weights}) or 'no MatMul/Gemm weights'})")
    if mode == "weights+activations":
        amax, report.calibration_samples = calibrate_amax(model, sorted({c.activation for c in chosen}), calibration or [])
    inits = {i.name: i for i in graph.initializer}
    new_nodes: dict[str, list] = {}  # GEMM node name -> the Q/DQ nodes that go before it
    for choice in chosen:
        init = inits[choice.weight]
        float_type = init.data_type
        np_float = helper.tensor_dtype_to_np_dtype(float_type) if float_type != TensorProto.BFLOAT16 else None
        w = numpy_helper.to_array(init).astype(np.float32)
        q, scale = fp8_quantize_weight(w, choice.axis)
        choice.max_abs_error = float(np.abs(fp8_dequantize_weight(q, scale, choice.axis) - w).max())
        q_name, s_name = f"{choice.weight}_fp8", f"{choice.weight}_fp8_scale"
        graph.initializer.remove(init)
        graph.initializer.append(_fp8_tensor(q, q_name))
        graph.initializer.append(_float_tensor(scale, s_name, float_type, np_float))
        dq_out = f"{choice.weight}_dequantized"
        nodes = [helper.make_node("DequantizeLinear", [q_name, s_name], [dq_out], name=f"{choice.node}/weight_dq",
                                  axis=choice.axis)]
        _rename_input(graph, choice.node, 1, dq_out)
        if mode == "weights+activations":
            choice.activation_scale = max(amax[choice.activation], 1e-12) / FP8_MAX
            a_scale, a_zero = f"{choice.node}/act_scale", f"{choice.node}/act_zero"
            graph.initializer.append(_float_tensor(np.asarray(choice.activation_scale, np.float32), a_scale,
                                                   float_type, np_float))
            graph.initializer.append(helper.make_tensor(a_zero, TensorProto.FLOAT8E4M3FN, [], [0.0]))
            q_act, dq_act = f"{choice.node}/act_fp8", f"{choice.node}/act_dequantized"
            nodes += [helper.make_node("QuantizeLinear", [choice.activation, a_scale, a_zero], [q_act],
                                       name=f"{choice.node}/act_q"),
                      helper.make_node("DequantizeLinear", [q_act, a_scale, a_zero], [dq_act],
                                       name=f"{choice.node}/act_dq")]
            _rename_input(graph, choice.node, 0, dq_act)
        new_nodes[choice.node] = nodes
    _insert_before(graph, new_nodes)
    report.initializer_bytes_after = _initializer_bytes(graph)
    onnx.checker.check_model(model, full_check=False)
    return report


def quantize_onnx_fp8(src_path: str | Path, dst_path: str | Path, *, mode: str = "weights",
                      calibration: Iterable[Mapping[str, np.ndarray]] | None = None) -> Fp8Report:
    """Write an FP8 Q/DQ copy of the ONNX graph `src_path` to `dst_path`; returns the Fp8Report.

    mode: "weights" (weight-only, per-output-channel scales) or "weights+activations" (plus per-tensor
    activation Q/DQ before each quantized GEMM, scales from `calibration`: a list of feed dicts, graph
    input name -> numpy array, run through the unquantized graph). Which weights stay unquantized,
    and why: the module docstring. dst_path may equal src_path only if the graph has no external data."""
    import onnx

    src_path, dst_path = Path(src_path), Path(dst_path)
    model = onnx.load(str(src_path), load_external_data=True)
    external = _has_external_data(onnx.load(str(src_path), load_external_data=False))
    report = quantize_model_fp8(model, mode, calibration, src=src_path.name, dst=dst_path.name)
    dst_path.parent.mkdir(parents=True, exist_ok=True)
    if external:
        data = dst_path.with_name(dst_path.name + ".data")
        data.unlink(missing_ok=True)
        onnx.save_model(model, str(dst_path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data.name, size_threshold=1024)
    else:
        onnx.save_model(model, str(dst_path))
    onnx.checker.check_model(str(dst_path), full_check=False)  # path-based: covers external data
    return report


def _raise_opset(model) -> int:
    """Set the default-domain opset to at least FP8_OPSET; returns it."""
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            entry.version = max(int(entry.version), FP8_OPSET)
            return int(entry.version)
    model.opset_import.add(domain="", version=FP8_OPSET)
    return FP8_OPSET


def _fp8_tensor(q: np.ndarray, name: str):
    """An FLOAT8E4M3FN initializer holding q's bytes as they are (no second rounding)."""
    from onnx import TensorProto, helper

    return helper.make_tensor(name, TensorProto.FLOAT8E4M3FN, list(q.shape), q.view(np.uint8).tobytes(), raw=True)


def _float_tensor(values: np.ndarray, name: str, float_type: int, np_float):
    """A scale initializer in the graph's float type (DequantizeLinear's output takes the scale's type)."""
    from onnx import TensorProto, helper, numpy_helper

    if float_type == TensorProto.BFLOAT16:
        import ml_dtypes

        bits = np.asarray(values, np.float32).astype(ml_dtypes.bfloat16).view(np.uint16)
        return helper.make_tensor(name, TensorProto.BFLOAT16, list(np.shape(values)), bits.tobytes(), raw=True)
    return numpy_helper.from_array(np.asarray(values, np_float), name)


def _name_nodes(graph) -> None:
    """Give unnamed or duplicate-named nodes unique names (the transform finds GEMMs by name)."""
    seen: set[str] = set()
    for index, node in enumerate(graph.node):
        if not node.name or node.name in seen:
            node.name = f"{node.op_type}_{index}_fp8"
        seen.add(node.name)


def _rename_input(graph, node_name: str, index: int, new: str) -> None:
    for node in graph.node:
        if node.name == node_name:
            node.input[index] = new
            return
    raise KeyError(node_name)


def _insert_before(graph, new_nodes: Mapping[str, list]) -> None:
    """Rebuild the node list with each GEMM's Q/DQ nodes right before it (keeps topological order)."""
    nodes = list(graph.node)
    del graph.node[:]
    for node in nodes:
        graph.node.extend(new_nodes.get(node.name, []))
        graph.node.append(node)


def _initializer_bytes(graph) -> int:
    from onnx import numpy_helper

    return sum(len(i.raw_data) if i.HasField("raw_data") else numpy_helper.to_array(i).nbytes
               for i in graph.initializer)


def _has_external_data(model) -> bool:
    from onnx import TensorProto

    return any(i.data_location == TensorProto.EXTERNAL for i in model.graph.initializer)


__all__ = ["FP8_MAX", "Fp8Choice", "Fp8Report", "MODES", "calibrate_amax", "fp8_dequantize_weight",
           "fp8_quantize_weight", "quantize_model_fp8", "quantize_onnx_fp8", "select_fp8_weights"]
