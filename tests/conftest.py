"""Shared test set-up: one torch thread, a seed per test, and the small layers many files use."""
import pytest
import torch
import torch.nn as nn

# One thread for every test: the suite runs on 2 shared cores, where torch's default of one
# thread per core makes small operations up to 100x slower when another process is busy.
torch.set_num_threads(1)


class TanhLayer(nn.Module):
    """f(z, x) = tanh(W z + U x + b), contractive for small W."""

    def __init__(self, d: int = 3, m: int = 2, scale: float = 0.4, dtype=torch.float64):
        super().__init__()
        self.W = nn.Parameter(scale * torch.randn(d, d, dtype=dtype) / d**0.5)
        self.U = nn.Parameter(torch.randn(d, m, dtype=dtype))
        self.b = nn.Parameter(0.1 * torch.randn(d, dtype=dtype))

    def forward(self, z, x):
        return torch.tanh(z @ self.W.T + x @ self.U.T + self.b)


class LinearLayer(nn.Module):
    """f(z, x) = tanh(lin(z) + inj(x)), contractive (||lin||_2 = 0.5), float32 by default."""

    def __init__(self, d=4, m=3):
        super().__init__()
        self.lin, self.inj = nn.Linear(d, d), nn.Linear(m, d)
        with torch.no_grad():
            self.lin.weight.mul_(0.5 / torch.linalg.matrix_norm(self.lin.weight, ord=2))

    def forward(self, z, x):
        return torch.tanh(self.lin(z) + self.inj(x))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _one_thread():
    """Restore one thread after a test (an example or a job may set its own)."""
    yield
    torch.set_num_threads(1)


@pytest.fixture
def layer():
    return TanhLayer()
