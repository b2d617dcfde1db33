"""MNIST with a continuous DEQ inside a PyTorch Lightning module.

The LightningModule logs, at every training step, the forward NFE, the worst scaled residual
and the backward pass's linear-solve iterations (``model.solution``), next to the loss.
Same model and data as ``examples/mnist_pytorch.py``.

    python examples/mnist_lightning.py                       # CSV logs in lightning_logs/
    python examples/mnist_lightning.py --variant skip_reg --max-steps 500
"""
import argparse
import warnings
from pathlib import Path

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.loggers import CSVLogger
from torch.utils.data import DataLoader, TensorDataset

try:
    from mnist_pytorch import Net, load_data
except ImportError:  # imported as examples.mnist_lightning
    from examples.mnist_pytorch import Net, load_data


class LitDEQ(pl.LightningModule):
    def __init__(self, width: int = 128, variant: str = "vanilla", solver: str = "tsit5", lr: float = 1e-3):
        super().__init__()
        self.net, self.lr = Net(width, variant, solver), lr
        self.correct, self.seen = 0, 0

    def training_step(self, batch, batch_idx):
        pixels, labels = batch
        loss = F.cross_entropy(self.net(pixels), labels) + self.net.deq.solution.aux_loss
        solution = self.net.deq.solution
        self.log("loss", loss, prog_bar=True)
        self.log("nfe", float(solution.nfe), prog_bar=True)
        self.log("residual", float(solution.residual.max()))
        return loss

    def on_after_backward(self):
        # the implicit backward pass has just filled in the linear solve's iterations
        self.log("backward_iters", float(self.net.deq.solution.backward_iters))

    def test_step(self, batch, batch_idx):
        pixels, labels = batch
        self.correct += int((self.net(pixels).argmax(1) == labels).sum())
        self.seen += len(labels)
        self.log("test_nfe", float(self.net.deq.solution.nfe))

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.lr)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--max-steps", type=int, default=150, help="training steps")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--variant", choices=("vanilla", "skip", "skip_reg"), default="vanilla")
    parser.add_argument("--solver", default="tsit5")
    parser.add_argument("--test-batches", type=int, default=None, help="limit the test batches")
    parser.add_argument("--log-dir", type=Path, default=Path("lightning_logs"))
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    pl.seed_everything(0, verbose=False)
    train, test = load_data()
    train_loader = DataLoader(TensorDataset(*train), batch_size=args.batch_size, shuffle=True,
                              generator=torch.Generator().manual_seed(0))
    model = LitDEQ(args.width, args.variant, args.solver)
    trainer = pl.Trainer(max_steps=args.max_steps, accelerator="cpu", devices=1, log_every_n_steps=1,
                         logger=CSVLogger(str(args.log_dir), name="mnist_deq"), enable_checkpointing=False,
                         enable_model_summary=False, limit_test_batches=args.test_batches)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*does not have many workers.*")
        trainer.fit(model, train_loader)
        trainer.test(model, DataLoader(TensorDataset(*test), batch_size=args.batch_size), verbose=False)
    metrics_csv = Path(trainer.logger.log_dir) / "metrics.csv"
    result = {"test_accuracy": 100.0 * model.correct / max(model.seen, 1), "metrics_csv": metrics_csv}
    print(f"test accuracy {result['test_accuracy']:.2f}% on {model.seen} digits; logs: {metrics_csv}")
    return result


if __name__ == "__main__":
    main()
