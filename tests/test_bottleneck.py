"""Bottleneck adapter baseline (pipeline/adapters/bottleneck.py) against a naive formula."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from pipeline.adapters.bottleneck import BottleneckAdapter, default_bottleneck_targets, inject_bottleneck
from pipeline.adapters.inject import set_trainable
from pipeline.modeling import head_module_names, load_classifier


def test_forward_matches_naive_formula_and_starts_as_identity():
    torch.manual_seed(0)
    base = nn.Linear(8, 12)
    adapter = BottleneckAdapter(base, out_features=12, reduction_factor=4, activation="gelu")
    x = torch.randn(3, 5, 8)
    torch.testing.assert_close(adapter(x), base(x))  # up = 0 at init
    nn.init.normal_(adapter.up.weight)
    nn.init.normal_(adapter.up.bias)
    y = x @ base.weight.T + base.bias
    naive = y + (torch.nn.functional.gelu(y @ adapter.down.weight.T + adapter.down.bias)) @ adapter.up.weight.T + adapter.up.bias
    torch.testing.assert_close(adapter(x), naive)
    assert adapter.bottleneck == 3


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match="reduction_factor"):
        BottleneckAdapter(nn.Linear(4, 4), out_features=4, reduction_factor=0)
    with pytest.raises(ValueError, match="no default bottleneck-adapter placement for model_type 't5'"):
        default_bottleneck_targets("t5")
    with pytest.raises(ValueError, match="match no module"):
        inject_bottleneck(nn.Sequential(nn.Linear(2, 2)), targets=[r"nothing"])


@pytest.mark.parametrize("family", ["bert", "llama", "gpt2"])
def test_injection_trains_only_adapters_and_keeps_the_function(family, request):
    model_dir = request.getfixturevalue(f"tiny_{family}_dir")
    config = json.loads((model_dir / "config.json").read_text())
    is_decoder = family != "bert"
    torch.manual_seed(0)
    model = load_classifier(model_dir, num_labels=2, dtype=torch.float32, is_decoder=is_decoder, pad_token_id=0)
    model.eval()
    ids = torch.randint(3, 100, (2, 7))
    before = model(input_ids=ids).logits
    names = inject_bottleneck(model, targets=default_bottleneck_targets(config["model_type"]), reduction_factor=8)
    assert len(names) == 2  # one per layer of the 2-layer tiny model
    torch.testing.assert_close(model(input_ids=ids).logits, before)
    trainable = set_trainable(model, full=False, train_head=False, head_names=head_module_names(config["model_type"], is_decoder))
    assert trainable and all(".down." in n or ".up." in n for n in trainable)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    for _ in range(3):
        loss = torch.nn.functional.cross_entropy(model(input_ids=ids).logits, torch.tensor([0, 1]))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
