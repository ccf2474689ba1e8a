"""Batched, resumable feature extraction from image datasets into a feature bundle.

Each split is encoded once per cache key (see :mod:`clipadapt.features.cache`); a rerun with the
same key encodes nothing. Images that cannot be decoded are skipped, listed in the manifest and
the bundle metadata, and reported: never a crash, never a silently smaller dataset.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from clipadapt._progress import progress as progress_report
from clipadapt._utils import stable_hash
from clipadapt.data.bundle import FeatureBundle, save_bundle
from clipadapt.data.datasets import check_fingerprint_mode
from clipadapt.exceptions import ConfigError
from clipadapt.features.cache import EXTRACTOR_VERSION, SplitCache, TextCache, default_cache_dir
from clipadapt.features.transforms import AugmentedViews, CleanView, load_rgb

log = logging.getLogger(__name__)


class _ImageRows(Dataset):
    """Decodes the images of some items; a failure becomes an error string, not an exception."""

    def __init__(self, paths: Sequence[str], keys: Sequence[str], transform: Any) -> None:
        self.paths, self.keys, self.transform = paths, keys, transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[int, Tensor | None, str | None]:
        try:
            image = load_rgb(self.paths[i])
            if isinstance(self.transform, AugmentedViews):
                return i, self.transform(image, self.keys[i]), None
            return i, self.transform(image), None
        except Exception as error:  # corrupt, truncated, not an image, unreadable
            return i, None, f"{type(error).__name__}: {error}"


def _collate(
    batch: list[tuple[int, Tensor | None, str | None]],
) -> tuple[Tensor, Tensor | None, list]:
    ok = [(i, x) for i, x, err in batch if x is not None]
    failed = [(i, err) for i, x, err in batch if x is None]
    index = torch.tensor([i for i, _ in ok], dtype=torch.long)
    images = torch.stack([x for _, x in ok]) if ok else None
    return index, images, failed


def _auto_workers(num_items: int, device: torch.device | str = "cpu") -> int:
    """Decoding processes for the DataLoader.

    On an accelerator the encoder leaves the cores free, so up to four decode in parallel. On
    the CPU they only help with cores that torch's own threads leave idle: with 2 cores and
    2 torch threads, ``extract_split`` over the extraction benchmark's 2048 world images ran
    at 600 images/s with ``num_workers=1`` and 810 with ``num_workers=0``, so decoding stays
    in-process there.
    """
    if num_items < 256:
        return 0  # process start-up costs more than decoding a few hundred images
    cores = os.cpu_count() or 2
    if torch.device(device).type == "cpu":
        return max(0, min(4, cores - torch.get_num_threads()))
    return max(1, min(4, cores - 1))


@dataclass
class SplitFeatures:
    """Features of one split. ``features`` is (N, D) or (V, N, D) float32 raw embeddings.

    ``changed_items`` counts the items encoded again because their files changed since they
    were cached (they are part of ``encoded_items``)."""

    features: Tensor
    kept: Tensor
    skipped: list[dict[str, Any]]
    encoded_items: int
    changed_items: int = 0


def extract_split(
    encode_images: Callable[[Tensor], Tensor],
    paths: Sequence[str],
    keys: Sequence[str],
    cache: SplitCache,
    transform: CleanView | AugmentedViews,
    *,
    shard_size: int = 1024,
    batch_size: int = 64,
    num_workers: int | None = None,
    progress: bool = True,
    description: str = "extract",
    device: torch.device | str = "cpu",
    stamps: dict[str, list[str]] | None = None,
) -> SplitFeatures:
    """Encode ``paths`` through ``transform`` into ``cache``, resuming from complete shards.

    Args:
        encode_images: (B, 3, H, W) -> (B, D) float32 features.
        paths: image files, in item order.
        keys: stable per-item keys (relative paths) seeding augmented views.
        cache: the split's cache folder.
        transform: the clean view or the augmented views.
        shard_size: items per shard (the unit of resumption).
        batch_size: images per encoder call (views multiply it).
        num_workers: DataLoader workers (None: automatic, see ``device``).
        device: where ``encode_images`` runs; sets the automatic worker count.
        progress: show a progress bar.
        stamps: the items' file stamps (``{"stat": [...]}``, plus ``"content"``; see
            :meth:`SplitCache.configure`): a cached shard whose files changed is re-encoded.

    Returns:
        :class:`SplitFeatures` with the kept item indices and the skipped items.
    """
    cache.configure(len(paths), shard_size, stamps)
    missing = cache.missing_shards()
    encoded = sum(len(cache.shard_range(s)) for s in missing)
    changed = sum(len(cache.shard_range(s)) for s in missing if s in cache.changed)
    if missing:
        workers = _auto_workers(encoded, device) if num_workers is None else num_workers
        order = [i for s in missing for i in cache.shard_range(s)]
        rows = _ImageRows([paths[i] for i in order], [keys[i] for i in order], transform)
        # batches never straddle shards, so each shard is written as soon as it is complete
        batches, offset = [], 0
        for s in missing:
            n = len(cache.shard_range(s))
            batches += [
                list(range(offset + b, offset + min(b + batch_size, n)))
                for b in range(0, n, batch_size)
            ]
            offset += n
        loader = DataLoader(rows, batch_sampler=batches, num_workers=workers, collate_fn=_collate)
        bar = progress_report(encoded, description, "img", enabled=progress, leave=False)
        shard_iter = iter(missing)
        current = next(shard_iter)
        remaining = len(cache.shard_range(current))
        feats: list[Tensor] = []
        index: list[Tensor] = []
        skipped: list[dict[str, Any]] = []
        for local_index, images, failed in loader:
            global_index = torch.tensor([order[i] for i in local_index.tolist()], dtype=torch.long)
            if images is not None:
                if images.ndim == 5:  # (B, V, 3, H, W) augmented views
                    b, v = images.shape[:2]
                    out = encode_images(images.flatten(0, 1)).view(b, v, -1).transpose(0, 1)
                else:
                    out = encode_images(images)
                feats.append(out.to(torch.float16))
                index.append(global_index)
            for i, err in failed:
                item = order[i]
                skipped.append({"index": item, "path": keys[item], "error": err})
            done = int(global_index.numel()) + len(failed)
            remaining -= done
            bar.update(done)
            if remaining == 0:
                axis = 1 if isinstance(transform, AugmentedViews) else 0
                if feats:
                    shard_feats = torch.cat(feats, dim=axis)
                    shard_index = torch.cat(index)
                else:
                    shard_feats = torch.zeros(0)
                    shard_index = torch.zeros(0, dtype=torch.long)
                cache.write_shard(current, shard_feats, shard_index, skipped)
                feats, index, skipped = [], [], []
                current = next(shard_iter, None)
                remaining = len(cache.shard_range(current)) if current is not None else 0
        bar.close()
    features, kept, skipped_all = cache.read()
    return SplitFeatures(features.float(), kept, skipped_all, encoded, changed)


@dataclass
class ExtractionReport:
    """What an extraction did: items encoded per split (0 = cache hit), items encoded again
    because their files changed since they were cached, skipped images, and warnings about the
    result (e.g. class names whose text embeddings cannot be told apart)."""

    bundle_path: Path
    encoded: dict[str, int] = field(default_factory=dict)
    kept: dict[str, int] = field(default_factory=dict)
    skipped: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    changed: dict[str, int] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    @property
    def num_skipped(self) -> int:
        return sum(len(v) for v in self.skipped.values())


#: Class text embeddings at least this cosine-similar are reported as indistinguishable: a
#: tokenizer that does not know two names maps both to the same tokens (cosine 1.0), while the
#: closest distinct names in practice stay below it (the embedded world's class names: at most
#: 0.70 apart from such unknown-word pairs).
NEAR_IDENTICAL_COSINE = 0.999


def near_identical_classes(
    text_features: Tensor, classnames: Sequence[str], threshold: float = NEAR_IDENTICAL_COSINE
) -> list[list[str]]:
    """Groups of classes whose text embeddings are (near-)identical (cosine >= ``threshold``).

    Zero-shot cannot tell such classes apart, and adapters initialised from the text start them
    at the same point. Groups are connected components of the similar pairs, in label order.
    """
    feats = text_features.float()
    feats = feats / feats.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    similar = (feats @ feats.T) >= threshold
    similar.fill_diagonal_(False)
    # connected components by repeated propagation over the (C, C) boolean graph: C is small
    reach = similar | torch.eye(len(classnames), dtype=torch.bool)
    while True:
        grown = (reach.float() @ reach.float()) > 0
        if torch.equal(grown, reach):
            break
        reach = grown
    groups, seen = [], set()
    for i in range(len(classnames)):
        if i in seen or not similar[i].any():
            continue
        members = torch.nonzero(reach[i]).flatten().tolist()
        seen.update(members)
        groups.append([classnames[j] for j in members])
    return groups


def text_warnings(groups: list[list[str]]) -> list[str]:
    """The extraction warning for :func:`near_identical_classes` groups (empty: none)."""
    if not groups:
        return []
    shown = "; ".join(
        ", ".join(repr(n) for n in g[:6]) + (" ..." if len(g) > 6 else "") for g in groups[:5]
    )
    more = f" (and {len(groups) - 5} more group(s))" if len(groups) > 5 else ""
    count = sum(len(g) for g in groups)
    return [
        f"{count} class name(s) map to (near-)identical text embeddings: {shown}{more}. "
        "Zero-shot cannot tell these classes apart (the backbone's tokenizer probably does not "
        "know these words); rename them (dataset.json `classnames`) or add descriptions "
        "(--descriptions)"
    ]


def extraction_settings(
    backbone_key: dict[str, Any],
    *,
    views: int,
    aug_scale: tuple[float, float],
    seed: int,
    templates: Sequence[str],
    descriptions: Sequence[Sequence[str]] | None,
    negative_template: str | None,
    splits: Sequence[str],
    bundle_metadata: dict[str, str] | None = None,
) -> str:
    """A hash of every extraction setting that changes a bundle made from the same images
    (recorded as the bundle's ``extraction_key``; a bundle is reused only when it matches).

    ``bundle_metadata`` is what the dataset asks its bundle to carry
    (``dataset.metadata["bundle_metadata"]``, e.g. the ImageNet WNIDs the domain-generalisation
    mapping reads); it is part of the key only when there is some, so other bundles keep
    their keys."""
    extra = {"bundle_metadata": dict(sorted(bundle_metadata.items()))} if bundle_metadata else {}
    return stable_hash(
        {
            **extra,
            "backbone": backbone_key,
            "views": views,
            "aug_scale": list(aug_scale),
            "seed": seed,
            "templates": list(templates),
            "descriptions": None if descriptions is None else [list(d) for d in descriptions],
            "negative_template": negative_template or None,
            "splits": list(splits),
            "extractor_version": EXTRACTOR_VERSION,
        }
    )


def dataset_bundle_metadata(dataset: Any) -> dict[str, str]:
    """The metadata strings a dataset asks its bundle to carry
    (``dataset.metadata["bundle_metadata"]``; empty for most datasets)."""
    extra = (getattr(dataset, "metadata", None) or {}).get("bundle_metadata") or {}
    return {str(k): v if isinstance(v, str) else json.dumps(v) for k, v in extra.items()}


def dataset_templates(dataset: Any, templates: Sequence[str] | None) -> list[str]:
    """The templates an extraction uses: ``templates``, else the dataset's own."""
    return list(templates or getattr(dataset, "templates", None) or [dataset.template])


def extract_dataset(
    dataset: Any,
    encoder: Any,
    out_path: str | Path,
    *,
    cache_dir: str | Path | None = None,
    views: int = 10,
    aug_scale: tuple[float, float] = (0.5, 1.0),
    seed: int = 0,
    templates: list[str] | None = None,
    descriptions: list[list[str]] | None = None,
    negative_template: str | None = "a photo of no {}.",
    splits: Sequence[str] = ("train", "val", "test"),
    batch_size: int = 64,
    num_workers: int | None = None,
    shard_size: int = 1024,
    progress: bool = True,
    fingerprint: str = "stat",
    provenance: dict[str, str] | None = None,
) -> tuple[FeatureBundle, ExtractionReport]:
    """Extract a dataset's features into a bundle at ``out_path`` (written atomically).

    Train rows get a clean view (``train_features``) and ``views`` augmented views
    (``train_features_views``); val and test get the clean view. Text: the class prompts of
    ``templates`` (mean of normalised prompt embeddings as ``text_features``, all of them as
    ``text_features_all``), the negative prompt and optional descriptions (with their negated
    forms, :func:`~clipadapt.data.prompts.negative_descriptions`, when a negative prompt is set).

    Args:
        dataset: an :class:`~clipadapt.data.datasets.ImageDataset`.
        encoder: a :class:`~clipadapt.encoders.clip.ClipEncoder`.
        out_path: the bundle file to write.
        cache_dir: feature cache root (default ``$CLIPADAPT_CACHE`` or ``~/.cache/clipadapt``).
        views: augmented views per train image (0 for none).
        aug_scale: random-resized-crop area range of the views.
        seed: seeds the augmented views.
        templates: prompt templates with ``{}`` (default: the dataset's).
        descriptions: per-class description sentences (CuPL-style), optional.
        negative_template: prompt of the negative text features (None: skip them, and the
            negated descriptions).
        fingerprint: how the image files are stamped (``stat``: size and modification time;
            ``content``: sha256): a cached shard whose files changed is encoded again, and the
            bundle records the dataset's files fingerprint in this mode.
        provenance: extra string metadata about the text side (template set name, description
            file name and sha256), recorded in the bundle.
    """
    from clipadapt.data.prompts import class_prompts, negative_descriptions, negative_prompts

    if isinstance(views, bool) or not isinstance(views, int) or views < 0:
        raise ConfigError(
            f"views={views!r}: the number of augmented views per train image must be an "
            "integer >= 0 (--views 0 for none)"
        )
    check_fingerprint_mode(fingerprint)
    cache_root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    backbone = encoder.backbone
    bkey = backbone.cache_key()
    has_stamps = hasattr(dataset, "file_stamps")
    stat_stamps = dataset.file_stamps("stat") if has_stamps else None
    content_stamps = (
        dataset.file_stamps("content") if has_stamps and fingerprint == "content" else None
    )
    bname = backbone.display_name
    clean = CleanView(encoder.image_size, encoder.mean, encoder.std)
    aug = AugmentedViews(encoder.image_size, encoder.mean, encoder.std, views, aug_scale, seed)
    report = ExtractionReport(Path(out_path))
    tensors: dict[str, Tensor] = {}
    root = Path(dataset.root)

    def rel(path: Path) -> str:
        try:
            return str(Path(path).relative_to(root))
        except ValueError:
            return str(path)

    for split in splits:
        items = dataset.splits.get(split) or []
        if not items:
            continue
        paths = [str(item.path) for item in items]
        keys = [rel(item.path) for item in items]
        labels = torch.tensor([item.label for item in items], dtype=torch.long)
        items_key = {"items": [[k, int(lab)] for k, lab in zip(keys, labels.tolist(), strict=True)]}
        stamps = None
        if stat_stamps is not None:
            stamps = {"stat": [stat_stamps[p] for p in paths]}
            if content_stamps is not None:
                stamps["content"] = [content_stamps[p] for p in paths]
        jobs = [(split, clean)]
        if split == "train" and views > 0:
            jobs.append(("train_views", aug))
        kept_sets = []
        for name, transform in jobs:
            cache = SplitCache(
                cache_root,
                bname,
                dataset.name,
                name,
                {
                    "backbone": bkey,
                    # fp16 autocast on a GPU and fp32 on the CPU give features ~1e-3 apart:
                    # a resumed cache must never mix the two
                    "precision": getattr(encoder, "precision", "fp32"),
                    "dataset": dataset.name,
                    **items_key,
                    "transform": transform.describe(),
                },
            )
            result = extract_split(
                encoder.encode_images,
                paths,
                keys,
                cache,
                transform,
                shard_size=shard_size,
                batch_size=batch_size
                if name != "train_views"
                else max(1, batch_size // max(views, 1)),
                num_workers=num_workers,
                progress=progress,
                description=f"{dataset.name}/{name}",
                device=getattr(encoder, "device", "cpu"),
                stamps=stamps,
            )
            report.encoded[name] = result.encoded_items
            if result.changed_items:
                report.changed[name] = result.changed_items
            report.skipped[name] = result.skipped
            kept_sets.append(result)
        # rows kept in every job of this split (a decode failure is the same in every view)
        base = kept_sets[0]
        keep = base.kept
        for other in kept_sets[1:]:
            keep = keep[torch.isin(keep, other.kept)]
        pos = {int(k): i for i, k in enumerate(base.kept.tolist())}
        rows = torch.tensor([pos[int(k)] for k in keep.tolist()], dtype=torch.long)
        tensors[f"{split}_features"] = base.features[rows].to(torch.float16)
        tensors[f"{split}_labels"] = labels[keep]
        if len(kept_sets) > 1:
            vpos = {int(k): i for i, k in enumerate(kept_sets[1].kept.tolist())}
            vrows = torch.tensor([vpos[int(k)] for k in keep.tolist()], dtype=torch.long)
            tensors[f"{split}_features_views"] = kept_sets[1].features[:, vrows].to(torch.float16)
        report.kept[split] = int(keep.numel())
        merged = {s["index"]: s for r in kept_sets for s in r.skipped}
        report.skipped.pop("train_views", None)
        report.skipped[split] = [merged[i] for i in sorted(merged)]

    text_cache = TextCache(
        cache_root, bname, {"backbone": bkey, "precision": getattr(encoder, "precision", "fp32")}
    )
    classnames = list(dataset.classnames)
    templates = dataset_templates(dataset, templates)
    prompts = class_prompts(classnames, templates)
    flat = [p for per_class in prompts for p in per_class]
    per_prompt = text_cache.get(flat, encoder.encode_text).view(len(classnames), len(templates), -1)
    per_prompt = per_prompt / per_prompt.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    tensors["text_features"] = per_prompt.mean(dim=1).to(torch.float16)
    report.warnings += text_warnings(near_identical_classes(tensors["text_features"], classnames))
    if len(classnames) < 2:
        report.warnings.append(
            f"{dataset.name} has {len(classnames)} class(es) ({', '.join(classnames)}): an "
            "accuracy on it says nothing (every prediction is that class); fitting and "
            "scoring refuse it"
        )
    if len(templates) > 1:
        tensors["text_features_all"] = per_prompt.to(torch.float16)
    if negative_template:
        neg = text_cache.get(negative_prompts(classnames, negative_template), encoder.encode_text)
        tensors["negative_text_features"] = neg.to(torch.float16)
    if descriptions is not None:
        width = max(len(d) for d in descriptions)
        flat_desc = [s for d in descriptions for s in d]
        encoded = text_cache.get(flat_desc, encoder.encode_text)
        dim = encoded.shape[1]
        padded = torch.zeros(len(classnames), width, dim)
        mask = torch.zeros(len(classnames), width, dtype=torch.bool)
        counts = torch.tensor([len(d) for d in descriptions])
        mask = torch.arange(width)[None] < counts[:, None]
        padded[mask] = encoded
        tensors["description_features"] = padded.to(torch.float16)
        tensors["description_mask"] = mask
        if negative_template:
            # the negated description set (HeGraphAdapter's `negatives=descriptions`), padded
            # like the descriptions and sharing their mask
            negated = negative_descriptions(descriptions, classnames)
            flat_neg = [s for d in negated for s in d]
            padded_neg = torch.zeros(len(classnames), width, dim)
            padded_neg[mask] = text_cache.get(flat_neg, encoder.encode_text)
            tensors["negative_description_features"] = padded_neg.to(torch.float16)
    extra_metadata = dataset_bundle_metadata(dataset)
    metadata = {
        "classnames": json.dumps(classnames),
        "backbone": bname,
        "backbone_spec": json.dumps(backbone.to_record()),
        # what the checkpoint is (its sha256), not where it sits: the fingerprint covers this
        "backbone_key": stable_hash(bkey),
        "source": "clipadapt extract",
        "dataset": dataset.name,
        "templates": json.dumps(templates),
        "templates_sha256": sha256_text(json.dumps(templates)),
        "negative_template": negative_template or "",
        "views": str(views),
        "skipped": json.dumps({k: len(v) for k, v in report.skipped.items() if v}),
        "extraction_key": extraction_settings(
            bkey,
            views=views,
            aug_scale=aug_scale,
            seed=seed,
            templates=templates,
            descriptions=descriptions,
            negative_template=negative_template,
            splits=splits,
            bundle_metadata=extra_metadata,
        ),
        "warnings": json.dumps(report.warnings),
    }
    # what the dataset asks its bundle to carry (ImageNet and its variants: the WNIDs and
    # ImageNet indices of the columns, which the domain-generalisation task maps by)
    metadata.update(extra_metadata)
    if has_stamps:
        metadata["dataset_fingerprint"] = dataset.files_fingerprint(fingerprint)
        metadata["dataset_fingerprint_mode"] = fingerprint
    if descriptions is not None:
        metadata["descriptions_sha256"] = sha256_text(json.dumps(descriptions))
    metadata.update(provenance or {})
    for warning in report.warnings:
        log.warning("%s: %s", dataset.name, warning)
    save_bundle(out_path, tensors, metadata)
    return FeatureBundle(tensors, metadata, out_path), report


def sha256_text(text: str) -> str:
    """The sha256 (hex) of a string's UTF-8 bytes."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()
