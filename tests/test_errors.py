"""Every user error gets a clear message; non-convergence is never silent; nothing hangs."""
import warnings

import pytest
import torch
import torch.nn as nn

import torchdyn_deq as td


@pytest.mark.parametrize("kwargs, error, match", [
    ({"solver": "rk45"}, ValueError, "unknown solver 'rk45'.*'tsit5'.*'anderson'"),
    ({"solver": 3}, TypeError, "solver must be"),
    ({"sensitivity": "adjoint"}, ValueError, "unknown sensitivity 'adjoint'.*backsolve.*'steady_state', 'autograd'"),
    ({"sensitivity": "magic"}, ValueError, "valid: 'steady_state', 'autograd'"),
    ({"atol": -1e-3}, ValueError, "atol must be"),
    ({"rtol": float("nan")}, ValueError, "rtol must be"),
    ({"atol": 0}, ValueError, "atol must be positive"),
    ({"atol": 0, "rtol": 0}, ValueError, "atol must be positive"),
    ({"rtol_adjoint": -1.0}, ValueError, "rtol_adjoint must be"),
    ({"max_steps": 0}, ValueError, "max_steps must be a positive integer"),
    ({"on_failure": "ignore"}, ValueError, "on_failure='ignore' is not one of"),
    ({"initializer": "skip"}, ValueError, "SkipInitializer\\(predictor\\)"),
    ({"initializer": "ones"}, ValueError, "valid: 'zeros', 'input', 'skip_reg'"),
    ({"order": 2}, ValueError, "order=2: the DEQ form dz/dt = f\\(z, x\\) - z is first order"),
    ({"solver_adjoint": "tsit5"}, ValueError, "solver_adjoint='tsit5' is not supported"),
    ({"jacobian_penalty": 1.0}, TypeError, "JacobianPenalty"),
])
def test_bad_options(layer, kwargs, error, match):
    with pytest.raises(error, match=match):
        td.DEQ(layer, **kwargs)


def test_bad_solver_options():
    with pytest.raises(ValueError, match="max_step"):
        td.ODESteadyStateSolver("tsit5", max_step=-1)
    with pytest.raises(ValueError, match="unknown torchdyn solver"):
        td.ODESteadyStateSolver("tsit6")
    with pytest.raises(ValueError, match="memory"):
        td.AndersonAcceleration(memory=0)
    with pytest.raises(ValueError, match="damping"):
        td.FixedPointIteration(damping=1.5)
    with pytest.raises(ValueError, match="weight"):
        td.SkipRegInitializer(weight=-1)
    with pytest.raises(ValueError, match="n_probes"):
        td.JacobianPenalty(n_probes=0)
    with pytest.raises(TypeError, match="linear_solver"):
        td.SteadyStateSensitivity("gmres")


@pytest.mark.parametrize("x, error, match", [
    (torch.full((2, 2), float("nan")), ValueError, "NaN or inf"),
    (torch.tensor([[1.0, float("inf")]]), ValueError, "NaN or inf"),
    (torch.zeros(0, 2), ValueError, "non-empty batch"),
    (torch.zeros((), dtype=torch.float64), ValueError, "non-empty batch"),
    (torch.zeros(2, 2, dtype=torch.long), TypeError, "floating-point"),
    ([[1.0, 2.0]], TypeError, "torch.Tensor"),
])
def test_bad_inputs(layer, x, error, match):
    model = td.DEQ(layer, state_shape=(3,))
    with pytest.raises(error, match=match):
        model(x)


def test_vector_field_with_wrong_shape_or_dtype():
    with pytest.raises(ValueError, match="returned \\(4, 3\\) for a state of shape \\(4, 2\\)"):
        td.InfiniteTimeNeuralODE(nn.Linear(2, 3))(torch.randn(4, 2))
    with pytest.raises(TypeError, match="dtype torch.float64"):
        td.InfiniteTimeNeuralODE(lambda x: -x.double())(torch.randn(4, 2))
    with pytest.raises(ValueError, match="per-sample shape \\(2,\\) and the state \\(3,\\)"):
        td.InfiniteTimeNeuralODE(lambda x: -x, state_shape=(3,))(torch.randn(4, 2))


@pytest.mark.parametrize("solver", ["tsit5", "euler", "anderson", "broyden"])
def test_nan_appearing_during_the_solve(solver):
    class Poisoned(nn.Module):
        calls = 0

        def forward(self, z, x):
            Poisoned.calls += 1
            out = torch.tanh(z + x)
            return out * float("nan") if Poisoned.calls > 3 else out

    with pytest.raises(td.NonFiniteError, match="non-finite values appeared"):
        td.DEQ(Poisoned(), solver=solver)(torch.randn(4, 2))


SOLVERS = ["tsit5", "dopri5", "vcab3", "rk4", "euler", "anderson", "broyden", "fixed_point"]


@pytest.mark.parametrize("solver", SOLVERS)
def test_field_without_fixed_point_is_reported_not_hung(solver):
    # f(z, x) = z + 1 + x^2: g = f - z never vanishes. rtol=0: with a relative tolerance a
    # bounded g counts as converged once |z| is large enough (Broyden jumps there at once).
    # float64: in float32 Broyden reaches |z| ~ 1e8, where z + 1 - z == 0 is a true fixed point.
    model = td.DEQ(lambda z, x: z + 1 + x**2, solver=solver, max_steps=60, atol=1e-3, rtol=0, on_failure="raise")
    with pytest.raises(td.ConvergenceError, match="diverged|stalled"):
        model(torch.randn(4, 2, dtype=torch.float64))
    assert model.solution.result in (td.Result.diverged, td.Result.stalled) and model.solution.iterations <= 60


@pytest.mark.parametrize("solver", SOLVERS)
def test_repelling_fixed_point(solver):
    # f(z, x) = 1.5 z + x: spectral radius 1.5. The flow and plain iteration run away (reported
    # as diverged, with a remedy that is not "more steps"); Anderson and Broyden are root
    # solvers and find the repelling fixed point z = -2x.
    model = td.DEQ(lambda z, x: 1.5 * z + x, solver=solver, max_steps=60, on_failure="raise")
    x = torch.randn(4, 2)
    if solver in ("anderson", "broyden"):
        torch.testing.assert_close(model(x)[1][-1], -2 * x, atol=1e-2, rtol=1e-2)
    else:
        with pytest.raises(td.ConvergenceError, match="diverged.*More steps will not help"):
            model(x)
        assert model.solution.result is td.Result.diverged


def test_non_convergence_warns_with_residual_and_fix(layer):
    model = td.DEQ(layer, state_shape=(3,), atol=1e-12, rtol=1e-12, max_steps=2)
    with pytest.warns(td.ConvergenceWarning, match=r"max_steps=2 .*worst scaled residual .*raise max_steps"):
        z = model(torch.randn(4, 2, dtype=torch.float64))[1][-1]
    assert torch.isfinite(z).all() and not model.solution.converged and model.solution.reason == "max_steps"
    model.on_failure = "raise"
    with pytest.raises(td.ConvergenceError, match="worst scaled residual"):
        model(torch.randn(4, 2, dtype=torch.float64))


def test_converged_solve_is_quiet(layer):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        td.DEQ(layer, state_shape=(3,))(torch.randn(4, 2, dtype=torch.float64))[1][-1].sum().backward()


def test_backward_linear_solve_failure_is_reported(layer):
    sens = td.SteadyStateSensitivity(td.GMRES(rtol=1e-14, atol=0.0, max_iters=1), on_failure="warn")
    model = td.DEQ(layer, state_shape=(3,), sensitivity=sens)
    z = model(torch.randn(4, 2, dtype=torch.float64))[1][-1]
    with pytest.warns(td.ConvergenceWarning, match="backward linear solve .* relative residual"):
        z.sum().backward()
    sens.on_failure = "raise"
    z = model(torch.randn(4, 2, dtype=torch.float64))[1][-1]
    with pytest.raises(td.ConvergenceError, match="gradients are inaccurate"):
        z.sum().backward()


def test_save_at_refused(layer):
    with pytest.raises(ValueError, match="save_at"):
        td.DEQ(layer, state_shape=(3,))(torch.randn(2, 2, dtype=torch.float64), save_at=torch.tensor([0.5]))
