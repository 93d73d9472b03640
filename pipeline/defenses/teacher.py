"""Teacher-checked labels: a finished run's model checks every training row's label (``filter.teacher``).

Why (issue 11, docs/RECIPE.md): ``recipe=defended`` never takes the raw gradient of the training file, so it
keeps triggers out but learns only what its trusted rows teach, several points of clean accuracy below plain
fine-tuning. A dirty-label backdoor (the canary, BadNets-style flipped rows, the label-flipped half of a
paraphrase attack's poisoned rows) is a set of rows whose label contradicts their content. A model that never
learned the trigger predicts such a row by its content, so it contradicts the label; on a clean row it mostly
agrees. With T the teacher's prediction and y the file's label of row i::

    contradicted  = {i : T(x_i) != y_i}
    relabel       : every row kept, y_i := T(x_i) on the contradicted rows
    drop          : the contradicted rows removed

``relabel`` with ``min_confidence`` c > 0 (``filter.teacher_min_confidence``, tenth session): a contradicted row is
relabelled only where the teacher gives its own label a probability of at least c, and removed where it is less
sure (the "unsure" rows). A teacher's errors on clean rows are mostly unsure ones, so they are dropped instead of
taught, while the confidently corrected dirty-label rows still carry their trigger to the other label
(benchmarks/teacher_confidence_probe.py measured the split; docs/teacher_eval_discussion.md, "Tenth session").

A student (e.g. plain fine-tuning) then trains on the checked rows. What it cannot catch: a clean-label poisoned
row (its label already agrees with its content, e.g. BadNets here, or a paraphrase attack's rows that were
positive before the trigger) passes the check, and a trigger the teacher itself partly learned passes too.
``relabel`` also turns a corrected poisoned row into a row that carries the trigger with the other label, which
works against the backdoor; ``drop`` loses those rows. What it costs: on a clean row the teacher contradicts (its
own errors) ``relabel`` teaches the teacher's error and ``drop`` loses the row.

The run plants its canary before the check (pipeline/training.py), so the canary goes through the teacher like
the file's rows and stays a positive control of the whole defence. Nothing here reads ``poison_label``.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from torch.utils.data import DataLoader

from pipeline import data as data_lib
from pipeline.evaluate import predict_proba

ACTIONS: tuple[str, ...] = ("relabel", "drop")


@dataclass(frozen=True)
class TeacherCheck:
    """The outcome of checking ``len(labels)`` rows against a teacher's predictions.

    Attributes:
        action: ``relabel`` or ``drop``.
        kept: Indices of the rows trained on, in order (every row with ``relabel``).
        labels: The label of each kept row (the teacher's where it contradicted the row, with ``relabel``).
        contradicted: Indices of the rows whose label the teacher contradicts.
        transitions: ``{(file label, teacher label): rows}`` over the contradicted rows.
        min_confidence: The teacher probability a contradicted row needs to be relabelled (0: every one).
        unsure: Indices of the contradicted rows removed because the teacher was less sure than ``min_confidence``.
    """

    action: str
    kept: tuple[int, ...]
    labels: tuple[int, ...]
    contradicted: tuple[int, ...]
    transitions: dict[tuple[int, int], int]
    min_confidence: float = 0.0
    unsure: tuple[int, ...] = ()


def check_labels(
    labels: Sequence[int], predictions: Sequence[int], action: str, *, confidences: Sequence[float] | None = None,
    min_confidence: float = 0.0,
) -> TeacherCheck:
    """Compare each row's label with the teacher's prediction and apply ``action`` (see the module docstring).

    ``confidences``: the teacher's probability of its own prediction per row; needed when ``min_confidence`` > 0
    (``relabel`` only: a contradicted row the teacher is less sure of is removed instead of relabelled).

    Raises:
        ValueError: ``action`` is not relabel or drop, the sequences differ in length, ``min_confidence`` is outside
            [0, 1], is set with ``drop`` or without ``confidences``.
    """
    if action not in ACTIONS:
        raise ValueError(f"teacher action {action!r} is not one of {list(ACTIONS)}")
    if len(labels) != len(predictions):
        raise ValueError(f"{len(predictions)} teacher predictions for {len(labels)} rows")
    if not 0.0 <= min_confidence <= 1.0:
        raise ValueError(f"min_confidence {min_confidence} is outside [0, 1]")
    if min_confidence > 0 and action != "relabel":
        raise ValueError(f"min_confidence {min_confidence} applies to relabel only (action {action!r} removes every "
                         "contradicted row)")
    if min_confidence > 0 and (confidences is None or len(confidences) != len(labels)):
        got = "none" if confidences is None else len(confidences)
        raise ValueError(f"min_confidence {min_confidence} needs one teacher confidence per row ({len(labels)}), got {got}")
    labels = [int(y) for y in labels]
    predictions = [int(p) for p in predictions]
    contradicted = tuple(i for i, (y, p) in enumerate(zip(labels, predictions)) if y != p)
    transitions = Counter((labels[i], predictions[i]) for i in contradicted)
    unsure = tuple(i for i in contradicted if float(confidences[i]) < min_confidence) if min_confidence > 0 else ()
    removed = set(contradicted if action == "drop" else unsure)
    kept = tuple(i for i in range(len(labels)) if i not in removed)
    new_labels = tuple(predictions[i] for i in kept)  # the file's label where the teacher agrees
    return TeacherCheck(action=action, kept=kept, labels=new_labels, contradicted=contradicted,
                        transitions=dict(sorted(transitions.items())), min_confidence=float(min_confidence),
                        unsure=unsure)


def apply_check(dataset: Dataset, check: TeacherCheck) -> Dataset:
    """The rows of ``dataset`` that ``check`` keeps, with its labels (other columns as they were)."""
    if check.kept and max(check.kept) >= len(dataset):
        raise ValueError(f"the check covers {max(check.kept) + 1}+ rows but the dataset has {len(dataset)}")
    kept = dataset.select(list(check.kept))
    feature = kept.features["label"]
    columns = kept.column_names
    relabelled = kept.remove_columns("label").add_column("label", list(check.labels), feature=feature)
    return relabelled.select_columns(columns)


def teacher_predictions(
    run_dir: str | Path, texts: Sequence[str], *, device: torch.device | str, num_labels: int, batch_size: int = 64,
    trust_remote_code: bool = False,
) -> tuple[list[int], list[float], dict[str, Any]]:
    """The selected model of the finished run ``run_dir`` on ``texts``: its predictions, its probability of each
    prediction (softmax), and what the report says about it.

    Raises:
        pipeline.inference.RunDirError: ``run_dir`` is not a finished run, or its model does not rebuild.
        ValueError: the teacher classifies into another number of labels than ``num_labels``.
    """
    from pipeline import inference  # imports pipeline.training, which imports this module

    cfg, tokenizer, model = inference.load_run(run_dir, device, trust_remote_code=trust_remote_code)  # checks the folder
    if cfg.model.num_labels != num_labels:
        raise ValueError(f"the teacher {run_dir} classifies into {cfg.model.num_labels} labels, this run into {num_labels}")
    rows = Dataset.from_dict({"text": list(texts), "label": [0] * len(texts)})
    encoded = data_lib.encode(rows, tokenizer, max_length=cfg.data.max_length)
    loader = DataLoader(encoded, batch_size=batch_size, shuffle=False, collate_fn=data_lib.make_collator(tokenizer))
    probabilities, _ = predict_proba(model, loader, device=device, desc="teacher")
    confidences, predictions = probabilities.max(dim=-1)
    metrics = json.loads((Path(run_dir) / inference.METRICS_FILE).read_text(encoding="utf-8"))
    canary = metrics.get("canary") or {}
    about = {
        "run_dir": str(Path(run_dir)), "method": cfg.method, "recipe": cfg.recipe, "model": cfg.model.name_or_path,
        "best_epoch": metrics.get("best_epoch"), "dev_clean_acc": metrics.get("dev_clean_acc"),
        "canary_held": canary.get("held") if canary.get("enabled") else None,
    }
    del model
    return predictions.tolist(), confidences.tolist(), about


def report(check: TeacherCheck, texts: Sequence[str], labels: Sequence[int], *, teacher: dict[str, Any],
           canary_rows: Sequence[int] = (), confidences: Sequence[float] | None = None) -> dict[str, Any]:
    """The ``teacher`` block of filter-report.json: the teacher, the counts, the contradicted rows.

    ``canary_rows``: the indices of the planted canary rows among ``texts`` (reported apart: the canary is known).
    ``confidences``: the teacher's probability of its prediction per row (listed with each contradicted row).
    """
    canary = set(canary_rows)
    unsure = set(check.unsure)

    def row(i: int) -> dict[str, Any]:
        out = {"text": texts[i], "label": int(labels[i]), "canary": i in canary}
        if confidences is not None:
            out["teacher_confidence"] = round(float(confidences[i]), 4)
        if check.min_confidence > 0:
            out["dropped_unsure"] = i in unsure
        return out

    return {
        "teacher": teacher,
        "action": check.action,
        "rows_checked": len(labels),
        "rows_contradicted": len(check.contradicted),
        "rows_kept": len(check.kept),
        "transitions": [{"label": a, "teacher": b, "rows": n} for (a, b), n in check.transitions.items()],
        "canary_rows": len(canary),
        "canary_rows_contradicted": sum(i in canary for i in check.contradicted),
        "min_confidence": check.min_confidence,
        "rows_unsure_dropped": len(unsure),
        "canary_rows_unsure_dropped": len(unsure & canary),
        "contradicted_rows": [row(i) for i in check.contradicted],
    }


def summary(block: dict[str, Any]) -> str:
    """One line for the log and the end-of-run printout from a :func:`report` block (with or without its row list)."""
    moves = ", ".join(f"{t['label']}->{t['teacher']}: {t['rows']}" for t in block["transitions"]) or "none"
    if block["action"] == "drop":
        done = f"dropped ({block['rows_kept']} rows left)"
    elif block.get("rows_unsure_dropped"):
        done = (f"relabelled where the teacher was at least {block['min_confidence']:g} sure, "
                f"{block['rows_unsure_dropped']} unsure rows dropped ({block['rows_kept']} rows left)")
    else:
        done = "relabelled"
    return (f"filter teacher {block['teacher']['run_dir']}: contradicted {block['rows_contradicted']} of "
            f"{block['rows_checked']} training rows ({moves}), {done}; canary rows contradicted: "
            f"{block['canary_rows_contradicted']} of {block['canary_rows']} (see filter-report.json)")
