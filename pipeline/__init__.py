"""MuScleLoRA pipeline (Wu et al., ACL 2024, arXiv 2402.12026).

Public entry points: :class:`MultiScaleLowRankLinear` (the MSLR adapter), :func:`align_gradients`
(gradient alignment to a clean reference), :func:`load_config` / :class:`RunConfig` and
:func:`run_training` (the single-process training loop).
"""

from pipeline.adapters.mslr import MultiScaleLowRankLinear
from pipeline.alignment import AlignResult, align_gradients
from pipeline.config import ConfigError, RunConfig, load_config

__all__ = [
    "AlignResult",
    "ConfigError",
    "MultiScaleLowRankLinear",
    "RunConfig",
    "align_gradients",
    "load_config",
    "run_training",
]


def __getattr__(name: str):
    # run_training pulls in transformers/peft/datasets: import it only when asked for.
    if name == "run_training":
        from pipeline.training import run_training

        return run_training
    raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
