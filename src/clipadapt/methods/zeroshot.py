"""Zero-shot CLIP: cosine similarity to the class text embeddings, times a fixed scale."""

from __future__ import annotations

from torch import Tensor

from clipadapt.data.sets import TextFeatures, TrainSet, ValidationSet
from clipadapt.methods.base import Adapter, MethodCard, register_method
from clipadapt.methods.constraints import positive


@register_method
class ZeroShotCLIP(Adapter):
    """``logits = logit_scale * f @ W_textᵀ`` (CLIP, Radford et al. 2021; baselines spec §2).

    Args:
        logit_scale: the fixed scale (100, the OpenAI checkpoints' exp(logit_scale)).
    """

    card = MethodCard(
        name="zeroshot",
        summary="Zero-shot CLIP: text embeddings of the class prompts as the classifier",
        paper="Radford et al., Learning Transferable Visual Models From Natural Language "
        "Supervision, ICML 2021",
        arxiv="2103.00020",
        needs=("text",),
        max_tiny_seconds=5,
        constraints={
            "logit_scale": positive(),
        },
    )

    def __init__(self, logit_scale: float = 100.0) -> None:
        self._init_params(locals())

    def _fit(self, train: TrainSet, text: TextFeatures, val: ValidationSet | None) -> None:
        self.text_weights_ = text.class_features.clone()
        self.best_params_ = {}

    def _logits(self, features: Tensor) -> Tensor:
        return self.logit_scale * features @ self.text_weights_.T
