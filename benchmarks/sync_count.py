"""Host-device synchronisations of one MNIST forward solve on CUDA, and per solver step.

Each synchronisation makes the host wait until the GPU has finished all queued work, so a
solver loop that decides on the host (stop test, step size) pays one round trip per decision.
This counts them for the models of ``benchmarks/mnist_step.py`` (built by its functions, same
layer, seed, tolerance and batches): the continuous vanilla and Skip Reg. DEQs (tsit5), the
continuous vanilla DEQ with VCAB3, the discrete DEQ (Anderson), torchdyn's Neural ODE with the
adjoint (the baseline) and torchdeq's DEQ. After ``--warmup`` training steps (the dynamics of a
trained model, not those at initialization) one training forward (with the loss), its backward
and one no-grad eval forward are counted on each of ``--batches`` batches; reported are medians.

How: ``torch.cuda.set_sync_debug_mode("warn")`` makes torch emit a ``UserWarning`` "called a
synchronizing CUDA operation" from every operation that blocks the host on the device (``.item()``,
``float()`` / ``bool()`` of a tensor, ``nonzero``, boolean-mask indexing, blocking copies between
host and device, the error checks of ``torch.linalg.solve``, ...); they are caught with
``warnings.catch_warnings(record=True)`` and counted, with the source line that caused each.
``torch.cuda.synchronize()`` itself is not reported (none runs inside a counted pass). Beside them,
on any device, the tensor-to-Python conversions (``bool``, ``float``, ``int``, ``.item()``,
``.tolist()``, counted as in ``benchmarks.profile_step``): the synchronisations visible in the
Python code; CUDA syncs above that number come from inside torch operations or from copies::

    python -m benchmarks.sync_count --device cuda     # GPU machine, about 20 s: writes the results
    python -m benchmarks.sync_count --device cpu      # dry run (wiring): CUDA syncs n/a, no files unless --out

Results: ``--out``.md and ``--out``.json (default on CUDA ``benchmarks/results/sync_count_gpu``).
"""
from __future__ import annotations

import argparse
import contextlib
import shlex
import statistics
import sys
import time
import traceback
import warnings
from collections import Counter
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence

import torch
import torch.nn.functional as F

from benchmarks import mnist_step
from benchmarks.harness import RESULTS, machine, markdown_table as write_table, write_results as write_files
from benchmarks.profile_step import count_syncs as count_conversions
from torchdyn_deq import ConvergenceWarning
from torchdyn_deq._baselines import InjectedNeuralODE
SYNC_TEXT = "synchronizing cuda operation"  # torch's text: "called a synchronizing CUDA operation"
METHODS = ("DEQ continuous vanilla (tsit5)", "DEQ continuous skip_reg (tsit5)", "DEQ continuous vanilla (vcab3)",
           "DEQ discrete vanilla (anderson)", mnist_step.BASELINE, "torchdeq DEQ (anderson, IFT)")
PHASES = ("forward", "backward", "predict")


class Count:
    """What one counted pass did: CUDA syncs (``None`` off CUDA), tensor-to-Python conversions,
    the source lines of the syncs, convergence warnings and any other warning text."""

    def __init__(self) -> None:
        self.cuda_syncs: Optional[int] = None
        self.conversions: Dict[str, int] = {}
        self.sites: Counter = Counter()
        self.unconverged = 0
        self.other_warnings: List[str] = []


def _site(warning: warnings.WarningMessage) -> str:
    path = Path(warning.filename)
    return f"{path.parent.name}/{path.name}:{warning.lineno}"


@contextlib.contextmanager
def counting(device: torch.device) -> Iterator[Count]:
    """Count the synchronisations of the code run inside (see the module docstring)."""
    count = Count()
    cuda = device.type == "cuda"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # every warning, also repeats from the same line
        with count_conversions(count.conversions):
            previous = torch.cuda.get_sync_debug_mode() if cuda else None
            if cuda:
                torch.cuda.set_sync_debug_mode("warn")
            try:
                yield count
            finally:
                if cuda:
                    torch.cuda.set_sync_debug_mode(previous)
    other = set()
    for w in caught:
        if SYNC_TEXT in str(w.message).lower():
            count.sites[_site(w)] += 1
        elif issubclass(w.category, ConvergenceWarning):
            count.unconverged += 1
        else:
            other.add(f"{w.category.__name__}: {w.message}")
    count.cuda_syncs = sum(count.sites.values()) if cuda else None
    count.other_warnings = sorted(other)


@contextlib.contextmanager
def counting_steps(method: mnist_step.Method) -> Iterator[List[int]]:
    """For torchdyn's Neural ODE: count its stepper's ``step`` calls (accepted and rejected
    steps; the adjoint uses the same stepper). Yields ``[steps]``; ``[None]`` for other models."""
    layer = method.net.layer
    stepper = layer.ode.solver if isinstance(layer, InjectedNeuralODE) else None
    if stepper is None or not hasattr(stepper, "step"):
        yield [None]
        return
    steps = [0]
    original = stepper.step

    def step(*args, **kwargs):
        steps[0] += 1
        return original(*args, **kwargs)

    stepper.step = step  # an instance attribute shadows the method
    try:
        yield steps
    finally:
        del stepper.step


def _per(count: Optional[int], unit: Optional[float]) -> Optional[float]:
    return None if count is None or not unit else count / unit


def measure(method: mnist_step.Method, batch: mnist_step.Batch, device: torch.device) -> dict:
    """Count one training forward (with the loss), its backward and one eval no-grad forward."""
    net, (pixels, labels) = method.net, batch
    net.train()
    method.optimizer.zero_grad(set_to_none=True)
    mnist_step.clock(device)  # nothing queued from before
    calls = method.f.calls
    with counting_steps(method) as ode_steps, counting(device) as fwd:
        loss = F.cross_entropy(net(pixels), labels) + net.aux_loss()
    record = {"f_evals": method.f.calls - calls}
    sol = net.solution
    if sol is not None:
        record.update(steps=sol.steps_accepted + sol.steps_rejected, steps_rejected=sol.steps_rejected,
                      solver_nfe=sol.nfe)
    else:
        record.update(steps=ode_steps[0], steps_rejected=None,
                      solver_nfe=getattr(net.layer, "forward_nfe", None) if ode_steps[0] is not None else None)
    with counting_steps(method) as adjoint_steps, counting(device) as bwd:
        loss.backward()
    work = mnist_step.backward_count(method)
    if sol is not None:  # this package: the backward linear solve's iterations
        backward_steps, unit = sol.backward_iters, method.backward_unit
    elif adjoint_steps[0] is not None:  # torchdyn's adjoint: its tsit5 steps
        backward_steps, unit = adjoint_steps[0], "adjoint tsit5 steps"
    else:  # torchdeq: Broyden iterations
        backward_steps, unit = work, method.backward_unit
    record.update(backward_work=work, backward_steps=backward_steps, backward_unit=unit)
    method.optimizer.zero_grad(set_to_none=True)
    net.eval()
    with torch.no_grad(), counting_steps(method) as predict_steps, counting(device) as pred:
        net(pixels)
    record["predict_steps"] = (net.solution.steps_accepted + net.solution.steps_rejected
                               if net.solution is not None else predict_steps[0])
    mnist_step.clock(device)
    for phase, count in zip(PHASES, (fwd, bwd, pred)):
        record[phase] = {"cuda_syncs": count.cuda_syncs, "conversions": sum(count.conversions.values()),
                         "conversions_by_kind": dict(count.conversions), "sites": dict(count.sites.most_common()),
                         "unconverged": count.unconverged, "other_warnings": count.other_warnings}
    record["forward_syncs_per_step"] = _per(fwd.cuda_syncs, record["steps"])
    record["forward_syncs_per_f_eval"] = _per(fwd.cuda_syncs, record["f_evals"])
    record["backward_syncs_per_iter"] = _per(bwd.cuda_syncs, record["backward_steps"])
    record["predict_syncs_per_step"] = _per(pred.cuda_syncs, record["predict_steps"])
    return record


def _median(values: Sequence[Optional[float]]) -> Optional[float]:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def summarize(name: str, records: List[dict]) -> dict:
    """Medians over the measured batches (and the raw records)."""
    row = {"method": name, "batches": len(records), "records": records}
    for key in ("f_evals", "steps", "steps_rejected", "solver_nfe", "backward_work", "backward_steps",
                "predict_steps", "forward_syncs_per_step", "forward_syncs_per_f_eval", "backward_syncs_per_iter",
                "predict_syncs_per_step"):
        row[key] = _median([r[key] for r in records])
    row["backward_unit"] = records[0]["backward_unit"]
    for phase in PHASES:
        row[phase] = {k: _median([r[phase][k] for r in records]) for k in ("cuda_syncs", "conversions")}
        row[phase]["unconverged"] = sum(r[phase]["unconverged"] for r in records)
        sites: Counter = Counter()
        for r in records:
            sites.update(r[phase]["sites"])
        row[phase]["top_sites"] = [f"{site} x{n / len(records):g}" for site, n in sites.most_common(5)]
    return row


COLUMNS = ("Method", "fwd steps", "fwd f-evals", "fwd syncs", "syncs / step", "syncs / f-eval", "fwd conversions",
           "bwd iters / steps", "bwd syncs", "syncs / bwd iter", "bwd conversions", "predict steps",
           "predict syncs", "syncs / predict step", "unconverged fwd / bwd")


def _fmt(value: Optional[float], digits: int = 0) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def markdown_table(rows: Sequence[dict]) -> str:
    cells = []
    for r in rows:
        if "error" in r:
            cells.append([r["method"], f"failed: {r['error'][:80]}"] + [""] * (len(COLUMNS) - 2))
            continue
        f, b, p = r["forward"], r["backward"], r["predict"]
        steps = _fmt(r["steps"]) + ("" if not r["steps_rejected"] else f" ({_fmt(r['steps_rejected'])} rej.)")
        cells.append([r["method"], steps, _fmt(r["f_evals"]), _fmt(f["cuda_syncs"]), _fmt(r["forward_syncs_per_step"], 2),
                      _fmt(r["forward_syncs_per_f_eval"], 2), _fmt(f["conversions"]),
                      f"{_fmt(r['backward_steps'])} {r['backward_unit']}",
                      _fmt(b["cuda_syncs"]), _fmt(r["backward_syncs_per_iter"], 2), _fmt(b["conversions"]),
                      _fmt(r["predict_steps"]), _fmt(p["cuda_syncs"]), _fmt(r["predict_syncs_per_step"], 2),
                      f"{f['unconverged']} / {b['unconverged']}"])
    return write_table(COLUMNS, cells, align="l" + "r" * (len(COLUMNS) - 1))


NOTES = """\
- Medians over {batches} batch(es) of {batch_size} training images, after {warmup} warm-up training steps per model;
  tolerance {tol} (atol = rtol), models built as in `benchmarks/mnist_step.py` (same seed {seed}).
- fwd: one training forward pass with the loss (DEQ auxiliary losses included); bwd: its `loss.backward()`;
  predict: one no-grad forward in eval mode. syncs: CUDA host-device synchronisations reported by
  `torch.cuda.set_sync_debug_mode("warn")` (n/a off CUDA); conversions: tensor-to-Python conversions in the
  Python code (`bool`, `float`, `int`, `.item()`, `.tolist()`), on any tensor (CPU tensors too).
- steps: the forward solver's steps, accepted + rejected (this package: `solution.steps_accepted +
  steps_rejected`, iterations for Anderson; the Neural ODE: calls of torchdyn's tsit5 `step`); torchdeq: n/a.
  f-evals: evaluations of f(z, x) in the pass, the one at z* for the implicit backward included.
- bwd iters / steps: this package's implicit backward linear-solve iterations (`solution.backward_iters`), the
  adjoint's tsit5 steps (accepted + rejected) for the Neural ODE, Broyden iterations for torchdeq.
- unconverged: `ConvergenceWarning`s in the counted forward / backward passes, summed over the batches.
- The syncs' source lines (most frequent first) are in the JSON (`top_sites`, and per batch `sites`).
"""


def write_results(rows: List[dict], info: dict, setup: dict, command: str, out: Path) -> str:
    table = markdown_table(rows)
    sites = "\n".join(f"- {r['method']}: fwd {', '.join(r['forward']['top_sites']) or '-'}; "
                      f"bwd {', '.join(r['backward']['top_sites']) or '-'}" for r in rows if "error" not in r)
    write_files(out, (
        f"# Host-device synchronisations per solve, MNIST batch {setup['batch_size']}\n\n`{command}`\n\n"
        f"Device {info['device']}; torch {info['torch']}, torchdyn {info['torchdyn']}, torchdeq {info['torchdeq']}, "
        f"torchdyn_deq {info['torchdyn_deq']}, Python {info['python']}, {info['platform']}.\n\n{table}\n\n"
        f"{NOTES.format(**setup)}\nMost frequent sync sites (per pass):\n\n{sites}\n"),
        {"command": command, "machine": info, "setup": setup, "rows": rows})
    return table


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda",
                        help="cuda: count; cpu: dry run of the wiring (CUDA syncs n/a)")
    parser.add_argument("--warmup", type=int, default=20, help="training steps per model before counting")
    parser.add_argument("--batches", type=int, default=3, help="counted batches (medians reported)")
    parser.add_argument("--tol", type=float, default=5e-3, help="forward tolerances (atol = rtol), as mnist_step")
    parser.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate of the warm-up")
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights and the batch order")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    parser.add_argument("--out", type=Path, default=None,
                        help="write OUT.md and OUT.json (default on cuda: benchmarks/results/sync_count_gpu; "
                             "on cpu: nothing written)")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device cuda: CUDA is not available on this machine (torch {torch.__version__}, built with "
                     f"CUDA {torch.version.cuda}); sync counting needs a GPU. `--device cpu` runs the models as a "
                     "dry run of the wiring")
    if args.warmup < 0 or args.batches < 1 or args.threads < 1:
        parser.error("--warmup must be non-negative, --batches and --threads positive")
    if args.out is None and args.device == "cuda":
        args.out = RESULTS / "sync_count_gpu"
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    start = time.perf_counter()
    methods: List[mnist_step.Method] = []
    rows: List[dict] = []
    for name in METHODS:
        try:
            methods += mnist_step.make_methods(args.seed, args.lr, args.tol, device, names=[name])
        except Exception as error:  # one model's failure must not hide the others' counts
            rows.append({"method": name, "error": f"build: {type(error).__name__}: {error}"})
            print(f"{name}: build failed:\n{traceback.format_exc()}", file=sys.stderr)
    failed = {r["method"]: r for r in rows}

    def fail(name: str, stage: str, error: Exception) -> None:
        """Record one model's failure (the others go on) and print its traceback."""
        failed[name] = {"method": name, "error": f"{stage}: {type(error).__name__}: {error}"}
        print(f"{name}: {stage} failed:\n{traceback.format_exc()}", file=sys.stderr)
    train, _ = mnist_step.batches(args.seed, device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # counted in the measured passes only
        for _ in range(args.warmup):
            batch = next(train)
            for method in methods:
                if method.name not in failed:
                    try:
                        mnist_step.train_step(method, batch, device)
                    except Exception as error:
                        fail(method.name, "warm-up", error)
    records: Dict[str, List[dict]] = {m.name: [] for m in methods}
    for _ in range(args.batches):
        batch = next(train)
        for method in methods:
            if method.name not in failed:
                try:
                    records[method.name].append(measure(method, batch, device))
                except Exception as error:
                    fail(method.name, "count", error)
    rows = [failed[name] if name in failed else summarize(name, records[name]) for name in METHODS]
    info = machine(args.threads, device)
    setup = {"device": args.device, "warmup": args.warmup, "batches": args.batches, "batch_size": mnist_step.BATCH,
             "tol": args.tol, "lr": args.lr, "seed": args.seed, "wall_time_s": time.perf_counter() - start}
    command = shlex.join(["python", "-m", "benchmarks.sync_count", *argv])
    if args.out is not None:
        print(write_results(rows, info, setup, command, args.out))
        print(f"\nwritten to {args.out}.md and .json")
    else:
        print(markdown_table(rows))
    if device.type != "cuda":
        print("\ndry run on the CPU: CUDA syncs are n/a (counting needs --device cuda on a GPU machine)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
