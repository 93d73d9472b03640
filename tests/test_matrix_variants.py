"""Named variants in the robustness matrix (pipeline/matrix.py ``variants:``): several configurations of one
launch/train.py method side by side, each with its own cells, rows, recorded settings and checks."""

from __future__ import annotations

import csv
import io
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.config import ConfigError, load_config
from pipeline.matrix import (
    canary_table, cell_command, cell_dir, cell_settings, cell_status, derived_commands, load_grid, run_grid, settings_changes,
)

REPO = Path(__file__).resolve().parents[1]

AUTHORS = "[align.min_ref_loss=0.4, align.max_raw_ratio=0.2]"
NEVER_RAW = "[align.min_ref_loss=0, align.max_raw_ratio=0, align.start_epoch=0]"


def _grid(tmp_path: Path, extra: str = "", *, authors: str = AUTHORS, methods: str = "vanilla, mus_authors, mus_never_raw",
          variants: str = "") -> Path:
    """A grid with the variants mus_authors and mus_never_raw (``variants``: more lines of that block)."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "grid.yaml"
    path.write_text(f"""
output_root: {tmp_path / 'out'}
attacks: [badnets, addsent]
methods: [{methods}]
variants:
  mus_authors: {{method: musclelora, overrides: {authors}}}
  mus_never_raw: {{method: musclelora, overrides: {NEVER_RAW}}}
{variants}seeds: [1]
overrides: [train.epochs=2]
{extra}""")
    return path


def _axis(command: list[str], key: str) -> list[str]:
    return [a.split("=", 1)[1] for a in command if a.startswith(f"{key}=")]


def _fake_train(command, log_file, env):
    """A launch/train.py stand-in: metrics.json with a canary block, numbers that depend on the command."""
    out = Path(_axis(command, "output_dir")[0])
    out.mkdir(parents=True, exist_ok=True)
    raw = float(_axis(command, "align.max_raw_ratio")[-1]) if _axis(command, "align.max_raw_ratio") else 1.0
    (out / "metrics.json").write_text(json.dumps({
        "method": _axis(command, "method")[0], "cacc": 85.0, "asr": 10.0 + 50 * raw, "clean_fpr": 5.0,
        "dev_clean_acc": 84.0 + int(_axis(command, "seed")[0]), "history": [], "train_seconds": 1.0,
        "peak_memory_mb": 1.0, "trainable_parameters": 3,
        "canary": {"asr": 10.0 + 80 * raw, "floor": 10.0, "held": raw == 0},
    }))
    return 0


def test_two_variants_of_one_method_are_distinct_cells_with_ordered_overrides(tmp_path):
    grid = load_grid(_grid(tmp_path, """
method_overrides: {musclelora: [train.lr=2e-4, align.min_ref_loss=0.9], mus_never_raw: [train.epochs=3]}
method_seeds: {mus_never_raw: [1, 2]}
cell_overrides:
  - {match: {method: mus_never_raw, attack: badnets}, overrides: [align.start_epoch=1]}
run_first: [mus_never_raw]
"""))
    assert grid.methods == ("vanilla", "mus_authors", "mus_never_raw")
    keys = [(c.attack, c.method, c.seed) for c in grid.cells]
    assert keys[:2] == [("badnets", "mus_never_raw", 1), ("addsent", "mus_never_raw", 1)]  # run_first takes the name
    assert sorted(keys) == sorted([(a, m, 1) for a in ("badnets", "addsent") for m in grid.methods]
                                  + [("badnets", "mus_never_raw", 2), ("addsent", "mus_never_raw", 2)])
    by = {(c.attack, c.method, c.seed): c for c in grid.cells}
    never = by[("badnets", "mus_never_raw", 1)]
    assert cell_dir(grid, never) == tmp_path / "out" / "cells" / "default" / "default" / "badnets" / "mus_never_raw" / "seed1"
    command = cell_command(grid, never, cell_dir(grid, never), resume=False)
    # grid overrides -> method_overrides[musclelora] -> the variant's -> method_overrides[variant] -> cell_overrides
    assert _axis(command, "method") == ["musclelora"]
    assert command[command.index("--config") + 2:] == [
        "method=musclelora", "seed=1", "data.attack=badnets", f"output_dir={cell_dir(grid, never)}",
        "train.epochs=2", "train.lr=2e-4", "align.min_ref_loss=0.9",
        "align.min_ref_loss=0", "align.max_raw_ratio=0", "align.start_epoch=0", "train.epochs=3", "align.start_epoch=1"]
    cfg = load_config(command[command.index("--config") + 1], command[command.index("--config") + 2:])
    assert (cfg.method, cfg.align.min_ref_loss, cfg.align.max_raw_ratio, cfg.align.start_epoch, cfg.train.epochs,
            cfg.train.lr) == ("musclelora", 0.0, 0.0, 1, 3, 2e-4)  # a later value of a key wins
    authors = by[("addsent", "mus_authors", 1)]
    assert authors.overrides == ("train.epochs=2", "train.lr=2e-4", "align.min_ref_loss=0.9",
                                 "align.min_ref_loss=0.4", "align.max_raw_ratio=0.2")
    assert _axis(cell_command(grid, authors, tmp_path, resume=False), "method") == ["musclelora"]
    assert by[("badnets", "vanilla", 1)].overrides == ("train.epochs=2",)  # musclelora's overrides stay with its family

    listed = subprocess.run([sys.executable, str(REPO / "launch" / "matrix.py"), "--config", str(grid.path), "--list"],
                            capture_output=True, text=True, timeout=120)
    assert listed.returncode == 0, listed.stderr[-2000:]
    line = next(x for x in listed.stdout.splitlines() if "/badnets/mus_never_raw/seed1" in x)
    assert line.split()[0] == "new" and "  method=musclelora train.epochs=2 " in line


def test_variant_rows_in_results_csv_and_report_with_selection_numbers(tmp_path):
    grid = load_grid(_grid(tmp_path, "method_seeds: {mus_never_raw: [1, 2]}\n"))
    counts = run_grid(grid, runner=_fake_train)  # validated: every cell's command is a valid run config
    assert counts == {"skipped": 0, "ran": 8, "failed": 0, "waiting": 0}
    rows = list(csv.DictReader(io.StringIO((tmp_path / "out" / "results.csv").read_text())))
    assert {(r["method"], r["train_method"]) for r in rows} == {
        ("vanilla", "vanilla"), ("mus_authors", "musclelora"), ("mus_never_raw", "musclelora")}
    never = [r for r in rows if r["method"] == "mus_never_raw"]
    assert sorted((r["attack"], r["seed"], r["run_dir"]) for r in never)[0] == (
        "addsent", "1", "cells/default/default/addsent/mus_never_raw/seed1")
    assert {float(r["asr"]) for r in never} == {10.0} and {r["canary_held"] for r in never} == {"True"}
    assert {float(r["asr"]) for r in rows if r["method"] == "mus_authors"} == {20.0}
    report = (tmp_path / "out" / "REPORT.md").read_text()
    assert "| mus_authors | musclelora | `align.min_ref_loss=0.4`, `align.max_raw_ratio=0.2` |" in report
    assert "| mus_never_raw | 85.0 ± 0.0 / 10.0 ± 0.0 (5.0 ± 0.0) | 85.0 ± 0.0 / 10.0 ± 0.0 (5.0 ± 0.0) | 85.0 | 10.0 | 5.0 | 2 |" in report
    assert "## Selection numbers: dev-clean accuracy and the canary at the selected epoch" in report
    # dev-clean = 84 + seed: seeds 1 and 2 -> 85.5 ± 0.7; canary 10 over a floor of 10, held in 2 of 2 runs
    assert ("| mus_never_raw | 85.5 ± 0.7 / 10.0 ± 0.0 / 10.0 ± 0.0 (2/2) | 85.5 ± 0.7 / 10.0 ± 0.0 / 10.0 ± 0.0 (2/2) "
            "| 85.5 | 4/4 |") in report
    assert "| mus_authors | 85.0 / 26.0 / 10.0 (0/1) | 85.0 / 26.0 / 10.0 (0/1) | 85.0 | 0/2 |" in report
    assert "| vanilla | 85.0 / 90.0 / 10.0 (0/1) |" in report


def test_selection_table_without_dev_clean_and_with_missing_attacks():
    rows = [{"method": "v", "attack": "x", "dev_clean_acc": None, "canary_asr": 50.0, "canary_floor": 10.0, "canary_held": False}]
    table = canary_table(rows, ["v", "w"], ["x", "y"])
    assert table.splitlines()[2] == "| v | - / 50.0 / 10.0 (0/1) | - | - | 0/1 |"
    assert len(table.splitlines()) == 3  # w has no row with a canary


def test_editing_a_variant_marks_only_its_cells_changed(tmp_path):
    path = _grid(tmp_path, methods="mus_authors, mus_never_raw")
    grid = load_grid(path)
    assert run_grid(grid, runner=_fake_train)["ran"] == 4
    assert {cell_status(grid, c) for c in grid.cells} == {"finished"}
    path.write_text(path.read_text().replace(AUTHORS, "[align.min_ref_loss=0.5, align.max_raw_ratio=0.2]"))
    grid = load_grid(path)
    status = {(c.attack, c.method): cell_status(grid, c) for c in grid.cells}
    assert status == {("badnets", "mus_authors"): "changed", ("addsent", "mus_authors"): "changed",
                      ("badnets", "mus_never_raw"): "finished", ("addsent", "mus_never_raw"): "finished"}
    authors = next(c for c in grid.cells if c.method == "mus_authors")
    assert settings_changes(grid, authors) == [
        "overrides: ['train.epochs=2', 'align.min_ref_loss=0.4', 'align.max_raw_ratio=0.2'] -> "
        "['train.epochs=2', 'align.min_ref_loss=0.5', 'align.max_raw_ratio=0.2']"]
    with pytest.raises(ConfigError, match="mus_authors/seed1 finished with other settings"):
        run_grid(grid, runner=_fake_train)
    # The variant's method is a setting too.
    path.write_text(path.read_text().replace("mus_never_raw: {method: musclelora", "mus_never_raw: {method: ga_lora"))
    grid = load_grid(path)
    never = next(c for c in grid.cells if c.method == "mus_never_raw")
    assert settings_changes(grid, never) == ["variant_of: 'musclelora' -> 'ga_lora'"]


def test_invalid_variants_are_refused_at_load_naming_file_key_and_value(tmp_path):
    path = tmp_path / "grid.yaml"
    path.write_text("""
attacks: [badnets]
methods: [lora, musclelora_x]
variants:
  lora: {method: lora, overrides: [lora.r=4]}
  strip: {method: vanilla}
  typo: {method: muscelora}
  nested: {method: musclelora_x}
  musclelora_x: {method: musclelora, overrides: [align.min_ref_losss=0.4, align.max_raw_ratio=-1]}
  no_value: {method: musclelora, overrides: [align.start_epoch]}
  owns_axis: {method: musclelora, overrides: [method=lora, seed=3]}
  shape: {method: musclelora, lr: 1}
  "a/b": {method: musclelora}
""")
    with pytest.raises(ConfigError) as info:
        load_grid(path)
    problems = info.value.problems
    assert all(p.startswith(f"{path}: variants.") for p in problems), problems
    text = "\n".join(problems)
    for needle in (
        "variants.lora: 'lora' is a launch/train.py method",
        "variants.strip: 'strip' is a derived method",
        "variants.typo.method: got 'muscelora', which is not a launch/train.py method; did you mean 'musclelora'?",
        "variants.nested.method: got 'musclelora_x', which is not a launch/train.py method; a variant cannot build on another",
        "variants.musclelora_x.overrides ['align.min_ref_losss=0.4', 'align.max_raw_ratio=-1']: align.min_ref_losss "
        "(override 'align.min_ref_losss=0.4'): unknown key",
        "align.max_raw_ratio (override 'align.max_raw_ratio=-1'): got -1",
        "variants.no_value.overrides must be a list of key=value strings (e.g. align.min_ref_loss=0), got ['align.start_epoch']",
        "variants.owns_axis.overrides sets 'method', which the grid axes own; use the axis (a variant's method is its method: key)",
        "variants.owns_axis.overrides sets 'seed'",
        "variants.shape must be {method: <a launch/train.py method>, overrides: [key=value, ...]}, got {'method': 'musclelora', 'lr': 1}",
        "variants.a/b: a variant's name is its cells' folder name",
    ):
        assert needle in text, needle
    assert len(problems) == 11


def test_unknown_method_hints_at_a_variant_and_method_overrides_names_are_checked(tmp_path):
    grid = load_grid(_grid(tmp_path, methods="mus_author"))
    with pytest.raises(ConfigError, match=r"mus_author/seed1: method .*did you mean the variant 'mus_authors'\?"):
        run_grid(grid, runner=_fake_train)
    with pytest.raises(ConfigError, match="method_overrides names 'ga_lora', which is not in methods .* nor the method of one"):
        load_grid(_grid(tmp_path, "method_overrides: {ga_lora: [train.lr=1e-4]}\n"))
    # The underlying method counts only through a listed variant.
    with pytest.raises(ConfigError, match="method_overrides names 'musclelora'"):
        load_grid(_grid(tmp_path, "method_overrides: {musclelora: [train.lr=1e-4]}\n", methods="vanilla"))


def test_derived_cells_from_a_variant_use_its_method_and_overrides(tmp_path):
    path = _grid(tmp_path, "derived: {strip: {from: mus_never_raw}, bki: {from: mus_never_raw}}\n"
                           "method_overrides: {musclelora: [train.lr=2e-4]}\n",
                 methods="mus_authors, mus_never_raw, strip, bki")
    grid = load_grid(path)
    by = {(c.attack, c.method): c for c in grid.cells}
    strip, bki = by[("badnets", "strip")], by[("badnets", "bki")]
    assert (strip.source, strip.train_method, strip.trained_method) == ("mus_never_raw", "musclelora", "musclelora")
    defend = derived_commands(grid, strip, tmp_path / "strip")
    assert defend[0][2] == str(cell_dir(grid, by[("badnets", "mus_never_raw")]))  # STRIP on the variant's model
    retrain = derived_commands(grid, bki, tmp_path / "bki")[1]
    assert retrain[retrain.index("--config") + 2:][0] == "method=musclelora"
    assert retrain[-6:] == ["train.epochs=2", "train.lr=2e-4", "align.min_ref_loss=0", "align.max_raw_ratio=0",
                            "align.start_epoch=0", f"data.root={tmp_path / 'bki' / 'data'}"]

    def runner(command, log_file, env):
        script = Path(command[1]).name
        if script == "train.py":
            return _fake_train(command, log_file, env)
        if script == "defend.py":
            Path(command[command.index("--out") + 1]).write_text(json.dumps({"cacc": 84.0, "asr": 9.0, "clean_fpr": 5.0}))
        else:
            (Path(command[command.index("--out-root") + 1]) / "sst").mkdir(parents=True)
        return 0

    assert run_grid(grid, runner=runner) == {"skipped": 0, "ran": 8, "failed": 0, "waiting": 0}
    rows = list(csv.DictReader(io.StringIO((tmp_path / "out" / "results.csv").read_text())))
    assert {(r["method"], r["train_method"]) for r in rows} == {
        ("mus_authors", "musclelora"), ("mus_never_raw", "musclelora"), ("strip", "musclelora"), ("bki", "musclelora")}
    assert json.loads((cell_dir(grid, bki) / "metrics.json").read_text())["source_method"] == "mus_never_raw"
    # Editing the source variant makes its derived cells changed as well.
    path.write_text(path.read_text().replace(NEVER_RAW, "[align.min_ref_loss=0]"))
    grid = load_grid(path)
    assert {c.method: cell_status(grid, c) for c in grid.cells if c.attack == "badnets"} == {
        "mus_authors": "finished", "mus_never_raw": "changed", "strip": "changed", "bki": "changed"}



def _student_grid(tmp_path: Path, student: str = "['filter.teacher=${cell:mus_never_raw}', filter.teacher_action=drop]",
                  methods: str = "student, mus_never_raw") -> Path:
    """A grid whose ``student`` variant reads ``${cell:...}`` (a vanilla run checked by another cell's model)."""
    return _grid(tmp_path, methods=methods, variants=f"  student: {{method: vanilla, overrides: {student}}}\n")


def test_a_cell_reads_its_teacher_cell_of_the_same_attack_and_seed(tmp_path):
    grid = load_grid(_student_grid(tmp_path))
    by = {(c.attack, c.method): c for c in grid.cells}
    student = by[("addsent", "student")]
    assert student.reads == ("mus_never_raw",)
    command = cell_command(grid, student, tmp_path / "x", resume=False)
    assert f"filter.teacher={cell_dir(grid, by[('addsent', 'mus_never_raw')])}" in command
    assert "filter.teacher_action=drop" in command
    # the recorded settings hold the reference unexpanded and the read cell's own settings
    settings = cell_settings(grid, student)
    assert "filter.teacher=${cell:mus_never_raw}" in settings["overrides"]
    assert settings["read_settings"]["mus_never_raw"] == cell_settings(grid, by[("addsent", "mus_never_raw")])


def test_readers_wait_for_the_cells_they_read_and_run_after_them(tmp_path):
    grid = load_grid(_student_grid(tmp_path))
    started = []

    def runner(command, log_file, env):
        started.append((_axis(command, "data.attack")[0], _axis(command, "method")[0]))
        teacher = _axis(command, "filter.teacher")
        if teacher:
            assert (Path(teacher[0]) / "metrics.json").is_file()  # its teacher finished first
        return _fake_train(command, log_file, env)

    assert run_grid(grid, runner=runner, jobs=2, validate=False) == {"skipped": 0, "ran": 4, "failed": 0, "waiting": 0}
    assert [m for _, m in started[:2]] == ["musclelora", "musclelora"]
    # a teacher that fails leaves its reader waiting (not failed), picked up by the next run of the grid
    grid2 = load_grid(_student_grid(tmp_path / "second"))

    def failing_teacher(command, log_file, env):
        return 1 if _axis(command, "method")[0] == "musclelora" else _fake_train(command, log_file, env)

    assert run_grid(grid2, runner=failing_teacher, jobs=1, validate=False) == {"skipped": 0, "ran": 0, "failed": 2, "waiting": 2}


@pytest.mark.parametrize(("student", "methods", "needle"), [
    ("['filter.teacher=${cell:nobody}']", "student, mus_never_raw", "'nobody' has no cell at"),
    ("['filter.teacher=${cell:student}']", "student, mus_never_raw", "a cell cannot read itself"),
    ("['filter.teacher=${cell:mus_never_raw}']", "student", "'mus_never_raw' has no cell at"),
])
def test_unresolvable_cell_references_are_refused(tmp_path, student, methods, needle):
    path = _student_grid(tmp_path, student, methods)
    with pytest.raises(ConfigError, match=re.escape(needle)):
        load_grid(path)
