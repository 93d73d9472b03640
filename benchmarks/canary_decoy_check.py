"""The canary's decoy floor, measured after the fact on finished runs (docs/CANARY.md, "Why decoys").

For each run folder: rebuild the selected model (pipeline.inference.load_run), rebuild its selection rows and its
canary's triggered copies exactly as the run did, add ``--decoys`` unplanted decoy triggers at the same positions,
and print the canary ASR, the clean floor (both should equal what the run recorded at its selected epoch: a
parity check), every decoy's target rate, and the verdict under the clean floor alone and under the decoy floor.
Reads only the training file's rows and dev-clean (as the run did); no test or poison labels.

    python benchmarks/canary_decoy_check.py runs/filter_eval/cells/sst-2/minilm/*/ref_only_600/seed45 --out runs/decoys.md
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
for _path in (REPO, REPO / "kernels"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))


def check_run(run_dir: Path, decoys: int) -> dict:
    """The canary numbers of one finished run's selected model, with ``decoys`` decoy floors (percentages)."""
    import torch

    from pipeline import canary as canary_lib
    from pipeline import data as data_lib
    from pipeline import evaluate as ev
    from pipeline import training
    from pipeline.inference import load_run

    cfg, tokenizer, model = load_run(run_dir, "cpu")
    recorded = json.loads((run_dir / "metrics.json").read_text())
    _, rows = training._training_data(cfg)
    rows, _ = training._filter_rows(cfg, rows)
    spec = training.canary_spec(cfg, decoys=decoys)
    triggered, selection_rows = canary_lib.triggered_selection(rows.selection, spec)
    decoy_sets = canary_lib.decoy_selection(rows.selection, spec, selection_rows)

    def predict(ds) -> list[int]:
        encoded = data_lib.encode(ds, tokenizer, max_length=cfg.data.max_length)
        loader = torch.utils.data.DataLoader(encoded, batch_size=cfg.train.eval_batch_size, shuffle=False,
                                             collate_fn=data_lib.make_collator(tokenizer))
        return ev.predict(model, loader, device=torch.device("cpu"), desc="", progress=False)[0].tolist()

    selection_preds = predict(rows.selection)
    asr, clean = canary_lib.canary_rates(predict(triggered), selection_preds, selection_rows, spec.target_label)
    decoy = canary_lib.decoy_rates([predict(d) for d in decoy_sets], spec.target_label)
    floor = canary_lib.floor_of(clean, decoy)
    return {
        "run": str(run_dir), "method": recorded.get("method"), "attack": recorded.get("attack"), "seed": recorded.get("seed"),
        "target": spec.target_label, "trigger": " ".join(spec.trigger),
        "recorded_asr": recorded["canary"]["asr"], "recorded_floor": recorded["canary"]["floor"],
        "asr": 100 * asr, "clean_floor": 100 * clean, "decoys": [100 * d for d in decoy], "floor": 100 * floor,
        "held_clean_floor": 100 * (asr - clean) <= 100 * spec.tolerance + 1e-9,
        "held_decoy_floor": 100 * (asr - floor) <= 100 * spec.tolerance + 1e-9,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path, help="finished launch/train.py output folders (canary on)")
    parser.add_argument("--decoys", type=int, default=3, help="decoy triggers per run (default 3, canary.decoys)")
    parser.add_argument("--out", type=Path, default=None, help="also write the markdown table here")
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    lines = ["| run (attack / method / seed) | target | canary ASR (recorded) | clean floor (recorded) | decoy rates | "
             "floor with decoys | held: clean floor / decoy floor |", "|---|---|---|---|---|---|---|"]
    for run in args.runs:
        r = check_run(run, args.decoys)
        name = "/".join(run.parts[-3:])
        lines.append(
            f"| {name} | {r['target']} | {r['asr']:.1f} ({r['recorded_asr']:.1f}) | {r['clean_floor']:.1f} "
            f"({r['recorded_floor']:.1f}) | {' / '.join(f'{d:.1f}' for d in r['decoys'])} | {r['floor']:.1f} | "
            f"{'held' if r['held_clean_floor'] else 'NOT'} / {'held' if r['held_decoy_floor'] else 'NOT'} |")
        print(lines[-1], flush=True)
    if args.out is not None:
        args.out.write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
