"""benchmarks/recipe_targets.py: issue 11's targets computed from a grid's results.csv."""

from __future__ import annotations

from pathlib import Path

import pytest
from pipeline.testing import load_script

REPO = Path(__file__).resolve().parents[1]
HEADER = "dataset,model,attack,method,train_method,seed,cacc,asr,clean_fpr,asr_minus_clean_fpr,best_epoch\n"


def _script():
    return load_script("benchmarks/recipe_targets.py")


def _csv(tmp_path: Path, rows: list[tuple[str, str, int, float, float, float]]) -> Path:
    path = tmp_path / "results.csv"
    path.write_text(HEADER + "".join(
        f"sst-2,minilm,{attack},{method},,{seed},{cacc},{asr},{fpr},{asr - fpr},1\n"
        for method, attack, seed, cacc, asr, fpr in rows))
    return path


def test_attacks_count_once_whatever_their_seeds_and_targets_are_judged(tmp_path, capsys):
    path = _csv(tmp_path, [
        # recipe: badnets two seeds (added 4 and 8 -> 6), addsent one seed (added 2): mean over attacks 4.0
        ("recipe", "badnets", 42, 80.0, 24.0, 20.0), ("recipe", "badnets", 43, 78.0, 28.0, 20.0),
        ("recipe", "addsent", 42, 79.0, 22.0, 20.0),
        # vanilla: CACC 81 on both -> drop 81 - mean(79, 79) = 2.0 (the target's edge, inclusive); bites (70)
        ("vanilla", "badnets", 42, 81.0, 95.0, 20.0), ("vanilla", "addsent", 42, 81.0, 85.0, 20.0),
        ("vanilla", "stylebkd", 42, 81.0, 85.0, 20.0),  # no recipe cell: not counted
        ("control", "badnets", 42, 70.0, 20.0, 20.0),
    ])
    verdict = _script().evaluate(_script().load(path), "recipe", "vanilla")
    assert verdict["attacks"] == ["addsent", "badnets"]
    assert verdict["recipe_added"] == pytest.approx(4.0) and verdict["added_ok"]
    assert verdict["cacc_drop"] == pytest.approx(2.0) and verdict["cacc_ok"]
    assert verdict["baseline_added"] == pytest.approx(70.0) and verdict["bites"]
    assert _script().main(["--results", str(path), "--recipe", "recipe", "--controls", "control"]) == 0
    out = capsys.readouterr().out
    assert "| recipe | badnets | 2 | 79.0 ± 1.4 | 26.0 ± 2.8 | 20.0 ± 0.0 | 6.0 ± 2.8 |" in out
    assert "| control | badnets | 1 | 70.0 |" in out and "trigger-added ASR of recipe: 4.0 (target <= 5): met" in out
    # one point more of CACC loss misses the target, and the exit status says so
    assert _script().main(["--results", str(path), "--recipe", "recipe", "--max-cacc-drop", "1"]) == 1
    assert "CACC below vanilla: 2.0 points (target <= 1): MISSED" in capsys.readouterr().out


def test_bad_inputs_name_the_file_and_the_fix(tmp_path):
    with pytest.raises(SystemExit, match=r"does not exist\. Fix: pass the results\.csv"):
        _script().load(tmp_path / "nope.csv")
    (tmp_path / "bad.csv").write_text("method,attack\nx,y\n")
    with pytest.raises(SystemExit, match=r"lacks the column\(s\) seed, cacc"):
        _script().load(tmp_path / "bad.csv")
    path = _csv(tmp_path, [("recipe", "badnets", 42, 80.0, 24.0, 20.0)])
    path.write_text(path.read_text().replace("80.0", "eighty"))
    with pytest.raises(SystemExit, match=r"results\.csv:2: could not convert"):
        _script().load(path)
    ok = _csv(tmp_path, [("recipe", "badnets", 42, 80.0, 24.0, 20.0)])
    with pytest.raises(SystemExit, match=r"no attack has finished cells of both 'recipe' and 'vanilla'"):
        _script().evaluate(_script().load(ok), "recipe", "vanilla")


def test_adaptive_rule_takes_the_found_cell_only_where_its_filter_removed_rows(tmp_path, capsys):
    path = tmp_path / "results.csv"
    rows = [  # method, attack, seed, cacc, asr, fpr, filter_removed
        ("found", "badnets", 42, 82.0, 10.0, 15.0, 336), ("found", "badnets", 43, 83.0, 12.0, 15.0, 300),
        ("found", "stylebkd", 42, 82.0, 60.0, 20.0, 0), ("found", "stylebkd", 43, 82.0, 58.0, 20.0, 0),
        ("other", "badnets", 42, 79.0, 25.0, 20.0, 336), ("other", "badnets", 43, 79.0, 27.0, 20.0, 300),
        ("other", "stylebkd", 42, 79.0, 30.0, 22.0, 0),  # seed 43 missing: only seed 42 of stylebkd counts
        ("vanilla", "badnets", 42, 82.0, 95.0, 15.0, ""), ("vanilla", "stylebkd", 42, 82.0, 60.0, 20.0, ""),
    ]
    path.write_text(HEADER.strip() + ",filter_removed\n" + "".join(
        f"sst-2,minilm,{a},{m},,{s},{c},{asr},{fpr},{asr - fpr},1,{n}\n" for m, a, s, c, asr, fpr, n in rows))
    name, combined = _script().adaptive(_script().load(path), "found", "other")
    assert name == "adaptive(found else other)"
    assert [r["cacc"] for r in combined[(name, "badnets")]] == [82.0, 83.0]  # the filter found the trigger
    assert [r["cacc"] for r in combined[(name, "stylebkd")]] == [79.0]  # it did not: the other method, seed 42 only
    verdict = _script().evaluate(combined, name, "vanilla")
    assert verdict["recipe_added"] == pytest.approx(((-5.0 + -3.0) / 2 + 8.0) / 2)
    assert verdict["cacc_drop"] == pytest.approx(82.0 - (82.5 + 79.0) / 2)
    assert _script().main(["--results", str(path), "--adaptive", "found", "other"]) == 0
    assert "trigger-added ASR of adaptive(found else other): 2.0 (target <= 5): met" in capsys.readouterr().out
    # a results.csv from before the column existed is refused, not read as "the filter found nothing"
    old = _csv(tmp_path, [("found", "badnets", 42, 82.0, 10.0, 15.0), ("other", "badnets", 42, 79.0, 25.0, 20.0)])
    with pytest.raises(SystemExit, match="no filter_removed column"):
        _script().adaptive(_script().load(old), "found", "other")



def test_adaptive_rule_reads_the_finding_from_whichever_cell_ran_the_filter(tmp_path):
    """FOUND run only where the filter found a trigger (insertion files); OTHER ran the same filter everywhere."""
    path = tmp_path / "results.csv"

    def write(rows):
        path.write_text(HEADER.strip() + ",filter_removed\n" + "".join(
            f"sst-2,minilm,{a},{m},,{s},{c},{asr},{fpr},{asr - fpr},1,{n}\n" for m, a, s, c, asr, fpr, n in rows))
        return _script().load(path)

    rows = [("found", "badnets", 42, 85.0, 10.0, 15.0, 336),
            ("other", "badnets", 42, 80.0, 16.0, 15.0, 336), ("other", "synbkd", 42, 81.0, 25.0, 20.0, 0)]
    name, combined = _script().adaptive(write(rows), "found", "other")
    assert [r["cacc"] for r in combined[(name, "badnets")]] == [85.0] and [r["cacc"] for r in combined[(name, "synbkd")]] == [81.0]
    # OTHER without a filter (empty column): the finding comes from FOUND's cell
    name, combined = _script().adaptive(write([("found", "badnets", 42, 85.0, 10.0, 15.0, 336),
                                               ("other", "badnets", 42, 80.0, 90.0, 15.0, "")]), "found", "other")
    assert [r["cacc"] for r in combined[(name, "badnets")]] == [85.0]
    # the filter found a trigger but FOUND has not finished: that seed does not count (no fallback to OTHER)
    with pytest.raises(SystemExit, match="no attack and seed has a finished cell for the rule's branch"):
        _script().adaptive(write([("other", "badnets", 42, 80.0, 16.0, 15.0, 336)]), "found", "other")
    with pytest.raises(SystemExit, match=r"disagree on badnets seed 42"):
        _script().adaptive(write([("found", "badnets", 42, 85.0, 10.0, 15.0, 336),
                                  ("other", "badnets", 42, 80.0, 16.0, 15.0, 0)]), "found", "other")
    with pytest.raises(SystemExit, match=r"neither 'found' nor 'other' ran a training-row filter on badnets seed 42"):
        _script().adaptive(write([("found", "badnets", 42, 85.0, 10.0, 15.0, ""),
                                  ("other", "badnets", 42, 80.0, 16.0, 15.0, "")]), "found", "other")


def test_seeds_restrict_every_method_and_selection_numbers_are_printed(tmp_path, capsys):
    path = tmp_path / "results.csv"
    rows = [  # method, attack, seed, cacc, asr, fpr, dev_clean_acc, canary_held
        ("recipe", "badnets", 42, 80.0, 24.0, 20.0, 79.0, "True"), ("recipe", "badnets", 45, 70.0, 60.0, 20.0, 75.0, "False"),
        ("cheap", "badnets", 42, 79.0, 25.0, 20.0, 78.5, "True"),
        ("vanilla", "badnets", 42, 82.0, 95.0, 20.0, 82.0, "False"), ("vanilla", "badnets", 45, 82.0, 95.0, 20.0, 81.0, ""),
    ]
    path.write_text(HEADER.strip() + ",dev_clean_acc,canary_held\n" + "".join(
        f"sst-2,minilm,{a},{m},,{s},{c},{asr},{fpr},{asr - fpr},1,{d},{h}\n" for m, a, s, c, asr, fpr, d, h in rows))
    loaded = _script().load(path)
    assert loaded[("vanilla", "badnets")][1]["canary_held"] is None  # empty: no canary verdict
    both = _script().evaluate(loaded, "recipe", "vanilla")
    assert both["recipe_added"] == pytest.approx((4.0 + 40.0) / 2)
    only42 = _script().only_seeds(loaded, [42])
    assert _script().evaluate(only42, "recipe", "vanilla")["recipe_added"] == pytest.approx(4.0)
    assert ("recipe", "badnets") in only42 and [r["seed"] for r in only42[("recipe", "badnets")]] == [42]
    _script().main(["--results", str(path), "--recipe", "recipe", "--controls", "cheap", "--seeds", "42"])
    out = capsys.readouterr().out
    assert "| recipe | 1 | 79.00 (1 runs) | 1 of 1 |" in out and "| cheap | 1 | 78.50 (1 runs) | 1 of 1 |" in out
    assert out.index("Selection numbers") < out.index("Test numbers")
    _script().main(["--results", str(path), "--recipe", "recipe"])
    assert "| recipe | 2 | 77.00 (2 runs) | 1 of 2 |" in capsys.readouterr().out
