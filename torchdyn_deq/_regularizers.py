"""Jacobian regularization (Bai et al. 2021) and a spectral-radius monitor."""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor


class JacobianPenalty:
    """Hutchinson estimate of ``weight * ||J_f(z*)||_F^2 / d`` (paper 2.2.2).

    ``J_f`` is the Jacobian of the layer ``f(z) = z + g(z)`` with respect to the state,
    ``d`` the per-sample state size. With probes ``eps ~ N(0, I)`` of the state's shape,
    ``E ||eps^T J_f||^2 = ||J_f||_F^2``; the estimate is averaged over probes and samples.
    It is differentiable (it trains): it costs one double-backward VJP per probe.

    Args:
        weight: ``lambda_jac``. Default ``1.0`` (the paper's MNIST setting).
        n_probes: probe vectors per sample. Default ``1``.

    Examples:
        >>> import torch, torch.nn as nn, torchdyn_deq as td
        >>> lin = nn.Linear(8, 8)
        >>> model = td.DEQ(lambda z, x: torch.tanh(lin(z) + x), jacobian_penalty=td.JacobianPenalty(weight=1.0))
        >>> _, sol = model(torch.randn(4, 8))              # training mode, gradients on: penalty computed
        >>> bool(model.solution.jacobian_loss > 0), model.solution.aux_loss.requires_grad
        (True, True)
    """

    def __init__(self, weight: float = 1.0, n_probes: int = 1):
        if not isinstance(weight, (int, float)) or not weight >= 0:
            raise ValueError(f"weight must be a non-negative number, got {weight!r}")
        if not isinstance(n_probes, int) or n_probes < 1:
            raise ValueError(f"n_probes must be a positive integer, got {n_probes!r}")
        self.weight, self.n_probes = float(weight), n_probes

    def __call__(self, gz: Tensor, z_leaf: Tensor) -> Tensor:
        """``gz = g(z_leaf)`` computed with autograd; ``z_leaf`` requires grad."""
        d = z_leaf[0].numel()
        total = gz.new_zeros(())
        for _ in range(self.n_probes):
            eps = torch.randn_like(z_leaf)
            (vjp,) = torch.autograd.grad(gz, z_leaf, eps, create_graph=True, retain_graph=True)
            total = total + (vjp + eps).pow(2).sum() / (d * z_leaf.shape[0])
        return self.weight * total / self.n_probes

    def __repr__(self) -> str:
        return f"JacobianPenalty(weight={self.weight}, n_probes={self.n_probes})"


def spectral_radius(g: Callable[[Tensor, Tensor], Tensor], z_star: Tensor, n_iters: int = 20) -> Tensor:
    """Per-sample estimate of the largest ``|eigenvalue|`` of ``J_f(z*)``, ``f = z + g``,
    by power iteration with VJPs (``J^T`` has the same spectrum). For diagnostics only:
    no gradient. A value at or above 1 means fixed-point iteration on ``f`` cannot converge.
    """
    with torch.enable_grad():
        z = z_star.detach().requires_grad_()
        fz = g(torch.zeros((), dtype=z.dtype, device=z.device), z) + z
        v = torch.randn_like(z)
        batch = z.shape[0]
        est = torch.zeros(batch, dtype=z.dtype, device=z.device)
        for _ in range(n_iters):
            v = v / torch.linalg.vector_norm(v.reshape(batch, -1), dim=1).clamp_min(1e-30).view(-1, *[1] * (z.dim() - 1))
            (v,) = torch.autograd.grad(fz, z, v, retain_graph=True)
            est = torch.linalg.vector_norm(v.reshape(batch, -1), dim=1)
    return est.detach()
