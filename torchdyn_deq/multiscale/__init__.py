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
from .layers import (ClassificationHead, DownsampleBlock, InjectionStem, MDEQLayer, MultiscaleFusion, ResidualBlock,
                     SkipPredictor, UpsampleBlock)
from .state import MultiscaleState
from .zoo import (FORMS, MDEQ_LARGE, MDEQ_SMALL, VARIANTS, MDEQClassifier, MDEQConfig, MultiscaleNeuralODE, init_weights,
                  mdeq_classifier, mdeq_large, mdeq_small)

__all__ = [
    "MultiscaleState", "ResidualBlock", "DownsampleBlock", "UpsampleBlock", "MultiscaleFusion", "MDEQLayer",
    "InjectionStem", "ClassificationHead", "SkipPredictor", "MultiscaleNeuralODE", "MDEQClassifier",
    "MDEQConfig", "init_weights", "MDEQ_SMALL", "MDEQ_LARGE", "mdeq_classifier", "mdeq_small", "mdeq_large",
    "FORMS", "VARIANTS",
]
