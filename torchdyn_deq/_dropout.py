"""Variational dropout: one mask per solve, so that the fixed point exists."""
from __future__ import annotations

from typing import Iterable, Tuple

import torch.nn as nn
from torch import Tensor

from ._checks import float_in


class VariationalDropout(nn.Module):
    """Dropout whose mask stays fixed until `reset_dropout` (Gal and Ghahramani, 2016).

    A DEQ layer evaluated with a new dropout mask at every solver iteration is a different
    function at every iteration and has no fixed point; with one mask ``m`` per solve the
    layer ``f(z, x) * m / (1 - p)`` is one function, its fixed point exists and the implicit
    gradient holds. The DEQ models reset the masks at the start of every solve, so each
    forward pass draws a new one; the implicit backward's evaluation of ``f`` at ``z*`` uses
    the solve's mask. Outside a model, call `reset_dropout` yourself.

    In training mode the output is ``x * mask`` with ``mask`` drawn on ``x``'s device and
    dtype: Bernoulli(``1 - p``) divided by ``1 - p`` (the expectation is ``x``), one value
    per sample and per element, shared along ``shared_dims``. In eval mode, or with
    ``p = 0``, the identity.

    Args:
        p: probability of zeroing, in ``[0, 1)``. Default ``0.5``, as ``nn.Dropout`` and
            torchdeq's variational dropout.
        shared_dims: dimensions of the input (not the batch dimension ``0``; negative
            counts from the end) along which one mask value is shared. Default ``()``: an
            independent value per element, torchdeq's ``VariationalDropout``. ``(2, 3)`` on
            ``(B, C, H, W)`` drops whole channels (`VariationalDropout2d`); ``(1, 2)`` on
            channels-last ``(B, H, W, C)`` is torchdeq's ``VariationalDropout2d``
            (``token_first=True``).

    Shape: input ``(B, *)``, output the same.
    """

    def __init__(self, p: float = 0.5, shared_dims: Iterable[int] = ()):
        super().__init__()
        self.p = float_in("p", p, 0.0, 1.0, low_open=False, high_open=True)
        dims = tuple(shared_dims)
        if not all(isinstance(d, int) and not isinstance(d, bool) and d != 0 for d in dims):
            raise ValueError(f"shared_dims must be non-zero integers (dimension 0 is the batch: each sample "
                             f"has its own mask), got {shared_dims!r}")
        self.shared_dims = dims
        self.mask = None

    def _mask_shape(self, x: Tensor) -> Tuple[int, ...]:
        n = x.dim()
        if any(not -n <= d < n or d % n == 0 for d in self.shared_dims):
            raise ValueError(f"shared_dims={self.shared_dims} do not fit an input of shape {tuple(x.shape)} "
                             "(dimension 0 is the batch)")
        shared = {d % n for d in self.shared_dims}
        return tuple(1 if i in shared else size for i, size in enumerate(x.shape))

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0.0:
            return x
        shape = self._mask_shape(x)
        if self.mask is None:
            keep = 1.0 - self.p
            self.mask = x.new_empty(shape).bernoulli_(keep).div_(keep)
        elif tuple(self.mask.shape) != shape or self.mask.device != x.device or self.mask.dtype != x.dtype:
            raise ValueError(f"the dropout mask was drawn for another input ({tuple(self.mask.shape)}, "
                             f"{self.mask.dtype}, {self.mask.device}; this one needs {shape}, {x.dtype}, {x.device}): "
                             "call reset_dropout(module) before a new input (the DEQ models do it at every solve)")
        return x * self.mask

    def extra_repr(self) -> str:
        return f"p={self.p}, shared_dims={self.shared_dims}"


class _ChannelDropout(VariationalDropout):
    """One mask value per sample and channel of a channels-first input."""

    spatial: int = 0

    def __init__(self, p: float = 0.5):
        super().__init__(p, shared_dims=tuple(range(2, 2 + self.spatial)))

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 2 + self.spatial:
            raise ValueError(f"{type(self).__name__} expects (B, C{', *' * self.spatial}) inputs with "
                             f"{2 + self.spatial} dimensions, got shape {tuple(x.shape)}; VariationalDropout(p, "
                             "shared_dims=...) takes any layout")
        return super().forward(x)

    def extra_repr(self) -> str:
        return f"p={self.p}"


class VariationalDropout1d(_ChannelDropout):
    """`VariationalDropout` of whole channels of ``(B, C, L)`` inputs (``shared_dims=(2,)``)."""

    spatial = 1


class VariationalDropout2d(_ChannelDropout):
    """`VariationalDropout` of whole channels of ``(B, C, H, W)`` inputs (``shared_dims=(2, 3)``)."""

    spatial = 2


class VariationalDropout3d(_ChannelDropout):
    """`VariationalDropout` of whole channels of ``(B, C, D, H, W)`` inputs (``shared_dims=(2, 3, 4)``)."""

    spatial = 3


def reset_dropout(module: nn.Module) -> None:
    """Forget the masks of every `VariationalDropout` in ``module``: the next call draws new
    ones. The DEQ models call it at the start of every solve."""
    for m in module.modules():
        if isinstance(m, VariationalDropout):
            m.mask = None


def dropout_modules(module: nn.Module) -> list:
    """The `VariationalDropout` layers of ``module`` (the models restrict their masks to the
    rows a per-sample solver still integrates)."""
    return [m for m in module.modules() if isinstance(m, VariationalDropout)]
