"""Few-shot reasoning episodes: find the hidden concept from positives and negatives.

An episode shows a support set of images that satisfy a hidden concept (label 1) and images
that do not (label 0), then asks for the label of query images. Concepts:

- ``conjunction``: two attributes at once, e.g. colour red AND texture striped. Negatives are
  hard: each has exactly one of the two attributes (or, with probability 1/3, neither).
- ``relation``: two given shapes in a given relation ("a circle left of a square"); negatives
  show the same two shapes in another relation.
- ``count``: exactly n objects; negatives have another count.

File format (JSON, ``format`` = ``"clipadapt-world-episodes"``, ``version`` = 1)::

    {"format": "clipadapt-world-episodes", "version": 1, "seed": 0, "image_size": 64,
     "image_root": "episodes_images",          # relative to the JSON file's folder
     "episodes": [
        {"id": 0,
         "concept": {"type": "conjunction", "description": "red striped objects",
                     "rule": {"colour": "red", "texture": "striped"}},
         "support": [{"image": "ep0000/s00.png", "label": 1}, ...],   # relative to image_root
         "query":   [{"image": "ep0000/q00.png", "label": 0}, ...]},
        ...]}

Support and query sets are balanced (half positives) and shuffled.

Example:
    >>> path = generate_episodes("episodes.json", n_episodes=4)  # doctest: +SKIP
"""

from __future__ import annotations

import json
import random
import zlib
from pathlib import Path
from typing import Any

from PIL import Image

from clipadapt.exceptions import ConfigError
from clipadapt.world.captions import NUMBERS, clear_relation
from clipadapt.world.datasets import RELATION_PAIRS, RELATIONS
from clipadapt.world.generator import (
    _BG_VARIANTS,
    BACKGROUNDS,
    COLOURS,
    SHAPES,
    TEXTURES,
    Scene,
    WorldObject,
    place,
    random_object,
    render,
    sample_sizes,
)

CONCEPTS: tuple[str, ...] = ("conjunction", "relation", "count")
_ATTRS = {"shape": SHAPES, "colour": tuple(COLOURS), "texture": TEXTURES}


def _bg(rng: random.Random, objs: list[WorldObject]) -> Scene:
    return Scene(rng.choice(BACKGROUNDS), rng.randrange(_BG_VARIANTS), tuple(objs))


def _objects(rng: random.Random, n: int) -> list[WorldObject]:
    while True:
        sizes = sample_sizes(rng, n)
        corners = place(rng, sizes)
        if corners is not None:
            return [random_object(rng, s, x, y) for s, (x, y) in zip(sizes, corners, strict=True)]


def _conjunction(rng: random.Random) -> tuple[dict[str, Any], Any]:
    a1, a2 = rng.sample(sorted(_ATTRS), 2)
    rule = {a1: rng.choice(_ATTRS[a1]), a2: rng.choice(_ATTRS[a2])}

    def draw(positive: bool) -> Scene:
        objs = _objects(rng, 1)
        if positive:
            keep = rule
        else:  # exactly one attribute matches (2/3) or none (1/3)
            k = rng.choice((a1, a2, None))
            keep = {k: rule[k]} if k else {}
        obj = objs[0]._replace(**keep)
        for attr, value in rule.items():
            if attr not in keep and getattr(obj, attr) == value:
                obj = obj._replace(**{attr: rng.choice([v for v in _ATTRS[attr] if v != value])})
        return _bg(rng, [obj])

    words = [rule.get("colour"), rule.get("texture"), rule.get("shape") or "objects"]
    desc = " ".join(w for w in words if w)
    return {"type": "conjunction", "description": desc, "rule": rule}, draw


def _relation(rng: random.Random) -> tuple[dict[str, Any], Any]:
    a_shape, b_shape = rng.choice(RELATION_PAIRS)
    rel = rng.choice(RELATIONS)

    def draw(positive: bool) -> Scene:
        target = rel if positive else rng.choice([r for r in RELATIONS if r != rel])
        while True:
            a, b = _objects(rng, 2)
            a, b = a._replace(shape=a_shape), b._replace(shape=b_shape)
            if clear_relation(a, b) == target:
                return _bg(rng, [a, b])

    words = {"left": "left of", "right": "right of", "above": "above", "below": "below"}
    rule = {"a": a_shape, "relation": rel, "b": b_shape}
    desc = f"a {a_shape} {words[rel]} a {b_shape}"
    return {"type": "relation", "description": desc, "rule": rule}, draw


def _count(rng: random.Random) -> tuple[dict[str, Any], Any]:
    n = rng.randint(1, 4)

    def draw(positive: bool) -> Scene:
        k = n if positive else rng.choice([m for m in (1, 2, 3, 4) if m != n])
        return _bg(rng, _objects(rng, k))

    desc = f"exactly {NUMBERS[n - 1]} objects"
    return {"type": "count", "description": desc, "rule": {"count": n}}, draw


_MAKERS = {"conjunction": _conjunction, "relation": _relation, "count": _count}


def generate_episodes(
    out_file: str | Path,
    n_episodes: int = 30,
    n_support: int = 4,
    n_query: int = 8,
    seed: int = 0,
    concepts: tuple[str, ...] = CONCEPTS,
) -> Path:
    """Write ``n_episodes`` reasoning episodes and their images.

    Args:
        out_file: the JSON file; images go to ``<out_file stem>_images/`` beside it.
        n_episodes: episodes, cycling through ``concepts``.
        n_support: support images per label (positives and negatives each).
        n_query: query images per label.
        seed: drives concepts and images.
        concepts: concept types to use (subset of :data:`CONCEPTS`).

    Returns:
        The path of the JSON file.

    Raises:
        ConfigError: non-positive counts or unknown concept types.
    """
    bad = sorted(set(concepts) - set(CONCEPTS))
    if bad or not concepts:
        raise ConfigError(f"unknown episode concepts {bad}; expected a subset of {CONCEPTS}")
    if min(n_episodes, n_support, n_query) < 1:
        raise ConfigError("n_episodes, n_support and n_query must be at least 1")
    out = Path(out_file)
    root_name = f"{out.stem}_images"
    root = out.parent / root_name
    episodes = []
    for e in range(n_episodes):
        rng = random.Random(zlib.crc32(f"episodes/{seed}/{e}".encode()))
        concept, draw = _MAKERS[concepts[e % len(concepts)]](rng)
        folder = root / f"ep{e:04d}"
        folder.mkdir(parents=True, exist_ok=True)
        entry: dict[str, Any] = {"id": e, "concept": concept}
        for part, count, tag in (("support", n_support, "s"), ("query", n_query, "q")):
            labels = [1] * count + [0] * count
            rng.shuffle(labels)
            items = []
            for j, label in enumerate(labels):
                rel = f"ep{e:04d}/{tag}{j:02d}.png"
                image = render(draw(bool(label)), "normal", rng.getrandbits(32))
                Image.fromarray(image).save(root / rel, compress_level=1)
                items.append({"image": rel, "label": label})
            entry[part] = items
        episodes.append(entry)
    doc = {
        "format": "clipadapt-world-episodes",
        "version": 1,
        "seed": seed,
        "image_size": 64,
        "image_root": root_name,
        "episodes": episodes,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=1))
    return out
