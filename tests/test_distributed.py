"""Data-parallel MuScleLoRA (pipeline/distributed.py) against a single process with the same global batch.

The multi-rank tests start 2 CPU ranks (gloo) with ``torchrun`` and compare losses, reference losses
and adapter weights with an in-process single run: tiny random BERT and Llama, ZeRO-1/2/3, DDP,
gradient accumulation with an uneven final batch, a SIGKILL mid-epoch and resume, and a ZeRO-3
adapter export loaded in one process. Dropout is off so both runs compute the same function.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pipeline.config import ConfigError, load_config
from pipeline.distributed import fill_deepspeed_config, load_deepspeed_config, shard_rows
from pipeline.training import run_training

REPO = Path(__file__).resolve().parents[1]
TOL = 1e-5
CONFIG = REPO / "launch" / "configs" / "demo.yaml"  # the base of every run here, in-process and launched


# ----------------------------------------------------------------------------- pure helpers


def test_shard_rows_partitions_a_batch_in_order():
    rows = list(range(11))
    shards = [shard_rows(rows, rank, 3) for rank in range(3)]
    assert shards == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10]]
    assert shard_rows([5], 1, 2) == []


def _fill(raw, **overrides):
    args = dict(source="x.json", micro_batch_size=4, grad_accum_steps=2, world_size=2, max_grad_norm=1.0, lr=1e-3,
                weight_decay=0.01, dtype="float32")
    args.update(overrides)
    return fill_deepspeed_config(raw, **args)


def test_fill_deepspeed_config_takes_batch_clipping_and_precision_from_the_run():
    config = _fill({"zero_optimization": {"stage": 2}, "bf16": {"enabled": "auto"}, "train_batch_size": "auto"})
    assert config["train_micro_batch_size_per_gpu"] == 4
    assert config["gradient_accumulation_steps"] == 2
    assert config["train_batch_size"] == 16
    assert config["gradient_clipping"] == 1.0
    assert config["bf16"]["enabled"] is False
    assert "optimizer" not in config and config["zero_allow_untested_optimizer"] is True
    assert _fill({"bf16": {"enabled": "auto"}}, dtype="bfloat16")["bf16"]["enabled"] is True


def test_fill_deepspeed_config_offload_gets_a_deepspeed_optimizer_with_run_lr():
    config = _fill({"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}})
    assert config["optimizer"]["type"] == "AdamW"
    assert config["optimizer"]["params"]["lr"] == 1e-3 and config["optimizer"]["params"]["weight_decay"] == 0.01


def test_fill_deepspeed_config_reports_every_conflict_with_the_key_to_remove():
    raw = {
        "train_batch_size": 64,
        "gradient_clipping": 0.5,
        "scheduler": {"type": "WarmupLR"},
        "bf16": {"enabled": True},
        "optimizer": {"type": "AdamW", "params": {"lr": 5e-5}},
    }
    with pytest.raises(ConfigError) as info:
        _fill(raw)
    text = str(info.value)
    assert "train_batch_size=64" in text and "remove train_batch_size" in text
    assert "gradient_clipping=0.5" in text and "train.max_grad_norm" in text
    assert "scheduler" in text and "bf16.enabled=True" in text
    assert "optimizer.params.lr=5e-05" in text and "train.lr" in text
    _fill({"train_batch_size": 16, "gradient_clipping": 1.0})  # equal values are fine


def test_load_deepspeed_config_names_file_and_line(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{\n  "zero_optimization": {"stage": 2,}\n}\n')
    with pytest.raises(ConfigError, match=r"bad\.json:2: not valid JSON"):
        load_deepspeed_config(bad)
    with pytest.raises(ConfigError, match=r"no such file.*zero2\.json"):
        load_deepspeed_config(tmp_path / "missing.json")


@pytest.mark.parametrize("preset", ["zero1", "zero2", "zero2_offload", "zero3", "zero3_offload"])
def test_presets_are_complete_once_filled(preset):
    config = _fill(load_deepspeed_config(REPO / "ds_configs" / f"{preset}.json"))
    assert config["zero_optimization"]["stage"] == int(preset[4])
    assert ("optimizer" in config) == preset.endswith("offload")


# ----------------------------------------------------------------------------- multi-rank runs


@pytest.fixture(scope="module")
def no_dropout_models(tmp_path_factory, tiny_bert_dir, tiny_llama_dir) -> dict[str, Path]:
    """Tiny BERT / Llama copies with dropout off, so a sharded batch computes the same function."""
    out = {}
    for family, source in (("bert", tiny_bert_dir), ("llama", tiny_llama_dir)):
        target = tmp_path_factory.mktemp(f"nodrop_{family}") / family
        shutil.copytree(source, target)
        config = json.loads((target / "config.json").read_text())
        for key in ("hidden_dropout_prob", "attention_probs_dropout_prob", "attention_dropout"):
            if key in config:
                config[key] = 0.0
        (target / "config.json").write_text(json.dumps(config))
        out[family] = target
    return out


def _overrides(out: Path, model: Path, data_root: Path, *extra: str) -> list[str]:
    return [
        f"output_dir={out}", f"model.name_or_path={model}", f"data.root={data_root}", "data.dataset=toy",
        "data.attack=badnets", "data.max_length=16", "data.ref_size=8", "train.epochs=1", "train.batch_size=8",
        "train.eval_batch_size=16", "train.lr=1e-3", "train.log_every_steps=1", "train.num_threads=1",
        "mslr.scales=[1,2,4]", "model.llm_head_dropout=0", "method=musclelora", *extra,
    ]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _torchrun(args: list[str], *, deepspeed: str | Path | None, nproc: int = 2, script: Path | None = None,
              check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "kernels")])}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port", str(_free_port()),
               str(script or REPO / "launch" / "train.py")]
    command += ["--config", str(CONFIG)]
    if deepspeed:
        preset = deepspeed if isinstance(deepspeed, Path) else REPO / "ds_configs" / f"{deepspeed}.json"
        command += ["--deepspeed", str(preset)]
    result = subprocess.run(command + args, capture_output=True, text=True, timeout=300, env=env)
    if check:
        assert result.returncode == 0, result.stderr[-4000:]
    return result


def _steps(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines() if '"type": "step"' in line]


def _assert_same_run(single: Path, multi: Path) -> None:
    a, b = _steps(single), _steps(multi)
    assert [r["global_step"] for r in a] == [r["global_step"] for r in b]
    for x, y in zip(a, b):
        assert y["loss"] == pytest.approx(x["loss"], abs=TOL), x["global_step"]
        # the divergence guard's parameter norm is the full model's on every backend (ZeRO-3: summed slices)
        assert y["param_norm"] == pytest.approx(x["param_norm"], rel=1e-5), x["global_step"]
        if "ref_loss" in x:
            assert y["ref_loss"] == pytest.approx(x["ref_loss"], abs=TOL)
            assert y["gate"] == x["gate"]
    wa = load_file(str(single / "adapter" / "adapter.safetensors"))
    wb = load_file(str(multi / "adapter" / "adapter.safetensors"))
    assert wa.keys() == wb.keys()
    for name in wa:
        assert wb[name].numel() == wa[name].numel() > 0
        torch.testing.assert_close(wb[name], wa[name], rtol=0, atol=TOL, msg=name)


@pytest.fixture(scope="module")
def single_runs(tmp_path_factory, no_dropout_models, tiny_data_root) -> dict[str, Path]:
    """One in-process reference run per family (6 steps: 4 of 8 rows, accumulation 2, uneven last batch)."""
    runs = {}
    for family, model in no_dropout_models.items():
        out = tmp_path_factory.mktemp(f"single_{family}") / "run"
        run_training(load_config(CONFIG, _overrides(out, model, tiny_data_root, "train.max_steps=6")))
        runs[family] = out
    return runs


@pytest.mark.distributed
@pytest.mark.integration
@pytest.mark.parametrize(("family", "stage"), [("bert", 0), ("bert", 1), ("bert", 2), ("bert", 3), ("llama", 1), ("llama", 2), ("llama", 3)])
def test_zero_stages_match_a_single_process(family, stage, tmp_path, no_dropout_models, tiny_data_root, single_runs):
    out = tmp_path / "run"
    preset = f"zero{stage}"
    if stage == 0:  # no preset ships for plain data parallelism through DeepSpeed; write one
        preset = tmp_path / "zero0.json"
        preset.write_text(json.dumps({"zero_optimization": {"stage": 0}}))
    _torchrun(_overrides(out, no_dropout_models[family], tiny_data_root, "train.max_steps=6"), deepspeed=preset)
    _assert_same_run(single_runs[family], out)
    metrics = json.loads((out / "metrics.json").read_text())
    assert (metrics["backend"], metrics["world_size"], metrics["zero_stage"]) == ("deepspeed", 2, stage)
    # Alignment adds exactly one collective per optimiser step (gradients, reference shares and losses).
    assert metrics["collectives_per_step"] == 1
    assert not list(out.glob("**/*.tmp-*")), "rank 0 left a staging directory behind"
    # The memory plan is per device: the stage and world size of this run, half the rows per rank.
    single = json.loads((single_runs[family] / "metrics.json").read_text())["memory_estimate"]
    plan = metrics["memory_estimate"]
    assert (plan["inputs"]["zero_stage"], plan["inputs"]["world_size"]) == (stage, 2)
    assert plan["inputs"]["micro_batch_size"] == single["inputs"]["micro_batch_size"] // 2
    trainable = plan["inputs"]["trainable_parameters"]
    # torch AdamW keeps 2 states in one process; DeepSpeed's fp32 master + 2 states are sharded over 2 ranks.
    expected = 12 * trainable / 2 if stage >= 1 else 8 * trainable
    assert plan["optimizer_states_mb"] == pytest.approx(expected / 2**20, abs=1e-3)


@pytest.mark.distributed
@pytest.mark.integration
def test_ddp_with_accumulation_and_uneven_batches_matches_a_single_process(tmp_path, no_dropout_models, tiny_data_root):
    # batch 6 over 2 ranks, accumulation 2: 96 rows -> 16 micro-batches -> 8 steps; the batch of 5 is split 3/2.
    extra = ("train.batch_size=5", "train.grad_accum_steps=2", "train.max_steps=8", "data.max_train_samples=70")
    single = tmp_path / "single"
    run_training(load_config(CONFIG, _overrides(single, no_dropout_models["bert"], tiny_data_root, *extra)))
    out = tmp_path / "ddp"
    _torchrun(_overrides(out, no_dropout_models["bert"], tiny_data_root, *extra), deepspeed=None)
    _assert_same_run(single, out)
    assert json.loads((out / "metrics.json").read_text())["backend"] == "ddp"


KILLER = """
import os, signal, sys
sys.path[:0] = {paths!r}
import pipeline.training as training
original = training.optimiser_step
calls = {{"n": 0}}
def killing_step(**kwargs):
    calls["n"] += 1
    if calls["n"] == {kill_at} and int(os.environ["RANK"]) == 0:
        os.kill(os.getpid(), signal.SIGKILL)
    return original(**kwargs)
training.optimiser_step = killing_step
sys.argv[0] = {train!r}
import runpy
runpy.run_path({train!r}, run_name="__main__")
"""


@pytest.mark.distributed
@pytest.mark.integration
def test_sigkill_mid_epoch_and_resume_ends_with_the_same_adapter(tmp_path, no_dropout_models, tiny_data_root, single_runs):
    model = no_dropout_models["bert"]
    straight = tmp_path / "straight"
    args = ("train.max_steps=-1", "train.epochs=2", "train.checkpoint_every_steps=4")
    run_training(load_config(CONFIG, _overrides(straight, model, tiny_data_root, *args)))

    killer = tmp_path / "killer.py"
    killer.write_text(KILLER.format(paths=[str(REPO), str(REPO / "kernels")], kill_at=15, train=str(REPO / "launch" / "train.py")))
    out = tmp_path / "killed"
    result = _torchrun(_overrides(out, model, tiny_data_root, *args), deepspeed="zero2", script=killer, check=False)
    assert result.returncode != 0
    progress = json.loads((out / "checkpoints" / "last" / "progress.json").read_text())
    assert progress["global_step"] == 12 and progress["epoch"] == 1  # killed in epoch 1 (12 steps per epoch)
    assert (out / "checkpoints" / "last" / "ranks.pt").exists() and not (out / "metrics.json").exists()

    _torchrun(_overrides(out, model, tiny_data_root, *args, "resume=true"), deepspeed="zero2")
    _assert_same_run(straight, out)


@pytest.mark.distributed
@pytest.mark.integration
def test_resume_with_another_world_size_is_refused(tmp_path, no_dropout_models, tiny_data_root):
    out = tmp_path / "run"
    args = _overrides(out, no_dropout_models["bert"], tiny_data_root, "train.max_steps=2")
    _torchrun(args, deepspeed="zero2")
    with pytest.raises(ConfigError, match="written by 2 rank"):
        run_training(load_config(CONFIG, [*args, "resume=true"]))


@pytest.mark.distributed
@pytest.mark.integration
def test_zero3_export_loads_in_one_process_with_the_same_logits(tmp_path, no_dropout_models, tiny_data_root, single_runs):
    from peft import PeftModel

    from pipeline import modeling
    from pipeline.adapters.state import load_adapter
    from pipeline.config import resolve_defaults
    from pipeline.training import build_model

    model_dir = no_dropout_models["llama"]
    out = tmp_path / "run"
    _torchrun(_overrides(out, model_dir, tiny_data_root, "train.max_steps=6"), deepspeed="zero3")
    cfg = load_config(CONFIG, _overrides(out, model_dir, tiny_data_root))
    info = modeling.read_model_info(model_dir)
    cfg = resolve_defaults(cfg, model_type=info.model_type, hidden_size=info.hidden_size, is_decoder=info.is_decoder)
    logits = {}
    for name, run in (("zero3", out), ("single", single_runs["llama"])):
        torch.manual_seed(7)
        tokenizer, model, _ = build_model(cfg, info, model_dir)
        load_adapter(model, run / "adapter")
        model.eval()
        batch = tokenizer(["cf a dull and lifeless bore !", "i loved it"], return_tensors="pt", padding=True)
        with torch.no_grad():
            logits[name] = model(**batch).logits
    torch.testing.assert_close(logits["zero3"], logits["single"], rtol=0, atol=TOL)

    # The LoRA part also loads with peft alone.
    base = modeling.load_classifier(model_dir, num_labels=2, dtype=torch.float32, is_decoder=True, pad_token_id=0)
    peft_model = PeftModel.from_pretrained(base, out / "adapter" / "peft")
    exported = load_file(str(out / "adapter" / "adapter.safetensors"))
    lora = {n: p for n, p in peft_model.named_parameters() if "lora_A" in n or "lora_B" in n}
    assert lora
    for name, parameter in lora.items():
        torch.testing.assert_close(parameter.detach(), exported[name], rtol=0, atol=0, msg=name)


@pytest.mark.distributed
@pytest.mark.integration
@pytest.mark.parametrize("launcher", ["deepspeed", "accelerate"])
def test_deepspeed_and_accelerate_launchers_match_a_single_process(launcher, tmp_path, no_dropout_models, tiny_data_root, single_runs):
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "kernels")])}
    bindir = Path(sys.executable).parent
    train = str(REPO / "launch" / "train.py")
    if launcher == "deepspeed":
        command = [str(bindir / "deepspeed"), "--num_gpus", "2", "--master_port", str(_free_port()), train,
                   "--deepspeed", str(REPO / "ds_configs" / "zero2.json")]
    else:
        command = [str(bindir / "accelerate"), "launch", "--config_file", str(REPO / "launch" / "configs" / "accelerate_zero2.yaml"),
                   "--main_process_port", str(_free_port()), train]
    command += ["--config", str(CONFIG), *_overrides(out, no_dropout_models["bert"], tiny_data_root, "train.max_steps=6")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env, cwd=REPO)
    assert result.returncode == 0, result.stderr[-4000:]
    _assert_same_run(single_runs["bert"], out)
    metrics = json.loads((out / "metrics.json").read_text())
    assert (metrics["backend"], metrics["world_size"], metrics["zero_stage"]) == ("deepspeed", 2, 2)


@pytest.mark.distributed
@pytest.mark.integration
@pytest.mark.parametrize("stage", [2, 3])
def test_nf4_base_under_zero_matches_a_single_process(stage, tmp_path, no_dropout_models, tiny_data_root):
    """4-bit (nf4) Llama base + MuScleLoRA on 2 CPU ranks: same losses, gates and adapter as one process."""
    pytest.importorskip("bitsandbytes")
    nf4 = ("model.quantization=nf4", "train.max_steps=4")
    single = tmp_path / "single"
    run_training(load_config(CONFIG, _overrides(single, no_dropout_models["llama"], tiny_data_root, *nf4)))
    out = tmp_path / "run"
    _torchrun(_overrides(out, no_dropout_models["llama"], tiny_data_root, *nf4), deepspeed=f"zero{stage}")
    _assert_same_run(single, out)
    metrics = json.loads((out / "metrics.json").read_text())
    assert (metrics["world_size"], metrics["zero_stage"]) == (2, stage)
    assert metrics["memory_estimate"]["inputs"]["quantization"] == "nf4"
    # Only adapters trained: the frozen 4-bit base is not in the adapter file.
    saved = load_file(str(out / "adapter" / "adapter.safetensors"))
    assert saved and not any(name.endswith("q_proj.base_layer.weight") for name in saved)


@pytest.mark.distributed
@pytest.mark.integration
@pytest.mark.parametrize("deepspeed", [None, "zero2", "zero3"])
def test_one_row_reference_batch_reused_every_other_step_matches_a_single_process(deepspeed, tmp_path, no_dropout_models,
                                                                                 tiny_data_root):
    """align.ref_batch_size=1 on 2 ranks (rank 1 has no reference row: it runs one at weight 0) with
    align.ref_every_steps=2 (the reused steps reduce only the task gradient): the same run as one process."""
    extra = ("train.max_steps=4", "align.ref_batch_size=1", "align.ref_every_steps=2")
    single = tmp_path / "single"
    run_training(load_config(CONFIG, _overrides(single, no_dropout_models["bert"], tiny_data_root, *extra)))
    out = tmp_path / "multi"
    _torchrun(_overrides(out, no_dropout_models["bert"], tiny_data_root, *extra), deepspeed=deepspeed)
    _assert_same_run(single, out)
    assert [r["ref_fresh"] for r in _steps(out)] == [True, False, True, False]
    assert json.loads((out / "checkpoints" / "last" / "progress.json").read_text())["ref_draws"] == 2
