"""Tokenizers named by model cards, looked up by type in a registry.

A model card may name a custom tokenizer (``"tokenizer": {"type": "word", ...}``). The package
that provides a tokenizer type registers a factory for it with :func:`register_tokenizer` (the
function, or its ``"module:function"`` path, imported when first needed); the encoders build one
with :func:`build_tokenizer` and never import that package by name (the embedded world model's
word tokenizer is registered by :mod:`clipadapt.world`).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from clipadapt.exceptions import ConfigError

#: Builds a tokenizer from its model-card entry and the folder of the card's checkpoint (for
#: files named relative to it), or None.
TokenizerFactory = Callable[[Mapping[str, Any], Path | None], Any]

_FACTORIES: dict[str, TokenizerFactory | str] = {}  # as registered
_RESOLVED: dict[str, TokenizerFactory] = {}  # module paths imported


def register_tokenizer(kind: str, factory: TokenizerFactory | str) -> None:
    """Make ``{"type": kind, ...}`` tokenizer entries of model cards buildable.

    Args:
        kind: the ``type`` value model cards use.
        factory: builds the tokenizer, or its ``"package.module:function"`` path (imported on
            first use, so registering costs no import).

    Raises:
        ValueError: ``kind`` is already registered with another factory.
    """
    existing = _FACTORIES.get(kind)
    if existing is not None and existing != factory:
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
    factory = _FACTORIES[kind]
    if isinstance(factory, str):
        if kind not in _RESOLVED:
            module, _, attr = factory.partition(":")
            _RESOLVED[kind] = getattr(importlib.import_module(module), attr)
        factory = _RESOLVED[kind]
    return factory(spec, base_dir)
