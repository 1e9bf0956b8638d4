"""Low-latency HLS: the packager's parts and segments checked by FFmpeg (ffprobe counts what each
holds and decodes), the playlist's LL-HLS rules, blocking playlist reload and the preload hint on a
real server, FFmpeg's HLS demuxer reading the LL playlist, and hls.js in low-latency mode in headless
Chromium loading parts and playing, with its latency behind live measured against the plain playlist."""
from __future__ import annotations

import re
import subprocess
import time

import numpy as np
import pytest
from serving import get, require_tool, running_server, wait_until
from test_server_browser import _chromium, _watch_page

from skyrt.runtime.server.broadcast import Broadcast
from skyrt.runtime.server.encoders import Fmp4Encoder
from skyrt.runtime.server.llhls import LlHlsPackager, new_window

PART = re.compile(r'#EXT-X-PART:DURATION=([\d.]+),URI="([^"]+)"(,INDEPENDENT=YES)?')


def probe(path, count: str = "frames") -> tuple[str, int]:
    """(codec, frames decoded or packets read) of a file's video stream, by ffprobe."""
    exe = require_tool("ffprobe")
    entry = "nb_read_frames" if count == "frames" else "nb_read_packets"
    out = subprocess.run([exe, "-v", "error", "-select_streams", "v:0", f"-count_{count}", "-show_entries",
                          f"stream=codec_name,{entry}", "-of", "csv=p=0", str(path)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    codec, n = out.stdout.strip().split(",")[:2]
    return codec, int(n)


@pytest.fixture(scope="module")
def packaged():
    """12 fps, 0.25 s parts (3 frames), 8 s of random frames through a leader and the packager."""
    leader = Fmp4Encoder(Broadcast("mp4", 10, needs_keyframe=True), 12, 32, 32)
    window = new_window(12, 0.25, run="cafe")
    packager = LlHlsPackager(window, 12, 32, 32, leader=leader)
    rng = np.random.default_rng(0)
    for _ in range(12 * 8 + 4):
        frame = rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)
        leader.encode(frame)
        packager.encode(frame)
    return window, packager


def test_parts_hold_their_frames_and_a_segment_is_its_parts(packaged, tmp_path):
    window, _ = packaged
    playlist = window.playlist.decode()
    init = window.files[window.init_name]
    segment = "llseg_cafe_6.m4s"
    parts = [name for _, name, _ in PART.findall(playlist) if name.startswith("llpart_cafe_6_")]
    assert len(parts) == 4  # 1 s segments of 0.25 s parts
    assert window.files[segment] == b"".join(window.files[name] for name in parts)
    for i, name in enumerate(parts):
        (tmp_path / "part.mp4").write_bytes(init + window.files[name])
        assert probe(tmp_path / "part.mp4", "packets") == ("h264", 3)
    (tmp_path / "first.mp4").write_bytes(init + window.files[parts[0]])
    assert probe(tmp_path / "first.mp4") == ("h264", 3)  # the independent part decodes on its own
    (tmp_path / "segment.mp4").write_bytes(init + window.files[segment])
    assert probe(tmp_path / "segment.mp4") == ("h264", 12)


def test_the_playlist_follows_the_ll_hls_rules(packaged):
    window, packager = packaged
    playlist = window.playlist.decode()
    target = float(re.search(r"#EXT-X-PART-INF:PART-TARGET=([\d.]+)", playlist).group(1))
    hold_back = float(re.search(r"PART-HOLD-BACK=([\d.]+)", playlist).group(1))
    assert 0.2 <= target <= 0.5 and hold_back >= 3 * target - 1e-9
    assert "CAN-BLOCK-RELOAD=YES" in playlist and "#EXT-X-MAP:URI=" in playlist
    # Each segment that lists parts: parts in order, the first one independent, durations summing up.
    blocks = re.findall(r"((?:#EXT-X-PART:[^\n]+\n)+)#EXTINF:([\d.]+),\n(\S+)", playlist)
    assert len(blocks) == 3
    for parts_text, extinf, _name in blocks:
        parts = PART.findall(parts_text)
        assert parts[0][2] and not any(independent for _, _, independent in parts[1:])
        assert all(float(d) <= target + 1e-9 for d, _, _ in parts)
        assert abs(sum(float(d) for d, _, _ in parts) - float(extinf)) < 1e-6
    for _, name, _ in PART.findall(playlist):
        assert name in window.files
    # The preload hint names the part being made; 3 more frames make it, under that name.
    hint = re.search(r'#EXT-X-PRELOAD-HINT:TYPE=PART,URI="([^"]+)"', playlist).group(1)
    assert hint not in window.files and playlist.rstrip().endswith(hint + '"')
    leader = packager._muxer._leader
    for _ in range(3):
        frame = np.zeros((32, 32, 3), np.uint8)
        leader.encode(frame)
        packager.encode(frame)
    assert hint in window.files and f'URI="{hint}"' in window.playlist.decode()



def test_every_preload_hint_names_a_part_that_is_then_made():
    """Frame by frame over 3 s (12 fps, 3-frame parts: a segment's 4th part fills its GOP), each
    playlist's preload hint is recorded; every hinted name must appear as a file within the next
    part's frames (a hint for a part that is never made is a 404 for every LL-HLS player that
    preloads it: hls.js does)."""
    leader = Fmp4Encoder(Broadcast("mp4", 10, needs_keyframe=True), 12, 32, 32)
    window = new_window(12, 0.25, run="beef")
    packager = LlHlsPackager(window, 12, 32, 32, leader=leader)
    rng = np.random.default_rng(1)
    hinted: dict[str, int] = {}  # name -> frame index when first hinted
    made: dict[str, int] = {}  # name -> frame index when it first existed
    for i in range(12 * 3 + 2):
        frame = rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)
        leader.encode(frame)
        packager.encode(frame)
        for name in window.files:
            made.setdefault(name, i)
        if window.playlist is not None:
            name = re.search(r'#EXT-X-PRELOAD-HINT:TYPE=PART,URI="([^"]+)"', window.playlist.decode()).group(1)
            hinted.setdefault(name, i)
    # The last hint may still be in the making; every earlier one was made, within a part (+ the
    # muxer's one frame of lag) of being hinted.
    settled = {name: at for name, at in hinted.items() if at <= i - 4}
    assert len(settled) >= 8
    never = sorted(name for name in settled if name not in made)
    assert never == [], f"hinted but never made: {never}"
    assert all(made[name] - at <= 4 for name, at in settled.items()), (hinted, made)
    assert any(name.endswith("_0.m4s") and at > 0 for name, at in settled.items())  # a next segment's first part

# ---------------------------------------------------------------- a real server
@pytest.fixture(scope="module")
def server(official_dir):
    with running_server(official_dir, "--formats", "hls") as (base, proc):
        wait_until(lambda: get(base + "/llhls/live.m3u8")[1].count(b"#EXTINF") >= 2, 60)
        yield base


def test_a_blocking_reload_waits_for_the_next_part_and_the_hint_can_be_fetched_ahead(server):
    base = server
    playlist = get(base + "/llhls/live.m3u8")[1].decode()
    hint = re.search(r'PRELOAD-HINT:TYPE=PART,URI="llpart_\w+?_(\d+)_(\d+)\.m4s"', playlist)
    msn, part = int(hint.group(1)), int(hint.group(2))
    started = time.monotonic()
    status, body = get(f"{base}/llhls/live.m3u8?_HLS_msn={msn}&_HLS_part={part}")
    waited = time.monotonic() - started
    assert status == 200 and re.search(rf'URI="llpart_\w+?_{msn}_{part}\.m4s"', body.decode()), body
    assert waited < 2.0  # one part is 0.25 s of output

    # The next hint, asked for before it exists: the answer waits for the part and is its bytes.
    name = re.search(r'PRELOAD-HINT:TYPE=PART,URI="([^"]+)"', body.decode()).group(1)
    status, part_bytes = get(f"{base}/llhls/{name}")
    assert status == 200 and part_bytes[4:8] == b"moof"
    assert f'URI="{name}"' in get(base + "/llhls/live.m3u8")[1].decode()


@pytest.mark.parametrize("query, words", [
    ("_HLS_msn=999999", "past the live edge"),
    ("_HLS_msn=x", "must be a non-negative integer"),
    ("_HLS_part=1", "_HLS_part needs _HLS_msn"),
])
def test_bad_blocking_requests_are_refused_at_once(server, query, words):
    started = time.monotonic()
    status, body = get(f"{server}/llhls/live.m3u8?{query}")
    assert status == 400 and words in body.decode() and time.monotonic() - started < 1.0


def test_the_plain_playlist_stays_and_ffmpeg_plays_the_ll_one(server, tmp_path):
    plain = get(server + "/hls/live.m3u8")[1].decode()
    assert "#EXTINF" in plain and "EXT-X-PART" not in plain
    ffmpeg = require_tool("ffmpeg")
    out = subprocess.run([ffmpeg, "-v", "error", "-i", server + "/llhls/live.m3u8", "-t", "2", "-f", "framecrc", "-"],
                         capture_output=True, text=True, timeout=90)
    frames = [line for line in out.stdout.splitlines() if line and not line.startswith("#")]
    assert out.returncode == 0 and len(frames) >= 20, out.stderr  # 2 s at 12 fps, decoded


def test_hls_js_low_latency_mode_plays_parts_in_chromium_closer_to_live(official_dir, tmp_path):
    """hls.js (vendored, lowLatencyMode) on the LL playlist, then on the plain one, same server; the
    page reports frames presented, parts loaded and now - playingDate (program-date-time of the frame
    on screen: both clocks are this machine's)."""
    with running_server(official_dir, "--formats", "hls") as (base, _), _chromium(tmp_path) as devtools:
        ll = _watch_page(devtools, base + "/?view=hls&ll=1", seconds=20)
        plain = _watch_page(devtools, base + "/?view=hls", seconds=20)
    latency = {name: sorted(s["latencyS"] for s in samples[-8:] if s.get("latencyS") is not None)
               for name, samples in (("ll", ll), ("plain", plain))}
    print(f"hls.js behind live, median of the last 8 s: LL-HLS {latency['ll'][len(latency['ll']) // 2]:.2f} s, "
          f"plain HLS {latency['plain'][len(latency['plain']) // 2]:.2f} s; LL parts loaded {ll[-1]['partsLoaded']}")
    assert ll[-1]["hlsSource"] == "llhls/live.m3u8" and ll[-1]["partsLoaded"] >= 20, ll[-1]
    assert ll[-1]["videoFrames"] > ll[-6]["videoFrames"] >= 24, ll  # still playing
    assert plain[-1]["partsLoaded"] == 0 and plain[-1]["videoFrames"] > plain[-6]["videoFrames"], plain[-1]
    assert len(latency["ll"]) >= 4 and len(latency["plain"]) >= 4, latency
    assert latency["ll"][len(latency["ll"]) // 2] < latency["plain"][len(latency["plain"]) // 2], latency
