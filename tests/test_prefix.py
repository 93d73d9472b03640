"""Prefix tuning building block (pipeline/adapters/prefix.py): attention maths, padding, gradients, errors."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from pipeline.adapters.prefix import apply_prefix_tuning, widen_mask, word_prefix_input


def _model(path):
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)
    return AutoModelForSequenceClassification.from_pretrained(path, num_labels=2).eval()


def test_layer_matches_hand_written_attention_over_prefix_and_input(tiny_bert_dir):
    model = _model(tiny_bert_dir)
    names = apply_prefix_tuning(model, num_tokens=3, init_std=0.5)
    assert len(names) == model.config.num_hidden_layers
    layer = model.get_submodule(names[0])
    torch.manual_seed(1)
    hidden = torch.randn(2, 5, model.config.hidden_size)
    keep = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], dtype=torch.bool)
    mask = keep[:, None, None, :].expand(2, 1, 5, 5)  # boolean, True = attend
    out, _ = layer(hidden, mask)

    heads, d = layer.prefix.key.shape[0], layer.attention_head_size
    split = lambda t: t.view(2, 5, heads, d).transpose(1, 2)  # noqa: E731
    q, k, v = split(layer.query(hidden)), split(layer.key(hidden)), split(layer.value(hidden))
    k = torch.cat([layer.prefix.key.expand(2, -1, -1, -1), k], dim=2)
    v = torch.cat([layer.prefix.value.expand(2, -1, -1, -1), v], dim=2)
    scores = q @ k.transpose(-1, -2) / math.sqrt(d)
    allowed = torch.cat([torch.ones(2, 3, dtype=torch.bool), keep], dim=1)[:, None, None, :]
    scores = scores.masked_fill(~allowed, float("-inf"))
    expected = (scores.softmax(-1) @ v).transpose(1, 2).reshape(2, 5, -1)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["bert", "roberta"])
def test_padding_does_not_change_a_row_and_prefixes_change_the_output(family, request):
    from transformers import AutoTokenizer

    path = request.getfixturevalue(f"tiny_{family}_dir")
    tokenizer = AutoTokenizer.from_pretrained(path)
    plain = _model(path)
    model = _model(path)
    apply_prefix_tuning(model, num_tokens=4, init_std=1.0)
    short, long = "a b", "a b c d e f g"
    with torch.no_grad():
        alone = model(**tokenizer([short], return_tensors="pt")).logits
        batch = model(**tokenizer([short, long], padding=True, return_tensors="pt")).logits
        base = plain(**tokenizer([short], return_tensors="pt")).logits
    torch.testing.assert_close(batch[:1], alone, atol=1e-5, rtol=1e-5)
    assert (alone - base).abs().max() > 1e-3


def test_only_prefixes_get_gradients_when_the_backbone_is_frozen(tiny_bert_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_bert_dir)
    model = _model(tiny_bert_dir)
    apply_prefix_tuning(model, num_tokens=2)
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(".prefix." in name)
    loss = model(**tokenizer(["a b c"], return_tensors="pt"), labels=torch.tensor([1])).loss
    loss.backward()
    grads = {name: p.grad for name, p in model.named_parameters() if p.requires_grad}
    assert len(grads) == 2 * model.config.num_hidden_layers
    assert all(g is not None and g.abs().sum() > 0 for g in grads.values())


def test_widen_mask_forms_and_errors(tiny_bert_dir):
    assert widen_mask(None, 3) is None
    boolean = widen_mask(torch.tensor([[[[True, False]]]]), 2)
    assert boolean.tolist() == [[[[True, True, True, False]]]]
    additive = widen_mask(torch.tensor([[[[0.0, -1e9]]]]), 1)
    assert additive.tolist() == [[[[0.0, 0.0, -1e9]]]]
    with pytest.raises(ValueError, match="no BERT-family encoder self-attention"):
        apply_prefix_tuning(nn.Sequential(nn.Linear(2, 2)), num_tokens=2)
    model = _model(tiny_bert_dir)
    apply_prefix_tuning(model, num_tokens=2)
    with pytest.raises(ValueError, match="already has prefixes"):
        apply_prefix_tuning(model, num_tokens=2)
    with pytest.raises(ValueError, match="num_tokens must be >= 1"):
        apply_prefix_tuning(_model(tiny_bert_dir), num_tokens=0)


@pytest.mark.parametrize("family", ["bert", "roberta"])
def test_word_input_is_seeded_whole_words_between_the_special_tokens(family, request):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(request.getfixturevalue(f"tiny_{family}_dir"))
    ids, positions = word_prefix_input(tokenizer, 3, seed=7)
    again, _ = word_prefix_input(tokenizer, 3, seed=7)
    other, _ = word_prefix_input(tokenizer, 3, seed=8)
    assert torch.equal(ids, again) and not torch.equal(ids, other)
    assert ids.shape == (1, 5) and positions.tolist() == [1, 2, 3]
    row = ids[0].tolist()
    assert row[0] == (tokenizer.cls_token_id if family == "bert" else tokenizer.bos_token_id)
    assert row[-1] == (tokenizer.sep_token_id if family == "bert" else tokenizer.eos_token_id)
    for token in tokenizer.convert_ids_to_tokens(row[1:-1]):
        word = token.lstrip("\u0120")
        assert word.isalpha() and len(word) >= 3, token
    with pytest.raises(ValueError, match="fewer than num_tokens=1000000"):
        word_prefix_input(tokenizer, 1_000_000, seed=0)


def test_word_init_takes_each_layers_keys_and_values_of_the_words(tiny_bert_dir):
    """Independent reference: the unpatched model's hidden states into each layer, through its key/value maps."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_bert_dir)
    ids, positions = word_prefix_input(tokenizer, 4, seed=3)
    plain = _model(tiny_bert_dir)
    with torch.no_grad():
        inputs = plain(input_ids=ids, output_hidden_states=True).hidden_states  # input of layer l = index l
    model = _model(tiny_bert_dir).train()
    names = apply_prefix_tuning(model, num_tokens=4, init_input=(ids, positions))
    assert model.training  # the capture pass in eval mode leaves the mode as it was
    for index, name in enumerate(names):
        attention = plain.get_submodule(name)
        heads, d = model.config.num_attention_heads, attention.attention_head_size
        for part in ("key", "value"):
            expected = getattr(attention, part)(inputs[index][0, positions]).view(4, heads, d).transpose(0, 1)
            torch.testing.assert_close(getattr(model.get_submodule(name).prefix, part).detach(), expected,
                                       atol=1e-5, rtol=1e-5, msg=f"{name}.{part}")
    with pytest.raises(ValueError, match="holds 4 word positions, expected num_tokens=2"):
        apply_prefix_tuning(_model(tiny_bert_dir), num_tokens=2, init_input=(ids, positions))
