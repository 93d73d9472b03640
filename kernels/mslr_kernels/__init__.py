"""Numerical kernels of MuScleLoRA (arXiv 2402.12026): the fused multi-scale low-rank (MSLR) op."""

from mslr_kernels.mslr import fold_scales, mslr_delta, mslr_linear, mslr_reference

__all__ = ["fold_scales", "mslr_delta", "mslr_linear", "mslr_reference"]
