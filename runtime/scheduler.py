"""The flow-matching schedule of the diffusion-forcing rollout, in numpy: the official sigmas and timesteps.

The rollout core (skyrt._core.RolloutCore, csrc/samplers.*) steps every latent frame with these: the
int64 timesteps are the DF step template, the float32 sigmas (with a final 0) the samplers' schedule,
as the official `FlowUniPCMultistepScheduler.set_timesteps` lays them out. (The numpy samplers that
stepped frames on the host before the core did live on as the frozen oracle
tests/window_numpy_reference.py.)

Tests: python -m pytest tests/test_scheduler.py -q   (oracle: diffusers' UniPC / FlowMatchEuler)
"""
from __future__ import annotations

import numpy as np

NUM_TRAIN_TIMESTEPS = 1000


# ----------------------------------------------------------------------------- the schedule
def _check_schedule_args(num_inference_steps, shift, num_train_timesteps) -> None:
    if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, (int, np.integer)):
        raise ValueError(f"num_inference_steps must be an integer >= 1, got {num_inference_steps!r} (try 30)")
    if num_inference_steps < 1:
        raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps} (try 30)")
    if not np.isfinite(shift) or shift <= 0:
        raise ValueError(f"shift must be a finite number > 0, got {shift!r} (T2V uses 8, I2V 5)")
    if isinstance(num_train_timesteps, bool) or not isinstance(num_train_timesteps, (int, np.integer)) \
            or num_train_timesteps < 2:
        raise ValueError(f"num_train_timesteps must be an integer >= 2, got {num_train_timesteps!r} (use 1000)")


def shifted_sigmas(num_inference_steps: int, shift: float, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> np.ndarray:
    """float64 [N]: the official shifted sigmas before the float32 cast (timesteps come from these)."""
    _check_schedule_args(num_inference_steps, shift, num_train_timesteps)
    # Quirk: the official scheduler builds its training sigmas as 1 - linspace(1, 1/T, T), reversed,
    # stored in float32 (its own constructor shift is 1, an exact no-op). set_timesteps then spaces the
    # inference sigmas linearly between their ends: float32(1 - 1/T) = 0.999 at the top (not 1) and
    # exactly 0 at the bottom (not 1/T), dropping the final 0. diffusers' UniPC with use_flow_sigmas
    # spaces linspace(1, 1/T) instead, which moves most timesteps by 0..5 (hence sigmas= in the tests).
    sigma_max = float(np.float32(1.0 - 1.0 / num_train_timesteps))
    sigmas = np.linspace(sigma_max, 0.0, num_inference_steps + 1)[:-1]
    # The time shift, in float64 as the official code does it: s' = shift * s / (1 + (shift - 1) * s).
    return shift * sigmas / (1.0 + (shift - 1.0) * sigmas)


def flow_sigmas(num_inference_steps: int, shift: float, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> np.ndarray:
    """float32 [N + 1]: the N shifted sigmas of the official scheduler followed by a final 0."""
    sigmas = shifted_sigmas(num_inference_steps, shift, num_train_timesteps)
    return np.append(sigmas, 0.0).astype(np.float32)


def flow_timesteps(num_inference_steps: int, shift: float, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> np.ndarray:
    """int64 [N]: the official timesteps, float64 sigma * T truncated toward zero (torch `.to(int64)`).

    These are what the model sees as t and what the DF step template is made of (`.long()` there).
    """
    sigmas = shifted_sigmas(num_inference_steps, shift, num_train_timesteps)
    return (sigmas * num_train_timesteps).astype(np.int64)
