"""Build a data root whose training file is the CLEAN training set: the oracle control of issue 11.

    python benchmarks/clean_data_root.py --source-root ../shared/data/poison_data --out-root runs/clean_data_root
    python launch/train.py --config launch/configs/demo.yaml method=vanilla data.root=runs/clean_data_root

For every attack folder of ``--dataset`` / ``--target-label`` under ``--source-root``, the output mirrors the
poison_data layout with symbolic links (no data is copied): the dev and test files link to the attack's own
files (so CACC and ASR are measured on exactly the same rows as a poisoned run), and the training file that
``launch/train.py`` reads for that attack (``<setting>/<poison_rate>/train-poison.csv``, setting ``auto``
resolved as the loader does) links to the attack's ``train-clean.csv``: the same sentences without any
poisoned row. A model trained there is what a perfect filter would give; its "ASR minus clean FPR" is how
much the trigger moves a model that never saw it (the floor under any training-time defence's number). It
reads which file is clean from the folder layout, i.e. it uses knowledge a defender does not have: a control
for the report, never a defence or a selection signal.

Existing links that already point at the right file are kept; anything else at an output path stops the
script with the path and the fix (nothing is overwritten).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from pipeline.data import _SETTING_FOR_AUTO, _TRAIN_FILE  # noqa: E402

EVAL_FILES = ("dev-clean.csv", "dev-poison.csv", "test-clean.csv", "test-poison.csv")
CLEAN_TRAIN = "train-clean.csv"


def _link(target: Path, link: Path) -> None:
    """Create ``link`` -> ``target`` (absolute); keep an identical link; refuse anything else."""
    target = target.resolve()
    if link.is_symlink() or link.exists():
        if link.is_symlink() and Path(os.readlink(link)) == target:
            return
        raise SystemExit(f"error: {link} exists and is not a link to {target}. "
                         f"Fix: choose another --out-root or remove {link}")
    link.parent.mkdir(parents=True, exist_ok=True)
    tmp = link.with_name(link.name + ".tmp-link")
    if tmp.is_symlink():
        tmp.unlink()
    tmp.symlink_to(target)
    tmp.replace(link)  # atomic: the link appears whole or not at all


def build(source_root: Path, out_root: Path, dataset: str, target_label: int, attacks: list[str] | None,
          poison_rate: str = "0.1") -> list[Path]:
    """Write the mirror; return the training links made (one per attack)."""
    label_dir = source_root / dataset / str(target_label)
    if not label_dir.is_dir():
        raise SystemExit(f"error: {label_dir} is not a folder (--source-root / --dataset / --target-label). "
                         f"Fix: point --source-root at the poison_data folder")
    names = attacks or sorted(p.name for p in label_dir.iterdir() if (p / CLEAN_TRAIN).is_file())
    made = []
    for attack in names:
        src = label_dir / attack
        missing = [f for f in (*EVAL_FILES, CLEAN_TRAIN) if not (src / f).is_file()]
        if missing:
            raise SystemExit(f"error: {src} lacks {', '.join(missing)}. Fix: name attacks whose folder has "
                             f"{CLEAN_TRAIN} and the four evaluation files")
        dst = out_root / dataset / str(target_label) / attack
        for f in EVAL_FILES:
            _link(src / f, dst / f)
        setting = _SETTING_FOR_AUTO.get(attack, "mix")
        train = dst / setting / poison_rate / _TRAIN_FILE
        _link(src / CLEAN_TRAIN, train)
        made.append(train)
    return made


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source-root", type=Path, default=REPO.parent / "shared" / "data" / "poison_data",
                   help="the poison_data folder (default: ../shared/data/poison_data)")
    p.add_argument("--out-root", type=Path, required=True, help="where the mirror is written (e.g. runs/...)")
    p.add_argument("--dataset", default="sst-2")
    p.add_argument("--target-label", type=int, default=1)
    p.add_argument("--poison-rate", default="0.1", help="the data.poison_rate folder the runs will ask for")
    p.add_argument("--attacks", nargs="+", help="attack folders (default: every one with train-clean.csv)")
    args = p.parse_args(argv)
    for train in build(args.source_root, args.out_root, args.dataset, args.target_label, args.attacks,
                       args.poison_rate):
        print(f"{train} -> {train.resolve()}")


if __name__ == "__main__":
    main()
