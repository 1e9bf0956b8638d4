"""FROZEN REFERENCE: window mode's host engine as runtime/pipeline.py ran it before the rollout core
(skyrt._core.RolloutCore.window) took the per-step sampling over, kept as the regression oracle of
tests/test_window_core.py (and timed against the core by benchmarks/window_engine.py). Not used by
the runtime.

It holds (unchanged but for imports):
* the numpy flow-matching samplers that lived in runtime/scheduler.py: `FlowUniPCScheduler`, the
  official SkyReels-V2 `FlowUniPCMultistepScheduler` with its DF pipeline's settings (solver_order 2,
  UniP + UniC, B(h) = bh2, data (x0) prediction from a flow (velocity) output, lower_order_final,
  final sigma 0, no thresholding, corrector never disabled, and the official DF aliasing), and
  `FlowEulerScheduler`, x_next = x + (sigma_next - sigma) * v; tests/test_scheduler.py checks both
  against diffusers step by step. Per step they compute a handful of scalars in float64 from the
  float32 sigmas and an elementwise float32 update (the official code computes those scalars in
  float32; the two agree to ~1e-6 on unit-scale samples). Flow-matching notation: x_s = (1 - s) x0 +
  s noise, the model predicts v = noise - x0, so x0 = x - s v, alpha(s) = 1 - s, lambda(s) =
  log(1 - s) - log(s);
* `denoise_window`, Pipeline._denoise_window's host loop: one numpy sampler per latent frame, the
  DF timestep matrix of the window, the backend's predict_velocity (now tests/step_reference.py's)
  on the valid interval per row,
  the prefix's addnoise_condition noise drawn per row ("step") or once ("once"), end-image frames
  pinned, CFG through skyrt._core.cfg_combine;
* `host_engine(pipe)`: a context in which `pipe` runs its windows with that loop, so whole
  generate() / stream() calls (carry, V2V, end image, streams) can be compared.
"""
from __future__ import annotations

import contextlib

import numpy as np

from skyrt import _core
from skyrt.runtime import latents as lat
from skyrt.runtime.scheduler import NUM_TRAIN_TIMESTEPS, flow_sigmas, flow_timesteps

import step_reference


# ----------------------------------------------------------------------------- shared stepping
class _FlowScheduler:
    """Schedule arrays plus the official step-index rule; subclasses implement `_step`."""

    def __init__(self, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS):
        self.num_train_timesteps = num_train_timesteps
        self.timesteps: np.ndarray | None = None  # int64 [N]
        self.sigmas: np.ndarray | None = None  # float32 [N + 1], last = 0
        self.step_index: int | None = None

    @property
    def num_inference_steps(self) -> int | None:
        return None if self.timesteps is None else len(self.timesteps)

    def set_timesteps(self, num_inference_steps: int, shift: float = 1.0) -> None:
        """Lay out the official schedule and forget all history (a fresh sampler)."""
        self.timesteps = flow_timesteps(num_inference_steps, shift, self.num_train_timesteps)
        self.sigmas = flow_sigmas(num_inference_steps, shift, self.num_train_timesteps)
        self.step_index = None
        self._reset_history()

    def _reset_history(self) -> None:
        pass

    def index_for_timestep(self, timestep) -> int:
        matches = np.flatnonzero(self.timesteps == timestep)
        if matches.size == 0:
            raise ValueError(
                f"timestep {timestep!r} is not in this sampler's schedule "
                f"(first {self.timesteps[0]}, last {self.timesteps[-1]}); pass a value from .timesteps")
        # Quirk: when the timestep occurs more than once, the official rule takes the SECOND match
        # (meant to avoid skipping a sigma when starting mid-schedule). Truncation makes t_0 == t_1 for
        # long schedules (shift 8: N >= 144; shift 5: N >= 251), so such a sampler starts at index 1.
        return int(matches[1] if matches.size > 1 else matches[0])

    def step(self, model_output, timestep, sample) -> np.ndarray:
        """One step from sigma[i] to sigma[i + 1]; returns a new float32 array shaped like `sample`.

        As in the official scheduler, `timestep` is only used on the first call, to find the start
        index; afterwards the index simply advances by one per call and `timestep` is ignored.
        Inputs are never kept by reference: the caller may overwrite them after the call.
        """
        if self.timesteps is None:
            raise RuntimeError("call set_timesteps(num_inference_steps, shift) before step()")
        if self.step_index is None:
            self.step_index = self.index_for_timestep(timestep)
        if self.step_index >= len(self.timesteps):
            raise RuntimeError(
                f"step() called after the last of {len(self.timesteps)} steps (step_index {self.step_index}); "
                "call set_timesteps again. If the first timestep occurs twice in .timesteps the official "
                "scheduler starts at index 1 and has one step fewer (use fewer steps or a smaller shift).")
        v = np.asarray(model_output, dtype=np.float32)
        x = np.array(sample, dtype=np.float32)  # a private copy
        if v.shape != x.shape:
            raise ValueError(f"model_output shape {v.shape} != sample shape {x.shape}")
        out = self._step(v, x, self.step_index)
        self.step_index += 1
        return out

    def _step(self, v: np.ndarray, x: np.ndarray, i: int) -> np.ndarray:
        raise NotImplementedError


# ----------------------------------------------------------------------------- Euler
class FlowEulerScheduler(_FlowScheduler):
    """First-order flow-matching Euler on the official sigmas: x_next = x + (s_{i+1} - s_i) * v."""

    def _step(self, v, x, i):
        ds = self.sigmas[i + 1] - self.sigmas[i]  # float32, as diffusers' FlowMatchEulerDiscreteScheduler
        return x + ds * v


# ----------------------------------------------------------------------------- UniPC
def _log_snr(sigma) -> float:
    """lambda(s) = log(1 - s) - log(s) in float64; +inf at s = 0 (the final step), handled below."""
    s = np.float64(sigma)
    with np.errstate(divide="ignore"):
        return float(np.log(1.0 - s) - np.log(s))


def _phi_terms(h: float) -> tuple[float, float, float]:
    """For a step of log-SNR length h (data prediction, so hh = -h):

    h_phi_1 = expm1(-h); B(h) = expm1(-h) (the "bh2" choice); and the UniC right-hand side
    b1 = (h_phi_1 / hh - 1) / B(h),  b2 = 2 * ((h_phi_1 / hh - 1) / hh - 1/2) / B(h).
    At the final step h = +inf: h_phi_1 = B(h) = -1, b1 = 1 (b2 is never used there).
    """
    hh = -h
    h_phi_1 = float(np.expm1(hh))
    b_h = h_phi_1
    phi_2 = h_phi_1 / hh - 1.0
    phi_3 = phi_2 / hh - 0.5
    return h_phi_1, b_h, phi_2 / b_h, 2.0 * phi_3 / b_h


class FlowUniPCScheduler(_FlowScheduler):
    """The official FlowUniPCMultistepScheduler as the SkyReels-V2 DF pipeline runs it (see module doc).

    Per call at index i (sigmas s, converted outputs m = x0 predictions):
      1. m_i = x - s_i * v.
      2. UniC corrector (every call but the first): re-derive x at s_i from the previous input, m_{i-1},
         m_i (and m_{i-2} at order 2), with the order the previous predictor used.
      3. UniP predictor to s_{i+1} from the (corrected) x, m_i and (order 2) m_{i-1}.
    Orders: 1 on the first call (warm-up) and on the last step (lower_order_final: min(2, N - i)),
    2 otherwise.

    official_df_aliasing (default True) reproduces what the official DF loop (and diffusers' port of it)
    actually computes. That loop passes `latents[:, idx]`, a view into its latent buffer, as `sample`
    and then writes the result into that same view. The scheduler keeps `sample` as its "last sample"
    for the next corrector; on every call but the first that is a fresh corrected tensor, but on the
    first call it is the caller's view, which the write-back turns into x_1. So the corrector of the
    second call starts from x_1 instead of x_0 (a ~1e-2 difference in the result). With False this
    class is the scheduler proper, as used with fresh arrays (diffusers' UniPC step by step).
    """

    solver_order = 2

    def __init__(self, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS, official_df_aliasing: bool = True):
        super().__init__(num_train_timesteps)
        self.official_df_aliasing = official_df_aliasing
        self._reset_history()

    def _reset_history(self) -> None:
        self._m: list[np.ndarray] = []  # x0 predictions of the last (up to) two calls, oldest first
        self._last_sample: np.ndarray | None = None  # the predictor's input of the previous call
        self._last_order = 0  # the order the previous predictor used (the corrector reuses it)
        self._calls = 0  # calls since set_timesteps (warm-up: order <= calls + 1)

    def _step(self, v, x, i):
        s = self.sigmas
        m_i = x - s[i] * v  # flow prediction -> data prediction

        corrected = self._last_sample is not None
        if corrected:
            x = self._correct(x_prev=self._last_sample, m_i=m_i, i=i, order=self._last_order)

        n = len(self.timesteps)
        # Warm-up: order 1 on the first call. lower_order_final: min(2, N - i), i.e. the last step is
        # order 1 (quirk: the official docstring says "only for < 15 steps", the code does it always).
        order = min(self.solver_order, n - i, self._calls + 1)
        x_next = self._predict(x, m_i, i, order)

        if self.official_df_aliasing and not corrected:
            self._last_sample = x_next.copy()  # see the class doc: the caller's buffer now holds x_{i+1}
        else:
            self._last_sample = x
        self._m = (self._m + [m_i])[-self.solver_order:]
        self._last_order = order
        self._calls += 1
        return x_next

    def _predict(self, x, m_i, i, order):
        """UniP-`order` from s_i to s_{i+1} (official multistep_uni_p_bh_update, bh2, data prediction)."""
        s = self.sigmas
        sigma_t, sigma_0 = np.float64(s[i + 1]), np.float64(s[i])
        alpha_t = 1.0 - sigma_t
        h = _log_snr(sigma_t) - _log_snr(sigma_0)
        h_phi_1, b_h, _, _ = _phi_terms(h)

        # x_t = (s_t / s_0) x - alpha_t * h_phi_1 * m_i  [- alpha_t * B(h) * 0.5 * D1 at order 2]
        x_next = np.float32(sigma_t / sigma_0) * x - np.float32(alpha_t * h_phi_1) * m_i
        if order == 2:
            # Quirk: order 2 uses a fixed rho_p = 0.5 instead of solving for it.
            r1 = (_log_snr(s[i - 1]) - _log_snr(sigma_0)) / h
            d1 = (self._m[-1] - m_i) / np.float32(r1)
            x_next = x_next - np.float32(alpha_t * b_h) * (np.float32(0.5) * d1)
        return x_next

    def _correct(self, x_prev, m_i, i, order):
        """UniC-`order` from s_{i-1} to s_i (official multistep_uni_c_bh_update), using m_i = x0(x_i)."""
        s = self.sigmas
        sigma_t, sigma_0 = np.float64(s[i]), np.float64(s[i - 1])
        alpha_t = 1.0 - sigma_t
        m_0 = self._m[-1]
        h = _log_snr(sigma_t) - _log_snr(sigma_0)
        h_phi_1, b_h, b1, b2 = _phi_terms(h)

        x_c = np.float32(sigma_t / sigma_0) * x_prev - np.float32(alpha_t * h_phi_1) * m_0
        d1_t = m_i - m_0
        if order == 1:
            # Quirk: order 1 uses a fixed rho_c = 0.5 (the exact solution would be b1).
            res = np.float32(0.5) * d1_t
        else:
            # Order 2: rho solves [[1, 1], [r1, 1]] @ rho = [b1, b2], r1 = (lambda_{i-2} - lambda_{i-1}) / h.
            r1 = (_log_snr(s[i - 2]) - _log_snr(sigma_0)) / h
            rho_0 = (b1 - b2) / (1.0 - r1)
            rho_1 = b1 - rho_0
            d1 = (self._m[-2] - m_0) / np.float32(r1)
            res = np.float32(rho_0) * d1 + np.float32(rho_1) * d1_t
        return x_c - np.float32(alpha_t * b_h) * res


# ----------------------------------------------------------------------------- the window loop
def timestep_template(req) -> np.ndarray:
    """The official DF step template: the sampler's int64 timesteps for (num_inference_steps, shift)."""
    return flow_timesteps(req.num_inference_steps, req.shift)


def window_schedule(req, w, template: np.ndarray):
    """(step_matrix [S, F], update_mask [S, F], valid_interval) of one window (official semantics)."""
    step_matrix, _, update_mask, valid_interval = _core.df_timestep_matrix(
        w.num_frames, template, w.num_frames, req.ar_step, w.prefix_frames, req.causal_block_size
    )
    if w.end_frames:
        # End-frame control (official): the appended end latents stay clean and never move.
        step_matrix[:, -w.end_frames :] = 0
        update_mask[:, -w.end_frames :] = False
    return step_matrix, update_mask, valid_interval


def new_sampler(req):
    """A fresh per-frame sampler; each latent frame keeps its own multistep history."""
    sampler = FlowUniPCScheduler() if req.sampler == "unipc" else FlowEulerScheduler()
    sampler.set_timesteps(req.num_inference_steps, shift=req.shift)
    return sampler


def denoise_window(pipe, req, cond, w, prefix, noise, bar=None) -> np.ndarray:
    """Run the DF schedule over one window; returns its model-space latents [16, F, h, w]."""
    schedule = window_schedule(req, w, timestep_template(req))
    h, wd = req.latent_size
    body_frames = w.num_frames - w.end_frames
    if noise is None:
        noise = cond.rng.standard_normal((lat.LATENT_CHANNELS, body_frames, h, wd), dtype=np.float32)
    z = np.array(noise, dtype=np.float32, copy=True)
    if w.prefix_frames:
        z[:, : w.prefix_frames] = prefix[:, : w.prefix_frames]
    if w.end_frames:
        z = np.concatenate([z, cond.end_latents], axis=1)

    step_matrix, update_mask, valid_interval = schedule
    samplers = [new_sampler(req) for _ in range(w.num_frames)]
    fps_class = (0 if req.fps == 16 else 1) if pipe.model.inject_sample_info else None
    block = req.causal_block_size if req.causal_attention else None
    prefix_noise = None  # condition_noise="once": one draw for the window's prefix [16, P, h, w]
    if req.addnoise_condition > 0 and w.prefix_frames and req.condition_noise == "once":
        prefix_noise = cond.rng.standard_normal((lat.LATENT_CHANNELS, w.prefix_frames, h, wd), dtype=np.float32)
    for row, mask, (start, end) in zip(step_matrix, update_mask, valid_interval):
        x = z[:, start:end].copy()
        t = row[start:end].astype(np.float32)
        if req.addnoise_condition > 0 and start < w.prefix_frames:
            noise_now = None if prefix_noise is None else prefix_noise[:, start:]
            x, t = _noise_condition(req, cond.rng, x, t, w.prefix_frames - start, noise_now)
        v = _velocity(pipe, req, cond, x, t, fps_class, block)
        for idx in np.flatnonzero(mask[start:end]) + start:
            z[:, idx] = samplers[idx].step(v[:, idx - start], row[idx], z[:, idx])
        if bar is not None:
            bar.update(1)
    return z


def _noise_condition(req, rng, x, t, n, noise=None):
    """addnoise_condition a: the first n (prefix) frames get 0.1%·a noise and t = a; the noise is
    fresh every call (official) unless the window drew it once (condition_noise="once")."""
    if noise is None:
        noise = rng.standard_normal(x[:, :n].shape, dtype=np.float32)
    prefix = np.ascontiguousarray(x[:, :n])  # [16, n, h, w]: the core's addnoise (the kvcache mode's)
    _core.addnoise_condition(prefix, np.ascontiguousarray(noise), prefix, 0.001 * req.addnoise_condition, 0, n)
    x[:, :n] = prefix
    t[:n] = req.addnoise_condition
    return x, t


def _velocity(pipe, req, cond, x, t, fps_class, block) -> np.ndarray:
    v_cond = step_reference.predict_velocity(pipe.backend, x, t, cond.cond, fps_class, block)
    if not req.use_cfg:
        return v_cond
    v_uncond = step_reference.predict_velocity(pipe.backend, x, t, cond.uncond, fps_class, block)
    guided = np.empty(v_cond.shape, np.float32)
    _core.cfg_combine(np.ascontiguousarray(v_cond), np.ascontiguousarray(v_uncond), guided, req.guidance_scale)
    return guided


@contextlib.contextmanager
def host_engine(pipe):
    """Within it, `pipe` denoises its windows with the frozen host loop above instead of the core."""
    pipe._denoise_window = lambda req, cond, w, prefix, noise, bar=None: denoise_window(pipe, req, cond, w, prefix,
                                                                                          noise, bar)
    try:
        yield pipe
    finally:
        del pipe._denoise_window
