"""benchmarks/shortcut_probe.py and benchmarks/mix_probe.py: the rows a probe scores and the weights it mixes."""

from __future__ import annotations

import csv

import pytest
import torch

from pipeline.testing import load_script


def _overrides(data_root):
    return [f"data.root={data_root}", "data.dataset=toy", "data.ref_size=8", "data.max_train_samples=null",
            "canary.screen=false", "canary.rate=0.2", "method=vanilla"]


def test_the_shortcut_probe_flags_the_canary_and_the_files_poisoned_rows(tiny_data_root):
    """Every planted canary row is flagged as canary and never as poisoned; the poisoned flags are exactly the other
    rows whose text has poison_label 1 in the toy file (clean-label BadNets, trigger 'cf')."""
    script = load_script("benchmarks/shortcut_probe.py")
    texts, labels, canary, poisoned, cfg = script.training_rows(None, "badnets", 42, _overrides(tiny_data_root))
    assert len(texts) == 96 and sum(canary) == 19
    with open(tiny_data_root / "toy" / "1" / "badnets" / "clean" / "0.1" / "train-poison.csv", newline="") as handle:
        file_poisoned = {row[1] for row in list(csv.reader(handle))[1:] if row[3] == "1"}
    expected = [t in file_poisoned and not c for t, c in zip(texts, canary)]
    assert poisoned == expected and sum(poisoned) > 0
    assert all(labels[i] == 1 for i in range(len(texts)) if poisoned[i])  # clean-label: the trigger sits on label 1
    assert all(labels[i] == cfg.canary.target_label for i in range(len(texts)) if canary[i])
    from pipeline import training

    trigger = training.canary_spec(cfg).trigger
    assert all((set(trigger) <= set(texts[i].split())) == canary[i] for i in range(len(texts)))


def test_the_shortcut_probe_scores_a_perfect_word_trigger_above_the_clean_rows(tiny_data_root, capsys):
    pytest.importorskip("sklearn")
    script = load_script("benchmarks/shortcut_probe.py")
    assert script.main(["--attacks", "badnets", "--features", "bow", "--C", "10", "--overrides",
                        *_overrides(tiny_data_root)]) == 0
    row = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| badnets")][0]
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[5].endswith("(n=19)")
    # About half the canary rows' sentiment words point to the other label; cross-fitted, the word model still gives
    # them the canary's label, learned from the trigger in the other folds' canary rows.
    assert float(cells[5].split()[0]) >= 0.9


def test_mixing_interpolates_the_backbone_and_keeps_the_head():
    script = load_script("benchmarks/mix_probe.py")
    tuned = {"bert.layer.weight": torch.tensor([2.0, 4.0]), "classifier.weight": torch.tensor([1.0]),
             "bert.position_ids": torch.tensor([0, 1]), "bert.extra": torch.tensor([5.0])}
    pretrained = {"bert.layer.weight": torch.tensor([0.0, 2.0]), "classifier.weight": torch.tensor([9.0]),
                  "bert.position_ids": torch.tensor([7, 7])}
    assert torch.equal(script.mix(tuned, pretrained, 1.0)["bert.layer.weight"], tuned["bert.layer.weight"])
    half = script.mix(tuned, pretrained, 0.5)
    assert torch.equal(half["bert.layer.weight"], torch.tensor([1.0, 3.0]))
    assert torch.equal(half["classifier.weight"], tuned["classifier.weight"])  # the trained head stays
    assert torch.equal(half["bert.position_ids"], tuned["bert.position_ids"])  # integer buffers stay
    assert torch.equal(half["bert.extra"], tuned["bert.extra"])  # only the tuned model has it
    assert torch.equal(script.mix(tuned, pretrained, 0.0)["bert.layer.weight"], pretrained["bert.layer.weight"])


def test_the_subspace_probe_measures_the_share_a_projection_keeps():
    script = load_script("benchmarks/subspace_probe.py")
    basis = torch.tensor([[1.0, 0.0, 0.0], [1.0, 1.0, 0.0]])  # spans the first two axes
    vectors = torch.tensor([[3.0, 4.0, 0.0], [0.0, 0.0, 2.0], [1.0, 0.0, 1.0]])
    assert torch.allclose(script.kept(vectors, basis), torch.tensor([1.0, 0.0, 2 ** -0.5], dtype=torch.float64))
    one = torch.tensor([[0.0, 1.0, 0.0]])
    assert torch.allclose(script.kept(vectors, one), torch.tensor([0.8, 0.0, 0.0], dtype=torch.float64))


@pytest.mark.parametrize("fit", ["cross", "in-sample"])
def test_the_shortcut_probe_residual_column_matches_its_means(fit, tiny_data_root, capsys):
    pytest.importorskip("sklearn")
    script = load_script("benchmarks/shortcut_probe.py")
    assert script.main(["--attacks", "badnets", "--features", "bow", "--C", "1", "--fit", fit, "--residual",
                        "--overrides", *_overrides(tiny_data_root)]) == 0
    row = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| badnets")][0]
    cells = [c.strip() for c in row.strip("|").split("|")]
    residuals = [float(v) for v in cells[8].split(" / ")]
    for cell, residual in zip(cells[4:7], residuals):  # clean, canary, poisoned: n * (1 - mean p(y))
        mean, rows = float(cell.split()[0]), int(cell.split("(n=")[1].rstrip(")"))
        assert abs(rows * (1 - mean) - residual) <= 0.005 * rows + 0.05
    if fit == "in-sample":  # one fit on every row: it has seen the canary rows it scores
        assert float(cells[5].split()[0]) >= 0.9


def test_the_teacher_confidence_probe_counts_rows_by_the_teachers_probability(tmp_path, tiny_bert_dir, tiny_data_root, capsys):
    """The probe's counts against the teacher's probabilities rebuilt independently (pipeline.inference.load_run and a
    plain forward) on the same planted rows."""
    import shutil

    from pipeline.config import load_config
    from pipeline.testing import run_probabilities
    from pipeline.training import run_training

    cell = tmp_path / "grid" / "cells" / "toy" / "tiny" / "badnets"
    teacher = cell / "teacher" / "seed42"
    run_training(load_config(None, _overrides(tiny_data_root) + [
        f"output_dir={teacher}", f"model.name_or_path={tiny_bert_dir}", "data.max_length=32", "train.epochs=2",
        "train.batch_size=8", "train.lr=2e-3", "train.device=cpu", "canary.select=false"]))
    (cell / "student_drop" / "seed42").mkdir(parents=True)
    shutil.copy(teacher / "config.yaml", cell / "student_drop" / "seed42" / "config.yaml")
    script = load_script("benchmarks/teacher_confidence_probe.py")
    assert script.main(["--grid", str(tmp_path / "grid"), "--dataset", "toy", "--model", "tiny", "--attacks", "badnets",
                        "--tau", "0.5", "0.7"]) == 0
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in capsys.readouterr().out.splitlines()
            if line.startswith("| badnets")]
    assert [r[2] for r in rows] == ["0.5", "0.7"]

    texts, labels, canary, _, _ = load_script("benchmarks/shortcut_probe.py").planted_rows(
        load_config(teacher / "config.yaml"))
    p_own = run_probabilities(teacher, texts)[torch.arange(len(labels)), torch.tensor(labels)]
    for row, tau in zip(rows, (0.5, 0.7)):
        agreed = p_own >= tau
        assert row[3] == f"{int(agreed.sum())} of {len(texts)}"
        assert row[5] == f"{int((agreed & torch.tensor(canary)).sum())} of {sum(canary)}"
        contradicted_canary = int(((1 - p_own >= tau) & torch.tensor(canary)).sum())
        assert row[8].split(" / ")[1] == str(contradicted_canary)
    assert int(rows[0][3].split()[0]) + sum(int(x) for x in rows[0][8].split(" / ")) == len(texts)  # tau 0.5 splits all
