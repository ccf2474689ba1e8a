"""The slow side in one place: images -> encoder -> feature bundle (and the text tower).

Everything that touches an encoder goes through here: ``clipadapt extract``/``run``/``predict``,
the image datasets and image episodes of ``clipadapt bench``, the demo, and the bench workers
that need CoOp's text tower.

* :func:`ensure_bundle`: a dataset (name, folder or :class:`ImageDataset`) and a backbone ->
  ``(bundle, text tower or None)``, through the feature cache (a rerun encodes nothing);
* :func:`encode_image_files`: the one loop that encodes a list of image files (prediction,
  image episodes);
* :func:`load_encoder` / :func:`text_tower_for`: encoders built once per process and backbone,
  so a worker that runs many CoOp cells loads the model once.

The cache root is :func:`clipadapt.features.cache.default_cache_dir` unless ``cache_dir`` says.
"""

from __future__ import annotations

import json
import logging
from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from clipadapt._utils import stable_hash
from clipadapt.data.prompts import DEFAULT_NEGATIVE_TEMPLATE
from clipadapt.exceptions import ClipadaptError, ConfigError

if TYPE_CHECKING:
    from clipadapt.data.bundle import FeatureBundle
    from clipadapt.data.datasets import ImageDataset
    from clipadapt.encoders.clip import BackboneSpec, ClipEncoder, TextTower
    from clipadapt.features.extract import ExtractionReport

log = logging.getLogger(__name__)

#: Encoders kept per process (a sweep alternates between a few backbones at most).
_MAX_ENCODERS = 2
_ENCODERS: OrderedDict[str, ClipEncoder] = OrderedDict()


class NotExtracted(ClipadaptError):
    """Raised by :func:`ensure_bundle` / :func:`ensure_episode_features` called with
    ``extract=False`` when no reusable file exists: encoding would be needed (a dry run
    lists such work instead of doing it). ``path`` is the file that would be written."""

    def __init__(self, path: Path, what: str) -> None:
        super().__init__(f"{what} would be encoded into {path}")
        self.path = path


def backbone_display_name(backbone: str | BackboneSpec | dict[str, Any]) -> str:
    """The name a bundle extracted with ``backbone`` records (``bundle.backbone``); the typed
    text itself when the name cannot be resolved here."""
    try:
        return _backbone_spec(backbone, None).display_name
    except ClipadaptError:
        return str(backbone)


def _backbone_spec(backbone: str | BackboneSpec | dict[str, Any], checkpoint: Any) -> BackboneSpec:
    from clipadapt.encoders.clip import BackboneSpec, backbone_from_record, resolve_backbone

    if isinstance(backbone, BackboneSpec):
        return backbone
    if isinstance(backbone, dict):
        return backbone_from_record(backbone)
    return resolve_backbone(backbone, checkpoint)


def load_encoder(
    backbone: str | BackboneSpec | dict[str, Any],
    *,
    checkpoint: str | Path | None = None,
    device: str | torch.device = "auto",
) -> ClipEncoder:
    """The encoder of ``backbone`` on ``device``, built once per process.

    Args:
        backbone: a user-typed name (``world``, ``ViT-B-32:openai``, ``ARCH`` with
            ``checkpoint``), a :class:`BackboneSpec`, or a backbone record as stored in a
            bundle's ``backbone_spec`` metadata.
        checkpoint: local weights for a typed architecture name.
        device: ``auto``, ``cpu``, ``cuda:0``...

    Raises:
        ConfigError: unknown backbone, unknown device, weights unavailable offline.
    """
    from clipadapt.encoders.clip import ClipEncoder, select_device

    spec = _backbone_spec(backbone, checkpoint)
    key = stable_hash({"backbone": spec.to_record(), "device": str(select_device(device))})
    if key in _ENCODERS:
        _ENCODERS.move_to_end(key)
        return _ENCODERS[key]
    encoder = ClipEncoder(spec, device=device)
    _ENCODERS[key] = encoder
    while len(_ENCODERS) > _MAX_ENCODERS:
        _ENCODERS.popitem(last=False)
    return encoder


def text_tower_for(
    backbone_record: dict[str, Any], device: str | torch.device = "auto"
) -> TextTower:
    """The frozen text tower of the backbone a bundle records (``bundle.backbone_record``).

    Built once per process and device; this is how a bench worker (in process, in a process
    pool or on Ray) gets the tower a CoOp cell needs from the cell alone.
    """
    return load_encoder(backbone_record, device=device).text_tower()


def needs_text_tower(method: str) -> bool:
    """True when a registered method trains through the text tower (CoOp), not only on text
    features: its caller must hand it one (``text_encoder``)."""
    from clipadapt.methods.base import get_method_class

    return "text_encoder" in get_method_class(method).card.needs


def bundle_backbone_record(bundle: FeatureBundle) -> dict[str, Any] | None:
    """The backbone record a bundle was extracted with (None for bundles made elsewhere)."""
    raw = bundle.metadata.get("backbone_spec")
    if not raw:
        return None
    try:
        record = json.loads(raw) if isinstance(raw, str) else dict(raw)
    except (json.JSONDecodeError, TypeError, ValueError):
        return None
    return record if isinstance(record, dict) and record.get("model_name") else None


def bundle_provenance(bundle: FeatureBundle) -> dict[str, Any]:
    """What a saved adapter records about the features it was fitted on (``Adapter.save``'s
    ``provenance``): class names (and their hash), dataset and its files fingerprint, backbone
    name, record and content key, bundle file and fingerprint.
    """
    return {
        "classnames": list(bundle.classnames),
        "classnames_sha256": classnames_hash(bundle.classnames),
        "dataset": bundle.name,
        "dataset_fingerprint": bundle.metadata.get("dataset_fingerprint"),
        "backbone": bundle.backbone,
        "backbone_spec": bundle_backbone_record(bundle),
        "backbone_key": bundle.metadata.get("backbone_key"),
        "bundle": str(bundle.path) if bundle.path is not None else None,
        "bundle_fingerprint": bundle.fingerprint(),
    }


def classnames_hash(classnames: Sequence[str]) -> str:
    """The sha256 of the class names as a JSON list (label order): records carry this hash,
    and a sweep stores the names once (``<out>.sweep.json``)."""
    import hashlib

    return hashlib.sha256(json.dumps(list(classnames)).encode("utf-8")).hexdigest()


def text_provenance(bundle: FeatureBundle) -> dict[str, Any]:
    """Where a bundle's class text came from, as its metadata records it: the template set
    (name, count, sha256) and the description file (name, sha256). Empty for bundles made
    elsewhere that record none of it."""
    meta = bundle.metadata
    out: dict[str, Any] = {}
    if meta.get("templates"):
        try:
            out["templates_count"] = len(json.loads(meta["templates"]))
        except (json.JSONDecodeError, TypeError):
            pass
    for key in (
        "templates_name",
        "templates_sha256",
        "descriptions_file",
        "descriptions_file_sha256",
        "descriptions_sha256",
    ):
        if meta.get(key):
            out[key] = meta[key]
    return out


def open_dataset(
    dataset: str | Path | ImageDataset,
    data_root: str | Path | None = None,
    *,
    templates: str | Sequence[str] | None = None,
    descriptions: str | Path | None = None,
    descriptions_match: str = "name",
    split_file: str | Path | None = None,
    split_dir: str | Path | None = None,
    resplit: bool = False,
    check_counts: bool = True,
) -> tuple[ImageDataset, list[str] | None, list[list[str]] | None]:
    """Load a dataset with the prompt choices made for it.

    ``split_file``, ``split_dir``, ``resplit`` and ``check_counts`` are
    :func:`~clipadapt.data.datasets.load_dataset`'s (where the split of an ImageFolder tree
    lives, making it anew, and requiring a registered dataset's complete counts).

    Returns:
        ``(dataset, templates or None for the dataset's own, descriptions or None)``; the
        descriptions are ``descriptions`` if given, else the dataset's own description file.

    Raises:
        DatasetError: see :func:`clipadapt.data.datasets.load_dataset`; listed images missing.
        ConfigError: unknown template set.
    """
    from clipadapt.data.datasets import ImageDataset, load_dataset
    from clipadapt.data.prompts import load_descriptions, resolve_templates

    if not isinstance(dataset, ImageDataset):
        dataset = load_dataset(
            str(dataset) if isinstance(dataset, Path) else dataset,
            data_root,
            split_file=split_file,
            split_dir=split_dir,
            resplit=resplit,
            check_counts=check_counts,
        )
    if dataset.missing:
        missing = dataset.missing
        raise ConfigError(
            f"{len(missing)} image(s) listed in the split of {dataset.name} are missing under "
            f"{dataset.root} (e.g. {', '.join(map(str, missing[:3]))}); restore them or fix the split"
        )
    chosen = resolve_templates(templates, dataset) if templates else None
    desc_path = descriptions or dataset.descriptions
    texts = None
    if desc_path:
        texts = load_descriptions(desc_path, dataset.classnames, match=descriptions_match)  # type: ignore[arg-type]
    return dataset, chosen, texts


def ensure_bundle(
    dataset: str | Path | ImageDataset,
    backbone: str | BackboneSpec | dict[str, Any],
    cache_dir: str | Path | None = None,
    *,
    out: str | Path,
    data_root: str | Path | None = None,
    checkpoint: str | Path | None = None,
    device: str | torch.device = "auto",
    views: int = 10,
    templates: str | Sequence[str] | None = None,
    descriptions: str | Path | None = None,
    descriptions_match: str = "name",
    negative_template: str | None = DEFAULT_NEGATIVE_TEMPLATE,
    batch_size: int = 64,
    num_workers: int | None = None,
    progress: bool = True,
    reuse: bool = False,
    text_tower: bool = False,
    on_report: Callable[[FeatureBundle, ExtractionReport], None] | None = None,
    fingerprint: str = "stat",
    split_file: str | Path | None = None,
    resplit: bool = False,
    check_counts: bool = True,
    extract: bool = True,
) -> tuple[FeatureBundle, TextTower | None]:
    """The feature bundle of ``dataset`` under ``backbone`` at ``out``, extracted if needed.

    Train images get a clean view and ``views`` augmented views, val and test the clean view,
    and the class prompts their text features (see
    :func:`clipadapt.features.extract.extract_dataset`). Features go through the cache at
    ``cache_dir`` (default :func:`~clipadapt.features.cache.default_cache_dir`), so a rerun
    encodes nothing and an interrupted one resumes.

    Args:
        dataset: a registered name (with ``data_root``), a dataset folder, or a loaded dataset.
        backbone: see :func:`load_encoder`.
        cache_dir: the feature cache root.
        out: the bundle file written (atomically).
        reuse: return the bundle already at ``out`` without encoding when it was made from
            these very files (its ``dataset_fingerprint``) with these settings and backbone
            (its ``extraction_key``); otherwise extract again through the cache, which
            encodes only what changed (the bench's rule).
        fingerprint: ``stat`` or ``content``: how image files are compared with the cache
            and the bundle (see :meth:`ImageDataset.files_fingerprint`).
        split_file, resplit: where the split of an ImageFolder tree lives (default: beside the
            cache, ``<cache_dir>/splits``) and whether to make it anew.
        check_counts: require a registered dataset's (or ImageNet variant's) complete class
            and image counts; False reads a partial copy.
        extract: False encodes nothing: a bundle that cannot be reused raises
            :class:`NotExtracted` (what a dry run reports).
        text_tower: also return the backbone's text tower (for methods such as CoOp).
        on_report: called with the bundle and the extraction report after an extraction (not on
            reuse), e.g. to print what was encoded and what was skipped.
        views, templates, descriptions, descriptions_match, negative_template, batch_size,
        num_workers, progress: as in ``extract_dataset`` / :func:`open_dataset`.

    Returns:
        ``(bundle, text tower or None)``.
    """
    from clipadapt._utils import sha256_file
    from clipadapt.data.bundle import load_bundle
    from clipadapt.data.datasets import check_fingerprint_mode
    from clipadapt.features.cache import default_cache_dir
    from clipadapt.features.extract import (
        dataset_bundle_metadata,
        dataset_templates,
        extract_dataset,
        extraction_settings,
    )

    check_fingerprint_mode(fingerprint)
    if isinstance(views, bool) or not isinstance(views, int) or views < 0:
        raise ConfigError(
            f"views={views!r}: the number of augmented views per train image must be an "
            "integer >= 0 (--views 0 for none)"
        )
    cache_root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    loaded, chosen, texts = open_dataset(
        dataset,
        data_root,
        templates=templates,
        descriptions=descriptions,
        descriptions_match=descriptions_match,
        split_file=split_file,
        split_dir=cache_root / "splits",
        resplit=resplit,
        check_counts=check_counts,
    )
    desc_path = descriptions or loaded.descriptions
    provenance = {
        "templates_name": templates
        if isinstance(templates, str)
        else ("list" if templates else "dataset default"),
    }
    if desc_path:
        provenance["descriptions_file"] = Path(desc_path).name
        provenance["descriptions_file_sha256"] = sha256_file(desc_path)
    out = Path(out)
    negative = negative_template or None
    if reuse and out.is_file():
        bundle = load_bundle(out)
        wanted = extraction_settings(
            _backbone_spec(backbone, checkpoint).cache_key(),
            views=views,
            aug_scale=(0.5, 1.0),
            seed=0,
            templates=dataset_templates(loaded, chosen),
            descriptions=texts,
            negative_template=negative,
            splits=("train", "val", "test"),
            bundle_metadata=dataset_bundle_metadata(loaded),
        )
        same_files = bundle.metadata.get("dataset_fingerprint") == loaded.files_fingerprint(
            fingerprint
        )
        if same_files and bundle.metadata.get("extraction_key") == wanted:
            tower = None
            if text_tower:
                tower = load_encoder(backbone, checkpoint=checkpoint, device=device).text_tower()
            return bundle, tower
        log.info(
            "%s was made from %s; extracting again",
            out,
            "other settings" if same_files else "other image files (or an older clipadapt)",
        )
    if not extract:
        raise NotExtracted(out, f"{loaded.name} ({len(loaded.classnames)} classes)")
    encoder = load_encoder(backbone, checkpoint=checkpoint, device=device)
    bundle, report = extract_dataset(
        loaded,
        encoder,
        out,
        cache_dir=cache_dir,
        views=views,
        templates=chosen,
        descriptions=texts,
        negative_template=negative,
        batch_size=batch_size,
        num_workers=num_workers,
        progress=progress,
        fingerprint=fingerprint,
        provenance=provenance,
    )
    if on_report is not None:
        on_report(bundle, report)
    return bundle, encoder.text_tower() if text_tower else None


def encode_image_files(
    encoder: ClipEncoder,
    paths: Sequence[str | Path],
    *,
    batch_size: int = 256,
    normalize: bool = False,
    skipped: list[tuple[str, str]] | None = None,
) -> Tensor:
    """(N, D) float32 features of image files through the encoder's clean view, in batches.

    Args:
        skipped: when given, a file that cannot be decoded is left out and appended here as
            ``(path, reason)`` instead of raising (the rows then follow the readable files).

    Raises:
        ConfigError: a file that does not exist or (without ``skipped``) cannot be decoded,
            named; no readable image at all.
    """
    from clipadapt.features.transforms import CleanView, load_rgb

    view = CleanView(encoder.image_size, encoder.mean, encoder.std)

    def pixels(path: str | Path) -> Tensor | None:
        if not Path(path).is_file():
            raise ConfigError(f"image {path} does not exist")
        try:
            return view(load_rgb(str(path)))
        except Exception as error:  # corrupt, truncated, not an image, unreadable
            reason = f"{type(error).__name__}: {error}"
            if skipped is None:
                raise ConfigError(f"cannot read image {path} ({reason})") from None
            skipped.append((str(path), reason))
            return None

    chunks = []
    with torch.no_grad():
        for start in range(0, len(paths), batch_size):
            images = [x for p in paths[start : start + batch_size] if (x := pixels(p)) is not None]
            if images:
                chunks.append(encoder.encode_images(torch.stack(images), normalize=normalize))
    if not chunks:
        raise ConfigError("no readable images to encode")
    return torch.cat(chunks)


def ensure_episode_features(
    path: str | Path,
    backbone: str | BackboneSpec | dict[str, Any],
    *,
    name: str | None = None,
    device: str | torch.device = "auto",
    extract: bool = True,
) -> Path:
    """Encode an image-episode JSON file into feature episodes, cached beside it.

    The features are written to ``<stem>.<backbone>.<key>.safetensors`` next to ``path``,
    where ``key`` hashes the JSON file's bytes, every image's size and modification time and
    the backbone's content key: an edited episode file, a rewritten image or another checkpoint
    gives a new file, never stale features.

    ``extract=False`` encodes nothing: when the feature file does not exist yet,
    :class:`NotExtracted` is raised (what a dry run reports).

    Returns:
        The feature-episode file (see :mod:`clipadapt.tasks.episodes`).
    """
    from clipadapt._utils import safe_name, sha256_file
    from clipadapt.data.datasets import file_stamp
    from clipadapt.tasks.episodes import encode_episodes, read_episode_doc

    path = Path(path)
    spec = _backbone_spec(backbone, None)
    doc = read_episode_doc(path)
    root = path.parent / doc.get("image_root", ".")
    images = sorted(
        {
            str(item.get("image"))
            for episode in doc["episodes"]
            if isinstance(episode, dict)
            for part in ("support", "query")
            for item in episode.get(part) or ()
            if isinstance(item, dict)
        }
    )
    stamps = []
    for rel in images:
        try:
            stamps.append([rel, file_stamp(root / rel)])
        except ClipadaptError:
            stamps.append([rel, None])  # encoding then names the missing image
    key = stable_hash(
        {"episodes": sha256_file(path), "images": stamps, "backbone": spec.cache_key()}, 8
    )
    label = backbone if isinstance(backbone, str) else spec.display_name
    out = path.with_name(f"{path.stem}.{safe_name(label)}.{key}.safetensors")
    if out.is_file():
        return out
    if not extract:
        raise NotExtracted(out, f"the episodes of {path.name}")
    encoder = load_encoder(spec, device=device)
    with torch.no_grad():
        episodes = encode_episodes(
            path,
            lambda files: encode_image_files(encoder, files, normalize=True),
            lambda texts: encoder.encode_text(texts, normalize=True),
        )
    episodes.name = name or path.stem
    return episodes.save(out)
