"""The timing harness of the benchmark scripts: one clock, medians, the machine description and
the results writer, so that every results file states how it was measured in the same words."""
from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import statistics
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Iterable, Optional, Sequence, Tuple

import torch

from torchdyn_deq.experiments.mnist import InjectedLayer
from torchdyn_deq.experiments.reporting import machine_info, markdown_table

__all__ = ["CPU", "RESULTS", "clock", "sync", "median", "device_name", "machine", "machine_info", "write_results",
           "markdown_table", "uncounted", "size", "command_line", "header"]

CPU = torch.device("cpu")
RESULTS = Path(__file__).resolve().parent / "results"


class _UncountedLayer(InjectedLayer):
    """The MNIST layer without its Python counter ``calls``: a compiled step's graph would read
    it and recompile on every call (the compiled rows count evaluations on the model instead)."""

    def forward(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.l2(torch.tanh(self.l1(z))) + x)


def uncounted(f: InjectedLayer) -> InjectedLayer:
    """``f`` itself (same weights), no longer counting its calls."""
    f.__class__ = _UncountedLayer
    return f


def sync(device: torch.device = CPU) -> None:
    """Wait for the GPU's queued work on CUDA (nothing on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def clock(device: torch.device = CPU) -> float:
    """``time.perf_counter()``, after waiting for the GPU's queued work on CUDA (kernels run
    asynchronously: without the wait a time would cover the launches, not the work)."""
    sync(device)
    return time.perf_counter()


def median(values: Iterable[float]) -> float:
    """The median: robust to the occasional slow step of a shared machine, unlike the mean."""
    return statistics.median(list(values))


def device_name(device: torch.device) -> str:
    """``'cpu'``, or ``'cuda (<GPU name>)'``."""
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return device.type


def machine(threads: int, device: torch.device = CPU) -> dict:
    """Machine, device, load and library versions (``machine_info`` plus torchdeq, the CPU
    count and the 1-minute load average at the start, which says whether the machine was busy)."""
    info = machine_info()
    try:
        torchdeq = version("torchdeq")
    except PackageNotFoundError:
        torchdeq = "not installed"
    info.update(torchdeq=torchdeq, torch_threads=threads, cpu_count=os.cpu_count(),
                load_average_1min_at_start=os.getloadavg()[0], device=device_name(device))
    if device.type == "cuda":
        info.update(gpu=torch.cuda.get_device_name(device), cuda=torch.version.cuda)
    return info


def write_results(stem: Path, markdown: str, data: dict) -> Sequence[Path]:
    """Write ``stem.md`` (``markdown``) and ``stem.json`` (``data``, indented); return both paths."""
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    md, js = stem.with_name(stem.name + ".md"), stem.with_name(stem.name + ".json")
    md.write_text(markdown)
    js.write_text(json.dumps(data, indent=2, default=str))
    return md, js


def size(text: str) -> Tuple[int, int]:
    """``'32x128'`` -> ``(32, 128)``: a ``--sizes`` entry (an argparse type)."""
    try:
        batch, width = (int(p) for p in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected BATCHxWIDTH such as 32x128, got {text!r}") from None
    return batch, width


def command_line(module: str, argv: Optional[Sequence[str]]) -> str:
    """How the script was called, for its results file."""
    args = sys.argv[1:] if argv is None else argv
    return f"python -m {module} " + " ".join(shlex.quote(a) for a in args)


def header(title: str, command: str, info: dict, threads: int, seconds: float) -> str:
    """The first lines of a results file: the title, the command, the machine and the time taken."""
    return (f"# {title}\n\n`{command.strip()}`\n\n{info['platform']}, torch threads {threads}, torch {info['torch']}, "
            f"torchdyn_deq {info.get('torchdyn_deq', '?')}; {seconds:.0f} s in all.\n\n")
