"""The solve loop's own mechanics, with scripted solvers: where its checks fall, what counts as
progress, and the stability estimate's guards (regressions found in review)."""
import torch

import torchdyn_deq as td
from torchdyn_deq._loop import Proposal, State, SteadyStateSolver, steady_state_solve
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
