"""Would keeping only the rows a teacher *confidently* agrees with keep a trigger out? (No training.)

``filter.teacher_action=drop`` (docs/FILTER.md) keeps every row whose label the teacher (a ``recipe=defended`` run
that never learned a trigger) agrees with, and the student learned the canary from the 7-20 canary rows the teacher
agreed with (docs/teacher_eval_discussion.md). A dirty-label row's label contradicts its content, so where the
teacher agrees with it, the teacher is probably wrong, and wrong predictions tend to be unsure ones. This probe
measures, for a finished teacher grid (docs/teacher_eval), how many rows of each kind a stricter rule keeps: a row
is kept if the teacher gives its label a probability of at least ``tau`` (``tau`` = 0.5 is ``drop``).

For each attack and seed it rebuilds the student cell's training rows as that run trained on them before the teacher
check (the lexical filter, then the canary planted; benchmarks/shortcut_probe.py ``planted_rows``), runs the teacher
cell's model on them and prints, per ``tau``: the rows the teacher agrees with at probability ``tau`` or more, split
into clean, canary and the file's poisoned rows (found through the training file's ``poison_label`` column:
**analysis only**, nothing in the product reads it), their label-1 share; the rows it contradicts with at least that
confidence, split the same way (what ``filter.teacher_min_confidence=tau`` relabels); and how many selection rows
(dev-clean, which the user has) the teacher is that sure of, with its accuracy on them.

    python benchmarks/teacher_confidence_probe.py --grid runs/teacher_eval --attacks badnets addsent stylebkd synbkd --seeds 42

docs/teacher_eval_discussion.md ("Tenth session") has the table.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
for _path in (REPO, REPO / "kernels", REPO / "benchmarks"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))


def teacher_probabilities(run_dir: Path, *texts: list[str]):
    """The selected model of the finished run ``run_dir`` (loaded once): softmax probabilities (rows x labels) on each
    list of ``texts``, one array per list."""
    from datasets import Dataset
    from torch.utils.data import DataLoader

    from pipeline import data as data_lib
    from pipeline import inference
    from pipeline.evaluate import predict_proba

    cfg, tokenizer, model = inference.load_run(run_dir, "cpu")
    out = []
    for some in texts:
        rows = data_lib.encode(Dataset.from_dict({"text": some, "label": [0] * len(some)}), tokenizer,
                               max_length=cfg.data.max_length)
        loader = DataLoader(rows, batch_size=64, shuffle=False, collate_fn=data_lib.make_collator(tokenizer))
        out.append(predict_proba(model, loader, device="cpu", progress=False)[0].numpy())
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--grid", type=Path, default=REPO / "runs" / "teacher_eval", help="a finished teacher grid's output_root")
    parser.add_argument("--attacks", nargs="+", default=["badnets", "addsent", "stylebkd", "synbkd"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[42])
    parser.add_argument("--dataset", default="sst-2", help="the grid's dataset folder under cells/")
    parser.add_argument("--model", default="minilm", help="the grid's model folder under cells/<dataset>/")
    parser.add_argument("--teacher", default="teacher", help="the teacher cell's name")
    parser.add_argument("--student", default="student_drop", help="a student cell whose config gives the training rows")
    parser.add_argument("--tau", type=float, nargs="+", default=[0.5, 0.7, 0.8, 0.9, 0.95, 0.98])
    args = parser.parse_args(argv)
    import numpy as np
    import torch

    from pipeline.inference import read_run_config
    from shortcut_probe import planted_rows

    torch.set_num_threads(min(2, torch.get_num_threads()))
    print("| attack | seed | tau | rows agreed with at >= tau | of them clean | canary | poisoned (analysis) | label-1 share | "
          "contradicted at >= tau: clean / canary / poisoned | selection rows at >= tau / teacher accuracy on them |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for attack in args.attacks:
        for seed in args.seeds:
            cell = args.grid / "cells" / args.dataset / args.model / attack
            cfg = read_run_config(cell / args.student / f"seed{seed}" / "config.yaml")
            texts, labels, canary, poisoned, data = planted_rows(cfg)
            y, canary, poisoned = np.array(labels), np.array(canary), np.array(poisoned)
            clean = ~canary & ~poisoned
            teacher = cell / args.teacher / f"seed{seed}"
            dev = data.selection
            proba, dev_p = teacher_probabilities(teacher, texts, list(dev["text"]))
            p_own = proba[np.arange(len(y)), y]
            dev_y = np.array([int(v) for v in dev["label"]])
            dev_conf, dev_right = dev_p.max(1), dev_p.argmax(1) == dev_y
            for tau in args.tau:
                kept = p_own >= tau
                flipped = 1 - p_own >= tau  # the teacher contradicts the label with at least this confidence
                on_dev = dev_conf >= tau
                print(f"| {attack} | {seed} | {tau:g} | {int(kept.sum())} of {len(y)} | {int((kept & clean).sum())} of "
                      f"{int(clean.sum())} | {int((kept & canary).sum())} of {int(canary.sum())} | "
                      f"{int((kept & poisoned).sum())} of {int(poisoned.sum())} | {y[kept].mean():.2f} | "
                      f"{int((flipped & clean).sum())} / {int((flipped & canary).sum())} / {int((flipped & poisoned).sum())} | "
                      f"{int(on_dev.sum())} / {100 * dev_right[on_dev].mean():.1f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
