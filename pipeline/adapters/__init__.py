"""Adapters of MuScleLoRA (arXiv 2402.12026): the multi-scale low-rank layer (MSLR) and its helpers."""

from pipeline.adapters.mslr import MultiScaleLowRankLinear

__all__ = ["MultiScaleLowRankLinear"]
