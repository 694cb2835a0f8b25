"""Noise schedule and DPM-Solver++ (data prediction) samplers.

The schedule and the release's singlestep 'fast' order-3 path reproduce the reference sampler
(``NoiseScheduleVP('discrete')`` + ``DPM_Solver(predict_x0=True).sample(steps=50, eps=1e-3, T=1)``,
DESIGN §4) operation for operation in float32, so the continuous times of every network evaluation
match to ~1e-7. The multistep DPM-Solver++(2M) solves the same ODE with one evaluation per step and is
the faster path for 10–25 evaluations.

Solvers are generic: ``model_fn(x, t) -> eps`` gets the state ``x`` and a float32 vector ``t`` (B,) of
continuous times in (0, 1] and returns the predicted noise; conditioning lives in ``generate.py``.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

NoiseFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

NUM_TIMESTEPS = 1000
BETA_START = 0.00085
BETA_END = 0.012
#: The release sampler: 50 evaluations from T=1 to eps=1e-3 on a uniform time grid.
RELEASE_STEPS = 50
T_START = 1.0
T_END = 1e-3


def stable_diffusion_betas(
    n: int = NUM_TIMESTEPS, beta_start: float = BETA_START, beta_end: float = BETA_END
) -> np.ndarray:
    """SD "scaled linear" betas: ``linspace(sqrt(beta_start), sqrt(beta_end), n)**2`` in float64."""
    return np.linspace(beta_start**0.5, beta_end**0.5, n, dtype=np.float64) ** 2


def _interp(x: torch.Tensor, xp: torch.Tensor, yp: torch.Tensor) -> torch.Tensor:
    """Piecewise-linear interpolation on increasing knots ``xp``, extrapolating the end segments linearly
    (the reference's ``interpolate_fn``, same arithmetic)."""
    j = (torch.searchsorted(xp, x.contiguous()) - 1).clamp(0, xp.numel() - 2)
    x0, x1, y0, y1 = xp[j], xp[j + 1], yp[j], yp[j + 1]
    return y0 + (x - x0) * (y1 - y0) / (x1 - x0)


class NoiseSchedule:
    """Discrete VP schedule seen in continuous time: log α(t) interpolates ``0.5·cumsum(log(1-β))``
    (float32) piecewise-linearly at knots t_k = k/N, k = 1..N. All methods take and return float32
    tensors of any shape."""

    def __init__(self, betas: np.ndarray | torch.Tensor | None = None) -> None:
        betas = stable_diffusion_betas() if betas is None else betas
        betas = torch.as_tensor(np.asarray(betas, dtype=np.float64)).float()  # the reference casts first
        self.num_timesteps = betas.numel()
        self.log_alpha_knots = 0.5 * torch.log(1 - betas).cumsum(dim=0)
        self.t_knots = torch.linspace(1.0 / self.num_timesteps, 1.0, self.num_timesteps)
        # reversed knots: log α decreases with t, so the inverse map interpolates on the flipped arrays
        self._log_alpha_increasing = self.log_alpha_knots.flip(0)
        self._t_for_log_alpha = self.t_knots.flip(0)

    def log_alpha(self, t: torch.Tensor) -> torch.Tensor:
        return _interp(t, self.t_knots, self.log_alpha_knots)

    def alpha(self, t: torch.Tensor) -> torch.Tensor:
        return torch.exp(self.log_alpha(t))

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        return torch.sqrt(1.0 - torch.exp(2.0 * self.log_alpha(t)))

    def lambda_(self, t: torch.Tensor) -> torch.Tensor:
        """Half log-SNR λ(t) = log α − log σ."""
        log_alpha = self.log_alpha(t)
        return log_alpha - 0.5 * torch.log(1.0 - torch.exp(2.0 * log_alpha))

    def inverse_lambda(self, lam: torch.Tensor) -> torch.Tensor:
        log_alpha = -0.5 * torch.logaddexp(torch.zeros_like(lam), -2.0 * lam)
        return _interp(log_alpha, self._log_alpha_increasing, self._t_for_log_alpha)


def time_uniform_grid(steps: int, t_start: float = T_START, t_end: float = T_END) -> torch.Tensor:
    """``steps + 1`` uniformly spaced times from ``t_start`` down to ``t_end`` (float32)."""
    return torch.linspace(t_start, t_end, steps + 1)


def logsnr_uniform_grid(
    schedule: NoiseSchedule, steps: int, t_start: float = T_START, t_end: float = T_END
) -> torch.Tensor:
    """``steps + 1`` times uniformly spaced in λ (log-SNR) from ``t_start`` to ``t_end``."""
    lam_start = schedule.lambda_(torch.tensor([t_start]))
    lam_end = schedule.lambda_(torch.tensor([t_end]))
    return schedule.inverse_lambda(torch.linspace(lam_start.item(), lam_end.item(), steps + 1))


def release_orders(steps: int) -> list[int]:
    """The reference 'fast' method's macro-step orders for ``steps`` evaluations (order 3 cap)."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    k = steps // 3 + 1
    if steps % 3 == 0:
        return [3] * (k - 2) + [2, 1]
    if steps % 3 == 1:
        return [3] * (k - 1) + [1]
    return [3] * (k - 1) + [2]


class _DataPrediction:
    """Wraps a noise-prediction ``model_fn`` into x0-prediction; counts evaluations."""

    def __init__(self, model_fn: NoiseFn, schedule: NoiseSchedule) -> None:
        self.model_fn = model_fn
        self.schedule = schedule
        self.nfe = 0

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """``t``: a one-element float32 CPU tensor (the same time for the whole batch)."""
        # a fill on the device, not a host->device copy (which could wait for queued GPU work)
        t_vec = torch.full((x.shape[0],), t.item(), dtype=torch.float32, device=x.device)
        eps = self.model_fn(x, t_vec).to(x.dtype)
        self.nfe += 1
        alpha, sigma = self.schedule.alpha(t).item(), self.schedule.sigma(t).item()
        return (x - sigma * eps) / alpha


def _singlestep_update(
    x0_fn: _DataPrediction,
    x: torch.Tensor,
    s: torch.Tensor,
    t: torch.Tensor,
    order: int,
    r1: torch.Tensor | None,
    r2: torch.Tensor | None,
) -> torch.Tensor:
    """One singlestep DPM-Solver++ step of ``order`` (1..3) from time ``s`` to ``t`` (the reference's
    ``dpm_solver_{first,second,third}_update`` with ``predict_x0=True, solver_type='dpm_solver'``).
    Coefficients are computed on one-element float32 tensors in the reference's operation order and
    applied as Python scalars (a float32 value round-trips exactly; no device sync per coefficient)."""
    ns = x0_fn.schedule
    lam_s, lam_t = ns.lambda_(s), ns.lambda_(t)
    h = lam_t - lam_s
    sigma_s, sigma_t, alpha_t = ns.sigma(s), ns.sigma(t), ns.alpha(t)
    phi_1 = torch.expm1(-h)
    model_s = x0_fn(x, s)
    if order == 1:
        return (sigma_t / sigma_s).item() * x - (alpha_t * phi_1).item() * model_s
    s1 = ns.inverse_lambda(lam_s + r1 * h)
    sigma_s1, alpha_s1 = ns.sigma(s1), ns.alpha(s1)
    phi_11 = torch.expm1(-r1 * h)
    x_s1 = (sigma_s1 / sigma_s).item() * x - (alpha_s1 * phi_11).item() * model_s
    model_s1 = x0_fn(x_s1, s1)
    if order == 2:
        return (
            (sigma_t / sigma_s).item() * x
            - (alpha_t * phi_1).item() * model_s
            - ((0.5 / r1) * (alpha_t * phi_1)).item() * (model_s1 - model_s)
        )
    s2 = ns.inverse_lambda(lam_s + r2 * h)
    sigma_s2, alpha_s2 = ns.sigma(s2), ns.alpha(s2)
    phi_12 = torch.expm1(-r2 * h)
    phi_22 = torch.expm1(-r2 * h) / (r2 * h) + 1.0
    phi_2 = phi_1 / h + 1.0
    x_s2 = (
        (sigma_s2 / sigma_s).item() * x
        - (alpha_s2 * phi_12).item() * model_s
        + (r2 / r1 * (alpha_s2 * phi_22)).item() * (model_s1 - model_s)
    )
    model_s2 = x0_fn(x_s2, s2)
    return (
        (sigma_t / sigma_s).item() * x
        - (alpha_t * phi_1).item() * model_s
        + ((1.0 / r2) * (alpha_t * phi_2)).item() * (model_s2 - model_s)
    )


def sample_release(
    model_fn: NoiseFn,
    x: torch.Tensor,
    schedule: NoiseSchedule | None = None,
    steps: int = RELEASE_STEPS,
    t_start: float = T_START,
    t_end: float = T_END,
) -> torch.Tensor:
    """The release sampler: singlestep DPM-Solver++ 'fast' (order 3) on a uniform time grid of
    ``steps + 1`` points; exactly ``steps`` evaluations of ``model_fn`` (50: orders [3]*16 + [2]).

    ``x``: initial noise (any shape with the batch first); returns the final state (float32 math)."""
    schedule = schedule or NoiseSchedule()
    x0_fn = _DataPrediction(model_fn, schedule)
    grid = time_uniform_grid(steps, t_start, t_end)
    i = 0
    for order in release_orders(steps):
        s, t = grid[i : i + 1], grid[i + order : i + order + 1]
        lam = schedule.lambda_
        h = lam(t) - lam(s)
        r1 = (lam(grid[i + 1 : i + 2]) - lam(s)) / h if order >= 2 else None
        r2 = (lam(grid[i + 2 : i + 3]) - lam(s)) / h if order >= 3 else None
        x = _singlestep_update(x0_fn, x, s, t, order, r1, r2)
        i += order
    return x


def sample_multistep(
    model_fn: NoiseFn,
    x: torch.Tensor,
    schedule: NoiseSchedule | None = None,
    steps: int = 20,
    t_start: float = T_START,
    t_end: float = T_END,
    skip_type: str = "time_uniform",
    lower_order_final: bool = True,
) -> torch.Tensor:
    """Multistep DPM-Solver++(2M), data prediction: one evaluation per step, ``steps`` in total.

    The first step is first order (no history yet); with ``lower_order_final`` and fewer than 15 steps
    the last step is first order too, which stabilises very short schedules (Lu et al. 2022).
    ``skip_type``: ``"time_uniform"`` (the release's grid) or ``"logSNR"``."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    schedule = schedule or NoiseSchedule()
    if skip_type == "time_uniform":
        grid = time_uniform_grid(steps, t_start, t_end)
    elif skip_type == "logSNR":
        grid = logsnr_uniform_grid(schedule, steps, t_start, t_end)
    else:
        raise ValueError(f"unknown skip_type {skip_type!r}; use 'time_uniform' or 'logSNR'")
    x0_fn = _DataPrediction(model_fn, schedule)
    lam = schedule.lambda_(grid)
    sigma, alpha = schedule.sigma(grid), schedule.alpha(grid)
    prev_x0: torch.Tensor | None = None
    for k in range(steps):
        x0 = x0_fn(x, grid[k : k + 1])
        h = lam[k + 1] - lam[k]
        phi_1 = torch.expm1(-h)
        x_next = (sigma[k + 1] / sigma[k]).item() * x - (alpha[k + 1] * phi_1).item() * x0
        final_low = lower_order_final and steps < 15 and k == steps - 1
        if prev_x0 is not None and not final_low:
            r = (lam[k] - lam[k - 1]) / h
            x_next = x_next - (0.5 / r * alpha[k + 1] * phi_1).item() * (x0 - prev_x0)
        x, prev_x0 = x_next, x0
    return x


SOLVERS: dict[str, Callable[..., torch.Tensor]] = {"release": sample_release, "2m": sample_multistep}


def solve(
    model_fn: NoiseFn,
    x: torch.Tensor,
    solver: str = "release",
    steps: int = RELEASE_STEPS,
    schedule: NoiseSchedule | None = None,
) -> torch.Tensor:
    """Dispatch by name: ``"release"`` (singlestep order-3 'fast', the reference) or ``"2m"``."""
    try:
        fn = SOLVERS[solver.lower()]
    except KeyError:
        raise ValueError(f"unknown solver {solver!r}; choose one of {sorted(SOLVERS)}") from None
    return fn(model_fn, x, schedule=schedule, steps=steps)
