"""Run a robustness matrix (methods x attacks x seeds x datasets x models) and write REPORT.md.

    python launch/matrix.py --config launch/configs/matrix_sst2_minilm.yaml
    python launch/matrix.py --config GRID --report-only      # rebuild results.csv / REPORT.md / plots
    python launch/matrix.py --config GRID --list             # cells and their state

Every cell's run config is validated before the first cell starts (--list marks bad ones "invalid").
A named variant's cells (grid key `variants:`) are listed with their launch/train.py `method=`.
Resumable: finished cells (metrics.json) are skipped, interrupted ones resume from their checkpoint.
Each cell is a separate launch/train.py process; its output goes to <output_root>/logs/.
Finished cells whose settings the grid or base config has changed since are refused (nothing runs)
until --rerun-changed moves them to <output_root>/replaced/ and reruns them.
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
from pipeline.config import ConfigError  # noqa: E402
from pipeline.matrix import cell_problems, cell_status, load_grid, run_grid, settings_changes, write_outputs  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, required=True, help="grid YAML (see pipeline/matrix.py)")
    parser.add_argument("--report-only", action="store_true", help="only rebuild results.csv, plots and REPORT.md")
    parser.add_argument("--list", action="store_true", help="print every cell with its state and exit")
    parser.add_argument("--max-cells", type=int, default=None, help="run at most this many cells, then stop")
    parser.add_argument("--rerun-changed", action="store_true",
                        help="rerun finished cells whose settings changed (their old results move to <output_root>/replaced/)")
    parser.add_argument("--jobs", type=int, default=1, help="cells run side by side (set train.num_threads = cores / jobs in the grid)")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    args = parser.parse_args(argv)
    setup_logging(args.log_level)
    try:
        grid = load_grid(args.config)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.list:
        invalid = 0
        for cell in grid.cells:
            problems = cell_problems(grid, cell)
            state = "invalid" if problems else cell_status(grid, cell)
            changes = f"  [changed: {'; '.join(settings_changes(grid, cell))}]" if state == "changed" else ""
            why = f"  [invalid: {'; '.join(problems)}]" if problems else ""
            variant = f"method={cell.train_method} " if cell.train_method and cell.source is None else ""
            print(f"{state:<10} {cell.key}  {variant}{' '.join(cell.overrides)}{changes}{why}")
            invalid += bool(problems)
        return 2 if invalid else 0
    if args.report_only:
        rows = write_outputs(grid)
        print(f"{len(rows)} finished cells -> {grid.output_root / 'REPORT.md'}")
        return 0
    try:
        counts = run_grid(grid, max_cells=args.max_cells, jobs=args.jobs, rerun_changed=args.rerun_changed)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"cells: {counts['ran']} ran, {counts['skipped']} already finished, {counts['failed']} failed, "
          f"{counts['waiting']} waiting for their source cell -> {grid.output_root / 'REPORT.md'}")
    return 1 if counts["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
