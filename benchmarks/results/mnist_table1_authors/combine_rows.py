"""The committed --preset authors table from its per-row runs. On the shared 2-core machine each
row and seed trained as its own process (rows/<variant>-<form>-<seed>/, each with its own command),
all at the same time, so that the load of the machine fell on the rows being compared alike; this writes the
table, results.json (every run's command) and comparison.md with the job's own writer into
benchmarks/results/mnist_table1_authors/. From the repository root:
    python benchmarks/results/mnist_table1_authors/combine_rows.py
"""
import json
import shlex
from pathlib import Path

from torchdyn_deq.experiments import mnist

OUT = Path("benchmarks/results/mnist_table1_authors")
PER_ROW = {"variants", "forms", "jacobian", "seeds", "out_dir"}  # what may differ between the runs


def main() -> None:
    runs = [json.loads(path.read_text()) for path in sorted((OUT / "rows").glob("*/results.json"))]
    recipe = {k: v for k, v in runs[0]["config"].items() if k not in PER_ROW}
    for run in runs[1:]:
        assert {k: v for k, v in run["config"].items() if k not in PER_ROW} == recipe, "the runs differ"
        assert run["machine"] == runs[0]["machine"], "the runs ran on different machines or versions"
    variants = [name for name in mnist.DEQ_VARIANTS if any(name in run["config"]["variants"] for run in runs)]
    forms = [form for form in ("discrete", "continuous") if any(form in run["config"]["forms"] for run in runs)]
    jacobian = [j for j in ("no", "yes") if any(j in run["config"]["jacobian"] for run in runs)]
    present = {seed for run in runs for seed in run["config"]["seeds"]}
    seeds = [s for s in map(int, mnist.AUTHORS_SEEDS.split(",")) if s in present] + sorted(
        present - set(map(int, mnist.AUTHORS_SEEDS.split(","))))
    argv = shlex.split(runs[0]["command"])[3:]  # after "python -m torchdyn_deq.experiments.mnist"
    args = mnist.parse_args(argv + ["--variants", ",".join(variants), "--forms", ",".join(forms),
                                    "--jacobian", ",".join(jacobian), "--seeds", ",".join(map(str, seeds)),
                                    "--out-dir", str(OUT)])
    by_key = {(r["seed"], r["variant"], r["form"], r["jacobian"]): r for run in runs for r in run["rows"]}
    order = [(seed, v.name, v.form, v.jacobian) for seed in args.seeds for v in mnist.selected_variants(args)]
    rows = [by_key[key] for key in order if key in by_key]
    command = " ; ".join(run["command"] for run in runs)
    print(mnist.write_results(rows, args, command, machine=runs[0]["machine"]))


if __name__ == "__main__":
    main()
