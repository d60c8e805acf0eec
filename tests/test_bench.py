"""The benchmark runs end to end (smoke: a micro shape, no timing assertions — numbers belong in its output)."""

from __future__ import annotations

from workbench.bench import format_table, run_benchmark


def test_benchmark_compares_reference_and_trainer_paths():
    result = run_benchmark("micro", "cpu", steps=2, warmup=1, compile_model=False, with_algorithms=False,
                           with_eval=False, host_repeats=0)  # tests/test_gpu_check.py runs it
    paths = [row["path"] for row in result["rows"]]
    assert paths == ["reference loop", "workbench train (ar)", "workbench train (mdm)"]
    assert all(row["tokens_per_s"] > 0 and row["mfu"] > 0 for row in result["rows"])
    assert result["rows"][0]["vs_reference"] == 1.0 and result["data_path_tokens_per_s"] > 0
    table = format_table(result)
    assert "reference loop" in table and "Streaming data path alone" in table
