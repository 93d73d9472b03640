"""The robustness matrix (pipeline/matrix.py, launch/matrix.py): grid parsing, bookkeeping, resume, report."""

from __future__ import annotations

import csv
import io
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.config import ConfigError
from pipeline.matrix import (
    cell_command, cell_dir, cell_settings, cell_state, cell_status, collect_rows, load_grid, publish, run_grid, settings_changes,
    summary_table,
)

REPO = Path(__file__).resolve().parents[1]


def _grid_file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "grid.yaml"
    path.write_text(text)
    return path


def test_grid_axes_seeds_and_cell_overrides(tmp_path):
    grid = load_grid(_grid_file(tmp_path, f"""
output_root: {tmp_path / 'out'}
attacks: [badnets, addsent]
methods: [vanilla, musclelora]
seeds: [1]
method_seeds: {{vanilla: [1, 2, 3]}}
overrides: [train.epochs=2]
method_overrides: {{vanilla: [train.lr=2e-5]}}
cell_overrides:
  - {{match: {{method: musclelora, attack: badnets}}, overrides: [train.log_every_steps=5]}}
"""))
    keys = [(c.attack, c.method, c.seed) for c in grid.cells]
    # First seeds of the whole grid first, then the extra seeds.
    assert keys == [("badnets", "vanilla", 1), ("badnets", "musclelora", 1), ("addsent", "vanilla", 1), ("addsent", "musclelora", 1),
                    ("badnets", "vanilla", 2), ("addsent", "vanilla", 2), ("badnets", "vanilla", 3), ("addsent", "vanilla", 3)]
    by = {(c.attack, c.method, c.seed): c for c in grid.cells}
    assert by[("badnets", "vanilla", 2)].overrides == ("train.epochs=2", "train.lr=2e-5")
    assert by[("badnets", "musclelora", 1)].overrides == ("train.epochs=2", "train.log_every_steps=5")
    assert by[("addsent", "musclelora", 1)].overrides == ("train.epochs=2",)
    command = cell_command(grid, by[("addsent", "musclelora", 1)], tmp_path / "x", resume=True)
    assert "method=musclelora" in command and "data.attack=addsent" in command and "seed=1" in command
    assert command[-1] == "resume=true"


def test_method_attacks_limit_a_method_to_some_attacks(tmp_path):
    grid = load_grid(_grid_file(tmp_path, f"""
output_root: {tmp_path / 'out'}
attacks: [badnets, addsent, synbkd]
methods: [vanilla, lora]
method_attacks: {{lora: [synbkd, badnets]}}
"""))
    assert [(c.attack, c.method) for c in grid.cells] == [
        ("badnets", "vanilla"), ("badnets", "lora"), ("addsent", "vanilla"), ("synbkd", "vanilla"), ("synbkd", "lora")]
    for text, needle in (("method_attacks: {ga: [badnets]}", "method_attacks names 'ga', which is not in methods"),
                         ("method_attacks: {lora: [stylebkd]}", "method_attacks.lora must be a non-empty list of attacks"),
                         ("method_attacks: {lora: []}", "method_attacks.lora must be a non-empty list of attacks"),
                         ("method_attacks: [lora]", "method_attacks must map method -> list of attacks")):
        path = _grid_file(tmp_path, f"attacks: [badnets, addsent]\nmethods: [vanilla, lora]\n{text}\n")
        with pytest.raises(ConfigError, match=re.escape(needle)):
            load_grid(path)


def test_grid_errors_are_all_reported(tmp_path):
    path = _grid_file(tmp_path, """
methods: vanilla
attacks: []
colour: blue
method_seeds: {lora: [1]}
overrides: [method=lora]
discussion: no/such/file.md
""")
    with pytest.raises(ConfigError) as info:
        load_grid(path)
    text = str(info.value)
    for needle in ("methods must be a list", "attacks is required", "unknown key 'colour'", "'lora', which is not in methods",
                   "sets 'method'", "no/such/file.md does not exist"):
        assert needle in text, needle


def test_bookkeeping_skips_finished_resumes_checkpointed_and_restarts_stale(tmp_path):
    grid = load_grid(_grid_file(tmp_path, f"output_root: {tmp_path / 'out'}\nattacks: [badnets]\nmethods: [a, b, c, d]\n"))
    dirs = {c.method: cell_dir(grid, c) for c in grid.cells}
    (dirs["a"]).mkdir(parents=True)
    (dirs["a"] / "metrics.json").write_text(json.dumps({"cacc": 90.0, "asr": 10.0, "clean_fpr": 5.0, "history": []}))
    (dirs["b"] / "checkpoints" / "last").mkdir(parents=True)
    (dirs["b"] / "checkpoints" / "last" / "COMPLETE").write_text("{}")
    (dirs["c"]).mkdir(parents=True)
    (dirs["c"] / "train.log").write_text("half written")  # killed before its first checkpoint
    assert [cell_state(dirs[m]) for m in "abcd"] == ["finished", "resumable", "stale", "new"]
    seen = []

    def fake_runner(command, log_file, env):
        seen.append(command)
        out = Path(next(a for a in command if a.startswith("output_dir=")).split("=", 1)[1])
        out.mkdir(parents=True, exist_ok=True)
        assert not (out / "train.log").exists()
        (out / "metrics.json").write_text(json.dumps({"cacc": 80.0, "asr": 20.0, "clean_fpr": 4.0, "history": [],
                                                      "train_seconds": 1.0, "peak_memory_mb": 1.0, "trainable_parameters": 3}))
        return 0

    counts = run_grid(grid, runner=fake_runner, validate=False)  # placeholder methods a-d
    assert counts == {"skipped": 1, "ran": 3, "failed": 0, "waiting": 0}
    assert [c[-1] == "resume=true" for c in seen] == [True, False, False]
    assert run_grid(grid, runner=fake_runner, validate=False) == {"skipped": 4, "ran": 0, "failed": 0, "waiting": 0}
    rows = list(csv.DictReader(io.StringIO((tmp_path / "out" / "results.csv").read_text())))
    assert [r["method"] for r in rows] == ["a", "b", "c", "d"]
    report = (tmp_path / "out" / "REPORT.md").read_text()
    assert "| method | cells | train seconds | cell wall seconds | peak memory MB | trainable parameters |" in report
    assert "| b | 1 | 1 | 0 | 1 | 3 |" in report  # wall seconds of the (instant) fake cell, from its cell.json


def _fake_train(command, log_file, env):
    out = Path(next(a for a in command if a.startswith("output_dir=")).split("=", 1)[1])
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps({"cacc": 80.0, "asr": 20.0, "clean_fpr": 4.0, "history": [],
                                                  "train_seconds": 1.0, "peak_memory_mb": 1.0, "trainable_parameters": 3}))
    return 0


def test_changed_settings_are_refused_then_rerun_with_old_results_kept(tmp_path):
    base = tmp_path / "base.yaml"
    base.write_text("# a comment\ntrain:\n  lr: 1.0e-3\n")
    text = f"base_config: {base}\noutput_root: {tmp_path / 'out'}\nattacks: [badnets]\nmethods: [lora, prompt]\n"
    grid_path = _grid_file(tmp_path, text)
    assert run_grid(load_grid(grid_path), runner=_fake_train)["ran"] == 2
    # A comment in the base config changes nothing.
    base.write_text("# another comment\ntrain:\n  lr: 1.0e-3\n")
    assert run_grid(load_grid(grid_path), runner=_fake_train)["skipped"] == 2

    grid_path.write_text(text + "method_overrides: {prompt: [train.freeze_head=false]}\n")
    grid = load_grid(grid_path)
    prompt = next(c for c in grid.cells if c.method == "prompt")
    assert settings_changes(grid, prompt) == ["overrides: [] -> ['train.freeze_head=false']"]
    assert [cell_status(grid, c) for c in grid.cells] == ["finished", "changed"]
    assert [r["method"] for r in collect_rows(grid)] == ["lora"]  # the report leaves the changed cell out
    with pytest.raises(ConfigError) as info:
        run_grid(grid, runner=_fake_train)
    assert "cell default/default/badnets/prompt/seed42 finished with other settings" in str(info.value)
    assert "--rerun-changed" in str(info.value)
    assert cell_status(grid, prompt) == "changed"  # nothing moved, nothing ran

    seen = []
    counts = run_grid(grid, runner=lambda c, log, env: seen.append(c) or _fake_train(c, log, env), rerun_changed=True)
    assert counts == {"skipped": 1, "ran": 1, "failed": 0, "waiting": 0}
    assert "train.freeze_head=false" in seen[0]
    replaced = list((tmp_path / "out" / "replaced").glob("*/default/default/badnets/prompt/seed42/metrics.json"))
    assert len(replaced) == 1
    assert [cell_status(grid, c) for c in grid.cells] == ["finished", "finished"]

    # A changed base config value is a change too.
    base.write_text("train:\n  lr: 2.0e-3\n")
    grid = load_grid(grid_path)
    assert [cell_status(grid, c) for c in grid.cells] == ["changed", "changed"]
    assert settings_changes(grid, grid.cells[0])[0].startswith("base_config: ")


def test_derived_cell_changes_with_its_source(tmp_path):
    text = (f"output_root: {tmp_path / 'out'}\nattacks: [badnets]\nmethods: [vanilla, strip]\n"
            "derived: {strip: {from: vanilla}}\n")
    grid_path = _grid_file(tmp_path, text)
    grid = load_grid(grid_path)
    for cell in grid.cells:  # both finished, with the settings the grid has now
        run_dir = cell_dir(grid, cell)
        run_dir.mkdir(parents=True)
        (run_dir / "metrics.json").write_text(json.dumps({"cacc": 1.0, "asr": 1.0, "clean_fpr": 1.0, "history": []}))
        (run_dir / "cell.json").write_text(json.dumps({"wall_seconds": 1.0, "settings": cell_settings(grid, cell)}))
    assert [cell_status(grid, c) for c in grid.cells] == ["finished", "finished"]
    grid_path.write_text(text + "method_overrides: {vanilla: [train.lr=2e-5]}\n")
    grid = load_grid(grid_path)
    assert [cell_status(grid, c) for c in grid.cells] == ["changed", "changed"]
    assert any(change.startswith("source_settings: ") for change in settings_changes(grid, grid.cells[1]))


def test_cells_finished_before_settings_were_recorded_compare_their_command(tmp_path):
    grid_path = _grid_file(tmp_path, f"output_root: {tmp_path / 'out'}\nattacks: [badnets]\nmethods: [lora]\n"
                                     "overrides: [train.epochs=2]\n")
    grid = load_grid(grid_path)
    cell = grid.cells[0]
    run_dir = cell_dir(grid, cell)
    run_dir.mkdir(parents=True)
    (run_dir / "metrics.json").write_text(json.dumps({"cacc": 1.0, "asr": 1.0, "clean_fpr": 1.0, "history": []}))
    (run_dir / "cell.json").write_text(json.dumps({"wall_seconds": 1.0, "command": cell_command(grid, cell, run_dir, resume=True)}))
    assert cell_status(grid, cell) == "finished"
    grid_path.write_text(grid_path.read_text().replace("train.epochs=2", "train.epochs=3"))
    grid = load_grid(grid_path)
    assert settings_changes(grid, grid.cells[0]) == ["overrides: ['train.epochs=2'] -> ['train.epochs=3']"]
    script = [sys.executable, str(REPO / "launch" / "matrix.py"), "--config", str(grid_path)]
    listed = subprocess.run([*script, "--list"], capture_output=True, text=True, timeout=120)
    assert listed.returncode == 0 and listed.stdout.startswith("changed    default/default/badnets/lora/seed42")
    assert "[changed: overrides: ['train.epochs=2'] -> ['train.epochs=3']]" in listed.stdout
    refused = subprocess.run(script, capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and "finished with other settings" in refused.stderr and "--rerun-changed" in refused.stderr
    assert (run_dir / "metrics.json").is_file()


def test_publish_rewrites_only_changed_plots(tmp_path):
    grid = load_grid(_grid_file(tmp_path, f"output_root: {tmp_path / 'out'}\nattacks: [a]\nmethods: [m]\n"
                                          f"publish_dir: {tmp_path / 'docs'}\n"))
    plots = [tmp_path / "out" / "plots" / name for name in ("asr.png", "cacc.png")]
    plots[0].parent.mkdir(parents=True)
    for plot in plots:
        plot.write_bytes(b"png " + plot.name.encode())
    publish(grid, "report 1", plots)
    published = [tmp_path / "docs" / "plots" / name for name in ("asr.png", "cacc.png")]
    inodes = [p.stat().st_ino for p in published]
    plots[1].write_bytes(b"png changed")
    publish(grid, "report 2", plots)
    assert published[0].stat().st_ino == inodes[0]  # unchanged bytes: the file was left alone
    assert published[1].stat().st_ino != inodes[1] and published[1].read_bytes() == b"png changed"
    assert (tmp_path / "docs" / "REPORT.md").read_text() == "report 2"


def test_summary_table_mean_and_std_over_seeds():
    rows = [
        {"method": "m", "attack": "x", "seed": 1, "cacc": 80.0, "asr": 10.0, "clean_fpr": 4.0},
        {"method": "m", "attack": "x", "seed": 2, "cacc": 90.0, "asr": 20.0, "clean_fpr": 6.0},
        {"method": "m", "attack": "y", "seed": 1, "cacc": 70.0, "asr": 30.0, "clean_fpr": 8.0},
    ]
    table = summary_table(rows, ["m"], ["x", "y"])
    assert "85.0 ± 7.1 / 15.0 ± 7.1 (5.0 ± 1.4)" in table
    assert "| 77.5 | 22.5 | 6.5 | 2 |" in table  # averages of per-attack means; 2 distinct seeds


@pytest.mark.integration
def test_two_cell_grid_end_to_end_and_rerun_skips(tmp_path, tiny_bert_dir, tiny_data_root):
    grid_path = _grid_file(tmp_path, f"""
title: tiny grid
output_root: {tmp_path / 'out'}
datasets: [toy]
models: [{tiny_bert_dir}]
attacks: [badnets]
methods: [lora, musclelora]
seeds: [3]
overrides: [data.root={tiny_data_root}, data.max_length=16, data.ref_size=8, train.epochs=2, train.max_steps=4,
            train.batch_size=8, train.eval_batch_size=16, "mslr.scales=[1,2,4]", train.num_threads=1]
cell_overrides:
  - {{match: {{method: musclelora}}, overrides: [analysis.frequency_every_steps=2]}}
publish_dir: {tmp_path / 'docs'}
discussion: {tmp_path / 'discussion.md'}
""")
    (tmp_path / "discussion.md").write_text("## Discussion\n\nWhich component removes the backdoor.\n")
    script = REPO / "launch" / "matrix.py"
    first = subprocess.run([sys.executable, str(script), "--config", str(grid_path), "--max-cells", "1"],
                           capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "1 ran, 0 already finished" in first.stdout
    partial = (tmp_path / "out" / "REPORT.md").read_text()
    assert "1 of 2 cells finished" in partial and "Not finished yet" in partial and "- musclelora: badnets/3" in partial
    second = subprocess.run([sys.executable, str(script), "--config", str(grid_path)], capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "1 ran, 1 already finished" in second.stdout
    out = tmp_path / "out"
    rows = list(csv.DictReader(io.StringIO((out / "results.csv").read_text())))
    assert [(r["method"], r["seed"]) for r in rows] == [("lora", "3"), ("musclelora", "3")]
    for row in rows:
        metrics = json.loads((out / row["run_dir"] / "metrics.json").read_text())
        assert float(row["cacc"]) == pytest.approx(metrics["cacc"]) and float(row["asr"]) == pytest.approx(metrics["asr"])
        assert float(row["train_seconds"]) > 0 and float(row["wall_seconds"]) > 0 and float(row["peak_memory_mb"]) > 0
    report = (out / "REPORT.md").read_text()
    assert "# tiny grid" in report and "2 of 2 cells finished" in report and "| musclelora |" in report
    assert "Not finished yet" not in report
    for png in ("asr_cacc_bars.png", "epoch_curves.png", "frequency/badnets_musclelora_seed3/frequency_curves.png",
                "frequency/badnets_musclelora_seed3/frequency_heatmap.png"):
        path = out / "plots" / png
        assert path.is_file() and 1_000 < path.stat().st_size < 300_000
        assert f"plots/{png}" in report
        # Published: the same file under publish_dir, linked the same way from its REPORT.md.
        assert (tmp_path / "docs" / "plots" / png).read_bytes() == path.read_bytes()
    assert not (out / "plots" / "frequency" / "badnets_lora_seed3").exists()  # lora ran without the analysis
    assert "## Frequency analysis" in report and report.rstrip().endswith("Which component removes the backdoor.")
    assert (tmp_path / "docs" / "REPORT.md").read_text() == report


def test_parallel_jobs_run_every_cell_once(tmp_path):
    import threading

    grid = load_grid(_grid_file(tmp_path, f"output_root: {tmp_path / 'out'}\nattacks: [badnets, addsent]\nmethods: [a, b, c]\n"))
    seen, active, peak = [], [0], [0]
    guard = threading.Lock()

    def fake_runner(command, log_file, env):
        import time

        with guard:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        time.sleep(0.05)
        out = Path(next(a for a in command if a.startswith("output_dir=")).split("=", 1)[1])
        out.mkdir(parents=True, exist_ok=True)
        (out / "metrics.json").write_text(json.dumps({"cacc": 1.0, "asr": 2.0, "clean_fpr": 0.0, "history": []}))
        with guard:
            seen.append(str(out))
            active[0] -= 1
        return 0

    assert run_grid(grid, runner=fake_runner, jobs=2, validate=False) == {"skipped": 0, "ran": 6, "failed": 0, "waiting": 0}
    assert len(set(seen)) == 6 and peak[0] == 2


def test_derived_cells_wait_for_their_source_then_run_defence_and_filter(tmp_path):
    grid = load_grid(_grid_file(tmp_path, f"""
output_root: {tmp_path / 'out'}
attacks: [badnets]
methods: [vanilla, strip, bki]
method_overrides: {{vanilla: [train.lr=2e-5]}}
derived: {{strip: {{from: vanilla}}, bki: {{from: vanilla}}}}
"""))
    by = {c.method: c for c in grid.cells}
    assert by["strip"].source == "vanilla" and by["bki"].overrides == ("train.lr=2e-5",)
    commands = []

    def runner(command, log_file, env):
        commands.append(command)
        script = Path(command[1]).name
        if script == "train.py":
            out = Path(next(a for a in command if a.startswith("output_dir=")).split("=", 1)[1])
            out.mkdir(parents=True, exist_ok=True)
            (out / "metrics.json").write_text(json.dumps({"method": "vanilla", "cacc": 90.0, "asr": 50.0, "clean_fpr": 5.0,
                                                          "history": [], "train_seconds": 1.0, "peak_memory_mb": 1.0,
                                                          "trainable_parameters": 9}))
        elif script == "defend.py":
            out = Path(command[command.index("--out") + 1])
            out.write_text(json.dumps({"cacc": 88.0, "asr": 20.0, "clean_fpr": 6.0}))
        elif script == "filter_data.py":
            root = Path(command[command.index("--out-root") + 1])
            (root / "x").mkdir(parents=True)
            (root / "x" / "filter-report.json").write_text(json.dumps({"removed": 3}))
        return 0

    counts = run_grid(grid, runner=runner, jobs=1)
    assert counts == {"skipped": 0, "ran": 3, "failed": 0, "waiting": 0}
    strip = json.loads((cell_dir(grid, by["strip"]) / "metrics.json").read_text())
    assert (strip["method"], strip["cacc"], strip["asr"], strip["source_method"]) == ("strip", 88.0, 20.0, "vanilla")
    bki = json.loads((cell_dir(grid, by["bki"]) / "metrics.json").read_text())
    assert bki["method"] == "bki" and bki["filter_report"] == {"removed": 3}
    retrain = commands[-1]
    assert Path(retrain[1]).name == "train.py" and "method=vanilla" in retrain and "train.lr=2e-5" in retrain
    assert any(a.startswith("data.root=") and a.endswith("/data") for a in retrain)


def test_derived_cell_without_its_source_waits(tmp_path):
    grid = load_grid(_grid_file(tmp_path, f"""
output_root: {tmp_path / 'out'}
attacks: [badnets]
methods: [vanilla, strip]
derived: {{strip: {{from: vanilla}}}}
"""))
    failing = {"n": 0}

    def runner(command, log_file, env):
        failing["n"] += 1
        return 1  # the vanilla cell fails, so strip must wait, not run

    counts = run_grid(grid, runner=runner)
    assert counts == {"skipped": 0, "ran": 0, "failed": 1, "waiting": 1} and failing["n"] == 1


def test_derived_method_errors(tmp_path):
    with pytest.raises(ConfigError, match="'strip' is a derived method"):
        load_grid(_grid_file(tmp_path, "attacks: [badnets]\nmethods: [vanilla, strip]\n"))
    with pytest.raises(ConfigError, match="derived.strip must be"):
        load_grid(_grid_file(tmp_path, "attacks: [badnets]\nmethods: [vanilla, strip]\nderived: {strip: {from: lora}}\n"))


def test_run_first_and_run_last_order_the_cells_and_keep_report_order(tmp_path):
    grid = load_grid(_grid_file(tmp_path, f"""
output_root: {tmp_path / 'out'}
attacks: [badnets, addsent]
methods: [vanilla, lora, musclelora, bki]
method_seeds: {{musclelora: [1, 2]}}
seeds: [1]
run_first: [musclelora, vanilla]
run_last: [bki]
derived: {{bki: {{from: vanilla}}}}
"""))
    keys = [(c.attack, c.method, c.seed) for c in grid.cells]
    assert keys == [("badnets", "musclelora", 1), ("addsent", "musclelora", 1), ("badnets", "vanilla", 1),
                    ("addsent", "vanilla", 1), ("badnets", "lora", 1), ("addsent", "lora", 1),
                    ("badnets", "musclelora", 2), ("addsent", "musclelora", 2), ("badnets", "bki", 1), ("addsent", "bki", 1)]
    assert grid.methods == ("vanilla", "lora", "musclelora", "bki")
    with pytest.raises(ConfigError, match="'lora' is in both run_first and run_last"):
        load_grid(_grid_file(tmp_path, "attacks: [badnets]\nmethods: [lora]\nrun_first: [lora]\nrun_last: [lora]\n"))
    with pytest.raises(ConfigError, match="run_first names 'prefix'"):
        load_grid(_grid_file(tmp_path, "attacks: [badnets]\nmethods: [vanilla]\nrun_first: [prefix]\n"))


@pytest.mark.parametrize("name", sorted(p.name for p in (REPO / "launch" / "configs").glob("matrix_*.yaml")))
def test_shipped_grid_files_load_and_every_training_cell_is_a_valid_run_config(name):
    """The grids in launch/configs parse, and each training cell's command line makes a valid RunConfig."""
    from pipeline.config import load_config

    grid = load_grid(REPO / "launch" / "configs" / name)
    assert grid.cells and grid.publish_dir is not None and grid.discussion.is_file()
    for cell in grid.cells:
        if cell.source is not None:
            continue  # derived cells (STRIP, BKI, CUBE) run their own entry points on the source run
        args = cell_command(grid, cell, Path("unused-run-dir"), resume=False)
        cfg = load_config(args[args.index("--config") + 1], args[args.index("--config") + 2:])
        assert (cfg.method, cfg.seed, cfg.data.attack) == (cell.trained_method, cell.seed, cell.attack)


def test_shipped_grids_publish_into_distinct_folders():
    """Each shipped grid reproduces its own REPORT.md: no two publish into the same folder or share an output_root."""
    grids = [load_grid(path) for path in sorted((REPO / "launch" / "configs").glob("matrix_*.yaml"))]
    assert len(grids) >= 2
    for attribute in ("publish_dir", "output_root"):
        places = [getattr(grid, attribute).resolve() for grid in grids]
        assert len(set(places)) == len(places), attribute


def test_every_cell_is_validated_before_the_first_starts_and_list_marks_invalid_cells(tmp_path, capsys):
    """An unknown method used to show as "new" and fail only after every other cell had run."""
    path = _grid_file(tmp_path, f"output_root: {tmp_path / 'out'}\nattacks: [badnets, addsent]\nmethods: [lora, lorra]\n")
    grid = load_grid(path)
    started = []
    with pytest.raises(ConfigError, match=r"cell default/default/badnets/lorra/seed42: method .*'lorra'.*nothing ran"):
        run_grid(grid, runner=lambda command, log, env: started.append(command) or 0)
    assert started == [] and not (tmp_path / "out").exists()

    sys.path.insert(0, str(REPO))
    try:
        from launch import matrix as matrix_cli
    finally:
        sys.path.remove(str(REPO))
    assert matrix_cli.main(["--config", str(path), "--list"]) == 2
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == ["new", "invalid", "new", "invalid"]
    assert "did you mean 'lora'" in lines[1] or "'lorra'" in lines[1]


def test_stale_cell_with_foreign_files_is_kept_and_a_retired_checkpoint_resumes(tmp_path):
    """A stale cell is emptied only when it holds nothing but run files; a checkpoint that a kill between
    the two renames of a save left as last.old-<pid> makes the cell resumable, not stale."""
    grid = load_grid(_grid_file(tmp_path, f"output_root: {tmp_path / 'out'}\nattacks: [badnets]\nmethods: [lora, vanilla]\n"))
    dirs = {c.method: cell_dir(grid, c) for c in grid.cells}
    (dirs["lora"] / "checkpoints" / "last.old-4242").mkdir(parents=True)
    (dirs["lora"] / "checkpoints" / "last.old-4242" / "COMPLETE").write_text("{}")
    dirs["vanilla"].mkdir(parents=True)
    (dirs["vanilla"] / "notes.txt").write_text("a user's file")
    assert cell_state(dirs["lora"]) == "resumable"
    seen = []
    counts = run_grid(grid, runner=lambda command, log, env: seen.append(command) or 1)
    assert counts["failed"] == 2 and len(seen) == 1 and seen[0][-1] == "resume=true"
    assert (dirs["vanilla"] / "notes.txt").read_text() == "a user's file"
