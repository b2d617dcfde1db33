"""The torchdiffeq Neural ODE baseline of the MNIST step benchmark: ``odeint_adjoint`` (dopri5).

Same layer, state and interface as `baselines.InjectedNeuralODE` (torchdyn's ``NeuralODE``), so a
benchmark row is one line::

    "NeuralODE (torchdiffeq odeint_adjoint, dopri5)": (lambda f: TorchdiffeqODELayer(f, tol=tol), "adjoint NFE"),
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn as nn
from torch import Tensor
from torchdiffeq import odeint_adjoint

from .._baselines import InjectedField
from .mnist import HIDDEN


class _Counted(nn.Module):
    """torchdiffeq's ``func(t, y)`` around the injected field, counting evaluations."""

    def __init__(self, field: InjectedField):
        super().__init__()
        self.field, self.nfe = field, 0

    def forward(self, t: Tensor, y: Tensor) -> Tensor:
        self.nfe += 1
        return self.field(t, y)


class TorchdiffeqODELayer(nn.Module):
    """``dz/dt = f(z, x)`` on ``t in [0, 1]`` from ``z0 = 0`` by torchdiffeq's ``odeint_adjoint``
    (dopri5 forward and backward; the input carried in the state with zero velocity, as in
    `baselines.InjectedNeuralODE`). Adjoint tolerances torchdiffeq's defaults unless ``adjoint_tol``.
    Returns ``(t_eval, trajectory)`` with the input stripped; ``forward_nfe`` is the last
    forward pass's NFE and ``backward_nfe()`` the evaluations since. ``ode.sensalg`` is
    ``'adjoint'`` (what the benchmark's backward count reads)."""

    def __init__(self, f: nn.Module, tol: float = 5e-3, width: int = HIDDEN, method: str = "dopri5",
                 adjoint_tol: Optional[float] = None):
        super().__init__()
        self.width, self.tol, self.method = width, tol, method
        self.ode = _Counted(InjectedField(f, width, (width,)))
        self.ode.sensalg = "adjoint"
        self.adjoint = {} if adjoint_tol is None else {"adjoint_rtol": adjoint_tol, "adjoint_atol": adjoint_tol}
        self.register_buffer("t_span", torch.linspace(0, 1, 2))
        self.forward_nfe, self._nfe_mark = 0, 0

    def forward(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        start = self.ode.nfe
        y0 = torch.cat([torch.zeros_like(x), x], dim=1)
        trajectory = odeint_adjoint(self.ode, y0, self.t_span.to(x), method=self.method, rtol=self.tol,
                                    atol=self.tol, adjoint_params=tuple(self.ode.parameters()), **self.adjoint)
        self._nfe_mark = self.ode.nfe
        self.forward_nfe = self._nfe_mark - start
        return self.t_span, trajectory[..., :self.width]

    def backward_nfe(self) -> int:
        """Vector-field evaluations since the last forward pass."""
        return self.ode.nfe - self._nfe_mark
