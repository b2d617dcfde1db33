"""Matrix-free linear solvers for the implicit backward pass.

Each solver solves ``A w = b`` for a batch of independent systems: ``b`` has shape
``(batch, n)`` and ``matvec(w)`` applies the block-diagonal operator ``A`` to every sample
at once (one vector-Jacobian product). Convergence is judged per sample:
``||b_i - A w_i|| <= max(atol, rtol * ||b_i||)``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor

MatVec = Callable[[Tensor], Tensor]


@dataclass
class LinearSolveInfo:
    """Iterations (matvecs) used, worst relative residual reached, and whether all samples converged."""

    iters: int
    residual: float
    converged: bool


def _check_positive(name: str, value, allow_zero: bool = False) -> None:
    if not isinstance(value, (int, float)) or value != value or (value < 0 if allow_zero else value <= 0):
        raise ValueError(f"{name} must be a {'non-negative' if allow_zero else 'positive'} number, got {value!r}")


def _norm(x: Tensor) -> Tensor:
    return torch.linalg.vector_norm(x, dim=1)


class LinearSolver:
    """Base class: ``solve(matvec, b, x0=None) -> (w, LinearSolveInfo)`` on ``(batch, n)`` tensors."""

    def __init__(self, rtol: float, atol: float, max_iters: int):
        _check_positive("rtol", rtol, allow_zero=True)
        _check_positive("atol", atol, allow_zero=True)
        if not isinstance(max_iters, int) or max_iters < 1:
            raise ValueError(f"max_iters must be a positive integer, got {max_iters!r}")
        self.rtol, self.atol, self.max_iters = float(rtol), float(atol), max_iters

    def _targets(self, b: Tensor) -> tuple[Tensor, Tensor]:
        bnorm = _norm(b)
        return bnorm, torch.clamp(self.rtol * bnorm, min=self.atol)

    @staticmethod
    def _info(iters: int, r: Tensor, bnorm: Tensor, tol: Tensor) -> LinearSolveInfo:
        rnorm = _norm(r)
        rel = (rnorm / torch.clamp(bnorm, min=torch.finfo(bnorm.dtype).tiny)).max()
        return LinearSolveInfo(iters, float(rel) if rel.numel() else 0.0, bool((rnorm <= tol).all()))

    def solve(self, matvec: MatVec, b: Tensor, x0: Optional[Tensor] = None):
        raise NotImplementedError

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
        atol: absolute tolerance, for cotangents that are exactly zero. Default ``1e-10``.
        restart: Krylov subspace size before a restart. Default ``20``.
        max_iters: total matvecs allowed. Default ``200``.
        reorthogonalize: a second Gram-Schmidt pass per iteration ("twice is enough"), which
            keeps the basis orthogonal to round-off. Default ``True``.

    ``solve`` runs without autograd (``matvec`` may still call ``torch.autograd.grad``): the
    solution carries no graph. An operator that is singular on the Krylov space (a zero
    Hessenberg column) stalls the residual estimate; the solve then ends at ``max_iters``,
    reported as not converged with the true residual.
    """

    def __init__(self, rtol: float = 1e-5, atol: float = 1e-10, restart: int = 20, max_iters: int = 200,
                 reorthogonalize: bool = True):
        super().__init__(rtol, atol, max_iters)
        if not isinstance(restart, int) or restart < 1:
            raise ValueError(f"restart must be a positive integer, got {restart!r}")
        self.restart, self.reorthogonalize = restart, bool(reorthogonalize)

    @torch.no_grad()  # in-place writes into views of the Krylov basis; the result carries no graph
    def solve(self, matvec: MatVec, b: Tensor, x0: Optional[Tensor] = None):
        bnorm, tol = self._targets(b)
        x = torch.zeros_like(b) if x0 is None else x0.clone()
        r = b if x0 is None else b - matvec(x)
        iters = int(x0 is not None)
        tiny = torch.finfo(b.dtype).tiny
        batch, n = b.shape
        while True:
            beta = _norm(r)
            if bool((beta <= tol).all()) or iters >= self.max_iters:
                return x, self._info(iters, r, bnorm, tol)
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
                singular = denom <= tiny
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
            # a zero pivot only occurs after an exact breakdown, where the matching g entry is 0
            Rk = Rk + torch.diag_embed((diag.abs() <= tiny).to(b.dtype))
            y = torch.linalg.solve_triangular(Rk, (beta[:, None] * Q[:, :k, 0])[..., None], upper=True)[..., 0]
            x = torch.baddbmm(x[:, None], y[:, None], basis[:, :k])[:, 0]
            if bool((estimate <= tol).all()):
                # the Arnoldi residual estimate is exact in exact arithmetic: no extra matvec
                rel = (estimate / bnorm.clamp_min(tiny)).max()
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
        atol: absolute tolerance. Default ``1e-10``.
        max_iters: matvecs allowed. Default ``200``.
    """

    def __init__(self, rtol: float = 1e-5, atol: float = 1e-10, max_iters: int = 200):
        super().__init__(rtol, atol, max_iters)

    def solve(self, matvec: MatVec, b: Tensor, x0: Optional[Tensor] = None):
        bnorm, tol = self._targets(b)
        x = torch.zeros_like(b) if x0 is None else x0.clone()
        r = b if x0 is None else b - matvec(x)
        iters = int(x0 is not None)
        while iters < self.max_iters and not bool((_norm(r) <= tol).all()):
            x = x + r
            r = b - matvec(x)
            iters += 1
        return x, self._info(iters, r, bnorm, tol)


class DirectSolver(LinearSolver):
    """Dense solve: builds each sample's ``n x n`` matrix with ``n`` matvecs, then
    ``torch.linalg.solve``. Exact up to round-off; for small states and for tests.

    Args:
        max_size: refuse states larger than this (the matrix costs ``n`` matvecs and
            ``batch * n^2`` memory). Default ``4096``.
    """

    def __init__(self, max_size: int = 4096):
        super().__init__(0.0, 0.0, 1)
        self.max_size = max_size

    def solve(self, matvec: MatVec, b: Tensor, x0: Optional[Tensor] = None):
        batch, n = b.shape
        if n > self.max_size:
            raise ValueError(
                f"DirectSolver builds a dense {n}x{n} matrix per sample, above max_size={self.max_size}; "
                "use GMRES() for large states"
            )
        eye = torch.eye(n, dtype=b.dtype, device=b.device)
        cols = [matvec(eye[i].expand(batch, n).contiguous()) for i in range(n)]
        A = torch.stack(cols, dim=2)
        x = torch.linalg.solve(A, b)
        r = b - torch.bmm(A, x[:, :, None])[..., 0]
        bnorm = _norm(b)
        tol = torch.clamp(1e3 * torch.finfo(b.dtype).eps * bnorm, min=torch.finfo(b.dtype).tiny)
        return x, self._info(n, r, bnorm, tol)
