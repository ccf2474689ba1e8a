"""The typed feature sets a method sees: train, validation, evaluation and text features.

Roles are types, not strings: the hyperparameter search accepts only a :class:`ValidationSet`,
so evaluation data cannot reach it by mistake (the counter-example of Tip-Adapter's scripts,
which searched on test features).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
from torch import Tensor

from clipadapt.exceptions import BundleError, MissingTensorError


def normalize_rows(x: Tensor) -> Tensor:
    """L2-normalise the last dimension in float32 (fp16 inputs are upcast first)."""
    x = x.float()
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def check_feature_matrix(x: Tensor, what: str, dim: int | None = None) -> Tensor:
    """Validate a feature matrix and return it as normalised float32.

    Raises:
        BundleError: not 2-D, wrong width, not floating point, or non-finite values.
    """
    if not isinstance(x, Tensor):
        raise BundleError(
            f"{what}: expected a torch.Tensor of shape (N, D), got {type(x).__name__}"
        )
    if x.ndim != 2:
        raise BundleError(f"{what}: expected shape (N, D), got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise BundleError(f"{what}: expected floating-point features, got dtype {x.dtype}")
    if dim is not None and x.shape[1] != dim:
        raise BundleError(
            f"{what}: feature width {x.shape[1]} does not match {dim}; features and text must "
            "come from the same backbone (re-extract them together)"
        )
    if not torch.isfinite(x).all():
        bad = int((~torch.isfinite(x)).any(dim=1).sum())
        raise BundleError(f"{what}: {bad} row(s) contain NaN or Inf; re-extract these features")
    return normalize_rows(x)


@dataclass(frozen=True)
class LabeledFeatures:
    """Image features with labels.

    Attributes:
        features: (N, D) float32, rows L2-normalised.
        labels: (N,) int64 in [0, C).
        views: optional (V, N, D) float32 augmented views of the same rows, normalised.
        name: where the rows came from (a bundle group name), for messages and records.
    """

    features: Tensor
    labels: Tensor
    views: Tensor | None = None
    name: str = "features"

    def __post_init__(self) -> None:
        feats = check_feature_matrix(self.features, f"{self.name}_features")
        labels = self.labels
        if not isinstance(labels, Tensor) or labels.ndim != 1:
            raise BundleError(f"{self.name}_labels: expected a 1-D tensor of class indices")
        if labels.is_floating_point() or labels.dtype == torch.bool:
            raise BundleError(f"{self.name}_labels: expected integer labels, got {labels.dtype}")
        if labels.shape[0] != feats.shape[0]:
            raise BundleError(
                f"{self.name}: {feats.shape[0]} feature rows but {labels.shape[0]} labels"
            )
        if labels.numel() and int(labels.min()) < 0:
            raise BundleError(f"{self.name}_labels: negative label {int(labels.min())}")
        views = self.views
        if views is not None:
            if views.ndim != 3 or views.shape[1:] != feats.shape:
                raise BundleError(
                    f"{self.name}_features_views: expected shape (V, {feats.shape[0]}, "
                    f"{feats.shape[1]}), got {tuple(views.shape)}"
                )
            if not torch.isfinite(views).all():
                raise BundleError(f"{self.name}_features_views: contains NaN or Inf")
            views = normalize_rows(views)
        object.__setattr__(self, "features", feats)
        object.__setattr__(self, "labels", labels.long())
        object.__setattr__(self, "views", views)

    def __len__(self) -> int:
        return int(self.features.shape[0])

    @property
    def dim(self) -> int:
        return int(self.features.shape[1])

    @property
    def device(self) -> torch.device:
        return self.features.device

    def subset(self, index: Tensor) -> LabeledFeatures:
        """Rows ``index`` (views included), keeping the set's type and name."""
        index = torch.as_tensor(index, dtype=torch.long)
        views = None if self.views is None else self.views[:, index]
        return replace(self, features=self.features[index], labels=self.labels[index], views=views)

    def to(self, device: torch.device | str) -> LabeledFeatures:
        views = None if self.views is None else self.views.to(device)
        return replace(
            self, features=self.features.to(device), labels=self.labels.to(device), views=views
        )

    def check_labels(self, num_classes: int) -> None:
        if self.labels.numel() and int(self.labels.max()) >= num_classes:
            raise BundleError(
                f"{self.name}_labels: label {int(self.labels.max())} is out of range for "
                f"{num_classes} classes"
            )


@dataclass(frozen=True)
class TrainSet(LabeledFeatures):
    """The K-shot training rows a method fits on."""


@dataclass(frozen=True)
class ValidationSet(LabeledFeatures):
    """Validation rows: the only data hyperparameter search and model selection may see."""


@dataclass(frozen=True)
class EvaluationSet(LabeledFeatures):
    """Held-out rows scored once per run. Never accepted by ``fit`` or the search helpers."""


_HOW_TO_TEXT = {
    "negative_features": (
        "negative_text_features",
        "re-run `clipadapt extract` (it encodes the negative prompt 'a photo of no {}.' by default)",
    ),
    "description_features": (
        "description_features",
        "re-run `clipadapt extract --descriptions FILE.json` with a CuPL-style description file",
    ),
    "negative_description_features": (
        "negative_description_features",
        "re-run `clipadapt extract --descriptions FILE.json` (it encodes the negated descriptions "
        "with the negative prompt on, the default)",
    ),
    "prompt_features": (
        "text_features_all",
        "re-run `clipadapt extract` with a template ensemble (e.g. --templates imagenet7)",
    ),
    "text_encoder": (
        "text encoder",
        "run on an image dataset with `clipadapt run`/`bench --dataset` so the encoder is loaded "
        "(a feature bundle alone has no text tower)",
    ),
}


def _masked_rows(q: Tensor, mask: Tensor, what: str) -> Tensor:
    """Padded (C, Q, D) sentence embeddings as float32, normalised, zero where ``mask`` is False."""
    q = torch.where(mask[..., None], q.float(), torch.zeros((), dtype=torch.float32))
    if not torch.isfinite(q).all():
        raise BundleError(f"{what}_features: contains NaN or Inf")
    norms = q.norm(dim=-1, keepdim=True)
    return torch.where(norms > 0, q / norms.clamp_min(1e-12), q)


@dataclass(frozen=True)
class TextFeatures:
    """Per-class text features.

    Attributes:
        class_features: (C, D) normalised class embeddings (prompt or prompt-ensemble mean).
        classnames: C class names.
        prompt_features: optional (C, P, D) per-prompt embeddings.
        negative_features: optional (C, D) embeddings of the negative prompt.
        description_features: optional (C, Q, D) description embeddings, padded.
        description_mask: (C, Q) bool, True where a description exists.
        negative_description_features: optional (C, Q, D) embeddings of the negated descriptions
            (:func:`~clipadapt.data.prompts.negative_descriptions`), same padding and mask.
        text_encoder: optional callable object with ``encode_tokens``/``tokenize`` (CoOp).
    """

    class_features: Tensor
    classnames: tuple[str, ...] = ()
    prompt_features: Tensor | None = None
    negative_features: Tensor | None = None
    description_features: Tensor | None = None
    description_mask: Tensor | None = None
    negative_description_features: Tensor | None = None
    text_encoder: object | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        cls = check_feature_matrix(self.class_features, "text_features")
        c, d = cls.shape
        object.__setattr__(self, "class_features", cls)
        if not self.classnames:
            object.__setattr__(self, "classnames", tuple(f"class_{i}" for i in range(c)))
        elif len(self.classnames) != c:
            raise BundleError(
                f"text_features has {c} rows but {len(self.classnames)} class names are given"
            )
        else:
            object.__setattr__(self, "classnames", tuple(self.classnames))
        if self.prompt_features is not None:
            p = self.prompt_features
            if p.ndim != 3 or p.shape[0] != c or p.shape[2] != d:
                raise BundleError(
                    f"text_features_all: expected (C={c}, P, D={d}), got {tuple(p.shape)}"
                )
            object.__setattr__(self, "prompt_features", normalize_rows(p))
        if self.negative_features is not None:
            neg = check_feature_matrix(self.negative_features, "negative_text_features", d)
            if neg.shape[0] != c:
                raise BundleError(f"negative_text_features: expected {c} rows, got {neg.shape[0]}")
            object.__setattr__(self, "negative_features", neg)
        if self.description_features is not None:
            q = self.description_features
            if q.ndim != 3 or q.shape[0] != c or q.shape[2] != d:
                raise BundleError(
                    f"description_features: expected (C={c}, Q, D={d}), got {tuple(q.shape)}"
                )
            mask = self.description_mask
            if mask is None:
                mask = torch.ones(q.shape[:2], dtype=torch.bool)
            if tuple(mask.shape) != tuple(q.shape[:2]):
                raise BundleError(
                    f"description_mask: expected shape {tuple(q.shape[:2])}, got {tuple(mask.shape)}"
                )
            mask = mask.bool()
            if not mask.any(dim=1).all():
                empty = [self.classnames[i] for i in torch.nonzero(~mask.any(1)).flatten().tolist()]
                raise BundleError(f"description_mask: no description for class(es) {empty[:5]}")
            object.__setattr__(self, "description_features", _masked_rows(q, mask, "description"))
            object.__setattr__(self, "description_mask", mask)
        if self.negative_description_features is not None:
            q = self.negative_description_features
            if self.description_features is None:
                raise BundleError(
                    "negative_description_features: given without description_features, whose "
                    "mask it shares; add the descriptions or drop the negated ones"
                )
            if tuple(q.shape) != tuple(self.description_features.shape):
                raise BundleError(
                    "negative_description_features: expected the shape of description_features "
                    f"{tuple(self.description_features.shape)}, got {tuple(q.shape)}"
                )
            negated = _masked_rows(q, self.description_mask, "negative_description")
            object.__setattr__(self, "negative_description_features", negated)

    @property
    def num_classes(self) -> int:
        return int(self.class_features.shape[0])

    @property
    def dim(self) -> int:
        return int(self.class_features.shape[1])

    def require(self, attribute: str, method: str) -> Tensor:
        """Return an optional tensor, or raise naming the bundle tensor and how to make it."""
        value = getattr(self, attribute)
        if value is None:
            tensor, how = _HOW_TO_TEXT.get(attribute, (attribute, "add it to the bundle"))
            raise MissingTensorError(f"{method} needs `{tensor}`, which is missing: {how}")
        return value

    def to(self, device: torch.device | str) -> TextFeatures:
        def move(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.to(device)

        return replace(
            self,
            class_features=self.class_features.to(device),
            prompt_features=move(self.prompt_features),
            negative_features=move(self.negative_features),
            description_features=move(self.description_features),
            description_mask=move(self.description_mask),
            negative_description_features=move(self.negative_description_features),
        )
