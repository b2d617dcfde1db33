"""The classifiers of the paper's CIFAR-10 experiments (section 4.2, Tables 2 and 3): MDEQ-small
and MDEQ-large as continuous DEQ (VCAB3), discrete DEQ (L-Broyden), Vanilla / Skip / Skip Reg.,
and the Multiscale Neural ODE with input injection (the experiments' shared baseline,
``torchdyn_deq._baselines``)."""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch.nn as nn
from torch import Tensor

from .._baselines import InjectedNeuralODE
from .._classifier import ImplicitClassifier
from .._initializers import SkipInitializer, SkipRegInitializer
from .._linear_solvers import GMRES
from .._models import DEQ
from .._sensitivity import SteadyStateSensitivity
from .layers import ClassificationHead, InjectionStem, MDEQLayer, SkipPredictor
from .state import MultiscaleState


# ---------------------------------------------------------------------------- the Neural ODE baseline
class MultiscaleNeuralODE(InjectedNeuralODE):
    """The paper's baseline, the Multiscale Neural ODE with input injection: the MDEQ layer as
    vector field ``dz/dt = f(z, x)``, integrated from ``z(0) = 0`` over ``t in [0, 1]`` by a
    torchdyn ``NeuralODE`` (adaptive ``solver``, ``sensitivity='adjoint'`` by default, the
    adjoint at the forward tolerances as in the paper's CIFAR code).

    ``forward(x)`` returns ``(t_eval, trajectory)`` like torchdyn with the injected input
    stripped from the state (``trajectory[-1]`` is ``z(1)``, ``(batch, N)``). ``forward_nfe``
    is the last forward pass's NFE and ``backward_nfe()`` the evaluations since.
    """

    def __init__(self, f: MDEQLayer, injection_shape: Tuple[int, ...], solver: str = "tsit5",
                 sensitivity: str = "adjoint", atol: float = 0.05, rtol: float = 0.05):
        super().__init__(f, f.state.size, injection_shape, solver=solver, sensitivity=sensitivity, atol=atol,
                         rtol=rtol, atol_adjoint=atol, rtol_adjoint=rtol)


# ---------------------------------------------------------------------------- the classifier
class MDEQClassifier(ImplicitClassifier):
    """``images -> stem -> implicit layer -> head -> logits`` (the experiments' classifier
    protocol: ``solution``, ``aux_loss()``, ``forward_nfe()``, ``backward_stats()``).

    Args:
        stem: computes the injected input ``x`` (`InjectionStem`).
        core: a ``td.DEQ`` around an `MDEQLayer`, or a `MultiscaleNeuralODE`;
            called ``core(x)`` and returning torchdyn's ``(t_eval, trajectory)``.
        head: maps the flat final state to logits (`ClassificationHead`).

    Examples:
        >>> import torch
        >>> from torchdyn_deq.multiscale import mdeq_small
        >>> model = mdeq_small("continuous", "skip_reg")  # an untrained model may warn: capped solve
        >>> model(torch.randn(2, 3, 32, 32)).shape
        torch.Size([2, 10])
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
