"""--generator-stall: a generator that hangs (no frame for that long, its process alive) is restarted
while the pacer holds the last frame on screen, and /metrics counts it."""
from __future__ import annotations

import asyncio
import re
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from serving import FaultAfter, wait_until

from skyrt.runtime.server import PromptChange, ServerConfig, StreamServer
from skyrt.runtime.server.generator_process import PipelineSpec, ProcessPipeline

SAMPLING = dict(height=32, width=32, num_inference_steps=2, guidance_scale=1.0)
HANG_AFTER_CHUNKS = 2
STALL_S = 4.0  # far above a 32x32 chunk, even on a loaded 2-core machine


@dataclass(frozen=True)
class HangingOnceSpec(PipelineSpec):
    """The built-in model in the child, whose first stream (in the first child only: `marker` is made
    then) hangs for good after HANG_AFTER_CHUNKS chunks, as a hung driver call would."""

    marker: str = ""

    def load(self):
        pipe = super().load()
        if Path(self.marker).exists():
            return pipe
        Path(self.marker).touch()
        return _HangingPipeline(pipe)


class _HangingPipeline:
    def __init__(self, pipe):
        self.pipe, self.layers = pipe, pipe.layers

    def stream(self, **kwargs):
        return FaultAfter(self.pipe.stream(**kwargs), HANG_AFTER_CHUNKS, _hang)


def _hang():
    while True:  # hung: alive, silent
        time.sleep(3600)


def test_a_hung_generator_is_restarted_while_the_last_frame_is_held(tmp_path):
    pipe = ProcessPipeline(HangingOnceSpec(None, threads=1, marker=str(tmp_path / "hung-once")))
    pipe.start()
    first_pid = pipe.pid
    server = StreamServer(pipe, SAMPLING, ServerConfig(fps=24, formats=("mjpeg",), generator_stall_s=STALL_S),
                          prompt=PromptChange("a red circle"))
    loop = asyncio.new_event_loop()
    try:
        server.start(loop)
        wait_until(lambda: server.metrics.frames_generated > 0, 60)
        wait_until(lambda: server.metrics.generator_stalls == 1, 60)
        snap, text = server.metrics.snapshot(), server.metrics.prometheus()
        # exactly the chunks before the hang were generated, and the last frame was held since: the
        # stall's seconds at 24 fps less the frames still buffered when the hang began (a chunk's worth)
        assert re.search(rf"^skyrt_chunk_latency_seconds_count {HANG_AFTER_CHUNKS}$", text, re.M), text
        assert snap["frames_repeated"] >= (STALL_S - 1) * 24
        generated_before_hang = snap["frames_generated"]
        wait_until(lambda: server.metrics.frames_generated > generated_before_hang, 300)  # a new child streams
        assert pipe.starts == 2 and pipe.pid not in (first_pid, None)
        assert server.metrics.generator_stalls == 1  # the healthy child is left alone
        text = server.metrics.prometheus()
        assert re.search(r"^skyrt_generator_stalls_total 1$", text, re.M), text
        assert server.health()["ok"]
    finally:
        server.stop()
        pipe.stop()
        loop.close()


def test_stall_off_by_default_and_bad_values_refused():
    assert ServerConfig().generator_stall_s == 0.0
    with pytest.raises(ValueError, match="--generator-stall must be seconds >= 0"):
        ServerConfig(generator_stall_s=-1.0)
