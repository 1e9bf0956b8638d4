"""A fleet's streams keep their whole stream state, their schedule and their thread count across a
fleet restart, on a real local Ray cluster (`skyrt fleet up` with no address, stopped with Ctrl-C and
brought up again on the same state folder).

Two streams of the tiny official model with a fixed seed and a snapshot every second:
- `still` (1 CPU): its stream snapshot (the fleet's `<name>.snapshots/still.stream.npz`, runtime/snapshot.py's
  format) is taken periodically and at the stop; after the restart it must report that it resumed from the
  stop's block, and its next snapshot, blocks later, must hold what an uninterrupted run of the same request
  in this process holds at that block (tests/serving.py's assert_same_stream_state, as for `skyrt serve`);
- `clock` (2 CPUs): a schedule PUT through the ingress (a bad one refused with 400) switches its prompt at a
  block boundary and is back after the restart; the restart also changes one of its settings, so its
  snapshot no longer fits: refused (counted, with the reason) and the stream starts fresh.
Both run their generator with the threads their actor owns (1 and 2), though the fleet's environment says
OMP_NUM_THREADS=3 (what a process inherits when nobody sets it).

Run: python -m pytest tests/test_fleet_resume.py -q
"""
from __future__ import annotations

import datetime as dt
import json

import pytest
from ray_cluster import free_port, local_fleet
from serving import (assert_same_stream_state, get_json, request, snapshot_arrays, snapshot_blocks, snapshot_header,
                     uninterrupted_state, wait_until)

from skyrt.runtime.fleet.store import stream_snapshot_path

pytest.importorskip("ray")

CONFIG = """
name: keep
state_dir: state
no_token: true
ingress: {{port: {port}}}
defaults: {{model: {model}, seed: 3, ar_step: 2, window_blocks: 2, snapshot_every: 1, formats: [mjpeg]}}
streams:
  - {{id: still, cpus: 1}}
  - {{id: clock, cpus: 2{clock}}}
"""
SCHEDULED = "a green triangle spinning on white"


def _schedule() -> dict:
    """One daily entry that started an hour ago (active now) and one twelve hours on (not before the test ends)."""
    now = dt.datetime.now(dt.timezone.utc)
    at = [(now + dt.timedelta(hours=h)).strftime("%H:%M") for h in (-1, 12)]
    return {"timezone": "UTC", "entries": [{"at": at[0], "prompt": SCHEDULED},
                                           {"at": at[1], "prompt": "a yellow star at night"}]}


def _up(tmp_path, official_dir, clock: str = ""):
    port = free_port()  # a fresh port each time: the last ingress's may linger in TIME_WAIT
    (tmp_path / "fleet.yaml").write_text(CONFIG.format(port=port, model=official_dir, clock=clock))
    return local_fleet(tmp_path, port, "--local-cpus", "3")


def _running(fleet) -> None:
    wait_until(lambda: [s["state"] for s in get_json(fleet.url + "/streams")["streams"]] == ["running"] * 2, 240,
               fleet.log_tail)


def _status(fleet, stream: str) -> dict:
    return get_json(f"{fleet.url}/streams/{stream}/status")


def test_a_fleet_restart_continues_each_stream_with_its_schedule_and_threads(official_dir, official_pipeline,
                                                                               tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    snapshots = tmp_path / "state" / "keep.snapshots"
    still, clock = stream_snapshot_path(snapshots, "still"), stream_snapshot_path(snapshots, "clock")
    schedule = _schedule()
    with _up(tmp_path, official_dir) as fleet:
        _running(fleet)
        for stream, owned in (("still", 1), ("clock", 2)):
            assert _status(fleet, stream)["generator_process"]["threads"] == {"OMP_NUM_THREADS": str(owned),
                                                                              "torch": owned}, stream
        bad = dict(schedule, timezone="Mars/Olympus_Mons")
        status, body = request("PUT", f"{fleet.url}/streams/clock/schedule", json.dumps(bad).encode(), token=None)
        assert status == 400 and "Mars/Olympus_Mons" in json.dumps(body), body
        status, body = request("PUT", f"{fleet.url}/streams/clock/schedule", json.dumps(schedule).encode(),
                               token=None)
        assert status == 200, body
        wait_until(lambda: _status(fleet, "clock")["prompt_active"] == SCHEDULED, 60, fleet.log_tail)
        put = get_json(f"{fleet.url}/streams/clock/schedule")
        assert [(e["at"], e["prompt"]) for e in put["entries"]] == [(e["at"], e["prompt"]) for e in schedule["entries"]]
        switched = put["current"]
        assert switched["index"] == 0 and switched["block"] >= 1  # between blocks of the running stream
        wait_until(lambda: snapshot_blocks(still) >= 3 and snapshot_blocks(clock) >= 1, 90, fleet.log_tail)
        assert _status(fleet, "still")["generator_process"]["snapshots"]["resumes"] == 0
        fleet.stop()
    stopped_at = snapshot_blocks(still)  # the snapshot written at the stop
    assert stopped_at >= 3

    with _up(tmp_path, official_dir, clock=", shift: 6.5") as fleet:
        _running(fleet)
        wait_until(lambda: snapshot_blocks(still) >= stopped_at + 4, 120, fleet.log_tail)
        data = still.read_bytes()  # one whole file (written by rename)
        kept = _status(fleet, "still")["generator_process"]["snapshots"]
        # The schedule came back with the stream: its entry is what the fresh stream generates.
        wait_until(lambda: _status(fleet, "clock")["prompt_active"] == SCHEDULED, 60, fleet.log_tail)
        restarted = _status(fleet, "clock")
        described = get_json(f"{fleet.url}/streams/clock/schedule")
        fleet.stop()
    assert (kept["resumes"], kept["resumed_from_block"], kept["refusals"]) == (1, stopped_at, 0), kept

    refused = restarted["generator_process"]["snapshots"]
    assert (refused["resumes"], refused["refusals"]) == (0, 1), refused
    assert "other settings: shift was" in refused["last_refusal"], refused
    assert restarted["generator_process"]["threads"]["torch"] == 2
    assert described["entries"] == put["entries"] and described["current"]["index"] == 0

    header = snapshot_header(data)
    assert header["state"]["blocks"] >= stopped_at + 4
    assert_same_stream_state(snapshot_arrays(data), uninterrupted_state(official_pipeline, header))


def test_a_gpu_worker_resumes_the_streams_it_runs_from_their_snapshots(official_dir, official_pipeline, tmp_path):
    """A stream booked on a logical GPU generates in that GPU's worker (gpu_worker.WorkerStreams, no Ray
    needed): its snapshot is written there at the stop, a restarted worker resumes it (the same stream state
    as an uninterrupted run, blocks later), and one taken with other settings is refused and counted."""
    from dataclasses import dataclass

    from skyrt.runtime.fleet.gpu_worker import WorkerStreams
    from skyrt.runtime.fleet.shared_models import ModelCache, model_key
    from skyrt.runtime.server.generator_process import PipelineSpec

    @dataclass(frozen=True)
    class Loaded(PipelineSpec):
        def load(self):  # the weights this session loaded already (each worker "loads" the same copy)
            return official_pipeline

    path = tmp_path / "s.stream.npz"
    spec = Loaded(str(official_dir), snapshot_path=str(path), snapshot_every_s=0)  # 0: only when asked
    key = model_key(spec, "fp32")

    def request(seed: int):
        settings = {"prompt": "a red circle", "seed": seed, "mode": "kvcache", "height": 32, "width": 32,
                    "ar_step": 2, "window_blocks": 2}
        return official_pipeline.resolve(settings, stream=True).request

    def run(seed: int, chunks: int) -> dict:
        """A worker's life: open the stream, `chunks` chunks, the snapshot at the stop; its figures."""
        worker = WorkerStreams(ModelCache(), "g0")
        worker.open("s", 1, key, spec, request(seed), {})
        for _ in range(chunks):
            chunk = worker.next_chunk("s", 1)[0]
            assert chunk.dtype.name == "uint8" and chunk.ndim == 4
        assert worker.snapshot_now("s")
        figures = worker.snapshot_figures("s")
        worker.forget("s")
        return figures

    first = run(3, 3)
    assert (first["resumes"], first["refusals"], snapshot_blocks(path)) == (0, 0, 3)
    second = run(3, 3)  # a restarted worker
    assert (second["resumes"], second["resumed_from_block"], second["refusals"]) == (1, 3, 0)
    data = path.read_bytes()
    header = snapshot_header(data)
    assert header["state"]["blocks"] == 6
    assert_same_stream_state(snapshot_arrays(data), uninterrupted_state(official_pipeline, header))

    other = run(4, 1)  # another seed: the snapshot does not fit; a fresh stream of seed 4
    assert (other["resumes"], other["refusals"]) == (0, 1)
    assert "other settings: seed was 3, now 4" in other["last_refusal"], other
    assert snapshot_blocks(path) == 1
