"""Tests of pipeline/adapters/mslr.py: MultiScaleLowRankLinear (MuScleLoRA MSLR, arXiv 2402.12026).

References: peft's LoRA for the single-scale case, and the REFERENCE.md 2.2 formula written as a loop
over branches (``naive_mslr`` in tests/naive_mslr.py, shared with tests/test_kernels.py).
"""

from __future__ import annotations

import math

import peft
import pytest
import torch
from torch import nn

from naive_mslr import naive_mslr

from pipeline.adapters import MultiScaleLowRankLinear

D_IN, D_OUT = 12, 9


def naive_module(
    x: torch.Tensor,
    base: nn.Linear | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scales: list[float],
    rank: int,
    alpha: float,
) -> torch.Tensor:
    """h = W0 x + b0 + (alpha / r) * sum_i k_i R_i L_i x (base None: the sum alone)."""
    weight = base.weight.detach() if base is not None else None
    bias = base.bias.detach() if base is not None and base.bias is not None else None
    return naive_mslr(x, weight, bias, lora_a, lora_b, scales, rank, alpha)


class LinearWrapper(nn.Module):
    """A generic (non-nn.Linear) base: wraps a Linear and exposes in/out features."""

    def __init__(self, inner: nn.Linear) -> None:
        super().__init__()
        self.inner = inner
        self.in_features = inner.in_features
        self.out_features = inner.out_features
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.inner(x)


class FakeQuantLinear(nn.Module):
    """A quantized-like base: int8 weight buffer, dequantized to float32 in forward."""

    def __init__(self, source: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = source.in_features, source.out_features
        self.scale = source.weight.detach().abs().max() / 127
        self.register_buffer("weight", torch.round(source.weight.detach() / self.scale).to(torch.int8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ (self.weight.float() * self.scale).T


def make_linear(seed: int = 0, bias: bool = True, dtype: torch.dtype = torch.float32) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(D_IN, D_OUT, bias=bias).to(dtype)


def rand_x(*lead: int, seed: int = 1, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*lead, D_IN, generator=gen).to(dtype).requires_grad_(True)


def randomize_(module: MultiScaleLowRankLinear, seed: int = 2) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        module.lora_a.copy_(torch.randn(module.lora_a.shape, generator=gen) / 3)
        module.lora_b.copy_(torch.randn(module.lora_b.shape, generator=gen) / 3)


def test_matches_peft_lora_for_one_scale() -> None:
    rank, alpha = 3, 6.0
    model = peft.get_peft_model(
        nn.Sequential(make_linear()),
        peft.LoraConfig(r=rank, lora_alpha=alpha, target_modules=["0"], lora_dropout=0.0),
    )
    lora = model.base_model.model[0]
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():  # peft starts lora_B at zero; make the comparison non-trivial
        lora.lora_A["default"].weight.copy_(torch.randn(rank, D_IN, generator=gen))
        lora.lora_B["default"].weight.copy_(torch.randn(D_OUT, rank, generator=gen))
    mslr = MultiScaleLowRankLinear(make_linear(), rank=rank, scales=(1.0,), alpha=alpha)
    with torch.no_grad():
        mslr.lora_a.copy_(lora.lora_A["default"].weight)
        mslr.lora_b.copy_(lora.lora_B["default"].weight)
    x_peft, x_ours = rand_x(2, 4), rand_x(2, 4)
    out_peft, out_ours = lora(x_peft), mslr(x_ours)
    torch.testing.assert_close(out_ours, out_peft, rtol=1e-5, atol=1e-5)
    g = torch.randn(out_ours.shape, generator=gen)
    out_peft.backward(g)
    out_ours.backward(g)
    torch.testing.assert_close(x_ours.grad, x_peft.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mslr.lora_a.grad, lora.lora_A["default"].weight.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mslr.lora_b.grad, lora.lora_B["default"].weight.grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_multi_scale_matches_naive_formula(bias: bool) -> None:
    scales, rank, alpha = [1.0, 4.0, 8.0], 2, 6.0
    base = make_linear(bias=bias)
    m = MultiScaleLowRankLinear(base, rank=rank, scales=scales, alpha=alpha)
    randomize_(m)
    x = rand_x(3, 5)
    out = m(x)
    ref = naive_module(x, base, m.lora_a, m.lora_b, scales, rank, alpha)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(4))
    got = torch.autograd.grad(out, [x, m.lora_a, m.lora_b], g)
    want = torch.autograd.grad(ref, [x, m.lora_a, m.lora_b], g)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(m.delta_weight(), naive_module(torch.eye(D_IN), None, m.lora_a, m.lora_b, scales, rank, alpha).T)


def test_attributes_freezing_and_state_dict_round_trip() -> None:
    base = make_linear()
    m = MultiScaleLowRankLinear(base, rank=2, scales=(1, 4, 8), alpha=6)
    assert (m.in_features, m.out_features, m.rank, m.num_scales) == (D_IN, D_OUT, 2, 3)
    assert m.scaling == 3.0 and m.merged is False and m.base_layer is base
    assert m.lora_a.shape == (6, D_IN) and m.lora_b.shape == (D_OUT, 6)
    assert [n for n, p in m.named_parameters() if p.requires_grad] == ["lora_a", "lora_b"]
    assert set(m.state_dict()) == {"base_layer.weight", "base_layer.bias", "lora_a", "lora_b", "scales"}
    torch.testing.assert_close(m.scales, torch.tensor([1.0, 4.0, 8.0]))
    other = MultiScaleLowRankLinear(make_linear(seed=5), rank=2, scales=(1, 4, 8), alpha=6)
    other.load_state_dict(m.state_dict(), strict=True)
    x = rand_x(4)
    torch.testing.assert_close(other(x), m(x))
    rep = repr(m)
    assert "scales=(1, 4, 8), alpha=6, scaling=3" in rep and "keep_base=True, merged=False" in rep


def test_init_choices() -> None:
    x = rand_x(6)
    base = make_linear()
    zero = MultiScaleLowRankLinear(base, rank=1, scales=(1, 2, 3, 4), alpha=4, init="zero")
    torch.testing.assert_close(zero(x), base(x), rtol=0, atol=0)
    assert torch.count_nonzero(zero.lora_a) == zero.lora_a.numel()
    torch.manual_seed(0)
    kaiming = MultiScaleLowRankLinear(base, rank=1, scales=(1, 2, 3, 4), alpha=4)
    assert kaiming.init == "kaiming"
    assert (kaiming(x) - base(x)).abs().max() > 1e-3
    # kaiming_uniform_(a=sqrt(5)) = U(-1/sqrt(fan_in), 1/sqrt(fan_in)); fan_in of lora_b is B*r = 4
    assert kaiming.lora_a.abs().max() <= 1 / math.sqrt(D_IN)
    assert kaiming.lora_b.abs().max() <= 1 / math.sqrt(4)
    assert kaiming.lora_b.abs().max() > 0.8 / math.sqrt(4)  # spans the bound, not a smaller init
    kaiming.reset_parameters("zero")
    assert kaiming.init == "zero" and torch.count_nonzero(kaiming.lora_b) == 0
    with pytest.raises(ValueError, match=r"init must be one of \('kaiming', 'zero'\), got 'normal'"):
        kaiming.reset_parameters("normal")  # type: ignore[arg-type]


def test_merge_unmerge_exact_and_idempotent() -> None:
    base = make_linear()
    w0 = base.weight.detach().clone()
    m = MultiScaleLowRankLinear(base, rank=2, scales=(1, 4), alpha=6)
    x = rand_x(2, 3)
    unmerged = m(x).detach()
    m.merge()
    assert m.merged
    torch.testing.assert_close(m(x), unmerged, rtol=0, atol=1e-5)
    torch.testing.assert_close(base.weight, w0 + m.delta_weight(), rtol=0, atol=1e-6)
    with pytest.warns(UserWarning, match="already merged; nothing done"):
        m.merge()
    torch.testing.assert_close(base.weight, w0 + m.delta_weight(), rtol=0, atol=1e-6)
    m.unmerge()
    assert not m.merged
    torch.testing.assert_close(base.weight, w0, rtol=0, atol=1e-6)
    torch.testing.assert_close(m(x), unmerged, rtol=0, atol=1e-5)
    with pytest.warns(UserWarning, match="not merged; nothing done"):
        m.unmerge()
    torch.testing.assert_close(base.weight, w0, rtol=0, atol=1e-6)
    m.merge()
    with torch.no_grad():
        m.lora_b.mul_(2)
    with pytest.raises(RuntimeError, match="modified in place after merge"):
        m.unmerge()
    with pytest.raises(RuntimeError, match="the adapter is merged; call unmerge"):
        m.reset_parameters("zero")


def test_merge_refused_without_base_or_for_generic_base() -> None:
    no_base = MultiScaleLowRankLinear(make_linear(), keep_base=False)
    with pytest.raises(RuntimeError, match="keep_base=False drops W0 x \\+ b0"):
        no_base.merge()
    generic = MultiScaleLowRankLinear(LinearWrapper(make_linear()))
    with pytest.raises(TypeError, match="only a floating-point nn.Linear base can be merged, got LinearWrapper"):
        generic.merge()


def test_keep_base_false_is_the_low_rank_term_alone() -> None:
    scales, rank, alpha = [1.0, 2.0], 2, 4.0
    base = make_linear()
    m = MultiScaleLowRankLinear(base, rank=rank, scales=scales, alpha=alpha, keep_base=False)
    x = rand_x(5)
    out = m(x)
    torch.testing.assert_close(out, naive_module(x, None, m.lora_a, m.lora_b, scales, rank, alpha), rtol=1e-5, atol=1e-5)
    out.sum().backward()
    assert base.weight.grad is None and m.lora_a.grad is not None


def test_dropout_applies_in_training_only() -> None:
    scales, rank, alpha, p = [1.0, 3.0], 1, 2.0, 0.5
    base = make_linear()
    m = MultiScaleLowRankLinear(base, rank=rank, scales=scales, alpha=alpha, dropout=p)
    x = rand_x(4, 6)
    m.train()
    torch.manual_seed(10)
    out = m(x)
    torch.manual_seed(10)
    dropped = nn.functional.dropout(x, p, training=True)
    want = base(x) + naive_module(dropped, None, m.lora_a, m.lora_b, scales, rank, alpha)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(out, m(x))  # a new mask each call
    m.eval()
    no_drop = naive_module(x, base, m.lora_a, m.lora_b, scales, rank, alpha)
    torch.testing.assert_close(m(x), no_drop, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(m(x), m(x), rtol=0, atol=0)


def test_generic_base_takes_delta_path_and_matches() -> None:
    scales, rank, alpha = [1.0, 4.0], 2, 6.0
    wrapper = LinearWrapper(make_linear())
    generic = MultiScaleLowRankLinear(wrapper, rank=rank, scales=scales, alpha=alpha)
    plain_base = make_linear()
    plain = MultiScaleLowRankLinear(plain_base, rank=rank, scales=scales, alpha=alpha)
    plain.load_state_dict({k.replace("inner.", ""): v for k, v in generic.state_dict().items()}, strict=True)
    calls = []
    plain_base.register_forward_hook(lambda *_: calls.append(1))
    x1, x2 = rand_x(2, 3), rand_x(2, 3)
    out_generic, out_plain = generic(x1), plain(x2)
    assert wrapper.calls == 1 and calls == []  # generic: base_layer(x) + delta; nn.Linear: fused kernel
    torch.testing.assert_close(out_generic, out_plain, rtol=1e-5, atol=1e-5)
    out_generic.sum().backward()
    out_plain.sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(generic.lora_a.grad, plain.lora_a.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(generic.lora_b.grad, plain.lora_b.grad, rtol=1e-5, atol=1e-5)
    assert not any(p.requires_grad for p in wrapper.parameters())


def test_partitioned_weight_takes_generic_path() -> None:
    base = make_linear()
    m = MultiScaleLowRankLinear(base, rank=1, scales=(1.0, 2.0), alpha=2)
    x = rand_x(3)
    fused = m(x).detach()
    calls = []
    base.register_forward_hook(lambda *_: calls.append(1))
    base.weight.ds_id = 0  # how DeepSpeed ZeRO-3 marks a partitioned parameter
    torch.testing.assert_close(m(x), fused, rtol=1e-5, atol=1e-5)
    assert calls == [1]


def test_dtypes_low_precision_and_quantized_base() -> None:
    base = make_linear(dtype=torch.bfloat16)
    m = MultiScaleLowRankLinear(base, rank=1, scales=(1.0, 2.0), alpha=1.0)
    assert m.lora_a.dtype == torch.bfloat16 and m.lora_b.dtype == torch.bfloat16
    x = rand_x(2, 3)  # float32 input into a bf16 layer
    out = m(x)
    assert out.dtype == torch.float32
    ref = naive_module(x.double(), None, m.lora_a.double(), m.lora_b.double(), [1.0, 2.0], 1, 1.0)
    ref = ref + x.double() @ base.weight.double().T + base.bias.double()
    torch.testing.assert_close(out.double(), ref, rtol=0, atol=0.03 * ref.abs().max().item())
    out.sum().backward()
    assert m.lora_a.grad.dtype == torch.bfloat16 and x.grad.dtype == torch.float32

    source = make_linear()
    quant = FakeQuantLinear(source)
    mq = MultiScaleLowRankLinear(quant, rank=2, scales=(1.0, 3.0), alpha=2.0)
    assert mq.lora_a.dtype == torch.float32  # int8 base weight -> float32 adapters
    x = rand_x(4)
    want = quant(x) + naive_module(x, None, mq.lora_a, mq.lora_b, [1.0, 3.0], 2, 2.0)
    torch.testing.assert_close(mq(x), want, rtol=1e-5, atol=1e-5)


def test_bad_base_and_hyper_parameters_raise() -> None:
    with pytest.raises(TypeError, match=r"got Conv1d with in_features=None, out_features=None"):
        MultiScaleLowRankLinear(nn.Conv1d(3, 4, 1))
    with pytest.raises(TypeError, match=r"must be an nn.Module .* got Tensor"):
        MultiScaleLowRankLinear(torch.zeros(3, 3))  # type: ignore[arg-type]
    cases = [
        ({"rank": 0}, "rank must be a positive int, got 0"),
        ({"scales": ()}, r"scales must be a non-empty sequence of numbers, got \(\)"),
        ({"scales": (1.0, float("nan"))}, r"scales must be finite numbers, got \[1.0, nan\]"),
        ({"alpha": 0.0}, "alpha must be a finite number > 0, got 0.0"),
        ({"dropout": 1.0}, r"dropout must be in \[0, 1\), got 1.0"),
        ({"init": "normal"}, "init must be one of"),
    ]
    for kwargs, match in cases:
        with pytest.raises(ValueError, match=match):
            MultiScaleLowRankLinear(make_linear(), **kwargs)
