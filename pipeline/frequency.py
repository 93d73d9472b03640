"""Frequency (F-Principle) analysis of the clean and backdoor mappings, MuScleLoRA (Wu et al., ACL 2024, arXiv 2402.12026).

REFERENCE.md section 5. For a split of N samples:

    x_i    = input-embedding sequence of sample i (model.get_input_embeddings() of its tokens),
             zero-padded to the split's longest sequence and flattened: x in R^{N x (L*d)}
    D_ij   = ||x_i - x_j||_2
    G_ij   = exp(-D_ij / (2 sigma))     / sum_k exp(-D_ik / (2 sigma))       kind="authors" (default)
    G_ij   = exp(-D_ij^2 / (2 sigma))   / sum_k exp(-D_ik^2 / (2 sigma))     kind="gaussian"

The "gaussian" form is the filter of Xu et al.'s F-Principle, where sigma is the variance of the
Gaussian (the authors' code uses the unsquared distance with the same ``2 sigma``). With targets y
(one-hot labels, N x C) and outputs h (softmax, N x C):

    y_low  = G y,   y_high = y - y_low,   h_low = G h,   h_high = h - h_low
    e_low  = mean_i ||h_low_i - y_low_i|| / mean_i ||y_low_i||
    e_high = mean_i ||h_high_i - y_high_i|| / mean_i ||y_high_i||
    LFR    = mean_i ||h_low_i|| / mean_i ||h_i||,   HFR = mean_i ||h_high_i|| / mean_i ||h_i||

for each sigma of a grid (25 values evenly spaced in [2, 8]), and the mean over the grid. The
numerators of e_low / e_high are kept too (``low_error``, ``high_error``): when every target of a
split is the same class (dev-poison: every label is the attacker's target) G y = y, so y_high = 0
and e_high is 0/0. Such an undefined ratio is stored as None (JSON null), never as inf/nan.

Clean mapping = dev-clean, backdoor mapping = dev-poison. D is O(N^2 L d) to compute: it is built
once per split in row/column blocks (:func:`pairwise_distances`), kept in memory by
:class:`FrequencyProbe` and optionally cached as safetensors in the run directory, keyed by a hash of
the split's token ids, so a resumed run reuses it. The embeddings are those of the model when the
distances are first computed (the start of the run); with full fine-tuning they drift afterwards,
and the kernel deliberately stays fixed, as in the authors' analysis.

Padding: batches are padded per batch; every sample's real tokens (``attention_mask == 1``) are
taken in order and placed at positions 0..len_i-1 of a zero tensor of the split's longest length,
so pad-token embeddings count as zeros and left- and right-padded batches give the same x_i.

``frequency.json`` in a run directory (written with an atomic read-modify-write)::

    {"format_version": 1, "kernel": "authors", "sigmas": [2.0, 2.25, ..., 8.0],
     "splits": {"clean": {"num_samples": N, "key": "<sha256>", "target_low_norm": [...],
                          "target_high_norm": [...]}, "backdoor": {...}},
     "records": [{"global_step": 5, "epoch": 0,
                  "clean": {"e_low": [...25], "e_high": [...], "lfr": [...], "hfr": [...],
                            "low_error": [...], "high_error": [...],
                            "mean": {"e_low": x, "e_high": x, "lfr": x, "hfr": x,
                                     "low_error": x, "high_error": x}},
                  "backdoor": {...}}, ...]}

Nothing here imports torch.distributed or reads files at import time.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from pipeline import checkpoint as ckpt
from pipeline.evaluate import eval_mode

logger = logging.getLogger(__name__)

KernelKind = Literal["authors", "gaussian"]
KERNEL_KINDS: tuple[str, ...] = ("authors", "gaussian")
FREQUENCY_FILE = "frequency.json"
FORMAT_VERSION = 1
CONFIG_HINT = "analysis.frequency_every_steps=5"
"""The config override that enables the analysis during training (named in error messages)."""
SIGMA_BAND = (2.0, 8.0)
NUM_SIGMAS = 25
DEFAULT_CHUNK_SIZE = 256
_MODEL_INPUT_KEYS = ("input_ids", "attention_mask", "token_type_ids")
_STEP_FIELDS = ("e_low", "e_high", "lfr", "hfr", "low_error", "high_error")
_CANCELLATION_RTOL = 1e-6
"""Pairs with D^2 below this share of ||a||^2 + ||b||^2 are recomputed as ||a - b||^2 (no cancellation)."""
_UNDEFINED_RTOL = 1e-9
"""A component whose target norm is below this share of mean ||y|| has no defined relative error."""


def sigma_grid(low: float = SIGMA_BAND[0], high: float = SIGMA_BAND[1], num: int = NUM_SIGMAS) -> tuple[float, ...]:
    """``num`` kernel widths evenly spaced in [low, high] (default: 25 values in [2, 8], step 0.25).

    Raises:
        ValueError: ``num`` < 1, ``low`` <= 0 or ``high`` < ``low``.
    """
    if num < 1 or low <= 0 or high < low:
        raise ValueError(f"sigma_grid: need num >= 1 and 0 < low <= high, got low={low}, high={high}, num={num}")
    if num == 1:
        return (float(low),)
    return tuple(float(low + (high - low) * k / (num - 1)) for k in range(num))


# ----------------------------------------------------------------------------- inputs


def _model_inputs(batch: Mapping[str, Tensor], device: torch.device | str) -> dict[str, Tensor]:
    return {key: batch[key].to(device) for key in _MODEL_INPUT_KEYS if key in batch}


def _real_tokens(batch: Mapping[str, Tensor], index: int) -> Tensor:
    """Token ids of sample ``index`` of a batch without its padding (in order)."""
    ids = batch["input_ids"][index]
    mask = batch.get("attention_mask")
    return ids if mask is None else ids[mask[index].bool()]


def split_fingerprint(loader: Iterable[Mapping[str, Tensor]]) -> tuple[str, Tensor]:
    """Hash of a split's token ids (padding excluded, order kept) and its labels.

    Args:
        loader: Batches with ``input_ids``, ``labels`` and optionally ``attention_mask``; it must
            not shuffle.

    Returns:
        (sha256 hex digest, labels as an int64 1-D CPU tensor).

    Raises:
        KeyError: A batch lacks ``input_ids`` or ``labels``.
        ValueError: The loader yields no samples.
    """
    digest = hashlib.sha256()
    labels: list[Tensor] = []
    for number, batch in enumerate(loader):
        missing = [key for key in ("input_ids", "labels") if key not in batch]
        if missing:
            raise KeyError(f"split_fingerprint: batch {number} lacks {missing}; it has keys {sorted(batch)}")
        for i in range(batch["input_ids"].shape[0]):
            tokens = _real_tokens(batch, i).to("cpu", torch.int64)
            digest.update(len(tokens).to_bytes(8, "little"))
            digest.update(tokens.numpy().tobytes())
        labels.append(torch.as_tensor(batch["labels"]).reshape(-1).cpu().long())
    if not labels:
        raise ValueError("split_fingerprint: the loader yielded no batches")
    result = torch.cat(labels)
    digest.update(result.numpy().tobytes())
    return digest.hexdigest(), result


@torch.no_grad()
def embedding_matrix(
    model: nn.Module, loader: Iterable[Mapping[str, Tensor]], *, device: torch.device | str
) -> Tensor:
    """Flattened input-embedding sequences of a split, zero-padded to its longest sequence.

    Each sample's real tokens (``attention_mask == 1``) are embedded with
    ``model.get_input_embeddings()`` and placed at positions 0..len_i-1; every other position is
    zero, so per-batch padding and the padding side do not change x_i.

    Args:
        model: A model with ``get_input_embeddings()`` (transformers models, peft wrappers).
        loader: Batches with ``input_ids`` and optionally ``attention_mask``; must not shuffle.
        device: Where the embedding lookup runs.

    Returns:
        x, float32 CPU tensor of shape (N, L * d), L the longest real length in the split.

    Raises:
        ValueError: The loader yields no samples.
    """
    embed = model.get_input_embeddings()
    samples: list[Tensor] = []
    for batch in loader:
        input_ids = batch["input_ids"].to(device)
        vectors = embed(input_ids).float()  # (B, T, d)
        mask = batch.get("attention_mask")
        for i in range(input_ids.shape[0]):
            row = vectors[i] if mask is None else vectors[i][mask[i].to(device).bool()]
            samples.append(row.cpu())  # (len_i, d)
    if not samples:
        raise ValueError("embedding_matrix: the loader yielded no batches")
    length = max(s.shape[0] for s in samples)
    dim = samples[0].shape[1]
    x = torch.zeros(len(samples), length, dim, dtype=torch.float32)
    for i, sample in enumerate(samples):
        x[i, : sample.shape[0]] = sample
    return x.reshape(len(samples), length * dim)


def output_probabilities(
    model: nn.Module, loader: Iterable[Mapping[str, Tensor]], *, device: torch.device | str
) -> tuple[Tensor, Tensor]:
    """Softmax outputs and labels of a split, with the model in eval mode.

    Each submodule's train/eval mode is restored afterwards (as :func:`pipeline.evaluate.predict`)
    and the global CPU random state is left as it was, so calling this during training (on every
    rank, as ZeRO-3 needs) does not change the run.

    Args:
        model: A classifier returning logits (a tensor or an output with ``.logits``).
        loader: Batches with ``input_ids``, ``labels`` and optionally ``attention_mask`` /
            ``token_type_ids``.
        device: Where the model's inputs go.

    Returns:
        (probabilities float32 CPU (N, C), labels int64 CPU (N,)).

    Raises:
        ValueError: The loader yields no batches.
    """
    probabilities: list[Tensor] = []
    labels: list[Tensor] = []
    with eval_mode(model):
        with torch.random.fork_rng(devices=[]):  # iterating a DataLoader draws from the CPU generator
            for batch in loader:
                output = model(**_model_inputs(batch, device))
                logits = output if isinstance(output, Tensor) else output.logits
                probabilities.append(torch.softmax(logits.float(), dim=-1).cpu())
                labels.append(torch.as_tensor(batch["labels"]).reshape(-1).cpu().long())
    if not probabilities:
        raise ValueError("output_probabilities: the loader yielded no batches")
    return torch.cat(probabilities), torch.cat(labels)


# ----------------------------------------------------------------------------- distances and kernels


def pairwise_distances(
    x: Tensor, *, chunk_size: int = DEFAULT_CHUNK_SIZE, device: torch.device | str | None = None
) -> Tensor:
    """Euclidean distances between the rows of ``x``, computed block by block in float64.

    Each block uses ``||a||^2 + ||b||^2 - 2 <a, b>`` on rows centred on their mean (distances do not
    change, cancellation shrinks); pairs so close that the subtraction cancels most digits are
    recomputed as ``||a - b||^2``, so duplicate samples get exactly 0. Only blocks on and above the
    diagonal are computed and mirrored: the result is exactly symmetric with a zero diagonal. Peak
    extra memory is about ``2 * chunk_size * x.shape[1]`` float64 values plus a few
    ``chunk_size^2`` blocks.

    Args:
        x: (N, ...) samples; trailing dimensions are flattened.
        chunk_size: Rows per block.
        device: Where the blocks are computed (default: ``x``'s device).

    Returns:
        D, float64 CPU tensor (N, N).

    Raises:
        ValueError: ``chunk_size`` < 1 or ``x`` has no rows.
    """
    if chunk_size < 1:
        raise ValueError(f"pairwise_distances: chunk_size must be >= 1, got {chunk_size}")
    n = x.shape[0]
    if n == 0:
        raise ValueError("pairwise_distances: x has no rows")
    flat = x.reshape(n, -1)
    device = torch.device(device) if device is not None else flat.device
    starts = list(range(0, n, chunk_size))
    total = torch.zeros(flat.shape[1], dtype=torch.float64, device=device)
    for start in starts:
        total += flat[start : start + chunk_size].to(device, torch.float64).sum(0)
    centre = total / n

    def block(start: int) -> tuple[Tensor, Tensor]:
        rows = flat[start : start + chunk_size].to(device, torch.float64) - centre
        return rows, rows.pow(2).sum(1)

    out = torch.empty(n, n, dtype=torch.float64)
    for i, start_i in enumerate(starts):
        a, a_sq = block(start_i)
        for start_j in starts[i:]:
            b, b_sq = (a, a_sq) if start_j == start_i else block(start_j)
            scale = a_sq[:, None] + b_sq[None, :]
            squared = (scale - 2.0 * (a @ b.T)).clamp_(min=0.0)
            # Near-duplicate pairs lose their digits to cancellation: recompute them directly.
            close = (squared <= _CANCELLATION_RTOL * scale).nonzero()
            for first in range(0, close.shape[0], chunk_size):
                rows, cols = close[first : first + chunk_size].unbind(1)
                squared[rows, cols] = (a[rows] - b[cols]).pow(2).sum(1)
            if start_j == start_i:  # a @ a.T is symmetric only up to rounding
                squared = 0.5 * (squared + squared.T)
                squared.fill_diagonal_(0.0)
            dist = squared.sqrt_().cpu()
            out[start_i : start_i + a.shape[0], start_j : start_j + b.shape[0]] = dist
            out[start_j : start_j + b.shape[0], start_i : start_i + a.shape[0]] = dist.T
    return out


def kernel_weights(distances: Tensor, sigma: float, kind: KernelKind = "authors") -> Tensor:
    """Row-normalised kernel G of a distance matrix.

    ``authors``: G_ij proportional to exp(-D_ij / (2 sigma)); ``gaussian``: to exp(-D_ij^2 / (2 sigma)).
    Computed as a softmax over each row (the row maximum is subtracted in log space), so rows sum to
    1 and nothing underflows to an all-zero row.

    Args:
        distances: (N, N) non-negative distances.
        sigma: Kernel width, > 0.
        kind: "authors" (unsquared distance, default) or "gaussian" (squared distance).

    Returns:
        G, float64 (N, N) on the distances' device.

    Raises:
        ValueError: Unknown ``kind`` or ``sigma`` <= 0.
    """
    if kind not in KERNEL_KINDS:
        raise ValueError(f"kernel_weights: kind must be one of {KERNEL_KINDS}, got {kind!r}")
    if not sigma > 0:
        raise ValueError(f"kernel_weights: sigma must be > 0, got {sigma!r}")
    d = distances.to(torch.float64)
    energy = d if kind == "authors" else d * d
    return torch.softmax(-energy / (2.0 * sigma), dim=1)


@dataclass(frozen=True)
class FrequencyErrors:
    """Low/high-frequency errors of one mapping, one value per sigma.

    Attributes:
        sigmas: Kernel widths.
        e_low: Relative low-frequency error per sigma (None where mean ||y_low|| is ~0).
        e_high: Relative high-frequency error per sigma (None where mean ||y_high|| is ~0, e.g.
            a split whose labels are all one class).
        lfr: mean ||h_low|| / mean ||h|| per sigma.
        hfr: mean ||h_high|| / mean ||h|| per sigma.
        low_error: mean ||h_low - y_low|| per sigma (the numerator of e_low).
        high_error: mean ||h_high - y_high|| per sigma.
        target_low_norm: mean ||y_low|| per sigma (the denominator of e_low).
        target_high_norm: mean ||y_high|| per sigma.
    """

    sigmas: tuple[float, ...]
    e_low: tuple[float | None, ...]
    e_high: tuple[float | None, ...]
    lfr: tuple[float, ...]
    hfr: tuple[float, ...]
    low_error: tuple[float, ...]
    high_error: tuple[float, ...]
    target_low_norm: tuple[float, ...]
    target_high_norm: tuple[float, ...]

    def mean(self) -> dict[str, float | None]:
        """Each per-step quantity averaged over the sigma grid (None if any value is None)."""
        return {name: _mean_or_none(getattr(self, name)) for name in _STEP_FIELDS}

    def step_dict(self) -> dict[str, Any]:
        """The per-step quantities and their means, JSON-serialisable (a record's role entry)."""
        out: dict[str, Any] = {name: list(getattr(self, name)) for name in _STEP_FIELDS}
        out["mean"] = self.mean()
        return out


def _mean_or_none(values: Sequence[float | None]) -> float | None:
    if any(v is None for v in values):
        return None
    return sum(values) / len(values)  # type: ignore[arg-type]


def _ratio(numerator: float, denominator: float, scale: float) -> float | None:
    return numerator / denominator if denominator > _UNDEFINED_RTOL * scale else None


def frequency_errors(
    distances: Tensor,
    targets: Tensor,
    outputs: Tensor,
    *,
    sigmas: Sequence[float] | None = None,
    kind: KernelKind = "authors",
) -> FrequencyErrors:
    """Low/high-frequency relative errors of ``outputs`` against ``targets`` (module docstring).

    Args:
        distances: (N, N) pairwise distances of the split's inputs.
        targets: (N, C) targets (one-hot labels).
        outputs: (N, C) model outputs (softmax probabilities).
        sigmas: Kernel widths (default :func:`sigma_grid`: 25 values in [2, 8]).
        kind: "authors" (unsquared distance) or "gaussian" (squared distance).

    Returns:
        The per-sigma errors; all arithmetic in float64 on the distances' device.

    Raises:
        ValueError: Shapes disagree, or ``sigmas`` is empty.
    """
    sigmas = tuple(float(s) for s in (sigma_grid() if sigmas is None else sigmas))
    if not sigmas:
        raise ValueError("frequency_errors: sigmas is empty")
    n = distances.shape[0]
    if distances.shape != (n, n) or targets.dim() != 2 or targets.shape[0] != n or outputs.shape != targets.shape:
        raise ValueError(
            f"frequency_errors: expected distances (N, N), targets and outputs (N, C) with the same N; got "
            f"{tuple(distances.shape)}, {tuple(targets.shape)}, {tuple(outputs.shape)}"
        )
    device = distances.device
    y = targets.to(device, torch.float64)
    h = outputs.to(device, torch.float64)
    y_scale = float(y.norm(dim=1).mean())
    h_norm = float(h.norm(dim=1).mean())
    columns: dict[str, list[Any]] = {name: [] for name in (*_STEP_FIELDS, "target_low_norm", "target_high_norm")}
    for sigma in sigmas:
        g = kernel_weights(distances, sigma, kind)
        y_low = g @ y
        h_low = g @ h
        y_high = y - y_low
        h_high = h - h_low
        low_error = float((h_low - y_low).norm(dim=1).mean())
        high_error = float((h_high - y_high).norm(dim=1).mean())
        y_low_norm = float(y_low.norm(dim=1).mean())
        y_high_norm = float(y_high.norm(dim=1).mean())
        columns["e_low"].append(_ratio(low_error, y_low_norm, y_scale))
        columns["e_high"].append(_ratio(high_error, y_high_norm, y_scale))
        columns["lfr"].append(float(h_low.norm(dim=1).mean()) / h_norm if h_norm > 0 else math.nan)
        columns["hfr"].append(float(h_high.norm(dim=1).mean()) / h_norm if h_norm > 0 else math.nan)
        columns["low_error"].append(low_error)
        columns["high_error"].append(high_error)
        columns["target_low_norm"].append(y_low_norm)
        columns["target_high_norm"].append(y_high_norm)
    return FrequencyErrors(sigmas=sigmas, **{name: tuple(values) for name, values in columns.items()})


# ----------------------------------------------------------------------------- the probe


def _same_device(a: torch.device, b: torch.device) -> bool:
    return a.type == b.type and (a.index is None or b.index is None or a.index == b.index)


@dataclass
class SplitDistances:
    """A split's cached distance matrix and the labels it was built for.

    Attributes:
        distances: (N, N) float64 CPU distances.
        labels: (N,) int64 labels in loader order.
        key: sha256 of the split's token ids and labels (plus the embedding table's shape).
        warned: Which undefined-ratio warnings were already logged for this split.
        on_device: A copy of ``distances`` on the device last used by :meth:`FrequencyProbe.errors`.
    """

    distances: Tensor
    labels: Tensor
    key: str
    warned: set[str] = field(default_factory=set)
    on_device: Tensor | None = None


class FrequencyProbe:
    """Measures the clean and backdoor mappings' frequency errors during a run.

    The distance matrix of each split is computed once (on the first :meth:`prepare` or
    :meth:`measure` for that role), kept in memory and, with ``cache_dir``, saved as
    ``frequency_distances_<role>.safetensors`` and reused while the split's token ids match.

    Args:
        sigmas: Kernel widths (default: 25 values evenly spaced in [2, 8]).
        kind: "authors" (unsquared distance, default) or "gaussian" (squared distance).
        chunk_size: Rows per block of the distance computation.
        cache_dir: Directory for the distance cache (None: memory only).
        write_cache: Whether this process writes the cache (False on non-zero data-parallel ranks).
    """

    def __init__(
        self,
        *,
        sigmas: Sequence[float] | None = None,
        kind: KernelKind = "authors",
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        cache_dir: str | os.PathLike[str] | None = None,
        write_cache: bool = True,
    ) -> None:
        if kind not in KERNEL_KINDS:
            raise ValueError(f"FrequencyProbe: kind must be one of {KERNEL_KINDS}, got {kind!r}")
        if chunk_size < 1:
            raise ValueError(f"FrequencyProbe: chunk_size must be >= 1, got {chunk_size}")
        self.sigmas = tuple(float(s) for s in (sigma_grid() if sigmas is None else sigmas))
        if not self.sigmas or min(self.sigmas) <= 0:
            raise ValueError(f"FrequencyProbe: sigmas must be a non-empty list of positive widths, got {self.sigmas}")
        self.kind: KernelKind = kind
        self.chunk_size = chunk_size
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.write_cache = write_cache
        self.splits: dict[str, SplitDistances] = {}
        self._split_info: dict[str, dict[str, Any]] = {}

    def cache_path(self, role: str) -> Path | None:
        """Where the distance matrix of ``role`` is cached (None without ``cache_dir``)."""
        return self.cache_dir / f"frequency_distances_{role}.safetensors" if self.cache_dir is not None else None

    def prepare(
        self, role: str, model: nn.Module, loader: Iterable[Mapping[str, Tensor]], *, device: torch.device | str
    ) -> SplitDistances:
        """Distances of one split: from memory, from the cache file, or computed (and cached).

        The global CPU random state is left untouched (iterating a DataLoader draws from it).

        Args:
            role: Name of the mapping, e.g. "clean" (dev-clean) or "backdoor" (dev-poison).
            model: The model whose input embeddings define x_i.
            loader: The split's batches, not shuffled.
            device: Where the embedding lookup and the distance blocks run.

        Returns:
            The split's distances and labels.
        """
        if role in self.splits:
            return self.splits[role]
        with torch.random.fork_rng(devices=[]):
            key, labels = split_fingerprint(loader)
            embed = model.get_input_embeddings()
            shape = f"{getattr(embed, 'num_embeddings', '?')}x{getattr(embed, 'embedding_dim', '?')}"
            key = hashlib.sha256(f"{key}:{shape}".encode()).hexdigest()
            distances = self._load_cache(role, key, len(labels))
            if distances is None:
                x = embedding_matrix(model, loader, device=device)
                logger.info("frequency analysis: %s split, x is %d x %d; computing distances", role, *x.shape)
                distances = pairwise_distances(x, chunk_size=self.chunk_size, device=device)
                del x
                self._save_cache(role, key, distances, labels)
        split = SplitDistances(distances=distances, labels=labels, key=key)
        self.splits[role] = split
        self._split_info[role] = {"num_samples": len(labels), "key": key}
        return split

    def _load_cache(self, role: str, key: str, num_samples: int) -> Tensor | None:
        path = self.cache_path(role)
        if path is None or not path.is_file():
            return None
        saved_key = ckpt.read_tensor_metadata(path).get("key")
        if saved_key != key:
            logger.warning("frequency analysis: %s was built for other data (key %s); recomputing", path, saved_key)
            return None
        distances = ckpt.load_tensors(path)["distances"]
        if distances.shape != (num_samples, num_samples):
            logger.warning("frequency analysis: %s has shape %s, expected %d x %d; recomputing",
                           path, tuple(distances.shape), num_samples, num_samples)
            return None
        logger.info("frequency analysis: reusing the %s distances from %s", role, path)
        return distances.to(torch.float64)

    def _save_cache(self, role: str, key: str, distances: Tensor, labels: Tensor) -> None:
        path = self.cache_path(role)
        if path is None or not self.write_cache:
            return
        ckpt.save_tensors(
            path, {"distances": distances, "labels": labels},
            metadata={"key": key, "role": role, "format_version": str(FORMAT_VERSION)},
        )

    def header(self) -> dict[str, Any]:
        """The constant part of ``frequency.json``: format, kernel, sigmas and the prepared splits."""
        return {
            "format_version": FORMAT_VERSION,
            "kernel": self.kind,
            "sigmas": list(self.sigmas),
            "splits": {role: dict(info) for role, info in self._split_info.items()},
        }

    def errors(self, role: str, outputs: Tensor, labels: Tensor, *, device: torch.device | str | None = None) -> FrequencyErrors:
        """Frequency errors of given softmax outputs on a prepared split.

        Args:
            role: A role already passed to :meth:`prepare`.
            outputs: (N, C) softmax outputs in the split's order.
            labels: (N,) labels as the loader yielded them (checked against the prepared split).
            device: Where to compute (default CPU).

        Raises:
            KeyError: ``role`` was not prepared.
            ValueError: ``labels`` differ from those the distances were built for (a shuffled or
                different loader).
        """
        if role not in self.splits:
            raise KeyError(f"FrequencyProbe.errors: split {role!r} was not prepared; prepared: {sorted(self.splits)}")
        split = self.splits[role]
        if labels.shape != split.labels.shape or not torch.equal(labels.cpu().long(), split.labels):
            raise ValueError(
                f"FrequencyProbe: the {role} loader yielded {labels.numel()} labels that differ from the "
                f"{split.labels.numel()} the distances were built for; pass the same unshuffled loader every time"
            )
        distances = split.distances
        if device is not None and not _same_device(torch.device(device), distances.device):
            if split.on_device is None or not _same_device(torch.device(device), split.on_device.device):
                split.on_device = distances.to(device)
            distances = split.on_device
        targets = nn.functional.one_hot(split.labels, num_classes=outputs.shape[1])
        result = frequency_errors(distances, targets, outputs, sigmas=self.sigmas, kind=self.kind)
        for name in ("e_low", "e_high"):
            if None in getattr(result, name) and name not in split.warned:
                split.warned.add(name)
                logger.warning(
                    "frequency analysis: %s %s is undefined for some sigma (the targets have no %s-frequency "
                    "part, e.g. all labels are one class); stored as null, see %s_error for the absolute error",
                    role, name, name[2:], name[2:],
                )
        self._split_info[role].update(
            target_low_norm=list(result.target_low_norm), target_high_norm=list(result.target_high_norm)
        )
        return result

    def measure(
        self,
        model: nn.Module,
        loaders: Mapping[str, Iterable[Mapping[str, Tensor]]],
        *,
        device: torch.device | str,
        global_step: int,
        epoch: int | None = None,
    ) -> dict[str, Any]:
        """One record: the frequency errors of every split in ``loaders`` under the current model.

        Runs the model in eval mode (modes restored) without gradients and leaves the global CPU
        random state untouched, so enabling the analysis does not change the training run.

        Args:
            model: The classifier being trained.
            loaders: Role -> unshuffled loader, e.g. ``{"clean": dev_clean, "backdoor": dev_poison}``.
            device: Where the model runs (distances are computed there on first use).
            global_step: Optimiser steps taken so far.
            epoch: The current epoch (stored as given).

        Returns:
            ``{"global_step": s, "epoch": e, role: FrequencyErrors.step_dict(), ...}``.
        """
        record: dict[str, Any] = {"global_step": int(global_step), "epoch": epoch}
        for role, loader in loaders.items():
            if role in ("global_step", "epoch"):
                raise ValueError(f"FrequencyProbe.measure: {role!r} cannot be a split name")
            self.prepare(role, model, loader, device=device)
            outputs, labels = output_probabilities(model, loader, device=device)
            record[role] = self.errors(role, outputs, labels, device=device).step_dict()
        return record


# ----------------------------------------------------------------------------- frequency.json


def _frequency_path(run_dir: str | os.PathLike[str]) -> Path:
    path = Path(run_dir)
    return path if path.suffix == ".json" else path / FREQUENCY_FILE


def read_frequency_file(run_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """Load ``frequency.json`` of a run.

    Args:
        run_dir: The run directory (or the JSON file itself).

    Returns:
        The document (see the module docstring), records sorted by ``global_step``.

    Raises:
        FileNotFoundError: No ``frequency.json``: the run was trained without the analysis.
        ValueError: The file is not valid JSON or has another format version.
    """
    path = _frequency_path(run_dir)
    if not path.is_file():
        raise FileNotFoundError(
            f"no {FREQUENCY_FILE} at {path}: the run must be trained with the frequency analysis enabled, "
            f"e.g. with the config override {CONFIG_HINT}"
        )
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON (line {error.lineno}): {error.msg}") from error
    if not isinstance(doc, dict) or doc.get("format_version") != FORMAT_VERSION:
        version = doc.get("format_version") if isinstance(doc, dict) else None
        raise ValueError(f"{path}: format_version {version!r}, this code reads version {FORMAT_VERSION}")
    doc["records"] = sorted(doc.get("records", []), key=lambda r: r["global_step"])
    return doc


def _json_safe(value: Any) -> Any:
    """Non-finite floats become None (strict JSON has no NaN/inf)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def append_frequency_record(
    run_dir: str | os.PathLike[str], record: Mapping[str, Any], *, header: Mapping[str, Any]
) -> Path:
    """Add one record to ``run_dir/frequency.json`` (atomic read-modify-write).

    Records at or after ``record["global_step"]`` (left by an interrupted run that is now resumed)
    are dropped first, so the file holds each step once, in order.

    Args:
        run_dir: The run directory (or the JSON file itself).
        record: The output of :meth:`FrequencyProbe.measure`.
        header: :meth:`FrequencyProbe.header`; must agree with an existing file's kernel, sigmas
            and split keys.

    Returns:
        The path written.

    Raises:
        ValueError: The existing file was written with another kernel, sigma grid or data.
    """
    path = _frequency_path(run_dir)
    safe_header = _json_safe(dict(header))
    if path.is_file():
        doc = read_frequency_file(path)
        for name in ("kernel", "sigmas"):
            if doc.get(name) != safe_header.get(name):
                raise ValueError(
                    f"{path} was written with {name}={doc.get(name)!r}, this run uses {safe_header.get(name)!r}; "
                    "use a fresh output_dir or remove the file"
                )
        for role, info in safe_header.get("splits", {}).items():
            old = doc.get("splits", {}).get(role, {}).get("key")
            if old is not None and old != info.get("key"):
                raise ValueError(
                    f"{path}: the {role} split differs from the one the file was written for "
                    f"(key {old[:12]}... vs {str(info.get('key'))[:12]}...); use a fresh output_dir"
                )
        doc["splits"] = {**doc.get("splits", {}), **safe_header.get("splits", {})}
    else:
        doc = {**safe_header, "records": []}
    step = int(record["global_step"])
    doc["records"] = [r for r in doc["records"] if r["global_step"] < step] + [_json_safe(dict(record))]
    ckpt.atomic_write_json(path, doc)
    return path


def truncate_frequency_records(run_dir: str | os.PathLike[str], global_step: int) -> int:
    """On resume, drop records written after the checkpoint being resumed.

    Args:
        run_dir: The run directory (or the JSON file itself); a missing file is not an error.
        global_step: The resumed checkpoint's step; records with a larger step are dropped.

    Returns:
        The number of records dropped.
    """
    path = _frequency_path(run_dir)
    if not path.is_file():
        return 0
    doc = read_frequency_file(path)
    kept = [r for r in doc["records"] if r["global_step"] <= global_step]
    dropped = len(doc["records"]) - len(kept)
    if dropped:
        doc["records"] = kept
        ckpt.atomic_write_json(path, doc)
    return dropped


def frequency_series(
    doc: Mapping[str, Any],
    *,
    metric: Literal["relative", "absolute"] = "relative",
    sigma_index: int | None = None,
) -> tuple[list[int], dict[str, list[float | None]]]:
    """Per-step series for plotting, from a :func:`read_frequency_file` document.

    Args:
        doc: The loaded ``frequency.json``.
        metric: "relative" (e_low / e_high) or "absolute" (low_error / high_error).
        sigma_index: Index into the sigma grid; None for the mean over the grid.

    Returns:
        (global steps, ``{"<role>-low": [...], "<role>-high": [...]}`` for every role in the
        records); a missing or undefined value is None.

    Raises:
        ValueError: Unknown ``metric`` or ``sigma_index`` out of range.
    """
    if metric not in ("relative", "absolute"):
        raise ValueError(f"frequency_series: metric must be 'relative' or 'absolute', got {metric!r}")
    sigmas = doc.get("sigmas", [])
    if sigma_index is not None and not -len(sigmas) <= sigma_index < len(sigmas):
        raise ValueError(f"sigma index {sigma_index} is out of range: the file has {len(sigmas)} sigmas (0..{len(sigmas) - 1})")
    names = {"low": "e_low", "high": "e_high"} if metric == "relative" else {"low": "low_error", "high": "high_error"}
    records = doc.get("records", [])
    roles: list[str] = []
    for record in records:
        roles += [k for k in record if k not in ("global_step", "epoch") and k not in roles]
    steps = [int(r["global_step"]) for r in records]
    series: dict[str, list[float | None]] = {}
    for role in roles:
        for band, name in names.items():
            values: list[float | None] = []
            for record in records:
                entry = record.get(role)
                if entry is None:
                    values.append(None)
                elif sigma_index is None:
                    values.append(entry["mean"][name])
                else:
                    values.append(entry[name][sigma_index])
            series[f"{role}-{band}"] = values
    return steps, series
