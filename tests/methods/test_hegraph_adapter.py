"""HeGraphAdapter: relations against a hand-computed 3-class example, aggregation order and
weights against a loop reference, reductions, training, determinism, persistence, ablations,
the validation search of the meta-path weights, both negative-node builders, the paper's
variants and presets, and the real ImageNet bundle (skipped when ../shared/data is absent)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from clipadapt import create_method, load
from clipadapt.data.sets import TextFeatures, TrainSet, ValidationSet, normalize_rows
from clipadapt.exceptions import ConfigError, MissingTensorError
from clipadapt.methods._graph import TrainedGraph, normalize_relation
from clipadapt.methods.base import parse_method_spec
from clipadapt.methods.hegraph_adapter import (
    ALL_EDGES,
    HeGraphAdapter,
    HeteroGraph,
    relation_matrices,
)

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"

# Three classes in 3-d with cosines that are easy to compute by hand.
P = torch.tensor([[1.0, 0.0, 0.0], [0.6, 0.8, 0.0], [0.0, 0.0, 1.0]])
N = torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.6, 0.0, 0.8]])
V = torch.tensor([[0.8, 0.6, 0.0], [0.0, 1.0, 0.0], [0.0, 0.6, 0.8]])

# R[i, j]: edge from source node j into target node i (spec §2.2), worked out by hand.
EXPECTED = {
    "pp": [[0, 0.6, 0], [0.6, 0, 0], [0, 0, 0]],
    "vv": [[0, 0.6, 0.36], [0.6, 0, 0.6], [0.36, 0.6, 0]],
    "vp": [[0.8, 0, 0], [0.96, 0.8, 0.48], [0, 0, 0.8]],
    # own class: 1 - cos(n_i, p_i) = 1 - 0, 1 - 0.6, 1 - 0.8
    "pn": [[1.0, 0.8, 0], [1.0, 0.4, 0], [0.6, 0.36, 0.2]],
    "vn": [[0.4, 1.0, 0.6], [0.8, 1.0, 0], [0.48, 0, 0.36]],
    "np": [[1.0, 1.0, 0.6], [0.8, 0.4, 0.36], [0, 0, 0.2]],
}


def test_relations_match_hand_computed_example() -> None:
    relations = relation_matrices(P, N, V)
    assert set(relations) == set(ALL_EDGES)
    for name, expected in EXPECTED.items():
        torch.testing.assert_close(relations[name], torch.tensor(expected), msg=name)


def test_negative_self_edge_switch() -> None:
    relations = relation_matrices(P, N, V, edges=("pn", "np"), neg_self_edge="neg_cos")
    torch.testing.assert_close(relations["pn"].diagonal(), torch.tensor([0.0, -0.6, -0.8]))
    torch.testing.assert_close(relations["np"].diagonal(), torch.tensor([0.0, -0.6, -0.8]))
    off = ~torch.eye(3, dtype=torch.bool)
    torch.testing.assert_close(relations["pn"][off], torch.tensor(EXPECTED["pn"])[off])
    with pytest.raises(ConfigError, match="neg_self_edge"):
        relation_matrices(P, N, V, neg_self_edge="bogus")


def test_normalisation_by_hand() -> None:
    adjacency, self_coef = normalize_relation(torch.tensor(EXPECTED["pp"]))
    # degrees (0.6, 0.6, 0): 0.6 / sqrt(1.6 * 1.6) = 0.375; self terms 1/(deg+1)
    torch.testing.assert_close(adjacency[0, 1], torch.tensor(0.375))
    torch.testing.assert_close(self_coef, torch.tensor([1 / 1.6, 1 / 1.6, 1.0]))
    # v->p is not symmetric: row 2 sums to 2.24, column 1 to 1.76
    adjacency, _ = normalize_relation(torch.tensor(EXPECTED["vp"]), "column")
    torch.testing.assert_close(adjacency[1, 0], torch.tensor(0.96 / math.sqrt(3.24 * 2.76)))
    adjacency, _ = normalize_relation(torch.tensor(EXPECTED["vp"]), "row")
    torch.testing.assert_close(adjacency[1, 0], torch.tensor(0.96 / math.sqrt(3.24 * 1.8)))


def _toy_text(p: torch.Tensor = P, n: torch.Tensor = N) -> TextFeatures:
    # one description per class equal to the positive node, so X^p = P exactly
    return TextFeatures(p, negative_features=n, description_features=p[:, None].clone())


def _toy_train(v: torch.Tensor = V, shots: int = 2) -> TrainSet:
    labels = torch.arange(v.shape[0]).repeat_interleave(shots)
    return TrainSet(v[labels], labels)


def _reference_gcn(rel, target, source, weight, bias, self_loop):
    """Spec §2.3 written with explicit loops: an independent reference for the dense code."""
    rel = rel.tolist()
    t, s = len(rel), len(rel[0])
    deg = [sum(abs(rel[i][j]) for j in range(s)) for i in range(t)]
    deg_src = [sum(abs(rel[k][j]) for k in range(t)) for j in range(s)]
    rows = []
    for i in range(t):
        h = target[i] / (deg[i] + 1) if self_loop else torch.zeros_like(target[i])
        for j in range(s):
            h = h + rel[i][j] / math.sqrt((deg[i] + 1) * (deg_src[j] + 1)) * source[j]
        rows.append(torch.tanh(h @ weight + bias[i]))
    return torch.stack(rows)


def _fitted_with_random_blocks(**params) -> HeGraphAdapter:
    method = HeGraphAdapter(epochs=0, search_fusion=False, **params)
    method.fit(_toy_train(), _toy_text())
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for block in method.graph_.blocks.values():
            block.weight.copy_(torch.randn(3, 3, generator=g))
            block.bias.copy_(0.3 * torch.randn(3, 3, generator=g))
    return method


def test_aggregation_order_and_weights_match_loop_reference() -> None:
    method = _fitted_with_random_blocks()
    blocks = {k: (b.weight.detach(), b.bias.detach()) for k, b in method.graph_.blocks.items()}
    rel = relation_matrices(P, N, V)
    # step 1: negatives from positives and visual nodes (shared block "n")
    m_pn = _reference_gcn(rel["pn"], N, P, *blocks["n"], True)
    m_vn = _reference_gcn(rel["vn"], N, V, *blocks["n"], True)
    n_new = N + 0.5 * m_pn + 0.5 * m_vn
    # step 2: positives, n->p messages from the UPDATED negatives
    m_pp = _reference_gcn(rel["pp"], P, P, *blocks["pp"], True)
    m_vp = _reference_gcn(rel["vp"], P, V, *blocks["vp"], True)
    m_np = _reference_gcn(rel["np"], P, n_new, *blocks["np"], True)
    for alpha_np in (0.2, 0.1):  # training and test weights of n->p
        expected_p = P + 0.06 * m_pp + 0.24 * m_vp + alpha_np * m_np
        positive, bias = method._propagate(method._inputs, method._default_weights(), alpha_np)
        torch.testing.assert_close(positive, expected_p)
    # step 3: visual bias, no self term
    torch.testing.assert_close(bias, _reference_gcn(rel["vv"], V, V, *blocks["v"], False))
    # the stored test-time classifier is the normalised positive nodes with alpha_np = 0.1
    with torch.no_grad():
        method_test, _ = method._propagate(method._inputs, method._default_weights(), 0.1)
    keys = normalize_rows(V.repeat_interleave(2, 0) + 0.5 * bias.repeat_interleave(2, 0))
    torch.testing.assert_close(method._biased_keys(method._inputs, bias, 0.5), keys)
    assert method_test.shape == (3, 3)


def test_negatives_reach_positives_only_through_the_update() -> None:
    # changing beta_pn changes X^p' only because n->p reads the updated negatives
    base = _fitted_with_random_blocks()
    changed = _fitted_with_random_blocks(beta_pn=0.0)
    p_base, _ = base._propagate(base._inputs, base._default_weights(), 0.2)
    p_changed, _ = changed._propagate(changed._inputs, changed._default_weights(), 0.2)
    assert not torch.allclose(p_base, p_changed)
    p_base, _ = base._propagate(base._inputs, base._default_weights(), 0.0)
    p_changed, _ = changed._propagate(changed._inputs, changed._default_weights(), 0.0)
    torch.testing.assert_close(p_base, p_changed)


def test_graph_built_once_per_step(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    original = HeGraphAdapter._propagate

    def counted(self, inputs, weights, alpha_np):
        calls.append(alpha_np)
        return original(self, inputs, weights, alpha_np)

    monkeypatch.setattr(HeGraphAdapter, "_propagate", counted)
    train = _toy_train(shots=5)  # 15 rows, batch 4 -> 4 steps per epoch
    HeGraphAdapter(epochs=3, batch_size=4, search_fusion=False).fit(train, _toy_text())
    assert calls == [0.2] * 12  # 12 optimisation steps; prediction reuses the trained messages


def test_zero_weights_reduce_to_text_plus_cache() -> None:
    zero = dict(
        beta_pn=0.0,
        beta_vn=0.0,
        alpha_pp=0.0,
        alpha_vp=0.0,
        alpha_np_train=0.0,
        alpha_np_test=0.0,
        gamma=0.0,
        fusion="logit",
        fusion_weight=1.0,
        search_fusion=False,
    )
    g = torch.Generator().manual_seed(0)
    p = normalize_rows(torch.randn(4, 8, generator=g))
    n = normalize_rows(torch.randn(4, 8, generator=g))
    v = normalize_rows(p + 0.5 * torch.randn(4, 8, generator=g))
    train = _toy_train(v, shots=3)
    method = HeGraphAdapter(epochs=2, **zero).fit(train, _toy_text(p, n))
    torch.testing.assert_close(method.text_weights_, normalize_rows(p), rtol=0, atol=1e-6)
    torch.testing.assert_close(method.cache_keys_, train.features, rtol=0, atol=1e-6)
    x = normalize_rows(torch.randn(10, 8, generator=g))
    one_hot = torch.nn.functional.one_hot(train.labels, 4).float()
    expected = (
        100 * x @ normalize_rows(p).T + 100 * torch.exp(-(1 - x @ train.features.T)) @ one_hot
    )
    torch.testing.assert_close(method.logits(x), expected, rtol=1e-6, atol=1e-4)


def _toy_problem(seed: int = 0, classes: int = 6, dim: int = 16):
    """Image clusters that the text vectors point at only roughly (zero-shot is mediocre)."""
    g = torch.Generator().manual_seed(seed)
    text = normalize_rows(torch.randn(classes, dim, generator=g))
    centres = normalize_rows(text + 1.2 * normalize_rows(torch.randn(classes, dim, generator=g)))

    def rows(k: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.arange(classes).repeat_interleave(k)
        return normalize_rows(centres[y] + 0.15 * torch.randn(len(y), dim, generator=g)), y

    neg = normalize_rows(0.5 * text + torch.randn(classes, dim, generator=g))
    desc = normalize_rows(text[:, None] + 0.2 * torch.randn(classes, 3, dim, generator=g))
    texts = TextFeatures(text, negative_features=neg, description_features=desc)
    return texts, TrainSet(*rows(5)), ValidationSet(*rows(4)), rows(30)


def test_training_improves_on_toy_problem() -> None:
    text, train, val, (x, y) = _toy_problem()
    untrained = HeGraphAdapter(epochs=0, classifier="text").fit(train, text, val)
    trained = HeGraphAdapter(classifier="text", lr=1e-2).fit(train, text, val)
    assert trained.train_loss_[-1] < 0.5 * trained.train_loss_[0]
    assert trained.score(x, y) >= untrained.score(x, y) + 5
    full = HeGraphAdapter().fit(train, text, val)
    assert full.score(x, y) >= 90


def test_seeded_determinism_and_save_load(tmp_path: Path) -> None:
    text, train, val, (x, _) = _toy_problem(seed=1)
    a = HeGraphAdapter(epochs=3, seed=5).fit(train, text, val)
    b = HeGraphAdapter(epochs=3, seed=5).fit(train, text, val)
    c = HeGraphAdapter(epochs=3, seed=6).fit(train, text, val)
    assert torch.equal(a.logits(x), b.logits(x))
    assert not torch.equal(a.graph_.blocks["pp"].weight, c.graph_.blocks["pp"].weight)
    restored = load(a.save(tmp_path / "hegraph"))
    assert torch.equal(restored.logits(x), a.logits(x))
    assert restored.best_params_ == a.best_params_
    assert restored.num_trainable_params() == a.num_trainable_params()


def test_missing_tensors_name_the_tensor_and_the_ablation() -> None:
    text, train, _, _ = _toy_problem()
    no_neg = TextFeatures(text.class_features, description_features=text.description_features)
    with pytest.raises(MissingTensorError, match="negative_text_features.*negative_nodes=false"):
        HeGraphAdapter(epochs=1).fit(train, no_neg)
    no_desc = TextFeatures(text.class_features, negative_features=text.negative_features)
    with pytest.raises(MissingTensorError, match="description_features.*positive_nodes=templates"):
        HeGraphAdapter(epochs=1).fit(train, no_desc)
    # the documented ablation runs on class text features alone when asked for explicitly
    bare = TextFeatures(text.class_features)
    method = HeGraphAdapter(epochs=1, positive_nodes="templates", negative_nodes=False)
    assert method.fit(train, bare).active_edges() == ("pp", "vp", "vv")
    # an edge subset without negative relations needs no negative features either
    HeGraphAdapter(epochs=1, edges=("pp", "vp")).fit(train, no_neg)


def test_ablation_switches_from_method_spec() -> None:
    name, params = parse_method_spec(
        "hegraph_adapter:negative_nodes=false,visual_nodes=true,edges=[pp,vp,vv],alpha_vp=0.3"
    )
    method = create_method(name, **params)
    assert method.active_edges() == ("pp", "vp", "vv")
    assert method.alpha_vp == 0.3
    assert create_method("hegraph_adapter", visual_nodes=False).active_edges() == ("pn", "pp", "np")
    assert create_method("hegraph_adapter", classifier="text").active_edges() == ALL_EDGES[:5]
    with pytest.raises(ConfigError, match=r"edges=\('pp', 'xx'\).*choice of \{pn, vn"):
        create_method("hegraph_adapter", edges=("pp", "xx"))


def test_parameter_counts() -> None:
    # RN50 on ImageNet: 5 (D^2 + C D) = 10,362,880; the paper's 10,366,976 has 4 D = 4,096 more
    assert HeGraphAdapter.param_count(1024, 1000) == 10_362_880
    assert HeGraphAdapter.param_count(1024, 1000, "three_W") == 3 * 1024**2
    graph = HeteroGraph(HeGraphAdapter()._block_names(), 1024, 1000, bias=True)
    assert sum(p.numel() for p in graph.parameters()) == 10_362_880
    assert HeGraphAdapter.card.trainable_params(1000, 1024, 16) == 10_362_880
    text, train, _, _ = _toy_problem()
    method = HeGraphAdapter(epochs=1).fit(train, text)
    assert method.num_trainable_params() == HeGraphAdapter.param_count(16, 6)
    slim = HeGraphAdapter(epochs=1, block_layout="three_W").fit(train, text)
    assert slim.num_trainable_params() == 3 * 16 * 16


@pytest.mark.realdata
@pytest.mark.slow
def test_imagenet_ablation_not_below_tip_adapter() -> None:
    """Real ViT-B/32 ImageNet features: fit on 1-shot, validate on 2-shot, score on 4-shot.

    The bundle has one prompt per class and no negatives or descriptions, so the documented
    ablation (templates as positive nodes, no negative nodes) runs; a shortened schedule keeps
    the test quick (the full-schedule numbers are in docs/methods/hegraph_adapter.md).
    """
    path = DATA / "clip_vitb32" / "imagenet.safetensors"
    if not path.is_file():
        pytest.skip("../shared/data is not available")
    from clipadapt import load_bundle
    from clipadapt.tasks.classification import SplitChoice, evaluate

    bundle = load_bundle(path)
    choice = SplitChoice(train_set="train_1shot", val_set="train_2shot", eval_set="train_4shot")
    with pytest.raises(MissingTensorError, match="description_features"):
        evaluate(create_method("hegraph_adapter", epochs=1), bundle, seed=1, choice=choice)
    templates_only = create_method("hegraph_adapter", epochs=1, positive_nodes="templates")
    with pytest.raises(MissingTensorError, match="negative_text_features"):
        evaluate(templates_only, bundle, seed=1, choice=choice)
    tip = evaluate(
        create_method("tip_adapter", search_steps_beta=20), bundle, seed=1, choice=choice
    )
    ablation = create_method(
        "hegraph_adapter",
        positive_nodes="templates",
        negative_nodes=False,
        epochs=5,
        batch_size=256,
    )
    result = evaluate(ablation, bundle, seed=1, choice=choice)
    assert result.accuracy >= tip.accuracy, (result.accuracy, tip.accuracy)


@pytest.mark.parametrize("equal_counts", [True, False])
def test_biased_cache_matches_materialised_keys(equal_counts: bool) -> None:
    """The factored affinity equals f · norm(k + γ b[y]) in value and in its gradient."""
    from clipadapt.data.sets import normalize_rows
    from clipadapt.methods._graph import BiasedCache

    g = torch.Generator().manual_seed(0)
    keys = normalize_rows(torch.randn(60, 16, generator=g))
    labels = torch.arange(5).repeat(12)[torch.randperm(60, generator=g)]
    if not equal_counts:
        labels[0] = (labels[0] + 1) % 5
    bias = torch.randn(5, 16, generator=g, requires_grad=True)
    queries = normalize_rows(torch.randn(7, 16, generator=g))
    cache = BiasedCache(keys, labels, 5)
    assert (cache.grouped is not None) == equal_counts
    fast = cache.affinity(queries, bias, 0.5)
    slow = queries @ normalize_rows(keys + 0.5 * bias[labels]).T
    torch.testing.assert_close(fast, slow, rtol=0, atol=1e-6)
    (grad_fast,) = torch.autograd.grad(fast.square().sum(), bias)
    (grad_slow,) = torch.autograd.grad(slow.square().sum(), bias)
    torch.testing.assert_close(grad_fast, grad_slow, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cache.affinity(queries, None, 0.5), queries @ keys.T)


# ------------------------------------------------------------------ as the paper runs it
def test_metapath_search_scores_validation_rows_only(monkeypatch: pytest.MonkeyPatch) -> None:
    text, train, val, (x, y) = _toy_problem(seed=2)
    scored = []
    scorer = TrainedGraph.scorer

    def spy(self, *args, **kwargs):
        score = scorer(self, *args, **kwargs)

        def recorded(weights, rows):
            scored.append((dict(weights), rows))
            return score(weights, rows)

        return recorded

    monkeypatch.setattr(TrainedGraph, "scorer", spy)
    method = HeGraphAdapter(epochs=5, lr=1e-2).fit(train, text, val)
    assert len(scored) > 6  # the defaults, then coarse and fine steps of every weight
    for _, rows in scored:
        assert isinstance(rows, ValidationSet) and rows.features.shape == val.features.shape
        torch.testing.assert_close(rows.features, val.features)
        torch.testing.assert_close(rows.labels, val.labels)
    best = method.best_params_
    assert best["source"] == f"validation search on {val.name} ({len(val)} rows)"
    space = method.search_space()
    for name in ("beta_pn", "beta_vn", "alpha_pp", "alpha_vp", "alpha_np_test", "gamma"):
        assert any(math.isclose(best[name], v) for v in space[name]), name
        assert method.metapath_weights_[name] == best[name]
    assert any(math.isclose(best["fusion_weight"], v) for v in space["fusion_weight"])
    # the search starts at the defaults and only moves to better validation accuracy, and the
    # stored classifier is the chosen point's
    assert scored[0][0] == method._default_weights()
    assert method.score(val.features, val.labels) == pytest.approx(best["val_accuracy"])
    default = HeGraphAdapter(epochs=5, lr=1e-2, search_metapaths=False).fit(train, text, val)
    assert best["val_accuracy"] >= default.best_params_["val_accuracy"]
    # evaluation rows are refused as validation data
    from clipadapt.data.sets import EvaluationSet

    with pytest.raises(TypeError, match="evaluation data"):
        HeGraphAdapter(epochs=1).fit(train, text, EvaluationSet(x, y))


def test_trained_graph_equals_the_propagation_for_any_weights() -> None:
    method = _fitted_with_random_blocks()
    graph = TrainedGraph(method._inputs, method._message)
    point = dict(beta_pn=0.2, beta_vn=0.9, alpha_pp=0.3, alpha_vp=0.05, alpha_np_test=0.4)
    point["gamma"] = 0.7
    expected, bias = method._propagate(method._inputs, point, point["alpha_np_test"])
    torch.testing.assert_close(graph.positive(point), expected)
    torch.testing.assert_close(graph.bias, bias)


def test_negative_nodes_template_or_negated_descriptions(tmp_path: Path, tiny_encoder) -> None:
    """Both builders on a small extracted bundle: the negative prompt, or the mean of the
    encoded negated descriptions (spec §2.1), which the extractor writes beside them."""
    from clipadapt.data.datasets import load_dataset
    from clipadapt.data.prompts import negative_descriptions
    from clipadapt.features.extract import extract_dataset
    from clipadapt.tasks.classification import prepare_sets
    from conftest import make_image_folder

    dataset = load_dataset(make_image_folder(tmp_path / "imgs", classes=3, per_class=6, size=24))
    names = [c.replace("_", " ") for c in dataset.classnames]
    descriptions = [[f"a photo of a {c}.", f"{c} in the wild."] for c in names]
    descriptions[2] = descriptions[2][:1]  # padded: one class has a single description
    bundle, _ = extract_dataset(
        dataset,
        tiny_encoder,
        tmp_path / "toy.safetensors",
        cache_dir=tmp_path / "cache",
        views=2,
        descriptions=descriptions,
        num_workers=0,
        progress=False,
    )
    negated = negative_descriptions(descriptions, dataset.classnames)
    assert negated[0] == [
        f"a photo of no {names[0]}.",
        f"a photo of no {names[0]}, {names[0]} in the wild.",
    ]
    text = bundle.text()
    expected = []
    for sentences in negated:
        encoded = normalize_rows(tiny_encoder.encode_text(sentences).half().float())
        expected.append(encoded.mean(dim=0))
    expected = normalize_rows(torch.stack(expected))
    train, val, _ = prepare_sets(bundle, shots=2, seed=1)
    nodes = {}
    for negatives in ("template", "descriptions"):
        method = HeGraphAdapter(epochs=1, negatives=negatives).fit(train, text, val)
        nodes[negatives] = method._inputs.negative
    torch.testing.assert_close(nodes["template"], text.negative_features)
    torch.testing.assert_close(nodes["descriptions"], expected, rtol=0, atol=2e-3)
    assert not torch.allclose(nodes["template"], nodes["descriptions"], atol=1e-2)
    bare = TextFeatures(
        text.class_features,
        negative_features=text.negative_features,
        description_features=text.description_features,
        description_mask=text.description_mask,
    )
    with pytest.raises(MissingTensorError, match="negative_description_features.*negatives="):
        HeGraphAdapter(epochs=1, negatives="descriptions").fit(train, bare)


def test_text_preset_logits_are_the_text_classifier() -> None:
    text, train, val, (x, _) = _toy_problem(seed=3)
    method = create_method("hegraph_adapter", preset="T", epochs=5, lr=1e-2).fit(train, text, val)
    assert method.classifier == "text" and "vv" not in method.active_edges()
    expected = method.logit_scale * normalize_rows(x) @ method.text_weights_.T
    torch.testing.assert_close(method.logits(x), expected)
    assert "fusion_weight" not in method.best_params_
    for preset, edges in (("T-P", ("pp", "vp")), ("T-N", ("pn", "vn", "np"))):
        variant = create_method("hegraph_adapter", preset=preset)
        assert (variant.classifier, variant.active_edges()) == ("text", edges)


def test_domain_generalisation_runs_the_text_variant() -> None:
    from clipadapt.data.bundle import FeatureBundle
    from clipadapt.tasks.domain_generalization import evaluate_dg
    from clipadapt.testing.checks import make_fixture

    fx = make_fixture(num_classes=6, dim=16, shots=2)
    target = FeatureBundle(dict(fx.bundle.tensors), {**fx.bundle.metadata, "dataset": "target"})
    method = create_method("hegraph_adapter", epochs=1)
    records = evaluate_dg(method, fx.bundle, [target], shots=2)
    assert {r["params"]["classifier"] for r in records} == {"text"}
    assert all("classifier" in r["variant"] for r in records)
    assert method.classifier == "both"  # the caller's method is left as it was
    as_given = evaluate_dg(method, fx.bundle, [target], shots=2, paper_variant=False)
    assert {r["params"]["classifier"] for r in as_given} == {"both"}
    assert {r["variant"] for r in as_given} == {None}


def test_one_view_per_row_and_epoch(monkeypatch: pytest.MonkeyPatch) -> None:
    """Training queries come from the shared sampler: a view drawn per row and epoch."""
    import clipadapt.methods.hegraph_adapter as module

    modes = []
    sampler = module.ViewSampler

    def spy(*args, **kwargs):
        modes.append(kwargs.get("mode", "random"))
        return sampler(*args, **kwargs)

    monkeypatch.setattr(module, "ViewSampler", spy)
    text, train, val, _ = _toy_problem()
    views = torch.stack([train.features, normalize_rows(train.features + 0.1)])
    train = TrainSet(train.features, train.labels, views)
    random_views = HeGraphAdapter(epochs=2, search_metapaths=False).fit(train, text, val)
    cycled = HeGraphAdapter(epochs=2, search_metapaths=False, view_sampling="cycle")
    cycled.fit(train, text, val)
    assert modes == ["random", "cycle"]
    assert not torch.equal(random_views.text_weights_, cycled.text_weights_)


def test_fast_preset_agrees_with_the_paper_schedule() -> None:
    """On a small, far-from-saturated problem the ``fast`` preset (10 epochs at batch 256, 1/18.6
    of the paper schedule's FLOPs on ImageNet) scores within 2 points of the paper schedule,
    mean of seeds 1-3. 2 points is about the paper schedule's own seed-to-seed standard
    deviation on this problem (1.8 over seeds 1-5: 43.0, 44.5, 39.0, 42.0, 42.0 %)."""
    from clipadapt.testing.checks import make_fixture

    fx = make_fixture(num_classes=10, dim=32, shots=8, views=3, noise_scale=0.5, seed=0)
    means = {}
    for preset in (None, "fast"):
        accuracies = [
            create_method("hegraph_adapter", preset=preset, seed=seed)
            .fit(fx.train, fx.text, fx.val)
            .score(fx.test.features, fx.test.labels)
            for seed in (1, 2, 3)
        ]
        means[preset] = sum(accuracies) / len(accuracies)
    assert 30 < means[None] < 60  # neither chance (10 %) nor saturated
    assert abs(means["fast"] - means[None]) <= 2.0, means
