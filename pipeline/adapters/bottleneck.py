"""Bottleneck adapter (Houlsby et al. 2019; Pfeiffer et al. 2021 placement), a baseline beside LoRA.

One adapter wraps one frozen projection by composition and adds a residual bottleneck on its output::

    y = base(x)                                  (..., d)
    h = y + up(act(down(dropout(y))))            down: d -> m,  up: m -> d,  m = d / reduction_factor

``up`` starts at zero, so a freshly injected adapter leaves the model's function unchanged. The
Pfeiffer placement puts one adapter on the output projection of every feed-forward block (before
the block's residual add and layer norm in BERT-style encoders), which is what
:func:`default_bottleneck_targets` selects per family.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor, nn

from pipeline.config import BOTTLENECK_TARGETS

logger = logging.getLogger(__name__)

Activation = Literal["relu", "gelu", "silu"]
_ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU}

def default_bottleneck_targets(model_type: str) -> list[str]:
    """Pfeiffer placement for ``model_type`` (one adapter per feed-forward output projection).

    Raises:
        ValueError: the family has no known placement; set the targets explicitly.
    """
    if model_type not in BOTTLENECK_TARGETS:
        raise ValueError(
            f"no default bottleneck-adapter placement for model_type {model_type!r}; known: {sorted(BOTTLENECK_TARGETS)}. "
            "Set adapter.targets to regular expressions of the output projections"
        )
    return list(BOTTLENECK_TARGETS[model_type])


class BottleneckAdapter(nn.Module):
    """A frozen projection followed by a residual bottleneck (see the module docstring).

    Args:
        base_layer: the wrapped projection (``nn.Linear``, GPT-2 ``Conv1D`` or any module whose output
            has ``out_features`` channels in the last dimension).
        out_features: channels of ``base_layer``'s output.
        reduction_factor: bottleneck width ``m = max(1, out_features // reduction_factor)``.
        activation: non-linearity between ``down`` and ``up``.
        dropout: dropout on the bottleneck input.
    """

    def __init__(
        self,
        base_layer: nn.Module,
        *,
        out_features: int,
        reduction_factor: int = 16,
        activation: Activation = "relu",
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if reduction_factor < 1:
            raise ValueError(f"reduction_factor must be >= 1, got {reduction_factor}")
        if activation not in _ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(_ACTIVATIONS)}, got {activation!r}")
        self.base_layer = base_layer
        self.out_features = out_features
        self.bottleneck = max(1, out_features // reduction_factor)
        weight = next(base_layer.parameters())
        factory = {"device": weight.device, "dtype": weight.dtype if weight.is_floating_point() else torch.float32}
        self.down = nn.Linear(out_features, self.bottleneck, **factory)
        self.up = nn.Linear(self.bottleneck, out_features, **factory)
        self.act = _ACTIVATIONS[activation]()
        self.dropout = nn.Dropout(dropout)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Kaiming-uniform ``down`` (nn.Linear's default) and zero ``up``: the adapter starts as identity."""
        self.down.reset_parameters()
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: Tensor) -> Tensor:
        y = self.base_layer(x)  # (..., d)
        h = self.down(self.dropout(y.to(self.down.weight.dtype)))  # (..., m)
        return y + self.up(self.act(h)).to(y.dtype)  # (..., d)

    def extra_repr(self) -> str:
        return f"out_features={self.out_features}, bottleneck={self.bottleneck}"


def _out_features(module: nn.Module) -> int | None:
    if isinstance(module, nn.Linear):
        return module.out_features
    if type(module).__name__ == "Conv1D":  # transformers' GPT-2 projection (weight d_in x d_out)
        return int(module.nf)
    return getattr(module, "out_features", None)


def inject_bottleneck(
    model: nn.Module,
    *,
    targets: Sequence[str],
    reduction_factor: int = 16,
    activation: Activation = "relu",
    dropout: float = 0.0,
) -> list[str]:
    """Wrap every module whose name fully matches one of ``targets`` with a :class:`BottleneckAdapter`.

    Returns:
        The wrapped module names.

    Raises:
        ValueError: no module matches, or a match has no known output width.
    """
    patterns = [re.compile(t) for t in targets]
    names = [name for name, _ in model.named_modules() if name and any(p.fullmatch(name) for p in patterns)]
    if not names:
        raise ValueError(f"bottleneck-adapter targets {list(targets)} match no module of {type(model).__name__}")
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        module = getattr(parent, child)
        width = _out_features(module)
        if width is None:
            raise ValueError(f"module {name!r} ({type(module).__name__}) has no out_features; target a linear projection")
        setattr(parent, child, BottleneckAdapter(module, out_features=width, reduction_factor=reduction_factor,
                                                 activation=activation, dropout=dropout))
    logger.info("bottleneck adapters (reduction %d, %s) on %d modules", reduction_factor, activation, len(names))
    return names
