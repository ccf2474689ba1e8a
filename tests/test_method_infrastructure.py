"""The machinery every method shares: declared option constraints, the uniform record of chosen
hyperparameters, the training loop's options, the view sampler, evaluate's clone, presets, the
tokenizer registry and the import structure."""

from __future__ import annotations

import ast
import math
import re
from pathlib import Path

import pytest
import torch
from torch import nn

import clipadapt
from clipadapt.data.bundle import FeatureBundle
from clipadapt.data.sets import ValidationSet
from clipadapt.engine.train import (
    DASSL_SGD,
    OptimizerParams,
    TrainConfig,
    ViewSampler,
    sample_view_rows,
    train_loop,
)
from clipadapt.exceptions import ConfigError, NotFittedError
from clipadapt.methods.base import (
    check_is_fitted,
    get_method_class,
    method_presets,
    parse_method_spec,
)
from clipadapt.testing import make_fixture

SRC = Path(clipadapt.__file__).resolve().parent


# ---------------------------------------------------------------------------------- constraints
@pytest.mark.parametrize(
    ("spec", "option", "allowed"),
    [
        ("tip_adapter:search_steps_beta=-5", "search_steps_beta", "positive int"),
        ("tip_adapter:search_steps_alpha=0", "search_steps_alpha", "positive int"),
        ("clip_adapter:epochs=-1", "epochs", "int >= 0"),
        ("node_adapter:solver=foo", "solver", "choice of {"),
        ("hegraph_adapter:fusion=sum", "fusion", "choice of {prob, logit}"),
        ("linear_probe:coarse_grid=[]", "coarse_grid", "non-empty list"),
    ],
)
def test_bad_options_fail_when_the_method_is_created(spec: str, option: str, allowed: str) -> None:
    name, params = parse_method_spec(spec)
    with pytest.raises(ConfigError) as error:
        clipadapt.create_method(name, **params)
    message = str(error.value)
    assert f"{option}={params[option]!r}" in message and allowed in message, message


def test_unknown_solver_lists_the_valid_ones() -> None:
    name, params = parse_method_spec("node_adapter:solver=foo")
    with pytest.raises(ConfigError, match=r"solver='foo'.*adaptive_heun.*dopri5.*euler.*rk4"):
        clipadapt.create_method(name, **params)


@pytest.mark.parametrize(
    "name",
    [n for n in clipadapt.list_methods() if "logit_scale" in get_method_class(n)._param_names()],
)
@pytest.mark.parametrize("value", [".nan", ".inf", "-1", "0"])
def test_logit_scale_must_be_a_positive_finite_float(name: str, value: str) -> None:
    spec_name, params = parse_method_spec(f"{name}:logit_scale={value}")
    with pytest.raises(ConfigError, match=r"logit_scale=.*float in \(0, inf\)"):
        clipadapt.create_method(spec_name, **params)


def test_values_set_in_the_constructor_are_checked_by_fit() -> None:
    fx = make_fixture(shots=1)
    method = get_method_class("tip_adapter")(search_steps_alpha=0)  # the constructor only stores
    with pytest.raises(ConfigError, match="search_steps_alpha=0"):
        method.fit(fx.train, fx.text, fx.val)


def test_constraints_coerce_like_yaml_values() -> None:
    method = clipadapt.create_method("clip_adapter", lr="1e-3", ratio_grid=[0, 1], ratio=1)
    assert method.lr == 0.001 and method.ratio_grid == (0.0, 1.0) and method.ratio == 1.0
    assert isinstance(method.ratio, float)
    node = clipadapt.create_method("node_adapter", solver_options=None, adjoint_options={"a": 1})
    assert node.solver_options is None and node.adjoint_options == {"a": 1}


@pytest.mark.parametrize("name", clipadapt.list_methods())
def test_every_option_describes_its_constraint(name: str) -> None:
    cls = get_method_class(name)
    assert set(cls.card.constraints) == set(cls._param_names())
    for option in cls._param_names():
        text = cls.card.describe_option(option)
        assert text and "\n" not in text
        default = cls._defaults()[option]
        cls.card.constraints[option].check(option, default, name)  # defaults are allowed


def test_describe_option_examples() -> None:
    card = clipadapt.method_card("tip_adapter")
    assert card.describe_option("search_steps_beta") == "positive int"
    assert card.describe_option("logit_scale") == "float in (0, inf)"
    assert card.describe_option("alpha") == "float in [0, inf)"
    coop = clipadapt.method_card("coop")
    assert coop.describe_option("epochs") == "int >= 0, or None (CoOp's rule from the shots)"
    node = clipadapt.method_card("node_adapter")
    assert node.describe_option("blend_init_grid") == "non-empty list of float in (0, 1)"
    assert "rk4" in node.describe_option("solver")


def test_registering_a_card_with_incomplete_constraints_fails() -> None:
    from clipadapt.methods.base import Adapter, MethodCard, register_method
    from clipadapt.methods.constraints import positive

    class Partial(Adapter):
        """Declares one of its two options."""

        card = MethodCard(name="partial_x", summary="x", constraints={"a": positive()})

        def __init__(self, a: float = 1.0, b: float = 2.0) -> None:
            self._init_params(locals())

    with pytest.raises(TypeError, match=r"missing \['b'\]"):
        register_method(Partial)


def test_mapping_values_survive_the_method_spec() -> None:
    name, params = parse_method_spec("node_adapter:solver_options={step_size: 0.5, perturb: true}")
    assert params == {"solver_options": {"step_size": 0.5, "perturb": True}}


# ---------------------------------------------------------------------------------- best_params_
_SOURCES = re.compile(r"^(validation search on \S+ \(\d+ rows\)|default: .+|fixed: .+)$")
_FAST = {
    "tip_adapter": {"search_steps_beta": 10},
    "tip_adapter_f": {"search_steps_beta": 10, "epochs": 2},
    "clip_adapter": {"epochs": 2},
    "node_adapter": {"epochs": 1, "steps": 2, "hidden": 8, "heads": 2, "head_dim": 4},
    "linear_probe": {"refine_steps": 1},
    "zeroshot": {"text": "auto"},  # zeroshot searches (the text source) only with text=auto
}


def _in(value: object, grid: list) -> bool:
    if isinstance(value, str):
        return value in grid
    return any(math.isclose(value, v) for v in grid)


@pytest.mark.parametrize(
    "name", [n for n in clipadapt.list_methods() if clipadapt.method_card(n).searched]
)
def test_chosen_hyperparameters_are_recorded_one_way(name: str) -> None:
    fx = make_fixture(shots=2)
    fast = _FAST.get(name, {})
    searched = clipadapt.create_method(name, **fast).fit(fx.train, fx.text, fx.val)
    assert searched.best_params_["source"] == f"validation search on {fx.val.name} (20 rows)"
    assert isinstance(searched.best_params_["val_accuracy"], float)
    for key, grid in searched.search_space().items():
        assert _in(searched.best_params_[key], list(grid)), key
    no_val = clipadapt.create_method(name, **fast).fit(fx.train, fx.text, None)
    assert no_val.best_params_["source"] == "default: no validation rows"
    assert "val_accuracy" not in no_val.best_params_
    if name == "zeroshot":  # no search switch: naming the text fixes it
        fixed = clipadapt.create_method(name, text="descriptions").fit(fx.train, fx.text, fx.val)
        assert fixed.best_params_ == {
            "text": "descriptions",
            "source": "fixed: text=descriptions was given",
        }
        return
    search_off = ("search_fusion", "search_metapaths") if name == "hegraph_adapter" else ("search",)
    off = clipadapt.create_method(name, **fast, **dict.fromkeys(search_off, False))
    assert off.fit(fx.train, fx.text, fx.val).best_params_["source"] == "default: search disabled"


@pytest.mark.parametrize("name", clipadapt.list_methods())
def test_every_source_reads_the_same_way(name: str) -> None:
    if "text_encoder" in clipadapt.method_card(name).needs:
        pytest.skip("needs a text tower (tests/methods/test_coop.py)")
    fx = make_fixture(shots=1)
    method = clipadapt.create_method(name, **_FAST.get(name, {})).fit(fx.train, fx.text, fx.val)
    source = method.best_params_.get("source")
    if source is not None or clipadapt.method_card(name).searched:
        assert _SOURCES.match(source), source


# ---------------------------------------------------------------------------------- training
def _regression_problem(drift: float):
    """A 1-parameter problem whose training loss pulls w to ``drift``; val scores -|w|."""
    w = nn.Parameter(torch.zeros(1))

    def batch_loss(index: torch.Tensor, epoch: int) -> torch.Tensor:
        return (w - drift).square().sum()

    return w, batch_loss, lambda: -float(w.detach().abs())


def test_keep_start_restores_the_untrained_parameters_when_no_epoch_beats_them() -> None:
    w, loss, val = _regression_problem(drift=1.0)  # every step makes validation worse
    config = TrainConfig(epochs=3, batch_size=4, lr=0.1, select_on_val=True, keep_start=True)
    history = train_loop([w], loss, 4, config, val_score=val)
    assert history.best_epoch == -1 and history.start_score == 0.0
    assert float(w.detach()) == 0.0
    w, loss, val = _regression_problem(drift=1.0)  # without keep_start: the best epoch
    history = train_loop(
        [w], loss, 4, TrainConfig(epochs=3, batch_size=4, lr=0.1, select_on_val=True), val_score=val
    )
    assert history.best_epoch == 0 and float(w.detach()) != 0.0


def test_keep_start_keeps_a_better_epoch() -> None:
    w = nn.Parameter(torch.full((1,), 2.0))
    config = TrainConfig(epochs=3, batch_size=4, lr=0.1, select_on_val=True, keep_start=True)
    history = train_loop(
        [w], lambda i, e: w.square().sum(), 4, config, val_score=lambda: -float(w.detach().abs())
    )
    assert history.best_epoch == 2 and float(w.detach()) < 2.0


def test_keep_start_margin_asks_an_epoch_to_beat_the_start_by_more_than_it() -> None:
    def run(margin: float) -> tuple[int | None, float, list[float]]:
        w = nn.Parameter(torch.full((1,), 2.0))
        config = TrainConfig(
            epochs=3,
            batch_size=4,
            lr=0.1,
            select_on_val=True,
            keep_start=True,
            start_margin=margin,
        )
        history = train_loop(
            [w],
            lambda i, e: w.square().sum(),
            4,
            config,
            val_score=lambda: -float(w.detach().abs()),
        )
        return history.best_epoch, float(w.detach()), history.val_score

    best, w, scores = run(0.0)  # every epoch is better than the start (-2): the best one wins
    assert best == 2 and w < 2.0
    gain = max(scores) + 2.0  # about 0.3 after three steps of lr 0.1
    best, w, _ = run(gain + 0.05)  # no epoch clears the margin: the start is restored
    assert best == -1 and w == 2.0
    best, w, _ = run(gain - 0.05)
    assert best == 2 and w < 2.0


def test_view_sampler_modes() -> None:
    g = torch.Generator().manual_seed(0)
    features, views = torch.randn(6, 3, generator=g), torch.randn(4, 6, 3, generator=g)
    random = ViewSampler(features, views, seed=3)
    for epoch in range(3):
        assert torch.equal(random(epoch), sample_view_rows(features, views, epoch, 3))
    cycle = ViewSampler(features, views, seed=3, mode="cycle")
    assert torch.equal(cycle(5), views[1])
    assert ViewSampler(features, None, seed=3)(7) is features
    calls = []
    cached = ViewSampler(features, views, seed=3, prepare=lambda rows: calls.append(1) or rows)
    cached(0), cached(0), cached(1), cached(1)
    assert len(calls) == 2  # once per epoch
    with pytest.raises(ValueError, match="cycle"):
        ViewSampler(features, views, seed=3, mode="every")


def test_train_config_from_hyperparameters() -> None:
    class Method(OptimizerParams):
        train_recipe = DASSL_SGD

        def __init__(self) -> None:
            self.epochs, self.lr, self.batch_size, self.seed, self.momentum = None, 0.5, 8, 3, 0.8
            self.lr_grid = (1.0,)  # not an optimiser setting: ignored

    config = Method()._train_config(epochs=7)
    assert (config.optimizer, config.warmup_epochs, config.per_epoch_schedule) == ("sgd", 1, True)
    assert (config.epochs, config.lr, config.batch_size, config.seed) == (7, 0.5, 8, 3)
    assert config.momentum == 0.8 and config.weight_decay == TrainConfig().weight_decay

    class Broken(OptimizerParams):
        train_recipe = {"optimiser": "sgd"}

    with pytest.raises(TypeError, match="optimiser"):
        Broken()._train_config()


# ---------------------------------------------------------------------------------- evaluate
def test_evaluate_fits_a_clone_and_leaves_the_callers_method_alone() -> None:
    fx = make_fixture()
    method = clipadapt.create_method("tip_adapter", search_steps_beta=10)
    before = method.get_params()
    result = clipadapt.evaluate(method, fx.bundle, shots=fx.shots, seed=7)
    assert method.get_params() == before
    with pytest.raises(NotFittedError):
        check_is_fitted(method)
    assert result.fitted is not method and result.fitted.fitted_
    assert result.hyperparameters == result.fitted.best_params_
    assert "fitted" not in result.to_dict()
    seeded = clipadapt.evaluate(
        clipadapt.create_method("taskres", epochs=2), fx.bundle, shots=4, seed=7
    )
    assert seeded.fitted.seed == 7 and seeded.params["seed"] == 7


def test_evaluate_dg_scores_the_fitted_clone() -> None:
    from clipadapt.tasks.domain_generalization import evaluate_dg

    fx = make_fixture()
    method = clipadapt.create_method("zeroshot")
    target = FeatureBundle(dict(fx.bundle.tensors), {**fx.bundle.metadata, "dataset": "target"})
    records = evaluate_dg(method, fx.bundle, [target], shots=fx.shots)
    assert [r["role"] for r in records] == ["source", "target"]
    assert records[1]["accuracy"] == pytest.approx(records[0]["accuracy"])


def test_hegraph_schedules_are_presets_named_per_dataset() -> None:
    assert "dataset" not in get_method_class("hegraph_adapter")._param_names()
    presets = method_presets("hegraph_adapter")
    schedules = {name: presets[name] for name in ("eurosat", "dtd", "fgvc_aircraft")}
    assert schedules == {
        "eurosat": {"epochs": 100},
        "dtd": {"epochs": 100},
        "fgvc_aircraft": {"epochs": 100, "lr": 0.01},
    }
    name, params = parse_method_spec("hegraph_adapter:preset=fgvc_aircraft")
    method = clipadapt.create_method(name, **params)
    assert (method.epochs, method.lr) == (100, 0.01)
    default = clipadapt.create_method("hegraph_adapter")
    assert (default.epochs, default.lr) == (30, 1e-3)
    import yaml

    data = yaml.safe_load((SRC / "methods" / "presets" / "hegraph_adapter.yaml").read_text())
    assert data["source"].strip()


# ---------------------------------------------------------------------------------- structure
def _imports(path: Path) -> list[str]:
    names = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.append(node.module)
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "import_module":
            names += [a.value for a in node.args if isinstance(a, ast.Constant)]
    return names


def test_methods_base_does_not_import_the_package_root() -> None:
    assert "clipadapt" not in _imports(SRC / "methods" / "base.py")
    assert clipadapt.__version__ == __import__("clipadapt._version").__version__


def test_encoders_do_not_import_world() -> None:
    for path in (SRC / "encoders").glob("*.py"):
        assert not [n for n in _imports(path) if n.startswith("clipadapt.world")], path


def test_the_world_tokenizer_is_found_through_the_registry() -> None:
    from clipadapt.encoders.tokenizers import build_tokenizer, tokenizer_types

    assert "word" in tokenizer_types()
    tok = build_tokenizer({"type": "word", "vocab": ["red", "circle"], "context_length": 6})
    assert tok("red circle").shape == (1, 6)
    with pytest.raises(ConfigError, match="unknown tokenizer type 'bpe9'.*word"):
        build_tokenizer({"type": "bpe9"})


def test_the_fixture_validation_set_is_a_validation_set() -> None:
    assert isinstance(make_fixture().val, ValidationSet)


def _resave_with_params(directory: Path, update: dict, drop: tuple[str, ...] = ()) -> None:
    import json

    config = json.loads((directory / "config.json").read_text())
    for key in drop:
        config["params"].pop(key)
    config["params"].update(update)
    (directory / "config.json").write_text(json.dumps(config))


def test_adapters_saved_with_the_removed_options_still_load(tmp_path: Path) -> None:
    fx = make_fixture(shots=1)
    node = clipadapt.create_method("node_adapter", epochs=0, steps=2, hidden=4, heads=1, head_dim=2)
    node.fit(fx.train, fx.text, fx.val).save(tmp_path / "node")
    _resave_with_params(tmp_path / "node", {"max_steps": 50}, drop=("solver_options",))
    loaded = clipadapt.load(tmp_path / "node")
    assert loaded.solver_options == {"max_num_steps": 50}
    assert torch.equal(loaded.logits(fx.test.features), node.logits(fx.test.features))
    hegraph = clipadapt.create_method("hegraph_adapter", epochs=1)
    hegraph.fit(fx.train, fx.text, fx.val).save(tmp_path / "hegraph")
    for dataset, schedule in (("fgvc_aircraft", (100, 0.01)), ("", (30, 1e-3))):
        _resave_with_params(tmp_path / "hegraph", {"dataset": dataset, "epochs": None, "lr": None})
        loaded = clipadapt.load(tmp_path / "hegraph")
        assert (loaded.epochs, loaded.lr) == schedule
