"""The torchdeq side-by-side benchmark runs end to end (``--smoke``: two batches, 64 test digits)."""
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_side_by_side_smoke(tmp_path):
    out = subprocess.run([sys.executable, "benchmarks/torchdeq_side_by_side.py", "--smoke", "--threads", "1",
                          "--out-dir", str(tmp_path)], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert out.returncode == 0, out.stderr[-3000:]
    results = json.loads((tmp_path / "torchdeq_side_by_side.json").read_text())
    assert results["command"].startswith("python benchmarks/torchdeq_side_by_side.py --smoke")
    assert results["machine"]["torch_threads"] == 1 and "torchdeq" in results["machine"]
    names = [r["method"] for r in results["rows"]]
    assert names == ["torchdeq (anderson, IFT)", "torchdyn_deq discrete (anderson, implicit)",
                     "torchdyn_deq continuous (tsit5, implicit)", "torchdeq (anderson, phantom k=5, tau=0.5)",
                     "torchdyn_deq discrete (anderson, phantom k=5, tau=0.5)",
                     "torchdyn_deq continuous (tsit5, phantom k=5, tau=0.5)"]
    for row in results["rows"]:
        assert row["steps"] == 2 and row["forward_nfe"] > 1 and row["step_ms"] > 0
    phantom = [r for r in results["rows"] if "phantom" in r["method"]]
    assert all(r["backward_iters"] == 5 for r in phantom)  # k VJPs
    table = (tmp_path / "torchdeq_side_by_side.md").read_text()
    assert "| Method | Test acc. (%) |" in table and "torchdeq 0." in table
