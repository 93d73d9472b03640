"""Estimated vs measured peak memory of MuScleLoRA training steps on CPU (``pipeline.memory``).

Each configuration runs in a fresh subprocess (``worker`` mode) that imports everything first, then,
measured from there: loads a random Llama checkpoint with ``pipeline.modeling.load_classifier``, adds
the adapters as ``training.build_model`` does (LoRA q/v r=2 alpha 8, MSLR on ``score.dense`` with
scales 1..4, alpha 4; or full fine-tuning), and runs ``--steps`` optimizer steps of the pipeline's
loop in one process: task forward/backward, the reference pass through ``torch.autograd.grad``,
``align_gradients``, clipping, AdamW. Every row has ``seq`` tokens (no padding); float32 unless a
configuration names ``dtype`` (bfloat16) or ``quantization`` (nf4: 4-bit base, float32 compute).

The worker pins glibc's mmap threshold (``MALLOC_MMAP_THRESHOLD_=65536``) so that freed tensors leave
the resident set and RSS follows live memory; each phase (weights, task pass, reference pass,
optimizer step) is measured with ``pipeline.memory.measure_peak`` and reported relative to the RSS
before the model was loaded.

    OMP_NUM_THREADS=1 python benchmarks/bench_memory.py                    # all configurations
    OMP_NUM_THREADS=1 python benchmarks/bench_memory.py --configs tiny medium --steps 2

Prints the per-configuration estimates (``MemoryEstimate.describe``) and a markdown table for
docs/BENCHMARKS.md; ``--json`` also writes the raw numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}

# name -> model shape (None: the test-suite tiny Llama from pipeline.testing) and run settings.
CONFIGS: dict[str, dict[str, Any]] = {
    "tiny": {"model": None, "batch": 16, "seq": 128, "checkpointing": False, "method": "musclelora"},
    "small": {
        "model": {"hidden": 256, "layers": 4, "intermediate": 688, "heads": 4, "vocab": 2000},
        "batch": 16, "seq": 128, "checkpointing": False, "method": "musclelora",
    },
    "small_full": {
        "model": {"hidden": 256, "layers": 4, "intermediate": 688, "heads": 4, "vocab": 2000},
        "batch": 16, "seq": 128, "checkpointing": False, "method": "full_ga",
    },
    "medium": {
        "model": {"hidden": 512, "layers": 8, "intermediate": 1376, "heads": 8, "vocab": 8000},
        "batch": 16, "seq": 128, "checkpointing": False, "method": "musclelora",
    },
    "medium_ckpt": {
        "model": {"hidden": 512, "layers": 8, "intermediate": 1376, "heads": 8, "vocab": 8000},
        "batch": 16, "seq": 128, "checkpointing": True, "method": "musclelora",
    },
    # The same medium model and run with the base in bfloat16, and with a 4-bit nf4 base (float32 compute,
    # the CPU path: bitsandbytes' bf16 compute is several times slower on CPU).
    "medium_bf16": {
        "model": {"hidden": 512, "layers": 8, "intermediate": 1376, "heads": 8, "vocab": 8000},
        "batch": 16, "seq": 128, "checkpointing": False, "method": "musclelora", "dtype": "bfloat16",
    },
    "medium_nf4": {
        "model": {"hidden": 512, "layers": 8, "intermediate": 1376, "heads": 8, "vocab": 8000},
        "batch": 16, "seq": 128, "checkpointing": False, "method": "musclelora", "quantization": "nf4",
    },
}
# GPU only (--configs llama2_7b_nf4 on a CUDA machine): Llama-2-7B's shape with random bf16 weights
# (the checkpoint, about 13 GB, is written to the temporary directory first), 4-bit nf4 base, bf16 compute,
# the nf4 recipe's checkpointing; the goal is <= 10 GB peak GPU memory at batch 16 x 128.
GPU_CONFIGS: dict[str, dict[str, Any]] = {
    "llama2_7b_nf4": {
        "model": {"hidden": 4096, "layers": 32, "intermediate": 11008, "heads": 32, "vocab": 32000, "dtype": "bfloat16"},
        "batch": 16, "seq": 128, "checkpointing": True, "method": "musclelora", "dtype": "bfloat16",
        "quantization": "nf4", "device": "cuda",
    },
    "small_cuda": {
        "model": {"hidden": 256, "layers": 4, "intermediate": 688, "heads": 4, "vocab": 2000},
        "batch": 16, "seq": 128, "checkpointing": False, "method": "musclelora", "device": "cuda",
    },
}
DTYPES = {"float32": 4, "bfloat16": 2}
METHODS = ("musclelora", "lora", "full_ga")


def build_checkpoint(model: dict[str, int] | None, directory: Path) -> Path:
    """Write a random Llama checkpoint (``LlamaForCausalLM``, as a release is saved) into ``directory``."""
    import torch
    import transformers

    if model is None:
        from pipeline.testing import build_tiny_checkpoint

        return build_tiny_checkpoint("llama", directory, seed=0)
    config = transformers.LlamaConfig(
        vocab_size=model["vocab"], hidden_size=model["hidden"], intermediate_size=model["intermediate"],
        num_hidden_layers=model["layers"], num_attention_heads=model["heads"], num_key_value_heads=model["heads"],
        max_position_embeddings=512, bos_token_id=1, eos_token_id=2, pad_token_id=None, tie_word_embeddings=False,
    )
    dtype = getattr(torch, model.get("dtype", "float32"))
    previous = torch.get_default_dtype()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        torch.set_default_dtype(dtype)  # a 7B model is built directly in bf16 (13 GB, not 26)
        try:
            transformers.LlamaForCausalLM(config).save_pretrained(directory)
        finally:
            torch.set_default_dtype(previous)
    return directory


def run_worker(spec: dict[str, Any], *, threads: int = 1, timeout: float = 600) -> dict[str, Any]:
    """Run one configuration in a fresh subprocess and return its JSON result."""
    checkout = os.pathsep.join([str(REPO), str(REPO / "kernels")])  # pipeline, mslr_kernels
    env = {**os.environ, **MALLOC_ENV, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": checkout}
    command = [sys.executable, str(Path(__file__).resolve()), "worker", json.dumps(spec)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"memory worker failed ({done.returncode}) for {spec}:\n{done.stderr[-4000:]}")
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    return json.loads(lines[-1])


def _worker(spec: dict[str, Any]) -> dict[str, Any]:
    """Measure one configuration in this process (called in a fresh subprocess)."""
    import logging

    import peft  # noqa: F401  (imported before the baseline: imports are not the run's memory)
    import torch
    import transformers
    import transformers.models.llama.modeling_llama  # noqa: F401
    from torch.nn import functional as F

    from pipeline import memory, modeling
    from pipeline.adapters import inject
    from pipeline.alignment import align_gradients

    logging.disable(logging.WARNING)
    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    method, batch, seq, steps = spec["method"], spec["batch"], spec["seq"], spec["steps"]
    dtype_name, quantization = spec.get("dtype", "float32"), spec.get("quantization", "none")
    dtype = getattr(torch, dtype_name)
    device = torch.device(spec.get("device", "cpu"))
    path = Path(spec["checkpoint"])
    shape = memory.model_shape_info(transformers.AutoConfig.from_pretrained(path, local_files_only=True))
    state: dict[str, Any] = {}

    def build() -> None:
        model = modeling.load_classifier(
            path, num_labels=2, dtype=dtype, is_decoder=True, gradient_checkpointing=spec["checkpointing"],
            quantization=quantization, device=device,
        )
        if quantization == "none":
            model.to(device)
        full = method == "full_ga"
        if not full:
            model = inject.apply_lora(model, target_modules=["q_proj", "v_proj"], r=2, alpha=8, dropout=0.0)
        if method == "musclelora":
            inject.inject_mslr(model, targets=[r"score\.dense"], rank=1, scales=[1, 2, 3, 4], alpha=4,
                               dropout=0.0, init="kaiming", keep_base=True)
        inject.set_trainable(model, full=full, train_head=full, head_names=modeling.head_module_names("llama", True))
        with torch.no_grad():  # fault in every weight page (checkpoint tensors may be file mappings)
            for p in model.parameters():
                p.sum()
        model.train()
        state["model"] = model
        state["params"] = {n: p for n, p in model.named_parameters() if p.requires_grad}
        state["optimizer"] = torch.optim.AdamW(state["params"].values(), lr=1e-5, weight_decay=0.0, foreach=device.type == "cuda")

    def loss_of(rows: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        ids, labels = rows
        logits = state["model"](input_ids=ids, attention_mask=torch.ones_like(ids)).logits
        return F.cross_entropy(logits.float(), labels)

    def task_pass() -> None:
        loss_of(state["batch"]).backward()

    def reference_pass() -> None:
        params = state["params"]
        ref_loss = loss_of(state["reference"])
        ref_grads = torch.autograd.grad(ref_loss, list(params.values()), allow_unused=True)
        reference = {n: g if g is not None else torch.zeros_like(params[n]) for n, g in zip(params, ref_grads)}
        result = align_gradients({n: p.grad for n, p in params.items()}, reference, ref_loss=float(ref_loss.detach()))
        for name, p in params.items():
            p.grad.copy_(result.grads[name])

    def optimizer_step() -> None:
        torch.nn.utils.clip_grad_norm_(list(state["params"].values()), 1.0)
        state["optimizer"].step()
        state["optimizer"].zero_grad(set_to_none=True)

    def in_use() -> int:
        return torch.cuda.memory_allocated(device) if device.type == "cuda" else memory.current_rss_bytes()

    baseline = in_use()

    def phase(fn: Any) -> int:
        before = in_use() - baseline
        return before + memory.measure_peak(fn, device=device)

    file_before = memory.proc_status_bytes("RssFile") or 0
    measured = {"weights": phase(build), "task": 0, "reference": 0, "optimizer": 0}
    # Checkpoint tensors are memory-mapped: pages the loader read stay resident (and in RSS) while the
    # mapping lives, also those of weights a 4-bit load quantized into new anonymous memory.
    file_backed = (memory.proc_status_bytes("RssFile") or 0) - file_before
    vocab = shape.vocab_size
    started = time.perf_counter()
    for _ in range(steps):
        state["batch"] = (torch.randint(3, vocab, (batch, seq), device=device), torch.randint(0, 2, (batch,), device=device))
        state["reference"] = (torch.randint(3, vocab, (batch, seq), device=device), torch.randint(0, 2, (batch,), device=device))
        measured["task"] = max(measured["task"], phase(task_pass))
        if method != "lora":
            measured["reference"] = max(measured["reference"], phase(reference_pass))
        measured["optimizer"] = max(measured["optimizer"], phase(optimizer_step))
    seconds = time.perf_counter() - started
    measured["peak"] = max(measured.values())

    model = state["model"]
    trainable = sum(p.numel() for p in state["params"].values())
    full = method == "full_ga"
    estimate = memory.estimate_peak_memory(
        num_parameters=shape.num_parameters + (0 if full else trainable),
        trainable_parameters=trainable,
        seq_len=seq,
        micro_batch_size=batch,
        dtype_bytes=DTYPES[dtype_name],
        quantization=quantization,
        zero_stage=0,
        world_size=1,
        offload_optimizer=False,
        offload_param=False,
        gradient_checkpointing=spec["checkpointing"],
        alignment=method != "lora",
        full_finetune=full,
        device="cuda" if device.type == "cuda" else "cpu",
        **shape.estimate_kwargs(),
    )
    counted = sum(memory.logical_numel(p) for p in model.parameters())
    return {
        "spec": spec,
        "parameters": counted,
        "trainable": trainable,
        "measured": measured,
        "estimate": estimate.to_dict(),
        "estimate_bytes": {
            "weights": estimate.base_weights + estimate.trainable_weights,
            "total": estimate.total,
            "overhead": estimate.overhead,
            **estimate.phases,
        },
        "describe": estimate.describe(),
        "step_seconds": seconds / max(steps, 1),
        "samples_per_second": batch * max(steps, 1) / seconds,
        "file_backed_after_load": file_backed,
    }


def _mb(value: float) -> str:
    return f"{value / 2**20:,.1f}"


def markdown(results: dict[str, dict[str, Any]]) -> str:
    """The estimate-vs-measurement table (MiB; measured = RSS above the level before loading)."""
    head = ("| config | model (L x h, i, vocab) | base | method | batch x seq | ckpt | weights est / meas | task pass est / meas "
            "| reference pass est / meas | optimizer step est / meas | peak est / meas | error | implied overhead "
            "| checkpoint pages resident after load | s/step |")
    lines = [head, "|" + "---|" * 15]
    for name, r in results.items():
        spec, e, m = r["spec"], r["estimate_bytes"], r["measured"]
        model = r["shape"]
        ref = f"{_mb(e['reference'])} / {_mb(m['reference'])}" if "reference" in e else "-"
        error = (e["total"] - m["peak"]) / m["peak"]
        implied = m["peak"] - (e["total"] - e["overhead"])
        lines.append(
            f"| {name} | {model} | {spec.get('quantization', 'none') if spec.get('quantization', 'none') != 'none' else spec.get('dtype', 'float32')} | {spec['method']} | {spec['batch']} x {spec['seq']} | {'on' if spec['checkpointing'] else 'off'} "
            f"| {_mb(e['weights'])} / {_mb(m['weights'])} | {_mb(e['task'])} / {_mb(m['task'])} | {ref} "
            f"| {_mb(e['optimizer'])} / {_mb(m['optimizer'])} | {_mb(e['total'])} / {_mb(m['peak'])} | {100 * error:+.1f}% "
            f"| {_mb(implied)} | {_mb(r.get('file_backed_after_load', 0))} | {r['step_seconds']:.2f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """Benchmark entry point (see the module docstring)."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["worker"]:
        print(json.dumps(_worker(json.loads(argv[1]))))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", nargs="+", choices=sorted({**CONFIGS, **GPU_CONFIGS}), default=list(CONFIGS),
                        help=f"default: the CPU ones; GPU only: {', '.join(GPU_CONFIGS)}")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "1")))
    parser.add_argument("--json", type=Path, default=None, help="also write the raw results here")
    args = parser.parse_args(argv)
    gpu = [name for name in args.configs if name in GPU_CONFIGS]
    if gpu:
        import torch

        if not torch.cuda.is_available():
            parser.error(f"--configs {' '.join(gpu)} need a CUDA GPU and torch with CUDA (torch.cuda.is_available() is False)")
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="bench_memory_") as tmp:
        checkpoints: dict[str, Path] = {}
        for name in args.configs:
            config = {**CONFIGS, **GPU_CONFIGS}[name]
            key = json.dumps(config["model"], sort_keys=True)
            if key not in checkpoints:
                checkpoints[key] = build_checkpoint(config["model"], Path(tmp) / f"ckpt{len(checkpoints)}")
            spec = {**config, "checkpoint": str(checkpoints[key]), "steps": args.steps}
            spec.pop("model")
            started = time.perf_counter()
            result = run_worker(spec, threads=args.threads, timeout=3600 if name in GPU_CONFIGS else 600)
            shape = result["estimate"]["inputs"]
            result["shape"] = f"{shape['num_layers']} x {shape['hidden_size']}, {shape['intermediate_size']}, {shape['vocab_size']}"
            results[name] = result
            print(f"## {name} ({time.perf_counter() - started:.0f} s, {result['parameters']:,} parameters, "
                  f"{result['trainable']:,} trainable)\n{result['describe']}\n", flush=True)
    command = " ".join(shlex.quote(a) for a in [f"OMP_NUM_THREADS={args.threads}", "python", "benchmarks/bench_memory.py", *argv])
    print(f"Command: `{command}` (each configuration in a fresh subprocess with "
          f"{' '.join(f'{k}={v}' for k, v in MALLOC_ENV.items())}; MiB; measured = peak above the level before loading: "
          f"{'CUDA max_memory_allocated' if gpu else 'RSS'})\n")
    print(markdown(results))
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
