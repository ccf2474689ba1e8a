"""Expected calibration error against a case computed by hand."""

from __future__ import annotations

import pytest
import torch

from clipadapt.metrics import ECE_BINS, calibration_gaps, expected_calibration_error

# five rows whose softmax is exactly these probabilities (logits = log p)
PROBS = torch.tensor(
    [
        [0.70, 0.20, 0.10],  # confidence 0.70, correct   -> bin (10/15, 11/15]
        [0.72, 0.18, 0.10],  # confidence 0.72, wrong     -> bin (10/15, 11/15]
        [0.10, 0.85, 0.05],  # confidence 0.85, correct   -> bin (12/15, 13/15]
        [0.42, 0.33, 0.25],  # confidence 0.42, wrong     -> bin (6/15, 7/15]
        [0.45, 0.30, 0.25],  # confidence 0.45, correct   -> bin (6/15, 7/15]
    ]
)
LABELS = torch.tensor([0, 1, 1, 2, 0])


def test_ece_matches_the_hand_computed_case() -> None:
    # bin (10/15, 11/15]: 2 rows, accuracy 0.5, mean confidence 0.71  -> 2/5 * 0.21  = 0.084
    # bin (12/15, 13/15]: 1 row,  accuracy 1.0, confidence 0.85       -> 1/5 * 0.15  = 0.030
    # bin (6/15, 7/15]:   2 rows, accuracy 0.5, mean confidence 0.435 -> 2/5 * 0.065 = 0.026
    assert ECE_BINS == 15
    assert expected_calibration_error(PROBS.log(), LABELS) == pytest.approx(14.0, abs=1e-4)


def test_ece_depends_on_the_bins() -> None:
    # one bin: |accuracy 3/5 - mean confidence 0.628| = 0.028
    assert expected_calibration_error(PROBS.log(), LABELS, bins=1) == pytest.approx(2.8, abs=1e-4)
    # as many bins as distinct confidences: the mean per-row gap (0.30+0.72+0.15+0.42+0.55)/5
    many = expected_calibration_error(PROBS.log(), LABELS, bins=1000)
    assert many == pytest.approx(42.8, abs=1e-3)


def test_ece_is_zero_when_confidence_equals_accuracy() -> None:
    # 4 rows at confidence 0.75, three of them right
    probs = torch.tensor([[0.75, 0.25]] * 4)
    labels = torch.tensor([0, 0, 0, 1])
    assert expected_calibration_error(probs.log(), labels) == pytest.approx(0.0, abs=1e-5)
    # a logit scale does not change predictions but does change the ECE
    sharp = expected_calibration_error(100 * probs.log(), labels)
    assert sharp == pytest.approx(25.0, abs=1e-3)


@pytest.mark.parametrize(
    ("logits", "labels", "bins", "match"),
    [
        (torch.zeros(0, 3), torch.zeros(0, dtype=torch.long), 15, "empty"),
        (torch.zeros(4, 3), torch.zeros(3, dtype=torch.long), 15, "expected"),
        (torch.zeros(4, 3), torch.zeros(4, dtype=torch.long), 0, "bins"),
    ],
)
def test_ece_rejects_bad_input(logits, labels, bins, match) -> None:
    with pytest.raises(ValueError, match=match):
        expected_calibration_error(logits, labels, bins)


def test_calibration_gaps_add_up_over_batches() -> None:
    logits = torch.randn(50, 7, generator=torch.Generator().manual_seed(0)) * 3
    labels = torch.arange(50) % 7
    whole = expected_calibration_error(logits, labels)
    gaps = calibration_gaps(logits[:20], labels[:20]) + calibration_gaps(logits[20:], labels[20:])
    assert float(gaps.abs().sum() / 50 * 100) == pytest.approx(whole, abs=1e-4)
    assert whole > 1.0  # a real gap, not a trivially calibrated case


def test_every_classification_record_carries_its_ece() -> None:
    import clipadapt
    from clipadapt.testing import make_fixture

    fx = make_fixture(num_classes=5, dim=16, shots=4, seed=0)
    result = clipadapt.evaluate(clipadapt.create_method("zeroshot"), fx.bundle, shots=4, seed=1)
    rows = fx.bundle.group("test")
    expected = expected_calibration_error(result.fitted.logits(rows.features), rows.labels)
    assert result.to_dict()["ece"] == pytest.approx(expected)
    assert 0.0 < result.ece < 100.0
