"""One core under every door: the same problem gives the same gradient whichever API a user takes
(DEQ, DEQ with a sensitivity instance, InfiniteTimeNeuralODE, torchdyn's NeuralODE by name,
odeint_steady_state); one backward rule; conflicting options refused; the record frozen."""
import dataclasses
import importlib
import sys
import warnings

import pytest
import torch
import torch.nn as nn
from torchdyn.core import NeuralODE

import torchdyn_deq as td

INF = torch.tensor([0.0, float("inf")], dtype=torch.float64)
TOL = dict(atol=1e-4, rtol=1e-4)


class Layer(nn.Module):
    """f(z, x) = tanh(W z + U x), contractive."""

    def __init__(self, d=5, m=3):
        super().__init__()
        self.W = nn.Parameter(0.6 * torch.randn(d, d, dtype=torch.float64) / d ** 0.5)
        self.U = nn.Parameter(torch.randn(d, m, dtype=torch.float64))

    def forward(self, z, x):
        return torch.tanh(z @ self.W.T + x @ self.U.T)


class VectorField(nn.Module):
    """dz/dt = f(z, x) - z with x held by the field: the same problem as DEQ(f) from z0 = 0."""

    def __init__(self, layer, x):
        super().__init__()
        self.layer, self.x = layer, x

    def forward(self, t, z, args=None):
        return self.layer(z, self.x) - z


def _problem(seed=0, batch=4):
    torch.manual_seed(seed)
    layer = Layer()
    x = torch.randn(batch, 3, dtype=torch.float64, requires_grad=True)
    c = torch.randn(batch, 5, dtype=torch.float64)
    return layer, x, c


def _doors(layer, x, tol):
    """z* through each door, from the same start z0 = 0."""
    zeros = torch.zeros(x.shape[0], 5, dtype=torch.float64)
    vf = VectorField(layer, x)
    return {
        "DEQ(f)": lambda: td.DEQ(layer, state_shape=(5,), **tol)(x)[1][-1],
        "DEQ(f, SteadyStateSensitivity())": lambda: td.DEQ(
            layer, state_shape=(5,), sensitivity=td.SteadyStateSensitivity(), **tol)(x)[1][-1],
        "InfiniteTimeNeuralODE(vf)": lambda: td.InfiniteTimeNeuralODE(vf, **tol)(zeros)[1][-1],
        "NeuralODE(vf, 'steady_state')": lambda: NeuralODE(vf, sensitivity="steady_state", **tol)(zeros, INF)[1][-1],
        "odeint_steady_state": lambda: td.odeint_steady_state(
            vf, zeros, batched=True, adjoint_params=(layer.W, layer.U, x), **tol),
    }


def _grads(z_star, layer, x, c, scale=1.0):
    return torch.autograd.grad(scale * (c * z_star).sum(), (layer.W, layer.U, x))


def _rel(a, b):
    return max(float((p - q).norm() / q.norm()) for p, q in zip(a, b))


def test_five_doors_same_gradient_and_scale_free():
    layer, x, c = _problem()
    # the exact gradient: z* = f(z*, x) solved tightly, differentiated with a dense solve
    exact_model = td.DEQ(layer, state_shape=(5,), atol=1e-12, rtol=1e-12, max_steps=1000,
                         sensitivity=td.SteadyStateSensitivity(td.DirectSolver()))
    exact = _grads(exact_model(x)[1][-1], layer, x, c)
    grads = {}
    for name, door in _doors(layer, x, TOL).items():
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # converges, no warning on any door
            grads[name] = _grads(door(), layer, x, c)
            tiny = _grads(door(), layer, x, c, scale=1e-12)
        assert _rel([g / 1e-12 for g in tiny], grads[name]) < 1e-4, name  # no absolute floor anywhere
        assert _rel(grads[name], exact) < 1e-4, name
    first = grads["DEQ(f)"]
    for name, g in grads.items():
        assert _rel(g, first) < 1e-6, name


def test_default_backward_tolerance_is_the_forward_one_on_every_door():
    layer, x, c = _problem(1)
    residuals = []
    for model in (td.DEQ(layer, state_shape=(5,), **TOL),
                  td.DEQ(layer, state_shape=(5,), sensitivity=td.SteadyStateSensitivity(), **TOL)):
        _grads(model(x)[1][-1], layer, x, c)
        residuals.append(model.solution.backward_residual)
        assert model.solution.backward_residual <= 1e-4
        assert model.sensitivity.solver_for(td.SolveOptions(1e-4, 1e-4, 10)).rtol == 1e-4
    assert residuals[0] == residuals[1]
    problem = NeuralODE(VectorField(layer, x), sensitivity="steady_state", **TOL)
    _grads(problem(torch.zeros(4, 5, dtype=torch.float64), INF)[1][-1], layer, x, c)
    assert problem.solution.backward_residual == residuals[0]


@pytest.mark.parametrize("build, match", [
    (lambda f: td.DEQ(f, sensitivity=td.SteadyStateSensitivity(), rtol_adjoint=1e-2),
     r"rtol_adjoint=0.01 and sensitivity=SteadyStateSensitivity"),
    (lambda f: td.DEQ(f, sensitivity=td.SteadyStateSensitivity(), atol_adjoint=1e-8),
     r"atol_adjoint=1e-08 and sensitivity=SteadyStateSensitivity"),
    (lambda f: td.DEQ(f, sensitivity=td.SteadyStateSensitivity(on_failure="warn"), on_failure="raise"),
     r"on_failure='raise' and sensitivity=SteadyStateSensitivity\(.*on_failure='warn'"),
    (lambda f: td.InfiniteTimeNeuralODE(lambda t, z: -z, sensitivity=td.PhantomSensitivity(), rtol_adjoint=1e-3),
     r"rtol_adjoint=0.001 and sensitivity=PhantomSensitivity"),
    (lambda f: td.odeint_steady_state(lambda t, y: -y, torch.zeros(3), sensitivity=td.SteadyStateSensitivity(),
                                      adjoint_rtol=1e-3), r"adjoint_rtol=0.001 and sensitivity=SteadyStateSensitivity"),
    (lambda f: NeuralODE(lambda t, z: -z, sensitivity=td.SteadyStateSensitivity(), rtol_adjoint=1e-2)(
        torch.zeros(2, 3), INF.float()), r"rtol_adjoint=0.01 and sensitivity=SteadyStateSensitivity"),
])
def test_conflicting_options_raise(build, match):
    with pytest.raises(ValueError, match=match):
        build(Layer())


def test_an_instance_sets_the_forward_on_failure_too():
    model = td.DEQ(Layer(), state_shape=(5,), sensitivity=td.SteadyStateSensitivity(on_failure="raise"), max_steps=1,
                   atol=1e-12, rtol=1e-12)
    assert model.on_failure == "raise"
    with pytest.raises(td.ConvergenceError):
        model(torch.randn(2, 3, dtype=torch.float64))
    assert model.solution is not None and not model.solution.converged  # kept before the error


def test_record_frozen_backward_statistics_in_its_backward_record():
    layer, x, c = _problem(2)
    model = td.DEQ(layer, state_shape=(5,), **TOL)
    z = model(x)[1][-1]
    sol = model.solution
    with pytest.raises(dataclasses.FrozenInstanceError):
        sol.nfe = 0
    assert sol.backward_iters is None and sol.backward.passes == 0
    _grads(z, layer, x, c)
    assert sol.backward_iters == sol.backward.iters > 0 and sol.backward.passes == 1
    assert model.solution is sol


def test_one_evaluation_count():
    layer, x, _ = _problem(3)
    model = td.DEQ(layer, state_shape=(5,), **TOL)
    model(x)
    assert model.vf.nfe == model.solution.nfe + 1  # + the evaluation at z* with gradients
    with torch.no_grad():
        model(x)
    assert model.vf.nfe == 2 * model.solution.nfe + 1


def test_odeint_steady_state_builds_no_model_and_no_second_function():
    import torchdyn_deq._implicit as implicit
    import torchdyn_deq._odeint as functional
    source = open(functional.__file__).read()
    assert "from ._models" not in source and "from ._torchdyn" not in source and "autograd.Function" not in source
    layer, x, c = _problem(4)
    y = td.odeint_steady_state(VectorField(layer, x), torch.zeros(4, 5, dtype=torch.float64), batched=True, **TOL)
    assert type(y.grad_fn).__name__ == implicit._ImplicitGradient.__name__ + "Backward"


def test_layers_bottom_up():
    """The model zoo imports no experiment; the core imports no door."""
    for name in [m for m in sys.modules if m.startswith("torchdyn_deq.experiments")]:
        del sys.modules[name]
    importlib.reload(importlib.import_module("torchdyn_deq.multiscale.zoo"))
    assert not [m for m in sys.modules if m.startswith("torchdyn_deq.experiments")]
    for core in ("_field", "_implicit", "_loop"):
        source = open(importlib.import_module(f"torchdyn_deq.{core}").__file__).read()
        for door in ("_models", "_torchdyn", "_odeint"):
            assert f"from .{door} import" not in source, (core, door)
    registry = open(importlib.import_module("torchdyn_deq._torchdyn_registry").__file__).read()
    assert "from torchdyn_deq" not in registry and "import torchdyn_deq\n" not in registry
    for stepping in ("init_step", "adapt_step", "hairer_norm", ".step("):  # no second solve loop: a hook
        assert stepping not in registry, stepping


@pytest.mark.parametrize("door", ["DEQ", "InfiniteTimeNeuralODE"])
def test_per_sample_termination_restricts_the_injected_input_and_the_dropout_mask(door):
    """Samples that converge early leave the batch: the Field restricts what the field reads (the
    DEQ's x, torchdyn's DataControl input, the variational dropout mask drawn at the first
    evaluation) with them, and restores it after the solve."""
    from torchdyn.nn import DataControl

    torch.manual_seed(5)
    drop = td.VariationalDropout(0.3)
    lin = nn.Linear(4, 4).double()
    x = torch.cat([0.01 * torch.randn(3, 4), 3 * torch.randn(3, 4)]).double()  # easy and hard samples
    if door == "DEQ":
        class Layer(nn.Module):  # a module: the model finds its dropout (a closure's it cannot)
            def __init__(self):
                super().__init__()
                self.lin, self.drop = lin, drop

            def forward(self, z, x):
                return self.drop(torch.tanh(self.lin(z) + x))
        make = lambda per_sample: td.DEQ(Layer(), state_shape=(4,), solver=td.AndersonAcceleration(per_sample=per_sample),
                                         atol=1e-9, rtol=1e-9)
    else:
        net = nn.Sequential(DataControl(), nn.Linear(8, 4), nn.Tanh()).double()

        class Field(nn.Module):
            def __init__(self):
                super().__init__()
                self.net, self.drop = net, drop

            def forward(self, t, z, args=None):
                return self.drop(self.net(z)) - z
        make = lambda per_sample: td.InfiniteTimeNeuralODE(
            Field(), solver=td.ODESteadyStateSolver("tsit5", per_sample=per_sample), atol=1e-9, rtol=1e-9, max_steps=400)
    results = []
    for per_sample in (False, True):
        model = make(per_sample).train()
        torch.manual_seed(6)  # the same dropout mask
        with torch.no_grad():
            results.append(model(x)[1][-1])
        assert model.solution.converged
        if per_sample:
            assert int(model.solution.nfe_per_sample.min()) < int(model.solution.nfe_per_sample.max())
            assert drop.mask.shape[0] == x.shape[0]  # restored to the full batch
    torch.testing.assert_close(results[0], results[1], atol=1e-7, rtol=1e-7)
