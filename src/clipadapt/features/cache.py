"""On-disk feature cache: safetensors shards plus a JSON manifest per (backbone, dataset, split).

Layout: ``<cache>/<backbone>/<dataset>/<split>-<hash8>/{manifest.json, shard-00000.safetensors...}``
where the hash covers everything that changes the features (backbone and checkpoint hash, the
items, the transform and its views, the extractor version). Shards are written atomically and
recorded in the manifest with their sha256 after they are complete; a shard whose checksum does not
match is re-extracted, never used.

Each shard also records a hash of its image files' stamps (size and modification time; with the
``content`` fingerprint also their sha256). A shard whose files changed since it was written
(images overwritten, or another folder of the same name and file names) is re-encoded, and the
extraction says how many images that was.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save
from torch import Tensor

from clipadapt._utils import (
    atomic_write_bytes,
    atomic_write_json,
    remove_stale_temporaries,
    safe_name,
    sha256_file,
    stable_hash,
)

log = logging.getLogger(__name__)

#: 2: shards record their files' stamps (older caches are not read)
EXTRACTOR_VERSION = 2
MANIFEST = "manifest.json"


CACHE_ENV = "CLIPADAPT_CACHE"


def default_cache_dir() -> Path:
    """The one cache root of clipadapt (features, text features, splits of read-only folders).

    ``$CLIPADAPT_CACHE`` when set, else ``$XDG_CACHE_HOME/clipadapt``, else
    ``~/.cache/clipadapt``. ``--cache-dir`` (or ``cache_dir=``) overrides it where offered.
    """
    import os

    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "clipadapt"


@dataclass
class ShardRecord:
    file: str
    sha256: str
    kept: int
    skipped: list[dict[str, Any]] = field(default_factory=list)


class SplitCache:
    """The cache folder of one (backbone, dataset, split, transform) key."""

    def __init__(self, root: Path, backbone: str, dataset: str, split: str, key: dict[str, Any]):
        self.key = dict(key, extractor_version=EXTRACTOR_VERSION)
        self.hash = stable_hash(self.key)
        self.dir = (
            Path(root)
            / safe_name(backbone)
            / safe_name(dataset)
            / f"{safe_name(split)}-{self.hash[:8]}"
        )
        self.manifest_path = self.dir / MANIFEST
        self.manifest = self._read_manifest()
        self._files: list[dict[str, str]] | None = None
        #: shards found stale because their image files changed since they were written
        self.changed: set[int] = set()
        remove_stale_temporaries(self.dir)

    def _read_manifest(self) -> dict[str, Any]:
        if self.manifest_path.is_file():
            try:
                manifest = json.loads(self.manifest_path.read_text(encoding="utf-8"))
                if manifest.get("hash") == self.hash:
                    return manifest
                log.warning("%s belongs to another key; starting afresh", self.manifest_path)
            except (json.JSONDecodeError, OSError) as error:
                log.warning(
                    "unreadable cache manifest %s (%s); starting afresh", self.manifest_path, error
                )
        return {"hash": self.hash, "key": self.key, "shards": {}}

    def configure(
        self, num_items: int, shard_size: int, stamps: dict[str, list[str]] | None = None
    ) -> None:
        """Set the item count and shard size (a change starts afresh) and the items' file
        stamps: ``{"stat": [...]}``, plus ``"content": [...]`` in content mode, one per item.
        A recorded shard whose files' stamps differ is stale (:attr:`changed`)."""
        if (
            self.manifest.get("num_items") != num_items
            or self.manifest.get("shard_size") != shard_size
        ):
            self.manifest.update(num_items=num_items, shard_size=shard_size, shards={})
        self._files = None
        self.changed = set()
        if stamps is not None:
            self._files = [
                {
                    kind: stable_hash([values[i] for i in self.shard_range(s)])
                    for kind, values in stamps.items()
                }
                for s in range(self.num_shards)
            ]

    @property
    def num_shards(self) -> int:
        n, size = self.manifest["num_items"], self.manifest["shard_size"]
        return (n + size - 1) // size

    def shard_range(self, shard: int) -> range:
        size = self.manifest["shard_size"]
        return range(shard * size, min((shard + 1) * size, self.manifest["num_items"]))

    def shard_valid(self, shard: int) -> bool:
        """True when the shard is recorded and its file matches the recorded checksum."""
        record = self.manifest["shards"].get(str(shard))
        if record is None:
            return False
        path = self.dir / record["file"]
        if not path.is_file():
            return False
        if sha256_file(path) != record["sha256"]:
            log.warning("cache shard %s does not match its checksum; re-extracting it", path)
            return False
        if self._files is not None:
            current, recorded = self._files[shard], record.get("files") or {}
            # content mode compares the files' bytes, so a copy with new modification times
            # is still a hit (its stat stamp is brought up to date); stat mode compares sizes
            # and modification times
            kind = "content" if "content" in current else "stat"
            if recorded.get(kind) != current[kind]:
                self.changed.add(shard)
                return False
            if recorded != current:
                record["files"] = dict(current)
                self._restamped = True
        return True

    def missing_shards(self) -> list[int]:
        """Shards to encode: not recorded, damaged, or whose image files changed."""
        self._restamped = False
        missing = [s for s in range(self.num_shards) if not self.shard_valid(s)]
        if self._restamped:
            atomic_write_json(self.manifest_path, self.manifest)
        return missing

    def write_shard(self, shard: int, features: Tensor, index: Tensor, skipped: list[dict]) -> None:
        name = f"shard-{shard:05d}.safetensors"
        path = self.dir / name
        # serialised in memory (a shard is small) and written through our own temporary file:
        # safetensors' file writer leaves a temporary of its own behind when the process is killed
        atomic_write_bytes(
            path, save({"features": features.contiguous(), "index": index.contiguous()})
        )
        self.manifest["shards"][str(shard)] = {
            "file": name,
            "sha256": sha256_file(path),
            "kept": int(index.numel()),
            "skipped": skipped,
            "files": dict(self._files[shard]) if self._files is not None else {},
        }
        self.manifest["complete"] = len(self.manifest["shards"]) == self.num_shards
        atomic_write_json(self.manifest_path, self.manifest)

    def read(self) -> tuple[Tensor, Tensor, list[dict]]:
        """All shards concatenated: (features, kept item indices, skipped records)."""
        feats, index, skipped = [], [], []
        for shard in range(self.num_shards):
            record = self.manifest["shards"][str(shard)]
            tensors = load_file(str(self.dir / record["file"]))
            feats.append(tensors["features"])
            index.append(tensors["index"])
            skipped.extend(record.get("skipped", []))
        dim_axis = feats[0].ndim - 2  # views are (V, n, D): concatenate along n
        return torch.cat(feats, dim=dim_axis), torch.cat(index), skipped


class TextCache:
    """Cached text features for a list of prompts, keyed by backbone and the prompts."""

    def __init__(self, root: Path, backbone: str, backbone_key: dict[str, Any]):
        self.dir = Path(root) / safe_name(backbone) / "text"
        self.backbone_key = backbone_key
        remove_stale_temporaries(self.dir)

    def get(self, prompts: list[str], encode: Any) -> Tensor:
        key = stable_hash(
            {"backbone": self.backbone_key, "prompts": prompts, "v": EXTRACTOR_VERSION}
        )
        path = self.dir / f"{key}.safetensors"
        if path.is_file():
            try:
                with safe_open(str(path), framework="pt") as handle:
                    recorded = (handle.metadata() or {}).get("sha256")
                    cached = handle.get_tensor("features")
                # a file that parses can still hold flipped bits: the checksum of the tensor
                # bytes, stored beside them, decides
                if recorded == _tensor_sha256(cached):
                    return cached.float()
                log.warning("text cache %s does not match its checksum; re-encoding", path)
            except Exception as error:  # a damaged file is recomputed, never trusted
                log.warning("unreadable text cache %s (%s); re-encoding", path, error)
        features = encode(prompts).to(torch.float16).contiguous()
        atomic_write_bytes(
            path, save({"features": features}, metadata={"sha256": _tensor_sha256(features)})
        )
        return features.float()


def _tensor_sha256(tensor: Tensor) -> str:
    return hashlib.sha256(tensor.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()
