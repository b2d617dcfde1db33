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
