"""`skyrt serve --publish rtmp://...`: the push target's parts (URL checks, the drop-oldest-GOP queue,
the backoff), and a real server pushing to FFmpeg listening as the RTMP receiver, which decodes what
it gets; the receiver is killed and restarted and the push resumes while the generator runs on."""
from __future__ import annotations

import random
import signal
import subprocess
import time
import urllib.request

import pytest
from serving import free_port, get_json, require_tool, running_server, stop_process, wait_until

from skyrt.runtime.server.publish import Backoff, PacketQueue, PublishUrlError, check_publish_url, redact
from skyrt.runtime.server.stream_server import ServerConfig


# ---------------------------------------------------------------- URLs
@pytest.mark.parametrize("url, words", [
    ("srt://relay:9000?streamid=x", "no SRT protocol"),
    ("http://relay/live/key", "scheme must be rtmp:// or rtmps://"),
    ("rtmp:///live/key", "names no host"),
    ("rtmp://relay", "no application name and stream key"),
    ("rtmp://relay/live", "no stream key"),
    ("rtmp://relay:port/live/key", "bad port"),
    ("", "needs a URL"),
])
def test_bad_publish_urls_are_refused_with_the_fix(url, words):
    with pytest.raises(PublishUrlError) as err:
        check_publish_url(url)
    assert words in str(err.value)
    assert "rtmp://HOST" in str(err.value) or "rtmp://" in str(err.value)


def test_good_publish_urls_mux_flv_and_the_key_never_shows():
    assert check_publish_url("rtmp://127.0.0.1:1935/live/k3y") == "flv"
    assert check_publish_url("rtmps://live.example.com/app/k3y") == "flv"
    assert redact("rtmp://user:pw@relay:1935/live/k3y") == "rtmp://relay:1935/live/***"
    with pytest.raises(ValueError, match="keep mp4, hls or webrtc"):
        ServerConfig(formats=("mjpeg",), publish=("rtmp://relay/live/key",))
    with pytest.raises(PublishUrlError):
        ServerConfig(publish=("srt://relay:9000",))


def test_pyav_ffmpeg_really_has_no_srt_protocol():
    """Why srt:// is refused; if a PyAV build ever ships libsrt this fails, and SRT can be offered."""
    av = pytest.importorskip("av")
    container = av.open("srt://127.0.0.1:9", mode="w", format="mpegts")
    stream = container.add_stream("mpeg2video", rate=12)
    stream.width = stream.height = 32
    with pytest.raises(av.error.ProtocolNotFoundError):
        container.start_encoding()


# ---------------------------------------------------------------- the queue and the backoff
def packets(pattern: str) -> list[tuple]:
    """'K..K.' -> packet copies, K a keyframe; each carries its index as pts."""
    return [(b"x", i, i, None, c == "K") for i, c in enumerate(pattern)]


def drain(queue: PacketQueue) -> list[int]:
    out = []
    while (packet := queue.take(timeout=0)) is not None:
        out.append(packet[1])
    return out


def test_queue_starts_at_a_keyframe_and_drops_whole_gops_when_full():
    queue = PacketQueue(capacity=6)
    for packet in packets("..K..K..K."):  # two delta frames before any keyframe: undecodable, dropped
        queue.put(packet)
    # 8 packets from index 2 into room for 6: the oldest GOP (2, 3, 4) went whole, so it starts at 5.
    assert drain(queue) == [5, 6, 7, 8, 9]
    assert queue.dropped == 2 + 3


def test_queue_with_one_long_gop_waits_for_the_next_keyframe():
    queue = PacketQueue(capacity=3)
    for packet in packets("K.....K."):
        queue.put(packet)
    # K.. fills it; the 4th packet drops the GOP whole and, being a delta frame, waits for a keyframe.
    assert drain(queue) == [6, 7]
    assert queue.dropped == 6


def test_a_new_connection_starts_at_the_newest_keyframe():
    queue = PacketQueue(capacity=20)
    for packet in packets("K..K..K.."):
        queue.put(packet)
    queue.start_at_newest_keyframe()
    assert drain(queue) == [6, 7, 8] and queue.dropped == 6


def test_backoff_doubles_to_its_cap_with_jitter_below_each_step():
    backoff, rng = Backoff(first_s=0.5, max_s=4.0, jitter=0.5), random.Random(1)
    for failures, step in [(1, 0.5), (2, 1.0), (3, 2.0), (4, 4.0), (9, 4.0)]:
        delays = [backoff.delay(failures, rng) for _ in range(200)]
        assert step * 0.5 <= min(delays) and max(delays) <= step
        assert max(delays) - min(delays) > step * 0.3  # jittered, not a fixed step


# ---------------------------------------------------------------- a real server, a real receiver
def rtmp_receiver(port: int, frames_file, log_file) -> subprocess.Popen:
    """FFmpeg as an RTMP server: decodes what is published to live/key and writes a CRC line per
    decoded frame (flushed per frame, so a killed receiver leaves what it decoded)."""
    ffmpeg = require_tool("ffmpeg")
    return subprocess.Popen([ffmpeg, "-hide_banner", "-nostdin", "-loglevel", "error", "-listen", "1",
                             "-analyzeduration", "0", "-probesize", "32",
                             "-i", f"rtmp://127.0.0.1:{port}/live/key",
                             "-flush_packets", "1", "-f", "framecrc", str(frames_file)],
                            stdout=subprocess.DEVNULL, stderr=log_file)


def decoded_frames(path) -> list[list[str]]:
    """framecrc lines (stream, dts, pts, duration, size, crc) of the decoded frames so far."""
    if not path.exists():
        return []
    return [[f.strip() for f in line.split(",")] for line in path.read_text().splitlines()
            if line and not line.startswith("#")]


def publish_state(base: str) -> dict:
    return get_json(base + "/status")["publish"][0]


def test_push_reaches_an_ffmpeg_receiver_and_resumes_after_it_is_killed(official_dir, tmp_path):
    port = free_port()
    first, second = tmp_path / "first.crc", tmp_path / "second.crc"
    log = open(tmp_path / "receiver.log", "w")
    receiver = rtmp_receiver(port, first, log)
    try:
        with running_server(official_dir, "--publish", f"rtmp://127.0.0.1:{port}/live/key") as (base, proc):
            wait_until(lambda: len(decoded_frames(first)) >= 12, 60,
                       lambda: f"receiver decoded {len(decoded_frames(first))} frames\n{proc.output()[-3000:]}")
            size = int(decoded_frames(first)[0][4])
            assert size == 32 * 32 * 3 // 2  # a decoded 32x32 yuv420p picture
            state = publish_state(base)
            assert state["connected"] and state["connects"] == 1 and state["target"].endswith("/live/***")
            assert "key" not in str(get_json(base + "/status")["publish"])

            receiver.kill()  # the receiver dies mid-stream
            receiver.wait(timeout=10)
            wait_until(lambda: not publish_state(base)["connected"], 30, lambda: "the push never noticed")
            before = get_json(base + "/status")
            time.sleep(2.0)  # the outage: reconnect attempts are refused
            during = get_json(base + "/status")
            assert during["frames_generated"] > before["frames_generated"]  # the generator kept going
            fps = (during["frames_output"] - before["frames_output"]) / (during["uptime_s"] - before["uptime_s"])
            assert fps > 12 * 0.7  # and the outputs kept their rate
            assert during["publish"][0]["failures"] >= 1

            receiver = rtmp_receiver(port, second, log)
            wait_until(lambda: len(decoded_frames(second)) >= 12, 60,
                       lambda: f"the push did not resume: {publish_state(base)}\n{proc.output()[-3000:]}")
            assert all(int(frame[4]) == size for frame in decoded_frames(second))
            state = publish_state(base)
            assert state["connected"] and state["reconnects"] >= 1 and state["packets_sent"] > 24
            metrics = get_json_text(base + "/metrics")
            assert 'skyrt_publish_connected{target="rtmp://127.0.0.1:%d/live/***"} 1' % port in metrics
            assert "skyrt_publish_reconnects_total" in metrics
    finally:
        stop_process(receiver, signal.SIGINT, timeout=10)
        log.close()


def get_json_text(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as r:
        return r.read().decode()


def test_a_receiver_that_accepts_and_never_answers_costs_the_stream_nothing(official_dir):
    """FFmpeg's RTMP client connects holding the interpreter lock and with no timeout: in the
    server's process such a receiver would freeze it whole. The relay child waits instead; the
    server answers, the output keeps its rate, and a stop is still prompt."""
    import socket

    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(4)
    port = silent.getsockname()[1]
    try:
        with running_server(official_dir, "--publish", f"rtmp://127.0.0.1:{port}/live/key") as (base, proc):
            conn, _ = silent.accept()  # the push connected and now waits for the handshake's answer
            before = get_json(base + "/status")
            time.sleep(3.0)
            after = get_json(base + "/status")
            fps = (after["frames_output"] - before["frames_output"]) / (after["uptime_s"] - before["uptime_s"])
            assert fps > 12 * 0.7, (before, after)
            state = after["publish"][0]
            assert not state["connected"] and state["connects"] == 0 and state["queued_packets"] <= 24
            stopped = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=30)
            assert time.monotonic() - stopped < 10
            conn.close()
    finally:
        silent.close()
