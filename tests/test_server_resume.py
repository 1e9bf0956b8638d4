"""A real `skyrt serve` killed with SIGKILL mid-stream and started again continues its stream.

The server runs the tiny official model with a fixed seed, `--state FILE` and a snapshot every second
(runtime/server/resume.py). After a snapshot it is killed with SIGKILL (no cleanup runs; the
generator child dies with it), then started again with the same flags: it must say it resumed from
the snapshot's block, and its next snapshot, blocks later, must hold the same stream state as an
uninterrupted run of the same request in this process taken to the same block — the clean latents of
the blocks in the ring (the stream's output latents, committed after the restart), the blocks in
flight with their sampler history, the ring K/V, the noise generator and the decoder caches.
A corrupt snapshot and a symlinked one are refused by the restarted server with a log line, which
then streams from a fresh start.

Run: python -m pytest tests/test_server_resume.py -q
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import signal
import urllib.request

import pytest
from serving import (assert_same_stream_state, get_json, process_gone, running_server, snapshot_arrays, snapshot_blocks,
                     snapshot_header, uninterrupted_state, wait_until)

from skyrt.runtime.request import GenerationRequest
from skyrt.runtime.server.resume import snapshot_path

# One block in flight and a ring of 1 + 2 blocks, so blocks after the restart evict those before it.
FLAGS = ("--seed", "3", "--formats", "mjpeg", "--ar-step", "2", "--window-blocks", "2", "--snapshot-every", "1")


def test_sigkill_then_restart_continues_the_stream(official_dir, official_pipeline, tmp_path):
    state_file = tmp_path / "state.json"
    snap = snapshot_path(state_file)
    flags = ("--state", str(state_file), *FLAGS)
    with running_server(official_dir, *flags) as (base, proc):
        wait_until(lambda: snapshot_blocks(snap) >= 3, 90, lambda: "no snapshot at block 3:\n" + proc.output())
        child = get_json(base + "/status")["generator_process"]["pid"]
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        wait_until(lambda: process_gone(child), 30, lambda: "the generator child outlived its server")
    killed_at = snapshot_blocks(snap)
    size = snap.stat().st_size
    print(f"snapshot at block {killed_at}: {size} bytes")

    with running_server(official_dir, *flags) as (base, proc):
        wait_until(lambda: snapshot_blocks(snap) >= killed_at + 4, 90,
                   lambda: "no later snapshot after the restart:\n" + proc.output())
        data = snap.read_bytes()  # one whole file (written by rename)
        output = proc.output()
    assert f"resuming the stream from snapshot {snap} (block {killed_at})" in output, output
    header = snapshot_header(data)
    resumed = snapshot_arrays(data)
    want = uninterrupted_state(official_pipeline, header)
    assert header["state"]["blocks"] >= killed_at + 4
    print(f"block {header['state']['blocks']}:")
    assert_same_stream_state(resumed, want)
    assert int(resumed["core/ring"][0]) > 3  # the ring wrapped after the restart: evictions went through it


REASONS = {"corrupt": "corrupt", "truncated": "corrupt or truncated", "symlink": "symbolic link",
           "other_model": "another model"}


@pytest.mark.parametrize("damage", list(REASONS))
def test_a_bad_snapshot_is_refused_and_the_stream_starts_fresh(official_dir, diffusers_dir, tmp_path, damage):
    """other_model: the same weights in the diffusers layout are other files, hence another model."""
    state_file = tmp_path / "state.json"
    snap = snapshot_path(state_file)
    flags = ("--state", str(state_file), *FLAGS)
    with running_server(official_dir, *flags) as (base, proc):
        wait_until(lambda: snapshot_blocks(snap) >= 2, 90, lambda: "no snapshot:\n" + proc.output())
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    if damage == "corrupt":
        data = bytearray(snap.read_bytes())
        middle = len(data) // 2
        data[middle : middle + 64] = bytes(64)  # zeros over the middle of an array
        snap.write_bytes(bytes(data))
    elif damage == "truncated":
        snap.write_bytes(snap.read_bytes()[:-1000])
    elif damage == "symlink":
        real = tmp_path / "elsewhere.npz"
        os.replace(snap, real)
        os.symlink(real, snap)
    with running_server(diffusers_dir if damage == "other_model" else official_dir, *flags) as (base, proc):
        wait_until(lambda: "not resuming" in proc.output(), 60, lambda: proc.output())
        assert get_json(base + "/status")["frames_output"] > 0
        output = proc.output()
    reason = REASONS[damage]
    assert reason in output.split("not resuming", 1)[1].splitlines()[0], output
    assert "resuming the stream from snapshot" not in output


def test_snapshot_at_sigterm(official_dir, tmp_path):
    """SIGTERM writes a last snapshot (snapshots every 600 s: only the stop can have written it)."""
    state_file = tmp_path / "state.json"
    snap = snapshot_path(state_file)
    flags = ("--state", str(state_file), *FLAGS[:-2], "--snapshot-every", "600")
    with running_server(official_dir, *flags) as (base, proc):
        wait_until(lambda: get_json(base + "/status")["frames_output"] > 8, 60)
        assert not snap.exists()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        assert "wrote the stream snapshot" in proc.output()
    assert snapshot_blocks(snap) >= 1


def test_settings_are_the_request(official_pipeline):
    """The snapshot's settings rebuild the request exactly (what the resume check compares)."""
    request = official_pipeline.resolve({"prompt": "x", "mode": "kvcache", "height": 32, "width": 32},
                                        stream=True).request
    from skyrt.runtime.server.resume import request_settings

    rebuilt = GenerationRequest(**json.loads(json.dumps(request_settings(request))), prompt="x",
                                negative_prompt=request.negative_prompt)
    assert dataclasses.asdict(rebuilt) == dataclasses.asdict(request)


def _media_sequence(playlist: str) -> tuple[int, int]:
    """(first, last) media sequence numbers a playlist lists."""
    first = int(re.search(r"#EXT-X-MEDIA-SEQUENCE:(\d+)", playlist).group(1))
    return first, first + len(re.findall(r"^#EXTINF", playlist, re.M)) - 1


def test_hls_media_sequences_continue_across_a_restart(official_dir, tmp_path):
    """After a restart with the same --state, HLS and LL-HLS number on past the run before (from the
    wall clock) and mark the splice with EXT-X-DISCONTINUITY; the first run marks none."""
    state_file = tmp_path / "state.json"
    flags = ("--state", str(state_file), "--seed", "3", "--formats", "mjpeg,hls", "--snapshot-every", "1")
    playlists = []
    for run in range(2):
        with running_server(official_dir, *flags) as (base, proc):
            def listed():
                try:
                    hls = urllib.request.urlopen(base + "/hls/live.m3u8", timeout=5).read().decode()
                    ll = urllib.request.urlopen(base + "/llhls/live.m3u8", timeout=5).read().decode()
                except OSError:
                    return None
                return (hls, ll) if hls.count("#EXTINF") >= 2 and ll.count("#EXTINF") >= 2 else None
            wait_until(lambda: listed() is not None, 90, lambda: "no HLS segments:\n" + proc.output())
            playlists.append(listed())
            if run == 0:
                proc.send_signal(signal.SIGKILL)
                proc.wait(timeout=30)
    (hls_before, ll_before), (hls_after, ll_after) = playlists
    assert "#EXT-X-DISCONTINUITY" not in hls_before and "#EXT-X-DISCONTINUITY" not in ll_before
    for before, after in ((hls_before, hls_after), (ll_before, ll_after)):
        assert _media_sequence(after)[0] > _media_sequence(before)[1]
        assert "#EXT-X-DISCONTINUITY\n" in after, after
