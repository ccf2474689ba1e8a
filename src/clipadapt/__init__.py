"""clipadapt: few-shot adaptation of CLIP-style models on cached features.

Three names adapt a model::

    import clipadapt
    bundle = clipadapt.load_bundle("features.safetensors")
    method = clipadapt.create_method("tip_adapter")
    result = clipadapt.evaluate(method, bundle, shots=4, seed=1)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import clipadapt.world  # noqa: F401  (registers the world model's tokenizer type; light)
from clipadapt._version import __version__

# The public names are imported on first use, so that `clipadapt --help` and other light entry
# points do not pay for importing torch.
_EXPORTS = {
    "FeatureBundle": "clipadapt.data.bundle",
    "load_bundle": "clipadapt.data.bundle",
    "Adapter": "clipadapt.methods.base",
    "MethodCard": "clipadapt.methods.base",
    "create_method": "clipadapt.methods.base",
    "list_methods": "clipadapt.methods.base",
    "load": "clipadapt.methods.base",
    "method_card": "clipadapt.methods.base",
    "register_method": "clipadapt.methods.base",
    "evaluate": "clipadapt.tasks.classification",
}

if TYPE_CHECKING:
    from clipadapt.data.bundle import FeatureBundle, load_bundle
    from clipadapt.methods.base import (
        Adapter,
        MethodCard,
        create_method,
        list_methods,
        load,
        method_card,
        register_method,
    )
    from clipadapt.tasks.classification import evaluate


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'clipadapt' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])


__all__ = [
    "Adapter",
    "FeatureBundle",
    "MethodCard",
    "__version__",
    "create_method",
    "evaluate",
    "list_methods",
    "load",
    "load_bundle",
    "method_card",
    "register_method",
]
