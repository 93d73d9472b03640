"""Evaluate a finished run's classifier under an inference-time backdoor defence: STRIP, ONION or RAP.

    python launch/defend.py RUN_DIR --defense strip                          # authors' settings
    python launch/defend.py RUN_DIR --defense strip --num-perturbations 100 --calibration normal
    python launch/defend.py RUN_DIR --defense onion --lm /models/gpt2        # threshold 0
    python launch/defend.py RUN_DIR --defense onion --lm /models/gpt2 --threshold auto --out onion.json
    python launch/defend.py RUN_DIR --defense onion --lm smollm2 --threshold auto   # the embedded SmolLM2
    python launch/defend.py RUN_DIR --defense onion --lm smollm2 --threshold auto --lm-cache ~/.cache/onion
    python launch/defend.py RUN_DIR --defense rap                            # RAP, paper's settings

RUN_DIR is the output_dir of a finished launch/train.py run (typically method=vanilla, the undefended
baseline); the model is rebuilt with pipeline.inference.load_run. The defence is measured on the run's
test-clean / test-poison, subsampled and tokenised as in the run (--max-eval-samples all for every row).
What the defender may look at is the run's dev-clean (its reference and selection rows): STRIP
calibrates its entropy threshold and draws its donor words there, ONION --threshold auto picks its
threshold there, RAP trains its perturbation word and sets its threshold on the label-t rows there.
Test data is never used for any of them.

STRIP (pipeline/defenses/strip.py; binary tasks): CACC / ASR count a flagged input as the MuScleLoRA
authors do (--counting flip: the other class than predicted) or as refused (--counting reject: a
clean one is an error, a poison one no attack success); both are in "by_counting". ONION
(pipeline/defenses/onion.py) needs a local causal language model (--lm, e.g. GPT-2, or smollm2);
--lm-cache DIR keeps every scored sentence's perplexity on disk, so runs sharing test-clean and
dev-clean (the attacks of one dataset) score those sentences once (threshold selection and evaluation).
RAP (pipeline/defenses/rap.py; binary tasks) counts flagged inputs as STRIP does.

Prints JSON on stdout (logs on stderr): the run's identity, the defence's settings, CACC, ASR, clean
FPR and ASR - clean FPR with and without the defence (percent, as in metrics.json), and the
defence's statistics (STRIP: entropy threshold in bits, realised dev-clean FRR and the TPR / FPR of
detection on test-poison / test-clean in percent, AUROC as a fraction; ONION: threshold, words
removed per sentence, share of sentences changed in percent, dev-clean accuracy per candidate
threshold in percent for --threshold auto). Exit status: 0 done, 2 bad arguments, an unusable run
directory, a missing language model or missing data.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
for _path in (REPO, REPO / "kernels"):  # run from a checkout without installing (kernels/ holds mslr_kernels)
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from launch._cli import (  # noqa: E402
    emit_json,
    fraction_up_to_one,
    open_fraction,
    positive_int,
    sample_count,
    setup_logging,
)

_METRIC_KEYS = ("cacc", "asr", "clean_fpr", "asr_minus_clean_fpr")
_DETECTION_KEYS = ("calibration_frr", "tpr", "fpr")
_ONION_KEYS = ("changed_clean", "changed_poison")


def _threshold(text: str) -> float | str:
    if text == "auto":
        return text
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, inf or auto, got {text!r}") from None
    if math.isnan(value):
        raise argparse.ArgumentTypeError("the threshold must not be nan")
    return value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="output_dir of a finished launch/train.py run")
    parser.add_argument("--defense", required=True, choices=["strip", "onion", "rap"], help="inference-time defence")
    parser.add_argument("--data-root", type=Path, default=None,
                        help="poison_data folder (default: the run's data.root, relative to the current directory)")
    parser.add_argument("--max-eval-samples", type=sample_count, default=None, metavar="N|all",
                        help="test rows per split, a seeded subset as in training (default: the run's data.max_eval_samples)")
    parser.add_argument("--held-out-samples", type=sample_count, default="all", metavar="N|all",
                        help="dev-clean selection rows the defender uses besides the reference rows (default: all)")
    parser.add_argument("--device", default="auto", help="auto (default), cpu, cuda or cuda:N")
    parser.add_argument("--batch-size", type=positive_int, default=None,
                        help="classifier batch size (default: the run's train.eval_batch_size)")
    parser.add_argument("--out", type=Path, default=None, metavar="FILE", help="also write the JSON to FILE (atomically)")
    parser.add_argument("--log-level", default="WARNING", choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                        help="log level on stderr (default: WARNING)")
    strip = parser.add_argument_group("STRIP (--frr, --counting also RAP)")
    strip.add_argument("--num-perturbations", type=positive_int, default=5,
                       help="perturbed copies per input (default: 5, the MuScleLoRA authors'; STRIP paper: 100)")
    strip.add_argument("--replace-ratio", type=fraction_up_to_one, default=0.25,
                       help="share of words replaced per copy, in (0, 1] (default: 0.25, the authors')")
    strip.add_argument("--frr", type=open_fraction, default=0.01,
                       help="false rejection rate on dev-clean that sets the threshold (default: 0.01)")
    strip.add_argument("--calibration", choices=["quantile", "normal"], default="quantile",
                       help="threshold rule: empirical quantile (default, OpenBackdoor) or normal fit (STRIP paper)")
    strip.add_argument("--counting", choices=["flip", "reject"], default="flip",
                       help="flagged inputs in CACC/ASR: flip (the authors') or reject (default: flip)")
    strip.add_argument("--seed", type=int, default=None, help="seed of the perturbations (default: the run's seed)")
    onion = parser.add_argument_group("ONION")
    onion.add_argument("--lm", type=Path, default=None,
                       help="local causal LM checkpoint directory, or smollm2 (the embedded SmolLM2; required for onion)")
    onion.add_argument("--threshold", type=_threshold, default=0.0, metavar="T|auto",
                       help="remove words with suspicion > T (default: 0, the authors'); auto: the smallest of "
                            "0..100 keeping dev-clean accuracy within --max-drop")
    onion.add_argument("--max-drop", type=open_fraction, default=0.02,
                       help="tolerated dev-clean accuracy drop for --threshold auto, a fraction (default: 0.02)")
    onion.add_argument("--lm-batch-size", type=positive_int, default=32, help="sequences per LM forward pass (default: 32)")
    onion.add_argument("--lm-max-length", type=positive_int, default=None,
                       help="LM truncation in tokens (default: the LM's position limit)")
    onion.add_argument("--lm-cache", type=lambda text: Path(text).expanduser(), default=None, metavar="DIR",
                       help="perplexity cache folder shared by runs and processes: sentences already scored by the "
                            "same LM (same weights, tokenizer, --lm-max-length, device type) are not scored again; "
                            "one <fingerprint>.json per LM (default: no cache)")
    rap = parser.add_argument_group("RAP")
    rap.add_argument("--rap-word", default="mb", help="the perturbation word inserted first (default: mb)")
    rap.add_argument("--rap-min-drop", type=open_fraction, default=0.1,
                     help="wanted lower bound of the clean target-probability drop (default: 0.1, the paper's)")
    rap.add_argument("--rap-max-drop", type=fraction_up_to_one, default=0.3,
                     help="wanted upper bound of that drop (default: 0.3, the paper's)")
    rap.add_argument("--rap-lr", type=float, default=1e-2, help="gradient-descent step on the word embedding (default: 0.01)")
    rap.add_argument("--rap-epochs", type=positive_int, default=5, help="passes over the held-out target-class rows (default: 5)")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="allow a run whose config.yaml sets model.trust_remote_code: true to run the model's own "
                             "Python code (refused by default: a run folder is data)")
    args = parser.parse_args(argv)
    if args.defense == "onion" and args.lm is None:
        parser.error("--defense onion needs --lm PATH, the directory of a local causal language model (e.g. GPT-2)")
    return args


def _percent(metrics: dict[str, Any], keys: tuple[str, ...]) -> dict[str, Any]:
    """A copy of ``metrics`` with the fractions under ``keys`` in percent (None stays None)."""
    return {key: (100 * value if key in keys and value is not None else value) for key, value in metrics.items()}


def report_in_percent(result: dict[str, Any]) -> dict[str, Any]:
    """Convert a strip_evaluate / onion_evaluate result's rates to percent, as metrics.json holds them."""
    out = _percent(result, _METRIC_KEYS + _ONION_KEYS)
    if isinstance(out.get("threshold"), float) and not math.isfinite(out["threshold"]):
        out["threshold"] = str(out["threshold"])  # JSON has no infinity
    out["undefended"] = _percent(result["undefended"], _METRIC_KEYS)
    if "by_counting" in result:
        out["by_counting"] = {rule: _percent(m, _METRIC_KEYS) for rule, m in result["by_counting"].items()}
    if "detection" in result:
        out["detection"] = _percent(result["detection"], _DETECTION_KEYS)
    return out


def defend_run(args: argparse.Namespace) -> dict[str, Any]:
    """Rebuild the run, load its data, and evaluate it under ``args.defense``.

    Returns:
        The JSON-serialisable report (rates in percent).
    """
    from pipeline import data as data_lib
    from pipeline.defenses.onion import (
        PerplexityCache,
        load_onion_lm,
        onion_evaluate,
        select_onion_threshold,
        suspicion_scores,
    )
    from pipeline.defenses.rap import rap_evaluate
    from pipeline.defenses.strip import model_predict_proba, strip_evaluate
    from pipeline.inference import load_run, resolve_device

    logger = logging.getLogger("launch.defend")
    device = resolve_device(args.device)
    cfg, tokenizer, model = load_run(args.run_dir, device, trust_remote_code=args.trust_remote_code)
    root = args.data_root if args.data_root is not None else Path(cfg.data.root)
    num_labels, target = cfg.model.num_labels, cfg.data.target_label
    count = cfg.data.max_eval_samples if args.max_eval_samples is None else (
        None if args.max_eval_samples == "all" else args.max_eval_samples
    )
    held_out_count = None if args.held_out_samples == "all" else args.held_out_samples
    paths = data_lib.split_paths(
        root, cfg.data.dataset, cfg.data.attack, setting=cfg.data.setting,
        poison_rate=cfg.data.poison_rate, target_label=target,
    )
    evaluation = data_lib.load_evaluation_data(paths, num_labels=num_labels, max_eval_samples=count, seed=cfg.seed)
    trusted = data_lib.load_training_data(
        paths, ref_size=cfg.data.ref_size or 0, seed=cfg.seed, num_labels=num_labels,
        max_train_samples=cfg.data.max_train_samples, max_eval_samples=held_out_count,
    )
    held_out_texts = list(trusted.reference["text"]) + list(trusted.selection["text"])
    held_out_labels = list(trusted.reference["label"]) + list(trusted.selection["label"])
    batch = args.batch_size or cfg.train.eval_batch_size
    progress = sys.stderr.isatty()
    predict_proba = model_predict_proba(
        model, tokenizer, max_length=cfg.data.max_length, batch_size=batch, device=device, progress=progress
    )
    clean_texts, clean_labels = list(evaluation.test_clean["text"]), list(evaluation.test_clean["label"])
    poison_texts = list(evaluation.test_poison["text"])
    settings: dict[str, Any] = {}
    if args.defense == "strip":
        result = strip_evaluate(
            predict_proba, clean_texts=clean_texts, clean_labels=clean_labels, poison_texts=poison_texts,
            target_label=target, calibration_texts=held_out_texts, donor_texts=held_out_texts,
            num_perturbations=args.num_perturbations, replace_ratio=args.replace_ratio, frr=args.frr,
            calibration=args.calibration, counting=args.counting, seed=cfg.seed if args.seed is None else args.seed,
        )
    elif args.defense == "rap":
        result = rap_evaluate(
            model, tokenizer, clean_texts=clean_texts, clean_labels=clean_labels, poison_texts=poison_texts,
            target_label=target, held_out_texts=held_out_texts, held_out_labels=held_out_labels,
            max_length=cfg.data.max_length, word=args.rap_word, min_drop=args.rap_min_drop,
            max_drop=args.rap_max_drop, lr=args.rap_lr, epochs=args.rap_epochs, frr=args.frr,
            counting=args.counting, batch_size=batch,
        )
    else:
        lm, lm_tokenizer = load_onion_lm(args.lm, device)
        lm_cache = None if args.lm_cache is None else PerplexityCache.for_lm(
            args.lm_cache, lm, lm_tokenizer, max_length=args.lm_max_length
        )
        lm_options = dict(
            batch_size=args.lm_batch_size, device=device, max_length=args.lm_max_length, progress=progress,
            cache=lm_cache,
        )
        threshold = args.threshold
        if threshold == "auto":
            scores = suspicion_scores(held_out_texts, lm, lm_tokenizer, **lm_options)
            threshold, table = select_onion_threshold(
                predict_proba, held_out_texts, held_out_labels, scores, max_drop=args.max_drop
            )
            rows = [_percent(row, ("accuracy",)) for row in table]
            settings["threshold_selection"] = {"max_drop": args.max_drop, "candidates": rows}
        result = onion_evaluate(
            predict_proba, clean_texts=clean_texts, clean_labels=clean_labels, poison_texts=poison_texts,
            target_label=target, lm=lm, tokenizer=lm_tokenizer, threshold=threshold, **lm_options,
        )
        settings.update(lm=str(args.lm), threshold_rule="auto" if args.threshold == "auto" else "fixed")
        if lm_cache is not None:
            settings["lm_cache"] = str(lm_cache.path)
    logger.info("%s on %s: CACC %.4f  ASR %.4f", args.defense, args.run_dir, result["cacc"], result["asr"])
    return {
        "run_dir": str(args.run_dir),
        "method": cfg.method,
        "model": cfg.model.name_or_path,
        "seed": cfg.seed,
        "device": str(device),
        "data_root": str(root),
        "dataset": cfg.data.dataset,
        "attack": cfg.data.attack,
        "target_label": target,
        "max_eval_samples": count,
        "max_length": cfg.data.max_length,
        "batch_size": batch,
        "files": {
            "test_clean": str(paths.test_clean), "test_poison": str(paths.test_poison), "held_out": str(paths.dev_clean)
        },
        "num_held_out": len(held_out_texts),
        **settings,
        **report_in_percent(result),
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging(args.log_level)

    from pipeline.config import ConfigError
    from pipeline.data import DataError
    from pipeline.inference import EvaluationError

    try:
        report = defend_run(args)
    except (EvaluationError, DataError, ConfigError, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return emit_json(report, args.out)


if __name__ == "__main__":
    sys.exit(main())
