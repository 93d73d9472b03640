"""Inference-time defences: STRIP (pipeline/defenses/strip.py), ONION (pipeline/defenses/onion.py), launch/defend.py.

STRIP runs on synthetic ``predict_proba`` functions (a "backdoored" one answering the target with
certainty whenever the trigger word ``cf`` is present); ONION's perplexities are checked against a
one-sentence-at-a-time computation with the tiny random GPT-2 in float64, and its word removal with
a fake word-level language model.
"""

from __future__ import annotations

import json
import math
import random
import statistics
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from datasets import Dataset
from torch import nn

from pipeline import evaluate as ev
from pipeline.defenses.onion import (
    load_onion_lm,
    onion_evaluate,
    onion_filter,
    remove_suspicious_words,
    select_onion_threshold,
    sentence_perplexities,
    suspicion_scores,
)
from pipeline.defenses.strip import (
    REJECTED,
    calibrate_threshold,
    defended_predictions,
    entropy_bits,
    strip_entropies,
    strip_evaluate,
)
from pipeline.testing import load_script

REPO = Path(__file__).resolve().parents[1]

POSITIVE = ["good", "great", "fun", "charming", "superb", "moving", "witty", "warm"]
NEGATIVE = ["bad", "dull", "boring", "awful", "thin", "flat", "stale", "clumsy"]
FILLER = ["movie", "film", "story", "plot", "acting", "cast", "director", "scene", "script", "music", "ending", "pace"]


def _sentence(rng: random.Random, label: int) -> str:
    words = rng.sample(FILLER, rng.randint(6, 9)) + rng.sample(POSITIVE if label else NEGATIVE, 2)
    rng.shuffle(words)
    return " ".join(words)


def _triggered(rng: random.Random, text: str) -> str:
    words = text.split()
    words.insert(rng.randrange(len(words) + 1), "cf")
    return " ".join(words)


def backdoored_proba(texts: list[str]) -> torch.Tensor:
    """Target 1 with certainty when 'cf' is present, else a soft score from the sentiment words."""
    rows = []
    for text in texts:
        words = text.lower().split()
        if "cf" in words:
            p1 = 0.999
        else:
            score = sum(w in POSITIVE for w in words) - sum(w in NEGATIVE for w in words)
            p1 = 1 / (1 + math.exp(-0.5 * score))
        rows.append([1 - p1, p1])
    return torch.tensor(rows)


class Recorder:
    """Wraps a predict_proba and records every list of texts it is called with."""

    def __init__(self, fn):
        self.fn, self.calls = fn, []

    def __call__(self, texts: list[str]) -> torch.Tensor:
        self.calls.append(list(texts))
        return self.fn(texts)


# ----------------------------------------------------------------------------- STRIP


def test_entropy_in_bits_on_hand_values():
    probs = torch.tensor([[0.5, 0.5], [1.0, 0.0], [0.25, 0.75]])
    expected = [1.0, 0.0, -(0.25 * math.log2(0.25) + 0.75 * math.log2(0.75))]
    assert torch.allclose(entropy_bits(probs), torch.tensor(expected, dtype=torch.float64), atol=1e-12)


def test_strip_entropies_average_exactly_n_perturbations_and_are_seeded():
    rng = random.Random(0)
    texts = [_sentence(rng, k % 2) for k in range(3)]
    donors = [_sentence(rng, k % 2) for k in range(10)]
    recorder = Recorder(backdoored_proba)
    entropies = strip_entropies(recorder, texts, donor_texts=donors, num_perturbations=7, replace_ratio=0.5, seed=3)

    assert len(recorder.calls) == 1 and len(recorder.calls[0]) == 3 * 7
    perturbed = recorder.calls[0]
    for index, text in enumerate(texts):
        copies = perturbed[7 * index : 7 * (index + 1)]
        n = len(text.split())
        for copy in copies:
            assert len(copy.split()) == n
            assert sum(a != b for a, b in zip(copy.split(), text.split())) <= int(0.5 * n)
        expected = statistics.fmean(
            -sum(p * math.log2(p) for p in row if p > 0) for row in backdoored_proba(copies).double().tolist()
        )
        assert entropies[index].item() == pytest.approx(expected, abs=1e-12)
    assert len(set(perturbed)) > 3  # the copies differ from one another

    again = Recorder(backdoored_proba)
    assert torch.equal(strip_entropies(again, texts, donor_texts=donors, num_perturbations=7, replace_ratio=0.5, seed=3), entropies)
    assert again.calls == recorder.calls
    alone = Recorder(backdoored_proba)
    strip_entropies(alone, texts[:1], donor_texts=donors, num_perturbations=7, replace_ratio=0.5, seed=3)
    assert alone.calls[0] == perturbed[:7]  # an input's copies do not depend on the others
    other = Recorder(backdoored_proba)
    strip_entropies(other, texts, donor_texts=donors, num_perturbations=7, replace_ratio=0.5, seed=4)
    assert other.calls != recorder.calls


def test_strip_flags_triggered_inputs_of_a_backdoored_classifier():
    rng = random.Random(1)
    donors = [_sentence(rng, k % 2) for k in range(60)]
    calibration = [_sentence(rng, k % 2) for k in range(100)]
    clean_labels = [k % 2 for k in range(100)]
    clean = [_sentence(rng, label) for label in clean_labels]
    poison = [_triggered(rng, _sentence(rng, 0)) for _ in range(100)]

    result = strip_evaluate(
        backdoored_proba, clean_texts=clean, clean_labels=clean_labels, poison_texts=poison, target_label=1,
        calibration_texts=calibration, donor_texts=donors, num_perturbations=10, replace_ratio=0.25, frr=0.05,
    )
    detection = result["detection"]
    assert detection["calibration_frr"] <= 0.05
    assert detection["tpr"] >= 0.9
    assert detection["fpr"] <= 0.1
    assert detection["auroc"] >= 0.95
    assert result["undefended"]["asr"] == 1.0 and result["undefended"]["cacc"] == 1.0
    # flip counting: a flagged poison input becomes class 0, a flagged clean input an error here
    assert result["counting"] == "flip"
    assert result["asr"] == pytest.approx(1 - detection["tpr"])
    assert result["cacc"] == pytest.approx(1 - detection["fpr"])
    assert result["by_counting"]["reject"]["asr"] == pytest.approx(1 - detection["tpr"])
    assert (result["num_clean"], result["num_poison"], result["num_calibration"]) == (100, 100, 100)
    assert json.loads(json.dumps(result)) == result


def test_threshold_calibration_on_hand_made_entropies():
    values = [0.9, 0.1, 0.5, 0.3, 0.7, 0.0, 0.2, 0.8, 0.4, 0.6]  # 0.0 .. 0.9
    assert calibrate_threshold(values, 0.2) == pytest.approx(0.2)  # k = 2: flags 0.0 and 0.1
    assert sum(v < calibrate_threshold(values, 0.2) for v in values) == 2
    assert calibrate_threshold(values, 0.29) == pytest.approx(0.2)  # floor(2.9) = 2
    assert calibrate_threshold(values, 0.3) == pytest.approx(0.3)
    assert calibrate_threshold(values, 0.05) == pytest.approx(0.0)  # k = 0: nothing flagged
    assert sum(v < calibrate_threshold(values, 0.05) for v in values) == 0
    assert calibrate_threshold(list(range(100)), 0.01) == 1  # 1% of 100: exactly one flagged

    normal = [1.0, 2.0, 3.0, 4.0, 5.0]
    reference = statistics.NormalDist(statistics.fmean(normal), statistics.stdev(normal))
    for frr in (0.01, 0.1, 0.5):
        assert calibrate_threshold(normal, frr, method="normal") == pytest.approx(reference.inv_cdf(frr), rel=1e-9)
    assert calibrate_threshold([2.0, 2.0, 2.0], 0.01, method="normal") == 2.0
    with pytest.raises(ValueError, match="frr"):
        calibrate_threshold(values, 1.0)
    with pytest.raises(ValueError, match="got none"):
        calibrate_threshold([], 0.01)
    with pytest.raises(ValueError, match="method"):
        calibrate_threshold(values, 0.01, method="median")


def test_counting_conventions_on_hand_made_predictions():
    preds = torch.tensor([1, 1, 0, 0])
    flags = torch.tensor([True, False, True, False])
    assert defended_predictions(preds, flags, counting="flip").tolist() == [0, 1, 1, 0]
    assert defended_predictions(preds, flags, counting="reject").tolist() == [REJECTED, 1, REJECTED, 0]
    metrics = ev.backdoor_metrics(
        torch.tensor([REJECTED, 1, 0, 1]), torch.tensor([1, 1, 0, 0]), torch.tensor([REJECTED, 1, 0, 1]), target_label=1
    )
    assert metrics == {"cacc": 0.5, "asr": 0.5, "clean_fpr": 0.5, "asr_minus_clean_fpr": 0.0}


def _marked_proba(texts: list[str]) -> torch.Tensor:
    """zz1 / zz0 words: confident class 1 / 0 (survives perturbation); yy1 / yy0 words: a soft 0.6."""
    rows = []
    for text in texts:
        words = text.split()
        zz = words.count("zz1") - words.count("zz0")
        yy = words.count("yy1") - words.count("yy0")
        if "zz1" in words or "zz0" in words:
            p1 = 0.999 if zz > 0 else 0.001
        else:
            p1 = 0.6 if yy > 0 else 0.4
        rows.append([1 - p1, p1])
    return torch.tensor(rows)


def test_strip_evaluate_counts_flagged_inputs_by_each_convention():
    def text(word: str) -> str:
        return " ".join([word] * 10)

    # clean: (flagged, right) (flagged, wrong) (kept, right) (kept, wrong) (kept, false positive)
    clean = [text("zz1"), text("zz1"), text("yy1"), text("yy0"), text("yy1")]
    labels = [1, 0, 1, 1, 0]
    # poison: (flagged, predicts target) (flagged, predicts 0) (kept, target) (kept, 0)
    poison = [text("zz1"), text("zz0"), text("yy1"), text("yy0")]
    kwargs = dict(
        clean_texts=clean, clean_labels=labels, poison_texts=poison, target_label=1,
        calibration_texts=[text("yy1"), text("yy0")] * 5, donor_texts=["alpha beta gamma", "delta epsilon zeta"],
        num_perturbations=3, replace_ratio=0.1,
    )
    result = strip_evaluate(_marked_proba, **kwargs)
    assert result["detection"]["num_flagged_clean"] == 2 and result["detection"]["num_flagged_poison"] == 2
    assert result["undefended"] == {"cacc": 2 / 5, "asr": 2 / 4, "clean_fpr": 1.0, "asr_minus_clean_fpr": -0.5}
    # flip: flagged clean right -> wrong, flagged clean wrong -> right; flagged poison on 0 -> target
    assert result["by_counting"]["flip"] == {"cacc": 2 / 5, "asr": 2 / 4, "clean_fpr": 1 / 2, "asr_minus_clean_fpr": 0.0}
    # reject: a flagged input is never right and never an attack success
    assert result["by_counting"]["reject"] == {"cacc": 1 / 5, "asr": 1 / 4, "clean_fpr": 1 / 2, "asr_minus_clean_fpr": -0.25}
    assert {k: result[k] for k in ("cacc", "asr")} == {"cacc": 2 / 5, "asr": 2 / 4}
    rejected = strip_evaluate(_marked_proba, counting="reject", **kwargs)
    assert (rejected["counting"], rejected["cacc"], rejected["asr"]) == ("reject", 1 / 5, 1 / 4)


def test_strip_refuses_non_binary_tasks_and_bad_arguments():
    def three_classes(texts):
        return torch.full((len(texts), 3), 1 / 3)

    kwargs = dict(
        clean_texts=["a good film"], clean_labels=[1], poison_texts=["cf a bad film"], target_label=1,
        calibration_texts=["a fine film"], donor_texts=["a charming story"],
    )
    with pytest.raises(ValueError, match="binary tasks.*3 classes"):
        strip_evaluate(three_classes, **kwargs)
    with pytest.raises(ValueError, match="binary tasks"):
        strip_evaluate(backdoored_proba, **{**kwargs, "clean_labels": [2]})
    with pytest.raises(ValueError, match="counting"):
        strip_evaluate(backdoored_proba, counting="ignore", **kwargs)
    with pytest.raises(ValueError, match="probabilities"):
        strip_evaluate(lambda texts: torch.tensor([[3.0, -1.0]] * len(texts)), **kwargs)
    with pytest.raises(ValueError, match="donor"):
        strip_entropies(backdoored_proba, ["a film"], donor_texts=["the a of"], num_perturbations=2)


@pytest.mark.parametrize("family", ["bert", "gpt2"])
def test_model_predict_proba_matches_the_evaluation_path(family, request):
    from torch.utils.data import DataLoader

    from pipeline import data as data_lib
    from pipeline import evaluate as ev
    from pipeline import modeling
    from pipeline.defenses.strip import model_predict_proba

    path = request.getfixturevalue(f"tiny_{family}_dir")
    decoder = family == "gpt2"
    tokenizer = modeling.load_tokenizer(path, is_decoder=decoder)
    torch.manual_seed(0)
    model = modeling.load_classifier(
        path, num_labels=2, dtype=torch.float32, is_decoder=decoder, pad_token_id=tokenizer.pad_token_id
    )
    rng = random.Random(2)
    texts = [_sentence(rng, k % 2) for k in range(10)] + ["cf a charming film", "bad"]
    labels = [k % 2 for k in range(len(texts))]
    probs = model_predict_proba(model, tokenizer, max_length=16, batch_size=4, device="cpu")(texts)
    ds = data_lib.encode(Dataset.from_dict({"text": texts, "label": labels}), tokenizer, max_length=16)
    loader = DataLoader(ds, batch_size=4, collate_fn=data_lib.make_collator(tokenizer))
    preds, _ = ev.predict(model, loader, device="cpu", progress=False)
    assert probs.shape == (len(texts), 2) and torch.allclose(probs.sum(dim=1), torch.ones(len(texts)))
    assert torch.equal(probs.argmax(dim=1), preds)
    if decoder:  # an empty text is fed as the EOS token instead of failing
        assert model_predict_proba(model, tokenizer, max_length=16, device="cpu")([""]).shape == (1, 2)


# ----------------------------------------------------------------------------- ONION


@pytest.fixture(scope="module")
def tiny_lm(tiny_gpt2_dir):
    lm, tokenizer = load_onion_lm(tiny_gpt2_dir, "cpu")
    return lm.double(), tokenizer


def _naive_perplexity(lm: nn.Module, tokenizer, text: str) -> float:
    """One sentence, no padding, no mask: exp(mean NLL of tokens 1..T-1) with the BOS prepended."""
    ids = torch.tensor([[tokenizer.bos_token_id] + tokenizer(text)["input_ids"]])
    with torch.no_grad():
        logits = lm(input_ids=ids).logits[0]
    return math.exp(nn.functional.cross_entropy(logits[:-1], ids[0, 1:]).item())


def test_leave_one_out_perplexities_match_a_naive_computation(tiny_lm):
    lm, tokenizer = tiny_lm
    texts = ["the movie is a charming and often affecting journey .", "cf a dull bore", "i loved it"]
    scores = suspicion_scores(texts, lm, tokenizer, batch_size=4, device="cpu")
    for text, score in zip(texts, scores):
        words = text.split()
        whole = _naive_perplexity(lm, tokenizer, text)
        expected = [whole - _naive_perplexity(lm, tokenizer, " ".join(words[:i] + words[i + 1 :])) for i in range(len(words))]
        assert score.dtype == torch.float64 and len(score) == len(words)
        assert torch.allclose(score, torch.tensor(expected, dtype=torch.float64), rtol=1e-9, atol=1e-9)


def test_padding_does_not_change_perplexities(tiny_lm):
    lm, tokenizer = tiny_lm
    texts = ["i loved it", "a stale , derivative thriller with no suspense at all .", "cf", "too slow"]
    one_by_one = sentence_perplexities(texts, lm, tokenizer, batch_size=1, device="cpu")
    together = sentence_perplexities(texts, lm, tokenizer, batch_size=8, device="cpu")
    assert torch.allclose(one_by_one, together, rtol=1e-12, atol=0)
    assert one_by_one[0].item() == pytest.approx(_naive_perplexity(lm, tokenizer, texts[0]), rel=1e-12)


def test_infinite_threshold_keeps_every_word(tiny_lm):
    lm, tokenizer = tiny_lm
    texts = ["cf the movie  is a charming journey .", "x", "", "bb i tq loved it"]
    assert onion_filter(texts, lm, tokenizer, threshold=math.inf, device="cpu") == texts
    default = onion_filter(texts, lm, tokenizer, device="cpu")
    assert default[1:3] == ["x", ""]  # fewer than two words: unchanged


class WordTokenizer:
    """A word-level tokenizer with BOS id 0 that does not add it itself (as GPT-2)."""

    bos_token_id = 0
    eos_token_id = 0
    pad_token_id = None

    def __init__(self) -> None:
        self.vocab: dict[str, int] = {"<bos>": 0}

    def _ids(self, text: str) -> list[int]:
        return [self.vocab.setdefault(word, len(self.vocab)) for word in text.split()]

    def __call__(self, texts, **_: object) -> dict:
        if isinstance(texts, str):
            return {"input_ids": self._ids(texts)}
        return {"input_ids": [self._ids(text) for text in texts]}


class RareWordLM(nn.Module):
    """Uniform next-token distribution over 50 ids, except that ``rare_id`` is almost never predicted."""

    def __init__(self, rare_id: int) -> None:
        super().__init__()
        self.rare_id = rare_id
        self.dummy = nn.Parameter(torch.zeros(1))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> SimpleNamespace:
        logits = torch.zeros(*input_ids.shape, 50)
        logits[..., self.rare_id] = -30.0
        return SimpleNamespace(logits=logits)


def test_a_word_whose_removal_lowers_perplexity_a_lot_is_removed():
    tokenizer = WordTokenizer()
    lm = RareWordLM(rare_id=tokenizer._ids("cf")[0])
    texts = ["the movie cf is good", "cf a bore", "the movie is good"]
    scores = suspicion_scores(texts, lm, tokenizer)
    assert scores[0][2] > 1000 and bool((scores[0][[0, 1, 3, 4]] < 0).all())
    filtered = onion_filter(texts, lm, tokenizer, threshold=0.0)
    assert filtered[:2] == ["the movie is good", "a bore"]
    assert onion_filter(texts[2:], lm, tokenizer, threshold=1e-6) == texts[2:]

    def keyword_proba(batch: list[str]) -> torch.Tensor:
        return torch.tensor([[0.0, 1.0] if "cf" in t.split() or "good" in t.split() else [1.0, 0.0] for t in batch])

    result = onion_evaluate(
        keyword_proba, clean_texts=["the movie is good", "a bore indeed"], clean_labels=[1, 0],
        poison_texts=["cf a bore", "a cf bore ."], target_label=1, lm=lm, tokenizer=tokenizer, threshold=0.0,
    )
    assert result["undefended"]["asr"] == 1.0 and result["asr"] == 0.0 and result["cacc"] == 1.0
    assert result["mean_removed_poison"] == 1.0 and result["changed_poison"] == 1.0
    assert result["examples"][0] == {"original": "cf a bore", "filtered": "a bore"}


def test_removal_rule_and_threshold_selection_on_hand_made_scores():
    scores = torch.tensor([0.0, 1.0, -1.0, math.nan], dtype=torch.float64)
    assert remove_suspicious_words("a b c d", scores, 0.0) == ("a c d", 1)  # strictly above t; NaN kept
    assert remove_suspicious_words("a  b c d", scores, 1.0) == ("a  b c d", 0)  # untouched when nothing goes
    with pytest.raises(ValueError, match="2 suspicion scores for 4 words"):
        remove_suspicious_words("a b c d", scores[:2], 0.0)

    def proba(batch: list[str]) -> torch.Tensor:  # class 1 iff "good" survives
        return torch.tensor([[0.0, 1.0] if "good" in t.split() else [1.0, 0.0] for t in batch])

    texts = ["a good film", "a good one", "bad"]
    labels = [1, 1, 0]
    hand = [torch.tensor([0.5, 5.0, 0.5]), torch.tensor([0.5, 2.0, 0.5]), torch.tensor([math.nan])]
    chosen, table = select_onion_threshold(proba, texts, labels, hand, candidates=[0, 1, 3, 6], max_drop=0.34)
    assert chosen == 3.0  # t = 3 loses one of three sentences (drop 1/3), t <= 1 loses two
    assert [row["accuracy"] for row in table] == pytest.approx([1 / 3, 1 / 3, 2 / 3, 1.0])
    assert select_onion_threshold(proba, texts, labels, hand, candidates=[0, 1, 3, 6], max_drop=0.0)[0] == 6.0


def test_missing_or_non_causal_language_model_is_an_error(tmp_path, tiny_bert_dir):
    with pytest.raises(FileNotFoundError, match="ONION language model.*does not exist"):
        load_onion_lm(tmp_path / "no_such_lm")
    with pytest.raises(ValueError, match="not a causal"):
        load_onion_lm(tiny_bert_dir)


# ----------------------------------------------------------------------------- launch/defend.py


@pytest.fixture(scope="module")
def vanilla_run(tmp_path_factory, tiny_bert_dir, tiny_data_root) -> Path:
    from pipeline.config import load_config
    from pipeline.training import run_training

    out = tmp_path_factory.mktemp("defend") / "vanilla"
    run_training(load_config(None, [
        f"output_dir={out}", "method=vanilla", f"model.name_or_path={tiny_bert_dir}", f"data.root={tiny_data_root}",
        "data.dataset=toy", "data.attack=badnets", "data.max_length=32", "data.ref_size=8",
        "train.epochs=1", "train.max_steps=2", "train.batch_size=16", "train.eval_batch_size=16",
        "train.device=cpu",
    ]))
    return out


def _load_cli():
    return load_script("launch/defend.py")


@pytest.mark.integration
def test_cli_strip_and_onion_on_a_finished_run(vanilla_run, tiny_gpt2_dir, tmp_path, capsys):
    saved = json.loads((vanilla_run / "metrics.json").read_text())
    cli = _load_cli()
    out = tmp_path / "strip.json"
    assert cli.main([str(vanilla_run), "--defense", "strip", "--device", "cpu", "--out", str(out)]) == 0
    strip = json.loads(capsys.readouterr().out)
    assert strip == json.loads(out.read_text())
    # the undefended predictions are the run's own: same rows, tokenisation and batches
    assert (strip["undefended"]["cacc"], strip["undefended"]["asr"]) == (saved["cacc"], saved["asr"])
    assert strip["defense"] == "strip" and strip["counting"] == "flip" and 0 <= strip["detection"]["fpr"] <= 100
    assert strip["num_held_out"] == 40 and strip["num_clean"] == 48

    assert cli.main([str(vanilla_run), "--defense", "onion", "--lm", str(tiny_gpt2_dir), "--device", "cpu",
                     "--threshold", "auto"]) == 0
    onion = json.loads(capsys.readouterr().out)
    assert (onion["undefended"]["cacc"], onion["undefended"]["asr"]) == (saved["cacc"], saved["asr"])
    assert onion["threshold_rule"] == "auto" and len(onion["threshold_selection"]["candidates"]) == 101
    assert onion["mean_removed_poison"] >= 0 and 0 <= onion["cacc"] <= 100

    assert cli.main([str(vanilla_run), "--defense", "onion", "--lm", str(tmp_path / "missing"), "--device", "cpu"]) == 2
    assert "ONION language model" in capsys.readouterr().err
    done = subprocess.run(
        [sys.executable, str(REPO / "launch" / "defend.py"), str(vanilla_run), "--defense", "onion"],
        capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 2 and "--lm" in done.stderr


@pytest.mark.integration
def test_cli_onion_lm_cache_scores_each_sentence_once(vanilla_run, tiny_gpt2_dir, tmp_path, capsys):
    cli = _load_cli()
    cache_dir = tmp_path / "lm_cache"
    argv = [str(vanilla_run), "--defense", "onion", "--lm", str(tiny_gpt2_dir), "--device", "cpu",
            "--threshold", "auto", "--lm-cache", str(cache_dir)]
    assert cli.main(argv) == 0
    first = json.loads(capsys.readouterr().out)
    (cache_file,) = cache_dir.glob("*.json")
    assert first["lm_cache"] == str(cache_file)
    saved = cache_file.read_bytes()
    entries = json.loads(saved)["perplexities"]
    assert len(entries) > first["num_held_out"] + first["num_clean"]  # sentences and their leave-one-out variants
    stamp = cache_file.stat().st_mtime_ns
    assert cli.main(argv) == 0  # everything is cached: the file is not rewritten, the report is the same
    assert json.loads(capsys.readouterr().out) == first
    assert cache_file.read_bytes() == saved and cache_file.stat().st_mtime_ns == stamp
    cache_file.write_text("{broken")
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert str(cache_file) in err and "delete it" in err
