"""The one solve loop. Every forward solver, continuous or discrete, runs through
`steady_state_solve`, which owns what is common to all of them:

- the stop test (`SolveOptions.termination`): by default per sample ``i``
  ``rms(g(z_i) / (atol + rtol |z_i|)) <= 1`` (the Hairer root-mean-square norm of torchdyn's
  and torchdiffeq's step control, taken per sample), or DiffEqCallbacks' element-wise rule, or
  DeepEquilibriumNetworks.jl's one norm over the batch (`_Rule`);
- the budget (``max_steps`` accepted + rejected steps), the one count of evaluations, the
  best iterate of each sample (lowest residual), per-sample termination, the non-finite,
  divergence and stall tests, the kept states, and the `SteadyStateSolution`, built once;
- one host synchronisation per step: every number the loop or the solver's step control
  needs on the host is read in one ``tolist()``.

A solver family only knows its own step (`SteadyStateSolver`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, List, NamedTuple, Optional, Sequence, Tuple

import torch
from torch import Tensor

from ._checks import boolean, float_in, positive_int
from ._field import Field
from ._solution import NonFiniteError, Result, SavedState, SolveOptions, SteadyStateSolution

VectorField = Callable[[Tensor, Tensor], Tensor]
IMPROVEMENT = 0.99  # progress: a sample's residual falls below 99% of its best at the start of the stretch
NON_FINITE_REJECTIONS = 10  # consecutive rejected non-finite proposals before the solve gives up
CHECK_EVERY = 4  # iterates between the progress and divergence checks (the stop test is every iterate's)


def _wide(x: Tensor) -> Tensor:
    """``x`` detached, in at least float32: norms of half-precision tensors overflow."""
    if x.requires_grad:  # under no_grad (implicit sensitivities) nothing to detach: one operation less per use
        x = x.detach()
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _rows(x: Tensor) -> Tensor:
    """``x`` as ``(batch, n)`` (a flat state as it is: no operation)."""
    return x if x.dim() == 2 else x.reshape(x.shape[0], -1)


def _per_sample(dz: Tensor, z: Tensor, atol: float, rtol: float) -> Tuple[Tensor, Tensor, Tensor]:
    """Per sample: ``rms(dz / (atol + rtol |z|))``, ``||dz||`` and ``||atol + rtol |z| ||``."""
    scale = _rows(_wide(z).abs().mul_(rtol).add_(atol))  # in place: one allocation, not three
    g = _rows(_wide(dz))
    sigma = torch.linalg.vector_norm(scale, dim=1)
    residual = torch.linalg.vector_norm(torch.div(g, scale, out=scale), dim=1).mul_(1 / max(g.shape[1], 1) ** 0.5)
    return residual, torch.linalg.vector_norm(g, dim=1), sigma


def scaled_residual(dz: Tensor, z: Tensor, atol: float, rtol: float) -> Tensor:
    """Per-sample ``rms(dz / (atol + rtol |z|))``; shape ``(batch,)``, at least float32."""
    return _per_sample(dz, z, atol, rtol)[0]


class _Rule:
    """A stop rule on the residual ``g(z)``: for each group (a sample, or the whole batch),
    ``(residual, speed, tolerance)``, each of shape ``(groups,)``: the rule's residual (``<= 1``
    where it is met), the size of ``g`` (``nu``) and the size of the tolerance it is measured
    against (``sigma``), both in the rule's own norm. A group is a sample (``per_sample``:
    samples can leave the batch once they meet the rule) or the batch (one group: it stops, and
    keeps its best iterate, as one)."""

    per_sample = True

    def measure(self, gz: Tensor, z: Tensor, options: SolveOptions) -> Tuple[Tensor, Tensor, Tensor]:
        raise NotImplementedError

    def tolerance(self, size: Tensor, options: SolveOptions) -> Tensor:
        """``sigma`` of a state of element-wise magnitude ``size`` (the reference scale)."""
        raise NotImplementedError


class _PerSample(_Rule):
    """``rms(g(z_i) / (atol + rtol |z_i|))`` per sample; ``nu = ||g_i||``, ``sigma = ||atol + rtol |z_i| ||``."""

    def measure(self, gz, z, options):
        return _per_sample(gz, z, options.atol, options.rtol)

    def tolerance(self, size, options):
        return torch.linalg.vector_norm((size * options.rtol + options.atol).reshape(size.shape[0], -1), dim=1)


class _Elementwise(_Rule):
    """``max(|g(z_i)| / max(atol, rtol |z_i|))`` per sample: every element has ``|g| <= atol``
    or ``|g| <= rtol |z|`` (DiffEqCallbacks' ``allDerivPass``); ``nu = max |g_i|``,
    ``sigma = max(atol, rtol max |z_i|)``."""

    def measure(self, gz, z, options):
        scale = _wide(z).abs().mul_(options.rtol).clamp_min_(options.atol).reshape(z.shape[0], -1)
        g = _wide(gz).abs().reshape(z.shape[0], -1)
        sigma = scale.amax(dim=1)
        return torch.div(g, scale, out=scale).amax(dim=1), g.amax(dim=1), sigma

    def tolerance(self, size, options):
        return (size.reshape(size.shape[0], -1).amax(dim=1) * options.rtol).clamp_min_(options.atol)


class _BatchRelative(_Rule):
    """``||g(z)||_2 / (rtol ||g(z) + z||_2)`` over the whole batch, one group
    (DeepEquilibriumNetworks.jl's ``norm(fx) / (norm(fx + x) + eps) < reltol``);
    ``nu = ||g||``, ``sigma = rtol ||f(z)||``."""

    per_sample = False

    def measure(self, gz, z, options):
        g = _wide(gz)
        nu = torch.linalg.vector_norm(g).reshape(1)
        sigma = torch.linalg.vector_norm(g + _wide(z)).mul_(options.rtol).reshape(1)
        # the authors' eps: an image of norm 0 gives inf, never 0 / 0
        return nu / (sigma + torch.finfo(g.dtype).tiny), nu, sigma

    def tolerance(self, size, options):
        return torch.linalg.vector_norm(size).mul(options.rtol).reshape(1)


RULES = {"per_sample": _PerSample(), "elementwise": _Elementwise(), "batch_relative": _BatchRelative()}


@dataclass
class State:
    """A solver's state between steps: the current iterate ``z``, ``gz = g(t, z)``, the time,
    and whatever the family keeps (``memory``: tensors with a leading batch dimension, which
    per-sample termination restricts to the remaining rows; ``control``: plain numbers)."""

    z: Tensor
    gz: Tensor
    t: float
    memory: Tuple = ()
    control: Tuple = ()
    tested: Tuple[Tensor, ...] = ()  # the iterate's `stop_test`, where an accepting ``decide`` fused it


@dataclass
class Proposal:
    """A proposed step: the new iterate, ``g`` there if the step already evaluated it (``None``
    for a step that evaluates only once accepted, as VCAB3), the step's own tensors whose
    values it needs on the host to accept or reject (``signals``: 0-dim or 1-dim, read in the
    loop's one synchronisation and passed to ``decide`` as one flat list of floats), and
    anything else it passes to ``decide`` (``payload``)."""

    z: Tensor
    gz: Optional[Tensor]
    t: float
    signals: Tuple[Tensor, ...] = ()
    payload: Tuple = ()
    tested: Tuple[Tensor, ...] = ()  # the candidate's `stop_test`, where the step fused it (``fuses_stop_test``)


class SteadyStateSolver:
    """Base class of the forward solvers: small objects that know one step.

    ``init(g, z0, gz0, options) -> State``, ``propose(g, state, options) -> Proposal``, and
    ``decide(g, state, proposal, signals, options) -> (State, accepted)`` (``signals``: the
    proposal's signals as floats; a rejection returns the old iterate with new step control).
    The loop (`steady_state_solve`) does the rest.

    Args:
        stall_patience: stop (`Result.stalled`) after this many accepted steps in which no
            unconverged sample's residual fell below 99% of its best at the start of those
            steps (a slow but steady decay is progress). Default ``30``.
        divergence_factor: stop (`Result.diverged`) when the iterate grows beyond this factor
            times ``1 + max |z0| + max |z0 + g(z0)|`` (over the batch), when every unconverged sample's
            residual exceeds its best by this factor, or when the residual stalls with an
            iterate beyond the square root of this factor times that scale. Default ``1e4``.
        per_sample: drop samples from the batch once they meet the tolerance, so they stop
            costing evaluations while the rest continue (the vector field is then called on
            the remaining rows, with the injected input restricted to them). Default
            ``False``: a field whose output for one sample depends on the others (batch norm
            in training mode) would change. Only for solves under ``torch.no_grad()`` (the
            implicit sensitivities, inference), and only under a per-sample stop rule
            (``termination='batch_relative'`` stops the batch as one: no row can leave it).
    """

    continuous: bool = True
    # propose and decide take ``stop`` (`StopInputs`); a compiled step returns the candidate's `stop_test`
    # in ``Proposal.tested``, a compiled accept the accepted iterate's in ``State.tested`` (a proposal
    # without ``g``); otherwise the loop tests them itself
    fuses_stop_test: bool = False
    stall_time: float = 0.0  # time without progress before a stall, besides the steps (time-steppers)

    def __init__(self, stall_patience: int = 30, divergence_factor: float = 1e4, per_sample: bool = False):
        self.stall_patience = positive_int("stall_patience", stall_patience)
        self.divergence_factor = float_in("divergence_factor", divergence_factor, 1.0, math.inf, high_open=True)
        self.per_sample = boolean("per_sample", per_sample)

    def init(self, g: VectorField, z0: Tensor, gz0: Tensor, options: SolveOptions) -> State:
        return State(z0, gz0, 0.0)

    def propose(self, g: VectorField, state: State, options: SolveOptions) -> Proposal:
        raise NotImplementedError

    def decide(self, g: VectorField, state: State, proposal: Proposal, signals: Sequence[float],
               options: SolveOptions) -> Optional[State]:
        gz = proposal.gz if proposal.gz is not None else g(proposal.t, proposal.z)
        return State(proposal.z, gz, proposal.t, state.memory, state.control), True

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({opts})"


class Signals(NamedTuple):
    """What the loop reads on the host about one measured iterate, in the step's one
    synchronisation: the worst best residual over the open samples, ``max |z|``, and on checks
    (every ``CHECK_EVERY`` accepted iterates) the progress ratio and the residual's rise."""

    worst: float
    size: float
    progress: Optional[float] = None
    rise: Optional[float] = None


def _host_read(*groups: Sequence[Tensor]) -> List[List[float]]:
    """One host synchronisation for every group of tensors (0-dim or 1-dim), split back per group
    by their sizes (metadata, no sync)."""
    flat = [p if p.dim() == 1 else p.reshape(-1) for group in groups for p in group]
    values = torch.cat(flat).tolist() if flat else []
    out, i = [], 0
    for group in groups:
        n = sum(p.numel() for p in group)
        out.append(values[i:i + n])
        i += n
    return out


@dataclass
class _Measure:
    """The stop-test quantities of one iterate, as tensors (read on the host in the step's sync)."""

    z: Tensor
    residual: Tensor  # the rule's residual, or the growth credit where that is larger (`_Tracker.measure`)
    rule_residual: Tensor  # the rule's residual alone
    credit: Tensor  # the growth credit (`_Tracker.measure`)
    speed: Tensor  # nu, the size of g
    tolerance: Tensor  # sigma, the size of the tolerance
    new_best: Tensor  # the samples' best residuals with this iterate's
    best_z: Tensor  # their best iterates with this one
    newly: Tensor  # the samples this iterate converges for the first time
    host: Tuple[Tensor, ...]  # the tensors of its `Signals`: worst best residual, max |z|, on checks (progress, rise)
    commits: int = 0  # the iterates committed before this one was measured: its best ones are against theirs

    def signals(self, values: Sequence[float]) -> Signals:
        return Signals(*values)


class StopInputs(NamedTuple):
    """What the stop test of an iterate reads besides the iterate (`stop_test`): the rule with the
    solve's options, the growth credit's reference tensors and the samples' best residuals. A
    compiled step takes it as an argument: its tensors are inputs of the graph, its numbers
    constants of it (the same for every step of every solve with these options)."""

    rule: "_Rule"
    options: SolveOptions
    rounding: float
    credit_unit: Tensor
    sigma_ref: Tensor
    best: Tensor
    best_z: Tensor
    reference_open: Tensor


def _advance(res: Tensor, best: Tensor, z: Tensor, best_z: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """The samples' best residuals and iterates with ``z`` (residuals ``res``) accepted against the
    best so far (``best``, ``best_z``), and the samples it converges for the first time."""
    better = (res < best).view((-1,) + (1,) * (z.dim() - 1))
    return torch.minimum(best, res), torch.where(better, z, best_z), (res <= 1) & (best > 1)


def stop_test(gz: Tensor, z: Tensor, inputs: StopInputs, check: bool) -> Tuple[Tensor, ...]:
    """The stop test of the iterate ``z`` with ``gz = g(z)`` (`_Tracker.measure`): ``(residual,
    rule residual, credit, speed, tolerance, new best residuals, new best iterates, newly
    converged, worst, size)``, and with ``check`` the progress and rise ratios (one tensor of 2);
    the best ones as they are once ``z`` is accepted. Tensor operations only: the loop runs it, or
    a compiled step fuses it with the step that produced ``z``."""
    rule_res, nu, sigma = inputs.rule.measure(gz, z, inputs.options)
    earned = sigma * (nu + inputs.rounding * sigma) / inputs.credit_unit
    credit = torch.where(sigma > inputs.sigma_ref, earned, 0.0)
    res = torch.maximum(rule_res, credit)
    best = inputs.best
    new_best, best_z, newly = _advance(res, best, z, inputs.best_z)
    worst = new_best.amax()  # NaN propagates to the host check
    # max |z| every iterate: a state beyond the divergence bound is never converged (a residual
    # f(z) - z that rounds to 0 on a huge z met every rule)
    size = _wide(z).abs().amax()
    tested = (res, rule_res, credit, nu, sigma, new_best, best_z, newly, worst, size)
    if not check:
        return tested
    # progress: the best residuals (improvements between checks count) over those at the start of
    # the stretch; rise: the residual over the best. Converged samples get a 0 in the denominators,
    # so x / 0 = inf (0 / 0 = NaN, made inf) leaves them out of the minima
    open_best = torch.where(best > 1, best, 0.0)
    ratios = torch.stack([new_best / inputs.reference_open, res / open_best])
    return tested + (ratios.nan_to_num_(math.inf).amin(1),)


class _Tracker:
    """Per-sample bookkeeping of one solve: best iterate, convergence, stall and divergence."""

    def __init__(self, z0: Tensor, gz0: Tensor, options: SolveOptions, solver: SteadyStateSolver, nfe_start: int):
        self.options, self.solver, self.nfe_start = options, solver, nfe_start
        self.rule = RULES[options.termination]
        self.batch = batch = z0.shape[0]
        groups = batch if self.rule.per_sample else 1
        image = (_wide(z0) + _wide(gz0)).abs()
        # max |f(z0)| over the batch; with max |z0| (the first measure's size) the divergence test's unit
        self.image_size = image.amax()
        # the start's scale and residual, against which growth of the tolerance must be earned
        # (`measure`): sigma at max(|z0|, |f(z0)|), and sigma_ref * max(nu_0, sigma_ref)
        self.sigma_ref = self.rule.tolerance(torch.maximum(_wide(z0).abs(), image), options)
        nu0 = self.rule.measure(gz0, z0, options)[1]
        self.credit_unit = (self.sigma_ref * torch.maximum(nu0, self.sigma_ref)).clamp_min_(torch.finfo(nu0.dtype).tiny)
        # the residual's rounding floor per unit of tolerance: g = f(z) - z is known to eps |z| ~ eps sigma / rtol
        self.rounding = torch.finfo(z0.dtype).eps / options.rtol if options.rtol > 0 else 0.0
        self.last: Optional[_Measure] = None  # the last committed iterate's measure
        self.commits = 0  # iterates committed
        self.best_z = z0
        self.best_res = torch.full((groups,), math.inf, device=z0.device)
        self.nu0 = nu0
        # the best residuals of the unconverged samples (0 for converged ones) at the start of the
        # current stretch without progress
        self.reference_open = self.best_res
        self.checked, self.unchecked = False, 0  # a check was committed; accepted iterates since the last one
        self.nfe_per_sample = torch.full((batch,), -1, dtype=torch.long, device=z0.device)
        self.rows: Optional[Tensor] = None  # the samples still stepped (None: all)
        self.stall, self.stall_since = 0, 0.0  # steps and time since the last progress
        self.growth = 0.0  # the latest max |z| / (divergence_factor * start scale)
        self.unit = 1.0  # 1 + the start's scale, read with the first measure
        self.states: List[SavedState] = []  # at SolveOptions.save_steps
        self.evenly: List[SavedState] = []  # thinned buffer for SolveOptions.save_evenly
        self.stride = 1

    def _sub(self, x: Tensor) -> Tensor:
        return x if self.rows is None else x.index_select(0, self.rows)

    def measure(self, z: Tensor, gz: Tensor) -> _Measure:
        """The stop test of an iterate, and every ``CHECK_EVERY`` iterates the progress and
        divergence quantities too (a stall takes 30 steps and a divergence grows for many:
        checking them less often saves a third of the loop's tensor operations).

        The residual is the rule's, or the growth credit ``sigma nu / (sigma_ref nu_0)`` where that
        is larger and the tolerance has grown past its start (``sigma > sigma_ref``): a tolerance
        with a relative part, ``|g| <= atol + rtol |z|``, is met by any state moving at a bounded
        speed ``|g| = c`` once ``|z| >= c / rtol``, without ``g`` falling at all: the tolerance grew
        to meet the residual. A steady state is where the motion stops, ``g(z*) = 0``, so the
        relative part is only credited as far as the residual itself fell: the growth factor of the
        tolerance since the start, ``G = sigma / sigma_ref``, may not exceed the residual's fall
        ``F = nu_0 / nu``; ``G <= F`` is ``credit <= 1``. ``sigma_ref`` is taken at
        ``max(|z0|, |f(z0)|)`` (the start and its first image: from ``z0 = 0`` the state's natural
        size is ``f(0, x)``, not 0), ``nu_0`` floored at ``sigma_ref`` (a start that already meets
        the rule needs no fall), and ``nu`` counted only down to its rounding level ``eps |z|``
        (``f(z) - z`` of a huge ``z`` rounds to 0 in float32: no evidence of a fall). A converging solve meets the credit long before the rule (the
        residual falls by orders of magnitude while the tolerance changes by ``|z*| / |f(z0)|``),
        so its end point, NFE and residual are the rule's alone; a start already at ``z*``
        (``G = 1``) converges at once; a state moving at non-decreasing speed (``F <= 1 < G``) never
        converges, whatever rule: its residual rises with the credit and the stall and divergence
        tests end it as ``'diverged'`` (`motion`)."""
        return self.measured(z, stop_test(gz, z, self.stop_inputs(), self.check_due), self.check_due)

    @property
    def check_due(self) -> bool:
        """Whether the next accepted iterate is a check (the progress and divergence tests): every
        ``CHECK_EVERY`` accepted iterates and the first, counted on accepted ones, so rejected
        proposals never take a check's place."""
        return not (self.checked and self.unchecked < CHECK_EVERY - 1)

    def stop_inputs(self) -> StopInputs:
        """The inputs of `stop_test` for the samples still stepped."""
        return StopInputs(self.rule, self.options, self.rounding, self._sub(self.credit_unit),
                          self._sub(self.sigma_ref), self._sub(self.best_res), self._sub(self.best_z),
                          self._sub(self.reference_open))

    def measured(self, z: Tensor, tested: Sequence[Tensor], check: bool) -> _Measure:
        """The `_Measure` of ``z`` from its `stop_test` (computed with ``check`` or with more: a
        compiled step computes the check's ratios at every step, and they are read only when due)."""
        host = tuple(tested[8:11]) if check else tuple(tested[8:10])
        return _Measure(z, *tested[:8], host, self.commits)

    def commit(self, m: _Measure, host: Signals, nfe: int, t: float, accepted: int) -> Optional[Result]:
        """Record an accepted iterate; return the result if the solve ends with it."""
        worst = host.worst
        if not math.isfinite(worst):
            raise NonFiniteError(f"non-finite values appeared at step {accepted}, t={t:.4g}: the vector field "
                                 "produced NaN/inf, or the dynamics diverge. " + Result.non_finite.remedy)
        if m.commits != self.commits:  # an iterate was committed since m was measured: its best ones are stale
            m.new_best, m.best_z, m.newly = _advance(m.residual, self._sub(self.best_res), m.z, self._sub(self.best_z))
        self.commits += 1
        if self.rows is None:
            self.best_z, self.best_res = m.best_z, m.new_best
            self.nfe_per_sample.masked_fill_(m.newly, self.nfe_start + nfe)
        else:
            self.best_z = self.best_z.index_copy(0, self.rows, m.best_z)
            self.best_res = self.best_res.index_copy(0, self.rows, m.new_best)
            self.nfe_per_sample = self.nfe_per_sample.index_copy(
                0, self.rows, torch.where(m.newly, self.nfe_start + nfe, self.nfe_per_sample[self.rows]))
        self._keep(accepted, t, m.z)
        self.last = m
        self.unchecked += 1
        self.growth = host.size / (self.solver.divergence_factor * self.unit)
        if self.growth > 1:
            return Result.diverged
        if worst <= 1:
            return Result.converged
        if host.progress is None:
            return None
        self.checked = True
        progress, rise = host.progress, host.rise
        if rise > self.solver.divergence_factor:
            return Result.diverged
        if progress < IMPROVEMENT:  # a new stretch: progress is measured against the best residuals now
            self.stall, self.stall_since = 0, t
            self.reference_open = torch.where(self.best_res > 1, self.best_res, 0.0)
        else:
            self.stall += self.unchecked
        self.unchecked = 0
        if self.stall >= self.solver.stall_patience and t - self.stall_since >= self.solver.stall_time:
            return Result.diverged if self.running_away else Result.stalled
        return None

    def motion(self) -> Tuple[bool, bool]:
        """How the unconverged samples move at the last iterate, for a failed solve's result and
        message (one host read): ``(drifting, moving)``.

        Drifting: a sample is held back by the growth credit, not by the rule
        (``credit > max(1, rule residual)``), and its speed grew less than the square root of its
        tolerance's growth (``(nu / nu_0)^2 <= G``): a state moving on at a bounded speed, with no
        equilibrium on its path, not one running away from a repelling one (whose speed grows with
        the state, ``nu / nu_0 ~ G``). Moving: a sample's speed has not even halved since the
        start (``nu >= nu_0 / 2``): a stall that circles a centre or drifts, not one at the
        rounding noise of a nearly solved problem."""
        m = self.last
        if m is None:
            return False, False
        sigma_ref, nu0, open_ = self._sub(self.sigma_ref), self._sub(self.nu0), self._sub(self.best_res) > 1
        held = open_ & (m.credit > 1) & (m.credit >= m.rule_residual)
        drifting = held & (m.speed.square() * sigma_ref <= nu0.square() * m.tolerance)
        flags = torch.stack([drifting.any(), (open_ & (m.speed >= 0.5 * nu0)).any()]).tolist()
        return bool(flags[0]), bool(flags[1])

    @property
    def running_away(self) -> bool:
        """The residual is not falling while the state has grown far beyond its start: a state
        running away (its scaled residual saturates near 1 / rtol), not a stall or a slow solve."""
        factor = self.solver.divergence_factor
        return self.stall > 0 and self.growth * factor > factor ** 0.5

    def _keep(self, step: int, t: float, z: Tensor) -> None:
        """Keep the iterate of this accepted step if it is asked for (with per-sample termination,
        the stepped rows' current iterates and the finished rows' best ones)."""
        options = self.options
        if step not in options.save_steps and not (options.save_evenly and step % self.stride == 0):
            return
        full = (z if self.rows is None else self.best_z.index_copy(0, self.rows, z)).detach()
        if step in options.save_steps:
            self.states.append(SavedState(step, t, full))
        if options.save_evenly and step % self.stride == 0:
            self.evenly.append(SavedState(step, t, full))
            if len(self.evenly) > 2 * options.save_evenly + 1:  # thin out: every other one, half as often
                self.stride *= 2
                self.evenly = [s for s in self.evenly if s.step % self.stride == 0]

    def finish(self, z0: Tensor, t: float, iterations: int, nfe: int, accepted: int, rejected: int,
               result: Result, message: str) -> SteadyStateSolution:
        nfe_total = self.nfe_start + nfe
        nfe_per_sample = torch.where(self.nfe_per_sample < 0, nfe_total, self.nfe_per_sample)
        states = self.states
        if self.options.save_evenly:  # the iterates nearest to evenly spaced steps, z* excluded
            n, last = self.options.save_evenly, accepted
            wanted = sorted({round(last * i / (n + 1)) for i in range(1, n + 1)} - {last})
            states = [min(self.evenly, key=lambda s: abs(s.step - w)) for w in wanted] if self.evenly else []
            states = sorted({s.step: s for s in states + self.states}.values(), key=lambda s: s.step)
        residual = self.best_res if self.rule.per_sample else self.best_res.expand(self.batch).clone()
        return SteadyStateSolution(
            z_star=self.best_z, z0=z0, residual=residual, t=float(t), iterations=iterations, nfe=nfe_total,
            nfe_per_sample=nfe_per_sample, steps_accepted=accepted, steps_rejected=rejected, result=result,
            message=message, states=states)


DRIFT = ("the state drifts: it keeps moving at a speed that does not fall (its residual fell less than the "
         "tolerance's relative part grew with |z|: a lower scaled residual there is growth, not convergence), so the "
         "vector field has no equilibrium on its path. A field with no -z and no injected input (an MLP, as in "
         "torchdyn's quickstart) moves forever: write it as dz/dt = f(z, x) - z with the input x injected")


def _message(result: Result, solver: SteadyStateSolver, options: SolveOptions, t: float, iterations: int,
             nfe: int, residual: Tensor, stall: int, drift: bool = False, moving: bool = False) -> str:
    if result.successful:
        return ""
    where = f"t={t:.4g}, {iterations} steps" if solver.continuous else f"{iterations} iterations"
    rule = options.termination
    open_ = (f"{int((residual > 1).sum())} of {residual.numel()} samples unconverged" if RULES[rule].per_sample
             else "one norm over the batch")
    cause = {
        Result.max_steps: f"no steady state within max_steps={options.max_steps}",
        Result.diverged: DRIFT if drift else "the solve diverged",
        Result.stalled: f"the solve stalled (no unconverged sample improved by 1% in {stall} steps"
                        + ("; the state keeps moving at a speed that has not even halved since the start: it circles "
                           "or drifts, with no attracting equilibrium on its path; a steady state needs the DEQ form "
                           "dz/dt = f(z, x) - z with f contractive)" if moving else ")"),
    }[result]
    return (f"{cause} ({where}, {nfe} NFE): worst scaled residual {float(residual.max()):.3g} (1 = tolerance "
            f"atol={options.atol:g}, rtol={options.rtol:g}, termination={rule!r}), {open_}. "
            f"{result.remedy[0].upper()}{result.remedy[1:]}")


def steady_state_solve(g: VectorField, z0: Tensor, solver: SteadyStateSolver, options: SolveOptions, *,
                       nfe_start: int = 0) -> SteadyStateSolution:
    """Solve ``g(z) = 0`` from ``z0`` with ``solver`` (integrating ``dz/dt = g(t, z)`` to
    ``t = infinity`` for a continuous one); the record of what happened.

    Args:
        g: the vector field ``g(t, z)`` (``f(z, x) - z`` for a DEQ), a `Field` (its count of
            evaluations is the record's; its ``restrict`` gives per-sample termination) or a
            plain function (wrapped in one).
        z0: the start, shape ``(batch, *state)``.
        solver: a `SteadyStateSolver`.
        options: `SolveOptions` (tolerances, budget, kept states).
        nfe_start: evaluations already spent on ``z0`` (Skip Reg.'s ``f(0, x)``), counted in
            the record's ``nfe``.

    Runs with or without autograd: under ``torch.no_grad()`` for implicit sensitivities, with
    it to backpropagate through the steps (per-sample termination is then off).
    """
    if not isinstance(solver, SteadyStateSolver):
        raise TypeError(f"solver must be a SteadyStateSolver, got {solver!r}")
    count = g if isinstance(g, Field) else Field(g, z0)
    start = count.nfe  # evaluations before the solve (the initializer's) are nfe_start's
    gz0 = count(0.0, z0)
    if gz0.shape != z0.shape:
        raise ValueError(f"the vector field returned shape {tuple(gz0.shape)} for a state of shape {tuple(z0.shape)}")
    track = _Tracker(z0, gz0, options, solver, nfe_start)
    state = solver.init(count, z0, gz0, options)
    first = track.measure(z0, gz0)
    host, (image_size,) = _host_read(first.host, (track.image_size,))
    if not all(map(math.isfinite, host + [image_size])):
        raise NonFiniteError("non-finite values appeared in the vector field at the starting state. "
                             + Result.non_finite.remedy)
    signals = first.signals(host)
    track.unit = 1.0 + signals.size + image_size  # 1 + max |z0| + max |f(z0)|
    result = track.commit(first, signals, count.nfe - start, 0.0, 0)
    per_sample = (solver.per_sample and track.rule.per_sample and isinstance(g, Field)
                  and not torch.is_grad_enabled())
    accepted = rejected = bad = 0
    pending: Optional[_Measure] = None  # an accepted iterate whose stop test is read in the next sync
    while result is None:
        if accepted + rejected >= options.max_steps:
            if pending is not None:
                result = track.commit(pending, pending.signals(_host_read(pending.host)[0]), count.nfe - start, state.t,
                                      accepted)
                pending = None
            if result is None:
                result = Result.budget if options.budget else Result.diverged if track.running_away else Result.max_steps
            break
        proposal = solver.propose(count, state, options, **_fused(solver, track))
        if proposal.tested:
            cand = track.measured(proposal.z, proposal.tested, track.check_due)
        else:
            cand = None if proposal.gz is None else track.measure(proposal.z, proposal.gz)
        # the step's one synchronisation: the pending iterate's signals, the candidate's, the solver's
        pending_host, cand_host, signals = _host_read(pending.host if pending else (), cand.host if cand else (),
                                                      proposal.signals)
        if pending is not None:
            result, measured, pending = track.commit(pending, pending.signals(pending_host), count.nfe - start, state.t,
                                                     accepted), pending, None
            if result is not None:
                break
            if per_sample:
                state, proposal = _drop_converged(state, proposal, track, count, measured.residual)
        # the stop inputs as they are after the pending commit
        new, ok = solver.decide(count, state, proposal, signals, options, **_fused(solver, track))
        if not ok:
            state, rejected = new, rejected + 1
            bad = bad + 1 if (cand and not math.isfinite(cand_host[0])) or not all(map(math.isfinite, signals)) else 0
            if bad >= NON_FINITE_REJECTIONS:
                raise NonFiniteError(f"non-finite values appeared in {bad} consecutive proposed steps at t={state.t:.4g} "
                                     "(the step shrank each time). " + Result.non_finite.remedy)
            continue
        accepted, bad, state = accepted + 1, 0, new
        if cand is not None:
            result = track.commit(cand, cand.signals(cand_host), count.nfe - start, state.t, accepted)
        elif state.tested:
            pending = track.measured(state.z, state.tested, track.check_due)
        else:
            pending = track.measure(state.z, state.gz)
        if result is None and per_sample and cand is not None:
            state, _ = _drop_converged(state, None, track, count, cand.residual)
    iterations = accepted + rejected
    drift, moving = track.motion() if not result.successful else (False, False)
    if drift:  # ended by the stall or the budget, but the state moves on: not a stall, no steady state
        result = Result.diverged
    message = _message(result, solver, options, state.t, iterations, track.nfe_start + count.nfe - start,
                       track.best_res, track.stall, drift, moving)
    return track.finish(z0, state.t, iterations, count.nfe - start, accepted, rejected, result, message)


def _fused(solver: SteadyStateSolver, track: _Tracker) -> dict:
    """``propose`` / ``decide``'s ``stop`` keyword for a solver that fuses the stop test: its inputs as
    they are now (for the whole batch only; none for any other solver)."""
    return {"stop": track.stop_inputs()} if solver.fuses_stop_test and track.rows is None else {}


def _pick(x, keep: Tensor):
    """Rows ``keep`` of every tensor in ``x`` (nested tuples, named tuples, lists); anything else as is."""
    if isinstance(x, Tensor):
        return x.index_select(0, keep)
    if isinstance(x, tuple) and hasattr(x, "_fields"):  # a typed state record (NamedTuple)
        return type(x)(*(_pick(y, keep) for y in x))
    if isinstance(x, (tuple, list)):
        return type(x)(_pick(y, keep) for y in x)
    return x


def _drop_converged(state: State, proposal: Optional[Proposal], track: _Tracker, count: Field,
                    residual: Tensor) -> Tuple[State, Optional[Proposal]]:
    """Restrict the state, a pending proposal and ``g`` (`Field.restrict`) to the samples
    not yet converged."""
    open_ = residual > 1
    if bool(open_.all()):
        return state, proposal
    keep = open_.nonzero()[:, 0]
    track.rows = keep if track.rows is None else track.rows[keep]
    count.restrict(track.rows)
    state = State(_pick(state.z, keep), _pick(state.gz, keep), state.t, _pick(state.memory, keep), state.control)
    if proposal is not None:
        proposal = Proposal(_pick(proposal.z, keep), _pick(proposal.gz, keep), proposal.t, proposal.signals,
                            _pick(proposal.payload, keep))
    return state, proposal
