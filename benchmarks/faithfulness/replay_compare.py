"""Replay the authors' recorded steps through this pipeline's training step and compare, step by step.

Reads the directory written by ``upstream_dump.py`` (initial weights, the training and reference
batches of every step, and the authors' per-step tensors), builds this pipeline's model through
``pipeline.training.build_model`` for ``launch/configs/sst2_minilm.yaml`` at the authors' settings,
loads the same initial weights (LoRA A/B, MSLR L/R, the frozen random classifier, the pooler's base),
and runs each step through the product's own code: ``batch_loss`` + ``Engine.backward`` for the task
gradient, then ``optimiser_step`` (reference gradient, ``align_gradients`` and its gate, clipping,
AdamW, linear schedule). The reference batch of each step is the authors' one (as a 32-row reference
set, so ``reference_indices`` can only permute it).

For every step and quantity (task gradient, reference gradient, aligned gradient handed to clipping,
parameters after the step) it prints the largest absolute difference over all trainable tensors and
the largest relative difference ``||ours - theirs|| / ||theirs||`` over tensors, plus the losses and
both gate decisions, and writes the table to ``--json``.

With a dump of whole epochs (``upstream_dump.py --steps 435``) it also evaluates this pipeline's model
at every epoch end on the authors' dev-clean (minus their reference rows) and dev-poison rows, to put
next to the accuracies the authors' trainer logs. It follows a dump that is still being written.

Run with this project's venv from the worktree root, see README.md here.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from safetensors.torch import load_file
from torch import nn

from pipeline import data as data_lib
from pipeline import distributed as dist
from pipeline import modeling
from pipeline import training
from pipeline.config import load_config, resolve_defaults


def ours_name(theirs: str) -> str:
    """The authors' parameter name -> this pipeline's name for the same tensor."""
    prefix = "base_model.model."
    if ".lora_A.lora." in theirs or ".lora_B.lora." in theirs:
        return prefix + theirs.replace(".lora.weight", ".default.weight")
    if theirs.endswith("pooler.dense.L"):
        return prefix + theirs[: -len("L")] + "lora_a"
    if theirs.endswith("pooler.dense.R"):
        return prefix + theirs[: -len("R")] + "lora_b"
    if ".oriLinear." in theirs:
        return prefix + theirs.replace(".oriLinear.", ".base_layer.")
    return prefix + theirs


def their_gate(meta: dict[str, Any], step: dict[str, Any], ref: dict[str, torch.Tensor], epoch: int) -> str:
    """The authors' gate, evaluated on their recorded reference gradient and loss (ga_trainer's condition)."""
    train = meta["config"]["attacker"]["train"]
    norms = [float(t.norm()) for t in ref.values() if float(t.norm()) > 0]
    mean_norm = sum(norms) / len(norms)
    if mean_norm > train["minRefGradNorm"] and step["ref_loss"] > train["minRefLoss"]:
        return "align"
    if train["maxRawGradRatio"] > 0 and epoch >= train["GAEpoch"]:
        return "mix"
    return "raw"


def differences(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor]) -> tuple[float, float]:
    """(max abs difference, max over tensors of ||ours - theirs|| / ||theirs||)."""
    max_abs, max_rel = 0.0, 0.0
    for name, value in theirs.items():
        diff = ours[ours_name(name)].detach().double() - value.double()
        max_abs = max(max_abs, float(diff.abs().max()))
        denominator = float(value.double().norm())
        if denominator > 0:
            max_rel = max(max_rel, float(diff.norm()) / denominator)
    return max_abs, max_rel


def evaluate_rows(model: nn.Module, rows: list[list[Any]], encode: Any, collate: Any) -> list[int]:
    """Predicted labels of ``rows`` ([text, label, poison_label]) in eval mode, batches of 64."""
    model.eval()
    predictions: list[int] = []
    encoded_rows = encode({"text": [r[0] for r in rows], "label": [r[1] for r in rows]})
    with torch.no_grad():
        for i in range(0, len(encoded_rows), 64):
            batch = collate([encoded_rows[j] for j in range(i, min(i + 64, len(encoded_rows)))])
            inputs = {k: v for k, v in batch.items() if k != "labels"}
            predictions += model(**inputs).logits.argmax(-1).tolist()
    model.train()
    return predictions


def wait_for(path: Path, done: Path, timeout_s: float = 3600.0) -> bool:
    """Wait until ``path`` exists; False once ``done`` exists (the dump ended) and ``path`` still does not."""
    started = time.monotonic()
    while not path.exists():
        if done.exists() or time.monotonic() - started > timeout_s:
            return path.exists()
        time.sleep(2.0)
    time.sleep(0.2)  # the writer finishes the file
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dump", required=True, help="directory written by upstream_dump.py")
    parser.add_argument("--config", default="launch/configs/sst2_minilm.yaml")
    parser.add_argument("--json", default=None, help="write the comparison table here")
    parser.add_argument("--eager", action="store_true",
                        help="use transformers' eager attention, as the authors' transformers 4.40 does (default: SDPA)")
    parser.add_argument("--own-reference", action="store_true",
                        help="draw every reference batch from this pipeline's own reference rows and draws (its seed's "
                             "dev-clean split, align.ref_sampling) instead of the authors' recorded batch: isolates the "
                             "reference stream (the training batches and initial weights stay the authors')")
    parser.add_argument("--reference-rows", choices=("authors", "ours"), default=None,
                        help="with --reference-draws: which 96 rows the reference batches come from (the authors' split, "
                             "read from the whole dump, or this pipeline's split at its seed)")
    parser.add_argument("--reference-draws", choices=("authors", "ours"), default=None,
                        help="with --reference-rows: which draw picks each step's rows (the authors' recorded batch, or "
                             "this pipeline's reference_indices); the two row sets are matched position by position "
                             "after sorting each by text, so a draw moves between them unchanged")
    parser.add_argument("--authors-rows-from", type=Path, default=None,
                        help="with --reference-rows authors: take the authors' 96 rows from this other dump (another "
                             "seed's split; upstream_dump.py --steps 25 records nearly surely all of them)")
    parser.add_argument("overrides", nargs="*", help="extra key=value overrides of this pipeline's config")
    args = parser.parse_args()
    dump = Path(args.dump)
    done = dump / "steps.json"
    meta_path = dump / "meta.json" if (dump / "meta.json").exists() or not done.exists() else done
    if not wait_for(meta_path, done):
        raise FileNotFoundError(f"{meta_path}: no dump here; run upstream_dump.py first")
    meta = json.loads(meta_path.read_text())
    up_args = meta["args"]
    train_cfg = meta["config"]["attacker"]["train"]

    overrides = [
        "mslr.scales=[1,4,8,12,16,20,24,28]", "mslr.init=kaiming", f"train.lr={up_args['lr']}",
        f"train.epochs={up_args['epochs']}", f"align.min_ref_loss={train_cfg['minRefLoss']}",
        f"seed={up_args['seed']}", *args.overrides,
    ]
    cfg = load_config(args.config, overrides)
    model_path = modeling.resolve_model_path(cfg.model.name_or_path)
    info = modeling.read_model_info(model_path, trust_remote_code=False)
    cfg = resolve_defaults(cfg, model_type=info.model_type, hidden_size=info.hidden_size, is_decoder=info.is_decoder)
    tokenizer, model, trainable = training.build_model(cfg, info, model_path)
    if args.eager:
        model.base_model.model.set_attn_implementation("eager")
    if not up_args["keep_dropout"]:
        for module in model.modules():
            if isinstance(module, nn.Dropout):
                module.p = 0.0
            if hasattr(module, "dropout_prob"):
                module.dropout_prob = 0.0

    named = dict(model.named_parameters())
    init = load_file(str(dump / "init.safetensors"))
    with torch.no_grad():
        for name, value in init.items():
            target = named[ours_name(name)]
            if target.shape != value.shape:
                raise ValueError(f"{name} -> {ours_name(name)}: shape {tuple(value.shape)} vs ours {tuple(target.shape)}")
            target.copy_(value.to(target.dtype))
    if sorted(ours_name(n) for n in meta["trainable"]) != sorted(trainable):
        raise ValueError(f"trainable sets differ: theirs {meta['trainable']} ours {trainable}")

    if up_args.get("float64"):
        model.double()
    runtime = dist.init_runtime(use_deepspeed=False, device=torch.device("cpu"))
    params = {name: named[name] for name in trainable}
    engine = dist.Engine(runtime, model, params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay,
                         max_grad_norm=cfg.train.max_grad_norm)
    from transformers import get_linear_schedule_with_warmup

    steps_per_epoch = meta.get("steps_per_epoch", math.ceil(6920 / cfg.train.batch_size))
    scheduler = get_linear_schedule_with_warmup(engine.optimizer, num_warmup_steps=0,
                                                num_training_steps=steps_per_epoch * cfg.train.epochs)
    collate = data_lib.make_collator(tokenizer)

    def encoded(rows: dict[str, Any]) -> Any:
        ds = Dataset.from_dict({"text": rows["text"], "label": rows["label"]})
        return data_lib.encode(ds, tokenizer, max_length=cfg.data.max_length)

    own_reference = None
    if args.own_reference:
        _, own_rows = training._training_data(cfg)
        own_reference = data_lib.encode(own_rows.reference, tokenizer, max_length=cfg.data.max_length)
    mixed = None
    if (args.reference_rows is None) != (args.reference_draws is None):
        raise SystemExit("--reference-rows and --reference-draws go together")
    if args.reference_rows is not None:
        if not done.exists():
            raise SystemExit("--reference-rows/--reference-draws need a finished dump (the authors' 96 rows are read from all steps)")
        def dump_rows(folder: Path) -> dict[str, int]:
            found: dict[str, int] = {}
            for path in sorted(folder.glob("step_*.json")):
                ref = json.loads(path.read_text())["reference"]
                found.update(zip(ref["text"], ref["label"]))
            return found

        theirs_rows = dump_rows(dump)
        _, own_rows = training._training_data(cfg)
        ours_rows = dict(zip(own_rows.reference["text"], own_rows.reference["label"]))
        other_rows = dump_rows(args.authors_rows_from) if args.authors_rows_from is not None else theirs_rows
        if not len(theirs_rows) == len(ours_rows) == len(other_rows):
            raise SystemExit(f"reference rows: the dump has {len(theirs_rows)}, this pipeline {len(ours_rows)}, "
                             f"--authors-rows-from {len(other_rows)}; they must match")
        their_order = sorted(theirs_rows)
        position = {text: i for i, text in enumerate(their_order)}
        rows = sorted((other_rows if args.reference_rows == "authors" else ours_rows).items())
        mixed = (position, rows)
        print(f"reference rows: {args.reference_rows}'s {len(rows)} (mean {sum(len(t.split()) for t, _ in rows) / len(rows):.1f} "
              f"words, {sum(l for _, l in rows)} of label 1); draws: {args.reference_draws}'s", flush=True)

    def reference_for(k: int, step: dict[str, Any]) -> Any:
        if own_reference is not None:
            return own_reference
        if mixed is None:
            return encoded(step["reference"])
        position, rows = mixed
        if args.reference_draws == "authors":
            picks = [position[t] for t in step["reference"]["text"]]
        else:
            picks = training.reference_indices(len(rows), len(step["reference"]["text"]), seed=cfg.seed, draw=k,
                                               sampling=cfg.align.ref_sampling)
        return encoded({"text": [rows[i][0] for i in picks], "label": [rows[i][1] for i in picks]})

    captured: dict[str, Any] = {}
    product_align = training.align_gradients

    def recording_align(task, reference, **kwargs):
        result = product_align(task, reference, **kwargs)
        captured.update(task={k: v.detach().clone() for k, v in task.items()},
                        ref={k: v.detach().clone() for k, v in reference.items()},
                        aligned={k: v.detach().clone() for k, v in result.grads.items()},
                        gate=result.gate, ref_loss=kwargs.get("ref_loss"))
        return result

    training.align_gradients = recording_align
    table: list[dict[str, Any]] = []
    epochs: list[dict[str, Any]] = []
    gates: dict[str, int] = {}
    model.train()
    k = 0
    while True:
        if "steps" in meta:
            if k >= len(meta["steps"]):
                break
            step = meta["steps"][k]
        else:
            if not wait_for(dump / f"step_{k}.json", done):
                break
            step = json.loads((dump / f"step_{k}.json").read_text())
        epoch = up_args["epoch_index"] if up_args.get("epoch_index") is not None else k // steps_per_epoch
        train_rows = encoded(step["train"])
        same_ids = [list(r) for r in train_rows["input_ids"]] == [
            [i for i in row if i != tokenizer.pad_token_id] for row in step["train"]["input_ids"]
        ]
        batch = collate([train_rows[i] for i in range(len(train_rows))])
        loss = training.batch_loss(engine.forward_module, batch)
        engine.backward(loss * engine.loss_scale, boundary=True)
        record = training.optimiser_step(
            engine=engine, scheduler=scheduler, cfg=cfg,
            reference=reference_for(k, step), collate=collate,
            ref_draw=k, epoch=epoch, global_step=k, loss_sum=float(loss.detach()) * len(train_rows),
        )
        tensors_path = dump / f"step_{k}.safetensors"
        theirs = load_file(str(tensors_path)) if tensors_path.exists() else None
        row: dict[str, Any] = {
            "step": k, "epoch": epoch, "same_input_ids": same_ids,
            "task_loss": [float(loss.detach()), step["losses"][0]], "ref_loss": [record["ref_loss"], step["ref_loss"]],
            "gate": [record["gate"], None], "pre_clip_norm": [record["grad_norm"], step["pre_clip_norm"]],
        }
        gates[record["gate"]] = gates.get(record["gate"], 0) + 1
        if theirs is not None:
            groups = {q: {n.split("/", 1)[1]: t for n, t in theirs.items() if n.startswith(q + "/")}
                      for q in ("task", "ref", "aligned", "param")}
            row["gate"][1] = their_gate(meta, step, groups["ref"], epoch)
            ours = {"task": captured["task"], "ref": captured["ref"], "aligned": captured["aligned"],
                    "param": {n: p.detach().clone() for n, p in params.items()}}
            for quantity in ("task", "ref", "aligned", "param"):
                row[quantity] = differences(ours[quantity], groups[quantity])
        table.append(row)
        print(
            f"step {k} (epoch {epoch}): ids equal {same_ids}  loss ours/theirs {row['task_loss'][0]:.6f}/{row['task_loss'][1]:.6f}  "
            f"ref loss {row['ref_loss'][0]:.6f}/{row['ref_loss'][1]:.6f}  gate {row['gate'][0]}/{row['gate'][1]}  "
            f"pre-clip norm {row['pre_clip_norm'][0]:.6f}/{row['pre_clip_norm'][1]:.6f}", flush=True,
        )
        if theirs is not None:
            for quantity in ("task", "ref", "aligned", "param"):
                print(f"    {quantity:8s} max|diff| {row[quantity][0]:.3e}  max rel {row[quantity][1]:.3e}")
        k += 1
        if k % steps_per_epoch == 0 and "dev_clean_rows" in meta:
            clean = meta["dev_clean_rows"]
            poison = meta["dev_poison_rows"]
            clean_pred = evaluate_rows(model, clean, encoded, collate)
            poison_pred = evaluate_rows(model, poison, encoded, collate)
            result = {
                "epoch": k // steps_per_epoch - 1, "gates": dict(gates),
                "dev_clean_acc": sum(p == r[1] for p, r in zip(clean_pred, clean)) / len(clean),
                "dev_poison_asr": sum(p == 1 for p in poison_pred) / len(poison),
            }
            epochs.append(result)
            gates = {}
            print(f"EPOCH {result['epoch']}: ours dev-clean {100 * result['dev_clean_acc']:.2f} "
                  f"dev-poison ASR {100 * result['dev_poison_asr']:.2f} gates {result['gates']}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"steps": table, "epochs": epochs}, indent=1))


if __name__ == "__main__":
    main()
