"""Hyperparameter search that can only ever see validation data.

Every function here takes a :class:`~clipadapt.data.sets.ValidationSet` and refuses anything
else, so evaluation rows cannot be searched on by construction.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from clipadapt.data.sets import ValidationSet


def require_validation(val: object, who: str = "search") -> ValidationSet:
    """Return ``val`` if it is a ValidationSet, else raise TypeError."""
    if not isinstance(val, ValidationSet):
        raise TypeError(
            f"{who} accepts only a ValidationSet (got {type(val).__name__}); "
            "hyperparameters are never chosen on evaluation data"
        )
    if len(val) == 0:
        raise ValueError(f"{who}: the validation set is empty")
    return val


def accuracy(logits: Tensor, labels: Tensor) -> float:
    """Top-1 accuracy in percent; refuses an empty set."""
    if labels.numel() == 0:
        raise ValueError("cannot compute an accuracy on an empty set")
    return float((logits.argmax(-1) == labels).float().mean() * 100)


def grid_search(
    score: Callable[[dict[str, Any], ValidationSet], float],
    grid: Mapping[str, Sequence[Any]],
    val: ValidationSet,
) -> tuple[dict[str, Any], float]:
    """Exhaustive search; the first best point in grid order wins (strictly-greater update).

    Args:
        score: maps (params, val) to a validation score (higher is better).
        grid: {name: candidate values}; iteration is in the given key order, last key innermost.
        val: validation rows.

    Returns:
        (best params, best score).
    """
    val = require_validation(val, "grid_search")
    names = list(grid)
    best: tuple[dict[str, Any], float] | None = None
    for values in itertools.product(*(grid[n] for n in names)):
        params = dict(zip(names, values, strict=True))
        value = score(params, val)
        if best is None or value > best[1]:
            best = (params, value)
    if best is None:
        raise ValueError("grid_search: the grid is empty")
    return best


def search_logit_blend(
    base_logits: Tensor,
    extra_logits: Sequence[Tensor],
    weights: Sequence[float],
    val: ValidationSet,
) -> tuple[int, int, float]:
    """Vectorised search of ``base + w * extra[i]`` over candidates i and weights w.

    All candidate logits must already be computed on ``val.features``. The iteration order is
    candidates outer, weights inner, first best wins.

    Returns:
        (index of the best candidate, index of the best weight, validation accuracy).
    """
    val = require_validation(val, "search_logit_blend")
    w = torch.as_tensor(list(weights), dtype=base_logits.dtype, device=base_logits.device)
    best = (-1, -1, -1.0)
    for i, extra in enumerate(extra_logits):
        # (W, N, C): every weight at once for this candidate
        blended = base_logits[None] + w[:, None, None] * extra[None]
        correct = (blended.argmax(-1) == val.labels[None]).float().mean(-1) * 100
        j = int(torch.argmax(correct))  # argmax returns the first maximum
        value = float(correct[j])
        if value > best[2]:
            best = (i, j, value)
    return best
