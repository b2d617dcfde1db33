"""odeint_steady_state: torchdiffeq's style, implicit gradients to adjoint_params."""
import pytest
import torch
import torch.nn as nn

import torchdyn_deq as td


class Func(nn.Module):
    """dy/dt = tanh(W y + U x) - y, x closed over (an injected input)."""

    def __init__(self, x, d=3):
        super().__init__()
        self.W = nn.Parameter(0.4 * torch.randn(d, d, dtype=torch.float64) / d ** 0.5)
        self.U = nn.Parameter(torch.randn(d, x.shape[-1], dtype=torch.float64))
        self.x = x

    def forward(self, t, y):
        return torch.tanh(y @ self.W.T + self.x @ self.U.T) - y


TIGHT = dict(rtol=1e-11, atol=1e-11, adjoint_rtol=1e-12, adjoint_atol=1e-13, max_steps=1000)


@pytest.mark.parametrize("method", ["tsit5", "dopri5", "vcab3", "broyden"])
@pytest.mark.parametrize("batched", [False, True])
def test_gradcheck_parameters_and_injected_input(method, batched):
    torch.manual_seed(0)
    x = torch.randn(2, 2, dtype=torch.float64, requires_grad=True)
    module = Func(x)
    y0 = torch.zeros(2, 3, dtype=torch.float64)

    def steady(W, U, x):  # a closure over the tensors gradcheck perturbs
        def func(t, y):
            return torch.tanh(y @ W.T + x @ U.T) - y
        return td.odeint_steady_state(func, y0, method=method, adjoint_params=(W, U, x), batched=batched, **TIGHT)

    W = module.W.detach().clone().requires_grad_()
    U = module.U.detach().clone().requires_grad_()
    assert torch.autograd.gradcheck(steady, (W, U, x), eps=1e-6, atol=1e-6, rtol=1e-5)


def test_matches_backprop_and_only_adjoint_params_get_gradients():
    torch.manual_seed(1)
    x = torch.randn(4, 2, dtype=torch.float64, requires_grad=True)
    func = Func(x)
    v = torch.randn(4, 3, dtype=torch.float64)
    y0 = torch.zeros(4, 3, dtype=torch.float64, requires_grad=True)
    grads = {}
    for sensitivity in ("steady_state", "autograd"):
        y = td.odeint_steady_state(func, y0, sensitivity=sensitivity, **TIGHT)  # default: func.parameters()
        grads[sensitivity] = torch.autograd.grad((y * v).sum(), [func.W, func.U, y0])
        assert x.grad is None  # closed over, not listed: no gradient, as in torchdiffeq
    for implicit, backprop in zip(grads["steady_state"][:2], grads["autograd"][:2]):
        torch.testing.assert_close(implicit, backprop, atol=1e-7, rtol=1e-6)
    assert float(grads["steady_state"][2].abs().max()) == 0.0  # y* does not depend on y0


def test_steady_state_and_record():
    torch.manual_seed(2)
    func = Func(torch.randn(4, 2, dtype=torch.float64))
    y, record = td.odeint_steady_state(func, torch.zeros(4, 3, dtype=torch.float64), rtol=1e-8, atol=1e-8,
                                       return_solution=True)
    assert record.converged and y.shape == (4, 3)
    with torch.no_grad():
        assert float(func(0, y).abs().max()) < 1e-6
    unused = nn.Parameter(torch.ones(2, dtype=torch.float64))
    y = td.odeint_steady_state(func, torch.zeros(4, 3, dtype=torch.float64), adjoint_params=(func.W, unused))
    W_grad, unused_grad = torch.autograd.grad(y.sum(), (func.W, unused))
    assert unused_grad.shape == (2,) and float(unused_grad.abs().max()) == 0.0 and W_grad.abs().sum() > 0


def test_options_reach_the_solver():
    func = Func(torch.randn(4, 2, dtype=torch.float64))
    _, record = td.odeint_steady_state(func, torch.zeros(4, 3, dtype=torch.float64), method="vcab3",
                                       options={"max_step": 0.2}, max_steps=300, return_solution=True)
    assert record.converged and record.t <= 0.2 * record.steps_accepted + 1e-9


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(method="dopri8"), ValueError, "torchdiffeq's 'dopri8' has no steady-state counterpart.*'tsit5'"),
    (dict(method="nope"), ValueError, "unknown method 'nope'.*'anderson'"),
    (dict(options={"first_step": 0.1}), ValueError, r"unknown options \['first_step'\].*'max_step'"),
    (dict(method="anderson", options={"max_step": 1.0}), ValueError, "valid options.*'memory'"),
    (dict(options=[1]), TypeError, "options must be a dict"),
    (dict(atol=0.0), ValueError, "atol"),
    (dict(max_steps=0), ValueError, "max_steps"),
    (dict(batched=1), TypeError, "batched"),
    (dict(sensitivity="adjoint"), ValueError, "sensitivity"),
])
def test_bad_arguments(kwargs, error, match):
    func = Func(torch.randn(4, 2, dtype=torch.float64))
    with pytest.raises(error, match=match):
        td.odeint_steady_state(func, torch.zeros(4, 3, dtype=torch.float64), **kwargs)


def test_bad_func_and_state():
    with pytest.raises(TypeError, match="y0"):
        td.odeint_steady_state(lambda t, y: -y, torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"func\(t, y\) returned \(\) for a state.*must have the state's shape"):
        td.odeint_steady_state(lambda t, y: y.sum(), torch.zeros(3))


def test_torchdiffeq_baseline_layer_for_the_mnist_benchmark():
    from torchdyn_deq.experiments.mnist import InjectedLayer, MNISTNet
    from torchdyn_deq.experiments.torchdiffeq_baseline import TorchdiffeqODELayer

    torch.manual_seed(3)
    net = MNISTNet(lambda f: TorchdiffeqODELayer(f, tol=1e-3))
    logits = net(torch.rand(4, 784))
    logits.sum().backward()
    layer = net.layer
    assert logits.shape == (4, 10) and layer.forward_nfe > 0 and layer.backward_nfe() > 0
    assert layer.ode.sensalg == "adjoint" and net.encoder.weight.grad.abs().sum() > 0
