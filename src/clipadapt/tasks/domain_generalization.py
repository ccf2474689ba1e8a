"""Domain generalisation: fit on a source dataset once, score unchanged on shifted targets.

The papers' protocol (CoOp, Tip-Adapter, HeGraphAdapter, NODE-Adapter): train on ImageNet
16-shot and evaluate the same model on ImageNet-V2 and -Sketch (all 1000 classes) and on
ImageNet-A and -R, which use 200-class subsets. For a subset target the adapter's
``C_source``-way logits are restricted to the target's classes and the argmax is taken over those
columns only (predicting over all source classes and mapping back is a different, harder task).

A target bundle's classes are mapped to the source's by, in order:

1. ``source_classes`` in the target bundle's metadata: a JSON list of source class indices, one
   per target class (the exact mapping);
2. ``wnids`` in both bundles' metadata (JSON lists of WordNet IDs, one per class, written for
   the ImageNet variants by :func:`clipadapt.data.imagenet_variants.bundle_metadata`): each
   target class goes to the source class with its WNID, whatever part of ImageNet the source
   holds;
3. ``imagenet_classes`` in the target's metadata (ImageNet-1k indices) when the source is a
   complete 1000-class ImageNet bundle without ``wnids``: the source columns are then taken to
   be in ImageNet's class-index order (sorted WNIDs), the order of every ImageNet loader and of
   the real ImageNet feature files;
4. the class names, compared after lower-casing and turning ``_``/``-`` into spaces.

The same code runs on the embedded world's style-shifted variants (``world_species_sketch`` ...,
``domain_of`` = ``world_species``), whose classes equal the source's.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from clipadapt.data.bundle import FeatureBundle
from clipadapt.exceptions import ConfigError
from clipadapt.methods.base import Adapter, method_presets
from clipadapt.metrics import ECE_BINS, calibration_gaps
from clipadapt.tasks.classification import RunResult, SplitChoice, evaluate

TASK = "domain_generalization"
#: Classes in ImageNet-1k, the size a source must have for the ``imagenet_classes`` mapping.
IMAGENET_NUM_CLASSES = 1000
#: The preset a method's paper evaluates domain generalisation with (HeGraphAdapter: its text
#: classifier only, (T)); :func:`evaluate_dg` applies it unless told not to.
PAPER_VARIANT_PRESET = "domain_generalization"

log = logging.getLogger(__name__)


def _norm(name: str) -> str:
    return " ".join(name.lower().replace("_", " ").replace("-", " ").split())


def _json_list(metadata: Mapping[str, object], key: str, where: str) -> list | None:
    raw = metadata.get(key)
    if raw is None:
        return None
    try:
        value = json.loads(raw) if isinstance(raw, str) else list(raw)  # type: ignore[call-overload]
    except (json.JSONDecodeError, TypeError):
        value = None
    if not isinstance(value, list):
        raise ConfigError(f"{where}: metadata `{key}` must be a JSON list")
    return value


def class_mapping(
    source_classnames: Sequence[str],
    target: FeatureBundle,
    source_metadata: Mapping[str, object] | None = None,
) -> tuple[Tensor, str]:
    """Source class index of every target class, and which rule mapped them.

    Args:
        source_classnames: the C_source class names the adapter was fitted on.
        target: the target bundle (``C_target`` <= ``C_source`` classes).
        source_metadata: the source bundle's metadata (its ``wnids``), when known.

    Returns:
        ((C_target,) int64 tensor, rule), rule one of ``"source_classes"``, ``"wnids"``,
        ``"imagenet_classes"``, ``"names"`` (see the module docstring for the order).

    Raises:
        ConfigError: a target class has no source class (the message names a few), or a
            mapping in the metadata is malformed.
    """
    n_source = len(source_classnames)
    source_metadata = source_metadata or {}
    n_target = target.num_classes

    def checked(index: list, key: str) -> Tensor:
        if len(index) != n_target or not all(
            isinstance(i, int) and not isinstance(i, bool) and 0 <= i < n_source for i in index
        ):
            raise ConfigError(
                f"{target.where}: `{key}` must list {n_target} source class indices in "
                f"[0, {n_source})"
            )
        return torch.tensor(index, dtype=torch.long)

    explicit = _json_list(target.metadata, "source_classes", target.where)
    if explicit is not None:
        return checked(explicit, "source_classes"), "source_classes"
    target_wnids = _json_list(target.metadata, "wnids", target.where)
    source_wnids = _json_list(source_metadata, "wnids", "the source bundle")
    if target_wnids is not None and len(target_wnids) != n_target:
        raise ConfigError(
            f"{target.where}: metadata `wnids` has {len(target_wnids)} entries for "
            f"{n_target} classes"
        )
    if target_wnids is not None and source_wnids is not None:
        position = {w: i for i, w in enumerate(source_wnids)}
        missing = [w for w in target_wnids if w not in position]
        if missing:
            raise ConfigError(
                f"{target.where}: {len(missing)} target class(es) are not source classes "
                f"(WNIDs {', '.join(map(str, missing[:3]))}); the source bundle holds "
                f"{len(source_wnids)} ImageNet classes"
            )
        return torch.tensor([position[w] for w in target_wnids], dtype=torch.long), "wnids"
    imagenet = _json_list(target.metadata, "imagenet_classes", target.where)
    if imagenet is not None and source_wnids is None and n_source == IMAGENET_NUM_CLASSES:
        index = checked(imagenet, "imagenet_classes")
        agree = sum(
            _norm(source_classnames[int(i)]) == _norm(name)
            for i, name in zip(index.tolist(), target.classnames, strict=True)
        )
        if not source_classnames[0].startswith("class_") and agree < n_target / 2:
            # different name lists are legal; a mostly different one hints at another order
            log.warning(
                "%s: only %d of %d mapped class names match the source's; check that the "
                "source's columns are in ImageNet class-index order",
                target.where, agree, n_target,
            )  # fmt: skip
        return index, "imagenet_classes"
    position = {_norm(n): i for i, n in enumerate(source_classnames)}
    index, missing = [], []
    for name in target.classnames:
        i = position.get(_norm(name))
        if i is None:
            missing.append(name)
        index.append(-1 if i is None else i)
    if missing:
        hint = "add a `source_classes` index list to its metadata"
        if imagenet is not None:
            hint = (
                "its `imagenet_classes` map it onto a complete 1000-class ImageNet source, or "
                "give the source bundle `wnids` metadata "
                "(clipadapt.data.imagenet_variants.add_bundle_metadata)"
            )
        raise ConfigError(
            f"{target.where}: {len(missing)} target class(es) are not source classes "
            f"(e.g. {', '.join(missing[:3])}); {hint}"
        )
    return torch.tensor(index, dtype=torch.long), "names"


def class_subset(
    source_classnames: Sequence[str],
    target: FeatureBundle,
    source_metadata: Mapping[str, object] | None = None,
) -> Tensor:
    """Source class index of every target class (see :func:`class_mapping`).

    Args:
        source_classnames: the C_source class names the adapter was fitted on.
        target: the target bundle (``C_target`` <= ``C_source`` classes).
        source_metadata: the source bundle's metadata (for ``wnids``), when known.

    Returns:
        (C_target,) int64 tensor; column ``j`` of the target's logits is source column
        ``index[j]``.

    Raises:
        ConfigError: a target class has no source class (the message names a few), or the
            mapping metadata is malformed.
    """
    return class_mapping(source_classnames, target, source_metadata)[0]


def subset_accuracy(
    method: Adapter, features: Tensor, labels: Tensor, index: Tensor, batch_size: int = 8192
) -> float:
    """Accuracy (%) of ``method`` restricted to the source columns ``index``.

    Args:
        method: a fitted adapter with C_source outputs.
        features: (N, D) target features; labels: (N,) target class indices in [0, C_target).
        index: (C_target,) source column of each target class (see :func:`class_subset`).
    """
    return subset_scores(method, features, labels, index, batch_size)[0]


def subset_scores(
    method: Adapter, features: Tensor, labels: Tensor, index: Tensor, batch_size: int = 8192
) -> tuple[float, float]:
    """(accuracy %, expected calibration error %) of ``method`` restricted to the source
    columns ``index`` (the softmax is over those columns: the target's classes); arguments as
    in :func:`subset_accuracy`."""
    correct = 0
    gaps = torch.zeros(ECE_BINS)
    for start in range(0, features.shape[0], batch_size):
        logits = method.logits(features[start : start + batch_size])
        sub = logits[:, index.to(logits.device)]
        batch_labels = labels[start : start + batch_size].to(sub.device)
        correct += int((sub.argmax(dim=1) == batch_labels).sum())
        gaps += calibration_gaps(sub, batch_labels).cpu()
    n = max(int(features.shape[0]), 1)
    return 100.0 * correct / n, float(gaps.abs().sum() / n * 100.0)


def evaluate_dg(
    method: Adapter,
    source: FeatureBundle,
    targets: Sequence[FeatureBundle],
    shots: int | None = 16,
    seed: int = 1,
    choice: SplitChoice | None = None,
    target_eval_set: str = "test",
    text_encoder: object | None = None,
    device: str | torch.device = "cpu",
    paper_variant: bool = True,
) -> list[dict[str, Any]]:
    """Fit a clone of ``method`` on ``source`` (one few-shot draw); score it on the source and
    each target (``method`` itself is left unfitted, as by ``evaluate``).

    A method whose paper evaluates domain generalisation with another variant than its default
    has a ``domain_generalization`` preset (HeGraphAdapter: ``classifier=text``, the paper's
    HeGraphAdapter(T)); with ``paper_variant`` it is applied on top of ``method``'s options and
    named in every record's ``variant``.

    Args:
        method: the adapter to run.
        source: the source bundle (ImageNet in the papers).
        targets: target bundles sharing the source's classes or a subset of them.
        shots, seed, choice: the source run, as in :func:`clipadapt.tasks.classification.evaluate`.
        target_eval_set: the group scored on every target (default ``test``).
        text_encoder, device: as in ``evaluate``.
        paper_variant: apply the method's ``domain_generalization`` preset (False: run
            ``method`` exactly as given).

    Returns:
        One record per dataset (source first): the source's :class:`RunResult` fields with
        ``task`` = "domain_generalization", ``role`` ("source"/"target"), ``source`` (the source
        dataset's name), ``dataset``, ``accuracy`` and ``ece`` of that dataset, ``n_classes`` and
        ``variant`` (the preset applied, or None); a target's record also names the
        ``class_mapping`` rule that mapped its classes.
    """
    choice = choice or SplitChoice()
    # fail before fitting
    mappings = [class_mapping(source.classnames, t, source.metadata) for t in targets]
    variant = method_presets(method.card.name).get(PAPER_VARIANT_PRESET) if paper_variant else None
    if variant:
        method = method.clone().set_params(**variant)
    result: RunResult = evaluate(
        method,
        source,
        shots=shots,
        seed=seed,
        choice=choice,
        text_encoder=text_encoder,
        device=device,
    )
    base = {
        **result.to_dict(),
        "task": TASK,
        "source": source.name,
        "variant": f"preset {PAPER_VARIANT_PRESET}: {variant}" if variant else None,
    }
    records = [{**base, "role": "source", "n_classes": source.num_classes}]
    for target, (index, rule) in zip(targets, mappings, strict=True):
        rows = target.group(target_eval_set, "eval")
        started = time.perf_counter()
        with torch.no_grad():
            accuracy, ece = subset_scores(
                result.fitted, rows.features.to(device), rows.labels, index
            )
        records.append(
            {
                **base,
                "role": "target",
                "dataset": target.name,
                "accuracy": accuracy,
                "ece": ece,
                "eval_set": target_eval_set,
                "n_eval": len(rows),
                "n_classes": target.num_classes,
                "class_mapping": rule,
                "predict_seconds": time.perf_counter() - started,
            }
        )
    return records
