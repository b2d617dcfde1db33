"""Summary of run.sh's alternating runs: medians of the runs' medians, after / before."""
import json
import statistics as st
from pathlib import Path

here = Path(__file__).parent
rows = {}
for side in ("before", "after"):
    for path in sorted(here.glob(f"{side}_*.json")):
        for r in json.loads(path.read_text())["rows"]:
            rows.setdefault((r["size"], r["solver"]), {}).setdefault(side, []).append(r)
lines = ["| size | solver | NFE before / after | fwd before (ms) | fwd after | after / before | fwd / (NFE x g) after "
         "| bwd before (ms) | bwd after | after / before | bwd overhead after |",
         "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|"]
for (size, solver), d in rows.items():
    b, a = d["before"], d["after"]
    m = lambda rs, k: st.median(r[k] for r in rs)  # noqa: E731
    lines.append(f"| {size} | {solver} | {b[0]['nfe']} / {a[0]['nfe']} | {m(b, 'forward_ms'):.2f} | {m(a, 'forward_ms'):.2f} "
                 f"| {m(a, 'forward_ms') / m(b, 'forward_ms'):.2f} | {m(a, 'forward_overhead'):.2f} | {m(b, 'backward_ms'):.2f} "
                 f"| {m(a, 'backward_ms'):.2f} | {m(a, 'backward_ms') / m(b, 'backward_ms'):.2f} | {m(a, 'backward_overhead'):.2f} |")
print("\n".join(lines))
