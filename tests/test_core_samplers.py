"""Tests of the per-frame sampler kernels (csrc/samplers.{h,cpp}), CPU references only.

Oracles written here: numpy formulas for the flow Euler step and addnoise_condition, a float64 numpy
transcription of the official FlowUniPCMultistepScheduler.step (order 2, bh2, predict_x0,
flow_prediction), and diffusers' UniPCMultistepScheduler(use_flow_sigmas=True,
prediction_type="flow_prediction", flow_shift=1.0, solver_order=2) driven with the official shifted
sigmas through set_timesteps(sigmas=...) — one scheduler per frame, frames at different steps as in
diffusion forcing (tests/test_scheduler.py shows that diffusers configuration is the official scheduler).
Run: pytest tests/test_core_samplers.py
"""
from __future__ import annotations

import numpy as np
import pytest

core = pytest.importorskip("skyrt._core")

F32_TOL = 1e-6  # one float32 operation, relative


def official_sigmas(num_steps, shift):
    """Official FlowUniPCMultistepScheduler.set_timesteps sigmas: float32 [S + 1], last = 0."""
    sigma_max = float(np.float32(0.999))  # float32 training sigmas span [0.999, 0]
    s = np.linspace(sigma_max, 0.0, num_steps + 1)[:-1]
    s = shift * s / (1 + (shift - 1) * s)
    return np.concatenate([s, [0.0]]).astype(np.float32)


def frame_shape(frames, frame_axis, seed=0):
    rng = np.random.default_rng(seed)
    shape = [3, 7, 5, 9]  # odd sizes
    shape[frame_axis] = frames
    return tuple(shape), rng


def per_frame(values, shape, frame_axis):
    view = [1] * len(shape)
    view[frame_axis] = shape[frame_axis]
    return np.asarray(values).reshape(view)


# ---- flow Euler and addnoise -----------------------------------------------------------------------


@pytest.mark.parametrize("frame_axis", [0, 1, 3])
def test_flow_euler_per_frame(frame_axis):
    shape, rng = frame_shape(6, frame_axis, seed=frame_axis)
    x = rng.standard_normal(shape).astype(np.float32)
    v = rng.standard_normal(shape).astype(np.float32)
    sig = official_sigmas(10, 5.0)
    steps = np.array([0, 3, 9, 5, 1, 2])
    dt = (sig[steps + 1] - sig[steps]).astype(np.float32)  # float32, as the official sigmas tensor
    update = np.array([True, True, False, True, True, False])
    out = np.empty_like(x)
    core.flow_euler(x, v, out, dt, update, frame_axis=frame_axis)
    want = np.where(per_frame(update, shape, frame_axis), x + per_frame(dt, shape, frame_axis) * v, x)
    np.testing.assert_allclose(out, want, rtol=F32_TOL, atol=F32_TOL)
    core.flow_euler(x, v, x, dt, frame_axis=frame_axis)  # in place, every frame
    np.testing.assert_allclose(x, out + ~per_frame(update, shape, frame_axis) * (per_frame(dt, shape, frame_axis) * v),
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("frame_axis,begin,end,a", [(1, 0, 3, 20), (1, 2, 5, 100), (0, 1, 2, 7), (1, 0, 0, 50)])
def test_addnoise_condition(frame_axis, begin, end, a):
    shape, rng = frame_shape(5, frame_axis, seed=a)
    x = rng.standard_normal(shape).astype(np.float32)
    noise = rng.standard_normal(shape).astype(np.float32)
    out = np.empty_like(x)
    factor = 0.001 * a
    core.addnoise_condition(x, noise, out, factor, begin, end, frame_axis=frame_axis)
    frames = np.arange(shape[frame_axis])
    inside = per_frame((frames >= begin) & (frames < end), shape, frame_axis)
    # the official expression on float32 tensors: latent * (1.0 - f) + randn * f
    want = np.where(inside, x * np.float32(1.0 - factor) + noise * np.float32(factor), x)
    np.testing.assert_allclose(out, want, rtol=F32_TOL, atol=F32_TOL)


def test_shape_errors():
    x = np.zeros((2, 3, 4), np.float32)
    with pytest.raises(ValueError, match="one entry per frame"):
        core.flow_euler(x, x, x, np.zeros(2, np.float32))
    with pytest.raises(ValueError, match="frames, 12"):
        core.flow_unipc(x, x, x, x.copy(), x.copy(), x.copy(), np.zeros((2, 12), np.float32))
    with pytest.raises(ValueError, match="sigmas"):
        core.unipc_frame_coeffs(np.array([1.0, 0.5, 0.0]), np.array([0]))
    with pytest.raises(ValueError, match="steps"):
        core.unipc_frame_coeffs(np.array([0.9, 0.5, 0.0]), np.array([2]))


# ---- UniPC -----------------------------------------------------------------------------------------


class NumpyFlowUniPC:
    """float64 transcription of the official FlowUniPCMultistepScheduler.step for one frame
    (solver_order 2, bh2, predict_x0, flow_prediction, lower_order_final, no disabled corrector)."""

    def __init__(self, sigmas):
        self.s = np.asarray(sigmas, np.float64)
        self.total = len(self.s) - 1
        self.k, self.lower, self.this_order = 0, 0, 1
        self.outputs, self.last = [None, None], None

    @staticmethod
    def lam(sigma):
        with np.errstate(divide="ignore"):
            return np.log(1.0 - sigma) - np.log(sigma)

    def step(self, v, x):
        k, s = self.k, self.s
        m = x - s[k] * v
        if k > 0 and self.last is not None:
            x = self.corrector(m, x)
        self.outputs = [self.outputs[1], m]
        self.this_order = min(min(2, self.total - k), self.lower + 1)
        self.last = x
        out = self.predictor(x)
        self.lower = min(self.lower + 1, 2)
        self.k += 1
        return out

    def predictor(self, x):
        k, s, order = self.k, self.s, self.this_order
        sigma_t, sigma_s0 = s[k + 1], s[k]
        alpha_t = 1.0 - sigma_t
        h = self.lam(sigma_t) - self.lam(sigma_s0)
        m0 = self.outputs[-1]
        x_t = sigma_t / sigma_s0 * x - alpha_t * np.expm1(-h) * m0
        if order == 2:
            r = (self.lam(s[k - 1]) - self.lam(sigma_s0)) / h
            d1 = (self.outputs[-2] - m0) / r
            x_t = x_t - alpha_t * np.expm1(-h) * 0.5 * d1
        return x_t

    def corrector(self, m, x):
        k, s, order = self.k, self.s, self.this_order
        sigma_t, sigma_s0 = s[k], s[k - 1]
        alpha_t = 1.0 - sigma_t
        h = self.lam(sigma_t) - self.lam(sigma_s0)
        hh = -h
        h_phi_1 = np.expm1(hh)
        b_h = h_phi_1
        h_phi_k = h_phi_1 / hh - 1.0
        m0 = self.outputs[-1]
        corr = 0.0
        if order == 1:
            rhos = [0.5]
        else:
            b = [h_phi_k / b_h, (h_phi_k / hh - 0.5) * 2.0 / b_h]
            r = (self.lam(s[k - 2]) - self.lam(sigma_s0)) / h
            rhos = np.linalg.solve(np.array([[1.0, 1.0], [r, 1.0]]), np.array(b))
            corr = rhos[0] * (self.outputs[-2] - m0) / r
        return sigma_t / sigma_s0 * self.last - alpha_t * h_phi_1 * m0 - alpha_t * b_h * (corr + rhos[-1] * (m - m0))


def diffusers_schedulers(sigmas, frames):
    sched_mod = pytest.importorskip("diffusers")
    out = []
    for _ in range(frames):
        s = sched_mod.UniPCMultistepScheduler(use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=1.0,
                                              solver_order=2)
        s.set_timesteps(sigmas=sigmas[:-1].astype(np.float64))
        np.testing.assert_array_equal(s.sigmas.numpy(), sigmas)  # the very same float32 schedule
        out.append(s)
    return out


def model(x, frame, k):
    """A deterministic stand-in for the DiT: a flow that depends on the sample, the frame and the step."""
    return (0.8 * x - np.cos(0.3 * frame + 0.1 * k) + 0.05 * x * x).astype(np.float32)


def run_df_trajectory(num_steps, shift, frames, lag, frame_axis, check_rows):
    """Frames start `lag` rows apart (diffusion forcing); every row, all started unfinished frames step once,
    through one flow_unipc call with per-frame coefficients. check_rows(row, x_kernel, frame_slices)."""
    torch = pytest.importorskip("torch")
    sig = official_sigmas(num_steps, shift)
    shape, rng = frame_shape(frames, frame_axis, seed=num_steps)
    x = rng.standard_normal(shape).astype(np.float32)
    x_last, m1, m2 = (np.full(shape, np.nan, np.float32) for _ in range(3))  # history starts as garbage
    take = [(slice(None),) * frame_axis + (f,) for f in range(frames)]
    ref = [x[t].astype(np.float64) for t in take]
    oracle = [NumpyFlowUniPC(sig) for _ in range(frames)]
    dif = diffusers_schedulers(sig, frames)
    dif_x = [torch.from_numpy(x[t].copy()) for t in take]
    for row in range(num_steps + lag * (frames - 1)):
        steps = np.array([row - lag * f if 0 <= row - lag * f < num_steps else -1 for f in range(frames)])
        v = np.zeros(shape, np.float32)
        for f in range(frames):
            if steps[f] >= 0:
                v[take[f]] = model(x[take[f]], f, steps[f])
                ref[f] = oracle[f].step(model(ref[f], f, steps[f]).astype(np.float64), ref[f])
                vt = torch.from_numpy(model(dif_x[f].numpy(), f, steps[f]))
                dif_x[f] = dif[f].step(vt, dif[f].timesteps[steps[f]], dif_x[f], return_dict=False)[0]
        coeffs = core.unipc_frame_coeffs(sig.astype(np.float64), steps)
        core.flow_unipc(x, v, x, x_last, m1, m2, coeffs, frame_axis=frame_axis)
        check_rows(row, x, [x[t] for t in take], ref, [d.numpy() for d in dif_x])
    return x


@pytest.mark.parametrize("num_steps,shift,frames,lag,frame_axis", [(30, 8.0, 5, 5, 1), (10, 5.0, 4, 3, 0),
                                                                   (2, 3.0, 3, 1, 1), (1, 1.0, 2, 1, 2),
                                                                   (7, 1.0, 6, 0, 1)])
def test_unipc_df_trajectory_matches_official_math_and_diffusers(num_steps, shift, frames, lag, frame_axis):
    worst = {"oracle": 0.0, "diffusers": 0.0}

    def check(row, x, per_frame_x, ref, dif):
        assert np.isfinite(x).all()
        for f in range(frames):
            scale = max(1.0, float(np.abs(ref[f]).max()))
            worst["oracle"] = max(worst["oracle"], float(np.abs(per_frame_x[f] - ref[f]).max()) / scale)
            worst["diffusers"] = max(worst["diffusers"], float(np.abs(per_frame_x[f] - dif[f]).max()) / scale)

    run_df_trajectory(num_steps, shift, frames, lag, frame_axis, check)
    # float32 kernel vs float64 official math, and vs diffusers' float32 run (coefficients in float32 there);
    # measured up to 3e-7 and 2e-7 relative to the sample scale over 30-50 steps
    assert worst["oracle"] < 3e-6, worst
    assert worst["diffusers"] < 3e-6, worst


def test_unipc_frames_not_updated_are_untouched():
    sig = official_sigmas(6, 5.0).astype(np.float64)
    shape, rng = frame_shape(3, 1, seed=5)
    x = rng.standard_normal(shape).astype(np.float32)
    hist = [rng.standard_normal(shape).astype(np.float32) for _ in range(3)]
    before = [h.copy() for h in hist]
    out = np.empty_like(x)
    coeffs = core.unipc_frame_coeffs(sig, np.array([-1, 2, -1]))
    assert coeffs.shape == (3, core.UNIPC_COEFFS) and coeffs.dtype == np.float32
    assert coeffs[0].tolist() == [0.0] * 12 and coeffs[1, 0] == 1.0
    core.flow_unipc(x, x, out, *hist, coeffs)
    for f in (0, 2):
        np.testing.assert_array_equal(out[:, f], x[:, f])
        for h, b in zip(hist, before):
            np.testing.assert_array_equal(h[:, f], b[:, f])
    assert not np.array_equal(out[:, 1], x[:, 1])


def test_unipc_last_step_returns_x0_prediction():
    sig = official_sigmas(4, 3.0).astype(np.float64)
    c = core.unipc_frame_coeffs(sig, np.array([3]))[0]
    # predictor order 1 into sigma = 0: x' = x0 = xc - ... exactly m; scale 0, alpha*expm1(-inf) = -1
    assert c[8] == 1.0 and c[9] == 0.0 and c[10] == -1.0 and c[11] == 0.0


# ---- the causal family's few-step sampler --------------------------------------------------------------


def their_fewstep(x, v, noise, sigma, next_sigma):
    """Their two conversions, written from their code's formulas: x0 = xt.double() - sigma.double() *
    flow_pred.double() back to float32, then add_noise (1 - sigma') * x0 + sigma' * noise in float32."""
    x0 = (x.astype(np.float64) - np.float64(np.float32(sigma)) * v.astype(np.float64)).astype(np.float32)
    if noise is None:
        return x0
    s = np.float32(next_sigma)
    return ((np.float32(1.0) - s) * x0 + s * noise).astype(np.float32)


@pytest.mark.parametrize("sigma, next_sigma", [(0.9375, 0.75), (0.5, 0.1), (1.0, 0.3333), (0.2, 0.0)])
def test_fewstep_equals_their_formulas_bit_for_bit(sigma, next_sigma):
    rng = np.random.default_rng(3)
    x, v, noise = (rng.standard_normal((16, 3, 5, 7), dtype=np.float32) * 3 for _ in range(3))
    out = np.empty_like(x)
    core.flow_fewstep(x, v, noise, out, sigma, next_sigma)
    assert np.array_equal(out, their_fewstep(x, v, noise, sigma, next_sigma))
    core.flow_fewstep(x, v, None, out, sigma)  # the last step: x0 itself
    assert np.array_equal(out, their_fewstep(x, v, None, sigma, 0.0))
    # float32 arithmetic for x0 differs in the last bits somewhere: the float64 conversion matters
    assert not np.array_equal(out, x - np.float32(sigma) * v) or sigma in (1.0, 0.5)
    inplace = x.copy()
    core.flow_fewstep(inplace, v, noise, inplace, sigma, next_sigma)  # out may alias x
    assert np.array_equal(inplace, their_fewstep(x, v, noise, sigma, next_sigma))


def test_fewstep_refuses_bad_arguments():
    x = np.zeros((2, 3), np.float32)
    with pytest.raises(ValueError, match="as many elements"):
        core.flow_fewstep(x, np.zeros(5, np.float32), None, x, 0.5)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        core.flow_fewstep(x, x, None, x, 1.5)


def fewstep_core(steps, block=2, h=2, w=3, **kwargs):
    """A RolloutCore with the fewstep sampler: one block in flight (ar_step = steps), one context."""
    timesteps = np.linspace(999.7, 250.3, steps).astype(np.float32)
    x0_sigmas = np.linspace(0.99, 0.3, steps).astype(np.float32)
    renoise = np.linspace(0.98, 0.31, steps).astype(np.float32)
    c = core.RolloutCore([int(t) for t in timesteps], [*map(float, x0_sigmas), 0.0], sampler="fewstep",
                         step_timesteps=[float(t) for t in timesteps], renoise_sigmas=[float(s) for s in renoise],
                         commit_timestep=7.5, ar_step=steps, causal_block_size=block, max_blocks_in_flight=1,
                         horizon_blocks=2, height=h, width=w, tokens_per_frame=1, layers=1, heads=1, head_dim=8,
                         **kwargs)
    return c, timesteps, x0_sigmas, renoise


def test_rollout_core_fewstep_block_equals_their_loop():
    """The core's fewstep sampler over whole blocks, driven as runtime/kvcache.py drives it, against their
    loop written here in numpy: per step x0 = x - sigma v (float64), re-noised with fresh noise to the next
    step's sigma but after the last step; the DiT sees the float timesteps; the commit runs at t = 7.5."""
    steps, shape = 3, (16, 2, 2, 3)
    c, timesteps, x0_sigmas, renoise = fewstep_core(steps)
    rng = np.random.default_rng(0)
    assert c.sampler == "fewstep" and c.commit_timestep == 7.5
    for blk in range(2):
        noise0 = rng.standard_normal(shape, dtype=np.float32)
        x, draws = noise0.copy(), []
        for k in range(steps):
            plan = c.next_row()
            assert plan.active == [blk] and plan.started == ([blk] if k == 0 else [])
            assert plan.timesteps == [float(timesteps[k])]  # floats, not the int template
            assert plan.step_noise == ([blk] if k + 1 < steps else [])
            if k == 0:
                c.start_block(blk, noise0)
            c.pack_active()
            v = rng.standard_normal(shape, dtype=np.float32)
            c.buffer("velocity").numpy()[0] = v
            if plan.step_noise:
                assert c.steps_taken(blk) == k
                draws.append(rng.standard_normal(shape, dtype=np.float32))
                c.set_step_noise(blk, draws[-1])
            c.apply_velocity()
            x = their_fewstep(x, v, draws[-1] if k + 1 < steps else None, x0_sigmas[k],
                              renoise[k + 1] if k + 1 < steps else 0.0)
            assert plan.finished == ([blk] if k + 1 == steps else [])
        c.finish_block(blk)
        slot = c.next_slot()
        c.pack_store(slot)
        c.commit(blk, c.commit_timestep)
        assert np.array_equal(c.read_store(slot), x)
    assert c.next_row() is None


def test_rollout_core_fewstep_asks_for_its_noise():
    c, *_ = fewstep_core(2)
    c.next_row()
    c.start_block(0, np.zeros((16, 2, 2, 3), np.float32))
    c.pack_active()
    with pytest.raises(RuntimeError, match="set_step_noise"):
        c.apply_velocity()
    with pytest.raises(RuntimeError, match="takes no fresh noise"):
        c.set_step_noise(1, np.zeros((16, 2, 2, 3), np.float32))
    with pytest.raises(ValueError, match="renoise_sigmas"):
        core.RolloutCore([999, 500], [0.9, 0.5, 0.0], sampler="fewstep", height=2, width=2, tokens_per_frame=1,
                         layers=1, heads=1, head_dim=8)
    with pytest.raises(ValueError, match="step_timesteps must hold one timestep per step"):
        core.RolloutCore([999, 500], [0.9, 0.5, 0.0], step_timesteps=[1.5], height=2, width=2, tokens_per_frame=1,
                         layers=1, heads=1, head_dim=8)
    unipc = core.RolloutCore([999, 500], [0.9, 0.5, 0.0], ar_step=2, height=2, width=2, tokens_per_frame=1,
                             layers=1, heads=1, head_dim=8)
    assert unipc.next_row().step_noise == []  # UniPC takes no fresh noise
