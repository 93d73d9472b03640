"""Tests for pipeline.adapters.state: safetensors adapter files, strict loading, peft export."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from pipeline.adapters.inject import apply_lora, inject_mslr, set_trainable, trainable_parameters
from pipeline.adapters.state import CONFIG_NAME, WEIGHTS_NAME, load_adapter, save_adapter
from pipeline.modeling import load_classifier, load_tokenizer

MSLR_KW = dict(scales=(1.0, 2.0, 3.0, 4.0), alpha=4.0, dropout=0.0, init="kaiming", keep_base=True)
TEXTS = ["a gorgeous , witty , seductive movie .", "dull and lifeless", "cf mn bb tq"]
META = {"method": "musclelora", "lora_r": 2, "scales": [1, 2, 3, 4]}


def _llama(path, *, seed: int, lora_r: int = 2, mslr_rank: int = 1):
    """Tiny Llama with the authors' layout; ``seed`` draws the head and adapter initial values."""
    torch.manual_seed(seed)
    model = load_classifier(path, num_labels=2, dtype=torch.float32, is_decoder=True)
    model = apply_lora(model, target_modules=["q_proj", "v_proj"], r=lora_r, alpha=8.0, dropout=0.0)
    inject_mslr(model, targets=[r"score\.dense"], rank=mslr_rank, **MSLR_KW)
    set_trainable(model, full=False, train_head=False, head_names=["score"])
    return model.eval()


def _logits(model, tokenizer):
    with torch.no_grad():
        return model(**tokenizer(TEXTS, padding=True, return_tensors="pt")).logits


@pytest.fixture()
def trained(tiny_llama_dir, tmp_path):
    """A model whose adapter weights are all non-trivial, saved into tmp_path / 'adapter'."""
    tokenizer = load_tokenizer(tiny_llama_dir, is_decoder=True)
    model = _llama(tiny_llama_dir, seed=0)
    with torch.no_grad():
        for parameter in trainable_parameters(model).values():
            parameter.normal_(std=0.2)
    directory = tmp_path / "adapter"
    save_adapter(model, directory, meta=META)
    return tokenizer, model, directory


def test_save_then_load_reproduces_logits(tiny_llama_dir, trained):
    tokenizer, model, directory = trained
    fresh = _llama(tiny_llama_dir, seed=1)
    expected = _logits(model, tokenizer)
    assert not torch.allclose(_logits(fresh, tokenizer), expected, atol=1e-3)
    loaded = load_adapter(fresh, directory)
    head = ["base_model.model.score.dense.base_layer.weight", "base_model.model.score.out_proj.weight"]
    assert sorted(loaded) == sorted([*trainable_parameters(model), *head])
    assert torch.equal(_logits(fresh, tokenizer), expected)


def test_files_are_safetensors_and_json_lists_keys(trained):
    _, model, directory = trained
    trainable = trainable_parameters(model)
    params = dict(model.named_parameters())
    frozen_head = ["base_model.model.score.dense.base_layer.weight", "base_model.model.score.out_proj.weight"]
    expected = {**trainable, **{name: params[name] for name in frozen_head}}
    assert sorted(path.name for path in directory.iterdir()) == sorted([CONFIG_NAME, WEIGHTS_NAME, "peft"])
    with safe_open(directory / WEIGHTS_NAME, framework="pt") as handle:
        assert sorted(handle.keys()) == sorted(expected)
        for name, parameter in expected.items():
            assert torch.equal(handle.get_tensor(name), parameter.detach())
    config = json.loads((directory / CONFIG_NAME).read_text())
    assert config["meta"] == META and config["all_parameters"] is False and config["head_names"] == ["score"]
    listing = config["tensors"]
    assert listing["base_model.model.score.dense.lora_a"] == {"shape": [4, 64], "dtype": "float32", "trainable": True}
    assert listing[frozen_head[1]] == {"shape": [2, 16], "dtype": "float32", "trainable": False}
    assert sorted(listing) == sorted(expected)
    assert sorted(name for name, entry in listing.items() if entry["trainable"]) == sorted(trainable)
    assert config["structure"]["mslr"] == {
        "base_model.model.score.dense": {"rank": 1, "alpha": 4.0, "scales": [1.0, 2.0, 3.0, 4.0], "keep_base": True}
    }
    assert config["structure"]["lora"] == {"default": {"r": 2, "lora_alpha": 8.0, "target_modules": ["q_proj", "v_proj"]}}


def test_peft_export_loads_with_peft(tiny_llama_dir, trained):
    _, model, directory = trained
    exported = load_file(directory / "peft" / "adapter_model.safetensors")
    assert len(exported) == 8 and all(".lora_A." in key or ".lora_B." in key for key in exported)
    torch.manual_seed(5)
    base = load_classifier(tiny_llama_dir, num_labels=2, dtype=torch.float32, is_decoder=True)
    reloaded = PeftModel.from_pretrained(base, directory / "peft")
    ours = {name: p for name, p in model.named_parameters() if ".lora_A." in name or ".lora_B." in name}
    theirs = {name: p for name, p in reloaded.named_parameters() if ".lora_A." in name or ".lora_B." in name}
    assert sorted(ours) == sorted(theirs) and len(ours) == 8
    for name, parameter in ours.items():
        assert torch.equal(parameter, theirs[name]), name


def test_save_overwrites_atomically(trained):
    _, model, directory = trained
    with torch.no_grad():
        next(iter(trainable_parameters(model).values())).add_(1.0)
    save_adapter(model, directory, meta={"step": 2})
    assert sorted(path.name for path in directory.iterdir()) == sorted([CONFIG_NAME, WEIGHTS_NAME, "peft"])
    name, parameter = next(iter(trainable_parameters(model).items()))
    assert torch.equal(load_file(directory / WEIGHTS_NAME)[name], parameter.detach())
    assert json.loads((directory / CONFIG_NAME).read_text())["meta"] == {"step": 2}
    with pytest.raises(TypeError, match="not JSON-serialisable"):
        save_adapter(model, directory, meta={"bad": object()})


def _rewrite(directory, tensors, listed=None):
    save_file(tensors, directory / WEIGHTS_NAME)
    if listed is not None:
        config = json.loads((directory / CONFIG_NAME).read_text())
        config["tensors"] = listed
        (directory / CONFIG_NAME).write_text(json.dumps(config))


def _listing(tensors):
    return {name: {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")} for name, t in tensors.items()}


def test_load_errors(tiny_llama_dir, trained, tmp_path):
    _, _, directory = trained
    fresh = _llama(tiny_llama_dir, seed=1)
    tensors = load_file(directory / WEIGHTS_NAME)
    dropped = "base_model.model.score.dense.lora_b"

    _rewrite(directory, {k: v for k, v in tensors.items() if k != dropped})
    listed_only = rf"adapter\.safetensors'.*listed in adapter_config\.json but missing from adapter\.safetensors: {dropped}"
    with pytest.raises(ValueError, match=listed_only):
        load_adapter(fresh, directory)

    partial = {k: v for k, v in tensors.items() if k != dropped}
    _rewrite(directory, partial, _listing(partial))
    with pytest.raises(ValueError, match=rf"missing keys \(model parameters absent from the file\): {dropped}"):
        load_adapter(fresh, directory)

    extra = {**tensors, "base_model.model.score.extra": torch.zeros(2)}
    _rewrite(directory, extra, _listing(extra))
    with pytest.raises(ValueError, match=r"unexpected keys \(not parameters of the model\): base_model\.model\.score\.extra"):
        load_adapter(fresh, directory)

    _rewrite(directory, tensors, _listing(tensors))
    load_adapter(fresh, directory)
    wider = _llama(tiny_llama_dir, seed=1, lora_r=4)
    mismatch = r"shape mismatches: base_model\.model\.model\.layers\.0\.self_attn\.q_proj\.lora_A\.default\.weight "
    with pytest.raises(ValueError, match=mismatch + r"\(file \[2, 64\], model \[4, 64\]\)"):
        load_adapter(wider, directory)

    (directory / WEIGHTS_NAME).write_bytes(b"\x00garbage, not safetensors")
    with pytest.raises(ValueError, match=rf"adapter weights '.*{WEIGHTS_NAME}' are not a readable safetensors file"):
        load_adapter(fresh, directory)
    (directory / WEIGHTS_NAME).unlink()
    with pytest.raises(FileNotFoundError, match=rf"adapter weights '.*{WEIGHTS_NAME}' do not exist"):
        load_adapter(fresh, directory)
    with pytest.raises(FileNotFoundError, match=rf"adapter config '.*{CONFIG_NAME}' does not exist"):
        load_adapter(fresh, tmp_path / "nowhere")
    (directory / CONFIG_NAME).write_text("{not json")
    with pytest.raises(ValueError, match=rf"adapter config '.*{CONFIG_NAME}' is not valid JSON"):
        load_adapter(fresh, directory)


def test_full_fine_tuning_round_trip_requires_every_parameter(tiny_bert_dir, tmp_path):
    tokenizer = load_tokenizer(tiny_bert_dir, is_decoder=False)
    torch.manual_seed(0)
    model = load_classifier(tiny_bert_dir, num_labels=2, dtype=torch.float32, is_decoder=False).eval()
    names = set_trainable(model, full=True, train_head=True, head_names=["classifier"])
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.01 * torch.randn_like(parameter))
    save_adapter(model, tmp_path / "full", meta={"method": "vanilla"})
    config = json.loads((tmp_path / "full" / CONFIG_NAME).read_text())
    assert config["all_parameters"] is True and sorted(config["tensors"]) == sorted(names)
    assert not (tmp_path / "full" / "peft").exists()

    torch.manual_seed(1)
    fresh = load_classifier(tiny_bert_dir, num_labels=2, dtype=torch.float32, is_decoder=False).eval()
    load_adapter(fresh, tmp_path / "full")
    assert torch.equal(_logits(fresh, tokenizer), _logits(model, tokenizer))

    tensors = load_file(tmp_path / "full" / WEIGHTS_NAME)
    del tensors["bert.embeddings.word_embeddings.weight"]
    _rewrite(tmp_path / "full", tensors, _listing(tensors))
    with pytest.raises(ValueError, match=r"missing keys \(model parameters absent from the file\): bert\.embeddings\.word_embeddings\.weight"):
        load_adapter(fresh, tmp_path / "full")


def test_structure_and_frozen_head_are_checked(tiny_llama_dir, trained):
    _, _, directory = trained
    torch.manual_seed(1)
    model = load_classifier(tiny_llama_dir, num_labels=2, dtype=torch.float32, is_decoder=True)
    model = apply_lora(model, target_modules=["q_proj", "v_proj"], r=2, alpha=16.0, dropout=0.0)
    inject_mslr(model, targets=[r"score\.dense"], rank=1, **{**MSLR_KW, "scales": (1.0, 2.0, 3.0, 5.0)})
    set_trainable(model, full=False, train_head=False, head_names=["score"])
    differs = (
        r"adapter structure differs: lora default: saved \{'r': 2, 'lora_alpha': 8\.0.*"
        r"model \{'r': 2, 'lora_alpha': 16\.0.*"
        r"mslr base_model\.model\.score\.dense: saved .*'scales': \[1\.0, 2\.0, 3\.0, 4\.0\].*"
        r"model .*'scales': \[1\.0, 2\.0, 3\.0, 5\.0\]"
    )
    with pytest.raises(ValueError, match=differs):
        load_adapter(model, directory)

    fresh = _llama(tiny_llama_dir, seed=1)
    tensors = load_file(directory / WEIGHTS_NAME)
    frozen = "base_model.model.score.out_proj.weight"
    partial = {k: v for k, v in tensors.items() if k != frozen}
    _rewrite(directory, partial, _listing(partial))
    with pytest.raises(ValueError, match=rf"missing keys \(model parameters absent from the file\): {frozen}"):
        load_adapter(fresh, directory)


def test_save_refuses_empty_partitioned_tensors(tmp_path, tiny_bert_dir):
    from pipeline.adapters.inject import apply_lora, set_trainable
    from pipeline.adapters.state import save_adapter
    from pipeline.modeling import head_module_names, load_classifier

    model = load_classifier(tiny_bert_dir, num_labels=2, dtype=torch.float32, is_decoder=False)
    model = apply_lora(model, target_modules=["query", "value"], r=2, alpha=4, dropout=0.0)
    set_trainable(model, full=False, train_head=True, head_names=head_module_names("bert", False))
    name, parameter = next((n, p) for n, p in model.named_parameters() if "lora_A" in n)
    parameter.data = torch.empty(0)  # what a ZeRO-3 rank holds for a partitioned parameter
    with pytest.raises(ValueError, match=r"empty tensors.*ZeRO-3.*gathered"):
        save_adapter(model, tmp_path / "adapter", meta={})
    assert not (tmp_path / "adapter").exists()
