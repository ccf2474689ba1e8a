"""The procedural image world: scenes of 1-4 flat objects on 64x64 RGB canvases.

A scene is plain data (:class:`Scene` of :class:`WorldObject`), drawn by :func:`render` with
pre-rasterised shape masks, pre-computed texture patterns and pre-computed backgrounds, so one
image costs a handful of numpy slice assignments. Everything is deterministic given a seed:
:class:`WorldGenerator` draws scenes with :class:`random.Random` (scalar draws are far cheaper
than numpy's) and every noisy asset is built once from a fixed numpy seed.

Attributes of an object: shape, colour (with a shade: pale, normal or deep), texture (with a
stripe orientation), size and position;
scene attributes: background, object count and the pairwise relations implied by positions.

Example:
    >>> gen = WorldGenerator()
    >>> images, captions, scenes = gen.batch(8, seed=0)
    >>> images.shape
    (8, 64, 64, 3)
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from functools import cache
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 64

SHAPES: tuple[str, ...] = (
    "circle",
    "square",
    "triangle",
    "diamond",
    "star",
    "cross",
    "hexagon",
    "heart",
)
PLURAL: dict[str, str] = {s: ("crosses" if s == "cross" else s + "s") for s in SHAPES}

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "green": (35, 165, 55),
    "blue": (40, 75, 220),
    "yellow": (240, 215, 40),
    "purple": (135, 55, 185),
    "orange": (245, 135, 25),
    "pink": (245, 125, 190),
    "cyan": (50, 210, 220),
}
# Shades of a colour: pale (mixed with white), normal, deep (darkened). Drawn with these weights.
SHADES: tuple[str, ...] = ("pale", "normal", "deep")
SHADE_WEIGHTS: tuple[float, ...] = (0.2, 0.6, 0.2)
_PALE_WHITE = 0.45  # share of white mixed into a pale colour
_DEEP_FACTOR = 0.55  # brightness kept by a deep colour
TEXTURES: tuple[str, ...] = ("solid", "striped", "dotted", "checkered")
ORIENTATIONS: tuple[str, ...] = ("horizontal", "vertical", "diagonal")
SIZES: dict[str, int] = {"small": 12, "medium": 18, "large": 26}

# Backgrounds seen in pre-training, and unseen ones kept for the style-shifted datasets.
BACKGROUNDS: tuple[str, ...] = ("plain", "dark", "grass", "sand", "sky")
NOVEL_BACKGROUNDS: tuple[str, ...] = ("checkerboard", "confetti", "sunset")
STYLES: tuple[str, ...] = ("normal", "sketch", "noise", "invert", "newbg")

_BG_VARIANTS = 8
_ASSET_SEED = 1234


class WorldObject(NamedTuple):
    """One object; ``x``, ``y`` is the top-left corner of its ``SIZES[size]`` square box."""

    shape: str
    colour: str
    texture: str
    size: str
    x: int
    y: int
    orientation: str = "horizontal"  # only meaningful for striped objects
    shade: str = "normal"

    @property
    def look(self) -> tuple[str, str, str, str, str]:
        """What two copies of an object share: shape, colour, texture, size and shade."""
        return self.shape, self.colour, self.texture, self.size, self.shade

    @property
    def centre(self) -> tuple[float, float]:
        half = SIZES[self.size] / 2
        return self.x + half, self.y + half


class Scene(NamedTuple):
    """A full image description: background (type, variant index) and its objects."""

    background: str
    bg_variant: int
    objects: tuple[WorldObject, ...]


# ----------------------------------------------------------------------------- assets


def _polygon(kind: str, n: float) -> list[tuple[float, float]]:
    """Vertices of a polygonal shape in an ``n`` x ``n`` box."""
    c = n / 2
    if kind == "triangle":
        return [(c, 0.05 * n), (0.97 * n, 0.92 * n), (0.03 * n, 0.92 * n)]
    if kind == "diamond":
        return [(c, 0.0), (n, c), (c, n), (0.0, c)]
    if kind == "hexagon":
        ang = np.deg2rad(np.arange(6) * 60.0)
        return [(c + 0.5 * n * np.cos(a), c + 0.5 * n * np.sin(a)) for a in ang]
    if kind == "star":
        ang = np.deg2rad(np.arange(10) * 36.0 - 90.0)
        rad = np.where(np.arange(10) % 2 == 0, 0.5 * n, 0.21 * n)
        return [
            (c + r * np.cos(a), c + 0.04 * n + r * np.sin(a)) for r, a in zip(rad, ang, strict=True)
        ]
    raise ValueError(f"unknown polygon kind {kind!r}")


@cache
def shape_mask(shape: str, size: str) -> np.ndarray:
    """Boolean (s, s) mask of ``shape`` at ``size``, rasterised at 4x then box-downsampled."""
    s = SIZES[size]
    n = 4 * s
    img = Image.new("L", (n, n), 0)
    d = ImageDraw.Draw(img)
    if shape == "circle":
        d.ellipse([0, 0, n - 1, n - 1], fill=255)
    elif shape == "square":
        m = 0.08 * n
        d.rectangle([m, m, n - 1 - m, n - 1 - m], fill=255)
    elif shape == "cross":
        t = 0.34 * n
        d.rectangle([(n - t) / 2, 0, (n + t) / 2, n - 1], fill=255)
        d.rectangle([0, (n - t) / 2, n - 1, (n + t) / 2], fill=255)
    elif shape == "heart":
        r = 0.27 * n
        d.ellipse([0.0, 0.08 * n, 2 * r, 0.08 * n + 2 * r], fill=255)
        d.ellipse([n - 1 - 2 * r, 0.08 * n, n - 1, 0.08 * n + 2 * r], fill=255)
        d.polygon([(0.02 * n, 0.42 * n), (0.98 * n, 0.42 * n), (n / 2, 0.97 * n)], fill=255)
    else:
        d.polygon(_polygon(shape, n), fill=255)
    small = img.resize((s, s), Image.Resampling.BOX)
    return np.asarray(small) >= 128


@cache
def outline_mask(shape: str, size: str) -> np.ndarray:
    """Boolean (s, s) mask of the one-pixel-thick outline of :func:`shape_mask`."""
    m = shape_mask(shape, size)
    p = np.pad(m, 1)
    interior = p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:] & m
    return m & ~interior


@cache
def texture_pattern(texture: str, orientation: str = "horizontal") -> np.ndarray | None:
    """Boolean (64, 64) canvas-aligned pattern: True where the darker second tone goes."""
    yy, xx = np.mgrid[:IMAGE_SIZE, :IMAGE_SIZE]
    if texture == "solid":
        return None
    if texture == "striped":
        coord = {"horizontal": yy, "vertical": xx, "diagonal": xx + yy}[orientation]
        return (coord % 6) < 3
    if texture == "dotted":
        return ((yy % 7) < 3) & ((xx % 7) < 3)
    if texture == "checkered":
        return ((yy // 4) + (xx // 4)) % 2 == 0
    raise ValueError(f"unknown texture {texture!r}")


def _gradient(top: Sequence[int], bottom: Sequence[int]) -> np.ndarray:
    t = np.linspace(0.0, 1.0, IMAGE_SIZE)[:, None, None]
    col = (1 - t) * np.asarray(top, float) + t * np.asarray(bottom, float)
    return np.broadcast_to(col, (IMAGE_SIZE, IMAGE_SIZE, 3)).copy()


def _make_background(kind: str, rng: np.random.Generator) -> np.ndarray:
    shape = (IMAGE_SIZE, IMAGE_SIZE, 1)
    if kind == "plain":
        base = rng.uniform(215, 240) + rng.normal(0, 3, shape)
        img = np.broadcast_to(base, (IMAGE_SIZE, IMAGE_SIZE, 3)).copy()
    elif kind == "dark":
        base = rng.uniform(20, 45) + rng.normal(0, 3, shape)
        img = np.broadcast_to(base, (IMAGE_SIZE, IMAGE_SIZE, 3)).copy()
    elif kind == "grass":
        img = np.array([70.0, 140.0, 50.0]) + rng.normal(0, 1, shape) * np.array([15, 30, 12])
        blades = rng.random((IMAGE_SIZE, IMAGE_SIZE)) < 0.08
        img[blades] *= 0.6
    elif kind == "sand":
        img = np.array([215.0, 190.0, 140.0]) + rng.normal(0, 1, shape) * np.array([14, 13, 10])
    elif kind == "sky":
        img = _gradient((120, 175, 235), (200, 225, 250)) + rng.normal(0, 2, shape)
    elif kind == "checkerboard":
        yy, xx = np.mgrid[:IMAGE_SIZE, :IMAGE_SIZE]
        checks = ((yy // 8 + xx // 8) % 2)[..., None]
        img = np.where(checks == 0, 90.0, 170.0) + rng.normal(0, 3, shape)
        img = np.broadcast_to(img, (IMAGE_SIZE, IMAGE_SIZE, 3)).copy()
    elif kind == "confetti":
        low = rng.uniform(60, 200, (8, 8, 3))
        img = np.kron(low, np.ones((8, 8, 1)))
    elif kind == "sunset":
        img = _gradient((250, 150, 60), (110, 50, 130)) + rng.normal(0, 2, shape)
    else:
        raise ValueError(f"unknown background {kind!r}")
    return np.clip(img, 0, 255).astype(np.uint8)


@cache
def background_bank(kind: str) -> np.ndarray:
    """(V, 64, 64, 3) uint8 pre-computed variants of one background type (fixed seed)."""
    seed = _ASSET_SEED + (BACKGROUNDS + NOVEL_BACKGROUNDS).index(kind)
    rng = np.random.default_rng(seed)
    return np.stack([_make_background(kind, rng) for _ in range(_BG_VARIANTS)])


# ----------------------------------------------------------------------------- render


def shade_rgb(colour: str, shade: str = "normal") -> np.ndarray:
    """RGB (float array) of ``colour`` in ``shade``, before the per-object jitter."""
    rgb = np.asarray(COLOURS[colour], dtype=float)
    if shade == "pale":
        return (1 - _PALE_WHITE) * rgb + _PALE_WHITE * 255.0
    if shade == "deep":
        return _DEEP_FACTOR * rgb
    if shade != "normal":
        raise ValueError(f"unknown shade {shade!r}; expected one of {SHADES}")
    return rgb


def _paint(canvas: np.ndarray, obj: WorldObject, jitter: np.ndarray, sketch: bool) -> None:
    s = SIZES[obj.size]
    mask = outline_mask(obj.shape, obj.size) if sketch else shape_mask(obj.shape, obj.size)
    region = canvas[obj.y : obj.y + s, obj.x : obj.x + s]
    colour = shade_rgb(obj.colour, obj.shade) + jitter
    colour = np.clip(colour, 0, 255)
    if sketch:
        # Outline drawings: dark line work of the object's colour, no texture fill.
        region[mask] = (colour * 0.55).astype(np.uint8)
        return
    pattern = texture_pattern(obj.texture, obj.orientation)
    if pattern is None:
        region[mask] = colour.astype(np.uint8)
        return
    pat = pattern[obj.y : obj.y + s, obj.x : obj.x + s]
    second = colour * 0.4
    region[mask & ~pat] = colour.astype(np.uint8)
    region[mask & pat] = second.astype(np.uint8)


def render(scene: Scene, style: str = "normal", seed: int = 0) -> np.ndarray:
    """Draw ``scene`` as a (64, 64, 3) uint8 RGB array.

    Args:
        scene: what to draw.
        style: ``"normal"``; or a shift used by the domain-generalisation datasets:
            ``"sketch"`` (coloured outlines on white paper, no texture), ``"noise"`` (strong
            Gaussian pixel noise, sigma 45), ``"invert"`` (colour-inverted image) or ``"newbg"``
            (a background type never used in pre-training, chosen from ``seed``).
        seed: drives the per-object colour jitter and the style's randomness.

    Returns:
        (64, 64, 3) uint8 array.
    """
    rng = random.Random(seed)
    if style == "sketch":
        canvas = np.full((IMAGE_SIZE, IMAGE_SIZE, 3), 245, np.uint8)
    elif style == "newbg":
        bank = background_bank(NOVEL_BACKGROUNDS[rng.randrange(len(NOVEL_BACKGROUNDS))])
        canvas = bank[scene.bg_variant % len(bank)].copy()
    else:
        canvas = background_bank(scene.background)[scene.bg_variant].copy()
    for obj in scene.objects:
        jitter = np.array([rng.randint(-14, 14) for _ in range(3)])
        _paint(canvas, obj, jitter, sketch=style == "sketch")
    if style == "noise":
        noise = np.random.default_rng(seed).normal(0, 45, canvas.shape)
        canvas = np.clip(canvas + noise, 0, 255).astype(np.uint8)
    elif style == "invert":
        canvas = 255 - canvas
    elif style not in ("normal", "sketch", "newbg"):
        raise ValueError(f"unknown style {style!r}; expected one of {STYLES}")
    return canvas


# ----------------------------------------------------------------------------- sampling


def place(
    rng: random.Random, sizes: Sequence[str], tries: int = 30
) -> list[tuple[int, int]] | None:
    """Top-left corners for boxes of ``sizes`` that do not overlap (1 px gap); None if stuck."""
    boxes: list[tuple[int, int, int]] = []
    for size in sizes:
        s = SIZES[size]
        for _ in range(tries):
            x, y = rng.randint(0, IMAGE_SIZE - s), rng.randint(0, IMAGE_SIZE - s)
            if all(x + s < bx or bx + bs < x or y + s < by or by + bs < y for bx, by, bs in boxes):
                boxes.append((x, y, s))
                break
        else:
            return None
    return [(x, y) for x, y, _ in boxes]


def random_object(rng: random.Random, size: str, x: int, y: int, **fixed: str) -> WorldObject:
    """An object with uniformly drawn attributes (the shade with :data:`SHADE_WEIGHTS`),
    except those given in ``fixed``."""
    return WorldObject(
        shape=fixed.get("shape") or rng.choice(SHAPES),
        colour=fixed.get("colour") or rng.choice(tuple(COLOURS)),
        texture=fixed.get("texture") or rng.choice(TEXTURES),
        size=size,
        x=x,
        y=y,
        orientation=fixed.get("orientation") or rng.choice(ORIENTATIONS),
        shade=fixed.get("shade") or rng.choices(SHADES, SHADE_WEIGHTS)[0],
    )


def sample_sizes(rng: random.Random, n: int) -> list[str]:
    """Object sizes for an ``n``-object scene (no large objects in crowded scenes)."""
    pool = tuple(SIZES) if n <= 2 else ("small", "medium")
    return [rng.choice(pool) for _ in range(n)]


def sample_scene(rng: random.Random, n_objects: int | None = None, same: bool = False) -> Scene:
    """A random scene of ``n_objects`` (1-4, weighted to 1-2 when None).

    Args:
        rng: source of randomness.
        n_objects: object count; None draws 1, 2, 3, 4 with weights 0.4, 0.3, 0.15, 0.15.
        same: all objects share shape, colour and texture (a "group" such as three red stars).
    """
    n = n_objects or rng.choices((1, 2, 3, 4), (0.4, 0.3, 0.15, 0.15))[0]
    while True:
        sizes = sample_sizes(rng, n)
        if same:
            sizes = [sizes[0]] * n
        corners = place(rng, sizes)
        if corners is not None:
            break
    first = random_object(rng, sizes[0], *corners[0])
    objs = [first]
    for size, (x, y) in zip(sizes[1:], corners[1:], strict=True):
        if same:
            objs.append(first._replace(x=x, y=y))
        else:
            objs.append(random_object(rng, size, x, y))
    bg = rng.choice(BACKGROUNDS)
    return Scene(bg, rng.randrange(_BG_VARIANTS), tuple(objs))


TWIN_KINDS: tuple[str, ...] = ("shape", "texture", "orientation", "swap")


def _applicable_kinds(objs: Sequence[WorldObject], kinds: Sequence[str]) -> list[str]:
    applicable = [k for k in ("shape", "texture") if k in kinds]
    if "orientation" in kinds and any(o.texture == "striped" for o in objs):
        applicable.append("orientation")
    if "swap" in kinds and len(objs) == 2 and objs[0].look != objs[1].look:
        applicable.append("swap")
    return applicable


def _draw_new(rng: random.Random, options: list[str], n: int) -> list[str]:
    # One value is drawn with choice() so that pairs (n = 1) keep the draws of the pair-only
    # generator that trained earlier checkpoints.
    return [rng.choice(options)] if n == 1 else rng.sample(options, min(n, len(options)))


def _rotated_pair(a: WorldObject, b: WorldObject, quarter_turns: int) -> list[WorldObject]:
    """``a`` and ``b`` moved so the offset between their centres turns by 90 degrees x
    ``quarter_turns`` about its midpoint (2: the positions swapped, the relation reversed)."""
    (ax, ay), (bx, by) = a.centre, b.centre
    mx, my, dx, dy = (ax + bx) / 2, (ay + by) / 2, (bx - ax) / 2, (by - ay) / 2
    for _ in range(quarter_turns % 4):
        dx, dy = -dy, dx

    def moved(obj: WorldObject, cx: float, cy: float) -> WorldObject:
        half, limit = SIZES[obj.size] / 2, IMAGE_SIZE - SIZES[obj.size]
        x = int(min(max(round(cx - half), 0), limit))
        y = int(min(max(round(cy - half), 0), limit))
        return obj._replace(x=x, y=y)

    return [moved(a, mx - dx, my - dy), moved(b, mx + dx, my + dy)]


def _overlap(a: WorldObject, b: WorldObject) -> bool:
    sa, sb = SIZES[a.size], SIZES[b.size]
    return not (a.x + sa < b.x or b.x + sb < a.x or a.y + sa < b.y or b.y + sb < a.y)


def twin_family(
    scene: Scene,
    rng: random.Random,
    kinds: Sequence[str] = TWIN_KINDS,
    size: int = 2,
    weights: Sequence[float] | None = None,
) -> tuple[list[Scene], str] | None:
    """Up to ``size - 1`` minimal-pair variants of ``scene``, all changing the same attribute.

    The attribute is one that colour, count and background do not reveal (see
    :func:`twin_scene`); a family of ``k`` variants gives the contrastive loss ``k`` hard
    negatives at once that differ from each other only there (four shapes of the same red
    striped object, say). Shape families change one shape into up to 7 others, texture
    families into up to 3, orientation families into up to 2, and relation families
    (``"swap"``) turn the offset between two objects by 180, 90 and 270 degrees, keeping the
    variants whose objects stay apart and whose relation is new.

    Args:
        scene: the scene to vary.
        rng: source of randomness.
        kinds: the changes to draw from (a subset of :data:`TWIN_KINDS`).
        size: family size including ``scene`` (2: one twin).
        weights: relative weight of each of ``kinds`` (None: uniform over the applicable ones).

    Returns:
        (variants, kind), or None when no change applies.
    """
    objs = list(scene.objects)
    applicable = _applicable_kinds(objs, kinds)
    if not applicable or size < 2:
        return None
    if weights is None:
        kind = rng.choice(applicable)
    else:
        table = dict(zip(kinds, weights, strict=True))
        kind = rng.choices(applicable, [table[k] for k in applicable])[0]
    n = size - 1
    variants: list[list[WorldObject]] = []
    if kind == "shape":
        old = rng.choice(objs).shape
        for new in _draw_new(rng, [s for s in SHAPES if s != old], n):
            variants.append([o._replace(shape=new) if o.shape == old else o for o in objs])
    elif kind == "texture":
        old = rng.choice(objs).texture
        for new in _draw_new(rng, [t for t in TEXTURES if t != old], n):
            variants.append([o._replace(texture=new) if o.texture == old else o for o in objs])
    elif kind == "orientation":
        current = next(o for o in objs if o.texture == "striped").orientation
        for new in _draw_new(rng, [r for r in ORIENTATIONS if r != current], n):
            variants.append(
                [o._replace(orientation=new) if o.texture == "striped" else o for o in objs]
            )
    else:
        from clipadapt.world.captions import relation

        seen = {relation(*objs)}
        for turns in (2, 1, 3)[:n]:
            moved = _rotated_pair(objs[0], objs[1], turns)
            if not _overlap(*moved) and relation(*moved) not in seen:
                seen.add(relation(*moved))
                variants.append(moved)
    twins = [scene._replace(objects=tuple(v)) for v in variants]
    twins = [t for t in twins if t != scene]
    return (twins, kind) if twins else None


def twin_scene(
    scene: Scene, rng: random.Random, kinds: Sequence[str] = TWIN_KINDS
) -> tuple[Scene, str] | None:
    """A minimal-pair counterpart of ``scene`` differing in one attribute that colour, count
    and background do not reveal: the shape of one object (of every object of that shape in
    a group), its texture (likewise), the stripe orientation of the striped objects, or the
    positions of two objects swapped (the relation flips). ``kinds`` restricts the changes
    drawn from. Returns (twin, kind), or None when no change applies.
    """
    family = twin_family(scene, rng, kinds)
    return None if family is None else (family[0][0], family[1])


class WorldGenerator:
    """Stream of (image, caption) pairs for pre-training.

    Args:
        group_prob: probability that a multi-object scene is a group of identical objects
            (teaches counting with plural nouns).
        twin_prob: probability that a drawn scene is followed in the batch by its minimal-pair
            twin (:func:`twin_scene`), captioned with the same phrasing choices except the
            changed attribute, which is always named. In a random batch colour, count and
            background tell almost every pair apart, so the contrastive loss barely needs shape,
            texture, orientation or relations; twins make it need them.
        twin_kinds: the changes a twin may carry (a subset of :data:`TWIN_KINDS`).
        family_size: scenes per twin family, the original included (2: one twin; up to 8
            for shape families, see :func:`twin_family`). Larger families put several hard
            negatives that differ only in the changed attribute into the same batch.
        twin_weights: relative weight of each of ``twin_kinds`` (None: uniform over the
            kinds that apply to the scene).
        caption_config: options forwarded to :func:`clipadapt.world.captions.caption`.

    Example:
        >>> images, captions, scenes = WorldGenerator().batch(4, seed=1)
    """

    def __init__(
        self,
        group_prob: float = 0.3,
        twin_prob: float = 0.0,
        twin_kinds: Sequence[str] = TWIN_KINDS,
        family_size: int = 2,
        twin_weights: Sequence[float] | None = None,
        **caption_config: float,
    ) -> None:
        unknown = sorted(set(twin_kinds) - set(TWIN_KINDS))
        if unknown or not twin_kinds:
            raise ValueError(f"twin kinds {list(twin_kinds)}: expected a subset of {TWIN_KINDS}")
        if family_size < 2:
            raise ValueError(
                f"family_size must be at least 2 (a scene and a twin), got {family_size}"
            )
        if twin_weights is not None and (
            len(twin_weights) != len(twin_kinds) or min(twin_weights) < 0 or sum(twin_weights) <= 0
        ):
            raise ValueError(
                f"twin_weights {list(twin_weights)}: need one non-negative weight per twin kind "
                f"{list(twin_kinds)}, not all zero"
            )
        self.group_prob = group_prob
        self.twin_prob = twin_prob
        self.twin_kinds = tuple(twin_kinds)
        self.family_size = family_size
        self.twin_weights = None if twin_weights is None else tuple(twin_weights)
        self.caption_config = caption_config

    def batch(self, n: int, seed: int) -> tuple[np.ndarray, list[str], list[Scene]]:
        """Draw ``n`` scenes with captions.

        Returns:
            images (n, 64, 64, 3) uint8, captions (n strings), scenes (n :class:`Scene`).
        """
        from clipadapt.world.captions import caption

        rng = random.Random(seed)
        images = np.empty((n, IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
        captions: list[str] = []
        scenes: list[Scene] = []
        forced = {
            "shape": {"p_shape_noun": 1.0},
            "texture": {"p_texture": 1.0},
            "orientation": {"p_texture": 1.0, "p_orientation": 1.0},
            "swap": {"p_relation": 1.0},
        }
        i = 0
        while i < n:
            count = rng.choices((1, 2, 3, 4), (0.4, 0.3, 0.15, 0.15))[0]
            scene = sample_scene(rng, count, same=count > 1 and rng.random() < self.group_prob)
            family = None
            if self.twin_prob > 0 and i + 1 < n and rng.random() < self.twin_prob:
                size = min(self.family_size, n - i)
                family = twin_family(scene, rng, self.twin_kinds, size, self.twin_weights)
            render_seed = rng.getrandbits(32)
            config = dict(self.caption_config)
            if family is not None:
                config.update(forced[family[1]])
            phrasing = rng.getstate()
            images[i] = render(scene, "normal", render_seed)
            captions.append(caption(scene, rng, **config))
            scenes.append(scene)
            i += 1
            for twin in family[0] if family is not None else ():
                twin_rng = random.Random()
                twin_rng.setstate(phrasing)  # same phrasing choices, one attribute changed
                images[i] = render(twin, "normal", render_seed)
                captions.append(caption(twin, twin_rng, **config))
                scenes.append(twin)
                i += 1
        return images, captions, scenes
