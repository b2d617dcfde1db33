"""Hostile inputs for the public entry points (beyond tests/test_errors.py), and a
property test of the steady state and its implicit gradients on random contractive layers."""
import math
import warnings

import pytest
import torch
import torch.nn as nn
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import torchdyn_deq as td
from torchdyn_deq._loop import scaled_residual, steady_state_solve
from torchdyn_deq._solution import SolveOptions
from conftest import TanhLayer

torch.set_num_threads(1)

ALL_SOLVERS = ["tsit5", "dopri5", "vcab3", "euler", "midpoint", "rk4", "anderson", "broyden", "fixed_point"]


def _x(batch=4, m=2):
    return torch.randn(batch, m, dtype=torch.float64)


# ---------------------------------------------------------------- options
@pytest.mark.parametrize("max_steps", [0, -3, True, 2.0, "10"])
def test_max_steps_must_be_a_positive_int(layer, max_steps):
    with pytest.raises(ValueError, match="max_steps must be a positive integer"):
        td.DEQ(layer, max_steps=max_steps)


def test_max_steps_one_is_reported_not_silent(layer):
    model = td.DEQ(layer, state_shape=(3,), max_steps=1, on_failure="raise")
    with pytest.raises(td.ConvergenceError, match="max_steps=1"):
        model(_x())


@pytest.mark.parametrize("solver", ["tsit5", "anderson"])
def test_rtol_zero_with_atol_works(layer, solver):
    model = td.DEQ(layer, solver=solver, state_shape=(3,), atol=1e-7, rtol=0)
    x = _x()
    z = model(x)[1][-1]
    assert model.solution.converged
    assert float((layer(z, x) - z).detach().abs().max()) < 1e-6


@pytest.mark.parametrize("solver", ["tsit5", "anderson"])
def test_atol_zero_is_refused_rtol_zero_works(layer, solver):
    # with atol=0 the relative test cannot be met where a component of z is 0 (the DEQ start)
    with pytest.raises(ValueError, match="atol must be positive"):
        td.DEQ(layer, solver=solver, state_shape=(3,), atol=0, rtol=1e-6)
    model = td.DEQ(layer, solver=solver, state_shape=(3,), atol=1e-6, rtol=0)
    model(_x())
    assert model.solution.converged


# ---------------------------------------------------------------- vector fields
@pytest.mark.parametrize("value", [(1.0,), None, "z", [0.0]])
def test_layer_returning_a_non_tensor_is_a_type_error(value):
    with pytest.raises(TypeError, match="the DEQ layer f returned .*must return a tensor shaped like z"):
        td.DEQ(lambda z, x: value)(_x())


def test_neural_ode_field_returning_a_non_tensor_is_named():
    with pytest.raises(TypeError, match="the vector field returned tuple"):  # the one check, both forms
        td.InfiniteTimeNeuralODE(lambda x: (x,))(_x())


@pytest.mark.parametrize("solver", ["tsit5", "vcab3", "anderson", "broyden", "fixed_point"])
def test_nan_in_a_single_sample_fails_the_batch_loudly(solver):
    def f(z, x):
        out = torch.tanh(0.5 * z + x)
        return torch.cat([out[:1], out[1:2] * float("nan"), out[2:]])

    with pytest.raises(td.NonFiniteError, match="non-finite values appeared"):
        td.DEQ(f, solver=solver)(_x())
    # the healthy samples alone solve fine
    z = td.DEQ(lambda z, x: torch.tanh(0.5 * z + x), solver=solver)(_x())[1][-1]
    assert torch.isfinite(z).all()


@pytest.mark.parametrize("solver", ["tsit5", "anderson", "broyden"])
def test_huge_inputs(solver):
    # a saturating layer: z* = tanh(...) stays bounded, gradients stay finite
    model = td.DEQ(TanhLayer(dtype=torch.float32), solver=solver, state_shape=(3,))
    z = model(torch.full((2, 2), 1e30))[1][-1]
    assert model.solution.converged and torch.isfinite(z).all()
    z.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    # a linear layer: z* = 2x = 2e30, found to the relative tolerance
    lin = td.DEQ(lambda z, x: 0.5 * z + x, solver=solver)
    x = torch.full((2, 2), 1e30, dtype=torch.float64)
    z = lin(x)[1][-1]
    assert lin.solution.converged
    torch.testing.assert_close(z, 2 * x, rtol=1e-2, atol=0)


# ---------------------------------------------------------------- backward linear solve
class _Linear(nn.Module):
    """f(z, x) = A z + x with spectral radius 1.5: a repelling fixed point z* = (I - A)^-1 x."""

    def __init__(self, d=6, rho=1.5):
        super().__init__()
        a = torch.randn(d, d, dtype=torch.float64)
        self.A = nn.Parameter(a * rho / torch.linalg.eigvals(a).abs().max())

    def forward(self, z, x):
        return z @ self.A.T + x


def _expansive_backward(linear_solver):
    f = _Linear()
    model = td.DEQ(f, solver="broyden", atol=1e-9, rtol=1e-9, max_steps=200,
                   sensitivity=td.SteadyStateSensitivity(linear_solver))
    x = torch.randn(3, 6, dtype=torch.float64)
    z = model(x)[1][-1]
    assert model.solution.converged  # Broyden finds the repelling fixed point
    assert float(td.spectral_radius(model._field(x, {}), z).min()) > 1.2
    z.sum().backward()
    return f, model.solution


@pytest.mark.parametrize("linear_solver, match", [
    (lambda: td.GMRES(max_iters=2), "GMRES.*relative residual"),
    (lambda: td.FixedPointSolver(max_iters=50), "FixedPointSolver.*relative residual"),
])
def test_backward_linear_solve_that_cannot_converge_warns_with_residual(linear_solver, match):
    with pytest.warns(td.ConvergenceWarning, match=match):
        f, sol = _expansive_backward(linear_solver())
    assert sol.backward_residual > 1e-3
    assert sol.backward_iters >= 2  # GMRES counts the restart's residual matvec: 3 for max_iters=2


def test_gmres_solves_the_non_contractive_backward_exactly():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        f, sol = _expansive_backward(td.GMRES())
    assert sol.backward_residual < 1e-5


# ---------------------------------------------------------------- autograd modes
@pytest.mark.parametrize("x_grad, params_grad", [(True, True), (True, False), (False, True), (False, False)])
def test_inputs_requiring_grad_or_not(x_grad, params_grad):
    layer = TanhLayer()
    layer.requires_grad_(params_grad)
    model = td.DEQ(layer, state_shape=(3,))
    x = _x().requires_grad_(x_grad)
    z = model(x)[1][-1]
    assert z.requires_grad == (x_grad or params_grad)
    if z.requires_grad:
        z.sum().backward()
        assert (x.grad is not None) == x_grad
        assert all((p.grad is not None) == params_grad for p in layer.parameters())
        assert model.solution.backward_iters >= 1  # the implicit backward ran a linear solve


@pytest.mark.parametrize("context", [torch.no_grad, torch.inference_mode])
@pytest.mark.parametrize("kwargs", [{}, {"sensitivity": "autograd", "solver": "anderson"},
                                    {"initializer": "skip_reg", "jacobian_penalty": td.JacobianPenalty()}])
def test_forward_without_autograd(context, kwargs):
    model = td.DEQ(TanhLayer(), state_shape=(3,), **kwargs)
    x = _x()
    with context():
        z = model(x)[1][-1]
    assert not z.requires_grad and z.grad_fn is None
    assert model.solution.converged and model.solution.jacobian_loss is None
    torch.testing.assert_close(z, model(x)[1][-1].detach())


def test_inference_tensor_in_a_training_forward_is_refused_by_torch():
    with torch.inference_mode():
        x = _x()
    with pytest.raises(RuntimeError, match="Inference tensors"):
        td.DEQ(TanhLayer(), state_shape=(3,))(x)[1][-1].sum().backward()


def test_backward_twice():
    model = td.DEQ(TanhLayer(), state_shape=(3,))
    z = model(_x())[1][-1]
    loss = z.pow(2).sum()
    loss.backward(retain_graph=True)
    first = [p.grad.clone() for p in model.parameters()]
    loss.backward(retain_graph=True)  # the implicit backward runs again: gradients accumulate
    for a, b in zip(first, (p.grad for p in model.parameters())):
        torch.testing.assert_close(b, 2 * a)
    loss.backward()
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        loss.backward()


# ---------------------------------------------------------------- every solver x initializer
INITIALIZERS = ["zeros", "input", "skip_reg", "skip"]


@pytest.mark.parametrize("initializer", INITIALIZERS)
@pytest.mark.parametrize("solver", ALL_SOLVERS)
def test_every_solver_and_initializer_on_a_batch_of_one(solver, initializer):
    layer = TanhLayer(d=3, m=3)
    init = td.SkipInitializer(nn.Linear(3, 3).double()) if initializer == "skip" else initializer
    model = td.DEQ(layer, solver=solver, initializer=init)
    x = torch.randn(1, 3, dtype=torch.float64, requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", td.ConvergenceWarning)
        z = model(x)[1][-1]
        loss = z.sum() + model.solution.aux_loss
        loss.backward()
    assert z.shape == (1, 3) and torch.isfinite(z).all() and model.solution.converged
    assert torch.isfinite(x.grad).all() and all(torch.isfinite(p.grad).all() for p in layer.parameters())


# ---------------------------------------------------------------- property test
class _RandomLayer(nn.Module):
    def __init__(self, W, U):
        super().__init__()
        self.W, self.U = nn.Parameter(W), nn.Parameter(U)

    def forward(self, z, x):
        return torch.tanh(z @ self.W.T + x @ self.U.T)


@st.composite
def _problems(draw):
    batch, d, m = draw(st.integers(1, 4)), draw(st.integers(1, 5)), draw(st.integers(1, 5))
    seed = draw(st.integers(0, 2**31 - 1))
    norm = draw(st.floats(0.05, 0.89))
    gen = torch.Generator().manual_seed(seed)
    W = torch.randn(d, d, generator=gen, dtype=torch.float64)
    W = W * norm / torch.linalg.matrix_norm(W, ord=2).clamp_min(1e-12)
    U = torch.randn(d, m, generator=gen, dtype=torch.float64)
    x = torch.randn(batch, m, generator=gen, dtype=torch.float64)
    solver = draw(st.sampled_from(["tsit5", "vcab3", "anderson", "broyden"]))
    return W, U, x, solver


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_problems())
def test_property_steady_state_and_implicit_gradients(problem):
    W, U, x, solver = problem
    d = W.shape[0]
    atol = rtol = 1e-6
    layer = _RandomLayer(W.clone(), U.clone())
    model = td.DEQ(layer, solver=solver, atol=atol, rtol=rtol, state_shape=(d,), max_steps=2000,
                   on_failure="raise")  # VCAB3 needs ~300 steps at 1e-6 on slow (rho ~ 0.9) layers
    z = model(x)[1][-1].detach()
    # (a) the reported steady state meets the tolerance, sample by sample
    res = scaled_residual(layer(z, x) - z, z, atol, rtol)
    assert res.shape == (x.shape[0],) and bool((res <= 1).all()), res

    # (b) implicit gradients = backprop through the solver, at tight tolerances. Root solvers
    # only: VCAB3 takes thousands of steps at 1e-10.
    solver = {"tsit5": "anderson", "vcab3": "broyden"}.get(solver, solver)
    def grads(sensitivity):
        lay = _RandomLayer(W.clone(), U.clone())
        xx = x.clone().requires_grad_()
        kw = dict(atol_adjoint=1e-14, rtol_adjoint=1e-12) if sensitivity == "steady_state" else {}
        mod = td.DEQ(lay, solver=solver, atol=1e-10, rtol=1e-10, state_shape=(d,), max_steps=500,
                     sensitivity=sensitivity, on_failure="raise", **kw)
        zz = mod(xx)[1][-1]
        weights = torch.linspace(-1, 1, zz.numel(), dtype=zz.dtype).view_as(zz)
        return torch.autograd.grad((zz * weights).sum() + zz.pow(2).sum(), [lay.W, lay.U, xx])

    for g_imp, g_ref in zip(grads("steady_state"), grads("autograd")):
        torch.testing.assert_close(g_imp, g_ref, atol=1e-6, rtol=1e-6)


def test_tsit5_reaches_a_tight_tolerance_on_a_contractive_layer():
    """g = f - z has an eigenvalue near -1.8: max_step=2.0 is outside tsit5's stability region
    there and, at 1e-10, the error control cannot see it (it stalled for 3001 NFE). The step
    cap halves when a step taken at the cap makes the residual grow."""
    W = torch.tensor([[0.2740, -0.1562], [-0.2232, -0.8417]], dtype=torch.float64)
    U = torch.tensor([[1.0445], [-0.6332]], dtype=torch.float64)
    x = torch.tensor([[0.5731]], dtype=torch.float64)
    assert float(torch.linalg.matrix_norm(W, ord=2)) < 0.9
    model = td.DEQ(_RandomLayer(W, U), atol=1e-10, rtol=1e-10, state_shape=(2,), max_steps=500,
                   on_failure="raise")
    with torch.no_grad():
        model(x)


@pytest.mark.parametrize("solver", [td.VCAB3(), td.ODESteadyStateSolver("tsit5"), td.ODESteadyStateSolver("euler"),
                                    td.AndersonAcceleration(), td.BroydenSolver()], ids=repr)
def test_no_steady_state_ends_with_its_result_code_within_the_budget(solver):
    """dz/dt = 1 never settles: the state grows (adaptive steps grow with it) or, at a fixed
    step, the residual never falls. Either way the solve ends within its budget with a code
    that says so, never 'max_steps' (whose remedy, more steps, would not help)."""
    z0 = torch.zeros(2, 3, dtype=torch.float64)
    sol = steady_state_solve(lambda t, z: torch.ones_like(z), z0, solver, SolveOptions(1e-3, 0.0, 3000))
    assert sol.result in (td.Result.diverged, td.Result.stalled) and not sol.converged, sol.result
    assert sol.iterations < 3000 and math.isfinite(sol.t)
    assert "More steps will not help" in sol.message or "stopped falling" in sol.message


@pytest.mark.parametrize("lam, tol", [(3.0, 1e-8), (6.0, 1e-6), (6.0, 1e-10), (60.0, 1e-10)])
def test_tsit5_does_not_stall_on_a_stiff_field(lam, tol):
    """dz/dt = -lam (z - 1): tsit5 is stable for lam dt < ~3.5. With the step tolerance floored
    at 1e-6, error control alone let the step hover at that boundary (3000 steps, 643
    rejected, residual stuck at 1e2-1e4); the estimated stability limit keeps it inside."""
    sol = steady_state_solve(lambda t, z: -lam * (z - 1.0), torch.zeros(2, 3, dtype=torch.float64),
                                td.ODESteadyStateSolver("tsit5"), SolveOptions(tol, tol, 200))
    assert sol.converged and sol.iterations < 60, (sol.iterations, sol.steps_rejected)
    torch.testing.assert_close(sol.z_star, torch.ones(2, 3, dtype=torch.float64), rtol=0, atol=20 * tol)


def test_a_sample_converged_to_residual_zero_does_not_stall_the_others():
    """Found by the property test: one sample reached residual exactly 0 while another was still
    converging slowly (5x per 11 time units); 0 / 0 in the progress ratio read as no progress
    and the solve was reported 'stalled' at t = 55."""
    W = torch.tensor([[0.8750]], dtype=torch.float64)
    U = torch.tensor([[-1.2962]], dtype=torch.float64)
    x = torch.tensor([[-0.5457], [0.0179], [-1.3134]], dtype=torch.float64)
    model = td.DEQ(_RandomLayer(W, U), solver="vcab3", atol=1e-6, rtol=1e-6, state_shape=(1,), max_steps=2000,
                   on_failure="raise")
    with torch.no_grad():
        model(x)
    assert model.solution.converged
