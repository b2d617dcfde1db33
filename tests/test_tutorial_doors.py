"""torchdyn's tutorials through both doors (InfiniteTimeNeuralODE, NeuralODE by name): the first
message names the cause; hypersolvers are submodules; order=2 is one answer; trajectory() is
torchdyn's, for its plots."""
import os
import warnings

import pytest
import torch
import torch.nn as nn
from torchdyn.core import NeuralODE
from torchdyn.nn import DataControl
from torchdyn.numerics import HyperEuler

import torchdyn_deq as td

INF = torch.tensor([0.0, float("inf")])


def _messages(run):
    """The package's messages in order: its warnings, then the error that ended ``run`` (if any)."""
    out = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            run()
        except (td.ConvergenceError, td.NonFiniteError) as error:
            caught.append(warnings.WarningMessage(error, type(error), "", 0))
    for w in caught:
        if issubclass(w.category, (td.ConvergenceWarning, td.ConvergenceError, td.NonFiniteError)):
            out.append(str(w.message))
    return out


def _quickstart():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(2, 16), nn.Tanh(), nn.Linear(16, 2))  # no -z, no injected input


@pytest.mark.parametrize("door", ["InfiniteTimeNeuralODE", "NeuralODE"])
def test_quickstart_field_first_message_names_the_missing_equilibrium(door):
    f, x = _quickstart(), torch.randn(64, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchdyn's own notice about the wrapped signature
        model = td.InfiniteTimeNeuralODE(f) if door == "InfiniteTimeNeuralODE" else NeuralODE(f, sensitivity="steady_state")

    def run():
        _, sol = model(x) if door == "InfiniteTimeNeuralODE" else model(x, INF)
        sol[-1].pow(2).mean().backward()

    messages = _messages(run)
    assert messages, "a field with no equilibrium passed silently"
    assert messages[0].startswith("no equilibrium") and "f(z, x) - z" in messages[0] and "injected" in messages[0]


def test_backward_after_an_unconverged_forward_names_it_first():
    torch.manual_seed(1)
    lin, inj = nn.Linear(4, 4), nn.Linear(2, 4)
    model = td.DEQ(lambda z, x: torch.tanh(lin(z) + inj(x)), state_shape=(4,), max_steps=1, atol=1e-9, rtol=1e-9)
    x = torch.randn(3, 2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        z = model(x)[1][-1]
        forward = [str(w.message) for w in caught]
        z.sum().backward()
        backward = [str(w.message) for w in caught][len(forward):]
    assert "max_steps=1" in forward[0]
    assert backward[0].startswith("the backward pass differentiates a forward solve that did not converge (max_steps)")
    assert "max_steps=1" in backward[0] and lin.weight.grad is not None  # warned, then the gradient as asked


def test_hypersolver_is_a_registered_submodule_that_trains_saves_and_moves():
    torch.manual_seed(2)

    class Hypernet(nn.Module):  # torchdyn's hypersolvers call hypernet(t, x)
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 3)

        def forward(self, t, x):
            return 0.1 * torch.tanh(self.lin(x))

    hypernet = Hypernet()

    class Field(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 3)

        def forward(self, t, z, args=None):
            return torch.tanh(self.lin(z)) - z

    model = td.InfiniteTimeNeuralODE(Field(), solver=HyperEuler(hypernet), sensitivity="autograd", max_steps=300)
    reference = NeuralODE(Field(), solver=HyperEuler(Hypernet()))
    names = {n for n, _ in model.named_parameters()}
    assert {n for n, _ in reference.named_parameters() if n.startswith("solver.")} <= names
    assert "solver.hypernet.lin.weight" in model.state_dict()
    _, sol = model(torch.randn(5, 3))
    sol[-1].pow(2).sum().backward()
    assert float(hypernet.lin.weight.grad.abs().sum()) > 0  # trained through the steps
    model.double()
    assert hypernet.lin.weight.dtype == torch.float64  # moved with the model


class Damped(nn.Module):
    """q'' = -k (q - b(x)) - c q': a damped second-order system; its steady state q* = b(x), q' = 0."""

    def __init__(self):
        super().__init__()
        self.inject = nn.Sequential(DataControl(), nn.Linear(12, 3))  # DataControl: [q, q', x]
        self.k, self.c = 2.0, 1.5
        nn.init.normal_(self.inject[1].weight, std=0.1)  # q -> b(q, x) contractive

    def forward(self, t, z, args=None):
        q, p = z[:, :3], z[:, 3:]
        return -self.k * (q - self.inject(z)) - self.c * p


def test_order_2_is_the_steady_state_of_the_second_order_system_on_both_doors():
    torch.manual_seed(3)
    field = Damped().double()
    x = torch.randn(4, 6, dtype=torch.float64)
    tol = dict(atol=1e-8, rtol=1e-8)
    ours = td.InfiniteTimeNeuralODE(field, order=2, max_steps=500, **tol)
    theirs = NeuralODE(field, order=2, sensitivity="steady_state", **tol)
    theirs.max_steps = 500
    a, b = ours(x)[1][-1], theirs(x, INF.double())[1][-1]
    assert ours.solution.converged and theirs.solution.converged
    torch.testing.assert_close(a, b)
    # q* = b(q*, 0, x) solved in closed form for the linear injection: p* = 0
    assert float(a[:, 3:].abs().max()) < 1e-6
    with torch.no_grad():
        assert float((a[:, :3] - field.inject(torch.cat([a[:, :3], torch.zeros_like(a[:, :3])], 1))).abs().max()) < 1e-6
    ga = torch.autograd.grad(a[:, :3].sum(), field.inject[1].weight)[0]
    gb = torch.autograd.grad(theirs(x, INF.double())[1][-1][:, :3].sum(), field.inject[1].weight)[0]
    torch.testing.assert_close(ga, gb)


def test_trajectory_is_torchdyns_over_finite_times_and_plots():
    os.environ.setdefault("MPLBACKEND", "Agg")
    import matplotlib
    matplotlib.use("Agg")
    from torchdyn.utils import plot_2D_depth_trajectory

    torch.manual_seed(4)

    class Field(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(DataControl(), nn.Linear(4, 2), nn.Tanh())

        def forward(self, t, z, args=None):
            return self.net(z) - z

    field = Field()
    x, yn = torch.randn(16, 2), torch.randint(0, 2, (16,))
    t_span = torch.linspace(0, 1, 100)
    model = td.InfiniteTimeNeuralODE(field)
    traj = model.trajectory(x, t_span)
    assert traj.shape == (100, 16, 2)
    torch.testing.assert_close(traj, NeuralODE(field).trajectory(x, t_span), atol=1e-4, rtol=1e-4)
    plot_2D_depth_trajectory(t_span, traj.detach(), yn, n_samples=16)
    with pytest.raises(ValueError, match="forward"):
        model.trajectory(x, INF)
