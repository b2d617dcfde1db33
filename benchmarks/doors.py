"""The doors into the one core, side by side: what a call costs by each API on the same problem.

The paper's MNIST layer ``f(z, x) = tanh(l2(tanh(l1(z))) + x)`` at random init, tsit5 at
tolerance 5e-3, from ``z0 = 0``; one call = forward solve + ``backward()`` (implicit GMRES):

- ``DEQ(f)``, built once, called;
- ``InfiniteTimeNeuralODE(vf)`` and torchdyn's ``NeuralODE(vf, sensitivity='steady_state')`` to
  ``t = inf``, with ``vf(t, z) = f(z, x) - z``;
- ``odeint_steady_state(vf, z0, batched=True)``, the functional door (nothing built per call
  but the `Field`).

Every door's repeats are interleaved, so a change of machine load affects all alike; medians
are reported, with each door's ratio to ``DEQ(f)``::

    python -m benchmarks.doors --threads 1

Results: ``benchmarks/results/doors.{md,json}`` (or ``--out``).
"""
from __future__ import annotations

import argparse
import time
import warnings
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.nn as nn
from torchdyn.core import NeuralODE

import torchdyn_deq as td
from benchmarks.harness import RESULTS, command_line, header, machine, markdown_table, median, size, write_results
from torchdyn_deq.experiments.mnist import InjectedLayer

TOL = 5e-3  # the MNIST experiment's forward tolerance
INF = torch.tensor([0.0, float("inf")])


class _VectorField(nn.Module):
    def __init__(self, f: nn.Module, x: torch.Tensor):
        super().__init__()
        self.f, self.x = f, x

    def forward(self, t, z, args=None):
        return self.f(z, self.x) - z


def doors(f: nn.Module, x: torch.Tensor) -> Dict[str, Callable[[], torch.Tensor]]:
    """One call of each door: the steady state, differentiable."""
    z0 = torch.zeros_like(x)
    vf = _VectorField(f, x)
    deq = td.DEQ(f, atol=TOL, rtol=TOL, state_shape=tuple(x.shape[1:]))
    itnode = td.InfiniteTimeNeuralODE(vf, atol=TOL, rtol=TOL)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        neural_ode = NeuralODE(vf, sensitivity="steady_state", atol=TOL, rtol=TOL)
    return {
        "DEQ(f)": lambda: deq(x)[1][-1],
        "InfiniteTimeNeuralODE(vf)": lambda: itnode(z0)[1][-1],
        "NeuralODE(vf, 'steady_state')": lambda: neural_ode(z0, INF)[1][-1],
        "odeint_steady_state": lambda: td.odeint_steady_state(vf, z0, atol=TOL, rtol=TOL, batched=True),
    }


def measure(batch: int, width: int, repeats: int, seed: int = 0) -> List[dict]:
    torch.manual_seed(seed)
    f = InjectedLayer(width)
    x = torch.randn(batch, width)
    v = torch.randn(batch, width)
    calls = doors(f, x)
    times: Dict[str, List[float]] = {name: [] for name in calls}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(2):  # warm-up: allocator, first-call checks
            for call in calls.values():
                call().backward(v)
        for _ in range(repeats):
            for name, call in calls.items():
                start = time.perf_counter()
                call().backward(v)
                times[name].append(time.perf_counter() - start)
    base = median(times["DEQ(f)"])
    return [{"size": f"{batch} x {width}", "door": name, "ms": 1e3 * median(t), "ratio": median(t) / base}
            for name, t in times.items()]


def table(rows: Sequence[dict]) -> str:
    body = [[r["size"], r["door"], f"{r['ms']:.2f}", f"{r['ratio']:.3f}"] for r in rows]
    return markdown_table(["size", "door", "forward + backward (ms)", "/ DEQ(f)"], body, align="llrr")


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="32x128,256x512", help="comma-separated BATCHxWIDTH")
    parser.add_argument("--repeats", type=int, default=15, help="timed calls per door (medians)")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    parser.add_argument("--out", type=Path, default=RESULTS / "doors", help="results stem (.md and .json)")
    args = parser.parse_args(argv)
    try:
        args.sizes = [size(s) for s in args.sizes.split(",")]
    except argparse.ArgumentTypeError as error:
        parser.error(f"--sizes: {error}")
    return args


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    command = command_line("benchmarks.doors", argv)
    start = time.perf_counter()
    rows = [row for batch, width in args.sizes for row in measure(batch, width, args.repeats)]
    info = machine(args.threads)
    text = (header("The doors into the one core: cost per call", command, info, args.threads,
                   time.perf_counter() - start) + f"{table(rows)}\n\n"
            "- The paper's MNIST layer at random init, tsit5 at tolerance 5e-3, from z0 = 0; medians of\n"
            "  interleaved repeats of one forward solve + `backward()`. The same problem through each door.\n")
    print(text)
    write_results(args.out, text, {"command": command.strip(), "machine": info, "rows": rows})


if __name__ == "__main__":
    main()
