"""The append-only JSONL results store: one line per run, flushed and fsynced."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from clipadapt._utils import stable_hash

log = logging.getLogger(__name__)

#: Version 2 of the resume key: it adds what changes a result beyond what was asked by name.
RUN_KEY_VERSION = 2

RUN_KEY_FIELDS = (
    "task",
    "dataset",
    "backbone",
    "method",
    "method_params",
    "shots",
    "seed",
    "train_set",
    "val_set",
    "eval_set",
    "dataset_fingerprint",
    "bundle_fingerprint",
    "episodes_fingerprint",
)
"""What a run id hashes: the task, dataset and backbone names, the method with every
hyperparameter it resolves to (options, preset and defaults), shots, seed, the train / val /
eval groups, the image files' fingerprint, the bundle's content hash and the episode file's
content hash. A domain-generalisation run adds its source and the content hash of the bundle it
is scored on."""

#: The fields of the version-1 key (clipadapt 0.1.0): no fingerprints, options as typed.
LEGACY_RUN_KEY_FIELDS = (
    "task",
    "dataset",
    "backbone",
    "method",
    "params",
    "shots",
    "seed",
    "train_set",
    "val_set",
    "eval_set",
)


def run_id(cell: dict[str, Any]) -> str:
    """A stable id of a grid cell (what was asked and what it was asked of, not what came out).

    See :data:`RUN_KEY_FIELDS`. Results written with the version-1 key (no ``key_version`` in
    the record) are never resumed by it: the runs go again and :func:`latest_ok` prefers the new
    lines.
    """
    key: dict[str, Any] = {k: cell.get(k) for k in RUN_KEY_FIELDS}
    key["key_version"] = RUN_KEY_VERSION
    if cell.get("task") == "domain_generalization":
        key["source"] = cell.get("source")
        key["scored_on"] = cell.get("scored_on")
    return stable_hash(key)


def legacy_run_id(cell: dict[str, Any]) -> str:
    """The version-1 run id of the same cell (what clipadapt 0.1.0 wrote), so a new line can
    stand in for an old line of the same run in tables."""
    key = {k: cell.get(k) for k in LEGACY_RUN_KEY_FIELDS}
    if cell.get("source") is not None and cell.get("task") == "domain_generalization":
        key["source"] = cell["source"]
    return stable_hash(key)


def is_legacy(record: dict[str, Any]) -> bool:
    """True for a record written with the version-1 resume key."""
    return "run_id" in record and record.get("key_version") is None


def append_result(path: str | Path, record: dict[str, Any]) -> None:
    """Append one JSON line and fsync, so a killed sweep never leaves a torn line in the middle.

    The line goes out in one ``write`` on an ``O_APPEND`` descriptor. A kill can still cut that
    write short (Linux stops a write between pages when a fatal signal is pending, and records
    are longer than a page), leaving an unterminated last line: a record that never finished,
    which the reader skips and which is cut off here before appending, so the new line cannot
    be glued onto it. A write that fails (disk full)
    is rolled back to the previous end of the file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = (json.dumps(record, sort_keys=True, default=str) + "\n").encode("utf-8")
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        end = _drop_torn_tail(fd, path)
        try:
            view = memoryview(data)
            while view:  # one write for any real record; the loop only covers a short write
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        except OSError:
            os.ftruncate(fd, end)
            raise
    finally:
        os.close(fd)


def _drop_torn_tail(fd: int, path: Path) -> int:
    """Cut an unterminated last line off the open file; return the new size."""
    size = os.fstat(fd).st_size
    if size == 0 or os.pread(fd, 1, size - 1) == b"\n":
        return size
    keep, pos = 0, size
    while pos > 0:
        start = max(0, pos - (1 << 16))
        found = os.pread(fd, pos - start, start).rfind(b"\n")
        if found >= 0:
            keep = start + found + 1
            break
        pos = start
    log.warning(
        "%s ends in a torn line (an interrupted write); removing %d bytes", path, size - keep
    )
    os.ftruncate(fd, keep)
    return keep


def read_results(path: str | Path) -> Iterator[dict[str, Any]]:
    """Yield the records of a results file, skipping a torn (partially written) last line."""
    path = Path(path)
    if not path.is_file():
        return
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            line = line.strip()
            if not line:
                continue
            try:
                yield json.loads(line)
            except json.JSONDecodeError:
                log.warning(
                    "%s:%d is not valid JSON (an interrupted write?); ignored", path, number
                )


def finished_ids(path: str | Path) -> set[str]:
    """Run ids with a ``status: ok`` line in ``path``."""
    return {
        r["run_id"] for r in read_results(path) if r.get("status", "ok") == "ok" and "run_id" in r
    }


def latest_ok(records: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """The ``status: ok`` records, keeping only the last line of each run id (a ``--rerun``
    appends a new line for the same run; tables use the newest).

    A line written with the version-1 key is dropped when a newer line of the same run exists
    (its ``legacy_run_id``): resuming an old file runs such cells again, and the tables then
    count the new line only.
    """
    keep: dict[str, dict[str, Any]] = {}
    anonymous: list[dict[str, Any]] = []
    for record in records:
        if record.get("status", "ok") != "ok":
            continue
        if "run_id" in record:
            keep.pop(record["run_id"], None)
            keep[record["run_id"]] = record
        else:
            anonymous.append(record)
    superseded = {r["legacy_run_id"] for r in keep.values() if r.get("legacy_run_id")}
    kept = [r for r in keep.values() if not (is_legacy(r) and r["run_id"] in superseded)]
    return [*anonymous, *kept]


def legacy_ids(path: str | Path) -> set[str]:
    """The run ids of ``status: ok`` lines of ``path`` written with the version-1 key (never
    resumed by the current key)."""
    return {
        r["run_id"] for r in read_results(path) if r.get("status", "ok") == "ok" and is_legacy(r)
    }
