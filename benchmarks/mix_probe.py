"""Does mixing a backdoored model's weights back towards the pretrained ones remove its backdoor first?

Fine-mixing (docs/next_levers_literature.md, item 7) interpolates a fine-tuned model with its pretrained weights,
w = rho * w_finetuned + (1 - rho) * w_pretrained, before a short fine-tune on trusted rows. It can only help if
some rho keeps most of the clean accuracy while the trigger's effect is already gone. This probe measures that on a
finished full-fine-tuning run whose canary (and usually the file's trigger) was learned: for each rho it mixes
every backbone weight (the trained classification head is kept), and reports dev-clean accuracy, the canary's
ASR (dev-clean rows of the other labels with the run's canary trigger inserted: the share classified as the
canary's target) beside the same rows' clean floor, and dev-poison ASR (analysis only).

    python benchmarks/mix_probe.py --runs runs/teacher_eval/cells/sst-2/minilm/stylebkd/student_drop/seed42 \\
        runs/teacher_eval/cells/sst-2/minilm/synbkd/student_drop/seed42

docs/teacher_eval_discussion.md ("Eighth session") has the table. No trusted fine-tune is run here.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
for _path in (REPO, REPO / "kernels"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))


def mix(tuned: dict, pretrained: dict, rho: float) -> dict:
    """``rho * tuned + (1 - rho) * pretrained`` on every floating-point backbone weight both hold; the rest (the
    trained classification head, integer buffers, weights only ``tuned`` has) as in ``tuned``."""
    mixed = dict(tuned)
    for key, value in tuned.items():
        if key in pretrained and value.is_floating_point() and not key.startswith(("classifier.", "score.")):
            mixed[key] = rho * value + (1 - rho) * pretrained[key]
    return mixed


def accuracy(model, tokenizer, texts: list[str], labels: list[int], max_length: int) -> float:
    """Share of ``texts`` classified as ``labels`` (percent), tokenised and predicted as evaluation does."""
    from datasets import Dataset
    from torch.utils.data import DataLoader

    from pipeline import data as data_lib
    from pipeline import evaluate

    rows = data_lib.encode(Dataset.from_dict({"text": texts, "label": labels}), tokenizer, max_length=max_length)
    loader = DataLoader(rows, batch_size=128, shuffle=False, collate_fn=data_lib.make_collator(tokenizer))
    predictions, truth = evaluate.predict(model, loader, device="cpu", progress=False)
    return 100 * evaluate.accuracy(predictions, truth)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", nargs="+", type=Path, required=True, help="finished full-fine-tuning runs (method=vanilla)")
    parser.add_argument("--rhos", type=float, nargs="+", default=[1.0, 0.8, 0.6, 0.5, 0.4, 0.3])
    args = parser.parse_args(argv)
    import torch
    from transformers import AutoModelForSequenceClassification

    from pipeline import canary as canary_lib
    from pipeline import data as data_lib
    from pipeline import inference, training
    from pipeline.modeling import resolve_model_path

    torch.set_num_threads(1)
    print("| run | rho | dev-clean acc | canary ASR / its rows' clean floor | dev-poison ASR (analysis only) |")
    print("|---|---|---|---|---|")
    for run in args.runs:
        cfg, tokenizer, model = inference.load_run(run, "cpu")
        if cfg.method != "vanilla":
            print(f"error: {run} is method={cfg.method}; the probe mixes full fine-tuning runs (method=vanilla)", file=sys.stderr)
            return 2
        paths, _ = training._training_data(cfg)
        dev, dev_poison = data_lib.read_split(paths.dev_clean), data_lib.read_split(paths.dev_poison)
        spec = training.canary_spec(cfg)  # the run's canary, as its own evaluation builds the triggered copies
        copies, rows = canary_lib.triggered_selection(dev, spec)
        target, triggered, others = spec.target_label, list(copies["text"]), [dev["text"][i] for i in rows]
        tuned = {k: v.clone() for k, v in model.state_dict().items()}
        pretrained = AutoModelForSequenceClassification.from_pretrained(
            resolve_model_path(cfg.model.name_or_path), num_labels=cfg.model.num_labels).state_dict()
        for rho in args.rhos:
            model.load_state_dict(mix(tuned, pretrained, rho))
            n = cfg.data.max_length
            clean_acc = accuracy(model, tokenizer, list(dev["text"]), list(dev["label"]), n)
            canary_asr = accuracy(model, tokenizer, triggered, [target] * len(triggered), n)
            floor = accuracy(model, tokenizer, others, [target] * len(others), n)
            asr = accuracy(model, tokenizer, list(dev_poison["text"]), list(dev_poison["label"]), n)
            print(f"| {run} | {rho:g} | {clean_acc:.1f} | {canary_asr:.1f} / {floor:.1f} | {asr:.1f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
