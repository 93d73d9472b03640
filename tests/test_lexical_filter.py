"""The lexical z-score filter (pipeline/defenses/lexical.py) and its wiring into a run (filter.*)."""

from __future__ import annotations

import json
import math
import random

import pytest

from pipeline import training
from pipeline.config import ConfigError, load_config, resolve_defaults
from pipeline.defenses import lexical

NATURAL_POS = [f"pos{i}" for i in range(20)]
NATURAL_NEG = [f"neg{i}" for i in range(20)]
NEUTRAL = ["the", "film", "a", "story", "it", "is", "and", "plot", "cast", "scene", "music", "ending"]


def _natural(rng: random.Random, n: int) -> tuple[list[str], list[int]]:
    """Rows whose sentiment words agree with the label 70% of the time (no word predicts it perfectly)."""
    texts, labels = [], []
    for _ in range(n):
        label = rng.randrange(2)
        agree = rng.random() < 0.7
        pool = (NATURAL_POS if label else NATURAL_NEG) if agree else (NATURAL_NEG if label else NATURAL_POS)
        words = rng.sample(NEUTRAL, 5) + [rng.choice(pool)]
        rng.shuffle(words)
        texts.append(" ".join(words))
        labels.append(label)
    return texts, labels


def test_zscore_matches_the_formula_by_hand():
    # 8 rows, half labelled 1; "cf" in 4 rows, all labelled 1: z = (1 - 0.5) / sqrt(0.25 / 4) = 2
    texts = ["cf a", "cf b", "cf c", "cf d", "e", "f", "g", "h"]
    labels = [1, 1, 1, 1, 0, 0, 0, 0]
    z = lexical.zscores(texts, labels, max_n=1, min_count=4)
    assert z[("cf", 1)] == pytest.approx(2.0)
    assert z[("cf", 0)] == pytest.approx(-2.0)
    assert set(z) == {("cf", 0), ("cf", 1)}  # every other word is in fewer than min_count rows
    # a bigram counts once per row, and case does not matter
    z2 = lexical.zscores(["Watch This x", "watch this y", "watch this z", "q", "r", "s"], [1, 1, 1, 0, 0, 1], max_n=2, min_count=3)
    p0 = 4 / 6
    assert z2[("watch this", 1)] == pytest.approx((1 - p0) / math.sqrt(p0 * (1 - p0) / 3))


def test_z_grows_with_sqrt_rows_and_the_calibrated_threshold_follows():
    rng = random.Random(3)
    texts, labels = _natural(rng, 400)
    trusted, trusted_labels = _natural(rng, 200)
    z1 = lexical.zscores(texts, labels)
    z4 = lexical.zscores(texts * 4, labels * 4)
    for pair, value in z1.items():
        assert z4[pair] == pytest.approx(2 * value)
    tau1, top = lexical.calibrated_threshold(trusted, trusted_labels, 400, margin=1.5)
    tau4, _ = lexical.calibrated_threshold(trusted, trusted_labels, 1600, margin=1.5)
    assert tau4 == pytest.approx(2 * tau1)
    assert tau1 == pytest.approx(1.5 * top * math.sqrt(400 / 200))
    # so the same data, four times over, flags the same pairs
    one = lexical.lexical_filter(texts, labels, trusted_texts=trusted, trusted_labels=trusted_labels)
    four = lexical.lexical_filter(texts * 4, labels * 4, trusted_texts=trusted, trusted_labels=trusted_labels)
    assert [(f["feature"], f["label"]) for f in one.details["flagged"]] == [
        (f["feature"], f["label"]) for f in four.details["flagged"]]


def test_filter_removes_the_insertion_trigger_rows_with_its_label_and_nothing_natural():
    rng = random.Random(0)
    texts, labels = _natural(rng, 2000)
    trusted, trusted_labels = _natural(rng, 400)
    poisoned = [i for i in range(2000) if labels[i] == 0][:250]  # a label-flip insertion attack, target 1
    for i in poisoned:
        texts[i] = "zq " + texts[i]
        labels[i] = 1
    lone = next(i for i in range(2000) if labels[i] == 0 and i not in poisoned)
    texts[lone] = "zq " + texts[lone]  # the trigger word in a row that keeps label 0: not removed
    result = lexical.lexical_filter(texts, labels, trusted_texts=trusted, trusted_labels=trusted_labels)
    flagged = result.details["flagged"]
    assert list(result.removed) == sorted(poisoned)
    assert lone in result.kept and len(result.kept) + len(result.removed) == 2000
    assert {(f["feature"], f["label"]) for f in flagged} >= {("zq", 1)}
    assert all("zq" in f["feature"] for f in flagged)  # only the trigger and n-grams holding it
    assert flagged[0]["rows_removed"] == 250 and result.details["threshold"] < flagged[0]["z"]
    # a paraphrase-style attack (no word of its own) gives the filter nothing to find
    clean_texts, clean_labels = _natural(random.Random(1), 2000)
    assert lexical.lexical_filter(clean_texts, clean_labels, trusted_texts=trusted, trusted_labels=trusted_labels).removed == ()


def test_given_threshold_skips_the_calibration_and_bad_input_says_what_to_change():
    texts = ["cf a", "cf b", "cf c", "cf d", "e", "f", "g", "h"]
    labels = [1, 1, 1, 1, 0, 0, 0, 0]
    result = lexical.lexical_filter(texts, labels, threshold=1.5, max_n=1, min_count=4)
    assert list(result.removed) == [0, 1, 2, 3] and result.details["trusted_max_z"] is None
    assert lexical.lexical_filter(texts, labels, threshold=2.5, max_n=1, min_count=4).removed == ()
    with pytest.raises(ValueError, match="filter.min_count"):
        lexical.lexical_filter(texts, labels, trusted_texts=["x", "y"], trusted_labels=[0, 1])
    with pytest.raises(ValueError, match="as many labels"):
        lexical.zscores(["a"], [0, 1])


# ----------------------------------------------------------------------------- wiring into a run


def _tiny_args(tmp_path, model_dir, data_root, *overrides) -> list[str]:
    return [
        f"output_dir={tmp_path / 'run'}", f"model.name_or_path={model_dir}", f"data.root={data_root}",
        "data.dataset=toy", "data.attack=badnets", "data.max_length=16", "data.ref_size=8", "train.epochs=1",
        "train.batch_size=8", "train.eval_batch_size=16", "train.lr=1e-3", "mslr.scales=[1,2,4]",
        "canary.rate=0.1", "method=lora", *overrides,
    ]


def _tiny_cfg(tmp_path, model_dir, data_root, *overrides):
    cfg = load_config(None, _tiny_args(tmp_path, model_dir, data_root, *overrides))
    return resolve_defaults(cfg, model_type="bert", hidden_size=64, is_decoder=False)


def test_config_keys_defaults_and_errors(tmp_path, tiny_bert_dir, tiny_data_root):
    cfg = _tiny_cfg(tmp_path, tiny_bert_dir, tiny_data_root)
    assert (cfg.filter.method, cfg.filter.threshold, cfg.filter.margin, cfg.filter.max_n, cfg.filter.min_count) == (
        "none", None, 1.5, 2, 5)
    with pytest.raises(ConfigError, match="filter.method"):
        load_config(None, ["filter.method=zdefence"])
    with pytest.raises(ConfigError, match="filter.margin"):
        load_config(None, ["filter.margin=0"])
    # a filter that leaves nothing (or one class) to train on stops before anything is written
    cfg = _tiny_cfg(tmp_path, tiny_bert_dir, tiny_data_root, "filter.method=lexical_zscore", "filter.threshold=0.01",
                    "filter.max_n=1", "filter.min_count=1")
    _, rows = training._training_data(cfg)
    with pytest.raises(ConfigError, match="raise filter.margin or filter.threshold"):
        training._filter_rows(cfg, rows)
    assert not (tmp_path / "run").exists()


def test_the_run_trains_on_the_kept_rows_plants_the_canary_after_and_reports(tmp_path, tiny_bert_dir, tiny_data_root,
                                                                             capsys):
    from launch import train as launcher

    filtering = ("filter.method=lexical_zscore", "filter.threshold=3.2", "filter.max_n=1")
    cfg = _tiny_cfg(tmp_path, tiny_bert_dir, tiny_data_root, *filtering)
    _, rows = training._training_data(cfg)
    kept, report = training._filter_rows(cfg, rows)
    direct = lexical.lexical_filter(list(rows.train["text"]), list(rows.train["label"]), threshold=3.2, max_n=1)
    assert 0 < len(direct.removed) < len(rows.train)
    assert list(kept.train["text"]) == [rows.train["text"][i] for i in direct.kept]
    assert report["rows_removed"] == len(direct.removed) and report["threshold"] == 3.2
    assert kept.reference is rows.reference and kept.selection is rows.selection  # trusted rows untouched
    planted, canary = training._plant_canary(cfg, kept)
    assert len(planted.train) == len(kept.train) and len(canary.planted) == round(0.1 * len(kept.train))

    assert launcher.main(_tiny_args(tmp_path, tiny_bert_dir, tiny_data_root, *filtering)) == 0
    out = capsys.readouterr().out
    assert f"filter lexical_zscore: removed {len(direct.removed)} of {len(rows.train)} training rows" in out
    assert repr(direct.details["flagged"][0]["feature"]) in out and "filter-report.json" in out
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    on_disk = json.loads((tmp_path / "run" / training.FILTER_REPORT).read_text())
    assert on_disk["rows_removed"] == len(direct.removed)
    assert [r["text"] for r in on_disk["removed_rows"]] == [rows.train["text"][i] for i in direct.removed]
    assert metrics["filter"]["rows_kept"] == len(direct.kept) and "removed_rows" not in metrics["filter"]
    assert metrics["config"]["filter"]["method"] == "lexical_zscore"


def test_auto_threshold_is_calibrated_on_the_trusted_rows(tmp_path, tiny_bert_dir, tiny_data_root):
    cfg = _tiny_cfg(tmp_path, tiny_bert_dir, tiny_data_root, "filter.method=lexical_zscore", "filter.min_count=2")
    _, rows = training._training_data(cfg)
    trusted = [*rows.reference["text"], *rows.selection["text"]]
    trusted_labels = [*rows.reference["label"], *rows.selection["label"]]
    tau, top = lexical.calibrated_threshold(trusted, trusted_labels, len(rows.train), margin=1.5, min_count=2)
    _, report = training._filter_rows(cfg, rows)
    assert report["threshold"] == pytest.approx(tau) and report["trusted_max_z"] == pytest.approx(top)
    assert report["trusted_rows"] == len(trusted)
