"""`implicit_solve`: the one core under every door (`DEQ`, `InfiniteTimeNeuralODE`, torchdyn's
``NeuralODE`` / ``ODEProblem`` by name, `odeint_steady_state`).

The forward solve (`steady_state_solve`), the message that names the cause of a failure, the
backward attachment (one `torch.autograd.Function`, whatever the sensitivity) and the record,
completed once and frozen. The doors only translate their arguments into a `Field`, a start,
a solver, `SolveOptions` and a `Sensitivity`.
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Callable, Dict, Iterator, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from torch import Tensor
from torch.autograd.function import once_differentiable

from ._dropout import reset_dropout
from ._field import Field
from ._loop import SteadyStateSolver, steady_state_solve
from ._norms import computed_once
from ._sensitivity import Sensitivity
from ._solution import NonFiniteError, SolveOptions, SteadyStateSolution, report_failure

Losses = Callable[[Tensor, Tensor], Dict[str, Optional[Tensor]]]

DEQ_FORM = ("a steady state needs the DEQ form dz/dt = f(z, x) - z: the input x injected into the field "
            "(torchdyn's DataControl, or td.DEQ(f) with f(z, x)) and the state subtracted (- z), with f contractive "
            "near z* (Jacobian regularization, spectral norm)")


@contextlib.contextmanager
def per_solve(module: Optional[nn.Module]) -> Iterator[None]:
    """What is fixed for one solve of ``module``: a new variational dropout mask (the same at every
    evaluation, so that the fixed point exists), weight / spectral norms computed once."""
    if module is None:
        yield
        return
    reset_dropout(module)
    with computed_once(module):
        yield


def field_cause(field: Field) -> str:
    """A cause of failure that can be read off the field itself (``''`` if none): a vector field
    with no injected input has a steady state, if any, that does not depend on the input."""
    if field.injected is False:
        return ("no equilibrium that depends on the input: the vector field has no injected input (no torchdyn "
                f"DataControl or other `_control` module was found), so z* can depend on x only through the start; "
                f"{DEQ_FORM}")
    return ""


def diagnosis(cause: str, sol: SteadyStateSolution) -> str:
    """The forward's message, led by ``cause`` (`field_cause`) where there is one."""
    return f"{cause}. The solve: {sol.message}" if cause and not sol.result.successful else sol.message


def implicit_solve(field: Field, z0: Tensor, solver: SteadyStateSolver, options: SolveOptions, sensitivity: Sensitivity,
                   *, on_failure: str = "warn", differentiate: Optional[bool] = None,
                   params: Optional[Sequence[Tensor]] = None, losses: Optional[Losses] = None,
                   keep: Optional[Callable[[SteadyStateSolution], None]] = None) -> Tuple[Tensor, SteadyStateSolution]:
    """The steady state ``z*`` of ``field`` from ``z0``, with ``sensitivity``'s gradients, and its record.

    Args:
        field: the `Field` (its count of evaluations is the record's).
        z0: the start, ``(batch, *state)``; its graph (a Skip predictor's) is the door's business:
            ``z*`` does not depend on it.
        solver: the forward solver (`steady_state_solve` runs it).
        options: the forward solve's `SolveOptions` (tolerances, budget, stop rule).
        sensitivity: how gradients reach the tensors ``field`` depends on: implicit ones attach at
            ``z*`` through the one backward function, `AutogradSensitivity` backpropagates through
            the steps.
        on_failure: ``'warn'`` or ``'raise'`` for a forward solve that did not converge.
        differentiate: attach gradients. Default: ``torch.is_grad_enabled()``.
        params: gradients to exactly these tensors (torchdiffeq's ``adjoint_params``; zeros for
            those ``z*`` does not depend on). Default ``None``: to every tensor the field reads.
        losses: ``losses(gz, z_leaf) -> {name: tensor}`` at ``z*`` with autograd (the Skip and
            Jacobian losses of the record).
        keep: called with the record before a failure is reported (so a door keeps it even when
            ``on_failure='raise'``).

    Returns:
        ``(z*, record)``: the record is frozen; the backward's statistics go to ``record.backward``.
    """
    differentiate = torch.is_grad_enabled() if differentiate is None else differentiate
    implicit = sensitivity.implicit or not differentiate
    try:
        with torch.no_grad() if implicit else contextlib.nullcontext():
            sol = steady_state_solve(field, z0.detach() if implicit else z0, solver, options, nfe_start=field.nfe)
    finally:
        field.restrict(None)  # per-sample termination restricted the injected input
    cause = field_cause(field)
    message = diagnosis(cause, sol)
    sol.backward.cause = cause  # the backward's failure messages lead with it
    z_star, extra = sol.z_star, {}
    if differentiate and (implicit or losses is not None or params is not None):
        out, cotangent = z_star, None
        if implicit or losses is not None:
            z_leaf = sol.z_star.detach().requires_grad_()
            t_star = torch.as_tensor(sol.t, dtype=z_leaf.dtype, device=z_leaf.device)
            with torch.enable_grad():
                gz = field(t_star, z_leaf)
                if implicit:
                    out, cotangent = sensitivity.attach(gz, z_leaf, lambda z: field(t_star, z), options, sol.backward)
                if losses is not None:
                    extra = {k: v for k, v in losses(gz, z_leaf).items() if v is not None}
        if implicit or params is not None:
            guard = _ForwardGuard(sol, message, getattr(sensitivity, "on_failure", on_failure), cotangent)
            z_star = _ImplicitGradient.apply(out, sol.z_star.detach(), guard, params is not None, *(params or ()))
    sol = dataclasses.replace(sol, message=message, **extra) if (extra or message != sol.message) else sol
    if keep is not None:
        keep(sol)
    if not sol.result.successful:
        report_failure(message, on_failure)
    return z_star, sol


class _ForwardGuard:
    """The map ``v -> cotangent of out`` of one backward pass, led by the forward's failure: the
    implicit gradient holds only at a steady state, so an unconverged forward solve is named
    (warned, or refused with ``on_failure='raise'``) before the backward solve can fail on it."""

    def __init__(self, sol: SteadyStateSolution, message: str, on_failure: str, cotangent):
        self.sol, self.message, self.on_failure, self.cotangent = sol, message, on_failure, cotangent

    def __call__(self, v: Tensor) -> Tensor:
        self.sol.backward.passes += 1
        if self.sol.result.successful:
            return v if self.cotangent is None else self.cotangent(v)
        cause = (f"the backward pass differentiates a forward solve that did not converge ({self.sol.result}): the "
                 f"implicit gradient holds only at a steady state. {self.message}")
        report_failure(cause, self.on_failure)
        try:
            return v if self.cotangent is None else self.cotangent(v)
        except NonFiniteError as error:
            raise NonFiniteError(f"{cause}. Then: {error}") from error


class _ImplicitGradient(torch.autograd.Function):
    """``z*`` in value. In the backward pass the cotangent ``v`` of ``z*`` becomes the cotangent
    of ``out`` (the sensitivity's map: for implicit differentiation ``w``, the solution of the
    linear system, and ``out = g(z*)``), and either goes into ``out``'s own graph, which carries
    ``w^T dg/dtheta`` and ``w^T dg/dx`` to every tensor the field read, or (``restricted``) is
    taken to exactly ``params`` by one VJP (torchdiffeq's ``adjoint_params``)."""

    @staticmethod
    def forward(ctx, out, z_star, cotangent, restricted, *params):
        ctx.out, ctx.cotangent, ctx.restricted, ctx.params = out, cotangent, restricted, params
        return z_star.clone()

    @staticmethod
    @once_differentiable
    def backward(ctx, v):
        c = ctx.cotangent(v)
        if not ctx.restricted:
            return (c, None, None, None)
        params, grads = ctx.params, [None] * len(ctx.params)
        wanted = [i for i, p in enumerate(params) if p.requires_grad]
        if wanted and ctx.out.requires_grad:
            # the graph is kept: gradcheck runs one backward pass per output entry through it
            found = torch.autograd.grad(ctx.out, [params[i] for i in wanted], c, allow_unused=True, retain_graph=True)
            for i, g in zip(wanted, found):
                grads[i] = g
        grads = [torch.zeros_like(p) if g is None and p.requires_grad else g for p, g in zip(params, grads)]
        return (None, None, None, None, *grads)
