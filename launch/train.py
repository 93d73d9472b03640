"""Train a classifier on a possibly backdoor-poisoned dataset with MuScleLoRA or an ablation.

    python launch/train.py                                   # the demo (launch/configs/demo.yaml)
    python launch/train.py --config FILE key=value ...       # any other run
    python launch/train.py --config FILE --print-config      # show the resolved config and exit
    python launch/train.py --config FILE --plan [--world-size 8 --deepspeed ds_configs/zero3.json]
                                                             # estimated peak memory per device, no training

Data parallel (only rank 0 writes files, logs and shows progress):

    deepspeed --num_gpus 2 launch/train.py --deepspeed ds_configs/zero2.json --config FILE ...
    torchrun --nproc_per_node 2 launch/train.py --config FILE ...          # torch DDP
    torchrun --nproc_per_node 2 launch/train.py --deepspeed ds_configs/zero3.json --config FILE ...
    accelerate launch --config_file launch/configs/accelerate_zero2.yaml launch/train.py --config FILE ...

On CPU ranks set OMP_NUM_THREADS (or train.num_threads) so ranks do not oversubscribe the cores.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
for _path in (REPO, REPO / "kernels"):  # run from a checkout without installing (kernels/ holds mslr_kernels)
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from launch._cli import positive_int, setup_logging  # noqa: E402
from pipeline.config import ConfigError, config_to_dict, describe_keys, load_config  # noqa: E402

DEMO_CONFIG = REPO / "launch" / "configs" / "demo.yaml"


def _keys_help() -> str:
    rows = describe_keys()
    width = max(len(key) for key, *_ in rows)
    lines = ["configuration keys (set in the YAML file or as key=value overrides):", ""]
    for key, type_name, default, text in rows:
        lines.append(f"  {key:<{width}}  {type_name} = {default}")
        lines.append(f"  {'':<{width}}    {text}")
    lines.append("")
    lines.append("'auto' (null) values are filled from the authors' settings for the backbone family.")
    return "\n".join(lines)


def _accelerate_deepspeed_config() -> Path | None:
    """The DeepSpeed JSON named by an ``accelerate launch`` DeepSpeed plugin config, if any.

    ``accelerate launch`` exports its plugin settings as ``ACCELERATE_DEEPSPEED_*`` variables; the
    pipeline drives the DeepSpeed engine itself, so it takes the plugin's ``deepspeed_config_file``.
    """
    path = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
    if not path or path == "none":
        raise ConfigError([
            "accelerate launch with a DeepSpeed plugin: set deepspeed_config_file in the accelerate config "
            "(e.g. ds_configs/zero2.json; see launch/configs/accelerate_zero2.yaml) or pass --deepspeed"
        ])
    return Path(path)


def _quiet_library_progress_bars() -> None:
    """On ranks other than 0: no model-loading or tokenisation progress bars (rank 0 draws them once)."""
    import datasets
    from transformers.utils import logging as hf_logging

    datasets.disable_progress_bars()
    hf_logging.disable_progress_bar()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__,
        epilog=_keys_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", type=Path, default=None, help=f"YAML run config (default: {DEMO_CONFIG.relative_to(REPO)})")
    parser.add_argument("--print-config", action="store_true", help="print the config (before per-family defaults) and exit")
    parser.add_argument("--deepspeed", type=Path, default=None, metavar="JSON",
                        help="train through a DeepSpeed engine with this config (presets: ds_configs/*.json); batch size, "
                             "accumulation, clipping, lr and optimizer come from the run config")
    plan = parser.add_argument_group("memory plan without training (reads config.json and the data; no weights, no files)")
    plan.add_argument("--plan", action="store_true", help="print the estimated peak memory per device and exit")
    plan.add_argument("--world-size", type=positive_int, default=1, help="--plan: ranks the job would run on")
    plan.add_argument("--seq-len", type=positive_int, default=None,
                      help="--plan: tokens per row (default: the longest tokenised training/reference row)")
    plan.add_argument("--plan-device", choices=["cuda", "cpu"], default=None,
                      help="--plan: device of the job (default: train.device; auto = this machine's)")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # set by the deepspeed launcher
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                        help="log level on rank 0 (other ranks log warnings and errors only)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. train.lr=1e-4 data.attack=addsent")
    return parser.parse_intermixed_args(argv)  # options may follow key=value overrides


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    level = args.log_level if os.environ.get("RANK", "0") == "0" else "WARNING"
    setup_logging(level)
    try:
        cfg = load_config(args.config or DEMO_CONFIG, args.overrides)
        if args.deepspeed is None and os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true":
            args.deepspeed = _accelerate_deepspeed_config()
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.print_config:
        print(json.dumps(config_to_dict(cfg), indent=2))
        return 0

    if args.plan:
        from pipeline.training import plan_run

        try:
            estimate = plan_run(cfg, deepspeed_config=args.deepspeed, world_size=args.world_size, seq_len=args.seq_len,
                                device_type=args.plan_device)
        except (ConfigError, FileNotFoundError, ValueError, RuntimeError) as err:
            logging.getLogger("launch.train").error("%s: %s", type(err).__name__, err)
            return 1
        print(estimate.describe())
        if not estimate.inputs.get("gradient_checkpointing"):
            from pipeline import memory

            checkpointed = memory.estimate_peak_memory(**{**estimate.inputs, "gradient_checkpointing": True})
            print(f"  with model.gradient_checkpointing=true: {checkpointed.total / 2**20:.1f} MiB "
                  f"(activations {checkpointed.activations / 2**20:.1f} MiB, about 30% more compute)")
        return 0

    from pipeline.training import run_training  # heavy imports only when training

    if os.environ.get("RANK", "0") != "0":
        _quiet_library_progress_bars()

    try:
        metrics = run_training(cfg, deepspeed_config=args.deepspeed)
    except (ConfigError, FileNotFoundError, ValueError, RuntimeError) as err:
        logging.getLogger("launch.train").error("%s: %s", type(err).__name__, err)
        return 1
    if os.environ.get("RANK", "0") != "0":
        return 0
    recipe = f" recipe={metrics['recipe']}" if metrics.get("recipe") else ""
    print(
        f"\nmethod={metrics['method']}{recipe} attack={metrics['attack']} model={metrics['model']}\n"
        f"CACC {metrics['cacc']:.2f}%   ASR {metrics['asr']:.2f}%   "
        f"(clean false-positive rate {metrics['clean_fpr']:.2f}%: the trigger adds "
        f"{metrics['asr'] - metrics['clean_fpr']:.1f} points; best epoch {metrics['best_epoch']})\n"
        f"outputs: {Path(cfg.output_dir).resolve()}  (metrics.json, log.jsonl, train.log, adapter/)"
    )
    if metrics.get("recipe") == "defended":
        used = metrics["config"]  # the resolved settings
        raw = used["align"].get("raw_share") or 0
        raw_part = f"a raw-gradient share of {raw:g}" if raw else "never the raw gradient"
        print(f"defence (recipe=defended, docs/RECIPE.md): training rows filtered by filter.method={used['filter']['method']}, "
              f"then every update aligned to the gradient of {used['data']['ref_size']} trusted dev-clean rows "
              f"({metrics['reference_batch_size']} per step; {raw_part}); "
              "recipe=authors runs the paper's settings")
    elif metrics.get("recipe") == "authors":
        print("defence (recipe=authors): the paper's settings; recipe=defended (the default) is issue 11's recipe, "
              "which removes more of the backdoor at this budget (docs/RECIPE.md)")
    for line in filter_lines(metrics):
        print(line)
    shortcut = metrics.get("shortcut") or {}
    if shortcut.get("expert", "none") != "none":
        from pipeline.defenses.shortcut import summary_line

        print(f"{summary_line(shortcut)}; trained through the product of experts (weight {shortcut['weight']:g})")
    canary = metrics.get("canary", {})
    if canary.get("enabled"):
        screen = canary.get("screen") or {}
        if "candidate" in screen:
            tried = ", ".join(f"{v:+.1f}" for v in screen["shifts"])
            print(f"canary screen: trigger candidate {screen['candidate']} planted ({'within' if screen['passed'] else 'NONE within'} "
                  f"the {screen['max_shift']:.0f}-point limit; the backbone's probe shift per candidate tried: {tried} points)")
        print(canary["message"])
        if not canary["selected_epoch_qualified"]:
            print(f"WARNING: {metrics['selection_rule']}")
    else:
        print("canary: off (canary.enabled=false); the run cannot say whether the defence held")
    return 0


def filter_lines(metrics: dict[str, Any]) -> list[str]:
    """What the training-row filter did, for the end-of-run printout (empty without a filter).

    When a musclelora run's filter removed rows (it found an inserted trigger), one more line names the measured
    alternative: the kept rows trained undefended (docs/RECIPE.md, "The adaptive two-run workflow").
    """
    filtered = metrics.get("filter") or {}
    lines = teacher_lines(filtered.get("teacher"))
    if filtered.get("method", "none") == "none":
        return lines
    flagged = ", ".join(repr(f["feature"]) for f in filtered["flagged"][:6]) or "none"
    more = f" and {len(filtered['flagged']) - 6} more" if len(filtered["flagged"]) > 6 else ""
    lines.insert(0, f"filter {filtered['method']}: removed {filtered['rows_removed']} of {filtered['rows_before']} training rows "
                    f"(threshold z {filtered['threshold']:.2f}; flagged n-grams: {flagged}{more}; see filter-report.json)")
    if filtered["rows_removed"] and metrics.get("method") == "musclelora":
        lines.append(
            "  the filter found an inserted trigger: the kept rows trained undefended (add method=vanilla "
            f"filter.method={filtered['method']} canary.select=false and a new output_dir) reached vanilla's clean accuracy "
            "with the trigger's rows gone on SST-2, but nothing then resists a trigger the filter missed (its canary "
            "fails): docs/RECIPE.md, \"The adaptive two-run workflow\""
        )
    return lines


def teacher_lines(block: dict[str, Any] | None) -> list[str]:
    """What ``filter.teacher`` did, for the end-of-run printout (empty without a teacher)."""
    if not block:
        return []
    from pipeline.defenses.teacher import summary  # torch and datasets: only after a run

    return [summary(block)]


if __name__ == "__main__":
    sys.exit(main())
