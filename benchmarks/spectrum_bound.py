"""Why the continuous forward takes the evaluations it does: its steps against the stability
limit of the true spectrum at the steady state, on the trained MNIST models.

An explicit Runge-Kutta step on ``dz/dt = g(z) = f(z, x) - z`` is stable only while ``h lambda``
stays in the method's stability region for every eigenvalue ``lambda`` of ``dg/dz``; near ``z*``
the residual then falls at the rate of the slowest mode, ``exp(-|Re lambda_slow| t)``. So the
time to the stop test is set by the slowest mode, the step by the fastest, and the evaluations
by both, whatever the error control does. This script trains the models of
``benchmarks.mnist_step`` (same seed, batches and warm-up), then for test batches:

- solves each DEQ's forward with its own solver, keeping every accepted iterate;
- computes ``dg/dz`` at each sample's ``z*`` (its eigenvalues), the true stability limit
  ``h_max`` (`StabilityRegion.step_limit` at safety 1, the smallest over the batch: the batch
  takes one step) and the slowest decay rate ``|Re lambda_slow|`` (the largest over the batch);
- compares the solver's steps with ``h_max``, the residual's measured decay rate over the
  second half of the solve with ``|Re lambda_slow|``, and the NFE with
  ``spectral NFE = start + evaluations per step x ceil(t_end / h_max)``: the fewest evaluations
  that reach the same time at steps of ``h_max``;
- reports the Neural ODE baseline's worst scaled residual ``rms((f(z, x) - z) / (atol + rtol |z|))``
  at ``t = 1``, the state it classifies (1 = the DEQs' stop tolerance).

Deterministic (no clock)::

    python -m benchmarks.spectrum_bound --threads 1

Results: ``benchmarks/results/spectrum_bound.{md,json}`` (or ``--out``).
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import statistics
import time
from pathlib import Path
from typing import List, Optional, Sequence

import torch

import torchdyn_deq as td
from benchmarks.harness import RESULTS, command_line, header, machine, markdown_table, write_results
from benchmarks.mnist_step import BASELINE, batches, make_methods, train_step
from torchdyn_deq._loop import scaled_residual, steady_state_solve
from torchdyn_deq._ode import ODESteadyStateSolver

TOL = 5e-3  # the MNIST experiment's forward tolerance
MODELS = {"vanilla": "DEQ continuous vanilla (tsit5)", "skip_reg": "DEQ continuous skip_reg (tsit5)"}


def spectrum(f, z_star: torch.Tensor, x: torch.Tensor):
    """Per sample: the eigenvalues of ``dg/dz = df/dz - I`` at ``z*`` (float64)."""
    out = []
    for zi, xi in zip(z_star, x):
        J = torch.autograd.functional.jacobian(lambda z: f(z[None], xi[None])[0], zi, vectorize=True)
        out.append(torch.linalg.eigvals(J.double()) - 1)
    return out


def trace(layer, f, x: torch.Tensor) -> dict:
    """One forward solve of ``layer`` (a trained `DEQ`) with every accepted iterate kept, and
    what the spectrum at its ``z*`` says of it."""
    solver = layer.steady_solver
    assert isinstance(solver, ODESteadyStateSolver) and solver.adaptive
    skip_reg = isinstance(layer.initializer, td.SkipRegInitializer)
    with torch.no_grad():
        z0 = f(torch.zeros_like(x), x) if skip_reg else torch.zeros_like(x)
        options = dataclasses.replace(layer._options(), save_steps=tuple(range(layer._options().max_steps + 1)))
        sol = steady_state_solve(lambda t, z: f(z, x) - z, z0, solver, options, nfe_start=int(skip_reg))
        times = [s.t for s in sol.states]
        worst = [float(scaled_residual(f(s.z, x) - s.z, s.z, TOL, TOL).max()) for s in sol.states]
    eigs = spectrum(f, sol.z_star, x)
    region = solver._tableau.region
    limit = min(region.step_limit([complex(v) for v in lam.tolist()], 0.0, 1.0) for lam in eigs)
    slow = -max(float(lam.real.max()) for lam in eigs)  # |Re lambda_slow|: the slowest mode over the batch
    steps = [b - a for a, b in zip(times, times[1:])]
    half = len(times) // 2
    decay = -(math.log(worst[-1]) - math.log(worst[half])) / (times[-1] - times[half]) if times[-1] > times[half] else math.nan
    per_step = solver._tableau.evaluations
    start = sol.nfe - per_step * (sol.steps_accepted + sol.steps_rejected)
    return {
        "nfe": sol.nfe, "accepted": sol.steps_accepted, "rejected": sol.steps_rejected, "t_end": sol.t,
        "steps": steps, "worst_residual": worst, "h_max": limit, "slowest_re": slow,
        "late_step_over_h_max": statistics.median(steps[1:] or steps) / limit,
        "decay_rate": decay, "spectral_nfe": start + per_step * math.ceil(sol.t / limit),
        "spectral_radius_f": max(float((lam + 1).abs().max()) for lam in eigs),
    }


def node_residual(method, pixels: torch.Tensor) -> float:
    """The Neural ODE's worst scaled residual at ``t = 1`` (the state it classifies)."""
    net = method.net
    with torch.no_grad():
        x = net.encoder(pixels)
        z1 = net.layer(x)[1][-1]
        return float(scaled_residual(net.layer.f(z1, x) - z1, z1, TOL, TOL).max())


def measure(warmup: int, n_batches: int, seed: int) -> dict:
    methods = make_methods(seed, 1e-3, TOL, names=list(MODELS.values()) + [BASELINE], compiled=False)
    train, test = batches(seed)
    for _ in range(warmup):
        batch = next(train)
        for method in methods:
            train_step(method, batch)
    rows, node = [], []
    for i in range(n_batches):
        pixels = next(test)[0]
        for key, method in zip(MODELS, methods):
            net = method.net.eval()
            with torch.no_grad():
                x = net.encoder(pixels)
                net(pixels)
            row = trace(net.layer, net.layer.f, x)
            row.update(model=key, batch=i, model_nfe=net.solution.nfe)
            rows.append(row)
        node.append({"batch": i, "nfe": None, "worst_residual_t1": node_residual(methods[-1], pixels)})
        node[-1]["nfe"] = methods[-1].net.layer.forward_nfe
    return {"rows": rows, "neural_ode": node}


def table(data: dict) -> str:
    header_ = ["model", "batch", "NFE", "steps", "t_end", "h_max", "late step / h_max", "-Re lambda_slow",
               "measured decay rate", "spectral NFE", "rho(df/dz)"]
    body = [[r["model"], r["batch"], r["nfe"], f"{r['accepted']}+{r['rejected']}", f"{r['t_end']:.2f}",
             f"{r['h_max']:.2f}", f"{r['late_step_over_h_max']:.2f}", f"{r['slowest_re']:.3f}",
             f"{r['decay_rate']:.3f}", r["spectral_nfe"], f"{r['spectral_radius_f']:.3f}"] for r in data["rows"]]
    node = markdown_table(["batch", "Neural ODE NFE (t in [0, 1])", "worst scaled residual at t = 1"],
                          [[n["batch"], n["nfe"], f"{n['worst_residual_t1']:.1f}"] for n in data["neural_ode"]],
                          align="lrr")
    return markdown_table(header_, body, align="llrrrrrrrrr") + "\n\n" + node


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--warmup", type=int, default=50, help="training steps before the trace (mnist_step's)")
    parser.add_argument("--batches", type=int, default=4, help="test batches traced")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    parser.add_argument("--out", type=Path, default=RESULTS / "spectrum_bound", help="results stem (.md and .json)")
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    command = command_line("benchmarks.spectrum_bound", argv)
    start = time.perf_counter()
    data = measure(args.warmup, args.batches, args.seed)
    info = machine(args.threads)
    text = (header("Evaluations to the steady state against the spectrum at z*", command, info, args.threads,
                   time.perf_counter() - start) + f"{table(data)}\n\n"
            f"- The models of `benchmarks.mnist_step` after {args.warmup} training steps (seed {args.seed}), "
            f"tsit5, atol = rtol = {TOL:g}, test batches of 32.\n"
            "- NFE: the forward solve's evaluations of f (the model's own count); steps: accepted + rejected.\n"
            "- h_max: the largest stable tsit5 step for every eigenvalue of dg/dz = df/dz - I at every sample's z*\n"
            "  (safety 1; the smallest over the batch). late step / h_max: the median accepted step after the\n"
            "  first over h_max (the controller keeps 0.8 of its estimated limit).\n"
            "- -Re lambda_slow: the slowest mode's decay rate (the eigenvalue of largest real part over the\n"
            "  batch); measured decay rate: -d ln(worst scaled residual) / dt over the solve's second half.\n"
            "- spectral NFE: the start's evaluations + 6 per step x ceil(t_end / h_max): reaching the same time\n"
            "  at steps of h_max, no step rejected. rho(df/dz): the largest spectral radius over the batch.\n"
            "- Neural ODE: the `NeuralODE (adjoint)` baseline of `benchmarks.mnist_step`, trained alongside;\n"
            "  its state at t = 1 against the DEQs' stop test (1 = met).\n")
    print(text)
    write_results(args.out, text, {"command": command.strip(), "machine": info, **data})


if __name__ == "__main__":
    main()
