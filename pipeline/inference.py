"""Rebuild a finished run's model and re-evaluate it (MuScleLoRA, Wu et al., ACL 2024, arXiv 2402.12026).

A finished run directory (the ``output_dir`` of :func:`pipeline.training.run_training`) holds::

    config.yaml    the resolved run config (written when the run starts)
    adapter/       save_adapter output: trainable tensors + classification head
                   (full fine-tuning, e.g. ``vanilla``: every parameter of the model)
    metrics.json   the final evaluation (written last)

:func:`load_run` rebuilds the classifier the way training built it: the same seed right before
:func:`pipeline.training.build_model`, then a strict :func:`pipeline.adapters.state.load_adapter`.

:func:`evaluate_run` measures one or more split pairs (clean, poison), with t the run's target label::

    CACC       = mean_{i in clean} [y_hat_i = y_i]
    ASR        = mean_{i in poison} [y_hat_i = t]
    clean FPR  = mean_{i in clean, y_i != t} [y_hat_i = t]
    confusion[y][y_hat] = #{i in clean : y_i = y, y_hat_i = y_hat};  per-class accuracy = diagonal / row sum

Pairs: ``test`` = (test-clean, test-poison); ``dev`` = (the selection rows of dev-clean, i.e. dev-clean
minus the run's reference rows, and dev-poison). Every split is subsampled with the run's
``max_eval_samples`` and seed, tokenised with its ``max_length`` and batched in file order with its
``eval_batch_size``, as in training. So on the same kind of device the predictions equal those of the
run and the ``test`` CACC / ASR equal ``metrics.json`` exactly; the ``dev`` clean accuracy equals its
``dev_clean_acc`` (the best epoch's, whose weights were saved). Another batch size pads batches
differently, which can move logits by rounding error. Percentages as in ``metrics.json``.

A run directory is data (users download and share them): rebuilding one never runs code shipped with
a model. A saved ``model.trust_remote_code: true`` is refused unless the caller passes
``trust_remote_code=True`` (the launchers' ``--trust-remote-code``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, get_args

import torch
import yaml
from torch import nn
from torch.utils.data import DataLoader

from pipeline import data as data_lib
from pipeline import evaluate as ev
from pipeline import modeling
from pipeline.adapters import base_layers
from pipeline.adapters.state import CONFIG_NAME, WEIGHTS_NAME, load_adapter
from pipeline.checkpoint import COMPLETE_MARKER
from pipeline.config import RunConfig, config_from_dict, resolve_defaults
from pipeline.training import build_model

logger = logging.getLogger(__name__)

SplitName = Literal["test", "dev"]
SPLITS: tuple[str, ...] = get_args(SplitName)
CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.json"
ADAPTER_DIR = "adapter"
_LAST_CHECKPOINT = Path("checkpoints") / "last"
"""Where run_training keeps its resumable checkpoint, relative to the run directory."""


class EvaluationError(ValueError):
    """Bad evaluation arguments (split name, sample count, batch size, device)."""


class RunDirError(EvaluationError):
    """A run directory is missing, unfinished, or does not rebuild into the model it saved."""


@dataclasses.dataclass(frozen=True)
class RunFiles:
    """The files of a finished run directory, every one checked to exist."""

    run_dir: Path
    config: Path
    adapter: Path
    metrics: Path


def finished_run_files(run_dir: str | Path) -> RunFiles:
    """Check that ``run_dir`` is a finished run and return its files.

    Args:
        run_dir: The ``output_dir`` of a ``launch/train.py`` run.

    Returns:
        Paths of ``config.yaml``, ``adapter/`` and ``metrics.json``.

    Raises:
        RunDirError: The directory does not exist, is not a run directory, or the run has not
            finished; the message names the missing files and whether the run can be resumed.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RunDirError(
            f"run directory {str(run_dir)!r} does not exist or is not a directory; pass the output_dir "
            "of a launch/train.py run"
        )
    files = RunFiles(
        run_dir=run_dir,
        config=run_dir / CONFIG_FILE,
        adapter=run_dir / ADAPTER_DIR,
        metrics=run_dir / METRICS_FILE,
    )
    if not files.config.is_file():
        contents = ", ".join(sorted(p.name for p in run_dir.iterdir())) or "(empty)"
        raise RunDirError(
            f"{files.config} is missing, so {run_dir} is not a run directory (launch/train.py writes "
            f"{CONFIG_FILE} when a run starts); it contains: {contents}"
        )
    needed = (files.adapter / WEIGHTS_NAME, files.adapter / CONFIG_NAME, files.metrics)
    missing = [str(path) for path in needed if not path.is_file()]
    if missing and files.metrics.is_file():
        raise RunDirError(
            f"{run_dir} has {METRICS_FILE} but its saved model is incomplete: missing {', '.join(missing)} "
            "(deleted, or written by an older save_adapter without its JSON config); train the run again "
            f"with python launch/train.py --config {files.config} overwrite=true"
        )
    if missing:
        last = run_dir / _LAST_CHECKPOINT
        if (last / COMPLETE_MARKER).exists():
            how = (
                f"if it was interrupted, resume it from {last} with: "
                f"python launch/train.py --config {files.config} resume=true"
            )
        else:
            how = (
                "it has no complete checkpoint to resume from yet; wait for it, or start it again with "
                f"python launch/train.py --config {files.config} overwrite=true"
            )
        raise RunDirError(
            f"{run_dir} is not a finished run: missing {', '.join(missing)}. Training writes adapter/ and "
            f"{METRICS_FILE} at its very end, so the run may still be in progress or was interrupted; {how}"
        )
    return files


def read_run_config(path: str | Path) -> RunConfig:
    """Read a run's saved ``config.yaml`` into a :class:`RunConfig`.

    Raises:
        RunDirError: The file is not valid YAML.
        ConfigError: The values are not a valid run configuration (each problem named).
    """
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        raise RunDirError(f"{path} is not valid YAML: {error}") from error
    return config_from_dict(raw if raw is not None else {}, source=str(path))


def check_remote_code(cfg: RunConfig, config_path: Path, *, trust_remote_code: bool) -> None:
    """Refuse a saved ``model.trust_remote_code: true`` unless the user allowed it on the command line.

    Raises:
        RunDirError: The saved config asks to run the model's own Python code and ``trust_remote_code``
            is False.
    """
    if cfg.model.trust_remote_code and not trust_remote_code:
        raise RunDirError(
            f"{config_path}: model.trust_remote_code=true would run Python code shipped with the model "
            f"{cfg.model.name_or_path!r}; a run folder is data, so rebuilding it runs no code unless you pass "
            "--trust-remote-code (only for a folder and model you trust)"
        )


def _resolved_config(files: RunFiles, *, trust_remote_code: bool = False) -> tuple[RunConfig, modeling.ModelInfo, Path]:
    """The saved config with per-family defaults filled (a no-op for a saved one), model info and path."""
    cfg = read_run_config(files.config)
    check_remote_code(cfg, files.config, trust_remote_code=trust_remote_code)
    try:
        model_path = modeling.resolve_model_path(cfg.model.name_or_path)
    except (FileNotFoundError, ModuleNotFoundError) as error:
        raise RunDirError(f"{files.config}: model.name_or_path={cfg.model.name_or_path!r}: {error}") from error
    info = modeling.read_model_info(model_path, trust_remote_code=cfg.model.trust_remote_code)
    cfg = resolve_defaults(cfg, model_type=info.model_type, hidden_size=info.hidden_size, is_decoder=info.is_decoder)
    return cfg, info, model_path


def _rebuild(
    cfg: RunConfig, info: modeling.ModelInfo, model_path: Path, adapter_dir: Path, device: torch.device
) -> tuple[Any, nn.Module]:
    """Build the model as run_training did and load the saved adapter (strict keys)."""
    base_layers.install_log_notice()  # before build_model imports peft (and with it bitsandbytes)
    # run_training seeds right before build_model; forking keeps the caller's RNG state untouched.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        tokenizer, model, _ = build_model(cfg, info, model_path, device)
    try:
        load_adapter(model, adapter_dir)
    except (ValueError, FileNotFoundError) as error:
        raise RunDirError(
            f"the adapter in {adapter_dir} does not fit the model that {adapter_dir.parent / CONFIG_FILE} "
            f"builds (method={cfg.method}, model={cfg.model.name_or_path}): {error}"
        ) from error
    if cfg.model.quantization == "none":  # quantized bases are placed by their loader
        model.to(device)
    model.eval()
    return tokenizer, model


def resolve_device(device: torch.device | str) -> torch.device:
    """``"auto"`` (CUDA when visible, else CPU), ``"cpu"``, ``"cuda"``, ``"cuda:1"`` or a torch device.

    Raises:
        EvaluationError: A CUDA device was asked for but none is visible, or the name is unknown.
    """
    if isinstance(device, torch.device):
        chosen = device
    elif device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        try:
            chosen = torch.device(device)
        except (RuntimeError, TypeError) as error:
            raise EvaluationError(f"device {device!r} is not a device name; use auto, cpu, cuda or cuda:N") from error
    if chosen.type == "cuda" and not torch.cuda.is_available():
        raise EvaluationError(f"device {str(chosen)!r} requested but no CUDA device is visible; use cpu or auto")
    return chosen


def load_run(
    run_dir: str | Path, device: torch.device | str = "auto", *, trust_remote_code: bool = False
) -> tuple[RunConfig, Any, nn.Module]:
    """Rebuild a finished run's trained classifier from its saved config and adapter.

    Args:
        run_dir: The ``output_dir`` of a finished ``launch/train.py`` run.
        device: Where the model goes (``"auto"``, ``"cpu"``, ``"cuda"``, or a torch device).
        trust_remote_code: Allow a saved ``model.trust_remote_code: true`` (runs the model's own code).

    Returns:
        (the resolved run config, the tokenizer, the model in eval mode on ``device``).

    Raises:
        RunDirError: Not a finished run, the model directory is gone, or the adapter does not fit.
        ConfigError: The saved config is not valid for this version of the code.
    """
    base_layers.install_log_notice()
    files = finished_run_files(run_dir)
    cfg, info, model_path = _resolved_config(files, trust_remote_code=trust_remote_code)
    chosen = resolve_device(device)
    tokenizer, model = _rebuild(cfg, info, model_path, files.adapter, chosen)
    logger.info("rebuilt method=%s model=%s from %s on %s", cfg.method, cfg.model.name_or_path, files.run_dir, chosen)
    return cfg, tokenizer, model


def pair_metrics(
    clean_preds: torch.Tensor,
    clean_labels: torch.Tensor,
    poison_preds: torch.Tensor,
    *,
    target_label: int,
    num_labels: int,
) -> dict[str, Any]:
    """CACC, ASR, clean FPR, per-class accuracy and confusion matrix of one (clean, poison) pair.

    Computed as ``_final_evaluation`` in :mod:`pipeline.training` computes them, in percent.

    Returns:
        JSON-serialisable metrics; ``clean_fpr`` is None when every clean label is the target and
        a per-class accuracy is None for a class absent from the clean split.
    """
    fractions = ev.backdoor_metrics(clean_preds, clean_labels, poison_preds, target_label=target_label)
    per_class = ev.per_class_accuracy(clean_preds, clean_labels, num_labels)
    return {
        **{key: None if value is None else 100 * value for key, value in fractions.items()},
        "per_class_accuracy": [None if math.isnan(a) else 100 * a for a in per_class],
        "confusion_matrix": ev.confusion_matrix(clean_preds, clean_labels, num_labels),
        "poison_prediction_counts": torch.bincount(poison_preds, minlength=num_labels).tolist(),
        "num_clean": len(clean_labels),
        "num_poison": len(poison_preds),
    }


def _check_arguments(
    splits: Sequence[str], max_eval_samples: int | Literal["all"] | None, batch_size: int | None
) -> tuple[str, ...]:
    if isinstance(splits, str):
        splits = (splits,)
    unknown = [s for s in splits if s not in SPLITS]
    if unknown or not splits:
        raise EvaluationError(f"splits must be a non-empty selection of {list(SPLITS)}, got {list(splits)}")
    count = max_eval_samples
    if count is not None and count != "all" and (isinstance(count, bool) or not isinstance(count, int) or count < 1):
        raise EvaluationError(
            f"max_eval_samples must be a positive integer, 'all' or None (the run's own), got {count!r}"
        )
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
        raise EvaluationError(f"batch_size must be a positive integer or None (the run's eval_batch_size), got {batch_size!r}")
    return tuple(dict.fromkeys(splits))


def _read_metrics(path: Path) -> dict[str, Any]:
    try:
        metrics = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise RunDirError(f"{path} is not valid JSON ({error}); the run directory is damaged") from error
    if not isinstance(metrics, dict):
        raise RunDirError(f"{path} holds {type(metrics).__name__}, not the metrics object run_training writes")
    return metrics


def _same_file(a: Path, b: Any) -> bool:
    return isinstance(b, str) and a.resolve() == Path(b).resolve()


def evaluate_run(
    run_dir: str | Path,
    *,
    data_root: str | Path | None = None,
    dataset: str | None = None,
    attack: str | None = None,
    splits: Sequence[SplitName] = ("test",),
    max_eval_samples: int | Literal["all"] | None = None,
    device: torch.device | str = "auto",
    batch_size: int | None = None,
    progress: bool = False,
    trust_remote_code: bool = False,
) -> dict[str, Any]:
    """Re-evaluate a finished run on its own or other poison_data splits.

    Args:
        run_dir: The ``output_dir`` of a finished ``launch/train.py`` run.
        data_root: The poison_data folder (default: the run's ``data.root``, which a relative path
            resolves against the current directory).
        dataset: Dataset folder (default: the run's). The target label is always the run's.
        attack: Attack folder (default: the run's). Another attack's training-file setting is
            chosen with ``setting=auto``.
        splits: Split pairs to evaluate: ``"test"`` and/or ``"dev"``.
        max_eval_samples: Rows per split, a seeded subset as in training: None = the run's own
            ``data.max_eval_samples``, ``"all"`` = every row, or a positive integer.
        device: ``"auto"``, ``"cpu"``, ``"cuda"`` or a torch device.
        batch_size: Evaluation batch size (default: the run's ``train.eval_batch_size``; another
            value pads differently and is not guaranteed to reproduce bit for bit).
        progress: Show progress bars while predicting.
        trust_remote_code: Allow a saved ``model.trust_remote_code: true`` (runs the model's own code).

    Returns:
        JSON-serialisable results: the run's identity and ``run_metrics`` (from metrics.json), the
        data evaluated, and ``splits``: {name: :func:`pair_metrics` + ``files`` read, ``clean_rows``
        and ``same_rows_as_run``}.

    Raises:
        EvaluationError: Bad arguments; RunDirError for an unusable run directory.
        DataError: Missing or malformed data files.
        ConfigError: The saved config is not valid for this version of the code.
    """
    wanted = _check_arguments(splits, max_eval_samples, batch_size)
    chosen = resolve_device(device)
    files = finished_run_files(run_dir)
    run_metrics = _read_metrics(files.metrics)
    cfg, info, model_path = _resolved_config(files, trust_remote_code=trust_remote_code)

    root = Path(data_root) if data_root is not None else Path(cfg.data.root)
    dataset = dataset or cfg.data.dataset
    attack = attack or cfg.data.attack
    count = cfg.data.max_eval_samples if max_eval_samples is None else (None if max_eval_samples == "all" else max_eval_samples)
    batch = batch_size or cfg.train.eval_batch_size
    num_labels = cfg.model.num_labels
    target = cfg.data.target_label
    try:
        paths = data_lib.split_paths(
            root, dataset, attack,
            setting=cfg.data.setting if attack == cfg.data.attack else "auto",
            poison_rate=cfg.data.poison_rate, target_label=target,
        )
    except data_lib.DataError as error:
        if data_root is not None:
            raise
        raise data_lib.DataError(
            f"{error}. The run's data.root is {cfg.data.root!r} (from {files.config}); a relative root is "
            "resolved against the current directory: pass data_root (--data-root) to point at the data"
        ) from error
    evaluation = data_lib.load_evaluation_data(paths, num_labels=num_labels, max_eval_samples=count, seed=cfg.seed)
    pairs: dict[str, tuple[Any, Any, Path, Path, str]] = {}
    if "test" in wanted:
        pairs["test"] = (evaluation.test_clean, evaluation.test_poison, paths.test_clean, paths.test_poison, "test-clean")
    if "dev" in wanted:
        # The selection rows training measured: dev-clean minus the run's reference rows.
        selection = data_lib.load_training_data(
            paths, ref_size=cfg.data.ref_size, seed=cfg.seed, num_labels=num_labels,
            max_train_samples=cfg.data.max_train_samples, max_eval_samples=count,
        ).selection
        pairs["dev"] = (
            selection, evaluation.dev_poison, paths.dev_clean, paths.dev_poison,
            f"dev-clean minus the run's {cfg.data.ref_size} reference rows",
        )

    tokenizer, model = _rebuild(cfg, info, model_path, files.adapter, chosen)
    logger.info("rebuilt method=%s model=%s from %s on %s", cfg.method, cfg.model.name_or_path, files.run_dir, chosen)
    if batch != cfg.train.eval_batch_size:
        logger.warning(
            "batch size %d differs from the run's eval_batch_size %d: padding differs, so predictions may "
            "differ from the run's by rounding", batch, cfg.train.eval_batch_size,
        )
    collate = data_lib.make_collator(tokenizer)

    def predict(ds: Any, desc: str) -> tuple[torch.Tensor, torch.Tensor]:
        encoded = data_lib.encode(ds, tokenizer, max_length=cfg.data.max_length)
        loader = DataLoader(encoded, batch_size=batch, shuffle=False, collate_fn=collate)
        return ev.predict(model, loader, device=chosen, desc=desc, progress=progress)

    run_files = run_metrics.get("data_files", {})
    same_sampling = count == cfg.data.max_eval_samples
    results: dict[str, Any] = {}
    for name, (clean, poison, clean_path, poison_path, clean_rows) in pairs.items():
        clean_preds, clean_labels = predict(clean, f"{name}-clean")
        poison_preds, _ = predict(poison, f"{name}-poison")
        result = pair_metrics(clean_preds, clean_labels, poison_preds, target_label=target, num_labels=num_labels)
        result["files"] = {"clean": str(clean_path), "poison": str(poison_path)}
        result["clean_rows"] = clean_rows
        result["same_rows_as_run"] = (
            same_sampling
            and _same_file(clean_path, run_files.get(f"{name}_clean"))
            and _same_file(poison_path, run_files.get(f"{name}_poison"))
        )
        results[name] = result
        logger.info(
            "%s %s/%s: CACC %.2f%%  ASR %.2f%%  (%d clean, %d poison rows)",
            name, dataset, attack, result["cacc"], result["asr"], result["num_clean"], result["num_poison"],
        )

    return {
        "run_dir": str(files.run_dir),
        "method": cfg.method,
        "model": cfg.model.name_or_path,
        "seed": cfg.seed,
        "device": str(chosen),
        "data_root": str(root),
        "dataset": dataset,
        "attack": attack,
        "target_label": target,
        "max_eval_samples": count,
        "max_length": cfg.data.max_length,
        "batch_size": batch,
        "run_metrics": {
            key: run_metrics.get(key) for key in ("dataset", "attack", "cacc", "asr", "clean_fpr", "dev_clean_acc")
        },
        "splits": results,
    }
