"""benchmarks/soak.py's summary: the flat verdict on synthetic two-hour sample lists, flat and leaking."""
from __future__ import annotations

import json
import random

import numpy as np
import pytest

from benchmark_scripts import load_benchmark

soak = load_benchmark("soak")
MIB = 1 << 20


def synthetic(rss_per_hour: float = 0.0, fds_every_s: float | None = None, hours: float = 2.0,
              step_s: float = 30.0, seed: int = 0) -> list[dict]:
    """Samples of a made-up run: RSS 600 MiB with ±4 MiB noise plus `rss_per_hour`; 29 fds with ±3
    viewers' worth of noise, plus one more every `fds_every_s`; steady threads and HLS counts."""
    rng = random.Random(seed)
    samples = []
    for i in range(int(hours * 3600 / step_s) + 1):
        t = i * step_s
        fds = 29 + rng.randint(-3, 3) + (int(t // fds_every_s) if fds_every_s else 0)
        samples.append({"t_s": t, "rss_total_bytes": 600 * MIB + rng.uniform(-4, 4) * MIB + rss_per_hour * t / 3600,
                        "fds_total": fds, "threads_total": 13 + rng.randint(0, 2), "hls_files_on_disk": 10,
                        "hls_playlist_segments": 6, "llhls_playlist_parts": 15 + rng.randint(-2, 2),
                        "processes": [{"rss_bytes": 80 * MIB, "fds": 15, "threads": 9}]})
    return samples


def test_flat_run_is_flat():
    summary = soak.summarize(synthetic())
    assert summary["flat"] is True, summary
    assert set(summary["series"]) == set(soak.THRESHOLDS)
    assert not summary["windows_overlap"]


def test_rss_leak_is_not_flat():
    # 100 MiB an hour: 200 MiB over the run, well past the 10 % (60 MiB) tolerance.
    summary = soak.summarize(synthetic(rss_per_hour=100 * MIB))
    assert summary["flat"] is False
    rss = summary["series"]["rss_total_bytes"]
    assert rss["flat"] is False
    assert rss["slope_per_hour"] == pytest.approx(100 * MIB, rel=0.1)
    assert rss["growth"] == pytest.approx(100 * MIB * (2 - 10 / 60), rel=0.15)  # window centres 5 min / 1h55
    assert summary["series"]["fds_total"]["flat"] is True  # the other series stay flat


def test_fd_leak_of_one_every_five_minutes_is_not_flat():
    summary = soak.summarize(synthetic(fds_every_s=300))  # 12 fds an hour, ~22 over the run
    assert summary["series"]["fds_total"]["flat"] is False
    assert summary["series"]["rss_total_bytes"]["flat"] is True
    assert summary["flat"] is False


def test_slope_matches_numpy_polyfit():
    rng = random.Random(1)
    points = [(t * 30.0, 5.0 + 0.01 * t + rng.uniform(-1, 1)) for t in range(200)]
    expected = np.polyfit([t for t, _ in points], [v for _, v in points], 1)[0] * 3600
    assert soak.slope_per_hour(points) == pytest.approx(expected, rel=1e-9)


def test_plot_only_writes_summary_and_png(tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "soak.json"
    out.write_text(json.dumps({"machine": "test", "samples": synthetic(rss_per_hour=100 * MIB, hours=0.25)}))
    soak.finish(json.loads(out.read_text()), out)
    written = json.loads(out.read_text())
    # 15 minutes: the first and last 10 minutes overlap, so no verdict, but the leak shows in the slope.
    assert written["summary"]["windows_overlap"] is True
    assert written["summary"]["flat"] is None
    assert written["summary"]["series"]["rss_total_bytes"]["slope_per_hour"] > 50 * MIB
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
