"""Poisoned text-classification data: CSV loading, validation, trusted reference split, collation.

MuScleLoRA (Wu et al., ACL 2024, arXiv 2402.12026) fine-tunes on a training set D_train of which an
unknown share has been poisoned, with a small trusted clean set D_dev (the dev-clean split). This
module only reads the published data; it never poisons anything.

Layout on disk (``<root>/<dataset>/<target_label>/<attack>/``), every file a CSV with header
``,0,1,2`` = (row index, text, label y, poison_label z):

    train  = <attack>/clean/<rate>/train-poison.csv   (clean-label BadNets)
           | <attack>/mix/<rate>/train-poison.csv     (AddSent, StyleBkd, SynBkd)
    dev-clean, dev-poison, test-clean, test-poison

Trusted split used for gradient alignment and model selection (REFERENCE.md section 2.3): with a
seeded permutation pi of the N rows of dev-clean,

    D_ref = {dev_clean[pi(i)] : i < ref_size},    D_sel = dev-clean \\ D_ref,
    D_ref and D_sel disjoint,  D_ref union D_sel = dev-clean,  |D_ref| = ref_size < N.

Threat model: training and selection never see ``poison_label``, dev-poison, test-clean or
test-poison. :func:`load_training_data` therefore opens exactly two files (the training CSV and
dev-clean) and drops ``poison_label`` while reading; :func:`load_evaluation_data` serves the rest.

Tokenisation truncates each text to ``max_length`` tokens and pads nothing; the collator pads a
batch to its longest sequence (dynamic padding): lengths l_1..l_b become a b x max_i l_i batch.
"""

from __future__ import annotations

import csv
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from datasets import Dataset, Features, Value
from transformers import DataCollatorWithPadding, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

EXPECTED_HEADER: tuple[str, ...] = ("", "0", "1", "2")
"""Header of every poison_data CSV: row index, text, label, poison_label."""

MAX_REPORTED_ERRORS = 10
"""How many bad rows one :class:`DataError` lists before summarising the rest as a count."""

_SETTING_FOR_AUTO: dict[str, Literal["clean", "mix"]] = {"badnets": "clean"}
_TRAIN_FILE = "train-poison.csv"


class DataError(ValueError):
    """A data file or folder is missing, malformed, or holds values out of range."""


@dataclass(frozen=True)
class SplitPaths:
    """Paths of the five CSV files one run uses.

    Attributes:
        train: Poisoned training set the defender fine-tunes on.
        dev_clean: Trusted clean dev set (reference samples + model selection).
        dev_poison: Triggered label-0 dev sentences relabelled to the target (evaluation only).
        test_clean: Clean test set (CACC).
        test_poison: Triggered label-0 test sentences relabelled to the target (ASR).
    """

    train: Path
    dev_clean: Path
    dev_poison: Path
    test_clean: Path
    test_poison: Path


@dataclass(frozen=True)
class TrainingData:
    """Everything training and model selection may see; no poison information.

    Attributes:
        train: Training rows, columns ``text``, ``label``.
        reference: ``ref_size`` seeded rows of dev-clean for the alignment reference gradient.
        selection: The remaining dev-clean rows, for checkpoint selection.
    """

    train: Dataset
    reference: Dataset
    selection: Dataset


@dataclass(frozen=True)
class EvaluationData:
    """Splits that only evaluation may read (columns ``text``, ``label``).

    Attributes:
        dev_poison: Triggered dev sentences (backdoor mapping for the frequency analysis).
        test_clean: Clean test sentences (CACC, clean false-positive rate).
        test_poison: Triggered test sentences (ASR).
    """

    dev_poison: Dataset
    test_clean: Dataset
    test_poison: Dataset


@dataclass(frozen=True)
class OverlapRecord:
    """Texts shared by one trusted split and one test split.

    Attributes:
        trusted_split: Name of the trusted split (key of the ``trusted`` mapping).
        test_split: Name of the test split (key of the ``test`` mapping).
        count: Number of distinct normalised texts occurring in both splits.
        examples: Up to five of the shared texts as written in the trusted split, sorted.
    """

    trusted_split: str
    test_split: str
    count: int
    examples: tuple[str, ...]


def _listing(folder: Path) -> str:
    """Comma-separated sorted entry names of ``folder`` (directories with a trailing slash)."""
    entries = sorted(p.name + ("/" if p.is_dir() else "") for p in folder.iterdir())
    return ", ".join(entries) if entries else "(empty)"


def _nearest_existing_parent(path: Path) -> Path:
    """Deepest existing ancestor of ``path`` (the filesystem root at worst)."""
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    return parent


def _missing_message(path: Path, what: str) -> str:
    """Message for a missing file or folder that shows what exists at the nearest existing level."""
    parent = _nearest_existing_parent(path)
    if parent.is_dir():
        return f"{what} not found: {path}; {parent} contains: {_listing(parent)}"
    return f"{what} not found: {path}; {parent} is not a directory"


def _require_dir(path: Path, what: str) -> None:
    """Raise :class:`DataError` naming the existing alternatives when ``path`` is not a folder."""
    if not path.is_dir():
        raise DataError(_missing_message(path, what))


def split_paths(
    root: str | Path,
    dataset: str,
    attack: str,
    *,
    setting: Literal["auto", "clean", "mix", "dirty"] = "auto",
    poison_rate: str | float = "0.1",
    target_label: int = 1,
) -> SplitPaths:
    """Locate the CSV files of one dataset / target label / attack in the poison_data layout.

    Args:
        root: The ``poison_data`` folder.
        dataset: Dataset folder name, e.g. ``"sst-2"``.
        attack: Attack folder name, e.g. ``"badnets"``, ``"addsent"``.
        setting: ``"clean"`` (clean-label: only target-label rows poisoned) or ``"mix"`` (a share of
            all rows poisoned and relabelled). ``"auto"`` picks ``"clean"`` for BadNets and
            ``"mix"`` otherwise, matching the published training sets.
        poison_rate: Poison-rate folder name under the setting, e.g. ``"0.1"``.
        target_label: Target-label folder name.

    Returns:
        The five paths, every one an existing file.

    Raises:
        DataError: A folder or file is missing; the message lists what exists at that level.
    """
    if setting not in ("auto", "clean", "mix", "dirty"):
        raise DataError(f"setting must be 'auto', 'clean', 'mix' or 'dirty', got {setting!r}")
    root = Path(root)
    _require_dir(root, "poison_data root folder")
    dataset_dir = root / dataset
    _require_dir(dataset_dir, f"dataset folder {dataset!r}")
    label_dir = dataset_dir / str(target_label)
    _require_dir(label_dir, f"target-label folder {target_label!r}")
    attack_dir = label_dir / attack
    _require_dir(attack_dir, f"attack folder {attack!r}")

    resolved = _SETTING_FOR_AUTO.get(attack, "mix") if setting == "auto" else setting
    paths = SplitPaths(
        train=attack_dir / resolved / str(poison_rate) / _TRAIN_FILE,
        dev_clean=attack_dir / "dev-clean.csv",
        dev_poison=attack_dir / "dev-poison.csv",
        test_clean=attack_dir / "test-clean.csv",
        test_poison=attack_dir / "test-poison.csv",
    )
    for name, path in vars(paths).items():
        if not path.is_file():
            auto = name == "train" and setting == "auto"
            hint = f" (setting 'auto' chose {resolved!r})" if auto else ""
            raise DataError(_missing_message(path, f"{name} file{hint}"))
    return paths


def _parse_int(field: str, column: str, num_values: int) -> tuple[int | None, str | None]:
    """Parse ``field`` as an integer in ``[0, num_values)``: (value, None) or (None, problem)."""
    text = field.strip()
    if not re.fullmatch(r"[+-]?\d+", text):
        return None, f"{column} {field!r} is not an integer; write it as 0..{num_values - 1}"
    value = int(text)
    if not 0 <= value < num_values:
        return None, f"{column} {value} is out of range [0, {num_values}); check num_labels"
    return value, None


def read_split(
    path: str | Path, *, num_labels: int = 2, keep_poison_label: bool = False
) -> Dataset:
    """Read and validate one poison_data CSV.

    Every row must have four fields (row index, text, label, poison_label), a text that is not
    blank and an integer label in ``[0, num_labels)``; with ``keep_poison_label`` the poison label
    must be 0 or 1. All bad rows are counted; the error lists the first ``MAX_REPORTED_ERRORS`` as
    ``<file>:<line>: <problem>``. Trailing blank lines are ignored.

    Args:
        path: CSV file.
        num_labels: Number of classes.
        keep_poison_label: Keep the ``poison_label`` column. Only evaluation and analysis code may
            ask for it; training and model selection must not.

    Returns:
        An in-memory dataset with columns ``text`` (str) and ``label`` (int64), plus
        ``poison_label`` (int64) when requested, in file order.

    Raises:
        DataError: The file is missing, unreadable, empty, has a wrong header, or has bad rows.
    """
    path = Path(path)
    if num_labels < 1:
        raise DataError(f"num_labels must be >= 1, got {num_labels} (reading {path})")
    if not path.is_file():
        raise DataError(_missing_message(path, "CSV file"))
    try:
        with path.open(encoding="utf-8-sig", newline="") as handle:
            reader = csv.reader(handle)
            records: list[tuple[int, list[str]]] = []
            next_line = 1
            for row in reader:
                records.append((next_line, row))
                next_line = reader.line_num + 1
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not valid UTF-8 at byte {err.start}: {err.reason}") from err
    except csv.Error as err:
        raise DataError(f"{path}:{reader.line_num}: malformed CSV: {err}") from err

    while records and not records[-1][1]:
        records.pop()
    if not records:
        raise DataError(f"{path}: file is empty; expected the header ',0,1,2' and data rows")
    header_line, header = records[0]
    if tuple(field.strip() for field in header) != EXPECTED_HEADER:
        missing = f" ({4 - len(header)} column(s) missing)" if len(header) < 4 else ""
        raise DataError(
            f"{path}:{header_line}: header is {','.join(header)!r}{missing}; expected ',0,1,2' "
            "(row index, text, label, poison_label), as in the published poison_data CSVs"
        )
    if len(records) == 1:
        raise DataError(f"{path}: file has the header but no data rows")

    texts: list[str] = []
    labels: list[int] = []
    poison_labels: list[int] = []
    problems: list[str] = []
    for line, row in records[1:]:
        if len(row) != len(EXPECTED_HEADER):
            problems.append(
                f"{path}:{line}: {len(row)} field(s), expected 4 (row index, text, label, "
                "poison_label); a missing column or an unquoted comma in the text"
            )
            continue
        _, text, label_field, poison_field = row
        row_problems = []
        if not text.strip():
            row_problems.append("text is empty or whitespace only")
        label, problem = _parse_int(label_field, "label", num_labels)
        if problem:
            row_problems.append(problem)
        poison_label = 0
        if keep_poison_label:
            parsed, problem = _parse_int(poison_field, "poison_label", 2)
            if problem:
                row_problems.append(problem)
            poison_label = parsed if parsed is not None else 0
        if row_problems:
            problems.append(f"{path}:{line}: " + "; ".join(row_problems))
            continue
        assert label is not None
        texts.append(text)
        labels.append(label)
        poison_labels.append(poison_label)

    if problems:
        shown = "\n".join(problems[:MAX_REPORTED_ERRORS])
        more = len(problems) - MAX_REPORTED_ERRORS
        tail = f"\n... and {more} more" if more > 0 else ""
        raise DataError(
            f"{path}: {len(problems)} bad row(s) of {len(records) - 1}; fix or remove them:\n"
            f"{shown}{tail}"
        )

    columns: dict[str, list[Any]] = {"text": texts, "label": labels}
    features = {"text": Value("string"), "label": Value("int64")}
    if keep_poison_label:
        columns["poison_label"] = poison_labels
        features["poison_label"] = Value("int64")
    logger.info("read %d rows from %s", len(texts), path)
    return Dataset.from_dict(columns, features=Features(features))


def _check_count(value: int | None, name: str) -> None:
    """Raise :class:`DataError` unless ``value`` is None or a positive integer."""
    if value is not None and (not isinstance(value, int) or value < 1):
        raise DataError(f"{name} must be a positive integer or None, got {value!r}")


def _seeded_subset(ds: Dataset, size: int | None, seed: int) -> Dataset:
    """``size`` rows of ``ds`` drawn without replacement (seeded), kept in file order."""
    if size is None or size >= len(ds):
        return ds
    chosen = np.random.default_rng(seed).permutation(len(ds))[:size]
    return ds.select(np.sort(chosen).tolist())


def load_training_data(
    paths: SplitPaths,
    *,
    ref_size: int,
    seed: int,
    num_labels: int = 2,
    max_train_samples: int | None = None,
    max_eval_samples: int | None = None,
) -> TrainingData:
    """Load the training set and split dev-clean into reference and selection sets.

    Opens only ``paths.train`` and ``paths.dev_clean``; ``poison_label`` is dropped on read. With a
    permutation pi of dev-clean seeded by ``seed``, the reference set is rows pi[:ref_size] and the
    selection set rows pi[ref_size:] (the first ``max_eval_samples`` of them when capped); both keep
    file order.

    Args:
        paths: Split paths from :func:`split_paths`.
        ref_size: Number of dev-clean rows for the alignment reference (0 for none).
        seed: Seed of the reference draw and of the subsets.
        num_labels: Number of classes.
        max_train_samples: Keep a seeded subset of this many training rows (None: all).
        max_eval_samples: Keep at most this many selection rows (None: all).

    Returns:
        Training, reference and selection datasets, columns ``text`` and ``label``.

    Raises:
        DataError: A file is bad, or ``ref_size`` does not leave at least one selection row.
    """
    _check_count(max_train_samples, "max_train_samples")
    _check_count(max_eval_samples, "max_eval_samples")
    if not isinstance(ref_size, int) or ref_size < 0:
        raise DataError(f"ref_size must be a non-negative integer, got {ref_size!r}")

    train = _seeded_subset(read_split(paths.train, num_labels=num_labels), max_train_samples, seed)
    dev_clean = read_split(paths.dev_clean, num_labels=num_labels)
    if ref_size >= len(dev_clean):
        raise DataError(
            f"ref_size={ref_size} must be smaller than the {len(dev_clean)} rows of "
            f"{paths.dev_clean}, so that rows remain for model selection; lower ref_size"
        )
    order = np.random.default_rng(seed).permutation(len(dev_clean))
    rest = order[ref_size:]
    if max_eval_samples is not None:
        rest = rest[:max_eval_samples]
    reference = dev_clean.select(np.sort(order[:ref_size]).tolist())
    selection = dev_clean.select(np.sort(rest).tolist())
    logger.info(
        "training data: %d train rows, %d reference rows, %d selection rows (seed %d)",
        len(train), len(reference), len(selection), seed,
    )
    return TrainingData(train=train, reference=reference, selection=selection)


def load_evaluation_data(
    paths: SplitPaths,
    *,
    num_labels: int = 2,
    max_eval_samples: int | None = None,
    seed: int = 0,
) -> EvaluationData:
    """Load the evaluation-only splits: dev-poison, test-clean, test-poison.

    Args:
        paths: Split paths from :func:`split_paths`.
        num_labels: Number of classes.
        max_eval_samples: Keep a seeded subset of at most this many rows per split (None: all).
        seed: Seed of the subsets.

    Returns:
        The three datasets, columns ``text`` and ``label``.

    Raises:
        DataError: A file is bad or ``max_eval_samples`` is not positive.
    """
    _check_count(max_eval_samples, "max_eval_samples")

    def load(path: Path) -> Dataset:
        return _seeded_subset(read_split(path, num_labels=num_labels), max_eval_samples, seed)

    return EvaluationData(
        dev_poison=load(paths.dev_poison),
        test_clean=load(paths.test_clean),
        test_poison=load(paths.test_poison),
    )


def normalize_text(text: str) -> str:
    """Normalise a sentence for overlap checks: strip, lowercase, collapse whitespace runs."""
    return " ".join(text.lower().split())


def find_overlap(
    trusted: Mapping[str, Dataset], test: Mapping[str, Dataset], *, max_examples: int = 5
) -> list[OverlapRecord]:
    """Find sentences that occur both in a trusted split and in a test split.

    A trusted sentence that also appears in a test split leaks test information into training or
    selection. Texts are compared after :func:`normalize_text`.

    Args:
        trusted: Trusted splits by name (e.g. ``{"reference": ..., "selection": ...}``).
        test: Test splits by name (e.g. ``{"test_clean": ..., "test_poison": ...}``).
        max_examples: Number of shared texts to keep as examples per pair.

    Returns:
        One record per (trusted, test) pair that shares at least one text, in mapping order;
        an empty list when nothing overlaps.

    Raises:
        DataError: A dataset has no ``text`` column.
    """
    def texts_of(name: str, ds: Dataset) -> dict[str, str]:
        if "text" not in ds.column_names:
            raise DataError(f"split {name!r} has no 'text' column; columns: {ds.column_names}")
        return {normalize_text(text): text for text in ds["text"]}

    test_texts = {name: set(texts_of(name, ds)) for name, ds in test.items()}
    records = []
    for trusted_name, trusted_ds in trusted.items():
        originals = texts_of(trusted_name, trusted_ds)
        for test_name, shared_keys in test_texts.items():
            shared = sorted(originals[key] for key in originals.keys() & shared_keys)
            if shared:
                examples = tuple(shared[:max_examples])
                records.append(OverlapRecord(trusted_name, test_name, len(shared), examples))
                logger.warning(
                    "%d texts of %r also occur in %r", len(shared), trusted_name, test_name
                )
    return records


def encode(ds: Dataset, tokenizer: PreTrainedTokenizerBase, *, max_length: int) -> Dataset:
    """Tokenise ``text`` with truncation and no padding.

    Args:
        ds: Dataset with columns ``text`` and ``label`` (other columns, e.g. ``poison_label``,
            are kept).
        tokenizer: Tokenizer of the model.
        max_length: Truncation length in tokens, special tokens included.

    Returns:
        The dataset with ``input_ids``, ``attention_mask`` and ``labels`` instead of ``text`` and
        ``label``; sequences keep their own length (the collator pads per batch).

    Raises:
        DataError: ``max_length`` is not positive or a column is missing.
    """
    if not isinstance(max_length, int) or max_length < 1:
        raise DataError(f"max_length must be a positive integer, got {max_length!r}")
    missing = [column for column in ("text", "label") if column not in ds.column_names]
    if missing:
        raise DataError(f"encode needs columns 'text' and 'label'; missing {missing}")

    def tokenize(batch: dict[str, list[Any]]) -> dict[str, list[Any]]:
        out = tokenizer(
            batch["text"],
            truncation=True,
            max_length=max_length,
            padding=False,
            return_token_type_ids=False,
        )
        return {"input_ids": out["input_ids"], "attention_mask": out["attention_mask"]}

    encoded = ds.map(tokenize, batched=True, remove_columns=["text"], desc="tokenize")
    return encoded.rename_column("label", "labels")


def make_collator(
    tokenizer: PreTrainedTokenizerBase, *, pad_to_multiple_of: int | None = None
) -> DataCollatorWithPadding:
    """Collator that pads each batch to its longest sequence and returns PyTorch tensors.

    Decoder tokenizers need a pad token (the project uses pad = EOS); right padding is fine because
    ``*ForSequenceClassification`` pools the last non-pad token.

    Args:
        tokenizer: Tokenizer with a pad token.
        pad_to_multiple_of: Round the padded length up to a multiple of this (None: exact).

    Returns:
        A ``DataCollatorWithPadding`` with ``padding="longest"``.

    Raises:
        DataError: The tokenizer has no pad token.
    """
    if tokenizer.pad_token is None:
        raise DataError(
            f"tokenizer {type(tokenizer).__name__} has no pad token; set one before collating "
            "(for decoders: tokenizer.pad_token = tokenizer.eos_token)"
        )
    return DataCollatorWithPadding(
        tokenizer, padding="longest", pad_to_multiple_of=pad_to_multiple_of, return_tensors="pt"
    )
