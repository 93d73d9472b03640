"""Frozen base layers under the adapters: plain and bitsandbytes-quantized linears (MuScleLoRA, arXiv 2402.12026).

With a quantized backbone the frozen ``W0`` of every backbone linear is stored in 4 bits (NF4 or FP4,
bitsandbytes ``Linear4bit``) or 8 bits (LLM.int8, ``Linear8bitLt``) and dequantized only inside the
layer's own forward, so LoRA and MSLR see the base as a black box (the generic path of
:mod:`kernels.mslr`, ``base_layer(x) + mslr_delta(x, ...)``)::

    h = deq(Q(W0)) x + b0 + (alpha / r) R diag(K) L x

- 4-bit: ``deq(Q(W0))[i, j] = absmax[block(i, j)] * code[q[i, j]]``, blocks of 64 weights, ``code`` the 16
  NF4 or FP4 levels; with double quantisation the per-block ``absmax`` are themselves 8-bit quantized.
  The packed codes are stored in ``quant_storage`` (two codes per byte in ``uint8``; a floating storage
  packs ``bits(storage) / 4`` codes per element, which lets ZeRO-3 shard the weight like any other
  parameter of the model dtype).
- 8-bit: ``deq(Q(W0))[i, :] = W_int8[i, :] * SCB[i] / 127`` (row-wise absmax).

A quantized weight cannot absorb a dense delta without re-quantization, which would round most of the
adapter away; merging therefore dequantizes explicitly (:func:`dequantized_linear`) or is refused.

bitsandbytes 0.49+ on a CPU with AVX512-BF16 repacks a 4-bit weight in place on its first eval-mode forward
without gradients (an evaluation pass): the block scales are rounded to bfloat16 and later products run
through a kernel without a backward, so training after an evaluation silently gets no gradient below the
layer. :func:`disable_cpu_inference_repacking` switches that off for the layers of a model.

This is the only module of the project that imports ``bitsandbytes``, and it does so inside functions:
importing this module needs neither bitsandbytes nor transformers. A module can only be a bitsandbytes
layer once bitsandbytes has been imported, so :func:`is_quantized_linear` looks in ``sys.modules``
before importing anything.
"""

from __future__ import annotations

import logging
import sys
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal, get_args

import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from transformers import BitsAndBytesConfig

__all__ = [
    "QUANTIZATION_MODES",
    "QUANT_STORAGES",
    "QuantStorage",
    "QuantizationMode",
    "adapter_dtype",
    "bitsandbytes_config",
    "disable_cpu_inference_repacking",
    "bitsandbytes_status",
    "dequantize_weight",
    "dequantized_linear",
    "describe_quantized",
    "is_quantized_linear",
    "quantized_bits",
    "resolve_quant_storage",
]

logger = logging.getLogger(__name__)


class _KernelsHubNotice(logging.Filter):
    """Replace bitsandbytes' import-time warning about the Hugging Face ``kernels`` package by one that
    says what it means here.

    bitsandbytes (0.50, CPU) tries ``get_kernel("kernels-community/...")`` from that package (a dependency of
    transformers >= 5.25) for an optional faster 4-bit GEMM; offline, or without the package, the download
    fails and bitsandbytes warns. Either way it falls back to its built-in CPU path; results are the same.
    """

    _told = False

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.getMessage().startswith("Failed to load CPU gemm_4bit_forward from kernels-community"):
            return True
        if not _KernelsHubNotice._told:
            _KernelsHubNotice._told = True
            logger.debug(
                "bitsandbytes: the optional Hugging Face `kernels` CPU 4-bit GEMM is not used (the package is not "
                "installed or its kernel cannot be fetched); bitsandbytes' built-in CPU path runs"
            )
        return False


def install_log_notice() -> None:
    """Attach :class:`_KernelsHubNotice` to bitsandbytes' CPU-ops logger (once; idempotent).

    Call it before bitsandbytes is first imported: by this module, by transformers when loading a
    quantized model, or by ``import peft``, which imports bitsandbytes whenever it is installed. The
    pipeline's entry points (``run_training``, ``plan_run``, ``load_run``) do.
    """
    target = logging.getLogger("bitsandbytes.backends.cpu.ops")
    if not any(isinstance(f, _KernelsHubNotice) for f in target.filters):
        target.addFilter(_KernelsHubNotice())

QuantizationMode = Literal["none", "nf4", "fp4", "int8"]
QUANTIZATION_MODES: tuple[str, ...] = get_args(QuantizationMode)
QuantStorage = Literal["auto", "uint8", "float32", "bfloat16", "float16"]
QUANT_STORAGES: tuple[str, ...] = get_args(QuantStorage)

_STORAGE_DTYPES: dict[str, torch.dtype] = {
    "uint8": torch.uint8,
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
_SMOKE_FEATURES = 64


def _bnb_classes() -> tuple[type, type] | None:
    """``(Linear4bit, Linear8bitLt)`` if bitsandbytes is already imported, else None (nothing can be one)."""
    if sys.modules.get("bitsandbytes") is None:
        return None
    from bitsandbytes.nn import Linear4bit, Linear8bitLt

    return Linear4bit, Linear8bitLt


def quantized_bits(module: nn.Module) -> Literal[4, 8] | None:
    """4 for a bitsandbytes ``Linear4bit``, 8 for a ``Linear8bitLt``, None for anything else."""
    classes = _bnb_classes()
    if classes is None:
        return None
    linear4bit, linear8bit = classes
    if isinstance(module, linear4bit):
        return 4
    if isinstance(module, linear8bit):
        return 8
    return None


def is_quantized_linear(module: nn.Module) -> bool:
    """Whether ``module`` is a bitsandbytes 4-bit or 8-bit linear (never imports bitsandbytes itself)."""
    return quantized_bits(module) is not None


def describe_quantized(module: nn.Module) -> str:
    """A short description for messages, e.g. ``"Linear4bit (nf4, storage torch.bfloat16)"``."""
    bits = quantized_bits(module)
    if bits == 4:
        quant_type = getattr(module.weight, "quant_type", "?")
        storage = getattr(module.weight, "quant_storage", module.weight.dtype)
        return f"{type(module).__name__} ({quant_type}, storage {storage})"
    if bits == 8:
        return f"{type(module).__name__} (int8)"
    return type(module).__name__


def adapter_dtype(module: nn.Module) -> torch.dtype | None:
    """Dtype for adapter tensors over a quantized linear; None when ``module`` is not quantized.

    A 4-bit layer computes in its ``compute_dtype`` (the run's precision, float32 when unset); an 8-bit
    layer's int8 product has no floating dtype of its own, so its adapters are float32.
    """
    bits = quantized_bits(module)
    if bits == 4:
        return getattr(module, "compute_dtype", None) or torch.float32
    if bits == 8:
        return torch.float32
    return None


def disable_cpu_inference_repacking(module: nn.Module) -> int:
    """Keep every bitsandbytes 4-bit layer in ``module`` in its trainable layout on CPU.

    bitsandbytes 0.49+ on AVX512-BF16 CPUs repacks a ``Linear4bit`` weight in place on the first eval-mode
    forward without gradients, rounding the block scales to bfloat16 and switching to a kernel without a
    backward: an evaluation followed by more training would leave every parameter below that layer without
    a gradient. Evaluation then runs the generic 4-bit kernel instead (a little slower on such CPUs).

    Returns:
        The number of layers changed (0 without bitsandbytes or without such layers).
    """
    classes = _bnb_classes()
    if classes is None:
        return 0
    changed = 0
    for layer in module.modules():
        if isinstance(layer, classes[0]) and getattr(layer, "support_avx512bf16_for_cpu", False):
            layer.support_avx512bf16_for_cpu = False
            changed += 1
    if changed:
        logger.debug("bitsandbytes CPU inference repacking disabled on %d 4-bit layers", changed)
    return changed


def _int8_row_scales(module: nn.Module) -> Tensor:
    """Row-wise absmax of an 8-bit layer: on the weight until the first forward, then on ``module.state``."""
    scb = getattr(module.weight, "SCB", None)
    if scb is None:
        scb = getattr(getattr(module, "state", None), "SCB", None)
    if scb is None:
        raise RuntimeError(
            f"dequantize_weight: {type(module).__name__} has no row scales (SCB); its weight was never "
            "quantized. Move the layer to its device (which quantizes it) before dequantizing"
        )
    return scb


@torch.no_grad()
def dequantize_weight(module: nn.Module) -> Tensor:
    """The dense ``d_out x d_in`` weight a quantized linear computes with, in :func:`adapter_dtype`.

    Args:
        module: a bitsandbytes ``Linear4bit`` or ``Linear8bitLt``.

    Returns:
        A new tensor on the layer's device (the layer is unchanged).

    Raises:
        TypeError: ``module`` is not a bitsandbytes quantized linear.
    """
    bits = quantized_bits(module)
    if bits is None:
        raise TypeError(
            f"dequantize_weight: expected a bitsandbytes Linear4bit or Linear8bitLt, got {type(module).__name__}; "
            "a plain nn.Linear's weight is already dense"
        )
    import bitsandbytes.functional as bnb_functional

    weight = module.weight
    if bits == 4 and getattr(weight.quant_state, "packing_format_for_cpu", False):
        module.state_dict()  # bitsandbytes restores the canonical 4-bit layout (in place) when saving
        weight = module.weight
    if bits == 4:
        dense = bnb_functional.dequantize_4bit(weight.data, weight.quant_state)
    else:
        dense = bnb_functional.int8_vectorwise_dequant(weight.data, _int8_row_scales(module))
    out_features, in_features = module.out_features, module.in_features
    return dense.reshape(out_features, in_features).to(adapter_dtype(module))


@torch.no_grad()
def dequantized_linear(module: nn.Module) -> nn.Linear:
    """A frozen floating ``nn.Linear`` equal to the quantized layer's effective weight and bias.

    Args:
        module: a bitsandbytes ``Linear4bit`` or ``Linear8bitLt``.

    Returns:
        A new ``nn.Linear`` in :func:`adapter_dtype` on the layer's device, ``requires_grad=False``.

    Raises:
        TypeError: ``module`` is not a bitsandbytes quantized linear.
    """
    weight = dequantize_weight(module)
    bias = getattr(module, "bias", None)
    linear = nn.Linear(
        module.in_features, module.out_features, bias=bias is not None, device=weight.device, dtype=weight.dtype
    )
    linear.weight.copy_(weight)
    if bias is not None:
        linear.bias.copy_(bias.to(weight.dtype))
    linear.requires_grad_(False)
    return linear


def resolve_quant_storage(quant_storage: str, model_dtype: torch.dtype) -> torch.dtype:
    """The torch dtype that stores packed 4-bit codes: ``"auto"`` means the model dtype.

    Raises:
        ValueError: ``quant_storage`` is not one of :data:`QUANT_STORAGES`.
    """
    if quant_storage == "auto":
        return model_dtype
    if quant_storage not in _STORAGE_DTYPES:
        raise ValueError(
            f"quant_storage must be one of {', '.join(QUANT_STORAGES)}, got {quant_storage!r}; "
            "'auto' (the model dtype) is what ZeRO-3 needs"
        )
    return _STORAGE_DTYPES[quant_storage]


def bitsandbytes_config(
    *,
    quantization: QuantizationMode,
    compute_dtype: torch.dtype,
    quant_storage: torch.dtype,
    double_quant: bool,
    skip_modules: Sequence[str],
) -> BitsAndBytesConfig | None:
    """transformers' ``BitsAndBytesConfig`` for ``quantization`` (None for ``"none"``).

    Building the config does not import bitsandbytes; loading a model with it does.

    Args:
        quantization: ``"nf4"`` / ``"fp4"`` (4-bit ``Linear4bit``), ``"int8"`` (LLM.int8 ``Linear8bitLt``)
            or ``"none"``.
        compute_dtype: dtype of the 4-bit layers' matmul (the run's precision).
        quant_storage: dtype holding the packed 4-bit codes (see :func:`resolve_quant_storage`).
        double_quant: also quantize the 4-bit block scales (about 0.4 bits per weight saved).
        skip_modules: module names (prefix or suffix match, transformers' rule) kept unquantized, such as
            the classification head.

    Raises:
        ValueError: unknown ``quantization``.
    """
    if quantization not in QUANTIZATION_MODES:
        raise ValueError(f"quantization must be one of {', '.join(QUANTIZATION_MODES)}, got {quantization!r}")
    if quantization == "none":
        return None
    install_log_notice()  # loading a model with this config imports bitsandbytes
    from transformers import BitsAndBytesConfig

    skip = list(skip_modules)
    if quantization == "int8":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quantization,
        bnb_4bit_compute_dtype=compute_dtype,
        bnb_4bit_use_double_quant=double_quant,
        bnb_4bit_quant_storage=quant_storage,
        llm_int8_skip_modules=skip,
    )


def _smoke_layer(
    bnb: Any, quantization: QuantizationMode, compute_dtype: torch.dtype, quant_storage: torch.dtype
) -> nn.Module:
    """A tiny quantizable layer built on CPU (quantized when moved to its device)."""
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(_SMOKE_FEATURES, _SMOKE_FEATURES, generator=generator) / _SMOKE_FEATURES**0.5
    if quantization == "int8":
        layer = bnb.nn.Linear8bitLt(_SMOKE_FEATURES, _SMOKE_FEATURES, bias=False, has_fp16_weights=False)
        layer.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
        return layer
    layer = bnb.nn.Linear4bit(
        _SMOKE_FEATURES, _SMOKE_FEATURES, bias=False, compute_dtype=compute_dtype,
        compress_statistics=True, quant_type=quantization, quant_storage=quant_storage,
    )
    layer.weight = bnb.nn.Params4bit(
        weight.to(compute_dtype), requires_grad=False, quant_type=quantization,
        quant_storage=quant_storage, compress_statistics=True,
    )
    return layer


def bitsandbytes_status(
    *,
    quantization: QuantizationMode,
    device_type: str,
    compute_dtype: torch.dtype = torch.float32,
    quant_storage: torch.dtype = torch.uint8,
) -> tuple[bool, str]:
    """Whether bitsandbytes imports and runs ``quantization`` on ``device_type``, and why not.

    Imports bitsandbytes and runs a 64 x 64 layer forward and backward on the device (milliseconds
    after the import, which takes a few seconds the first time).

    Args:
        quantization: ``"nf4"``, ``"fp4"`` or ``"int8"`` (``"none"`` is always fine).
        device_type: torch device type the model will live on (``"cpu"``, ``"cuda"``, ...).
        compute_dtype: 4-bit compute dtype (the run's precision); int8 ignores it.
        quant_storage: 4-bit storage dtype; int8 ignores it.

    Returns:
        ``(True, "bitsandbytes <version>")`` or ``(False, reason)``.
    """
    if quantization == "none":
        return True, "no quantization"
    install_log_notice()
    try:
        import bitsandbytes as bnb
    except Exception as error:  # ImportError, or a broken native library raising anything at import
        return False, f"bitsandbytes cannot be imported ({type(error).__name__}: {error})"
    version = getattr(bnb, "__version__", "?")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # LLM.int8's "inputs will be cast to float16" on every call
            layer = _smoke_layer(bnb, quantization, compute_dtype, quant_storage).to(torch.device(device_type))
            x = torch.randn(3, _SMOKE_FEATURES, device=device_type, dtype=compute_dtype, requires_grad=True)
            out = layer(x)
            out.float().sum().backward()
        if not bool(torch.isfinite(out).all()) or x.grad is None:
            return False, f"bitsandbytes {version} ran {quantization} on {device_type} but gave non-finite output"
    except Exception as error:  # any failure of the native kernels on this device counts as "cannot run"
        return False, (
            f"bitsandbytes {version} cannot run {quantization} with compute dtype "
            f"{str(compute_dtype).removeprefix('torch.')} on device {device_type!r} "
            f"({type(error).__name__}: {str(error).strip()[:300]})"
        )
    return True, f"bitsandbytes {version}"
