"""Robustness matrix: methods x attacks x seeds (x datasets x models) through the same training code.

A grid file (YAML) names a base run config and the axes:

    base_config: launch/configs/demo.yaml      # every cell starts from this run config
    output_root: runs/matrix_sst2              # cells, logs, results.csv, REPORT.md
    datasets: [sst-2]
    models: [minilm]
    attacks: [badnets, addsent, stylebkd, synbkd]
    methods: [vanilla, lora, musclelora, musclelora_never_raw]
    variants:                                  # named settings of one launch/train.py method, used like methods
      musclelora_never_raw: {method: musclelora, overrides: [align.min_ref_loss=0, align.max_raw_ratio=0]}
    seeds: [42]                                # default seeds of every method
    method_seeds: {vanilla: [42, 43, 44]}      # per-method seeds (optional)
    method_attacks: {lora: [badnets]}          # per-method attacks, a subset of attacks (optional)
    overrides: [train.epochs=2]                # dotted overrides for every cell
    method_overrides: {vanilla: [train.lr=2e-5]}
    cell_overrides:                            # extra overrides where all given keys match
      - {match: {method: musclelora, attack: badnets}, overrides: [analysis.frequency_every_steps=5]}
    derived:                                   # methods computed from another method's finished cell
      strip: {from: vanilla}                   # inference-time defences: launch/defend.py on that run
      onion: {from: vanilla, args: [--lm, smollm2, --threshold, auto]}
      rap: {from: vanilla}                     # RAP: trained perturbation word, threshold on dev-clean
      bki: {from: vanilla}                     # data filtering: launch/filter_data.py on that run, then
      cube: {from: vanilla}                    # the source method retrained on the kept rows
    run_first: [vanilla, musclelora]           # run order only: these methods across every attack first
    run_last: [bki]                            # ... and these after every other cell (all seeds)
    publish_dir: docs                          # also copy REPORT.md and plots/ here (e.g. into the repo)
    discussion: docs/matrix_discussion.md      # markdown appended to REPORT.md (the analysis)

Cells that ran the frequency analysis (``analysis.frequency_every_steps``) get their curves and heat
map (``launch/fourier.py``) under ``plots/frequency/`` and a section in REPORT.md.

A derived cell waits (is skipped, and picked up by the next run) until its source cell of the same
dataset, model, attack and seed has finished.

A training cell may read another method's cell of the same dataset, model, attack and seed: ``${cell:NAME}``
in any of its overrides is replaced by that cell's folder when the command is built, e.g. a student trained on
the labels a defended run checked::

    variants:
      student: {method: vanilla, overrides: ['filter.teacher=${cell:teacher}']}

``NAME`` must be a training (not derived) method of the grid with a cell at every dataset, model, attack and
seed of the reading method, and must not itself read a cell. Reading cells start after every other cell of
the same run has been started and wait for the cells they read; a cell whose read cell did not finish waits for
the next run of the grid. The read cell's settings are part of the reader's recorded settings, so rerunning
the read cell makes the reader ``changed``.

A variant (``variants: {name: {method: M, overrides: [...]}}``) is a named configuration of the training
method ``M``, so that several settings of one method (the authors' MuScleLoRA recipe beside a candidate)
are compared side by side in one grid. Its name is used wherever a method name is: in ``methods``,
``method_seeds``, ``method_overrides``, ``cell_overrides`` (``match: {method: <name>}``), ``run_first`` /
``run_last`` and a derived method's ``from:`` (STRIP, BKI, ... on the variant's model). It has its own
cells (``cells/<dataset>/<model>/<attack>/<name>/seed<seed>``) and its own row in REPORT.md and
results.csv (column ``method``: the name; ``train_method``: ``M``). Its cells run ``launch/train.py
method=M`` with the overrides, in this order (a later value of a key wins):

    overrides  ->  method_overrides[M]  ->  the variant's overrides  ->  method_overrides[<name>]  ->  cell_overrides

so ``method_overrides[M]`` holds settings shared by ``M`` and all its variants (``M`` itself need not
be in ``methods``), and a variant states only what it changes. A derived cell from a variant takes the
same overrides without ``cell_overrides``, as from a method. A variant's name may not be a
``launch/train.py`` method or a derived method, ``M`` must be a ``launch/train.py`` method (not another
variant), and its overrides must be ``key=value`` strings that the run config accepts and that do not set
an axis (``method``, ``seed``, ...); the grid is refused at load time otherwise, naming the file, the
variant and the value. The variant's method and overrides are part of its cells' recorded settings
(below): editing them makes finished cells ``changed``.

Each cell is one ``launch/train.py`` process writing ``<output_root>/cells/<dataset>/<model>/<attack>/<method>/seed<seed>``.
A cell with ``metrics.json`` is finished and skipped; a cell with a complete checkpoint resumes
(``resume=true``); a cell directory without either is removed and started again. So a grid killed
at any point and started again finishes without redoing finished cells. ``results.csv`` and
``REPORT.md`` are rebuilt from the finished cells' ``metrics.json`` after every cell.

Before the first cell starts, every training cell's run config (base config + overrides + axes) is
parsed and validated (:func:`cell_problems`); one invalid cell stops the grid with every problem listed,
and ``--list`` shows such a cell as ``invalid``.

A finished cell records its settings (the parsed base config, its overrides, a derived cell's source
and arguments) in ``cell.json``. When the grid file or the base config changes them afterwards, the
cell is ``changed``: the report leaves it out, and a run refuses to start until the old results are
set aside with ``rerun_changed`` (``--rerun-changed``: moved to ``<output_root>/replaced/``, then rerun)
or the settings are put back. Results of two settings are never mixed in one table.
"""

from __future__ import annotations

import concurrent.futures
import csv
import difflib
import hashlib
import io
import itertools
import json
import logging
import os
import re
import shutil
import statistics
import subprocess
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pipeline import checkpoint as ckpt
from pipeline.config import METHODS, ConfigError

logger = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]  # relative paths in grid files are read from here

_GRID_KEYS = {
    "base_config", "output_root", "datasets", "models", "attacks", "methods", "seeds", "method_seeds", "method_attacks",
    "overrides", "method_overrides", "cell_overrides", "title", "notes", "derived", "run_first", "run_last", "publish_dir",
    "discussion", "variants",
}
CELL_REFERENCE = re.compile(r"\$\{cell:([^}]*)\}")
"""``${cell:NAME}`` in a cell's override: the folder of method NAME's cell of the same dataset, model, attack, seed."""
DEFENSES = ("strip", "onion", "rap")
FILTERS = ("bki", "cube")
CSV_FIELDS = (
    "dataset", "model", "attack", "method", "train_method", "seed", "cacc", "asr", "clean_fpr", "asr_minus_clean_fpr",
    "best_epoch", "dev_clean_acc", "global_steps", "train_seconds", "wall_seconds", "peak_memory_mb",
    "trainable_parameters", "canary_asr", "canary_floor", "canary_held", "filter_removed", "gates", "run_dir",
)


@dataclass(frozen=True)
class Cell:
    """One training run of the grid.

    ``method`` is the name in the grid's ``methods`` (a variant's name for a variant); ``train_method`` is the
    ``launch/train.py`` method behind a variant: of this cell when ``method`` is a variant, of its source
    when this is a derived cell from a variant; None otherwise (``method`` or ``source`` itself).
    """

    dataset: str
    model: str
    attack: str
    method: str
    seed: int
    overrides: tuple[str, ...]
    source: str | None = None
    derived_args: tuple[str, ...] = ()
    train_method: str | None = None
    reads: tuple[str, ...] = ()
    """Methods whose cell of the same dataset, model, attack and seed this cell's overrides name (``${cell:NAME}``)."""

    @property
    def trained_method(self) -> str:
        """The ``launch/train.py`` method that trained this cell's model (a derived cell: its source's)."""
        return self.train_method or self.source or self.method

    @property
    def key(self) -> str:
        """Path of the cell below ``<output_root>/cells``."""
        model = Path(self.model).name or self.model
        return f"{self.dataset}/{model}/{self.attack}/{self.method}/seed{self.seed}"


@dataclass(frozen=True)
class Variant:
    """A named configuration of one ``launch/train.py`` method (the grid's ``variants:``)."""

    name: str
    method: str
    overrides: tuple[str, ...]


@dataclass(frozen=True)
class Grid:
    """A parsed grid file."""

    path: Path
    base_config: Path
    output_root: Path
    cells: tuple[Cell, ...]
    title: str = "Robustness matrix"
    notes: str = ""
    methods: tuple[str, ...] = ()
    attacks: tuple[str, ...] = ()
    raw: Mapping[str, Any] = field(default_factory=dict)
    publish_dir: Path | None = None
    discussion: Path | None = None
    variants: Mapping[str, Variant] = field(default_factory=dict)


def _as_list(value: Any, key: str, path: Path, problems: list[str]) -> list[Any]:
    if value is None:
        return []
    if not isinstance(value, list):
        problems.append(f"{path}: {key} must be a list, got {value!r}")
        return []
    return value


def load_grid(path: str | os.PathLike[str]) -> Grid:
    """Parse and validate a grid file (every problem reported at once, relative paths from the repo root).

    Raises:
        ConfigError: unknown keys, missing axes, or malformed values.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError([f"grid file {path} does not exist"])
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise ConfigError([f"{where}: not valid YAML ({error})"]) from error
    problems: list[str] = []
    if not isinstance(raw, dict):
        raise ConfigError([f"{path}: a grid file is a mapping of keys, got {type(raw).__name__}"])
    for key in sorted(set(raw) - _GRID_KEYS):
        problems.append(f"{path}: unknown key {key!r}; known keys: {sorted(_GRID_KEYS)}")

    def resolve(value: str) -> Path:
        candidate = Path(value)
        return candidate if candidate.is_absolute() else REPO / candidate

    base = resolve(str(raw.get("base_config", "launch/configs/demo.yaml")))
    if not base.is_file():
        problems.append(f"{path}: base_config {base} does not exist")
    output_root = resolve(str(raw.get("output_root", f"runs/matrix_{path.stem}")))
    publish_dir = resolve(str(raw["publish_dir"])) if raw.get("publish_dir") else None
    discussion = resolve(str(raw["discussion"])) if raw.get("discussion") else None
    if discussion is not None and not discussion.is_file():
        problems.append(f"{path}: discussion {discussion} does not exist (a markdown file included in REPORT.md)")
    axes = {}
    for key in ("datasets", "models", "attacks", "methods", "seeds"):
        axes[key] = _as_list(raw.get(key), key, path, problems)
        if not axes[key] and key in ("attacks", "methods"):
            problems.append(f"{path}: {key} is required (a non-empty list)")
    seeds_default = axes["seeds"] or [42]
    variants = _parse_variants(raw.get("variants"), path, problems)
    method_seeds = raw.get("method_seeds") or {}
    method_overrides = raw.get("method_overrides") or {}
    # method_overrides may also name the launch/train.py method behind a listed variant (shared settings).
    underlying = [variants[m].method for m in axes["methods"] if m in variants]
    method_attacks = raw.get("method_attacks") or {}
    for name, mapping, allowed, values in (("method_seeds", method_seeds, axes["methods"], "list"),
                                           ("method_overrides", method_overrides, [*axes["methods"], *underlying], "list"),
                                           ("method_attacks", method_attacks, axes["methods"], "list of attacks")):
        if not isinstance(mapping, dict):
            problems.append(f"{path}: {name} must map method -> {values}")
            continue
        for method in mapping:
            if method not in allowed:
                also = " nor the method of one of their variants" if name == "method_overrides" and variants else ""
                problems.append(f"{path}: {name} names {method!r}, which is not in methods {axes['methods']}{also}")
    if not isinstance(method_overrides, dict):
        method_overrides = {}
    if not isinstance(method_attacks, dict):
        method_attacks = {}
    for method, attacks in method_attacks.items():
        if method in axes["methods"] and (not isinstance(attacks, list) or not attacks
                                          or any(a not in axes["attacks"] for a in attacks)):
            problems.append(f"{path}: method_attacks.{method} must be a non-empty list of attacks from {axes['attacks']}, "
                            f"got {attacks!r}")
    derived = raw.get("derived") or {}
    if not isinstance(derived, dict):
        problems.append(f"{path}: derived must map method -> {{from: method, args: [...]}}")
        derived = {}
    for method, spec in derived.items():
        if method not in (*DEFENSES, *FILTERS):
            problems.append(f"{path}: derived method {method!r} is unknown; derived methods are {[*DEFENSES, *FILTERS]}")
        elif not isinstance(spec, dict) or spec.get("from") not in axes["methods"] or set(spec) - {"from", "args"}:
            problems.append(f"{path}: derived.{method} must be {{from: <a method of this grid>, args: [...]}}, got {spec!r}")
        elif method not in axes["methods"]:
            problems.append(f"{path}: derived method {method!r} must also be listed in methods")
    for method in axes["methods"]:
        if method in (*DEFENSES, *FILTERS) and method not in derived:
            problems.append(f"{path}: method {method!r} is a derived method; add derived: {{{method}: {{from: vanilla}}}}")
    cell_overrides = _as_list(raw.get("cell_overrides"), "cell_overrides", path, problems)
    for i, rule in enumerate(cell_overrides):
        if not isinstance(rule, dict) or set(rule) != {"match", "overrides"}:
            problems.append(f"{path}: cell_overrides[{i}] must be {{match: {{...}}, overrides: [...]}}")
    run_first = [str(m) for m in _as_list(raw.get("run_first"), "run_first", path, problems)]
    run_last = [str(m) for m in _as_list(raw.get("run_last"), "run_last", path, problems)]
    for key, names in (("run_first", run_first), ("run_last", run_last)):
        for method in names:
            if method not in axes["methods"]:
                problems.append(f"{path}: {key} names {method!r}, which is not in methods {axes['methods']}")
    for method in sorted(set(run_first) & set(run_last)):
        problems.append(f"{path}: {method!r} is in both run_first and run_last")
    common = [str(o) for o in _as_list(raw.get("overrides"), "overrides", path, problems)]
    problems += _axis_problems(common, f"{path}: overrides")
    if base.is_file():  # a variant's overrides must make a valid run config of its method
        for variant in variants.values():
            shared = [*common, *(str(o) for o in method_overrides.get(variant.method) or [])]
            problems += _variant_config_problems(path, base, variant, shared)
    if problems:
        raise ConfigError(problems)

    def training_overrides(method: str) -> list[str]:
        """Overrides of a method's or variant's cells before cell_overrides (the order in the module docstring)."""
        extra = list(common)
        if method in variants:
            extra += [str(o) for o in method_overrides.get(variants[method].method) or []]
            extra += variants[method].overrides
        return extra + [str(o) for o in method_overrides.get(method) or []]

    cells: list[Cell] = []
    positions: list[int] = []
    # First seed of every method across the grid first, then the extra seeds: a partial grid is a
    # complete one-seed table early. Within a seed position, run_first methods go first (in that
    # order, across every attack); run_last methods after all other cells; the report keeps the
    # order of ``methods``.
    for position, dataset, model, attack, method in itertools.product(
        range(max(len(v) for v in [seeds_default, *method_seeds.values()])),
        axes["datasets"] or [None], axes["models"] or [None], axes["attacks"], axes["methods"],
    ):
        if method in method_attacks and attack not in method_attacks[method]:
            continue
        method_list = method_seeds.get(method) or seeds_default
        for seed in method_list[position : position + 1]:
            extra = training_overrides(method)
            values = {"dataset": dataset, "model": model, "attack": attack, "method": method, "seed": seed}
            for rule in cell_overrides:
                if all(values.get(k) == v for k, v in rule["match"].items()):
                    extra += [str(o) for o in rule["overrides"]]
            spec = derived.get(method)
            axes_of_cell = (str(dataset or "default"), str(model or "default"), str(attack), str(method), int(seed))
            if spec:  # a derived cell takes its source method's overrides (the retrained model is that method)
                source = spec["from"]
                cells.append(Cell(*axes_of_cell, tuple(training_overrides(source)), source=source,
                                  derived_args=tuple(str(a) for a in spec.get("args") or []),
                                  train_method=variants[source].method if source in variants else None))
            else:
                reads = tuple(dict.fromkeys(m for o in extra for m in CELL_REFERENCE.findall(o)))
                cells.append(Cell(*axes_of_cell, tuple(extra),
                                  train_method=variants[method].method if method in variants else None, reads=reads))
            positions.append(position)
    problems += _reference_problems(path, cells, set(derived))
    if problems:
        raise ConfigError(problems)
    rank = {method: i for i, method in enumerate(run_first)}
    last = set(run_last)
    order = sorted(range(len(cells)), key=lambda i: (cells[i].method in last, positions[i], rank.get(cells[i].method, len(rank)), i))
    cells = [cells[i] for i in order]
    return Grid(
        path=path, base_config=base, output_root=output_root, cells=tuple(cells),
        title=str(raw.get("title", "Robustness matrix")), notes=str(raw.get("notes", "")),
        methods=tuple(axes["methods"]), attacks=tuple(axes["attacks"]), raw=raw,
        publish_dir=publish_dir, discussion=discussion, variants=variants,
    )


_AXIS_OWNED = ("method", "seed", "data.attack", "data.dataset", "model.name_or_path", "output_dir")
_VARIANT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def _axis_problems(overrides: Sequence[str], where: str) -> list[str]:
    """Overrides that set a key the grid's axes own (``method``, ``seed``, ...)."""
    keys = [str(o).split("=", 1)[0] for o in overrides]
    return [f"{where} sets {key!r}, which the grid axes own; use the axis" for key in keys if key in _AXIS_OWNED]


def _parse_variants(raw: Any, path: Path, problems: list[str]) -> dict[str, Variant]:
    """The grid's ``variants:`` (name -> method and overrides), checked for form; problems appended."""
    if raw is None:
        return {}
    form = "{method: <a launch/train.py method>, overrides: [key=value, ...]}"
    if not isinstance(raw, dict):
        problems.append(f"{path}: variants must map a name to {form}, got {raw!r}")
        return {}
    variants: dict[str, Variant] = {}
    for name, spec in raw.items():
        where = f"{path}: variants.{name}"
        if not isinstance(name, str) or not _VARIANT_NAME.fullmatch(name):
            problems.append(f"{where}: a variant's name is its cells' folder name; use letters, digits, '_', '.' "
                            f"and '-' (got {name!r})")
        elif name in METHODS:
            problems.append(f"{where}: {name!r} is a launch/train.py method, so its cells and rows would collide; "
                            f"give the variant a name of its own, e.g. {name}_<what it changes>")
        elif name in (*DEFENSES, *FILTERS):
            problems.append(f"{where}: {name!r} is a derived method; give the variant a name of its own")
        elif not isinstance(spec, dict) or "method" not in spec or set(spec) - {"method", "overrides"}:
            problems.append(f"{where} must be {form}, got {spec!r}")
        elif spec["method"] not in METHODS:
            method = spec["method"]
            if method in raw:
                hint = "a variant cannot build on another variant; give its method and copy its overrides"
            else:
                close = difflib.get_close_matches(str(method), METHODS, n=1)
                hint = (f"did you mean {close[0]!r}? " if close else "") + f"use one of {', '.join(METHODS)}"
            problems.append(f"{where}.method: got {method!r}, which is not a launch/train.py method; {hint}")
        else:
            overrides = spec.get("overrides") or []
            listed = isinstance(overrides, list)
            bad = [o for o in overrides if not isinstance(o, str) or "=" not in o] if listed else overrides
            if bad:
                problems.append(f"{where}.overrides must be a list of key=value strings (e.g. align.min_ref_loss=0), "
                                f"got {bad!r}")
                continue
            axis = _axis_problems(overrides, f"{where}.overrides")
            problems += [f"{p} (a variant's method is its method: key)" if "'method'" in p else p for p in axis]
            if not axis:
                variants[name] = Variant(name, str(spec["method"]), tuple(overrides))
    return variants


def _variant_config_problems(path: Path, base: Path, variant: Variant, shared: Sequence[str]) -> list[str]:
    """What the variant's overrides break in the run config of its method (base config + ``shared`` + them).

    Problems already present without the variant's overrides are left to :func:`cell_problems`.
    """
    from pipeline.config import load_config

    def problems_of(overrides: Sequence[str]) -> list[str]:
        try:
            load_config(base, overrides)
        except ConfigError as error:
            return list(error.problems)
        return []

    before = problems_of([f"method={variant.method}", *shared])
    after = problems_of([f"method={variant.method}", *shared, *variant.overrides])
    return [f"{path}: variants.{variant.name}.overrides {list(variant.overrides)}: {problem}"
            for problem in after if problem not in before]


def _reference_problems(path: Path, cells: Sequence[Cell], derived: set[str]) -> list[str]:
    """Why the grid's ``${cell:NAME}`` references cannot be resolved (empty when every one can)."""
    problems: list[str] = []
    by_key = {(c.dataset, c.model, c.attack, c.method, c.seed): c for c in cells}
    reported: set[tuple[str, str]] = set()
    for cell in cells:
        for name in cell.reads:
            if (cell.method, name) in reported:
                continue
            target = by_key.get((cell.dataset, cell.model, cell.attack, name, cell.seed))
            why = None
            if name == cell.method:
                why = "a cell cannot read itself"
            elif name in derived:
                why = f"{name!r} is a derived method; name a training method"
            elif target is None:
                why = (f"{name!r} has no cell at {cell.dataset}/{cell.model}/{cell.attack}/seed{cell.seed}; list it in "
                       "methods with the same attacks and seeds (method_attacks, method_seeds)")
            elif target.reads:
                why = f"{name!r} itself reads {list(target.reads)}; a read cell may not read another"
            if why:
                reported.add((cell.method, name))
                problems.append(f"{path}: method {cell.method!r} reads ${{cell:{name}}}: {why}")
    return problems


def read_cell(cell: Cell, name: str) -> Cell:
    """The cell of method ``name`` that ``cell`` reads (same dataset, model, attack, seed; its overrides not filled)."""
    return Cell(cell.dataset, cell.model, cell.attack, name, cell.seed, ())


def _grid_cell(grid: Grid, cell: Cell) -> Cell:
    """The grid's own cell with ``cell``'s key (with its overrides)."""
    return next(c for c in grid.cells if c.key == cell.key)


def expand_references(grid: Grid, cell: Cell, overrides: Sequence[str]) -> list[str]:
    """``overrides`` with every ``${cell:NAME}`` replaced by the folder of the cell it names."""
    return [CELL_REFERENCE.sub(lambda m: str(cell_dir(grid, read_cell(cell, m.group(1)))), o) for o in overrides]


def cell_dir(grid: Grid, cell: Cell) -> Path:
    """Output directory of one cell."""
    return grid.output_root / "cells" / cell.key


def cell_state(run_dir: Path) -> str:
    """``finished`` (metrics.json), ``resumable`` (complete checkpoint, also one a killed save left as
    ``last.old-<pid>``, which the resume renames back), ``stale`` (anything else present), ``new``."""
    if (run_dir / "metrics.json").is_file():
        return "finished"
    checkpoints = run_dir / "checkpoints"
    if (checkpoints / "last" / "COMPLETE").is_file() or any(
        (old / "COMPLETE").is_file() for old in checkpoints.glob("last.old-*")
    ):
        return "resumable"
    return "stale" if run_dir.exists() else "new"


_AXIS_KEYS = ("method", "seed", "data.attack", "data.dataset", "model.name_or_path", "output_dir", "resume")


def cell_settings(grid: Grid, cell: Cell) -> dict[str, Any]:
    """What a cell's result depends on besides its axes (recorded in its ``cell.json`` when it finishes).

    The base config enters parsed (``yaml.safe_load``), so editing its comments changes nothing. A derived
    cell (STRIP, BKI, ...) also records its source cell's settings; a variant's cell its ``launch/train.py``
    method (its overrides are in ``overrides``).
    """
    base = yaml.safe_load(grid.base_config.read_text()) if grid.base_config.is_file() else None
    settings = {
        "base_config": hashlib.sha256(json.dumps(base, sort_keys=True, default=str).encode()).hexdigest(),
        "overrides": list(cell.overrides),
        "source": cell.source,
        "derived_args": list(cell.derived_args),
    }
    if cell.source is None and cell.train_method is not None:  # a variant: its method is a setting too
        settings["variant_of"] = cell.train_method
    if cell.source is not None:  # a derived cell is stale when the run it was computed from changes
        settings["source_settings"] = cell_settings(grid, source_cell(cell))
    if cell.reads:  # so is a cell that reads another one
        settings["read_settings"] = {name: cell_settings(grid, _grid_cell(grid, read_cell(cell, name)))
                                     for name in cell.reads}
    return settings


def _command_overrides(command: Sequence[str]) -> list[str]:
    """The overrides of a recorded ``launch/train.py`` command (axes, output_dir and resume left out)."""
    tokens = list(command)
    start = tokens.index("--config") + 2 if "--config" in tokens else 0
    return [t for t in tokens[start:] if "=" in t and t.split("=", 1)[0] not in _AXIS_KEYS]


def settings_changes(grid: Grid, cell: Cell) -> list[str]:
    """How a finished cell's recorded settings differ from the grid's now (empty when equal or unrecorded).

    Cells finished before settings were recorded are compared on the overrides of their recorded command.
    """
    path = cell_dir(grid, cell) / "cell.json"
    if not path.is_file():
        return []
    recorded = json.loads(path.read_text())
    if isinstance(recorded.get("settings"), dict):
        before = recorded["settings"]
    elif isinstance(recorded.get("command"), list) and cell.source is None:
        before = {"overrides": _command_overrides(recorded["command"])}
    else:
        return []
    now = cell_settings(grid, cell)
    return [f"{key}: {before[key]!r} -> {now.get(key)!r}" for key in sorted(before) if before[key] != now.get(key)]


def cell_status(grid: Grid, cell: Cell) -> str:
    """:func:`cell_state`, with ``changed`` for a finished cell whose settings differ from the grid's now."""
    state = cell_state(cell_dir(grid, cell))
    return "changed" if state == "finished" and settings_changes(grid, cell) else state


def cell_problems(grid: Grid, cell: Cell) -> list[str]:
    """Why a cell's run config is invalid (empty when it parses): what ``launch/train.py`` would refuse at once.

    A training cell's command line (base config, axes, overrides) is loaded as ``launch/train.py`` loads it;
    a derived cell is checked through its source method's cell, whose overrides its retraining uses. An
    unknown method is also compared with the grid's variant names.
    """
    from pipeline.config import load_config

    target = source_cell(cell) if cell.source is not None else cell
    args = cell_command(grid, target, cell_dir(grid, target), resume=False)
    start = args.index("--config")
    try:
        load_config(args[start + 1], args[start + 2:])
    except ConfigError as error:
        problems = list(error.problems)
        name = target.train_method or target.method
        if name not in METHODS and grid.variants:
            close = difflib.get_close_matches(name, list(grid.variants), n=1)
            hint = f"did you mean the variant {close[0]!r}? " if close else ""
            names = ", ".join(grid.variants)
            problems = [f"{p}; {hint}this grid's variants: {names}" if p.split(" ", 1)[0].rstrip(":") == "method" else p
                        for p in problems]
        return problems
    return []


def invalid_cells(grid: Grid) -> dict[Cell, list[str]]:
    """Every cell whose run config is invalid, with its problems (:func:`cell_problems`)."""
    found = {cell: cell_problems(grid, cell) for cell in grid.cells}
    return {cell: problems for cell, problems in found.items() if problems}


def cell_command(grid: Grid, cell: Cell, run_dir: Path, *, resume: bool, python: str = sys.executable) -> list[str]:
    """The ``launch/train.py`` command line of one cell."""
    args = [python, str(REPO / "launch" / "train.py"), "--config", str(grid.base_config)]
    axes = [f"method={cell.train_method or cell.method}", f"seed={cell.seed}", f"data.attack={cell.attack}", f"output_dir={run_dir}"]
    if cell.dataset != "default":
        axes.append(f"data.dataset={cell.dataset}")
    if cell.model != "default":
        axes.append(f"model.name_or_path={cell.model}")
    return args + axes + expand_references(grid, cell, cell.overrides) + (["resume=true"] if resume else [])


def source_cell(cell: Cell) -> Cell:
    """The cell a derived cell is computed from (same dataset, model, attack, seed)."""
    assert cell.source is not None
    return Cell(cell.dataset, cell.model, cell.attack, cell.source, cell.seed, cell.overrides, train_method=cell.train_method)


def derived_commands(grid: Grid, cell: Cell, run_dir: Path, *, python: str = sys.executable) -> list[list[str]]:
    """Commands of a derived cell: the defence / filter on the source run (then the retraining)."""
    source_dir = cell_dir(grid, source_cell(cell))
    if cell.method in DEFENSES:
        return [[python, str(REPO / "launch" / "defend.py"), str(source_dir), "--defense", cell.method,
                 "--out", str(run_dir / "defense.json"), *cell.derived_args]]
    data_root = run_dir / "data"
    retrain = source_cell(cell)
    return [
        [python, str(REPO / "launch" / "filter_data.py"), str(source_dir), "--method", cell.method,
         "--out-root", str(data_root), "--overwrite", *cell.derived_args],
        cell_command(grid, retrain, run_dir / "run", resume=False, python=python) + [f"data.root={data_root}"],
    ]


def finish_derived(cell: Cell, run_dir: Path) -> None:
    """Write the derived cell's metrics.json (method renamed) from the defence or retraining output."""
    if cell.method in DEFENSES:
        result = json.loads((run_dir / "defense.json").read_text())
        metrics = {
            "method": cell.method, "attack": cell.attack, "seed": cell.seed, "source_method": cell.source,
            "cacc": result["cacc"], "asr": result["asr"], "clean_fpr": result["clean_fpr"],
            "asr_minus_clean_fpr": result["asr"] - result["clean_fpr"], "best_epoch": None, "history": [],
            "train_seconds": 0.0, "peak_memory_mb": result.get("peak_memory_mb"), "trainable_parameters": 0,
            "defense": result,
        }
    else:
        metrics = json.loads((run_dir / "run" / "metrics.json").read_text())
        report_files = sorted((run_dir / "data").glob("**/filter-report.json"))
        metrics.update(method=cell.method, source_method=cell.source,
                       filter_report=json.loads(report_files[0].read_text()) if report_files else None)
    ckpt.atomic_write_json(run_dir / "metrics.json", metrics)


def run_grid(
    grid: Grid,
    *,
    python: str = sys.executable,
    env: Mapping[str, str] | None = None,
    runner: Callable[[list[str], Path, Mapping[str, str]], int] | None = None,
    max_cells: int | None = None,
    jobs: int = 1,
    rerun_changed: bool = False,
    validate: bool = True,
) -> dict[str, int]:
    """Run every unfinished cell in grid order, rebuilding results.csv and REPORT.md after each.

    Args:
        grid: the parsed grid.
        python: interpreter for the cell processes.
        env: environment of the cell processes (default: this process's).
        runner: ``runner(command, log_file, env) -> return code`` (default: a subprocess).
        max_cells: start at most this many cells (None: all).
        jobs: cells run side by side (give each cell ``train.num_threads`` = cores / jobs).
        rerun_changed: move finished cells whose settings changed to ``<output_root>/replaced/`` and rerun
            them (default: refuse to start while any exists).
        validate: check every cell's run config before the first one starts (:func:`invalid_cells`); off
            only for runners that do not run ``launch/train.py``.

    Returns:
        Counts of cells by outcome (``skipped``, ``ran``, ``failed``).

    Raises:
        ConfigError: a cell's run config is invalid, or finished cells' settings changed and ``rerun_changed``
            is off. Nothing ran.
    """
    invalid = invalid_cells(grid) if validate else {}
    if invalid:
        raise ConfigError([
            f"cell {cell.key}: {problem}; nothing ran: fix the grid {grid.path} or its base config {grid.base_config}"
            for cell, problems in invalid.items() for problem in problems
        ])
    changed = {cell: settings_changes(grid, cell) for cell in grid.cells if cell_state(cell_dir(grid, cell)) == "finished"}
    changed = {cell: changes for cell, changes in changed.items() if changes}
    if changed and not rerun_changed:
        raise ConfigError([
            f"cell {cell.key} finished with other settings ({'; '.join(changes)})" for cell, changes in changed.items()
        ] + [f"nothing ran: rerun them with --rerun-changed (their directories move to {grid.output_root / 'replaced'}) "
             f"or put the settings back in {grid.path} / {grid.base_config}"])
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for cell in changed:
        target = grid.output_root / "replaced" / stamp / cell.key
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(cell_dir(grid, cell)), str(target))
        logger.warning("cell %s: settings changed (%s); its results moved to %s, rerunning", cell.key,
                       "; ".join(changed[cell]), target)
    counts = {"skipped": 0, "ran": 0, "failed": 0, "waiting": 0}
    logs = grid.output_root / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    run = runner or _subprocess_runner
    lock = threading.Lock()
    todo: list[tuple[int, Cell, str]] = []
    for index, cell in enumerate(grid.cells, 1):
        state = cell_state(cell_dir(grid, cell))
        if state == "finished":
            counts["skipped"] += 1
        elif max_cells is None or len(todo) < max_cells:
            todo.append((index, cell, state))
    # Cells that read another cell go after all the others (the pool starts cells in this order, so every
    # cell a reader waits for has been started before it); each cell sets its event when it is done.
    todo.sort(key=lambda item: bool(item[1].reads))
    done = {item[1].key: threading.Event() for item in todo}

    def run_one(index: int, cell: Cell, state: str) -> None:
        try:
            run_cell(index, cell, state)
        finally:
            done[cell.key].set()

    def run_cell(index: int, cell: Cell, state: str) -> None:
        run_dir = cell_dir(grid, cell)
        if cell.source is not None:
            run_derived(index, cell, run_dir)
            return
        for name in cell.reads:
            needed = read_cell(cell, name)
            if needed.key in done:
                done[needed.key].wait()
            if cell_state(cell_dir(grid, needed)) != "finished":
                with lock:
                    counts["waiting"] += 1
                logger.info("[%d/%d] %s waits for %s (not finished)", index, len(grid.cells), cell.key, needed.key)
                return
        if state == "stale":
            logger.warning("cell %s: removing an unfinished directory with no checkpoint", cell.key)
            try:
                ckpt.remove_run_folder(run_dir)
            except ckpt.NotARunFolderError as error:
                with lock:
                    counts["failed"] += 1
                logger.error("cell %s: %s; move those files away and run the grid again", cell.key, error)
                return
        run_dir.parent.mkdir(parents=True, exist_ok=True)
        command = cell_command(grid, cell, run_dir, resume=state == "resumable", python=python)
        log_file = logs / (cell.key.replace("/", "__") + ".log")
        logger.info("[%d/%d] %s %s", index, len(grid.cells), "resume" if state == "resumable" else "run", cell.key)
        started = time.perf_counter()
        code = run(command, log_file, dict(env or os.environ))
        wall = time.perf_counter() - started
        with lock:
            if code == 0 and cell_state(run_dir) == "finished":
                counts["ran"] += 1
                ckpt.atomic_write_json(run_dir / "cell.json", {"wall_seconds": wall, "command": command,
                                                              "settings": cell_settings(grid, cell)})
            else:
                counts["failed"] += 1
                logger.error("cell %s failed (exit %s); see %s", cell.key, code, log_file)
            write_outputs(grid)

    def run_derived(index: int, cell: Cell, run_dir: Path) -> None:
        if cell_state(cell_dir(grid, source_cell(cell))) != "finished":
            with lock:
                counts["waiting"] += 1
            logger.info("[%d/%d] %s waits for %s", index, len(grid.cells), cell.key, source_cell(cell).key)
            return
        if run_dir.exists():
            shutil.rmtree(run_dir)
        run_dir.mkdir(parents=True)
        log_file = logs / (cell.key.replace("/", "__") + ".log")
        logger.info("[%d/%d] run %s (from %s)", index, len(grid.cells), cell.key, cell.source)
        started = time.perf_counter()
        code = 0
        for command in derived_commands(grid, cell, run_dir, python=python):
            code = run(command, log_file, dict(env or os.environ))
            if code != 0:
                break
        wall = time.perf_counter() - started
        with lock:
            try:
                if code != 0:
                    raise RuntimeError(f"exit {code}")
                finish_derived(cell, run_dir)
                ckpt.atomic_write_json(run_dir / "cell.json", {"wall_seconds": wall, "settings": cell_settings(grid, cell)})
                counts["ran"] += 1
            except (RuntimeError, OSError, KeyError, ValueError) as error:
                counts["failed"] += 1
                logger.error("cell %s failed (%s); see %s", cell.key, error, log_file)
            write_outputs(grid)

    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        for future in [pool.submit(run_one, *item) for item in todo]:
            future.result()
    write_outputs(grid)
    return counts


def _subprocess_runner(command: list[str], log_file: Path, env: Mapping[str, str]) -> int:
    with log_file.open("a") as handle:
        handle.write(f"$ {' '.join(command)}\n")
        handle.flush()
        return subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT, env=dict(env)).returncode


# ----------------------------------------------------------------------------- results


def collect_rows(grid: Grid) -> list[dict[str, Any]]:
    """One CSV row per finished cell, in grid order."""
    rows = []
    for cell in grid.cells:
        run_dir = cell_dir(grid, cell)
        if cell_status(grid, cell) != "finished":
            continue
        metrics = json.loads((run_dir / "metrics.json").read_text())
        extra = json.loads((run_dir / "cell.json").read_text()) if (run_dir / "cell.json").is_file() else {}
        gates = [e.get("gates", {}) for e in metrics.get("history", [])]
        canary = metrics.get("canary") or {}
        rows.append({
            "dataset": cell.dataset, "model": cell.model, "attack": cell.attack, "method": cell.method,
            "train_method": cell.trained_method, "seed": cell.seed,
            **{k: metrics.get(k) for k in ("cacc", "asr", "clean_fpr", "asr_minus_clean_fpr", "best_epoch", "dev_clean_acc",
                                            "global_steps", "train_seconds", "peak_memory_mb", "trainable_parameters")},
            "wall_seconds": extra.get("wall_seconds"),
            "canary_asr": canary.get("asr"), "canary_floor": canary.get("floor"), "canary_held": canary.get("held"),
            "filter_removed": (metrics.get("filter") or {}).get("rows_removed"),
            "gates": json.dumps(gates),
            "run_dir": str(run_dir.relative_to(grid.output_root)),
            "_metrics": metrics,
        })
    return rows


def results_csv(rows: Sequence[Mapping[str, Any]]) -> str:
    """``results.csv`` text (one line per finished cell)."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(CSV_FIELDS), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in CSV_FIELDS})
    return buffer.getvalue()


def _mean_std(values: Sequence[float]) -> tuple[float, float | None]:
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else None)


def _fmt(values: Sequence[float]) -> str:
    if not values:
        return "-"
    mean, std = _mean_std(values)
    return f"{mean:.1f}" if std is None else f"{mean:.1f} ± {std:.1f}"


def summary_table(rows: Sequence[Mapping[str, Any]], methods: Sequence[str], attacks: Sequence[str]) -> str:
    """Markdown: per method and attack CACC / ASR / clean FPR as mean ± std over seeds, then averages over attacks."""
    groups: dict[tuple[str, str], list[Mapping[str, Any]]] = defaultdict(list)
    for row in rows:
        groups[(row["method"], row["attack"])].append(row)
    header = "| method | " + " | ".join(f"{a}: CACC / ASR (FPR)" for a in attacks) + " | avg CACC | avg ASR | avg FPR | seeds |"
    lines = [header, "|" + "---|" * (len(attacks) + 5)]
    for method in methods:
        cells, means, seeds = [], defaultdict(list), set()
        for attack in attacks:
            group = groups.get((method, attack), [])
            if not group:
                cells.append("-")
                continue
            seeds.update(r["seed"] for r in group)
            values = {k: [float(r[k]) for r in group] for k in ("cacc", "asr", "clean_fpr")}
            for k, v in values.items():
                means[k].append(statistics.mean(v))
            cells.append(f"{_fmt(values['cacc'])} / {_fmt(values['asr'])} ({_fmt(values['clean_fpr'])})")
        complete = len(means["cacc"]) == len(attacks)
        averages = [f"{statistics.mean(means[k]):.1f}" if complete else "-" for k in ("cacc", "asr", "clean_fpr")]
        lines.append(f"| {method} | " + " | ".join(cells + averages) + f" | {len(seeds) or '-'} |")
    return "\n".join(lines) + "\n"


def canary_table(rows: Sequence[Mapping[str, Any]], methods: Sequence[str], attacks: Sequence[str]) -> str:
    """Markdown: the selection numbers per method (or variant) and attack at the selected epoch, mean ± std over
    seeds: dev-clean accuracy, the planted canary's ASR / clean floor, and in how many runs the canary held;
    then dev-clean accuracy averaged over the attacks (when every attack has a row) and the runs held over
    all of them. Empty when no row has a canary."""
    groups: dict[tuple[str, str], list[Mapping[str, Any]]] = defaultdict(list)
    for row in rows:
        if row.get("canary_asr") is not None:
            groups[(row["method"], row["attack"])].append(row)
    if not groups:
        return ""
    lines = ["| method | " + " | ".join(f"{a}: dev-clean / canary ASR / floor (held)" for a in attacks)
             + " | avg dev-clean | held |", "|" + "---|" * (len(attacks) + 3)]
    for method in methods:
        if not any((method, a) in groups for a in attacks):
            continue
        cells, dev_means, held_all, runs = [], [], 0, 0
        for attack in attacks:
            group = groups.get((method, attack), [])
            if not group:
                cells.append("-")
                continue
            dev = [float(r["dev_clean_acc"]) for r in group if r.get("dev_clean_acc") not in (None, "")]
            dev_means += [statistics.mean(dev)] if dev else []
            held = sum(bool(r["canary_held"]) for r in group)
            held_all, runs = held_all + held, runs + len(group)
            cells.append(f"{_fmt(dev)} / {_fmt([float(r['canary_asr']) for r in group])} / "
                         f"{_fmt([float(r['canary_floor']) for r in group])} ({held}/{len(group)})")
        average = f"{statistics.mean(dev_means):.1f}" if len(dev_means) == len(attacks) else "-"
        lines.append(f"| {method} | " + " | ".join(cells) + f" | {average} | {held_all}/{runs} |")
    return "\n".join(lines) + "\n"


def write_outputs(grid: Grid) -> list[dict[str, Any]]:
    """Rebuild ``results.csv``, the plots and ``REPORT.md`` from the finished cells (and publish them)."""
    rows = collect_rows(grid)
    grid.output_root.mkdir(parents=True, exist_ok=True)
    ckpt.atomic_write_text(grid.output_root / "results.csv", results_csv(rows))
    plots: list[Path] = []
    if rows:
        from pipeline import report

        plots = report.matrix_plots(rows, grid.methods, grid.attacks, grid.output_root / "plots")
    frequency = frequency_plots(grid, rows)
    text = render_report(grid, rows, plots, frequency)
    ckpt.atomic_write_text(grid.output_root / "REPORT.md", text)
    if grid.publish_dir is not None:
        publish(grid, text, [*plots, *frequency])
    return rows


def frequency_plots(grid: Grid, rows: Sequence[Mapping[str, Any]]) -> list[Path]:
    """Curves and heat map (``launch/fourier.py``) of every finished cell that ran the frequency analysis.

    Written to ``plots/frequency/<attack>_<method>_seed<seed>/``; redrawn only when the cell's
    ``frequency.json`` is newer than its plots.
    """
    paths: list[Path] = []
    for row in rows:
        source = grid.output_root / row["run_dir"] / "frequency.json"
        if not source.is_file():
            continue
        out = grid.output_root / "plots" / "frequency" / f"{row['attack']}_{row['method']}_seed{row['seed']}"
        pngs = [out / "frequency_curves.png", out / "frequency_heatmap.png"]
        if not all(p.is_file() and p.stat().st_mtime >= source.stat().st_mtime for p in pngs):
            done = subprocess.run([sys.executable, str(REPO / "launch" / "fourier.py"), str(source.parent), "--out", str(out)],
                                  capture_output=True, text=True, check=False)
            if done.returncode != 0:
                logger.warning("frequency plots of %s failed: %s", source.parent, done.stderr.strip()[-500:])
                continue
        paths += pngs
    return paths


def publish(grid: Grid, report_text: str, plots: Sequence[Path]) -> None:
    """Copy ``REPORT.md`` and its plots (same relative layout) into ``grid.publish_dir``, atomically per file."""
    target = grid.publish_dir
    assert target is not None
    for plot in plots:
        destination = target / plot.relative_to(grid.output_root)
        data = plot.read_bytes()
        if destination.is_file() and destination.read_bytes() == data:
            continue  # unchanged: leave the published file (and its timestamp) alone
        destination.parent.mkdir(parents=True, exist_ok=True)
        ckpt.atomic_write_bytes(destination, data)
    ckpt.atomic_write_text(target / "REPORT.md", report_text)


def _unfinished_lines(grid: Grid, rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """Markdown lines naming the cells not finished yet, per method (empty when the grid is complete)."""
    done = {(r["dataset"], r["model"], r["attack"], r["method"], r["seed"]) for r in rows}
    missing: dict[str, list[str]] = defaultdict(list)
    for c in grid.cells:
        if (c.dataset, c.model, c.attack, c.method, c.seed) not in done:
            missing[c.method].append(f"{c.attack}/{c.seed}")
    if not missing:
        return []
    lines = ["Not finished yet (attack/seed; the table below leaves them out):", ""]
    lines += [f"- {method}: {', '.join(cells)}" for method, cells in missing.items()]
    return lines + [""]


def _shown(path: Path) -> str:
    """A path as a reader should type it: relative to the repository when inside it."""
    try:
        return Path(path).resolve().relative_to(REPO).as_posix()
    except ValueError:
        return str(path)


def _canary_lines(rows: Sequence[Mapping[str, Any]], grid: Grid) -> list[str]:
    """The report's selection-numbers section (dev-clean and the canary, docs/CANARY.md), or nothing when no
    finished cell planted a canary."""
    table = canary_table(rows, grid.methods, grid.attacks)
    if not table:
        return []
    return [
        "## Selection numbers: dev-clean accuracy and the canary at the selected epoch", "",
        "What a configuration may be chosen on (no test set, no poison labels). Dev-clean: accuracy on the",
        "dev-clean selection rows. Canary ASR: triggered non-target selection rows predicted as the canary's",
        "target; floor: the same rows without the trigger. Held: the trigger adds at most canary.tolerance",
        "(docs/CANARY.md); counted over seeds. Mean ± standard deviation over seeds.", "",
        table,
    ]


def _variant_lines(grid: Grid) -> list[str]:
    """The report's table of the named variants among the grid's methods (nothing when there are none)."""
    used = [grid.variants[m] for m in grid.methods if m in grid.variants]
    if not used:
        return []
    lines = [
        "## Variants: named configurations of one method", "",
        "A variant's cells run `launch/train.py method=<method>` with the shared settings, the method's",
        "`method_overrides`, then the overrides below (then the variant's own `method_overrides` and any",
        "`cell_overrides`; a later value of a key wins).", "",
        "| variant | method | overrides |", "|---|---|---|",
    ]
    lines += [f"| {v.name} | {v.method} | {', '.join(f'`{o}`' for o in v.overrides) or '-'} |" for v in used]
    return lines + [""]


def grid_source(grid: Grid, method: str) -> str:
    """The method a derived method starts from (its name when it is not derived)."""
    return next((c.source for c in grid.cells if c.method == method and c.source), method)


def render_report(
    grid: Grid, rows: Sequence[Mapping[str, Any]], plots: Sequence[Path], frequency: Sequence[Path] = ()
) -> str:
    """The REPORT.md text: settings, the summary table, cost per method, plots, frequency analysis, discussion."""
    done, total = len(rows), len(grid.cells)
    lines = [f"# {grid.title}", ""]
    if grid.notes:
        lines += [grid.notes.strip(), ""]
    lines += [
        f"Grid file: `{_shown(grid.path)}` (base config `{_shown(grid.base_config)}`); {done} of {total} cells finished.",
        f"Reproduce: `python launch/matrix.py --config {_shown(grid.path)}` (resumable; finished cells are skipped).",
        "",
        "Settings shared by every cell: " + (", ".join(f"`{o}`" for o in grid.raw.get("overrides") or []) or "the base config"),
        "",
        *_unfinished_lines(grid, rows),
        *_variant_lines(grid),
        "## CACC / ASR (clean false-positive rate) per method and attack",
        "",
        "Mean ± standard deviation over seeds. ASR counts triggered non-target test sentences predicted as the",
        "target; the clean FPR is the share of clean non-target test sentences predicted as the target (the",
        "floor under ASR that the trigger does not cause).",
        "",
        summary_table(rows, grid.methods, grid.attacks),
        *_canary_lines(rows, grid),
        "## Cost per method (mean over finished cells)",
        "",
        "Train seconds: the training loop; cell wall seconds: the whole cell as the grid ran it (set-up,",
        "evaluation, a derived method's filtering or defence pass; cells ran side by side, so the load varies;",
        "a resumed cell counts its last invocation only, while its train seconds add up over resumes).",
        "",
        "| method | cells | train seconds | cell wall seconds | peak memory MB | trainable parameters |",
        "|---|---|---|---|---|---|",
    ]
    by_method: dict[str, list[Mapping[str, Any]]] = defaultdict(list)
    for row in rows:
        by_method[row["method"]].append(row)
    for method in grid.methods:
        group = by_method.get(method, [])
        if not group:
            continue
        seconds = statistics.mean(float(r["train_seconds"] or 0) for r in group)
        memory = statistics.mean(float(r["peak_memory_mb"] or 0) for r in group)
        walls = [float(r["wall_seconds"]) for r in group if r.get("wall_seconds") not in (None, "")]
        wall = f"{statistics.mean(walls):.0f}" if walls else "-"
        params = group[0]["trainable_parameters"]
        if not seconds and not params:  # an inference-time defence: no training of its own
            lines.append(f"| {method} | {len(group)} | - (evaluates the {grid_source(grid, method)} model) | {wall} | - | - |")
            continue
        lines.append(f"| {method} | {len(group)} | {seconds:.0f} | {wall} | {memory:.0f} | {params} |")
    lines.append("")
    if plots:
        lines += ["## Plots", ""]
        for plot in plots:
            rel = plot.relative_to(grid.output_root)
            lines.append(f"![{plot.stem}]({rel.as_posix()})")
            lines.append("")
    if frequency:
        lines += [
            "## Frequency analysis (REFERENCE.md section 5)", "",
            "Relative low/high-frequency errors of the clean (dev-clean) and backdoor (dev-poison) mappings over",
            "optimiser steps, drawn by `python launch/fourier.py RUN_DIR` from each cell's `frequency.json`.", "",
        ]
        for plot in frequency:
            rel = plot.relative_to(grid.output_root)
            lines.append(f"`{rel.parent.name}`: ![{rel.parent.name} {plot.stem}]({rel.as_posix()})")
            lines.append("")
    if grid.discussion is not None:
        lines += [grid.discussion.read_text().strip(), ""]
    return "\n".join(lines)
