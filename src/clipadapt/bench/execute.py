"""Executing cells: one function per task (the task table), the records they return, and the
executors that run them in this process, in a process pool or on Ray.

:func:`execute_cell` is the only place a cell is run; it never writes files (the driver,
:func:`clipadapt.bench.runner.run_cells`, does). A method that needs the text tower (CoOp) gets
it from the cell's backbone record, built once per worker process through
:func:`clipadapt.features.pipeline.text_tower_for`.
"""

from __future__ import annotations

import logging
import platform
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass
from typing import Any

import torch

from clipadapt.bench.cells import (
    CLASSIFICATION,
    DOMAIN_GENERALIZATION,
    EPISODES,
    Cell,
)
from clipadapt.data.bundle import FeatureBundle
from clipadapt.data.classnames import load_named_bundle
from clipadapt.exceptions import ClipadaptError, ConfigError, MissingTensorError
from clipadapt.features.pipeline import needs_text_tower
from clipadapt.methods.base import Adapter, create_method

log = logging.getLogger(__name__)

Record = dict[str, Any]


@dataclass(frozen=True)
class CellSettings:
    """Per-sweep settings every cell sees (picklable, sent to workers).

    Attributes:
        device: where methods fit and predict (and where the text tower is built).
        tensorboard: a folder for training curves, or None.
        keep_going: record a failing cell with ``status: error`` and go on (else raise).
    """

    device: str = "cpu"
    tensorboard: str | None = None
    keep_going: bool = True


DEFAULT_SETTINGS = CellSettings()


# ----------------------------------------------------------------------------- records
def _versions() -> dict[str, str]:
    from clipadapt import __version__

    return {
        "clipadapt": __version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


def ok_record(cell: Cell, result: Mapping[str, Any], device: str, output: int = 0) -> Record:
    """A finished run: the cell's fields, the result's, ``status: ok``, versions and device.

    ``output`` is which of the cell's runs this is (DG: 0 the source, then each target): it
    picks the run id and the version-1 run id the record stands in for.
    """
    record = {**cell.describe(), **result, "status": "ok", "time": time.time()}
    record.update(
        versions=_versions(),
        device=device,
        method_spec=cell.method_spec,
        method_params=cell.method_params,
        run_id=cell.outputs[output],
        legacy_run_id=cell.legacy_outputs[output],
    )
    return record


def error_record(cell: Cell, error: BaseException) -> Record:
    """A run that failed with a user-facing error: the cell's fields, ``status: error`` and the
    message (the only builder of error records)."""
    return {**cell.describe(), "status": "error", "error": str(error), "time": time.time()}


def bundle_record(bundle: FeatureBundle) -> Record:
    """What a record says about the bundle a run used beyond its fingerprint: the hash of its
    class names (the names are stored once per sweep) and where its class text came from."""
    from clipadapt.features.pipeline import classnames_hash, text_provenance

    return {
        "classnames_sha256": classnames_hash(bundle.classnames),
        "text": text_provenance(bundle),
    }


# ----------------------------------------------------------------------------- task table
class _Context:
    """What a task function gets besides the cell: bundles (loaded once per process unless
    provided), the text tower when the method needs it, and the settings."""

    _CACHE: dict[str, FeatureBundle] = {}

    def __init__(
        self,
        cell: Cell,
        settings: CellSettings,
        bundles: Mapping[str, FeatureBundle] | None,
        text_tower: object | None,
    ) -> None:
        self.cell, self.settings, self.provided = cell, settings, bundles or {}
        self._tower = text_tower

    def bundle(self, key: str) -> FeatureBundle:
        if key in self.provided:
            return self.provided[key]
        if key.startswith("memory:"):
            raise ConfigError(f"bundle {key} was not handed to the executor (bundles=...)")
        if key not in self._CACHE:
            self._CACHE[key] = load_named_bundle(key)
        return self._CACHE[key]

    def text_tower(self) -> object | None:
        if self._tower is not None or not needs_text_tower(self.cell.method):
            return self._tower
        if self.cell.backbone_record is None:
            return None  # the method then says what it lacks
        from clipadapt.features.pipeline import text_tower_for

        return text_tower_for(self.cell.backbone_record, self.settings.device)

    def method(self) -> Adapter:
        return create_method(self.cell.method, **self.cell.params)


def _classification(ctx: _Context) -> list[Record]:
    from clipadapt.tasks.classification import evaluate

    cell, device = ctx.cell, ctx.settings.device
    bundle = ctx.bundle(cell.bundles[0])
    result = evaluate(
        ctx.method(), bundle, cell.shots, cell.seed, cell.choice, ctx.text_tower(), device
    )
    record = {
        **result.to_dict(),
        **bundle_record(bundle),
        "eval_bundle_fingerprint": cell.bundle_fingerprint,
    }
    return [ok_record(cell, record, device)]


def _domain_generalization(ctx: _Context) -> list[Record]:
    from clipadapt.tasks.classification import absent_classes
    from clipadapt.tasks.domain_generalization import evaluate_dg

    cell, device = ctx.cell, ctx.settings.device
    source, *targets = (ctx.bundle(key) for key in cell.bundles)
    results = evaluate_dg(
        ctx.method(),
        source,
        targets,
        cell.shots,
        cell.seed,
        cell.choice,
        target_eval_set=cell.target_eval_set or "test",
        text_encoder=ctx.text_tower(),
        device=device,
    )
    bundles = [source, *targets]
    scored_on = [cell.bundle_fingerprint, *cell.target_fingerprints]
    records = []
    for i, result in enumerate(results):
        extra = {**bundle_record(bundles[i]), "eval_bundle_fingerprint": scored_on[i]}
        if i > 0:  # a target: its own absent classes, not the source's
            target = bundles[i]
            rows = target.group(cell.target_eval_set or "test", "eval")
            absent = absent_classes(target.classnames, None, rows)
            extra["absent_classes"] = absent
            extra["warnings"] = (
                [
                    f"{len(absent['eval'])} class(es) have no row in {rows.name} of {target.name}: "
                    "the accuracy is over the other classes only"
                ]
                if absent
                else []
            )
        records.append(ok_record(cell, {**result, **extra}, device, output=i))
    return records


def _episodes(ctx: _Context) -> list[Record]:
    from clipadapt.tasks.episodes import evaluate_episodes, load_episodes

    cell, device = ctx.cell, ctx.settings.device
    result = evaluate_episodes(
        ctx.method, load_episodes(str(cell.episodes_file)), seed=cell.seed, device=device
    )
    return [ok_record(cell, result, device)]


#: task name -> the function that runs a cell of it and returns its records
TASKS: dict[str, Callable[[_Context], list[Record]]] = {
    CLASSIFICATION: _classification,
    DOMAIN_GENERALIZATION: _domain_generalization,
    EPISODES: _episodes,
}


def execute_cell(
    cell: Cell,
    settings: CellSettings = CellSettings(),
    bundles: Mapping[str, FeatureBundle] | None = None,
    text_tower: object | None = None,
) -> list[Record]:
    """Run one cell and return its records (one per dataset scored); never writes files.

    Args:
        cell: the cell.
        settings: device, TensorBoard folder, keep going on errors.
        bundles: bundle key -> an already loaded bundle (in-memory bundles, Ray's object
            store); other keys are read from disk once per process.
        text_tower: a text tower to use instead of building one from the cell's backbone
            record (in-process callers that already hold the encoder).

    Raises:
        ClipadaptError: the cell failed and ``settings.keep_going`` is False.
    """
    from clipadapt.bench.tensorboard import training_curves

    try:
        task = TASKS.get(cell.task)
        if task is None:
            raise ConfigError(f"unknown task {cell.task!r}; known: {', '.join(TASKS)}")
        with training_curves(settings.tensorboard, cell.label):
            return task(_Context(cell, settings, bundles, text_tower))
    except (ClipadaptError, MissingTensorError) as error:
        if not settings.keep_going:
            raise
        log.warning("%s failed on %s: %s", cell.method, cell.dataset, error)
        return [error_record(cell, error)]


# ----------------------------------------------------------------------------- executors
def _pool_init() -> None:
    # Several workers share few cores: one BLAS thread each avoids oversubscription.
    torch.set_num_threads(1)


def _needed(cell: Cell, bundles: Mapping[str, FeatureBundle] | None) -> dict[str, FeatureBundle]:
    return {k: bundles[k] for k in cell.bundles if bundles and k in bundles}


class LocalExecutor:
    """Run cells in this process (``workers=1``) or in a process pool of ``workers``."""

    def __init__(self, workers: int = 1) -> None:
        if workers < 1:
            raise ConfigError(f"workers must be at least 1, got {workers}")
        self.workers = workers

    def map(
        self,
        cells: Sequence[Cell],
        settings: CellSettings,
        bundles: Mapping[str, FeatureBundle] | None = None,
        text_tower: object | None = None,
    ) -> Iterator[list[Record]]:
        """Yield each cell's records as cells finish (order not guaranteed with a pool).

        ``bundles`` are used in process and sent to pool workers with the cells that need them;
        ``text_tower`` only serves in-process runs (workers build their own from the cell).
        """
        if self.workers == 1:
            for cell in cells:
                yield execute_cell(cell, settings, bundles, text_tower)
            return
        import multiprocessing

        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(self.workers, mp_context=context, initializer=_pool_init) as pool:
            pending = {
                pool.submit(execute_cell, cell, settings, _needed(cell, bundles)) for cell in cells
            }
            while pending:
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                for future in done:
                    yield future.result()


class RayExecutor:
    """Each cell a Ray task; bundles go through Ray's object store once per sweep.

    Args:
        address: an existing cluster ("auto", "ray://host:10001"); None starts a local instance.
        num_cpus: CPUs of the local instance (ignored with ``address``).
        cpus_per_task: CPUs reserved per cell.
    """

    def __init__(
        self, address: str | None = None, num_cpus: int | None = None, cpus_per_task: float = 1
    ) -> None:
        try:
            import ray  # noqa: F401
        except ImportError:
            raise ConfigError("the Ray executor needs Ray: pip install 'clipadapt[ray]'") from None
        self.address = address
        self.num_cpus = num_cpus
        self.cpus_per_task = cpus_per_task

    def map(
        self,
        cells: Sequence[Cell],
        settings: CellSettings,
        bundles: Mapping[str, FeatureBundle] | None = None,
        text_tower: object | None = None,
    ) -> Iterator[list[Record]]:
        """Yield each cell's records as Ray tasks finish (``text_tower`` is not sent: each
        worker process builds its own from the cell's backbone record)."""
        import ray

        started_here = not ray.is_initialized()
        if started_here:
            if self.address:
                ray.init(address=self.address, log_to_driver=False)
            else:
                ray.init(
                    num_cpus=self.num_cpus,
                    include_dashboard=False,
                    log_to_driver=False,
                    configure_logging=False,
                )
        try:
            task = ray.remote(num_cpus=self.cpus_per_task)(_ray_cell)
            refs: dict[str, Any] = {}
            pending = []
            for cell in cells:
                for key in cell.bundles:
                    if key not in refs:
                        provided = bundles.get(key) if bundles else None
                        refs[key] = ray.put(
                            provided if provided is not None else load_named_bundle(key)
                        )
                pending.append(
                    task.remote(
                        cell, settings, list(cell.bundles), *(refs[k] for k in cell.bundles)
                    )
                )
            while pending:
                done, pending = ray.wait(pending, num_returns=1)
                yield ray.get(done[0])
        finally:
            if started_here:
                ray.shutdown()


def _ray_cell(
    cell: Cell, settings: CellSettings, keys: list[str], *bundles: FeatureBundle
) -> list[Record]:
    torch.set_num_threads(1)
    return execute_cell(cell, settings, dict(zip(keys, bundles, strict=True)))
