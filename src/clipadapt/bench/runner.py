"""Running sweeps: cells in, one fsynced JSON line per run out, resumable.

The bench is four small steps, one module each:

1. :mod:`clipadapt.bench.spec`: what the user asked (YAML file, ``--set``, flags);
2. :mod:`clipadapt.bench.resolve`: find or extract the bundles, list the cells and what is
   skipped (:class:`~clipadapt.bench.cells.Cell`, built only by
   :func:`~clipadapt.bench.cells.build_cell`);
3. :mod:`clipadapt.bench.execute`: run a cell through the task table, in this process, a
   process pool or Ray;
4. this module: :func:`run_cells` skips what is finished, writes what comes back (only the
   driver writes), so a killed sweep resumes where it stopped and a rerun of the same command
   skips finished runs (``rerun=True`` forces them).

:func:`run_sweep` does all four for a :class:`~clipadapt.bench.spec.SweepSpec`;
:func:`run_grid` runs methods × shots × seeds on one in-memory bundle. This module is the
bench's front door: the names a caller needs are importable from here (``__all__``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from clipadapt._progress import progress as progress_report
from clipadapt.bench.cells import BundleSource, Cell, Grid
from clipadapt.bench.execute import DEFAULT_SETTINGS, CellSettings, LocalExecutor, RayExecutor
from clipadapt.bench.resolve import ResolvedSweep, ResolveOptions, resolve_sweep
from clipadapt.bench.results import append_result, finished_ids, legacy_ids
from clipadapt.bench.spec import SweepSpec, load_sweep
from clipadapt.data.bundle import FeatureBundle
from clipadapt.exceptions import BundleError

__all__ = [
    "Cell",
    "CellSettings",
    "Grid",
    "LocalExecutor",
    "RayExecutor",
    "ResolveOptions",
    "ResolvedSweep",
    "SweepSpec",
    "check_inputs",
    "write_sweep_file",
    "load_sweep",
    "resolve_sweep",
    "run_cells",
    "run_grid",
    "run_sweep",
]

log = logging.getLogger(__name__)


def run_cells(
    cells: Sequence[Cell],
    out: str | Path | None,
    *,
    executor: LocalExecutor | RayExecutor | None = None,
    settings: CellSettings = DEFAULT_SETTINGS,
    rerun: bool = False,
    progress: bool = True,
    bundles: Mapping[str, FeatureBundle] | None = None,
    text_tower: object | None = None,
    on_record: Callable[[dict[str, Any]], None] | None = None,
) -> list[dict[str, Any]]:
    """Run the cells not yet finished in ``out`` and append their records (driver only).

    A cell is finished when every run it produces (``outputs``) has a ``status: ok`` line; a
    record whose run id is already there is never written twice.

    Args:
        cells: the cells (:func:`~clipadapt.bench.resolve.resolve_sweep`, :meth:`Grid.cells`).
        out: the results JSONL file (None: write nothing, resume nothing).
        executor: local (default, in process) or Ray.
        settings: device, TensorBoard folder, keep going on errors.
        bundles: already loaded bundles by key (in-memory bundles must be given here).
        text_tower: a text tower for in-process runs (else built from each cell's backbone).
        on_record: called with each record as it is written.

    Returns:
        The records of this call's runs (ok and error).
    """
    from clipadapt.encoders.clip import select_device

    select_device(settings.device)  # a device this machine lacks fails here, before any run
    executor = executor or LocalExecutor()
    done = set() if (rerun or out is None) else finished_ids(out)
    todo = [c for c in cells if not set(c.outputs) <= done]
    if len(todo) < len(cells):
        log.info(
            "%d of %d cells already in %s; skipping them", len(cells) - len(todo), len(cells), out
        )
    if out is not None and not rerun:
        legacy = legacy_ids(out)
        again = [c for c in todo if set(c.legacy_outputs) & legacy]
        if again:
            log.warning(
                "%d cell(s) of this sweep have lines in %s written by an older clipadapt, whose "
                "resume key did not cover the bundle, dataset and episode-file fingerprints; "
                "they are not resumed and run again (the old lines stay; tables use the new ones)",
                len(again),
                out,
            )
    written: set[str] = set() if rerun else set(done)
    records: list[dict[str, Any]] = []
    bar = progress_report(len(todo), "bench", "cell", enabled=progress)
    try:
        for cell_records in executor.map(todo, settings, bundles, text_tower):
            for record in cell_records:
                if record.get("status") == "ok" and record["run_id"] in written:
                    continue
                if out is not None:
                    append_result(out, record)
                if record.get("status") == "ok":
                    written.add(record["run_id"])
                records.append(record)
                if on_record is not None:
                    on_record(record)
            last = cell_records[-1] if cell_records else {}
            bar.set_postfix_str(f"{last.get('dataset')} {last.get('method')} K={last.get('shots')}")
            bar.update(1)
    finally:
        bar.close()
    return records


def write_sweep_file(spec: SweepSpec, resolved: ResolvedSweep, out: str | Path) -> Path:
    """Save the resolved sweep beside the results (``<out>.sweep.json``): the spec, the cell
    count, what was skipped, the input warnings and each class-name list once (records carry
    only the hash of their class names)."""
    from clipadapt._utils import atomic_write_json

    out = Path(out)
    path = out.with_name(out.name + ".sweep.json")
    atomic_write_json(
        path,
        {
            "spec": spec.to_dict(),
            "cells": len(resolved.cells),
            "skipped": resolved.skipped,
            "warnings": resolved.warnings,
            "classnames": resolved.classnames,
        },
    )
    return path


def check_inputs(resolved: ResolvedSweep) -> None:
    """Refuse a sweep whose inputs would make runs fail, before any run.

    Raises:
        BundleError: naming the first problem (and how many more there are).
    """
    if not resolved.errors:
        return
    what, why = resolved.errors[0]
    more = len(resolved.errors) - 1
    tail = f" (and {more} more problem(s); `clipadapt bench --dry-run` lists them)" if more else ""
    raise BundleError(f"{what}: {why}{tail}; no run was started")


def run_grid(
    bundle: FeatureBundle,
    grid: Grid,
    out: str | Path | None,
    *,
    rerun: bool = False,
    progress: bool = True,
    text_encoder: object | None = None,
    device: str = "cpu",
    keep_going: bool = False,
) -> list[dict[str, Any]]:
    """Run every cell of ``grid`` on ``bundle`` not yet finished in ``out``, in this process.

    With ``keep_going`` a cell that fails with a user-facing error (e.g. a method needing a
    tensor the bundle lacks) is recorded with ``status: "error"`` and the grid continues.
    ``text_encoder`` is the text tower for methods that need it (default: built from the
    bundle's backbone record).

    Returns:
        The records of this call's runs.
    """
    source = BundleSource.of(bundle, choice=grid.choice)
    return run_cells(
        grid.cells(source),
        out,
        settings=CellSettings(device=device, keep_going=keep_going),
        rerun=rerun,
        progress=progress,
        bundles={source.key: bundle},
        text_tower=text_encoder,
    )


def run_sweep(
    spec: SweepSpec,
    out: str | Path,
    *,
    executor: LocalExecutor | RayExecutor | None = None,
    settings: CellSettings = DEFAULT_SETTINGS,
    rerun: bool = False,
    progress: bool = True,
    options: ResolveOptions | None = None,
) -> tuple[list[dict[str, Any]], ResolvedSweep]:
    """Resolve ``spec``, check its inputs, save it beside ``out`` (``<out>.sweep.json``, with
    the class names of its bundles) and run its cells.

    Returns:
        (records written by this call, the resolved sweep with its skipped list).

    Raises:
        BundleError: a bundle of the sweep cannot be used (:func:`check_inputs`); nothing ran.
        ConfigError: bad method options or a device this machine lacks; nothing ran.
    """
    resolved = resolve_sweep(spec, progress=progress, options=options)
    check_inputs(resolved)
    write_sweep_file(spec, resolved, out)
    records = run_cells(
        resolved.cells, out, executor=executor, settings=settings, rerun=rerun, progress=progress
    )
    return records, resolved
