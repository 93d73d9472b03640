"""Save and load the trained part of a MuScleLoRA model (arXiv 2402.12026).

What a run changes relative to the pretrained checkpoint is: the trainable tensors (LoRA ``A``/``B``,
MSLR ``L``/``R``, or everything under full fine-tuning) and the classification head, which is randomly
initialised and, under the authors' recipe, frozen at that random value (its base weights inside an
MSLR wrapper included). Both are needed to reproduce the model, so both are saved.

An adapter directory holds:

- ``adapter.safetensors``: those tensors keyed by ``model.named_parameters()`` names;
- ``adapter_config.json``: ``format``, ``version``, the caller's ``meta``, ``head_names``,
  ``all_parameters`` (full fine-tuning), ``structure`` (LoRA r/alpha/targets per peft adapter, MSLR
  rank/alpha/scales/keep_base per wrapped layer) and ``tensors`` ({name: shape, dtype, trainable});
- ``peft/`` (only for a ``peft.PeftModel``): peft's own export of the LoRA part, loadable with
  ``peft.PeftModel.from_pretrained(base_model, directory / "peft")``.

Files are written atomically (temporary file in the same directory, fsync, ``os.replace``).
Loading is strict, unlike the authors' ``strict=False``: every tensor in the file must exist in the
model with the same shape, file and JSON must agree, the model's LoRA/MSLR structure must equal the
saved one, and every adapter and head parameter of the model (for a full save: every parameter)
must be in the file. Weights are never pickled.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline.checkpoint import atomic_write_text, replace_directory, save_tensors
from pipeline.adapters.inject import adapter_parameters, trainable_parameters
from pipeline.adapters.mslr import MultiScaleLowRankLinear

logger = logging.getLogger(__name__)

WEIGHTS_NAME = "adapter.safetensors"
CONFIG_NAME = "adapter_config.json"
PEFT_DIR = "peft"
FORMAT = "musclelora-adapter"
VERSION = 1


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _is_peft_model(model: nn.Module) -> bool:
    from peft import PeftModel

    return isinstance(model, PeftModel)


def _inner(model: nn.Module) -> nn.Module:
    return model.get_base_model() if _is_peft_model(model) else model


def _detect_head_names(model: nn.Module) -> list[str]:
    """Head module names of a classifier built by ``pipeline.modeling.load_classifier``."""
    from pipeline.modeling import LlmClassificationHead, head_module_names

    inner = _inner(model)
    config = getattr(inner, "config", None)
    if config is None:
        raise ValueError(
            f"cannot tell the classification head of {type(inner).__name__} (no transformers config); "
            "pass head_names to save_adapter"
        )
    is_decoder = isinstance(getattr(inner, "score", None), LlmClassificationHead)
    return head_module_names(config.model_type, is_decoder)


def _head_parameter_names(model: nn.Module, head_names: Sequence[str], where: str) -> list[str]:
    """Names (in ``model.named_parameters()``) of all parameters under the head modules."""
    inner = _inner(model)
    ids: set[int] = set()
    for head in head_names:
        try:
            module = inner.get_submodule(head)
        except AttributeError as error:
            raise ValueError(
                f"{where}: head module {head!r} does not exist in {type(inner).__name__}; "
                "build the model the same way as the saved run"
            ) from error
        ids.update(id(parameter) for parameter in module.parameters())
    return [name for name, parameter in model.named_parameters() if id(parameter) in ids]


def _structure(model: nn.Module) -> dict[str, Any]:
    """LoRA and MSLR hyper-parameters that shapes alone do not pin down."""
    lora: dict[str, Any] = {}
    if _is_peft_model(model):
        for adapter, config in model.peft_config.items():
            if not hasattr(config, "target_modules"):  # soft prompt: shapes pin it down
                lora[adapter] = {"peft_type": str(config.peft_type), "num_virtual_tokens": config.num_virtual_tokens}
                continue
            targets = config.target_modules
            targets = sorted(targets) if isinstance(targets, (set, list, tuple)) else targets
            lora[adapter] = {"r": config.r, "lora_alpha": config.lora_alpha, "target_modules": targets}
    mslr = {
        name: {
            "rank": module.rank,
            "alpha": module.alpha,
            "scales": [float(k) for k in module.scales.tolist()],
            "keep_base": module.keep_base,
        }
        for name, module in model.named_modules()
        if isinstance(module, MultiScaleLowRankLinear)
    }
    return {"lora": lora, "mslr": mslr}


def _export_peft(model: nn.Module, directory: Path) -> None:
    """Write peft's export into ``directory/peft``, replacing an older one only once complete."""
    staging = Path(tempfile.mkdtemp(dir=directory, prefix=f".{PEFT_DIR}."))
    target = directory / PEFT_DIR
    try:
        model.save_pretrained(staging, safe_serialization=True)
        replace_directory(staging, target)
    finally:
        if staging.exists():
            shutil.rmtree(staging)


def adapter_tensor_names(model: nn.Module, head_names: Sequence[str] | None = None) -> list[str]:
    """Names of the tensors :func:`save_adapter` writes: trainable parameters and the head's.

    Args:
        model: the model as built for training.
        head_names: classification-head module names; default detected from the model.
    """
    trainable = trainable_parameters(model)
    heads = list(head_names) if head_names is not None else _detect_head_names(model)
    head_parameters = set(_head_parameter_names(model, heads, "save_adapter"))
    return [name for name, _ in model.named_parameters() if name in trainable or name in head_parameters]


def save_adapter(
    model: nn.Module,
    directory: str | Path,
    *,
    meta: Mapping[str, Any],
    head_names: Sequence[str] | None = None,
) -> None:
    """Write the trainable and head tensors of ``model`` and a JSON description into ``directory``.

    Args:
        model: the trained model (transformers model, possibly in a ``PeftModel``, with MSLR layers).
        directory: output directory; created if missing, existing adapter files are replaced.
        meta: JSON-serialisable run description stored under ``"meta"`` (method, seed, ...).
        head_names: classification-head module names relative to the transformers model; default
            detected from the model (``pipeline.modeling.head_module_names``).

    Raises:
        ValueError: ``model`` has no trainable parameters, or its head cannot be found.
        TypeError: ``meta`` is not JSON-serialisable.
    """
    directory = Path(directory)
    trainable = trainable_parameters(model)
    if not trainable:
        raise ValueError(
            f"model has no trainable parameters to save into {str(directory)!r}; call set_trainable first"
        )
    heads = list(head_names) if head_names is not None else _detect_head_names(model)
    selected = adapter_tensor_names(model, heads)
    all_parameters = dict(model.named_parameters())
    empty = [name for name in selected if all_parameters[name].numel() == 0]
    if empty:
        raise ValueError(
            f"refusing to save {len(empty)} empty tensors into {str(directory)!r} (e.g. {empty[:3]}): they are "
            "partitioned across ranks (DeepSpeed ZeRO-3) and hold no data on this rank; save inside "
            "pipeline.distributed.Engine.gathered(...) so the full tensors are present"
        )
    tensors = {name: all_parameters[name].detach().to("cpu").contiguous() for name in selected}
    config = {
        "format": FORMAT,
        "version": VERSION,
        "meta": dict(meta),
        "head_names": heads,
        "all_parameters": set(tensors) == set(all_parameters),
        "structure": _structure(model),
        "tensors": {
            name: {"shape": list(tensor.shape), "dtype": _dtype_name(tensor.dtype), "trainable": name in trainable}
            for name, tensor in tensors.items()
        },
    }
    try:
        text = json.dumps(config, indent=2)
    except TypeError as error:
        raise TypeError(f"adapter meta for {str(directory)!r} is not JSON-serialisable: {error}") from error

    directory.mkdir(parents=True, exist_ok=True)
    save_tensors(directory / WEIGHTS_NAME, tensors, metadata={"format": "pt"})
    atomic_write_text(directory / CONFIG_NAME, text + "\n")
    if _is_peft_model(model):
        _export_peft(model, directory)
    logger.info(
        "saved %d tensors (%d trainable) to %s", len(tensors), sum(name in trainable for name in tensors), directory
    )


def _read_config(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"adapter config {str(path)!r} does not exist; save it with save_adapter")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"adapter config {str(path)!r} is not valid JSON: {error}") from error
    required = {"tensors": dict, "head_names": list, "structure": dict}
    if (
        not isinstance(config, dict)
        or config.get("format") != FORMAT
        or not all(isinstance(config.get(key), kind) for key, kind in required.items())
    ):
        raise ValueError(
            f"adapter config {str(path)!r} is not a {FORMAT} config (needs 'format': {FORMAT!r} and "
            f"the keys {sorted(required)}); it was not written by save_adapter"
        )
    if config.get("version") != VERSION:
        raise ValueError(
            f"adapter config {str(path)!r} has version {config.get('version')!r}; this code reads {VERSION}"
        )
    return config


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    if not path.is_file():
        raise FileNotFoundError(f"adapter weights {str(path)!r} do not exist; save them with save_adapter")
    try:
        return load_file(str(path), device="cpu")
    except Exception as error:
        raise ValueError(f"adapter weights {str(path)!r} are not a readable safetensors file: {error}") from error


def _limited(names: Sequence[str], count: int = 10) -> str:
    shown = ", ".join(names[:count])
    return shown + (f" ... ({len(names)} in all)" if len(names) > count else "")


def _structure_differences(saved: dict, built: dict) -> list[str]:
    differences = []
    for kind in ("lora", "mslr"):
        saved_kind, built_kind = saved.get(kind, {}), built.get(kind, {})
        for name in sorted(set(saved_kind) | set(built_kind)):
            if saved_kind.get(name) != built_kind.get(name):
                differences.append(f"{kind} {name}: saved {saved_kind.get(name)}, model {built_kind.get(name)}")
    return differences


def load_adapter(model: nn.Module, directory: str | Path) -> list[str]:
    """Load tensors saved by ``save_adapter`` into ``model`` with strict checks.

    ``model`` must be built the same way as the saved one (same LoRA targets, r and alpha; same MSLR
    layers, rank, alpha and scales). Values are cast to each parameter's dtype and device.

    Args:
        model: the freshly built model to load into.
        directory: a directory written by ``save_adapter``.

    Returns:
        The names of the loaded parameters.

    Raises:
        FileNotFoundError: the weights or the config file is missing.
        ValueError: unreadable files, a different adapter structure, or missing, unexpected or
            shape-mismatched keys (all listed at once).
    """
    directory = Path(directory)
    weights_path = directory / WEIGHTS_NAME
    config = _read_config(directory / CONFIG_NAME)
    tensors = _read_tensors(weights_path)
    listed = config["tensors"]

    problems: list[str] = []
    not_in_file = sorted(set(listed) - set(tensors))
    if not_in_file:
        problems.append(f"listed in {CONFIG_NAME} but missing from {WEIGHTS_NAME}: {_limited(not_in_file)}")
    not_listed = sorted(set(tensors) - set(listed))
    if not_listed:
        problems.append(f"in {WEIGHTS_NAME} but not listed in {CONFIG_NAME}: {_limited(not_listed)}")
    disagree = [
        f"{name} (file {list(tensor.shape)} {_dtype_name(tensor.dtype)}, "
        f"json {listed[name].get('shape')} {listed[name].get('dtype')})"
        for name, tensor in tensors.items()
        if name in listed
        and (list(tensor.shape) != listed[name].get("shape") or _dtype_name(tensor.dtype) != listed[name].get("dtype"))
    ]
    if disagree:
        problems.append(f"{WEIGHTS_NAME} and {CONFIG_NAME} disagree on {_limited(disagree)}")

    differences = _structure_differences(config["structure"], _structure(model))
    if differences:
        problems.append(f"adapter structure differs: {_limited(differences)}")
    parameters = dict(model.named_parameters())
    unexpected = sorted(set(tensors) - set(parameters))
    if unexpected:
        problems.append(f"unexpected keys (not parameters of the model): {_limited(unexpected)}")
    mismatched = [
        f"{name} (file {list(tensor.shape)}, model {list(parameters[name].shape)})"
        for name, tensor in tensors.items()
        if name in parameters and tensor.shape != parameters[name].shape
    ]
    if mismatched:
        problems.append(f"shape mismatches: {_limited(mismatched)}")
    if config.get("all_parameters"):
        required = list(parameters)
    else:
        try:
            heads = _head_parameter_names(model, config["head_names"], "load_adapter")
        except ValueError as error:
            heads = []
            problems.append(str(error))
        required = list(dict.fromkeys([*adapter_parameters(model), *heads]))
    missing = [name for name in required if name not in tensors]
    if missing:
        problems.append(f"missing keys (model parameters absent from the file): {_limited(missing)}")
    if problems:
        raise ValueError(
            f"cannot load adapter {str(weights_path)!r} into {type(model).__name__}: "
            + "; ".join(problems)
            + ". Build the model with the same adapters (LoRA targets, MSLR targets) as the saved run."
        )

    with torch.no_grad():
        for name, tensor in tensors.items():
            parameter = parameters[name]
            parameter.copy_(tensor.to(device=parameter.device, dtype=parameter.dtype))
    logger.info("loaded %d tensors from %s", len(tensors), weights_path)
    return list(tensors)
