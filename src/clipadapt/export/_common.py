"""What every export format shares: a frozen copy of a fitted method, class names, metadata.

A fitted method is exported through its own ``_logits`` (the maths in its method file), never
through a re-implementation: :func:`frozen_copy` gives a copy whose tensors are detached CPU
tensors (so a tracer may record them as constants and ``fit`` state is never touched), and
:class:`FeatureLogits` wraps it as an ``nn.Module`` that normalises the features first, as
:meth:`clipadapt.Adapter.logits` does.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from clipadapt.exceptions import ClipadaptError, ConfigError
from clipadapt.methods.base import CONFIG_FILE, Adapter, check_is_fitted

#: The file ``clipadapt fit`` writes beside a saved adapter (class names, backbone record).
RUN_FILE = "run.json"


class ExportError(ClipadaptError, RuntimeError):
    """An exported model does not reproduce the adapter's logits (the message says by how much)."""


def frozen_copy(method: Adapter, dtype: torch.dtype | None = None) -> Adapter:
    """A shallow copy of a fitted method whose fitted tensors are detached CPU tensors.

    Fitted state is the public ``*_`` attributes (the base class's convention); tensors among
    them become detached clones (cast to ``dtype`` when given, floating-point ones only) and
    ``nn.Module`` attributes become frozen deep copies in eval mode. Hyperparameters and
    private attributes are shared with the original, which is never modified.

    Args:
        method: a fitted method.
        dtype: optional floating dtype for the copy (float64 for exact linearity checks).

    Raises:
        NotFittedError: ``method`` is not fitted.
    """
    check_is_fitted(method)
    clone = copy.copy(method)
    for key, value in vars(method).items():
        if not key.endswith("_") or key.startswith("_"):
            continue
        if isinstance(value, Tensor):
            tensor = value.detach().to("cpu").clone()
            if dtype is not None and tensor.is_floating_point():
                tensor = tensor.to(dtype)
            setattr(clone, key, tensor)
        elif isinstance(value, nn.Module):
            module = copy.deepcopy(value).to("cpu").eval().requires_grad_(False)
            if dtype is not None:
                module = module.to(dtype)
            setattr(clone, key, module)
    return clone


def method_device(method: Adapter) -> torch.device:
    """The device of a fitted method's tensors (the CPU when it holds none)."""
    for key, value in vars(method).items():
        if not key.endswith("_") or key.startswith("_"):
            continue
        if isinstance(value, Tensor):
            return value.device
        if isinstance(value, nn.Module):
            for tensor in value.parameters():
                return tensor.device
    return torch.device("cpu")


def reference_logits(method: Adapter, features: Tensor) -> Tensor:
    """``Adapter.logits`` on the method's own device, returned on the CPU (the reference every
    export is checked against, also for a method fitted on a GPU)."""
    return method.logits(features.to(method_device(method))).cpu()


def l2_normalize(features: Tensor) -> Tensor:
    """Rows scaled to unit length in float32, exactly as clipadapt normalises bundle rows."""
    x = features.float()
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)


class FeatureLogits(nn.Module):
    """``(N, D) features -> (N, C) logits``: L2-normalise, then the method's own ``_logits``.

    Args:
        method: a fitted method (a :func:`frozen_copy` is taken, the original is untouched).
    """

    def __init__(self, method: Adapter) -> None:
        super().__init__()
        # a plain attribute, not a submodule: the method is not an nn.Module, and tracing
        # records its fitted tensors as constants of the graph
        self.method = frozen_copy(method)

    def forward(self, features: Tensor) -> Tensor:
        return self.method._logits(l2_normalize(features)).float()


# ---------------------------------------------------------------------------------- class names


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise ConfigError(f"{path}: not readable JSON ({error})") from None
    return data if isinstance(data, dict) else {}


def _check_names(names: Any, num_classes: int, where: str) -> list[str]:
    if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names):
        raise ConfigError(f"{where}: class names must be a list of strings")
    if len(names) != num_classes:
        raise ConfigError(
            f"{where}: {len(names)} class names for an adapter with {num_classes} classes; "
            "pass the names in label order (one per class)"
        )
    return list(names)


def adapter_classnames(
    directory: str | Path, num_classes: int, classnames: list[str] | None = None
) -> tuple[list[str], str]:
    """The class names of a saved adapter, and where they came from.

    Order of precedence: ``classnames`` when given; ``provenance.classnames`` in the adapter's
    ``config.json``; ``classnames`` in ``run.json`` beside it (written by ``clipadapt fit``);
    else ``class_0 ... class_{C-1}``.

    Args:
        directory: the saved adapter's folder.
        num_classes: C, the adapter's number of classes (names are checked against it).
        classnames: explicit names, which win.

    Returns:
        (C names in label order, a short description of their source).

    Raises:
        ConfigError: names of the wrong count or type, or an unreadable JSON file.
    """
    directory = Path(directory)
    if classnames is not None:
        return _check_names(classnames, num_classes, "classnames"), "given"
    config = _read_json(directory / CONFIG_FILE)
    provenance = config.get("provenance")
    if isinstance(provenance, dict) and provenance.get("classnames") is not None:
        where = f"{directory / CONFIG_FILE} (provenance.classnames)"
        return _check_names(provenance["classnames"], num_classes, where), where
    run = _read_json(directory / RUN_FILE)
    if run.get("classnames") is not None:
        where = str(directory / RUN_FILE)
        return _check_names(run["classnames"], num_classes, where), where
    return [f"class_{i}" for i in range(num_classes)], "none recorded (class_i placeholders)"


def adapter_backbone_record(directory: str | Path) -> dict[str, Any] | None:
    """The backbone record saved with an adapter (``provenance.backbone_spec`` in
    ``config.json``, else ``backbone_spec`` in ``run.json``), or None."""
    directory = Path(directory)
    provenance = _read_json(directory / CONFIG_FILE).get("provenance")
    if isinstance(provenance, dict) and isinstance(provenance.get("backbone_spec"), dict):
        return provenance["backbone_spec"]
    record = _read_json(directory / RUN_FILE).get("backbone_spec")
    return record if isinstance(record, dict) else None


def base_metadata(method: Adapter, classnames: list[str]) -> dict[str, str]:
    """The string metadata every export carries (class names as a JSON list).

    Raises:
        ConfigError: not one class name per class.
    """
    from clipadapt import __version__

    _check_names(classnames, int(method.n_classes_), "classnames")
    return {
        "classnames": json.dumps(classnames),
        "method": method.card.name,
        "clipadapt_version": __version__,
        "feature_dim": str(int(method.dim_)),
        "num_classes": str(int(method.n_classes_)),
        "params": json.dumps(method.get_params(), default=str, sort_keys=True),
    }


def random_unit_features(count: int, dim: int, seed: int = 0, dtype: torch.dtype = torch.float32):
    """``count`` random unit rows of width ``dim`` from a private generator (no global RNG)."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(count, dim, generator=generator, dtype=torch.float64)
    return (x / x.norm(dim=-1, keepdim=True)).to(dtype)
