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
import sys
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from pipeline import canary as canary_lib  # noqa: E402
from pipeline.defenses.filtering import filter_report  # noqa: E402
from pipeline.defenses.lexical import features, lexical_filter, zscores  # noqa: E402  (the pipeline's filter)
from pipeline.data import _seeded_subset, read_split, split_paths  # noqa: E402


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
    p.add_argument("--margins", type=float, nargs="+", default=[1.0, 1.25, 1.5, 2.0],
                   help="the pipeline's filter (filter.method=lexical_zscore) at these filter.margin values: auto "
                        "threshold calibrated on dev-clean, applied before the canary is planted, as a run does")
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
    print("The pipeline's filter, auto threshold = margin x dev-clean's largest z x sqrt(train rows / dev-clean rows), "
          "removing rows that hold a flagged n-gram with its flagged label (no canary: a run filters before planting):\n")
    print("| attack | margin | threshold | dev-clean max z | rows removed | poison recall | poison precision | clean rows removed | flagged n-grams |")
    print("|---|---|---|---|---|---|---|---|---|")
    for attack in args.attacks:
        paths = split_paths(args.data_root, args.dataset, attack)
        rows = _seeded_subset(read_split(paths.train, keep_poison_label=True), args.max_train_samples, args.seed)
        poison = list(rows["poison_label"])
        dev = read_split(paths.dev_clean)
        texts, labels = list(rows["text"]), list(rows["label"])
        for margin in args.margins:
            result = lexical_filter(texts, labels, trusted_texts=list(dev["text"]), trusted_labels=list(dev["label"]),
                                    margin=margin, max_n=args.max_n, min_count=args.min_count)
            scored = filter_report(result, poison)  # poison labels: scoring only
            found = result.details
            shown = ", ".join(f"{f['feature']!r}->{f['label']} {f['z']:.1f}" for f in found["flagged"][:4]) or "none"
            more = f" (+{len(found['flagged']) - 4})" if len(found["flagged"]) > 4 else ""
            print(f"| {attack} | {margin:g} | {found['threshold']:.2f} | {found['trusted_max_z']:.2f} | {scored['num_removed']} | "
                  f"{100 * (scored['recall'] or 0):.1f}% of {scored['num_poison']} | {100 * (scored['precision'] or 0):.1f}% | "
                  f"{scored['removed_clean']} | {shown}{more} |")
    print()
    for attack, top in tops:
        print(f"{attack}: highest z: " + ", ".join(f"{f!r}->{y} {z:.1f}" for (f, y), z in top))


if __name__ == "__main__":
    main()
