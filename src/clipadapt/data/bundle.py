"""Feature bundles: one ``.safetensors`` file of features, labels and text features.

Format (see ``docs/bundle-format.md``): tensor groups ``<group>_features`` (N, D) with
``<group>_labels`` (N,) and optional ``<group>_features_views`` (V, N, D), for groups such as
``train``, ``val``, ``test`` or pre-drawn ``train_{k}shot``; ``text_features`` (C, D), optional
``text_features_all`` (C, P, D), ``negative_text_features`` (C, D), ``description_features``
(C, Q, D) + ``description_mask`` (C, Q), ``negative_description_features`` (C, Q, D, their negated
forms, same mask). String metadata: ``classnames`` (JSON list),
``backbone``, ``source``. Every feature row is L2-normalised when read.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from clipadapt._utils import atomic_path, sha256_file
from clipadapt.data.sets import (
    EvaluationSet,
    LabeledFeatures,
    TextFeatures,
    TrainSet,
    ValidationSet,
)
from clipadapt.exceptions import BundleError, MissingTensorError

_ROLES: dict[str, type[LabeledFeatures]] = {
    "train": TrainSet,
    "val": ValidationSet,
    "eval": EvaluationSet,
}
_SHOT_GROUP = re.compile(r"^train_(\d+)shot$")
#: Metadata that says where files were when the bundle was made (the checkpoint's path in the
#: backbone record): left out of :meth:`FeatureBundle.fingerprint`, which covers what changes
#: results, not where a file sits.
LOCATION_METADATA = frozenset({"backbone_spec"})


class FeatureBundle:
    """An in-memory feature bundle.

    Args:
        tensors: name -> tensor, following the bundle format.
        metadata: string metadata (``classnames`` as a JSON list, ``backbone``, ``source``...).
        path: where it was read from, for messages.
    """

    def __init__(
        self,
        tensors: dict[str, Tensor],
        metadata: dict[str, str] | None = None,
        path: str | Path | None = None,
    ) -> None:
        self.tensors = dict(tensors)
        self.metadata = dict(metadata or {})
        self.path = Path(path) if path is not None else None
        self._validate()

    # ------------------------------------------------------------------ description
    @property
    def where(self) -> str:
        return str(self.path) if self.path is not None else "bundle"

    @property
    def name(self) -> str:
        if "dataset" in self.metadata:
            return self.metadata["dataset"]
        return self.path.stem if self.path is not None else "bundle"

    @property
    def backbone(self) -> str:
        return self.metadata.get("backbone", "unknown")

    @property
    def dim(self) -> int:
        return self._dim

    @property
    def num_classes(self) -> int:
        return len(self.classnames)

    @property
    def classnames(self) -> list[str]:
        return self._classnames

    def groups(self) -> list[str]:
        """Names of the labelled feature groups (``train``, ``test``, ``train_4shot``...)."""
        return sorted(
            name[: -len("_features")]
            for name in self.tensors
            if name.endswith("_features") and f"{name[: -len('_features')]}_labels" in self.tensors
        )

    def shot_groups(self) -> dict[int, str]:
        """Pre-drawn K-shot groups, {K: group name}."""
        out = {}
        for group in self.groups():
            match = _SHOT_GROUP.match(group)
            if match:
                out[int(match.group(1))] = group
        return dict(sorted(out.items()))

    def has_group(self, group: str) -> bool:
        return group in self.groups()

    def fingerprint(self) -> str:
        """A 16-hex-digit content hash of the bundle: every tensor's name, dtype, shape and bytes,
        and the metadata except where files sat when it was made (:data:`LOCATION_METADATA`).

        The same features give the same fingerprint wherever the bundle (or the checkpoint that
        made it) is stored; a changed row, label, class name or template changes it. The
        backbone enters through its content key (``backbone_key``: the checkpoint's sha256),
        not through its path.
        """
        digest = hashlib.sha256()
        for name in sorted(self.tensors):
            tensor = self.tensors[name].detach().cpu().contiguous()
            digest.update(json.dumps([name, str(tensor.dtype), list(tensor.shape)]).encode())
            digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
        kept = {k: v for k, v in self.metadata.items() if k not in LOCATION_METADATA}
        digest.update(json.dumps(kept, sort_keys=True).encode("utf-8"))
        return digest.hexdigest()[:16]

    def file_fingerprint(self) -> str | None:
        """The fingerprint that adapters and results saved by clipadapt 0.1.0 recorded: the first
        16 hex digits of the file's sha256 (it changed with the checkpoint's path in the
        metadata). Used only to recognise those; :meth:`fingerprint` is the one to record."""
        if self.path is not None and self.path.is_file():
            return sha256_file(self.path)[:16]
        return None

    def fingerprints(self) -> set[str]:
        """Every fingerprint this bundle is known by (the content hash and the old file hash)."""
        return {f for f in (self.fingerprint(), self.file_fingerprint()) if f}

    # ------------------------------------------------------------------ access
    def tensor(self, name: str) -> Tensor:
        if name not in self.tensors:
            raise MissingTensorError(
                f"{self.where}: tensor `{name}` is missing (present: {', '.join(sorted(self.tensors))})"
            )
        return self.tensors[name]

    def group(self, group: str, role: str = "eval") -> LabeledFeatures:
        """The rows of ``group`` as a typed set (role ``train``, ``val`` or ``eval``).

        Raises:
            MissingTensorError: the group does not exist (the message lists the groups).
            BundleError: non-finite values or labels out of range.
        """
        if group not in self.groups():
            raise MissingTensorError(
                f"{self.where}: no feature group {group!r} (needs `{group}_features` and "
                f"`{group}_labels`); groups present: {', '.join(self.groups()) or 'none'}"
            )
        cls = _ROLES[role]
        views = self.tensors.get(f"{group}_features_views")
        try:
            rows = cls(
                self.tensors[f"{group}_features"], self.tensors[f"{group}_labels"], views, group
            )
        except BundleError as error:
            raise BundleError(f"{self.where}: {error}") from None
        try:
            rows.check_labels(self.num_classes)
        except BundleError as error:
            raise BundleError(f"{self.where}: {error}") from None
        return rows

    def text(self, text_encoder: object | None = None) -> TextFeatures:
        """The class text features (``text_features`` and the optional text tensors)."""
        if "text_features" not in self.tensors:
            raise MissingTensorError(
                f"{self.where}: tensor `text_features` (C, D) is missing; this bundle has no text "
                "side, so only image-only methods can run on it (or re-extract with a text encoder)"
            )
        try:
            return TextFeatures(
                class_features=self.tensors["text_features"],
                classnames=tuple(self.classnames),
                prompt_features=self.tensors.get("text_features_all"),
                negative_features=self.tensors.get("negative_text_features"),
                description_features=self.tensors.get("description_features"),
                description_mask=self.tensors.get("description_mask"),
                negative_description_features=self.tensors.get("negative_description_features"),
                text_encoder=text_encoder,
            )
        except BundleError as error:
            raise BundleError(f"{self.where}: {error}") from None

    def has_text(self) -> bool:
        return "text_features" in self.tensors

    def check(self) -> None:
        """Read every labelled group and the text side once, as a run would: finite values,
        labels in ``[0, C)``, views that match their rows.

        Raises:
            BundleError: the first problem found, naming the tensor.
        """
        for group in self.groups():
            self.group(group, "eval")
        if self.has_text():
            self.text()

    # ------------------------------------------------------------------ validation
    def _validate(self) -> None:
        dims = {}
        for name, tensor in self.tensors.items():
            if not isinstance(tensor, Tensor):
                raise BundleError(f"{self.where}: `{name}` is not a tensor")
            if name.endswith("_labels"):
                if tensor.ndim != 1 or tensor.is_floating_point() or tensor.dtype == torch.bool:
                    raise BundleError(
                        f"{self.where}: `{name}` must be a 1-D integer tensor, got "
                        f"{tuple(tensor.shape)} {tensor.dtype}"
                    )
            elif (
                name.endswith("_features")
                or name.endswith("_features_views")
                or name
                in (
                    "text_features_all",
                    "description_features",
                )
            ):
                if not tensor.is_floating_point():
                    raise BundleError(
                        f"{self.where}: `{name}` must be float16/float32, got {tensor.dtype}"
                    )
                dims[name] = int(tensor.shape[-1])
        for group in self.groups():
            n_feat = self.tensors[f"{group}_features"]
            n_lab = self.tensors[f"{group}_labels"]
            if n_feat.ndim != 2:
                raise BundleError(
                    f"{self.where}: `{group}_features` must be (N, D), got {tuple(n_feat.shape)}"
                )
            if n_feat.shape[0] != n_lab.shape[0]:
                raise BundleError(
                    f"{self.where}: `{group}_features` has {n_feat.shape[0]} rows but "
                    f"`{group}_labels` has {n_lab.shape[0]}"
                )
        if len(set(dims.values())) > 1:
            detail = ", ".join(f"{k}: {v}" for k, v in sorted(dims.items()))
            raise BundleError(
                f"{self.where}: feature widths differ ({detail}); all features and text must come "
                "from one backbone"
            )
        self._dim = next(iter(dims.values())) if dims else 0
        self._classnames = self._read_classnames()

    def _read_classnames(self) -> list[str]:
        raw = self.metadata.get("classnames")
        if raw is not None:
            try:
                names = json.loads(raw)
            except json.JSONDecodeError as error:
                raise BundleError(
                    f"{self.where}: metadata `classnames` is not JSON ({error})"
                ) from None
            if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
                raise BundleError(
                    f"{self.where}: metadata `classnames` must be a JSON list of strings"
                )
            if (
                "text_features" in self.tensors
                and len(names) != self.tensors["text_features"].shape[0]
            ):
                raise BundleError(
                    f"{self.where}: {len(names)} class names but `text_features` has "
                    f"{self.tensors['text_features'].shape[0]} rows"
                )
            return names
        if "text_features" in self.tensors:
            count = int(self.tensors["text_features"].shape[0])
        else:
            labels = [self.tensors[f"{g}_labels"] for g in self.groups()]
            count = max((int(t.max()) + 1 for t in labels if t.numel()), default=0)
        return [f"class_{i}" for i in range(count)]

    # ------------------------------------------------------------------ io
    def save(self, path: str | Path) -> Path:
        """Write the bundle atomically."""
        return save_bundle(path, self.tensors, self.metadata)


def load_bundle(path: str | Path) -> FeatureBundle:
    """Read a feature bundle from a ``.safetensors`` file.

    Raises:
        BundleError: the file is missing, not a safetensors file, or malformed.
    """
    path = Path(path)
    if not path.is_file():
        raise BundleError(f"{path}: feature bundle not found (create one with `clipadapt extract`)")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
    except Exception as error:  # safetensors raises several error types for bad files
        raise BundleError(f"{path}: not a readable safetensors feature bundle ({error})") from None
    return FeatureBundle(tensors, metadata, path)


def save_bundle(path: str | Path, tensors: dict[str, Tensor], metadata: dict[str, Any]) -> Path:
    """Write tensors and string metadata to ``path`` atomically (temporary file + rename)."""
    path = Path(path)
    meta = {k: v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()}
    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=meta)
    return path
