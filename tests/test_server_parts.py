"""The server's parts on their own: control-input validation, the playlist clock, the drop-oldest
broadcast ring, the fMP4 box splitter (checked by FFmpeg's own demuxer and decoder), metrics text."""
from __future__ import annotations

import asyncio
import io
import json
import re
import time

import numpy as np
import pytest

from skyrt.runtime.server.broadcast import Broadcast
from skyrt.runtime.server.encoders import MJPEG_KEEPALIVE_S, Fmp4Encoder, HlsEncoder, MjpegEncoder, jpeg_of_part
from skyrt.runtime.server.hls_window import HlsFile, HlsWindow
from skyrt.runtime.server.metrics import Metrics
from skyrt.runtime.server.playlist import (Limits, PromptBoard, PromptChange, RequestError, load_playlist,
                                           parse_playlist, parse_prompt_change)


# ---------------------------------------------------------------- control input
def test_prompt_change_accepts_the_documented_form():
    change = parse_prompt_change({"prompt": "a fox", "negative_prompt": "", "transition": "recache"})
    assert change == PromptChange("a fox", "", "recache")
    assert parse_prompt_change({"prompt": "a fox"}) == PromptChange("a fox", None, "continue")


@pytest.mark.parametrize("body, words", [
    ({"prompt": 3}, "prompt must be a string"),
    ({"prompt": "  "}, "must not be empty"),
    ({"prompt": "x", "colour": "red"}, "unknown field(s) ['colour']"),
    ({}, "missing field(s) ['prompt']"),
    ({"prompt": "x", "transition": "fade"}, "transition must be one of"),
    (["prompt"], "must be a JSON object"),
    ({"prompt": "x" * 2001}, "the limit is 2000"),
])
def test_prompt_change_errors_name_the_problem(body, words):
    with pytest.raises(RequestError) as err:
        parse_prompt_change(body)
    assert words in str(err.value)


@pytest.mark.parametrize("body, words", [
    ({"items": [{"prompt": "a", "duration_s": 0}]}, "items[0].duration_s must be a number"),
    ({"items": [{"prompt": "a", "duration_s": True}]}, "duration_s must be a number"),
    ({"items": [{"prompt": "a", "duration_s": "5"}]}, "duration_s must be a number"),
    ({"items": [{"prompt": "a"}]}, "items[0]: missing field(s) ['duration_s']"),
    ({"items": [{"prompt": "a", "duration_s": 1}, {"prompt": 1, "duration_s": 1}]}, "items[1].prompt must be"),
    ({"items": {}}, "items must be a list"),
    ({"items": [], "loop": "yes"}, "loop must be true or false"),
    ({"items": [{"prompt": "a", "duration_s": 1}] * 3}, "the limit is 2"),
])
def test_playlist_errors_name_the_item_and_field(body, words):
    with pytest.raises(RequestError) as err:
        parse_playlist(body, Limits(max_playlist_items=2))
    assert words in str(err.value)


def test_playlist_file_errors_name_the_file(tmp_path):
    bad = tmp_path / "list.json"
    bad.write_text('{"items": [{"prompt": "a", "duration_s": -1}]}')
    with pytest.raises(RequestError, match=r"list\.json: playlist\.items\[0\]\.duration_s"):
        load_playlist(bad)
    bad.write_text("{oops")
    with pytest.raises(RequestError, match="not valid JSON"):
        load_playlist(bad)
    with pytest.raises(FileNotFoundError):
        load_playlist(tmp_path / "missing.json")


# ---------------------------------------------------------------- the playlist clock
def _board_with(items, loop=True):
    board = PromptBoard(PromptChange("start"), parse_playlist({"loop": loop, "items": items}))
    seen = []
    board.subscribe(seen.append)
    return board, seen


def test_playlist_switches_on_stream_time_and_loops():
    board, seen = _board_with([{"prompt": "a", "duration_s": 2}, {"prompt": "b", "duration_s": 1}])
    assert board.current.prompt == "a"  # the first item starts at once
    timeline = {}
    for frame in range(1, 5 * 10 + 1):  # 5 s at 10 fps
        board.tick(frame / 10)
        timeline[frame / 10] = board.current.prompt
    assert [c.prompt for c in seen] == ["b", "a", "b"]
    assert timeline[1.9] == "a" and timeline[2.0] == "b" and timeline[2.9] == "b" and timeline[3.0] == "a"
    assert timeline[5.0] == "b"


def test_playlist_without_loop_keeps_the_last_prompt_and_manual_prompt_holds_until_next_item():
    board, seen = _board_with([{"prompt": "a", "duration_s": 1}, {"prompt": "b", "duration_s": 1}], loop=False)
    board.tick(0.5)
    board.set_prompt(PromptChange("manual"))
    board.tick(0.9)
    assert board.current.prompt == "manual"
    board.tick(1.0)
    assert board.current.prompt == "b"
    board.tick(5.0)
    assert board.current.prompt == "b" and board.playlist_json()["items"] == []
    assert [c.prompt for c in seen] == ["manual", "b"]


def test_put_playlist_restarts_at_the_first_item_and_empty_stops_it():
    board, _ = _board_with([{"prompt": "a", "duration_s": 10}])
    board.tick(3.0)
    board.set_playlist(parse_playlist({"items": [{"prompt": "x", "duration_s": 1}, {"prompt": "y", "duration_s": 1}]}))
    assert board.current.prompt == "x"
    board.tick(3.9)
    assert board.current.prompt == "x"
    board.tick(4.0)
    assert board.current.prompt == "y" and board.playlist_json()["position"]["index"] == 1
    board.set_playlist(parse_playlist({"items": []}))
    board.tick(100.0)
    assert board.current.prompt == "y" and board.playlist_json()["position"] is None


# ---------------------------------------------------------------- the broadcast ring
def _drain(reader):
    return reader.take()


@pytest.fixture()
def loop():
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    yield loop
    loop.close()


def test_reader_gets_items_in_order_and_a_slow_reader_drops_the_oldest(loop):
    bc = Broadcast("mjpeg", capacity=4)
    bc.bind(loop)
    fast, slow = bc.subscribe(), bc.subscribe()
    for i in range(3):
        bc.publish(bytes([i]))
        assert _drain(fast) == [bytes([i])]
    for i in range(3, 10):
        bc.publish(bytes([i]))
    assert _drain(slow) == [bytes([i]) for i in range(6, 10)]  # only the newest `capacity` survive
    assert slow.dropped == 6 and fast.dropped == 0
    assert _drain(fast) == [bytes([i]) for i in range(6, 10)] and fast.dropped == 3


def test_an_item_published_on_another_thread_wakes_a_waiting_reader_on_the_loop(loop):
    import threading

    async def scenario():
        bc = Broadcast("mjpeg", capacity=4)
        bc.bind(loop)
        reader = bc.subscribe()
        threading.Timer(0.05, bc.publish, args=(b"late",)).start()  # the pacer thread's part
        started = loop.time()
        await reader.wait(5.0)
        woke = loop.time() - started
        return reader.take(), woke

    taken, woke = loop.run_until_complete(scenario())
    assert taken == [b"late"] and woke < 2.0


def test_a_reader_waits_until_its_timeout_with_nothing_new_and_not_at_all_with_items_pending(loop):
    async def scenario():
        bc = Broadcast("mjpeg", capacity=4)
        bc.bind(loop)
        reader = bc.subscribe()
        started = loop.time()
        await reader.wait(0.2)  # nothing published: the whole timeout
        idle = loop.time() - started
        bc.publish(b"x")
        started = loop.time()
        await reader.wait(5.0)  # an item waits already: at once
        pending = loop.time() - started
        bc.close()
        reader.take()
        started = loop.time()
        await reader.wait(5.0)  # closed: at once
        return idle, pending, loop.time() - started

    idle, pending, closed = loop.run_until_complete(scenario())
    assert 0.15 <= idle < 2.0 and pending < 0.1 and closed < 0.1


def test_keyframe_reader_starts_and_resumes_at_keyframes(loop):
    bc = Broadcast("mp4", capacity=5, needs_keyframe=True)
    bc.bind(loop)
    for i in range(4):
        bc.publish(bytes([i]), keyframe=i % 3 == 0)  # keys at 0 and 3
    late = bc.subscribe()
    assert _drain(late) == [b"\x03"]  # joins at the newest keyframe, never mid-GOP
    for i in range(4, 12):
        bc.publish(bytes([i]), keyframe=i % 3 == 0)  # keys at 6 and 9; the ring holds 7..11
    assert _drain(late) == [b"\x09", b"\x0a", b"\x0b"]  # lost 4..6, so it waits for key 9
    assert late.dropped == 3 + 2


# ---------------------------------------------------------------- encoders (FFmpeg decodes what we cut)
def _frames(n, size=(48, 64)):
    rng = np.random.default_rng(0)
    base = rng.integers(0, 255, (*size, 3), dtype=np.uint8)
    return [np.roll(base, 3 * i, axis=1) for i in range(n)]


def test_fmp4_fragments_decode_from_any_keyframe(loop):
    import av

    bc = Broadcast("mp4", capacity=100, needs_keyframe=True)
    bc.bind(loop)
    reader = bc.subscribe()
    encoder = Fmp4Encoder(bc, fps=10, width=64, height=48)
    for frame in _frames(25):
        encoder.encode(frame)
    fragments = _drain(reader)
    assert bc.header[4:8] == b"ftyp" and b"moov" in bc.header
    assert len(fragments) == 24  # the muxer holds the newest frame until the next one arrives
    assert all(f[4:8] == b"moof" for f in fragments)
    late = bc.subscribe()  # a client joining now starts at the second GOP (keyframe every 10 frames)
    late_fragments = _drain(late)
    for data, count in ((bc.header + b"".join(fragments), 24), (bc.header + b"".join(late_fragments), 4)):
        with av.open(io.BytesIO(data), format="mp4") as container:
            stream = container.streams.video[0]
            decoded = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
            assert stream.codec_context.name == "h264" and (stream.width, stream.height) == (64, 48)
            assert float(stream.average_rate or stream.guessed_rate) == 10
        assert len(decoded) == count
    encoder.close()


def test_mjpeg_frames_decode_to_the_frame():
    from PIL import Image

    bc = Broadcast("mjpeg", capacity=4)
    y, x = np.mgrid[0:48, 0:64]
    frame = np.stack([x * 4, y * 5, (x + y) * 2], axis=-1).astype(np.uint8)  # smooth: JPEG keeps it
    MjpegEncoder(bc, quality=95).encode(frame)
    part = bc._after(0)[0][0].payload
    head = part.split(b"\r\n\r\n", 1)[0].decode()
    jpeg = jpeg_of_part(part)
    assert head.startswith("--skyrtframe\r\nContent-Type: image/jpeg") and f"Content-Length: {len(jpeg)}" in head
    assert jpeg[:2] == b"\xff\xd8" and jpeg[-2:] == b"\xff\xd9"  # JPEG start and end markers
    decoded = np.asarray(Image.open(io.BytesIO(jpeg)))
    assert decoded.shape == frame.shape and np.abs(decoded.astype(int) - frame).mean() < 2


def test_mjpeg_sends_new_frames_and_repeats_only_as_a_keepalive():
    bc = Broadcast("mjpeg", capacity=100)
    now = [0.0]
    encoder = MjpegEncoder(bc, clock=lambda: now[0])
    first, second = _frames(2)

    def published() -> list[bytes]:
        return [it.payload for it in bc._after(0)[0]]

    encoder.encode(first)
    for _ in range(10):  # the pacer repeats the frame at 120 fps for 0.5 s: nothing new to send
        now[0] += 0.05
        encoder.encode(first, repeated=True)
    assert len(published()) == 1
    now[0] += MJPEG_KEEPALIVE_S
    encoder.encode(first, repeated=True)
    assert len(published()) == 2 and published()[1] is published()[0]  # the same bytes, not re-encoded
    encoder.encode(second)
    assert len(published()) == 3 and jpeg_of_part(published()[2]) != jpeg_of_part(published()[0])


def _replace(path, data: bytes) -> None:
    """Write as FFmpeg's temp_file flag does: a temp name, then a rename into place."""
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(data)
    tmp.replace(path)


def _playlist(*names: str, init: str = "init_a.mp4") -> bytes:
    lines = ["#EXTM3U", "#EXT-X-TARGETDURATION:1", f'#EXT-X-MAP:URI="{init}"']
    for name in names:
        lines += ["#EXTINF:1.000000,", name]
    return ("\n".join(lines) + "\n").encode()


def test_hls_window_publishes_what_the_playlist_lists_and_keeps_one_window_of_grace(tmp_path):
    window = HlsWindow(tmp_path)
    assert not window.refresh() and window.get("live.m3u8") is None  # nothing written yet
    for name in ("init_a.mp4", "s1.m4s", "s2.m4s", "s3.m4s", "s4.m4s"):
        _replace(tmp_path / name, name.encode() * 3)
    _replace(tmp_path / "live.m3u8", _playlist("s1.m4s", "s2.m4s"))
    assert window.refresh() and sorted(window.names()) == ["init_a.mp4", "live.m3u8", "s1.m4s", "s2.m4s"]
    assert window.get("s1.m4s").body == b"s1.m4s" * 3 and window.get("live.m3u8").body == _playlist("s1.m4s", "s2.m4s")
    (tmp_path / "s2.m4s").write_bytes(b"changed")  # published bytes are never re-read: names are per run
    assert not window.refresh() and window.refreshes == 1  # same playlist: nothing read, nothing swapped
    _replace(tmp_path / "live.m3u8", _playlist("s2.m4s", "s3.m4s"))
    assert window.refresh() and window.get("s2.m4s").body == b"s2.m4s" * 3
    assert window.get("s1.m4s") is not None  # listed by the previous playlist: kept one more window
    _replace(tmp_path / "live.m3u8", _playlist("s3.m4s", "s4.m4s"))
    window.refresh()
    assert window.get("s1.m4s") is None and window.get("s2.m4s") is not None and window.get("s4.m4s") is not None


def test_hls_window_retries_a_listed_file_and_serves_nothing_outside_its_folder(tmp_path):
    _replace(tmp_path.parent / "secret.m4s", b"not ours")
    _replace(tmp_path / "init_a.mp4", b"init")
    _replace(tmp_path / "live.m3u8", _playlist("s1.m4s", "../secret.m4s", "x.txt"))
    window = HlsWindow(tmp_path)
    assert window.refresh() and window.get("s1.m4s") is None  # listed, not on disk
    assert window.get("../secret.m4s") is None and window.get("x.txt") is None
    _replace(tmp_path / "s1.m4s", b"late")
    assert window.refresh() and window.get("s1.m4s").body == b"late"  # the same playlist, read again


def test_hls_files_carry_their_content_type_and_cache_policy():
    segment = HlsFile.of("seg_ab_000001.m4s", b"\x00moof" * 100)
    assert segment.content_type == "video/iso.segment" and "immutable" in segment.cache_control
    playlist = HlsFile.of("live.m3u8", b"#EXTM3U\n")
    assert playlist.content_type == "application/vnd.apple.mpegurl" and playlist.cache_control == "no-cache"


def test_hls_encoder_writes_a_rolling_playlist_and_cleans_up(tmp_path):
    folder = tmp_path / "hls"
    encoder = HlsEncoder(folder, fps=10, width=64, height=48, list_size=3)
    for frame in _frames(65):
        encoder.encode(frame)
    playlist = (folder / "live.m3u8").read_text()
    assert "#EXT-X-TARGETDURATION:1" in playlist and f'#EXT-X-MAP:URI="init_{encoder.run}.mp4"' in playlist
    other = HlsEncoder(tmp_path / "other", fps=10, width=64, height=48)  # another run: other names
    assert re.fullmatch(r"[0-9a-f]{8}", encoder.run) and other.run != encoder.run
    other.close()
    assert playlist.count("#EXT-X-PROGRAM-DATE-TIME:") == 3
    segments = re.findall(rf"^(seg_{encoder.run}_\d{{6}}\.m4s)$", playlist, flags=re.M)
    assert len(segments) == 3 and all((folder / s).is_file() for s in segments)
    # The window in memory is the folder's, published once per segment while muxing.
    assert encoder.window.get("live.m3u8").body == (folder / "live.m3u8").read_bytes()
    assert all(encoder.window.get(name).body == (folder / name).read_bytes()
               for name in [f"init_{encoder.run}.mp4", *segments])
    assert 5 <= encoder.window.refreshes <= 7  # 65 frames at 10 fps: a playlist per 1 s segment
    assert len(list(folder.glob("seg_*.m4s"))) <= 3 + 2  # delete_segments keeps the folder bounded
    encoder.close()
    assert not folder.exists()


def _demuxed_packets(data_or_path) -> list[bytes]:
    import av

    source = io.BytesIO(data_or_path) if isinstance(data_or_path, bytes) else str(data_or_path)
    with av.open(source) as container:
        return [bytes(p) for p in container.demux(container.streams.video[0]) if p.size]


def test_hls_following_the_fmp4_stream_muxes_its_packets_encoded_once(tmp_path, loop):
    """One libx264 per frame for both H.264 outputs: HLS (the follower) has no encoder of its own and
    carries byte for byte the packets of the fMP4 stream (the leader); both decode to every frame."""
    import av

    bc = Broadcast("mp4", capacity=100, needs_keyframe=True)
    bc.bind(loop)
    reader = bc.subscribe()
    mp4 = Fmp4Encoder(bc, fps=10, width=64, height=48)
    hls = HlsEncoder(tmp_path / "hls", fps=10, width=64, height=48, list_size=10, leader=mp4)
    assert mp4.encodes and not hls.encodes
    frames = _frames(35)
    for frame in frames:
        mp4.encode(frame)
        hls.encode(frame)
    for output in (mp4, hls):  # flush: the last frames leave the muxers at close
        output._container.close()
    fmp4 = bc.header + b"".join(_drain(reader))
    hls_packets = _demuxed_packets(tmp_path / "hls" / "live.m3u8")
    assert len(hls_packets) == 35 and hls_packets == _demuxed_packets(fmp4)
    with av.open(str(tmp_path / "hls" / "live.m3u8")) as container:
        decoded = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    assert len(decoded) == 35
    errors = [np.abs(decoded[20].astype(int) - f).mean() for f in frames]
    assert int(np.argmin(errors)) == 20  # the 21st frame shows the 21st input, not a neighbour


def test_a_broken_follower_fails_alone(tmp_path, loop):
    bc = Broadcast("mp4", capacity=100, needs_keyframe=True)
    bc.bind(loop)
    mp4 = Fmp4Encoder(bc, fps=10, width=64, height=48)
    hls = HlsEncoder(tmp_path / "hls", fps=10, width=64, height=48, leader=mp4)

    real = hls._container

    class FullDisk:  # the HLS muxer's writes fail (a full disk); the fMP4 stream has nothing to do with it
        def add_stream_from_template(self, template):
            return real.add_stream_from_template(template)

        def mux(self, packet):
            raise OSError(28, "No space left on device")

        def close(self):
            real.close()

    hls._container = FullDisk()
    frames = _frames(3)
    mp4.encode(frames[0])
    mp4.encode(frames[1])
    with pytest.raises(OSError, match="No space"):
        hls.encode(frames[1])  # the pacer calls it right after the leader: the error is reported as HLS's
    hls.encode(frames[1])  # reported once per failure, not forever
    mp4.encode(frames[2])  # the leader goes on
    assert bc.header[4:8] == b"ftyp"
    mp4.close()
    with pytest.raises(ValueError, match="only an output that encodes"):
        HlsEncoder(tmp_path / "x", fps=10, width=64, height=48, leader=hls)


# ---------------------------------------------------------------- metrics
def test_prometheus_text_has_consistent_histogram_and_counters():
    metrics = Metrics()
    for seconds in (0.02, 0.04, 0.3, 7.0):
        metrics.chunk_generated(4, seconds)
    metrics.frame_output(repeated=True)
    text = metrics.prometheus()
    samples = {}
    for line in text.splitlines():
        if not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            samples[name] = float(value)
    assert samples["skyrt_frames_generated_total"] == 16 and samples["skyrt_frames_repeated_total"] == 1
    assert samples['skyrt_chunk_latency_seconds_bucket{le="0.025"}'] == 1
    assert samples['skyrt_chunk_latency_seconds_bucket{le="0.5"}'] == 3
    assert samples['skyrt_chunk_latency_seconds_bucket{le="+Inf"}'] == samples["skyrt_chunk_latency_seconds_count"] == 4
    assert abs(samples["skyrt_chunk_latency_seconds_sum"] - 7.36) < 1e-9
    assert samples["skyrt_process_resident_memory_bytes"] > 0
    assert json.dumps(metrics.snapshot())  # /status stays JSON-serializable


def test_the_server_imports_no_torch():
    """The serving path with the onnxruntime or TensorRT backend must run without torch."""
    import subprocess
    import sys

    code = ("import sys, skyrt.runtime.server, skyrt.runtime.server.encoders, skyrt.runtime.server.captioning; "
            "assert 'torch' not in sys.modules, 'torch was imported'")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def test_latency_percentiles_are_measured_values_not_bucket_bounds():
    from skyrt.runtime.server.metrics import LATENCY_WINDOW

    rng = np.random.default_rng(7)
    latencies = rng.lognormal(mean=np.log(0.08), sigma=0.6, size=LATENCY_WINDOW + 300)  # ~10-500 ms
    metrics = Metrics()
    for seconds in latencies:
        metrics.chunk_generated(4, float(seconds))
    window = latencies[-LATENCY_WINDOW:]  # only the newest LATENCY_WINDOW chunks count
    snap = metrics.snapshot()
    assert snap["chunk_latency_p50_s"] == pytest.approx(np.percentile(window, 50), abs=1e-6)
    assert snap["chunk_latency_p99_s"] == pytest.approx(np.percentile(window, 99), abs=1e-6)
    assert snap["chunk_latency_min_s"] == pytest.approx(window.min(), abs=1e-6)
    assert snap["chunk_latency_max_s"] == pytest.approx(window.max(), abs=1e-6)
    assert snap["chunk_latency_window"] == LATENCY_WINDOW
    samples = dict(line.rsplit(" ", 1) for line in metrics.prometheus().splitlines() if not line.startswith("#"))
    assert float(samples['skyrt_chunk_latency_window_seconds{quantile="0.99"}']) == pytest.approx(
        np.percentile(window, 99), rel=1e-9)
    # The histogram stays, fine enough between 10 and 500 ms to tell those latencies apart.
    bounds = sorted({float(name.split('le="')[1].rstrip('"}')) for name in samples if 'le="' in name and "Inf" not in name})
    assert sum(1 for b in bounds if 0.01 <= b <= 0.5) >= 15


def test_latency_percentiles_before_any_chunk_are_none():
    snap = Metrics().snapshot()
    assert snap["chunk_latency_p50_s"] is None and snap["chunk_latency_p99_s"] is None
    assert 'quantile="0.5"} NaN' in Metrics().prometheus()


def test_last_chunk_time_marks_when_the_frame_count_last_grew():
    """Frames arrive a chunk at a time: a rate between two snapshots is exact only between the chunk
    boundaries they name (benchmarks/serve.py divides by these, not by wall time)."""
    metrics = Metrics()
    assert metrics.snapshot()["last_chunk_at_s"] is None
    metrics.chunk_generated(12, 0.5)
    first = metrics.snapshot()
    time.sleep(0.05)
    later = metrics.snapshot()  # no chunk in between: the mark stays, the uptime moves on
    assert later["last_chunk_at_s"] == first["last_chunk_at_s"] <= first["uptime_s"]
    assert later["uptime_s"] >= first["last_chunk_at_s"] + 0.05
    metrics.chunk_generated(12, 0.5)
    assert later["uptime_s"] <= metrics.snapshot()["last_chunk_at_s"]


# ---------------------------------------------------------------- the control token's file
@pytest.mark.parametrize("mode, exposed", [(0o600, None), (0o400, None), (0o640, "its group"),
                                           (0o604, "every user"), (0o666, "its group and every user")])
def test_a_token_file_others_can_read_is_warned_about(tmp_path, caplog, mode, exposed):
    import logging
    import os

    from skyrt.runtime.server.startup import resolve_token

    path = tmp_path / "token"
    path.write_text("s3cret\n")
    os.chmod(path, mode)
    with caplog.at_level(logging.WARNING, logger="skyrt.server"):
        choice = resolve_token(token_file=path, environ={})
    assert choice.token == "s3cret"
    if exposed is None:
        assert choice.warning is None and not caplog.records
    else:
        assert exposed in choice.warning and f"chmod 600 {path}" in choice.warning, choice.warning
        assert [r.getMessage() for r in caplog.records] == [choice.warning]


def test_hls_folder_reaping_keeps_a_folder_a_live_server_is_still_making_and_removes_dead_ones(tmp_path):
    """Two servers starting at once on one machine: one's reap must not take the folder the other has made
    but not yet marked with its owner file (the fleet's streams on one GPU worker start together)."""
    import os
    import subprocess

    from skyrt.runtime.server.state import HLS_PREFIX, make_hls_folder, reap_stale_hls_folders

    being_made = tmp_path / f"{HLS_PREFIX}{os.getpid()}-abc"  # a live process, no owner file yet
    being_made.mkdir()
    dead = subprocess.Popen(["true"])
    dead.wait()
    half_made = tmp_path / f"{HLS_PREFIX}{dead.pid}-def"  # its maker died before the owner file
    half_made.mkdir()
    unnamed = tmp_path / f"{HLS_PREFIX}old"  # no pid in the name, no owner: an older version's
    unnamed.mkdir()
    mine = make_hls_folder(tmp_path)  # reaps first, as every server start does
    assert being_made.is_dir() and mine.is_dir()
    assert not half_made.exists() and not unnamed.exists()
    assert reap_stale_hls_folders(tmp_path) == []
