"""Cost of one CIFAR-10 training step with MDEQs (the paper's section 4.2): the five forms side by side.

Times one training step (forward + backward + optimizer), its backward pass and a no-grad
prediction for the Multiscale Neural ODE, the continuous Vanilla / Skip / Skip Reg. DEQs (VCAB3)
and the discrete DEQ (L-Broyden), built by ``torchdyn_deq.experiments.cifar`` on one synthetic
batch, after a few warm-up steps, interleaved round by round so that load changes hit every form
alike; reported are medians and ratios to the Multiscale Neural ODE (and, for prediction, to the
discrete DEQ)::

    python -m benchmarks.cifar_step --batch-size 32 --threads 1 --out benchmarks/results/cifar_small_cpu
    python -m benchmarks.cifar_step --device cuda --model large --batch-size 128 --out benchmarks/results/cifar_large_gpu
"""
from __future__ import annotations

import argparse
import math
import sys
import time
import warnings
from pathlib import Path
from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

import torchdyn_deq as td
from benchmarks.harness import machine, markdown_table, median, sync, write_results
from torchdyn_deq.experiments.cifar import MODELS, TOL, build_model, label, make_optimizer, n_params
from torchdyn_deq.experiments.cli import positive

#: the five forms, in table order; the first is the reference of the ratios
BENCH_FORMS: Tuple[Tuple[str, str], ...] = (("neural_ode", "vanilla"), ("continuous", "vanilla"),
                                            ("continuous", "skip"), ("continuous", "skip_reg"),
                                            ("discrete", "vanilla"))


def benchmark(args: argparse.Namespace) -> dict:
    """Median training-step, backward and prediction times of the five forms on one batch."""
    device = torch.device(args.device if args.device != "gpu" else "cuda")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick its convolution kernels (all forms alike)
    gen = torch.Generator().manual_seed(args.seed)
    images = torch.randn(args.batch_size, 3, 32, 32, generator=gen).to(device)
    labels = torch.randint(0, 10, (args.batch_size,), generator=gen).to(device)
    methods = []
    for form, variant in BENCH_FORMS:
        net = build_model(args.model, form, variant, args.seed, args.tol).to(device)
        optimizer, schedule = make_optimizer(net, args.warmup + args.repeats)
        methods.append({"form": form, "variant": variant, "model": label(form, variant), "net": net,
                        "optimizer": optimizer, "schedule": schedule, "step": [], "backward": [], "predict": [],
                        "nfe": [], "backward_work": [], "unconverged": 0, "residual": [],
                        "backward_residual": []})

    def train_step(m: dict) -> Tuple[float, float]:
        net = m["net"]
        net.train()
        sync(device)
        start = time.perf_counter()
        loss = F.cross_entropy(net(images), labels) + net.aux_loss()
        sync(device)
        mid = time.perf_counter()
        m["optimizer"].zero_grad(set_to_none=True)
        loss.backward()
        sync(device)
        end = time.perf_counter()
        m["optimizer"].step()
        m["schedule"].step()
        sync(device)
        m["last_nfe"] = net.forward_nfe()
        m["last_unconverged"] = int(net.solution is not None and not net.solution.converged)
        m["last_residual"] = float("nan") if net.solution is None else float(net.solution.residual.max())
        m["last_backward"] = net.backward_stats()
        return time.perf_counter() - start, end - mid

    def predict(m: dict) -> float:
        net = m["net"]
        net.eval()
        sync(device)
        start = time.perf_counter()
        with torch.no_grad():
            net(images)
        sync(device)
        return time.perf_counter() - start

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", td.ConvergenceWarning)
        for _ in range(args.warmup):
            for m in methods:
                train_step(m)
        for _ in range(args.repeats):
            for m in methods:  # interleaved: a change of machine load affects every form alike
                step, backward = train_step(m)
                m["step"].append(step)
                m["backward"].append(backward)
                m["nfe"].append(m["last_nfe"])
                m["unconverged"] += m["last_unconverged"]
                m["residual"].append(m["last_residual"])
                stats = m["last_backward"]
                m["backward_residual"].append(stats.get("backward_residual", float("nan")))
                m["backward_work"].append(stats.get("backward_iters", stats.get("backward_nfe", float("nan"))))
                m["predict"].append(predict(m))
    rows = []
    for m in methods:
        rows.append({"model": m["model"], "form": m["form"], "variant": m["variant"], "params": n_params(m["net"]),
                     "step_time_s": median(m["step"]), "backward_time_s": median(m["backward"]),
                     "predict_time_s": median(m["predict"]), "train_nfe": median(m["nfe"]),
                     "backward_work": median(m["backward_work"]),
                     "backward_unit": "adjoint NFE" if m["form"] == "neural_ode" else "GMRES iterations",
                     "unconverged_solves": m["unconverged"],
                     "forward_residual": median(m["residual"]),
                     "backward_residual": median(m["backward_residual"]), "samples": {k: m[k] for k in ("step", "backward", "predict")}})
    node = next(r for r in rows if r["form"] == "neural_ode")
    discrete = next(r for r in rows if r["form"] == "discrete")
    for r in rows:
        r["step_speedup_vs_node"] = node["step_time_s"] / r["step_time_s"]
        r["backward_speedup_vs_node"] = node["backward_time_s"] / r["backward_time_s"]
        r["predict_speedup_vs_node"] = node["predict_time_s"] / r["predict_time_s"]
        r["predict_speedup_vs_discrete"] = discrete["predict_time_s"] / r["predict_time_s"]
    config = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    info = machine(torch.get_num_threads(), device)
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return {"rows": rows, "machine": info, "config": config}


def _optional(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.2g}"


def benchmark_table(result: dict) -> str:
    """The full table (13 columns)."""
    cols = ("Model", "Form", "# Params", "Train NFE", "Fwd residual", "Backward work", "Bwd rel. residual",
            "Training step (s / batch)", "Backward (s / batch)", "Prediction (s / batch)", "Step speed-up vs NODE",
            "Backward speed-up vs NODE", "Prediction speed-up vs discrete")
    return markdown_table(cols, [
        [r["model"], r["form"], f"{r['params']:,}", f"{r['train_nfe']:.0f}", _optional(r["forward_residual"]),
         f"{r['backward_work']:.0f} {r['backward_unit']}", _optional(r["backward_residual"]),
         f"{r['step_time_s']:.3f}", f"{r['backward_time_s']:.3f}", f"{r['predict_time_s']:.3f}",
         f"{r['step_speedup_vs_node']:.2f}x", f"{r['backward_speedup_vs_node']:.2f}x",
         f"{r['predict_speedup_vs_discrete']:.2f}x"] for r in result["rows"]], align="lll" + "r" * 10)


def write_benchmark(result: dict, out: Path) -> None:
    cfg, mach = result["config"], result["machine"]
    where = mach.get("gpu", f"CPU ({mach['processor']}), {mach['torch_threads']} torch thread(s)")
    text = (f"# CIFAR-10 step benchmark, MDEQ-{cfg['model']}\n\n{benchmark_table(result)}\n\n"
            f"Batch {cfg['batch_size']} of synthetic 3x32x32 images, {cfg['warmup']} warm-up training step(s) per "
            f"form, then medians of {cfg['repeats']} interleaved rounds; tolerance {cfg['tol']}; forward solves "
            "capped at 18 steps / iterations and the implicit backward at 20 GMRES iterations (the paper's code's "
            "caps), the Neural ODE integrated on [0, 1] with tsit5 and torchdyn's adjoint. Speed-up = reference "
            "time / row time (> 1: faster than the reference). Fwd residual: the worst sample's scaled residual "
            "rms(g / (atol + rtol |z|)) at the end of the forward solve (<= 1: converged); Bwd rel. residual: the "
            "backward GMRES's relative residual (<= the tolerance: converged).\n\n"
            f"Device: {where}; torch {mach['torch']}, torchdyn {mach['torchdyn']}, "
            f"pytorch-lightning {mach['pytorch_lightning']}, torchdyn_deq {mach['torchdyn_deq']}, "
            f"Python {mach['python']}, {mach['platform']}.\n\n"
            f"Command: `python -m benchmarks.cifar_step {' '.join(cfg.get('argv', []))}`\n")
    write_results(out, text, result)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.cifar_step", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", choices=tuple(MODELS), default="small", help="MDEQ-small (Table 2) or -large (Table 3)")
    parser.add_argument("--batch-size", type=positive(int), default=128, help="batch size (the paper's: 128)")
    parser.add_argument("--tol", type=positive(float), default=TOL, help="solver tolerance (the paper's: 0.05)")
    parser.add_argument("--warmup", type=int, default=2, help="warm-up training steps per form")
    parser.add_argument("--repeats", type=positive(int), default=3, help="timed rounds")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or gpu")
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights and the batch")
    parser.add_argument("--threads", type=positive(int), default=None, help="torch.set_num_threads")
    parser.add_argument("--out", type=Path, default=None, help="write OUT.md and OUT.json (e.g. benchmarks/results/cifar_small)")
    args = parser.parse_args(argv)
    args.argv = list(argv) if argv is not None else sys.argv[1:]
    if args.device in ("cuda", "gpu") and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: CUDA is not available on this machine (torch {torch.__version__}, "
                     f"built with CUDA {torch.version.cuda})")
    if args.warmup < 0:
        parser.error(f"--warmup must be non-negative, got {args.warmup}")
    return args


def main(argv: Optional[Sequence[str]] = None) -> None:
    """Run the benchmark, print the table and write the results."""
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    result = benchmark(args)
    print(benchmark_table(result))
    if args.out is not None:
        write_benchmark(result, args.out)
        print(f"\nwritten to {args.out}.md and .json")


if __name__ == "__main__":
    main()
