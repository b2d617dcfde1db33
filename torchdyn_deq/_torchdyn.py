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
import torch.nn as nn
from torch import Tensor
from torchdyn.core.defunc import DEFunc, DEFuncBase
from torchdyn.numerics.solvers.ode import SOLVER_DICT

from . import _torchdyn_registry
from ._field import module_field
from ._implicit import implicit_solve, per_solve
from ._registry import ODE_SOLVERS, SENSITIVITIES, make_sensitivity, make_solver
from ._sensitivity import AutogradSensitivity, Sensitivity
from ._solution import SolveOptions
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
    reg.register_steady_state(functional_steady_state)
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


# ---------------------------------------------------------------------------- the door into implicit_solve
def steady_state_factory(problem) -> Callable:
    """The registered factory of this package's sensitivities: ``solve(vf_params, x, t_span,
    save_at, args)`` integrates ``problem`` to its steady state through `implicit_solve`."""
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
                             "pass t_span=torch.tensor([0., float('inf')]) (inside nn.Sequential, where no t_span can "
                             "be passed: model.t_span = torch.tensor([0., float('inf')])), or use torchdyn's "
                             "'autograd' / 'adjoint' for a finite end time")
        if len(save_at):
            raise ValueError("save_at has no meaning for t_span = [t0, inf]: the solve ends at the steady state")
        solver, sensitivity, on_failure, options = _configuration(problem)
        return _steady_state(problem, problem.vf, x, t_span, solver, options, sensitivity, on_failure, args)
    return solve


def _steady_state(problem, vf, x: Tensor, t_span: Tensor, solver, options, sensitivity, on_failure: str, args: dict):
    """``(t_eval, [x, z*])`` of ``vf`` (torchdyn's ``DEFunc`` / ``DEFuncBase`` or a ``(t, z)``
    callable) from ``x``; the record goes to ``problem.solution`` (when there is a problem)."""
    controlled = [m for _, m in vf.named_modules() if hasattr(m, "_control")] if isinstance(vf, nn.Module) else []
    for module in controlled:  # torchdyn's DataControl holds x.detach(): the injected input's true gradient
        module._control = x
    fn, order = _call(vf)
    field = module_field(fn, x, args, order=order, module=vf if isinstance(vf, nn.Module) else None)
    parameters = vf.parameters() if isinstance(vf, nn.Module) else ()
    differentiate = torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in parameters))
    keep = (lambda record: setattr(problem, "solution", record)) if problem is not None else None
    try:
        with per_solve(vf if isinstance(vf, nn.Module) else None):
            z_star, record = implicit_solve(field, x, solver, options, sensitivity, on_failure=on_failure,
                                            differentiate=differentiate, keep=keep)
    finally:
        if isinstance(vf, nn.Module) and hasattr(vf, "nfe"):
            vf.nfe += field.nfe  # torchdyn's vf.nfe, read from the solve's one count
        for module in controlled:
            module._control = module._control.detach()
    t_eval = t_span[0] + torch.tensor([0.0, record.t], dtype=x.dtype, device=x.device)
    return t_eval, torch.stack([x, z_star.to(x.dtype)])


def _call(vf) -> Tuple[Callable, int]:
    """``(fn(t, z, args=...), order)``: what torchdyn's wrapper ``vf`` calls, without its per-call
    module scan and count (the `Field` does both once)."""
    if isinstance(vf, DEFunc):
        if vf.integral_loss is not None:
            raise ValueError("integral_loss belongs to finite-time integration; a steady-state solve uses none")
        return vf.vf, vf.order
    if isinstance(vf, DEFuncBase):
        inner = vf.vf
        return (inner if vf.has_time_arg else lambda t, z, args=None: inner(z)), 1
    return (lambda t, z, args=None: vf(t, z)), 1


def _configuration(problem):
    """The solver, sensitivity, forward ``on_failure`` and `SolveOptions` of ``problem``, built
    once per configuration and kept on the problem (a VCAB3 stepper's history, GMRES built once)."""
    max_steps = getattr(problem, "max_steps", _torchdyn_registry.DEFAULT_MAX_STEPS)
    key = (problem.solver, problem.sensalg, problem.atol, problem.rtol, problem.atol_adjoint, problem.rtol_adjoint,
           max_steps, getattr(problem, "on_failure", None))
    cached = problem.__dict__.get(_CONFIG)
    if cached is not None and all(a is b or a == b for a, b in zip(cached[0], key)):
        return cached[1]
    defaults = _adjoint_defaults(type(problem))
    # torchdyn's default adjoint tolerances (1e-4 in NeuralODE, 1e-6 in ODEProblem; atol an absolute
    # GMRES floor that returned zero gradients for small cotangents) are not a user's choice: the
    # package's one rule applies (relative, at the forward tolerance); a value the user set is kept
    rtol_adjoint = None if problem.rtol_adjoint == defaults.get("rtol_adjoint") else problem.rtol_adjoint
    atol_adjoint = None if problem.atol_adjoint == defaults.get("atol_adjoint") else problem.atol_adjoint
    sensitivity, on_failure = make_sensitivity(problem.sensalg, rtol_adjoint=rtol_adjoint, atol_adjoint=atol_adjoint,
                                               on_failure=getattr(problem, "on_failure", None),
                                               forward_tol=max(problem.atol, problem.rtol))
    value = (make_solver(_solver_name(problem.solver)), sensitivity, on_failure,
             SolveOptions(problem.atol, problem.rtol, max_steps))
    problem.__dict__[_CONFIG] = (key, value)  # __dict__: not a registered submodule, lives with the problem
    return value


def functional_steady_state(f: Callable, x: Tensor, t_span: Tensor, solver, atol: float, rtol: float,
                            max_steps: int, args: dict) -> Tuple[Tensor, Tensor]:
    """torchdyn's functional ``odeint`` and its own sensitivities (``'autograd'``) with ``t_span``
    ending at ``inf``: the same core, backpropagating through the steps (the steady-state
    solve torchdyn's registry hands to the package registered with it)."""
    options = SolveOptions(atol, rtol, max_steps)
    return _steady_state(None, f, x, torch.as_tensor(t_span).to(x), make_solver(_solver_name(solver)), options,
                         AutogradSensitivity(), "warn", args)


@functools.lru_cache(maxsize=None)
def _adjoint_defaults(cls: type) -> dict:
    """The ``atol_adjoint`` / ``rtol_adjoint`` defaults that ``cls`` (a torchdyn problem class)
    declares, read from the first signature in its MRO that has them."""
    out = {}
    for name in ("atol_adjoint", "rtol_adjoint"):
        for klass in cls.__mro__:
            p = inspect.signature(klass.__init__).parameters.get(name) if "__init__" in vars(klass) else None
            if p is not None and p.default is not inspect.Parameter.empty:
                out[name] = p.default
                break
    return out


_CONFIG = "_torchdyn_deq_configuration"  # the problem's cached (configuration, built objects), in its __dict__


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
