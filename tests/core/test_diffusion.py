"""Noise schedule and DPM-Solver++ samplers: reference arrays, an exactly solvable ODE, convergence."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch
from copgen.diffusion import (
    NoiseSchedule,
    logsnr_uniform_grid,
    release_orders,
    sample_multistep,
    sample_release,
    solve,
    stable_diffusion_betas,
    time_uniform_grid,
)
from safetensors.torch import load_file
from tolerances import (
    LINSPACE_ULPS,
    SAMPLER_TIME_ATOL,
    SCHEDULE_ULPS,
    assert_ulp_close,
    ulp_distance,
)

pytestmark = pytest.mark.usefixtures("single_thread")  # fixture in tests/core/conftest.py


@pytest.fixture(scope="module")
def sampling(reference_dir) -> dict[str, torch.Tensor]:
    return load_file(reference_dir / "triffuser_tiny_sampling.safetensors")


def nfe_per_scenario(sampling: dict[str, torch.Tensor]) -> set[int]:
    return {v.shape[0] for k, v in sampling.items() if k.endswith(".nfe_t")}


def test_schedule_arrays_match_reference(sampling, sidecar):
    betas = stable_diffusion_betas(sampling["betas"].numel())
    # numpy vs torch linspace differ by a few 1e-18 in float64 (sidecar note); identical after the f32 cast
    note = next(n for n in sidecar["notes"] if n.startswith("betas"))
    atol = float(re.search(r"atol=(\d+(?:\.\d+)?(?:[eE][+-]?\d+)?)", note).group(1))
    np.testing.assert_allclose(betas, sampling["betas"].numpy(), rtol=0, atol=atol)
    np.testing.assert_allclose(np.cumprod(1 - betas), sampling["alphas_cumprod"].numpy(), rtol=1e-12)
    schedule = NoiseSchedule(sampling["betas"].numpy())
    # float32 log/linspace are not bit-identical across CPUs: ulp tolerances, justified in tests/tolerances.py
    ref_log_alpha = sampling["log_alpha_discrete_f32"]
    assert_ulp_close(schedule.log_alpha_knots, ref_log_alpha, SCHEDULE_ULPS, "log_alpha_knots")
    assert_ulp_close(schedule.t_knots, sampling["t_discrete_f32"], LINSPACE_ULPS, "t_knots")
    n_grid = sampling["time_grid"].numel()
    assert_ulp_close(time_uniform_grid(n_grid - 1), sampling["time_grid"], LINSPACE_ULPS, "time_grid")
    # The tolerances keep their meaning: plausible wrong schedules and grids are far outside them.
    n = sampling["betas"].numel()
    wrong_betas = {
        "linspace shifted by one point": stable_diffusion_betas(n + 1)[1:],
        "linear, not scaled-linear": np.linspace(0.00085, 0.012, n),
        "beta_end 0.0121": stable_diffusion_betas(n, beta_end=0.0121),
    }
    for what, wrong in wrong_betas.items():
        far = ulp_distance(NoiseSchedule(wrong).log_alpha_knots, ref_log_alpha).max()
        assert far > 100 * SCHEDULE_ULPS, what
    exclusive = torch.cat([torch.zeros(1), schedule.log_alpha_knots[:-1]])  # cumsum off by one knot
    assert ulp_distance(exclusive, ref_log_alpha).max() > 100 * SCHEDULE_ULPS
    off_by_one_knots = torch.linspace(0.0, 1.0 - 1.0 / n, n)
    assert ulp_distance(off_by_one_knots, sampling["t_discrete_f32"]).max() > 100 * LINSPACE_ULPS
    wrong_grid = time_uniform_grid(n_grid - 1, t_end=1e-4)  # the sidecar's "eps=1e-4" mistake
    assert ulp_distance(wrong_grid, sampling["time_grid"]).max() > 100 * LINSPACE_ULPS


def test_schedule_interpolation_and_inverse():
    ns = NoiseSchedule()
    # at the knots the interpolation returns the discrete values
    torch.testing.assert_close(ns.log_alpha(ns.t_knots), ns.log_alpha_knots, rtol=0, atol=1e-6)
    # between knots it is linear; outside it extrapolates the end segments
    mid = (ns.t_knots[10:11] + ns.t_knots[11:12]) / 2
    torch.testing.assert_close(ns.log_alpha(mid), (ns.log_alpha_knots[10:11] + ns.log_alpha_knots[11:12]) / 2)
    slope = (ns.log_alpha_knots[1] - ns.log_alpha_knots[0]) / (ns.t_knots[1] - ns.t_knots[0])
    below = torch.tensor([0.0])
    torch.testing.assert_close(ns.log_alpha(below), ns.log_alpha_knots[:1] - slope * ns.t_knots[:1])
    # alpha² + sigma² = 1; lambda is decreasing; inverse_lambda inverts it on (1e-3, 1]
    t = torch.linspace(1.0, 1e-3, 97)
    torch.testing.assert_close(ns.alpha(t) ** 2 + ns.sigma(t) ** 2, torch.ones_like(t))
    assert torch.all(ns.lambda_(t)[1:] > ns.lambda_(t)[:-1])
    torch.testing.assert_close(ns.inverse_lambda(ns.lambda_(t)), t, rtol=0, atol=2e-5)
    grid = logsnr_uniform_grid(ns, 10)
    lam = ns.lambda_(grid)
    torch.testing.assert_close(
        lam[1:] - lam[:-1], (lam[1:] - lam[:-1]).mean().expand(10), rtol=1e-3, atol=1e-4
    )


def test_release_orders_count_evaluations(sampling):
    for n in range(1, 80):
        orders = release_orders(n)
        assert sum(orders) == n and max(orders) <= 3
    for n in nfe_per_scenario(sampling):  # the reference runs: 50 evaluations = [3]*16 + [2]
        orders = release_orders(n)
        assert orders[:-1] == [3] * (len(orders) - 1) and orders[-1] == n - 3 * (len(orders) - 1)


class GaussianData:
    """Data ~ N(0, s²): the exact noise prediction is eps(x, t) = σ x / (α² s² + σ²), and the probability
    flow ODE keeps x / sqrt(α² s² + σ²) constant, so every solver has a closed-form target."""

    def __init__(self, schedule: NoiseSchedule, s: float = 1.0) -> None:
        self.ns, self.s = schedule, s
        self.calls: list[float] = []

    def scale(self, t: torch.Tensor) -> torch.Tensor:
        return torch.sqrt(self.ns.alpha(t).double() ** 2 * self.s**2 + self.ns.sigma(t).double() ** 2)

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        assert t.shape == (x.shape[0],) and t.dtype == torch.float32
        self.calls.append(t[0].item())
        var = self.scale(t).float() ** 2
        return (self.ns.sigma(t) / var)[:, None] * x

    def exact(self, x_start: torch.Tensor, t_start: float, t_end: float) -> torch.Tensor:
        ratio = self.scale(torch.tensor([t_end])) / self.scale(torch.tensor([t_start]))
        return x_start * ratio.float()


@pytest.mark.parametrize("solver", ["release", "2m"])
def test_solvers_reach_the_exact_ode_solution(solver):
    ns = NoiseSchedule()
    model = GaussianData(ns)
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(0))
    exact = model.exact(x, 1.0, 1e-3)
    errors = {}
    for steps in (10, 50, 200):
        model.calls.clear()
        out = solve(model, x, solver=solver, steps=steps, schedule=ns)
        assert len(model.calls) == steps  # one network evaluation per step, both solvers
        assert model.calls[0] == 1.0
        errors[steps] = ((out - exact).abs().max() / exact.abs().max()).item()
    # the log-alpha interpolation has a kink at every knot, so convergence is slower than the order
    assert errors[200] < errors[50] < errors[10], errors
    assert errors[200] < 2e-3, errors


def test_release_solver_time_points_match_reference(sampling):
    """The continuous times of the 50 evaluations, without any network (the sampler alone)."""
    ns = NoiseSchedule(sampling["betas"].numpy())
    for name in sorted(k.removesuffix(".nfe_t") for k in sampling if k.endswith(".nfe_t")):
        times: list[torch.Tensor] = []
        x = sampling[f"{name}.nfe_x"][0]
        sample_release(
            lambda x, t, times=times: times.append(t.clone()) or torch.zeros_like(x),
            x,
            ns,
            steps=sampling[f"{name}.nfe_t"].numel(),
        )
        got = torch.stack([t[0] for t in times])
        assert all(torch.all(t == t[0]) for t in times)
        torch.testing.assert_close(got, sampling[f"{name}.nfe_t"], rtol=0, atol=SAMPLER_TIME_ATOL)
    # the tolerance keeps its meaning: the sidecar's "eps=1e-4" mistake moves the times far beyond it
    wrong: list[torch.Tensor] = []
    sample_release(lambda x, t: wrong.append(t[0].clone()) or torch.zeros_like(x), x, ns,
                   steps=sampling[f"{name}.nfe_t"].numel(), t_end=1e-4)  # fmt: skip
    assert not torch.allclose(torch.stack(wrong), sampling[f"{name}.nfe_t"], rtol=0, atol=SAMPLER_TIME_ATOL)


def test_multistep_first_step_is_ddim():
    """One 2M step from pure noise is first order: the DDIM / DPM-Solver++(1) update."""
    ns = NoiseSchedule()
    x = torch.randn(2, 16, generator=torch.Generator().manual_seed(1))
    eps = torch.randn(2, 16, generator=torch.Generator().manual_seed(2))
    out = sample_multistep(lambda x_, t: eps, x, ns, steps=1, t_start=1.0, t_end=0.5)
    s, t = torch.tensor([1.0]), torch.tensor([0.5])
    x0 = (x - ns.sigma(s) * eps) / ns.alpha(s)
    ddim = ns.alpha(t) * x0 + ns.sigma(t) * eps
    torch.testing.assert_close(out, ddim, rtol=1e-5, atol=1e-5)


def test_unknown_solver_and_bad_steps():
    with pytest.raises(ValueError, match="unknown solver"):
        solve(lambda x, t: x, torch.zeros(1, 4), solver="euler")
    with pytest.raises(ValueError, match="steps"):
        release_orders(0)
    with pytest.raises(ValueError, match="skip_type"):
        sample_multistep(lambda x, t: x, torch.zeros(1, 4), skip_type="quadratic")
    assert math.isclose(float(time_uniform_grid(4)[-1]), 1e-3, rel_tol=1e-6)
