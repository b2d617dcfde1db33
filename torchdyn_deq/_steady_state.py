"""Integrating dz/dt = g(z) from t = 0 until the state stops moving.

The stop condition, per sample ``i``:

    rms( g(z_i) / (atol + rtol * |z_i|) ) <= 1

(the Hairer root-mean-square norm that torchdyn and torchdiffeq use for step control,
taken per sample). The solve ends when every sample of the batch satisfies it.
"""
from __future__ import annotations

import math

from typing import Callable, Union

import torch
import torch.nn as nn
from torch import Tensor
from torchdyn.numerics.solvers.ode import SOLVER_DICT, str_to_solver

from ._fused_rk import fused
from ._solution import NonFiniteError, SteadyStateSolution

VectorField = Callable[[Tensor, Tensor], Tensor]
MIN_CAP_FRACTION = 2.0 ** -10  # the step-cap guard never caps the step below max_step / 1024


def _wide(x: Tensor) -> Tensor:
    """``x`` detached, in at least float32: norms of half-precision tensors overflow."""
    x = x.detach()
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def rms(x: Tensor) -> float:
    """Root mean square of a whole tensor, as a Python float (one synchronisation)."""
    return float(torch.linalg.vector_norm(_wide(x)) / max(x.numel(), 1) ** 0.5)


def scaled_residual(dz: Tensor, z: Tensor, atol: float, rtol: float) -> Tensor:
    """Per-sample ``rms(dz / (atol + rtol |z|))``; shape ``(batch,)``, at least float32."""
    scaled = (_wide(dz) / (atol + rtol * _wide(z).abs())).reshape(dz.shape[0], -1)
    return torch.linalg.vector_norm(scaled, dim=1) / scaled.shape[1] ** 0.5


def first_step_guess(k1: Tensor, z: Tensor, atol: float, rtol: float, order: int, max_step: float) -> float:
    """``min(max_step, (0.01 / rms(k1 / (atol + rtol |z|)))^(1/(order+1)))``."""
    d1 = max(rms(_wide(k1) / (atol + rtol * _wide(z).abs())), 1e-15)
    return min(max_step, (0.01 / d1) ** (1.0 / (order + 1)))


class _Counter:
    """Counts vector-field evaluations of one solve."""

    def __init__(self, f: VectorField):
        self.f, self.n = f, 0

    def __call__(self, t, z, args=None):
        self.n += 1
        return self.f(t, z)


class _Progress:
    """Per-sample bookkeeping shared by the continuous and discrete solvers."""

    def __init__(self, batch: int, device, min_cap: float = 0.0):
        self.nfe_per_sample = torch.zeros(batch, dtype=torch.long, device=device)
        self.done = torch.zeros(batch, dtype=torch.bool, device=device)
        self.worst = self.best = math.inf
        self.stale, self.stale_dt, self.min_cap = 0, 0.0, min_cap

    def step_cap(self, cap: float, dt: float) -> float:
        """After three accepted steps without a new lowest worst residual, cap the step at half
        the largest of them (never below ``min_cap``): the steps have left the solver's
        stability region and the residual hovers, at ``max_step`` or, for a stiff field whose
        step tolerance is floored at ``min_step_tol``, below it (near a steady state the error
        estimate, proportional to the residual, is too small to notice). A single growing step
        is not the sign: around a stable focus a stable step's residual can grow. After a cut
        the lowest residual restarts from the current one: the unstable steps raised it, and a
        stable but slowly decaying solve needs more than three steps to fall below the old low
        (requiring that collapsed the cap until it underflowed)."""
        if self.worst < self.best:
            self.best, self.stale, self.stale_dt = self.worst, 0, 0.0
        elif cap > self.min_cap:
            self.stale += 1
            self.stale_dt = max(self.stale_dt, dt)
            if self.stale >= 3:
                largest = self.stale_dt
                self.stale, self.stale_dt, self.best = 0, 0.0, self.worst
                return max(min(cap, largest) * 0.5, self.min_cap)
        return cap

    def update(self, residual: Tensor, nfe: int, where: Union[str, Callable[[], str]]) -> bool:
        worst = float(residual.max())  # one synchronisation per step; NaN propagates
        self.worst = worst
        if not math.isfinite(worst):
            raise NonFiniteError(
                f"non-finite values appeared {where() if callable(where) else where}: the vector field produced NaN/inf, or the "
                "dynamics diverge (no steady state). Check the input, lower the learning rate, or add "
                "Jacobian regularization"
            )
        newly = (residual <= 1) & ~self.done
        self.nfe_per_sample = torch.where(newly, nfe, self.nfe_per_sample)
        self.done |= newly
        return worst <= 1

    def finish(self, z_star, z0, residual, t, nfe, accepted, rejected, reason) -> SteadyStateSolution:
        self.nfe_per_sample[~self.done] = nfe
        converged = bool(self.done.all()) if reason == "converged" else False
        return SteadyStateSolution(
            z_star=z_star, z0=z0, residual=residual, t=float(t), nfe=nfe,
            nfe_per_sample=self.nfe_per_sample, steps_accepted=accepted, steps_rejected=rejected,
            converged=converged, reason=reason,
        )


class SteadyStateSolver:
    """Base class of forward solvers: ``solve(f, z0, atol, rtol, max_steps) -> SteadyStateSolution``,
    with ``f(t, z)`` the vector field whose root / steady state is sought."""

    continuous: bool = True

    def solve(self, f: VectorField, z0: Tensor, atol: float, rtol: float, max_steps: int) -> SteadyStateSolution:
        raise NotImplementedError

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({opts})"


class ODESteadyStateSolver(SteadyStateSolver):
    """Time-stepping to steady state with a torchdyn stepper (tsit5, dopri5, euler, rk4, ...).

    Adaptive steppers control their local error with ``step_atol, step_rtol =
    step_tol_factor * (atol, rtol)`` and never step beyond ``max_step``. Both guard
    against the stall of a steady-state loop whose step tolerance equals its stop
    tolerance: near z* the error estimate shrinks with the residual, the step grows
    to the edge of the stepper's stability region and the residual then hovers just
    above the stop tolerance. A third guard: three accepted steps without a new lowest worst
    residual cap the step at half the largest of them (an eigenvalue of ``dg/dz`` outside the
    stability region otherwise stalled tsit5 at tight tolerances, at ``max_step`` or, for a
    stiff field, below it); for fixed-step steppers the cap is ``step_size``, so their step is
    halved the same way.

    Args:
        stepper: a torchdyn solver name (default ``'tsit5'``), built for each state dtype
            (torchdyn's tableaus are float32 unless asked otherwise, which caps float64
            accuracy at ~1e-8; tsit5 and dopri5 step through `FusedTableauStepper`, the same
            tableau in fewer tensor operations), or a torchdyn stepper instance, used as it is.
        step_tol_factor: ratio of step-control to stop tolerance. Default ``0.3`` (measured on
            the paper's MNIST model: 7 steps; 1.0 with an unbounded step stalls for 500 steps).
        max_step: largest time step. Default ``2.0``: inside tsit5's and dopri5's
            stability region for eigenvalues near -1, where a DEQ's ``g = f - z`` has them.
        min_step_tol: floor of the step-control tolerances. Default ``1e-6``: only the end
            point matters, not the path, so a tight stop tolerance (``1e-12`` for a float64
            gradient check) need not force thousands of tiny steps; ``max_step`` keeps
            the steps stable.
        step_size: step of fixed-step steppers. Default ``1.0`` (explicit Euler with
            step 1 on ``g = f - z`` is the fixed-point iteration ``z <- f(z)``).
        per_sample: drop samples from the batch once they meet the tolerance, so they stop
            costing evaluations while the rest continue (the vector field is then called on
            the remaining rows, with the injected input restricted to them). Default
            ``False``: a vector field whose output for one sample depends on the others
            (batch norm in training mode) would change. Only for gradient-free solves (the
            implicit sensitivity, or inference); with ``sensitivity='autograd'`` the whole
            batch is stepped.
    """

    def __init__(self, stepper: Union[str, nn.Module] = "tsit5", step_tol_factor: float = 0.3, max_step: float = 2.0,
                 min_step_tol: float = 1e-6, step_size: float = 1.0, per_sample: bool = False):
        for name, value in (("step_tol_factor", step_tol_factor), ("max_step", max_step), ("step_size", step_size),
                            ("min_step_tol", min_step_tol)):
            if not isinstance(value, (int, float)) or not value > 0 or value == float("inf"):
                raise ValueError(f"{name} must be a positive finite number, got {value!r}")
        if isinstance(stepper, str):
            if stepper not in SOLVER_DICT:
                raise ValueError(f"unknown torchdyn solver {stepper!r}; valid: {sorted(SOLVER_DICT)}")
            stepper_of = {}
        elif isinstance(stepper, nn.Module) and hasattr(stepper, "step"):
            stepper_of = None
        else:
            raise TypeError(f"stepper must be a torchdyn solver name or stepper instance, got {stepper!r}")
        self.stepper, self._stepper_of = stepper, stepper_of
        self.step_tol_factor, self.max_step, self.step_size = float(step_tol_factor), float(max_step), float(step_size)
        self.min_step_tol, self.per_sample = float(min_step_tol), bool(per_sample)

    def _stepper(self, dtype: torch.dtype) -> nn.Module:
        if self._stepper_of is None:
            return self.stepper
        if dtype not in self._stepper_of:
            self._stepper_of[dtype] = fused(str_to_solver(self.stepper, dtype))
        return self._stepper_of[dtype]

    @staticmethod
    def _step_factor(ratio: float, safety: float, min_factor: float, max_factor: float, order: int) -> float:
        """torchdyn's ``adapt_step`` rule, on Python floats: ``safety * ratio^(-1/order)``
        clipped to ``[min_factor, max_factor]``, never shrinking an accepted step. Floats
        instead of tensors: its two tensor comparisons were two host synchronisations per step."""
        if ratio == 0:
            return max_factor
        lower = 1.0 if ratio < 1 else min_factor
        return min(max_factor, max(safety * ratio ** (-1.0 / order), lower))

    def solve(self, f, z0, atol, rtol, max_steps):
        restrict = getattr(f, "on_rows", None) if self.per_sample and not z0.requires_grad else None
        f = _Counter(f)
        stepper = self._stepper(z0.dtype)
        adaptive = getattr(stepper, "stepping_class", "fixed") == "adaptive"
        t = torch.zeros((), dtype=z0.dtype, device=z0.device)
        z, _ = stepper.sync_device_dtype(z0, t)
        cap = self.max_step if adaptive else self.step_size
        progress = _Progress(z0.shape[0], z0.device, min_cap=cap * MIN_CAP_FRACTION)
        k1 = f(t, z)
        residual = scaled_residual(k1, z, atol, rtol)
        accepted = rejected = 0
        if progress.update(residual, f.n, "in the vector field at the starting state"):
            return progress.finish(z, z0, residual, t, f.n, 0, 0, "converged")
        satol = max(atol * self.step_tol_factor, self.min_step_tol)
        srtol = max(rtol * self.step_tol_factor, self.min_step_tol)
        # Hairer's guess without its ||z0|| bound: zero for the DEQ start z0 = 0, where it forced
        # a first step of 1e-4 and five wasted steps of growth
        dt = first_step_guess(k1, z, satol, srtol, stepper.order, self.max_step) if adaptive else self.step_size
        if adaptive:  # read once: each tensor-to-float conversion is a synchronisation
            control = tuple(float(getattr(stepper, k)) for k in ("safety", "min_factor", "max_factor")) + (stepper.order,)
        rows, z_out, res_out = None, z, residual  # rows: the samples still stepped (None: all)
        reason = "max_steps"
        while accepted + rejected < max_steps:
            out = stepper.step(f, z, t, dt, k1=k1)
            k_new, z_new, err = out[0], out[1], out[2]
            if adaptive:
                ratio = rms(_wide(err) / (satol + srtol * torch.max(_wide(z).abs(), _wide(z_new).abs())))
                if not math.isfinite(ratio):
                    progress.update(torch.tensor([ratio]), f.n, lambda: f"during step {accepted + rejected} at t={float(t):.4g}")
                next_dt = min(dt * self._step_factor(ratio, *control), cap)
                if ratio > 1:
                    rejected += 1
                    dt = next_dt
                    continue
            else:
                next_dt = dt
                k_new = f(t + dt, z_new)
            t, z, k1, taken, dt = t + dt, z_new, k_new, dt, next_dt
            accepted += 1
            residual = scaled_residual(k1, z, atol, rtol)
            if rows is None:
                z_out, res_out = z, residual
            else:  # write the active samples back into the full batch
                z_out, res_out = z_out.index_copy(0, rows, z), res_out.index_copy(0, rows, residual)
            if progress.update(res_out, f.n, lambda: f"at step {accepted + rejected}, t={float(t):.4g}"):
                reason = "converged"
                break
            cap = progress.step_cap(cap, taken)
            dt = min(dt, cap)
            if restrict is not None and bool((residual <= 1).any()):
                keep = (residual > 1).nonzero()[:, 0]
                rows = keep if rows is None else rows[keep]
                z, k1 = z[keep], k1[keep]
                f.f = restrict(rows)
        return progress.finish(z_out, z0, res_out, t, f.n, accepted, rejected, reason)
