"""How gradients reach the parameters and the input through the steady state."""
from __future__ import annotations

import math
from typing import Callable, Optional, Tuple

import torch
from torch import Tensor

from ._checks import float_in, positive_int
from ._linear_solvers import GMRES, LinearSolver
from ._solution import BackwardRecord, NonFiniteError, Result, SolveOptions, check_failure_mode, report_failure


Cotangent = Optional[Callable[[Tensor], Tensor]]


class Sensitivity:
    """Base class. ``implicit`` sensitivities run the forward solve without autograd and
    define the backward pass at the steady state with ``attach``; the others backpropagate
    through the solve.

    ``attach(gz, z_leaf, field, options, record) -> (out, cotangent)`` receives
    ``gz = g(t*, z_leaf)`` computed with autograd, the detached steady state ``z_leaf``
    (requires grad), ``field(z) = g(t*, z)`` with gradients enabled (for sensitivities that
    evaluate it again, such as phantom gradients), the forward solve's `SolveOptions` and the
    `BackwardRecord` to fill in. It returns the tensor ``out`` whose graph carries the
    gradients and the map from the cotangent ``v`` of ``z*`` to the cotangent of ``out``
    (``None``: ``v`` itself). `implicit_solve` applies the one backward function with them.
    """

    implicit: bool = False

    def attach(self, gz: Tensor, z_leaf: Tensor, field: Callable[[Tensor], Tensor], options: SolveOptions,
               record: BackwardRecord) -> Tuple[Tensor, Cotangent]:
        raise NotImplementedError

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({opts})"


class AutogradSensitivity(Sensitivity):
    """Backpropagation through every solver step (``sensitivity='autograd'``).

    Exact gradients of the computed solution, memory growing with the number of steps.
    Useful as a reference for the implicit gradients; slower for training.
    """


def backward_tolerance(options: SolveOptions) -> float:
    """The default relative tolerance of the implicit backward linear solve: the forward's,
    ``max(atol, rtol)``, relative to each sample's cotangent (no absolute floor).

    The gradient is only as accurate as the steady state it is taken at, and that is set by the
    forward tolerance: a tighter backward solve costs iterations without making the gradient
    more accurate (measured on the MNIST model: ``benchmarks/results/backward_tolerance.md``).
    Relative per sample, the gradient's relative accuracy does not depend on the loss scale."""
    return max(options.atol, options.rtol)


class SteadyStateSensitivity(Sensitivity):
    """Implicit differentiation at the steady state (``sensitivity='steady_state'``).

    At a steady state ``g(z*, x, theta) = 0``; differentiating gives, for a cotangent ``v``
    of ``z*``,

        (dg/dz)^T w = -v,     grad_theta = w^T dg/dtheta,     grad_x = w^T dg/dx.

    For a DEQ, ``g = f - z`` and the system is ``(I - J_f^T) w = v`` (paper, section 2.2).
    It is solved matrix-free by ``linear_solver``, each iteration one vector-Jacobian product
    of ``g`` at ``z*``; the parameter and input gradients are then one more VJP. Memory
    does not depend on the number of forward steps: only one evaluation of ``g`` at ``z*``
    is kept for the backward pass.

    Args:
        linear_solver: a `LinearSolver`. Default ``None``: restarted ``GMRES`` (it converges
            on any non-singular system, which the Neumann series does not) at the forward
            solve's tolerance (`backward_tolerance`), the same default as
            ``sensitivity='steady_state'`` on every door.
        on_failure: ``'warn'`` (default) or ``'raise'`` when the linear solve does not reach
            its tolerance, or when the forward solve it differentiates did not converge.
    """

    implicit = True

    def __init__(self, linear_solver: Optional[LinearSolver] = None, on_failure: str = "warn"):
        if linear_solver is not None and not isinstance(linear_solver, LinearSolver):
            raise TypeError(f"linear_solver must be a LinearSolver (GMRES, FixedPointSolver, DirectSolver), got {linear_solver!r}")
        self.linear_solver = linear_solver
        self.on_failure = check_failure_mode(on_failure)
        self._derived = {}  # forward tolerance -> its GMRES, built once

    def solver_for(self, options: SolveOptions) -> LinearSolver:
        """The linear solver of a backward pass after a forward solve with ``options``."""
        if self.linear_solver is not None:
            return self.linear_solver
        tol = backward_tolerance(options)
        if tol not in self._derived:
            self._derived[tol] = GMRES(rtol=tol, atol=0.0)
        return self._derived[tol]

    def attach(self, gz: Tensor, z_leaf: Tensor, field: Callable[[Tensor], Tensor], options: SolveOptions,
               record: BackwardRecord) -> Tuple[Tensor, Cotangent]:
        """``(gz, v -> w)``: the cotangent of ``g(z*)`` is the solution ``w`` of the implicit system."""
        solver = self.solver_for(options)
        return gz, lambda v: self.solve_adjoint(gz, z_leaf, v, record, solver)

    def solve_adjoint(self, gz: Tensor, z_leaf: Tensor, v: Tensor, record: BackwardRecord,
                      linear_solver: Optional[LinearSolver] = None) -> Tensor:
        """Solve ``(dg/dz)^T w = -v`` at the steady state; returns ``w`` shaped like ``v``."""
        linear_solver = self.linear_solver if linear_solver is None else linear_solver
        if linear_solver is None:
            raise ValueError("solve_adjoint needs a linear solver: this sensitivity derives its own from the forward "
                             "solve's tolerance (solver_for(options))")
        batch, shape = v.shape[0], v.shape
        flat = v.dim() == 2  # no reshapes in the loop when none is needed: each call costs dispatch
        # half-precision states: the Krylov arithmetic in float32 (no half triangular solve on CPU)
        work = torch.float32 if v.dtype in (torch.float16, torch.bfloat16) else v.dtype
        cast = work != gz.dtype

        def matvec(u: Tensor) -> Tensor:  # -(dg/dz)^T u: I - J_f^T for a DEQ, as the Neumann series needs
            state = u if flat else u.view(shape)
            (vjp,) = torch.autograd.grad(gz, z_leaf, state.to(gz.dtype) if cast else state, retain_graph=True,
                                         allow_unused=True)
            if vjp is None:
                return torch.zeros_like(u)
            vjp = vjp if flat else vjp.reshape(batch, -1)
            return -(vjp.to(work) if cast else vjp)

        b = v.reshape(batch, -1).to(work)
        w, info = linear_solver.solve(matvec, b)
        record.iters, record.residual = info.iters, info.residual
        if info.result is Result.non_finite and info.iters == 0:
            raise NonFiniteError("the cotangent of the steady state contains NaN or inf: the loss or the layers after "
                                 "the DEQ produced it. " + Result.non_finite.remedy)
        cause = f"{record.cause}. Then: " if record.cause else ""  # the cause before the symptom
        if info.result is Result.non_finite:
            raise NonFiniteError(f"{cause}non-finite values appeared in the implicit backward linear solve "
                                 f"({linear_solver!r}, {info.iters} iterations): the vector-Jacobian products "
                                 "of g at z* are not finite. " + Result.non_finite.remedy)
        if not info.converged:
            report_failure(
                f"{cause}the implicit backward linear solve ({linear_solver!r}) stopped after {info.iters} "
                f"iterations ({info.result}) at relative residual {info.residual:.3g}: gradients are inaccurate. "
                + (Result.breakdown.remedy[0].upper() + Result.breakdown.remedy[1:] if info.result is Result.breakdown else
                   "Raise max_iters, loosen rtol, solve the forward pass more tightly, or add Jacobian regularization"),
                self.on_failure,
            )
        w = w.view(shape).to(v.dtype)
        if cast and not math.isfinite(float(w.abs().amax()) if w.numel() else 0.0):
            raise NonFiniteError(f"{cause}the implicit backward's solution ({info.iters} iterations, finite in "
                                 f"float32) overflows {v.dtype}: the cotangent of the steady state is too large "
                                 "for the state's dtype. Scale the loss down (a GradScaler with a lower scale) "
                                 "or keep the DEQ's state in float32")
        return w


class JacobianFreeSensitivity(Sensitivity):
    """Jacobian-free backpropagation (``sensitivity='jacobian_free'``): an *approximate*
    gradient that skips the implicit linear solve.

    The implicit gradient needs ``w = -(dg/dz)^{-T} v``; this takes ``w = v``, exact when
    ``dg/dz = -I`` (a DEQ whose ``f`` does not depend on ``z`` at ``z*``). For a DEQ,
    ``g = f - z``, the gradients become ``v^T df/dtheta`` and ``v^T df/dx`` at ``z*``: the
    gradient of one application of ``f`` to the detached steady state (Fung et al., 2022,
    "JFB: Jacobian-free backpropagation for implicit networks"; the ``jfb`` mode of the paper
    authors' DeepEquilibriumNetworks.jl). One VJP per backward pass instead of one per GMRES
    iteration; the error grows with ``||J_f||``, so training may need a contractive ``f``
    (Jacobian regularization, Skip Reg.). The forward value is ``z*`` unchanged.
    """

    implicit = True

    def attach(self, gz: Tensor, z_leaf: Tensor, field: Callable[[Tensor], Tensor], options: SolveOptions,
               record: BackwardRecord) -> Tuple[Tensor, Cotangent]:
        """The cotangent ``v`` goes into ``g(z*)`` as is (no linear solve: ``record.iters``
        stays ``None``)."""
        return gz, None


class PhantomSensitivity(Sensitivity):
    """Phantom gradients (``sensitivity='phantom'``): an *approximate* gradient from ``k``
    damped steps at the steady state, with autograd and no linear solve (Geng et al., 2021,
    "On training implicit models"; torchdeq's ``grad=k, tau=tau``).

    From ``z_0 = z*`` it takes ``k`` steps ``z_{i+1} = z_i + tau g(z_i)``, for a DEQ
    (``g = f - z``) ``z_{i+1} = (1 - tau) z_i + tau f(z_i, x)``, and backpropagates
    through them. With ``M = I + tau dg/dz`` the gradient is

        grad_theta = tau v^T (I + M + ... + M^{k-1}) dg/dtheta,

    the first ``k`` terms of ``tau v^T (I - M)^{-1} dg/dtheta = -v^T (dg/dz)^{-1} dg/dtheta``,
    the implicit gradient: the error shrinks like ``||M||^k`` where the damped map
    contracts. ``steps=1, damping=1`` is `JacobianFreeSensitivity`. The forward value is
    ``z*`` exactly (the steps only shape the backward pass), so the loss and the solution
    record do not depend on ``k``; the backward pass costs ``k`` VJPs through ``g`` and
    keeps ``k`` evaluations of ``g`` for it. ``record.backward_iters`` is set to ``k`` when the
    backward pass runs (``backward_residual`` stays ``None``: there is no linear solve).

    Args:
        steps: ``k >= 1``. Default ``5``: torchdeq's default ``grad=1`` with ``tau=1`` is
            Jacobian-free backpropagation (``sensitivity='jacobian_free'`` here); a few
            damped steps are the unrolled phantom gradient Geng et al. train with.
        damping: ``tau`` in ``(0, 1]``. Default ``0.5``: torchdeq recommends 0.5-0.7 for
            MDEQs (its default 1.0 is the undamped step); damping turns eigenvalues ``-1 < l``
            of ``J_f`` into ``1 - tau (1 - l)``, taming the oscillating directions.
    """

    implicit = True

    def __init__(self, steps: int = 5, damping: float = 0.5):
        self.steps = positive_int("steps", steps)
        self.damping = float_in("damping", damping, 0.0, 1.0)

    def attach(self, gz: Tensor, z_leaf: Tensor, field: Callable[[Tensor], Tensor], options: SolveOptions,
               record: BackwardRecord) -> Tuple[Tensor, Cotangent]:
        """The phantom steps from ``z*`` and the cotangent ``v`` into their end. The first step
        reuses ``gz = g(z*)``; the other ``k - 1`` evaluate ``field``."""
        z = z_leaf + self.damping * gz
        for _ in range(self.steps - 1):
            z = z + self.damping * field(z)
        steps = self.steps

        def count(v: Tensor) -> Tensor:  # the cost appears once a backward pass used it
            record.iters = steps
            return v
        return z, count
