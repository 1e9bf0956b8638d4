"""deploy/nginx/skyrt.conf in front of a real `skyrt serve`: real nginx (unprivileged, a temp prefix,
the shipped config with its ports and cache folder substituted), a crowd of 200 HLS viewers on it,
and the origin's own count of what reached it: about one request per file."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
import urllib.error
import urllib.request

import pytest
from benchmark_scripts import load_benchmark
from serving import free_port, get, get_json, require_tool, running_server, wait_until

crowd = load_benchmark("nginx_crowd")


def require_nginx() -> str:
    path = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin")  # not on a user's PATH on Debian
    if path is None:
        if os.environ.get("SKYRT_REQUIRE_SYSTEM_TOOLS") == "1":
            pytest.fail("nginx is required here but missing (apt-get install nginx)")
        pytest.skip("nginx not installed (apt-get install nginx)")
    return path


def fetch_error(url: str) -> str:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return f"HTTP {r.status}: {r.read()[:300]!r}"
    except Exception as err:  # what the wait saw, for the failure message
        return f"{type(err).__name__}: {err}"


HINT = re.compile(r'PRELOAD-HINT:TYPE=PART,URI="(llpart_\w+?_(\d+)_(\d+)\.m4s)"')


def play_ll_hls_through(edge: str, origin: str) -> None:
    """Low-latency HLS through the proxy: a blocking reload for the hinted part (the query is in the
    playlist's cache key, so it is not answered with the held plain reload), the hinted part asked
    ahead (held at the origin, passed on), the listed parts, and FFmpeg playing the LL playlist."""
    status, body = get(edge + "/llhls/live.m3u8")
    assert status == 200, body
    _name, msn, part = HINT.search(body.decode()).groups()
    started = time.monotonic()
    status, blocked = get(f"{edge}/llhls/live.m3u8?_HLS_msn={msn}&_HLS_part={part}")
    assert status == 200 and time.monotonic() - started < 4.0, (status, blocked)
    # The blocked answer holds that part, or (the segment ended at a keyframe first) that segment whole.
    assert re.search(rf'URI="llpart_\w+?_{msn}_{part}\.m4s"', blocked.decode()) or \
        re.search(rf'^llseg_\w+?_{msn}\.m4s$', blocked.decode(), re.M), blocked
    hinted = HINT.search(blocked.decode()).group(1)
    status, part_bytes = get(f"{edge}/llhls/{hinted}")
    if status != 200:
        # A hint is a promise the origin may not keep (LL-HLS lets a hinted part fail): it answers 404
        # only once that segment is complete without it. Anything else is the proxy's fault.
        listed = get(origin + "/llhls/live.m3u8")[1].decode()
        assert status == 404 and f'URI="{hinted}"' not in listed, (status, part_bytes[:300], listed)
    else:
        assert part_bytes[4:8] == b"moof", part_bytes[:16]
    listed = re.findall(r'#EXT-X-PART:[^\n]*URI="([^"]+)"', get(edge + "/llhls/live.m3u8")[1].decode())
    assert len(listed) >= 4, listed
    for name in listed[-4:]:
        status, part_bytes = get(f"{edge}/llhls/{name}")
        assert status == 200 and part_bytes[4:8] == b"moof", (name, status, part_bytes[:300])
    ffmpeg = require_tool("ffmpeg")
    out = subprocess.run([ffmpeg, "-v", "error", "-i", edge + "/llhls/live.m3u8", "-t", "2", "-f", "framecrc", "-"],
                         capture_output=True, text=True, timeout=60)
    frames = [line for line in out.stdout.splitlines() if line and not line.startswith("#")]
    assert out.returncode == 0 and len(frames) >= 20, out.stderr  # 2 s at 12 fps, decoded through nginx


def test_the_shipped_config_drifting_from_its_marked_values_is_caught(tmp_path):
    drifted = tmp_path / "skyrt.conf"
    drifted.write_text(crowd.SHIPPED_CONFIG.read_text().replace(crowd.LISTEN_LINE, "listen 9000;"))
    with pytest.raises(ValueError, match="exactly once"):
        crowd.nginx_config(tmp_path, 1, 2, shipped=drifted)


def test_200_hls_viewers_through_nginx_reach_the_origin_about_once_per_file(official_dir):
    nginx = require_nginx()
    with running_server(official_dir, "--formats", "hls,mjpeg", "--no-token", token=None) as (base, proc):
        listen = free_port()
        with crowd.running_nginx(int(base.rsplit(":", 1)[1]), listen, nginx) as prefix:
            edge = f"http://127.0.0.1:{listen}"
            # Through the proxy, the uncached parts answer as the origin does.
            assert get_json(edge + "/status")["fps"] == 12
            wait_until(lambda: urllib.request.urlopen(edge + "/hls/live.m3u8").read().count(b".m4s") >= 3, 60,
                       lambda: f"no playlist through nginx: {fetch_error(edge + '/hls/live.m3u8')}\n"
                               f"{(prefix / 'error.log').read_text()[-2000:]}")
            with urllib.request.urlopen(edge + "/stream.mjpg", timeout=10) as r:  # a stream passes unbuffered
                assert r.headers["Content-Type"].startswith("multipart/x-mixed-replace")
                assert r.read1(65536).startswith(b"--skyrtframe")
            time.sleep(1.2)  # a new playlist version: the ones asked above stay out of the crowd's count
            before = crowd.hls_counts(base)
            viewers = crowd.start_viewers(listen, 200, seconds=6.0)
            report = crowd.viewer_report(viewers)
            origin = crowd.per_file(before, crowd.hls_counts(base))
            cache_log = (prefix / "access.log").read_text()
            play_ll_hls_through(edge, base)
    assert report["errors"] == {}, report
    assert report["requests"] >= 200 * 6  # each viewer: a playlist a second, the init segment, the segments
    served = sum(kind["requests"] for kind in origin.values())
    assert served * 20 < report["requests"], (origin, report["requests"])  # the proxy answered the crowd
    # Fresh files arrived during the 6 s (the playlist refreshes at the edge every 1-2 s: held 1 s, then
    # served stale while one request updates it).
    assert origin["segment"]["files"] >= 5 and origin["playlist"]["files"] >= 2, origin
    for kind in ("segment", "init", "playlist"):
        assert origin[kind]["files"] >= 1 and origin[kind]["per_file"] <= 2.0, origin
    assert origin["segment"]["per_file"] <= 1.2 and origin["init"]["per_file"] == 1.0, origin  # immutable ones
    assert " HIT " in cache_log


def test_the_origin_counts_answers_per_file_version(tmp_path):
    """What the crowd test reads: requests per kind, and distinct versions asked (a new playlist is
    a new version of live.m3u8; a segment is one version forever); misses are not answers."""
    from skyrt.runtime.server.hls_window import HlsWindow

    def write(name: str, body: bytes) -> None:
        (tmp_path / (name + ".tmp")).write_bytes(body)
        (tmp_path / (name + ".tmp")).replace(tmp_path / name)

    def playlist(*names: str) -> bytes:
        return ('#EXTM3U\n#EXT-X-MAP:URI="init_a.mp4"\n' + "".join(f"#EXTINF:1.0,\n{n}\n" for n in names)).encode()

    window = HlsWindow(tmp_path)
    for name in ("init_a.mp4", "s1.m4s", "s2.m4s"):
        write(name, name.encode())
    write("live.m3u8", playlist("s1.m4s"))
    window.refresh()
    for name in ("live.m3u8", "live.m3u8", "init_a.mp4", "s1.m4s", "s1.m4s", "s1.m4s", "nope.m4s"):
        window.get(name)
    write("live.m3u8", playlist("s1.m4s", "s2.m4s"))
    window.refresh()
    for name in ("live.m3u8", "s2.m4s", "s1.m4s"):
        window.get(name)
    assert window.requests.snapshot() == {"playlist": {"requests": 3, "files": 2},
                                          "segment": {"requests": 5, "files": 2},
                                          "init": {"requests": 1, "files": 1}}
    assert 'skyrt_hls_requests_total{kind="segment"} 5' in window.requests.prometheus()
