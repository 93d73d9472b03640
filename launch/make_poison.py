"""Write a seeded backdoor-poisoned copy of a clean dataset in the poison_data layout.

    python launch/make_poison.py --source ../shared/data/poison_data/sst-2/1/badnets \\
        --out-root runs/poison_data --attack badnets --poison-rate 0.2 --seed 1
    python launch/make_poison.py --hf-dataset DIR_OR_NAME --text-column sentence \\
        --out-root runs/poison_data --dataset-name my-set --attack addsent --setting mix

The result, <out-root>/<dataset>/<target-label>/<attack>/, is read by launch/train.py with
data.root=<out-root> data.attack=<attack> data.setting=<setting> data.poison_rate=<rate>
(clean, dirty and mix folders alike).
StyleBkd / SynBkd need --paraphraser (a local seq2seq checkpoint folder); without one, train on the
published CSVs under poison_data/<dataset>/<target>/stylebkd|synbkd.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
for _path in (REPO, REPO / "kernels"):  # run from a checkout without installing (kernels/ holds mslr_kernels)
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from launch._cli import setup_logging  # noqa: E402
from pipeline.attacks import (  # noqa: E402
    ATTACKS,
    BADNETS_NUM_TRIGGERS,
    SETTINGS,
    generate_attack,
    load_datasets_source,
    load_paraphraser,
    source_from_poison_folder,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--source", type=Path, help="poison_data attack folder whose train-clean.csv, dev-clean.csv, test-clean.csv are the clean source")
    source.add_argument("--hf-dataset", help="`datasets` source: a save_to_disk folder, a local data folder or a hub name")
    parser.add_argument("--hf-config", default=None, help="configuration name for load_dataset (e.g. sst2 for glue)")
    parser.add_argument("--text-column", default="text", help="text column of --hf-dataset (default: text)")
    parser.add_argument("--label-column", default="label", help="integer label column of --hf-dataset (default: label)")
    parser.add_argument("--train-split", default="train", help="split of --hf-dataset used for training (default: train)")
    parser.add_argument("--dev-split", default="validation", help="split of --hf-dataset used as dev (default: validation)")
    parser.add_argument("--test-split", default="test", help="split of --hf-dataset used as test (default: test)")
    parser.add_argument("--num-labels", type=int, default=2, help="classes in the --source CSVs (default: 2)")
    parser.add_argument("--out-root", type=Path, required=True, help="root of the output poison_data tree")
    parser.add_argument("--dataset-name", default=None, help="dataset folder name (default: the --source dataset folder, or the last part of --hf-dataset)")
    parser.add_argument("--attack", required=True, choices=ATTACKS, help="trigger: badnets (rare words), addsent (sentence), stylebkd / synbkd (need --paraphraser)")
    parser.add_argument("--setting", choices=SETTINGS, default=None, help="clean: clean-label, only target-label rows; dirty: non-target rows relabelled; mix: any rows relabelled (default: clean for badnets, mix otherwise, as published)")
    parser.add_argument("--poison-rate", type=float, default=0.1, help="share r of training rows poisoned, round(r * N) rows (default: 0.1)")
    parser.add_argument("--target-label", type=int, default=1, help="label the trigger maps to (default: 1)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the row selection and the triggers (default: 0)")
    parser.add_argument("--num-triggers", type=int, default=BADNETS_NUM_TRIGGERS, help=f"BadNets insertions per sentence (default: {BADNETS_NUM_TRIGGERS})")
    parser.add_argument("--paraphraser", type=Path, default=None, help="local seq2seq checkpoint folder for stylebkd / synbkd")
    parser.add_argument("--paraphraser-prefix", default="", help="text put before each sentence for the paraphraser (e.g. 'paraphrase: ')")
    parser.add_argument("--overwrite", action="store_true", help="replace existing files of the attack folder that differ")
    parser.add_argument("--log-level", default="WARNING", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging(args.log_level)
    setting = args.setting or ("clean" if args.attack == "badnets" else "mix")
    try:
        if args.source is not None:
            source = source_from_poison_folder(args.source, num_labels=args.num_labels)
            dataset = args.dataset_name or args.source.resolve().parents[1].name
        else:
            source = load_datasets_source(
                args.hf_dataset,
                name=args.hf_config,
                text_column=args.text_column,
                label_column=args.label_column,
                train_split=args.train_split,
                dev_split=args.dev_split,
                test_split=args.test_split,
            )
            dataset = args.dataset_name or Path(args.hf_dataset.rstrip("/")).name
        paraphraser = None
        if args.paraphraser is not None:
            paraphraser = load_paraphraser(args.paraphraser, prefix=args.paraphraser_prefix)
        summary = generate_attack(
            source,
            out_root=args.out_root,
            dataset=dataset,
            attack=args.attack,
            setting=setting,
            poison_rate=args.poison_rate,
            target_label=args.target_label,
            seed=args.seed,
            num_triggers=args.num_triggers,
            paraphraser=paraphraser,
            overwrite=args.overwrite,
        )
    except (ValueError, FileNotFoundError, FileExistsError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(
        f"{args.attack} {setting} rate {args.poison_rate} seed {args.seed}: "
        f"{summary.num_poisoned}/{summary.num_train} training rows poisoned "
        f"(realised rate {summary.realised_rate:.4f}), dev-poison {summary.num_dev_poison}, "
        f"test-poison {summary.num_test_poison} rows -> {summary.train_path} "
        f"({len(summary.written)} files written)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
