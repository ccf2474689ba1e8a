"""Zero-shot CLIP: cosine similarity to the class text embeddings, times a fixed scale."""

from __future__ import annotations

from torch import Tensor

from clipadapt.data.sets import TextFeatures, TrainSet, ValidationSet, normalize_rows
from clipadapt.engine.search import accuracy, grid_search
from clipadapt.methods.base import Adapter, MethodCard, register_method
from clipadapt.methods.constraints import one_of, positive

#: The class text a zero-shot classifier can be built from, in the order ``text="auto"`` tries
#: them (on a validation tie the earlier one is kept).
TEXT_SOURCES: tuple[str, ...] = ("names", "descriptions", "names+descriptions")


def class_text(text: TextFeatures, source: str) -> Tensor:
    """(C, D) unit class vectors of one text source.

    ``names``: the bundle's ``text_features`` (the class names in its prompt template(s),
    averaged over the templates when there are several); ``descriptions``: the mean of each
    class's description embeddings (CuPL); ``names+descriptions``: the mean of those two unit
    vectors, renormalised.

    Raises:
        MissingTensorError: a description source without ``description_features``.
    """
    names = text.class_features
    if source == "names":
        return names
    descriptions = text.require("description_features", f"zeroshot (text={source})")
    # padded rows are zero vectors, so the masked mean's direction is that of the plain sum
    described = normalize_rows(descriptions.sum(dim=1))
    if source == "descriptions":
        return described
    return normalize_rows(names + described)


@register_method
class ZeroShotCLIP(Adapter):
    """``logits = logit_scale * f @ W_textᵀ`` (CLIP, Radford et al. 2021; baselines spec §2).

    Args:
        logit_scale: the fixed scale (100, the OpenAI checkpoints' exp(logit_scale)).
        text: which class text makes ``W_text``: ``names`` (the bundle's class prompts, CLIP's
            zero-shot), ``descriptions`` (CuPL-style description sentences), ``names+descriptions``
            (both), or ``auto``: the one of those the bundle has with the best validation
            accuracy (``names`` without validation rows). The choice and how it was made are
            recorded in ``best_params_`` (``text``, ``val_accuracy``, ``source``).
    """

    card = MethodCard(
        name="zeroshot",
        summary="Zero-shot CLIP: text embeddings of the class prompts as the classifier",
        paper="Radford et al., Learning Transferable Visual Models From Natural Language "
        "Supervision, ICML 2021",
        arxiv="2103.00020",
        needs=("text",),
        searched={
            "text": "only with text=auto: names, descriptions or names+descriptions (those the "
            "bundle has), the best validation accuracy; ties keep the earlier"
        },
        max_tiny_seconds=5,
        constraints={
            "logit_scale": positive(),
            "text": one_of(("auto", *TEXT_SOURCES)),
        },
    )

    def __init__(self, logit_scale: float = 100.0, text: str = "names") -> None:
        self._init_params(locals())

    def search_space(self) -> dict[str, list[str]]:
        """``{"text": candidates}``: every source with ``auto``, else the one given."""
        return {"text": list(TEXT_SOURCES) if self.text == "auto" else [self.text]}

    def _fit(self, train: TrainSet, text: TextFeatures, val: ValidationSet | None) -> None:
        if self.text != "auto":
            self.text_weights_ = class_text(text, self.text).clone()
            self._record_fixed({"text": self.text}, f"text={self.text} was given")
            return
        has_descriptions = text.description_features is not None
        sources = {s: class_text(text, s) for s in TEXT_SOURCES if has_descriptions or s == "names"}

        def search(val: ValidationSet) -> tuple[dict[str, str], float]:
            scores = {s: val.features @ weights.T for s, weights in sources.items()}
            return grid_search(
                lambda point, v: accuracy(scores[point["text"]], v.labels),
                {"text": list(sources)},
                val,
            )

        chosen = self._choose(val, search, {"text": "names"})["text"]
        self.text_weights_ = sources[chosen].clone()

    def _logits(self, features: Tensor) -> Tensor:
        return self.logit_scale * features @ self.text_weights_.T
