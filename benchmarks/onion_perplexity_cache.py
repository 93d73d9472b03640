"""Time ONION's word scoring (embedded SmolLM2-135M) without a cache, into an empty cache, and from it.

On the first N rows of SST-2 dev-clean: suspicion_scores without a cache, then with a fresh
PerplexityCache (cold: every sentence and leave-one-out variant computed and saved), then with a
second cache object opened on the same folder (warm: read back from the file, nothing computed),
and the largest score differences between the three (pipeline/defenses/onion.py).

    OMP_NUM_THREADS=1 python benchmarks/onion_perplexity_cache.py --rows 20
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared/data/poison_data/sst-2/1/badnets/dev-clean.csv")
    parser.add_argument("--rows", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()

    import torch

    from pipeline import data as data_lib
    from pipeline.defenses.onion import PerplexityCache, lm_fingerprint, load_onion_lm, suspicion_scores

    torch.set_num_threads(args.threads)
    texts = list(data_lib.read_split(args.data)["text"])[: args.rows]
    lm, tokenizer = load_onion_lm("smollm2")
    start = time.perf_counter()
    lm_fingerprint(lm, tokenizer)
    fingerprint_s = time.perf_counter() - start

    def timed(cache: PerplexityCache | None) -> tuple[list[torch.Tensor], float]:
        start = time.perf_counter()
        scores = suspicion_scores(texts, lm, tokenizer, batch_size=32, cache=cache)
        return scores, time.perf_counter() - start

    def max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
        return max((x - y).abs().max().item() for x, y in zip(a, b) if len(x))

    with tempfile.TemporaryDirectory() as directory:
        plain, plain_s = timed(None)
        cold, cold_s = timed(PerplexityCache.for_lm(directory, lm, tokenizer))
        cache = PerplexityCache.for_lm(directory, lm, tokenizer)
        warm, warm_s = timed(cache)
        result = {
            "rows": len(texts), "lm": "smollm2", "threads": args.threads, "sequences": len(cache),
            "fingerprint_s": round(fingerprint_s, 2), "uncached_s": round(plain_s, 1),
            "cold_cache_s": round(cold_s, 1), "warm_cache_s": round(warm_s, 2),
            "max_abs_diff_cold_vs_uncached": max_diff(cold, plain), "max_abs_diff_warm_vs_cold": max_diff(warm, cold),
        }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
