"""Would the training-row filter remove the canary if the canary were planted before it? (No training.)

The pipeline plants the canary after ``filter.method`` ran, so the canary tests the training-time defence. This
check plants the run's drawn canary trigger into the training rows first and runs the filter on them, to see
whether the filter alone would have removed a planted trigger of the canary's shape and rate. It reads the
training file's texts and labels and dev-clean (the filter's calibration), as a run does; no test data, no poison
labels. docs/filter_eval_discussion.md ("Sixth session") has the measured table.

    python benchmarks/canary_filter_check.py --config launch/configs/demo.yaml \\
        --attacks badnets addsent stylebkd synbkd --seeds 42 43 44 45

Prints one markdown row per attack and seed: canary rows planted, canary rows the filter removed, all rows it
removed, and the n-grams it flagged (the canary's own and the others). The trigger is the one drawn from the
canary seed (candidate 0); the trigger screen may plant another candidate in a run.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
for _path in (REPO, REPO / "kernels"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))


def check(config: Path, attack: str, seed: int, overrides: list[str]) -> dict:
    """The filter's verdict on the canary rows of one attack file and seed."""
    from pipeline import training
    from pipeline.config import ConfigError, load_config, resolve_defaults

    cfg = load_config(config, [f"data.attack={attack}", f"seed={seed}", *overrides])
    cfg = resolve_defaults(cfg, model_type="bert", hidden_size=384, is_decoder=False)  # only data / filter keys are read
    if cfg.filter.method == "none":
        raise ConfigError([f"{config}: no training-row filter to check (filter.method). Fix: add filter.method=lexical_zscore"])
    if not cfg.canary.enabled:
        raise ConfigError([f"{config}: canary.enabled is false, nothing to plant. Fix: drop canary.enabled=false"])
    _, rows = training._training_data(cfg)
    planted, canary = training._plant_canary(cfg, rows)
    _, report = training._filter_rows(cfg, planted)
    removed = {(r["text"], r["label"]) for r in report["removed_rows"]}
    canary_rows = [(planted.train[i]["text"], planted.train[i]["label"]) for i in canary.planted]
    trigger = set(canary.spec.trigger)
    flagged = [f["feature"] for f in report["flagged"]]
    return {
        "attack": attack, "seed": seed, "trigger": " ".join(canary.spec.trigger), "canary_rows": len(canary_rows),
        "canary_removed": sum(r in removed for r in canary_rows), "rows_removed": report["rows_removed"],
        "rows": report["rows_before"], "threshold": report["threshold"],
        "flagged_canary": [f for f in flagged if trigger & set(f.split())],
        "flagged_other": [f for f in flagged if not trigger & set(f.split())],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=REPO / "launch" / "configs" / "demo.yaml",
                        help="run config (default: the demo's; its filter.method, canary and data settings are used)")
    parser.add_argument("--attacks", nargs="+", default=["badnets", "addsent", "stylebkd", "synbkd"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[42])
    parser.add_argument("--overrides", nargs="*", default=[], metavar="KEY=VALUE",
                        help="config overrides, as for launch/train.py (e.g. canary.rate=0.05)")
    args = parser.parse_args(argv)
    from pipeline.config import ConfigError

    print("| attack | seed | canary trigger | canary rows planted | removed by the filter | all rows removed | "
          "flagged n-grams (canary's / others) |")
    print("|---|---|---|---|---|---|---|")
    for attack in args.attacks:
        for seed in args.seeds:
            try:
                r = check(args.config, attack, seed, args.overrides)
            except ConfigError as error:
                print(f"error: {error}", file=sys.stderr)
                return 2
            print(f"| {r['attack']} | {r['seed']} | {r['trigger']} | {r['canary_rows']} | {r['canary_removed']} | "
                  f"{r['rows_removed']} of {r['rows']} | {', '.join(r['flagged_canary']) or '-'} / "
                  f"{', '.join(r['flagged_other'][:5]) or '-'} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
