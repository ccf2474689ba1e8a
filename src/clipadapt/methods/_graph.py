"""The graph maths of GraphAdapter and HeGraphAdapter (specs/hegraph_adapter.md §2, §6).

Both methods refine class-level nodes (one node per class and type) with one-layer GCNs whose
adjacencies come from the frozen base features. Everything here is dense and batched: the graphs
have at most 3·C nodes (3,000 for ImageNet), every relation is a dense C x C cosine matrix, so
message passing is a handful of matrix products and never a loop over classes or samples.

Because a GCN layer is linear before its activation, ``tanh((c·X_t + Â X_s) W + b)`` lets the
aggregation ``c·X_t + Â X_s`` be computed once whenever both node sets are frozen; only the
projection ``· W + b`` runs per optimisation step (:class:`GCNBlock`).

:class:`HeGraphOptions` holds HeGraphAdapter's option plumbing (saved-option upgrades, the
relations in use, the search space), so the method file keeps the method's maths.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from clipadapt.data.sets import TextFeatures, TrainSet, ValidationSet, normalize_rows
from clipadapt.engine.search import coordinate_values, search_logit_blend
from clipadapt.exceptions import ConfigError, MissingTensorError
from clipadapt.methods.base import method_presets

ALL_EDGES = ("pn", "vn", "pp", "vp", "np", "vv")
"""The six relation types, named source→target: p→n, v→n, p→p, v→p, n→p, v→v."""

NEGATIVE_EDGES = frozenset({"pn", "vn", "np"})
VISUAL_EDGES = frozenset({"vn", "vp", "vv"})
# Which block projects each relation's messages, per layout (spec §2.9).
BLOCK_LAYOUTS = {
    "five_blocks_bias": {"pn": "n", "vn": "n", "pp": "pp", "vp": "vp", "np": "np", "vv": "v"},
    "three_W": {"pn": "n", "vn": "n", "pp": "p", "vp": "p", "np": "p", "vv": "v"},
}


def cosine(a: Tensor, b: Tensor) -> Tensor:
    """(A, D) x (B, D) -> (A, B) cosine similarities (rows are normalised here)."""
    return normalize_rows(a) @ normalize_rows(b).T


def class_means(features: Tensor, labels: Tensor, num_classes: int) -> Tensor:
    """(C, D) L2-normalised mean feature of each class (a zero row for a class without rows).

    Args:
        features: (..., N, D); leading dimensions (augmented views) are averaged too.
        labels: (N,) class indices.
    """
    flat = features.reshape(-1, features.shape[-2], features.shape[-1]).mean(dim=0)
    sums = torch.zeros(num_classes, flat.shape[1], dtype=flat.dtype, device=flat.device)
    sums.index_add_(0, labels, flat)
    return normalize_rows(sums)


def train_view_features(train: TrainSet, use_views: bool) -> Tensor:
    """(V, N, D) the views a training step may draw its queries from (V = 1 without views)."""
    if use_views and train.views is not None:
        return train.views
    return train.features[None]


class BiasedCache:
    """Affinities to cache keys shifted by a per-class bias, without materialising the keys.

    HeGraphAdapter's cache keys are ``k'_i = norm(k_i + γ b_{y_i})`` with a bias ``b`` (C, D)
    that changes every step. Materialising ``k'`` moves the whole (N, D) cache through several
    elementwise passes forward and backward per step; expanding the normalisation instead gives

        f · k'_i = (f · k_i + γ f · b_{y_i}) / sqrt(|k_i|² + 2γ k_i · b_{y_i} + γ² |b_{y_i}|²),

    where ``f · k_i`` uses the frozen keys (no gradient), ``f · b`` is a (B, C) product and the
    only pass over the cache is the per-key ``k_i · b_{y_i}``. When every class has the same
    number of keys that pass is a batched (C, K, D) x (C, D) product with no gather.

    Args:
        keys: (N, D) frozen cache keys.
        key_labels: (N,) class of each key.
        num_classes: C.
    """

    def __init__(self, keys: Tensor, key_labels: Tensor, num_classes: int) -> None:
        self.keys = keys
        self.key_labels = key_labels
        self.key_sq_norms = (keys * keys).sum(dim=1)
        counts = torch.bincount(key_labels, minlength=num_classes)
        self.grouped: Tensor | None = None
        self.order: Tensor | None = None
        if len(key_labels) and bool((counts == counts[0]).all()) and int(counts[0]) > 0:
            order = torch.argsort(key_labels, stable=True)
            self.order = order
            self.grouped = keys.index_select(0, order).reshape(num_classes, int(counts[0]), -1)

    def key_bias_dots(self, bias: Tensor) -> Tensor:
        """(N,) ``k_i · b_{y_i}``."""
        if self.grouped is None or self.order is None:
            return (self.keys * bias.index_select(0, self.key_labels)).sum(dim=1)
        grouped = torch.bmm(self.grouped, bias[:, :, None]).reshape(-1)
        return torch.empty_like(grouped).index_copy(0, self.order, grouped)

    def affinity(self, features: Tensor, bias: Tensor | None, gamma: float) -> Tensor:
        """(B, N) cosine-style affinities ``f · k'_i`` (plain ``f · k_i`` when ``bias`` is None)."""
        base = features @ self.keys.T
        if bias is None:
            return base
        labels = self.key_labels
        shifted = base + gamma * (features @ bias.T).index_select(1, labels)
        sq_norms = (
            self.key_sq_norms
            + 2.0 * gamma * self.key_bias_dots(bias)
            + gamma * gamma * (bias * bias).sum(dim=1).index_select(0, labels)
        )
        return shifted / sq_norms.clamp_min(1e-24).sqrt()


def normalize_relation(relation: Tensor, source_degree: str = "column") -> tuple[Tensor, Tensor]:
    """Symmetric GCN normalisation of a (possibly signed) relation matrix (spec §2.3).

    ``deg_i = Σ_j |r_ij|`` (target side), ``deg'_j = Σ_k |r_kj|`` (source side; ``"row"`` reuses
    the row sums, the known re-implementation's reading), ``Â = R / sqrt((deg+1)(deg'+1))`` and
    the self-loop coefficient ``1 / (deg + 1)``.

    Args:
        relation: (T, S) weight of the edge from source node j into target node i.
        source_degree: "column" (default) or "row".

    Returns:
        (Â (T, S), self coefficient (T,)).
    """
    magnitude = relation.abs()
    deg_t = magnitude.sum(dim=1)
    if source_degree == "column":
        deg_s = magnitude.sum(dim=0)
    elif source_degree == "row":
        if relation.shape[0] != relation.shape[1]:
            raise ValueError("source_degree='row' needs a square relation matrix")
        deg_s = deg_t
    else:
        raise ValueError(f"source_degree must be 'column' or 'row', got {source_degree!r}")
    adjacency = relation / torch.sqrt((deg_t + 1.0)[:, None] * (deg_s + 1.0)[None, :])
    return adjacency, 1.0 / (deg_t + 1.0)


def aggregate(
    adjacency: Tensor, self_coef: Tensor | None, target: Tensor, source: Tensor
) -> Tensor:
    """The pre-projection GCN input ``c ⊙ X_t + Â X_s`` (``c`` omitted when ``self_coef`` is None).

    Shapes: adjacency (T, S), self_coef (T,), target (T, D), source (S, D) -> (T, D).
    """
    out = adjacency @ source
    if self_coef is not None:
        out = out + self_coef[:, None] * target
    return out


class GCNBlock(nn.Module):
    """One GraphAdapter-type projection: ``tanh(H W + b)`` with W (D, D) and a per-node bias b.

    ``H`` is the aggregated node input (..., C, D) from :func:`aggregate`. Initialisation follows
    GraphAdapter's code: ``W ~ U(±1/sqrt(D))`` drawn from the given generator, ``b = 0``.

    Args:
        dim: D. num_nodes: C (rows of the bias). bias: keep the per-node bias.
    """

    def __init__(self, dim: int, num_nodes: int, bias: bool = True) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(dim, dim))
        self.bias = nn.Parameter(torch.zeros(num_nodes, dim)) if bias else None

    def reset_parameters(self, generator: torch.Generator) -> None:
        bound = 1.0 / math.sqrt(self.weight.shape[0])
        values = (torch.rand(self.weight.shape, generator=generator) * 2.0 - 1.0) * bound
        with torch.no_grad():
            self.weight.copy_(values.to(self.weight.device))
            if self.bias is not None:
                self.bias.zero_()

    def forward(self, aggregated: Tensor) -> Tensor:
        if self.bias is not None and aggregated.ndim == 2:
            return torch.tanh(torch.addmm(self.bias, aggregated, self.weight))
        out = aggregated @ self.weight
        if self.bias is not None:
            out = out + self.bias
        return torch.tanh(out)


def block_param_count(dim: int, num_classes: int, bias: bool = True) -> int:
    """Scalars in one :class:`GCNBlock`: ``D² (+ C·D)``."""
    return dim * dim + (num_classes * dim if bias else 0)


def group_query_aggregation(queries: Tensor, nodes: Tensor, num_groups: int) -> Tensor:
    """GraphAdapter's "query + class group" graphs, aggregated for every class at once (spec §6).

    For query i (class text feature z_i) and group g (classes ``j ≡ g mod G``), the official code
    builds the graph ``[z_i; X_g]`` with ``E = max(cos, 0) + I`` over all its nodes, normalises
    ``L = D^{-1/2} E D^{-1/2}`` with row sums D, and keeps row 0 of ``L X``. Row 0 only needs

    - ``a_ij = max(cos(z_i, x_j), 0)`` for j in g,
    - the query degree ``D0_ig = 2 + Σ_{j∈g} a_ij`` (cos(z, z) = 1 plus the identity),
    - the node degrees ``D_j = a_ij + s_j``, ``s_j = Σ_{k∈g} max(cos(x_j, x_k), 0) + 1``,

    so ``h_ig = (2 / D0_ig) z_i + Σ_{j∈g} a_ij / sqrt(D0_ig D_j) x_j``, a (G, C, C) masked product.
    The result is constant (frozen features) and is computed once per fit.

    Args:
        queries: (C, D) query nodes z (class text features).
        nodes: (C, D) graph nodes (text or visual class nodes).
        num_groups: G, the number of interleaved class groups (4 in the official code).

    Returns:
        (G, C, D) aggregated inputs, one per group (apply a :class:`GCNBlock`, then average).
    """
    num_classes = nodes.shape[0]
    groups = max(1, min(int(num_groups), num_classes))
    group_of = torch.arange(num_classes, device=nodes.device) % groups
    member = group_of[None, :] == torch.arange(groups, device=nodes.device)[:, None]  # (G, C)
    a = cosine(queries, nodes).clamp_min(0.0)  # (C, C) query i -> node j
    node_sim = cosine(nodes, nodes).clamp_min(0.0)
    same_group = group_of[:, None] == group_of[None, :]
    s = (node_sim * same_group).sum(dim=1) + 1.0  # (C,) degree inside the node's own group
    d0 = 2.0 + a @ member.T.to(a.dtype)  # (C, G)
    # (G, C, C): query i, group g, node j (zero unless j is in g)
    weights = a[None] / torch.sqrt(d0.T[:, :, None] * (a + s[None, :])[None])
    weights = weights * member[:, None, :].to(a.dtype)
    return (2.0 / d0.T)[:, :, None] * queries[None] + weights @ nodes


def benchmark_aggregation(
    num_classes: int = 1000, dim: int = 1024, repeats: int = 5, device: str = "cpu"
) -> dict[str, float]:
    """Time one relation's message passing, dense vs edge-list scatter (the PyG formulation).

    Every relation in these graphs is a dense C x C cosine matrix, so an edge-list
    implementation (gather source rows per edge, scale, ``index_add`` into targets, which is
    what ``torch_geometric``'s ``MessagePassing.propagate`` does) moves C² rows of D floats
    where the dense product streams the matrix once. This benchmark keeps the decision honest.

    Returns:
        {"dense_ms": ..., "scatter_ms": ..., "max_abs_diff": ...}.
    """
    generator = torch.Generator().manual_seed(0)
    adjacency = torch.rand(num_classes, num_classes, generator=generator).to(device)
    source = torch.randn(num_classes, dim, generator=generator).to(device)
    target_idx, source_idx = torch.meshgrid(
        torch.arange(num_classes, device=device),
        torch.arange(num_classes, device=device),
        indexing="ij",
    )
    target_idx, source_idx = target_idx.reshape(-1), source_idx.reshape(-1)
    edge_weight = adjacency.reshape(-1)

    def dense() -> Tensor:
        return adjacency @ source

    def scatter() -> Tensor:
        messages = source.index_select(0, source_idx) * edge_weight[:, None]
        out = torch.zeros(num_classes, dim, device=device)
        return out.index_add_(0, target_idx, messages)

    def timed(fn: Callable[[], Tensor]) -> float:
        fn()
        if device != "cpu":
            torch.cuda.synchronize()
        started = time.perf_counter()
        for _ in range(repeats):
            fn()
        if device != "cpu":
            torch.cuda.synchronize()
        return (time.perf_counter() - started) / repeats * 1000

    return {
        "dense_ms": timed(dense),
        "scatter_ms": timed(scatter),
        "max_abs_diff": float((dense() - scatter()).abs().max()),
    }


def relation_matrices(
    positive: Tensor,
    negative: Tensor | None,
    visual: Tensor | None,
    edges: tuple[str, ...] = ALL_EDGES,
    neg_self_edge: str = "one_minus_cos",
) -> dict[str, Tensor]:
    """The six C x C relation matrices of spec §2.2, from frozen base node features.

    ``R[i, j]`` is the weight of the edge from source node j into target node i. Intra-type
    relations (p→p, v→v) have a zero diagonal (the self term is separate); v→p is the plain
    cosine; the contrastive relations (p→n, v→n, n→p) use the cosine between classes and an
    "opposite" weight on the own-class pair: ``1 - cos`` (default) or ``-cos``.

    Args:
        positive, negative, visual: (C, D) node features (negative/visual may be None when no
            requested edge uses them).
        edges: which relations to build (names in :data:`ALL_EDGES`).
        neg_self_edge: "one_minus_cos" or "neg_cos".

    Returns:
        {edge name: (C, C) float32}.
    """
    if neg_self_edge not in ("one_minus_cos", "neg_cos"):
        raise ConfigError(
            f"hegraph_adapter: neg_self_edge must be 'one_minus_cos' or 'neg_cos', got {neg_self_edge!r}"
        )
    num_classes = positive.shape[0]
    eye = torch.eye(num_classes, dtype=torch.bool, device=positive.device)

    def zero_diag(sim: Tensor) -> Tensor:
        return sim.masked_fill(eye, 0.0)

    def opposite_diag(sim: Tensor) -> Tensor:
        own = sim.diagonal()
        own = 1.0 - own if neg_self_edge == "one_minus_cos" else -own
        return torch.where(eye, torch.diag_embed(own), sim)

    builders = {
        "pp": lambda: zero_diag(cosine(positive, positive)),
        "vv": lambda: zero_diag(cosine(visual, visual)),
        "vp": lambda: cosine(positive, visual),
        "pn": lambda: opposite_diag(cosine(negative, positive)),
        "vn": lambda: opposite_diag(cosine(negative, visual)),
        "np": lambda: opposite_diag(cosine(positive, negative)),
    }
    return {name: builders[name]() for name in edges}


def _masked_mean(sentences: Tensor, mask: Tensor) -> Tensor:
    """(C, D) normalised mean of each class's padded (C, Q, D) sentence embeddings."""
    return normalize_rows((sentences * mask.to(sentences.dtype)[..., None]).sum(dim=1))


def positive_text_nodes(text: TextFeatures, kind: str) -> Tensor:
    """HeGraphAdapter's positive text nodes: ``"descriptions"`` (their mean) or ``"templates"``."""
    if kind == "templates":
        return text.class_features
    try:
        descriptions = text.require("description_features", "hegraph_adapter")
    except MissingTensorError as error:
        raise MissingTensorError(
            f"{error}; or run the documented ablation without descriptions explicitly with "
            "positive_nodes=templates (e.g. --method hegraph_adapter:positive_nodes=templates)"
        ) from None
    return _masked_mean(descriptions, text.description_mask)


def negative_text_nodes(text: TextFeatures, kind: str) -> Tensor:
    """HeGraphAdapter's negative text nodes: the negative prompt (``"template"``) or the mean of
    the negated descriptions (``"descriptions"``, spec §2.1)."""
    attribute, other = "negative_features", "negatives=descriptions"
    if kind == "descriptions":
        attribute, other = "negative_description_features", "negatives=template"
    try:
        negative = text.require(attribute, "hegraph_adapter")
    except MissingTensorError as error:
        raise MissingTensorError(
            f"{error}; or use {other}, or run the documented ablation without negative nodes "
            "explicitly with negative_nodes=false (e.g. --method "
            "hegraph_adapter:negative_nodes=false)"
        ) from None
    return negative if kind == "template" else _masked_mean(negative, text.description_mask)


class HeteroGraph(nn.Module):
    """The trainable projections of the heterogeneous GCN (one :class:`GCNBlock` per key)."""

    def __init__(self, block_names: list[str], dim: int, num_classes: int, bias: bool) -> None:
        super().__init__()
        self.blocks = nn.ModuleDict(
            {name: GCNBlock(dim, num_classes, bias) for name in sorted(block_names)}
        )

    def reset_parameters(self, generator: torch.Generator) -> None:
        for name in sorted(self.blocks):
            self.blocks[name].reset_parameters(generator)


@dataclass
class GraphInputs:
    """Everything the per-step propagation needs that does not change during training.

    ``frozen[e]`` is the aggregated input ``c ⊙ X_t + Â X_s`` of relation e when both ends are
    frozen; n→p keeps its adjacency and self term because its source (the updated negatives)
    changes every step.
    """

    positive: Tensor  # (C, D) base positive nodes
    negative: Tensor | None  # (C, D) base negative nodes
    frozen: dict[str, Tensor]
    np_adjacency: Tensor | None
    np_self: Tensor | None
    keys: Tensor  # (N, D) cache keys
    key_labels: Tensor  # (N,)


#: HeGraphAdapter's prediction-time meta-path weights, in the order a search visits them, and
#: the relation each one scales (β_pn and β_vn act at prediction time only through n→p).
METAPATH_WEIGHTS = {
    "beta_pn": ("pn", "np"),
    "beta_vn": ("vn", "np"),
    "alpha_pp": ("pp",),
    "alpha_vp": ("vp",),
    "alpha_np_test": ("np",),
    "gamma": ("vv",),
}


class TrainedGraph:
    """A trained heterogeneous graph's prediction-time outputs as functions of its meta-path weights.

    Once the projections are fixed, the messages of the relations whose two ends are frozen
    (p→n, v→n, p→p, v→p, v→v) no longer depend on any weight, and the n→p input
    ``c ⊙ X^p + Â (X^n + β_pn M^{p→n} + β_vn M^{v→n})`` is linear in (β_pn, β_vn). Both are
    computed once here, so another set of weights costs one (C, D) x (D, D) projection (n→p).

    Args:
        inputs: the frozen graph inputs of the fit.
        message: ``message(edge, aggregated)`` applies the trained block of ``edge``.
    """

    @torch.no_grad()
    def __init__(self, inputs: GraphInputs, message: Callable[[str, Tensor], Tensor]) -> None:
        self.positive_base = inputs.positive
        self.message = message
        self.messages = {e: message(e, h) for e, h in inputs.frozen.items()}
        self.np_terms: list[Tensor] = []
        if inputs.np_adjacency is not None:
            base = aggregate(inputs.np_adjacency, inputs.np_self, inputs.positive, inputs.negative)
            self.np_terms = [base] + [
                inputs.np_adjacency @ self.messages[e]
                if e in self.messages
                else torch.zeros_like(base)
                for e in ("pn", "vn")
            ]

    @property
    def bias(self) -> Tensor | None:
        """(C, D) the visual bias M^v (None without the v→v relation)."""
        return self.messages.get("vv")

    @torch.no_grad()
    def positive(self, weights: Mapping[str, float]) -> Tensor:
        """(C, D) the updated positive nodes X^p' (not normalised) for these weights."""
        out = self.positive_base
        for edge, name in (("pp", "alpha_pp"), ("vp", "alpha_vp")):
            if edge in self.messages:
                out = out + weights[name] * self.messages[edge]
        if self.np_terms:
            base, from_pn, from_vn = self.np_terms
            aggregated = base + weights["beta_pn"] * from_pn + weights["beta_vn"] * from_vn
            out = out + weights["alpha_np_test"] * self.message("np", aggregated)
        return out

    def scorer(
        self,
        defaults: Mapping[str, float],
        logit_scale: float,
        vis_logits: Callable[[float, Tensor], Tensor] | None,
        fusion: str,
        fusion_grid: list[float],
    ) -> Callable[[Mapping[str, float], ValidationSet], tuple[float, float]]:
        """``score(weights, rows) -> (accuracy %, fusion weight)`` of the fused prediction.

        The text classifier ``τ f norm(X^p')ᵀ`` with these weights (``defaults`` for those not
        given), fused (``"prob"``: the softmaxes, ``"logit"``: the logits) with the cache logits
        ``vis_logits(γ, features)`` (None: text only) at the first best weight of
        ``fusion_grid``. The cache logits are computed once per γ.
        """
        cached: dict[tuple[float, int], Tensor] = {}

        @torch.no_grad()
        def score(point: Mapping[str, float], rows: ValidationSet) -> tuple[float, float]:
            weights = {**defaults, **point}
            z_text = logit_scale * rows.features @ normalize_rows(self.positive(weights)).T
            if vis_logits is None:
                return 100.0 * float((z_text.argmax(1) == rows.labels).float().mean()), 0.0
            key = (float(weights["gamma"]), rows.features.data_ptr())
            if key not in cached:
                cached[key] = vis_logits(key[0], rows.features)
            z_vis = cached[key]
            if fusion == "prob":
                z_text, z_vis = z_text.softmax(dim=-1), z_vis.softmax(dim=-1)
            _, j, accuracy = search_logit_blend(z_text, [z_vis], fusion_grid, rows)
            return accuracy, fusion_grid[j]

        return score


#: HeGraphAdapter's meta-path weight options (training and prediction time), as declared.
WEIGHT_OPTIONS = (
    "beta_pn",
    "beta_vn",
    "alpha_pp",
    "alpha_vp",
    "alpha_np_train",
    "alpha_np_test",
    "gamma",
)


class HeGraphOptions:
    """Option plumbing of :class:`~clipadapt.methods.hegraph_adapter.HeGraphAdapter` (a mixin).

    Saved options of earlier versions, the relations and blocks a configuration uses, what a
    validation search can choose, and the check of the tensors a configuration reads.
    """

    @classmethod
    def _upgrade_params(cls, params: dict[str, Any]) -> dict[str, Any]:
        # before the per-dataset schedules became presets: `dataset` picked them, and epochs/lr
        # were None for "the schedule of that dataset"
        dataset = params.pop("dataset", "")
        schedule = {**cls._defaults(), **method_presets(cls.card.name).get(dataset, {})}
        for key in ("epochs", "lr"):
            if params.get(key, 0) is None:
                params[key] = schedule[key]
        return params

    def active_edges(self) -> tuple[str, ...]:
        """The relations in use after the node-type switches, in the canonical order."""
        keep = set(self.edges)
        if not self.negative_nodes:
            keep -= NEGATIVE_EDGES
        if not self.visual_nodes:
            keep -= VISUAL_EDGES
        if self.classifier == "text":
            keep.discard("vv")  # the visual bias only feeds the cache classifier
        return tuple(e for e in ALL_EDGES if e in keep)

    def _check_needs(self, text: TextFeatures | None, val: ValidationSet | None) -> None:
        # The card lists descriptions and negatives because the default configuration needs
        # them; the explicit ablations (positive_nodes=templates, negative_nodes=false, an edge
        # subset without negative relations) do not. So the base class's static check only
        # runs for a missing text side, and `_fit` (after the shape checks) requires exactly
        # what this configuration reads, naming the tensor and the ablation switch.
        if text is None:
            super()._check_needs(text, val)

    def search_space(self) -> dict[str, list[float]]:
        """The values a validation search can choose: ``fusion_weight`` over ``fusion_grid``
        (not for the text-only classifier) and every searched meta-path weight over the values
        :func:`~clipadapt.engine.search.coordinate_search` reaches from its default."""
        space: dict[str, list[float]] = {}
        if self.classifier != "text" and self.search_fusion:
            space["fusion_weight"] = [float(w) for w in self.fusion_grid]
        for name in self._searched_weights() if self.search_metapaths else []:
            space[name] = coordinate_values(float(getattr(self, name)))
        return space

    def _searched_weights(self) -> list[str]:
        """Meta-path weights that change the predictions of this configuration."""
        edges = set(self.active_edges())  # without v→v for the text classifier: no γ
        return [name for name, needs in METAPATH_WEIGHTS.items() if set(needs) <= edges]

    def _default_weights(self) -> dict[str, float]:
        """The meta-path weights as set (training uses them with ``alpha_np_train``)."""
        return {name: float(getattr(self, name)) for name in METAPATH_WEIGHTS}

    def _block_names(self) -> list[str]:
        mapping = BLOCK_LAYOUTS[self.block_layout]
        return sorted({mapping[e] for e in self.active_edges()})
