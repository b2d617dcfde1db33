"""Integrating dz/dt = g(z) from t = 0 until the state stops moving.

The stop condition, per sample ``i``:

    rms( g(z_i) / (atol + rtol * |z_i|) ) <= 1

(the Hairer root-mean-square norm that torchdyn and torchdiffeq use for step control,
taken per sample). The solve ends when every sample of the batch satisfies it.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor
from torchdyn.numerics.utils import adapt_step, init_step

from ._solution import NonFiniteError, SteadyStateSolution

VectorField = Callable[[Tensor, Tensor], Tensor]


def scaled_residual(dz: Tensor, z: Tensor, atol: float, rtol: float) -> Tensor:
    """Per-sample ``rms(dz / (atol + rtol |z|))``; shape ``(batch,)``."""
    scaled = (dz / (atol + rtol * z.abs())).reshape(dz.shape[0], -1)
    return scaled.pow(2).mean(dim=1).sqrt()


class _Counter:
    """Counts vector-field evaluations of one solve."""

    def __init__(self, f: VectorField):
        self.f, self.n = f, 0

    def __call__(self, t, z, args=None):
        self.n += 1
        return self.f(t, z)


class _Progress:
    """Per-sample bookkeeping shared by the continuous and discrete solvers."""

    def __init__(self, batch: int, device):
        self.nfe_per_sample = torch.zeros(batch, dtype=torch.long, device=device)
        self.done = torch.zeros(batch, dtype=torch.bool, device=device)

    def update(self, residual: Tensor, nfe: int, where: str) -> bool:
        if not bool(torch.isfinite(residual).all()):
            raise NonFiniteError(
                f"non-finite values appeared {where}: the vector field produced NaN/inf, or the "
                "dynamics diverge (no steady state). Check the input, lower the learning rate, or add "
                "Jacobian regularization"
            )
        newly = (residual <= 1) & ~self.done
        self.nfe_per_sample[newly] = nfe
        self.done |= newly
        return bool(self.done.all())

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
    above the stop tolerance.

    Args:
        stepper: a torchdyn ODE stepper instance (``str_to_solver('tsit5')``).
        step_tol_factor: ratio of step-control to stop tolerance. Default ``0.1``.
        max_step: largest time step. Default ``2.0``: inside tsit5's and dopri5's
            stability region for eigenvalues near -1, where a DEQ's ``g = f - z`` has them.
        step_size: step of fixed-step steppers. Default ``1.0`` (explicit Euler with
            step 1 on ``g = f - z`` is the fixed-point iteration ``z <- f(z)``).
    """

    def __init__(self, stepper, step_tol_factor: float = 0.1, max_step: float = 2.0, step_size: float = 1.0):
        for name, value in (("step_tol_factor", step_tol_factor), ("max_step", max_step), ("step_size", step_size)):
            if not isinstance(value, (int, float)) or not value > 0 or value == float("inf"):
                raise ValueError(f"{name} must be a positive finite number, got {value!r}")
        self.stepper = stepper
        self.step_tol_factor, self.max_step, self.step_size = float(step_tol_factor), float(max_step), float(step_size)

    @property
    def adaptive(self) -> bool:
        return getattr(self.stepper, "stepping_class", "fixed") == "adaptive"

    def solve(self, f, z0, atol, rtol, max_steps):
        f = _Counter(f)
        t = torch.zeros((), dtype=z0.dtype, device=z0.device)
        z, _ = self.stepper.sync_device_dtype(z0, t)
        progress = _Progress(z0.shape[0], z0.device)
        k1 = f(t, z)
        residual = scaled_residual(k1, z, atol, rtol)
        accepted = rejected = 0
        if progress.update(residual, f.n, "in the vector field at the starting state"):
            return progress.finish(z, z0, residual, t, f.n, 0, 0, "converged")
        satol, srtol = atol * self.step_tol_factor, rtol * self.step_tol_factor
        if self.adaptive:
            dt = init_step(f, k1, z, t, self.stepper.order, satol, srtol)
            dt = torch.clamp(dt, max=self.max_step)
        else:
            dt = torch.tensor(self.step_size, dtype=z.dtype, device=z.device)
        max_step = torch.tensor(self.max_step, dtype=z.dtype, device=z.device)
        reason = "max_steps"
        while accepted + rejected < max_steps:
            out = self.stepper.step(f, z, t, dt, k1=k1)
            k_new, z_new, err = out[0], out[1], out[2]
            if self.adaptive:
                ratio = (err / (satol + srtol * torch.max(z.abs(), z_new.abs()))).pow(2).mean().sqrt()
                if not bool(torch.isfinite(ratio)):
                    progress.update(ratio[None], f.n, f"during step {accepted + rejected} at t={float(t):.4g}")
                next_dt = torch.minimum(adapt_step(dt, ratio, self.stepper.safety, self.stepper.min_factor,
                                                   self.stepper.max_factor, self.stepper.order), max_step)
                if not bool(ratio <= 1):
                    rejected += 1
                    dt = next_dt
                    continue
            else:
                next_dt = dt
                k_new = f(t + dt, z_new)
            t, z, k1, dt = t + dt, z_new, k_new, next_dt
            accepted += 1
            residual = scaled_residual(k1, z, atol, rtol)
            if progress.update(residual, f.n, f"at step {accepted + rejected}, t={float(t):.4g}"):
                reason = "converged"
                break
        return progress.finish(z, z0, residual, t, f.n, accepted, rejected, reason)
