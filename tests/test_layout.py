"""The shared pieces of the experiments and benchmarks: one Markdown table writer, one timing
harness, one Neural ODE baseline, one classifier protocol; the multiscale package's public names."""
import importlib
import json
from pathlib import Path

import pytest
import torch

import torchdyn_deq.multiscale as multiscale
from benchmarks import harness
from torchdyn_deq._baselines import InjectedNeuralODE
from torchdyn_deq._classifier import ImplicitClassifier
from torchdyn_deq.experiments.mnist import MNISTNet, NeuralODELayer
from torchdyn_deq.experiments.reporting import machine_info, markdown_table

REPO = Path(__file__).resolve().parents[1]
BENCHMARKS = sorted(p.stem for p in (REPO / "benchmarks").glob("*.py") if p.stem != "__init__")


def test_markdown_table():
    assert markdown_table(("a", "b"), [(1, "x"), (2.5, "y")], align="rl") == \
        "| a | b |\n|--:|---|\n| 1 | x |\n| 2.5 | y |"


@pytest.mark.parametrize("rows, align, message", [([(1,)], None, "row 0 has 1 cells, the table has 2 columns"),
                                                   ([(1, 2)], "lx", "align needs one of 'l' / 'r' per column"),
                                                   ([(1, 2)], "l", "align needs one of")])
def test_markdown_table_refuses_bad_shapes(rows, align, message):
    with pytest.raises(ValueError, match=message):
        markdown_table(("a", "b"), rows, align=align)


def test_harness_writes_both_files(tmp_path):
    md, js = harness.write_results(tmp_path / "sub" / "result", "# title\n", {"x": Path("p")})
    assert md.read_text() == "# title\n" and json.loads(js.read_text()) == {"x": "p"}
    info = harness.machine(1)
    assert info["torch_threads"] == 1 and info["device"] == "cpu" and set(machine_info()) <= set(info)
    assert harness.median([3.0, 1.0, 100.0]) == 3.0 and harness.clock() > 0


@pytest.mark.parametrize("name", BENCHMARKS)
def test_benchmarks_are_modules_of_one_package(name):
    """Each script imports as ``benchmarks.<name>`` and none edits sys.path to find another."""
    assert "sys.path" not in (REPO / "benchmarks" / f"{name}.py").read_text()
    assert importlib.import_module(f"benchmarks.{name}").__name__ == f"benchmarks.{name}"


def test_multiscale_package_exports_only_public_names():
    assert all(not name.startswith("_") and hasattr(multiscale, name) for name in multiscale.__all__)
    from torchdyn_deq.multiscale import MDEQClassifier, MDEQLayer, MultiscaleNeuralODE, MultiscaleState  # noqa: F401
    assert {"state", "layers", "zoo"} <= {m.name for m in __import__("pkgutil").iter_modules(multiscale.__path__)}


def test_public_api_is_what_a_user_constructs_or_catches():
    """``torchdyn_deq.__all__``: every name once, each one defined; the machinery stays in its module."""
    import torchdyn_deq as td
    from torchdyn_deq import _loop, _models, _ode, _root, _step_control

    assert len(td.__all__) == len(set(td.__all__)) and all(hasattr(td, name) for name in td.__all__)
    public = {name for name in dir(td) if not name.startswith("_")}
    assert public - set(td.__all__) <= {"experiments"}, public - set(td.__all__)  # no unlisted re-export
    for module, name in [(_ode, "Tableau"), (_step_control, "StepController"), (_step_control, "StabilityRegion"),
                         (_ode, "adams_bashforth_weights"), (_root, "RootSolver"), (_models, "DEQVectorField"),
                         (_loop, "steady_state_solve"), (_loop, "SteadyStateSolver"), (_loop, "scaled_residual")]:
        assert hasattr(module, name) and not hasattr(td, name), name
    # the multiscale models are reached one way: td.multiscale.X
    assert not set(multiscale.__all__) & set(td.__all__) and td.multiscale is multiscale


def test_one_baseline_and_one_protocol():
    assert issubclass(multiscale.MultiscaleNeuralODE, InjectedNeuralODE) and issubclass(NeuralODELayer, InjectedNeuralODE)
    assert issubclass(multiscale.MDEQClassifier, ImplicitClassifier) and issubclass(MNISTNet, ImplicitClassifier)


def test_injected_neural_ode_gives_the_input_a_gradient():
    class F(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(3, 3)

        def forward(self, z, x):
            return torch.tanh(self.lin(z) + x)

    node = InjectedNeuralODE(F(), size=3, injection_shape=(3,), atol=1e-4, rtol=1e-4)
    x = torch.randn(4, 3, requires_grad=True)
    _, trajectory = node(x)
    trajectory[-1].sum().backward()
    assert trajectory.shape[1:] == (4, 3) and node.forward_nfe > 0 and node.backward_nfe() > 0
    assert x.grad is not None and x.grad.abs().sum() > 0
