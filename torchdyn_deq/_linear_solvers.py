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

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from ._checks import non_negative_float, positive_int
from ._solution import Result

MatVec = Callable[[Tensor], Tensor]


@dataclass
class LinearSolveInfo:
    """Iterations (matvecs) used, worst relative residual ``||b - A w|| / ||b||`` reached, whether
    all samples converged, and the `Result` (``converged``, ``max_steps``, or ``breakdown``
    for an operator singular on the Krylov space)."""

    iters: int
    residual: float
    converged: bool
    result: Result = Result.converged


def _norm(x: Tensor) -> Tensor:
    return torch.linalg.vector_norm(x, dim=1)


class LinearSolver:
    """Base class: ``solve(matvec, b) -> (w, LinearSolveInfo)`` on ``(batch, n)`` tensors.

    ``solve`` scales each sample's system by ``max |b_i|`` and calls ``_solve`` on the scaled
    one, with per-sample tolerances ``tol_i`` on ``||b_i - A w_i||`` in scaled units."""

    def __init__(self, rtol: float, atol: float, max_iters: int):
        self.rtol, self.atol = non_negative_float("rtol", rtol), non_negative_float("atol", atol)
        self.max_iters = positive_int("max_iters", max_iters)

    @torch.no_grad()  # the solution carries no graph; matvec may still call torch.autograd.grad
    def solve(self, matvec: MatVec, b: Tensor):
        scale = b.abs().amax(dim=1)
        zero = scale == 0
        scale = torch.where(zero, torch.ones_like(scale), scale)
        bs = b / scale[:, None]
        bnorm = _norm(bs)
        tol = torch.clamp(self.rtol * bnorm, min=self.atol / scale)
        tol = torch.where(zero, torch.full_like(tol, torch.inf), tol)  # w_i = 0 solves b_i = 0 exactly
        w, info = self._solve(matvec, bs, bnorm, tol)
        return w * scale[:, None], info

    def _solve(self, matvec: MatVec, b: Tensor, bnorm: Tensor, tol: Tensor):
        raise NotImplementedError

    @staticmethod
    def _info(iters: int, r: Tensor, bnorm: Tensor, tol: Tensor, breakdown: bool = False) -> LinearSolveInfo:
        rnorm = _norm(r)
        rel = torch.where(bnorm > 0, rnorm / bnorm.clamp_min(torch.finfo(bnorm.dtype).tiny), 0.0).max()
        converged = bool((rnorm <= tol).all())
        result = Result.converged if converged else Result.breakdown if breakdown else Result.max_steps
        return LinearSolveInfo(iters, float(rel) if rel.numel() else 0.0, converged, result)

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({opts})"


class GMRES(LinearSolver):
    """Restarted GMRES(m), batched over samples.

    Arnoldi with classical Gram-Schmidt applied twice, and the Givens rotations kept as one
    accumulated orthogonal matrix, so each iteration is a fixed handful of batched ops
    (no loop over earlier columns) and the residual norm of every sample is known after
    each matvec without forming the iterate. Iterates until every sample satisfies
    ``||b - A w|| <= max(atol, rtol ||b||)`` or ``max_iters`` matvecs were spent.

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
        x = torch.zeros_like(b)
        r = b
        iters, broke = 0, torch.zeros(b.shape[0], dtype=torch.bool, device=b.device)
        tiny = torch.finfo(b.dtype).tiny
        batch, n = b.shape
        while True:
            beta = _norm(r)
            if bool((beta <= tol).all()) or iters >= self.max_iters:
                return x, self._info(iters, r, bnorm, tol, breakdown=bool(broke.any()))
            m = min(self.restart, self.max_iters - iters)
            basis = b.new_empty(batch, m + 1, n)
            R = b.new_zeros(batch, m, m)
            # product of the Givens rotations so far: Q H = R, residual norm = beta |Q[j+1, 0]|
            Q = torch.eye(m + 1, dtype=b.dtype, device=b.device).repeat(batch, 1, 1)
            # row / column views made once per restart: indexing in the loop costs as much as the arithmetic
            vectors, q_rows, r_cols = basis.unbind(1), Q.unbind(1), R.unbind(2)
            torch.div(r, beta.clamp_min(tiny)[:, None], out=vectors[0])
            estimate = beta
            for j in range(m):
                w = matvec(vectors[j])[:, None]
                iters += 1
                # h = V w and w - V^T h as (1 x n)(n x j) and (1 x j)(j x n) batched products: the
                # fastest forms on CPU (a batched matrix-vector bmm (j x n)(n x 1) is several times slower)
                V = basis[:, : j + 1]
                h = torch.bmm(w, V.mT)
                w = torch.baddbmm(w, h, V, alpha=-1)
                if self.reorthogonalize:
                    h2 = torch.bmm(w, V.mT)
                    w = torch.baddbmm(w, h2, V, alpha=-1)
                    h = h + h2
                w = w[:, 0]
                hn = _norm(w)
                torch.div(w, hn.clamp_min(tiny)[:, None], out=vectors[j + 1])
                col = torch.bmm(h, Q[:, : j + 1, : j + 1].mT)[:, 0]  # earlier rotations applied to h
                cj = col[:, j]
                denom = torch.hypot(cj, hn)
                # denom = 0: A v_j = 0, the operator is singular on the Krylov space. The rotation is
                # then the identity and the residual does not fall (a zero rotation claimed convergence)
                singular = (denom <= tiny) & (estimate > tol)
                broke = broke | singular
                inv = denom.clamp_min(tiny).reciprocal()
                cs, sn = torch.where(singular, 1.0, cj * inv), hn * inv
                col[:, j] = denom
                r_cols[j][:, : j + 1] = col
                # the rotation of rows j, j + 1; row j + 1 of Q is still e_{j+1}
                row, nxt = q_rows[j], q_rows[j + 1]
                torch.mul(row[:, : j + 1], -sn[:, None], out=nxt[:, : j + 1])
                nxt[:, j + 1] = cs
                row[:, : j + 1] *= cs[:, None]
                row[:, j + 1] = sn
                estimate = torch.where(singular, estimate, estimate * sn)  # = beta |Q[j + 1, 0]|: sn >= 0
                if bool((estimate <= tol).all()):
                    break
            k = j + 1
            Rk = R[:, :k, :k]
            diag = torch.diagonal(Rk, dim1=1, dim2=2)
            # a zero pivot: the operator is singular on the Krylov space (or an exact breakdown). A unit
            # pivot with a zero right-hand side there keeps that direction out of the solution instead
            # of adding an arbitrary null-space component to it
            zero = diag.abs() <= tiny
            Rk = Rk + torch.diag_embed(zero.to(b.dtype))
            rhs = torch.where(zero, 0.0, beta[:, None] * Q[:, :k, 0])
            y = torch.linalg.solve_triangular(Rk, rhs[..., None], upper=True)[..., 0]
            x = torch.baddbmm(x[:, None], y[:, None], basis[:, :k])[:, 0]
            if bool((estimate <= tol).all()):
                # the Arnoldi residual estimate is exact in exact arithmetic: no extra matvec
                rel = torch.where(bnorm > 0, estimate / bnorm.clamp_min(tiny), 0.0).max()
                return x, LinearSolveInfo(iters, float(rel), True)
            r = b - matvec(x)
            iters += 1


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
