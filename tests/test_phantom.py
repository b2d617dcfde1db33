"""Phantom gradients: k damped steps at z*, converging to the implicit gradient as k grows."""
import math

import pytest
import torch
from conftest import TanhLayer

import torchdyn_deq as td

TIGHT = dict(atol=1e-12, rtol=1e-12, max_steps=2000, state_shape=(3,))
STEPS = (1, 2, 4, 8, 16, 32)


def _grads(layer, x, weights, solver, sensitivity):
    model = td.DEQ(layer, solver=solver, sensitivity=sensitivity, **TIGHT)
    z = model(x)[1][-1]
    grads = torch.autograd.grad((z * weights).sum(), [x, *layer.parameters()])
    return z, torch.cat([g.flatten() for g in grads]), model


@pytest.mark.parametrize("solver", ["tsit5", "anderson"])
@pytest.mark.parametrize("damping", [1.0, 0.5])
def test_approaches_the_implicit_gradient_geometrically(solver, damping):
    """On a contraction the error of the k-step gradient decays like rho(M)^k, M = (1 - tau) I + tau J_f."""
    layer = TanhLayer(scale=0.8)
    x = torch.randn(5, 2, dtype=torch.float64, requires_grad=True)
    weights = torch.randn(5, 3, dtype=torch.float64)
    z_ref, g_ref, _ = _grads(layer, x, weights, solver, td.SteadyStateSensitivity(td.DirectSolver()))
    errors = []
    for k in STEPS:
        z, g, _ = _grads(layer, x, weights, solver, td.PhantomSensitivity(steps=k, damping=damping))
        torch.testing.assert_close(z, z_ref, rtol=0, atol=0)  # the value is z* whatever k
        errors.append(float((g - g_ref).norm() / g_ref.norm()))
    assert all(b < a for a, b in zip(errors, errors[1:])), errors
    # the rate: the largest per-sample spectral radius of the damped map's Jacobian at z*
    with torch.no_grad():
        jac = torch.func.vmap(torch.func.jacrev(lambda z, xi: layer(z, xi)))(z_ref, x)
        eye = torch.eye(3, dtype=torch.float64)
        rho = float(torch.linalg.eigvals((1 - damping) * eye + damping * jac).abs().max())
    assert errors[-1] < 1e-3 * errors[0]
    # from 16 to 32 steps the error shrinks at least as fast as rho^16 (with a margin for the transient)
    assert errors[-1] / errors[-2] < 10 * rho ** 16, (errors, rho)


def test_one_undamped_step_is_jacobian_free():
    layer = TanhLayer(scale=0.5)
    x = torch.randn(4, 2, dtype=torch.float64, requires_grad=True)
    weights = torch.randn(4, 3, dtype=torch.float64)
    z_p, g_p, _ = _grads(layer, x, weights, "anderson", td.PhantomSensitivity(steps=1, damping=1.0))
    z_j, g_j, _ = _grads(layer, x, weights, "anderson", "jacobian_free")
    torch.testing.assert_close(z_p, z_j, rtol=0, atol=0)
    torch.testing.assert_close(g_p, g_j, rtol=1e-14, atol=1e-15)


@pytest.mark.parametrize("solver", ["tsit5", "anderson"])
def test_gradient_is_that_of_the_unrolled_damped_map(solver):
    """gradcheck (float64): the phantom gradient equals finite differences of the map
    (x, theta) -> k damped steps from the steady state held fixed."""
    layer = TanhLayer(scale=0.6)
    k, tau = 3, 0.7
    model = td.DEQ(layer, solver=solver, sensitivity=td.PhantomSensitivity(steps=k, damping=tau), **TIGHT)
    names = [n for n, _ in model.named_parameters()]
    params = tuple(p.detach().clone().requires_grad_() for p in model.parameters())
    x = torch.randn(3, 2, dtype=torch.float64, requires_grad=True)
    with torch.no_grad():
        z_fixed = model(x)[1][-1]

    def unrolled(x, params):
        z = z_fixed
        for _ in range(k):
            z = (1 - tau) * z + tau * torch.func.functional_call(layer, dict(zip(["W", "U", "b"], params)), (z, x))
        return z

    def value_of_the_map_gradient_of_the_model(x, *params):
        z_star = torch.func.functional_call(model, dict(zip(names, params)), (x,))[1][-1]
        with torch.no_grad():
            value = unrolled(x, params)
        return value + (z_star - z_star.detach())

    assert torch.autograd.gradcheck(value_of_the_map_gradient_of_the_model, (x, *params), eps=1e-6, atol=1e-7,
                                    rtol=1e-6)


def test_general_vector_field_is_a_damped_euler_step():
    """For an InfiniteTimeNeuralODE the steps are z + tau g(z): the gradient of k Euler steps of size tau."""
    torch.manual_seed(1)
    field = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Tanh()).double()
    a = torch.nn.Parameter(torch.tensor(2.0, dtype=torch.float64))

    class Field(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net, self.a = field, a

        def forward(self, z):
            return self.net(z) - self.a * z

    vf = Field()
    model = td.InfiniteTimeNeuralODE(vf, sensitivity=td.PhantomSensitivity(steps=4, damping=0.3), atol=1e-12,
                                     rtol=1e-12, max_steps=2000)
    x = torch.randn(2, 3, dtype=torch.float64)
    z_star = model(x)[1][-1]
    (got,) = torch.autograd.grad(z_star.sum(), [a])
    z = z_star.detach()
    for _ in range(4):
        z = z + 0.3 * vf(z)
    (want,) = torch.autograd.grad(z.sum(), [a])
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)


def test_cost_is_recorded_when_the_backward_pass_runs():
    model = td.DEQ(TanhLayer(), solver="anderson", sensitivity="phantom", **TIGHT)
    assert isinstance(model.sensitivity, td.PhantomSensitivity)
    assert (model.sensitivity.steps, model.sensitivity.damping) == (5, 0.5)
    x = torch.randn(2, 2, dtype=torch.float64)
    z = model(x)[1][-1]
    assert model.solution.backward_iters is None
    z.sum().backward()
    assert model.solution.backward_iters == 5 and model.solution.stats()["backward_iters"] == 5.0
    assert model.solution.backward_residual is None
    assert all(p.grad is not None for p in model.parameters())


def test_evaluations_of_f():
    """Without gradients: the solve only. With: also g(z*) (the first step) and k - 1 more."""
    model = td.DEQ(TanhLayer(), sensitivity=td.PhantomSensitivity(steps=3), **TIGHT)
    calls = []
    model.f.register_forward_hook(lambda *a: calls.append(1))
    with torch.no_grad():
        model(torch.randn(2, 2, dtype=torch.float64))
    assert len(calls) == model.solution.nfe
    calls.clear()
    model(torch.randn(2, 2, dtype=torch.float64))
    assert len(calls) == model.solution.nfe + 3


@pytest.mark.parametrize("kwargs, match", [
    (dict(steps=0), "steps must be a positive integer, got 0"),
    (dict(steps=2.0), "steps must be a positive integer, got 2.0"),
    (dict(steps=True), "steps must be a positive integer, got True"),
    (dict(damping=0.0), r"damping must be in \(0, 1\], got 0.0"),
    (dict(damping=1.5), r"damping must be in \(0, 1\], got 1.5"),
    (dict(damping=math.nan), r"damping must be in \(0, 1\], got nan"),
    (dict(damping="0.5"), r"damping must be in \(0, 1\], got '0.5'"),
])
def test_bad_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        td.PhantomSensitivity(**kwargs)


def test_listed_among_the_sensitivity_names():
    with pytest.raises(ValueError, match="'jacobian_free', 'phantom'"):
        td.DEQ(TanhLayer(), sensitivity="phantom_grad")
    assert repr(td.PhantomSensitivity(2, 0.7)) == "PhantomSensitivity(steps=2, damping=0.7)"
