"""Domain generalisation: fit on a source dataset once, score unchanged on shifted targets.

The papers' protocol (CoOp, Tip-Adapter, HeGraphAdapter, NODE-Adapter): train on ImageNet
16-shot and evaluate the same model on ImageNet-V2 and -Sketch (all 1000 classes) and on
ImageNet-A and -R, which use 200-class subsets. For a subset target the adapter's
``C_source``-way logits are restricted to the target's classes and the argmax is taken over those
columns only (predicting over all source classes and mapping back is a different, harder task).

A target bundle's classes are mapped to the source's by, in order:

1. ``source_classes`` in the target bundle's metadata: a JSON list of source class indices, one
   per target class (the exact mapping, e.g. ImageNet-A's WNID positions);
2. the class names, compared after lower-casing and turning ``_``/``-`` into spaces.

The same code runs on the embedded world's style-shifted variants (``world_species_sketch`` ...,
``domain_of`` = ``world_species``), whose classes equal the source's.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from clipadapt.data.bundle import FeatureBundle
from clipadapt.exceptions import ConfigError
from clipadapt.methods.base import Adapter
from clipadapt.tasks.classification import RunResult, SplitChoice, evaluate

TASK = "domain_generalization"


def _norm(name: str) -> str:
    return " ".join(name.lower().replace("_", " ").replace("-", " ").split())


def class_subset(source_classnames: Sequence[str], target: FeatureBundle) -> Tensor:
    """Source class index of every target class.

    Args:
        source_classnames: the C_source class names the adapter was fitted on.
        target: the target bundle (``C_target`` <= ``C_source`` classes).

    Returns:
        (C_target,) int64 tensor; column ``j`` of the target's logits is source column
        ``index[j]``.

    Raises:
        ConfigError: a target class has no source class (the message names a few), or the
            ``source_classes`` metadata is malformed.
    """
    if "source_classes" in target.metadata:
        raw = target.metadata["source_classes"]
        index = json.loads(raw) if isinstance(raw, str) else list(raw)
        if len(index) != target.num_classes or not all(
            isinstance(i, int) and 0 <= i < len(source_classnames) for i in index
        ):
            raise ConfigError(
                f"{target.where}: `source_classes` must list {target.num_classes} source class "
                f"indices in [0, {len(source_classnames)})"
            )
        return torch.tensor(index, dtype=torch.long)
    position = {_norm(n): i for i, n in enumerate(source_classnames)}
    index, missing = [], []
    for name in target.classnames:
        i = position.get(_norm(name))
        if i is None:
            missing.append(name)
        index.append(-1 if i is None else i)
    if missing:
        raise ConfigError(
            f"{target.where}: {len(missing)} target class(es) are not source classes "
            f"(e.g. {', '.join(missing[:3])}); add a `source_classes` index list to its metadata"
        )
    return torch.tensor(index, dtype=torch.long)


def subset_accuracy(
    method: Adapter, features: Tensor, labels: Tensor, index: Tensor, batch_size: int = 8192
) -> float:
    """Accuracy (%) of ``method`` restricted to the source columns ``index``.

    Args:
        method: a fitted adapter with C_source outputs.
        features: (N, D) target features; labels: (N,) target class indices in [0, C_target).
        index: (C_target,) source column of each target class (see :func:`class_subset`).
    """
    correct = 0
    for start in range(0, features.shape[0], batch_size):
        logits = method.logits(features[start : start + batch_size])
        pred = logits[:, index.to(logits.device)].argmax(dim=1)
        correct += int((pred.cpu() == labels[start : start + batch_size].cpu()).sum())
    return 100.0 * correct / max(int(features.shape[0]), 1)


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
) -> list[dict[str, Any]]:
    """Fit a clone of ``method`` on ``source`` (one few-shot draw); score it on the source and
    each target (``method`` itself is left unfitted, as by ``evaluate``).

    Args:
        method: the adapter to run.
        source: the source bundle (ImageNet in the papers).
        targets: target bundles sharing the source's classes or a subset of them.
        shots, seed, choice: the source run, as in :func:`clipadapt.tasks.classification.evaluate`.
        target_eval_set: the group scored on every target (default ``test``).
        text_encoder, device: as in ``evaluate``.

    Returns:
        One record per dataset (source first): the source's :class:`RunResult` fields with
        ``task`` = "domain_generalization", ``role`` ("source"/"target"), ``source`` (the source
        dataset's name), ``dataset`` and ``accuracy`` of that dataset, and ``n_classes``.
    """
    choice = choice or SplitChoice()
    indices = [class_subset(source.classnames, t) for t in targets]  # fail before fitting
    result: RunResult = evaluate(
        method,
        source,
        shots=shots,
        seed=seed,
        choice=choice,
        text_encoder=text_encoder,
        device=device,
    )
    base = {**result.to_dict(), "task": TASK, "source": source.name}
    records = [{**base, "role": "source", "n_classes": source.num_classes}]
    for target, index in zip(targets, indices, strict=True):
        rows = target.group(target_eval_set, "eval")
        started = time.perf_counter()
        accuracy = subset_accuracy(result.fitted, rows.features.to(device), rows.labels, index)
        records.append(
            {
                **base,
                "role": "target",
                "dataset": target.name,
                "accuracy": accuracy,
                "eval_set": target_eval_set,
                "n_eval": len(rows),
                "n_classes": target.num_classes,
                "predict_seconds": time.perf_counter() - started,
            }
        )
    return records
