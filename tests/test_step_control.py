"""Runge-Kutta tableaus as data, the stability regions and the eigenvalue estimates of the step control."""
import math

import pytest
import torch
from torchdyn.numerics.solvers.ode import DormandPrince45, Euler, Tsitouras45

import torchdyn_deq as td
from torchdyn_deq._ode import Tableau, rk_step
from torchdyn_deq._step_control import ANGLES, StabilityRegion, ritz_values, spectral_moments


def _field(dtype):
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(6, 6, generator=gen, dtype=dtype) / 3
    return lambda t, x: torch.tanh(x @ w) - x


@pytest.mark.parametrize("stepper_class", [Tsitouras45, DormandPrince45])
def test_tableau_step_matches_torchdyn(stepper_class):
    f = _field(torch.float64)
    x = torch.randn(4, 6, dtype=torch.float64)
    tableau = Tableau.of(stepper_class(torch.float64))
    assert tableau.fsal  # the new state is the last stage's state: no separate b-combination
    z_new, gz_new, err, stages, ks = rk_step(f, tableau, x, f(0.0, x), 0.0, 0.37)
    k_last, x_sol, err_ref, _ = stepper_class(torch.float64).step(f, x, torch.tensor(0.0, dtype=torch.float64), 0.37)
    for ours, theirs in ((z_new, x_sol), (gz_new, k_last), (err, err_ref)):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-13)
    assert len(ks) == len(stages) == 7


def test_tableau_step_is_differentiable():
    f = _field(torch.float64)
    tableau = Tableau.of(Tsitouras45(torch.float64))
    x = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: rk_step(f, tableau, x, f(0.0, x), 0.0, 0.3)[0], (x,))


def test_fixed_steppers_have_no_tableau():
    assert Tableau.of(Euler(torch.float32)) is None
    assert not td.ODESteadyStateSolver("euler").adaptive and td.ODESteadyStateSolver("tsit5").adaptive


@pytest.mark.parametrize("region, real_axis", [
    (Tableau.of(Tsitouras45(torch.float64)).region, 3.5),   # Hairer-Wanner: tsit5 ~3.5, dopri5 ~3.3
    (Tableau.of(DormandPrince45(torch.float64)).region, 3.3),
    (StabilityRegion.adams_bashforth3(), 6 / 11),               # AB3: exactly 6/11 on the real axis
])
def test_stability_regions_on_the_negative_real_axis(region, real_axis):
    assert region.radii.shape == (ANGLES,)
    assert float(region.radii[-1]) == pytest.approx(real_axis, rel=0.02)
    assert (region.radii[ANGLES // 10:] > 0).all()  # every direction away from the imaginary axis is stable near 0


def test_euler_region_is_the_unit_disk_around_minus_one():
    region = StabilityRegion.runge_kutta([], [1.0])
    phi = torch.linspace(math.pi / 2, math.pi, ANGLES, dtype=torch.float64)
    torch.testing.assert_close(region.radii.double(), -2 * torch.cos(phi), atol=3e-3, rtol=0)


def _moments(A, dz):
    """spectral_moments of the pairs (dz_i, dz_i A^T) of a linear field."""
    return spectral_moments([(dz[:, 0], dz[:, 0] @ A.T), (dz[:, 1], dz[:, 1] @ A.T)]).tolist()


@pytest.mark.parametrize("block", [[[-0.1, -1.0], [1.0, -0.1]], [[-2.0, 0.0], [0.0, -0.5]], [[-1.0, 1.0], [0.0, -1.0]]])
def test_ritz_values_recover_the_eigenvalues_on_an_invariant_plane(block):
    """A batch whose differences lie in an invariant plane of the same operator, the second of
    each pair one step of the same dynamics after the first (dz_2 = P dz_1 with P = I + 0.3 A,
    as consecutive steps or stages): the two Ritz values of the batch are the plane's
    eigenvalues exactly (a spiral, a real pair, a Jordan block)."""
    batch, n = 3, 5
    A = torch.zeros(n, n, dtype=torch.float64)
    A[:2, :2] = torch.tensor(block, dtype=torch.float64)
    A[2:, 2:] = -7 * torch.eye(n - 2, dtype=torch.float64)
    first = torch.zeros(batch, n, dtype=torch.float64)
    first[:, :2] = torch.randn(batch, 2, dtype=torch.float64)
    P = torch.eye(n, dtype=torch.float64) + 0.3 * A
    dz = torch.stack([first, first @ P.T], 1)
    key = lambda c: (c.real, c.imag)  # noqa: E731
    got = sorted(ritz_values(_moments(A, dz)), key=key)
    want = sorted((complex(e) for e in torch.linalg.eigvals(A[:2, :2]).tolist()), key=key)
    assert max(abs(a - b) for a, b in zip(got, want)) < 1e-9


def test_parallel_directions_give_the_rayleigh_quotient():
    A = torch.diag(torch.tensor([-1.0, -3.0], dtype=torch.float64))
    v = torch.tensor([[1.0, 1.0]], dtype=torch.float64)
    dz = torch.stack([v, 2 * v], 1)
    assert ritz_values(_moments(A, dz)) == (complex(-2.0), complex(-2.0))


def test_step_limit_ignores_growing_modes_and_bounds_decaying_ones():
    region = Tableau.of(Tsitouras45(torch.float64)).region
    assert region.step_limit([complex(-10.0), complex(1.0)], 0.0, 0.8) == pytest.approx(0.8 * 3.5 / 10, rel=0.02)
    assert math.isinf(region.step_limit([complex(1.0), complex(0.0, 2.0)], 0.0, 0.8))
    # a per-sample magnitude above the batch's estimates tightens the limit in the same direction
    assert region.step_limit([complex(-1.0)], 20.0, 0.8) == pytest.approx(0.8 * 3.5 / 20, rel=0.02)


def _linear_first_step(stepper: str, width: int = 16):
    """A contractive linear field ``g = J (z - z*)`` from ``z0 = 0`` at tolerance 5e-3."""
    gen = torch.Generator().manual_seed(3)
    q, _ = torch.linalg.qr(torch.randn(width, width, generator=gen, dtype=torch.float64))
    J = -(q * torch.linspace(0.8, 1.2, width, dtype=torch.float64)) @ q.T
    z_star = torch.randn(4, width, generator=gen, dtype=torch.float64)
    return (lambda t, z: (z - z_star) @ J.T), torch.zeros(4, width, dtype=torch.float64)


@pytest.mark.parametrize("stepper", ["tsit5", "dopri5"])
def test_first_step_meets_the_controllers_target_on_a_linear_field(stepper):
    """On a linear field the probe's model is the step's own error estimate (up to the spread of
    ``|lambda|``): the first step's error ratio lands near ``safety^order``, where Hairer's guess
    lands orders of magnitude below it."""
    from torchdyn_deq._ode import _named_tableau, _probe, _rk_body
    from torchdyn_deq._step_control import StepController, first_step
    g, z0 = _linear_first_step(stepper)
    tableau, tol = _named_tableau(stepper), 5e-3
    control = StepController(tableau.order, tableau.region)
    g0 = g(0.0, z0)
    d1, mu, *moments = _probe(g, z0, g0, tol, tol).tolist()
    rate = control.rate(mu, moments)
    # |lambda| spread over [0.8, 1.2]: the rate of the high powers lies between mu and the spectral radius
    assert mu == pytest.approx(1.0, abs=0.25) and mu <= rate <= 1.2 + 1e-6
    guess = first_step(d1, tableau.order)
    h = control.first_step(guess, d1, mu, rate, tableau.error)
    assert guess < h <= control.max_factor * guess
    ratio = float(_rk_body(g, tableau, z0, g0, (0.0, h), tol, tol, False)[2])
    guess_ratio = float(_rk_body(g, tableau, z0, g0, (0.0, guess), tol, tol, False)[2])
    target = control.safety ** tableau.order
    assert 0.3 * target < ratio <= target and guess_ratio < 1e-3 * target


def test_first_step_never_shortens_the_guess():
    """A probe that sees a huge ``mu`` (a field far from linear at the start) leaves Hairer's guess;
    one that sees none (``mu = 0``) lengthens it by ``max_factor`` at most; a non-finite one leaves it."""
    from torchdyn_deq._ode import _named_tableau
    from torchdyn_deq._step_control import StepController
    tableau = _named_tableau("tsit5")
    control = StepController(tableau.order, tableau.region, max_step=5.0)
    assert control.first_step(0.2, 100.0, 1e3, 1e3, tableau.error) == 0.2
    assert control.first_step(0.2, 100.0, 0.0, 0.0, tableau.error) == pytest.approx(2.0)
    assert control.first_step(0.2, math.nan, 1.0, 1.0, tableau.error) == 0.2
    assert control.first_step(0.2, 100.0, 1.0, math.nan, tableau.error) == 0.2
    assert control.first_step(1.0, 1e-6, 0.0, 0.0, tableau.error) == 5.0  # max_step bounds it


def test_next_step_credits_the_speeds_fall():
    """After an accepted step the next error is ``ratio * decay``: a speed falling 10x allows a
    10^(1/order)x longer step; a rejected step's retry ignores it (it starts where the step did)."""
    from torchdyn_deq._step_control import StepController
    control = StepController(5, None)
    plain = control.next_step(1.0, 0.5, math.inf)
    assert control.next_step(1.0, 0.5, math.inf, decay=0.1) == pytest.approx(plain * 10 ** 0.2)
    assert control.next_step(1.0, 2.0, math.inf, decay=0.1) == control.next_step(1.0, 2.0, math.inf)
    # a speed that grows: the next error at the same step is predicted above 1, so the step shrinks
    assert control.next_step(1.0, 0.5, math.inf, decay=10.0) == pytest.approx(0.9 * 5 ** -0.2)
    assert control.next_step(1.0, 0.5, math.inf, decay=1.5) == 1.0  # predicted below 1: kept
