"""ONION: outlier-word removal at inference time, a backdoor baseline for MuScleLoRA (arXiv 2402.12026).

ONION (Qi, Chen, Li, Yao, Liu, Sun, "ONION: A Simple and Effective Defense Against Textual Backdoor
Attacks", EMNLP 2021, arXiv 2011.10369). Inserted trigger words (BadNets' rare words, an AddSent
sentence) make a sentence less fluent; removing them lowers its perplexity. With a sentence split
on whitespace into words w_1..w_n, x_{-i} the sentence without w_i, and a causal language model:

    ppl(s)  = exp( (1/T) sum_{t=1..T} -log P_LM(s_t | s_<t) )     over the T predicted tokens of s
    p_0     = ppl(w_1 .. w_n),   p_i = ppl(x_{-i})
    f_i     = p_0 - p_i                                           (suspicion score of word i)
    filtered sentence = the words with f_i <= t, in order         (word i removed when f_i > t)

and the classifier sees the filtered sentence. Details:

- The LM is loaded from a local checkpoint (``AutoModelForCausalLM``, ``local_files_only=True``,
  no remote code); the paper uses GPT-2. When the tokenizer has a BOS token it does not add itself
  (GPT-2), it is prepended so that the first word is predicted too (the authors' code scores from
  the second token on). Sequences longer than ``max_length`` tokens are truncated.
- All p_0 and p_i of all sentences are computed in padded batches of ``batch_size`` sequences,
  sorted by length; padding is on the right and masked out of the attention and of the mean, so a
  perplexity does not depend on its batch. Log-probabilities are taken in float32 (float64 when the
  LM runs in float64), perplexities returned in float64.
- Threshold t: 0 by default, the MuScleLoRA authors' ONION configuration (baselineConfigs/Onion.json)
  and OpenBackdoor's default. The paper treats t as a hyper-parameter chosen on clean validation data
  (its released experiment script sweeps t over 1..100); :func:`select_onion_threshold` picks the
  smallest candidate whose clean held-out accuracy stays within ``max_drop`` of the unfiltered one.
  A word is removed when f_i > t strictly (the paper's rule; the authors' code removes at f_i >= t).
- A sentence with fewer than two words is left unchanged (its only word has no context; the
  authors' OpenBackdoor code drops such sentences from evaluation instead). A score that is
  undefined (a leave-one-out variant with no predicted token) never removes its word. A sentence
  from which nothing is removed is passed to the classifier exactly as given; otherwise the kept
  words are joined with single spaces (the empty string if every word is removed).

Metrics, with d_i the classifier's prediction on the filtered sentence and t the target label:
CACC = mean_{test-clean} [d_i = y_i], ASR = mean_{test-poison} [d_i = t], clean FPR =
mean_{test-clean, y_i != t} [d_i = t] (REFERENCE.md section 3), plus the mean number of words removed
per sentence on each split.

Perplexity cache (:class:`PerplexityCache`, ``launch/defend.py --lm-cache DIR``): attacks of one
dataset share test-clean and dev-clean, so the same sentences (and their leave-one-out variants) are
scored again in every attack's cell. A cache maps text -> perplexity (float64) for ONE language-model
identity, the fingerprint

    sha256( LM class, LM config JSON (path left out), sha256 over every parameter and buffer
            (name, dtype, shape, bytes), tokenizer (class, vocabulary size, the ids of a fixed probe
            string, the BOS-prepending decision), effective max_length, device type, torch and
            transformers versions )

and lives in ``DIR/<fingerprint[:32]>.json`` = {"format": 1, "fingerprint": ..., "perplexities":
{sha256(text): perplexity, or null for NaN}}. :func:`sentence_perplexities` with ``cache=`` computes
only the texts not in it (each distinct text once, in the usual sorted padded batches) and adds them.
A perplexity does not depend on its batch up to floating-point rounding (exactly the same in float64
to ~1e-12 relative; float32 matmuls over another padded width may differ in the last bits), so a
cached value equals a recomputed one to that rounding. The file is written atomically (temporary
file in the same folder, ``os.replace``) under an ``fcntl`` lock on ``<file>.lock``, merged with what
is on disk at that moment, so processes sharing the folder keep each other's entries; progress is
saved every ``save_every`` (2,000) new sequences and when scoring ends (also on an exception), so a
killed run keeps most of what it scored. An unreadable file, or one whose fingerprint differs from
its name's, is an error naming the file (delete it); the fingerprint is recomputed at every call
(about a second for SmolLM2-135M's 540 MB), so an LM changed in place never reads stale values.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from pipeline import evaluate as ev
from pipeline import modeling
from pipeline.checkpoint import atomic_write_json
from pipeline.defenses.strip import PredictProba, checked_proba

logger = logging.getLogger(__name__)

DEFAULT_THRESHOLD = 0.0
DEFAULT_BATCH_SIZE = 32
DEFAULT_MAX_DROP = 0.02
DEFAULT_CANDIDATES: tuple[float, ...] = tuple(float(t) for t in range(0, 101))
"""Thresholds :func:`select_onion_threshold` tries by default: 0, 1, ..., 100."""
CACHE_FORMAT = 1
DEFAULT_SAVE_EVERY = 2000
"""New sequences after which :func:`sentence_perplexities` saves a :class:`PerplexityCache`."""
_TOKENIZER_PROBE = "ONION probe: the movie's 12 scenes -- naive, cafe; 'quite' good!? <unk> ÄéØ 你好"


def load_onion_lm(
    path: str | Path, device: torch.device | str = "cpu", *, dtype: torch.dtype = torch.float32
) -> tuple[nn.Module, Any]:
    """Load ONION's causal language model and its tokenizer from a local checkpoint.

    Args:
        path: Directory of a Hugging Face causal LM checkpoint (e.g. GPT-2), with its tokenizer.
        device: Where the LM goes.
        dtype: Parameter dtype of the LM.

    Returns:
        (the LM in eval mode on ``device``, its tokenizer).

    Raises:
        FileNotFoundError: ``path`` does not exist or holds no ``config.json``.
        ValueError: The checkpoint is not a causal (decoder-only) language model.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model_path = modeling.resolve_model_path(path)
    except (FileNotFoundError, ModuleNotFoundError) as error:
        raise FileNotFoundError(f"ONION language model {str(path)!r}: {error}") from error
    info = modeling.read_model_info(model_path)
    if not info.is_decoder:
        raise ValueError(
            f"ONION language model {str(model_path)!r} has model_type {info.model_type!r}, which is not a "
            "causal (decoder-only) language model; ONION scores words by the perplexity of a causal LM "
            "(the paper uses GPT-2): pass the directory of e.g. a GPT-2 checkpoint with --lm"
        )
    lm = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype, local_files_only=True, trust_remote_code=False)
    tokenizer = AutoTokenizer.from_pretrained(model_path, local_files_only=True, trust_remote_code=False)
    lm.to(device)
    lm.eval()
    logger.info("ONION language model %s (%s) on %s", model_path, info.model_type, device)
    return lm, tokenizer


def _lm_max_length(lm: nn.Module) -> int | None:
    config = getattr(lm, "config", None)
    for key in ("n_positions", "max_position_embeddings"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _bos_to_prepend(tokenizer: Any) -> int | None:
    """The BOS id when the tokenizer has one and does not add it itself, else None."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return None
    probe = tokenizer("a")["input_ids"]
    return None if probe and probe[0] == bos else int(bos)


def _token_ids(texts: list[str], tokenizer: Any, max_length: int | None) -> list[list[int]]:
    bos = _bos_to_prepend(tokenizer)
    encoded = tokenizer(texts, padding=False, truncation=False)["input_ids"] if texts else []
    sequences = []
    for ids in encoded:
        ids = ([bos] if bos is not None else []) + list(ids)
        sequences.append(ids[:max_length] if max_length is not None else ids)
    return sequences



class PerplexityCacheError(ValueError):
    """A perplexity cache file that cannot be used (unreadable, malformed, or for another LM)."""


def _effective_max_length(lm: nn.Module, max_length: int | None) -> int | None:
    if max_length is None:
        return _lm_max_length(lm)
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1:
        raise ValueError(f"max_length must be a positive integer or None, got {max_length!r}")
    return max_length


def lm_fingerprint(lm: nn.Module, tokenizer: Any, *, max_length: int | None = None) -> str:
    """sha256 hex digest of everything a perplexity from :func:`sentence_perplexities` depends on.

    Args:
        lm: The causal LM.
        tokenizer: Its tokenizer.
        max_length: Truncation in tokens (None: the LM's position limit, as in scoring).

    Returns:
        64 hex characters (see the module docstring for what enters it).
    """
    import transformers

    weights = hashlib.sha256()
    tensors = [*lm.named_parameters(), *(("buffer:" + name, b) for name, b in lm.named_buffers())]
    for name, tensor in tensors:
        tensor = tensor.detach().cpu().contiguous()
        weights.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        weights.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    config = getattr(lm, "config", None)
    config_dict = config.to_dict() if config is not None and hasattr(config, "to_dict") else {}
    config_dict.pop("_name_or_path", None)
    devices = {p.device.type for p in lm.parameters()}
    identity = {
        "format": CACHE_FORMAT,
        "lm_class": f"{type(lm).__module__}.{type(lm).__qualname__}",
        "lm_config": json.loads(json.dumps(config_dict, sort_keys=True, default=str)),
        "weights": weights.hexdigest(),
        "tokenizer": {
            "class": type(tokenizer).__name__,
            "vocab_size": getattr(tokenizer, "vocab_size", None),
            "len": len(tokenizer) if hasattr(tokenizer, "__len__") else None,
            "probe_ids": [int(i) for i in tokenizer(_TOKENIZER_PROBE)["input_ids"]],
            "bos_prepended": _bos_to_prepend(tokenizer),
        },
        "max_length": _effective_max_length(lm, max_length),
        "device_type": sorted(devices),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


def _text_key(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


class PerplexityCache:
    """On-disk text -> perplexity map for one LM identity (see the module docstring).

    Open it with :meth:`for_lm`; pass it as ``cache=`` to :func:`sentence_perplexities` (or
    :func:`suspicion_scores`, :func:`onion_filter`, :func:`onion_evaluate`), which reads, fills and
    saves it.

    Attributes:
        fingerprint: The LM identity (:func:`lm_fingerprint`).
        path: ``<directory>/<fingerprint[:32]>.json``.
        save_every: New entries after which :func:`sentence_perplexities` saves.
    """

    def __init__(self, directory: str | Path, fingerprint: str, *, save_every: int = DEFAULT_SAVE_EVERY) -> None:
        """Open (or start) the cache file of ``fingerprint`` in ``directory``.

        Args:
            directory: Cache folder (created on the first save).
            fingerprint: The LM identity, 64 hex characters.
            save_every: Save after this many new entries during scoring.

        Raises:
            PerplexityCacheError: The file exists but is unreadable, malformed or for another fingerprint.
            ValueError: A bad ``fingerprint`` or ``save_every``.
        """
        if not isinstance(fingerprint, str) or len(fingerprint) != 64:
            raise ValueError(f"fingerprint must be a sha256 hex digest (64 characters), got {fingerprint!r}")
        if isinstance(save_every, bool) or not isinstance(save_every, int) or save_every < 1:
            raise ValueError(f"save_every must be a positive integer, got {save_every!r}")
        self.fingerprint = fingerprint
        self.path = Path(directory).expanduser() / f"{fingerprint[:32]}.json"
        self.save_every = save_every
        self._values: dict[str, float] = self._read()
        self._unsaved = 0

    @classmethod
    def for_lm(
        cls,
        directory: str | Path,
        lm: nn.Module,
        tokenizer: Any,
        *,
        max_length: int | None = None,
        save_every: int = DEFAULT_SAVE_EVERY,
    ) -> PerplexityCache:
        """The cache of ``lm`` / ``tokenizer`` / ``max_length`` in ``directory``.

        Args:
            directory: Cache folder.
            lm: The causal LM.
            tokenizer: Its tokenizer.
            max_length: Truncation in tokens, as passed to :func:`sentence_perplexities`.
            save_every: Save after this many new entries during scoring.

        Returns:
            The cache, holding what its file holds.
        """
        cache = cls(directory, lm_fingerprint(lm, tokenizer, max_length=max_length), save_every=save_every)
        logger.info("ONION perplexity cache %s: %d entries", cache.path, len(cache))
        return cache

    def _read(self) -> dict[str, float]:
        """The perplexities in the file ({} if there is none)."""
        fix = "delete it to start the cache again"
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return {}
        except OSError as error:
            raise PerplexityCacheError(f"ONION perplexity cache {self.path}: cannot read it ({error}); {fix}") from error
        try:
            data = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise PerplexityCacheError(f"ONION perplexity cache {self.path} is not valid JSON ({error}); {fix}") from error
        if not isinstance(data, dict) or set(data) != {"format", "fingerprint", "perplexities"}:
            keys = sorted(data) if isinstance(data, dict) else type(data).__name__
            raise PerplexityCacheError(
                f"ONION perplexity cache {self.path}: expected an object with keys format, fingerprint, "
                f"perplexities, got {keys}; {fix}"
            )
        if data["format"] != CACHE_FORMAT:
            raise PerplexityCacheError(
                f"ONION perplexity cache {self.path} has format {data['format']!r}, expected {CACHE_FORMAT}; {fix}"
            )
        if data["fingerprint"] != self.fingerprint:
            raise PerplexityCacheError(
                f"ONION perplexity cache {self.path} holds fingerprint {data['fingerprint']!r}, not this language "
                f"model's {self.fingerprint!r} (a file name collision or an edited file); {fix}"
            )
        values = data["perplexities"]
        if not isinstance(values, dict):
            raise PerplexityCacheError(f"ONION perplexity cache {self.path}: perplexities is not an object; {fix}")
        out = {}
        for key, value in values.items():
            if value is None:
                out[key] = math.nan
            elif isinstance(value, (int, float)) and not isinstance(value, bool) and len(key) == 64:
                out[key] = float(value)
            else:
                raise PerplexityCacheError(
                    f"ONION perplexity cache {self.path}: entry {key!r} = {value!r} is not a perplexity; {fix}"
                )
        return out

    def __len__(self) -> int:
        return len(self._values)

    def __contains__(self, text: object) -> bool:
        return isinstance(text, str) and _text_key(text) in self._values

    def get(self, text: str) -> float:
        """The cached perplexity of ``text`` (NaN for a text with no predicted token).

        Raises:
            KeyError: ``text`` is not cached.
        """
        return self._values[_text_key(text)]

    def add(self, text: str, perplexity: float) -> None:
        """Record the perplexity of ``text`` (saved by the next :meth:`save`)."""
        self._values[_text_key(text)] = float(perplexity)
        self._unsaved += 1

    @property
    def unsaved(self) -> int:
        """Entries added since the last :meth:`save`."""
        return self._unsaved

    def save(self) -> None:
        """Merge with the file on disk and write it atomically, under the folder's lock file.

        Entries already on disk are kept (another process may have added them); this cache then
        also holds them.

        Raises:
            PerplexityCacheError: The file on disk became unusable.
        """
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_name(self.path.name + ".lock"), "a") as lock:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
            try:
                for key, value in self._read().items():
                    self._values.setdefault(key, value)
                atomic_write_json(self.path, {
                    "format": CACHE_FORMAT,
                    "fingerprint": self.fingerprint,
                    "perplexities": {k: (None if math.isnan(v) else v) for k, v in self._values.items()},
                })
            finally:
                fcntl.flock(lock.fileno(), fcntl.LOCK_UN)
        self._unsaved = 0
        logger.debug("ONION perplexity cache %s: saved %d entries", self.path, len(self._values))


@torch.no_grad()
def _score_batches(
    texts: list[str],
    lm: nn.Module,
    tokenizer: Any,
    *,
    batch_size: int,
    device: torch.device | str,
    max_length: int | None,
    progress: bool,
    on_batch: Callable[[list[int], Tensor], None] | None = None,
) -> Tensor:
    """Perplexities of ``texts`` in sorted padded batches; ``on_batch(rows, perplexities)`` after each."""
    sequences = _token_ids(texts, tokenizer, max_length)
    # Any valid id: padding is masked out of attention and of the mean.
    candidates = (getattr(tokenizer, "pad_token_id", None), getattr(tokenizer, "eos_token_id", None), 0)
    pad_id = next(int(i) for i in candidates if i is not None)
    result = torch.full((len(sequences),), math.nan, dtype=torch.float64)
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
    with ev.eval_mode(lm):
        starts = range(0, len(order), batch_size)
        for start in tqdm(starts, desc="ONION perplexity", disable=not progress, leave=False):
            rows = order[start : start + batch_size]
            width = max(1, max(len(sequences[i]) for i in rows))
            input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
            attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
            for row, index in enumerate(rows):
                ids = sequences[index]
                input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
                attention_mask[row, : len(ids)] = 1
            if width >= 2:  # else no sequence in this batch has a predicted token: NaN
                input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
                logits = lm(input_ids=input_ids, attention_mask=attention_mask).logits  # (b, L, V)
                logits = logits[:, :-1] if logits.dtype == torch.float64 else logits[:, :-1].float()  # predicts 1..L-1
                log_probs = torch.log_softmax(logits, dim=-1)
                nll = -log_probs.gather(-1, input_ids[:, 1:, None]).squeeze(-1)  # (b, L-1)
                target_mask = attention_mask[:, 1:].bool()  # a real token is predicted
                counts = target_mask.sum(dim=1)
                mean_nll = torch.where(target_mask, nll, 0.0).sum(dim=1).double() / counts.double()
                perplexity = torch.where(counts > 0, torch.exp(mean_nll), torch.full_like(mean_nll, math.nan))
                result[torch.tensor(rows)] = perplexity.cpu()
            if on_batch is not None:
                on_batch(rows, result[torch.tensor(rows)])
    return result


def sentence_perplexities(
    texts: Sequence[str],
    lm: nn.Module,
    tokenizer: Any,
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    device: torch.device | str | None = None,
    max_length: int | None = None,
    progress: bool = False,
    cache: PerplexityCache | None = None,
) -> Tensor:
    """Perplexity of each text under a causal LM, in padded batches (see the module docstring).

    Args:
        texts: The texts.
        lm: A causal LM returning ``.logits`` (batch, seq, vocab) for ``input_ids`` and
            ``attention_mask``.
        tokenizer: Its tokenizer (a pad token is not needed).
        batch_size: Sequences per forward pass.
        device: Where the inputs go (default: the LM's first parameter's device).
        max_length: Truncation in tokens, BOS included (default: the LM's position limit).
        progress: Show a tqdm progress bar.
        cache: A :class:`PerplexityCache` opened for this ``lm``, ``tokenizer`` and ``max_length``:
            only the distinct texts not in it are computed; they are added and the cache saved
            (every ``cache.save_every`` new texts and at the end).

    Returns:
        float64 tensor (len(texts),); NaN for a text with no predicted token.

    Raises:
        ValueError: ``batch_size`` or ``max_length`` is not a positive integer.
        PerplexityCacheError: ``cache`` belongs to another LM identity, or its file became unusable.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    max_length = _effective_max_length(lm, max_length)
    if device is None:
        device = next(lm.parameters()).device
    texts = [str(text) for text in texts]
    options = dict(batch_size=batch_size, device=device, max_length=max_length, progress=progress)
    if cache is None:
        return _score_batches(texts, lm, tokenizer, **options)
    fingerprint = lm_fingerprint(lm, tokenizer, max_length=max_length)
    if fingerprint != cache.fingerprint:
        raise PerplexityCacheError(
            f"ONION perplexity cache {cache.path} was opened for another language model, tokenizer, max_length or "
            f"device (fingerprint {cache.fingerprint[:32]}, this one {fingerprint[:32]}): open it with "
            "PerplexityCache.for_lm for the LM you score with"
        )
    missing = list(dict.fromkeys(text for text in texts if text not in cache))
    logger.info("ONION perplexity cache %s: %d of %d distinct texts to compute",
                cache.path, len(missing), len(set(texts)))

    def record(rows: list[int], perplexities: Tensor) -> None:
        for row, value in zip(rows, perplexities.tolist()):
            cache.add(missing[row], value)
        if cache.unsaved >= cache.save_every:
            cache.save()

    if missing:
        try:
            _score_batches(missing, lm, tokenizer, **options, on_batch=record)
        finally:
            if cache.unsaved:
                cache.save()
    return torch.tensor([cache.get(text) for text in texts], dtype=torch.float64)


def suspicion_scores(
    texts: Sequence[str],
    lm: nn.Module,
    tokenizer: Any,
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    device: torch.device | str | None = None,
    max_length: int | None = None,
    progress: bool = False,
    cache: PerplexityCache | None = None,
) -> list[Tensor]:
    """ONION suspicion f_i = p_0 - p_i of every whitespace-separated word of every text.

    The whole sentence (words re-joined with single spaces) and its n leave-one-out variants of all
    texts go through :func:`sentence_perplexities` together.

    Args:
        texts: The texts.
        lm: The causal LM (see :func:`load_onion_lm`).
        tokenizer: Its tokenizer.
        batch_size: Sequences per LM forward pass.
        device: Where the inputs go.
        max_length: LM truncation in tokens.
        progress: Show a progress bar.
        cache: A :class:`PerplexityCache` for this LM (see :func:`sentence_perplexities`).

    Returns:
        One float64 tensor per text with one score per word; NaN scores for a one-word text, an
        empty tensor for a text without words.
    """
    variants: list[str] = []
    spans: list[tuple[int, int]] = []
    for text in texts:
        words = str(text).split()
        start = len(variants)
        if len(words) >= 2:
            variants.append(" ".join(words))
            variants.extend(" ".join(words[:i] + words[i + 1 :]) for i in range(len(words)))
        spans.append((start, len(variants)))
    perplexities = sentence_perplexities(
        variants, lm, tokenizer, batch_size=batch_size, device=device, max_length=max_length, progress=progress,
        cache=cache,
    )
    scores = []
    for text, (start, end) in zip(texts, spans):
        num_words = len(str(text).split())
        if end == start:
            scores.append(torch.full((num_words,), math.nan, dtype=torch.float64))
        else:
            scores.append(perplexities[start] - perplexities[start + 1 : end])
    return scores


def remove_suspicious_words(text: str, scores: Tensor, threshold: float) -> tuple[str, int]:
    """Drop the words of ``text`` whose suspicion score exceeds ``threshold``.

    Args:
        text: The sentence (split on whitespace).
        scores: One suspicion score per word (NaN never removes).
        threshold: t; word i is removed when f_i > t.

    Returns:
        (the filtered sentence, the number of words removed); ``text`` itself when none is removed.

    Raises:
        ValueError: The number of scores differs from the number of words.
    """
    words = text.split()
    if len(scores) != len(words):
        raise ValueError(f"got {len(scores)} suspicion scores for {len(words)} words of {text!r}")
    remove = (scores > threshold).tolist()
    if not any(remove):
        return text, 0
    return " ".join(word for word, drop in zip(words, remove) if not drop), int(sum(remove))


def _filter_all(texts: Sequence[str], scores: Sequence[Tensor], threshold: float) -> tuple[list[str], list[int]]:
    pairs = [remove_suspicious_words(str(text), score, threshold) for text, score in zip(texts, scores)]
    return [text for text, _ in pairs], [count for _, count in pairs]


def _check_threshold(threshold: float) -> float:
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or math.isnan(threshold):
        raise ValueError(f"threshold must be a number (inf keeps every word), got {threshold!r}")
    return float(threshold)


def onion_filter(
    texts: Sequence[str],
    lm: nn.Module,
    tokenizer: Any,
    *,
    threshold: float = DEFAULT_THRESHOLD,
    batch_size: int = DEFAULT_BATCH_SIZE,
    device: torch.device | str | None = None,
    max_length: int | None = None,
    progress: bool = False,
    cache: PerplexityCache | None = None,
) -> list[str]:
    """Remove each text's words with ONION suspicion f_i > ``threshold``.

    Args:
        texts: The texts.
        lm: The causal LM (see :func:`load_onion_lm`).
        tokenizer: Its tokenizer.
        threshold: t (``math.inf`` keeps every word).
        batch_size: Sequences per LM forward pass.
        device: Where the inputs go.
        max_length: LM truncation in tokens.
        progress: Show a progress bar.
        cache: A :class:`PerplexityCache` for this LM (see :func:`sentence_perplexities`).

    Returns:
        The filtered texts, in order.
    """
    threshold = _check_threshold(threshold)
    scores = suspicion_scores(
        texts, lm, tokenizer, batch_size=batch_size, device=device, max_length=max_length, progress=progress,
        cache=cache,
    )
    return _filter_all(texts, scores, threshold)[0]


def _predictions(predict_proba: PredictProba, texts: list[str], cache: dict[str, int]) -> Tensor:
    """Predicted classes of ``texts``, classifying only texts not yet in ``cache``."""
    new = list(dict.fromkeys(text for text in texts if text not in cache))
    if new:
        cache.update(zip(new, checked_proba(predict_proba, new).argmax(dim=1).tolist()))
    return torch.tensor([cache[text] for text in texts], dtype=torch.long)


def select_onion_threshold(
    predict_proba: PredictProba,
    texts: Sequence[str],
    labels: Tensor | Sequence[int],
    scores: Sequence[Tensor],
    *,
    candidates: Sequence[float] = DEFAULT_CANDIDATES,
    max_drop: float = DEFAULT_MAX_DROP,
) -> tuple[float, list[dict[str, float]]]:
    """The smallest candidate threshold keeping clean held-out accuracy within ``max_drop``.

    With a = accuracy on the unfiltered texts and a(t) on the texts filtered at t, returns
    min{t in candidates : a(t) >= a - max_drop}, or the largest candidate when none qualifies
    (logged). Each distinct filtered text is classified once.

    Args:
        predict_proba: The classifier.
        texts: Clean held-out sentences the defender owns (e.g. dev-clean), never test data.
        labels: Their labels.
        scores: Their suspicion scores from :func:`suspicion_scores`.
        candidates: Thresholds to try.
        max_drop: Tolerated accuracy drop, a fraction (0.02 = 2 points).

    Returns:
        (the chosen threshold, one ``{"threshold", "accuracy", "mean_removed"}`` row per candidate,
        in ascending order of threshold).

    Raises:
        ValueError: Empty or mismatched inputs, no candidate, or a negative ``max_drop``.
    """
    texts = [str(text) for text in texts]
    y = torch.as_tensor(labels).long().reshape(-1)
    if not texts or len(texts) != len(y) or len(scores) != len(texts):
        raise ValueError(
            f"select_onion_threshold needs as many labels and score tensors as texts (> 0): got {len(texts)} "
            f"texts, {len(y)} labels, {len(scores)} score tensors"
        )
    grid = sorted({_check_threshold(t) for t in candidates})
    if not grid:
        raise ValueError("select_onion_threshold: candidates is empty")
    if not max_drop >= 0:
        raise ValueError(f"max_drop must be a non-negative fraction, got {max_drop!r}")
    cache: dict[str, int] = {}
    base = (_predictions(predict_proba, texts, cache) == y).double().mean().item()
    table = []
    for threshold in grid:
        filtered, removed = _filter_all(texts, scores, threshold)
        accuracy = (_predictions(predict_proba, filtered, cache) == y).double().mean().item()
        table.append({"threshold": threshold, "accuracy": accuracy, "mean_removed": sum(removed) / len(removed)})
    chosen = next((row["threshold"] for row in table if row["accuracy"] >= base - max_drop - 1e-12), None)
    if chosen is None:
        chosen = grid[-1]
        logger.warning(
            "ONION: no candidate threshold keeps clean held-out accuracy within %.3f of %.3f; using the largest, %g",
            max_drop, base, chosen,
        )
    logger.info(
        "ONION: threshold %g chosen on %d clean held-out sentences (accuracy %.3f unfiltered)", chosen, len(texts), base
    )
    return chosen, table


def onion_evaluate(
    predict_proba: PredictProba,
    *,
    clean_texts: Sequence[str],
    clean_labels: Tensor | Sequence[int],
    poison_texts: Sequence[str],
    target_label: int,
    lm: nn.Module,
    tokenizer: Any,
    threshold: float = DEFAULT_THRESHOLD,
    batch_size: int = DEFAULT_BATCH_SIZE,
    device: torch.device | str | None = None,
    max_length: int | None = None,
    num_examples: int = 3,
    progress: bool = False,
    cache: PerplexityCache | None = None,
) -> dict[str, Any]:
    """Evaluate a classifier under ONION: filter test-clean and test-poison, then classify.

    Args:
        predict_proba: The classifier as a :data:`pipeline.defenses.strip.PredictProba`.
        clean_texts: test-clean sentences.
        clean_labels: Their labels.
        poison_texts: test-poison sentences.
        target_label: The attacker's target class.
        lm: ONION's causal LM (see :func:`load_onion_lm`).
        tokenizer: The LM's tokenizer.
        threshold: t (see :func:`select_onion_threshold` to choose it on clean held-out data).
        batch_size: Sequences per LM forward pass.
        device: Where the LM's inputs go.
        max_length: LM truncation in tokens.
        num_examples: How many filtered test-poison sentences to return for inspection.
        progress: Show progress bars.
        cache: A :class:`PerplexityCache` for this LM (see :func:`sentence_perplexities`).

    Returns:
        Fractions in [0, 1]: ``cacc``, ``asr``, ``clean_fpr``, ``asr_minus_clean_fpr`` on the
        filtered sentences; ``undefended`` (the same on the original sentences); ``threshold``;
        ``mean_removed_clean`` / ``mean_removed_poison`` (words per sentence);
        ``changed_clean`` / ``changed_poison`` (share of sentences with a word removed);
        ``examples`` (original and filtered test-poison sentences); ``num_clean``, ``num_poison``.

    Raises:
        ValueError: Empty or mismatched splits, or a bad threshold.
    """
    threshold = _check_threshold(threshold)
    clean_texts, poison_texts = [str(t) for t in clean_texts], [str(t) for t in poison_texts]
    labels = torch.as_tensor(clean_labels).long().reshape(-1)
    if not clean_texts or not poison_texts:
        raise ValueError(
            f"onion_evaluate needs test-clean and test-poison sentences, got {len(clean_texts)} and {len(poison_texts)}"
        )
    if len(labels) != len(clean_texts):
        raise ValueError(f"clean_texts and clean_labels differ in length: {len(clean_texts)} vs {len(labels)}")
    logger.info(
        "ONION: scoring the words of %d test-clean and %d test-poison sentences", len(clean_texts), len(poison_texts)
    )
    scores = suspicion_scores(
        clean_texts + poison_texts, lm, tokenizer, batch_size=batch_size, device=device, max_length=max_length,
        progress=progress, cache=cache,
    )
    clean_filtered, clean_removed = _filter_all(clean_texts, scores[: len(clean_texts)], threshold)
    poison_filtered, poison_removed = _filter_all(poison_texts, scores[len(clean_texts) :], threshold)

    def preds(texts: list[str]) -> Tensor:
        return checked_proba(predict_proba, texts).argmax(dim=1)

    result = {
        "defense": "onion",
        **ev.backdoor_metrics(preds(clean_filtered), labels, preds(poison_filtered), target_label=target_label),
        "undefended": ev.backdoor_metrics(
            preds(clean_texts), labels, preds(poison_texts), target_label=target_label
        ),
        "threshold": threshold,
        "mean_removed_clean": sum(clean_removed) / len(clean_removed),
        "mean_removed_poison": sum(poison_removed) / len(poison_removed),
        "changed_clean": sum(1 for n in clean_removed if n) / len(clean_removed),
        "changed_poison": sum(1 for n in poison_removed if n) / len(poison_removed),
        "examples": [
            {"original": original, "filtered": filtered}
            for original, filtered in zip(poison_texts[:num_examples], poison_filtered[:num_examples])
        ],
        "num_clean": len(clean_texts),
        "num_poison": len(poison_texts),
    }
    logger.info(
        "ONION (t=%g): CACC %.4f, ASR %.4f; %.2f / %.2f words removed per clean / poison sentence",
        threshold, result["cacc"], result["asr"], result["mean_removed_clean"], result["mean_removed_poison"],
    )
    return result
