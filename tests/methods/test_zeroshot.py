"""Zero-shot CLIP's text sources: names (the default), descriptions, both, or chosen on val."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from clipadapt import create_method, load
from clipadapt.data.sets import TextFeatures, normalize_rows
from clipadapt.exceptions import MissingTensorError
from clipadapt.testing import make_fixture


def _with_descriptions(fx, good: bool) -> TextFeatures:
    """The fixture's class names, with descriptions that point at the image clusters (good) or
    are random vectors (bad)."""
    if good:
        sums = torch.zeros(fx.num_classes, fx.dim).index_add_(0, fx.train.labels, fx.train.features)
        centre = normalize_rows(sums)
        descriptions = normalize_rows(
            centre[:, None] + 0.05 * torch.randn(fx.num_classes, 3, fx.dim)
        )
    else:
        descriptions = normalize_rows(torch.randn(fx.num_classes, 3, fx.dim))
    return TextFeatures(
        fx.text.class_features, fx.text.classnames, description_features=descriptions
    )


def test_names_is_the_default_and_equals_clip_zero_shot() -> None:
    fx = make_fixture()
    method = create_method("zeroshot").fit(fx.train, fx.text, fx.val)
    x = fx.test.features
    torch.testing.assert_close(method.logits(x), 100.0 * x @ fx.text.class_features.T)
    assert method.best_params_ == {"text": "names", "source": "fixed: text=names was given"}


def test_auto_picks_the_text_that_wins_on_validation() -> None:
    torch.manual_seed(0)
    fx = make_fixture()
    text = _with_descriptions(fx, good=True)
    auto = create_method("zeroshot", text="auto").fit(fx.train, text, fx.val)
    names = create_method("zeroshot").fit(fx.train, text, fx.val)
    assert auto.best_params_["text"] in ("descriptions", "names+descriptions")
    assert auto.best_params_["source"] == f"validation search on {fx.val.name} (20 rows)"
    assert auto.best_params_["val_accuracy"] == 100.0
    score = auto.score(fx.test.features, fx.test.labels)
    assert score == 100.0 > names.score(fx.test.features, fx.test.labels)
    chosen = create_method("zeroshot", text=auto.best_params_["text"]).fit(fx.train, text)
    assert torch.equal(auto.logits(fx.test.features), chosen.logits(fx.test.features))
    # useless descriptions: the names win (and win ties, being tried first)
    bad = _with_descriptions(fx, good=False)
    assert create_method("zeroshot", text="auto").fit(fx.train, bad, fx.val).best_params_[
        "text"
    ] in ("names", "names+descriptions")


def test_auto_without_descriptions_or_validation_uses_the_names() -> None:
    fx = make_fixture()
    names_only = TextFeatures(fx.text.class_features, fx.text.classnames)
    fitted = create_method("zeroshot", text="auto").fit(fx.train, names_only, fx.val)
    assert fitted.best_params_["text"] == "names"
    no_val = create_method("zeroshot", text="auto").fit(fx.train, fx.text, None)
    assert no_val.best_params_ == {"text": "names", "source": "default: no validation rows"}
    with pytest.raises(MissingTensorError, match="description_features"):
        create_method("zeroshot", text="descriptions").fit(fx.train, names_only)


def test_descriptions_are_the_masked_mean_and_survive_save_load(tmp_path: Path) -> None:
    fx = make_fixture()  # its description_mask hides the last description of every other class
    method = create_method("zeroshot", text="descriptions").fit(fx.train, fx.text)
    mask = fx.text.description_mask
    mean = (fx.text.description_features * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
    torch.testing.assert_close(method.text_weights_, normalize_rows(mean))
    both = create_method("zeroshot", text="names+descriptions").fit(fx.train, fx.text)
    expected = normalize_rows(fx.text.class_features + normalize_rows(mean))
    torch.testing.assert_close(both.text_weights_, expected)
    auto = create_method("zeroshot", text="auto").fit(fx.train, fx.text, fx.val)
    auto.save(tmp_path / "zs")
    loaded = load(tmp_path / "zs")
    assert loaded.best_params_ == auto.best_params_ and loaded.text == "auto"
    assert torch.equal(loaded.logits(fx.test.features), auto.logits(fx.test.features))
