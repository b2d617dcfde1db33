"""Multiscale DEQs (torchdyn_deq.multiscale): the flat state, implicit gradients through the
multiscale layer, the CIFAR model zoo's sizes, training of every form, the CIFAR experiment and
its step benchmark."""
import json
import warnings

import pytest
import torch
import torch.nn.functional as F

import torchdyn_deq as td
from benchmarks import cifar_step
from torchdyn_deq.experiments import cifar
from torchdyn_deq.multiscale import (MDEQ_LARGE, MDEQ_SMALL, MDEQConfig, MDEQLayer, MultiscaleState, SkipPredictor,
                                     init_weights, mdeq_classifier, mdeq_large, mdeq_small)

TINY = MDEQConfig(channels=(4, 8), head_channels=(2, 4), final_channels=16, expansion=2, groups=2, resolution=8)


def n_params(module):
    return sum(p.numel() for p in module.parameters())


def test_flatten_split_round_trip():
    state = MultiscaleState([(3, 8, 8), (5, 4, 4), (7, 2, 2)])
    assert state.size == 3 * 64 + 5 * 16 + 7 * 4 and len(state) == 3
    zs = tuple(torch.randn(2, *shape) for shape in state.shapes)
    flat = state.flatten(zs)
    assert flat.shape == (2, state.size)
    back = state.split(flat)
    assert all(torch.equal(a, b) for a, b in zip(zs, back))
    assert all(b._base is flat for b in back)  # views, no copies
    assert torch.equal(state.flatten(back), flat)
    assert MultiscaleState.pyramid((4, 8), 8).shapes == ((4, 8, 8), (8, 4, 4))


def test_state_errors():
    state = MultiscaleState([(2, 4, 4), (4, 2, 2)])
    with pytest.raises(ValueError, match="expected a flat state of shape"):
        state.split(torch.randn(2, state.size + 1))
    with pytest.raises(ValueError, match="branch 1 has shape"):
        state.flatten([torch.randn(2, 2, 4, 4), torch.randn(2, 4, 4, 4)])
    with pytest.raises(ValueError, match="channels, height, width"):
        MultiscaleState([(2, 4)])
    with pytest.raises(ValueError, match="unknown form 'implicit'"):
        mdeq_small(form="implicit")
    with pytest.raises(ValueError, match="only 'vanilla'"):
        mdeq_small(form="neural_ode", variant="skip")


def contractive_tiny_layer():
    """A 2-scale MDEQ layer (2 and 4 channels, 8x8 and 4x4) with a steady state that the solvers
    reach to 1e-11: small convolutions (Bai et al.'s init) and a post-fusion GroupNorm scale of
    0.1 make it a contraction (spectral radius about 0.8 at z*)."""
    state = MultiscaleState([(2, 8, 8), (4, 4, 4)])
    f = MDEQLayer(state, injection_channels=2, expansion=2, groups=2).double()
    init_weights(f, 0.01)
    with torch.no_grad():
        for post in f.fusion.post:
            post[2].weight.fill_(0.1)
    return state, f


@pytest.mark.parametrize("solver, tol", [("broyden", 1e-11), ("tsit5", 1e-10)])
def test_gradcheck_tiny_multiscale_deq(solver, tol):
    state, f = contractive_tiny_layer()
    deq = td.DEQ(f, solver=solver, state_shape=(state.size,), atol=tol, rtol=tol, max_steps=3000, on_failure="raise",
                 sensitivity=td.SteadyStateSensitivity(td.GMRES(rtol=1e-12, atol=1e-14, max_iters=500), on_failure="raise"))
    x = 2 * torch.randn(2, 2, 8, 8, dtype=torch.float64, requires_grad=True)
    project = torch.randn(state.size, 2, dtype=torch.float64)  # a few output directions keep the check short
    names = ["vf.vf.f.fusion.post.1.1.weight", "vf.vf.f.blocks.0.gn2.bias", "vf.vf.f.fusion.paths.0.1.conv.weight"]
    params = dict(deq.named_parameters())

    def fn(x, *ps):
        return torch.func.functional_call(deq, dict(zip(names, ps)), (x,), strict=False)[1][-1] @ project

    ps = [params[n].detach().clone().requires_grad_() for n in names]
    # fast_mode: the Jacobians are checked along random directions (one implicit backward solve
    # and two perturbed forward solves per check instead of one per input element). eps and atol
    # sit above the finite-difference noise of a solve converged to ~1e-11 (Jacobian entries ~100).
    assert torch.autograd.gradcheck(fn, (x, *ps), eps=1e-5, atol=1e-4, rtol=1e-4, fast_mode=True)
    assert deq.solution.converged


@pytest.mark.parametrize("size, build, paper, exact", [
    ("small", mdeq_small, 163_546, 159_274),
    ("large", mdeq_large, 10_630_000, 11_095_038),
])
def test_zoo_parameter_counts(size, build, paper, exact):
    counts = {}
    for form in ("continuous", "discrete", "neural_ode"):
        counts[form] = n_params(build(form))
    assert counts["continuous"] == counts["discrete"] == counts["neural_ode"] == exact
    assert n_params(build(variant="skip_reg")) == exact  # Skip Reg. adds no network
    assert abs(exact - paper) / paper < 0.05
    config = MDEQ_SMALL if size == "small" else MDEQ_LARGE
    extra = n_params(build(variant="skip")) - exact
    assert extra == n_params(SkipPredictor(config.state(), config.channels[0], config.expansion, config.groups))
    assert extra == {"small": 57_408, "large": 250_368}[size]


def tiny_batch(n=8):
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(n, 3, 8, 8, generator=gen)
    labels = torch.arange(n) % 2
    images[labels == 1] += 1.0  # separable: class 1 is brighter
    return images, labels


@pytest.mark.parametrize("form, variant", [("continuous", "vanilla"), ("continuous", "skip"),
                                           ("continuous", "skip_reg"), ("discrete", "vanilla"),
                                           ("neural_ode", "vanilla")])
def test_every_form_trains(form, variant):
    torch.manual_seed(0)
    model = mdeq_classifier(TINY, form, variant)
    images, labels = tiny_batch()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", td.ConvergenceWarning)  # the zoo caps the solves at 18 steps
        for _ in range(8):
            loss = F.cross_entropy(model(images), labels) + model.aux_loss()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.7 * losses[0], losses
    assert model.stem.net[0].weight.grad.abs().sum() > 0  # the injected input gets its gradient
    if form != "neural_ode":
        assert model.solution.backward_iters >= 1 and model.forward_nfe() >= 1
        stats = model.backward_stats()
        assert stats == {"backward_iters": float(model.solution.backward_iters),
                         "backward_residual": float(model.solution.backward_residual)}
        assert 0 <= stats["backward_residual"] < 1
    else:
        assert model.backward_stats()["backward_nfe"] > 0


@pytest.mark.slow
def test_cifar_experiment_synthetic_smoke(tmp_path, capsys):
    cifar.main(["--synthetic", "--steps", "2", "--batch-size", "4", "--test-samples", "8", "--form",
                  "continuous,neural_ode", "--variant", "skip_reg", "--no-progress", "--threads", "1",
                  "--out-dir", str(tmp_path)])
    results = json.loads((tmp_path / "results.json").read_text())
    rows = results["rows"]
    assert [(r["form"], r["variant"]) for r in rows] == [("neural_ode", "vanilla"), ("continuous", "skip_reg")]
    for row in rows:
        assert row["train_steps"] == 2 and row["test_samples"] == 8 and row["params"] == 159_274
        assert 0 < row["backward_time_s"] < row["step_time_s"] and row["predict_time_s"] > 0
    assert "| Model | Continuous | # Params |" in capsys.readouterr().out
    assert (tmp_path / "ratios.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_cifar_benchmark_smoke(tmp_path):
    out = tmp_path / "bench"
    cifar_step.main(["--batch-size", "2", "--warmup", "0", "--repeats", "1", "--threads", "1", "--out", str(out)])
    result = json.loads(out.with_suffix(".json").read_text())
    assert [(r["form"], r["variant"]) for r in result["rows"]] == list(cifar_step.BENCH_FORMS)
    assert result["rows"][0]["step_speedup_vs_node"] == 1.0
    assert "torch_threads" in result["machine"] and "Step speed-up vs NODE" in out.with_suffix(".md").read_text()


@pytest.mark.parametrize("parse", [lambda argv: cifar.parse_args(argv), lambda argv: cifar_step.parse_args(argv)],
                         ids=["experiment", "benchmark"])
def test_cifar_refuses_cuda_without_gpu(parse, capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(SystemExit) as exit_info:
        parse(["--device", "cuda"])
    assert exit_info.value.code == 2 and "CUDA is not available" in capsys.readouterr().err
