"""GraphAdapter: the batched "query + class group" aggregation against a graph-by-graph loop
reference of the official construction, reductions, training, determinism and persistence."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from clipadapt import create_method, load
from clipadapt.data.sets import TextFeatures, TrainSet, ValidationSet, normalize_rows
from clipadapt.methods._graph import class_means, group_query_aggregation
from clipadapt.methods.graph_adapter import GraphAdapter


def _reference_group_graphs(queries: torch.Tensor, nodes: torch.Tensor, groups: int):
    """One explicit graph per (query, group), built as the official code does."""
    out = torch.zeros(groups, *queries.shape)
    for g in range(groups):
        members = nodes[g::groups]
        for i in range(queries.shape[0]):
            stacked = torch.cat([queries[i : i + 1], members])
            unit = normalize_rows(stacked)
            edges = (unit @ unit.T).clamp_min(0) + torch.eye(len(stacked))
            d = edges.sum(dim=1).pow(-0.5)
            laplacian = d[:, None] * edges * d[None, :]
            out[g, i] = (laplacian @ stacked)[0]
    return out


@pytest.mark.parametrize("classes,groups", [(8, 4), (5, 4), (6, 2), (3, 1)])
def test_group_aggregation_matches_explicit_graphs(classes: int, groups: int) -> None:
    g = torch.Generator().manual_seed(classes)
    queries = normalize_rows(torch.randn(classes, 6, generator=g))
    nodes = normalize_rows(torch.randn(classes, 6, generator=g))
    torch.testing.assert_close(
        group_query_aggregation(queries, nodes, groups),
        _reference_group_graphs(queries, nodes, groups),
    )


def test_class_means_average_views_and_rows() -> None:
    views = torch.randn(3, 4, 5)
    labels = torch.tensor([0, 1, 0, 2])
    expected = normalize_rows(
        torch.stack([views[:, [0, 2]].mean(dim=(0, 1)), views[:, 1].mean(0), views[:, 3].mean(0)])
    )
    torch.testing.assert_close(class_means(views, labels, 3), expected)


def _toy_problem(seed: int = 0, classes: int = 6, dim: int = 16):
    g = torch.Generator().manual_seed(seed)
    text = normalize_rows(torch.randn(classes, dim, generator=g))
    centres = normalize_rows(text + 1.2 * normalize_rows(torch.randn(classes, dim, generator=g)))

    def rows(k: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.arange(classes).repeat_interleave(k)
        return normalize_rows(centres[y] + 0.15 * torch.randn(len(y), dim, generator=g)), y

    return TextFeatures(text), TrainSet(*rows(5)), ValidationSet(*rows(4)), rows(30)


def test_residual_one_is_zero_shot() -> None:
    text, train, _, (x, _) = _toy_problem()
    method = GraphAdapter(beta=1.0, epochs=2).fit(train, text)
    zero_shot = create_method("zeroshot").fit(train, text)
    torch.testing.assert_close(method.logits(x), zero_shot.logits(x))


def test_graph_built_once_per_step(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    original = GraphAdapter._refine

    def counted(self, *args):
        calls.append(1)
        return original(self, *args)

    monkeypatch.setattr(GraphAdapter, "_refine", counted)
    text, train, _, _ = _toy_problem()  # 30 rows, batch 8 -> 4 steps per epoch
    GraphAdapter(epochs=3, batch_size=8).fit(train, text)
    assert len(calls) == 12 + 1  # 12 optimisation steps, then the final classifier


def test_training_improves_on_toy_problem() -> None:
    text, train, val, (x, y) = _toy_problem()
    untrained = GraphAdapter(epochs=0).fit(train, text)
    trained = GraphAdapter(epochs=30, lr=1e-2).fit(train, text, val)
    assert trained.train_loss_[-1] < 0.5 * trained.train_loss_[0]
    assert trained.score(x, y) >= untrained.score(x, y) + 5


def test_seeded_determinism_and_save_load(tmp_path: Path) -> None:
    text, train, _, (x, _) = _toy_problem(seed=1)
    a = GraphAdapter(epochs=3, seed=2).fit(train, text)
    b = GraphAdapter(epochs=3, seed=2).fit(train, text)
    c = GraphAdapter(epochs=3, seed=3).fit(train, text)
    assert torch.equal(a.logits(x), b.logits(x))
    assert not torch.equal(a.graph_.tt.weight, c.graph_.tt.weight)
    restored = load(a.save(tmp_path / "graph_adapter"))
    assert torch.equal(restored.logits(x), a.logits(x))
    assert restored.num_trainable_params() == a.num_trainable_params()


def test_parameter_counts() -> None:
    # RN50 on ImageNet: 2 (D^2 + C D) = 4,145,152, the paper's 4.145 M
    assert GraphAdapter.param_count(1024, 1000) == 4_145_152
    assert GraphAdapter.card.trainable_params(1000, 1024, 16) == 4_145_152
    text, train, _, _ = _toy_problem()
    method = GraphAdapter(epochs=1).fit(train, text)
    assert method.num_trainable_params() == GraphAdapter.param_count(16, 6)
