"""Which step bodies gain from ``torch.compile``: each body eager and compiled, side by side in one
process, interleaved in bursts of calls, on the MNIST layer's size (batch 32, width 128 by default).

A compiled call has a cost of its own (its guards, the runtime wrapper) whatever its body does, and
it fuses only elementwise work: matrix products stay library calls. So it pays for a body of many
small elementwise operations and loses on one of a few, or on a network evaluation (whose guards
cover the network's parameters). The rows:

- ``floor``: ``x + y``, the cost of a compiled call by itself; ``20 ops``: ten ``x * y + 1``;
- ``tsit5 step``: six evaluations of ``g``, the stage combinations and the error ratio
  (`_rk_body`), without and with the eigenvalue estimate;
- ``vcab3 step``: the Adams combination and error ratio (`_ab_body`), without and with the estimate;
- ``vcab3 accept``: the evaluation at an accepted point, its secant and the point's stop test
  (`_ab_accept`; eager: the same, with the loop's test as it runs it between checks);
- ``GMRES Arnoldi step``: one Arnoldi iteration of the backward's GMRES (two Gram-Schmidt passes,
  the norm, the Hessenberg column, the residual estimate) in a fixed-shape form that compiles
  once per restart length (slices of a growing basis would compile once per iteration), against
  the iteration as `GMRES` runs it eagerly on slices (``GMRES iteration as run``: the slope of a
  12- against a 4-iteration solve with a matrix-product operator, the operator's cost taken off)::

    python -m benchmarks.compiled_bodies --threads 1

Results: ``benchmarks/results/compiled_bodies.{md,json}`` (or ``--out``).
"""
from __future__ import annotations

import argparse
import time
import warnings
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import torch
from torch import Tensor

from benchmarks.harness import RESULTS, command_line, header, machine, markdown_table, median, size
from benchmarks.harness import write_results
from torchdyn_deq import _ode
from torchdyn_deq._compile import CompiledStep
from torchdyn_deq._linear_solvers import GMRES
from torchdyn_deq._loop import RULES, StopInputs, stop_test
from torchdyn_deq._solution import SolveOptions
from torchdyn_deq.experiments.mnist import InjectedLayer


def arnoldi_step(w: Tensor, basis: Tensor, hessenberg: Tensor, null: Tensor, deficit: Tensor, j: Tensor):
    """GMRES's Arnoldi iteration ``j`` on a zero-padded basis (rows past ``j`` are zero, so products with
    the whole basis equal those with its first ``j + 1`` rows): ``w = A v_j`` orthogonalized twice, the
    Hessenberg column, ``v_{j+1}``, the null-vector entry and the stop test's deficit."""
    Vt = basis.mT
    h = torch.bmm(w, Vt)
    w = torch.baddbmm(w, h, basis, alpha=-1)
    h2 = torch.bmm(w, Vt)
    w = torch.baddbmm(w, h2, basis, alpha=-1)
    h = h + h2
    hn = torch.linalg.vector_norm(w, dim=2, keepdim=True)
    onehot = (torch.arange(basis.shape[1], device=w.device) == j + 1).to(w.dtype)
    hessenberg.index_copy_(1, j.view(1), h + hn * onehot)
    hn = hn.clamp_min(torch.finfo(w.dtype).tiny)
    v = w / hn
    basis.index_copy_(1, (j + 1).view(1), v)
    u = -torch.bmm(h, null) / hn
    null.index_copy_(1, (j + 1).view(1), u)
    deficit.addcmul_(u, u, value=-1)
    return v[:, 0], deficit.max()


def _add(x: Tensor, y: Tensor) -> Tensor:
    return x + y


def _elementwise(x: Tensor, y: Tensor) -> Tensor:
    for _ in range(10):
        x = x * y + 1
    return x


def bodies(batch: int, width: int) -> Dict[str, Callable[[bool], Callable[[], object]]]:
    """Name -> (compiled -> a call of the body): the eager body, or its `CompiledStep` with the
    arguments the solvers give it (a tensor for every number that changes between steps)."""
    torch.manual_seed(0)
    f = InjectedLayer(width)
    f.forward = lambda z, x: torch.tanh(f.l2(torch.tanh(f.l1(z))) + x)  # no Python counter in the graph
    x = torch.randn(batch, width)

    def g(t, z):
        return f(z, x) - z

    z = torch.randn(batch, width)
    k1 = g(0.0, z)
    evals = [torch.randn(batch, width) for _ in range(3)]
    secants = [(torch.randn(batch, width), torch.randn(batch, width)) for _ in range(2)]
    weights = [0.1, 0.2, -0.05, 0.01, -0.02, 0.005]
    tableau = _ode.ODESteadyStateSolver("tsit5")._tableau
    m = 20
    basis = torch.zeros(batch, m + 1, width)
    basis[:, 0] = torch.nn.functional.normalize(torch.randn(batch, width), dim=1)
    hessenberg, null = torch.zeros(batch, m, m + 1), torch.zeros(batch, m + 1, 1)
    null[:, 0] = 1.0
    deficit, w, j = torch.full((batch, 1, 1), 1e30), torch.randn(batch, 1, width), torch.tensor(3)
    y = torch.randn(batch, width)

    def make(fn, eager_args, compiled_args, variant=None, eager=None):
        step, eager = CompiledStep(fn, fn.__name__), eager or fn
        return lambda compiled: (lambda: step(variant, *compiled_args)) if compiled else (lambda: eager(*eager_args))

    numbers = torch.tensor([0.1, 0.05], dtype=torch.float64)
    ab = torch.tensor(weights, dtype=torch.float64)
    rows = {"floor (x + y)": make(_add, (z, y), (z, y)),
            "20 elementwise ops": make(_elementwise, (z, y), (z, y))}
    for estimate in (False, True):
        label = "with" if estimate else "without"
        rows[f"tsit5 step, {label} estimate"] = make(
            _ode._rk_body, (g, tableau, z, k1, (0.1, 0.05), 5e-3, 5e-3, estimate),
            (g, tableau, z, k1, numbers, 5e-3, 5e-3, estimate), estimate)
        rows[f"vcab3 step, {label} estimate"] = make(
            _ode._ab_body, (z, evals, weights, 5e-3, 5e-3, secants, estimate),
            (z, evals, ab, 5e-3, 5e-3, secants, estimate), estimate)

    def accept(g, t, z_new, z, g_old, stop):  # the eager path: the evaluation, the secant, the loop's test
        gz = g(t, z_new)
        return (gz, z_new - z, gz - g_old) + stop_test(gz, z_new, stop, False)

    ones = torch.ones(batch)
    options = SolveOptions(atol=5e-3, rtol=5e-3, max_steps=100)
    stop = StopInputs(RULES["per_sample"], options, torch.finfo(z.dtype).eps / 5e-3, ones, ones, 10 * ones, z,
                      10 * ones)
    rows["vcab3 accept (one evaluation, stop test)"] = make(
        _ode._ab_accept, (g, 0.3, z, evals[0], evals[1], stop),
        (g, torch.tensor([0.3]), z, evals[0], evals[1], stop), eager=accept)
    arnoldi = (w, basis, hessenberg, null, deficit, j)
    rows["GMRES Arnoldi step (fixed shape)"] = make(arnoldi_step, arnoldi, arnoldi)
    return rows


def gmres_iteration(batch: int, width: int) -> Dict[str, Callable[[], object]]:
    """Solves of 4 and 12 iterations (no convergence before) and the 8 matvecs between them."""
    torch.manual_seed(0)
    A = torch.eye(width) - 0.5 * torch.randn(width, width) / width ** 0.5
    b = torch.randn(batch, width)

    def matvec(u):
        return u @ A
    short, long = GMRES(rtol=1e-30, max_iters=4), GMRES(rtol=1e-30, max_iters=12)
    return {"4": lambda: short.solve(matvec, b), "12": lambda: long.solve(matvec, b),
            "matvecs": lambda: [matvec(b) for _ in range(8)]}


BURST = 5  # calls in a row: the first after another body meets cold caches, the others warm ones


def _burst(call: Callable[[], object], warm: List[float], cold: List[float]) -> None:
    for i in range(BURST):
        start = time.perf_counter()
        call()
        (cold if i == 0 else warm).append(time.perf_counter() - start)


def measure(batch: int, width: int, repeats: int) -> List[dict]:
    calls = {name: (make(False), make(True)) for name, make in bodies(batch, width).items()}
    sliced = gmres_iteration(batch, width)
    sliced_times: Dict[str, List[float]] = {k: [] for k in sliced}
    compile_s = {}
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, (eager, compiled) in calls.items():
            eager()
            start = time.perf_counter()
            compiled()
            compile_s[name] = time.perf_counter() - start
        times = {name: ([], []) for name in calls}
        cold = {name: ([], []) for name in calls}
        for _ in range(repeats // BURST):
            for name, pair in calls.items():
                for call, out, first in zip(pair, times[name], cold[name]):
                    _burst(call, out, first)
            for name, call in sliced.items():
                _burst(call, sliced_times[name], [])
    per_iteration = (median(sliced_times["12"]) - median(sliced_times["4"]) - median(sliced_times["matvecs"])) / 8
    run = dict(size=f"{batch}x{width}", body="GMRES iteration as run (eager, sliced)", eager_us=1e6 * per_iteration,
               compiled_us=None, ratio=None, compile_s=None, eager_cold_us=None,
               compiled_cold_us=None)
    return [dict(size=f"{batch}x{width}", body=name, eager_us=1e6 * median(e), compiled_us=1e6 * median(c),
                 ratio=median(c) / median(e), compile_s=compile_s[name], eager_cold_us=1e6 * median(cold[name][0]),
                 compiled_cold_us=1e6 * median(cold[name][1])) for name, (e, c) in times.items()] + [run]


def main(argv: Optional[Sequence[str]] = None) -> List[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=lambda s: [size(p) for p in s.split(",")], default=[(32, 128)])
    parser.add_argument("--repeats", type=int, default=500)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=RESULTS / "compiled_bodies")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    info = machine(args.threads)
    rows = [row for batch, width in args.sizes for row in measure(batch, width, args.repeats)]
    table = markdown_table(
        ["size", "body", "eager (us)", "compiled (us)", "compiled / eager", "eager, cold (us)", "compiled, cold (us)",
         "first call (s)"],
        [[r["size"], r["body"], f"{r['eager_us']:.1f}"]
         + (["—"] * 5 if r["ratio"] is None else [f"{r['compiled_us']:.1f}", f"{r['ratio']:.2f}",
                                                   f"{r['eager_cold_us']:.1f}", f"{r['compiled_cold_us']:.1f}",
                                                   f"{r['compile_s']:.1f}"])
         for r in rows])
    text = (header("Step bodies eager and compiled", command_line("benchmarks.compiled_bodies", argv), info,
                   args.threads, time.perf_counter() - started)
            + f"1-min load average at start {info['load_average_1min_at_start']:.2f}. Medians of {args.repeats} "
              f"calls in bursts of {BURST}, the bodies interleaved burst by burst (wall time, no autograd): eager and "
              "compiled from the warm calls of each burst, cold from its first (after the other bodies ran, as in a "
              "solve, where a body follows evaluations of the network); first call: the compiled body's first call, its "
              "compilation included (short when inductor's disk cache holds an earlier compile). Below 1.00 the compiled body is faster.\n\n" + table + "\n")
    write_results(args.out, text, dict(machine=info, rows=rows))
    print(text)
    return rows


if __name__ == "__main__":
    main()
