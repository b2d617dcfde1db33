"""Multiscale Deep Equilibrium Models (MDEQ, Bai et al. 2020) on the DEQ of this package.

An MDEQ drives several feature maps ``z = (z_1, ..., z_n)``, one per resolution, to a joint
steady state ``z* = f(z*, x)``. The solvers of this package work on one tensor per sample,
so the multiscale state is stored flat, ``(batch, N)`` with ``N = sum_i C_i H_i W_i``, and
the layer splits it into the feature maps, applies the blocks and fuses the resolutions,
and flattens the result (`MultiscaleState`, `MDEQLayer`). Any ``td.DEQ``
solver, sensitivity and initializer then applies unchanged::

    >>> import torch, torchdyn_deq as td
    >>> from torchdyn_deq.multiscale import MDEQLayer, MultiscaleState
    >>> state = MultiscaleState([(4, 8, 8), (8, 4, 4)])
    >>> deq = td.DEQ(MDEQLayer(state, injection_channels=4), solver="broyden", state_shape=(state.size,))
    >>> _, sol = deq(torch.randn(2, 4, 8, 8))
    >>> [tuple(z.shape) for z in state.split(sol[-1])]
    [(2, 4, 8, 8), (2, 8, 4, 4)]

The classifiers of the paper's CIFAR-10 experiments (section 4.2, Tables 2 and 3) are built by
`mdeq_small` and `mdeq_large` in every form: continuous DEQ (VCAB3), discrete DEQ
(L-Broyden), Vanilla / Skip / Skip Reg., and the Multiscale Neural ODE with input injection.

Differences from Bai et al.'s code, on purpose: no weight normalization and no variational
dropout inside ``f`` (both need per-forward state that the solvers do not reset; the paper's
Julia code uses weight norm, which adds one scale per output channel of each block conv).
"""
from __future__ import annotations

import contextlib
import io
import math
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torchdyn.core import NeuralODE

from ._initializers import SkipInitializer, SkipRegInitializer
from ._linear_solvers import GMRES
from ._models import DEQ
from ._sensitivity import SteadyStateSensitivity
from ._solution import SteadyStateSolution

__all__ = [
    "MultiscaleState", "ResidualBlock", "DownsampleBlock", "UpsampleBlock", "MultiscaleFusion", "MDEQLayer",
    "InjectionStem", "ClassificationHead", "SkipPredictor", "MultiscaleNeuralODE", "MDEQClassifier",
    "MDEQConfig", "init_weights", "MDEQ_SMALL", "MDEQ_LARGE", "mdeq_classifier", "mdeq_small", "mdeq_large",
    "FORMS", "VARIANTS",
]

Shape = Tuple[int, int, int]


# ---------------------------------------------------------------------------- the flat state
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


# ---------------------------------------------------------------------------- building blocks
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


# ---------------------------------------------------------------------------- the Neural ODE baseline
class _InjectedField(nn.Module):
    """``d[z, x]/dt = [f(z, x), 0]`` on the state ``[z_flat, x_flat]``: the injected input rides
    in the state with zero velocity, so torchdyn's adjoint returns its gradient (a closure or
    ``DataControl`` would leave the stem without gradient)."""

    def __init__(self, f: MDEQLayer, size: int, injection_shape: Tuple[int, ...]):
        super().__init__()
        self.f, self.size, self.injection_shape = f, size, tuple(injection_shape)

    def forward(self, t: Tensor, state: Tensor, args: Optional[dict] = None) -> Tensor:
        z, x = state[:, :self.size], state[:, self.size:]
        dz = self.f(z, x.reshape(x.shape[0], *self.injection_shape))
        return torch.cat([dz, torch.zeros_like(x)], dim=1)


class MultiscaleNeuralODE(nn.Module):
    """The paper's baseline, the Multiscale Neural ODE with input injection: the MDEQ layer as
    vector field ``dz/dt = f(z, x)``, integrated from ``z(0) = 0`` over ``t in [0, 1]`` by a
    torchdyn ``NeuralODE`` (adaptive ``solver``, ``sensitivity='adjoint'`` by default).

    ``forward(x)`` returns ``(t_eval, trajectory)`` like torchdyn with the injected input
    stripped from the state (``trajectory[-1]`` is ``z(1)``, ``(batch, N)``). ``forward_nfe``
    is the last forward pass's NFE and ``backward_nfe()`` the evaluations since.
    """

    def __init__(self, f: MDEQLayer, injection_shape: Tuple[int, ...], solver: str = "tsit5",
                 sensitivity: str = "adjoint", atol: float = 0.05, rtol: float = 0.05):
        super().__init__()
        self.size = f.state.size
        field = _InjectedField(f, self.size, injection_shape)
        with contextlib.redirect_stdout(io.StringIO()):  # torchdyn prints about its defaults
            self.ode = NeuralODE(field, solver=solver, sensitivity=sensitivity, atol=atol, rtol=rtol,
                                 atol_adjoint=atol, rtol_adjoint=rtol)
        self.register_buffer("t_span", torch.linspace(0, 1, 2))
        self.forward_nfe, self._nfe_mark = 0, 0

    @property
    def f(self) -> MDEQLayer:
        return self.ode.vf.vf.f

    def forward(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        start = int(self.ode.vf.nfe)
        state = torch.cat([x.new_zeros(x.shape[0], self.size), x.flatten(1)], dim=1)
        t_eval, trajectory = self.ode(state, self.t_span.to(x.dtype))
        self._nfe_mark = int(self.ode.vf.nfe)
        self.forward_nfe = self._nfe_mark - start
        return t_eval, trajectory[..., :self.size]

    def backward_nfe(self) -> int:
        """Vector-field evaluations since the last forward pass (the adjoint's, after a backward)."""
        return int(self.ode.vf.nfe) - self._nfe_mark


# ---------------------------------------------------------------------------- the classifier
class MDEQClassifier(nn.Module):
    """``images -> stem -> implicit layer -> head -> logits``.

    Args:
        stem: computes the injected input ``x`` (`InjectionStem`).
        core: a ``td.DEQ`` around an `MDEQLayer`, or a `MultiscaleNeuralODE`;
            called ``core(x)`` and returning torchdyn's ``(t_eval, trajectory)``.
        head: maps the flat final state to logits (`ClassificationHead`).
    """

    def __init__(self, stem: nn.Module, core: nn.Module, head: nn.Module):
        super().__init__()
        self.stem, self.core, self.head = stem, core, head

    def forward(self, images: Tensor) -> Tensor:
        _, trajectory = self.core(self.stem(images))
        return self.head(trajectory[-1])

    @property
    def f(self) -> MDEQLayer:
        """The implicit layer (vector field of the Neural ODE)."""
        return self.core.f

    @property
    def solution(self) -> Optional[SteadyStateSolution]:
        """The DEQ's last solve record (``None`` for the Neural ODE)."""
        return getattr(self.core, "solution", None)

    def aux_loss(self) -> Tensor:
        """The DEQ's weighted Skip loss of the last forward pass (a zero tensor otherwise)."""
        sol = self.solution
        return sol.aux_loss if sol is not None else self.head.classifier.weight.new_zeros(())

    def forward_nfe(self) -> int:
        """Vector-field evaluations of the last forward pass."""
        sol = self.solution
        return sol.nfe if sol is not None else self.core.forward_nfe

    def backward_stats(self) -> Dict[str, float]:
        """After a backward pass: the DEQ's linear-solve iterations and relative residual, or the
        adjoint's NFE."""
        sol = self.solution
        if sol is None:
            return {"backward_nfe": float(self.core.backward_nfe())}
        if sol.backward_iters is None:
            return {}
        return {"backward_iters": float(sol.backward_iters), "backward_residual": float(sol.backward_residual)}


# ---------------------------------------------------------------------------- the model zoo
class MDEQConfig:
    """Sizes of an MDEQ classifier for ``resolution x resolution`` images.

    Args:
        channels: per-branch widths, finest first.
        head_channels: per-branch widths of the head's bottlenecks (x4 at their output).
        final_channels: width of the pooled feature vector.
        expansion: residual block width factor. groups: GroupNorm groups.
        resolution: input size (32 for CIFAR-10). in_channels: 3.
    """

    def __init__(self, channels: Sequence[int], head_channels: Sequence[int], final_channels: int,
                 expansion: int = 5, groups: int = 4, resolution: int = 32, in_channels: int = 3,
                 num_classes: int = 10):
        self.channels, self.head_channels = tuple(channels), tuple(head_channels)
        self.final_channels, self.expansion, self.groups = final_channels, expansion, groups
        self.resolution, self.in_channels, self.num_classes = resolution, in_channels, num_classes

    def state(self) -> MultiscaleState:
        return MultiscaleState.pyramid(self.channels, self.resolution)

    def __repr__(self) -> str:
        return (f"MDEQConfig(channels={self.channels}, head_channels={self.head_channels}, "
                f"final_channels={self.final_channels}, expansion={self.expansion}, groups={self.groups})")


#: MDEQ-small for CIFAR-10 (paper Table 2: 163,546 parameters; here 159,274). The layout of the
#: paper's own CIFAR-10 code (DeepEquilibriumNetworks.jl, ``examples``: two branches of 24
#: channels at 32x32 and 16x16, head channels (8, 16), 200 final channels, 8 GroupNorm groups);
#: its Skip predictor adds 57,408 parameters, the "additional 58K" of the paper's section 4.2.1.
MDEQ_SMALL = MDEQConfig(channels=(24, 24), head_channels=(8, 16), final_channels=200, groups=8)
#: MDEQ-large for CIFAR-10 (paper Table 3: 10.63M parameters; here 11,095,038): Bai et al.'s
#: ``cls_mdeq_LARGE`` layout (four branches of 32, 64, 128, 256 channels at 32, 16, 8, 4 pixels,
#: head channels (14, 28, 56, 112), 1680 final channels, 8 GroupNorm groups).
MDEQ_LARGE = MDEQConfig(channels=(32, 64, 128, 256), head_channels=(14, 28, 56, 112), final_channels=1680,
                        groups=8)

FORMS = {"continuous": "vcab3", "discrete": "broyden", "neural_ode": None}
VARIANTS = ("vanilla", "skip", "skip_reg")


def init_weights(module: nn.Module, std: float = 0.01) -> nn.Module:
    """Bai et al.'s initialization: every convolution's weight and bias from ``N(0, std**2)``.

    With PyTorch's default (Kaiming-uniform) weights the MDEQ layer of `MDEQ_SMALL` has a
    Jacobian spectral radius around 1.5 at its fixed point and L-Broyden does not reach the
    tolerance in 100 iterations; with this one it does in about 60. Returns ``module``.
    """
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.normal_(m.weight, 0.0, std)
            if m.bias is not None:
                nn.init.normal_(m.bias, 0.0, std)
    return module


def mdeq_classifier(config: MDEQConfig, form: str = "continuous", variant: str = "vanilla", *,
                    tol: float = 0.05, lambda_skip: float = 0.01, max_steps: int = 18,
                    backward_max_iters: int = 20, init_std: Optional[float] = 0.01,
                    **deq_kwargs) -> MDEQClassifier:
    """An MDEQ classifier of ``config`` in one of the paper's forms.

    Args:
        config: an `MDEQConfig` (``MDEQ_SMALL``, ``MDEQ_LARGE``).
        form: ``'continuous'`` (``td.DEQ`` with VCAB3, the paper's CIFAR solver),
            ``'discrete'`` (L-Broyden, as Bai et al.), or ``'neural_ode'`` (the Multiscale
            Neural ODE with input injection: ``dz/dt = f(z, x)`` on ``[0, 1]``, tsit5,
            torchdyn's adjoint). Default ``'continuous'``.
        variant: ``'vanilla'`` (``z0 = 0``), ``'skip'`` (``z0 = SkipPredictor(x)``), or
            ``'skip_reg'`` (``z0 = f(0, x)``). Only ``'vanilla'`` for ``'neural_ode'``.
        tol: ``atol = rtol`` of the forward solve, of the backward linear solve (GMRES
            ``rtol``) and of the Neural ODE's solver and adjoint. Default ``0.05`` (the
            paper's CIFAR tolerance, used forward and backward in its code).
        lambda_skip: weight of the Skip loss. Default ``0.01`` (the paper's).
        max_steps: forward solver steps (VCAB3) or iterations (L-Broyden). Default ``18``,
            the paper's code's ``fwd_maxiters`` for CIFAR-10: MDEQs are not contractive and
            the solve is capped rather than run to convergence (unconverged solves warn
            with a `ConvergenceWarning`; pass ``on_failure`` or filter it).
        backward_max_iters: GMRES iterations of the implicit backward solve. Default ``20``
            (the code's ``bwd_maxiters``). Ignored when ``sensitivity`` is given.
        init_std: convolutions drawn from ``N(0, init_std**2)`` (`init_weights`, as Bai
            et al.). Default ``0.01``; ``None`` keeps PyTorch's initialization.
        **deq_kwargs: passed to ``td.DEQ`` (``sensitivity``, ``on_failure``, ...).

    Parameters are created in the same order in every form (stem, layer, head, then the
    Skip predictor), so one seed gives the same stem, layer and head weights in each form.
    """
    if form not in FORMS:
        raise ValueError(f"unknown form {form!r}; valid: {', '.join(map(repr, FORMS))}")
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; valid: {', '.join(map(repr, VARIANTS))}")
    if form == "neural_ode" and variant != "vanilla":
        raise ValueError(f"variant={variant!r} needs a steady state; the Neural ODE baseline has only 'vanilla'")
    state = config.state()
    c0 = config.channels[0]
    stem = InjectionStem(config.in_channels, c0)
    f = MDEQLayer(state, c0, config.expansion, config.groups)
    head = ClassificationHead(state, config.head_channels, config.final_channels, config.num_classes)
    if form == "neural_ode":
        if deq_kwargs:
            raise TypeError(f"form='neural_ode' takes no DEQ options, got {sorted(deq_kwargs)}")
        core: nn.Module = MultiscaleNeuralODE(f, (c0, config.resolution, config.resolution), atol=tol, rtol=tol)
    else:
        initializer: object = "zeros"
        if variant == "skip":
            initializer = SkipInitializer(SkipPredictor(state, c0, config.expansion, config.groups), weight=lambda_skip)
        elif variant == "skip_reg":
            initializer = SkipRegInitializer(weight=lambda_skip)
        if "sensitivity" not in deq_kwargs:
            deq_kwargs["sensitivity"] = SteadyStateSensitivity(
                GMRES(rtol=tol, max_iters=backward_max_iters), on_failure=deq_kwargs.get("on_failure", "warn"))
        core = DEQ(f, solver=FORMS[form], atol=tol, rtol=tol, initializer=initializer, state_shape=(state.size,),
                   max_steps=max_steps, **deq_kwargs)
    model = MDEQClassifier(stem, core, head)
    return model if init_std is None else init_weights(model, init_std)


def mdeq_small(form: str = "continuous", variant: str = "vanilla", **kwargs) -> MDEQClassifier:
    """MDEQ-small for 32x32x3 images (CIFAR-10, paper Table 2): `MDEQ_SMALL` in ``form`` /
    ``variant`` (see `mdeq_classifier`)."""
    return mdeq_classifier(MDEQ_SMALL, form, variant, **kwargs)


def mdeq_large(form: str = "continuous", variant: str = "vanilla", **kwargs) -> MDEQClassifier:
    """MDEQ-large for 32x32x3 images (CIFAR-10, paper Table 3): `MDEQ_LARGE` in ``form`` /
    ``variant`` (see `mdeq_classifier`)."""
    return mdeq_classifier(MDEQ_LARGE, form, variant, **kwargs)
