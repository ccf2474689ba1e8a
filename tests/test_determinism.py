"""Determinism on the CPU: same seed and inputs give bitwise-identical features and logits.

Features: the same images through the same extraction twice (separate caches, so the second run
encodes again). Logits: every registered method fitted twice with the same seed on the shared
fixture (``clipadapt.testing.make_fixture``), with the global RNGs disturbed in between, so a
method that drew from them instead of its own generator would differ. The ``--deterministic``
flag is checked to switch torch to deterministic kernels (what matters on a GPU, see
``docs/reliability.md``).
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import clipadapt
from clipadapt.cli import build_parser, main
from clipadapt.data.bundle import load_bundle, save_bundle
from clipadapt.features.extract import extract_dataset
from clipadapt.methods.base import method_card
from clipadapt.testing import make_fixture
from conftest import FAST_PARAMS, make_image_folder

#: The shared overrides that only shorten a fit (conftest.FAST_PARAMS) and a short CoOp;
#: determinism does not depend on how long training runs.
CHEAP: dict[str, dict[str, Any]] = {**FAST_PARAMS, "coop": {"n_ctx": 4, "epochs": 3}}


def _bits(x: torch.Tensor) -> torch.Tensor:
    """The raw bits of a float32 tensor (torch.equal would call -0.0 and 0.0 equal)."""
    return x.detach().contiguous().float().view(torch.int32)


def _disturb_global_rngs(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)
    torch.rand(seed % 7 + 1)  # and move the stream on


@pytest.fixture(autouse=True)
def keep_global_rng():
    with torch.random.fork_rng():
        state = random.getstate(), np.random.get_state()
        yield
        random.setstate(state[0])
        np.random.set_state(state[1])


@pytest.mark.parametrize("name", clipadapt.list_methods())
def test_same_seed_gives_bitwise_identical_logits(name: str, tiny_encoder) -> None:
    needs_tower = "text_encoder" in method_card(name).needs
    tower = tiny_encoder.text_tower() if needs_tower else None
    fx = make_fixture(num_classes=5, dim=32, shots=4, views=2, text_encoder=tower)
    outputs = []
    for disturbance in (1, 987):
        _disturb_global_rngs(disturbance)
        method = clipadapt.create_method(name, **CHEAP.get(name, {}))
        if "seed" in method.get_params():
            method.set_params(seed=3)
        method.fit(fx.train, fx.text, fx.val)
        outputs.append((method.logits(fx.test.features), dict(method.best_params_)))
    (first, best_first), (second, best_second) = outputs
    assert first.dtype == torch.float32 and torch.isfinite(first).all()
    assert torch.equal(_bits(first), _bits(second)), f"{name}: logits differ between two fits"
    assert best_first == best_second


def test_evaluate_end_to_end_is_bitwise_repeatable(tmp_path: Path) -> None:
    """Few-shot draw + validation draw + search + fit + score through the public API."""
    fx = make_fixture(num_classes=4, dim=16, shots=4)
    tensors = dict(fx.bundle.tensors)
    # a full train pool to sample from, so the seeded K-shot draw is part of the check
    tensors["train_features"] = torch.cat(
        [tensors["train_4shot_features"], tensors["val_features"]]
    )
    tensors["train_labels"] = torch.cat([tensors["train_4shot_labels"], tensors["val_labels"]])
    path = save_bundle(tmp_path / "b.safetensors", tensors, fx.bundle.metadata)
    runs = []
    for disturbance in (5, 6):
        _disturb_global_rngs(disturbance)
        result = clipadapt.evaluate(
            clipadapt.create_method("tip_adapter_f", **CHEAP["tip_adapter_f"]),
            load_bundle(path),
            shots=2,
            seed=2,
        )
        runs.append(result.to_dict())
    for run in runs:
        run.pop("fit_seconds")
        run.pop("predict_seconds")
    assert runs[0] == runs[1]


def test_extraction_twice_gives_bitwise_identical_features(tmp_path: Path, tiny_encoder) -> None:
    from clipadapt.data.datasets import load_dataset

    dataset = load_dataset(make_image_folder(tmp_path / "imgs", classes=2, per_class=5, size=24))
    bundles = []
    for run in ("a", "b"):
        _disturb_global_rngs(len(run) + ord(run))
        bundle, report = extract_dataset(
            dataset,
            tiny_encoder,
            tmp_path / f"{run}.safetensors",
            cache_dir=tmp_path / f"cache-{run}",  # a fresh cache: the second run encodes too
            views=3,
            num_workers=0,
            progress=False,
        )
        assert report.encoded["train_views"] > 0
        bundles.append(bundle)
    first, second = bundles
    assert first.tensors.keys() == second.tensors.keys()
    assert "train_features_views" in first.tensors
    for key, value in first.tensors.items():
        other = second.tensors[key]
        if value.is_floating_point():
            assert torch.equal(value.view(torch.int16), other.view(torch.int16)), key
        else:
            assert torch.equal(value, other), key


# ------------------------------------------------------------------------------ --deterministic


@pytest.fixture()
def restore_torch_flags(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)  # restored afterwards
    before = (
        torch.are_deterministic_algorithms_enabled(),
        torch.backends.cudnn.benchmark,
        torch.backends.cudnn.deterministic,
    )
    yield
    torch.use_deterministic_algorithms(before[0])
    torch.backends.cudnn.benchmark = before[1]
    torch.backends.cudnn.deterministic = before[2]


def test_deterministic_flag_switches_torch_and_keeps_results(
    tmp_path: Path, restore_torch_flags, capsys
) -> None:
    import os

    fx = make_fixture(num_classes=3, dim=16, shots=2)
    bundle = fx.bundle.save(tmp_path / "b.safetensors")

    def fit(out: str, *flags: str) -> dict[str, Any]:
        summary = tmp_path / f"{out}.json"
        argv = [*flags, "fit", "--bundle", str(bundle), "--method", "clip_adapter:epochs=5"]
        argv += ["--shots", "2", "--out", str(tmp_path / out), "--json", str(summary)]
        assert main(argv) == 0
        return json.loads(summary.read_text())

    plain = fit("plain")
    assert not torch.are_deterministic_algorithms_enabled()
    strict = fit("strict", "--deterministic")
    assert torch.are_deterministic_algorithms_enabled()
    assert torch.backends.cudnn.benchmark is False and torch.backends.cudnn.deterministic
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    for key in ("accuracy", "hyperparameters", "n_train", "trainable_params"):
        assert plain[key] == strict[key], key  # on the CPU the flag changes nothing
    assert "--deterministic" in build_parser().format_help()


def test_deterministic_flag_keeps_a_user_cublas_setting(
    restore_torch_flags, monkeypatch, capsys
) -> None:
    import os

    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":16:8")
    assert main(["--deterministic", "list-methods"]) == 0
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":16:8"
    assert torch.are_deterministic_algorithms_enabled()


def test_image_to_tensor_is_bitwise_torchvision() -> None:
    import numpy as np
    from PIL import Image
    from torchvision.transforms import functional as TF

    from clipadapt.features.transforms import _to_tensor

    mean, std = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
    rng = np.random.default_rng(0)
    for height, width in ((64, 64), (31, 47), (224, 224)):
        pixels = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
        image = Image.fromarray(pixels)
        expected = TF.normalize(TF.to_tensor(image), mean, std)
        assert torch.equal(_to_tensor(image, mean, std), expected)
