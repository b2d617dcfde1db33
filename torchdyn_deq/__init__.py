"""Continuous Deep Equilibrium Models (infinite-time Neural ODEs) for torchdyn."""
from ._adams import VCAB3, adams_bashforth_weights
from ._initializers import (Initializer, InputInitializer, SkipInitializer, SkipRegInitializer,
                            ZerosInitializer)
from ._linear_solvers import GMRES, DirectSolver, FixedPointSolver, LinearSolveInfo, LinearSolver
from ._models import DEQ, DEQVectorField, InfiniteTimeNeuralODE
from ._regularizers import JacobianPenalty, spectral_radius
from ._root_solvers import AndersonAcceleration, BroydenSolver, FixedPointIteration, RootSolver
from ._sensitivity import AutogradSensitivity, JacobianFreeSensitivity, Sensitivity, SteadyStateSensitivity
from ._solution import ConvergenceError, ConvergenceWarning, NonFiniteError, SteadyStateSolution
from ._steady_state import ODESteadyStateSolver, SteadyStateSolver, scaled_residual
from ._vcab3_stepper import VCAB3Stepper
from ._torchdyn import install as _install_torchdyn, register_sensitivity, register_solver
from ._odeint import odeint_steady_state
from . import multiscale
from .multiscale import (MDEQClassifier, MDEQLayer, MultiscaleNeuralODE, MultiscaleState, mdeq_large,
                         mdeq_small)

__version__ = "0.1.0"

_install_torchdyn()  # 'steady_state', 'jacobian_free', 'vcab3' become torchdyn names (idempotent)

__all__ = [
    "InfiniteTimeNeuralODE", "DEQ", "DEQVectorField",
    "SteadyStateSolver", "ODESteadyStateSolver", "VCAB3", "adams_bashforth_weights", "RootSolver", "FixedPointIteration",
    "AndersonAcceleration", "BroydenSolver", "scaled_residual",
    "Sensitivity", "SteadyStateSensitivity", "AutogradSensitivity", "JacobianFreeSensitivity",
    "LinearSolver", "GMRES", "FixedPointSolver", "DirectSolver", "LinearSolveInfo",
    "Initializer", "ZerosInitializer", "InputInitializer", "SkipInitializer", "SkipRegInitializer",
    "JacobianPenalty", "spectral_radius",
    "SteadyStateSolution", "ConvergenceWarning", "ConvergenceError", "NonFiniteError",
    "register_sensitivity", "register_solver", "VCAB3Stepper", "odeint_steady_state",
    "multiscale", "MultiscaleState", "MDEQLayer", "MDEQClassifier", "MultiscaleNeuralODE", "mdeq_small", "mdeq_large",
    "__version__",
]
