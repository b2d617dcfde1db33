"""The compiled step path: the same results as eager, one compile per shape and dtype, and an
eager fallback with one warning (its gradients: test_gradients.py, in both modes). Slow: each new
graph compiles for several seconds."""
import warnings

import pytest
import torch
import torch.nn as nn

import torchdyn_deq as td
from torchdyn_deq import _compile
from torchdyn_deq._compile import CompileFallbackWarning, CompiledStep, compiles

pytestmark = pytest.mark.slow


class Layer(nn.Module):
    """f(z, x) = tanh(l2(tanh(l1(z))) + x): the MNIST layer, small."""

    def __init__(self, width=16):
        super().__init__()
        self.l1, self.l2 = nn.Linear(width, width), nn.Linear(width, width)

    def forward(self, z, x):
        return torch.tanh(self.l2(torch.tanh(self.l1(z))) + x)


def _pair(solver, layer, **kwargs):
    options = dict(solver=solver, atol=1e-4, rtol=1e-4, state_shape=(16,), **kwargs)
    return td.DEQ(layer, **options), td.DEQ(layer, compile=True, **options)


@pytest.mark.parametrize("solver", ["tsit5", "vcab3"])
def test_compiled_equals_eager_and_compiles_once_per_shape(solver):
    layer = Layer().double()  # float64: equal to rounding, not to the float32 path's tolerance-level drift
    eager, compiled = _pair(solver, layer)
    x = torch.randn(8, 16, dtype=torch.float64)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error", CompileFallbackWarning)
        z_eager, z_compiled = eager(x)[1][-1], compiled(x)[1][-1]
        # the same steps and evaluations, counted on the record and on the model alike
        assert (compiled.solution.nfe, compiled.solution.steps_accepted, compiled.solution.steps_rejected) == \
            (eager.solution.nfe, eager.solution.steps_accepted, eager.solution.steps_rejected)
        assert compiled.vf.nfe == eager.vf.nfe == eager.solution.nfe
        torch.testing.assert_close(z_compiled, z_eager, rtol=1e-10, atol=1e-12)
        assert compiled.solution.converged
        after_first = compiles()
        for _ in range(3):  # new inputs of the same shape, a new model on the same solver family
            compiled(torch.randn(8, 16, dtype=torch.float64))
        td.DEQ(Layer().double(), solver=solver, atol=1e-4, rtol=1e-4, state_shape=(16,), compile=True)(
            torch.randn(8, 16, dtype=torch.float64))
        # the first solve may not have visited every variant (with / without an eigenvalue estimate)
        settled = compiles()
        assert settled - after_first <= 2
        for _ in range(3):
            compiled(torch.randn(8, 16, dtype=torch.float64))
        assert compiles() == settled  # no recompilation per step or per solve
        # a new batch size compiles each body's variants once, then is cached: the RK step with and without
        # an eigenvalue estimate; VCAB3 its steps with one and its accept
        variants = {"tsit5": 2, "vcab3": 2}[solver]
        for _ in range(3):
            compiled(torch.randn(5, 16, dtype=torch.float64))
        resized = compiles()
        assert settled < resized <= settled + variants
        for _ in range(3):
            compiled(torch.randn(5, 16, dtype=torch.float64))
        assert compiles() == resized
    assert not any(step.failed for step in compiled.solver._steps.values())


def test_python_state_in_the_body_falls_back_with_one_warning():
    class Scale:  # a Python number the graph reads and that changes every call: a recompile per call
        k = 0

    def body(x):
        Scale.k += 1
        return x * Scale.k

    step = CompiledStep(body, "test")
    x = torch.ones(3)
    with pytest.warns(CompileFallbackWarning, match="recompiles") as record:
        outs = [step(None, x) for _ in range(6)]
    assert len([w for w in record if issubclass(w.category, CompileFallbackWarning)]) == 1
    assert [float(o[0]) for o in outs] == [1, 2, 3, 4, 5, 6]  # the same values compiled or eager
    assert step.failed


def test_compilation_failure_falls_back_with_one_warning(monkeypatch):
    def broken(gm, example_inputs):
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(_compile, "_COMPILED", {})
    monkeypatch.setattr(_compile, "_counting_backend", broken)
    eager, compiled = _pair("tsit5", Layer())
    x = torch.randn(4, 16)
    with torch.no_grad():
        with pytest.warns(CompileFallbackWarning, match="compilation failed") as record:
            z = compiled(x)[1][-1]
            compiled(x)
        torch.testing.assert_close(z, eager(x)[1][-1])
    assert len([w for w in record if issubclass(w.category, CompileFallbackWarning)]) == 1


def test_an_error_of_the_field_is_raised_not_swallowed():
    def field(x):
        raise ValueError("bad field")

    step = CompiledStep(field, "test")
    with pytest.raises(ValueError, match="bad field"):
        step(None, torch.ones(2))
    assert not step.failed


def test_compile_option_errors():
    with pytest.raises(ValueError, match="no compiled step"):
        td.DEQ(Layer(), solver="anderson", compile=True)
    td.DEQ(Layer(), solver="anderson", compile=False)(torch.randn(2, 16))  # eager is what it has: no error
    with pytest.raises(ValueError, match="compile=True needs an adaptive stepper"):
        td.ODESteadyStateSolver("euler", compile=True)
    with pytest.raises(TypeError, match="compile"):
        td.VCAB3(compile="yes")
    solver = td.VCAB3()
    model = td.DEQ(Layer(), solver=solver, compile=True)
    assert model.solver.compile and not solver.compile  # the user's instance is left as it was
    assert td.DEQ(Layer(), solver=solver).solver is solver


@pytest.mark.parametrize("solver", ["tsit5", "vcab3"])
def test_the_compiled_step_fuses_the_stop_test(monkeypatch, solver):
    """The loop tests only the start of a compiled solve: every RK step's new state, every VCAB3
    accepted point, comes tested from a compiled body, with the same record as eager (NFE, steps,
    best residuals)."""
    from torchdyn_deq import _loop

    calls = []
    measure = _loop._Tracker.measure
    monkeypatch.setattr(_loop._Tracker, "measure", lambda self, z, gz: calls.append(1) or measure(self, z, gz))
    layer = Layer().double()
    eager, compiled = _pair(solver, layer)
    x = torch.randn(8, 16, dtype=torch.float64)
    with torch.no_grad():
        z_eager = eager(x)[1][-1]
        eager_calls, calls[:] = len(calls), []
        z_compiled = compiled(x)[1][-1]
    # eager: the start, then every RK proposal (it carries g), every VCAB3 accepted point (it does not)
    tested = eager.solution.steps_accepted + (eager.solution.steps_rejected if solver == "tsit5" else 0)
    assert eager_calls == 1 + tested and len(calls) == 1  # compiled: the start's test only
    torch.testing.assert_close(z_compiled, z_eager, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(compiled.solution.residual, eager.solution.residual, rtol=1e-10, atol=0)
    assert (compiled.solution.nfe_per_sample == eager.solution.nfe_per_sample).all()


def test_stop_tolerances_below_the_step_floor_do_not_recompile_the_body():
    """The fused stop test's tolerances are graph constants: solves whose atol differs only below
    min_step_tol (the same step tolerances) each get their own variant, not a recompile counted
    against one (the third would fall back to eager)."""
    layer, solver = Layer().double(), td.ODESteadyStateSolver(compile=True)  # one solver: its compile counts
    x = torch.randn(8, 16, dtype=torch.float64)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error", CompileFallbackWarning)
        for atol in (1e-7, 1e-8, 1e-9):
            model = td.DEQ(layer, solver=solver, atol=atol, rtol=1e-4, state_shape=(16,))
            model(x)
            assert model.solution.converged and model.solver is solver
    assert not any(step.failed for step in solver._steps.values())


def test_per_sample_termination_runs_the_shrunk_batch_eagerly():
    layer = Layer().double()
    solver = td.ODESteadyStateSolver(per_sample=True, compile=True)
    eager = td.DEQ(layer, solver=td.ODESteadyStateSolver(per_sample=True), atol=1e-4, rtol=1e-4, state_shape=(16,))
    compiled = td.DEQ(layer, solver=solver, atol=1e-4, rtol=1e-4, state_shape=(16,))
    x = torch.cat([torch.zeros(3, 16), 3 * torch.randn(5, 16)]).double()  # some samples converge sooner
    with torch.no_grad():
        torch.testing.assert_close(compiled(x)[1][-1], eager(x)[1][-1], rtol=1e-10, atol=1e-12)
    assert compiled.solution.nfe == eager.solution.nfe and compiled.solution.converged
