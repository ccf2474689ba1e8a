"""Tip-Adapter-F: reference equations, training, determinism, persistence, real ImageNet bundle."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from clipadapt import create_method, load, load_bundle
from clipadapt.methods.tip_adapter_f import TipAdapterF
from clipadapt.tasks.classification import SplitChoice, evaluate
from clipadapt.testing import make_fixture

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "clip_vitb32"
FAST = {"search_steps_beta": 20, "epochs": 5}


@pytest.fixture(autouse=True)
def one_thread():
    # tiny tensors: thread start-up costs more than it saves on a shared 2-core machine
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_logits_equal_the_equations() -> None:
    fx = make_fixture(shots=2)
    method = create_method("tip_adapter_f", **FAST).fit(fx.train, fx.text, fx.val)
    f = fx.test.features
    keys = method.cache_keys_.detach()
    alpha, beta = method.best_params_["alpha"], method.best_params_["beta"]
    one_hot = torch.nn.functional.one_hot(fx.train.labels, fx.num_classes).float()
    expected = (
        100 * f @ fx.text.class_features.T + alpha * torch.exp(-beta * (1 - f @ keys.T)) @ one_hot
    )
    torch.testing.assert_close(method.logits(f), expected, rtol=1e-5, atol=1e-4)
    assert tuple(keys.shape) == (len(fx.train), fx.dim)


def test_training_moves_keys_lowers_loss_and_beats_zero_shot() -> None:
    fx = make_fixture(shots=4)
    method = create_method("tip_adapter_f", epochs=20, select_on_val=False, search_steps_beta=20)
    method.fit(fx.train, fx.text, fx.val)
    assert method.train_loss_[-1] < method.train_loss_[0]
    assert not torch.equal(method.cache_keys_.detach(), fx.train.features)
    assert method.best_params_["epoch_rule"] == "last epoch"
    assert method.score(fx.test.features, fx.test.labels) >= fx.zero_shot_accuracy()
    assert method.num_trainable_params() == len(fx.train) * fx.dim


def test_same_seed_same_keys_and_views_sampled_per_epoch() -> None:
    fx = make_fixture(shots=2, views=3)
    a = create_method("tip_adapter_f", seed=3, **FAST).fit(fx.train, fx.text, fx.val)
    b = create_method("tip_adapter_f", seed=3, **FAST).fit(fx.train, fx.text, fx.val)
    c = create_method("tip_adapter_f", seed=4, **FAST).fit(fx.train, fx.text, fx.val)
    assert torch.equal(a.cache_keys_, b.cache_keys_)
    assert not torch.equal(a.cache_keys_, c.cache_keys_)  # the seed picks other views
    assert fx.train.views is not None


def test_save_load_identical_logits(tmp_path) -> None:
    fx = make_fixture(shots=2)
    method = create_method("tip_adapter_f", **FAST).fit(fx.train, fx.text, fx.val)
    method.save(tmp_path / "m")
    loaded = load(tmp_path / "m")
    assert isinstance(loaded, TipAdapterF)
    assert torch.equal(loaded.logits(fx.test.features), method.logits(fx.test.features))
    assert loaded.num_trainable_params() == method.num_trainable_params()


@pytest.mark.realdata
def test_imagenet_bundle_order_tip_f_tip_zero_shot() -> None:
    path = DATA / "imagenet.safetensors"
    if not path.exists():
        pytest.skip("real ImageNet bundle not available")
    bundle = load_bundle(path)
    choice = SplitChoice("train_1shot", "train_2shot", "train_4shot")
    grid = {"search_steps_beta": 20}  # 10x coarser β grid than the paper's, for test time
    zs = evaluate(create_method("zeroshot"), bundle, choice=choice).accuracy
    tip = evaluate(create_method("tip_adapter", **grid), bundle, choice=choice).accuracy
    tip_f = evaluate(create_method("tip_adapter_f", **grid), bundle, choice=choice).accuracy
    # measured (docs/methods/tip_adapter_f.md): zero-shot 58.9, Tip 60.0, Tip-F 61.4
    assert 58.0 <= zs <= 60.0
    assert 59.0 <= tip_f <= 64.0
    assert tip_f >= tip >= zs - 0.5


def test_presets_are_valid_method_options_with_a_source() -> None:
    import yaml

    import clipadapt.methods

    folder = Path(clipadapt.methods.__file__).parent / "presets"
    files = sorted(folder.glob("*.yaml"))
    assert {"tip_adapter.yaml", "tip_adapter_f.yaml", "taskres.yaml", "coop.yaml"} <= {
        f.name for f in files
    }
    for file in files:
        data = yaml.safe_load(file.read_text())
        assert data["source"].strip(), file
        for dataset, params in data["presets"].items():
            method = create_method(data["method"], **params)  # unknown keys or types raise
            if not params:
                # an empty preset names the defaults (e.g. node_adapter's `paper`)
                assert method.get_params() == create_method(data["method"]).get_params()
                continue
            key, value = next(iter(params.items()))
            got = method.get_params()[key]
            # sequences are stored as tuples (a YAML list is the same value)
            same = list(got) == list(value) if isinstance(value, list) else got == value
            assert same, (file.name, dataset, key, got, value)
