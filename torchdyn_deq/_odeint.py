"""``odeint_steady_state``: the steady state of ``dy/dt = func(t, y)`` in torchdiffeq's style."""
from __future__ import annotations

from typing import Callable, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from torch import Tensor

from ._checks import boolean, non_negative_float, optional, positive_float, positive_int
from ._field import Field
from ._implicit import implicit_solve
from ._registry import ODE_SOLVERS, ROOT_SOLVERS, make_sensitivity, steady_state_solver
from ._sensitivity import Sensitivity
from ._solution import SolveOptions, SteadyStateSolution

METHODS = ODE_SOLVERS + tuple(ROOT_SOLVERS)
# torchdiffeq's methods that have no steady-state counterpart here (named in the error)
_TORCHDIFFEQ_ONLY = ("dopri8", "bosh3", "fehlberg2", "adaptive_heun", "heun2", "heun3", "explicit_adams",
                     "implicit_adams", "fixed_adams", "scipy_solver")


def odeint_steady_state(func: Callable[[Tensor, Tensor], Tensor], y0: Tensor, *, method: str = "tsit5",
                        rtol: float = 1e-3, atol: float = 1e-3, options: Optional[dict] = None,
                        adjoint_params: Optional[Sequence[Tensor]] = None, adjoint_rtol: Optional[float] = None,
                        adjoint_atol: Optional[float] = None, sensitivity: Union[str, Sensitivity] = "steady_state",
                        max_steps: int = 100, batched: bool = False, t0: float = 0.0,
                        return_solution: bool = False) -> Union[Tensor, Tuple[Tensor, SteadyStateSolution]]:
    """The steady state ``y*`` of ``dy/dt = func(t, y)``, ``func(t, y*) = 0``, reached from ``y0``,
    with implicit gradients: torchdiffeq's ``odeint_adjoint`` with ``t = [t0, inf]``.

    The solve stops when ``rms(func(t, y) / (atol + rtol |y|)) <= 1``. The backward pass
    solves ``(df/dy)^T w = -v`` at ``y*`` (GMRES, relative to each sample's cotangent, at the
    forward tolerance by default) and returns ``w^T df/dp`` to each ``p`` of
    ``adjoint_params``: memory independent of the number of steps. The same core as the
    models (`implicit_solve`): the same problem gives the same gradient through either. As in torchdiffeq, only ``adjoint_params`` receive gradients, so list
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
        adjoint_rtol: relative tolerance of the backward linear solve. Default ``None``: the
            forward's, ``max(atol, rtol)`` (`backward_tolerance`), as on every door.
        adjoint_atol: its absolute floor. Default ``None`` (``0``): relative to each sample's
            cotangent, so the gradient's accuracy does not depend on the loss scale.
        sensitivity: ``'steady_state'`` (default), ``'jacobian_free'`` (approximate),
            ``'autograd'`` (backpropagation through the steps) or a `Sensitivity` (then the
            adjoint tolerances are its own: passing them too is a ``ValueError``).
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
    solve_options = SolveOptions(positive_float("atol", atol), non_negative_float("rtol", rtol),
                                 positive_int("max_steps", max_steps))
    sens, on_failure = make_sensitivity(
        sensitivity, rtol_adjoint=optional(non_negative_float, "adjoint_rtol", adjoint_rtol),
        atol_adjoint=optional(non_negative_float, "adjoint_atol", adjoint_atol), forward_tol=max(atol, rtol),
        names=("adjoint_rtol", "adjoint_atol", "on_failure"))
    if adjoint_params is None:
        adjoint_params = tuple(func.parameters()) if isinstance(func, nn.Module) else ()
    adjoint_params = tuple(adjoint_params)
    for p in adjoint_params:
        if not isinstance(p, Tensor):
            raise TypeError(f"adjoint_params must be tensors, got {type(p).__name__}")
    shape = y0.shape

    t0 = float(t0)

    def g(t: Tensor, z: Tensor) -> Tensor:  # y itself (batched) or y flattened into one row
        t = t + t0 if t0 else t
        if batched:
            return func(t, z)
        dy = func(t, z.view(shape))
        return dy.reshape(z.shape) if isinstance(dy, Tensor) and dy.shape == shape else dy  # else the Field's error

    field = Field(g, y0, label="func(t, y)")
    z0 = y0.detach() if batched else y0.detach().reshape(1, -1)
    # y0 among the tensors that get gradients: zeros, as y* does not depend on where the solve starts
    params = adjoint_params + ((y0,) if y0.requires_grad else ())
    differentiate = torch.is_grad_enabled() and any(p.requires_grad for p in params)
    z_star, record = implicit_solve(field, z0, solver, solve_options, sens, on_failure=on_failure,
                                    differentiate=differentiate, params=params if differentiate else None)
    y_star = z_star if batched else z_star.view(shape)
    return (y_star, record) if return_solution else y_star
