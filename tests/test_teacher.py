"""Teacher-checked labels (filter.teacher, pipeline/defenses/teacher.py).

The label check against hand-written expectations, the dataset it returns, and two tiny runs on the real
SST-2 files: a teacher, then students that relabel / drop the rows the teacher contradicts (the report
re-checked with the teacher rebuilt independently through pipeline.inference), and the refusals.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from datasets import ClassLabel, Dataset, Features, Value
from torch.utils.data import DataLoader

from pipeline import data as data_lib
from pipeline.config import ConfigError, load_config
from pipeline.defenses.teacher import apply_check, check_labels
from pipeline.evaluate import predict
from pipeline.inference import load_run
from pipeline.testing import run_probabilities
from pipeline.training import FILTER_REPORT, run_training


def test_check_labels_relabel_and_drop():
    labels = [0, 1, 1, 0, 1, 0]
    teacher = [0, 0, 1, 1, 1, 1]
    relabel = check_labels(labels, teacher, "relabel")
    assert relabel.contradicted == (1, 3, 5)
    assert relabel.kept == (0, 1, 2, 3, 4, 5)
    assert relabel.labels == tuple(teacher)
    assert relabel.transitions == {(0, 1): 2, (1, 0): 1}
    drop = check_labels(labels, teacher, "drop")
    assert drop.kept == (0, 2, 4)
    assert drop.labels == (0, 1, 1)
    assert drop.contradicted == relabel.contradicted


def test_check_labels_relabels_only_sure_contradictions():
    labels = [0, 1, 1, 0, 1, 0]
    teacher = [0, 0, 1, 1, 1, 1]
    sure = [0.99, 0.95, 0.6, 0.7, 0.51, 0.8]  # the teacher's probability of its own prediction
    check = check_labels(labels, teacher, "relabel", confidences=sure, min_confidence=0.8)
    assert check.contradicted == (1, 3, 5)
    assert check.unsure == (3,)  # contradicted at 0.7 < 0.8: dropped, not relabelled
    assert check.kept == (0, 1, 2, 4, 5)  # agreed rows stay whatever the teacher's confidence (2 and 4)
    assert check.labels == (0, 0, 1, 1, 1)
    assert check.transitions == {(0, 1): 2, (1, 0): 1}  # every contradiction is counted, sure or not
    # the threshold is inclusive, and 0 is plain relabel
    assert check_labels(labels, teacher, "relabel", confidences=sure, min_confidence=0.7).unsure == ()
    assert check_labels(labels, teacher, "relabel", confidences=sure).kept == tuple(range(6))


def test_check_labels_refuses_bad_input():
    with pytest.raises(ValueError, match="teacher action 'flip'"):
        check_labels([0, 1], [0, 1], "flip")
    with pytest.raises(ValueError, match="3 teacher predictions for 2 rows"):
        check_labels([0, 1], [0, 1, 1], "drop")
    with pytest.raises(ValueError, match="applies to relabel only"):
        check_labels([0, 1], [0, 1], "drop", confidences=[0.9, 0.9], min_confidence=0.8)
    with pytest.raises(ValueError, match="needs one teacher confidence per row"):
        check_labels([0, 1], [0, 1], "relabel", min_confidence=0.8)
    with pytest.raises(ValueError, match="outside"):
        check_labels([0, 1], [0, 1], "relabel", confidences=[0.9, 0.9], min_confidence=1.5)


def test_apply_check_keeps_columns_and_label_type():
    features = Features({"text": Value("string"), "label": ClassLabel(num_classes=2), "poison_label": Value("int64")})
    ds = Dataset.from_dict({"text": ["a", "b", "c"], "label": [0, 1, 0], "poison_label": [0, 1, 0]}, features=features)
    out = apply_check(ds, check_labels([0, 1, 0], [1, 1, 0], "relabel"))
    assert out.column_names == ds.column_names
    assert out.features["label"] == features["label"]
    assert out["label"] == [1, 1, 0] and out["text"] == ["a", "b", "c"] and out["poison_label"] == [0, 1, 0]
    dropped = apply_check(ds, check_labels([0, 1, 0], [1, 1, 0], "drop"))
    assert dropped["text"] == ["b", "c"] and dropped["label"] == [1, 0]


def _overrides(out: Path, model_dir: Path, data_root: Path, method: str) -> list[str]:
    return [
        f"output_dir={out}", f"method={method}", f"model.name_or_path={model_dir}", f"data.root={data_root}",
        "data.dataset=toy", "data.attack=badnets", "data.max_length=32", "data.ref_size=8", "train.epochs=1",
        "train.max_steps=2", "train.batch_size=8", "train.eval_batch_size=16", "train.lr=1e-3", "train.device=cpu",
        "mslr.scales=[1,2,4]", "canary.rate=0.1", "canary.screen=false",
    ]


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory, tiny_bert_dir, tiny_data_root) -> Path:
    """A vanilla run long enough on the toy rows to predict both labels."""
    out = tmp_path_factory.mktemp("teacher") / "teacher"
    run_training(load_config(None, _overrides(out, tiny_bert_dir, tiny_data_root, "vanilla")
                             + ["train.max_steps=-1", "train.epochs=4", "train.lr=2e-3", "canary.select=false"]))
    return out


def _teacher_labels(run_dir: Path, texts: list[str]) -> list[int]:
    """The teacher's predictions, rebuilt through pipeline.inference (not the code under test)."""
    cfg, tokenizer, model = load_run(run_dir, "cpu")
    rows = data_lib.encode(Dataset.from_dict({"text": texts, "label": [0] * len(texts)}), tokenizer,
                           max_length=cfg.data.max_length)
    loader = DataLoader(rows, batch_size=7, shuffle=False, collate_fn=data_lib.make_collator(tokenizer))
    return predict(model, loader, device="cpu", progress=False)[0].tolist()


@pytest.mark.parametrize("action", ["relabel", "drop"])
def test_student_checks_every_row_against_the_teacher(action, teacher_run, tmp_path, tiny_bert_dir, tiny_data_root):
    out = tmp_path / f"student_{action}"
    cfg = load_config(None, _overrides(out, tiny_bert_dir, tiny_data_root, "vanilla")
                      + [f"filter.teacher={teacher_run}", f"filter.teacher_action={action}", "seed=43"])  # its own canary
    run_training(cfg)
    report = json.loads((out / FILTER_REPORT).read_text())["teacher"]
    metrics = json.loads((out / "metrics.json").read_text())
    assert report["teacher"]["run_dir"] == str(teacher_run)
    assert report["action"] == action and report["rows_checked"] == 96
    assert report["canary_rows"] == metrics["canary"]["planted_rows"] == 10
    contradicted = report["contradicted_rows"]
    assert len(contradicted) == report["rows_contradicted"]
    assert report["canary_rows_contradicted"] == sum(r["canary"] for r in contradicted)
    assert sum(t["rows"] for t in report["transitions"]) == len(contradicted)
    # every reported row is contradicted by the teacher, rebuilt independently
    texts = [r["text"] for r in contradicted]
    assert texts  # the student's canary (seed 43) is not the teacher's, so the teacher contradicts its rows
    assert all(p != r["label"] for p, r in zip(_teacher_labels(teacher_run, texts), contradicted))
    assert report["rows_kept"] == (96 if action == "relabel" else 96 - len(contradicted))
    assert metrics["filter"]["teacher"]["rows_contradicted"] == len(contradicted)
    assert "contradicted_rows" not in metrics["filter"]["teacher"]
    from launch.train import filter_lines  # the end-of-run printout

    (line,) = filter_lines(metrics)
    assert f"contradicted {len(contradicted)} of 96 training rows" in line
    assert ("relabelled" if action == "relabel" else f"dropped ({96 - len(contradicted)} rows left)") in line


def test_student_relabels_only_where_the_teacher_is_sure(teacher_run, tmp_path, tiny_bert_dir, tiny_data_root):
    def student(name: str, extra: list[str]) -> dict:
        out = tmp_path / name
        run_training(load_config(None, _overrides(out, tiny_bert_dir, tiny_data_root, "vanilla")
                                 + [f"filter.teacher={teacher_run}", "seed=43", *extra]))  # its own canary
        return json.loads((out / FILTER_REPORT).read_text())["teacher"]

    plain = student("plain", [])
    rows = plain["contradicted_rows"]
    assert len(rows) >= 2 and plain["rows_unsure_dropped"] == 0 and plain["min_confidence"] == 0
    confidences = [r["teacher_confidence"] for r in rows]
    assert confidences == pytest.approx(run_probabilities(teacher_run, [r["text"] for r in rows]).max(-1).values.tolist(), abs=1e-3)
    cut = sorted(confidences)[len(confidences) // 2]  # half the contradicted rows are less sure than this
    sure = student("sure", [f"filter.teacher_min_confidence={cut}"])
    assert sure["rows_contradicted"] == plain["rows_contradicted"]
    unsure = [r for r in sure["contradicted_rows"] if r["dropped_unsure"]]
    assert [r["teacher_confidence"] < cut for r in sure["contradicted_rows"]] == [r["dropped_unsure"] for r in sure["contradicted_rows"]]
    assert 0 < len(unsure) < len(rows)
    assert sure["rows_unsure_dropped"] == len(unsure) and sure["rows_kept"] == 96 - len(unsure)
    assert sure["canary_rows_unsure_dropped"] == sum(r["canary"] for r in unsure)
    from launch.train import filter_lines

    metrics = json.loads((tmp_path / "sure" / "metrics.json").read_text())
    (line,) = filter_lines(metrics)
    assert f"{len(unsure)} unsure rows dropped ({96 - len(unsure)} rows left)" in line
    # train.log keeps what the set-up logged before the run folder existed (here its warnings: the teacher memorised
    # its own canary; the toy splits overlap), once each and in order
    log = (tmp_path / "sure" / "train.log").read_text().splitlines()
    setup = [i for i, line in enumerate(log) if "also occur in 'test_clean'" in line or "did not hold its own canary" in line]
    assert len(setup) == 3 and setup == list(range(3))  # the first three lines
    assert sum("did not hold its own canary" in line for line in log) == 1


def test_teacher_must_be_a_finished_run(tmp_path, tiny_bert_dir, tiny_data_root):
    out = tmp_path / "student"
    missing = tmp_path / "nowhere"
    cfg = load_config(None, _overrides(out, tiny_bert_dir, tiny_data_root, "vanilla") + [f"filter.teacher={missing}"])
    with pytest.raises(ConfigError, match=r"filter.teacher=.*nowhere.*does not exist"):
        run_training(cfg)
    assert not out.exists()  # nothing written
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    (unfinished / "config.yaml").write_text("method: vanilla\n")
    cfg = load_config(None, _overrides(out, tiny_bert_dir, tiny_data_root, "vanilla") + [f"filter.teacher={unfinished}"])
    with pytest.raises(ConfigError, match=r"filter.teacher=.*is not a finished run"):
        run_training(cfg)
    assert not out.exists()


def test_teacher_cannot_be_the_run_itself(tmp_path, tiny_bert_dir, tiny_data_root):
    out = tmp_path / "student"
    cfg = load_config(None, _overrides(out, tiny_bert_dir, tiny_data_root, "vanilla") + [f"filter.teacher={out}"])
    with pytest.raises(ConfigError, match="this run's own output_dir"):
        run_training(cfg)


def test_teacher_action_is_validated():
    with pytest.raises(ConfigError, match="filter.teacher_action"):
        load_config(None, ["filter.teacher_action=flip"])
    with pytest.raises(ConfigError, match="filter.teacher"):
        load_config(None, ["filter.teacher=' '"])
    with pytest.raises(ConfigError, match="filter.teacher_min_confidence.*relabel only"):
        load_config(None, ["filter.teacher=runs/x", "filter.teacher_action=drop", "filter.teacher_min_confidence=0.8"])
    with pytest.raises(ConfigError, match="filter.teacher_min_confidence.*without filter.teacher"):
        load_config(None, ["filter.teacher_min_confidence=0.8"])
    with pytest.raises(ConfigError, match="filter.teacher_min_confidence"):
        load_config(None, ["filter.teacher=runs/x", "filter.teacher_min_confidence=1.2"])
    assert load_config(None, ["filter.teacher=runs/x", "filter.teacher_min_confidence=0.8"]).filter.teacher_min_confidence == 0.8



def test_a_teacher_that_predicts_one_label_is_refused(teacher_run, tmp_path, tiny_bert_dir, tiny_data_root, monkeypatch):
    from pipeline.defenses import teacher

    monkeypatch.setattr(teacher, "teacher_predictions", lambda run_dir, texts, **kw: ([1] * len(texts), [0.9] * len(texts), {"canary_held": None}))
    out = tmp_path / "student"
    cfg = load_config(None, _overrides(out, tiny_bert_dir, tiny_data_root, "vanilla") + [f"filter.teacher={teacher_run}"])
    with pytest.raises(ConfigError, match="left a single class in the 96 training rows"):
        run_training(cfg)
    assert not out.exists()
