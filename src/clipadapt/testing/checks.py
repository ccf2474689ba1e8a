"""The shared check suite every registered method passes (``style.md`` §7).

Modelled on ``sklearn.utils.estimator_checks`` and timm's test over all registered models: one
parametrised test runs every check below on every name in :func:`clipadapt.list_methods`, so
registering a method enrols it. A method exempts itself from a check with a written reason in
its card's ``expected_failed_checks`` (``{check name: reason}``); exempted checks still run and
are reported as expected failures.

The checks fit on a tiny in-memory bundle (:func:`make_fixture`: C=5 classes, D=32, K in {1, 4},
separable Gaussian clusters around random unit text vectors shifted away from them, so zero-shot
is good but not perfect, with val/test splits, optional views and every optional text tensor).
Everything runs on the CPU; the GPU comparison of ``check_runs_on_cpu`` runs only when CUDA is
available.

Public API:
    - :func:`yield_checks` ``(method_name, params=None)``: (check name, zero-argument callable);
    - :func:`check_method` ``(method_name, params=None)``: run them all, raise on failures;
    - :func:`parametrize_with_checks` ``(names, params=None, expected_failed_checks=None)``:
      a ``pytest.mark.parametrize`` over (method, check) with exemptions as ``xfail`` marks;
    - :func:`make_fixture`: the fixture bundle, also useful in a method's own tests.

``params`` maps a method name to hyperparameter overrides used by every check (small epoch
counts or grids keep the suite fast); see ``tests/test_method_checks.py`` for the table.

Example:
    >>> from clipadapt.testing import check_method
    >>> check_method("zeroshot")  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import inspect
import json
import math
import random
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from clipadapt.data.bundle import FeatureBundle
from clipadapt.data.sets import (
    EvaluationSet,
    LabeledFeatures,
    TextFeatures,
    TrainSet,
    ValidationSet,
    check_feature_matrix,
)
from clipadapt.exceptions import ConfigError, NotFittedError
from clipadapt.methods.base import (
    CONFIG_FILE,
    Adapter,
    MethodCard,
    create_method,
    get_method_class,
    list_methods,
    load,
    method_card,
)
from clipadapt.methods.constraints import Constraint

__all__ = [
    "CHECKS",
    "CheckFixture",
    "check_method",
    "make_fixture",
    "parametrize_with_checks",
    "yield_checks",
]

Params = Mapping[str, Any]

# ---------------------------------------------------------------------------------- fixture

#: Geometry of the fixture (chosen so the clusters are separable but zero-shot is imperfect:
#: over 20 fixture seeds zero-shot test accuracy averages ~84 %, a nearest class mean from
#: one shot per class ~100 %).
TEXT_SHIFT = 2.0
NOISE = 0.12
MODALITY_GAP = 0.5


def _unit(x: Tensor) -> Tensor:
    return x / x.norm(dim=-1, keepdim=True)


@dataclass(frozen=True)
class CheckFixture:
    """A tiny feature bundle and its typed sets.

    Attributes:
        bundle: the :class:`FeatureBundle` (groups ``train_{K}shot``, ``val``, ``test``; all text
            tensors; views when asked for).
        shots: K, training rows per class.
        train: the K-shot rows (:class:`TrainSet`, with views when the bundle has them).
        val: validation rows (:class:`ValidationSet`).
        test: evaluation rows (:class:`EvaluationSet`), for scoring only.
        text: :class:`TextFeatures` with class, per-prompt, negative and description features.
    """

    bundle: FeatureBundle
    shots: int
    train: TrainSet
    val: ValidationSet
    test: EvaluationSet
    text: TextFeatures

    @property
    def num_classes(self) -> int:
        return self.text.num_classes

    @property
    def dim(self) -> int:
        return self.text.dim

    def zero_shot_accuracy(self, logit_scale: float = 100.0) -> float:
        """Test accuracy (%) of the text features as the classifier."""
        logits = logit_scale * self.test.features @ self.text.class_features.T
        return float((logits.argmax(-1) == self.test.labels).float().mean() * 100)


def make_fixture(
    num_classes: int = 5,
    dim: int = 32,
    shots: int = 4,
    *,
    views: int = 0,
    val_per_class: int = 4,
    test_per_class: int = 20,
    prompts: int = 3,
    descriptions: int = 4,
    seed: int = 4,
    text_encoder: object | None = None,
    noise_scale: float = NOISE,
) -> CheckFixture:
    """Build the separable fixture bundle (pure tensor maths, a few milliseconds).

    Text vectors ``t_c`` are random unit vectors. Image cluster centres are
    ``unit(t_c + 2.0 u_c + 0.5 g)`` (``u_c`` a random class shift, ``g`` a common modality gap),
    and rows are ``unit(centre + 0.12 ε)`` with ε standard normal, so a few shots locate each
    cluster exactly while the text vectors only roughly point at it.

    Args:
        num_classes: C. dim: D. shots: K training rows per class.
        views: V augmented views of every training row (0: none), stored as
            ``train_{K}shot_features_views``.
        val_per_class, test_per_class: rows per class in ``val`` and ``test``.
        prompts: P per-prompt text features (``text_features_all``).
        descriptions: Q description features per class; the last one is masked out for every
            other class, so ``description_mask`` is not all True.
        noise_scale: standard deviation of the per-row noise (raise it for a harder problem,
            e.g. for benchmarks whose accuracy must not saturate).
        seed: everything is drawn from one generator seeded with it. The default, 4, gives a
            zero-shot test accuracy of 83 % at C=5 (so a method must learn to beat it) while
            every cluster is separable.
        text_encoder: passed through to :class:`TextFeatures` (for prompt-learning methods).

    Returns:
        A :class:`CheckFixture`.
    """
    g = torch.Generator().manual_seed(seed)
    c, d = num_classes, dim

    def noise(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=g)

    text = _unit(noise(c, d))
    gap = _unit(noise(d))
    centres = _unit(text + TEXT_SHIFT * _unit(noise(c, d)) + MODALITY_GAP * gap)

    def rows(per_class: int) -> tuple[Tensor, Tensor]:
        labels = torch.arange(c).repeat_interleave(per_class)
        return _unit(centres[labels] + noise_scale * noise(len(labels), d)), labels

    group = f"train_{shots}shot"
    train_x, train_y = rows(shots)
    val_x, val_y = rows(val_per_class)
    test_x, test_y = rows(test_per_class)
    tensors = {
        f"{group}_features": train_x,
        f"{group}_labels": train_y,
        "val_features": val_x,
        "val_labels": val_y,
        "test_features": test_x,
        "test_labels": test_y,
        "text_features": text,
        "text_features_all": _unit(text[:, None] + 0.1 * noise(c, prompts, d)),
        "negative_text_features": _unit(gap + 0.5 * text + 0.3 * noise(c, d)),
        "description_features": _unit(text[:, None] + 0.3 * noise(c, descriptions, d)),
    }
    mask = torch.ones(c, descriptions, dtype=torch.bool)
    if descriptions > 1:
        mask[::2, -1] = False
    tensors["description_mask"] = mask
    if views:
        tensors[f"{group}_features_views"] = _unit(
            train_x[None] + 0.05 * noise(views, len(train_x), d)
        )
    metadata = {
        "classnames": json.dumps([f"class_{i}" for i in range(c)]),
        "backbone": "fixture",
        "source": "clipadapt.testing.make_fixture",
        "dataset": f"fixture_c{c}_d{d}_k{shots}",
    }
    bundle = FeatureBundle(tensors, metadata)
    return CheckFixture(
        bundle=bundle,
        shots=shots,
        train=bundle.group(group, "train"),
        val=bundle.group("val", "val"),
        test=bundle.group("test", "eval"),
        text=bundle.text(text_encoder),
    )


# ---------------------------------------------------------------------------------- helpers


# Fitted models shared by the checks that only read them (keyed by method, overrides,
# fixture and whether validation rows were given), so the suite fits each configuration once.
_FITTED: dict[tuple[str, str, str, bool], Adapter] = {}


@dataclass(frozen=True)
class _Subject:
    """The method under test: its registry name and the check-suite hyperparameter overrides."""

    name: str
    params: Params

    @property
    def card(self) -> MethodCard:
        return method_card(self.name)

    @property
    def image_only(self) -> bool:
        return not self.card.needs_text

    def make(self, **extra: Any) -> Adapter:
        return create_method(self.name, **{**self.params, **extra})

    def fixture(self, **kwargs: Any) -> CheckFixture:
        return make_fixture(**kwargs)

    def fit(
        self, fx: CheckFixture, method: Adapter | None = None, *, with_val: bool = True
    ) -> Adapter:
        """Fit as the method is meant to run: without text when it is image-only."""
        method = method if method is not None else self.make()
        text = None if self.image_only else fx.text
        val = fx.val if with_val else None
        return method.fit(fx.train, text, val)

    def fitted(self, *, with_val: bool = True, **fixture: Any) -> tuple[CheckFixture, Adapter]:
        """A shared fitted model on ``make_fixture(**fixture)``; callers must not modify it."""
        key = (
            self.name,
            repr(sorted(self.params.items())),
            repr(sorted(fixture.items())),
            with_val,
        )
        fx = self.fixture(**fixture)
        if key not in _FITTED:
            _FITTED[key] = self.fit(fx, with_val=with_val)
        return fx, _FITTED[key]


def _digest(tensor: Tensor | None) -> str:
    if tensor is None:
        return "none"
    data = tensor.detach().cpu().contiguous()
    head = f"{tuple(data.shape)}{data.dtype}".encode()
    return hashlib.sha256(head + data.view(torch.uint8).numpy().tobytes()).hexdigest()


def _fixture_digests(fx: CheckFixture) -> dict[str, str]:
    out = {name: _digest(t) for name, t in fx.bundle.tensors.items()}
    for part in (fx.train, fx.val, fx.test):
        for attr in ("features", "labels", "views"):
            out[f"{part.name}.{attr}"] = _digest(getattr(part, attr))
    for attr in (
        "class_features",
        "prompt_features",
        "negative_features",
        "description_features",
        "description_mask",
    ):
        out[f"text.{attr}"] = _digest(getattr(fx.text, attr))
    return out


def _assert_raises(
    kinds: type[BaseException] | tuple[type[BaseException], ...],
    call: Callable[[], Any],
    what: str,
    *,
    mentions: tuple[str, ...] = (),
) -> BaseException:
    try:
        call()
    except kinds as error:
        message = str(error)
        for word in mentions:
            assert word in message, f"{what}: the error does not name {word!r}: {message!r}"
        return error
    raise AssertionError(f"{what}: expected {kinds} to be raised, nothing was raised")


def _same_logits(a: Tensor, b: Tensor, what: str, *, exact: bool, atol: float = 1e-5) -> None:
    assert a.shape == b.shape, f"{what}: shapes differ {tuple(a.shape)} vs {tuple(b.shape)}"
    if exact:
        diff = (a - b).abs().max().item() if a.numel() else 0.0
        assert torch.equal(a, b), f"{what}: logits are not bitwise identical (max |diff| {diff:g})"
    else:
        scale = max(1.0, float(a.abs().max())) if a.numel() else 1.0
        assert torch.allclose(a, b, rtol=0, atol=atol * scale), (
            f"{what}: logits differ by {float((a - b).abs().max()):g} (tolerance {atol * scale:g})"
        )


def _accuracy(method: Adapter, part: LabeledFeatures) -> float:
    return float((method.predict(part.features) == part.labels).float().mean() * 100)


def _trainable_tensors(method: Adapter) -> list[Tensor]:
    """Every tensor reachable from the method's attributes that requires grad (deduplicated)."""
    found: dict[int, Tensor] = {}

    def visit(value: Any, depth: int) -> None:
        if isinstance(value, nn.Module):
            for p in value.parameters():
                if p.requires_grad:
                    found[id(p)] = p
        elif isinstance(value, Tensor):
            if value.requires_grad and value.is_leaf:
                found[id(value)] = value
        elif depth < 2 and isinstance(value, (list, tuple)):
            for item in value:
                visit(item, depth + 1)
        elif depth < 2 and isinstance(value, dict):
            for item in value.values():
                visit(item, depth + 1)

    for value in vars(method).values():
        visit(value, 0)
    return list(found.values())


def _global_state() -> dict[str, Any]:
    state: dict[str, Any] = {
        "torch_rng": torch.get_rng_state(),
        "numpy_rng": np.random.get_state(),
        "python_rng": random.getstate(),
        "default_dtype": torch.get_default_dtype(),
        "grad_enabled": torch.is_grad_enabled(),
        "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
        "num_threads": torch.get_num_threads(),
        "matmul_precision": torch.get_float32_matmul_precision(),
        "cudnn.enabled": torch.backends.cudnn.enabled,
        "cudnn.benchmark": torch.backends.cudnn.benchmark,
        "cudnn.deterministic": torch.backends.cudnn.deterministic,
        "cudnn.allow_tf32": torch.backends.cudnn.allow_tf32,
        "cuda.matmul.allow_tf32": torch.backends.cuda.matmul.allow_tf32,
    }
    if torch.cuda.is_available():
        state["cuda_rng"] = torch.cuda.get_rng_state_all()
    return state


def _states_equal(a: Any, b: Any) -> bool:
    if isinstance(a, Tensor):
        return isinstance(b, Tensor) and torch.equal(a, b)
    if isinstance(a, np.ndarray):
        return isinstance(b, np.ndarray) and np.array_equal(a, b)
    if isinstance(a, (list, tuple)):
        return (
            isinstance(b, (list, tuple))
            and len(a) == len(b)
            and all(_states_equal(x, y) for x, y in zip(a, b, strict=True))
        )
    return a == b


def _in_grid(value: Any, grid: list[Any]) -> bool:
    for candidate in grid:
        if isinstance(value, (int, float)) and isinstance(candidate, (int, float)):
            if math.isclose(float(value), float(candidate), rel_tol=1e-9, abs_tol=1e-12):
                return True
        elif value == candidate:
            return True
    return False


class _PoisonedTensor(Tensor):
    """A tensor that raises on any use while the class-level switch is on."""

    armed = False

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN206
        if _PoisonedTensor.armed:
            raise RuntimeError(f"evaluation tensor accessed during fit ({func})")
        return super().__torch_function__(func, types, args, kwargs or {})


@contextlib.contextmanager
def _poison_armed() -> Iterator[None]:
    _PoisonedTensor.armed = True
    try:
        yield
    finally:
        _PoisonedTensor.armed = False


@contextlib.contextmanager
def _cuda_hidden() -> Iterator[None]:
    """Make ``torch.cuda`` report no device, as with ``CUDA_VISIBLE_DEVICES=''``."""
    saved = torch.cuda.is_available, torch.cuda.device_count
    torch.cuda.is_available = lambda: False  # type: ignore[assignment]
    torch.cuda.device_count = lambda: 0  # type: ignore[assignment]
    try:
        yield
    finally:
        torch.cuda.is_available, torch.cuda.device_count = saved


# ---------------------------------------------------------------------------------- API contract


def check_registry_roundtrip(subject: _Subject) -> None:
    """``create_method(name)`` is the registered class, the name is listed, the card validates."""
    cls = get_method_class(subject.name)
    method = create_method(subject.name)
    assert type(method) is cls, f"create_method({subject.name!r}) built {type(method).__name__}"
    assert subject.name in list_methods(), f"{subject.name} is not in list_methods()"
    card = method_card(subject.name)
    assert card is cls.card
    assert card.name == subject.name, f"card name {card.name!r} != registry name {subject.name!r}"
    card.validate()
    typed = subject.name.upper().replace("_", "-")
    assert get_method_class(typed) is cls, f"{typed!r} does not resolve to {subject.name!r}"
    assert cls.__doc__ and cls.__doc__.strip(), f"{cls.__name__} has no docstring"


def check_init_only_stores_params(subject: _Subject) -> None:
    """The constructor stores its arguments unchanged and nothing else (sklearn's clone rule)."""
    cls = get_method_class(subject.name)
    names = cls._param_names()
    defaults = cls._defaults()
    missing = [n for n in names if n not in defaults]
    assert not missing, f"hyperparameters without a default: {missing}"
    method = cls()
    for key, value in vars(method).items():
        assert not (key.endswith("_") and not key.startswith("_")), (
            f"__init__ sets the fitted-looking attribute {key!r}"
        )
        assert not isinstance(value, (Tensor, nn.Module)), f"__init__ creates a tensor in {key!r}"
    for name in names:
        assert hasattr(method, name), f"hyperparameter {name!r} is not stored as an attribute"
    params = method.get_params()
    assert set(params) == set(names)
    rebuilt = cls(**params)
    for name, value in params.items():
        assert getattr(rebuilt, name) is value, (
            f"__init__ changes {name!r} (the constructor must store arguments as given)"
        )
    assert rebuilt.get_params() == params


def check_get_set_params(subject: _Subject) -> None:
    """``set_params`` rejects unknown keys (listing the valid ones) and values outside each
    option's declared constraint (naming the option), and returns self; repr."""
    method = subject.make()
    names = method._param_names()
    error = _assert_raises(
        ValueError,
        lambda: method.set_params(no_such_option_xyz=1),
        "set_params(unknown key)",
        mentions=("no_such_option_xyz", *names),
    )
    assert error is not None
    assert method.set_params(**method.get_params()) is method, "set_params must return self"
    constraints = subject.card.constraints
    undeclared = sorted(set(names) - set(constraints))
    assert not undeclared, (
        f"options without a declared type and range on the card (MethodCard.constraints): "
        f"{undeclared}"
    )
    for name in names:
        for bad in _outside(constraints[name]):
            _assert_raises(
                ConfigError,
                lambda name=name, bad=bad: subject.make().set_params(**{name: bad}),
                f"set_params({name}={bad!r})",
                mentions=(name, repr(bad)),
            )
    defaults = type(method)._defaults()
    fresh = type(method)()
    assert repr(fresh) == f"{type(method).__name__}()", f"repr of defaults: {fresh!r}"
    for name in names:
        default = defaults[name]
        if isinstance(default, bool):
            changed: Any = not default
        elif isinstance(default, int):
            changed = default + 1
        elif isinstance(default, float):
            changed = default * 2 + 1
        else:
            continue
        try:
            fresh.set_params(**{name: changed})
        except ConfigError:
            continue  # outside this option's range: try the next option
        assert f"{name}={changed!r}" in repr(fresh), f"repr does not show {name}: {fresh!r}"
        break


def _outside(constraint: Constraint) -> list[Any]:
    """Values a constraint must reject: a wrong type, and the nearest values out of range."""
    bad: list[Any] = [object()] if constraint.kind != "list" else ["not-a-list"]
    if constraint.none_means is None:
        bad.append(None)
    if constraint.kind == "float":
        bad.append(float("nan"))
    if constraint.kind in ("int", "float"):
        step = 1 if constraint.kind == "int" else 1e-3
        if constraint.low is not None:
            bad.append(constraint.low if constraint.open_low else constraint.low - step)
        if constraint.high is not None:
            bad.append(constraint.high if constraint.open_high else constraint.high + step)
    if constraint.allowed() is not None:
        bad.append("not-a-valid-choice")
    if constraint.kind == "list" and constraint.min_len > 0:
        bad.append([])
    return bad


def check_fit_returns_self(subject: _Subject) -> None:
    """``fit`` returns the instance itself (with and without validation data and text)."""
    fx = subject.fixture()
    method = subject.make()
    assert subject.fit(fx, method) is method, "fit must return self"
    if "val" not in subject.card.needs:
        assert subject.fit(fx, method, with_val=False) is method
    if subject.image_only:
        assert method.fit(fx.train, fx.text, fx.val) is method, "image-only fit with text"
        assert method.fit(fx.train, None, fx.val, num_classes=fx.num_classes) is method


def check_unfitted_raises(subject: _Subject) -> None:
    """``logits``/``predict``/``save`` before ``fit`` raise NotFittedError naming the method."""
    method = subject.make()
    x = subject.fixture().test.features
    for what, call in (
        ("logits", lambda: method.logits(x)),
        ("predict", lambda: method.predict(x)),
    ):
        _assert_raises(NotFittedError, call, f"{what} before fit", mentions=(subject.name,))
    with tempfile.TemporaryDirectory() as tmp:
        _assert_raises(NotFittedError, lambda: method.save(tmp), "save before fit")


def check_inputs_not_mutated(subject: _Subject) -> None:
    """Bundle tensors and hyperparameters are unchanged by ``fit`` and ``logits``."""
    fx = subject.fixture(views=2)
    method = subject.make()
    before, params = _fixture_digests(fx), method.get_params()
    query = fx.test.features.clone()
    query_digest = _digest(query)
    subject.fit(fx, method)
    method.logits(query)
    after = _fixture_digests(fx)
    changed = sorted(k for k in before if before[k] != after[k])
    assert not changed, f"fit/logits modified input tensors: {changed}"
    assert _digest(query) == query_digest, "logits modified its input"
    assert method.get_params() == params, "fit changed hyperparameters (keep learned state in *_)"


def check_missing_tensor_message(subject: _Subject) -> None:
    """Each needed input, when absent, fails with an error naming the bundle tensor; inputs the
    card does not declare are not needed."""
    card = subject.card
    fx = subject.fixture()
    bare = TextFeatures(fx.text.class_features, fx.text.classnames)
    kinds = (KeyError, ValueError)
    if card.needs_text:
        _assert_raises(
            kinds,
            lambda: subject.make().fit(fx.train, None, fx.val),
            "fit without text",
            mentions=("text_features",),
        )
    if "val" in card.needs:
        _assert_raises(
            kinds,
            lambda: subject.make().fit(fx.train, fx.text, None),
            "fit without validation rows",
            mentions=("val_features",),
        )
    optional = {
        "prompt_features": "text_features_all",
        "negative_features": "negative_text_features",
        "description_features": "description_features",
        "text_encoder": "text encoder",
    }
    for need, tensor in optional.items():
        if need not in card.needs:
            continue
        kept = {k: getattr(fx.text, k) for k in optional if k in card.needs and k != need}
        if "description_features" in kept:
            kept["description_mask"] = fx.text.description_mask
        partial = TextFeatures(fx.text.class_features, fx.text.classnames, **kept)
        _assert_raises(
            kinds,
            lambda partial=partial: subject.make().fit(fx.train, partial, fx.val),
            f"fit without {need}",
            mentions=(tensor,),
        )
    # the declared needs are complete: a method runs on exactly what its card lists
    encoder = fx.text.text_encoder if "text_encoder" in card.needs else None
    declared = {k: getattr(fx.text, k) for k in optional if k in card.needs and k != "text_encoder"}
    if "description_features" in declared:
        declared["description_mask"] = fx.text.description_mask
    minimal_text = TextFeatures(
        bare.class_features, bare.classnames, text_encoder=encoder, **declared
    )
    val = fx.val if "val" in card.needs else None
    method = subject.make().fit(fx.train, None if subject.image_only else minimal_text, val)
    assert torch.isfinite(method.logits(fx.test.features)).all()


# ---------------------------------------------------------------------------------- shapes


def check_logits_shape_dtype(subject: _Subject) -> None:
    """Logits are (N, C) float32, finite, on the input's device; N=1 and C=2 work."""
    fx, method = subject.fitted()
    out = method.logits(fx.test.features)
    n, c = len(fx.test), fx.num_classes
    assert out.shape == (n, c), f"logits shape {tuple(out.shape)}, expected {(n, c)}"
    assert out.dtype == torch.float32, f"logits dtype {out.dtype}"
    assert out.device == fx.test.features.device
    assert torch.isfinite(out).all(), "non-finite logits"
    assert method.n_classes_ == c and method.dim_ == fx.dim
    one = method.logits(fx.test.features[:1])
    assert one.shape == (1, c)
    assert method.predict(fx.test.features).shape == (n,)
    two = subject.fixture(num_classes=2)
    out2 = subject.fit(two).logits(two.test.features)
    assert out2.shape == (len(two.test), 2) and torch.isfinite(out2).all()


def check_batch_invariance(subject: _Subject) -> None:
    """Chunked logits equal whole-set logits; permuting rows permutes the outputs."""
    fx, method = subject.fitted()
    x = fx.test.features
    full = method.logits(x)
    chunks = torch.cat([method.logits(x[i : i + 7]) for i in range(0, len(x), 7)])
    _same_logits(full, chunks, "logits of 7-row chunks vs the whole set", exact=False)
    _same_logits(full, method.logits(x, batch_size=3), "logits(batch_size=3)", exact=False)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    _same_logits(full[perm], method.logits(x[perm]), "logits of permuted rows", exact=False)


def _check_records_choice(subject: _Subject, method: Adapter, what: str) -> None:
    best = method.best_params_
    assert isinstance(best, dict), f"{what}: best_params_ must be a dict"
    json.dumps(best)
    if subject.card.searched:
        source = best.get("source")
        assert isinstance(source, str) and source, (
            f"{what}: best_params_['source'] must say how the searched hyperparameters were "
            f"chosen (got {best!r})"
        )


def check_k1(subject: _Subject) -> None:
    """K=1 works with a 1-per-class validation set and (unless needed) without one."""
    fx = subject.fixture(shots=1, val_per_class=1)
    method = subject.fit(fx)
    assert torch.isfinite(method.logits(fx.test.features)).all()
    _check_records_choice(subject, method, "K=1 with 1-per-class val")
    if "val" not in subject.card.needs:
        method = subject.fit(fx, with_val=False)
        assert torch.isfinite(method.logits(fx.test.features)).all()
        _check_records_choice(subject, method, "K=1 without val")


def check_fp16_input(subject: _Subject) -> None:
    """fp16 inputs give float32 logits within 1e-2 of the fp32 path on the same values.

    Both runs see the same fp16-rounded numbers (one as fp16, one upcast to fp32), so the
    check measures whether the method computes in float32 after the boundary upcast; against
    the unrounded fp32 inputs only the predictions are compared (>= 95 % agreement), since fp16
    rounding alone moves scale-100 logits by a few 1e-2.
    """
    fx = subject.fixture()

    def sets(dtype: torch.dtype, rounded: bool) -> tuple[Any, ...]:
        def cast(t: Tensor | None) -> Tensor | None:
            if t is None:
                return None
            return t.half().to(dtype) if rounded else t

        train = TrainSet(cast(fx.train.features), fx.train.labels, cast(fx.train.views), "train")
        val = ValidationSet(cast(fx.val.features), fx.val.labels, None, "val")
        text = TextFeatures(
            cast(fx.text.class_features),
            fx.text.classnames,
            prompt_features=cast(fx.text.prompt_features),
            negative_features=cast(fx.text.negative_features),
            description_features=cast(fx.text.description_features),
            description_mask=fx.text.description_mask,
            text_encoder=fx.text.text_encoder,
        )
        return train, None if subject.image_only else text, val

    half = subject.make().fit(*sets(torch.float16, True))
    upcast = subject.make().fit(*sets(torch.float32, True))
    full = subject.fitted()[1]
    x = fx.test.features
    out_half = half.logits(x.half())
    assert out_half.dtype == torch.float32, f"fp16 input gave {out_half.dtype} logits"
    out_up = upcast.logits(x.half().float())
    assert torch.allclose(out_half, out_up, rtol=0, atol=1e-2), (
        f"fp16 vs fp32 on the same values differ by {float((out_half - out_up).abs().max()):g}"
    )
    agree = float((out_half.argmax(-1) == full.logits(x).argmax(-1)).float().mean())
    assert agree >= 0.95, f"fp16 and fp32 predictions agree on only {agree:.0%} of rows"


def check_input_validation(subject: _Subject) -> None:
    """Wrong D, NaN features, out-of-range labels and 1-D input raise ValueError naming them."""
    fx, method = subject.fitted()
    x = fx.test.features
    nan = x.clone()
    nan[3, 5] = float("nan")
    for what, bad in (("wrong D", x[:, :-1]), ("NaN", nan), ("1-D", x[0])):
        _assert_raises(
            ValueError,
            lambda bad=bad: method.logits(bad),
            f"logits({what})",
            mentions=("features",),
        )
    text = None if subject.image_only else fx.text
    extra = {"num_classes": fx.num_classes} if subject.image_only else {}
    c = fx.num_classes
    bad_train = TrainSet(fx.train.features, fx.train.labels.clone().fill_(c), None, "train")
    _assert_raises(
        ValueError,
        lambda: subject.make().fit(bad_train, text, fx.val, **extra),
        "fit(train labels out of range)",
        mentions=("train_labels",),
    )
    bad_val = ValidationSet(fx.val.features, fx.val.labels.clone().fill_(c + 3), None, "val")
    _assert_raises(
        ValueError,
        lambda: subject.make().fit(fx.train, text, bad_val, **extra),
        "fit(val labels out of range)",
        mentions=("val_labels",),
    )
    narrow = TrainSet(fx.train.features[:, :-1], fx.train.labels, None, "train")
    _assert_raises(
        ValueError,
        lambda: subject.make().fit(narrow, fx.text, fx.val),
        "fit(train width != text width)",
        mentions=("train_features",),
    )
    bad_rows = fx.train.features.clone()
    bad_rows[0, 0] = float("inf")
    _assert_raises(
        ValueError,
        lambda: TrainSet(bad_rows, fx.train.labels, None, "train"),
        "TrainSet(Inf features)",
        mentions=("train_features",),
    )


def check_learns_easy_problem(subject: _Subject) -> None:
    """Test accuracy >= zero-shot - 1 pt; trainable and image-only methods reach >= 90 %."""
    fx, method = subject.fitted()
    acc = _accuracy(method, fx.test)
    zero_shot = fx.zero_shot_accuracy()
    if not subject.image_only:
        assert acc >= zero_shot - 1.0, (
            f"test accuracy {acc:.1f} % is below zero-shot {zero_shot:.1f} % - 1 pt "
            "(collapse or a sign error?)"
        )
    if subject.card.trainable or subject.image_only:
        assert acc >= 90.0, f"test accuracy {acc:.1f} % < 90 % on the separable fixture"


#: ``check_more_shots_not_worse``'s problem: rows about twice as noisy as the default fixture's,
#: so 4 shots per class do not saturate it while it stays separable (a nearest class mean scores
#: 94.5-98.0 % from 4 shots and 98.0-99.5 % from 16 on the three draws; asserted in
#: ``tests/test_method_checks.py``); 40 test rows per class; a drop of at most 1 pt (2 of 200
#: test rows) is tolerated, for single-row flips near 100 %.
SHOTS_NOISE = 0.25
SHOTS_SEEDS = (4, 5, 6)
SHOTS_TOLERANCE = 1.0


def check_more_shots_not_worse(subject: _Subject) -> None:
    """On a separable problem, 16 shots per class score no lower than 4 shots per class.

    The 4-shot rows are the first 4 per class of the 16-shot rows, and both fits see the same
    validation rows (4 per class, as the protocol's ``min(K, 4)``) and are scored on the same
    test rows, so only the number of training rows differs.
    """
    drops = []
    for seed in SHOTS_SEEDS:
        fx = subject.fixture(shots=16, noise_scale=SHOTS_NOISE, test_per_class=40, seed=seed)
        first = torch.cat(
            [torch.nonzero(fx.train.labels == c).flatten()[:4] for c in range(fx.num_classes)]
        )
        four = CheckFixture(fx.bundle, 4, fx.train.subset(first), fx.val, fx.test, fx.text)
        acc4 = _accuracy(subject.fit(four), fx.test)
        acc16 = _accuracy(subject.fit(fx), fx.test)
        if acc16 < acc4 - SHOTS_TOLERANCE:
            drops.append(f"fixture seed {seed}: {acc4:.1f} % at 4 shots, {acc16:.1f} % at 16")
    assert not drops, (
        "more shots made the method worse on a separable problem (validation choice, schedule "
        "or overfitting?): " + "; ".join(drops)
    )


# ---------------------------------------------------------------------------------- reproducibility


def check_deterministic_with_seed(subject: _Subject) -> None:
    """Two CPU fits with the same seed give bitwise-identical logits (if the card says so)."""
    fx, first = subject.fitted(views=2)
    a = first.logits(fx.test.features)
    b = subject.fit(fx).logits(fx.test.features)
    _same_logits(a, b, "two fits with the same seed", exact=subject.card.deterministic, atol=1e-4)


def check_fit_idempotent(subject: _Subject) -> None:
    """Fitting twice equals fitting once; refitting with a different C leaves no state behind."""
    fx, reference = subject.fitted()
    exact = subject.card.deterministic
    once = reference.logits(fx.test.features)
    other = subject.fixture(num_classes=3, seed=5)
    method = subject.fit(other)
    out = method.logits(other.test.features)
    assert out.shape == (len(other.test), 3), f"refit with C=3 gave {tuple(out.shape)}"
    assert method.n_classes_ == 3
    subject.fit(fx, method)
    _same_logits(
        once, method.logits(fx.test.features), "fit on C=3 then C=5", exact=exact, atol=1e-4
    )
    subject.fit(fx, method)
    _same_logits(once, method.logits(fx.test.features), "fit twice vs once", exact=exact, atol=1e-4)


def check_no_global_side_effects(subject: _Subject) -> None:
    """RNG states, default dtype, grad mode and backend flags are unchanged by fit/logits."""
    fx = subject.fixture()
    before = _global_state()
    method = subject.fit(fx)
    method.logits(fx.test.features)
    after = _global_state()
    changed = sorted(k for k in before if not _states_equal(before[k], after[k]))
    assert not changed, f"fit/logits changed global state: {changed} (use self._generator())"


# ---------------------------------------------------------------------------------- persistence


def check_save_load_roundtrip(subject: _Subject) -> None:
    """save/load keeps logits, params and best_params_; only JSON + safetensors; version warning."""
    fx, method = subject.fitted()
    x = fx.test.features
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "saved"
        method.save(folder)
        names = sorted(p.name for p in folder.iterdir())
        odd = [n for n in names if n != CONFIG_FILE and not n.endswith(".safetensors")]
        assert not odd, f"save() wrote files other than config.json and *.safetensors: {odd}"
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            loaded = load(folder)
        assert type(loaded) is type(method)
        _same_logits(method.logits(x), loaded.logits(x), "logits after load", exact=True)
        assert loaded.get_params() == method.get_params(), "get_params changed by save/load"
        assert loaded.best_params_ == method.best_params_, (
            f"best_params_ changed by save/load: {method.best_params_} -> {loaded.best_params_}"
        )
        assert loaded.num_trainable_params() == method.num_trainable_params()
        config_path = folder / CONFIG_FILE
        config = json.loads(config_path.read_text(encoding="utf-8"))
        config["clipadapt_version"] = "0.0.0+other"
        config_path.write_text(json.dumps(config), encoding="utf-8")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            load(folder)
        assert any("0.0.0+other" in str(w.message) for w in caught), (
            "loading a config saved by another clipadapt version does not warn"
        )


def check_clone_is_unfitted(subject: _Subject) -> None:
    """``clone(fitted)`` has the same params and is not fitted; the original stays fitted."""
    fx, method = subject.fitted()
    twin = method.clone()
    assert type(twin) is type(method) and twin is not method
    assert twin.get_params() == method.get_params()
    fitted_looking = [k for k in vars(twin) if k.endswith("_") and not k.startswith("_")]
    assert not fitted_looking, f"clone carries fitted state: {fitted_looking}"
    _assert_raises(NotFittedError, lambda: twin.logits(fx.test.features), "clone().logits")
    method.logits(fx.test.features)


# ---------------------------------------------------------------------------------- protocol

_TEST_WORDS = ("test", "eval")


def check_no_test_in_fit(subject: _Subject) -> None:
    """``fit`` has no test parameter, refuses evaluation rows, and never touches test tensors."""
    cls = get_method_class(subject.name)
    names = list(inspect.signature(cls.fit).parameters)
    leaked = [n for n in names if any(w in n.lower() for w in _TEST_WORDS)]
    assert not leaked, f"fit has test-like parameters {leaked}"
    fx = subject.fixture()
    evaluation = EvaluationSet(fx.val.features, fx.val.labels, None, "test")
    text = None if subject.image_only else fx.text
    _assert_raises(
        TypeError, lambda: subject.make().fit(fx.train, text, evaluation), "fit(val=EvaluationSet)"
    )
    tensors = dict(fx.bundle.tensors)
    for key in ("test_features", "test_labels"):
        tensors[key] = tensors[key].clone().as_subclass(_PoisonedTensor)
    poisoned = FeatureBundle(tensors, fx.bundle.metadata)
    group = f"train_{fx.shots}shot"
    train, val = poisoned.group(group, "train"), poisoned.group("val", "val")
    text = None if subject.image_only else poisoned.text(fx.text.text_encoder)
    with _poison_armed():
        method = subject.make().fit(train, text, val)
        method.logits(train.features)


def check_search_is_val_only(subject: _Subject) -> None:
    """``best_params_`` ignores test labels, lies in the declared grid, records its fallback."""
    from clipadapt.tasks.classification import evaluate

    fx = subject.fixture()
    shuffled = dict(fx.bundle.tensors)
    g = torch.Generator().manual_seed(1)
    shuffled["test_labels"] = torch.randint(0, fx.num_classes, (len(fx.test),), generator=g)
    encoder = fx.text.text_encoder
    runs = [
        evaluate(subject.make(), bundle, shots=fx.shots, seed=1, text_encoder=encoder)
        for bundle in (fx.bundle, FeatureBundle(shuffled, fx.bundle.metadata))
    ]
    assert runs[0].hyperparameters == runs[1].hyperparameters, (
        "the chosen hyperparameters change with the test labels: "
        f"{runs[0].hyperparameters} vs {runs[1].hyperparameters}"
    )
    method = subject.fitted()[1]
    best = method.best_params_
    missing = [k for k in subject.card.searched if k not in best]
    assert not missing, f"searched hyperparameters missing from best_params_: {missing}"
    for key, grid in method.search_space().items():
        if key in best:
            assert _in_grid(best[key], list(grid)), f"best_params_[{key!r}]={best[key]} not in grid"
    if subject.card.searched and "val" not in subject.card.needs:
        fallback = subject.fit(fx, with_val=False)
        _check_records_choice(subject, fallback, "fit without val")


def check_trainable_param_count(subject: _Subject) -> None:
    """``num_trainable_params()`` = reachable requires-grad numel = the card's formula."""
    fx, method = subject.fitted()
    reported = method.num_trainable_params()
    reachable = sum(t.numel() for t in _trainable_tensors(method))
    assert reported == reachable, (
        f"num_trainable_params() = {reported} but the tensors that require grad hold {reachable}"
    )
    card = subject.card
    if not card.trainable:
        assert reported == 0, f"training-free method reports {reported} trainable parameters"
        return
    assert reported > 0, "trainable method reports 0 trainable parameters"
    assert card.param_formula, "trainable method: declare MethodCard(param_formula=...)"
    expected = card.trainable_params(fx.num_classes, fx.dim, fx.shots, method.get_params())
    assert reported == expected, (
        f"num_trainable_params() = {reported}, card formula {card.param_formula!r} gives "
        f"{expected} at C={fx.num_classes}, D={fx.dim}, K={fx.shots}"
    )


def check_backward_reaches_all_params(subject: _Subject) -> None:
    """One loss backward gives every trainable tensor a gradient, and frozen tensors none."""
    fx, method = subject.fitted()
    params = _trainable_tensors(method)
    if not subject.card.trainable:
        assert not params, "training-free method holds tensors that require grad"
        return
    for p in params:
        p.grad = None
    x = check_feature_matrix(fx.train.features, "features", method.dim_)
    with torch.enable_grad():
        loss = F.cross_entropy(method._grad_logits(x), fx.train.labels)
        loss.backward()
    ids = {id(p) for p in params}
    names = {id(v): k for k, v in vars(method).items() if isinstance(v, Tensor)}
    no_grad = [names.get(id(p), tuple(p.shape)) for p in params if p.grad is None]
    assert not no_grad, f"no gradient reaches {no_grad} (override _grad_logits if _logits detaches)"
    bad = [names.get(id(p), tuple(p.shape)) for p in params if not torch.isfinite(p.grad).all()]
    assert not bad, f"non-finite gradients in {bad}"
    assert any(float(p.grad.abs().sum()) > 0 for p in params), "all gradients are zero"
    frozen = [
        k
        for k, v in vars(method).items()
        if isinstance(v, Tensor) and id(v) not in ids and (v.requires_grad or v.grad is not None)
    ]
    assert not frozen, f"frozen tensors take part in autograd: {frozen}"
    assert fx.text.class_features.grad is None and fx.train.features.grad is None
    for p in params:
        p.grad = None


# ---------------------------------------------------------------------------------- devices


def check_runs_on_cpu(subject: _Subject) -> None:
    """The whole lifecycle runs with CUDA hidden; with a GPU, its logits match CPU's (1e-4)."""
    fx = subject.fixture()
    with _cuda_hidden():
        method = subject.fit(fx)
        cpu = method.logits(fx.test.features)
        with tempfile.TemporaryDirectory() as tmp:
            method.save(tmp)
            _same_logits(cpu, load(tmp).logits(fx.test.features), "CPU after load", exact=True)
    if not torch.cuda.is_available():
        return
    gpu_fx = CheckFixture(
        bundle=fx.bundle,
        shots=fx.shots,
        train=fx.train.to("cuda"),
        val=fx.val.to("cuda"),
        test=fx.test.to("cuda"),
        text=fx.text.to("cuda"),
    )
    flags = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        gpu = subject.fit(gpu_fx).logits(gpu_fx.test.features)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags
    assert gpu.device.type == "cuda", f"logits of CUDA inputs came back on {gpu.device}"
    _same_logits(cpu, gpu.cpu(), "GPU vs CPU logits", exact=False, atol=1e-4)


def check_views_optional(subject: _Subject) -> None:
    """View-using methods accept ``_views``; the others give identical logits with or without."""
    viewed, fitted = subject.fitted(views=2)
    assert viewed.train.views is not None
    with_views = fitted.logits(viewed.test.features)
    assert torch.isfinite(with_views).all()
    if not subject.card.uses_views:
        plain, method = subject.fitted()
        without = method.logits(plain.test.features)
        _same_logits(
            without,
            with_views,
            "logits with and without views (card says uses_views=False)",
            exact=subject.card.deterministic,
            atol=1e-4,
        )


def check_tiny_budget(subject: _Subject) -> None:
    """fit + logits on the fixture finish within the card's ``max_tiny_seconds``."""
    fx = subject.fixture()
    started = time.perf_counter()
    subject.fit(fx).logits(fx.test.features)
    seconds = time.perf_counter() - started
    budget = subject.card.max_tiny_seconds
    assert seconds <= budget, f"fit + logits took {seconds:.2f} s > max_tiny_seconds={budget}"


# ---------------------------------------------------------------------------------- runners

#: Every check, in the order of ``style.md`` §7, with ``check_more_shots_not_worse`` (issue 18)
#: after the easy-problem check.
CHECKS: dict[str, Callable[[_Subject], None]] = {
    fn.__name__: fn
    for fn in (
        check_registry_roundtrip,
        check_init_only_stores_params,
        check_get_set_params,
        check_fit_returns_self,
        check_unfitted_raises,
        check_inputs_not_mutated,
        check_missing_tensor_message,
        check_logits_shape_dtype,
        check_batch_invariance,
        check_k1,
        check_fp16_input,
        check_input_validation,
        check_learns_easy_problem,
        check_more_shots_not_worse,
        check_deterministic_with_seed,
        check_fit_idempotent,
        check_no_global_side_effects,
        check_save_load_roundtrip,
        check_clone_is_unfitted,
        check_no_test_in_fit,
        check_search_is_val_only,
        check_trainable_param_count,
        check_backward_reaches_all_params,
        check_runs_on_cpu,
        check_views_optional,
        check_tiny_budget,
    )
}


def _run_single_threaded(check: Callable[[_Subject], None], subject: _Subject) -> None:
    # the fixture's tensors are tiny: with several intra-op threads, OpenMP start-up and
    # spin-waiting cost 10-100x the arithmetic, worst on a loaded machine
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        check(subject)
    finally:
        torch.set_num_threads(threads)


def _overrides(method_name: str, params: Mapping[str, Params] | None) -> Params:
    return dict((params or {}).get(method_name, {}))


def yield_checks(
    method_name: str, params: Mapping[str, Params] | None = None
) -> Iterator[tuple[str, Callable[[], None]]]:
    """Yield ``(check name, zero-argument callable)`` for every check, in §7 order.

    Each callable runs its check with one torch intra-op thread (restored afterwards): on the
    tiny fixture, thread start-up and spin-waiting would otherwise dominate the run time.

    Args:
        method_name: a registered method name.
        params: optional {method name: hyperparameter overrides} used by every check.

    Raises:
        UnknownMethodError: the name is not registered.
    """
    name = get_method_class(method_name).card.name
    subject = _Subject(name, _overrides(name, params))
    for check_name, check in CHECKS.items():
        yield check_name, functools.partial(_run_single_threaded, check, subject)


def check_method(
    method_name: str,
    params: Mapping[str, Params] | None = None,
    expected_failed_checks: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """Run every check on one method and raise if any non-exempt check fails.

    Args:
        method_name: a registered method name.
        params: optional {method name: hyperparameter overrides}.
        expected_failed_checks: extra {check: reason} exemptions added to the card's.

    Returns:
        {check name: "passed" | "xfail" | "xpass"}.

    Raises:
        AssertionError: listing every failed check with its message.
    """
    exempt = {**method_card(method_name).expected_failed_checks, **(expected_failed_checks or {})}
    results: dict[str, str] = {}
    failures: list[str] = []
    for check_name, check in yield_checks(method_name, params):
        try:
            check()
        except Exception as error:  # a check may fail with any error; report them all
            if check_name in exempt:
                results[check_name] = "xfail"
                continue
            failures.append(f"{check_name}: {type(error).__name__}: {error}")
        else:
            results[check_name] = "xpass" if check_name in exempt else "passed"
    if failures:
        raise AssertionError(
            f"{method_name} fails {len(failures)} check(s):\n" + "\n".join(failures)
        )
    return results


def parametrize_with_checks(
    names: list[str] | None = None,
    params: Mapping[str, Params] | None = None,
    expected_failed_checks: Mapping[str, Mapping[str, str]] | None = None,
) -> Any:
    """A ``pytest.mark.parametrize("check", ...)`` over every (method, check) pair.

    Test ids are ``<method>-<check>``; exemptions (the card's ``expected_failed_checks`` plus
    ``expected_failed_checks[method]``) become non-strict ``xfail`` marks carrying the reason.

    Args:
        names: method names (default: every registered method).
        params: optional {method name: hyperparameter overrides}.
        expected_failed_checks: optional {method name: {check: reason}} extra exemptions.

    Example:
        >>> @parametrize_with_checks(list_methods())  # doctest: +SKIP
        ... def test_method(check):
        ...     check()
    """
    import pytest

    cases = []
    for name in list_methods() if names is None else names:
        exempt = {
            **method_card(name).expected_failed_checks,
            **(expected_failed_checks or {}).get(name, {}),
        }
        for check_name, check in yield_checks(name, params):
            marks = []
            if check_name in exempt:
                marks.append(pytest.mark.xfail(reason=exempt[check_name], strict=False))
            cases.append(pytest.param(check, id=f"{name}-{check_name}", marks=marks))
    return pytest.mark.parametrize("check", cases)
