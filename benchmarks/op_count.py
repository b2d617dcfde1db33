"""Where the solvers' own cost goes: the tensor operations of one solve and one backward outside
the network, counted by the package function that issues them, with their time.

At the paper's size one evaluation of the network is a few dozen microseconds and every other
tensor operation costs its dispatch (a few microseconds, Python included), so a solver's
overhead over the network (``benchmarks.overhead``) is about its count of operations outside
the network times that cost. For the paper's MNIST layer at random init (eager; a compiled
step's operations are not dispatched one by one):

- the aten operations of one no-grad forward solve and of one ``backward()`` through the
  implicit gradient, by function (``TorchDispatchMode``: every operation the dispatcher runs,
  the network's own in its row);
- the time outside the network (the solve's median time minus NFE x one evaluation; the
  backward's minus its VJPs) per operation outside it, against one small operation's dispatch
  alone (the rest is the host's Python).

::

    python -m benchmarks.op_count --threads 1

Results: ``benchmarks/results/op_count.{md,json}`` (or ``--out``).
"""
from __future__ import annotations

import argparse
import collections
import time
import traceback
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import torchdyn_deq as td
from benchmarks.harness import RESULTS, command_line, header, machine, markdown_table, median, size, uncounted, \
    write_results
from benchmarks.overhead import TOL, network_costs, per_round_median, timed_median
from torchdyn_deq.experiments.mnist import InjectedLayer

SOLVERS = ("tsit5", "vcab3", "anderson", "broyden")
NETWORK = "network"
TOP = 8  # functions listed per solve


class _CountOps(TorchDispatchMode):
    """Counts every dispatched operation by the innermost frame of this package that issued it
    (``network`` for the layer's own, ``other`` outside the package)."""

    def __init__(self, network_file: str):
        super().__init__()
        self.network_file, self.counts = network_file, collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        where = "other"
        for frame in reversed(traceback.extract_stack()):
            if frame.filename == self.network_file:
                where = NETWORK
                break
            if "/torchdyn_deq/" in frame.filename:
                where = f"{frame.filename.rsplit('/', 1)[-1]}:{frame.name}"
                break
        self.counts[where] += 1
        return func(*args, **(kwargs or {}))


def _count(fn, network_file: str) -> collections.Counter:
    mode = _CountOps(network_file)
    with mode:
        fn()
    return mode.counts


def _vjp_ops(f, x, network_file: str) -> Dict[str, int]:
    """Operations of one VJP of ``g = f - z`` in ``z`` and of one full VJP with its evaluation
    (the backward's units, as timed by `network_costs`)."""
    z = torch.randn_like(x).requires_grad_()
    xg = x.clone().requires_grad_()
    inputs = [z, xg, *f.parameters()]
    gz = f(z, x) - z
    vjp_z = _count(lambda: torch.autograd.grad(gz, z, x, retain_graph=True), network_file)
    full = _count(lambda: torch.autograd.grad(f(z, xg) - z, inputs, x), network_file)
    return {"vjp_z": sum(vjp_z.values()), "vjp_full": sum(full.values())}


def measure(batch: int, width: int, repeats: int, seed: int = 0) -> List[dict]:
    torch.manual_seed(seed)
    f = uncounted(InjectedLayer(width))
    x, v = torch.randn(batch, width), torch.randn(batch, width)
    network_file = type(f).forward.__code__.co_filename
    vjp_ops = _vjp_ops(f, x, network_file)
    models = {name: td.DEQ(f, solver=name, atol=TOL, rtol=TOL, state_shape=(width,)) for name in SOLVERS}
    fwd: Dict[str, List[float]] = {name: [] for name in SOLVERS}
    bwd: Dict[str, List[float]] = {name: [] for name in SOLVERS}
    for _ in range(3):
        for model in models.values():
            model(x)[1][-1].backward(v)
    rounds, adds = [], []
    for _ in range(repeats):  # interleaved, the network's costs too: a change of machine speed affects all alike
        rounds.append(network_costs(f, x, 20))
        adds.append(timed_median(lambda: x + x, 200))  # one small operation's dispatch alone
        for name, model in models.items():
            with torch.no_grad():
                start = time.perf_counter()
                model(x)
                fwd[name].append(time.perf_counter() - start)
            out = model(x.clone().requires_grad_())[1][-1]
            start = time.perf_counter()
            out.backward(v)
            bwd[name].append(time.perf_counter() - start)
    cost, add = per_round_median(rounds), median(adds)
    rows = []
    for name, model in models.items():
        with torch.no_grad():
            forward_ops = _count(lambda: model(x), network_file)
        nfe = model.solution.nfe
        out = model(x.clone().requires_grad_())[1][-1]
        backward_ops = _count(lambda: out.backward(v), network_file)
        iters = model.solution.backward_iters or 0
        t_fwd, t_bwd = median(fwd[name]), median(bwd[name])
        outside_fwd = sum(forward_ops.values()) - forward_ops[NETWORK]
        # the VJPs' own operations run in autograd, under the function that asked for them
        backward_ops[NETWORK] = iters * vjp_ops["vjp_z"] + vjp_ops["vjp_full"]
        outside_bwd = sum(backward_ops.values()) - 2 * backward_ops[NETWORK]
        network_bwd = iters * cost["vjp_z"] + cost["vjp_full"]
        rows.append({
            "size": f"{batch} x {width}", "solver": name, "nfe": nfe, "backward_iters": iters,
            "forward_ms": 1e3 * t_fwd, "backward_ms": 1e3 * t_bwd,
            "forward_ops": dict(forward_ops), "backward_ops": dict(backward_ops),
            "forward_ops_outside": outside_fwd, "backward_ops_outside": outside_bwd,
            "forward_us_per_op_outside": 1e6 * (t_fwd - nfe * cost["g_eval"]) / max(outside_fwd, 1),
            "backward_us_per_op_outside": 1e6 * (t_bwd - network_bwd) / max(outside_bwd, 1),
            "add_us": 1e6 * add,
            **{f"{k}_us": 1e6 * val for k, val in cost.items()},
        })
    return rows


def _top(counts: Dict[str, int]) -> str:
    ranked = sorted(((n, k) for k, n in counts.items() if k != NETWORK), reverse=True)
    return ", ".join(f"{k} {n}" for n, k in ranked[:TOP])


def table(rows: Sequence[dict]) -> str:
    header_ = ["size", "solver", "NFE", "GMRES iters", "pass", "ms", "network ops", "ops outside", "us per op outside",
               "one add (us)", "largest outside (ops)"]
    body = []
    for r in rows:
        for kind in ("forward", "backward"):
            ops = r[f"{kind}_ops"]
            body.append([r["size"], r["solver"], r["nfe"], r["backward_iters"], kind, f"{r[f'{kind}_ms']:.2f}",
                         ops.get(NETWORK, 0), r[f"{kind}_ops_outside"], f"{r[f'{kind}_us_per_op_outside']:.1f}",
                         f"{r['add_us']:.1f}", _top(ops)])
    return markdown_table(header_, body, align="lllrlrrrrrl")


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="32x128", help="comma-separated BATCHxWIDTH")
    parser.add_argument("--repeats", type=int, default=21, help="timed solves per solver (medians)")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    parser.add_argument("--out", type=Path, default=RESULTS / "op_count", help="results stem (.md and .json)")
    args = parser.parse_args(argv)
    args.sizes = [size(s) for s in args.sizes.split(",")]
    return args


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    command = command_line("benchmarks.op_count", argv)
    start = time.perf_counter()
    rows = [row for shape in args.sizes for row in measure(*shape, args.repeats)]
    info = machine(args.threads)
    text = (header("Tensor operations outside the network, by function", command, info, args.threads,
                   time.perf_counter() - start) + f"{table(rows)}\n\n"
            "- The paper's MNIST layer at random init, tolerance 5e-3, eager; forward: a no-grad solve, backward:\n"
            "  `backward()` of the steady state (the implicit GMRES solve and the parameter / input VJP).\n"
            "- ops: aten operations as dispatched (`TorchDispatchMode`), attributed to the innermost function of\n"
            "  the package that issued them; network ops: the layer's own (its `forward`, and in the backward the\n"
            "  VJPs through it: iters x the ops of one VJP in z + those of one full VJP, counted alone; in the\n"
            "  backward's list of largest functions they are still inside the function that called for them,\n"
            "  `matvec` and `other`, the engine's final VJP).\n"
            "- us per op outside: (median time - the network's: NFE x g forward, iters x VJP_z + full VJP\n"
            "  backward, from `benchmarks.overhead`'s timings of the network alone) / ops outside. The overhead\n"
            "  ratios of `benchmarks.overhead` are 1 + ops outside x this cost / the network's time.\n"
            "- one add: the median time of `x + x` on the state, one operation's dispatch and nothing else; the\n"
            "  rest of the cost per operation outside is the host's Python (the loop, the step control).\n")
    print(text)
    write_results(args.out, text, {"command": command.strip(), "machine": info, "rows": rows})


if __name__ == "__main__":
    main()
