"""Tests of the peak-memory estimate and measurement (pipeline/memory.py).

Three independent references: hand-computed component arithmetic, autograd's own list of saved
tensors (``torch.autograd.graph.saved_tensors_hooks``) for the activation formulas, and the resident
set size of real training steps, each configuration measured in a fresh subprocess by
``benchmarks/bench_memory.py``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch
import transformers

from pipeline import memory, modeling
from pipeline.adapters import inject
from pipeline.testing import load_script

REPO = Path(__file__).resolve().parents[1]
MIB = 2**20
TOLERANCE = 0.25

BASE: dict[str, Any] = dict(
    num_parameters=10_000_000,
    trainable_parameters=1_000_000,
    hidden_size=256,
    num_layers=4,
    intermediate_size=1024,
    num_heads=4,
    vocab_size=1000,
    seq_len=64,
    micro_batch_size=8,
    dtype_bytes=4,
    quantization="none",
    zero_stage=0,
    world_size=1,
    offload_optimizer=False,
    offload_param=False,
    gradient_checkpointing=False,
    alignment=False,
    full_finetune=False,
    is_decoder=True,
    overhead_bytes=0,
)
# One llama layer's linear weights at hidden 256, intermediate 1024: 4 h^2 + 3 h i.
LAYER_LINEAR = 4 * 256 * 256 + 3 * 256 * 1024


def _estimate(**changes: Any) -> memory.MemoryEstimate:
    return memory.estimate_peak_memory(**{**BASE, **changes})


def _bench() -> ModuleType:
    return load_script("benchmarks/bench_memory.py")


# ----------------------------------------------------------------------------- arithmetic


def test_single_device_static_terms() -> None:
    e = _estimate()
    assert e.base_weights == 9_000_000 * 4
    assert e.trainable_weights == 1_000_000 * 4
    assert e.optimizer_states == 2 * 1_000_000 * 4  # torch AdamW: exp_avg + exp_avg_sq, no master
    assert e.gradients == 1_000_000 * 4
    assert e.gathered_parameters == 0


@pytest.mark.parametrize(
    ("stage", "base", "trainable", "optimizer", "gradients", "gathered"),
    [
        # stage 1 shards the optimizer (12 bytes: fp32 master + 2 states) and adds the fp32 grad partition
        (1, 36_000_000, 4_000_000, 3_000_000, 4_000_000 + 1_000_000, 0),
        # stage 2 also shards the gradients
        (2, 36_000_000, 4_000_000, 3_000_000, 1_000_000 + 1_000_000, 0),
        # stage 3 also shards every parameter and gathers one layer (3/4 of it is not local)
        (3, 9_000_000, 1_000_000, 3_000_000, 1_000_000 + 1_000_000, LAYER_LINEAR * 4 * 3 // 4),
    ],
)
def test_zero_sharding_divides_what_each_stage_shards(stage, base, trainable, optimizer, gradients, gathered) -> None:
    single = _estimate()
    e = _estimate(zero_stage=stage, world_size=4)
    assert (e.base_weights, e.trainable_weights, e.optimizer_states, e.gradients, e.gathered_parameters) == (
        base, trainable, optimizer, gradients, gathered
    )
    assert e.activations == single.activations  # micro-batch per device: activations do not shard


def test_offload_removes_optimizer_states_and_parameters_from_the_device() -> None:
    e = _estimate(zero_stage=2, world_size=4, offload_optimizer=True)
    assert e.optimizer_states == 0
    assert e.gradients == 1_000_000  # the fp32 partition moved to the host with the optimizer
    assert e.optimizer_step == 0
    e3 = _estimate(zero_stage=3, world_size=4, offload_optimizer=True, offload_param=True)
    assert (e3.base_weights, e3.trainable_weights, e3.optimizer_states) == (0, 0, 0)
    assert e3.gathered_parameters == LAYER_LINEAR * 4  # the layer being computed is on the device whole


def test_data_parallel_stage_zero_adds_allreduce_buckets() -> None:
    assert _estimate(world_size=2).gradients == 2 * _estimate().gradients


def test_four_bit_base_is_about_an_eighth_of_float32() -> None:
    everything = dict(trainable_parameters=0, quantized_parameters=10_000_000)
    fp32 = _estimate(trainable_parameters=0).base_weights
    nf4 = _estimate(quantization="nf4", **everything).base_weights
    assert 0.125 < nf4 / fp32 < 0.130  # 0.5 byte + 8-bit absmax per 64 + fp32 per 256 blocks
    single_quant = _estimate(quantization="fp4", double_quant=False, **everything).base_weights
    assert single_quant / fp32 == pytest.approx((0.5 + 4 / 64) / 4)
    int8 = _estimate(quantization="int8", **everything).base_weights
    assert int8 / fp32 == pytest.approx((1 + 4 / 256) / 4)
    # The non-quantized rest (embeddings, norms, head) is float32 after peft's k-bit preparation.
    mixed = _estimate(quantization="nf4", dtype_bytes=2, trainable_parameters=0, quantized_parameters=8_000_000)
    assert mixed.base_weights == int(2_000_000 * 4 + 8_000_000 * (0.5 + 1 / 64 + 4 / (64 * 256)))


def test_checkpointing_keeps_layer_inputs_and_one_layer() -> None:
    plain, ckpt = _estimate(), _estimate(gradient_checkpointing=True)
    t, h = 8 * 64, 256
    per_layer = memory.layer_activation_bytes(
        layer_kind="llama", tokens=t, micro_batch_size=8, seq_len=64, hidden_size=h, intermediate_size=1024,
        num_heads=4, dtype_bytes=4, full_finetune=False, flash_attention=True, attention_mask_bytes=0,
        hidden_mask_bytes=0,
    )
    head_input = t * h * 4  # the decoder head's input, saved by MSLR on score.dense
    assert plain.activations == 4 * per_layer + head_input
    assert ckpt.activations == 4 * t * h * 4 + head_input + per_layer
    assert ckpt.activations < plain.activations
    assert (ckpt.activations_without_checkpointing, plain.activations_with_checkpointing) == (
        plain.activations, ckpt.activations
    )
    assert ckpt.total < plain.total


def test_alignment_adds_the_reference_pass() -> None:
    without = _estimate()
    assert without.reference_pass == 0 and "reference" not in without.phases
    # Adapters: the reference pass stacks its activations on the task gradient kept in .grad.
    lora = _estimate(alignment=True)
    assert lora.peak_phase == "reference"
    assert lora.reference_pass == lora.gradients == 4_000_000
    assert lora.total == without.total + 4_000_000
    # Full fine-tuning, negligible activations: task G, reference G + R + aligned, step G + foreach temporaries.
    full = dict(num_parameters=1_000_000, trainable_parameters=1_000_000, full_finetune=True, hidden_size=8,
                intermediate_size=16, num_heads=1, num_layers=1, seq_len=1, micro_batch_size=1, device="cuda")
    e = _estimate(alignment=True, **full)
    assert e.gradients == 4_000_000 and e.optimizer_step == 4_000_000
    assert e.phases == {"task": 12_000_000 + 4_000_000, "optimizer": 12_000_000 + 8_000_000, "reference": 12_000_000 + 12_000_000}
    assert e.reference_pass == 4_000_000
    assert e.total == 24_000_000


def test_reference_pass_uses_the_reference_batch() -> None:
    """align.ref_batch_size: the reference pass holds the activations of its own rows, the task pass of its own."""
    def activation_peak(rows: int) -> int:
        e = _estimate(micro_batch_size=rows)
        return e.activations + e.logits_loss + e.backward_working_set

    default = _estimate(alignment=True)
    assert _estimate(alignment=True, reference_micro_batch_size=8).phases == default.phases
    for rows in (4, 32):
        e = _estimate(alignment=True, reference_micro_batch_size=rows)
        assert e.phases["task"] == default.phases["task"] and e.activations == default.activations
        assert e.phases["reference"] - default.phases["reference"] == activation_peak(rows) - activation_peak(8)
        assert e.inputs["reference_micro_batch_size"] == rows
    assert _estimate(alignment=True, reference_micro_batch_size=32).total > default.total
    with pytest.raises(ValueError, match="reference_micro_batch_size must be >= 1"):
        _estimate(alignment=True, reference_micro_batch_size=0)


def test_gradient_accumulation_keeps_gradients_alive_through_the_forward() -> None:
    one, two = _estimate(), _estimate(grad_accum_steps=2)
    assert two.phases["task"] == one.phases["task"] + one.gradients


def test_invalid_arguments_are_reported_together() -> None:
    with pytest.raises(ValueError, match="offload_param needs zero_stage 3") as error:
        _estimate(offload_param=True, zero_stage=2, dtype_bytes=3, quantization="nf4", full_finetune=True)
    assert "dtype_bytes must be 1, 2, 4 or 8, got 3" in str(error.value)
    assert "quantized weights do not train" in str(error.value)


def test_describe_and_to_dict() -> None:
    e = _estimate(alignment=True)
    text = e.describe()
    assert "reference pass (alignment)" in text and "total (peak)" in text
    assert f"{e.total / MIB:.1f} MiB" in text
    record = json.loads(json.dumps(e.to_dict()))
    assert record["total_mb"] == round(e.total / MIB, 3)
    assert record["inputs"]["zero_stage"] == 0 and record["peak_phase"] == "reference"


# ----------------------------------------------------------------------------- model shapes


@pytest.fixture(params=["llama", "mistral", "gpt2", "bert"])
def tiny_dir(request: pytest.FixtureRequest) -> Path:
    return request.getfixturevalue(f"tiny_{request.param}_dir")


def _classifier(path: Path) -> tuple[torch.nn.Module, modeling.ModelInfo]:
    info = modeling.read_model_info(path)
    model = modeling.load_classifier(path, num_labels=2, dtype=torch.float32, is_decoder=info.is_decoder)
    return model, info


def test_model_shape_info_counts_parameters_without_weights(tiny_dir: Path) -> None:
    model, info = _classifier(tiny_dir)
    shape = memory.model_shape_info(transformers.AutoConfig.from_pretrained(tiny_dir))
    assert shape.num_parameters == sum(p.numel() for p in model.parameters())
    modules = dict(model.named_modules())
    assert shape.quantized_parameters == sum(
        modules[name].weight.numel() for name in modeling.quantizable_linear_names(tiny_dir)
    )
    assert (shape.is_decoder, shape.hidden_size, shape.num_layers) == (info.is_decoder, 64, 2)
    assert (shape.intermediate_size, shape.num_heads) == (128, 4)


def test_model_shape_info_reads_gpt2_field_names(tiny_gpt2_dir: Path) -> None:
    shape = memory.model_shape_info(transformers.AutoConfig.from_pretrained(tiny_gpt2_dir))
    assert (shape.layer_kind, shape.hidden_dropout, shape.attention_dropout) == ("gpt2", 0.1, 0.1)
    unset = transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, n_inner=None, vocab_size=300)
    assert memory.model_shape_info(unset).intermediate_size == 4 * 64


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("full", [False, True], ids=["adapters", "full"])
def test_activation_formula_matches_what_autograd_saves(tiny_dir: Path, attention: str, full: bool) -> None:
    """Bytes of every tensor saved for backward (parameters excluded), counted by autograd's hooks."""
    torch.manual_seed(0)
    model, info = _classifier(tiny_dir)
    model.set_attn_implementation(attention)
    if not full:
        model = inject.apply_lora(model, target_modules=modeling.default_lora_targets(info.model_type), r=2, alpha=8, dropout=0.0)
        inject.inject_mslr(model, targets=modeling.default_mslr_targets(info.model_type), rank=1, scales=[1, 2],
                           alpha=4, dropout=0.0, init="kaiming", keep_base=True)
    inject.set_trainable(model, full=full, train_head=full, head_names=modeling.head_module_names(info.model_type, info.is_decoder))
    model.train()
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameters:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    batch, seq = 4, 32
    ids = torch.randint(5, 300, (batch, seq))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
        torch.nn.functional.cross_entropy(logits.float(), torch.zeros(batch, dtype=torch.long))
    shape = memory.model_shape_info(transformers.AutoConfig.from_pretrained(tiny_dir))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    kwargs = {**shape.estimate_kwargs(), "attention": attention}
    e = memory.estimate_peak_memory(
        num_parameters=shape.num_parameters + (0 if full else trainable), trainable_parameters=trainable,
        seq_len=seq, micro_batch_size=batch, dtype_bytes=4, quantization="none", zero_stage=0, world_size=1,
        offload_optimizer=False, offload_param=False, gradient_checkpointing=False, alignment=False,
        full_finetune=full, device="cpu", **kwargs,
    )
    estimated, counted = e.activations + e.logits_loss, sum(saved.values())
    # Mistral's grouped-query k/v are narrower than the estimate's full-width upper bound.
    upper = 1.10 if shape.num_kv_heads < shape.num_heads else 1.05
    assert 0.98 * counted <= estimated <= upper * counted, (estimated, counted)


# ----------------------------------------------------------------------------- measurement


def test_measure_peak_sees_a_temporary_tensor() -> None:
    def work() -> None:
        block = torch.ones(16 * MIB // 4)  # 16 MiB of float32, written
        del block
        torch.ones(48 * MIB // 4).sum()  # 48 MiB alive at the peak

    measured = memory.measure_peak(work)
    assert 44 * MIB <= measured <= 80 * MIB


def test_child_of_a_large_parent_sees_its_own_peak() -> None:
    """Regression (CI): ``ru_maxrss`` of a child keeps the peak of the parent it was forked from.

    The benchmark workers run in subprocesses of a pytest process that can hold hundreds of MiB; the
    child's peak must be its own, or every phase measures as the parent's size.
    """
    ballast = torch.ones(384 * MIB // 4)  # 384 MiB resident in this (parent) process
    code = (
        "import torch; from pipeline import memory\n"
        "print(memory.peak_rss_bytes(), memory.measure_peak(lambda: torch.ones(32 * 2**20 // 4).sum()))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1])
    peak, added = (int(v) for v in out.stdout.split())
    del ballast
    assert peak < 384 * MIB, peak  # a fresh interpreter with torch is ~250 MiB, not parent-sized
    assert 24 * MIB <= added <= 64 * MIB, added


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    return _bench()


def _measure(bench: ModuleType, name: str, tmp_path: Path) -> dict[str, Any]:
    config = bench.CONFIGS[name]
    checkpoint = bench.build_checkpoint(config["model"], tmp_path / "ckpt")
    spec = {k: v for k, v in config.items() if k != "model"} | {"checkpoint": str(checkpoint), "steps": 2}
    return bench.run_worker(spec, threads=1, timeout=300)


def _check_within_tolerance(result: dict[str, Any]) -> None:
    estimated, measured = result["estimate_bytes"], result["measured"]
    assert abs(estimated["total"] - measured["peak"]) <= TOLERANCE * measured["peak"], (estimated, measured)
    for phase in ("task", "reference"):
        assert abs(estimated[phase] - measured[phase]) <= TOLERANCE * measured[phase], (phase, estimated, measured)
    assert result["parameters"] == result["estimate"]["inputs"]["num_parameters"]


def test_estimate_matches_measured_peak_small_llama(bench: ModuleType, tmp_path: Path) -> None:
    """Llama 4 x 256 (intermediate 688, vocab 2000), MuScleLoRA, batch 16 x 128, fresh subprocess."""
    _check_within_tolerance(_measure(bench, "small", tmp_path))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["medium", "medium_ckpt", "small_full"])
def test_estimate_matches_measured_peak_medium(bench: ModuleType, tmp_path: Path, name: str) -> None:
    """Llama 8 x 512 (intermediate 1376, vocab 8000) with and without checkpointing; full fine-tuning + GA."""
    _check_within_tolerance(_measure(bench, name, tmp_path))


def test_gpu_configurations_refuse_a_machine_without_cuda(bench: ModuleType, capsys) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(SystemExit):
        bench.main(["--configs", "llama2_7b_nf4"])
    assert "need a CUDA GPU" in capsys.readouterr().err


@pytest.mark.gpu
def test_estimate_matches_measured_peak_on_cuda(bench: ModuleType, tmp_path: Path) -> None:
    """The small Llama on a GPU: CUDA allocator peaks against the estimate with device='cuda'."""
    config = bench.GPU_CONFIGS["small_cuda"]
    checkpoint = bench.build_checkpoint(config["model"], tmp_path / "ckpt")
    spec = {k: v for k, v in config.items() if k != "model"} | {"checkpoint": str(checkpoint), "steps": 2}
    _check_within_tolerance(bench.run_worker(spec, threads=1, timeout=600))
