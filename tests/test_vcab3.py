"""VCAB3: exact weights on non-uniform grids, third-order convergence, steady states, gradients."""
import math

import numpy as np
import pytest
import torch
from conftest import TanhLayer

import torchdyn_deq as td
from torchdyn_deq._ode import adams_bashforth_weights


@pytest.mark.parametrize("nodes", [[0.0], [0.0, -0.3], [0.0, -0.3, -1.1], [0.0, -1e-3, -0.5]])
def test_weights_integrate_polynomials_exactly(nodes):
    h = 0.7
    for degree in range(len(nodes)):
        w = adams_bashforth_weights(nodes, h)
        exact = h ** (degree + 1) / (degree + 1)
        assert math.isclose(sum(wi * s**degree for wi, s in zip(w, nodes)), exact, rel_tol=1e-10, abs_tol=1e-14)


def _integrate(h, nonuniform):
    """z' = -z + sin(t), z(0) = 1, to t = 2 with exact starting history."""
    exact = lambda t: 1.5 * math.exp(-t) + 0.5 * (math.sin(t) - math.cos(t))  # noqa: E731
    rhs = lambda t, z: -z + math.sin(t)  # noqa: E731
    times = [0.0, -h, -2 * h]
    zs = [exact(s) for s in times]
    t, z = 0.0, zs[0]
    evals = [rhs(s, exact(s)) for s in times]
    k = 0
    while t < 2.0 - 1e-12:
        step = h * (0.6 if (nonuniform and k % 2) else 1.0)
        step = min(step, 2.0 - t)
        w = adams_bashforth_weights([s - t for s in times], step)
        z = z + sum(wi * ei for wi, ei in zip(w, evals))
        t += step
        times, evals = [t] + times[:2], [rhs(t, z)] + evals[:2]
        k += 1
    return abs(z - exact(2.0))


@pytest.mark.parametrize("nonuniform", [False, True])
def test_third_order_convergence(nonuniform):
    hs = [0.1, 0.05, 0.025, 0.0125]
    errors = [_integrate(h, nonuniform) for h in hs]
    slope = np.polyfit(np.log(hs), np.log(errors), 1)[0]
    assert 2.8 < slope < 3.3, (slope, errors)


def test_reaches_the_fixed_point_and_counts_one_evaluation_per_step():
    layer = TanhLayer(d=8, m=3, dtype=torch.float32)
    x = torch.randn(16, 3)
    ref = td.DEQ(layer, solver="broyden", state_shape=(8,), atol=1e-6, rtol=1e-6)(x)[1][-1]
    model = td.DEQ(layer, solver="vcab3", state_shape=(8,), atol=1e-4, rtol=1e-4)
    z = model(x)[1][-1]
    sol = model.solution
    assert sol.converged and sol.nfe == sol.steps_accepted + 1
    torch.testing.assert_close(z, ref, atol=2e-3, rtol=2e-3)


def test_gradcheck_through_vcab3(layer):
    model = td.DEQ(layer, solver="vcab3", state_shape=(3,), atol=1e-12, rtol=1e-12, max_steps=2000,
                   sensitivity=td.SteadyStateSensitivity(td.GMRES(rtol=1e-12, atol=1e-14)))
    x = torch.randn(4, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: model(x)[1][-1], (x,), eps=1e-6, atol=1e-6, rtol=1e-5)


def test_max_step_bounds_every_step():
    layer = TanhLayer(d=8, m=3, dtype=torch.float32)
    model = td.DEQ(layer, solver=td.VCAB3(max_step=0.1, step_tol_factor=10.0), state_shape=(8,), max_steps=300)
    model(torch.randn(16, 3))
    sol = model.solution
    assert sol.converged and sol.t <= 0.1 * sol.steps_accepted + 1e-9


def test_bad_options():
    with pytest.raises(ValueError, match="max_step"):
        td.VCAB3(max_step=0)
    with pytest.raises(ValueError, match="max_factor"):
        td.VCAB3(max_factor=1.0)
