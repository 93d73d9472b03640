"""Does the canary's trigger screen flag the triggers a trained model reacts to without having learned them?

For each finished run folder (canary on; a model that never saw a canary row is the clean test, e.g. method=ref_only):
take the run's canary trigger and ``--decoys`` more triggers of the same shape (none of them planted, except the
canary itself in runs that train on the training file), and measure for each

- the **reaction** of the run's selected model: its target rate on the triggered non-target selection rows minus the
  same rows clean (benchmarks/canary_decoy_check.py, which rebuilds the selected model), and
- the **screen's probe shift**: what ``pipeline.canary.screen_trigger`` computes before training (a logistic probe on
  the initial backbone's features of the reference rows, measured on the same triggered rows).

It prints one row per trigger, the rank correlation of the two over all rows, and which reactions above the canary
tolerance the screen would have flagged at ``canary.screen_max_shift``. Reads the training file's rows and dev-clean
only (as the runs did); no test or poison labels. docs/CANARY.md ("The trigger screen") has the measured table.

    python benchmarks/canary_screen_check.py runs/filter_eval/cells/sst-2/minilm/badnets/ref_only_600/seed4{2,3,4,5} \\
        --decoys 8 --out runs/canary_screen_check.md
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
for _path in (REPO, REPO / "kernels"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))


def _decoy_check():
    spec = importlib.util.spec_from_file_location("canary_decoy_check", REPO / "benchmarks" / "canary_decoy_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def probe_shifts(run_dir: Path, triggers: list[tuple[str, ...]]) -> tuple[list[float], float]:
    """The screen's probe shift (percentage points) of every trigger on the run's initial model, and the probe accuracy."""
    import torch

    from pipeline import canary as canary_lib
    from pipeline import modeling, training
    from pipeline.config import load_config, resolve_defaults

    cfg = load_config(run_dir / "config.yaml")
    model_path = modeling.resolve_model_path(cfg.model.name_or_path)
    info = modeling.read_model_info(model_path, trust_remote_code=cfg.model.trust_remote_code)
    cfg = resolve_defaults(cfg, model_type=info.model_type, hidden_size=info.hidden_size, is_decoder=info.is_decoder)
    _, rows = training._training_data(cfg)
    rows, _ = training._filter_rows(cfg, rows)
    torch.manual_seed(cfg.seed)
    tokenizer, model, _ = training.build_model(cfg, info, model_path)
    embed = training.backbone_embedder(model, tokenizer, max_length=cfg.data.max_length,
                                       batch_size=cfg.train.eval_batch_size, device="cpu", is_decoder=info.is_decoder)
    result = canary_lib.screen_trigger(embed, rows.reference, rows.selection, triggers, seed=cfg.canary.seed,
                                       target=cfg.canary.target_label, num_labels=cfg.model.num_labels, max_shift=-1.0)
    return [100 * s for s in result.shifts], 100 * result.probe_accuracy


def spearman(a: list[float], b: list[float]) -> float:
    """Spearman's rank correlation (average ranks for ties)."""
    def ranks(v: list[float]) -> list[float]:
        order = sorted(range(len(v)), key=lambda i: v[i])
        out = [0.0] * len(v)
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and v[order[j + 1]] == v[order[i]]:
                j += 1
            for k in range(i, j + 1):
                out[order[k]] = (i + j) / 2
            i = j + 1
        return out

    ra, rb = ranks(a), ranks(b)
    ma, mb = sum(ra) / len(ra), sum(rb) / len(rb)
    num = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    den = (sum((x - ma) ** 2 for x in ra) * sum((y - mb) ** 2 for y in rb)) ** 0.5
    return num / den if den else 0.0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path, help="finished launch/train.py output folders (canary on)")
    parser.add_argument("--decoys", type=int, default=8, help="unplanted triggers per run besides the canary (default 8)")
    parser.add_argument("--max-shift", type=float, default=None,
                        help="screen limit in points (default: the runs' canary.screen_max_shift, 20)")
    parser.add_argument("--out", type=Path, default=None, help="also write the markdown table here")
    args = parser.parse_args(argv)
    import torch

    from pipeline import training
    from pipeline.config import load_config

    torch.set_num_threads(1)
    check = _decoy_check()
    lines = ["| run | trigger | words | reaction of the selected model (points) | screen probe shift (points) | "
             "flagged |", "|---|---|---|---|---|---|"]
    reactions: list[float] = []
    shifts: list[float] = []
    tolerance = None
    for run in args.runs:
        cfg = load_config(run / "config.yaml")
        limit = args.max_shift if args.max_shift is not None else 100 * cfg.canary.screen_max_shift
        tolerance = 100 * cfg.canary.tolerance
        r = check.check_run(run, args.decoys)
        spec = training.canary_spec(cfg, decoys=args.decoys)
        triggers = [spec.trigger, *spec.decoys]
        probe, accuracy = probe_shifts(run, triggers)
        react = [r["asr"] - r["clean_floor"], *(d - r["clean_floor"] for d in r["decoys"])]
        for j, (words, reaction, shift) in enumerate(zip(triggers, react, probe)):
            kind = "canary" if j == 0 else f"decoy {j}"
            lines.append(f"| {'/'.join(run.parts[-3:])} | {kind} | {' '.join(words)} | {reaction:+.1f} | {shift:+.1f} | "
                         f"{'yes' if shift > limit else ''} |")
            print(lines[-1], flush=True)
        print(f"  probe accuracy on the selection rows: {accuracy:.1f}%", flush=True)
        reactions += react
        shifts += probe
    reactors = [i for i, v in enumerate(reactions) if v > tolerance]
    flagged = [i for i, v in enumerate(shifts) if v > limit]
    summary = (
        f"{len(reactions)} triggers: Spearman rank correlation of reaction and probe shift {spearman(reactions, shifts):+.2f}; "
        f"the screen (limit {limit:.0f} points) flags {len(flagged)}; of the {len(reactors)} reactions above the canary "
        f"tolerance ({tolerance:.0f} points) it flags {sum(i in flagged for i in reactors)} "
        f"({', '.join(f'{reactions[i]:+.1f}' + (' flagged' if i in flagged else ' missed') for i in reactors)})"
    )
    print(summary)
    if args.out is not None:
        args.out.write_text("\n".join(lines) + "\n\n" + summary + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
