"""Every example smoke-runs on tiny sizes (its main() with small arguments)."""
from __future__ import annotations

import csv
import importlib.util
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


def test_steady_state_target():
    loss = load("steady_state_target").main(["--steps", "30", "--dim", "4", "--batch", "8"])
    assert loss < 0.2


def test_steady_state_target_discrete():
    loss = load("steady_state_target").main(["--steps", "5", "--dim", "4", "--batch", "8", "--solver", "anderson"])
    assert loss == loss  # finite


def test_mnist_pytorch():
    result = load("mnist_pytorch").main(["--steps", "3", "--width", "16", "--test-samples", "64",
                                         "--variant", "skip_reg"])
    assert 0.0 <= result["test_accuracy"] <= 100.0 and result["test_nfe"] > 0


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
    result = load("trajectory_supervision").main(["--steps", "3", "--width", "16", "--test-samples", "64"])
    assert 0.0 <= result["test_accuracy"] <= 100.0 and result["test_nfe"] > 0


def test_cifar_multiscale():
    record = load("cifar_multiscale").main(["--steps", "2", "--batch", "2"])
    assert record["nfe"] > 0 and record["backward_iters"] > 0 and record["loss"] == record["loss"]
