"""Every example smoke-runs on tiny sizes (its main() with small arguments)."""
from __future__ import annotations

import csv
import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def load(name: str):
    """Import examples/<name>.py as a module (the examples folder is not a package)."""
    sys.path.insert(0, str(EXAMPLES))  # mnist_lightning imports mnist_pytorch
    try:
        spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(EXAMPLES))
    return module


@pytest.fixture(autouse=True)
def one_thread(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("solver, steps", [("tsit5", 30), ("anderson", 30)])
def test_steady_state_target(solver, steps):
    """Training through the implicit gradient alone (no other parameters) cuts the loss."""
    example = load("steady_state_target")
    args = ["--dim", "4", "--batch", "8", "--solver", solver]
    initial = example.main(["--steps", "1", *args])  # the loss before any update
    trained = example.main(["--steps", str(steps), *args])
    assert math.isfinite(trained) and trained < 0.5 * initial, (initial, trained)


def test_mnist_pytorch():
    result = load("mnist_pytorch").main(["--steps", "10", "--width", "16", "--test-samples", "256",
                                         "--variant", "skip_reg"])
    # 10 classes: chance is 10%; 10 Adam steps reach about 40% on this seed
    assert result["test_accuracy"] > 25.0 and result["test_nfe"] > 0, result


def test_mnist_lightning(tmp_path):
    result = load("mnist_lightning").main(["--max-steps", "3", "--width", "16", "--test-batches", "1",
                                           "--log-dir", str(tmp_path / "logs")])
    with open(result["metrics_csv"]) as handle:
        rows = list(csv.DictReader(handle))
    logged = [row for row in rows if row.get("nfe")]
    assert len(logged) == 3
    for row in logged:
        assert float(row["nfe"]) > 0 and float(row["residual"]) <= 1 and float(row["backward_iters"]) > 0


def test_torchdyn_moons():
    result = load("torchdyn_moons").main(["--epochs", "4", "--samples", "128"])
    assert result["converged"] and result["t_reached"] > 1 and result["accuracy"] > 0.7


def test_trajectory_supervision():
    result = load("trajectory_supervision").main(["--steps", "10", "--width", "16", "--test-samples", "256"])
    assert result["test_accuracy"] > 25.0 and result["test_nfe"] > 0, result  # chance: 10%


def test_cifar_multiscale():
    record = load("cifar_multiscale").main(["--steps", "2", "--batch", "2"])
    assert record["nfe"] > 0 and record["backward_iters"] > 0, record
    assert math.isfinite(record["loss"]) and math.isfinite(record["residual"]), record


def test_porting_torchdyn(tmp_path):
    """The porting measurement runs, records each row (a failing one included) and writes both files."""
    results = load("porting_torchdyn").main(["--epochs", "2", "--samples", "64", "--test-samples", "64",
                                             "--rows", "0,2", "--out", str(tmp_path / "porting")])
    tutorial, fixed = results["rows"]
    assert tutorial["steps_done"] == 2 and tutorial["loss_finite"] and tutorial["forward_nfe_median"] > 0
    assert fixed["steps_done"] == 2 and fixed["loss_finite"] and fixed["unconverged_forward"] == 0
    assert fixed["test"]["converged"] and fixed["backward_median"] > 0
    assert (tmp_path / "porting.json").is_file() and "| quickstart | injection + `-z` |" in (tmp_path / "porting.md").read_text()
