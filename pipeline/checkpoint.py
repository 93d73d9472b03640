"""Atomic file writes and resumable training state for MuScleLoRA runs (Wu et al., ACL 2024, arXiv 2402.12026).

Atomicity: a file is written to a temporary name in its own directory, flushed and fsync'ed, then
renamed over the target with ``os.replace`` (atomic on POSIX), and the directory is fsync'ed so the
rename survives a crash. A reader sees the old file or the new one, never a torn one.

A training checkpoint is a directory, built under ``<name>.tmp-<pid>`` and renamed into place:

    <name>/trainable.safetensors   trainable parameters (safetensors, never pickle)
    <name>/optimizer.pt            {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}
    <name>/rng.pt                  capture_rng_state()
    <name>/progress.json           epoch, step, best metrics ... (JSON)
    <name>/ranks.pt                data-parallel runs only: [{"optimizer": ..., "rng": ...} per rank]
    <name>/reference_cache.safetensors  align.ref_every_steps > 1 only: the reference gradient the next
                                   steps reuse (already reduced over ranks; safetensors)
    <name>/COMPLETE                written last; a directory without it is refused

``.pt`` files hold only tensors and plain Python values and are read with
``torch.load(weights_only=True)``, which executes no pickled code. An older checkpoint of the same
name is renamed to ``<name>.old-<pid>``, the new one renamed in, and the old one deleted; a crash
between the two renames leaves the old checkpoint complete under ``<name>.old-<pid>``:
:func:`recover_checkpoint` renames it back before a resume, and :func:`remove_stale_siblings` deletes
such leftovers (and ``<name>.tmp-*`` staging folders of killed saves) once a newer complete checkpoint
is in place.

A damaged file (truncated safetensors, a torch file that is not a valid or not a weights-only pickle,
unreadable JSON) raises :class:`CorruptFileError`, whose message names the file, what is wrong and
what to do.

A run folder (``run_training``'s ``output_dir``) is replaced only when :func:`foreign_entries` finds
nothing in it that a run does not write, and :func:`remove_run_folder` never follows a link.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import uuid
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from torch import Tensor

logger = logging.getLogger(__name__)

TRAINABLE_FILE = "trainable.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
RNG_FILE = "rng.pt"
PROGRESS_FILE = "progress.json"
RANKS_FILE = "ranks.pt"
REFERENCE_CACHE_FILE = "reference_cache.safetensors"
COMPLETE_MARKER = "COMPLETE"
CHECKPOINT_FORMAT_VERSION = 1
_CHECKPOINT_FILES = (TRAINABLE_FILE, OPTIMIZER_FILE, RNG_FILE, PROGRESS_FILE)


class CorruptFileError(ValueError):
    """A checkpoint or weights file exists but cannot be read (truncated, damaged or refused)."""


class NotARunFolderError(OSError):
    """A folder that was to be replaced is not recognisably a run folder of this pipeline."""


RUN_FOLDER_MARKERS = ("config.yaml", "train.log", "log.jsonl", "checkpoints", "metrics.json")
"""A folder holding one of these is (part of) a run folder of this pipeline."""
RUN_FOLDER_ENTRIES = frozenset({
    *RUN_FOLDER_MARKERS, "adapter", "tensorboard", "frequency.json", "frequency_cache", "fourier", "cell.json",
    "canary-screen.json", "filter-report.json",
})
"""Everything run_training (and launch/fourier.py, launch/matrix.py) writes into a run folder."""


def foreign_entries(output_dir: Path) -> list[str]:
    """Why ``output_dir`` is not recognisably a run folder of this pipeline (empty: it is one, or empty).

    A run folder holds at least one of :data:`RUN_FOLDER_MARKERS` and nothing but
    :data:`RUN_FOLDER_ENTRIES` and hidden ``*.tmp`` files of interrupted atomic writes.
    """
    if output_dir.is_symlink():
        return [f"{output_dir} is a symbolic link (to {os.readlink(output_dir)}); nothing is deleted through a link"]
    if not output_dir.is_dir():
        return [f"{output_dir} is not a directory"]
    names = sorted(p.name for p in output_dir.iterdir())
    if not names:
        return []
    problems = [f"{name!r} is not written by a run" for name in names
                if name not in RUN_FOLDER_ENTRIES and not (name.startswith(".") and name.endswith(".tmp"))]
    if not any(name in RUN_FOLDER_MARKERS for name in names):
        problems.append(f"it holds none of {list(RUN_FOLDER_MARKERS)}")
    return problems


def remove_run_folder(output_dir: Path) -> None:
    """Delete a run folder's contents (after :func:`foreign_entries` found nothing foreign); symbolic links
    inside are unlinked, never followed.

    Raises:
        NotARunFolderError: ``output_dir`` is a link, or holds something a run does not write.
    """
    problems = foreign_entries(output_dir)
    if problems:
        raise NotARunFolderError(f"refusing to delete {output_dir}: {'; '.join(problems)}")
    for entry in output_dir.iterdir():
        if entry.is_symlink() or not entry.is_dir():
            entry.unlink()
        else:
            shutil.rmtree(entry)


def fsync_directory(directory: Path) -> None:
    """Persist a directory entry (a rename or a new file) on POSIX; a no-op elsewhere."""
    if os.name != "posix":
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_write(path: str | os.PathLike[str], write: Callable[[Path], None]) -> None:
    """Run ``write(temp_path)``, fsync the result and rename it onto ``path``.

    The temporary file lies in the target's directory (so the rename stays on one file system) and
    is created with the default permissions (0o666 less the umask). It is removed if anything fails.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    os.close(os.open(temp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
    try:
        write(temp)
        fd = os.open(temp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    fsync_directory(path.parent)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temp file, fsync, ``os.replace``, fsync directory).

    Args:
        path: Target file; missing parent directories are created.
        data: The file's new content.
    """
    _atomic_write(path, lambda temp: temp.write_bytes(data))


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` as UTF-8 to ``path`` atomically.

    Args:
        path: Target file; missing parent directories are created.
        text: The file's new content.
    """
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike[str], obj: Any) -> None:
    """Write ``obj`` as indented JSON (keys sorted, trailing newline) to ``path`` atomically.

    Args:
        path: Target file; missing parent directories are created.
        obj: A JSON-serialisable value.

    Raises:
        TypeError: If ``obj`` is not JSON-serialisable (nothing is written).
    """
    try:
        text = json.dumps(obj, indent=2, sort_keys=True)
    except TypeError as error:
        raise TypeError(f"cannot write {path} as JSON: {error}") from error
    atomic_write_text(path, text + "\n")


def save_tensors(
    path: str | os.PathLike[str],
    tensors: Mapping[str, Tensor],
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Save named tensors atomically as safetensors.

    Args:
        path: Target file; missing parent directories are created.
        tensors: Tensors by name (any device; detached and made contiguous for saving). Tensors
            sharing memory are refused by safetensors: clone them first.
        metadata: Optional string-to-string header metadata.

    Raises:
        TypeError: If a name, value or metadata entry has the wrong type.
    """
    for name, tensor in tensors.items():
        if not isinstance(name, str) or not isinstance(tensor, Tensor):
            raise TypeError(
                f"save_tensors({path}): entry {name!r} is a {type(tensor).__name__}; expected str "
                "names and torch.Tensor values"
            )
    for key, value in (metadata or {}).items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise TypeError(
                f"save_tensors({path}): metadata entry {key!r}: {value!r} is not str -> str; "
                "convert values with str() or json.dumps()"
            )
    prepared = {name: tensor.detach().contiguous() for name, tensor in tensors.items()}
    header = dict(metadata) if metadata is not None else None
    _atomic_write(path, lambda temp: safetensors.torch.save_file(prepared, temp, metadata=header))


def load_tensors(path: str | os.PathLike[str], *, device: str = "cpu") -> dict[str, Tensor]:
    """Load a safetensors file written by :func:`save_tensors`.

    Args:
        path: The file.
        device: Where to place the tensors.

    Returns:
        Tensors by name.

    Raises:
        FileNotFoundError: If ``path`` does not exist.
        CorruptFileError: If the file is not a readable safetensors file (truncated or damaged).
    """
    if not Path(path).is_file():
        raise FileNotFoundError(f"load_tensors: no safetensors file at {path}")
    try:
        return safetensors.torch.load_file(path, device=device)
    except Exception as error:  # SafetensorError derives from Exception only
        raise CorruptFileError(
            f"{path} is not a readable safetensors file ({error}); it is truncated or damaged: restore it "
            "from a copy or produce it again"
        ) from error


def load_torch_file(path: str | os.PathLike[str], *, map_location: str = "cpu", what: str = "checkpoint") -> Any:
    """``torch.load(path, weights_only=True)`` with one clear error for a damaged or refused file.

    Args:
        path: A file written by ``torch.save`` of tensors and plain Python values.
        map_location: Device for the loaded tensors.
        what: What the file is, for the error message (for example ``"checkpoint"``).

    Returns:
        The loaded object.

    Raises:
        FileNotFoundError: If ``path`` does not exist.
        CorruptFileError: If the file is truncated, not a torch file, or holds objects other than
            tensors and plain values (which ``weights_only=True`` refuses: they could run code).
    """
    import pickle

    if not Path(path).is_file():
        raise FileNotFoundError(f"no {what} file at {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CorruptFileError(
            f"{path}: refused to load this {what} file: it holds objects other than tensors and plain values "
            f"(torch.load weights_only=True: {first}), or it is damaged; loading it could run code. Use a "
            "file written by this pipeline, or start the run again"
        ) from error
    except (RuntimeError, EOFError, ValueError, OSError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CorruptFileError(
            f"{path} is not a readable {what} file ({first}); it is truncated or damaged: restore it, resume "
            "from an earlier checkpoint, or start the run again"
        ) from error


def read_tensor_metadata(path: str | os.PathLike[str]) -> dict[str, str]:
    """Header metadata of a safetensors file ({} when it has none).

    Args:
        path: The file.

    Returns:
        The metadata saved by :func:`save_tensors`.
    """
    with safetensors.safe_open(path, framework="pt") as handle:
        return dict(handle.metadata() or {})


_SCALARS = (bool, int, float, complex, str, bytes, type(None), torch.dtype, torch.device, torch.Size)


def _check_weights_only_safe(obj: Any, where: str) -> None:
    """Raise if ``obj`` holds anything ``torch.load(weights_only=True)`` would refuse."""
    if isinstance(obj, (Tensor, *_SCALARS)):
        return
    if type(obj) in (list, tuple):
        for index, item in enumerate(obj):
            _check_weights_only_safe(item, f"{where}[{index}]")
        return
    if type(obj) in (dict, OrderedDict):
        for key, value in obj.items():
            if not isinstance(key, (str, int)):
                raise TypeError(
                    f"{where} has a key {key!r} of type {type(key).__name__}; only str and int keys "
                    "load with torch.load(weights_only=True)"
                )
            _check_weights_only_safe(value, f"{where}[{key!r}]")
        return
    raise TypeError(
        f"{where} is a {type(obj).__name__}; a checkpoint stores only tensors, Python scalars, "
        "strings, None and lists/tuples/dicts of them, so that it loads with "
        "torch.load(weights_only=True). Convert it (for example with torch.as_tensor or .tolist())."
    )


def _atomic_torch_save(path: Path, obj: Any) -> None:
    _atomic_write(path, lambda temp: torch.save(obj, temp))


def capture_rng_state() -> dict[str, Any]:
    """Snapshot the random number generators in a ``weights_only``-loadable form.

    Covers Python's ``random``, NumPy's legacy global generator (when NumPy is installed), torch's
    CPU generator and, when CUDA is available, every CUDA device's generator.

    Returns:
        A dict of tensors, ints, floats and None, for :func:`restore_rng_state`.
    """
    version, internal, gauss_next = random.getstate()
    state: dict[str, Any] = {
        "python": {
            "version": version,
            "internal": torch.tensor(internal, dtype=torch.int64),
            "gauss_next": gauss_next,
        },
        "torch_cpu": torch.get_rng_state(),
    }
    try:
        import numpy as np
    except ImportError:
        np = None
    if np is not None:
        algorithm, keys, position, has_gauss, cached_gaussian = np.random.get_state()
        state["numpy"] = {
            "algorithm": str(algorithm),
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "position": int(position),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        }
    if torch.cuda.is_available():
        state["torch_cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Restore generators captured by :func:`capture_rng_state`.

    Parts that cannot be restored here (NumPy not installed, fewer CUDA devices than saved) are
    skipped with a warning, so a run can resume on a different machine.

    Args:
        state: The captured state.

    Raises:
        ValueError: If ``state`` has unknown keys or lacks the Python/torch CPU parts.
    """
    known = {"python", "torch_cpu", "numpy", "torch_cuda"}
    unknown = sorted(set(state) - known)
    missing = sorted({"python", "torch_cpu"} - set(state))
    if unknown or missing:
        raise ValueError(
            f"restore_rng_state: unknown keys {unknown}, missing keys {missing}; expected the dict "
            f"returned by capture_rng_state() (keys {sorted(known)})"
        )
    python = state["python"]
    internal = tuple(int(value) for value in python["internal"].tolist())
    random.setstate((python["version"], internal, python["gauss_next"]))
    torch.set_rng_state(state["torch_cpu"])
    if "numpy" in state:
        try:
            import numpy as np
        except ImportError:
            logger.warning("restore_rng_state: NumPy is not installed; its saved state is skipped")
        else:
            saved = state["numpy"]
            np.random.set_state(
                (
                    saved["algorithm"],
                    saved["keys"].numpy().astype(np.uint32),
                    saved["position"],
                    saved["has_gauss"],
                    saved["cached_gaussian"],
                )
            )
    if "torch_cuda" in state:
        saved_cuda = list(state["torch_cuda"])
        available = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if available < len(saved_cuda):
            logger.warning(
                "restore_rng_state: %d CUDA generator states saved, %d devices here; "
                "restoring the first %d",
                len(saved_cuda), available, available,
            )
        for index, device_state in enumerate(saved_cuda[:available]):
            torch.cuda.set_rng_state(device_state, index)


@dataclass(frozen=True)
class TrainingState:
    """A loaded training checkpoint.

    Attributes:
        trainable: Trainable parameters by name (CPU unless another map_location was given).
        optimizer_state: ``optimizer.state_dict()`` as saved.
        scheduler_state: ``scheduler.state_dict()`` as saved.
        progress: The JSON progress record (epoch, step_in_epoch, global_step, best metrics, ...).
        rng: Generator states for :func:`restore_rng_state`.
        rank_states: For a data-parallel run, one ``{"optimizer": ..., "rng": ...}`` per rank (each
            rank's optimizer partition and generators), else None.
        reference_cache: The cached reference gradient by parameter name when the checkpoint holds
            one (``align.ref_every_steps`` > 1), else None.
    """

    trainable: dict[str, Tensor]
    optimizer_state: dict[str, Any]
    scheduler_state: dict[str, Any]
    progress: dict[str, Any]
    rng: dict[str, Any]
    rank_states: list[dict[str, Any]] | None = None
    reference_cache: dict[str, Tensor] | None = None


def _is_checkpoint_or_empty(directory: Path) -> bool:
    return (directory / COMPLETE_MARKER).is_file() or not any(directory.iterdir())


def replace_directory(staging: Path, directory: Path) -> None:
    """Rename ``staging`` to ``directory``, replacing (then deleting) an older directory there; rolls back on failure."""
    if not directory.exists():
        os.rename(staging, directory)
        fsync_directory(directory.parent)
        return
    retired = directory.with_name(f"{directory.name}.old-{os.getpid()}")
    if retired.exists():
        shutil.rmtree(retired)
    os.rename(directory, retired)
    try:
        os.rename(staging, directory)
    except BaseException:
        os.rename(retired, directory)
        raise
    fsync_directory(directory.parent)
    shutil.rmtree(retired)


def save_training_state(
    directory: str | os.PathLike[str],
    *,
    trainable: Mapping[str, Tensor],
    optimizer_state: Mapping[str, Any],
    scheduler_state: Mapping[str, Any],
    progress: Mapping[str, Any],
    rng: Mapping[str, Any],
    rank_states: list[Mapping[str, Any]] | None = None,
    reference_cache: Mapping[str, Tensor] | None = None,
) -> None:
    """Write a resumable checkpoint directory atomically (see the module docstring for the layout).

    Args:
        directory: The checkpoint directory. An existing checkpoint (or empty directory) there is
            replaced; any other existing path is refused.
        trainable: Trainable parameters by name.
        optimizer_state: ``optimizer.state_dict()``.
        scheduler_state: ``scheduler.state_dict()``.
        progress: JSON-serialisable progress record.
        rng: Output of :func:`capture_rng_state`.
        rank_states: Per-rank optimizer partitions and generator states of a data-parallel run
            (written to ``ranks.pt``); None for one process.
        reference_cache: The reference gradient the next steps reuse (``align.ref_every_steps`` > 1),
            written to ``reference_cache.safetensors``; None writes no such file.

    Raises:
        TypeError: If a state holds a value ``torch.load(weights_only=True)`` refuses, or
            ``progress`` is not JSON-serialisable. Nothing is written then.
        FileExistsError: If ``directory`` exists and is not a checkpoint.
    """
    directory = Path(directory)
    if directory.exists() and not (directory.is_dir() and _is_checkpoint_or_empty(directory)):
        raise FileExistsError(
            f"save_training_state: {directory} exists and is not a checkpoint (no {COMPLETE_MARKER} "
            "marker); refusing to replace it. Choose another directory or remove it."
        )
    optimizer_and_scheduler = {"optimizer": dict(optimizer_state), "scheduler": dict(scheduler_state)}
    _check_weights_only_safe(optimizer_and_scheduler, "optimizer/scheduler state")
    _check_weights_only_safe(dict(rng), "rng")
    ranks = [dict(state) for state in rank_states] if rank_states is not None else None
    if ranks is not None:
        _check_weights_only_safe(ranks, "per-rank state")
    try:
        progress_text = json.dumps(dict(progress), indent=2, sort_keys=True) + "\n"
    except TypeError as error:
        raise TypeError(f"save_training_state: progress is not JSON-serialisable: {error}") from error

    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = directory.with_name(f"{directory.name}.tmp-{os.getpid()}")
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir()
    try:
        save_tensors(staging / TRAINABLE_FILE, trainable)
        _atomic_torch_save(staging / OPTIMIZER_FILE, optimizer_and_scheduler)
        _atomic_torch_save(staging / RNG_FILE, dict(rng))
        atomic_write_text(staging / PROGRESS_FILE, progress_text)
        files = list(_CHECKPOINT_FILES)
        if ranks is not None:
            _atomic_torch_save(staging / RANKS_FILE, ranks)
            files.append(RANKS_FILE)
        if reference_cache is not None:
            save_tensors(staging / REFERENCE_CACHE_FILE, reference_cache)
            files.append(REFERENCE_CACHE_FILE)
        atomic_write_json(staging / COMPLETE_MARKER, {"format_version": CHECKPOINT_FORMAT_VERSION, "files": files})
        replace_directory(staging, directory)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    remove_stale_siblings(directory)
    logger.info("saved training state to %s", directory)


def load_training_state(
    directory: str | os.PathLike[str], *, map_location: str = "cpu"
) -> TrainingState:
    """Load a checkpoint written by :func:`save_training_state`.

    Only ``torch.load(weights_only=True)`` and safetensors are used: no pickled code runs.

    Args:
        directory: The checkpoint directory.
        map_location: Device for the loaded tensors.

    Returns:
        The training state.

    Raises:
        FileNotFoundError: If the directory or one of its files is missing.
        ValueError: If the directory has no COMPLETE marker (an unfinished save) or an unknown format.
    """
    directory = Path(directory)
    if not directory.is_dir():
        retired = sorted(str(p) for p in directory.parent.glob(f"{directory.name}.old-*"))
        hint = (f"; a previous checkpoint was left at {retired} by an interrupted save (recover_checkpoint "
                "renames it back)") if retired else ""
        raise FileNotFoundError(f"load_training_state: no checkpoint directory at {directory}{hint}")
    marker = directory / COMPLETE_MARKER
    if not marker.is_file():
        raise ValueError(
            f"load_training_state: {directory} has no {COMPLETE_MARKER} marker, so its save did not "
            "finish (interrupted run?); resume from an earlier checkpoint"
        )
    marker_record = json.loads(marker.read_text(encoding="utf-8"))
    version = marker_record.get("format_version")
    if version != CHECKPOINT_FORMAT_VERSION:
        raise ValueError(
            f"load_training_state: {marker} has format_version {version!r}; this code reads "
            f"version {CHECKPOINT_FORMAT_VERSION}"
        )
    missing = [name for name in marker_record.get("files", _CHECKPOINT_FILES) if not (directory / name).is_file()]
    if missing:
        raise FileNotFoundError(f"load_training_state: {directory} lacks {missing}")
    optimizer_and_scheduler = load_torch_file(directory / OPTIMIZER_FILE, map_location=map_location, what="optimizer state")
    if not isinstance(optimizer_and_scheduler, dict) or set(optimizer_and_scheduler) != {"optimizer", "scheduler"}:
        raise CorruptFileError(
            f"{directory / OPTIMIZER_FILE} does not hold the {{'optimizer', 'scheduler'}} record this pipeline "
            "writes; restore it or start the run again"
        )
    progress_path = directory / PROGRESS_FILE
    try:
        progress = json.loads(progress_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CorruptFileError(f"{progress_path} is not valid JSON ({error}); restore it or start the run again") from error
    return TrainingState(
        trainable=load_tensors(directory / TRAINABLE_FILE, device=map_location),
        optimizer_state=optimizer_and_scheduler["optimizer"],
        scheduler_state=optimizer_and_scheduler["scheduler"],
        progress=progress,
        rng=load_torch_file(directory / RNG_FILE, what="random generator state"),
        rank_states=(
            load_torch_file(directory / RANKS_FILE, map_location=map_location, what="per-rank state")
            if RANKS_FILE in marker_record.get("files", ()) else None
        ),
        reference_cache=(
            load_tensors(directory / REFERENCE_CACHE_FILE, device=map_location)
            if REFERENCE_CACHE_FILE in marker_record.get("files", ()) else None
        ),
    )


def _complete(directory: Path) -> bool:
    return directory.is_dir() and not directory.is_symlink() and (directory / COMPLETE_MARKER).is_file()


def recover_checkpoint(directory: str | os.PathLike[str]) -> Path | None:
    """Put back a checkpoint that a save killed between its two renames left as ``<name>.old-<pid>``.

    :func:`replace_directory` retires the previous checkpoint to ``<name>.old-<pid>`` before it renames
    the new one in; a kill in between leaves ``<name>`` missing (or without its COMPLETE marker) and the
    previous checkpoint intact under the retired name. This renames the newest complete retired copy
    back to ``<name>``.

    Args:
        directory: The checkpoint directory (for example ``<output_dir>/checkpoints/last``).

    Returns:
        The retired folder that was renamed back, or None when ``directory`` is complete already or no
        complete retired copy exists.
    """
    directory = Path(directory)
    if _complete(directory) or not directory.parent.is_dir():
        return None
    retired = [p for p in directory.parent.glob(f"{directory.name}.old-*") if _complete(p)]
    if not retired:
        return None
    newest = max(retired, key=lambda p: json.loads((p / PROGRESS_FILE).read_text()).get("global_step", -1)
                 if (p / PROGRESS_FILE).is_file() else -1)
    if directory.exists() or directory.is_symlink():
        # An incomplete folder of the same name (no COMPLETE marker): a save that never finished.
        aside = directory.with_name(f"{directory.name}.tmp-incomplete-{os.getpid()}")
        os.rename(directory, aside)
    os.rename(newest, directory)
    fsync_directory(directory.parent)
    logger.warning("recovered checkpoint %s from %s, left by a save that was interrupted", directory, newest.name)
    return newest


def remove_stale_siblings(directory: str | os.PathLike[str]) -> list[Path]:
    """Delete what killed saves left beside a complete checkpoint ``directory``.

    Removes ``<name>.old-*`` and ``<name>.tmp-*`` folders next to it and ``.*.tmp`` files (interrupted
    atomic writes) in its parent folder. Does nothing unless ``directory`` itself is complete, so the
    only intact copy is never deleted. Symbolic links are unlinked, never followed.

    Args:
        directory: A complete checkpoint directory.

    Returns:
        The paths removed.
    """
    directory = Path(directory)
    if not _complete(directory):
        return []
    removed = []
    parent = directory.parent
    stale = [*parent.glob(f"{directory.name}.old-*"), *parent.glob(f"{directory.name}.tmp-*"), *parent.glob(".*.tmp")]
    for path in stale:
        if path.is_symlink() or path.is_file():
            path.unlink(missing_ok=True)
        elif path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    if removed:
        logger.info("removed %d leftover(s) of interrupted saves next to %s", len(removed), directory)
    return removed
