"""Live captioning for `skyrt serve --caption-every N`: what a signage operator checks to see that
the screen is on brief.

Every N seconds a thread captions the stream's last N seconds: it samples the frame on screen 16
times spread over the interval (SkyCaptioner's 16 frames), runs the captioner, and keeps the newest
structured caption plus its T2V prompt rendering for /caption, /status and the page. It shares the
CPU with the generator, so on a small machine captioning costs generated frames/s while it runs.
"""
from __future__ import annotations

import logging
import threading
import time

import numpy as np

log = logging.getLogger("skyrt.server")

FRAMES_PER_CAPTION = 16


class LiveCaptioner(threading.Thread):
    """Captions `frame_source()` (the frame on screen, uint8 [H, W, 3] or None) every `every_s` s."""

    def __init__(self, captioner, every_s: float, frame_source, max_new_tokens: int = 2048):
        super().__init__(name="skyrt-captioner", daemon=True)
        if every_s <= 0:
            raise ValueError(f"--caption-every must be a positive number of seconds, got {every_s}")
        self.captioner, self.every_s, self.frame_source = captioner, float(every_s), frame_source
        self.max_new_tokens = max_new_tokens
        self.stop_event = threading.Event()
        self._lock = threading.Lock()
        self._latest: dict = {"caption": None, "structured": None, "error": None, "count": 0}

    def latest(self) -> dict:
        with self._lock:
            return dict(self._latest)

    def run(self) -> None:
        while not self.stop_event.is_set():
            frames = self._sample_interval()
            if frames is None:
                continue
            self._caption(frames)

    def _sample_interval(self) -> np.ndarray | None:
        """16 frames spread evenly over the next `every_s` seconds ([16, H, W, 3]); None if stopped."""
        frames = []
        step = self.every_s / FRAMES_PER_CAPTION
        for _ in range(FRAMES_PER_CAPTION):
            if self.stop_event.wait(step):
                return None
            frame = self.frame_source()
            if frame is not None:
                frames.append(frame)
        return np.stack(frames) if len(frames) == FRAMES_PER_CAPTION else None

    def _caption(self, frames: np.ndarray) -> None:
        from ..caption_schema import CaptionParseError, to_t2v_prompt

        started = time.monotonic()
        try:
            caption = self.captioner.caption_frames(frames, max_new_tokens=self.max_new_tokens)
            update = {"caption": to_t2v_prompt(caption), "structured": caption.to_json_dict(), "error": None}
        except CaptionParseError as err:  # keep the model's raw words: they are still worth reading
            update = {"error": f"caption did not parse: {err}", "raw": err.raw[:4000]}
        except Exception as err:  # a captioner failure never touches the stream
            log.exception("live captioning failed")
            update = {"error": f"{type(err).__name__}: {err}"[:500]}
        with self._lock:
            self._latest.update(update, seconds=round(time.monotonic() - started, 3), at=time.time(),
                                count=self._latest["count"] + 1)

    def stop(self) -> None:
        self.stop_event.set()
