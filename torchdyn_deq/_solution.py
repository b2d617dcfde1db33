"""Result codes, the solve options, the solution record, and how failures are reported."""
from __future__ import annotations

import enum
import warnings
from dataclasses import dataclass, field
from typing import List, NamedTuple, Optional, Tuple

import torch
from torch import Tensor

from ._checks import boolean, non_negative_float, non_negative_int, one_of, positive_float, positive_int

FAILURE_MODES = ("warn", "raise")
TERMINATIONS = ("per_sample", "batch_relative", "elementwise")


class ConvergenceWarning(UserWarning):
    """A forward or backward solve stopped before reaching its tolerance."""


class ConvergenceError(RuntimeError):
    """A forward or backward solve stopped before reaching its tolerance (``on_failure='raise'``)."""


class NonFiniteError(FloatingPointError):
    """NaN or inf appeared in the input or during a forward or backward solve (always raised)."""


class Result(str, enum.Enum):
    """Why a solve stopped. A ``str`` enum: ``solution.reason == 'converged'`` works.

    ``converged`` and ``budget`` (a step budget used up on purpose, ``eval_max_steps``) are
    successes; every other code is reported (warning or `ConvergenceError`), with its remedy.
    """

    converged = "converged"
    budget = "budget"
    max_steps = "max_steps"
    diverged = "diverged"
    stalled = "stalled"
    non_finite = "non_finite"
    breakdown = "breakdown"

    def __str__(self) -> str:
        return self.value

    @property
    def successful(self) -> bool:
        return self in (Result.converged, Result.budget)

    @property
    def remedy(self) -> str:
        """What to change, for the forward solve."""
        return _REMEDIES[self]


_REMEDIES = {
    Result.converged: "",
    Result.budget: "",
    Result.max_steps: "the residual was still falling: raise max_steps, loosen atol/rtol, or start closer "
                      "(a Skip / Skip Reg. initializer) or make f more contractive (Jacobian regularization)",
    Result.diverged: "the state grows away from its start: the vector field has no stable steady state for these "
                     "inputs. A DEQ's f must be contractive near z* (Jacobian regularization, a lower learning rate, "
                     "weight or spectral normalisation); an InfiniteTimeNeuralODE field needs the form "
                     "dz/dt = f(z, x) - z. More steps will not help",
    Result.stalled: "the residual stopped falling: the dynamics circle or oscillate (eigenvalues of dg/dz on or near "
                    "the imaginary axis), the iteration cannot make progress, or the residual reached the rounding "
                    "noise of the vector field (half precision, autocast: loosen atol/rtol). Add damping or Jacobian "
                    "regularization, or try another solver ('tsit5' for the discrete ones, 'anderson' for the "
                    "continuous ones)",
    Result.non_finite: "check the input, lower the learning rate, or add Jacobian regularization",
    Result.breakdown: "the linear operator is singular on the Krylov space: the steady state is not isolated "
                      "(dg/dz is singular there); add Jacobian regularization",
}


def check_failure_mode(on_failure: str) -> str:
    return one_of("on_failure", on_failure, FAILURE_MODES)


def report_failure(message: str, on_failure: str) -> None:
    """Warn or raise, as the user chose; never silent."""
    if on_failure == "raise":
        raise ConvergenceError(message)
    warnings.warn(message, ConvergenceWarning, stacklevel=3)


@dataclass(frozen=True)
class SolveOptions:
    """What one forward solve is asked to do.

    Args:
        atol: absolute tolerance of the stop test (``termination='per_sample'``: per sample
            ``rms(g(z) / (atol + rtol |z|)) <= 1``); ``> 0``: with ``atol = 0`` the test cannot be
            met where a component of ``z`` is 0.
        rtol: its relative tolerance, ``>= 0`` (``> 0`` for ``'batch_relative'``).
        max_steps: bound on solver steps (accepted + rejected) or iterations.
        budget: ``max_steps`` is a budget (inference with ``eval_max_steps``): reaching it is
            `Result.budget`, a success, instead of `Result.max_steps`.
        save_steps: accepted-step counts (``0`` is the start) at which the iterate is kept in
            ``solution.states`` (trajectory supervision; torchdeq's ``indexing``). Default none.
        save_evenly: keep this many iterates evenly spaced over the accepted steps of the solve,
            whatever their number (torchdeq's ``n_states``), in memory for at most twice as
            many: every accepted iterate is kept until the buffer is full, then every other
            one is dropped and only every second later one kept. Default ``0``.
        termination: the stop rule, on the residual ``g(z)`` (``f(z) - z`` for a DEQ):

            - ``'per_sample'`` (default): each sample ``i`` meets
              ``rms(g(z_i) / (atol + rtol |z_i|)) <= 1`` (the Hairer norm of torchdyn's and
              torchdiffeq's step control, per sample). Samples that meet it can leave the batch
              (``per_sample=True`` solvers).
            - ``'elementwise'``: every element meets ``|g| <= atol`` or ``|g| <= rtol |z|``
              (DiffEqCallbacks' ``allDerivPass``), i.e. per sample
              ``max(|g(z_i)| / max(atol, rtol |z_i|)) <= 1``: the worst element decides, not the
              mean. Per sample, so samples can leave the batch.
            - ``'batch_relative'``: one norm over the whole batch,
              ``||g(z)||_2 <= rtol ||g(z) + z||_2`` (DeepEquilibriumNetworks.jl's
              ``norm(fx) / (norm(fx + x) + eps) < reltol``); ``atol`` is not used, as there.
              The batch stops as one: no sample can leave it early, the best iterate is the
              batch's, and every sample's ``residual`` is the batch's. A batch whose image
              ``f(z*)`` is 0 cannot meet it.

            The residual of every rule is the left side over the right, so ``<= 1`` means met.
    """

    atol: float
    rtol: float
    max_steps: int
    budget: bool = False
    save_steps: Tuple[int, ...] = ()
    save_evenly: int = 0
    termination: str = "per_sample"

    def __post_init__(self):
        object.__setattr__(self, "atol", positive_float("atol", self.atol))
        object.__setattr__(self, "rtol", non_negative_float("rtol", self.rtol))
        object.__setattr__(self, "max_steps", positive_int("max_steps", self.max_steps))
        object.__setattr__(self, "budget", boolean("budget", self.budget))
        object.__setattr__(self, "save_steps", tuple(sorted({non_negative_int("save_steps", s) for s in self.save_steps})))
        object.__setattr__(self, "save_evenly", non_negative_int("save_evenly", self.save_evenly))
        one_of("termination", self.termination, TERMINATIONS)
        if self.termination == "batch_relative" and self.rtol == 0:
            raise ValueError("termination='batch_relative' needs rtol > 0: its test ||g(z)|| <= rtol ||f(z)|| has "
                             "no absolute part, so with rtol=0 only an exact root meets it")


class SavedState(NamedTuple):
    """An iterate kept during a solve: its accepted-step count, its time and the state (detached)."""

    step: int
    t: float
    z: Tensor


@dataclass
class SteadyStateSolution:
    """What one forward solve did. Built once, by the solve loop.

    Attributes:
        z_star: the steady state, shape ``(batch, *state)``: each sample's best iterate (lowest
            scaled residual).
        z0: the starting state the solver was given.
        residual: per-sample residual of the stop rule (``SolveOptions.termination``; by default
            ``rms(g(z*) / (atol + rtol |z*|))``), continuous and discrete solvers alike; ``<= 1``
            means converged. Shape ``(batch,)``; under ``'batch_relative'`` every entry is the batch's.
        t: the time reached (continuous solvers; ``0`` for discrete solvers, whose iterations
            do not advance time).
        iterations: solver steps taken, accepted and rejected (iterations for discrete solvers).
        nfe: vector-field evaluations of the forward pass: the initializer's (one for Skip
            Reg.'s ``f(0, x)``) and the solver's. The one extra evaluation at ``z*`` with
            gradients, made in training for the implicit backward, is not included.
        nfe_per_sample: evaluations after which each sample first met its tolerance
            (``nfe`` for samples that never did).
        steps_accepted, steps_rejected: adaptive steps (iterations count as accepted).
        result: a `Result`; ``reason`` is the same value (a ``str`` enum).
        message: what happened, with the remedy, for an unsuccessful result (``''`` otherwise).
        converged: every sample met the tolerance.
        states: the iterates kept for ``SolveOptions.save_steps`` / ``save_evenly``, as
            `SavedState` ``(step, t, z)`` (``z`` detached), in order; ``z*`` itself is not among them.
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
    iterations: int
    nfe: int
    nfe_per_sample: Tensor
    steps_accepted: int
    steps_rejected: int
    result: Result
    message: str = ""
    states: List["SavedState"] = field(default_factory=list)
    backward_iters: Optional[int] = None
    backward_residual: Optional[float] = None
    skip_loss: Optional[Tensor] = None
    jacobian_loss: Optional[Tensor] = None
    extra: dict = field(default_factory=dict)

    @property
    def reason(self) -> Result:
        return self.result

    @property
    def converged(self) -> bool:
        return self.result is Result.converged

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
