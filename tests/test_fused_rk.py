"""The fused tableau step equals torchdyn's step, and the steady-state solver uses it."""
import pytest
import torch
from torchdyn.numerics.solvers.ode import DormandPrince45, Tsitouras45

import torchdyn_deq as td
from torchdyn_deq._fused_rk import FusedTableauStepper, fused


def _field(dtype):
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(6, 6, generator=gen, dtype=dtype) / 3
    return lambda t, x: torch.tanh(x @ w) - x


@pytest.mark.parametrize("stepper_class", [Tsitouras45, DormandPrince45])
def test_step_matches_torchdyn(stepper_class):
    f = _field(torch.float64)
    x = torch.randn(4, 6, dtype=torch.float64)
    fused_stepper = FusedTableauStepper(stepper_class(torch.float64))
    assert fused_stepper.fsal  # x_new is the last stage's state: no separate b-combination
    ours = fused_stepper.step(f, x, 0.0, 0.37)
    theirs = stepper_class(torch.float64).step(f, x, 0.0, 0.37)
    for a, b in zip(ours[:3], theirs[:3]):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-13)
    assert len(ours[3]) == len(theirs[3]) == 7


def test_step_keeps_gradients_and_tensor_dt_falls_back():
    f = _field(torch.float64)
    x = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    stepper = FusedTableauStepper(Tsitouras45(torch.float64))
    assert torch.autograd.gradcheck(lambda x: stepper.step(f, x, 0.0, 0.3)[1], (x,))
    x = x.detach()
    torch.testing.assert_close(stepper.step(f, x, 0.0, torch.tensor(0.3, dtype=torch.float64))[1],
                               stepper.step(f, x, 0.0, 0.3)[1], rtol=0, atol=1e-13)


def test_only_tableau_steppers_are_wrapped_and_the_solver_uses_them():
    from torchdyn.numerics.solvers.ode import Euler
    euler = Euler(torch.float32)
    assert fused(euler) is euler
    solver = td.ODESteadyStateSolver("tsit5")
    assert isinstance(solver._stepper(torch.float32), FusedTableauStepper)
    assert float(solver._stepper(torch.float32).safety) == pytest.approx(0.9)
