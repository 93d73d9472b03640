"""Re-evaluate a finished training run: CACC, ASR, clean FPR, per-class accuracy, confusion matrix.

    python launch/evaluate.py RUN_DIR                        # the run's test split: reproduces metrics.json
    python launch/evaluate.py RUN_DIR --split dev            # dev-clean selection rows / dev-poison
    python launch/evaluate.py RUN_DIR --split test --split dev --out eval.json
    python launch/evaluate.py RUN_DIR --attack addsent       # the same model against another attack
    python launch/evaluate.py RUN_DIR --dataset sst-2 --data-root ../shared/data/poison_data --max-eval-samples all

RUN_DIR is the output_dir of a finished launch/train.py run (config.yaml, adapter/, metrics.json). The
model is rebuilt from config.yaml and the saved adapter (or, for full fine-tuning, the whole saved
model). By default every split is subsampled, tokenised and batched as in the run, so the test CACC
and ASR equal those in its metrics.json. The target label is always the run's.

Prints the results as JSON on stdout (logs go to stderr). Exit status: 0 done, 2 bad arguments, an
unfinished or unusable run directory, or missing data.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
for _path in (REPO, REPO / "kernels"):  # run from a checkout without installing (kernels/ holds mslr_kernels)
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from launch._cli import emit_json, positive_int, sample_count, setup_logging  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="output_dir of a finished launch/train.py run")
    parser.add_argument("--split", action="append", choices=["test", "dev"], default=None, dest="splits",
                        help="split pair to evaluate, repeatable: test = test-clean/test-poison (default), "
                             "dev = dev-clean minus the run's reference rows / dev-poison")
    parser.add_argument("--dataset", default=None, help="dataset folder under the data root (default: the run's)")
    parser.add_argument("--attack", default=None, help="attack folder, e.g. addsent (default: the run's)")
    parser.add_argument("--data-root", type=Path, default=None,
                        help="poison_data folder (default: the run's data.root, relative to the current directory)")
    parser.add_argument("--max-eval-samples", type=sample_count, default=None, metavar="N|all",
                        help="rows per split, a seeded subset as in training (default: the run's data.max_eval_samples)")
    parser.add_argument("--device", default="auto", help="auto (default), cpu, cuda or cuda:N")
    parser.add_argument("--batch-size", type=positive_int, default=None,
                        help="evaluation batch size (default: the run's train.eval_batch_size; another value may "
                             "change predictions by rounding)")
    parser.add_argument("--out", type=Path, default=None, metavar="FILE", help="also write the JSON to FILE (atomically)")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="allow a run whose config.yaml sets model.trust_remote_code: true to run the model's own "
                             "Python code (refused by default: a run folder is data)")
    parser.add_argument("--log-level", default="WARNING", choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                        help="log level on stderr (default: WARNING)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging(args.log_level)

    from pipeline.config import ConfigError
    from pipeline.data import DataError
    from pipeline.inference import EvaluationError, evaluate_run

    try:
        result = evaluate_run(
            args.run_dir,
            data_root=args.data_root,
            dataset=args.dataset,
            attack=args.attack,
            splits=tuple(args.splits or ("test",)),
            max_eval_samples=args.max_eval_samples,
            device=args.device,
            batch_size=args.batch_size,
            progress=sys.stderr.isatty(),
            trust_remote_code=args.trust_remote_code,
        )
    except (EvaluationError, DataError, ConfigError, FileNotFoundError, ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return emit_json(result, args.out)


if __name__ == "__main__":
    sys.exit(main())
