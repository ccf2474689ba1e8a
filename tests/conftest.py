"""Shared fixtures: a tiny open_clip model registered here, a random local checkpoint, and a
small generated ImageFolder. Nothing touches the network."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"

TINY_MODEL = "clipadapt-test-tiny-vit"
TINY_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
    "text_cfg": {"context_length": 24, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}


@pytest.fixture(scope="session", autouse=True)
def _private_cache_root(tmp_path_factory: pytest.TempPathFactory):
    """Every test writes features and the splits of ImageFolder trees under a cache root of its
    session, never into the user's ~/.cache (tests that check the root rule set their own)."""
    previous = os.environ.get("CLIPADAPT_CACHE")
    os.environ["CLIPADAPT_CACHE"] = str(tmp_path_factory.mktemp("clipadapt-cache"))
    yield
    if previous is None:
        os.environ.pop("CLIPADAPT_CACHE", None)
    else:
        os.environ["CLIPADAPT_CACHE"] = previous


def real_data(*parts: str) -> Path:
    """A path under ../shared/data, or skip the test when the data is absent."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"real data not available ({'/'.join(parts)})")
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Registers the tiny config with open_clip and writes a seeded random checkpoint."""
    import open_clip
    from safetensors.torch import save_file

    directory = tmp_path_factory.mktemp("tiny_model")
    (directory / f"{TINY_MODEL}.json").write_text(json.dumps(TINY_CONFIG))
    open_clip.add_model_config(directory)
    torch.manual_seed(0)
    model = open_clip.create_model(TINY_MODEL)
    save_file(
        {k: v.contiguous() for k, v in model.state_dict().items()},
        str(directory / "tiny.safetensors"),
    )
    return directory


@pytest.fixture(scope="session")
def tiny_backbone(tiny_model_dir: Path):
    from clipadapt.encoders.clip import resolve_backbone

    return resolve_backbone(TINY_MODEL, checkpoint=tiny_model_dir / "tiny.safetensors")


@pytest.fixture(scope="session")
def tiny_encoder(tiny_backbone):
    from clipadapt.encoders.clip import ClipEncoder

    return ClipEncoder(tiny_backbone, device="cpu")


def make_image_folder(
    root: Path, classes: int = 3, per_class: int = 12, size: int = 40, seed: int = 0
) -> Path:
    """Class-dependent coloured images with noise, as PNG/JPEG files under root/<class>/."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    names = ["red_square", "green_disc", "blue_bar", "grey_dot", "yellow_ring"][:classes]
    for c, name in enumerate(names):
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        base = np.zeros(3)
        base[c % 3] = 200
        for i in range(per_class):
            pixels = rng.normal(base + 30 * (c // 3), 25, size=(size, size + 8 * (i % 3), 3))
            image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
            ext = "png" if i % 2 == 0 else "jpg"
            image.save(folder / f"img_{i:03d}.{ext}")
    return root


@pytest.fixture()
def image_folder(tmp_path: Path) -> Path:
    return make_image_folder(tmp_path / "images")


#: Hyperparameter overrides that only shorten a fit on the tiny fixtures (fewer epochs, coarser
#: grids, a small ODE field); shared by the check suite, export and determinism tests.
FAST_PARAMS: dict[str, dict[str, object]] = {
    # 20x20 instead of 20x200 (alpha, beta) grid points
    "tip_adapter": {"search_steps_beta": 20},
    "tip_adapter_f": {"search_steps_beta": 20, "epochs": 5},
    # 2 residual ratios and 20 epochs instead of 4 x 200 (0.8 s of CPU per fit otherwise)
    "clip_adapter": {"epochs": 20, "ratio_grid": (0.2, 0.6)},
    # a small ODE field, few solver steps, one grid point (5.5 s of CPU per fit otherwise)
    "node_adapter": {
        "epochs": 3,
        "blend_init_grid": (0.5,),
        "gamma_init_grid": (1.0,),
        "steps": 2,
        "hidden": 32,
        "heads": 2,
        "head_dim": 8,
        "adjoint": False,
    },
}
