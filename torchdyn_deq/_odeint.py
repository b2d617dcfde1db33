"""``odeint_steady_state``: the steady state of ``dy/dt = func(t, y)`` in torchdiffeq's style."""
from __future__ import annotations

from typing import Callable, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from torch import Tensor
from torch.autograd.function import once_differentiable

from ._checks import boolean, non_negative_float, positive_float, positive_int
from ._registry import ODE_SOLVERS, ROOT_SOLVERS
from ._sensitivity import Sensitivity
from ._solution import SteadyStateSolution
from ._torchdyn import _solve_steady_state, steady_state_solver

METHODS = ODE_SOLVERS + tuple(ROOT_SOLVERS)
# torchdiffeq's methods that have no steady-state counterpart here (named in the error)
_TORCHDIFFEQ_ONLY = ("dopri8", "bosh3", "fehlberg2", "adaptive_heun", "heun2", "heun3", "explicit_adams",
                     "implicit_adams", "fixed_adams", "scipy_solver")


class _Field(nn.Module):
    """``func(t, y)`` as the ``(t, z, args)`` field of a batch: ``z`` is ``y`` itself
    (``batched``) or ``y`` flattened into one row."""

    def __init__(self, func: Callable[[Tensor, Tensor], Tensor], shape: torch.Size, batched: bool):
        super().__init__()
        self.func, self.shape, self.batched = func, shape, batched

    def forward(self, t: Tensor, z: Tensor, args=None) -> Tensor:
        y = z if self.batched else z.view(self.shape)
        dy = self.func(t, y)
        if not isinstance(dy, Tensor) or dy.shape != y.shape:
            got = tuple(dy.shape) if isinstance(dy, Tensor) else type(dy).__name__
            raise ValueError(f"func(t, y) returned {got} for y of shape {tuple(y.shape)}; dy/dt must have y's shape")
        return dy if self.batched else dy.reshape(z.shape)


class _SteadyState(torch.autograd.Function):
    """``y*`` in the forward pass; gradients to ``adjoint_params`` only (torchdiffeq's
    contract): the solve's own backward (implicit by default) restricted to those tensors."""

    @staticmethod
    def forward(ctx, run, y0, *params):
        with torch.enable_grad():
            y_star = run(y0)
        ctx.y_star, ctx.params, ctx.y0_like = y_star, params, (y0.shape, y0.dtype, y0.device)
        return y_star.detach().clone()

    @staticmethod
    @once_differentiable
    def backward(ctx, v):
        wanted = [i for i, p in enumerate(ctx.params) if p.requires_grad]
        grads = [None] * len(ctx.params)
        if wanted and ctx.y_star.requires_grad:
            # the graph is kept: a second backward pass through y* (gradcheck makes one per entry) reuses it
            found = torch.autograd.grad(ctx.y_star, [ctx.params[i] for i in wanted], v, allow_unused=True,
                                        retain_graph=True)
            for i, g in zip(wanted, found):
                grads[i] = torch.zeros_like(ctx.params[i]) if g is None else g
        for i in wanted:  # a parameter the solve does not depend on: exact zeros of its shape
            if grads[i] is None:
                grads[i] = torch.zeros_like(ctx.params[i])
        # the steady state does not depend on where the solve starts
        shape, dtype, device = ctx.y0_like
        y0_grad = torch.zeros(shape, dtype=dtype, device=device) if ctx.needs_input_grad[1] else None
        return (None, y0_grad, *grads)


def odeint_steady_state(func: Callable[[Tensor, Tensor], Tensor], y0: Tensor, *, method: str = "tsit5",
                        rtol: float = 1e-3, atol: float = 1e-3, options: Optional[dict] = None,
                        adjoint_params: Optional[Sequence[Tensor]] = None, adjoint_rtol: float = 1e-5,
                        adjoint_atol: float = 1e-10, sensitivity: Union[str, Sensitivity] = "steady_state",
                        max_steps: int = 100, batched: bool = False, t0: float = 0.0,
                        return_solution: bool = False) -> Union[Tensor, Tuple[Tensor, SteadyStateSolution]]:
    """The steady state ``y*`` of ``dy/dt = func(t, y)``, ``func(t, y*) = 0``, reached from ``y0``,
    with implicit gradients: torchdiffeq's ``odeint_adjoint`` with ``t = [t0, inf]``.

    The solve stops when ``rms(func(t, y) / (atol + rtol |y|)) <= 1``. The backward pass
    solves ``(df/dy)^T w = -v`` at ``y*`` (GMRES at ``adjoint_rtol``, ``adjoint_atol``) and
    returns ``w^T df/dp`` to each ``p`` of ``adjoint_params``: memory independent of the
    number of steps. As in torchdiffeq, only ``adjoint_params`` receive gradients, so list
    there any tensor ``func`` closes over (an injected input) that should; ``y0`` receives
    zeros (``y*`` does not depend on the start).

    Args:
        func: ``func(t, y)``, returning a tensor shaped like ``y``.
        y0: the starting state.
        method: torchdiffeq's names where they fit: ``'tsit5'`` (default), ``'dopri5'``,
            ``'euler'``, ``'midpoint'``, ``'rk4'`` (fixed step 1); and ``'vcab3'``,
            ``'anderson'``, ``'broyden'``, ``'fixed_point'``.
        rtol: relative steady-state tolerance. Default ``1e-3``, `InfiniteTimeNeuralODE`'s
            (torchdiffeq's ``1e-7`` / ``1e-9`` bound local errors of a finite-time solve; here
            the tolerances bound the residual).
        atol: absolute steady-state tolerance. Default ``1e-3``.
        options: keywords of the method's solver object (``ODESteadyStateSolver``, ``VCAB3``,
            the root solvers), e.g. ``{'max_step': 1.0}``.
        adjoint_params: the tensors that receive gradients. Default: ``func.parameters()``
            when ``func`` is an ``nn.Module``, else none.
        adjoint_rtol: relative tolerance of the backward linear solve. Default ``1e-5``,
            `SteadyStateSensitivity`'s.
        adjoint_atol: its absolute tolerance. Default ``1e-10``.
        sensitivity: ``'steady_state'`` (default), ``'jacobian_free'`` (approximate),
            ``'autograd'`` (backpropagation through the steps) or a `Sensitivity`.
        max_steps: bound on solver steps. Default ``100``.
        batched: ``y0``'s first dimension indexes independent samples, each with its own
            stop test (this package's models). Default ``False``: ``y0`` is one state, as
            in torchdiffeq.
        t0: the start time. Default ``0``.
        return_solution: also return the solve's `SteadyStateSolution`.
    """
    if not callable(func):
        raise TypeError(f"func must be callable as func(t, y), got {func!r}")
    if not isinstance(y0, Tensor) or not y0.is_floating_point():
        raise TypeError(f"y0 must be a floating-point tensor, got {type(y0).__name__}"
                        f"{'' if not isinstance(y0, Tensor) else f' of dtype {y0.dtype}'}")
    if method not in METHODS:
        hint = f" (torchdiffeq's {method!r} has no steady-state counterpart here)" if method in _TORCHDIFFEQ_ONLY else ""
        raise ValueError(f"unknown method {method!r}{hint}; valid: {', '.join(repr(m) for m in METHODS)}")
    if options is not None and not isinstance(options, dict):
        raise TypeError(f"options must be a dict of the method's keywords, got {options!r}")
    batched, return_solution = boolean("batched", batched), boolean("return_solution", return_solution)
    if batched and (y0.dim() == 0 or y0.shape[0] == 0):
        raise ValueError(f"batched=True needs a non-empty first dimension, got y0 of shape {tuple(y0.shape)}")
    solver = steady_state_solver(method, options or {})
    settings = dict(solver=solver, atol=positive_float("atol", atol), rtol=non_negative_float("rtol", rtol),
                    max_steps=positive_int("max_steps", max_steps), sensitivity=sensitivity,
                    atol_adjoint=non_negative_float("adjoint_atol", adjoint_atol),
                    rtol_adjoint=non_negative_float("adjoint_rtol", adjoint_rtol), args={}, input_grad=True)
    if adjoint_params is None:
        adjoint_params = tuple(func.parameters()) if isinstance(func, nn.Module) else ()
    adjoint_params = tuple(adjoint_params)
    for p in adjoint_params:
        if not isinstance(p, Tensor):
            raise TypeError(f"adjoint_params must be tensors, got {type(p).__name__}")
    field = _Field(func, y0.shape, batched)
    t_start = torch.tensor(float(t0), dtype=y0.dtype, device=y0.device)

    records = []

    def run(y: Tensor) -> Tensor:
        z = y.detach() if batched else y.detach().reshape(1, -1)
        _, trajectory, record = _solve_steady_state(field, z, t_start, **settings)
        records.append(record)
        return trajectory[-1] if batched else trajectory[-1].view(y0.shape)

    if torch.is_grad_enabled() and (y0.requires_grad or any(p.requires_grad for p in adjoint_params)):
        y_star = _SteadyState.apply(run, y0, *adjoint_params)
    else:
        with torch.no_grad():
            y_star = run(y0)
    return (y_star, records[-1]) if return_solution else y_star
