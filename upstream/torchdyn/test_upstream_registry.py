"""The tests the upstream pull request adds to torchdyn (``test/test_registry.py``).

They import torchdyn's registry when torchdyn has one, else this repository's copy of the
same module (``registry.py`` here is a link to ``torchdyn_deq/_torchdyn_registry.py``), whose
call sites the torchdyn-deq shim provides. No torchdyn-deq name is used below that line.
"""
import warnings

import pytest
import torch
import torch.nn as nn
from torchdyn.core import NeuralODE, ODEProblem
from torchdyn.numerics import odeint
from torchdyn.numerics.solvers.ode import SOLVER_DICT, Euler

try:
    from torchdyn.numerics import registry
except ImportError:  # today's torchdyn: the plugin installs the call sites of the proposal
    import torchdyn_deq  # noqa: F401
    from torchdyn_deq import _torchdyn_registry as registry

INF = torch.tensor([0., float('inf')])


@pytest.fixture
def restore():
    sensitivities, solvers, steady = dict(registry._SENSITIVITIES), dict(SOLVER_DICT), dict(registry._STEADY_STATE)
    yield
    registry._SENSITIVITIES.clear()
    registry._SENSITIVITIES.update(sensitivities)
    registry._STEADY_STATE.clear()
    registry._STEADY_STATE.update(steady)
    SOLVER_DICT.clear()
    SOLVER_DICT.update(solvers)


class Heun(Euler):
    def step(self, f, x, t, dt, k1=None, args=None):
        k1 = f(t, x) if k1 is None else k1
        return None, x + 0.5 * dt * (k1 + f(t + dt, x + dt * k1)), None


def damped(t, x, args=None):
    return -(x - 1.)


def test_register_solver(restore):
    registry.register_solver('heun', Heun)
    registry.register_solver('heun', Heun)  # idempotent
    assert registry.solver_class('heun') is Heun and 'heun' in registry.solver_names()
    _, sol = odeint(lambda t, x: -x, torch.ones(1, 1), torch.linspace(0, 1, 51), 'heun')
    assert abs(float(sol[-1]) - 0.36788) < 1e-3
    with pytest.raises(ValueError, match='own solvers'):
        registry.register_solver('euler', Heun, overwrite=True)
    with pytest.raises(ValueError, match='already registered'):
        registry.register_solver('heun', Euler)
    registry.register_solver('heun', Euler, overwrite=True)
    with pytest.raises(ValueError, match="unknown solver 'nope'.*'dopri5'"):
        registry.solver_class('nope')
    with pytest.raises(TypeError):
        registry.register_solver('', Heun)


def test_register_sensitivity_and_dispatch(restore):
    seen = []

    def factory(problem):
        def solve(vf_params, x, t_span, save_at, args):
            seen.append(problem.sensalg)
            return odeint(problem.vf, x, t_span, problem.solver)
        return solve

    registry.register_sensitivity('plain', factory)
    assert 'plain' in registry.sensitivity_names()
    model = NeuralODE(nn.Linear(2, 2), sensitivity='plain')
    model(torch.randn(3, 2), torch.linspace(0, 1, 2))
    assert seen == ['plain']
    with pytest.raises(ValueError, match='own sensitivities'):
        registry.register_sensitivity('adjoint', factory)
    with pytest.raises(ValueError, match='already registered'):
        registry.register_sensitivity('plain', lambda p: None)


def test_sensitivity_names_are_validated_at_construction():
    with pytest.raises(ValueError, match="unknown sensitivity 'ajoint'; valid names: torchdyn's 'autograd', 'adjoint', "
                                         "'interpolated_adjoint'"):
        ODEProblem(nn.Linear(2, 2), 'tsit5', sensitivity='ajoint')
    assert registry.check_sensitivity('adjoint') == 'adjoint'
    with pytest.raises(ValueError):
        registry.check_sensitivity('plain', names=registry.BUILTIN_SENSITIVITIES)
    with pytest.raises(TypeError):
        registry.check_sensitivity(None)


def test_steady_state_spans():
    assert registry.is_steady_state_span(INF)
    assert not registry.is_steady_state_span(torch.linspace(0, 1, 3))
    for bad in ([0., 1., float('inf')], [float('inf'), 0.], [0., float('nan')], [0., -float('inf')]):
        with pytest.raises(ValueError):
            registry.is_steady_state_span(torch.tensor(bad))


def test_odeint_steady_state_is_the_registered_solve(restore):
    x0 = torch.zeros(4, 3)
    calls = []

    def solve(f, x, t_span, solver, atol, rtol, max_steps, args):  # a stand-in: one Euler step of 1
        calls.append((solver, atol, rtol, max_steps))
        return t_span[:1].repeat(2), torch.stack([x, x + f(t_span[:1], x)])

    registry._STEADY_STATE.clear()
    with pytest.raises(ValueError, match='none is registered'):
        registry.odeint_steady_state(damped, x0, INF, 'dopri5')
    registry.register_steady_state(solve)
    registry.register_steady_state(solve)  # idempotent
    with pytest.raises(ValueError, match='already registered'):
        registry.register_steady_state(lambda *a: None)
    t_eval, sol = registry.odeint_steady_state(damped, x0, INF, 'dopri5', atol=1e-6, rtol=1e-5, max_steps=7)
    assert calls == [('dopri5', 1e-6, 1e-5, 7)] and sol.shape == (2, 4, 3) and float((sol[-1] - 1).abs().max()) == 0
    with pytest.raises(ValueError, match='max_steps'):
        registry.odeint_steady_state(damped, x0, INF, 'dopri5', max_steps=0)
    with pytest.raises(ValueError, match=r'\[t0, inf\]'):
        registry.odeint_steady_state(damped, x0, torch.linspace(0, 1, 2), 'dopri5')


def test_problem_to_infinity_with_torchdyns_own_sensitivities():
    torch.manual_seed(0)
    f = nn.Sequential(nn.Linear(2, 2), nn.Tanh())
    model = NeuralODE(lambda t, x, args=None: f(x) - x, solver='tsit5', atol=1e-6, rtol=1e-6)
    x = torch.randn(3, 2)
    t_eval, sol = model(x, INF)
    sol[-1].sum().backward()  # backpropagation through the steps
    # against the closed form at the steady state z* = tanh(W z* + b) (the transient has decayed):
    # d sum(z*) / dW = sum_i (D_i l_i) z_i^T, l_i = (I - W^T D_i)^-1 1, D_i = diag(1 - z_i^2)
    with torch.no_grad():
        z, W = sol[-1], f[0].weight
        D = 1 - z ** 2
        lam = torch.linalg.solve(torch.eye(2) - W.T[None] * D[:, None, :], torch.ones(3, 2))
        exact = ((D * lam)[:, :, None] * z[:, None, :]).sum(0)
    torch.testing.assert_close(f[0].weight.grad, exact, rtol=1e-3, atol=1e-5)
    with torch.no_grad():
        assert float((f(sol[-1]) - sol[-1]).abs().max()) < 1e-5
    model.max_steps = 1
    with pytest.warns(UserWarning):  # the registered solve reports the budget
        model(x, INF)
    with pytest.raises(ValueError, match="sensitivity='autograd'"):
        NeuralODE(f, sensitivity='adjoint')(x, INF)
    with pytest.raises(ValueError, match='save_at'):
        registry.problem_steady_state(NeuralODE(f), x, INF, save_at=torch.tensor([1.]))
    finite = NeuralODE(f, sensitivity='adjoint')(x, torch.linspace(0, 1, 2))  # unchanged for a finite end
    assert finite[1].shape == (2, 3, 2)
