"""`Field`: the vector field ``g(t, z)`` of one solve, as every door hands it to the core.

It is the user's layer or vector field with its injected input, and owns what every door
needs of it exactly once: the count of evaluations, the check of what the user's function
returns, and the restriction to a subset of the batch (per-sample termination).
"""
from __future__ import annotations

from typing import Callable, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from torch import Tensor

from ._dropout import dropout_modules

# (owner, attribute): a batch-shaped tensor the field reads, restricted with the batch
Slot = Tuple[object, str]


class Field:
    """``g(t, z)`` of one solve.

    ``fn(t, z)`` is the user's function: the layer ``f(z, x)`` (``residual=True``: then
    ``g = f - z``, the DEQ form) or the vector field ``dz/dt`` itself. Its output is checked at
    the first evaluation (and the first after a restriction) against the state's shape and
    dtype: later evaluations trust it, so the check costs nothing per step.

    Attributes:
        nfe: evaluations so far, the one count of this solve (the record's ``nfe`` and
            torchdyn's ``vf.nfe`` are read from it).

    Args:
        fn: ``fn(t, z)``, ``t`` a 0-dim tensor.
        like: a tensor of the state's dtype and device (``t`` given as a float is made one).
        residual: ``g = fn - z``.
        slots: ``(owner, name)`` of the batch-shaped tensors ``fn`` reads (the injected input,
            variational dropout masks), restricted with the batch by `restrict`.
        label: how error messages name ``fn``.
        injected: whether an input is injected into ``fn`` (``None``: not known, a closure), read
            by the failure messages: without one, the steady state cannot depend on the input.
    """

    def __init__(self, fn: Callable[[Tensor, Tensor], Tensor], like: Tensor, *, residual: bool = False,
                 slots: Sequence[Slot] = (), label: str = "the vector field", injected: Optional[bool] = None):
        self.fn, self.residual, self.label, self.injected, self.nfe = fn, residual, label, injected, 0
        self.dtype, self.device = like.dtype, like.device
        self.slots = list(slots)
        self._full: Optional[List] = None  # the slots' full-batch tensors while restricted
        self.checked = False

    def __call__(self, t, z: Tensor) -> Tensor:
        # a compiled step counts its evaluations afterwards (`add`): a counter read while tracing
        # is a guard on its value, a recompile per step
        counting = not torch.compiler.is_compiling()
        if counting:
            self.nfe += 1
        if not isinstance(t, Tensor) and not self.residual:  # the DEQ form's f does not read t
            t = torch.full((), t, dtype=self.dtype, device=self.device)
        out = self.fn(t, z)
        if counting and not self.checked:
            self._check(out, z)
            self.checked = True
        return out - z if self.residual else out

    def add(self, n: int) -> None:
        """Count ``n`` evaluations made inside a compiled step."""
        self.nfe += n

    def _check(self, out, z: Tensor) -> None:
        check_output(out, z, residual=self.residual, label=self.label)

    def restrict(self, rows: Optional[Tensor]) -> None:
        """Evaluate on the samples ``rows`` of the full batch from now on (``None``: all of them
        again): the slots' tensors are restricted to those rows (read when first restricted, so a
        dropout mask drawn at the first evaluation is among them), and the next output is checked
        again (a field that ignores the restriction is an error, not a wrong answer)."""
        if rows is None:
            if self._full is not None:
                for (owner, name), full in zip(self.slots, self._full):
                    setattr(owner, name, full)
                self._full = None
        else:
            if self._full is None:
                self._full = [getattr(owner, name, None) for owner, name in self.slots]
            for (owner, name), full in zip(self.slots, self._full):
                if full is not None:
                    setattr(owner, name, full.index_select(0, rows))
        self.checked = False


def check_output(out, z: Tensor, *, residual: bool, label: str) -> None:
    """What a user's function must return for a state ``z``: a tensor of its shape and dtype
    (``residual``: the layer ``f(z, x)`` of the DEQ form, whose dtype autocast may change)."""
    form = "f(z, x)" if residual else "dz/dt"
    if not isinstance(out, Tensor):
        raise TypeError(f"{label} returned {type(out).__name__}: {form} must return a tensor shaped like z")
    if out.shape != z.shape:  # for the DEQ form, f - z would broadcast to a wrong steady state
        hint = " (set state_shape= if the state differs from x)" if residual else ""
        raise ValueError(f"{label} returned {tuple(out.shape)} for a state of shape {tuple(z.shape)}; "
                         f"{form} must have the state's shape{hint}")
    # under autocast f's dtype changes on purpose, and f - z promotes it back; dz/dt itself must not
    if out.dtype != z.dtype and not (residual and torch.is_autocast_enabled(z.device.type)):
        raise TypeError(f"{label} returned dtype {out.dtype} for a state of dtype {z.dtype}")


def _mask_slots(module: Optional[nn.Module]) -> List[Slot]:
    return [(m, "mask") for m in dropout_modules(module)] if module is not None else []


class _Input:
    """Holds the DEQ's injected input, so that a restriction can swap it."""

    __slots__ = ("x",)

    def __init__(self, x: Tensor):
        self.x = x


def layer_field(f: Callable[[Tensor, Tensor], Tensor], x: Tensor, like: Tensor,
                module: Optional[nn.Module] = None) -> Field:
    """The DEQ form ``g(t, z) = f(z, x) - z`` (``module``: where ``f``'s dropout masks live)."""
    holder = _Input(x)
    return Field(lambda t, z: f(z, holder.x), like, residual=True, slots=[(holder, "x"), *_mask_slots(module)],
                 label="the DEQ layer f", injected=True)


def module_field(vf: Callable, like: Tensor, args: Optional[dict] = None, order: int = 1,
                 module: Optional[nn.Module] = None) -> Field:
    """A torchdyn-style vector field ``vf(t, z, args=args)``, as torchdyn's ``DEFunc`` calls it
    (``t`` set on ``DepthCat``-like submodules, ``order > 1``: the state ``[q, q', ...]`` and
    ``vf`` its highest derivative), with the module scan done once per solve instead of once
    per evaluation. Modules with an injected input (torchdyn's ``DataControl``: ``_control``)
    and variational dropout masks are restricted with the batch."""
    args = {} if args is None else args
    scanned = vf if isinstance(vf, nn.Module) else module
    named = list(scanned.named_modules()) if scanned is not None else []
    timed = [m for _, m in named if hasattr(m, "t")]
    slots = [(m, "_control") for _, m in named if getattr(m, "_control", None) is not None]

    def fn(t: Tensor, z: Tensor) -> Tensor:
        for m in timed:
            m.t = t
        return vf(t, z, args=args)

    if order > 1:
        first = fn

        def fn(t: Tensor, z: Tensor) -> Tensor:  # d[q, q', ...]/dt = [q', ..., vf(t, [q, q', ...])]
            size = z.shape[1] // order
            return torch.cat([z[:, size:], first(t, z)], 1)

    label = "the vector field" if order == 1 else f"the vector field (its order-{order} derivative, state [q, q', ...])"
    return Field(fn, like, slots=[*slots, *_mask_slots(scanned)], label=label, injected=bool(slots))
