"""Issue 13: resume restores every reported number, survives kills between checkpoint renames and
moved folders; overwrite touches only run folders; runaway training stops; run folders run no code.

The malformed-input table is tests/test_malformed_inputs.py; these are the behaviours a table row
cannot show (a run compared with an uninterrupted one, files left by a kill, a flag that allows).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

import pipeline.training as training
from pipeline import checkpoint as ckpt
from pipeline.config import load_config
from pipeline.training import DivergenceError, OutputDirError, prepare_output_dir, run_training

# Timing and memory fields differ between any two runs; config.resume / output_dir say how a run was
# invoked, not what it computed.
_VARYING_METRICS = {
    "train_seconds", "samples_per_second", "peak_memory_mb", "peak_memory_above_baseline_mb", "memory_baseline_mb",
}
_VARYING_LOG = {"step_seconds", "collective_seconds"}


def _cfg(out: Path, model_dir: Path, data_root: Path, *overrides: str):
    return load_config(None, [
        f"output_dir={out}", f"model.name_or_path={model_dir}", f"data.root={data_root}", "data.dataset=toy",
        "data.attack=badnets", "data.max_length=16", "data.ref_size=8", "data.max_train_samples=48",
        "train.epochs=2", "train.batch_size=8", "train.eval_batch_size=16", "train.lr=1e-3", "train.device=cpu",
        "mslr.scales=[1,2,4]", "method=musclelora", "train.checkpoint_every_steps=3", *overrides,
    ])


def _record(run: Path) -> tuple[dict, list[dict]]:
    """metrics.json and log.jsonl without the fields that legitimately differ between two runs."""
    metrics = json.loads((run / "metrics.json").read_text())
    for key in _VARYING_METRICS:
        metrics.pop(key)
    for key in ("resume", "output_dir"):
        metrics["config"].pop(key)
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    for entry in log:
        for key in _VARYING_LOG:
            entry.pop(key, None)
    return metrics, log


@pytest.fixture(scope="module")
def straight(tmp_path_factory, tiny_bert_dir, tiny_data_root) -> Path:
    """An uninterrupted MuScleLoRA run: 6 steps per epoch, 2 epochs, a checkpoint every 3 steps."""
    out = tmp_path_factory.mktemp("straight") / "run"
    run_training(_cfg(out, tiny_bert_dir, tiny_data_root))
    return out


def _kill_at_step(monkeypatch: pytest.MonkeyPatch, step: int) -> None:
    original = training.optimiser_step
    calls = {"n": 0}

    def killed(**kwargs):
        calls["n"] += 1
        if calls["n"] == step:
            raise KeyboardInterrupt(f"simulated kill in step {step}")
        return original(**kwargs)

    monkeypatch.setattr(training, "optimiser_step", killed)


def _kill_after_epoch_record(monkeypatch: pytest.MonkeyPatch) -> None:
    """Kill at the first epoch's end, after its record is in log.jsonl, before its checkpoint."""
    original = ckpt.save_tensors

    def killed(path, *args, **kwargs):
        if Path(path).name == "best.safetensors":
            raise KeyboardInterrupt("simulated kill while saving the best epoch")
        return original(path, *args, **kwargs)

    monkeypatch.setattr(ckpt, "save_tensors", killed)


@pytest.mark.integration
@pytest.mark.parametrize("kill", ["step5", "step11-moved", "epoch0-record"])
def test_resume_reproduces_every_reported_number(kill, straight, tmp_path, tiny_bert_dir, tiny_data_root, monkeypatch):
    """Killed mid-epoch (steps 5 and 11: resumed from steps 3 and 9) or after an epoch's record but before
    its checkpoint (resumed from the mid-epoch checkpoint at that epoch's last step), the resumed run's
    metrics.json and log.jsonl equal the uninterrupted run's, bit for bit, except timing fields. One
    resume happens after the folder was moved (a moved run folder resumes)."""
    run = tmp_path / "run"
    if kill == "epoch0-record":
        _kill_after_epoch_record(monkeypatch)
    else:
        _kill_at_step(monkeypatch, int(kill[4:].split("-")[0]))
    with pytest.raises(KeyboardInterrupt):
        run_training(_cfg(run, tiny_bert_dir, tiny_data_root))
    monkeypatch.undo()
    assert not (run / "metrics.json").exists()
    if kill.endswith("moved"):
        moved = tmp_path / "elsewhere" / "run"
        moved.parent.mkdir()
        shutil.move(str(run), str(moved))
        run = moved
    run_training(_cfg(run, tiny_bert_dir, tiny_data_root, "resume=true"))
    metrics, log = _record(run)
    want_metrics, want_log = _record(straight)
    assert log == want_log
    assert metrics == want_metrics
    assert [e["gates"] for e in metrics["history"]] and all(sum(e["gates"].values()) == 6 for e in metrics["history"])
    assert yaml.safe_load((run / "config.yaml").read_text())["output_dir"] == str(run)


@pytest.mark.integration
def test_kill_between_checkpoint_renames_resumes_from_the_retired_copy(straight, tmp_path, tiny_bert_dir, tiny_data_root, monkeypatch):
    """A save killed after renaming last -> last.old-<pid> and before renaming the new one in leaves no
    last/; resume takes the retired copy, and leftovers of killed saves are removed."""
    run = tmp_path / "run"
    _kill_at_step(monkeypatch, 5)
    with pytest.raises(KeyboardInterrupt):
        run_training(_cfg(run, tiny_bert_dir, tiny_data_root))
    monkeypatch.undo()
    checkpoints = run / "checkpoints"
    (checkpoints / "last").rename(checkpoints / "last.old-4242")  # the state a kill between the renames leaves
    staging = checkpoints / "last.tmp-4242"
    staging.mkdir()
    (staging / "trainable.safetensors").write_bytes(b"half")
    (checkpoints / ".best.safetensors.4242.abcd1234.tmp").write_bytes(b"half")
    (run / ".log.jsonl.4242.abcd1234.tmp").write_bytes(b"half")
    run_training(_cfg(run, tiny_bert_dir, tiny_data_root, "resume=true"))
    assert sorted(p.name for p in checkpoints.iterdir()) == ["best.safetensors", "last"]
    assert not list(run.glob(".*.tmp"))
    assert _record(run) == _record(straight)


def test_recover_checkpoint_takes_the_newest_complete_retired_copy(tmp_path):
    state = dict(optimizer_state={"state": {}, "param_groups": []}, scheduler_state={}, rng=ckpt.capture_rng_state())
    last = tmp_path / "last"
    for step in (3, 6):
        saved = tmp_path / f"saved{step}"
        ckpt.save_training_state(saved, trainable={"w": torch.full((2,), float(step))}, progress={"global_step": step}, **state)
        saved.rename(tmp_path / f"last.old-{step}")
    (tmp_path / "last.old-9").mkdir()  # incomplete: no COMPLETE marker
    assert ckpt.remove_stale_siblings(last) == []  # never deletes while last/ is missing
    assert ckpt.recover_checkpoint(last) == tmp_path / "last.old-6"
    assert ckpt.load_training_state(last).progress["global_step"] == 6
    assert ckpt.recover_checkpoint(last) is None  # complete already
    removed = ckpt.remove_stale_siblings(last)
    assert sorted(p.name for p in removed) == ["last.old-3", "last.old-9"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last"]


def test_overwrite_replaces_only_run_folders_and_never_follows_links(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "precious.txt").write_text("keep")
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text("method: lora\n")
    (run / "adapter").symlink_to(outside)  # a link inside a run folder is removed, not followed
    (run / "checkpoints" / "last").symlink_to(outside)  # ... at any depth
    assert ckpt.foreign_entries(run) == []
    assert prepare_output_dir(run, resume=False, overwrite=True) is False
    training.remove_run_folder(run)
    assert list(run.iterdir()) == [] and (outside / "precious.txt").read_text() == "keep"

    user = tmp_path / "user"
    user.mkdir()
    (user / "config.yaml").write_text("mine")
    (user / "thesis.tex").write_text("mine")
    with pytest.raises(OutputDirError, match=r"'thesis.tex' is not written by a run"):
        prepare_output_dir(user, resume=False, overwrite=True)
    (tmp_path / "link").symlink_to(run)
    with pytest.raises(OutputDirError, match="symbolic link"):
        prepare_output_dir(tmp_path / "link", resume=False, overwrite=True)
    with pytest.raises(OutputDirError, match="symbolic link"):
        training.remove_run_folder(tmp_path / "link")


@pytest.mark.integration
def test_runaway_training_stops_with_step_cause_and_train_log(tmp_path, tiny_bert_dir, tiny_data_root):
    """lr 1e10 used to finish with LoRA weights around 3e10; now the first step's parameter norm stops it."""
    run = tmp_path / "run"
    with pytest.raises(DivergenceError, match=r"step 0 \(epoch 0.*trainable-parameter norm .* exceeds"):
        run_training(_cfg(run, tiny_bert_dir, tiny_data_root, "method=lora", "train.lr=1e10"))
    assert "DivergenceError: step 0" in (run / "train.log").read_text()
    assert not (run / "metrics.json").exists()
    # The guard's thresholds leave an ordinary run alone (lr 1e-1 is already 100x the demo's).
    run_training(_cfg(tmp_path / "fine", tiny_bert_dir, tiny_data_root, "method=lora", "train.lr=1e-1", "train.epochs=1"))


def test_most_rows_cut_by_max_length_are_warned_about(caplog):
    cfg = load_config(None, ["data.max_length=4"])
    with caplog.at_level("WARNING", logger="pipeline.training"):
        training.warn_truncation(cfg, {"input_ids": [[1, 2, 3, 4], [1, 2, 3, 4], [1, 2]]})
    assert "data.max_length=4 truncates 2 of 3 training rows" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="pipeline.training"):
        training.warn_truncation(cfg, {"input_ids": [[1, 2, 3, 4], [1, 2], [1, 2]]})
    assert caplog.text == ""


def test_trust_remote_code_flag_lets_a_trusted_run_folder_run_its_code(tmp_path, tiny_bert_dir):
    """Refused without the flag (tests/test_malformed_inputs.py); with it, the model's own code runs."""
    from pipeline.inference import RunDirError, _resolved_config, check_remote_code, finished_run_files

    model = tmp_path / "model"
    shutil.copytree(tiny_bert_dir, model)
    marker = tmp_path / "CODE_RAN"
    (model / "configuration_evil.py").write_text(
        f"from pathlib import Path\nPath({str(marker)!r}).write_text('ran')\n"
        "from transformers import BertConfig\n\n\nclass EvilConfig(BertConfig):\n    model_type = 'bert'\n"
    )
    config = json.loads((model / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "configuration_evil.EvilConfig"}
    (model / "config.json").write_text(json.dumps(config))
    run = tmp_path / "run"
    (run / "adapter").mkdir(parents=True)
    cfg = load_config(None, [f"model.name_or_path={model}", "model.trust_remote_code=true", "mslr.scales=[1,2]"])
    from pipeline.config import config_to_dict

    (run / "config.yaml").write_text(yaml.safe_dump(config_to_dict(cfg)))
    for name in ("adapter/adapter.safetensors", "adapter/adapter_config.json", "metrics.json"):
        (run / name).write_text("{}")
    files = finished_run_files(run)
    with pytest.raises(RunDirError, match="--trust-remote-code"):
        _resolved_config(files)
    assert not marker.exists()
    check_remote_code(cfg, files.config, trust_remote_code=True)
    _resolved_config(files, trust_remote_code=True)
    assert marker.read_text() == "ran"
