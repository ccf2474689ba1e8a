"""Bongard-HOI episodes (Jiang et al., CVPR 2022) from the benchmark's release files.

The release (https://github.com/NVlabs/Bongard-HOI, data on Zenodo record 7079175) has

* the images, extracted as ``hake/images/`` with ``hake_images_20190730/``, ``hcvrd/``,
  ``hico_20160224_det/images/{train2015,test2015}/``, ``openimages/images/``,
  ``pic/image/{train,val}/`` and ``vcoco/{train2014,val2014}/``;
* the annotations (``bongard_hoi_annotations.tar``, extracted as ``bongard_hoi_release/``):
  ``bongard_hoi_train.json`` and ``bongard_hoi_{val,test}_<split>.json`` for the four test
  splits :data:`TEST_SPLITS` (seen/unseen object × seen/unseen action: how much of the
  problem's HOI concept the training problems covered).

Each annotation file is a JSON list of problems; a problem is ``[positives, negatives,
concept]``: seven positive images that share one human-object interaction, seven hard negatives
(the same object, another action), and the concept string ``"<action>++<object>"``. An image
is an object whose ``im_path`` (``./hico_20160224_det/images/...``) is relative to the image
folder; its boxes (``crop_bbox``, ``sub_bbox``, ``obj_bbox``) are not used here: CLIP-based
evaluations (TPT's protocol) encode whole images. The benchmark's convention: the first six of
each list are the support set, the last one of each is a query, so every problem is a 2-way
6-shot episode with one positive (label 1) and one negative (label 0) query.

:func:`read_bongard_hoi` turns chosen split files into clipadapt episodes, and
:func:`write_episode_file` writes them as one image-episode JSON
(``format: clipadapt-image-episodes``) whose episodes name their split (``subset``); the
episode task (:mod:`clipadapt.tasks.episodes`) encodes it and reports accuracy per split and
their average, each with a 95 % interval, as the paper tabulates them.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from clipadapt._utils import atomic_write_text
from clipadapt.exceptions import DatasetError

#: The four test splits, in the order the papers' tables list them.
TEST_SPLITS: tuple[str, ...] = (
    "seen_obj_seen_act",
    "seen_obj_unseen_act",
    "unseen_obj_seen_act",
    "unseen_obj_unseen_act",
)
#: Column headings of the papers' Bongard-HOI tables.
SPLIT_LABELS: dict[str, str] = {
    "seen_obj_seen_act": "seen act. / seen obj.",
    "seen_obj_unseen_act": "unseen act. / seen obj.",
    "unseen_obj_seen_act": "seen act. / unseen obj.",
    "unseen_obj_unseen_act": "unseen act. / unseen obj.",
}
#: Format tag of the image-episode JSON written here (read by tasks.episodes).
EPISODE_FORMAT = "clipadapt-image-episodes"
SOURCE = "Bongard-HOI"


def annotation_path(
    annotations: str | Path, split: str = "test", subset: str | None = None
) -> Path:
    """``<annotations>/bongard_hoi_<split>_<subset>.json`` (``bongard_hoi_train.json`` for train)."""
    stem = "bongard_hoi_train" if split == "train" else f"bongard_hoi_{split}_{subset}"
    return Path(annotations) / f"{stem}.json"


def _image(entry: Any, where: str) -> str:
    path = entry.get("im_path") if isinstance(entry, dict) else None
    if not isinstance(path, str) or not path:
        raise DatasetError(f"{where}: expected an image object with an 'im_path' string")
    return path.removeprefix("./")


def _problems(path: Path) -> list[Any]:
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DatasetError(
            f"{path} does not exist; extract the Bongard-HOI annotations "
            "(bongard_hoi_annotations.tar) and pass their folder"
        ) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DatasetError(f"cannot read the Bongard-HOI file {path}: {error}") from None
    if not isinstance(doc, list):
        raise DatasetError(f"{path}: expected a JSON list of problems, got {type(doc).__name__}")
    return doc


def read_bongard_hoi(
    annotations: str | Path,
    image_root: str | Path,
    *,
    split: str = "test",
    subsets: Sequence[str] = TEST_SPLITS,
    check_files: bool = True,
) -> list[dict[str, Any]]:
    """Bongard-HOI problems of the chosen split files as clipadapt episodes.

    Args:
        annotations: the folder with ``bongard_hoi_<split>_<subset>.json``.
        image_root: the image folder the ``im_path`` entries are relative to (the release's
            ``hake/images``).
        split: ``"test"`` (the benchmark), ``"val"`` or ``"train"``.
        subsets: which of :data:`TEST_SPLITS` to read (ignored for ``"train"``).
        check_files: require every image to exist.

    Returns:
        One dict per problem, in file order, split by split: ``{"id", "subset", "concept":
        {"type": "hoi", "rule": "<action>++<object>", "description": "<action> <object>"},
        "support": [{"image": relative path, "label": 1|0}, ...] (positives first),
        "query": [{"image": ..., "label": 1}, {"image": ..., "label": 0}]}``.

    Raises:
        DatasetError: unknown split or subset, missing or malformed file (the message names the
            file and problem), missing images.
    """
    if split not in ("train", "val", "test"):
        raise DatasetError(f"Bongard-HOI split must be train, val or test, got {split!r}")
    unknown = [s for s in subsets if s not in TEST_SPLITS]
    if unknown:
        raise DatasetError(
            f"unknown Bongard-HOI test split(s) {', '.join(unknown)}; known: {', '.join(TEST_SPLITS)}"
        )
    if not subsets and split != "train":
        raise DatasetError("no Bongard-HOI split chosen")
    parts = [("train", None)] if split == "train" else [(s, s) for s in subsets]
    episodes: list[dict[str, Any]] = []
    for name, subset in parts:
        path = annotation_path(annotations, split, subset)
        for p, problem in enumerate(_problems(path)):
            where = f"{path}, problem {p}"
            ok = (
                isinstance(problem, list)
                and len(problem) == 3
                and all(isinstance(side, list) and len(side) >= 2 for side in problem[:2])
                and isinstance(problem[2], str)
            )
            if not ok:
                raise DatasetError(
                    f"{where}: expected [positives, negatives, '<action>++<object>'] with at "
                    "least two images on each side (support images, then the query last)"
                )
            pos = [_image(e, f"{where}, positive {i}") for i, e in enumerate(problem[0])]
            neg = [_image(e, f"{where}, negative {i}") for i, e in enumerate(problem[1])]
            rule = problem[2]
            episodes.append(
                {
                    "id": len(episodes),
                    "subset": name,
                    "concept": {
                        "type": "hoi",
                        "rule": rule,
                        "description": " ".join(rule.replace("_", " ").split("++")),
                    },
                    "support": [{"image": i, "label": 1} for i in pos[:-1]]
                    + [{"image": i, "label": 0} for i in neg[:-1]],
                    "query": [{"image": pos[-1], "label": 1}, {"image": neg[-1], "label": 0}],
                }
            )
    if check_files:
        _check_images(episodes, Path(image_root))
    return episodes


def _check_images(episodes: list[dict[str, Any]], root: Path) -> None:
    if not root.is_dir():
        raise DatasetError(
            f"Bongard-HOI image folder {root} does not exist; pass the folder that holds "
            "hake_images_20190730/, hico_20160224_det/, openimages/, pic/, vcoco/ ..."
        )
    listed: dict[Path, set[str] | None] = {}
    missing: list[str] = []
    seen: set[str] = set()
    for episode in episodes:
        for item in (*episode["support"], *episode["query"]):
            rel = item["image"]
            if rel in seen:
                continue
            seen.add(rel)
            path = root / rel
            if path.parent not in listed:
                try:
                    listed[path.parent] = set(os.listdir(path.parent))
                except OSError:
                    listed[path.parent] = None
            names = listed[path.parent]
            if names is None or path.name not in names:
                missing.append(rel)
    if missing:
        raise DatasetError(
            f"{len(missing)} of {len(seen)} Bongard-HOI images are missing under {root} (e.g. "
            f"{', '.join(missing[:3])}); the image folder is the release's hake/images"
        )


def write_episode_file(
    episodes: list[dict[str, Any]],
    image_root: str | Path,
    out: str | Path,
    *,
    subsets: Sequence[str] | None = None,
    source: str = SOURCE,
) -> Path:
    """Write episodes as an image-episode JSON that :mod:`clipadapt.tasks.episodes` reads.

    ``image_root`` is stored relative to the file's folder when it can be, so the pair can move
    together. ``subsets`` lists the split names in table order (default: as they first appear).
    """
    out = Path(out)
    if subsets is None:
        subsets = list(dict.fromkeys(e["subset"] for e in episodes if "subset" in e))
    root = Path(os.path.abspath(image_root))
    try:
        stored = os.path.relpath(root, os.path.abspath(out.parent))
    except ValueError:  # another drive on Windows
        stored = str(root)
    doc = {
        "format": EPISODE_FORMAT,
        "version": 1,
        "source": source,
        "image_root": Path(stored).as_posix(),
        "subsets": list(subsets),
        "subset_labels": {s: SPLIT_LABELS.get(s, s) for s in subsets},
        "episodes": episodes,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, json.dumps(doc, indent=1) + "\n")
    return out


def bongard_hoi_episode_file(
    annotations: str | Path,
    image_root: str | Path,
    out: str | Path,
    *,
    split: str = "test",
    subsets: Sequence[str] = TEST_SPLITS,
    check_files: bool = True,
) -> Path:
    """Read Bongard-HOI split files and write them as one image-episode JSON (``out``).

    The file runs in a sweep as ``clipadapt bench --episodes <out> --backbone ...``; the four
    test splits become the named subsets of the result.

    Example:
        >>> bongard_hoi_episode_file("bongard_hoi_release", "hake/images",
        ...                          "bongard_hoi_test.json")  # doctest: +SKIP
    """
    episodes = read_bongard_hoi(
        annotations, image_root, split=split, subsets=subsets, check_files=check_files
    )
    names = ["train"] if split == "train" else list(subsets)
    return write_episode_file(episodes, image_root, out, subsets=names)
