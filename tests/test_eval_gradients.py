"""Input gradients in eval mode (adversarial attacks, forces): torchdeq#4 had none."""
import pytest
import torch
import torch.nn as nn

import torchdyn_deq as td


class Classifier(nn.Module):
    """encoder -> DEQ (weight norm, variational dropout) -> head, all in float64."""

    def __init__(self, solver):
        super().__init__()
        self.enc = nn.Linear(3, 4).double()
        self.lin = nn.Linear(4, 4).double()
        with torch.no_grad():
            self.lin.weight.mul_(0.5 / torch.linalg.matrix_norm(self.lin.weight, ord=2))
        td.apply_norm(self.lin)
        self.drop = td.VariationalDropout(0.3)
        self.deq = td.DEQ(lambda z, x: self.drop(torch.tanh(self.lin(z) + x)), solver=solver, atol=1e-12,
                          rtol=1e-12, max_steps=2000, state_shape=(4,),
                          sensitivity=td.SteadyStateSensitivity(td.DirectSolver()))
        self.head = nn.Linear(4, 2).double()

    def forward(self, x):
        return self.head(self.deq(self.enc(x))[1][-1])


@pytest.mark.parametrize("solver", ["tsit5", "anderson"])
def test_input_gradient_in_eval_mode_against_finite_differences(solver):
    model = Classifier(solver).eval()
    for p in model.parameters():  # an attack: the weights are frozen, only the input is differentiated
        p.requires_grad_(False)
    x = torch.randn(3, 3, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([0, 1, 1])
    loss = lambda x: nn.functional.cross_entropy(model(x), y)  # noqa: E731
    assert torch.autograd.gradcheck(loss, (x,), eps=1e-6, atol=1e-7, rtol=1e-6)
    (grad,) = torch.autograd.grad(loss(x), x)
    assert model.deq.solution.backward_iters is not None  # the implicit backward ran
    # one FGSM step raises the loss (the gradient is usable, not only correct)
    with torch.no_grad():
        assert loss(x + 0.05 * grad.sign()) > loss(x)
