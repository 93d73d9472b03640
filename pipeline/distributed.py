"""Data parallelism for MuScleLoRA (Wu et al., ACL 2024, arXiv 2402.12026): one process, torch DDP,
or a DeepSpeed engine at ZeRO stage 0-3. The only module that imports ``torch.distributed`` or
``deepspeed``.

The update every rank applies must equal the update of one process that sees the whole global
batch. With ``W`` ranks, a global micro-batch of ``B`` rows split into shards ``S_k`` and
``grad_accum_steps`` micro-batches per optimiser step (``R`` rows in total):

    g = (1/R) sum_rows grad CE          task gradient (DDP / ZeRO average over ranks: each rank
                                        back-propagates  W * sum_{S_k} CE / R)
    r = (1/B_ref) sum_ref grad CE       reference gradient of the *same* reference batch one
                                        process would draw; rank k computes sum_{ref shard k} / B_ref
                                        and the shares are summed across ranks

Both are needed in full on every rank, because the alignment coefficients are per-tensor dot
products and norms. They travel in **one bucketed all-reduce per optimiser step**:

    bucket = [ task-gradient pieces this rank owns, zero elsewhere | this rank's reference share ]

- single process: no collective;
- DDP and ZeRO stage 0: ``.grad`` already holds the averaged task gradient after backward, so only
  the reference shares (and the reference loss) are in the bucket;
- ZeRO-1/2: each parameter's gradient lives in fragments of the flat fp32 partitions (one per rank,
  disjoint, covering the tensor), placed at their offsets in the bucket;
- ZeRO-3: each rank holds the slice ``[k * P, (k + 1) * P)`` of every flattened gradient.

Summing the bucket gives full ``g`` and ``r`` on every rank; :func:`pipeline.alignment.align_gradients`
then runs identically everywhere and each rank writes its own part of the aligned gradient back
(``deepspeed.utils.safe_set_full_grad``: no communication). Methods without alignment add at most
one scalar all-reduce per step (the non-finite check). :class:`Engine` counts the collectives it
issues in ``collectives``.

Ranks are global (``RANK``): rank 0 writes every file, including each rank's optimizer partition
and RNG state gathered into the checkpoint; ``LOCAL_RANK`` only picks the GPU on a node. Every rank
reads the checkpoint back, so on several nodes ``output_dir`` must be one shared folder, which
:func:`check_shared_directory` verifies at start.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import socket
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from pipeline.config import ConfigError

logger = logging.getLogger(__name__)

Backend = Literal["single", "ddp", "deepspeed"]

# How long a rank waits to see rank 0's file in output_dir (check_shared_directory).
_SHARED_CHECK_ENV = "MUSCLELORA_SHARED_CHECK_SECONDS"

# Keys of a DeepSpeed config that the run config owns (filled in by fill_deepspeed_config).
_OWNED_TOP_LEVEL = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "gradient_clipping")


@dataclass
class Runtime:
    """Where this process sits: backend, rank, world size, device."""

    backend: Backend
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        """True on the rank that writes files, logs and shows progress."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """True when a process group is in use (DDP or DeepSpeed, any world size)."""
        return self.backend != "single"


def _launch_env() -> tuple[int, int, int]:
    """(rank, world size, local rank) from the launcher's environment (torchrun, deepspeed, accelerate)."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("LOCAL_RANK", "0"))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def init_runtime(*, use_deepspeed: bool, device: torch.device) -> Runtime:
    """Join the process group the launcher set up (or none for a plain single process).

    Args:
        use_deepspeed: a DeepSpeed config was given: use a DeepSpeed engine (also on one process).
        device: ``cpu`` or ``cuda``; on CUDA each rank takes ``cuda:LOCAL_RANK``.

    Returns:
        The runtime. Backends: ``deepspeed`` when asked, ``ddp`` when ``WORLD_SIZE > 1``, else ``single``.
    """
    rank, world_size, local_rank = _launch_env()
    if not use_deepspeed and world_size == 1:
        return Runtime("single", device=device)
    if device.type == "cuda":
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    if "MASTER_ADDR" not in os.environ and world_size > 1:
        raise ConfigError([
            f"WORLD_SIZE={world_size} but MASTER_ADDR is not set: start every node with a launcher (torchrun, "
            "deepspeed, accelerate launch; README 'Several GPUs or nodes') or set MASTER_ADDR and MASTER_PORT "
            "to rank 0's host and a free port there"
        ])
    if "MASTER_ADDR" not in os.environ:
        # One process started without a launcher: give torch.distributed a one-rank rendezvous
        # (DeepSpeed would otherwise try MPI discovery).
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    backend = "nccl" if device.type == "cuda" else "gloo"
    if use_deepspeed:
        import deepspeed

        deepspeed.init_distributed(dist_backend=backend)
    elif not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend=backend)
    runtime = Runtime("deepspeed" if use_deepspeed else "ddp", rank, world_size, local_rank, device)
    logger.info("distributed: backend %s, rank %d of %d, device %s", runtime.backend, rank, world_size, device)
    return runtime


def shutdown(runtime: Runtime) -> None:
    """Leave the process group (a no-op for a single process)."""
    if runtime.distributed and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def barrier(runtime: Runtime) -> None:
    """Wait for every rank (a no-op for a single process)."""
    if runtime.distributed:
        torch.distributed.barrier()


def broadcast_object(runtime: Runtime, value: Any) -> Any:
    """Rank 0's ``value`` on every rank (for decisions only rank 0 may take, e.g. resume or refuse)."""
    if not runtime.distributed:
        return value
    box = [value]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def gather_objects(runtime: Runtime, value: Any) -> list[Any] | None:
    """Every rank's ``value`` as a list on rank 0 (None elsewhere)."""
    if not runtime.distributed:
        return [value]
    out: list[Any] | None = [None] * runtime.world_size if runtime.is_main else None
    torch.distributed.gather_object(value, out, dst=0)
    return out


def _shared_check_seconds() -> float:
    """How long a rank waits for rank 0's probe file (``MUSCLELORA_SHARED_CHECK_SECONDS``, default 30).

    Network file systems may show a new file on another node only after their attribute cache
    expires (NFS: ``acdirmin``, 30 s by default), so a rank that does not see it at once keeps looking.
    """
    text = os.environ.get(_SHARED_CHECK_ENV, "30")
    try:
        seconds = float(text)
    except ValueError:
        raise ConfigError([f"{_SHARED_CHECK_ENV}={text!r}: expected a number of seconds, e.g. 30"]) from None
    if not seconds >= 0:
        raise ConfigError([f"{_SHARED_CHECK_ENV}={text!r}: expected a number of seconds >= 0"])
    return seconds


def _sees_token(path: Path, token: str, wait_seconds: float) -> bool:
    deadline = time.monotonic() + wait_seconds
    while True:
        try:
            os.listdir(path.parent)  # refreshes a network file system's cached view of the folder
            if path.read_text(encoding="utf-8") == token:
                return True
        except OSError:
            pass
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.5)


def _remove_empty(folders: Sequence[Path]) -> None:
    """Remove folders (deepest first) while they are empty; a folder with anything in it stays."""
    for path in folders:
        with contextlib.suppress(OSError):
            path.rmdir()


def check_shared_directory(runtime: Runtime, directory: Path) -> None:
    """Refuse a multi-rank run whose ``directory`` is not the same folder on every rank.

    Only rank 0 writes the run's files (checkpoints hold every rank's optimizer partition and RNG
    state, gathered to rank 0), but every rank reads them back: the checkpoint on resume and the
    best epoch's weights before the final evaluation. Nodes without a common file system would
    each see their own ``output_dir`` and fail late, after training. So rank 0 writes a file with a
    fresh random token into ``directory`` (creating it), every rank reads it back, and the run stops
    on every rank when one rank does not see it. Rank 0 removes the file and the folders it created
    for the check, so a run refused later for another reason leaves nothing behind. A no-op for one
    process.

    Args:
        runtime: this process's place in the job; every rank must call this (it holds collectives).
        directory: the run's ``output_dir`` as this rank resolves it.

    Raises:
        ConfigError: on every rank, naming the ranks and hosts that do not see rank 0's file.
    """
    if not runtime.distributed or runtime.world_size == 1:
        return
    wait_seconds = _shared_check_seconds()
    token = broadcast_object(runtime, uuid.uuid4().hex if runtime.is_main else None)
    probe = directory / f".shared-check-{token}"
    created: list[Path] = []
    failure = None
    if runtime.is_main:
        created = [p for p in (directory, *directory.parents) if not p.exists()]
        try:
            directory.mkdir(parents=True, exist_ok=True)
            with open(probe, "w", encoding="utf-8") as handle:
                handle.write(token)
                handle.flush()
                os.fsync(handle.fileno())
        except OSError as error:
            _remove_empty(created)
            failure = f"output_dir={directory}: rank 0 cannot write there ({error}); choose a writable output_dir"
    failure = broadcast_object(runtime, failure)  # also the barrier: the file is written before anyone looks
    if failure is not None:
        raise ConfigError([failure])
    seen = _sees_token(probe, token, 0.0 if runtime.is_main else wait_seconds)
    reports = gather_objects(runtime, (runtime.rank, socket.gethostname(), str(directory.absolute()), seen))
    problem = None
    if runtime.is_main:
        probe.unlink(missing_ok=True)
        _remove_empty(created)  # the run creates output_dir itself once everything is validated
        blind = [report for report in reports if not report[3]]
        if blind:
            where = "; ".join(f"rank {rank} on host {host} looks in {path}" for rank, host, path, _ in blind)
            problem = (
                f"output_dir={directory}: not shared between the ranks ({where}; not seeing the file rank 0 wrote "
                f"in {directory.absolute()} on host {socket.gethostname()}). Rank 0 writes checkpoints and "
                "adapters there and every rank reads them back (resume, best epoch): put output_dir on a file "
                "system every node mounts at the same path (NFS, Lustre, a shared volume), as an absolute path"
            )
    problem = broadcast_object(runtime, problem)
    if problem is not None:
        raise ConfigError([problem])


def shard_rows(rows: Sequence[int], rank: int, world_size: int) -> list[int]:
    """This rank's contiguous share of one global batch (sizes differ by at most one row)."""
    base, extra = divmod(len(rows), world_size)
    start = rank * base + min(rank, extra)
    return list(rows[start : start + base + (1 if rank < extra else 0)])


# ----------------------------------------------------------------------------- DeepSpeed config


def load_deepspeed_config(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a DeepSpeed JSON config with errors that name the file and line."""
    path = Path(path)
    if not path.is_file():
        presets = sorted(p.name for p in (Path(__file__).resolve().parents[1] / "ds_configs").glob("*.json"))
        raise ConfigError([f"--deepspeed {path}: no such file; presets in ds_configs/: {presets}"])
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ConfigError([f"{path}:{error.lineno}: not valid JSON ({error.msg}); fix the file"]) from error
    if not isinstance(config, dict):
        raise ConfigError([f"{path}: a DeepSpeed config must be a JSON object, got {type(config).__name__}"])
    return config


def zero_stage(config: Mapping[str, Any]) -> int:
    """ZeRO stage of a DeepSpeed config (0 when absent)."""
    return int(config.get("zero_optimization", {}).get("stage", 0))


def offloads_optimizer(config: Mapping[str, Any]) -> bool:
    """True when the config offloads optimizer states (DeepSpeed then needs its own optimizer)."""
    device = config.get("zero_optimization", {}).get("offload_optimizer", {}).get("device", "none")
    return device not in (None, "none")


def offloads_parameters(config: Mapping[str, Any]) -> bool:
    """True when the config offloads parameters (ZeRO-3)."""
    device = config.get("zero_optimization", {}).get("offload_param", {}).get("device", "none")
    return device not in (None, "none")


def fill_deepspeed_config(
    raw: Mapping[str, Any],
    *,
    source: str,
    micro_batch_size: int,
    grad_accum_steps: int,
    world_size: int,
    max_grad_norm: float,
    lr: float,
    weight_decay: float,
    dtype: Literal["float32", "bfloat16", "float16"],
) -> dict[str, Any]:
    """Fill the settings the run config owns into a DeepSpeed config.

    Batch size, accumulation, clipping, learning rate, optimizer and precision come from the run
    config. A key may be absent or ``"auto"`` in the DeepSpeed file; a different explicit value is
    an error naming the key to remove. The learning-rate schedule is the run's (linear warmup/decay),
    so a ``scheduler`` section is refused. With optimizer offload DeepSpeed builds its CPU AdamW from
    an ``optimizer`` section (filled here); otherwise the pipeline passes its own ``torch.optim.AdamW``.

    Args:
        raw: the DeepSpeed config as read from ``source``.
        source: file name for messages.
        micro_batch_size: rows per rank per micro-batch (``train.batch_size / world_size``).
        grad_accum_steps: micro-batches per optimiser step.
        world_size: number of data-parallel ranks.
        max_grad_norm: global-norm clipping threshold (``train.max_grad_norm``).
        lr: peak learning rate (``train.lr``).
        weight_decay: AdamW weight decay (``train.weight_decay``).
        dtype: the run's ``model.dtype``; decides ``bf16`` / ``fp16``.

    Returns:
        A new, complete DeepSpeed config.

    Raises:
        ConfigError: every conflicting or unsupported key, each with its fix.
    """
    config = json.loads(json.dumps(dict(raw)))
    problems: list[str] = []
    wanted: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": grad_accum_steps,
        "train_batch_size": micro_batch_size * grad_accum_steps * world_size,
        "gradient_clipping": max_grad_norm,
    }
    run_keys = {
        "train_micro_batch_size_per_gpu": "train.batch_size / world size",
        "gradient_accumulation_steps": "train.grad_accum_steps",
        "train_batch_size": "train.batch_size x train.grad_accum_steps",
        "gradient_clipping": "train.max_grad_norm",
    }
    for key in _OWNED_TOP_LEVEL:
        given = config.get(key, "auto")
        if given != "auto" and given != wanted[key]:
            problems.append(
                f"{source}: {key}={given!r} differs from the run config ({run_keys[key]} gives {wanted[key]!r}); "
                f"remove {key} from the DeepSpeed config (the run config sets it)"
            )
        config[key] = wanted[key]
    if "scheduler" in config:
        problems.append(
            f"{source}: a 'scheduler' section is not used; the run config's linear schedule "
            "(train.lr, train.warmup_ratio) applies. Remove 'scheduler' from the DeepSpeed config"
        )
    for precision, enabled in (("bf16", dtype == "bfloat16"), ("fp16", dtype == "float16")):
        section = config.get(precision, {})
        given = section.get("enabled", "auto") if isinstance(section, dict) else section
        if given != "auto" and bool(given) != enabled:
            problems.append(
                f"{source}: {precision}.enabled={given!r} but model.dtype={dtype}; set {precision}.enabled to "
                f'"auto" (follows model.dtype) or change model.dtype'
            )
        config[precision] = {**(section if isinstance(section, dict) else {}), "enabled": enabled}
    optimizer = config.get("optimizer")
    if optimizer is not None:
        params = optimizer.get("params", {})
        if str(optimizer.get("type", "")).lower() not in ("adamw", "adam"):
            problems.append(f"{source}: optimizer.type={optimizer.get('type')!r}; only AdamW is supported: remove the optimizer section")
        for key, value in (("lr", lr), ("weight_decay", weight_decay)):
            given = params.get(key, "auto")
            if given != "auto" and given != value:
                problems.append(
                    f"{source}: optimizer.params.{key}={given!r} differs from the run config (train.{key}={value!r}); "
                    f"remove optimizer.params.{key} from the DeepSpeed config"
                )
    if offloads_optimizer(config):
        # DeepSpeed refuses a client optimizer with offload: it builds DeepSpeedCPUAdam from this section.
        config["optimizer"] = {
            "type": "AdamW",
            "params": {"lr": lr, "weight_decay": weight_decay, "betas": [0.9, 0.999], "eps": 1e-8, "torch_adam": False, "adam_w_mode": True},
        }
    else:
        config.pop("optimizer", None)
        config["zero_allow_untested_optimizer"] = True
    if problems:
        raise ConfigError(problems)
    config.setdefault("steps_per_print", 10**9)
    config.setdefault("wall_clock_breakdown", False)
    return config


# ----------------------------------------------------------------------------- engine


@dataclass
class _Piece:
    """The part of one parameter's gradient this rank holds: ``flat[start:start+numel]`` of the full tensor."""

    tensor: Tensor | None
    start: int
    numel: int


class Engine:
    """One interface over a plain module, torch DDP and a DeepSpeed engine.

    The training loop calls ``forward`` / ``backward`` per micro-batch, then at the optimiser step
    ``reduce_gradients`` (alignment) or ``check_finite``, ``set_gradients`` and ``step``.
    """

    def __init__(
        self,
        runtime: Runtime,
        model: nn.Module,
        params: Mapping[str, nn.Parameter],
        *,
        lr: float,
        weight_decay: float,
        max_grad_norm: float,
        deepspeed_config: Mapping[str, Any] | None = None,
    ) -> None:
        self.runtime = runtime
        self.model = model
        self.names = list(params)
        self.max_grad_norm = max_grad_norm
        self.collectives = 0
        self.collective_seconds = 0.0
        self.zero_stage = 0
        self._ds = None
        trainable = list(params.values())
        if runtime.backend == "deepspeed":
            import deepspeed

            assert deepspeed_config is not None
            client = None if "optimizer" in deepspeed_config else torch.optim.AdamW(trainable, lr=lr, weight_decay=weight_decay)
            engine, optimizer, _, _ = deepspeed.initialize(
                model=model, optimizer=client, model_parameters=trainable, config=dict(deepspeed_config), dist_init_required=False
            )
            self._ds = engine
            self.zero_stage = zero_stage(deepspeed_config)
            self.forward_module: nn.Module = engine
            self.optimizer = getattr(optimizer, "optimizer", optimizer) if self.zero_stage > 0 else optimizer
        elif runtime.backend == "ddp":
            device_ids = [runtime.device.index] if runtime.device.type == "cuda" else None
            self.forward_module = nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
            self.optimizer = torch.optim.AdamW(trainable, lr=lr, weight_decay=weight_decay)
        else:
            self.forward_module = model
            self.optimizer = torch.optim.AdamW(trainable, lr=lr, weight_decay=weight_decay)
        # The parameters as the module holds them (DeepSpeed keeps the same objects).
        self.params = {name: p for name, p in model.named_parameters() if name in params}

    # ------------------------------------------------------------------ micro-batches

    def backward(self, loss: Tensor, *, boundary: bool) -> None:
        """Back-propagate one micro-batch; ``boundary`` marks the last one of an optimiser step."""
        if self._ds is not None:
            self._ds.set_gradient_accumulation_boundary(boundary)
            self._ds.backward(loss, scale_wrt_gas=False)
            if not boundary:
                self._ds.step()  # advances DeepSpeed's micro-step counter; no update off the boundary
            return
        if isinstance(self.forward_module, nn.parallel.DistributedDataParallel) and not boundary:
            with self.forward_module.no_sync():
                loss.backward()
            return
        loss.backward()

    @property
    def loss_scale(self) -> float:
        """Factor on a rank's share of the mean loss: DDP and DeepSpeed average over ranks."""
        return float(self.runtime.world_size) if self.runtime.distributed else 1.0

    # ------------------------------------------------------------------ gradients

    def _piece(self, p: nn.Parameter) -> _Piece:
        if p.grad is not None and getattr(p, "_hp_grad", None) is None:
            return _Piece(p.grad, 0, p.numel())
        if hasattr(p, "ds_id"):  # ZeRO-3: this rank's slice of the flattened, padded tensor
            local = p._z3_optimizer.get_local_fp32_grad_for_param(p).flatten()
            start = self.runtime.rank * local.numel()
            numel = max(0, min(local.numel(), p.ds_numel - start))
            return _Piece(local[:numel], start, numel)
        mapping = getattr(p, "_hp_mapping", None)
        if mapping is None:  # ZeRO-1/2: this rank owns no fragment of p
            return _Piece(None, 0, 0)
        fragment = mapping.get_lp_grad_fragment(p._index_in_param_group).flatten()
        address = mapping.lp_fragment_address
        if fragment.numel() == p.numel() and address.numel != p.numel():  # bf16 keeps a full buffer
            fragment = fragment.narrow(0, address.start, address.numel)
        return _Piece(fragment, address.start, address.numel)

    def _all_reduce(self, tensor: Tensor, op: Any = None) -> None:
        self.collectives += 1
        started = time.perf_counter()
        torch.distributed.all_reduce(tensor, op=op or torch.distributed.ReduceOp.SUM)
        self.collective_seconds += time.perf_counter() - started

    def reduce_gradients(
        self, extra: Mapping[str, Tensor], *, include_task: bool
    ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """Full global task gradients and rank-summed ``extra`` tensors, in one collective.

        Args:
            extra: tensors to sum over ranks (this rank's reference-gradient share, loss sums, flags).
            include_task: also assemble the full averaged task gradient of every trainable tensor.

        Returns:
            (task gradients by parameter name, or {} without ``include_task``; summed ``extra``),
            fp32, identical on every rank.
        """
        if not self.runtime.distributed:
            task = {n: self.params[n].grad.float() for n in self.names} if include_task else {}
            return task, {k: v.detach().float() for k, v in extra.items()}
        # DDP / ZeRO-0: .grad already holds the averaged gradient; nothing to assemble.
        in_grad = all(self.params[n].grad is not None and getattr(self.params[n], "_hp_grad", None) is None for n in self.names)
        assemble = include_task and not in_grad
        sizes = [_numel(self.params[n]) if assemble else 0 for n in self.names]
        bucket = torch.zeros(sum(sizes) + sum(v.numel() for v in extra.values()), dtype=torch.float32, device=self.runtime.device)
        offset = 0
        for name, size in zip(self.names, sizes):
            if size:
                piece = self._piece(self.params[name])
                if piece.numel:
                    bucket[offset + piece.start : offset + piece.start + piece.numel] = piece.tensor.float().flatten()
            offset += size
        for value in extra.values():
            bucket[offset : offset + value.numel()] = value.detach().float().flatten()
            offset += value.numel()
        self._all_reduce(bucket)
        task: dict[str, Tensor] = {}
        offset = 0
        for name, size in zip(self.names, sizes):
            p = self.params[name]
            if include_task:
                task[name] = bucket[offset : offset + size].view(_shape(p)) if assemble else p.grad.float()
            offset += size
        reduced = {}
        for key, value in extra.items():
            reduced[key] = bucket[offset : offset + value.numel()].view(value.shape)
            offset += value.numel()
        return task, reduced

    def set_gradients(self, grads: Mapping[str, Tensor]) -> None:
        """Write full gradients back; each rank keeps only the part it owns (no communication)."""
        for name in self.names:
            p, value = self.params[name], grads[name]
            if self._ds is not None and (p.grad is None or getattr(p, "_hp_grad", None) is not None):
                from deepspeed.utils import safe_set_full_grad

                safe_set_full_grad(p, value.to(torch.float32))
            else:
                p.grad.copy_(value.to(p.grad.dtype))

    def parameter_norm(self) -> float:
        """Global L2 norm of the full trainable parameters: the same number on every rank, under every backend.

        Each tensor's norm is taken in its own dtype (no full-precision copy of a large weight). Under ZeRO-3
        a rank holds only its slice of each flattened, padded parameter (``ds_tensor``): the squared norms of
        the slices (padding excluded) are summed over ranks in one scalar all-reduce (the divergence guard's,
        not counted in the step's ``collectives``). Elsewhere every rank holds whole parameters: no communication.
        Not finite -> ``inf``.
        """
        with torch.no_grad():
            if self._ds is None or self.zero_stage < 3:
                norms = [torch.linalg.vector_norm(p.detach()).float() for p in self.params.values() if p.numel()]
                total = float(torch.linalg.vector_norm(torch.stack([n.to(norms[0].device) for n in norms]))) if norms else 0.0
            else:
                square = torch.zeros((), dtype=torch.float64, device=self.runtime.device)
                for p in self.params.values():
                    local = p.ds_tensor.detach().flatten()
                    numel = max(0, min(local.numel(), p.ds_numel - self.runtime.rank * local.numel()))
                    if numel:
                        square += torch.linalg.vector_norm(local[:numel]).double().pow(2).to(square.device)
                torch.distributed.all_reduce(square)
                total = math.sqrt(float(square))
        return total if math.isfinite(total) else float("inf")

    def nonfinite_parameters(self) -> list[str]:
        """Names whose gradient piece on THIS rank has a NaN/inf (no communication: the training loop
        sums the flag over ranks in its one per-step all-reduce)."""
        return [n for n in self.names if (piece := self._piece(self.params[n])).numel and not torch.isfinite(piece.tensor).all()]

    def step(self) -> float:
        """Clip to ``max_grad_norm``, update, clear gradients. Returns the global pre-clip gradient norm."""
        if self._ds is not None:
            norm = None
            if self.zero_stage == 0:
                norm = float(torch.nn.utils.clip_grad_norm_(list(self.params.values()), self.max_grad_norm))
            self._ds.step()
            if norm is None:
                got = self._ds.get_global_grad_norm()
                norm = float(got) if got is not None else float("nan")
            return norm
        norm = float(torch.nn.utils.clip_grad_norm_(list(self.params.values()), self.max_grad_norm))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    # ------------------------------------------------------------------ state

    def full_parameters(self, names: Sequence[str] | None = None) -> dict[str, Tensor]:
        """CPU copies of full trainable parameters (fp32 master copies under ZeRO); a collective under ZeRO."""
        names = list(names) if names is not None else self.names
        if self._ds is not None and self.zero_stage > 0:
            from deepspeed.utils import safe_get_full_fp32_param

            out = {}
            for name in names:
                self.collectives += 1
                out[name] = safe_get_full_fp32_param(self.params[name]).detach().to("cpu", copy=True).contiguous().view(_shape(self.params[name]))
            return out
        return {name: self.params[name].detach().to("cpu", copy=True).contiguous() for name in names}

    def load_parameters(self, state: Mapping[str, Tensor]) -> None:
        """Copy full trainable parameters into the model (and the ZeRO fp32 master copies)."""
        missing = sorted(set(self.names) - set(state))
        unexpected = sorted(set(state) - set(self.names))
        if missing or unexpected:
            raise KeyError(f"trainable state mismatch: missing {missing[:5]} unexpected {unexpected[:5]}")
        if self._ds is not None and self.zero_stage > 0:
            from deepspeed.utils import safe_set_full_fp32_param

            with self.gathered(self.names, modify=True):
                with torch.no_grad():
                    for name in self.names:
                        self.params[name].copy_(state[name].to(self.params[name].device, self.params[name].dtype))
            for name in self.names:
                safe_set_full_fp32_param(self.params[name], state[name].to(self.runtime.device, torch.float32))
            return
        with torch.no_grad():
            for name in self.names:
                self.params[name].copy_(state[name].to(self.params[name].device, self.params[name].dtype))

    @contextlib.contextmanager
    def gathered(self, names: Sequence[str], *, modify: bool = False) -> Iterator[None]:
        """Make ZeRO-3 partitioned parameters whole inside the block (every rank must enter it).

        With ``modify`` every rank writes the same values, which are re-partitioned on exit.
        """
        model_params = dict(self.model.named_parameters())
        targets = [model_params[n] for n in names if hasattr(model_params[n], "ds_id")]
        if self._ds is None or self.zero_stage < 3 or not targets:
            yield
            return
        import deepspeed

        self.collectives += 1
        with deepspeed.zero.GatheredParameters(targets, modifier_rank=None):
            yield

    @contextlib.contextmanager
    def _optimizer_view(self) -> Iterator[None]:
        """ZeRO-3 keeps its fp32 partitions out of the inner optimizer's param groups between steps;
        put them in while the optimizer state is read or written (as DeepSpeed's own checkpointing does)."""
        if self._ds is None or self.zero_stage < 3:
            yield
            return
        self._ds.optimizer._set_fp32_optimizer_param_groups()
        try:
            yield
        finally:
            self._ds.optimizer._clear_fp32_optimizer_param_groups()

    def optimizer_state(self) -> dict[str, Any]:
        """This rank's optimizer state (the inner optimizer over its partition under ZeRO)."""
        with self._optimizer_view():
            return self.optimizer.state_dict()

    def load_optimizer_state(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`optimizer_state` of the same rank and world size."""
        with self._optimizer_view():
            self.optimizer.load_state_dict(dict(state))


def _numel(p: nn.Parameter) -> int:
    """Full element count of a parameter (ZeRO-3 keeps it in ``ds_numel``)."""
    return int(getattr(p, "ds_numel", p.numel()))


def _shape(p: nn.Parameter) -> torch.Size:
    """Full shape of a parameter (ZeRO-3 keeps it in ``ds_shape`` while the data is partitioned)."""
    return getattr(p, "ds_shape", p.shape)
