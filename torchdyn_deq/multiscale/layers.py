"""The building blocks of an MDEQ (Bai et al. 2020): residual blocks, multiscale fusion, the
implicit layer ``f(z, x)`` on the flat state, the injection stem, the classification head and
the Skip DEQ's predictor."""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .state import MultiscaleState


def conv3x3(c_in: int, c_out: int, stride: int = 1, bias: bool = False) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, kernel_size=3, stride=stride, padding=1, bias=bias)


def _groups(channels: int, groups: int) -> int:
    # the largest divisor of `channels` not above `groups`: GroupNorm needs groups | channels
    return max(g for g in range(1, min(groups, channels) + 1) if channels % g == 0)


class ResidualBlock(nn.Module):
    """MDEQ's residual block on one branch (Bai et al. 2020, Figure 2)::

        y   = GN(conv3x3(ReLU(GN(conv3x3(z)))) + injection)      # conv widths C -> e C -> C
        out = GN(ReLU(y + z))

    Args:
        channels: ``C``.
        expansion: width factor ``e`` of the hidden convolution. Default ``5`` (MDEQ's).
        groups: GroupNorm groups. Default ``4`` (MDEQ's ``NUM_GROUPS``).
    """

    def __init__(self, channels: int, expansion: int = 5, groups: int = 4):
        super().__init__()
        hidden = expansion * channels
        self.conv1 = conv3x3(channels, hidden)
        self.gn1 = nn.GroupNorm(_groups(hidden, groups), hidden)
        self.conv2 = conv3x3(hidden, channels)
        self.gn2 = nn.GroupNorm(_groups(channels, groups), channels)
        self.gn3 = nn.GroupNorm(_groups(channels, groups), channels)

    def forward(self, z: Tensor, injection: Optional[Tensor] = None) -> Tensor:
        y = self.conv2(F.relu(self.gn1(self.conv1(z))))
        if injection is not None:
            y = y + injection
        return self.gn3(F.relu(self.gn2(y) + z))


class DownsampleBlock(nn.Module):
    """From branch ``j`` to the coarser branch ``i > j``: ``i - j`` stride-2 3x3 convolutions,
    each followed by GroupNorm (and ReLU between them); the channels change at the last one."""

    def __init__(self, c_in: int, c_out: int, levels: int, groups: int = 4):
        super().__init__()
        if levels < 1:
            raise ValueError(f"a downsampling block needs levels >= 1, got {levels}")
        layers: List[nn.Module] = []
        for k in range(levels):
            out = c_out if k == levels - 1 else c_in
            layers += [conv3x3(c_in, out, stride=2), nn.GroupNorm(_groups(out, groups), out)]
            if k != levels - 1:
                layers.append(nn.ReLU())
        self.net = nn.Sequential(*layers)

    def forward(self, z: Tensor) -> Tensor:
        return self.net(z)


class UpsampleBlock(nn.Module):
    """From branch ``j`` to the finer branch ``i < j``: a 1x1 convolution, GroupNorm and a
    nearest-neighbour upsampling by ``2**(j - i)``."""

    def __init__(self, c_in: int, c_out: int, levels: int, groups: int = 4):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, kernel_size=1, bias=False)
        self.gn = nn.GroupNorm(_groups(c_out, groups), c_out)
        self.scale = 2 ** levels

    def forward(self, z: Tensor) -> Tensor:
        return F.interpolate(self.gn(self.conv(z)), scale_factor=self.scale, mode="nearest")


class MultiscaleFusion(nn.Module):
    """Every branch receives the sum of all branches brought to its resolution and width
    (down- or upsampled), then ``GN(conv1x1(ReLU(.)))`` (MDEQ's post-fusion layer, with
    ``groups // 2`` groups)."""

    def __init__(self, channels: Sequence[int], groups: int = 4):
        super().__init__()
        n = len(channels)
        self.paths = nn.ModuleList([
            nn.ModuleList([
                nn.Identity() if i == j else
                DownsampleBlock(channels[j], channels[i], i - j, groups) if j < i else
                UpsampleBlock(channels[j], channels[i], j - i, groups)
                for j in range(n)])
            for i in range(n)])
        self.post = nn.ModuleList([
            nn.Sequential(nn.ReLU(), nn.Conv2d(c, c, kernel_size=1, bias=False),
                          nn.GroupNorm(_groups(c, max(1, groups // 2)), c))
            for c in channels])

    def forward(self, zs: Sequence[Tensor]) -> List[Tensor]:
        out = []
        for paths, post in zip(self.paths, self.post):
            total = paths[0](zs[0])
            for path, z in zip(paths[1:], zs[1:]):
                total = total + path(z)
            out.append(post(total))
        return out


class MDEQLayer(nn.Module):
    """The implicit layer ``f(z, x)`` of an MDEQ on the flat state.

    ``f`` splits ``z`` (``(batch, N)``) into the branches, applies one `ResidualBlock` per
    branch (the injected input ``x``, ``(batch, C_1, H_1, W_1)``, is added in the highest
    resolution's block), fuses the resolutions (`MultiscaleFusion`) and flattens.

    Args:
        state: the `MultiscaleState` layout.
        injection_channels: channels of ``x``; a 1x1 convolution maps them to ``C_1`` if they
            differ. Default: ``C_1``.
        expansion: channel expansion of the residual blocks. Default ``5``.
        groups: groups of the GroupNorms. Default ``4``.

    ``calls`` counts the evaluations.
    """

    def __init__(self, state: MultiscaleState, injection_channels: Optional[int] = None, expansion: int = 5,
                 groups: int = 4):
        super().__init__()
        self.state = state
        channels = [shape[0] for shape in state.shapes]
        for (c, h, w), (c_next, h_next, w_next) in zip(state.shapes, state.shapes[1:]):
            if (h, w) != (2 * h_next, 2 * w_next):
                raise ValueError(f"each branch must have half the resolution of the previous one, got {state.shapes}")
        injection_channels = channels[0] if injection_channels is None else injection_channels
        self.inject = (nn.Identity() if injection_channels == channels[0]
                       else nn.Conv2d(injection_channels, channels[0], kernel_size=1, bias=False))
        self.blocks = nn.ModuleList([ResidualBlock(c, expansion, groups) for c in channels])
        self.fusion = MultiscaleFusion(channels, groups)
        self.calls = 0

    def forward(self, z: Tensor, x: Tensor) -> Tensor:
        self.calls += 1
        zs = self.state.split(z)
        injection = self.inject(x)
        ys = [block(zi, injection if i == 0 else None) for i, (block, zi) in enumerate(zip(self.blocks, zs))]
        return self.state.flatten(self.fusion(ys))


class InjectionStem(nn.Module):
    """Computes the injected input once, outside the DEQ: two ``conv3x3 -> BatchNorm -> ReLU``
    at full resolution (MDEQ's ``downsample`` part with ``DOWNSAMPLE_TIMES = 0``), then MDEQ's
    ``stage0`` (``conv1x1 -> BatchNorm -> ReLU``)."""

    def __init__(self, in_channels: int, channels: int):
        super().__init__()
        self.net = nn.Sequential(
            conv3x3(in_channels, channels), nn.BatchNorm2d(channels), nn.ReLU(),
            conv3x3(channels, channels), nn.BatchNorm2d(channels), nn.ReLU(),
            nn.Conv2d(channels, channels, kernel_size=1, bias=False), nn.BatchNorm2d(channels), nn.ReLU())

    def forward(self, images: Tensor) -> Tensor:
        return self.net(images)


class _Bottleneck(nn.Module):
    """ResNet bottleneck (1x1 -> 3x3 -> 1x1, width ``4 planes``), MDEQ's head block."""

    expansion = 4

    def __init__(self, c_in: int, planes: int):
        super().__init__()
        out = planes * self.expansion
        self.net = nn.Sequential(
            nn.Conv2d(c_in, planes, kernel_size=1, bias=False), nn.BatchNorm2d(planes, affine=False), nn.ReLU(),
            conv3x3(planes, planes), nn.BatchNorm2d(planes, affine=False), nn.ReLU(),
            nn.Conv2d(planes, out, kernel_size=1, bias=False), nn.BatchNorm2d(out, affine=False))
        self.shortcut = (nn.Identity() if c_in == out else
                         nn.Sequential(nn.Conv2d(c_in, out, kernel_size=1, bias=False), nn.BatchNorm2d(out)))

    def forward(self, z: Tensor) -> Tensor:
        return F.relu(self.net(z) + self.shortcut(z))


class ClassificationHead(nn.Module):
    """MDEQ's classification head (Bai et al. 2020, as HRNet's):

    1. each branch ``i`` goes through a bottleneck block widening it to ``4 head_channels[i]``;
    2. from the finest branch down, the running features are downsampled by a stride-2
       ``conv3x3 -> BN -> ReLU`` and added to the next branch's;
    3. at the coarsest resolution a ``conv1x1 -> BN -> ReLU`` to ``final_channels``, a global
       average pool and a ``Linear`` to the classes.

    Args:
        state: the `MultiscaleState` layout (the head's input is the flat ``z*``).
        head_channels: one per branch.
        final_channels: width of the pooled feature vector.
        num_classes: default ``10``.
    """

    def __init__(self, state: MultiscaleState, head_channels: Sequence[int], final_channels: int,
                 num_classes: int = 10):
        super().__init__()
        if len(head_channels) != len(state):
            raise ValueError(f"head_channels needs one entry per branch ({len(state)}), got {list(head_channels)}")
        self.state = state
        widths = [_Bottleneck.expansion * h for h in head_channels]
        self.incre = nn.ModuleList([_Bottleneck(shape[0], h) for shape, h in zip(state.shapes, head_channels)])
        self.down = nn.ModuleList([
            nn.Sequential(conv3x3(widths[i], widths[i + 1], stride=2, bias=True), nn.BatchNorm2d(widths[i + 1]), nn.ReLU())
            for i in range(len(widths) - 1)])
        self.final = nn.Sequential(nn.Conv2d(widths[-1], final_channels, kernel_size=1),
                                   nn.BatchNorm2d(final_channels), nn.ReLU())
        self.classifier = nn.Linear(final_channels, num_classes)

    def forward(self, z: Tensor) -> Tensor:
        zs = self.state.split(z)
        y = self.incre[0](zs[0])
        for down, incre, zi in zip(self.down, self.incre[1:], zs[1:]):
            y = incre(zi) + down(y)
        return self.classifier(self.final(y).mean(dim=(2, 3)))


class SkipPredictor(nn.Module):
    """The Skip DEQ's explicit network ``x -> z0`` (the paper: "the residual block and
    downsampling blocks from Bai et al."): a `ResidualBlock` (no injection) gives the
    finest branch, and `DownsampleBlock` chains from it give the coarser branches.

    Args:
        state: the `MultiscaleState` layout.
        injection_channels: channels of ``x`` (default ``C_1``; a 1x1 convolution adapts them).
        expansion, groups: of the residual block. Defaults ``5`` and ``4``.
    """

    def __init__(self, state: MultiscaleState, injection_channels: Optional[int] = None, expansion: int = 5,
                 groups: int = 4):
        super().__init__()
        self.state = state
        channels = [shape[0] for shape in state.shapes]
        injection_channels = channels[0] if injection_channels is None else injection_channels
        self.inject = (nn.Identity() if injection_channels == channels[0]
                       else nn.Conv2d(injection_channels, channels[0], kernel_size=1, bias=False))
        self.block = ResidualBlock(channels[0], expansion, groups)
        self.down = nn.ModuleList([DownsampleBlock(channels[0], c, i, groups) for i, c in enumerate(channels[1:], 1)])

    def forward(self, x: Tensor) -> Tensor:
        z1 = self.block(self.inject(x))
        return self.state.flatten([z1] + [down(z1) for down in self.down])
