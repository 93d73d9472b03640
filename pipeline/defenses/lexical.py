"""Lexical label-correlation filter: the lexical part of Z-defence, with a threshold set on trusted rows.

Z-defence (He, Xu, Wang, Rubinstein, Cohn, "Mitigating Backdoor Poisoning Attacks through the Lens of Spurious
Correlation", EMNLP 2023, arXiv 2305.11596) flags training rows that hold a feature far more predictive of a label
than any natural feature. Written here from that description (no code of theirs). For every lower-cased
whitespace word n-gram f (n = 1..max_n, counted once per row) present in at least ``min_count`` rows and every
label y with 0 < p(y) < 1:

    z(f, y) = (p_hat(y | f) - p(y)) / sqrt(p(y) (1 - p(y)) / n_f)

n_f = rows holding f, p_hat(y | f) = the share of them labelled y, p(y) = the label's share of all rows. A pair
(f, y) with z(f, y) > tau is flagged, and a training row is removed when it holds a flagged f AND carries the
flagged label y (a poisoned row carries the attack's target label; a clean row with the same word and the other
label says nothing against it).

The threshold. For a feature with a fixed true association, z grows with sqrt(n_f), hence with sqrt(rows): a
fixed tau that is safe on 3,000 rows flags natural sentiment words on 70,000. The filter therefore calibrates tau
on the trusted clean rows the run already has (the reference and selection rows, dev-clean), where every
association is natural:

    tau = margin * max_{f, y} z_trusted(f, y) * sqrt(N_train / N_trusted)

the strongest natural association of the trusted rows, rescaled to the training set's size, times a safety
``margin`` for the sampling noise of a maximum (default 1.5, set a priori: see docs/FILTER.md for the
margins' effect and what was known when it was set). An explicit ``threshold`` replaces the rule. Nothing here
reads ``poison_label``; a run's report scores the choice afterwards.

What it can and cannot remove: a trigger made of words (BadNets' rare tokens, AddSent's fixed sentence) is a
feature with p_hat(target | f) close to 1 in every poisoned row; a paraphrase trigger (StyleBkd's style,
SynBkd's syntactic template) has no word of its own and is invisible here, so the training-time defence must
handle it.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence

from pipeline.defenses.filtering import FilterResult


def features(text: str, max_n: int = 2) -> set[str]:
    """Lower-cased whitespace word n-grams of ``text``, n = 1..max_n, each once."""
    words = text.lower().split()
    return {" ".join(words[i:i + n]) for n in range(1, max_n + 1) for i in range(len(words) - n + 1)}


def zscores(texts: Sequence[str], labels: Sequence[int], *, max_n: int = 2, min_count: int = 5) -> dict[tuple[str, int], float]:
    """z(f, y) for every feature in at least ``min_count`` rows and every label y with 0 < p(y) < 1.

    Raises:
        ValueError: ``texts`` is empty or its length differs from ``labels``'.
    """
    rows = len(texts)
    if rows == 0 or rows != len(labels):
        raise ValueError(f"need as many labels as texts, at least one (got {rows} texts, {len(labels)} labels)")
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


def calibrated_threshold(trusted_texts: Sequence[str], trusted_labels: Sequence[int], num_train_rows: int, *,
                         margin: float, max_n: int = 2, min_count: int = 5) -> tuple[float, float]:
    """``(tau, z_trusted_max)``: the module docstring's rule on the trusted clean rows.

    Raises:
        ValueError: no feature of the trusted rows reaches ``min_count`` rows, or bad sizes.
    """
    if num_train_rows <= 0:
        raise ValueError(f"num_train_rows must be positive, got {num_train_rows}")
    scores = zscores(trusted_texts, trusted_labels, max_n=max_n, min_count=min_count)
    if not scores:
        raise ValueError(
            f"no feature occurs in {min_count} of the {len(trusted_texts)} trusted rows, so the threshold cannot be "
            "calibrated: lower filter.min_count or set filter.threshold"
        )
    top = max(scores.values())
    return margin * top * math.sqrt(num_train_rows / len(trusted_texts)), top


def lexical_filter(texts: Sequence[str], labels: Sequence[int], *, threshold: float | None = None,
                   trusted_texts: Sequence[str] = (), trusted_labels: Sequence[int] = (), margin: float = 1.5,
                   max_n: int = 2, min_count: int = 5) -> FilterResult:
    """Flag (feature, label) pairs with z above the threshold and remove the rows holding one with that label.

    Returns the filters' common :class:`pipeline.defenses.filtering.FilterResult` (so ``filter_report`` scores
    it), with ``details``: ``threshold`` (tau used), ``trusted_max_z`` (the trusted rows' largest z; None when
    ``threshold`` was given) and ``flagged``, one ``{feature, label, z, rows_removed}`` per flagged pair,
    highest z first.

    Args:
        texts, labels: The training rows (possibly poisoned).
        threshold: tau; None calibrates it on ``trusted_texts`` / ``trusted_labels`` with ``margin``.
        trusted_texts, trusted_labels: Clean labelled rows (dev-clean) for the calibration.
        margin, max_n, min_count: See the module docstring.

    Raises:
        ValueError: Bad sizes, or ``threshold`` is None and the trusted rows cannot calibrate it.
    """
    trusted_max = None
    if threshold is None:
        threshold, trusted_max = calibrated_threshold(
            trusted_texts, trusted_labels, len(texts), margin=margin, max_n=max_n, min_count=min_count)
    scores = zscores(texts, labels, max_n=max_n, min_count=min_count)
    bad = {pair: z for pair, z in scores.items() if z > threshold}
    removed_for: Counter[tuple[str, int]] = Counter()
    removed = []
    for i, (text, label) in enumerate(zip(texts, labels)):
        hits = [(f, label) for f in features(text, max_n) if (f, label) in bad]
        if hits:
            removed.append(i)
            removed_for.update(hits)
    flagged = [{"feature": f, "label": y, "z": z, "rows_removed": removed_for[(f, y)]}
               for (f, y), z in sorted(bad.items(), key=lambda kv: (-kv[1], kv[0]))]
    return FilterResult.from_removed(len(texts), removed, {
        "threshold": threshold, "trusted_max_z": trusted_max, "flagged": flagged})
