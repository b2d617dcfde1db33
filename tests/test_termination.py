"""The stop rules (``termination=``): what each one means, on batches built to tell them apart,
and that each runs with every solver family, its best iterate and its typed results."""
import pytest
import torch

import torchdyn_deq as td
from torchdyn_deq._loop import RULES, Proposal, State, SteadyStateSolver

FAMILIES = ["tsit5", "dopri5", "euler", "rk4", "vcab3", "fixed_point", "anderson", "broyden"]


def _options(rule, tol=1e-3, max_steps=200):
    return td.SolveOptions(tol, tol, max_steps, termination=rule)


def _towards(target):
    """``g(z) = target - z``: every family converges (fixed-point iteration in one step)."""
    return lambda t, z: target - z


def test_one_sample_far_off_stops_batch_relative_but_not_per_sample():
    """99 samples at z* = 1, one off by 0.05: the batch's norm ratio is 0.05 / 10 = 5e-3 <= rtol,
    but that sample's own scaled residual is 0.05 / 2e-2 = 2.5 > 1."""
    target = torch.ones(100, 4, dtype=torch.float64)
    z0 = target.clone()
    z0[0] -= 0.05
    runs = {rule: td.steady_state_solve(_towards(target), z0, td.ODESteadyStateSolver("tsit5"),
                                        _options(rule, tol=1e-2)) for rule in ("per_sample", "batch_relative")}
    assert runs["batch_relative"].converged and runs["batch_relative"].nfe == 1  # the start already meets it
    assert runs["per_sample"].converged and runs["per_sample"].nfe > 1  # that sample had to be solved
    assert float(runs["per_sample"].residual[0]) <= 1
    # the batch rule's z* is the start, one sample still 0.05 off: what the rule accepts
    assert float((runs["batch_relative"].z_star - target).abs().max()) == pytest.approx(0.05)


def test_one_element_far_off_stops_per_sample_but_not_elementwise():
    """One element of 10,000 off by 10x the tolerance: the rms is 0.1 (per_sample stops at the
    start), the worst element is 10 (elementwise solves it)."""
    target = torch.zeros(2, 10_000, dtype=torch.float64)
    z0 = target.clone()
    z0[1, 7] = 10e-3
    runs = {rule: td.steady_state_solve(_towards(target), z0, td.ODESteadyStateSolver("tsit5"),
                                        td.SolveOptions(1e-3, 0.0, 200, termination=rule))
            for rule in ("per_sample", "elementwise")}
    assert runs["per_sample"].nfe == 1 and runs["per_sample"].converged
    assert runs["elementwise"].nfe > 1 and runs["elementwise"].converged
    assert float(runs["elementwise"].z_star.abs().max()) <= 1e-3


def test_each_rule_is_its_formula():
    torch.manual_seed(0)
    z, g = torch.randn(3, 5, dtype=torch.float64), 1e-3 * torch.randn(3, 5, dtype=torch.float64)
    atol, rtol = 1e-3, 1e-2
    o = {rule: td.SolveOptions(atol, rtol, 10, termination=rule) for rule in RULES}
    torch.testing.assert_close(RULES["per_sample"].residual(g, z, o["per_sample"]),
                               (g / (atol + rtol * z.abs())).pow(2).mean(1).sqrt())
    # allDerivPass: |g| <= atol or |g| <= rtol |z|, element by element
    torch.testing.assert_close(RULES["elementwise"].residual(g, z, o["elementwise"]),
                               (g.abs() / torch.maximum(torch.full_like(z, atol), rtol * z.abs())).amax(1))
    torch.testing.assert_close(RULES["batch_relative"].residual(g, z, o["batch_relative"]),
                               (g.norm() / (rtol * (g + z).norm())).reshape(1))


def test_elementwise_is_an_or_of_the_absolute_and_relative_tests():
    """|g| = 1.5 atol passes where rtol |z| = 2 atol (the relative test) and fails at z = 0."""
    atol, rtol = 1e-3, 1e-3
    g = torch.full((2, 3), 1.5e-3, dtype=torch.float64)
    z = torch.tensor([[2.0] * 3, [0.0] * 3], dtype=torch.float64)
    res = RULES["elementwise"].residual(g, z, td.SolveOptions(atol, rtol, 10, termination="elementwise"))
    torch.testing.assert_close(res, torch.tensor([0.75, 1.5], dtype=torch.float64))


@pytest.mark.parametrize("rule", list(RULES))
@pytest.mark.parametrize("family", FAMILIES)
def test_every_rule_with_every_family(rule, family):
    """A damped linear map (every family converges, fixed-point iteration included): the end point
    meets the rule's own formula, and the record is typed and shaped per sample."""
    A = torch.tensor([[-1.0, 0.3], [-0.3, -1.0]], dtype=torch.float64)
    x = torch.randn(5, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    model = td.DEQ(lambda z, x: z + z @ A.T + x, solver=family, state_shape=(2,), atol=1e-6, rtol=1e-6,
                   max_steps=500, termination=rule)
    with torch.no_grad():
        z = model(x)[1][-1]
    sol = model.solution
    assert sol.result is td.Result.converged and sol.residual.shape == (5,)
    options = td.SolveOptions(1e-6, 1e-6, 500, termination=rule)
    assert float(RULES[rule].residual(z @ A.T + x, z, options).max()) <= 1
    torch.testing.assert_close(z, -torch.linalg.solve(A, x.T).T, atol=1e-4, rtol=0)


class _Sequence(SteadyStateSolver):
    """Proposes the given iterates in turn (``g`` evaluated there)."""

    continuous = False

    def __init__(self, iterates):
        super().__init__()
        self.iterates = list(iterates)

    def propose(self, g, state, options):
        z = self.iterates.pop(0)
        return Proposal(z, g(0.0, z), 0.0)


def test_the_batch_rules_best_iterate_is_one_iterate():
    """Iterate 1 has sample 0 exact and sample 1 far off; iterate 2 both a little off, a lower
    batch norm. The per-sample best mixes them (sample 0 from iterate 1); the batch rule keeps
    iterate 2 whole."""
    target = torch.tensor([[1.0, 1.0], [1.0, 1.0]], dtype=torch.float64)
    first = torch.tensor([[1.0, 1.0], [3.0, 3.0]], dtype=torch.float64)
    second = torch.tensor([[1.1, 1.1], [1.1, 1.1]], dtype=torch.float64)
    z0 = torch.full_like(target, 5.0)
    for rule, expected in (("per_sample", torch.stack([first[0], second[1]])), ("batch_relative", second)):
        sol = td.steady_state_solve(_towards(target), z0, _Sequence([first, second]),
                                    td.SolveOptions(1e-3, 1e-3, 2, termination=rule))
        assert sol.result is td.Result.max_steps
        torch.testing.assert_close(sol.z_star, expected)
    assert sol.residual.shape == (2,) and sol.residual[0] == sol.residual[1]  # the batch's, per sample


def test_batch_rules_keep_every_row_to_the_end():
    """Per-sample termination cannot drop rows under a batch rule: every sample's NFE is the batch's."""
    target = torch.linspace(0.5, 2, 6, dtype=torch.float64)[:, None].expand(6, 3)
    z0 = target.clone()
    z0[0] = 0.0
    field = _towards(target)
    calls = []

    def on_rows(rows):
        calls.append(rows)
        return lambda t, z: target.index_select(0, rows) - z

    field.on_rows = on_rows
    with torch.no_grad():
        sol = td.steady_state_solve(field, z0, td.ODESteadyStateSolver("tsit5", per_sample=True),
                                    _options("batch_relative", tol=1e-6))
        ref = td.steady_state_solve(field, z0, td.ODESteadyStateSolver("tsit5", per_sample=True),
                                    _options("per_sample", tol=1e-6))
    assert sol.converged and bool((sol.nfe_per_sample == sol.nfe).all())
    assert ref.converged and int(ref.nfe_per_sample.min()) == 1  # the rows at z* left at once there
    assert len(calls) == 1  # only the per-sample run restricted the field


def test_unknown_rule_lists_the_valid_ones():
    for make in (lambda: td.SolveOptions(1e-3, 1e-3, 10, termination="batch"),
                 lambda: td.DEQ(lambda z, x: z, termination="batch"),
                 lambda: td.InfiniteTimeNeuralODE(lambda z: -z, termination="relative")):
        with pytest.raises(ValueError, match="'per_sample', 'batch_relative', 'elementwise'"):
            make()


def test_batch_relative_refuses_rtol_zero():
    with pytest.raises(ValueError, match="batch_relative.*rtol > 0"):
        td.DEQ(lambda z, x: z, termination="batch_relative", rtol=0.0)


def test_the_rule_reaches_the_solve_in_eval_mode_and_with_supervision():
    model = td.DEQ(lambda z, x: 0.5 * z + x, termination="elementwise", eval_tol_factor=2.0,
                   trajectory=td.TrajectorySupervision(n_states=2))
    assert model._options().termination == "elementwise"
    model.eval()
    assert model._options().termination == "elementwise"
