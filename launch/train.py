"""Train a classifier on a possibly backdoor-poisoned dataset with MuScleLoRA or an ablation.

    python launch/train.py                                   # the demo (launch/configs/demo.yaml)
    python launch/train.py --config FILE key=value ...       # any other run
    python launch/train.py --config FILE --print-config      # show the resolved config and exit
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # allow running from a checkout without installing
    sys.path.insert(0, str(REPO))

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


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__,
        epilog=_keys_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", type=Path, default=None, help=f"YAML run config (default: {DEMO_CONFIG.relative_to(REPO)})")
    parser.add_argument("--print-config", action="store_true", help="print the config (before per-family defaults) and exit")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. train.lr=1e-4 data.attack=addsent")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    for noisy in ("httpx", "urllib3", "datasets", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        cfg = load_config(args.config or DEMO_CONFIG, args.overrides)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.print_config:
        print(json.dumps(config_to_dict(cfg), indent=2))
        return 0

    from pipeline.training import run_training  # heavy imports only when training

    try:
        metrics = run_training(cfg)
    except (ConfigError, FileNotFoundError, ValueError, RuntimeError) as err:
        logging.getLogger("launch.train").error("%s: %s", type(err).__name__, err)
        return 1
    print(
        f"\nmethod={metrics['method']} attack={metrics['attack']} model={metrics['model']}\n"
        f"CACC {metrics['cacc']:.2f}%   ASR {metrics['asr']:.2f}%   "
        f"(clean false-positive rate {metrics['clean_fpr']:.2f}%, best epoch {metrics['best_epoch']})\n"
        f"outputs: {Path(cfg.output_dir).resolve()}  (metrics.json, log.jsonl, train.log, adapter/)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
