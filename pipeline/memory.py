"""Peak memory per device of a MuScleLoRA fine-tuning step (arXiv 2402.12026): estimate and measurement.

The estimate is arithmetic over the model's shape and the run's settings; nothing is allocated. Symbols:
``P`` parameters of the model as trained (adapters included), ``T`` trainable parameters, ``Q`` frozen
parameters stored quantized (backbone linear weights), ``W`` world size, ``d`` bytes per element of the
model dtype, ``b`` micro-batch rows per device, ``s`` sequence length, ``h`` hidden size, ``i``
intermediate size, ``n`` attention heads, ``L`` layers, ``t = b s`` tokens.

Static memory (alive for the whole run)::

    base weights      (P - T - Q) d' + Q q          d' = 4 with a quantized base (peft casts the
                                                    non-quantized rest to float32), else d;
                                                    q = 0.5 + 1/64 + 4/(64*256) (nf4/fp4, double
                                                    quantisation: 8-bit block absmax per 64 weights plus
                                                    a float32 scale per 256 blocks), 0.5 + 4/64 without
                                                    it, 1 + 4/h (int8, one float32 scale per row)
    trainable weights T d_a                         d_a = 4 over an int8 base, else d
    optimizer states  ZeRO 0: 2 T d_a               torch AdamW keeps exp_avg, exp_avg_sq in the
                                                    parameter dtype, no master copy
                      ZeRO >= 1: 12 T / W           DeepSpeed: fp32 master + 2 fp32 states, sharded;
                                                    0 on the device with offload_optimizer
    ZeRO-3 divides the base and trainable weights by W (offload_param: 0 on the device) and adds the
    one gathered layer being computed (``gathered parameters``).

Gradients (the task gradient of the step)::

    ZeRO 0, 1: T d_a  (+ T d_a communication buckets for W > 1 at stage 0, DDP / DeepSpeed allreduce)
    ZeRO >= 1: + 4 T / W  (fp32 partition the optimizer steps on; on the host with offload_optimizer)
    ZeRO >= 2: T d_a / W instead of T d_a

Activations: what autograd saves for backward, per transformer layer, read off
``torch.autograd.graph.saved_tensors_hooks`` on BERT, GPT-2 and Llama layers (transformers 5, torch 2.13)
and checked against that count by ``tests/test_memory.py``. "Frozen" means a frozen backbone with
adapters on the attention input projections (LoRA on q/v, the pipeline's default); "full" means every
weight trains. ``m`` is the bytes of a dropout mask element: ``d`` on CPU (``torch.dropout`` on CPU is
``x * bernoulli_noise``, saving the noise), 1 on CUDA (fused ``native_dropout`` saves a bool mask), 0
without dropout::

    llama (RMSNorm, SwiGLU):  2 t h max(d, 4)  norm inputs (RMSNorm upcasts to float32) + 2 t 4 (rsqrt)
                              + t h d (frozen: adapter input) | 4 t h d (full: norm outputs before and
                              after the weight, inputs of q/k/v and gate/up)
                              + t i d (3 frozen: SiLU input, SiLU output, up output | 4 full: + down input)
    bert (post-LN, GELU):     2 t h d + 4 t 4 (LayerNorm inputs, mean, rstd) + 2 t h m (hidden dropout)
                              + t h d (1 frozen | 2 full) + t i d (1 frozen: GELU input | 2 full)
    gpt2 (pre-LN, gelu_new):  as bert, with t i d (4 frozen: the tanh-GELU composite | 5 full)
    attention, flash-like:    4 t h d (q, k, v, output) + 4 b n s (logsumexp). SDPA picks a fused
                              kernel on CUDA, and on CPU when attention dropout is 0 (Llama).
    attention, materialised:  t h d (3 frozen | 4 full: + the output projection's input)
                              + b n s^2 (softmax output: 4 for Llama's float32 softmax plus d for its
                              cast copy when d != 4, else d; + m + d for attention dropout's mask and
                              output). Eager attention, and SDPA's math fallback (CPU with dropout).

Outside the layers: the decoders' classification head runs on every position, so its input is saved
(``t h d``, by the MSLR layer or a trainable head); full fine-tuning adds ``3 t h d + 16 t`` (final /
embedding norm, embedding dropout, token indices); logits and loss are ``t (2 * 16 + labels) d``
(decoder head) or ``b (2 h + labels) d`` (encoder pooler). With gradient checkpointing (non-reentrant,
per layer) the activations are ``L t h d`` (the layer inputs) + the non-layer terms + one recomputed
layer. The backward working set (gradients of the activations of the layer being differentiated) is
``max(c_mlp t i d, attention)`` with ``c_mlp`` = 3 (SwiGLU, tanh-GELU) or 2 (GELU) and attention
``4 t h d`` (fused) or ``2 b n s^2 max(d, softmax bytes)`` (materialised), plus one dequantized weight
``max(h i, h^2) d`` with a quantized base.

The step's peak: autograd frees the task graph during ``backward``, so the reference pass of an
alignment method (a second forward/backward through ``torch.autograd.grad``, of the reference batch's rows
per device: ``A_r`` is ``A`` at that batch) does not stack its activations on the task's; what it stacks
them on is the task gradient, kept in ``.grad`` until the aligned gradient replaces it. With
``A = activations + logits + working set``, ``G`` the gradients above and ``R = T d_a`` the reference
gradients autograd returns (full-size on every rank, also under ZeRO)::

    task pass       = max(A, G)       one micro-batch: parameter gradients appear while activations are
                                      freed (A + G when gradients accumulate over micro-batches)
    reference pass  = G + max(A_r, R + B) B: alignment buffers after the reference backward: the
                                      aligned gradient (4 T), float32 copies of task and reference
                                      gradients when d != 4, and the all-reduce bucket (4 T reference
                                      + 4 T assembled task gradient under ZeRO) for W > 1
    optimizer step  = G + U           U: AdamW's temporaries, 4 T with CUDA's foreach kernels, the
                                      largest tensor (taken as 4 T / L) on CPU's per-tensor loop, 0
                                      with offload_optimizer
    peak            = static + max(task pass, reference pass, optimizer step) + overhead

``alignment`` (the reported reference-pass term) is ``max(task pass, reference pass, optimizer step)
- max(task pass, optimizer step)``: what the alignment adds to the peak. It is small for adapters (a
few ``T``) and grows to ``G + R + B`` for full fine-tuning, where it can dominate. The framework
overhead is a fixed constant. On CPU it is the first-use cost of kernels, thread pools, code pages and
the loader in a process where torch, transformers and peft are already imported, measured once as the
measured peak minus every tensor term on the hidden-64 tiny Llama (``benchmarks/bench_memory.py``,
14.2-14.3 MiB; the larger configurations imply 13.6-17.1 MiB): 14 MiB. A whole training process also
holds its imports, tokenizer and data (several hundred MiB of RSS before the model is loaded), which the
caller adds. On CUDA it is 64 MiB for cuBLAS workspaces and allocator rounding, not measured here (no
GPU).

Known simplifications: k and v are counted at full width for grouped-query attention (an upper bound);
adapter rank terms (``2 t r`` per adapted layer) and the first layer's unsaved tensors are ignored;
DeepSpeed's bucket sizes and ZeRO-3 prefetching beyond one layer are not modelled; activations are in
the model dtype (peft's float32 norms over a quantized base are not).

Measurement (:func:`measure_peak`): on CUDA the ``torch.cuda.max_memory_allocated`` increase over the
allocation before the call. On CPU the increase of the process's peak resident set size
(``getrusage(...).ru_maxrss``) over its resident size just before the call, after resetting the
kernel's high-water mark (``/proc/self/clear_refs``) where Linux allows it. RSS counts what the C
allocator keeps after ``free`` and file pages touched for the first time, so compare numbers from a
fresh subprocess in which glibc's dynamic mmap threshold is pinned (``MALLOC_MMAP_THRESHOLD_=65536``:
large tensors are then mapped and returned on free); without it freed activation memory stays resident
and the measured peak of a few steps grows past the live-tensor peak (three steps of the medium
benchmark configuration: 1.9 GB of RSS unpinned, 0.84 GB pinned, imports included).
"""

from __future__ import annotations

import copy
import logging
import math
import re
import resource
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

import torch

logger = logging.getLogger(__name__)

QuantizationMode = Literal["none", "nf4", "fp4", "int8"]
LayerKind = Literal["llama", "bert", "gpt2"]
AttentionImpl = Literal["sdpa", "eager"]
DeviceKind = Literal["cpu", "cuda"]

MIB = 2**20
DEFAULT_OVERHEAD_BYTES: dict[str, int] = {"cpu": 14 * MIB, "cuda": 64 * MIB}
LLM_HEAD_DIM = 16
_BLOCK = 64  # bitsandbytes 4-bit block size
_DOUBLE_QUANT_GROUP = 256  # blocks per float32 scale of the 8-bit absmax
_LAYER_KINDS: dict[str, LayerKind] = {
    "llama": "llama",
    "mistral": "llama",
    "qwen2": "llama",
    "bert": "bert",
    "roberta": "bert",
    "gpt2": "gpt2",
}
_HEAD_MODULES = ("score", "classifier")  # kept floating point by a quantized load (pipeline.modeling)


@dataclass(frozen=True)
class MemoryEstimate:
    """Estimated peak memory of one device, by component, in bytes.

    Attributes:
        base_weights: frozen parameters on the device (quantized where the base is).
        trainable_weights: trainable parameters on the device.
        gathered_parameters: ZeRO-3: one layer's parameters gathered for its forward/backward.
        optimizer_states: AdamW states and, under ZeRO, the fp32 master copy, on the device.
        gradients: the task gradient of one step (and ZeRO's fp32 partition, communication buckets).
        activations: tensors saved for backward by one micro-batch's forward (checkpointed or not).
        activations_without_checkpointing: ``activations`` of the same run without checkpointing.
        activations_with_checkpointing: ``activations`` of the same run with checkpointing.
        backward_working_set: gradients of the activations of the layer being differentiated.
        logits_loss: classification head outputs and loss.
        reference_pass: what the alignment's reference pass adds to the peak (0 without alignment).
        optimizer_step: what AdamW's step adds on top of the gradients (temporaries).
        overhead: fixed framework overhead.
        total: the estimated peak (see the module docstring for how the terms combine).
        peak_phase: the phase that sets the peak: ``task``, ``reference`` or ``optimizer``.
        phases: estimated peak of each phase (static + that phase + overhead): ``task`` (forward and
            backward of the training micro-batch), ``reference`` (alignment only), ``optimizer``.
        inputs: the arguments the estimate was computed from.
    """

    base_weights: int
    trainable_weights: int
    gathered_parameters: int
    optimizer_states: int
    gradients: int
    activations: int
    activations_without_checkpointing: int
    activations_with_checkpointing: int
    backward_working_set: int
    logits_loss: int
    reference_pass: int
    optimizer_step: int
    overhead: int
    total: int
    peak_phase: str
    phases: dict[str, int] = field(default_factory=dict)
    inputs: dict[str, Any] = field(default_factory=dict)

    @property
    def static(self) -> int:
        """Bytes alive for the whole run: weights, gathered layer, optimizer states."""
        return self.base_weights + self.trainable_weights + self.gathered_parameters + self.optimizer_states

    def to_dict(self) -> dict[str, Any]:
        """Components in MiB (``*_mb``), the peak phase and the inputs, for ``metrics.json``."""
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, int):
                out[f"{f.name}_mb"] = round(value / MIB, 3)
        out["peak_phase"] = self.peak_phase
        out["phases_mb"] = {k: round(v / MIB, 3) for k, v in self.phases.items()}
        out["inputs"] = dict(self.inputs)
        return out

    def describe(self) -> str:
        """A multi-line table of the components in MiB (for logs)."""
        i = self.inputs
        header = (
            f"Estimated peak memory per device: {i.get('quantization')} base, {i.get('dtype_bytes')}-byte dtype, "
            f"ZeRO stage {i.get('zero_stage')} x {i.get('world_size')} device(s)"
            f"{', optimizer offload' if i.get('offload_optimizer') else ''}"
            f"{', parameter offload' if i.get('offload_param') else ''}; micro-batch {i.get('micro_batch_size')} x "
            f"{i.get('seq_len')} tokens; checkpointing {'on' if i.get('gradient_checkpointing') else 'off'}; "
            f"alignment {'on' if i.get('alignment') else 'off'}"
            + (f" (reference batch {i['reference_micro_batch_size']} rows)"
               if i.get("alignment") and i.get("reference_micro_batch_size") not in (None, i.get("micro_batch_size")) else "")
        )
        ckpt_note = "checkpointed" if i.get("gradient_checkpointing") else "all layers"
        rows = [
            ("base weights (frozen)", self.base_weights, ""),
            ("trainable weights", self.trainable_weights, f"{i.get('trainable_parameters'):,} parameters"),
            ("gathered parameters (ZeRO-3)", self.gathered_parameters, "one layer"),
            ("optimizer states", self.optimizer_states, "AdamW (+ fp32 master under ZeRO)"),
            ("gradients", self.gradients, "task gradient"),
            ("activations", self.activations, ckpt_note),
            ("  without checkpointing", self.activations_without_checkpointing, "for comparison"),
            ("  with checkpointing", self.activations_with_checkpointing, "for comparison"),
            ("backward working set", self.backward_working_set, "one layer"),
            ("logits / loss", self.logits_loss, ""),
            ("reference pass (alignment)", self.reference_pass, "added to the peak"),
            ("optimizer step", self.optimizer_step, "temporaries"),
            ("framework overhead", self.overhead, "fixed"),
        ]
        width = max(len(name) for name, _, _ in rows) + 2
        lines = [header]
        for name, value, note in rows:
            lines.append(f"  {name:<{width}}{value / MIB:>11.1f} MiB  {note}".rstrip())
        lines.append(f"  {'total (peak)':<{width}}{self.total / MIB:>11.1f} MiB  peak in the {self.peak_phase} phase")
        return "\n".join(lines)


def _task_pass(gradients: int, activation_peak: int, grad_accum_steps: int) -> int:
    if grad_accum_steps > 1:
        return gradients + activation_peak
    return max(activation_peak, gradients)


def _check_arguments(**values: Any) -> None:
    """Collect every invalid argument of :func:`estimate_peak_memory` into one ValueError."""
    problems = []
    for name in ("num_parameters", "hidden_size", "num_layers", "intermediate_size", "num_heads", "vocab_size",
                 "seq_len", "micro_batch_size", "world_size", "grad_accum_steps", "num_labels"):
        if values[name] < 1:
            problems.append(f"{name} must be >= 1, got {values[name]}")
    if not 0 <= values["trainable_parameters"] <= values["num_parameters"]:
        problems.append(
            f"trainable_parameters must be in [0, num_parameters={values['num_parameters']}], "
            f"got {values['trainable_parameters']}"
        )
    if values["reference_micro_batch_size"] is not None and values["reference_micro_batch_size"] < 1:
        problems.append(f"reference_micro_batch_size must be >= 1 or None, got {values['reference_micro_batch_size']}")
    if values["dtype_bytes"] not in (1, 2, 4, 8):
        problems.append(f"dtype_bytes must be 1, 2, 4 or 8, got {values['dtype_bytes']}")
    if values["quantization"] not in ("none", "nf4", "fp4", "int8"):
        problems.append(f"quantization must be none, nf4, fp4 or int8, got {values['quantization']!r}")
    if values["zero_stage"] not in (0, 1, 2, 3):
        problems.append(f"zero_stage must be 0, 1, 2 or 3, got {values['zero_stage']}")
    if values["offload_param"] and values["zero_stage"] != 3:
        problems.append(f"offload_param needs zero_stage 3, got zero_stage {values['zero_stage']}")
    if values["offload_optimizer"] and values["zero_stage"] < 1:
        problems.append("offload_optimizer needs zero_stage >= 1, got zero_stage 0")
    if values["quantization"] != "none" and values["full_finetune"]:
        problems.append(f"full_finetune with quantization={values['quantization']!r}: quantized weights do not train")
    if values["layer_kind"] not in (None, "llama", "bert", "gpt2"):
        problems.append(f"layer_kind must be llama, bert, gpt2 or None, got {values['layer_kind']!r}")
    if values["attention"] not in ("sdpa", "eager"):
        problems.append(f"attention must be sdpa or eager, got {values['attention']!r}")
    if values["device"] not in ("cpu", "cuda"):
        problems.append(f"device must be cpu or cuda, got {values['device']!r}")
    quantized = values["quantized_parameters"]
    frozen = values["num_parameters"] - values["trainable_parameters"]
    if values["quantization"] != "none" and quantized is not None and not 0 <= quantized <= max(frozen, 0):
        problems.append(f"quantized_parameters must be in [0, frozen parameters={frozen}], got {quantized}")
    if problems:
        raise ValueError("estimate_peak_memory: " + "; ".join(problems))


def _quantized_bytes_per_parameter(quantization: str, double_quant: bool, hidden_size: int) -> float:
    if quantization in ("nf4", "fp4"):
        if double_quant:
            return 0.5 + 1 / _BLOCK + 4 / (_BLOCK * _DOUBLE_QUANT_GROUP)
        return 0.5 + 4 / _BLOCK
    return 1.0 + 4 / hidden_size  # int8: one float32 scale per output row of ~hidden inputs


def _layer_linear_parameters(kind: LayerKind, hidden: int, intermediate: int) -> int:
    """Weights of one layer's linear projections (attention q/k/v/o plus MLP)."""
    mlp = 3 if kind == "llama" else 2
    return 4 * hidden * hidden + mlp * hidden * intermediate


def layer_activation_bytes(
    *,
    layer_kind: LayerKind,
    tokens: int,
    micro_batch_size: int,
    seq_len: int,
    hidden_size: int,
    intermediate_size: int,
    num_heads: int,
    dtype_bytes: int,
    full_finetune: bool,
    flash_attention: bool,
    attention_mask_bytes: int,
    hidden_mask_bytes: int,
) -> int:
    """Bytes autograd saves for backward in one transformer layer (formulas in the module docstring).

    Args:
        layer_kind: ``llama`` (RMSNorm + SwiGLU), ``bert`` (post-LN + GELU) or ``gpt2`` (pre-LN + tanh-GELU).
        tokens: ``micro_batch_size * seq_len``.
        micro_batch_size: rows per device.
        seq_len: tokens per row.
        hidden_size: model width.
        intermediate_size: MLP width.
        num_heads: attention heads.
        dtype_bytes: bytes per activation element.
        full_finetune: every weight trains (else a frozen backbone with adapters on q/v).
        flash_attention: attention through a fused kernel (no ``s^2`` tensors).
        attention_mask_bytes: bytes per element of the attention-dropout mask (0: no dropout).
        hidden_mask_bytes: bytes per element of the hidden-dropout masks (0: no dropout).

    Returns:
        Bytes saved by the layer's forward.
    """
    t, h, i, d = tokens, hidden_size, intermediate_size, dtype_bytes
    scores = micro_batch_size * num_heads * seq_len * seq_len
    if flash_attention:
        attention = 4 * t * h * d + 4 * micro_batch_size * num_heads * seq_len
    else:
        if layer_kind == "llama":
            softmax = 4 + (d if d != 4 else 0)  # float32 softmax output and its cast copy
        else:
            softmax = d
        dropout = attention_mask_bytes + d if attention_mask_bytes else 0
        attention = (4 if full_finetune else 3) * t * h * d + scores * (softmax + dropout)
    if layer_kind == "llama":
        norms = 2 * t * h * max(d, 4) + 2 * t * 4
        inputs = (4 if full_finetune else 1) * t * h * d
        mlp = (4 if full_finetune else 3) * t * i * d
        return norms + inputs + attention + mlp
    norms = 2 * t * h * d + 4 * t * 4 + 2 * t * h * hidden_mask_bytes
    inputs = (2 if full_finetune else 1) * t * h * d
    saved_mlp = {"bert": 1, "gpt2": 4}[layer_kind] + (1 if full_finetune else 0)
    return norms + inputs + attention + saved_mlp * t * i * d


def estimate_peak_memory(
    *,
    num_parameters: int,
    trainable_parameters: int,
    hidden_size: int,
    num_layers: int,
    intermediate_size: int,
    num_heads: int,
    vocab_size: int,
    seq_len: int,
    micro_batch_size: int,
    dtype_bytes: int,
    quantization: QuantizationMode,
    zero_stage: int,
    world_size: int,
    offload_optimizer: bool,
    offload_param: bool,
    gradient_checkpointing: bool,
    alignment: bool,
    full_finetune: bool,
    is_decoder: bool,
    layer_kind: LayerKind | None = None,
    attention: AttentionImpl = "sdpa",
    attention_dropout: float = 0.0,
    hidden_dropout: float = 0.0,
    device: DeviceKind = "cuda",
    quantized_parameters: int | None = None,
    double_quant: bool = True,
    grad_accum_steps: int = 1,
    num_labels: int = 2,
    overhead_bytes: int | None = None,
    reference_micro_batch_size: int | None = None,
) -> MemoryEstimate:
    """Estimate the peak memory of one device during a training step (formulas in the module docstring).

    Args:
        num_parameters: every parameter of the model as trained, adapters included (count quantized
            weights by their logical size, not their packed storage: see :func:`model_shape_info`).
        trainable_parameters: parameters with ``requires_grad``.
        hidden_size: model width.
        num_layers: transformer layers.
        intermediate_size: MLP width.
        num_heads: attention heads.
        vocab_size: vocabulary size (part of ``num_parameters``; kept for the record).
        seq_len: tokens per row (the padded maximum length for an upper bound).
        micro_batch_size: rows per device per forward (the global batch divided by the world size).
        dtype_bytes: bytes per element of the model dtype (4 float32, 2 bfloat16/float16).
        quantization: storage of the frozen backbone linears: ``none``, ``nf4``, ``fp4`` or ``int8``.
        zero_stage: DeepSpeed ZeRO stage, 0 for none (single process, DDP, DeepSpeed stage 0).
        world_size: data-parallel devices.
        offload_optimizer: ZeRO optimizer states (and master weights) live on the host.
        offload_param: ZeRO-3 parameters live on the host.
        gradient_checkpointing: activations recomputed per layer in backward.
        alignment: the method runs the gradient alignment's reference pass.
        full_finetune: every weight trains (else adapters over a frozen backbone).
        is_decoder: decoder LLM (its classification head runs on every position).
        layer_kind: layer layout; default ``llama`` for decoders, ``bert`` for encoders.
        attention: transformers' attention implementation, ``sdpa`` (its default) or ``eager``.
        attention_dropout: attention-probability dropout of the model config.
        hidden_dropout: hidden-state dropout of the model config (BERT, GPT-2).
        device: ``cpu`` or ``cuda``: dropout masks, SDPA kernels and the overhead differ.
        quantized_parameters: frozen parameters stored quantized; default the layers' linear weights.
        double_quant: 4-bit only: block scales quantized to 8 bits (the pipeline's default).
        grad_accum_steps: micro-batches per optimizer step (> 1 keeps gradients alive across forwards).
        num_labels: classes of the classifier.
        overhead_bytes: fixed framework overhead; default ``DEFAULT_OVERHEAD_BYTES[device]``.
        reference_micro_batch_size: rows per device of the alignment's reference pass (``align.ref_batch_size``
            over the ranks); default ``micro_batch_size``.

    Returns:
        The :class:`MemoryEstimate`.

    Raises:
        ValueError: an argument is out of range or two arguments contradict each other (all listed).
    """
    inputs = {k: v for k, v in locals().items() if k != "inputs"}
    _check_arguments(**inputs)
    kind: LayerKind = layer_kind or ("llama" if is_decoder else "bert")
    inputs["layer_kind"] = kind
    d = dtype_bytes
    quantized = quantization != "none"
    frozen = num_parameters - trainable_parameters
    if not quantized:
        quantized_parameters = 0
    elif quantized_parameters is None:
        quantized_parameters = min(frozen, num_layers * _layer_linear_parameters(kind, hidden_size, intermediate_size))
    inputs["quantized_parameters"] = quantized_parameters
    rest_bytes = 4 if quantized else d
    q_bytes = _quantized_bytes_per_parameter(quantization, double_quant, hidden_size) if quantized else 0.0
    trainable_bytes = 4 if quantization == "int8" else d

    base = (frozen - quantized_parameters) * rest_bytes + quantized_parameters * q_bytes
    trainable = trainable_parameters * trainable_bytes
    gathered = 0
    if zero_stage == 3:
        layer_bytes = _layer_linear_parameters(kind, hidden_size, intermediate_size) * (q_bytes if quantized else d)
        # The layer being computed is gathered whole; the local shard of it is already counted.
        gathered = layer_bytes if offload_param else layer_bytes * (1 - 1 / world_size)
        base = 0 if offload_param else base / world_size
        trainable = 0 if offload_param else trainable / world_size

    if zero_stage == 0:
        optimizer = 2 * trainable_parameters * trainable_bytes
    else:
        optimizer = 0 if offload_optimizer else 12 * trainable_parameters / world_size

    grads = trainable_parameters * trainable_bytes / (world_size if zero_stage >= 2 else 1)
    if zero_stage == 0 and world_size > 1:
        grads += trainable_parameters * trainable_bytes  # allreduce buckets
    if zero_stage >= 1 and not offload_optimizer:
        grads += 4 * trainable_parameters / world_size  # fp32 gradient partition

    s, h, i, n = seq_len, hidden_size, intermediate_size, num_heads
    mask_bytes = d if device == "cpu" else 1
    attention_mask_bytes = mask_bytes if attention_dropout > 0 else 0
    hidden_mask_bytes = mask_bytes if hidden_dropout > 0 else 0
    flash = attention == "sdpa" and (device == "cuda" or attention_dropout == 0)

    def pass_terms(b: int) -> tuple[float, float, float, float, float]:
        """Activations (as configured, plain, checkpointed), logits + loss, working set of one pass of b rows."""
        t = b * s
        per_layer = layer_activation_bytes(
            layer_kind=kind, tokens=t, micro_batch_size=b, seq_len=s, hidden_size=h, intermediate_size=i,
            num_heads=n, dtype_bytes=d, full_finetune=full_finetune, flash_attention=flash,
            attention_mask_bytes=attention_mask_bytes, hidden_mask_bytes=hidden_mask_bytes,
        )
        edges = (t * h * d if is_decoder else 0) + (3 * t * h * d + 16 * t if full_finetune else 0)
        plain = num_layers * per_layer + edges
        ckpt = num_layers * t * h * d + edges + per_layer
        logits = t * (2 * LLM_HEAD_DIM + num_labels) * d if is_decoder else b * (2 * h + num_labels) * d
        mlp_working = (2 if kind == "bert" else 3) * t * i * d
        attention_working = 4 * t * h * d if flash else 2 * b * n * s * s * max(d, 4 if kind == "llama" else d)
        working = max(mlp_working, attention_working) + (max(h * i, h * h) * d if quantized else 0)
        return (ckpt if gradient_checkpointing else plain), plain, ckpt, logits, working

    activations, activations_plain, activations_ckpt, logits, working = pass_terms(micro_batch_size)
    activation_peak = activations + logits + working
    task = _task_pass(int(grads), activation_peak, grad_accum_steps)
    if device == "cuda":
        step_temp = 4 * trainable_parameters / (world_size if zero_stage >= 1 else 1)
    else:
        step_temp = 4 * trainable_parameters / max(num_layers, 1)
    step = grads + (0 if offload_optimizer else step_temp)
    reference = 0
    if alignment:
        ref_grads = trainable_parameters * trainable_bytes
        buffers = 4 * trainable_parameters  # the aligned gradient
        if trainable_bytes != 4:
            buffers += 8 * trainable_parameters  # float32 copies of task and reference gradients
        if world_size > 1:
            buffers += 4 * trainable_parameters * (2 if zero_stage >= 1 else 1)  # all-reduce bucket
        ref_rows = micro_batch_size if reference_micro_batch_size is None else reference_micro_batch_size
        ref_activations, _, _, ref_logits, ref_working = pass_terms(ref_rows)
        reference = grads + max(ref_activations + ref_logits + ref_working, ref_grads + buffers)
    phase_bytes = {"task": task, "optimizer": step}
    if alignment:
        phase_bytes["reference"] = reference
    dynamic = max(phase_bytes.values())
    phase = max(phase_bytes, key=phase_bytes.__getitem__)
    reference_extra = dynamic - max(task, step)
    overhead = DEFAULT_OVERHEAD_BYTES[device] if overhead_bytes is None else overhead_bytes
    static = base + trainable + gathered + optimizer
    total = static + dynamic + overhead
    estimate = MemoryEstimate(
        base_weights=int(base),
        trainable_weights=int(trainable),
        gathered_parameters=int(gathered),
        optimizer_states=int(optimizer),
        gradients=int(grads),
        activations=int(activations),
        activations_without_checkpointing=int(activations_plain),
        activations_with_checkpointing=int(activations_ckpt),
        backward_working_set=int(working),
        logits_loss=int(logits),
        reference_pass=int(reference_extra),
        optimizer_step=int(step - grads),
        overhead=int(overhead),
        total=int(total),
        peak_phase=phase,
        phases={name: int(static + value + overhead) for name, value in phase_bytes.items()},
        inputs=inputs,
    )
    return estimate


# ----------------------------------------------------------------------------- model shape


@dataclass(frozen=True)
class ModelShape:
    """Shape numbers of a transformers model, read from its config (no weights).

    Attributes:
        model_type: ``config.model_type``.
        is_decoder: decoder LLM (classified through the last token).
        layer_kind: layout used by the activation model (``llama``, ``bert``, ``gpt2``).
        num_parameters: parameters of the sequence classifier the pipeline trains (for decoders with
            the authors' head of width ``llm_head_dim``), adapters excluded.
        quantized_parameters: weights of the linear layers a quantized load would quantize.
        hidden_size, num_layers, intermediate_size, num_heads, num_kv_heads, vocab_size: the config's.
        attention: attention implementation (``eager`` if the config asks for it, else ``sdpa``).
        attention_dropout: attention-probability dropout.
        hidden_dropout: hidden-state dropout.
    """

    model_type: str
    is_decoder: bool
    layer_kind: LayerKind
    num_parameters: int
    quantized_parameters: int
    hidden_size: int
    num_layers: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    vocab_size: int
    attention: AttentionImpl
    attention_dropout: float
    hidden_dropout: float

    def estimate_kwargs(self) -> dict[str, Any]:
        """The shape arguments of :func:`estimate_peak_memory` (without ``num_parameters``, which
        must include the adapters, nor the run's settings)."""
        keys = ("hidden_size", "num_layers", "intermediate_size", "num_heads", "vocab_size", "is_decoder",
                "layer_kind", "attention", "attention_dropout", "hidden_dropout", "quantized_parameters")
        values = asdict(self)
        return {k: values[k] for k in keys}


def _first(config: Any, names: tuple[str, ...], default: Any = None) -> Any:
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return value
    return default


def model_shape_info(
    config: Any,
    *,
    num_labels: int = 2,
    is_decoder: bool | None = None,
    llm_head_dim: int = LLM_HEAD_DIM,
) -> ModelShape:
    """Read a transformers config (BERT, RoBERTa, Llama, Mistral, GPT-2 field names) and count parameters.

    Parameters are counted on the meta device (``accelerate.init_empty_weights``): the sequence
    classifier is built without allocating weights. Decoders get the pipeline's LLM head in place of
    ``score`` (``hidden x llm_head_dim`` and ``llm_head_dim x num_labels``, no biases).

    Args:
        config: a ``transformers.PretrainedConfig`` (a multimodal config's text config is used).
        num_labels: classes of the classifier.
        is_decoder: override the decoder detection (default: Llama, Mistral, GPT-2 and causal-LM types).
        llm_head_dim: width of the decoder head's bottleneck (``model.llm_head_dim``).

    Returns:
        The :class:`ModelShape`.

    Raises:
        ValueError: the config lacks the hidden size, layer count or head count.
    """
    from accelerate import init_empty_weights
    from torch import nn
    from transformers import AutoModelForSequenceClassification
    from transformers.pytorch_utils import Conv1D

    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    hidden = _first(text, ("hidden_size", "n_embd", "d_model"))
    layers = _first(text, ("num_hidden_layers", "n_layer", "num_layers"))
    heads = _first(text, ("num_attention_heads", "n_head"))
    missing = [name for name, value in (("hidden size", hidden), ("layer count", layers), ("head count", heads)) if value is None]
    if missing:
        raise ValueError(
            f"model_shape_info: config of model_type {getattr(config, 'model_type', '?')!r} has no {', '.join(missing)} "
            "(looked for hidden_size/n_embd/d_model, num_hidden_layers/n_layer, num_attention_heads/n_head)"
        )
    intermediate = _first(text, ("intermediate_size", "n_inner", "ffn_dim"), 4 * hidden)
    kv_heads = _first(text, ("num_key_value_heads",), heads)
    model_type = str(getattr(config, "model_type", ""))
    if is_decoder is None:
        from transformers.models.auto.modeling_auto import (
            MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
            MODEL_FOR_MASKED_LM_MAPPING_NAMES,
        )

        # Encoders such as BERT also have a causal-LM class; a masked-LM class marks an encoder.
        is_decoder = model_type not in MODEL_FOR_MASKED_LM_MAPPING_NAMES and (
            model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES or bool(getattr(text, "is_decoder", False))
        )
    kind = _LAYER_KINDS.get(model_type, "llama" if is_decoder else "bert")
    implementation = getattr(config, "_attn_implementation", None)
    attention: AttentionImpl = "eager" if implementation == "eager" else "sdpa"

    counted = copy.deepcopy(config)
    counted.num_labels = num_labels
    with init_empty_weights():
        model = AutoModelForSequenceClassification.from_config(counted)
    total = sum(p.numel() for p in model.parameters())
    if is_decoder:
        score = getattr(model, "score", None)
        if isinstance(score, nn.Linear):
            total += hidden * llm_head_dim + llm_head_dim * num_labels - score.weight.numel()
            if score.bias is not None:
                total -= score.bias.numel()
    quantized = 0
    for name, module in model.named_modules():
        if type(module) is nn.Linear or isinstance(module, Conv1D):
            if any(name == key or name.startswith(f"{key}.") or name.endswith(key) for key in _HEAD_MODULES):
                continue
            quantized += module.weight.numel()
    return ModelShape(
        model_type=model_type,
        is_decoder=bool(is_decoder),
        layer_kind=kind,
        num_parameters=int(total),
        quantized_parameters=int(quantized),
        hidden_size=int(hidden),
        num_layers=int(layers),
        intermediate_size=int(intermediate),
        num_heads=int(heads),
        num_kv_heads=int(kv_heads),
        vocab_size=int(text.vocab_size),
        attention=attention,
        attention_dropout=float(_first(text, ("attention_probs_dropout_prob", "attention_dropout", "attn_pdrop"), 0.0)),
        hidden_dropout=float(_first(text, ("hidden_dropout_prob", "resid_pdrop", "hidden_dropout"), 0.0)),
    )


def logical_numel(p: torch.Tensor) -> int:
    """Elements a parameter stands for: bitsandbytes packs 4-bit weights (two per byte), ZeRO-3 empties
    partitioned ones (``ds_numel`` keeps the full count)."""
    quant_state = getattr(p, "quant_state", None)
    if quant_state is not None and getattr(quant_state, "shape", None) is not None:
        return math.prod(quant_state.shape)
    return int(getattr(p, "ds_numel", p.numel()))


# ----------------------------------------------------------------------------- measurement


def proc_status_bytes(field: str) -> int | None:
    """A ``kB`` field of ``/proc/self/status`` (``VmRSS``, ``VmHWM``, ``RssFile``...) in bytes; None off Linux."""
    status = Path("/proc/self/status")
    if not status.exists():
        return None
    match = re.search(rf"^{field}:\s+(\d+)\s+kB", status.read_text(), re.MULTILINE)
    return int(match.group(1)) * 1024 if match else None


def current_rss_bytes() -> int:
    """Resident set size of this process now (``/proc/self/status``; the peak RSS where that is missing)."""
    value = proc_status_bytes("VmRSS")
    return value if value is not None else peak_rss_bytes()


def peak_rss_bytes() -> int:
    """Peak resident set size of this process.

    ``VmHWM`` from ``/proc/self/status`` where it exists: it belongs to this process's address space and
    ``reset_peak_rss`` resets it. ``getrusage``'s ``ru_maxrss`` is only the fallback (macOS): on Linux it
    also keeps the high-water mark of the address space the process had before ``exec`` - a child a
    large parent forks inherits the parent's peak, which would hide every smaller peak of the child.
    """
    value = proc_status_bytes("VmHWM")
    if value is not None:
        return value
    value = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(value) if sys.platform == "darwin" else int(value) * 1024


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark to the current RSS (Linux >= 4.0); False where not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def measure_peak(fn: Callable[[], Any], *, device: torch.device | str = "cpu") -> int:
    """Peak memory ``fn()`` adds, in bytes.

    On CUDA: ``torch.cuda.max_memory_allocated`` after the call minus ``memory_allocated`` before it
    (the peak statistics are reset first). On CPU: the process's peak RSS after the call minus its RSS
    before it, with the peak mark reset first where Linux allows it (otherwise an earlier, higher peak
    hides the call's: then run in a fresh process). RSS includes what the C allocator caches after
    ``free`` and first-touched file pages; see the module docstring for getting clean numbers.

    Args:
        fn: the work to measure (its return value is discarded).
        device: where the work allocates: ``cpu`` or a CUDA device.

    Returns:
        Bytes above the level before the call (0 if the peak did not rise).
    """
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return max(0, torch.cuda.max_memory_allocated(device) - before)
    if not reset_peak_rss():
        logger.debug("measure_peak: cannot reset the peak RSS mark; the result is only valid in a fresh process")
    before = current_rss_bytes()
    fn()
    return max(0, peak_rss_bytes() - before)
