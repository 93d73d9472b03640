"""benchmarks/canary_filter_check.py: the filter's verdict on a canary planted before it (no training)."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.testing import load_script

REPO = Path(__file__).resolve().parents[1]


def _script():
    return load_script("benchmarks/canary_filter_check.py")


def _overrides(data_root, *extra):
    return [f"data.root={data_root}", "data.dataset=toy", "data.ref_size=8", "data.max_train_samples=null",
            "filter.method=lexical_zscore", "canary.screen=false", *extra]


def test_a_dense_canary_is_removed_by_the_filter_and_a_sparse_one_is_not(tiny_data_root):
    """96 toy rows: a canary on 20% of them stands far above a threshold of 2.5 (all its rows removed, its three
    words flagged); at 2% (2 rows, under filter.min_count) the filter cannot score it."""
    dense = _script().check(None, "badnets", 42, _overrides(tiny_data_root, "canary.rate=0.2", "filter.threshold=2.5"))
    assert dense["canary_rows"] == 19 and dense["canary_removed"] == 19
    assert sorted(dense["flagged_canary"]) == sorted(dense["trigger"].split())
    assert dense["rows_removed"] > dense["canary_removed"] and "cf" in dense["flagged_other"]  # the toy file's trigger
    sparse = _script().check(None, "badnets", 42, _overrides(tiny_data_root, "canary.rate=0.02"))
    assert sparse["canary_rows"] == 2 and sparse["canary_removed"] == 0 and sparse["flagged_canary"] == []


def test_a_config_without_a_filter_is_refused(tiny_data_root, capsys):
    code = _script().main(["--config", str(REPO / "launch" / "configs" / "demo.yaml"), "--attacks", "badnets",
                           "--overrides", *_overrides(tiny_data_root, "method=vanilla", "filter.method=none")])
    assert code == 2 and "no training-row filter to check" in capsys.readouterr().err
    # musclelora with the authors' recipe resolves filter.method to none as well
    with pytest.raises(Exception, match="no training-row filter to check"):
        _script().check(None, "badnets", 42, [f"data.root={tiny_data_root}", "data.dataset=toy", "recipe=authors"])
