"""Shared pytest fixtures: tiny random checkpoints of every supported family, MiniLM, the data root.

Tiny checkpoints (hidden 64, 2 layers, 4 heads) are built once per test session, offline, by
``pipeline.testing.build_tiny_checkpoint``.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.testing import build_tiny_checkpoint


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
