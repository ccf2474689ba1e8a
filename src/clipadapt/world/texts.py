"""Text side of the world datasets: invented species names, descriptions, prompt templates.

Kept apart from the datasets so the tokenizer vocabulary (:func:`world_vocabulary`) can be
built from every word any world text may contain, before any dataset exists.
"""

from __future__ import annotations

import random

from clipadapt.world.captions import (
    NUMBERS,
    ORIENT_ADJ,
    ORIENT_SUFFIX,
    RELATION_WORDS,
    SIZE_WORDS,
    TEXTURE_ADJ,
    TEXTURE_SUFFIX,
    caption_words,
    with_article,
)
from clipadapt.world.generator import COLOURS, ORIENTATIONS, SHAPES
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


def describe_stripes(shape: str, orientation: str) -> list[str]:
    """Sentences describing a striped shape whose class is its stripe orientation."""
    adj, suffix = ORIENT_ADJ[orientation], ORIENT_SUFFIX[orientation]
    return [
        f"{with_article(adj)} {shape}.",
        f"a photo of a striped {shape} {suffix}.",
        f"a {shape} {suffix}.",
        f"the stripes of the {shape} run {orientation}.",
        f"a {shape} shape covered in {orientation} stripes.",
    ]


def describe_count(count: int) -> list[str]:
    """Sentences describing a scene of ``count`` objects."""
    word = NUMBERS[count - 1]
    if count == 1:
        return [
            "one shape.",
            "a single object on its own.",
            "exactly one object.",
            "a photo of one shape alone.",
            "there is only one object.",
        ]
    return [
        f"{word} shapes.",
        f"a group of {word} objects.",
        f"exactly {word} shapes together.",
        f"a photo of {word} objects.",
        f"there are {word} shapes.",
    ]


_INVERSE = {"left": "right", "right": "left", "above": "below", "below": "above"}


def describe_relation(first: str, rel: str, second: str) -> list[str]:
    """Sentences describing ``first`` in relation ``rel`` to ``second``, both ways round."""
    inverse = _INVERSE[rel]
    return [
        *(f"a {first} {words} a {second}." for words in RELATION_WORDS[rel]),
        *(f"a {second} {words} a {first}." for words in RELATION_WORDS[inverse][:2]),
    ]


def describe_composite(shape: str, colour: str) -> list[str]:
    """Sentences describing one coloured shape, possibly beside a small other object."""
    return [
        f"{with_article(colour)} {shape}.",
        f"a {shape} that is {colour}.",
        f"a photo of {with_article(colour)} {shape}.",
        f"a {colour} shape which looks like a {shape}.",
        f"{with_article(colour)} {shape} next to a small other object.",
    ]


EXTRA_WORDS = (
    "no which looks like is always the body of has shape you can recognise by its or"
    " photo image picture there are only alone single own run that next to other"
)


def world_vocabulary() -> list[str]:
    """Sorted word list covering captions, class names, descriptions and templates."""
    words = caption_words()
    words.update(SPECIES_NAMES)
    texts = [*TEMPLATES, *SCENE_TEMPLATES, NEGATIVE_TEMPLATE, EXTRA_WORDS]
    for shape in SHAPES:
        for orientation in ORIENTATIONS:
            texts += describe_stripes(shape, orientation)
        for colour in COLOURS:
            texts += describe_composite(shape, colour)
        for other in SHAPES:
            for rel in _INVERSE:
                texts += describe_relation(shape, rel, other)
    for count in range(1, len(NUMBERS) + 1):
        texts += describe_count(count)
    for t in texts:
        words.update(split_words(t.replace("{}", " ")))
    return sorted(words)


def world_tokenizer(context_length: int = 32) -> WordTokenizer:
    """The tokenizer of the shipped world model (vocabulary from :func:`world_vocabulary`)."""
    return WordTokenizer(world_vocabulary(), context_length=context_length)
