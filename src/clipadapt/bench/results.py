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
    """Append one JSON line and fsync, so a killed sweep never leaves a torn line behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    line = json.dumps(record, sort_keys=True, default=str) + "\n"
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(line)
        handle.flush()
        os.fsync(handle.fileno())


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
