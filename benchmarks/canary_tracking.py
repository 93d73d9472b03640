"""Tables for docs/CANARY.md: the canary's ASR beside the real attack's dev-poison ASR, per epoch and run.

    python benchmarks/canary_tracking.py runs/canary_tracking

Reads every ``<attack>_<method>_s<seed>/log.jsonl`` (finished or not) and ``metrics.json`` when present.
The real attack's dev-poison ASR is read here for the measurement only; training never selects on it.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path


def epochs(run: Path) -> list[dict]:
    """The epoch records of one run's log.jsonl (the last record per epoch, after resumes)."""
    records: dict[int, dict] = {}
    for line in (run / "log.jsonl").read_text().splitlines():
        record = json.loads(line)
        if record.get("type") == "epoch":
            records[record["epoch"]] = record
    return [records[e] for e in sorted(records)]


def pearson(xs: list[float], ys: list[float]) -> float | None:
    if len(xs) < 3 or statistics.pstdev(xs) == 0 or statistics.pstdev(ys) == 0:
        return None
    return statistics.correlation(xs, ys)


def main(root: str) -> int:
    runs = sorted(p for p in Path(root).iterdir() if (p / "log.jsonl").is_file())
    print("| attack | method | epoch | dev-clean acc | canary ASR | canary floor | canary added | dev-poison ASR (real attack) | canary held |")
    print("|---|---|---|---|---|---|---|---|---|")
    pairs: dict[str, list[tuple[float, float]]] = {}
    for run in runs:
        attack, method, _ = run.name.rsplit("_", 2)
        tolerance = 0.05
        config = run / "config.yaml"
        if config.is_file():
            import yaml

            tolerance = yaml.safe_load(config.read_text())["canary"]["tolerance"]
        for r in epochs(run):
            if "canary_asr" not in r:
                continue
            added = r["canary_asr"] - r["canary_floor"]
            pairs.setdefault(method, []).append((added, r["dev_poison_asr_monitor_only"]))
            print(f"| {attack} | {method} | {r['epoch']} | {100 * r['dev_clean_acc']:.1f} | {100 * r['canary_asr']:.1f} | "
                  f"{100 * r['canary_floor']:.1f} | {100 * added:.1f} | {100 * r['dev_poison_asr_monitor_only']:.1f} | "
                  f"{'yes' if added <= tolerance + 1e-12 else 'no'} |")
    print()
    print("| attack | method | finished | selected epoch | rule | canary verdict | test CACC | test ASR | clean FPR | dev-clean-only epoch |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for run in runs:
        attack, method, _ = run.name.rsplit("_", 2)
        history = [r for r in epochs(run) if "canary_asr" in r]
        plain = max(history, key=lambda r: (r["dev_clean_acc"], -r["epoch"]))["epoch"] if history else "-"
        path = run / "metrics.json"
        if not path.is_file():
            print(f"| {attack} | {method} | no ({len(history)} epochs) | - | - | - | - | - | - | {plain} |")
            continue
        m = json.loads(path.read_text())
        c = m["canary"]
        verdict = f"{'held' if c['held'] else 'NOT held'} ({c['asr']:.1f} vs floor {c['floor']:.1f})"
        qualified = "canary-clean" if c["selected_epoch_qualified"] else "none qualified: lowest canary"
        print(f"| {attack} | {method} | yes | {m['best_epoch']} | {qualified} | {verdict} | {m['cacc']:.1f} | {m['asr']:.1f} | "
              f"{m['clean_fpr']:.1f} | {plain} |")
    print()
    for method, values in sorted(pairs.items()):
        r = pearson([a for a, _ in values], [b for _, b in values])
        print(f"- {method}: Pearson r(canary added, dev-poison ASR) over {len(values)} epochs = "
              f"{'n/a' if r is None else f'{r:.2f}'}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "runs/canary_tracking"))
