"""Discrete DEQ solvers on the solve loop: find z with g(z) = 0, i.e. the fixed point
z = f(z) = z + g(z). Each iteration evaluates g once and is always accepted; the loop owns the
stop test, best iterate, stall and divergence tests. Iterations do not advance time (t = 0).
Memory is kept on the flattened per-sample state ``(batch, n)``.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ._checks import float_in, non_negative_float, positive_int
from ._loop import Proposal, State, SteadyStateSolver


def _flat(x: Tensor) -> Tensor:
    return x.reshape(x.shape[0], -1)


class RootSolver(SteadyStateSolver):
    """Base class of the discrete solvers (``continuous = False``); the loop's options
    (``stall_patience``, ``divergence_factor``, ``per_sample``) as in `SteadyStateSolver`."""

    continuous = False


class FixedPointIteration(RootSolver):
    """Damped fixed-point iteration ``z <- z + damping * g(z) = (1 - damping) z + damping f(z)``.

    Args:
        damping: step (1.0 is plain iteration ``z <- f(z)``). Default ``1.0``.
    """

    def __init__(self, damping: float = 1.0, **loop_options):
        super().__init__(**loop_options)
        self.damping = float_in("damping", damping, 0.0, 1.0)

    def propose(self, g, state, options):
        z = state.z + self.damping * state.gz
        return Proposal(z, g(0.0, z), 0.0)


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

    def __init__(self, memory: int = 5, mixing: float = 1.0, regularization: float = 1e-4, **loop_options):
        super().__init__(**loop_options)
        self.memory = positive_int("memory", memory)
        self.mixing = float_in("mixing", mixing, 0.0, 1.0)
        self.regularization = non_negative_float("regularization", regularization)

    def init(self, g, z0, gz0, options):
        return State(z0, gz0, 0.0, memory=([_flat(z0)], [_flat(z0 + gz0)]))

    def propose(self, g, state, options):
        X, F = state.memory
        Xs, Fs = torch.stack(X, dim=1), torch.stack(F, dim=1)
        batch, used = Xs.shape[0], Xs.shape[1]
        dtype, device = Xs.dtype, Xs.device
        # in float32 at least: the Gram matrix of half-precision residuals overflows, and the LU
        # below has no half-precision kernel on the CPU (it is tiny)
        work = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
        G = (Fs - Xs).to(work)
        gram = torch.bmm(G, G.transpose(1, 2))
        scale = torch.diagonal(gram, dim1=1, dim2=2).amax(dim=1).clamp_min(torch.finfo(work).tiny)
        gram = gram / scale[:, None, None] + self.regularization * torch.eye(used, dtype=work, device=device)
        # minimise alpha^T gram alpha subject to sum(alpha) = 1: alpha = gram^-1 1 / (1^T gram^-1 1)
        # (the regularised gram is positive definite; the same as the bordered KKT system, smaller)
        w = torch.linalg.solve(gram, torch.ones(batch, used, 1, dtype=work, device=device))[..., 0]
        alpha = (w / w.sum(dim=1, keepdim=True)).to(dtype)
        z = self.mixing * torch.bmm(alpha[:, None], Fs)[:, 0]
        if self.mixing < 1:
            z = z + (1 - self.mixing) * torch.bmm(alpha[:, None], Xs)[:, 0]
        z = z.view(state.z.shape)
        return Proposal(z, g(0.0, z), 0.0)

    def decide(self, g, state, proposal, signals, options):
        X, F = state.memory
        # lists, not preallocated buffers: in-place writes would break backprop through the solver
        memory = ((X + [_flat(proposal.z)])[-self.memory:], (F + [_flat(proposal.z + proposal.gz)])[-self.memory:])
        return State(proposal.z, proposal.gz, 0.0, memory), True


class BroydenSolver(RootSolver):
    """Limited-memory ("good") Broyden's method on ``g(z) = 0``, batched per sample.

    Keeps the inverse Jacobian estimate ``B = -I + U V^T`` of rank at most ``memory``
    (no dense matrix, unlike torchdyn's Broyden) and updates it with Sherman-Morrison (the
    "bad" Broyden update for a sample whose good-update denominator ``s^T B y`` vanishes);
    when memory is full the estimate restarts from ``-I`` (dropping only the oldest pair
    diverged on a rotation-like linear contraction in our tests).

    Args:
        memory: rank of the low-rank correction. Default ``20``.
    """

    def __init__(self, memory: int = 20, **loop_options):
        super().__init__(**loop_options)
        self.memory = positive_int("memory", memory)

    @staticmethod
    def _apply(U: Tensor, Vt: Tensor, x: Tensor) -> Tensor:
        """``B x = -x + U (V^T x)``."""
        return -x + torch.bmm(torch.bmm(Vt, x[:, :, None]).transpose(1, 2), U)[:, 0]

    @staticmethod
    def _apply_t(U: Tensor, Vt: Tensor, x: Tensor) -> Tensor:
        """``x^T B = -x^T + (x^T U) V^T``."""
        return -x + torch.bmm(torch.bmm(U, x[:, :, None]).transpose(1, 2), Vt)[:, 0]

    def init(self, g, z0, gz0, options):
        batch, n = _flat(z0).shape
        U, Vt = z0.new_zeros(batch, 0, n), z0.new_zeros(batch, 0, n)
        return State(z0, gz0, 0.0, memory=(U, Vt, _flat(gz0)))

    def propose(self, g, state, options):
        step = state.memory[2]  # -B g(z), the quasi-Newton step
        z = state.z + step.view(state.z.shape)
        return Proposal(z, g(0.0, z), 0.0)

    def decide(self, g, state, proposal, signals, options):
        U, Vt, step = state.memory
        dg = _flat(proposal.gz) - _flat(state.gz)
        # the "good" update B += (s - B y) s^T B / (s^T B y); where s^T B y vanishes (a rotation:
        # s^T R s = 0) the "bad" one B += (s - B y) y^T / (y^T y), defined whenever y != 0. The dot
        # products and norms in float32 at least: in half precision they overflow
        work = torch.float32 if dg.dtype in (torch.float16, torch.bfloat16) else dg.dtype
        vt_good = self._apply_t(U, Vt, step)
        vw, dw = vt_good.to(work), dg.to(work)
        denom_good = (vw * dw).sum(dim=1, keepdim=True)
        good = denom_good.abs() > 1e-3 * vw.norm(dim=1, keepdim=True) * dw.norm(dim=1, keepdim=True)
        vt = torch.where(good, vt_good, dg)
        denom = torch.where(good, denom_good, (dw * dw).sum(dim=1, keepdim=True))
        ok = denom.abs() > 1e3 * torch.finfo(work).tiny
        u = torch.where(ok, (step - self._apply(U, Vt, dg)).to(work) / torch.where(ok, denom, 1.0), 0.0).to(dg.dtype)
        if U.shape[1] == self.memory:  # restart: dropping only the oldest pair can diverge
            U, Vt = U[:, :0], Vt[:, :0]
        U, Vt = torch.cat([U, u[:, None]], dim=1), torch.cat([Vt, vt[:, None]], dim=1)
        memory = (U, Vt, -self._apply(U, Vt, _flat(proposal.gz)))
        return State(proposal.z, proposal.gz, 0.0, memory), True
