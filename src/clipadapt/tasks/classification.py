"""Few-shot classification: pick the train/validation/evaluation rows, fit, score once."""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass, field, fields
from typing import Any

import torch

from clipadapt._utils import stable_hash
from clipadapt.data.bundle import FeatureBundle
from clipadapt.data.fewshot import draw_few_shot
from clipadapt.data.sets import EvaluationSet, LabeledFeatures, TrainSet, ValidationSet
from clipadapt.exceptions import ConfigError, MissingTensorError
from clipadapt.methods.base import Adapter
from clipadapt.metrics import expected_calibration_error

log = logging.getLogger(__name__)


@dataclass
class RunResult:
    """One run's record (a line of ``results.jsonl``).

    ``draw`` says how the train and validation rows were picked (the rule and a hash of the
    row indices), ``checkpoint`` which epoch a trained method kept and by which rule,
    ``absent_classes`` the classes with no row in the validation or evaluation set (the
    accuracy is then over the other classes), and ``warnings`` says so in words. ``ece`` is the
    expected calibration error (%, 15 bins, :func:`clipadapt.metrics.expected_calibration_error`)
    of the evaluation rows.

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
    draw: dict[str, Any] = field(default_factory=dict)
    checkpoint: dict[str, Any] | None = None
    absent_classes: dict[str, list[str]] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    ece: float | None = None
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


#: How :func:`prepare_run` samples K shots from the ``train`` group (and validation rows).
DRAW_RULE = (
    "draw_few_shot: classes in label order, for each random.Random(seed).sample of K of its "
    "`train` rows (rows sorted by index); then min(K, 4) per class from `val` with the same "
    "generator, or carved from the unused `train` rows when the bundle has no `val`"
)
#: How validation rows are sampled when the train group is fixed (a pre-drawn K-shot group).
VAL_DRAW_RULE = "draw_few_shot: min(K, 4) per class of `val`, random.Random(seed)"


@dataclass(frozen=True)
class RunSets:
    """The rows of one run and how they were picked (``draw``: rule and index hashes)."""

    train: TrainSet
    val: ValidationSet | None
    evaluation: EvaluationSet
    draw: dict[str, Any]


def _index_hash(index: torch.Tensor | None) -> str | None:
    return None if index is None else stable_hash(index.tolist())


def prepare_sets(
    bundle: FeatureBundle,
    shots: int | None,
    seed: int,
    choice: SplitChoice = SplitChoice(),
) -> tuple[TrainSet, ValidationSet | None, EvaluationSet]:
    """Resolve the rows of one run (see :func:`prepare_run`)."""
    sets = prepare_run(bundle, shots, seed, choice)
    return sets.train, sets.val, sets.evaluation


def prepare_run(
    bundle: FeatureBundle,
    shots: int | None,
    seed: int,
    choice: SplitChoice = SplitChoice(),
) -> RunSets:
    """Resolve the rows of one run and record how they were drawn.

    Train: the ``choice.train_set`` group as is; else a pre-drawn ``train_{K}shot`` group; else K
    per class sampled from ``train`` with ``seed``. Validation: the ``choice.val_set`` group
    ("none" for no validation); else ``min(K, 4)`` per class sampled from ``val``; else carved
    from unused ``train`` rows. Evaluation: ``choice.eval_set`` or ``test``.

    Raises:
        ConfigError: fewer than two classes, or overlapping train/val and evaluation groups.
        MissingTensorError: a group that does not exist.
    """
    if bundle.num_classes < 2:
        raise ConfigError(
            f"{bundle.where} has {bundle.num_classes} class(es) "
            f"({', '.join(bundle.classnames) or 'none'}): an accuracy over one class is 100 % "
            "by construction, so it is refused; a classifier needs at least 2 classes"
        )
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
    draw: dict[str, Any] = {}
    if choice.train_set is not None:
        train = bundle.group(choice.train_set, "train")
        draw["train"] = f"group {choice.train_set} as is"
    elif shots is not None and f"train_{shots}shot" in groups:
        train = bundle.group(f"train_{shots}shot", "train")
        draw["train"] = f"group train_{shots}shot as is"
    elif "train" in groups:
        if shots is None:
            raise ConfigError("shots is required to sample from the `train` group (e.g. --shots 4)")
        pool = bundle.group("train", "train")
        has_val = "val" in groups and choice.val_set is None
        val_pool = bundle.group("val", "val") if has_val else None
        sampled = draw_few_shot(
            pool.labels,
            shots,
            seed,
            num_classes=bundle.num_classes,
            val_labels=None if val_pool is None else val_pool.labels,
            carve_val_from_train=choice.val_set is None,
            classnames=bundle.classnames,
        )
        train = pool.subset(sampled.train_index)
        train = TrainSet(train.features, train.labels, train.views, f"train_{shots}shot_seed{seed}")
        draw.update(
            rule=DRAW_RULE,
            seed=seed,
            train_index_sha=_index_hash(sampled.train_index),
            val_source=sampled.val_source,
        )
        if draw["val_source"] != "none":
            draw["val_index_sha"] = _index_hash(sampled.val_index)
        if sampled.val_index is not None and choice.val_set is None:
            source = val_pool if sampled.val_source == "val" else pool
            picked = source.subset(sampled.val_index)
            val = ValidationSet(
                picked.features, picked.labels, None, f"{sampled.val_source}_fewshot"
            )
    else:
        available = ", ".join(sorted(bundle.shot_groups().values())) or "none"
        raise MissingTensorError(
            f"{bundle.where}: no `train_{shots}shot` group and no `train` group to sample from "
            f"(pre-drawn groups: {available}); pass --train-set or use shots that exist"
        )
    if choice.val_set is not None and choice.val_set != "none":
        val = bundle.group(choice.val_set, "val")
        draw["val"] = f"group {choice.val_set} as is"
    elif choice.val_set == "none":
        draw["val"] = "none"
    elif val is None and "val" in groups:
        k_val = min(shots, 4) if shots else 4
        pool = bundle.group("val", "val")
        sampled = draw_few_shot(pool.labels, k_val, seed, num_classes=bundle.num_classes)
        picked = pool.subset(sampled.train_index)
        val = ValidationSet(picked.features, picked.labels, None, "val_fewshot")
        draw.update(
            val=VAL_DRAW_RULE, val_seed=seed, val_index_sha=_index_hash(sampled.train_index)
        )
    return RunSets(train, val, evaluation, draw)  # type: ignore[arg-type]


def absent_classes(
    classnames: list[str], val: LabeledFeatures | None, evaluation: LabeledFeatures
) -> dict[str, list[str]]:
    """Classes with no row in the validation (when there is one) or evaluation set."""
    out: dict[str, list[str]] = {}
    for role, rows in (("val", val), ("eval", evaluation)):
        if rows is None or len(rows) == 0:
            continue
        counts = torch.bincount(rows.labels.cpu(), minlength=len(classnames))
        missing = [classnames[i] for i in torch.nonzero(counts == 0).flatten().tolist()]
        if missing:
            out[role] = missing
    return out


def _absent_warnings(absent: dict[str, list[str]], val_name: str, eval_name: str) -> list[str]:
    def names(values: list[str]) -> str:
        shown = ", ".join(values[:5])
        return shown + (f" and {len(values) - 5} more" if len(values) > 5 else "")

    out = []
    if "eval" in absent:
        out.append(
            f"{len(absent['eval'])} class(es) have no row in the evaluation set {eval_name} "
            f"({names(absent['eval'])}): the accuracy is over the other classes only"
        )
    if "val" in absent:
        out.append(
            f"{len(absent['val'])} class(es) have no row in the validation set {val_name} "
            f"({names(absent['val'])}): hyperparameters were chosen without them"
        )
    return out


def checkpoint_record(method: Adapter) -> dict[str, Any] | None:
    """Which epoch a trained method kept and by which rule (None for training-free methods).

    Read from what the method records: ``best_params_["epoch"]`` (with ``epoch_rule`` when it
    says) for methods that select an epoch on validation data, else the number of epochs it
    trained (``train_loss_`` or ``best_params_["epochs_run"]``): the last epoch is kept.
    """
    if not method.card.trainable:
        return None
    best = getattr(method, "best_params_", {}) or {}
    if "epoch" in best:
        record = {"rule": best.get("epoch_rule", "best validation score"), "epoch": best["epoch"]}
        if "epochs_run" in best:
            record["epochs_run"] = best["epochs_run"]
        return record
    losses = getattr(method, "train_loss_", None)
    if losses is not None:
        return {"rule": "last epoch (no selection)", "epoch": len(losses)}
    if "epochs_run" in best:
        return {"rule": "last epoch (no selection)", "epoch": best["epochs_run"]}
    return {"rule": "not recorded by the method", "epoch": None}


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
    sets = prepare_run(bundle, shots, seed, choice)
    train, val, evaluation = sets.train, sets.val, sets.evaluation
    absent = absent_classes(bundle.classnames, val, evaluation)
    warnings = _absent_warnings(absent, val.name if val is not None else "", evaluation.name)
    for warning in warnings:
        log.warning("%s on %s: %s", method.card.name, bundle.name, warning)
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
    with torch.no_grad():  # calibration is scored apart so predict_seconds stays a predict's
        ece = expected_calibration_error(
            method.logits(evaluation.features.to(device)), evaluation.labels
        )
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
        draw=sets.draw,
        checkpoint=checkpoint_record(method),
        absent_classes=absent,
        warnings=warnings,
        ece=ece,
        fitted=method,
    )
