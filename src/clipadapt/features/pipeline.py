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
from clipadapt.exceptions import ConfigError

if TYPE_CHECKING:
    from clipadapt.data.bundle import FeatureBundle
    from clipadapt.data.datasets import ImageDataset
    from clipadapt.encoders.clip import BackboneSpec, ClipEncoder, TextTower
    from clipadapt.features.extract import ExtractionReport

log = logging.getLogger(__name__)

#: Encoders kept per process (a sweep alternates between a few backbones at most).
_MAX_ENCODERS = 2
_ENCODERS: OrderedDict[str, ClipEncoder] = OrderedDict()


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
    ``provenance``): class names, dataset, backbone name and record, bundle file and fingerprint.
    """
    return {
        "classnames": list(bundle.classnames),
        "dataset": bundle.name,
        "backbone": bundle.backbone,
        "backbone_spec": bundle_backbone_record(bundle),
        "bundle": str(bundle.path) if bundle.path is not None else None,
        "bundle_fingerprint": bundle.fingerprint(),
    }


def open_dataset(
    dataset: str | Path | ImageDataset,
    data_root: str | Path | None = None,
    *,
    templates: str | Sequence[str] | None = None,
    descriptions: str | Path | None = None,
    descriptions_match: str = "name",
) -> tuple[ImageDataset, list[str] | None, list[list[str]] | None]:
    """Load a dataset with the prompt choices made for it.

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
        dataset = load_dataset(str(dataset) if isinstance(dataset, Path) else dataset, data_root)
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


def _same_augmentation(bundle: FeatureBundle, wanted: dict[str, Any]) -> bool:
    """Whether ``bundle``'s train views were made with the augmentation ``wanted``.

    A bundle without the record (written before it existed, or imported) counts as made with
    the default, so it is reused exactly when the default is wanted.
    """
    keys = ("views", "scale", "flip")
    recorded = bundle.metadata.get("augmentation")
    if recorded is None:
        return wanted["source"] == "default"
    try:
        have = json.loads(recorded)
    except ValueError:
        return False
    return all(have.get(k) == wanted[k] for k in keys)


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
    aug_scale: tuple[float, float] | None = None,
    aug_flip: float | None = None,
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
        reuse: return the bundle already at ``out`` without encoding (the bench's rule: one
            bundle per dataset entry and backbone), unless its recorded train-view
            augmentation differs from the one this call would use (a dataset that now declares
            another one, or another ``aug_scale``/``aug_flip``/``views``): then it is re-made.
        text_tower: also return the backbone's text tower (for methods such as CoOp).
        on_report: called with the bundle and the extraction report after an extraction (not on
            reuse), e.g. to print what was encoded and what was skipped.
        views, aug_scale, aug_flip, templates, descriptions, descriptions_match,
        negative_template, batch_size, num_workers, progress: as in ``extract_dataset`` /
        :func:`open_dataset`.

    Returns:
        ``(bundle, text tower or None)``.
    """
    from clipadapt.data.bundle import load_bundle
    from clipadapt.features.extract import extract_dataset, resolve_augmentation

    loaded, chosen, texts = open_dataset(
        dataset,
        data_root,
        templates=templates,
        descriptions=descriptions,
        descriptions_match=descriptions_match,
    )
    out = Path(out)
    bundle = load_bundle(out) if reuse and out.is_file() else None
    if bundle is not None and not _same_augmentation(
        bundle, resolve_augmentation(loaded, views=views, scale=aug_scale, flip=aug_flip)
    ):
        log.info("%s: its views were made with another augmentation; re-extracting", out)
        bundle = None
    if bundle is not None:
        tower = None
        if text_tower:
            tower = load_encoder(backbone, checkpoint=checkpoint, device=device).text_tower()
        return bundle, tower
    encoder = load_encoder(backbone, checkpoint=checkpoint, device=device)
    bundle, report = extract_dataset(
        loaded,
        encoder,
        out,
        cache_dir=cache_dir,
        views=views,
        aug_scale=aug_scale,
        aug_flip=aug_flip,
        templates=chosen,
        descriptions=texts,
        negative_template=negative_template or None,
        batch_size=batch_size,
        num_workers=num_workers,
        progress=progress,
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
) -> Tensor:
    """(N, D) float32 features of image files through the encoder's clean view, in batches.

    Raises:
        ConfigError: a file that does not exist or cannot be decoded (named).
    """
    from clipadapt.features.transforms import CleanView, load_rgb

    view = CleanView(encoder.image_size, encoder.mean, encoder.std)

    def pixels(path: str | Path) -> Tensor:
        if not Path(path).is_file():
            raise ConfigError(f"image {path} does not exist")
        try:
            return view(load_rgb(str(path)))
        except Exception as error:  # corrupt, truncated, not an image, unreadable
            raise ConfigError(
                f"cannot read image {path} ({type(error).__name__}: {error})"
            ) from None

    chunks = []
    with torch.no_grad():
        for start in range(0, len(paths), batch_size):
            batch = torch.stack([pixels(p) for p in paths[start : start + batch_size]])
            chunks.append(encoder.encode_images(batch, normalize=normalize))
    if not chunks:
        raise ConfigError("no images to encode")
    return torch.cat(chunks)


def ensure_episode_features(
    path: str | Path,
    backbone: str | BackboneSpec | dict[str, Any],
    *,
    name: str | None = None,
    device: str | torch.device = "auto",
) -> Path:
    """Encode an image-episode JSON file into feature episodes, cached beside it.

    The features are written to ``<stem>.<backbone>.safetensors`` next to ``path`` and reused
    while that file is not older than the JSON file.

    Returns:
        The feature-episode file (see :mod:`clipadapt.tasks.episodes`).
    """
    from clipadapt._utils import safe_name
    from clipadapt.tasks.episodes import encode_episodes

    path = Path(path)
    label = backbone if isinstance(backbone, str) else _backbone_spec(backbone, None).display_name
    out = path.with_name(f"{path.stem}.{safe_name(label)}.safetensors")
    if out.is_file() and out.stat().st_mtime >= path.stat().st_mtime:
        return out
    encoder = load_encoder(backbone, device=device)
    with torch.no_grad():
        episodes = encode_episodes(
            path,
            lambda files: encode_image_files(encoder, files, normalize=True),
            lambda texts: encoder.encode_text(texts, normalize=True),
        )
    episodes.name = name or path.stem
    return episodes.save(out)
