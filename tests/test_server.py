"""`skyrt serve` end to end: a real server process on loopback with a tiny checkpoint; every output
read back and checked by FFmpeg's ffprobe; the control API fed good and bad input."""
from __future__ import annotations

import http.client
import json
import re
import signal
import time
import urllib.request
from io import BytesIO
from pathlib import Path
from urllib.parse import urlparse

import pytest
from serving import TOKEN, ffprobe, get_json, read_for, request, running_server, wait_until


@pytest.fixture(scope="module")
def server(official_dir, tmp_path_factory):
    playlist = tmp_path_factory.mktemp("playlist") / "list.json"
    playlist.write_text(json.dumps({"loop": True, "items": [
        {"prompt": "a red circle", "duration_s": 3600}, {"prompt": "a green square", "duration_s": 10}]}))
    with running_server(official_dir, "--playlist", str(playlist)) as (base, proc):
        yield base, proc


def test_mjpeg_stream_delivers_jpeg_frames(server):
    from PIL import Image

    base, _ = server
    # MJPEG carries only new frames, so how many arrive in a second depends on this machine's
    # generation rate: read until 5 parts are complete (the 6th boundary) or 30 s have passed.
    data = read_for(base + "/stream.mjpg", 30, enough=lambda d: d.count(b"--skyrtframe") >= 6)
    jpegs = re.findall(rb"\r\n\r\n(\xff\xd8.*?\xff\xd9)\r\n--skyrtframe", data, flags=re.S)
    assert len(jpegs) >= 5
    assert Image.open(BytesIO(jpegs[0])).size == (32, 32)


def test_fragmented_mp4_is_h264_at_the_configured_size_and_rate(server, tmp_path):
    base, _ = server
    path = tmp_path / "live.mp4"
    path.write_bytes(read_for(base + "/stream.mp4", 3.0))
    info = ffprobe(path)
    assert (info["codec_name"], info["width"], info["height"], info["r_frame_rate"]) == ("h264", 32, 32, "12/1")
    assert int(info["nb_read_frames"]) >= 12  # a joining client starts at a keyframe, then gets every frame


def test_hls_playlist_rolls_and_its_segments_are_h264(server, tmp_path):
    base, _ = server
    wait_until(lambda: urllib.request.urlopen(base + "/hls/live.m3u8").read().count(b".m4s") >= 2, 30)
    playlist = urllib.request.urlopen(base + "/hls/live.m3u8").read().decode()
    assert "#EXT-X-TARGETDURATION:1" in playlist and "#EXT-X-PROGRAM-DATE-TIME:" in playlist
    init = re.search(r'#EXT-X-MAP:URI="([^"]+)"', playlist).group(1)
    segments = re.findall(r"^(\S+\.m4s)$", playlist, flags=re.M)
    data = b"".join(urllib.request.urlopen(f"{base}/hls/{name}").read() for name in [init, *segments[-2:]])
    # The playlist is revalidated by every poll; segments (named per run) may be cached for good.
    assert urllib.request.urlopen(base + "/hls/live.m3u8").headers["Cache-Control"] == "no-cache"
    assert "immutable" in urllib.request.urlopen(f"{base}/hls/{segments[-1]}").headers["Cache-Control"]
    (tmp_path / "hls.mp4").write_bytes(data)
    info = ffprobe(tmp_path / "hls.mp4")
    assert (info["codec_name"], info["width"], info["height"]) == ("h264", 32, 32)
    assert 20 <= int(info["nb_read_frames"]) <= 26  # two 1 s segments at 12 fps


def test_hls_files_over_one_keep_alive_connection_are_the_encoders_files(server):
    """The HLS handler answers from the window in memory; what it sends is what FFmpeg wrote."""
    base, proc = server
    url = urlparse(base)
    folder = Path(re.search(r"HLS files in (\S+)", proc.output()).group(1))
    wait_until(lambda: urllib.request.urlopen(base + "/hls/live.m3u8").read().count(b".m4s") >= 2, 30)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=5)  # keep-alive, no extra headers

    def get(path):
        conn.request("GET", path)
        reply = conn.getresponse()
        return reply.read(), reply.headers

    playlist, headers = get("/hls/live.m3u8")
    assert headers["Content-Type"] == "application/vnd.apple.mpegurl" and playlist.startswith(b"#EXTM3U")
    assert headers["Cache-Control"] == "no-cache"
    init = re.search(rb'#EXT-X-MAP:URI="([^"]+)"', playlist).group(1).decode()
    segments = re.findall(r"^(\S+\.m4s)$", playlist.decode(), flags=re.M)[-2:]
    for name in (init, *segments):
        body, headers = get(f"/hls/{name}")
        on_disk = (folder / name).read_bytes()  # the newest segments are still in the folder
        assert body == on_disk and len(body) > 0 and int(headers["Content-Length"]) == len(body)
        assert headers["Content-Type"] == ("video/mp4" if name == init else "video/iso.segment")
        assert "immutable" in headers["Cache-Control"]
    conn.close()


@pytest.mark.parametrize("method, path, body, token, status, words", [
    ("POST", "/prompt", b'{"prompt": "a blue square"}', None, 401, "Authorization: Bearer"),
    ("POST", "/prompt", b'{"prompt": "x"}', "wrong", 401, "unauthorized"),
    ("POST", "/prompt", b"{not json", TOKEN, 400, "not valid JSON"),
    ("POST", "/prompt", b'{"prompt": 3}', TOKEN, 400, "prompt must be a string"),
    ("POST", "/prompt", b'{"prompt": "x", "extra": 1}', TOKEN, 400, "unknown field(s) ['extra']"),
    ("POST", "/prompt", json.dumps({"prompt": "x" * 1_000_000}).encode(), TOKEN, 413, "body larger than"),
    ("POST", "/prompt", json.dumps({"prompt": "x" * 3000}).encode(), TOKEN, 400, "the limit is 2000"),
    ("PUT", "/playlist", b'{"items": [{"prompt": "a", "duration_s": -2}]}', TOKEN, 400, "items[0].duration_s"),
    ("PUT", "/playlist", b'{"items": []}', None, 401, "unauthorized"),
    ("GET", "/hls/..%2F..%2Fetc%2Fpasswd", None, None, 400, "invalid HLS file name"),
    ("GET", "/hls/%2e%2e%2fstatus", None, None, 400, "invalid HLS file name"),
    ("GET", "/hls/seg_999999.m4s", None, None, 404, "not there"),
    ("GET", "/no/such/page", None, None, 404, "Not Found"),
    ("DELETE", "/prompt", None, TOKEN, 405, "Method Not Allowed"),
])
def test_bad_input_gets_a_4xx_json_error_and_the_server_keeps_running(server, method, path, body, token, status,
                                                                      words):
    base, proc = server
    code, reply = request(method, base + path, body, token)
    assert (code, words in reply["error"]) == (status, True), reply
    assert proc.poll() is None and get_json(base + "/healthz")["ok"]


def test_raw_path_traversal_never_leaves_the_hls_folder(server):
    base, _ = server
    url = urlparse(base)
    for raw in ("/hls/../../../../etc/passwd", "/hls/..%2f..%2f..%2fetc%2fpasswd", "/hls/%2e%2e/%2e%2e/etc/passwd"):
        conn = http.client.HTTPConnection(url.hostname, url.port, timeout=5)
        conn.request("GET", raw)
        reply = conn.getresponse()
        body = reply.read()
        assert reply.status in (400, 404) and b"root:" not in body, (raw, reply.status, body[:200])


def test_prompt_switch_shows_in_status_and_reaches_the_generator(server):
    base, _ = server
    assert request("POST", base + "/prompt", b'{"prompt": "a blue square", "transition": "recache"}') == (
        200, {"ok": True, "prompt": "a blue square", "transition": "recache"})
    assert get_json(base + "/status")["prompt"] == "a blue square"
    wait_until(lambda: get_json(base + "/status")["prompt_active"] == "a blue square", 30,
               lambda: f"the generator never switched: {get_json(base + '/status')}")


def test_playlist_from_file_then_replaced_over_http(server):
    base, _ = server
    listed = get_json(base + "/playlist")
    assert [i["prompt"] for i in listed["items"]] == ["a red circle", "a green square"] and listed["loop"]
    body = json.dumps({"loop": False, "items": [{"prompt": "a yellow star", "duration_s": 60}]}).encode()
    code, reply = request("PUT", base + "/playlist", body)
    assert code == 200 and reply["position"]["index"] == 0
    assert get_json(base + "/status")["prompt"] == "a yellow star"
    assert get_json(base + "/playlist")["items"][0]["prompt"] == "a yellow star"


def test_metrics_are_prometheus_text_that_moves(server):
    base, _ = server

    def samples():
        text = urllib.request.urlopen(base + "/metrics").read().decode()
        return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                if line and not line.startswith("#")}

    first = samples()
    time.sleep(1.0)
    second = samples()
    assert second["skyrt_frames_output_total"] >= first["skyrt_frames_output_total"] + 6  # 12 fps, paced
    assert second["skyrt_chunk_latency_seconds_count"] >= 1
    assert second["skyrt_time_to_first_frame_seconds"] > 0
    assert second["skyrt_process_open_fds"] > 0
    status = get_json(base + "/status")
    assert status["fps"] == 12 and status["mode"] == "kvcache" and status["generator_errors"] == 0


def test_page_is_self_contained(server):
    base, _ = server
    page = urllib.request.urlopen(base + "/").read().decode()
    # Relative to the page, so the same page also works under a fleet ingress's /streams/{id}/.
    assert 'src="static/hls.light.min.js"' in page and '"hls/live.m3u8"' in page and '"stream.mjpg"' in page
    assert not re.search(r"""(src|href|fetch\()=?\s*["']/""", page)  # no path from the server's root
    assert not re.search(r"""(src|href)=["']https?://""", page)  # nothing from the internet
    script = urllib.request.urlopen(base + "/static/hls.light.min.js").read()
    assert len(script) > 100_000 and b"Hls" in script


def test_sigterm_drains_and_exits_cleanly(official_dir):
    with running_server(official_dir) as (base, proc):
        folder = None
        status = get_json(base + "/status")
        assert status["frames_output"] > 0
        reader = urllib.request.urlopen(base + "/stream.mjpg", timeout=10)  # a client connected at shutdown
        reader.read(100)
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        output = proc.output()
        assert "stream stopped after" in output, output
        assert time.monotonic() - started < 15
        folder = re.search(r"HLS files in (\S+)", output)
        if folder:
            from pathlib import Path

            assert not Path(folder.group(1)).exists()
