"""Step time of ``musclelora`` vs ``lora`` at 1 rank and 2 ranks (ZeRO-2, ZeRO-3), and the
collectives per optimiser step that alignment adds.

Each cell is a real ``launch/train.py`` run (MiniLM on SST-2 BadNets by default) capped at
``--steps`` optimiser steps; the step time is the median of ``step_seconds`` in ``log.jsonl``
after ``--warmup`` steps (evaluation and start-up are excluded). On a CPU machine each of the 2
ranks gets ``--threads / 2`` threads so both layouts use the same cores.

    python benchmarks/bench_distributed_step.py --out runs/bench_dist            # all cells
    python benchmarks/bench_distributed_step.py --layouts single zero2 --steps 8
    python benchmarks/bench_distributed_step.py --layouts single --llama-shape 512x8 --out runs/bench_step_llama

``--llama-shape HIDDENxLAYERS`` replaces MiniLM by a random Llama of that shape (intermediate
2.6875 x hidden, 64-wide heads, the test suite's small BPE tokenizer), built once into ``--out``;
the LLM recipe's adapters apply (LoRA r=2 on q/v, MSLR on the head's hidden -> 16 layer).

Prints a markdown table (paste into docs/BENCHMARKS.md) and writes ``results.json`` to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LAYOUTS = {
    "single": (1, None),
    "zero2_1rank": (1, "zero2"),
    "zero2": (2, "zero2"),
    "zero3": (2, "zero3"),
}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def run_cell(out: Path, method: str, layout: str, args: argparse.Namespace) -> dict:
    """Run one cell (resumable: a finished cell is read back, not rerun)."""
    ranks, preset = LAYOUTS[layout]
    run_dir = out / f"{method}_{layout}"
    if not (run_dir / "metrics.json").exists():
        if run_dir.exists():
            import shutil

            shutil.rmtree(run_dir)
        threads = max(1, args.threads // ranks)
        overrides = [
            f"output_dir={run_dir}", f"method={method}", f"train.max_steps={args.steps}", "train.epochs=1",
            f"train.batch_size={args.batch_size}", f"train.num_threads={threads}", f"data.max_length={args.max_length}",
            f"data.max_eval_samples={args.eval_samples}", f"data.attack={args.attack}", *args.overrides,
        ]
        checkout = os.pathsep.join([str(REPO), str(REPO / "kernels")])  # pipeline, mslr_kernels
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": checkout}
        train = str(REPO / "launch" / "train.py")
        if ranks == 1 and preset is None:
            command = [sys.executable, train]
        else:
            command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks),
                       "--master_port", str(_free_port()), train]
        command += ["--config", str(args.config)]
        if preset:
            command += ["--deepspeed", str(REPO / "ds_configs" / f"{preset}.json")]
        started = time.perf_counter()
        result = subprocess.run(command + overrides, capture_output=True, text=True, env=env)
        if result.returncode != 0:
            raise RuntimeError(f"{method}/{layout} failed:\n{result.stderr[-3000:]}")
        print(f"  {method:<10} {layout:<12} done in {time.perf_counter() - started:.0f} s", file=sys.stderr)
    steps = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines() if '"type": "step"' in line]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    timed = [s["step_seconds"] for s in steps[args.warmup :]]
    return {
        "method": method,
        "layout": layout,
        "ranks": ranks,
        "median_step_s": statistics.median(timed),
        "steps_timed": len(timed),
        "collectives_per_step": metrics.get("collectives_per_step"),
        "peak_memory_mb_rank0": metrics.get("peak_memory_mb"),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "bench_distributed")
    parser.add_argument("--config", type=Path, default=REPO / "launch" / "configs" / "demo.yaml")
    parser.add_argument("--layouts", nargs="+", default=list(LAYOUTS), choices=list(LAYOUTS))
    parser.add_argument("--methods", nargs="+", default=["lora", "musclelora"])
    parser.add_argument("--steps", type=int, default=14)
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--eval-samples", type=int, default=32)
    parser.add_argument("--attack", default="badnets")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads in total, split across ranks")
    parser.add_argument("--llama-shape", default=None, metavar="HIDDENxLAYERS",
                        help="a random Llama of this shape instead of MiniLM, e.g. 512x8")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.llama_shape:
        try:
            hidden, layers = (int(v) for v in args.llama_shape.lower().split("x"))
        except ValueError:
            parser.error(f"--llama-shape: {args.llama_shape!r} is not HIDDENxLAYERS, e.g. 512x8")
        checkpoint = args.out / f"llama_{hidden}x{layers}"
        if not (checkpoint / "config.json").exists():
            sys.path[:0] = [str(REPO), str(REPO / "kernels")]
            from pipeline.testing import build_tiny_checkpoint

            build_tiny_checkpoint("llama", checkpoint, shape={
                "hidden_size": hidden, "num_hidden_layers": layers, "num_attention_heads": max(1, hidden // 64),
                "intermediate_size": int(hidden * 2.6875),
            })
        # The decoder recipe's defaults fill LoRA/MSLR/alignment; keep the demo's lr/epochs/batch below.
        args.overrides = [f"model.name_or_path={checkpoint}", "mslr.scales=[1,2,3,4]", *args.overrides]
    rows = [run_cell(args.out, method, layout, args) for layout in args.layouts for method in args.methods]
    (args.out / "results.json").write_text(json.dumps(rows, indent=2) + "\n")
    by = {(r["method"], r["layout"]): r for r in rows}
    print("| layout | ranks | lora s/step | musclelora s/step | musclelora / lora | collectives per step (lora, musclelora) |")
    print("|---|---|---|---|---|---|")
    for layout in args.layouts:
        lora, mus = by.get(("lora", layout)), by.get(("musclelora", layout))
        if not (lora and mus):
            continue
        print(f"| {layout} | {lora['ranks']} | {lora['median_step_s']:.3f} | {mus['median_step_s']:.3f} | "
              f"{mus['median_step_s'] / lora['median_step_s']:.2f}x | {lora['collectives_per_step']:.0f}, {mus['collectives_per_step']:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
