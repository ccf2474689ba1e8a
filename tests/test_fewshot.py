"""Few-shot sampler: determinism, order independence, short classes, validation subsets."""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from clipadapt.data.fewshot import draw_few_shot
from clipadapt.exceptions import ConfigError, DatasetError

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
SPLITS = DATA / "meta" / "splits"


def _labels(sizes: list[int]) -> list[int]:
    return [label for label, n in enumerate(sizes) for _ in range(n)]


def _dassl_reference(
    labels: list[int], k: int, seed: int, val_labels: list[int] | None = None
) -> tuple[list[int], list[int]]:
    """Dassl's generate_fewshot_dataset (repeat=False) for train, then val with min(K, 4)."""
    rng = random.Random(seed)

    def draw(items: list[int], shots: int) -> list[int]:
        tracker: dict[int, list[int]] = {}
        for index, label in enumerate(items):
            tracker.setdefault(label, []).append(index)
        out = []
        for members in tracker.values():
            out.extend(rng.sample(members, shots) if len(members) >= shots else members)
        return sorted(out)

    train = draw(labels, k)
    val = draw(val_labels, min(k, 4)) if val_labels is not None else []
    return train, val


def test_same_seed_same_draw_and_seeds_differ():
    labels = _labels([20, 15, 30, 12])
    a = draw_few_shot(labels, 4, seed=1)
    b = draw_few_shot(torch.tensor(labels), 4, seed=1)
    c = draw_few_shot(labels, 4, seed=2)
    assert torch.equal(a.train_index, b.train_index)
    assert torch.equal(a.val_index, b.val_index)
    assert not torch.equal(a.train_index, c.train_index)
    counts = torch.bincount(torch.tensor(labels)[a.train_index], minlength=4)
    assert counts.tolist() == [4, 4, 4, 4]


def test_draw_is_independent_of_listing_order():
    labels = _labels([9, 7, 11])
    keys = [f"class{label}/img_{i:03d}.jpg" for i, label in enumerate(labels)]
    perm = np.random.default_rng(0).permutation(len(labels))
    shuffled_labels = [labels[i] for i in perm]
    shuffled_keys = [keys[i] for i in perm]
    a = draw_few_shot(labels, 3, seed=5, train_keys=keys)
    b = draw_few_shot(shuffled_labels, 3, seed=5, train_keys=shuffled_keys)
    picked_a = sorted(keys[i] for i in a.train_index.tolist())
    picked_b = sorted(shuffled_keys[i] for i in b.train_index.tolist())
    assert picked_a == picked_b
    carved_a = sorted(keys[i] for i in a.val_index.tolist())
    carved_b = sorted(shuffled_keys[i] for i in b.val_index.tolist())
    assert carved_a == carved_b


def test_k_larger_than_class_uses_all_and_warns_once(caplog):
    labels = _labels([10, 2, 3])
    with caplog.at_level(logging.WARNING, logger="clipadapt.data.fewshot"):
        draw = draw_few_shot(
            labels, 5, seed=1, classnames=["a", "b", "c"], carve_val_from_train=False
        )
    counts = torch.bincount(torch.tensor(labels)[draw.train_index], minlength=3)
    assert counts.tolist() == [5, 2, 3]
    assert draw.short_classes == (1, 2)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "b, c" in warnings[0].getMessage()


@pytest.mark.parametrize("shots", [0, -1, 1.5, True, "4", None])
def test_invalid_shots_rejected(shots):
    with pytest.raises(ConfigError, match="shots must be a positive integer"):
        draw_few_shot([0, 1], shots, seed=1)


def test_numpy_integer_shots_accepted():
    draw = draw_few_shot([0, 0, 1, 1], np.int64(1), seed=1)
    assert draw.train_index.numel() == 2


def test_empty_class_is_an_error_naming_it():
    with pytest.raises(DatasetError, match="no training images.*zebra"):
        draw_few_shot([0, 0, 2, 2], 1, seed=1, num_classes=3, classnames=["ant", "zebra", "cat"])


def test_labels_out_of_range_rejected():
    with pytest.raises(DatasetError, match="label 3 at row 1 is outside"):
        draw_few_shot([0, 3], 1, seed=1, num_classes=2)
    with pytest.raises(DatasetError, match="sort keys"):
        draw_few_shot([0, 1], 1, seed=1, train_keys=["a"])


@pytest.mark.parametrize(("shots", "expected_val"), [(1, 1), (2, 2), (4, 4), (8, 4), (16, 4)])
def test_val_is_min_k_4_per_class(shots, expected_val):
    labels = _labels([20, 20, 20])
    val_labels = _labels([10, 10, 10])
    draw = draw_few_shot(labels, shots, seed=3, val_labels=val_labels)
    assert draw.val_source == "val"
    counts = torch.bincount(torch.tensor(val_labels)[draw.val_index], minlength=3)
    assert counts.tolist() == [expected_val] * 3


def test_val_carved_from_train_when_no_val_split():
    labels = _labels([12, 9, 10])
    draw = draw_few_shot(labels, 4, seed=1)
    assert draw.val_source == "train"
    train, val = set(draw.train_index.tolist()), set(draw.val_index.tolist())
    assert not train & val
    counts = torch.bincount(torch.tensor(labels)[draw.val_index], minlength=3)
    assert counts.tolist() == [4, 4, 4]
    off = draw_few_shot(labels, 4, seed=1, carve_val_from_train=False)
    assert off.val_index is None and off.val_source == "none"
    assert torch.equal(off.train_index, draw.train_index)


def test_carving_leaves_short_classes_with_what_is_left():
    labels = _labels([3, 10])
    draw = draw_few_shot(labels, 2, seed=1)
    counts = torch.bincount(torch.tensor(labels)[draw.val_index], minlength=2)
    assert counts.tolist() == [1, 2]


def test_matches_dassl_procedure_on_synthetic_split():
    rng = np.random.default_rng(1)
    labels = sorted(rng.integers(0, 6, 200).tolist())
    val_labels = sorted(rng.integers(0, 6, 80).tolist())
    for shots in (1, 4, 16):
        draw = draw_few_shot(labels, shots, seed=2, val_labels=val_labels)
        train, val = _dassl_reference(labels, shots, 2, val_labels)
        assert draw.train_index.tolist() == train
        assert draw.val_index.tolist() == val


@pytest.mark.realdata
def test_real_split_draws_match_dassl():
    path = SPLITS / "split_zhou_Caltech101.json"
    if not path.is_file():
        pytest.skip("../shared/data is absent")
    split = json.loads(path.read_text())
    labels = [row[1] for row in split["train"]]
    val_labels = [row[1] for row in split["val"]]
    draw = draw_few_shot(labels, 16, seed=1, val_labels=val_labels)
    train, val = _dassl_reference(labels, 16, 1, val_labels)
    assert draw.train_index.tolist() == train
    assert draw.val_index.tolist() == val
    sizes = np.bincount(labels, minlength=100)
    assert draw.short_classes == tuple(np.flatnonzero(sizes < 16).tolist())
    counts = torch.bincount(torch.tensor(val_labels)[draw.val_index], minlength=100)
    assert int(counts.max()) == 4
