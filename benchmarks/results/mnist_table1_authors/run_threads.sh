#!/bin/bash
# 1 against 2 torch threads for the MNIST job (issue 21 item 5), interleaved so that drifting load
# on the shared machine hits both alike; each run: one epoch capped at 60 steps of four rows. Then
# threads.md from every run present. From the repository root:
#   bash benchmarks/results/mnist_table1_authors/run_threads.sh          (ROUNDS="a b" by default)
#   ROUNDS="" bash benchmarks/results/mnist_table1_authors/run_threads.sh (only rewrite threads.md)
set -e
OUT=benchmarks/results/mnist_table1_authors/threads
for round in ${ROUNDS-a b}; do
  for threads in 1 2; do
    echo "$(date -u +%H:%M:%S) round $round threads $threads load $(cut -d' ' -f1-3 /proc/loadavg)" >> $OUT.log
    python -m torchdyn_deq.experiments.mnist --variants vanilla,skip_reg --forms continuous,discrete --jacobian no \
      --no-baseline --epochs 1 --limit-train-batches 60 --threads $threads --no-progress \
      --out-dir $OUT/t$threads-$round > /dev/null 2>&1
  done
done
python - "$OUT" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
runs = {p.name: json.loads((p / "results.json").read_text()) for p in sorted(out.iterdir()) if (p / "results.json").exists()}
lines = ["# The MNIST job: 1 against 2 torch threads", "",
         "Written by `run_threads.sh` from `threads/*/results.json`; the load average at each start is in "
         "`threads.log`. Training time = forward + backward + update over the 60 steps (s).", "",
         "| Row | " + " | ".join(f"{name} ({r['machine']['torch_threads']} thread(s))" for name, r in runs.items()) + " |",
         "|---|" + "--:|" * len(runs)]
keys = [(r["variant"], r["form"]) for r in next(iter(runs.values()))["rows"]]
for key in keys:
    cells = [next(x for x in r["rows"] if (x["variant"], x["form"]) == key)["step_time_s"] for r in runs.values()]
    lines.append(f"| {key[0]} {key[1]} | " + " | ".join(f"{c:.2f}" for c in cells) + " |")
out.with_suffix(".md").write_text("\n".join(lines) + "\n")
PY
