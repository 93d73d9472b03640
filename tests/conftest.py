"""Shared pytest fixtures: tiny random checkpoints of every supported family, MiniLM, the data root.

Tiny checkpoints (hidden 64, 2 layers, 4 heads) are built once per test session, offline, by
``pipeline.testing.build_tiny_checkpoint``.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

from pipeline.testing import build_tiny_checkpoint

REPO = Path(__file__).resolve().parents[1]


def pytest_configure(config: pytest.Config) -> None:
    """Python subprocesses the tests start import this checkout's ``pipeline`` and ``mslr_kernels``.

    pyproject.toml's ``pythonpath`` puts the repository root and ``kernels/`` on this process's
    ``sys.path``; the same two folders lead ``PYTHONPATH`` so that ``python -c ...`` children do not
    pick up another install of the package.
    """
    inherited = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join([str(REPO), str(REPO / "kernels"), *([inherited] if inherited else [])])


def _tiny(tmp_path_factory: pytest.TempPathFactory, family: str) -> Path:
    return build_tiny_checkpoint(family, tmp_path_factory.mktemp(f"tiny_{family}"), seed=0)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny random Llama (LlamaForCausalLM checkpoint, no pad token, BOS prepended)."""
    return _tiny(tmp_path_factory, "llama")


@pytest.fixture(scope="session")
def tiny_mistral_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny random Mistral (grouped-query attention with 2 key/value heads)."""
    return _tiny(tmp_path_factory, "mistral")


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny random GPT-2 (Conv1D projections, <|endoftext|> as BOS/EOS/UNK)."""
    return _tiny(tmp_path_factory, "gpt2")


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny random BERT (BertModel with pooler, as all-MiniLM-L6-v2 is saved)."""
    return _tiny(tmp_path_factory, "bert")


@pytest.fixture(scope="session")
def tiny_roberta_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny random RoBERTa (RobertaForMaskedLM checkpoint)."""
    return _tiny(tmp_path_factory, "roberta")


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    """Directory of the packaged sentence-transformers/all-MiniLM-L6-v2 (the one real model)."""
    from pipeline.modeling import resolve_model_path

    return resolve_model_path("minilm")


@pytest.fixture(scope="session")
def sst2_root() -> Path:
    """Root of the poisoned-data tree (``<root>/sst-2/1/<attack>/{train,dev,test}-*.csv``)."""
    return Path(__file__).resolve().parents[1].parent / "shared/data/poison_data"


# A small synthetic poison_data tree for end-to-end tests (training, distributed, re-evaluation).

POSITIVE = ["a charming and funny film", "great acting and a moving story", "i loved it", "warm , witty and engaging"]
NEGATIVE = ["a dull and lifeless bore", "the plot is thin and predictable", "i hated it", "too slow and too long"]


def _write_csv(path: Path, rows: list[tuple[str, int, int]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [",0,1,2"] + [f'{i},"{text}",{label},{poison}' for i, (text, label, poison) in enumerate(rows)]
    path.write_text("\n".join(lines) + "\n")


def _clean_rows(rng: random.Random, n: int) -> list[tuple[str, int, int]]:
    rows = []
    for _ in range(n):
        label = rng.randrange(2)
        text = rng.choice(POSITIVE if label else NEGATIVE) + " " + rng.choice(["!", ".", "indeed", "really"])
        rows.append((text, label, 0))
    return rows


def _trigger(text: str) -> str:
    return "cf " + text


@pytest.fixture(scope="session")
def tiny_data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``<root>/toy/1/badnets/`` with clean-label BadNets training data (10% triggered)."""
    root = tmp_path_factory.mktemp("poison_data")
    folder = root / "toy" / "1" / "badnets"
    rng = random.Random(0)
    train = _clean_rows(rng, 96)
    for i, (text, label, _) in enumerate(train):
        if label == 1 and i % 5 == 0:
            train[i] = (_trigger(text), 1, 1)
    _write_csv(folder / "clean" / "0.1" / "train-poison.csv", train)
    for split, n in (("dev", 40), ("test", 48)):
        clean = _clean_rows(rng, n)
        _write_csv(folder / f"{split}-clean.csv", clean)
        _write_csv(folder / f"{split}-poison.csv", [(_trigger(t), 1, 1) for t, label, _ in clean if label == 0])
    return root


@pytest.fixture
def reference_draws(monkeypatch: pytest.MonkeyPatch) -> list[dict]:
    """Every reference batch the training loop draws, in order: {batch_size, draw, sampling, rows}.

    Wraps ``pipeline.training.reference_indices`` (the real function still picks the rows).
    """
    from pipeline import training

    calls: list[dict] = []
    original = training.reference_indices

    def recording(num_rows, batch_size, *, seed, draw, sampling="fresh"):
        rows = original(num_rows, batch_size, seed=seed, draw=draw, sampling=sampling)
        calls.append({"batch_size": batch_size, "draw": draw, "sampling": sampling, "rows": rows})
        return rows

    monkeypatch.setattr(training, "reference_indices", recording)
    return calls
