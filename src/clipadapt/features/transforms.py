"""Image transforms for extraction: the clean (eval) view and seeded augmented views.

Augmented views are reproducible: view ``v`` of image ``i`` is drawn from a generator seeded by
(extraction seed, image key, v), never from the global RNG, so a resumed or repeated extraction
yields the same pixels in any process (Tip-Adapter's cache relied on an unshuffled loader instead).
"""

from __future__ import annotations

import hashlib
import math

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF


def _to_tensor(image: Image.Image, mean: tuple[float, ...], std: tuple[float, ...]) -> Tensor:
    """``TF.normalize(TF.to_tensor(image), mean, std)`` with the same operations in the same
    order (bitwise equal, tested), without torchvision's per-call checks: half the time on a
    64-pixel image, which the small embedded model encodes in about 1 ms."""
    pixels = torch.from_numpy(np.array(image, dtype=np.uint8, copy=True))
    x = pixels.permute(2, 0, 1).contiguous().to(torch.get_default_dtype()).div_(255)
    return x.sub_(torch.tensor(mean)[:, None, None]).div_(torch.tensor(std)[:, None, None])


def load_rgb(path: str) -> Image.Image:
    """Open any PIL-readable image (CMYK, grayscale, 16-bit, palette) as 8-bit RGB."""
    with Image.open(path) as image:
        image.load()
        if image.mode in ("I;16", "I;16B", "I;16L", "I"):
            array = np.asarray(image, dtype=np.float64)
            peak = array.max() if array.size and array.max() > 0 else 1.0
            image = Image.fromarray((array / peak * 255).astype(np.uint8), mode="L")
        return image.convert("RGB")


class CleanView:
    """Resize the shorter side to ``size`` (bicubic), centre-crop ``size``, normalise."""

    def __init__(self, size: int, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        self.size, self.mean, self.std = size, mean, std

    def describe(self) -> dict:
        return {"kind": "clean", "size": self.size, "mean": self.mean, "std": self.std}

    def __call__(self, image: Image.Image) -> Tensor:
        image = TF.resize(image, self.size, interpolation=InterpolationMode.BICUBIC)
        image = TF.center_crop(image, [self.size, self.size])
        return _to_tensor(image, self.mean, self.std)


#: The augmentation of train views when neither the caller nor the dataset chooses one:
#: Tip-Adapter's random-resized crops of 50-100 % of the image, flipped with probability 0.5.
DEFAULT_AUG_SCALE: tuple[float, float] = (0.5, 1.0)
DEFAULT_AUG_FLIP = 0.5


class AugmentedViews:
    """``views`` random-resized crops (scale range, ratio 3/4-4/3) + horizontal flips.

    Args:
        size: output side.
        views: number of views per image.
        scale: crop area range (Tip-Adapter: (0.5, 1); CoOp-style: (0.08, 1)).
        seed: extraction seed; each (image key, view) gets its own generator from it.
        flip: probability of a horizontal flip (0 for none).
    """

    def __init__(
        self,
        size: int,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        views: int = 10,
        scale: tuple[float, float] = DEFAULT_AUG_SCALE,
        seed: int = 0,
        flip: float = DEFAULT_AUG_FLIP,
    ) -> None:
        self.size, self.mean, self.std = size, mean, std
        self.views, self.scale, self.seed, self.flip = views, tuple(scale), seed, float(flip)

    def describe(self) -> dict:
        return {
            "kind": "augmented",
            "size": self.size,
            "mean": self.mean,
            "std": self.std,
            "views": self.views,
            "scale": list(self.scale),
            "seed": self.seed,
            "ratio": [3 / 4, 4 / 3],
            # the flip probability is part of the cache key: a changed policy never reuses views
            "flip": self.flip,
        }

    def _rng(self, key: str, view: int) -> np.random.Generator:
        digest = hashlib.sha256(f"{self.seed}|{key}|{view}".encode()).digest()
        return np.random.default_rng(int.from_bytes(digest[:8], "little"))

    def _crop_box(
        self, rng: np.random.Generator, width: int, height: int
    ) -> tuple[int, int, int, int]:
        # torchvision's RandomResizedCrop.get_params, drawn from our generator
        area = width * height
        log_ratio = (math.log(3 / 4), math.log(4 / 3))
        for _ in range(10):
            target = area * rng.uniform(*self.scale)
            ratio = math.exp(rng.uniform(*log_ratio))
            w = int(round(math.sqrt(target * ratio)))
            h = int(round(math.sqrt(target / ratio)))
            if 0 < w <= width and 0 < h <= height:
                top = int(rng.integers(0, height - h + 1))
                left = int(rng.integers(0, width - w + 1))
                return top, left, h, w
        in_ratio = width / height
        if in_ratio < 3 / 4:
            w, h = width, int(round(width / (3 / 4)))
        elif in_ratio > 4 / 3:
            h, w = height, int(round(height * (4 / 3)))
        else:
            w, h = width, height
        return (height - h) // 2, (width - w) // 2, h, w

    def __call__(self, image: Image.Image, key: str) -> Tensor:
        """(V, 3, size, size) views of one image."""
        out = []
        for view in range(self.views):
            rng = self._rng(key, view)
            top, left, h, w = self._crop_box(rng, image.width, image.height)
            crop = TF.resized_crop(
                image,
                top,
                left,
                h,
                w,
                [self.size, self.size],
                interpolation=InterpolationMode.BICUBIC,
            )
            # drawn even when flips are off, so the crops do not depend on the flip policy
            if rng.uniform() < self.flip:
                crop = TF.hflip(crop)
            out.append(_to_tensor(crop, self.mean, self.std))
        return torch.stack(out)
