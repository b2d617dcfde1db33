"""torchdyn's quickstart and cookbook fields ported to a steady state, measured against the
tutorials' own NeuralODE on the same data and epochs (docs/porting-torchdyn.md quotes the table).

Each field is trained as its tutorial trains it: the 512 moons of ``ToyDataset`` (noise 0.1) in
one batch, Adam at lr 0.01, cross-entropy on the final state, the tutorial's number of epochs
(Lightning's ``max_epochs``: 300 for the quickstart, 250 for the cookbook's data-controlled field;
one step per epoch). The loop is written out instead of Lightning's so every step's NFE, warnings
and errors are recorded. Accuracy on the training moons (what the tutorials plot) and on 1000
other moons (other points along the arcs, another seed of the noise).

    python examples/porting_torchdyn.py --threads 1     # writes benchmarks/results/porting_torchdyn.{json,md}
    python examples/porting_torchdyn.py --epochs 3 --out /tmp/porting   # a smoke run

A row whose training raises is recorded (``stopped_at``, the error) and the next row runs: the
script is meant to be rerun on each version of the package.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Callable, List, NamedTuple, Optional, Tuple

import numpy as np
import torch
import torch.nn as nn
from torchdyn.core import NeuralODE
from torchdyn.datasets import ToyDataset
from torchdyn.nn import DataControl

import torchdyn_deq as td
from torchdyn_deq.experiments.reporting import machine_info, markdown_table

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "porting_torchdyn"
EPOCHS = {"quickstart": 300, "cookbook": 250}  # the tutorials' Trainer(max_epochs=...)
PENALTY = 1.0  # JacobianPenalty's default weight (the paper's MNIST setting)


# ---------------------------------------------------------------------------- the fields
def quickstart_mlp() -> nn.Module:
    """torchdyn's quickstart field, verbatim: dz/dt = MLP(z), the input only as z(0) = x."""
    return nn.Sequential(nn.Linear(2, 16), nn.Tanh(), nn.Linear(16, 2))


def quickstart_injected() -> nn.Module:
    """The quickstart MLP with the input injected: it reads [z, x] (DataControl), so 4 inputs."""
    return nn.Sequential(DataControl(), nn.Linear(2 + 2, 16), nn.Tanh(), nn.Linear(16, 2))


def cookbook_datacontrol() -> nn.Module:
    """The cookbook's data-controlled field, verbatim: dz/dt = MLP([z, x])."""
    return nn.Sequential(DataControl(), nn.Linear(2 + 2, 64), nn.Tanh(), nn.Linear(64, 2))


class MinusZ(nn.Module):
    """dz/dt = net(z) - z: the DEQ form f(z, x) - z, whose steady state is z* = net(z*)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, t, z, args=None):
        return self.net(z) - z


def spectral(net: nn.Module) -> nn.Module:
    """Every Linear of ``net`` divided by its largest singular value: net is 1-Lipschitz."""
    td.apply_norm(net, "spectral_norm")
    return net


# ---------------------------------------------------------------------------- the rows
class Row(NamedTuple):
    field: str        # 'quickstart' or 'cookbook'
    model: str        # what is built, as a user writes it
    edits: str        # the edits to the tutorial's field
    build: Callable[[], Tuple[nn.Module, torch.Tensor]]
    penalty: bool = False


FINITE = torch.linspace(0, 1, 5)  # the quickstart's t_span; the cookbook's is linspace(0, 1, 2)


def steady(vf: nn.Module, penalty: bool = False) -> Tuple[nn.Module, torch.Tensor]:
    jac = td.JacobianPenalty(weight=PENALTY) if penalty else None
    return td.InfiniteTimeNeuralODE(vf, solver="tsit5", atol=1e-3, rtol=1e-3, jacobian_penalty=jac), FINITE


ROWS: List[Row] = [
    Row("quickstart", "NeuralODE(f, sensitivity='adjoint', solver='dopri5'), t in [0, 1]", "none (the tutorial)",
        lambda: (NeuralODE(quickstart_mlp(), sensitivity="adjoint", solver="dopri5"), FINITE)),
    Row("quickstart", "InfiniteTimeNeuralODE(f)", "none (the swap alone)", lambda: steady(quickstart_mlp())),
    Row("quickstart", "InfiniteTimeNeuralODE(f)", "injection + `-z`", lambda: steady(MinusZ(quickstart_injected()))),
    Row("quickstart", "InfiniteTimeNeuralODE(f, jacobian_penalty=JacobianPenalty())",
        "injection + `-z` + Jacobian penalty", lambda: steady(MinusZ(quickstart_injected()), penalty=True), True),
    Row("quickstart", "InfiniteTimeNeuralODE(f)", "injection + `-z` + spectral norm",
        lambda: steady(MinusZ(spectral(quickstart_injected())))),
    Row("cookbook", "NeuralODE(f, sensitivity='interpolated_adjoint', solver='tsit5', atol=1e-3, rtol=1e-3), t in [0, 1]",
        "none (the tutorial)", lambda: (NeuralODE(cookbook_datacontrol(), sensitivity="interpolated_adjoint",
                                                   solver="tsit5", atol=1e-3, rtol=1e-3), torch.linspace(0, 1, 2))),
    Row("cookbook", "InfiniteTimeNeuralODE(f)", "none (the swap alone)", lambda: steady(cookbook_datacontrol())),
    Row("cookbook", "InfiniteTimeNeuralODE(f)", "`-z`", lambda: steady(MinusZ(cookbook_datacontrol()))),
    Row("cookbook", "InfiniteTimeNeuralODE(f, jacobian_penalty=JacobianPenalty())", "`-z` + Jacobian penalty",
        lambda: steady(MinusZ(cookbook_datacontrol()), penalty=True), True),
    Row("cookbook", "InfiniteTimeNeuralODE(f)", "`-z` + spectral norm",
        lambda: steady(MinusZ(spectral(cookbook_datacontrol())))),
]


# ---------------------------------------------------------------------------- training and measuring
def moons(seed: int, n: int = 512) -> Tuple[torch.Tensor, torch.Tensor]:
    """The tutorials' call; ToyDataset draws its noise from NumPy's global generator, so that is seeded."""
    np.random.seed(seed)
    x, y = ToyDataset().generate(n_samples=n, noise=1e-1, dataset_type="moons")
    return x.float(), y.long()


def _message(caught, error: Optional[BaseException]) -> List[str]:
    """What the user saw in one step, in order: the warnings, then the error."""
    seen = [f"{w.category.__name__}: {w.message}" for w in caught
            if issubclass(w.category, td.ConvergenceWarning) or "torchdyn_deq" in str(w.filename)]
    if error is not None:
        seen.append(f"{type(error).__name__}: {error}")
    return seen


def evaluate(model: nn.Module, t_span: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> dict:
    steady_state = isinstance(model, td.InfiniteTimeNeuralODE)
    model.vf.nfe = 0
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            t_eval, trajectory = model(x, t_span)
        except Exception as err:  # a version that refuses the solve: recorded, not fatal
            return {"accuracy": None, "nfe": None, "z_max": None, "error": f"{type(err).__name__}: {err}"}
    out = {"accuracy": float((trajectory[-1].argmax(1) == y).float().mean()), "nfe": int(model.vf.nfe),
           "z_max": float(trajectory[-1].abs().max())}
    if steady_state:
        out.update(converged=bool(model.solution.converged), result=str(model.solution.result),
                   t_reached=float(t_eval[-1]))
    return out


def train(row: Row, epochs: int, data, test) -> dict:
    torch.manual_seed(0)
    model, t_span = row.build()
    steady_state = isinstance(model, td.InfiniteTimeNeuralODE)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    x, y = data
    fwd_nfe, bwd_work, step_s, losses, messages = [], [], [], [], []
    unconverged, stopped_at, error = 0, None, None
    for epoch in range(epochs):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            start = time.perf_counter()
            try:
                model.vf.nfe = 0
                _, trajectory = model(x, t_span)
                forward = int(model.vf.nfe)
                loss = nn.functional.cross_entropy(trajectory[-1], y)
                if row.penalty:
                    loss = loss + model.solution.aux_loss
                opt.zero_grad()
                loss.backward()
                opt.step()
                failed = None
            except Exception as err:  # recorded as the row's outcome: this script measures what users meet
                failed = err
            elapsed = time.perf_counter() - start
        messages += _message(caught, failed)
        if failed is not None:
            stopped_at, error = epoch, f"{type(failed).__name__}: {failed}"
            break
        step_s.append(elapsed)
        fwd_nfe.append(forward)
        losses.append(float(loss.detach()))
        if steady_state:
            unconverged += not model.solution.converged
            bwd_work.append(model.solution.backward_iters or 0)
        else:
            bwd_work.append(int(model.vf.nfe) - forward)  # the adjoint's evaluations of the field
    record = {
        "field": row.field, "model": row.model, "edits": row.edits, "epochs": epochs,
        "steps_done": len(step_s), "stopped_at": stopped_at, "error": error,
        "final_loss": losses[-1] if losses else None, "loss_finite": bool(losses) and all(map(_finite, losses)),
        "forward_nfe_median": statistics.median(fwd_nfe) if fwd_nfe else None,
        "forward_nfe_max": max(fwd_nfe) if fwd_nfe else None,
        "backward_median": statistics.median(bwd_work) if bwd_work else None,
        "backward_unit": "GMRES iterations (VJPs)" if steady_state else "adjoint evaluations",
        "unconverged_forward": unconverged if steady_state else None,
        "step_ms_median": 1e3 * statistics.median(step_s) if step_s else None,
        "train_s": sum(step_s), "warnings": len(messages), "first_message": messages[0] if messages else None,
    }
    record["train"] = evaluate(model, t_span, *data)
    record["test"] = evaluate(model, t_span, *test)
    return record


def _finite(value: float) -> bool:
    return value == value and abs(value) != float("inf")


# ---------------------------------------------------------------------------- the table
def _cell(value, fmt: str = "{:.0f}") -> str:
    return "—" if value is None else fmt.format(value)


def _outcome(r: dict) -> str:
    if r["error"] is not None:
        return f"stopped at step {r['stopped_at'] + 1}"
    if r["unconverged_forward"] is None:
        return "finite time"
    test = r["test"]
    if test.get("error"):
        return f"refused: {_short(test['error'], 60)}"
    state = "converged" if test["converged"] else f"not converged ({test['result']})"
    return f"{state}, t = {test['t_reached']:.3g}, max abs z* = {test['z_max']:.3g}"


def _short(message: Optional[str], n: int = 90) -> str:
    if message is None:
        return "—"
    message = " ".join(message.split()).replace("|", "/")
    return message if len(message) <= n else message[: n - 3] + "..."


def _percent(accuracy: Optional[float]) -> str:
    return "—" if accuracy is None else f"{100 * accuracy:.1f}%"


def table(results: dict) -> str:
    rows = results["rows"]
    return markdown_table(
        ("Field", "Edits", "Train acc.", "Test acc.", "Fwd NFE (median / max)", "Bwd work (median)",
         "Unconverged fwd", "Test solve", "Step (ms)", "First message"),
        [(r["field"], r["edits"], _percent(r["train"]["accuracy"]), _percent(r["test"]["accuracy"]),
          f"{_cell(r['forward_nfe_median'])} / {_cell(r['forward_nfe_max'])}",
          f"{_cell(r['backward_median'])} {'VJPs' if r['unconverged_forward'] is not None else 'adjoint evals'}",
          "—" if r["unconverged_forward"] is None else f"{r['unconverged_forward']} of {r['steps_done']}",
          _outcome(r), _cell(r["step_ms_median"], "{:.1f}"), _short(r["first_message"])) for r in rows],
        align="llrrrrrlrl")


def setup_text(results: dict) -> str:
    """The data, the training and the machine of a results file, in one paragraph."""
    s, m = results["setup"], results["machine"]
    epochs = ", ".join(f"{k} {v}" for k, v in s["epochs"].items())
    return (f"`{results['command']}`: {s['train_samples']} training / {s['test_samples']} test moons (`ToyDataset`, "
            f"noise 0.1), one full batch per epoch, Adam lr {s['lr']}, epochs: {epochs}. Steady-state rows: "
            f"`InfiniteTimeNeuralODE`, tsit5, atol = rtol = {s['atol']:g}, max_steps 100, Jacobian penalty weight "
            f"{s['jacobian_penalty_weight']:g}; fwd NFE per training step, bwd work per training step (GMRES "
            f"iterations, one VJP each, or the adjoint's evaluations); step: median wall time of a training step. "
            f"Machine: {m['cpu']}, {m['cpu_count']} CPUs shared with other jobs (load average {m['load_start']:.1f} "
            f"at the start, {m['load_end']:.1f} at the end: the times are noisy, the NFE are not), "
            f"{m['torch_threads']} torch thread(s), torch {m['torch']}, torchdyn {m['torchdyn']}, "
            f"pytorch-lightning {m['pytorch_lightning']}, torchdyn_deq {m['torchdyn_deq']}, Python {m['python']}.")


def markdown(results: dict) -> str:
    return f"# torchdyn's tutorials ported to a steady state\n\n{table(results)}\n\n{setup_text(results)}\n"


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--epochs", type=int, default=None, help="every row (default: each tutorial's own)")
    parser.add_argument("--samples", type=int, default=512, help="training moons (the tutorials' 512)")
    parser.add_argument("--test-samples", type=int, default=1000)
    parser.add_argument("--rows", default=None, help="comma-separated row indices (default: all)")
    parser.add_argument("--out", default=str(RESULTS), help="path without suffix of the .json / .md pair")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    data, test = moons(0, args.samples), moons(1, args.test_samples)
    epochs = {k: args.epochs or v for k, v in EPOCHS.items()}
    chosen = ROWS if args.rows is None else [ROWS[int(i)] for i in args.rows.split(",")]
    load_start = os.getloadavg()[0]
    rows = []
    for row in chosen:
        record = train(row, epochs[row.field], data, test)
        print(json.dumps({k: record[k] for k in ("field", "edits", "steps_done", "error", "forward_nfe_median",
                                                  "unconverged_forward", "step_ms_median")}
                         | {"test_acc": record["test"]["accuracy"]}), flush=True)
        rows.append(record)
    results = {
        "command": "python examples/porting_torchdyn.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "setup": {"train_samples": args.samples, "test_samples": args.test_samples, "lr": 0.01, "epochs": epochs,
                  "jacobian_penalty_weight": PENALTY, "solver": "tsit5", "atol": 1e-3, "rtol": 1e-3},
        "machine": machine_info() | {"cpu": _cpu(), "cpu_count": os.cpu_count(), "load_start": load_start,
                                     "load_end": os.getloadavg()[0]},
        "rows": rows,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(results, indent=1) + "\n")
    out.with_suffix(".md").write_text(markdown(results))
    print(table(results))
    return results


if __name__ == "__main__":
    main()
