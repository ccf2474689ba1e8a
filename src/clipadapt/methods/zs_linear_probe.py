"""Zero-shot-initialised linear probe (ZS-LP) with CLAP's class-adaptive constraint (spec §3.2-3.3)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from clipadapt.data.sets import TextFeatures, TrainSet, ValidationSet, normalize_rows
from clipadapt.engine.train import DASSL_SGD, OptimizerParams, train_loop
from clipadapt.methods.base import Adapter, MethodCard, register_method
from clipadapt.methods.constraints import common, one_of

CONSTRAINTS = ("clap", "none")


def clap_lambdas(
    features: Tensor, labels: Tensor, prototypes: Tensor, logit_scale: float
) -> Tensor:
    """CLAP's per-class penalty weights.

    ``λ_c`` = mean, over the support rows of class c, of the zero-shot softmax probability of
    class c (scale ``logit_scale``, the initial prototypes), so classes that zero-shot already
    gets right are held closer to their text prototype.

    Args:
        features: (N, D) normalised support rows. labels: (N,). prototypes: (C, D).

    Returns:
        (C,) float32; 0 for a class without support rows.
    """
    probs = (logit_scale * features @ normalize_rows(prototypes).T).softmax(-1)
    own = probs.gather(1, labels[:, None]).squeeze(1)
    num_classes = prototypes.shape[0]
    total = torch.zeros(num_classes, device=features.device).index_add_(0, labels, own)
    count = torch.bincount(labels, minlength=num_classes).float()
    return total / count.clamp_min(1.0)


@register_method
class ZSLinearProbe(OptimizerParams, Adapter):
    """Zero-shot-initialised linear probe, optionally with CLAP's constraint (Silva-Rodríguez
    et al., CVPR 2024).

    Class prototypes ``W`` (C, D) start at the text features and are trained with
    ``logits = s · norm(f) · norm(w_c)`` and the loss
    ``mean CE + (1/C) Σ_c λ_c ||w_c - t_c||²``. With ``constraint="clap"`` (default) ``λ_c`` is
    :func:`clap_lambdas` (fixed during training); with ``"none"`` there is no penalty (plain
    ZS-LP). No validation data is used, as CLAP argues: one configuration for all datasets and
    shots, the last epoch is kept.

    The training pool is every stored augmented view of every support row (``V · N`` samples,
    labels repeated) when views exist, else the N clean rows. An epoch follows CLAP's code: a
    fresh permutation of the pool, of which ``max(1, floor(N_images / batch_size))``
    consecutive batches are used (so an epoch sees about 1/V of the pool). SGD lr 0.1, momentum
    0.9, no weight decay, batch 256, 300 epochs, one constant warmup epoch at 1e-5, then cosine
    per epoch. The text base is the bundle's normalised class feature times ``text_norm``
    (the spec's raw prompt-averaged base is not in bundles; with one prompt the directions
    agree).

    Args:
        constraint: "clap" or "none".
        epochs: 300. lr: 0.1. momentum: 0.9. weight_decay: 0.0. batch_size: 256.
        warmup_lr: 1e-5, the constant learning rate of the first epoch.
        logit_scale: 100.
        use_views: train on the stored augmented views when present.
        text_norm: length of the initial prototypes. Bundles store only normalised text
            features, but the reference trains on raw text embeddings, and with ``norm(w)`` in
            the logits the effective step size scales with ``1/||w||²``; 9.0 is about the mean
            raw norm (9.1) of OpenAI CLIP ViT-B/32 single-prompt class embeddings (the ImageNet
            bundle's raw ``text_features``), so the reference lr keeps its meaning.
        seed: shuffling seed.
    """

    card = MethodCard(
        name="zs_linear_probe",
        summary="ZS-LP / CLAP: text-initialised class prototypes tuned with a pull to the text",
        paper="Silva-Rodríguez et al., A Closer Look at the Few-Shot Adaptation of Large "
        "Vision-Language Models (CLAP), CVPR 2024",
        arxiv="2312.12730",
        needs=("train", "text"),
        trainable=True,
        searched={},
        param_formula="C * D",
        uses_views=True,
        max_tiny_seconds=30,
        expected_failed_checks={
            "check_learns_easy_problem": "CLAP keeps prototypes near the text on purpose: with "
            "the paper's recipe (300 single-batch epochs on the 20 fixture rows) it reaches "
            "87 % test vs 83 % zero-shot, below the suite's 90 % bar",
        },
        constraints={
            "constraint": one_of(CONSTRAINTS),
            **common("epochs", "lr", "momentum", "weight_decay", "batch_size", "warmup_lr"),
            **common("logit_scale", "use_views", "text_norm", "seed"),
        },
    )
    train_recipe = DASSL_SGD

    def __init__(
        self,
        constraint: str = "clap",
        epochs: int = 300,
        lr: float = 0.1,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        batch_size: int = 256,
        warmup_lr: float = 1e-5,
        logit_scale: float = 100.0,
        use_views: bool = True,
        text_norm: float = 9.0,
        seed: int = 1,
    ) -> None:
        self._init_params(locals())

    def _fit(self, train: TrainSet, text: TextFeatures, val: ValidationSet | None) -> None:
        base = self.text_norm * text.class_features
        if self.use_views and train.views is not None:
            pool = train.views.reshape(-1, train.dim)
            pool_labels = train.labels.repeat(train.views.shape[0])
        else:
            pool, pool_labels = train.features, train.labels
        if self.constraint == "clap":
            lambdas = clap_lambdas(pool, pool_labels, base, self.logit_scale)
        else:
            lambdas = torch.zeros(base.shape[0], device=base.device)
        prototypes = nn.Parameter(base.clone())
        num_classes = base.shape[0]

        def batch_loss(index: Tensor, epoch: int) -> Tensor:
            logits = self.logit_scale * pool[index] @ normalize_rows(prototypes).T
            loss = F.cross_entropy(logits.float(), pool_labels[index])
            drift = (prototypes - base).square().sum(-1)
            return loss + (lambdas * drift).sum() / num_classes

        config = self._train_config(iters_per_epoch=max(1, len(train) // self.batch_size))
        history = train_loop(
            [prototypes],
            batch_loss,
            pool.shape[0],
            config,
            device=train.device,
            what="zs_linear_probe training",
        )
        self.prototypes_ = prototypes
        self.lambdas_ = lambdas
        self.train_loss_ = [float(x) for x in history.loss]
        self._record_fixed(
            {"constraint": self.constraint}, "no validation data used (CLAP's protocol)"
        )

    def _logits(self, features: Tensor) -> Tensor:
        return self.logit_scale * features @ normalize_rows(self.prototypes_).T

    def _set_state(self, tensors: dict[str, Tensor], meta: dict) -> None:
        super()._set_state(tensors, meta)
        self.prototypes_ = nn.Parameter(self.prototypes_.float())
