"""clipadapt: few-shot adaptation of CLIP-style models on cached features.

Three names adapt a model::

    import clipadapt
    bundle = clipadapt.load_bundle("features.safetensors")
    method = clipadapt.create_method("tip_adapter")
    result = clipadapt.evaluate(method, bundle, shots=4, seed=1)
"""

from __future__ import annotations

from clipadapt._version import __version__
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
from clipadapt.world import tokenizer as _world_tokenizer  # noqa: F401  registers "word"

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
