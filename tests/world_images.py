"""Helpers for tests that need small real image files the embedded ``world`` CLIP can read.

Objects are drawn by the world renderer, so class names such as ``red circle`` are concepts the
shipped world model knows and zero-shot accuracy on them is well above chance.
"""

from __future__ import annotations

import random
from pathlib import Path

from PIL import Image

from clipadapt.world.generator import Scene, place, random_object, render


def world_image(
    path: Path, shape: str, colour: str, seed: int | str, style: str = "normal"
) -> Path:
    """Write one image of a large ``colour`` ``shape`` (PNG, or JPEG for .jpg/.jpeg/.JPEG)."""
    rng = random.Random(f"{shape}:{colour}:{seed}")
    ((x, y),) = place(rng, ["large"])
    obj = random_object(rng, "large", x, y, shape=shape, colour=colour, texture="solid")
    pixels = render(Scene("plain", rng.randrange(8), (obj,)), style=style, seed=rng.randrange(99))
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
    return path
