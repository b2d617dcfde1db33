"""The solution record of a steady-state solve, and how non-convergence is reported."""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import Tensor

FAILURE_MODES = ("warn", "raise")


class ConvergenceWarning(UserWarning):
    """A forward or backward solve stopped before reaching its tolerance."""


class ConvergenceError(RuntimeError):
    """A forward or backward solve stopped before reaching its tolerance (``on_failure='raise'``)."""


class NonFiniteError(FloatingPointError):
    """NaN or inf appeared in the input or during a solve."""


def check_failure_mode(on_failure: str) -> str:
    if on_failure not in FAILURE_MODES:
        raise ValueError(f"on_failure={on_failure!r} is not one of {FAILURE_MODES}")
    return on_failure


def report_failure(message: str, on_failure: str) -> None:
    """Warn or raise, as the user chose; never silent."""
    if on_failure == "raise":
        raise ConvergenceError(message)
    warnings.warn(message, ConvergenceWarning, stacklevel=3)


@dataclass
class SteadyStateSolution:
    """What one forward solve did.

    Attributes:
        z_star: the steady state, shape ``(batch, *state)``.
        z0: the starting state the solver was given.
        residual: per-sample scaled residual ``rms(g(z*) / (atol + rtol |z*|))``, continuous and
            discrete solvers alike; ``<= 1`` means converged.
        t: the time reached (continuous solvers) or the number of iterations (discrete solvers).
        nfe: vector-field evaluations of the forward pass: the initializer's (one for Skip
            Reg.'s ``f(0, x)``) and the solver's. The one extra evaluation at ``z*`` with
            gradients, made in training for the implicit backward, is not included.
        nfe_per_sample: evaluations after which each sample first met its tolerance
            (``nfe`` for samples that never did).
        steps_accepted, steps_rejected: adaptive steps (iterations for discrete solvers).
        converged: every sample met the tolerance.
        reason: ``'converged'``, ``'max_steps'``, ``'diverged'``, ``'stalled'``, or ``'budget'``
            (the eval-mode step budget ``eval_max_steps`` was used up, as intended).
        backward_iters: linear-solve iterations (VJPs) of the last backward pass, ``None``
            until a backward pass ran.
        backward_residual: relative residual reached by that linear solve.
        skip_loss: the Skip / Skip Reg. auxiliary loss, already weighted (``None`` without one).
        jacobian_loss: the Hutchinson Jacobian penalty, already weighted (``None`` without one).
    """

    z_star: Tensor
    z0: Tensor
    residual: Tensor
    t: float
    nfe: int
    nfe_per_sample: Tensor
    steps_accepted: int
    steps_rejected: int
    converged: bool
    reason: str
    backward_iters: Optional[int] = None
    backward_residual: Optional[float] = None
    skip_loss: Optional[Tensor] = None
    jacobian_loss: Optional[Tensor] = None
    extra: dict = field(default_factory=dict)

    @property
    def aux_loss(self) -> Tensor:
        """Sum of the weighted auxiliary losses, to add to the task loss in one line
        (``loss = task_loss + model.solution.aux_loss``); a zero tensor when there are none."""
        total = torch.zeros((), dtype=self.z_star.dtype, device=self.z_star.device)
        for term in (self.skip_loss, self.jacobian_loss):
            if term is not None:
                total = total + term
        return total

    def stats(self) -> dict:
        """Plain numbers for logging (``self.log_dict(model.solution.stats())``)."""
        out = {
            "nfe": float(self.nfe),
            "residual_max": float(self.residual.max()) if self.residual.numel() else 0.0,
            "steps": float(self.steps_accepted),
            "converged": float(self.converged),
        }
        if self.backward_iters is not None:
            out["backward_iters"] = float(self.backward_iters)
        return out
