"""Gradient alignment (GA) to a clean reference gradient, MuScleLoRA (Wu et al., ACL 2024, arXiv 2402.12026).

For every trainable tensor p, with g_p the gradient of the training (possibly poisoned) batch and r_p
the gradient of a clean reference batch, both flattened:

    a_p = |<g_p, r_p>| / ||r_p||^2 * r_p

i.e. the length of g_p's projection onto r_p, always pointed along r_p: a gradient that opposes the
clean direction still yields a step along it. Tensors with ||g_p|| = 0 or ||r_p|| = 0 have no defined
direction to align to; with ``fallback="raw"`` (the default) they keep g_p unchanged (the authors leave
them unaligned too).

A gate then picks the update (REFERENCE.md section 2.3, in this order), with
mean_ref_norm = mean of ||r_p|| over the tensors whose reference norm is non-zero:

    if mean_ref_norm > min_ref_grad_norm and ref_loss > min_ref_loss:  grad_p = a_p            ("align")
                                          (with raw_share = s > 0:  grad_p = (1 - s) a_p + s g_p)
    elif max_raw_ratio > 0 and epoch >= start_epoch:                   grad_p = (1 - rho) a_p + rho g_p
         rho = max_raw_ratio * (epoch - start_epoch) / (epochs - start_epoch)                ("mix")
    else, fallback = "raw" (default, the authors'):                    grad_p = g_p            ("raw")
    else, fallback = "skip":                                           grad_p = 0              ("skip")

With the default thresholds (0) the first branch reads "align whenever the reference gradient is
non-zero"; ``ref_loss=None`` skips the loss test.

``fallback="skip"`` never hands the raw (possibly poisoned) task gradient back by default: besides
replacing the "raw" gate by a zero update, it changes the tensors with ||r_p|| = 0 inside the other
gates:

    gate     ||r_p|| > 0                   ||r_p|| = 0, fallback="raw"   ||r_p|| = 0, fallback="skip"
    align    a_p                           g_p                           0
    mix      (1 - rho) a_p + rho g_p       g_p                           rho g_p
    raw      g_p                           g_p                           (gate is "skip": 0 everywhere)

``raw_share`` (default 0, the authors') mixes a constant share of the task gradient into the "align" gate on
every step: the lever "mix the raw gradient by a rule the canary shows is safe" (issue 11); its diagnostics
report ``raw_weight = raw_share``.

The mix gate's rho g_p part stays: mixing in the task gradient is an explicit choice (max_raw_ratio > 0),
and only the part that would stand in for the missing projection is dropped. A zero update is still
handed to the optimiser, which still steps: AdamW's momentum (from earlier non-zero updates) and its
decoupled weight decay still move the weights, the learning-rate schedule advances, and nothing about
the step count changes (a fresh optimiser with weight_decay = 0 leaves the weights unchanged).

The computation is split in two so that a data-parallel or ZeRO caller can reduce the per-tensor
statistics across ranks in a single collective before applying them:

    stats = gradient_statistics(task, reference)           # local dots and squared norms
    flat = stats.stacked()                                 # (3, P): all-reduce this one tensor (sum)
    result = apply_alignment(task, reference, GradientStatistics.from_stacked(flat), ...)

``align_gradients`` is that composition for one process. Everything here is pure: no I/O, no
``torch.distributed``, no model access. Tensors are ordered by sorted name, so every rank agrees on
the layout of the statistics vectors.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal, NamedTuple, get_args

import torch
from torch import Tensor

logger = logging.getLogger(__name__)

Gate = Literal["align", "mix", "raw", "skip"]
GATES: tuple[str, ...] = get_args(Gate)
Fallback = Literal["raw", "skip"]
FALLBACKS: tuple[str, ...] = get_args(Fallback)


@dataclass(frozen=True)
class AlignResult:
    """Outcome of one alignment step.

    Attributes:
        grads: The gradient to apply per parameter name, in the task gradient's dtype. For the "raw"
            gate (and for tensors left unaligned) these are the task tensors themselves, not copies;
            for the "skip" gate (and zero-reference tensors under ``fallback="skip"``) new zero tensors.
        gate: Which branch was taken: "align" (pure projection), "mix", "raw" (task gradient) or
            "skip" (zero update; only with ``fallback="skip"``).
        raw_weight: rho, the weight of the task gradient: raw_share (default 0) for "align", 0 for "skip", 1 for "raw".
        mean_cosine: Mean of cos(g_p, r_p) over tensors with both norms > 0 (0.0 when there is none).
        mean_ref_norm: Mean of ||r_p|| over tensors with a non-zero reference norm (0.0 when none).
        num_aligned: Number of tensors replaced by or mixed with their projection (0 for "raw" and
            "skip").
    """

    grads: dict[str, Tensor]
    gate: Gate
    raw_weight: float
    mean_cosine: float
    mean_ref_norm: float
    num_aligned: int


class GradientStatistics(NamedTuple):
    """Per-tensor statistics, 1-D tensors of length P in sorted-name order.

    Each entry is a sum over the tensor's elements, so partial statistics from shards or ranks add up
    to the full ones.

    Attributes:
        dots: <g_p, r_p>.
        task_sq_norms: ||g_p||^2.
        ref_sq_norms: ||r_p||^2.
    """

    dots: Tensor
    task_sq_norms: Tensor
    ref_sq_norms: Tensor

    def stacked(self) -> Tensor:
        """Return the statistics as one (3, P) tensor, for a single all-reduce."""
        return torch.stack([self.dots, self.task_sq_norms, self.ref_sq_norms])

    @classmethod
    def from_stacked(cls, stacked: Tensor) -> GradientStatistics:
        """Inverse of :meth:`stacked`.

        Args:
            stacked: A (3, P) tensor as returned by :meth:`stacked`.

        Returns:
            The statistics.

        Raises:
            ValueError: If ``stacked`` is not of shape (3, P).
        """
        if stacked.dim() != 2 or stacked.shape[0] != 3:
            raise ValueError(
                f"GradientStatistics.from_stacked expects a (3, P) tensor (dots, task_sq_norms, "
                f"ref_sq_norms), got shape {tuple(stacked.shape)}; pass the output of stacked()"
            )
        dots, task_sq_norms, ref_sq_norms = stacked.unbind(0)
        return cls(dots, task_sq_norms, ref_sq_norms)


def _accumulator_dtype(tensor: Tensor) -> torch.dtype:
    """Dtype for dot products and norms: float64 for float64 input, float32 otherwise.

    Half and bfloat16 values are exactly representable in float32, and float32 accumulation of their
    products is what every torch reduction does; float64 would double memory traffic for nothing.
    """
    return torch.float64 if tensor.dtype == torch.float64 else torch.float32


def _checked_names(task: Mapping[str, Tensor], reference: Mapping[str, Tensor]) -> list[str]:
    """Validate that both dicts pair up tensor by tensor and return the sorted names."""
    missing_in_reference = sorted(set(task) - set(reference))
    missing_in_task = sorted(set(reference) - set(task))
    if missing_in_reference or missing_in_task:
        raise ValueError(
            "gradient alignment: task and reference gradients must have the same parameter names; "
            f"missing in reference: {missing_in_reference}, missing in task: {missing_in_task}. "
            "Collect both gradients over the same trainable parameters."
        )
    names = sorted(task)
    if not names:
        raise ValueError(
            "gradient alignment: got no gradients (both dicts are empty); the model has no trainable "
            "parameters with a gradient"
        )
    for name in names:
        for label, grads in (("task", task), ("reference", reference)):
            value = grads[name]
            if value is None:
                raise ValueError(
                    f"gradient alignment: the {label} gradient of {name!r} is None; the parameter got "
                    "no gradient (unused in the forward pass?). Leave it out of both dicts or fill it "
                    "with zeros."
                )
            if not isinstance(value, Tensor):
                raise TypeError(
                    f"gradient alignment: the {label} gradient of {name!r} is a "
                    f"{type(value).__name__}, expected a torch.Tensor"
                )
        if task[name].shape != reference[name].shape:
            raise ValueError(
                f"gradient alignment: shape mismatch for {name!r}: task {tuple(task[name].shape)} vs "
                f"reference {tuple(reference[name].shape)}; both must be gradients of the same parameter"
            )
    return names


def gradient_statistics(
    task: Mapping[str, Tensor], reference: Mapping[str, Tensor]
) -> GradientStatistics:
    """Per-tensor dot products and squared norms of the task and reference gradients.

    Args:
        task: Gradient of the training loss per parameter name.
        reference: Gradient of the clean reference loss, same names and shapes.

    Returns:
        The statistics in sorted-name order, in float32 (float64 for float64 input), on the device of
        the first tensor. Nothing is copied to the host.

    Raises:
        ValueError: If the names differ, a shape differs, a value is None, or both dicts are empty.
        TypeError: If a value is not a tensor.
    """
    names = _checked_names(task, reference)
    device = task[names[0]].device
    dots, task_sq, ref_sq = [], [], []
    for name in names:
        acc = _accumulator_dtype(task[name])
        g = task[name].detach().reshape(-1).to(acc)
        r = reference[name].detach().reshape(-1).to(acc)
        dots.append(torch.dot(g, r).to(device))
        task_sq.append(torch.dot(g, g).to(device))
        ref_sq.append(torch.dot(r, r).to(device))
    common = torch.float64 if any(d.dtype == torch.float64 for d in dots) else torch.float32
    return GradientStatistics(
        torch.stack([d.to(common) for d in dots]),
        torch.stack([t.to(common) for t in task_sq]),
        torch.stack([r.to(common) for r in ref_sq]),
    )


def raw_weight_schedule(*, max_raw_ratio: float, epoch: int, start_epoch: int, epochs: int) -> float:
    """rho = max_raw_ratio * (epoch - start_epoch) / (epochs - start_epoch), the "mix" gate's weight.

    When ``epochs <= start_epoch`` the ramp has no length and rho is ``max_raw_ratio``.

    Args:
        max_raw_ratio: Upper bound of the task-gradient weight, in [0, 1].
        epoch: Current epoch, counted from 0, at least ``start_epoch``.
        start_epoch: First epoch of the ramp.
        epochs: Total number of epochs.

    Returns:
        rho in [0, max_raw_ratio] (larger only if ``epoch`` runs past ``epochs``).
    """
    if epochs <= start_epoch:
        return float(max_raw_ratio)
    return float(max_raw_ratio) * (epoch - start_epoch) / (epochs - start_epoch)


def _check_gate_arguments(max_raw_ratio: float, epoch: int, start_epoch: int, epochs: int, fallback: str) -> None:
    if fallback not in FALLBACKS:
        raise ValueError(
            f"gradient alignment: fallback must be one of {', '.join(repr(f) for f in FALLBACKS)}, got {fallback!r}"
        )
    if not 0.0 <= max_raw_ratio <= 1.0:
        raise ValueError(
            f"gradient alignment: max_raw_ratio must lie in [0, 1], got {max_raw_ratio}"
        )
    if epoch < 0 or start_epoch < 0 or epochs < 1:
        raise ValueError(
            "gradient alignment: need epoch >= 0, start_epoch >= 0 and epochs >= 1, got "
            f"epoch={epoch}, start_epoch={start_epoch}, epochs={epochs}"
        )


def apply_alignment(
    task: Mapping[str, Tensor],
    reference: Mapping[str, Tensor],
    statistics: GradientStatistics,
    *,
    ref_loss: float | None = None,
    min_ref_loss: float = 0.0,
    min_ref_grad_norm: float = 0.0,
    max_raw_ratio: float = 0.0,
    epoch: int = 0,
    start_epoch: int = 0,
    epochs: int = 1,
    fallback: Fallback = "raw",
    raw_share: float = 0.0,
) -> AlignResult:
    """Pick the gate and build the update from (possibly all-reduced) statistics.

    ``task`` and ``reference`` may be local shards of the full gradients as long as ``statistics``
    holds the full (summed) values: the update is elementwise given the per-tensor coefficients.
    The statistics are copied to the host once.

    Args:
        task: Gradient of the training loss per parameter name.
        reference: Gradient of the clean reference loss, same names and shapes.
        statistics: Output of :func:`gradient_statistics`, reduced across ranks if needed.
        ref_loss: Loss of the reference batch; None skips the loss test of the "align" gate.
        min_ref_loss: "align" needs ``ref_loss > min_ref_loss``.
        min_ref_grad_norm: "align" needs ``mean_ref_norm > min_ref_grad_norm``.
        max_raw_ratio: Cap of the task-gradient weight in the "mix" gate; 0 disables it.
        epoch: Current epoch, counted from 0.
        start_epoch: First epoch in which the "mix" gate may fire.
        epochs: Total number of epochs.
        fallback: What replaces "align" and "mix" when neither fires, and what a tensor with
            ||r_p|| = 0 gets inside them: "raw" (default, the authors') the task gradient g_p; "skip"
            a zero update (the mix gate keeps its rho g_p part). See the module docstring.
        raw_share: Constant share of the task gradient in the "align" gate's update, in [0, 1); 0 (default)
            is the pure projection a_p.

    Returns:
        The update and diagnostics.

    Raises:
        ValueError: On mismatched names/shapes, statistics of the wrong length, gate arguments
            out of range, or an unknown ``fallback``.
    """
    _check_gate_arguments(max_raw_ratio, epoch, start_epoch, epochs, fallback)
    if not 0.0 <= raw_share < 1.0:
        raise ValueError(f"gradient alignment: raw_share must lie in [0, 1), got {raw_share}")
    names = _checked_names(task, reference)
    for field, values in zip(statistics._fields, statistics, strict=True):
        if values.shape != (len(names),):
            raise ValueError(
                f"gradient alignment: statistics.{field} has shape {tuple(values.shape)}, expected "
                f"({len(names)},), one entry per parameter in sorted-name order"
            )
    dots, task_sq, ref_sq = statistics.stacked().double().cpu().tolist()  # the one host sync

    ref_norms = [math.sqrt(r) for r in ref_sq if r > 0]
    mean_ref_norm = sum(ref_norms) / len(ref_norms) if ref_norms else 0.0
    both = [i for i in range(len(names)) if task_sq[i] > 0 and ref_sq[i] > 0]
    cosines = [dots[i] / math.sqrt(task_sq[i] * ref_sq[i]) for i in both]
    mean_cosine = sum(cosines) / len(cosines) if cosines else 0.0

    gate: Gate
    if mean_ref_norm > min_ref_grad_norm and (ref_loss is None or ref_loss > min_ref_loss):
        gate, rho = "align", float(raw_share)
    elif max_raw_ratio > 0 and epoch >= start_epoch:
        gate = "mix"
        rho = raw_weight_schedule(
            max_raw_ratio=max_raw_ratio, epoch=epoch, start_epoch=start_epoch, epochs=epochs
        )
    elif fallback == "skip":
        gate, rho = "skip", 0.0
    else:
        gate, rho = "raw", 1.0

    grads: dict[str, Tensor] = {name: task[name] for name in names}
    if gate == "skip":
        grads = {name: torch.zeros_like(task[name]) for name in names}
    elif gate != "raw":
        for i in both:
            name = names[i]
            g, r = task[name], reference[name]
            coefficient = abs(dots[i]) / ref_sq[i]
            if gate == "align" and rho == 0.0:
                aligned = r.detach() * coefficient
            else:  # the mix gate, or "align" with a raw share: (1 - rho) a_p + rho g_p
                aligned = torch.add(g.detach() * rho, r.detach(), alpha=(1.0 - rho) * coefficient)
            grads[name] = aligned.to(g.dtype)
        if fallback == "skip":  # no projection to stand in for: drop g_p (the mix gate keeps rho g_p)
            for i in range(len(names)):
                if ref_sq[i] == 0:
                    g = task[names[i]]
                    grads[names[i]] = torch.zeros_like(g) if rho == 0.0 else (g.detach() * rho).to(g.dtype)
    num_aligned = len(both) if gate in ("align", "mix") else 0
    logger.debug(
        "alignment gate=%s rho=%.4f mean_cos=%.4f mean_ref_norm=%.3e aligned=%d/%d",
        gate, rho, mean_cosine, mean_ref_norm, num_aligned, len(names),
    )
    return AlignResult(
        grads=grads,
        gate=gate,
        raw_weight=rho,
        mean_cosine=mean_cosine,
        mean_ref_norm=mean_ref_norm,
        num_aligned=num_aligned,
    )


def align_gradients(
    task: Mapping[str, Tensor],
    reference: Mapping[str, Tensor],
    *,
    ref_loss: float | None = None,
    min_ref_loss: float = 0.0,
    min_ref_grad_norm: float = 0.0,
    max_raw_ratio: float = 0.0,
    epoch: int = 0,
    start_epoch: int = 0,
    epochs: int = 1,
    fallback: Fallback = "raw",
    raw_share: float = 0.0,
) -> AlignResult:
    """Align the task gradient to the clean reference gradient (single process).

    Called with just the two dicts it returns the pure alignment a_p for every tensor with non-zero
    task and reference norms (the others keep g_p with the default ``fallback="raw"``). See the module
    docstring for the gates.

    Args:
        task: Gradient of the training loss per parameter name (accumulated over micro-batches).
        reference: Gradient of the clean reference loss, same names and shapes.
        ref_loss: Loss of the reference batch; None skips the loss test of the "align" gate.
        min_ref_loss: "align" needs ``ref_loss > min_ref_loss`` (authors: 0.4 for encoders).
        min_ref_grad_norm: "align" needs ``mean_ref_norm > min_ref_grad_norm`` (authors: 5e-7).
        max_raw_ratio: Cap of the task-gradient weight in the "mix" gate (authors: 0.1 for encoders).
        epoch: Current epoch, counted from 0.
        start_epoch: First epoch in which the "mix" gate may fire (authors: 1).
        epochs: Total number of epochs.
        fallback: What replaces "align" and "mix" when neither fires, and what a tensor with
            ||r_p|| = 0 gets inside them: "raw" (default, the authors') the task gradient g_p; "skip"
            a zero update (the mix gate keeps its rho g_p part). See the module docstring.
        raw_share: Constant share of the task gradient in the "align" gate's update, in [0, 1); 0 (default)
            is the pure projection a_p.

    Returns:
        The update and diagnostics.

    Raises:
        ValueError: If the names differ, a shape differs, a value is None, a gate argument is out
            of range, or ``fallback`` is unknown.
        TypeError: If a value is not a tensor.
    """
    return apply_alignment(
        task,
        reference,
        gradient_statistics(task, reference),
        ref_loss=ref_loss,
        min_ref_loss=min_ref_loss,
        min_ref_grad_norm=min_ref_grad_norm,
        max_raw_ratio=max_raw_ratio,
        epoch=epoch,
        start_epoch=start_epoch,
        epochs=epochs,
        fallback=fallback,
        raw_share=raw_share,
    )
