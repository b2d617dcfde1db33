"""Evaluations to the steady state: NFE of the continuous forward solve per start, seed and solver.

The paper's MNIST layer ``f(z, x) = tanh(l2(tanh(l1(z))) + x)`` at random init, batch 32, width
128, tolerance 5e-3 (the MNIST experiment's), from the starts the experiment uses: zeros
(Vanilla), a random-init Skip predictor ``tanh(W x + b)`` (Skip), ``f(0, x)`` (Skip Reg.), and the
input itself (the library's default). NFE is deterministic (no clock), so the machine's load does
not matter and one run per configuration suffices::

    python -m benchmarks.nfe_count
    python -m benchmarks.nfe_count --seeds 8 --solvers tsit5,dopri5,vcab3

For the problem zoo (the public API's NFE table over small cases) run ``python tests/zoo.py``.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch

import torchdyn_deq as td
from benchmarks.harness import RESULTS, command_line, header, machine, markdown_table, write_results
from torchdyn_deq.experiments.mnist import InjectedLayer, skip_predictor

TOL = 5e-3  # the MNIST experiment's forward tolerance
STARTS = ("zeros", "skip", "skip_reg", "input")


def _initializer(start: str, width: int):
    if start == "skip":
        return td.SkipInitializer(skip_predictor(width))
    if start == "skip_reg":
        return td.SkipRegInitializer()
    return start


def measure(solvers: Sequence[str], seeds: int, batch: int = 32, width: int = 128,
            dtype: torch.dtype = torch.float32) -> List[dict]:
    """One row per solver and start: the NFE of each seed's no-grad solve, and whether all converged."""
    rows = []
    for solver in solvers:
        for start in STARTS:
            nfe, steps, converged = [], [], True
            for seed in range(seeds):
                torch.manual_seed(seed)
                f = InjectedLayer(width).to(dtype)
                x = torch.randn(batch, width, dtype=dtype)
                model = td.DEQ(f, solver=solver, atol=TOL, rtol=TOL, state_shape=(width,),
                               initializer=_initializer(start, width)).to(dtype)
                with torch.no_grad():
                    model(x)
                sol = model.solution
                nfe.append(int(sol.nfe))
                steps.append(f"{sol.steps_accepted}+{sol.steps_rejected}")
                converged &= bool(sol.converged)
            rows.append({"solver": solver, "start": start, "dtype": str(dtype).replace("torch.", ""), "nfe": nfe,
                         "mean_nfe": sum(nfe) / len(nfe), "steps": steps, "converged": converged})
    return rows


def table(rows: Sequence[dict]) -> str:
    body = [[r["solver"], r["start"], r["dtype"], f"{r['mean_nfe']:.2f}", " ".join(map(str, r["nfe"])),
             " ".join(r["steps"]), "yes" if r["converged"] else "NO"] for r in rows]
    return markdown_table(["solver", "start", "dtype", "mean NFE", "NFE per seed", "steps (accepted+rejected)",
                           "converged"], body, align="lllrlll")


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--solvers", default="tsit5,dopri5,vcab3", help="comma-separated continuous solvers")
    parser.add_argument("--seeds", type=int, default=8, help="random inits per start")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    parser.add_argument("--float64", action="store_true", help="also run in float64")
    parser.add_argument("--out", type=Path, default=RESULTS / "nfe_count", help="results stem (.md and .json)")
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    command = command_line("benchmarks.nfe_count", argv)
    start = time.perf_counter()
    solvers = args.solvers.split(",")
    rows = measure(solvers, args.seeds)
    if args.float64:
        rows += measure(solvers, args.seeds, dtype=torch.float64)
    info = machine(args.threads)
    text = (header("Evaluations to the steady state (MNIST layer, random init)", command, info, args.threads,
                   time.perf_counter() - start) + f"{table(rows)}\n\n"
            f"- Batch 32, width 128, atol = rtol = {TOL}, no-grad solves; NFE includes the start's evaluation "
            "(and Skip Reg.'s f(0, x)).\n")
    print(text)
    write_results(args.out, text, {"command": command.strip(), "machine": info, "rows": rows})


if __name__ == "__main__":
    main()
