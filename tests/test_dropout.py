"""Variational dropout: one mask per solve, drawn on the input's device and dtype."""
import copy
import math
import warnings

import pytest
import torch
import torch.nn as nn

import torchdyn_deq as td

TIGHT = dict(atol=1e-12, rtol=1e-12, max_steps=2000)


class DropLayer(nn.Module):
    """f(z, x) = drop(tanh(W z + U x)): a contraction for every mask (||W|| <= 0.5, mask <= 1 / (1 - p))."""

    def __init__(self, d=4, m=3, p=0.3, dropout=None):
        super().__init__()
        self.lin = nn.Linear(d, d, bias=False).double()
        self.inj = nn.Linear(m, d).double()
        with torch.no_grad():
            self.lin.weight.mul_(0.35 * (1 - p) / torch.linalg.matrix_norm(self.lin.weight, ord=2))
        self.drop = td.VariationalDropout(p) if dropout is None else dropout

    def forward(self, z, x):
        return self.drop(torch.tanh(self.lin(z) + self.inj(x)))


@pytest.mark.parametrize("p", [-0.1, 1.0, 1.5, math.nan, True, "0.5"])
def test_p_outside_the_unit_interval(p):
    with pytest.raises(ValueError, match=r"p must be in \[0, 1\), got"):
        td.VariationalDropout(p)
    with pytest.raises(ValueError, match=r"p must be in \[0, 1\), got"):
        td.VariationalDropout2d(p)


def test_shared_dims_checked():
    with pytest.raises(ValueError, match="dimension 0 is the batch"):
        td.VariationalDropout(0.5, shared_dims=(0,))
    with pytest.raises(ValueError, match="non-zero integers"):
        td.VariationalDropout(0.5, shared_dims=("1",))
    with pytest.raises(ValueError, match=r"shared_dims=\(3,\) do not fit an input of shape \(2, 3\)"):
        td.VariationalDropout(0.5, shared_dims=(3,))(torch.ones(2, 3))
    with pytest.raises(ValueError, match=r"shared_dims=\(-2,\) do not fit"):  # -2 is the batch here
        td.VariationalDropout(0.5, shared_dims=(-2,))(torch.ones(2, 3))
    with pytest.raises(ValueError, match="VariationalDropout2d expects"):
        td.VariationalDropout2d(0.5)(torch.ones(2, 3, 4))


@pytest.mark.parametrize("cls, shape, shared", [
    (td.VariationalDropout1d, (6, 5, 7), (2,)),
    (td.VariationalDropout2d, (6, 5, 4, 3), (2, 3)),
    (td.VariationalDropout3d, (6, 5, 2, 3, 4), (2, 3, 4)),
])
def test_channel_masks(cls, shape, shared):
    drop = cls(0.4)
    assert drop.shared_dims == shared
    x = torch.rand(shape, dtype=torch.float64) + 1.0
    mask = drop(x) / x
    expected = [1] * len(shape)
    expected[0], expected[1] = shape[0], shape[1]
    assert tuple(drop.mask.shape) == tuple(expected)
    torch.testing.assert_close(mask, drop.mask.expand(shape))
    values = set(drop.mask.unique().tolist())
    assert values <= {0.0, 1 / 0.6} and len(values) == 2  # per sample and channel, rescaled


def test_channels_last_like_torchdeq():
    """torchdeq's VariationalDropout2d (token_first=True, (B, H, W, C)) is shared_dims=(1, 2)."""
    drop = td.VariationalDropout(0.5, shared_dims=(1, 2))
    drop(torch.ones(3, 4, 5, 6))
    assert tuple(drop.mask.shape) == (3, 1, 1, 6)
    drop = td.VariationalDropout(0.5, shared_dims=(-1,))
    drop(torch.ones(3, 4, 5))
    assert tuple(drop.mask.shape) == (3, 4, 1)


def test_elementwise_by_default_and_mean_preserving():
    drop = td.VariationalDropout(0.25)
    x = torch.ones(400, 50, dtype=torch.float64)
    y = drop(x)
    assert drop.mask.shape == x.shape
    assert abs(float(y.mean()) - 1.0) < 0.02  # E[mask] = 1: 20000 draws, std ~ 0.004
    assert abs(float((y == 0).double().mean()) - 0.25) < 0.02


def test_fixed_until_reset_then_new():
    drop = td.VariationalDropout(0.5)
    x = torch.randn(8, 16)
    first = drop(x)
    torch.testing.assert_close(drop(x), first, rtol=0, atol=0)
    td.reset_dropout(nn.Sequential(nn.Linear(2, 2), drop))
    assert drop.mask is None
    assert not torch.equal(drop(x), first)


def test_stale_mask_is_refused():
    drop = td.VariationalDropout(0.5)
    drop(torch.ones(4, 3))
    with pytest.raises(ValueError, match=r"call reset_dropout\(module\)"):
        drop(torch.ones(5, 3))
    with pytest.raises(ValueError, match="float64"):
        drop(torch.ones(4, 3, dtype=torch.float64))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_mask_on_the_input_dtype(dtype):
    drop = td.VariationalDropout(0.5)
    y = drop(torch.ones(4, 3, dtype=dtype))
    assert drop.mask.dtype == dtype and y.dtype == dtype


def test_mask_on_the_input_device():
    """The mask is made by the input (``x.new_empty``), never on the CPU first (torchdeq#13)."""
    drop = td.VariationalDropout2d(0.5)
    y = drop(torch.ones(2, 3, 4, 4, device="meta"))
    assert drop.mask.device.type == "meta" and y.device.type == "meta"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_mask_on_cuda():
    drop = td.VariationalDropout(0.5)
    drop(torch.ones(2, 3, device="cuda"))
    assert drop.mask.is_cuda


def test_identity_in_eval_and_for_p_zero():
    drop = td.VariationalDropout(0.5).eval()
    x = torch.randn(3, 4)
    assert drop(x) is x and drop.mask is None
    zero = td.VariationalDropout(0.0)
    assert zero(x) is x


def test_not_in_the_state_dict_and_deepcopies():
    layer = DropLayer()
    layer(torch.zeros(2, 4, dtype=torch.float64), torch.zeros(2, 3, dtype=torch.float64))
    assert not any("mask" in k for k in layer.state_dict())
    twin = copy.deepcopy(layer)
    torch.testing.assert_close(twin.drop.mask, layer.drop.mask)
    assert repr(layer.drop) == "VariationalDropout(p=0.3, shared_dims=())"


def _masks_seen(model, x):
    """The masks used at each evaluation of f in one forward pass."""
    seen = []
    handle = model.f.drop.register_forward_hook(lambda mod, inp, out: seen.append(mod.mask.clone()))
    try:
        z = model(x)[1][-1]
    finally:
        handle.remove()
    return z, seen


@pytest.mark.parametrize("solver", ["tsit5", "anderson"])
def test_one_mask_per_solve_and_a_new_one_per_forward(solver):
    model = td.DEQ(DropLayer(), solver=solver, state_shape=(4,), on_failure="raise", **TIGHT).train()
    x = torch.randn(5, 3, dtype=torch.float64)
    _, first = _masks_seen(model, x)
    assert model.solution.converged  # one function: the fixed point exists
    assert len(first) == model.solution.nfe + 1  # the solve and the evaluation at z* for the gradient
    assert all(torch.equal(m, first[0]) for m in first)
    _, second = _masks_seen(model, x)
    assert all(torch.equal(m, second[0]) for m in second)
    assert not torch.equal(first[0], second[0])


def test_a_fresh_mask_at_every_evaluation_has_no_fixed_point():
    """The reason for variational dropout: nn.Dropout makes f a different function at each iteration."""
    model = td.DEQ(DropLayer(dropout=nn.Dropout(0.3)), solver="fixed_point", state_shape=(4,), atol=1e-8, rtol=1e-8,
                   max_steps=60).train()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", td.ConvergenceWarning)
        model(torch.randn(5, 3, dtype=torch.float64))
    assert not model.solution.converged
    model = td.DEQ(DropLayer(), solver="fixed_point", state_shape=(4,), atol=1e-8, rtol=1e-8, max_steps=60).train()
    model(torch.randn(5, 3, dtype=torch.float64))
    assert model.solution.converged


@pytest.mark.parametrize("solver", ["tsit5", "anderson"])
def test_implicit_gradient_equals_backprop_with_dropout_active(solver):
    """The evaluation at z* for the implicit gradient uses the solve's mask: the gradients equal
    those of backpropagation through the solver (float64, same seed, so the same mask)."""
    layer = DropLayer(p=0.4)
    x = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
    weights = torch.randn(6, 4, dtype=torch.float64)

    def grads(sensitivity):
        model = td.DEQ(layer, solver=solver, sensitivity=sensitivity, state_shape=(4,), **TIGHT).train()
        torch.manual_seed(7)
        z = model(x)[1][-1]
        mask = layer.drop.mask.clone()
        return mask, z, torch.autograd.grad((z * weights).sum(), [x, *layer.parameters()])

    mask_bp, z_bp, g_bp = grads("autograd")
    mask_imp, z_imp, g_imp = grads(td.SteadyStateSensitivity(td.DirectSolver()))
    assert torch.equal(mask_bp, mask_imp) and bool((mask_imp == 0).any())  # dropout is active
    torch.testing.assert_close(z_imp, z_bp, rtol=1e-9, atol=1e-10)
    for got, want in zip(g_imp, g_bp):
        torch.testing.assert_close(got, want, rtol=1e-7, atol=1e-9)
    # and the gradient is not that of the model without dropout
    layer.eval()
    model = td.DEQ(layer, solver=solver, state_shape=(4,), **TIGHT).eval()
    (g_eval,) = torch.autograd.grad((model(x)[1][-1] * weights).sum(), [layer.lin.weight])
    assert not torch.allclose(g_eval, g_imp[1], rtol=1e-3)


def test_per_sample_solver_restricts_the_masks():
    """A per-sample solve integrates a shrinking subset of the batch: each sample keeps its own mask."""
    layer = DropLayer(p=0.4)
    x = torch.randn(6, 3, dtype=torch.float64) * torch.logspace(-2, 1, 6, dtype=torch.float64)[:, None]

    def solve(per_sample):
        model = td.DEQ(layer, solver=td.ODESteadyStateSolver(per_sample=per_sample), state_shape=(4,),
                       atol=1e-9, rtol=1e-9, max_steps=2000).train()
        torch.manual_seed(3)
        with torch.no_grad():
            return model(x)[1][-1], layer.drop.mask.clone()

    z_all, mask_all = solve(False)
    z_rows, mask_rows = solve(True)
    assert torch.equal(mask_all, mask_rows) and tuple(mask_rows.shape) == (6, 4)
    torch.testing.assert_close(z_rows, z_all, rtol=1e-7, atol=1e-8)


def test_a_skip_predictors_dropout_is_reset_every_solve():
    """Variational dropout inside a Skip predictor gets a new mask per solve and any batch size
    (review finding: only the vector field's masks were reset)."""
    lin, inj = nn.Linear(8, 8), nn.Linear(3, 8)
    predictor = nn.Sequential(nn.Linear(3, 8), td.VariationalDropout(0.5))
    model = td.DEQ(lambda z, x: torch.tanh(lin(z) + inj(x)), state_shape=(8,),
                   initializer=td.SkipInitializer(predictor))
    model(torch.randn(4, 3))
    first = predictor[1].mask.clone()
    model(torch.randn(4, 3))
    assert not torch.equal(first, predictor[1].mask)
    model(torch.randn(5, 3))  # a new batch size: no stale-mask error
