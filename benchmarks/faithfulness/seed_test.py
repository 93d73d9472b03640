"""Exact two-sided Mann-Whitney test of one quantity over the seeds of two implementations (step 0 of issue 11).

docs/FAITHFULNESS.md's rule compares dev-poison ASR after epochs 1 and 2 over the natural runs of the authors' code
and this pipeline, one value per seed. With no ties, U counts the pairs (a, b) with a > b (ties count 1/2), and the
exact two-sided p-value is the share of all C(n+m, n) splits of the pooled values whose U is at least as far from
n*m/2 as the observed one (enumerated: fine for the 8 + 8 seeds here).

    python benchmarks/faithfulness/seed_test.py --a 10.0 16.6 20.8 32.7 37.6 29.0 30.1 67.1 \\
        --b 50.0 41.1 30.8 29.7 52.6 30.4 51.2 17.3
"""

from __future__ import annotations

import argparse
import itertools
import sys
from collections.abc import Sequence


def u_statistic(a: Sequence[float], b: Sequence[float]) -> float:
    """Pairs (x in a, y in b) with x > y, ties counted 1/2."""
    return sum(1.0 if x > y else 0.5 if x == y else 0.0 for x in a for y in b)


def exact_p(a: Sequence[float], b: Sequence[float]) -> float:
    """Exact two-sided p-value of U over every split of the pooled values into groups of len(a) and len(b)."""
    if not a or not b:
        raise ValueError("both groups need at least one value")
    pooled, n = [*a, *b], len(a)
    centre = len(a) * len(b) / 2
    observed = abs(u_statistic(a, b) - centre)
    extreme = total = 0
    for chosen in itertools.combinations(range(len(pooled)), n):
        picked = set(chosen)
        first = [pooled[i] for i in chosen]
        rest = [pooled[i] for i in range(len(pooled)) if i not in picked]
        total += 1
        extreme += abs(u_statistic(first, rest) - centre) >= observed - 1e-9
    return extreme / total


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--a", type=float, nargs="+", required=True, help="one value per seed, first implementation")
    parser.add_argument("--b", type=float, nargs="+", required=True, help="one value per seed, second implementation")
    args = parser.parse_args(argv)
    u = u_statistic(args.a, args.b)
    print(f"n = {len(args.a)} / {len(args.b)}; means {sum(args.a) / len(args.a):.1f} / {sum(args.b) / len(args.b):.1f}; "
          f"U = {u:g}; exact two-sided p = {exact_p(args.a, args.b):.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
