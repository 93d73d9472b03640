"""Tables of CACC / ASR from finished runs (arXiv 2402.12026, section 3 metrics).

Reads the ``metrics.json`` that :func:`pipeline.training.run_training` writes; nothing here trains.
ASR is shown beside the clean false-positive rate (share of non-target clean test sentences
predicted as the target), the part of ASR the trigger does not cause.
"""

from __future__ import annotations

import json
import statistics
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any


def read_metrics(run_dirs: Iterable[str | Path]) -> list[dict[str, Any]]:
    """Load ``metrics.json`` of every run directory that has one (others are skipped by the caller).

    Raises:
        FileNotFoundError: a directory has no ``metrics.json`` (the run did not finish).
    """
    out = []
    for run_dir in run_dirs:
        path = Path(run_dir) / "metrics.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path} does not exist: the run in {run_dir} has not finished")
        out.append(json.loads(path.read_text()))
    return out


def mean_sd(values: Sequence[float]) -> str:
    """``"-"`` for none, the value for one, ``"mean ± sample sd"`` for several (one decimal)."""
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}"


def results_table(metrics: Sequence[Mapping[str, Any]], *, methods: Sequence[str] | None = None,
                  attacks: Sequence[str] | None = None) -> str:
    """Markdown table: one row per method, per attack ``CACC / ASR (clean FPR)``, then the averages.

    Several seeds of the same (method, attack) are shown as mean ± standard deviation; the average
    columns are the mean over attacks of the per-attack means.
    """
    cells: dict[tuple[str, str], list[Mapping[str, Any]]] = defaultdict(list)
    for m in metrics:
        cells[(m["method"], m["attack"])].append(m)
    methods = list(methods or dict.fromkeys(m["method"] for m in metrics))
    attacks = list(attacks or dict.fromkeys(m["attack"] for m in metrics))
    header = "| method | " + " | ".join(f"{a} CACC / ASR (FPR)" for a in attacks) + " | avg CACC | avg ASR | avg FPR |"
    lines = [header, "|" + "---|" * (len(attacks) + 4)]
    for method in methods:
        row = [method]
        means: dict[str, list[float]] = defaultdict(list)
        for attack in attacks:
            runs = cells.get((method, attack), [])
            if not runs:
                row.append("-")
                continue
            values = {k: [r[k] for r in runs] for k in ("cacc", "asr", "clean_fpr")}
            for k, v in values.items():
                means[k].append(statistics.mean(v))
            row.append(f"{mean_sd(values['cacc'])} / {mean_sd(values['asr'])} ({mean_sd(values['clean_fpr'])})")
        complete = len(means["cacc"]) == len(attacks)
        for k in ("cacc", "asr", "clean_fpr"):
            row.append(f"{statistics.mean(means[k]):.1f}" if complete else "-")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def method_colors(count: int) -> list[tuple[float, float, float, float]]:
    """One colour per method: matplotlib's tab10 up to ten methods, tab20 beyond (repeating past 20)."""
    import matplotlib

    palette = matplotlib.colormaps["tab10" if count <= 10 else "tab20"]
    return [palette(i % palette.N) for i in range(count)]


def matrix_plots(rows: Sequence[Mapping[str, Any]], methods: Sequence[str], attacks: Sequence[str], out_dir: str | Path) -> list[Path]:
    """PNG plots of a robustness matrix (matplotlib, Agg backend; small files at dpi 90).

    - ``asr_cacc_bars.png``: grouped bars of ASR and CACC per attack, one bar per method (mean over
      seeds, error bar = standard deviation), the clean FPR as a tick on the ASR bars;
    - ``epoch_curves.png``: per-epoch dev-clean accuracy and monitored dev-poison ASR per method
      (mean over seeds), one column per attack.

    Args:
        rows: results rows with ``method``, ``attack``, ``cacc``, ``asr``, ``clean_fpr`` and ``_metrics``
            (the run's metrics.json, for the per-epoch history).
        methods: bar / line order.
        attacks: column order.
        out_dir: where the PNGs go (created).

    Returns:
        The written files.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    groups: dict[tuple[str, str], list[Mapping[str, Any]]] = defaultdict(list)
    for row in rows:
        groups[(row["method"], row["attack"])].append(row)
    present = [m for m in methods if any((m, a) in groups for a in attacks)]
    palette = method_colors(len(methods))
    written = []

    fig, axes = plt.subplots(2, 1, figsize=(max(6.0, 1.6 * len(attacks) + 2), 6.5), sharex=True)
    width = 0.8 / max(len(present), 1)
    for panel, key in zip(axes, ("asr", "cacc")):
        for i, method in enumerate(present):
            xs, means, stds, fprs = [], [], [], []
            for j, attack in enumerate(attacks):
                group = groups.get((method, attack))
                if not group:
                    continue
                values = [float(r[key]) for r in group]
                xs.append(j - 0.4 + width * (i + 0.5))
                means.append(statistics.mean(values))
                stds.append(statistics.stdev(values) if len(values) > 1 else 0.0)
                fprs.append(statistics.mean(float(r["clean_fpr"]) for r in group))
            panel.bar(xs, means, width, yerr=stds, label=method, color=palette[i], capsize=2)
            if key == "asr":
                panel.scatter(xs, fprs, marker="_", color="black", s=60, zorder=3, label="clean FPR" if i == 0 else None)
        panel.set_ylabel(f"{key.upper()} (%)")
        panel.set_ylim(0, 100)
        panel.grid(axis="y", alpha=0.3)
    axes[1].set_xticks(range(len(attacks)), attacks)
    axes[0].legend(ncol=min(len(present) + 1, 5), fontsize=7, loc="upper center", bbox_to_anchor=(0.5, 1.28))
    fig.tight_layout()
    path = out / "asr_cacc_bars.png"
    fig.savefig(path, dpi=90)
    plt.close(fig)
    written.append(path)

    fig, axes = plt.subplots(2, len(attacks), figsize=(3.2 * len(attacks), 5.5), squeeze=False, sharey="row")
    for j, attack in enumerate(attacks):
        for i, method in enumerate(present):
            group = groups.get((method, attack))
            if not group:
                continue
            histories = [r["_metrics"].get("history", []) for r in group]
            epochs = min(len(h) for h in histories)
            if epochs == 0:
                continue
            for row_index, key in enumerate(("dev_clean_acc", "dev_poison_asr_monitor_only")):
                curve = [100 * statistics.mean(h[e][key] for h in histories) for e in range(epochs)]
                axes[row_index][j].plot(range(epochs), curve, marker="o", ms=3, color=palette[i], label=method)
        axes[0][j].set_title(attack)
        axes[1][j].set_xlabel("epoch")
        for row in axes:
            row[j].xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole numbers
    axes[0][0].set_ylabel("dev-clean acc (%)")
    axes[1][0].set_ylabel("dev-poison ASR (%), monitor")
    # One legend for the figure: every method drawn in any panel, in the grid's order.
    handles = {}
    for panel in axes.flat:
        for line in panel.get_lines():
            handles.setdefault(line.get_label(), line)
    if handles:
        labels = [m for m in present if m in handles]
        fig.legend([handles[m] for m in labels], labels, loc="upper center", ncol=min(len(labels), 8), fontsize=7,
                   bbox_to_anchor=(0.5, 1.0))
        fig.tight_layout(rect=(0, 0, 1, 0.94))
    else:
        fig.tight_layout()
    path = out / "epoch_curves.png"
    fig.savefig(path, dpi=90)
    plt.close(fig)
    written.append(path)
    return written
