"""The committed --preset authors table from its per-seed runs: on the shared 2-core machine the
seeds ran as parallel processes (seeds/<seed>/, each its own command), and this writes the
multi-seed results (rows in seed order, mean ± std, comparison.md) with the job's own writer into
benchmarks/results/mnist_table1_authors/, recording the per-seed commands. Run from the
repository root: python benchmarks/results/mnist_table1_authors/combine_seeds.py
"""
import json
import shlex
from pathlib import Path

from torchdyn_deq.experiments import mnist

OUT = Path("benchmarks/results/mnist_table1_authors")


def main() -> None:
    runs = [json.loads(path.read_text()) for path in sorted((OUT / "seeds").glob("*/results.json"))]
    seeds = [run["config"]["seeds"] for run in runs]
    order = [s for s in map(int, mnist.AUTHORS_SEEDS.split(",")) if [s] in seeds]
    runs = [runs[seeds.index([s])] for s in order]
    same = {"seeds", "out_dir", "limit_train_batches", "limit_test_batches"}
    first = {k: v for k, v in runs[0]["config"].items() if k not in same}
    for run in runs[1:]:  # one recipe: only the seed may differ
        assert {k: v for k, v in run["config"].items() if k not in same} == first, "the per-seed runs differ"
        assert run["machine"] == runs[0]["machine"], "the per-seed runs ran on different machines or versions"
    argv = shlex.split(runs[0]["command"])[3:]  # after "python -m torchdyn_deq.experiments.mnist"
    args = mnist.parse_args(argv + ["--seeds", ",".join(map(str, order)), "--out-dir", str(OUT)])
    rows = [row for run in runs for row in run["rows"]]
    command = " ; ".join(run["command"] for run in runs)
    print(mnist.write_results(rows, args, command, machine=runs[0]["machine"]))


if __name__ == "__main__":
    main()
