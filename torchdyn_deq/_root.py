"""Discrete DEQ solvers on the solve loop: find z with g(z) = 0, i.e. the fixed point
z = f(z) = z + g(z). Each iteration evaluates g once and is always accepted; the loop owns the
stop test, best iterate, stall and divergence tests. Iterations do not advance time (t = 0).
Memory is kept on the flattened per-sample state ``(batch, n)``.
"""
from __future__ import annotations

from typing import NamedTuple, Tuple

import torch
from torch import Tensor

from ._checks import float_in, non_negative_float, positive_int
from ._loop import Proposal, State, SteadyStateSolver, _rows as _flat



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


def _put(buf: Tensor, dim: int, index: int, value: Tensor) -> Tensor:
    """``buf`` with ``value`` at ``index`` along ``dim``: written in place, or, while autograd
    records (backprop through the solver), into a new tensor: the graph of the earlier iterates
    saved ``buf``, and an in-place write would invalidate it."""
    if torch.is_grad_enabled():
        return buf.select_scatter(value, dim, index)
    buf.select(dim, index).copy_(value)
    return buf


class _AndersonMemory(NamedTuple):
    """Anderson's state, per sample (leading batch dimension, restricted with the batch): ring
    buffers of the last ``memory`` images ``F`` and residuals ``R = g`` (``(batch, memory, n)``;
    slot ``i % memory`` holds iterate ``i``), their Gram matrix ``gram = R R^T`` (``(batch, memory,
    memory)``, unscaled), the best residual norm ``best``, the number of iterates seen when it last
    fell by 1% or ``lam`` last rose (``mark``: ``count - mark`` iterations since), the
    regularization ``lam`` in use; and the number of iterates seen (``count``, one for the batch)."""

    F: Tensor
    R: Tensor
    gram: Tensor
    best: Tensor
    mark: Tensor
    lam: Tensor
    count: int


class AndersonAcceleration(RootSolver):
    """Anderson acceleration of ``z <- f(z)`` (type II, Walker & Ni 2011), batched per sample.

    Each iterate mixes the last ``memory`` images ``f(z_i)`` with weights ``alpha`` that
    minimise ``||sum alpha_i g(z_i)||^2 + lambda ||alpha||^2`` (the Gram matrix scaled to unit
    largest diagonal) subject to ``sum alpha_i = 1`` (a small least-squares solve per sample).

    Safeguard, per sample: where the residual norm has not fallen below 99% of its best for
    ``safeguard_patience`` iterations, the history no longer predicts the map (near-collinear
    residuals of a map that is not contractive, ``rho(df/dz) > 1``: the weights then amplify
    its curvature and rounding, and the iterates wander at a residual just above the
    tolerance) and ``lambda`` is raised tenfold, up to ``max_regularization``; each 1%
    improvement lowers it tenfold, back to ``regularization``. A Levenberg-Marquardt-like damping
    of the weights towards the average of the images: it stays AA where AA progresses. A
    restart of the history (from the best iterate) was tried instead: it is a plain
    fixed-point step, which such a map repels, and it stalled sooner.

    Args:
        memory: iterates kept. Default ``5``.
        mixing: ``beta``, weight of the images against the iterates. Default ``1.0``.
        regularization: ``lambda`` while the iteration progresses. Default ``1e-4``.
        safeguard_patience: iterations without a 1% improvement before ``lambda`` is raised.
            Default ``8``: more than a full history (5), so a history that was still renewing
            is not damped; on the zoo (``tests/zoo.py``) 5 and 6 damped the undamped rotation's
            solve into a stall, 8 left it at 11 NFE.
        max_regularization: the largest ``lambda``. Default ``1e-2``: the MDEQ GroupNorm layer
            (``rho(df/dz)`` 1.4-1.8) converges in 113-122 NFE under 1e-6 perturbations of its
            input (it stalled or converged by chance at 1e-4), while the linear zoo keeps its NFE.
    """

    def __init__(self, memory: int = 5, mixing: float = 1.0, regularization: float = 1e-4,
                 safeguard_patience: int = 8, max_regularization: float = 1e-2, **loop_options):
        super().__init__(**loop_options)
        self.memory = positive_int("memory", memory)
        self.mixing = float_in("mixing", mixing, 0.0, 1.0)
        self.regularization = non_negative_float("regularization", regularization)
        self.safeguard_patience = positive_int("safeguard_patience", safeguard_patience)
        self.max_regularization = float_in("max_regularization", max_regularization, self.regularization, 1.0,
                                           low_open=False)

    def init(self, g, z0, gz0, options):
        x = _flat(z0)
        batch, n = x.shape
        # residuals and their products in float32 at least: the Gram matrix of half-precision
        # residuals overflows, and the LU below has no half-precision kernel on the CPU (it is tiny)
        work = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
        # zeros, not empty: a new residual's Gram row is taken against every slot, filled or not
        empty = _AndersonMemory(
            x.new_zeros(batch, self.memory, n), x.new_zeros(batch, self.memory, n, dtype=work),
            x.new_zeros(batch, self.memory, self.memory, dtype=work), None,
            torch.ones(batch, dtype=torch.long, device=x.device),  # z0, the first iterate seen, is the best yet
            torch.full((batch,), self.regularization, dtype=work, device=x.device), 0)
        memory, residual = self._remember(empty, z0, gz0)
        return State(z0, gz0, 0.0, memory._replace(best=residual))

    @staticmethod
    def _remember(m: _AndersonMemory, z: Tensor, gz: Tensor) -> Tuple[_AndersonMemory, Tensor]:
        """``m`` with iterate ``z`` in the next slot (image ``z + g(z)``, residual ``g(z)``) and its
        row and column of the Gram matrix (``memory`` products, not the whole matrix's
        ``memory^2``); and the residual's norm."""
        slot = m.count % m.F.shape[1]
        r = _flat(gz).to(m.R.dtype)
        F = _put(m.F, 1, slot, _flat(z) + _flat(gz))
        R = _put(m.R, 1, slot, r)
        # r^T R^T, (1, n) x (n, memory) per sample: on the CPU 2-9x faster than R r, (memory, n) x (n, 1)
        row = torch.bmm(r[:, None], R.mT)[:, 0]
        gram = _put(_put(m.gram, 1, slot, row), 2, slot, row)
        return m._replace(F=F, R=R, gram=gram, count=m.count + 1), r.norm(dim=1)

    def propose(self, g, state, options):
        m = state.memory
        used = min(m.count, self.memory)  # the slots filled: all once the history is full
        gram = m.gram[:, :used, :used]
        # minimise alpha^T (gram / scale + lam I) alpha subject to sum(alpha) = 1 (the Gram matrix
        # scaled to unit largest diagonal): alpha = A^-1 1 / (1^T A^-1 1) (the regularised matrix is
        # positive definite; the same as the bordered KKT system, smaller)
        scale = torch.diagonal(gram, dim1=1, dim2=2).amax(dim=1, keepdim=True).clamp_min(torch.finfo(gram.dtype).tiny)
        A = gram / scale[..., None]
        A.diagonal(dim1=1, dim2=2).add_(m.lam[:, None])
        # no error check (linalg.solve reads the factorisation's status on the host every iteration,
        # a synchronisation on CUDA): a singular A, possible only at regularization=0, gives
        # non-finite weights, which the loop reports as non-finite values
        w = torch.linalg.solve_ex(A, A.new_ones(A.shape[0], used, 1))[0]
        alpha = (w / w.sum(dim=1, keepdim=True)).mT  # (batch, 1, used)
        z = torch.bmm(alpha.to(m.F.dtype), m.F[:, :used])[:, 0]
        if self.mixing < 1:  # beta F + (1 - beta) X = F - (1 - beta) R, as R = F - X
            z = z - (1 - self.mixing) * torch.bmm(alpha, m.R[:, :used])[:, 0].to(z.dtype)
        z = z.view(state.z.shape)
        return Proposal(z, g(0.0, z), 0.0)

    def decide(self, g, state, proposal, signals, options):
        memory, residual = self._remember(state.memory, proposal.z, proposal.gz)
        count, mark, lam = memory.count, state.memory.mark, state.memory.lam
        better = residual < 0.99 * state.memory.best
        mark = mark.masked_fill(better, count)
        # lam leaves regularization by a rise only, which needs safeguard_patience iterations after
        # z0's: until then (a count on the host, no synchronisation) no sample is stuck and lam stays
        if count > self.safeguard_patience:
            stuck = mark <= count - self.safeguard_patience
            # tenfold up where stuck, down where better: within [regularization, max_regularization]
            lam = torch.where(stuck, lam * 10, torch.where(better, lam / 10, lam)).clamp_(
                self.regularization, self.max_regularization)
            mark.masked_fill_(stuck, count)
        memory = memory._replace(best=torch.minimum(residual, state.memory.best), mark=mark, lam=lam)
        return State(proposal.z, proposal.gz, 0.0, memory), True


class _BroydenMemory(NamedTuple):
    """Broyden's state, per sample: the inverse Jacobian estimate ``B = -I + U V^T`` as ``U`` and
    ``Vt`` (``(batch, rank, n)``), and the next quasi-Newton step ``-B g(z)`` (``(batch, n)``)."""

    U: Tensor
    Vt: Tensor
    step: Tensor


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
        return State(z0, gz0, 0.0, memory=_BroydenMemory(U, Vt, _flat(gz0)))

    def propose(self, g, state, options):
        z = state.z + state.memory.step.view(state.z.shape)
        return Proposal(z, g(0.0, z), 0.0)

    def decide(self, g, state, proposal, signals, options):
        U, Vt, step = state.memory.U, state.memory.Vt, state.memory.step
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
        memory = _BroydenMemory(U, Vt, -self._apply(U, Vt, _flat(proposal.gz)))
        return State(proposal.z, proposal.gz, 0.0, memory), True
