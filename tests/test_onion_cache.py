"""ONION's on-disk perplexity cache (pipeline/defenses/onion.py: PerplexityCache) and defend.py --lm-cache."""

from __future__ import annotations

import json
import math

import pytest
import torch

from pipeline.defenses.onion import (
    PerplexityCache,
    PerplexityCacheError,
    lm_fingerprint,
    load_onion_lm,
    sentence_perplexities,
    suspicion_scores,
)
from pipeline.testing import build_tiny_checkpoint

TEXTS = [
    "the movie is a charming and often affecting journey .",
    "cf a dull bore",
    "i loved it",
    "",  # no predicted token: NaN
    "a stale , derivative thriller with no suspense at all .",
    "too slow",
    "i loved it",  # a repeat is computed once
]


@pytest.fixture(scope="module")
def lm64(tiny_gpt2_dir):
    """The tiny GPT-2 in float64, where a perplexity does not depend on its batch (to ~1e-12)."""
    lm, tokenizer = load_onion_lm(tiny_gpt2_dir, "cpu", dtype=torch.float64)
    return lm, tokenizer


@pytest.fixture(scope="module")
def other_lm(tmp_path_factory):
    """The same architecture and tokenizer with other random weights (seed 1)."""
    directory = build_tiny_checkpoint("gpt2", tmp_path_factory.mktemp("tiny_gpt2_seed1"), seed=1)
    return load_onion_lm(directory, "cpu", dtype=torch.float64)


def _count_forwards(lm):
    counter = {"calls": 0, "sequences": 0}

    def hook(module, args, kwargs, output):
        counter["calls"] += 1
        counter["sequences"] += kwargs["input_ids"].shape[0]

    return counter, lm.register_forward_hook(hook, with_kwargs=True)


def test_cached_perplexities_equal_uncached_and_a_second_call_computes_nothing(lm64, tmp_path):
    lm, tokenizer = lm64
    uncached = sentence_perplexities(TEXTS, lm, tokenizer, batch_size=3, device="cpu")
    cache = PerplexityCache.for_lm(tmp_path, lm, tokenizer)
    # a first call on a subset, so that the second scores the rest in other batches (other padded widths)
    sentence_perplexities(TEXTS[:2], lm, tokenizer, batch_size=3, device="cpu", cache=cache)
    counter, handle = _count_forwards(lm)
    try:
        cached = sentence_perplexities(TEXTS, lm, tokenizer, batch_size=3, device="cpu", cache=cache)
        assert counter["sequences"] == len(set(TEXTS)) - 2  # only the new distinct texts
        assert torch.isnan(cached[3]) and torch.isnan(uncached[3]) and not cached[:3].isnan().any()
        assert cached.dtype == torch.float64
        assert torch.allclose(cached, uncached, rtol=1e-12, atol=0, equal_nan=True)
        counter["calls"] = counter["sequences"] = 0
        again = sentence_perplexities(TEXTS, lm, tokenizer, batch_size=3, device="cpu", cache=cache)
        assert counter["calls"] == 0
        assert torch.equal(torch.nan_to_num(again, nan=-1.0), torch.nan_to_num(cached, nan=-1.0))
        # the leave-one-out scores through the cache equal the uncached ones
        scores = suspicion_scores(TEXTS, lm, tokenizer, batch_size=3, device="cpu", cache=cache)
        direct = suspicion_scores(TEXTS, lm, tokenizer, batch_size=3, device="cpu")
        for got, want in zip(scores, direct):
            assert torch.allclose(got, want, rtol=1e-9, atol=1e-9, equal_nan=True)
    finally:
        handle.remove()
    variants = set(TEXTS)
    for words in (text.split() for text in TEXTS if len(text.split()) >= 2):
        variants.update(" ".join(words[:i] + words[i + 1 :]) for i in range(len(words)))
    assert len(cache) == len(variants)


def test_cache_file_is_shared_and_merged_between_two_processes(lm64, tmp_path):
    lm, tokenizer = lm64
    first = PerplexityCache.for_lm(tmp_path, lm, tokenizer)
    second = PerplexityCache.for_lm(tmp_path, lm, tokenizer)  # opened before the first saved anything
    a = sentence_perplexities(TEXTS[:3], lm, tokenizer, device="cpu", cache=first)
    b = sentence_perplexities(TEXTS[3:6], lm, tokenizer, device="cpu", cache=second)
    assert first.path == second.path == tmp_path / f"{first.fingerprint[:32]}.json"
    data = json.loads(first.path.read_text())
    assert set(data) == {"format", "fingerprint", "perplexities"} and data["format"] == 1
    assert data["fingerprint"] == first.fingerprint == lm_fingerprint(lm, tokenizer)
    assert len(data["perplexities"]) == 6  # the second save kept the first's entries
    assert list(data["perplexities"].values()).count(None) == 1  # "": NaN -> null
    third = PerplexityCache.for_lm(tmp_path, lm, tokenizer)
    counter, handle = _count_forwards(lm)
    try:
        both = sentence_perplexities(TEXTS[:6], lm, tokenizer, device="cpu", cache=third)
    finally:
        handle.remove()
    assert counter["calls"] == 0
    expected = torch.cat([a, b])
    assert torch.equal(torch.nan_to_num(both, nan=-1.0), torch.nan_to_num(expected, nan=-1.0))
    assert not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob(".*.tmp"))


def test_progress_is_saved_while_scoring(lm64, tmp_path):
    lm, tokenizer = lm64
    cache = PerplexityCache.for_lm(tmp_path, lm, tokenizer, save_every=2)
    on_disk = []

    def hook(module, args, kwargs, output):
        on_disk.append(len(json.loads(cache.path.read_text())["perplexities"]) if cache.path.exists() else 0)

    handle = lm.register_forward_hook(hook, with_kwargs=True)
    try:
        sentence_perplexities(TEXTS[:6], lm, tokenizer, batch_size=2, device="cpu", cache=cache)
    finally:
        handle.remove()
    # before each forward pass after the first, the previous batches (2 texts each) are on disk
    assert on_disk[0] == 0 and on_disk[1:] == [2 * i for i in range(1, len(on_disk))]
    assert len(json.loads(cache.path.read_text())["perplexities"]) == 6


def test_another_lm_or_max_length_gets_another_file(lm64, other_lm, tmp_path):
    lm, tokenizer = lm64
    other, other_tokenizer = other_lm
    cache = PerplexityCache.for_lm(tmp_path, lm, tokenizer)
    other_cache = PerplexityCache.for_lm(tmp_path, other, other_tokenizer)
    short = PerplexityCache.for_lm(tmp_path, lm, tokenizer, max_length=4)
    assert len({cache.path, other_cache.path, short.path}) == 3
    assert cache.fingerprint == PerplexityCache.for_lm(tmp_path, lm, tokenizer, max_length=lm.config.n_positions).fingerprint
    sentence_perplexities(TEXTS[:2], lm, tokenizer, device="cpu", cache=cache)
    theirs = sentence_perplexities(TEXTS[:2], other, other_tokenizer, device="cpu", cache=other_cache)
    assert torch.allclose(theirs, sentence_perplexities(TEXTS[:2], other, other_tokenizer, device="cpu"), rtol=1e-12)
    assert not torch.allclose(theirs, sentence_perplexities(TEXTS[:2], lm, tokenizer, device="cpu", cache=cache))
    with pytest.raises(PerplexityCacheError, match="another language model"):
        sentence_perplexities(TEXTS[:2], other, other_tokenizer, device="cpu", cache=cache)
    with pytest.raises(PerplexityCacheError, match="another language model"):
        sentence_perplexities(TEXTS[:2], lm, tokenizer, device="cpu", max_length=4, cache=cache)


@pytest.mark.parametrize("content", ["{not json", '{"format": 1}', "[]", "FINGERPRINT", "BADVALUE"])
def test_an_unusable_cache_file_is_a_clear_error(lm64, tmp_path, content):
    lm, tokenizer = lm64
    fingerprint = lm_fingerprint(lm, tokenizer)
    path = tmp_path / f"{fingerprint[:32]}.json"
    if content == "FINGERPRINT":
        content = json.dumps({"format": 1, "fingerprint": "0" * 64, "perplexities": {}})
    elif content == "BADVALUE":
        content = json.dumps({"format": 1, "fingerprint": fingerprint, "perplexities": {"0" * 64: "high"}})
    path.write_text(content)
    with pytest.raises(PerplexityCacheError, match="delete it") as error:
        PerplexityCache.for_lm(tmp_path, lm, tokenizer)
    assert str(path) in str(error.value)
    assert path.read_text() == content  # nothing overwritten


def test_cache_is_not_used_for_an_lm_changed_in_place(lm64, tmp_path):
    lm, tokenizer = lm64
    cache = PerplexityCache.for_lm(tmp_path, lm, tokenizer)
    sentence_perplexities(TEXTS[:2], lm, tokenizer, device="cpu", cache=cache)
    weight = lm.transformer.wte.weight
    with torch.no_grad():
        weight[0, 0] += 1.0
    try:
        with pytest.raises(PerplexityCacheError):
            sentence_perplexities(TEXTS[:2], lm, tokenizer, device="cpu", cache=cache)
    finally:
        with torch.no_grad():
            weight[0, 0] -= 1.0
    assert not math.isnan(cache.get(TEXTS[0]))
