"""skyrt.runtime.scheduler's schedule and the numpy samplers (tests/window_numpy_reference.py, the host
engine's, now the frozen oracle of the core's) against diffusers' schedulers, step by step. CPU only, ~2 s.

Oracle: diffusers' UniPCMultistepScheduler configured for flow matching (UNIPC_AS_OFFICIAL) and
given the official shifted sigmas through set_timesteps(sigmas=...) is the official
FlowUniPCMultistepScheduler (the tests below show it); FlowMatchEulerDiscreteScheduler given the same sigmas is
flow Euler. The official sigmas are written out here from the official set_timesteps, independently
of skyrt. If the official SkyReels-V2 source is on disk (SKYRT_OFFICIAL_DIR, an unpacked skyreels_v2_infer
folder), its scheduler is checked directly as well.
Run: python -m pytest tests/test_scheduler.py -q
"""
from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler

from checkpoints import OFFICIAL_DIR

from skyrt.runtime.scheduler import flow_sigmas, flow_timesteps, shifted_sigmas
from window_numpy_reference import FlowEulerScheduler, FlowUniPCScheduler

TOL = 1e-5  # max abs difference per step, unit-scale float32 samples

# diffusers UniPC settings under which it runs the official algorithm (with the official sigmas).
UNIPC_AS_OFFICIAL = dict(
    num_train_timesteps=1000,
    prediction_type="flow_prediction",  # the model predicts the flow v; x0 = x - sigma * v
    use_flow_sigmas=True,  # alpha = 1 - sigma, and set_timesteps accepts sigmas=
    flow_shift=1.0,  # the sigmas passed in are already shifted: apply no second shift
    solver_order=2,
    solver_type="bh2",
    predict_x0=True,
    lower_order_final=True,
    final_sigmas_type="zero",
    disable_corrector=[],
    thresholding=False,
    use_dynamic_shifting=False,
)


def official_sigmas(n: int, shift: float) -> np.ndarray:
    """float64 [n]: the official set_timesteps, transcribed (its float32 1000-entry table spans [0.999, 0])."""
    table = torch.from_numpy(1.0 - np.linspace(1, 1 / 1000, 1000)[::-1].copy()).to(torch.float32)
    sigma_max, sigma_min = table[0].item(), table[-1].item()
    sigmas = np.linspace(sigma_max, sigma_min, n + 1)[:-1]
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def diffusers_unipc(n: int, shift: float) -> UniPCMultistepScheduler:
    sched = UniPCMultistepScheduler(**UNIPC_AS_OFFICIAL)
    sched.set_timesteps(sigmas=official_sigmas(n, shift))  # float64, exactly as the official computes them
    return sched


def ours_unipc(n: int, shift: float, official_df_aliasing: bool) -> FlowUniPCScheduler:
    sched = FlowUniPCScheduler(official_df_aliasing=official_df_aliasing)
    sched.set_timesteps(n, shift=shift)
    return sched


# ----------------------------------------------------------------------------- the schedule
@pytest.mark.parametrize("n, shift", [(30, 8.0), (30, 5.0), (10, 8.0), (10, 5.0), (4, 3.0), (1, 8.0), (37, 1.0), (200, 8.0)])
def test_schedule_equals_the_official_formula_and_diffusers_given_it(n, shift):
    expected = official_sigmas(n, shift)
    assert shifted_sigmas(n, shift).dtype == np.float64 and np.array_equal(shifted_sigmas(n, shift), expected)
    sigmas, timesteps = flow_sigmas(n, shift), flow_timesteps(n, shift)
    assert sigmas.dtype == np.float32 and sigmas.shape == (n + 1,) and sigmas[-1] == 0
    assert timesteps.dtype == np.int64 and timesteps.shape == (n,)
    assert np.array_equal(sigmas, np.append(expected, 0.0).astype(np.float32))
    assert np.array_equal(timesteps, torch.from_numpy(expected * 1000).to(torch.int64).numpy())  # truncation
    theirs = diffusers_unipc(n, shift)
    assert np.array_equal(theirs.timesteps.numpy(), timesteps)
    assert np.array_equal(theirs.sigmas.numpy(), sigmas)
    ours = FlowUniPCScheduler()
    ours.set_timesteps(n, shift=shift)
    assert np.array_equal(ours.timesteps, timesteps) and np.array_equal(ours.sigmas, sigmas)
    assert ours.num_inference_steps == n


@pytest.mark.parametrize("n, shift", [(30, 8.0), (10, 5.0)])
def test_diffusers_own_flow_spacing_is_not_the_official_one(n, shift):
    # Why the oracle needs sigmas=: diffusers spaces linspace(1, 1/1000) where the official spaces
    # linspace(0.999, 0). The first timestep agrees, later ones move by up to 5.
    theirs = UniPCMultistepScheduler(**{**UNIPC_AS_OFFICIAL, "flow_shift": shift})
    theirs.set_timesteps(n)
    diff = flow_timesteps(n, shift) - theirs.timesteps.numpy()
    assert diff[0] == 0 and np.any(diff != 0) and np.abs(diff).max() <= 5


def test_bad_schedule_settings_are_refused():
    with pytest.raises(ValueError, match="num_inference_steps"):
        flow_sigmas(0, 8.0)
    with pytest.raises(ValueError, match="num_inference_steps"):
        flow_timesteps(2.5, 8.0)
    with pytest.raises(ValueError, match="shift"):
        flow_sigmas(30, 0.0)
    with pytest.raises(ValueError, match="shift"):
        FlowUniPCScheduler().set_timesteps(30, shift=float("nan"))


# ----------------------------------------------------------------------------- UniPC step by step
def drive(ours, theirs, n_calls, shape=(16, 3, 5), seed=0, first=0, df_loop=False):
    """Step both from timesteps[first] with the same random outputs; returns max |diff| per step.

    df_loop=True drives both the way the DF loop does: `sample` is a view of a latent buffer that is
    then overwritten with the result (official `latents[0][:, idx] = sched.step(..., latents[0][:, idx])`).
    """
    rng = np.random.default_rng(seed)
    buf_ours = rng.standard_normal((shape[0], 2, *shape[1:]), dtype=np.float32)
    buf_theirs = torch.from_numpy(buf_ours.copy())
    diffs = []
    for k in range(n_calls):
        v = rng.standard_normal(shape, dtype=np.float32)
        t = ours.timesteps[first]  # only the first call's timestep matters
        if df_loop:
            buf_ours[:, 1] = ours.step(v, t, buf_ours[:, 1])
            buf_theirs[:, 1] = theirs.step(torch.from_numpy(v), theirs.timesteps[first], buf_theirs[:, 1],
                                           return_dict=False)[0]
        else:
            buf_ours[:, 1] = ours.step(v, t, buf_ours[:, 1].copy())
            buf_theirs[:, 1] = theirs.step(torch.from_numpy(v), theirs.timesteps[first],
                                           buf_theirs[:, 1].clone(), return_dict=False)[0]
        assert ours.step_index == theirs.step_index
        diffs.append(float(np.abs(buf_ours[:, 1] - buf_theirs[:, 1].numpy()).max()))
    return diffs, buf_ours[:, 1].copy()


@pytest.mark.parametrize("n, shift", [(30, 8.0), (30, 5.0), (10, 8.0), (10, 5.0), (3, 8.0), (2, 5.0), (1, 8.0)])
def test_unipc_equals_diffusers_step_by_step(n, shift):
    diffs, _ = drive(ours_unipc(n, shift, official_df_aliasing=False), diffusers_unipc(n, shift), n)
    assert max(diffs) <= TOL, diffs


@pytest.mark.parametrize("n, shift", [(30, 8.0), (30, 5.0), (10, 8.0), (10, 5.0), (2, 8.0)])
def test_unipc_equals_diffusers_driven_like_the_df_loop(n, shift):
    # Default (official_df_aliasing=True) = what the official / diffusers DF loops compute.
    diffs, _ = drive(ours_unipc(n, shift, official_df_aliasing=True), diffusers_unipc(n, shift), n, df_loop=True)
    assert max(diffs) <= TOL, diffs


def test_df_loop_aliasing_changes_the_result_and_is_not_accidental():
    n, shift = 30, 8.0
    _, aliased = drive(ours_unipc(n, shift, True), diffusers_unipc(n, shift), n, df_loop=True)
    _, clean = drive(ours_unipc(n, shift, False), diffusers_unipc(n, shift), n)
    assert np.abs(aliased - clean).max() > 1e-3  # the quirk matters (~1e-2)
    # Our sampler keeps no reference to the caller's arrays: with the flag off, passing views that are
    # overwritten afterwards gives exactly what passing copies gives.
    _, views = drive(ours_unipc(n, shift, False), diffusers_unipc(n, shift), n, df_loop=True)
    assert np.array_equal(views, clean)
    assert FlowUniPCScheduler().official_df_aliasing is True


def test_unipc_starts_at_the_first_timestep_it_sees():
    n, shift, first = 12, 8.0, 4
    ours, theirs = ours_unipc(n, shift, False), diffusers_unipc(n, shift)
    diffs, _ = drive(ours, theirs, n - first, first=first)
    assert max(diffs) <= TOL and ours.step_index == n


def test_duplicated_first_timestep_starts_at_index_1_like_the_official():
    # shift 8 with >= 144 steps truncates t_0 and t_1 both to 999: the official rule takes the second
    # match, so the sampler starts at index 1 and has only n - 1 steps left.
    n, shift = 150, 8.0
    ours, theirs = ours_unipc(n, shift, False), diffusers_unipc(n, shift)
    assert ours.timesteps[0] == ours.timesteps[1] == 999
    diffs, _ = drive(ours, theirs, n - 1, shape=(4, 3))
    assert max(diffs) <= TOL
    with pytest.raises(RuntimeError, match="after the last"):
        ours.step(np.zeros((4, 3), np.float32), 999, np.zeros((4, 3), np.float32))


def test_step_misuse_is_refused():
    x = np.ones((2, 3), np.float32)
    with pytest.raises(RuntimeError, match="set_timesteps"):
        FlowUniPCScheduler().step(x, 999, x)
    sched = ours_unipc(6, 8.0, True)
    with pytest.raises(ValueError, match="not in this sampler's schedule"):
        sched.step(x, 12345, x)
    with pytest.raises(ValueError, match="shape"):
        sched.step(np.ones((3, 2), np.float32), sched.timesteps[0], x)


def test_unipc_output_is_float32_any_shape_and_inputs_untouched():
    sched = ours_unipc(4, 5.0, True)
    x = np.random.default_rng(1).standard_normal((2, 3, 4, 5))  # float64 in
    v = np.ones_like(x)
    x_before = x.copy()
    out = sched.step(v, sched.timesteps[0], x)
    assert out.dtype == np.float32 and out.shape == x.shape and np.array_equal(x, x_before)
    # set_timesteps forgets the history: the same first step again gives the same result.
    sched.set_timesteps(4, shift=5.0)
    assert np.array_equal(sched.step(v, sched.timesteps[0], x), out)


# ----------------------------------------------------------------------------- Euler
@pytest.mark.parametrize("n, shift", [(30, 8.0), (10, 5.0), (1, 8.0)])
def test_euler_equals_diffusers_flow_match_euler(n, shift):
    ours = FlowEulerScheduler()
    ours.set_timesteps(n, shift=shift)
    theirs = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)
    theirs.set_timesteps(sigmas=flow_sigmas(n, shift)[:-1].tolist())
    assert np.array_equal(theirs.sigmas.numpy(), ours.sigmas)
    rng = np.random.default_rng(n)
    x = rng.standard_normal((16, 3, 5), dtype=np.float32)
    x_theirs = torch.from_numpy(x.copy())
    x_formula = x.astype(np.float64)
    s = official_sigmas(n, shift)
    s = np.append(s, 0.0).astype(np.float32).astype(np.float64)
    for i in range(n):
        v = rng.standard_normal(x.shape, dtype=np.float32)
        x = ours.step(v, ours.timesteps[0], x)
        x_theirs = theirs.step(torch.from_numpy(v), theirs.timesteps[i], x_theirs, return_dict=False)[0]
        x_formula = x_formula + (s[i + 1] - s[i]) * v  # independent: float64 Euler on the flow ODE
        assert np.abs(x - x_theirs.numpy()).max() <= 1e-6, f"step {i}"
        assert np.abs(x - x_formula).max() <= 1e-5, f"step {i}"
    assert ours.step_index == n


# ----------------------------------------------------------------------------- the official source
def _official_module():
    path = OFFICIAL_DIR / "scheduler" / "fm_solvers_unipc.py"
    if not path.is_file():
        pytest.skip(f"official SkyReels-V2 source not found at {OFFICIAL_DIR} (set SKYRT_OFFICIAL_DIR)")
    spec = importlib.util.spec_from_file_location("skyreels_official_fm_solvers_unipc", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("df_loop", [False, True])
@pytest.mark.parametrize("n, shift", [(30, 8.0), (10, 5.0)])
def test_unipc_equals_the_official_scheduler(n, shift, df_loop):
    official = _official_module().FlowUniPCMultistepScheduler(num_train_timesteps=1000, shift=1,
                                                               use_dynamic_shifting=False)
    official.set_timesteps(n, shift=shift)  # as the official DF pipeline builds each frame's sampler
    ours = ours_unipc(n, shift, official_df_aliasing=df_loop)
    assert np.array_equal(official.timesteps.numpy(), ours.timesteps)
    assert np.array_equal(official.sigmas.numpy(), ours.sigmas)
    diffs, _ = drive(ours, official, n, df_loop=df_loop)
    assert max(diffs) <= TOL, diffs
