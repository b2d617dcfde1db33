"""Serialization (pickle, deepcopy, state_dict, torch.save of whole models, Lightning checkpoints) and run-to-run
determinism."""
import copy
import io
import pickle

import pytest
import pytorch_lightning as pl
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

import torchdyn_deq as td
from conftest import TanhLayer

import _ddp_worker as W


CONFIGS = {
    "tsit5": dict(solver="tsit5"),
    "vcab3": dict(solver="vcab3"),
    "anderson": dict(solver="anderson"),
    "broyden_skip_reg": dict(solver="broyden", initializer="skip_reg"),
    "skip_jacobian": dict(initializer="skip", jacobian_penalty="yes"),
    "gmres_direct": dict(sensitivity=td.SteadyStateSensitivity(td.DirectSolver())),
}


def _model(name, seed=0):
    torch.manual_seed(seed)
    kwargs = dict(CONFIGS[name])
    if kwargs.get("initializer") == "skip":
        kwargs["initializer"] = td.SkipInitializer(nn.Linear(2, 3).double())
    if kwargs.get("jacobian_penalty") == "yes":
        kwargs["jacobian_penalty"] = td.JacobianPenalty()
    return td.DEQ(TanhLayer(), state_shape=(3,), **kwargs)


def _outputs(model, x):
    torch.manual_seed(1)  # the Hutchinson probes
    z = model(x)[1][-1]
    loss = z.pow(2).sum() + model.solution.aux_loss
    grads = torch.autograd.grad(loss, list(model.parameters()))
    return z.detach(), [g.detach() for g in grads], model.solution.nfe


def _assert_same(a, b):
    (za, ga, na), (zb, gb, nb) = a, b
    assert na == nb
    assert torch.equal(za, zb)
    assert all(torch.equal(x, y) for x, y in zip(ga, gb))


@pytest.mark.parametrize("name", CONFIGS)
def test_pickle_round_trip_gives_identical_outputs(name):
    model = _model(name)
    x = torch.randn(4, 2, dtype=torch.float64)
    before = _outputs(model, x)
    for m in (model, pickle.loads(pickle.dumps(model))):  # after a forward pass too
        clone = pickle.loads(pickle.dumps(m))
        assert type(clone.f) is TanhLayer
        _assert_same(_outputs(clone, x), before)
    # torch.save of the whole module
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    _assert_same(_outputs(torch.load(buf, weights_only=False), x), before)


def test_deepcopy_of_the_layer_and_a_rebuilt_model_works():
    model = _model("tsit5")
    x = torch.randn(4, 2, dtype=torch.float64)
    twin = td.DEQ(copy.deepcopy(model.f), state_shape=(3,))
    _assert_same(_outputs(twin, x), _outputs(model, x))


@pytest.mark.parametrize("after_forward", [False, True])
def test_deepcopy_gives_identical_outputs(after_forward):
    """torchdyn's non-leaf ``vf_params`` is detached and copies leave out the last solution
    record (it holds the forward graph), so deep copies work, after a training forward too."""
    model = _model("tsit5")
    x = torch.randn(4, 2, dtype=torch.float64)
    ref = _outputs(model, x) if after_forward else None
    clone = copy.deepcopy(model)
    assert clone.solution is None
    _assert_same(_outputs(clone, x), ref or _outputs(model, x))


@pytest.mark.parametrize("name", CONFIGS)
def test_state_dict_round_trip(name, tmp_path):
    model = _model(name, seed=0)
    x = torch.randn(4, 2, dtype=torch.float64)
    torch.save(model.state_dict(), tmp_path / "sd.pt")
    other = _model(name, seed=1)  # different weights
    assert not torch.equal(other.f.W, model.f.W)
    missing = other.load_state_dict(torch.load(tmp_path / "sd.pt", weights_only=True))
    assert not missing.missing_keys and not missing.unexpected_keys
    _assert_same(_outputs(other, x), _outputs(model, x))


def _train(name, steps=10):
    torch.manual_seed(123)
    model = _model(name)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(7)
    nfe, losses, back = [], [], []
    for _ in range(steps):
        x = torch.randn(8, 2, generator=gen, dtype=torch.float64)
        z = model(x)[1][-1]
        loss = (z - 0.5).pow(2).mean() + model.solution.aux_loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        nfe.append(model.solution.nfe)
        losses.append(loss.item())
        back.append(model.solution.backward_iters)
    return nfe, losses, back, [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("name", ["tsit5", "anderson", "skip_jacobian"])
def test_two_seeded_training_runs_are_identical(name):
    a, b = _train(name), _train(name)
    assert a[0] == b[0] and a[1] == b[1] and a[2] == b[2]
    assert all(torch.equal(p, q) for p, q in zip(a[3], b[3]))
    assert len(set(a[1])) > 1  # it trained


# ------------------------------------------------------------------ Lightning checkpoint / resume
class _Resumable(W.DEQClassifier):
    def configure_optimizers(self):  # momentum: the optimizer state must be restored too
        return torch.optim.SGD(self.parameters(), lr=0.2, momentum=0.9)


def _loader():
    x, y = W.make_data()
    return DataLoader(TensorDataset(x, y), batch_size=6, shuffle=False)  # 4 batches per epoch


def _trainer(tmp_path, epochs):
    return pl.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=False,
                      enable_checkpointing=True, enable_progress_bar=False, enable_model_summary=False,
                      default_root_dir=tmp_path, deterministic=True)


@pytest.mark.parametrize("solver", ["tsit5", "anderson"])
def test_lightning_checkpoint_resume_matches_uninterrupted(solver, tmp_path):
    """N = 4 steps (one epoch), checkpoint, resume to 2N; equal to 2N uninterrupted steps.

    The checkpoint is taken at an epoch boundary with ``max_epochs``: Lightning cannot resume a
    plain DataLoader mid-epoch (it warns, and restarts the loader), and a run stopped by
    ``max_steps`` at the last batch of an epoch is saved as an unfinished epoch, which on resume
    replays batch 0 (observed with Lightning 2.6; not specific to DEQs)."""
    torch.manual_seed(0)
    full = _Resumable(solver)
    _trainer(tmp_path / "full", 2).fit(full, _loader())
    assert len(full.nfe) == 8

    torch.manual_seed(0)
    first = _Resumable(solver)
    trainer = _trainer(tmp_path / "first", 1)
    trainer.fit(first, _loader())
    assert trainer.global_step == 4
    ckpt = tmp_path / "half.ckpt"
    trainer.save_checkpoint(ckpt)

    torch.manual_seed(99)  # a different initialisation: everything must come from the checkpoint
    resumed = _Resumable(solver)
    trainer = _trainer(tmp_path / "resumed", 2)
    trainer.fit(resumed, _loader(), ckpt_path=ckpt)
    assert trainer.global_step == 8
    assert first.nfe + resumed.nfe == full.nfe
    assert first.losses + resumed.losses == full.losses
    for (k, p), q in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(p, q), k


# ---------------------------------------------------------------------------- torchdyn-style models
class _Field(nn.Module):
    """dz/dt = tanh(W z) - z: a NeuralODE user's vector field."""

    def __init__(self, d: int):
        super().__init__()
        self.lin = nn.Linear(d, d)

    def forward(self, t, z, args=None):
        return torch.tanh(self.lin(z)) - z


class _Layer(nn.Module):
    def __init__(self, d: int = 4):
        super().__init__()
        self.lin = nn.Linear(d, d)

    def forward(self, z, x):
        return torch.tanh(self.lin(z) + x)


@pytest.mark.parametrize("kind", ["deq", "skip", "skip_reg", "anderson", "node"])
def test_state_dict_round_trip_torchdyn_style(kind, tmp_path):
    def build():
        if kind == "node":
            return td.InfiniteTimeNeuralODE(_Field(4))
        if kind == "skip":
            return td.DEQ(_Layer(), initializer=td.SkipInitializer(nn.Linear(4, 4)))
        if kind == "skip_reg":
            return td.DEQ(_Layer(), initializer="skip_reg")
        return td.DEQ(_Layer(), solver="anderson" if kind == "anderson" else "tsit5")

    model = build()
    torch.manual_seed(1)
    copy = build()
    x = torch.randn(3, 4)
    path = tmp_path / "model.pt"
    torch.save(model.state_dict(), path)
    copy.load_state_dict(torch.load(path))
    with torch.no_grad():
        t1, s1 = model(x)
        t2, s2 = copy(x)
    assert torch.equal(s1, s2) and torch.equal(t1, t2)


def test_whole_model_pickles():
    model = td.DEQ(_Layer())
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    copy = torch.load(buffer, weights_only=False)
    x = torch.randn(3, 4)
    with torch.no_grad():
        assert torch.equal(model(x)[1], copy(x)[1])
