"""Could a shallow "shortcut" model single out a file's poisoned rows? (No training of the classifier.)

Product-of-experts and honeypot defences (docs/next_levers_literature.md, items 2-3) train the classifier beside a
shallow model that absorbs the backdoor: rows the shallow model already predicts with confidence give the
classifier little gradient. That only keeps a trigger out if the shallow model is far more confident on the
poisoned rows than on clean ones. This probe measures it before anything is built: for one attack file and seed
it takes the run's training rows (its seeded subset) with the run's canary planted (no training-row filter), fits
an L2 logistic regression on shallow features with shuffled 5-fold cross-fitting (each row scored by a model that
never saw it; shuffled because the rows come in file order, where a file's poisoned rows can sit together), and
reports the cross-fitted probability of each row's own label, p(y), for the clean rows, the canary rows and the
file's poisoned rows.

Features: ``bow`` = binary word 1-2-grams, the lexical filter's own (lower-cased, whitespace-split); ``layerK`` =
mean-pooled hidden states of layer K of the pretrained backbone (MiniLM here; frozen). The poisoned rows are found by matching texts with the training file's
``poison_label`` column: **for analysis only**; nothing in the product reads it.

    python benchmarks/shortcut_probe.py --attacks addsent stylebkd synbkd --seeds 42 --features bow layer1 layer2 layer3 layer6

Needs scikit-learn (``pip install -e .[analysis]``). docs/teacher_eval_discussion.md ("Eighth session") has the table.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
for _path in (REPO, REPO / "kernels"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))


def training_rows(
    config: Path | None, attack: str, seed: int, overrides: list[str] = (),
) -> tuple[list[str], list[int], list[bool], list[bool], object]:
    """The run's training rows with its canary planted: texts, labels, canary flags, poisoned flags, the config.

    The training-row filter is off (``filter.method=none``): the probe asks what a shallow model sees in the rows
    a training-time defence gets. A poisoned row is one whose text carries ``poison_label`` 1 in the training file
    (analysis only); a canary row is never counted as poisoned.
    """
    from pipeline.config import load_config, resolve_defaults

    cfg = load_config(config, [f"data.attack={attack}", f"seed={seed}", *overrides, "filter.method=none"])
    cfg = resolve_defaults(cfg, model_type="bert", hidden_size=384, is_decoder=False)
    texts, labels, canary, poisoned, _ = planted_rows(cfg)
    return texts, labels, canary, poisoned, cfg


def planted_rows(cfg) -> tuple[list[str], list[int], list[bool], list[bool], object]:
    """A resolved config's training rows as its run trains on them (its ``filter.method``, then its canary planted):
    texts, labels, canary flags, poisoned flags (``poison_label`` 1 in the training file: analysis only; a canary row
    is never counted as poisoned), and the run's TrainingData (its trusted reference rows)."""
    from pipeline import data as data_lib
    from pipeline import training

    paths, rows = training._training_data(cfg)
    rows, _ = training._filter_rows(cfg, rows)
    planted, canary = training._plant_canary(cfg, rows)
    texts, labels = list(planted.train["text"]), [int(y) for y in planted.train["label"]]
    file_rows = data_lib.read_split(paths.train, num_labels=cfg.model.num_labels, keep_poison_label=True)  # analysis only
    poisoned = {t for t, p in zip(file_rows["text"], file_rows["poison_label"]) if p == 1}
    canary_rows = set(canary.planted) if canary is not None else set()
    return (texts, labels, [i in canary_rows for i in range(len(texts))],
            [t in poisoned and i not in canary_rows for i, t in enumerate(texts)], rows)


def features(kind: str, texts: list[str], embedder=None):
    """A (rows x features) matrix for ``kind``: ``bow`` = the lexical filter's word 1-2-grams (binary), ``layerK`` =
    the mean over the text of the backbone's layer-K hidden states (``embedder(texts, layer)``), standardised."""
    import numpy as np

    if kind == "bow":
        from pipeline.defenses.shortcut import ngram_matrix

        return ngram_matrix(texts)
    x = embedder(texts, int(kind.removeprefix("layer"))).numpy()
    return (x - x.mean(0)) / (x.std(0) + 1e-6)


def layer_embedder(cfg):
    """texts, layer -> the pretrained backbone's mean-pooled layer-``layer`` hidden states (pipeline.training's
    backbone_embedder, the canary screen's, at that layer)."""
    from transformers import AutoModel, AutoTokenizer

    from pipeline import training
    from pipeline.modeling import resolve_model_path

    path = resolve_model_path(cfg.model.name_or_path)
    tokenizer, model = AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path)

    def embed(texts: list[str], layer: int):
        both = training.backbone_embedder(model, tokenizer, max_length=cfg.data.max_length, batch_size=64,
                                          device="cpu", is_decoder=False, layer=layer)(texts)
        return both[:, both.shape[1] // 2:]  # the mean half (the first half is the [CLS] position)

    return embed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=REPO / "launch" / "configs" / "demo.yaml")
    parser.add_argument("--attacks", nargs="+", default=["addsent", "stylebkd", "synbkd"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[42])
    parser.add_argument("--features", nargs="+", default=["bow", "layer1", "layer2", "layer3", "layer6"])
    parser.add_argument("--overrides", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides (as for launch/train.py)")
    parser.add_argument("--C", type=float, nargs="+", default=[0.01, 0.1, 1.0], help="inverse L2 strengths tried")
    parser.add_argument("--fit", choices=("cross", "in-sample"), default="cross",
                        help="cross: each row scored by a fit on the other folds (the default, what shortcut.expert "
                             "uses); in-sample: one fit on every row scores them all (for contrast)")
    parser.add_argument("--residual", action="store_true",
                        help="add each group's sum of 1 - p(y) over its rows: its weight in a product-of-experts "
                             "loss's gradient while the main model is still uninformed")
    args = parser.parse_args(argv)
    import numpy as np
    import torch
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_predict

    torch.set_num_threads(1)
    print("| attack | seed | features | C | clean rows: mean p(y) / share > 0.9 | canary rows | poisoned rows | "
          "clean accuracy |" + (" sum of 1 - p(y): clean / canary / poisoned |" if args.residual else ""))
    print("|---|---|---|---|---|---|---|---|" + ("---|" if args.residual else ""))
    for attack in args.attacks:
        for seed in args.seeds:
            texts, labels, canary, poisoned, cfg = training_rows(args.config, attack, seed, args.overrides)
            y, canary, poisoned = np.array(labels), np.array(canary), np.array(poisoned)
            clean = ~canary & ~poisoned
            folds = StratifiedKFold(5, shuffle=True, random_state=seed)  # the rows come in file order
            embedder = layer_embedder(cfg) if any(k != "bow" for k in args.features) else None
            for kind in args.features:
                x = features(kind, texts, embedder)
                for c in args.C:
                    if args.fit == "cross":
                        proba = cross_val_predict(LogisticRegression(C=c, max_iter=3000), x, y, cv=folds, method="predict_proba")
                    else:
                        proba = LogisticRegression(C=c, max_iter=3000).fit(x, y).predict_proba(x)
                    p_own = proba[np.arange(len(y)), y]

                    def cell(rows: np.ndarray) -> str:
                        return f"{p_own[rows].mean():.2f} / {(p_own[rows] > 0.9).mean():.2f} (n={int(rows.sum())})" if rows.any() else "-"

                    accuracy = (proba.argmax(1) == y)[clean].mean()
                    residual = (" " + " / ".join(f"{(1 - p_own[rows]).sum():.1f}" for rows in (clean, canary, poisoned))
                                + " |") if args.residual else ""
                    print(f"| {attack} | {seed} | {kind} | {c:g} | {cell(clean)} | {cell(canary)} | {cell(poisoned)} | "
                          f"{100 * accuracy:.1f} |{residual}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
