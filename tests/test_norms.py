"""Weight / spectral norm on torch parametrizations, computed once per forward pass."""
import copy
import io

import pytest
import torch
import torch.nn as nn

import torchdyn_deq as td

TIGHT = dict(atol=1e-12, rtol=1e-12, max_steps=2000, state_shape=(4,))


class NormLayer(nn.Module):
    """f(z, x) = tanh(lin(z) + inj(x)), a contraction (||lin|| = 0.5)."""

    def __init__(self, d=4, m=3):
        super().__init__()
        self.lin = nn.Linear(d, d, bias=False).double()
        self.inj = nn.Linear(m, d).double()
        with torch.no_grad():
            self.lin.weight.mul_(0.5 / torch.linalg.matrix_norm(self.lin.weight, ord=2))

    def forward(self, z, x):
        return torch.tanh(self.lin(z) + self.inj(x))


def _count_calls(layer):
    """Calls of every parametrization in ``layer`` (each a module with a forward)."""
    calls = []
    for module in layer.modules():
        if torch.nn.utils.parametrize.is_parametrized(module):
            for plist in module.parametrizations.values():
                plist[0].register_forward_hook(lambda *a: calls.append(1))
    return calls


@pytest.mark.parametrize("norm", ["weight_norm", "spectral_norm"])
def test_applies_to_linear_and_conv_layers(norm):
    net = nn.Sequential(nn.Linear(3, 3), nn.Conv2d(2, 2, 3), nn.ConvTranspose1d(2, 3, 3), nn.Tanh())
    before = [m.weight.detach().clone() for m in net[:3]]
    names = td.apply_norm(net, norm)
    assert names == ["0.weight", "1.weight", "2.weight"]
    for m in net[:3]:
        assert torch.nn.utils.parametrize.is_parametrized(m, "weight")
    if norm == "weight_norm":  # same function at the start; g per output channel (dim 1 for a transposed conv)
        for m, w in zip(net[:3], before):
            torch.testing.assert_close(m.weight, w)
        assert net[2].parametrizations.weight.original0.shape == (1, 3, 1)
    else:
        sigma = torch.linalg.matrix_norm(net[0].weight.detach(), ord=2)
        assert abs(float(sigma) - 1.0) < 1e-3


def test_bad_input():
    net = nn.Sequential(nn.Linear(3, 3))
    with pytest.raises(ValueError, match="norm='batch_norm' is not one of 'weight_norm', 'spectral_norm'"):
        td.apply_norm(net, "batch_norm")
    with pytest.raises(TypeError, match=r"unknown options \['n_power_iterations'\]; weight_norm takes dim"):
        td.apply_norm(net, "weight_norm", n_power_iterations=3)  # torchdeq#12: never silently ignored
    with pytest.raises(TypeError, match=r"unknown options \['learn_scale'\]"):
        td.apply_norm(net, "spectral_norm", learn_scale=False)
    with pytest.raises(ValueError, match="n_power_iterations must be a positive integer, got 0"):
        td.apply_norm(net, "spectral_norm", n_power_iterations=0)
    with pytest.raises(ValueError, match="nothing to normalise in Tanh"):
        td.apply_norm(nn.Tanh())
    with pytest.raises(ValueError, match=r"no Linear, Conv or ConvTranspose layer with a tensor named \['w'\]"):
        td.apply_norm(net, names=("w",))
    td.apply_norm(net)
    with pytest.raises(ValueError, match=r"0.weight is already parametrized; call remove_norm\(module\) first"):
        td.apply_norm(net, "spectral_norm")
    with pytest.raises(ValueError, match="n_power_iterations must be a positive integer"):
        td.reset_norm(net, n_power_iterations=0)


def test_names_and_exclude():
    net = nn.ModuleDict({"enc": nn.Sequential(nn.Linear(2, 2)), "core": nn.Linear(2, 2), "head": nn.Linear(2, 2)})
    assert td.apply_norm(net, exclude=("enc", "head")) == ["core.weight"]
    assert td.apply_norm(net["head"], names=("weight", "bias")) == ["weight", "bias"]
    assert not torch.nn.utils.parametrize.is_parametrized(net["enc"][0])


@pytest.mark.parametrize("norm", ["weight_norm", "spectral_norm"])
@pytest.mark.parametrize("solver, sensitivity", [("tsit5", "steady_state"), ("anderson", "steady_state"),
                                                 ("anderson", "autograd"), ("anderson", "phantom")])
def test_computed_once_per_forward_pass(norm, solver, sensitivity):
    layer = NormLayer()
    td.apply_norm(layer, norm)
    calls = _count_calls(layer)
    model = td.DEQ(layer, solver=solver, sensitivity=sensitivity, **TIGHT)
    x = torch.randn(3, 3, dtype=torch.float64)
    z = model(x)[1][-1]
    assert model.solution.nfe > 5 and len(calls) == 2  # lin and inj once, not once per evaluation
    z.sum().backward()
    assert len(calls) == 2  # the backward pass reuses the forward pass's weights
    with torch.no_grad():
        model(x)
    assert len(calls) == 4
    calls.clear()
    layer(z.detach(), x)
    layer(z.detach(), x)
    assert len(calls) == 4  # outside a model: at every call (torch's behaviour)


def test_spectral_norm_power_iteration_advances_once_per_forward():
    layer = NormLayer()
    td.apply_norm(layer, "spectral_norm")
    sn = layer.lin.parametrizations.weight[0]
    model = td.DEQ(layer, solver="anderson", **TIGHT).train()
    x = torch.randn(3, 3, dtype=torch.float64)
    u0 = sn._u.clone()
    model(x)
    u1 = sn._u.clone()
    twin = copy.deepcopy(sn)
    with torch.no_grad():  # one more power iteration from u1 gives what the next forward pass gives
        twin(layer.lin.parametrizations.weight.original)
    model(x)
    assert not torch.equal(u0, u1)
    torch.testing.assert_close(sn._u, twin._u, rtol=1e-14, atol=0)


@pytest.mark.parametrize("norm", ["weight_norm", "spectral_norm"])
@pytest.mark.parametrize("solver", ["tsit5", "anderson"])
def test_gradients_against_finite_differences(norm, solver):
    """float64 gradcheck through the implicit gradient, with respect to the parametrizations'
    stored tensors and the input: the weight cached for the no-grad solve keeps its graph."""
    layer = NormLayer()
    td.apply_norm(layer, norm)
    model = td.DEQ(layer, solver=solver, sensitivity=td.SteadyStateSensitivity(td.DirectSolver()), **TIGHT).eval()
    names = [n for n, _ in model.named_parameters()]
    assert any("original" in n for n in names)
    x = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)

    def fn(x, *params):
        return torch.func.functional_call(model, dict(zip(names, params)), (x,))[1][-1]
    params = tuple(p.detach().clone().requires_grad_() for p in model.parameters())
    assert torch.autograd.gradcheck(fn, (x, *params), eps=1e-6, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("norm", ["weight_norm", "spectral_norm"])
def test_state_dict_and_deepcopy(norm):
    torch.manual_seed(0)
    layer = NormLayer()
    td.apply_norm(layer, norm)
    model = td.DEQ(layer, solver="anderson", **TIGHT)
    x = torch.randn(3, 3, dtype=torch.float64)
    model(x)  # advance the spectral norm's power iteration: its vectors are state too
    model.eval()
    with torch.no_grad():
        want = model(x)[1][-1]
    state = model.state_dict()
    assert any(".lin.parametrizations.weight.original" in k for k in state)

    torch.manual_seed(1)
    fresh_layer = NormLayer()
    td.apply_norm(fresh_layer, norm)
    fresh = td.DEQ(fresh_layer, solver="anderson", **TIGHT).eval()
    fresh.load_state_dict(state)
    twin = copy.deepcopy(model)
    with torch.no_grad():
        for other in (fresh, twin):
            torch.testing.assert_close(other(x)[1][-1], want, rtol=0, atol=0)
    assert td.remove_norm(twin.f) == ["lin.weight", "inj.weight"]  # the copy is independent; names as apply_norm's
    assert torch.nn.utils.parametrize.is_parametrized(model.f.lin)
    with pytest.raises(RuntimeError, match="only supported through state_dict"):  # torch's rule, documented
        torch.save(model, io.BytesIO())


@pytest.mark.parametrize("norm", ["weight_norm", "spectral_norm"])
def test_remove_norm_keeps_the_function(norm):
    layer = NormLayer()
    td.apply_norm(layer, norm)
    td.reset_norm(layer)  # the spectral norm's estimate, converged: eval and train agree
    model = td.DEQ(layer, solver="anderson", **TIGHT).eval()
    x = torch.randn(3, 3, dtype=torch.float64)
    with torch.no_grad():
        want = model(x)[1][-1]
    other = nn.utils.parametrize.register_parametrization(layer.inj, "bias", nn.Identity())
    assert other is layer.inj
    assert sorted(td.remove_norm(layer)) == ["inj.weight", "lin.weight"]
    assert not torch.nn.utils.parametrize.is_parametrized(layer.lin)
    assert torch.nn.utils.parametrize.is_parametrized(layer.inj, "bias")  # not ours: left alone
    assert isinstance(layer.lin.weight, nn.Parameter)
    with torch.no_grad():
        torch.testing.assert_close(model(x)[1][-1], want, rtol=1e-12, atol=1e-14)
    assert td.remove_norm(layer) == []


def test_remove_norm_refuses_a_weight_with_another_parametrization_stacked():
    """torch removes a tensor's parametrizations only all together: removing the norm would also
    remove the user's own (review finding); refused with the way out."""
    layer = NormLayer()
    td.apply_norm(layer, "weight_norm")
    nn.utils.parametrize.register_parametrization(layer.lin, "weight", nn.Identity())
    with pytest.raises(ValueError, match="lin.weight carries 2 parametrizations"):
        td.remove_norm(layer)
    assert len(layer.lin.parametrizations["weight"]) == 2


def test_reset_norm_restarts_the_power_iteration():
    lin = nn.Linear(6, 6).double()
    td.apply_norm(lin, "spectral_norm")
    with torch.no_grad():  # a new weight under the parametrization: the stored vectors are stale
        lin.parametrizations.weight.original.copy_(torch.randn(6, 6, dtype=torch.float64) * 3)
    original = lin.parametrizations.weight.original.detach()
    sigma = float(torch.linalg.matrix_norm(original, ord=2))
    sn = lin.parametrizations.weight[0]
    stale = float(sn._u @ original @ sn._v)
    assert td.reset_norm(lin, n_power_iterations=200) == 1
    estimate = float(sn._u @ original @ sn._v)
    assert abs(estimate - sigma) < 1e-8 * sigma < abs(stale - sigma)
    lin.eval()
    assert abs(float(torch.linalg.matrix_norm(lin.weight.detach(), ord=2)) - 1.0) < 1e-8
    weight_normed = nn.Linear(2, 2)
    td.apply_norm(weight_normed)
    assert td.reset_norm(weight_normed) == 0  # weight norm has no state


def test_torch_compile_smoke():
    layer = NormLayer()
    td.apply_norm(layer, "weight_norm")
    eager = td.DEQ(layer, solver="anderson", atol=1e-10, rtol=1e-10, max_steps=200, state_shape=(4,))
    compiled = td.DEQ(torch.compile(layer), solver="anderson", atol=1e-10, rtol=1e-10, max_steps=200, state_shape=(4,))
    x = torch.randn(3, 3, dtype=torch.float64)
    z_c = compiled(x)[1][-1]
    g_c = torch.autograd.grad(z_c.sum(), list(layer.parameters()))
    z_e = eager(x)[1][-1]
    g_e = torch.autograd.grad(z_e.sum(), list(layer.parameters()))
    torch.testing.assert_close(z_c, z_e, rtol=1e-9, atol=1e-10)
    for a, b in zip(g_c, g_e):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-9)
