"""TensorBoard scalars of the training loop (pipeline/training.py), read back with TensorBoard's own reader.

tensorboard is part of the default set-up (the ``tensorboard`` extra the Makefile installs), so this test
imports it rather than skipping: a missing install is a broken set-up. The scalars are compared with the
same run's ``log.jsonl`` (per optimiser step) and ``metrics.json`` history (per epoch).
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from pipeline.alignment import GATES
from pipeline.config import load_config
from pipeline.training import open_tensorboard, run_training


def _scalars(log_dir: Path) -> dict[str, dict[int, float]]:
    files = sorted(log_dir.glob("events.out.tfevents.*"))
    assert files, f"no TensorBoard event file under {log_dir}"
    accumulator = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})  # 0: keep every event
    accumulator.Reload()
    return {tag: {e.step: e.value for e in accumulator.Scalars(tag)} for tag in accumulator.Tags()["scalars"]}


@pytest.mark.integration
def test_alignment_run_writes_telemetry_and_dev_clean_accuracy(tmp_path, tiny_data_root, tiny_bert_dir):
    out = tmp_path / "run"
    cfg = load_config(None, [
        f"output_dir={out}", f"model.name_or_path={tiny_bert_dir}", f"data.root={tiny_data_root}",
        "data.dataset=toy", "data.attack=badnets", "data.max_length=16", "data.ref_size=8",
        "data.max_train_samples=16", "train.batch_size=8", "train.eval_batch_size=16", "train.epochs=2",
        "train.lr=1e-3", "mslr.scales=[1,2,4]", "method=musclelora",
    ])
    metrics = run_training(cfg)
    scalars = _scalars(out / "tensorboard")
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    steps = [r for r in records if r["type"] == "step"]
    assert [r["global_step"] for r in steps] == [1, 2, 3, 4]  # 16 rows / batch 8 = 2 steps, 2 epochs

    for tag, key in [("train/loss", "loss"), ("train/ref_loss", "ref_loss"), ("train/mean_cosine", "mean_cosine"),
                     ("train/cosine_by_group/lora", ("cosine_by_group", "lora")),
                     ("train/cosine_by_group/mslr", ("cosine_by_group", "mslr")),
                     ("train/raw_weight", "raw_weight"), ("train/ref_grad_norm", "ref_grad_norm")]:
        logged = {r["global_step"]: (r[key[0]][key[1]] if isinstance(key, tuple) else r[key]) for r in steps}
        assert scalars[tag] == pytest.approx(logged, rel=1e-6, abs=1e-7), tag  # event files store float32
    assert all(v > 0 for v in scalars["train/ref_loss"].values())
    assert all(-1.0 <= v <= 1.0 for v in scalars["train/cosine_by_group/mslr"].values())
    for gate in GATES:  # align, mix, raw, skip
        assert scalars[f"train/gate_{gate}"] == {r["global_step"]: float(r["gate"] == gate) for r in steps}
    for step in (r["global_step"] for r in steps):  # exactly one gate is on per step
        assert sum(scalars[f"train/gate_{g}"][step] for g in GATES) == 1.0

    history = metrics["history"]
    assert [h["epoch"] for h in history] == [0, 1]
    assert scalars["epoch/dev_clean_acc"] == pytest.approx({h["epoch"]: h["dev_clean_acc"] for h in history}, rel=1e-6)
    assert all(0.0 <= v <= 1.0 for v in scalars["epoch/dev_clean_acc"].values())


def test_missing_tensorboard_is_a_warning_not_a_failure(tmp_path, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # makes the import raise ImportError
    with caplog.at_level(logging.WARNING, logger="pipeline.training"):
        assert open_tensorboard(tmp_path) is None
    assert "tensorboard is not installed" in caplog.text and str(tmp_path / "tensorboard") in caplog.text
    assert not (tmp_path / "tensorboard").exists()
    monkeypatch.undo()
    writer = open_tensorboard(tmp_path)
    writer.add_scalar("x", 1.5, 3)
    writer.close()
    assert _scalars(tmp_path / "tensorboard") == {"x": {3: 1.5}}
