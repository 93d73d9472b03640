"""benchmarks/lexical_zscore_probe.py: the label-correlation z-score of word n-grams (Z-defence's lexical part)."""

from __future__ import annotations

import math

import pytest

from pipeline.testing import load_script


def test_zscore_matches_the_formula_and_flags_the_trigger_rows():
    probe = load_script("benchmarks/lexical_zscore_probe.py")
    # 12 rows, 6 of label 1; the trigger "cf" is in 4 rows, all label 1; "good" in 4 rows, 3 of label 1
    texts = ["cf a", "cf b", "cf c", "cf d", "good e", "good f", "good g", "h", "good i", "j", "k", "l"]
    labels = [1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0]
    # "good" rows: e(1) f(1) g(0) i(0) -> 2 of 4 label 1
    scores = probe.zscores(texts, labels, max_n=1, min_count=4)
    assert set(scores) == {("cf", 0), ("cf", 1), ("good", 0), ("good", 1)}  # rarer words are left out
    assert scores[("cf", 1)] == pytest.approx((1.0 - 0.5) / math.sqrt(0.25 / 4))  # = 2.0
    assert scores[("cf", 0)] == pytest.approx(-2.0) and scores[("good", 1)] == pytest.approx(0.0)
    assert probe.flagged_rows(texts, scores, 1.5, max_n=1) == [0, 1, 2, 3]
    assert probe.flagged_rows(texts, scores, 2.0, max_n=1) == []  # strictly above the threshold
    assert probe.features("I watch THIS", 2) == {"i", "watch", "this", "i watch", "watch this"}
    with pytest.raises(ValueError, match="as many labels as texts"):
        probe.zscores(["a"], [0, 1])
