"""HeGraphAdapter: a heterogeneous graph adapter over text and visual class nodes.

Zhao, Jiang, Wang, Xu, Tang, "HeGraphAdapter: Tuning Multi-Modal Vision-Language Models with
Heterogeneous Graph Adapter", arXiv:2410.07854. Implementation spec: specs/hegraph_adapter.md.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor

from clipadapt.data.sets import TextFeatures, TrainSet, ValidationSet, normalize_rows
from clipadapt.engine.search import coordinate_search
from clipadapt.engine.train import VIEW_MODES, OptimizerParams, ViewSampler, train_loop
from clipadapt.methods._graph import (
    ALL_EDGES,
    BLOCK_LAYOUTS,
    METAPATH_WEIGHTS,
    NEGATIVE_EDGES,
    VISUAL_EDGES,
    WEIGHT_OPTIONS,
    BiasedCache,
    GraphInputs,
    HeGraphOptions,
    HeteroGraph,
    TrainedGraph,
    aggregate,
    block_param_count,
    class_means,
    negative_text_nodes,
    normalize_relation,
    positive_text_nodes,
    relation_matrices,
    train_view_features,
)
from clipadapt.methods.base import Adapter, MethodCard, register_method
from clipadapt.methods.constraints import common, flag, list_of, non_negative, one_of, positive
from clipadapt.methods.tip_adapter import cache_keys_from, cache_logits, sort_cache_by_class

DEFAULT_FUSION_GRID = (0.0, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 10.0)


@register_method
class HeGraphAdapter(HeGraphOptions, OptimizerParams, Adapter):
    """HeGraphAdapter (Zhao et al., 2024): heterogeneous graph of positive text, negative text
    and visual class nodes, with a text classifier and a visual-bias cache classifier.

    Per class there is a positive text node (mean of the class's description embeddings), a
    negative text node ("a photo of no {class}") and a visual node (mean K-shot feature). Six
    cosine relations (p→n, v→n, p→p, v→p, n→p, v→v; own-class contrastive edges weighted
    ``1 - cos``) are computed once from the frozen features. Each step runs the hierarchical
    aggregation once: negatives ``X^n' = X^n + β_pn M^{p→n} + β_vn M^{v→n}``, then positives
    ``X^p' = X^p + α_pp M^{p→p} + α_vp M^{v→p} + α_np M^{n→p}`` (messages from the *updated*
    negatives), then the visual bias ``M^v`` shifts every cache key, ``F' = norm(F + γ Y M^v)``.
    Each ``M = tanh((c X_t + Â X_s) W + b)`` is a one-layer GCN with symmetric normalisation.
    Loss ``CE(τ f X^p'ᵀ) + λ CE(s_vis exp(-β_tip (1 - f F'ᵀ)) Y)``; only the projections train.

    Test time uses ``α_np = 0.1`` (the paper's test value) and fuses the two classifiers as
    ``log((softmax(Z_text) + w softmax(Z_vis)) / (1 + w))`` (``fusion="prob"``) or
    ``Z_text + w Z_vis`` (``fusion="logit"``). The paper sets the meta-path weights per dataset;
    here, with validation rows, the prediction-time weights (β_pn, β_vn, α_pp, α_vp, α_np, γ)
    are searched around the defaults after training (``search_metapaths``, coarse to fine, one
    weight at a time, :func:`~clipadapt.engine.search.coordinate_search`), each point scored
    with its best ``w`` over ``fusion_grid`` (``search_fusion``). ``best_params_`` records the
    chosen point and its source (the defaults without validation rows).

    Variants (paper §4.3, presets in ``methods/presets/hegraph_adapter.yaml``): ``T`` is
    ``classifier="text"`` (HeGraphAdapter(T), the paper's domain-generalisation method), ``T-P``
    adds ``edges=[pp, vp]`` and ``T-N`` ``edges=[pn, vn, np]`` to it. Ablations:
    ``negative_nodes=False`` drops the negative nodes and their three relations,
    ``visual_nodes=False`` drops the visual nodes, their relations and the visual bias,
    ``positive_nodes="templates"`` uses ``text_features`` instead of descriptions. A bundle
    without the tensors a configuration reads fails naming the tensor and the switch.

    Args:
        positive_nodes: "descriptions" (masked mean of ``description_features``) or "templates".
        negatives: negative nodes from the negative prompt (``"template"``, "a photo of no
            {class}.") or from the negated description set, averaged (``"descriptions"``,
            ``negative_description_features``); the template scored higher on validation.
        negative_nodes, visual_nodes: keep these node types.
        edges: relation types to use (subset of pn, vn, pp, vp, np, vv).
        beta_pn, beta_vn: weights of p→n and v→n into the negatives (0.5, 0.5; inferred).
        alpha_pp, alpha_vp: weights of p→p and v→p into the positives (0.06, 0.24; Table 3).
        alpha_np_train, alpha_np_test: weight of n→p in training (0.2) and at test (0.1; paper).
        gamma: weight of the visual bias on the cache keys (0.5; inferred).
        neg_self_edge: own-class contrastive weight, "one_minus_cos" or "neg_cos" (inferred).
        source_degree: source-side degree, "column" sums of |R| or "row" sums (inferred).
        block_layout: "five_blocks_bias" (5 x (D² + C·D), the paper's count up to 4·D) or
            "three_W" (one bias-free W per target type).
        classifier: "both" (text + cache, loss with ``loss_weight``) or "text" (the (T) variant).
        loss_weight: λ, weight of the cache-classifier loss (0.1; paper).
        logit_scale: τ of the text classifier (100, CLIP's frozen scale).
        cache_beta, cache_scale: β_tip and s_vis of the cache classifier (1, 100; inferred).
        fusion: "prob" or "logit" test-time combination (inferred).
        fusion_weight: w used without validation search.
        search_fusion, fusion_grid: search w on validation data over this grid.
        search_metapaths: search the prediction-time meta-path weights on validation data.
        epochs, lr: the paper's schedule, 30 epochs at lr 1e-3. The paper trains EuroSAT, DTD
            and FGVCAircraft for 100 epochs (FGVCAircraft at lr 1e-2): those are the presets
            ``eurosat``, ``dtd`` and ``fgvc_aircraft`` in ``methods/presets/hegraph_adapter.yaml``
            (``--method hegraph_adapter:preset=eurosat``), named explicitly per dataset.
        batch_size, weight_decay: 32, 0.01 (inferred, CoOp family).
        warmup_epochs, warmup_lr: constant-lr warmup (1 epoch at 1e-5; inferred).
        use_views: visual nodes and cache keys from the mean of stored augmented views, and
            augmented views as training queries.
        view_sampling: "random" (one stored view drawn per row and epoch, the shared
            :class:`~clipadapt.engine.train.ViewSampler`) or "cycle" (view ``epoch % V``).
        seed: initialisation and shuffling seed.
    """

    card = MethodCard(
        name="hegraph_adapter",
        summary="HeGraphAdapter: heterogeneous GCN over positive/negative text and visual nodes "
        "+ visual-bias cache",
        paper="Zhao et al., HeGraphAdapter: Tuning Multi-Modal Vision-Language Models with "
        "Heterogeneous Graph Adapter, 2024",
        arxiv="2410.07854",
        needs=("train", "text", "negative_features", "description_features"),
        trainable=True,
        searched={
            "fusion_weight": "fusion_grid (default 0, .1, .25, .5, 1, 2, 4, 10)",
            **dict.fromkeys(
                METAPATH_WEIGHTS, "its value x (1, 1/2, 2), then x (1, 3/4, 5/4), one at a time"
            ),
        },
        uses_views=True,
        max_tiny_seconds=30,
        param_formula="5 * (D * D + C * D)",
        constraints={
            "positive_nodes": one_of(("descriptions", "templates")),
            "negatives": one_of(("template", "descriptions")),
            "negative_nodes": flag(),
            "visual_nodes": flag(),
            "edges": list_of(one_of(ALL_EDGES)),
            **dict.fromkeys(WEIGHT_OPTIONS, non_negative()),
            "neg_self_edge": one_of(("one_minus_cos", "neg_cos")),
            "source_degree": one_of(("column", "row")),
            "block_layout": one_of(tuple(BLOCK_LAYOUTS)),
            "classifier": one_of(("both", "text")),
            "loss_weight": non_negative(),
            "cache_beta": positive(),
            "cache_scale": positive(),
            "fusion": one_of(("prob", "logit")),
            "fusion_weight": non_negative(),
            "search_fusion": flag(),
            "search_metapaths": flag(),
            "view_sampling": one_of(VIEW_MODES),
            "fusion_grid": list_of(non_negative()),
            **common("logit_scale", "epochs", "lr", "batch_size", "weight_decay"),
            **common("warmup_epochs", "warmup_lr", "use_views", "seed"),
        },
    )

    def __init__(
        self,
        positive_nodes: str = "descriptions",
        negatives: str = "template",
        negative_nodes: bool = True,
        visual_nodes: bool = True,
        edges: tuple[str, ...] = ALL_EDGES,
        beta_pn: float = 0.5,
        beta_vn: float = 0.5,
        alpha_pp: float = 0.06,
        alpha_vp: float = 0.24,
        alpha_np_train: float = 0.2,
        alpha_np_test: float = 0.1,
        gamma: float = 0.5,
        neg_self_edge: str = "one_minus_cos",
        source_degree: str = "column",
        block_layout: str = "five_blocks_bias",
        classifier: str = "both",
        loss_weight: float = 0.1,
        logit_scale: float = 100.0,
        cache_beta: float = 1.0,
        cache_scale: float = 100.0,
        fusion: str = "prob",
        fusion_weight: float = 1.0,
        search_fusion: bool = True,
        fusion_grid: tuple[float, ...] = DEFAULT_FUSION_GRID,
        search_metapaths: bool = True,
        epochs: int = 30,
        lr: float = 1e-3,
        batch_size: int = 32,
        weight_decay: float = 0.01,
        warmup_epochs: int = 1,
        warmup_lr: float = 1e-5,
        use_views: bool = True,
        view_sampling: str = "random",
        seed: int = 1,
    ) -> None:
        self._init_params(locals())

    @staticmethod
    def param_count(
        dim: int,
        num_classes: int,
        block_layout: str = "five_blocks_bias",
        edges: tuple[str, ...] = ALL_EDGES,
    ) -> int:
        """Trainable scalars for a layout and edge set: 5(D² + C·D) for the full default.

        Example:
            >>> HeGraphAdapter.param_count(1024, 1000)  # RN50, ImageNet
            10362880
        """
        bias = block_layout == "five_blocks_bias"
        blocks = {BLOCK_LAYOUTS[block_layout][e] for e in edges}
        return len(blocks) * block_param_count(dim, num_classes, bias)

    # ------------------------------------------------------------------ nodes
    def _graph_inputs(self, train: TrainSet, text: TextFeatures) -> GraphInputs:
        edges = self.active_edges()
        positive = positive_text_nodes(text, self.positive_nodes)
        negative = None
        if set(edges) & NEGATIVE_EDGES:
            negative = negative_text_nodes(text, self.negatives)
        visual = None
        if set(edges) & VISUAL_EDGES:
            visual = class_means(
                train_view_features(train, self.use_views), train.labels, text.num_classes
            )
        relations = relation_matrices(positive, negative, visual, edges, self.neg_self_edge)
        nodes = {"p": positive, "n": negative, "v": visual}
        frozen: dict[str, Tensor] = {}
        np_adjacency = np_self = None
        for name, relation in relations.items():
            adjacency, self_coef = normalize_relation(relation, self.source_degree)
            source, target = nodes[name[0]], nodes[name[1]]
            if name == "vv":
                self_coef = None  # Eq. 5: the visual aggregation has no self term
            if name == "np":
                np_adjacency, np_self = adjacency, self_coef
                continue
            frozen[name] = aggregate(adjacency, self_coef, target, source)
        keys, key_labels = sort_cache_by_class(cache_keys_from(train, self.use_views), train.labels)
        return GraphInputs(
            positive=positive,
            negative=negative,
            frozen=frozen,
            np_adjacency=np_adjacency,
            np_self=np_self,
            keys=keys,
            key_labels=key_labels,
        )

    # ------------------------------------------------------------------ the graph
    def _message(self, edge: str, aggregated: Tensor) -> Tensor:
        return self.graph_.blocks[BLOCK_LAYOUTS[self.block_layout][edge]](aggregated)

    def _propagate(
        self, inputs: GraphInputs, weights: Mapping[str, float], alpha_np: float
    ) -> tuple[Tensor, Tensor | None]:
        """One pass of the hierarchical aggregation: negatives → positives → visual bias.

        Args:
            weights: β_pn, β_vn, α_pp, α_vp by option name (the set or the chosen values).
            alpha_np: the weight of n→p (``alpha_np_train`` in training).

        Returns:
            (updated positive nodes X^p' (C, D), visual bias M^v (C, D) or None).
        """
        message, frozen = self._message, inputs.frozen
        negative = inputs.negative
        if "pn" in frozen or "vn" in frozen:
            updates = [
                weights[w] * message(e, frozen[e])
                for e, w in (("pn", "beta_pn"), ("vn", "beta_vn"))
                if e in frozen
            ]
            negative = negative + sum(updates)
        positive = inputs.positive
        updates = [
            weights[w] * message(e, frozen[e])
            for e, w in (("pp", "alpha_pp"), ("vp", "alpha_vp"))
            if e in frozen
        ]
        if inputs.np_adjacency is not None:
            aggregated = aggregate(inputs.np_adjacency, inputs.np_self, inputs.positive, negative)
            updates.append(alpha_np * message("np", aggregated))
        if updates:
            positive = positive + sum(updates)
        bias = message("vv", frozen["vv"]) if "vv" in frozen else None
        return positive, bias

    def _biased_keys(self, inputs: GraphInputs, bias: Tensor | None, gamma: float) -> Tensor:
        if bias is None:
            return inputs.keys
        return normalize_rows(inputs.keys + gamma * bias[inputs.key_labels])

    def _classifier_logits(
        self, features: Tensor, text_weights: Tensor, keys: Tensor, key_labels: Tensor
    ) -> tuple[Tensor, Tensor | None]:
        z_text = self.logit_scale * features @ normalize_rows(text_weights).T
        if self.classifier == "text":
            return z_text, None
        affinity = features @ keys.T
        scratch = None if torch.is_grad_enabled() else affinity  # in place when predicting
        z_vis = self.cache_scale * cache_logits(
            affinity, key_labels, text_weights.shape[0], self.cache_beta, scratch=scratch
        )
        return z_text, z_vis

    # ------------------------------------------------------------------ fit
    def _fit(self, train: TrainSet, text: TextFeatures, val: ValidationSet | None) -> None:
        device = train.device
        num_classes, dim = text.num_classes, text.dim
        inputs = self._graph_inputs(train, text)
        self._inputs = inputs  # private: kept for _grad_logits, never saved
        self.n_classes_, self.dim_ = num_classes, dim
        self._build_modules()
        self.graph_.to(device)
        self.graph_.reset_parameters(self._generator("cpu"))
        labels = train.labels
        views = train.views if self.use_views else None
        sampler = ViewSampler(train.features, views, self.seed, mode=self.view_sampling)
        cache = BiasedCache(inputs.keys, inputs.key_labels, num_classes)
        weights = self._default_weights()

        def batch_loss(index: Tensor, epoch: int) -> Tensor:
            positive, bias = self._propagate(inputs, weights, self.alpha_np_train)
            batch = sampler(epoch).index_select(0, index)
            target = labels.index_select(0, index)
            z_text = self.logit_scale * batch @ normalize_rows(positive).T
            loss = F.cross_entropy(z_text.float(), target)
            if self.classifier != "text":
                affinity = cache.affinity(batch, bias, self.gamma)
                z_vis = self.cache_scale * cache_logits(
                    affinity, inputs.key_labels, num_classes, self.cache_beta
                )
                loss = loss + self.loss_weight * F.cross_entropy(z_vis.float(), target)
            return loss

        history = train_loop(
            list(self.graph_.parameters()),
            batch_loss,
            len(train),
            self._train_config(),
            device=device,
            what="hegraph_adapter training",
        )
        self.train_loss_ = [float(v) for v in history.loss]
        self.cache_labels_ = inputs.key_labels.clone()
        graph = TrainedGraph(inputs, self._message)
        self._choose_prediction(graph, cache, val)
        point = self.metapath_weights_
        with torch.no_grad():
            self.text_weights_ = normalize_rows(graph.positive(point)).detach()
            self.cache_keys_ = self._biased_keys(inputs, graph.bias, point["gamma"]).clone()
        self.best_params_.update(
            {"epochs": self.epochs, "lr": self.lr, "edges": list(self.active_edges())}
        )

    def _choose_prediction(
        self, graph: TrainedGraph, cache: BiasedCache, val: ValidationSet | None
    ) -> None:
        """Choose the prediction-time meta-path weights and fusion weight on validation rows.

        Each point of the meta-path search is scored with its best fusion weight; everything
        that does not depend on the weights (the trained messages, the cache logits of each γ)
        is computed once. Sets ``metapath_weights_`` and ``fusion_weight_``.
        """
        defaults = self._default_weights()
        names = self._searched_weights() if self.search_metapaths else []
        fuse = self.classifier != "text"
        grid = [float(w) for w in self.fusion_grid] if self.search_fusion else []

        def vis_logits(gamma: float, features: Tensor) -> Tensor:
            affinity = cache.affinity(features, graph.bias, gamma)
            return self.cache_scale * cache_logits(
                affinity, cache.key_labels, self.n_classes_, self.cache_beta
            )

        fusion_grid = grid or [float(self.fusion_weight)]
        fused = graph.scorer(
            defaults, self.logit_scale, vis_logits if fuse else None, self.fusion, fusion_grid
        )

        def search(val: ValidationSet) -> tuple[dict[str, float], float]:
            point: dict[str, float] = {}
            if names:
                start = {name: defaults[name] for name in names}
                point, _ = coordinate_search(lambda p, rows: fused(p, rows)[0], start, val)
            acc, weight = fused(point, val)
            return {**point, **({"fusion_weight": weight} if fuse else {})}, acc

        fixed = {name: defaults[name] for name in names}
        if fuse:
            fixed["fusion_weight"] = float(self.fusion_weight)
        if names or (fuse and self.search_fusion):
            chosen = self._choose(val, search, fixed)
        elif fuse:
            chosen = self._choose(val, search, fixed, disabled="search disabled")
        else:
            chosen = fixed
            self._record_fixed(fixed, "text classifier only, meta-path search off")
        self.metapath_weights_ = {**defaults, **{n: float(chosen[n]) for n in names}}
        self.fusion_weight_ = float(chosen.get("fusion_weight", 0.0))

    # ------------------------------------------------------------------ predict
    def _logits(self, features: Tensor) -> Tensor:
        return self._fused(features, self.text_weights_, self.cache_keys_)

    def _grad_logits(self, features: Tensor) -> Tensor:
        """Test-time logits recomputed through the graph, so gradients reach every block."""
        inputs = getattr(self, "_inputs", None)
        if inputs is None:
            raise RuntimeError(
                "hegraph_adapter: gradient logits need the graph inputs of a fit in this process"
            )
        point = self.metapath_weights_
        positive, bias = self._propagate(inputs, point, point["alpha_np_test"])
        keys = self._biased_keys(inputs, bias, point["gamma"])
        return self._fused(features, normalize_rows(positive), keys)

    def _fused(self, features: Tensor, text_weights: Tensor, keys: Tensor) -> Tensor:
        z_text, z_vis = self._classifier_logits(features, text_weights, keys, self.cache_labels_)
        w = float(self.fusion_weight_)
        if z_vis is None or w == 0.0:
            return z_text
        if self.fusion == "logit":
            return z_text + w * z_vis
        # log of the mixture of the two classifiers' probabilities, computed stably
        mixture = torch.logaddexp(
            z_text.log_softmax(dim=-1), z_vis.log_softmax(dim=-1) + math.log(w)
        )
        return mixture - math.log1p(w)

    def _build_modules(self) -> None:
        self.graph_ = HeteroGraph(
            self._block_names(),
            int(self.dim_),
            int(self.n_classes_),
            bias=self.block_layout == "five_blocks_bias",
        )
