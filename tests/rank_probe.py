"""Run ``launch/train.py`` as one rank and record what that rank writes and prints (tests only).

Started by ``torchrun`` in place of ``launch/train.py`` (same arguments) with ``PROBE_DIR`` set.
Per global rank ``R`` it leaves in ``PROBE_DIR``:

    rank<R>.writes       one JSON line per file-system change the process asked Python for (open for
                         writing, mkdir, rename/replace, remove, rmtree, ...), with absolute paths,
                         recorded by an audit hook (``sys.addaudithook``); the pipeline's own writes
                         all start with such an ``open`` (``pipeline.checkpoint`` creates every
                         temporary file with ``os.open``), even when torch or safetensors write the bytes
    rank<R>.stderr       everything written to ``sys.stderr``; ``isatty()`` answers True, so progress
                         bars that only show on a terminal do show here if the rank draws them
    rank<R>.state.pt     the last optimizer state and RNG state this rank handed to a checkpoint

With ``PROBE_STOP_AT=N`` every rank stops inside its N-th optimiser step (writes ``stopped-rank<R>``
holding its pid, then sleeps) so that the test can kill the nodes at a known point.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PROBE_DIR = Path(os.environ["PROBE_DIR"])
RANK = int(os.environ.get("RANK", "0"))
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
_CHANGES = {"os.mkdir", "os.rename", "os.remove", "os.rmdir", "shutil.rmtree", "os.truncate", "os.link", "os.symlink",
            "shutil.copyfile", "shutil.move", "os.chmod"}


class _TerminalTee:
    """A stand-in for sys.stderr that claims to be a terminal and copies everything to a file."""

    def __init__(self, path: Path, real) -> None:
        self._file = open(path, "w", encoding="utf-8", buffering=1)
        self._real = real
        self.encoding = "utf-8"

    def write(self, text: str) -> int:
        self._file.write(text)
        self._real.write(text)
        return len(text)

    def flush(self) -> None:
        self._file.flush()
        self._real.flush()

    def isatty(self) -> bool:
        return True

    def fileno(self) -> int:
        return self._real.fileno()


def _install_write_audit() -> None:
    fd = os.open(PROBE_DIR / f"rank{RANK}.writes", os.O_CREAT | os.O_WRONLY | os.O_APPEND, 0o644)

    def record(event: str, paths: list) -> None:
        named = [os.path.abspath(os.fsdecode(p)) for p in paths if isinstance(p, (str, bytes, os.PathLike))]
        if named:
            os.write(fd, (json.dumps({"event": event, "paths": named}) + "\n").encode())

    def hook(event: str, args: tuple) -> None:
        if event == "open":
            path, mode, flags = args
            if (isinstance(mode, str) and any(c in mode for c in "wax+")) or (isinstance(flags, int) and flags & _WRITE_FLAGS):
                record(event, [path])
        elif event in _CHANGES:
            record(event, list(args[:2]))

    sys.addaudithook(hook)


def _install_state_dump() -> None:
    import torch

    import pipeline.checkpoint as ckpt
    import pipeline.distributed as dist

    last: dict = {}
    capture_rng, optimizer_state = ckpt.capture_rng_state, dist.Engine.optimizer_state

    def dump() -> None:
        if {"rng", "optimizer"} <= last.keys():
            torch.save(dict(last), PROBE_DIR / f"rank{RANK}.state.pt")

    def capture_and_keep():
        last["rng"] = capture_rng()
        dump()
        return last["rng"]

    def optimizer_state_and_keep(self):
        last["optimizer"] = optimizer_state(self)
        last.pop("rng", None)
        return last["optimizer"]

    ckpt.capture_rng_state = capture_and_keep
    dist.Engine.optimizer_state = optimizer_state_and_keep


def _install_stop(stop_at: int) -> None:
    import pipeline.training as training

    step = training.optimiser_step
    calls = {"n": 0}

    def stopping_step(**kwargs):
        calls["n"] += 1
        if calls["n"] == stop_at:
            (PROBE_DIR / f"stopped-rank{RANK}").write_text(str(os.getpid()))
            while True:
                time.sleep(60)
        return step(**kwargs)

    training.optimiser_step = stopping_step


def main() -> None:
    sys.path.insert(0, str(REPO))
    sys.stderr = _TerminalTee(PROBE_DIR / f"rank{RANK}.stderr", sys.stderr)
    _install_state_dump()
    if os.environ.get("PROBE_STOP_AT"):
        _install_stop(int(os.environ["PROBE_STOP_AT"]))
    _install_write_audit()
    train = str(REPO / "launch" / "train.py")
    sys.argv[0] = train
    import runpy

    runpy.run_path(train, run_name="__main__")


if __name__ == "__main__":
    main()
