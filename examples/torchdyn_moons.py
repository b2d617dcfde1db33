"""torchdyn's moons classification tutorial as a continuous DEQ, written only against torchdyn's
API: the Neural ODE becomes an infinite-time one by changing ``sensitivity=`` and ``t_span``.

    python examples/torchdyn_moons.py                           # the continuous DEQ
    python examples/torchdyn_moons.py --sensitivity adjoint     # torchdyn's Neural ODE on [0, 1]
"""
import argparse

import numpy as np

import pytorch_lightning as pl
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset
from torchdyn.core import NeuralODE
from torchdyn.datasets import ToyDataset
from torchdyn.nn import DataControl

import torchdyn_deq  # noqa: F401  registers 'steady_state', 'jacobian_free' and 'vcab3' with torchdyn

STEADY_STATE = ("steady_state", "jacobian_free")


class Learner(pl.LightningModule):
    """torchdyn's tutorial Learner."""

    def __init__(self, t_span: torch.Tensor, model: nn.Module):
        super().__init__()
        self.model, self.t_span = model, t_span

    def forward(self, x):
        return self.model(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        t_eval, y_hat = self.model(x, self.t_span)
        loss = nn.CrossEntropyLoss()(y_hat[-1], y)
        self.log("loss", loss, prog_bar=True)
        return {"loss": loss}

    def configure_optimizers(self):
        return torch.optim.Adam(self.model.parameters(), lr=0.01)


class Field(nn.Module):
    """dz/dt = 2 tanh(W [z, x]) - z: the tutorial's MLP with the input injected (DataControl)
    and a damping term, so that every input has a stable steady state."""

    def __init__(self, hidden: int = 32):
        super().__init__()
        self.net = nn.Sequential(DataControl(), nn.Linear(4, hidden), nn.Tanh(), nn.Linear(hidden, 2), nn.Tanh())

    def forward(self, x):
        return 2 * self.net(x) - x


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sensitivity", default="steady_state", help="steady_state, jacobian_free, adjoint, autograd")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--samples", type=int, default=512)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    np.random.seed(0)  # ToyDataset draws its noise from numpy's global generator
    X, y = ToyDataset().generate(n_samples=args.samples, dataset_type="moons", noise=0.1)
    loader = DataLoader(TensorDataset(X, y.long()), batch_size=min(128, args.samples), shuffle=True)

    # the two lines that change between a Neural ODE and a continuous DEQ
    model = NeuralODE(Field(), solver="tsit5", sensitivity=args.sensitivity, atol=1e-3, rtol=1e-3)
    t_span = torch.tensor([0.0, float("inf")]) if args.sensitivity in STEADY_STATE else torch.linspace(0, 1, 2)

    learner = Learner(t_span, model)
    trainer = pl.Trainer(max_epochs=args.epochs, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, accelerator="cpu")
    trainer.fit(learner, train_dataloaders=loader)
    with torch.no_grad():
        t_eval, trajectory = model(X, t_span)
    accuracy = float((trajectory[-1].argmax(1) == y).float().mean())
    result = {"accuracy": accuracy, "t_reached": float(t_eval[-1]), "nfe": float(model.vf.nfe)}
    if args.sensitivity in STEADY_STATE:
        result["converged"] = model.solution.converged
    print(result)
    return result


if __name__ == "__main__":
    main()
