"""Anderson acceleration's history (ring buffers, incremental Gram matrix) and its safeguard,
step by step against a direct computation from the definitions."""
import pytest
import torch

import torchdyn_deq as td
from torchdyn_deq._loop import Proposal


def _reference_iterate(X, F, lam, mixing):
    """The next iterate from the last iterates ``X`` and images ``F`` (lists, oldest first),
    straight from the definition: ``alpha`` minimises ``||sum alpha_i g_i||^2 / s + lam ||alpha||^2``
    subject to ``sum alpha = 1`` (``s`` the Gram matrix's largest diagonal), by the bordered KKT
    system; ``z = beta sum alpha_i f_i + (1 - beta) sum alpha_i x_i``."""
    Xs, Fs = torch.stack(X, 1), torch.stack(F, 1)
    G = Fs - Xs
    gram = G @ G.mT
    gram = gram / torch.diagonal(gram, dim1=1, dim2=2).amax(1)[:, None, None]
    batch, k = gram.shape[:2]
    kkt = torch.zeros(batch, k + 1, k + 1, dtype=gram.dtype)
    kkt[:, :k, :k] = gram + lam[:, None, None] * torch.eye(k, dtype=gram.dtype)
    kkt[:, :k, k] = kkt[:, k, :k] = 1
    rhs = torch.zeros(batch, k + 1, 1, dtype=gram.dtype)
    rhs[:, k] = 1
    alpha = torch.linalg.solve(kkt, rhs)[:, :k, 0]
    return mixing * (alpha[:, :, None] * Fs).sum(1) + (1 - mixing) * (alpha[:, :, None] * Xs).sum(1)


@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "autograd"])
@pytest.mark.parametrize("mixing", [1.0, 0.6])
def test_iterates_are_the_regularised_mixing_of_the_last_memory_images(grad, mixing):
    # a slowly contracting linear map, 14 steps: the ring buffer of 3 wraps four times; under
    # autograd (backprop through the solver) the buffers are written out of place, under no_grad in place
    torch.manual_seed(0)
    A = 0.9 * torch.linalg.qr(torch.randn(4, 4, dtype=torch.float64))[0]
    b = torch.randn(3, 4, dtype=torch.float64, requires_grad=grad)
    g = lambda t, z: z @ A.T + b - z
    solver = td.AndersonAcceleration(memory=3, mixing=mixing)
    with torch.set_grad_enabled(grad):
        z = torch.zeros(3, 4, dtype=torch.float64)
        state = solver.init(g, z, g(0, z), None)
        X, F = [z], [z + g(0, z)]  # the reference's own trajectory
        for _ in range(14):
            X.append(_reference_iterate(X[-3:], F[-3:], state.memory.lam, mixing))
            F.append(X[-1] + g(0, X[-1]))
            proposal = solver.propose(g, state, None)
            torch.testing.assert_close(proposal.z, X[-1], rtol=1e-12, atol=1e-12)
            state, accepted = solver.decide(g, state, proposal, [], None)
            assert accepted
        # it did accelerate: plain iteration (contraction 0.9) would have fallen by 0.9^14 = 0.23
        assert float(g(0, state.z).detach().norm()) < 0.1 * float(g(0, X[0]).detach().norm())
        if grad:  # the gradient flows through every buffer write, as through the reference's lists
            torch.testing.assert_close(torch.autograd.grad(state.z.sum(), b)[0],
                                       torch.autograd.grad(X[-1].sum(), b)[0], rtol=1e-10, atol=1e-10)

def test_safeguard_raises_and_lowers_the_regularization_per_sample():
    # residual norms fed to decide directly: sample 0 never improves by 1%, sample 1 improves
    # every iteration, sample 2 is stuck for 20 iterations, then improves; the rule of the docstring
    # (8 iterations without a 1% fall: lambda x 10 up to 1e-2; each 1% fall: lambda / 10 down to 1e-4)
    solver = td.AndersonAcceleration(memory=2)
    patience, low, high = solver.safeguard_patience, solver.regularization, solver.max_regularization
    n = 30
    norms = torch.ones(n + 1, 3, dtype=torch.float64)
    norms[:, 0] = 1 - 0.005 * torch.arange(n + 1) / n  # falls, but never by 1% within the run's stretches
    norms[:, 1] = 0.95 ** torch.arange(n + 1)
    norms[21:, 2] = 0.5 ** torch.arange(1, n - 19)
    direction = torch.randn(3, 5, dtype=torch.float64)
    direction = direction / direction.norm(dim=1, keepdim=True)
    g = lambda t, z: z
    state = solver.init(g, torch.zeros(3, 5, dtype=torch.float64), norms[0][:, None] * direction, None)
    best, since, lam = norms[0].tolist(), [0, 0, 0], [low] * 3
    for i in range(1, n + 1):
        gz = norms[i][:, None] * direction
        state, _ = solver.decide(g, state, Proposal(torch.zeros(3, 5, dtype=torch.float64), gz, 0.0), [], None)
        for s in range(3):  # the rule, by hand
            better = norms[i, s] < 0.99 * best[s]
            since[s] = 0 if better else since[s] + 1
            if since[s] >= patience:
                lam[s], since[s] = min(lam[s] * 10, high), 0
            elif better:
                lam[s] = max(lam[s] / 10, low)
            best[s] = min(best[s], float(norms[i, s]))
        assert state.memory.lam.tolist() == pytest.approx(lam, rel=1e-12), i
    # the trajectory the rule gives: sample 0 reached the cap, 1 never left the floor, 2 came back down
    assert lam[0] == high and lam[1] == low and lam[2] == pytest.approx(low)

