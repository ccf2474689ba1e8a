"""Image datasets: the 11 CoOp datasets, clipadapt dataset folders and plain ImageFolder trees.

Three ways to name a dataset (:func:`load_dataset`):

* a registered key (``caltech101``, ``dtd``, ... see :data:`DATASETS`): the CoOp layout under a
  data root, ``<data_root>/<folder>/<image dir>`` plus the fixed split file
  ``split_zhou_<Name>.json`` (FGVCAircraft: the ``images_variant_*.txt`` files; ImageNet: the
  ``images/train`` and ``images/val`` WNID folders plus ``classnames.txt``). A missing split file
  is an error: regenerated splits are not comparable with published numbers (baselines spec
  §1.2), so they are never made silently. Class and split counts are checked against the CoOp
  statistics (spec §1.1).
* a *clipadapt dataset folder*: ``split.json`` in split_zhou format (paths relative to the
  folder), an optional ``dataset.json`` (``name``, ``classnames``, ``template``, ``templates``,
  ``descriptions``, ``augmentation``) and an optional CuPL-style ``descriptions.json``.
* a plain ImageFolder tree ``root/<class>/<image>``: a deterministic, stratified train/val/test
  split is made once and saved beside the feature cache (``<cache>/splits/``, see
  :func:`split_path_for`) or where ``split_file`` says, never inside the user's image tree;
  later loads read that file, and a tree that no longer matches it (images or classes added or
  removed) is an error whose fix is ``resplit=True`` (``--resplit``).

A dataset's *files fingerprint* (:meth:`ImageDataset.files_fingerprint`) covers the sorted
relative paths with each file's size and modification time (or, in ``content`` mode, its
sha256); it keys the bundles the bench reuses and the results' resume key.

Errors are :class:`~clipadapt.exceptions.DatasetError` with a message that names the file and
the fix.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from clipadapt._utils import atomic_write_text, clean_name, safe_name, sha256_file, stable_hash
from clipadapt.data.fewshot import FewShotDraw, draw_few_shot
from clipadapt.data.prompts import GENERIC_TEMPLATE, TEMPLATES, check_template, resolve_templates
from clipadapt.data.tables import read_table
from clipadapt.exceptions import ConfigError, DatasetError

log = logging.getLogger(__name__)

#: File extensions read as images, compared case-insensitively.
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})
SPLITS = ("train", "val", "test")
SPLIT_FILENAME = "split.json"
#: How a dataset's files are fingerprinted: ``stat`` (size and modification time, cheap) or
#: ``content`` (sha256 of every file, for the suspicious).
FINGERPRINT_MODES = ("stat", "content")
#: The key of a split file that records that clipadapt made it (and how): such a split must
#: match its ImageFolder tree exactly.
MADE_BY_KEY = "clipadapt"
DATASET_FILENAME = "dataset.json"
DESCRIPTIONS_FILENAME = "descriptions.json"
DATA_ROOT_ENV = "CLIPADAPT_DATA_ROOT"
_DATASET_JSON_KEYS = {"name", "classnames", "template", "templates", "descriptions", "augmentation"}


def parse_augmentation(value: Any, where: str) -> dict[str, Any]:
    """A dataset's declared train-view augmentation, checked: ``{"scale": [lo, hi], "flip": p}``.

    ``scale`` is the random-resized-crop area range (``0 < lo <= hi <= 1``; ``[1, 1]`` keeps the
    whole image), ``flip`` the probability of a horizontal flip (``0`` for none; a bool means 0.5
    or 0). Both are optional; a missing one keeps the extractor's default. A dataset declares one
    when the default crops (50-100 % of the image) would change what its labels mean, e.g. the
    number or relative size of the objects.

    Raises:
        DatasetError: not an object, an unknown key or a value out of range (names ``where``).
    """
    if not isinstance(value, dict):
        raise DatasetError(
            f'{where}: \'augmentation\' must be an object like {{"scale": [0.9, 1.0], "flip": 0.5}}'
        )
    unknown = sorted(set(value) - {"scale", "flip"})
    if unknown:
        raise DatasetError(
            f"{where}: 'augmentation' has unknown key(s) {', '.join(unknown)}; "
            "expected 'scale' and/or 'flip'"
        )
    out: dict[str, Any] = {}
    if "scale" in value:
        scale = value["scale"]
        ok = (
            isinstance(scale, list)
            and len(scale) == 2
            and all(isinstance(x, int | float) and not isinstance(x, bool) for x in scale)
            and 0 < scale[0] <= scale[1] <= 1
        )
        if not ok:
            raise DatasetError(
                f"{where}: 'augmentation.scale' must be [lo, hi] with 0 < lo <= hi <= 1, "
                f"got {scale!r}"
            )
        out["scale"] = [float(scale[0]), float(scale[1])]
    if "flip" in value:
        flip = value["flip"]
        if isinstance(flip, bool):
            flip = 0.5 if flip else 0.0
        if not isinstance(flip, int | float) or not 0 <= flip <= 1:
            raise DatasetError(
                f"{where}: 'augmentation.flip' must be a probability in [0, 1] or a boolean, "
                f"got {value['flip']!r}"
            )
        out["flip"] = float(flip)
    return out


@dataclass(frozen=True)
class ImageItem:
    """One image of a split.

    Attributes:
        path: absolute path of the image file.
        label: class index in ``[0, C)``.
        classname: the class name used in prompts.
    """

    path: Path
    label: int
    classname: str


@dataclass(frozen=True)
class DatasetSpec:
    """How one of the CoOp datasets is laid out on disk (baselines spec §1.1).

    Attributes:
        key: registry key (``oxford_pets``).
        display_name: name in tables (``OxfordPets``).
        folder: the dataset folder under the data root.
        image_dir: the image folder inside ``folder`` ("" when split paths are relative to
            ``folder`` itself, as for StanfordCars).
        split_file: the split file name inside ``folder`` (None for the ImageNet folder layout).
        template: CoOp's hand-crafted prompt.
        num_classes: C.
        num_train, num_val, num_test: split sizes of the fixed CoOp split (``num_val`` is None
            for ImageNet, which has no val split).
        layout: ``"coop"`` (split_zhou JSON), ``"fgvc"`` (FGVC's txt files) or ``"imagenet"``
            (WNID folders).
        aliases: other accepted names (already normalised with ``clean_name``).
    """

    key: str
    display_name: str
    folder: str
    image_dir: str
    split_file: str | None
    template: str
    num_classes: int
    num_train: int
    num_val: int | None
    num_test: int
    layout: str = "coop"
    aliases: tuple[str, ...] = ()

    @property
    def sizes(self) -> dict[str, int]:
        """Expected entries per split (splits the dataset lacks are left out)."""
        sizes = {"train": self.num_train, "val": self.num_val, "test": self.num_test}
        return {k: v for k, v in sizes.items() if v is not None}


def _read_registry() -> dict[str, DatasetSpec]:
    specs = {}
    for key, entry in read_table("datasets.yaml").items():
        specs[key] = DatasetSpec(
            key,
            entry["display_name"],
            entry["folder"],
            entry["image_dir"],
            entry["split_file"],
            TEMPLATES[key],
            entry["classes"],
            *entry["sizes"],
            layout=entry.get("layout", "coop"),
            aliases=tuple(entry.get("aliases", ())),
        )
    return specs


#: The 11 CoOp datasets, by key (baselines spec §1.1; the table is ``datasets.yaml`` beside this
#: module, the prompts ``templates.yaml``).
DATASETS: dict[str, DatasetSpec] = _read_registry()


def list_datasets() -> list[str]:
    """The registered dataset keys, in the order of the CoOp statistics table."""
    return list(DATASETS)


def _lookup(name: str) -> DatasetSpec | None:
    key = clean_name(name)
    for spec in DATASETS.values():
        if key in (spec.key, clean_name(spec.display_name), *spec.aliases):
            return spec
    return None


def get_dataset_spec(name: str) -> DatasetSpec:
    """The :class:`DatasetSpec` of a registered dataset (key, display name or alias).

    Raises:
        DatasetError: unknown name; the message lists the known keys.
    """
    spec = _lookup(name)
    if spec is None:
        raise DatasetError(
            f"unknown dataset {name!r}; known datasets: {', '.join(DATASETS)} (or pass the path "
            "of an ImageFolder tree or a folder with split.json)"
        )
    return spec


@dataclass
class ImageDataset:
    """A labelled image dataset with its splits and prompts.

    Attributes:
        name: dataset name (registry key, ``dataset.json`` name or folder name).
        root: the dataset folder.
        classnames: C class names, in label order (used in prompts).
        splits: ``"train"``/``"val"``/``"test"`` -> items; a split the dataset lacks is absent
            (ImageNet has no ``"val"``; an evaluation-only dataset has no or an empty
            ``"train"``).
        template: the hand-crafted prompt.
        templates: the default template ensemble (``[template]`` unless configured).
        descriptions: a CuPL-style description file shipped with the dataset, if any.
        missing: split entries (paths relative to the image folder) whose file does not exist
            and that were dropped because missing files were allowed.
        split_path: the file the splits were read from (None for folder layouts).
        metadata: extra keys of a folder's ``dataset.json`` beyond the documented ones
            (for example the world generator's ``domain_of``).
        augmentation: the train-view augmentation the dataset declares as label-preserving
            (``{"scale": [lo, hi], "flip": p}``, see :func:`parse_augmentation`); None: the
            extractor's default.
    """

    name: str
    root: Path
    classnames: list[str]
    splits: dict[str, list[ImageItem]]
    template: str = GENERIC_TEMPLATE
    templates: list[str] = field(default_factory=list)
    descriptions: Path | None = None
    missing: list[str] = field(default_factory=list)
    split_path: Path | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    augmentation: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if not self.templates:
            self.templates = [self.template]

    @property
    def num_classes(self) -> int:
        return len(self.classnames)

    def split(self, split: str) -> list[ImageItem]:
        """The items of ``split``.

        Raises:
            DatasetError: the dataset has no such split.
        """
        if split not in self.splits:
            raise DatasetError(
                f"dataset {self.name!r} has no {split!r} split (splits: {', '.join(self.splits)})"
            )
        return self.splits[split]

    def labels(self, split: str) -> Tensor:
        """(N,) int64 labels of ``split``."""
        return torch.tensor([item.label for item in self.split(split)], dtype=torch.long)

    def paths(self, split: str) -> list[Path]:
        """The N image paths of ``split``."""
        return [item.path for item in self.split(split)]

    def sizes(self) -> dict[str, int]:
        """Number of items per split."""
        return {name: len(items) for name, items in self.splits.items()}

    def draw(self, shots: int, seed: int, **kwargs: Any) -> FewShotDraw:
        """A K-shot draw over the train split (and val, or carved from train when absent).

        Paths are the sort keys, so the draw does not depend on listing order. Keyword
        arguments go to :func:`~clipadapt.data.fewshot.draw_few_shot`.
        """
        train = self.splits.get("train")
        if not train:
            raise DatasetError(
                f"dataset {self.name!r} has no training images (an evaluation-only dataset); "
                "draw shots from the dataset the method is adapted on"
            )
        val = self.splits.get("val")
        return draw_few_shot(
            [item.label for item in train],
            shots,
            seed,
            num_classes=self.num_classes,
            val_labels=None if not val else [item.label for item in val],
            train_keys=[item.path.as_posix() for item in train],
            val_keys=None if not val else [item.path.as_posix() for item in val],
            classnames=self.classnames,
            **kwargs,
        )

    def fingerprint(self) -> str:
        """A 16-hex-digit hash of the class names and the splits (paths relative to ``root``).

        It does not depend on where the data root is mounted, so feature caches keyed by it
        survive moving the dataset; it changes when any split entry or class name changes.
        """
        return stable_hash({"classnames": self.classnames, "splits": self.to_split_dict()})

    def file_stamps(self, mode: str = "stat") -> dict[str, str]:
        """Each listed image file (absolute path) -> its stamp: ``"<size>:<mtime_ns>"`` in
        ``stat`` mode, the file's sha256 in ``content`` mode. Computed once per mode.

        Raises:
            ConfigError: an unknown mode.
            DatasetError: a listed file cannot be read.
        """
        check_fingerprint_mode(mode)
        cache = self.__dict__.setdefault("_stamps", {})
        if mode not in cache:
            paths = sorted({str(item.path) for items in self.splits.values() for item in items})
            cache[mode] = {path: file_stamp(path, mode) for path in paths}
        return cache[mode]

    def files_fingerprint(self, mode: str = "stat") -> str:
        """A 16-hex-digit hash of the splits (:meth:`fingerprint`) and of every listed file's
        relative path with its stamp (:meth:`file_stamps`).

        It does not depend on where the dataset sits; it changes when a file is rewritten (new
        size or modification time; in ``content`` mode, new bytes), added to or removed from
        the split. It keys the bundles ``clipadapt bench --dataset`` reuses and the results'
        resume key.
        """
        stamps = self.file_stamps(mode)
        files = sorted([_relative(Path(path), self.root), stamp] for path, stamp in stamps.items())
        return stable_hash({"splits": self.fingerprint(), "mode": mode, "files": files})

    def to_split_dict(self, image_dir: str | Path | None = None) -> dict[str, list[list[Any]]]:
        """The splits in split_zhou form, paths relative to ``image_dir`` (default ``root``)."""
        base = Path(image_dir) if image_dir is not None else self.root
        return {
            name: [[_relative(item.path, base), item.label, item.classname] for item in items]
            for name, items in self.splits.items()
        }


def check_fingerprint_mode(mode: str) -> str:
    """``mode`` if it is one of :data:`FINGERPRINT_MODES`.

    Raises:
        ConfigError: another value (the message lists the modes).
    """
    if mode not in FINGERPRINT_MODES:
        raise ConfigError(
            f"unknown fingerprint mode {mode!r}; use one of {', '.join(FINGERPRINT_MODES)} "
            "(stat: sizes and modification times; content: a hash of every file)"
        )
    return mode


def file_stamp(path: str | Path, mode: str = "stat") -> str:
    """A file's stamp: ``"<size>:<mtime_ns>"`` (``stat``) or its sha256 (``content``).

    Raises:
        DatasetError: the file cannot be read.
    """
    try:
        if mode == "content":
            return sha256_file(path)
        info = os.stat(path)
    except OSError as error:
        raise DatasetError(f"cannot read {path}: {error.strerror or error}") from None
    return f"{info.st_size}:{info.st_mtime_ns}"


def _relative(path: Path, base: Path) -> str:
    try:
        return path.relative_to(base).as_posix()
    except ValueError:
        return os.path.relpath(path, base).replace(os.sep, "/")


def is_image_file(path: str | Path) -> bool:
    """True when the file name has an image extension (case-insensitive)."""
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


def _listing(values: Sequence[Any], limit: int = 5) -> str:
    shown = ", ".join(str(v) for v in values[:limit])
    return shown + (f" ... ({len(values) - limit} more)" if len(values) > limit else "")


# --------------------------------------------------------------------------------------------
# split files


def _load_json(path: Path, expected: str) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DatasetError(f"{path} does not exist") from None
    except (OSError, UnicodeDecodeError) as error:
        raise DatasetError(f"cannot read {path}: {error}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise DatasetError(
            f"{path} is not valid JSON (line {error.lineno}, column {error.colno}: {error.msg}); "
            f"expected {expected}. Re-download or regenerate the file"
        ) from None


def _parse_split_dict(data: Any, where: str) -> dict[str, list[tuple[str, int, str]]]:
    """Validate the split_zhou structure; returns split -> (relative_path, label, classname)."""
    form = '{"train": [[relative_path, label, classname], ...], "val": [...], "test": [...]}'
    if not isinstance(data, dict):
        raise DatasetError(f"{where}: expected a JSON object {form}, got {type(data).__name__}")
    unknown = sorted(set(data) - set(SPLITS) - {MADE_BY_KEY})
    if unknown:
        raise DatasetError(
            f"{where}: unknown key(s) {', '.join(map(repr, unknown))}; a split file has only "
            f"'train', 'val' and 'test' ({form})"
        )
    if not set(data) & set(SPLITS):
        raise DatasetError(f"{where}: has none of 'train', 'val', 'test'; expected {form}")
    out: dict[str, list[tuple[str, int, str]]] = {}
    for split in SPLITS:
        if split not in data:
            continue
        entries = data[split]
        if not isinstance(entries, list):
            raise DatasetError(f"{where}: '{split}' must be a list of [relative_path, label, name]")
        parsed = []
        for i, entry in enumerate(entries):
            ok = (
                isinstance(entry, list | tuple)
                and len(entry) == 3
                and isinstance(entry[0], str)
                and isinstance(entry[1], int)
                and not isinstance(entry[1], bool)
                and isinstance(entry[2], str)
            )
            if not ok:
                raise DatasetError(
                    f"{where}: {split}[{i}] is {json.dumps(entry)[:80]}; each entry must be "
                    '[relative_path, integer label, classname], e.g. ["cat/001.jpg", 0, "cat"]'
                )
            if entry[1] < 0:
                raise DatasetError(f"{where}: {split}[{i}] has a negative label {entry[1]}")
            parsed.append((entry[0], entry[1], entry[2]))
        out[split] = parsed
    return out


def _classnames_from(entries: dict[str, list[tuple[str, int, str]]], where: str) -> list[str]:
    """Class names by label, checking names agree, labels are contiguous and train covers C."""
    names: dict[int, tuple[str, str]] = {}
    for split, rows in entries.items():
        for i, (_, label, name) in enumerate(rows):
            seen = names.setdefault(label, (name, f"{split}[{i}]"))
            if seen[0] != name:
                raise DatasetError(
                    f"{where}: label {label} is called {seen[0]!r} in {seen[1]} but {name!r} in "
                    f"{split}[{i}]; each label needs one class name"
                )
    if not names:
        raise DatasetError(f"{where}: the split file lists no images")
    num_classes = max(names) + 1
    absent = [label for label in range(num_classes) if label not in names]
    if absent:
        raise DatasetError(
            f"{where}: labels are not contiguous: no entry has label {_listing(absent)} "
            f"(labels must be 0..C-1; the largest is {num_classes - 1}); renumber the labels"
        )
    classnames = [names[label][0] for label in range(num_classes)]
    # An evaluation-only dataset (a domain-shift target such as a sketch variant) has no train
    # images at all; a train split that misses some classes is an error.
    if entries.get("train"):
        _check_train_covers(entries["train"], classnames, where)
    by_name: dict[str, int] = {}
    for label, name in enumerate(classnames):
        if name in by_name:
            log.warning(
                "%s: labels %d and %d share the class name %r", where, by_name[name], label, name
            )
        by_name.setdefault(name, label)
    return classnames


def _check_train_covers(
    rows: Iterable[tuple[Any, int, Any]], classnames: list[str], where: str
) -> None:
    counts = [0] * len(classnames)
    for _, label, _ in rows:
        counts[label] += 1
    empty = [f"{label} ({classnames[label]!r})" for label, n in enumerate(counts) if n == 0]
    if empty:
        raise DatasetError(
            f"{where}: {len(empty)} class(es) have zero training images: {_listing(empty)}; "
            "add images for them or remove the class"
        )


def _find_missing(paths: Sequence[Path]) -> list[int]:
    """Indices of ``paths`` that do not exist, listing each parent folder once."""
    listed: dict[Path, set[str] | None] = {}
    missing = []
    for i, path in enumerate(paths):
        parent = path.parent
        if parent not in listed:
            try:
                listed[parent] = set(os.listdir(parent))
            except OSError:
                listed[parent] = None
        names = listed[parent]
        if names is None or path.name not in names:
            missing.append(i)
    return missing


def _build_dataset(
    entries: dict[str, list[tuple[str, int, str]]],
    image_dir: Path,
    where: str,
    *,
    name: str,
    root: Path,
    check_files: bool,
    allow_missing: bool,
    expected: DatasetSpec | None = None,
    classnames: list[str] | None = None,
    missing_fix: str = "check that the images are in that folder",
) -> ImageDataset:
    """Turn validated split entries into an :class:`ImageDataset` (counts, files checked).

    ``missing_fix`` is the fix a missing-image error names (it depends on who owns the split).
    """
    names = _classnames_from(entries, where)
    if expected is not None:
        _check_counts(entries, len(names), expected, where)
    if classnames is not None:
        if len(classnames) != len(names):
            raise DatasetError(
                f"{where}: {len(names)} classes in the splits but {len(classnames)} class names "
                "given; give one name per label"
            )
        names = list(classnames)
    image_dir = Path(os.path.abspath(image_dir))
    splits = {
        split: [ImageItem(image_dir / rel, label, names[label]) for rel, label, _ in rows]
        for split, rows in entries.items()
    }
    missing: list[str] = []
    if check_files:
        for split, items in splits.items():
            gone = _find_missing([item.path for item in items])
            if not gone:
                continue
            rels = [entries[split][i][0] for i in gone]
            if not allow_missing:
                raise DatasetError(
                    f"{len(gone)} of {len(items)} {split} images listed in {where} are missing "
                    f"under {image_dir} (e.g. {_listing(rels, 3)}); {missing_fix}"
                )
            log.warning(
                "%s: %d of %d %s images are missing and were dropped (e.g. %s)",
                where, len(gone), len(items), split, _listing(rels, 3),
            )  # fmt: skip
            missing.extend(rels)
            drop = set(gone)
            splits[split] = [item for i, item in enumerate(items) if i not in drop]
        if missing and splits.get("train"):
            _check_train_covers(
                ((None, item.label, None) for item in splits["train"]), names, where
            )
    return ImageDataset(name=name, root=root, classnames=names, splits=splits, missing=missing)


def _check_counts(
    entries: dict[str, Sequence[Any]], num_classes: int, spec: DatasetSpec, where: str
) -> None:
    found = {split: len(rows) for split, rows in entries.items()}
    problems = []
    if num_classes != spec.num_classes:
        problems.append(f"{num_classes} classes (expected {spec.num_classes})")
    for split, n in spec.sizes.items():
        if found.get(split, 0) != n:
            problems.append(f"{found.get(split, 0)} {split} images (expected {n})")
    if problems:
        raise DatasetError(
            f"{where}: {'; '.join(problems)} for the CoOp {spec.display_name} split; use the "
            "official split file and a complete copy of the images (or pass check_counts=False, "
            "--partial on the command line, for a modified copy; its numbers are then not "
            "comparable with published ones)"
        )


def read_split_file(
    path: str | Path,
    image_dir: str | Path,
    *,
    name: str | None = None,
    check_files: bool = True,
    allow_missing: bool = False,
    expected: DatasetSpec | None = None,
    template: str = GENERIC_TEMPLATE,
) -> ImageDataset:
    """Read a split_zhou JSON file (``{"train"|"val"|"test": [[rel_path, label, name], ...]}``).

    Args:
        path: the split file.
        image_dir: the folder the relative paths start from.
        name: dataset name (default: the file stem without ``split_zhou_``).
        check_files: check that every listed image exists (set False to read a split without
            its images, e.g. to inspect it).
        allow_missing: drop missing images (listed in ``ImageDataset.missing``, with a warning)
            instead of raising.
        expected: a registered dataset whose class and split counts must match.
        template: the dataset's hand-crafted prompt.

    Returns:
        The dataset; class names come from the entries, in label order.

    Raises:
        DatasetError: missing or malformed file, a label with two names, labels not
            contiguous, a class without training images, count mismatch, missing images.

    Example:
        >>> ds = read_split_file("split_zhou_DescribableTextures.json", "dtd/images",
        ...                      check_files=False)  # doctest: +SKIP
    """
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"split file {path} does not exist")
    entries = _parse_split_dict(_load_json(path, "a split_zhou object"), str(path))
    default_name = path.stem.removeprefix("split_zhou_")
    dataset = _build_dataset(
        entries,
        Path(image_dir),
        str(path),
        name=name or default_name,
        root=Path(os.path.abspath(image_dir)),
        check_files=check_files,
        allow_missing=allow_missing,
        expected=expected,
    )
    dataset.template = check_template(template)
    dataset.templates = [dataset.template]
    dataset.split_path = path
    return dataset


def format_split_json(split: dict[str, list[list[Any]]]) -> str:
    """Serialise a split dict with one entry per line (diff-friendly, still valid JSON)."""
    blocks = []
    for name in SPLITS:
        if name not in split:
            continue
        rows = ",\n".join("    " + json.dumps(row, ensure_ascii=False) for row in split[name])
        blocks.append(f'  "{name}": [\n{rows}\n  ]' if rows else f'  "{name}": []')
    if MADE_BY_KEY in split:
        blocks.append(f'  "{MADE_BY_KEY}": {json.dumps(split[MADE_BY_KEY], sort_keys=True)}')
    return "{\n" + ",\n".join(blocks) + "\n}\n"


# --------------------------------------------------------------------------------------------
# ImageFolder trees


def _round_half_up(x: float) -> int:
    return int(math.floor(x + 0.5))


def scan_images(folder: Path) -> list[str]:
    """Image files under ``folder`` (recursive, hidden entries skipped), sorted, relative."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        base = Path(dirpath)
        found.extend(
            (base / f).relative_to(folder).as_posix()
            for f in filenames
            if not f.startswith(".") and is_image_file(f)
        )
    return sorted(found)


def make_imagefolder_split(
    root: str | Path,
    *,
    val_fraction: float = 0.2,
    test_fraction: float = 0.3,
    seed: int = 0,
) -> dict[str, list[list[Any]]]:
    """A stratified train/val/test split of ``root/<class>/<image>`` (paths relative to root).

    Per class, the sorted image paths are shuffled with a ``random.Random`` seeded by
    ``"{seed}:{classname}"`` (so adding a class leaves the other classes' splits unchanged), then
    ``round(n·test_fraction)`` go to test, ``round(n·val_fraction)`` to val (half rounds up)
    and the rest, at least one, to train (val shrinks first when a class is too small). Classes are the sorted sub-folder names (labels
    0..C-1); images may sit in nested folders; hidden files and folders are ignored.

    Raises:
        ConfigError: fractions outside [0, 1) or summing to 1 or more.
        DatasetError: no class folders, or a class folder without images.
    """
    root = Path(root)
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise ConfigError(
            f"val_fraction={val_fraction} and test_fraction={test_fraction} must be in [0, 1) "
            "and sum to less than 1 (the rest is train)"
        )
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        loose = [p.name for p in root.iterdir() if p.is_file() and is_image_file(p)]
        hint = f" (found {len(loose)} images directly in it)" if loose else ""
        raise DatasetError(
            f"{root} has no class folders{hint}; an ImageFolder tree is root/<class>/<image>, "
            f"with images ending in {', '.join(sorted(IMAGE_EXTENSIONS))}"
        )
    split: dict[str, list[list[Any]]] = {"train": [], "val": [], "test": []}
    empty = []
    for label, classname in enumerate(classes):
        files = [f"{classname}/{rel}" for rel in scan_images(root / classname)]
        if not files:
            empty.append(classname)
            continue
        random.Random(f"{seed}:{classname}").shuffle(files)
        n = len(files)
        n_test = _round_half_up(n * test_fraction)
        n_val = _round_half_up(n * val_fraction)
        # Train keeps at least one image per class (the few-shot sampler needs it); val gives
        # way before test, since test is what gets scored.
        n_val = min(n_val, n - 1 - min(n_test, n - 1))
        n_test = min(n_test, n - 1 - n_val)
        parts = {"test": files[:n_test], "val": files[n_test : n_test + n_val]}
        parts["train"] = files[n_test + n_val :]
        for name, rows in parts.items():
            split[name].extend([rel, label, classname] for rel in sorted(rows))
    if empty:
        raise DatasetError(
            f"{root}: {len(empty)} class folder(s) contain no images: {_listing(empty)}; add "
            "images (extensions: " + ", ".join(sorted(IMAGE_EXTENSIONS)) + ") or remove them"
        )
    return split


def split_path_for(root: str | Path, split_dir: str | Path | None = None) -> Path:
    """Where clipadapt keeps the split it made of the ImageFolder tree ``root``:
    ``<split_dir>/<folder name>-<hash of the folder's resolved path>.json``, by default under
    ``<cache root>/splits`` (:func:`clipadapt.features.cache.default_cache_dir`), never inside
    the tree."""
    from clipadapt.features.cache import default_cache_dir

    resolved = Path(root).resolve()
    folder = Path(split_dir) if split_dir is not None else default_cache_dir() / "splits"
    return folder / f"{safe_name(resolved.name)}-{stable_hash(str(resolved), 12)}.json"


def fallback_split_path(root: str | Path) -> Path:
    """The split file of ``root`` under the default cache root (:func:`split_path_for`)."""
    return split_path_for(root)


def _save_split(
    split: dict[str, list[list[Any]]], root: Path, target: Path, made_by: dict[str, Any]
) -> Path:
    try:
        atomic_write_text(target, format_split_json({**split, MADE_BY_KEY: made_by}))
    except OSError as error:
        raise DatasetError(
            f"cannot save the split of {root} to {target}: {error}; pass --split-file <a "
            "writable path> (API: split_file=) or --cache-dir"
        ) from None
    counts = ", ".join(f"{len(v)} {k}" for k, v in split.items())
    log.info("made a new split of %s (%s) and saved it to %s", root, counts, target)
    return target


def _tree_changes(root: Path, entries: dict[str, list[tuple[str, int, str]]]) -> dict[str, Any]:
    """How the image files under ``root`` differ from the split's entries (paths relative to
    ``root``): images added, images removed, class folders added."""
    listed = {rel for rows in entries.values() for rel, _, _ in rows}
    found = set(scan_images(root))
    added = sorted(found - listed)
    removed = sorted(listed - found)
    known = {rel.split("/", 1)[0] for rel in listed}
    new_classes = sorted({rel.split("/", 1)[0] for rel in added if "/" in rel} - known)
    return {"added": added, "removed": removed, "new_classes": new_classes}


def _describe_changes(changes: dict[str, Any]) -> str:
    parts = []
    if changes["new_classes"]:
        parts.append(f"new class folder(s) {_listing(changes['new_classes'])}")
    if changes["added"]:
        parts.append(
            f"{len(changes['added'])} image(s) added (e.g. {_listing(changes['added'], 3)})"
        )
    if changes["removed"]:
        parts.append(
            f"{len(changes['removed'])} image(s) removed (e.g. {_listing(changes['removed'], 3)})"
        )
    return ", ".join(parts)


# --------------------------------------------------------------------------------------------
# loaders


def _read_dataset_json(root: Path) -> dict[str, Any]:
    path = root / DATASET_FILENAME
    if not path.is_file():
        return {}
    data = _load_json(path, 'an object like {"name": ..., "classnames": [...]}')
    if not isinstance(data, dict):
        raise DatasetError(f"{path}: expected a JSON object, got {type(data).__name__}")
    unknown = sorted(set(data) - _DATASET_JSON_KEYS)
    if unknown:
        # Producers may add their own keys (the world generator writes ``domain_of``); they are
        # kept in ImageDataset.metadata rather than rejected.
        log.debug("%s: extra key(s) kept as metadata: %s", path, ", ".join(unknown))
    if "name" in data and not isinstance(data["name"], str):
        raise DatasetError(f"{path}: 'name' must be a string")
    names = data.get("classnames")
    if names is not None and (
        not isinstance(names, list) or not all(isinstance(n, str) and n for n in names)
    ):
        raise DatasetError(f"{path}: 'classnames' must be a list of non-empty strings")
    if "descriptions" in data and not isinstance(data["descriptions"], str):
        raise DatasetError(f"{path}: 'descriptions' must be a file path relative to the folder")
    if "augmentation" in data:
        data["augmentation"] = parse_augmentation(data["augmentation"], str(path))
    try:
        if "template" in data:
            check_template(data["template"], f"{path}: 'template'")
        if "templates" in data and not isinstance(data["templates"], str | list):
            raise ConfigError(f"{path}: 'templates' must be a list of templates or a name")
    except ConfigError as error:
        raise DatasetError(str(error)) from None
    return data


def _load_folder(
    root: Path,
    *,
    split_file: Path | None,
    split_dir: Path | None,
    make_split: bool,
    resplit: bool,
    val_fraction: float,
    test_fraction: float,
    split_seed: int,
    check_files: bool,
    allow_missing: bool,
) -> ImageDataset:
    meta = _read_dataset_json(root)
    ours = split_file if split_file is not None else split_path_for(root, split_dir)
    own = root / SPLIT_FILENAME  # a dataset folder's own split (or one an older clipadapt wrote)
    if resplit:
        if meta.get("classnames") is not None:
            raise DatasetError(
                f"--resplit makes a new split of an ImageFolder tree, but {root} is a dataset "
                f"folder whose {DATASET_FILENAME} fixes its classes; regenerate the folder or "
                f"edit its {SPLIT_FILENAME}"
            )
        path = None
    elif ours.is_file():
        path = ours
        if split_file is None and own.is_file():
            log.info("%s: using the split %s made by --resplit, not its %s", root, ours, own.name)
    elif split_file is None and own.is_file():
        path = own
    else:
        path = None
    if path is None:
        if not make_split and not resplit:
            raise DatasetError(
                f"{root} has no {SPLIT_FILENAME}; pass make_split=True to make a stratified "
                "split of its ImageFolder tree, or pass split_file=<a split_zhou JSON file>"
            )
        split = make_imagefolder_split(
            root, val_fraction=val_fraction, test_fraction=test_fraction, seed=split_seed
        )
        made_by = {
            "made_by": "make_imagefolder_split",
            "seed": split_seed,
            "val_fraction": val_fraction,
            "test_fraction": test_fraction,
        }
        path = _save_split(split, root, ours, made_by)
    data = _load_json(path, "a split_zhou object")
    entries = _parse_split_dict(data, str(path))
    made_here = isinstance(data, dict) and MADE_BY_KEY in data
    if made_here or check_files:
        changes = _tree_changes(root, entries)
        what = _describe_changes(changes)
        if made_here and what:
            # clipadapt made this split from the tree: any difference means the tree changed
            # since, and going on would silently leave the new images and classes out
            raise DatasetError(
                f"the split {path} of {root} no longer matches the folder: {what}; pass "
                "--resplit (API: resplit=True) to make a new split of the folder as it is now "
                "(results on the old split are not comparable with the new one)"
            )
        if changes["added"] or changes["new_classes"]:
            log.warning(
                "%s: %s not in its split %s, so they are not used; add them to the split, or "
                "pass --resplit to make a new split of the whole folder",
                root,
                _describe_changes({**changes, "removed": []}),
                path,
            )
    dataset = _build_dataset(
        entries,
        root,
        str(path),
        name=meta.get("name") or root.name,
        root=root,
        check_files=check_files,
        allow_missing=allow_missing,
        classnames=meta.get("classnames"),
        missing_fix=(
            "check that the images are in that folder, or pass --resplit to make a new split "
            "of the folder as it is now (API: resplit=True; allow_missing=True drops the "
            "missing entries instead)"
        ),
    )
    dataset.split_path = path
    dataset.metadata = {k: v for k, v in meta.items() if k not in _DATASET_JSON_KEYS}
    dataset.augmentation = meta.get("augmentation")
    dataset.template = meta.get("template", GENERIC_TEMPLATE)
    dataset.templates = [dataset.template]
    if meta.get("templates") is not None:
        # Resolved against the dataset so that "single" means this dataset's own template.
        try:
            dataset.templates = resolve_templates(meta["templates"], dataset)
        except ConfigError as error:
            raise DatasetError(f"{root / DATASET_FILENAME}: 'templates': {error}") from None
    descriptions = meta.get("descriptions")
    if descriptions is not None:
        dataset.descriptions = root / descriptions
        if not dataset.descriptions.is_file():
            raise DatasetError(
                f"{root / DATASET_FILENAME} names descriptions file {descriptions!r}, which does "
                f"not exist in {root}"
            )
    elif (root / DESCRIPTIONS_FILENAME).is_file():
        dataset.descriptions = root / DESCRIPTIONS_FILENAME
    return dataset


def _read_fgvc(
    spec: DatasetSpec, root: Path, where_hint: str
) -> dict[str, list[tuple[str, int, str]]]:
    variants = root / "variants.txt"
    if not variants.is_file():
        raise DatasetError(f"{variants} does not exist; {where_hint}")
    classnames = [line.strip() for line in variants.read_text(encoding="utf-8").splitlines()]
    classnames = [c for c in classnames if c]
    label_of = {name: i for i, name in enumerate(classnames)}
    entries: dict[str, list[tuple[str, int, str]]] = {}
    for split in SPLITS:
        path = root / f"images_variant_{split}.txt"
        if not path.is_file():
            raise DatasetError(f"split file {path} does not exist; {where_hint}")
        rows = []
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            image_id, _, variant = line.strip().partition(" ")
            if variant not in label_of:
                raise DatasetError(
                    f"{path}, line {number}: variant {variant!r} is not in {variants}; expected "
                    "'<image_id> <variant name>' with a variant listed in variants.txt"
                )
            rows.append((f"{image_id}.jpg", label_of[variant], variant))
        entries[split] = rows
    return entries


def _read_imagenet(
    spec: DatasetSpec, root: Path, where_hint: str
) -> dict[str, list[tuple[str, int, str]]]:
    names_file = root / "classnames.txt"
    if not names_file.is_file():
        raise DatasetError(
            f"{names_file} does not exist; it maps each WNID to a class name ('n01440764 tench' "
            f"per line, CoOp's DATASETS.md); {where_hint}"
        )
    names: dict[str, str] = {}
    for number, line in enumerate(names_file.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        wnid, _, name = line.strip().partition(" ")
        if not name:
            raise DatasetError(f"{names_file}, line {number}: expected '<wnid> <class name>'")
        names[wnid] = name.strip()
    image_dir = root / spec.image_dir
    train_dir = image_dir / "train"
    if not train_dir.is_dir():
        raise DatasetError(f"{train_dir} does not exist; {where_hint}")
    wnids = sorted(p.name for p in train_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    unnamed = [w for w in wnids if w not in names]
    if unnamed:
        raise DatasetError(
            f"{len(unnamed)} class folder(s) of {train_dir} have no line in {names_file}: "
            f"{_listing(unnamed)}"
        )
    label_of = {w: i for i, w in enumerate(wnids)}
    entries: dict[str, list[tuple[str, int, str]]] = {}
    for split, folder in (("train", "train"), ("test", "val")):
        split_dir = image_dir / folder
        if not split_dir.is_dir():
            raise DatasetError(f"{split_dir} does not exist; {where_hint}")
        rows = []
        for wnid in sorted(p.name for p in split_dir.iterdir() if p.is_dir()):
            if wnid not in label_of:
                raise DatasetError(f"{split_dir / wnid} is not one of the classes of {train_dir}")
            rows.extend(
                (f"{folder}/{wnid}/{rel}", label_of[wnid], names[wnid])
                for rel in scan_images(split_dir / wnid)
            )
        entries[split] = rows
    return entries


def _load_registered(
    spec: DatasetSpec,
    data_root: Path,
    *,
    split_file: Path | None,
    check_files: bool,
    allow_missing: bool,
    check_counts: bool,
) -> ImageDataset:
    root = data_root / spec.folder
    layout_hint = (
        f"{spec.display_name} must be laid out as in CoOp's DATASETS.md under the data root: "
        f"{spec.folder}/" + (f"{spec.image_dir}/" if spec.image_dir else "")
    )
    if not root.is_dir():
        raise DatasetError(
            f"dataset root {root} does not exist; {layout_hint} (pass data_root=<the folder that "
            f"contains {spec.folder}/>)"
        )
    image_dir = root / spec.image_dir if spec.image_dir else root
    expected = spec if check_counts else None
    if spec.layout == "coop" or split_file is not None:
        path = split_file if split_file is not None else root / str(spec.split_file)
        if not path.is_file():
            raise DatasetError(
                f"split file {path} does not exist; download {spec.split_file} (CoOp's "
                f"DATASETS.md links it) into {root}. clipadapt does not regenerate CoOp splits: "
                "a new split is not comparable with published numbers"
            )
        entries = _parse_split_dict(_load_json(path, "a split_zhou object"), str(path))
        where = str(path)
    elif spec.layout == "fgvc":
        entries = _read_fgvc(spec, root, layout_hint)
        where = str(root / "images_variant_*.txt")
        path = None
    else:
        entries = _read_imagenet(spec, root, layout_hint)
        where = str(image_dir)
        path = None
        check_files = False  # the entries come from listing the folders
    dataset = _build_dataset(
        entries,
        image_dir,
        where,
        name=spec.key,
        root=root,
        check_files=check_files,
        allow_missing=allow_missing,
        expected=expected,
    )
    dataset.split_path = path
    dataset.template = spec.template
    dataset.templates = [spec.template]
    if spec.layout == "imagenet" and split_file is None:
        # the sorted train WNIDs, so a domain-generalisation target is mapped onto this
        # bundle's columns by WNID, whatever part of ImageNet this copy holds
        from clipadapt.data.imagenet_variants import wnid_metadata

        wnids = sorted({Path(rel).parts[1] for rel, _, _ in entries["train"]})
        try:
            dataset.metadata["bundle_metadata"] = wnid_metadata(wnids)
        except ConfigError:  # folders that are not ImageNet-1k WNIDs: map by class name
            log.warning("%s: class folders are not all ImageNet-1k WNIDs", image_dir / "train")
    if (root / DESCRIPTIONS_FILENAME).is_file():
        dataset.descriptions = root / DESCRIPTIONS_FILENAME
    return dataset


def load_dataset(
    name_or_path: str | Path,
    data_root: str | Path | None = None,
    *,
    split_file: str | Path | None = None,
    split_dir: str | Path | None = None,
    make_split: bool = True,
    resplit: bool = False,
    val_fraction: float = 0.2,
    test_fraction: float = 0.3,
    split_seed: int = 0,
    check_files: bool = True,
    allow_missing: bool = False,
    check_counts: bool = True,
) -> ImageDataset:
    """Load a registered CoOp dataset, a clipadapt dataset folder or an ImageFolder tree.

    Args:
        name_or_path: a registered key (see :func:`list_datasets`; display names and aliases
            such as ``fgvc`` work too), one of ImageNet's evaluation-only variants
            (``imagenet_v2``, ``imagenet_sketch``, ``imagenet_a``, ``imagenet_r``; see
            :mod:`clipadapt.data.imagenet_variants`), or the path of a dataset folder (relative paths are
            tried under ``data_root`` first), or the path of a split JSON file. A ``Path``
            object or a string containing ``/`` is always read as a path.
        data_root: the folder holding the CoOp dataset folders (default: the
            ``CLIPADAPT_DATA_ROOT`` environment variable).
        split_file: a split_zhou JSON to use instead of the default one. For folders: where the
            split is read from, or saved to when it does not exist yet.
        split_dir: for ImageFolder trees, the folder of the splits clipadapt makes (default
            ``<cache root>/splits``; see :func:`split_path_for`). A split is never written
            into the image tree.
        make_split: make and save a split for an ImageFolder tree without one. Never applies to
            the CoOp datasets, whose fixed split files are required.
        resplit: make a new split of an ImageFolder tree as it is now, replacing the one
            clipadapt made before (the fix for a tree whose images or classes changed).
        val_fraction, test_fraction: per-class fractions of a new ImageFolder split
            (half rounds up; train keeps at least one image per class).
        split_seed: seed of a new ImageFolder split. An existing split file is always reused
            (``resplit=True`` makes a new one).
        check_files: check that every listed image exists.
        allow_missing: drop missing images (recorded in ``missing``, with a warning) instead of
            raising.
        check_counts: require the CoOp class and split counts for registered datasets (and
            the complete release for the ImageNet variants).

    Returns:
        The :class:`ImageDataset`.

    Raises:
        DatasetError: unknown name, missing root or split file, malformed JSON, a label with
            two names, labels not contiguous, a class with zero images, count mismatch,
            missing images, a tree that no longer matches the split clipadapt made of it.
        ConfigError: invalid split fractions.

    Example:
        >>> ds = load_dataset("dtd", "~/data")  # doctest: +SKIP
        >>> ds.num_classes, ds.sizes()  # doctest: +SKIP
        (47, {'train': 2820, 'val': 1128, 'test': 1692})
    """
    if data_root is None and os.environ.get(DATA_ROOT_ENV):
        data_root = os.environ[DATA_ROOT_ENV]
    root_dir = Path(data_root).expanduser() if data_root is not None else None
    split_path = Path(split_file).expanduser() if split_file is not None else None
    text = str(name_or_path)
    # A Path object, or a string with a separator, always means a folder or file.
    looks_like_path = isinstance(name_or_path, Path) or "/" in text or os.sep in text
    spec = None if looks_like_path else _lookup(text)
    variant = None
    if spec is None and not looks_like_path:
        from clipadapt.data.imagenet_variants import find_variant

        variant = find_variant(text)
    if variant is not None:
        if resplit or split_file is not None:
            raise DatasetError(
                f"{variant.key} is an evaluation-only release read from its class folders; "
                "it takes no split file and no --resplit"
            )
        if root_dir is None:
            raise DatasetError(
                f"{variant.key} is an ImageNet variant: pass data_root=<the folder that contains "
                f"{variant.folder}/> (or set {DATA_ROOT_ENV})"
            )
        return variant.load(root_dir, check_counts=check_counts)
    if spec is not None:
        if resplit:
            raise DatasetError(
                f"--resplit makes a new split of an ImageFolder tree; {spec.key} is a CoOp "
                "dataset whose split file is fixed (new splits are not comparable with "
                "published numbers)"
            )
        if root_dir is None:
            raise DatasetError(
                f"{spec.key} is a CoOp dataset: pass data_root=<the folder that contains "
                f"{spec.folder}/> (or set {DATA_ROOT_ENV})"
            )
        return _load_registered(
            spec,
            root_dir,
            split_file=split_path,
            check_files=check_files,
            allow_missing=allow_missing,
            check_counts=check_counts,
        )
    path = Path(name_or_path).expanduser()
    if not path.is_absolute() and root_dir is not None and (root_dir / path).exists():
        path = root_dir / path
    if not path.exists():
        if not looks_like_path:
            raise DatasetError(
                f"unknown dataset {text!r} and no folder of that name; known datasets: "
                f"{', '.join(DATASETS)}; evaluation-only: imagenet_v2, imagenet_sketch, "
                "imagenet_a, imagenet_r (or pass the path of an ImageFolder tree or of a folder "
                "with split.json)"
            )
        raise DatasetError(
            f"dataset root {path} does not exist; pass an ImageFolder tree "
            "(root/<class>/<image>), a folder with split.json, or a registered dataset name "
            "with --data-root"
        )
    if path.is_file():
        if path.suffix.lower() != ".json":
            raise DatasetError(f"{path} is a file; pass a dataset folder or a split JSON file")
        dataset = read_split_file(
            path, path.parent, check_files=check_files, allow_missing=allow_missing
        )
        return dataset
    return _load_folder(
        Path(os.path.abspath(path)),
        split_file=split_path,
        split_dir=Path(split_dir).expanduser() if split_dir is not None else None,
        make_split=make_split,
        resplit=resplit,
        val_fraction=val_fraction,
        test_fraction=test_fraction,
        split_seed=split_seed,
        check_files=check_files,
        allow_missing=allow_missing,
    )
