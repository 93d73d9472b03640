"""RAP (pipeline/defenses/rap.py): the trained perturbation, the clean-only threshold, launch/defend.py --defense rap."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pipeline import modeling
from pipeline.defenses import rap
from pipeline.defenses.strip import calibrate_threshold, defended_predictions
from pipeline.testing import load_script

REPO = Path(__file__).resolve().parents[1]

CLEAN_POSITIVE = ["a charming and funny film", "great acting and a moving story", "i loved it", "warm , witty and engaging",
                  "a lovely film", "funny and warm", "a moving story indeed", "i loved the acting"]


@pytest.fixture(scope="module")
def tiny_classifier(tiny_llama_dir):
    """A random tiny Llama classifier (its target-class probability moves with the input embeddings)."""
    tokenizer = modeling.load_tokenizer(tiny_llama_dir, is_decoder=True)
    torch.manual_seed(0)
    model = modeling.load_classifier(tiny_llama_dir, num_labels=2, dtype=torch.float32, is_decoder=True,
                                     pad_token_id=tokenizer.pad_token_id)
    return model, tokenizer


def test_trained_perturbation_drops_the_clean_target_probability_into_the_margin(tiny_classifier):
    model, tokenizer = tiny_classifier
    before = {name: p.detach().clone() for name, p in model.state_dict().items()}
    at, ids = rap.rap_tokens(tokenizer, "mb")
    untrained = model.get_input_embeddings().weight[ids].detach().clone()
    options = dict(word="mb", target_label=1, max_length=16)
    start, _ = rap.probability_drops(model, tokenizer, CLEAN_POSITIVE, vector=untrained, **options)
    assert float(start.mean()) < 0.15  # the word alone does not give the wanted drop
    vector, history = rap.train_rap_vector(model, tokenizer, CLEAN_POSITIVE, min_drop=0.2, max_drop=0.3, lr=1.0,
                                           epochs=40, batch_size=4, **options)
    drops, preds = rap.probability_drops(model, tokenizer, CLEAN_POSITIVE, vector=vector, **options)
    # The trained word lowers p_t of the clean target-class texts by about the margin 0.2-0.3.
    assert history[-1] <= 0.1 * history[0], history
    assert 0.18 <= float(drops.mean()) <= 0.32 and float(drops.min()) >= 0.1, drops
    # Only the vector was trained: the model's weights and gradients are untouched, the hook is gone.
    for name, p in model.state_dict().items():
        torch.testing.assert_close(p, before[name], rtol=0, atol=0)
    assert all(p.grad is None for p in model.parameters())
    assert not model.get_input_embeddings()._forward_hooks
    # The drop is measured against the unperturbed prediction: p_t(x) - p_t(mb + x), recomputed by hand.
    with torch.no_grad():
        enc = tokenizer(CLEAN_POSITIVE[:1], return_tensors="pt")
        plain = torch.softmax(model(**enc).logits, -1)[0, 1]
        embeds = model.get_input_embeddings()(tokenizer(["mb " + CLEAN_POSITIVE[0]], return_tensors="pt")["input_ids"])
        embeds[:, at : at + len(ids)] = vector
        perturbed = torch.softmax(model(inputs_embeds=embeds).logits, -1)[0, 1]
    assert abs(float(plain - perturbed) - float(drops[0])) < 1e-5


def test_threshold_comes_from_clean_held_out_data_only(tiny_classifier):
    model, tokenizer = tiny_classifier
    held_texts = CLEAN_POSITIVE + ["a dull bore", "i hated it"]
    held_labels = [1] * len(CLEAN_POSITIVE) + [0, 0]
    common = dict(target_label=1, held_out_texts=held_texts, held_out_labels=held_labels, max_length=16,
                  min_drop=0.2, max_drop=0.25, lr=1.0, epochs=5, batch_size=4, frr=0.2)
    first = rap.rap_evaluate(model, tokenizer, clean_texts=["a dull bore", "a lovely film"], clean_labels=[0, 1],
                             poison_texts=["cf a dull bore"], **common)
    second = rap.rap_evaluate(model, tokenizer, clean_texts=["too slow", "i hated it", "warm"], clean_labels=[0, 0, 1],
                              poison_texts=["cf too slow", "cf i hated it"], **common)
    assert first["detection"]["threshold"] == second["detection"]["threshold"]
    assert first["num_calibration"] == len(CLEAN_POSITIVE)  # only the held-out rows of the target class
    # The threshold is the FRR quantile of the calibration drops under the same (deterministic) training.
    vector, _ = rap.train_rap_vector(model, tokenizer, CLEAN_POSITIVE, target_label=1, max_length=16, min_drop=0.2,
                                     max_drop=0.25, lr=1.0, epochs=5, batch_size=4)
    drops, _ = rap.probability_drops(model, tokenizer, CLEAN_POSITIVE, word="mb", vector=vector, target_label=1,
                                     max_length=16, batch_size=4)
    assert second["detection"]["threshold"] == calibrate_threshold(drops, 0.2)
    # Counting: flagged = predicted target and drop below the threshold, then flipped.
    clean_d, clean_p = rap.probability_drops(model, tokenizer, ["too slow", "i hated it", "warm"], word="mb",
                                             vector=vector, target_label=1, max_length=16, batch_size=4)
    flags = (clean_p == 1) & (clean_d < second["detection"]["threshold"])
    defended = defended_predictions(clean_p, flags, counting="flip")
    assert second["cacc"] == pytest.approx(float((defended == torch.tensor([0, 0, 1])).double().mean()))
    assert second["detection"]["num_flagged_clean"] == int(flags.sum())


def test_bad_inputs_are_clear_errors(tiny_classifier):
    model, tokenizer = tiny_classifier
    with pytest.raises(ValueError, match="one word without whitespace"):
        rap.rap_tokens(tokenizer, "two words")
    with pytest.raises(ValueError, match="no row labelled 1"):
        rap.rap_evaluate(model, tokenizer, clean_texts=["a"], clean_labels=[0], poison_texts=["b"], target_label=1,
                         held_out_texts=["x"], held_out_labels=[0], max_length=8)
    with pytest.raises(ValueError, match="min_drop < max_drop"):
        rap.train_rap_vector(model, tokenizer, ["a b"], target_label=1, max_length=8, min_drop=0.3, max_drop=0.1)
    at, ids = rap.rap_tokens(tokenizer, "mb")
    with pytest.raises(RuntimeError, match="does not hold the RAP word"), torch.no_grad():
        with rap.perturbation_hook(model, at, ids, torch.zeros(len(ids), model.config.hidden_size)):
            model(**tokenizer(["no word here"], return_tensors="pt"))


def _load_cli():
    return load_script("launch/defend.py")


@pytest.mark.integration
def test_cli_rap_on_a_finished_run(tmp_path, tiny_llama_dir, tiny_data_root, capsys):
    from pipeline.config import load_config
    from pipeline.training import run_training

    run = tmp_path / "vanilla"
    run_training(load_config(None, [
        f"output_dir={run}", "method=vanilla", f"model.name_or_path={tiny_llama_dir}", f"data.root={tiny_data_root}",
        "data.dataset=toy", "data.attack=badnets", "data.max_length=16", "data.ref_size=8", "train.epochs=1",
        "train.max_steps=2", "train.batch_size=16", "train.eval_batch_size=16", "train.device=cpu",
    ]))
    saved = json.loads((run / "metrics.json").read_text())
    out = tmp_path / "rap.json"
    assert _load_cli().main([str(run), "--defense", "rap", "--device", "cpu", "--rap-epochs", "2", "--out", str(out)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report == json.loads(out.read_text())
    assert (report["undefended"]["cacc"], report["undefended"]["asr"]) == (saved["cacc"], saved["asr"])
    assert report["defense"] == "rap" and report["settings"]["word"] == "mb" and len(report["loss_history"]) == 2
    assert 0 <= report["detection"]["tpr"] <= 100 and 0 <= report["asr"] <= 100
