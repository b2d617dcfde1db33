"""InfiniteTimeNeuralODE as a drop-in for torchdyn's NeuralODE, Lightning loop included."""
import numpy as np
import pytest
import pytorch_lightning as pl
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset
from torchdyn.core import NeuralODE
from torchdyn.datasets import ToyDataset
from torchdyn.nn import DataControl

import torchdyn_deq as td
from torchdyn_deq._loop import scaled_residual


class Learner(pl.LightningModule):
    """torchdyn's tutorial Learner, unchanged: works for NeuralODE and InfiniteTimeNeuralODE."""

    def __init__(self, model: nn.Module, t_span: torch.Tensor):
        super().__init__()
        self.model, self.t_span, self.losses = model, t_span, []

    def forward(self, x):
        return self.model(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        t_eval, y_hat = self.model(x, self.t_span)
        loss = nn.CrossEntropyLoss()(y_hat[-1], y)
        self.losses.append(float(loss.detach()))
        return {"loss": loss}

    def configure_optimizers(self):
        return torch.optim.Adam(self.model.parameters(), lr=0.01)


def vector_field():
    # a field with a stable steady state for every input: dz/dt = tanh(W [z, x]) - z
    class Field(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(DataControl(), nn.Linear(4, 32), nn.Tanh(), nn.Linear(32, 2), nn.Tanh())

        def forward(self, x):
            return 2 * self.net(x) - x

    return Field()


def train(model, epochs=4, data_seed=0):
    np.random.seed(data_seed)  # ToyDataset draws from numpy's global generator
    X, y = ToyDataset().generate(n_samples=256, dataset_type="moons", noise=0.1)
    loader = DataLoader(TensorDataset(X, y), batch_size=64, shuffle=True)
    learner = Learner(model, torch.linspace(0, 1, 2))
    trainer = pl.Trainer(max_epochs=epochs, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, accelerator="cpu")
    trainer.fit(learner, train_dataloaders=loader)
    return learner.losses


# data seeds 2 and 3 train a field whose steady states are stable foci: the residual of a stable
# step can grow there, and a step cap halved on every such growth collapsed (no convergence)
@pytest.mark.parametrize("data_seed", [0, 2, 3])
def test_lightning_loop_runs_unchanged_and_learns(data_seed):
    torch.manual_seed(0)
    baseline = train(NeuralODE(vector_field(), solver="tsit5", sensitivity="adjoint", atol=1e-3, rtol=1e-3), epochs=1,
                     data_seed=data_seed)
    assert len(baseline) == 4  # the same Learner, written for NeuralODE, runs ...
    torch.manual_seed(0)
    model = td.InfiniteTimeNeuralODE(vector_field(), solver="tsit5", atol=1e-3, rtol=1e-3)
    losses = train(model, data_seed=data_seed)  # ... and unchanged with the infinite-time model
    assert sum(losses[-4:]) / 4 < 0.8 * sum(losses[:4]) / 4
    assert model.solution.converged and model.solution.backward_iters > 0


def test_same_interface_as_neuralode():
    field = vector_field()
    model = td.InfiniteTimeNeuralODE(field, solver="dopri5", atol=1e-4, rtol=1e-4)
    assert isinstance(model, NeuralODE) and isinstance(model, pl.LightningModule)
    x = torch.randn(8, 2)
    t_eval, sol = model(x, torch.linspace(0, 1, 2))
    assert sol.shape == (2, 8, 2) and t_eval.shape == (2,) and t_eval[0] == 0 and t_eval[1] > 1
    torch.testing.assert_close(sol[0], x)  # starts at the input, as NeuralODE does
    # sol[-1] is a steady state: the field vanishes there to the tolerance
    field.net[0]._control = x
    dz = field(sol[-1])
    assert (dz.abs() <= 1e-4 + 1e-4 * sol[-1].abs()).float().mean() > 0.9
    assert scaled_residual(dz, sol[-1], 1e-4, 1e-4).max() <= 1
    nfe_before = model.vf.nfe
    model(x)  # training: one extra evaluation at z*, with gradients, for the implicit backward
    assert model.vf.nfe == nfe_before + model.solution.nfe + 1
    with torch.no_grad():
        model(x)
    assert model.vf.nfe == nfe_before + 2 * model.solution.nfe + 1
    model.return_t_eval = False
    assert model(x).shape == (2, 8, 2)


def test_callable_vector_fields():
    def with_time(t, x, args=None):
        return -x + 1.0

    for vf in (with_time, lambda x: -x + 1.0, nn.Sequential(nn.Tanh())):
        model = td.InfiniteTimeNeuralODE(vf, atol=1e-6, rtol=1e-6)
        out = model(torch.zeros(3, 2))[1][-1]
        assert torch.isfinite(out).all() and model.solution.converged


@pytest.mark.parametrize("solver", ["euler", "rk4", "midpoint", "tsit5", "dopri5", "vcab3", "anderson", "broyden", "fixed_point"])
def test_every_solver_reaches_the_same_fixed_point(solver):
    from conftest import TanhLayer

    layer = TanhLayer(d=8, m=3, dtype=torch.float32)
    x = torch.randn(16, 3)
    ref = td.DEQ(layer, solver="broyden", state_shape=(8,), atol=1e-6, rtol=1e-6)(x)[1][-1]
    model = td.DEQ(layer, solver=solver, state_shape=(8,), atol=1e-4, rtol=1e-4, max_steps=200)
    z = model(x)[1][-1]
    assert model.solution.converged
    torch.testing.assert_close(z, ref, atol=2e-3, rtol=2e-3)
    # it is the DEQ fixed point z* = f(z*, x)
    torch.testing.assert_close(layer(z, x), z, atol=2e-3, rtol=2e-3)


def test_solution_record(layer):
    model = td.DEQ(layer, state_shape=(3,))
    x = torch.randn(5, 2, dtype=torch.float64, requires_grad=True)
    _, sol = model(x)
    rec = model.solution
    assert rec.converged and rec.reason == "converged" and rec.residual.shape == (5,) and (rec.residual <= 1).all()
    assert rec.nfe > 1 and rec.steps_accepted >= 1 and rec.t > 0 and rec.backward_iters is None
    assert rec.nfe_per_sample.shape == (5,) and (rec.nfe_per_sample <= rec.nfe).all()
    torch.testing.assert_close(rec.z0, torch.zeros(5, 3, dtype=torch.float64))
    sol[-1].sum().backward()
    assert rec.backward_iters >= 1 and rec.backward_residual < 1e-4
    assert set(rec.stats()) >= {"nfe", "residual_max", "backward_iters"}
    assert float(rec.aux_loss) == 0.0


def test_sensitivity_objects_and_names(layer):
    model = td.DEQ(layer, state_shape=(3,), sensitivity=td.SteadyStateSensitivity(td.DirectSolver()))
    assert isinstance(model.sensitivity.linear_solver, td.DirectSolver)
    model = td.DEQ(layer, state_shape=(3,), sensitivity="steady_state", rtol_adjoint=1e-7, atol_adjoint=1e-9)
    assert model.sensitivity.linear_solver.rtol == 1e-7 and model.sensitivity.linear_solver.atol == 1e-9
    assert isinstance(td.DEQ(layer, sensitivity="autograd").sensitivity, td.AutogradSensitivity)


def test_inference_mode_budget_and_tolerance(layer):
    import warnings

    model = td.DEQ(layer, state_shape=(3,), atol=1e-8, rtol=1e-8, eval_tol_factor=1e4, eval_max_steps=2)
    x = torch.randn(4, 2, dtype=torch.float64)
    model(x)
    train_nfe = model.solution.nfe
    assert model.solution.converged
    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an exhausted budget is recorded, not warned
        model(x)
    assert model.solution.nfe < train_nfe and model.solution.steps_accepted + model.solution.steps_rejected <= 2
    assert model.solution.reason in ("budget", "converged")
    model.eval_max_steps = None  # looser tolerance alone: converges to 1e-4
    model(x)
    assert model.solution.converged and model.solution.nfe < train_nfe
    with pytest.raises(ValueError, match="eval_tol_factor"):
        td.DEQ(layer, eval_tol_factor=0)
    with pytest.raises(ValueError, match="eval_max_steps"):
        td.DEQ(layer, eval_max_steps=0)


@pytest.mark.parametrize("stepper", ["tsit5", "rk4"])
def test_per_sample_termination(stepper):
    from conftest import TanhLayer

    layer = TanhLayer(d=8, m=3, dtype=torch.float64)
    with torch.no_grad():
        layer.b.zero_()
    x = torch.randn(16, 3, dtype=torch.float64)
    x[:8] *= 1e-4  # half the batch starts almost at its fixed point z* ~ 0
    results = {}
    for per_sample in (False, True):
        model = td.DEQ(layer, solver=td.ODESteadyStateSolver(stepper, per_sample=per_sample), state_shape=(8,),
                       atol=1e-8, rtol=1e-8)
        z = model(x)[1][-1]
        results[per_sample] = (z, model.solution)
    (z_all, sol_all), (z_ps, sol_ps) = results[False], results[True]
    assert sol_ps.converged and (sol_ps.residual <= 1).all()
    torch.testing.assert_close(z_ps, z_all, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(layer(z_ps, x), z_ps, rtol=1e-6, atol=1e-7)  # every sample at its own z*
    # the early samples stopped costing evaluations: fewer sample-evaluations in total
    assert sol_ps.nfe_per_sample[:8].max() < sol_ps.nfe_per_sample[8:].min()
    assert sol_ps.nfe_per_sample.sum() < sol_all.nfe * 16
    z_ps.sum().backward()  # the implicit backward works on the reassembled batch


@pytest.mark.slow  # compiles: about 30-45 s on 2 cores
def test_compiled_vector_field_gives_the_same_solution_and_gradients():
    from conftest import TanhLayer

    layer = TanhLayer(d=8, m=3, dtype=torch.float32)
    x = torch.randn(16, 3, requires_grad=True)
    grads = []
    for f in (layer, torch.compile(layer)):
        model = td.DEQ(f, state_shape=(8,), atol=1e-5, rtol=1e-5)
        z = model(x)[1][-1]
        grads.append(torch.autograd.grad(z.sum(), [x, *layer.parameters()]))
        assert model.solution.converged and model.solution.backward_iters > 0
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
