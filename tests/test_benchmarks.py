"""The benchmark scripts (benchmarks/) run and measure what they claim (smoke tests on tiny inputs)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _table(markdown: str, title: str) -> dict[tuple[str, str], list[str]]:
    """Rows of the table that follows ``title`` (or the first table): (d, tokens) -> cells."""
    text = markdown.split(title, 1)[1] if title else markdown
    lines = [line for line in text.splitlines() if line.startswith("| ")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = {}
    for line in lines[1:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        if cells[0] == "d":
            break
        rows[(cells[0], cells[1])] = dict(zip(header[2:], cells[2:]))
    return rows


def test_benchmark_times_and_measures_peak_memory(tmp_path):
    out = tmp_path / "bench.md"
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "kernels")])}
    done = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "bench_mslr_kernel.py"), "--sizes", "2048", "--shapes", "2048x16",
         "--tokens", "64", "--repeats", "1", "--warmup", "1", "--threads", "1", "--markdown", str(out)],
        capture_output=True, text=True, timeout=300, env=env,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    markdown = out.read_text()
    assert "Command: `.venv/bin/python benchmarks/bench_mslr_kernel.py --sizes 2048" in markdown
    times = _table(markdown, "")
    assert set(times) == {("2048", "64"), ("2048->16", "64")}
    assert times[("2048", "64")]["base ms (x base)"].endswith("(1.000)")
    peaks = _table(markdown, "Peak memory of one forward + backward")
    square = {k: float(v) for k, v in peaks[("2048", "64")].items()}
    # The authors' formulation materialises the 2048 x 2048 float32 delta (16 MiB); the fused op never does.
    assert square["naive_dense peak MiB"] >= 15.5, square
    assert square["fused peak MiB"] < 4.0, square


def test_batch_scaling_benchmark_runs_on_a_local_checkpoint(tiny_bert_dir, capsys):
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import bench_batch_scaling
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    ratio = bench_batch_scaling.main(["--model", str(tiny_bert_dir), "--batch", "2", "--length", "8", "--threads", "1",
                                      "--repeats", "2"])
    assert ratio > 0
    assert "time(2B)/time(B) =" in capsys.readouterr().out


def test_tiny_checkpoint_builder_takes_a_benchmark_shape(tmp_path):
    import json

    import pytest

    from pipeline.testing import build_tiny_checkpoint

    path = build_tiny_checkpoint("llama", tmp_path / "m", shape={"hidden_size": 128, "num_hidden_layers": 3,
                                                                 "num_attention_heads": 2, "intermediate_size": 344})
    config = json.loads((path / "config.json").read_text())
    assert (config["hidden_size"], config["num_hidden_layers"], config["num_attention_heads"], config["num_key_value_heads"],
            config["intermediate_size"]) == (128, 3, 2, 2, 344)
    assert (path / "tokenizer.json").is_file()
    with pytest.raises(ValueError, match="unknown keys \\['layers'\\]"):
        build_tiny_checkpoint("llama", tmp_path / "x", shape={"layers": 3})


@pytest.mark.integration
def test_reference_cost_benchmark_times_each_cell_and_counts_fresh_steps(tmp_path, tiny_bert_dir, tiny_data_root, capsys):
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import bench_reference_cost
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    results = bench_reference_cost.main([
        "--out", str(tmp_path), "--model", str(tiny_bert_dir), "--batch-size", "4", "--max-length", "16", "--warmup", "1",
        "--steps", "4", "--eval-samples", "8", "--cells", "lora", "musclelora k=2", "musclelora ref batch 8",
        "--set", f"data.root={tiny_data_root}", "data.dataset=toy", "data.ref_size=8", "mslr.scales=[1,2,4]",
    ])
    assert [r["timed_steps"] for r in results] == [4, 4, 4]
    assert [r["fresh_reference_steps"] for r in results] == [0, 2, 4]
    assert all(r["mean_s"] > 0 for r in results)
    table = capsys.readouterr().out
    assert "| lora | " in table and "| musclelora k=2 | " in table and "| 2 of 4 |" in table
    assert json.loads((tmp_path / "results.json").read_text()) == results
