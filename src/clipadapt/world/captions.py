"""Captions for world scenes, built from the scene's attributes with varied phrasing.

The features of a contrastively trained model carry only what the captions teach, so every
attribute is named in a good share of captions (the probabilities below are parameters of
:func:`caption`), with synonyms and two word orders. Two deliberate exceptions: the shade of a
pale or deep colour is named in only ``p_shade`` (default 20 %) of the captions that name the
colour, and the stripe orientation in only ``p_orientation`` (default 25 %) of named stripes.
The fine-grained world task (``world_shades``) is built on the shade, like real fine-grained
benchmarks whose classes differ in what web captions rarely say.

Example:
    >>> import random
    >>> from clipadapt.world.generator import sample_scene
    >>> caption(sample_scene(random.Random(0)), random.Random(0))  # doctest: +SKIP
    'a photo of a small red striped triangle left of a blue circle'
"""

from __future__ import annotations

import random

from clipadapt.world.generator import (
    BACKGROUNDS,
    COLOURS,
    IMAGE_SIZE,
    ORIENTATIONS,
    PLURAL,
    SHAPES,
    SIZES,
    TEXTURES,
    Scene,
    WorldObject,
)

NUMBERS: tuple[str, ...] = ("one", "two", "three", "four")

SIZE_WORDS: dict[str, tuple[str, ...]] = {
    "small": ("small", "tiny", "little"),
    "medium": ("medium", "medium sized", "mid sized"),
    "large": ("large", "big", "huge"),
}
# Shade words go before the colour ("a pale red star"); "light"/"dark" are left to backgrounds.
SHADE_WORDS: dict[str, tuple[str, ...]] = {
    "pale": ("pale", "pastel"),
    "deep": ("deep", "rich"),
}
TEXTURE_ADJ: dict[str, tuple[str, ...]] = {
    "solid": ("solid", "plain coloured", "uniform"),
    "striped": ("striped", "stripy"),
    "dotted": ("dotted", "spotted", "polka dot"),
    "checkered": ("checkered", "checked", "chequered"),
}
TEXTURE_SUFFIX: dict[str, tuple[str, ...]] = {
    "solid": ("with no pattern", "in a single colour"),
    "striped": ("with stripes",),
    "dotted": ("with dots", "with polka dots", "covered in spots"),
    "checkered": ("with a checkered pattern", "with a checkerboard pattern"),
}
ORIENT_ADJ: dict[str, str] = {
    "horizontal": "horizontally striped",
    "vertical": "vertically striped",
    "diagonal": "diagonally striped",
}
ORIENT_SUFFIX: dict[str, str] = {
    "horizontal": "with horizontal stripes",
    "vertical": "with vertical stripes",
    "diagonal": "with diagonal stripes",
}
BACKGROUND_WORDS: dict[str, tuple[str, ...]] = {
    "plain": ("on a plain background", "on a white background", "on a light background"),
    "dark": ("on a dark background", "on a black background", "in the dark"),
    "grass": ("on grass", "on a grassy background", "on the lawn"),
    "sand": ("on sand", "on a sandy background", "on the beach"),
    "sky": ("in the sky", "against the sky", "on a sky background"),
}
LEFT = ("left of", "to the left of", "on the left of")
RIGHT = ("right of", "to the right of", "on the right of")
ABOVE = ("above", "over")
BELOW = ("below", "under", "beneath")
FRAMES = ("{}", "{}", "a photo of {}", "an image of {}", "a picture of {}", "there is {}")
NOUNS = ("shape", "object")
GROUP_FRAMES = ("{} {}", "a group of {} {}", "{} {} together", "exactly {} {}")


def article(phrase: str) -> str:
    """``"a"`` or ``"an"`` for ``phrase``."""
    return "an" if phrase[:1] in "aeiou" else "a"


def with_article(phrase: str) -> str:
    return f"{article(phrase)} {phrase}"


def position_phrase(obj: WorldObject, rng: random.Random) -> str:
    """Where a single object sits, from its centre (thirds of the canvas)."""
    cx, cy = obj.centre
    third = IMAGE_SIZE / 3
    h = "left" if cx < third else "right" if cx > 2 * third else ""
    v = "top" if cy < third else "bottom" if cy > 2 * third else ""
    if h and v:
        return f"in the {v} {h} corner"
    if h:
        return rng.choice((f"on the {h}", f"on the {h} side"))
    if v:
        return rng.choice((f"at the {v}", f"near the {v}"))
    return rng.choice(("in the center", "in the middle"))


def relation(a: WorldObject, b: WorldObject) -> str:
    """Canonical relation of ``a`` to ``b``: ``left``, ``right``, ``above`` or ``below``."""
    (ax, ay), (bx, by) = a.centre, b.centre
    if abs(ax - bx) >= abs(ay - by):
        return "left" if ax < bx else "right"
    return "above" if ay < by else "below"


def clear_relation(a: WorldObject, b: WorldObject, margin: float = 4.0) -> str | None:
    """:func:`relation` of ``a`` to ``b`` when its axis dominates the other by more than
    ``margin`` pixels, else None (a near-diagonal pair has no clear relation)."""
    (ax, ay), (bx, by) = a.centre, b.centre
    return relation(a, b) if abs(abs(ax - bx) - abs(ay - by)) > margin else None


RELATION_WORDS: dict[str, tuple[str, ...]] = {
    "left": LEFT,
    "right": RIGHT,
    "above": ABOVE,
    "below": BELOW,
}


def _object_phrase(
    obj: WorldObject,
    rng: random.Random,
    p_size: float,
    p_colour: float,
    p_texture: float,
    p_orientation: float,
    plural: bool = False,
    p_shape_noun: float = 0.92,
    p_shade: float = 0.2,
) -> str:
    """Noun phrase for one object (no article), each attribute kept with its probability
    (the shape noun is replaced by "shape"/"object" with probability ``1 - p_shape_noun``;
    a pale or deep shade is named with probability ``p_shade`` when the colour is)."""
    words: list[str] = []
    if rng.random() < p_size:
        words.append(rng.choice(SIZE_WORDS[obj.size]))
    if rng.random() < p_colour:
        # Two draws whatever the shade, so twins keep each other's phrasing choices.
        shade_roll, word_roll = rng.random(), rng.random()
        if obj.shade in SHADE_WORDS and shade_roll < p_shade:
            words.append(_pick(SHADE_WORDS[obj.shade], word_roll))
        words.append(obj.colour)
    suffix = ""
    if rng.random() < p_texture:
        # A fixed number of draws whatever the texture, so a minimal-pair twin whose texture
        # changed keeps every other phrasing choice of its original.
        orient_roll, form_roll, word_roll = rng.random(), rng.random(), rng.random()
        oriented = obj.texture == "striped" and orient_roll < p_orientation
        if form_roll < 0.7:
            words.append(
                ORIENT_ADJ[obj.orientation]
                if oriented
                else _pick(TEXTURE_ADJ[obj.texture], word_roll)
            )
        else:
            suffix = (
                ORIENT_SUFFIX[obj.orientation]
                if oriented
                else _pick(TEXTURE_SUFFIX[obj.texture], word_roll)
            )
    noun = obj.shape if rng.random() < p_shape_noun else rng.choice(NOUNS)
    words.append(PLURAL.get(noun, noun + "s") if plural else noun)
    if suffix:
        words.append(suffix)
    return " ".join(words)


object_phrase = _object_phrase


def _pick(options: tuple[str, ...], roll: float) -> str:
    return options[min(int(roll * len(options)), len(options) - 1)]


def caption(
    scene: Scene,
    rng: random.Random,
    p_size: float = 0.55,
    p_colour: float = 0.85,
    p_texture: float = 0.65,
    p_orientation: float = 0.25,
    p_position: float = 0.45,
    p_background: float = 0.45,
    p_relation: float = 0.65,
    p_count: float = 0.7,
    p_shape_noun: float = 0.92,
    p_shade: float = 0.2,
) -> str:
    """A caption of ``scene`` naming each attribute with the given probability.

    Args:
        scene: the scene to describe.
        rng: source of the phrasing choices (deterministic given its state).
        p_size, p_colour, p_texture: per-object probability of naming the attribute.
        p_orientation: probability that a named stripe texture also names its orientation.
        p_position: probability of naming a single object's position.
        p_background: probability of naming the background.
        p_relation: probability that a two-object scene is described by its relation.
        p_count: probability that a multi-object scene names its count.
        p_shape_noun: probability that an object's noun is its shape (else "shape"/"object").
        p_shade: probability that a pale or deep colour is named with its shade word, when
            the colour is named: deliberately rare, like the stripe orientation (the
            fine-grained ``world_shades`` task is built on it).

    Returns:
        A lower-case caption, e.g. ``"a small red striped triangle left of a blue circle"``.
    """
    objs = scene.objects
    n = len(objs)
    attr = (p_size, p_colour, p_texture, p_orientation)
    first = objs[0]

    def object_phrase(obj: WorldObject, rng: random.Random, *probs: float, **kw: bool) -> str:
        return _object_phrase(obj, rng, *probs, p_shape_noun=p_shape_noun, p_shade=p_shade, **kw)

    if n == 1:
        phrase = object_phrase(first, rng, *attr)
        text = f"one {phrase}" if rng.random() < 0.15 else with_article(phrase)
        if rng.random() < p_position:
            text += " " + position_phrase(first, rng)
    elif all(o.look == first.look for o in objs):  # a group of identical objects
        phrase = object_phrase(first, rng, *attr, plural=True)
        if rng.random() < p_count:
            text = rng.choice(GROUP_FRAMES).format(NUMBERS[n - 1], phrase)
        else:
            text = f"some {phrase}"
    elif n == 2 and rng.random() < p_relation:
        a, b = (first, objs[1]) if rng.random() < 0.5 else (objs[1], first)
        rel = rng.choice(RELATION_WORDS[relation(a, b)])
        pa, pb = object_phrase(a, rng, *attr), object_phrase(b, rng, *attr)
        text = f"{with_article(pa)} {rel} {with_article(pb)}"
    else:
        parts = [with_article(object_phrase(o, rng, *attr)) for o in objs]
        listed = ", ".join(parts[:-1]) + " and " + parts[-1]
        if rng.random() < p_count:
            noun = rng.choice(NOUNS) + "s"
            text = f"{NUMBERS[n - 1]} {noun}: {listed}"
        else:
            text = listed
    if rng.random() < p_background:
        text += " " + rng.choice(BACKGROUND_WORDS[scene.background])
    return rng.choice(FRAMES).format(text)


def caption_words() -> set[str]:
    """Every word :func:`caption` can emit (used to build the tokenizer vocabulary)."""
    from clipadapt.world.tokenizer import split_words

    phrases: list[str] = [*SHAPES, *PLURAL.values(), *COLOURS, *TEXTURES, *ORIENTATIONS]
    phrases += [*NUMBERS, *NOUNS, *(n + "s" for n in NOUNS), "a an one some", *SIZES]
    for table in (
        SIZE_WORDS,
        SHADE_WORDS,
        TEXTURE_ADJ,
        TEXTURE_SUFFIX,
        BACKGROUND_WORDS,
        RELATION_WORDS,
    ):
        for values in table.values():
            phrases += list(values)
    phrases += [*ORIENT_ADJ.values(), *ORIENT_SUFFIX.values(), *BACKGROUNDS]
    phrases += list(FRAMES) + list(GROUP_FRAMES)
    phrases += ["in the top bottom left right corner side at near center middle and"]
    words: set[str] = set()
    for p in phrases:
        words.update(split_words(p.replace("{}", " ")))
    return words
