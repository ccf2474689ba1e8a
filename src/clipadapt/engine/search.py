"""Hyperparameter search that can only ever see validation data.

Every function here takes a :class:`~clipadapt.data.sets.ValidationSet` and refuses anything
else, so evaluation rows cannot be searched on by construction. Every method's search goes
through one of them: :func:`grid_search` (any score; :func:`coordinate_search` runs it one
coordinate at a time, coarse to fine, around a starting point), or a vectorised equivalent for
the blend ``base + w * extra`` that several methods tune (:func:`search_blend`,
:func:`search_logit_blend`). All visit the grid in the same order and keep the first best point.
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
    score: Callable[[dict[str, Any], ValidationSet], Any],
    grid: Mapping[str, Sequence[Any]],
    val: ValidationSet,
) -> tuple[dict[str, Any], Any]:
    """Exhaustive search; the first best point in grid order wins (strictly-greater update).

    Args:
        score: maps (params, val) to a validation score (higher is better): a float, or a
            tuple compared element by element (e.g. accuracy, then minus the validation loss
            to break accuracy ties).
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


#: Coarse then fine multiplicative steps of :func:`coordinate_search`.
COARSE_TO_FINE = ((0.5, 2.0), (0.75, 1.25))


def coordinate_values(
    start: float, factors: Sequence[Sequence[float]] = COARSE_TO_FINE
) -> list[float]:
    """Every value :func:`coordinate_search` can give a coordinate that starts at ``start``."""
    reach = {1.0}
    for steps in factors:
        reach |= {r * f for r in reach for f in steps}
    return sorted(start * r for r in reach)


def coordinate_search(
    score: Callable[[dict[str, Any], ValidationSet], float],
    start: Mapping[str, float],
    val: ValidationSet,
    factors: Sequence[Sequence[float]] = COARSE_TO_FINE,
) -> tuple[dict[str, float], float]:
    """Coarse-to-fine search of positive weights around ``start``, one coordinate at a time.

    Each pass of ``factors`` (coarse first) visits the names of ``start`` in order and runs
    :func:`grid_search` over ``[current, current * f for f in factors[pass]]`` with the other
    values held, so the current value wins ties and a point is only left for a strictly better
    one. A value of 0 stays 0. Each distinct point is scored once: at most
    ``1 + len(start) * sum(len(f) for f in factors)`` scores.

    Args:
        score: maps (point, val) to a validation score (higher is better).
        start: the starting point {name: value}.
        val: validation rows.
        factors: the multiplicative steps of each pass.

    Returns:
        (best point, best score).
    """
    val = require_validation(val, "coordinate_search")
    seen: dict[tuple[float, ...], float] = {}

    def cached(point: dict[str, Any], rows: ValidationSet) -> float:
        key = tuple(float(point[n]) for n in start)
        if key not in seen:
            seen[key] = score(point, rows)
        return seen[key]

    best = {name: float(value) for name, value in start.items()}
    best_score = cached(best, val)
    for steps in factors:
        for name in start:
            current = best[name]
            candidates = list(dict.fromkeys([current, *(current * f for f in steps)]))
            held = dict(best)
            found, best_score = grid_search(
                lambda point, rows, held=held: cached({**held, **point}, rows),
                {name: candidates},
                val,
            )
            best = {**held, **found}
    return best, best_score


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


#: Above this share of (row, class) candidate pairs a candidate is scored densely.
DENSE_CANDIDATE_SHARE = 0.1


def search_blend(
    base: Tensor,
    extra_for: Callable[[Any], Tensor],
    grid: Mapping[str, Sequence[Any]],
    val: ValidationSet,
) -> tuple[dict[str, Any], float]:
    """Exhaustive, exact search of ``base + w * extra_for(c)`` over candidates c and weights w.

    ``grid`` has two keys: the candidates (outer, e.g. Tip-Adapter's β) and the weights
    (inner, e.g. its α); the result equals :func:`grid_search` with the accuracy of that blend
    as the score (first best point in grid order), without scoring most of the grid.

    A class can win a row's argmax for some weight only if its best possible score (at the
    largest weight, when the extra logits are >= 0) reaches the smallest guaranteed row maximum
    (the row maximum at the smallest weight). When those candidate (row, class) pairs are few
    (a sharp cache, a confident base) only they are scored, for every weight at once; when they
    are many the weights are scored densely, one (Nv, C) argmax each, which is cheaper than
    gathering most pairs. Both follow argmax's first-maximum tie rule, so the choice never
    changes the result. Extra logits with negative entries are always scored densely.

    Args:
        base: (Nv, C) logits of the validation rows (e.g. zero-shot).
        extra_for: maps a candidate to its (Nv, C) extra logits.
        grid: ``{candidate name: candidates, weight name: weights}``.
        val: validation rows (their labels score the grid).

    Returns:
        ({candidate name: c, weight name: w}, validation accuracy in percent).
    """
    val = require_validation(val, "search_blend")
    if len(grid) != 2:
        raise ValueError(f"search_blend needs {{candidates: ..., weights: ...}}, got {list(grid)}")
    (cand_name, candidates), (weight_name, weights) = grid.items()
    candidates, weights = list(candidates), list(weights)
    if not candidates or not weights:
        raise ValueError("search_blend: the grid is empty")
    num_rows, num_classes = base.shape
    weight_t = torch.tensor(weights, dtype=base.dtype, device=base.device)[:, None]
    w_lo, w_hi = float(weight_t.min()), float(weight_t.max())
    labels = val.labels
    arange = torch.arange(num_rows, device=labels.device)
    best = (candidates[0], weights[0], -1.0)
    dense_buffer = torch.empty_like(base)
    for candidate in candidates:
        extra = extra_for(candidate)
        upper = base + w_hi * extra
        floor = (base + w_lo * extra).amax(dim=1, keepdim=True)
        pairs = upper >= floor
        dense = int(pairs.sum()) > DENSE_CANDIDATE_SHARE * pairs.numel() or bool((extra < 0).any())
        if dense:
            correct_counts = []
            for weight in weights:
                torch.add(base, extra, alpha=weight, out=dense_buffer)
                correct_counts.append(dense_buffer.argmax(dim=1) == labels)
            counts = torch.stack(correct_counts).sum(dim=1)
        else:
            rows, cols = torch.nonzero(pairs, as_tuple=True)  # row-major: cols ascend
            scores = base[rows, cols][None] + weight_t * extra[rows, cols][None]  # (W, P)
            row_max = scores.new_full((len(weights), num_rows), -torch.inf)
            row_max.scatter_reduce_(1, rows.expand_as(scores), scores, reduce="amax")
            true_score = base[arange, labels][None] + weight_t * extra[arange, labels][None]
            # argmax takes the first maximum: the true class must reach the maximum with no
            # earlier class tied to it
            tied_before = (scores == row_max[:, rows]) & (cols < labels[rows])[None]
            blocked = torch.zeros_like(row_max).scatter_add_(
                1, rows.expand_as(scores), tied_before.to(scores.dtype)
            )
            counts = ((true_score >= row_max) & (blocked == 0)).sum(dim=1)
        j = int(torch.argmax(counts))
        score = 100.0 * int(counts[j]) / num_rows
        if score > best[2]:
            best = (candidate, weights[j], score)
    return {cand_name: best[0], weight_name: best[1]}, best[2]
