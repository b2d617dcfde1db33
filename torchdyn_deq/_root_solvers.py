"""Discrete DEQ solvers: find z with g(z) = 0, i.e. the fixed point z = f(z) = z + g(z).

All work on the flattened per-sample state ``(batch, n)``, judge convergence per sample
with the same scaled residual as the continuous solver, keep each sample's best iterate,
and stop early when the residual stagnates or blows up.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ._steady_state import SteadyStateSolver, _Counter, _Progress, scaled_residual


class RootSolver(SteadyStateSolver):
    """Base class of the discrete solvers.

    Args:
        stall_patience: stop (``reason='stalled'``) after this many iterations without a
            1% improvement of any unconverged sample's best residual. Default ``30``.
        divergence_factor: stop (``reason='diverged'``) when every unconverged sample's
            residual exceeds its best by this factor, or when any sample's iterate grows
            beyond this factor times ``1 + ||z0|| + ||f(z0)||`` (a secant update fed by
            round-off can throw the iterate to where ``z + c - z == 0`` in floating point).
            Default ``1e4``.
    """

    continuous = False

    def __init__(self, stall_patience: int = 30, divergence_factor: float = 1e4):
        if not isinstance(stall_patience, int) or stall_patience < 1:
            raise ValueError(f"stall_patience must be a positive integer, got {stall_patience!r}")
        if not divergence_factor > 1:
            raise ValueError(f"divergence_factor must be > 1, got {divergence_factor!r}")
        self.stall_patience, self.divergence_factor = stall_patience, float(divergence_factor)

    def solve(self, f, z0, atol, rtol, max_steps):
        g = _Counter(f)
        t0 = torch.zeros((), dtype=z0.dtype, device=z0.device)
        shape, batch = z0.shape, z0.shape[0]

        def g_flat(z: Tensor) -> Tensor:
            return g(t0, z.view(shape)).reshape(batch, -1)

        def residual_of(z: Tensor, gz: Tensor) -> Tensor:
            return scaled_residual(gz, z, atol, rtol)

        z = z0.reshape(batch, -1)
        gz = g_flat(z)
        progress = _Progress(batch, z0.device)
        res = residual_of(z, gz)
        best_z, best_res = z, res
        bound = self.divergence_factor * (1 + torch.linalg.vector_norm(z, dim=1) + torch.linalg.vector_norm(z + gz, dim=1))
        iters, stall, reason = 0, 0, "max_steps"
        if progress.update(res, g.n, "at the starting state"):
            reason = "converged"
        else:
            for z, gz in self.iterate(g_flat, z, gz, max_steps):
                iters += 1
                if bool((torch.linalg.vector_norm(z.detach(), dim=1) > bound).any()):
                    reason = "diverged"
                    break
                res = residual_of(z, gz)
                progress.update(res, g.n, f"at iteration {iters}")
                better = res < best_res
                improved = bool((res < 0.99 * best_res)[~progress.done].any())
                best_z = torch.where(better[:, None], z, best_z)
                best_res = torch.where(better, res, best_res)
                if bool(progress.done.all()):
                    reason = "converged"
                    break
                stall = 0 if improved else stall + 1
                open_ = ~progress.done
                if bool((res[open_] > self.divergence_factor * best_res[open_]).all()):
                    reason = "diverged"
                    break
                if stall >= self.stall_patience:
                    reason = "stalled"
                    break
        return progress.finish(best_z.view(shape), z0, best_res, iters, g.n, iters, 0, reason)

    def iterate(self, g, z, gz, max_steps):
        """Yield ``(z_k, g(z_k))`` for k = 1, ..., max_steps."""
        raise NotImplementedError


class FixedPointIteration(RootSolver):
    """Damped fixed-point iteration ``z <- z + damping * g(z) = (1 - damping) z + damping f(z)``.

    Args:
        damping: step (1.0 is plain iteration ``z <- f(z)``). Default ``1.0``.
    """

    def __init__(self, damping: float = 1.0, **guards):
        super().__init__(**guards)
        if not 0 < damping <= 1:
            raise ValueError(f"damping must be in (0, 1], got {damping!r}")
        self.damping = float(damping)

    def iterate(self, g, z, gz, max_steps):
        for _ in range(max_steps):
            z = z + self.damping * gz
            gz = g(z)
            yield z, gz


class AndersonAcceleration(RootSolver):
    """Anderson acceleration of ``z <- f(z)`` (type II, Walker & Ni 2011), batched per sample.

    Each iterate mixes the last ``memory`` images ``f(z_i)`` with weights ``alpha`` that
    minimise ``||sum alpha_i g(z_i)||`` subject to ``sum alpha_i = 1`` (a small regularised
    least-squares solve per sample).

    Args:
        memory: iterates kept. Default ``5``.
        mixing: ``beta``, weight of the images against the iterates. Default ``1.0``.
        regularization: ``lambda`` added to the normal equations. Default ``1e-4``.
    """

    def __init__(self, memory: int = 5, mixing: float = 1.0, regularization: float = 1e-4, **guards):
        super().__init__(**guards)
        if not isinstance(memory, int) or memory < 1:
            raise ValueError(f"memory must be a positive integer, got {memory!r}")
        if not 0 < mixing <= 1:
            raise ValueError(f"mixing must be in (0, 1], got {mixing!r}")
        self.memory, self.mixing, self.regularization = memory, float(mixing), float(regularization)

    def iterate(self, g, z, gz, max_steps):
        # lists, not preallocated buffers: in-place writes would break backprop through the solver
        X, F = [z], [z + gz]
        for _ in range(max_steps):
            Xs, Fs = torch.stack(X, dim=1), torch.stack(F, dim=1)
            G = Fs - Xs
            used = G.shape[1]
            gram = torch.bmm(G, G.transpose(1, 2))
            scale = torch.diagonal(gram, dim1=1, dim2=2).amax(dim=1).clamp_min(torch.finfo(z.dtype).tiny)
            gram = gram / scale[:, None, None] + self.regularization * torch.eye(used, dtype=z.dtype, device=z.device)
            # minimise alpha^T gram alpha subject to sum(alpha) = 1: the bordered (KKT) system
            ones = torch.ones(z.shape[0], used, 1, dtype=z.dtype, device=z.device)
            top = torch.cat([torch.zeros_like(ones[:, :1]), ones.transpose(1, 2)], dim=2)
            kkt = torch.cat([top, torch.cat([ones, gram], dim=2)], dim=1)
            rhs = torch.zeros(z.shape[0], used + 1, 1, dtype=z.dtype, device=z.device)
            rhs[:, 0] = 1
            # in float32 at least: no half-precision LU on the CPU, and it is tiny
            work = torch.float32 if z.dtype in (torch.float16, torch.bfloat16) else z.dtype  # keeps the graph
            alpha = torch.linalg.solve(kkt.to(work), rhs.to(work))[:, 1:, 0].to(z.dtype)
            z = self.mixing * torch.bmm(alpha[:, None], Fs)[:, 0]
            if self.mixing < 1:
                z = z + (1 - self.mixing) * torch.bmm(alpha[:, None], Xs)[:, 0]
            gz = g(z)
            X, F = (X + [z])[-self.memory:], (F + [z + gz])[-self.memory:]
            yield z, gz


class BroydenSolver(RootSolver):
    """Limited-memory ("good") Broyden's method on ``g(z) = 0``, batched per sample.

    Keeps the inverse Jacobian estimate ``B = -I + U V^T`` of rank at most ``memory``
    (no dense matrix, unlike torchdyn's Broyden) and updates it with Sherman-Morrison;
    when memory is full the estimate restarts from ``-I`` (dropping only the oldest pair
    diverged on a rotation-like linear contraction in our tests).

    Args:
        memory: rank of the low-rank correction. Default ``20``.
    """

    def __init__(self, memory: int = 20, **guards):
        super().__init__(**guards)
        if not isinstance(memory, int) or memory < 1:
            raise ValueError(f"memory must be a positive integer, got {memory!r}")
        self.memory = memory

    def iterate(self, g, z, gz, max_steps):
        batch, n = z.shape
        U = z.new_zeros(batch, 0, n)
        Vt = z.new_zeros(batch, 0, n)
        tiny = torch.finfo(z.dtype).tiny

        def apply_B(x):  # B x = -x + U (V^T x)
            return -x + torch.bmm(torch.bmm(Vt, x[:, :, None]).transpose(1, 2), U)[:, 0]

        def apply_Bt(x):  # x^T B = -x^T + (x^T U) V^T
            return -x + torch.bmm(torch.bmm(U, x[:, :, None]).transpose(1, 2), Vt)[:, 0]

        step = -apply_B(gz)
        for _ in range(max_steps):
            z_new = z + step
            g_new = g(z_new)
            dg = g_new - gz
            vt = apply_Bt(step)
            denom = (vt * dg).sum(dim=1, keepdim=True)
            ok = denom.abs() > 1e3 * tiny
            u = torch.where(ok, (step - apply_B(dg)) / torch.where(ok, denom, 1.0), 0.0)
            if U.shape[1] == self.memory:  # restart: dropping only the oldest pair can diverge
                U, Vt = U[:, :0], Vt[:, :0]
            U = torch.cat([U, u[:, None]], dim=1)
            Vt = torch.cat([Vt, vt[:, None]], dim=1)
            z, gz = z_new, g_new
            step = -apply_B(gz)
            yield z, gz
