"""Admission by memory: a stream starts on a logical GPU only if its memory plan fits what is free there.

The fleet config declares its logical GPUs and their memory (`gpus: [{name: gpu0, memory: 24GiB}]`,
config.py); each stream's memory comes from its shapes (runtime/memory_plan.py: its model or preset,
resolution, ring and precision, resolved as `skyrt serve --explain` resolves them, without loading the
model). The controller (actors.py) admits streams in order, first fit, and refuses a stream that fits
nowhere with the numbers: what it needs, split into weights, cache and activations, and what each
GPU has free.

Weights are shared by the streams of one process (MemoryPlan.total_bytes); a fleet stream is a
`skyrt serve` process of its own, so each stream here pays its own weights.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from ..memory_plan import GIB, MemoryPlan, StreamShape, folder_weights, plan_stream, preset_shape
from .config import LogicalGpu, check_serve_flags, parse_memory  # noqa: F401  (LogicalGpu: re-exported)

class AdmissionRefused(ValueError):
    """A stream that fits on no logical GPU; the message has the figures, and so do the fields."""

    def __init__(self, stream_id: str, needed: int, free: dict[str, int], plan: MemoryPlan):
        self.stream_id, self.needed_bytes, self.free_bytes, self.plan = stream_id, needed, free, plan
        frees = ", ".join(f"{name} {_gib(b)}" for name, b in free.items()) or "no GPUs declared"
        super().__init__(
            f"stream {stream_id!r} does not fit: it needs {_gib(needed)} ({plan.precision}: weights "
            f"{_gib(plan.weights_bytes)} + cache {_gib(plan.cache_bytes)} + activations "
            f"{_gib(plan.activation_bytes)}); free: {frees}. Lower its resolution or ring, pick a smaller "
            "precision, or add a GPU to the fleet's gpus")


def _gib(nbytes: int) -> str:
    return f"{nbytes / GIB:.3f} GiB"


@dataclass
class Admission:
    """Which admitted stream sits on which GPU with how many bytes (the controller's bookkeeping)."""

    gpus: tuple[LogicalGpu, ...]
    placed: dict[str, tuple[str, int]] = field(default_factory=dict)  # stream id -> (gpu, bytes)

    def free_bytes(self) -> dict[str, int]:
        used = {g.name: 0 for g in self.gpus}
        for gpu, nbytes in self.placed.values():
            used[gpu] = used.get(gpu, 0) + nbytes
        return {g.name: g.usable_bytes - used[g.name] for g in self.gpus}

    def admit(self, stream_id: str, plan: MemoryPlan) -> str:
        """The GPU the stream goes on (first fit); AdmissionRefused if it fits on none. A stream already
        placed is placed again (its plan may have changed)."""
        self.placed.pop(stream_id, None)
        needed = plan.total_bytes(1)  # its own process: weights + one stream
        free = self.free_bytes()
        for gpu in self.gpus:
            if needed <= free[gpu.name]:
                self.placed[stream_id] = (gpu.name, needed)
                return gpu.name
        raise AdmissionRefused(stream_id, needed, free, plan)

    def release(self, stream_id: str) -> None:
        self.placed.pop(stream_id, None)

    def gpu_of(self, stream_id: str) -> str | None:
        entry = self.placed.get(stream_id)
        return None if entry is None else entry[0]


# ------------------------------------------------------------------------------------- plans
def stream_plan(stream) -> MemoryPlan:
    """The memory plan of a fleet stream (a StreamConfig): its request resolved as `skyrt serve` would
    resolve it (model folder's recommendation, preset, the stream's keys), no model loaded."""
    from ..model_config import DiTConfig
    from ..cli import _model_folder, serve_sampling
    from ..model_folder import inspect_model_folder
    from ..resolve import FLEET_YAML, Settings, folder_layers, resolve_request

    args = check_serve_flags(stream)
    sampling, prompt = serve_sampling(args, FLEET_YAML)
    settings = Settings({**sampling.user, "prompt": prompt.prompt}, sampling.surface, sampling.command,
                        sampling.command_name)
    folder = _model_folder(args)
    req = resolve_request(settings, folder_layers(folder, args.preset), stream=True).request
    if args.preset is not None:
        cfg, shape = preset_shape(args.preset, req.height, req.width)
        shape = StreamShape(**{**shape.__dict__, "sink_blocks": req.sink_blocks, "window_blocks": req.window_blocks})
    else:
        cfg = DiTConfig.from_official(inspect_model_folder(folder).dit_config)
        ar_step = req.ar_step or req.num_inference_steps
        shape = StreamShape(req.height, req.width, block_frames=req.causal_block_size, sink_blocks=req.sink_blocks,
                            window_blocks=req.window_blocks, blocks_in_flight=max(1, math.ceil(req.num_inference_steps
                                                                                                / ar_step)),
                            contexts=2 if req.guidance_scale > 1.0 else 1,
                            history_buffers=3 if req.sampler == "unipc" else 0)
    if args.preset is not None:
        return plan_stream(cfg, shape, stream.precision)
    return plan_stream(cfg, shape, stream.precision, other_weights=folder_weights(folder))
