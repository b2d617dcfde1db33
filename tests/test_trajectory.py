"""Trajectory supervision (fixed-point correction): intermediate states with phantom gradients."""
import pytest
import torch

import torchdyn_deq as td
from conftest import TanhLayer


@pytest.mark.parametrize("solver", ["tsit5", "vcab3", "anderson"])
def test_states_are_returned_in_solve_order_with_z_star_last(solver):
    layer = TanhLayer(d=5, m=3, scale=0.8)
    x = torch.randn(4, 3, dtype=torch.float64)
    # a tight tolerance: enough accepted steps for three evenly spaced interior states on every solver
    plain = td.DEQ(layer, solver=solver, state_shape=(5,), atol=1e-5, rtol=1e-5)
    model = td.DEQ(layer, solver=solver, state_shape=(5,), atol=1e-5, rtol=1e-5,
                   trajectory=td.TrajectorySupervision(n_states=4))
    t_eval, sol = model(x)
    assert sol.shape == (5, 4, 5) and t_eval.shape == (5,)
    torch.testing.assert_close(sol[-1], plain(x)[1][-1], rtol=0, atol=0)  # z* unchanged
    steps = [s.step for s in model.solution.states]
    assert steps == sorted(steps) and len(steps) == 3 and 0 < steps[0] and steps[-1] < model.solution.steps_accepted
    assert (t_eval[1:] >= t_eval[:-1]).all()
    for s, saved in zip(sol[1:-1], model.solution.states):  # each state is f of the saved iterate
        torch.testing.assert_close(s, layer(saved.z, x))


def test_evenly_spaced_states_use_bounded_memory_on_a_long_solve():
    model = td.DEQ(lambda z, x: z + z @ torch.tensor([[-0.05, -1.0], [1.0, -0.05]], dtype=torch.float64).T + x,
                   state_shape=(2,), max_steps=5000, trajectory=td.TrajectorySupervision(n_states=5))
    with torch.no_grad():
        model(torch.randn(3, 2, dtype=torch.float64))
    sol = model.solution
    n = sol.steps_accepted
    steps = [s.step for s in sol.states]
    assert n > 50 and len(steps) == 4
    for i, step in enumerate(steps, start=1):  # within the thinning stride of the even position
        assert abs(step - n * i / 5) <= n / 8 + 1, (steps, n)


def test_indexing_picks_the_accepted_steps():
    layer = TanhLayer(d=5, m=3, scale=0.8)
    model = td.DEQ(layer, solver="anderson", state_shape=(5,), atol=1e-10, rtol=1e-10,
                   trajectory=td.TrajectorySupervision(n_states=3, indexing=(1, 3)))
    t_eval, sol = model(torch.randn(4, 3, dtype=torch.float64))
    assert [s.step for s in model.solution.states] == [1, 3] and (t_eval == 0).all()


def test_correction_loss_gradient():
    """The correction loss's gradient is that of sum_i w_i L(f(s_i, x)) with the saved iterates
    s_i held fixed, plus the implicit gradient of L(z*): checked against a float64 gradcheck of
    that function of (x, W) and against the closed-form implicit part."""
    torch.manual_seed(0)
    layer = TanhLayer(d=4, m=2, scale=0.6)
    x = torch.randn(3, 2, dtype=torch.float64, requires_grad=True)
    model = td.DEQ(layer, state_shape=(4,), atol=1e-12, rtol=1e-12,
                   trajectory=td.TrajectorySupervision(n_states=3),
                   sensitivity=td.SteadyStateSensitivity(td.DirectSolver()))
    _, sol = model(x)
    loss = td.correction_loss([s.pow(2).sum() for s in sol[1:]], weighting="exponential", gamma=0.5)
    gx, = torch.autograd.grad(loss, x)
    saved = [s.z for s in model.solution.states]

    def intermediate_part(x_):
        return sum(w * layer(z, x_).pow(2).sum() for w, z in zip((0.25, 0.5), saved))

    assert torch.autograd.gradcheck(intermediate_part, (x.detach().requires_grad_(),))
    ref = torch.autograd.grad(intermediate_part(x), x)[0]
    exact = td.DEQ(layer, state_shape=(4,), atol=1e-12, rtol=1e-12,
                   sensitivity=td.SteadyStateSensitivity(td.DirectSolver()))
    ref = ref + torch.autograd.grad(exact(x)[1][-1].pow(2).sum(), x)[0]
    torch.testing.assert_close(gx, ref)


def test_weightings():
    losses = [torch.tensor(1.0), torch.tensor(2.0), torch.tensor(4.0)]
    assert float(td.correction_loss(losses, "constant")) == 7.0
    assert float(td.correction_loss(losses, "linear")) == pytest.approx(1 / 3 + 4 / 3 + 4)
    assert float(td.correction_loss(losses, "exponential", gamma=0.5)) == pytest.approx(0.25 + 1 + 4)


@pytest.mark.parametrize("kwargs, error, match", [
    ({"n_states": 0}, ValueError, "n_states"), ({"n_states": 3, "indexing": (1,)}, ValueError, "indexing"),
    ({"steps": 0}, ValueError, "steps"), ({"damping": 1.5}, ValueError, "damping")])
def test_bad_options(kwargs, error, match):
    with pytest.raises(error, match=match):
        td.TrajectorySupervision(**kwargs)
    with pytest.raises(ValueError, match="weighting"):
        td.correction_loss([torch.tensor(1.0)], weighting="exp")
    with pytest.raises(TypeError, match="TrajectorySupervision"):
        td.DEQ(lambda z, x: z, trajectory=3)


def test_the_number_of_states_does_not_depend_on_how_far_the_solve_got():
    """indexing past the end of the solve, or a solve shorter than n_states: the last kept
    iterate repeats, so sol has n_states + 1 entries and t_eval matches (review finding)."""
    layer = TanhLayer(d=5, m=3, scale=0.3)
    x = torch.randn(4, 3, dtype=torch.float64)
    for supervision in (td.TrajectorySupervision(n_states=3, indexing=(1, 10_000)),
                        td.TrajectorySupervision(n_states=40)):
        model = td.DEQ(layer, solver="anderson", state_shape=(5,), trajectory=supervision)
        t_eval, sol = model(x)
        assert sol.shape[0] == supervision.n_states + 1 == t_eval.shape[0]
    with pytest.raises(ValueError, match="strictly increasing"):
        td.TrajectorySupervision(n_states=3, indexing=(5, 2))
