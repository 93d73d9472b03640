"""Fused multi-scale low-rank (MSLR) linear op of MuScleLoRA (Wu et al., ACL 2024, arXiv 2402.12026).

MSLR wraps one frozen linear layer ``W0`` (``d_out x d_in``) with bias ``b0`` and adds ``B`` low-rank
branches, branch ``i`` scaled by the radial scale ``k_i``::

    h = W0 x + b0 + (alpha / r) * sum_i k_i R_i L_i x
      = W0 x + b0 + R diag(s) L x,          s = (alpha / r) * repeat_interleave(k, r)

``L`` (``lora_a``, ``(B*r) x d_in``) stacks the ``L_i``, ``R`` (``lora_b``, ``d_out x (B*r)``) stacks the
``R_i``. The scales and ``alpha / r`` are folded into the single vector ``s`` (:func:`fold_scales`), so
the op never sees them separately. For row-major inputs ``x`` (``n x d_in``)::

    z   = x L^T                        [n, B*r]
    h   = x W0^T + b0 + (z * s) R^T    [n, d_out]

and, with ``g = dL/dh`` and ``gz = (g R) * s``::

    dL/dx = g W0 + gz L      dL/dL = gz^T x      dL/dR = g^T (z * s)      dL/ds = sum_n z * (g R)

The dense ``d_out x d_in`` delta ``R diag(s) L`` is never built (the authors build it on every call).
``W0`` and ``b0`` are frozen: they get no gradient, and passing a ``weight`` that requires grad is an
error rather than a silently missing gradient.

Implementation notes (2-core AMD EPYC, torch 2.13 CPU, MKL; see ``docs/BENCHMARKS.md``): the two large
GEMMs (``x W0^T`` forward, ``g W0`` backward) cost as much as in the base layer alone; everything else is
skinny and memory bound. The operand layouts below were chosen by measurement: MKL is 2-9x slower for the
same skinny product in the other layout (for example ``g^T (z*s)`` takes 5.6 ms where ``((z*s)^T g)^T``
takes 0.6 ms at ``n=2048, d=1024, B*r=8``), and a rank-``B*r`` update added in place with ``beta=1``
(``addmm_``) is about twice as fast as the same product written to fresh memory. Concatenating the
weights (``[W0; L]`` for one forward GEMM, ``[g, gz] [W0; L]`` for one input-gradient GEMM) measured no
faster here: it saves one skinny pass but pays for a strided output or a copy of ``g`` and a second copy
of ``W0``; ``benchmarks/bench_mslr_kernel.py --variants`` keeps that comparison reproducible.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import FunctionCtx, once_differentiable

__all__ = ["fold_scales", "mslr_delta", "mslr_linear", "mslr_reference"]


def fold_scales(scales: Tensor, rank: int, scaling: float) -> Tensor:
    """Fold the per-branch scales and ``alpha / r`` into one per-rank vector.

    Args:
        scales: the scales ``k_1..k_B``, shape ``[B]``.
        rank: inner rank ``r`` of every branch.
        scaling: ``alpha / r``.

    Returns:
        ``scaling * repeat_interleave(scales, rank)``, shape ``[B * rank]``, same dtype and device as
        ``scales``.

    Raises:
        ValueError: ``scales`` is not 1-D or ``rank`` is not a positive integer.
    """
    if scales.dim() != 1:
        raise ValueError(
            f"fold_scales: scales must be 1-D [B], got shape {tuple(scales.shape)}; pass the k_i as a vector"
        )
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"fold_scales: rank must be a positive int, got {rank!r}")
    return scales.repeat_interleave(rank) * scaling


def _check_low_rank(
    where: str, x: Tensor, lora_a: Tensor, lora_b: Tensor, scale_vec: Tensor, d_out: int | None = None
) -> None:
    """Raise a ValueError naming the mismatching shapes of the low-rank operands."""
    if lora_a.dim() != 2 or lora_b.dim() != 2 or scale_vec.dim() != 1:
        raise ValueError(
            f"{where}: lora_a and lora_b must be 2-D and scale_vec 1-D, got lora_a {tuple(lora_a.shape)}, "
            f"lora_b {tuple(lora_b.shape)}, scale_vec {tuple(scale_vec.shape)}"
        )
    if x.dim() < 1 or x.shape[-1] != lora_a.shape[1]:
        raise ValueError(
            f"{where}: x's last dimension must equal lora_a.shape[1] = d_in = {lora_a.shape[1]}, "
            f"got x of shape {tuple(x.shape)}"
        )
    total_rank = lora_a.shape[0]
    if lora_b.shape[1] != total_rank or scale_vec.shape[0] != total_rank:
        raise ValueError(
            f"{where}: lora_a is [B*r, d_in] = {tuple(lora_a.shape)}, so lora_b must be [d_out, {total_rank}] "
            f"and scale_vec [{total_rank}]; got lora_b {tuple(lora_b.shape)}, scale_vec {tuple(scale_vec.shape)} "
            "(build scale_vec with fold_scales(scales, rank, scaling))"
        )
    if d_out is not None and lora_b.shape[0] != d_out:
        raise ValueError(
            f"{where}: lora_b must have d_out = weight.shape[0] = {d_out} rows, got lora_b {tuple(lora_b.shape)}"
        )


def _check_frozen_base(where: str, x: Tensor, weight: Tensor, bias: Tensor | None) -> None:
    """Raise if the frozen base operands do not fit ``x`` or would silently lose a gradient."""
    if weight.dim() != 2 or weight.shape[1] != x.shape[-1]:
        raise ValueError(
            f"{where}: weight must be [d_out, d_in] with d_in = x.shape[-1] = {x.shape[-1]}, "
            f"got weight {tuple(weight.shape)}"
        )
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"{where}: bias must be [d_out] = [{weight.shape[0]}] or None, got {tuple(bias.shape)}")
    if weight.dtype != x.dtype or (bias is not None and bias.dtype != x.dtype):
        raise TypeError(
            f"{where}: x, weight and bias must share one dtype, got x {x.dtype}, weight {weight.dtype}, "
            f"bias {None if bias is None else bias.dtype}; cast x to the base weight's dtype first "
            "(MultiScaleLowRankLinear does this on entry)"
        )
    if torch.is_grad_enabled() and (weight.requires_grad or (bias is not None and bias.requires_grad)):
        raise ValueError(
            f"{where}: the base weight/bias are treated as frozen and get no gradient, but "
            f"weight.requires_grad={weight.requires_grad}, "
            f"bias.requires_grad={None if bias is None else bias.requires_grad}; freeze them with "
            "requires_grad_(False) or use mslr_reference for a trainable base"
        )


def _rows(t: Tensor) -> Tensor:
    """View ``[..., d]`` as ``[n, d]`` (copies only if the leading dims cannot be merged)."""
    return t.reshape(-1, t.shape[-1])


class _MSLRLinear(torch.autograd.Function):
    """``x W^T + b + ((x A^T) * s) B^T`` with a frozen ``W``/``b``; see the module docstring."""

    @staticmethod
    def forward(
        ctx: FunctionCtx,
        x: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        lora_a: Tensor,
        lora_b: Tensor,
        scale_vec: Tensor,
    ) -> Tensor:
        x2 = _rows(x)  # [n, d_in]
        out = F.linear(x2, weight, bias)  # [n, d_out], the base layer's own GEMM
        z = F.linear(x2, lora_a)  # [n, B*r]
        out.addmm_(z * scale_vec, lora_b.t())  # += (z*s) B^T, rank-(B*r) update in place
        need_x, need_a, need_b, need_s = (ctx.needs_input_grad[i] for i in (0, 3, 4, 5))
        ctx.save_for_backward(
            weight if need_x else None, *_low_rank_saved(x2, z, lora_a, lora_b, scale_vec, need_x, need_a, need_b, need_s)
        )
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    @once_differentiable
    def backward(ctx: FunctionCtx, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        weight, x2, z, lora_a, lora_b, scale_vec = ctx.saved_tensors
        need_x, need_a, need_b, need_s = (ctx.needs_input_grad[i] for i in (0, 3, 4, 5))
        g = _rows(grad_out)  # [n, d_out]
        grad_x = None
        if need_x:
            grad_x = g @ weight  # [n, d_in], the base layer's own GEMM
        grad_z, grad_a, grad_b, grad_s = _low_rank_backward(
            g, x2, z, lora_b, scale_vec, need_x=need_x, need_a=need_a, need_b=need_b, need_s=need_s
        )
        if need_x:
            grad_x.addmm_(grad_z, lora_a)  # += dL/dz A, in place
            grad_x = grad_x.view(*grad_out.shape[:-1], grad_x.shape[-1])
        return grad_x, None, None, grad_a, grad_b, grad_s


class _MSLRDelta(torch.autograd.Function):
    """``((x A^T) * s) B^T``, optionally added to ``base_out`` in the same pass."""

    @staticmethod
    def forward(
        ctx: FunctionCtx,
        x: Tensor,
        lora_a: Tensor,
        lora_b: Tensor,
        scale_vec: Tensor,
        base_out: Tensor | None,
    ) -> Tensor:
        x2 = _rows(x)  # [n, d_in]
        z = F.linear(x2, lora_a)  # [n, B*r]
        zs = z * scale_vec
        if base_out is None:
            out = zs @ lora_b.t()  # [n, d_out]
        else:
            out = torch.addmm(_rows(base_out), zs, lora_b.t())
        need_x, need_a, need_b, need_s = (ctx.needs_input_grad[i] for i in range(4))
        ctx.save_for_backward(*_low_rank_saved(x2, z, lora_a, lora_b, scale_vec, need_x, need_a, need_b, need_s))
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    @once_differentiable
    def backward(ctx: FunctionCtx, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        x2, z, lora_a, lora_b, scale_vec = ctx.saved_tensors
        need_x, need_a, need_b, need_s, need_base = ctx.needs_input_grad
        g = _rows(grad_out)  # [n, d_out]
        grad_z, grad_a, grad_b, grad_s = _low_rank_backward(
            g, x2, z, lora_b, scale_vec, need_x=need_x, need_a=need_a, need_b=need_b, need_s=need_s
        )
        grad_x = (grad_z @ lora_a).view(*grad_out.shape[:-1], lora_a.shape[1]) if need_x else None
        return grad_x, grad_a, grad_b, grad_s, (grad_out if need_base else None)


def _low_rank_saved(
    x2: Tensor, z: Tensor, lora_a: Tensor, lora_b: Tensor, scale_vec: Tensor,
    need_x: bool, need_a: bool, need_b: bool, need_s: bool,
) -> tuple[Tensor | None, ...]:
    """What the low-rank branch's backward reads, ``(x2, z, lora_a, lora_b, scale_vec)``; None where unneeded."""
    return (
        x2 if need_a else None,
        z if (need_b or need_s) else None,
        lora_a if need_x else None,
        lora_b if (need_x or need_a or need_s) else None,
        scale_vec,
    )


def _low_rank_backward(
    g: Tensor, x2: Tensor, z: Tensor, lora_b: Tensor, scale_vec: Tensor,
    *, need_x: bool, need_a: bool, need_b: bool, need_s: bool,
) -> tuple[Tensor | None, Tensor | None, Tensor | None, Tensor | None]:
    """Gradients of ``((x A^T) * s) B^T`` given the output-gradient rows ``g`` (shared by both ops).

    Args:
        g: output gradient rows [n, d_out]; x2: input rows [n, d_in]; z: ``x A^T`` [n, B*r].

    Returns:
        ``(dL/dz, grad_a, grad_b, grad_s)``, each None when not needed; ``dL/dz = (g B) * s`` [n, B*r] is
        returned for the caller's ``grad_x`` (``dL/dz A``) when ``need_x``.
    """
    grad_z = grad_a = grad_b = grad_s = None
    gz = None
    if need_x or need_a or need_s:
        gz = F.linear(g, lora_b.t().contiguous())  # g B: [n, B*r]
    if need_b:
        grad_b = ((z * scale_vec).t().contiguous() @ g).t().contiguous()  # [d_out, B*r]
    if need_s:
        grad_s = (gz * z).sum(0)  # [B*r]
    if need_x or need_a:
        gz = gz * scale_vec  # dL/dz
        if need_a:
            grad_a = gz.t().contiguous() @ x2  # [B*r, d_in]
        if need_x:
            grad_z = gz
    return grad_z, grad_a, grad_b, grad_s


def _cast_low_rank(x: Tensor, lora_a: Tensor, lora_b: Tensor, scale_vec: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Cast the adapter operands to ``x``'s dtype (a differentiable no-op when they already match)."""
    return lora_a.to(x.dtype), lora_b.to(x.dtype), scale_vec.to(x.dtype)


def mslr_linear(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    lora_a: Tensor,
    lora_b: Tensor,
    scale_vec: Tensor,
) -> Tensor:
    """Fused MSLR over a plain frozen linear base: ``x W^T + b + ((x A^T) * s) B^T``.

    Never builds the dense ``d_out x d_in`` delta. Computes in ``x``'s dtype (float32, bfloat16,
    float16, float64); the adapter operands are cast to it. Under ``torch.autocast`` it falls back to
    :func:`mslr_reference`, whose plain ops follow autocast's per-op dtypes. ``weight``/``bias`` get no gradient; ``x``,
    ``lora_a``, ``lora_b`` and ``scale_vec`` get one when they require it (and only then).

    Args:
        x: input ``[..., d_in]``, any number of leading dims.
        weight: frozen base weight ``[d_out, d_in]`` in ``x``'s dtype.
        bias: frozen base bias ``[d_out]`` or None.
        lora_a: ``L``, ``[B*r, d_in]``.
        lora_b: ``R``, ``[d_out, B*r]``.
        scale_vec: ``s = fold_scales(scales, r, alpha / r)``, ``[B*r]``.

    Returns:
        ``[..., d_out]`` in ``x``'s dtype.

    Raises:
        ValueError: shapes do not fit, or ``weight``/``bias`` require grad while grad mode is on.
        TypeError: ``weight``/``bias`` dtype differs from ``x``'s.
    """
    _check_frozen_base("mslr_linear", x, weight, bias)
    _check_low_rank("mslr_linear", x, lora_a, lora_b, scale_vec, d_out=weight.shape[0])
    if torch.is_autocast_enabled(x.device.type):  # autocast picks per-op dtypes; let plain autograd follow it
        return mslr_reference(x, weight, bias, lora_a, lora_b, scale_vec)
    lora_a, lora_b, scale_vec = _cast_low_rank(x, lora_a, lora_b, scale_vec)
    return _MSLRLinear.apply(x, weight, bias, lora_a, lora_b, scale_vec)


def mslr_delta(
    x: Tensor,
    lora_a: Tensor,
    lora_b: Tensor,
    scale_vec: Tensor,
    *,
    base_out: Tensor | None = None,
) -> Tensor:
    """The low-rank MSLR term ``((x A^T) * s) B^T`` alone, for any base layer.

    For bases the fused op cannot see into (a bitsandbytes 4-bit linear, a ZeRO-partitioned linear,
    any custom module) the caller computes ``base_layer(x)`` itself. Passing that result as
    ``base_out`` adds the delta to it in the same pass (one write instead of delta + sum); its gradient
    is passed through unchanged. Under ``torch.autocast`` it runs as plain autograd ops.

    Args:
        x: input ``[..., d_in]``.
        lora_a: ``L``, ``[B*r, d_in]``.
        lora_b: ``R``, ``[d_out, B*r]``.
        scale_vec: ``s = fold_scales(scales, r, alpha / r)``, ``[B*r]``.
        base_out: optional ``[..., d_out]`` in ``x``'s dtype to add the delta to.

    Returns:
        ``[..., d_out]`` in ``x``'s dtype: the delta, or ``base_out + delta``.

    Raises:
        ValueError: shapes do not fit.
        TypeError: ``base_out``'s dtype differs from ``x``'s.
    """
    _check_low_rank("mslr_delta", x, lora_a, lora_b, scale_vec)
    if base_out is not None:
        expected = (*x.shape[:-1], lora_b.shape[0])
        if tuple(base_out.shape) != expected:
            raise ValueError(f"mslr_delta: base_out must have shape {expected}, got {tuple(base_out.shape)}")
        if base_out.dtype != x.dtype:
            raise TypeError(
                f"mslr_delta: base_out dtype {base_out.dtype} differs from x dtype {x.dtype}; cast one of them "
                "or add the delta yourself"
            )
    lora_a, lora_b, scale_vec = _cast_low_rank(x, lora_a, lora_b, scale_vec)
    if torch.is_autocast_enabled(x.device.type):  # autocast picks per-op dtypes; let plain autograd follow it
        delta = F.linear(F.linear(x, lora_a) * scale_vec, lora_b)
        return delta if base_out is None else base_out + delta
    return _MSLRDelta.apply(x, lora_a, lora_b, scale_vec, base_out)


def mslr_reference(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    lora_a: Tensor,
    lora_b: Tensor,
    scale_vec: Tensor,
) -> Tensor:
    """Plain-autograd MSLR, same contract as :func:`mslr_linear` (a trainable base is allowed here).

    Args:
        x: input ``[..., d_in]``.
        weight: base weight ``[d_out, d_in]``.
        bias: base bias ``[d_out]`` or None.
        lora_a: ``L``, ``[B*r, d_in]``.
        lora_b: ``R``, ``[d_out, B*r]``.
        scale_vec: ``[B*r]`` folded scales.

    Returns:
        ``[..., d_out]`` in ``x``'s dtype.
    """
    _check_low_rank("mslr_reference", x, lora_a, lora_b, scale_vec, d_out=weight.shape[0])
    lora_a, lora_b, scale_vec = _cast_low_rank(x, lora_a, lora_b, scale_vec)
    return F.linear(x, weight, bias) + F.linear(F.linear(x, lora_a) * scale_vec, lora_b)
