"""Tests for pipeline.frequency and launch/fourier.py (REFERENCE.md section 5).

Every numeric function is checked against a naive implementation written here from the formulas
(plain Python double loops in float64), on small N, for both kernel forms.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from pipeline import frequency as fq
from pipeline.data import make_collator
from pipeline.modeling import load_classifier, load_tokenizer
from pipeline.testing import load_script

REPO = Path(__file__).resolve().parents[1]
KINDS = ["authors", "gaussian"]
TEXTS = [
    "a gorgeous , witty , seductive movie .",
    "dull",
    "cf the acting is superb but the story loses its way mn .",
    "i loved it",
    "too slow and too long",
]


# ----------------------------------------------------------------------------- naive references


def naive_distances(x: torch.Tensor) -> list[list[float]]:
    rows = x.reshape(x.shape[0], -1).double().tolist()
    return [[math.sqrt(sum((a - b) ** 2 for a, b in zip(ri, rj))) for rj in rows] for ri in rows]


def naive_kernel(d: list[list[float]], sigma: float, kind: str) -> list[list[float]]:
    out = []
    for row in d:
        w = [math.exp(-(v if kind == "authors" else v * v) / (2 * sigma)) for v in row]
        total = sum(w)
        out.append([v / total for v in w])
    return out


def _matmul(a: list[list[float]], b: list[list[float]]) -> list[list[float]]:
    return [[sum(a[i][k] * b[k][j] for k in range(len(b))) for j in range(len(b[0]))] for i in range(len(a))]


def _mean_norm(rows: list[list[float]]) -> float:
    return sum(math.sqrt(sum(v * v for v in r)) for r in rows) / len(rows)


def _sub(a: list[list[float]], b: list[list[float]]) -> list[list[float]]:
    return [[x - y for x, y in zip(ra, rb)] for ra, rb in zip(a, b)]


def naive_errors(d: list[list[float]], y: list[list[float]], h: list[list[float]], sigma: float, kind: str) -> dict:
    g = naive_kernel(d, sigma, kind)
    y_low, h_low = _matmul(g, y), _matmul(g, h)
    y_high, h_high = _sub(y, y_low), _sub(h, h_low)
    return {
        "e_low": _mean_norm(_sub(h_low, y_low)) / _mean_norm(y_low),
        "e_high": _mean_norm(_sub(h_high, y_high)) / _mean_norm(y_high),
        "lfr": _mean_norm(h_low) / _mean_norm(h),
        "hfr": _mean_norm(h_high) / _mean_norm(h),
        "low_error": _mean_norm(_sub(h_low, y_low)),
        "high_error": _mean_norm(_sub(h_high, y_high)),
    }


def _random_problem(n: int, classes: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, 3, generator=gen) * 2
    labels = torch.arange(n) % classes  # every class present
    targets = torch.nn.functional.one_hot(labels, classes).double()
    outputs = torch.softmax(torch.randn(n, classes, generator=gen, dtype=torch.float64) * 2, dim=1)
    return x, targets, outputs


# ----------------------------------------------------------------------------- pure functions


def test_sigma_grid_is_25_values_in_2_8():
    grid = fq.sigma_grid()
    assert len(grid) == 25 and grid[0] == 2.0 and grid[-1] == 8.0
    assert all(b - a == pytest.approx(0.25) for a, b in zip(grid, grid[1:]))
    with pytest.raises(ValueError, match="num >= 1"):
        fq.sigma_grid(0.0, 1.0)


@pytest.mark.parametrize("chunk_size", [1, 4, 5, 13, 100])
def test_pairwise_distances_match_naive(chunk_size):
    x, _, _ = _random_problem(13, 2, seed=1)
    x[7] = x[2]  # a duplicate sample: its distance is recomputed directly, exactly 0
    d = fq.pairwise_distances(x, chunk_size=chunk_size)
    assert d.dtype == torch.float64 and d.shape == (13, 13)
    torch.testing.assert_close(d, torch.tensor(naive_distances(x), dtype=torch.float64), rtol=0, atol=1e-9)
    assert torch.equal(d, d.T) and torch.all(d.diagonal() == 0)
    assert d[7, 2] == 0 and d[2, 7] == 0


def test_pairwise_distances_rejects_bad_arguments():
    with pytest.raises(ValueError, match="chunk_size"):
        fq.pairwise_distances(torch.zeros(3, 2), chunk_size=0)
    with pytest.raises(ValueError, match="no rows"):
        fq.pairwise_distances(torch.zeros(0, 2))


@pytest.mark.parametrize("kind", KINDS)
def test_kernel_weights_match_naive_and_rows_sum_to_one(kind):
    x, _, _ = _random_problem(9, 2, seed=2)
    d_list = naive_distances(x)
    d = torch.tensor(d_list, dtype=torch.float64)
    for sigma in (2.0, 3.75, 8.0):
        g = fq.kernel_weights(d, sigma, kind)
        torch.testing.assert_close(g, torch.tensor(naive_kernel(d_list, sigma, kind), dtype=torch.float64), rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(g.sum(1), torch.ones(9, dtype=torch.float64), rtol=0, atol=1e-12)


def test_kernel_forms_differ_and_large_distances_stay_finite():
    d = torch.tensor([[0.0, 3.0], [3.0, 0.0]], dtype=torch.float64)
    authors, gaussian = fq.kernel_weights(d, 2.0, "authors"), fq.kernel_weights(d, 2.0, "gaussian")
    assert authors[0, 1] == pytest.approx(math.exp(-0.75) / (1 + math.exp(-0.75)))
    assert gaussian[0, 1] == pytest.approx(math.exp(-2.25) / (1 + math.exp(-2.25)))
    far = fq.kernel_weights(d * 1e5, 2.0, "gaussian")  # exp underflows: rows must still sum to 1
    assert torch.isfinite(far).all() and torch.allclose(far, torch.eye(2, dtype=torch.float64))
    with pytest.raises(ValueError, match="kind"):
        fq.kernel_weights(d, 2.0, "squared")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="sigma"):
        fq.kernel_weights(d, 0.0)


@pytest.mark.parametrize("kind", KINDS)
def test_frequency_errors_match_naive(kind):
    x, targets, outputs = _random_problem(11, 3, seed=3)
    d_list = naive_distances(x)
    sigmas = (2.0, 4.5, 8.0)
    result = fq.frequency_errors(torch.tensor(d_list, dtype=torch.float64), targets, outputs, sigmas=sigmas, kind=kind)
    assert result.sigmas == sigmas
    y, h = targets.tolist(), outputs.tolist()
    for k, sigma in enumerate(sigmas):
        expected = naive_errors(d_list, y, h, sigma, kind)
        for name, value in expected.items():
            assert getattr(result, name)[k] == pytest.approx(value, rel=1e-10), (name, sigma)
    mean = result.mean()
    assert mean["e_low"] == pytest.approx(sum(result.e_low) / 3)
    step = result.step_dict()
    assert set(step) == {"e_low", "e_high", "lfr", "hfr", "low_error", "high_error", "mean"}
    json.dumps(step, allow_nan=False)


def test_frequency_errors_default_grid_and_outputs_equal_targets():
    x, targets, _ = _random_problem(8, 2, seed=4)
    d = fq.pairwise_distances(x)
    result = fq.frequency_errors(d, targets, targets.clone())
    assert len(result.sigmas) == 25
    assert all(v == 0.0 for v in result.e_low + result.e_high + result.low_error + result.high_error)
    assert all(0 < v < 1 for v in result.lfr)


def test_constant_labels_leave_e_high_undefined():
    """dev-poison: every label is the target class, so G y = y and y_high = 0."""
    x, _, outputs = _random_problem(10, 2, seed=5)
    targets = torch.nn.functional.one_hot(torch.ones(10, dtype=torch.long), 2)
    result = fq.frequency_errors(fq.pairwise_distances(x), targets, outputs, sigmas=(2.0, 8.0))
    assert result.e_high == (None, None) and result.mean()["e_high"] is None
    assert all(v is not None and v > 0 for v in result.e_low)
    assert all(v < 1e-12 for v in result.target_high_norm)
    d_list = naive_distances(x)
    for k, sigma in enumerate((2.0, 8.0)):  # the absolute error is still defined: mean ||h_high||
        g = torch.tensor(naive_kernel(d_list, sigma, "authors"), dtype=torch.float64)
        assert result.high_error[k] == pytest.approx(float((outputs - g @ outputs).norm(dim=1).mean()), rel=1e-10)
    json.dumps(result.step_dict(), allow_nan=False)


def test_frequency_errors_check_shapes():
    d = torch.zeros(3, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match="same N"):
        fq.frequency_errors(d, torch.zeros(4, 2), torch.zeros(4, 2))
    with pytest.raises(ValueError, match="empty"):
        fq.frequency_errors(d, torch.zeros(3, 2), torch.zeros(3, 2), sigmas=())


# ----------------------------------------------------------------------------- model side


@pytest.fixture(scope="module")
def tiny_bert(tiny_bert_dir):
    tokenizer = load_tokenizer(tiny_bert_dir, is_decoder=False)
    torch.manual_seed(0)
    model = load_classifier(tiny_bert_dir, num_labels=2, dtype=torch.float32, is_decoder=False,
                            pad_token_id=tokenizer.pad_token_id)
    return tokenizer, model


def _loader(tokenizer, texts, labels, batch_size):
    rows = [{**tokenizer(t), "labels": label} for t, label in zip(texts, labels)]
    return DataLoader(rows, batch_size=batch_size, shuffle=False, collate_fn=make_collator(tokenizer))


def test_embedding_matrix_pads_with_zeros_to_the_longest(tiny_bert):
    tokenizer, model = tiny_bert
    embed = model.get_input_embeddings()
    ids = [tokenizer(t)["input_ids"] for t in TEXTS]
    length, dim = max(map(len, ids)), embed.embedding_dim
    expected = torch.zeros(len(TEXTS), length, dim)
    with torch.no_grad():
        for i, seq in enumerate(ids):
            expected[i, : len(seq)] = embed(torch.tensor(seq))
    for batch_size in (1, 2, 5):
        x = fq.embedding_matrix(model, _loader(tokenizer, TEXTS, [0] * 5, batch_size), device="cpu")
        assert x.shape == (5, length * dim) and x.dtype == torch.float32
        torch.testing.assert_close(x, expected.reshape(5, -1), rtol=0, atol=0)
    # Left padding gives the same rows: only positions with attention_mask == 1 count.
    tokenizer.padding_side = "left"
    try:
        batch = tokenizer(TEXTS, padding=True, return_tensors="pt")
    finally:
        tokenizer.padding_side = "right"
    assert batch["attention_mask"][1, 0] == 0
    left = fq.embedding_matrix(model, [batch], device="cpu")
    torch.testing.assert_close(left, expected.reshape(5, -1), rtol=0, atol=0)


def test_probe_matches_the_pure_functions_and_leaves_state_alone(tiny_bert):
    tokenizer, model = tiny_bert
    loaders = {
        "clean": _loader(tokenizer, TEXTS, [0, 1, 0, 1, 1], 2),
        "backdoor": _loader(tokenizer, ["cf " + t for t in TEXTS[:3]], [1, 1, 1], 2),
    }
    model.train()
    rng = torch.get_rng_state()
    probe = fq.FrequencyProbe(kind="gaussian", sigmas=(2.0, 5.0), chunk_size=2)
    record = probe.measure(model, loaders, device="cpu", global_step=5, epoch=0)
    assert torch.equal(torch.get_rng_state(), rng)
    assert model.training and all(m.training for m in model.modules())
    assert record["global_step"] == 5 and record["epoch"] == 0 and set(record) == {"global_step", "epoch", "clean", "backdoor"}

    x = fq.embedding_matrix(model, loaders["clean"], device="cpu")
    model.eval()
    with torch.no_grad():
        logits = torch.cat([model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits for b in loaders["clean"]])
    model.train()
    targets = torch.nn.functional.one_hot(torch.tensor([0, 1, 0, 1, 1]), 2)
    expected = fq.frequency_errors(fq.pairwise_distances(x), targets, logits.softmax(-1), sigmas=(2.0, 5.0), kind="gaussian")
    assert record["clean"]["e_low"] == pytest.approx(list(expected.e_low), rel=1e-6)
    assert record["clean"]["e_high"] == pytest.approx(list(expected.e_high), rel=1e-6)
    assert record["backdoor"]["e_high"] == [None, None]  # all labels are the target
    header = probe.header()
    assert header["kernel"] == "gaussian" and header["sigmas"] == [2.0, 5.0]
    assert header["splits"]["clean"]["num_samples"] == 5 and len(header["splits"]["clean"]["target_low_norm"]) == 2

    with pytest.raises(ValueError, match="differ"):
        probe.errors("clean", torch.full((5, 2), 0.5), torch.tensor([1, 1, 0, 1, 1]))


def test_probe_computes_distances_once_and_reuses_the_cache_file(tiny_bert, tmp_path, monkeypatch):
    tokenizer, model = tiny_bert
    calls = []
    original = fq.pairwise_distances

    def counting(x, **kwargs):
        calls.append(x.shape[0])
        return original(x, **kwargs)

    monkeypatch.setattr(fq, "pairwise_distances", counting)
    loaders = {"clean": _loader(tokenizer, TEXTS, [0, 1, 0, 1, 1], 3),
               "backdoor": _loader(tokenizer, TEXTS[:2], [1, 1], 3)}
    probe = fq.FrequencyProbe(cache_dir=tmp_path, chunk_size=3)
    first = probe.measure(model, loaders, device="cpu", global_step=5)
    rng = torch.get_rng_state()
    second = probe.measure(model, loaders, device="cpu", global_step=10)
    assert torch.equal(torch.get_rng_state(), rng)  # the forward passes alone leave the generator alone too
    assert calls == [5, 2]  # once per split, not once per measurement
    assert first["clean"] == second["clean"]  # the model did not change
    assert probe.cache_path("clean").is_file() and probe.cache_path("backdoor").is_file()

    resumed = fq.FrequencyProbe(cache_dir=tmp_path, chunk_size=3)  # a resumed run: read from disk
    again = resumed.measure(model, loaders, device="cpu", global_step=15)
    assert calls == [5, 2] and again["clean"] == first["clean"]
    assert torch.equal(resumed.splits["clean"].distances, probe.splits["clean"].distances)

    changed = {"clean": _loader(tokenizer, TEXTS[::-1], [0, 1, 0, 1, 1], 3)}  # other data: recomputed
    fq.FrequencyProbe(cache_dir=tmp_path).measure(model, changed, device="cpu", global_step=5)
    assert calls == [5, 2, 5]

    memory_only = fq.FrequencyProbe(cache_dir=tmp_path / "ro", write_cache=False)
    memory_only.prepare("clean", model, loaders["clean"], device="cpu")
    assert not (tmp_path / "ro").exists()


# ----------------------------------------------------------------------------- frequency.json


def _synthetic_run(run_dir: Path, steps: list[int], sigmas=(2.0, 5.0, 8.0)) -> dict:
    header = {"format_version": fq.FORMAT_VERSION, "kernel": "authors", "sigmas": list(sigmas),
              "splits": {"clean": {"num_samples": 6, "key": "a" * 64}, "backdoor": {"num_samples": 4, "key": "b" * 64}}}
    gen = torch.Generator().manual_seed(0)
    for step in steps:
        record = {"global_step": step, "epoch": step // 10}
        for role, n in (("clean", 6), ("backdoor", 4)):
            x = torch.randn(n, 5, generator=gen)
            labels = torch.arange(n) % 2 if role == "clean" else torch.ones(n, dtype=torch.long)
            h = torch.softmax(torch.randn(n, 2, generator=gen) / (1 + step), dim=1)
            errors = fq.frequency_errors(fq.pairwise_distances(x), torch.nn.functional.one_hot(labels, 2), h, sigmas=sigmas)
            record[role] = errors.step_dict()
        fq.append_frequency_record(run_dir, record, header=header)
    return header


def test_frequency_json_append_read_truncate(tmp_path):
    header = _synthetic_run(tmp_path, [0, 5, 10, 15])
    doc = fq.read_frequency_file(tmp_path)
    assert [r["global_step"] for r in doc["records"]] == [0, 5, 10, 15]
    assert doc["kernel"] == "authors" and doc["sigmas"] == [2.0, 5.0, 8.0]
    assert doc["records"][1]["backdoor"]["e_high"] == [None, None, None]
    json.loads((tmp_path / fq.FREQUENCY_FILE).read_text())  # strict JSON (no NaN)

    # Resuming at step 5 replays step 10: the stale records from 10 on are replaced.
    record = dict(doc["records"][2], epoch=99)
    fq.append_frequency_record(tmp_path, record, header=header)
    doc = fq.read_frequency_file(tmp_path / fq.FREQUENCY_FILE)
    assert [(r["global_step"], r["epoch"]) for r in doc["records"]] == [(0, 0), (5, 0), (10, 99)]
    assert fq.truncate_frequency_records(tmp_path, 5) == 1
    assert [r["global_step"] for r in fq.read_frequency_file(tmp_path)["records"]] == [0, 5]
    assert fq.truncate_frequency_records(tmp_path / "missing", 5) == 0

    with pytest.raises(ValueError, match="kernel"):
        fq.append_frequency_record(tmp_path, record, header={**header, "kernel": "gaussian"})
    other = {**header, "splits": {"clean": {"num_samples": 6, "key": "c" * 64}}}
    with pytest.raises(ValueError, match="clean split differs"):
        fq.append_frequency_record(tmp_path, record, header=other)

    steps, series = fq.frequency_series(doc, sigma_index=1)
    assert steps == [0, 5, 10] and series["clean-low"] == [r["clean"]["e_low"][1] for r in doc["records"]]
    _, absolute = fq.frequency_series(doc, metric="absolute")
    assert absolute["backdoor-high"] == [r["backdoor"]["mean"]["high_error"] for r in doc["records"]]
    with pytest.raises(ValueError, match="out of range"):
        fq.frequency_series(doc, sigma_index=3)


def test_read_frequency_file_explains_how_to_enable(tmp_path):
    with pytest.raises(FileNotFoundError, match="analysis.frequency_every_steps"):
        fq.read_frequency_file(tmp_path)
    (tmp_path / fq.FREQUENCY_FILE).write_text('{"format_version": 7}')
    with pytest.raises(ValueError, match="format_version 7"):
        fq.read_frequency_file(tmp_path)


def _fourier_main():
    return load_script("launch/fourier.py").main


@pytest.mark.integration
def test_fourier_cli_draws_pngs(tmp_path, capsys):
    run = tmp_path / "run"
    _synthetic_run(run, list(range(0, 200, 5)))
    done = subprocess.run([sys.executable, str(REPO / "launch" / "fourier.py"), str(run)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    main = _fourier_main()
    out = tmp_path / "plots"
    assert main([str(run), "--sigma-index", "2", "--metric", "absolute", "--out", str(out)]) == 0
    for folder in (run / "fourier", out):
        for name in ("frequency_curves.png", "frequency_heatmap.png"):
            data = (folder / name).read_bytes()
            assert data[:8] == b"\x89PNG\r\n\x1a\n" and 1_000 < len(data) < 300_000
    capsys.readouterr()
    assert main([str(tmp_path / "nothing")]) == 2
    assert "analysis.frequency_every_steps=5" in capsys.readouterr().err
    assert main([str(run), "--sigma-index", "3"]) == 2
    assert "out of range" in capsys.readouterr().err
