"""Small helpers shared across the package (atomic writes, hashing, names, seeds)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def safe_name(name: str) -> str:
    """Turn a user-facing name (backbone, dataset) into a file-system friendly one."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-") or "unnamed"


def clean_name(name: str) -> str:
    """Normalise a user-typed registry name: lower case, '-' and spaces become '_'."""
    return re.sub(r"[-\s]+", "_", name.strip().lower())


def fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path in the target folder; rename it onto ``path`` on success.

    A crash or an exception leaves the old file (if any) untouched and no partial file behind.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp_path, path)
        fsync_dir(path.parent)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` to ``path`` atomically (temporary file + rename)."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temporary file + rename)."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def remove_stale_temporaries(directory: str | os.PathLike[str], min_age_s: float = 3600.0) -> int:
    """Delete temporary files that killed writes left in ``directory``; returns how many.

    Matches this module's ``.<name>.<random>.tmp`` files and the ``.tmp<random>`` files that
    safetensors' own writer creates. Only files older than ``min_age_s`` go, so a write that
    another process has in flight right now is never touched.
    """
    directory = Path(directory)
    if not directory.is_dir():
        return 0
    now, removed = time.time(), 0
    for entry in directory.iterdir():
        name = entry.name
        if not (name.startswith(".") and (name.endswith(".tmp") or name.startswith(".tmp"))):
            continue
        try:
            if entry.is_file() and now - entry.stat().st_mtime >= min_age_s:
                entry.unlink()
                removed += 1
        except OSError:  # gone already, or not ours to delete: leave it
            continue
    return removed


def atomic_write_json(path: str | os.PathLike[str], obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def stable_hash(obj: Any, length: int = 16) -> str:
    """A short hash of a JSON-serialisable object, independent of dict order."""
    text = json.dumps(obj, sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:length]
