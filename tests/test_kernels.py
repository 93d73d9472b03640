"""Parity tests of kernels/mslr_kernels/mslr.py (MuScleLoRA MSLR op, arXiv 2402.12026).

The independent reference is the formula of REFERENCE.md section 2.2 written as a loop over branches,
each building its own dense ``R_i L_i``::

    h = W0 x + b0 + (alpha / r) * sum_i k_i R_i L_i x
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from mslr_kernels import fold_scales, mslr_delta, mslr_linear, mslr_reference
from naive_mslr import naive_mslr

D_IN, D_OUT = 7, 11


def make_case(
    dtype: torch.dtype = torch.float32,
    lead: tuple[int, ...] = (5,),
    bias: bool = True,
    scales: tuple[float, ...] = (1.0, 4.0, 8.0),
    rank: int = 2,
    seed: int = 0,
) -> dict:
    """Random operands (frozen base, trainable adapters, x requiring grad) in float64, then cast."""
    gen = torch.Generator().manual_seed(seed)
    total = len(scales) * rank

    def rnd(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    case = {
        "x": rnd(*lead, D_IN),
        "weight": rnd(D_OUT, D_IN) / 3,
        "bias": rnd(D_OUT) if bias else None,
        "lora_a": rnd(total, D_IN) / 3,
        "lora_b": rnd(D_OUT, total) / 3,
        "scales": list(scales),
        "rank": rank,
        "alpha": 6.0,
    }
    for key in ("x", "weight", "bias", "lora_a", "lora_b"):
        if case[key] is not None:
            case[key] = case[key].to(dtype)
    for key in ("x", "lora_a", "lora_b"):
        case[key].requires_grad_(True)
    case["scale_vec"] = fold_scales(torch.tensor(case["scales"], dtype=dtype), rank, case["alpha"] / rank)
    return case


def grads(out: torch.Tensor, inputs: list[torch.Tensor], seed: int = 1) -> list[torch.Tensor]:
    """Gradients of <out, G> for a fixed random G."""
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(out.dtype)
    return list(torch.autograd.grad(out, inputs, g))


def test_fold_scales_values_and_errors() -> None:
    got = fold_scales(torch.tensor([1.0, 4.0]), rank=2, scaling=3.0)
    torch.testing.assert_close(got, torch.tensor([3.0, 3.0, 12.0, 12.0]))
    with pytest.raises(ValueError, match=r"scales must be 1-D \[B\], got shape \(2, 1\)"):
        fold_scales(torch.ones(2, 1), rank=1, scaling=1.0)
    with pytest.raises(ValueError, match="rank must be a positive int, got 0"):
        fold_scales(torch.ones(2), rank=0, scaling=1.0)


@pytest.mark.parametrize("lead", [(5,), (2, 3)], ids=["2d", "3d"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_mslr_linear_matches_naive_fp32(lead: tuple[int, ...], bias: bool) -> None:
    c = make_case(lead=lead, bias=bias)
    out = mslr_linear(c["x"], c["weight"], c["bias"], c["lora_a"], c["lora_b"], c["scale_vec"])
    ref = naive_mslr(c["x"], c["weight"], c["bias"], c["lora_a"], c["lora_b"], c["scales"], c["rank"], c["alpha"])
    assert out.shape == (*lead, D_OUT)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    inputs = [c["x"], c["lora_a"], c["lora_b"]]
    for got, want in zip(grads(out, inputs), grads(ref, inputs), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("lead", [(5,), (2, 3)], ids=["2d", "3d"])
@pytest.mark.parametrize("with_base_out", [False, True], ids=["delta", "base_out"])
def test_mslr_delta_matches_naive_fp32(lead: tuple[int, ...], with_base_out: bool) -> None:
    c = make_case(lead=lead)
    base_out = None
    if with_base_out:
        base_out = (c["x"].detach() @ c["weight"].T + c["bias"]).requires_grad_(True)
    out = mslr_delta(c["x"], c["lora_a"], c["lora_b"], c["scale_vec"], base_out=base_out)
    ref = naive_mslr(c["x"], None, None, c["lora_a"], c["lora_b"], c["scales"], c["rank"], c["alpha"])
    if base_out is not None:
        ref = ref + base_out
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    inputs = [c["x"], c["lora_a"], c["lora_b"]] + ([base_out] if base_out is not None else [])
    for got, want in zip(grads(out, inputs), grads(ref, inputs), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_loose_parity(dtype: torch.dtype) -> None:
    c64 = make_case(dtype=torch.float64, lead=(2, 4))
    c = make_case(dtype=dtype, lead=(2, 4))
    out = mslr_linear(c["x"], c["weight"], c["bias"], c["lora_a"], c["lora_b"], c["scale_vec"])
    assert out.dtype == dtype
    ref = naive_mslr(
        c64["x"], c64["weight"], c64["bias"], c64["lora_a"], c64["lora_b"], c64["scales"], c64["rank"], c64["alpha"]
    )
    scale = ref.abs().max().item()
    torch.testing.assert_close(out.double(), ref, rtol=0, atol=0.02 * scale)
    got = grads(out, [c["x"], c["lora_a"], c["lora_b"]])
    want = grads(ref, [c64["x"], c64["lora_a"], c64["lora_b"]])
    for g_lo, g_hi in zip(got, want, strict=True):
        assert g_lo.dtype == dtype
        torch.testing.assert_close(g_lo.double(), g_hi, rtol=0, atol=0.02 * g_hi.abs().max().item())
    delta = mslr_delta(c["x"], c["lora_a"], c["lora_b"], c["scale_vec"])
    ref_delta = naive_mslr(c64["x"], None, None, c64["lora_a"], c64["lora_b"], c64["scales"], 2, 6.0)
    torch.testing.assert_close(delta.double(), ref_delta, rtol=0, atol=0.02 * ref_delta.abs().max().item())


def test_autocast_follows_plain_autograd() -> None:
    c = make_case()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = mslr_linear(c["x"], c["weight"], c["bias"], c["lora_a"], c["lora_b"], c["scale_vec"])
        ref = mslr_reference(c["x"], c["weight"], c["bias"], c["lora_a"], c["lora_b"], c["scale_vec"])
        delta = mslr_delta(c["x"], c["lora_a"], c["lora_b"], c["scale_vec"])
    assert out.dtype == ref.dtype == delta.dtype == torch.bfloat16
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    want = naive_mslr(c["x"], None, None, c["lora_a"], c["lora_b"], c["scales"], 2, 6.0)
    torch.testing.assert_close(delta.float(), want, rtol=0, atol=0.02 * want.abs().max().item())


def test_adapter_weights_are_cast_to_input_dtype() -> None:
    c = make_case(dtype=torch.float32)
    x16 = c["x"].detach().to(torch.bfloat16).requires_grad_(True)
    out = mslr_linear(
        x16, c["weight"].to(torch.bfloat16), None, c["lora_a"], c["lora_b"], c["scale_vec"]
    )  # fp32 adapters, bf16 input
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert c["lora_a"].grad is not None and c["lora_a"].grad.dtype == torch.float32
    assert x16.grad is not None and x16.grad.dtype == torch.bfloat16


def test_gradcheck_float64_both_functions() -> None:
    c = make_case(dtype=torch.float64, lead=(2, 3), scales=(1.0, 3.0), rank=1)
    scale_vec = c["scale_vec"].clone().requires_grad_(True)
    base_out = torch.randn(2, 3, D_OUT, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda x, a, b, s: mslr_linear(x, c["weight"], c["bias"], a, b, s),
        (c["x"], c["lora_a"], c["lora_b"], scale_vec),
    )
    assert torch.autograd.gradcheck(
        lambda x, a, b, s, o: mslr_delta(x, a, b, s, base_out=o),
        (c["x"], c["lora_a"], c["lora_b"], scale_vec, base_out),
    )
    assert torch.autograd.gradcheck(
        lambda x, a, b, s: mslr_delta(x, a, b, s), (c["x"], c["lora_a"], c["lora_b"], scale_vec)
    )


def test_scale_vec_gradient_matches_plain_autograd() -> None:
    c = make_case(dtype=torch.float64, lead=(2, 3))
    s1 = c["scale_vec"].clone().requires_grad_(True)
    s2 = c["scale_vec"].clone().requires_grad_(True)
    base_out = c["x"].detach() @ c["weight"].T
    for fused, plain in (
        (
            mslr_linear(c["x"], c["weight"], c["bias"], c["lora_a"], c["lora_b"], s1),
            mslr_reference(c["x"], c["weight"], c["bias"], c["lora_a"], c["lora_b"], s2),
        ),
        (
            mslr_delta(c["x"], c["lora_a"], c["lora_b"], s1, base_out=base_out),
            mslr_reference(c["x"], c["weight"], None, c["lora_a"], c["lora_b"], s2),
        ),
    ):
        (g1,) = grads(fused, [s1])
        (g2,) = grads(plain, [s2])
        torch.testing.assert_close(g1, g2, rtol=1e-12, atol=1e-12)


def test_frozen_base_gets_no_gradient_and_trainable_base_is_rejected() -> None:
    c = make_case()
    weight = c["weight"]
    out = mslr_linear(c["x"], weight, c["bias"], c["lora_a"], c["lora_b"], c["scale_vec"])
    out.sum().backward()
    assert weight.grad is None and c["bias"].grad is None
    weight.requires_grad_(True)
    with pytest.raises(ValueError, match=r"treated as frozen.*weight.requires_grad=True"):
        mslr_linear(c["x"], weight, c["bias"], c["lora_a"], c["lora_b"], c["scale_vec"])
    with torch.no_grad():  # no gradient can be lost without grad mode
        torch.testing.assert_close(
            mslr_linear(c["x"], weight, c["bias"], c["lora_a"], c["lora_b"], c["scale_vec"]), out.detach()
        )
    ref = mslr_reference(c["x"], weight, c["bias"], c["lora_a"], c["lora_b"], c["scale_vec"])
    ref.sum().backward()  # the plain reference does train a base weight
    torch.testing.assert_close(weight.grad, torch.ones(5, D_OUT).T @ c["x"].detach())


def test_input_without_grad_and_frozen_adapters() -> None:
    c = make_case()
    x = c["x"].detach()
    out = mslr_linear(x, c["weight"], c["bias"], c["lora_a"], c["lora_b"], c["scale_vec"])
    ref = naive_mslr(x, c["weight"], c["bias"], c["lora_a"], c["lora_b"], c["scales"], 2, 6.0)
    got = grads(out, [c["lora_a"], c["lora_b"]])
    for g, w in zip(got, grads(ref, [c["lora_a"], c["lora_b"]]), strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
    # only x trains (adapters frozen): x's gradient is still exact
    a, b = c["lora_a"].detach(), c["lora_b"].detach()
    out = mslr_linear(c["x"], c["weight"], c["bias"], a, b, c["scale_vec"])
    (gx,) = grads(out, [c["x"]])
    (gx_ref,) = grads(naive_mslr(c["x"], c["weight"], c["bias"], a, b, c["scales"], 2, 6.0), [c["x"]])
    torch.testing.assert_close(gx, gx_ref, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        assert not mslr_linear(x, c["weight"], c["bias"], a, b, c["scale_vec"]).requires_grad


class _RecordShapes(TorchDispatchMode):
    """Records the shapes of every op output (views included) and whether it aliases a given tensor."""

    def __init__(self, aliased: torch.Tensor) -> None:
        super().__init__()
        self.aliased_ptr = aliased.untyped_storage().data_ptr()
        self.fresh_shapes: list[tuple[str, tuple[int, ...]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, tuple | list) else (out,):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() != self.aliased_ptr:
                self.fresh_shapes.append((str(func), tuple(t.shape)))
        return out


def test_dense_delta_is_never_built() -> None:
    c = make_case(lead=(5,))
    for fn in (
        lambda: mslr_linear(c["x"], c["weight"], c["bias"], c["lora_a"], c["lora_b"], c["scale_vec"]),
        lambda: mslr_delta(c["x"], c["lora_a"], c["lora_b"], c["scale_vec"]),
    ):
        rec = _RecordShapes(c["weight"])
        with rec:
            fn().sum().backward()
        dense = [(op, s) for op, s in rec.fresh_shapes if s in {(D_OUT, D_IN), (D_IN, D_OUT)}]
        assert any(s == (6, D_IN) for _, s in rec.fresh_shapes), "backward (grad of lora_a) was not recorded"
        assert dense == []
    # the recorder does see a dense delta when one is built
    rec = _RecordShapes(c["weight"])
    with rec:
        naive_mslr(c["x"], None, None, c["lora_a"], c["lora_b"], c["scales"], 2, 6.0)
    assert any(s == (D_OUT, D_IN) for _, s in rec.fresh_shapes)


def test_shape_and_dtype_errors_name_the_operands() -> None:
    c = make_case()
    with pytest.raises(ValueError, match=r"lora_b must be \[d_out, 6\] and scale_vec \[6\]; got lora_b \(11, 5\)"):
        mslr_linear(c["x"], c["weight"], c["bias"], c["lora_a"], c["lora_b"][:, :5], c["scale_vec"])
    with pytest.raises(ValueError, match=r"weight must be \[d_out, d_in\] with d_in = x.shape\[-1\] = 7"):
        mslr_linear(c["x"], c["weight"][:, :6], c["bias"], c["lora_a"], c["lora_b"], c["scale_vec"])
    with pytest.raises(ValueError, match=r"lora_b must have d_out = weight.shape\[0\] = 10 rows"):
        mslr_linear(c["x"], c["weight"][:10], None, c["lora_a"], c["lora_b"], c["scale_vec"])
    with pytest.raises(ValueError, match=r"x's last dimension must equal lora_a.shape\[1\] = d_in = 7"):
        mslr_delta(c["x"][:, :6], c["lora_a"], c["lora_b"], c["scale_vec"])
    with pytest.raises(TypeError, match="x, weight and bias must share one dtype"):
        mslr_linear(c["x"].double(), c["weight"], c["bias"], c["lora_a"], c["lora_b"], c["scale_vec"])
    with pytest.raises(ValueError, match=r"base_out must have shape \(5, 11\), got \(5, 10\)"):
        mslr_delta(c["x"], c["lora_a"], c["lora_b"], c["scale_vec"], base_out=torch.zeros(5, 10))
    with pytest.raises(TypeError, match="base_out dtype torch.float64 differs from x dtype torch.float32"):
        mslr_delta(c["x"], c["lora_a"], c["lora_b"], c["scale_vec"], base_out=torch.zeros(5, 11, dtype=torch.float64))


@pytest.mark.gpu
def test_cuda_matches_cpu() -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    c = make_case(lead=(2, 3))
    dev = {k: (v.detach().cuda().requires_grad_(v.requires_grad) if isinstance(v, torch.Tensor) else v) for k, v in c.items()}
    out = mslr_linear(dev["x"], dev["weight"], dev["bias"], dev["lora_a"], dev["lora_b"], dev["scale_vec"])
    ref = mslr_linear(c["x"], c["weight"], c["bias"], c["lora_a"], c["lora_b"], c["scale_vec"])
    torch.testing.assert_close(out.cpu(), ref.detach(), rtol=1e-4, atol=1e-4)
