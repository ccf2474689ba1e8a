"""Declared types and ranges of method hyperparameters.

Every option of a registered method has a :class:`Constraint` on its card
(``MethodCard.constraints``). ``set_params`` and ``create_method`` check a value against it (and
coerce it: an int given for a float, a YAML list for a tuple), and ``fit`` checks every value
again, so a bad option fails before any work with an error naming the option, the value and
what is allowed::

    tip_adapter: option search_steps_beta=-5 is not allowed; expected positive int

The factories below build the common constraints; :data:`COMMON` holds the ones shared by
options of the same name across methods (``lr``, ``epochs``, ``seed``, ...), so a card writes
``**common("lr", "epochs", "seed")``.

Example:
    >>> between(0, 1, open_high=True).describe()
    'float in [0, 1)'
    >>> optional(positive_int(), "the paper's rule from the shots").describe()
    "positive int, or None (the paper's rule from the shots)"
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from clipadapt.exceptions import ConfigError

_KINDS = ("int", "float", "bool", "str", "list", "mapping")


@dataclass(frozen=True)
class Constraint:
    """The type and allowed values of one hyperparameter.

    Attributes:
        kind: "int", "float" (always finite), "bool", "str", "list" (a tuple or list whose
            items satisfy ``item``) or "mapping" (a dict with string keys).
        low, high: bounds of an int or float (None: unbounded on that side).
        open_low, open_high: whether the bound itself is excluded.
        choices: the allowed values of a "str" option, or a function returning them (read when
            needed, e.g. the solver names of an optional dependency).
        item: the constraint of every item of a "list".
        min_len: the fewest items of a "list".
        none_means: when set, None is allowed and means this.
    """

    kind: str
    low: float | None = None
    high: float | None = None
    open_low: bool = False
    open_high: bool = False
    choices: tuple[Any, ...] | Callable[[], Sequence[Any]] | None = None
    item: Constraint | None = None
    min_len: int = 0
    none_means: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in _KINDS:
            raise ValueError(f"constraint kind {self.kind!r} is not one of {', '.join(_KINDS)}")
        if self.kind == "list" and self.item is None:
            raise ValueError("a list constraint needs an item constraint")

    def allowed(self) -> tuple[Any, ...] | None:
        """The allowed values of a choice (None when any value of the type may do)."""
        if self.choices is None:
            return None
        return tuple(self.choices() if callable(self.choices) else self.choices)

    def describe(self) -> str:
        """A short phrase for ``clipadapt info`` and error messages, e.g. ``positive int``."""
        text = self._describe_value()
        if self.none_means is not None:
            text += f", or None ({self.none_means})"
        return text

    def _describe_value(self) -> str:
        allowed = self.allowed()
        if allowed is not None:
            return "choice of {" + ", ".join(str(v) for v in allowed) + "}"
        if self.kind == "list":
            assert self.item is not None
            what = "non-empty list" if self.min_len == 1 else "list"
            if self.min_len > 1:
                what = f"list of at least {self.min_len}"
            return f"{what} of {self.item.describe()}"
        if self.kind == "mapping":
            return "mapping of option names to values"
        if self.kind == "int":
            if self.low is not None and self.high is None:
                if self.low == 1:
                    return "positive int"
                return f"int >= {self.low:g}"
        if self.kind in ("int", "float") and (self.low is not None or self.high is not None):
            low = "-inf" if self.low is None else f"{self.low:g}"
            high = "inf" if self.high is None else f"{self.high:g}"
            left = "(" if self.open_low or self.low is None else "["
            right = ")" if self.open_high or self.high is None else "]"
            return f"{self.kind} in {left}{low}, {high}{right}"
        return "finite float" if self.kind == "float" else self.kind

    def check(self, name: str, value: Any, owner: str) -> Any:
        """``value`` converted to the option's type.

        Raises:
            ConfigError: the value has the wrong type or lies outside the allowed values; the
                message names ``owner``, the option, the value and what is allowed.
        """
        converted = self._typed(value)
        allowed = self.describe()
        if converted is _INVALID:
            expected = self.kind if allowed == self.kind else f"{self.kind} ({allowed})"
            problem = f"has the wrong type; expected {expected}"
        elif not self._allowed(converted):
            problem = f"is not allowed; expected {allowed}"
        else:
            return converted
        raise ConfigError(f"{owner}: option {name}={value!r} {problem}")

    def _typed(self, value: Any) -> Any:
        """``value`` converted to the option's type, or ``_INVALID``."""
        if value is None:
            return None if self.none_means is not None else _INVALID
        if self.kind == "bool":
            return value if isinstance(value, bool) else _INVALID
        if self.kind == "str":
            return value if isinstance(value, str) else _INVALID
        if self.kind == "mapping":
            if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
                return _INVALID
            return dict(value)
        if self.kind == "list":
            if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
                return _INVALID
            assert self.item is not None
            items = tuple(self.item._typed(v) for v in value)
            return _INVALID if any(v is _INVALID for v in items) else items
        if isinstance(value, bool):
            return _INVALID
        if self.kind == "int":
            return value if isinstance(value, int) else _INVALID
        if isinstance(value, str):
            # YAML 1.1 reads exponent notation without a dot (1e-3) as a string
            try:
                value = float(value)
            except ValueError:
                return _INVALID
        return float(value) if isinstance(value, (int, float)) else _INVALID

    def _allowed(self, value: Any) -> bool:
        """Whether a value of the right type lies in the range, choices or length."""
        if value is None:
            return True
        if self.kind == "list":
            assert self.item is not None
            return len(value) >= self.min_len and all(self.item._allowed(v) for v in value)
        allowed = self.allowed()
        if allowed is not None:
            return value in allowed
        if self.kind not in ("int", "float"):
            return True
        if not math.isfinite(value):
            return False
        if self.low is not None and (value < self.low or (self.open_low and value == self.low)):
            return False
        return not (
            self.high is not None and (value > self.high or (self.open_high and value == self.high))
        )


class _Invalid:
    """Marker for a value that fails its constraint."""


_INVALID = _Invalid()


def positive_int() -> Constraint:
    """An int >= 1."""
    return Constraint("int", low=1)


def count() -> Constraint:
    """An int >= 0."""
    return Constraint("int", low=0)


def positive() -> Constraint:
    """A finite float > 0."""
    return Constraint("float", low=0.0, open_low=True)


def non_negative() -> Constraint:
    """A finite float >= 0."""
    return Constraint("float", low=0.0)


def between(
    low: float, high: float, *, open_low: bool = False, open_high: bool = False
) -> Constraint:
    """A finite float in the interval from ``low`` to ``high`` (closed unless said open)."""
    return Constraint("float", low=low, high=high, open_low=open_low, open_high=open_high)


def finite() -> Constraint:
    """Any finite float."""
    return Constraint("float")


def flag() -> Constraint:
    """A bool."""
    return Constraint("bool")


def one_of(choices: Sequence[str] | Callable[[], Sequence[str]]) -> Constraint:
    """One of the given strings (or of those a function returns when asked)."""
    return Constraint("str", choices=choices if callable(choices) else tuple(choices))


def list_of(item: Constraint, *, min_len: int = 1) -> Constraint:
    """A tuple or list of at least ``min_len`` items, each satisfying ``item``."""
    return Constraint("list", item=item, min_len=min_len)


def mapping() -> Constraint:
    """A dict with string keys (options handed through to a library)."""
    return Constraint("mapping")


def optional(constraint: Constraint, none_means: str) -> Constraint:
    """``constraint``, or None meaning ``none_means``."""
    return replace(constraint, none_means=none_means)


#: Constraints of options that several methods share under the same name.
COMMON: Mapping[str, Constraint] = {
    "epochs": count(),
    "batch_size": positive_int(),
    "lr": positive(),
    "weight_decay": non_negative(),
    "eps": positive(),
    "momentum": between(0.0, 1.0, open_high=True),
    "warmup_lr": non_negative(),
    "warmup_epochs": count(),
    "select_on_val": flag(),
    "seed": count(),
    "logit_scale": positive(),
    "use_views": flag(),
    "search": flag(),
    "text_norm": positive(),
}


def common(*names: str) -> dict[str, Constraint]:
    """The :data:`COMMON` constraints of ``names`` (for ``MethodCard(constraints=...)``)."""
    return {name: COMMON[name] for name in names}
