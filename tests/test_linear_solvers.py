import pytest
import torch

import torchdyn_deq as td


def batched_system(batch=4, n=12, dtype=torch.float64):
    A = torch.eye(n, dtype=dtype) + 0.3 * torch.randn(batch, n, n, dtype=dtype) / n**0.5
    b = torch.randn(batch, n, dtype=dtype)
    return A, b, lambda u: torch.bmm(A, u[:, :, None])[..., 0]


@pytest.mark.parametrize("solver", [td.GMRES(rtol=1e-12), td.GMRES(rtol=1e-12, restart=3),
                                    td.GMRES(rtol=1e-12, reorthogonalize=False),
                                    td.FixedPointSolver(rtol=1e-12, max_iters=500), td.DirectSolver()])
def test_matches_dense_solve(solver):
    A, b, matvec = batched_system()
    x, info = solver.solve(matvec, b)
    assert info.converged and info.residual < 1e-10
    torch.testing.assert_close(x, torch.linalg.solve(A, b), rtol=1e-9, atol=1e-10)


def test_gmres_nonsymmetric_not_contractive():
    # the Neumann series diverges here (spectral radius of I - A > 1); GMRES does not care
    n = 10
    A = torch.diag(torch.linspace(0.1, 3.0, n, dtype=torch.float64)) + torch.triu(torch.ones(n, n, dtype=torch.float64), 1) * 0.2
    A = A.expand(2, n, n)
    b = torch.randn(2, n, dtype=torch.float64)
    x, info = td.GMRES(rtol=1e-12).solve(lambda u: torch.bmm(A, u[:, :, None])[..., 0], b)
    assert info.converged
    torch.testing.assert_close(x, torch.linalg.solve(A, b))
    _, info_fp = td.FixedPointSolver(max_iters=50).solve(lambda u: torch.bmm(A, u[:, :, None])[..., 0], b)
    assert not info_fp.converged


def test_iteration_limit_is_reported():
    A, b, matvec = batched_system(n=40)
    x, info = td.GMRES(rtol=1e-14, restart=2, max_iters=3).solve(matvec, b)
    assert not info.converged and info.iters <= 4 and info.residual > 1e-10


def test_per_sample_convergence_with_zero_rhs():
    A, b, matvec = batched_system()
    b[1] = 0  # one sample has nothing to solve; must not produce NaN
    x, info = td.GMRES(rtol=1e-12).solve(matvec, b)
    assert torch.isfinite(x).all() and info.converged
    assert torch.all(x[1] == 0)


@pytest.mark.parametrize("kwargs, match", [({"rtol": -1}, "rtol"), ({"max_iters": 0}, "max_iters"),
                                           ({"restart": 0}, "restart")])
def test_bad_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        td.GMRES(**kwargs)


def test_direct_solver_refuses_large_states():
    with pytest.raises(ValueError, match="max_size"):
        td.DirectSolver(max_size=4).solve(lambda u: u, torch.ones(1, 5))


@pytest.mark.parametrize("A, b", [
    (torch.zeros(2, 3, 3, dtype=torch.float64), torch.randn(2, 3, dtype=torch.float64)),
    (torch.diag(torch.tensor([1.0, 0.0, 2.0], dtype=torch.float64))[None], torch.tensor([[0.0, 1.0, 0.0]], dtype=torch.float64)),
    (torch.tensor([[[0.0, 1.0], [0.0, 0.0]]], dtype=torch.float64), torch.tensor([[0.0, 1.0]], dtype=torch.float64)),
], ids=["zero", "singular-diagonal", "nilpotent"])
def test_gmres_reports_a_singular_operator_as_unconverged(A, b):
    """A zero Hessenberg column (A v = 0 on the Krylov space): the residual cannot fall. A zero
    Givens rotation there used to drop the estimate to 0 and claim convergence at residual 1."""
    x, info = td.GMRES(rtol=1e-10, atol=0.0, max_iters=30).solve(lambda u: torch.bmm(A, u[:, :, None])[..., 0], b)
    true = float(((b - torch.bmm(A, x[:, :, None])[..., 0]).norm(dim=1) / b.norm(dim=1)).max())
    assert not info.converged and info.residual == pytest.approx(true) and true > 0.5


def test_gmres_runs_with_autograd_enabled():
    """Inputs that require grad (the solve writes into views of its Krylov basis in place): it
    runs without autograd and returns a solution without a graph."""
    lin = torch.nn.Linear(5, 5, bias=False).double()
    b = torch.randn(2, 5, dtype=torch.float64, requires_grad=True)
    x, info = td.GMRES(rtol=1e-12).solve(lambda u: u - 0.3 * lin(u), b)
    assert info.converged and not x.requires_grad
    torch.testing.assert_close(x - 0.3 * lin(x), b.detach())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("solver", [td.GMRES(), td.FixedPointSolver(), td.DirectSolver()], ids=repr)
def test_right_hand_sides_from_zero_to_1e30_give_finite_correct_answers(dtype, solver):
    """A = I - 0.3 N per sample (a Neumann series converges too); b_i spans 0, 2.4e-28 (its
    square underflows in float32) ... 1e30. Each sample is solved scaled, so every answer is
    finite and has the same relative accuracy."""
    gen = torch.Generator().manual_seed(0)
    n = 6
    N = torch.randn(n, n, generator=gen, dtype=torch.float64) / n ** 0.5
    A = torch.eye(n, dtype=torch.float64) - 0.3 * N
    scales = torch.tensor([0.0, 2.4e-28, 1e-12, 1.0, 1e12, 1e30], dtype=torch.float64)
    b = torch.randn(len(scales), n, generator=gen, dtype=torch.float64) * scales[:, None]
    Aw = A.to(dtype)
    x, info = solver.solve(lambda u: u @ Aw.T, b.to(dtype))
    assert torch.isfinite(x).all() and info.converged
    exact = torch.linalg.solve(A, b.T).T
    rel = (x.double() - exact).norm(dim=1) / exact.norm(dim=1).clamp_min(1e-300)
    assert (x[0] == 0).all()
    assert (rel[1:] <= 1e-4).all(), rel
    assert rel[1:].max() <= 100 * rel[1:].min() + 1e-6  # the same accuracy at every scale


@pytest.mark.parametrize("dtype, scale", [(torch.bfloat16, 1e-30), (torch.float16, 1e-6)])
def test_half_precision_backward_with_a_tiny_cotangent(dtype, scale):
    """bf16 / fp16 states: the backward's Krylov arithmetic runs in float32 on the scaled system,
    so a tiny cotangent gives the scaled gradient of the unit one, not NaN or zero."""
    from conftest import TanhLayer
    layer = TanhLayer(d=8, m=3, dtype=dtype)
    x = torch.randn(4, 3, dtype=dtype)
    grads = []
    for s in (1.0, scale):
        model = td.DEQ(layer, state_shape=(8,), atol=1e-2, rtol=1e-2)
        z = model(x)[1][-1]
        grads.append(torch.autograd.grad((s * z.float()).sum(), layer.W)[0].float())
    assert torch.isfinite(grads[1]).all() and grads[1].abs().max() > 0
    torch.testing.assert_close(grads[1] / scale, grads[0], rtol=5e-2, atol=5e-2 * float(grads[0].abs().max()))


def test_gmres_tiny_cotangent_float32_is_not_nan():
    """The case of the issue: A = 2 I per sample, b = [[0, 2.4e-28], [1, -1]] gave w[0] = nan."""
    b = torch.tensor([[0.0, 2.4e-28], [1.0, -1.0]])
    x, info = td.GMRES().solve(lambda u: 2 * u, b)
    torch.testing.assert_close(x, b / 2, rtol=1e-6, atol=0)
    assert info.converged and info.iters <= 2


def test_gradient_relative_error_does_not_depend_on_the_loss_scale():
    """The implicit gradient at loss scales 1 and 1e-12: the same relative error (the tolerances
    are relative to each sample's cotangent). With the old absolute atol = 1e-10 the scaled
    loss had a 42% error at 1e-10 and a zero gradient at 1e-11."""
    from conftest import TanhLayer
    torch.manual_seed(0)
    layer = TanhLayer(d=6, m=3, scale=0.9)
    x = torch.randn(5, 3, dtype=torch.float64)
    ref_model = td.DEQ(layer, state_shape=(6,), atol=1e-12, rtol=1e-12,
                       sensitivity=td.SteadyStateSensitivity(td.DirectSolver()))
    errors = []
    for scale in (1.0, 1e-12):
        model = td.DEQ(layer, state_shape=(6,), atol=1e-12, rtol=1e-12)
        grads = []
        for m in (model, ref_model):
            loss = scale * m(x)[1][-1].pow(2).sum()
            grads.append(torch.autograd.grad(loss, layer.W)[0])
        errors.append(float((grads[0] - grads[1]).norm() / grads[1].norm()))
        assert grads[1].abs().max() > 0
    assert errors[0] < 1e-4 and errors[1] < 1e-4 and errors[1] < 10 * errors[0] + 1e-12, errors


def test_non_finite_cotangent_raises(layer):
    model = td.DEQ(layer, state_shape=(3,))
    z = model(torch.randn(4, 2, dtype=torch.float64))[1][-1]
    with pytest.raises(td.NonFiniteError, match="cotangent"):
        (z * float("nan")).sum().backward()


def test_direct_solver_judges_by_backward_error_and_reports_singular_matrices():
    """An ill-conditioned float32 system (condition 1e5) is solved to rounding level: converged
    (a forward-error test called it unconverged); an exactly singular one is a breakdown, not a
    raised LinAlgError."""
    gen = torch.Generator().manual_seed(0)
    n = 60
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    A = ((q * torch.logspace(0, -5, n, dtype=torch.float64)) @ q.T).float()
    b = torch.randn(2, n, generator=gen)
    x, info = td.DirectSolver().solve(lambda u: u @ A.T, b)
    assert info.converged and info.result is td.Result.converged
    S = torch.diag(torch.tensor([1.0, 1.0, 0.0]))
    x, info = td.DirectSolver().solve(lambda u: u @ S.T, torch.tensor([[1.0, 2.0, 0.0]]))
    assert not info.converged and info.result is td.Result.breakdown and torch.isfinite(x).all()


def test_gmres_singular_pivot_adds_no_null_space_component():
    """A = diag(1, 0, 2), b = e2: A v1 = 0, a zero pivot. Every x has the residual ||b||; the
    answer must not gain the arbitrary null-space component b itself (it did: x = b)."""
    A = torch.diag(torch.tensor([1.0, 0.0, 2.0], dtype=torch.float64))
    x, info = td.GMRES(rtol=1e-12, max_iters=6).solve(lambda u: u @ A.T, torch.tensor([[0.0, 1.0, 0.0]], dtype=torch.float64))
    assert (x == 0).all() and not info.converged and info.result is td.Result.breakdown


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("restart", [3, 20])
@pytest.mark.parametrize("spread", [0.5, 0.9, 0.99, 1.2])
def test_gmres_claims_convergence_only_at_the_true_residual(dtype, restart, spread):
    """The stop is decided by the null-vector estimate and the small least-squares residual, never by a
    matvec: on systems from well to badly conditioned (I - W with ||W|| near or above 1), and the same
    systems perturbed by 1e-6, a converged sample's true residual is within its tolerance (up to
    rounding), and the outcome does not change under the perturbation."""
    torch.manual_seed(3)
    n, rtol = 30, 1e-4 if dtype == torch.float32 else 1e-9
    W = torch.randn(6, n, n, dtype=torch.float64)
    W = spread * W / torch.linalg.matrix_norm(W, ord=2)[:, None, None]
    outcomes = []
    for shift in (0.0, 1e-6):
        A = (torch.eye(n, dtype=torch.float64) - W + shift).to(dtype)
        b = torch.randn(6, n, generator=torch.Generator().manual_seed(4), dtype=torch.float64).to(dtype)
        matvec = lambda u: torch.bmm(A, u[:, :, None])[..., 0]  # noqa: E731
        x, info = td.GMRES(rtol=rtol, restart=restart, max_iters=400).solve(matvec, b)
        true = ((b - matvec(x)).norm(dim=1) / b.norm(dim=1)).max().item()
        assert info.converged
        assert true <= 10 * rtol and info.residual <= rtol
        outcomes.append(info.converged)
    assert outcomes[0] == outcomes[1]


@pytest.mark.parametrize("solver", [td.GMRES(), td.GMRES(restart=2), td.FixedPointSolver(), td.DirectSolver()])
def test_a_non_finite_right_hand_side_is_not_solved(solver):
    A, b, matvec = batched_system()
    b[2, 3] = float("nan")
    calls = []
    x, info = solver.solve(lambda u: calls.append(1) or matvec(u), b)
    assert info.result is td.Result.non_finite and info.iters == 0 and not info.converged and not calls


@pytest.mark.parametrize("restart", [20, 2])
def test_gmres_stops_at_the_first_non_finite_matvec(restart):
    """A NaN from the operator ends the solve at once (non_finite), not after max_iters matvecs."""
    A, b, matvec = batched_system()
    calls = []

    def poisoned(u):
        calls.append(1)
        out = matvec(u)
        return out * float("nan") if len(calls) == 2 else out
    x, info = td.GMRES(rtol=1e-12, max_iters=200).solve(poisoned, b)
    assert info.result is td.Result.non_finite and not info.converged and len(calls) <= 3


def test_an_overflowing_solution_is_reported_non_finite():
    """A finite right-hand side whose solution overflows float32: scaled, the solve itself is exact."""
    b = torch.full((2, 3), 3e38)
    x, info = td.GMRES().solve(lambda u: 0.1 * u, b)
    assert info.result is td.Result.non_finite and not info.converged


def test_fixed_point_solver_reports_a_non_finite_operator():
    A, b, matvec = batched_system()
    x, info = td.FixedPointSolver(max_iters=20).solve(lambda u: matvec(u) * float("nan"), b)
    assert info.result is td.Result.non_finite and not info.converged


def test_gmres_with_zero_tolerance_keeps_its_krylov_cycles():
    """rtol = atol = 0 with one sample solved exactly at a restart: 0 / 0 in the stop test must not end
    every later cycle after one matvec."""
    A, b, matvec = batched_system(batch=2, n=12)
    b[1] = 0.0
    b[1, 0] = 1.0
    A[1] = torch.eye(12, dtype=A.dtype)  # sample 1 is solved exactly by the first cycle
    calls = []
    x, info = td.GMRES(rtol=0.0, restart=6, max_iters=14).solve(lambda u: calls.append(1) or matvec(u), b)
    assert len(calls) == 14 and info.iters == 14
    exact = torch.linalg.solve(A, b)
    assert torch.allclose(x, exact, atol=1e-8)


@pytest.mark.parametrize("restart", [20, 2, 3])
def test_a_rounding_level_pivot_is_not_taken_for_convergence(restart):
    """A singular operator whose Krylov space becomes invariant: the last pivot is rounding noise, not 0.
    Its huge least-squares solution shows in the back-substitution residual; convergence is not claimed."""
    A = torch.diag(torch.tensor([5.0, 0.0, 0.0], dtype=torch.float64))[None]
    b = torch.tensor([[1.0, 1.0, 0.0]], dtype=torch.float64)  # inconsistent: the best residual is ||b|| / sqrt(2)
    matvec = lambda u: torch.bmm(A, u[:, :, None])[..., 0]  # noqa: E731
    x, info = td.GMRES(rtol=1e-8, restart=restart, max_iters=12).solve(matvec, b)
    true = float((b - matvec(x)).norm() / b.norm())
    assert not info.converged and true > 0.5 and info.residual > 0.5


def test_a_half_precision_gradient_that_overflows_is_named():
    """The backward's solution is finite in float32 and overflows float16: an error, not inf gradients."""
    model = td.DEQ(lambda z, x: 0.9 * z + x, state_shape=(4,), solver="anderson")  # w = v / (1 - 0.9)
    z = model(torch.randn(2, 4).half().requires_grad_())[1][-1]
    with pytest.raises(td.NonFiniteError, match="overflows torch.float16"):
        (z.float() * 6e4).sum().backward()
