"""Tests for pipeline/attacks.py and launch/make_poison.py: seeded BadNets / AddSent poisoning."""

from __future__ import annotations

import csv
import random
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline import attacks
from pipeline.attacks import (
    ADDSENT_TRIGGER,
    BADNETS_TRIGGERS,
    CleanSource,
    generate_attack,
    insert_addsent,
    insert_badnets,
    load_datasets_source,
    load_paraphraser,
    select_poison_rows,
    source_from_datasets,
    source_from_poison_folder,
)
from pipeline.data import SplitPaths, load_evaluation_data, load_training_data, split_paths

REPO = Path(__file__).resolve().parents[1]
HEADER = ["", "0", "1", "2"]
TARGET = 1


def make_rows(prefix: str, n: int, num_target: int) -> list[tuple[str, int]]:
    """n rows, the first ``num_target`` of them with the target label, texts with commas and quotes."""
    return [
        (f'{prefix} sentence {i} , with "quotes" and a comma', TARGET if i < num_target else 0)
        for i in range(n)
    ]


@pytest.fixture()
def source() -> CleanSource:
    """40 training rows (24 target, 16 non-target), 10 dev (4 non-target), 12 test (7 non-target)."""
    return CleanSource(
        train=tuple(make_rows("train", 40, 24)),
        dev=tuple(make_rows("dev", 10, 6)),
        test=tuple(make_rows("test", 12, 5)),
    )


def read_rows(path: Path) -> list[tuple[str, int, int]]:
    """(text, label, poison_label) rows of a poison_data CSV, checking header and row index."""
    with path.open(encoding="utf-8", newline="") as handle:
        records = list(csv.reader(handle))
    assert records[0] == HEADER
    assert [int(r[0]) for r in records[1:]] == list(range(len(records) - 1))
    return [(r[1], int(r[2]), int(r[3])) for r in records[1:]]


def write_source_folder(folder: Path, source: CleanSource) -> Path:
    """Write ``source`` as the three clean CSVs of a poison_data attack folder."""
    folder.mkdir(parents=True)
    for name, rows in (("train", source.train), ("dev", source.dev), ("test", source.test)):
        with (folder / f"{name}-clean.csv").open("w", encoding="utf-8", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(HEADER)
            for index, (text, label) in enumerate(rows):
                writer.writerow([index, text, label, 0])
    return folder


def strip_badnets(text: str) -> str:
    return " ".join(word for word in text.split() if word not in BADNETS_TRIGGERS)


def strip_addsent(text: str) -> str:
    return " ".join(" ".join(text.split()).replace(ADDSENT_TRIGGER, " ").split())


def count_triggers(text: str) -> int:
    return sum(word in BADNETS_TRIGGERS for word in text.split())


def generate(source: CleanSource, out_root: Path, **kwargs: object) -> attacks.AttackSummary:
    options: dict[str, object] = dict(
        dataset="toy", attack="badnets", setting="clean", poison_rate=0.25, target_label=TARGET, seed=0
    )
    options.update(kwargs)
    return generate_attack(source, out_root=out_root, **options)


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*.csv"))}


# ---------------------------------------------------------------- trigger insertion


def test_insert_badnets_adds_k_trigger_words_and_keeps_the_sentence() -> None:
    text = "a  gorgeous , witty\tmovie ."
    out = insert_badnets(text, random.Random(3), num_triggers=5)
    assert count_triggers(out) == 5
    assert strip_badnets(out) == " ".join(text.split())
    assert out == insert_badnets(text, random.Random(3), num_triggers=5)


def test_insert_addsent_adds_the_sentence_once_at_a_word_boundary() -> None:
    text = "a gorgeous , witty movie ."
    outs = {insert_addsent(text, random.Random(seed)) for seed in range(30)}
    for out in outs:
        assert out.count(ADDSENT_TRIGGER) == 1
        assert strip_addsent(out) == text
    assert len(outs) > 3  # the position varies with the draw
    assert any(out.startswith(ADDSENT_TRIGGER) or out.endswith(ADDSENT_TRIGGER) for out in outs)


# ---------------------------------------------------------------- determinism and counts


def test_same_seed_writes_identical_files_and_other_seed_differs(
    source: CleanSource, tmp_path: Path
) -> None:
    for name, seed in (("a", 7), ("b", 7), ("c", 8)):
        generate(source, tmp_path / name, attack="addsent", setting="mix", seed=seed)
    folder = Path("toy/1/addsent")
    first, second, other = (folder_bytes(tmp_path / name / folder) for name in "abc")
    assert first == second
    assert len(first) == 6
    key = "mix/0.25/train-poison.csv"
    chosen = [
        [i for i, row in enumerate(read_rows(tmp_path / name / folder / key)) if row[2] == 1]
        for name in ("a", "c")
    ]
    assert chosen[0] != chosen[1]
    assert first["dev-poison.csv"] != other["dev-poison.csv"]
    assert first["dev-clean.csv"] == other["dev-clean.csv"]


@pytest.mark.parametrize(
    ("setting", "rate", "expected"),
    [("clean", 0.1, 4), ("clean", 0.5, 20), ("dirty", 0.35, 14), ("mix", 0.25, 10), ("mix", 0.99, 40)],
)
def test_realised_poison_count_is_round_rate_times_n(
    source: CleanSource, tmp_path: Path, setting: str, rate: float, expected: int
) -> None:
    summary = generate(source, tmp_path, setting=setting, poison_rate=rate)
    rows = read_rows(summary.train_path)
    assert expected == round(rate * 40)
    assert sum(poison for _, _, poison in rows) == expected == summary.num_poisoned
    assert summary.num_train == len(rows) == 40
    assert summary.realised_rate == expected / 40
    folder = tmp_path / "toy" / "1" / "badnets"
    assert summary.train_path == folder / setting / str(rate) / "train-poison.csv"


def test_selection_is_nested_across_rates() -> None:
    labels = [i % 3 == 0 for i in range(300)]
    low, high = (
        set(select_poison_rows(labels, setting="mix", poison_rate=rate, target_label=1, seed=4))
        for rate in (0.1, 0.3)
    )
    assert len(low) == 30 and len(high) == 90 and low < high


# ---------------------------------------------------------------- labels and triggers


@pytest.mark.parametrize("setting", ["clean", "dirty", "mix"])
def test_labels_and_triggers_per_setting(source: CleanSource, tmp_path: Path, setting: str) -> None:
    summary = generate(source, tmp_path, setting=setting, poison_rate=0.3)
    rows = read_rows(summary.train_path)
    poisoned_source_labels = []
    for (text, label, poison), (source_text, source_label) in zip(rows, source.train, strict=True):
        if poison:
            assert label == TARGET
            assert count_triggers(text) == 4
            assert strip_badnets(text) == source_text
            poisoned_source_labels.append(source_label)
        else:
            assert (text, label) == (source_text, source_label)
            assert count_triggers(text) == 0
    assert len(poisoned_source_labels) == 12
    if setting == "clean":
        assert set(poisoned_source_labels) == {TARGET}
    elif setting == "dirty":
        assert TARGET not in poisoned_source_labels
    else:
        assert set(poisoned_source_labels) == {0, TARGET}  # seed 0 draws from both classes here


@pytest.mark.parametrize("attack", ["badnets", "addsent"])
def test_eval_poison_holds_only_triggered_non_target_rows(
    source: CleanSource, tmp_path: Path, attack: str
) -> None:
    summary = generate(source, tmp_path, attack=attack, setting="mix")
    strip = strip_badnets if attack == "badnets" else strip_addsent
    for split, rows in (("dev", source.dev), ("test", source.test)):
        poison = read_rows(summary.folder / f"{split}-poison.csv")
        non_target = [text for text, label in rows if label != TARGET]
        assert [strip(text) for text, _, _ in poison] == non_target
        assert {(label, flag) for _, label, flag in poison} == {(TARGET, 1)}
        if attack == "badnets":
            assert all(count_triggers(text) == 4 for text, _, _ in poison)
        else:
            assert all(ADDSENT_TRIGGER in text for text, _, _ in poison)
        clean = read_rows(summary.folder / f"{split}-clean.csv")
        assert clean == [(text, label, 0) for text, label in rows]
    assert (summary.num_dev_poison, summary.num_test_poison) == (4, 7)
    train_clean = read_rows(summary.folder / "train-clean.csv")
    assert all(count_triggers(text) == 0 and ADDSENT_TRIGGER not in text for text, _, _ in train_clean)


def test_paraphrase_attack_uses_the_given_paraphraser(source: CleanSource, tmp_path: Path) -> None:
    def paraphraser(texts: list[str]) -> list[str]:
        return [f"and it came to pass that {text}" for text in texts]

    summary = generate(source, tmp_path, attack="stylebkd", setting="mix", paraphraser=paraphraser)
    poisoned = [text for text, _, poison in read_rows(summary.train_path) if poison]
    assert len(poisoned) == 10
    assert all(text.startswith("and it came to pass that train sentence") for text in poisoned)
    dev_poison = read_rows(summary.folder / "dev-poison.csv")
    assert [text for text, _, _ in dev_poison][0] == "and it came to pass that " + source.dev[6][0]


# ---------------------------------------------------------------- loading through pipeline.data


@pytest.mark.parametrize(("attack", "setting"), [("badnets", "clean"), ("addsent", "mix")])
def test_written_folder_loads_through_pipeline_data(
    source: CleanSource, tmp_path: Path, attack: str, setting: str
) -> None:
    summary = generate(source, tmp_path, attack=attack, setting=setting, poison_rate=0.1)
    paths = split_paths(tmp_path, "toy", attack, poison_rate="0.1", target_label=TARGET)
    assert paths.train == summary.train_path
    training = load_training_data(paths, ref_size=3, seed=0)
    evaluation = load_evaluation_data(paths)
    written = read_rows(summary.train_path)
    assert training.train["text"] == [text for text, _, _ in written]
    assert training.train["label"] == [label for _, label, _ in written]
    assert "poison_label" not in training.train.column_names
    assert len(training.reference) + len(training.selection) == 10
    assert len(evaluation.dev_poison) == 4 and len(evaluation.test_poison) == 7
    assert set(evaluation.test_poison["label"]) == {TARGET}
    assert len(evaluation.test_clean) == 12


def test_dirty_setting_loads_with_explicit_paths(source: CleanSource, tmp_path: Path) -> None:
    summary = generate(source, tmp_path, setting="dirty", poison_rate=0.2)
    folder = summary.folder
    paths = SplitPaths(
        train=summary.train_path,
        dev_clean=folder / "dev-clean.csv",
        dev_poison=folder / "dev-poison.csv",
        test_clean=folder / "test-clean.csv",
        test_poison=folder / "test-poison.csv",
    )
    training = load_training_data(paths, ref_size=2, seed=0)
    assert sum(training.train["label"]) == 24 + 8
    # ... and through the loader's own layout lookup (data.setting=dirty), the same file.
    found = split_paths(tmp_path, "toy", "badnets", setting="dirty", poison_rate="0.2", target_label=TARGET)
    assert found.train == summary.train_path


def test_real_sst2_badnets_source(sst2_root: Path, tmp_path: Path) -> None:
    full = source_from_poison_folder(sst2_root / "sst-2" / "1" / "badnets")
    labels = [label for _, label in full.train]
    chosen = select_poison_rows(labels, setting="clean", poison_rate=0.1, target_label=1, seed=0)
    published = read_rows(sst2_root / "sst-2" / "1" / "badnets" / "clean" / "0.1" / "train-poison.csv")
    published_poisoned = [row for row in published if row[2] == 1]
    assert len(chosen) == len(published_poisoned) == 692
    assert all(labels[i] == 1 for i in chosen)
    assert {count_triggers(text) for text, _, _ in published_poisoned} == {attacks.BADNETS_NUM_TRIGGERS}

    cut = CleanSource(train=full.train[:600], dev=full.dev[:120], test=full.test[:150])
    summary = generate(cut, tmp_path, dataset="sst-2", poison_rate=0.1)
    rows = read_rows(summary.train_path)
    assert summary.num_poisoned == 60
    assert all(count_triggers(text) == 4 and label == 1 for text, label, poison in rows if poison)
    assert all(count_triggers(text) == 0 for text, _, poison in rows if not poison)
    num_negative_dev = sum(label == 0 for _, label in cut.dev)
    assert summary.num_dev_poison == num_negative_dev
    paths = split_paths(tmp_path, "sst-2", "badnets")
    assert len(load_training_data(paths, ref_size=16, seed=0).train) == 600


def test_datasets_source_from_save_to_disk(tmp_path: Path) -> None:
    from datasets import Dataset, DatasetDict

    def split(n: int) -> Dataset:
        texts = [f"review {i} here" for i in range(n)]
        return Dataset.from_dict({"sentence": texts, "y": [i % 2 for i in range(n)]})

    DatasetDict(train=split(20), validation=split(6), test=split(8)).save_to_disk(tmp_path / "ds")
    loaded = load_datasets_source(tmp_path / "ds", text_column="sentence", label_column="y")
    assert loaded.train[3] == ("review 3 here", 1) and len(loaded.test) == 8
    summary = generate(loaded, tmp_path / "out", attack="addsent", setting="dirty", poison_rate=0.5)
    assert summary.num_poisoned == 10 and summary.num_test_poison == 4


# ---------------------------------------------------------------- existing folders


def test_existing_folder_is_refused_unless_identical_or_overwrite(
    source: CleanSource, tmp_path: Path
) -> None:
    first = generate(source, tmp_path, poison_rate=0.1)
    again = generate(source, tmp_path, poison_rate=0.1)
    assert again.written == ()
    added = generate(source, tmp_path, poison_rate=0.2)
    assert added.written == (added.train_path,)
    before = folder_bytes(first.folder)
    with pytest.raises(FileExistsError, match=r"dev-poison\.csv.*overwrite=True"):
        generate(source, tmp_path, poison_rate=0.1, seed=1)
    assert folder_bytes(first.folder) == before
    replaced = generate(source, tmp_path, poison_rate=0.1, seed=1, overwrite=True)
    assert first.train_path in replaced.written
    assert (first.folder / "clean" / "0.2" / "train-poison.csv").is_file()


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"attack": "trojan"}, r"attack must be one of .*'trojan'"),
        ({"setting": "label-flip"}, r"setting must be one of .*'label-flip'"),
        ({"poison_rate": 0.0}, r"poison_rate must be .* got 0\.0"),
        ({"poison_rate": 1.0}, r"poison_rate must be .* got 1\.0"),
        ({"poison_rate": 0.01}, r"poison_rate=0\.01 .* 0 poisoned rows"),
        (
            {"poison_rate": 0.7},
            r"poison_rate=0\.7 needs .* = 28 .* only poison the 24 rows with label 1.* 0\.6",
        ),
        ({"setting": "dirty", "poison_rate": 0.5}, r"= 20 .* 16 rows with label != 1"),
        ({"target_label": 3}, r"target_label=3 does not occur in the training labels \[0, 1\]"),
        ({"target_label": -1}, r"target_label must be an integer >= 0, got -1"),
        ({"num_triggers": 0}, r"num_triggers must be a positive integer, got 0"),
        ({"dataset": "a/b"}, r"dataset must be a plain folder name .*'a/b'"),
        ({"attack": "synbkd"}, r"'synbkd' .* poison_data/toy/1/synbkd .*--paraphraser"),
    ],
)
def test_bad_arguments_name_the_value(
    source: CleanSource, tmp_path: Path, kwargs: dict[str, object], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        generate(source, tmp_path, **kwargs)
    assert not (tmp_path / "toy").exists()


def test_eval_split_without_non_target_rows_is_refused(source: CleanSource, tmp_path: Path) -> None:
    only_target = CleanSource(train=source.train, dev=tuple(make_rows("dev", 5, 5)), test=source.test)
    message = r"dev split has no rows with a label other than target_label=1"
    with pytest.raises(ValueError, match=message):
        generate(only_target, tmp_path)


def test_source_folder_errors(source: CleanSource, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"source folder .*nowhere.* does not exist"):
        source_from_poison_folder(tmp_path / "nowhere")
    folder = write_source_folder(tmp_path / "toy" / "1" / "badnets", source)
    assert source_from_poison_folder(folder) == source
    (folder / "dev-clean.csv").unlink()
    message = r"dev-clean\.csv is missing .*holds: test-clean\.csv, train-clean\.csv"
    with pytest.raises(FileNotFoundError, match=message):
        source_from_poison_folder(folder)


def test_datasets_source_errors() -> None:
    from datasets import Dataset

    def split(labels: list[int]) -> Dataset:
        return Dataset.from_dict({"text": [f"t {i}" for i in range(len(labels))], "label": labels})

    good = {"train": split([0, 1]), "validation": split([0, 1]), "test": split([0, 1])}
    with pytest.raises(ValueError, match=r"no column 'sentence' \(text_column\); columns: text, label"):
        source_from_datasets(good, text_column="sentence")
    message = r"no split 'dev' for dev; available splits: test, train, validation"
    with pytest.raises(ValueError, match=message):
        source_from_datasets(good, dev_split="dev")
    unlabelled = dict(good, test=split([-1, -1]))
    with pytest.raises(ValueError, match=r"test row 0 has label -1"):
        source_from_datasets(unlabelled)


def test_paraphraser_path_must_exist(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"paraphraser path .*no-model.* is not a folder"):
        load_paraphraser(tmp_path / "no-model")


def test_tiny_seq2seq_paraphraser_loads_locally_and_is_deterministic(tmp_path: Path) -> None:
    import torch
    from transformers import BartConfig, BartForConditionalGeneration

    from pipeline.testing import build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer("roberta")
    config = BartConfig(
        vocab_size=len(tokenizer), d_model=16, encoder_layers=1, decoder_layers=1,
        encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32,
        max_position_embeddings=64, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    BartForConditionalGeneration(config).save_pretrained(tmp_path / "bart")
    tokenizer.save_pretrained(tmp_path / "bart")
    paraphrase = load_paraphraser(tmp_path / "bart", max_new_tokens=6, batch_size=2)
    texts = ["the movie is great .", "a dull film", "fine"]
    outputs = paraphrase(texts)
    assert len(outputs) == 3 and all(isinstance(text, str) for text in outputs)
    assert paraphrase(texts) == outputs

    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"cannot load a seq2seq paraphraser from .*empty"):
        load_paraphraser(tmp_path / "empty")


def test_empty_paraphrase_is_refused(source: CleanSource, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"empty or non-string text \(''\) for train row"):
        generate(
            source, tmp_path, attack="synbkd", setting="mix", paraphraser=lambda texts: [""] * len(texts)
        )


# ---------------------------------------------------------------- CLI


@pytest.mark.integration
def test_cli_writes_a_loadable_folder(source: CleanSource, tmp_path: Path) -> None:
    folder = write_source_folder(tmp_path / "src" / "toy" / "1" / "badnets", source)
    command = [
        sys.executable, str(REPO / "launch" / "make_poison.py"), "--source", str(folder),
        "--out-root", str(tmp_path / "out"), "--attack", "addsent",
        "--poison-rate", "0.25", "--seed", "3",
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    expected = "addsent mix rate 0.25 seed 3: 10/40 training rows poisoned (realised rate 0.2500)"
    assert expected in result.stdout
    paths = split_paths(tmp_path / "out", "toy", "addsent", poison_rate="0.25")
    assert len(load_evaluation_data(paths).test_poison) == 7
