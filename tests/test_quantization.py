"""Quantized backbones for MuScleLoRA (arXiv 2402.12026): bitsandbytes 4-bit / 8-bit bases under LoRA and MSLR.

Over a quantized linear MSLR computes ``deq(Q(W0)) x + b0 + R diag(s) L x`` through the generic path of
mslr_kernels.mslr; the parity reference is :func:`mslr_kernels.mslr.mslr_reference` with the dequantized weight.
Tests marked ``bnb`` load real bitsandbytes layers (CPU works with bitsandbytes >= 0.45); the pre-flight
and configuration tests run without bitsandbytes (its status is stubbed where a combination is tested).
"""

from __future__ import annotations

import logging
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from mslr_kernels.mslr import mslr_reference
from pipeline import modeling
from pipeline.adapters import MultiScaleLowRankLinear, base_layers, inject
from pipeline.config import ConfigError, load_config
from pipeline.modeling import (
    ModelInfo,
    default_lora_targets,
    head_module_names,
    load_classifier,
    load_tokenizer,
    preflight_quantization,
    quantizable_linear_names,
    read_model_info,
)

REPO = Path(__file__).resolve().parents[1]
# One backbone linear per family that MSLR wraps besides the head's score.dense (a quantized base).
INNER_TARGET = {"llama": r"model\.layers\.0\.mlp\.down_proj", "gpt2": r"transformer\.h\.0\.mlp\.c_proj"}
LLAMA_INFO = ModelInfo(model_type="llama", is_decoder=True, hidden_size=64, num_layers=2)


@pytest.fixture(scope="module")
def bnb():
    """bitsandbytes, or a clean skip when it cannot be imported here."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pytest.importorskip("bitsandbytes")


@pytest.fixture
def bnb_works(monkeypatch: pytest.MonkeyPatch) -> list[dict]:
    """Stub the bitsandbytes import-and-run check (combination tests must not need bitsandbytes)."""
    calls: list[dict] = []

    def status(**kwargs) -> tuple[bool, str]:
        calls.append(kwargs)
        return True, "bitsandbytes (stub)"

    monkeypatch.setattr(base_layers, "bitsandbytes_status", status)
    return calls


def _preflight(path: Path, **overrides) -> None:
    kwargs = dict(
        quantization="nf4", zero_stage=None, offload_optimizer=False, offload_param=False, quant_storage="auto",
        model_dtype=torch.bfloat16, device_type="cpu", model_info=LLAMA_INFO, model_path=path,
    )
    kwargs.update(overrides)
    preflight_quantization(**kwargs)


def _problems(error: pytest.ExceptionInfo[ConfigError]) -> list[str]:
    return error.value.problems


# ------------------------------------------------------------------------------------------------ config


def test_config_keys_defaults_and_overrides() -> None:
    cfg = load_config(None)
    assert (cfg.model.quantization, cfg.model.double_quant, cfg.model.quant_storage) == ("none", True, "auto")
    assert cfg.model.prepare_kbit is True and cfg.model.gradient_checkpointing is False
    cfg = load_config(None, [
        "model.quantization=nf4", "model.quant_storage=bfloat16", "model.double_quant=false",
        "model.prepare_kbit=false", "model.gradient_checkpointing=true",
    ])
    assert (cfg.model.quantization, cfg.model.quant_storage, cfg.model.double_quant) == ("nf4", "bfloat16", False)
    assert cfg.model.prepare_kbit is False and cfg.model.gradient_checkpointing is True


def test_config_reports_every_bad_quantization_key_at_once() -> None:
    with pytest.raises(ConfigError) as error:
        load_config(None, ["model.quantization=int4", "model.quant_storage=int8", "model.double_quant=1"])
    text = "\n".join(_problems(error))
    assert len(_problems(error)) == 3
    assert re.search(r"model\.quantization .*got 'int4'.*'none', 'nf4', 'fp4', 'int8'", text)
    assert re.search(r"model\.quant_storage .*got 'int8'.*'auto', 'uint8'", text)
    assert re.search(r"model\.double_quant .*got 1.*true or false", text)


# ------------------------------------------------------------------------------------------ pre-flight


def test_quantizable_linear_names_from_the_config_alone(tiny_llama_dir: Path, tiny_gpt2_dir: Path) -> None:
    llama = quantizable_linear_names(tiny_llama_dir)
    assert len(llama) == 14 and "model.layers.0.self_attn.q_proj" in llama and "model.layers.1.mlp.down_proj" in llama
    gpt2 = quantizable_linear_names(tiny_gpt2_dir)
    gpt2_layers = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
    assert gpt2 == [f"transformer.h.{i}.{name}" for i in (0, 1) for name in gpt2_layers]
    assert not any(name.startswith(("score", "classifier")) for name in llama + gpt2)


def test_preflight_none_checks_nothing(tiny_llama_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(**_):
        raise AssertionError("bitsandbytes must not be consulted for quantization=none")

    monkeypatch.setattr(base_layers, "bitsandbytes_status", fail)
    _preflight(tiny_llama_dir, quantization="none", zero_stage=3, offload_param=True, quant_storage="uint8")


def test_preflight_accepts_supported_combinations(tiny_llama_dir: Path, bnb_works: list[dict]) -> None:
    _preflight(tiny_llama_dir)
    _preflight(tiny_llama_dir, zero_stage=3)  # storage auto = bfloat16 = model dtype
    _preflight(tiny_llama_dir, zero_stage=2, quant_storage="uint8", offload_optimizer=True)
    _preflight(tiny_llama_dir, zero_stage=1, quant_storage="bfloat16", model_dtype=torch.float32)
    _preflight(tiny_llama_dir, quantization="int8", zero_stage=2)
    assert bnb_works[0] == {
        "quantization": "nf4", "device_type": "cpu", "compute_dtype": torch.bfloat16, "quant_storage": torch.bfloat16
    }
    assert bnb_works[-1]["quantization"] == "int8"


def test_preflight_int8_with_zero3(tiny_llama_dir: Path, bnb_works: list[dict]) -> None:
    with pytest.raises(ConfigError) as error:
        _preflight(tiny_llama_dir, quantization="int8", zero_stage=3)
    (problem,) = _problems(error)
    assert "model.quantization: got 'int8' with DeepSpeed ZeRO stage 3" in problem
    assert "Fix: use model.quantization=nf4" in problem and "ZeRO stage <= 2" in problem


@pytest.mark.parametrize("storage", ["uint8", "float32"])
def test_preflight_4bit_zero3_needs_storage_in_the_model_dtype(
    tiny_llama_dir: Path, bnb_works: list[dict], storage: str
) -> None:
    with pytest.raises(ConfigError) as error:
        _preflight(tiny_llama_dir, zero_stage=3, quant_storage=storage)
    (problem,) = _problems(error)
    assert f"model.quant_storage: got {storage!r} ({storage}) with model.dtype bfloat16" in problem
    assert "Fix: set model.quant_storage=auto" in problem


def test_preflight_floating_storage_cast_by_a_16bit_deepspeed_run(tiny_llama_dir: Path, bnb_works: list[dict]) -> None:
    with pytest.raises(ConfigError) as error:
        _preflight(tiny_llama_dir, zero_stage=2, quant_storage="float32")
    (problem,) = _problems(error)
    assert "got 'float32' (float32) with a bfloat16 DeepSpeed run" in problem
    assert "destroy the weights. Fix: set model.quant_storage=auto (or uint8)" in problem


def test_preflight_param_offload_and_full_finetuning(tiny_llama_dir: Path, bnb_works: list[dict]) -> None:
    with pytest.raises(ConfigError) as error:
        _preflight(tiny_llama_dir, zero_stage=3, offload_param=True, offload_optimizer=True)
    (problem,) = _problems(error)
    assert "zero_optimization.offload_param: set with model.quantization='nf4'" in problem
    assert "Fix: remove offload_param" in problem
    with pytest.raises(ConfigError) as error:
        _preflight(tiny_llama_dir, quantization="fp4", trains_base=True)
    (problem,) = _problems(error)
    assert "got 'fp4' for a method that trains the backbone weights" in problem
    assert "Fix: use an adapter method" in problem


def test_preflight_reports_all_problems_together(tiny_llama_dir: Path, bnb_works: list[dict]) -> None:
    with pytest.raises(ConfigError) as error:
        _preflight(tiny_llama_dir, quantization="int8", zero_stage=3, offload_param=True, trains_base=True)
    assert len(_problems(error)) == 3
    assert str(error.value).startswith("invalid run configuration (3 problems):")


def test_preflight_bad_values(tiny_llama_dir: Path, bnb_works: list[dict]) -> None:
    with pytest.raises(ConfigError, match=r"model\.quantization: got 'int4'; .*Fix: use one of 'none', 'nf4'"):
        _preflight(tiny_llama_dir, quantization="int4")
    with pytest.raises(ConfigError) as error:
        _preflight(tiny_llama_dir, quant_storage="int8", zero_stage=5)
    text = "\n".join(_problems(error))
    assert "model.quant_storage: got 'int8'" in text and "zero_optimization.stage: got 5; must be 0, 1, 2 or 3" in text


def test_preflight_bitsandbytes_missing(tiny_llama_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # makes `import bitsandbytes` fail
    with pytest.raises(ConfigError) as error:
        _preflight(tiny_llama_dir, quantization="nf4")
    (problem,) = _problems(error)
    assert "model.quantization: got 'nf4' but bitsandbytes cannot be imported (ModuleNotFoundError" in problem
    assert "Fix: install a bitsandbytes build for this device (pip install -e '.[quant]'" in problem
    assert "or set model.quantization=none" in problem


def test_preflight_bitsandbytes_cannot_run_message(tiny_llama_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    reason = "bitsandbytes 9.9 cannot run nf4 with compute dtype bfloat16 on device 'xpu' (RuntimeError: no kernel)"
    monkeypatch.setattr(base_layers, "bitsandbytes_status", lambda **_: (False, reason))
    with pytest.raises(ConfigError) as error:
        _preflight(tiny_llama_dir, device_type="xpu")
    (problem,) = _problems(error)
    assert f"model.quantization: got 'nf4' but {reason}. Fix:" in problem and "train.device" in problem


def test_preflight_model_without_linear_layers(
    tiny_llama_dir: Path, bnb_works: list[dict], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(modeling, "quantizable_linear_names", lambda path, **_: [])
    with pytest.raises(ConfigError) as error:
        _preflight(tiny_llama_dir)
    (problem,) = _problems(error)
    assert "model.quantization: got 'nf4' but 'llama' at" in problem
    assert "has no nn.Linear or Conv1D layers outside its classification head" in problem
    assert problem.endswith("Fix: set model.quantization=none")


def test_only_base_layers_imports_bitsandbytes_and_lazily() -> None:
    importers = sorted(
        str(path.relative_to(REPO))
        for folder in ("pipeline", "kernels", "launch")
        for path in (REPO / folder).rglob("*.py")
        if re.search(r"^\s*(import bitsandbytes|from bitsandbytes)", path.read_text(), re.MULTILINE)
    )
    assert importers == ["pipeline/adapters/base_layers.py"]
    code = (
        "import sys, torch\n"
        "from pipeline import modeling\n"
        "from pipeline.adapters import base_layers, MultiScaleLowRankLinear\n"
        "cfg = base_layers.bitsandbytes_config(quantization='nf4', compute_dtype=torch.bfloat16,\n"
        "    quant_storage=torch.bfloat16, double_quant=True, skip_modules=['score'])\n"
        "assert cfg.load_in_4bit and cfg.bnb_4bit_quant_storage == torch.bfloat16\n"
        "assert not base_layers.is_quantized_linear(torch.nn.Linear(2, 2))\n"
        "MultiScaleLowRankLinear(torch.nn.Linear(4, 4)).merge()\n"
        "assert 'bitsandbytes' not in sys.modules, 'bitsandbytes was imported'\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]


# --------------------------------------------------------------------------------- bitsandbytes: models


def _musclelora(path: Path, family: str, *, quantization: str, gradient_checkpointing: bool = False):
    """LoRA on q/v (c_attn) + MSLR on score.dense and on one quantized backbone linear; adapters train."""
    info = read_model_info(path)
    tokenizer = load_tokenizer(path, is_decoder=True)
    torch.manual_seed(0)
    model = load_classifier(
        path, num_labels=2, dtype=torch.float32, is_decoder=True, pad_token_id=tokenizer.pad_token_id,
        llm_head_dropout=0.0, quantization=quantization, gradient_checkpointing=gradient_checkpointing,
    )
    model = inject.apply_lora(model, target_modules=default_lora_targets(info.model_type), r=2, alpha=8.0, dropout=0.0)
    wrapped = inject.inject_mslr(
        model, targets=[r"score\.dense", INNER_TARGET[family]], rank=1, scales=[1.0, 2.0, 3.0, 4.0], alpha=4.0,
        dropout=0.0, init="kaiming", keep_base=True,
    )
    trainable = inject.set_trainable(model, full=False, train_head=False, head_names=head_module_names(family, True))
    return tokenizer, model, wrapped, trainable


def _bytes(tensor: torch.Tensor) -> torch.Tensor:
    """Raw bytes (packed 4-bit codes in a float storage can be NaN patterns, so compare bits, not values)."""
    return tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).clone()


def _batch(tokenizer, rows: int = 16, length: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    low = max(tokenizer.all_special_ids) + 1
    ids = torch.randint(low, len(tokenizer), (rows, length), generator=generator)
    labels = torch.randint(0, 2, (rows,), generator=generator)
    return ids, labels


@pytest.mark.bnb
@pytest.mark.parametrize(("family", "checkpointing"), [("llama", True), ("gpt2", False)])
def test_4bit_musclelora_trains_only_the_adapters(
    bnb, family: str, checkpointing: bool, tiny_llama_dir: Path, tiny_gpt2_dir: Path
) -> None:
    path = {"llama": tiny_llama_dir, "gpt2": tiny_gpt2_dir}[family]
    tokenizer, model, wrapped, trainable = _musclelora(
        path, family, quantization="nf4", gradient_checkpointing=checkpointing
    )
    inner = model.get_base_model()
    quantized = [name for name, module in inner.named_modules() if base_layers.is_quantized_linear(module)]
    assert len(quantized) == len(quantizable_linear_names(path))
    assert not base_layers.is_quantized_linear(inner.score.dense.base_layer)  # the head stays floating point
    inner_mslr = inner.get_submodule(wrapped[1].replace("\\", ""))
    assert isinstance(inner_mslr, MultiScaleLowRankLinear)
    assert base_layers.quantized_bits(inner_mslr.base_layer) == 4 and inner_mslr._fused_base() is None
    assert inner_mslr.lora_a.dtype == torch.float32
    assert any(getattr(m, "gradient_checkpointing", False) for m in inner.modules()) is checkpointing
    assert sorted(trainable) == sorted(inject.adapter_parameters(model))

    before = {name: _bytes(t) for name, t in model.state_dict().items()}
    ids, labels = _batch(tokenizer)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    model.train()
    losses = []
    for _ in range(20):
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
        loss = nn.functional.cross_entropy(logits.float(), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(map(torch.isfinite, map(torch.tensor, losses)))
    assert sum(losses[-3:]) / 3 < 0.5 * losses[0], losses
    after = model.state_dict()
    changed = sorted(name for name in before if not torch.equal(before[name], _bytes(after[name])))
    assert changed == sorted(trainable)  # quantized weights, their quant states and the head: untouched


@pytest.fixture(scope="module")
def quantized_llamas(bnb, tiny_llama_dir: Path) -> dict[str, nn.Module]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return {
            mode: load_classifier(
                tiny_llama_dir, num_labels=2, dtype=torch.float32, is_decoder=True, quantization=mode
            )
            for mode in ("nf4", "fp4", "int8")
        }


@pytest.mark.bnb
@pytest.mark.parametrize("mode", ["nf4", "fp4", "int8"])
def test_mslr_over_a_quantized_linear_equals_mslr_over_its_dequantized_weight(
    quantized_llamas: dict[str, nn.Module], mode: str
) -> None:
    base = quantized_llamas[mode].model.layers[1].mlp.down_proj  # 128 -> 64
    assert base_layers.quantized_bits(base) == (8 if mode == "int8" else 4)
    layer = MultiScaleLowRankLinear(base, rank=2, scales=(1.0, 2.0, 4.0), alpha=4.0)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        layer.lora_a.copy_(torch.randn(layer.lora_a.shape, generator=generator) / 4)
        layer.lora_b.copy_(torch.randn(layer.lora_b.shape, generator=generator) / 4)
    x = torch.randn(3, 5, 128, generator=generator, requires_grad=True)
    g = torch.randn(3, 5, 64, generator=generator)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # LLM.int8 announces its float16 cast on every call
        out = layer(x)
        grads = torch.autograd.grad(out, (x, layer.lora_a, layer.lora_b), g)

    weight = base_layers.dequantize_weight(base)
    assert weight.shape == (64, 128) and weight.dtype == torch.float32
    x_ref = x.detach().clone().requires_grad_(True)
    a_ref = layer.lora_a.detach().clone().requires_grad_(True)
    b_ref = layer.lora_b.detach().clone().requires_grad_(True)
    ref = mslr_reference(x_ref, weight, None, a_ref, b_ref, layer.scale_vector())
    ref_grads = torch.autograd.grad(ref, (x_ref, a_ref, b_ref), g)
    # float32 sums in another order (the generic path vs the reference; the split depends on the thread
    # count): a few ulps of gradients of order 1.
    exact = {"rtol": 1e-5, "atol": 1e-4}
    # 4-bit computes with exactly `weight`. LLM.int8 also quantizes the activations row-wise to 8 bits
    # (after a float16 cast), so its base product and input gradient carry about 1/127 of a row's range.
    base_tol = exact if mode != "int8" else {"rtol": 0.0, "atol": 1e-2 * ref.abs().max().item()}
    torch.testing.assert_close(out, ref, **base_tol)
    torch.testing.assert_close(grads[0], ref_grads[0], **base_tol)
    torch.testing.assert_close(grads[1], ref_grads[1], **exact)  # L and R gradients never involve W0
    torch.testing.assert_close(grads[2], ref_grads[2], **exact)


@pytest.mark.bnb
def test_merge_over_a_quantized_base_refuses_or_dequantizes_with_a_warning(bnb, tiny_llama_dir: Path) -> None:
    model = load_classifier(tiny_llama_dir, num_labels=2, dtype=torch.float32, is_decoder=True, quantization="nf4")
    base = model.model.layers[0].self_attn.o_proj
    packed = _bytes(base.weight)
    layer = MultiScaleLowRankLinear(base, rank=1, scales=(1.0, 2.0), alpha=2.0)
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(0))
    unmerged = layer(x).detach()
    with pytest.raises(TypeError, match=r"base is a quantized bitsandbytes Linear4bit \(nf4, storage torch\.float32\)"):
        layer.merge()
    with pytest.raises(TypeError, match=r"Fix: save the adapter unmerged .* merge\(dequantize=True\)"):
        layer.merge()
    assert not layer.merged and layer.base_layer is base and torch.equal(_bytes(base.weight), packed)
    with pytest.warns(UserWarning, match=r"replaced the quantized base Linear4bit \(nf4.*full precision"):
        layer.merge(dequantize=True)
    assert layer.merged and type(layer.base_layer) is nn.Linear and not layer.base_layer.weight.requires_grad
    torch.testing.assert_close(layer(x), unmerged, rtol=1e-5, atol=1e-5)
    layer.unmerge()
    torch.testing.assert_close(layer.base_layer.weight, base_layers.dequantize_weight(base), rtol=0, atol=1e-6)


@pytest.mark.bnb
def test_int8_base_loads_forwards_and_trains_lora(bnb, tiny_llama_dir: Path) -> None:
    tokenizer, model, _, trainable = _musclelora(tiny_llama_dir, "llama", quantization="int8")
    inner = model.get_base_model()
    assert {base_layers.quantized_bits(m) for m in inner.modules() if base_layers.is_quantized_linear(m)} == {8}
    ids, labels = _batch(tokenizer, rows=8)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    model.train()
    losses = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(5):
            loss = nn.functional.cross_entropy(model(input_ids=ids).logits.float(), labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
    assert all(map(torch.isfinite, map(torch.tensor, losses))) and losses[-1] < losses[0]


@pytest.mark.bnb
def test_bf16_4bit_load_prepare_kbit_keeps_the_head_usable(bnb, tiny_llama_dir: Path) -> None:
    kwargs = dict(num_labels=2, dtype=torch.bfloat16, is_decoder=True, quantization="nf4")
    prepared = load_classifier(tiny_llama_dir, **kwargs)
    q_proj = prepared.model.layers[0].self_attn.q_proj
    assert q_proj.weight.dtype == torch.bfloat16 and q_proj.compute_dtype == torch.bfloat16  # storage auto
    assert prepared.score.dense.weight.dtype == torch.float32  # peft casts the non-quantized 16-bit weights
    assert not any(p.requires_grad for p in prepared.parameters())
    plain = load_classifier(tiny_llama_dir, prepare_kbit=False, quant_storage="uint8", **kwargs)
    assert plain.score.dense.weight.dtype == torch.bfloat16
    assert plain.model.layers[0].self_attn.q_proj.weight.dtype == torch.uint8
    ids = torch.randint(3, 400, (2, 6), generator=torch.Generator().manual_seed(0))
    for model in (prepared, plain):
        logits = model(input_ids=ids).logits
        assert logits.shape == (2, 2) and bool(torch.isfinite(logits).all())


@pytest.mark.bnb
def test_preflight_with_real_bitsandbytes(bnb, tiny_llama_dir: Path) -> None:
    for mode in ("nf4", "fp4", "int8"):
        _preflight(tiny_llama_dir, quantization=mode, model_dtype=torch.float32)
    if torch.cuda.is_available():
        return
    with pytest.raises(ConfigError) as error:
        _preflight(tiny_llama_dir, device_type="cuda")
    (problem,) = _problems(error)
    assert re.search(r"got 'nf4' but bitsandbytes [\d.]+ cannot run nf4 with compute dtype bfloat16 on device 'cuda'",
                     problem)
    assert "Fix: install a bitsandbytes build for this device" in problem


@pytest.mark.bnb
@pytest.mark.parametrize("mode", ["nf4", "int8"])
def test_training_after_an_evaluation_pass_keeps_every_gradient(bnb, tiny_llama_dir: Path, mode: str) -> None:
    # bitsandbytes 0.50 on AVX512-BF16 CPUs repacks 4-bit weights on an eval forward into a layout whose
    # kernel has no backward; load_classifier switches that off (base_layers.disable_cpu_inference_repacking).
    def gradients(evaluate_first: bool) -> dict[str, torch.Tensor]:
        tokenizer, model, _, _ = _musclelora(tiny_llama_dir, "llama", quantization=mode)
        ids, labels = _batch(tokenizer, rows=4)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if evaluate_first:
                model.eval()
                with torch.no_grad():
                    model(input_ids=ids)
            model.train()
            nn.functional.cross_entropy(model(input_ids=ids).logits.float(), labels).backward()
        return {name: p.grad for name, p in model.named_parameters() if p.requires_grad}

    fresh, after_eval = gradients(False), gradients(True)
    assert fresh.keys() == after_eval.keys() and all(g is not None for g in after_eval.values())
    for name, grad in fresh.items():
        torch.testing.assert_close(after_eval[name], grad, rtol=0, atol=0, msg=name)


def test_bitsandbytes_kernels_hub_warning_is_replaced_by_an_accurate_notice() -> None:
    """bitsandbytes' warning about the Hugging Face kernels hub is replaced by a notice that says what it means."""
    pytest.importorskip("bitsandbytes")
    code = ("import logging, torch; logging.basicConfig(level=logging.INFO)\n"
            "from pipeline.adapters import base_layers\n"
            "assert not logging.getLogger('bitsandbytes.backends.cpu.ops').filters  # importing has no side effect\n"
            "print(base_layers.bitsandbytes_status(quantization='nf4', device_type='cpu', compute_dtype=torch.float32,"
            " quant_storage=torch.float32))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Failed to load CPU gemm_4bit_forward" not in done.stderr and "(True, 'bitsandbytes" in done.stdout
    other = logging.LogRecord("bitsandbytes.backends.cpu.ops", logging.WARNING, __file__, 1, "something else", None, None)
    assert base_layers._KernelsHubNotice().filter(other)
