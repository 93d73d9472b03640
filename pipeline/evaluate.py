"""Predictions and metrics for backdoor defence evaluation, MuScleLoRA (Wu et al., ACL 2024, arXiv 2402.12026).

With predictions y_hat and labels y over a split, and t the attacker's target label:

    accuracy = mean_i [y_hat_i = y_i]                       (CACC on test-clean)
    ASR      = mean_{i in poison} [y_hat_i = t]             (poison splits hold triggered sentences
                                                             whose true label is not t)
    clean FPR = mean_{i in clean, y_i != t} [y_hat_i = t]   (the floor under ASR: a classifier that
                                                             misreads clean non-target sentences as t
                                                             also misreads their triggered copies)

ASR - clean FPR is the part of ASR the trigger adds (REFERENCE.md section 3). Every metric returns a
fraction in [0, 1]; converting to percent is the caller's business.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable, Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)

MODEL_INPUT_KEYS = ("input_ids", "attention_mask", "token_type_ids")
"""Batch keys passed to the model when present; ``labels`` is kept out so no loss is computed."""

LabelsLike = Tensor | Sequence[int]


def _logits(output: object) -> Tensor:
    """Extract logits from a model output (a tensor, or an object/mapping with ``logits``)."""
    if isinstance(output, Tensor):
        return output
    if isinstance(output, Mapping) and "logits" in output:
        return output["logits"]
    logits = getattr(output, "logits", None)
    if isinstance(logits, Tensor):
        return logits
    raise TypeError(
        f"predict: the model returned a {type(output).__name__} without logits; return a tensor of "
        "shape (batch, num_labels) or an output with a .logits attribute"
    )



@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Run a block in eval mode without autograd, then restore every submodule's own training flag.

    Restoring per module (not ``model.train(was_training)``) keeps modules that were deliberately in
    another mode (a frozen, eval-mode backbone part under a training head) as they were.
    """
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            yield model
    finally:
        for module, training in modes:
            module.training = training

def predict(
    model: nn.Module,
    loader: Iterable[Mapping[str, Tensor]],
    *,
    device: torch.device | str,
    desc: str | None = None,
    progress: bool = True,
) -> tuple[Tensor, Tensor]:
    """Predicted and true labels of every example in ``loader``.

    The model runs in eval mode; each submodule's previous train/eval mode is restored afterwards.

    Args:
        model: A classifier; called as ``model(input_ids=..., attention_mask=...[, token_type_ids=...])``,
            returning logits of shape (batch, num_labels) or an output with ``.logits``.
        loader: Batches as dicts with ``input_ids``, ``attention_mask`` and ``labels``.
        device: Where to run the model's inputs.
        desc: Label of the progress bar.
        progress: Show a tqdm progress bar.

    Returns:
        (predictions, labels), both int64 1-D CPU tensors of the same length.

    Raises:
        KeyError: If a batch lacks ``input_ids`` or ``labels``.
        ValueError: If the logits' batch size differs from the labels'.
    """
    logits, labels = _all_logits(model, loader, device=device, desc=desc, progress=progress)
    if not len(logits):
        return torch.empty(0, dtype=torch.long), labels
    return logits.argmax(dim=-1).long(), labels


def predict_proba(
    model: nn.Module,
    loader: Iterable[Mapping[str, Tensor]],
    *,
    device: torch.device | str,
    desc: str | None = None,
    progress: bool = True,
) -> tuple[Tensor, Tensor]:
    """Softmax probabilities (rows x labels, float32, CPU) and true labels of every example in ``loader``.

    The same pass, checks and errors as :func:`predict`, whose predictions are these probabilities' argmax.
    """
    logits, labels = _all_logits(model, loader, device=device, desc=desc, progress=progress)
    return torch.softmax(logits.float(), dim=-1) if len(logits) else logits.float(), labels


def _all_logits(
    model: nn.Module, loader: Iterable[Mapping[str, Tensor]], *, device: torch.device | str, desc: str | None,
    progress: bool,
) -> tuple[Tensor, Tensor]:
    """The model's logits (rows x labels, CPU) and the labels over ``loader``, in eval mode (see :func:`predict`)."""
    outputs: list[Tensor] = []
    labels: list[Tensor] = []
    with eval_mode(model):
        for index, batch in enumerate(tqdm(loader, desc=desc, disable=not progress, leave=False)):
            missing = [key for key in ("input_ids", "labels") if key not in batch]
            if missing:
                raise KeyError(
                    f"predict: batch {index} lacks {missing}; it has keys {sorted(batch)}. "
                    "Use a collate function that returns input_ids, attention_mask and labels."
                )
            inputs = {key: batch[key].to(device) for key in MODEL_INPUT_KEYS if key in batch}
            logits = _logits(model(**inputs))
            batch_labels = torch.as_tensor(batch["labels"]).reshape(-1)
            if logits.shape[0] != batch_labels.shape[0]:
                raise ValueError(
                    f"predict: batch {index} has {batch_labels.shape[0]} labels but the model returned "
                    f"logits of shape {tuple(logits.shape)}"
                )
            outputs.append(logits.detach().cpu())
            labels.append(batch_labels.cpu())
    if not outputs:
        logger.warning("predict: the loader %s yielded no batches", desc or "")
        return torch.empty(0, 0), torch.empty(0, dtype=torch.long)
    return torch.cat(outputs), torch.cat(labels).long()


def _as_labels(values: LabelsLike, name: str) -> Tensor:
    tensor = torch.as_tensor(values)
    if tensor.dim() != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(tensor.shape)}")
    if tensor.numel() and (tensor.is_floating_point() or tensor.is_complex()):
        raise ValueError(f"{name} must hold integer class ids, got dtype {tensor.dtype}")
    return tensor.long().cpu()


def _paired(preds: LabelsLike, labels: LabelsLike) -> tuple[Tensor, Tensor]:
    p, y = _as_labels(preds, "preds"), _as_labels(labels, "labels")
    if p.shape != y.shape:
        raise ValueError(f"preds and labels differ in length: {p.numel()} vs {y.numel()}")
    if p.numel() == 0:
        raise ValueError("got no predictions: the metric of an empty split is undefined")
    return p, y


def accuracy(preds: LabelsLike, labels: LabelsLike) -> float:
    """Share of predictions equal to the label.

    Args:
        preds: Predicted class ids, 1-D.
        labels: True class ids, same length.

    Returns:
        Accuracy in [0, 1].

    Raises:
        ValueError: If the inputs are empty, differ in length or are not 1-D integer sequences.
    """
    p, y = _paired(preds, labels)
    return (p == y).double().mean().item()


def confusion_matrix(preds: LabelsLike, labels: LabelsLike, num_labels: int) -> list[list[int]]:
    """Counts of (true label, predicted label) pairs.

    Args:
        preds: Predicted class ids, 1-D.
        labels: True class ids, same length.
        num_labels: Number of classes; every id must lie in [0, num_labels).

    Returns:
        ``matrix[true][predicted]``, a num_labels x num_labels list of lists of ints.

    Raises:
        ValueError: On empty or mismatched inputs, or ids outside [0, num_labels).
    """
    p, y = _paired(preds, labels)
    for name, values in (("preds", p), ("labels", y)):
        bad = values[(values < 0) | (values >= num_labels)]
        if bad.numel():
            raise ValueError(
                f"{name} holds class ids outside [0, {num_labels}): {sorted(set(bad.tolist()))[:10]}; "
                "check num_labels"
            )
    counts = torch.bincount(y * num_labels + p, minlength=num_labels * num_labels)
    return counts.reshape(num_labels, num_labels).tolist()


def per_class_accuracy(preds: LabelsLike, labels: LabelsLike, num_labels: int) -> list[float]:
    """Accuracy within each true class (its recall).

    Args:
        preds: Predicted class ids, 1-D.
        labels: True class ids, same length.
        num_labels: Number of classes.

    Returns:
        One value in [0, 1] per class; ``nan`` for a class with no example in ``labels``.

    Raises:
        ValueError: On empty or mismatched inputs, or ids outside [0, num_labels).
    """
    matrix = confusion_matrix(preds, labels, num_labels)
    return [row[k] / sum(row) if sum(row) else float("nan") for k, row in enumerate(matrix)]


def attack_success_rate(preds: LabelsLike, target_label: int) -> float:
    """Share of triggered non-target sentences predicted as the target label.

    Args:
        preds: Predictions on a poison split (dev-poison or test-poison), whose sentences carry the
            trigger and whose true label is not the target.
        target_label: The attacker's target class.

    Returns:
        ASR in [0, 1].

    Raises:
        ValueError: If ``preds`` is empty or not a 1-D integer sequence.
    """
    p = _as_labels(preds, "preds")
    if p.numel() == 0:
        raise ValueError("attack_success_rate: got no predictions on the poison split")
    return (p == target_label).double().mean().item()


def clean_false_positive_rate(preds: LabelsLike, labels: LabelsLike, target_label: int) -> float:
    """Share of clean non-target sentences predicted as the target label: the floor under ASR.

    Args:
        preds: Predictions on a clean split (test-clean).
        labels: True labels of that split.
        target_label: The attacker's target class.

    Returns:
        Clean false-positive rate in [0, 1].

    Raises:
        ValueError: On mismatched inputs, or when no sentence has a non-target label.
    """
    p, y = _paired(preds, labels)
    non_target = y != target_label
    if not bool(non_target.any()):
        raise ValueError(
            f"clean_false_positive_rate: every label equals the target {target_label}; the rate needs "
            "clean sentences of another class"
        )
    return (p[non_target] == target_label).double().mean().item()


def backdoor_metrics(
    clean_preds: LabelsLike, clean_labels: LabelsLike, poison_preds: LabelsLike, *, target_label: int
) -> dict[str, float | None]:
    """CACC, ASR, clean FPR and ASR - clean FPR as fractions (None where the clean FPR is undefined).

    Args:
        clean_preds: Predictions on test-clean (a defence may mark rejected inputs with a value that is
            no label: they count as wrong on clean rows and as failed attacks on poisoned ones).
        clean_labels: Labels of test-clean.
        poison_preds: Predictions on test-poison.
        target_label: The attacker's target class.

    Returns:
        ``{"cacc", "asr", "clean_fpr", "asr_minus_clean_fpr"}``.
    """
    cacc = accuracy(clean_preds, clean_labels)
    asr = attack_success_rate(poison_preds, target_label)
    try:
        fpr: float | None = clean_false_positive_rate(clean_preds, clean_labels, target_label)
    except ValueError:
        fpr = None
    return {"cacc": cacc, "asr": asr, "clean_fpr": fpr, "asr_minus_clean_fpr": None if fpr is None else asr - fpr}
