"""Time-stepping solvers on the solve loop: explicit Runge-Kutta methods as data (a Butcher
tableau, torchdyn's own) and VCAB3, the paper's variable-coefficient Adams-Bashforth 3.

Both use one `StepController`: local error control at ``step_tol_factor * (atol, rtol)``
(floored at ``min_step_tol``), bounded by the stability limit each step estimates from its
own evaluations (see ``_step_control``).
"""
from __future__ import annotations

import math
from functools import lru_cache
from typing import List, NamedTuple, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from torch import Tensor
from torchdyn.numerics.solvers.ode import SOLVER_DICT, str_to_solver

from ._checks import boolean, float_in, positive_float
from ._compile import CompiledStep
from ._loop import Proposal, State, SteadyStateSolver, StopInputs, _rows, _wide, stop_test
from ._solution import SolveOptions
from ._step_control import (Stability, StabilityRegion, StepController, error_ratio, first_step, linear_coefficients,
                            spectral_moments, start_ratio)


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
        self.error = linear_coefficients(self.a, self.b_err)  # of the error estimate on a linear field
        self.evaluations = len(self.c) + (0 if self.fsal else 1)  # of g per step, k1 given

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


def combine(base: Optional[Tensor], ks: Sequence[Tensor], weights, dt=1.0) -> Tensor:
    """``base + dt * sum_j w_j k_j`` (``base=None``: without it). ``weights`` and ``dt`` are
    Python floats (eager: one fused ``add(alpha=dt w_j)`` per non-zero weight, accumulated in
    place) or 0-dim tensors (a compiled step: ``addcmul``, whose graph does not change with
    their values)."""
    out = None
    for k, w in zip(ks, weights):
        if not isinstance(w, Tensor) and w == 0.0:
            continue
        alpha = dt * w
        if isinstance(alpha, Tensor):
            out = (k * alpha if base is None else torch.addcmul(base, k, alpha)) if out is None \
                else torch.addcmul(out, k, alpha)
        elif out is None:
            out = torch.mul(k, alpha) if base is None else torch.add(base, k, alpha=alpha)
        else:
            out.add_(k, alpha=alpha)
    if out is None:
        return torch.zeros_like(ks[0]) if base is None else base.clone()
    return out


def rk_step(g, tableau: Tableau, z: Tensor, k1: Tensor, t, dt):
    """One step of ``tableau`` from ``(t, z)`` with ``k1 = g(t, z)``: ``(z_new, g(z_new), err, stages, ks)``
    (``g(z_new)`` is the last stage for FSAL methods, one more evaluation otherwise). ``t`` and
    ``dt`` are floats, or 0-dim tensors in a compiled step."""
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
    """``x`` as ``(batch, n)``, in at least float32 (a flat state as it is: no operation)."""
    return _rows(_wide(x))


def _secant(a: Tensor, b: Tensor) -> Tensor:
    """``a - b`` as ``(batch, n)``, in at least float32 (half precision widened before the difference)."""
    return _flat(_wide(a) - _wide(b))


def _time_dtype(z: Tensor) -> torch.dtype:
    return torch.float32 if z.dtype in (torch.float16, torch.bfloat16) else z.dtype


def _rk_body(g, tableau: Tableau, z: Tensor, k1: Tensor, td, satol: float, srtol: float, estimate: bool,
             stop: Optional[StopInputs] = None):
    """An RK step with what the host reads of it: ``(z_new, g(z_new), error ratio, decay[, moments])``
    (the spectral moments of `spectral_moments` when ``estimate``), then with ``stop`` the new
    state's `stop_test` (with the check's ratios: in a compiled step they cost nothing, and the
    loop reads them when due). ``td = (t, dt)``: floats, or a 2-element tensor in a compiled step."""
    z_new, gz_new, err, stages, ks = rk_step(g, tableau, z, k1, td[0], td[1])
    ratio = error_ratio(_wide(err), _wide(z), _wide(z_new), satol, srtol)
    # the speed's fall over the step, ||g(z_new)|| / ||g(z)||: the next step's error scales with it
    decay = torch.linalg.vector_norm(_wide(gz_new)) / torch.linalg.vector_norm(_wide(k1)).clamp_min(
        torch.finfo(ratio.dtype).tiny)
    out = (z_new, gz_new, ratio, decay)
    if estimate:
        pairs = [(_secant(stages[-1], stages[-2]), _secant(ks[-1], ks[-2])),
                 (_secant(stages[1], stages[0]), _secant(ks[1], ks[0]))]
        out = out + (spectral_moments(pairs),)
    return out if stop is None else out + stop_test(gz_new, z_new, stop, True)


def _probe(g, z0: Tensor, gz0: Tensor, satol: float, srtol: float) -> Tensor:
    """What the first step's choice reads on the host, from two evaluations of ``g`` near the start:
    ``[d1, mu, moments...]``, with ``d1`` of `start_ratio`, ``mu = ||J g0|| / ||g0||`` over the
    batch and the `spectral_moments` of the Krylov pairs ``(g0, J g0)``, ``(J g0, J^2 g0)`` (the
    step's eigenvalue estimates: the rate at which ``||J^k g0||`` grows, and the first stability
    limit). Each product is a difference, ``J v ~ (g(z0 + eps v) - g0) / eps``, with ``eps`` making
    the displacement's rms ``sqrt(machine eps) (1 + rms(z0))``: the usual difference step of a
    Jacobian-vector product, above rounding and far below the field's curvature."""
    z, g0 = _wide(z0), _wide(gz0)
    rms = 1 / max(g0.numel(), 1) ** 0.5
    tiny = torch.finfo(g0.dtype).tiny
    reach = (1 + torch.linalg.vector_norm(z) * rms) * torch.finfo(z0.dtype).eps ** 0.5

    def difference(v: Tensor) -> Tuple[Tensor, Tensor]:
        zp = z0 + (reach / (torch.linalg.vector_norm(v) * rms).clamp_min(tiny)).to(z0.dtype) * v.to(z0.dtype)
        # the displacement as rounded, not eps v: in low precision they differ
        return _wide(zp) - z, _wide(g(0.0, zp)) - g0

    dz1, dg1 = difference(g0)
    dz2, dg2 = difference(dg1)
    mu = torch.linalg.vector_norm(dg1) / torch.linalg.vector_norm(dz1).clamp_min(tiny)
    moments = spectral_moments([(_flat(dz1), _flat(dg1)), (_flat(dz2), _flat(dg2))])
    return torch.cat([torch.stack([start_ratio(g0, z, satol, srtol), mu]), moments])


class _TimeStepper(SteadyStateSolver):
    """What the time-stepping families share: step tolerances, the controller's options, and
    the compiled step."""

    def __init__(self, step_tol_factor: float, min_step_tol: float, max_step: float, stall_time: float,
                 compile: bool, **loop_options):
        super().__init__(**loop_options)
        # small accurate steps on a rotation see no new lowest residual for a good part of a period
        self.stall_time = positive_float("stall_time", stall_time)
        self.step_tol_factor = positive_float("step_tol_factor", step_tol_factor)
        self.min_step_tol = positive_float("min_step_tol", min_step_tol)
        self.max_step = float_in("max_step", max_step, 0.0, math.inf)  # inf: no bound
        self.compile = boolean("compile", compile)

    def _step_tolerances(self, options: SolveOptions) -> Tuple[float, float]:
        return (max(options.atol * self.step_tol_factor, self.min_step_tol),
                max(options.rtol * self.step_tol_factor, self.min_step_tol))

    def _compiled(self, name: str, fn) -> Optional[CompiledStep]:
        """The solver's compiled ``fn`` (made on first use), ``None`` with ``compile=False``."""
        if not self.compile:
            return None
        steps = self.__dict__.setdefault("_steps", {})
        if name not in steps:
            steps[name] = CompiledStep(fn, f"{type(self).__name__} {name}")
        return steps[name]

    def _numbers(self, z: Tensor, *values: float) -> Tensor:
        """``values`` (the time, the step, the weights) as one tensor for a compiled step: one
        operation, and the graph does not change with them."""
        return torch.tensor(values, dtype=_time_dtype(z), device=z.device)


class RKControl(NamedTuple):
    """A Runge-Kutta solve's step control: the next step (``None`` before the first, which the
    first proposal chooses), the stability state, and the batch the compiled step runs on
    (per-sample termination shrinks it: the rest run eagerly)."""

    dt: Optional[float]
    stability: Stability
    batch: int


class ODESteadyStateSolver(_TimeStepper):
    """Explicit Runge-Kutta integration of ``dz/dt = g(t, z)`` to steady state.

    Adaptive methods (tsit5, dopri5: torchdyn's tableaus, stepped as `Tableau` data) control
    the local error at ``step_tol_factor * (atol, rtol)``, floored at ``min_step_tol``, and
    bound each step by the stability limit estimated from the step's own stages (Rayleigh-Ritz
    on the pairs ``(Y_s - Y_{s-1}, k_s - k_{s-1})`` and ``(Y_2 - z, k_2 - k_1)``, no extra
    evaluation; see ``_step_control``). The first step's error is predicted from two more
    evaluations near the start (``J g0`` and ``J^2 g0``, `StepController.first_step`), made only
    when the start does not already meet the stop test; their eigenvalue estimates bound the
    first step by the stability limit too. Fixed-step torchdyn steppers (euler, midpoint, rk4)
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
        compile: run each adaptive step (its stages with their evaluations of ``g``, the
            combinations, the error ratio, the eigenvalue moments, and the new state's stop test
            with the best iterate: the loop's `stop_test`) as one ``torch.compile``d body (see
            ``_compile``). Default ``False``: compiling costs about 10 s per state
            shape, dtype and step variant on a CPU, more than a short training run saves (at
            the paper's size a step saves a fraction of a millisecond; see
            ``docs/benchmarks.md``); worth it for long runs at a fixed shape. Falls back to
            eager, with one warning, where compilation is unavailable.
        **loop_options: ``stall_patience``, ``divergence_factor``, ``per_sample``: the solve
            loop's tests (`SteadyStateSolver`).
    """

    def __init__(self, stepper: Union[str, nn.Module] = "tsit5", step_tol_factor: float = 1.0,
                 min_step_tol: float = 1e-6, max_step: float = math.inf, step_size: float = 1.0,
                 stall_time: float = 10.0, compile: bool = False, **loop_options):
        super().__init__(step_tol_factor, min_step_tol, max_step, stall_time, compile, **loop_options)
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
        if self.compile and self._tableau is None:
            raise ValueError(f"compile=True needs an adaptive stepper with a tableau (tsit5, dopri5), got {stepper!r}: "
                             "fixed-step torchdyn steppers run through torchdyn's own step")
        self.stepper = stepper
        self._fixed_of = {}
        if self._tableau is not None:
            self._control = StepController(self._tableau.order, self._tableau.region, max_step=self.max_step)

    @property
    def adaptive(self) -> bool:
        return self._tableau is not None

    @property
    def fuses_stop_test(self) -> bool:
        """The compiled step fuses the new state's stop test (`stop_test`) with the step."""
        return self.compile and self.adaptive

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
            return State(z0, gz0, 0.0, control=self.step_size)
        # the first step is chosen by the first proposal (`_first_control`): a start that already
        # meets the stop test never pays for its probe
        return State(z0, gz0, 0.0, control=RKControl(None, self._control.start(), z0.shape[0]))

    def _first_control(self, g, state: State, satol: float, srtol: float) -> RKControl:
        """The first step's control: `StepController.first_step` from a probe of the field (two
        evaluations, one synchronisation), within the stability limit of the probe's eigenvalue
        estimates."""
        d1, mu, *moments = _probe(g, state.z, state.gz, satol, srtol).tolist()
        stability = self._control.refresh(state.control.stability, moments)
        dt = self._control.first_step(first_step(d1, self._tableau.order), d1, mu, self._control.rate(mu, moments),
                                      self._tableau.error)
        return state.control._replace(dt=min(dt, stability.limit), stability=stability)

    def propose(self, g, state, options, stop: Optional[StopInputs] = None):
        if not self.adaptive:
            dt = state.control
            t = torch.full((), state.t, dtype=state.z.dtype, device=state.z.device)
            z_new = self._fixed_stepper(state.z).step(g, state.z, t, dt, k1=state.gz)[1]
            return Proposal(z_new, g(state.t + dt, z_new), state.t + dt)
        control = state.control
        satol, srtol = self._step_tolerances(options)
        first = control.dt is None
        if first:
            control = self._first_control(g, state, satol, srtol)
        estimate = self._control.wants_estimate(control.dt, control.stability)
        step = self._compiled("step", _rk_body)
        tested = ()
        if step is not None and state.z.shape[0] == control.batch:
            td = self._numbers(state.z, state.t, control.dt)
            out = step(estimate, g, self._tableau, state.z, state.gz, td, satol, srtol, estimate, stop,
                       evaluations=(g, self._tableau.evaluations))
            out, tested = out[:4 + estimate], out[4 + estimate:]
        else:  # eager: the loop tests the new state
            out = _rk_body(g, self._tableau, state.z, state.gz, (state.t, control.dt), satol, srtol, estimate)
        return Proposal(out[0], out[1], state.t + control.dt, signals=out[2:], payload=(control,) if first else (),
                        tested=tested)

    def decide(self, g, state, proposal, signals, options, stop: Optional[StopInputs] = None):
        if not self.adaptive:
            return State(proposal.z, proposal.gz, proposal.t, control=state.control), True
        control, (ratio, decay) = proposal.payload[0] if proposal.payload else state.control, signals[:2]
        stability = self._control.refresh(control.stability, signals[2:])
        control = RKControl(self._control.next_step(control.dt, ratio, stability.limit, decay=decay), stability,
                            control.batch)
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


class VCAB3Memory(NamedTuple):
    """VCAB3's history (tensors with a leading batch dimension): the last three evaluations of
    ``g``, newest first, and the secants ``(z_{n+1} - z_n, g_{n+1} - g_n)`` of the last two steps
    (the eigenvalue estimates' pairs)."""

    evals: List[Tensor]
    secants: List[Tuple[Tensor, Tensor]]


class VCAB3Control(NamedTuple):
    """VCAB3's step control: the next step, the times of the evaluations in memory (newest
    first), the stability state, and the batch the compiled step runs on."""

    dt: float
    times: Tuple[float, ...]
    stability: Stability
    batch: int


def _ab_body(z: Tensor, evals: Sequence[Tensor], weights, satol: float, srtol: float,
             secants: Sequence[Tuple[Tensor, Tensor]], estimate: bool):
    """An Adams-Bashforth step with its error ratio: ``(z_new, ratio[, moments])``. ``weights``:
    the step's weights then their difference to the lower order's, floats or one tensor."""
    n = len(evals)
    z_new = combine(z, evals, weights[:n])
    err = combine(None, evals, weights[n:])
    ratio = error_ratio(_wide(err), _wide(z), _wide(z_new), satol, srtol)
    if not estimate:
        return z_new, ratio
    pairs = [(_flat(dz), _flat(dg)) for dz, dg in secants]
    return z_new, ratio, spectral_moments((pairs + pairs)[:2])


def _ab_point(g, t, z: Tensor, z_old: Tensor, g_old: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """VCAB3's accepted point ``z`` at time ``t``: ``(g(z), the secant z - z_old, g(z) - g_old)``."""
    gz = g(t, z)
    return gz, z - z_old, gz - g_old


def _ab_accept(g, t: Tensor, z: Tensor, z_old: Tensor, g_old: Tensor, stop: StopInputs):
    """`_ab_point` at time ``t[0]`` (a tensor: the graph does not change with it), then the point's
    `stop_test` (with the check's ratios, read when due): VCAB3's compiled accept."""
    point = _ab_point(g, t[0], z, z_old, g_old)
    return point + stop_test(point[0], z, stop, True)


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
        compile: compile the steps that estimate eigenvalues (the combination, the error ratio
            and the spectral moments, a few dozen small operations) once the history is full, and
            each accepted point (its evaluation of ``g``, the secant and the point's stop test,
            `stop_test`), as for `ODESteadyStateSolver`. The other steps (about ten operations)
            stay eager: a compiled call costs more than they do, by itself and in its guards on
            the network's parameters (``benchmarks/results/compiled_bodies.md``). Default
            ``False``, for the same reason as there.
        **loop_options: ``stall_patience``, ``divergence_factor``, ``per_sample``: the solve
            loop's tests (`SteadyStateSolver`).
    """

    def __init__(self, step_tol_factor: float = 1.0, min_step_tol: float = 1e-6, max_step: float = math.inf,
                 max_factor: float = 2.0, stall_time: float = 10.0, compile: bool = False, **loop_options):
        super().__init__(step_tol_factor, min_step_tol, max_step, stall_time, compile, **loop_options)
        self.max_factor = float_in("max_factor", max_factor, 1.0, math.inf, high_open=True)
        self._control = StepController(3, _ab3_region(), max_factor=self.max_factor, max_step=self.max_step)

    def init(self, g, z0, gz0, options):
        satol, srtol = self._step_tolerances(options)
        dt = min(first_step(float(start_ratio(_wide(gz0), _wide(z0), satol, srtol)), 1), self.max_step)
        return State(z0, gz0, 0.0, memory=VCAB3Memory([gz0], []),
                     control=VCAB3Control(dt, (0.0,), self._control.start(), z0.shape[0]))

    @property
    def fuses_stop_test(self) -> bool:
        """The compiled accept fuses the accepted point's stop test (`stop_test`) with its evaluation."""
        return self.compile

    def _compiled_step(self, state: State, estimate: bool) -> bool:
        """Whether the compiled step runs: a step that estimates eigenvalues, with the history full
        (the start-up's two steps of lower order stay eager: two more compiles for two steps) and
        the batch whole."""
        return (self.compile and estimate and len(state.memory.evals) == 3
                and state.z.shape[0] == state.control.batch)

    def propose(self, g, state, options, stop: Optional[StopInputs] = None):
        evals, secants = state.memory
        control = state.control
        if len(evals) == 1:  # the Euler start: no error estimate yet, nothing for the host to read
            return Proposal(combine(state.z, evals, [control.dt]), None, state.t + control.dt)
        nodes = [s - state.t for s in control.times]
        w = adams_bashforth_weights(nodes, control.dt)
        w_low = adams_bashforth_weights(nodes[:-1], control.dt) + [0.0]
        weights = w + [wi - wl for wi, wl in zip(w, w_low)]
        satol, srtol = self._step_tolerances(options)
        estimate = self._control.wants_estimate(control.dt, control.stability)
        if self._compiled_step(state, estimate):
            out = self._compiled("step", _ab_body)(
                estimate, state.z, evals, self._numbers(state.z, *weights), satol, srtol, secants, estimate)
        else:
            out = _ab_body(state.z, evals, weights, satol, srtol, secants, estimate)
        return Proposal(out[0], None, state.t + control.dt, signals=out[1:])

    def decide(self, g, state, proposal, signals, options, stop: Optional[StopInputs] = None):
        evals, secants = state.memory
        control = state.control
        stability = self._control.refresh(control.stability, signals[1:])
        if len(evals) == 1:  # the Euler start keeps its guessed step
            ratio, next_dt = 0.0, control.dt
        else:
            ratio = signals[0]
            next_dt = self._control.next_step(control.dt, ratio, stability.limit, order=len(evals))
        if not ratio <= 1:
            return State(state.z, state.gz, state.t, state.memory, control._replace(dt=next_dt, stability=stability)), False
        tested = ()
        if self.compile and stop is not None and state.z.shape[0] == control.batch:
            out = self._compiled("accept", _ab_accept)(
                None, g, self._numbers(proposal.z, proposal.t), proposal.z, state.z, evals[0], stop,
                evaluations=(g, 1))
            (gz, dz, dg), tested = out[:3], out[3:]
        else:  # eager: the loop tests the accepted point
            gz, dz, dg = _ab_point(g, proposal.t, proposal.z, state.z, evals[0])
        memory = VCAB3Memory([gz] + evals[:2], [(dz, dg)] + secants[:1])
        control = VCAB3Control(next_dt, (proposal.t,) + control.times[:2], stability, control.batch)
        return State(proposal.z, gz, proposal.t, memory, control, tested), True
