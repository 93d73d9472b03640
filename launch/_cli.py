"""Logging set-up, argument types and JSON output shared by the launchers."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any


LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def setup_logging(level: str) -> None:
    """Log to stderr at ``level``; the HTTP / datasets / file-lock libraries only from WARNING up."""
    logging.basicConfig(level=level, format=LOG_FORMAT, stream=sys.stderr)
    for noisy in ("httpx", "urllib3", "datasets", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def sample_count(text: str) -> int | str:
    """argparse type: ``all`` or a positive integer."""
    return "all" if text == "all" else positive_int(text)


def _fraction(text: str, *, include_one: bool) -> float:
    interval = "(0, 1]" if include_one else "(0, 1)"
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in {interval}, got {text!r}") from None
    if not (0 < value <= 1 if include_one else 0 < value < 1):
        raise argparse.ArgumentTypeError(f"expected a number in {interval}, got {value}")
    return value


def open_fraction(text: str) -> float:
    """argparse type: a number in (0, 1)."""
    return _fraction(text, include_one=False)


def fraction_up_to_one(text: str) -> float:
    """argparse type: a number in (0, 1]."""
    return _fraction(text, include_one=True)


def emit_json(report: Any, out: Path | None) -> int:
    """Write ``report`` atomically to ``out`` (if given) and print it; 2 when ``out`` cannot be written."""
    from pipeline.checkpoint import atomic_write_json

    if out is not None:
        try:
            atomic_write_json(out, report)
        except OSError as err:
            print(f"error: cannot write --out {out}: {err}", file=sys.stderr)
            return 2
    print(json.dumps(report, indent=2, sort_keys=True))
    return 0
