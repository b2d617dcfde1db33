"""Compiled step bodies: one solver step (its vector-field evaluations and the arithmetic around
them) fused by ``torch.compile``, with an eager fallback.

At the paper's size (batch 32, width 128) one evaluation of ``f`` costs about 50 us and each
tensor operation 2-5 us of dispatch, so a step's few dozen small operations cost more than its
evaluations. Compiled, a step is one call: the guards, then one generated kernel sequence.

What stays outside: everything the host reads (the loop's one synchronisation per step), so a
compiled body takes every number that changes between steps (the step size, the time, the
Adams weights) as a tensor, and its graph does not depend on them: one compile per shape,
dtype, device, grad mode and variant (`compiles` counts them).

CUDA graphs (``mode="reduce-overhead"``) are not used: a graph replay overwrites the outputs of
the previous one, and the loop keeps earlier iterates (the best iterate, VCAB3's history), so
every output would need a copy; untested without a GPU, left for a machine with one.
"""
from __future__ import annotations

import copy
import dataclasses
import warnings
from typing import Callable, Dict, Hashable, Optional, Tuple

import torch
from torch import Tensor


class CompileFallbackWarning(UserWarning):
    """A step body could not be compiled (or recompiles on every call) and runs eagerly."""


MAX_COMPILES_PER_KEY = 2  # train and eval mode of the layer
RECOMPILE_LIMIT = 64  # torch's default of 8 compiled versions per function is below one body's variants

_COMPILED: Dict[Callable, Callable] = {}  # one compiled function per body, shared by every solver
_compiles = 0  # graphs compiled by the counting backend, over all bodies


def _counting_backend(gm, example_inputs):
    """Inductor, counting the graphs it compiles (the recompile counter)."""
    from torch._inductor.compile_fx import compile_fx

    global _compiles
    _compiles += 1
    return compile_fx(gm, example_inputs)


def compiles() -> int:
    """How many graphs the compiled steps have compiled in this process."""
    return _compiles


def _compiled(fn: Callable) -> Callable:
    if fn not in _COMPILED:
        # a step body has a few variants per shape, dtype and grad mode; past torch's per-function limit
        # dynamo would run it eagerly without saying so to us
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
        _COMPILED[fn] = torch.compile(fn, backend=_counting_backend, dynamic=False)
    return _COMPILED[fn]


def _key(x) -> Hashable:
    if isinstance(x, Tensor):
        return (tuple(x.shape), x.dtype, x.device, x.requires_grad)
    if isinstance(x, (tuple, list)):
        return tuple(_key(y) for y in x)
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        # its fields' values, as the graph reads them (the loop's SolveOptions: the stop test's tolerances
        # are constants of a compiled step that fuses it)
        return (type(x),) + tuple(_key(getattr(x, f.name)) for f in dataclasses.fields(x))
    return x if isinstance(x, (bool, int, float, str, type(None))) else type(x)


class CompiledStep:
    """``fn`` through ``torch.compile`` (inductor), called as ``step(variant, *args)``.

    ``variant`` names the static choices of the call (which branch of the body, hashable); with
    the tensor arguments' shapes, dtypes, devices and grad requirements and the grad mode it
    forms the call's key, with the other arguments' values (tolerances) or types. The compiled
    function is shared by every solver of a family (a new model of the same shapes compiles
    nothing). A key may compile twice (the layer's train and eval modes are two graphs, which the
    key cannot see); a third compile for it means the body's graph depends on Python state that
    changes between calls (a counter on the user's layer, a float read in it): the step then
    runs eagerly, with one `CompileFallbackWarning`, as it does when compilation fails (no C++
    compiler, an unsupported operation) and the eager call succeeds.
    """

    def __init__(self, fn: Callable, name: str):
        self.fn, self.name = fn, name
        self.failed = ""  # why the step runs eagerly
        self._compiles: Dict[Hashable, int] = {}  # graphs compiled per key

    def __call__(self, variant: Hashable, *args, evaluations: Tuple = ()):
        """``fn(*args)``; ``evaluations = (count, n)``: the compiled body made ``n`` evaluations
        of the loop's counted field ``count``, which it could not count while traced (an eager
        call counts its own)."""
        if self.failed:
            return self.fn(*args)
        key = (variant, torch.is_grad_enabled(), _key(args))
        before = _compiles
        try:
            out = _compiled(self.fn)(*args)
        except Exception as error:  # noqa: BLE001 - compile errors come in many types; eager decides
            out = self.fn(*args)  # a genuine error of the body raises here, as it would eagerly
            self._fall_back(f"compilation failed ({type(error).__name__}: {str(error).strip().splitlines()[0][:200]})")
            return out
        if evaluations:
            evaluations[0].add(evaluations[1])
        if _compiles > before:
            self._compiles[key] = self._compiles.get(key, 0) + 1
            if self._compiles[key] > MAX_COMPILES_PER_KEY:
                self._fall_back("it recompiles for calls of the same shapes: its graph depends on Python state that "
                                "changes between calls (e.g. a counter attribute on the layer, `self.calls += 1`)")
        return out

    def _fall_back(self, reason: str) -> None:
        self.failed = reason
        warnings.warn(f"the compiled {self.name} step runs eagerly from now on: {reason}. Results are unchanged; "
                      "pass compile=False to silence this", CompileFallbackWarning, stacklevel=4)


def with_compile(solver, compile: Optional[bool]):
    """``solver`` with its ``compile`` option set to ``compile`` (a copy when that changes it;
    ``None`` keeps the solver's own). The models' ``compile=`` keyword."""
    if compile is None or getattr(solver, "compile", False) is compile:  # False: a solver without a compiled step
        return solver
    if not isinstance(compile, bool):
        raise TypeError(f"compile must be True, False or None, got {compile!r}")
    if not hasattr(solver, "compile") or (compile and not getattr(solver, "adaptive", True)):
        raise ValueError(f"compile=True: {solver!r} has no compiled step; the adaptive time-steppers have one "
                         "(solver='tsit5', 'dopri5', 'vcab3')")
    solver = copy.copy(solver)
    solver.__dict__.pop("_steps", None)  # the copy compiles its own
    solver.compile = compile
    return solver
