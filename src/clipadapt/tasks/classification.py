"""Few-shot classification: pick the train/validation/evaluation rows, fit, score once."""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field, fields
from typing import Any

import torch

from clipadapt.data.bundle import FeatureBundle
from clipadapt.data.fewshot import draw_few_shot
from clipadapt.data.sets import EvaluationSet, LabeledFeatures, TrainSet, ValidationSet
from clipadapt.exceptions import ConfigError, MissingTensorError
from clipadapt.methods.base import Adapter


@dataclass
class RunResult:
    """One run's record (a line of ``results.jsonl``).

    ``fitted`` is the adapter :func:`evaluate` fitted (a clone of the method it was given); it
    is not part of the record (:meth:`to_dict` leaves it out).
    """

    method: str
    dataset: str
    shots: int | None
    seed: int
    accuracy: float
    hyperparameters: dict[str, Any]
    fit_seconds: float
    predict_seconds: float
    trainable_params: int
    backbone: str = "unknown"
    task: str = "classification"
    params: dict[str, Any] = field(default_factory=dict)
    train_set: str = ""
    val_set: str = ""
    eval_set: str = ""
    n_train: int = 0
    n_val: int = 0
    n_eval: int = 0
    fitted: Adapter | None = field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        """The record: every field except the fitted adapter."""
        return {
            f.name: copy.deepcopy(getattr(self, f.name)) for f in fields(self) if f.name != "fitted"
        }


@dataclass(frozen=True)
class SplitChoice:
    """Which bundle groups play train / validation / evaluation (None: the defaults)."""

    train_set: str | None = None
    val_set: str | None = None
    eval_set: str | None = None


def prepare_sets(
    bundle: FeatureBundle,
    shots: int | None,
    seed: int,
    choice: SplitChoice = SplitChoice(),
) -> tuple[TrainSet, ValidationSet | None, EvaluationSet]:
    """Resolve the rows of one run.

    Train: the ``choice.train_set`` group as is; else a pre-drawn ``train_{K}shot`` group; else K
    per class sampled from ``train`` with ``seed``. Validation: the ``choice.val_set`` group
    ("none" for no validation); else ``min(K, 4)`` per class sampled from ``val``; else carved
    from unused ``train`` rows. Evaluation: ``choice.eval_set`` or ``test``.
    """
    groups = bundle.groups()
    eval_name = choice.eval_set or "test"
    if eval_name not in groups:
        raise MissingTensorError(
            f"{bundle.where}: no evaluation group {eval_name!r}; pick one with --eval-set "
            f"(groups: {', '.join(groups)})"
        )
    for role, name in (("train", choice.train_set), ("val", choice.val_set)):
        if name is not None and name != "none" and name == eval_name:
            raise ConfigError(
                f"the {role} set and the evaluation set are both {name!r}; use disjoint groups"
            )
    evaluation = bundle.group(eval_name, "eval")
    val: LabeledFeatures | None = None
    if choice.train_set is not None:
        train = bundle.group(choice.train_set, "train")
    elif shots is not None and f"train_{shots}shot" in groups:
        train = bundle.group(f"train_{shots}shot", "train")
    elif "train" in groups:
        if shots is None:
            raise ConfigError("shots is required to sample from the `train` group (e.g. --shots 4)")
        pool = bundle.group("train", "train")
        has_val = "val" in groups and choice.val_set is None
        val_pool = bundle.group("val", "val") if has_val else None
        draw = draw_few_shot(
            pool.labels,
            shots,
            seed,
            num_classes=bundle.num_classes,
            val_labels=None if val_pool is None else val_pool.labels,
            carve_val_from_train=choice.val_set is None,
            classnames=bundle.classnames,
        )
        train = pool.subset(draw.train_index)
        train = TrainSet(train.features, train.labels, train.views, f"train_{shots}shot_seed{seed}")
        if draw.val_index is not None and choice.val_set is None:
            source = val_pool if draw.val_source == "val" else pool
            picked = source.subset(draw.val_index)
            val = ValidationSet(picked.features, picked.labels, None, f"{draw.val_source}_fewshot")
    else:
        available = ", ".join(sorted(bundle.shot_groups().values())) or "none"
        raise MissingTensorError(
            f"{bundle.where}: no `train_{shots}shot` group and no `train` group to sample from "
            f"(pre-drawn groups: {available}); pass --train-set or use shots that exist"
        )
    if choice.val_set is not None and choice.val_set != "none":
        val = bundle.group(choice.val_set, "val")
    elif choice.val_set is None and val is None and "val" in groups:
        k_val = min(shots, 4) if shots else 4
        pool = bundle.group("val", "val")
        draw = draw_few_shot(pool.labels, k_val, seed, num_classes=bundle.num_classes)
        picked = pool.subset(draw.train_index)
        val = ValidationSet(picked.features, picked.labels, None, "val_fewshot")
    return train, val, evaluation


def evaluate(
    method: Adapter,
    bundle: FeatureBundle,
    shots: int | None = None,
    seed: int = 1,
    choice: SplitChoice = SplitChoice(),
    text_encoder: object | None = None,
    device: str | torch.device = "cpu",
) -> RunResult:
    """Fit a clone of ``method`` on a few-shot draw of ``bundle``; score it once on the evaluation rows.

    ``method`` itself is left as it was (not fitted, hyperparameters unchanged): the run fits
    ``method.clone()`` with its ``seed`` set to ``seed``, and returns it as ``result.fitted``.

    Args:
        method: the method to run (its hyperparameters; any fitted state is ignored).
        bundle: the feature bundle.
        shots: K (needed unless ``choice.train_set`` names a group).
        seed: draw and method seed.
        choice: which bundle groups play train / validation / evaluation.
        text_encoder: the text tower, for methods that need it (CoOp).
        device: where to fit and predict.

    Returns:
        A :class:`RunResult` with the accuracy in percent and the fitted clone in ``fitted``.
    """
    train, val, evaluation = prepare_sets(bundle, shots, seed, choice)
    method = method.clone()
    if "seed" in method.get_params():
        method.set_params(seed=seed)
    text = bundle.text(text_encoder) if bundle.has_text() else None
    if text is None and method.card.needs_text:
        raise MissingTensorError(
            f"{method.card.name} needs `text_features`, which {bundle.where} lacks; image-only "
            "methods can still run on it (see `clipadapt list-methods`)"
        )
    method.fit(
        train.to(device),
        text,
        None if val is None else val.to(device),
        num_classes=None if text is not None else bundle.num_classes,
    )
    started = time.perf_counter()
    accuracy = method.score(evaluation.features.to(device), evaluation.labels.to(device))
    predict_seconds = time.perf_counter() - started
    return RunResult(
        method=method.card.name,
        dataset=bundle.name,
        shots=shots,
        seed=seed,
        accuracy=accuracy,
        hyperparameters=dict(method.best_params_),
        fit_seconds=float(method.fit_seconds_),
        predict_seconds=predict_seconds,
        trainable_params=method.num_trainable_params(),
        backbone=bundle.backbone,
        params=method.get_params(),
        train_set=train.name,
        val_set=val.name if val is not None else "none",
        eval_set=evaluation.name,
        n_train=len(train),
        n_val=len(val) if val is not None else 0,
        n_eval=len(evaluation),
        fitted=method,
    )
