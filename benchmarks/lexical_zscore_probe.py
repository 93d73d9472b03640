"""How well a label-correlation z-score over word n-grams finds the poisoned training rows (issue 11 probe).

    python benchmarks/lexical_zscore_probe.py --max-train-samples 3000 --seed 42

The lexical part of Z-defence (He et al., "Mitigating Backdoor Poisoning Attacks through the Lens of Spurious
Correlation", EMNLP 2023, arXiv 2305.11596), written here from that description: for every word unigram and
bigram f present (once per row) in at least ``--min-count`` training rows and every label y,

    z(f, y) = (p_hat(y | f) - p(y)) / sqrt(p(y) (1 - p(y)) / n_f)

with n_f the rows containing f, p_hat(y | f) the share of them labelled y and p(y) the label's share of all
rows. A backdoor trigger is a feature far more predictive of the target label than any natural word; a row
holding a feature whose z exceeds the threshold is flagged. The computation reads texts and labels only.

This script is a PROBE, not a defence in the pipeline: it takes the training rows a run would see (the same
seeded subset, the canary planted as a run plants it), prints the highest-z features, and for each threshold
the rows flagged, and then, for the report only, reads ``poison_label`` to score them (poison recall /
precision, clean rows lost) and counts the canary's planted rows among them (the label-free check a defence
could use). Nothing here chooses a setting on poison labels.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from pipeline import canary as canary_lib  # noqa: E402
from pipeline.data import _seeded_subset, read_split, split_paths  # noqa: E402


def features(text: str, max_n: int = 2) -> set[str]:
    """Lower-cased whitespace word n-grams, n = 1..max_n, each once."""
    words = text.lower().split()
    return {" ".join(words[i:i + n]) for n in range(1, max_n + 1) for i in range(len(words) - n + 1)}


def zscores(texts: Sequence[str], labels: Sequence[int], *, max_n: int = 2, min_count: int = 5) -> dict[tuple[str, int], float]:
    """z(f, y) for every feature in at least ``min_count`` rows and every label present."""
    rows = len(texts)
    if rows == 0 or rows != len(labels):
        raise ValueError(f"need as many labels as texts (got {rows} texts, {len(labels)} labels), at least one")
    prior = {y: c / rows for y, c in Counter(labels).items()}
    count: Counter[str] = Counter()
    joint: Counter[tuple[str, int]] = Counter()
    for text, label in zip(texts, labels):
        for f in features(text, max_n):
            count[f] += 1
            joint[(f, label)] += 1
    out = {}
    for f, n in count.items():
        if n < min_count:
            continue
        for y, p0 in prior.items():
            if 0 < p0 < 1:
                out[(f, y)] = (joint[(f, y)] / n - p0) / math.sqrt(p0 * (1 - p0) / n)
    return out


def flagged_rows(texts: Sequence[str], scores: dict[tuple[str, int], float], threshold: float, max_n: int = 2) -> list[int]:
    """Rows holding at least one feature whose z (for any label) exceeds ``threshold``."""
    bad = {f for (f, _), z in scores.items() if z > threshold}
    return [i for i, text in enumerate(texts) if features(text, max_n) & bad]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-root", type=Path, default=REPO.parent / "shared" / "data" / "poison_data")
    p.add_argument("--dataset", default="sst-2")
    p.add_argument("--attacks", nargs="+", default=["badnets", "addsent", "stylebkd", "synbkd"])
    p.add_argument("--max-train-samples", type=int, default=3000, help="the seeded subset a run with this setting trains on")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--canary-rate", type=float, default=0.02, help="plant the run's canary (0: none)")
    p.add_argument("--max-n", type=int, default=2)
    p.add_argument("--min-count", type=int, default=5)
    p.add_argument("--thresholds", type=float, nargs="+", default=[6.0, 8.0, 10.0, 15.0])
    p.add_argument("--top", type=int, default=6)
    args = p.parse_args(argv)
    print(f"lexical z-score probe: {args.dataset}, {args.max_train_samples} rows (seed {args.seed}), canary rate "
          f"{args.canary_rate}, n-grams 1..{args.max_n}, min count {args.min_count}\n")
    print("| attack | threshold | rows flagged | poison recall | poison precision | clean rows flagged | canary rows flagged |")
    print("|---|---|---|---|---|---|---|")
    tops = []
    for attack in args.attacks:
        paths = split_paths(args.data_root, args.dataset, attack)
        rows = _seeded_subset(read_split(paths.train, keep_poison_label=True), args.max_train_samples, args.seed)
        poison = list(rows["poison_label"])
        train = rows.remove_columns("poison_label")
        planted: tuple[int, ...] = ()
        if args.canary_rate > 0:
            spec = canary_lib.CanarySpec(trigger=canary_lib.draw_trigger(args.seed),
                                         target_label=canary_lib.draw_target_label(args.seed, 2),
                                         rate=args.canary_rate, seed=args.seed, tolerance=0.05)
            train, planted = canary_lib.plant(train, spec)
        texts, labels = list(train["text"]), list(train["label"])
        scores = zscores(texts, labels, max_n=args.max_n, min_count=args.min_count)
        tops.append((attack, sorted(scores.items(), key=lambda kv: -kv[1])[:args.top]))
        total_poison = sum(poison)
        for threshold in args.thresholds:
            hit = flagged_rows(texts, scores, threshold, args.max_n)
            tp = sum(poison[i] for i in hit)
            canary = len(set(hit) & set(planted))
            print(f"| {attack} | {threshold:g} | {len(hit)} | {100 * tp / max(1, total_poison):.1f}% of {total_poison} | "
                  f"{100 * tp / max(1, len(hit)):.1f}% | {len(hit) - tp} | {canary} of {len(planted)} |")
    print()
    for attack, top in tops:
        print(f"{attack}: highest z: " + ", ".join(f"{f!r}->{y} {z:.1f}" for (f, y), z in top))


if __name__ == "__main__":
    main()
