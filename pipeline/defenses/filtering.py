"""Pre-training data filtering defences: BKI and CUBE, baselines for MuScleLoRA (arXiv 2402.12026).

Both methods take a model fine-tuned on the (possibly poisoned) training set, flag suspicious
training rows from the model's representations, and return the rows to keep, so that a second
model can be trained on the filtered set. Neither reads ``poison_label``: the true poison flags
enter only :func:`filter_report`, which scores a filter for the report.

BKI, Backdoor Keyword Identification (Chen & Dai, "Mitigating backdoor attacks in LSTM-based text
classification systems by Backdoor Keyword Identification", Neurocomputing 452, 2021,
arXiv 2007.12070). With h(.) the model's final representation of a text and x = (w_1, ..., w_n)
a training sentence split on whitespace, x_{-i} = x without word i:

    s_i = || h(x) - h(x_{-i}) ||_inf                     importance of word i in x

Each sentence keeps its ``top_p`` most important words (p = 5) as (word, s_i) pairs; every pair is
one entry of a dataset-wide keyword dictionary (a word twice in a sentence's top p is counted
twice). For a keyword k with f_k entries and mean importance v_k over them,

    g(k) = log10(f_k) * v_k

and the keyword(s) with the largest g are the backdoor keywords. A sentence is removed when a
backdoor keyword is among its top-p keywords (``rule="top_p"``, the authors' rule) or, with
``rule="contains"``, when any of its words is a backdoor keyword. The importance score, p = 5, g(k)
and the removal rule follow the authors' released code (backdoor-keyword-identification, main.py),
which OpenBackdoor (Cui et al. 2022) also follows; h is there the BiLSTM's final output, here any
``encode_fn`` (for our classifiers :func:`model_representations`). The paper's full text was not
at hand when this was written: the formulas are the authors' code's, and any further term the paper
may describe for LSTM hidden states is not implemented. Ties are broken by position within a
sentence and alphabetically between keywords, so the result is deterministic.

CUBE (Cui, Yuan, He, Chen, Liu, Sun, "A Unified Evaluation of Textual Backdoor Learning: Frameworks
and Benchmarks", NeurIPS 2022 Datasets and Benchmarks, arXiv 2206.08514), as in OpenBackdoor's
``CUBEDefender``:

    1. e_j = representation of training row j by the model fine-tuned on the poisoned set;
    2. z_j = reduce(e_j): the reference reduces with PCA to 20 dimensions, then UMAP to 2
       (n_neighbors 100, min_dist 0);
    3. c_j = HDBSCAN(z) cluster id (min_samples 100; -1 = noise);
    4. for every label y with rows R_y = {j : y_j = y}: group R_y by c_j; keep the largest group;
       remove every other group G with |G| < drop_share * |R_y| (drop_share 0.5). A label whose
       rows all fall in one group loses nothing.

UMAP (umap-learn) is not a dependency of this project, so step 2 is substituted: ``reducer="tsne"``
(default) runs PCA to ``pca_components`` dimensions and then t-SNE (scikit-learn, perplexity 30,
about UMAP's 100 neighbours / 3) to ``reduce_to`` dimensions, the nearest scikit-learn analogue of
UMAP (a neighbour-graph embedding that pulls clusters apart); ``reducer="pca"`` projects linearly to
``reduce_to`` principal components. HDBSCAN is ``sklearn.cluster.HDBSCAN``. In step 4 noise points
form one more group by default (``noise="group"``, as in the reference, where -1 is just another
label); ``noise="keep"`` never removes them.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from datasets import Dataset
from torch import Tensor, nn
from tqdm.auto import tqdm

from pipeline.evaluate import eval_mode

logger = logging.getLogger(__name__)

EncodeFn = Callable[[list[str]], Tensor]
"""Maps a list of N texts to their representations, a float tensor of shape (N, H)."""

WordScore = tuple[str, float]
"""(word, importance s_i) of one word position of a sentence."""

BKI_TOP_P = 5
"""Keywords kept per sentence in the authors' code."""

CUBE_PCA_COMPONENTS = 20
"""PCA dimensions before the non-linear reduction (OpenBackdoor's ``dimension_reduction``)."""

CUBE_MIN_SAMPLES = 100
"""HDBSCAN ``min_samples`` of OpenBackdoor's CUBE."""

CUBE_DROP_SHARE = 0.5
"""A minority group is removed when it holds less than this share of its label's rows."""


@dataclass(frozen=True)
class FilterResult:
    """Which training rows a filter keeps and which it removes.

    Attributes:
        kept: Indices of the rows kept, ascending.
        removed: Indices of the rows removed, ascending; ``kept`` and ``removed`` partition
            ``range(num_rows)``.
        details: Method-specific findings (keywords, clusters, ...), JSON-serialisable.
    """

    kept: tuple[int, ...]
    removed: tuple[int, ...]
    details: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        kept, removed = tuple(int(i) for i in self.kept), tuple(int(i) for i in self.removed)
        object.__setattr__(self, "kept", kept)
        object.__setattr__(self, "removed", removed)
        for name, rows in (("kept", kept), ("removed", removed)):
            if any(b <= a for a, b in zip(rows, rows[1:])):
                raise ValueError(f"FilterResult.{name} must be strictly ascending, got {list(rows)[:20]}")
        total = len(kept) + len(removed)
        if sorted(kept + removed) != list(range(total)):
            overlap = sorted(set(kept) & set(removed))
            raise ValueError(
                f"FilterResult: kept ({len(kept)}) and removed ({len(removed)}) must partition "
                f"range({total}); shared indices {overlap[:10]}, out of range "
                f"{[i for i in kept + removed if not 0 <= i < total][:10]}"
            )

    @property
    def num_rows(self) -> int:
        """Number of rows the filter looked at."""
        return len(self.kept) + len(self.removed)

    @classmethod
    def from_removed(cls, num_rows: int, removed: Sequence[int], details: dict[str, Any]) -> FilterResult:
        """Build a result from the set of removed row indices.

        Args:
            num_rows: Number of rows filtered.
            removed: Indices to remove (any order, duplicates allowed).
            details: Method-specific findings.

        Returns:
            The result with ``kept`` = every other index.
        """
        gone = set(int(i) for i in removed)
        return cls(
            kept=tuple(i for i in range(num_rows) if i not in gone),
            removed=tuple(sorted(gone)),
            details=details,
        )


@dataclass(frozen=True)
class KeywordStat:
    """Dataset-wide BKI statistics of one keyword.

    Attributes:
        word: The keyword (a whitespace token as written in the data).
        frequency: f_k, how many top-p entries over all sentences are this word.
        mean_score: v_k, the mean importance s_i over those entries.
        salience: g(k) = log10(f_k) * v_k.
    """

    word: str
    frequency: int
    mean_score: float
    salience: float


def _check_positive(value: int, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _labels_list(labels: Sequence[int] | Tensor, num_rows: int, what: str) -> list[int]:
    values = labels.tolist() if isinstance(labels, Tensor) else list(labels)
    if len(values) != num_rows:
        raise ValueError(f"{what}: got {len(values)} labels for {num_rows} rows; pass one label per row")
    return [int(v) for v in values]


# ----------------------------------------------------------------------------- representations


def model_representations(
    model: nn.Module,
    tokenizer: Any,
    texts: Sequence[str],
    *,
    max_length: int,
    batch_size: int = 64,
    device: torch.device | str | None = None,
    pooling: Literal["first", "last"],
) -> Tensor:
    """Final-layer representation of every text by a classifier (no gradient, eval mode).

    The model runs with ``output_hidden_states=True``; the last hidden state (batch, seq, hidden)
    is pooled at the first non-padding token (``"first"``: [CLS] / ``<s>`` of BERT-family encoders,
    what OpenBackdoor's victims return) or at the last non-padding token (``"last"``: decoders,
    the token their classification head reads). Texts are tokenised like training does
    (truncation to ``max_length``, no token type ids) and padded per batch on the tokenizer's
    padding side; positions are located from the attention mask, so either side works. A text that
    tokenises to no token at all (an empty string under GPT-2's tokenizer) is represented by the
    single EOS token. The previous train/eval mode of every submodule is restored afterwards.

    Args:
        model: A classifier (plain, peft-wrapped or with MSLR layers) already on ``device``.
        tokenizer: Its tokenizer; needs a pad token id.
        texts: The texts.
        max_length: Truncation length in tokens.
        batch_size: Texts per forward pass.
        device: Where the inputs go (default: the device of the model's first parameter).
        pooling: ``"first"`` for encoders, ``"last"`` for decoders.

    Returns:
        A float32 CPU tensor of shape (len(texts), hidden).

    Raises:
        ValueError: Bad sizes or pooling, or the tokenizer has no pad token.
        TypeError: The model returned no hidden states.
    """
    _check_positive(max_length, "max_length")
    _check_positive(batch_size, "batch_size")
    if pooling not in ("first", "last"):
        raise ValueError(f"pooling must be 'first' (encoders) or 'last' (decoders), got {pooling!r}")
    if tokenizer.pad_token_id is None:
        raise ValueError(
            f"tokenizer {type(tokenizer).__name__} has no pad token; load it with "
            "pipeline.modeling.load_tokenizer (decoders pad with EOS)"
        )
    if device is None:
        device = next(model.parameters()).device
    texts = [str(text) for text in texts]
    parts: list[Tensor] = []
    with eval_mode(model):
        for start in range(0, len(texts), batch_size):
            input_ids, attention_mask = _pad_batch(tokenizer, texts[start : start + batch_size], max_length)
            output = model(
                input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), output_hidden_states=True
            )
            hidden_states = getattr(output, "hidden_states", None)
            if not hidden_states:
                raise TypeError(
                    f"{type(model).__name__} returned no hidden_states for output_hidden_states=True; "
                    "pass a transformers classifier or wrap the model so that it returns them"
                )
            hidden = hidden_states[-1]  # (b, seq, hidden)
            mask = attention_mask.to(hidden.device)
            positions = torch.arange(mask.shape[1], device=hidden.device)
            if pooling == "first":
                index = mask.argmax(dim=1)  # first position whose mask is 1
            else:
                index = (mask * positions).argmax(dim=1)  # last position whose mask is 1
            pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), index]  # (b, hidden)
            parts.append(pooled.float().cpu())
    if not parts:
        hidden_size = getattr(getattr(model, "config", None), "hidden_size", 0)
        return torch.empty(0, hidden_size)
    return torch.cat(parts)


def _pad_batch(tokenizer: Any, texts: list[str], max_length: int) -> tuple[Tensor, Tensor]:
    """Tokenise ``texts`` (truncated, no token type ids) and pad them into (ids, mask) tensors."""
    encoded = tokenizer(
        texts, truncation=True, max_length=max_length, padding=False, return_token_type_ids=False
    )["input_ids"]
    sequences = []
    for text, ids in zip(texts, encoded):
        if not ids:
            if tokenizer.eos_token_id is None:
                raise ValueError(f"text {text!r} tokenises to no tokens and the tokenizer has no EOS token")
            ids = [tokenizer.eos_token_id]
        sequences.append(list(ids))
    width = max(len(ids) for ids in sequences)
    input_ids = torch.full((len(sequences), width), int(tokenizer.pad_token_id), dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    left = getattr(tokenizer, "padding_side", "right") == "left"
    for row, ids in enumerate(sequences):
        span = slice(width - len(ids), width) if left else slice(0, len(ids))
        input_ids[row, span] = torch.tensor(ids, dtype=torch.long)
        attention_mask[row, span] = 1
    return input_ids, attention_mask


# ----------------------------------------------------------------------------- BKI


def _checked_encode(encode_fn: EncodeFn, texts: list[str], batch_size: int) -> Tensor:
    """``encode_fn`` over ``texts`` in chunks of ``batch_size``, checked to return (N, H)."""
    parts = []
    for start in range(0, len(texts), batch_size):
        chunk = texts[start : start + batch_size]
        reps = encode_fn(chunk)
        if not isinstance(reps, Tensor) or reps.dim() != 2 or reps.shape[0] != len(chunk):
            shape = tuple(reps.shape) if isinstance(reps, Tensor) else type(reps).__name__
            raise ValueError(
                f"encode_fn must return a tensor of shape ({len(chunk)}, hidden) for {len(chunk)} texts, "
                f"got {shape}"
            )
        parts.append(reps.detach().float().cpu())
    return torch.cat(parts)


def bki_scores(
    encode_fn: EncodeFn,
    texts: Sequence[str],
    *,
    top_p: int | None = BKI_TOP_P,
    batch_size: int = 64,
    progress: bool = False,
) -> list[list[WordScore]]:
    """The top-p keywords of every sentence by BKI importance s_i = ||h(x) - h(x_{-i})||_inf.

    Each sentence x is split on whitespace into words w_1..w_n; x_{-i} joins the other words with
    single spaces (the empty string for a one-word sentence). The sentence and its n deletions are
    encoded together; sentences are grouped so that one call of ``encode_fn`` sees about
    ``batch_size`` texts, and every text is encoded independently of its batch-mates as long as
    ``encode_fn`` is, so the scores do not depend on ``batch_size``.

    Args:
        encode_fn: List of texts -> representations (N, H) (see :func:`model_representations`).
        texts: Training sentences.
        top_p: Keywords kept per sentence (the authors: 5); None keeps every word.
        batch_size: Texts per ``encode_fn`` call.
        progress: Show a progress bar over sentences.

    Returns:
        For every sentence, its top-p (word, s_i) pairs by decreasing s_i (ties: earlier position
        first); an empty list for a sentence without words.

    Raises:
        ValueError: Bad ``top_p`` / ``batch_size``, or ``encode_fn`` returned a wrong shape.
    """
    if top_p is not None:
        _check_positive(top_p, "top_p")
    _check_positive(batch_size, "batch_size")
    words_of = [str(text).split() for text in texts]
    results: list[list[WordScore]] = [[] for _ in words_of]
    pending: list[int] = []
    pending_texts: list[str] = []

    def flush() -> None:
        reps = _checked_encode(encode_fn, pending_texts, batch_size)
        offset = 0
        for index in pending:
            words = words_of[index]
            block = reps[offset : offset + len(words) + 1]  # (1 + n, H): x, x_{-1}, ..., x_{-n}
            offset += len(words) + 1
            scores = (block[1:] - block[:1]).abs().amax(dim=1).tolist()  # ||h(x_{-i}) - h(x)||_inf
            order = sorted(range(len(words)), key=lambda i: (-scores[i], i))
            if top_p is not None:
                order = order[:top_p]
            results[index] = [(words[i], float(scores[i])) for i in order]
        pending.clear()
        pending_texts.clear()

    for index in tqdm(range(len(words_of)), desc="BKI", disable=not progress, leave=False):
        words = words_of[index]
        if not words:
            continue
        variants = [" ".join(words)] + [" ".join(words[:i] + words[i + 1 :]) for i in range(len(words))]
        if pending_texts and len(pending_texts) + len(variants) > batch_size:
            flush()
        pending.append(index)
        pending_texts.extend(variants)
    if pending:
        flush()
    return results


def bki_keywords(
    sentence_keywords: Sequence[Sequence[WordScore]], *, num_keywords: int | None = 1
) -> list[KeywordStat]:
    """Rank keywords by g(k) = log10(f_k) * v_k over all sentences' top-p keywords.

    Args:
        sentence_keywords: Per sentence, its (word, s_i) pairs (output of :func:`bki_scores`).
        num_keywords: How many of the best keywords to return (the authors: 1); None returns the
            whole ranking.

    Returns:
        Keyword statistics by decreasing g (ties: alphabetical).

    Raises:
        ValueError: ``num_keywords`` is not positive.
    """
    if num_keywords is not None:
        _check_positive(num_keywords, "num_keywords")
    scores: dict[str, list[float]] = {}
    for pairs in sentence_keywords:
        for word, score in pairs:
            scores.setdefault(word, []).append(float(score))
    stats = []
    for word, values in scores.items():
        mean = math.fsum(values) / len(values)
        stats.append(KeywordStat(word, len(values), mean, math.log10(len(values)) * mean))
    stats.sort(key=lambda stat: (-stat.salience, stat.word))
    return stats if num_keywords is None else stats[:num_keywords]


def bki_filter(
    texts: Sequence[str],
    labels: Sequence[int] | Tensor,
    *,
    encode_fn: EncodeFn,
    top_p: int | None = BKI_TOP_P,
    num_keywords: int = 1,
    rule: Literal["top_p", "contains"] = "top_p",
    batch_size: int = 64,
    progress: bool = False,
) -> FilterResult:
    """Backdoor Keyword Identification: find the backdoor keyword(s) and drop the rows they mark.

    Args:
        texts: Training sentences.
        labels: Their labels (used only to report removals per label; BKI ignores labels).
        encode_fn: List of texts -> representations (N, H) of the model trained on ``texts``.
        top_p: Keywords kept per sentence (the authors: 5).
        num_keywords: Number of backdoor keywords (the authors: 1).
        rule: ``"top_p"``: remove a sentence whose top-p keywords include a backdoor keyword
            (the authors); ``"contains"``: remove every sentence containing one as a word.
        batch_size: Texts per ``encode_fn`` call.
        progress: Show a progress bar.

    Returns:
        The kept / removed rows; ``details`` holds ``keywords`` (the chosen backdoor keywords with
        f, v and g), ``candidates`` (the 20 best-ranked keywords), ``removed_per_label`` and the
        settings.

    Raises:
        ValueError: Bad arguments or a label count that differs from the text count.
    """
    if rule not in ("top_p", "contains"):
        raise ValueError(f"rule must be 'top_p' or 'contains', got {rule!r}")
    label_values = _labels_list(labels, len(texts), "bki_filter")
    sentence_keywords = bki_scores(encode_fn, texts, top_p=top_p, batch_size=batch_size, progress=progress)
    ranking = bki_keywords(sentence_keywords, num_keywords=None)
    chosen = ranking[:num_keywords]
    backdoor = {stat.word for stat in chosen}
    if rule == "top_p":
        removed = [i for i, pairs in enumerate(sentence_keywords) if any(w in backdoor for w, _ in pairs)]
    else:
        removed = [i for i, text in enumerate(texts) if backdoor & set(str(text).split())]
    if chosen and chosen[0].salience <= 0:
        logger.warning(
            "BKI: the best keyword %r has g <= 0 (no keyword recurs); the filter is arbitrary", chosen[0].word
        )
    per_label = Counter(label_values[i] for i in removed)
    details = {
        "method": "bki",
        "top_p": top_p,
        "num_keywords": num_keywords,
        "rule": rule,
        "keywords": [vars(stat) for stat in chosen],
        "candidates": [vars(stat) for stat in ranking[:20]],
        "removed_per_label": {str(label): per_label[label] for label in sorted(set(label_values))},
    }
    logger.info(
        "BKI: backdoor keyword(s) %s; %d of %d rows removed",
        [stat.word for stat in chosen], len(set(removed)), len(texts),
    )
    return FilterResult.from_removed(len(texts), removed, details)


# ----------------------------------------------------------------------------- CUBE


def reduce_embeddings(
    embeddings: Tensor | np.ndarray,
    *,
    reducer: Literal["tsne", "pca"] = "tsne",
    reduce_to: int = 2,
    pca_components: int = CUBE_PCA_COMPONENTS,
    perplexity: float = 30.0,
    seed: int = 0,
) -> np.ndarray:
    """Reduce (N, H) representations for clustering (CUBE step 2, UMAP substituted).

    ``"pca"``: PCA to ``reduce_to`` components. ``"tsne"``: PCA to ``pca_components``, then
    Barnes-Hut t-SNE to ``reduce_to`` (<= 3) dimensions with perplexity min(``perplexity``,
    (N - 1) / 3), PCA initialisation. Component counts are capped at min(N, H). PCA uses the full
    SVD; t-SNE is seeded, so the result is reproducible for a fixed seed and thread count.

    Args:
        embeddings: Representations, shape (N, H), N >= 2.
        reducer: ``"tsne"`` or ``"pca"``.
        reduce_to: Output dimension.
        pca_components: PCA dimension before t-SNE.
        perplexity: t-SNE perplexity (upper bound).
        seed: Seed of PCA and t-SNE.

    Returns:
        float64 array of shape (N, d), d <= ``reduce_to``.

    Raises:
        ValueError: Bad shapes or settings.
    """
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE

    if isinstance(embeddings, Tensor):
        embeddings = embeddings.detach().cpu().double().numpy()
    data = np.asarray(embeddings, dtype=np.float64)
    if data.ndim != 2 or data.shape[0] < 2:
        raise ValueError(f"embeddings must have shape (N, H) with N >= 2, got {data.shape}")
    if not np.isfinite(data).all():
        raise ValueError("embeddings contain NaN or infinite values")
    _check_positive(reduce_to, "reduce_to")
    _check_positive(pca_components, "pca_components")
    cap = min(data.shape)
    if reducer == "pca":
        return PCA(n_components=min(reduce_to, cap), svd_solver="full", random_state=seed).fit_transform(data)
    if reducer != "tsne":
        raise ValueError(f"reducer must be 'tsne' or 'pca', got {reducer!r}")
    if reduce_to > 3:
        raise ValueError(
            f"reducer='tsne' supports reduce_to <= 3 (Barnes-Hut t-SNE), got {reduce_to}; use reducer='pca'"
        )
    if data.shape[0] < 4:
        raise ValueError(f"reducer='tsne' needs at least 4 rows, got {data.shape[0]}; use reducer='pca'")
    reduced = PCA(n_components=min(pca_components, cap), svd_solver="full", random_state=seed).fit_transform(data)
    effective = min(float(perplexity), (data.shape[0] - 1) / 3)
    tsne = TSNE(n_components=reduce_to, perplexity=effective, init="pca", random_state=seed, method="barnes_hut")
    return tsne.fit_transform(reduced).astype(np.float64)


def cube_select(
    clusters: Sequence[int] | np.ndarray,
    labels: Sequence[int] | Tensor,
    *,
    noise: Literal["group", "keep"] = "group",
    drop_share: float = CUBE_DROP_SHARE,
) -> tuple[list[int], dict[str, Any]]:
    """CUBE step 4: per label, keep the largest cluster group and remove small other groups.

    For every label y with rows R_y, rows are grouped by cluster id; the largest group is kept
    (ties: the smaller cluster id); every other group G is removed when |G| < drop_share * |R_y|.
    With ``noise="keep"`` rows of cluster -1 are left out of the grouping and never removed.

    Args:
        clusters: Cluster id of every row (-1: noise).
        labels: Label of every row.
        noise: ``"group"``: noise is one more group (the reference); ``"keep"``: noise is kept.
        drop_share: Share of a label's rows below which a minority group is removed.

    Returns:
        (removed row indices ascending, per-label statistics keyed by the label as a string:
        ``rows``, ``groups`` {cluster id: size}, ``kept_group``, ``removed_groups``).

    Raises:
        ValueError: Lengths differ or settings are out of range.
    """
    if noise not in ("group", "keep"):
        raise ValueError(f"noise must be 'group' or 'keep', got {noise!r}")
    if not 0 < drop_share <= 1:
        raise ValueError(f"drop_share must be in (0, 1], got {drop_share!r}")
    cluster_ids = [int(c) for c in clusters]
    label_values = _labels_list(labels, len(cluster_ids), "cube_select")
    removed: list[int] = []
    per_label: dict[str, Any] = {}
    for label in sorted(set(label_values)):
        rows = [i for i, y in enumerate(label_values) if y == label]
        sizes = Counter(cluster_ids[i] for i in rows if noise == "group" or cluster_ids[i] != -1)
        stats: dict[str, Any] = {
            "rows": len(rows),
            "groups": {str(c): n for c, n in sorted(sizes.items())},
            "kept_group": None,
            "removed_groups": [],
        }
        if sizes:
            largest = min(sizes, key=lambda c: (-sizes[c], c))
            stats["kept_group"] = largest
            for cluster, size in sorted(sizes.items()):
                if cluster != largest and size < drop_share * len(rows):
                    stats["removed_groups"].append(cluster)
                    removed.extend(i for i in rows if cluster_ids[i] == cluster)
        per_label[str(label)] = stats
    return sorted(removed), per_label


def cube_filter(
    embeddings: Tensor | np.ndarray,
    labels: Sequence[int] | Tensor,
    *,
    min_cluster_size: int = 5,
    min_samples: int | None = CUBE_MIN_SAMPLES,
    seed: int = 0,
    reduce_to: int = 2,
    reducer: Literal["tsne", "pca"] = "tsne",
    pca_components: int = CUBE_PCA_COMPONENTS,
    perplexity: float = 30.0,
    noise: Literal["group", "keep"] = "group",
    drop_share: float = CUBE_DROP_SHARE,
    allow_single_cluster: bool = False,
) -> FilterResult:
    """CUBE: reduce, cluster with HDBSCAN, keep each label's largest cluster (module docstring).

    Args:
        embeddings: Representations (N, H) of the training rows by the model trained on them.
        labels: Training labels (N).
        min_cluster_size: HDBSCAN ``min_cluster_size``.
        min_samples: HDBSCAN ``min_samples`` (the reference: 100); None = ``min_cluster_size``.
        seed: Seed of the dimension reduction (HDBSCAN itself is deterministic).
        reduce_to: Dimension after reduction.
        reducer: ``"tsne"`` (PCA then t-SNE, the stand-in for UMAP) or ``"pca"``.
        pca_components: PCA dimension before t-SNE.
        perplexity: t-SNE perplexity (capped at (N - 1) / 3).
        noise: How HDBSCAN noise enters the selection (:func:`cube_select`).
        drop_share: Minority groups below this share of their label are removed.
        allow_single_cluster: HDBSCAN ``allow_single_cluster``.

    Returns:
        The kept / removed rows; ``details`` holds the settings, ``num_clusters``, ``noise_rows``,
        ``cluster_sizes``, ``per_label`` (see :func:`cube_select`) and ``assignments`` (the cluster
        id of every row).

    Raises:
        ValueError: Bad shapes or settings, e.g. fewer rows than ``min_samples``.
    """
    from sklearn.cluster import HDBSCAN

    num_rows = int(embeddings.shape[0])
    label_values = _labels_list(labels, num_rows, "cube_filter")
    if isinstance(min_cluster_size, bool) or not isinstance(min_cluster_size, int) or min_cluster_size < 2:
        raise ValueError(f"min_cluster_size must be an integer >= 2, got {min_cluster_size!r}")
    if min_samples is not None:
        _check_positive(min_samples, "min_samples")
    needed = min_samples if min_samples is not None else min_cluster_size
    if num_rows < max(needed, min_cluster_size, 2):
        raise ValueError(
            f"cube_filter: {num_rows} rows but HDBSCAN needs at least min_samples={needed} and "
            f"min_cluster_size={min_cluster_size}; lower them (e.g. min_samples={max(2, num_rows // 10)})"
        )
    reduced = reduce_embeddings(
        embeddings, reducer=reducer, reduce_to=reduce_to, pca_components=pca_components,
        perplexity=perplexity, seed=seed,
    )
    clusterer = HDBSCAN(
        min_cluster_size=min_cluster_size,
        min_samples=min_samples,
        allow_single_cluster=allow_single_cluster,
        copy=True,
    )
    assignments = [int(c) for c in clusterer.fit_predict(reduced)]
    removed, per_label = cube_select(assignments, label_values, noise=noise, drop_share=drop_share)
    sizes = Counter(assignments)
    details = {
        "method": "cube",
        "reducer": reducer,
        "reduce_to": reduce_to,
        "pca_components": pca_components if reducer == "tsne" else None,
        "perplexity": perplexity if reducer == "tsne" else None,
        "min_cluster_size": min_cluster_size,
        "min_samples": min_samples,
        "allow_single_cluster": allow_single_cluster,
        "noise": noise,
        "drop_share": drop_share,
        "seed": seed,
        "num_clusters": len([c for c in sizes if c != -1]),
        "noise_rows": sizes.get(-1, 0),
        "cluster_sizes": {str(c): n for c, n in sorted(sizes.items())},
        "per_label": per_label,
        "assignments": assignments,
    }
    logger.info(
        "CUBE: %d clusters (+%d noise rows) over %d rows; %d rows removed",
        details["num_clusters"], details["noise_rows"], num_rows, len(removed),
    )
    return FilterResult.from_removed(num_rows, removed, details)


# ----------------------------------------------------------------------------- applying and scoring


def filter_training_rows(dataset: Dataset, result: FilterResult) -> Dataset:
    """The rows of ``dataset`` that ``result`` keeps, in their original order.

    Args:
        dataset: The dataset the filter looked at (same rows, same order).
        result: The filter's result.

    Returns:
        ``dataset.select(result.kept)`` with the indices materialised.

    Raises:
        ValueError: The dataset's length differs from the number of rows filtered.
    """
    if len(dataset) != result.num_rows:
        raise ValueError(
            f"filter_training_rows: the dataset has {len(dataset)} rows but the filter looked at "
            f"{result.num_rows}; filter and apply to the same rows"
        )
    return dataset.select(list(result.kept)).flatten_indices()


def filter_report(result: FilterResult, poison_labels: Sequence[int] | Tensor) -> dict[str, Any]:
    """Score a filter against the true poison flags (for reports only; never used to filter).

    With P the poisoned rows and R the removed rows:

        recall    = |P & R| / |P|     (None when there is no poisoned row)
        precision = |P & R| / |R|     (None when nothing was removed)

    Args:
        result: The filter's result.
        poison_labels: 1 for a poisoned row, 0 for a clean one, per row.

    Returns:
        Counts (``num_rows``, ``num_kept``, ``num_removed``, ``num_poison``, ``removed_poison``,
        ``removed_clean``, ``kept_poison``), ``recall``, ``precision`` and the poison rates before
        and after filtering.

    Raises:
        ValueError: Wrong length or a flag other than 0 / 1.
    """
    flags = _labels_list(poison_labels, result.num_rows, "filter_report")
    if any(flag not in (0, 1) for flag in flags):
        raise ValueError(f"poison_labels must be 0 or 1, got values {sorted(set(flags))}")
    num_poison = sum(flags)
    removed_poison = sum(flags[i] for i in result.removed)
    kept_poison = num_poison - removed_poison
    num_kept = len(result.kept)
    return {
        "num_rows": result.num_rows,
        "num_kept": num_kept,
        "num_removed": len(result.removed),
        "num_poison": num_poison,
        "removed_poison": removed_poison,
        "removed_clean": len(result.removed) - removed_poison,
        "kept_poison": kept_poison,
        "recall": removed_poison / num_poison if num_poison else None,
        "precision": removed_poison / len(result.removed) if result.removed else None,
        "poison_rate_before": num_poison / result.num_rows if result.num_rows else None,
        "poison_rate_after": kept_poison / num_kept if num_kept else None,
    }

