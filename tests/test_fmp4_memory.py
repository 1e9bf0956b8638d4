"""The fMP4 muxers (/stream.mp4, LL-HLS) keep nothing per fragment: a live stream never ends, so
anything kept per frame is a leak (issue 36: the serving process grew ~6.5 MiB an hour).

FFmpeg's mp4 muxer, unless told `skip_trailer`, records an index entry for every fragment so that
it can write an `mfra` box (a `tfra` entry per fragment) when the file is closed. That index is the
per-fragment state: it is read here from the bytes the muxer writes at close, and the native heap
(glibc, outside Python's objects) is measured over many frames as the symptom itself.
"""
from __future__ import annotations

import gc
import tracemalloc

import numpy as np
import pytest

from skyrt.runtime.server.encoders import Fmp4Encoder
from skyrt.runtime.server.memtrace import heap_figures


class _Sink:
    """Stands in for a Broadcast: the encoder's header and fragments are dropped."""

    header = b""

    def publish(self, payload: bytes, keyframe: bool = False) -> None:
        pass


def _frames(n: int) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.integers(0, 255, (64, 64, 3), dtype=np.uint8) for _ in range(n)]  # [H, W, 3] uint8


def test_the_muxer_keeps_no_index_entry_per_fragment():
    encoder = Fmp4Encoder(_Sink(), 24, 64, 64)
    kinds: list[bytes] = []  # every top-level box the muxer writes, close included, in order
    split = encoder._sink._box
    encoder._sink._box = lambda kind, box: (kinds.append(kind), split(kind, box))[1]
    frames = _frames(4)
    for i in range(48):
        encoder.encode(frames[i % 4])
    encoder.close()
    assert kinds.count(b"moof") >= 40  # the stream itself: a fragment per frame
    assert b"mfra" not in kinds, ("the mp4 muxer indexed every fragment for an mfra box at close: it keeps "
                                  "40 bytes per frame for the life of the stream (movflags needs skip_trailer)")


@pytest.mark.skipif(heap_figures() is None, reason="needs glibc's mallinfo2")
def test_native_heap_stays_flat_over_many_frames():
    """Before skip_trailer: ~40 bytes a frame, growing for ever; after: ~1 (allocator noise)."""
    encoder = Fmp4Encoder(_Sink(), 24, 64, 64)
    frames = _frames(8)

    def native() -> int:
        gc.collect()
        return heap_figures()["in_use_bytes"] - tracemalloc.get_traced_memory()[0]

    tracemalloc.start(1)  # Python's own allocations are taken out of glibc's count
    try:
        for i in range(200):  # warm-up: the encoder's buffers reach their size
            encoder.encode(frames[i % 8])
        before = native()
        n = 1500
        for i in range(n):
            encoder.encode(frames[i % 8])
        per_frame = (native() - before) / n
    finally:
        tracemalloc.stop()
        encoder.close()
    assert per_frame < 12, f"the native heap grew {per_frame:.1f} bytes per frame muxed"
