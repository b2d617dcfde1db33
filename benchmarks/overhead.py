"""The solvers' own cost: time over the network's cost of the same work, side by side in one run.

For the paper's MNIST layer ``f(z, x) = tanh(l2(tanh(l1(z))) + x)`` at random init:

- forward overhead = no-grad solve time / (NFE x one evaluation of ``g = f - z``);
- backward overhead = ``backward()`` time / (GMRES iterations x one VJP of ``g`` in ``z``
  + one full VJP of ``g`` in ``z``, ``x`` and the parameters).

The time-steppers run eagerly and compiled (``compile=True``), side by side; the compile time
is the first solve's extra time over an eager first solve (every graph of the step compiled).

1.0 is the physical limit (nothing but the network). Every method's repeats are interleaved, and
the network's own costs are timed in every round with them, so a change of machine load or speed
affects all alike; medians are reported::

    python -m benchmarks.overhead --threads 1
    python -m benchmarks.overhead --threads 1 --sizes 32x128 --repeats 5   # quick

Results: ``benchmarks/results/overhead.{md,json}`` (or ``--out``).
"""
from __future__ import annotations

import argparse
import time
import warnings
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

import torchdyn_deq as td
from benchmarks.harness import RESULTS, command_line, header, machine, markdown_table, median, size, uncounted, write_results
from torchdyn_deq.experiments.mnist import InjectedLayer

SOLVERS = ("tsit5", "dopri5", "vcab3", "anderson", "broyden")
COMPILED = ("tsit5", "dopri5", "vcab3")  # the solvers with a compiled step
TOL = 5e-3  # the MNIST experiment's forward tolerance


def timed_median(fn, repeats: int, clock: Callable[[], float] = time.perf_counter) -> float:
    """Median seconds of `repeats` calls of `fn` on `clock`."""
    times = []
    for _ in range(repeats):
        start = clock()
        fn()
        times.append(clock() - start)
    return median(times)


def network_costs(f: InjectedLayer, x: torch.Tensor, repeats: int,
                  clock: Callable[[], float] = time.perf_counter) -> Dict[str, float]:
    """Median seconds of one ``g = f - z``, one VJP of ``g`` in ``z``, and one full VJP (``z``, ``x``,
    parameters) including the evaluation it differentiates (the backward's final product), on
    ``clock`` (wall time; ``time.thread_time`` for a benchmark that times CPU)."""
    z = torch.randn_like(x)
    v = torch.randn_like(x)
    with torch.no_grad():
        g_eval = timed_median(lambda: f(z, x) - z, repeats, clock)
    zl = z.clone().requires_grad_()
    gz = f(zl, x) - zl
    vjp_z = timed_median(lambda: torch.autograd.grad(gz, zl, v, retain_graph=True), repeats, clock)
    xg = x.clone().requires_grad_()
    inputs = [zl, xg, *f.parameters()]

    def full():
        torch.autograd.grad(f(zl, xg) - zl, inputs, v)
    return {"g_eval": g_eval, "vjp_z": vjp_z, "vjp_full": timed_median(full, repeats, clock)}


def per_round_median(rounds: Sequence[Dict[str, float]]) -> Dict[str, float]:
    """The median over rounds of each of `network_costs`' times."""
    return {key: median(r[key] for r in rounds) for key in rounds[0]}


def measure(size: Tuple[int, int], repeats: int, seed: int = 0, compiled: bool = True) -> List[dict]:
    """One row per solver and mode at ``(batch, width)``."""
    batch, width = size
    torch.manual_seed(seed)
    f = uncounted(InjectedLayer(width))
    x = torch.randn(batch, width)
    models = {(s, "eager"): td.DEQ(f, solver=s, atol=TOL, rtol=TOL, state_shape=(width,)) for s in SOLVERS}
    if compiled:
        models.update({(s, "compiled"): td.DEQ(f, solver=s, atol=TOL, rtol=TOL, state_shape=(width,), compile=True)
                       for s in COMPILED})
    keys = sorted(models, key=lambda k: (SOLVERS.index(k[0]), k[1] != "eager"))
    fwd: Dict[tuple, List[float]] = {k: [] for k in keys}
    bwd: Dict[tuple, List[float]] = {k: [] for k in keys}
    first: Dict[tuple, float] = {}
    info: Dict[tuple, Tuple[int, Optional[int]]] = {}
    v = torch.randn(batch, width)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for key in keys:  # the first solve and backward of each: compiles, for the compiled ones
            start = time.perf_counter()
            models[key](x)[1][-1].backward(v)
            first[key] = time.perf_counter() - start
        for _ in range(2):  # warm-up: allocator, first-call checks, the step variants not compiled yet
            for model in models.values():
                model(x)[1][-1].backward(v)
                with torch.no_grad():
                    model(x)
        rounds = []  # the network's costs, timed in every round with the solves (the machine's speed drifts)
        for _ in range(repeats):
            rounds.append(network_costs(f, x, 20))
            for key in keys:
                model = models[key]
                with torch.no_grad():
                    start = time.perf_counter()
                    model(x)
                    fwd[key].append(time.perf_counter() - start)
                nfe = model.solution.nfe
                xg = x.clone().requires_grad_()
                out = model(xg)[1][-1]
                start = time.perf_counter()
                out.backward(v)
                bwd[key].append(time.perf_counter() - start)
                info[key] = (nfe, model.solution.backward_iters)
    cost = per_round_median(rounds)
    rows = []
    for key in keys:
        name, mode = key
        nfe, iters = info[key]
        t_fwd, t_bwd = median(fwd[key]), median(bwd[key])
        rows.append({
            "size": f"{batch} x {width}", "solver": name, "mode": mode, "nfe": nfe, "backward_iters": iters,
            "forward_ms": 1e3 * t_fwd, "backward_ms": 1e3 * t_bwd,
            "forward_overhead": t_fwd / (nfe * cost["g_eval"]),
            "backward_overhead": t_bwd / ((iters or 0) * cost["vjp_z"] + cost["vjp_full"]),
            "compile_s": first[key] - first[(name, "eager")] if mode == "compiled" else 0.0,
            **{f"{k}_us": 1e6 * val for k, val in cost.items()},
        })
    return rows


def table(rows: Sequence[dict]) -> str:
    header = ["size", "solver", "mode", "NFE", "GMRES iters", "fwd (ms)", "bwd (ms)", "fwd / (NFE x g)",
              "bwd / (iters x VJP_z + full VJP)", "compile (s)", "g (us)", "VJP_z (us)", "full VJP (us)"]
    body = [[r["size"], r["solver"], r.get("mode", "eager"), r["nfe"], r["backward_iters"], f"{r['forward_ms']:.2f}",
             f"{r['backward_ms']:.2f}", f"{r['forward_overhead']:.2f}", f"{r['backward_overhead']:.2f}",
             f"{r['compile_s']:.1f}" if r.get("mode") == "compiled" else "", f"{r['g_eval_us']:.0f}",
             f"{r['vjp_z_us']:.0f}", f"{r['vjp_full_us']:.0f}"] for r in rows]
    return markdown_table(header, body, align="lllrrrrrrrrrr")


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="32x128,256x512", help="comma-separated BATCHxWIDTH")
    parser.add_argument("--repeats", type=int, default=15, help="timed solves per method (medians)")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    parser.add_argument("--no-compile", action="store_true", help="eager rows only (no compile time)")
    parser.add_argument("--out", type=Path, default=RESULTS / "overhead", help="results stem (.md and .json)")
    args = parser.parse_args(argv)
    args.sizes = [size(s) for s in args.sizes.split(",")]
    return args


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    command = command_line("benchmarks.overhead", argv)
    start = time.perf_counter()
    rows = [row for shape in args.sizes for row in measure(shape, args.repeats, compiled=not args.no_compile)]
    info = machine(args.threads)
    text = (header("Solver overhead over the network's cost", command, info, args.threads,
                   time.perf_counter() - start) + f"{table(rows)}\n\n"
            "- The paper's MNIST layer at random init, tolerance 5e-3, medians over the repeats.\n"
            "- fwd: a no-grad solve; bwd: `backward()` of the steady state (the implicit GMRES solve and the\n"
            "  parameter / input VJP). 1.0 in the overhead columns is the network alone (eager: g, VJP_z and\n"
            "  full VJP are eager calls, so a compiled step, which also fuses the network, can go below 1),\n"
            "  timed in every round of the repeats with the solves.\n"
            "- compiled: `compile=True` (the step body through torch.compile); compile (s): its first solve and\n"
            "  backward minus the eager one's (every graph compiled then; the backward is the same implicit solve).\n")
    print(text)
    write_results(args.out, text, {"command": command.strip(), "machine": info, "rows": rows})


if __name__ == "__main__":
    main()
