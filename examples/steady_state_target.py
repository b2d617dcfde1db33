"""Learn a layer whose steady state hits a target: z* = f(z*, x) with z* close to y."""
import argparse

import torch
import torch.nn as nn

import torchdyn_deq as td


class Layer(nn.Module):
    """f(z, x) = tanh(W z + U x + b)."""

    def __init__(self, dim: int, n_in: int):
        super().__init__()
        self.lin, self.inj = nn.Linear(dim, dim), nn.Linear(n_in, dim)

    def forward(self, z, x):
        return torch.tanh(self.lin(z) + self.inj(x))


def main(argv=None) -> float:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=200, help="Adam steps")
    parser.add_argument("--dim", type=int, default=8, help="state size")
    parser.add_argument("--batch", type=int, default=32, help="samples")
    parser.add_argument("--solver", default="tsit5", help="tsit5, vcab3, anderson, ...")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    x = torch.randn(args.batch, 4)
    target = 0.5 * torch.tanh(x @ torch.randn(4, args.dim))  # reachable: inside tanh's range
    model = td.DEQ(Layer(args.dim, 4), solver=args.solver, state_shape=(args.dim,))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for step in range(args.steps):
        _, sol = model(x)
        loss = (sol[-1] - target).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % max(1, args.steps // 5) == 0 or step == args.steps - 1:
            s = model.solution
            print(f"step {step:4d}  loss {loss.item():.5f}  nfe {s.nfe}  backward iters {s.backward_iters}")
    return loss.item()


if __name__ == "__main__":
    main()
