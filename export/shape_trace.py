"""Shape-only tracing for the ONNX exporter: the legacy (TorchScript) tracer records the graph while
the activations it flows are never computed.

Why: torch.onnx.export(dynamo=False) learns the graph by running the module once on example inputs.
At the real Wan2.1-1.3B / 480x832 shape that run is the heavy part: dit_step's example inputs hold a
[30, 1, 28080, 12, 128] K/V cache (2.6 GB each in fp16, 5.2 GB while drawn in fp32) and every layer
materialises [1, 12, 9360, 37440] attention scores (8-17 GB), far beyond this machine, while the
graph depends only on the shapes, dtypes and the ops called.

How: a TorchDispatchMode below the tracer (torch's Tracer dispatch key runs before the Python key,
so every op is still recorded by the tracer) answers each aten op whose tensor arguments include an
"activation" (a tensor derived from the example inputs) with an uncomputed tensor of the right shape
and dtype (found by running the op on the meta device). Activations are stride-0 views of one
element per dtype: no memory, no compute. Every other op runs for real, which keeps the values that
the tracer bakes into the graph exact: constants built inside forward (RoPE's pair-swap matrix,
block-causal masks from shapes) and anything computed from the weights alone (the fused q/k/v
weights, later folded by the exporter's constant folding from the real parameters).

What it relies on (and tests/test_shape_trace.py checks on tiny configs, byte for byte against the
computing trace): the traced module has no Python control flow on tensor VALUES (export/cached_step.py
is written that way: the graph is decided from shapes only) and keeps no activation beyond forward.

    with shape_only(inputs=True):   # example inputs drawn as uncomputed tensors
        spec = build_graph_spec(...)
    with shape_only():              # inside the module's forward while torch.onnx.export traces it
        out = module(*spec.args)
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes
from torch.utils.weak import WeakTensorKeyDictionary
from torch.utils._pytree import tree_flatten, tree_map

_META_THREAD = ThreadPoolExecutor(max_workers=1, thread_name_prefix="skyrt-shape-trace")
# One 1-element tensor per dtype: every activation is a stride-0 view of its dtype's seed.
_SEEDS: dict[torch.dtype, torch.Tensor] = {}


def _seed(dtype: torch.dtype) -> torch.Tensor:
    if dtype not in _SEEDS:
        _SEEDS[dtype] = torch.zeros(1, dtype=dtype)
    return _SEEDS[dtype]


# Convolutions' outputs: computed (see _Convolutions), yet activations (their inputs were).
_COMPUTED = WeakTensorKeyDictionary()


def is_activation(t: Any) -> bool:
    """True for a tensor made by this module (a view of a seed, or a convolution of one): its values
    are not the values of any input."""
    if not isinstance(t, torch.Tensor) or t.device.type != "cpu":
        return False
    if t in _COMPUTED:
        return True
    return t.dtype in _SEEDS and t.untyped_storage().data_ptr() == _SEEDS[t.dtype].untyped_storage().data_ptr()


def activation(shape, dtype: torch.dtype) -> torch.Tensor:
    """An uncomputed CPU tensor of `shape` and `dtype` (no memory: a stride-0 view of one element)."""
    shape = tuple(int(d) for d in shape)
    return _seed(dtype).reshape(()).expand(shape)


# Both below avoid reading .shape in Python: while the tracer is on, that makes traced size tensors
# (and within the tracer's own redispatch it may not be switched off).
def _to_meta(x: Any) -> Any:
    # contiguous meta twins: strides of the stride-0 views would make some view ops refuse the shape
    if isinstance(x, torch.Tensor):
        return torch.empty_like(x, device="meta", memory_format=torch.contiguous_format)
    return x


def _from_meta(x: Any) -> Any:
    if isinstance(x, torch.Tensor) and x.device.type == "meta":
        return _seed(x.dtype).reshape(()).expand_as(x)
    return x


class _ShapeOnly(TorchDispatchMode):
    """See the module docstring. inputs=True: every op's tensor outputs are activations (for drawing
    example inputs); else only the outputs of ops that read an activation."""

    def __init__(self, inputs: bool = False):
        super().__init__()
        self.inputs = inputs

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        # The tracer has recorded this op already (its key runs first); what runs here must not be
        # recorded again (the shape reads and meta twins below would be).
        state = torch._C._get_tracing_state()
        if state is None:
            return self._dispatch(func, args, kwargs or {})
        try:
            torch._C._set_tracing_state(None)
        except RuntimeError:  # within the tracer's own redispatch (its key excluded): nothing here is traced
            return self._dispatch(func, args, kwargs or {})
        try:
            return self._dispatch(func, args, kwargs or {})
        finally:
            torch._C._set_tracing_state(state)

    def _dispatch(self, func, args, kwargs):
        flat, _ = tree_flatten((args, kwargs))
        reads_activation = any(is_activation(x) for x in flat)
        if not (reads_activation or self.inputs):
            return func(*args, **kwargs)  # weights and constants: real values
        if func is torch.ops.aten._local_scalar_dense.default:
            return func(*args, **kwargs)  # .item() of an activation: its seed's value (no control flow relies on it)
        schema = func._schema
        if schema.is_mutable and args and isinstance(args[0], torch.Tensor) and is_activation(args[0]):
            return args[0]  # an in-place op on an activation: nothing to write
        meta_kwargs = {k: _to_meta(v) for k, v in kwargs.items()}
        if "generator" in meta_kwargs:
            meta_kwargs["generator"] = None  # a CPU generator refuses meta
        if "device" in meta_kwargs:
            meta_kwargs["device"] = torch.device("meta")  # factories (randn, zeros) of example inputs
        meta_args = tree_map(_to_meta, args)
        # Shapes on another thread: the tracer's state is thread-local, and meta kernels written in
        # Python read .shape, which on this thread (inside the tracer's redispatch, where the state
        # cannot be switched off) would give traced size tensors instead of ints.
        out = _META_THREAD.submit(func, *meta_args, **meta_kwargs).result()
        return tree_map(_from_meta, out)


_CONVOLUTIONS = {F.conv1d, F.conv2d, F.conv3d}


class _Convolutions(TorchFunctionMode):
    """Convolutions on activations run for real, above the dispatcher. The tracer never records
    aten::convolution (torch's DONT_RECORD_TRACE list), only the aten::_convolution that its kernel
    calls, and a call made from a TorchDispatchMode handler is never traced: so _ShapeOnly cannot
    answer it. Computed on the activations' stride-0 zeros (cheap for the DiT's one patch
    embedding: a stride-2 conv of the latents); the output counts as an activation."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func not in _CONVOLUTIONS or not any(is_activation(x) for x in tree_flatten((args, kwargs))[0]):
            return func(*args, **kwargs)
        with _disable_current_modes():  # no _ShapeOnly below: the tracer sees the whole convolution
            out = func(*args, **kwargs)
        _COMPUTED[out] = True
        return out


_DEPTH = [0]  # shape_only contexts entered (eager fast paths that pack weights check it)


def active() -> bool:
    """Whether a shape_only context is open (export/dit.py then skips its oneDNN fast path, whose
    opaque packed weights have no meta twin)."""
    return _DEPTH[0] > 0


@contextmanager
def shape_only(inputs: bool = False) -> Iterator[None]:
    """Within: ops on activations are not computed (see the module docstring); inputs=True also
    makes every tensor an op creates an activation (example inputs)."""
    _DEPTH[0] += 1
    try:
        with _ShapeOnly(inputs=inputs), _Convolutions():
            yield
    finally:
        _DEPTH[0] -= 1


__all__ = ["active", "activation", "is_activation", "shape_only"]
