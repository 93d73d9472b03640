"""Tests for pipeline.checkpoint: atomic writes, tensors, resumable training state, RNG."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from pipeline import checkpoint
from pipeline.checkpoint import (
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    capture_rng_state,
    load_tensors,
    load_training_state,
    read_tensor_metadata,
    restore_rng_state,
    save_tensors,
    save_training_state,
)


def test_atomic_writes_round_trip_without_temp_files(tmp_path: Path) -> None:
    atomic_write_bytes(tmp_path / "sub" / "a.bin", b"\x00\x01")
    atomic_write_text(tmp_path / "b.txt", "héllo")
    atomic_write_json(tmp_path / "c.json", {"b": [1, 2.5], "a": None})
    assert (tmp_path / "sub" / "a.bin").read_bytes() == b"\x00\x01"
    assert (tmp_path / "b.txt").read_text(encoding="utf-8") == "héllo"
    assert json.loads((tmp_path / "c.json").read_text()) == {"a": None, "b": [1, 2.5]}
    atomic_write_text(tmp_path / "b.txt", "second")
    assert (tmp_path / "b.txt").read_text() == "second"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.txt", "c.json", "sub"]
    assert os.listdir(tmp_path / "sub") == ["a.bin"]


def test_failed_replace_keeps_old_file_and_removes_temp(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "metrics.json"
    atomic_write_json(target, {"epoch": 1})

    def failing_replace(src: object, dst: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint.os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_json(target, {"epoch": 2})
    assert json.loads(target.read_text()) == {"epoch": 1}
    assert os.listdir(tmp_path) == ["metrics.json"]


def test_unserialisable_json_writes_nothing(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match=r"cannot write .*x.json as JSON"):
        atomic_write_json(tmp_path / "x.json", {"a": object()})
    assert os.listdir(tmp_path) == []


def test_save_and_load_tensors(tmp_path: Path) -> None:
    tensors = {"a": torch.arange(6.0).reshape(2, 3).t(), "b": torch.tensor([1, 2], dtype=torch.int32)}
    save_tensors(tmp_path / "t.safetensors", tensors, metadata={"format": "mslr", "rank": "1"})
    loaded = load_tensors(tmp_path / "t.safetensors")
    assert set(loaded) == {"a", "b"}
    assert torch.equal(loaded["a"], tensors["a"]) and loaded["b"].dtype == torch.int32
    assert read_tensor_metadata(tmp_path / "t.safetensors") == {"format": "mslr", "rank": "1"}
    with pytest.raises(TypeError, match=r"metadata entry 'rank': 1 is not str -> str"):
        save_tensors(tmp_path / "u.safetensors", tensors, metadata={"rank": 1})  # type: ignore[dict-item]
    with pytest.raises(FileNotFoundError, match="no safetensors file"):
        load_tensors(tmp_path / "missing.safetensors")
    assert sorted(os.listdir(tmp_path)) == ["t.safetensors"]


def make_training(seed: int) -> tuple[nn.Module, torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 - step / 20)
    return model, optimizer, scheduler


def train_step(
    model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LambdaLR
) -> float:
    x = torch.randn(5, 4)  # drawn from the global generator: tests RNG restore too
    loss = model(x).pow(2).mean()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    scheduler.step()
    return loss.item()


def test_training_state_round_trip_resumes_identically(tmp_path: Path) -> None:
    model, optimizer, scheduler = make_training(0)
    for _ in range(3):
        train_step(model, optimizer, scheduler)
    progress = {"epoch": 0, "step_in_epoch": 3, "global_step": 3, "best": {"dev_acc": 0.5}}
    save_training_state(
        tmp_path / "ckpt",
        trainable=dict(model.named_parameters()),
        optimizer_state=optimizer.state_dict(),
        scheduler_state=scheduler.state_dict(),
        progress=progress,
        rng=capture_rng_state(),
    )
    continued = [train_step(model, optimizer, scheduler) for _ in range(3)]
    python_draw, numpy_draw = random.random(), np.random.rand()

    resumed_model, resumed_optimizer, resumed_scheduler = make_training(1)  # different init
    state = load_training_state(tmp_path / "ckpt")
    resumed_model.load_state_dict(state.trainable, strict=True)
    resumed_optimizer.load_state_dict(state.optimizer_state)
    resumed_scheduler.load_state_dict(state.scheduler_state)
    restore_rng_state(state.rng)
    assert state.progress == progress
    replayed = [train_step(resumed_model, resumed_optimizer, resumed_scheduler) for _ in range(3)]
    assert replayed == continued
    assert (random.random(), np.random.rand()) == (python_draw, numpy_draw)
    for (name, p), (_, q) in zip(model.named_parameters(), resumed_model.named_parameters(), strict=True):
        assert torch.equal(p, q), name
    assert sorted(os.listdir(tmp_path / "ckpt")) == sorted(
        ["COMPLETE", "optimizer.pt", "progress.json", "rng.pt", "trainable.safetensors"]
    )


def test_rng_round_trip() -> None:
    state = capture_rng_state()
    first = (torch.rand(3), random.random(), np.random.rand(2), random.gauss(0, 1))
    restore_rng_state(state)
    second = (torch.rand(3), random.random(), np.random.rand(2), random.gauss(0, 1))
    assert torch.equal(first[0], second[0]) and first[1] == second[1]
    assert np.array_equal(first[2], second[2]) and first[3] == second[3]
    with pytest.raises(ValueError, match=r"unknown keys \['extra'\], missing keys \['torch_cpu'\]"):
        restore_rng_state({"python": state["python"], "extra": 1})


@pytest.mark.gpu
def test_cuda_rng_round_trip() -> None:
    state = capture_rng_state()
    assert len(state["torch_cuda"]) == torch.cuda.device_count()
    first = torch.rand(4, device="cuda")
    restore_rng_state(state)
    assert torch.equal(first, torch.rand(4, device="cuda"))


def save_small(directory: Path, step: int) -> None:
    save_training_state(
        directory,
        trainable={"w": torch.full((2,), float(step))},
        optimizer_state={"state": {}, "param_groups": [{"lr": 0.1, "params": [0]}]},
        scheduler_state={"last_epoch": step},
        progress={"global_step": step},
        rng=capture_rng_state(),
    )


def test_newer_checkpoint_replaces_older_without_leftovers(tmp_path: Path) -> None:
    save_small(tmp_path / "last", 1)
    save_small(tmp_path / "last", 2)
    state = load_training_state(tmp_path / "last")
    assert state.progress == {"global_step": 2} and state.scheduler_state == {"last_epoch": 2}
    assert torch.equal(state.trainable["w"], torch.full((2,), 2.0))
    assert os.listdir(tmp_path) == ["last"]


def test_failure_during_save_keeps_old_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    save_small(tmp_path / "last", 1)

    def failing_save(obj: object, f: object) -> None:
        raise RuntimeError("killed mid-save")

    monkeypatch.setattr(checkpoint.torch, "save", failing_save)
    with pytest.raises(RuntimeError, match="killed mid-save"):
        save_small(tmp_path / "last", 2)
    monkeypatch.undo()
    assert load_training_state(tmp_path / "last").progress == {"global_step": 1}
    assert os.listdir(tmp_path) == ["last"]


def test_incomplete_checkpoint_refused(tmp_path: Path) -> None:
    save_small(tmp_path / "ckpt", 1)
    (tmp_path / "ckpt" / "COMPLETE").unlink()
    with pytest.raises(ValueError, match=r"has no COMPLETE marker, so its save did not finish"):
        load_training_state(tmp_path / "ckpt")
    with pytest.raises(FileNotFoundError, match="no checkpoint directory at"):
        load_training_state(tmp_path / "absent")


def test_refuses_unsafe_state_and_foreign_directory(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match=r"\['param_groups'\]\[0\]\['fn'\] is a function"):
        save_training_state(
            tmp_path / "ckpt",
            trainable={},
            optimizer_state={"param_groups": [{"fn": lambda: 0}]},
            scheduler_state={},
            progress={},
            rng={},
        )
    with pytest.raises(TypeError, match="progress is not JSON-serialisable"):
        save_training_state(
            tmp_path / "ckpt", trainable={}, optimizer_state={}, scheduler_state={},
            progress={"t": torch.ones(1)}, rng={},
        )
    assert os.listdir(tmp_path) == []
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="is not a checkpoint"):
        save_small(tmp_path / "mine", 1)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
