"""The product-of-experts loss with a cross-fitted word n-gram expert (shortcut.expert, pipeline/defenses/shortcut.py).

The expert on synthetic rows with a planted trigger (it sees a repeated trigger, not a row's own unique word: the
cross-fitting), the loss against its formula written out, the refusals, and tiny runs on the toy SST-2-like files:
a uniform expert trains exactly like plain cross-entropy, a real one changes the update and is reported.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pipeline.config import ConfigError, load_config
from pipeline.defenses import shortcut
from pipeline.training import run_training

pytest.importorskip("sklearn")  # installed by `make venv` (.[analysis]); CUBE needs it too

WORDS = [f"w{i}" for i in range(60)]


def _rows(n: int = 240, poisoned: int = 40, seed: int = 0) -> tuple[list[str], list[int], list[int]]:
    """Random 8-word rows with random labels; ``poisoned`` of the label-0 rows get the trigger "cf mn" and label 1."""
    rng = random.Random(seed)
    texts = [" ".join(rng.choice(WORDS) for _ in range(8)) for _ in range(n)]
    labels = [rng.randrange(2) for _ in range(n)]
    planted = [i for i in range(n) if labels[i] == 0][:poisoned]
    for i in planted:
        words = texts[i].split()
        words.insert(rng.randrange(len(words)), "cf mn")
        texts[i], labels[i] = " ".join(words), 1
    return texts, labels, planted


def test_the_expert_sees_a_repeated_trigger():
    texts, labels, planted = _rows()
    logp = shortcut.ngram_expert(texts, labels, num_labels=2, seed=3)
    assert logp.shape == (len(texts), 2) and logp.dtype == torch.float32
    assert torch.allclose(logp.exp().sum(1), torch.ones(len(texts)), atol=1e-5)
    own = logp[torch.arange(len(texts)), torch.tensor(labels)].exp()
    clean = [i for i in range(len(texts)) if i not in set(planted)]
    assert own[planted].mean() > 0.85  # the trigger, seen in the other folds' rows
    assert 0.3 < own[clean].mean() < 0.7  # random words: about the prior


def test_a_row_is_scored_by_a_fit_that_never_saw_it():
    """Cross-fitting: a word only row i holds cannot change row i's expert probability (an in-sample fit would)."""
    texts, labels, _ = _rows(seed=1)
    before = shortcut.ngram_expert(texts, labels, num_labels=2, seed=5)
    changed = list(texts)
    changed[7] = texts[7] + " onlyhere"
    after = shortcut.ngram_expert(changed, labels, num_labels=2, seed=5)
    assert torch.allclose(after[7], before[7], atol=2e-3)
    # for contrast, an in-sample fit memorises the rows' unique word pairs, clean rows included
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import MultiLabelBinarizer

    from pipeline.defenses.lexical import features

    x = MultiLabelBinarizer().fit_transform([features(t) for t in texts])
    memorised = LogisticRegression(C=1.0, max_iter=3000).fit(x, labels).predict_proba(x)[range(len(labels)), labels]
    crossed = before[torch.arange(len(labels)), torch.tensor(labels)].exp()
    assert memorised.mean() > 0.8 and crossed.mean() < memorised.mean() - 0.15


def test_labels_missing_from_the_rows_get_the_floor():
    texts, labels, _ = _rows()
    logp = shortcut.ngram_expert(texts, labels, num_labels=3, seed=0)
    assert logp.shape == (len(texts), 3) and torch.isfinite(logp).all()
    assert torch.allclose(logp[:, 2].exp(), torch.full((len(texts),), 1e-6), rtol=1e-3)


def test_product_of_experts_loss_matches_its_formula():
    torch.manual_seed(0)
    logits, labels = torch.randn(6, 3), torch.tensor([0, 2, 1, 1, 0, 2])
    expert = torch.log_softmax(torch.randn(6, 3), dim=-1)
    for weight in (1.0, 2.0):
        pm, pe = torch.softmax(logits, -1), expert.exp() ** weight
        combined = pm * pe / (pm * pe).sum(-1, keepdim=True)
        expected = -combined[torch.arange(6), labels].log().mean()
        assert torch.allclose(shortcut.product_of_experts_loss(logits, labels, expert, weight), expected, atol=1e-6)
    assert torch.allclose(shortcut.product_of_experts_loss(logits, labels, None),
                          torch.nn.functional.cross_entropy(logits, labels))
    uniform = torch.full((6, 3), math.log(1 / 3))
    assert torch.allclose(shortcut.product_of_experts_loss(logits, labels, uniform),
                          torch.nn.functional.cross_entropy(logits, labels), atol=1e-6)


def test_a_confident_expert_takes_the_rows_gradient():
    logits = torch.zeros(1, 2, requires_grad=True)
    label = torch.tensor([1])
    confident = torch.log(torch.tensor([[0.01, 0.99]]))
    plain = torch.autograd.grad(shortcut.product_of_experts_loss(logits, label, None), logits)[0]
    poe = torch.autograd.grad(shortcut.product_of_experts_loss(logits, label, confident), logits)[0]
    assert poe.abs().sum() < 0.05 * plain.abs().sum()


def test_the_expert_refuses_what_it_cannot_fit():
    with pytest.raises(ValueError, match="at least two labels"):
        shortcut.ngram_expert(["a b", "b c", "c d"], [1, 1, 1], num_labels=2)
    with pytest.raises(ValueError, match=r"shortcut.folds=5 is more than the rows of label\(s\) \{0: 2\}"):
        shortcut.ngram_expert(["a", "b", "c", "d", "e", "f", "g"], [0, 0, 1, 1, 1, 1, 1], num_labels=2)
    with pytest.raises(ValueError, match="labels must lie in 0..1"):
        shortcut.ngram_expert(["a", "b"], [0, 2], num_labels=2)
    with pytest.raises(ValueError, match="as many labels as texts"):
        shortcut.ngram_expert(["a", "b"], [0], num_labels=2)


def test_report_splits_canary_rows():
    logp = torch.log(torch.tensor([[0.05, 0.95], [0.5, 0.5], [0.2, 0.8], [0.9, 0.1]]))
    block = shortcut.report(logp, [1, 1, 1, 0], canary_rows=[0, 2])
    assert block["canary_rows"] == {"rows": 2, "mean_p_label": 0.875, "share_above_0.9": 0.5}
    assert block["other_rows"] == {"rows": 2, "mean_p_label": 0.7, "share_above_0.9": 0.0}
    assert block["all_rows"]["rows"] == 4
    block.update(expert="ngram", weight=1.0)
    line = shortcut.summary_line(block)
    assert "canary rows mean p(y) 0.875, 50.0% above 0.9 (2 rows)" in line


def test_config_refuses_an_expert_with_ref_only():
    with pytest.raises(ConfigError, match="shortcut.expert.*method=ref_only"):
        load_config(None, ["method=ref_only", "shortcut.expert=ngram"])
    with pytest.raises(ConfigError, match="shortcut.folds"):
        load_config(None, ["shortcut.folds=1"])


def _overrides(out: Path, model_dir: Path, data_root: Path) -> list[str]:
    return [
        f"output_dir={out}", "method=vanilla", f"model.name_or_path={model_dir}", f"data.root={data_root}",
        "data.dataset=toy", "data.attack=badnets", "data.max_length=32", "data.ref_size=8", "train.epochs=1",
        "train.max_steps=2", "train.batch_size=8", "train.eval_batch_size=16", "train.lr=1e-3", "train.device=cpu",
        "canary.rate=0.1", "canary.screen=false",
    ]


def _weights(run: Path) -> dict[str, torch.Tensor]:
    (path,) = (run / "adapter").glob("*.safetensors")
    return load_file(path)


def test_runs_train_through_the_expert(tmp_path, tiny_bert_dir, tiny_data_root, monkeypatch):
    plain, poe, uniform = tmp_path / "plain", tmp_path / "poe", tmp_path / "uniform"
    run_training(load_config(None, _overrides(plain, tiny_bert_dir, tiny_data_root)))
    run_training(load_config(None, _overrides(poe, tiny_bert_dir, tiny_data_root) + ["shortcut.expert=ngram", "shortcut.folds=3"]))
    metrics = json.loads((poe / "metrics.json").read_text())
    block = metrics["shortcut"]
    assert block["expert"] == "ngram" and block["weight"] == 1.0
    assert block["canary_rows"]["rows"] == metrics["canary"]["planted_rows"] == 10
    assert block["all_rows"]["rows"] == 96
    assert json.loads((plain / "metrics.json").read_text())["shortcut"] == {"expert": "none"}
    a, b = _weights(plain), _weights(poe)
    assert any(not torch.equal(a[k], b[k]) for k in a)  # the expert changed the update
    # a uniform expert adds a constant to every log-probability: exactly plain cross-entropy
    monkeypatch.setattr(shortcut, "ngram_expert", lambda texts, labels, *, num_labels, **_: torch.full(
        (len(texts), num_labels), math.log(1 / num_labels)))
    run_training(load_config(None, _overrides(uniform, tiny_bert_dir, tiny_data_root) + ["shortcut.expert=ngram"]))
    c = _weights(uniform)
    assert all(torch.allclose(a[k], c[k], atol=1e-6) for k in a)


def test_the_launcher_says_what_the_expert_saw(tmp_path, tiny_bert_dir, tiny_data_root, capsys):
    from launch import train as launcher

    assert launcher.main(_overrides(tmp_path / "run", tiny_bert_dir, tiny_data_root) + ["shortcut.expert=ngram",
                                                                                         "shortcut.weight=2"]) == 0
    out = capsys.readouterr().out
    block = json.loads((tmp_path / "run" / "metrics.json").read_text())["shortcut"]
    line = next(x for x in out.splitlines() if x.startswith("shortcut expert (cross-fitted word n-grams)"))
    assert f"canary rows mean p(y) {block['canary_rows']['mean_p_label']:.3f}" in line
    assert line.endswith("trained through the product of experts (weight 2)")
