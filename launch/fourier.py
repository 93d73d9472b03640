"""Plot the frequency analysis of a run (REFERENCE.md section 5) from RUN_DIR/frequency.json.

    python launch/fourier.py RUN_DIR                        # mean over the sigma grid
    python launch/fourier.py RUN_DIR --sigma-index 8        # one kernel width (index into the grid)
    python launch/fourier.py RUN_DIR --metric absolute      # mean ||h_c - y_c|| instead of relative

Writes into --out (default RUN_DIR/fourier):

    frequency_curves.png   e_low and e_high of the clean (dev-clean) and backdoor (dev-poison)
                           mappings over optimiser steps
    frequency_heatmap.png  rows backdoor-low, clean-low, backdoor-high, clean-high over steps

The run must have been trained with the analysis enabled (analysis.frequency_every_steps=5). Where
a relative error is undefined (dev-poison's labels are all the target class, so its targets have no
high-frequency part) the curve has a gap and the heat-map cell is grey; --metric absolute is always
defined.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
for _path in (REPO, REPO / "kernels"):  # run from a checkout without installing (kernels/ holds mslr_kernels)
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from pipeline.frequency import frequency_series, read_frequency_file  # noqa: E402

HEATMAP_ROWS = ("backdoor-low", "clean-low", "backdoor-high", "clean-high")
STYLES = {
    "clean-low": ("tab:blue", "-"),
    "clean-high": ("tab:blue", "--"),
    "backdoor-low": ("tab:red", "-"),
    "backdoor-high": ("tab:red", "--"),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path, help="run output directory holding frequency.json")
    parser.add_argument("--out", type=Path, default=None, help="output folder for the PNGs (default: RUN_DIR/fourier)")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--sigma-index", type=int, default=None, help="plot one kernel width: index into the sigma grid")
    which.add_argument("--mean", action="store_true", help="average over the sigma grid (the default)")
    parser.add_argument("--metric", choices=["relative", "absolute"], default="relative",
                        help="relative: e_low / e_high (REFERENCE.md); absolute: mean ||h_c - y_c||")
    parser.add_argument("--dpi", type=int, default=110, help="resolution of the PNGs")
    return parser.parse_args(argv)


def _describe(doc: dict, sigma_index: int | None, metric: str) -> str:
    sigmas = doc["sigmas"]
    width = (f"sigma={sigmas[sigma_index]:g}" if sigma_index is not None
             else f"mean over {len(sigmas)} sigmas in [{min(sigmas):g}, {max(sigmas):g}]")
    return f"{metric} error, {doc['kernel']} kernel, {width}"


def plot_curves(steps: list[int], series: dict, title: str, path: Path, *, metric: str, dpi: int) -> None:
    """e_low / e_high of each mapping over steps, one panel per band."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4), sharex=True)
    for axis, band in zip(axes, ("low", "high")):
        for name in (f"backdoor-{band}", f"clean-{band}"):
            if name not in series:
                continue
            values = [float("nan") if v is None else v for v in series[name]]
            color, line = STYLES[name]
            label = name.split("-")[0] + (" (undefined)" if all(v is None for v in series[name]) else "")
            axis.plot(steps, values, color=color, linestyle=line, marker=".", markersize=3, label=label)
        axis.set_title(f"{band} frequency")
        axis.set_xlabel("optimiser step")
        axis.set_ylabel(("e_" if metric == "relative" else "abs. error ") + band)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)


def plot_heatmap(steps: list[int], series: dict, title: str, path: Path, *, dpi: int) -> None:
    """Rows backdoor-low, clean-low, backdoor-high, clean-high; columns optimiser steps."""
    import matplotlib.pyplot as plt
    import numpy as np

    rows = [r for r in HEATMAP_ROWS if r in series]
    grid = np.ma.masked_invalid(
        np.array([[np.nan if v is None else v for v in series[r]] for r in rows], dtype=float)
    )
    fig, axis = plt.subplots(figsize=(9, 2.6))
    cmap = plt.get_cmap("viridis").with_extremes(bad="lightgrey")
    image = axis.imshow(grid, aspect="auto", cmap=cmap, interpolation="nearest")
    axis.set_yticks(range(len(rows)), labels=rows)
    ticks = np.unique(np.linspace(0, len(steps) - 1, num=min(len(steps), 10)).round().astype(int))
    axis.set_xticks(ticks, labels=[str(steps[t]) for t in ticks])
    axis.set_xlabel("optimiser step")
    fig.colorbar(image, ax=axis, fraction=0.03, pad=0.02)
    axis.set_title(title + ("  (grey: undefined)" if grid.mask.any() else ""), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        doc = read_frequency_file(args.run_dir)
        steps, series = frequency_series(doc, metric=args.metric, sigma_index=args.sigma_index)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if not steps:
        print(f"error: {args.run_dir}/frequency.json has no records yet", file=sys.stderr)
        return 2
    import matplotlib

    matplotlib.use("Agg")
    out = args.out or args.run_dir / "fourier"
    out.mkdir(parents=True, exist_ok=True)
    title = _describe(doc, args.sigma_index, args.metric)
    curves, heatmap = out / "frequency_curves.png", out / "frequency_heatmap.png"
    plot_curves(steps, series, title, curves, metric=args.metric, dpi=args.dpi)
    plot_heatmap(steps, series, title, heatmap, dpi=args.dpi)
    print(f"wrote {curves} and {heatmap}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
