"""Table of the SmolLM2 precision / ZeRO comparison (benchmarks/smollm2_precision_zero.sh).

Reads each run folder's ``metrics.json`` (final metrics, measured peak memory, the memory plan's
estimate) and ``log.jsonl`` (per-step training loss) under RUNS_DIR and prints markdown tables:

* per run: backend, ZeRO stage, base quantisation, CACC / ASR / clean FPR on the evaluation rows,
  the training seconds, the measured peak (rank 0's peak RSS on CPU, ``peak_memory_mb``), the peak
  above the RSS before the model was loaded (``peak_memory_above_baseline_mb``, what the plan
  estimates), the plan's estimate ``memory_estimate.total_mb`` and the ratio measured / estimated;
* the training loss per optimiser step of every run and its largest difference from a reference
  run of the same set (same head dropout): ``max_s |loss_run(s) - loss_ref(s)|``, once against the
  single process with the same base (fp32 or nf4: what ZeRO changes) and once against the fp32
  single process (what the 4-bit base changes);
* the largest absolute difference of every saved adapter tensor (``adapter/adapter.safetensors``)
  from the same references', ``max_t max |w_run - w_ref|``, which is what "ZeRO matches one process"
  means for the weights.

    python benchmarks/smollm2_precision_zero.py runs/precision_zero [--plot docs/smollm2/plots/x.png]

Runs missing their ``metrics.json`` are listed with the last line of their log (``RUN.log`` next to
the folder), so a failed combination shows its error instead of vanishing from the table.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

BASE_ORDER = ["fp32", "nf4", "zero2_fp32", "zero3_fp32", "zero2_nf4", "zero3_nf4"]
# Two sets: the recipe as configured (head dropout 0.1, whose masks are drawn per process, so one
# process and two ranks see different masks), and "_nodrop" (model.llm_head_dropout=0), where fp32
# ZeRO must match the single process. Each run is compared with the fp32 single process of its set.
SUFFIXES = ["", "_nodrop"]
ORDER = [name + suffix for suffix in SUFFIXES for name in BASE_ORDER]


def reference_of(name: str, *, same_base: bool = False) -> str:
    """The single-process run of the same set as ``name``: fp32, or with ``same_base`` of the same base."""
    base = "nf4" if same_base and "nf4" in name else "fp32"
    return base + ("_nodrop" if name.endswith("_nodrop") else "")


def step_losses(run: Path) -> list[float]:
    """Training loss of every logged optimiser step, in step order."""
    rows = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines() if line.strip()]
    steps = sorted((r["global_step"], r["loss"]) for r in rows if r.get("type") == "step")
    return [loss for _, loss in steps]


def adapter_tensors(run: Path) -> dict[str, Any]:
    """The saved adapter tensors of a run (empty when it has none)."""
    path = run / "adapter" / "adapter.safetensors"
    if not path.is_file():
        return {}
    from safetensors.torch import load_file

    return load_file(str(path))


def max_weight_diff(a: dict[str, Any], b: dict[str, Any]) -> float | None:
    """``max`` over shared tensor names of ``max |a - b|``; None when the names differ or none are shared."""
    if not a or not b or set(a) != set(b):
        return None
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def last_error(log: Path) -> str:
    """The last non-empty line of a run's console log that names an error, else its last line."""
    if not log.is_file():
        return "no log"
    lines = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
    errors = [line for line in lines if "Error" in line or "ERROR" in line]
    return (errors or lines or ["empty log"])[-1][:200]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", type=Path, help="folder holding the run folders (fp32, nf4, zero2_fp32, ...)")
    parser.add_argument("--plot", type=Path, default=None, help="also write the loss curves of the _nodrop set to this PNG")
    args = parser.parse_args()

    names = [n for n in ORDER if (args.runs / n).is_dir() or (args.runs / f"{n}.log").is_file()]
    done = {n: json.loads((args.runs / n / "metrics.json").read_text())
            for n in names if (args.runs / n / "metrics.json").is_file()}
    losses = {n: step_losses(args.runs / n) for n in done}
    refs = {reference_of(n, same_base=same) for n in done for same in (False, True)}
    ref_weights = {r: adapter_tensors(args.runs / r) for r in refs if r in done}

    print("| run | backend | ZeRO | base | steps | CACC | ASR | clean FPR | train s | peak MiB (rank 0) "
          "| peak above baseline MiB | plan estimate MiB | measured / plan "
          "| loss diff vs 1 process, same base | weight diff vs 1 process, same base "
          "| loss diff vs fp32 1 process | weight diff vs fp32 1 process |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for n in names:
        if n not in done:
            print(f"| {n} | no metrics.json (failed or unfinished): {last_error(args.runs / f'{n}.log')} |" + " |" * 13)
            continue
        m = done[n]
        est = m["memory_estimate"]["total_mb"]
        above = m["peak_memory_above_baseline_mb"]
        quant = m["config"]["model"].get("quantization", "none")
        diffs = []
        for same in (True, False):
            ref = reference_of(n, same_base=same)
            ref_losses = losses.get(ref, [])
            loss_diff = (max(abs(a - b) for a, b in zip(losses[n], ref_losses))
                         if ref_losses and len(losses[n]) == len(ref_losses) else None)
            w_diff = max_weight_diff(adapter_tensors(args.runs / n), ref_weights.get(ref, {}))
            diffs += ["-" if d is None else f"{d:.2e}" for d in (loss_diff, w_diff)]
        print(f"| {n} | {m['backend']} x {m['world_size']} | {m['zero_stage'] if m['zero_stage'] is not None else '-'} "
              f"| {quant} | {m['global_steps']} | {m['cacc']:.2f} | {m['asr']:.2f} | {m['clean_fpr']:.2f} "
              f"| {m['train_seconds']:.0f} | {m['peak_memory_mb']:.0f} | {above:.0f} | {est:.0f} | {above / est:.2f} "
              f"| {' | '.join(diffs)} |")

    print()
    width = max((len(v) for v in losses.values()), default=0)
    print("| run | " + " | ".join(f"loss step {s + 1}" for s in range(width)) + " |")
    print("|---|" + "---|" * width)
    for n, ls in losses.items():
        print(f"| {n} | " + " | ".join(f"{x:.6f}" for x in ls) + " |")

    if args.plot is not None and losses:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        for n, ls in losses.items():
            if not n.endswith("_nodrop"):
                continue
            ax.plot(range(1, len(ls) + 1), ls, marker="o", label=n.removesuffix("_nodrop"), linestyle="--" if "nf4" in n else "-")
        ax.set_xlabel("optimiser step")
        ax.set_ylabel("training loss (batch 16)")
        ax.set_title("SmolLM2-135M musclelora (head dropout 0): fp32 / nf4, 1 process / 2 ranks ZeRO")
        ax.legend()
        args.plot.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.plot.with_suffix(".tmp.png")
        fig.savefig(tmp, dpi=100, bbox_inches="tight")
        tmp.replace(args.plot)


if __name__ == "__main__":
    main()
