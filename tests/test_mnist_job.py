"""The MNIST experiment CLI (torchdyn_deq.experiments.mnist) and the step benchmark, end to end
on tiny slices of the data."""
import importlib
import json
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

import torchdyn_deq as td
from torchdyn_deq.experiments import mnist

REPO = Path(__file__).resolve().parents[1]


def _benchmark(name: str):
    """The benchmark module ``benchmarks.<name>`` (benchmarks/ is a package)."""
    return importlib.import_module(f"benchmarks.{name}")


def test_cli_trains_tests_and_writes_the_table(tmp_path, capsys):
    mnist.main(["--limit-train-batches", "3", "--limit-test-batches", "2", "--epochs", "1",
                "--variants", "vanilla,skip_reg", "--forms", "continuous", "--jacobian", "no",
                "--baseline", "--no-progress", "--threads", "1", "--out-dir", str(tmp_path)])

    expected = [("Neural ODE", "neural_ode"), ("Vanilla DEQ", "vanilla"), ("Skip Reg. DEQ", "skip_reg")]
    table = (tmp_path / "results.md").read_text()
    assert "| Model | Continuous | Jacobian Reg. | # Params |" in table and "Backward Pass (s / batch)" in table
    body = [line for line in table.splitlines() if line.startswith("| ") and not line.startswith("| Model")]
    assert [line.split(" | ")[0][2:] for line in body] == [label for label, _ in expected]
    assert table.split("\n\n")[1] in capsys.readouterr().out

    results = json.loads((tmp_path / "results.json").read_text())
    rows = results["rows"]
    assert [(r["model"], r["variant"]) for r in rows] == expected
    for row in rows:
        assert row["form"] == "continuous" and row["jacobian"] is False
        assert row["train_steps"] == 3 and row["test_samples"] == 64
        assert 0 <= row["test_accuracy"] <= 100
        assert row["test_nfe"] >= 1 and row["train_time_s"] > 0 and row["predict_time_s"] > 0
        assert 0 < row["backward_time_s"] < row["train_time_s"]
    assert rows[0]["params"] == rows[1]["params"] == 784 * 128 + 128 + 2 * (128 * 128 + 128) + 128 * 10 + 10
    assert {"platform", "torch", "torchdyn", "pytorch_lightning", "torch_threads"} <= set(results["machine"])

    assert (tmp_path / "ratios.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    header = (tmp_path / "logs" / "vanilla-continuous-nojac" / "metrics.csv").read_text().splitlines()[0]
    assert {"loss", "nfe", "backward_iters"} <= set(header.split(","))
    node_header = (tmp_path / "logs" / "neural_ode-continuous-nojac" / "metrics.csv").read_text().splitlines()[0]
    assert "backward_nfe" in node_header.split(",")


@pytest.mark.parametrize("argv, message", [
    (["--bogus"], "unrecognized arguments: --bogus"),
    (["--data", "torchvision"], "--data torchvision needs --data-dir"),
    (["--data", "torchvision", "--data-dir", "{missing}"], "does not exist or is not a directory"),
    (["--variants", "vanilla,skip_regg"], "expected a comma-separated subset of vanilla, skip, skip_reg"),
    (["--forms", "implicit"], "argument --forms"),
    (["--epochs", "0"], "expected a positive int"),
    (["--tol", "abc"], "expected a positive float"),
])
def test_cli_rejects_bad_arguments_with_a_clear_message(argv, message, tmp_path, capsys):
    argv = [arg.format(missing=tmp_path / "missing") for arg in argv]
    with pytest.raises(SystemExit) as exit_info:
        mnist.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "usage: torchdyn-deq-mnist" in err and message in err


def test_neural_ode_baseline_gives_the_encoder_a_gradient():
    torch.manual_seed(0)
    net = mnist.MNISTNet(lambda f: mnist.build_layer(mnist.Variant("neural_ode"), f, 5e-3))
    net(torch.rand(4, 784)).sum().backward()
    assert net.encoder.weight.grad is not None and net.encoder.weight.grad.abs().sum() > 0
    assert net.backward_stats()["backward_nfe"] > 0


@pytest.mark.slow  # about 12 s on 2 idle cores, up to 30 s when they are shared
def test_step_benchmark_smoke(tmp_path):
    out = subprocess.run([sys.executable, "-m", "benchmarks.mnist_step", "--smoke", "--threads", "1",
                          "--out-dir", str(tmp_path)], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert out.returncode == 0, out.stderr
    methods = ["DEQ continuous vanilla (tsit5)", "DEQ continuous skip (tsit5)", "DEQ continuous skip_reg (tsit5)",
               "DEQ continuous vanilla (tsit5, backward tol = tol)",
               "DEQ continuous vanilla (tsit5, Jacobian-free backward: approximate gradient)",
               "DEQ continuous vanilla (tsit5, phantom k=5, tau=0.5: approximate gradient)",
               "DEQ continuous vanilla (tsit5, per-sample)", "DEQ continuous skip_reg (tsit5, per-sample)",
               "DEQ continuous skip_reg (tsit5, Neumann backward)",
               "DEQ continuous vanilla (vcab3)", "DEQ continuous skip_reg (vcab3)", "DEQ discrete vanilla (anderson)",
               "NeuralODE (adjoint)", "NeuralODE (adjoint, adjoint tol = tol)", "NeuralODE (autograd)",
               "NeuralODE (torchdiffeq odeint_adjoint, dopri5)", "torchdeq DEQ (anderson, IFT)",
               "torchdeq DEQ (its defaults: fixed-point iteration, 1-step phantom gradient)"]
    assert "| Method | fwd (ms) | bwd (ms) | step (ms) |" in out.stdout
    rows = [line for line in out.stdout.splitlines() if line.startswith("| ") and not line.startswith("| Method")]
    assert [row.split(" | ")[0][2:] for row in rows] == methods
    assert "| NeuralODE (adjoint) |" in out.stdout and "1.00 | 1.00 | 1.00 | 1.00 |" in out.stdout

    results = json.loads((tmp_path / "mnist_step.json").read_text())
    assert results["command"].startswith("python -m benchmarks.mnist_step --smoke")
    assert results["machine"]["torch_threads"] == 1 and "torchdeq" in results["machine"]
    assert results["machine"]["device"] == "cpu" and ", device cpu, " in (tmp_path / "mnist_step.md").read_text()
    by_name = {r["method"]: r for r in results["rows"]}
    assert by_name["NeuralODE (adjoint)"]["ratio"]["step_s"] == 1.0
    assert by_name["NeuralODE (autograd)"]["backward_count"] is None
    for name in methods:
        row = by_name[name]
        assert row["steps_measured"] == 3 and row["forward_f_evals"] >= 1 and row["step_s"] > 0
    assert (tmp_path / "mnist_step.md").read_text().count("| DEQ ") == 12
    # the paper's backward tolerance: fewer GMRES iterations than the default 1e-5 (two networks trained
    # separately from the same seed for two steps: 0.005 against 1e-5 leaves a wide margin)
    assert by_name["DEQ continuous vanilla (tsit5, backward tol = tol)"]["backward_count"] <= \
        by_name["DEQ continuous vanilla (tsit5)"]["backward_count"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without CUDA")
@pytest.mark.parametrize("name", ["mnist_step", "sync_count"])
def test_benchmarks_refuse_cuda_without_gpu(name, capsys):
    with pytest.raises(SystemExit) as exit_info:
        _benchmark(name).parse_args(["--device", "cuda"])
    assert exit_info.value.code == 2
    assert "--device cuda: CUDA is not available on this machine" in capsys.readouterr().err


def test_sync_count_counts_every_sync_warning(monkeypatch):
    """The counting wiring, with torch's sync debug mode stood in for: every "called a synchronizing
    CUDA operation" warning counts (repeats from one line too), convergence warnings apart."""
    sync_count = _benchmark("sync_count")
    modes = []
    monkeypatch.setattr(torch.cuda, "get_sync_debug_mode", lambda: 0)
    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", modes.append)
    with sync_count.counting(torch.device("cuda")) as count:
        for _ in range(3):
            warnings.warn("called a synchronizing CUDA operation (Triggered internally at CUDAFunctions.cpp:1.)")
        warnings.warn("no steady state", td.ConvergenceWarning)
        float(torch.ones(()))
        bool(torch.ones(()))
    assert modes == ["warn", 0]  # switched on, then back to the previous mode
    assert count.cuda_syncs == 3 and count.unconverged == 1 and count.other_warnings == []
    assert count.conversions == {"__float__": 1, "__bool__": 1}
    assert list(count.sites.values()) == [3] and next(iter(count.sites)).startswith("tests/test_mnist_job.py:")
    with sync_count.counting(torch.device("cpu")) as count:
        warnings.warn("called a synchronizing CUDA operation")
    assert count.cuda_syncs is None and modes == ["warn", 0]


@pytest.mark.slow  # about 10 s on 2 idle cores
def test_sync_count_dry_run_on_cpu(tmp_path):
    out = subprocess.run([sys.executable, "-m", "benchmarks.sync_count", "--device", "cpu",
                          "--warmup", "1", "--batches", "1", "--out", str(tmp_path / "sync")],
                         capture_output=True, text=True, timeout=300, cwd=REPO)
    assert out.returncode == 0, out.stderr
    assert "dry run on the CPU: CUDA syncs are n/a" in out.stdout
    results = json.loads((tmp_path / "sync.json").read_text())
    rows = {r["method"]: r for r in results["rows"]}
    assert list(rows) == ["DEQ continuous vanilla (tsit5)", "DEQ continuous skip_reg (tsit5)",
                          "DEQ continuous vanilla (vcab3)", "DEQ discrete vanilla (anderson)", "NeuralODE (adjoint)",
                          "torchdeq DEQ (anderson, IFT)"]
    for name, row in rows.items():
        assert row["forward"]["cuda_syncs"] is None and row["forward"]["conversions"] > 0, name
        assert row["f_evals"] >= 1 and row["backward_steps"] >= 1, name
    assert rows["DEQ continuous vanilla (tsit5)"]["steps"] >= 1 and rows["NeuralODE (adjoint)"]["steps"] >= 1
    assert rows["torchdeq DEQ (anderson, IFT)"]["steps"] is None
    assert (tmp_path / "sync.md").read_text().count("| n/a |") >= 6
