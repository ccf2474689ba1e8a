"""Training curves (loss and validation score per epoch) to TensorBoard, without touching methods.

Every trainable method trains through :func:`clipadapt.engine.train.train_loop`, which logs one
DEBUG record per epoch on the ``clipadapt.engine.train`` logger (``"%s epoch %d loss %.4f val
%s"`` with the run name, epoch, mean loss and validation score). :func:`training_curves` listens
to that logger for the duration of a ``with`` block and writes each epoch as TensorBoard scalars
``loss`` and ``val_score`` under one run folder, so no method has to pass an ``on_epoch`` callback.
Records of other levels still reach the usual handlers.

Several fits inside one block (a search that refits, a DG run) continue the step count, and each
``what`` (e.g. "tip_adapter_f training") gets its own tag prefix.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from clipadapt.exceptions import ConfigError

TRAIN_LOGGER = "clipadapt.engine.train"
_EPOCH_MESSAGE = "%s epoch %d loss %.4f val %s"


class _CurveHandler(logging.Handler):
    def __init__(self, log_dir: Path, forward_level: int, parent: logging.Logger) -> None:
        super().__init__(logging.DEBUG)
        self.log_dir = log_dir
        self.writer: Any = None  # created at the first epoch: training-free runs write nothing
        self.forward_level = forward_level
        self.parent = parent
        self.steps: dict[str, int] = {}
        self.epochs = 0

    def emit(self, record: logging.LogRecord) -> None:
        if (
            record.msg == _EPOCH_MESSAGE
            and isinstance(record.args, tuple)
            and len(record.args) == 4
        ):
            what, _epoch, loss, score = record.args
            if self.writer is None:
                self.writer = _summary_writer(self.log_dir)
            tag = str(what).replace(" ", "_")
            step = self.steps.get(tag, 0)
            self.writer.add_scalar(f"{tag}/loss", float(loss), step)
            if score is not None:
                self.writer.add_scalar(f"{tag}/val_score", float(score), step)
            self.steps[tag] = step + 1
            self.epochs += 1
        if record.levelno >= self.forward_level:
            self.parent.handle(record)


def _require_tensorboard() -> None:
    try:
        import torch.utils.tensorboard  # noqa: F401
    except ImportError:
        raise ConfigError(
            "--tensorboard needs the tensorboard package: pip install 'clipadapt[tensorboard]'"
        ) from None


def _summary_writer(log_dir: Path) -> Any:
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(log_dir=str(log_dir))


@contextlib.contextmanager
def training_curves(root: str | Path | None, run: str) -> Iterator[_CurveHandler | None]:
    """Log the epochs of every ``train_loop`` inside the block to ``<root>/<run>``.

    Args:
        root: the TensorBoard log folder (``tensorboard --logdir root``); None does nothing.
        run: the run's sub-folder, e.g. ``classification/imagenet/tip_adapter_f/16shot/seed1``.

    Yields:
        The handler (its ``epochs`` counts the epochs logged), or None when ``root`` is None.
        Runs without a training loop write no event file.

    Raises:
        ConfigError: ``root`` is given and the tensorboard package is missing.
    """
    if root is None:
        yield None
        return
    logger = logging.getLogger(TRAIN_LOGGER)
    _require_tensorboard()  # fail before the run, not at its first epoch
    old_level, old_propagate = logger.level, logger.propagate
    # Records above the previous effective level keep flowing to the parent handlers.
    forward = logger.getEffectiveLevel()
    handler = _CurveHandler(Path(root) / run, forward, logger.parent or logging.getLogger())
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
        logger.propagate = old_propagate
        if handler.writer is not None:
            handler.writer.flush()
            handler.writer.close()
