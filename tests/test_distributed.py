"""Real two-process DDP training (gloo, CPU, Lightning ``strategy='ddp'``) matches
single-process training on the same global batch, for the continuous and the discrete DEQ.

The DDP run is a subprocess (``tests/_ddp_worker.py``) so that Lightning's ``ddp`` launcher,
which re-runs the script for rank 1, works under pytest.
"""
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import _ddp_worker as W

WORKER = Path(__file__).with_name("_ddp_worker.py")
REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


def _single_process(solver, micro_batches: bool):
    """The same model trained in one process on the global batches. ``micro_batches=False``:
    one batch of 2B samples (what the issue asks for; equal up to the solver tolerance, the
    solve stops when the whole batch converged); ``True``: each rank's B samples solved
    separately and the gradients averaged (DDP's exact computation)."""
    torch.manual_seed(0)
    model = W.DEQClassifier(solver)
    opt = torch.optim.SGD(model.parameters(), lr=W.LR, momentum=0.0)
    nfe = []
    for x, y in W.global_batches():
        opt.zero_grad()
        if micro_batches:
            for xs, ys in zip(x.chunk(W.WORLD_SIZE), y.chunk(W.WORLD_SIZE)):
                (F.cross_entropy(model(xs), ys) / W.WORLD_SIZE).backward()
                nfe.append(model.deq.solution.nfe)
        else:
            F.cross_entropy(model(x), y).backward()
            nfe.append(model.deq.solution.nfe)
        opt.step()
    return {k: v.detach() for k, v in model.state_dict().items()}, nfe


def _max_diff(a, b):
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.mark.parametrize("solver", ["tsit5", "anderson", "multiscale", "weight_norm"])
def test_ddp_two_processes_match_single_process(solver, tmp_path):
    torch.set_num_threads(1)
    proc = subprocess.run([sys.executable, str(WORKER), solver, str(tmp_path)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(W.WORLD_SIZE)]
    assert all(r["world_size"] == 2 and r["backend"] == "gloo" for r in ranks)
    assert ranks[0]["pid"] != ranks[1]["pid"]  # two real processes
    assert [len(r["nfe"]) for r in ranks] == [W.MAX_STEPS] * 2

    # the replicas stay identical (gradients all-reduced), whatever each rank's NFE
    assert _max_diff(ranks[0]["params"], ranks[1]["params"]) == 0.0
    # the solution statistics logged with sync_dist=True are the mean over the ranks
    last = (ranks[0]["nfe"][-1] + ranks[1]["nfe"][-1]) / 2
    assert ranks[0]["logged_nfe"] == ranks[1]["logged_nfe"] == pytest.approx(last)

    exact, nfe_micro = _single_process(solver, micro_batches=True)
    global_batch, _ = _single_process(solver, micro_batches=False)
    diff_exact = _max_diff(ranks[0]["params"], exact)
    diff_global = _max_diff(ranks[0]["params"], global_batch)
    # each rank solved exactly its own B samples: the rank NFE are the micro-batch NFE
    assert [n for step in zip(ranks[0]["nfe"], ranks[1]["nfe"]) for n in step] == nfe_micro
    print(f"\n[{solver}] rank NFE per step: {ranks[0]['nfe']} / {ranks[1]['nfe']}; "
          f"max |param DDP - single process|: {diff_global:.3g} (batch 2B), {diff_exact:.3g} (micro-batches)")
    assert diff_exact <= 1e-12
    if solver != "multiscale":  # capped multiscale solves end wherever the cap stops them
        assert diff_global <= 1e-7

    # training moved the parameters (the comparison is not vacuous)
    torch.manual_seed(0)
    init = {k: v.detach() for k, v in W.DEQClassifier(solver).state_dict().items()}
    assert _max_diff(init, exact) > 1e-3
