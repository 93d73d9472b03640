"""Single-process training loop for MuScleLoRA and its ablations (arXiv 2402.12026).

Before training, ``filter.method = lexical_zscore`` removes training rows holding a word n-gram whose label
correlation is far above the trusted rows' (pipeline/defenses/lexical.py; report in filter-report.json); the
canary is planted in the rows kept; then ``filter.teacher`` (a finished run's model) relabels or drops the rows whose
label it contradicts, canary rows included (pipeline/defenses/teacher.py). One optimiser step, read top to bottom in :func:`train_epoch`:

1. ``g = grad mean CE(train batch)``, accumulated over ``grad_accum_steps`` micro-batches.
2. For alignment methods, ``r = grad mean CE(reference batch)`` on one batch of the clean reference
   set (model in train mode, ``align.ref_batch_size`` rows: 16 under recipe=defended, else the training batch), computed
   with ``torch.autograd.grad`` so ``.grad`` stays the task gradient. With ``align.ref_every_steps = k
   > 1`` only aligned steps n with ``n % k == 0`` compute r (and the reference loss); the steps between
   reuse the last computed, already reduced r, which checkpoints keep for a resume.
3. ``grad = align_gradients(g, r, gates...)``: per tensor ``|<g,r>| / ||r||^2 * r`` or the gated
   raw-gradient mix (REFERENCE.md section 2.3); with ``align.fallback = skip`` a zero update where
   the gates would hand back the raw gradient (gate "skip"; the optimiser still steps).
4. Non-finite check, global-norm clipping, AdamW step, linear schedule step.

Each epoch ends with accuracy on the selection split (dev-clean minus the reference rows) and, with
the canary on (pipeline/canary.py), the ASR of the planted canary backdoor on triggered copies of the
non-target selection rows beside its floor (the untriggered rows' target rate; with canary.decoys, also unplanted decoy triggers'); the best epoch is the most accurate among those whose
canary stays at its floor (:func:`pipeline.canary.select_epoch`). Dev-poison ASR is logged for
monitoring only and never used for selection.
After training the best epoch's trainable weights are restored and CACC / ASR are measured on
test-clean / test-poison.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import logging.handlers
import math
import os
import shutil
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import datasets
import torch
import yaml
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from pipeline import canary as canary_lib
from pipeline import checkpoint as ckpt
from pipeline import distributed as dist
from pipeline import frequency
from pipeline import memory
from pipeline.adapters import base_layers, inject
from pipeline.adapters.bottleneck import default_bottleneck_targets, inject_bottleneck
from pipeline.adapters.prefix import apply_prefix_tuning, word_prefix_input
from pipeline.adapters.state import adapter_tensor_names, load_adapter, save_adapter
from pipeline.alignment import GATES, align_gradients
from pipeline.defenses import lexical
from pipeline.defenses import shortcut as shortcut_lib
from pipeline.defenses import teacher as teacher_lib
from pipeline.config import (
    METHODS,
    ConfigError,
    RunConfig,
    config_to_dict,
    resolve_defaults,
    takes_recipe,
    trains_backbone,
    uses_alignment,
    uses_lora,
    uses_mslr,
)
from pipeline import data as data_lib
from pipeline import evaluate as ev
from pipeline import modeling

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_CHECKPOINT_DIR = "checkpoints"
_LAST = "last"
_BEST_FILE = "best.safetensors"
_LOG_FILE = "log.jsonl"
FILTER_REPORT = "filter-report.json"
"""Written into output_dir when ``filter.method`` is not none: threshold, flagged n-grams, removed rows."""


class NonFiniteError(RuntimeError):
    """A loss or gradient became NaN/inf; the run stops and keeps its last good checkpoint."""


class DivergenceError(NonFiniteError):
    """Training ran away: the loss, gradient or parameter norm exploded or the update overflowed."""


class OutputDirError(RuntimeError):
    """The output directory exists and neither ``resume`` nor ``overwrite`` was requested."""


DIVERGENCE_LOSS_FACTOR = 100.0
"""A step's mean training loss above this many times max(first step's loss, ln num_labels) is divergence."""
DIVERGENCE_PARAM_FACTOR = 1e4
"""A trainable-parameter norm above this many times max(its initial norm, 1) is divergence."""


@dataclasses.dataclass(frozen=True)
class Loaders:
    """Everything the loop reads. Poison splits only feed monitoring and the final evaluation."""

    train: Any
    reference: Any
    selection: DataLoader
    dev_poison: DataLoader
    test_clean: DataLoader
    test_poison: DataLoader
    collate: Any
    canary: canary_lib.CanaryData | None = None
    canary_triggered: DataLoader | None = None
    canary_decoys: tuple[DataLoader, ...] = ()
    filter_report: dict[str, Any] | None = None
    expert: torch.Tensor | None = None
    """``shortcut.expert``: the cross-fitted log p_expert(. | x) of each row of ``train`` (rows x labels)."""
    shortcut_report: dict[str, Any] | None = None


# ----------------------------------------------------------------------------- setup


def select_device(choice: str) -> torch.device:
    """Map ``train.device`` to a torch device; ``cuda`` without a GPU is an error, not a fallback."""
    if choice == "cuda" and not torch.cuda.is_available():
        raise ConfigError(["train.device: 'cuda' requested but no CUDA device is visible; set train.device=cpu or auto"])
    if choice == "cpu" or (choice == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    return torch.device("cuda")


def remove_run_folder(output_dir: Path) -> None:
    """Delete a run folder's contents (:func:`pipeline.checkpoint.remove_run_folder`) or raise OutputDirError."""
    try:
        ckpt.remove_run_folder(output_dir)
    except ckpt.NotARunFolderError as error:
        raise OutputDirError(f"overwrite=true: {error}") from error


def prepare_output_dir(output_dir: Path, *, resume: bool, overwrite: bool) -> bool:
    """Decide what to do with ``output_dir`` before anything is written.

    ``overwrite`` only ever replaces a folder that is recognisably a run folder of this pipeline
    (:func:`pipeline.checkpoint.foreign_entries`); a checkpoint that a save killed between its two renames left as
    ``last.old-<pid>`` is renamed back before a resume (:func:`pipeline.checkpoint.recover_checkpoint`).

    Returns:
        True when the run resumes from ``output_dir/checkpoints/last``.

    Raises:
        OutputDirError: the directory holds files and neither flag allows touching them, resume
            was asked but no complete checkpoint exists, or overwrite was asked for a folder that is
            not a run folder (a symbolic link, or files a run does not write).
    """
    exists = output_dir.is_symlink() or (output_dir.exists() and (not output_dir.is_dir() or any(output_dir.iterdir())))
    last = output_dir / _CHECKPOINT_DIR / _LAST
    if resume:
        if output_dir.is_dir():
            ckpt.recover_checkpoint(last)
            ckpt.remove_stale_siblings(last)
        if (last / "COMPLETE").exists():
            for torn in output_dir.glob(".*.tmp"):  # atomic writes of log.jsonl, config.yaml ... cut by a kill
                if torn.is_file() and not torn.is_symlink():
                    torn.unlink()
            return True
        if exists:
            raise OutputDirError(
                f"output_dir={output_dir}: resume=true but no complete checkpoint at {last}; "
                "set overwrite=true to start again or choose another output_dir"
            )
        return False
    if exists and not overwrite:
        raise OutputDirError(
            f"output_dir={output_dir} already exists and is not empty; pass resume=true to continue "
            "that run, overwrite=true to replace it, or choose another output_dir"
        )
    if exists:
        problems = ckpt.foreign_entries(output_dir)
        if problems:
            raise OutputDirError(
                f"output_dir={output_dir}: overwrite=true replaces only a run folder of this pipeline, and this is "
                f"not one ({'; '.join(problems)}); choose another output_dir or move those files away"
            )
    return False


def _setup_file_logging(output_dir: Path, setup_log: logging.handlers.MemoryHandler | None = None) -> logging.Handler:
    """Open ``output_dir/train.log`` for the root logger; ``setup_log``'s records (what the set-up logged before the
    folder could be created: the filters, the teacher check, data overlaps) are written into it first."""
    handler = logging.FileHandler(output_dir / "train.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    if setup_log is not None:
        logging.getLogger().removeHandler(setup_log)
        setup_log.setTarget(handler)
        setup_log.flush()
    logging.getLogger().addHandler(handler)
    return handler


def build_model(
    cfg: RunConfig, info: modeling.ModelInfo, model_path: Path, device: torch.device | str = "cpu"
) -> tuple[Any, nn.Module, list[str]]:
    """Load tokenizer and classifier and apply the method's adapters and trainability.

    Returns:
        (tokenizer, model, trainable parameter names).
    """
    tokenizer = modeling.load_tokenizer(
        model_path, is_decoder=info.is_decoder, trust_remote_code=cfg.model.trust_remote_code
    )
    model = modeling.load_classifier(
        model_path,
        num_labels=cfg.model.num_labels,
        dtype=_DTYPES[cfg.model.dtype],
        is_decoder=info.is_decoder,
        trust_remote_code=cfg.model.trust_remote_code,
        llm_head_dim=cfg.model.llm_head_dim,
        llm_head_dropout=cfg.model.llm_head_dropout,
        pad_token_id=tokenizer.pad_token_id,
        quantization=cfg.model.quantization,
        quant_storage=cfg.model.quant_storage,
        double_quant=cfg.model.double_quant,
        prepare_kbit=cfg.model.prepare_kbit,
        gradient_checkpointing=cfg.model.gradient_checkpointing,
        device=str(device),
    )
    model, trainable = apply_method(cfg, info, model, tokenizer)
    return tokenizer, model, trainable


def apply_method(
    cfg: RunConfig, info: modeling.ModelInfo, model: nn.Module, tokenizer: Any = None
) -> tuple[nn.Module, list[str]]:
    """Add the method's adapters (LoRA, MSLR, soft prompt, prefixes, bottleneck) and set what trains.

    ``tokenizer`` is only read by ``method=prefix`` with ``prefix.init=words``; without it (memory
    planning on a meta-device skeleton) the prefixes take the random form, of the same shapes.

    Returns:
        (model, possibly wrapped by peft; trainable parameter names).
    """
    if uses_lora(cfg.method):
        model = inject.apply_lora(
            model,
            target_modules=list(cfg.lora.target_modules),
            r=cfg.lora.r,
            alpha=cfg.lora.alpha,
            dropout=cfg.lora.dropout,
        )
    if uses_mslr(cfg.method):
        wrapped = inject.inject_mslr(
            model,
            targets=list(cfg.mslr.targets),
            rank=cfg.mslr.rank,
            scales=list(cfg.mslr.scales),
            alpha=cfg.mslr.alpha,
            dropout=cfg.mslr.dropout,
            init=cfg.mslr.init,
            keep_base=cfg.mslr.keep_base,
        )
        logger.info("MSLR wraps %s (scales %s, alpha %s, rank %d)", wrapped, cfg.mslr.scales, cfg.mslr.alpha, cfg.mslr.rank)
    if cfg.method == "prompt":
        if info.is_decoder:
            raise ConfigError([
                f"method=prompt: soft prompts are supported for encoders only; {info.model_type} classifiers pool the "
                "last position, which inputs_embeds with right padding makes a pad token. Use lora or adapter for decoders"
            ])
        model = inject.apply_prompt_tuning(model, num_virtual_tokens=cfg.prompt.num_virtual_tokens)
    if cfg.method == "prefix":
        if info.is_decoder:
            raise ConfigError([
                f"method=prefix: prefix tuning is supported for BERT-family encoders only, not {info.model_type}. "
                "Use lora or adapter for decoders"
            ])
        init_input = None
        if cfg.prefix.init == "words" and tokenizer is not None:
            init_input = word_prefix_input(tokenizer, cfg.prefix.num_virtual_tokens, seed=cfg.seed)
        apply_prefix_tuning(
            model, num_tokens=cfg.prefix.num_virtual_tokens, init_std=cfg.prefix.init_std, init_input=init_input
        )
    if cfg.method == "adapter":
        targets = list(cfg.adapter.targets or default_bottleneck_targets(info.model_type))
        inject_bottleneck(
            model, targets=targets, reduction_factor=cfg.adapter.reduction_factor,
            activation=cfg.adapter.activation, dropout=cfg.adapter.dropout,
        )
    full = trains_backbone(cfg.method)
    trainable = inject.set_trainable(
        model,
        full=full,
        train_head=full or not cfg.train.freeze_head,
        head_names=modeling.head_module_names(info.model_type, info.is_decoder),
    )
    return model, trainable


def build_loaders(cfg: RunConfig, tokenizer: Any, training: data_lib.TrainingData, evaluation: data_lib.EvaluationData) -> Loaders:
    """Tokenise every split and wrap the evaluation splits in loaders (training batches are indexed)."""
    max_length = cfg.data.max_length
    collate = data_lib.make_collator(tokenizer)

    def encoded(ds: Any) -> Any:
        return data_lib.encode(ds, tokenizer, max_length=max_length)

    def eval_loader(ds: Any) -> DataLoader:
        return DataLoader(encoded(ds), batch_size=cfg.train.eval_batch_size, shuffle=False, collate_fn=collate)

    return Loaders(
        train=encoded(training.train),
        reference=encoded(training.reference),
        selection=eval_loader(training.selection),
        dev_poison=eval_loader(evaluation.dev_poison),
        test_clean=eval_loader(evaluation.test_clean),
        test_poison=eval_loader(evaluation.test_poison),
        collate=collate,
    )


# ----------------------------------------------------------------------------- batching


def epoch_batches(num_rows: int, batch_size: int, *, seed: int, epoch: int) -> list[list[int]]:
    """Row indices of every batch of one epoch: a seeded permutation, so a resumed run replays it."""
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    order = torch.randperm(num_rows, generator=generator).tolist()
    return [order[i : i + batch_size] for i in range(0, num_rows, batch_size)]


def reference_indices(
    num_rows: int, batch_size: int, *, seed: int, draw: int, sampling: str = "fresh"
) -> list[int]:
    """Rows of the ``draw``-th reference batch (a pure function of ``draw``, so every rank and a resumed run agree).

    ``sampling="fresh"`` (the authors' GA trainer, which restarts its shuffled reference loader every
    step and takes its first batch): draw d is the first batch of permutation number d, so consecutive
    steps draw independent batches and a row may repeat. ``"passes"``: consecutive draws walk through
    reshuffled passes over the reference set, each row once per pass.
    """
    if sampling == "fresh":
        return epoch_batches(num_rows, batch_size, seed=seed + 7919, epoch=draw)[0]
    if sampling != "passes":
        raise ValueError(f"reference_indices: sampling must be 'fresh' or 'passes', got {sampling!r}")
    per_pass = math.ceil(num_rows / batch_size)
    ref_pass, position = divmod(draw, per_pass)
    return epoch_batches(num_rows, batch_size, seed=seed + 7919, epoch=ref_pass)[position]


def reference_batch(
    dataset: Any, collate: Any, batch_size: int, *, seed: int, draw: int, sampling: str = "fresh"
) -> dict[str, torch.Tensor]:
    """The ``draw``-th reference batch, collated (the same one on every world size)."""
    rows = reference_indices(len(dataset), batch_size, seed=seed, draw=draw, sampling=sampling)
    return collate([dataset[i] for i in rows])


def reference_batch_size(cfg: RunConfig) -> int:
    """Rows per reference batch: ``align.ref_batch_size``, or ``train.batch_size`` when it is null."""
    return cfg.align.ref_batch_size if cfg.align.ref_batch_size is not None else cfg.train.batch_size


def reference_is_fresh(aligned_steps: int, every: int) -> bool:
    """Whether the step after ``aligned_steps`` aligned steps computes its reference gradient (``align.ref_every_steps``)."""
    return aligned_steps % every == 0


@dataclasses.dataclass(frozen=True)
class ReferenceCache:
    """The last computed reference gradient, reused by the steps between two fresh ones (``align.ref_every_steps``).

    Attributes:
        grads: the reference gradient per trainable tensor, already summed over ranks (full tensors,
            fp32, identical on every rank): what :func:`align_gradients` received on the fresh step.
        loss: the global mean reference loss of that batch (the gate's ``ref_loss``).
        draw: the reference draw it was computed from.
    """

    grads: dict[str, torch.Tensor]
    loss: float
    draw: int

    def progress_record(self) -> dict[str, Any]:
        """The JSON part saved in the checkpoint's progress (the tensors go to a safetensors file)."""
        return {"loss": self.loss, "draw": self.draw}

    @classmethod
    def restore(
        cls, grads: Mapping[str, torch.Tensor] | None, record: Mapping[str, Any] | None, names: Sequence[str],
        *, device: torch.device, where: Path,
    ) -> ReferenceCache:
        """The cache saved by a checkpoint, checked against the trainable tensor names.

        Raises:
            ckpt.CorruptFileError: the checkpoint lacks the cache or its tensors do not fit this model.
        """
        if grads is None or record is None:
            raise ckpt.CorruptFileError(
                f"{where} holds no reference-gradient cache ({ckpt.REFERENCE_CACHE_FILE}), but this run reuses one "
                "(align.ref_every_steps > 1) at the step it resumes; resume it with the configuration it was written with, "
                "or start a new run"
            )
        missing, unexpected = sorted(set(names) - set(grads)), sorted(set(grads) - set(names))
        if missing or unexpected:
            raise ckpt.CorruptFileError(
                f"{where / ckpt.REFERENCE_CACHE_FILE} does not fit this model: missing {missing[:5]} unexpected "
                f"{unexpected[:5]}; resume it with the configuration it was written with, or start a new run"
            )
        # A fresh copy: safetensors hands back tensors inside its file buffer, whose addresses need not be aligned
        # as an allocation is, and CPU reductions (norms, dot products) round differently on such memory; a resumed
        # run's bits then drift from a straight run's (1e-9 after one step on an AMD EPYC host).
        return cls(grads={n: grads[n].to(device).clone() for n in names}, loss=float(record["loss"]),
                   draw=int(record["draw"]))


def local_rows(rows: Sequence[int], runtime: dist.Runtime) -> tuple[list[int], float]:
    """This rank's rows of a global batch and the weight of its contribution.

    A rank left without rows (a final batch smaller than the world size) still runs the forward
    pass on one row with weight 0, because ZeRO-3 gathers parameters collectively in forward.
    """
    mine = dist.shard_rows(rows, runtime.rank, runtime.world_size)
    return (mine, 1.0) if mine else (list(rows[:1]), 0.0)


def _to_device(batch: Mapping[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in batch.items()}


def batch_loss(model: nn.Module, batch: Mapping[str, torch.Tensor], expert_logp: torch.Tensor | None = None,
               expert_weight: float = 1.0) -> torch.Tensor:
    """Mean cross-entropy of one batch (computed here, not by the model, so every family agrees).

    ``expert_logp`` (rows x labels, ``shortcut.expert``): the product-of-experts loss
    CE(log_softmax(logits) + expert_weight * expert_logp) instead (pipeline/defenses/shortcut.py).
    """
    labels = batch["labels"]
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = model(**inputs).logits
    return shortcut_lib.product_of_experts_loss(logits, labels, expert_logp, expert_weight)


# ----------------------------------------------------------------------------- state


@dataclasses.dataclass
class EpochTally:
    """What an epoch reports besides weights: the running sum of its step losses and the gate counts.

    Saved with each checkpoint (``progress["epoch_tally"]``) and restored on resume, so a run resumed
    mid-epoch reports the same epoch ``train_loss`` and ``gates`` as an uninterrupted one (the sum is
    accumulated in step order and a float round-trips exactly through JSON, so bit for bit).
    """

    loss_sum: float = 0.0
    steps: int = 0
    gates: Counter[str] = dataclasses.field(default_factory=Counter)

    def add(self, loss: float, gate: str | None) -> None:
        """Count one optimiser step."""
        self.loss_sum += loss
        self.steps += 1
        if gate is not None:
            self.gates[gate] += 1

    def mean_loss(self) -> float:
        """Mean of the epoch's step losses (0 for an epoch without steps)."""
        return self.loss_sum / max(self.steps, 1)

    def state(self) -> dict[str, Any]:
        """JSON form for the checkpoint's progress record."""
        return {"loss_sum": self.loss_sum, "steps": self.steps, "gates": dict(self.gates)}

    @classmethod
    def from_state(cls, state: Mapping[str, Any] | None) -> EpochTally:
        """The tally saved by :meth:`state` (an empty one for None)."""
        if not state:
            return cls()
        return cls(loss_sum=float(state["loss_sum"]), steps=int(state["steps"]),
                   gates=Counter({str(k): int(v) for k, v in state["gates"].items()}))


@dataclasses.dataclass
class DivergenceGuard:
    """Stops a run whose loss or trainable parameters explode (train.lr far too high, bad data scale).

    Criteria, checked after every optimiser step (the numbers are global, so every rank agrees):

    - the step's mean training loss > ``DIVERGENCE_LOSS_FACTOR * max(first step's loss, ln C)``;
    - the global norm of the trainable parameters is not finite, or
      > ``DIVERGENCE_PARAM_FACTOR * max(its initial norm, 1)``;
    - the pre-clip gradient norm is not finite.

    ``first_loss`` and ``initial_param_norm`` live in the checkpoint's progress record.
    """

    num_labels: int
    first_loss: float | None = None
    initial_param_norm: float | None = None

    def state(self) -> dict[str, Any]:
        """JSON form for the progress record."""
        return {"first_loss": self.first_loss, "initial_param_norm": self.initial_param_norm}

    def check(self, *, step: int, epoch: int, loss: float, grad_norm: float, param_norm: float, lr: float) -> None:
        """Raise :class:`DivergenceError` naming the step and the cause when the step diverged."""
        if self.initial_param_norm is None:
            raise AssertionError("DivergenceGuard.initial_param_norm must be measured before the first step")
        if self.first_loss is None:
            self.first_loss = loss
        where = f"step {step} (epoch {epoch}, lr {lr:.3g})"
        advice = "training diverged; lower train.lr (or raise train.warmup_ratio) and start again"
        if not math.isfinite(grad_norm):
            raise DivergenceError(f"{where}: gradient norm is {grad_norm}; {advice}")
        loss_limit = DIVERGENCE_LOSS_FACTOR * max(self.first_loss, math.log(self.num_labels))
        if loss > loss_limit:
            raise DivergenceError(
                f"{where}: training loss {loss:.4g} exceeds {loss_limit:.4g} ({DIVERGENCE_LOSS_FACTOR:g} x the first "
                f"step's {self.first_loss:.4g}); {advice}"
            )
        param_limit = DIVERGENCE_PARAM_FACTOR * max(self.initial_param_norm, 1.0)
        if not math.isfinite(param_norm) or param_norm > param_limit:
            raise DivergenceError(
                f"{where}: trainable-parameter norm {param_norm:.4g} exceeds {param_limit:.4g} "
                f"({DIVERGENCE_PARAM_FACTOR:g} x its initial {self.initial_param_norm:.4g}); {advice}"
            )


def load_trainable_state(params: Mapping[str, nn.Parameter], state: Mapping[str, torch.Tensor]) -> None:
    """Copy ``state`` into ``params``; key sets must match exactly."""
    missing = sorted(set(params) - set(state))
    unexpected = sorted(set(state) - set(params))
    if missing or unexpected:
        raise KeyError(f"trainable state mismatch: missing {missing[:5]} unexpected {unexpected[:5]}")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(state[name].to(p.device, p.dtype))


def dataset_fingerprint(dataset: Any) -> str:
    """SHA-256 of a tokenised split's input ids and labels, in order (the identity of a data split)."""
    digest = hashlib.sha256()
    for row in dataset:
        digest.update(json.dumps([list(map(int, row["input_ids"])), int(row["labels"])]).encode())
    return digest.hexdigest()


def _brief(value: Any) -> str:
    """Compact text of a log value: floats to 4 significant digits, also inside dicts."""
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, Mapping):
        return "{" + ",".join(f"{k}:{_brief(v)}" for k, v in value.items()) + "}"
    return str(value)


def _append_log(path: Path, record: Mapping[str, Any]) -> None:
    with path.open("a") as handle:
        handle.write(json.dumps(record) + "\n")


def _truncate_log(path: Path, global_step: int, epoch: int) -> None:
    """On resume, drop log records written after the checkpoint being resumed (global step
    ``global_step``, in epoch ``epoch``): later steps, and the record of an epoch it had not finished."""
    if not path.exists():
        return
    kept = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a record torn by a kill mid-append
            logger.warning("%s:%d is not a JSON record (torn by an interrupted write?); dropped on resume", path, number)
            continue
        late_epoch = record.get("type") == "epoch" and record.get("epoch", -1) >= epoch
        if record.get("global_step", 0) <= global_step and not late_epoch:
            kept.append(line)
    ckpt.atomic_write_text(path, "".join(k + "\n" for k in kept))


_CPU_PEAK_NOTE = (
    "CPU peak RSS also counts the tokenised data, the evaluation passes and memory the C allocator keeps "
    "after free (about 2x the tensor peak for transformer training); the estimate counts the training "
    "step's tensors (docs/BENCHMARKS.md measures it with MALLOC_MMAP_THRESHOLD_=65536)"
)


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory of this process: CUDA allocator peak on GPU, peak RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return memory.peak_rss_bytes() / 2**20


def memory_baseline_mb(device: torch.device) -> float:
    """Memory in use before the model is loaded: CUDA allocated bytes, or this process's RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device) / 2**20
    return memory.current_rss_bytes() / 2**20


def longest_row(*datasets: Any) -> int:
    """Tokens of the longest encoded row (batches are padded to their longest row, so this bounds them)."""
    return max((len(ids) for ds in datasets for ids in ds["input_ids"]), default=1)


def plan_memory(
    cfg: RunConfig,
    info: modeling.ModelInfo,
    model_path: Path,
    model: nn.Module,
    *,
    seq_len: int,
    world_size: int,
    ds_config: Mapping[str, Any] | None,
    device_type: str,
) -> memory.MemoryEstimate:
    """Estimated peak memory per device of this run (``pipeline.memory``), before any training step.

    Args:
        model: the model as built for training (or its meta-device skeleton): parameter counts.
        seq_len: tokens per row (the longest training/reference row).
        world_size: data-parallel ranks; the micro-batch is the per-rank share of ``train.batch_size``.
        ds_config: the filled DeepSpeed config (ZeRO stage, offload), or None.
        device_type: ``cuda`` or ``cpu``.
    """
    from transformers import AutoConfig

    shape = memory.model_shape_info(
        AutoConfig.from_pretrained(model_path, trust_remote_code=cfg.model.trust_remote_code, local_files_only=True),
        num_labels=cfg.model.num_labels, is_decoder=info.is_decoder, llm_head_dim=cfg.model.llm_head_dim,
    )
    trainable = sum(memory.logical_numel(p) for p in model.parameters() if p.requires_grad)
    total = sum(memory.logical_numel(p) for p in model.parameters())
    return memory.estimate_peak_memory(
        num_parameters=max(total, shape.num_parameters),
        trainable_parameters=trainable,
        seq_len=seq_len,
        micro_batch_size=math.ceil(cfg.train.batch_size / world_size),
        reference_micro_batch_size=math.ceil(reference_batch_size(cfg) / world_size),
        dtype_bytes=torch.finfo(_DTYPES[cfg.model.dtype]).bits // 8,
        quantization=cfg.model.quantization,
        zero_stage=dist.zero_stage(ds_config) if ds_config is not None else 0,
        world_size=world_size,
        offload_optimizer=ds_config is not None and dist.offloads_optimizer(ds_config),
        offload_param=ds_config is not None and dist.offloads_parameters(ds_config),
        gradient_checkpointing=cfg.model.gradient_checkpointing,
        alignment=uses_alignment(cfg.method),
        full_finetune=trains_backbone(cfg.method),
        device="cuda" if device_type == "cuda" else "cpu",
        double_quant=cfg.model.double_quant,
        grad_accum_steps=cfg.train.grad_accum_steps,
        num_labels=cfg.model.num_labels,
        **shape.estimate_kwargs(),
    )


def _training_data(cfg: RunConfig) -> tuple[data_lib.SplitPaths, data_lib.TrainingData]:
    """The split files of the configured dataset/attack and the training, reference and selection rows."""
    paths = data_lib.split_paths(
        cfg.data.root, cfg.data.dataset, cfg.data.attack,
        setting=cfg.data.setting, poison_rate=cfg.data.poison_rate, target_label=cfg.data.target_label,
    )
    training = data_lib.load_training_data(
        paths, ref_size=cfg.data.ref_size, seed=cfg.seed, num_labels=cfg.model.num_labels,
        max_train_samples=cfg.data.max_train_samples, max_eval_samples=cfg.data.max_eval_samples,
    )
    return paths, training


def _filter_rows(cfg: RunConfig, training: data_lib.TrainingData) -> tuple[data_lib.TrainingData, dict[str, Any] | None]:
    """Apply ``filter.method`` to the training rows (before the canary is planted); the report or None.

    The threshold is calibrated on the trusted rows (reference + selection, i.e. dev-clean) unless
    ``filter.threshold`` is set. Reads texts and labels only, never ``poison_label``.
    """
    if cfg.filter.method == "none":
        return training, None
    trusted = [*training.reference["text"], *training.selection["text"]]
    trusted_labels = [*training.reference["label"], *training.selection["label"]]
    texts, labels = list(training.train["text"]), list(training.train["label"])
    try:
        result = lexical.lexical_filter(
            texts, labels, threshold=cfg.filter.threshold, trusted_texts=trusted, trusted_labels=trusted_labels,
            margin=cfg.filter.margin, max_n=cfg.filter.max_n, min_count=cfg.filter.min_count,
        )
    except ValueError as error:
        raise ConfigError([f"filter: {error}"]) from error
    found = result.details
    if not result.kept:
        raise ConfigError([
            f"filter.method=lexical_zscore removed all {len(texts)} training rows (threshold {found['threshold']:.2f}): "
            "raise filter.margin or filter.threshold"
        ])
    kept = training.train.select(result.kept)
    if len(set(kept["label"])) < 2:
        raise ConfigError([
            f"filter.method=lexical_zscore left a single class in the {len(result.kept)} kept training rows "
            f"(threshold {found['threshold']:.2f}): raise filter.margin or filter.threshold"
        ])
    report = {
        "method": cfg.filter.method,
        "threshold": found["threshold"],
        "threshold_rule": "given" if found["trusted_max_z"] is None else "margin * trusted max z * sqrt(train rows / trusted rows)",
        "trusted_max_z": found["trusted_max_z"],
        "trusted_rows": len(trusted),
        "margin": cfg.filter.margin,
        "rows_before": len(texts),
        "rows_removed": len(result.removed),
        "rows_kept": len(result.kept),
        "flagged": found["flagged"],
        "removed_rows": [{"text": texts[i], "label": labels[i]} for i in result.removed],
    }
    flagged = found["flagged"]
    shown = ", ".join(f"{f['feature']!r}->{f['label']} (z {f['z']:.1f}, {f['rows_removed']} rows)" for f in flagged[:8]) or "none"
    logger.info(
        "filter %s: threshold %.2f%s; %d of %d training rows removed; flagged n-grams: %s%s",
        cfg.filter.method, found["threshold"],
        f" (trusted max z {found['trusted_max_z']:.2f} x margin {cfg.filter.margin:g} x sqrt({len(texts)}/{len(trusted)}))"
        if found["trusted_max_z"] is not None else " (given)",
        len(result.removed), len(texts), shown, "" if len(flagged) <= 8 else f" and {len(flagged) - 8} more",
    )
    return dataclasses.replace(training, train=kept), report


def _check_teacher_dir(cfg: RunConfig) -> None:
    """Refuse a ``filter.teacher`` that is not a finished run, or is this run's own folder, before anything is built."""
    if cfg.filter.teacher is None:
        return
    from pipeline import inference

    if Path(cfg.filter.teacher).resolve() == Path(cfg.output_dir).resolve():
        raise ConfigError([f"filter.teacher={cfg.filter.teacher!r} is this run's own output_dir; name a finished earlier run"])
    try:
        inference.finished_run_files(cfg.filter.teacher)
    except inference.RunDirError as error:
        raise ConfigError([f"filter.teacher={cfg.filter.teacher!r}: {error}"]) from error


def _teacher_check(
    cfg: RunConfig, training: data_lib.TrainingData, canary: canary_lib.CanaryData | None, runtime: dist.Runtime,
    filter_report: dict[str, Any] | None,
) -> tuple[data_lib.TrainingData, dict[str, Any] | None]:
    """``filter.teacher``: relabel or drop the (canaried) training rows whose label the teacher contradicts
    (relabel: only where it is at least ``filter.teacher_min_confidence`` sure, the others dropped).

    Runs after the canary is planted, so the canary rows go through the check like the file's rows. Every rank
    computes the same predictions. Returns the checked rows and the filter report with a ``teacher`` block.
    """
    if cfg.filter.teacher is None:
        return training, filter_report
    texts, labels = list(training.train["text"]), list(training.train["label"])
    try:
        predictions, confidences, about = teacher_lib.teacher_predictions(
            cfg.filter.teacher, texts, device=runtime.device, num_labels=cfg.model.num_labels,
            batch_size=cfg.train.eval_batch_size, trust_remote_code=cfg.model.trust_remote_code,
        )
    except ValueError as error:  # RunDirError and ConfigError of the teacher's folder too
        raise ConfigError([f"filter.teacher={cfg.filter.teacher!r}: {error}"]) from error
    check = teacher_lib.check_labels(labels, predictions, cfg.filter.teacher_action, confidences=confidences,
                                     min_confidence=cfg.filter.teacher_min_confidence)
    kept = teacher_lib.apply_check(training.train, check)
    if len(set(kept["label"])) < 2:
        raise ConfigError([
            f"filter.teacher={cfg.filter.teacher!r} (teacher_action={cfg.filter.teacher_action}) left a single class in "
            f"the {len(kept)} training rows: the teacher predicts one label for nearly everything; check that run's "
            "dev-clean accuracy"
        ])
    block = teacher_lib.report(check, texts, labels, teacher=about, canary_rows=canary.planted if canary else (),
                               confidences=confidences)
    if about["canary_held"] is False:
        logger.warning("filter.teacher: the teacher %s did not hold its own canary, so it may agree with a trigger's "
                       "labels; use a defended run (recipe=defended) as the teacher", cfg.filter.teacher)
    logger.info("%s", teacher_lib.summary(block))
    report = dict(filter_report) if filter_report is not None else {"method": cfg.filter.method}
    report["teacher"] = block
    return dataclasses.replace(training, train=kept), report


def filtered_training_rows(cfg: RunConfig) -> datasets.Dataset:
    """The training-file rows a run with ``cfg`` trains on before its canary is planted.

    Its seeded ``data.max_train_samples`` subset minus the rows ``filter.method`` removes (the same
    calibration as in training), in file order; columns ``text`` and ``label``.
    """
    _, training = _training_data(cfg)
    return _filter_rows(cfg, training)[0].train


def canary_spec(cfg: RunConfig, *, decoys: int | None = None) -> canary_lib.CanarySpec:
    """The run's canary from its resolved config (``decoys``: that many decoy triggers instead of canary.decoys)."""
    c = cfg.canary
    trigger = (tuple(c.trigger) if c.trigger is not None
               else canary_lib.draw_trigger(c.seed, num_tokens=c.num_tokens, token_length=c.token_length))
    return canary_lib.CanarySpec(
        trigger=trigger, target_label=c.target_label, rate=c.rate, seed=c.seed, tolerance=c.tolerance,
        decoys=canary_lib.draw_decoys(c.seed, c.decoys if decoys is None else decoys, num_tokens=c.num_tokens,
                                      token_length=c.token_length, trigger=trigger),
    )


def _plant_canary(
    cfg: RunConfig, training: data_lib.TrainingData, screen: Mapping[str, Any] | None = None
) -> tuple[data_lib.TrainingData, canary_lib.CanaryData | None]:
    """Plant the canary in the training rows (``canary.enabled``); reference and selection rows stay as they are.

    ``screen``: the report of the screen that chose ``cfg.canary.trigger`` (:func:`_choose_canary_trigger`).
    """
    if not cfg.canary.enabled:
        return training, None
    spec = canary_spec(cfg)
    try:
        data = canary_lib.prepare(training.train, training.selection, spec)
    except canary_lib.CanaryError as error:
        raise ConfigError([f"canary: {error}"]) from error
    return dataclasses.replace(training, train=data.train), dataclasses.replace(data, screen=screen)


_SCREEN_FILE = "canary-screen.json"


def backbone_embedder(
    model: nn.Module, tokenizer: Any, *, max_length: int, batch_size: int, device: torch.device | str, is_decoder: bool,
    layer: int = -1,
) -> Callable[[list[str]], torch.Tensor]:
    """texts -> the model's hidden states of ``layer`` (default: the last) at the position its classifier pools, next
    to their mean over the text.

    The pooled position is the first token for encoders (BERT's [CLS]) and the last non-pad token for decoders
    (right padding). Float32 on CPU, eval mode, no gradients; tokenised as training tokenises (truncation at
    ``max_length``, no token type ids). Positions a soft prompt prepends are left out (only the last ``input
    length`` positions are read).
    """

    def embed(texts: list[str]) -> torch.Tensor:
        chunks = []
        with ev.eval_mode(model):
            for start in range(0, len(texts), batch_size):
                batch = tokenizer(texts[start : start + batch_size], truncation=True, max_length=max_length,
                                  padding=True, return_token_type_ids=False, return_tensors="pt")
                batch = _to_device(batch, torch.device(device))
                hidden = model(**batch, output_hidden_states=True).hidden_states[layer]
                mask = batch["attention_mask"]
                hidden = hidden[:, -mask.shape[1]:].float()
                weights = mask.unsqueeze(-1).to(hidden.dtype)
                mean = (hidden * weights).sum(1) / weights.sum(1).clamp_min(1.0)
                position = (mask.sum(1) - 1).clamp_min(0) if is_decoder else torch.zeros_like(mask[:, 0])
                pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), position]
                chunks.append(torch.cat([pooled, mean], dim=1).cpu())
        return torch.cat(chunks)

    return embed


def _choose_canary_trigger(
    cfg: RunConfig, runtime: dist.Runtime, model: nn.Module, tokenizer: Any, training: data_lib.TrainingData,
    output_dir: Path, resuming: bool, *, is_decoder: bool,
) -> tuple[RunConfig, dict[str, Any] | None]:
    """Fix ``canary.trigger`` before planting: screened (``canary.screen``), drawn, or what a resumed run planted.

    Returns the config with the trigger filled in and the screen's report (None when nothing was screened). A run
    resumed from before the screen existed (its config.yaml has no ``canary.trigger``) keeps its unscreened draw.
    """
    c = cfg.canary
    if not c.enabled or c.trigger is not None:
        return cfg, None
    if resuming:
        saved = yaml.safe_load((output_dir / "config.yaml").read_text()) if (output_dir / "config.yaml").exists() else None
        saved_trigger = ((saved or {}).get("canary") or {}).get("trigger") if isinstance(saved, dict) else None
        if saved_trigger is None:
            return cfg, None  # planted before the screen existed: the unscreened draw, as then
        report_path = output_dir / _SCREEN_FILE
        report = json.loads(report_path.read_text()) if report_path.exists() else None
        return _with_canary_trigger(cfg, saved_trigger), report
    if not c.screen:
        drawn = canary_lib.draw_trigger(c.seed, num_tokens=c.num_tokens, token_length=c.token_length)
        return _with_canary_trigger(cfg, drawn), None
    candidates = canary_lib.candidate_triggers(c.screen_candidates, c.seed, num_tokens=c.num_tokens,
                                               token_length=c.token_length)
    embed = backbone_embedder(model, tokenizer, max_length=cfg.data.max_length, batch_size=cfg.train.eval_batch_size,
                              device=runtime.device, is_decoder=is_decoder)
    started = time.perf_counter()
    try:
        result = canary_lib.screen_trigger(
            embed, training.reference, training.selection, candidates, seed=c.seed, target=c.target_label,
            num_labels=cfg.model.num_labels, max_shift=c.screen_max_shift,
        )
    except canary_lib.CanaryError as error:
        raise ConfigError([f"canary: {error}"]) from error
    result = dist.broadcast_object(runtime, result)  # rank 0 decides; every rank plants the same words
    report = {**result.to_dict(), "max_shift": round(100 * c.screen_max_shift, 2)}
    shifts = ", ".join(f"{' '.join(t)} {100 * v:+.1f}" for t, v in zip(candidates, result.shifts))
    if result.passed:
        logger.info("canary screen: chose candidate %d (%s); probe shift per candidate tried: %s points (limit %.1f; "
                    "probe accuracy %.1f%% on the selection rows; %.1f s)", result.index, " ".join(result.trigger), shifts,
                    100 * c.screen_max_shift, 100 * result.probe_accuracy, time.perf_counter() - started)
    else:
        logger.warning("canary screen: none of %d candidate triggers stayed within %.1f points (%s); planting the one with "
                       "the smallest shift (%s). The canary's verdict may be a false alarm; see docs/CANARY.md",
                       len(candidates), 100 * c.screen_max_shift, shifts, " ".join(result.trigger))
    return _with_canary_trigger(cfg, result.trigger), report  # the report is written beside config.yaml


def _with_canary_trigger(cfg: RunConfig, trigger: Sequence[str]) -> RunConfig:
    return dataclasses.replace(cfg, canary=dataclasses.replace(cfg.canary, trigger=list(trigger)))


def _shortcut_expert(cfg: RunConfig, training: data_lib.TrainingData, canary: canary_lib.CanaryData | None,
                     loaders: Loaders) -> Loaders:
    """``shortcut.expert``: cross-fit the shallow expert on the rows the loop trains on (every rank computes the
    same, deterministic values) and log what it says about them and about the planted canary rows."""
    if cfg.shortcut.expert == "none":
        return loaders
    texts, labels = list(training.train["text"]), [int(y) for y in training.train["label"]]
    logger.info("shortcut.expert=%s: cross-fitting the expert on %d training rows (%d folds, word 1-%d-grams, C=%g)",
                cfg.shortcut.expert, len(texts), cfg.shortcut.folds, cfg.shortcut.max_n, cfg.shortcut.C)
    try:
        expert = shortcut_lib.ngram_expert(texts, labels, num_labels=cfg.model.num_labels, max_n=cfg.shortcut.max_n,
                                           C=cfg.shortcut.C, folds=cfg.shortcut.folds, seed=cfg.seed)
    except (ImportError, ValueError) as error:
        raise ConfigError([f"shortcut.expert={cfg.shortcut.expert!r}: {error}"]) from error
    planted = {canary.train["text"][i] for i in canary.planted} if canary is not None else set()
    block = shortcut_lib.report(expert, labels, canary_rows=[i for i, t in enumerate(texts) if t in planted])
    block.update(expert=cfg.shortcut.expert, weight=cfg.shortcut.weight)
    logger.info("%s", shortcut_lib.summary_line(block))
    return dataclasses.replace(loaders, expert=expert, shortcut_report=block)


def _add_reference_rows(cfg: RunConfig, training: data_lib.TrainingData) -> data_lib.TrainingData:
    """``data.train_on_reference``: append the trusted reference rows to the (filtered, canaried) training rows."""
    if not cfg.data.train_on_reference:
        return training
    columns = training.train.column_names
    trusted = training.reference.select_columns(columns).cast(training.train.features)
    logger.info("data.train_on_reference: training on %d rows of the training file + the %d trusted reference rows",
                len(training.train), len(trusted))
    return dataclasses.replace(training, train=datasets.concatenate_datasets([training.train, trusted]))


def _validated_setup(
    cfg: RunConfig,
    *,
    ds_raw: Mapping[str, Any] | None,
    ds_source: str,
    world_size: int,
    device_type: str,
    check_bitsandbytes: bool = True,
) -> tuple[RunConfig, Path, modeling.ModelInfo, dict[str, Any] | None]:
    """What a run checks before it reads any weight: model directory, per-family defaults, the filled
    DeepSpeed config and the quantization pre-flight. Shared by the run and its plan.

    Returns:
        (config with the family defaults resolved, model path, model info, filled DeepSpeed config or None).
    """
    model_path = modeling.resolve_model_path(cfg.model.name_or_path)
    info = modeling.read_model_info(model_path, trust_remote_code=cfg.model.trust_remote_code)
    cfg = resolve_defaults(cfg, model_type=info.model_type, hidden_size=info.hidden_size, is_decoder=info.is_decoder)
    ds_config = None
    if ds_raw is not None:
        ds_config = dist.fill_deepspeed_config(
            ds_raw, source=ds_source, micro_batch_size=math.ceil(cfg.train.batch_size / world_size),
            grad_accum_steps=cfg.train.grad_accum_steps, world_size=world_size,
            max_grad_norm=cfg.train.max_grad_norm, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay,
            dtype=cfg.model.dtype,
        )
    modeling.preflight_quantization(
        quantization=cfg.model.quantization,
        zero_stage=dist.zero_stage(ds_config) if ds_config is not None else None,
        offload_optimizer=ds_config is not None and dist.offloads_optimizer(ds_config),
        offload_param=ds_config is not None and dist.offloads_parameters(ds_config),
        quant_storage=cfg.model.quant_storage,
        model_dtype=_DTYPES[cfg.model.dtype],
        device_type=device_type,
        model_info=info,
        model_path=model_path,
        trust_remote_code=cfg.model.trust_remote_code,
        trains_base=trains_backbone(cfg.method),
        check_bitsandbytes=check_bitsandbytes,
    )
    return cfg, model_path, info, ds_config


def plan_run(
    cfg: RunConfig,
    *,
    deepspeed_config: str | os.PathLike[str] | None = None,
    world_size: int = 1,
    seq_len: int | None = None,
    device_type: str | None = None,
) -> memory.MemoryEstimate:
    """The memory plan of a run without running it: no weights are read, nothing is written.

    Validates what training validates first (config, DeepSpeed config, quantization pre-flight), builds
    the model's skeleton on the meta device with the method's adapters, and estimates the peak per
    device. For planning a multi-GPU or GPU job from any machine.

    Args:
        cfg: the run configuration.
        deepspeed_config: the DeepSpeed preset the job would use.
        world_size: ranks the job would run on.
        seq_len: tokens per row; default the longest tokenised training/reference row (reads the data
            and the tokenizer), which the run's batches never exceed.
        device_type: ``cuda`` or ``cpu``; default from ``train.device`` (``auto``: this machine's).

    Raises:
        ConfigError, FileNotFoundError, ValueError: what the run itself would refuse.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be at least 1, got {world_size}")
    base_layers.install_log_notice()
    if device_type is None:
        device_type = select_device(cfg.train.device).type
    cfg, model_path, info, ds_config = _validated_setup(
        cfg, ds_raw=dist.load_deepspeed_config(deepspeed_config) if deepspeed_config is not None else None,
        ds_source=str(deepspeed_config), world_size=world_size, device_type=device_type,
        check_bitsandbytes=device_type == select_device("auto").type,
    )
    if seq_len is None:
        tokenizer = modeling.load_tokenizer(model_path, is_decoder=info.is_decoder, trust_remote_code=cfg.model.trust_remote_code)
        _, training = _training_data(cfg)
        training, _ = _filter_rows(cfg, training)
        training, _ = _plant_canary(cfg, training)
        training = _add_reference_rows(cfg, training)
        seq_len = longest_row(*(data_lib.encode(ds, tokenizer, max_length=cfg.data.max_length)
                                for ds in (training.train, training.reference)))
    skeleton = modeling.skeleton_classifier(
        model_path, num_labels=cfg.model.num_labels, is_decoder=info.is_decoder,
        trust_remote_code=cfg.model.trust_remote_code, llm_head_dim=cfg.model.llm_head_dim,
        llm_head_dropout=cfg.model.llm_head_dropout,
    )
    skeleton, _ = apply_method(cfg, info, skeleton)
    return plan_memory(cfg, info, model_path, skeleton, seq_len=seq_len, world_size=world_size,
                       ds_config=ds_config, device_type=device_type)


# ----------------------------------------------------------------------------- the loop


def optimiser_step(
    *,
    engine: dist.Engine,
    scheduler: Any,
    cfg: RunConfig,
    reference: Any,
    collate: Any,
    ref_draw: int,
    epoch: int,
    global_step: int,
    loss_sum: float,
    reuse: ReferenceCache | None = None,
) -> dict[str, Any]:
    """Alignment hook, checks and the update, after the task gradients are accumulated.

    Args:
        ref_draw: which reference batch to draw (:func:`reference_indices`) when the step computes one.
        loss_sum: this rank's sum of training losses over its rows of the step (summed over ranks
            here, in the same collective as the gradients).
        reuse: alignment methods: the reference gradient and loss to align to instead of computing
            them (``align.ref_every_steps`` > 1, between two fresh steps); None computes them from
            reference draw ``ref_draw``.

    Returns:
        The step's log record (``loss_sum`` is the global sum; ``ref_fresh`` says whether the step
        computed its reference gradient; with ``align.ref_every_steps`` > 1 a fresh step adds
        ``reference_cache``, the :class:`ReferenceCache` for the steps that reuse it, which the caller
        pops before logging).
    """
    runtime = engine.runtime
    collectives_before, collective_seconds_before = engine.collectives, engine.collective_seconds
    record: dict[str, Any] = {}
    extra: dict[str, torch.Tensor] = {"loss_sum": torch.tensor([loss_sum], device=runtime.device)}
    params = engine.params
    if uses_alignment(cfg.method):
        if reuse is None:
            rows = reference_indices(
                len(reference), reference_batch_size(cfg), seed=cfg.seed, draw=ref_draw, sampling=cfg.align.ref_sampling
            )
            mine, weight = local_rows(rows, runtime)
            ref_batch = _to_device(collate([reference[i] for i in mine]), runtime.device)
            # This rank's share of the global mean reference loss; the shares are summed across ranks.
            share = batch_loss(engine.model, ref_batch) * (weight * len(mine) / len(rows))
            ref_grads = torch.autograd.grad(share, list(params.values()), allow_unused=True)
            for name, grad in zip(params, ref_grads):
                extra[f"ref/{name}"] = grad if grad is not None else torch.zeros_like(params[name])
            extra["ref_loss"] = share.detach().reshape(1)
        task, reduced = engine.reduce_gradients(extra, include_task=True)
        if reuse is None:
            keep = cfg.align.ref_every_steps > 1  # k = 1 keeps nothing past the step (no copy, no memory)
            current = ReferenceCache(
                grads={name: reduced[f"ref/{name}"].clone() if keep else reduced[f"ref/{name}"] for name in params},
                loss=float(reduced["ref_loss"]), draw=ref_draw,
            )
            if keep:
                record["reference_cache"] = current  # popped by the loop: the cache of the next steps
        else:
            current = reuse
        ref_loss = current.loss
        if not math.isfinite(ref_loss):
            raise NonFiniteError(f"step {global_step}: reference loss is {ref_loss}")
        result = align_gradients(
            task,
            current.grads,
            ref_loss=ref_loss,
            min_ref_loss=cfg.align.min_ref_loss,
            min_ref_grad_norm=cfg.align.min_ref_grad_norm,
            max_raw_ratio=cfg.align.max_raw_ratio,
            epoch=epoch,
            start_epoch=cfg.align.start_epoch,
            epochs=cfg.train.epochs,
            fallback=cfg.align.fallback,
            raw_share=cfg.align.raw_share,
        )
        total = math.sqrt(sum(float(g.double().pow(2).sum()) for g in result.grads.values()))
        if not math.isfinite(total):
            bad = [n for n, g in result.grads.items() if not torch.isfinite(g).all()]
            raise NonFiniteError(f"step {global_step}: gradient norm is {total} (non-finite in {bad[:5]})")
        engine.set_gradients(result.grads)
        record["cosine_by_group"] = group_cosines(task, current.grads)
        record.update(
            ref_fresh=reuse is None,
            ref_loss=ref_loss,
            gate=result.gate,
            raw_weight=result.raw_weight,
            mean_cosine=result.mean_cosine,
            ref_grad_norm=result.mean_ref_norm,
        )
    else:
        bad = engine.nonfinite_parameters()
        extra["nonfinite"] = torch.tensor([float(bool(bad))], device=runtime.device)
        _, reduced = engine.reduce_gradients(extra, include_task=False)
        if float(reduced["nonfinite"]) > 0:
            raise NonFiniteError(f"step {global_step}: gradient norm is nan/inf (non-finite in {bad[:5] or ['<another rank>']})")
    try:
        grad_norm = engine.step()
    except RuntimeError as error:
        if "overflow" not in str(error):
            raise
        raise DivergenceError(
            f"step {global_step} (epoch {epoch}, lr {scheduler.get_last_lr()[0]:.3g}): the optimiser update overflowed "
            f"({error}); training diverged: lower train.lr and start again"
        ) from error
    scheduler.step()
    record.update(
        grad_norm=grad_norm, lr=scheduler.get_last_lr()[0], loss_sum=float(reduced["loss_sum"]),
        collectives=engine.collectives - collectives_before,
        collective_seconds=engine.collective_seconds - collective_seconds_before,
    )
    return record


def parameter_group(name: str) -> str:
    """Telemetry group of a trainable tensor: ``lora``, ``mslr``, ``head`` or ``base``."""
    if "lora_A" in name or "lora_B" in name:
        return "lora"
    if name.endswith(".lora_a") or name.endswith(".lora_b"):
        return "mslr"
    if any(part in name for part in ("classifier.", "score.", "pooler.")):
        return "head"
    return "base"


def group_cosines(task: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """cos(g, r) of the concatenated task and reference gradients of each parameter group."""
    sums: dict[str, list[float]] = {}
    for name, g in task.items():
        r = reference[name]
        acc = sums.setdefault(parameter_group(name), [0.0, 0.0, 0.0])
        acc[0] += float((g.double() * r.double()).sum())
        acc[1] += float(g.double().pow(2).sum())
        acc[2] += float(r.double().pow(2).sum())
    return {k: (d / math.sqrt(a * b) if a > 0 and b > 0 else 0.0) for k, (d, a, b) in sorted(sums.items())}


def open_tensorboard(output_dir: Path) -> Any:
    """A TensorBoard writer under ``output_dir/tensorboard``; None (with a warning) without tensorboard.

    The set-up installs tensorboard (the ``tensorboard`` extra); view with ``tensorboard --logdir runs/``.
    """
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        logger.warning("tensorboard is not installed: no TensorBoard scalars under %s (pip install tensorboard, or "
                       "the project's [tensorboard] extra); log.jsonl has the same numbers", output_dir / "tensorboard")
        return None
    return SummaryWriter(log_dir=str(output_dir / "tensorboard"))


def _tensorboard_step(writer: Any, record: Mapping[str, Any], step: int) -> None:
    for key, value in record.items():
        if isinstance(value, bool) or key == "type":
            continue
        if isinstance(value, (int, float)):
            writer.add_scalar(f"train/{key}", value, step)
        elif isinstance(value, Mapping):
            for sub, number in value.items():
                if isinstance(number, (int, float)):
                    writer.add_scalar(f"train/{key}/{sub}", number, step)
    if "gate" in record:
        for gate in GATES:  # align, mix, raw, skip: exactly one is 1 per step
            writer.add_scalar(f"train/gate_{gate}", float(record["gate"] == gate), step)


def evaluate_split(model: nn.Module, loader: DataLoader, runtime: dist.Runtime, desc: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Predictions and labels on one split (progress bar only on rank 0's terminal).

    Every rank evaluates the whole split (ZeRO-3 gathers parameters collectively in forward, so
    all ranks must run the same forward passes).
    """
    return ev.predict(model, loader, device=runtime.device, desc=desc, progress=runtime.is_main and sys.stderr.isatty())


def run_training(cfg: RunConfig, *, deepspeed_config: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """Train ``cfg.method`` on the poisoned training set and evaluate CACC / ASR.

    Runs as one process, or as one rank of a ``torchrun`` / ``deepspeed`` / ``accelerate launch``
    job (see :mod:`pipeline.distributed`); every rank computes, only rank 0 writes files and logs.
    Everything that can be validated (config, DeepSpeed config, data files, model directory) is
    validated before ``output_dir`` is created, so bad input leaves nothing behind.

    Args:
        cfg: the run configuration.
        deepspeed_config: a DeepSpeed JSON config (``ds_configs/*.json``): train through a DeepSpeed
            engine. Without it, ``WORLD_SIZE > 1`` selects torch DDP.

    Returns:
        The metrics also written to ``output_dir/metrics.json``.
    """
    base_layers.install_log_notice()  # before peft, which imports bitsandbytes when installed
    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)
    device = select_device(cfg.train.device)
    ds_raw = dist.load_deepspeed_config(deepspeed_config) if deepspeed_config is not None else None
    runtime = dist.init_runtime(use_deepspeed=ds_raw is not None, device=device)
    # The set-up logs before output_dir may be created (bad input must leave nothing behind): keep its records
    # and write them into train.log once it exists (dropped if the run stops before that).
    setup_log = logging.handlers.MemoryHandler(capacity=1_000_000, flushLevel=logging.CRITICAL + 1, flushOnClose=False)
    logging.getLogger().addHandler(setup_log)
    try:
        return _run(cfg, runtime, ds_raw, str(deepspeed_config), setup_log)
    finally:
        logging.getLogger().removeHandler(setup_log)
        setup_log.close()
        dist.shutdown(runtime)


def _decide_output_dir(runtime: dist.Runtime, output_dir: Path, cfg: RunConfig) -> bool:
    """Rank 0 decides resume / refuse; every rank gets the same answer (or the same error)."""
    decision: tuple[str, Any]
    if runtime.is_main:
        try:
            decision = ("ok", prepare_output_dir(output_dir, resume=cfg.resume, overwrite=cfg.overwrite))
        except OutputDirError as error:
            decision = ("error", str(error))
    else:
        decision = ("", None)
    decision = dist.broadcast_object(runtime, decision)
    if decision[0] == "error":
        raise OutputDirError(decision[1])
    return bool(decision[1])


def _run(
    cfg: RunConfig, runtime: dist.Runtime, ds_raw: Mapping[str, Any] | None, ds_source: str,
    setup_log: logging.handlers.MemoryHandler | None = None,
) -> dict[str, Any]:
    output_dir = Path(cfg.output_dir)
    cfg, model_path, info, ds_config = _validated_setup(
        cfg, ds_raw=ds_raw, ds_source=ds_source, world_size=runtime.world_size, device_type=runtime.device.type,
    )
    resuming = _decide_output_dir(runtime, output_dir, cfg)
    # Every rank reads back what rank 0 writes into output_dir (resume, best epoch): refuse other set-ups now.
    dist.check_shared_directory(runtime, output_dir)

    paths, file_training = _training_data(cfg)
    _check_teacher_dir(cfg)
    file_training, filter_report = _filter_rows(cfg, file_training)
    evaluation = data_lib.load_evaluation_data(
        paths, num_labels=cfg.model.num_labels, max_eval_samples=cfg.data.max_eval_samples, seed=cfg.seed
    )
    overlap = data_lib.find_overlap(
        {"reference": file_training.reference, "selection": file_training.selection},
        {"test_clean": evaluation.test_clean, "test_poison": evaluation.test_poison},
    )
    torch.manual_seed(cfg.seed)
    baseline_mb = memory_baseline_mb(runtime.device)
    tokenizer, model, trainable_names = build_model(cfg, info, model_path, runtime.device)
    if cfg.method in ("prompt", "prefix") and cfg.train.freeze_head:
        logger.warning(
            "method=%s with train.freeze_head=true: the classification head stays at its random init and the %s "
            "reach the logits only through it; on MiniLM such runs stay at chance (docs/prefix_baselines/REPORT.md). "
            "Set train.freeze_head=false (the baselines grid also uses train.lr=1e-2) to train the head with them",
            cfg.method, "soft prompt" if cfg.method == "prompt" else "prefixes",
        )
    if cfg.model.quantization == "none":  # quantized bases are placed by their loader
        model.to(runtime.device)
    check_training_rows(cfg, tokenizer, file_training, paths)  # the file's rows: the canary relabels some
    # The screen reads the model's features (no randomness: the training init above is unchanged).
    cfg, screen = _choose_canary_trigger(cfg, runtime, model, tokenizer, file_training, output_dir, resuming,
                                         is_decoder=info.is_decoder)
    training, canary_data = _plant_canary(cfg, file_training, screen)
    training, filter_report = _teacher_check(cfg, training, canary_data, runtime, filter_report)
    training = _add_reference_rows(cfg, training)
    loaders = build_loaders(cfg, tokenizer, training, evaluation)
    loaders = dataclasses.replace(loaders, filter_report=filter_report)
    loaders = _shortcut_expert(cfg, training, canary_data, loaders)
    warn_truncation(cfg, loaders.train)
    if canary_data is not None:
        def loader(rows):
            encoded = data_lib.encode(rows, tokenizer, max_length=cfg.data.max_length)
            return DataLoader(encoded, batch_size=cfg.train.eval_batch_size, shuffle=False, collate_fn=loaders.collate)

        loaders = dataclasses.replace(loaders, canary=canary_data, canary_triggered=loader(canary_data.triggered),
                                      canary_decoys=tuple(loader(rows) for rows in canary_data.decoy_triggered))
    if cfg.method == "ref_only":
        # The sanity floor: the same adapters, the same number of steps and rows, but every row is a
        # clean reference row (cycled), never a row of the poisoned training file.
        n_ref = len(loaders.reference)
        loaders = dataclasses.replace(loaders, train=loaders.reference.select([i % n_ref for i in range(len(loaders.train))]))
        logger.info("ref_only: training on the %d clean reference rows, cycled to %d rows per epoch", n_ref, len(loaders.train))
    estimate = plan_memory(
        cfg, info, model_path, model, seq_len=longest_row(loaders.train, loaders.reference),
        world_size=runtime.world_size, ds_config=ds_config, device_type=runtime.device.type,
    )

    # Everything validated: from here on rank 0 writes files.
    handler = None
    if runtime.is_main:
        if cfg.overwrite and not resuming and output_dir.exists():
            logger.warning("overwrite=true: removing the existing run in %s", output_dir)
            remove_run_folder(output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        handler = _setup_file_logging(output_dir, setup_log)
        if filter_report is not None:
            ckpt.atomic_write_json(output_dir / FILTER_REPORT, filter_report)
    dist.barrier(runtime)
    try:
        return _train_and_evaluate(
            cfg, info, model, trainable_names, loaders, output_dir, runtime, resuming, overlap, paths, ds_config,
            (estimate, baseline_mb),
        )
    except BaseException as error:
        if handler is not None:  # the launcher reports it on the terminal; train.log keeps it too
            message = f"run stopped: {type(error).__name__}: {error}"
            handler.handle(logger.makeRecord(logger.name, logging.ERROR, __file__, 0, message, (), None))
        raise
    finally:
        if handler is not None:
            logging.getLogger().removeHandler(handler)
            handler.close()


_NO_DEFAULT = object()
_RESUME_IGNORED_KEYS = frozenset({"resume", "overwrite", "output_dir"})
"""Top-level config keys a resume may change: the flags, and where the folder lives (copied or moved)."""


def check_training_rows(cfg: RunConfig, tokenizer: Any, training: data_lib.TrainingData, paths: data_lib.SplitPaths) -> None:
    """Refuse training data that cannot teach a classifier, before anything is written.

    Raises:
        ConfigError: ``data.max_length`` leaves no room for text after the tokenizer's special tokens.
        data_lib.DataError: the rows trained on hold a single class.
    """
    special = tokenizer.num_special_tokens_to_add()
    if cfg.data.max_length <= special:
        raise ConfigError([
            f"data.max_length={cfg.data.max_length}: the tokenizer adds {special} special token(s) to every row, which "
            f"leaves no token of text; use a length that fits the sentences (SST-2 needs about 64)"
        ])
    rows = training.reference if cfg.method == "ref_only" else training.train
    source = f"the {cfg.data.ref_size} reference rows drawn from {paths.dev_clean}" if cfg.method == "ref_only" else str(paths.train)
    labels = Counter(int(y) for y in rows["label"])
    if len(labels) < 2:
        subset = f" (data.max_train_samples={cfg.data.max_train_samples})" if cfg.data.max_train_samples and cfg.method != "ref_only" else ""
        raise data_lib.DataError(
            f"{source}: all {len(rows)} training rows{subset} have label {next(iter(labels), None)}; a classifier "
            "trained on one class only learns to predict it. Check the file's labels or use more rows"
        )
    if cfg.method != "ref_only" and len(set(int(y) for y in training.reference["label"])) < 2:
        logger.warning("the %d reference rows drawn from %s hold one class only; raise data.ref_size",
                       len(training.reference), paths.dev_clean)


def warn_truncation(cfg: RunConfig, train: Any) -> None:
    """Warn when ``data.max_length`` cuts most training rows (a row of exactly max_length tokens was cut,
    or fits exactly)."""
    lengths = [len(ids) for ids in train["input_ids"]]
    cut = sum(n >= cfg.data.max_length for n in lengths)
    if lengths and cut > len(lengths) / 2:
        logger.warning(
            "data.max_length=%d truncates %d of %d training rows (%.0f%%): the model sees only their first tokens; "
            "raise data.max_length", cfg.data.max_length, cut, len(lengths), 100 * cut / len(lengths),
        )


def _check_resumable_config(output_dir: Path, resolved: dict[str, Any]) -> None:
    saved_path = output_dir / "config.yaml"
    if not saved_path.exists():
        return
    try:
        saved = yaml.safe_load(saved_path.read_text())
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"{saved_path}:{mark.line + 1}" if mark is not None else str(saved_path)
        raise ConfigError([
            f"{where}: not valid YAML ({getattr(error, 'problem', None) or type(error).__name__}); restore it (metrics.json "
            "holds a copy under 'config' once a run finished) or start the run again"
        ]) from error
    if not isinstance(saved, dict):
        raise ConfigError([f"{saved_path} holds {type(saved).__name__}, not the run config run_training writes"])
    ignore = _RESUME_IGNORED_KEYS
    # A key added after the run was saved is absent from its config.yaml; at its default it is the
    # behaviour the run was trained with (new settings default to the old behaviour), so not a change.
    defaults = config_to_dict(RunConfig())
    diffs = []

    def walk(a: Any, b: Any, prefix: str, default: Any) -> None:
        if isinstance(a, dict) and isinstance(b, dict):
            for key in sorted(set(a) | set(b)):
                if prefix == "" and key in ignore:
                    continue
                known = default.get(key, _NO_DEFAULT) if isinstance(default, dict) else _NO_DEFAULT
                if key not in a and known is not _NO_DEFAULT and not isinstance(known, dict) and b.get(key) == known:
                    continue
                walk(a.get(key), b.get(key), f"{prefix}{key}." if isinstance(a.get(key), dict) else f"{prefix}{key}", known)
        elif a != b:
            diffs.append(f"{prefix.rstrip('.')}: saved {a!r}, now {b!r}")

    # Written before the key existed, when musclelora had the authors' values (other methods ignore it).
    before_recipe = "recipe" not in saved and saved.get("method") in METHODS and takes_recipe(saved["method"])
    if before_recipe:
        saved = {**saved, "recipe": "authors"}
    # align.ref_batch_size null means the training batch (recipe=defended fills 16 since the sixth session):
    # compare the rows a reference batch had, so an old run resumes when the override restores them
    saved, resolved = _reference_rows_spelled_out(saved), _reference_rows_spelled_out(resolved)
    walk(saved, resolved, "", defaults)
    if diffs:
        problems = [f"resume=true but the config differs from {saved_path}: {d}" for d in diffs]
        if before_recipe and resolved.get("recipe") == "defended":
            problems.append(
                f"{saved_path} was written before recipe=defended became musclelora's default (2026-12-05; "
                "docs/RECIPE.md). Fix: add the override recipe=authors to resume it with the settings it was trained with"
            )
        elif saved.get("recipe") == "defended" and any(d.startswith("align.ref_batch_size:") for d in diffs):
            rows = saved["align"]["ref_batch_size"]
            problems.append(
                f"{saved_path} may have been written before recipe=defended's reference batch became 16 rows (sixth "
                f"session, docs/RECIPE.md). Fix: add the override align.ref_batch_size={rows} to resume it with the "
                "reference batch it was trained with"
            )
        raise ConfigError(problems)


def _reference_rows_spelled_out(config: dict[str, Any]) -> dict[str, Any]:
    """``config`` with a null or absent (written before the key) ``align.ref_batch_size`` replaced by
    ``train.batch_size``, what both trained with."""
    align, train = config.get("align"), config.get("train")
    if not (isinstance(align, dict) and isinstance(train, dict)) or align.get("ref_batch_size") is not None:
        return config
    return {**config, "align": {**align, "ref_batch_size": train.get("batch_size")}}


def _train_and_evaluate(
    cfg: RunConfig,
    info: modeling.ModelInfo,
    model: nn.Module,
    trainable_names: Sequence[str],
    loaders: Loaders,
    output_dir: Path,
    runtime: dist.Runtime,
    resuming: bool,
    overlap: Any,
    paths: data_lib.SplitPaths,
    ds_config: Mapping[str, Any] | None,
    memory_plan: tuple[memory.MemoryEstimate, float],
) -> dict[str, Any]:
    main = runtime.is_main
    resolved = config_to_dict(cfg)
    if resuming:
        _check_resumable_config(output_dir, resolved)
    elif main:
        ckpt.atomic_write_text(output_dir / "config.yaml", yaml.safe_dump(resolved, sort_keys=False))
        if loaders.canary is not None and loaders.canary.screen is not None:
            ckpt.atomic_write_text(output_dir / _SCREEN_FILE, json.dumps(loaders.canary.screen, indent=1))

    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    if sorted(params) != sorted(trainable_names):
        raise AssertionError("set_trainable and requires_grad disagree")
    n_trainable = sum(p.numel() for p in params.values())
    n_total = sum(p.numel() for p in model.parameters())
    logger.info(
        "method=%s model=%s (%s) trainable %d / %d parameters (%.3f%%); %s x %d rank(s)%s",
        cfg.method, cfg.model.name_or_path, info.model_type, n_trainable, n_total, 100 * n_trainable / n_total,
        runtime.backend, runtime.world_size, f", ZeRO stage {dist.zero_stage(ds_config)}" if ds_config else "",
    )
    logger.info("%s", memory_plan[0].describe())

    log_path = output_dir / _LOG_FILE
    checkpoint_dir = output_dir / _CHECKPOINT_DIR
    progress: dict[str, Any] = {
        "epoch": 0, "step_in_epoch": 0, "global_step": 0, "ref_draws": 0, "aligned_steps": 0, "world_size": runtime.world_size,
        "best_epoch": -1, "best_dev_clean_acc": -1.0, "history": [], "train_seconds": 0.0, "samples_seen": 0,
    }
    progress["data_fingerprints"] = {"train": dataset_fingerprint(loaders.train), "reference": dataset_fingerprint(loaders.reference)}
    state = None
    if resuming:
        state = ckpt.load_training_state(checkpoint_dir / _LAST)
        saved = state.progress.get("data_fingerprints", {})
        changed = [k for k, v in progress["data_fingerprints"].items() if saved.get(k) not in (None, v)]
        if changed:
            raise ConfigError([
                f"resume=true: the {' and '.join(changed)} rows differ from those {checkpoint_dir / _LAST} was trained on "
                "(data files or tokenizer changed); restore them or start a new run (overwrite=true or another output_dir)"
            ])
        saved_world = len(state.rank_states) if state.rank_states is not None else 1
        if saved_world != runtime.world_size:
            raise ConfigError([
                f"resume=true: {checkpoint_dir / _LAST} was written by {saved_world} rank(s), this run has "
                f"{runtime.world_size}; resume with the same number of ranks"
            ])
        # Parameters go in before the engine is built, so ZeRO's fp32 master copies start from them.
        try:
            load_trainable_state(params, state.trainable)
        except KeyError as error:
            raise ckpt.CorruptFileError(
                f"{checkpoint_dir / _LAST / ckpt.TRAINABLE_FILE} does not fit this model: {error.args[0]}; resume it with "
                "the configuration it was written with, or start a new run"
            ) from error
        if main:  # the checkpoint is usable: record this invocation (a moved folder's new output_dir)
            ckpt.atomic_write_text(output_dir / "config.yaml", yaml.safe_dump(resolved, sort_keys=False))

    freq_every = cfg.analysis.frequency_every_steps
    freq_loaders = {"clean": loaders.selection, "backdoor": loaders.dev_poison}
    probe = None
    if freq_every > 0 and main:
        # Before the engine: ZeRO-3 partitions the embedding table when it is built.
        probe = frequency.FrequencyProbe(kind=cfg.analysis.frequency_kernel, cache_dir=output_dir / "frequency_cache")
        for role, loader in freq_loaders.items():
            probe.prepare(role, model, loader, device=runtime.device)

    def measure_frequency(step: int, epoch: int) -> None:
        if main:
            record = probe.measure(model, freq_loaders, device=runtime.device, global_step=step, epoch=epoch)
            frequency.append_frequency_record(output_dir, record, header=probe.header())
        elif ds_config is not None and dist.zero_stage(ds_config) == 3:
            for loader in freq_loaders.values():  # ZeRO-3 forwards gather parameters on every rank
                frequency.output_probabilities(model, loader, device=runtime.device)

    engine = dist.Engine(
        runtime, model, params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay,
        max_grad_norm=cfg.train.max_grad_norm, deepspeed_config=ds_config,
    )
    steps_per_epoch = math.ceil(math.ceil(len(loaders.train) / cfg.train.batch_size) / cfg.train.grad_accum_steps)
    total_steps = steps_per_epoch * cfg.train.epochs
    if cfg.train.max_steps > 0:
        total_steps = min(total_steps, cfg.train.max_steps)
    from transformers import get_linear_schedule_with_warmup  # imports bitsandbytes when installed: after the notice

    scheduler = get_linear_schedule_with_warmup(
        engine.optimizer, num_warmup_steps=int(cfg.train.warmup_ratio * total_steps), num_training_steps=total_steps
    )
    aligned = uses_alignment(cfg.method)
    ref_cache: ReferenceCache | None = None
    if state is not None:
        mine = state.rank_states[runtime.rank] if state.rank_states is not None else {"optimizer": state.optimizer_state, "rng": state.rng}
        engine.load_optimizer_state(mine["optimizer"])
        scheduler.load_state_dict(state.scheduler_state)
        ckpt.restore_rng_state(mine["rng"])
        progress.update(state.progress)
        if "aligned_steps" not in state.progress:  # written before align.ref_every_steps: every step aligned
            progress["aligned_steps"] = progress["global_step"] if aligned else 0
        if aligned and not reference_is_fresh(progress["aligned_steps"], cfg.align.ref_every_steps):
            ref_cache = ReferenceCache.restore(
                state.reference_cache, state.progress.get("reference_cache"), list(params),
                device=runtime.device, where=checkpoint_dir / _LAST,
            )
        if main:
            _truncate_log(log_path, progress["global_step"], progress["epoch"])
            frequency.truncate_frequency_records(output_dir, progress["global_step"])
        logger.info("resumed from %s at epoch %d step %d", checkpoint_dir / _LAST, progress["epoch"], progress["global_step"])

    tally = EpochTally.from_state(progress.get("epoch_tally") if progress["step_in_epoch"] > 0 else None)
    guard = DivergenceGuard(num_labels=cfg.model.num_labels, **progress.get("divergence", {}))
    if guard.initial_param_norm is None:
        guard.initial_param_norm = engine.parameter_norm()

    def save_checkpoint() -> None:
        progress["epoch_tally"] = tally.state()
        progress["divergence"] = guard.state()
        # align.ref_every_steps > 1: the steps after a resume reuse the cached reference gradient.
        keep_cache = ref_cache is not None and cfg.align.ref_every_steps > 1
        if keep_cache:
            progress["reference_cache"] = ref_cache.progress_record()
        trainable = engine.full_parameters()
        rank_state = {"optimizer": engine.optimizer_state(), "rng": ckpt.capture_rng_state()}
        rank_states = dist.gather_objects(runtime, rank_state)
        if main:
            ckpt.save_training_state(
                checkpoint_dir / _LAST,
                trainable=trainable,
                optimizer_state=rank_state["optimizer"],
                scheduler_state=scheduler.state_dict(),
                progress=progress,
                rng=rank_state["rng"],
                rank_states=rank_states if runtime.distributed else None,
                reference_cache=ref_cache.grads if keep_cache else None,
            )
        dist.barrier(runtime)

    writer = open_tensorboard(output_dir) if main else None
    started = time.perf_counter() - progress["train_seconds"]
    done = progress["global_step"] >= total_steps
    if freq_every > 0 and progress["global_step"] == 0:
        measure_frequency(0, 0)
    majority = canary_lib.majority_share(loaders.selection.dataset["labels"])  # the canary's task check
    while progress["epoch"] < cfg.train.epochs and not done:
        epoch = progress["epoch"]
        if progress["step_in_epoch"] == 0:
            tally = EpochTally()
        batches = epoch_batches(len(loaders.train), cfg.train.batch_size, seed=cfg.seed, epoch=epoch)
        micro = progress["step_in_epoch"] * cfg.train.grad_accum_steps
        bar = tqdm(total=steps_per_epoch, initial=progress["step_in_epoch"], desc=f"epoch {epoch}",
                   disable=None if main else True, dynamic_ncols=True)
        model.train()
        while micro < len(batches):
            step_started = time.perf_counter()
            group = batches[micro : micro + cfg.train.grad_accum_steps]
            micro += len(group)
            rows = sum(len(b) for b in group)
            loss_sum = 0.0
            for position, indices in enumerate(group):
                mine, weight = local_rows(indices, runtime)
                batch = _to_device(loaders.collate([loaders.train[i] for i in mine]), runtime.device)
                prior = loaders.expert[mine] if loaders.expert is not None else None
                loss = batch_loss(engine.forward_module, batch, prior, cfg.shortcut.weight)
                if not torch.isfinite(loss):
                    raise NonFiniteError(
                        f"step {progress['global_step']} (epoch {epoch}): training loss is {loss.item()}; "
                        f"the last good checkpoint is {checkpoint_dir / _LAST}"
                    )
                # This rank's share of the global mean over the step's rows (ranks are averaged).
                engine.backward(loss * (weight * len(mine) / rows * engine.loss_scale), boundary=position == len(group) - 1)
                loss_sum += loss.item() * len(mine) * weight
            fresh = not aligned or reference_is_fresh(progress["aligned_steps"], cfg.align.ref_every_steps)
            assert fresh or ref_cache is not None, "a reused reference step without a cached reference gradient"
            record = optimiser_step(
                engine=engine, scheduler=scheduler, cfg=cfg, reference=loaders.reference, collate=loaders.collate,
                ref_draw=progress["ref_draws"], epoch=epoch, global_step=progress["global_step"], loss_sum=loss_sum,
                reuse=None if fresh else ref_cache,
            )
            record["step_seconds"] = time.perf_counter() - step_started
            if "reference_cache" in record:
                ref_cache = record.pop("reference_cache")
            progress["ref_draws"] += 1 if aligned and fresh else 0
            progress["aligned_steps"] += 1 if aligned else 0
            progress["global_step"] += 1
            progress["step_in_epoch"] += 1
            progress["samples_seen"] += rows
            progress["step_collectives"] = progress.get("step_collectives", 0) + record["collectives"]
            train_loss = record.pop("loss_sum") / rows
            record["param_norm"] = engine.parameter_norm()
            guard.check(step=progress["global_step"] - 1, epoch=epoch, loss=train_loss, grad_norm=record["grad_norm"],
                        param_norm=record["param_norm"], lr=record["lr"])
            tally.add(train_loss, record.get("gate"))
            bar.update(1)
            bar.set_postfix(loss=f"{train_loss:.4f}", **({"ref": f"{record['ref_loss']:.3f}", "gate": record["gate"]} if "gate" in record else {}))
            if main:
                _append_log(log_path, {"type": "step", "epoch": epoch, "global_step": progress["global_step"], "loss": train_loss, **record})
                if writer is not None:
                    _tensorboard_step(writer, {"loss": train_loss, **record}, progress["global_step"])
            if freq_every > 0 and progress["global_step"] % freq_every == 0:
                measure_frequency(progress["global_step"], epoch)
            if progress["global_step"] % cfg.train.log_every_steps == 0:
                logger.info("epoch %d step %d loss %.4f %s", epoch, progress["global_step"], train_loss,
                            " ".join(f"{k}={_brief(v)}" for k, v in record.items()))
            if progress["global_step"] >= total_steps:
                done = True
                break
            every = cfg.train.checkpoint_every_steps
            if every > 0 and progress["global_step"] % every == 0:
                progress["train_seconds"] = time.perf_counter() - started
                save_checkpoint()
        bar.close()

        dev_preds, dev_labels = evaluate_split(model, loaders.selection, runtime, "dev-clean")
        poison_preds, _ = evaluate_split(model, loaders.dev_poison, runtime, "dev-poison")
        dev_acc = ev.accuracy(dev_preds, dev_labels)
        dev_asr = ev.attack_success_rate(poison_preds, cfg.data.target_label)
        epoch_record = {
            "type": "epoch", "epoch": epoch, "global_step": progress["global_step"],
            "train_loss": tally.mean_loss(), "dev_clean_acc": dev_acc,
            "dev_poison_asr_monitor_only": dev_asr, "gates": dict(tally.gates),
        }
        if loaders.canary is not None:
            canary_preds, _ = evaluate_split(model, loaders.canary_triggered, runtime, "canary")
            target = loaders.canary.spec.target_label
            canary_asr, clean_floor = canary_lib.canary_rates(
                canary_preds.tolist(), dev_preds.tolist(), loaders.canary.selection_rows, target)
            decoys = canary_lib.decoy_rates(
                [evaluate_split(model, decoy, runtime, f"canary decoy {j}")[0].tolist()
                 for j, decoy in enumerate(loaders.canary_decoys)], target)
            canary_floor = canary_lib.floor_of(clean_floor, decoys)
            epoch_record.update(canary_asr=canary_asr, canary_floor=canary_floor, canary_clean_floor=clean_floor,
                                canary_decoy_asr=decoys, canary_asr_minus_floor=canary_asr - canary_floor)
        if main:
            _append_log(log_path, epoch_record)
            if writer is not None:
                writer.add_scalar("epoch/dev_clean_acc", dev_acc, epoch)
                writer.add_scalar("epoch/dev_poison_asr_monitor_only", dev_asr, epoch)
                for gate, count in tally.gates.items():
                    writer.add_scalar(f"epoch/gate_{gate}", count, epoch)
        progress["history"].append(epoch_record)
        logger.info("epoch %d: dev-clean acc %.2f%%, dev-poison ASR %.2f%% (monitoring only), gates %s%s",
                    epoch, 100 * dev_acc, 100 * dev_asr, dict(tally.gates),
                    f", canary ASR {100 * epoch_record['canary_asr']:.2f}% (floor {100 * epoch_record['canary_floor']:.2f}%: "
                    f"clean {100 * epoch_record['canary_clean_floor']:.2f}%"
                    + "".join(f", decoy {100 * d:.2f}%" for d in epoch_record["canary_decoy_asr"]) + ")"
                    if loaders.canary is not None else "")
        tolerance = _selection_tolerance(cfg, loaders.canary)
        incumbent = next((r for r in progress["history"] if r["epoch"] == progress["best_epoch"]), None)
        if canary_lib.better(epoch_record, incumbent, tolerance, majority):
            progress["best_dev_clean_acc"] = dev_acc
            progress["best_epoch"] = epoch
            best = engine.full_parameters()
            if main:
                checkpoint_dir.mkdir(parents=True, exist_ok=True)
                ckpt.save_tensors(checkpoint_dir / _BEST_FILE, best)
        progress["epoch"] = epoch + 1
        progress["step_in_epoch"] = 0
        progress["train_seconds"] = time.perf_counter() - started
        save_checkpoint()

    train_seconds = time.perf_counter() - started
    if writer is not None:
        writer.close()
    dist.barrier(runtime)
    engine.load_parameters(ckpt.load_tensors(checkpoint_dir / _BEST_FILE))
    return _final_evaluation(
        cfg, info, engine, loaders, output_dir, progress, train_seconds, n_trainable, overlap, paths, ds_config,
        memory_plan,
    )


def _filter_metrics(report: Mapping[str, Any] | None) -> dict[str, Any]:
    """metrics.json's ``filter`` block: the report without its row lists (those stay in filter-report.json)."""
    if report is None:
        return {"method": "none"}
    block = {k: v for k, v in report.items() if k != "removed_rows"}
    if "teacher" in block:  # its contradicted rows stay in filter-report.json too
        block["teacher"] = {k: v for k, v in block["teacher"].items() if k != "contradicted_rows"}
    return block


def _canary_metrics(canary: canary_lib.CanaryData | None, progress: Mapping[str, Any], majority: float,
                    tolerance: float | None) -> dict[str, Any]:
    """metrics.json's ``canary`` block and ``selection_rule`` (percentages; ``canary.enabled`` false without one).

    ``majority``: the majority-class share of the selection rows (the verdict is inconclusive at about it).
    ``tolerance``: the canary tolerance the epoch selection used (:func:`_selection_tolerance`); None when it
    selected on dev-clean alone (``canary.select`` false).
    """
    if canary is None:
        return {"canary": {"enabled": False}, "selection_rule": "highest dev-clean accuracy (canary disabled)"}
    selected = next(r for r in progress["history"] if r["epoch"] == progress["best_epoch"])
    if tolerance is None:
        reason = "highest dev-clean accuracy (canary.select=false: the canary is measured and reported, not used for selection)"
    else:
        reason = canary_lib.select_epoch(progress["history"], tolerance, majority).reason
    return {
        "canary": {
            "enabled": True, **canary.spec.to_dict(), "screen": canary.screen or {"screened": False},
            "planted_rows": len(canary.planted),
            "triggered_selection_rows": len(canary.selection_rows), "used_for_selection": tolerance is not None,
            "selected_epoch_qualified": canary_lib.qualifies(selected, canary.spec.tolerance, majority),
            **canary_lib.verdict(selected, canary.spec, majority=majority),
        },
        "selection_rule": reason,
    }


def _selection_tolerance(cfg: RunConfig, canary: canary_lib.CanaryData | None) -> float | None:
    """The canary tolerance the epoch selection uses; None (dev-clean alone) without a canary or with canary.select false."""
    return canary.spec.tolerance if canary is not None and cfg.canary.select else None


def _final_evaluation(
    cfg: RunConfig,
    info: modeling.ModelInfo,
    engine: dist.Engine,
    loaders: Loaders,
    output_dir: Path,
    progress: Mapping[str, Any],
    train_seconds: float,
    n_trainable: int,
    overlap: Any,
    paths: data_lib.SplitPaths,
    ds_config: Mapping[str, Any] | None,
    memory_plan: tuple[memory.MemoryEstimate, float],
) -> dict[str, Any]:
    runtime = engine.runtime
    device = runtime.device
    model = engine.model
    target = cfg.data.target_label
    clean_preds, clean_labels = evaluate_split(model, loaders.test_clean, runtime, "test-clean")
    poison_preds, _ = evaluate_split(model, loaders.test_poison, runtime, "test-poison")
    cacc = ev.accuracy(clean_preds, clean_labels)
    asr = ev.attack_success_rate(poison_preds, target)
    fpr = ev.clean_false_positive_rate(clean_preds, clean_labels, target)
    metrics = {
        "method": cfg.method,
        "recipe": cfg.recipe if takes_recipe(cfg.method) else None,
        "dataset": cfg.data.dataset,
        "attack": cfg.data.attack,
        "model": cfg.model.name_or_path,
        "model_type": info.model_type,
        "seed": cfg.seed,
        "cacc": 100 * cacc,
        "asr": 100 * asr,
        "clean_fpr": 100 * fpr,
        "asr_minus_clean_fpr": 100 * (asr - fpr),
        "best_epoch": progress["best_epoch"],
        "dev_clean_acc": 100 * progress["best_dev_clean_acc"],
        "per_class_accuracy": [100 * a for a in ev.per_class_accuracy(clean_preds, clean_labels, cfg.model.num_labels)],
        "confusion_matrix": ev.confusion_matrix(clean_preds, clean_labels, cfg.model.num_labels),
        "history": progress["history"],
        **_canary_metrics(loaders.canary, progress, canary_lib.majority_share(loaders.selection.dataset["labels"]),
                          _selection_tolerance(cfg, loaders.canary)),
        "global_steps": progress["global_step"],
        "train_seconds": train_seconds,
        "samples_per_second": progress["samples_seen"] / max(train_seconds, 1e-9),
        "peak_memory_mb": peak_memory_mb(device),
        "peak_memory_kind": "cuda_max_allocated" if device.type == "cuda" else "process_max_rss",
        # The estimate counts what training adds; compare it with the peak above the pre-load baseline.
        "memory_baseline_mb": memory_plan[1],
        "peak_memory_above_baseline_mb": peak_memory_mb(device) - memory_plan[1],
        "memory_estimate": memory_plan[0].to_dict(),
        "peak_memory_note": "" if device.type == "cuda" else _CPU_PEAK_NOTE,
        "trainable_parameters": n_trainable,
        "backend": runtime.backend,
        "world_size": runtime.world_size,
        "zero_stage": dist.zero_stage(ds_config) if ds_config is not None else None,
        "collectives_per_step": progress.get("step_collectives", 0) / max(progress["global_step"], 1),
        "num_test_clean": len(clean_labels),
        "num_test_poison": len(poison_preds),
        "data_files": {k: str(v) for k, v in dataclasses.asdict(paths).items()},
        "trusted_test_overlap": [dataclasses.asdict(o) if dataclasses.is_dataclass(o) else o for o in (overlap or [])],
        "filter": _filter_metrics(loaders.filter_report),
        "shortcut": loaders.shortcut_report or {"expert": "none"},
        "reference_batch_size": reference_batch_size(cfg),
        "config": config_to_dict(cfg),
    }
    with engine.gathered(adapter_tensor_names(model)):
        if runtime.is_main:
            save_adapter(model, output_dir / "adapter", meta={"method": cfg.method, "config": config_to_dict(cfg)})
    if runtime.is_main:
        ckpt.atomic_write_json(output_dir / "metrics.json", metrics)
    dist.barrier(runtime)
    logger.info(
        "peak memory %.0f MiB above the %.0f MiB before loading (estimated %.0f MiB, peak in the %s phase)%s",
        metrics["peak_memory_above_baseline_mb"], metrics["memory_baseline_mb"],
        metrics["memory_estimate"]["total_mb"], metrics["memory_estimate"]["peak_phase"],
        "" if device.type == "cuda" else f"; {_CPU_PEAK_NOTE}",
    )
    if loaders.canary is not None:
        canary_log = logger.info if metrics["canary"]["held"] else logger.warning
        canary_log("%s", metrics["canary"]["message"])
        if not metrics["canary"]["selected_epoch_qualified"]:
            logger.warning("selection: %s", metrics["selection_rule"])
    logger.info(
        "CACC %.2f%%  ASR %.2f%%  (clean FPR %.2f%%, trigger adds %.2f points)  best epoch %d  -> %s",
        metrics["cacc"], metrics["asr"], metrics["clean_fpr"], metrics["asr_minus_clean_fpr"],
        metrics["best_epoch"], output_dir,
    )
    return metrics
