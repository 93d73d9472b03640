"""How often ONION, scored by the embedded SmolLM2-135M-Instruct, removes BadNets trigger words.

A language-model-only measurement (no classifier): on the first N rows of SST-2 BadNets test-poison
(each carries several of the rare-word triggers cf, mn, bb, tq), the share of trigger occurrences
ONION removes and the share of the other words it removes, at suspicion thresholds t (word i is
removed when f_i = p_0 - p_i > t, pipeline/defenses/onion.py).

    python benchmarks/onion_trigger_removal.py --rows 40 --thresholds 0 10 100
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

TRIGGERS = {"cf", "mn", "bb", "tq"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path,
                        default=REPO.parent / "shared/data/poison_data/sst-2/1/badnets/test-poison.csv")
    parser.add_argument("--rows", type=int, default=40)
    parser.add_argument("--thresholds", type=float, nargs="+", default=[0.0, 10.0, 100.0])
    args = parser.parse_args()

    import torch

    from pipeline import data as data_lib
    from pipeline.defenses.onion import load_onion_lm, suspicion_scores

    torch.manual_seed(0)
    texts = list(data_lib.read_split(args.data)["text"])[: args.rows]
    lm, tokenizer = load_onion_lm("smollm2")
    start = time.perf_counter()
    scores = suspicion_scores(texts, lm, tokenizer, batch_size=32)
    seconds = time.perf_counter() - start
    result = {"rows": len(texts), "lm": "smollm2", "seconds": round(seconds, 1), "by_threshold": {}}
    for t in args.thresholds:
        trig_removed = trig_total = other_removed = other_total = 0
        for text, score in zip(texts, scores):
            for word, f in zip(text.split(), score.tolist()):
                removed = f > t
                if word in TRIGGERS:
                    trig_total += 1
                    trig_removed += removed
                else:
                    other_total += 1
                    other_removed += removed
        result["by_threshold"][str(t)] = {
            "trigger_removed_pct": round(100 * trig_removed / trig_total, 1), "triggers": trig_total,
            "other_removed_pct": round(100 * other_removed / other_total, 1), "other_words": other_total,
        }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
