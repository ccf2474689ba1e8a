"""Tip-Adapter and zero-shot against hand-computed values, and the val-only search."""

from __future__ import annotations

import math

import pytest
import torch

from clipadapt import create_method
from clipadapt.data.sets import EvaluationSet, TextFeatures, TrainSet, ValidationSet
from clipadapt.engine.search import search_blend
from clipadapt.methods.tip_adapter import cache_logits, tip_grid


def _unit(*rows: list[float]) -> torch.Tensor:
    t = torch.tensor(rows, dtype=torch.float32)
    return t / t.norm(dim=1, keepdim=True)


def _three_class_problem():
    text = TextFeatures(_unit([1, 0, 0], [0, 1, 0], [0, 0, 1]), ("a", "b", "c"))
    keys = _unit([1, 1, 0], [0, 1, 1], [1, 0, 1])
    train = TrainSet(keys, torch.tensor([0, 1, 2]))
    return text, train


def test_tip_adapter_logits_match_hand_computation():
    text, train = _three_class_problem()
    method = create_method("tip_adapter", alpha=2.0, beta=3.0, search=False).fit(train, text)
    f = _unit([1, 0.5, 0])  # one query
    s = 1 / math.sqrt(1.25)
    r2 = 1 / math.sqrt(2)
    affinities = [s * r2 + 0.5 * s * r2, 0.5 * s * r2, s * r2]  # f · key_j, by hand
    expected = []
    zero_shot = [100 * s, 100 * 0.5 * s, 0.0]
    for c in range(3):
        expected.append(zero_shot[c] + 2.0 * math.exp(-3.0 * (1 - affinities[c])))
    got = method.logits(f)[0].tolist()
    assert got == pytest.approx(expected, rel=1e-5)
    assert method.best_params_["source"] == "default: search disabled"


def test_zero_shot_logits_are_scaled_cosines():
    text, train = _three_class_problem()
    method = create_method("zeroshot").fit(train, text)
    f = _unit([1, 2, 2])
    assert method.logits(f)[0].tolist() == pytest.approx([100 / 3, 200 / 3, 200 / 3], rel=1e-5)


def test_grid_matches_tip_adapter_formula():
    grid = tip_grid(7.0, 200)
    assert len(grid) == 200 and grid[0] == pytest.approx(0.1)
    assert grid[-1] == pytest.approx(0.1 + 199 * 6.9 / 200) and max(grid) < 7.0


@pytest.mark.parametrize("case", ["random", "ties", "negative"])
def test_pruned_search_equals_brute_force(case):
    gen = torch.Generator().manual_seed(0)
    n, nk, c = 60, 40, 8
    zero_shot = torch.randn(n, c, generator=gen) * 3
    affinity = torch.rand(n, nk, generator=gen) * 2 - 1
    if case == "ties":  # integer text logits and equal cache logits: argmax takes the first max
        zero_shot = torch.randint(0, 3, (n, c), generator=gen).float()
        affinity = torch.zeros(n, nk)
    key_labels = torch.arange(nk) % c
    labels = torch.randint(0, c, (n,), generator=gen)
    val = ValidationSet(torch.randn(n, 4, generator=gen), labels)
    betas, alphas = tip_grid(7, 15), tip_grid(10, 12)
    # "negative": extra logits below zero break the pruning bound, so they are scored densely
    shift = 0.5 if case == "negative" else 0.0

    def extra_for(beta: float) -> torch.Tensor:
        return cache_logits(affinity, key_labels, c, beta) - shift

    got, acc = search_blend(zero_shot, extra_for, {"beta": betas, "alpha": alphas}, val)
    best = (None, None, -1.0)
    for b in betas:
        cache = torch.zeros(n, c).index_add_(1, key_labels, torch.exp(-b * (1 - affinity)))
        for a in alphas:
            logits = zero_shot + a * (cache - shift)
            score = float((logits.argmax(1) == labels).float().mean() * 100)
            if score > best[2]:
                best = (a, b, score)
    assert (got["alpha"], got["beta"], acc) == pytest.approx(best)


def test_search_refuses_evaluation_data():
    text, train = _three_class_problem()
    evaluation = EvaluationSet(train.features, train.labels)
    with pytest.raises(TypeError, match="evaluation"):
        create_method("tip_adapter").fit(train, text, evaluation)
    with pytest.raises(TypeError, match="ValidationSet"):
        search_blend(torch.zeros(3, 3), torch.zeros_like, {"b": [1.0], "a": [1.0]}, evaluation)


def test_search_uses_validation_and_records_choice():
    text, train = _three_class_problem()
    val = ValidationSet(_unit([1, 1, 0.1], [0.1, 1, 1], [1, 0.1, 1]), torch.tensor([0, 1, 2]))
    method = create_method("tip_adapter", search_steps_alpha=5, search_steps_beta=5).fit(
        train, text, val
    )
    params = method.best_params_
    assert params["alpha"] in tip_grid(10.0, 5) and params["beta"] in tip_grid(12.0, 5)
    assert "validation" in params["source"]


def test_presets_apply_published_settings_and_params_override_them():
    from clipadapt.exceptions import ConfigError
    from clipadapt.methods.base import method_presets, parse_method_spec

    presets = method_presets("tip_adapter")
    assert presets["oxford_flowers"]["search_scale_alpha"] == 50.0
    name, params = parse_method_spec("tip_adapter:preset=oxford_flowers,alpha=1.5")
    method = create_method(name, **params)
    assert method.search_scale_alpha == 50.0 and method.alpha == 1.5
    with pytest.raises(ConfigError, match="no preset 'mars'"):
        create_method("tip_adapter", preset="mars")
