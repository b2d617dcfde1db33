"""Time-stepping solvers on the solve loop: explicit Runge-Kutta methods as data (a Butcher
tableau, torchdyn's own) and VCAB3, the paper's variable-coefficient Adams-Bashforth 3.

Both use one `StepController`: local error control at ``step_tol_factor * (atol, rtol)``
(floored at ``min_step_tol``), bounded by the stability limit each step estimates from its
own evaluations (see ``_step_control``).
"""
from __future__ import annotations

import math
from functools import lru_cache
from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from torch import Tensor
from torchdyn.numerics.solvers.ode import SOLVER_DICT, str_to_solver

from ._checks import float_in, positive_float
from ._loop import Proposal, State, SteadyStateSolver, _wide
from ._solution import SolveOptions
from ._step_control import STALE, StabilityRegion, StepController, error_ratio, first_step, spectral_moments


class Tableau:
    """An explicit embedded Runge-Kutta method as data: nodes ``c`` (stages 2..s), rows of ``a``,
    weights ``b`` and error weights ``b_err``, read once into Python floats (each stage is then
    one fused ``add(alpha=dt a_ij)`` per term instead of three tensor operations)."""

    def __init__(self, c: Sequence[float], a: Sequence[Sequence[float]], b: Sequence[float],
                 b_err: Sequence[float], order: int):
        self.c, self.a = [float(v) for v in c], [[float(v) for v in row] for row in a]
        self.b, self.b_err, self.order = [float(v) for v in b], [float(v) for v in b_err], order
        # first same as last (tsit5, dopri5): the last stage is the new state itself
        self.fsal = bool(self.a) and self.a[-1] == self.b[: len(self.a[-1])] and not any(self.b[len(self.a[-1]):]) \
            and self.c[-1] == 1.0
        self.region = StabilityRegion.runge_kutta(self.a, self.b[: len(self.a) + 1])

    @classmethod
    def of(cls, stepper: nn.Module) -> Optional["Tableau"]:
        """The tableau of a torchdyn adaptive stepper (``None`` for steppers without one)."""
        tableau = getattr(stepper, "tableau", None)
        if getattr(stepper, "stepping_class", None) != "adaptive" or not (isinstance(tableau, tuple) and len(tableau) == 4):
            return None
        c, a, b, b_err = tableau
        return cls([float(v) for v in c], [[float(v) for v in row] for row in a], [float(v) for v in b],
                   [float(v) for v in b_err], stepper.order)


@lru_cache(maxsize=None)
def _named_tableau(name: str) -> Optional[Tableau]:
    return Tableau.of(str_to_solver(name, torch.float64))


def combine(base: Optional[Tensor], ks: Sequence[Tensor], weights: Sequence[float], dt: float) -> Tensor:
    """``base + dt * sum_j w_j k_j`` (``base=None``: without it), one fused multiply-add per
    non-zero weight; the first creates the output, the others accumulate into it in place."""
    out = None
    for k, w in zip(ks, weights):
        if w == 0.0:
            continue
        if out is None:
            out = torch.mul(k, dt * w) if base is None else torch.add(base, k, alpha=dt * w)
        else:
            out.add_(k, alpha=dt * w)
    if out is None:
        return torch.zeros_like(ks[0]) if base is None else base.clone()
    return out


def rk_step(g, tableau: Tableau, z: Tensor, k1: Tensor, t: float, dt: float):
    """One step of ``tableau`` from ``(t, z)`` with ``k1 = g(t, z)``: ``(z_new, g(z_new), err, stages, ks)``
    (``g(z_new)`` is the last stage for FSAL methods, one more evaluation otherwise)."""
    ks, stages = [k1], [z]
    for c, row in zip(tableau.c, tableau.a):
        stage = combine(z, ks, row, dt)
        stages.append(stage)
        ks.append(g(t + c * dt, stage))
    if tableau.fsal:
        z_new, gz_new = stages[-1], ks[-1]
    else:
        z_new = combine(z, ks, tableau.b, dt)
        gz_new = g(t + dt, z_new)
    return z_new, gz_new, combine(None, ks, tableau.b_err, dt), stages, ks


def _flat(x: Tensor) -> Tensor:
    return _wide(x).reshape(x.shape[0], -1)


class _TimeStepper(SteadyStateSolver):
    """What the time-stepping families share: step tolerances and the controller's options."""

    def __init__(self, step_tol_factor: float, min_step_tol: float, max_step: float, stall_time: float,
                 **loop_options):
        super().__init__(**loop_options)
        # small accurate steps on a rotation see no new lowest residual for a good part of a period
        self.stall_time = positive_float("stall_time", stall_time)
        self.step_tol_factor = positive_float("step_tol_factor", step_tol_factor)
        self.min_step_tol = positive_float("min_step_tol", min_step_tol)
        self.max_step = float_in("max_step", max_step, 0.0, math.inf)  # inf: no bound

    def _step_tolerances(self, options: SolveOptions) -> Tuple[float, float]:
        return (max(options.atol * self.step_tol_factor, self.min_step_tol),
                max(options.rtol * self.step_tol_factor, self.min_step_tol))


class ODESteadyStateSolver(_TimeStepper):
    """Explicit Runge-Kutta integration of ``dz/dt = g(t, z)`` to steady state.

    Adaptive methods (tsit5, dopri5: torchdyn's tableaus, stepped as `Tableau` data) control
    the local error at ``step_tol_factor * (atol, rtol)``, floored at ``min_step_tol``, and
    bound each step by the stability limit estimated from the step's own stages (Rayleigh-Ritz
    on the pairs ``(Y_s - Y_{s-1}, k_s - k_{s-1})`` and ``(Y_2 - z, k_2 - k_1)``, no extra
    evaluation; see ``_step_control``). Fixed-step torchdyn steppers (euler, midpoint, rk4)
    take ``step_size`` steps through torchdyn's own ``step``.

    Args:
        stepper: a torchdyn solver name (default ``'tsit5'``) or stepper instance.
        step_tol_factor: ratio of step-control to stop tolerance. Default ``1.0``: with the
            stability limit, the error control only has to resolve the path, and the stop
            test alone decides the accuracy of the end point.
        min_step_tol: floor of the step-control tolerances. Default ``1e-6``: only the end
            point matters, not the path, so a tight stop tolerance (``1e-12`` for a float64
            gradient check) need not force thousands of tiny steps.
        max_step: largest step. Default ``inf``: the estimated stability limit bounds it.
        step_size: step of fixed-step steppers. Default ``1.0`` (explicit Euler with step 1 on
            ``g = f - z`` is the fixed-point iteration ``z <- f(z)``).
        stall_time: a stall also needs this much time without progress. Default ``10.0``: more
            than a period of a rotation at ``|lambda| = 1``, the time scale of a DEQ's
            ``g = f - z``, within which a spiral's scaled residual need not reach a new low.
        **loop_options: ``stall_patience``, ``divergence_factor``, ``per_sample``: the solve
            loop's tests (`SteadyStateSolver`).
    """

    def __init__(self, stepper: Union[str, nn.Module] = "tsit5", step_tol_factor: float = 1.0,
                 min_step_tol: float = 1e-6, max_step: float = math.inf, step_size: float = 1.0,
                 stall_time: float = 10.0, **loop_options):
        super().__init__(step_tol_factor, min_step_tol, max_step, stall_time, **loop_options)
        self.step_size = positive_float("step_size", step_size)
        if isinstance(stepper, str):
            if stepper not in SOLVER_DICT:
                raise ValueError(f"unknown torchdyn solver {stepper!r}; valid: {sorted(SOLVER_DICT)}")
            self._tableau = _named_tableau(stepper)
        elif isinstance(stepper, nn.Module) and hasattr(stepper, "step"):
            self._tableau = Tableau.of(stepper)
            if self._tableau is None and getattr(stepper, "stepping_class", "fixed") == "adaptive":
                raise TypeError(f"adaptive stepper {type(stepper).__name__} has no (c, a, b, b_err) tableau")
        else:
            raise TypeError(f"stepper must be a torchdyn solver name or stepper instance, got {stepper!r}")
        self.stepper = stepper
        self._fixed_of = {}
        if self._tableau is not None:
            self._control = StepController(self._tableau.order, self._tableau.region, max_step=self.max_step)

    @property
    def adaptive(self) -> bool:
        return self._tableau is not None

    def _fixed_stepper(self, z: Tensor) -> nn.Module:
        """The fixed-step torchdyn stepper for ``z``'s dtype and device: built from the name once per
        dtype, or the user's instance, with its tableau moved there (torchdyn's ``sync_device_dtype``)."""
        key = (z.dtype, z.device)
        if key not in self._fixed_of:
            stepper = str_to_solver(self.stepper, z.dtype) if isinstance(self.stepper, str) else self.stepper
            stepper.sync_device_dtype(z, torch.zeros(1, dtype=z.dtype, device=z.device))
            self._fixed_of[key] = stepper
        return self._fixed_of[key]

    def init(self, g, z0, gz0, options):
        if not self.adaptive:
            return State(z0, gz0, 0.0, control=(self.step_size,))
        satol, srtol = self._step_tolerances(options)
        dt = min(float(first_step(_wide(gz0), _wide(z0), satol, srtol, self._tableau.order)), self.max_step)
        return State(z0, gz0, 0.0, control=(dt, math.inf, STALE))

    def propose(self, g, state, options):
        dt = state.control[0]
        if not self.adaptive:
            t = torch.full((), state.t, dtype=state.z.dtype, device=state.z.device)
            z_new = self._fixed_stepper(state.z).step(g, state.z, t, dt, k1=state.gz)[1]
            return Proposal(z_new, g(state.t + dt, z_new), state.t + dt)
        z_new, gz_new, err, stages, ks = rk_step(g, self._tableau, state.z, state.gz, state.t, dt)
        satol, srtol = self._step_tolerances(options)
        signals = (error_ratio(_wide(err), _wide(state.z), _wide(z_new), satol, srtol),)
        if self._control.wants_estimate(dt, *state.control[1:]):
            pairs = [(_flat(stages[-1]) - _flat(stages[-2]), _flat(ks[-1]) - _flat(ks[-2])),
                     (_flat(stages[1]) - _flat(stages[0]), _flat(ks[1]) - _flat(ks[0]))]
            signals += (spectral_moments(pairs),)
        return Proposal(z_new, gz_new, state.t + dt, signals=signals)

    def decide(self, g, state, proposal, signals, options):
        if not self.adaptive:
            return State(proposal.z, proposal.gz, proposal.t, control=state.control), True
        dt, ratio = state.control[0], signals[0]
        limit, age = self._control.refresh(*state.control[1:], signals[1:])
        control = (self._control.next_step(dt, ratio, limit), limit, age)
        if ratio <= 1:  # False for NaN
            return State(proposal.z, proposal.gz, proposal.t, control=control), True
        return State(state.z, state.gz, state.t, control=control), False


def adams_bashforth_weights(nodes: Sequence[float], h: float) -> List[float]:
    """Weights ``w`` with ``int_0^h p(s) ds = sum_i w_i p(nodes[i])`` for every polynomial ``p``
    of degree ``< len(nodes)``; ``nodes`` are the past times relative to the current one
    (``0`` first, then negative), ``h`` the step. Integrates the Lagrange basis polynomials
    in plain Python floats (a tensor solve here would cost more than the evaluation saved);
    closed forms for the one to three nodes of VCAB3."""
    if nodes and nodes[0] == 0 and len(nodes) <= 3:
        if len(nodes) == 1:
            return [h]
        h2, h3 = h * h / 2, h ** 3 / 3
        if len(nodes) == 2:
            a = nodes[1]
            return [h - h2 / a, h2 / a]
        a, b = nodes[1], nodes[2]
        return [(h3 - (a + b) * h2 + a * b * h) / (a * b), (h3 - b * h2) / (a * (a - b)), (h3 - a * h2) / (b * (b - a))]
    weights = []
    for i, si in enumerate(nodes):
        coeffs, denom = [1.0], 1.0  # prod_{j != i} (s - s_j), ascending powers of s
        for j, sj in enumerate(nodes):
            if j != i:
                coeffs = [(coeffs[k - 1] if k else 0.0) - sj * (coeffs[k] if k < len(coeffs) else 0.0)
                          for k in range(len(coeffs) + 1)]
                denom *= si - sj
        weights.append(sum(c * h ** (k + 1) / (k + 1) for k, c in enumerate(coeffs)) / denom)
    return weights


@lru_cache(maxsize=None)
def _ab3_region() -> StabilityRegion:
    return StabilityRegion.adams_bashforth3()


class VCAB3(_TimeStepper):
    """Variable-step Adams-Bashforth 3 with error control, integrated to steady state.

    One vector-field evaluation per accepted step, none for a rejected one. The step
    ``z_{n+1} = z_n + sum_i w_i g_{n-i}`` integrates the polynomial through the last three
    evaluations exactly, whatever the spacing of their times; its difference to the order-2
    formula on the last two estimates the local error. Starts with Euler and order 2 while the
    history fills. The stability limit uses AB3's constant-step region and the Rayleigh-Ritz
    eigenvalue estimates of the last three accepted states and their evaluations (secants).

    Args:
        step_tol_factor: ratio of step-control to stop tolerance. Default ``1.0``.
        min_step_tol: floor of the step-control tolerances. Default ``1e-6``.
        max_step: largest step. Default ``inf`` (the stability limit bounds it).
        max_factor: largest step growth per step. Default ``2.0``: the Adams weights are
            accurate for nearby nodes; a larger jump extrapolates the history too far.
        stall_time: as for `ODESteadyStateSolver`. Default ``10.0``.
        **loop_options: ``stall_patience``, ``divergence_factor``, ``per_sample``: the solve
            loop's tests (`SteadyStateSolver`).
    """

    def __init__(self, step_tol_factor: float = 1.0, min_step_tol: float = 1e-6, max_step: float = math.inf,
                 max_factor: float = 2.0, stall_time: float = 10.0, **loop_options):
        super().__init__(step_tol_factor, min_step_tol, max_step, stall_time, **loop_options)
        self.max_factor = float_in("max_factor", max_factor, 1.0, math.inf, high_open=True)
        self._control = StepController(3, _ab3_region(), max_factor=self.max_factor, max_step=self.max_step)

    def init(self, g, z0, gz0, options):
        satol, srtol = self._step_tolerances(options)
        dt = min(float(first_step(_wide(gz0), _wide(z0), satol, srtol, 1)), self.max_step)
        return State(z0, gz0, 0.0, memory=([gz0], []), control=(dt, (0.0,), math.inf, STALE))

    def propose(self, g, state, options):
        evals, secants = state.memory
        dt, times = state.control[:2]
        nodes = [s - state.t for s in times]
        w = adams_bashforth_weights(nodes, dt)
        z_new = combine(state.z, evals, w, 1.0)
        if len(evals) > 1:
            w_low = adams_bashforth_weights(nodes[:-1], dt) + [0.0]
            err = combine(None, evals, [wi - wl for wi, wl in zip(w, w_low)], 1.0)
            satol, srtol = self._step_tolerances(options)
            ratio = error_ratio(_wide(err), _wide(state.z), _wide(z_new), satol, srtol)
            if not self._control.wants_estimate(dt, *state.control[2:]):
                return Proposal(z_new, None, state.t + dt, signals=(ratio,))
            pairs = [(_flat(dz), _flat(dg)) for dz, dg in secants]
            return Proposal(z_new, None, state.t + dt, signals=(ratio, spectral_moments((pairs + pairs)[:2])))
        # the Euler start: no error estimate yet
        return Proposal(z_new, None, state.t + dt, signals=(torch.tensor(-1.0, device=state.z.device),))

    def decide(self, g, state, proposal, signals, options):
        ratio = signals[0]
        evals, secants = state.memory
        dt, times = state.control[:2]
        limit, age = self._control.refresh(*state.control[2:], signals[1:])
        if ratio < 0:  # the Euler start keeps its guessed step
            ratio, next_dt = 0.0, dt
        else:
            next_dt = self._control.next_step(dt, ratio, limit, order=len(evals))
        if not ratio <= 1:
            return State(state.z, state.gz, state.t, state.memory, (next_dt, times, limit, age)), False
        gz = g(proposal.t, proposal.z)
        # the secants of the last two steps, (z_{n+1} - z_n, g_{n+1} - g_n): the eigenvalue estimates' pairs
        memory = ([gz] + evals[:2], [(proposal.z - state.z, gz - evals[0])] + secants[:1])
        return State(proposal.z, gz, proposal.t, memory, (next_dt, (proposal.t,) + times[:2], limit, age)), True
