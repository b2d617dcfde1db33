"""Jacobian-free backpropagation: exact where J_f = 0, the one-step formula elsewhere."""
import torch
from conftest import TanhLayer

import torchdyn_deq as td

TIGHT = dict(atol=1e-12, rtol=1e-12, max_steps=1000, state_shape=(3,))


def test_exact_when_f_does_not_depend_on_z():
    """W = 0: dg/dz = -I, so w = v is the implicit solution and finite differences agree."""
    layer = TanhLayer()
    with torch.no_grad():
        layer.W.zero_()
    model = td.DEQ(layer, sensitivity="jacobian_free", **TIGHT)
    assert isinstance(model.sensitivity, td.JacobianFreeSensitivity)
    x = torch.randn(4, 2, dtype=torch.float64, requires_grad=True)
    names = [n for n, _ in model.named_parameters()]

    def fn(x, *params):
        return torch.func.functional_call(model, dict(zip(names, params)), (x,))[1][-1]
    assert torch.autograd.gradcheck(fn, (x, *model.parameters()), eps=1e-6, atol=1e-6, rtol=1e-5)


def test_one_application_of_f_at_the_detached_steady_state():
    """For a contractive f the gradients are those of f(z*, x) with z* held fixed, not the implicit ones."""
    layer = TanhLayer(scale=0.5)
    x = torch.randn(5, 2, dtype=torch.float64, requires_grad=True)
    weights = torch.randn(5, 3, dtype=torch.float64)

    def grads(sensitivity):
        model = td.DEQ(layer, sensitivity=sensitivity, **TIGHT)
        z = model(x)[1][-1]
        return z, torch.autograd.grad((z * weights).sum(), [x, *layer.parameters()])

    z_jfb, g_jfb = grads("jacobian_free")
    z_imp, g_imp = grads("steady_state")
    torch.testing.assert_close(z_jfb, z_imp, rtol=0, atol=0)  # the forward value is z* itself
    expected = torch.autograd.grad((layer(z_jfb.detach(), x) * weights).sum(), [x, *layer.parameters()])
    for got, want in zip(g_jfb, expected):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    flat = lambda gs: torch.cat([g.flatten() for g in gs])  # noqa: E731
    assert not torch.allclose(flat(g_jfb), flat(g_imp), rtol=1e-3, atol=0)  # an approximation here
    assert torch.nn.functional.cosine_similarity(flat(g_jfb), flat(g_imp), dim=0) > 0.5  # a descent direction, not the gradient


def test_no_linear_solve_is_recorded():
    model = td.DEQ(TanhLayer(), sensitivity=td.JacobianFreeSensitivity(), **TIGHT)
    x = torch.randn(2, 2, dtype=torch.float64)
    model(x)[1][-1].sum().backward()
    assert model.solution.backward_iters is None and "backward_iters" not in model.solution.stats()
    assert all(p.grad is not None for p in model.parameters())
