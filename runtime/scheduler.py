"""Flow-matching samplers for the diffusion-forcing rollout, in numpy (no torch on the serving path).

The DF loop keeps one sampler per latent frame; each walks its own copy of the same schedule and is
stepped only in the rows where the DF schedule (the rollout core's, skyrt._core) updates that frame.

* `FlowUniPCScheduler`: the official SkyReels-V2 `FlowUniPCMultistepScheduler` with the settings its
  DF pipeline uses (solver_order 2, UniP + UniC, B(h) = bh2, data (x0) prediction from a flow
  (velocity) output, lower_order_final, final sigma 0, no thresholding, corrector never disabled).
* `FlowEulerScheduler`: x_next = x + (sigma_next - sigma) * v on the same schedule.

This is the CPU reference for the fused per-frame C++/CUDA sampler: per step it is a handful of
scalars (computed here in float64 from the float32 sigmas) and an elementwise float32 update.
The official code computes those scalars in float32; the two agree to ~1e-6 on unit-scale samples.

Flow-matching notation: x_s = (1 - s) * x0 + s * noise, the model predicts v = noise - x0, so
x0 = x - s * v, alpha(s) = 1 - s and the log-SNR is lambda(s) = log(1 - s) - log(s).

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
