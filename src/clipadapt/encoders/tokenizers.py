"""Tokenizers named by model cards, looked up by type in a registry.

A model card may name a custom tokenizer (``"tokenizer": {"type": "word", ...}``). The package
that provides a tokenizer type registers a factory for it with :func:`register_tokenizer`; the
encoders build one with :func:`build_tokenizer` and never import that package by name (the
embedded world model's word tokenizer registers itself in :mod:`clipadapt.world.tokenizer`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from clipadapt.exceptions import ConfigError

#: Builds a tokenizer from its model-card entry and the folder of the card's checkpoint (for
#: files named relative to it), or None.
TokenizerFactory = Callable[[Mapping[str, Any], Path | None], Any]

_FACTORIES: dict[str, TokenizerFactory] = {}


def register_tokenizer(kind: str, factory: TokenizerFactory) -> None:
    """Make ``{"type": kind, ...}`` tokenizer entries of model cards buildable.

    Raises:
        ValueError: ``kind`` is already registered with another factory.
    """
    existing = _FACTORIES.get(kind)
    if existing is not None and existing is not factory:
        raise ValueError(f"tokenizer type {kind!r} is already registered by {existing!r}")
    _FACTORIES[kind] = factory


def tokenizer_types() -> list[str]:
    """The registered tokenizer types, sorted."""
    return sorted(_FACTORIES)


def build_tokenizer(spec: Mapping[str, Any], base_dir: Path | None = None) -> Any:
    """The tokenizer a model card's ``tokenizer`` entry describes.

    Raises:
        ConfigError: the entry's ``type`` is not registered (the message lists the known ones).
    """
    kind = spec.get("type")
    if kind not in _FACTORIES:
        known = ", ".join(tokenizer_types()) or "none"
        raise ConfigError(
            f"model card names an unknown tokenizer type {kind!r}; registered types: {known}"
        )
    return _FACTORIES[kind](spec, base_dir)
