"""Print a markdown CACC / ASR table from finished run directories.

    python launch/summarize.py runs/results/*/            # every run under a folder
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
for _path in (REPO, REPO / "kernels"):  # run from a checkout without installing (kernels/ holds mslr_kernels)
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from pipeline.report import read_metrics, results_table  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dirs", nargs="+", type=Path, help="run output directories (each with metrics.json)")
    parser.add_argument("--methods", nargs="*", help="row order (default: order of appearance)")
    parser.add_argument("--attacks", nargs="*", help="column order (default: order of appearance)")
    parser.add_argument("--skip-unfinished", action="store_true", help="ignore directories without metrics.json")
    args = parser.parse_args(argv)
    dirs = [d for d in args.run_dirs if not args.skip_unfinished or (d / "metrics.json").is_file()]
    try:
        metrics = read_metrics(dirs)
    except FileNotFoundError as err:
        print(f"error: {err} (pass --skip-unfinished to ignore it)", file=sys.stderr)
        return 2
    sys.stdout.write(results_table(metrics, methods=args.methods, attacks=args.attacks))
    return 0


if __name__ == "__main__":
    sys.exit(main())
