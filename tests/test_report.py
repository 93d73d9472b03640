"""Tests of pipeline/report.py: the CACC / ASR table from metrics.json files."""

from __future__ import annotations

import json

import pytest

from pipeline.report import method_colors, read_metrics, results_table


def _m(method, attack, cacc, asr, fpr, seed=42):
    return {"method": method, "attack": attack, "cacc": cacc, "asr": asr, "clean_fpr": fpr, "seed": seed}


def test_table_means_seeds_and_averages_attacks():
    rows = [
        _m("vanilla", "badnets", 90.0, 100.0, 10.0),
        _m("vanilla", "addsent", 88.0, 98.0, 12.0),
        _m("musclelora", "badnets", 80.0, 20.0, 18.0, seed=1),
        _m("musclelora", "badnets", 82.0, 24.0, 20.0, seed=2),
        _m("musclelora", "addsent", 84.0, 10.0, 9.0),
    ]
    table = results_table(rows)
    lines = table.strip().splitlines()
    assert lines[0].startswith("| method | badnets CACC / ASR (FPR) | addsent")
    assert lines[2] == "| vanilla | 90.0 / 100.0 (10.0) | 88.0 / 98.0 (12.0) | 89.0 | 99.0 | 11.0 |"
    # badnets: mean 81.0 ± 1.4 (stdev of 80, 82); avg CACC = mean(81, 84) = 82.5, avg FPR = mean(19, 9) = 14.0
    assert lines[3] == "| musclelora | 81.0 ± 1.4 / 22.0 ± 2.8 (19.0 ± 1.4) | 84.0 / 10.0 (9.0) | 82.5 | 16.0 | 14.0 |"


def test_missing_cell_leaves_average_blank():
    table = results_table([_m("lora", "badnets", 85.0, 90.0, 12.0)], attacks=["badnets", "addsent"])
    assert table.strip().splitlines()[2] == "| lora | 85.0 / 90.0 (12.0) | - | - | - | - |"


def test_read_metrics_requires_finished_runs(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "metrics.json").write_text(json.dumps(_m("lora", "badnets", 1.0, 2.0, 3.0)))
    (tmp_path / "b").mkdir()
    assert read_metrics([tmp_path / "a"])[0]["cacc"] == 1.0
    with pytest.raises(FileNotFoundError, match="has not finished"):
        read_metrics([tmp_path / "a", tmp_path / "b"])


@pytest.mark.parametrize("count", [1, 10, 11, 20])
def test_method_colors_are_distinct_up_to_twenty(count):
    colors = method_colors(count)
    assert len(colors) == count and len(set(colors)) == count
