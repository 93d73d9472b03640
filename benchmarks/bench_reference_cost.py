"""Step time of MuScleLoRA's reference pass against plain LoRA, with the two settings that cut it.

MuScleLoRA's gradient alignment computes a reference gradient on a clean batch every optimiser step
(a second forward + backward), which makes its step about 1.9x LoRA's (docs/BENCHMARKS.md).
``align.ref_batch_size`` draws fewer reference rows; ``align.ref_every_steps = k`` computes the
reference gradient every k-th step and reuses it in between. This measures the wall time per
optimiser step of each cell, as ``run_training`` logs it (``step_seconds`` in ``log.jsonl``: forward,
backward, reference pass, alignment and the update; no evaluation, no start-up):

    OMP_NUM_THREADS=1 python benchmarks/bench_reference_cost.py --out runs/bench_reference_cost

Each cell is one in-process run of ``launch/configs/demo.yaml`` (embedded MiniLM, SST-2 BadNets)
capped at ``--warmup + --steps`` optimiser steps; the step time is the MEAN of the timed steps
(a k-step cycle mixes fresh and reused steps; 12 timed steps hold whole cycles of k = 2 and 4).
Timing only: it says nothing about whether a setting keeps the defence's ASR/CACC.
Prints a markdown table (s/step and its ratio to lora) and writes ``results.json`` to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "kernels")]  # run from a checkout: pipeline, mslr_kernels

from pipeline.config import load_config  # noqa: E402
from pipeline.training import run_training  # noqa: E402

CELLS: dict[str, tuple[str, ...]] = {
    "lora": ("method=lora",),
    "musclelora (k=1, ref batch 32)": ("method=musclelora",),
    "musclelora k=2": ("method=musclelora", "align.ref_every_steps=2"),
    "musclelora k=4": ("method=musclelora", "align.ref_every_steps=4"),
    "musclelora ref batch 16": ("method=musclelora", "align.ref_batch_size=16"),
    "musclelora ref batch 8": ("method=musclelora", "align.ref_batch_size=8"),
}


def run_cell(name: str, overrides: tuple[str, ...], out: Path, args: argparse.Namespace) -> dict:
    """Run one cell and return its timed step statistics."""
    run_dir = out / name.replace(" ", "_").replace("(", "").replace(")", "").replace(",", "").replace("=", "")
    total = args.warmup + args.steps
    cfg = load_config(REPO / "launch" / "configs" / "demo.yaml", [
        f"output_dir={run_dir}", "overwrite=true", f"model.name_or_path={args.model}", f"train.batch_size={args.batch_size}",
        f"data.max_length={args.max_length}", f"train.max_steps={total}", "train.epochs=1",
        f"data.max_train_samples={total * args.batch_size}", f"data.max_eval_samples={args.eval_samples}",
        f"train.num_threads={args.threads}", "train.log_every_steps=1000", "train.device=cpu", *overrides,
        *args.overrides,
    ])
    started = time.perf_counter()
    run_training(cfg)
    steps = [json.loads(x) for x in (run_dir / "log.jsonl").read_text().splitlines() if '"type": "step"' in x]
    timed = [s["step_seconds"] for s in steps[args.warmup :]]
    fresh = [s.get("ref_fresh") for s in steps[args.warmup :]]
    print(f"  {name:<32} {len(timed)} steps, mean {statistics.mean(timed):.3f} s ({time.perf_counter() - started:.0f} s)",
          file=sys.stderr)
    return {"name": name, "overrides": list(overrides), "mean_s": statistics.mean(timed), "median_s": statistics.median(timed),
            "steps_s": timed, "fresh_reference_steps": sum(1 for f in fresh if f), "timed_steps": len(timed)}


def main(argv: list[str] | None = None) -> list[dict]:
    """Run every cell, print the table, write results.json."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=REPO / "runs" / "bench_reference_cost")
    p.add_argument("--model", default="minilm", help="model.name_or_path: 'minilm' (the embedded default) or a local checkpoint")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--warmup", type=int, default=2, help="first steps left out of the mean")
    p.add_argument("--steps", type=int, default=12, help="timed steps (a multiple of every k measured)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--eval-samples", type=int, default=16, help="rows per evaluation split (not timed)")
    p.add_argument("--cells", nargs="*", default=list(CELLS), choices=list(CELLS), help="subset of the cells, by name")
    p.add_argument("--set", dest="overrides", nargs="+", default=[], metavar="KEY=VALUE",
                   help="extra config overrides for every cell (e.g. data.root=...)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    results = [run_cell(name, CELLS[name], args.out, args) for name in args.cells]
    base = next((r["mean_s"] for r in results if r["name"] == "lora"), None)
    print(f"\n| cell | s/step (mean of {args.steps}) | fresh reference steps | / lora |")
    print("|---|---|---|---|")
    for r in results:
        ratio = f"{r['mean_s'] / base:.2f}x" if base else "-"
        fresh = "-" if r["name"] == "lora" else f"{r['fresh_reference_steps']} of {r['timed_steps']}"
        print(f"| {r['name']} | {r['mean_s']:.3f} | {fresh} | {ratio} |")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
