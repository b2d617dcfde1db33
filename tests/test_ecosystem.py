"""The models among torchdyn's and PyTorch's building blocks: nn.Sequential, DataControl,
DepthCat, Augmenter (save / load: tests/test_serialization.py)."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
from torchdyn.nn import Augmenter, DataControl, DepthCat

import torchdyn_deq as td


@pytest.fixture(autouse=True)
def seeded():
    torch.manual_seed(0)


class Field(nn.Module):
    """dz/dt = tanh(W z) - z on R^d."""

    def __init__(self, d: int):
        super().__init__()
        self.lin = nn.Linear(d, d)

    def forward(self, t, z, args=None):
        return torch.tanh(self.lin(z)) - z


class Last(nn.Module):
    """Keeps the final state of a (t, batch, ...) trajectory."""

    def forward(self, trajectory):
        return trajectory[-1]


class Layer(nn.Module):
    def __init__(self, d: int = 4):
        super().__init__()
        self.lin = nn.Linear(d, d)

    def forward(self, z, x):
        return torch.tanh(self.lin(z) + x)


# ---------------------------------------------------------------------------- nn.Sequential
@pytest.mark.parametrize("make", [lambda: td.InfiniteTimeNeuralODE(Field(4), return_t_eval=False),
                                  lambda: td.DEQ(Layer(4), return_t_eval=False)], ids=["node", "deq"])
def test_in_sequential(make):
    model = nn.Sequential(nn.Linear(3, 4), make(), Last(), nn.Linear(4, 2))
    x = torch.randn(5, 3)
    out = model(x)
    assert out.shape == (5, 2)
    out.sum().backward()
    assert model[1].solution.converged
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model[1].parameters())
    if isinstance(model[1], td.DEQ):  # the input is injected: the encoder learns
        assert model[0].weight.grad.abs().sum() > 0
    else:  # z0 = x only: the steady state of dz/dt = tanh(W z) - z does not depend on x
        assert model[0].weight.grad is None or not model[0].weight.grad.any()


def test_return_t_eval_false_returns_the_trajectory():
    model = td.InfiniteTimeNeuralODE(Field(4), return_t_eval=False)
    sol = model(torch.randn(5, 4))
    assert isinstance(sol, torch.Tensor) and sol.shape == (2, 5, 4)


# ---------------------------------------------------------------------------- DataControl
class Controlled(nn.Module):
    def __init__(self, d: int = 4):
        super().__init__()
        self.net = nn.Sequential(DataControl(), nn.Linear(2 * d, d), nn.Tanh())

    def forward(self, z):
        return self.net(z) - z


def test_data_control_gets_the_input_and_its_gradient():
    field = Controlled()
    model = td.InfiniteTimeNeuralODE(field, initializer="zeros")
    x = torch.randn(5, 4, requires_grad=True)
    _, sol = model(x)
    z = sol[-1]
    # the steady state satisfies z = tanh(W [z, x] + b)
    assert torch.allclose(z, field.net[1:](torch.cat([z, x], 1)), atol=1e-2)
    z.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    # against finite differences of the steady state
    x2 = x.detach().clone()
    x2[0, 0] += 1e-2
    with torch.no_grad():
        model_tight = td.InfiniteTimeNeuralODE(field, initializer="zeros", atol=1e-5, rtol=1e-5,
                                                 on_failure="raise")
        delta = model_tight(x2)[1][-1].sum() - model_tight(x.detach())[1][-1].sum()
    assert abs(float(delta) / 1e-2 - float(x.grad[0, 0])) < 2e-2


def test_data_control_inside_a_deq_layer():
    class F(nn.Module):
        def __init__(self):
            super().__init__()
            self.control, self.lin = DataControl(), nn.Linear(8, 4)

        def forward(self, z, x):  # x is also what DataControl sees
            return torch.tanh(self.lin(self.control(z))) * 0.5 + 0.5 * x

    model = td.DEQ(F())
    x = torch.randn(5, 4, requires_grad=True)
    _, sol = model(x)
    sol[-1].sum().backward()
    assert model.solution.converged and x.grad.abs().sum() > 0


# ---------------------------------------------------------------------------- DepthCat
class TimeField(nn.Module):
    """dz/dt = tanh(W z + exp(-t) c) - z: depends on t through DepthCat and settles as t grows."""

    def __init__(self, d: int = 4):
        super().__init__()
        self.depth, self.lin, self.c = DepthCat(1), nn.Linear(d, d), nn.Linear(1, d, bias=False)
        self.seen = []

    def forward(self, z):
        zt = self.depth(z)
        t = zt[:, -1:]
        self.seen.append(float(t[0, 0].detach()))
        return torch.tanh(self.lin(zt[:, :-1]) + self.c(torch.exp(-t))) - z


def test_depthcat_sees_the_solver_time():
    field = TimeField()
    model = td.InfiniteTimeNeuralODE(field, initializer="zeros")
    t_eval, sol = model(torch.randn(5, 4))
    assert model.solution.converged
    assert field.seen[0] == 0.0 and max(field.seen) > 1.0
    assert max(field.seen) == pytest.approx(float(t_eval[-1]), rel=1e-5)
    sol[-1].sum().backward()
    # c enters through exp(-t): at the steady state (t = t*) its gradient is the implicit function
    # theorem's at t*, d sum(z*) / dc = sum_i e D_i (I - W^T D_i)^-1 1 with e = exp(-t*),
    # D_i = diag(1 - tanh(a_i)^2): a backward evaluated at another time would be off by exp(t*)
    with torch.no_grad():
        z, e, W = sol[-1], math.exp(-float(t_eval[-1])), field.lin.weight
        D = 1 - torch.tanh(field.lin(z) + e * field.c.weight[:, 0]) ** 2
        lam = torch.linalg.solve(torch.eye(4) - W.T[None] * D[:, None, :], torch.ones(5, 4))
    torch.testing.assert_close(field.c.weight.grad[:, 0], (e * D * lam).sum(0), rtol=1e-3, atol=0)


# ---------------------------------------------------------------------------- Augmenter
def test_augmenter_in_front():
    tight = dict(atol=1e-6, rtol=1e-6, max_steps=500)
    model = nn.Sequential(Augmenter(augment_idx=1, augment_dims=2),
                          td.InfiniteTimeNeuralODE(Field(6), return_t_eval=False, **tight), Last())
    x = torch.randn(5, 4, requires_grad=True)
    z = model(x)
    assert z.shape == (5, 6)
    z.sum().backward()
    assert model[1].solution.converged
    # z0 = [x, 0, 0] only: the steady state of tanh(W z) - z forgets it, so the implicit gradient of x
    # is exactly 0, while the field's parameters get backprop-through-the-solver's gradient
    assert x.grad is not None and not x.grad.any()
    through = nn.Sequential(Augmenter(augment_idx=1, augment_dims=2),
                            td.InfiniteTimeNeuralODE(Field(6), return_t_eval=False, sensitivity="autograd", **tight),
                            Last())
    through.load_state_dict(model.state_dict())
    through(x.detach()).sum().backward()
    for p, q in zip(model[1].parameters(), through[1].parameters()):
        assert p.grad.abs().sum() > 0
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-3, atol=1e-4)


def test_augmenter_with_a_deq():
    layer = Layer(6)
    model = nn.Sequential(Augmenter(augment_idx=1, augment_dims=2), td.DEQ(layer, return_t_eval=False), Last())
    x = torch.randn(5, 4)
    z = model(x)
    x_aug = torch.cat([torch.zeros(5, 2), x], 1)  # Augmenter prepends zeros (order='first')
    assert torch.equal(model[0](x), x_aug)
    assert z.shape == (5, 6)
    assert torch.allclose(z, layer(z, x_aug), atol=1e-2)
