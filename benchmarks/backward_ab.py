"""The implicit backward with this checkout's GMRES against the GMRES of an earlier commit, side by
side in one process (the same model, forward solve and cotangent; only the linear solver differs).

The earlier ``_linear_solvers.py`` is read with ``git show COMMIT:...`` and imported as a module, so
both run in the same interpreter, interleaved repeat by repeat: a change of machine load affects
both alike. Reported per size: the medians of ``backward()`` (thread CPU time, which a busy
machine disturbs less than wall time), the GMRES iterations and relative residual (which must
agree), the operations dispatched by one backward pass (machine-independent), and the overhead
over the network: time / (iterations x one VJP of ``g`` in ``z`` + one full VJP)::

    python -m benchmarks.backward_ab --threads 1 --before b764fbe

Results: ``benchmarks/results/backward_ab.{md,json}`` (or ``--out``).
"""
from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import torchdyn_deq as td
from benchmarks.harness import RESULTS, command_line, header, machine, markdown_table, median, size, write_results
from benchmarks.overhead import TOL, network_costs
from torchdyn_deq import _linear_solvers
from torchdyn_deq.experiments.mnist import InjectedLayer

ROOT = Path(__file__).resolve().parent.parent


def gmres_at(commit: str):
    """The ``GMRES`` class of ``torchdyn_deq/_linear_solvers.py`` at ``commit`` (its scaling, ``_solve``
    and ``_update``), also a subclass of this checkout's `GMRES`, so the sensitivity accepts it."""
    source = subprocess.run(["git", "show", f"{commit}:torchdyn_deq/_linear_solvers.py"], cwd=ROOT, check=True,
                            capture_output=True, text=True).stdout
    path = Path(tempfile.mkdtemp()) / f"linear_solvers_{commit}.py"
    path.write_text(source.replace("from ._", "from torchdyn_deq._"))
    spec = importlib.util.spec_from_file_location(f"linear_solvers_{commit}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return type(f"GMRES_{commit}", (module.GMRES, _linear_solvers.GMRES), {})


class _Count(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        return func(*args, **(kwargs or {}))


def measure(width_batch, solvers: Dict[str, type], repeats: int, seed: int = 0) -> List[dict]:
    batch, width = width_batch
    torch.manual_seed(seed)
    f = InjectedLayer(width)
    x, v = torch.randn(batch, width), torch.randn(batch, width)
    cost = network_costs(f, x, 10 * repeats, clock=time.thread_time)  # the clock of the backward times below
    models = {name: td.DEQ(f, solver="tsit5", atol=TOL, rtol=TOL, state_shape=(width,),
                           sensitivity=td.SteadyStateSensitivity(cls(rtol=TOL)))
              for name, cls in solvers.items()}
    times: Dict[str, List[float]] = {name: [] for name in models}
    ops = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, model in models.items():
            out = model(x)[1][-1]
            counter = _Count()
            with counter:
                out.backward(v)
            ops[name] = counter.ops
        for _ in range(repeats):
            for name, model in models.items():
                out = model(x)[1][-1]
                start = time.thread_time()
                out.backward(v)
                times[name].append(time.thread_time() - start)
    rows = []
    for name, model in models.items():
        record = model.solution.backward
        limit = record.iters * cost["vjp_z"] + cost["vjp_full"]
        rows.append(dict(size=f"{batch}x{width}", gmres=name, iters=record.iters, residual=record.residual,
                         ops=ops[name], backward_ms=1e3 * median(times[name]), overhead=median(times[name]) / limit))
    return rows


def main(argv: Optional[Sequence[str]] = None) -> List[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", default="b764fbe", help="the commit whose GMRES is compared")
    parser.add_argument("--sizes", type=lambda s: [size(p) for p in s.split(",")], default=[(32, 128), (256, 512)])
    parser.add_argument("--repeats", type=int, default=61)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=RESULTS / "backward_ab")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    info = machine(args.threads)
    solvers = {f"before ({args.before})": gmres_at(args.before), "after (this checkout)": _linear_solvers.GMRES}
    rows = [row for s in args.sizes for row in measure(s, solvers, args.repeats)]
    for row in rows:
        base = next(r for r in rows if r["size"] == row["size"])
        row["after_over_before"] = row["backward_ms"] / base["backward_ms"]
    table = markdown_table(
        ["size", "GMRES", "iterations", "relative residual", "ops dispatched", "backward (ms, CPU)",
         "overhead", "time / before"],
        [[r["size"], r["gmres"], r["iters"], f"{r['residual']:.3g}", r["ops"], f"{r['backward_ms']:.2f}",
          f"{r['overhead']:.2f}", f"{r['after_over_before']:.2f}"] for r in rows])
    text = (header("The implicit backward: GMRES before / after", command_line("benchmarks.backward_ab", argv), info,
                   args.threads, time.perf_counter() - started)
            + f"1-min load average at start {info['load_average_1min_at_start']:.2f}. Medians of {args.repeats} "
              "interleaved repeats, thread CPU time of `backward()` after a tsit5 forward at tolerance 5e-3 (the "
              "paper's MNIST layer, random init). overhead = time / (iterations x one VJP in z + one full VJP): "
              "1.0 is the network alone.\n\n" + table + "\n")
    write_results(args.out, text, dict(machine=info, rows=rows))
    print(text)
    return rows


if __name__ == "__main__":
    main()
