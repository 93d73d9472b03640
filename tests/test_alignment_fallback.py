"""Tests for ``align.fallback`` (issue 11 step 2): "raw" is today's gate, "skip" never hands g back.

The unit tests use hand-made gradients whose updates are worked out by hand below; the end-to-end test
trains a tiny BERT with a gate that always falls through and checks the weights against AdamW's own
arithmetic on zero gradients (weight decay only).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import get_args, get_type_hints

import pytest
import torch

from pipeline import distributed
from pipeline.alignment import FALLBACKS, GATES, align_gradients, apply_alignment, gradient_statistics
from pipeline.config import AlignConfig, ConfigError, load_config
from pipeline.training import run_training

# a: <g,r> = 3, ||r||^2 = 1 -> a_p = (3, 0);  b: <g,r> = 4, ||r||^2 = 4 -> a_p = (0, 2);  z: r = 0.
TASK = {"a": (3.0, 4.0), "b": (1.0, 2.0), "z": (5.0, -1.0)}
REFERENCE = {"a": (1.0, 0.0), "b": (0.0, 2.0), "z": (0.0, 0.0)}
MEAN_REF_NORM = (1.0 + 2.0) / 2  # z left out
MEAN_COSINE = (3 / 5 + 4 / (math.sqrt(5) * 2)) / 2

# Gate settings per branch: ref_loss 1.0 passes min_ref_loss 0.4, 0.1 does not; rho = 0.5 * (2 - 0) / 4.
BRANCHES = {
    "align": {"ref_loss": 1.0, "min_ref_loss": 0.4, "max_raw_ratio": 0.5, "epoch": 2, "start_epoch": 0, "epochs": 4},
    "mix": {"ref_loss": 0.1, "min_ref_loss": 0.4, "max_raw_ratio": 0.5, "epoch": 2, "start_epoch": 0, "epochs": 4},
    "raw": {"ref_loss": 0.1, "min_ref_loss": 0.4, "max_raw_ratio": 0.0, "epoch": 2, "start_epoch": 0, "epochs": 4},
}
# (gate, rho, update per tensor) by hand; mix: 0.75 a_p + 0.25 g_p, and g_p (raw) or 0.25 g_p (skip) for z.
EXPECTED = {
    ("align", "raw"): ("align", 0.0, {"a": (3.0, 0.0), "b": (0.0, 2.0), "z": (5.0, -1.0)}),
    ("align", "skip"): ("align", 0.0, {"a": (3.0, 0.0), "b": (0.0, 2.0), "z": (0.0, 0.0)}),
    ("mix", "raw"): ("mix", 0.25, {"a": (3.0, 1.0), "b": (0.25, 2.0), "z": (5.0, -1.0)}),
    ("mix", "skip"): ("mix", 0.25, {"a": (3.0, 1.0), "b": (0.25, 2.0), "z": (1.25, -0.25)}),
    ("raw", "raw"): ("raw", 1.0, {"a": (3.0, 4.0), "b": (1.0, 2.0), "z": (5.0, -1.0)}),
    ("raw", "skip"): ("skip", 0.0, {"a": (0.0, 0.0), "b": (0.0, 0.0), "z": (0.0, 0.0)}),
}


def _grads(values: dict[str, tuple[float, float]], dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    return {name: torch.tensor(v, dtype=dtype) for name, v in values.items()}


@pytest.mark.parametrize("fallback", ["raw", "skip"])
@pytest.mark.parametrize("branch", ["align", "mix", "raw"])
def test_hand_made_updates_per_branch(branch: str, fallback: str) -> None:
    task, reference = _grads(TASK), _grads(REFERENCE)
    statistics = gradient_statistics(task, reference)
    result = apply_alignment(task, reference, statistics, fallback=fallback, **BRANCHES[branch])
    gate, rho, update = EXPECTED[(branch, fallback)]
    assert (result.gate, result.raw_weight) == (gate, pytest.approx(rho))
    assert result.num_aligned == (2 if gate in ("align", "mix") else 0)
    assert result.mean_ref_norm == pytest.approx(MEAN_REF_NORM) and result.mean_cosine == pytest.approx(MEAN_COSINE)
    for name, values in update.items():
        torch.testing.assert_close(result.grads[name], torch.tensor(values), rtol=1e-6, atol=1e-7)
        assert result.grads[name].dtype == torch.float32


@pytest.mark.parametrize("branch", ["align", "mix", "raw"])
def test_raw_fallback_is_the_default_and_passes_task_tensors_through(branch: str) -> None:
    task, reference = _grads(TASK), _grads(REFERENCE)
    default = align_gradients(task, reference, **BRANCHES[branch])
    explicit = align_gradients(task, reference, fallback="raw", **BRANCHES[branch])
    for field in ("gate", "raw_weight", "num_aligned", "mean_cosine", "mean_ref_norm"):
        assert getattr(default, field) == getattr(explicit, field), field
    for name in TASK:
        assert torch.equal(default.grads[name], explicit.grads[name])
    assert default.grads["z"] is task["z"]  # the zero-reference tensor is the task tensor itself, as before
    if branch == "raw":
        assert all(default.grads[n] is task[n] for n in TASK)


def test_skip_returns_new_zero_tensors_and_leaves_the_task_gradient_alone() -> None:
    task = _grads(TASK, torch.bfloat16)
    reference = {name: torch.zeros_like(t) for name, t in task.items()}  # memorised reference rows: r = 0
    result = align_gradients(task, reference, fallback="skip")  # the default thresholds (0) on a zero r
    assert (result.gate, result.raw_weight, result.num_aligned, result.mean_ref_norm) == ("skip", 0.0, 0, 0.0)
    for name in TASK:
        assert result.grads[name].dtype == torch.bfloat16 and not result.grads[name].any()
        assert torch.equal(task[name], torch.tensor(TASK[name], dtype=torch.bfloat16))  # input not zeroed in place
    assert align_gradients(task, reference).gate == "raw"  # the same step under today's fallback


def test_unknown_fallback_is_refused() -> None:
    task, reference = _grads(TASK), _grads(REFERENCE)
    with pytest.raises(ValueError, match=r"fallback must be one of 'raw', 'skip', got 'never'"):
        apply_alignment(task, reference, gradient_statistics(task, reference), fallback="never")
    with pytest.raises(ConfigError, match=r"align\.fallback.*'never'.*use one of 'raw', 'skip'"):
        load_config(None, ["align.fallback=never"])
    assert get_args(get_type_hints(AlignConfig)["fallback"]) == FALLBACKS
    assert load_config(None, []).align.fallback == "raw"
    assert set(FALLBACKS) - {"raw"} <= set(GATES)


@pytest.mark.integration
@pytest.mark.parametrize(("fallback", "weight_decay"), [("skip", 0.0), ("skip", 0.1), ("raw", 0.0)])
def test_gate_that_always_falls_through(fallback, weight_decay, tmp_path, tiny_bert_dir, tiny_data_root, monkeypatch):
    """min_ref_grad_norm huge and no mixing: every step falls through; with skip the weights see zero gradients."""
    start: dict[str, torch.Tensor] = {}
    live: dict[str, torch.nn.Parameter] = {}

    class RecordingEngine(distributed.Engine):
        def __init__(self, runtime, model, params, **kwargs):
            start.update({name: p.detach().clone() for name, p in params.items()})
            live.update(params)
            super().__init__(runtime, model, params, **kwargs)

    monkeypatch.setattr(distributed, "Engine", RecordingEngine)
    out = tmp_path / "run"
    lr = 1e-3
    cfg = load_config(None, [
        f"output_dir={out}", f"model.name_or_path={tiny_bert_dir}", f"data.root={tiny_data_root}",
        "data.dataset=toy", "data.attack=badnets", "data.max_length=16", "data.ref_size=8",
        "data.max_train_samples=16", "train.batch_size=8", "train.eval_batch_size=16", "train.epochs=1",
        f"train.lr={lr}", f"train.weight_decay={weight_decay}", "train.warmup_ratio=0", "mslr.scales=[1,2,4]",
        "method=musclelora", "align.min_ref_grad_norm=1e9", "align.max_raw_ratio=0", f"align.fallback={fallback}",
    ])
    metrics = run_training(cfg)
    steps = [r for r in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if r["type"] == "step"]
    assert steps and all(r["gate"] == ("skip" if fallback == "skip" else "raw") for r in steps)
    on_disk = json.loads((out / "metrics.json").read_text())
    assert [h["gates"] for h in on_disk["history"]] == [{"skip" if fallback == "skip" else "raw": len(steps)}]
    assert [h["gates"] for h in metrics["history"]] == [h["gates"] for h in on_disk["history"]]
    assert start and sorted(start) == sorted(live)
    if fallback == "raw":  # the control: the raw gradient moves the weights
        assert any(not torch.equal(live[n].detach(), start[n]) for n in start)
        return
    # Zero gradients into a fresh AdamW: the Adam part is 0 / (0 + eps) = 0; only decoupled weight decay,
    # p <- p (1 - lr_t wd), with the linear schedule lr_t = lr (1 - t / T) over the T steps.
    shrink = math.prod(1 - lr * (1 - t / len(steps)) * weight_decay for t in range(len(steps)))
    for name, before in start.items():
        after = live[name].detach()
        if weight_decay == 0:
            assert torch.equal(after, before), name
        else:
            torch.testing.assert_close(after, before * shrink, rtol=1e-6, atol=0.0)
    assert weight_decay == 0 or any(not torch.equal(live[n].detach(), start[n]) for n in start if start[n].any())
