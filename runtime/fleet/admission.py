"""Admission by memory: a stream starts on a logical GPU only if its memory plan fits what is free there.

The fleet config declares its logical GPUs and their memory (`gpus: [{name: gpu0, memory: 24GiB}]`,
config.py); each stream's memory comes from its shapes (runtime/memory_plan.py: its model or preset,
resolution, ring and precision, resolved as `skyrt serve --explain` resolves them, without loading the
model). The controller (actors.py) admits streams in order and refuses a stream that fits nowhere with
the numbers: what it needs on each GPU, split into weights, cache and activations, and what each GPU
has free.

Every stream admitted on a logical GPU generates in that GPU's one process (gpu_worker.py), where the
streams of one model share one loaded copy (shared_models.py). So a GPU pays a model's weights once,
for its first stream of that model, and cache + activations for every stream. A stream goes to the
first GPU that already holds its model and has room, else to the first GPU with room for weights and
stream.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from ..memory_plan import GIB, MemoryPlan, StreamShape, folder_weights, plan_stream, preset_shape
from .config import LogicalGpu, check_serve_flags, parse_memory  # noqa: F401  (LogicalGpu: re-exported)
from .shared_models import ModelKey, model_key


class AdmissionRefused(ValueError):
    """A stream that fits on no logical GPU; the message has the figures, and so do the fields
    (`needed_bytes` and `free_bytes`: by GPU name)."""

    def __init__(self, stream_id: str, needed: dict[str, int], free: dict[str, int], plan: MemoryPlan):
        self.stream_id, self.needed_bytes, self.free_bytes, self.plan = stream_id, needed, free, plan
        gpus = "; ".join(f"{name}: needs {_gib(needed[name])}"
                         + (" (its weights are loaded there)" if needed[name] < plan.total_bytes(1) else "")
                         + f", free {_gib(b)}" for name, b in free.items()) or "no GPUs declared"
        super().__init__(
            f"stream {stream_id!r} does not fit: {plan.precision} weights {_gib(plan.weights_bytes)} (once per GPU "
            f"and model) + cache {_gib(plan.cache_bytes)} + activations {_gib(plan.activation_bytes)} per stream; "
            f"{gpus}. Lower its resolution or ring, pick a smaller precision, or add a GPU to the fleet's gpus")


def _gib(nbytes: int) -> str:
    return f"{nbytes / GIB:.3f} GiB"


@dataclass(frozen=True)
class Booking:
    """One admitted stream: its GPU, its model, and the bytes its plan gives."""

    gpu: str
    key: ModelKey
    per_stream_bytes: int
    weights_bytes: int


@dataclass
class Admission:
    """Which admitted stream sits on which GPU with which model (the controller's bookkeeping)."""

    gpus: tuple[LogicalGpu, ...]
    placed: dict[str, Booking] = field(default_factory=dict)  # stream id -> its booking

    def weights_on(self, gpu: str) -> dict[ModelKey, int]:
        """The models loaded on `gpu` and their weights (counted once, whatever the number of streams)."""
        weights: dict[ModelKey, int] = {}
        for booking in self.placed.values():
            if booking.gpu == gpu:
                weights[booking.key] = max(weights.get(booking.key, 0), booking.weights_bytes)
        return weights

    def used_bytes(self, gpu: str) -> int:
        streams = sum(b.per_stream_bytes for b in self.placed.values() if b.gpu == gpu)
        return streams + sum(self.weights_on(gpu).values())

    def free_bytes(self) -> dict[str, int]:
        return {g.name: g.usable_bytes - self.used_bytes(g.name) for g in self.gpus}

    def needed_bytes(self, key: ModelKey, plan: MemoryPlan) -> dict[str, int]:
        """What the stream would add on each GPU: cache + activations, plus the weights where its model
        is not loaded yet."""
        return {g.name: plan.per_stream_bytes + (0 if key in self.weights_on(g.name) else plan.weights_bytes)
                for g in self.gpus}

    def admit(self, stream_id: str, plan: MemoryPlan, key: ModelKey) -> str:
        """The GPU the stream goes on; AdmissionRefused if it fits on none. A stream already placed is
        placed again (its plan may have changed)."""
        self.placed.pop(stream_id, None)
        needed, free = self.needed_bytes(key, plan), self.free_bytes()
        sharing = [g for g in self.gpus if key in self.weights_on(g.name)]
        for gpu in sharing + [g for g in self.gpus if g not in sharing]:
            if needed[gpu.name] <= free[gpu.name]:
                self.placed[stream_id] = Booking(gpu.name, key, plan.per_stream_bytes, plan.weights_bytes)
                return gpu.name
        raise AdmissionRefused(stream_id, needed, free, plan)

    def release(self, stream_id: str) -> None:
        self.placed.pop(stream_id, None)

    def gpu_of(self, stream_id: str) -> str | None:
        booking = self.placed.get(stream_id)
        return None if booking is None else booking.gpu

    def booking_json(self, stream_id: str) -> dict | None:
        """The stream's booking as status shows it: its GPU, its own bytes, its model's weights (once per
        GPU: `weights_shared_with` lists the other streams of that copy), and what the GPU has free."""
        booking = self.placed.get(stream_id)
        if booking is None:
            return None
        others = sorted(sid for sid, b in self.placed.items()
                        if sid != stream_id and b.gpu == booking.gpu and b.key == booking.key)
        return {"gpu": booking.gpu, "model": booking.key.label(), "per_stream_bytes": booking.per_stream_bytes,
                "weights_bytes": booking.weights_bytes, "weights_shared_with": others,
                "gpu_used_bytes": self.used_bytes(booking.gpu), "gpu_free_bytes": self.free_bytes()[booking.gpu]}


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


def stream_spec(stream):
    """The PipelineSpec a fleet stream (a StreamConfig) loads, as `skyrt serve` would build it."""
    from ..cli import pipeline_spec

    return pipeline_spec(check_serve_flags(stream))


def stream_model_key(stream) -> ModelKey:
    """The key of the model copy the stream runs on (streams with one key share weights on a GPU)."""
    return model_key(stream_spec(stream), stream.precision)
