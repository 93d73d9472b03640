"""MultiScaleLowRankLinear: the MSLR adapter of MuScleLoRA (Wu et al., ACL 2024, arXiv 2402.12026).

Wraps one frozen linear layer ``W0`` (``d_out x d_in``, bias ``b0``) by composition and adds ``B``
low-rank branches with radial scales ``k_1..k_B`` (REFERENCE.md section 2.2)::

    h = W0 x + b0 + (alpha / r) * sum_i k_i R_i L_i x  =  base(x) + scaling * R (K * (L x))

``L`` = ``lora_a`` (``B*r x d_in``) and ``R`` = ``lora_b`` (``d_out x B*r``) are the only trainable
tensors; ``K`` repeats each ``k_i`` ``r`` times and ``scaling = alpha / r``. The forward stays factored
(:mod:`mslr_kernels.mslr`): the dense delta is only built by :meth:`MultiScaleLowRankLinear.delta_weight`
for an explicit :meth:`~MultiScaleLowRankLinear.merge`.

Choices:

- ``init="kaiming"`` (default, the authors'): ``L`` and ``R`` both Kaiming-uniform with ``a = sqrt(5)``
  over the stacked tensors (fan-in ``d_in`` for ``L``, ``B*r`` for ``R``), so the delta is non-zero at
  step 0. ``init="zero"``: ``L`` Kaiming, ``R`` zeros (LoRA-style), so the layer starts equal to its base.
- ``scales`` is a persistent buffer: it travels in the state dict, so loading a checkpoint restores the
  scales it was trained with (the adapter JSON should still record them so a mismatch can be reported).
  Save adapters unmerged; ``merged`` is not part of the state dict.
- Adapter tensors live on the base weight's device, in its dtype when that is floating point, else
  float32. Over a bitsandbytes 4-bit base they take the layer's compute dtype (the run's precision; the
  packed storage dtype says nothing), over an 8-bit base float32 (:mod:`pipeline.adapters.base_layers`).
  Input is cast to that dtype on entry, the result back to the input's dtype.
- A quantized base (bitsandbytes ``Linear4bit`` / ``Linear8bitLt``) always takes the generic path
  ``base_layer(x) + mslr_delta(...)``. :meth:`~MultiScaleLowRankLinear.merge` refuses it by default: the
  packed weight cannot absorb a dense delta. ``merge(dequantize=True)`` first replaces the base by a
  dequantized floating ``nn.Linear`` (with a warning), so a merged export is full precision, never
  silently re-rounded.
- ``keep_base=False`` drops ``W0 x + b0`` entirely (the authors' ``shortcut=true``); no published setting
  uses it.
"""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Sequence
from typing import Literal, get_args

import torch
from torch import Tensor, nn

from mslr_kernels.mslr import fold_scales, mslr_delta, mslr_linear
from pipeline.adapters import base_layers

__all__ = ["InitMode", "MultiScaleLowRankLinear"]

InitMode = Literal["kaiming", "zero"]


def _anchor_tensor(base_layer: nn.Module) -> Tensor | None:
    """The tensor that decides the adapter's device and dtype: ``base_layer.weight``, else its first parameter."""
    weight = getattr(base_layer, "weight", None)
    if isinstance(weight, Tensor):
        return weight
    return next(base_layer.parameters(), None)


class MultiScaleLowRankLinear(nn.Module):
    """Frozen linear base plus ``B`` scaled low-rank branches (MSLR).

    Args:
        base_layer: the layer to wrap; must expose integer ``in_features`` and ``out_features``
            (``nn.Linear``, bitsandbytes ``Linear4bit``, or any module with those attributes). Its
            parameters are frozen.
        rank: inner rank ``r`` of every branch.
        scales: the scales ``k_1..k_B`` (one branch each).
        alpha: ``scaling = alpha / rank``.
        dropout: dropout on the low-rank branch input (training mode only).
        init: ``"kaiming"`` (authors', non-zero delta at step 0) or ``"zero"`` (``lora_b`` zeros).
        keep_base: False drops ``W0 x + b0`` (pure low-rank replacement).

    Raises:
        TypeError: ``base_layer`` is not an ``nn.Module`` with integer ``in_features``/``out_features``.
        ValueError: a hyper-parameter is out of range.
    """

    def __init__(
        self,
        base_layer: nn.Module,
        *,
        rank: int = 1,
        scales: Sequence[float] = (1.0,),
        alpha: float = 1.0,
        dropout: float = 0.0,
        init: InitMode = "kaiming",
        keep_base: bool = True,
    ) -> None:
        super().__init__()
        in_features = getattr(base_layer, "in_features", None)
        out_features = getattr(base_layer, "out_features", None)
        if not isinstance(base_layer, nn.Module) or not all(
            isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in (in_features, out_features)
        ):
            raise TypeError(
                "MultiScaleLowRankLinear: base_layer must be an nn.Module with positive integer in_features and "
                f"out_features (nn.Linear, bitsandbytes Linear4bit); got {type(base_layer).__name__} with "
                f"in_features={in_features!r}, out_features={out_features!r}. Wrap a linear layer instead."
            )
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise ValueError(f"MultiScaleLowRankLinear: rank must be a positive int, got {rank!r}")
        if isinstance(scales, str | bytes) or not isinstance(scales, Sequence) or len(scales) == 0:
            raise ValueError(
                f"MultiScaleLowRankLinear: scales must be a non-empty sequence of numbers, got {scales!r}"
            )
        bad = [k for k in scales if isinstance(k, bool) or not isinstance(k, numbers.Real) or not math.isfinite(k)]
        if bad:
            raise ValueError(f"MultiScaleLowRankLinear: scales must be finite numbers, got {list(scales)!r}")
        if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not math.isfinite(alpha) or alpha <= 0:
            raise ValueError(f"MultiScaleLowRankLinear: alpha must be a finite number > 0, got {alpha!r}")
        if isinstance(dropout, bool) or not isinstance(dropout, numbers.Real) or not 0.0 <= dropout < 1.0:
            raise ValueError(f"MultiScaleLowRankLinear: dropout must be in [0, 1), got {dropout!r}")
        if not isinstance(keep_base, bool):
            raise ValueError(f"MultiScaleLowRankLinear: keep_base must be a bool, got {keep_base!r}")

        self.base_layer = base_layer
        for param in base_layer.parameters():
            param.requires_grad_(False)
        self.in_features: int = in_features
        self.out_features: int = out_features
        self.rank = rank
        self.alpha = float(alpha)
        self.scaling = self.alpha / rank
        self.dropout_p = float(dropout)
        self.keep_base = keep_base
        self.merged = False
        self.init: InitMode = init
        self._merge_versions: tuple[int, int, int] | None = None

        anchor = _anchor_tensor(base_layer)
        device = anchor.device if anchor is not None else torch.device("cpu")
        dtype = anchor.dtype if anchor is not None and anchor.is_floating_point() else torch.float32
        quantized_dtype = base_layers.adapter_dtype(base_layer)
        if quantized_dtype is not None:
            dtype = quantized_dtype
            base_layers.disable_cpu_inference_repacking(base_layer)
        total_rank = len(scales) * rank
        self.lora_a = nn.Parameter(torch.empty(total_rank, in_features, device=device, dtype=dtype))
        self.lora_b = nn.Parameter(torch.empty(out_features, total_rank, device=device, dtype=dtype))
        self.register_buffer(
            "scales", torch.tensor([float(k) for k in scales], device=device, dtype=torch.float32), persistent=True
        )
        self.dropout: nn.Module = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.reset_parameters(init)

    @property
    def num_scales(self) -> int:
        """Number of branches ``B``."""
        return int(self.scales.numel())

    def reset_parameters(self, init: InitMode = "kaiming") -> None:
        """(Re)initialise ``lora_a`` and ``lora_b``.

        Args:
            init: ``"kaiming"``: both Kaiming-uniform with ``a = sqrt(5)`` (authors; the delta is
                non-zero at step 0). ``"zero"``: ``lora_a`` Kaiming-uniform, ``lora_b`` zeros (LoRA-style;
                the layer starts equal to its base).

        Raises:
            ValueError: unknown ``init``.
            RuntimeError: the adapter is merged (unmerge first).
        """
        if init not in get_args(InitMode):
            raise ValueError(
                f"MultiScaleLowRankLinear.reset_parameters: init must be one of {get_args(InitMode)}, got {init!r}"
            )
        if self.merged:
            raise RuntimeError("MultiScaleLowRankLinear.reset_parameters: the adapter is merged; call unmerge() first")
        with torch.no_grad():
            nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))
            if init == "kaiming":
                nn.init.kaiming_uniform_(self.lora_b, a=math.sqrt(5))
            else:
                nn.init.zeros_(self.lora_b)
        self.init = init

    def scale_vector(self) -> Tensor:
        """``s = (alpha / r) * repeat_interleave(scales, r)`` in the adapter dtype, shape ``[B*r]``."""
        return fold_scales(self.scales, self.rank, self.scaling).to(self.lora_a.dtype)

    def _fused_base(self) -> nn.Linear | None:
        """The base if the fused kernel applies to it, else None (then ``base_layer(x) + mslr_delta``).

        Fused: exactly ``nn.Linear``, ``keep_base``, dropout inactive (``p == 0`` or eval mode), a frozen
        weight in the adapter dtype with its full shape (a ZeRO-3 partitioned weight, marked by ``ds_id``
        and gathered only by the base's own forward hooks, takes the generic path). A bitsandbytes
        quantized linear (an ``nn.Linear`` subclass whose weight is packed) is never fused.
        """
        base = self.base_layer
        if type(base) is not nn.Linear or not self.keep_base or base_layers.is_quantized_linear(base):
            return None
        if self.dropout_p > 0 and self.training:
            return None
        weight = base.weight
        if hasattr(weight, "ds_id") or tuple(weight.shape) != (self.out_features, self.in_features):
            return None
        if weight.dtype != self.lora_a.dtype or weight.requires_grad:
            return None
        if base.bias is not None and base.bias.requires_grad:
            return None
        return base

    def forward(self, x: Tensor) -> Tensor:
        """``base(x) + scaling * lora_b(scales * lora_a(dropout(x)))``; shapes ``[..., d_in] -> [..., d_out]``."""
        if self.merged:
            return self.base_layer(x)
        dtype = self.lora_a.dtype
        scale_vec = self.scale_vector()  # [B*r]
        x_a = x.to(dtype)  # adapter dtype on entry
        base = self._fused_base()
        if base is not None:
            out = mslr_linear(x_a, base.weight, base.bias, self.lora_a, self.lora_b, scale_vec)
            return out.to(x.dtype)
        h = self.dropout(x_a)  # [..., d_in]
        if not self.keep_base:
            return mslr_delta(h, self.lora_a, self.lora_b, scale_vec).to(x.dtype)
        base_out = self.base_layer(x)  # [..., d_out]
        if base_out.dtype == dtype:
            return mslr_delta(h, self.lora_a, self.lora_b, scale_vec, base_out=base_out).to(x.dtype)
        delta = mslr_delta(h, self.lora_a, self.lora_b, scale_vec)
        return (base_out + delta.to(base_out.dtype)).to(x.dtype)

    def delta_weight(self) -> Tensor:
        """Dense ``scaling * R diag(K) L`` (``d_out x d_in``), computed in float32, returned in the adapter dtype.

        Only for :meth:`merge` and tests; the forward pass never builds it.
        """
        s = fold_scales(self.scales.float(), self.rank, self.scaling)  # [B*r]
        dense = self.lora_b.float() @ (self.lora_a.float() * s[:, None])  # [d_out, d_in]
        return dense.to(self.lora_a.dtype)

    def _check_mergeable(self, what: str) -> nn.Linear:
        if not self.keep_base:
            raise RuntimeError(
                f"MultiScaleLowRankLinear.{what}: keep_base=False drops W0 x + b0, so there is no base weight "
                "to merge into; build the layer with keep_base=True"
            )
        base = self.base_layer
        if base_layers.is_quantized_linear(base):
            raise TypeError(
                f"MultiScaleLowRankLinear.{what}: the base is a quantized bitsandbytes "
                f"{base_layers.describe_quantized(base)}; its packed weight cannot absorb the dense delta without "
                "re-quantizing it (which rounds most of the adapter away). Fix: save the adapter unmerged "
                "(pipeline.adapters.state.save_adapter) and apply it over the quantized base, or call "
                "merge(dequantize=True) to replace the base by a dequantized floating nn.Linear first"
            )
        if not isinstance(base, nn.Linear) or not base.weight.is_floating_point():
            raise TypeError(
                f"MultiScaleLowRankLinear.{what}: only a floating-point nn.Linear base can be merged, got "
                f"{type(base).__name__} with weight dtype {getattr(getattr(base, 'weight', None), 'dtype', None)}; "
                "for a quantized base, dequantize into an nn.Linear first"
            )
        return base

    def _adapter_versions(self) -> tuple[int, int, int]:
        return (self.lora_a._version, self.lora_b._version, self.scales._version)

    @torch.no_grad()
    def merge(self, *, dequantize: bool = False) -> None:
        """Add :meth:`delta_weight` to the base weight in place; a second call is a no-op with a warning.

        Args:
            dequantize: for a bitsandbytes quantized base only: first replace ``base_layer`` by a frozen
                floating ``nn.Linear`` holding its dequantized weight (in the adapter dtype), with a
                warning, then merge into that. The layer stays full precision afterwards (:meth:`unmerge`
                restores the dequantized weight, not the quantized one). Without it a quantized base is
                refused. Ignored for a floating base.

        Raises:
            RuntimeError: ``keep_base`` is False.
            TypeError: the base is quantized (and ``dequantize`` is False) or not a floating-point
                ``nn.Linear``.
        """
        if dequantize and self.keep_base and base_layers.is_quantized_linear(self.base_layer) and not self.merged:
            description = base_layers.describe_quantized(self.base_layer)
            self.base_layer = base_layers.dequantized_linear(self.base_layer)
            warnings.warn(
                f"MultiScaleLowRankLinear.merge: replaced the quantized base {description} by a dequantized "
                f"{self.base_layer.weight.dtype} nn.Linear before merging; the merged layer is full precision "
                "(about 4x / 2x the memory of the 4-bit / 8-bit weight)",
                UserWarning,
                stacklevel=2,
            )
        base = self._check_mergeable("merge")
        if self.merged:
            warnings.warn("MultiScaleLowRankLinear.merge: already merged; nothing done", UserWarning, stacklevel=2)
            return
        base.weight.add_(self.delta_weight().to(base.weight.dtype))
        self.merged = True
        self._merge_versions = self._adapter_versions()

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract :meth:`delta_weight` from the base weight; a no-op with a warning when not merged.

        Raises:
            RuntimeError: ``keep_base`` is False, or ``lora_a``/``lora_b``/``scales`` changed since
                :meth:`merge` (the subtraction would not restore the base weight).
            TypeError: the base is not a floating-point ``nn.Linear``.
        """
        base = self._check_mergeable("unmerge")
        if not self.merged:
            warnings.warn("MultiScaleLowRankLinear.unmerge: not merged; nothing done", UserWarning, stacklevel=2)
            return
        if self._adapter_versions() != self._merge_versions:
            raise RuntimeError(
                "MultiScaleLowRankLinear.unmerge: lora_a, lora_b or scales were modified in place after merge(), "
                "so subtracting the current delta would not restore the base weight; reload the base weight"
            )
        base.weight.sub_(self.delta_weight().to(base.weight.dtype))
        self.merged = False
        self._merge_versions = None

    def extra_repr(self) -> str:
        scales = ", ".join(f"{k:g}" for k in self.scales.tolist())
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
            f"scales=({scales}), alpha={self.alpha:g}, scaling={self.scaling:g}, dropout={self.dropout_p:g}, "
            f"init={self.init}, keep_base={self.keep_base}, merged={self.merged}"
        )
