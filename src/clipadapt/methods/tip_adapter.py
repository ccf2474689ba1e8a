"""Tip-Adapter: a training-free key-value cache over the K-shot features (baselines spec §4)."""

from __future__ import annotations

import torch
from torch import Tensor

from clipadapt.data.sets import TextFeatures, TrainSet, ValidationSet, normalize_rows
from clipadapt.engine.search import search_blend
from clipadapt.methods.base import Adapter, MethodCard, register_method
from clipadapt.methods.constraints import common, non_negative, positive, positive_int


def tip_grid(scale: float, steps: int) -> list[float]:
    """Tip-Adapter's search grid ``0.1 + i * (scale - 0.1) / steps`` for i < steps."""
    return [0.1 + i * (scale - 0.1) / steps for i in range(steps)]


def cache_keys_from(train: TrainSet, use_views: bool) -> Tensor:
    """Cache keys: the normalised mean of the stored augmented views, else the train rows."""
    if use_views and train.views is not None:
        return normalize_rows(train.views.mean(dim=0))
    return train.features


def sort_cache_by_class(keys: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """The cache with its keys grouped by class (stable), so :func:`cache_logits` can reduce
    each class's K keys with a reshape-sum instead of a scatter. Already sorted: unchanged."""
    if labels.numel() < 2 or bool((labels[1:] >= labels[:-1]).all()):
        return keys, labels
    order = torch.sort(labels, stable=True).indices
    return keys[order], labels[order]


def class_block_size(key_labels: Tensor, num_classes: int) -> int | None:
    """K when the keys are sorted by class with exactly K keys per class, else None."""
    n = key_labels.numel()
    if n == 0 or n % num_classes:
        return None
    k = n // num_classes
    expected = torch.arange(num_classes, device=key_labels.device).repeat_interleave(k)
    return k if torch.equal(key_labels, expected) else None


def cache_logits(
    affinity: Tensor,
    key_labels: Tensor,
    num_classes: int,
    beta: float,
    *,
    block: int | None | bool = True,
    scratch: Tensor | None = None,
) -> Tensor:
    """``exp(-β (1 - A)) @ one_hot(labels)`` without an (NK, C) one-hot matrix.

    Keys grouped by class with K keys each (:func:`sort_cache_by_class` and a balanced draw)
    are summed with a reshape (a contiguous reduction); other layouts use a scatter-add.

    Args:
        affinity: (N, NK) cosine affinities between queries and cache keys.
        key_labels: (NK,) class of each key.
        block: K of a class-blocked layout; True works it out, None/False forces the scatter.
        scratch: an (N, NK) buffer reused for the weights (no autograd; a search over many β
            then allocates nothing per β).
    """
    if block is True:
        block = class_block_size(key_labels, num_classes)
    if scratch is not None and not affinity.requires_grad:
        weights = torch.mul(affinity, beta, out=scratch).sub_(beta).exp_()
    else:
        weights = torch.exp(-beta * (1.0 - affinity))
    if block:
        return weights.view(affinity.shape[0], num_classes, block).sum(dim=-1)
    out = torch.zeros(affinity.shape[0], num_classes, dtype=weights.dtype, device=weights.device)
    return out.index_add_(1, key_labels, weights)


@register_method
class TipAdapter(Adapter):
    """Tip-Adapter (Zhang et al., ECCV 2022), training-free.

    ``logits = s · f W_textᵀ + α · exp(-β (1 - f Keysᵀ)) · L_train`` with the keys the K-shot
    features (mean of augmented views when the bundle stores them). α (cache weight) and β
    (sharpness) are searched on validation features over Tip-Adapter's grids
    ``0.1 + i (S - 0.1) / n``; without validation data the given ``alpha``/``beta`` are used and
    ``best_params_['source']`` says so.

    Args:
        alpha: cache weight used without search (2.0: the median init_alpha of the 11
            published per-dataset configs, spec §4.3).
        beta: sharpness used without search (init_beta, 1.0 in every published config).
        search: search α/β on validation data when it is given.
        search_scale_alpha, search_scale_beta: grid upper ends S_α, S_β. Defaults 10 and 12 are
            the medians of the 11 published per-dataset configs (spec §4.3), a dataset-agnostic
            choice; the per-dataset values are in ``methods/presets/tip_adapter.yaml``.
        search_steps_alpha, search_steps_beta: grid sizes (20, 200 as in the paper's configs).
        use_views: build the keys from the mean of stored augmented views when present.
        logit_scale: the zero-shot scale (100).
    """

    card = MethodCard(
        name="tip_adapter",
        summary="Tip-Adapter: training-free cache of K-shot features blended with zero-shot",
        paper="Zhang et al., Tip-Adapter: Training-free Adaption of CLIP for Few-shot "
        "Classification, ECCV 2022",
        arxiv="2207.09519",
        needs=("train", "text"),
        searched={"alpha": "0.1 + i(S_α-0.1)/20", "beta": "0.1 + i(S_β-0.1)/200"},
        uses_views=True,
        max_tiny_seconds=20,
        constraints={
            "alpha": non_negative(),
            "beta": positive(),
            "search_scale_alpha": positive(),
            "search_scale_beta": positive(),
            "search_steps_alpha": positive_int(),
            "search_steps_beta": positive_int(),
            **common("search", "use_views", "logit_scale"),
        },
    )

    def __init__(
        self,
        alpha: float = 2.0,
        beta: float = 1.0,
        search: bool = True,
        search_scale_alpha: float = 10.0,
        search_scale_beta: float = 12.0,
        search_steps_alpha: int = 20,
        search_steps_beta: int = 200,
        use_views: bool = True,
        logit_scale: float = 100.0,
    ) -> None:
        self._init_params(locals())

    def _fit(self, train: TrainSet, text: TextFeatures, val: ValidationSet | None) -> None:
        self.text_weights_ = text.class_features.clone()
        keys, labels = sort_cache_by_class(cache_keys_from(train, self.use_views), train.labels)
        self.cache_keys_, self.cache_labels_ = keys.clone(), labels.clone()
        self.n_classes_ = text.num_classes
        self._choose_alpha_beta(val)

    def search_space(self) -> dict[str, list[float]]:
        """The (β, α) grid searched on validation data (β outer, α inner)."""
        if not self.search:
            return {}
        return {
            "beta": tip_grid(self.search_scale_beta, self.search_steps_beta),
            "alpha": tip_grid(self.search_scale_alpha, self.search_steps_alpha),
        }

    def _choose_alpha_beta(self, val: ValidationSet | None) -> None:
        def search(val: ValidationSet) -> tuple[dict[str, float], float]:
            zero_shot = self.logit_scale * val.features @ self.text_weights_.T
            affinity = val.features @ self.cache_keys_.T
            num_classes = self.text_weights_.shape[0]
            block = class_block_size(self.cache_labels_, num_classes)
            scratch = torch.empty_like(affinity)  # one (Nv, NK) buffer for every β

            def cache_for(beta: float) -> Tensor:
                return cache_logits(
                    affinity, self.cache_labels_, num_classes, beta, block=block, scratch=scratch
                )

            return search_blend(zero_shot, cache_for, self.search_space(), val)

        defaults = {"alpha": float(self.alpha), "beta": float(self.beta)}
        chosen = self._choose(
            val, search, defaults, disabled=None if self.search else "search disabled"
        )
        self.alpha_, self.beta_ = float(chosen["alpha"]), float(chosen["beta"])
        self.best_params_.update(alpha=self.alpha_, beta=self.beta_)

    def _logits(self, features: Tensor) -> Tensor:
        zero_shot = self.logit_scale * features @ self.text_weights_.T
        affinity = features @ self.cache_keys_.T
        # in place over the affinities when no gradient is wanted (prediction): one buffer less
        scratch = None if torch.is_grad_enabled() else affinity
        cache = cache_logits(
            affinity, self.cache_labels_, self.text_weights_.shape[0], self.beta_, scratch=scratch
        )
        return zero_shot.add_(cache, alpha=self.alpha_)
