"""The MNIST step goals of several ``benchmarks.mnist_step`` results files, one line per file:
each method against the NeuralODE adjoint of the same run (interleaved with it, so machine load
affects both alike). Step and backward: times faster; predict: time over the NeuralODE's (below
1 is faster); milliseconds in parentheses::

    python -m benchmarks.compare_runs benchmarks/results/mnist_step_stop30/*.json
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Optional, Sequence

BASELINE = "NeuralODE (adjoint)"
METHODS = {  # short name -> the row of mnist_step
    "vanilla": "DEQ continuous vanilla (tsit5)",
    "vanillac": "DEQ continuous vanilla (tsit5, compiled)",
    "skip_reg": "DEQ continuous skip_reg (tsit5)",
    "skip_regc": "DEQ continuous skip_reg (tsit5, compiled)",
    "torchdeq": "torchdeq DEQ (anderson, IFT)",
}


def line(path: Path) -> str:
    rows = {row["method"]: row for row in json.loads(path.read_text())["rows"]}
    base = rows[BASELINE]
    parts = [f"{path.stem}: NODE step {1e3 * base['step_s']:.1f} ms, predict {1e3 * base['predict_s']:.2f} ms"]
    for short, name in METHODS.items():
        if name not in rows:
            continue
        r = rows[name]
        parts.append(f"{short}: step {base['step_s'] / r['step_s']:.2f}x ({1e3 * r['step_s']:.2f}) "
                     f"bwd {base['backward_s'] / r['backward_s']:.2f}x ({1e3 * r['backward_s']:.2f}) "
                     f"pred {r['predict_s'] / base['predict_s']:.2f} ({1e3 * r['predict_s']:.2f})")
    return " | ".join(parts)


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("files", nargs="+", type=Path, help="mnist_step results (.json)")
    for path in parser.parse_args(argv).files:
        print(line(path))


if __name__ == "__main__":
    main()
