"""The canary: a secret synthetic backdoor the pipeline plants itself, as a positive control.

A user of a backdoor defence has no poison labels, so dev-clean accuracy alone cannot tell whether a
model learned the backdoor in its training file. The canary gives that signal without looking at the
real attack: the pipeline plants a backdoor of its own, which it knows is there, and measures whether
the trained model obeys it. If the defence removes the canary, it is removing what a training file
teaches through a rare-token trigger; if the canary is learned, the defence did not hold.

Trigger (a fresh one per run, drawn from the canary seed s): ``num_tokens`` distinct words of
``token_length`` letters drawn uniformly from the 20 consonants ``bcdfghjklmnpqrstvwxz``. A word with
no vowel is never an English word, and at four letters or more it is none of the published insertion
triggers (BadNets' two-letter ``cf mn bb tq mb``, AddSent's sentence of English words); StyleBkd and
SynBkd are paraphrases without trigger words. So the canary cannot collide with the real attack by
construction. Target label (``target_label`` auto): drawn uniformly from the ``num_labels`` classes.

Planting (dirty-label, on the training rows, N rows, rate r, target t)::

    k = max(1, round(r * N)) rows drawn (seeded) without replacement among the rows with label != t;
    each gets every trigger word inserted once at a uniform word position; its label becomes t.

Planted rows replace the originals in place (N stays). Dirty-label makes the canary a strong
backdoor per row, so a small share (default 2%, a fifth of the 10% attacks) suffices; see
docs/CANARY.md for the defaults and why.

Hold-out: the selection rows S (dev-clean minus the reference rows) with label != t get a triggered
copy each, S_t. Per epoch, with f the model::

    canary ASR    A = |{x in S_t : f(trigger(x)) = t}| / |S_t|
    clean floor   F0 = |{x in S_t : f(x) = t}| / |S_t|          (the same rows without the trigger)
    decoy floor   Fj = |{x in S_t : f(decoy_j(x)) = t}| / |S_t|  (j = 1..decoys: unplanted triggers)
    floor         F = max(F0, F1, ..., Fk)
    added         D = A - F                                      (the part of A the planted trigger causes)

The decoys (``canary.decoys``, default 0: F = F0) are more nonsense triggers of the same shape, drawn with
the canary seed, never planted, inserted into the same rows at the same word positions as the trigger. They
were meant to absorb a model's reaction to inserted junk words (at seed 45 a model that never saw a canary
row put 31-45% of the triggered copies into the target class against 16-17% of the clean ones), but
measured on finished runs (benchmarks/canary_decoy_check.py, docs/CANARY.md) that reaction is specific to
the drawn words (the decoys stayed at 5-23%), and a model that did learn the canary also moves its decoys
(vanilla, seed 42: 48-62%), which would mask a partly learned canary. So they stay opt-in.

Selection rule (:func:`select_epoch`), tolerance tau: an epoch qualifies when D <= tau and its model learned
the task (dev-clean accuracy more than TASK_MARGIN above the majority-class share: a model that predicts one
class has A = F and would otherwise "hold" any canary). Among the qualifying epochs the highest dev-clean
accuracy wins (the earliest on ties); when none qualifies the lowest D among the epochs that learned the task
wins (then the higher dev-clean accuracy, then the earliest), epochs that did not learn it coming last, and the
run says loudly that the canary was learned. The order is total, so the loop can keep the best so far epoch by
epoch.

Threat model: the canary reads only the training rows' ``text`` and ``label`` and the selection rows;
never ``poison_label``, dev-poison or the test files. Reference rows are never touched, and the
selection accuracy keeps using the untriggered selection rows.
"""

from __future__ import annotations

import logging
import random
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from datasets import Dataset
    from torch import Tensor

logger = logging.getLogger(__name__)

CONSONANTS = "bcdfghjklmnpqrstvwxz"
"""Letters of the canary's nonsense words: no vowel (and no y), so no word is an English word."""


class CanaryError(ValueError):
    """The canary cannot be planted as configured (too few eligible rows, a poison column, ...)."""


@dataclass(frozen=True)
class CanarySpec:
    """One run's canary.

    Attributes:
        trigger: The nonsense words, each inserted once into a triggered sentence.
        target_label: The label planted rows are relabelled to; ASR counts predictions of it.
        rate: Share of all training rows planted.
        seed: Seed of the trigger, target, planted rows and insertion positions.
        tolerance: Largest ``ASR - floor`` (fraction) of an epoch that counts as the canary not learned.
        decoys: Unplanted triggers of the same shape (:func:`draw_decoys`) whose rates raise the floor.
    """

    trigger: tuple[str, ...]
    target_label: int
    rate: float
    seed: int
    tolerance: float
    decoys: tuple[tuple[str, ...], ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe form (the triggers as lists)."""
        out = asdict(self)
        out["trigger"] = list(self.trigger)
        out["decoys"] = [list(d) for d in self.decoys]
        return out


@dataclass(frozen=True)
class CanaryData:
    """The training rows with the canary planted and the held-out triggered selection copies.

    Attributes:
        spec: The canary.
        train: Training rows (``text``, ``label``) with ``planted`` rows triggered and relabelled.
        planted: Indices of the planted training rows, ascending.
        triggered: Triggered copies of the non-target selection rows (``text``, ``label`` = original).
        selection_rows: For each row of ``triggered``, its index in the selection rows (for the floor).
        decoy_triggered: For each decoy, the same rows with the decoy inserted at the trigger's positions.
        screen: How the trigger was chosen (:meth:`ScreenResult.to_dict`), None when it was not screened.
    """

    spec: CanarySpec
    train: Dataset
    planted: tuple[int, ...]
    triggered: Dataset
    selection_rows: tuple[int, ...]
    decoy_triggered: tuple[Dataset, ...] = ()
    screen: Mapping[str, Any] | None = None


def draw_trigger(seed: int, *, num_tokens: int = 3, token_length: int = 6) -> tuple[str, ...]:
    """``num_tokens`` distinct consonant-only words of ``token_length`` letters, drawn with ``seed``."""
    if num_tokens < 1 or token_length < 4:
        raise CanaryError(f"num_tokens must be >= 1 and token_length >= 4, got {num_tokens}, {token_length}")
    return _draw_words(random.Random(f"{seed}/canary/trigger"), num_tokens, token_length, set())


def _draw_words(rng: random.Random, num_tokens: int, token_length: int, used: set[str]) -> tuple[str, ...]:
    """``num_tokens`` consonant-only words of ``token_length`` letters, none in ``used`` (which they are added to)."""
    words: list[str] = []
    while len(words) < num_tokens:
        word = "".join(rng.choice(CONSONANTS) for _ in range(token_length))
        if word not in used:
            used.add(word)
            words.append(word)
    return tuple(words)


def draw_decoys(
    seed: int, count: int, *, num_tokens: int = 3, token_length: int = 6, trigger: Sequence[str] | None = None
) -> tuple[tuple[str, ...], ...]:
    """``count`` unplanted triggers shaped like :func:`draw_trigger`'s, sharing no word with ``trigger`` (default: that
    draw) or each other."""
    if count < 0:
        raise CanaryError(f"the number of decoys must be >= 0, got {count}")
    used = set(trigger if trigger is not None else draw_trigger(seed, num_tokens=num_tokens, token_length=token_length))
    rng = random.Random(f"{seed}/canary/decoys")
    return tuple(_draw_words(rng, num_tokens, token_length, used) for _ in range(count))


def candidate_triggers(count: int, seed: int, *, num_tokens: int = 3, token_length: int = 6) -> tuple[tuple[str, ...], ...]:
    """The triggers the screen tries in order: :func:`draw_trigger`'s first, then ``count - 1`` more, all words distinct.

    Candidate 0 is the unscreened draw, so a run whose first candidate passes the screen plants exactly the trigger it
    planted before the screen existed.
    """
    if count < 1:
        raise CanaryError(f"the number of screen candidates must be >= 1, got {count}")
    first = draw_trigger(seed, num_tokens=num_tokens, token_length=token_length)
    used = set(first)
    candidates = [first]
    for j in range(1, count):
        candidates.append(_draw_words(random.Random(f"{seed}/canary/trigger/{j}"), num_tokens, token_length, used))
    return tuple(candidates)


def draw_target_label(seed: int, num_labels: int) -> int:
    """The canary's target label drawn uniformly from ``range(num_labels)`` with ``seed``."""
    if num_labels < 2:
        raise CanaryError(f"num_labels must be >= 2, got {num_labels}")
    return random.Random(f"{seed}/canary/target").randrange(num_labels)


def insert_trigger(text: str, trigger: Sequence[str], rng: random.Random) -> str:
    """Insert every trigger word once, each before a uniform word position (whitespace split)."""
    words = text.split()
    for word in trigger:
        words.insert(rng.randint(0, len(words)), word)
    return " ".join(words)


def _columns(ds: Dataset, what: str) -> tuple[list[str], list[int]]:
    """``text`` and ``label`` of ``ds``; a dataset holding ``poison_label`` is refused, never read."""
    if "poison_label" in ds.column_names:
        raise CanaryError(
            f"{what} has a poison_label column; the canary must never see poison information. Load the rows "
            "with pipeline.data.load_training_data (which drops it)"
        )
    missing = [c for c in ("text", "label") if c not in ds.column_names]
    if missing:
        raise CanaryError(f"{what} lacks column(s) {missing}; columns: {ds.column_names}")
    return list(ds["text"]), [int(v) for v in ds["label"]]


def _with_rows(ds: Dataset, texts: list[str], labels: list[int]) -> Dataset:
    from datasets import Dataset

    return Dataset.from_dict({"text": texts, "label": labels}, features=ds.features)


def plant(train: Dataset, spec: CanarySpec) -> tuple[Dataset, tuple[int, ...]]:
    """Plant the canary in ``max(1, round(spec.rate * N))`` training rows whose label is not the target.

    Args:
        train: Training rows with columns ``text`` and ``label`` only.
        spec: The canary.

    Returns:
        (the training rows with the chosen rows triggered and relabelled to the target, their indices).

    Raises:
        CanaryError: A ``poison_label`` column, or fewer eligible rows than rows to plant.
    """
    texts, labels = _columns(train, "the training rows")
    count = max(1, round(spec.rate * len(texts)))
    eligible = [i for i, label in enumerate(labels) if label != spec.target_label]
    if count > len(eligible):
        raise CanaryError(
            f"canary.rate={spec.rate} asks for {count} planted rows of {len(texts)}, but {len(eligible)} rows have "
            f"a label other than the canary target {spec.target_label}; use a rate between {1 / len(texts):.4f} "
            f"and {len(eligible) / len(texts):.4f}, or canary.enabled=false"
        )
    random.Random(f"{spec.seed}/canary/select").shuffle(eligible)
    planted = tuple(sorted(eligible[:count]))
    for i in planted:
        texts[i] = insert_trigger(texts[i], spec.trigger, random.Random(f"{spec.seed}/canary/train/{i}"))
        labels[i] = spec.target_label
    return _with_rows(train, texts, labels), planted


def _selection_copies(texts: Sequence[str], rows: Sequence[int], trigger: Sequence[str], seed: int) -> list[str]:
    """``texts[i]`` for each of ``rows`` with ``trigger`` inserted at the canary's positions for selection row ``i``.

    The positions depend on the canary seed and the row only, so the canary, its decoys and the screen's candidates
    all go into the same places.
    """
    return [insert_trigger(texts[i], trigger, random.Random(f"{seed}/canary/selection/{i}")) for i in rows]


def triggered_selection(selection: Dataset, spec: CanarySpec) -> tuple[Dataset, tuple[int, ...]]:
    """Triggered copies of the selection rows whose label is not the canary target.

    Returns:
        (the copies, with their original labels; for each copy its index in ``selection``).

    Raises:
        CanaryError: A ``poison_label`` column, or no selection row with another label than the target.
    """
    texts, labels = _columns(selection, "the selection rows")
    rows = tuple(i for i, label in enumerate(labels) if label != spec.target_label)
    if not rows:
        raise CanaryError(
            f"no selection row has a label other than the canary target {spec.target_label}; the canary ASR "
            "cannot be measured. Set canary.target_label to another class or canary.enabled=false"
        )
    copies = _selection_copies(texts, rows, spec.trigger, spec.seed)
    return _with_rows(selection, copies, [labels[i] for i in rows]), rows


def decoy_selection(selection: Dataset, spec: CanarySpec, rows: Sequence[int]) -> tuple[Dataset, ...]:
    """For each decoy, copies of ``selection``'s ``rows`` with it inserted where the trigger went (same RNG)."""
    texts, labels = _columns(selection, "the selection rows")
    return tuple(
        _with_rows(selection,
                   _selection_copies(texts, rows, decoy, spec.seed),
                   [labels[i] for i in rows])
        for decoy in spec.decoys
    )


def prepare(train: Dataset, selection: Dataset, spec: CanarySpec) -> CanaryData:
    """Plant the canary in ``train`` and build the triggered selection copies (see the module docstring)."""
    planted_train, planted = plant(train, spec)
    triggered, rows = triggered_selection(selection, spec)
    logger.info(
        "canary: trigger %s -> label %d planted in %d of %d training rows (%.1f%%); %d triggered selection rows; "
        "%d decoy trigger(s) for the floor",
        " ".join(spec.trigger), spec.target_label, len(planted), len(train), 100 * len(planted) / len(train), len(rows),
        len(spec.decoys),
    )
    return CanaryData(spec=spec, train=planted_train, planted=planted, triggered=triggered, selection_rows=rows,
                      decoy_triggered=decoy_selection(selection, spec, rows))


def canary_rates(
    triggered_predictions: Sequence[int], selection_predictions: Sequence[int], selection_rows: Sequence[int], target: int
) -> tuple[float, float]:
    """Canary ASR and its clean floor (fractions) on the same non-target selection rows.

    Args:
        triggered_predictions: Predicted labels of the triggered copies, in their order.
        selection_predictions: Predicted labels of all selection rows (untriggered).
        selection_rows: For each triggered copy, its row in the selection predictions.
        target: The canary's target label.
    """
    if len(triggered_predictions) != len(selection_rows) or not selection_rows:
        raise ValueError(f"{len(triggered_predictions)} triggered predictions for {len(selection_rows)} rows")
    asr = sum(int(p) == target for p in triggered_predictions) / len(selection_rows)
    floor = sum(int(selection_predictions[i]) == target for i in selection_rows) / len(selection_rows)
    return asr, floor


def decoy_rates(decoy_predictions: Sequence[Sequence[int]], target: int) -> list[float]:
    """Each decoy's target rate (fraction) on its triggered copies: the floors :func:`floor_of` takes the max with."""
    return [sum(int(p) == target for p in preds) / len(preds) for preds in decoy_predictions]


def floor_of(clean_floor: float, decoys: Sequence[float]) -> float:
    """The canary's floor: the highest of the clean rows' target rate and every decoy's."""
    return max([clean_floor, *decoys])


def task_learned(record: Mapping[str, Any], majority: float | None) -> bool:
    """Whether the epoch's model learned the task: dev-clean accuracy above ``majority + TASK_MARGIN`` (True when
    ``majority`` is None). A model that predicts (nearly) one class leaves the canary unmeasurable."""
    return majority is None or float(record["dev_clean_acc"]) > majority + TASK_MARGIN


def qualifies(record: Mapping[str, Any], tolerance: float, majority: float | None = None) -> bool:
    """Whether an epoch record's canary is at its floor, ``canary_asr - canary_floor <= tolerance``, in a model that
    learned the task (:func:`task_learned`; not checked when ``majority`` is None)."""
    return record["canary_asr"] - record["canary_floor"] <= tolerance + 1e-12 and task_learned(record, majority)


def selection_key(record: Mapping[str, Any], tolerance: float | None, majority: float | None = None) -> tuple[float, ...]:
    """Sort key of an epoch record under the selection rule (larger is better).

    Without a canary (``tolerance`` None or the record has no ``canary_asr``) the key is the dev-clean
    accuracy alone. Qualifying epochs rank above all others, by dev-clean accuracy; then the epochs that learned
    the task, by the lowest trigger-added ASR, then dev-clean accuracy; last the epochs that did not learn the task
    (``majority`` given; their canary says nothing), by dev-clean accuracy.
    """
    acc = float(record["dev_clean_acc"])
    if tolerance is None or record.get("canary_asr") is None:
        return (acc,)
    if qualifies(record, tolerance, majority):
        return (2.0, acc, 0.0)
    if not task_learned(record, majority):
        return (0.0, acc, 0.0)
    return (1.0, -(record["canary_asr"] - record["canary_floor"]), acc)


def better(candidate: Mapping[str, Any], incumbent: Mapping[str, Any] | None, tolerance: float | None,
           majority: float | None = None) -> bool:
    """Whether ``candidate`` beats the best epoch so far (None: nothing yet); ties keep the incumbent."""
    return incumbent is None or selection_key(candidate, tolerance, majority) > selection_key(incumbent, tolerance, majority)


@dataclass(frozen=True)
class Selection:
    """The epoch :func:`select_epoch` picked and why.

    Attributes:
        epoch: The selected epoch (from 0).
        qualified: Whether its canary was at its floor (always True without a canary).
        reason: One sentence for logs and metrics.json.
    """

    epoch: int
    qualified: bool
    reason: str


def select_epoch(records: Sequence[Mapping[str, Any]], tolerance: float | None, majority: float | None = None) -> Selection:
    """Pick the epoch by the selection rule of the module docstring.

    Args:
        records: Per-epoch records with ``epoch``, ``dev_clean_acc`` and, with a canary, ``canary_asr`` and
            ``canary_floor`` (fractions).
        tolerance: The canary tolerance; None selects on dev-clean accuracy alone.
        majority: The selection rows' majority-class share: an epoch at most TASK_MARGIN above it did not learn
            the task and never qualifies (None: not checked).

    Raises:
        ValueError: No records.
    """
    if not records:
        raise ValueError("no epoch records to select from")
    best = None
    for record in records:
        if better(record, best, tolerance, majority):
            best = record
    assert best is not None
    if tolerance is None or best.get("canary_asr") is None:
        return Selection(int(best["epoch"]), True, "highest dev-clean accuracy (no canary)")
    if qualifies(best, tolerance, majority):
        reason = (f"highest dev-clean accuracy among the epochs whose canary trigger-added ASR is within "
                  f"{100 * tolerance:.1f} points of its floor")
        return Selection(int(best["epoch"]), True, reason)
    reason = (f"NO epoch kept the canary within {100 * tolerance:.1f} points of its floor: the epoch with the lowest "
              f"canary trigger-added ASR was taken")
    return Selection(int(best["epoch"]), False, reason)


TASK_MARGIN = 0.05
"""A model whose dev-clean accuracy is within this of the majority-class share has not learned the task."""


def majority_share(labels: Sequence[int]) -> float:
    """Share of the most frequent label: the accuracy of a model that predicts one class."""
    if not labels:
        raise ValueError("no labels")
    return max(Counter(int(label) for label in labels).values()) / len(labels)


def verdict(record: Mapping[str, Any], spec: CanarySpec, *, majority: float | None = None) -> dict[str, Any]:
    """The canary's summary at the selected epoch for metrics.json (percentages) and the user.

    ``held`` is True when the planted backdoor's trigger-added ASR is within the tolerance and the model
    learned the task. A model that predicts (nearly) one class has canary ASR = floor when that class is
    not the canary target, so the canary cannot tell anything: with dev-clean accuracy at most
    ``majority + TASK_MARGIN`` the verdict is inconclusive and ``held`` is False (``task_learned`` False).

    Args:
        record: The selected epoch's record (fractions).
        spec: The canary.
        majority: The majority-class share of the selection rows (None: no task check).
    """
    asr, floor = 100 * record["canary_asr"], 100 * record["canary_floor"]
    clean = 100 * record.get("canary_clean_floor", record["canary_floor"])
    decoys = [100 * d for d in record.get("canary_decoy_asr", [])]
    parts = f"clean rows {clean:.1f}%" + (f", decoy triggers {' / '.join(f'{d:.1f}%' for d in decoys)}" if decoys else "")
    learned = task_learned(record, majority)
    held = qualifies(record, spec.tolerance, majority)
    state = "HELD" if held else ("NOT HELD" if learned else "INCONCLUSIVE")
    message = (
        f"canary {state}: the planted backdoor ({' '.join(spec.trigger)} -> label "
        f"{spec.target_label}) reaches ASR {asr:.1f}% against its floor {floor:.1f}% ({parts}) at the selected epoch "
        f"(trigger adds {asr - floor:.1f} points; tolerance {100 * spec.tolerance:.1f})"
    )
    if not learned:
        message += (f"; the model did not learn the task (dev-clean accuracy {100 * record['dev_clean_acc']:.1f}% against "
                    f"{100 * majority:.1f}% for always predicting the majority class), so the canary cannot say "
                    "whether a backdoor was removed")
    elif not held:
        message += "; the defence did not remove a backdoor it was known to contain"
    return {"held": held, "task_learned": learned, "asr": asr, "floor": floor, "clean_floor": clean,
            "decoy_asr": decoys, "asr_minus_floor": asr - floor, "message": message}


# --- the trigger screen -------------------------------------------------------------------------------------------

SCREEN_L2 = 0.1
"""L2 weight of the screen's logistic probe (on standardised features; a fixed setting, not tuned per run)."""


def fit_probe(features: Tensor, labels: Sequence[int], num_labels: int, *, l2: float = SCREEN_L2) -> Callable[[Tensor], Tensor]:
    """A multinomial logistic probe on standardised ``features`` (rows x dims); returns a label predictor.

    Deterministic (full-batch L-BFGS from zeros, float64 on CPU), so every rank and a rerun choose alike.
    """
    import torch

    x = features.detach().to("cpu", torch.float64)
    y = torch.as_tensor(list(labels), dtype=torch.long)
    if x.ndim != 2 or x.shape[0] != y.numel() or x.shape[0] == 0:
        raise ValueError(f"fit_probe: {tuple(x.shape)} features for {y.numel()} labels")
    mean, std = x.mean(0), x.std(0, unbiased=False) + 1e-6
    z = (x - mean) / std
    weight = torch.zeros(z.shape[1], num_labels, dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(num_labels, dtype=torch.float64, requires_grad=True)
    optimiser = torch.optim.LBFGS([weight, bias], max_iter=300, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        optimiser.zero_grad()
        loss = torch.nn.functional.cross_entropy(z @ weight + bias, y) + l2 * (weight * weight).sum()
        loss.backward()
        return loss

    optimiser.step(closure)
    weight, bias = weight.detach(), bias.detach()
    return lambda f: (((f.detach().to("cpu", torch.float64) - mean) / std) @ weight + bias).argmax(-1)


@dataclass(frozen=True)
class ScreenResult:
    """What :func:`screen_trigger` tried and chose.

    Attributes:
        trigger: The chosen trigger.
        index: Its position among the candidates (0: the unscreened draw).
        shifts: The probe's target-rate shift (fraction) of every candidate tried, in order.
        passed: Whether the chosen one is within ``max_shift`` (False: none was; the smallest shift was taken).
        probe_accuracy: The probe's accuracy on the clean measurement rows (how much the features know).
        rows: Number of triggered measurement rows per candidate.
    """

    trigger: tuple[str, ...]
    index: int
    shifts: tuple[float, ...]
    passed: bool
    probe_accuracy: float
    rows: int

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe form (percentages) for metrics.json."""
        return {"trigger": list(self.trigger), "candidate": self.index, "passed": self.passed,
                "shifts": [round(100 * s, 2) for s in self.shifts], "probe_accuracy": round(100 * self.probe_accuracy, 2),
                "rows": self.rows}


def screen_trigger(
    embed: Callable[[list[str]], Tensor],
    reference: Dataset,
    selection: Dataset,
    candidates: Sequence[Sequence[str]],
    *,
    seed: int,
    target: int,
    num_labels: int,
    max_shift: float,
) -> ScreenResult:
    """Choose the first candidate trigger the backbone's own features do not already tie to the target label.

    A logistic probe is fit on ``embed`` features of the trusted reference rows and their labels. For a
    candidate, the shift is the probe's target rate on the triggered copies of the non-target selection
    rows (the canary's own hold-out rows, the trigger inserted exactly where the canary will insert it)
    minus its target rate on the same rows without the trigger. The first candidate with shift <=
    ``max_shift`` is chosen; when none is, the smallest shift is taken (``passed`` False). Reads only texts
    and labels of trusted rows (never the training file, ``poison_label`` or test rows).

    Args:
        embed: texts -> features (rows x dims), e.g. the frozen backbone's mean-pooled last hidden states.
        reference: The reference rows (``text``, ``label``): the probe's training rows.
        selection: The selection rows (``text``, ``label``): the measurement rows.
        candidates: Triggers in the order to try (:func:`candidate_triggers`).
        seed: The canary seed (insertion positions, as :func:`triggered_selection`).
        target: The canary's target label.
        num_labels: Number of classes.
        max_shift: Largest accepted shift (fraction).

    Raises:
        CanaryError: No candidates, or no selection row with a label other than the target.
    """
    import torch

    if not candidates:
        raise CanaryError("screen_trigger: no candidate triggers")
    ref_texts, ref_labels = _columns(reference, "the reference rows")
    texts, labels = _columns(selection, "the selection rows")
    rows = [i for i, label in enumerate(labels) if label != target]
    if not rows:
        raise CanaryError(f"no selection row has a label other than the canary target {target}; the screen cannot measure")
    probe = fit_probe(embed(ref_texts), ref_labels, num_labels)
    predicted = probe(embed(texts))
    accuracy = float((predicted == torch.as_tensor(labels)).double().mean())
    clean_rate = float((predicted[rows] == target).double().mean())
    shifts: list[float] = []
    for trigger in candidates:
        copies = _selection_copies(texts, rows, trigger, seed)
        shift = float((probe(embed(copies)) == target).double().mean()) - clean_rate
        shifts.append(shift)
        if shift <= max_shift + 1e-12:
            return ScreenResult(tuple(trigger), len(shifts) - 1, tuple(shifts), True, accuracy, len(rows))
    best = min(range(len(shifts)), key=lambda j: shifts[j])
    return ScreenResult(tuple(candidates[best]), best, tuple(shifts), False, accuracy, len(rows))
