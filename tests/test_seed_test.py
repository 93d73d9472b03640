"""benchmarks/faithfulness/seed_test.py: the exact Mann-Whitney test step 0's rule uses, against scipy and by hand."""

from __future__ import annotations

import random

import pytest

from pipeline.testing import load_script


def test_by_hand():
    script = load_script("benchmarks/faithfulness/seed_test.py")
    # a = {1, 2}, b = {3, 4}: U = 0; of the 6 splits, U is 0 or 4 (as extreme) for 2: p = 1/3
    assert script.u_statistic([1, 2], [3, 4]) == 0 and script.exact_p([1, 2], [3, 4]) == pytest.approx(1 / 3)
    assert script.u_statistic([1, 3], [3, 4]) == 0.5  # a tie counts one half
    assert script.exact_p([5.0], [5.0]) == 1.0
    with pytest.raises(ValueError, match="at least one value"):
        script.exact_p([], [1.0])


def test_matches_scipy_exact():
    stats = pytest.importorskip("scipy.stats")
    script = load_script("benchmarks/faithfulness/seed_test.py")
    rng = random.Random(0)
    for n, m in ((7, 7), (8, 8), (5, 6)):
        a = [rng.uniform(0, 70) for _ in range(n)]
        b = [rng.uniform(10, 80) for _ in range(m)]
        reference = stats.mannwhitneyu(a, b, alternative="two-sided", method="exact")
        assert script.u_statistic(a, b) == reference.statistic
        assert script.exact_p(a, b) == pytest.approx(reference.pvalue, abs=1e-9)
