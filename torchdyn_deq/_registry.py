"""The names accepted at the torchdyn boundary, turned into objects once."""
from __future__ import annotations

from typing import Union

import torch.nn as nn
from torchdyn.numerics.solvers.ode import SOLVER_DICT

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


def make_sensitivity(sensitivity: Union[str, Sensitivity], rtol_adjoint: float, atol_adjoint: float,
                     on_failure: str) -> Sensitivity:
    """``'steady_state'`` (GMRES at the adjoint tolerances), ``'autograd'``, ``'jacobian_free'``
    and ``'phantom'`` (approximate; ``PhantomSensitivity()``'s defaults), or an instance."""
    if isinstance(sensitivity, Sensitivity):
        return sensitivity
    if sensitivity == "steady_state":
        return SteadyStateSensitivity(GMRES(rtol=rtol_adjoint, atol=atol_adjoint), on_failure=on_failure)
    if sensitivity == "autograd":
        return AutogradSensitivity()
    if sensitivity == "jacobian_free":
        return JacobianFreeSensitivity()
    if sensitivity == "phantom":
        return PhantomSensitivity()
    hint = ""
    if sensitivity in ("adjoint", "interpolated_adjoint"):
        hint = " (a backsolve from t = infinity has no meaning; the steady-state VJP replaces it)"
    raise ValueError(f"unknown sensitivity {sensitivity!r}{hint}; valid: {_names(SENSITIVITIES)} or a Sensitivity instance")


def make_initializer(initializer: Union[str, Initializer]) -> Initializer:
    """``'zeros'``, ``'input'``, ``'skip_reg'``, or an `Initializer` (``SkipInitializer(predictor)``)."""
    if isinstance(initializer, Initializer):
        return initializer
    if initializer in INITIALIZERS:
        return INITIALIZERS[initializer]()
    hint = " (a Skip DEQ needs its predictor: pass SkipInitializer(predictor))" if initializer == "skip" else ""
    raise ValueError(f"unknown initializer {initializer!r}{hint}; valid: {_names(INITIALIZERS)} or an Initializer instance")
