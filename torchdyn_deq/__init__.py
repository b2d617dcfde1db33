"""Continuous Deep Equilibrium Models (infinite-time Neural ODEs) for torchdyn."""
from ._dropout import (VariationalDropout, VariationalDropout1d, VariationalDropout2d, VariationalDropout3d,
                       reset_dropout)
from ._initializers import (Initializer, InputInitializer, SkipInitializer, SkipRegInitializer,
                            ZerosInitializer)
from ._linear_solvers import GMRES, DirectSolver, FixedPointSolver, LinearSolveInfo, LinearSolver
from ._loop import SteadyStateSolver, scaled_residual, steady_state_solve
from ._field import Field
from ._implicit import implicit_solve
from ._models import DEQ, DEQVectorField, InfiniteTimeNeuralODE
from ._norms import apply_norm, remove_norm, reset_norm
from ._ode import VCAB3, ODESteadyStateSolver, Tableau, adams_bashforth_weights
from ._regularizers import JacobianPenalty, spectral_radius
from ._root import AndersonAcceleration, BroydenSolver, FixedPointIteration, RootSolver
from ._sensitivity import (AutogradSensitivity, JacobianFreeSensitivity, PhantomSensitivity, Sensitivity,
                           SteadyStateSensitivity)
from ._solution import (ConvergenceError, ConvergenceWarning, NonFiniteError, Result, SavedState, SolveOptions,
                        SteadyStateSolution)
from ._step_control import StabilityRegion, StepController
from ._trajectory import TrajectorySupervision, correction_loss
from ._vcab3_stepper import VCAB3Stepper
from ._torchdyn import install as _install_torchdyn, register_sensitivity, register_solver
from ._odeint import odeint_steady_state
from . import multiscale
from .multiscale import (MDEQClassifier, MDEQLayer, MultiscaleNeuralODE, MultiscaleState, mdeq_large,
                         mdeq_small)

__version__ = "0.1.0"

_install_torchdyn()  # 'steady_state', 'jacobian_free', 'vcab3' become torchdyn names (idempotent)

__all__ = [
    "InfiniteTimeNeuralODE", "DEQ", "DEQVectorField", "implicit_solve", "Field",
    "steady_state_solve", "SolveOptions", "Result", "StepController", "StabilityRegion", "Tableau",
    "SteadyStateSolver", "ODESteadyStateSolver", "VCAB3", "adams_bashforth_weights", "RootSolver", "FixedPointIteration",
    "AndersonAcceleration", "BroydenSolver", "scaled_residual",
    "Sensitivity", "SteadyStateSensitivity", "AutogradSensitivity", "JacobianFreeSensitivity", "PhantomSensitivity",
    "LinearSolver", "GMRES", "FixedPointSolver", "DirectSolver", "LinearSolveInfo",
    "Initializer", "ZerosInitializer", "InputInitializer", "SkipInitializer", "SkipRegInitializer",
    "JacobianPenalty", "spectral_radius",
    "apply_norm", "reset_norm", "remove_norm",
    "VariationalDropout", "VariationalDropout1d", "VariationalDropout2d", "VariationalDropout3d", "reset_dropout",
    "TrajectorySupervision", "correction_loss",
    "SteadyStateSolution", "SavedState", "ConvergenceWarning", "ConvergenceError", "NonFiniteError",
    "register_sensitivity", "register_solver", "VCAB3Stepper", "odeint_steady_state",
    "multiscale", "MultiscaleState", "MDEQLayer", "MDEQClassifier", "MultiscaleNeuralODE", "mdeq_small", "mdeq_large",
    "__version__",
]
