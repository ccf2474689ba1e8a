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

RUN_KEY_FIELDS = (
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
    """A stable id of a grid cell (what was asked, not what came out).

    Domain-generalisation runs add their ``source`` dataset to the key (other runs' ids are
    unchanged, so older results files keep resuming).
    """
    key = {k: cell.get(k) for k in RUN_KEY_FIELDS}
    if cell.get("source") is not None and cell.get("task") == "domain_generalization":
        key["source"] = cell["source"]
    return stable_hash(key)


def append_result(path: str | Path, record: dict[str, Any]) -> None:
    """Append one JSON line and fsync, so a killed sweep never leaves a torn line behind.

    The line goes out in one ``write`` on an ``O_APPEND`` descriptor. A tail without its newline
    (a write cut short by a crash or a full disk) is a record that never finished: it is cut off
    before appending, so the new line cannot be glued onto it. A write that fails (disk full)
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
    appends a new line for the same run; tables use the newest)."""
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
    return [*anonymous, *keep.values()]
