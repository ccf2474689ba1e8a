"""Tip-Adapter: a training-free key-value cache over the K-shot features (baselines spec §4)."""

from __future__ import annotations

import torch
from torch import Tensor

from clipadapt.data.sets import TextFeatures, TrainSet, ValidationSet, normalize_rows
from clipadapt.engine.search import require_validation
from clipadapt.methods.base import Adapter, MethodCard, register_method


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


#: Above this share of (row, class) candidate pairs a β is scored densely (every α, all C).
DENSE_CANDIDATE_SHARE = 0.1


def search_alpha_beta(
    zero_shot: Tensor,
    affinity: Tensor,
    key_labels: Tensor,
    val: ValidationSet,
    betas: list[float],
    alphas: list[float],
) -> tuple[float, float, float]:
    """Exhaustive (β outer, α inner) search on validation logits; first best pair wins.

    Exact, with two ways of scoring a β. A class can win a row's argmax for some α in the grid
    only if its best possible score (at the largest α, since cache logits are >= 0) reaches the
    smallest guaranteed row maximum (the row maximum at the smallest α). When those candidate
    (row, class) pairs are few (a sharp β, a confident zero-shot head) only they are scored,
    for every α at once, and reduced per row; when they are many (a flat β) the α grid is
    scored densely, one (Nv, C) argmax per α, which is cheaper than gathering most pairs.
    Both give argmax's first-maximum tie rule, so the choice never changes the result.

    Args:
        zero_shot: (Nv, C) text logits of the validation rows.
        affinity: (Nv, NK) validation-to-key affinities.

    Returns:
        (alpha, beta, validation accuracy in percent).
    """
    val = require_validation(val, "tip_adapter search")
    num_rows, num_classes = zero_shot.shape
    alpha_t = torch.tensor(alphas, dtype=zero_shot.dtype, device=zero_shot.device)[:, None]
    a_lo, a_hi = float(alpha_t.min()), float(alpha_t.max())
    labels = val.labels
    arange = torch.arange(num_rows, device=labels.device)
    best = (alphas[0], betas[0], -1.0)
    block = class_block_size(key_labels, num_classes)
    scratch = torch.empty_like(affinity)  # one (Nv, NK) buffer for every β
    dense_buffer = torch.empty_like(zero_shot)
    for beta in betas:
        cache = cache_logits(affinity, key_labels, num_classes, beta, block=block, scratch=scratch)
        upper = zero_shot + a_hi * cache
        floor = (zero_shot + a_lo * cache).amax(dim=1, keepdim=True)
        candidates = upper >= floor
        if int(candidates.sum()) > DENSE_CANDIDATE_SHARE * candidates.numel():
            correct_counts = []
            for alpha in alphas:
                torch.add(zero_shot, cache, alpha=alpha, out=dense_buffer)
                correct_counts.append(dense_buffer.argmax(dim=1) == labels)
            counts = torch.stack(correct_counts).sum(dim=1)
        else:
            rows, cols = torch.nonzero(candidates, as_tuple=True)  # row-major: cols ascend
            scores = zero_shot[rows, cols][None] + alpha_t * cache[rows, cols][None]  # (A, P)
            row_max = torch.full((len(alphas), num_rows), -torch.inf, dtype=scores.dtype)
            row_max.scatter_reduce_(1, rows.expand_as(scores), scores, reduce="amax")
            true_score = zero_shot[arange, labels][None] + alpha_t * cache[arange, labels][None]
            # argmax takes the first maximum: the true class must reach the maximum with no
            # earlier class tied to it
            tied_before = (scores == row_max[:, rows]) & (cols < labels[rows])[None]
            blocked = torch.zeros_like(row_max).scatter_add_(
                1, rows.expand_as(scores), tied_before.to(scores.dtype)
            )
            counts = ((true_score >= row_max) & (blocked == 0)).sum(dim=1)
        j = int(torch.argmax(counts))
        accuracy = 100.0 * int(counts[j]) / num_rows
        if accuracy > best[2]:
            best = (alphas[j], beta, accuracy)
    return best


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
        self.alpha = alpha
        self.beta = beta
        self.search = search
        self.search_scale_alpha = search_scale_alpha
        self.search_scale_beta = search_scale_beta
        self.search_steps_alpha = search_steps_alpha
        self.search_steps_beta = search_steps_beta
        self.use_views = use_views
        self.logit_scale = logit_scale

    def _fit(self, train: TrainSet, text: TextFeatures, val: ValidationSet | None) -> None:
        self.text_weights_ = text.class_features.clone()
        keys, labels = sort_cache_by_class(cache_keys_from(train, self.use_views), train.labels)
        self.cache_keys_, self.cache_labels_ = keys.clone(), labels.clone()
        self.n_classes_ = text.num_classes
        self._choose_alpha_beta(val)

    def _choose_alpha_beta(self, val: ValidationSet | None) -> None:
        if self.search and val is not None and len(val) > 0:
            zero_shot = self.logit_scale * val.features @ self.text_weights_.T
            affinity = val.features @ self.cache_keys_.T
            alpha, beta, acc = search_alpha_beta(
                zero_shot,
                affinity,
                self.cache_labels_,
                val,
                tip_grid(self.search_scale_beta, self.search_steps_beta),
                tip_grid(self.search_scale_alpha, self.search_steps_alpha),
            )
            self.alpha_, self.beta_ = float(alpha), float(beta)
            self.best_params_ = {
                "alpha": self.alpha_,
                "beta": self.beta_,
                "val_accuracy": acc,
                "source": f"validation search on {val.name} ({len(val)} rows)",
            }
        else:
            self.alpha_, self.beta_ = float(self.alpha), float(self.beta)
            reason = "search disabled" if not self.search else "no validation data"
            self.best_params_ = {
                "alpha": self.alpha_,
                "beta": self.beta_,
                "source": f"defaults ({reason})",
            }

    def _logits(self, features: Tensor) -> Tensor:
        zero_shot = self.logit_scale * features @ self.text_weights_.T
        affinity = features @ self.cache_keys_.T
        # in place over the affinities when no gradient is wanted (prediction): one buffer less
        scratch = None if torch.is_grad_enabled() else affinity
        cache = cache_logits(
            affinity, self.cache_labels_, self.text_weights_.shape[0], self.beta_, scratch=scratch
        )
        return zero_shot.add_(cache, alpha=self.alpha_)
