"""Scores of a classifier's logits beyond top-1 accuracy.

Public API:
    - :func:`expected_calibration_error`: ECE in percent over equal-width confidence bins.
    - :func:`calibration_gaps`: the per-bin sums behind it, to add up over batches.
"""

from __future__ import annotations

import torch
from torch import Tensor

#: The number of equal-width confidence bins of the ECE in every classification record.
ECE_BINS = 15


def expected_calibration_error(logits: Tensor, labels: Tensor, bins: int = ECE_BINS) -> float:
    """Expected calibration error (Guo et al., ICML 2017) in percent.

    The confidence of a row is its largest softmax probability. Rows fall into ``bins``
    equal-width bins ``(i/bins, (i+1)/bins]`` (a confidence of exactly 0 joins the first); the
    ECE is ``Σ_b (n_b / N) · |accuracy_b − mean confidence_b|`` over the non-empty bins, times
    100. It is 0 for a perfectly calibrated classifier and at most 100.

    Args:
        logits: (N, C) logits of any float dtype (softmax is taken in float32).
        labels: (N,) int64 true classes.
        bins: number of bins (15, the common choice).

    Returns:
        The ECE in percent.

    Raises:
        ValueError: ``bins < 1``, an empty set, or shapes that do not match.

    Example:
        >>> import torch
        >>> logits = torch.log(torch.tensor([[0.9, 0.1], [0.6, 0.4]]))
        >>> round(expected_calibration_error(logits, torch.tensor([0, 1])), 3)
        35.0
    """
    if labels.numel() == 0:
        raise ValueError("the expected calibration error of an empty set is undefined")
    # (n_b / N) · |acc_b − conf_b| = |Σ_b correct − Σ_b confidence| / N, so no per-bin count
    gap = calibration_gaps(logits, labels, bins).abs().sum() / labels.numel()
    return float(gap * 100.0)


def calibration_gaps(logits: Tensor, labels: Tensor, bins: int = ECE_BINS) -> Tensor:
    """Per confidence bin, ``Σ correct − Σ confidence`` over the rows (a (bins,) float32 tensor).

    Sums of batches add up, so the ECE of a set scored in batches is
    ``100 · |Σ_batches gaps|.sum() / N`` (:func:`expected_calibration_error` on one batch).

    Raises:
        ValueError: ``bins < 1`` or shapes that do not match.
    """
    if bins < 1:
        raise ValueError(f"bins must be a positive int, got {bins}")
    if logits.ndim != 2 or labels.ndim != 1 or logits.shape[0] != labels.shape[0]:
        raise ValueError(
            f"expected (N, C) logits and (N,) labels, got {tuple(logits.shape)} and "
            f"{tuple(labels.shape)}"
        )
    probs = torch.softmax(logits.float(), dim=-1)
    confidence, predicted = probs.max(dim=-1)
    correct = (predicted == labels.to(predicted.device)).float()
    # bin i holds confidences in (i/bins, (i+1)/bins]
    index = (torch.ceil(confidence * bins).long() - 1).clamp_(0, bins - 1)
    gaps = torch.zeros(bins, device=confidence.device)
    return gaps.index_add_(0, index, correct - confidence)
