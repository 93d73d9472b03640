"""STRIP for text classifiers: an inference-time backdoor detector, a baseline for MuScleLoRA (arXiv 2402.12026).

STRIP (Gao, Xu, Wang, Chen, Ranasinghe, Nepal, "STRIP: A Defence Against Trojan Attacks on Deep
Neural Networks", ACSAC 2019, arXiv 1902.06531; text variant in Gao et al., "Design and Evaluation
of a Multi-Domain Trojan Detection Method on Deep Neural Networks", IEEE TDSC, arXiv
1911.10312). A trigger dominates the prediction however much of the rest of the input is destroyed,
so a triggered input keeps a confident prediction under strong perturbation, while a clean input's
prediction wavers. With p_c(x) the classifier's softmax, x^(1..N) N perturbed copies of x:

    H(x) = (1/N) sum_{n=1..N} -sum_c p_c(x^(n)) log2 p_c(x^(n))      (mean entropy, bits)
    flagged(x) = [H(x) < threshold]                                   (low entropy = trojaned)

Perturbation (the text variant of OpenBackdoor's ``STRIPDefender``, Cui et al. 2022, which the
MuScleLoRA authors ran): split x on whitespace into n words; draw one donor sentence from the
held-out clean donor set; replace m = max(1, floor(replace_ratio * n)) distinct, uniformly drawn
word positions with the donor's words ranked by TF-IDF (the k-th drawn position gets the donor's
k-th highest-scoring word, cycling when the donor has fewer than m scored words). TF-IDF is
scikit-learn's ``TfidfVectorizer(use_idf=True, smooth_idf=True, norm=None, stop_words="english")``
fitted on the donor set, as in OpenBackdoor; donors with no scored word are not drawn; ties are
broken alphabetically. Differences from OpenBackdoor, each a fix: positions are distinct (it draws
them with replacement); at least one word is replaced (its floor leaves sentences shorter than
1 / replace_ratio untouched); each input's entropy averages its own N perturbations (its reshape
averages perturbations of different inputs); the random stream of input j is seeded by
(seed, j), so an entropy does not depend on which other inputs are scored with it.

Threshold (calibration on clean held-out data only, never test data), at a preset false rejection
rate FRR (share of clean inputs flagged; STRIP presets FRR and reports the false acceptance rate
FAR, the share of trojaned inputs not flagged). With h_(1) <= ... <= h_(M) the sorted clean
entropies and k = floor(FRR * M):

    "quantile" (default; OpenBackdoor's rule):  threshold = h_(k+1)
        -> flags exactly the clean inputs strictly below h_(k+1): at most k = floor(FRR * M)
    "normal" (the STRIP paper's rule): fit N(mu, sigma^2) to the clean entropies (sigma with
        M - 1 degrees of freedom) and take its FRR quantile, threshold = mu + sigma * Phi^-1(FRR)

Defaults follow the MuScleLoRA authors' STRIP configuration (baselineConfigs/STRIP.json): N = 5
perturbations, replace_ratio = 0.25, FRR = 1%. The STRIP paper uses N = 100 (images).

Counting for CACC and ASR (``counting``). STRIP only detects; how a flagged input enters the
accuracy metrics is a convention:

    "flip" (default, the MuScleLoRA authors' evaluation code, openbackdoor/attackers/attacker.py:
        a flagged input's evaluation label is replaced by the other class, which is the same as
        outputting the other class than the model predicts):
            d_i = 1 - y_hat_i  if flagged_i  else  y_hat_i
    "reject" (a flagged input is refused and no class is output):
            d_i = REJECTED (-1)  if flagged_i  else  y_hat_i

    CACC      = mean_{i in test-clean} [d_i = y_i]
    ASR       = mean_{i in test-poison} [d_i = t]
    clean FPR = mean_{i in test-clean, y_i != t} [d_i = t]

Under "reject" a flagged clean input is an error and a flagged poison input is never an attack
success. Under "flip" a flagged poison input succeeds only if the model did not predict t on it,
and a flagged clean input counts as correct only if the model was wrong on it. The flip is only
defined for two classes; the authors' code asserts a binary task, and so does this module for both
conventions (``num_labels != 2`` is a ValueError). Both conventions are returned.

Detection statistics: TPR = share of test-poison flagged (1 - FAR), FPR = share of test-clean
flagged (the FRR realised on test data), and the threshold-free AUROC of -H(x) for poison vs clean.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from pipeline import data as data_lib
from pipeline import evaluate as ev

logger = logging.getLogger(__name__)

PredictProba = Callable[[list[str]], Tensor]
"""Maps N texts to class probabilities, a float tensor of shape (N, num_labels) whose rows sum to 1."""

Counting = Literal["flip", "reject"]
Calibration = Literal["quantile", "normal"]

REJECTED = -1
"""Defended prediction of an input STRIP refuses under ``counting="reject"``; equals no class."""

DEFAULT_NUM_PERTURBATIONS = 5
DEFAULT_REPLACE_RATIO = 0.25
DEFAULT_FRR = 0.01

_PROBABILITY_TOLERANCE = 1e-3
_FLOOR_EPS = 1e-9
"""Slack in floor(ratio * n), so that 0.29 * 100 (= 28.999...) counts as 29."""


def model_predict_proba(
    model: nn.Module,
    tokenizer: Any,
    *,
    max_length: int,
    batch_size: int = 64,
    device: torch.device | str | None = None,
    progress: bool = False,
) -> PredictProba:
    """Wrap a sequence classifier as a :data:`PredictProba` callable.

    Texts are tokenised as training and evaluation tokenise them (truncation to ``max_length``, no
    token type ids, :func:`pipeline.data.make_collator` padding each batch to its longest text) and
    batched in the given order, so the argmax of the probabilities on unperturbed test texts with
    the run's ``eval_batch_size`` equals the run's own predictions. A text that tokenises to no
    token at all (the empty string under GPT-2's tokenizer) is fed as the single EOS token. Each
    call runs the model in eval mode and restores every submodule's train/eval mode afterwards.

    Args:
        model: A classifier returning logits (batch, num_labels) or an output with ``.logits``,
            already on ``device``.
        tokenizer: Its tokenizer (with a pad token; see :func:`pipeline.modeling.load_tokenizer`).
        max_length: Truncation length in tokens.
        batch_size: Texts per forward pass.
        device: Where the inputs go (default: the device of the model's first parameter).
        progress: Show a tqdm progress bar per call.

    Returns:
        A function mapping a list of N texts to a float32 CPU tensor (N, num_labels) of softmax
        probabilities.

    Raises:
        ValueError: ``max_length`` or ``batch_size`` is not a positive integer.
        DataError: The tokenizer has no pad token.
    """
    _check_positive_int(max_length, "max_length")
    _check_positive_int(batch_size, "batch_size")
    collate = data_lib.make_collator(tokenizer)
    if device is None:
        device = next(model.parameters()).device

    def predict_proba(texts: list[str]) -> Tensor:
        texts = [str(text) for text in texts]
        parts: list[Tensor] = []
        with ev.eval_mode(model):
            starts = range(0, len(texts), batch_size)
            for start in tqdm(starts, desc="predict", disable=not progress, leave=False):
                chunk = texts[start : start + batch_size]
                encoded = tokenizer(
                    chunk, truncation=True, max_length=max_length, padding=False, return_token_type_ids=False
                )
                features = []
                for text, ids, mask in zip(chunk, encoded["input_ids"], encoded["attention_mask"]):
                    if not ids:
                        if tokenizer.eos_token_id is None:
                            raise ValueError(
                                f"text {text!r} tokenises to no tokens and the tokenizer has no EOS token"
                            )
                        ids, mask = [tokenizer.eos_token_id], [1]
                    features.append({"input_ids": ids, "attention_mask": mask})
                batch = collate(features)
                inputs = {key: batch[key].to(device) for key in ev.MODEL_INPUT_KEYS if key in batch}
                output = model(**inputs)
                logits = output if isinstance(output, Tensor) else output.logits  # (b, num_labels)
                parts.append(torch.softmax(logits.float(), dim=-1).cpu())
        if not parts:
            num_labels = getattr(getattr(model, "config", None), "num_labels", 0)
            return torch.empty(0, num_labels)
        return torch.cat(parts)

    return predict_proba


def _check_positive_int(value: object, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _check_ratio(value: float, name: str, *, closed_right: bool) -> None:
    upper_ok = value <= 1 if closed_right else value < 1
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (0 < value and upper_ok):
        interval = "(0, 1]" if closed_right else "(0, 1)"
        raise ValueError(f"{name} must be a number in {interval}, got {value!r}")


def checked_proba(predict_proba: PredictProba, texts: list[str]) -> Tensor:
    """Call ``predict_proba`` and check that it returns one probability row per text.

    Args:
        predict_proba: The classifier as a :data:`PredictProba`.
        texts: The texts.

    Returns:
        Probabilities as a float64 CPU tensor (len(texts), num_labels).

    Raises:
        ValueError: The result is not a 2-D tensor with one row per text, or its rows are not
            probability distributions (negative, non-finite or not summing to 1; pass softmax
            probabilities, not logits).
    """
    probs = predict_proba(texts)
    if not isinstance(probs, Tensor) or probs.dim() != 2 or probs.shape[0] != len(texts):
        shape = tuple(probs.shape) if isinstance(probs, Tensor) else type(probs).__name__
        raise ValueError(
            f"predict_proba must return a tensor of shape ({len(texts)}, num_labels) for {len(texts)} texts, "
            f"got {shape}"
        )
    probs = probs.detach().to("cpu", torch.float64)
    if probs.numel() and (
        not bool(torch.isfinite(probs).all())
        or bool((probs < 0).any())
        or not torch.allclose(probs.sum(dim=-1), torch.ones_like(probs[:, 0]), atol=_PROBABILITY_TOLERANCE)
    ):
        raise ValueError(
            "predict_proba must return probabilities (non-negative rows summing to 1), got values in "
            f"[{probs.min().item():.4g}, {probs.max().item():.4g}] with row sums up to "
            f"{probs.sum(dim=-1).max().item():.4g}; apply softmax to the logits"
        )
    return probs


def entropy_bits(probs: Tensor) -> Tensor:
    """Shannon entropy in bits of each row: H(p) = -sum_c p_c log2 p_c (0 log 0 = 0).

    Args:
        probs: Probabilities (..., num_labels).

    Returns:
        Entropies (...), float64.
    """
    return torch.special.entr(probs.double()).sum(dim=-1) / math.log(2)


def rank_donor_words(donor_texts: Sequence[str]) -> list[list[str]]:
    """Each donor sentence's words ranked by TF-IDF over the donor set, highest first.

    TF-IDF as OpenBackdoor's STRIP: scikit-learn ``TfidfVectorizer(use_idf=True, smooth_idf=True,
    norm=None, stop_words="english")`` (lowercased words of two or more letters, English stop words
    removed), score(w, d) = count(w, d) * (ln((1 + D) / (1 + df(w))) + 1). Ties are broken
    alphabetically. Donors without a scored word are left out.

    Args:
        donor_texts: Held-out clean sentences (never test data).

    Returns:
        One list of words per usable donor, each non-empty.

    Raises:
        ValueError: No donor text, or no donor holds a word TF-IDF scores.
        ImportError: scikit-learn is not installed.
    """
    try:
        from sklearn.feature_extraction.text import TfidfVectorizer
    except ImportError as error:
        raise ImportError(
            "STRIP ranks donor words with scikit-learn's TfidfVectorizer, which is not installed; "
            "fix: pip install -e '.[analysis]' (or pip install scikit-learn)"
        ) from error
    texts = [str(text) for text in donor_texts]
    if not texts:
        raise ValueError("STRIP needs donor texts (held-out clean sentences); got none")
    vectorizer = TfidfVectorizer(use_idf=True, smooth_idf=True, norm=None, stop_words="english")
    try:
        matrix = vectorizer.fit_transform(texts).tocsr()
    except ValueError as error:  # "empty vocabulary"
        raise ValueError(
            f"none of the {len(texts)} donor texts holds a word TF-IDF can score (only stop words or "
            f"one-letter tokens): {error}; pass real held-out sentences"
        ) from error
    vocabulary = vectorizer.get_feature_names_out()
    ranked: list[list[str]] = []
    for row in range(matrix.shape[0]):
        start, end = matrix.indptr[row], matrix.indptr[row + 1]
        scored = zip(matrix.indices[start:end], matrix.data[start:end])
        pairs = [(-float(score), str(vocabulary[index])) for index, score in scored if score > 0]
        if pairs:
            ranked.append([word for _, word in sorted(pairs)])
    if len(ranked) < len(texts):
        logger.info(
            "STRIP: %d of %d donor texts hold no TF-IDF-scored word and are not drawn",
            len(texts) - len(ranked), len(texts),
        )
    return ranked


def perturb_text(
    text: str, donors: Sequence[Sequence[str]], *, replace_ratio: float, rng: np.random.Generator
) -> str:
    """One STRIP perturbation: replace a share of ``text``'s words with one donor's top TF-IDF words.

    Args:
        text: The input sentence (split on whitespace, re-joined with single spaces).
        donors: Ranked donor words from :func:`rank_donor_words`.
        replace_ratio: Share of words replaced; m = max(1, floor(replace_ratio * n)) of n words.
        rng: Random generator drawing the donor and the positions.

    Returns:
        The perturbed sentence; an input without words is returned unchanged.
    """
    words = text.split()
    if not words:
        return text
    count = max(1, int(len(words) * replace_ratio + _FLOOR_EPS))
    donor = donors[int(rng.integers(len(donors)))]
    positions = rng.choice(len(words), size=count, replace=False)
    for rank, position in enumerate(positions):
        words[int(position)] = donor[rank % len(donor)]
    return " ".join(words)


def strip_entropies(
    predict_proba: PredictProba,
    texts: Sequence[str],
    *,
    donor_texts: Sequence[str],
    num_perturbations: int = DEFAULT_NUM_PERTURBATIONS,
    replace_ratio: float = DEFAULT_REPLACE_RATIO,
    seed: int = 0,
) -> Tensor:
    """STRIP entropy H(x) of each text: mean entropy (bits) over ``num_perturbations`` perturbed copies.

    Input j's perturbations are drawn from ``numpy.random.default_rng([seed, j])``; the classifier
    sees all len(texts) * num_perturbations perturbed texts in one ``predict_proba`` call, input-major
    (the N copies of text 0 first).

    Args:
        predict_proba: The classifier as a :data:`PredictProba`.
        texts: Inputs to score.
        donor_texts: Held-out clean sentences whose words are superimposed (never test data).
        num_perturbations: N, perturbed copies per input.
        replace_ratio: Share of an input's words replaced per copy, in (0, 1].
        seed: Non-negative seed of the perturbations.

    Returns:
        H(x) per text, float64 tensor (len(texts),).

    Raises:
        ValueError: Bad arguments, unusable donors, or ``predict_proba`` not returning probabilities.
    """
    _check_positive_int(num_perturbations, "num_perturbations")
    _check_ratio(replace_ratio, "replace_ratio", closed_right=True)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    texts = [str(text) for text in texts]
    if not texts:
        return torch.empty(0, dtype=torch.float64)
    donors = rank_donor_words(donor_texts)
    perturbed: list[str] = []
    for index, text in enumerate(texts):
        rng = np.random.default_rng([seed, index])
        perturbed.extend(
            perturb_text(text, donors, replace_ratio=replace_ratio, rng=rng) for _ in range(num_perturbations)
        )
    probs = checked_proba(predict_proba, perturbed)  # (T * N, C)
    return entropy_bits(probs).view(len(texts), num_perturbations).mean(dim=1)


def calibrate_threshold(
    clean_entropies: Tensor | Sequence[float], frr: float = DEFAULT_FRR, *, method: Calibration = "quantile"
) -> float:
    """Entropy threshold at a preset false rejection rate on clean held-out entropies.

    Inputs with H(x) < threshold are flagged. ``"quantile"``: threshold = h_(k+1), the (k+1)-th
    smallest clean entropy with k = floor(frr * M), so at most k of the M clean inputs are flagged
    (exactly k when entropies do not tie). ``"normal"``: mu + sigma * Phi^-1(frr) of a normal fitted
    to the clean entropies (STRIP's rule; sigma = 0 gives mu, flagging none of them).

    Args:
        clean_entropies: H(x) of clean held-out inputs.
        frr: Preset false rejection rate, in (0, 1).
        method: ``"quantile"`` or ``"normal"``.

    Returns:
        The threshold.

    Raises:
        ValueError: No (or, for ``"normal"``, fewer than two) entropies, non-finite values, or bad
            ``frr`` / ``method``.
    """
    _check_ratio(frr, "frr", closed_right=False)
    values = torch.as_tensor(clean_entropies, dtype=torch.float64).reshape(-1)
    if values.numel() == 0:
        raise ValueError("calibrate_threshold needs the entropies of clean held-out inputs; got none")
    if not bool(torch.isfinite(values).all()):
        raise ValueError("calibrate_threshold: the clean entropies contain NaN or infinite values")
    if method == "quantile":
        k = int(math.floor(frr * values.numel() + _FLOOR_EPS))
        return float(torch.sort(values).values[k])
    if method == "normal":
        if values.numel() < 2:
            raise ValueError("calibrate_threshold(method='normal') needs at least two clean entropies to fit a normal")
        mu, sigma = values.mean().item(), values.std(unbiased=True).item()
        if sigma == 0:
            return mu
        mean, std, share = (torch.tensor(v, dtype=torch.float64) for v in (mu, sigma, frr))
        return float(torch.distributions.Normal(mean, std).icdf(share))
    raise ValueError(f"method must be 'quantile' or 'normal', got {method!r}")


def metrics_by_counting(
    clean_preds: Tensor, clean_flags: Tensor, labels: Tensor | Sequence[int], poison_preds: Tensor,
    poison_flags: Tensor, *, target_label: int,
) -> dict[str, dict[str, float]]:
    """CACC / ASR / clean FPR of a detector's defended predictions under both counting rules.

    Shared by the inference-time detectors (STRIP, RAP): ``{"flip": metrics, "reject": metrics}`` with
    :func:`defended_predictions` applied to the test-clean and test-poison predictions and their flags.
    """
    return {
        rule: ev.backdoor_metrics(
            defended_predictions(clean_preds, clean_flags, counting=rule), labels,
            defended_predictions(poison_preds, poison_flags, counting=rule), target_label=target_label,
        )
        for rule in ("flip", "reject")
    }


def defended_predictions(
    preds: Tensor | Sequence[int], flags: Tensor | Sequence[bool], *, counting: Counting
) -> Tensor:
    """Predictions after STRIP: flagged inputs flipped to the other class, or :data:`REJECTED`.

    Args:
        preds: The model's predicted classes on the unperturbed inputs, 0 or 1.
        flags: Whether STRIP flags each input.
        counting: ``"flip"`` (d = 1 - y_hat when flagged, the MuScleLoRA authors') or ``"reject"``
            (d = REJECTED when flagged).

    Returns:
        int64 tensor of defended predictions.

    Raises:
        ValueError: Lengths differ, a prediction is not 0 or 1, or ``counting`` is unknown.
    """
    p = torch.as_tensor(preds).long().reshape(-1)
    f = torch.as_tensor(flags).bool().reshape(-1)
    if p.shape != f.shape:
        raise ValueError(f"preds and flags differ in length: {p.numel()} vs {f.numel()}")
    if bool(((p != 0) & (p != 1)).any()):
        raise ValueError("STRIP's counting is implemented for binary tasks: predictions must be 0 or 1")
    if counting == "flip":
        return torch.where(f, 1 - p, p)
    if counting == "reject":
        return torch.where(f, torch.full_like(p, REJECTED), p)
    raise ValueError(f"counting must be 'flip' or 'reject', got {counting!r}")


def detection_auroc(clean_entropies: Tensor, poison_entropies: Tensor) -> float:
    """AUROC of flagging by low entropy: P(H(poison) < H(clean)) + P(H(poison) = H(clean)) / 2."""
    clean = clean_entropies.double().reshape(1, -1)
    poison = poison_entropies.double().reshape(-1, 1)
    return ((poison < clean).double() + 0.5 * (poison == clean).double()).mean().item()


def _binary_labels(values: Tensor | Sequence[int], name: str) -> Tensor:
    labels = torch.as_tensor(values).reshape(-1)
    if labels.is_floating_point() or bool(((labels != 0) & (labels != 1)).any()):
        raise ValueError(f"STRIP is implemented for binary tasks: {name} must hold class ids 0 and 1")
    return labels.long()


def strip_evaluate(
    predict_proba: PredictProba,
    *,
    clean_texts: Sequence[str],
    clean_labels: Tensor | Sequence[int],
    poison_texts: Sequence[str],
    target_label: int,
    calibration_texts: Sequence[str],
    donor_texts: Sequence[str],
    num_perturbations: int = DEFAULT_NUM_PERTURBATIONS,
    replace_ratio: float = DEFAULT_REPLACE_RATIO,
    frr: float = DEFAULT_FRR,
    calibration: Calibration = "quantile",
    counting: Counting = "flip",
    seed: int = 0,
) -> dict[str, Any]:
    """Evaluate a binary classifier under STRIP: calibrate on clean held-out data, flag, count.

    Args:
        predict_proba: The classifier as a :data:`PredictProba` (two classes).
        clean_texts: test-clean sentences.
        clean_labels: Their labels, 0 or 1.
        poison_texts: test-poison sentences (triggered, true label not the target).
        target_label: The attacker's target class, 0 or 1.
        calibration_texts: Clean held-out sentences the defender owns (e.g. dev-clean) for the
            threshold; never test data.
        donor_texts: Clean held-out sentences whose words perturb the inputs; never test data.
        num_perturbations: N perturbations per input.
        replace_ratio: Share of words replaced per perturbation.
        frr: Preset false rejection rate on the calibration set.
        calibration: ``"quantile"`` (default) or ``"normal"``; see :func:`calibrate_threshold`.
        counting: How flagged inputs count in ``cacc`` / ``asr`` / ``clean_fpr``: ``"flip"``
            (default, the MuScleLoRA authors') or ``"reject"``; both are in ``by_counting``.
        seed: Seed of the perturbations.

    Returns:
        Fractions in [0, 1]: ``cacc``, ``asr``, ``clean_fpr``, ``asr_minus_clean_fpr`` under
        ``counting``; ``by_counting`` (both conventions); ``undefended`` (the same metrics without
        STRIP); ``detection`` (threshold, realised calibration FRR, TPR on test-poison, FPR on
        test-clean, AUROC, flagged counts, mean entropies); ``settings``; ``num_clean``,
        ``num_poison``, ``num_calibration``.

    Raises:
        ValueError: The classifier does not have exactly two classes (STRIP's counting and this
            implementation are for binary tasks), labels are not 0/1, a split is empty, or another
            argument is bad.
    """
    if counting not in ("flip", "reject"):
        raise ValueError(f"counting must be 'flip' or 'reject', got {counting!r}")
    if target_label not in (0, 1):
        raise ValueError(f"STRIP is implemented for binary tasks: target_label must be 0 or 1, got {target_label!r}")
    labels = _binary_labels(clean_labels, "clean_labels")
    clean_texts, poison_texts = [str(t) for t in clean_texts], [str(t) for t in poison_texts]
    calibration_texts, donor_texts = [str(t) for t in calibration_texts], [str(t) for t in donor_texts]
    if len(labels) != len(clean_texts):
        raise ValueError(f"clean_texts and clean_labels differ in length: {len(clean_texts)} vs {len(labels)}")
    splits = {"clean_texts": clean_texts, "poison_texts": poison_texts, "calibration_texts": calibration_texts}
    for name, texts in splits.items():
        if not texts:
            raise ValueError(f"strip_evaluate: {name} is empty")

    clean_probs = checked_proba(predict_proba, clean_texts)
    num_labels = clean_probs.shape[1]
    if num_labels != 2:
        raise ValueError(
            f"STRIP is implemented for binary tasks, as the issue specifies (the authors' counting flips a "
            f"flagged input to the other class, defined only for two classes); the classifier has "
            f"{num_labels} classes"
        )
    poison_probs = checked_proba(predict_proba, poison_texts)
    clean_preds, poison_preds = clean_probs.argmax(dim=1), poison_probs.argmax(dim=1)

    def entropies(texts: list[str], what: str) -> Tensor:
        logger.info("STRIP: %d perturbations of %d %s inputs", num_perturbations, len(texts), what)
        return strip_entropies(
            predict_proba, texts, donor_texts=donor_texts, num_perturbations=num_perturbations,
            replace_ratio=replace_ratio, seed=seed,
        )

    calibration_h = entropies(calibration_texts, "calibration")
    threshold = calibrate_threshold(calibration_h, frr, method=calibration)
    clean_h, poison_h = entropies(clean_texts, "test-clean"), entropies(poison_texts, "test-poison")
    clean_flags, poison_flags = clean_h < threshold, poison_h < threshold

    by_counting = metrics_by_counting(clean_preds, clean_flags, labels, poison_preds, poison_flags,
                                      target_label=target_label)
    detection = {
        "threshold": threshold,
        "calibration": calibration,
        "calibration_frr": (calibration_h < threshold).double().mean().item(),
        "tpr": poison_flags.double().mean().item(),
        "fpr": clean_flags.double().mean().item(),
        "auroc": detection_auroc(clean_h, poison_h),
        "num_flagged_clean": int(clean_flags.sum()),
        "num_flagged_poison": int(poison_flags.sum()),
        "mean_entropy_calibration": calibration_h.mean().item(),
        "mean_entropy_clean": clean_h.mean().item(),
        "mean_entropy_poison": poison_h.mean().item(),
    }
    logger.info(
        "STRIP: threshold %.4g bits, TPR %.3f on test-poison, FPR %.3f on test-clean (target FRR %.3f)",
        threshold, detection["tpr"], detection["fpr"], frr,
    )
    return {
        "defense": "strip",
        "counting": counting,
        **by_counting[counting],
        "by_counting": by_counting,
        "undefended": ev.backdoor_metrics(clean_preds, labels, poison_preds, target_label=target_label),
        "detection": detection,
        "settings": {
            "num_perturbations": num_perturbations,
            "replace_ratio": replace_ratio,
            "frr": frr,
            "calibration": calibration,
            "seed": seed,
            "num_donors": len(donor_texts),
        },
        "num_clean": len(clean_texts),
        "num_poison": len(poison_texts),
        "num_calibration": len(calibration_texts),
    }
