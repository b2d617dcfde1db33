"""Implicit gradients: finite differences, closed form, and backprop through the solver, with the
time-steppers' compiled step too."""
import contextlib
import warnings

import pytest
import torch
import torch.nn as nn
from conftest import TanhLayer

import torchdyn_deq as td
from torchdyn_deq._compile import CompileFallbackWarning

TIGHT = dict(atol=1e-12, rtol=1e-12, max_steps=1000)
LINEAR_SOLVERS = [td.GMRES(rtol=1e-12, atol=1e-14), td.FixedPointSolver(rtol=1e-12, atol=1e-14, max_iters=2000),
                  td.DirectSolver()]


def functional(model, names):
    def fn(x, *params):
        return torch.func.functional_call(model, dict(zip(names, params)), (x,))[1][-1]
    return fn


# the time-steppers in both modes: eager, and compiled (`compile=True`: the step body through torch.compile,
# slow for its compile time); a compiled step that fell back to eager would be an error here
SOLVERS = ["tsit5", "dopri5", "anderson", "broyden"]
MODES = [(s, False) for s in SOLVERS] + [pytest.param(s, True, marks=pytest.mark.slow, id=f"{s}-compiled")
                                         for s in ("tsit5", "dopri5")]


@contextlib.contextmanager
def compiled_strictly():
    with warnings.catch_warnings():
        warnings.simplefilter("error", CompileFallbackWarning)
        yield


@pytest.mark.parametrize("solver, compile", MODES)
@pytest.mark.parametrize("linear_solver", LINEAR_SOLVERS, ids=lambda s: type(s).__name__)
def test_gradcheck_parameters_and_input(layer, solver, compile, linear_solver):
    model = td.DEQ(layer, solver=solver, state_shape=(3,), sensitivity=td.SteadyStateSensitivity(linear_solver),
                   compile=compile, **TIGHT)
    x = torch.randn(4, 2, dtype=torch.float64, requires_grad=True)
    names = [n for n, _ in model.named_parameters()]
    with compiled_strictly():
        assert torch.autograd.gradcheck(functional(model, names), (x, *model.parameters()), eps=1e-6, atol=1e-6,
                                        rtol=1e-5)
    assert model.solution.converged


def test_gradcheck_dropin_with_datacontrol():
    from torchdyn.nn import DataControl

    class Damped(nn.Module):  # dz/dt = tanh(W [z, x]) - z, torchdyn-style (t, x, args) signature
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(DataControl(), nn.Linear(4, 2), nn.Tanh()).double()

        def forward(self, t, x, args=None):
            return self.net(x) - x

    model = td.InfiniteTimeNeuralODE(Damped(), **TIGHT)
    x = torch.randn(3, 2, dtype=torch.float64, requires_grad=True)
    # the injected input must get its true gradient (torchdyn's DataControl detaches it)
    assert torch.autograd.gradcheck(lambda x: model(x)[1][-1], (x,), eps=1e-6, atol=1e-6, rtol=1e-5)


def test_linear_contraction_closed_form():
    d, m, batch = 5, 3, 6
    A = nn.Parameter(0.5 * torch.randn(d, d, dtype=torch.float64) / d**0.5)
    B = nn.Parameter(torch.randn(d, m, dtype=torch.float64))
    assert torch.linalg.eigvals(A.detach()).abs().max() < 1

    class Linear(nn.Module):
        def __init__(self):
            super().__init__()
            self.A, self.B = A, B

        def forward(self, z, x):
            return z @ self.A.T + x @ self.B.T

    x = torch.randn(batch, m, dtype=torch.float64, requires_grad=True)
    c = torch.randn(batch, d, dtype=torch.float64)
    model = td.DEQ(Linear(), state_shape=(d,), atol=1e-11, rtol=1e-11,
                   sensitivity=td.SteadyStateSensitivity(td.GMRES(rtol=1e-13, atol=1e-15)), max_steps=1000)
    z_star = model(x)[1][-1]
    grads = torch.autograd.grad((c * z_star).sum(), (A, B, x))
    # z* = (I - A)^-1 B x, differentiated by autograd through the dense solve
    exact = torch.linalg.solve(torch.eye(d, dtype=torch.float64) - A, (x @ B.T).T).T
    exact_grads = torch.autograd.grad((c * exact).sum(), (A, B, x))
    torch.testing.assert_close(z_star, exact, rtol=1e-9, atol=1e-10)
    for g, e in zip(grads, exact_grads):
        torch.testing.assert_close(g, e, rtol=1e-8, atol=1e-9)


@pytest.mark.parametrize("solver, compile", [("tsit5", False), ("anderson", False),
                                             pytest.param("tsit5", True, marks=pytest.mark.slow, id="tsit5-compiled")])
def test_implicit_matches_backprop_through_solver(solver, compile):
    layer = TanhLayer(d=6, m=4)
    x = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    v = torch.randn(5, 6, dtype=torch.float64)
    grads = {}
    for sens in ("steady_state", "autograd"):
        model = td.DEQ(layer, solver=solver, state_shape=(6,), sensitivity=sens, atol=1e-10, rtol=1e-10,
                       rtol_adjoint=1e-12, max_steps=1000, compile=compile)
        with compiled_strictly():
            z = model(x)[1][-1]
            grads[sens] = torch.autograd.grad((v * z).sum(), (x, *layer.parameters()))
    for a, b in zip(grads["steady_state"], grads["autograd"]):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-8)


def test_gradient_error_shrinks_with_tolerance():
    layer = TanhLayer(d=6, m=4)
    x = torch.randn(5, 4, dtype=torch.float64)
    exact_model = td.DEQ(layer, state_shape=(6,), solver="broyden", atol=1e-13, rtol=1e-13, rtol_adjoint=1e-13, max_steps=500)
    exact = torch.autograd.grad(exact_model(x)[1][-1].sum(), layer.W)[0]
    errors = []
    tols = [1e-3, 1e-5, 1e-7]
    for tol in tols:
        model = td.DEQ(layer, state_shape=(6,), atol=tol, rtol=tol, rtol_adjoint=1e-12, max_steps=500)
        g = torch.autograd.grad(model(x)[1][-1].sum(), layer.W)[0]
        errors.append(float((g - exact).abs().max()))
    assert errors[0] > errors[1] > errors[2]
    assert errors[0] < 1e-2 and errors[2] < 1e-5


@pytest.mark.parametrize("sensitivity", ["steady_state", "autograd", "jacobian_free", "phantom"])
def test_unused_parameters_get_no_gradient(layer, sensitivity):
    """A parameter the layer never reads gets no gradient (``None``, PyTorch's convention, so an
    optimizer skips it: a zero tensor would still be decayed), and its presence does not change
    the gradients of the others."""
    x = torch.randn(4, 2, dtype=torch.float64)
    used = list(layer.parameters())
    reference = torch.autograd.grad(td.DEQ(layer, state_shape=(3,), sensitivity=sensitivity)(x)[1][-1].sum(), used)
    layer.unused = nn.Parameter(torch.ones(2, 2, dtype=torch.float64))
    model = td.DEQ(layer, state_shape=(3,), sensitivity=sensitivity)
    model(x)[1][-1].sum().backward()
    assert layer.unused.grad is None
    for p, g in zip(used, reference):
        torch.testing.assert_close(p.grad, g, rtol=1e-12, atol=0)
    assert torch.autograd.grad(model(x)[1][-1].sum(), layer.unused, allow_unused=True) == (None,)


def test_memory_independent_of_steps(layer):
    """Only one evaluation at z* is kept: the graph does not grow with the number of steps."""
    x = torch.randn(4, 2, dtype=torch.float64)
    sizes = []
    for tol in (1e-2, 1e-10):
        model = td.DEQ(layer, state_shape=(3,), atol=tol, rtol=tol, max_steps=500)
        z = model(x)[1][-1]
        seen, stack, n = set(), [z.grad_fn], 0
        while stack:
            node = stack.pop()
            if node is None or node in seen:
                continue
            seen.add(node)
            n += 1
            stack.extend(nxt for nxt, _ in node.next_functions)
        sizes.append((model.solution.nfe, n))
    assert sizes[1][0] > 2 * sizes[0][0]  # many more steps ...
    assert sizes[1][1] == sizes[0][1]  # ... same graph
