"""The one training loop every trainable method uses, and what feeds it.

AdamW (or SGD) with a per-iteration cosine schedule and optional warmup, shuffling from a private
seeded generator, optional epoch selection on validation accuracy (optionally keeping the
untrained start), mixed precision on CUDA, and a loud stop when the loss stops being finite. A
method supplies only its loss for a batch of row indices; everything generic lives here:

- :class:`TrainConfig` and :class:`OptimizerParams`, the mixin that builds it from a method's
  hyperparameters (one ``_train_config()`` for every trainable method);
- :class:`ViewSampler`, the rows of each epoch when the training rows carry augmented views;
- :func:`train_loop`.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from clipadapt.exceptions import TrainingError

log = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    """Optimisation settings (the method's constructor maps its hyperparameters onto these).

    Attributes:
        epochs: passes over the training rows.
        batch_size: rows per step (the last, smaller batch is kept).
        lr: peak learning rate.
        weight_decay: decoupled weight decay (AdamW) or L2 (SGD).
        optimizer: "adamw", "adam" (weight decay as an L2 term, PyTorch's Adam) or "sgd".
        eps, betas: AdamW settings; momentum: SGD momentum.
        warmup_iters: iterations of warmup before the cosine schedule starts.
        warmup_lr: constant warmup learning rate (CoOp style); None means linear warmup to lr.
        select_on_val: keep the epoch with the best validation score (needs ``val_score``).
        keep_start: with ``select_on_val``, also score the untrained parameters before the first
            step and keep them when no epoch scores higher on validation data (the history's
            ``best_epoch`` is then -1).
        start_margin: with ``keep_start``, an epoch replaces the untrained start only when its
            validation score exceeds the start's by more than this (0: any higher score).
        patience: stop after this many epochs without validation improvement (None: never).
        seed: seeds the private generator used for shuffling.
        amp: autocast to bfloat16 on CUDA (ignored on CPU, where training stays float32).
        iters_per_epoch: when set, an epoch is this many batches taken as consecutive slices of
            a fresh permutation (CLAP's epoch over a pool of augmented views, which sees only a
            part of the pool); None means one pass over all rows.
        drop_last: drop the last, smaller batch of an epoch (Dassl's loader when there are at
            least ``batch_size`` rows); ignored when that would leave no batch.
        warmup_epochs: epochs of warmup (added to ``warmup_iters`` once the epoch length is
            known), as in Dassl's one constant warmup epoch at 1e-5.
        per_epoch_schedule: update the learning rate once per epoch (Dassl/CoOp), not per
            iteration (Tip-Adapter-F).
    """

    epochs: int = 20
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 0.01
    optimizer: str = "adamw"
    eps: float = 1e-8
    betas: tuple[float, float] = (0.9, 0.999)
    momentum: float = 0.9
    warmup_iters: int = 0
    warmup_lr: float | None = None
    select_on_val: bool = False
    keep_start: bool = False
    start_margin: float = 0.0
    patience: int | None = None
    seed: int = 1
    amp: bool = True
    iters_per_epoch: int | None = None
    drop_last: bool = False
    warmup_epochs: int = 0
    per_epoch_schedule: bool = False

    @classmethod
    def dassl_sgd(cls, **overrides: object) -> TrainConfig:
        """CoOp/Dassl's recipe: SGD with momentum, one constant warmup epoch, then a cosine
        schedule stepped per epoch. ``overrides`` set the remaining fields (epochs, lr, ...)."""
        return cls(**{**DASSL_SGD, **overrides})


#: CoOp/Dassl's optimiser recipe (CLIP-Adapter, CoOp and CLAP's ZS-LP train with it).
DASSL_SGD: Mapping[str, Any] = {"optimizer": "sgd", "warmup_epochs": 1, "per_epoch_schedule": True}

#: The hyperparameter names :meth:`OptimizerParams._train_config` reads from a method.
OPTIMIZER_PARAMS = (
    "epochs",
    "batch_size",
    "lr",
    "weight_decay",
    "eps",
    "momentum",
    "warmup_lr",
    "warmup_epochs",
    "select_on_val",
    "seed",
)


class OptimizerParams:
    """Mixin for methods trained by :func:`train_loop`: one ``_train_config()`` for all of them.

    A method's hyperparameters named like :class:`TrainConfig` fields (:data:`OPTIMIZER_PARAMS`:
    ``epochs``, ``batch_size``, ``lr``, ``weight_decay``, ``eps``, ``momentum``, ``warmup_lr``,
    ``warmup_epochs``, ``select_on_val``, ``seed``) are copied into the config as they are; the
    class attribute ``train_recipe`` holds the method's fixed settings (optimiser, warmup and
    schedule style, e.g. :data:`DASSL_SGD`); ``overrides`` carry what the method resolves at fit
    time (a searched learning rate, epochs from the shots, whether validation rows exist).
    Fields a method has no hyperparameter for keep :class:`TrainConfig`'s defaults.
    """

    train_recipe: ClassVar[Mapping[str, Any]] = {}

    def _train_config(self, **overrides: Any) -> TrainConfig:
        """The :class:`TrainConfig` of this method's hyperparameters, recipe and overrides."""
        names = {f.name for f in fields(TrainConfig)}
        unknown = sorted(set(self.train_recipe) - names)
        if unknown:
            raise TypeError(f"{type(self).__name__}.train_recipe names unknown fields {unknown}")
        from_params = {
            name: getattr(self, name)
            for name in OPTIMIZER_PARAMS
            if name not in overrides and getattr(self, name, None) is not None
        }
        return TrainConfig(**{**self.train_recipe, **from_params, **overrides})


_STEP_LIMIT: int | None = None


@contextlib.contextmanager
def limit_steps(steps: int | None) -> Iterator[None]:
    """Stop every :func:`train_loop` inside the block after ``steps`` optimiser steps.

    For benchmarks and profiling: the learning-rate schedule still spans the full configured
    run, so the first ``steps`` steps are exactly those of a complete fit (a per-step time or a
    comparison against another implementation of the same steps stays meaningful), but the
    model ends undertrained. ``None`` lifts the limit.
    """
    global _STEP_LIMIT
    if steps is not None and steps < 1:
        raise ValueError(f"limit_steps needs steps >= 1 or None, got {steps}")
    previous, _STEP_LIMIT = _STEP_LIMIT, steps
    try:
        yield
    finally:
        _STEP_LIMIT = previous


@dataclass
class TrainHistory:
    """Per-epoch record of a training run."""

    loss: list[float] = field(default_factory=list)
    val_score: list[float] = field(default_factory=list)
    best_epoch: int | None = None
    start_score: float | None = None
    steps: int = 0


def _fused_ok(params: list[nn.Parameter]) -> bool:
    # The fused (single-kernel) Adam/SGD step is ~6x faster than the multi-tensor one on CPU
    # for the 10M-parameter graph adapters and agrees with it to float rounding (2e-7 after 50
    # steps); it needs floating-point parameters on one CPU or CUDA device.
    devices = {p.device.type for p in params}
    return (
        len(devices) == 1
        and devices <= {"cpu", "cuda"}
        and all(p.is_floating_point() for p in params)
    )


def _make_optimizer(params: list[nn.Parameter], config: TrainConfig) -> torch.optim.Optimizer:
    if config.optimizer in ("adamw", "adam"):
        kind = torch.optim.AdamW if config.optimizer == "adamw" else torch.optim.Adam
        return kind(
            params,
            lr=config.lr,
            betas=config.betas,
            eps=config.eps,
            weight_decay=config.weight_decay,
            fused=_fused_ok(params) or None,
        )
    if config.optimizer == "sgd":
        # fused: one kernel per step; the multi-tensor step took 4 ms of CLIP-Adapter's 10.8 ms
        # step on 2 cores (stacked (4, 256, 1024) adapters), the fused one 0.3 ms
        return torch.optim.SGD(
            params,
            lr=config.lr,
            momentum=config.momentum,
            weight_decay=config.weight_decay,
            fused=_fused_ok(params) or None,
        )
    raise TrainingError(f"unknown optimizer {config.optimizer!r}; use 'adamw', 'adam' or 'sgd'")


def _lr_at(step: int, total: int, config: TrainConfig, warmup: int | None = None) -> float:
    """Learning rate at ``step`` of ``total`` (steps are epochs with ``per_epoch_schedule``)."""
    warmup = config.warmup_iters if warmup is None else warmup
    if step < warmup:
        if config.warmup_lr is not None:
            return config.warmup_lr
        return config.lr * (step + 1) / warmup
    span = max(total - warmup, 1)
    progress = (step - warmup) / span
    return 0.5 * config.lr * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def _epoch_batches(num_rows: int, config: TrainConfig) -> tuple[int, int]:
    """(batches per epoch, rows used per epoch) under ``iters_per_epoch`` / ``drop_last``."""
    if config.iters_per_epoch is not None:
        if config.iters_per_epoch <= 0:
            raise TrainingError(f"iters_per_epoch must be positive, got {config.iters_per_epoch}")
        rows = min(num_rows, config.iters_per_epoch * config.batch_size)
        return math.ceil(rows / config.batch_size), rows
    if config.drop_last and num_rows >= config.batch_size:
        full = num_rows // config.batch_size
        return full, full * config.batch_size
    return math.ceil(num_rows / config.batch_size), num_rows


def sample_view_rows(
    features: Tensor, views: Tensor | None, epoch: int, seed: int, offset: int = 0
) -> Tensor:
    """One stored augmented view per row for ``epoch`` (a fresh augmentation every epoch).

    The view of each row is drawn uniformly from a generator seeded by (seed, epoch), so a run
    is reproducible and independent of the global RNG.

    Args:
        features: (N, D) clean rows, returned unchanged when ``views`` is None.
        views: optional (V, N, D) augmented views of the same rows.
        epoch: epoch index; seed: the method's seed; offset: separates several samplers.

    Returns:
        (N, D) rows on the device of ``features``.
    """
    if views is None:
        return features
    generator = torch.Generator(device="cpu")
    generator.manual_seed(int(seed) * 1_000_003 + 7919 * (epoch + 1) + offset)
    pick = torch.randint(views.shape[0], (views.shape[1],), generator=generator)
    rows = torch.arange(views.shape[1])
    return views[pick.to(views.device), rows.to(views.device)]


#: How :class:`ViewSampler` picks the stored view of each row for an epoch.
VIEW_MODES = ("random", "cycle")


class ViewSampler:
    """The training rows of every epoch: the clean rows, or one stored augmented view per row.

    Every method that trains on stored augmented views draws an epoch's rows here, once per
    epoch (not per batch), so a run sees a fresh augmentation every epoch, as the original
    implementations did with on-the-fly augmentation.

    Args:
        features: (N, D) clean rows, used for every epoch when ``views`` is None.
        views: optional (V, N, D) stored views of the same rows.
        seed: the method's seed (``"random"`` mode).
        mode: ``"random"``: each row's view drawn uniformly per epoch from a generator seeded
            by (seed, epoch) (:func:`sample_view_rows`); ``"cycle"``: every row uses view
            ``epoch % V``, the whole epoch from one view.
        prepare: optional function of the epoch's (N, D) rows whose result is cached instead
            of the rows (e.g. the rows together with their frozen zero-shot logits).

    Example:
        >>> sampler = ViewSampler(train.features, train.views, seed=1)  # doctest: +SKIP
        >>> rows = sampler(epoch)[index]  # doctest: +SKIP
    """

    def __init__(
        self,
        features: Tensor,
        views: Tensor | None,
        seed: int,
        mode: str = "random",
        prepare: Callable[[Tensor], Any] | None = None,
    ) -> None:
        if mode not in VIEW_MODES:
            raise ValueError(f"view sampling mode {mode!r} is not one of {', '.join(VIEW_MODES)}")
        self.features, self.views, self.seed = features, views, int(seed)
        self.mode, self.prepare = mode, prepare
        self._epoch: int | None = None
        self._value: Any = None

    def rows(self, epoch: int) -> Tensor:
        """(N, D) rows for ``epoch`` (not cached; :meth:`__call__` caches)."""
        if self.views is None:
            return self.features
        if self.mode == "cycle":
            return self.views[epoch % self.views.shape[0]]
        return sample_view_rows(self.features, self.views, epoch, self.seed)

    def __call__(self, epoch: int) -> Any:
        """The rows of ``epoch`` (or ``prepare(rows)``), computed once and kept for the epoch."""
        if self._epoch != epoch:
            self._value = None  # free the previous epoch's rows before drawing the next
            rows = self.rows(epoch)
            self._value = rows if self.prepare is None else self.prepare(rows)
            self._epoch = epoch
        return self._value


def train_loop(
    parameters: Iterable[nn.Parameter],
    batch_loss: Callable[[Tensor, int], Tensor],
    num_rows: int,
    config: TrainConfig,
    *,
    val_score: Callable[[], float] | None = None,
    device: torch.device | str = "cpu",
    on_epoch: Callable[[int, float, float | None], None] | None = None,
    what: str = "training",
) -> TrainHistory:
    """Optimise ``parameters`` to minimise ``batch_loss`` over shuffled mini-batches.

    Args:
        parameters: the trainable tensors (their values are updated in place).
        batch_loss: maps (row indices (B,) int64 on ``device``, epoch) to a scalar loss.
        num_rows: number of training rows indexed by ``batch_loss``.
        config: optimisation settings.
        val_score: returns a validation score (higher is better), called after each epoch when
            epoch selection or early stopping is on.
        device: where row indices are created.
        on_epoch: callback (epoch, mean loss, validation score or None), e.g. for TensorBoard.
        what: a name for messages ("tip_adapter_f training").

    Returns:
        A :class:`TrainHistory`. With ``select_on_val`` the parameters end at the best epoch
        (or at the untrained start with ``keep_start``, when no epoch beats it).

    Raises:
        TrainingError: the loss became NaN or Inf (the message names the learning rate).
    """
    params = [p for p in parameters if p.requires_grad]
    if not params:
        raise TrainingError(f"{what}: nothing to train (no parameter requires grad)")
    if num_rows <= 0:
        raise TrainingError(f"{what}: no training rows")
    start_state: list[Tensor] | None = None
    start_score: float | None = None
    if val_score is not None and config.select_on_val and config.keep_start:
        start_state = [p.detach().clone() for p in params]
        start_score = float(val_score())
    optimizer = _make_optimizer(params, config)
    generator = torch.Generator(device="cpu")
    generator.manual_seed(int(config.seed))
    iters_per_epoch, rows_per_epoch = _epoch_batches(num_rows, config)
    if config.per_epoch_schedule:
        total, warmup = config.epochs, config.warmup_iters + config.warmup_epochs
    else:
        total = config.epochs * iters_per_epoch
        warmup = config.warmup_iters + config.warmup_epochs * iters_per_epoch
    use_amp = config.amp and torch.device(device).type == "cuda"
    history = TrainHistory()
    best_state: list[Tensor] | None = None
    best_score = -math.inf
    stale = 0
    step = 0
    step_limit = _STEP_LIMIT
    for epoch in range(config.epochs):
        order = torch.randperm(num_rows, generator=generator)[:rows_per_epoch].to(device)
        running, count = 0.0, 0
        for start in range(0, rows_per_epoch, config.batch_size):
            lr = _lr_at(epoch if config.per_epoch_schedule else step, total, config, warmup)
            for group in optimizer.param_groups:
                group["lr"] = lr
            index = order[start : start + config.batch_size]
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_amp):
                loss = batch_loss(index, epoch)
            if not torch.isfinite(loss):
                raise TrainingError(
                    f"{what} diverged at epoch {epoch + 1}, step {step + 1} (loss {float(loss.detach())}); "
                    f"lower the learning rate (lr={config.lr:g}) or check the input features"
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            running += float(loss.detach()) * index.numel()
            count += index.numel()
            step += 1
            if step_limit is not None and step >= step_limit:
                break
        mean_loss = running / max(count, 1)
        history.loss.append(mean_loss)
        score = None
        if val_score is not None and (config.select_on_val or config.patience is not None):
            score = float(val_score())
            history.val_score.append(score)
            if score > best_score:
                best_score, stale = score, 0
                history.best_epoch = epoch
                if config.select_on_val:
                    best_state = [p.detach().clone() for p in params]
            else:
                stale += 1
        if on_epoch is not None:
            on_epoch(epoch, mean_loss, score)
        log.debug("%s epoch %d loss %.4f val %s", what, epoch + 1, mean_loss, score)
        if config.patience is not None and stale >= config.patience:
            break
        if step_limit is not None and step >= step_limit:
            break
    history.steps = step
    history.start_score = start_score
    best_val = max(history.val_score) if history.val_score else None
    if (
        start_score is not None
        and best_val is not None
        and start_score + config.start_margin >= best_val
    ):
        # no epoch beats the untrained start on validation data by more than the margin
        best_state, history.best_epoch = start_state, -1
    if best_state is not None:
        with torch.no_grad():
            for p, saved in zip(params, best_state, strict=True):
                p.copy_(saved)
    return history
