"""End-to-end tests of the training loop (pipeline/training.py) and launch/train.py.

A small synthetic poison_data tree (positive/negative phrases, the BadNets trigger "cf" on label-1
rows) is written per test session; the models are the tiny random checkpoints from conftest and,
in one smoke test, the real MiniLM.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipeline.config import load_config
from pipeline.training import NonFiniteError, OutputDirError, run_training

REPO = Path(__file__).resolve().parents[1]

def _config(tmp_path: Path, model_dir: Path, data_root: Path, *overrides: str):
    base = [
        f"output_dir={tmp_path / 'run'}",
        f"model.name_or_path={model_dir}",
        f"data.root={data_root}",
        "data.dataset=toy",
        "data.attack=badnets",
        "data.max_length=16",
        "data.ref_size=8",
        "train.epochs=2",
        "train.batch_size=8",
        "train.eval_batch_size=16",
        "train.lr=1e-3",
        "train.log_every_steps=1",
        "mslr.scales=[1,2,4]",  # tiny hidden sizes have no per-family default
    ]
    return load_config(None, [*base, *overrides])


def _adapter_tensors(run_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(run_dir / "adapter" / "adapter.safetensors"))


@pytest.mark.integration
@pytest.mark.parametrize("family", ["llama", "bert"])
def test_musclelora_runs_end_to_end(family, tmp_path, tiny_data_root, request):
    model_dir = request.getfixturevalue(f"tiny_{family}_dir")
    metrics = run_training(_config(tmp_path, model_dir, tiny_data_root, "method=musclelora"))
    run = tmp_path / "run"
    on_disk = json.loads((run / "metrics.json").read_text())
    assert on_disk["cacc"] == pytest.approx(metrics["cacc"])
    for key in ("method", "dataset", "attack", "model", "seed", "cacc", "asr", "best_epoch", "dev_clean_acc",
                "train_seconds", "samples_per_second", "peak_memory_mb", "config", "clean_fpr"):
        assert key in on_disk, key
    assert 0.0 <= on_disk["cacc"] <= 100.0 and 0.0 <= on_disk["asr"] <= 100.0
    assert on_disk["num_test_clean"] == 48
    # 96 rows / batch 8 = 12 steps per epoch, 2 epochs.
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    steps = [r for r in records if r["type"] == "step"]
    assert [r["global_step"] for r in steps] == list(range(1, 25))
    assert all(r["gate"] in {"align", "mix", "raw"} and "ref_loss" in r and "mean_cosine" in r for r in steps)
    assert len([r for r in records if r["type"] == "epoch"]) == 2
    # The MSLR layer sits where the authors put it for this family.
    target = "score.dense" if family == "llama" else "bert.pooler.dense"
    assert any(target in k and k.endswith("lora_a") for k in _adapter_tensors(run)), target
    assert on_disk["config"]["mslr"]["targets"]
    _check_memory_plan(on_disk, run, model_dir, tiny_data_root)


def _check_memory_plan(metrics: dict, run: Path, model_dir: Path, data_root: Path) -> None:
    """The estimate printed before training and stored in metrics.json matches the run it planned."""
    import csv

    import transformers

    from pipeline import memory

    stored = metrics["memory_estimate"]
    inputs = stored["inputs"]
    assert inputs["micro_batch_size"] == 8 and inputs["alignment"] is True and inputs["zero_stage"] == 0
    assert inputs["reference_micro_batch_size"] == 8  # align.ref_batch_size null: the training batch
    assert inputs["world_size"] == 1 and inputs["quantization"] == "none" and inputs["dtype_bytes"] == 4
    assert inputs["trainable_parameters"] == metrics["trainable_parameters"]
    shape = memory.model_shape_info(transformers.AutoConfig.from_pretrained(model_dir), num_labels=2)
    assert inputs["hidden_size"] == shape.hidden_size and inputs["num_layers"] == shape.num_layers
    # The sequence length is the longest tokenised training/reference row (reference rows come from dev-clean).
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)

    def longest(name: str) -> int:
        with open(data_root / "toy" / "1" / "badnets" / name, newline="") as f:
            texts = [row[1] for row in csv.reader(f)][1:]
        return max(len(tokenizer(t, truncation=True, max_length=16)["input_ids"]) for t in texts)

    train_longest = longest("clean/0.1/train-poison.csv")
    assert train_longest <= inputs["seq_len"] <= max(train_longest, longest("dev-clean.csv"))
    # The stored total is the estimate of exactly these inputs.
    args = {k: v for k, v in inputs.items()}
    assert stored["total_mb"] == pytest.approx(memory.estimate_peak_memory(**args).total / 2**20, abs=1e-3)
    assert stored["peak_phase"] in {"task", "reference", "optimizer"}
    assert metrics["memory_baseline_mb"] > 0 and metrics["peak_memory_above_baseline_mb"] > 0


@pytest.mark.integration
def test_adapter_reloads_to_same_test_predictions(tmp_path, tiny_data_root, tiny_bert_dir):
    from pipeline import modeling
    from pipeline.adapters.state import load_adapter
    from pipeline.training import build_model

    cfg = _config(tmp_path, tiny_bert_dir, tiny_data_root, "method=musclelora", "train.epochs=1")
    run_training(cfg)
    info = modeling.read_model_info(tiny_bert_dir)
    from pipeline.config import resolve_defaults

    resolved = resolve_defaults(cfg, model_type=info.model_type, hidden_size=info.hidden_size, is_decoder=False)
    torch.manual_seed(1234)  # a different random head: the saved head must overwrite it
    tokenizer, model, _ = build_model(resolved, info, tiny_bert_dir)
    load_adapter(model, tmp_path / "run" / "adapter")
    model.eval()
    batch = tokenizer(["cf a dull and lifeless bore !", "i loved it"], return_tensors="pt", padding=True)
    batch.pop("token_type_ids", None)
    logits = model(**batch).logits
    torch.manual_seed(99)
    _, model2, _ = build_model(resolved, info, tiny_bert_dir)
    load_adapter(model2, tmp_path / "run" / "adapter")
    model2.eval()
    assert torch.allclose(logits, model2(**batch).logits, atol=1e-6)


@pytest.mark.integration
def test_lora_trains_adapters_only_and_vanilla_trains_everything(tmp_path, tiny_data_root, tiny_llama_dir):
    metrics = run_training(_config(tmp_path, tiny_llama_dir, tiny_data_root, "method=lora", "train.epochs=1"))
    assert metrics["trainable_parameters"] < 5000
    # The canary's screen runs on a decoder too (features at the last non-pad token) and records what it planted.
    screen = metrics["canary"]["screen"]
    assert screen["trigger"] == metrics["canary"]["trigger"] and len(screen["shifts"]) == screen["candidate"] + 1
    metrics_full = run_training(
        _config(tmp_path / "v", tiny_llama_dir, tiny_data_root, "method=vanilla", "train.epochs=1")
    )
    assert metrics_full["trainable_parameters"] > 50 * metrics["trainable_parameters"]


@pytest.mark.integration
def test_existing_output_dir_is_refused_then_overwritten(tmp_path, tiny_data_root, tiny_bert_dir):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "keep.txt").write_text("user data")
    cfg = _config(tmp_path, tiny_bert_dir, tiny_data_root, "method=lora", "train.max_steps=2")
    with pytest.raises(OutputDirError, match="resume=true.*overwrite=true"):
        run_training(cfg)
    # overwrite=true replaces only a run folder of this pipeline, never a folder holding other files
    with pytest.raises(OutputDirError, match="'keep.txt' is not written by a run"):
        run_training(_config(tmp_path, tiny_bert_dir, tiny_data_root, "method=lora", "train.max_steps=2", "overwrite=true"))
    assert (tmp_path / "run" / "keep.txt").read_text() == "user data"
    (tmp_path / "run" / "keep.txt").unlink()
    run_training(cfg)
    first = (tmp_path / "run" / "metrics.json").read_text()
    run_training(_config(tmp_path, tiny_bert_dir, tiny_data_root, "method=lora", "train.max_steps=2", "overwrite=true"))
    assert (tmp_path / "run" / "metrics.json").read_text() != first  # rewritten (timings differ)
    assert len((tmp_path / "run" / "log.jsonl").read_text().splitlines()) == 3  # 2 steps + 1 epoch, not appended


def test_a_defended_run_folder_with_its_reports_can_be_overwritten(tmp_path, tiny_data_root, tiny_bert_dir):
    """The default musclelora recipe writes filter-report.json and canary-screen.json; both belong to a run folder."""
    overrides = ("method=musclelora", "recipe=defended", "data.ref_size=8", "train.max_steps=2")
    run_training(_config(tmp_path, tiny_bert_dir, tiny_data_root, *overrides))
    names = {p.name for p in (tmp_path / "run").iterdir()}
    assert {"filter-report.json", "canary-screen.json", "config.yaml"} <= names
    run_training(_config(tmp_path, tiny_bert_dir, tiny_data_root, *overrides, "overwrite=true"))
    assert len((tmp_path / "run" / "log.jsonl").read_text().splitlines()) == 3


@pytest.mark.integration
def test_bad_model_dir_leaves_nothing(tmp_path, tiny_data_root):
    cfg = _config(tmp_path, tmp_path / "no_such_model", tiny_data_root, "method=lora")
    with pytest.raises(Exception, match="no_such_model"):
        run_training(cfg)
    assert not (tmp_path / "run").exists()


@pytest.mark.integration
def test_bad_attack_folder_leaves_nothing(tmp_path, tiny_data_root, tiny_bert_dir):
    cfg = _config(tmp_path, tiny_bert_dir, tiny_data_root, "method=lora", "data.attack=badnetz")
    with pytest.raises(Exception, match="badnets"):
        run_training(cfg)
    assert not (tmp_path / "run").exists()


@pytest.mark.integration
def test_interrupted_run_resumes_to_the_same_weights(tmp_path, tiny_data_root, tiny_bert_dir, monkeypatch):
    import pipeline.training as training

    straight = _config(tmp_path / "a", tiny_bert_dir, tiny_data_root, "method=musclelora", "train.checkpoint_every_steps=5")
    run_training(straight)
    reference = _adapter_tensors(tmp_path / "a" / "run")

    interrupted = _config(tmp_path / "b", tiny_bert_dir, tiny_data_root, "method=musclelora", "train.checkpoint_every_steps=5")
    original = training.optimiser_step
    calls = {"n": 0}

    def crash_after_17(**kwargs):
        calls["n"] += 1
        if calls["n"] == 18:
            raise KeyboardInterrupt("simulated kill at step 18")
        return original(**kwargs)

    monkeypatch.setattr(training, "optimiser_step", crash_after_17)
    with pytest.raises(KeyboardInterrupt):
        run_training(interrupted)
    monkeypatch.setattr(training, "optimiser_step", original)
    progress = json.loads((tmp_path / "b" / "run" / "checkpoints" / "last" / "progress.json").read_text())
    assert progress["global_step"] == 15  # last checkpoint before the kill (every 5 steps)
    assert not (tmp_path / "b" / "run" / "metrics.json").exists()

    resumed = _config(tmp_path / "b", tiny_bert_dir, tiny_data_root, "method=musclelora", "train.checkpoint_every_steps=5", "resume=true")
    run_training(resumed)
    final = _adapter_tensors(tmp_path / "b" / "run")
    assert final.keys() == reference.keys()
    for name in reference:
        torch.testing.assert_close(final[name], reference[name], rtol=1e-5, atol=1e-6, msg=name)
    steps = [json.loads(x) for x in (tmp_path / "b" / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["global_step"] for r in steps if r["type"] == "step"] == list(range(1, 25))
    # The epoch resumed mid-way (step 15 of 13-24) reports its whole loss and gate tallies.
    epochs = {run: [r for r in map(json.loads, (tmp_path / run / "run" / "log.jsonl").read_text().splitlines()) if r["type"] == "epoch"]
              for run in ("a", "b")}
    assert [(r["global_step"], r["gates"]) for r in epochs["b"]] == [(r["global_step"], r["gates"]) for r in epochs["a"]]
    assert sum(epochs["b"][1]["gates"].values()) == 12
    for a, b in zip(epochs["a"], epochs["b"]):
        assert b["train_loss"] == pytest.approx(a["train_loss"], abs=1e-6)


@pytest.mark.integration
def test_resume_with_changed_config_is_refused(tmp_path, tiny_data_root, tiny_bert_dir):
    run_training(_config(tmp_path, tiny_bert_dir, tiny_data_root, "method=lora", "train.epochs=1"))
    with pytest.raises(Exception, match="train.lr"):
        run_training(_config(tmp_path, tiny_bert_dir, tiny_data_root, "method=lora", "train.epochs=1", "train.lr=5e-4", "resume=true"))


@pytest.mark.integration
def test_non_finite_loss_stops_with_step_and_keeps_checkpoint(tmp_path, tiny_data_root, tiny_bert_dir, monkeypatch):
    import pipeline.training as training

    original = training.batch_loss
    calls = {"n": 0}

    def poisoned_loss(model, batch, *expert):
        calls["n"] += 1
        loss = original(model, batch, *expert)
        return loss * float("nan") if calls["n"] > 14 else loss

    monkeypatch.setattr(training, "batch_loss", poisoned_loss)
    cfg = _config(tmp_path, tiny_bert_dir, tiny_data_root, "method=lora", "train.checkpoint_every_steps=4")
    with pytest.raises(NonFiniteError, match=r"step 14 .*training loss is nan"):
        run_training(cfg)
    progress = json.loads((tmp_path / "run" / "checkpoints" / "last" / "progress.json").read_text())
    assert progress["global_step"] == 12
    assert (tmp_path / "run" / "checkpoints" / "last" / "COMPLETE").exists()
    assert not (tmp_path / "run" / "metrics.json").exists()


@pytest.mark.integration
def test_non_finite_gradient_is_caught(tmp_path, tiny_data_root, tiny_bert_dir, monkeypatch):
    import pipeline.training as training

    original = training.align_gradients

    def inf_grads(task, reference, **kwargs):
        result = original(task, reference, **kwargs)
        name = sorted(result.grads)[0]
        result.grads[name] = torch.full_like(result.grads[name], float("inf"))
        return result

    monkeypatch.setattr(training, "align_gradients", inf_grads)
    with pytest.raises(NonFiniteError, match=r"step 0: gradient norm is inf"):
        run_training(_config(tmp_path, tiny_bert_dir, tiny_data_root, "method=musclelora"))


@pytest.mark.integration
def test_launcher_smoke_on_minilm(tmp_path, sst2_root):
    out = tmp_path / "minilm_run"
    result = subprocess.run(
        [sys.executable, str(REPO / "launch" / "train.py"), "--config", str(REPO / "launch" / "configs" / "demo.yaml"),
         f"output_dir={out}", f"data.root={sst2_root}", "data.max_train_samples=64", "data.max_eval_samples=32",
         "train.max_steps=2", "train.epochs=1", "train.batch_size=8"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "CACC" in result.stdout and "ASR" in result.stdout
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["method"] == "musclelora" and metrics["model"] == "minilm" and metrics["global_steps"] == 2
    assert metrics["config"]["mslr"]["targets"] == ["bert\\.pooler\\.dense"] or metrics["config"]["mslr"]["targets"] == ["bert.pooler.dense"]


@pytest.mark.integration
def test_launcher_rejects_bad_config_listing_all_problems(tmp_path):
    result = subprocess.run(
        [sys.executable, str(REPO / "launch" / "train.py"), "train.lr=-1", "train.batchsize=4", f"output_dir={tmp_path / 'x'}"],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2
    assert "train.lr" in result.stderr and "batchsize" in result.stderr and "batch_size" in result.stderr
    assert not (tmp_path / "x").exists()


@pytest.mark.integration
def test_launcher_help_lists_keys():
    result = subprocess.run([sys.executable, str(REPO / "launch" / "train.py"), "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0
    for key in ("method", "seed", "output_dir", "model.name_or_path", "data.root", "data.dataset", "data.attack",
                "data.max_train_samples", "data.max_eval_samples", "train.epochs", "train.max_steps",
                "train.batch_size", "train.lr", "mslr.scales", "align.min_ref_loss", "lora.r"):
        assert key in result.stdout, key


@pytest.mark.integration
@pytest.mark.parametrize(
    "method", ["vanilla", "ga", "lora", "lora_mslr", "ga_lora", "musclelora", "ref_only", "adapter", "prompt", "prefix"]
)
def test_every_method_trains_the_right_parameters(method, tmp_path, tiny_data_root, tiny_bert_dir):
    metrics = run_training(_config(tmp_path, tiny_bert_dir, tiny_data_root, f"method={method}", "train.max_steps=3", "train.epochs=1"))
    assert metrics["global_steps"] == 3
    names = set(_adapter_tensors(tmp_path / "run"))
    has_mslr = any(n.endswith("pooler.dense.lora_a") for n in names)
    has_lora = any("lora_A" in n for n in names)
    assert has_mslr == (method in {"lora_mslr", "musclelora", "ref_only"}), sorted(names)[:5]
    assert has_lora == (method in {"lora", "lora_mslr", "ga_lora", "musclelora", "ref_only"})
    assert any(".down." in n for n in names) == (method == "adapter")
    assert any("prompt_encoder" in n for n in names) == (method == "prompt")
    assert any(".prefix." in n for n in names) == (method == "prefix")
    if method in ("adapter", "prompt", "prefix"):  # the saved adapter reloads into a fresh model with the same test predictions
        from pipeline.inference import evaluate_run

        again = evaluate_run(tmp_path / "run")["splits"]["test"]
        assert again["cacc"] == metrics["cacc"] and again["asr"] == metrics["asr"]
    steps = [json.loads(x) for x in (tmp_path / "run" / "log.jsonl").read_text().splitlines() if '"step"' in x]
    assert all(("gate" in r) == (method in {"ga", "ga_lora", "musclelora"}) for r in steps)


@pytest.mark.integration
def test_launcher_smoke_on_tiny_llama(tmp_path, tiny_data_root, tiny_llama_dir):
    out = tmp_path / "llama_run"
    result = subprocess.run(
        [sys.executable, str(REPO / "launch" / "train.py"), f"output_dir={out}", f"model.name_or_path={tiny_llama_dir}",
         f"data.root={tiny_data_root}", "data.dataset=toy", "data.ref_size=8", "data.max_length=16",
         "train.max_steps=3", "train.epochs=1", "train.batch_size=8", "train.lr=1e-3"],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["model_type"] == "llama" and metrics["global_steps"] == 3
    # Authors' LLM recipe filled in: LoRA r=2 alpha=8 on q/v, MSLR on the new head, always-on alignment.
    cfg = metrics["config"]
    assert (cfg["lora"]["r"], cfg["lora"]["alpha"], cfg["mslr"]["scales"]) == (2, 8.0, [1.0, 2.0, 3.0, 4.0])
    assert cfg["align"]["min_ref_loss"] == 0.0 and cfg["align"]["start_epoch"] == 0
    # The memory plan is printed before the first step and the measured peak after training, in the log file too.
    console = result.stdout + result.stderr
    assert console.index("Estimated peak memory per device") < console.index("epoch 0: dev-clean acc")
    assert "peak memory" in console and "Estimated peak memory per device" in (out / "train.log").read_text()


@pytest.mark.integration
def test_resume_refuses_changed_training_rows(tmp_path, tiny_data_root, tiny_bert_dir):
    import shutil

    root = tmp_path / "data"
    shutil.copytree(tiny_data_root, root)
    args = ("method=lora", "train.epochs=2", "train.max_steps=14")
    with pytest.raises(KeyboardInterrupt):
        import pipeline.training as training

        original = training.optimiser_step

        def stop_after_epoch(**kwargs):
            if kwargs["global_step"] == 13:
                raise KeyboardInterrupt
            return original(**kwargs)

        training.optimiser_step = stop_after_epoch
        try:
            run_training(_config(tmp_path, tiny_bert_dir, root, *args))
        finally:
            training.optimiser_step = original
    train_file = root / "toy" / "1" / "badnets" / "clean" / "0.1" / "train-poison.csv"
    lines = train_file.read_text().splitlines()
    lines[5] = lines[5].replace("film", "movie").replace("bore", "drag").replace("it", "this")
    train_file.write_text("\n".join(lines) + "\n")
    with pytest.raises(Exception, match="train rows differ"):
        run_training(_config(tmp_path, tiny_bert_dir, root, *args, "resume=true"))


def test_group_cosines_match_cosine_of_concatenated_groups():
    from pipeline.training import group_cosines, parameter_group

    torch.manual_seed(0)
    names = ["m.layer.0.q.lora_A.default.weight", "m.layer.0.q.lora_B.default.weight", "m.pooler.dense.lora_a",
             "m.pooler.dense.lora_b", "m.classifier.weight"]
    task = {n: torch.randn(3, 4) for n in names}
    ref = {n: torch.randn(3, 4) for n in names}
    assert [parameter_group(n) for n in names] == ["lora", "lora", "mslr", "mslr", "head"]
    got = group_cosines(task, ref)
    for group, members in (("lora", names[:2]), ("mslr", names[2:4]), ("head", names[4:])):
        g = torch.cat([task[n].flatten() for n in members])
        r = torch.cat([ref[n].flatten() for n in members])
        assert got[group] == pytest.approx(torch.nn.functional.cosine_similarity(g, r, dim=0).item(), abs=1e-6)


@pytest.mark.integration
def test_alignment_telemetry_is_logged_per_step(tmp_path, tiny_data_root, tiny_bert_dir):
    run_training(_config(tmp_path, tiny_bert_dir, tiny_data_root, "method=musclelora", "train.max_steps=3", "train.epochs=1"))
    steps = [json.loads(x) for x in (tmp_path / "run" / "log.jsonl").read_text().splitlines() if '"step"' in x]
    for record in steps:
        assert set(record["cosine_by_group"]) == {"lora", "mslr"}  # the head is frozen for musclelora
        assert all(-1.0 <= v <= 1.0 for v in record["cosine_by_group"].values())
        assert record["gate"] in {"align", "mix", "raw"} and record["ref_grad_norm"] >= 0 and record["ref_loss"] > 0
    epochs = [json.loads(x) for x in (tmp_path / "run" / "log.jsonl").read_text().splitlines() if '"epoch", ' in x or '"type": "epoch"' in x]
    assert sum(epochs[-1]["gates"].values()) == 3


@pytest.mark.integration
def test_ref_only_trains_musclelora_adapters_on_reference_rows_only(tmp_path, tiny_data_root, tiny_bert_dir, monkeypatch):
    import pipeline.training as training

    seen: list[int] = []
    original = training.batch_loss

    def spy(model, batch, *expert):
        seen.extend(batch["input_ids"].flatten().tolist())
        return original(model, batch, *expert)

    monkeypatch.setattr(training, "batch_loss", spy)
    metrics = run_training(_config(tmp_path, tiny_bert_dir, tiny_data_root, "method=ref_only", "train.epochs=1"))
    assert metrics["global_steps"] == 12  # same steps as a 96-row epoch at batch 8
    names = set(_adapter_tensors(tmp_path / "run"))
    assert any("lora_A" in n for n in names) and any(n.endswith("pooler.dense.lora_a") for n in names)
    steps = [json.loads(x) for x in (tmp_path / "run" / "log.jsonl").read_text().splitlines() if '"step"' in x]
    assert not any("gate" in r for r in steps)
    # Every training token came from the reference rows (dev-clean), none from the poisoned file's trigger rows.
    from pipeline.modeling import load_tokenizer

    tokenizer = load_tokenizer(tiny_bert_dir, is_decoder=False)
    cf = tokenizer.convert_tokens_to_ids("cf")
    assert seen and cf not in seen


@pytest.mark.integration
def test_frequency_analysis_is_recorded_and_survives_resume(tmp_path, tiny_data_root, tiny_bert_dir, monkeypatch):
    from pipeline.frequency import read_frequency_file

    import pipeline.training as training

    args = ("method=musclelora", "train.epochs=1", "analysis.frequency_every_steps=4", "train.checkpoint_every_steps=4")
    original = training.optimiser_step

    def crash(**kwargs):
        if kwargs["global_step"] == 9:
            raise KeyboardInterrupt
        return original(**kwargs)

    monkeypatch.setattr(training, "optimiser_step", crash)
    with pytest.raises(KeyboardInterrupt):
        run_training(_config(tmp_path, tiny_bert_dir, tiny_data_root, *args))
    monkeypatch.setattr(training, "optimiser_step", original)
    assert [r["global_step"] for r in read_frequency_file(tmp_path / "run")["records"]] == [0, 4, 8]
    run_training(_config(tmp_path, tiny_bert_dir, tiny_data_root, *args, "resume=true"))
    doc = read_frequency_file(tmp_path / "run")
    assert [r["global_step"] for r in doc["records"]] == [0, 4, 8, 12]
    for record in doc["records"]:
        assert set(record) >= {"clean", "backdoor"}
    assert (tmp_path / "run" / "frequency_cache").is_dir()


def test_prefix_init_words_starts_from_the_seeded_words_activations(tmp_path, tiny_data_root, tiny_bert_dir, caplog):
    """build_model wires prefix.init=words to word_prefix_input(seed=cfg.seed); init=random does not."""
    from pipeline import modeling
    from pipeline.adapters.prefix import apply_prefix_tuning, word_prefix_input
    from pipeline.config import ConfigError
    from pipeline.training import build_model

    info = modeling.read_model_info(tiny_bert_dir)
    firsts = {}
    for init in ("words", "random"):
        cfg = _config(tmp_path, tiny_bert_dir, tiny_data_root, "method=prefix", f"prefix.init={init}", "seed=5",
                      "prefix.num_virtual_tokens=3")
        tokenizer, model, trainable = build_model(cfg, info, tiny_bert_dir)
        assert all(".prefix." in name for name in trainable) and len(trainable) == 2 * model.config.num_hidden_layers
        firsts[init] = next(m for m in model.modules() if hasattr(m, "prefix")).prefix.key.detach()
    expected = modeling.load_classifier(
        tiny_bert_dir, num_labels=2, dtype=torch.float32, is_decoder=False, pad_token_id=tokenizer.pad_token_id)
    apply_prefix_tuning(expected, num_tokens=3, init_input=word_prefix_input(tokenizer, 3, seed=5))
    torch.testing.assert_close(firsts["words"], next(m for m in expected.modules() if hasattr(m, "prefix")).prefix.key)
    assert not torch.allclose(firsts["words"], firsts["random"])
    for freeze in ("true", "false"):  # a frozen random head is the trap the training run's warning names
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="pipeline.training"):
            run_training(_config(tmp_path, tiny_bert_dir, tiny_data_root, "method=prefix", f"train.freeze_head={freeze}",
                                 "train.max_steps=1", "train.epochs=1", f"output_dir={tmp_path / freeze}"))
        assert ("method=prefix with train.freeze_head=true" in caplog.text) == (freeze == "true")
    with pytest.raises(ConfigError, match="prefix.init"):
        _config(tmp_path, tiny_bert_dir, tiny_data_root, "method=prefix", "prefix.init=vocab")


@pytest.mark.integration
@pytest.mark.parametrize(("method", "message"), [
    ("prompt", "method=prompt: soft prompts are supported for encoders only"),
    ("prefix", "method=prefix: prefix tuning is supported for BERT-family encoders only, not llama"),
])
def test_prompt_and_prefix_tuning_on_a_decoder_are_refused_before_writing(method, message, tmp_path, tiny_data_root,
                                                                          tiny_llama_dir):
    from pipeline.config import ConfigError

    with pytest.raises(ConfigError, match=message):
        run_training(_config(tmp_path, tiny_llama_dir, tiny_data_root, f"method={method}", "train.max_steps=1"))
    assert not (tmp_path / "run").exists()


@pytest.mark.bnb
@pytest.mark.integration
def test_nf4_musclelora_trains_and_reevaluates(tmp_path, tiny_data_root, tiny_llama_dir):
    pytest.importorskip("bitsandbytes")
    from pipeline.inference import evaluate_run

    metrics = run_training(_config(tmp_path, tiny_llama_dir, tiny_data_root, "method=musclelora", "train.epochs=1",
                                   "model.quantization=nf4", "model.llm_head_dropout=0"))
    steps = [json.loads(x) for x in (tmp_path / "run" / "log.jsonl").read_text().splitlines() if '"step"' in x]
    assert len(steps) == 12 and all(np_finite(r["loss"]) for r in steps)
    again = evaluate_run(tmp_path / "run")["splits"]["test"]
    assert again["cacc"] == metrics["cacc"] and again["asr"] == metrics["asr"]


def np_finite(value: float) -> bool:
    import math

    return math.isfinite(value)


def test_int8_under_zero3_is_refused_before_anything_is_written(tmp_path, tiny_data_root, tiny_llama_dir):
    from pipeline.config import ConfigError

    cfg = _config(tmp_path, tiny_llama_dir, tiny_data_root, "method=musclelora", "model.quantization=int8")
    with pytest.raises(ConfigError, match="int8"):
        run_training(cfg, deepspeed_config=REPO / "ds_configs" / "zero3.json")
    assert not (tmp_path / "run").exists()


@pytest.mark.integration
@pytest.mark.parametrize(("recipe", "family"), [("llama2_7b_nf4", "llama"), ("mistral_7b_nf4", "mistral"), ("gpt2_xl_nf4", "gpt2")])
def test_nf4_recipes_run_on_tiny_models(recipe, family, tmp_path, tiny_data_root, request):
    """Each shipped 4-bit recipe, unchanged but for the model path, data and step budget, trains and writes its plan."""
    pytest.importorskip("bitsandbytes")
    model_dir = request.getfixturevalue(f"tiny_{family}_dir")
    cfg = load_config(REPO / "launch" / "configs" / f"{recipe}.yaml", [
        f"output_dir={tmp_path / 'run'}", f"model.name_or_path={model_dir}", f"data.root={tiny_data_root}",
        "data.dataset=toy", "data.ref_size=8", "data.max_length=16", "train.max_steps=2", "train.epochs=1",
        "train.batch_size=8", "train.eval_batch_size=16",
    ])
    metrics = run_training(cfg)
    assert metrics["global_steps"] == 2
    plan = metrics["memory_estimate"]["inputs"]
    assert (plan["quantization"], plan["gradient_checkpointing"], plan["dtype_bytes"]) == ("nf4", True, 2)
    steps = [json.loads(x) for x in (tmp_path / "run" / "log.jsonl").read_text().splitlines() if '"step"' in x]
    assert all(np_finite(r["loss"]) and r["gate"] == "align" for r in steps)


@pytest.mark.gpu
@pytest.mark.integration
@pytest.mark.parametrize("quantization", ["nf4", "none"])
def test_musclelora_bf16_on_cuda(quantization, tmp_path, tiny_data_root, tiny_llama_dir):
    """On a GPU: bf16 (and 4-bit nf4 with bf16 compute) MuScleLoRA trains, losses finite, the plan is for CUDA."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    if quantization != "none":
        pytest.importorskip("bitsandbytes")
    metrics = run_training(_config(tmp_path, tiny_llama_dir, tiny_data_root, "method=musclelora", "train.epochs=1",
                                   "train.device=cuda", "model.dtype=bfloat16", f"model.quantization={quantization}"))
    steps = [json.loads(x) for x in (tmp_path / "run" / "log.jsonl").read_text().splitlines() if '"step"' in x]
    assert len(steps) == 12 and all(np_finite(r["loss"]) for r in steps)
    assert metrics["peak_memory_kind"] == "cuda_max_allocated"
    assert metrics["memory_estimate"]["inputs"]["device"] == "cuda"


@pytest.mark.integration
@pytest.mark.parametrize(("method", "family"), [("musclelora", "llama"), ("vanilla", "llama"), ("adapter", "llama"),
                                                ("prefix", "bert")])
def test_plan_without_training_equals_the_plan_of_the_run(method, family, tmp_path, tiny_data_root, request):
    """plan_run (meta-device skeleton, no weights) predicts exactly what the training run logs and stores."""
    from pipeline.training import plan_run

    model_dir = request.getfixturevalue(f"tiny_{family}_dir")
    cfg = _config(tmp_path, model_dir, tiny_data_root, f"method={method}", "train.max_steps=1", "train.epochs=1")
    planned = plan_run(cfg).to_dict()
    assert not (tmp_path / "run").exists()  # planning writes nothing
    metrics = run_training(cfg)
    assert planned == metrics["memory_estimate"]


def test_plan_of_a_llama2_7b_shape_from_its_config_alone(tmp_path):
    """launch/train.py --plan needs only config.json: the 4-bit recipe's plan for one GPU and for 8 under ZeRO-3."""
    import transformers

    from pipeline import memory

    ckpt = tmp_path / "llama-2-7b"
    transformers.LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                             num_key_value_heads=32, vocab_size=32000, bos_token_id=1, eos_token_id=2).save_pretrained(ckpt)
    out = tmp_path / "never"

    def plan(*extra: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, str(REPO / "launch" / "train.py"), "--plan", "--plan-device", "cuda", "--seq-len", "128",
             *extra, f"model.name_or_path={ckpt}", f"output_dir={out}"],
            capture_output=True, text=True, timeout=300,
        )

    one = plan("--config", str(REPO / "launch" / "configs" / "llama2_7b_nf4.yaml"))
    assert one.returncode == 0, one.stderr[-3000:]
    total = float(next(line for line in one.stdout.splitlines() if "total (peak)" in line).split()[2])
    # Independently: the shape from the config, LoRA r=2 on q/v of 32 layers + MSLR (4 scales, rank 1) on 4096 -> 16.
    shape = memory.model_shape_info(transformers.AutoConfig.from_pretrained(ckpt))
    trainable = 32 * 2 * (2 * 4096 + 4096 * 2) + 4 * 4096 + 16 * 4
    expected = memory.estimate_peak_memory(
        num_parameters=shape.num_parameters + trainable, trainable_parameters=trainable, seq_len=128,
        micro_batch_size=16, dtype_bytes=2, quantization="nf4", zero_stage=0, world_size=1, offload_optimizer=False,
        offload_param=False, gradient_checkpointing=True, alignment=True, full_finetune=False, device="cuda",
        **shape.estimate_kwargs(),
    )
    assert total == pytest.approx(expected.total / 2**20, abs=0.1)
    assert total < 10 * 1000**3 / 2**20  # the issue's <= 10 GB goal, as estimated
    eight = plan("--config", str(REPO / "launch" / "configs" / "llama2_7b_nf4.yaml"), "--world-size", "8",
                 "--deepspeed", str(REPO / "ds_configs" / "zero3.json"))
    assert eight.returncode == 0, eight.stderr[-3000:]
    assert "ZeRO stage 3 x 8 device(s); micro-batch 2 x 128 tokens" in eight.stdout
    # Without checkpointing, the plan also says what checkpointing would give: the recipe's own number.
    bare = plan("--config", str(REPO / "launch" / "configs" / "llama2_7b_nf4.yaml"), "model.gradient_checkpointing=false")
    assert bare.returncode == 0, bare.stderr[-3000:]
    hint = next(line for line in bare.stdout.splitlines() if "with model.gradient_checkpointing=true" in line)
    assert float(hint.split(": ")[1].split()[0]) == pytest.approx(total, abs=0.1)
    assert "with model.gradient_checkpointing=true" not in one.stdout
    refused = plan("--config", str(REPO / "launch" / "configs" / "llama2_7b_nf4.yaml"), "model.quantization=int8",
                   "--deepspeed", str(REPO / "ds_configs" / "zero3.json"))
    assert refused.returncode == 1 and "ZeRO-3" in refused.stderr
    assert not out.exists()
