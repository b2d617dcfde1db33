"""Registry of ODE solvers and sensitivity algorithms for `ODEProblem` and `NeuralODE`.

Written to torchdyn's conventions as the module a pull request would add to torchdyn
(`torchdyn/numerics/registry.py`, see `upstream/torchdyn/PULL_REQUEST.md`); it imports
nothing but torch and torchdyn. torchdyn-deq uses it as is, behind a shim, until torchdyn
calls it itself.

- `register_solver(name, cls)`: a stepper class under a new name in `SOLVER_DICT`.
- `register_sensitivity(name, factory)`: a sensitivity algorithm under a new name.
- `check_sensitivity(sensitivity)`: the check `ODEProblem` makes at construction: an unknown
  name is a `ValueError` that lists the valid ones.
- A `t_span` ending at `inf` means "integrate until the state stops moving":
  `is_steady_state_span`, and the one hook `register_steady_state(solve)` that a package with
  a steady-state solver fills (torchdyn holds no second solve loop); `odeint_steady_state` and
  `problem_steady_state` (the dispatch for torchdyn's own sensitivities) call it.
"""
import math
from typing import Callable, Dict, Iterable, Optional, Tuple, Union

import torch
import torch.nn as nn
from torch import Tensor

from torchdyn.numerics.solvers.ode import SOLVER_DICT

BUILTIN_SENSITIVITIES = ('autograd', 'adjoint', 'interpolated_adjoint')
# torchdyn's own solver names, as found when this module is first imported: never replaced
BUILTIN_SOLVERS = tuple(SOLVER_DICT)
# steps (accepted and rejected) of a solve to t = inf; an `ODEProblem` attribute `max_steps` overrides it
DEFAULT_MAX_STEPS = 100

# name (or class whose instances are accepted as `sensitivity=`) -> factory(problem) -> solve
_SENSITIVITIES: Dict[Union[str, type], Callable] = {}
# 'solve' -> the registered steady-state solve (`register_steady_state`)
_STEADY_STATE: Dict[str, Callable] = {}


def _names(names: Iterable) -> str:
    return ', '.join(repr(n) for n in names) or 'none'


def _same(old, new) -> bool:
    """`new` is `old`, or its re-definition by a reloaded module (same module and name)."""
    return old is new or (getattr(old, '__module__', None) == getattr(new, '__module__', 0)
                          and getattr(old, '__qualname__', None) == getattr(new, '__qualname__', 0))


def register_solver(name: str, solver: type, overwrite: bool = False) -> None:
    """Make `name` a solver name of `odeint`, `ODEProblem` and `NeuralODE` (`solver=name`).

    Registering the same class under the same name again does nothing.

    Args:
        name: the new name.
        solver: a stepper class, built as `solver(dtype)` like torchdyn's own, with
            `step(f, x, t, dt, k1=None, args=None)`, `order` and `stepping_class`.
        overwrite: replace a class registered earlier under `name` by another package.
            torchdyn's own names are never replaced.
    """
    if not isinstance(name, str) or not name:
        raise TypeError(f'a solver name must be a non-empty string, got {name!r}')
    if not isinstance(solver, type) or not callable(getattr(solver, 'step', None)):
        raise TypeError(f'solver must be a stepper class with a `step` method, got {solver!r}')
    if name in BUILTIN_SOLVERS:
        raise ValueError(f'{name!r} is one of torchdyn\'s own solvers and cannot be replaced; register another name')
    current = SOLVER_DICT.get(name)
    if current is not None and not overwrite and not _same(current, solver):
        raise ValueError(f'solver {name!r} is already registered ({current.__module__}.{current.__qualname__}); '
                         'pass overwrite=True to replace it')
    SOLVER_DICT[name] = solver


def solver_names() -> Tuple[str, ...]:
    """Every solver name `str_to_solver` accepts: torchdyn's own and the registered ones."""
    return tuple(SOLVER_DICT)


def solver_class(name: str) -> type:
    """The stepper class of `name`; a `ValueError` listing the valid names if there is none
    (the lookup `str_to_solver` would make, instead of a bare `KeyError`)."""
    if name not in SOLVER_DICT:
        raise ValueError(f'unknown solver {name!r}; valid names: {_names(SOLVER_DICT)}')
    return SOLVER_DICT[name]


def register_sensitivity(key: Union[str, type], factory: Callable, overwrite: bool = False) -> None:
    """Make `key` a sensitivity of `ODEProblem` and `NeuralODE` (`sensitivity=key`).

    Registering the same factory under the same key again does nothing.

    Args:
        key: a name, or a class whose instances are then accepted as `sensitivity=`.
        factory: `factory(problem) -> solve`, called on every forward pass;
            `solve(vf_params, x, t_span, save_at, args)` returns `(t_eval, sol)`, the call
            signature of torchdyn's adjoint functions.
        overwrite: replace a factory registered earlier under `key`. torchdyn's own names
            ('autograd', 'adjoint', 'interpolated_adjoint') are never replaced.
    """
    if not (isinstance(key, type) or (isinstance(key, str) and key)):
        raise TypeError(f'a sensitivity key must be a non-empty name or a class, got {key!r}')
    if not callable(factory):
        raise TypeError(f'factory must be callable as factory(problem), got {factory!r}')
    if key in BUILTIN_SENSITIVITIES:
        raise ValueError(f'{key!r} is one of torchdyn\'s own sensitivities and cannot be replaced; register another name')
    current = _SENSITIVITIES.get(key)
    if current is not None and not overwrite and not _same(current, factory):
        raise ValueError(f'sensitivity {key!r} is already registered ({current!r}); pass overwrite=True to replace it')
    _SENSITIVITIES[key] = factory


def sensitivity_names() -> Tuple[str, ...]:
    """torchdyn's own sensitivity names, then the registered ones."""
    return BUILTIN_SENSITIVITIES + tuple(k for k in _SENSITIVITIES if isinstance(k, str))


def _factory(sensitivity) -> Optional[Callable]:
    if isinstance(sensitivity, str):
        return _SENSITIVITIES.get(sensitivity)
    for key, factory in _SENSITIVITIES.items():
        if isinstance(key, type) and isinstance(sensitivity, key):
            return factory
    return None


def check_sensitivity(sensitivity, names: Optional[Iterable[str]] = None):
    """Return `sensitivity` if it is a valid name (or an instance of a registered class);
    otherwise raise a `ValueError` (`TypeError` for a non-name) listing the valid names.

    Args:
        sensitivity: the `sensitivity=` argument.
        names: the names accepted; default all of `sensitivity_names()` (a problem class
            that only implements torchdyn's own passes `BUILTIN_SENSITIVITIES`).
    """
    valid = sensitivity_names() if names is None else tuple(names)
    if isinstance(sensitivity, str):
        if sensitivity not in valid:
            own = [n for n in valid if n in BUILTIN_SENSITIVITIES]
            added = [n for n in valid if n not in BUILTIN_SENSITIVITIES]
            raise ValueError(f'unknown sensitivity {sensitivity!r}; valid names: torchdyn\'s {_names(own)}, '
                             f'registered {_names(added)}')
        return sensitivity
    if names is None and _factory(sensitivity) is not None:
        return sensitivity
    raise TypeError(f'sensitivity must be one of the names {_names(valid)} (or an instance of a registered class), '
                    f'got {sensitivity!r}')


def sensitivity_function(problem) -> Optional[Callable]:
    """The registered `solve` for `problem.sensalg`, or `None` for torchdyn's own names."""
    factory = _factory(problem.sensalg)
    return None if factory is None else factory(problem)


def is_steady_state_span(t_span) -> bool:
    """True when `t_span` is `[t0, inf]`: integrate from `t0` until the state stops moving.

    `inf` anywhere else, `nan`, or `[t0, ..., inf]` with save points in between raise a
    `ValueError` (a save point before infinity has no fixed time to be saved at).
    """
    t_span = torch.as_tensor(t_span)
    if t_span.numel() == 0 or bool(torch.isfinite(t_span).all()):
        return False
    flat = t_span.reshape(-1)
    end = float(flat[-1])
    if end != math.inf or not bool(torch.isfinite(flat[:-1]).all()):
        raise ValueError(f't_span may hold inf only as its last entry, [t0, inf], and no nan; got {t_span.tolist()}')
    if flat.numel() != 2:
        raise ValueError(f'a t_span ending at inf has two entries, [t0, inf]; got {t_span.tolist()}: the steady '
                         'state has no intermediate save points')
    return True


def register_steady_state(solve: Callable, overwrite: bool = False) -> None:
    """Make `t_span = [t0, inf]` solvable: `solve(f, x, t_span, solver, atol, rtol, max_steps, args)`
    integrates `dx/dt = f(t, x)` from `t_span[0]` until the state stops moving and returns
    `(t_eval, sol)` = `([t0, t_end], [x0, x_end])`, differentiable by backpropagation.

    torchdyn holds no steady-state solver of its own: this is the one hook a package that has one
    (torchdyn-deq) fills, so that the stop test, the step budget and the failure report live in
    one place. Registering the same function again does nothing.

    Args:
        solve: the steady-state solve.
        overwrite: replace a function registered earlier by another package.
    """
    if not callable(solve):
        raise TypeError(f'solve must be callable as solve(f, x, t_span, solver, atol, rtol, max_steps, args), got {solve!r}')
    current = _STEADY_STATE.get('solve')
    if current is not None and not overwrite and not _same(current, solve):
        raise ValueError(f'a steady-state solve is already registered ({current!r}); pass overwrite=True to replace it')
    _STEADY_STATE['solve'] = solve


def odeint_steady_state(f: Callable, x: Tensor, t_span: Tensor, solver: Union[str, nn.Module], atol: float = 1e-3,
                        rtol: float = 1e-3, max_steps: int = DEFAULT_MAX_STEPS, args: Dict = {}) -> Tuple[Tensor, Tensor]:
    """Integrate `dx/dt = f(t, x)` from `t_span[0]` until the state stops moving, with the
    registered steady-state solve (`register_steady_state`); gradients by backpropagation.

    Args:
        f: the vector field, `f(t, x)`.
        x: the initial state.
        t_span: `[t0, inf]`.
        solver: a solver name or stepper ('tsit5', 'dopri5', ...).
        atol, rtol: the stop tolerances. Default 1e-3, `NeuralODE`'s.
        max_steps: bound on steps, accepted and rejected. Default 100.
        args: passed on to the vector field.

    Returns:
        `(t_eval, sol)`: `t_eval = [t0, t_end]`, `sol = [x0, x_end]`.
    """
    if isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 1:
        raise ValueError(f'max_steps must be a positive integer, got {max_steps!r}')
    if not is_steady_state_span(t_span):
        raise ValueError(f't_span must be [t0, inf] for a steady-state solve, got {torch.as_tensor(t_span).tolist()}')
    solve = _STEADY_STATE.get('solve')
    if solve is None:
        raise ValueError('t_span ends at inf, a steady-state solve, and none is registered: install a package that '
                         'registers one (torchdyn-deq: `import torchdyn_deq`), or integrate to a finite end time')
    return solve(f, x, t_span, solver, atol, rtol, max_steps, args)


def problem_steady_state(problem, x: Tensor, t_span: Tensor, save_at=(), args: Dict = {}) -> Tuple[Tensor, Tensor]:
    """`ODEProblem.odeint` for torchdyn's own sensitivities and `t_span = [t0, inf]`.

    'autograd' backpropagates through `odeint_steady_state`; 'adjoint' and
    'interpolated_adjoint' integrate backwards from the end time, which infinity is not,
    and raise a `ValueError` that names the alternatives.
    """
    if problem.sensalg != 'autograd':
        added = [n for n in sensitivity_names() if n not in BUILTIN_SENSITIVITIES]
        raise ValueError(f'sensitivity={problem.sensalg!r} integrates the adjoint backwards from the end time, and '
                         f't_span ends at inf: use sensitivity=\'autograd\' (backpropagation through the steps) or '
                         f'a steady-state sensitivity (registered: {_names(added)})')
    if len(save_at):
        raise ValueError('save_at has no meaning for t_span = [t0, inf]: the solve ends at the steady state')
    max_steps = getattr(problem, 'max_steps', DEFAULT_MAX_STEPS)
    return odeint_steady_state(problem.vf, x, t_span, problem.solver, problem.atol, problem.rtol, max_steps, args)
