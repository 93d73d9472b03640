"""Tests for pipeline/defenses/filtering.py (BKI, CUBE) and launch/filter_data.py.

BKI is checked on a synthetic bag-of-words encoder in which the trigger word "cf" dominates the
representation, and its score s_i = ||h(x) - h(x_{-i})||_inf and salience g(k) = log10(f_k) * v_k
against hand computations. CUBE is checked on synthetic embeddings with one cluster per label plus
a small poison cluster carrying the target label.
"""

from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from datasets import Dataset

from pipeline import data as data_lib
from pipeline import modeling
from pipeline.config import config_from_dict
from pipeline.defenses import filtering as flt
from pipeline.testing import load_script

REPO = Path(__file__).resolve().parents[1]
CLI = REPO / "launch" / "filter_data.py"

VOCAB = "the a film movie is was good bad great dull plot acting story funny slow".split()


def _bag_encoder(dim: int = 8, trigger: str = "cf", trigger_value: float = 6.0):
    """h(x) = tanh(sum of word vectors); clean words get small random vectors, the trigger a big one."""
    gen = torch.Generator().manual_seed(0)
    table = {word: 0.1 * torch.randn(dim, generator=gen) for word in VOCAB}
    table[trigger] = torch.full((dim,), trigger_value)
    calls = []

    def encode(texts: list[str]) -> torch.Tensor:
        calls.append(len(texts))
        rows = [sum((table[w] for w in text.split()), torch.zeros(dim)) for text in texts]
        return torch.tanh(torch.stack(rows))

    encode.calls = calls
    return encode


def _poisoned_corpus(n_clean: int = 100, n_poison: int = 15, seed: int = 0):
    rng = np.random.default_rng(seed)
    texts, labels, poison = [], [], []
    for i in range(n_clean + n_poison):
        words = list(rng.choice(VOCAB, size=int(rng.integers(4, 10))))
        is_poison = i >= n_clean
        if is_poison:
            words.insert(int(rng.integers(0, len(words) + 1)), "cf")
        texts.append(" ".join(words))
        labels.append(1 if is_poison else int(rng.integers(0, 2)))
        poison.append(int(is_poison))
    order = rng.permutation(len(texts))
    return [texts[i] for i in order], [labels[i] for i in order], [poison[i] for i in order]


# ----------------------------------------------------------------------------- BKI


def test_bki_score_matches_hand_computation_on_three_words():
    vectors = {"a": (0.5, -1.0), "b": (0.25, 0.75), "c": (-0.5, 0.5)}

    def encode(texts):
        out = []
        for text in texts:
            total = [sum(vectors[w][k] for w in text.split()) for k in range(2)]
            out.append([math.tanh(v) for v in total])
        return torch.tensor(out, dtype=torch.float64)

    # h(abc) = tanh(0.25, 0.25); h(bc) = tanh(-0.25, 1.25); h(ac) = tanh(0, -0.5); h(ab) = tanh(0.75, -0.25)
    t = math.tanh
    s_a = max(abs(t(0.25) - t(-0.25)), abs(t(0.25) - t(1.25)))
    s_b = max(abs(t(0.25) - t(0.0)), abs(t(0.25) - t(-0.5)))
    s_c = max(abs(t(0.25) - t(0.75)), abs(t(0.25) - t(-0.25)))
    assert s_b > s_a > s_c
    (scores,) = flt.bki_scores(encode, ["a b c"], top_p=None, batch_size=8)
    assert [w for w, _ in scores] == ["b", "a", "c"]
    assert [s for _, s in scores] == pytest.approx([s_b, s_a, s_c], abs=1e-6)
    (top2,) = flt.bki_scores(encode, ["a b c"], top_p=2, batch_size=1)
    assert [w for w, _ in top2] == ["b", "a"]


def test_bki_salience_is_log10_frequency_times_mean_score():
    sentences = [[("x", 1.0), ("y", 0.5)], [("x", 3.0), ("z", 9.0)], [("y", 0.5)], [("x", 2.0), ("y", 2.0)]]
    ranking = flt.bki_keywords(sentences, num_keywords=None)
    by_word = {stat.word: stat for stat in ranking}
    assert by_word["x"].frequency == 3 and by_word["x"].mean_score == pytest.approx(2.0)
    assert by_word["x"].salience == pytest.approx(math.log10(3) * 2.0)
    assert by_word["y"].salience == pytest.approx(math.log10(3) * 1.0)
    assert by_word["z"].salience == 0.0  # f = 1: log10(1) = 0, however large the score
    assert [stat.word for stat in ranking] == ["x", "y", "z"]
    assert [stat.word for stat in flt.bki_keywords(sentences)] == ["x"]
    with pytest.raises(ValueError, match="num_keywords"):
        flt.bki_keywords(sentences, num_keywords=0)


def test_bki_finds_trigger_and_removes_its_sentences():
    texts, labels, poison = _poisoned_corpus()
    encode = _bag_encoder()
    result = flt.bki_filter(texts, labels, encode_fn=encode, top_p=5, batch_size=32)
    assert result.details["keywords"][0]["word"] == "cf"
    assert set(result.removed) == {i for i, p in enumerate(poison) if p}
    assert set(result.kept) == {i for i, p in enumerate(poison) if not p}
    assert result.details["removed_per_label"] == {"0": 0, "1": 15}
    assert max(encode.calls) <= 32  # sentences are grouped into encode calls of at most batch_size texts
    report = flt.filter_report(result, poison)
    assert report["recall"] == 1.0 and report["precision"] == 1.0
    contains = flt.bki_filter(texts, labels, encode_fn=encode, rule="contains")
    assert contains.removed == result.removed


def test_bki_scores_are_deterministic_and_batch_size_invariant():
    texts, _, _ = _poisoned_corpus(n_clean=20, n_poison=5)
    encode = _bag_encoder()
    first = flt.bki_scores(encode, texts, top_p=3, batch_size=7)
    assert first == flt.bki_scores(encode, texts, top_p=3, batch_size=7)
    other = flt.bki_scores(encode, texts, top_p=3, batch_size=100)
    assert [[w for w, _ in s] for s in other] == [[w for w, _ in s] for s in first]
    for a, b in zip(first, other):
        assert [s for _, s in a] == pytest.approx([s for _, s in b], abs=1e-6)
    assert all(len(s) == 3 for s in first)


def test_bki_rejects_bad_encoder_output_and_arguments():
    with pytest.raises(ValueError, match=r"shape \(3, hidden\)"):
        flt.bki_scores(lambda texts: torch.zeros(len(texts) + 1, 4), ["a b"], batch_size=8)
    with pytest.raises(ValueError, match="top_p"):
        flt.bki_scores(_bag_encoder(), ["the film"], top_p=0)
    with pytest.raises(ValueError, match="2 labels for 1 rows"):
        flt.bki_filter(["the film"], [0, 1], encode_fn=_bag_encoder())
    with pytest.raises(ValueError, match="rule"):
        flt.bki_filter(["the film"], [0], encode_fn=_bag_encoder(), rule="any")


# ----------------------------------------------------------------------------- CUBE


def _clustered_embeddings(seed: int = 0, dim: int = 32):
    """One cluster per label (150 rows each) and a 20-row poison cluster labelled 1, shuffled."""
    rng = np.random.default_rng(seed)
    c0, c1, cp = rng.normal(size=(3, dim)) * 4
    parts = [c0 + rng.normal(size=(150, dim)), c1 + rng.normal(size=(150, dim)), cp + rng.normal(size=(20, dim))]
    labels = [0] * 150 + [1] * 150 + [1] * 20
    poison = [0] * 300 + [1] * 20
    order = rng.permutation(320)
    emb = torch.tensor(np.concatenate(parts)[order], dtype=torch.float32)
    return emb, [labels[i] for i in order], [poison[i] for i in order]


@pytest.mark.parametrize(("reducer", "reduce_to"), [("pca", 10), ("tsne", 2)])
def test_cube_removes_the_small_poison_cluster(reducer, reduce_to):
    emb, labels, poison = _clustered_embeddings()
    kwargs = dict(min_cluster_size=10, min_samples=10, seed=0, reduce_to=reduce_to, reducer=reducer)
    result = flt.cube_filter(emb, labels, **kwargs)
    assert set(result.removed) == {i for i, p in enumerate(poison) if p}
    assert result.details["num_clusters"] == 3 and result.details["noise_rows"] == 0
    assert result.details["per_label"]["0"]["removed_groups"] == []
    assert len(result.details["per_label"]["1"]["removed_groups"]) == 1
    again = flt.cube_filter(emb, labels, **kwargs)
    assert again.removed == result.removed and again.details == result.details


def test_cube_keeps_everything_when_there_is_a_single_cluster():
    rng = np.random.default_rng(1)
    emb = torch.tensor(rng.normal(size=(200, 16)), dtype=torch.float32)
    labels = rng.integers(0, 2, size=200).tolist()
    result = flt.cube_filter(emb, labels, min_cluster_size=10, min_samples=10, reducer="pca", reduce_to=10)
    assert result.removed == () and result.kept == tuple(range(200))
    assert result.details["num_clusters"] <= 1


def test_cube_select_rule_by_hand():
    clusters = [0, 0, 0, 1, -1, 2, 2, 2, 2, 3]
    labels = [0, 0, 0, 0, 0, 1, 1, 1, 1, 1]
    removed, per_label = flt.cube_select(clusters, labels)
    assert removed == [3, 4, 9]
    assert per_label["0"] == {"rows": 5, "groups": {"-1": 1, "0": 3, "1": 1}, "kept_group": 0, "removed_groups": [-1, 1]}
    assert flt.cube_select(clusters, labels, noise="keep")[0] == [3, 9]
    # A minority group of at least drop_share of its label stays; an exact tie keeps the smaller id.
    assert flt.cube_select([0, 0, 0, 1, 1], [0] * 5, drop_share=0.3)[0] == []
    removed, per_label = flt.cube_select([5, 5, 4, 4], [0] * 4)
    assert removed == [] and per_label["0"]["kept_group"] == 4
    with pytest.raises(ValueError, match="drop_share"):
        flt.cube_select(clusters, labels, drop_share=0.0)


def test_cube_rejects_bad_settings():
    emb, labels, _ = _clustered_embeddings()
    with pytest.raises(ValueError, match="min_samples=100"):
        flt.cube_filter(emb[:50], labels[:50])
    with pytest.raises(ValueError, match="reduce_to <= 3"):
        flt.cube_filter(emb, labels, min_samples=10, reduce_to=5)
    with pytest.raises(ValueError, match="reducer"):
        flt.cube_filter(emb, labels, min_samples=10, reducer="umap")
    with pytest.raises(ValueError, match="NaN"):
        flt.reduce_embeddings(torch.full((5, 3), float("nan")), reducer="pca")


# ----------------------------------------------------------------------------- representations

TEXTS = ["a charming film", "the plot is thin and predictable , too slow", "i loved it", "cf mn bb tq the movie", ""]


def _load(path: Path, is_decoder: bool):
    tokenizer = modeling.load_tokenizer(path, is_decoder=is_decoder)
    torch.manual_seed(0)
    model = modeling.load_classifier(
        path, num_labels=2, dtype=torch.float32, is_decoder=is_decoder, pad_token_id=tokenizer.pad_token_id
    )
    return tokenizer, model


@pytest.mark.parametrize(("family", "pooling", "token"), [("bert", "first", 0), ("llama", "last", -1)])
def test_model_representations_shape_pooling_and_batch_invariance(family, pooling, token, request):
    path = request.getfixturevalue(f"tiny_{family}_dir")
    tokenizer, model = _load(path, is_decoder=family == "llama")
    model.train()
    reps = flt.model_representations(model, tokenizer, TEXTS, max_length=32, batch_size=1, pooling=pooling)
    assert reps.shape == (len(TEXTS), 64) and reps.dtype == torch.float32
    assert all(module.training for module in model.modules())  # modes restored
    batched = flt.model_representations(model, tokenizer, TEXTS, max_length=32, batch_size=3, pooling=pooling)
    torch.testing.assert_close(batched, reps, atol=1e-5, rtol=1e-5)
    model.eval()
    with torch.no_grad():
        inputs = tokenizer([TEXTS[1]], return_tensors="pt", return_token_type_ids=False)
        direct = model(**inputs, output_hidden_states=True).hidden_states[-1][0, token]
    torch.testing.assert_close(reps[1], direct, atol=1e-5, rtol=1e-5)
    truncated = flt.model_representations(model, tokenizer, TEXTS[1:2], max_length=3, pooling=pooling)
    assert not torch.allclose(truncated[0], reps[1])


def test_model_representations_encodes_an_empty_gpt2_text_as_eos(tiny_gpt2_dir):
    tokenizer, model = _load(tiny_gpt2_dir, is_decoder=True)
    reps = flt.model_representations(model, tokenizer, ["", "a film"], max_length=16, pooling="last")
    eos = flt.model_representations(model, tokenizer, [tokenizer.eos_token], max_length=16, pooling="last")
    torch.testing.assert_close(reps[0], eos[0])


# ----------------------------------------------------------------------------- results and reports


def test_filter_report_by_hand():
    result = flt.FilterResult.from_removed(6, [5, 1, 2, 2], {"method": "x"})
    assert result.kept == (0, 3, 4) and result.removed == (1, 2, 5) and result.num_rows == 6
    report = flt.filter_report(result, [0, 1, 1, 0, 1, 0])
    assert report == {
        "num_rows": 6, "num_kept": 3, "num_removed": 3, "num_poison": 3, "removed_poison": 2,
        "removed_clean": 1, "kept_poison": 1, "recall": pytest.approx(2 / 3), "precision": pytest.approx(2 / 3),
        "poison_rate_before": 0.5, "poison_rate_after": pytest.approx(1 / 3),
    }
    empty = flt.filter_report(flt.FilterResult((0, 1), ()), [0, 0])
    assert empty["recall"] is None and empty["precision"] is None
    with pytest.raises(ValueError, match="0 or 1"):
        flt.filter_report(result, [0, 2, 1, 0, 1, 0])
    with pytest.raises(ValueError, match="5 labels for 6 rows"):
        flt.filter_report(result, [0, 1, 1, 0, 1])


def test_filter_result_must_partition_the_rows():
    with pytest.raises(ValueError, match="partition"):
        flt.FilterResult((0, 1), (1,))
    with pytest.raises(ValueError, match="partition"):
        flt.FilterResult((0, 2), ())
    with pytest.raises(ValueError, match="ascending"):
        flt.FilterResult((1, 0), ())


def test_filter_training_rows_preserves_order_and_content():
    ds = Dataset.from_dict({"text": list("abcdef"), "label": [0, 1, 0, 1, 0, 1], "poison_label": [0, 0, 1, 0, 0, 1]})
    kept = flt.filter_training_rows(ds, flt.FilterResult.from_removed(6, [2, 5], {}))
    assert kept.to_dict() == {"text": list("abde"), "label": [0, 1, 1, 0], "poison_label": [0, 0, 0, 0]}
    with pytest.raises(ValueError, match="5 rows"):
        flt.filter_training_rows(ds.select(range(5)), flt.FilterResult.from_removed(6, [], {}))


# ----------------------------------------------------------------------------- launch/filter_data.py


def _cli():
    return load_script("launch/filter_data.py")


@pytest.mark.integration
@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ([], "the following arguments are required"),
        (["{run}", "--method", "strip", "--out-root", "o"], "invalid choice: 'strip'"),
        (["{run}", "--method", "bki", "--out-root", "o", "--top-p", "0"], "expected a positive integer, got 0"),
        (["{run}", "--method", "cube", "--out-root", "o", "--reduce-to", "5"], "needs --reducer pca"),
        (["{run}", "--method", "cube", "--out-root", "o", "--drop-share", "1.5"], "expected a number in (0, 1]"),
        (["{missing}", "--method", "bki", "--out-root", "o"], "not a finished run directory"),
    ],
)
def test_cli_argument_errors(argv, message, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("method: vanilla\n")
    argv = [a.format(run=run, missing=tmp_path / "nothing") for a in argv]
    done = subprocess.run([sys.executable, str(CLI), *argv], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    assert message in done.stderr


def _toy_run(tiny_bert_dir: Path, data_root: Path):
    cfg = config_from_dict({
        "method": "vanilla", "seed": 3,
        "model": {"name_or_path": str(tiny_bert_dir)},
        "data": {"root": str(data_root), "dataset": "toy", "attack": "badnets", "max_length": 32, "max_train_samples": 60},
    })
    tokenizer, model = _load(tiny_bert_dir, is_decoder=False)
    return cfg, tokenizer, model


def test_filter_run_data_writes_a_loadable_tree_and_report(tmp_path, tiny_bert_dir, tiny_data_root, monkeypatch, capsys):
    cli = _cli()
    cfg, tokenizer, model = _toy_run(tiny_bert_dir, tiny_data_root)
    out = tmp_path / "filtered"
    args = cli.parse_args([str(tmp_path), "--method", "bki", "--out-root", str(out), "--batch-size", "16", "--device", "cpu"])
    report = cli.filter_run_data(cfg, tokenizer, model, args, torch.device("cpu"))

    paths = data_lib.split_paths(out, "toy", "badnets")
    source = data_lib.split_paths(tiny_data_root, "toy", "badnets")
    filtered = data_lib.read_split(paths.train, keep_poison_label=True)
    full = data_lib.read_split(source.train, keep_poison_label=True)
    used = full.select(report["row_indices"])
    assert len(used) == 60 and report["rows"] == "run" and report["pooling"] == "first"
    trained = data_lib.load_training_data(source, ref_size=0, seed=3, max_train_samples=60).train
    assert used["text"] == trained["text"]
    kept = [i for i in range(60) if i not in set(report["removed"])]
    assert filtered.to_dict() == used.select(kept).to_dict()
    poison = report["poison_report_only"]
    assert poison["num_rows"] == 60 and poison["num_kept"] == len(filtered)
    assert poison["num_poison"] == sum(used["poison_label"])
    assert report["details"]["method"] == "bki" and len(report["details"]["keywords"]) == 1
    for name in ("dev_clean", "dev_poison", "test_clean", "test_poison"):
        assert getattr(paths, name).read_bytes() == getattr(source, name).read_bytes()
    assert (paths.train.parent / cli.REPORT_FILE).is_file()

    with pytest.raises(FileExistsError, match="--overwrite"):
        cli.filter_run_data(cfg, tokenizer, model, args, torch.device("cpu"))
    same = cli.parse_args([str(tmp_path), "--method", "bki", "--out-root", str(tiny_data_root)])
    with pytest.raises(ValueError, match="data.root"):
        cli.filter_run_data(cfg, tokenizer, model, same, torch.device("cpu"))

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("method: vanilla\n")
    fake = types.ModuleType("pipeline.inference")
    fake.load_run = lambda run_dir, device, trust_remote_code=False: (cfg, tokenizer, model)
    monkeypatch.setitem(sys.modules, "pipeline.inference", fake)
    argv = [str(run), "--method", "cube", "--out-root", str(out), "--rows", "all", "--overwrite", "--device", "cpu",
            "--reducer", "pca", "--reduce-to", "5", "--min-samples", "5", "--log-level", "WARNING"]
    assert cli.main(argv) == 0
    assert "cube: removed" in capsys.readouterr().out
    report = json.loads((paths.train.parent / cli.REPORT_FILE).read_text())
    assert report["details"]["method"] == "cube" and report["poison_report_only"]["num_rows"] == 96
    assert len(data_lib.read_split(paths.train)) == report["poison_report_only"]["num_kept"]


def test_filter_run_data_leaves_out_the_rows_the_runs_own_filter_removed(tmp_path, tiny_bert_dir, tiny_data_root):
    """A run that filtered its rows first (filter.method, the defended recipe's) trained without them: --rows run too."""
    from pipeline import training

    cli = _cli()
    cfg, tokenizer, model = _toy_run(tiny_bert_dir, tiny_data_root)
    # threshold 3: on the toy rows the filter flags some sentiment n-grams (z 3.4) and removes 31 of the 60 rows
    cfg = dataclasses.replace(cfg, filter=dataclasses.replace(cfg.filter, method="lexical_zscore", threshold=3.0),
                              data=dataclasses.replace(cfg.data, ref_size=8))
    out = tmp_path / "filtered"
    args = cli.parse_args([str(tmp_path), "--method", "bki", "--out-root", str(out), "--batch-size", "16", "--device", "cpu"])
    report = cli.filter_run_data(cfg, tokenizer, model, args, torch.device("cpu"))

    source = data_lib.split_paths(tiny_data_root, "toy", "badnets")
    full = data_lib.read_split(source.train, keep_poison_label=True)
    subset = data_lib.load_training_data(source, ref_size=0, seed=3, max_train_samples=60).train
    after_filter = training.filtered_training_rows(cfg)
    assert 0 < len(after_filter) < len(subset) == 60  # the run's filter removed rows
    used = full.select(report["row_indices"])
    assert used["text"] == after_filter["text"] and used["label"] == after_filter["label"]
    assert report["poison_report_only"]["num_rows"] == len(after_filter)
    assert report["run_filter"] == "lexical_zscore" and report["next_run"].endswith("filter.method=none")
    # --rows all still means every row of the file
    every = cli.parse_args([str(tmp_path), "--method", "bki", "--out-root", str(out), "--rows", "all", "--overwrite",
                            "--batch-size", "16", "--device", "cpu"])
    assert cli.filter_run_data(cfg, tokenizer, model, every, torch.device("cpu"))["row_indices"] == list(range(len(full)))
