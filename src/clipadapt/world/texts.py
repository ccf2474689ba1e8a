"""Text side of the world datasets: invented species names, descriptions, prompt templates.

Kept apart from the datasets so the tokenizer vocabulary (:func:`world_vocabulary`) can be
built from every word any world text may contain, before any dataset exists.
"""

from __future__ import annotations

import random

from clipadapt.world.captions import (
    BACKGROUND_WORDS,
    NUMBERS,
    RELATION_WORDS,
    SIZE_WORDS,
    TEXTURE_ADJ,
    TEXTURE_SUFFIX,
    caption_words,
    with_article,
)
from clipadapt.world.generator import COLOURS, SHAPES
from clipadapt.world.tokenizer import WordTokenizer, split_words

# Invented names: never seen in pre-training captions, so a name alone carries nothing.
SPECIES_NAMES: tuple[str, ...] = (
    "velk",
    "dorin",
    "quaxi",
    "mibble",
    "zorp",
    "tavel",
    "grunn",
    "plisk",
    "wendo",
    "soraf",
    "kibbet",
    "lumox",
    "fennit",
    "jarva",
    "brisel",
    "hoxa",
    "nimbel",
    "trask",
    "yulo",
    "cravet",
)

# Invented names of the 60 kinds of ``world_composite`` (kept apart from the species names).
KIND_NAMES: tuple[str, ...] = (
    "baigick", "basosk", "beevil", "boulo", "bradat", "brainur", "bresux", "brimut",
    "brovack", "dekax", "dreetur", "driren", "driset", "felat", "fouver", "gaisun",
    "gasisk", "gevund", "gleenu", "gligem", "gokan", "kamund", "konan", "konusk",
    "krotind", "krulor", "muzot", "noutut", "peerox", "pidin", "pletel", "plitux",
    "plogack", "plusom", "pouson", "pouvick", "rairat", "rubar", "sheedit", "shezin",
    "shivack", "silin", "skeenux", "staret", "steenol", "stubisk", "sutax", "tairund",
    "tekor", "thagul", "thurem", "trezum", "trodux", "trurin", "vake", "vebisk",
    "vugir", "vumim", "zeesu", "zidask",
)  # fmt: skip

TEMPLATES: tuple[str, ...] = (
    "a photo of a {}.",
    "an image of a {}.",
    "a picture of a {}.",
    "a {}.",
    "there is a {}.",
)
SCENE_TEMPLATES: tuple[str, ...] = (
    "a photo of {}.",
    "an image of {}.",
    "a picture of {}.",
    "{}.",
    "there is {}.",
)
NEGATIVE_TEMPLATE = "a photo of no {}."

# CuPL-style description sentences; {n} is the species name, {a} its article.
# Only the first names the texture: the trait that tells sibling species apart is mentioned
# once, the salient shape and colour many times.
_DESCRIPTION_FORMS: tuple[str, ...] = (
    "{a} {n} is {full}.",
    "a photo of {a} {n}, which looks like {colour_shape}.",
    "{a} {n} is always {colour}.",
    "the body of {a} {n} is {colour}.",
    "{a} {n} has the shape of a {shape}.",
    "you can recognise {a} {n} by its {shape} shape.",
    "{a} {n} is a {size_word} {shape}.",
    "{a} {n} looks like {colour_shape}.",
)


def describe_species(
    name: str, shape: str, colour: str, texture: str, size: str | None, seed: int = 0
) -> list[str]:
    """Sentences describing one species' defining attributes in varied words.

    Each sentence names a subset of the attributes; together they name all of them, the
    texture in one sentence only. ``size`` None means the species comes in every size (the
    size is then not described).
    """
    rng = random.Random(f"{seed}:{name}")
    tex = rng.choice(TEXTURE_ADJ[texture])
    size_word = rng.choice(SIZE_WORDS[size]) if size else ""
    full = with_article(" ".join(w for w in (size_word, colour, tex, shape) if w))
    fields = {
        "n": name,
        "a": "a",
        "full": full,
        "colour": colour,
        "texture": tex,
        "shape": shape,
        "suffix": rng.choice(TEXTURE_SUFFIX[texture]),
        "size_word": size_word or "small or large",
        "colour_shape": with_article(f"{colour} {shape}"),
    }
    return [form.format(**fields) for form in _DESCRIPTION_FORMS]


def describe_count(count: int, alike: bool | None) -> list[str]:
    """Sentences describing a scene of ``count`` objects.

    ``alike`` (ignored for one object) True: the objects are identical copies; False: no two
    are identical. The words for sameness ("identical",
    "different", ...) never occur in pre-training captions, only the group phrasings do ("a
    group of three ...", "... together"), so these descriptions tell alike from mixed scenes
    only through the phrasing real captions use for groups.
    """
    word = NUMBERS[count - 1]
    if count == 1:
        return [
            "one shape.",
            "a single object on its own.",
            "exactly one object.",
            "a photo of one shape alone.",
            "there is only one object.",
        ]
    if alike:
        return [
            f"{word} identical shapes.",
            f"a group of {word} shapes that are all the same.",
            f"{word} copies of one shape together.",
            f"exactly {word} shapes of the same kind.",
            f"a photo of {word} alike objects.",
        ]
    return [
        f"{word} different shapes.",
        f"{word} shapes of different kinds.",
        f"{word} unlike objects.",
        f"exactly {word} shapes, each one different.",
        f"a photo of {word} mixed objects.",
    ]


_INVERSE = {"left": "right", "right": "left", "above": "below", "below": "above"}


def describe_relation(first: str, rel: str, second: str) -> list[str]:
    """Sentences describing ``first`` in relation ``rel`` to ``second``, both ways round."""
    inverse = _INVERSE[rel]
    return [
        *(f"a {first} {words} a {second}." for words in RELATION_WORDS[rel]),
        *(f"a {second} {words} a {first}." for words in RELATION_WORDS[inverse][:2]),
    ]


def bigger_classname(large: str, small: str) -> str:
    """``"a large red shape and a small blue shape"``: a ``world_bigger`` class."""
    return f"a large {large} shape and a small {small} shape"


def describe_bigger(large: str, small: str) -> list[str]:
    """Sentences saying that the ``large``-coloured object is the larger of the two, in the
    size words the captions use, naming the large one first in some and last in others."""
    return [
        f"{bigger_classname(large, small)}.",
        f"a big {large} object next to a tiny {small} object.",
        f"a small {small} shape next to a huge {large} shape.",
        f"the {large} shape is large and the {small} shape is small.",
        f"a little {small} object with a big {large} object.",
    ]


# Kind descriptions: the colour is named in most sentences, the habitat (background) in two and
# the size in one, as the species descriptions dwell on the salient trait; the shape and the
# pattern are free (a kind comes in every shape and pattern).
_KIND_FORMS: tuple[str, ...] = (
    "{a} {n} is {full} shape.",
    "a photo of {a} {n}, which is {colour}.",
    "{a} {n} is always {colour}.",
    "the body of {a} {n} is {colour}.",
    "{a} {n} can have any shape and pattern.",
    "{a} {n} lives {habitat}.",
    "you can recognise {a} {n} by its {colour} colour.",
    "{a} {n} looks like {colour_shape} {habitat}.",
)


def describe_kind(name: str, colour: str, background: str, size: str, seed: int = 0) -> list[str]:
    """Sentences describing one ``world_composite`` kind: colour, habitat (the background) and
    size; any shape and pattern."""
    rng = random.Random(f"kind:{seed}:{name}")
    fields = {
        "n": name,
        "a": "a",
        "full": with_article(f"{rng.choice(SIZE_WORDS[size])} {colour}"),
        "colour": colour,
        "habitat": rng.choice(BACKGROUND_WORDS[background]),
        "colour_shape": with_article(f"{colour} shape"),
    }
    return [form.format(**fields) for form in _KIND_FORMS]


_SHADE_FORMS: dict[str, tuple[str, ...]] = {
    "pale": (
        "a pale {c} shape.",
        "a shape in pastel {c}.",
        "a {c} shape mixed with white.",
        "a light {c} object.",
        "a photo of a pale {c} object.",
    ),
    "normal": (
        "a {c} shape.",
        "a shape in pure {c}.",
        "a {c} shape, neither pale nor deep.",
        "a bright {c} object.",
        "a photo of a {c} object.",
    ),
    "deep": (
        "a deep {c} shape.",
        "a shape in rich {c}.",
        "a {c} shape mixed with black.",
        "a dark {c} object.",
        "a photo of a deep {c} object.",
    ),
}


def shade_classname(colour: str, shade: str) -> str:
    """``"pale red shape"``, ``"red shape"`` or ``"deep red shape"``."""
    return f"{colour} shape" if shade == "normal" else f"{shade} {colour} shape"


def describe_shade(colour: str, shade: str) -> list[str]:
    """Sentences describing a shape of ``colour`` in ``shade`` (pale, normal or deep)."""
    return [form.format(c=colour) for form in _SHADE_FORMS[shade]]


EXTRA_WORDS = (
    "no which looks like is always the body of has shape you can recognise by its or"
    " photo image picture there are only alone single own run that next to other"
)


def world_vocabulary() -> list[str]:
    """Sorted word list covering captions, class names, descriptions and templates."""
    words = caption_words()
    words.update(SPECIES_NAMES)
    words.update(KIND_NAMES)
    texts = [*TEMPLATES, *SCENE_TEMPLATES, NEGATIVE_TEMPLATE, EXTRA_WORDS]
    for shape in SHAPES:
        for other in SHAPES:
            for rel in _INVERSE:
                texts += describe_relation(shape, rel, other)
    for large in COLOURS:
        for small in COLOURS:
            texts += [bigger_classname(large, small), *describe_bigger(large, small)]
    for count in range(1, len(NUMBERS) + 1):
        for alike in (True, False):
            texts += describe_count(count, alike)
    for colour in COLOURS:
        for shade in _SHADE_FORMS:
            texts += [shade_classname(colour, shade), *describe_shade(colour, shade)]
        for background in BACKGROUND_WORDS:
            for size in SIZE_WORDS:
                texts += describe_kind("velk", colour, background, size)
    for t in texts:
        words.update(split_words(t.replace("{}", " ")))
    return sorted(words)


def world_tokenizer(context_length: int = 32) -> WordTokenizer:
    """The tokenizer of the shipped world model (vocabulary from :func:`world_vocabulary`)."""
    return WordTokenizer(world_vocabulary(), context_length=context_length)
