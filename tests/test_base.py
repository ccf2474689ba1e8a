"""The adapter base class and the registry: parameters, image-only fitting, seeding, cards."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from torch import Tensor

import clipadapt
from clipadapt.data.bundle import load_bundle
from clipadapt.data.sets import TextFeatures, TrainSet, ValidationSet, normalize_rows
from clipadapt.exceptions import (
    BundleError,
    ConfigError,
    MissingTensorError,
    NotFittedError,
    UnknownMethodError,
)
from clipadapt.methods import base
from clipadapt.methods.base import Adapter, MethodCard, parse_method_spec, register_method
from clipadapt.testing import make_fixture

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


class Prototypes(Adapter):
    """Nearest class mean (image-only, training-free); not registered."""

    card = MethodCard(name="test_prototypes", summary="class means", needs=("train",))

    def __init__(self, temperature: float = 1.0, note: str | None = "x") -> None:
        self.temperature = temperature
        self.note = note

    def _fit(self, train: TrainSet, text: TextFeatures | None, val: ValidationSet | None) -> None:
        sums = torch.zeros(self.n_classes_, self.dim_, device=train.device)
        sums.index_add_(0, train.labels, train.features)
        self.prototypes_ = normalize_rows(sums)

    def _logits(self, features: Tensor) -> Tensor:
        return features @ self.prototypes_.T / self.temperature


class NoisyText(Adapter):
    """Needs text and validation rows; draws from the global RNG in fit (not registered)."""

    card = MethodCard(name="test_noisy", summary="noisy text", needs=("train", "text", "val"))

    def __init__(self, seed: int = 1) -> None:
        self.seed = seed

    def _fit(self, train: TrainSet, text: TextFeatures | None, val: ValidationSet | None) -> None:
        self.weights_ = text.class_features + 0.01 * torch.randn(text.class_features.shape)

    def _logits(self, features: Tensor) -> Tensor:
        return features @ self.weights_.T


# ------------------------------------------------------------------ image-only fitting


def test_image_only_fit_without_text_infers_num_classes() -> None:
    fx = make_fixture()
    method = Prototypes().fit(fx.train, None, fx.val)
    assert method.n_classes_ == 5 and method.dim_ == 32
    assert method.logits(fx.test.features).shape == (len(fx.test), 5)
    assert method.score(fx.test.features, fx.test.labels) == 100.0


def test_image_only_fit_with_explicit_num_classes() -> None:
    fx = make_fixture()
    method = Prototypes().fit(fx.train, num_classes=8)
    assert method.logits(fx.test.features).shape == (len(fx.test), 8)
    with pytest.raises(BundleError, match="train_4shot_labels: label 4"):
        Prototypes().fit(fx.train, num_classes=3)
    with pytest.raises(ValueError, match="num_classes"):
        Prototypes().fit(fx.train, num_classes=0)


def test_image_only_fit_with_text_uses_text_classes() -> None:
    fx = make_fixture()
    assert Prototypes().fit(fx.train, fx.text, fx.val).n_classes_ == 5
    with pytest.raises(BundleError, match="num_classes=6"):
        Prototypes().fit(fx.train, fx.text, num_classes=6)


def test_text_method_without_text_names_the_tensor() -> None:
    fx = make_fixture()
    with pytest.raises(MissingTensorError, match="`text_features`"):
        NoisyText().fit(fx.train, None, fx.val)
    with pytest.raises(MissingTensorError, match="`val_features`"):
        NoisyText().fit(fx.train, fx.text, None)


def test_optional_text_tensor_need_is_enforced() -> None:
    fx = make_fixture()

    class NeedsNegatives(Prototypes):
        card = MethodCard(name="test_neg", summary="s", needs=("train", "negative_features"))

    bare = TextFeatures(fx.text.class_features)
    with pytest.raises(MissingTensorError, match="negative_text_features"):
        NeedsNegatives().fit(fx.train, bare)
    NeedsNegatives().fit(fx.train, fx.text)


def test_fit_refuses_evaluation_rows_and_wrong_types() -> None:
    fx = make_fixture()
    with pytest.raises(TypeError, match="evaluation data"):
        Prototypes().fit(fx.train, None, fx.test)
    with pytest.raises(TypeError, match="text must be TextFeatures"):
        Prototypes().fit(fx.train, fx.text.class_features)


# ------------------------------------------------------------------ seeding


def test_fit_forks_and_seeds_the_global_rng() -> None:
    fx = make_fixture()
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a = NoisyText(seed=4).fit(fx.train, fx.text, fx.val).weights_
    assert torch.equal(torch.get_rng_state(), before), "fit must leave the global RNG as it was"
    torch.manual_seed(999)  # a different caller state must not change the result
    b = NoisyText(seed=4).fit(fx.train, fx.text, fx.val).weights_
    c = NoisyText(seed=5).fit(fx.train, fx.text, fx.val).weights_
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


# ------------------------------------------------------------------ parameters


def test_params_set_params_clone_repr() -> None:
    method = Prototypes(temperature=0.5)
    assert method.get_params() == {"temperature": 0.5, "note": "x"}
    assert repr(method) == "Prototypes(temperature=0.5)"
    with pytest.raises(ConfigError, match="valid options: note, temperature"):
        method.set_params(temp=1.0)
    with pytest.raises(ConfigError, match="wrong type"):
        method.set_params(temperature="hot")
    assert method.set_params(temperature=2) is method and method.temperature == 2.0
    fitted = method.fit(make_fixture().train)
    twin = fitted.clone()
    assert twin.get_params() == fitted.get_params()
    with pytest.raises(NotFittedError, match="test_prototypes"):
        twin.logits(torch.randn(2, 32))


def test_save_load_keeps_none_params(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(base._REGISTRY, "test_prototypes", Prototypes)
    fx = make_fixture()
    method = Prototypes(note=None).fit(fx.train)
    method.save(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "state.safetensors"]
    loaded = clipadapt.load(tmp_path)
    assert loaded.note is None, "a saved None must not come back as the default"
    assert torch.equal(loaded.logits(fx.test.features), method.logits(fx.test.features))
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["method"] == "test_prototypes" and config["params"]["note"] is None


# ------------------------------------------------------------------ registry


def test_registry_lookup_and_errors() -> None:
    names = clipadapt.list_methods()
    assert names == sorted(names) and "zeroshot" in names
    assert set(clipadapt.list_methods("tip*")) <= {n for n in names if n.startswith("tip")}
    assert all(clipadapt.method_card(n).trainable for n in clipadapt.list_methods(trainable=True))
    assert type(clipadapt.create_method("Tip-Adapter", alpha=None)).__name__ == "TipAdapter"
    with pytest.raises(UnknownMethodError, match="registered methods: .*zeroshot"):
        clipadapt.create_method("no_such_method")


def test_register_method_rejects_bad_classes(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(TypeError, match="card"):

        @register_method
        class NoCard(Adapter):
            pass

    monkeypatch.setattr(base, "_REGISTRY", dict(base._REGISTRY))

    class Other(Prototypes):
        card = MethodCard(name="zeroshot", summary="clash")

    with pytest.raises(ValueError, match="already registered"):
        register_method(Other)


def test_parse_method_spec() -> None:
    assert parse_method_spec("node_adapter:solver=rk4,steps=8") == (
        "node_adapter",
        {"solver": "rk4", "steps": 8},
    )
    assert parse_method_spec("x:grid=[1, 2],a=0.5") == ("x", {"grid": [1, 2], "a": 0.5})
    assert parse_method_spec("zeroshot") == ("zeroshot", {})
    with pytest.raises(ConfigError, match="key=value"):
        parse_method_spec("x:alpha")
    with pytest.raises(ConfigError, match="no method name"):
        parse_method_spec(":a=1")


# ------------------------------------------------------------------ cards


def test_card_validation() -> None:
    MethodCard(name="ok_name", summary="s", param_formula="2 * D * (D // reduction) + C").validate()
    bad = [
        MethodCard(name="Bad-Name", summary="s"),
        MethodCard(name="x", summary="s", needs=("train", "images")),
        MethodCard(name="x", summary="s", expected_failed_checks={"check_k1": ""}),
        MethodCard(name="x", summary="s", expected_failed_checks={"k1": "reason"}),
        MethodCard(name="x", summary="s", max_tiny_seconds=0),
        MethodCard(name="x", summary="s", param_formula="__import__('os').getpid()"),
        MethodCard(name="x", summary="s", param_formula="C *"),
    ]
    for card in bad:
        with pytest.raises(ConfigError):
            card.validate()


def test_card_param_formula() -> None:
    card = MethodCard(name="x", summary="s", trainable=True, param_formula="2 * D * (D // r) + C")
    assert card.trainable_params(5, 32, 4, {"r": 4, "flag": True}) == 2 * 32 * 8 + 5
    with pytest.raises(ConfigError, match="unknown name 'r'"):
        card.trainable_params(5, 32, 4)
    assert MethodCard(name="x", summary="s").trainable_params(5, 32, 4) == 0
    with pytest.raises(ConfigError, match="param_formula"):
        MethodCard(name="x", summary="s", trainable=True).trainable_params(5, 32, 4)
    assert MethodCard(name="z", summary="s", needs=("train",)).needs_text is False
    assert MethodCard(name="z", summary="s", needs=("train", "description_features")).needs_text


def test_every_registered_card_validates() -> None:
    for name in clipadapt.list_methods():
        clipadapt.method_card(name).validate()


# ------------------------------------------------------------------ real data


@pytest.mark.realdata
def test_image_only_on_a_real_bundle_without_text() -> None:
    """DTD has no text features; the class-mean classifier reproduces the data README's 34.2 %."""
    path = DATA / "clip_vitb32" / "dtd.safetensors"
    if not path.is_file():
        pytest.skip("shared/data is not available")
    bundle = load_bundle(path)
    assert not bundle.has_text()
    train = bundle.group("train_1shot", "train")
    test = bundle.group("test", "eval")
    method = Prototypes().fit(train, None, num_classes=bundle.num_classes)
    assert method.n_classes_ == 47
    assert round(method.score(test.features, test.labels), 1) == 34.2
    with pytest.raises(MissingTensorError, match="text_features"):
        bundle.text()


def test_python_rng_untouched_by_fit() -> None:
    state = random.getstate()
    Prototypes().fit(make_fixture().train)
    assert random.getstate() == state
