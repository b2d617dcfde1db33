"""The ratio chart of the experiments' results (the paper's Figure 1 style)."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence, Tuple

import numpy as np


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
