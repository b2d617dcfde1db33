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
from typing import Callable, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from ._checks import boolean, float_in, positive_int
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


def scaled_residual(dz: Tensor, z: Tensor, atol: float, rtol: float) -> Tensor:
    """Per-sample ``rms(dz / (atol + rtol |z|))``; shape ``(batch,)``, at least float32."""
    scale = _wide(z).abs().mul_(rtol).add_(atol)  # in place: one allocation, not three
    scaled = torch.div(_wide(dz), scale, out=scale).reshape(dz.shape[0], -1)
    return torch.linalg.vector_norm(scaled, dim=1).mul_(1 / max(scaled.shape[1], 1) ** 0.5)


class _Rule:
    """A stop rule: the residual of an iterate, shape ``(groups,)``, ``<= 1`` where the rule is
    met. A group is a sample (``per_sample``: samples can leave the batch once they meet it) or
    the whole batch (one group: the batch stops, and keeps its best iterate, as one)."""

    per_sample = True

    def residual(self, gz: Tensor, z: Tensor, options: SolveOptions) -> Tensor:
        raise NotImplementedError


class _PerSample(_Rule):
    """``rms(g(z_i) / (atol + rtol |z_i|))`` per sample."""

    def residual(self, gz, z, options):
        return scaled_residual(gz, z, options.atol, options.rtol)


class _Elementwise(_Rule):
    """``max(|g(z_i)| / max(atol, rtol |z_i|))`` per sample: every element has ``|g| <= atol``
    or ``|g| <= rtol |z|`` (DiffEqCallbacks' ``allDerivPass``)."""

    def residual(self, gz, z, options):
        scale = _wide(z).abs().mul_(options.rtol).clamp_min_(options.atol)
        ratio = torch.div(_wide(gz).abs(), scale, out=scale)
        return ratio.reshape(gz.shape[0], -1).amax(dim=1)


class _BatchRelative(_Rule):
    """``||g(z)||_2 / (rtol ||g(z) + z||_2)`` over the whole batch, one group
    (DeepEquilibriumNetworks.jl's ``norm(fx) / (norm(fx + x) + eps) < reltol``)."""

    per_sample = False

    def residual(self, gz, z, options):
        g = _wide(gz)
        image = torch.linalg.vector_norm(g + _wide(z))
        tiny = torch.finfo(g.dtype).tiny  # the authors' eps: an image of norm 0 gives inf, never 0 / 0
        return (torch.linalg.vector_norm(g) / (image.mul_(options.rtol).add_(tiny))).reshape(1)


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


class _Counted:
    """``g`` with its evaluations counted, called as ``g(t, z)`` with a float or tensor ``t``."""

    def __init__(self, g: VectorField, t_like: Tensor):
        self.g, self.n, self.restrict = g, 0, getattr(g, "on_rows", None)
        self._t = t_like

    def __call__(self, t, z: Tensor) -> Tensor:
        self.n += 1
        if not isinstance(t, Tensor):
            t = torch.full((), t, dtype=self._t.dtype, device=self._t.device)
        return self.g(t, z)


@dataclass
class _Measure:
    """The stop-test quantities of one iterate, as tensors (read on the host in the step's sync)."""

    z: Tensor
    residual: Tensor
    host: Tuple[Tensor, ...]  # worst best residual; on checks also max |z| and (progress ratio, residual rise)


class _Tracker:
    """Per-sample bookkeeping of one solve: best iterate, convergence, stall and divergence."""

    def __init__(self, z0: Tensor, gz0: Tensor, options: SolveOptions, solver: SteadyStateSolver, nfe_start: int):
        self.options, self.solver, self.nfe_start = options, solver, nfe_start
        self.rule = RULES[options.termination]
        self.batch = batch = z0.shape[0]
        groups = batch if self.rule.per_sample else 1
        # max |f(z0)| over the batch; with max |z0| (the first measure's size) the divergence test's unit
        self.image_size = (_wide(z0) + _wide(gz0)).abs().amax()
        self.best_z = z0
        self.best_res = torch.full((groups,), math.inf, device=z0.device)
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
        checking them less often saves a third of the loop's tensor operations)."""
        o = self.options
        res = self.rule.residual(gz, z, o)
        best = self._sub(self.best_res)
        new_best = torch.minimum(best, res)
        worst = new_best.amax()  # NaN propagates to the host check
        # a check every CHECK_EVERY accepted iterates (and the first): counted on accepted ones, so
        # rejected proposals never take a check's place
        if self.checked and self.unchecked < CHECK_EVERY - 1:
            return _Measure(z, res, (worst,))
        # progress: the best residuals (improvements between checks count) over those at the start of
        # the stretch; rise: the residual over the best. Converged samples get a 0 in the denominators,
        # so x / 0 = inf (0 / 0 = NaN, made inf) leaves them out of the minima
        open_best = torch.where(best > 1, best, 0.0)
        ratios = torch.stack([new_best / self._sub(self.reference_open), res / open_best])
        return _Measure(z, res, (worst, _wide(z).abs().amax(), ratios.nan_to_num_(math.inf).amin(1)))

    def commit(self, m: _Measure, host: Sequence[float], nfe: int, t: float, accepted: int) -> Optional[Result]:
        """Record an accepted iterate; return the result if the solve ends with it."""
        worst = host[0]
        if not math.isfinite(worst):
            raise NonFiniteError(f"non-finite values appeared at step {accepted}, t={t:.4g}: the vector field "
                                 "produced NaN/inf, or the dynamics diverge. " + Result.non_finite.remedy)
        best = self._sub(self.best_res)
        better = m.residual < best
        newly = (m.residual <= 1) & (best > 1)
        if self.rows is None:
            self.best_z = torch.where(better.view((-1,) + (1,) * (m.z.dim() - 1)), m.z, self.best_z)
            self.best_res = torch.minimum(best, m.residual)
            self.nfe_per_sample.masked_fill_(newly, self.nfe_start + nfe)
        else:
            keep = torch.where(better.view((-1,) + (1,) * (m.z.dim() - 1)), m.z, self.best_z.index_select(0, self.rows))
            self.best_z = self.best_z.index_copy(0, self.rows, keep)
            self.best_res = self.best_res.index_copy(0, self.rows, torch.minimum(m.residual, best))
            self.nfe_per_sample = self.nfe_per_sample.index_copy(
                0, self.rows, torch.where(newly, self.nfe_start + nfe, self.nfe_per_sample[self.rows]))
        self._keep(accepted, t, m.z)
        self.unchecked += 1
        if worst <= 1:
            return Result.converged
        if len(host) == 1:
            return None
        self.checked = True
        size, progress, rise = host[1:]
        self.growth = size / (self.solver.divergence_factor * self.unit)
        if self.growth > 1 or rise > self.solver.divergence_factor:
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


def _message(result: Result, solver: SteadyStateSolver, options: SolveOptions, t: float, iterations: int,
             nfe: int, residual: Tensor, stall: int) -> str:
    if result.successful:
        return ""
    where = f"t={t:.4g}, {iterations} steps" if solver.continuous else f"{iterations} iterations"
    rule = options.termination
    open_ = (f"{int((residual > 1).sum())} of {residual.numel()} samples unconverged" if RULES[rule].per_sample
             else "one norm over the batch")
    cause = {
        Result.max_steps: f"no steady state within max_steps={options.max_steps}",
        Result.diverged: "the solve diverged",
        Result.stalled: f"the solve stalled (no unconverged sample improved by 1% in {stall} steps)",
    }[result]
    return (f"{cause} ({where}, {nfe} NFE): worst scaled residual {float(residual.max()):.3g} (1 = tolerance "
            f"atol={options.atol:g}, rtol={options.rtol:g}, termination={rule!r}), {open_}. "
            f"{result.remedy[0].upper()}{result.remedy[1:]}")


def steady_state_solve(g: VectorField, z0: Tensor, solver: SteadyStateSolver, options: SolveOptions, *,
                       nfe_start: int = 0) -> SteadyStateSolution:
    """Solve ``g(z) = 0`` from ``z0`` with ``solver`` (integrating ``dz/dt = g(t, z)`` to
    ``t = infinity`` for a continuous one); the record of what happened.

    Args:
        g: the vector field ``g(t, z)`` (``f(z, x) - z`` for a DEQ); an ``on_rows(rows)``
            attribute, if present, gives ``g`` on a subset of the batch (per-sample termination).
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
    count = _Counted(g, z0)
    gz0 = count(0.0, z0)
    if gz0.shape != z0.shape:
        raise ValueError(f"the vector field returned shape {tuple(gz0.shape)} for a state of shape {tuple(z0.shape)}")
    track = _Tracker(z0, gz0, options, solver, nfe_start)
    state = solver.init(count, z0, gz0, options)
    first = track.measure(z0, gz0)
    host = torch.cat([p.reshape(-1) for p in first.host + (track.image_size,)]).tolist()
    if not all(map(math.isfinite, host)):
        raise NonFiniteError("non-finite values appeared in the vector field at the starting state. "
                             + Result.non_finite.remedy)
    k = _host_size(first)
    track.unit = 1.0 + host[1] + host[k]  # 1 + max |z0| (the first measure is a check) + max |f(z0)|
    result = track.commit(first, host[:k], count.n, 0.0, 0)
    per_sample = (solver.per_sample and track.rule.per_sample and count.restrict is not None
                  and not torch.is_grad_enabled())
    accepted = rejected = bad = 0
    pending: Optional[_Measure] = None  # an accepted iterate whose stop test is read in the next sync
    while result is None:
        if accepted + rejected >= options.max_steps:
            if pending is not None:
                result = track.commit(pending, torch.cat([p.reshape(-1) for p in pending.host]).tolist(),
                                      count.n, state.t, accepted)
                pending = None
            if result is None:
                result = Result.budget if options.budget else Result.diverged if track.running_away else Result.max_steps
            break
        proposal = solver.propose(count, state, options)
        cand = None if proposal.gz is None else track.measure(proposal.z, proposal.gz)
        parts = (pending.host if pending else ()) + (cand.host if cand else ()) + tuple(proposal.signals)
        host = torch.cat([p.reshape(-1) for p in parts]).tolist()  # the step's one synchronisation
        if pending is not None:
            k = _host_size(pending)
            result, host, measured, pending = track.commit(pending, host[:k], count.n, state.t, accepted), host[k:], pending, None
            if result is not None:
                break
            if per_sample:
                state, proposal = _drop_converged(state, proposal, track, count, measured.residual)
        k = _host_size(cand) if cand else 0
        cand_host, signals = host[:k], host[k:]
        new, ok = solver.decide(count, state, proposal, signals, options)
        if not ok:
            state, rejected = new, rejected + 1
            bad = bad + 1 if (cand and not math.isfinite(cand_host[0])) or not all(map(math.isfinite, signals)) else 0
            if bad >= NON_FINITE_REJECTIONS:
                raise NonFiniteError(f"non-finite values appeared in {bad} consecutive proposed steps at t={state.t:.4g} "
                                     "(the step shrank each time). " + Result.non_finite.remedy)
            continue
        accepted, bad, state = accepted + 1, 0, new
        if cand is not None:
            result = track.commit(cand, cand_host, count.n, state.t, accepted)
        else:
            pending = track.measure(state.z, state.gz)
        if result is None and per_sample and cand is not None:
            state, _ = _drop_converged(state, None, track, count, cand.residual)
    iterations = accepted + rejected
    message = _message(result, solver, options, state.t, iterations, track.nfe_start + count.n, track.best_res,
                       track.stall)
    return track.finish(z0, state.t, iterations, count.n, accepted, rejected, result, message)


def _host_size(m: _Measure) -> int:
    """How many host floats a measure contributes to the step's synchronisation."""
    return sum(p.numel() for p in m.host)


def _pick(x, keep: Tensor):
    """Rows ``keep`` of every tensor in ``x`` (nested tuples / lists); anything else as is."""
    if isinstance(x, Tensor):
        return x.index_select(0, keep)
    if isinstance(x, (tuple, list)):
        return type(x)(_pick(y, keep) for y in x)
    return x


def _drop_converged(state: State, proposal: Optional[Proposal], track: _Tracker, count: _Counted,
                    residual: Tensor) -> Tuple[State, Optional[Proposal]]:
    """Restrict the state, a pending proposal and ``g`` (through its ``on_rows``) to the samples
    not yet converged."""
    open_ = residual > 1
    if bool(open_.all()):
        return state, proposal
    keep = open_.nonzero()[:, 0]
    track.rows = keep if track.rows is None else track.rows[keep]
    count.g = count.restrict(track.rows)
    state = State(_pick(state.z, keep), _pick(state.gz, keep), state.t, _pick(state.memory, keep), state.control)
    if proposal is not None:
        proposal = Proposal(_pick(proposal.z, keep), _pick(proposal.gz, keep), proposal.t, proposal.signals,
                            _pick(proposal.payload, keep))
    return state, proposal
