"""The solve loop's own mechanics, with scripted solvers: where its checks fall, what counts as
progress, and the stability estimate's guards (regressions found in review)."""
import warnings

import torch

import torchdyn_deq as td
from torchdyn_deq._loop import Proposal, State, SteadyStateSolver, scaled_residual, steady_state_solve
from torchdyn_deq._solution import SolveOptions


class EveryOtherRejected(SteadyStateSolver):
    """z <- z + g / 2, every second proposal rejected (error-control ping-pong)."""

    def __init__(self):
        super().__init__()
        self.decisions = 0

    def propose(self, g, state, options):
        z = state.z + 0.5 * state.gz
        return Proposal(z, g(0.0, z), 0.0)

    def decide(self, g, state, proposal, signals, options):
        self.decisions += 1
        if self.decisions % 2 == 0:
            return state, False
        return State(proposal.z, proposal.gz, 0.0), True


def test_rejected_proposals_never_take_the_place_of_a_check():
    """The progress / divergence check falls on every 4th *accepted* iterate: counted on all
    measured proposals, it landed on the rejected ones forever and a growing state ran to
    max_steps with the remedy 'raise max_steps'."""
    sol = steady_state_solve(lambda t, z: z, torch.ones(3, 4), EveryOtherRejected(), SolveOptions(1e-3, 1e-3, 100))
    assert sol.result is td.Result.diverged and sol.steps_rejected > 0


class Scripted(SteadyStateSolver):
    """Residual 100 at every 4th iterate, otherwise falling 3% per step from 50."""

    continuous = False

    def __init__(self):
        super().__init__()
        self.k = 0

    def propose(self, g, state, options):
        self.k += 1
        r = 100.0 if self.k % 4 == 0 else 50.0 * 0.97 ** self.k
        return Proposal(state.z, torch.full_like(state.z, r * 1e-3), 0.0)


def test_progress_between_checks_counts():
    """Progress is the best residual against the stretch's start, so improvements on the iterates
    between checks count even when the checked iterate itself is bad (a false 'stalled' at 36)."""
    sol = steady_state_solve(lambda t, z: torch.full_like(z, 0.2), torch.zeros(1, 4), Scripted(),
                                SolveOptions(1e-3, 0.0, 150))
    assert sol.converged


def test_a_sample_at_rest_under_a_time_dependent_field_does_not_collapse_the_step():
    """Sample 0 sits at its steady state under a 1e-9 sin(t) forcing below float32's resolution:
    its secant dz is 0 while dg is not. ||dg|| / ||dz|| must not enter the stability limit (it drove
    VCAB3's step to 1e-8: t = 0.0065 after 400 steps)."""
    c = torch.tensor([[1.0] * 8, [5.0] * 8])
    rate = torch.tensor([[1.0], [0.05]])
    forcing = torch.tensor([[1.0], [0.0]])

    def g(t, z):
        return -rate * (z - c) + 1e-9 * torch.sin(t) * forcing

    sol = steady_state_solve(g, torch.stack([c[0], torch.zeros(8)]), td.VCAB3(), SolveOptions(1e-4, 1e-4, 400))
    assert sol.converged and sol.iterations < 100


def test_anderson_and_broyden_in_float16_do_not_overflow_their_products():
    """Half-precision residuals of a large state: their Gram matrix and dot products overflow
    float16 (max 65504) unless formed in float32."""
    torch.manual_seed(0)
    x = torch.randn(2, 100_000).half()
    for solver in (td.AndersonAcceleration(), td.BroydenSolver()):
        sol = steady_state_solve(lambda t, z: 0.5 * z + x - z, torch.zeros_like(x), solver,
                                    SolveOptions(1e-2, 1e-2, 50))
        assert sol.converged, (solver, sol.result)
        torch.testing.assert_close(sol.z_star.float(), 2 * x.float(), atol=5e-2, rtol=2e-2)


def _drift_solve(solver, **kw):
    model = td.InfiniteTimeNeuralODE(lambda z: torch.ones_like(z), solver=solver, max_steps=10_000, **kw)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch.no_grad():
            z = model(torch.zeros(3, 2))[1][-1]
    return model.solution, z, [str(w.message) for w in caught]


def test_bounded_speed_drift_is_not_a_steady_state():
    """dz/dt = 1 met |dz/dt| <= atol + rtol |z| once |z| ~ 1 / rtol: 'converged' at t = 8279 with
    |z*| = 8280 under tsit5 and vcab3. The tolerance grew with the state, the residual did not fall:
    now 'diverged', and the first (only) warning names the missing equilibrium and the DEQ form."""
    for solver in ("tsit5", "vcab3", "dopri5"):
        for termination in ("per_sample", "elementwise", "batch_relative"):
            sol, z, messages = _drift_solve(solver, termination=termination)
            assert sol.result is td.Result.diverged, (solver, termination, sol.result)
            assert len(messages) == 1 and "drifts" in messages[0] and "f(z, x) - z" in messages[0]


def test_the_growth_credit_leaves_a_converging_solve_alone():
    """f = 0.9 z + x from 0: z* = 10 x, ten times the start's image f(0) = x, so the tolerance grows
    10x; the residual falls 1e4x first. The end point and its residual are the rule's alone."""
    x = torch.randn(4, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for solver in ("tsit5", "vcab3", "anderson", "broyden", "fixed_point"):
        model = td.DEQ(lambda z, x: 0.9 * z + x, solver=solver, atol=1e-6, rtol=1e-6, max_steps=2000)
        with torch.no_grad():
            z = model(x)[1][-1]
        sol = model.solution
        assert sol.converged, (solver, sol.result)
        torch.testing.assert_close(sol.residual, scaled_residual(0.9 * z + x - z, z, 1e-6, 1e-6))
        torch.testing.assert_close(z, 10 * x, atol=1e-3, rtol=0)


def test_a_residual_that_rounded_to_zero_on_a_huge_state_is_no_fall():
    """Broyden on f(z) = z + c in float32 jumped to |z| ~ 1e7, where (z + c) - z rounds to 0, and
    reported 'converged' with residual 0: the fall is counted only down to eps |z|."""
    c = torch.tensor([[0.3, -0.2, 0.1]])
    model = td.DEQ(lambda z, x: z + c, solver="broyden", state_shape=(3,))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with torch.no_grad():
            model(torch.zeros(1, 3))
    assert model.solution.result is td.Result.diverged


def test_a_stalled_rotation_names_the_missing_attracting_equilibrium():
    R = torch.tensor([[0.0, -1.0], [1.0, 0.0]])
    model = td.InfiniteTimeNeuralODE(lambda z: z @ R.T, max_steps=2000)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch.no_grad():
            model(torch.randn(3, 2))
    assert model.solution.result is td.Result.stalled
    assert "circles or drifts" in str(caught[0].message) and "f(z, x) - z" in str(caught[0].message)


class ScriptedIterates(SteadyStateSolver):
    """Proposes the given iterates in turn, each with g evaluated (``gz``) or not (``None``: the loop
    measures it once accepted, and commits it in the next step's synchronisation)."""

    def __init__(self, iterates, evaluated):
        super().__init__()
        self.iterates, self.evaluated, self.k = iterates, evaluated, 0

    def propose(self, g, state, options):
        k = min(self.k, len(self.iterates) - 1)
        self.k += 1
        z = self.iterates[k]
        return Proposal(z, g(0.0, z) if self.evaluated[k] else None, float(self.k))


def test_a_candidate_measured_before_the_pending_commit_keeps_its_best():
    """An iterate committed between a candidate's measure and its commit (a proposal without g, then
    one with it) counts: sample 0 converges at the first iterate and stays converged with it as its
    best, though the next two are worse; sample 1 converges at the third."""
    iterates = [torch.tensor([[0.01], [0.9]]), torch.tensor([[0.5], [0.8]]), torch.tensor([[0.4], [0.0]])]
    solver = ScriptedIterates(iterates, evaluated=[False, True, True])
    sol = steady_state_solve(lambda t, z: -z, torch.ones(2, 1), solver, SolveOptions(atol=0.1, rtol=0.1, max_steps=6))
    assert sol.converged and sol.steps_accepted == 3
    assert torch.equal(sol.z_star, torch.tensor([[0.01], [0.0]]))
    expected = scaled_residual(-sol.z_star, sol.z_star, 0.1, 0.1)
    torch.testing.assert_close(sol.residual, expected)
    assert sol.nfe_per_sample[0] < sol.nfe_per_sample[1] == sol.nfe  # sample 0 converged first
