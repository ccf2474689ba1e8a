"""Downstream few-shot datasets drawn from the world, written as clipadapt dataset folders.

Each dataset is ``<root>/<name>/`` with ``dataset.json`` (name, classnames, template,
templates, the label-preserving train-view ``augmentation``, optional ``descriptions`` and
``domain_of``), ``split.json`` (CoOp ``split_zhou``
format: ``{"train"|"val"|"test": [[relpath, label, classname], ...]}``), an optional CuPL-style
``descriptions.json`` and the 64x64 PNG images under one folder per class.

The tasks are built so that class names alone do not say what the captions taught (the trap
where zero-shot already equals the few-shot prototype):

- ``world_species``: 20 invented species (``"velk"``), 10 sibling pairs sharing shape and
  colour and differing in texture (a third also with a fixed size); names are unseen words,
  descriptions name shape and colour often and the texture once. Name-only zero-shot is near
  chance, descriptions help but confuse siblings, images separate them.
- ``world_shades`` (fine-grained): 8 colours x 3 shades ("pale red shape", "red shape",
  "deep red shape"), any shape and pattern; the shade is named in only ~20 % of the captions of
  pale and deep objects in pre-training.
- ``world_count``: 7 classes, one to four objects that are identical copies or all different
  ("three identical shapes", "three different shapes"). Counts are named in pre-training
  captions; sameness words never are (only the phrasing of groups hints at it).
- ``world_bigger`` (a relation): two objects of two colours, one large and one small; 6 colour
  pairs x which colour is the larger ("a large red shape and a small blue shape"). The features
  bind size to colour (16-shot probe far above chance) but the text side does not: zero-shot
  finds the colour pair and guesses the direction. It replaced ``world_relation`` (3 shape pairs
  x left of / right of / above / below), which sat at chance for every method because the
  features carry no spatial relation (docs/world.md).
- ``world_composite``: 60 invented kinds (``"konan"``), each a colour x habitat (background) x
  size combination in any shape and pattern, half of the images with a small distractor of
  another colour; descriptions name the colour often, the habitat twice and the size once.
- ``world_species_{sketch,noise,invert,newbg}``: style-shifted test sets of ``world_species``
  (``domain_of`` = ``world_species``; they have only a test split) for domain generalisation.

Example:
    >>> paths = generate_world_datasets("data/world", size="small")  # doctest: +SKIP
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import tempfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from clipadapt.exceptions import ConfigError, DatasetError
from clipadapt.world.captions import NUMBERS
from clipadapt.world.generator import (
    _BG_VARIANTS,
    BACKGROUNDS,
    COLOURS,
    SHADES,
    SHAPES,
    SIZES,
    TEXTURES,
    Scene,
    WorldObject,
    place,
    random_object,
    render,
    sample_sizes,
)
from clipadapt.world.texts import (
    KIND_NAMES,
    SCENE_TEMPLATES,
    SPECIES_NAMES,
    TEMPLATES,
    bigger_classname,
    describe_bigger,
    describe_count,
    describe_kind,
    describe_shade,
    describe_species,
    shade_classname,
)

log = logging.getLogger(__name__)

RECIPE_VERSION = 4
SPLITS = ("train", "val", "test")

#: The train-view augmentation every world dataset declares in its ``dataset.json``: crops of
#: 90-100 % of the image, flipped half the time. The extractor's default crops (50-100 %) cut
#: objects off and blow small ones up, which changes what the labels mean here (a species with a
#: fixed size, the number of objects, which object is the larger); with them a class-mean
#: classifier from the clean 16-shot rows scores 63.7 % on those rows of world_species but 59.0 %
#: on their views (world_count: 83.9 and 74.6 %), with these 63.9 % (83.6 %); docs/world.md,
#: "Augmented views".
WORLD_AUGMENTATION: dict[str, Any] = {"scale": [0.9, 1.0], "flip": 0.5}

# Images per class and split: (train, val, test).
SIZE_PRESETS: dict[str, dict[str, tuple[int, int, int]]] = {
    "default": {
        "world_species": (16, 10, 30),
        "world_shades": (16, 10, 30),
        "world_count": (16, 10, 40),
        "world_bigger": (16, 10, 30),
        "world_composite": (16, 4, 10),
        "shifted": (0, 0, 30),
    },
    "small": {
        "world_species": (4, 2, 4),
        "world_shades": (4, 2, 4),
        "world_count": (4, 2, 4),
        "world_bigger": (4, 2, 4),
        "world_composite": (2, 1, 2),
        "shifted": (0, 0, 4),
    },
}
SHIFT_STYLES: tuple[str, ...] = ("sketch", "noise", "invert", "newbg")


@dataclass(frozen=True)
class Species:
    """An invented species: its defining attributes (``size`` None: any size)."""

    name: str
    shape: str
    colour: str
    texture: str
    size: str | None


def species_table(seed: int = 0) -> list[Species]:
    """The 20 species: 10 sibling pairs drawn from ``seed``.

    Siblings share shape and colour and differ in texture, the trait their descriptions
    mention only once (:func:`~clipadapt.world.texts.describe_species`), as real class
    descriptions dwell on salient traits and rarely on what tells two close classes apart.
    Zero-shot from descriptions therefore confuses siblings, while a few images separate them.
    """
    rng = random.Random(f"species-table:{seed}")
    pairs = rng.sample([(s, c) for s in SHAPES for c in COLOURS], len(SPECIES_NAMES) // 2)
    combos = [(s, c, t) for s, c in pairs for t in rng.sample(TEXTURES, 2)]
    out = []
    for i, (name, (shape, colour, texture)) in enumerate(zip(SPECIES_NAMES, combos, strict=True)):
        size = ("small", "large", None)[i % 3]
        out.append(Species(name, shape, colour, texture, size))
    return out


def _scene(rng: random.Random, objects: list[WorldObject]) -> Scene:
    return Scene(rng.choice(BACKGROUNDS), rng.randrange(_BG_VARIANTS), tuple(objects))


def _single(rng: random.Random, sizes: tuple[str, ...], **fixed: str) -> WorldObject:
    size = rng.choice(sizes)
    s = SIZES[size]
    return random_object(rng, size, rng.randint(0, 64 - s), rng.randint(0, 64 - s), **fixed)


@dataclass(frozen=True)
class TaskSpec:
    """How to draw one dataset: its classes, prompts and a scene sampler per class."""

    name: str
    classnames: list[str]
    template: str
    templates: tuple[str, ...]
    sample: Callable[[int, random.Random], Scene]
    counts_key: str
    style: str = "normal"
    descriptions: dict[str, list[str]] | None = None
    domain_of: str | None = None


def _species_task(seed: int) -> TaskSpec:
    table = species_table(seed)

    def sample(label: int, rng: random.Random) -> Scene:
        sp = table[label]
        sizes = (sp.size,) if sp.size else tuple(SIZES)
        return _scene(
            rng,
            [
                _single(
                    rng, sizes, shape=sp.shape, colour=sp.colour, texture=sp.texture, shade="normal"
                )
            ],
        )

    descriptions = {
        sp.name: describe_species(sp.name, sp.shape, sp.colour, sp.texture, sp.size, seed)
        for sp in table
    }
    return TaskSpec(
        "world_species",
        [sp.name for sp in table],
        TEMPLATES[0],
        TEMPLATES,
        sample,
        "world_species",
        descriptions=descriptions,
    )


def _shades_task() -> TaskSpec:
    classes = [(c, shade) for c in COLOURS for shade in SHADES]

    def sample(label: int, rng: random.Random) -> Scene:
        colour, shade = classes[label]
        return _scene(rng, [_single(rng, ("medium", "large"), colour=colour, shade=shade)])

    names = [shade_classname(c, shade) for c, shade in classes]
    descriptions = {n: describe_shade(*c) for n, c in zip(names, classes, strict=True)}
    return TaskSpec(
        "world_shades",
        names,
        TEMPLATES[0],
        TEMPLATES,
        sample,
        "world_shades",
        descriptions=descriptions,
    )


COUNT_CLASSES: tuple[tuple[int, bool | None], ...] = (
    (1, None),
    *((n, alike) for n in (2, 3, 4) for alike in (True, False)),
)


def count_classname(count: int, alike: bool | None) -> str:
    """``"one shape"``, ``"two identical shapes"``, ``"two different shapes"``, ..."""
    if count == 1:
        return "one shape"
    return f"{NUMBERS[count - 1]} {'identical' if alike else 'different'} shapes"


def _count_task() -> TaskSpec:
    def sample(label: int, rng: random.Random) -> Scene:
        n, alike = COUNT_CLASSES[label]
        while True:
            sizes = sample_sizes(rng, n)
            if alike:
                sizes = [sizes[0]] * n
            corners = place(rng, sizes)
            if corners is not None:
                break
        first = random_object(rng, sizes[0], *corners[0])
        if alike:
            return _scene(rng, [first._replace(x=x, y=y) for x, y in corners])
        objs = [first]
        for size, (x, y) in zip(sizes[1:], corners[1:], strict=True):
            other = random_object(rng, size, x, y)
            # "different": no two objects share shape and colour.
            while any((o.shape, o.colour) == (other.shape, other.colour) for o in objs):
                other = random_object(rng, size, x, y)
            objs.append(other)
        return _scene(rng, objs)

    names = [count_classname(n, alike) for n, alike in COUNT_CLASSES]
    descriptions = {
        name: describe_count(n, alike)
        for name, (n, alike) in zip(names, COUNT_CLASSES, strict=True)
    }
    return TaskSpec(
        "world_count",
        names,
        SCENE_TEMPLATES[0],
        SCENE_TEMPLATES,
        sample,
        "world_count",
        descriptions=descriptions,
    )


# The shape pairs and relations of the reasoning episodes' relation concept
# (:mod:`clipadapt.world.episodes`).
RELATION_PAIRS: tuple[tuple[str, str], ...] = (
    ("circle", "square"),
    ("circle", "triangle"),
    ("square", "triangle"),
)
RELATIONS: tuple[str, ...] = ("left", "right", "above", "below")

# ``world_bigger``: every colour in at least one pair, two colours in two pairs each, so the
# colours alone narrow a scene down to its pair and only the size relation is left to learn.
BIGGER_PAIRS: tuple[tuple[str, str], ...] = (
    ("red", "blue"),
    ("green", "yellow"),
    ("purple", "orange"),
    ("pink", "cyan"),
    ("red", "green"),
    ("blue", "yellow"),
)
BIGGER_CLASSES: tuple[tuple[str, str], ...] = tuple(
    (large, small) for a, b in BIGGER_PAIRS for large, small in ((a, b), (b, a))
)


def _bigger_task() -> TaskSpec:
    def sample(label: int, rng: random.Random) -> Scene:
        large, small = BIGGER_CLASSES[label]
        while True:
            corners = place(rng, ["large", "small"])
            if corners is not None:
                break
        # normal shade: a pale or deep colour must not blur which colour is which; shape and
        # pattern are free, so only colour and size say which class a scene is
        big = random_object(rng, "large", *corners[0], colour=large, shade="normal")
        little = random_object(rng, "small", *corners[1], colour=small, shade="normal")
        return _scene(rng, [big, little])

    names = [bigger_classname(large, small) for large, small in BIGGER_CLASSES]
    descriptions = {n: describe_bigger(*c) for n, c in zip(names, BIGGER_CLASSES, strict=True)}
    return TaskSpec(
        "world_bigger",
        names,
        SCENE_TEMPLATES[0],
        SCENE_TEMPLATES,
        sample,
        "world_bigger",
        descriptions=descriptions,
    )


@dataclass(frozen=True)
class Kind:
    """A ``world_composite`` class: an invented name for a colour, habitat (background) and
    size; any shape and pattern."""

    name: str
    colour: str
    background: str
    size: str


def kind_table(seed: int = 0) -> list[Kind]:
    """The 60 kinds: 60 of the 8 x 5 x 3 colour x habitat x size combinations, drawn from
    ``seed`` so every colour has 7 or 8 kinds (the colour narrows a kind down to about eight;
    habitat and size, the traits the descriptions name less, tell them apart)."""
    rng = random.Random(f"kind-table:{seed}")
    per_colour = [len(KIND_NAMES) // len(COLOURS)] * len(COLOURS)
    for i in rng.sample(range(len(COLOURS)), len(KIND_NAMES) % len(COLOURS)):
        per_colour[i] += 1
    combos = []
    for colour, n in zip(COLOURS, per_colour, strict=True):
        pool = [(b, z) for b in BACKGROUNDS for z in SIZES]
        combos += [(colour, b, z) for b, z in rng.sample(pool, n)]
    rng.shuffle(combos)
    return [Kind(name, *c) for name, c in zip(KIND_NAMES, combos, strict=True)]


def _composite_task(seed: int) -> TaskSpec:
    table = kind_table(seed)

    def sample(label: int, rng: random.Random) -> Scene:
        kind = table[label]
        corners = place(rng, [kind.size, "small"]) if rng.random() < 0.5 else None
        if corners is None:
            objects = [_single(rng, (kind.size,), colour=kind.colour, shade="normal")]
        else:
            target = random_object(rng, kind.size, *corners[0], colour=kind.colour, shade="normal")
            other = random_object(rng, "small", *corners[1])
            while other.colour == kind.colour:
                other = random_object(rng, "small", *corners[1])
            objects = [target, other]
        return Scene(kind.background, rng.randrange(_BG_VARIANTS), tuple(objects))

    descriptions = {
        k.name: describe_kind(k.name, k.colour, k.background, k.size, seed) for k in table
    }
    return TaskSpec(
        "world_composite",
        [k.name for k in table],
        TEMPLATES[0],
        TEMPLATES,
        sample,
        "world_composite",
        descriptions=descriptions,
    )


def world_tasks(seed: int = 0) -> list[TaskSpec]:
    """Every world dataset's specification, source tasks first, then the shifted variants."""
    species = _species_task(seed)
    tasks = [species, _shades_task(), _count_task(), _bigger_task(), _composite_task(seed)]
    for style in SHIFT_STYLES:
        tasks.append(
            TaskSpec(
                f"world_species_{style}",
                species.classnames,
                species.template,
                species.templates,
                species.sample,
                "shifted",
                style=style,
                descriptions=species.descriptions,
                domain_of=species.name,
            )
        )
    return tasks


WORLD_DATASETS: tuple[str, ...] = tuple(t.name for t in world_tasks())


def class_dir(classname: str) -> str:
    """Folder name of a class: words joined by underscores."""
    return "_".join(classname.split())


def _image_seed(seed: int, name: str, split: str, label: int, index: int) -> int:
    return zlib.crc32(f"{seed}/{name}/{split}/{label}/{index}".encode())


def _recipe(task: TaskSpec, size: str, seed: int) -> dict[str, Any]:
    # the declared augmentation is part of the recipe: a folder generated before it (or with
    # another one) is rewritten, so its dataset.json never silently lacks the declaration
    return {
        "recipe_version": RECIPE_VERSION,
        "size": size,
        "seed": seed,
        "style": task.style,
        "augmentation": WORLD_AUGMENTATION,
    }


def _write_task(task: TaskSpec, root: Path, size: str, seed: int) -> None:
    counts = dict(zip(SPLITS, SIZE_PRESETS[size][task.counts_key], strict=True))
    dirs = [class_dir(c) for c in task.classnames]
    for d in dirs:
        (root / d).mkdir(parents=True)
    split: dict[str, list[list[Any]]] = {}
    for name in SPLITS:
        rows: list[list[Any]] = []
        for label, classname in enumerate(task.classnames):
            for i in range(counts[name]):
                img_seed = _image_seed(seed, task.name, name, label, i)
                scene = task.sample(label, random.Random(img_seed))
                rel = f"{dirs[label]}/{name}_{i:03d}.png"
                image = render(scene, task.style, img_seed)
                Image.fromarray(image).save(root / rel, compress_level=1)
                rows.append([rel, label, classname])
        split[name] = rows
    (root / "split.json").write_text(json.dumps(split))
    meta: dict[str, Any] = {
        "name": task.name,
        "classnames": task.classnames,
        "template": task.template,
        "templates": list(task.templates),
        "augmentation": WORLD_AUGMENTATION,
    }
    if task.descriptions is not None:
        (root / "descriptions.json").write_text(json.dumps(task.descriptions, indent=1))
        meta["descriptions"] = "descriptions.json"
    if task.domain_of:
        meta["domain_of"] = task.domain_of
    (root / "world.json").write_text(json.dumps(_recipe(task, size, seed)))
    # dataset.json last: its presence marks a complete folder.
    (root / "dataset.json").write_text(json.dumps(meta, indent=1))


def is_complete(path: Path, task: TaskSpec, size: str, seed: int) -> bool:
    """Whether ``path`` holds this dataset already generated with the same recipe."""
    try:
        recipe = json.loads((path / "world.json").read_text())
    except (OSError, ValueError):
        return False
    return (path / "dataset.json").is_file() and recipe == _recipe(task, size, seed)


def generate_world_datasets(
    out_dir: str | Path,
    size: str = "default",
    seed: int = 0,
    names: list[str] | None = None,
) -> list[Path]:
    """Write the world datasets under ``out_dir``, skipping those already complete.

    Each dataset is built in a temporary folder inside ``out_dir`` and renamed into place, so an
    interrupted run never leaves a half-written dataset that looks complete.

    Args:
        out_dir: root folder; dataset ``d`` goes to ``out_dir/d``.
        size: ``"default"`` (16 train / 10 val / 30 test per class; fewer for the 64-class
            task, more test images for the 4-class one) or ``"small"`` (a few per class, tests).
        seed: drives the species table and every image.
        names: only these datasets (default: all of :data:`WORLD_DATASETS`).

    Returns:
        Paths of the dataset folders, in :data:`WORLD_DATASETS` order.

    Raises:
        ConfigError: unknown ``size`` or dataset name.
    """
    if size not in SIZE_PRESETS:
        raise ConfigError(f"unknown world size {size!r}; expected one of {sorted(SIZE_PRESETS)}")
    tasks = world_tasks(seed)
    known = [t.name for t in tasks]
    unknown = sorted(set(names or []) - set(known))
    if unknown:
        raise ConfigError(f"unknown world datasets {unknown}; available: {known}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for task in tasks:
        if names and task.name not in names:
            continue
        final = out / task.name
        paths.append(final)
        if is_complete(final, task, size, seed):
            continue
        tmp = Path(tempfile.mkdtemp(prefix=f".{task.name}-", dir=out))
        try:
            _write_task(task, tmp, size, seed)
            if final.exists():  # an older recipe or a partial copy: replace it
                shutil.rmtree(final)
            os.replace(tmp, final)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        log.info("wrote %s", final)
    return paths


def read_dataset(path: str | Path) -> tuple[dict[str, Any], dict[str, list[list[Any]]]]:
    """Read ``dataset.json`` and ``split.json`` of a dataset folder.

    Raises:
        DatasetError: a missing or malformed file, or a split row pointing at no image.
    """
    path = Path(path)
    try:
        meta = json.loads((path / "dataset.json").read_text())
        split = json.loads((path / "split.json").read_text())
    except (OSError, ValueError) as exc:
        raise DatasetError(f"{path} is not a readable dataset folder: {exc}") from exc
    for name in SPLITS:
        rows = split.get(name)
        if not isinstance(rows, list):
            raise DatasetError(f"{path}/split.json has no {name!r} list")
        for rel, label, classname in rows[:1]:
            if meta["classnames"][label] != classname or not (path / rel).is_file():
                raise DatasetError(f"{path}/split.json row {rel!r} does not match the folder")
    return meta, split
