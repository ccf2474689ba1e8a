"""ImageNet's distribution-shift test sets: ImageNet-V2, -Sketch, -A and -R, in their release layouts.

The domain-generalisation protocol of CoOp, Tip-Adapter, NODE-Adapter and HeGraphAdapter fits on
ImageNet and scores the unchanged model on these four evaluation-only datasets. They are read
from the layout CoOp's DATASETS.md prescribes under a data root (baselines spec §1.7):

==================  =========================  ===========================================  =====  ======
key                 folder under the data root  images                                        C      images
==================  =========================  ===========================================  =====  ======
``imagenet_v2``     ``imagenetv2/``             ``imagenetv2-matched-frequency-format-val/``  1000   10,000
                                                folders ``0`` ... ``999`` = ImageNet index
``imagenet_sketch`` ``imagenet-sketch/``        ``images/`` (or the archive's ``sketch/``),   1000   50,889
                                                one folder per WNID
``imagenet_a``      ``imagenet-adversarial/``   ``imagenet-a/``, 200 WNID folders             200    7,500
``imagenet_r``      ``imagenet-rendition/``     ``imagenet-r/``, 200 WNID folders             200    30,000
==================  =========================  ===========================================  =====  ======

Each folder also holds a copy of ImageNet's ``classnames.txt`` (``<wnid> <class name>`` per
line); when it does not, ``<data_root>/imagenet/classnames.txt`` is used. Files that are not
folders (the releases' ``README.txt``) and hidden entries are ignored.

Classes and labels: the dataset's classes are its class folders present on disk, in ImageNet
order (sorted WNIDs; V2's folder numbers), and a label is the rank of its folder among them, as
in CoOp's loaders. The ImageNet-1k index of every class is recorded
(``ImageDataset.metadata["imagenet_classes"]``, with ``"wnids"``), and :func:`bundle_metadata`
turns it into the bundle metadata that tells the domain-generalisation task which of the 1000
source columns a target's columns are (ImageNet-A/-R: 200 of them; the logits are restricted to
those columns). The WNID lists ship as data files in ``clipadapt/data/wnids/`` (each file names
its source).

Example:
    >>> ds = load_imagenet_variant("imagenet_a", "~/data")  # doctest: +SKIP
    >>> ds.num_classes, ds.metadata["imagenet_classes"][:3]  # doctest: +SKIP
    (200, [6, 11, 13])
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import MutableMapping, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from clipadapt._utils import clean_name
from clipadapt.data.datasets import ImageDataset, ImageItem, scan_images
from clipadapt.exceptions import ConfigError, DatasetError

log = logging.getLogger(__name__)

#: ImageNet's hand-crafted prompt, used on the targets as on the source (baselines spec §1.7).
TEMPLATE = "a photo of a {}."
#: Bundle metadata keys written by :func:`bundle_metadata` and read by the DG task.
WNIDS_KEY = "wnids"
IMAGENET_CLASSES_KEY = "imagenet_classes"
NUM_IMAGENET_CLASSES = 1000
#: The shipped WNID lists (package data; each file's header names its source).
WNID_DIR = Path(__file__).resolve().parent / "wnids"
_WNID = re.compile(r"^n\d{8}$")
_WNID_LINE = re.compile(r"^(n\d{8})\s+(\S.*)$")


@dataclass(frozen=True)
class VariantSpec:
    """How one ImageNet variant is laid out on disk.

    Attributes:
        key: registry key (``imagenet_a``).
        display_name: name in tables (``ImageNet-A``).
        folder: its folder under the data root (CoOp's name).
        image_dirs: the image folder inside ``folder``; the first that exists is used.
        layout: ``"index"`` (class folders named by ImageNet index, V2) or ``"wnid"``.
        subset: the WNID list file of a class subset (``imagenet_a.txt``), None for all 1000.
        num_classes, num_images: the complete release's counts (checked with ``check_counts``).
        url: where the release is downloaded from.
        aliases: other accepted names (normalised with ``clean_name``).
    """

    key: str
    display_name: str
    folder: str
    image_dirs: tuple[str, ...]
    layout: str
    subset: str | None
    num_classes: int
    num_images: int
    url: str
    aliases: tuple[str, ...] = ()
    template: str = TEMPLATE

    def load(self, data_root: str | Path, **kwargs: Any) -> ImageDataset:
        """Load this variant under ``data_root`` (see :func:`load_imagenet_variant`)."""
        return load_imagenet_variant(self.key, data_root, **kwargs)


#: The four variants, by key.
VARIANTS: dict[str, VariantSpec] = {
    s.key: s
    for s in (
        VariantSpec("imagenet_v2", "ImageNet-V2", "imagenetv2",
                    ("imagenetv2-matched-frequency-format-val",), "index", None, 1000, 10000,
                    "https://github.com/modestyachts/ImageNetV2 (matched-frequency archive)",
                    aliases=("imagenetv2", "imagenet_v2_matched_frequency")),
        VariantSpec("imagenet_sketch", "ImageNet-Sketch", "imagenet-sketch", ("images", "sketch"),
                    "wnid", None, 1000, 50889, "https://github.com/HaohanWang/ImageNet-Sketch",
                    aliases=("imagenetsketch",)),
        VariantSpec("imagenet_a", "ImageNet-A", "imagenet-adversarial", ("imagenet-a",), "wnid",
                    "imagenet_a.txt", 200, 7500, "https://github.com/hendrycks/natural-adv-examples",
                    aliases=("imageneta", "imagenet_adversarial")),
        VariantSpec("imagenet_r", "ImageNet-R", "imagenet-rendition", ("imagenet-r",), "wnid",
                    "imagenet_r.txt", 200, 30000, "https://github.com/hendrycks/imagenet-r",
                    aliases=("imagenetr", "imagenet_rendition")),
    )
}  # fmt: skip


# --------------------------------------------------------------------------------------------
# the shipped WNID lists


@cache
def _read_wnid_file(name: str) -> tuple[str, ...]:
    text = (WNID_DIR / name).read_text(encoding="utf-8")
    wnids = tuple(
        line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")
    )
    bad = [w for w in wnids if not _WNID.match(w)]
    if bad:  # a packaging error, not a user error
        raise RuntimeError(f"clipadapt/data/wnids/{name}: malformed WNID(s) {bad[:3]}")
    return wnids


def imagenet_wnids() -> list[str]:
    """The 1000 ImageNet-1k WNIDs in class-index order (sorted; a fresh list)."""
    return list(_read_wnid_file("imagenet.txt"))


@cache
def _imagenet_position() -> dict[str, int]:
    return {w: i for i, w in enumerate(_read_wnid_file("imagenet.txt"))}


def subset_wnids(name: str) -> list[str]:
    """The WNIDs of a variant's class subset (ImageNet-A/-R: 200), or all 1000, sorted.

    Raises:
        DatasetError: unknown variant name.
    """
    spec = get_variant_spec(name)
    return list(_read_wnid_file(spec.subset)) if spec.subset else imagenet_wnids()


def imagenet_indices(wnids: Sequence[str]) -> list[int]:
    """ImageNet-1k class index of each WNID.

    Raises:
        ConfigError: a WNID that is not one of the 1000 (the message names it).
    """
    position = _imagenet_position()
    unknown = [w for w in wnids if w not in position]
    if unknown:
        raise ConfigError(
            f"{len(unknown)} WNID(s) are not ImageNet-1k classes: {', '.join(unknown[:5])}"
        )
    return [position[w] for w in wnids]


# --------------------------------------------------------------------------------------------
# the registry


def list_imagenet_variants() -> list[str]:
    """The variant keys: imagenet_v2, imagenet_sketch, imagenet_a, imagenet_r."""
    return list(VARIANTS)


def find_variant(name: str) -> VariantSpec | None:
    """The :class:`VariantSpec` a key, display name or alias names, else None."""
    key = clean_name(str(name))
    for spec in VARIANTS.values():
        if key in (spec.key, clean_name(spec.display_name), *spec.aliases):
            return spec
    return None


def get_variant_spec(name: str) -> VariantSpec:
    """Like :func:`find_variant`, but an unknown name is a :class:`DatasetError`."""
    spec = find_variant(name)
    if spec is None:
        raise DatasetError(f"unknown ImageNet variant {name!r}; known: {', '.join(VARIANTS)}")
    return spec


def register_imagenet_variants(table: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """Add the four :class:`VariantSpec` entries to a dataset table (key -> entry) and return it.

    An entry loads with ``entry.load(data_root, check_counts=..., classnames_file=...)``. The
    variants are evaluation-only (no train split): a sweep uses them as DG targets, never as
    few-shot classification datasets.

    Raises:
        ConfigError: the table already has one of the keys for another entry.
    """
    for key, spec in VARIANTS.items():
        if key in table and table[key] is not spec:
            raise ConfigError(f"dataset table already has an entry {key!r}")
        table[key] = spec
    return table


# --------------------------------------------------------------------------------------------
# class names


def read_imagenet_classnames(path: str | Path) -> list[str]:
    """The 1000 ImageNet class names in class-index order, from a class-name file.

    Two forms are read: CoOp's ``classnames.txt`` (``<wnid> <name>`` per line, any order; a
    line per WNID) or a plain list of 1000 names in class-index order (one per line).

    Raises:
        DatasetError: missing or unreadable file, a WNID line with no name, a plain list that
            does not have 1000 names, or WNIDs missing from a WNID file.
    """
    path = Path(path)
    try:
        lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    except FileNotFoundError:
        raise DatasetError(f"class-name file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as error:
        raise DatasetError(f"cannot read the class-name file {path}: {error}") from None
    lines = [line for line in lines if line]
    if lines and all(_WNID.match(line.split(maxsplit=1)[0]) for line in lines):
        names: dict[str, str] = {}
        for number, line in enumerate(lines, 1):
            match = _WNID_LINE.match(line)
            if match is None:
                raise DatasetError(f"{path}, line {number}: expected '<wnid> <class name>'")
            names[match.group(1)] = match.group(2).strip()
        missing = [w for w in imagenet_wnids() if w not in names]
        if missing:
            raise DatasetError(
                f"{path}: no class name for {len(missing)} ImageNet WNID(s) (e.g. "
                f"{', '.join(missing[:3])}); use ImageNet's complete classnames.txt"
            )
        return [names[w] for w in imagenet_wnids()]
    if len(lines) != NUM_IMAGENET_CLASSES:
        raise DatasetError(
            f"{path} has {len(lines)} class names, expected {NUM_IMAGENET_CLASSES} (one per line "
            "in ImageNet class-index order) or '<wnid> <class name>' lines"
        )
    return lines


def _classnames_file(spec: VariantSpec, root: Path, data_root: Path) -> Path:
    for candidate in (root / "classnames.txt", data_root / "imagenet" / "classnames.txt"):
        if candidate.is_file():
            return candidate
    raise DatasetError(
        f"{root / 'classnames.txt'} does not exist (nor {data_root / 'imagenet' / 'classnames.txt'});"
        f" copy ImageNet's classnames.txt ('<wnid> <class name>' per line, CoOp's DATASETS.md) into "
        f"{root}, or pass classnames_file=<a class-name file>"
    )


# --------------------------------------------------------------------------------------------
# loading


def _class_folders(spec: VariantSpec, image_dir: Path) -> list[tuple[int, str]]:
    """(ImageNet index, folder name) of every class folder, in ImageNet order."""
    folders = [p.name for p in image_dir.iterdir() if p.is_dir() and not p.name.startswith(".")]
    if not folders:
        raise DatasetError(
            f"{image_dir} has no class folders; {spec.display_name} ships one folder per class "
            + ("named 0 ... 999" if spec.layout == "index" else "named by WNID (n01440764 ...)")
        )
    if spec.layout == "index":
        bad = [f for f in folders if not (f.isdigit() and int(f) < NUM_IMAGENET_CLASSES)]
        if bad:
            raise DatasetError(
                f"{image_dir}: folder(s) {', '.join(sorted(bad)[:5])} are not ImageNet class "
                "indices 0 ... 999 (ImageNet-V2's matched-frequency layout)"
            )
        return sorted((int(f), f) for f in folders)
    position = _imagenet_position()
    unknown = sorted(f for f in folders if f not in position)
    if unknown:
        raise DatasetError(
            f"{image_dir}: folder(s) {', '.join(unknown[:5])} are not ImageNet-1k WNIDs; "
            f"{spec.display_name} has one folder per WNID"
        )
    if spec.subset:
        allowed = set(_read_wnid_file(spec.subset))
        foreign = sorted(f for f in folders if f not in allowed)
        if foreign:
            raise DatasetError(
                f"{image_dir}: folder(s) {', '.join(foreign[:5])} are not among "
                f"{spec.display_name}'s {len(allowed)} classes (clipadapt/data/wnids/{spec.subset})"
            )
    return sorted((position[f], f) for f in folders)


def load_imagenet_variant(
    name: str,
    data_root: str | Path,
    *,
    classnames_file: str | Path | None = None,
    check_counts: bool = True,
) -> ImageDataset:
    """Load ImageNet-V2, -Sketch, -A or -R from its release layout under ``data_root``.

    Args:
        name: ``imagenet_v2``, ``imagenet_sketch``, ``imagenet_a`` or ``imagenet_r`` (display
            names and aliases such as ``ImageNet-A`` work too).
        data_root: the folder holding ``imagenetv2/``, ``imagenet-sketch/``,
            ``imagenet-adversarial/`` and ``imagenet-rendition/`` (see the module docstring).
        classnames_file: ImageNet class names (CoOp's ``classnames.txt`` or a plain list of 1000
            names); default: the variant folder's ``classnames.txt``, else
            ``<data_root>/imagenet/classnames.txt``.
        check_counts: require the complete release (every class folder and the image count);
            False accepts a partial copy, whose numbers are then not comparable.

    Returns:
        An evaluation-only :class:`~clipadapt.data.datasets.ImageDataset`: a ``"test"`` split
        and no train split; ``metadata["wnids"]`` and ``metadata["imagenet_classes"]`` give
        each class's WNID and ImageNet-1k index, and ``metadata["bundle_metadata"]`` the
        strings a feature bundle of it must carry (:func:`bundle_metadata`).

    Raises:
        DatasetError: unknown name, missing folders or class names, a folder that is not an
            ImageNet class (or not in A's/R's 200), a class folder without images, count
            mismatch.
    """
    spec = get_variant_spec(name)
    data_root = Path(data_root).expanduser()
    root = data_root / spec.folder
    hint = (
        f"{spec.display_name} must be laid out as {spec.folder}/{spec.image_dirs[0]}/ under the "
        f"data root (download: {spec.url})"
    )
    if not root.is_dir():
        raise DatasetError(f"dataset root {root} does not exist; {hint}")
    image_dir = next((root / d for d in spec.image_dirs if (root / d).is_dir()), None)
    if image_dir is None:
        raise DatasetError(f"{root / spec.image_dirs[0]} does not exist; {hint}")
    image_dir = Path(os.path.abspath(image_dir))
    names_path = (
        Path(classnames_file) if classnames_file else _classnames_file(spec, root, data_root)
    )
    all_names = read_imagenet_classnames(names_path)
    classes = _class_folders(spec, image_dir)
    all_wnids = imagenet_wnids()
    items: list[ImageItem] = []
    empty = []
    for label, (index, folder) in enumerate(classes):
        files = scan_images(image_dir / folder)
        if not files:
            empty.append(folder)
        items.extend(ImageItem(image_dir / folder / f, label, all_names[index]) for f in files)
    if empty:
        raise DatasetError(
            f"{image_dir}: {len(empty)} class folder(s) contain no images: {', '.join(empty[:5])}"
        )
    if check_counts:
        problems = []
        if len(classes) != spec.num_classes:
            if spec.layout == "index":
                expected = {str(i) for i in range(NUM_IMAGENET_CLASSES)}
            else:
                expected = set(subset_wnids(spec.key))
            absent = sorted(expected - {folder for _, folder in classes})
            problems.append(
                f"{len(classes)} class folders (expected {spec.num_classes}; missing e.g. "
                f"{', '.join(absent[:3])})"
            )
        if len(items) != spec.num_images:
            problems.append(f"{len(items)} images (expected {spec.num_images})")
        if problems:
            raise DatasetError(
                f"{image_dir}: {'; '.join(problems)} for the complete {spec.display_name} release; "
                "use a complete copy (or pass check_counts=False, --partial on the command "
                "line, for a partial one; its numbers are then not comparable with published "
                "ones)"
            )
    indices = [index for index, _ in classes]
    wnids = [all_wnids[i] for i in indices]
    dataset = ImageDataset(
        name=spec.key,
        root=Path(os.path.abspath(root)),
        classnames=[all_names[i] for i in indices],
        splits={"test": items},
        template=spec.template,
    )
    dataset.metadata = {
        "display_name": spec.display_name,
        "source_dataset": "imagenet",
        WNIDS_KEY: wnids,
        IMAGENET_CLASSES_KEY: indices,
        "classnames_file": str(names_path),
    }
    dataset.metadata["bundle_metadata"] = bundle_metadata(dataset)
    log.info(
        "%s: %d classes, %d images from %s", spec.display_name, len(classes), len(items), image_dir
    )
    return dataset


# --------------------------------------------------------------------------------------------
# bundle metadata


def wnid_metadata(wnids: Sequence[str]) -> dict[str, str]:
    """Bundle metadata for classes given by WNIDs: ``wnids`` and ``imagenet_classes`` (JSON).

    A bundle of ImageNet itself (its sorted train folders) should carry it too, so a target is
    mapped by WNID even when the source is a partial copy.

    Raises:
        ConfigError: a WNID that is not an ImageNet-1k class.
    """
    wnids = list(wnids)
    return {
        WNIDS_KEY: json.dumps(wnids),
        IMAGENET_CLASSES_KEY: json.dumps(imagenet_indices(wnids)),
    }


def bundle_metadata(dataset: Any) -> dict[str, str]:
    """The metadata strings a feature bundle extracted from ``dataset`` must carry.

    For a dataset with ``metadata["wnids"]`` (the ImageNet variants): ``wnids`` and
    ``imagenet_classes`` (JSON lists, one per class in label order), which the DG task uses to
    map the bundle's columns onto the source's. Empty for other datasets.
    """
    wnids = (getattr(dataset, "metadata", None) or {}).get(WNIDS_KEY)
    return wnid_metadata(wnids) if wnids else {}


def add_bundle_metadata(path: str | Path, metadata: dict[str, Any]) -> Path:
    """Rewrite a feature bundle with extra metadata entries (atomically; tensors unchanged).

    For bundles made before the mapping was recorded, or elsewhere: for example
    ``add_bundle_metadata("imagenet_a.safetensors", wnid_metadata(subset_wnids("imagenet_a")))``
    for a bundle whose 200 columns are ImageNet-A's classes in sorted-WNID order.

    Raises:
        BundleError: the file is not a readable bundle.
    """
    from clipadapt.data.bundle import load_bundle, save_bundle

    bundle = load_bundle(path)
    extra = {k: v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()}
    return save_bundle(path, bundle.tensors, {**bundle.metadata, **extra})
