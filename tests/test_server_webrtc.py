"""WebRTC out by WHEP (runtime/server/outputs/webrtc.py) against a running `skyrt serve`: aiortc as
the WHEP client receives and decodes the stream's frames; the WHEP resource is deleted; bad offers
get a 4xx that names the problem; a real headless Chromium plays it from the server's page (the
page's requestVideoFrameCallback count of decoded frames keeps rising for >= 10 s)."""
from __future__ import annotations

import asyncio
import json
import urllib.parse

import numpy as np
import pytest

from serving import get_json, running_server
from whep_client import whep_session

# aiortc is in the serve extra (CI installs it): a missing one fails here rather than skipping.
import aiortc  # noqa: E402,F401


@pytest.fixture(scope="module")
def server(official_dir):
    # webrtc follows hls's encode here (mp4 off): the follower path that prepends SPS/PPS.
    with running_server(official_dir, "--formats", "mjpeg,hls,webrtc", "--max-webrtc-sessions", "3",
                        "--max-webrtc-sessions-per-address", "2") as (base, proc):
        yield base, proc


def test_aiortc_receives_and_decodes_the_stream_over_whep(server):
    base, _ = server
    status, headers, (frames, jpegs), deleted, deleted_again = asyncio.run(whep_session(base, frames_wanted=36))
    assert status == 201, frames
    assert headers["Content-Type"].startswith("application/sdp")
    assert headers["Location"].startswith("whep/") and len(headers["Location"]) > 20
    assert len(frames) == 36
    assert all(f.shape == (32, 32, 3) for f in frames)  # the stream's size (FAST_SAMPLING)
    # A live picture: generated frames differ from each other, and are not a blank decoder output.
    assert max(np.abs(a.astype(int) - b).mean() for a, b in zip(frames, frames[1:])) > 0.5
    # The picture is the stream's: some WebRTC frame matches some MJPEG frame of the same seconds to
    # within codec error (a colour-space or channel-order slip would be off by tens).
    assert len(jpegs) >= 5
    closest = min(np.abs(f.astype(int) - j).mean() for f in frames for j in jpegs)
    print(f"{len(frames)} WebRTC frames, {len(jpegs)} MJPEG frames, closest mean |diff| {closest:.2f}")
    assert closest < 3.0
    assert deleted == 200 and deleted_again == 404
    status_doc = get_json(base + "/status")
    assert status_doc["webrtc"]["sessions"] == 0 and status_doc["webrtc"]["created"] >= 1
    assert {"name": "webrtc"}.items() <= status_doc["outputs"][-1].items()


def test_an_offer_without_h264_is_refused_with_the_reason(server):
    base, _ = server
    status, _headers, body, *_ = asyncio.run(whep_session(base, 1, codecs=("video/VP8",)))
    assert status == 406 and "H.264" in json.loads(body)["error"]


@pytest.mark.parametrize("content_type, body, code, words", [
    ("application/json", b"{}", 415, "application/sdp"),
    ("application/sdp", b"v=0\r\n", 400, "m=video"),
    ("application/sdp", b"\xff\xfe" + b"m=video" * 10, 400, "UTF-8"),
    ("application/sdp", b"v=0\r\nm=video 9 UDP/TLS/RTP/SAVPF 96\r\na=rtpmap:96 H264/90000\r\n", 400, "could not be answered"),
    ("application/sdp", b"m=video " + b"x" * 70_000, 413, "larger than"),
])
def test_bad_offers_get_a_4xx_that_names_the_problem(server, content_type, body, code, words):
    import urllib.error
    import urllib.request

    base, proc = server
    request = urllib.request.Request(base + "/whep", data=body, method="POST", headers={"Content-Type": content_type})
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=10)
    assert refused.value.code == code
    assert words in json.loads(refused.value.read())["error"]
    assert proc.poll() is None and get_json(base + "/healthz")["ok"]


def test_trickle_and_unknown_sessions_and_the_session_cap(server):
    import urllib.error
    import urllib.request

    base, _ = server

    def call(method, path, body=None):
        request = urllib.request.Request(base + path, data=body, method=method,
                                         headers={"Content-Type": "application/trickle-ice-sdpfrag"})
        try:
            with urllib.request.urlopen(request, timeout=10) as r:
                return r.status
        except urllib.error.HTTPError as err:
            return err.code

    assert call("PATCH", "/whep/abc", b"a=candidate") == 405
    assert call("DELETE", "/whep/not-a-session") == 404

    async def offer_from(addresses):
        """One offer from each of `addresses` (loopback source addresses), sessions held until all are made."""
        import aiohttp
        from aiortc import RTCConfiguration, RTCPeerConnection

        pcs, codes, errors, resources = [], [], [], []
        for address in addresses:
            pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
            pc.addTransceiver("video", direction="recvonly")
            await pc.setLocalDescription(await pc.createOffer())
            pcs.append(pc)
            connector = aiohttp.TCPConnector(local_addr=(address, 0))
            async with aiohttp.ClientSession(connector=connector) as http:
                async with http.post(base + "/whep", data=pc.localDescription.sdp,
                                     headers={"Content-Type": "application/sdp"}) as r:
                    codes.append(r.status)
                    errors.append(None if r.status == 201 else json.loads(await r.text())["error"])
                    if r.status == 201:
                        resources.append(urllib.parse.urljoin(base + "/whep", r.headers["Location"]))
        async with aiohttp.ClientSession() as http:
            for resource in resources:
                async with http.delete(resource) as r:
                    assert r.status == 200
        for pc in pcs:
            await pc.close()
        return codes, errors

    # Two from one address, the third from it refused (429, naming the flag); another address gets the
    # last session of three; a fourth address finds them all in use (503).
    codes, errors = asyncio.run(offer_from(["127.0.0.1", "127.0.0.1", "127.0.0.1", "127.0.0.2", "127.0.0.3"]))
    assert codes == [201, 201, 429, 201, 503], errors
    assert "--max-webrtc-sessions-per-address" in errors[2] and "127.0.0.1" in errors[2]
    assert "sessions are in use" in errors[4]
    state = get_json(base + "/status")["webrtc"]
    assert state["refused_full"] >= 1 and state["refused_per_address"] >= 1 and state["sessions"] == 0


def test_chromium_plays_webrtc_from_the_page_for_ten_seconds(official_dir, tmp_path):
    """The server's page with ?view=webrtc in real headless Chromium over loopback: it POSTs its
    offer to /whep and plays the answer's stream; the page's requestVideoFrameCallback counts the
    frames the browser decoded and presented, and the video's currentTime, sampled every second."""
    from test_server_browser import _chromium, _watch_page

    with running_server(official_dir, "--formats", "mp4,webrtc") as (base, proc), _chromium(tmp_path) as devtools:
        samples = _watch_page(devtools, base + "/?view=webrtc", seconds=16)
        status = get_json(base + "/status")
    playing = [s for s in samples if s.get("webrtcFrames")]
    last = samples[-1]
    print(f"WebRTC in Chromium: {last.get('webrtcFrames')} frames presented over {len(playing)} s of playback, "
          f"currentTime {last.get('webrtcTime')}, size {last.get('webrtcSize')}, state {last.get('webrtcState')}")
    assert last.get("webrtcError") is None, last
    assert last["webrtcState"] == "connected" and "/whep/" in last["whepResource"], last
    assert len(playing) >= 11, samples  # >= 10 s from the first frame on
    # Frames keep coming over those 10 s (12 fps stream: >= 8 a second on average), and the
    # media clock runs with them.
    first = playing[0]
    assert last["webrtcFrames"] - first["webrtcFrames"] >= 8 * (len(playing) - 1), samples
    assert all(b["webrtcFrames"] > a["webrtcFrames"] for a, b in zip(playing, playing[1:])), samples
    assert last["webrtcTime"] - first["webrtcTime"] >= 0.8 * (len(playing) - 1), samples
    assert last["webrtcSize"] == [32, 32]
    assert status["webrtc"]["sessions"] == 1 and status["clients"].get("webrtc") == 1, status
