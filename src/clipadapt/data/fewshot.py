"""Seeded K-shot sampling (CoOp/Dassl protocol, baselines spec §1.3).

For each class, in label order, K items are drawn without replacement from the class's items
sorted by a stable key (the image path, or the row index for bundles), so a draw depends only on
the seed and the dataset, never on file-system listing order. The validation subset is drawn next
from the same RNG stream: ``min(K, 4)`` per class from the val split, or carved from the
remaining train items when the dataset has no val split (the ImageNet protocol choice, §1.4).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from clipadapt.exceptions import ConfigError, DatasetError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FewShotDraw:
    """Indices of one (K, seed) draw.

    Attributes:
        train_index: rows of the train split used for fitting (class-sorted).
        val_index: validation rows, or None when no validation data exists.
        val_source: "val" (the val split) or "train" (carved from unused train rows).
        short_classes: classes that had fewer than K items (all of them were used).
    """

    train_index: Tensor
    val_index: Tensor | None
    val_source: str
    short_classes: tuple[int, ...] = ()


def _by_class(labels: Sequence[int], keys: Sequence[str] | None, num_classes: int) -> list[list[int]]:
    groups: list[list[int]] = [[] for _ in range(num_classes)]
    for index, label in enumerate(labels):
        if not 0 <= label < num_classes:
            raise DatasetError(f"label {label} at row {index} is outside [0, {num_classes})")
        groups[label].append(index)
    if keys is not None:
        groups = [sorted(g, key=lambda i: keys[i]) for g in groups]
    return groups


def _draw(groups: list[list[int]], k: int, rng: random.Random) -> tuple[list[int], list[int]]:
    chosen, short = [], []
    for label, members in enumerate(groups):
        if len(members) >= k:
            picked = rng.sample(members, k)
        else:
            picked = list(members)
            short.append(label)
        chosen.extend(sorted(picked))
    return chosen, short


def draw_few_shot(
    train_labels: Sequence[int] | Tensor,
    shots: int,
    seed: int,
    *,
    num_classes: int | None = None,
    val_labels: Sequence[int] | Tensor | None = None,
    train_keys: Sequence[str] | None = None,
    val_keys: Sequence[str] | None = None,
    val_shots: int | None = None,
    carve_val_from_train: bool = True,
    classnames: Sequence[str] | None = None,
) -> FewShotDraw:
    """Draw K items per class from train, then a validation subset.

    Args:
        train_labels: label of each train item.
        shots: K, a positive integer.
        seed: the draw's seed (1, 2, 3 in the papers).
        num_classes: C (default: max label + 1).
        val_labels: labels of the val split; None when the dataset has no val split.
        train_keys, val_keys: stable sort keys (image paths) making draws order-independent.
        val_shots: validation items per class (default ``min(K, 4)``).
        carve_val_from_train: without a val split, draw validation from unused train items.
        classnames: for messages.

    Raises:
        ConfigError: K < 1.
        DatasetError: a class has no train items, or labels are out of range.
    """
    if isinstance(shots, bool) or not isinstance(shots, int) or shots < 1:
        raise ConfigError(f"shots must be a positive integer, got {shots!r}")
    train = [int(x) for x in (train_labels.tolist() if isinstance(train_labels, Tensor) else train_labels)]
    c = num_classes if num_classes is not None else (max(train) + 1 if train else 0)
    groups = _by_class(train, train_keys, c)
    empty = [i for i, g in enumerate(groups) if not g]
    if empty:
        names = [classnames[i] if classnames else str(i) for i in empty[:5]]
        raise DatasetError(
            f"class(es) {', '.join(names)} have no training images; add images or remove the "
            "class from the dataset"
        )
    rng = random.Random(seed)
    chosen, short = _draw(groups, shots, rng)
    if short:
        names = [classnames[i] if classnames else str(i) for i in short[:5]]
        log.warning(
            "%d class(es) have fewer than %d training items (e.g. %s); all of their items are used",
            len(short), shots, ", ".join(names),
        )
    k_val = val_shots if val_shots is not None else min(shots, 4)
    val_index: Tensor | None = None
    source = "none"
    if val_labels is not None:
        val = [int(x) for x in (val_labels.tolist() if isinstance(val_labels, Tensor) else val_labels)]
        if val:
            picked, _ = _draw(_by_class(val, val_keys, c), k_val, rng)
            val_index, source = torch.tensor(picked, dtype=torch.long), "val"
    elif carve_val_from_train:
        taken = set(chosen)
        remaining = [[i for i in g if i not in taken] for g in groups]
        if any(remaining):
            picked, _ = _draw(remaining, k_val, rng)
            if picked:
                val_index, source = torch.tensor(picked, dtype=torch.long), "train"
    return FewShotDraw(torch.tensor(chosen, dtype=torch.long), val_index, source, tuple(short))
