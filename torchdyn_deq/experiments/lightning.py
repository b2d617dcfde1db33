"""The LightningModule shared by the experiments: task loss plus the DEQ's auxiliary losses,
per-step records of the loss, NFE and backward work, and the timings of the results tables.

The per-step records are kept on the module and handed to the logger once per epoch, not through
``self.log`` at every step: each ``self.log`` call costs Lightning's result bookkeeping (it walks
the stored metric to move it to the value's device) and a logged tensor is read back to the host
at every step. On the MNIST job that was most of Lightning's cost per step over a plain loop
(``benchmarks/results/bookkeeping.md``); the CSV log keeps one row per step all the same.
"""
from __future__ import annotations

import time
from typing import Dict, List, Tuple

import pytorch_lightning as pl
import torch
import torch.nn as nn
import torch.nn.functional as F
from pytorch_lightning.callbacks import TQDMProgressBar
from torch import Tensor


class LitClassifier(pl.LightningModule):
    """Cross-entropy plus ``net.aux_loss()``; records ``loss``, ``nfe`` (``net.forward_nfe()``)
    and ``net.backward_stats()`` every step and logs them, one row per step, at the end of each
    epoch (and of training); records the wall time of each training backward pass (Lightning's
    backward hooks) and, in testing, accuracy, NFE per batch and the wall time of each forward
    pass. Subclasses define ``configure_optimizers``.

    Args:
        net: a classifier with ``aux_loss()``, ``forward_nfe()`` and ``backward_stats()``.
    """

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net
        self.test_correct, self.test_seen = 0, 0
        self.test_nfe: List[int] = []
        self.predict_times: List[float] = []
        self.backward_times: List[float] = []
        self._backward_start = 0.0
        # unlogged steps: (step, loss detached, the step's plain numbers); read back once per flush
        self._steps: List[Tuple[int, Tensor, Dict[str, float]]] = []

    def training_step(self, batch: Tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        inputs, labels = batch
        loss = F.cross_entropy(self.net(inputs), labels) + self.net.aux_loss()
        self.record_step(loss)
        return loss

    def record_step(self, loss: Tensor) -> None:
        """Keep this step's loss (as a tensor: no host sync) and NFE for the next flush."""
        self._steps.append((self.global_step, loss.detach(), {"nfe": float(self.net.forward_nfe())}))

    def latest(self) -> Dict[str, float]:
        """The last recorded step's loss and NFE (the progress bar's; reads the loss back)."""
        if not self._steps:
            return {}
        _, loss, stats = self._steps[-1]
        return {"loss": float(loss), "nfe": stats["nfe"]}

    def on_before_backward(self, loss: Tensor) -> None:
        self._backward_start = time.perf_counter()

    def on_after_backward(self) -> None:
        self.backward_times.append(time.perf_counter() - self._backward_start)
        if self._steps:
            self._steps[-1][2].update(self.net.backward_stats())

    def flush_steps(self) -> None:
        """Log the recorded steps, one row each, with one read-back of their losses."""
        if not self._steps:
            return
        steps, self._steps = self._steps, []
        if self.logger is None:
            return
        losses = torch.stack([loss for _, loss, _ in steps]).tolist()
        for (step, _, stats), loss in zip(steps, losses):
            self.logger.log_metrics({"loss": loss, **stats, "epoch": float(self.current_epoch)}, step=step)

    def on_train_epoch_end(self) -> None:
        self.flush_steps()

    def on_train_end(self) -> None:
        self.flush_steps()

    def test_step(self, batch: Tuple[Tensor, Tensor], batch_idx: int) -> None:
        inputs, labels = batch
        start = time.perf_counter()
        logits = self.net(inputs)
        self.predict_times.append(time.perf_counter() - start)
        self.test_nfe.append(self.net.forward_nfe())
        self.test_correct += int((logits.argmax(dim=1) == labels).sum())
        self.test_seen += len(labels)


class StepProgressBar(TQDMProgressBar):
    """Lightning's progress bar showing the module's latest loss and NFE (`LitClassifier.latest`),
    read only when the bar refreshes, every ``refresh_rate`` steps (default 10: a bar redrawn at
    every step of a ~10 ms step costs a few percent of it, and nobody reads 100 redraws a second)."""

    def __init__(self, refresh_rate: int = 10):
        super().__init__(refresh_rate=refresh_rate)

    def get_metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Dict[str, object]:
        metrics = super().get_metrics(trainer, pl_module)
        if isinstance(pl_module, LitClassifier):
            metrics.update({k: f"{v:.3g}" for k, v in pl_module.latest().items()})
        return metrics
