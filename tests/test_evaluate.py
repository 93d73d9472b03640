"""Tests for pipeline.evaluate: hand-computed metrics and predict() on a tiny model."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from pipeline.evaluate import (
    accuracy,
    attack_success_rate,
    backdoor_metrics,
    clean_false_positive_rate,
    confusion_matrix,
    per_class_accuracy,
    predict,
)

PREDS = [1, 0, 1, 1, 0, 2]
LABELS = [1, 1, 0, 1, 0, 2]


def test_accuracy_hand_computed() -> None:
    assert accuracy(PREDS, LABELS) == pytest.approx(4 / 6)
    assert accuracy(torch.tensor([0, 0]), torch.tensor([1, 1])) == 0.0


def test_confusion_matrix_and_per_class_accuracy() -> None:
    # rows: true label, columns: predicted label
    assert confusion_matrix(PREDS, LABELS, 3) == [[1, 1, 0], [1, 2, 0], [0, 0, 1]]
    assert per_class_accuracy(PREDS, LABELS, 3) == pytest.approx([1 / 2, 2 / 3, 1.0])
    per_class = per_class_accuracy([0, 0], [0, 0], 2)
    assert per_class[0] == 1.0 and math.isnan(per_class[1])


def test_attack_success_rate_and_clean_fpr() -> None:
    assert attack_success_rate([1, 1, 0, 1], target_label=1) == pytest.approx(0.75)
    # non-target sentences: indices 2, 4, 5 (labels 0, 0, 2), predicted 1, 0, 2 -> 1 of 3
    assert clean_false_positive_rate(PREDS, LABELS, target_label=1) == pytest.approx(1 / 3)
    assert clean_false_positive_rate([1, 0, 0], [0, 0, 1], target_label=1) == pytest.approx(0.5)


def test_metric_errors() -> None:
    with pytest.raises(ValueError, match="differ in length: 2 vs 3"):
        accuracy([0, 1], [0, 1, 1])
    with pytest.raises(ValueError, match="empty split"):
        accuracy([], [])
    with pytest.raises(ValueError, match=r"labels holds class ids outside \[0, 2\): \[5\]"):
        confusion_matrix([0, 1], [0, 5], 2)
    with pytest.raises(ValueError, match="integer class ids"):
        accuracy(torch.tensor([0.0]), torch.tensor([0]))
    with pytest.raises(ValueError, match="every label equals the target 1"):
        clean_false_positive_rate([1, 0], [1, 1], target_label=1)
    with pytest.raises(ValueError, match="no predictions"):
        attack_success_rate([], target_label=1)


class TinyClassifier(nn.Module):
    """Embedding bag + linear; dropout makes train vs eval mode observable."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.dropout = nn.Dropout(0.5)
        self.head = nn.Linear(4, 2)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        mask = attention_mask.unsqueeze(-1).float()
        pooled = (self.embed(input_ids) * mask).sum(1) / mask.sum(1)
        return self.head(self.dropout(pooled))


def make_loader() -> DataLoader:
    generator = torch.Generator().manual_seed(0)
    rows = [
        {
            "input_ids": torch.randint(0, 10, (5,), generator=generator),
            "attention_mask": torch.tensor([1, 1, 1, 0, 0]),
            "labels": torch.tensor(i % 2),
            "poison_label": torch.tensor(0),
        }
        for i in range(7)
    ]
    return DataLoader(rows, batch_size=3)


def test_predict_matches_manual_eval_and_restores_modes() -> None:
    torch.manual_seed(0)
    model = TinyClassifier()
    model.train()
    model.head.eval()  # a submodule deliberately in eval mode must stay so
    loader = make_loader()
    preds, labels = predict(model, loader, device="cpu", progress=False)
    assert model.training and model.dropout.training and not model.head.training
    model.eval()
    with torch.no_grad():
        expected = torch.cat([model(b["input_ids"], b["attention_mask"]).argmax(-1) for b in loader])
    assert preds.dtype == torch.long and labels.dtype == torch.long
    assert torch.equal(preds, expected)
    assert labels.tolist() == [i % 2 for i in range(7)]
    assert accuracy(preds, labels) == pytest.approx((preds == labels).float().mean().item())


def test_predict_reads_logits_attribute_and_checks_batches() -> None:
    class Output:
        def __init__(self, logits: torch.Tensor) -> None:
            self.logits = logits

    class Wrapped(nn.Module):
        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> Output:
            return Output(torch.stack([input_ids[:, 0].float(), torch.full((input_ids.shape[0],), 4.5)], 1))

    batch = {
        "input_ids": torch.tensor([[9, 0], [1, 0]]),
        "attention_mask": torch.ones(2, 2),
        "labels": torch.tensor([0, 1]),
    }
    preds, labels = predict(Wrapped(), [batch], device="cpu", progress=False)
    assert preds.tolist() == [0, 1] and labels.tolist() == [0, 1]
    with pytest.raises(KeyError, match=r"batch 0 lacks \['labels'\]"):
        predict(Wrapped(), [{"input_ids": batch["input_ids"]}], device="cpu", progress=False)


def test_eval_mode_restores_each_module_flag_and_disables_grad():
    import torch
    from torch import nn

    from pipeline.evaluate import eval_mode

    model = nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.5))
    model.train()
    model[0].eval()  # deliberately different from its parent
    with eval_mode(model) as inside:
        assert inside is model and not model.training and not model[1].training
        assert not model[0](torch.ones(1, 2)).requires_grad
    assert model.training and model[1].training and not model[0].training
    try:
        with eval_mode(model):
            raise RuntimeError("boom")
    except RuntimeError:
        pass
    assert model.training and not model[0].training and torch.is_grad_enabled()


def test_backdoor_metrics_fractions_and_undefined_fpr():
    metrics = backdoor_metrics(torch.tensor([1, 0, 1, 1]), torch.tensor([1, 0, 0, 0]), torch.tensor([1, 1, 0]), target_label=1)
    assert metrics["cacc"] == pytest.approx(0.5) and metrics["asr"] == pytest.approx(2 / 3)
    assert metrics["clean_fpr"] == pytest.approx(2 / 3) and metrics["asr_minus_clean_fpr"] == pytest.approx(0.0)
    only_target = backdoor_metrics(torch.tensor([1, 0]), torch.tensor([1, 1]), torch.tensor([1]), target_label=1)
    assert only_target == {"cacc": 0.5, "asr": 1.0, "clean_fpr": None, "asr_minus_clean_fpr": None}
