"""Weight and spectral normalisation of a DEQ layer, computed once per forward pass.

On PyTorch's parametrizations (``torch.nn.utils.parametrizations``): the normalised weight
is a function of stored tensors (``parametrizations.weight.original*``), so ``state_dict``,
``copy.deepcopy``, DDP and ``torch.compile`` see ordinary parameters. A parametrized weight
is recomputed at every access, i.e. at every solver iteration; the DEQ models compute it
once per solve instead (`computed_once`), which also makes the spectral norm's power
iteration advance once per forward pass, as in training a feed-forward layer.
"""
from __future__ import annotations

import contextlib
from typing import Iterable, Iterator, List

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils import parametrizations, parametrize

from ._checks import non_negative_float, one_of, positive_int

NORMS = ("weight_norm", "spectral_norm")
# torch's keyword options of each, with their checks
_OPTIONS = {
    "weight_norm": {"dim": None},
    "spectral_norm": {"dim": None, "n_power_iterations": positive_int, "eps": non_negative_float},
}
# the layers torchdeq normalises; a transposed convolution's output channels are its dimension 1
_TARGETS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
_TRANSPOSED = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_KINDS = "_deq_norms"  # module attribute: {tensor name: norm} of what apply_norm added


def apply_norm(module: nn.Module, norm: str = "weight_norm", *, names: Iterable[str] = ("weight",),
               exclude: Iterable[str] = (), **options) -> List[str]:
    """Normalise the weights of every ``Linear`` / ``Conv`` / ``ConvTranspose`` layer in ``module``.

    ``'weight_norm'``: ``w = g v / ||v||`` with ``||.||`` over all dimensions but ``dim``
    (Salimans and Kingma, 2016): ``g`` and ``v`` are trained, the direction and the scale
    decoupled. ``'spectral_norm'``: ``w = W / sigma(W)``, ``sigma`` the largest singular
    value estimated by power iteration (Miyato et al., 2018), which bounds the Lipschitz
    constant of a linear layer by 1. Both on ``torch.nn.utils.parametrizations``.

    Args:
        module: the DEQ layer (or any module); changed in place.
        norm: ``'weight_norm'`` (default, the normalisation torchdeq's and Bai et al.'s DEQ
            examples use) or ``'spectral_norm'``.
        names: parameter names to normalise in each layer. Default ``('weight',)``.
        exclude: qualified submodule names (as in ``named_modules()``) left alone with
            their children, e.g. ``('encoder',)`` (torchdeq's ``prefix_filter_out``).
        **options: torch's options of that norm: ``dim`` for ``'weight_norm'`` (default 0,
            1 for transposed convolutions, torch's choice); ``dim``, ``n_power_iterations``
            (default 1) and ``eps`` (default 1e-12) for ``'spectral_norm'``. Any other keyword
            is refused.

    Returns:
        The qualified names of the normalised tensors, e.g. ``['lin.weight']``.

    Raises:
        ValueError: an unknown ``norm``; nothing to normalise; a tensor already parametrized.
        TypeError: an option that ``norm`` does not take.
    """
    one_of("norm", norm, NORMS)
    valid = _OPTIONS[norm]
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise TypeError(f"apply_norm(..., {norm!r}) got unknown options {unknown}; {norm} takes "
                        f"{', '.join(valid)}")
    for key, check in valid.items():
        if key in options and check is not None:
            options[key] = check(key, options[key])
    names, exclude = tuple(names), tuple(exclude)
    done = []
    for qualified, layer in module.named_modules():
        if not isinstance(layer, _TARGETS + _TRANSPOSED) or any(
                qualified == e or qualified.startswith(e + ".") for e in exclude):
            continue
        for name in names:
            if not isinstance(getattr(layer, name, None), torch.Tensor):
                continue
            if parametrize.is_parametrized(layer, name):
                raise ValueError(f"{qualified or type(layer).__name__}.{name} is already parametrized; "
                                 "call remove_norm(module) first")
            kwargs = dict(options)
            if norm == "weight_norm":
                kwargs.setdefault("dim", 1 if isinstance(layer, _TRANSPOSED) else 0)
                parametrizations.weight_norm(layer, name, **kwargs)
            else:
                parametrizations.spectral_norm(layer, name, **kwargs)
            layer.__dict__.setdefault(_KINDS, {})[name] = norm
            done.append(f"{qualified}.{name}" if qualified else name)
    if not done:
        raise ValueError(f"apply_norm found nothing to normalise in {type(module).__name__}: no Linear, Conv or "
                         f"ConvTranspose layer with a tensor named {list(names)} outside exclude={list(exclude)}")
    return done


def _normed(module: nn.Module) -> Iterator:
    for layer in module.modules():
        for name, norm in getattr(layer, _KINDS, {}).items():
            yield layer, name, norm


def remove_norm(module: nn.Module) -> List[str]:
    """Undo `apply_norm`: each normalised weight becomes a plain parameter holding its
    current normalised value (the model computes the same function). A weight that carries
    another parametrization stacked with the norm is refused (``ValueError``): torch removes a
    tensor's parametrizations only all together. Returns the qualified names of the tensors
    restored, as `apply_norm` returned them."""
    qualified = {id(m): n for n, m in module.named_modules()}
    normed = list(_normed(module))
    for layer, name, _ in normed:
        if len(layer.parametrizations[name]) > 1:
            raise ValueError(f"{qualified[id(layer)] + '.' if qualified[id(layer)] else ''}{name} carries "
                             f"{len(layer.parametrizations[name])} parametrizations: remove_norm would remove them all; "
                             "remove the others first (torch.nn.utils.parametrize.remove_parametrizations)")
    done = []
    for layer, name, _ in normed:
        parametrize.remove_parametrizations(layer, name, leave_parametrized=True)
        prefix = qualified[id(layer)]
        done.append(f"{prefix}.{name}" if prefix else name)
    for layer in module.modules():
        layer.__dict__.pop(_KINDS, None)
    return done


def reset_norm(module: nn.Module, n_power_iterations: int = 15) -> int:
    """Restart the power iteration of every spectral norm `apply_norm` added: new random
    singular vectors, refined by ``n_power_iterations`` iterations on the current weight.

    Needed after changing the weights outside training (loading other weights into
    ``original``, a manual edit): the one power iteration per forward pass would need many
    passes to catch up. torchdeq users call their ``reset_norm`` before every forward pass
    to recompute the normalised weights; here the models do that themselves
    (`computed_once`). Weight norm has no state to reset.

    Args:
        n_power_iterations: default ``15``, what torch runs when it registers a spectral norm.

    Returns:
        The number of spectral norms reset.
    """
    n_power_iterations = positive_int("n_power_iterations", n_power_iterations)
    count = 0
    with torch.no_grad():
        for layer, name, norm in _normed(module):
            if norm != "spectral_norm":
                continue
            sn = layer.parametrizations[name][0]
            weight = layer.parametrizations[name].original
            matrix = weight.movedim(sn.dim, 0).flatten(1)
            v = F.normalize(torch.randn_like(sn._v), dim=0, eps=sn.eps)
            for _ in range(n_power_iterations):
                u = F.normalize(matrix @ v, dim=0, eps=sn.eps)
                v = F.normalize(matrix.T @ u, dim=0, eps=sn.eps)
            sn._u.copy_(u)
            sn._v.copy_(v)
            count += 1
    return count


@contextlib.contextmanager
def computed_once(module: nn.Module):
    """Within the block every parametrized tensor of ``module`` is computed once, now,
    with the caller's gradient mode, and reused (``torch.nn.utils.parametrize.cached``).

    Computing them on entry, not at first use, matters for implicit models: the solve runs
    under ``torch.no_grad()``, and a weight first computed there would be cached without
    its graph, leaving the evaluation at ``z*`` (and so the gradients) without it."""
    layers = [layer for layer in module.modules() if parametrize.is_parametrized(layer)]
    if not layers:
        yield
        return
    with parametrize.cached():
        for layer in layers:
            for name in layer.parametrizations:
                getattr(layer, name)
        yield
