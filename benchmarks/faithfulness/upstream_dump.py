"""Record the first optimiser steps of the authors' MuScleLoRA trainer (step-level faithfulness check).

Runs in the AUTHORS' virtualenv, from the root of their exported repository (it imports their
``openbackdoor`` package and reads ``poison_data/`` by relative path), see README.md here. It does not
contain or change their training code: it builds their victim and GA trainer exactly as
``plmDefense.py`` does, then calls their own ``GATrainer.train`` with thin recording wrappers around
the calls the trainer makes (``victim.process``, ``loss_function``, ``torch.autograd.grad``,
``clip_grad_norm_``, ``optimizer.step``) and stops it after ``--steps`` optimiser steps.

Writes to ``--out``:
    init.safetensors      every trainable tensor, the (frozen, randomly initialised) classifier and
                          the pooler's frozen base weight, by the authors' parameter names
    meta.json             the config, trainable names, the reference rows and the remaining dev-clean
                          and dev-poison rows (written before the first step)
    step_<k>.json         per step: training texts/labels/input ids, reference texts/labels, losses,
                          pre-clip norm, learning rate (written as the step ends, so a replay can follow)
    step_<k>.safetensors  for the first ``--tensor_steps`` steps: task/<name>, ref/<name>,
                          aligned/<name> (the gradient handed to clipping), param/<name> (after the step)
    steps.json            meta.json plus every step record (written at the end)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn


class _Stop(Exception):
    """Raised by the recorder to leave the authors' training loop after the last recorded step."""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config_path", default="./plmConfigs/Badnets4GA+LoRA+MSLRConfig.json")
    parser.add_argument("--model_path", required=True)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--steps", type=int, default=5, help="optimiser steps to record")
    parser.add_argument("--tensor_steps", type=int, default=None, help="save tensors for the first N steps only (default: all)")
    parser.add_argument("--epoch_index", type=int, default=None,
                        help="epoch number passed to train_one_epoch (forces the gate's epoch; default: the real one)")
    parser.add_argument("--min_ref_loss", type=float, default=None, help="override minRefLoss (e.g. 10 to force the fall-through gate)")
    parser.add_argument("--keep_dropout", action="store_true", help="leave dropout on (default: all dropout p=0)")
    parser.add_argument("--float64", action="store_true", help="run the victim in float64 (numerics check)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    sys.path.insert(0, os.getcwd())

    from openbackdoor.attackers import load_attacker
    from openbackdoor.data import load_dataset
    from openbackdoor.utils import set_config, set_seed
    from openbackdoor.victims import load_victim

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    # Config exactly as plmDefense.py builds it for --target_model bert --dataset sst-2 --poison_rate 0.1,
    # plus the local --model_path/--lr/--epochs overrides of ../shared/UPSTREAM.md.
    with open(args.config_path) as f:
        config = json.load(f)
    config["victim"]["path"] = args.model_path
    config["victim"]["model"] = "bert"
    config["victim"]["muscleConfig"]["mslrConfig"]["freqBand"] = [1, 4, 8, 12, 16, 20, 24, 28]
    config["target_dataset"]["name"] = config["poison_dataset"]["name"] = "sst-2"
    config["attacker"]["poisoner"]["poison_rate"] = 0.1
    config["attacker"]["train"]["lr"] = args.lr
    config["attacker"]["train"]["epochs"] = args.epochs
    config["attacker"]["train"]["save_path"] = str(out / "models")
    if args.min_ref_loss is not None:
        config["attacker"]["train"]["minRefLoss"] = args.min_ref_loss
    config = set_config(config)
    set_seed(args.seed)

    attacker = load_attacker(config["attacker"])
    victim = load_victim(config["victim"])
    if not args.keep_dropout:
        for module in victim.modules():
            if isinstance(module, nn.Dropout):
                module.p = 0.0
            if hasattr(module, "dropout_prob"):
                module.dropout_prob = 0.0
    if args.float64:
        victim.plm.double()
    poison_dataset = load_dataset(**config["poison_dataset"])
    trainer = attacker.poison_trainer

    named = {n: p for n, p in victim.plm.named_parameters()}
    trainable = [n for n, p in named.items() if p.requires_grad]
    steps: list[dict] = []
    tensors: dict[str, torch.Tensor] = {}
    current: dict = {}

    def snapshot(prefix: str, values) -> None:
        for name, value in values:
            tensors[f"{prefix}/{name}"] = value.detach().clone().contiguous()

    # --- recording wrappers -------------------------------------------------------------
    original_process = victim.process

    def process(batch):
        inputs, labels = original_process(batch)
        current.setdefault("batches", []).append(
            {"text": list(batch["text"]), "label": labels.tolist(), "input_ids": inputs["input_ids"].tolist()}
        )
        return inputs, labels

    victim.process = process

    original_loss = trainer.loss_function

    class RecordingLoss(nn.Module):
        def forward(self, logits, labels):
            value = original_loss(logits, labels)
            current.setdefault("losses", []).append(float(value.detach()))
            return value

    trainer.loss_function = RecordingLoss()

    original_grad = torch.autograd.grad

    def grad(outputs, inputs, *a, **k):
        snapshot("task", [(n, named[n].grad) for n in trainable])
        result = original_grad(outputs, inputs, *a, **k)
        snapshot("ref", zip(trainable, result))
        current["ref_loss"] = float(outputs.detach())
        return result

    torch.autograd.grad = grad

    original_clip = torch.nn.utils.clip_grad_norm_

    def clip(parameters, max_norm, *a, **k):
        snapshot("aligned", [(n, named[n].grad) for n in trainable])
        norm = original_clip(parameters, max_norm, *a, **k)
        current["pre_clip_norm"] = float(norm)
        return norm

    torch.nn.utils.clip_grad_norm_ = clip

    original_register = trainer.register

    def register(model, dataloader, metrics):
        original_register(model, dataloader, metrics)
        snapshot("init", [(n, named[n]) for n in trainable])
        snapshot("init", [(n, p) for n, p in named.items() if n.startswith("classifier.") or ".oriLinear." in n])
        save_file({k.split("/", 1)[1]: v for k, v in tensors.items() if k.startswith("init/")}, str(out / "init.safetensors"))
        tensors.clear()
        optimizer_step = trainer.optimizer.step

        def step(*a, **k):
            result = optimizer_step(*a, **k)
            snapshot("param", [(n, named[n]) for n in trainable])
            index = len(steps)
            # The step's training and reference batches are the last two process() calls before the
            # update: the authors' per-epoch evaluation also calls process() (after the epoch's last step).
            batches = current.get("batches", [])[-2:]
            record = {
                "step": index,
                "train": batches[0],
                "reference": batches[1] if len(batches) > 1 else None,
                "losses": current.get("losses"),
                "ref_loss": current.get("ref_loss"),
                "pre_clip_norm": current.get("pre_clip_norm"),
                "lr": trainer.optimizer.param_groups[0]["lr"],
            }
            steps.append(record)
            if args.tensor_steps is None or index < args.tensor_steps:
                save_file(dict(tensors), str(out / f"step_{index}.safetensors"))
            (out / f"step_{index}.json").write_text(json.dumps(record))
            tensors.clear()
            current.clear()
            if len(steps) >= args.steps:
                raise _Stop
            return result

        trainer.optimizer.step = step

    trainer.register = register

    original_epoch = trainer.train_one_epoch

    def plain(row):
        text, label, poison_label = row
        return [str(text), int(label), int(poison_label)]

    def train_one_epoch(epoch, epoch_iterator, ref_loader):
        # Reference rows of the random split, in the split's order.
        if "reference_rows" not in meta:
            subset = ref_loader.dataset
            meta["reference_rows"] = [plain(subset.dataset[i]) for i in subset.indices]
            meta["dev_clean_rows"] = [plain(r) for r in poisoned["dev-clean"]]
            meta["dev_poison_rows"] = [plain(r) for r in poisoned["dev-poison"]]
            meta["steps_per_epoch"] = len(epoch_iterator)
            (out / "meta.json").write_text(json.dumps(meta, indent=1, default=str))
        return original_epoch(epoch if args.epoch_index is None else args.epoch_index, epoch_iterator, ref_loader)

    trainer.train_one_epoch = train_one_epoch
    meta: dict = {
        "config": config, "trainable": trainable, "args": vars(args),
        "torch": torch.__version__,
    }
    poisoned = attacker.poison(victim, poison_dataset, "train")
    try:
        trainer.train(victim, poisoned, attacker.metrics, config)
    except _Stop:
        pass
    meta["steps"] = steps
    (out / "steps.json").write_text(json.dumps(meta, indent=1, default=str))
    print(f"recorded {len(steps)} steps of the authors' trainer in {out}")


if __name__ == "__main__":
    main()
