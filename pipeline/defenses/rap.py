"""RAP: robustness-aware perturbations, an inference-time backdoor detector, a baseline for MuScleLoRA.

RAP (Yang, Lin, Li, Zhou, Sun, "RAP: Robustness-Aware Perturbations for Defending against Backdoor
Attacks on NLP Models", EMNLP 2021, arXiv 2110.07831). A backdoored model predicts the target class
t on a triggered input with a margin that a small perturbation cannot move, while its confidence on
clean inputs of class t is fragile. RAP builds that perturbation: a rare word w (the "RAP trigger")
inserted at the start of the text, whose input embedding e_w alone is trained (every model weight
frozen) so that it lowers the target probability of clean target-class texts by a set amount:

    d(x)  = p_t(x) - p_t(w + x)                                   (probability drop)
    L(e_w) = mean_{x in D_t} [ s * relu(a - d(x)) + relu(d(x) - b) ]   with D_t the defender's clean
                                                                        held-out texts labelled t
    e_w <- e_w - lr * dL/de_w                                      (plain gradient descent)

so that a <= d(x) <= b on clean data (the paper's range, OpenBackdoor's ``prob_range=[-0.1, -0.3]``:
a = 0.1, b = 0.3, s = 1). A poisoned input keeps p_t near 1 under w: its drop stays small.

Detection threshold (clean held-out data only, never test data), at a preset false rejection rate
FRR: with d_(1) <= ... <= d_(M) the sorted drops of the clean target-class held-out texts and
k = floor(FRR * M), threshold = d_(k+1), the rule of :func:`pipeline.defenses.strip.calibrate_threshold`.
An input is flagged when the model predicts t on it and its drop is below the threshold:

    flagged(x) = [argmax p(x) = t] and [d(x) < threshold]

(inputs predicted as another class are no attack success and are not checked, as in the paper).
Flagged inputs enter CACC / ASR / clean FPR as in STRIP (``counting``: "flip", the MuScleLoRA
authors' evaluation, or "reject"; see :mod:`pipeline.defenses.strip`); both are returned.

Implementation: the trained vectors replace the embedding output at the RAP word's token positions
(the word is inserted first, so its k tokens sit at the same positions of every right-padded row,
checked on every call) through a forward hook on the model's input embedding layer
(``get_input_embeddings()``), so the model, its adapters and its pooling (decoders pool the last
non-pad token, found from input_ids) are used unchanged, nothing is written into the weights, and
the hook is removed afterwards. The paper's word is one token (k = 1); a word a tokenizer splits
trains the embeddings of all its k tokens at those positions. The default "mb" is
not among BadNets' triggers (cf, mn, bb, tq), which a defender could not know, and a collision would
make the perturbation the trigger itself. Training and calibration both use the defender's
target-class held-out texts (the paper's protocol); batches keep the given order (no shuffling), so
the result is deterministic for a given model.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from pipeline import data as data_lib
from pipeline import evaluate as ev
from pipeline.defenses.strip import (
    DEFAULT_FRR,
    Counting,
    _binary_labels,
    calibrate_threshold,
    detection_auroc,
    metrics_by_counting,
)

logger = logging.getLogger(__name__)

DEFAULT_WORD = "mb"
DEFAULT_MIN_DROP = 0.1
DEFAULT_MAX_DROP = 0.3
DEFAULT_SCALE = 1.0
DEFAULT_LR = 1e-2
DEFAULT_EPOCHS = 5
DEFAULT_BATCH_SIZE = 32


def rap_tokens(tokenizer: Any, word: str) -> tuple[int, list[int]]:
    """Where ``word`` sits when it starts a text, and its token ids: (first position, ids).

    The position counts the tokens the tokenizer puts before the text (``[CLS]``, a BOS).

    Raises:
        ValueError: ``word`` is empty or has whitespace, or inserting it does not add a contiguous run
            of tokens in front of the text's own.
    """
    if not word or word.split() != [word]:
        raise ValueError(f"the RAP word must be one word without whitespace, got {word!r}")
    plain = list(tokenizer("x", add_special_tokens=True)["input_ids"])
    with_word = list(tokenizer(f"{word} x", add_special_tokens=True)["input_ids"])
    at = next((i for i, (a, b) in enumerate(zip(plain, with_word)) if a != b), len(plain))
    count = len(with_word) - len(plain)
    if count < 1 or with_word[:at] + with_word[at + count :] != plain:
        pieces = tokenizer.convert_ids_to_tokens(with_word)
        raise ValueError(
            f"inserting the RAP word {word!r} in front of a text gives {pieces}, not a run of tokens before "
            "the text's own; choose another rare word"
        )
    return at, [int(i) for i in with_word[at : at + count]]


def insert_word(texts: Sequence[str], word: str) -> list[str]:
    """``word`` inserted at the start of every text (RAP's position)."""
    return [f"{word} {text}" for text in texts]


@contextlib.contextmanager
def perturbation_hook(model: nn.Module, at: int, token_ids: Sequence[int], vectors: Tensor) -> Iterator[None]:
    """While active, embedding positions ``at .. at+k-1`` (the inserted word) are ``vectors`` (k, hidden).

    Every input must hold ``token_ids`` there (texts made by :func:`insert_word`, right padding);
    gradients flow into ``vectors``.
    """
    embedding = model.get_input_embeddings()
    count = len(token_ids)

    def replace(module: nn.Module, inputs: tuple[Any, ...], output: Tensor) -> Tensor:
        ids = inputs[0]  # (batch, seq)
        expected = torch.as_tensor(token_ids, device=ids.device)
        if ids.shape[1] < at + count or not bool((ids[:, at : at + count] == expected).all()):
            raise RuntimeError(f"RAP: an input does not hold the RAP word's tokens {list(token_ids)} at position {at}")
        word = vectors.to(output.dtype).unsqueeze(0).expand(output.shape[0], -1, -1)  # (batch, k, hidden)
        return torch.cat([output[:, :at], word, output[:, at + count :]], dim=1)  # (batch, seq, hidden)

    handle = embedding.register_forward_hook(replace)
    try:
        yield
    finally:
        handle.remove()


def _target_probs(model: nn.Module, tokenizer: Any, texts: list[str], target: int, *, max_length: int,
                  device: torch.device) -> Tensor:
    """p_t of every text, one batch (differentiable when a hooked vector requires grad)."""
    inputs = _encode(tokenizer, texts, max_length, device)
    output = model(**inputs)
    logits = output if isinstance(output, Tensor) else output.logits  # (b, num_labels)
    return torch.softmax(logits.float(), dim=-1)[:, target]  # (b,)


def probability_drops(
    model: nn.Module,
    tokenizer: Any,
    texts: Sequence[str],
    *,
    word: str,
    vector: Tensor,
    target_label: int,
    max_length: int,
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> tuple[Tensor, Tensor]:
    """d(x) = p_t(x) - p_t(word + x) with the word's embedding set to ``vector``, and argmax p(x).

    Returns:
        (drops, float64 (N,); predicted classes of the unperturbed texts, int64 (N,)).
    """
    at, token_ids = rap_tokens(tokenizer, word)
    device = next(model.parameters()).device
    texts = [str(t) for t in texts]
    drops, preds = [], []
    with ev.eval_mode(model), torch.no_grad():
        for start in range(0, len(texts), batch_size):
            chunk = texts[start : start + batch_size]
            batch = _encode(tokenizer, chunk, max_length, device)
            output = model(**batch)
            probs = torch.softmax((output if isinstance(output, Tensor) else output.logits).float(), dim=-1)
            with perturbation_hook(model, at, token_ids, vector.detach().to(device)):
                perturbed = _target_probs(model, tokenizer, insert_word(chunk, word), target_label,
                                          max_length=max_length, device=device)
            drops.append((probs[:, target_label] - perturbed).double().cpu())
            preds.append(probs.argmax(dim=-1).cpu())
    if not drops:
        return torch.empty(0, dtype=torch.float64), torch.empty(0, dtype=torch.long)
    return torch.cat(drops), torch.cat(preds)


def _encode(tokenizer: Any, texts: list[str], max_length: int, device: torch.device) -> dict[str, Tensor]:
    collate = data_lib.make_collator(tokenizer)
    encoded = tokenizer(texts, truncation=True, max_length=max_length, padding=False, return_token_type_ids=False)
    batch = collate([{"input_ids": i, "attention_mask": m} for i, m in zip(encoded["input_ids"], encoded["attention_mask"])])
    return {key: batch[key].to(device) for key in ev.MODEL_INPUT_KEYS if key in batch}


def rap_loss(drops: Tensor, *, min_drop: float, max_drop: float, scale: float) -> Tensor:
    """s * mean relu(a - d) + mean relu(d - b): zero when every drop lies in [a, b]."""
    return scale * torch.relu(min_drop - drops).mean() + torch.relu(drops - max_drop).mean()


def train_rap_vector(
    model: nn.Module,
    tokenizer: Any,
    texts: Sequence[str],
    *,
    target_label: int,
    max_length: int,
    word: str = DEFAULT_WORD,
    min_drop: float = DEFAULT_MIN_DROP,
    max_drop: float = DEFAULT_MAX_DROP,
    scale: float = DEFAULT_SCALE,
    lr: float = DEFAULT_LR,
    epochs: int = DEFAULT_EPOCHS,
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> tuple[Tensor, list[float]]:
    """Train the RAP word's embedding on clean texts of the target class; the model stays untouched.

    Args:
        model: The classifier (frozen here: only the returned vector is optimised).
        tokenizer: Its tokenizer.
        texts: Clean held-out texts labelled ``target_label`` (never test data).
        target_label: The protected class t.
        max_length: Truncation length, as in training.
        word: The RAP word, inserted at the start of each text.
        min_drop, max_drop: the wanted range [a, b] of d(x) = p_t(x) - p_t(word + x).
        scale: s, the weight of the lower hinge.
        lr: Step size of plain gradient descent on the vector.
        epochs: Passes over ``texts`` in their order.
        batch_size: Texts per step.

    Returns:
        (the trained embeddings of the word's k tokens, float32 (k, hidden) on the model's device;
        the mean loss of each epoch).

    Raises:
        ValueError: No texts, a bad range or hyper-parameter, or a word that cannot be inserted.
    """
    if not texts:
        raise ValueError("train_rap_vector needs clean held-out texts of the target class; got none")
    if not 0 <= min_drop < max_drop <= 1:
        raise ValueError(f"need 0 <= min_drop < max_drop <= 1, got min_drop={min_drop}, max_drop={max_drop}")
    for name, value in (("lr", lr), ("scale", scale)):
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
            raise ValueError(f"{name} must be a positive number, got {value!r}")
    if not (isinstance(epochs, int) and epochs > 0 and isinstance(batch_size, int) and batch_size > 0):
        raise ValueError(f"epochs and batch_size must be positive integers, got {epochs!r}, {batch_size!r}")
    at, token_ids = rap_tokens(tokenizer, word)
    embedding = model.get_input_embeddings()
    device = embedding.weight.device
    vector = embedding.weight[token_ids].detach().float().clone().requires_grad_(True)  # (k, hidden)
    texts = [str(t) for t in texts]
    history = []
    with ev.eval_mode(model):
        with torch.no_grad():
            clean = torch.cat([
                _target_probs(model, tokenizer, texts[s : s + batch_size], target_label, max_length=max_length, device=device)
                for s in range(0, len(texts), batch_size)
            ])  # (N,) p_t(x), fixed
        for epoch in range(epochs):
            losses = []
            for start in range(0, len(texts), batch_size):
                chunk = texts[start : start + batch_size]
                with torch.enable_grad(), perturbation_hook(model, at, token_ids, vector):
                    perturbed = _target_probs(model, tokenizer, insert_word(chunk, word), target_label,
                                              max_length=max_length, device=device)
                    loss = rap_loss(clean[start : start + batch_size] - perturbed,
                                    min_drop=min_drop, max_drop=max_drop, scale=scale)
                    (grad,) = torch.autograd.grad(loss, [vector])  # leaves every model .grad untouched
                with torch.no_grad():
                    vector -= lr * grad
                losses.append(loss.item() * len(chunk))
            history.append(sum(losses) / len(texts))
            logger.info("RAP epoch %d: loss %.4g", epoch, history[-1])
    return vector.detach(), history


def rap_evaluate(
    model: nn.Module,
    tokenizer: Any,
    *,
    clean_texts: Sequence[str],
    clean_labels: Tensor | Sequence[int],
    poison_texts: Sequence[str],
    target_label: int,
    held_out_texts: Sequence[str],
    held_out_labels: Tensor | Sequence[int],
    max_length: int,
    word: str = DEFAULT_WORD,
    min_drop: float = DEFAULT_MIN_DROP,
    max_drop: float = DEFAULT_MAX_DROP,
    scale: float = DEFAULT_SCALE,
    lr: float = DEFAULT_LR,
    epochs: int = DEFAULT_EPOCHS,
    frr: float = DEFAULT_FRR,
    counting: Counting = "flip",
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> dict[str, Any]:
    """Train the RAP vector and calibrate on clean held-out data, then flag and count on test data.

    Args:
        model, tokenizer: The binary classifier under test and its tokenizer.
        clean_texts, clean_labels: test-clean.
        poison_texts: test-poison (triggered, true label not the target).
        target_label: The attacker's target class t, 0 or 1.
        held_out_texts, held_out_labels: the defender's clean held-out data (dev-clean); only its
            rows labelled t are used, for training the vector and for the threshold.
        max_length: Truncation length, as in training.
        word, min_drop, max_drop, scale, lr, epochs, batch_size: see :func:`train_rap_vector`.
        frr: Preset false rejection rate on the held-out target-class rows.
        counting: ``"flip"`` (default, the MuScleLoRA authors') or ``"reject"``; both in ``by_counting``.

    Returns:
        Fractions in [0, 1]: ``cacc``, ``asr``, ``clean_fpr``, ``asr_minus_clean_fpr`` under
        ``counting``; ``by_counting``; ``undefended``; ``detection`` (threshold, realised calibration
        FRR, TPR on test-poison, FPR on test-clean, AUROC of -drop, mean drops); ``settings``;
        training ``loss_history``; ``num_clean``, ``num_poison``, ``num_calibration``.

    Raises:
        ValueError: Not a binary task, labels not 0/1, an empty split, no held-out row of class t.
    """
    if counting not in ("flip", "reject"):
        raise ValueError(f"counting must be 'flip' or 'reject', got {counting!r}")
    if target_label not in (0, 1):
        raise ValueError(f"RAP's counting is implemented for binary tasks: target_label must be 0 or 1, got {target_label!r}")
    labels = _binary_labels(clean_labels, "clean_labels")
    held_labels = _binary_labels(held_out_labels, "held_out_labels")
    if len(labels) != len(clean_texts) or len(held_labels) != len(held_out_texts):
        raise ValueError("texts and labels differ in length")
    if not clean_texts or not poison_texts:
        raise ValueError("rap_evaluate: test-clean and test-poison must not be empty")
    calibration = [str(t) for t, y in zip(held_out_texts, held_labels.tolist()) if y == target_label]
    if not calibration:
        raise ValueError(f"rap_evaluate: the held-out data has no row labelled {target_label}; RAP trains and calibrates on those")
    options = dict(word=word, target_label=target_label, max_length=max_length, batch_size=batch_size)
    vector, history = train_rap_vector(
        model, tokenizer, calibration, min_drop=min_drop, max_drop=max_drop, scale=scale, lr=lr, epochs=epochs, **options
    )
    calibration_d, _ = probability_drops(model, tokenizer, calibration, vector=vector, **options)
    threshold = calibrate_threshold(calibration_d, frr, method="quantile")
    clean_d, clean_preds = probability_drops(model, tokenizer, clean_texts, vector=vector, **options)
    poison_d, poison_preds = probability_drops(model, tokenizer, poison_texts, vector=vector, **options)
    clean_flags = (clean_preds == target_label) & (clean_d < threshold)
    poison_flags = (poison_preds == target_label) & (poison_d < threshold)
    by_counting = metrics_by_counting(clean_preds, clean_flags, labels, poison_preds, poison_flags,
                                      target_label=target_label)
    detection = {
        "threshold": threshold,
        "calibration_frr": (calibration_d < threshold).double().mean().item(),
        "tpr": poison_flags.double().mean().item(),
        "fpr": clean_flags.double().mean().item(),
        "auroc": detection_auroc(clean_d, poison_d),  # P(d(poison) < d(clean)): flagged by a small drop
        "num_flagged_clean": int(clean_flags.sum()),
        "num_flagged_poison": int(poison_flags.sum()),
        "mean_drop_calibration": calibration_d.mean().item(),
        "mean_drop_clean": clean_d.mean().item(),
        "mean_drop_poison": poison_d.mean().item(),
    }
    logger.info("RAP: threshold %.4g, TPR %.3f on test-poison, FPR %.3f on test-clean (target FRR %.3f)",
                threshold, detection["tpr"], detection["fpr"], frr)
    return {
        "defense": "rap",
        "counting": counting,
        **by_counting[counting],
        "by_counting": by_counting,
        "undefended": ev.backdoor_metrics(clean_preds, labels, poison_preds, target_label=target_label),
        "detection": detection,
        "loss_history": history,
        "settings": {"word": word, "min_drop": min_drop, "max_drop": max_drop, "scale": scale, "lr": lr,
                     "epochs": epochs, "frr": frr, "batch_size": batch_size},
        "num_clean": len(clean_texts),
        "num_poison": len(poison_texts),
        "num_calibration": len(calibration),
    }
