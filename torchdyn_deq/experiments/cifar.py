"""CIFAR-10 with Multiscale DEQs: the paper's section 4.2 (Tables 2 and 3) as a command-line job.

Trains and tests MDEQ-small or MDEQ-large (``torchdyn_deq.multiscale``) in the selected forms
(continuous DEQ with VCAB3, discrete DEQ with L-Broyden, Vanilla / Skip / Skip Reg., and the
Multiscale Neural ODE with input injection) with the paper's recipe: AdamW, learning rate on a
cosine schedule from 1e-3 to 1e-6, weight decay 2.5e-6, batch 128, lambda_skip 0.01, tolerance
0.05. Prints a table shaped like Table 2 and writes ``results.md``, ``results.json`` and
``ratios.png`` to ``--out-dir``::

    python -m torchdyn_deq.experiments.cifar --data-dir ~/data --steps 20000        # the paper's run
    python -m torchdyn_deq.experiments.cifar --synthetic --steps 3 --batch-size 8   # offline smoke run

The step benchmark of the five forms side by side is ``python -m benchmarks.cifar_step``.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
import warnings
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import pytorch_lightning as pl
import torch
import torch.nn as nn
from pytorch_lightning.loggers import CSVLogger
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, TensorDataset

import torchdyn_deq as td
from torchdyn_deq.experiments.cli import comma_separated, positive
from torchdyn_deq.experiments.lightning import LitClassifier
from torchdyn_deq.experiments.reporting import machine_info, markdown_table, plot_time_ratios
from torchdyn_deq.multiscale import FORMS, VARIANTS, MDEQClassifier, mdeq_large, mdeq_small

LR, LR_MIN, WEIGHT_DECAY, LAMBDA_SKIP, TOL = 1e-3, 1e-6, 2.5e-6, 0.01, 0.05
MODELS: Dict[str, Callable[..., MDEQClassifier]] = {"small": mdeq_small, "large": mdeq_large}
LABELS = {"vanilla": "Vanilla DEQ", "skip": "Skip DEQ", "skip_reg": "Skip Reg. DEQ", "neural_ode": "Neural ODE"}
CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


def build_model(size: str, form: str, variant: str, seed: int, tol: float = TOL) -> MDEQClassifier:
    """The classifier of one table row, from ``seed`` (same stem / layer / head weights in every form)."""
    torch.manual_seed(seed)
    return MODELS[size](form, "vanilla" if form == "neural_ode" else variant, tol=tol, lambda_skip=LAMBDA_SKIP)


def label(form: str, variant: str) -> str:
    return LABELS["neural_ode" if form == "neural_ode" else variant]


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def make_optimizer(model: nn.Module, steps: int):
    """AdamW (lr 1e-3, weight decay 2.5e-6) and a per-step cosine schedule down to 1e-6."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, steps), eta_min=LR_MIN)
    return optimizer, schedule


# ---------------------------------------------------------------------------- training
class LitCIFAR(LitClassifier):
    """`LitClassifier` with the wall time of each training step, and unconverged solves
    (expected: the solve is capped at the paper's 18 steps) counted, not warned about at
    every step; AdamW with a cosine schedule (the paper's recipe)."""

    def __init__(self, net: MDEQClassifier, steps: int):
        super().__init__(net)
        self.steps = steps
        self.step_times: List[float] = []
        self.unconverged = 0
        self._step_start = 0.0

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        self._step_start = time.perf_counter()

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        self.step_times.append(time.perf_counter() - self._step_start)

    def training_step(self, batch: Tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        loss = super().training_step(batch, batch_idx)
        self.unconverged += int(self.net.solution is not None and not self.net.solution.converged)
        return loss

    def configure_optimizers(self):
        optimizer, schedule = make_optimizer(self.net, self.steps)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


def synthetic_data(n_train: int, n_test: int, seed: int = 0) -> Tuple[Dataset, Dataset]:
    """CIFAR-shaped random images (3x32x32, standard normal) and labels, from a fixed seed.
    Labels depend on the images (the sign pattern of channel means), so there is something to learn."""
    gen = torch.Generator().manual_seed(seed)
    images = torch.randn(n_train + n_test, 3, 32, 32, generator=gen)
    means = images.mean(dim=(2, 3))
    labels = ((means > 0).long() * torch.tensor([1, 2, 4])).sum(1) % 10
    return TensorDataset(images[:n_train], labels[:n_train]), TensorDataset(images[n_train:], labels[n_train:])


def cifar10(data_dir: Path) -> Tuple[Dataset, Dataset]:
    """torchvision's CIFAR-10 in ``data_dir`` (downloaded there if absent), normalized; random
    crops and flips for training."""
    from torchvision import datasets, transforms

    normalize = transforms.Normalize(CIFAR_MEAN, CIFAR_STD)
    train = transforms.Compose([transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip(),
                                transforms.ToTensor(), normalize])
    test = transforms.Compose([transforms.ToTensor(), normalize])
    return (datasets.CIFAR10(str(data_dir), train=True, download=True, transform=train),
            datasets.CIFAR10(str(data_dir), train=False, download=True, transform=test))


def train_and_test(form: str, variant: str, args: argparse.Namespace, train_set: Dataset, test_set: Dataset) -> dict:
    """Train one form for ``args.steps`` steps from ``args.seed`` and return its table row."""
    pl.seed_everything(args.seed, verbose=False)
    net = build_model(args.model, form, variant, args.seed, args.tol)
    model = LitCIFAR(net, args.steps)
    order = torch.Generator().manual_seed(args.seed)
    train_loader = DataLoader(train_set, batch_size=args.batch_size, shuffle=True, generator=order,
                              num_workers=args.workers, drop_last=True)
    test_loader = DataLoader(test_set, batch_size=args.batch_size, num_workers=args.workers)
    key = f"{form}-{variant}"
    trainer = pl.Trainer(
        max_steps=args.steps, max_epochs=-1, accelerator=args.device, devices=1,
        logger=CSVLogger(args.out_dir, name="logs", version=key), log_every_n_steps=1,
        enable_checkpointing=False, enable_progress_bar=not args.no_progress, enable_model_summary=False,
        limit_test_batches=args.limit_test_batches)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", td.ConvergenceWarning)
        start = time.perf_counter()
        trainer.fit(model, train_loader)
        train_time = time.perf_counter() - start
        trainer.test(model, test_loader, verbose=False)
    return {
        "model": label(form, variant), "form": form, "variant": variant, "size": args.model,
        "params": n_params(net), "test_accuracy": 100.0 * model.test_correct / max(1, model.test_seen),
        "test_nfe": statistics.fmean(model.test_nfe),
        "train_time_s": train_time, "step_time_s": statistics.median(model.step_times),
        "backward_time_s": statistics.median(model.backward_times),
        "predict_time_s": statistics.median(model.predict_times),
        "train_steps": trainer.global_step, "test_samples": model.test_seen,
        "unconverged_train_solves": model.unconverged,
    }


TABLE_COLUMNS = ("Model", "Continuous", "# Params", "Test Accuracy (%)", "Test NFE", "Training Time (s / batch)",
                 "Backward Pass (s / batch)", "Prediction Time (s / batch)")


def results_table(rows: Sequence[dict]) -> str:
    """The rows as a Markdown table shaped like the paper's Table 2."""
    return markdown_table(TABLE_COLUMNS, [
        [r["model"], "no" if r["form"] == "discrete" else "yes", f"{r['params']:,}", f"{r['test_accuracy']:.2f}",
         f"{r['test_nfe']:.1f}", f"{r['step_time_s']:.3f}", f"{r['backward_time_s']:.3f}", f"{r['predict_time_s']:.3f}"]
        for r in rows], align="ll" + "r" * 6)


def plot_ratios(rows: Sequence[dict], path: Path, title: str) -> None:
    """Training-step, backward and prediction times relative to the Neural ODE (or the first row)."""
    reference = next((r for r in rows if r["form"] == "neural_ode"), rows[0])
    others = [r for r in rows if r is not reference] or [reference]
    bars = (("step_time_s", "training step"), ("backward_time_s", "backward pass"), ("predict_time_s", "prediction"))
    plot_time_ratios(reference, others, [f"{r['model']}\n{r['form']}" for r in others], bars, title, path)


def run_training(args: argparse.Namespace) -> str:
    if args.synthetic:
        train_set, test_set = synthetic_data(args.steps * args.batch_size, args.test_samples, args.seed)
    else:
        train_set, test_set = cifar10(args.data_dir)
    rows = [train_and_test(form, variant, args, train_set, test_set) for form, variant in selected(args)]
    args.out_dir.mkdir(parents=True, exist_ok=True)
    table = results_table(rows)
    config = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    data = "synthetic random tensors" if args.synthetic else "CIFAR-10"
    (args.out_dir / "results.md").write_text(
        f"# CIFAR-10, MDEQ-{args.model} (paper Table {2 if args.model == 'small' else 3})\n\n{table}\n\n"
        f"{args.steps} step(s), batch {args.batch_size}, data: {data}; the paper trained "
        f"{20000 if args.model == 'small' else 90000} steps of batch 128.\n")
    (args.out_dir / "results.json").write_text(
        json.dumps({"rows": rows, "machine": machine_info(), "config": config}, indent=2))
    plot_ratios(rows, args.out_dir / "ratios.png", f"CIFAR-10 MDEQ-{args.model}: relative timings (lower is better)")
    return table


def selected(args: argparse.Namespace) -> List[Tuple[str, str]]:
    """(form, variant) pairs in table order; the Neural ODE only once, first."""
    rows = [("neural_ode", "vanilla")] if "neural_ode" in args.form else []
    rows += [(form, variant) for variant in args.variant for form in args.form if form != "neural_ode"]
    return rows


# ---------------------------------------------------------------------------- command line
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m torchdyn_deq.experiments.cifar", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", choices=tuple(MODELS), default="small", help="MDEQ-small (Table 2) or -large (Table 3)")
    parser.add_argument("--form", type=comma_separated(tuple(FORMS), allow_all=True), default="continuous",
                        help="comma-separated: continuous (VCAB3), discrete (L-Broyden), neural_ode (the baseline)")
    parser.add_argument("--variant", type=comma_separated(VARIANTS, allow_all=True), default="vanilla",
                        help="comma-separated DEQ variants: vanilla, skip, skip_reg")
    parser.add_argument("--steps", type=positive(int), default=20000, help="training steps (the paper: 20000 small, 90000 large)")
    parser.add_argument("--batch-size", type=positive(int), default=128, help="batch size (the paper's: 128)")
    parser.add_argument("--tol", type=positive(float), default=TOL, help="solver tolerance (the paper's: 0.05)")
    parser.add_argument("--synthetic", action="store_true", help="CIFAR-shaped random tensors (fixed seed), no download")
    parser.add_argument("--data-dir", type=Path, default=Path("data"),
                        help="where torchvision's CIFAR-10 is (downloaded there if absent)")
    parser.add_argument("--test-samples", type=positive(int), default=256, help="synthetic test-set size")
    parser.add_argument("--limit-test-batches", type=positive(int), default=None, help="test on at most this many batches")
    parser.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or gpu")
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights, data and batch order")
    parser.add_argument("--out-dir", type=Path, default=Path("runs/cifar"), help="results.md / .json / ratios.png and logs")
    parser.add_argument("--threads", type=positive(int), default=None, help="torch.set_num_threads")
    parser.add_argument("--no-progress", action="store_true", help="hide Lightning's progress bar")
    return parser


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.device in ("cuda", "gpu") and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: CUDA is not available on this machine (torch {torch.__version__}, "
                     f"built with CUDA {torch.version.cuda})")
    return args


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*does not have many workers.*")
        print(run_training(args))
    print(f"\nwritten to {args.out_dir}/results.md, results.json, ratios.png")


if __name__ == "__main__":
    main()
