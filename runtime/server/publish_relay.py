"""The network half of a push (publish.py), run as a child process: FLV on stdin, copied as it comes
to the receiver's URL; "connected" on stdout once the receiver took the stream.

A process of its own because FFmpeg's RTMP client opens its connection (TCP, the handshake, connect
and publish) while PyAV holds the interpreter lock and without any timeout: in the server's process
a receiver that accepts and never answers would freeze every thread, HTTP included. Here it freezes
only this child, which the server kills when it makes no progress.

    python -m skyrt.runtime.server.publish_relay URL FORMAT     (FORMAT: the muxer, flv for rtmp://)
"""
from __future__ import annotations

import sys


def relay(url: str, fmt: str) -> None:
    import av

    # pipe:0 read by FFmpeg itself: each read returns what the pipe holds, never waits for a full buffer.
    source = av.open("pipe:0", mode="r", format="flv", options={"probesize": "32", "analyzeduration": "0"})
    video = source.streams.video[0]
    sink = av.open(url, mode="w", format=fmt)
    try:
        stream = sink.add_stream_from_template(video)
        sink.start_encoding()  # connects; blocks for as long as the receiver takes
        print("connected", flush=True)
        for packet in source.demux(video):
            if packet.dts is None:  # the demuxer's end-of-stream marker
                continue
            packet.stream = stream
            sink.mux(packet)
    finally:
        try:
            sink.close()
        except Exception:  # a dead connection takes no trailer
            pass


def main() -> int:
    if len(sys.argv) != 3:
        print(__doc__, file=sys.stderr)
        return 2
    try:
        relay(sys.argv[1], sys.argv[2])
    except Exception as err:  # the parent reads this line for /status (its URL is redacted there)
        print(f"{type(err).__name__}: {err}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
