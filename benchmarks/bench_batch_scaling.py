"""Does one forward + backward over a concatenated batch cost less than two over its halves?

MuScleLoRA's gradient alignment adds a reference forward + backward of the training batch size to every
step (REFERENCE.md section 2.3). Running the training and reference rows as one concatenated batch
(one forward, one backward, gradients split by rows) only pays off where a batch of 2B rows costs
less than twice a batch of B, i.e. where the device is not saturated by B rows (small batches on a
GPU). This benchmark measures that ratio for the embedded MiniLM with LoRA on q/v (the frozen backbone
is what both passes traverse): fwd + bwd at B rows and at 2B rows, interleaved rounds, median.

    python benchmarks/bench_batch_scaling.py --batch 32 --length 64 --threads 2 --repeats 8
    python benchmarks/bench_batch_scaling.py --device cuda --batch 16 --length 128   # on a GPU

Prints ``time(2B) / time(B)``: 2.0 means no shared work to gain (the alignment's extra pass costs a
full pass), 1.0 means the second half is free.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "kernels")]  # run from a checkout: pipeline, mslr_kernels

from pipeline import modeling  # noqa: E402
from pipeline.adapters import inject  # noqa: E402


def main(argv: list[str] | None = None) -> float:
    """Run the measurement and print the ratio (returned too)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="minilm", help="local checkpoint directory or 'minilm' (the embedded default)")
    p.add_argument("--batch", type=int, default=32, help="B, rows of one pass")
    p.add_argument("--length", type=int, default=64, help="tokens per row")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=8)
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    path = modeling.resolve_model_path(args.model)
    info = modeling.read_model_info(path)
    model = modeling.load_classifier(path, num_labels=2, dtype=torch.float32, is_decoder=info.is_decoder)
    targets = ["q_proj", "v_proj"] if info.is_decoder else ["query", "value"]
    model = inject.apply_lora(model, target_modules=targets, r=8, alpha=16, dropout=0.0).to(device)
    inject.set_trainable(model, full=False, train_head=True, head_names=modeling.head_module_names(info.model_type, info.is_decoder))
    model.train()
    gen = torch.Generator().manual_seed(0)
    vocab = model.get_input_embeddings().num_embeddings

    def once(rows: int) -> float:
        ids = torch.randint(min(1000, vocab // 2), vocab, (rows, args.length), generator=gen).to(device)
        labels = torch.randint(0, 2, (rows,), generator=gen).to(device)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        F.cross_entropy(model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits, labels).backward()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        model.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    for rows in (args.batch, 2 * args.batch):
        once(rows)
    single, double = [], []
    for _ in range(args.repeats):
        single.append(once(args.batch))
        double.append(once(2 * args.batch))
    ratio = statistics.median(b / a for a, b in zip(single, double))
    print(f"{args.model} on {device}, {args.threads} threads, length {args.length}: fwd+bwd {args.batch} rows "
          f"{1e3 * statistics.median(single):.0f} ms, {2 * args.batch} rows {1e3 * statistics.median(double):.0f} ms; "
          f"time(2B)/time(B) = {ratio:.2f}")
    return ratio


if __name__ == "__main__":
    main()
