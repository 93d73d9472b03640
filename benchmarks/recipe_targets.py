"""Check a recipe against issue 11's targets from a grid's results.csv (launch/matrix.py output).

    python benchmarks/recipe_targets.py --results runs/recipe_eval/results.csv --recipe never_raw_ref384 \\
        --baseline vanilla --controls ref_only_384 vanilla_clean_data musclelora

Targets (issue 11 step 3), averaged over the attacks: the part of ASR the trigger adds (ASR minus the clean
false-positive rate) at most ``--max-added`` points (5), and CACC within ``--max-cacc-drop`` points (2) of the
baseline, while the baseline's attacks bite (its trigger-added ASR at least ``--min-baseline-added``, 20).
Each attack's number is first averaged over that method's seeds, then the attacks are averaged (every attack
counts once, whatever its number of seeds). Only attacks where the recipe and the baseline both have finished
seeds count; the table says how many seeds each cell has. Controls are printed beside, not judged.
``--seeds 42 43 44`` counts only those seeds (same-seed comparisons). Before the test numbers it prints the
selection numbers of every method shown: the mean dev-clean accuracy of the selected epochs and how many runs
held their canary (the numbers a choice between settings may use).

Prints a markdown table (per attack: mean +- sd over seeds of CACC, ASR, clean FPR, trigger-added ASR) and the
verdict per target. Reads only results.csv: test numbers, used for the report, never for a choice.

``--adaptive FOUND OTHER`` judges a rule instead of one method: for every attack and seed, FOUND's cell when the
training-row filter removed rows (column ``filter_removed`` > 0: the filter found a trigger), else OTHER's cell of
the same seed. The finding is read from whichever of the two cells ran the filter (they must agree where both did),
so FOUND need only run where the filter found something. The rule reads the filter's own finding, nothing about
the attack:

    python benchmarks/recipe_targets.py --results runs/filter_eval/results.csv \
        --adaptive zfilter_vanilla_lr2e-4 zfilter_recipe_ref600 --baseline vanilla_lr2e-4 --seeds 42 43 44
"""

from __future__ import annotations

import argparse
import csv
import statistics
import sys
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from pipeline.report import mean_sd  # noqa: E402

METRICS = ("cacc", "asr", "clean_fpr", "asr_minus_clean_fpr")


def load(path: Path) -> dict[tuple[str, str], list[dict[str, float]]]:
    """(method, attack) -> one dict of METRICS (plus ``seed`` and ``filter_removed``) per finished seed."""
    if not path.is_file():
        raise SystemExit(f"error: {path} does not exist. Fix: pass the results.csv of a grid (launch/matrix.py)")
    out: dict[tuple[str, str], list[dict[str, float]]] = defaultdict(list)
    with path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        missing = [c for c in ("method", "attack", "seed", *METRICS) if c not in (reader.fieldnames or [])]
        if missing:
            raise SystemExit(f"error: {path} lacks the column(s) {', '.join(missing)}. Fix: pass a grid's results.csv")
        for line, row in enumerate(reader, start=2):
            try:
                out[(row["method"], row["attack"])].append({
                    **{m: float(row[m]) for m in METRICS}, "seed": int(row["seed"]),
                    # rows the cell's training-row filter removed; None: no filter ran (empty); absent: old file
                    **({"filter_removed": float(row["filter_removed"]) if row["filter_removed"] else None}
                       if "filter_removed" in row else {}),
                    # selection numbers (what a user sees): absent from older results.csv files
                    "dev_clean_acc": float(row["dev_clean_acc"]) if row.get("dev_clean_acc") else None,
                    "canary_held": {"True": True, "False": False}.get(row.get("canary_held") or "")})
            except ValueError as error:
                raise SystemExit(f"error: {path}:{line}: {error}. Fix: rebuild results.csv with launch/matrix.py") from None
    return out


def adaptive(rows: dict[tuple[str, str], list[dict[str, float]]], found: str, other: str) -> tuple[str, dict]:
    """Add the rule "FOUND where the filter removed rows, else OTHER (same attack and seed)" as a method.

    The filter's finding for an attack and seed is read from whichever of the two cells ran the filter (both, when
    both did, must agree: the same filter on the same rows finds the same), so FOUND need only run where the
    filter found a trigger. An attack and seed counts when the cell the rule takes has finished. Returns the
    rule's name and the rows with it added.
    """
    name = f"adaptive({found} else {other})"
    if any("filter_removed" not in r for group in rows.values() for r in group):
        raise SystemExit("error: results.csv has no filter_removed column, so the rule cannot see whether the filter "
                         "found a trigger. Fix: rebuild it with launch/matrix.py --config GRID --report-only")
    cells = {method: {(attack, r["seed"]): r for (m, attack), group in rows.items() if m == method for r in group}
             for method in (found, other)}
    chosen: dict[str, list[dict[str, float]]] = defaultdict(list)
    for attack, seed in sorted(set(cells[found]) | set(cells[other])):
        pair = [cells[m].get((attack, seed)) for m in (found, other)]
        seen = {m: r["filter_removed"] for m, r in zip((found, other), pair) if r is not None and r["filter_removed"] is not None}
        if not seen:
            raise SystemExit(f"error: neither {found!r} nor {other!r} ran a training-row filter on {attack} seed {seed} "
                             "(column filter_removed empty). Fix: give one of them filter.method (e.g. lexical_zscore)")
        if len({removed > 0 for removed in seen.values()}) > 1:
            raise SystemExit(f"error: the filters of {found!r} and {other!r} disagree on {attack} seed {seed} "
                             f"(rows removed: {seen}). Fix: run the same filter settings in both")
        taken = pair[0] if next(iter(seen.values())) > 0 else pair[1]
        if taken is not None:
            chosen[attack].append(taken)
    out = dict(rows)
    out.update({(name, attack): group for attack, group in chosen.items()})
    if not chosen:
        raise SystemExit(f"error: no attack and seed has a finished cell for the rule's branch ({found!r} where the "
                         f"filter found a trigger, {other!r} elsewhere). Fix: check the method names (column 'method') "
                         "or let the grid run longer")
    return name, out


def only_seeds(rows: dict[tuple[str, str], list[dict[str, float]]], seeds: Sequence[int]) -> dict:
    """The rows of these seeds only (for comparing methods on the same seeds)."""
    kept = {key: [r for r in group if r["seed"] in set(seeds)] for key, group in rows.items()}
    return {key: group for key, group in kept.items() if group}


def selection(rows: dict[tuple[str, str], list[dict[str, float]]], methods: Sequence[str]) -> str:
    """Per method: runs, mean selected dev-clean accuracy, canary held: the numbers a choice may use."""
    lines = ["| method | runs | mean selected dev-clean accuracy | canary held |", "|---|---|---|---|"]
    for method in methods:
        group = [r for (m, _), g in sorted(rows.items()) if m == method for r in g]
        if not group:
            continue
        dev = [r["dev_clean_acc"] for r in group if r["dev_clean_acc"] is not None]
        held = [r["canary_held"] for r in group if r["canary_held"] is not None]
        lines.append(f"| {method} | {len(group)} | {_mean(dev):.2f} ({len(dev)} runs) |" if dev else f"| {method} | {len(group)} | - |")
        lines[-1] += f" {sum(held)} of {len(held)} |" if held else " - |"
    return "\n".join(lines)


def _mean(values: Sequence[float]) -> float:
    return statistics.fmean(values)


def evaluate(rows: dict[tuple[str, str], list[dict[str, float]]], recipe: str, baseline: str, *,
             max_added: float = 5.0, max_cacc_drop: float = 2.0, min_baseline_added: float = 20.0) -> dict:
    """Per-attack means and the three target checks over the attacks both methods finished."""
    attacks = sorted({a for (m, a) in rows if m == recipe} & {a for (m, a) in rows if m == baseline})
    if not attacks:
        raise SystemExit(f"error: no attack has finished cells of both {recipe!r} and {baseline!r}. "
                         f"Fix: check the method names (column 'method') or let the grid run longer")

    def per_attack(method: str, metric: str) -> list[float]:
        return [_mean([r[metric] for r in rows[(method, a)]]) for a in attacks]

    added = _mean(per_attack(recipe, "asr_minus_clean_fpr"))
    drop = _mean(per_attack(baseline, "cacc")) - _mean(per_attack(recipe, "cacc"))
    bite = _mean(per_attack(baseline, "asr_minus_clean_fpr"))
    return {
        "attacks": attacks, "recipe_added": added, "cacc_drop": drop, "baseline_added": bite,
        "added_ok": added <= max_added, "cacc_ok": drop <= max_cacc_drop, "bites": bite >= min_baseline_added,
        "per_attack_added": dict(zip(attacks, per_attack(recipe, "asr_minus_clean_fpr"))),
        "per_attack_drop": {a: b - r for a, b, r in zip(attacks, per_attack(baseline, "cacc"), per_attack(recipe, "cacc"))},
    }


def markdown(rows: dict[tuple[str, str], list[dict[str, float]]], methods: Sequence[str], attacks: Sequence[str]) -> str:
    """Per method and attack: CACC / ASR / clean FPR / trigger-added ASR (mean ± sd over seeds, n seeds)."""
    lines = ["| method | attack | seeds | CACC | ASR | clean FPR | ASR - clean FPR |", "|---|---|---|---|---|---|---|"]
    for method in methods:
        for attack in attacks:
            group = rows.get((method, attack), [])
            if group:
                lines.append(f"| {method} | {attack} | {len(group)} | "
                             + " | ".join(mean_sd([r[m] for r in group]) for m in METRICS) + " |")
        means = [[_mean([r[m] for r in rows[(method, a)]]) for a in attacks if rows.get((method, a))] for m in METRICS]
        if means[0]:
            lines.append(f"| **{method}** | mean of {len(means[0])} attacks | | "
                         + " | ".join(f"**{_mean(v):.1f}**" for v in means) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", type=Path, required=True, help="a grid's results.csv")
    judged = p.add_mutually_exclusive_group(required=True)
    judged.add_argument("--recipe", help="the method (or variant) judged against the targets")
    judged.add_argument("--adaptive", nargs=2, metavar=("FOUND", "OTHER"),
                        help="judge the rule: FOUND's cell where the filter removed rows, else OTHER's (same seed)")
    p.add_argument("--baseline", default="vanilla", help="the undefended method the CACC target compares with")
    p.add_argument("--controls", nargs="*", default=[], help="methods printed beside, not judged")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="count only these seeds (all methods)")
    p.add_argument("--max-added", type=float, default=5.0)
    p.add_argument("--max-cacc-drop", type=float, default=2.0)
    p.add_argument("--min-baseline-added", type=float, default=20.0)
    args = p.parse_args(argv)
    rows = load(args.results)
    if args.seeds:
        rows = only_seeds(rows, args.seeds)
    if args.adaptive:
        args.recipe, rows = adaptive(rows, *args.adaptive)
    verdict = evaluate(rows, args.recipe, args.baseline, max_added=args.max_added,
                       max_cacc_drop=args.max_cacc_drop, min_baseline_added=args.min_baseline_added)
    attacks = verdict["attacks"]
    shown = [args.recipe, args.baseline, *args.controls]
    print("Selection numbers (dev-clean accuracy of the selected epoch, canary verdict; what a choice may use):\n")
    print(selection(rows, shown))
    print("\nTest numbers (report only):\n")
    print(markdown(rows, shown, attacks))
    print()
    yes = {True: "met", False: "MISSED"}
    print(f"Over {len(attacks)} attack(s) ({', '.join(attacks)}):")
    print(f"- trigger-added ASR of {args.recipe}: {verdict['recipe_added']:.1f} (target <= {args.max_added:g}): "
          f"{yes[verdict['added_ok']]}; per attack "
          + ", ".join(f"{a} {v:.1f}" for a, v in verdict["per_attack_added"].items()))
    print(f"- CACC below {args.baseline}: {verdict['cacc_drop']:.1f} points (target <= {args.max_cacc_drop:g}): "
          f"{yes[verdict['cacc_ok']]}; per attack " + ", ".join(f"{a} {v:.1f}" for a, v in verdict["per_attack_drop"].items()))
    print(f"- {args.baseline}'s attacks bite: trigger-added ASR {verdict['baseline_added']:.1f} "
          f"(needs >= {args.min_baseline_added:g}): {'yes' if verdict['bites'] else 'NO'}")
    return 0 if verdict["added_ok"] and verdict["cacc_ok"] and verdict["bites"] else 1


if __name__ == "__main__":
    sys.exit(main())
