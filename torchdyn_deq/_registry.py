"""The names accepted at the torchdyn boundary, turned into objects once."""
from __future__ import annotations

import functools
import inspect
from typing import Optional, Tuple, Union

import torch.nn as nn
from torchdyn.numerics.solvers.ode import SOLVER_DICT

from ._solution import check_failure_mode
from ._initializers import Initializer, InputInitializer, SkipRegInitializer, ZerosInitializer
from ._linear_solvers import GMRES
from ._loop import SteadyStateSolver
from ._ode import VCAB3, ODESteadyStateSolver
from ._root import AndersonAcceleration, BroydenSolver, FixedPointIteration
from ._sensitivity import (AutogradSensitivity, JacobianFreeSensitivity, PhantomSensitivity, Sensitivity,
                           SteadyStateSensitivity)

ODE_SOLVERS = ("tsit5", "dopri5", "vcab3", "euler", "midpoint", "rk4")
ROOT_SOLVERS = {"fixed_point": FixedPointIteration, "anderson": AndersonAcceleration, "broyden": BroydenSolver}
SENSITIVITIES = ("steady_state", "autograd", "jacobian_free", "phantom")
INITIALIZERS = {"zeros": ZerosInitializer, "input": InputInitializer, "skip_reg": SkipRegInitializer}


def _names(options) -> str:
    return ", ".join(repr(n) for n in options)


def make_solver(solver: Union[str, nn.Module, SteadyStateSolver], **ode_options) -> SteadyStateSolver:
    """A solver name, a torchdyn stepper instance or a `SteadyStateSolver`."""
    if isinstance(solver, SteadyStateSolver):
        return solver
    if isinstance(solver, str):
        if solver in ROOT_SOLVERS:
            return ROOT_SOLVERS[solver]()
        if solver == "vcab3":
            return VCAB3()
        if solver in ODE_SOLVERS or (solver in SOLVER_DICT and solver not in _UNSUPPORTED_TORCHDYN):
            return ODESteadyStateSolver(solver, **ode_options)
        raise ValueError(
            f"unknown solver {solver!r}; continuous (ODE) solvers: {_names(ODE_SOLVERS)}; "
            f"discrete (root) solvers: {_names(ROOT_SOLVERS)}; or pass a torchdyn stepper or SteadyStateSolver instance"
        )
    if isinstance(solver, nn.Module) and hasattr(solver, "step"):
        unsupported = {SOLVER_DICT[n] for n in _UNSUPPORTED_TORCHDYN if n in SOLVER_DICT}
        if type(solver) in unsupported:  # torchdyn turns a name into an instance before we see it
            raise ValueError(f"torchdyn's {type(solver).__name__} cannot solve to a steady state here "
                             f"({_UNSUPPORTED_REASON}); continuous (ODE) solvers: {_names(ODE_SOLVERS)}; "
                             f"discrete (root) solvers: {_names(ROOT_SOLVERS)}")
        return ODESteadyStateSolver(solver, **ode_options)
    raise TypeError(f"solver must be a name, a torchdyn stepper or a SteadyStateSolver, got {solver!r}")


_UNSUPPORTED_REASON = "implicit Euler minimises with LBFGS at every step; the leapfrog splits the state in two"
_UNSUPPORTED_TORCHDYN = ("ieuler", "implicit_euler", "alf", "AsynchronousLeapfrog")


def make_sensitivity(sensitivity: Union[str, Sensitivity], *, rtol_adjoint: Optional[float] = None,
                     atol_adjoint: Optional[float] = None, on_failure: Optional[str] = None, forward_tol: float,
                     names: Tuple[str, str, str] = ("rtol_adjoint", "atol_adjoint", "on_failure")
                     ) -> Tuple[Sensitivity, str]:
    """The door's sensitivity and its forward ``on_failure``, by one rule for every door.

    ``'steady_state'`` is ``SteadyStateSensitivity()``: GMRES at the forward tolerance, relative
    to each sample's cotangent; ``rtol_adjoint`` / ``atol_adjoint`` replace that tolerance
    (``rtol`` defaults to ``forward_tol = max(atol, rtol)`` then). ``'autograd'``,
    ``'jacobian_free'``, ``'phantom'`` (``PhantomSensitivity()``'s defaults), or an instance.
    With an instance, an adjoint option (which the instance sets itself, or does not use) is a
    ``ValueError`` naming both: which one wins is never left unsaid. The names of the
    approximate and autograd sensitivities run no linear solve: the adjoint tolerances (the
    ``'steady_state'`` backward's, on the same keyword) do not apply to them.
    ``names`` are the door's spellings of the three options, for the messages.
    """
    given = [(n, v) for n, v in zip(names[:2], (rtol_adjoint, atol_adjoint)) if v is not None]
    if isinstance(sensitivity, Sensitivity):
        own = getattr(sensitivity, "on_failure", None)
        if on_failure is not None and own is not None and on_failure != own:
            given.append((names[2], on_failure))
        if given:
            options = ", ".join(f"{n}={v!r}" for n, v in given)
            raise ValueError(f"{options} and sensitivity={sensitivity!r} both configure the backward pass: set it on the "
                             "instance (SteadyStateSensitivity(GMRES(rtol=..., atol=...), on_failure=...)), or pass "
                             f"sensitivity='steady_state' with {options}")
        return sensitivity, check_failure_mode(on_failure or own or "warn")
    on_failure = check_failure_mode("warn" if on_failure is None else on_failure)
    if sensitivity == "steady_state":
        linear = None if not given else GMRES(rtol=forward_tol if rtol_adjoint is None else rtol_adjoint,
                                                atol=atol_adjoint or 0.0)
        return SteadyStateSensitivity(linear, on_failure=on_failure), on_failure
    made = {"autograd": AutogradSensitivity, "jacobian_free": JacobianFreeSensitivity,
            "phantom": PhantomSensitivity}.get(sensitivity) if isinstance(sensitivity, str) else None
    if made is None:
        hint = ""
        if sensitivity in ("adjoint", "interpolated_adjoint"):
            hint = " (a backsolve from t = infinity has no meaning; the steady-state VJP replaces it)"
        raise ValueError(f"unknown sensitivity {sensitivity!r}{hint}; valid: {_names(SENSITIVITIES)} or a Sensitivity instance")
    return made(), on_failure


def torchdyn_stepper(solver: SteadyStateSolver):
    """The torchdyn stepper (name or instance) that integrates over finite times what ``solver``
    integrates to the steady state: its own for `ODESteadyStateSolver`, ``'tsit5'`` otherwise."""
    return solver.stepper if isinstance(solver, ODESteadyStateSolver) else "tsit5"


def steady_state_solver(method: str, options: dict):
    """The package's solver ``method`` built with ``options`` (its constructor's keywords);
    unknown options are a ``ValueError`` that lists the valid ones. Built once per
    configuration (a functional call reuses it, as a model reuses its own solver), when the
    options are hashable."""
    cls = ROOT_SOLVERS.get(method) or (VCAB3 if method == "vcab3" else ODESteadyStateSolver)
    valid = _constructor_options(cls)
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ValueError(f"unknown options {unknown} for method={method!r}; valid options: {list(valid)}")
    try:
        return _built(method, tuple(sorted(options.items())))
    except TypeError:  # an unhashable option value: built for this call only
        return _build(method, options)


def _build(method: str, options: dict):
    if method in ROOT_SOLVERS:
        return ROOT_SOLVERS[method](**options)
    return VCAB3(**options) if method == "vcab3" else ODESteadyStateSolver(method, **options)


@functools.lru_cache(maxsize=64)
def _built(method: str, options: tuple):
    return _build(method, dict(options))


@functools.lru_cache(maxsize=None)
def _constructor_options(cls: type) -> Tuple[str, ...]:
    """The keyword names of ``cls``'s constructors along its MRO (the solver's options)."""
    return tuple(sorted({name for klass in type.mro(cls) if "__init__" in vars(klass)
                         for name, p in inspect.signature(klass.__init__).parameters.items()
                         if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)} - {"self", "stepper"}))


def make_initializer(initializer: Union[str, Initializer]) -> Initializer:
    """``'zeros'``, ``'input'``, ``'skip_reg'``, or an `Initializer` (``SkipInitializer(predictor)``)."""
    if isinstance(initializer, Initializer):
        return initializer
    if initializer in INITIALIZERS:
        return INITIALIZERS[initializer]()
    hint = " (a Skip DEQ needs its predictor: pass SkipInitializer(predictor))" if initializer == "skip" else ""
    raise ValueError(f"unknown initializer {initializer!r}{hint}; valid: {_names(INITIALIZERS)} or an Initializer instance")
