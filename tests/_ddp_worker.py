"""Helper for tests/test_distributed.py (not a test module).

``python tests/_ddp_worker.py SOLVER OUT_DIR`` trains the small encoder -> DEQ -> classifier
model for ``MAX_STEPS`` steps with ``pl.Trainer(strategy='ddp', devices=2, accelerator='cpu')``
(gloo). Lightning's ``ddp`` launcher re-runs this script for rank 1 (``LOCAL_RANK=1``);
each rank writes its final parameters and its per-step NFE to ``OUT_DIR/rank{r}.pt``.

The test imports :func:`make_data`, :class:`DEQClassifier` and :func:`global_batches` to
train the same model in a single process on the same global batches.
"""
from __future__ import annotations

import os
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F

import pytorch_lightning as pl
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.data.distributed import DistributedSampler

import torchdyn_deq as td

N_SAMPLES, N_IN, N_STATE, N_CLASSES = 24, 4, 6, 3
PER_RANK_BATCH, WORLD_SIZE, MAX_STEPS, LR = 4, 2, 3, 0.5
DTYPE = torch.float64
TOL = 1e-9  # tight forward tolerance: z* barely depends on which batch a sample is solved in


def make_data():
    """Deterministic synthetic classification data (no global RNG involved)."""
    gen = torch.Generator().manual_seed(1234)
    x = torch.randn(N_SAMPLES, N_IN, generator=gen, dtype=DTYPE)
    y = torch.randint(0, N_CLASSES, (N_SAMPLES,), generator=gen)
    return x, y


class TanhLayer(nn.Module):
    """f(z, x) = tanh(W z + x), contractive (||W||_2 = 0.5 at initialisation)."""

    def __init__(self, d: int, gen: torch.Generator):
        super().__init__()
        w = torch.randn(d, d, generator=gen, dtype=DTYPE)
        self.W = nn.Parameter(0.5 * w / torch.linalg.matrix_norm(w, ord=2))
        self.b = nn.Parameter(0.1 * torch.randn(d, generator=gen, dtype=DTYPE))

    def forward(self, z, x):
        return torch.tanh(z @ self.W.T + x + self.b)


class NormedLayer(nn.Module):
    """f(z, x) = tanh(lin(z) + x) with weight norm on ``lin`` (``td.apply_norm``): the
    parametrization's stored tensors are what DDP all-reduces."""

    def __init__(self, d: int, gen: torch.Generator):
        super().__init__()
        self.lin = nn.Linear(d, d).to(DTYPE)
        with torch.no_grad():
            w = torch.randn(d, d, generator=gen, dtype=DTYPE)
            self.lin.weight.copy_(0.5 * w / torch.linalg.matrix_norm(w, ord=2))
            self.lin.bias.copy_(0.1 * torch.randn(d, generator=gen, dtype=DTYPE))
        td.apply_norm(self, "weight_norm")

    def forward(self, z, x):
        return torch.tanh(self.lin(z) + x)


def multiscale_layer(seed: int):
    """The contractive 2-scale MDEQ layer of tests/test_multiscale.py (2 channels at 8x8, 4 at
    4x4): Bai et al.'s small convolutions and a post-fusion GroupNorm scale of 0.1; injected
    input (2, 8, 8)."""
    state = td.multiscale.MultiscaleState([(2, 8, 8), (4, 4, 4)])
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        f = td.multiscale.MDEQLayer(state, injection_channels=2, expansion=2, groups=2).to(DTYPE)
        td.multiscale.init_weights(f, 0.01)
    with torch.no_grad():
        for post in f.fusion.post:
            post[2].weight.fill_(0.1)
    return state, f


class DEQClassifier(pl.LightningModule):
    """encoder Linear -> td.DEQ -> classifier Linear; plain SGD (no momentum). ``solver``:
    a solver name for the tanh layer, ``'weight_norm'`` for it with ``td.apply_norm`` (Anderson), or
    ``'multiscale'`` for a 2-scale MDEQ layer (vcab3)."""

    def __init__(self, solver: str = "tsit5", lr: float = LR, seed: int = 0):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        # an untrained MDEQ layer is not contractive for every input: capped solves, as in the
        # paper's code (tolerance 0.05, 18 steps), reported as warnings
        options = dict(atol=TOL, rtol=TOL, max_steps=500, on_failure="raise")
        if solver == "multiscale":
            state, layer = multiscale_layer(seed)
            n_injected, n_state, self.injection_shape = 2 * 8 * 8, state.size, (2, 8, 8)
            solver, options = "vcab3", dict(atol=0.05, rtol=0.05, max_steps=18, on_failure="warn")
        elif solver == "weight_norm":  # the tanh layer on nn.Linear with weight norm, Anderson
            layer, n_injected, n_state, self.injection_shape = NormedLayer(N_STATE, gen), N_STATE, N_STATE, (N_STATE,)
            solver = "anderson"
        else:
            layer, n_injected, n_state, self.injection_shape = TanhLayer(N_STATE, gen), N_STATE, N_STATE, (N_STATE,)
        self.encoder = nn.Linear(N_IN, n_injected).to(DTYPE)
        self.classifier = nn.Linear(n_state, N_CLASSES).to(DTYPE)
        with torch.no_grad():
            for p in list(self.encoder.parameters()) + list(self.classifier.parameters()):
                p.copy_(0.5 * torch.randn(p.shape, generator=gen, dtype=DTYPE))
        self.deq = td.DEQ(layer, solver=solver, state_shape=(n_state,), **options)
        self.lr = lr
        self.nfe: list[int] = []
        self.losses: list[float] = []

    def forward(self, x):
        _, traj = self.deq(self.encoder(x).view(-1, *self.injection_shape))
        return self.classifier(traj[-1])

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)  # a mean over the batch: DDP's gradient average matches
        self.nfe.append(int(self.deq.solution.nfe))
        self.losses.append(float(loss.detach()))
        self.log("nfe", float(self.deq.solution.nfe), sync_dist=True)  # averaged across ranks
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.0)


def loader(rank: int, world_size: int, batch_size: int) -> DataLoader:
    x, y = make_data()
    ds = TensorDataset(x, y)
    sampler = DistributedSampler(ds, num_replicas=world_size, rank=rank, shuffle=False, drop_last=True)
    return DataLoader(ds, batch_size=batch_size, sampler=sampler, shuffle=False)


def global_batches(n_steps: int = MAX_STEPS):
    """The union over ranks of each step's per-rank batches, as one batch of
    ``WORLD_SIZE * PER_RANK_BATCH`` samples (what a single process must see)."""
    per_rank = [list(loader(r, WORLD_SIZE, PER_RANK_BATCH)) for r in range(WORLD_SIZE)]
    out = []
    for step in range(n_steps):
        xs, ys = zip(*(per_rank[r][step] for r in range(WORLD_SIZE)))
        out.append((torch.cat(xs), torch.cat(ys)))
    return out


class _DistributedData(pl.LightningDataModule):
    def train_dataloader(self):
        return loader(self.trainer.global_rank, self.trainer.world_size, PER_RANK_BATCH)


def main(solver: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = DEQClassifier(solver)
    trainer = pl.Trainer(strategy="ddp", devices=WORLD_SIZE, accelerator="cpu", max_steps=MAX_STEPS,
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, use_distributed_sampler=False,
                         default_root_dir=out_dir)
    trainer.fit(model, datamodule=_DistributedData())
    rank = trainer.global_rank
    assert torch.distributed.is_initialized() and torch.distributed.get_backend() == "gloo"
    assert torch.distributed.get_world_size() == WORLD_SIZE
    torch.save({"params": {k: v.detach().clone() for k, v in model.state_dict().items()},
                "nfe": model.nfe, "losses": model.losses, "world_size": trainer.world_size,
                "backend": torch.distributed.get_backend(), "pid": os.getpid(),
                "logged_nfe": float(trainer.callback_metrics["nfe"])},
               os.path.join(out_dir, f"rank{rank}.pt"))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
