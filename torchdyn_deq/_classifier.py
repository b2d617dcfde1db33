"""The implicit-classifier protocol of the experiments and the model zoo: ``inputs -> x -> core -> z -> logits``.

The Lightning module (``LitClassifier``) and the benchmarks read the same four things from every
classifier, whether its core is a DEQ (with a solution record) or the Neural ODE baseline
(``InjectedNeuralODE``, which counts its evaluations itself): the last solve record, the
auxiliary loss to add to the task loss, the forward NFE and the backward work.
"""
from __future__ import annotations

from typing import Dict, Optional

import torch.nn as nn
from torch import Tensor

from ._solution import SteadyStateSolution


class ImplicitClassifier(nn.Module):
    """Base class: a subclass sets ``self.core`` (a ``td.DEQ`` or an ``InjectedNeuralODE``)
    and defines ``forward``. ``core(x)`` returns torchdyn's ``(t_eval, trajectory)``."""

    core: nn.Module

    @property
    def solution(self) -> Optional[SteadyStateSolution]:
        """The DEQ's last solve record (``None`` for the Neural ODE)."""
        return getattr(self.core, "solution", None)

    def aux_loss(self) -> Tensor:
        """The DEQ's weighted Skip / Jacobian losses of the last forward pass (a zero tensor
        otherwise), to add to the task loss."""
        sol = self.solution
        return sol.aux_loss if sol is not None else next(self.parameters()).new_zeros(())

    def forward_nfe(self) -> int:
        """Vector-field evaluations of the last forward solve."""
        sol = self.solution
        return sol.nfe if sol is not None else self.core.forward_nfe

    def backward_stats(self) -> Dict[str, float]:
        """After a backward pass: the DEQ's linear-solve iterations and relative residual, or
        the adjoint's NFE (empty for a DEQ whose sensitivity runs no linear solve)."""
        sol = self.solution
        if sol is None:
            return {"backward_nfe": float(self.core.backward_nfe())}
        if sol.backward_iters is None:
            return {}
        stats = {"backward_iters": float(sol.backward_iters)}
        if sol.backward_residual is not None:
            stats["backward_residual"] = float(sol.backward_residual)
        return stats
