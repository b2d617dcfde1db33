"""The layout of a multiscale state ``(z_1, ..., z_n)`` inside one flat tensor per sample."""
from __future__ import annotations

import math
from typing import Sequence, Tuple

import torch
from torch import Tensor

Shape = Tuple[int, int, int]


class MultiscaleState:
    """The layout of a multiscale state inside one flat tensor per sample.

    Args:
        shapes: the per-sample shape ``(C_i, H_i, W_i)`` of each branch, highest resolution
            first, e.g. ``[(24, 32, 32), (24, 16, 16)]``.

    ``size`` is ``N = sum_i C_i H_i W_i``; ``flatten(zs)`` maps the tuple of ``(batch, C_i, H_i, W_i)``
    tensors to ``(batch, N)`` (one copy, by ``torch.cat``) and ``split(flat)`` maps back,
    returning views (no copy) when ``flat`` is contiguous.
    """

    def __init__(self, shapes: Sequence[Sequence[int]]):
        shapes = [tuple(int(s) for s in shape) for shape in shapes]
        if not shapes:
            raise ValueError("a multiscale state needs at least one branch shape, got none")
        for shape in shapes:
            if len(shape) != 3 or min(shape) < 1:
                raise ValueError(f"each branch shape must be (channels, height, width) of positive sizes, got {shape}")
        self.shapes: Tuple[Shape, ...] = tuple(shapes)  # type: ignore[assignment]
        self.sizes: Tuple[int, ...] = tuple(math.prod(shape) for shape in shapes)
        self.size: int = sum(self.sizes)

    def __len__(self) -> int:
        return len(self.shapes)

    def __repr__(self) -> str:
        return f"MultiscaleState({list(self.shapes)}, size={self.size})"

    def flatten(self, zs: Sequence[Tensor]) -> Tensor:
        """``(z_1, ..., z_n)``, each ``(batch, C_i, H_i, W_i)`` -> ``(batch, N)``."""
        if len(zs) != len(self.shapes):
            raise ValueError(f"expected {len(self.shapes)} branches, got {len(zs)}")
        batch = zs[0].shape[0]
        for i, (z, shape) in enumerate(zip(zs, self.shapes)):
            if tuple(z.shape[1:]) != shape or z.shape[0] != batch:
                raise ValueError(f"branch {i} has shape {tuple(z.shape)}, expected {(batch, *shape)}")
        return torch.cat([z.reshape(batch, -1) for z in zs], dim=1)

    def split(self, flat: Tensor) -> Tuple[Tensor, ...]:
        """``(batch, N)`` -> ``(z_1, ..., z_n)``, each ``(batch, C_i, H_i, W_i)``."""
        if flat.dim() != 2 or flat.shape[1] != self.size:
            raise ValueError(f"expected a flat state of shape (batch, {self.size}), got {tuple(flat.shape)}")
        batch = flat.shape[0]
        return tuple(part.view(batch, *shape) if part.is_contiguous() else part.reshape(batch, *shape)
                     for part, shape in zip(torch.split(flat, self.sizes, dim=1), self.shapes))

    @classmethod
    def pyramid(cls, channels: Sequence[int], resolution: int) -> "MultiscaleState":
        """Branch ``i`` at ``resolution / 2**i`` (square), with ``channels[i]`` channels."""
        if resolution % (2 ** (len(channels) - 1)):
            raise ValueError(f"resolution {resolution} cannot be halved {len(channels) - 1} times")
        return cls([(c, resolution >> i, resolution >> i) for i, c in enumerate(channels)])
