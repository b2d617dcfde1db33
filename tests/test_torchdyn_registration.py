"""Our names in torchdyn: 'steady_state' / 'jacobian_free' in ODEProblem and NeuralODE with
t_span = [t0, inf], name validation, the public registration API, and torchdyn's own names
unchanged (bit for bit) with the plugin loaded."""
from __future__ import annotations

import copy
import hashlib
import importlib
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from torchdyn.core import MultipleShootingLayer, NeuralODE, ODEProblem
from torchdyn.nn import DataControl
from torchdyn.numerics import odeint
from torchdyn.numerics.solvers.ode import SOLVER_DICT

import torchdyn_deq as td
from torchdyn_deq import _torchdyn, _torchdyn_registry

ROOT = Path(__file__).resolve().parents[1]
INF = torch.tensor([0.0, float("inf")])


class Field(nn.Module):
    """dz/dt = tanh(W z + b) - z (contractive for small W)."""

    def __init__(self, d: int = 3, dtype=torch.float32, scale: float = 0.5):
        super().__init__()
        self.lin = nn.Linear(d, d).to(dtype)
        with torch.no_grad():
            self.lin.weight.mul_(scale)

    def forward(self, t, z, args=None):
        return torch.tanh(self.lin(z)) - z


class Injected(nn.Module):
    """dz/dt = tanh(W z + U x) - z, x injected by torchdyn's DataControl."""

    def __init__(self, d: int = 3, dtype=torch.float64):
        super().__init__()
        self.net = nn.Sequential(DataControl(), nn.Linear(2 * d, d)).to(dtype)
        with torch.no_grad():
            self.net[1].weight.mul_(0.5)

    def forward(self, t, z, args=None):
        return torch.tanh(self.net(z)) - z


@pytest.fixture
def clean_registry():
    """Third-party registrations made by a test are removed afterwards."""
    sensitivities, solvers = dict(_torchdyn_registry._SENSITIVITIES), dict(SOLVER_DICT)
    yield
    _torchdyn_registry._SENSITIVITIES.clear()
    _torchdyn_registry._SENSITIVITIES.update(sensitivities)
    SOLVER_DICT.clear()
    SOLVER_DICT.update(solvers)


# ---------------------------------------------------------------------------- registration
def test_registered_on_import_and_idempotent():
    assert _torchdyn.hooks() == "shim"
    assert SOLVER_DICT["vcab3"] is td.VCAB3Stepper
    names = _torchdyn_registry.sensitivity_names()
    assert names[:3] == ("autograd", "adjoint", "interpolated_adjoint")
    assert {"steady_state", "jacobian_free"} <= set(names)
    init = ODEProblem.__init__
    assert _torchdyn.install() == "shim"
    importlib.reload(td)
    assert ODEProblem.__init__ is init  # installed once: no wrapper around a wrapper
    assert not getattr(init.__wrapped__, "_torchdyn_deq_hook", False)
    assert _torchdyn_registry.sensitivity_names() == names


def test_every_package_sensitivity_is_registered():
    # a name added to _registry.SENSITIVITIES (e.g. 'phantom') reaches torchdyn without another line
    from torchdyn_deq._registry import SENSITIVITIES
    expected = [n for n in SENSITIVITIES if n != "autograd"]
    assert list(_torchdyn.STEADY_STATE_SENSITIVITIES) == expected
    for name in expected:
        NeuralODE(Field(), sensitivity=name)


def test_torchdyn_solver_names_unchanged():
    assert set(_torchdyn_registry.BUILTIN_SOLVERS) <= set(SOLVER_DICT)
    assert set(SOLVER_DICT) - set(_torchdyn_registry.BUILTIN_SOLVERS) == {"vcab3"}


_TORCHDYN_RUN = textwrap.dedent("""
    import hashlib, io, sys
    import torch, torch.nn as nn
    if sys.argv[1] == "plugin":
        import torchdyn_deq
        assert torchdyn_deq._torchdyn.hooks() == "shim"
    from torchdyn.core import NeuralODE, ODEProblem
    from torchdyn.numerics import odeint
    out = []
    for solver in ("dopri5", "tsit5", "rk4"):
        for sens in ("autograd", "adjoint", "interpolated_adjoint"):
            if solver == "rk4" and sens == "interpolated_adjoint":
                continue
            for cls in (NeuralODE, ODEProblem):
                torch.manual_seed(0)
                f = nn.Sequential(nn.Linear(2, 16), nn.Tanh(), nn.Linear(16, 2))
                model = cls(f, solver=solver, sensitivity=sens, atol=1e-4, rtol=1e-4)
                x = torch.randn(8, 2, requires_grad=True)
                t_span = torch.linspace(0, 1, 5 if solver == "rk4" else 2)
                t_eval, sol = model(x, t_span)
                sol[-1].pow(2).sum().backward()
                out += [t_eval.detach(), sol.detach(), x.grad] + [p.grad for p in f.parameters()]
    torch.manual_seed(0)
    t_eval, sol = odeint(lambda t, x: -x + torch.sin(t), torch.randn(4, 3), torch.linspace(0, 2, 7), "dopri5")
    out += [t_eval, sol]
    buffer = io.BytesIO()
    torch.save([o.numpy().tobytes() for o in out], buffer)
    print(hashlib.sha256(buffer.getvalue()).hexdigest(), len(out))
""")


def test_torchdyn_names_bit_identical_with_and_without_the_plugin():
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    runs = [subprocess.run([sys.executable, "-c", _TORCHDYN_RUN, mode], capture_output=True, text=True, env=env,
                           timeout=300) for mode in ("plain", "plugin")]
    for run in runs:
        assert run.returncode == 0, run.stderr
    plain, plugin = (run.stdout.split()[-2:] for run in runs)
    assert int(plain[1]) > 50
    assert plain == plugin


# ---------------------------------------------------------------------------- validation
def test_unknown_sensitivity_is_refused_at_construction_with_all_names():
    with pytest.raises(ValueError, match="unknown sensitivity 'adjiont'.*'adjoint'.*'interpolated_adjoint'.*'steady_state'"):
        NeuralODE(Field(), sensitivity="adjiont")
    with pytest.raises(ValueError, match="'jacobian_free'"):
        ODEProblem(Field(), "tsit5", sensitivity="implicit")
    with pytest.raises(TypeError, match="sensitivity must be one of the names"):
        NeuralODE(Field(), sensitivity=3)


def test_multiple_shooting_accepts_torchdyn_names_only():
    with pytest.raises(ValueError, match="unknown sensitivity 'steady_state'"):
        MultipleShootingLayer(Field(), solver="zero", sensitivity="steady_state")
    MultipleShootingLayer(Field(), solver="zero", sensitivity="adjoint")


def test_finite_end_time_with_steady_state_says_what_to_change():
    model = NeuralODE(Field(), sensitivity="steady_state")
    with pytest.raises(ValueError, match=r"t_span ends at 1: pass t_span=torch.tensor\(\[0., float\('inf'\)\]\)"):
        model(torch.randn(4, 3), torch.linspace(0, 1, 2))


@pytest.mark.parametrize("t_span, match", [([0.0, 1.0, float("inf")], "two entries"),
                                           ([float("inf"), 1.0], "only as its last entry"),
                                           ([0.0, float("nan")], "no nan")])
def test_bad_infinite_spans(t_span, match):
    model = NeuralODE(Field(), sensitivity="steady_state")
    with pytest.raises(ValueError, match=match):
        model(torch.randn(4, 3), torch.tensor(t_span))


def test_adjoint_to_infinity_names_the_alternatives():
    model = NeuralODE(Field(), sensitivity="adjoint")
    with pytest.raises(ValueError, match="'autograd'.*'steady_state'"):
        model(torch.randn(4, 3), INF)


@pytest.mark.parametrize("option", [dict(solver_adjoint="dopri5"), dict(interpolator="4th")])
def test_finite_time_options_are_refused(option):
    model = NeuralODE(Field(), sensitivity="steady_state", **option)
    with pytest.raises(ValueError, match=list(option)[0]):
        model(torch.randn(4, 3), INF)


def test_save_at_is_refused():
    with pytest.raises(ValueError, match="save_at"):
        NeuralODE(Field(), sensitivity="steady_state")(torch.randn(4, 3), INF, save_at=torch.tensor([1.0]))


# ---------------------------------------------------------------------------- the steady state
@pytest.mark.parametrize("cls", [NeuralODE, ODEProblem])
@pytest.mark.parametrize("sensitivity", ["steady_state", "jacobian_free"])
def test_same_solve_as_infinite_time_neural_ode(cls, sensitivity):
    torch.manual_seed(1)
    field = Field()
    x = torch.randn(6, 3)
    model = cls(field, solver="tsit5", sensitivity=sensitivity, atol=1e-5, rtol=1e-5)
    t_eval, sol = model(x, INF)
    reference = td.InfiniteTimeNeuralODE(field, solver="tsit5", sensitivity=sensitivity, atol=1e-5, rtol=1e-5)
    t_ref, sol_ref = reference(x, INF)
    torch.testing.assert_close(sol, sol_ref, rtol=0, atol=0)
    torch.testing.assert_close(t_eval, t_ref)
    assert model.solution.converged and float(model.solution.residual.max()) <= 1
    with torch.no_grad():
        assert float(field(0, sol[-1]).abs().max()) < 1e-4


def test_parameter_gradients_match_the_closed_form():
    # dz/dt = W z + b - z: z* = (I - W)^-1 b, d(c . z*)/db = (I - W)^-T c
    torch.manual_seed(2)
    d = 4
    W = nn.Parameter(0.3 * torch.randn(d, d, dtype=torch.float64))
    b = nn.Parameter(torch.randn(d, dtype=torch.float64))

    class Linear(nn.Module):
        def __init__(self):
            super().__init__()
            self.W, self.b = W, b

        def forward(self, t, z, args=None):
            return z @ self.W.T + self.b - z

    model = NeuralODE(Linear(), solver="dopri5", sensitivity="steady_state", atol=1e-10, rtol=1e-10,
                      atol_adjoint=1e-12, rtol_adjoint=1e-12)
    model.max_steps = 1000
    c = torch.randn(d, dtype=torch.float64)
    _, sol = model(torch.zeros(2, d, dtype=torch.float64), INF)
    (sol[-1] @ c).sum().backward()
    A = torch.eye(d, dtype=torch.float64) - W.detach()
    torch.testing.assert_close(sol[-1][0], torch.linalg.solve(A, b.detach()), atol=1e-8, rtol=1e-8)
    torch.testing.assert_close(b.grad, 2 * torch.linalg.solve(A.T, c), atol=1e-8, rtol=1e-8)


def test_gradcheck_through_data_control():
    torch.manual_seed(3)
    model = NeuralODE(Injected(), solver="dopri5", sensitivity="steady_state", atol=1e-11, rtol=1e-11,
                      atol_adjoint=1e-13, rtol_adjoint=1e-12, return_t_eval=False)
    model.max_steps = 1000
    x = torch.randn(3, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: model(x, INF)[-1], (x,), eps=1e-6, atol=1e-6, rtol=1e-5)


def test_implicit_gradients_match_backprop_through_the_steps():
    torch.manual_seed(4)
    field = Injected()
    x = torch.randn(5, 3, dtype=torch.float64)
    v = torch.randn(5, 3, dtype=torch.float64)
    grads = {}
    for sensitivity in ("steady_state", "autograd"):
        model = NeuralODE(field, solver="dopri5", sensitivity=sensitivity, atol=1e-9, rtol=1e-9,
                          atol_adjoint=1e-12, rtol_adjoint=1e-12)
        model.max_steps = 1000
        field.zero_grad()
        _, sol = model(x, INF)
        (sol[-1] * v).sum().backward()
        grads[sensitivity] = [p.grad.clone() for p in field.parameters()]
    for implicit, backprop in zip(grads["steady_state"], grads["autograd"]):
        torch.testing.assert_close(implicit, backprop, atol=1e-6, rtol=1e-5)


def test_adjoint_tolerances_reach_the_backward_solve():
    torch.manual_seed(5)
    field = Field(d=32, scale=1.5)
    x = torch.randn(4, 32)
    iters = []
    for tol in (1e-1, 1e-6):
        model = NeuralODE(field, sensitivity="steady_state", atol_adjoint=tol, rtol_adjoint=tol)
        _, sol = model(x, INF)
        sol[-1].sum().backward()
        iters.append(model.solution.backward_iters)
        assert model.solution.backward_residual <= tol
    assert iters[0] < iters[1]


def test_max_steps_attribute_bounds_the_solve():
    model = NeuralODE(Field(), sensitivity="steady_state", atol=1e-8, rtol=1e-8)
    model.max_steps = 2
    with pytest.warns(td.ConvergenceWarning, match="max_steps=2"):
        model(torch.randn(4, 3), INF)
    assert not model.solution.converged


def test_autograd_to_infinity_is_the_same_core_backpropagated():
    torch.manual_seed(6)
    field = Field()
    x = torch.randn(4, 3)
    model = NeuralODE(field, solver="tsit5", sensitivity="autograd", atol=1e-6, rtol=1e-6)
    t_eval, sol = model(x, INF)
    assert t_eval.shape == (2,) and float(t_eval[1].detach()) > 1 and sol.shape == (2, 4, 3)
    with torch.no_grad():
        assert float(field(0, sol[-1]).abs().max()) < 1e-5
    model.max_steps = 3
    with pytest.warns(td.ConvergenceWarning, match="max_steps=3"):
        model(x, INF)


def test_a_sensitivity_instance_works_in_neural_ode():
    sens = td.SteadyStateSensitivity(td.GMRES(rtol=1e-9, atol=1e-12))
    model = NeuralODE(Field(), sensitivity=sens)
    _, sol = model(torch.randn(4, 3), INF)
    sol[-1].sum().backward()
    assert model.solution.backward_residual <= 1e-9


def test_trajectory_state_dict_and_record():
    field = Field()
    model = NeuralODE(field, sensitivity="steady_state")
    keys = set(model.state_dict())
    x = torch.randn(4, 3)
    _, sol = model(x, INF)
    traj = model.trajectory(x, INF)
    torch.testing.assert_close(traj, sol)
    sol[-1].sum().backward()
    assert set(model.state_dict()) == keys  # the engine is not a submodule
    # torchdyn's NeuralODE itself does not deep-copy (its vf_params is a non-leaf torch.cat);
    # the record does: it holds no graph
    record = copy.deepcopy(model.solution)
    torch.testing.assert_close(record.z_star, sol[-1].detach())
    assert model.vf.nfe > 0


def test_no_grad_forward_and_eval_mode():
    model = NeuralODE(Field(), sensitivity="steady_state").eval()
    with torch.no_grad():
        _, sol = model(torch.randn(4, 3), INF)
    assert sol.grad_fn is None and model.solution.converged


def test_nfe_counts_every_evaluation():
    field = Field()
    model = NeuralODE(field, solver="tsit5", sensitivity="steady_state")
    model(torch.randn(4, 3), INF)
    # the record counts the solve's evaluations; torchdyn's counter also sees the one at z*
    assert model.vf.nfe in (model.solution.nfe, model.solution.nfe + 1)


# ---------------------------------------------------------------------------- third parties
def test_register_a_third_party_sensitivity(clean_registry):
    calls = []

    def factory(problem):
        def solve(vf_params, x, t_span, save_at, args):
            calls.append(problem)
            return odeint(problem.vf, x, t_span, problem.solver)
        return solve

    td.register_sensitivity("mine", factory)
    td.register_sensitivity("mine", factory)  # the same again: nothing happens
    model = NeuralODE(Field(), sensitivity="mine")
    t_eval, sol = model(torch.randn(2, 3), torch.linspace(0, 1, 2))
    assert calls == [model] and sol.shape == (2, 2, 3)
    with pytest.raises(ValueError, match="already registered.*overwrite=True"):
        td.register_sensitivity("mine", lambda problem: None)
    td.register_sensitivity("mine", lambda problem: None, overwrite=True)
    with pytest.raises(ValueError, match="torchdyn's own"):
        td.register_sensitivity("adjoint", factory, overwrite=True)
    with pytest.raises(TypeError, match="callable"):
        td.register_sensitivity("other", "not a factory")
    with pytest.raises(ValueError, match="'mine'"):
        NeuralODE(Field(), sensitivity="yours")


def test_register_a_third_party_solver(clean_registry):
    class Heun(type(SOLVER_DICT["euler"](torch.float32)).__mro__[1]):
        def __init__(self, dtype=torch.float32):
            super().__init__(order=2)
            self.dtype, self.stepping_class = dtype, "fixed"

        def step(self, f, x, t, dt, k1=None, args=None):
            k1 = f(t, x) if k1 is None else k1
            return None, x + 0.5 * dt * (k1 + f(t + dt, x + dt * k1)), None

    td.register_solver("heun", Heun)
    td.register_solver("heun", Heun)
    _, sol = odeint(lambda t, x: -x, torch.ones(1, 1), torch.linspace(0, 1, 101), "heun")
    assert abs(float(sol[-1]) - float(torch.exp(torch.tensor(-1.0)))) < 1e-4
    with pytest.raises(ValueError, match="torchdyn's own"):
        td.register_solver("dopri5", Heun, overwrite=True)
    with pytest.raises(ValueError, match="already registered"):
        td.register_solver("heun", td.VCAB3Stepper)
    with pytest.raises(TypeError, match="stepper class"):
        td.register_solver("bad", object)


def test_torchdyn_default_atol_adjoint_does_not_zero_small_gradients():
    """torchdyn's NeuralODE defaults atol_adjoint to 1e-4, an absolute floor: as the GMRES
    tolerance it returned exactly zero gradients for a nearly fitted loss (review finding)."""
    from torchdyn.core import NeuralODE
    from torchdyn.nn import DataControl
    class Field(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(DataControl(), nn.Linear(4, 2), nn.Tanh())

        def forward(self, t, z, args=None):
            return self.net(z) - z

    torch.manual_seed(0)
    field = Field()
    model = NeuralODE(field, sensitivity="steady_state", atol=1e-6, rtol=1e-6)
    x = torch.randn(1024, 2)
    z = model(x, torch.tensor([0.0, float("inf")]))[1][-1]
    ((z - (z.detach() + 1e-2)) ** 2).mean().backward()  # a nearly fitted regression: tiny cotangents
    grad = field.net[1].weight.grad
    assert float(grad.norm()) > 0 and model.solution.backward_iters > 0


def test_the_engine_cache_does_not_keep_a_model_alive():
    """The engine a torchdyn problem uses is kept on the problem, not in a global table whose
    values referenced the field and through it the model (review finding: a leak)."""
    import gc
    import weakref
    from torchdyn.core import NeuralODE

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 3)
            self.ode = NeuralODE(self.field, sensitivity="steady_state")

        def field(self, t, z, args=None):
            return torch.tanh(self.lin(z)) - z

    model = Model()
    model.ode(torch.randn(2, 3), torch.tensor([0.0, float("inf")]))[1][-1].sum().backward()
    ref = weakref.ref(model)
    del model
    gc.collect()
    assert ref() is None


def test_a_reused_vcab3_stepper_starts_each_solve_afresh():
    """Same input tensor, same t0, a changed field between two solves: the second solve is not a
    retry of the first's last step (review finding: it kept the old k1 and returned 1.0001)."""
    from torchdyn.numerics import odeint
    a = torch.tensor(1.0)
    field = lambda t, x: a * torch.ones_like(x)  # noqa: E731
    x, span, stepper = torch.ones(2, 2), torch.tensor([0.0, 1e-4]), td.VCAB3Stepper()
    odeint(field, x, span, solver=stepper, atol=1e-3, rtol=1e-3)
    a.fill_(100.0)
    _, reused = odeint(field, x, span, solver=stepper, atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(reused[-1], torch.full((2, 2), 1.01), rtol=1e-6, atol=1e-6)


def test_odeint_of_our_models_is_their_own_solve():
    """torchdyn's ODEProblem.odeint on a DEQ / InfiniteTimeNeuralODE uses the model's own
    initializer and state shape (it built a default engine: a shape error, or z0 = x)."""
    lin, inj = nn.Linear(6, 6), nn.Linear(3, 6)
    deq = td.DEQ(lambda z, x: torch.tanh(lin(z) + inj(x)), state_shape=(6,))
    x = torch.randn(4, 3)
    t_eval, sol = deq.odeint(x, torch.tensor([0.0, float("inf")]))
    torch.testing.assert_close(sol[-1], deq(x)[1][-1])
    node = td.InfiniteTimeNeuralODE(lambda z: torch.tanh(z) - z, initializer="zeros")
    assert (node.odeint(torch.randn(4, 3))[1][0] == 0).all()


def test_unsupported_torchdyn_steppers_are_refused_as_instances_too():
    from torchdyn.core import NeuralODE
    with pytest.raises(ValueError, match="cannot solve to a steady state"):
        NeuralODE(nn.Linear(2, 2), solver="alf", sensitivity="steady_state")(torch.randn(3, 2),
                                                                              torch.tensor([0.0, float("inf")]))


def test_functional_odeint_to_infinity_stops_instead_of_hanging():
    """torchdyn's own functional odeint with t_span ending at inf looped forever (review finding)."""
    import torchdyn.numerics
    x = torch.randn(3, 2)
    t_eval, sol = torchdyn.numerics.odeint(lambda t, z: -(z - 1.0), x, torch.tensor([0.0, float("inf")]), "tsit5")
    torch.testing.assert_close(sol[-1], torch.ones(3, 2), atol=5e-3, rtol=0)
    t_eval, sol = torchdyn.numerics.odeint(lambda t, z: -z, x, torch.tensor([0.0, 1.0]), "tsit5")  # finite: torchdyn's
    torch.testing.assert_close(sol[-1], x * torch.exp(torch.tensor(-1.0)), atol=1e-2, rtol=1e-2)
