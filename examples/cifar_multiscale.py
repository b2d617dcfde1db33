"""A multiscale DEQ (MDEQ-small, the paper's CIFAR-10 model) trained for a few steps.

The full experiment (data, schedule, the paper's Table 2) is ``python -m
torchdyn_deq.experiments.cifar``; this script shows the public API on CIFAR-shaped random
images, so it runs offline in seconds::

    python examples/cifar_multiscale.py --steps 3 --batch 8
    python examples/cifar_multiscale.py --form discrete --variant skip_reg
"""
import argparse
import warnings

import torch
import torch.nn.functional as F

import torchdyn_deq as td


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--form", choices=("continuous", "discrete"), default="continuous")
    parser.add_argument("--variant", choices=("vanilla", "skip", "skip_reg"), default="skip_reg")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    model = td.multiscale.mdeq_small(args.form, args.variant)        # stem -> DEQ(MDEQLayer) -> head
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=2.5e-6)
    images, labels = torch.randn(args.batch, 3, 32, 32), torch.randint(0, 10, (args.batch,))
    record = {}
    for step in range(args.steps):
        with warnings.catch_warnings():
            # the paper caps the forward solve at 18 steps: an untrained MDEQ often ends there
            warnings.simplefilter("ignore", td.ConvergenceWarning)
            loss = F.cross_entropy(model(images), labels) + model.aux_loss()
            optimizer.zero_grad()
            loss.backward()
        optimizer.step()
        sol = model.solution
        record = {"loss": float(loss), "nfe": sol.nfe, "residual": float(sol.residual.max()),
                  "backward_iters": sol.backward_iters}
        print(f"step {step}: loss {record['loss']:.3f}, NFE {record['nfe']}, worst residual "
              f"{record['residual']:.2f} (<= 1: converged), GMRES iterations {record['backward_iters']}")
    return record


if __name__ == "__main__":
    main()
