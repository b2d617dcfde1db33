"""The overhead and backward-tolerance benchmarks run end to end on tiny sizes and write both files."""
import json
import math

import pytest

from benchmarks import backward_tolerance, overhead


def test_overhead_writes_a_row_per_solver(tmp_path):
    overhead.main(["--sizes", "4x8", "--repeats", "1", "--no-compile", "--out", str(tmp_path / "overhead")])
    data = json.loads((tmp_path / "overhead.json").read_text())
    assert [r["solver"] for r in data["rows"]] == list(overhead.SOLVERS)
    assert all(r["forward_overhead"] > 0 and r["nfe"] > 0 for r in data["rows"])
    assert "fwd / (NFE x g)" in (tmp_path / "overhead.md").read_text()


def test_backward_tolerance_errors_shrink_with_the_tolerance(tmp_path):
    backward_tolerance.main(["--steps", "2", "--batches", "1", "--out", str(tmp_path / "bt")])
    rows = json.loads((tmp_path / "bt.json").read_text())["rows"]
    errors = [r["gradient_error"] for r in rows]
    totals = [r["total_error"] for r in rows]
    assert [r["rtol"] for r in rows] == list(backward_tolerance.TOLERANCES)
    assert errors[-1] < errors[0] and all(0 < r["gradient_error"] <= 10 * r["rtol"] for r in rows), rows
    # the total error is the forward tolerance's (5e-3 here): set by it, not by the backward rtol
    assert 0 < min(totals) and max(totals) <= 2 * min(totals) and max(totals) < 0.2, totals


def test_doors_writes_a_row_per_door(tmp_path):
    from benchmarks import doors

    doors.main(["--sizes", "4x8", "--repeats", "1", "--out", str(tmp_path / "doors")])
    data = json.loads((tmp_path / "doors.json").read_text())
    assert [r["door"] for r in data["rows"]] == ["DEQ(f)", "InfiniteTimeNeuralODE(vf)", "NeuralODE(vf, 'steady_state')",
                                                 "odeint_steady_state"]
    assert data["rows"][0]["ratio"] == 1.0 and all(r["ms"] > 0 for r in data["rows"])


def test_backward_ab_compares_the_same_solve(tmp_path):
    """Both GMRES versions solve the same system: same iterations, residuals equal to rounding (HEAD: a
    commit every clone has, shallow ones too)."""
    from benchmarks import backward_ab

    backward_ab.main(["--sizes", "4x8", "--repeats", "1", "--before", "HEAD", "--out", str(tmp_path / "ab")])
    before, after = json.loads((tmp_path / "ab.json").read_text())["rows"]
    assert before["iters"] == after["iters"] > 0 and abs(before["residual"] - after["residual"]) <= 1e-6
    assert before["ops"] > 0 and after["ops"] > 0 and after["backward_ms"] > 0


def test_bookkeeping_rows_train_the_same_model_on_the_same_batches(tmp_path):
    from benchmarks import bookkeeping

    bookkeeping.main(["--smoke", "--out", str(tmp_path / "bk")])
    results = json.loads((tmp_path / "bk.json").read_text())["results"]["vanilla"]
    assert list(results) == list(bookkeeping.ROWS)
    # the same solves in every row: the rows differ in bookkeeping only
    assert len({tuple(r["nfe"]) for r in results.values()}) == 1
    assert all(len(r["outside_cpu"]) == len(r["cpu"]) == 3 for r in results.values())
    assert "Outside it, over plain (ms)" in (tmp_path / "bk.md").read_text()


def test_compiled_bodies_times_each_body_both_ways(tmp_path):
    from benchmarks import compiled_bodies

    compiled_bodies.main(["--sizes", "4x8", "--repeats", "5", "--out", str(tmp_path / "cb")])
    rows = json.loads((tmp_path / "cb.json").read_text())["rows"]
    assert {r["body"] for r in rows} >= {"vcab3 step, with estimate", "GMRES iteration as run (eager, sliced)"}
    # the eager-as-run row is a difference of two times: its sign is not guaranteed on a tiny size
    assert all(r["eager_us"] > 0 and r["compiled_us"] > 0 for r in rows if r["ratio"] is not None)


@pytest.mark.slow
def test_spectrum_bound_traces_the_trained_models(tmp_path):
    from benchmarks import spectrum_bound

    spectrum_bound.main(["--warmup", "2", "--batches", "1", "--out", str(tmp_path / "sb")])
    data = json.loads((tmp_path / "sb.json").read_text())
    for row in data["rows"]:
        assert row["nfe"] == row["model_nfe"]  # the trace is the model's own solve
        assert 0 < row["h_max"] < math.inf and row["slowest_re"] > 0
        assert len(row["steps"]) == row["accepted"] and sum(row["steps"]) == pytest.approx(row["t_end"])
        assert row["worst_residual"][-1] <= 1 < row["worst_residual"][0]
    assert data["neural_ode"][0]["nfe"] > 0


def test_op_count_attributes_every_operation(tmp_path):
    from benchmarks import op_count

    op_count.main(["--sizes", "4x8", "--repeats", "2", "--out", str(tmp_path / "oc")])
    rows = json.loads((tmp_path / "oc.json").read_text())["rows"]
    assert {r["solver"] for r in rows} == set(op_count.SOLVERS)
    for r in rows:
        forward = r["forward_ops"]
        assert forward["network"] > 0 and r["forward_ops_outside"] == sum(forward.values()) - forward["network"]
        assert 0 < r["backward_ops_outside"] < sum(r["backward_ops"].values())


def test_compare_runs_reads_each_method_against_the_baseline(tmp_path, capsys):
    from benchmarks import compare_runs

    rows = [{"method": compare_runs.BASELINE, "step_s": 0.03, "backward_s": 0.02, "predict_s": 0.005},
            {"method": compare_runs.METHODS["vanilla"], "step_s": 0.01, "backward_s": 0.004, "predict_s": 0.01}]
    (tmp_path / "run.json").write_text(json.dumps({"rows": rows}))
    compare_runs.main([str(tmp_path / "run.json")])
    out = capsys.readouterr().out
    assert "vanilla: step 3.00x (10.00) bwd 5.00x (4.00) pred 2.00 (10.00)" in out and "skip_reg" not in out
