"""Tests of skyrt._core.DFSchedule / df_timestep_matrix (csrc/df_schedule.cpp), CPU only.

The oracle is diffusers' SkyReelsV2DiffusionForcingPipeline.generate_timestep_matrix, a line-for-line
port of the official SkyReels-V2 function; the streaming schedule must reproduce its step_matrix,
step_index, update mask and valid_interval exactly for every finite horizon.
Run: pytest tests/test_core_schedule.py
"""
from __future__ import annotations

import numpy as np
import pytest

core = pytest.importorskip("skyrt._core")
torch = pytest.importorskip("torch")
dfp = pytest.importorskip("diffusers.pipelines.skyreels_v2.pipeline_skyreels_v2_diffusion_forcing")


def official_template(num_steps: int, shift: float) -> np.ndarray:
    """Timesteps of the official FlowUniPCMultistepScheduler.set_timesteps (int64), written here from the formula."""
    sigma_max, sigma_min = float(np.float32(0.999)), 0.0  # float32 training sigmas span [0.999, 0]
    sigmas = np.linspace(sigma_max, sigma_min, num_steps + 1)[:-1]
    sigmas = shift * sigmas / (1 + (shift - 1) * sigmas)
    return (sigmas * 1000).astype(np.int64)


def oracle(num_frames, template, base_num_frames, ar_step, num_pre_ready, block):
    fn = dfp.SkyReelsV2DiffusionForcingPipeline.generate_timestep_matrix
    sm, si, um, vi = fn(None, num_frames, torch.from_numpy(template), base_num_frames, ar_step, num_pre_ready, block)
    return sm.numpy(), si.numpy(), um.numpy(), [(int(a), int(b)) for a, b in vi]


# (num_frames, base_num_frames, ar_step, num_pre_ready, causal_block_size, num_steps)
SETTINGS = [
    (10, 10, 0, 0, 1, 8),      # synchronous, one window
    (25, 25, 0, 0, 5, 30),     # synchronous, block size 5, 30 steps
    (24, 24, 0, 6, 2, 10),     # synchronous with a prefix
    (12, 12, 1, 0, 1, 8),      # async ar_step 1
    (16, 16, 2, 0, 2, 10),     # async ar_step 2, block size 2
    (20, 20, 3, 0, 1, 12),     # async ar_step 3
    (20, 20, 4, 5, 5, 9),      # async ar_step 4, block size 5, prefix
    (25, 25, 5, 0, 5, 30),     # official default: ar_step 5, block 5, 30 steps
    (30, 10, 1, 0, 1, 8),      # longer than the window (in-flight bound 10)
    (40, 20, 2, 0, 2, 16),     # window of 10 blocks, ar_step 2
    (50, 10, 4, 4, 1, 30),     # long horizon, window 10, prefix 4, 30 steps
    (60, 20, 5, 10, 5, 20),    # window 4 blocks of 5, prefix 2 blocks
    (16, 8, 9, 2, 2, 8),       # ar_step > num_steps (blocks strictly one after another)
    (97, 17, 5, 0, 1, 30),     # long horizon with window 17 (official-like latent sizes)
    (120, 40, 5, 0, 5, 30),    # 24 blocks of 5, window 8 blocks, 30 steps
    (200, 30, 3, 0, 2, 30),    # 100 blocks, window 15 blocks
    (9, 30, 2, 3, 3, 6),       # window larger than the video
    (8, 8, 0, 8, 1, 4),        # everything is prefix: no rows (the oracle cannot stack zero rows)
]


@pytest.mark.parametrize("num_frames,base,ar_step,pre,block,steps", SETTINGS)
def test_matrix_equals_diffusers(num_frames, base, ar_step, pre, block, steps):
    template = official_template(steps, shift=8.0)
    mine = core.df_timestep_matrix(num_frames, template, base, ar_step, pre, block)
    if pre >= num_frames:
        assert mine[0].shape == (0, num_frames) and mine[3] == []
        return
    ref = oracle(num_frames, template, base, ar_step, pre, block)
    assert mine[0].dtype == np.int64 and mine[2].dtype == np.bool_
    assert mine[0].shape == ref[0].shape
    np.testing.assert_array_equal(mine[0], ref[0])
    np.testing.assert_array_equal(mine[1], ref[1])
    np.testing.assert_array_equal(mine[2], ref[2])
    assert mine[3] == ref[3]


@pytest.mark.parametrize("num_frames,base,ar_step,block,steps",
                         [(30, 10, 1, 1, 30), (40, 10, 2, 5, 30), (20, 4, 1, 1, 8)])
def test_refuses_what_diffusers_refuses(num_frames, base, ar_step, block, steps):
    template = official_template(steps, shift=5.0)
    with pytest.raises(ValueError):
        oracle(num_frames, template, base, ar_step, 0, block)
    with pytest.raises(ValueError, match="ar_step must be at least"):
        core.df_timestep_matrix(num_frames, template, base, ar_step, 0, block)


def test_refuses_silent_truncation_and_unreachable_prefix():
    template = official_template(10, 5.0)
    with pytest.raises(ValueError, match="multiple of causal_block_size"):
        core.df_timestep_matrix(21, template, 21, 0, 0, 5)
    with pytest.raises(ValueError, match="multiple of causal_block_size"):
        core.df_timestep_matrix(20, template, 20, 0, 3, 5)
    with pytest.raises(ValueError, match="num_prefix_blocks"):  # official window would never reach block 6
        core.DFSchedule(template, ar_step=5, num_prefix_blocks=6, max_blocks_in_flight=4)
    with pytest.raises(ValueError, match="synchronous"):
        core.DFSchedule(template, ar_step=0, max_blocks_in_flight=8)  # endless sync cannot be bounded
    with pytest.raises(ValueError, match="max_blocks_in_flight"):
        core.DFSchedule(template, ar_step=5)  # endless without a window


def _rows(sched, limit):
    out = []
    for step in sched:
        out.append((step, [sched.index_of(b) for b in range(limit)]))
        if len(out) > 100000:
            raise AssertionError("runaway schedule")
    return out


@pytest.mark.parametrize("ar_step,block,window,prefix,steps", [(5, 5, 6, 0, 30), (1, 1, 30, 2, 30), (3, 2, 6, 1, 12),
                                                               (12, 1, 2, 0, 10)])
def test_endless_stream_is_the_limit_of_finite_horizons(ar_step, block, window, prefix, steps):
    template = official_template(steps, 8.0)
    endless = core.DFSchedule(template, ar_step=ar_step, causal_block_size=block, num_prefix_blocks=prefix,
                              max_blocks_in_flight=window)
    horizon = 3 * window + prefix + 2
    finite = core.df_timestep_matrix(horizon * block, template, window * block, ar_step, prefix * block, block)
    step_index = finite[1][:, ::block]
    finished_at = {}
    probe = horizon + 2 * window  # look past the horizon too
    prev = [steps + 1] * prefix + [0] * (probe - prefix)
    for r in range(step_index.shape[0]):
        step = endless.next()
        assert step.row == r
        now = [endless.index_of(b) for b in range(probe)]
        # rows agree on every block of the finite horizon
        assert now[:horizon] == step_index[r].tolist()
        # bounded work: never more active blocks than the window, and every update inside it
        assert step.last - step.first <= window
        changed = [b for b in range(probe) if now[b] != prev[b] and now[b] != steps + 1]
        assert all(step.first <= b < step.last for b in changed)
        assert [b - step.first for b in changed] == np.flatnonzero(step.update).tolist()
        prev = now
        np.testing.assert_array_equal(step.timestep, [endless.timestep_of_index(i) for i in step.index])
        for b in step.finished.tolist():
            assert b not in finished_at
            finished_at[b] = r
    assert not endless.done
    # each block finishes in the row where it reaches the last template index, in order
    for b in range(prefix, horizon):
        assert finished_at[b] == int(np.argmax(step_index[:, b] == steps))
    assert sorted(finished_at) == list(range(prefix, horizon))


def test_endless_stream_runs_in_bounded_memory_and_keeps_cadence():
    steps, ar_step, window = 30, 5, 6
    sched = core.DFSchedule(official_template(steps, 8.0), ar_step=ar_step, causal_block_size=5,
                            max_blocks_in_flight=window)
    finished = []
    for _ in range(20000):
        step = sched.next()
        finished.extend(step.finished.tolist())
        assert step.last - step.first <= window
    # after warm-up one block finishes every ar_step rows, for ever
    assert finished == list(range(len(finished)))
    assert abs(len(finished) - 20000 // ar_step) <= steps // ar_step + 1
    assert sched.terminal_flag > 3000


def test_step_fields_and_iteration():
    template = official_template(4, 3.0)
    sched = core.DFSchedule(template, ar_step=1, causal_block_size=2, num_prefix_blocks=1, horizon_blocks=4)
    rows = list(sched)
    assert sched.done and sched.next() is None and sched.rows == len(rows)
    first = rows[0]
    assert (first.first, first.last) == (0, 4)
    assert first.index.tolist() == [5, 1, 0, 0]  # prefix done (S+1), block 1 starts, others wait
    assert first.timestep.tolist() == [0, int(template[0]), 999, 999]
    assert first.update.tolist() == [False, True, False, False]
    assert sum(len(r.finished) for r in rows) == 3
    sched.reset()
    assert [r.index.tolist() for r in sched] == [r.index.tolist() for r in rows]
