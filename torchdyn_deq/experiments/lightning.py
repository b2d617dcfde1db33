"""The LightningModule shared by the experiments: task loss plus the DEQ's auxiliary losses,
per-step logging of NFE and backward iterations, and the timings of the results tables."""
from __future__ import annotations

import time
from typing import List, Tuple

import pytorch_lightning as pl
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor


class LitClassifier(pl.LightningModule):
    """Cross-entropy plus ``net.aux_loss()``; logs ``loss``, ``nfe`` (``net.forward_nfe()``)
    and ``net.backward_stats()`` every step; records the wall time of each training backward
    pass (Lightning's backward hooks) and, in testing, accuracy, NFE per batch and the wall
    time of each forward pass. Subclasses define ``configure_optimizers``.

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

    def training_step(self, batch: Tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        inputs, labels = batch
        loss = F.cross_entropy(self.net(inputs), labels) + self.net.aux_loss()
        self.log("loss", loss, prog_bar=True)
        self.log("nfe", float(self.net.forward_nfe()), prog_bar=True)
        return loss

    def on_before_backward(self, loss: Tensor) -> None:
        self._backward_start = time.perf_counter()

    def on_after_backward(self) -> None:
        self.backward_times.append(time.perf_counter() - self._backward_start)
        self.log_dict(self.net.backward_stats())

    def test_step(self, batch: Tuple[Tensor, Tensor], batch_idx: int) -> None:
        inputs, labels = batch
        start = time.perf_counter()
        logits = self.net(inputs)
        self.predict_times.append(time.perf_counter() - start)
        self.test_nfe.append(self.net.forward_nfe())
        self.test_correct += int((logits.argmax(dim=1) == labels).sum())
        self.test_seen += len(labels)
