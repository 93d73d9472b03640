"""Re-evaluation of finished runs (pipeline/inference.py, launch/evaluate.py).

Two tiny runs on the real SST-2 poison_data files (tiny random BERT, a few optimiser steps, capped
evaluation splits), one MuScleLoRA (adapter + frozen head saved) and one vanilla (every parameter
saved), are trained once for the module; re-evaluation must reproduce their metrics.json exactly.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from pipeline import data as data_lib
from pipeline import evaluate as ev
from pipeline.config import load_config
from pipeline.inference import EvaluationError, RunDirError, evaluate_run, load_run
from pipeline.training import run_training
from pipeline.testing import load_script

REPO = Path(__file__).resolve().parents[1]
MAX_EVAL = 40


def _train(out: Path, model_dir: Path, data_root: Path, method: str) -> Path:
    cfg = load_config(None, [
        f"output_dir={out}",
        f"method={method}",
        f"model.name_or_path={model_dir}",
        f"data.root={data_root}",
        "data.dataset=sst-2",
        "data.attack=badnets",
        "data.max_length=32",
        "data.ref_size=8",
        "data.max_train_samples=32",
        f"data.max_eval_samples={MAX_EVAL}",
        "train.epochs=1",
        "train.max_steps=3",
        "train.batch_size=8",
        "train.eval_batch_size=16",  # several batches with different padding per split
        "train.lr=1e-3",
        "train.device=cpu",
        "mslr.scales=[1,2,4]",  # tiny hidden sizes have no per-family default
    ])
    run_training(cfg)
    return out


@pytest.fixture(scope="module")
def musclelora_run(tmp_path_factory, tiny_bert_dir, sst2_root) -> Path:
    return _train(tmp_path_factory.mktemp("reeval") / "musclelora", tiny_bert_dir, sst2_root, "musclelora")


@pytest.fixture(scope="module")
def vanilla_run(tmp_path_factory, tiny_bert_dir, sst2_root) -> Path:
    return _train(tmp_path_factory.mktemp("reeval") / "vanilla", tiny_bert_dir, sst2_root, "vanilla")


def _load_cli():
    """launch/evaluate.py as a module (launch/ is not a package)."""
    return load_script("launch/evaluate.py")


def _metrics(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


@pytest.mark.parametrize("run_fixture", ["musclelora_run", "vanilla_run"])
def test_default_evaluation_reproduces_metrics_json_exactly(run_fixture, request):
    run_dir = request.getfixturevalue(run_fixture)
    saved = _metrics(run_dir)
    result = evaluate_run(run_dir, splits=("test", "dev"), device="cpu")
    test = result["splits"]["test"]
    assert test["cacc"] == saved["cacc"]
    assert test["asr"] == saved["asr"]
    assert test["clean_fpr"] == saved["clean_fpr"]
    assert test["confusion_matrix"] == saved["confusion_matrix"]
    assert test["per_class_accuracy"] == saved["per_class_accuracy"]
    assert (test["num_clean"], test["num_poison"]) == (saved["num_test_clean"], saved["num_test_poison"]) == (MAX_EVAL, MAX_EVAL)
    assert test["files"] == {"clean": saved["data_files"]["test_clean"], "poison": saved["data_files"]["test_poison"]}
    assert test["same_rows_as_run"] is True
    # The dev pair is the selection split training measured; the saved weights are the best epoch's.
    assert result["splits"]["dev"]["cacc"] == saved["dev_clean_acc"]
    assert result["splits"]["dev"]["files"]["clean"] == saved["data_files"]["dev_clean"]
    assert result["run_metrics"]["cacc"] == saved["cacc"] and result["method"] == saved["method"]
    assert json.loads(json.dumps(result, allow_nan=False)) == result


def test_vanilla_adapter_holds_the_whole_model(vanilla_run, musclelora_run):
    full = json.loads((vanilla_run / "adapter" / "adapter_config.json").read_text())
    partial = json.loads((musclelora_run / "adapter" / "adapter_config.json").read_text())
    assert full["all_parameters"] is True and partial["all_parameters"] is False


def test_load_run_rebuilds_the_trained_model_without_touching_the_rng(musclelora_run):
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    cfg, tokenizer, model = load_run(musclelora_run, "cpu")
    assert torch.equal(torch.rand(3), expected)
    assert cfg.method == "musclelora" and cfg.data.max_length == 32 and not model.training
    _, _, again = load_run(musclelora_run, torch.device("cpu"))
    batch = tokenizer(["cf a dull and lifeless bore", "a charming film"], return_tensors="pt", padding=True)
    batch.pop("token_type_ids", None)
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, again(**batch).logits)


def test_another_attack_matches_predictions_on_its_files(musclelora_run, sst2_root):
    result = evaluate_run(musclelora_run, attack="addsent", max_eval_samples=24, batch_size=8, device="cpu")
    assert (result["attack"], result["max_eval_samples"], result["batch_size"]) == ("addsent", 24, 8)
    split = result["splits"]["test"]
    addsent = sst2_root / "sst-2" / "1" / "addsent"
    assert split["files"] == {"clean": str(addsent / "test-clean.csv"), "poison": str(addsent / "test-poison.csv")}
    assert split["same_rows_as_run"] is False

    cfg, tokenizer, model = load_run(musclelora_run, "cpu")
    paths = data_lib.split_paths(sst2_root, "sst-2", "addsent", target_label=1)
    rows = data_lib.load_evaluation_data(paths, max_eval_samples=24, seed=cfg.seed)
    collate = data_lib.make_collator(tokenizer)

    def predict(ds):
        loader = DataLoader(data_lib.encode(ds, tokenizer, max_length=32), batch_size=8, collate_fn=collate)
        return ev.predict(model, loader, device="cpu", progress=False)

    clean_preds, clean_labels = predict(rows.test_clean)
    poison_preds, _ = predict(rows.test_poison)
    assert split["num_clean"] == 24 and split["num_poison"] == 24
    assert split["cacc"] == 100 * (clean_preds == clean_labels).double().mean().item()
    assert split["asr"] == 100 * (poison_preds == 1).double().mean().item()
    assert split["poison_prediction_counts"] == [int((poison_preds == k).sum()) for k in range(2)]
    matrix = [[int(((clean_labels == y) & (clean_preds == p)).sum()) for p in range(2)] for y in range(2)]
    assert split["confusion_matrix"] == matrix
    assert split["per_class_accuracy"] == [100 * row[k] / sum(row) for k, row in enumerate(matrix)]


def test_missing_and_unfinished_run_directories(tmp_path, musclelora_run):
    with pytest.raises(RunDirError, match="does not exist"):
        evaluate_run(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(RunDirError, match="config.yaml is missing"):
        load_run(tmp_path / "empty")

    started = tmp_path / "started"
    started.mkdir()
    shutil.copy(musclelora_run / "config.yaml", started / "config.yaml")
    with pytest.raises(RunDirError, match=r"not a finished run: missing .*adapter\.safetensors.*metrics\.json.*in progress"):
        evaluate_run(started)

    interrupted = tmp_path / "interrupted"
    shutil.copytree(musclelora_run, interrupted)
    (interrupted / "metrics.json").unlink()
    with pytest.raises(RunDirError, match=r"missing .*metrics\.json.*resume=true"):
        load_run(interrupted)

    damaged = tmp_path / "damaged"
    shutil.copytree(musclelora_run, damaged)
    (damaged / "adapter" / "adapter.safetensors").unlink()
    with pytest.raises(RunDirError, match=r"adapter\.safetensors"):
        evaluate_run(damaged)


def test_bad_arguments_are_refused_before_loading(musclelora_run):
    with pytest.raises(EvaluationError, match="splits"):
        evaluate_run(musclelora_run, splits=("train",))
    with pytest.raises(EvaluationError, match="max_eval_samples"):
        evaluate_run(musclelora_run, max_eval_samples=0)
    with pytest.raises(data_lib.DataError, match="attack folder 'badnetz'"):
        evaluate_run(musclelora_run, attack="badnetz")


@pytest.mark.integration
def test_cli_prints_json_writes_out_file_and_exits_2_on_user_errors(musclelora_run, tmp_path, capsys):
    out = tmp_path / "eval.json"
    done = subprocess.run(
        [sys.executable, str(REPO / "launch" / "evaluate.py"), str(musclelora_run), "--device", "cpu", "--out", str(out)],
        capture_output=True, text=True, cwd=tmp_path, timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert "Failed to load CPU gemm_4bit_forward" not in done.stderr  # bitsandbytes' hub warning is replaced
    printed = json.loads(done.stdout)
    assert printed == json.loads(out.read_text())
    saved = _metrics(musclelora_run)
    assert (printed["splits"]["test"]["cacc"], printed["splits"]["test"]["asr"]) == (saved["cacc"], saved["asr"])

    evaluate_cli = _load_cli()
    assert evaluate_cli.main([str(tmp_path / "nowhere")]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "error:" in captured.err and "does not exist" in captured.err
