"""'vcab3' in torchdyn's own finite-time odeint: matches dopri5, history per solve, rejected steps."""
import copy

import pytest
import torch
import torch.nn as nn
from torchdyn.core import NeuralODE
from torchdyn.numerics import odeint

import torchdyn_deq as td


def field(t, x):
    """A non-autonomous, nonlinear field."""
    return -0.5 * x + torch.sin(2 * t) * torch.tanh(x.flip(-1))


class Counting(td.VCAB3Stepper):
    """Counts how each step call relates to the previous one."""

    def __init__(self, dtype=torch.float32):
        super().__init__(dtype)
        self.starts = self.retries = self.continued = 0

    def _remember(self, x, t, k1):
        if x is self._x_new and t == self._t_new:
            self.continued += 1
        elif x is self._x and self._times and t == self._times[0]:
            self.retries += 1
        else:
            self.starts += 1
        super()._remember(x, t, k1)


@pytest.mark.parametrize("points", [2, 7])
def test_matches_dopri5_on_a_finite_interval(points):
    torch.manual_seed(0)
    x0 = torch.randn(5, 4, dtype=torch.float64)
    t_span = torch.linspace(0, 3, points, dtype=torch.float64)
    _, ref = odeint(field, x0, t_span, "dopri5",
                    atol=1e-10, rtol=1e-10)
    for tol, bound in ((1e-5, 1e-3), (1e-8, 1e-6)):
        t_eval, sol = odeint(field, x0, t_span, td.VCAB3Stepper(torch.float64), atol=tol, rtol=tol)
        assert sol.shape == ref.shape
        torch.testing.assert_close(t_eval, t_span)
        assert float((sol - ref).abs().max()) < bound


def test_by_name_in_odeint_and_neural_ode():
    torch.manual_seed(1)
    x0 = torch.randn(3, 4)
    _, by_name = odeint(field, x0, torch.linspace(0, 1, 2), "vcab3", atol=1e-6, rtol=1e-6)
    _, ref = odeint(field, x0, torch.linspace(0, 1, 2), "dopri5", atol=1e-7, rtol=1e-7)
    assert float((by_name - ref).abs().max()) < 1e-4
    f = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 4))
    grads = []
    for solver in ("vcab3", "dopri5"):
        model = NeuralODE(f, solver=solver, sensitivity="adjoint", atol=1e-6, rtol=1e-6, atol_adjoint=1e-6,
                          rtol_adjoint=1e-6)
        f.zero_grad()
        model(x0, torch.linspace(0, 1, 2))[1][-1].pow(2).sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in f.parameters()]))
    torch.testing.assert_close(grads[0], grads[1], atol=1e-3, rtol=1e-3)


def test_rejected_steps_never_enter_the_history_and_each_solve_starts_afresh():
    torch.manual_seed(2)
    stepper = Counting(torch.float64)
    x0 = torch.randn(4, 4, dtype=torch.float64)
    t_span = torch.linspace(0, 4, 2, dtype=torch.float64)
    # a tight tolerance from a large first step: the loop rejects steps, which it never reports
    _, first = odeint(lambda t, x: 10 * field(t, x), x0, t_span, stepper, atol=1e-9, rtol=1e-9)
    assert stepper.retries > 0 and stepper.starts == 1 and stepper.continued > 10
    x1 = torch.randn(4, 4, dtype=torch.float64)
    _, second = odeint(field, x1, t_span, stepper, atol=1e-7, rtol=1e-7)
    assert stepper.starts == 2
    _, fresh = odeint(field, x1, t_span, td.VCAB3Stepper(torch.float64), atol=1e-7, rtol=1e-7)
    torch.testing.assert_close(second, fresh, rtol=0, atol=0)  # nothing of the first solve is left


def test_backprop_through_the_steps_and_deepcopy():
    torch.manual_seed(3)
    f = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 4))
    model = NeuralODE(f, solver="vcab3", sensitivity="autograd", atol=1e-5, rtol=1e-5)
    x = torch.randn(3, 4, requires_grad=True)
    model(x, torch.linspace(0, 1, 2))[1][-1].sum().backward()
    assert x.grad.abs().sum() > 0
    clone = copy.deepcopy(model.solver)  # history held tensors with graphs: not copied
    assert clone._evals == [] and isinstance(clone, td.VCAB3Stepper)
