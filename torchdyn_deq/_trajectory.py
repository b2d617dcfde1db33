"""Trajectory supervision (fixed-point correction, Bai et al. 2022): intermediate iterates of the
solve returned with gradients, and the weighted loss over them."""
from __future__ import annotations

from typing import Callable, List, Optional, Sequence

import torch
from torch import Tensor

from ._checks import float_in, non_negative_int, one_of, positive_int
from ._solution import SavedState

WEIGHTINGS = ("constant", "linear", "exponential")


class TrajectorySupervision:
    """Return ``n_states`` states of the solve, ``z*`` last, each with a gradient.

    The solve keeps ``n_states - 1`` iterates (detached), evenly spaced over its accepted steps
    or at the accepted-step counts ``indexing``; each is then mapped by ``steps`` damped steps
    ``z <- z + damping g(t_i, z)`` (for a DEQ ``(1 - damping) z + damping f(z, x)``) with
    autograd, the phantom gradient of that state. ``z*`` keeps the model's sensitivity. The
    model returns ``t_eval = [t0, t_1, ..., t*]`` and ``sol = [z0, s_1, ..., z*]``: torchdyn's
    convention, with ``sol[-1]`` still the steady state (discrete solvers: every ``t_i = t0``).

    Args:
        n_states: states returned, ``z*`` included. Default ``2`` (one intermediate state).
        indexing: accepted-step counts of the intermediate states (torchdeq's ``indexing``),
            strictly increasing; ``None`` (default): evenly spaced over the solve, whatever its
            length. A state the solve did not reach repeats the last one kept.
        steps: phantom steps from each intermediate state. Default ``1`` with ``damping=1.0``:
            the state's image ``f(z_i, x)``, torchdeq's default ``grad=1``.
        damping: ``tau`` in ``(0, 1]``. Default ``1.0``.
    """

    def __init__(self, n_states: int = 2, indexing: Optional[Sequence[int]] = None, steps: int = 1,
                 damping: float = 1.0):
        self.n_states = positive_int("n_states", n_states)
        self.indexing = None if indexing is None else tuple(non_negative_int("indexing", i) for i in indexing)
        if self.indexing is not None and len(self.indexing) != self.n_states - 1:
            raise ValueError(f"indexing lists the {self.n_states - 1} intermediate states' steps (n_states - 1, "
                             f"z* is the last state), got {len(self.indexing)}: {indexing!r}")
        if self.indexing is not None and list(self.indexing) != sorted(set(self.indexing)):
            raise ValueError(f"indexing must be strictly increasing accepted-step counts (the states come in solve "
                             f"order), got {indexing!r}")
        self.steps = positive_int("steps", steps)
        self.damping = float_in("damping", damping, 0.0, 1.0)

    def unroll(self, g: Callable[[Tensor, Tensor], Tensor], saved: Sequence[SavedState], like: Tensor) -> List[Tensor]:
        """The ``n_states - 1`` intermediate states, each after its phantom steps (graph kept where
        grad is enabled). A solve that ended before a requested step (or took fewer steps than
        states asked for) repeats its last kept iterate, so ``sol`` always has ``n_states + 1``
        entries and ``sol[i]`` keeps its meaning."""
        saved = list(saved)[: self.n_states - 1]
        saved += saved[-1:] * (self.n_states - 1 - len(saved))
        out = []
        for state in saved:
            t = torch.as_tensor(state.t, dtype=like.dtype, device=like.device)
            z = state.z
            for _ in range(self.steps):
                z = z + self.damping * g(t, z)
            out.append(z)
        return out

    def __repr__(self) -> str:
        return (f"TrajectorySupervision(n_states={self.n_states}, indexing={self.indexing}, steps={self.steps}, "
                f"damping={self.damping})")


def correction_loss(losses: Sequence[Tensor], weighting: str = "exponential", gamma: float = 0.8) -> Tensor:
    """The fixed-point correction loss ``sum_i w_i L_i`` over the supervised states' losses, in
    solve order (``L_n`` that of ``z*``), with torchdeq's weightings:

    - ``'constant'``: ``w_i = 1``;
    - ``'linear'``: ``w_i = i / n``;
    - ``'exponential'`` (default): ``w_i = gamma^(n - i)``, ``z*``'s loss at weight 1.

    Args:
        losses: one scalar loss per state, e.g. ``[F.cross_entropy(head(s), y) for s in sol[1:]]``.
        weighting: one of ``'constant'``, ``'linear'``, ``'exponential'``.
        gamma: the exponential weighting's base, in ``(0, 1]``. Default ``0.8`` (torchdeq's).
    """
    one_of("weighting", weighting, WEIGHTINGS)
    gamma = float_in("gamma", gamma, 0.0, 1.0)
    n = len(losses)
    if n == 0:
        raise ValueError("correction_loss needs at least one loss")
    weights = {"constant": [1.0] * n, "linear": [(i + 1) / n for i in range(n)],
               "exponential": [gamma ** (n - 1 - i) for i in range(n)]}[weighting]
    return sum(w * loss for w, loss in zip(weights, losses))
