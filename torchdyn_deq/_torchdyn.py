"""This package's names in torchdyn: registered on ``import torchdyn_deq``, once.

- ``sensitivity='steady_state'`` / ``'jacobian_free'`` (every name of `_registry.SENSITIVITIES`
  but torchdyn's own ``'autograd'``) and any `Sensitivity` instance, in torchdyn's
  ``ODEProblem`` / ``NeuralODE`` with ``t_span = [t0, inf]``;
- ``solver='vcab3'`` (`VCAB3Stepper`) in torchdyn's ``SOLVER_DICT``;
- an unknown sensitivity name is a ``ValueError`` at construction.

torchdyn with the registry of ``upstream/torchdyn`` (``torchdyn.numerics.registry``) calls it
itself; we only register. Today's torchdyn does not: a shim wraps the four methods where
torchdyn would call it and its functional ``odeint`` (`_install_call_sites`), using the same
registry module. ``str_to_solver``'s bare ``KeyError`` for unknown names is left to upstream.
"""
from __future__ import annotations

import functools
import importlib
import importlib.util
import inspect
from typing import Callable, Optional, Tuple, Union

import torch
from torch import Tensor
from torchdyn.numerics.solvers.ode import SOLVER_DICT

from . import _torchdyn_registry
from ._ode import VCAB3, ODESteadyStateSolver
from ._models import InfiniteTimeNeuralODE
from ._registry import ODE_SOLVERS, ROOT_SOLVERS, SENSITIVITIES
from ._sensitivity import Sensitivity
from ._vcab3_stepper import VCAB3Stepper

# our names at the torchdyn boundary: a name added to _registry.SENSITIVITIES is registered too
STEADY_STATE_SENSITIVITIES = tuple(n for n in SENSITIVITIES if n not in _torchdyn_registry.BUILTIN_SENSITIVITIES)
SOLVERS = {"vcab3": VCAB3Stepper}
_HOOK = "_torchdyn_deq_hook"  # marks the shim's wrappers, so installing twice wraps once
_state = {"hooks": None}


def hooks() -> Optional[str]:
    """``'torchdyn'`` when torchdyn calls its own registry, ``'shim'`` when ours wraps its
    methods, ``None`` before `install`."""
    return _state["hooks"]


def registry():
    """The registry torchdyn uses: its own (``torchdyn.numerics.registry``) if it has one."""
    if importlib.util.find_spec("torchdyn.numerics.registry") is not None:
        return importlib.import_module("torchdyn.numerics.registry")
    return _torchdyn_registry


def install() -> str:
    """Register this package's sensitivities and solvers with torchdyn. Idempotent."""
    if _state["hooks"] is not None:
        return _state["hooks"]
    reg = registry()
    if reg is _torchdyn_registry:
        _install_call_sites()
    for name in STEADY_STATE_SENSITIVITIES:
        reg.register_sensitivity(name, steady_state_factory)
    reg.register_sensitivity(Sensitivity, steady_state_factory)
    for name, cls in SOLVERS.items():
        reg.register_solver(name, cls)
    _state["hooks"] = "shim" if reg is _torchdyn_registry else "torchdyn"
    return _state["hooks"]


def register_sensitivity(name: Union[str, type], factory: Callable, overwrite: bool = False) -> None:
    """Add a sensitivity to torchdyn's ``ODEProblem`` / ``NeuralODE`` (``sensitivity=name``).

    Args:
        name: the name, or a class whose instances are then accepted as ``sensitivity=``.
        factory: ``factory(problem) -> solve``, called on each forward pass with the
            ``ODEProblem``; ``solve(vf_params, x, t_span, save_at, args)`` returns
            ``(t_eval, sol)`` (the call signature of torchdyn's adjoint functions).
        overwrite: replace a factory registered earlier under ``name``. torchdyn's own
            names are never replaced.
    """
    install()
    registry().register_sensitivity(name, factory, overwrite=overwrite)


def register_solver(name: str, cls: type, overwrite: bool = False) -> None:
    """Add a stepper class to torchdyn's solver names (``solver=name`` in ``odeint``,
    ``ODEProblem``, ``NeuralODE``); built as ``cls(dtype)`` like torchdyn's own.
    ``overwrite`` replaces an earlier registration; torchdyn's own names are never replaced."""
    install()
    registry().register_solver(name, cls, overwrite=overwrite)


# ---------------------------------------------------------------------------- the shim
def _install_call_sites() -> None:
    """Today's torchdyn: wrap the methods where torchdyn would call the registry
    (``upstream/torchdyn/PULL_REQUEST.md`` lists them). torchdyn's own names with a finite
    ``t_span`` run torchdyn's code unchanged."""
    from torchdyn.core.neuralde import NeuralODE
    from torchdyn.core.problems import MultipleShootingProblem, ODEProblem

    if getattr(ODEProblem.__init__, _HOOK, False):
        return
    reg = _torchdyn_registry
    init, autograd_func, odeint = ODEProblem.__init__, ODEProblem._autograd_func, ODEProblem.odeint
    trajectory = NeuralODE.trajectory
    signature = inspect.signature(init)

    @functools.wraps(init)
    def __init__(self, *args, **kwargs):
        sensitivity = signature.bind(self, *args, **kwargs).arguments.get("sensitivity", "autograd")
        # multiple shooting implements torchdyn's own names only
        reg.check_sensitivity(sensitivity, reg.BUILTIN_SENSITIVITIES if isinstance(self, MultipleShootingProblem) else None)
        init(self, *args, **kwargs)

    @functools.wraps(autograd_func)
    def _autograd_func(self):
        solve = reg.sensitivity_function(self)
        return autograd_func(self) if solve is None else solve

    @functools.wraps(odeint)
    def odeint_(self, x, t_span, save_at=(), args={}):
        if isinstance(self.sensalg, str) and self.sensalg in reg.BUILTIN_SENSITIVITIES and reg.is_steady_state_span(t_span):
            return reg.problem_steady_state(self, x, t_span, save_at, args)
        return odeint(self, x, t_span, save_at, args)

    @functools.wraps(trajectory)
    def trajectory_(self, x, t_span):
        if reg.is_steady_state_span(t_span):
            x, t_span = self._prep_integration(x, t_span)
            return self.odeint(x, t_span)[1]
        return trajectory(self, x, t_span)

    for cls, name, wrapper in ((ODEProblem, "__init__", __init__), (ODEProblem, "_autograd_func", _autograd_func),
                               (ODEProblem, "odeint", odeint_), (NeuralODE, "trajectory", trajectory_)):
        setattr(wrapper, _HOOK, True)
        setattr(cls, name, wrapper)
    _wrap_functional_odeint()


def _wrap_functional_odeint() -> None:
    """torchdyn's functional ``odeint(f, x, t_span, solver, ...)`` with a ``t_span`` ending at
    ``inf`` loops forever; under the shim it stops at the steady state (``max_steps`` bounded),
    as the registry's call site does upstream. Finite spans run torchdyn's code unchanged. Code
    that imported ``odeint`` by name before ``import torchdyn_deq`` keeps torchdyn's own."""
    import torchdyn.numerics
    module = importlib.import_module("torchdyn.numerics.odeint")  # the module: the package attribute is the function

    functional = module.odeint
    reg = _torchdyn_registry

    @functools.wraps(functional)
    def odeint(f, x, t_span, solver, atol=1e-3, rtol=1e-3, *rest, **kwargs):
        if not reg.is_steady_state_span(t_span):
            return functional(f, x, t_span, solver, atol, rtol, *rest, **kwargs)
        bound = inspect.signature(functional).bind(f, x, t_span, solver, atol, rtol, *rest, **kwargs)
        extra = sorted(k for k in bound.arguments if k not in ("f", "x", "t_span", "solver", "atol", "rtol", "args"))
        if extra:
            raise ValueError(f"{extra} belong to finite-time integration; t_span ending at inf solves to the steady "
                             "state and uses none of them")
        return reg.odeint_steady_state(f, x, t_span, solver, atol, rtol, args=bound.arguments.get("args", {}))

    setattr(odeint, _HOOK, True)
    module.odeint = torchdyn.numerics.odeint = odeint


# ---------------------------------------------------------------------------- our sensitivities
def steady_state_factory(problem) -> Callable:
    """The registered factory of this package's sensitivities: ``solve(vf_params, x, t_span,
    save_at, args)`` integrates ``problem`` to its steady state and differentiates implicitly."""
    name = problem.sensalg if isinstance(problem.sensalg, str) else type(problem.sensalg).__name__
    for option, value in (("interpolator", problem.interpolator), ("integral_loss", problem.integral_loss)):
        if value is not None:
            raise ValueError(f"{option}={value!r} belongs to finite-time integration; sensitivity={name!r} solves "
                             "to the steady state and uses none: leave it None")
    if problem.solver_adjoint is not problem.solver:
        raise ValueError(f"solver_adjoint={problem.solver_adjoint!r} is not used by sensitivity={name!r}: its backward "
                         "pass is a linear solve at the steady state (tolerances atol_adjoint, rtol_adjoint); leave it None")

    def solve(vf_params, x: Tensor, t_span: Tensor, save_at=(), args={}) -> Tuple[Tensor, Tensor]:
        if not _torchdyn_registry.is_steady_state_span(t_span):
            end = float(torch.as_tensor(t_span).reshape(-1)[-1])
            raise ValueError(f"sensitivity={name!r} solves to the steady state, at t = inf, but t_span ends at {end:g}: "
                             "pass t_span=torch.tensor([0., float('inf')]), or use torchdyn's 'autograd' / 'adjoint' for "
                             "a finite end time")
        if len(save_at):
            raise ValueError("save_at has no meaning for t_span = [t0, inf]: the solve ends at the steady state")
        # torchdyn's default atol_adjoint (1e-4 in NeuralODE, 1e-6 in ODEProblem) is an absolute floor:
        # as the GMRES tolerance it returned zero gradients for every sample with a smaller cotangent.
        # The backward is relative (rtol_adjoint); an atol_adjoint the user set is kept as the floor
        atol_adjoint = 0.0 if problem.atol_adjoint in _torchdyn_atol_adjoint_defaults() else problem.atol_adjoint
        t_eval, sol, record = _solve_steady_state(
            problem.vf, x, t_span[0], solver=problem.solver, atol=problem.atol, rtol=problem.rtol,
            max_steps=getattr(problem, "max_steps", _torchdyn_registry.DEFAULT_MAX_STEPS), sensitivity=problem.sensalg,
            atol_adjoint=atol_adjoint, rtol_adjoint=problem.rtol_adjoint, args=args, owner=problem)
        problem.solution = record
        return t_eval, sol
    return solve


@functools.lru_cache(maxsize=None)
def _torchdyn_atol_adjoint_defaults() -> frozenset:
    """The ``atol_adjoint`` defaults of torchdyn's ``NeuralODE`` and ``ODEProblem`` (read from their
    signatures, where they declare one)."""
    from torchdyn.core.neuralde import NeuralODE
    from torchdyn.core.problems import ODEProblem
    params = (inspect.signature(cls.__init__).parameters.get("atol_adjoint") for cls in (NeuralODE, ODEProblem))
    return frozenset(p.default for p in params if p is not None and p.default is not inspect.Parameter.empty)

_ENGINE = "_torchdyn_deq_engine"  # the problem's cached (configuration, engine), in its __dict__


# ---------------------------------------------------------------------------- the engine call


def _solver_name(solver):
    """The name of a torchdyn stepper instance of a class this package solves natively
    (``'tsit5'`` -> its fused steps, ``'vcab3'`` -> the steady-state `VCAB3`), else the
    instance itself."""
    if isinstance(solver, VCAB3Stepper):
        return "vcab3"
    for name in ODE_SOLVERS:
        if type(solver) is SOLVER_DICT.get(name):
            return name
    return solver


def steady_state_solver(method: str, options: dict):
    """The package's solver ``method`` built with ``options`` (its constructor's keywords);
    unknown options are a ``ValueError`` that lists the valid ones."""
    if method in ROOT_SOLVERS:
        cls, make = ROOT_SOLVERS[method], ROOT_SOLVERS[method]
    elif method == "vcab3":
        cls = make = VCAB3
    else:
        cls, make = ODESteadyStateSolver, functools.partial(ODESteadyStateSolver, method)
    valid = sorted({name for klass in type.mro(cls) if "__init__" in vars(klass)
                    for name, p in inspect.signature(klass.__init__).parameters.items()
                    if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)} - {"self", "stepper"})
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ValueError(f"unknown options {unknown} for method={method!r}; valid options: {valid}")
    return make(**options)


def _solve_steady_state(vector_field, x: Tensor, t0: Tensor, *, solver, atol: float, rtol: float, max_steps: int,
                        sensitivity, atol_adjoint: float, rtol_adjoint: float, args: dict, owner=None,
                        input_grad: bool = False):
    """Every call of this module (and of `odeint_steady_state`) into the package's solve
    machinery: an `InfiniteTimeNeuralODE` around ``vector_field`` (``(t, z, args)``),
    reused per ``owner`` while the configuration stays the same.

    Returns ``(t_eval, trajectory, record)``: ``[t0, t*]``, ``[z0, z*]`` with ``z*``'s
    backward pass the sensitivity's, and the solve's `SteadyStateSolution` (its ``z_star``
    and ``z0`` detached: the graph lives in ``trajectory``, so models holding the record
    still deep-copy). ``input_grad`` differentiates even when neither ``x`` nor the field's
    parameters require grad (closures over tensors, `odeint_steady_state`).
    """
    solver = _solver_name(solver)
    config = (vector_field, solver, atol, rtol, max_steps, sensitivity, atol_adjoint, rtol_adjoint)
    # kept on the owner itself (not a global table): it lives and dies with the model, whatever
    # references the vector field holds back to it; __dict__, so it is not a registered submodule
    cached = owner.__dict__.get(_ENGINE) if owner is not None else None
    if cached is not None and all(a is b or a == b for a, b in zip(cached[0], config)):
        engine = cached[1]
    else:
        engine = InfiniteTimeNeuralODE(vector_field, solver=solver, atol=atol, rtol=rtol, sensitivity=sensitivity,
                                       atol_adjoint=atol_adjoint, rtol_adjoint=rtol_adjoint, max_steps=max_steps)
        if owner is not None:
            owner.__dict__[_ENGINE] = (config, engine)
    engine.training = owner.training if owner is not None else True
    if input_grad and torch.is_grad_enabled() and not x.requires_grad:
        x = x.detach().requires_grad_()  # z0 = x: makes the engine attach the implicit backward
    t_span = torch.stack([torch.as_tensor(t0, dtype=x.dtype, device=x.device).reshape(()),
                          torch.tensor(float("inf"), dtype=x.dtype, device=x.device)])
    t_eval, trajectory = engine(x, t_span, (), args)
    record = engine.solution
    record.z_star, record.z0 = record.z_star.detach(), record.z0.detach()
    return t_eval, trajectory, record
