"""Filter a poisoned training set with BKI or CUBE, using a model fine-tuned on it, for a second run.

    python launch/filter_data.py RUN_DIR --method bki --out-root runs/filtered_bki
    python launch/filter_data.py RUN_DIR --method cube --out-root runs/filtered_cube
    python launch/train.py --config CONFIG data.root=runs/filtered_bki output_dir=runs/bki_vanilla

RUN_DIR is a finished launch/train.py run on the poisoned data (for the baselines: method=vanilla);
its config names the data, and the model is rebuilt from it. BKI (Chen & Dai 2021) and CUBE
(Cui et al. 2022) are described in pipeline/defenses/filtering.py; CUBE's UMAP step is replaced by
PCA + t-SNE (--reducer tsne) or PCA alone (--reducer pca).

Writes, under --out-root, the poison_data layout of the run's data:

    <dataset>/<target>/<attack>/<setting>/<rate>/train-poison.csv    the kept rows, in file order
    <dataset>/<target>/<attack>/{dev,test}-{clean,poison}.csv        unchanged copies
    <dataset>/<target>/<attack>/<setting>/<rate>/filter-report.json  counts, keywords / clusters, and
                                                                     (reporting only) poison recall
                                                                     and precision

Rows filtered (--rows): "run" (default) the rows the run trained on, i.e. its seeded
data.max_train_samples subset minus the rows its own filter.method (e.g. lexical_zscore, the defended
recipe's) removed before training, so a second run with the same config (and filter.method=none when
the first had a filter: its rows are already out) sees exactly those rows minus the removed ones;
"all" every row of the training file. The filters never read poison_label; the
report compares their choice with it afterwards.
"""

from __future__ import annotations

import argparse
import functools
import logging
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
for _path in (REPO, REPO / "kernels"):  # run from a checkout without installing (kernels/ holds mslr_kernels)
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from launch._cli import fraction_up_to_one, positive_int, setup_logging  # noqa: E402

REPORT_FILE = "filter-report.json"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path, help="finished run directory (config.yaml + trained weights)")
    parser.add_argument("--method", required=True, choices=["bki", "cube"], help="filtering defence")
    parser.add_argument("--out-root", type=Path, required=True, help="root of the filtered poison_data tree (not the run's data.root)")
    parser.add_argument("--rows", choices=["run", "all"], default="run",
                        help="run: the rows the run trained on (its max_train_samples subset); all: the whole training file")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="where the model runs (default: auto)")
    parser.add_argument("--batch-size", type=positive_int, default=64, help="texts per forward pass (default: 64)")
    parser.add_argument("--max-length", type=positive_int, default=None, help="truncation length (default: the run's data.max_length)")
    parser.add_argument("--pooling", choices=["auto", "first", "last"], default="auto",
                        help="representation token: first (encoders), last non-pad (decoders); auto picks by model family")
    parser.add_argument("--overwrite", action="store_true", help="replace existing files under --out-root")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    bki = parser.add_argument_group("BKI")
    bki.add_argument("--top-p", type=positive_int, default=5, help="keywords kept per sentence (default: 5, the authors')")
    bki.add_argument("--num-keywords", type=positive_int, default=1, help="backdoor keywords taken (default: 1)")
    bki.add_argument("--bki-rule", choices=["top_p", "contains"], default="top_p",
                     help="remove rows whose top-p keywords include a backdoor keyword (top_p, the authors') or that contain it")
    cube = parser.add_argument_group("CUBE")
    cube.add_argument("--reducer", choices=["tsne", "pca"], default="tsne", help="stand-in for UMAP (default: tsne = PCA then t-SNE)")
    cube.add_argument("--reduce-to", type=positive_int, default=2, help="dimension after reduction (default: 2; <= 3 for tsne)")
    cube.add_argument("--pca-components", type=positive_int, default=20, help="PCA dimension before t-SNE (default: 20)")
    cube.add_argument("--min-cluster-size", type=positive_int, default=5, help="HDBSCAN min_cluster_size (default: 5)")
    cube.add_argument("--min-samples", type=positive_int, default=100, help="HDBSCAN min_samples (default: 100, the reference)")
    cube.add_argument("--noise", choices=["group", "keep"], default="group", help="HDBSCAN noise: one more group (reference) or always kept")
    cube.add_argument("--drop-share", type=fraction_up_to_one, default=0.5, help="remove minority groups below this share of their label (default: 0.5)")
    cube.add_argument("--seed", type=int, default=None, help="seed of the reduction (default: the run's seed)")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="allow a run whose config.yaml sets model.trust_remote_code: true to run the model's own "
                             "Python code (refused by default: a run folder is data)")
    args = parser.parse_args(argv)
    if args.method == "cube" and args.reducer == "tsne" and args.reduce_to > 3:
        parser.error(f"--reduce-to {args.reduce_to} needs --reducer pca (t-SNE embeds into at most 3 dimensions)")
    if args.method == "cube" and args.min_cluster_size < 2:
        parser.error("--min-cluster-size must be at least 2 (HDBSCAN)")
    return args


def _training_rows(cfg: Any, paths: Any, rows: str) -> tuple[Any, list[int]]:
    """The training file with poison labels, and the indices of the rows to filter.

    ``rows == "run"``: the rows the run trained on, i.e. its seeded ``data.max_train_samples`` subset minus
    the rows its own ``filter.method`` removed before training (checked against the loader's draw).
    """
    import numpy as np

    from pipeline import data as data_lib

    full = data_lib.read_split(paths.train, num_labels=cfg.model.num_labels, keep_poison_label=True)
    if rows == "all":
        return full, list(range(len(full)))
    size = cfg.data.max_train_samples
    if size is None or size >= len(full):
        indices = list(range(len(full)))
    else:
        # The seeded subset pipeline.data.load_training_data draws; checked against it below.
        indices = np.sort(np.random.default_rng(cfg.seed).permutation(len(full))[:size]).tolist()
        trained = data_lib.load_training_data(
            paths, ref_size=0, seed=cfg.seed, num_labels=cfg.model.num_labels, max_train_samples=size
        ).train
        subset = full.select(indices)
        if subset["text"] != trained["text"] or subset["label"] != trained["label"]:
            raise RuntimeError(
                "the training subset drawn here differs from pipeline.data.load_training_data's; "
                "update _training_rows in launch/filter_data.py to the loader's draw, or use --rows all"
            )
    if cfg.filter.method not in (None, "none"):  # None: unresolved auto, which a finished run never has
        indices = _after_run_filter(cfg, full, indices)
    return full, indices


def _after_run_filter(cfg: Any, full: Any, indices: list[int]) -> list[int]:
    """``indices`` minus the rows the run's own ``filter.method`` removed before it trained."""
    from pipeline.training import filtered_training_rows

    trained = filtered_training_rows(cfg)
    kept_rows = list(zip(trained["text"], trained["label"]))
    texts, labels = full["text"], full["label"]
    out: list[int] = []
    for index in indices:  # the kept rows are a subsequence of the subset, in file order
        if len(out) < len(kept_rows) and (texts[index], labels[index]) == kept_rows[len(out)]:
            out.append(index)
    if len(out) != len(kept_rows):
        raise RuntimeError(
            f"the {len(kept_rows)} rows kept by the run's filter.method={cfg.filter.method} are not a subsequence of its "
            f"{len(indices)} training rows; use --rows all"
        )
    logging.getLogger("launch.filter_data").info(
        "the run's own filter.method=%s removed %d of its %d training rows before training; they are left out here too",
        cfg.filter.method, len(indices) - len(out), len(indices),
    )
    return out


def filter_run_data(cfg: Any, tokenizer: Any, model: Any, args: argparse.Namespace, device: Any) -> dict[str, Any]:
    """Filter the run's training rows with ``args.method`` and write the filtered data tree.

    Args:
        cfg: The run's RunConfig.
        tokenizer: The run's tokenizer.
        model: The run's trained classifier, on ``device``.
        args: Parsed command-line arguments.
        device: Torch device of the model.

    Returns:
        The report written to ``filter-report.json``.

    Raises:
        ValueError: The output would overwrite the input data, or data / settings are bad.
        FileExistsError: Output files exist and ``--overwrite`` is not set.
    """
    from pipeline import data as data_lib
    from pipeline import modeling
    from pipeline.attacks import CsvRow, format_csv
    from pipeline.checkpoint import atomic_write_bytes, atomic_write_json, atomic_write_text
    from pipeline.defenses.filtering import (
        bki_filter,
        cube_filter,
        filter_report,
        filter_training_rows,
        model_representations,
    )

    logger = logging.getLogger("launch.filter_data")
    root = Path(cfg.data.root)
    paths = data_lib.split_paths(
        root, cfg.data.dataset, cfg.data.attack, setting=cfg.data.setting,
        poison_rate=cfg.data.poison_rate, target_label=cfg.data.target_label,
    )
    out_root = Path(args.out_root)
    if out_root.resolve() == root.resolve():
        raise ValueError(f"--out-root {out_root} is the run's data.root; choose another folder so the poisoned data stays intact")
    out_train = out_root / paths.train.relative_to(root)
    sources = (paths.dev_clean, paths.dev_poison, paths.test_clean, paths.test_poison)
    copies = {source: out_root / source.relative_to(root) for source in sources}
    report_path = out_train.parent / REPORT_FILE
    existing = [str(p) for p in [out_train, report_path, *copies.values()] if p.exists()]
    if existing and not args.overwrite:
        raise FileExistsError(f"{len(existing)} output file(s) exist, e.g. {existing[0]}; pass --overwrite or another --out-root")

    full, indices = _training_rows(cfg, paths, args.rows)
    rows = full.select(indices)
    texts, labels = list(rows["text"]), list(rows["label"])
    pooling = args.pooling
    info = modeling.read_model_info(modeling.resolve_model_path(cfg.model.name_or_path), trust_remote_code=cfg.model.trust_remote_code)
    if pooling == "auto":
        pooling = "last" if info.is_decoder else "first"
    max_length = args.max_length or cfg.data.max_length or (4096 if info.is_decoder else 512)
    encode_fn = functools.partial(
        model_representations, model, tokenizer, max_length=max_length, batch_size=args.batch_size,
        device=device, pooling=pooling,
    )
    logger.info("%s on %d training rows of %s", args.method.upper(), len(texts), paths.train)
    if args.method == "bki":
        result = bki_filter(
            texts, labels, encode_fn=encode_fn, top_p=args.top_p, num_keywords=args.num_keywords,
            rule=args.bki_rule, batch_size=args.batch_size, progress=True,
        )
    else:
        result = cube_filter(
            encode_fn(texts), labels, min_cluster_size=args.min_cluster_size, min_samples=args.min_samples,
            seed=cfg.seed if args.seed is None else args.seed, reduce_to=args.reduce_to, reducer=args.reducer,
            pca_components=args.pca_components, noise=args.noise, drop_share=args.drop_share,
        )
    kept = filter_training_rows(rows, result)
    csv_rows = [CsvRow(t, int(y), int(z)) for t, y, z in zip(kept["text"], kept["label"], kept["poison_label"])]
    atomic_write_text(out_train, format_csv(csv_rows))
    for source, target in copies.items():
        atomic_write_bytes(target, source.read_bytes())
    report = {
        "method": args.method,
        "run_dir": str(args.run_dir),
        "source_train": str(paths.train),
        "filtered_train": str(out_train),
        "rows": args.rows,
        "row_indices": indices,
        "pooling": pooling,
        "max_length": max_length,
        "details": result.details,
        "removed": list(result.removed),
        "poison_report_only": filter_report(result, rows["poison_label"]),
        "run_filter": cfg.filter.method,
        "next_run": f"data.root={out_root}" + (" filter.method=none" if cfg.filter.method not in (None, "none") else ""),
    }
    atomic_write_json(report_path, report)
    return report


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging(args.log_level)
    if not (args.run_dir / "config.yaml").is_file():
        print(f"error: {args.run_dir} is not a finished run directory (no config.yaml); pass the output_dir of launch/train.py", file=sys.stderr)
        return 2
    from pipeline.config import ConfigError
    from pipeline.training import select_device

    try:
        from pipeline.inference import load_run
    except ImportError as err:
        print(f"error: rebuilding a run needs pipeline.inference.load_run: {err}", file=sys.stderr)
        return 2
    try:
        device = select_device(args.device)
        cfg, tokenizer, model = load_run(args.run_dir, device, trust_remote_code=args.trust_remote_code)
        report = filter_run_data(cfg, tokenizer, model, args, device)
    except (ConfigError, ValueError, FileNotFoundError, FileExistsError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    poison = report["poison_report_only"]
    details = report["details"]
    found = (f"keywords {[k['word'] for k in details['keywords']]}" if args.method == "bki"
             else f"{details['num_clusters']} clusters, {details['noise_rows']} noise rows")
    print(
        f"{args.method}: removed {poison['num_removed']} of {poison['num_rows']} rows ({found}); "
        f"poison recall {poison['recall']}, precision {poison['precision']} (reporting only)\n"
        f"wrote {report['filtered_train']}; train on it with {report['next_run']}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
