"""Make the figure of the committed benchmark (docs/figures/benchmark_ratios.png).

    python docs/scripts/make_figures.py            # a second

``benchmark_ratios.png``: the time ratios against torchdyn's ``NeuralODE`` (adjoint) from
``benchmarks/results/mnist_step.json``. The tutorials' figures are made by running them
(``docs/scripts/tutorials.py``).
"""
from __future__ import annotations

import argparse
import textwrap
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
FIGURES = ROOT / "docs" / "figures"
BENCHMARK = ROOT / "benchmarks" / "results" / "mnist_step.json"


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
    parser.parse_args(argv)
    FIGURES.mkdir(parents=True, exist_ok=True)
    path = benchmark_figure()
    print(f"wrote {path.relative_to(ROOT)} ({path.stat().st_size // 1024} KiB)")


if __name__ == "__main__":
    main()
