"""The output registry (runtime/server/outputs/) and the WebRTC feed's bitstream, on their own:
every output is named once and routed by the fleet as it says; the CLI, the config and the ingress
take their lists from it; the WebRTC feed, leading or following the shared encode, sends H.264 that
FFmpeg's own decoder (PyAV) decodes to the same pictures as the MP4 output it follows."""
from __future__ import annotations

import io
from types import SimpleNamespace

import numpy as np
import pytest

from skyrt.runtime.fleet.ingress import route
from skyrt.runtime.server import ServerConfig
from skyrt.runtime.server.broadcast import Broadcast
from skyrt.runtime.server.encoders import Fmp4Encoder
from skyrt.runtime.server.outputs import (DEFAULT_FORMATS, FLEET_FORWARD, FLEET_NONE, FLEET_VIDEO, FORMATS, OUTPUTS,
                                          Encoding, active)
from skyrt.runtime.server.outputs.webrtc import WebRtcFeed, _has_parameter_sets

FPS, SIZE = 12, 32


def test_every_output_is_named_once_and_says_how_the_fleet_routes_it():
    names = [o.name for o in OUTPUTS]
    assert len(set(names)) == len(names)
    assert {"mjpeg", "mp4", "hls", "llhls", "webrtc", "rtmp"} == set(names)
    samples = {"mjpeg": ["/stream.mjpg"], "mp4": ["/stream.mp4"], "hls": ["/hls/seg_ab_000001.m4s", "/hls/init_ab.mp4"],
               "llhls": ["/llhls/live.m3u8", "/llhls/part_ab_1_0.m4s"], "webrtc": ["/whep", "/whep/AbC-12_x"]}
    for output in OUTPUTS:
        if output.fleet == FLEET_NONE:
            assert not output.paths and output.add_routes is None
            continue
        for path in samples[output.name]:
            expected = {FLEET_VIDEO: "video", FLEET_FORWARD: "forward"}[output.fleet]
            method = "POST" if output.name == "webrtc" and path == "/whep" else "GET"
            assert route(method, "/streams/s1" + path).kind == expected, (output.name, path)
    # The HLS playlist is not video bytes: the ingress answers it (forwarded), the node its segments.
    assert route("GET", "/streams/s1/hls/live.m3u8").kind == "forward"
    assert route("DELETE", "/streams/s1/whep/abc").kind == "forward"


def test_the_config_and_the_cli_take_the_format_list_from_the_registry():
    from skyrt.runtime.cli import build_parser

    assert ServerConfig().formats == DEFAULT_FORMATS
    with pytest.raises(ValueError, match="subset of"):
        ServerConfig(formats=("mjpeg", "llhls"))  # llhls comes with hls; it is not a --formats name
    args = build_parser().parse_args(["serve"])
    assert tuple(args.formats.split(",")) == DEFAULT_FORMATS
    names = lambda config: [o.name for o in active(config)]
    assert names(ServerConfig(formats=("hls",))) == ["hls", "llhls"]
    assert names(ServerConfig(formats=("hls",), ll_hls_part_s=0)) == ["hls"]
    assert names(ServerConfig(formats=("webrtc", "mjpeg"), publish=("rtmp://relay/live/key",))) == \
        ["mjpeg", "webrtc", "rtmp"]
    assert set(FORMATS) >= set(DEFAULT_FORMATS)


def _frames(count: int):
    """Smooth moving pictures (a gradient that slides) so the H.264 stream has real P-frames and
    4:2:0 chroma keeps the picture recognisable."""
    y, x = np.mgrid[0:SIZE, 0:SIZE]
    return [np.stack([(x + i) % SIZE * 8, y * 8, np.full_like(x, 128)], axis=-1).astype(np.uint8)
            for i in range(count)]


def _decode_annexb(items) -> list[np.ndarray]:
    import av

    codec = av.CodecContext.create("h264", "r")
    pictures = []
    for data, _pts, _tb in items:
        for frame in codec.decode(av.Packet(data)):
            pictures.append(frame.to_ndarray(format="rgb24"))
    return pictures




def test_leading_the_feed_encodes_once_and_every_keyframe_carries_its_parameter_sets():
    broadcast = Broadcast("webrtc", 100, needs_keyframe=True)
    reader = broadcast.subscribe()
    server = SimpleNamespace(broadcasts={"webrtc": broadcast})
    from skyrt.runtime.server.outputs import webrtc

    encoding = Encoding(server, FPS, SIZE, SIZE)
    (feed,) = webrtc.make_encoders(encoding)
    assert encoding.h264 is feed and feed.encodes
    for frame in _frames(30):
        feed.encode(frame)
    items = [item for item in broadcast._after(0)[0]]
    assert len(items) >= 28  # libx264 zerolatency: a packet per frame, at once
    keyframes = [it for it in items if it.keyframe]
    assert len(keyframes) >= 2  # one GOP a second at 12 fps
    assert all(_has_parameter_sets(it.payload[0]) for it in keyframes)
    pictures = _decode_annexb([it.payload for it in items])
    assert len(pictures) == len(items)
    assert np.abs(pictures[5].astype(int) - _frames(30)[5]).mean() < 20  # the picture, within codec error
    assert reader.take()  # a subscriber got them


def test_following_the_mp4_encode_sends_its_packets_with_the_parameter_sets_put_in_front():
    import av

    mp4, webrtc_broadcast = Broadcast("mp4", 100, needs_keyframe=True), Broadcast("webrtc", 100, needs_keyframe=True)
    leader = Fmp4Encoder(mp4, FPS, SIZE, SIZE)
    feed = WebRtcFeed(webrtc_broadcast, FPS, SIZE, SIZE, leader=leader)
    assert not feed.encodes
    for frame in _frames(30):
        leader.encode(frame)
        feed.encode(frame)
    leader.close()
    items = [it.payload for it in webrtc_broadcast._after(0)[0]]
    # The MP4 keeps SPS/PPS in its extradata, so its keyframes carry none in-band; the feed's do.
    first = items[0][0]
    assert _has_parameter_sets(first)
    # Oracle: FFmpeg demuxes and decodes the MP4 output; the feed's pictures are the same pictures.
    stream = io.BytesIO(mp4.header + b"".join(it.payload for it in mp4._after(0)[0]))
    with av.open(stream) as container:
        from_mp4 = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    from_feed = _decode_annexb(items)
    assert len(from_feed) >= 28 and len(from_mp4) >= len(from_feed) - 1
    assert max(np.abs(a.astype(int) - b).max() for a, b in zip(from_feed, from_mp4)) == 0


def test_a_new_webrtc_viewer_starts_at_the_next_keyframe_not_the_backlog():
    broadcast = Broadcast("webrtc", 50, needs_keyframe=True)
    for i in range(5):
        broadcast.publish((b"k" if i == 0 else b"p", i, None), keyframe=i == 0)
    reader = broadcast.subscribe_at_next_keyframe()
    assert reader.take() == []
    broadcast.publish((b"p", 5, None), keyframe=False)
    broadcast.publish((b"k", 6, None), keyframe=True)
    broadcast.publish((b"p", 7, None), keyframe=False)
    assert [p[1] for p in reader.take()] == [6, 7]


def test_the_latency_benchmarks_stamp_survives_h264_and_jpeg():
    """benchmarks/egress.py reads each frame's wall-clock stamp back from what the browser shows:
    the stamp must come through libx264 (decoded by FFmpeg) and JPEG unchanged."""
    import av
    from PIL import Image

    from benchmark_scripts import load_benchmark

    egress = load_benchmark("egress")
    stamps = [0, 1, (1 << 24) - 1, 0xA5A5A5, 12_345_678]
    rng = np.random.default_rng(1)
    frames = [egress.draw_stamp(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8), s) for s in stamps]
    codec = av.CodecContext.create("libx264", "w")
    codec.width = codec.height = 64
    codec.pix_fmt, codec.framerate, codec.options = "yuv420p", 12, {"tune": "zerolatency", "preset": "veryfast"}
    decoder = av.CodecContext.create("h264", "r")
    decoded = []
    for frame in frames + [None]:
        packets = codec.encode(None if frame is None else av.VideoFrame.from_ndarray(frame, format="rgb24"))
        for packet in packets:
            decoded += [f.to_ndarray(format="rgb24") for f in decoder.decode(packet)]
    assert [egress.read_stamp(f) for f in decoded] == stamps
    for frame, stamp in zip(frames, stamps):
        buf = io.BytesIO()
        Image.fromarray(frame).save(buf, format="JPEG", quality=85)
        assert egress.read_stamp(np.asarray(Image.open(buf).convert("RGB"))) == stamp
