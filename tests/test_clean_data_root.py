"""benchmarks/clean_data_root.py: the oracle control's data root (clean training file, the attack's own eval files)."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.data import read_split, split_paths
from pipeline.testing import load_script

REPO = Path(__file__).resolve().parents[1]
HEADER = ",0,1,2\n"


def _script():
    return load_script("benchmarks/clean_data_root.py")


def _source(root: Path) -> Path:
    """A poison_data tree with two attacks whose train-poison and train-clean files differ."""
    for attack, setting in (("badnets", "clean"), ("addsent", "mix")):
        folder = root / "sst-2" / "1" / attack
        (folder / setting / "0.1").mkdir(parents=True)
        (folder / setting / "0.1" / "train-poison.csv").write_text(HEADER + "0,cf a poisoned row,1,1\n1,fine,0,0\n")
        (folder / "train-clean.csv").write_text(HEADER + "0,a clean row,0,0\n1,fine,0,0\n")
        for split in ("dev-clean", "test-clean"):
            (folder / f"{split}.csv").write_text(HEADER + f"0,{attack} {split},1,0\n")
        for split in ("dev-poison", "test-poison"):
            (folder / f"{split}.csv").write_text(HEADER + f"0,cf {attack} {split},1,1\n")
    return root


def test_training_file_is_the_clean_one_and_eval_files_are_the_attacks(tmp_path):
    source = _source(tmp_path / "src")
    out = tmp_path / "out"
    made = _script().build(source, out, "sst-2", 1, None)
    assert sorted(p.relative_to(out).as_posix() for p in made) == [
        "sst-2/1/addsent/mix/0.1/train-poison.csv", "sst-2/1/badnets/clean/0.1/train-poison.csv"]
    for attack in ("badnets", "addsent"):
        paths = split_paths(out, "sst-2", attack)  # the loader's own resolution of setting "auto"
        train = read_split(paths.train, keep_poison_label=True)
        assert list(train["text"]) == ["a clean row", "fine"] and set(train["poison_label"]) == {0}
        assert paths.test_poison.read_text() == (source / "sst-2" / "1" / attack / "test-poison.csv").read_text()
        assert paths.dev_clean.resolve() == (source / "sst-2" / "1" / attack / "dev-clean.csv").resolve()
    # idempotent: a second build keeps the same links
    assert _script().build(source, out, "sst-2", 1, ["badnets"]) == [made[1]]


def test_refuses_to_replace_a_different_file(tmp_path):
    source = _source(tmp_path / "src")
    out = tmp_path / "out"
    victim = out / "sst-2" / "1" / "badnets" / "dev-clean.csv"
    victim.parent.mkdir(parents=True)
    victim.write_text("mine\n")
    with pytest.raises(SystemExit, match=r"dev-clean\.csv exists and is not a link to .*Fix: choose another --out-root"):
        _script().build(source, out, "sst-2", 1, ["badnets"])
    assert victim.read_text() == "mine\n"


def test_names_a_missing_clean_file(tmp_path):
    source = _source(tmp_path / "src")
    (source / "sst-2" / "1" / "addsent" / "train-clean.csv").unlink()
    with pytest.raises(SystemExit, match=r"addsent lacks train-clean\.csv"):
        _script().build(source, tmp_path / "out", "sst-2", 1, ["addsent"])
