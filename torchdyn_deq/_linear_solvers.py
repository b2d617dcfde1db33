"""Matrix-free linear solvers for the implicit backward pass.

Each solver solves ``A w = b`` for a batch of independent systems: ``b`` has shape
``(batch, n)`` and ``matvec(w)`` applies the block-diagonal operator ``A`` to every sample
at once (one vector-Jacobian product). Convergence is judged per sample:
``||b_i - A w_i|| <= max(atol, rtol * ||b_i||)``.

Every system is solved scaled: ``b_i`` is divided by ``s_i = max |b_i|`` first and the answer
multiplied back (``A`` is linear, so this is exact). A zero right-hand side then gives exactly
``w_i = 0``, a tiny one (a cross-entropy cotangent of 1e-28, whose square underflows in
float32) or a huge one a finite, correct answer, and with ``atol = 0`` (the default) the
relative accuracy of the solution does not depend on the scale of the loss.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor

from ._checks import non_negative_float, positive_int
from ._solution import Result

MatVec = Callable[[Tensor], Tensor]


@dataclass
class LinearSolveInfo:
    """Iterations (matvecs) used, worst relative residual ``||b - A w|| / ||b||`` reached, whether
    all samples converged, and the `Result` (``converged``, ``max_steps``, ``breakdown`` for an
    operator singular on the Krylov space, or ``non_finite``: NaN or inf in the right-hand side
    (after 0 iterations), in the operator's products or in the solution)."""

    iters: int
    residual: float
    converged: bool
    result: Result = Result.converged


def _norm(x: Tensor) -> Tensor:
    return torch.linalg.vector_norm(x, dim=1)


def _largest(x: Tensor) -> float:
    """``max |x|`` (NaN if ``x`` has one): a finiteness test in three operations where ``isfinite`` takes six."""
    return float(x.abs().amax()) if x.numel() else 0.0


class LinearSolver:
    """Base class: ``solve(matvec, b) -> (w, LinearSolveInfo)`` on ``(batch, n)`` tensors.

    ``solve`` scales each sample's system by ``max |b_i|`` and calls ``_solve`` on the scaled
    one, with per-sample tolerances ``tol_i`` on ``||b_i - A w_i||`` in scaled units. A
    non-finite ``b`` is not solved (`Result.non_finite` after 0 iterations); a solution that
    is not finite is `Result.non_finite` too."""

    def __init__(self, rtol: float, atol: float, max_iters: int):
        self.rtol, self.atol = non_negative_float("rtol", rtol), non_negative_float("atol", atol)
        self.max_iters = positive_int("max_iters", max_iters)

    def solve(self, matvec: MatVec, b: Tensor):
        if torch.is_grad_enabled():  # the solution carries no graph; matvec may still call torch.autograd.grad
            with torch.no_grad():
                return self.solve(matvec, b)
        scale = b.abs().amax(dim=1)
        if not math.isfinite(float(scale.max()) if scale.numel() else 0.0):  # NaN propagates through amax
            return torch.full_like(b, math.nan), LinearSolveInfo(0, math.nan, False, Result.non_finite)
        zero = scale == 0
        scale = scale.masked_fill(zero, 1.0)
        bs = b / scale[:, None]
        bnorm = _norm(bs)
        tol = self.rtol * bnorm if self.atol == 0 else torch.clamp(self.rtol * bnorm, min=self.atol / scale)
        w, info = self._solve(matvec, bs, bnorm, tol.masked_fill(zero, math.inf))  # w_i = 0 solves b_i = 0 exactly
        w = w * scale[:, None]
        if info.result is not Result.non_finite and not math.isfinite(_largest(w)):
            info = LinearSolveInfo(info.iters, info.residual, False, Result.non_finite)  # overflow in the scaling back
        return w, info

    def _solve(self, matvec: MatVec, b: Tensor, bnorm: Tensor, tol: Tensor):
        raise NotImplementedError

    @staticmethod
    def _info(iters: int, r: Tensor, bnorm: Tensor, tol: Tensor, breakdown: bool = False) -> LinearSolveInfo:
        rnorm = _norm(r)
        rel = float(torch.where(bnorm > 0, rnorm / bnorm.clamp_min(torch.finfo(bnorm.dtype).tiny), 0.0).max()) \
            if rnorm.numel() else 0.0
        converged = bool((rnorm <= tol).all())
        result = (Result.converged if converged else Result.non_finite if not math.isfinite(rel) else
                  Result.breakdown if breakdown else Result.max_steps)
        return LinearSolveInfo(iters, rel, converged, result)

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({opts})"


class GMRES(LinearSolver):
    """Restarted GMRES(m), batched over samples.

    Arnoldi with classical Gram-Schmidt applied twice. The residual norm of every sample after
    ``j`` matvecs is ``beta / ||u||``, with ``u`` the left null vector of the ``(j + 1) x j``
    Hessenberg matrix ``H`` (``u^T H = 0``, ``u_0 = 1``), which grows by one entry per matvec:
    ``u_{j+1} = -(u . h_j) / h_{j+1,j}``. That is a few batched ops per iteration (no rotations,
    no loop over earlier columns) and the stop needs no iterate. At a stop, or at a restart, the
    small least-squares problem ``min ||beta e_1 - H y||`` is solved by Householder QR, whose
    residual is the one reported and judged: the recurrence only says when to look. Iterates
    until every sample satisfies ``||b - A w|| <= max(atol, rtol ||b||)`` or ``max_iters``
    matvecs were spent.

    Args:
        rtol: relative tolerance. Default ``1e-5``: far below the forward solve's error,
            so the gradient error is set by the forward tolerance, and cheap (a
            contractive DEQ needs 5-15 iterations).
        atol: absolute floor of the residual. Default ``0.0``: the tolerance is relative to
            each sample's ``||b_i||`` (a zero cotangent is solved exactly by the scaling).
        restart: Krylov subspace size before a restart. Default ``20``.
        max_iters: total matvecs allowed. Default ``200``.
        reorthogonalize: a second Gram-Schmidt pass per iteration ("twice is enough"), which
            keeps the basis orthogonal to round-off. Default ``True``.

    An operator that is singular on the Krylov space (a zero Hessenberg column) stalls the
    residual estimate; the solve then ends at ``max_iters`` with `Result.breakdown` and the
    true residual.
    """

    def __init__(self, rtol: float = 1e-5, atol: float = 0.0, restart: int = 20, max_iters: int = 200,
                 reorthogonalize: bool = True):
        super().__init__(rtol, atol, max_iters)
        self.restart, self.reorthogonalize = positive_int("restart", restart), bool(reorthogonalize)

    def _solve(self, matvec, b, bnorm, tol):
        batch, n = b.shape
        tiny = torch.finfo(b.dtype).tiny
        x, r, beta, iters, broke = None, b, bnorm, 0, False  # the first residual is b, its norm bnorm
        while True:
            if iters >= self.max_iters or bool((beta <= tol).all()):
                x = torch.zeros_like(b) if x is None else x
                return x, self._info(iters, r, bnorm, tol, breakdown=broke)
            m = min(self.restart, self.max_iters - iters)
            basis = b.new_empty(batch, m + 1, n)
            columns = basis.mT  # V^T as slices of one view: no transpose per product
            # row j: column j of the Hessenberg matrix, its subdiagonal entry included
            hessenberg = b.new_zeros(batch, m, m + 1)
            null = b.new_zeros(batch, m + 1, 1)
            null[:, 0] = 1.0
            v = basis[:, 0]
            torch.div(r, beta.clamp_min(tiny)[:, None], out=v)
            # the residual estimate beta / ||u|| <= tol, u the left null vector of the Hessenberg matrix: the
            # deficit (beta / tol)^2 - ||u||^2 must fall to zero (u = e_0 so far; beta = tol = 0 is met)
            deficit = torch.nan_to_num(beta / tol, nan=0.0, posinf=math.inf).square_().sub_(1.0)[:, None, None]
            for j in range(m):
                w = matvec(v)[:, None]
                iters += 1
                # h = V w and w - V^T h as (1 x n)(n x j) and (1 x j)(j x n) batched products: the fastest
                # forms on CPU, except a (1 x 1)(1 x n) product, which is an elementwise one
                V, Vt = basis[:, : j + 1], columns[:, :, : j + 1]
                h = torch.bmm(w, Vt)
                w = torch.addcmul(w, h, V, value=-1) if j == 0 else torch.baddbmm(w, h, V, alpha=-1)
                if self.reorthogonalize:
                    h2 = torch.bmm(w, Vt)
                    w = torch.addcmul(w, h2, V, value=-1) if j == 0 else torch.baddbmm(w, h2, V, alpha=-1)
                    h += h2
                hn = torch.linalg.vector_norm(w, dim=2, keepdim=True)
                torch.cat((h, hn), dim=2, out=hessenberg[:, j : j + 1, : j + 2])
                hn = hn.clamp_min(tiny)
                torch.div(w, hn, out=basis[:, j + 1 : j + 2])
                v = basis[:, j + 1]
                # u_{j+1} = -(u . h_j) / h_{j+1,j}, so that u^T H = 0; then ||r_j|| = beta / ||u|| (u_0 = 1)
                u = null[:, j + 1 : j + 2]
                u.addcdiv_(torch.bmm(h, null[:, : j + 1]), hn, value=-1)
                deficit.addcmul_(u, u, value=-1)
                if not float(deficit.max()) > 0:  # NaN stops too: the least-squares solve below reports it
                    break
            x, estimate, singular = self._update(x, basis, beta, hessenberg[:, : j + 1, : j + 2])
            if bool((estimate <= tol).all()):
                # the small least-squares residual is the true one in exact arithmetic: no extra matvec
                rel = (estimate / bnorm.clamp_min(tiny)).max()  # a zero sample has estimate 0
                return x, LinearSolveInfo(iters, float(rel), True)
            if not math.isfinite(float(estimate.max())):
                return x, LinearSolveInfo(iters, math.nan, False, Result.non_finite)
            broke = broke or (singular is not None and bool((singular & (estimate > tol)).any()))
            r = b - matvec(x)
            beta = _norm(r)
            iters += 1

    @staticmethod
    def _update(x: Optional[Tensor], basis: Tensor, beta: Tensor, rows: Tensor):
        """``x + V_k y`` with ``y`` the least-squares solution of ``H y = beta e_1`` (``rows = H^T``, the
        ``(k + 1) x k`` Hessenberg matrix, by Householder QR; ``x = None`` is zero), the residual
        ``|beta e_1 - H y|`` of every sample, and which samples' ``H`` has a zero pivot (the operator is
        singular on the Krylov space; ``None`` if none has)."""
        k = rows.shape[1]
        Q, R = torch.linalg.qr(rows.mT, mode="complete")
        g = beta[:, None, None] * Q[:, :1].mT  # Q^T (beta e_1), a column
        R = R[:, :k]
        pivots = torch.diagonal(R, dim1=1, dim2=2).abs()
        tiny = torch.finfo(basis.dtype).tiny
        if float(pivots.min()) > tiny:
            y, singular = torch.linalg.solve_triangular(R, g[:, :k], upper=True), None
        else:
            # a zero pivot: a unit pivot with a zero right-hand side keeps that direction out of the solution
            # instead of adding an arbitrary null-space component to it
            zero = pivots <= tiny
            rhs = torch.where(zero[..., None], 0.0, g[:, :k])
            y = torch.linalg.solve_triangular(R + torch.diag_embed(zero.to(R.dtype)), rhs, upper=True)
            singular = zero.any(dim=1)
        # the residual as computed, not |g_k| alone: a pivot at rounding level (an invariant Krylov space
        # of a singular operator) gives a huge y that the back-substitution error R y - g shows
        residual = torch.cat((torch.baddbmm(g[:, :k], R, y, alpha=-1), g[:, k:]), dim=1)
        residual = torch.linalg.vector_norm(residual, dim=(1, 2))
        step = torch.bmm(y.mT, basis[:, :k])[:, 0] if x is None else torch.baddbmm(x[:, None], y.mT, basis[:, :k])[:, 0]
        return step, residual, singular


class FixedPointSolver(LinearSolver):
    """Richardson / Neumann-series iteration ``w <- w + (b - A w)``.

    For a DEQ, ``A = I - J_f^T`` and this is the truncated Neumann series
    ``w = sum_k (J_f^T)^k b``: it converges when the spectral radius of ``J_f`` is below 1,
    at a linear rate, one matvec per iteration.

    Args:
        rtol: relative tolerance. Default ``1e-5``.
        atol: absolute floor of the residual. Default ``0.0`` (relative to ``||b_i||``).
        max_iters: matvecs allowed. Default ``200``.
    """

    def __init__(self, rtol: float = 1e-5, atol: float = 0.0, max_iters: int = 200):
        super().__init__(rtol, atol, max_iters)

    def _solve(self, matvec, b, bnorm, tol):
        x, r, iters = torch.zeros_like(b), b, 0
        while iters < self.max_iters and not bool((_norm(r) <= tol).all()):
            x = x + r
            r = b - matvec(x)
            iters += 1
        return x, self._info(iters, r, bnorm, tol)


class DirectSolver(LinearSolver):
    """Dense solve: builds each sample's ``n x n`` matrix with ``n`` matvecs, then
    ``torch.linalg.solve``. Exact up to round-off (converged means a backward error of at most
    ``n eps (||A|| ||x|| + ||b||)``); an exactly singular matrix is `Result.breakdown`. For small
    states and for tests.

    Args:
        max_size: refuse states larger than this (the matrix costs ``n`` matvecs and
            ``batch * n^2`` memory). Default ``4096``.
    """

    def __init__(self, max_size: int = 4096):
        super().__init__(0.0, 0.0, 1)
        self.max_size = max_size

    def _solve(self, matvec, b, bnorm, tol):
        batch, n = b.shape
        if n > self.max_size:
            raise ValueError(
                f"DirectSolver builds a dense {n}x{n} matrix per sample, above max_size={self.max_size}; "
                "use GMRES() for large states"
            )
        eye = torch.eye(n, dtype=b.dtype, device=b.device)
        cols = [matvec(eye[i].expand(batch, n).contiguous()) for i in range(n)]
        A = torch.stack(cols, dim=2)
        x, failed = torch.linalg.solve_ex(A, b)
        singular = failed != 0  # an exactly singular matrix: reported as a breakdown, not raised
        x = torch.where(singular[:, None], 0.0, x)
        r = b - torch.bmm(A, x[:, :, None])[..., 0]
        # converged: a backward error at rounding level, ||r|| <= n eps (||A|| ||x|| + ||b||)
        eps = torch.finfo(b.dtype).eps
        exact = n * eps * (torch.linalg.matrix_norm(A) * _norm(x) + bnorm)
        tol = torch.where(torch.isinf(tol), tol, torch.where(singular, 0.0, exact))
        return x, self._info(n, r, bnorm, tol, breakdown=bool(singular.any()))
