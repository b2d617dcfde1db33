"""The paper's baseline: a torchdyn ``NeuralODE`` on ``[0, 1]`` with input injection.

Both experiments (MNIST, section 4.1; CIFAR-10 with MDEQs, section 4.2) compare the DEQs with
the same implicit layer ``f(z, x)`` used as the vector field of a Neural ODE,
``dz/dt = f(z, x)``, integrated from ``z(0) = 0`` over ``t in [0, 1]``. This module holds that
baseline once, in the package (it imports only torch and torchdyn), so that the model zoo of
``torchdyn_deq.multiscale`` builds it without importing the experiments.
"""
from __future__ import annotations

import contextlib
import io
from typing import Optional, Sequence, Tuple

import torch
import torch.nn as nn
from torch import Tensor
from torchdyn.core import NeuralODE


class InjectedField(nn.Module):
    """``d[z, x]/dt = [f(z, x), 0]`` on the state ``[z, x_flat]``.

    torchdyn's ``DataControl`` injects a *detached* copy of the input (``_control =
    x.detach()``), so an encoder in front of the Neural ODE would receive no gradient. The
    input rides in the state instead, with zero velocity: it stays constant along the
    trajectory, and the adjoint (or autograd) returns its gradient like that of any initial
    condition.

    Args:
        f: the layer ``f(z, x)``; ``z`` is ``(batch, size)``, ``x`` is ``(batch, *injection_shape)``.
        size: ``N``, the per-sample size of ``z``.
        injection_shape: the per-sample shape of ``x``.
    """

    def __init__(self, f: nn.Module, size: int, injection_shape: Sequence[int]):
        super().__init__()
        self.f, self.size, self.injection_shape = f, int(size), tuple(injection_shape)

    def forward(self, t: Tensor, state: Tensor, args: Optional[dict] = None) -> Tensor:
        z, x = state[:, :self.size], state[:, self.size:]
        dz = self.f(z, x.reshape(x.shape[0], *self.injection_shape))
        return torch.cat([dz, torch.zeros_like(x)], dim=1)


class InjectedNeuralODE(nn.Module):
    """``dz/dt = f(z, x)`` from ``z(0) = 0`` over ``t in [0, 1]``, by torchdyn's ``NeuralODE``.

    Args:
        f: the implicit layer of the DEQ it is compared with.
        size: ``N``, the per-sample size of ``z`` (the state is stored flat, ``(batch, N)``).
        injection_shape: the per-sample shape of the injected input ``x``.
        solver: torchdyn's solver name. Default ``'tsit5'`` (the paper's).
        sensitivity: ``'adjoint'`` (default, the paper's baseline) or ``'autograd'``.
        atol, rtol: the solver's tolerances. Default ``5e-3`` (the MNIST experiment's).
        atol_adjoint, rtol_adjoint: the adjoint's tolerances; ``None`` (default) keeps torchdyn's
            (1e-4), as the paper's MNIST baseline; the CIFAR baseline passes the forward ones.

    ``forward(x)`` returns torchdyn's ``(t_eval, trajectory)`` with the injected input stripped
    (``trajectory[-1]`` is ``z(1)``, ``(batch, N)``). ``forward_nfe`` is the last forward pass's
    NFE and ``backward_nfe()`` the evaluations since (the adjoint's, after a backward pass).

    Examples:
        >>> import torch, torch.nn as nn
        >>> from torchdyn_deq._baselines import InjectedNeuralODE
        >>> class F(nn.Module):
        ...     def forward(self, z, x):
        ...         return torch.tanh(z + x)
        >>> node = InjectedNeuralODE(F(), size=4, injection_shape=(4,))
        >>> t_eval, trajectory = node(torch.randn(2, 4))
        >>> tuple(trajectory[-1].shape), node.forward_nfe > 0
        ((2, 4), True)
    """

    def __init__(self, f: nn.Module, size: int, injection_shape: Sequence[int], solver: str = "tsit5",
                 sensitivity: str = "adjoint", atol: float = 5e-3, rtol: float = 5e-3,
                 atol_adjoint: Optional[float] = None, rtol_adjoint: Optional[float] = None):
        super().__init__()
        self.size = int(size)
        adjoint = {key: value for key, value in (("atol_adjoint", atol_adjoint), ("rtol_adjoint", rtol_adjoint))
                   if value is not None}
        with contextlib.redirect_stdout(io.StringIO()):  # torchdyn prints about its defaults
            self.ode = NeuralODE(InjectedField(f, self.size, injection_shape), solver=solver,
                                 sensitivity=sensitivity, atol=atol, rtol=rtol, **adjoint)
        self.register_buffer("t_span", torch.linspace(0, 1, 2))
        self.forward_nfe, self._nfe_mark = 0, 0

    @property
    def f(self) -> nn.Module:
        """The layer ``f(z, x)`` (the vector field without the injected input)."""
        return self.ode.vf.vf.f

    def forward(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        start = int(self.ode.vf.nfe)
        state = torch.cat([x.new_zeros(x.shape[0], self.size), x.flatten(1)], dim=1)
        t_eval, trajectory = self.ode(state, self.t_span.to(x.dtype))
        self._nfe_mark = int(self.ode.vf.nfe)
        self.forward_nfe = self._nfe_mark - start
        return t_eval, trajectory[..., :self.size]

    def backward_nfe(self) -> int:
        """Vector-field evaluations since the last forward pass (the adjoint's, after a backward)."""
        return int(self.ode.vf.nfe) - self._nfe_mark
