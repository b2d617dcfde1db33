"""Continuous Deep Equilibrium Models (infinite-time Neural ODEs) for torchdyn.

The top level holds what a user constructs, passes or catches; the machinery behind it (the one
solve loop, step control, tableaus, solver base classes, ...) is importable
from its module (``torchdyn_deq._loop``, ``torchdyn_deq._ode``, ...). Multiscale models live
in ``torchdyn_deq.multiscale``.
"""
from ._dropout import (VariationalDropout, VariationalDropout1d, VariationalDropout2d, VariationalDropout3d,
                       reset_dropout)
from ._initializers import (Initializer, InputInitializer, SkipInitializer, SkipRegInitializer,
                            ZerosInitializer)
from ._linear_solvers import GMRES, DirectSolver, FixedPointSolver, LinearSolveInfo, LinearSolver
from ._field import Field
from ._implicit import implicit_solve
from ._models import DEQ, InfiniteTimeNeuralODE
from ._norms import apply_norm, remove_norm, reset_norm
from ._ode import VCAB3, ODESteadyStateSolver
from ._regularizers import JacobianPenalty, spectral_radius
from ._root import AndersonAcceleration, BroydenSolver, FixedPointIteration
from ._sensitivity import (AutogradSensitivity, JacobianFreeSensitivity, PhantomSensitivity, Sensitivity,
                           SteadyStateSensitivity)
from ._solution import ConvergenceError, ConvergenceWarning, NonFiniteError, Result, SolveOptions, SteadyStateSolution
from ._trajectory import TrajectorySupervision, correction_loss
from ._vcab3_stepper import VCAB3Stepper
from ._torchdyn import install as _install_torchdyn, register_sensitivity, register_solver
from ._odeint import odeint_steady_state
from . import multiscale

__version__ = "0.1.0"

_install_torchdyn()  # 'steady_state', 'jacobian_free', 'vcab3' become torchdyn names (idempotent)

__all__ = [
    # models and the functional door
    "InfiniteTimeNeuralODE", "DEQ",
    "odeint_steady_state",
    # the one core under every door: implicit_solve(Field(...), z0, solver, SolveOptions(...), sensitivity)
    "implicit_solve", "Field", "SolveOptions",
    # forward solvers (solver=)
    "ODESteadyStateSolver", "VCAB3", "FixedPointIteration", "AndersonAcceleration", "BroydenSolver",
    # sensitivities (sensitivity=) and the linear solvers of the implicit backward (LinearSolveInfo: what a
    # custom LinearSolver returns)
    "Sensitivity", "SteadyStateSensitivity", "AutogradSensitivity", "JacobianFreeSensitivity", "PhantomSensitivity",
    "LinearSolver", "LinearSolveInfo", "GMRES", "FixedPointSolver", "DirectSolver",
    # initializers (initializer=)
    "Initializer", "ZerosInitializer", "InputInitializer", "SkipInitializer", "SkipRegInitializer",
    # regularization, normalisation and dropout inside the layer
    "JacobianPenalty", "spectral_radius",
    "apply_norm", "reset_norm", "remove_norm",
    "VariationalDropout", "VariationalDropout1d", "VariationalDropout2d", "VariationalDropout3d", "reset_dropout",
    # trajectory supervision
    "TrajectorySupervision", "correction_loss",
    # the solution record, its result, and what a failed solve raises or warns
    "SteadyStateSolution", "Result", "ConvergenceWarning", "ConvergenceError", "NonFiniteError",
    # torchdyn: registration and the VCAB3 stepper
    "register_sensitivity", "register_solver", "VCAB3Stepper",
    # subpackages
    "multiscale",
    "__version__",
]
