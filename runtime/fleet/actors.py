"""The fleet's Ray actors: one FleetController per fleet, one StreamActor per stream.

    FleetController  named, detached, on the head node, 0 CPUs. Owns the fleet's state file
                     (store.py): creates and removes stream actors, hands a restarted stream its
                     saved prompt and playlist position, counts restarts, answers status.
    StreamActor      named, detached, `max_restarts=-1`: one stream (stream_host.py) that owns its
                     GPU (`num_gpus=1` by default for a CUDA device) or a fixed number of CPUs.
                     Ray restarts it, with the same config, when its process or node dies; a
                     stream in a fault loop exits on purpose to be restarted the same way.
    GpuWorker        with admission by memory (config `gpus`) only: one per logical GPU
                     (gpu_worker.py), the process that holds the weights and generates for every
                     stream booked on that GPU; its stream actors keep HTTP and encoding, no GPU.

Actors are placed with Ray's SPREAD strategy; an actor Ray cannot place stays in Ray's queue and is
reported as pending (never dropped). Names live in the `skyrt-fleet` namespace:
`<fleet>/controller` and `<fleet>/stream/<id>`.
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import time

import ray

from .admission import Admission, AdmissionRefused, stream_model_key, stream_plan
from .gpu_worker import GpuWorker, RemotePipeline, gpu_worker_name
from .config import NAMESPACE, StreamConfig
from .store import FleetState, FleetStore, StreamRecord, merge_declared
from .stream_host import HostSettings, StreamHost

log = logging.getLogger("skyrt.fleet")

PROBE_TIMEOUT_S = 1.5  # a stream actor that does not answer within this is reported by Ray's view of it
SHUTDOWN_TIMEOUT_S = 15.0
FAULT_EXIT_CODE = 70  # a stream that cannot recover exits with this; Ray restarts it
# Ray's resource that exists on the head node only: pins the controller (and its state file) there.
HEAD_NODE_RESOURCE = "node:__internal_head__"


def controller_name(fleet: str) -> str:
    return f"{fleet}/controller"


def stream_actor_name(fleet: str, stream_id: str) -> str:
    return f"{fleet}/stream/{stream_id}"


def ray_actor_state(actor_id: str | None) -> str | None:
    """Ray's own state of an actor (ALIVE, PENDING_CREATION, RESTARTING, DEAD, ...) from the GCS,
    None if unknown. Ray's public state API needs the dashboard, which a fleet does not start, so
    this reads the GCS actor table (Ray marks it a debugging interface: kept to this one function)."""
    if actor_id is None:
        return None
    try:
        from ray._private import state

        return state.actors(actor_id=actor_id).get("State")
    except Exception:  # an interface that moved in another Ray release: the status says "unknown"
        return None


def _node_here() -> dict:
    """This actor's node: its id, the address the cluster knows it by (`ray start --node-ip-address`;
    the stream's server binds it), the GPUs Ray gave this actor, the pid."""
    node_id = ray.get_runtime_context().get_node_id()
    ip = next((n["NodeManagerAddress"] for n in ray.nodes() if n["NodeID"] == node_id),
              ray.util.get_node_ip_address())
    return {"node_id": node_id, "ip": ip, "gpus": [str(g) for g in ray.get_gpu_ids()], "pid": os.getpid(),
            "started": time.time()}


def with_owned_threads(config: StreamConfig, assigned_cpus: float | None) -> StreamConfig:
    """The stream's config with `threads` (the generator's intra-op threads, runtime/threads.py) set to
    the CPUs its actor owns, unless the stream sets `threads` itself. The actor's process sees every
    core of the node, so the serve default (usable cores minus one) would oversubscribe a node that
    Ray packs with several streams. At least one thread (a GPU stream may own no CPU)."""
    from ..threads import owned_thread_count

    if "threads" in config.serve:
        return config
    owned = owned_thread_count(assigned_cpus).count
    return dataclasses.replace(config, serve={**config.serve, "threads": owned})


@ray.remote(max_restarts=-1, max_concurrency=8)
class StreamActor:
    """One stream of a fleet (see the module docstring). Construction is quick on purpose: Ray marks
    an actor alive once its constructor returns, so alive means placed; the model loads after."""

    def __init__(self, fleet: str, stream: dict, token: str | None, allowed_hosts: tuple[str, ...],
                 settings: dict | None = None, worker: dict | None = None):
        """worker: {"name": the GpuWorker actor's name, "key": the stream's ModelKey} when the stream is
        booked on a logical GPU: it generates there (RemotePipeline), not in a child of its own."""
        self.fleet = fleet
        owned_cpus = ray.get_runtime_context().get_assigned_resources().get("CPU")
        self.config = with_owned_threads(StreamConfig.from_json(stream), owned_cpus)
        self.controller = ray.get_actor(controller_name(fleet), namespace=NAMESPACE)
        self.node = _node_here()
        started = ray.get(self.controller.stream_starting.remote(self.config.id, self.node))
        settings = HostSettings(**{"bind": self.node["ip"], **(settings or {})})  # a local fleet binds loopback
        make_pipe = None
        if worker is not None:
            handle = ray.get_actor(worker["name"], namespace=NAMESPACE)
            make_pipe = lambda spec: RemotePipeline(handle, self.config.id, worker["key"], spec)  # noqa: E731
        self.host = StreamHost(self.config, token, tuple(allowed_hosts), control=started["control"],
                               settings=settings, on_control=self._save_control, on_fatal=self._exit_for_restart,
                               make_pipe=make_pipe)
        self.incarnation = started["starts"]
        self.host.start()

    def _save_control(self, snapshot: dict) -> None:
        ray.get(self.controller.save_control.remote(self.config.id, snapshot), timeout=5)

    def _exit_for_restart(self, reason: str) -> None:
        """Leave with an error status: Ray counts it a crash and restarts this actor (a fresh process,
        perhaps on another node or GPU). `ray.actor.exit_actor` would end it for good instead."""
        logging.shutdown()
        os._exit(FAULT_EXIT_CODE)

    def address(self) -> list | None:
        """[host, port] of this stream's HTTP server, None while the model loads or after a failure."""
        return None if self.host.address is None or self.host.phase != "running" else list(self.host.address)

    def info(self) -> dict:
        node, pipe = self.node, self.host.pipe
        if isinstance(pipe, RemotePipeline) and pipe.placement is not None:
            # Generation runs in the GPU worker: the GPUs are its, the model copy too.
            node = dict(node, gpus=pipe.placement["gpus"], worker_pid=pipe.placement["pid"],
                        model_object_id=pipe.model_object_id)
        return dict(self.host.info(), node=node, incarnation=self.incarnation,
                    actor_id=ray.get_runtime_context().get_actor_id())

    def shutdown(self) -> dict:
        """Stop the stream and hand back its final control state (before `ray.kill`)."""
        self.host.stop()
        return self.host.control_snapshot()


@ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=-1, resources={HEAD_NODE_RESOURCE: 0.001})
class FleetController:
    """The fleet's one owner of its streams and their state (an async actor: one event loop)."""

    def __init__(self, fleet: str, state_dir: str, allowed_hosts: tuple[str, ...], settings: dict | None = None):
        self.fleet, self.allowed_hosts = fleet, tuple(allowed_hosts)
        self.store = FleetStore(state_dir, fleet)
        # Every stream snapshots its stream state beside the state file (unless the settings say otherwise).
        self.settings = {"snapshot_dir": str(self.store.snapshot_dir), **(settings or {})}
        self.state: FleetState = self.store.load()
        self.actor_ids: dict[str, str] = {}
        self._probes: dict[str, asyncio.Future] = {}
        self._dirty = False
        self._writer = None
        self.admission = Admission(())  # by memory, when the config declares gpus (admission.py)
        self.refused: dict[str, dict] = {}  # stream id -> why it was not admitted, with the figures
        self.worker_wants_gpu: dict[str, float] = {}  # logical GPU -> the Ray GPUs its worker was made with

    # ---------------------------------------------------------------------------- fleet changes
    async def apply(self, streams: list[dict], tokens: dict[str, str | None], fleet_token: str | None,
                    gpus: tuple = ()) -> dict:
        """Make the declared streams run (create missing ones, recreate changed ones) and start every
        other stream the state file holds (added with `fleet add` earlier). With `gpus` (logical GPUs
        and their memory), streams are admitted in order while they fit; one that does not is not
        started and is reported as refused, with its figures. Returns what it did."""
        self.state.token = fleet_token
        self.admission, self.refused = Admission(tuple(gpus)), {}
        created, kept, restarted, refused = [], [], [], {}
        for data in streams:
            declared = StreamConfig.from_json(data)
            record, changed = merge_declared(self.state, declared, tokens.get(declared.id))
            self.state.streams[declared.id] = record
            handle = self._handle(declared.id)
            why = self._admit(declared)
            if why is not None:
                if handle is not None:
                    await self._stop_actor(declared.id, handle)
                refused[declared.id] = why
                continue
            if handle is not None and changed:
                await self._stop_actor(declared.id, handle)
                handle = None
                restarted.append(declared.id)
            if handle is None:
                self._create(record)
                if declared.id not in restarted:
                    created.append(declared.id)
            else:
                kept.append(declared.id)
        declared_ids = {s["id"] for s in streams}
        resumed = []
        for sid, record in self.state.streams.items():
            if sid not in declared_ids and self._handle(sid) is None:
                why = self._admit(record.config)
                if why is not None:
                    refused[sid] = why
                    continue
                self._create(record)
                resumed.append(sid)
        self._save()
        return {"created": created, "restarted": restarted, "kept": kept, "resumed": resumed, "refused": refused}

    def _admit(self, config: StreamConfig) -> str | None:
        """None when the stream may start (no gpus declared, or its memory plan fits), else why not."""
        if not self.admission.gpus:
            return None
        try:
            plan = stream_plan(config)
            gpu = self.admission.admit(config.id, plan, stream_model_key(config))
        except AdmissionRefused as err:
            self.refused[config.id] = {"error": str(err), "needed_bytes": err.needed_bytes,
                                       "free_bytes": err.free_bytes, "plan": err.plan.to_json()}
            log.warning("fleet %s: %s", self.fleet, err)
            return str(err)
        except ValueError as err:  # its request does not resolve (a bad model folder, a bad setting)
            self.refused[config.id] = {"error": f"no memory plan: {err}"}
            return self.refused[config.id]["error"]
        self.refused.pop(config.id, None)
        log.info("fleet %s: stream %s admitted on %s (%.3f GiB of its own, weights %.3f GiB once per GPU)",
                 self.fleet, config.id, gpu, plan.per_stream_bytes / 2 ** 30, plan.weights_bytes / 2 ** 30)
        return None

    async def add(self, stream: dict, token: str | None) -> None:
        config = StreamConfig.from_json(stream)
        if config.id in self.state.streams:
            raise ValueError(f"stream {config.id!r} is already in fleet {self.fleet!r}; remove it first "
                             f"(skyrt fleet remove {config.id}) or pick another id")
        why = self._admit(config)
        if why is not None:
            raise ValueError(why)  # `fleet add` prints it
        record = StreamRecord(config, token, None, config.control_source_hash())
        self.state.streams[config.id] = record
        self._create(record)
        self._save()

    async def remove(self, stream_id: str) -> None:
        if stream_id not in self.state.streams:
            raise ValueError(f"no stream {stream_id!r} in fleet {self.fleet!r}; "
                             f"streams: {sorted(self.state.streams)}")
        handle = self._handle(stream_id)
        if handle is not None:
            await self._stop_actor(stream_id, handle)
        del self.state.streams[stream_id]
        self.store.forget_snapshot(stream_id)
        self.admission.release(stream_id)
        self.refused.pop(stream_id, None)
        self._save()

    async def down(self) -> list[str]:
        """Stop every stream, keeping its config and final control state for the next `up`; end the GPU
        workers (their models went with their streams)."""
        stopped = []
        for sid in list(self.state.streams):
            handle = self._handle(sid)
            if handle is not None:
                await self._stop_actor(sid, handle)
                stopped.append(sid)
        # Every logical GPU's, not only the workers this incarnation made (a restarted controller's
        # apply re-books the streams but finds their workers running).
        for gpu in set(self.worker_wants_gpu) | {g.name for g in self.admission.gpus}:
            try:
                ray.kill(ray.get_actor(gpu_worker_name(self.fleet, gpu), namespace=NAMESPACE), no_restart=True)
            except ValueError:
                pass
            self.worker_wants_gpu.pop(gpu, None)
        self._save()
        return stopped

    def _create(self, record: StreamRecord) -> None:
        config = record.config
        record.starts = 0
        gpu, worker, num_gpus = self.admission.gpu_of(config.id), None, config.num_gpus
        if gpu is not None:  # booked on a logical GPU: its worker holds the GPU and generates
            worker = {"name": self._worker(gpu, config.num_gpus), "key": self.admission.placed[config.id].key}
            num_gpus = 0
        handle = StreamActor.options(
            name=stream_actor_name(self.fleet, config.id), namespace=NAMESPACE, lifetime="detached",
            num_cpus=config.cpus, num_gpus=num_gpus, scheduling_strategy="SPREAD",
        ).remote(self.fleet, config.to_json(), record.token, self.allowed_hosts, self.settings, worker)
        self.actor_ids[config.id] = handle._actor_id.hex()
        log.info("fleet %s: stream %s created (%g CPU, %g GPU%s)", self.fleet, config.id, config.cpus, num_gpus,
                 "" if gpu is None else f", generating on logical GPU {gpu}")

    def _worker(self, gpu: str, wants_gpu: float) -> str:
        """The name of logical GPU `gpu`'s worker, made on first use: it takes one whole Ray GPU when its
        first stream wants one (a CUDA stream), so Ray pins every stream booked on `gpu` to that device."""
        name = gpu_worker_name(self.fleet, gpu)
        try:
            ray.get_actor(name, namespace=NAMESPACE)
        except ValueError:
            num_gpus = 1 if wants_gpu > 0 else 0
            GpuWorker.options(name=name, namespace=NAMESPACE, lifetime="detached", num_cpus=0,
                              num_gpus=num_gpus).remote(self.fleet, gpu)
            self.worker_wants_gpu[gpu] = num_gpus
            log.info("fleet %s: gpu worker for %s created (%d Ray GPU)", self.fleet, gpu, num_gpus)
        self.worker_wants_gpu.setdefault(gpu, 0)
        return name

    async def _stop_actor(self, stream_id: str, handle) -> None:
        """Ask the stream to stop and hand over its final control state, then end the actor for good."""
        try:
            ref = handle.shutdown.remote()
            snapshot = await asyncio.wait_for(asyncio.wrap_future(ref.future()), SHUTDOWN_TIMEOUT_S)
            if snapshot and stream_id in self.state.streams:
                self.state.streams[stream_id].control = snapshot
        except Exception as err:  # pending (never placed), dead or hung: its last pushed state stands
            log.info("fleet %s: stream %s did not stop cleanly (%s)", self.fleet, stream_id, type(err).__name__)
        ray.kill(handle, no_restart=True)
        self.actor_ids.pop(stream_id, None)
        self._probes.pop(stream_id, None)
        # The name is free once the GCS has processed the kill; a stream recreated under it waits for that.
        deadline = time.monotonic() + SHUTDOWN_TIMEOUT_S
        while self._handle(stream_id) is not None and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        self.actor_ids.pop(stream_id, None)

    def _handle(self, stream_id: str):
        try:
            handle = ray.get_actor(stream_actor_name(self.fleet, stream_id), namespace=NAMESPACE)
        except ValueError:
            return None
        self.actor_ids.setdefault(stream_id, handle._actor_id.hex())
        return handle

    # -------------------------------------------------------------------------- stream reports
    async def stream_starting(self, stream_id: str, node: dict) -> dict:
        """A stream actor's constructor: counts the start and hands back the control state to resume."""
        record = self.state.streams.get(stream_id)
        if record is None:
            return {"control": None, "starts": 0}
        record.starts += 1
        record.last_node = node
        if record.starts > 1:
            log.warning("fleet %s: stream %s restarted (restart %d) on node %s", self.fleet, stream_id,
                        record.restarts, node.get("node_id", "?")[:12])
        self._save()
        return {"control": record.control, "starts": record.starts}

    async def save_control(self, stream_id: str, snapshot: dict) -> None:
        record = self.state.streams.get(stream_id)
        if record is not None:
            record.control = snapshot
            self._save()

    def _save(self) -> None:
        self.store.save(self.state)

    # -------------------------------------------------------------------------------- reading
    async def stream_ids(self) -> list[str]:
        return sorted(self.state.streams)

    async def fleet_token(self) -> str | None:
        return self.state.token

    async def status(self) -> list[dict]:
        """Every stream: state (running, loading, failed, pending, restarting, ...), node, GPUs,
        figures and restarts. Probes run concurrently; a stream that does not answer is described
        by Ray's view of its actor."""
        ids = sorted(self.state.streams)
        infos = await asyncio.gather(*(self._probe(sid) for sid in ids))
        return [self._describe(sid, info) for sid, info in zip(ids, infos)]

    async def _probe(self, stream_id: str) -> dict | None:
        """The actor's info(), or None if it is not placed or does not answer in time. One probe per
        stream is in flight at most (an unplaced actor queues its calls until it runs)."""
        handle = self._handle(stream_id)
        if handle is None:
            return None
        if ray_actor_state(self.actor_ids.get(stream_id)) not in ("ALIVE", None):
            return None
        future = self._probes.get(stream_id)
        if future is None or future.done():
            future = self._probes[stream_id] = asyncio.wrap_future(handle.info.remote().future())
        try:
            return await asyncio.wait_for(asyncio.shield(future), PROBE_TIMEOUT_S)
        except (asyncio.TimeoutError, ray.exceptions.RayError):
            return None

    def _describe(self, stream_id: str, info: dict | None) -> dict:
        record = self.state.streams[stream_id]
        config = record.config
        entry = {"id": stream_id, "url": f"/streams/{stream_id}/", "restarts": record.restarts,
                 "fps": int(config.serve.get("fps", 24)), "wants": {"CPU": config.cpus, "GPU": config.num_gpus},
                 "node": None, "gpus": [], "generated_fps": None, "clients": {}, "error": None}
        if stream_id in self.refused:
            entry.update(state="refused", error=self.refused[stream_id]["error"],
                         memory={k: v for k, v in self.refused[stream_id].items() if k != "error"})
            return entry
        entry["gpu"] = self.admission.gpu_of(stream_id)
        booking = self.admission.booking_json(stream_id)
        if booking is not None:
            entry["memory"] = booking
        if info is not None:
            status = info.get("status") or {}
            entry.update(state=info["phase"], node=info["node"]["node_id"], node_ip=info["node"]["ip"],
                         gpus=info["node"]["gpus"], error=info.get("error"), address=info.get("address"),
                         generated_fps=status.get("generated_fps"), clients=status.get("clients", {}),
                         prompt=status.get("prompt"), frames_generated=status.get("frames_generated"))
            if "worker_pid" in info["node"]:
                entry.update(worker_pid=info["node"]["worker_pid"], model_object_id=info["node"]["model_object_id"])
            return entry
        ray_state = ray_actor_state(self.actor_ids.get(stream_id)) if self._handle(stream_id) else "DEAD"
        entry["ray_state"] = ray_state
        if ray_state in ("PENDING_CREATION", "DEPENDENCIES_UNREADY", "RESTARTING"):
            entry["state"] = "pending"
            entry["error"] = (f"waiting for a node with {config.cpus:g} CPU and {config.num_gpus:g} GPU free"
                              + (" (restarting)" if ray_state == "RESTARTING" else ""))
        elif ray_state == "ALIVE":
            entry["state"] = "unresponsive"
        else:
            entry["state"] = "stopped"
        return entry
