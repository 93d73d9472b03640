"""Tests for pipeline.adapters.inject: LoRA via peft, MSLR by regex, trainable sets (arXiv 2402.12026).

Authors' recipe: LoRA on q/v, MSLR on one head-side layer, head frozen; only LoRA A/B and MSLR L/R
train. Full fine-tuning trains everything.
"""

from __future__ import annotations

import re

import pytest
import torch
from peft import PeftModel
from peft.tuners.lora import LoraLayer
from transformers.pytorch_utils import Conv1D

from pipeline.adapters.inject import (
    adapter_parameters,
    apply_lora,
    inject_mslr,
    set_trainable,
    trainable_parameters,
)
from pipeline.adapters.mslr import MultiScaleLowRankLinear
from pipeline.modeling import (
    default_lora_targets,
    default_mslr_targets,
    head_module_names,
    load_classifier,
    load_tokenizer,
    read_model_info,
)

MSLR_KW = dict(rank=1, scales=(1.0, 2.0, 3.0, 4.0), alpha=4.0, dropout=0.0, init="kaiming", keep_base=True)
TEXTS = ["a gorgeous , witty , seductive movie .", "dull and lifeless"]


def _build(path, *, seed: int = 0):
    info = read_model_info(path)
    tokenizer = load_tokenizer(path, is_decoder=info.is_decoder)
    torch.manual_seed(seed)
    model = load_classifier(
        path, num_labels=2, dtype=torch.float32, is_decoder=info.is_decoder, pad_token_id=tokenizer.pad_token_id
    )
    return info, tokenizer, model


def _muscle(path, *, lora_r: int = 2, train_head: bool = False):
    """Authors' layout: LoRA on q/v, MSLR on the default layer, adapters-only training."""
    info, tokenizer, model = _build(path)
    model = apply_lora(model, target_modules=default_lora_targets(info.model_type), r=lora_r, alpha=8.0, dropout=0.0)
    wrapped = inject_mslr(model, targets=default_mslr_targets(info.model_type), **MSLR_KW)
    names = set_trainable(
        model, full=False, train_head=train_head, head_names=head_module_names(info.model_type, info.is_decoder)
    )
    return info, tokenizer, model, wrapped, names


def test_llama_lora_and_mslr_only_adapters_train(tiny_llama_dir):
    _, tokenizer, model, wrapped, names = _muscle(tiny_llama_dir)
    assert isinstance(model, PeftModel)
    assert wrapped == ["score.dense"]
    prefix = "base_model.model."
    expected = {
        f"{prefix}model.layers.{layer}.self_attn.{proj}.lora_{ab}.default.weight"
        for layer in range(2)
        for proj in ("q_proj", "v_proj")
        for ab in ("A", "B")
    } | {f"{prefix}score.dense.lora_a", f"{prefix}score.dense.lora_b"}
    assert set(names) == expected
    assert set(trainable_parameters(model)) == expected == set(adapter_parameters(model))
    params = dict(model.named_parameters())
    assert not params[f"{prefix}score.out_proj.weight"].requires_grad
    assert not params[f"{prefix}score.dense.base_layer.weight"].requires_grad
    mslr = model.get_base_model().score.dense
    assert isinstance(mslr, MultiScaleLowRankLinear)
    assert tuple(mslr.lora_a.shape) == (4, 64) and tuple(mslr.lora_b.shape) == (16, 4)
    assert not any(isinstance(module, LoraLayer) for module in model.get_base_model().score.modules())

    # Gradients reach exactly the trainable set.
    model.train()
    batch = tokenizer(TEXTS, padding=True, return_tensors="pt")
    loss = model(**batch, labels=torch.tensor([0, 1])).loss
    loss.backward()
    with_grad = {name for name, parameter in model.named_parameters() if parameter.grad is not None}
    assert with_grad == expected
    assert all(params[name].grad.abs().sum() > 0 for name in expected if "lora_A" not in name)


def test_gpt2_c_attn_lora_matches_conv1d_formula(tiny_gpt2_dir):
    _, tokenizer, model = _build(tiny_gpt2_dir)
    model = apply_lora(model, target_modules=["c_attn"], r=2, alpha=8.0, dropout=0.0)
    layer = model.get_base_model().transformer.h[0].attn.c_attn
    assert isinstance(layer, LoraLayer) and layer.fan_in_fan_out
    base = layer.get_base_layer()
    assert isinstance(base, Conv1D)
    torch.manual_seed(1)
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_()
    x = torch.randn(3, 5, 64)
    # Independent reference: Conv1D is x @ W + b with W d_in x d_out; LoRA adds (alpha/r) x A^T B^T.
    a = layer.lora_A["default"].weight
    b = layer.lora_B["default"].weight
    reference = x @ base.weight + base.bias + (8.0 / 2) * (x @ a.T) @ b.T
    torch.testing.assert_close(layer(x), reference, atol=1e-5, rtol=1e-5)
    names = set_trainable(model, full=False, train_head=False, head_names=["score"])
    assert len(names) == 4 and all(re.search(r"c_attn\.lora_[AB]\.default\.weight$", name) for name in names)


def test_bert_train_head_and_roberta_wrapped_head_keeps_base_frozen(tiny_bert_dir, tiny_roberta_dir):
    _, _, bert, wrapped, names = _muscle(tiny_bert_dir, train_head=True)
    assert wrapped == ["bert.pooler.dense"]
    assert {n for n in names if "classifier" in n} == {
        "base_model.model.classifier.weight",
        "base_model.model.classifier.bias",
    }
    assert "base_model.model.bert.pooler.dense.base_layer.weight" not in names
    assert sum(".query.lora_" in n for n in names) == 4 and sum(".value.lora_" in n for n in names) == 4

    _, _, roberta, wrapped, names = _muscle(tiny_roberta_dir, train_head=True)
    assert wrapped == ["classifier.dense"]
    head = {n.removeprefix("base_model.model.") for n in names if ".classifier." in n}
    assert head == {"classifier.dense.lora_a", "classifier.dense.lora_b", "classifier.out_proj.weight", "classifier.out_proj.bias"}
    _, _, _, _, frozen_head = _muscle(tiny_roberta_dir, train_head=False)
    head = {n.removeprefix("base_model.model.") for n in frozen_head if ".classifier." in n}
    assert head == {"classifier.dense.lora_a", "classifier.dense.lora_b"}


def test_set_trainable_full_trains_everything(tiny_bert_dir):
    _, _, model = _build(tiny_bert_dir)
    inject_mslr(model, targets=[r"bert\.pooler\.dense"], **MSLR_KW)
    names = set_trainable(model, full=True, train_head=False, head_names=["classifier"])
    everything = [name for name, _ in model.named_parameters()]
    assert names == everything
    assert "bert.pooler.dense.lora_a" in names and "bert.pooler.dense.base_layer.weight" in names
    names = set_trainable(model, full=False, train_head=False, head_names=["classifier"])
    assert names == ["bert.pooler.dense.lora_a", "bert.pooler.dense.lora_b"]


def test_trained_head_under_soft_prompts_is_the_copy_peft_runs_not_its_unused_original(tiny_bert_dir):
    from pipeline.adapters.inject import apply_prompt_tuning

    _, tokenizer, model = _build(tiny_bert_dir)
    model = apply_prompt_tuning(model, num_virtual_tokens=3)
    names = set_trainable(model, full=False, train_head=True, head_names=["classifier"])
    assert sorted(names) == [
        "base_model.classifier.modules_to_save.default.bias", "base_model.classifier.modules_to_save.default.weight",
        "prompt_encoder.default.embedding.weight",
    ]
    batch = tokenizer(TEXTS, return_tensors="pt", padding=True)
    model(**batch, labels=torch.zeros(len(TEXTS), dtype=torch.long)).loss.backward()
    assert all(parameter.grad is not None for name, parameter in model.named_parameters() if name in names)


def test_zero_init_mslr_leaves_logits_unchanged(tiny_roberta_dir):
    _, tokenizer, model = _build(tiny_roberta_dir)
    batch = tokenizer(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        before = model(**batch).logits
        targets = [r"classifier\.dense", r"roberta\.encoder\.layer\.\d+\.attention\.self\.value"]
        wrapped = inject_mslr(model, targets=targets, **{**MSLR_KW, "init": "zero"})
        after = model(**batch).logits
    assert wrapped == ["classifier.dense", "roberta.encoder.layer.0.attention.self.value", "roberta.encoder.layer.1.attention.self.value"]
    torch.testing.assert_close(after, before, atol=1e-6, rtol=1e-6)


def test_inject_mslr_errors(tiny_bert_dir):
    _, _, model = _build(tiny_bert_dir)
    no_match = r"target 'bert\\\.pooler\\\.dens' matches no module name.*include: .*bert\.encoder\.layer\.0\.attention\.self\.query"
    with pytest.raises(ValueError, match=no_match):
        inject_mslr(model, targets=[r"bert\.pooler\.dens"], **MSLR_KW)
    with pytest.raises(ValueError, match=r"matches 'bert\.pooler', a BertPooler, not a linear layer"):
        inject_mslr(model, targets=[r"bert\.pooler"], **MSLR_KW)
    with pytest.raises(ValueError, match=r"'\(' is not a valid regular expression"):
        inject_mslr(model, targets=["("], **MSLR_KW)
    with pytest.raises(ValueError, match="at least one target pattern"):
        inject_mslr(model, targets=[], **MSLR_KW)
    model = apply_lora(model, target_modules=["query", "value"], r=2, alpha=8.0, dropout=0.0)
    with pytest.raises(ValueError, match=r"matches 'bert\.encoder\.layer\.0\.attention\.self\.query', which is already a LoRA layer"):
        inject_mslr(model, targets=[r".*\.query"], **MSLR_KW)
    with pytest.raises(ValueError, match=r"lies inside the adapter layer 'bert\.encoder\.layer\.0\.attention\.self\.value'"):
        inject_mslr(model, targets=[r".*\.value\.base_layer"], **MSLR_KW)
    inject_mslr(model, targets=[r"bert\.pooler\.dense"], **MSLR_KW)
    with pytest.raises(ValueError, match=r"'bert\.pooler\.dense', which is already an MSLR layer"):
        inject_mslr(model, targets=[r"bert\.pooler\.dense"], **MSLR_KW)
    # Nothing was replaced by the failed calls: one MSLR layer, four LoRA layers.
    modules = list(model.modules())
    assert sum(isinstance(m, MultiScaleLowRankLinear) for m in modules) == 1
    assert sum(isinstance(m, LoraLayer) for m in modules) == 4


def test_apply_lora_and_set_trainable_errors(tiny_llama_dir):
    _, _, model = _build(tiny_llama_dir)
    with pytest.raises(ValueError, match=r"LoRA target modules \['query'\] match no module.*q_proj"):
        apply_lora(model, target_modules=["q_proj", "query"], r=2, alpha=8.0, dropout=0.0)
    with pytest.raises(ValueError, match="LoRA rank r must be >= 1, got 0"):
        apply_lora(model, target_modules=["q_proj"], r=0, alpha=8.0, dropout=0.0)
    with pytest.raises(ValueError, match=r"found no LoRA, MSLR or bottleneck-adapter parameters.*full=True"):
        set_trainable(model, full=False, train_head=False, head_names=["score"])
    with pytest.raises(ValueError, match=r"head module 'classifier' does not exist in LlamaForSequenceClassification.*'score'"):
        set_trainable(model, full=True, train_head=False, head_names=["classifier"])
