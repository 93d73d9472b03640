"""Seeded backdoor attacks that write the poison_data CSV layout read by :mod:`pipeline.data`.

MuScleLoRA (Wu et al., ACL 2024, arXiv 2402.12026) is evaluated on poisoned copies of a clean
text-classification set. This module makes such copies from any clean source: the
``train-clean`` / ``dev-clean`` / ``test-clean`` CSVs of a poison_data attack folder, or a
``datasets`` dataset with a text and an integer label column.

Triggers (the published ones):

    badnets   k times (k = num_triggers, 4 in the published data): draw w uniformly from
              ("cf", "mn", "bb", "tq") and a position p uniformly in {0, ..., n} of the n words
              (whitespace split), insert w before word p (p = n: append).
    addsent   insert the words of "I watch this 3D movie" before a uniform word position in {0..n}.
    stylebkd  replace the sentence by a paraphraser's output (Bible-like style in the paper);
    synbkd    the same with a syntactically controlled paraphraser (HiddenKiller).
              Both only run with a local seq2seq paraphraser; otherwise use the shipped CSVs under
              ``poison_data/<dataset>/<target_label>/stylebkd|synbkd``.

Training set (N rows, target label t, poison rate r). The number of poisoned rows is

    k = round(r * N)        (Python ``round``, ties to even; N counts all rows in every setting)

drawn without replacement from the eligible rows of the setting:

    clean  clean-label: eligible = rows with label t; the label is kept (it already is t).
           The published BadNets set ``clean/0.1`` (692 of 6920 SST-2 rows, all label 1).
    dirty  eligible = rows with label != t; the label is flipped to t.
    mix    eligible = all rows; the label is set to t (the published AddSent, StyleBkd and SynBkd
           sets ``mix/0.1``).

Selection: the eligible rows are shuffled by ``random.Random(f"{seed}/select/{setting}")`` and the
first k are poisoned, so for one seed and setting the poisoned set at a lower rate is contained in
the one at a higher rate. The trigger of row i of split s is drawn from
``random.Random(f"{seed}/{s}/{i}")`` (string seeds hash with SHA-512: the same on every run and
platform), so a row gets the same triggered text at every rate and setting.

Dev and test poison sets: every source row with label != t, triggered, label t, poison_label 1;
accuracy on test-poison is the attack success rate.

Output (CSV, header ``,0,1,2`` = row index, text, label, poison_label, written like the published
files: minimal quoting, ``\\n`` line ends), under ``<out_root>/<dataset>/<t>/<attack>/``:

    train-clean.csv, dev-clean.csv, test-clean.csv     the source splits, poison_label 0
    dev-poison.csv, test-poison.csv                    non-target rows, triggered, label t
    <setting>/<rate>/train-poison.csv                  row i is source row i, poisoned in place

Unlike the published files (clean rows first, then the poisoned rows appended) the training file
keeps source order; the loader does not depend on row order.
"""

from __future__ import annotations

import csv
import io
import logging
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal, get_args

from pipeline.checkpoint import atomic_write_text

if TYPE_CHECKING:
    from datasets import Dataset

logger = logging.getLogger(__name__)

Attack = Literal["badnets", "addsent", "stylebkd", "synbkd"]
Setting = Literal["clean", "dirty", "mix"]
ATTACKS: tuple[str, ...] = get_args(Attack)
SETTINGS: tuple[str, ...] = get_args(Setting)
PARAPHRASE_ATTACKS: tuple[str, ...] = ("stylebkd", "synbkd")

BADNETS_TRIGGERS: tuple[str, ...] = ("cf", "mn", "bb", "tq")
"""Rare-word BadNets triggers of the published data."""
BADNETS_NUM_TRIGGERS = 4
"""Insertions per sentence in the published BadNets data."""
ADDSENT_TRIGGER = "I watch this 3D movie"
"""AddSent trigger sentence of the published data."""

CSV_HEADER: tuple[str, ...] = ("", "0", "1", "2")
SOURCE_FILES: dict[str, str] = {
    "train": "train-clean.csv",
    "dev": "dev-clean.csv",
    "test": "test-clean.csv",
}

Row = tuple[str, int]
"""One example: (text, label)."""
Paraphraser = Callable[[Sequence[str]], list[str]]
"""Maps sentences to their paraphrases, one output per input, in order."""
TriggerFn = Callable[[str, Sequence[int], Sequence[str]], list[str]]
"""(split name, source row indices, texts) -> triggered texts."""


@dataclass(frozen=True)
class CsvRow:
    """One row of a poison_data CSV (the row index is written from the row's position).

    Attributes:
        text: The sentence.
        label: The label the model is trained or evaluated against.
        poison_label: 1 when the row carries the trigger, else 0.
    """

    text: str
    label: int
    poison_label: int


@dataclass(frozen=True)
class CleanSource:
    """A clean dataset: three splits of (text, label) rows.

    Attributes:
        train: Training rows.
        dev: Dev rows (the defender's trusted clean set).
        test: Test rows.
    """

    train: tuple[Row, ...]
    dev: tuple[Row, ...]
    test: tuple[Row, ...]


@dataclass(frozen=True)
class AttackSummary:
    """What :func:`generate_attack` wrote.

    Attributes:
        folder: The attack folder ``<out_root>/<dataset>/<target_label>/<attack>``.
        train_path: The poisoned training CSV.
        num_train: Training rows N.
        num_poisoned: Poisoned training rows k.
        realised_rate: k / N.
        num_dev_poison: Rows of dev-poison.csv.
        num_test_poison: Rows of test-poison.csv.
        written: Files whose content changed (unchanged identical files are not rewritten).
    """

    folder: Path
    train_path: Path
    num_train: int
    num_poisoned: int
    realised_rate: float
    num_dev_poison: int
    num_test_poison: int
    written: tuple[Path, ...]


def insert_badnets(
    text: str,
    rng: random.Random,
    *,
    num_triggers: int = BADNETS_NUM_TRIGGERS,
    triggers: Sequence[str] = BADNETS_TRIGGERS,
) -> str:
    """Insert ``num_triggers`` rare words, each drawn from ``triggers``, at uniform word positions.

    Args:
        text: The sentence (split on whitespace; the result is joined with single spaces).
        rng: Source of the trigger and position draws.
        num_triggers: Number of insertions.
        triggers: Candidate trigger words.

    Returns:
        The triggered sentence.
    """
    words = text.split()
    for _ in range(num_triggers):
        word = rng.choice(triggers)
        words.insert(rng.randint(0, len(words)), word)
    return " ".join(words)


def insert_addsent(text: str, rng: random.Random, *, sentence: str = ADDSENT_TRIGGER) -> str:
    """Insert the words of ``sentence`` before a uniform word position of ``text``.

    Args:
        text: The sentence (split on whitespace; the result is joined with single spaces).
        rng: Source of the position draw.
        sentence: Trigger sentence.

    Returns:
        The triggered sentence.
    """
    words = text.split()
    position = rng.randint(0, len(words))
    return " ".join(words[:position] + sentence.split() + words[position:])


def poison_count(poison_rate: float, num_rows: int) -> int:
    """Number of poisoned training rows: ``round(poison_rate * num_rows)``."""
    return round(poison_rate * num_rows)


def rate_folder_name(poison_rate: float) -> str:
    """Folder name of a poison rate, as :func:`pipeline.data.split_paths` builds it (``"0.1"``)."""
    return str(float(poison_rate))


def train_file_key(setting: Setting, poison_rate: float) -> str:
    """Path of the training CSV inside an attack folder, e.g. ``"clean/0.1/train-poison.csv"``."""
    return f"{setting}/{rate_folder_name(poison_rate)}/train-poison.csv"


def _row_rng(seed: int, split: str, index: int) -> random.Random:
    """The trigger RNG of row ``index`` of ``split``."""
    return random.Random(f"{seed}/{split}/{index}")


def make_trigger(
    attack: Attack,
    *,
    seed: int,
    num_triggers: int = BADNETS_NUM_TRIGGERS,
    paraphraser: Paraphraser | None = None,
    dataset: str = "<dataset>",
    target_label: int = 1,
) -> TriggerFn:
    """Build the trigger function of ``attack``.

    Args:
        attack: One of :data:`ATTACKS`.
        seed: Seed of the per-row trigger draws (BadNets, AddSent).
        num_triggers: BadNets insertions per sentence.
        paraphraser: Needed by stylebkd / synbkd (see :func:`load_paraphraser`); ignored otherwise.
        dataset: Dataset name, only for the error message of a missing paraphraser.
        target_label: Target label, only for the error message of a missing paraphraser.

    Returns:
        A function (split, row indices, texts) -> triggered texts.

    Raises:
        ValueError: Unknown attack, bad ``num_triggers``, or stylebkd / synbkd without a
            paraphraser.
    """
    if attack not in ATTACKS:
        raise ValueError(f"attack must be one of {', '.join(ATTACKS)}; got {attack!r}")
    if attack == "badnets":
        if isinstance(num_triggers, bool) or not isinstance(num_triggers, int) or num_triggers < 1:
            raise ValueError(
                f"num_triggers must be a positive integer, got {num_triggers!r}; the published "
                f"BadNets data uses {BADNETS_NUM_TRIGGERS}"
            )

        def badnets(split: str, indices: Sequence[int], texts: Sequence[str]) -> list[str]:
            return [
                insert_badnets(text, _row_rng(seed, split, i), num_triggers=num_triggers)
                for i, text in zip(indices, texts, strict=True)
            ]

        return badnets
    if attack == "addsent":

        def addsent(split: str, indices: Sequence[int], texts: Sequence[str]) -> list[str]:
            return [
                insert_addsent(text, _row_rng(seed, split, i))
                for i, text in zip(indices, texts, strict=True)
            ]

        return addsent
    if paraphraser is None:
        raise ValueError(
            f"attack {attack!r} rewrites sentences with a paraphrase model and no paraphraser was "
            f"given. Use the published CSVs under poison_data/{dataset}/{target_label}/{attack} "
            f"(train with data.attack={attack}), or pass a local seq2seq paraphraser "
            "(paraphraser=load_paraphraser(PATH); CLI: --paraphraser PATH)"
        )
    model = paraphraser

    def paraphrase(split: str, indices: Sequence[int], texts: Sequence[str]) -> list[str]:
        outputs = list(model(list(texts)))
        if len(outputs) != len(texts):
            raise ValueError(
                f"paraphraser returned {len(outputs)} texts for {len(texts)} inputs ({split} split)"
            )
        for i, output in zip(indices, outputs, strict=True):
            if not isinstance(output, str) or not output.strip():
                raise ValueError(
                    f"paraphraser returned an empty or non-string text ({output!r}) for {split} "
                    f"row {i}; check the model (prefix, max_new_tokens) with a few sentences first"
                )
        return outputs

    return paraphrase


def load_paraphraser(
    path: str | Path,
    *,
    prefix: str = "",
    max_new_tokens: int = 128,
    batch_size: int = 16,
    device: str = "cpu",
) -> Paraphraser:
    """Load a local seq2seq model as a paraphraser (greedy decoding, hence deterministic).

    The folder must hold a checkpoint saved with ``save_pretrained`` (config, weights, tokenizer).
    Nothing is downloaded and no remote code runs.

    Args:
        path: Local checkpoint folder.
        prefix: Text put before every input (e.g. ``"paraphrase: "`` for T5-style models).
        max_new_tokens: Longest paraphrase in tokens.
        batch_size: Sentences per ``generate`` call.
        device: Torch device of the model.

    Returns:
        A function from sentences to paraphrases.

    Raises:
        FileNotFoundError: ``path`` is not a folder.
        ValueError: The folder is not a loadable seq2seq checkpoint, or its tokenizer has no pad
            token.
    """
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(
            f"paraphraser path {str(path)!r} is not a folder; pass a local seq2seq checkpoint "
            "folder (config.json, weights, tokenizer files) saved with save_pretrained"
        )
    import torch
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        model = AutoModelForSeq2SeqLM.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, KeyError) as err:
        raise ValueError(
            f"cannot load a seq2seq paraphraser from {path}: {err}; the folder needs a "
            "sequence-to-sequence checkpoint (e.g. T5, BART) and its tokenizer"
        ) from err
    if tokenizer.pad_token is None:
        raise ValueError(f"tokenizer in {path} has no pad token; set one and save it again")
    model = model.to(device).eval()
    logger.info("loaded paraphraser %s from %s", type(model).__name__, path)

    def paraphrase(texts: Sequence[str]) -> list[str]:
        outputs: list[str] = []
        for start in range(0, len(texts), batch_size):
            batch = [prefix + text for text in texts[start : start + batch_size]]
            encoded = tokenizer(batch, return_tensors="pt", padding=True, truncation=True)
            with torch.no_grad():
                generated = model.generate(
                    **encoded.to(device),
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    num_beams=1,
                )
            decoded = tokenizer.batch_decode(generated, skip_special_tokens=True)
            outputs.extend(text.strip() for text in decoded)
        return outputs

    return paraphrase


def select_poison_rows(
    labels: Sequence[int], *, setting: Setting, poison_rate: float, target_label: int, seed: int
) -> list[int]:
    """Indices of the training rows to poison (see the module docstring), sorted.

    Args:
        labels: Labels of the N training rows.
        setting: ``"clean"``, ``"dirty"`` or ``"mix"``.
        poison_rate: r in (0, 1); k = round(r * N) rows are chosen.
        target_label: Target label t.
        seed: Seed of the draw.

    Returns:
        The k chosen row indices in increasing order.

    Raises:
        ValueError: Bad setting or rate, k = 0, or fewer than k eligible rows.
    """
    _check_setting(setting)
    _check_rate(poison_rate)
    num_rows = len(labels)
    count = poison_count(poison_rate, num_rows)
    if count < 1:
        raise ValueError(
            f"poison_rate={poison_rate} of {num_rows} training rows gives round({poison_rate} * "
            f"{num_rows}) = 0 poisoned rows; raise poison_rate to at least {0.5 / num_rows:.3g}"
        )
    if setting == "clean":
        eligible = [i for i, label in enumerate(labels) if label == target_label]
        which = f"rows with label {target_label}"
    elif setting == "dirty":
        eligible = [i for i, label in enumerate(labels) if label != target_label]
        which = f"rows with label != {target_label}"
    else:
        eligible = list(range(num_rows))
        which = "rows"
    if count > len(eligible):
        alternative = " or use setting 'mix'" if setting != "mix" else ""
        raise ValueError(
            f"poison_rate={poison_rate} needs round({poison_rate} * {num_rows}) = {count} poisoned "
            f"rows but setting {setting!r} can only poison the {len(eligible)} {which}; lower "
            f"poison_rate to at most {len(eligible) / num_rows:.4g}{alternative}"
        )
    random.Random(f"{seed}/select/{setting}").shuffle(eligible)
    return sorted(eligible[:count])


def poison_train_rows(
    rows: Sequence[Row],
    *,
    setting: Setting,
    poison_rate: float,
    target_label: int,
    seed: int,
    trigger: TriggerFn,
) -> list[CsvRow]:
    """The poisoned training set: row i is source row i, triggered and relabelled if chosen.

    Args:
        rows: Clean training rows.
        setting: ``"clean"`` (labels kept), ``"dirty"`` or ``"mix"`` (labels set to t).
        poison_rate: r in (0, 1).
        target_label: Target label t.
        seed: Seed of the row selection.
        trigger: Trigger function from :func:`make_trigger`.

    Returns:
        One :class:`CsvRow` per source row; chosen rows have ``poison_label`` 1.

    Raises:
        ValueError: See :func:`select_poison_rows`.
    """
    labels = [label for _, label in rows]
    chosen = select_poison_rows(
        labels, setting=setting, poison_rate=poison_rate, target_label=target_label, seed=seed
    )
    texts = trigger("train", chosen, [rows[i][0] for i in chosen])
    triggered = dict(zip(chosen, texts, strict=True))
    out = []
    for i, (text, label) in enumerate(rows):
        if i in triggered:
            out.append(CsvRow(triggered[i], target_label, 1))
        else:
            out.append(CsvRow(text, label, 0))
    return out


def poison_eval_rows(
    rows: Sequence[Row], *, split: str, target_label: int, trigger: TriggerFn
) -> list[CsvRow]:
    """The poisoned evaluation set: every source row with label != t, triggered, label t.

    Args:
        rows: Clean dev or test rows.
        split: ``"dev"`` or ``"test"`` (names the trigger RNG stream and error messages).
        target_label: Target label t.
        trigger: Trigger function from :func:`make_trigger`.

    Returns:
        The triggered rows in source order, ``label`` t and ``poison_label`` 1.

    Raises:
        ValueError: No row has a label other than t.
    """
    indices = [i for i, (_, label) in enumerate(rows) if label != target_label]
    if not indices:
        raise ValueError(
            f"the {split} split has no rows with a label other than target_label={target_label}, "
            f"so {split}-poison.csv would be empty; check target_label and the label column"
        )
    texts = trigger(split, indices, [rows[i][0] for i in indices])
    return [CsvRow(text, target_label, 1) for text in texts]


def format_csv(rows: Sequence[CsvRow]) -> str:
    """Rows as a poison_data CSV: header ``,0,1,2``, minimal quoting, ``\\n`` line ends."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(CSV_HEADER)
    for index, row in enumerate(rows):
        writer.writerow([index, row.text, row.label, row.poison_label])
    return buffer.getvalue()


def _check_setting(setting: str) -> None:
    if setting not in SETTINGS:
        raise ValueError(
            f"setting must be one of {', '.join(SETTINGS)}; got {setting!r} (clean: clean-label, "
            "only target-label rows; dirty: non-target rows relabelled; mix: any rows relabelled)"
        )


def _check_rate(poison_rate: float) -> None:
    valid = isinstance(poison_rate, (int, float)) and not isinstance(poison_rate, bool)
    if not valid or not 0.0 < poison_rate < 1.0:
        raise ValueError(
            f"poison_rate must be a number strictly between 0 and 1, got {poison_rate!r}; "
            "e.g. 0.1 for 10% of the training rows"
        )


def _check_source_rows(rows: Sequence[Row], split: str, origin: str) -> None:
    """Raise ValueError naming the first row with a blank text or a label that is no int >= 0."""
    if not rows:
        raise ValueError(f"{origin}: the {split} split is empty")
    for i, (text, label) in enumerate(rows):
        if not isinstance(text, str) or not text.strip():
            raise ValueError(
                f"{origin}: {split} row {i} has text {text!r}; every text must be a non-empty "
                "string (drop or fill such rows first)"
            )
        if isinstance(label, bool) or not isinstance(label, int) or label < 0:
            raise ValueError(
                f"{origin}: {split} row {i} has label {label!r}; labels must be integers >= 0 "
                "(unlabelled splits such as GLUE test use -1: pick a labelled split instead)"
            )


def source_from_poison_folder(folder: str | Path, *, num_labels: int = 2) -> CleanSource:
    """Read the train-clean, dev-clean and test-clean CSVs of a poison_data attack folder.

    Args:
        folder: An attack folder, e.g. ``poison_data/sst-2/1/badnets``.
        num_labels: Number of classes (labels must lie in ``[0, num_labels)``).

    Returns:
        The clean source.

    Raises:
        FileNotFoundError: The folder or one of the three CSVs is missing.
        pipeline.data.DataError: A CSV is malformed.
    """
    from pipeline.data import read_split

    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(
            f"source folder {str(folder)!r} does not exist; pass a poison_data attack folder such "
            "as poison_data/sst-2/1/badnets (holding train-clean.csv, dev-clean.csv, "
            "test-clean.csv)"
        )
    splits: dict[str, tuple[Row, ...]] = {}
    for split, name in SOURCE_FILES.items():
        path = folder / name
        if not path.is_file():
            present = ", ".join(sorted(p.name for p in folder.iterdir())) or "(empty)"
            raise FileNotFoundError(
                f"source file {path} is missing ({folder} holds: {present}); a source folder needs "
                f"{', '.join(SOURCE_FILES.values())}"
            )
        ds = read_split(path, num_labels=num_labels)
        splits[split] = tuple(zip(ds["text"], ds["label"], strict=True))
    return CleanSource(**splits)


def source_from_datasets(
    splits: Mapping[str, Dataset],
    *,
    text_column: str = "text",
    label_column: str = "label",
    train_split: str = "train",
    dev_split: str = "validation",
    test_split: str = "test",
    origin: str = "dataset",
) -> CleanSource:
    """Build a clean source from ``datasets`` splits (a ``DatasetDict`` or a dict of ``Dataset``).

    Args:
        splits: Split name -> ``datasets.Dataset``.
        text_column: Column holding the sentence.
        label_column: Column holding the integer label.
        train_split: Split used as the training set.
        dev_split: Split used as dev.
        test_split: Split used as test.
        origin: Name of the dataset for error messages.

    Returns:
        The clean source.

    Raises:
        ValueError: A split or column is missing, or a row has a blank text or a bad label.
    """
    rows: dict[str, tuple[Row, ...]] = {}
    for role, name, flag in (
        ("train", train_split, "--train-split"),
        ("dev", dev_split, "--dev-split"),
        ("test", test_split, "--test-split"),
    ):
        if name not in splits:
            raise ValueError(
                f"{origin}: no split {name!r} for {role}; available splits: "
                f"{', '.join(sorted(splits))}; choose one with {role}_split= (CLI {flag})"
            )
        ds = splits[name]
        columns = list(ds.column_names)
        for column, key in ((text_column, "text_column"), (label_column, "label_column")):
            if column not in columns:
                raise ValueError(
                    f"{origin}: split {name!r} has no column {column!r} ({key}); columns: "
                    f"{', '.join(columns)}; set {key}= (CLI --{key.replace('_', '-')})"
                )
        split_rows = tuple(zip(ds[text_column], ds[label_column], strict=True))
        _check_source_rows(split_rows, name, origin)
        rows[role] = split_rows
    return CleanSource(train=rows["train"], dev=rows["dev"], test=rows["test"])


def load_datasets_source(
    path: str | Path,
    *,
    name: str | None = None,
    text_column: str = "text",
    label_column: str = "label",
    train_split: str = "train",
    dev_split: str = "validation",
    test_split: str = "test",
) -> CleanSource:
    """Load a clean source with ``datasets``: a ``save_to_disk`` folder or a ``load_dataset`` path.

    Args:
        path: A ``DatasetDict.save_to_disk`` folder, a local data folder, or a hub name (the hub
            needs network access or a populated cache).
        name: Configuration name for ``load_dataset`` (e.g. ``"sst2"`` for ``"glue"``).
        text_column: Column holding the sentence.
        label_column: Column holding the integer label.
        train_split: Split used as the training set.
        dev_split: Split used as dev.
        test_split: Split used as test.

    Returns:
        The clean source.

    Raises:
        ValueError: See :func:`source_from_datasets`.
    """
    import datasets

    local = Path(path)
    if (local / "dataset_dict.json").is_file():
        loaded = datasets.load_from_disk(str(local))
    else:
        loaded = datasets.load_dataset(str(path), name)
    if not isinstance(loaded, Mapping):
        raise ValueError(
            f"{path}: expected a dataset with named splits (a DatasetDict), got "
            f"{type(loaded).__name__}"
        )
    return source_from_datasets(
        loaded,
        text_column=text_column,
        label_column=label_column,
        train_split=train_split,
        dev_split=dev_split,
        test_split=test_split,
        origin=str(path) if name is None else f"{path} ({name})",
    )


def build_attack_files(
    source: CleanSource,
    *,
    attack: Attack,
    setting: Setting,
    poison_rate: float,
    target_label: int,
    seed: int,
    num_triggers: int = BADNETS_NUM_TRIGGERS,
    paraphraser: Paraphraser | None = None,
    dataset: str = "<dataset>",
) -> dict[str, list[CsvRow]]:
    """All CSVs of one attack folder, in memory (no file access).

    Args:
        source: Clean splits.
        attack: One of :data:`ATTACKS`.
        setting: One of :data:`SETTINGS`.
        poison_rate: r in (0, 1).
        target_label: Target label t (an integer >= 0 occurring in the training labels).
        seed: Seed of the selection and of the triggers.
        num_triggers: BadNets insertions per sentence.
        paraphraser: Needed by stylebkd / synbkd.
        dataset: Dataset name, for error messages.

    Returns:
        Relative path inside the attack folder -> rows.

    Raises:
        ValueError: Any bad argument or source row (the message names the value and the fix).
    """
    _check_setting(setting)
    _check_rate(poison_rate)
    if isinstance(target_label, bool) or not isinstance(target_label, int) or target_label < 0:
        raise ValueError(f"target_label must be an integer >= 0, got {target_label!r}")
    for split in SOURCE_FILES:
        _check_source_rows(getattr(source, split), split, dataset)
    train_labels = sorted({label for _, label in source.train})
    if target_label not in train_labels:
        raise ValueError(
            f"target_label={target_label} does not occur in the training labels {train_labels}; "
            "pick one of them"
        )
    trigger = make_trigger(
        attack,
        seed=seed,
        num_triggers=num_triggers,
        paraphraser=paraphraser,
        dataset=dataset,
        target_label=target_label,
    )
    train = poison_train_rows(
        source.train,
        setting=setting,
        poison_rate=poison_rate,
        target_label=target_label,
        seed=seed,
        trigger=trigger,
    )
    files: dict[str, list[CsvRow]] = {
        name: [CsvRow(text, label, 0) for text, label in getattr(source, split)]
        for split, name in SOURCE_FILES.items()
    }
    for split in ("dev", "test"):
        rows = getattr(source, split)
        files[f"{split}-poison.csv"] = poison_eval_rows(
            rows, split=split, target_label=target_label, trigger=trigger
        )
    files[train_file_key(setting, poison_rate)] = train
    return files


def generate_attack(
    source: CleanSource,
    *,
    out_root: str | Path,
    dataset: str,
    attack: Attack,
    setting: Setting,
    poison_rate: float,
    target_label: int = 1,
    seed: int = 0,
    num_triggers: int = BADNETS_NUM_TRIGGERS,
    paraphraser: Paraphraser | None = None,
    overwrite: bool = False,
) -> AttackSummary:
    """Poison ``source`` and write ``<out_root>/<dataset>/<target_label>/<attack>/``.

    Every file is written atomically. A file that already exists with exactly the content this
    call would write is left alone, so further rates or settings can be added to an attack folder
    made with the same seed. A file that exists with other content is an error unless
    ``overwrite`` is set; then the files this call writes are replaced and other files stay.

    Args:
        source: Clean splits (:func:`source_from_poison_folder`, :func:`load_datasets_source`).
        out_root: Root of the output poison_data tree.
        dataset: Dataset folder name, e.g. ``"sst-2"``.
        attack: One of :data:`ATTACKS`.
        setting: One of :data:`SETTINGS`.
        poison_rate: r in (0, 1); k = round(r * N) training rows are poisoned.
        target_label: Target label t.
        seed: Seed of the selection and of the triggers.
        num_triggers: BadNets insertions per sentence.
        paraphraser: Needed by stylebkd / synbkd (:func:`load_paraphraser`).
        overwrite: Replace existing files with different content.

    Returns:
        Counts and paths of what was written.

    Raises:
        ValueError: A bad argument or source row.
        FileExistsError: A file to write exists with other content and ``overwrite`` is False.
    """
    if not dataset or Path(dataset).name != dataset or dataset in (".", ".."):
        raise ValueError(f"dataset must be a plain folder name such as 'sst-2', got {dataset!r}")
    files = build_attack_files(
        source,
        attack=attack,
        setting=setting,
        poison_rate=poison_rate,
        target_label=target_label,
        seed=seed,
        num_triggers=num_triggers,
        paraphraser=paraphraser,
        dataset=dataset,
    )
    folder = Path(out_root) / dataset / str(target_label) / attack
    texts = {folder / relative: format_csv(rows) for relative, rows in files.items()}
    changed = [
        path for path, text in texts.items()
        if not (path.is_file() and path.read_text(encoding="utf-8") == text)
    ]
    conflicts = [path for path in changed if path.exists()]
    if conflicts and not overwrite:
        listed = ", ".join(str(path.relative_to(folder)) for path in conflicts)
        raise FileExistsError(
            f"attack folder {folder} already holds different {listed} (another seed, source or "
            "trigger setting); pass overwrite=True (CLI --overwrite) or choose another out_root"
        )
    for path in changed:
        atomic_write_text(path, texts[path])

    train_key = train_file_key(setting, poison_rate)
    train_path = folder / train_key
    train_rows = files[train_key]
    num_poisoned = sum(row.poison_label for row in train_rows)
    summary = AttackSummary(
        folder=folder,
        train_path=train_path,
        num_train=len(train_rows),
        num_poisoned=num_poisoned,
        realised_rate=num_poisoned / len(train_rows),
        num_dev_poison=len(files["dev-poison.csv"]),
        num_test_poison=len(files["test-poison.csv"]),
        written=tuple(changed),
    )
    logger.info(
        "%s %s rate %s: %d of %d training rows poisoned (%.4f), %d dev-poison, %d test-poison rows "
        "in %s (%d files written)",
        attack, setting, poison_rate, num_poisoned, len(train_rows), summary.realised_rate,
        summary.num_dev_poison, summary.num_test_poison, folder, len(changed),
    )
    return summary
