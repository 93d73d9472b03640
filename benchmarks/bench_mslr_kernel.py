"""Benchmark the fused MSLR op (MuScleLoRA, arXiv 2402.12026) against the frozen base linear alone.

One layer ``d_in -> d_out`` with bias (square ``d x d`` from ``--sizes``, any shape from ``--shapes``, e.g.
``4096x16`` for the LLM head's MSLR layer), input ``[tokens, d_in]`` requiring grad, one forward + backward
per sample. Besides time, each method's peak memory of one forward + backward is measured (CUDA: the
allocator's peak; CPU: peak RSS above the RSS before the call, see ``pipeline.memory.measure_peak``).
Compared (all with the same total rank ``B*r``):

- ``base``: frozen ``nn.Linear`` alone (the floor; the goal is fused <= 1.10x base),
- ``fused``: :func:`mslr_kernels.mslr.mslr_linear`,
- ``reference``: :func:`mslr_kernels.mslr.mslr_reference` (plain autograd, unfused),
- ``peft_lora``: peft's ``lora.Linear`` with ``r = B*r`` (single scale),
- ``naive_dense``: the authors' formulation, rebuilding the dense ``d x d`` delta every call
  (``x (R (L*K))^T * scaling + W0 x + b0``),
- with ``--variants``: ``concat``, the fused op with the concatenated weights ``[W0; L]`` (one forward
  GEMM) and ``[g, gz] [W0; L]`` (one input-gradient GEMM), kept as the measured alternative.

Methods are interleaved sample by sample in a shuffled order per round, so load from other processes hits all of them alike; the
report gives the median time and the median of the per-round ratios to ``base``.

On CPU set ``MALLOC_MMAP_THRESHOLD_=65536`` (as below): glibc then returns every large block to the
system on ``free``, so a method's peak RSS is its own and not hidden by blocks an earlier method left
cached (the benchmark warns when it is unset).

Run (2 threads, as in docs/BENCHMARKS.md)::

    MALLOC_MMAP_THRESHOLD_=65536 .venv/bin/python benchmarks/bench_mslr_kernel.py --sizes 384 1024 4096 \\
        --shapes 4096x16 --tokens 512 2048 8192 --threads 2 --repeats 15 --markdown docs/BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import datetime as dt
import math
import os
import platform
import random
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import FunctionCtx

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "kernels")]  # run from a checkout: pipeline, mslr_kernels

from mslr_kernels.mslr import fold_scales, mslr_linear, mslr_reference  # noqa: E402
from pipeline.memory import measure_peak  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class Row:
    """One (size, tokens, method) measurement."""

    size: str
    tokens: int
    method: str
    median_ms: float
    ratio_to_base: float
    peak_mb: float = float("nan")


class _ConcatMSLR(torch.autograd.Function):
    """Alternative fused op: ``[W0; L]`` forward GEMM, ``[g, gz] [W0; L]`` input-gradient GEMM."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: FunctionCtx,
        x: Tensor,
        w_cat: Tensor,
        b_cat: Tensor,
        lora_a: Tensor,
        lora_b: Tensor,
        scale_vec: Tensor,
        d_out: int,
    ) -> Tensor:
        y = torch.addmm(b_cat, x, w_cat.t())  # [n, d_out + R]: base output and z in one GEMM
        z = y[:, d_out:].clone()  # [n, R]
        out = y[:, :d_out]
        out.addmm_(z * scale_vec, lora_b.t())  # strided view, in place
        ctx.save_for_backward(x, z, w_cat, lora_b, scale_vec)
        ctx.d_out = d_out
        return out

    @staticmethod
    def backward(ctx: FunctionCtx, grad_out: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        x, z, w_cat, lora_b, scale_vec = ctx.saved_tensors
        g = grad_out
        gz = F.linear(g, lora_b.t().contiguous()) * scale_vec  # [n, R]
        grad_b = ((z * scale_vec).t().contiguous() @ g).t()
        grad_x = torch.cat([g, gz], dim=1) @ w_cat  # one GEMM over K = d_out + R
        grad_a = gz.t().contiguous() @ x  # lora_a's gradient (w_cat mirrors lora_a in its last rows)
        return grad_x, None, None, grad_a, grad_b, None, None


class _ConcatCache:
    """``[W0; L]`` kept between calls; only the ``L`` rows are refreshed when ``L`` changes."""

    def __init__(self, weight: Tensor, bias: Tensor, lora_a: Tensor) -> None:
        self.d_out = weight.shape[0]
        self.w_cat = torch.cat([weight, lora_a.detach()])
        self.b_cat = torch.cat([bias, bias.new_zeros(lora_a.shape[0])])
        self.lora_a = lora_a
        self.version = lora_a._version

    def __call__(self, x: Tensor, lora_b: Tensor, scale_vec: Tensor) -> Tensor:
        if self.lora_a._version != self.version:
            with torch.no_grad():
                self.w_cat[self.d_out :].copy_(self.lora_a)
            self.version = self.lora_a._version
        return _ConcatMSLR.apply(x, self.w_cat, self.b_cat, self.lora_a, lora_b, scale_vec, self.d_out)


def build_methods(
    size: int | tuple[int, int], num_scales: int, rank: int, alpha: float, dtype: torch.dtype, variants: bool,
    device: torch.device | str = "cpu",
) -> tuple[dict[str, Callable[[Tensor], Tensor]], list[Tensor]]:
    """The benchmarked callables, sharing one base layer and one set of adapter weights.

    ``size`` is ``d`` (a square layer) or ``(d_in, d_out)``.

    Returns:
        ``(methods, trainable)``: the callables by name, and every tensor their backward writes a
        gradient into (the shared adapter factors and peft's copies of them).
    """
    import peft  # local: only the benchmark needs it

    d_in, d_out = (size, size) if isinstance(size, int) else size
    torch.manual_seed(0)
    base = nn.Linear(d_in, d_out).to(device, dtype).requires_grad_(False)
    total_rank = num_scales * rank
    lora_a = nn.Parameter((torch.randn(total_rank, d_in) / math.sqrt(d_in)).to(device, dtype))
    lora_b = nn.Parameter((torch.randn(d_out, total_rank) / math.sqrt(total_rank)).to(device, dtype))
    scales = torch.arange(1, num_scales + 1, dtype=torch.float32)
    scale_vec = fold_scales(scales, rank, alpha / rank).to(device, dtype)

    peft_model = peft.get_peft_model(
        nn.Sequential(nn.Linear(d_in, d_out)).to(device, dtype),
        peft.LoraConfig(r=total_rank, lora_alpha=alpha, target_modules=["0"], lora_dropout=0.0),
    )
    peft_layer = peft_model.base_model.model[0]
    with torch.no_grad():
        peft_layer.base_layer.weight.copy_(base.weight)
        peft_layer.base_layer.bias.copy_(base.bias)
        peft_layer.lora_A["default"].weight.copy_(lora_a)
        peft_layer.lora_B["default"].weight.copy_(lora_b)

    def naive_dense(x: Tensor) -> Tensor:
        k = scales.repeat_interleave(rank).to(device, dtype)  # authors: X (R (L * K))^T * scaling + W0 X + b0
        dense = lora_b @ (lora_a * k[:, None])  # [d_out, d_in], rebuilt every call
        return F.linear(x, dense) * (alpha / rank) + base(x)

    methods: dict[str, Callable[[Tensor], Tensor]] = {
        "base": base,
        "fused": lambda x: mslr_linear(x, base.weight, base.bias, lora_a, lora_b, scale_vec),
        "reference": lambda x: mslr_reference(x, base.weight, base.bias, lora_a, lora_b, scale_vec),
        "peft_lora": peft_layer,
        "naive_dense": naive_dense,
    }
    if variants:
        cache = _ConcatCache(base.weight, base.bias, lora_a)
        methods["concat"] = lambda x: cache(x, lora_b, scale_vec)
    trainable = [lora_a, lora_b, peft_layer.lora_A["default"].weight, peft_layer.lora_B["default"].weight]
    return methods, trainable


def _check_agreement(methods: dict[str, Callable[[Tensor], Tensor]], x: Tensor, tol: float) -> None:
    """Raise if the MSLR implementations disagree (peft uses one scale, so it is not compared)."""
    ref = methods["reference"](x)
    for name in ("fused", "naive_dense", "concat"):
        if name in methods:
            err = (methods[name](x).float() - ref.float()).abs().max().item()
            if err > tol * max(1.0, ref.float().abs().max().item()):
                raise RuntimeError(f"bench_mslr_kernel: method {name} differs from reference by {err:.3g}")


def time_case(
    methods: dict[str, Callable[[Tensor], Tensor]], x: Tensor, grad: Tensor, repeats: int, warmup: int,
    device: torch.device | None = None,
) -> dict[str, tuple[float, float]]:
    """Interleaved fwd+bwd timings: ``{method: (median ms, median per-round ratio to base)}``."""
    cuda = device is not None and device.type == "cuda"

    def once(fn: Callable[[Tensor], Tensor]) -> float:
        if cuda:
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn(x).backward(grad)
        if cuda:
            torch.cuda.synchronize(device)
        elapsed = time.perf_counter() - start
        x.grad = None
        return elapsed

    for _ in range(warmup):
        for fn in methods.values():
            once(fn)
    samples: dict[str, list[float]] = {name: [] for name in methods}
    order = list(methods)
    rng = random.Random(0)
    for _ in range(repeats):
        rng.shuffle(order)  # no method always follows the allocation-heavy naive_dense
        for name in order:
            samples[name].append(once(methods[name]))
    return {
        name: (
            statistics.median(ts) * 1e3,
            statistics.median(a / b for a, b in zip(ts, samples["base"], strict=True)),
        )
        for name, ts in samples.items()
    }


def peak_memory(
    methods: dict[str, Callable[[Tensor], Tensor]], trainable: list[Tensor], x: Tensor, grad: Tensor
) -> dict[str, float]:
    """MiB one forward + backward of each method adds at its peak (gradients cleared before each)."""

    def once(fn: Callable[[Tensor], Tensor]) -> None:
        fn(x).backward(grad)
        x.grad = None
        for p in trainable:
            p.grad = None

    return {name: measure_peak(lambda fn=fn: once(fn), device=x.device) / 2**20 for name, fn in methods.items()}


def _label(size: int | tuple[int, int]) -> str:
    return str(size) if isinstance(size, int) else f"{size[0]}->{size[1]}"


def markdown_table(rows: list[Row], methods: list[str], *, memory: bool = False) -> str:
    """Rows as a markdown table: one line per (size, tokens), ms and ratio per method (or peak MiB)."""
    unit = "peak MiB" if memory else "ms (x base)"
    header = "| d | tokens | " + " | ".join(f"{m} {unit}" for m in methods) + " |"
    lines = [header, "|" + "---|" * (2 + len(methods))]
    keys = list(dict.fromkeys((r.size, r.tokens) for r in rows))
    for size, tokens in keys:
        cells = []
        for m in methods:
            row = next(r for r in rows if (r.size, r.tokens, r.method) == (size, tokens, m))
            cells.append(f"{row.peak_mb:.1f}" if memory else f"{row.median_ms:.2f} ({row.ratio_to_base:.3f})")
        lines.append(f"| {size} | {tokens} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _shape(text: str) -> tuple[int, int]:
    try:
        d_in, d_out = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shapes: {text!r} is not IN x OUT, e.g. 4096x16") from None
    if d_in < 1 or d_out < 1:
        raise argparse.ArgumentTypeError(f"--shapes: {text!r} needs positive sizes")
    return d_in, d_out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command line of the benchmark."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", type=int, nargs="*", default=[384, 1024], help="d (square layer d x d)")
    p.add_argument("--shapes", type=_shape, nargs="*", default=[], help="IN x OUT layers, e.g. 4096x16 (the LLM head)")
    p.add_argument("--tokens", type=int, nargs="+", default=[512, 2048, 8192], help="rows of x")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    p.add_argument("--device", default="cpu", help="cpu or cuda (bf16 on GPU: --device cuda --dtype bfloat16)")
    p.add_argument("--repeats", type=int, default=15, help="interleaved rounds per case (8192 tokens: half)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--num-scales", type=int, default=8, help="B, branches")
    p.add_argument("--rank", type=int, default=1, help="r, inner rank per branch")
    p.add_argument("--alpha", type=float, default=6.0)
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    p.add_argument("--variants", action="store_true", help="also time the concatenated-weight variant")
    p.add_argument("--markdown", type=Path, default=None, help="append the result table to this file")
    p.add_argument("--machine", default=None, help="machine description for the markdown block")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> list[Row]:
    """Run the benchmark, log the table, optionally append it to a markdown file."""
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    dtype = DTYPES[args.dtype]
    rows: list[Row] = []
    names: list[str] = []
    device = torch.device(args.device)
    if device.type == "cpu" and "MALLOC_MMAP_THRESHOLD_" not in os.environ:
        sys.stderr.write("bench_mslr_kernel: MALLOC_MMAP_THRESHOLD_ is unset: CPU peak memory may read low "
                         "(cached allocator blocks); run with MALLOC_MMAP_THRESHOLD_=65536\n")
    for size in [*args.sizes, *args.shapes]:
        methods, trainable = build_methods(size, args.num_scales, args.rank, args.alpha, dtype, args.variants, device)
        names = list(methods)
        d_in, d_out = (size, size) if isinstance(size, int) else size
        for tokens in args.tokens:
            gen = torch.Generator().manual_seed(tokens)
            x = torch.randn(tokens, d_in, generator=gen).to(device, dtype).requires_grad_(True)
            grad = torch.randn(tokens, d_out, generator=gen).to(device, dtype)
            _check_agreement(methods, x, tol=1e-4 if dtype == torch.float32 else 5e-2)
            repeats = args.repeats if tokens < 8192 else max(3, args.repeats // 2)
            timings = time_case(methods, x, grad, repeats, args.warmup, device)
            for p in trainable:
                p.grad = None
            peaks = peak_memory(methods, trainable, x, grad)
            for name, (ms, ratio) in timings.items():
                rows.append(Row(_label(size), tokens, name, ms, ratio, peaks[name]))
                sys.stdout.write(f"d={_label(size)} tokens={tokens} {name:12s} {ms:9.2f} ms  x{ratio:.3f}  peak {peaks[name]:8.1f} MiB\n")
            sys.stdout.flush()
    table = markdown_table(rows, names) + "\n\nPeak memory of one forward + backward above the level before it:\n\n" + \
        markdown_table(rows, names, memory=True)
    sys.stdout.write(table + "\n")
    if args.markdown is not None:
        machine = args.machine or f"{torch.get_num_threads()} threads, {platform.processor() or platform.machine()}"
        cmd = " ".join(shlex.quote(a) for a in ["benchmarks/bench_mslr_kernel.py", *(argv or sys.argv[1:])])
        load_after = os.getloadavg()
        block = (
            f"\n{dt.date.today().isoformat()}, {machine}"
            f"{'' if torch.__version__ in machine else f', torch {torch.__version__}'}, {args.dtype}, "
            f"B={args.num_scales} x r={args.rank}, fwd+bwd, x requires grad, median of interleaved rounds; "
            f"1-min load average {load_before[0]:.2f} before, {load_after[0]:.2f} after.\n"
            f"Command: `.venv/bin/python {cmd}`\n\n{table}\n"
        )
        with args.markdown.open("a", encoding="utf-8") as fh:
            fh.write(block)
    return rows


if __name__ == "__main__":
    main()
