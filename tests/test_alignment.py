"""Tests for pipeline.alignment against a naive formula written from REFERENCE.md section 2.3."""

from __future__ import annotations

import math

import pytest
import torch

from pipeline.alignment import (
    AlignResult,
    GradientStatistics,
    align_gradients,
    apply_alignment,
    gradient_statistics,
)

SHAPES = {"layer.0.lora_a": (4, 16), "layer.0.lora_b": (16, 4), "head.bias": (3,), "scalar": ()}


def random_grads(seed: int, dtype: torch.dtype = torch.float64) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {name: torch.randn(shape, generator=generator, dtype=dtype) for name, shape in SHAPES.items()}


def naive_projection(g: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """a = |<g, r>| / ||r||^2 * r with plain loops over flattened float64 copies."""
    gf, rf = g.flatten().double(), r.flatten().double()
    if torch.linalg.norm(gf) == 0 or torch.linalg.norm(rf) == 0:
        return g.double()
    return (abs(torch.dot(gf, rf)) / torch.dot(rf, rf) * rf).reshape(g.shape)


def test_pure_alignment_matches_naive_formula() -> None:
    task, reference = random_grads(0), random_grads(1)
    result = align_gradients(task, reference)
    assert result.gate == "align" and result.raw_weight == 0.0
    assert result.num_aligned == len(SHAPES)
    for name in SHAPES:
        torch.testing.assert_close(result.grads[name], naive_projection(task[name], reference[name]))
    norms = [torch.linalg.norm(reference[n].flatten()).item() for n in SHAPES]
    assert result.mean_ref_norm == pytest.approx(sum(norms) / len(norms), rel=1e-12)
    cosines = [
        torch.nn.functional.cosine_similarity(task[n].flatten(), reference[n].flatten(), dim=0).item()
        for n in SHAPES
    ]
    assert result.mean_cosine == pytest.approx(sum(cosines) / len(cosines), rel=1e-9)


def test_opposite_direction_still_steps_along_reference() -> None:
    reference = {"w": torch.tensor([1.0, 2.0, 2.0])}
    task = {"w": torch.tensor([-2.0, -4.0, -4.0])}  # -2 r: projection length 6 = 2 ||r||
    result = align_gradients(task, reference)
    torch.testing.assert_close(result.grads["w"], torch.tensor([2.0, 4.0, 4.0]))
    assert result.mean_cosine == pytest.approx(-1.0)


def test_orthogonal_gradient_gives_zero_update() -> None:
    result = align_gradients({"w": torch.tensor([1.0, 0.0])}, {"w": torch.tensor([0.0, 3.0])})
    torch.testing.assert_close(result.grads["w"], torch.zeros(2))


def test_zero_norm_tensors_keep_task_gradient() -> None:
    task = {"a": torch.zeros(3), "b": torch.tensor([1.0, 2.0, 3.0]), "c": torch.tensor([1.0, 1.0])}
    reference = {"a": torch.tensor([1.0, 0.0, 0.0]), "b": torch.zeros(3), "c": torch.tensor([2.0, 0.0])}
    result = align_gradients(task, reference)
    assert result.gate == "align"
    assert result.num_aligned == 1
    assert result.grads["a"] is task["a"] and result.grads["b"] is task["b"]
    torch.testing.assert_close(result.grads["c"], torch.tensor([1.0, 0.0]))
    assert result.mean_ref_norm == pytest.approx((1.0 + 2.0) / 2)  # zero-norm "b" left out
    assert result.mean_cosine == pytest.approx(1 / math.sqrt(2))  # only "c" has both norms > 0


def test_all_zero_reference_falls_through_to_raw() -> None:
    task = random_grads(0)
    reference = {name: torch.zeros_like(t) for name, t in task.items()}
    result = align_gradients(task, reference)
    assert (result.gate, result.raw_weight, result.mean_ref_norm, result.num_aligned) == ("raw", 1.0, 0.0, 0)
    assert all(result.grads[n] is task[n] for n in task)


GATE_KW = {
    "min_ref_loss": 0.4, "min_ref_grad_norm": 5e-7, "max_raw_ratio": 0.1, "start_epoch": 1, "epochs": 3
}


@pytest.mark.parametrize(
    ("ref_loss", "epoch", "gate", "rho"),
    [
        (0.9, 0, "align", 0.0),
        (0.9, 2, "align", 0.0),
        (0.1, 0, "raw", 1.0),  # below the loss gate and before start_epoch
        (0.1, 1, "mix", 0.0),  # 0.1 * (1 - 1) / (3 - 1)
        (0.1, 2, "mix", 0.05),  # 0.1 * (2 - 1) / (3 - 1)
        (0.4, 2, "mix", 0.05),  # the loss test is strict
    ],
)
def test_gates_and_raw_weight(ref_loss: float, epoch: int, gate: str, rho: float) -> None:
    task, reference = random_grads(2), random_grads(3)
    result = align_gradients(task, reference, ref_loss=ref_loss, epoch=epoch, **GATE_KW)
    assert result.gate == gate
    assert result.raw_weight == pytest.approx(rho, abs=1e-15)
    for name in SHAPES:
        a = naive_projection(task[name], reference[name])
        expected = (1 - rho) * a + rho * task[name]
        torch.testing.assert_close(result.grads[name], expected)


def test_reference_norm_gate() -> None:
    task = {"w": torch.tensor([1.0, 1.0])}
    reference = {"w": torch.tensor([1e-8, 0.0])}
    result = align_gradients(task, reference, ref_loss=1.0, min_ref_grad_norm=5e-7)
    assert result.gate == "raw"
    result = align_gradients(task, reference, ref_loss=1.0, min_ref_grad_norm=5e-9)
    assert result.gate == "align"


def test_mix_when_ramp_has_no_length() -> None:
    result = align_gradients(
        random_grads(0), random_grads(1), ref_loss=0.0, min_ref_loss=0.4, max_raw_ratio=0.1,
        epoch=3, start_epoch=3, epochs=3,
    )
    assert result.gate == "mix" and result.raw_weight == pytest.approx(0.1)


def test_key_mismatch_lists_the_keys() -> None:
    task = {"shared": torch.ones(2), "only_task": torch.ones(2)}
    reference = {"shared": torch.ones(2), "only_ref": torch.ones(2)}
    expected = r"missing in reference: \['only_task'\], missing in task: \['only_ref'\]"
    with pytest.raises(ValueError, match=expected):
        align_gradients(task, reference)


def test_shape_mismatch_and_none_and_empty() -> None:
    with pytest.raises(ValueError, match=r"shape mismatch for 'w': task \(2, 3\) vs reference \(3, 2\)"):
        align_gradients({"w": torch.ones(2, 3)}, {"w": torch.ones(3, 2)})
    with pytest.raises(ValueError, match=r"reference gradient of 'w' is None"):
        align_gradients({"w": torch.ones(2)}, {"w": None})  # type: ignore[dict-item]
    with pytest.raises(ValueError, match="got no gradients"):
        align_gradients({}, {})


def test_gate_argument_validation() -> None:
    grads = {"w": torch.ones(2)}
    with pytest.raises(ValueError, match=r"max_raw_ratio must lie in \[0, 1\], got 1.5"):
        align_gradients(grads, grads, max_raw_ratio=1.5)
    with pytest.raises(ValueError, match="epochs=0"):
        align_gradients(grads, grads, epochs=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_dtype_preserved_and_accurate(dtype: torch.dtype) -> None:
    task, reference = random_grads(4, dtype), random_grads(5, dtype)
    result = align_gradients(task, reference)
    tolerance = {torch.float16: 2e-3, torch.bfloat16: 1e-2, torch.float32: 1e-5}[dtype]
    for name in SHAPES:
        assert result.grads[name].dtype == dtype
        expected = naive_projection(task[name], reference[name]).to(dtype)
        torch.testing.assert_close(result.grads[name], expected, rtol=tolerance, atol=tolerance)


def test_statistics_then_apply_equals_align_gradients() -> None:
    task, reference = random_grads(6, torch.float32), random_grads(7, torch.float32)
    stats = gradient_statistics(task, reference)
    assert isinstance(stats, GradientStatistics) and stats.dots.dtype == torch.float32
    names = sorted(SHAPES)
    for i, name in enumerate(names):
        g, r = task[name].flatten().double(), reference[name].flatten().double()
        assert stats.dots[i].item() == pytest.approx(torch.dot(g, r).item(), rel=1e-5)
        assert stats.task_sq_norms[i].item() == pytest.approx(torch.dot(g, g).item(), rel=1e-5)
        assert stats.ref_sq_norms[i].item() == pytest.approx(torch.dot(r, r).item(), rel=1e-5)
    kwargs = {"ref_loss": 0.1, "epoch": 2, **GATE_KW}
    direct = align_gradients(task, reference, **kwargs)
    composed = apply_alignment(
        task, reference, GradientStatistics.from_stacked(stats.stacked()), **kwargs
    )
    assert isinstance(composed, AlignResult)
    assert composed.gate == direct.gate and composed.raw_weight == direct.raw_weight
    assert composed.num_aligned == direct.num_aligned
    assert composed.mean_cosine == direct.mean_cosine and composed.mean_ref_norm == direct.mean_ref_norm
    for name in names:
        torch.testing.assert_close(composed.grads[name], direct.grads[name], rtol=0, atol=0)


def test_sharded_statistics_summed_give_full_alignment() -> None:
    """Two halves of each tensor (as two ranks would hold) with summed statistics match the whole."""
    task, reference = random_grads(8), random_grads(9)
    halves = [
        (
            {n: t.flatten()[k::2] for n, t in task.items()},
            {n: t.flatten()[k::2] for n, t in reference.items()},
        )
        for k in (0, 1)
    ]
    summed = sum(gradient_statistics(g, r).stacked() for g, r in halves)
    full = align_gradients(task, reference)
    for k, (g, r) in enumerate(halves):
        part = apply_alignment(g, r, GradientStatistics.from_stacked(summed))
        assert part.mean_ref_norm == pytest.approx(full.mean_ref_norm, rel=1e-12)
        for name in SHAPES:
            torch.testing.assert_close(part.grads[name], full.grads[name].flatten()[k::2])


def test_statistics_length_checked() -> None:
    grads = {"a": torch.ones(2), "b": torch.ones(2)}
    bad = GradientStatistics(torch.ones(1), torch.ones(1), torch.ones(1))
    with pytest.raises(ValueError, match=r"statistics.dots has shape \(1,\), expected \(2,\)"):
        apply_alignment(grads, grads, bad)
    with pytest.raises(ValueError, match=r"expects a \(3, P\) tensor"):
        GradientStatistics.from_stacked(torch.ones(2, 2))


def test_always_on_alignment_under_adamw_learns_only_from_the_reference_gradient():
    """Why the never-raw recipe behaves like the clean-rows control (docs/recipe_eval_discussion.md).

    Every aligned update is a non-negative multiple of the reference gradient, tensor by tensor, so
    whatever the training batch holds beyond its component along r (a backdoor's direction included) is
    discarded; what is left is a per-tensor scale c_t = |<g, r>| / ||r||^2, and AdamW's m / sqrt(v) cancels
    a scale that stays constant. Here the training gradient is c * r_t plus a large part orthogonal to
    r_t (standing in for what only the poisoned rows would teach): AdamW on the aligned updates follows
    AdamW on the reference gradients alone, to float64 round-off, whatever that orthogonal part is.
    """
    generator = torch.Generator().manual_seed(5)
    start = random_grads(100)
    aligned_params = {n: t.clone().requires_grad_(True) for n, t in start.items()}
    reference_params = {n: t.clone().requires_grad_(True) for n, t in start.items()}
    opt_aligned = torch.optim.AdamW(aligned_params.values(), lr=1e-2, eps=1e-12, weight_decay=0.0)
    opt_reference = torch.optim.AdamW(reference_params.values(), lr=1e-2, eps=1e-12, weight_decay=0.0)
    scale = {n: 0.5 + i for i, n in enumerate(SHAPES)}  # a different constant per tensor
    for step in range(20):
        reference = random_grads(200 + step)
        task = {}
        for name, r in reference.items():
            noise = torch.randn(r.shape, generator=generator, dtype=r.dtype) * 10
            if r.dim() == 0:
                noise = torch.zeros_like(r)
            orthogonal = noise - (noise.flatten() @ r.flatten()) / (r.flatten() @ r.flatten()) * r
            task[name] = scale[name] * r + orthogonal
        update = align_gradients(task, reference).grads
        for name in SHAPES:
            torch.testing.assert_close(update[name], scale[name] * reference[name], rtol=1e-9, atol=1e-9)
            aligned_params[name].grad = update[name].clone()
            reference_params[name].grad = reference[name].clone()
        opt_aligned.step()
        opt_reference.step()
    for name in SHAPES:
        torch.testing.assert_close(aligned_params[name], reference_params[name], rtol=1e-9, atol=1e-9)
        assert not torch.allclose(aligned_params[name], start[name])  # the weights did move


def test_raw_share_mixes_a_constant_share_of_the_task_gradient_into_every_aligned_update() -> None:
    """align.raw_share = s: (1 - s) a_p + s g_p in the align gate (hand formula); 0 is the pure projection
    bit for bit; the other gates and a zero-reference tensor under fallback=skip keep their meaning."""
    task, reference = random_grads(2), random_grads(3)
    pure = align_gradients(task, reference)
    assert all(torch.equal(pure.grads[n], align_gradients(task, reference, raw_share=0.0).grads[n]) for n in SHAPES)
    mixed = align_gradients(task, reference, raw_share=0.25)
    assert mixed.gate == "align" and mixed.raw_weight == 0.25
    for name in SHAPES:
        expected = 0.75 * naive_projection(task[name], reference[name]) + 0.25 * task[name].double()
        torch.testing.assert_close(mixed.grads[name], expected)
    # the raw gate (reference loss under its threshold) is still the task gradient itself
    raw = align_gradients(task, reference, raw_share=0.25, ref_loss=0.1, min_ref_loss=0.4)
    assert raw.gate == "raw" and all(torch.equal(raw.grads[n], task[n]) for n in SHAPES)
    # a tensor without reference gradient under fallback=skip gets the share of its task gradient, not all of it
    reference = {**reference, "scalar": torch.zeros(())}
    skip = align_gradients(task, reference, raw_share=0.25, fallback="skip")
    torch.testing.assert_close(skip.grads["scalar"], 0.25 * task["scalar"])
    assert torch.equal(align_gradients(task, reference, fallback="skip").grads["scalar"], torch.zeros(()))
    for bad in (-0.1, 1.0):
        with pytest.raises(ValueError, match=r"raw_share must lie in \[0, 1\), got"):
            align_gradients(task, reference, raw_share=bad)
