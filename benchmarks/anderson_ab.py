"""Anderson acceleration of this checkout against older commits', side by side in one process.

Each older ``torchdyn_deq/_root.py`` (``git show REV:...``) is imported as a separate module beside
the package, so the solvers run on the same loop, layer and inputs; their repeats alternate and
medians are reported. For the paper's MNIST layer ``f(z, x) = tanh(l2(tanh(l1(z))) + x)`` at random
init (by default at the MNIST tolerance, whose 5 NFE never fill the history; ``--tols`` for longer
solves): forward overhead = no-grad solve time / (NFE x one evaluation of ``g = f - z``), and
Anderson's own time per iteration (``propose`` without its ``g``, plus ``decide``)::

    python -m benchmarks.anderson_ab --threads 1 --sizes 32x128 --before baa26a1
    python -m benchmarks.anderson_ab --threads 1 --sizes 32x128,256x512 --tols 5e-3,1e-6 --before ab5d9b1,baa26a1

Results: ``benchmarks/results/anderson_ab.{md,json}`` (or ``--out``).
"""
from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch

import torchdyn_deq as td
from benchmarks.harness import RESULTS, command_line, header, machine, markdown_table, median, size, uncounted, write_results
from benchmarks.overhead import TOL
from torchdyn_deq.experiments.mnist import InjectedLayer

ROOT = Path(__file__).resolve().parent.parent
# CPU time of this thread, not wall time: the run is single-threaded (--threads 1), and on a shared
# machine the wall clock also counts the time other processes held the core
CLOCK = time.thread_time


def older_anderson(rev: str) -> type:
    """``AndersonAcceleration`` of commit ``rev``, its relative imports pointed at this package."""
    source = subprocess.run(["git", "show", f"{rev}:torchdyn_deq/_root.py"], cwd=ROOT, check=True,
                            capture_output=True, text=True).stdout.replace("from ._", "from torchdyn_deq._")
    path = Path(tempfile.mkdtemp()) / f"root_{rev}.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(f"root_{rev}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.AndersonAcceleration


def _own_time(solver) -> List[float]:
    """Wrap ``solver``'s ``propose`` / ``decide`` to add their seconds, less ``g``'s, to a counter."""
    spent = [0.0]

    def timed(method):
        def wrapper(g, *args):
            inner = [0.0]

            def g_timed(t, z):
                start = CLOCK()
                out = g(t, z)
                inner[0] += CLOCK() - start
                return out
            start = CLOCK()
            out = method(g_timed, *args)
            spent[0] += CLOCK() - start - inner[0]
            return out
        return wrapper
    solver.propose, solver.decide = timed(solver.propose), timed(solver.decide)
    return spent


def measure(shape: Tuple[int, int], repeats: int, before: Sequence[str], tol: float = TOL) -> List[dict]:
    batch, width = shape
    torch.manual_seed(0)
    f = uncounted(InjectedLayer(width))
    x = torch.randn(batch, width)
    z = torch.randn_like(x)
    solvers = {**{rev: older_anderson(rev)() for rev in before}, "this checkout": td.AndersonAcceleration()}
    spent = {k: _own_time(s) for k, s in solvers.items()}
    models = {k: td.DEQ(f, solver=s, atol=tol, rtol=tol, state_shape=(width,)) for k, s in solvers.items()}
    times: Dict[str, List[float]] = {k: [] for k in models}
    g_times: List[float] = []
    own: Dict[str, List[float]] = {k: [] for k in models}
    with torch.no_grad():
        for _ in range(3):  # warm-up
            for model in models.values():
                model(x)
        for _ in range(repeats):
            for key, model in models.items():
                spent[key][0] = 0.0
                start = CLOCK()
                model(x)
                times[key].append(CLOCK() - start)
                own[key].append(spent[key][0] / max(model.solution.iterations, 1))
            for _ in range(5):  # one evaluation of g, on the same clock, between the solves
                start = CLOCK()
                f(z, x) - z
                g_times.append(CLOCK() - start)
    g_eval = median(g_times)
    rows = []
    for key, model in models.items():
        nfe, t = model.solution.nfe, median(times[key])
        rows.append({"size": f"{batch} x {width}", "tol": tol, "anderson": key, "nfe": nfe, "forward_ms": 1e3 * t,
                     "forward_overhead": t / (nfe * g_eval), "own_us_per_iteration": 1e6 * median(own[key]),
                     "g_eval_us": 1e6 * g_eval})
    base = rows[0]
    for r in rows:
        r["after_over_before"] = r["forward_ms"] / base["forward_ms"]
        r["own_after_over_before"] = r["own_us_per_iteration"] / base["own_us_per_iteration"]
    return rows


def table(rows: Sequence[dict]) -> str:
    head = ["size", "tol", "anderson", "NFE", "fwd (ms)", "fwd / (NFE x g)", "fwd ratio", "own (us / iteration)",
            "own ratio", "g (us)"]
    body = [[r["size"], f"{r['tol']:g}", r["anderson"], r["nfe"], f"{r['forward_ms']:.2f}", f"{r['forward_overhead']:.2f}",
             f"{r['after_over_before']:.2f}", f"{r['own_us_per_iteration']:.0f}", f"{r['own_after_over_before']:.2f}",
             f"{r['g_eval_us']:.0f}"] for r in rows]
    return markdown_table(head, body, align="lllrrrrrrr")


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="32x128,256x512", help="comma-separated BATCHxWIDTH")
    parser.add_argument("--repeats", type=int, default=51, help="timed solves per side (medians)")
    parser.add_argument("--tols", default=f"{TOL:g}",
                        help="comma-separated tolerances (atol = rtol; the default is the MNIST experiment's)")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    parser.add_argument("--before", default="baa26a1", help="comma-separated commits whose Anderson is compared")
    parser.add_argument("--out", type=Path, default=RESULTS / "anderson_ab", help="results stem (.md and .json)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    command = command_line("benchmarks.anderson_ab", argv)
    start = time.perf_counter()
    rows = [row for s in args.sizes.split(",") for tol in args.tols.split(",")
            for row in measure(size(s), args.repeats, args.before.split(","), float(tol))]
    info = machine(args.threads)
    text = (header(f"Anderson acceleration: this checkout against {args.before}, on this checkout's loop", command, info, args.threads,
                   time.perf_counter() - start) + f"{table(rows)}\n\n"
            "- The paper's MNIST layer at random init, no-grad solves, repeats alternating, medians of\n"
            "  the thread's CPU time (`time.thread_time`: not the time other processes held the core).\n"
            "- ratio: this row over the first; own: `propose` (less its `g`) plus `decide`, per iteration.\n")
    print(text)
    write_results(args.out, text, {"command": command.strip(), "machine": info, "rows": rows})


if __name__ == "__main__":
    main()
