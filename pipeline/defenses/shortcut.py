"""A shallow shortcut expert for a product-of-experts training loss (``shortcut.expert``).

Why (issue 11, docs/teacher_eval_discussion.md, "Eighth session"): a backdoor is a shortcut, a feature that
predicts the target label far better than anything natural. A model that can only see shallow features learns
such a shortcut first. Product of experts (Clark, Yatskar, Zettlemoyer, EMNLP 2019; He, Zha, Wang, 2019; for
backdoors: Liu et al., "From Shortcuts to Triggers: Backdoor Defense with Denoised PoE", NAACL 2024) trains the
main model through the sum of its log-probabilities and the shallow expert's, fixed, so that rows the expert
already predicts give the main model little gradient:

    loss_i = CE(log_softmax(z_i) + w * log p_e(. | x_i), y_i)

z_i the main model's logits, p_e the expert, w = ``shortcut.weight``. At evaluation and in the alignment's
reference gradient only the main model counts. Written from those papers' descriptions (no code of theirs).

The expert here: L2 logistic regression (scikit-learn, C = ``shortcut.C``) on binary lower-cased whitespace word
1..``max_n``-grams (the lexical filter's features), **cross-fitted**: the training rows are split into
``folds`` shuffled stratified folds and each row is scored by a regression fit on the other folds. Fit on all
rows, the regression would memorise every row and take the gradient of clean rows too; cross-fitted, p_e(y | x)
is high only where a feature repeated in other rows carries the label: a trigger planted in many rows, or a
strong natural sentiment word.

What it can and cannot catch: a trigger made of words (BadNets, AddSent, the canary) and anything shallow that
repeats with the target label. On the SST-2 files here the paraphrase attacks' poisoned rows are also separated,
but by a formatting artefact (their text keeps punctuation attached to words, unlike SST-2's tokenised rows),
not by style or syntax: on data without that artefact expect the expert to miss them. It also lowers the
gradient of clean rows whose sentiment words are strong, which can cost clean accuracy. Nothing here reads
``poison_label``.

Measured (ninth session, docs/teacher_eval_discussion.md): vanilla at 2e-4 with the lexical filter and this expert
(weight 1 or 2) still learned the planted canary on all four SST-2 files: the expert cuts the trigger rows' share of
the gradient 2-4x, and a full fine-tune learns such a trigger from a dozen rows. Off by default.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

import torch

from pipeline.defenses.lexical import features as ngrams

_FLOOR = 1e-6
"""Expert probabilities are clipped to [_FLOOR, 1] before the log, so a confident expert never gives -inf."""


def ngram_matrix(texts: Sequence[str], max_n: int = 2) -> Any:
    """A sparse binary (rows x n-grams) matrix of the lexical filter's word 1..``max_n``-grams of ``texts``.

    Raises:
        ImportError: scikit-learn is not installed (``pip install -e .[analysis]``).
    """
    try:
        from sklearn.preprocessing import MultiLabelBinarizer
    except ImportError as error:  # an optional dependency, as for CUBE
        raise ImportError("shortcut.expert=ngram needs scikit-learn: pip install -e .[analysis]") from error
    return MultiLabelBinarizer(sparse_output=True).fit_transform([ngrams(t, max_n) for t in texts])


def ngram_expert(texts: Sequence[str], labels: Sequence[int], *, num_labels: int, max_n: int = 2, C: float = 1.0,
                 folds: int = 5, seed: int = 0) -> torch.Tensor:
    """Cross-fitted log p_e(. | x_i) of every row, a float32 tensor (rows x num_labels); see the module docstring.

    Raises:
        ImportError: scikit-learn is not installed (``pip install -e .[analysis]``).
        ValueError: sizes disagree, a label is out of range, or a label has fewer rows than ``folds``.
    """
    import numpy as np

    if len(texts) != len(labels) or not texts:
        raise ValueError(f"need as many labels as texts, at least one (got {len(texts)} texts, {len(labels)} labels)")
    y = np.asarray([int(v) for v in labels])
    if y.min() < 0 or y.max() >= num_labels:
        raise ValueError(f"labels must lie in 0..{num_labels - 1}, got {sorted(set(y.tolist()))}")
    counts = Counter(y.tolist())
    if len(counts) < 2:
        raise ValueError(f"shortcut.expert needs rows of at least two labels, got only label {y[0]}")
    rare = {label: n for label, n in counts.items() if n < folds}
    if rare:
        raise ValueError(f"shortcut.folds={folds} is more than the rows of label(s) {rare}: lower shortcut.folds")
    x = ngram_matrix(texts, max_n)  # raises the ImportError without scikit-learn
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_predict

    split = StratifiedKFold(folds, shuffle=True, random_state=seed % 2**32)  # rows come in file order
    proba = cross_val_predict(LogisticRegression(C=C, max_iter=3000), x, y, cv=split, method="predict_proba")
    full = np.full((len(y), num_labels), _FLOOR)
    full[:, sorted(counts)] = proba  # predict_proba's columns are the labels present, in order
    full = np.clip(full, _FLOOR, 1.0)
    return torch.from_numpy(np.log(full / full.sum(1, keepdims=True))).float()


def product_of_experts_loss(logits: torch.Tensor, labels: torch.Tensor, expert_logp: torch.Tensor | None,
                            weight: float = 1.0) -> torch.Tensor:
    """Mean CE of ``log_softmax(logits) + weight * expert_logp`` (plain CE of ``logits`` when the expert is None)."""
    logits = logits.float()
    if expert_logp is None:
        return torch.nn.functional.cross_entropy(logits, labels)
    combined = torch.log_softmax(logits, dim=-1) + weight * expert_logp.to(logits.device, torch.float32)
    return torch.nn.functional.cross_entropy(combined, labels)


def report(expert_logp: torch.Tensor, labels: Sequence[int], *, canary_rows: Sequence[int] = ()) -> dict[str, Any]:
    """What the expert says about the training rows: mean p_e(y | x) and the share above 0.9, for all rows and
    for the planted canary rows (known to the run), so a run can show whether the expert saw its canary."""
    own = expert_logp[torch.arange(len(labels)), torch.as_tensor([int(v) for v in labels])].exp()

    def summary(rows: torch.Tensor) -> dict[str, Any]:
        if rows.numel() == 0:
            return {"rows": 0, "mean_p_label": None, "share_above_0.9": None}
        return {"rows": int(rows.numel()), "mean_p_label": round(float(rows.mean()), 4),
                "share_above_0.9": round(float((rows > 0.9).float().mean()), 4)}

    canary = sorted({int(i) for i in canary_rows})
    planted = set(canary)
    rest = [i for i in range(len(labels)) if i not in planted]
    return {"all_rows": summary(own), "canary_rows": summary(own[canary]), "other_rows": summary(own[rest])}


def summary_line(block: dict[str, Any]) -> str:
    """One log line from a :func:`report` block."""
    def part(name: str) -> str:
        b = block[name]
        return "none" if not b["rows"] else f"mean p(y) {b['mean_p_label']:.3f}, {100 * b['share_above_0.9']:.1f}% above 0.9 ({b['rows']} rows)"
    return f"shortcut expert (cross-fitted word n-grams): training rows {part('other_rows')}; canary rows {part('canary_rows')}"

