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

Run with this project's venv from the worktree root, see README.md here.
"""

from __future__ import annotations

import argparse
import json
import math
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dump", required=True, help="directory written by upstream_dump.py")
    parser.add_argument("--config", default="launch/configs/sst2_minilm.yaml")
    parser.add_argument("--json", default=None, help="write the comparison table here")
    parser.add_argument("--eager", action="store_true",
                        help="use transformers' eager attention, as the authors' transformers 4.40 does (default: SDPA)")
    parser.add_argument("overrides", nargs="*", help="extra key=value overrides of this pipeline's config")
    args = parser.parse_args()
    dump = Path(args.dump)
    meta = json.loads((dump / "steps.json").read_text())
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

    steps_per_epoch = math.ceil(6920 / cfg.train.batch_size)
    scheduler = get_linear_schedule_with_warmup(engine.optimizer, num_warmup_steps=0,
                                                num_training_steps=steps_per_epoch * cfg.train.epochs)
    collate = data_lib.make_collator(tokenizer)

    def encoded(rows: dict[str, Any]) -> Any:
        ds = Dataset.from_dict({"text": rows["text"], "label": rows["label"]})
        return data_lib.encode(ds, tokenizer, max_length=cfg.data.max_length)

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
    table = []
    model.train()
    for step in meta["steps"]:
        k = step["step"]
        theirs = load_file(str(dump / f"step_{k}.safetensors"))
        groups = {q: {n.split("/", 1)[1]: t for n, t in theirs.items() if n.startswith(q + "/")}
                  for q in ("task", "ref", "aligned", "param")}
        train_rows = encoded(step["train"])
        same_ids = [list(r) for r in train_rows["input_ids"]] == [
            [i for i in row if i != tokenizer.pad_token_id] for row in step["train"]["input_ids"]
        ]
        batch = collate([train_rows[i] for i in range(len(train_rows))])
        loss = training.batch_loss(engine.forward_module, batch)
        engine.backward(loss * engine.loss_scale, boundary=True)
        record = training.optimiser_step(
            engine=engine, scheduler=scheduler, cfg=cfg, reference=encoded(step["reference"]), collate=collate,
            ref_draw=k, epoch=up_args["epoch_index"], global_step=k, loss_sum=float(loss) * len(train_rows),
        )
        ours = {"task": captured["task"], "ref": captured["ref"], "aligned": captured["aligned"],
                "param": {n: p.detach().clone() for n, p in params.items()}}
        row = {
            "step": k, "same_input_ids": same_ids,
            "task_loss": [float(loss), step["losses"][0]], "ref_loss": [record["ref_loss"], step["ref_loss"]],
            "gate": [record["gate"], their_gate(meta, step, groups["ref"], up_args["epoch_index"])],
            "pre_clip_norm": [record["grad_norm"], step["pre_clip_norm"]],
        }
        for quantity in ("task", "ref", "aligned", "param"):
            row[quantity] = differences(ours[quantity], groups[quantity])
        table.append(row)
        print(
            f"step {k}: ids equal {same_ids}  loss ours/theirs {row['task_loss'][0]:.6f}/{row['task_loss'][1]:.6f}  "
            f"ref loss {row['ref_loss'][0]:.6f}/{row['ref_loss'][1]:.6f}  gate {row['gate'][0]}/{row['gate'][1]}  "
            f"pre-clip norm {row['pre_clip_norm'][0]:.6f}/{row['pre_clip_norm'][1]:.6f}"
        )
        for quantity in ("task", "ref", "aligned", "param"):
            print(f"    {quantity:8s} max|diff| {row[quantity][0]:.3e}  max rel {row[quantity][1]:.3e}")
    if args.json:
        Path(args.json).write_text(json.dumps(table, indent=1))


if __name__ == "__main__":
    main()
