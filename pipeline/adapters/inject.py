"""Put MuScleLoRA's adapters into a model and choose what trains (arXiv 2402.12026).

LoRA (via peft) on the attention query/value projections: ``h = W0 x + (alpha / r) B A x`` with
``A`` r x d_in, ``B`` d_out x r, ``W0`` frozen.

MSLR (``MultiScaleLowRankLinear``) on layers picked by regex:
``h = W0 x + b0 + (alpha / r) R diag(K) L x`` with only ``L`` and ``R`` trainable.

Trainable sets (authors' recipe): full fine-tuning trains everything; with adapters only LoRA's
``lora_A``/``lora_B`` and MSLR's ``lora_a``/``lora_b`` train, and the classification head stays at
its initial value unless ``train_head`` is set. A head layer wrapped by MSLR keeps its base weights
frozen either way: MSLR's ``L`` and ``R`` are the only trainable parameters there.

Module names given to ``inject_mslr`` and ``set_trainable`` are relative to the transformers model,
also when it sits inside a ``peft.PeftModel`` (whose own names carry a ``base_model.model.`` prefix).
Parameter names returned are those of ``model.named_parameters()`` for the object passed in.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence

from torch import nn

from pipeline.adapters.bottleneck import BottleneckAdapter
from pipeline.adapters.mslr import MultiScaleLowRankLinear
from pipeline.adapters.prefix import PrefixKeyValues

logger = logging.getLogger(__name__)

_HINT_COUNT = 12


def _underlying_model(model: nn.Module) -> nn.Module:
    """The transformers model inside a ``PeftModel``, or ``model`` itself."""
    from peft import PeftModel

    if isinstance(model, PeftModel):
        return model.get_base_model()
    return model


def _is_lora_layer(module: nn.Module) -> bool:
    from peft.tuners.lora import LoraLayer

    return isinstance(module, LoraLayer)


def _is_conv1d(module: nn.Module) -> bool:
    from transformers.pytorch_utils import Conv1D

    return isinstance(module, Conv1D)


def _is_linear_like(module: nn.Module) -> bool:
    """``nn.Linear`` and its subclasses (bitsandbytes' 4/8-bit linears are ``nn.Linear``s)."""
    return isinstance(module, nn.Linear)


def _linear_names(model: nn.Module) -> list[str]:
    return [name for name, module in model.named_modules() if _is_linear_like(module) or _is_conv1d(module)]


def _hint(model: nn.Module) -> str:
    names = _linear_names(model)
    shown = ", ".join(names[:_HINT_COUNT])
    more = f" ... ({len(names)} in all)" if len(names) > _HINT_COUNT else ""
    return f"linear layers in this model include: {shown}{more}"


def apply_lora(model: nn.Module, *, target_modules: Sequence[str], r: int, alpha: float, dropout: float):
    """Wrap ``target_modules`` with peft LoRA; nothing but LoRA's own parameters is made trainable.

    ``task_type`` is left unset on purpose: peft's ``SEQ_CLS`` would add the classifier to
    ``modules_to_save`` and train it, while the authors keep the head frozen under LoRA. GPT-2's
    ``Conv1D`` layers (weights stored d_in x d_out) get ``fan_in_fan_out=True``.

    Args:
        model: a transformers model.
        target_modules: peft target module names (suffixes such as ``"q_proj"``).
        r: LoRA rank.
        alpha: LoRA alpha (scaling ``alpha / r``).
        dropout: LoRA dropout probability on the adapter input.

    Returns:
        The ``peft.PeftModel`` wrapping ``model`` (which is modified in place).

    Raises:
        ValueError: a target module matches no layer, or ``r`` / ``dropout`` is out of range.
    """
    from peft import LoraConfig, get_peft_model

    if r < 1:
        raise ValueError(f"LoRA rank r must be >= 1, got {r}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"LoRA dropout must be in [0, 1), got {dropout}")
    targets = list(target_modules)
    if not targets:
        raise ValueError("apply_lora needs at least one target module name; got an empty list")
    matched: dict[str, list[nn.Module]] = {target: [] for target in targets}
    for name, module in model.named_modules():
        for target in targets:
            if name == target or name.endswith(f".{target}"):
                matched[target].append(module)
    unmatched = [target for target, modules in matched.items() if not modules]
    if unmatched:
        raise ValueError(f"LoRA target modules {unmatched} match no module of {type(model).__name__}; {_hint(model)}")
    conv1d = [module for modules in matched.values() for module in modules if _is_conv1d(module)]
    config = LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=targets,
        bias="none",
        fan_in_fan_out=bool(conv1d),
        task_type=None,
    )
    peft_model = get_peft_model(model, config)
    logger.info("LoRA r=%d alpha=%s on %s (%d layers)", r, alpha, targets, sum(map(len, matched.values())))
    return peft_model


def apply_prompt_tuning(model: nn.Module, *, num_virtual_tokens: int) -> nn.Module:
    """Prepend ``num_virtual_tokens`` trainable input embeddings (peft PromptTuning, random init).

    peft's ``SEQ_CLS`` task wraps the classification head in a ``modules_to_save`` copy; whether the
    head trains is decided afterwards by :func:`set_trainable`, as for LoRA. Prefix tuning proper is
    :mod:`pipeline.adapters.prefix` (peft's ``PrefixTuningConfig`` goes through ``past_key_values``, which
    transformers 5's sequence classifiers no longer accept).

    Returns:
        The ``peft.PeftModel``.
    """
    from peft import PromptTuningConfig, get_peft_model

    if num_virtual_tokens < 1:
        raise ValueError(f"num_virtual_tokens must be >= 1, got {num_virtual_tokens}")
    peft_model = get_peft_model(model, PromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=num_virtual_tokens))
    logger.info("soft prompt of %d virtual tokens", num_virtual_tokens)
    return peft_model


def inject_mslr(
    model: nn.Module,
    *,
    targets: Sequence[str],
    rank: int,
    scales: Sequence[float],
    alpha: float,
    dropout: float,
    init: str,
    keep_base: bool,
) -> list[str]:
    """Replace every module whose name full-matches a regex in ``targets`` by an MSLR layer.

    Args:
        model: a transformers model or a ``PeftModel`` around one (matched on the inner names).
        targets: regular expressions, each full-matched against module names.
        rank: inner rank r of each scale branch.
        scales: the scales k_1..k_B.
        alpha: MSLR alpha (scaling ``alpha / rank``).
        dropout: dropout on the adapter input.
        init: ``"kaiming"`` (authors) or ``"zero"`` (zero ``R``, delta 0 at start).
        keep_base: keep ``W0 x + b0`` (every published setting); False drops it.

    Returns:
        The wrapped module names, relative to the transformers model.

    Raises:
        ValueError: a pattern is not a valid regex or matches no module; a match is not a linear
            layer, is already a LoRA or MSLR layer, or lies inside one.
    """
    inner = _underlying_model(model)
    patterns = list(targets)
    if not patterns:
        raise ValueError("inject_mslr needs at least one target pattern; got an empty list")
    compiled = []
    for pattern in patterns:
        try:
            compiled.append(re.compile(pattern))
        except re.error as error:
            raise ValueError(f"MSLR target '{pattern}' is not a valid regular expression: {error}") from error

    modules = dict(inner.named_modules())
    adapter_names = [
        name
        for name, module in modules.items()
        if _is_lora_layer(module) or isinstance(module, MultiScaleLowRankLinear)
    ]
    chosen: list[str] = []
    for pattern, regex in zip(patterns, compiled):
        names = [name for name in modules if name and regex.fullmatch(name)]
        if not names:
            raise ValueError(f"MSLR target '{pattern}' matches no module name (full match); {_hint(inner)}")
        for name in names:
            module = modules[name]
            if _is_lora_layer(module):
                raise ValueError(
                    f"MSLR target '{pattern}' matches {name!r}, which is already a LoRA layer; "
                    "remove it from the LoRA target modules or from the MSLR targets"
                )
            if isinstance(module, MultiScaleLowRankLinear):
                raise ValueError(f"MSLR target '{pattern}' matches {name!r}, which is already an MSLR layer")
            owner = next((adapter for adapter in adapter_names if name.startswith(f"{adapter}.")), None)
            if owner is not None:
                raise ValueError(
                    f"MSLR target '{pattern}' matches {name!r}, which lies inside the adapter layer "
                    f"{owner!r}; target the layer itself, not its parts"
                )
            if not _is_linear_like(module):
                raise ValueError(
                    f"MSLR target '{pattern}' matches {name!r}, a {type(module).__name__}, not a linear "
                    f"layer; MSLR wraps nn.Linear layers only. {_hint(inner)}"
                )
            if name not in chosen:
                chosen.append(name)

    for name in chosen:
        parent_name, _, child_name = name.rpartition(".")
        parent = inner.get_submodule(parent_name) if parent_name else inner
        wrapped = MultiScaleLowRankLinear(
            modules[name],
            rank=rank,
            scales=tuple(scales),
            alpha=alpha,
            dropout=dropout,
            init=init,
            keep_base=keep_base,
        )
        setattr(parent, child_name, wrapped)
    logger.info("MSLR rank=%d alpha=%s scales=%s on %s", rank, alpha, list(scales), chosen)
    return chosen


def _adapter_parameter_ids(model: nn.Module) -> set[int]:
    """ids of LoRA (peft), soft-prompt (peft), MSLR, bottleneck-adapter and prefix parameters."""
    ids: set[int] = set()
    prompt_encoder = getattr(model, "prompt_encoder", None)
    if isinstance(prompt_encoder, nn.Module):
        ids.update(id(parameter) for parameter in prompt_encoder.parameters())
    for module in model.modules():
        if _is_lora_layer(module):
            for layer_name in module.adapter_layer_names:
                container = getattr(module, layer_name, None)
                if isinstance(container, nn.Module):
                    ids.update(id(parameter) for parameter in container.parameters())
        elif isinstance(module, MultiScaleLowRankLinear):
            ids.update({id(module.lora_a), id(module.lora_b)})
        elif isinstance(module, BottleneckAdapter):
            ids.update(id(parameter) for sub in (module.down, module.up) for parameter in sub.parameters())
        elif isinstance(module, PrefixKeyValues):
            ids.update({id(module.key), id(module.value)})
    return ids


def _wrapped_base_parameter_ids(model: nn.Module) -> set[int]:
    """ids of the parameters a trained head must leave frozen: base layers inside LoRA and MSLR layers, and
    the unused original of a head that peft's ``modules_to_save`` copies (its ``SEQ_CLS`` task does)."""
    ids: set[int] = set()
    for module in model.modules():
        if isinstance(module, (MultiScaleLowRankLinear, BottleneckAdapter)):
            ids.update(id(parameter) for parameter in module.base_layer.parameters())
        elif _is_lora_layer(module):
            ids.update(id(parameter) for parameter in module.get_base_layer().parameters())
        elif isinstance(getattr(module, "original_module", None), nn.Module) and hasattr(module, "modules_to_save"):
            ids.update(id(parameter) for parameter in module.original_module.parameters())
    return ids


def set_trainable(model: nn.Module, *, full: bool, train_head: bool, head_names: Sequence[str]) -> list[str]:
    """Set ``requires_grad`` for full fine-tuning or adapter training and return the trainable names.

    Args:
        model: a transformers model, possibly inside a ``PeftModel`` and/or with MSLR layers.
        full: True trains every parameter (vanilla and GA baselines; MSLR parameters included) and
            ignores ``train_head``, as the authors' full fine-tuning trains the head. False trains
            only the LoRA and MSLR parameters, plus the head if ``train_head``.
        train_head: under adapters, also train the head modules, except base weights of head
            layers wrapped by MSLR or LoRA (only the adapter trains there) and the unused original of a
            head that peft copies into ``modules_to_save`` (soft prompts).
        head_names: head module names relative to the transformers model
            (``pipeline.modeling.head_module_names``).

    Returns:
        Names (as in ``model.named_parameters()``) of the trainable parameters.

    Raises:
        ValueError: adapter mode finds no adapter parameters, or a head name names no module.
    """
    inner = _underlying_model(model)
    heads = list(head_names)
    head_modules = []
    for head in heads:
        try:
            head_modules.append(inner.get_submodule(head))
        except AttributeError as error:
            children = [name for name, _ in inner.named_children()]
            raise ValueError(
                f"head module {head!r} does not exist in {type(inner).__name__}; top-level modules are {children}"
            ) from error

    if full:
        for parameter in model.parameters():
            parameter.requires_grad_(True)
    else:
        adapter_ids = _adapter_parameter_ids(model)
        if not adapter_ids:
            raise ValueError(
                "set_trainable(full=False) found no LoRA, MSLR or bottleneck-adapter parameters; call apply_lora, "
                "inject_mslr, inject_bottleneck or apply_prompt_tuning first, or use full=True for full fine-tuning"
            )
        head_ids: set[int] = set()
        if train_head:
            frozen_bases = _wrapped_base_parameter_ids(model)
            head_ids = {
                id(parameter)
                for module in head_modules
                for parameter in module.parameters()
                if id(parameter) not in frozen_bases
            }
        for parameter in model.parameters():
            parameter.requires_grad_(id(parameter) in adapter_ids or id(parameter) in head_ids)
    trainable = trainable_parameters(model)
    total = sum(parameter.numel() for parameter in model.parameters())
    count = sum(parameter.numel() for parameter in trainable.values())
    share = 100.0 * count / max(total, 1)
    logger.info("trainable: %d of %d parameters (%.4f%%) in %d tensors", count, total, share, len(trainable))
    return list(trainable)


def adapter_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Name-keyed LoRA (peft ``lora_A``/``lora_B``...) and MSLR (``lora_a``/``lora_b``) parameters."""
    ids = _adapter_parameter_ids(model)
    return {name: parameter for name, parameter in model.named_parameters() if id(parameter) in ids}


def trainable_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Name-keyed trainable parameters, in ``model.named_parameters()`` order."""
    return {name: parameter for name, parameter in model.named_parameters() if parameter.requires_grad}
