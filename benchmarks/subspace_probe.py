"""Would aligning to a subspace of K trusted gradients, instead of one, keep a trigger out? (No training.)

recipe=defended replaces each tensor's training gradient by its projection's length along ONE trusted direction (the
mean gradient of a 16-row reference batch), so every update is a step on the trusted rows' loss and the model learns
what its 600 trusted rows teach (docs/RECIPE.md). A wider version would project the training gradient onto the span
of K trusted per-row gradients: the file could then choose the combination of trusted directions. That keeps a
trigger out only if the canary's and the poisoned rows' gradients lie further outside that span than the clean
rows'. This probe measures it at a finished run's selected model (dropout off): the per-row gradients of the run's
trainable adapter tensors (LoRA/MSLR) for its 600 trusted reference rows, its planted canary rows, the file's
poisoned rows (found through ``poison_label``: analysis only) and 256 clean file rows, and for each basis the share
of each group's mean gradient (and, averaged, of each row's gradient) that the projection keeps.

    python benchmarks/subspace_probe.py runs/teacher_eval/cells/sst-2/minilm/stylebkd/teacher/seed42

docs/teacher_eval_discussion.md ("Ninth session") has the table.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
for _path in (REPO, REPO / "kernels", REPO / "benchmarks"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

import torch  # noqa: E402


def kept(vectors: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """||P v|| / ||v|| for each row v of ``vectors`` (n x d), P the orthogonal projection onto the span of the rows of
    ``basis`` (k x d)."""
    q, _ = torch.linalg.qr(basis.T.double())
    v = vectors.double()
    return (v @ q).norm(dim=1) / v.norm(dim=1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path, help="a finished adapter run (e.g. a recipe=defended cell)")
    parser.add_argument("--clean-rows", type=int, default=256, help="clean file rows sampled")
    args = parser.parse_args(argv)
    import numpy as np

    from shortcut_probe import planted_rows

    from pipeline import inference

    torch.set_num_threads(1)
    cfg, tokenizer, model = inference.load_run(args.run, "cpu")
    texts, labels, in_canary, poisoned, rows = planted_rows(cfg)
    clean = [i for i in range(len(texts)) if not in_canary[i] and not poisoned[i]]
    groups = {
        "canary rows": [i for i in range(len(texts)) if in_canary[i]],
        "poisoned rows": [i for i in range(len(texts)) if poisoned[i]],
        "clean file rows": sorted(np.random.default_rng(0).choice(clean, min(args.clean_rows, len(clean)), replace=False).tolist()),
    }
    params = dict(model.named_parameters())
    names = sorted(n for n in params if "lora_" in n or "mslr" in n.lower())
    for name, p in params.items():
        p.requires_grad_(name in names)

    def gradient(text: str, label: int) -> torch.Tensor:
        model.zero_grad(set_to_none=True)
        batch = tokenizer([text], truncation=True, max_length=cfg.data.max_length, return_tensors="pt",
                          return_token_type_ids=False)
        torch.nn.functional.cross_entropy(model(**batch).logits.float(), torch.tensor([label])).backward()
        return torch.cat([params[n].grad.flatten() for n in names])

    trusted = torch.stack([gradient(t, int(y)) for t, y in zip(rows.reference["text"], rows.reference["label"])])
    grads = {g: torch.stack([gradient(texts[i], labels[i]) for i in idx]) for g, idx in groups.items() if idx}
    print(f"{args.run}: {len(names)} adapter tensors, {trusted.shape[1]} weights; rows: {len(trusted)} trusted, "
          + ", ".join(f"{len(v)} {g}" for g, v in grads.items()))
    print("| basis | " + " | ".join(f"{g}: mean gradient / rows (mean)" for g in grads) + " |")
    print("|---|" + "---|" * len(grads))
    bases = {"the mean of 16 trusted rows (the recipe's direction)": trusted[:16].mean(0, keepdim=True)}
    bases.update({f"{k} trusted rows": trusted[:k] for k in (16, 64, 256, len(trusted))})
    for label, basis in bases.items():
        cells = [f"{float(kept(g.mean(0, keepdim=True), basis)[0]):.3f} / {float(kept(g, basis).mean()):.3f}"
                 for g in grads.values()]
        print(f"| {label} | " + " | ".join(cells) + " |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
