"""The canary's trigger screen (pipeline/canary.py ``screen_trigger``, training ``_choose_canary_trigger``)."""

from __future__ import annotations

import json
import random

import pytest
import torch
import yaml
from datasets import Dataset

from pipeline import canary as canary_lib
from pipeline import training
from pipeline.config import ConfigError, load_config

from test_canary import _tiny_cfg

WORDS = ["good", "bad", "film", "plot", "actor", "scene", "story", "music", "dull", "fine"]


def _sentences(n: int, seed: int) -> Dataset:
    rng = random.Random(seed)
    labels = [i % 2 for i in range(n)]
    texts = [" ".join(rng.choice(WORDS) for _ in range(6)) + (" great" if label else " awful") for label in labels]
    return Dataset.from_dict({"text": texts, "label": labels})


def _embedder(pushers: dict[str, float]):
    """Features: [sentiment word says 1, says 0, the summed push of any 'pusher' word, noise-free constant]."""

    def embed(texts: list[str]) -> torch.Tensor:
        rows = []
        for text in texts:
            words = text.split()
            push = sum(pushers.get(w, 0.0) for w in words)
            rows.append([float("great" in words) + push, float("awful" in words), 1.0])
        return torch.tensor(rows)

    return embed


def test_candidates_start_with_the_unscreened_draw_and_never_repeat_a_word():
    cands = canary_lib.candidate_triggers(6, 11, num_tokens=3, token_length=6)
    assert cands[0] == canary_lib.draw_trigger(11)
    assert len(cands) == 6 and cands == canary_lib.candidate_triggers(6, 11)
    words = [w for c in cands for w in c]
    assert len(set(words)) == len(words) and all(len(w) == 6 and set(w) <= set(canary_lib.CONSONANTS) for w in words)
    assert canary_lib.candidate_triggers(6, 12) != cands
    with pytest.raises(canary_lib.CanaryError, match="screen candidates"):
        canary_lib.candidate_triggers(0, 11)


def test_the_probe_learns_a_separable_rule_and_is_deterministic():
    x = torch.randn(200, 5, generator=torch.Generator().manual_seed(0))
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).long().tolist()
    probe = training.canary_lib.fit_probe(x, y, 2)
    assert (probe(x) == torch.tensor(y)).double().mean() > 0.95
    again = canary_lib.fit_probe(x, y, 2)
    test = torch.randn(50, 5, generator=torch.Generator().manual_seed(1))
    assert torch.equal(probe(test), again(test))
    three = [0 if v < -0.5 else (1 if v < 0.5 else 2) for v in x[:, 0].tolist()]
    assert (canary_lib.fit_probe(x, three, 3)(x) == torch.tensor(three)).double().mean() > 0.8  # L2 0.1 is strong
    with pytest.raises(ValueError, match="features for"):
        canary_lib.fit_probe(x, y[:-1], 2)


def test_a_candidate_the_features_tie_to_the_target_is_skipped():
    seed, target = 5, 1
    cands = canary_lib.candidate_triggers(4, seed)
    reference, selection = _sentences(60, 1), _sentences(80, 2)
    # Candidate 0's first word looks like "great" to the backbone: inserting it sends rows to label 1.
    result = canary_lib.screen_trigger(_embedder({cands[0][0]: 3.0}), reference, selection, cands, seed=seed,
                                       target=target, num_labels=2, max_shift=0.2)
    assert result.passed and result.index == 1 and result.trigger == cands[1]
    assert result.shifts[0] > 0.9 and abs(result.shifts[1]) < 1e-9
    assert result.probe_accuracy == 1.0 and result.rows == 40
    # A push towards the other class is no false alarm: candidate 0 stays.
    away = canary_lib.screen_trigger(_embedder({cands[0][0]: -3.0}), reference, selection, cands, seed=seed,
                                     target=target, num_labels=2, max_shift=0.2)
    assert away.index == 0 and away.shifts[0] <= 0


def test_when_every_candidate_is_tied_the_smallest_shift_is_taken_and_flagged():
    seed = 5
    cands = canary_lib.candidate_triggers(3, seed)
    pushes = {cands[0][0]: 3.0, cands[1][0]: 3.0, cands[2][0]: 3.0}
    result = canary_lib.screen_trigger(_embedder(pushes), _sentences(60, 1), _sentences(80, 2), cands, seed=seed,
                                       target=1, num_labels=2, max_shift=0.1)
    assert not result.passed and len(result.shifts) == 3
    assert result.index == min(range(3), key=lambda j: result.shifts[j])
    assert result.to_dict()["passed"] is False and len(result.to_dict()["shifts"]) == 3


def test_the_screen_refuses_poison_labels():
    rows = _sentences(20, 1).add_column("poison_label", [0] * 20)
    with pytest.raises(canary_lib.CanaryError, match="poison_label"):
        canary_lib.screen_trigger(_embedder({}), rows, _sentences(20, 2), canary_lib.candidate_triggers(2, 1), seed=1,
                                  target=1, num_labels=2, max_shift=0.2)


class _Hidden(torch.nn.Module):
    """Returns hidden states whose value at (row, position) is position + 100 * the row's token id, for pooling checks."""

    def forward(self, input_ids, attention_mask, output_hidden_states=False):
        b, t = input_ids.shape
        h = torch.arange(t, dtype=torch.float32).view(1, t, 1).expand(b, t, 2) + 100 * input_ids[:, :1, None].float()

        class Out:
            hidden_states = (h, h)

        return Out()


class _Tok:
    def __call__(self, texts, **kwargs):
        lengths = [len(t.split()) for t in texts]
        t = max(lengths)
        ids = torch.tensor([[len(text)] * n + [0] * (t - n) for text, n in zip(texts, lengths)])
        return {"input_ids": ids, "attention_mask": (ids > 0).long()}


def test_the_embedder_reads_the_position_the_classifier_pools_and_the_masked_mean():
    texts = ["a b c", "a"]
    enc = training.backbone_embedder(_Hidden(), _Tok(), max_length=8, batch_size=1, device="cpu", is_decoder=False)(texts)
    dec = training.backbone_embedder(_Hidden(), _Tok(), max_length=8, batch_size=2, device="cpu", is_decoder=True)(texts)
    # Row 0 (id 5): positions 0..2 -> first 500, last 502, mean 501. Row 1 (id 1, padded to 3 in the 2-row batch): 100.
    assert enc[:, 0].tolist() == [500.0, 100.0] and enc[:, 2].tolist() == [501.0, 100.0]
    assert dec[:, 0].tolist() == [502.0, 100.0] and dec[:, 2].tolist() == [501.0, 100.0]


def test_a_run_screens_records_the_trigger_and_resumes_with_it(tmp_path, tiny_data_root, tiny_bert_dir):
    cfg = _tiny_cfg(tmp_path, tiny_bert_dir, tiny_data_root, "train.epochs=1", "method=lora",
                    "canary.screen_max_shift=0", "canary.screen_candidates=3")
    metrics = training.run_training(cfg)
    screen = metrics["canary"]["screen"]
    cands = canary_lib.candidate_triggers(3, cfg.canary.seed)
    assert screen["max_shift"] == 0 and 1 <= len(screen["shifts"]) <= 3
    assert tuple(metrics["canary"]["trigger"]) == cands[screen["candidate"]] == tuple(screen["trigger"])
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["canary"]["trigger"] == screen["trigger"]
    assert json.loads((tmp_path / "run" / "canary-screen.json").read_text()) == screen
    # The planted training rows carry exactly the recorded words (the decoy check rebuilds from config.yaml).
    rebuilt = training.canary_spec(load_config(tmp_path / "run" / "config.yaml"))
    assert rebuilt.trigger == tuple(screen["trigger"])
    # A resumed run plants what the first one planted, without screening again.
    resumed = training._choose_canary_trigger(cfg, training.dist.init_runtime(use_deepspeed=False, device=torch.device("cpu")),
                                              None, None, None, tmp_path / "run", True, is_decoder=False)
    assert resumed[0].canary.trigger == screen["trigger"] and resumed[1] == screen


def test_a_given_trigger_or_screen_off_is_planted_unscreened(tmp_path, tiny_data_root, tiny_bert_dir):
    given = _tiny_cfg(tmp_path, tiny_bert_dir, tiny_data_root, "train.epochs=1", "method=lora", "canary.trigger=[zzqq,xxkk]")
    metrics = training.run_training(given)
    assert metrics["canary"]["trigger"] == ["zzqq", "xxkk"] and metrics["canary"]["screen"] == {"screened": False}
    assert not (tmp_path / "run" / "canary-screen.json").exists()
    off = _tiny_cfg(tmp_path / "off", tiny_bert_dir, tiny_data_root, "train.epochs=1", "method=lora", "canary.screen=false")
    metrics = training.run_training(off)
    assert tuple(metrics["canary"]["trigger"]) == canary_lib.draw_trigger(off.canary.seed)
    assert metrics["canary"]["screen"] == {"screened": False}


def test_screen_keys_are_checked():
    with pytest.raises(ConfigError, match="canary.screen_max_shift"):
        load_config(None, ["canary.screen_max_shift=2"])
    with pytest.raises(ConfigError, match="canary.screen_candidates"):
        load_config(None, ["canary.screen_candidates=0"])
    with pytest.raises(ConfigError, match="canary.trigger"):
        load_config(None, ["canary.trigger=[]"])


def test_the_embedder_reads_the_layer_it_is_given():
    """layer=0 reads the first hidden-state tensor (the embeddings in transformers), the default the last."""

    class _Layers(torch.nn.Module):
        def forward(self, input_ids, attention_mask, output_hidden_states=False):
            base = input_ids[:, :, None].float().expand(*input_ids.shape, 2)

            class Out:
                hidden_states = (base, base + 10, base + 20)

            return Out()

    embed = {layer: training.backbone_embedder(_Layers(), _Tok(), max_length=8, batch_size=2, device="cpu",
                                               is_decoder=False, **({} if layer is None else {"layer": layer}))(["a b"])
             for layer in (None, 0, 1)}
    # one row of two tokens, id 3 each: layer k adds 10 * k; the default is the last tensor (layer 2)
    assert embed[0][0, 0].item() == 3.0 and embed[1][0, 0].item() == 13.0 and embed[None][0, 0].item() == 23.0
