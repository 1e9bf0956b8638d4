"""The diffusion-forcing (DF) timestep matrix, in numpy: official `generate_timestep_matrix` semantics.

A test reference, frozen: the runtime's schedule is the rollout core's (skyrt._core.df_timestep_matrix
and DFSchedule, csrc/df_schedule.cpp), which both modes call. This numpy version, what window mode
ran before, stays beside it as a readable statement of the rules, checked against diffusers.

Vocabulary (all frame counts are LATENT frames; T pixel frames <-> F = (T - 1) // 4 + 1 latents):
* the step template is the sampler's N timesteps (scheduler.flow_timesteps); it is extended to
  [999, t_0, ..., t_{N-1}, 0], so a block's index is 0 = not started, 1..N = its N denoising steps,
  N + 1 = done (prefix blocks start there);
* frames are grouped in blocks of `causal_block_size`; each row of the schedule is one model call;
  in every row the first unfinished block (or any block whose predecessor is at index >= N) moves
  one index on, every other block trails its predecessor by `ar_step` indices (0 = synchronous);
  indices are clamped to [0, N + 1]; a block is updated (its sampler steps) when its index changed
  and is not N + 1; the schedule ends after the row where every block is at index >= N;
* `valid_interval` is the window of at most `base_num_frames` frames the model sees in each row:
  a terminal flag starts at the window size and moves one block on whenever the block at the flag
  is updated; the window is [max(flag - window, 0), flag). Like the official code, the end is not
  clipped to num_frames when base_num_frames > num_frames (slicing clips it).

Settings the public implementations mishandle silently are refused with a ValueError that names the
setting and a valid alternative. Tests: python -m pytest tests/test_df_schedule.py -q
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

TEMPORAL_FACTOR = 4  # Wan2.1 VAE: latent 0 -> 1 pixel frame, each later latent -> 4 pixel frames
NOT_STARTED_TIMESTEP = 999  # the template's index-0 entry (never denoised with; a placeholder)


def latent_frames(num_frames_pixels: int) -> int:
    """Latent frames of a clip of T pixel frames: (T - 1) // 4 + 1 (exact when T = 1 + 4k)."""
    _check_int("num_frames_pixels", num_frames_pixels, minimum=1)
    return (num_frames_pixels - 1) // TEMPORAL_FACTOR + 1


def pixel_frames(num_latent_frames: int) -> int:
    """Pixel frames decoded from F latent frames: T = 1 + 4 (F - 1)."""
    _check_int("num_latent_frames", num_latent_frames, minimum=1)
    return 1 + TEMPORAL_FACTOR * (num_latent_frames - 1)


# ----------------------------------------------------------------------------- validation
def _check_int(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


def _nearest_multiples(frames: int, block: int) -> str:
    """'24 (93 pixel frames) or 28 (109 pixel frames)': the multiples of `block` around `frames`."""
    below = frames // block * block
    options = [m for m in (below, below + block) if m > 0]
    return " or ".join(f"{m} ({pixel_frames(m)} pixel frames)" for m in options)


def check_settings(num_frames: int, num_steps: int, base_num_frames: int, ar_step: int = 5,
                   num_pre_ready: int = 0, causal_block_size: int = 1) -> None:
    """Raise ValueError for settings the official code would refuse, crash on, or silently mishandle."""
    _check_int("num_frames", num_frames, minimum=1)
    _check_int("num_steps (length of step_template)", num_steps, minimum=1)
    _check_int("base_num_frames", base_num_frames, minimum=1)
    _check_int("ar_step", ar_step, minimum=0)
    _check_int("num_pre_ready", num_pre_ready, minimum=0)
    _check_int("causal_block_size", causal_block_size, minimum=1)
    block = causal_block_size
    if num_frames % block:
        raise ValueError(
            f"num_frames={num_frames} latent frames ({pixel_frames(num_frames)} pixel frames) is not a multiple "
            f"of causal_block_size={block}: the official code would leave the last {num_frames % block} latent "
            f"frame(s) as pure noise. Use num_frames={_nearest_multiples(num_frames, block)}, or causal_block_size=1.")
    if base_num_frames % block:
        raise ValueError(
            f"base_num_frames={base_num_frames} latent frames ({pixel_frames(base_num_frames)} pixel frames) is not "
            f"a multiple of causal_block_size={block}: the official code would silently shrink the window to "
            f"{base_num_frames // block * block}. Use base_num_frames={_nearest_multiples(base_num_frames, block)}.")
    if num_pre_ready % block:
        below = num_pre_ready // block * block
        raise ValueError(
            f"num_pre_ready={num_pre_ready} prefix latent frames is not a multiple of causal_block_size={block}: "
            f"the official code would treat only {below} of them as ready and denoise the rest from noise. "
            f"Use num_pre_ready={below} (truncate the prefix, as the official pipeline does) or {below + block}.")
    if num_pre_ready > num_frames:
        raise ValueError(f"num_pre_ready={num_pre_ready} exceeds num_frames={num_frames}; "
                         f"use num_pre_ready <= {num_frames}")
    blocks, window = num_frames // block, base_num_frames // block
    if blocks > window:
        # A block must be finished before the window slides past it: N steps over `window` blocks.
        min_ar_step = math.ceil(num_steps / window)
        if ar_step < min_ar_step:
            raise ValueError(
                f"ar_step={ar_step} is too small for {num_frames} latent frames in a window of "
                f"base_num_frames={base_num_frames} ({window} blocks of causal_block_size={block}) with "
                f"{num_steps} steps: min_ar_step = ceil({num_steps} / {window}) = {min_ar_step}. Use "
                f"ar_step>={min_ar_step}, a larger base_num_frames, or fewer steps.")


# ----------------------------------------------------------------------------- the matrix
def generate_timestep_matrix(
    num_frames: int,
    step_template,
    base_num_frames: int,
    ar_step: int = 5,
    num_pre_ready: int = 0,
    causal_block_size: int = 1,
    shrink_interval_with_mask: bool = False,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[tuple[int, int]]]:
    """The DF schedule for `num_frames` latent frames (see the module doc for the rules).

    Returns (step_matrix int64 [S, F] timesteps, step_index int64 [S, F] indices into the extended
    template, update_mask bool [S, F], valid_interval: S (start, end) frame ranges). S = 0 when every
    frame is prefix. `step_template` is truncated to int64 (the official `.long()`).

    shrink_interval_with_mask: the window's terminal flag starts just after the last block updated in
    the first row instead of at the window size, so early rows skip blocks that have not started. Both
    public implementations crash with this flag (they replace the mask list by its first row), so this
    is its evident intent rather than a port.
    """
    template = np.asarray(step_template).astype(np.int64).reshape(-1)
    num_steps = len(template)
    check_settings(num_frames, num_steps, base_num_frames, ar_step, num_pre_ready, causal_block_size)

    block = causal_block_size
    num_blocks, window = num_frames // block, base_num_frames // block
    done = num_steps + 1  # index of the trailing 0
    extended = np.concatenate([[NOT_STARTED_TIMESTEP], template, [0]]).astype(np.int64)

    start = np.zeros(num_blocks, dtype=np.int64)
    start[: num_pre_ready // block] = done  # prefix blocks are clean from the start
    rows = []
    prev = start
    while np.any(prev < num_steps):
        row = np.empty(num_blocks, dtype=np.int64)
        for b in range(num_blocks):
            if b == 0 or prev[b - 1] >= num_steps:
                row[b] = prev[b] + 1  # free to advance: first block, or predecessor (nearly) done
            else:
                row[b] = row[b - 1] - ar_step  # trail the predecessor by ar_step indices
        row = np.clip(row, 0, done)
        rows.append(row)
        prev = row

    index = np.stack(rows) if rows else np.zeros((0, num_blocks), dtype=np.int64)
    before = np.concatenate([start[None], index[:-1]]) if rows else index
    update = (index != before) & (index != done)

    terminal = window
    if shrink_interval_with_mask and len(update):
        terminal = int(np.flatnonzero(update[0])[-1]) + 1
    intervals = []
    for mask in update:
        if terminal < num_blocks and mask[terminal]:
            terminal += 1
        intervals.append((max(terminal - window, 0) * block, terminal * block))

    # Blocks -> frames: every frame of a block shares its block's row.
    index = np.repeat(index, block, axis=1)
    update = np.repeat(update, block, axis=1)
    return extended[index], index, update, intervals


# ----------------------------------------------------------------------------- sizes
@dataclass(frozen=True)
class ScheduleSize:
    """How long a DF schedule is, without building it (for progress bars and budgets)."""

    rows: int  # model calls (per CFG branch) = step_matrix rows
    blocks: int  # blocks denoised (prefix excluded)
    updates: int  # per-block sampler steps in total = blocks * num_steps


def schedule_size(num_frames: int, num_steps: int, base_num_frames: int, ar_step: int = 5,
                  num_pre_ready: int = 0, causal_block_size: int = 1) -> ScheduleSize:
    """Rows of generate_timestep_matrix for these settings, in closed form.

    Block k of the K blocks to denoise starts min(ar_step, N) rows after block k - 1 (a block never
    waits longer than for its predecessor to finish) and takes N rows, so S = (K - 1) * min(ar_step, N) + N.
    """
    check_settings(num_frames, num_steps, base_num_frames, ar_step, num_pre_ready, causal_block_size)
    blocks = (num_frames - num_pre_ready) // causal_block_size
    rows = (blocks - 1) * min(ar_step, num_steps) + num_steps if blocks else 0
    return ScheduleSize(rows=rows, blocks=blocks, updates=blocks * num_steps)
