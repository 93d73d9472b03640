"""The reference pass's cost settings (issue 11 step 5): ``align.ref_batch_size`` and ``align.ref_every_steps``.

Unset, both leave training as it was (the same reference draws, the same parameters, bit for bit). A
smaller reference batch draws that many rows per fresh step; ``ref_every_steps = k`` computes the
reference gradient on every k-th aligned step only and aligns the steps between to that gradient,
which a checkpoint keeps so that a resume in the middle of a cycle continues bit for bit. The gradient
a reused step applies is checked against an independent recomputation (the reference batch's gradient
at the parameters of the last fresh step, aligned with ``align_gradients`` by hand).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

import pipeline.training as training
from pipeline import checkpoint as ckpt
from pipeline import distributed as dist
from pipeline.alignment import align_gradients
from pipeline.config import ConfigError, load_config, resolve_defaults
from pipeline.training import local_rows, reference_indices, run_training

_VARYING_LOG = {"step_seconds", "collective_seconds"}
_VARYING_METRICS = {"train_seconds", "samples_per_second", "peak_memory_mb", "peak_memory_above_baseline_mb", "memory_baseline_mb"}


def _cfg(out: Path, model_dir: Path, data_root: Path, *overrides: str):
    return load_config(None, [
        f"output_dir={out}", f"model.name_or_path={model_dir}", f"data.root={data_root}", "data.dataset=toy",
        "data.attack=badnets", "data.max_length=16", "data.ref_size=8", "data.max_train_samples=48",
        "train.epochs=1", "train.batch_size=8", "train.eval_batch_size=16", "train.lr=1e-3", "train.device=cpu",
        "train.num_threads=1", "mslr.scales=[1,2,4]", "method=musclelora", *overrides,
    ])


def _adapter(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "adapter" / "adapter.safetensors"))


def _steps(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines() if '"type": "step"' in x]


def _progress(run: Path) -> dict:
    return json.loads((run / "checkpoints" / "last" / "progress.json").read_text())


def _triples(reference_draws: list[dict]) -> list[tuple[int, int, list[int]]]:
    """(batch size asked, draw, rows) of every reference batch recorded by the ``reference_draws`` fixture."""
    return [(c["batch_size"], c["draw"], c["rows"]) for c in reference_draws]


@pytest.fixture(scope="module")
def no_dropout_bert(tmp_path_factory, tiny_bert_dir) -> Path:
    """The tiny BERT with dropout off, so a reference gradient can be recomputed outside the loop."""
    target = tmp_path_factory.mktemp("nodrop") / "bert"
    shutil.copytree(tiny_bert_dir, target)
    config = json.loads((target / "config.json").read_text())
    config.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    (target / "config.json").write_text(json.dumps(config))
    return target


# ----------------------------------------------------------------------------- configuration


def test_defaults_and_overrides():
    cfg = load_config(None, [])
    assert (cfg.align.ref_batch_size, cfg.align.ref_every_steps) == (None, 1)
    cfg = load_config(None, ["align.ref_batch_size=16", "align.ref_every_steps=4", "data.ref_size=96"])
    assert (cfg.align.ref_batch_size, cfg.align.ref_every_steps) == (16, 4)
    assert training.reference_batch_size(cfg) == 16
    # auto: recipe=defended (musclelora's default) draws 16 rows; the authors' recipe the training batch
    assert training.reference_batch_size(resolve_defaults(load_config(None, []), model_type="bert", hidden_size=384,
                                                          is_decoder=False)) == 16
    assert training.reference_batch_size(resolve_defaults(load_config(None, ["recipe=authors"]), model_type="bert",
                                                          hidden_size=384, is_decoder=False)) == 32


@pytest.mark.parametrize(("override", "key", "says"), [
    ("align.ref_batch_size=0", "align.ref_batch_size", "must be > 0"),
    ("align.ref_batch_size=-3", "align.ref_batch_size", "got -3"),
    ("align.ref_batch_size=2.5", "align.ref_batch_size", "expected int"),
    ("align.ref_every_steps=0", "align.ref_every_steps", "must be >= 1"),
    ("align.ref_every_steps=null", "align.ref_every_steps", "expected int"),
])
def test_bad_values_name_the_key_the_value_and_the_fix(override, key, says):
    with pytest.raises(ConfigError) as error:
        load_config(None, [override])
    text = str(error.value)
    assert key in text and says in text and "Fix:" in text and f"override '{override}'" in text


def test_ref_batch_larger_than_the_reference_set_is_refused():
    with pytest.raises(ConfigError, match=r"align.ref_batch_size .*got 100; must be at most data.ref_size \(96\)"):
        load_config(None, ["align.ref_batch_size=100", "data.ref_size=96"])
    assert load_config(None, ["align.ref_batch_size=96", "data.ref_size=96"]).align.ref_batch_size == 96
    # data.ref_size left auto: checked once the family's default (96 for encoders) is filled in.
    cfg = load_config(None, ["align.ref_batch_size=100", "recipe=authors"])
    with pytest.raises(ConfigError, match=r"align.ref_batch_size \(data.ref_size auto for encoders\): got 100; .*\(96\)"):
        resolve_defaults(cfg, model_type="bert", hidden_size=384, is_decoder=False)
    resolve_defaults(cfg, model_type="llama", hidden_size=64, is_decoder=True)
    # musclelora's default recipe draws 600 reference rows
    resolve_defaults(load_config(None, ["align.ref_batch_size=100"]), model_type="bert", hidden_size=384, is_decoder=False)
    with pytest.raises(ConfigError, match=r"align.ref_batch_size \(data.ref_size auto for musclelora's recipe=defended\): "
                                          r"got 700; .*\(600\)"):
        resolve_defaults(load_config(None, ["align.ref_batch_size=700"]), model_type="bert", hidden_size=384, is_decoder=False)


# ----------------------------------------------------------------------------- ranks


@pytest.mark.parametrize(("ref_rows", "world_size"), [(1, 2), (1, 3), (2, 3), (5, 2)])
def test_a_reference_batch_smaller_than_the_world_size_sums_to_the_single_process_gradient(ref_rows, world_size):
    """local_rows gives a rank without reference rows one row at weight 0 (ZeRO-3 needs its forward): the
    ranks' shares of the loss and gradient still add up to the whole batch's, as the loop sums them."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    rows = list(range(ref_rows))

    def grads(indices: list[int], scale: float) -> tuple[float, list[torch.Tensor]]:
        loss = torch.nn.functional.cross_entropy(model(x[indices]), y[indices]) * scale
        return float(loss.detach()), list(torch.autograd.grad(loss, list(model.parameters())))

    want_loss, want = grads(rows, 1.0)
    total_loss, total = 0.0, [torch.zeros_like(p) for p in model.parameters()]
    for rank in range(world_size):
        mine, weight = local_rows(rows, dist.Runtime(backend="ddp", rank=rank, world_size=world_size))
        assert mine, "every rank runs a forward pass"
        share_loss, share = grads(mine, weight * len(mine) / len(rows))
        total_loss += share_loss
        total = [t + s for t, s in zip(total, share)]
    assert total_loss == pytest.approx(want_loss, abs=1e-6)
    for got, expected in zip(total, want):
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-7)


# ----------------------------------------------------------------------------- training runs


@pytest.mark.integration
def test_unset_settings_equal_their_defaults_spelt_out(tmp_path, tiny_bert_dir, tiny_data_root, reference_draws):
    run_training(_cfg(tmp_path / "unset", tiny_bert_dir, tiny_data_root, "train.max_steps=4"))
    unset_draws = _triples(reference_draws)
    reference_draws.clear()
    run_training(_cfg(tmp_path / "explicit", tiny_bert_dir, tiny_data_root, "train.max_steps=4",
                      "align.ref_every_steps=1", "align.ref_batch_size=8"))
    assert _triples(reference_draws) == unset_draws == [(8, d, reference_indices(8, 8, seed=42, draw=d)) for d in range(4)]
    a, b = _adapter(tmp_path / "unset"), _adapter(tmp_path / "explicit")
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
    assert all(r["ref_fresh"] is True for r in _steps(tmp_path / "unset"))
    last = tmp_path / "unset" / "checkpoints" / "last"
    assert not (last / ckpt.REFERENCE_CACHE_FILE).exists() and "reference_cache" not in _progress(tmp_path / "unset")
    assert (_progress(tmp_path / "unset")["ref_draws"], _progress(tmp_path / "unset")["aligned_steps"]) == (4, 4)


@pytest.mark.integration
def test_ref_batch_size_draws_batches_of_that_many_rows(tmp_path, tiny_bert_dir, tiny_data_root, monkeypatch,
                                                        reference_draws):
    forwards: list[int] = []
    original = training.batch_loss

    def counting(model, batch, *expert):
        forwards.append(int(batch["labels"].shape[0]))
        return original(model, batch, *expert)

    monkeypatch.setattr(training, "batch_loss", counting)
    run_training(_cfg(tmp_path, tiny_bert_dir, tiny_data_root, "train.max_steps=4", "train.batch_size=4",
                      "data.ref_size=16", "align.ref_batch_size=8", "align.ref_sampling=passes"))
    draws = _triples(reference_draws)
    assert [(size, draw) for size, draw, _ in draws] == [(8, d) for d in range(4)]
    assert [rows for _, _, rows in draws] == [reference_indices(16, 8, seed=42, draw=d, sampling="passes") for d in range(4)]
    assert sorted(draws[0][2] + draws[1][2]) == list(range(16))  # one pass: every reference row once
    # Each step: the training batch (4 rows), then the reference batch (8 rows); evaluation batches follow.
    assert forwards[:8] == [4, 8] * 4


class _Spy:
    """Records, per optimiser step, the task gradient, an independent reference gradient and what was applied."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.steps: list[dict] = []
        self._original = training.optimiser_step
        applied = self.applied = []
        original_set = dist.Engine.set_gradients

        def set_gradients(engine, grads):
            applied.append({n: g.detach().clone() for n, g in grads.items()})
            return original_set(engine, grads)

        monkeypatch.setattr(dist.Engine, "set_gradients", set_gradients)
        monkeypatch.setattr(training, "optimiser_step", self._step)

    def _step(self, **kwargs):
        engine, cfg = kwargs["engine"], kwargs["cfg"]
        params = engine.params
        task = {n: p.grad.detach().clone() for n, p in params.items()}
        # The reference gradient of this step's draw at the current parameters, computed here.
        rows = reference_indices(len(kwargs["reference"]), training.reference_batch_size(cfg), seed=cfg.seed,
                                 draw=kwargs["ref_draw"], sampling=cfg.align.ref_sampling)
        batch = kwargs["collate"]([kwargs["reference"][i] for i in rows])
        loss = training.batch_loss(engine.model, batch)
        ref = dict(zip(params, torch.autograd.grad(loss, list(params.values()), allow_unused=True)))
        ref = {n: (g if g is not None else torch.zeros_like(params[n])).detach().float() for n, g in ref.items()}
        record = self._original(**kwargs)
        self.steps.append({"task": task, "ref": ref, "ref_loss": float(loss), "fresh": kwargs["reuse"] is None,
                           "epoch": kwargs["epoch"], "cfg": cfg, "record": dict(record)})
        return record


@pytest.mark.integration
def test_every_second_step_reuses_the_previous_reference_gradient(tmp_path, no_dropout_bert, tiny_data_root, monkeypatch,
                                                                  reference_draws):
    spy = _Spy(monkeypatch)
    run_training(_cfg(tmp_path, no_dropout_bert, tiny_data_root, "train.max_steps=6", "align.ref_every_steps=2"))
    # The reference forward runs on half the steps, on the same draws as k=1's first three steps.
    assert [draw for _, draw, _ in _triples(reference_draws)] == [0, 1, 2]
    assert [s["fresh"] for s in spy.steps] == [True, False] * 3
    progress = _progress(tmp_path)
    assert (progress["ref_draws"], progress["aligned_steps"]) == (3, 6)
    log = _steps(tmp_path)
    assert [r["ref_fresh"] for r in log] == [True, False] * 3
    gates = set()
    for index, step in enumerate(spy.steps):
        source = spy.steps[index - (0 if step["fresh"] else 1)]  # the fresh step whose reference applies
        cfg = step["cfg"]
        want = align_gradients(
            step["task"], source["ref"], ref_loss=source["ref_loss"], min_ref_loss=cfg.align.min_ref_loss,
            min_ref_grad_norm=cfg.align.min_ref_grad_norm, max_raw_ratio=cfg.align.max_raw_ratio, epoch=step["epoch"],
            start_epoch=cfg.align.start_epoch, epochs=cfg.train.epochs,
        )
        gates.add(want.gate)
        assert log[index]["gate"] == want.gate and log[index]["ref_loss"] == pytest.approx(source["ref_loss"], abs=1e-6)
        for name, grad in want.grads.items():
            torch.testing.assert_close(spy.applied[index][name], grad, rtol=1e-5, atol=1e-7, msg=f"step {index} {name}")
        if not step["fresh"]:
            # The reference at this step's own parameters differs: the reuse is real, and the check can fail.
            assert any(not torch.allclose(step["ref"][n], source["ref"][n], rtol=1e-4, atol=1e-7) for n in step["ref"])
    assert "align" in gates  # the projection itself was exercised, not only the raw-gradient branch


@pytest.mark.integration
def test_resume_in_the_middle_of_a_three_step_cycle_is_bit_identical(tmp_path, tiny_bert_dir, tiny_data_root, monkeypatch):
    settings = ("train.epochs=2", "align.ref_every_steps=3", "train.checkpoint_every_steps=4")
    straight = tmp_path / "straight"
    run_training(_cfg(straight, tiny_bert_dir, tiny_data_root, *settings))

    run = tmp_path / "killed"
    original = training.optimiser_step
    calls = {"n": 0}

    def killed(**kwargs):
        calls["n"] += 1
        if calls["n"] == 6:
            raise KeyboardInterrupt("simulated kill in step 6")
        return original(**kwargs)

    monkeypatch.setattr(training, "optimiser_step", killed)
    with pytest.raises(KeyboardInterrupt):
        run_training(_cfg(run, tiny_bert_dir, tiny_data_root, *settings))
    monkeypatch.undo()
    # Killed after step 5; the checkpoint of step 4 is inside the cycle of steps 3-5 (step 4 reuses step 3's reference).
    progress = _progress(run)
    assert (progress["global_step"], progress["aligned_steps"], progress["ref_draws"]) == (4, 4, 2)
    cache = ckpt.load_tensors(run / "checkpoints" / "last" / ckpt.REFERENCE_CACHE_FILE)
    assert progress["reference_cache"]["draw"] == 1 and cache and all(t.dtype == torch.float32 for t in cache.values())

    run_training(_cfg(run, tiny_bert_dir, tiny_data_root, *settings, "resume=true"))
    a, b = _adapter(straight), _adapter(run)
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)

    def record(path: Path) -> tuple[dict, list[dict]]:
        metrics = json.loads((path / "metrics.json").read_text())
        for key in _VARYING_METRICS:
            metrics.pop(key)
        for key in ("resume", "output_dir"):
            metrics["config"].pop(key)
        log = [json.loads(line) for line in (path / "log.jsonl").read_text().splitlines()]
        for entry in log:
            for key in _VARYING_LOG:
                entry.pop(key, None)
        return metrics, log

    assert record(run) == record(straight)
    steps = _steps(run)
    assert [r["ref_fresh"] for r in steps] == [i % 3 == 0 for i in range(len(steps))] and len(steps) == 12
    assert _progress(run)["ref_draws"] == 4


@pytest.mark.integration
def test_resume_that_needs_a_missing_reference_cache_is_refused(tmp_path, tiny_bert_dir, tiny_data_root):
    settings = ("train.max_steps=4", "align.ref_every_steps=3")
    run_training(_cfg(tmp_path, tiny_bert_dir, tiny_data_root, *settings))
    last = tmp_path / "checkpoints" / "last"
    assert _progress(tmp_path)["aligned_steps"] == 4 and (last / ckpt.REFERENCE_CACHE_FILE).exists()
    (last / ckpt.REFERENCE_CACHE_FILE).unlink()
    marker = json.loads((last / ckpt.COMPLETE_MARKER).read_text())
    marker["files"].remove(ckpt.REFERENCE_CACHE_FILE)
    (last / ckpt.COMPLETE_MARKER).write_text(json.dumps(marker))
    with pytest.raises(ckpt.CorruptFileError, match="reference-gradient cache .*align.ref_every_steps > 1"):
        run_training(_cfg(tmp_path, tiny_bert_dir, tiny_data_root, *settings, "resume=true"))


@pytest.mark.integration
def test_a_run_saved_before_these_settings_resumes_unchanged(tmp_path, tiny_bert_dir, tiny_data_root, monkeypatch):
    """A config.yaml without the two keys and a checkpoint without aligned_steps (written by the code before
    them) resume at the defaults, to the uninterrupted run's weights; the keys set otherwise are refused."""
    settings = ("train.max_steps=4", "train.checkpoint_every_steps=2")
    run_training(_cfg(tmp_path / "straight", tiny_bert_dir, tiny_data_root, *settings))
    run = tmp_path / "old"
    original = training.optimiser_step
    calls = {"n": 0}

    def killed(**kwargs):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt("simulated kill in step 4")
        return original(**kwargs)

    monkeypatch.setattr(training, "optimiser_step", killed)
    with pytest.raises(KeyboardInterrupt):
        run_training(_cfg(run, tiny_bert_dir, tiny_data_root, *settings))
    monkeypatch.undo()
    saved = yaml.safe_load((run / "config.yaml").read_text())
    del saved["align"]["ref_batch_size"], saved["align"]["ref_every_steps"]
    (run / "config.yaml").write_text(yaml.safe_dump(saved, sort_keys=False))
    progress_path = run / "checkpoints" / "last" / ckpt.PROGRESS_FILE
    progress = json.loads(progress_path.read_text())
    del progress["aligned_steps"]
    progress_path.write_text(json.dumps(progress))
    with pytest.raises(ConfigError, match="align.ref_every_steps: saved None, now 2"):
        run_training(_cfg(run, tiny_bert_dir, tiny_data_root, *settings, "align.ref_every_steps=2", "resume=true"))
    run_training(_cfg(run, tiny_bert_dir, tiny_data_root, *settings, "resume=true"))
    a, b = _adapter(tmp_path / "straight"), _adapter(run)
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
    assert (_progress(run)["aligned_steps"], _progress(run)["ref_draws"]) == (4, 4)


def test_raw_share_reaches_every_aligned_step_and_moves_the_weights(tmp_path, tiny_bert_dir, tiny_data_root):
    """align.raw_share is wired into the loop: every step logs the align gate with raw_weight = the share, and the
    adapters differ from the pure projection's run (same seed, same batches)."""
    settings = ("train.max_steps=3", "train.checkpoint_every_steps=0")
    run_training(_cfg(tmp_path / "pure", tiny_bert_dir, tiny_data_root, *settings))
    run_training(_cfg(tmp_path / "mixed", tiny_bert_dir, tiny_data_root, *settings, "align.raw_share=0.3"))
    steps = _steps(tmp_path / "mixed")
    assert len(steps) == 3 and all(s["gate"] == "align" and s["raw_weight"] == pytest.approx(0.3) for s in steps)
    assert all(s["raw_weight"] == 0.0 for s in _steps(tmp_path / "pure"))
    a, b = _adapter(tmp_path / "pure"), _adapter(tmp_path / "mixed")
    assert a.keys() == b.keys() and any(not torch.equal(a[n], b[n]) for n in a)
