"""VCAB3: variable-coefficient Adams-Bashforth of order 3, the paper's solver for CIFAR/ImageNet.

One vector-field evaluation per accepted step. The step ``z_{n+1} = z_n + sum_i w_i g_{n-i}``
integrates the polynomial through the last three evaluations exactly, whatever the spacing
of their times (the "variable coefficients"); the difference to the order-2 formula on
the last two evaluations estimates the local error. The estimate uses only past
evaluations, so a rejected step costs no evaluation.
"""
from __future__ import annotations

from typing import List, Sequence

import torch

from ._steady_state import (MIN_CAP_FRACTION, SteadyStateSolver, _Counter, _Progress, _wide, first_step_guess, rms,
                            scaled_residual)


def adams_bashforth_weights(nodes: Sequence[float], h: float) -> List[float]:
    """Weights ``w`` with ``int_0^h p(s) ds = sum_i w_i p(nodes[i])`` for every polynomial ``p``
    of degree ``< len(nodes)``; ``nodes`` are the past times relative to the current one
    (``0`` first, then negative), ``h`` the step. Integrates the Lagrange basis polynomials
    in plain Python floats (a tensor solve here would cost more than the evaluation saved)."""
    weights = []
    for i, si in enumerate(nodes):
        coeffs, denom = [1.0], 1.0  # prod_{j != i} (s - s_j), ascending powers of s
        for j, sj in enumerate(nodes):
            if j != i:
                coeffs = [(coeffs[k - 1] if k else 0.0) - sj * (coeffs[k] if k < len(coeffs) else 0.0)
                          for k in range(len(coeffs) + 1)]
                denom *= si - sj
        weights.append(sum(c * h ** (k + 1) / (k + 1) for k, c in enumerate(coeffs)) / denom)
    return weights


def _combine(base, weights, tensors):
    """``base + sum_i weights[i] * tensors[i]`` in fused adds."""
    out = base
    for w, x in zip(weights, tensors):
        out = torch.add(out, x, alpha=w)
    return out


class VCAB3(SteadyStateSolver):
    """Variable-step Adams-Bashforth 3 with error control, integrated to steady state.

    Starts with Euler and order 2 while the history fills. Step control on
    ``||z_AB3 - z_AB2||`` at ``step_tol_factor * (atol, rtol)`` (floored at ``min_step_tol``),
    steps bounded by ``max_step`` and grown by at most ``max_factor`` per step.

    Args:
        step_tol_factor: ratio of step-control to stop tolerance. Default ``0.3``.
        max_step: largest step. Default ``0.4``: AB3 is stable for ``h |lambda| < 6/11`` on
            the negative real axis, and a DEQ's ``g = f - z`` has eigenvalues near ``-1``
            (within ``rho(J_f)`` of it). A safeguard against the steady-state stall of
            explicit solvers (see `ODESteadyStateSolver`); in our tests AB3's own error
            control kept steps near 0.3 and the bound rarely binds.
        min_step_tol: floor of the step-control tolerances. Default ``1e-6``.
        max_factor: largest step growth per step. Default ``2.0``.
    """

    def __init__(self, step_tol_factor: float = 0.3, max_step: float = 0.4, min_step_tol: float = 1e-6,
                 max_factor: float = 2.0):
        for name, value in (("step_tol_factor", step_tol_factor), ("max_step", max_step),
                            ("min_step_tol", min_step_tol)):
            if not isinstance(value, (int, float)) or not 0 < value < float("inf"):
                raise ValueError(f"{name} must be a positive finite number, got {value!r}")
        if not max_factor > 1:
            raise ValueError(f"max_factor must be > 1, got {max_factor!r}")
        self.step_tol_factor, self.max_step = float(step_tol_factor), float(max_step)
        self.min_step_tol, self.max_factor = float(min_step_tol), float(max_factor)

    def solve(self, f, z0, atol, rtol, max_steps):
        f = _Counter(f)
        progress = _Progress(z0.shape[0], z0.device, min_cap=self.max_step * MIN_CAP_FRACTION)
        t, z = 0.0, z0
        k = f(torch.zeros((), dtype=z0.dtype, device=z0.device), z)
        residual = scaled_residual(k, z, atol, rtol)
        if progress.update(residual, f.n, "in the vector field at the starting state"):
            return progress.finish(z, z0, residual, t, f.n, 0, 0, "converged")
        satol = max(atol * self.step_tol_factor, self.min_step_tol)
        srtol = max(rtol * self.step_tol_factor, self.min_step_tol)
        dt = first_step_guess(k, z, satol, srtol, 1, self.max_step)
        times, evals = [t], [k]  # newest first
        cap = self.max_step
        accepted = rejected = 0
        reason = "max_steps"
        while accepted + rejected < max_steps:
            nodes = [s - t for s in times]
            w = adams_bashforth_weights(nodes, dt)
            z_new = _combine(z, w, evals)
            if len(evals) > 1:
                w_low = adams_bashforth_weights(nodes[:-1], dt) + [0.0]
                err = _combine(torch.zeros_like(z), [wi - wl for wi, wl in zip(w, w_low)], evals)
                ratio = rms(_wide(err) / (satol + srtol * torch.max(_wide(z).abs(), _wide(z_new).abs())))
                if ratio != ratio or ratio == float("inf"):
                    progress.update(torch.tensor([ratio]), f.n, f"during step {accepted + rejected} at t={t:.4g}")
                factor = min(self.max_factor, max(0.2, 0.9 * max(ratio, 1e-10) ** (-1.0 / len(evals))))
                if ratio > 1:
                    rejected += 1
                    dt *= factor
                    continue
            else:
                factor = 1.0  # Euler start: no estimate yet, keep the guessed step
            t += dt
            z = z_new
            k = f(torch.tensor(t, dtype=z0.dtype, device=z0.device), z)
            times, evals = ([t] + times)[:3], ([k] + evals)[:3]
            accepted += 1
            residual = scaled_residual(k, z, atol, rtol)
            if progress.update(residual, f.n, f"at step {accepted + rejected}, t={t:.4g}"):
                reason = "converged"
                break
            cap = progress.step_cap(cap, dt)
            dt = min(dt * factor, cap)
        return progress.finish(z, z0, residual, t, f.n, accepted, rejected, reason)
