"""Tables of CACC / ASR from finished runs (arXiv 2402.12026, section 3 metrics).

Reads the ``metrics.json`` that :func:`pipeline.training.run_training` writes; nothing here trains.
ASR is shown beside the clean false-positive rate (share of non-target clean test sentences
predicted as the target), the part of ASR the trigger does not cause.
"""

from __future__ import annotations

import json
import statistics
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any


def read_metrics(run_dirs: Iterable[str | Path]) -> list[dict[str, Any]]:
    """Load ``metrics.json`` of every run directory that has one (others are skipped by the caller).

    Raises:
        FileNotFoundError: a directory has no ``metrics.json`` (the run did not finish).
    """
    out = []
    for run_dir in run_dirs:
        path = Path(run_dir) / "metrics.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path} does not exist: the run in {run_dir} has not finished")
        out.append(json.loads(path.read_text()))
    return out


def _cell(values: Sequence[float]) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}"


def results_table(metrics: Sequence[Mapping[str, Any]], *, methods: Sequence[str] | None = None,
                  attacks: Sequence[str] | None = None) -> str:
    """Markdown table: one row per method, per attack ``CACC / ASR (clean FPR)``, then the averages.

    Several seeds of the same (method, attack) are shown as mean ± standard deviation; the average
    columns are the mean over attacks of the per-attack means.
    """
    cells: dict[tuple[str, str], list[Mapping[str, Any]]] = defaultdict(list)
    for m in metrics:
        cells[(m["method"], m["attack"])].append(m)
    methods = list(methods or dict.fromkeys(m["method"] for m in metrics))
    attacks = list(attacks or dict.fromkeys(m["attack"] for m in metrics))
    header = "| method | " + " | ".join(f"{a} CACC / ASR (FPR)" for a in attacks) + " | avg CACC | avg ASR | avg FPR |"
    lines = [header, "|" + "---|" * (len(attacks) + 4)]
    for method in methods:
        row = [method]
        means: dict[str, list[float]] = defaultdict(list)
        for attack in attacks:
            runs = cells.get((method, attack), [])
            if not runs:
                row.append("-")
                continue
            values = {k: [r[k] for r in runs] for k in ("cacc", "asr", "clean_fpr")}
            for k, v in values.items():
                means[k].append(statistics.mean(v))
            row.append(f"{_cell(values['cacc'])} / {_cell(values['asr'])} ({_cell(values['clean_fpr'])})")
        complete = len(means["cacc"]) == len(attacks)
        for k in ("cacc", "asr", "clean_fpr"):
            row.append(f"{statistics.mean(means[k]):.1f}" if complete else "-")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"
