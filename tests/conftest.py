import pytest
import torch
import torch.nn as nn


class TanhLayer(nn.Module):
    """f(z, x) = tanh(W z + U x + b), contractive for small W."""

    def __init__(self, d: int = 3, m: int = 2, scale: float = 0.4, dtype=torch.float64):
        super().__init__()
        self.W = nn.Parameter(scale * torch.randn(d, d, dtype=dtype) / d**0.5)
        self.U = nn.Parameter(torch.randn(d, m, dtype=dtype))
        self.b = nn.Parameter(0.1 * torch.randn(d, dtype=dtype))

    def forward(self, z, x):
        return torch.tanh(z @ self.W.T + x @ self.U.T + self.b)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def layer():
    return TanhLayer()
