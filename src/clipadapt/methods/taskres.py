"""TaskRes: a learnable task residual on the text classifier (baselines spec §5.2)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from clipadapt.data.sets import TextFeatures, TrainSet, ValidationSet, normalize_rows
from clipadapt.engine.train import OptimizerParams, ViewSampler, train_loop
from clipadapt.methods.base import Adapter, MethodCard, register_method
from clipadapt.methods.constraints import between, common, count, non_negative, optional


def epochs_for_shots(shots: int) -> int:
    """TaskRes's schedule: 100 epochs for K <= 4, 200 for K >= 8 (spec §5.2)."""
    return 100 if shots <= 4 else 200


@register_method
class TaskRes(OptimizerParams, Adapter):
    """TaskRes (Yu et al., CVPR 2023): ``t'_c = t_c + α · x_c``, x zero-initialised.

    ``logits = s · norm(f) · norm(t'_c)ᵀ``; only the residual ``X`` (C, D) is trained. The text
    base is the bundle's normalised class feature times ``text_norm`` (the spec's base is the
    raw prompt average, which bundles do not store; with one prompt the directions agree). Adam (betas 0.9/0.999) with weight decay 5e-4 as an L2 term, batch 256, one
    constant warmup epoch at 1e-5 then cosine per epoch, last epoch kept; with stored views
    each epoch uses one view per image. No validation search (the paper fixes α per dataset).

    Args:
        alpha: residual scale (0.5; 1.0 for Flowers102 in the paper's configs, see
            ``methods/presets/taskres.yaml``).
        lr: 2e-3 (2e-4 on ImageNet in the paper's configs).
        epochs: None means the paper's rule from the shots (max rows per class): 100 for
            K <= 4, 200 for K >= 8.
        epoch_scale: the epochs actually trained are ``ceil(epoch_scale · epochs)`` (1.0: as
            given or from the rule), so a shortened schedule keeps the rule's dependence on the
            shots (the ``fast`` preset).
        batch_size: 256. weight_decay: 5e-4. warmup_lr: 1e-5.
        logit_scale: 100. use_views: sample stored augmented views per epoch.
        text_norm: length of the text base ``t_c``. Bundles store normalised text features;
            the reference adds ``α·x`` to the raw embedding, so the residual's relative size
            depends on the raw norm. 9.0 is about the mean raw norm (9.1) of OpenAI CLIP
            ViT-B/32 single-prompt class embeddings (the ImageNet bundle's ``text_features``).
        seed: shuffling and view-sampling seed.
    """

    card = MethodCard(
        name="taskres",
        summary="TaskRes: learnable residual added to the text classifier, scaled by α",
        paper="Yu et al., Task Residual for Tuning Vision-Language Models, CVPR 2023",
        arxiv="2211.10277",
        needs=("train", "text"),
        trainable=True,
        searched={},
        param_formula="C * D",
        uses_views=True,
        max_tiny_seconds=30,
        expected_failed_checks={
            "check_learns_easy_problem": "with the paper's schedule (100 Adam steps at lr 2e-3, "
            "α 0.5 on a text base of norm 9) the residual moves the classifier only a little on "
            "the 20 fixture rows: 84 % test vs 83 % zero-shot, below the suite's 90 % bar",
        },
        constraints={
            "alpha": non_negative(),
            "epochs": optional(count(), "the paper's rule from the shots"),
            "epoch_scale": between(0.0, 1.0, open_low=True),
            **common("lr", "batch_size", "weight_decay", "warmup_lr", "logit_scale"),
            **common("use_views", "text_norm", "seed"),
        },
    )
    # Adam with weight decay as an L2 term, one constant warmup epoch, cosine stepped per epoch
    train_recipe = {"optimizer": "adam", "warmup_epochs": 1, "per_epoch_schedule": True}

    def __init__(
        self,
        alpha: float = 0.5,
        lr: float = 2e-3,
        epochs: int | None = None,
        epoch_scale: float = 1.0,
        batch_size: int = 256,
        weight_decay: float = 5e-4,
        warmup_lr: float = 1e-5,
        logit_scale: float = 100.0,
        use_views: bool = True,
        text_norm: float = 9.0,
        seed: int = 1,
    ) -> None:
        self._init_params(locals())

    def _classifier(self, residual: Tensor) -> Tensor:
        return normalize_rows(self.base_ + self.alpha * residual)

    def _fit(self, train: TrainSet, text: TextFeatures, val: ValidationSet | None) -> None:
        self.base_ = self.text_norm * text.class_features
        residual = nn.Parameter(torch.zeros_like(self.base_))
        shots = int(torch.bincount(train.labels).max())
        epochs = int(self.epochs) if self.epochs is not None else epochs_for_shots(shots)
        # the tolerance keeps float products such as 0.1 * 30 = 3.0000000000000004 at 3
        epochs = math.ceil(self.epoch_scale * epochs - 1e-9)
        sampler = ViewSampler(train.features, train.views if self.use_views else None, self.seed)

        def batch_loss(index: Tensor, epoch: int) -> Tensor:
            logits = self.logit_scale * sampler(epoch)[index] @ self._classifier(residual).T
            return F.cross_entropy(logits.float(), train.labels[index])

        history = train_loop(
            [residual],
            batch_loss,
            len(train),
            self._train_config(epochs=epochs),
            device=train.device,
            what="taskres training",
        )
        self.residual_ = residual
        self.train_loss_ = [float(x) for x in history.loss]
        self._record_fixed({"epochs": epochs}, "TaskRes searches nothing on validation data")

    def _logits(self, features: Tensor) -> Tensor:
        return self.logit_scale * features @ self._classifier(self.residual_).T

    def _set_state(self, tensors: dict[str, Tensor], meta: dict) -> None:
        super()._set_state(tensors, meta)
        self.residual_ = nn.Parameter(self.residual_.float())
