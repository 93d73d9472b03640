"""Independent reference for the MSLR layer, written from REFERENCE.md section 2.2 (shared by tests)."""

from __future__ import annotations

import torch


def naive_mslr(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scales: list[float],
    rank: int,
    alpha: float,
) -> torch.Tensor:
    """REFERENCE.md 2.2 as written: base term plus one dense branch per scale (weight None: delta only)."""
    h = torch.zeros(*x.shape[:-1], lora_b.shape[0], dtype=x.dtype)
    if weight is not None:
        h = h + x @ weight.T
    if bias is not None:
        h = h + bias
    for i, k_i in enumerate(scales):
        l_i = lora_a[i * rank : (i + 1) * rank]  # [r, d_in]
        r_i = lora_b[:, i * rank : (i + 1) * rank]  # [d_out, r]
        h = h + (alpha / rank) * k_i * (x @ (r_i @ l_i).T)
    return h
