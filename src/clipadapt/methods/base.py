"""The adapter interface every method implements, and the method registry.

A method is one class in one file under ``clipadapt/methods/``, decorated with
:func:`register_method`. Hyperparameters are explicit keyword arguments of ``__init__`` with
documented defaults (scikit-learn's rule: the constructor only stores them); learned state lives
in attributes ending in ``_``. The base class owns everything that is not the method's maths:
input checks, seeding, timing, save/load, parameter handling.

Subclasses implement:

- ``_fit(train, text, val)``: learn state from normalised float32 tensors on one device
  (``text`` is None for image-only methods fitted without text; ``self.n_classes_`` and
  ``self.dim_`` are already set when ``_fit`` runs);
- ``_logits(features)``: (N, D) normalised float32 -> (N, C) logits;
- optionally ``_get_state()`` / ``_set_state()`` when the state is more than tensors and JSON
  values in ``*_`` attributes, ``_trainable_parameters()`` for trainable methods,
  ``_grad_logits(features)`` when ``_logits`` detaches the trained tensors, and
  ``search_space()`` to expose the concrete grid of the searched hyperparameters.

Every registered method is enrolled in the shared check suite
(:mod:`clipadapt.testing.checks`, ``docs/method-checks.md``).
"""

from __future__ import annotations

import ast
import copy
import fnmatch
import importlib
import inspect
import json
import logging
import pkgutil
import re
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from clipadapt._utils import atomic_path, atomic_write_json, clean_name
from clipadapt.data.sets import (
    EvaluationSet,
    LabeledFeatures,
    TextFeatures,
    TrainSet,
    ValidationSet,
    check_feature_matrix,
)
from clipadapt.exceptions import (
    BundleError,
    CheckpointError,
    ConfigError,
    MissingTensorError,
    NotFittedError,
    UnknownMethodError,
)
from clipadapt.methods.constraints import Constraint

log = logging.getLogger(__name__)

STATE_FILE = "state.safetensors"
CONFIG_FILE = "config.json"


#: The values ``MethodCard.needs`` may contain, and what each one asks of ``fit``'s arguments.
KNOWN_NEEDS: dict[str, str] = {
    "train": "K-shot training rows (`train_features`, `train_labels`)",
    "text": "class text features (`text_features`)",
    "val": "validation rows (`val_features`, `val_labels`)",
    "prompt_features": "per-prompt text features (`text_features_all`)",
    "negative_features": "negative-prompt text features (`negative_text_features`)",
    "description_features": "class description features (`description_features`)",
    "text_encoder": "the text tower (prompt learning)",
}

#: How ``best_params_['source']`` says where the recorded hyperparameters came from
#: (:meth:`Adapter._choose`, :meth:`Adapter._record_fixed`).
CHOICE_SOURCES = (
    "validation search on <validation set> (<rows> rows)",
    "default: no validation rows",
    "default: <why no search ran>",
    "fixed: <why the method searches nothing>",
)

# needs that are read from TextFeatures attributes of the same name
_TEXT_NEEDS = ("prompt_features", "negative_features", "description_features", "text_encoder")
_NAME_RE = re.compile(r"^[a-z][a-z0-9_]*$")


@dataclass(frozen=True)
class MethodCard:
    """What the registry, ``list-methods`` and the shared checks know about a method.

    Attributes:
        name: registry name (snake_case, the module's name).
        summary: one line for ``list-methods``.
        paper: short citation; ``arxiv``: arXiv id or URL.
        needs: what ``fit`` needs, a subset of :data:`KNOWN_NEEDS`: "train", "text", "val",
            "prompt_features", "negative_features", "description_features", "text_encoder".
            A method whose needs lack "text" (and every text-derived need) is image-only and
            may be fitted with ``text=None``.
        trainable: whether fit runs gradient descent (then ``num_trainable_params() > 0``).
        searched: hyperparameters chosen on validation data, with their grid described.
        uses_views: reads augmented views of the train rows when present.
        deterministic: CPU runs with the same seed give bitwise-identical logits.
        max_tiny_seconds: budget for fit + predict on the check-suite fixture.
        expected_failed_checks: {check name: written reason} exemptions from the suite.
        param_formula: the number of trainable scalars as an arithmetic expression of ``C``
            (classes), ``D`` (feature width), ``K`` (shots per class) and the method's integer
            or float hyperparameters, e.g. ``"C * D"`` or ``"2 * D * (D // reduction)"``.
            Empty means "not declared" (training-free methods count 0).
        constraints: {option: :class:`~clipadapt.methods.constraints.Constraint`}, the type
            and allowed values of every hyperparameter (checked by ``set_params``,
            ``create_method`` and ``fit``; shown by ``clipadapt info``).
    """

    name: str
    summary: str
    paper: str = ""
    arxiv: str = ""
    needs: tuple[str, ...] = ("train", "text")
    trainable: bool = False
    searched: dict[str, str] = field(default_factory=dict)
    uses_views: bool = False
    deterministic: bool = True
    max_tiny_seconds: float = 60.0
    expected_failed_checks: dict[str, str] = field(default_factory=dict)
    param_formula: str = ""
    constraints: dict[str, Constraint] = field(default_factory=dict)

    def describe_option(self, name: str) -> str:
        """What ``name`` accepts, e.g. ``"positive int"`` or ``"choice of {rk4, euler, ...}"``.

        Raises:
            KeyError: the card declares no constraint for ``name``.
        """
        return self.constraints[name].describe()

    @property
    def needs_text(self) -> bool:
        """Whether ``fit`` needs ``text`` (False: image-only, ``text=None`` is allowed)."""
        return "text" in self.needs or any(need in self.needs for need in _TEXT_NEEDS)

    def validate(self) -> None:
        """Check the card is well formed.

        Raises:
            ConfigError: a malformed name, an unknown need, an empty exemption reason, a
                non-positive time budget or an unparsable ``param_formula``.
        """
        where = f"method card {self.name!r}"
        if not _NAME_RE.match(self.name) or clean_name(self.name) != self.name:
            raise ConfigError(f"{where}: the name must be snake_case (lower case, digits, '_')")
        if not self.summary.strip():
            raise ConfigError(f"{where}: summary is empty")
        unknown = [need for need in self.needs if need not in KNOWN_NEEDS]
        if unknown:
            raise ConfigError(
                f"{where}: unknown needs {unknown}; valid needs: {', '.join(KNOWN_NEEDS)}"
            )
        if not self.max_tiny_seconds > 0:
            raise ConfigError(f"{where}: max_tiny_seconds must be positive")
        for check, reason in self.expected_failed_checks.items():
            if not check.startswith("check_") or not isinstance(reason, str) or not reason.strip():
                raise ConfigError(
                    f"{where}: expected_failed_checks entries are {{'check_name': 'reason'}}; "
                    f"got {check!r}: {reason!r}"
                )
        if self.param_formula:
            _parse_formula(self.param_formula, where)
        wrong = [k for k, v in self.constraints.items() if not isinstance(v, Constraint)]
        if wrong:
            raise ConfigError(f"{where}: constraints of {wrong} are not Constraint objects")

    def trainable_params(self, C: int, D: int, K: int, params: dict[str, Any] | None = None) -> int:
        """Evaluate ``param_formula`` at (C, D, K) and the given hyperparameters.

        Returns:
            The declared number of trainable scalars (0 for an undeclared training-free method).

        Raises:
            ConfigError: the formula is empty for a trainable method, or uses an unknown name.
        """
        if not self.param_formula:
            if self.trainable:
                raise ConfigError(f"method card {self.name!r} declares no param_formula")
            return 0
        tree = _parse_formula(self.param_formula, f"method card {self.name!r}")
        names = {"C": C, "D": D, "K": K}
        for key, value in (params or {}).items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                names.setdefault(key, value)
        return int(_eval_formula(tree.body, names, self.param_formula))


_FORMULA_OPS = {
    ast.Add: lambda a, b: a + b,
    ast.Sub: lambda a, b: a - b,
    ast.Mult: lambda a, b: a * b,
    ast.FloorDiv: lambda a, b: a // b,
    ast.Div: lambda a, b: a / b,
    ast.Pow: lambda a, b: a**b,
}


def _parse_formula(formula: str, where: str) -> ast.Expression:
    try:
        tree = ast.parse(formula, mode="eval")
    except SyntaxError as error:
        raise ConfigError(
            f"{where}: param_formula {formula!r} is not an expression ({error})"
        ) from None
    for node in ast.walk(tree):
        allowed = (ast.Expression, ast.BinOp, ast.Constant, ast.Name, ast.Load, ast.operator)
        if not isinstance(node, allowed) or (
            isinstance(node, ast.operator) and type(node) not in _FORMULA_OPS
        ):
            raise ConfigError(
                f"{where}: param_formula {formula!r} may only use numbers, names and + - * / // **"
            )
    return tree


def _eval_formula(node: ast.AST, names: dict[str, Any], formula: str) -> Any:
    # a tiny arithmetic evaluator: no eval(), so a card cannot run code
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
        return node.value
    if isinstance(node, ast.Name):
        if node.id not in names:
            raise ConfigError(
                f"param_formula {formula!r}: unknown name {node.id!r} (use C, D, K or a numeric "
                "hyperparameter)"
            )
        return names[node.id]
    if isinstance(node, ast.BinOp):
        left = _eval_formula(node.left, names, formula)
        right = _eval_formula(node.right, names, formula)
        return _FORMULA_OPS[type(node.op)](left, right)
    raise ConfigError(f"param_formula {formula!r}: unsupported expression")


_REGISTRY: dict[str, type[Adapter]] = {}
_DISCOVERED = False


def register_method(cls: type[Adapter]) -> type[Adapter]:
    """Class decorator adding a method to the registry under ``cls.card.name``."""
    card = getattr(cls, "card", None)
    if not isinstance(card, MethodCard):
        raise TypeError(f"{cls.__name__} needs a `card = MethodCard(...)` class attribute")
    if not issubclass(cls, Adapter):
        raise TypeError(f"{cls.__name__} must subclass clipadapt.Adapter")
    if card.constraints:
        names = set(cls._param_names())
        missing, unknown = (
            sorted(names - set(card.constraints)),
            sorted(set(card.constraints) - names),
        )
        if missing or unknown:
            raise TypeError(
                f"{cls.__name__}.card.constraints must cover exactly the constructor's options; "
                f"missing {missing}, unknown {unknown}"
            )
    name = clean_name(card.name)
    existing = _REGISTRY.get(name)
    if existing is not None and existing.__qualname__ != cls.__qualname__:
        raise ValueError(f"method name {name!r} is already registered by {existing.__qualname__}")
    _REGISTRY[name] = cls
    return cls


def _discover() -> None:
    """Import every module of ``clipadapt.methods`` once so their decorators run."""
    global _DISCOVERED
    if _DISCOVERED:
        return
    _DISCOVERED = True
    import clipadapt.methods as package

    for info in pkgutil.iter_modules(package.__path__):
        if info.name != "base" and not info.name.startswith("_"):
            importlib.import_module(f"clipadapt.methods.{info.name}")


def list_methods(filter: str = "*", trainable: bool | None = None) -> list[str]:
    """Registered method names matching a wildcard pattern, sorted.

    Example:
        >>> list_methods("*adapter*")  # doctest: +SKIP
        ['clip_adapter', 'tip_adapter', 'tip_adapter_f']
    """
    _discover()
    names = sorted(n for n in _REGISTRY if fnmatch.fnmatch(n, clean_name(filter) or "*"))
    if trainable is not None:
        names = [n for n in names if _REGISTRY[n].card.trainable == trainable]
    return names


def get_method_class(name: str) -> type[Adapter]:
    """The class registered under ``name`` (normalised: lower case, '-' becomes '_').

    Raises:
        UnknownMethodError: the name is not registered (the message lists the names).
    """
    _discover()
    key = clean_name(name)
    if key not in _REGISTRY:
        raise UnknownMethodError(
            f"unknown method {name!r}; registered methods: {', '.join(sorted(_REGISTRY))}"
        )
    return _REGISTRY[key]


def method_card(name: str) -> MethodCard:
    """The :class:`MethodCard` of a registered method."""
    return get_method_class(name).card


PRESET_DIR = Path(__file__).resolve().parent / "presets"


def method_presets(name: str) -> dict[str, dict[str, Any]]:
    """Named presets of a method from ``methods/presets/<name>.yaml`` ({preset: params}).

    Preset files are data with a ``source:`` (a paper table or released config); none of their
    numbers were tuned on this project's test data.
    """
    import yaml

    path = PRESET_DIR / f"{get_method_class(name).card.name}.yaml"
    if not path.is_file():
        return {}
    data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    return {str(k): dict(v) for k, v in (data.get("presets") or {}).items()}


def create_method(name: str, preset: str | None = None, **params: Any) -> Adapter:
    """Build a registered method; ``None``-valued params are dropped (timm's rule).

    ``name`` may be the command line's spec, ``NAME:key=value,key=value`` (e.g.
    ``"tip_adapter:search_steps_beta=50"``, values read as YAML scalars as by
    :func:`parse_method_spec`); its options combine with ``preset`` and ``params``, and a key
    given both ways must agree.

    Args:
        name: registry name (``clipadapt list-methods``) or a ``NAME:key=value,...`` spec.
        preset: optional preset name (e.g. a dataset's published settings, see
            :func:`method_presets`); explicit ``params`` override it.
        params: hyperparameters.

    Raises:
        UnknownMethodError: the name is not registered (the message lists the names).
        ConfigError: an unknown preset or hyperparameter, or a value of the wrong type or
            outside the option's declared range (``MethodCard.constraints``); a key set in the
            spec and as a keyword to different values.
    """
    if ":" in name:
        name, from_spec = parse_method_spec(name)
        given = {**params, "preset": preset}
        clashes = sorted(
            k for k, v in from_spec.items() if given.get(k) is not None and given[k] != v
        )
        if clashes:
            both = ", ".join(f"{k}={from_spec[k]!r} in the spec vs {given[k]!r}" for k in clashes)
            raise ConfigError(
                f"{name}: {both} as a keyword; give each option once (in the spec or as a keyword)"
            )
        preset = from_spec.pop("preset", preset)
        params = {**from_spec, **params}
    cls = get_method_class(name)
    method = cls()
    if preset is not None:
        presets = method_presets(name)
        if preset not in presets:
            known = ", ".join(sorted(presets)) or "none"
            raise ConfigError(f"{cls.card.name} has no preset {preset!r}; presets: {known}")
        method.set_params(**presets[preset])
    method.set_params(**{k: v for k, v in params.items() if v is not None})
    return method


def parse_method_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """Parse ``name:key=value,key=value`` (values read as YAML scalars) into (name, params).

    Example:
        >>> parse_method_spec("node_adapter:solver=rk4,steps=8")
        ('node_adapter', {'solver': 'rk4', 'steps': 8})
    """
    import yaml

    name, _, rest = spec.partition(":")
    name = name.strip()
    if not name:
        raise ConfigError(f"method spec {spec!r} has no method name (expected name:key=value,...)")
    params: dict[str, Any] = {}
    for item in filter(None, (part.strip() for part in _split_options(rest))):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(
                f"method option {item!r} in {spec!r} is not of the form key=value "
                f"(example: {name}:alpha=1.0,beta=5.5)"
            )
        try:
            params[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError as error:
            raise ConfigError(f"cannot read the value of {key!r} in {spec!r}: {error}") from None
    return name, params


def _split_options(text: str) -> list[str]:
    """Split on commas that are not inside brackets, so lists like ``grid=[1,2]`` and mappings
    like ``solver_options={step_size: 0.5, perturb: true}`` survive."""
    parts, depth, current = [], 0, []
    for char in text:
        if char in "[({":
            depth += 1
        elif char in "])}":
            depth -= 1
        if char == "," and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    parts.append("".join(current))
    return parts


def check_is_fitted(method: Adapter) -> None:
    """Raise :class:`NotFittedError` (naming the method) unless ``method`` has been fitted."""
    if not getattr(method, "fitted_", False):
        raise NotFittedError(
            f"This {type(method).__name__} ({method.card.name}) instance is not fitted yet. "
            "Call 'fit' before using it."
        )


def _coerce(name: str, value: Any, default: Any, owner: str) -> Any:
    """Check a hyperparameter value against the type of its default."""
    if default is None or value is None:
        return value
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
    elif isinstance(default, int):
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif isinstance(default, float):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            # YAML 1.1 reads exponent notation without a dot (1e-3) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif isinstance(default, str):
        if isinstance(value, str):
            return value
    elif isinstance(default, (tuple, list)):
        if isinstance(value, (tuple, list)):
            return type(default)(value)
    else:
        return value
    raise ConfigError(
        f"{owner}: option {name}={value!r} has the wrong type; expected "
        f"{type(default).__name__} (default {default!r})"
    )


class Adapter:
    """Base class of every few-shot adaptation method (scikit-learn-style estimator).

    Public surface: ``fit(train, text, val=None) -> self``, ``logits(features) -> (N, C)``,
    ``predict``, ``score``, ``save(dir)``, ``load(dir)``, ``num_trainable_params()``,
    ``get_params``/``set_params``/``clone``.
    """

    card: ClassVar[MethodCard]

    # ------------------------------------------------------------------ parameters
    @classmethod
    def _param_names(cls) -> list[str]:
        signature = inspect.signature(cls.__init__)
        names = []
        for p in signature.parameters.values():
            if p.name == "self":
                continue
            if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
                raise TypeError(f"{cls.__name__}.__init__ must list its hyperparameters explicitly")
            names.append(p.name)
        return sorted(names)

    @classmethod
    def _defaults(cls) -> dict[str, Any]:
        signature = inspect.signature(cls.__init__)
        return {
            p.name: p.default
            for p in signature.parameters.values()
            if p.name != "self" and p.default is not inspect.Parameter.empty
        }

    def _init_params(self, values: Mapping[str, Any]) -> None:
        """Store the constructor's arguments as given: ``self._init_params(locals())``.

        The one statement of every method's ``__init__`` (scikit-learn's rule: the constructor
        only stores its hyperparameters; they are checked in ``set_params`` and ``fit``).
        """
        for name in self._param_names():
            setattr(self, name, values[name])

    @classmethod
    def _upgrade_params(cls, params: dict[str, Any]) -> dict[str, Any]:
        """Saved hyperparameters of an earlier version in today's names (used by :func:`load`).

        Default: unchanged. A method that renames or removes an option maps the old entry
        here, so adapters saved before keep loading.
        """
        return params

    def get_params(self) -> dict[str, Any]:
        """The hyperparameters (constructor arguments) and their current values."""
        return {name: copy.deepcopy(getattr(self, name)) for name in self._param_names()}

    def set_params(self, **params: Any) -> Adapter:
        """Set hyperparameters, checked against the card's constraints. Returns self.

        Raises:
            ConfigError: an unknown name (the message lists the valid ones), or a value of the
                wrong type or outside the allowed range (the message names the option, the
                value and what is allowed).
        """
        valid = self._param_names()
        defaults = self._defaults()
        constraints = self.card.constraints
        for key, value in params.items():
            if key not in valid:
                raise ConfigError(
                    f"{self.card.name} has no option {key!r}; valid options: {', '.join(valid)}"
                )
            if key in constraints:
                value = constraints[key].check(key, value, self.card.name)
            else:  # a method without declared constraints: the type of the default
                value = _coerce(key, value, defaults.get(key), self.card.name)
            setattr(self, key, value)
        return self

    def _check_params(self) -> None:
        """Check every hyperparameter against its constraint (values set in the constructor
        are not checked there, scikit-learn's rule); raises ConfigError naming the option."""
        for key, constraint in self.card.constraints.items():
            constraint.check(key, getattr(self, key), self.card.name)

    def clone(self) -> Adapter:
        """A new, unfitted method with the same hyperparameters."""
        return type(self)(**self.get_params())

    def __repr__(self) -> str:
        defaults = self._defaults()
        changed = {k: v for k, v in self.get_params().items() if defaults.get(k, object()) != v}
        inner = ", ".join(f"{k}={v!r}" for k, v in sorted(changed.items()))
        return f"{type(self).__name__}({inner})"

    # ------------------------------------------------------------------ lifecycle
    def fit(
        self,
        train: LabeledFeatures,
        text: TextFeatures | None = None,
        val: ValidationSet | None = None,
        *,
        num_classes: int | None = None,
    ) -> Adapter:
        """Fit on K-shot training features and, when the method uses them, class text features.

        Image-only methods (the card's ``needs`` lacks "text") may be fitted with
        ``text=None``, e.g. on bundles that have no ``text_features``. The number of classes is
        then ``num_classes`` when given, else one more than the largest label in ``train`` and
        ``val`` (so pass ``num_classes`` when the highest classes may have no rows). With text,
        C is ``text.num_classes`` and a different ``num_classes`` is an error.

        The global torch RNG is forked and seeded from the ``seed`` hyperparameter (0 without
        one) around the method's own fitting code, so module initialisation is reproducible and
        the caller's RNG state is left unchanged.

        Args:
            train: the K-shot rows, (N, D) features + (N,) labels, optional (V, N, D) views.
            text: per-class text features, (C, D) at least; None for image-only methods.
            val: optional validation rows; the only data used to choose hyperparameters.
            num_classes: C when fitting without text (checked against ``text`` otherwise).

        Returns:
            self.

        Raises:
            TypeError: ``val`` is an :class:`EvaluationSet` (evaluation data may not be used),
                or an argument has the wrong type.
            MissingTensorError: the card needs text, validation rows or an optional text tensor
                that is not given (the message names the bundle tensor).
            BundleError: inconsistent widths, labels out of range, or no training rows.

        Example:
            >>> train = bundle.group("train_4shot", "train")  # doctest: +SKIP
            >>> create_method("tip_adapter").fit(train, bundle.text()).logits(x)  # doctest: +SKIP
        """
        name = self.card.name
        self._check_params()
        if isinstance(train, EvaluationSet) or isinstance(val, EvaluationSet):
            raise TypeError(
                f"{name}.fit received evaluation data; pass a ValidationSet for val "
                "(evaluation rows are scored once, never fitted or searched on)"
            )
        if not isinstance(train, LabeledFeatures):
            raise TypeError(f"train must be LabeledFeatures, got {type(train).__name__}")
        if text is not None and not isinstance(text, TextFeatures):
            raise TypeError(f"text must be TextFeatures or None, got {type(text).__name__}")
        if val is not None and not isinstance(val, ValidationSet):
            if type(val) is LabeledFeatures:
                val = ValidationSet(val.features, val.labels, val.views, val.name)
            else:
                raise TypeError(f"val must be a ValidationSet, got {type(val).__name__}")
        self._check_needs(text, val)
        if len(train) == 0:
            raise BundleError(f"{train.name}: no training rows")
        num_classes, dim = self._resolve_classes(train, text, val, num_classes)
        for part in (train, val):
            if part is None:
                continue
            if part.dim != dim:
                raise BundleError(
                    f"{part.name}_features: width {part.dim} does not match text_features width "
                    f"{dim}; features and text must come from the same backbone"
                )
            part.check_labels(num_classes)
        device = train.device
        if text is not None:
            text = text.to(device)
        if val is not None:
            val = val.to(device)
        if not isinstance(train, TrainSet):
            train = TrainSet(train.features, train.labels, train.views, train.name)
        self._reset()
        self.n_classes_ = num_classes
        self.dim_ = dim
        started = time.perf_counter()
        with self._seeded_global_rng(device):
            self._fit(train, text, val)
        self.fit_seconds_ = time.perf_counter() - started
        self.n_classes_ = num_classes
        self.dim_ = dim
        self.fitted_ = True
        return self

    def _check_needs(self, text: TextFeatures | None, val: ValidationSet | None) -> None:
        """Raise MissingTensorError naming the first input the card needs but was not given."""
        name = self.card.name
        if text is None and self.card.needs_text:
            image_only = [n for n in list_methods() if not get_method_class(n).card.needs_text]
            raise MissingTensorError(
                f"{name} needs `text_features` (C, D) class text features, which were not given "
                "(the bundle may have no text side); image-only methods run without them: "
                f"{', '.join(image_only) or 'none registered'}"
            )
        if "val" in self.card.needs and (val is None or len(val) == 0):
            raise MissingTensorError(
                f"{name} needs validation rows (`val_features`, `val_labels`) to choose its "
                "hyperparameters; give the bundle a `val` group or pass --val-set"
            )
        for need in _TEXT_NEEDS:
            if need in self.card.needs and text is not None:
                text.require(need, name)

    def _resolve_classes(
        self,
        train: LabeledFeatures,
        text: TextFeatures | None,
        val: ValidationSet | None,
        num_classes: int | None,
    ) -> tuple[int, int]:
        """(C, D) from the text features, or from ``num_classes`` / the labels without text."""
        if num_classes is not None and (
            not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1
        ):
            raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
        if text is not None:
            if num_classes is not None and num_classes != text.num_classes:
                raise BundleError(
                    f"num_classes={num_classes} but text_features has {text.num_classes} rows"
                )
            return text.num_classes, text.dim
        if num_classes is None:
            tops = [
                int(part.labels.max()) for part in (train, val) if part is not None and len(part)
            ]
            num_classes = max(tops) + 1
        return num_classes, train.dim

    @contextmanager
    def _seeded_global_rng(self, device: torch.device) -> Iterator[None]:
        """Fork the global torch RNG of ``device`` (and the CPU), seed it, restore it after."""
        cuda = [device.index or 0] if device.type == "cuda" else []
        seed = getattr(self, "seed", 0)
        seed = 0 if seed is None else int(seed)
        with torch.random.fork_rng(devices=cuda):
            torch.random.default_generator.manual_seed(seed * 1_000_003 + 7)
            if cuda:
                torch.cuda.manual_seed(seed * 1_000_003 + 7)
            yield

    def _reset(self) -> None:
        for key in [k for k in vars(self) if k.endswith("_") and not k.startswith("_")]:
            delattr(self, key)
        self.best_params_ = {}

    def logits(self, features: Tensor, batch_size: int = 2048) -> Tensor:
        """Class logits for image features.

        Args:
            features: (N, D) image features (any float dtype; normalised here).
            batch_size: rows per chunk, to bound memory on large test sets (a chunk's
                (rows, cache size) affinities stay small: with 16,000 cache keys, prediction in
                chunks of 2048 rows ran 1.1x faster than in chunks of 8192 on 2 cores).

        Returns:
            (N, C) float32 logits on the input's device.
        """
        check_is_fitted(self)
        x = check_feature_matrix(features, "features", self.dim_)
        with torch.no_grad():
            chunks = [self._logits(x[i : i + batch_size]) for i in range(0, x.shape[0], batch_size)]
        if not chunks:
            return torch.zeros(0, self.n_classes_, device=x.device)
        return torch.cat(chunks).float()

    def predict(self, features: Tensor) -> Tensor:
        """(N,) predicted class indices."""
        return self.logits(features).argmax(dim=-1)

    def score(self, features: Tensor, labels: Tensor) -> float:
        """Top-1 accuracy in percent."""
        if features.shape[0] == 0:
            raise BundleError("cannot compute an accuracy on an empty set")
        return float((self.predict(features) == labels.to(features.device)).float().mean() * 100)

    def num_trainable_params(self) -> int:
        """Number of scalars trained by ``fit`` (0 for training-free methods)."""
        return sum(p.numel() for p in self._trainable_parameters())

    def _trainable_parameters(self) -> Iterable[nn.Parameter]:
        for value in vars(self).values():
            if isinstance(value, nn.Module):
                yield from (p for p in value.parameters() if p.requires_grad)
            elif isinstance(value, nn.Parameter) and value.requires_grad:
                yield value

    def _generator(self, device: torch.device | str = "cpu", offset: int = 0) -> torch.Generator:
        """A private RNG seeded from the ``seed`` hyperparameter (no global RNG is touched)."""
        generator = torch.Generator(device=device)
        generator.manual_seed(int(getattr(self, "seed", 0)) * 1_000_003 + offset)
        return generator

    def search_space(self) -> dict[str, list[Any]]:
        """The candidate values of each hyperparameter searched on validation data.

        The grid at the current hyperparameters, e.g. ``{"alpha": [0.1, 0.6, ...]}``; the
        check suite verifies that ``best_params_`` lies inside it. Default: ``{}`` (no grid
        exposed; a method with a card ``searched`` entry should override it).
        """
        return {}

    # ------------------------------------------------------------------ chosen hyperparameters
    def _choose(
        self,
        val: ValidationSet | None,
        search: Callable[[ValidationSet], tuple[dict[str, Any], float]],
        defaults: Mapping[str, Any],
        *,
        disabled: str | None = None,
    ) -> dict[str, Any]:
        """Choose the searched hyperparameters and record the point and its source.

        Every method that chooses hyperparameters on validation data goes through here, so
        ``best_params_`` reads the same for all of them: the chosen point, ``val_accuracy``
        after a search, and ``source``, one of :data:`CHOICE_SOURCES` (filled in).

        Args:
            val: the validation rows, or None.
            search: runs the search (through :mod:`clipadapt.engine.search`) on ``val`` and
                returns (point, validation accuracy in percent).
            defaults: the point used without a search.
            disabled: why no search runs even with validation rows (e.g. "search disabled"),
                or None.

        Returns:
            The chosen point (a new dict).
        """
        if disabled is not None:
            point, extra = dict(defaults), {"source": f"default: {disabled}"}
        elif val is None or len(val) == 0:
            point, extra = dict(defaults), {"source": "default: no validation rows"}
        else:
            found, score = search(val)
            point = dict(found)
            extra = {
                "val_accuracy": float(score),
                "source": f"validation search on {val.name} ({len(val)} rows)",
            }
        self.best_params_ = {**point, **extra}
        return point

    def _record_fixed(self, values: Mapping[str, Any], why: str) -> None:
        """Record ``values`` in ``best_params_`` for a method that searches nothing here."""
        self.best_params_ = {**values, "source": f"fixed: {why}"}

    # ------------------------------------------------------------------ to implement
    def _fit(self, train: TrainSet, text: TextFeatures | None, val: ValidationSet | None) -> None:
        raise NotImplementedError

    def _logits(self, features: Tensor) -> Tensor:
        raise NotImplementedError

    def _grad_logits(self, features: Tensor) -> Tensor:
        """Logits with autograd reaching every trainable parameter (used by the checks).

        Default: ``_logits``. Override when ``_logits`` detaches or folds the trained tensors
        (for speed at inference) so gradients would not reach them.
        """
        return self._logits(features)

    # ------------------------------------------------------------------ persistence
    def _get_state(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """Fitted state as (tensors, JSON values). Default: the public ``*_`` attributes."""
        tensors: dict[str, Tensor] = {}
        meta: dict[str, Any] = {}
        for key, value in vars(self).items():
            if not key.endswith("_") or key.startswith("_"):
                continue
            if isinstance(value, Tensor):
                tensors[key] = value.detach().cpu().contiguous()
            elif isinstance(value, nn.Module):
                for sub, tensor in value.state_dict().items():
                    tensors[f"{key}.{sub}"] = tensor.detach().cpu().contiguous()
                meta.setdefault("__modules__", []).append(key)
            else:
                meta[key] = value
        return tensors, meta

    def _set_state(self, tensors: dict[str, Tensor], meta: dict[str, Any]) -> None:
        modules = set(meta.pop("__modules__", []))
        for key, value in meta.items():
            setattr(self, key, value)
        if modules:
            self._build_modules()
        for key, tensor in tensors.items():
            head, _, sub = key.partition(".")
            if head in modules:
                continue
            setattr(self, key, tensor)
        for head in modules:
            module: nn.Module = getattr(self, head)
            prefix = f"{head}."
            module.load_state_dict(
                {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
            )

    def _build_modules(self) -> None:
        """Recreate the ``nn.Module`` attributes (shapes from meta) before loading their weights."""
        raise NotImplementedError(f"{type(self).__name__} must implement _build_modules")

    #: What :func:`load` read from ``config.json``'s ``provenance`` (class names, backbone,
    #: bundle fingerprint), or None. Not a fitted attribute: ``save`` writes only what it is given.
    provenance: dict[str, Any] | None = None

    def save(self, directory: str | Path, provenance: dict[str, Any] | None = None) -> Path:
        """Write ``config.json`` and ``state.safetensors`` (no pickle) into ``directory``.

        ``provenance`` (JSON values: class names, backbone record, bundle fingerprint...) is
        stored as ``config["provenance"]``, so the saved adapter alone can name its classes.
        """
        check_is_fitted(self)
        from clipadapt._version import __version__

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors, meta = self._get_state()
        config = {
            "method": self.card.name,
            "params": self.get_params(),
            "state": meta,
            "clipadapt_version": __version__,
        }
        if provenance is not None:
            config["provenance"] = provenance
        try:
            json.dumps(config)
        except TypeError as error:
            raise CheckpointError(
                f"{self.card.name}: state is not JSON-serialisable: {error}"
            ) from None
        with atomic_path(directory / STATE_FILE) as tmp:
            save_file(tensors, str(tmp))
        atomic_write_json(directory / CONFIG_FILE, config)
        return directory


def load(directory: str | Path) -> Adapter:
    """Load a fitted method saved with :meth:`Adapter.save` (safetensors + JSON, no pickle).

    The returned method's ``provenance`` is what was saved with it (None if nothing was).

    Raises:
        CheckpointError: the folder does not hold a saved adapter.
    """
    from clipadapt._version import __version__

    directory = Path(directory)
    config_path, state_path = directory / CONFIG_FILE, directory / STATE_FILE
    if not config_path.is_file() or not state_path.is_file():
        raise CheckpointError(
            f"{directory}: not a saved adapter (expected {CONFIG_FILE} and {STATE_FILE}; "
            "create one with `clipadapt fit --out DIR`)"
        )
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
        method_name = config["method"]
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        raise CheckpointError(f"{config_path}: malformed adapter config ({error})") from None
    try:
        tensors = load_file(str(state_path))
    except Exception as error:  # safetensors raises its own error types
        raise CheckpointError(f"{state_path}: not a readable safetensors file ({error})") from None
    if config.get("clipadapt_version") != __version__:
        warnings.warn(
            f"{directory} was saved by clipadapt {config.get('clipadapt_version')}, "
            f"this is {__version__}; results may differ",
            stacklevel=2,
        )
    # not create_method: it drops None values, which would turn a saved None into the default
    method = get_method_class(method_name)()
    method.set_params(**method._upgrade_params(dict(config.get("params", {}))))
    method._set_state(tensors, dict(config.get("state", {})))
    method.provenance = config.get("provenance")
    return method
