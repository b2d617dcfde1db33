"""Reporting shared by the experiments and the benchmarks: the machine and library versions of a
results file, one Markdown table writer, and the ratio chart (the paper's Figure 1 style)."""
from __future__ import annotations

import platform
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Optional, Sequence, Tuple

import numpy as np
import pytorch_lightning as pl
import torch

import torchdyn_deq as td


def _version(package: str) -> str:
    try:
        return version(package)
    except PackageNotFoundError:
        return "not installed"


def machine_info() -> dict:
    """Platform, library versions and torch's thread count, for results files."""
    return {
        "platform": platform.platform(), "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(), "torch": torch.__version__, "torchdyn": _version("torchdyn"),
        "pytorch_lightning": pl.__version__, "torchdyn_deq": td.__version__,
        "torch_threads": torch.get_num_threads(),
    }


def markdown_table(columns: Sequence[str], rows: Sequence[Sequence[object]], align: Optional[str] = None) -> str:
    """A Markdown table of ``rows`` (each a sequence of cells, written with ``str``).

    Args:
        columns: the header cells.
        rows: one sequence of cells per row, as many as ``columns``.
        align: one character per column, ``'l'`` or ``'r'`` (default: all left); ``'r'``
            right-aligns numbers.
    """
    align = align or "l" * len(columns)
    if len(align) != len(columns) or set(align) - {"l", "r"}:
        raise ValueError(f"align needs one of 'l' / 'r' per column ({len(columns)}), got {align!r}")
    for i, row in enumerate(rows):
        if len(row) != len(columns):
            raise ValueError(f"row {i} has {len(row)} cells, the table has {len(columns)} columns: {list(row)}")
    rule = "|" + "|".join("---" if a == "l" else "--:" for a in align) + "|"
    lines = ["| " + " | ".join(columns) + " |", rule]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def plot_time_ratios(reference: dict, rows: Sequence[dict], labels: Sequence[str],
                     bars: Sequence[Tuple[str, str]], title: str, path: Path) -> None:
    """Grouped bars of ``row[key] / reference[key]`` for each ``(key, legend name)`` in
    ``bars``, one group per row, written as a PNG to ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    positions = np.arange(len(rows))
    width = 0.8 / len(bars)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.6 * len(rows)), 4.5))
    for i, (key, name) in enumerate(bars):
        offset = (i - (len(bars) - 1) / 2) * width
        ax.bar(positions + offset, [r[key] / reference[key] for r in rows], width=width, label=name)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks(positions, labels, fontsize=8)
    ax.set_ylabel(f"time relative to {reference['model']} ({reference['form']})")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
