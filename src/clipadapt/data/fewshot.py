"""Seeded K-shot sampling (CoOp/Dassl protocol, baselines spec §1.3).

For each class, in label order, K items are drawn without replacement (``random.sample`` of a
``random.Random(seed)``, the generator Dassl seeds globally) from the class's items. Before the
draw the items of a class are sorted by a stable key (the image path when ``train_keys`` is given,
otherwise the row index), so a draw depends only on the seed and the dataset, never on the order
in which a file system listed the images. The validation subset is drawn next from the same RNG
stream: ``min(K, 4)`` per class from the val split, or carved from the remaining train items when
the dataset has no val split (the ImageNet protocol choice, §1.4).

Two deliberate differences from Dassl, both documented in ``docs/datasets.md``: classes are
visited in label order rather than first-appearance order (identical for the CoOp split files,
whose labels appear in increasing order), and items are sorted by key when keys are given (Dassl
uses the split file's order, which is fixed for CoOp's files anyway). The drawn indices are
returned class-sorted, ascending within a class.
"""

from __future__ import annotations

import logging
import operator
import random
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from clipadapt.exceptions import ConfigError, DatasetError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FewShotDraw:
    """Indices of one (K, seed) draw.

    Attributes:
        train_index: (K·C,) int64 rows of the train split used for fitting (class-sorted; fewer
            rows when a class has fewer than K items).
        val_index: int64 validation rows, or None when no validation data exists.
        val_source: "val" (rows of the val split), "train" (rows of the train split, carved from
            the items the train draw did not use) or "none".
        short_classes: classes that had fewer than K train items (all of them were used).
    """

    train_index: Tensor
    val_index: Tensor | None
    val_source: str
    short_classes: tuple[int, ...] = ()


def _as_label_array(labels: Sequence[int] | Tensor, what: str) -> np.ndarray:
    if isinstance(labels, Tensor):
        if labels.is_floating_point() or labels.dtype == torch.bool:
            raise DatasetError(f"{what}: expected integer labels, got {labels.dtype}")
        return labels.detach().cpu().reshape(-1).numpy().astype(np.int64)
    array = np.asarray(labels)
    if array.size == 0:
        return array.astype(np.int64).reshape(-1)
    if array.dtype.kind not in "iu":
        raise DatasetError(f"{what}: expected integer labels, got {array.dtype}")
    return array.astype(np.int64).reshape(-1)


def _by_class(
    labels: np.ndarray, keys: Sequence[str] | None, num_classes: int, what: str
) -> list[np.ndarray]:
    """Row indices of each class, sorted by ``keys`` (or by row index), in label order."""
    bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
    if bad.size:
        row = int(bad[0])
        raise DatasetError(
            f"{what}: label {int(labels[row])} at row {row} is outside [0, {num_classes}); "
            "pass the right num_classes or fix the labels"
        )
    if keys is not None:
        if len(keys) != labels.shape[0]:
            raise DatasetError(f"{what}: {len(keys)} sort keys for {labels.shape[0]} labels")
        # A stable sort by key, then a stable sort by label, groups rows by class with each
        # group in key order; ties between equal keys fall back to row order.
        order = np.argsort(np.asarray(keys, dtype=str), kind="stable")
        order = order[np.argsort(labels[order], kind="stable")]
    else:
        order = np.argsort(labels, kind="stable")
    counts = np.bincount(labels, minlength=num_classes)
    return np.split(order, np.cumsum(counts)[:-1])


def _draw(groups: list[np.ndarray], k: int, rng: random.Random) -> tuple[list[int], list[int]]:
    # One rng.sample per class, in label order: this is what consumes the RNG stream the way
    # Dassl does, so it stays a loop over classes (C calls, not a per-sample loop).
    chosen: list[int] = []
    short: list[int] = []
    for label, members in enumerate(groups):
        if len(members) >= k:
            picked = rng.sample(members.tolist(), k)
        else:
            picked = members.tolist()
            short.append(label)
        chosen.extend(sorted(picked))
    return chosen, short


def _names(indices: Sequence[int], classnames: Sequence[str] | None, limit: int = 5) -> str:
    shown = [classnames[i] if classnames else str(i) for i in indices[:limit]]
    more = f" and {len(indices) - limit} more" if len(indices) > limit else ""
    return ", ".join(shown) + more


def _positive_int(value: object, what: str) -> int:
    if isinstance(value, bool):
        raise ConfigError(f"{what} must be a positive integer, got {value!r}")
    try:
        number = operator.index(value)  # accepts numpy integers, rejects floats
    except TypeError:
        raise ConfigError(f"{what} must be a positive integer, got {value!r}") from None
    if number < 1:
        raise ConfigError(f"{what} must be a positive integer, got {value!r}")
    return number


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
        train_labels: (N,) label of each train item.
        shots: K, a positive integer. A class with fewer than K items contributes all of them,
            and one warning lists such classes (Dassl's ``repeat=False``).
        seed: the draw's seed (1, 2, 3 in the papers).
        num_classes: C (default: max train label + 1).
        val_labels: (M,) labels of the val split; None when the dataset has no val split.
        train_keys, val_keys: stable sort keys (image paths) that make a draw independent of the
            order the items are listed in. Without keys the row order is the key.
        val_shots: validation items per class (default ``min(K, 4)``, CoOp's rule).
        carve_val_from_train: without a val split, draw validation from the train items the
            train draw did not use (disjoint from it).
        classnames: class names, used in messages only.

    Returns:
        A :class:`FewShotDraw` of row indices into the train (and val) split.

    Raises:
        ConfigError: K or ``val_shots`` is not a positive integer.
        DatasetError: a class has no train items, labels are out of range or not integers.

    Example:
        >>> draw = draw_few_shot([0, 0, 0, 1, 1, 1], shots=2, seed=1, val_labels=[0, 1])
        >>> draw.train_index.shape, draw.val_source
        (torch.Size([4]), 'val')
    """
    shots = _positive_int(shots, "shots")
    k_val = min(shots, 4) if val_shots is None else _positive_int(val_shots, "val_shots")
    train = _as_label_array(train_labels, "train labels")
    c = num_classes if num_classes is not None else (int(train.max()) + 1 if train.size else 0)
    if c < 1:
        raise DatasetError("the train split is empty: there is nothing to draw shots from")
    groups = _by_class(train, train_keys, c, "train labels")
    empty = [i for i, g in enumerate(groups) if g.size == 0]
    if empty:
        raise DatasetError(
            f"{len(empty)} class(es) have no training images ({_names(empty, classnames)}); "
            "add images for them or remove them from the dataset"
        )
    rng = random.Random(seed)
    chosen, short = _draw(groups, shots, rng)
    if short:
        log.warning(
            "%d class(es) have fewer than %d training items (%s); all of their items are used",
            len(short),
            shots,
            _names(short, classnames),
        )
    val_index: Tensor | None = None
    source = "none"
    if val_labels is not None:
        val = _as_label_array(val_labels, "val labels")
        if val.size:
            val_groups = _by_class(val, val_keys, c, "val labels")
            picked, _ = _draw(val_groups, k_val, rng)
            val_index, source = torch.tensor(picked, dtype=torch.long), "val"
            no_val = [i for i, g in enumerate(val_groups) if g.size == 0]
            if no_val:
                log.warning(
                    "%d class(es) have no validation items (%s)",
                    len(no_val),
                    _names(no_val, classnames),
                )
    elif carve_val_from_train:
        taken = np.zeros(train.shape[0], dtype=bool)
        taken[chosen] = True
        remaining = [g[~taken[g]] for g in groups]
        if any(g.size for g in remaining):
            picked, _ = _draw(remaining, k_val, rng)
            val_index, source = torch.tensor(picked, dtype=torch.long), "train"
    return FewShotDraw(torch.tensor(chosen, dtype=torch.long), val_index, source, tuple(short))
