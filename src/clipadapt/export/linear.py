"""Export an adapter whose prediction is a linear head on the features as ``weight`` + ``bias``.

Whether a fitted method is linear is decided from its logits, not from a list of names: on
L2-normalised features ``x`` a linear head gives ``logits(x) = x Wᵀ + b``, so

    W[:, i] = (logits(e_i) - logits(-e_i)) / 2,   b = mean_i (logits(e_i) + logits(-e_i)) / 2

for the D basis vectors ``e_i`` (unit vectors, so the method sees valid inputs), and the
recovered head must then reproduce the method's logits on unit probe rows: random directions,
the method's own fitted (·, D) rows (cache keys, prototypes) and mixtures of them, where a
sharp cache term is far from linear even when it is flat on random directions. Both steps run
on a float64 copy of the fitted tensors, where a linear method agrees to ~1e-12 and any
non-linearity (Tip-Adapter's exponential cache, CLIP-Adapter's MLP followed by a
normalisation) shows up orders of magnitude above the tolerance. A method is judged as fitted:
HeGraphAdapter with a fusion weight of 0 is linear, with a cache term it is not.

The file is safetensors: ``weight`` float32 (C, D), ``bias`` float32 (C,), and string metadata
``classnames`` (JSON list), ``method``, ``clipadapt_version``, ``feature_dim``, ``num_classes``,
``params``, ``input`` (the contract: ``logits = normalize(features) @ weight.T + bias``) and
``max_abs_error`` (float32 head vs ``Adapter.logits`` on random unit features).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor

from clipadapt._utils import atomic_path
from clipadapt.exceptions import ConfigError
from clipadapt.export._common import (
    base_metadata,
    frozen_copy,
    random_unit_features,
    reference_logits,
)
from clipadapt.methods.base import Adapter, check_is_fitted

#: Largest |recovered head - method| (logits, float64) for a method to count as linear.
LINEAR_TOL = 1e-5
#: Random unit features the recovered head is verified on.
CHECK_ROWS = 256


class NotLinearError(ConfigError):
    """The fitted method's logits are not a linear function of the normalised features."""


def linear_head(method: Adapter, *, tol: float = LINEAR_TOL) -> tuple[Tensor, Tensor, float]:
    """Recover ``(weight (C, D), bias (C,))`` of a method whose logits are linear in the
    normalised features, and verify it.

    Args:
        method: a fitted method.
        tol: the largest |x Wᵀ + b - logits(x)| allowed on the probe rows: absolute
            when the method computes in float64, relative to the largest logit when its maths
            runs in float32 only.

    Returns:
        (weight float32 (C, D), bias float32 (C,), the deviation found).

    Raises:
        NotLinearError: the deviation exceeds ``tol`` (the message names ``--format onnx``).
        NotFittedError: ``method`` is not fitted.
    """
    check_is_fitted(method)
    found = []
    for dtype in (torch.float64, torch.float32):
        try:
            weight, bias, deviation, scale = _recover(method, dtype)
        except RuntimeError:
            # the method's maths casts to float32 itself (normalize_rows does), so a float64
            # copy mixes dtypes; it is judged in float32 below
            continue
        if deviation <= tol * scale:
            return weight.float(), bias.float(), deviation
        found.append((deviation, tol * scale))
    deviation, limit = min(found, default=(float("nan"), tol))
    raise NotLinearError(
        f"{method.card.name} is not a linear head on the features (a linear fit of its logits is "
        f"off by {deviation:.3g} on probe features, tolerance {limit:.3g}); export it with "
        "--format onnx instead"
    )


def _recover(method: Adapter, dtype: torch.dtype) -> tuple[Tensor, Tensor, float, float]:
    """(W, b, max deviation on the probe rows, tolerance scale) evaluated in ``dtype``.

    In float64 the tolerance is absolute; in float32 it is relative to the largest logit
    (float32 rounds a logit of 100 to about 1e-5 already)."""
    dim = int(method.dim_)
    frozen = frozen_copy(method, dtype=dtype)
    eye = torch.eye(dim, dtype=dtype)
    probe = _probe_rows(frozen, dim, dtype)
    with torch.no_grad():
        plus, minus, observed = (frozen._logits(x) for x in (eye, -eye, probe))
    plus, minus, observed = plus.double(), minus.double(), observed.double()
    weight = ((plus - minus) / 2).T.contiguous()
    bias = ((plus + minus) / 2).mean(dim=0)
    deviation = float((probe.double() @ weight.T + bias - observed).abs().max())
    scale = 1.0 if dtype == torch.float64 else max(1.0, float(observed.abs().max()))
    return weight, bias, deviation, scale


def _probe_rows(method: Adapter, dim: int, dtype: torch.dtype) -> Tensor:
    """Unit rows to verify a recovered head on: random directions, and the method's own
    fitted (·, D) tensors (cache keys, prototypes, text weights) with mixtures of them.

    Random directions alone are nearly orthogonal to everything fitted, where a sharp cache
    term such as ``exp(-β (1 - x·k))`` is almost constant and would pass for linear; at and
    between the fitted rows it is not.
    """
    rows = [random_unit_features(CHECK_ROWS, dim, seed=7, dtype=dtype)]
    for key, value in sorted(vars(method).items()):
        if key.endswith("_") and isinstance(value, Tensor) and value.is_floating_point():
            if value.ndim >= 2 and value.shape[-1] == dim:
                rows.append(value.detach().reshape(-1, dim)[:CHECK_ROWS].to(dtype))
    fitted = torch.cat(rows[1:]) if len(rows) > 1 else rows[0]
    generator = torch.Generator().manual_seed(8)
    pairs = torch.randint(0, fitted.shape[0], (2, CHECK_ROWS), generator=generator)
    rows.append(fitted[pairs[0]] + fitted[pairs[1]])
    probe = torch.cat(rows)
    keep = probe.norm(dim=-1) > 1e-6  # zero rows (e.g. a class without support) say nothing
    probe = probe[keep]
    return probe / probe.norm(dim=-1, keepdim=True)


def is_linear(method: Adapter, *, tol: float = LINEAR_TOL) -> bool:
    """Whether :func:`linear_head` succeeds for this fitted method."""
    try:
        linear_head(method, tol=tol)
    except NotLinearError:
        return False
    return True


def export_linear(
    method: Adapter, path: str | Path, classnames: list[str] | None = None
) -> dict[str, Any]:
    """Write a linear method's head as safetensors ``weight`` (C, D) + ``bias`` (C,).

    Args:
        method: a fitted method whose logits are linear in the normalised features.
        path: the ``.safetensors`` file to write (atomically).
        classnames: C names in label order (default ``class_i``), stored in the metadata.

    Returns:
        A summary: ``path``, ``max_abs_error`` (float32 head vs ``Adapter.logits``),
        ``linearity_error`` (float64), ``metadata``.

    Raises:
        NotLinearError: the method is not linear (use :func:`export_onnx`).

    Example:
        >>> export_linear(clipadapt.load("adapters/zs"), "head.safetensors")  # doctest: +SKIP
    """
    weight, bias, deviation = linear_head(method)
    classnames = classnames or [f"class_{i}" for i in range(weight.shape[0])]
    x = random_unit_features(CHECK_ROWS, weight.shape[1], seed=11)
    error = float((x @ weight.T + bias - reference_logits(method, x)).abs().max())
    metadata = base_metadata(method, classnames)
    metadata.update(
        {
            "format": "clipadapt-linear-head",
            "input": "L2-normalised image features (N, D) of the adapter's backbone; "
            "logits = features @ weight.T + bias",
            "max_abs_error": f"{error:.3g}",
            "linearity_error": f"{deviation:.3g}",
        }
    )
    with atomic_path(path) as tmp:
        save_file({"weight": weight, "bias": bias}, str(tmp), metadata=metadata)
    return {
        "path": str(path),
        "format": "linear",
        "max_abs_error": error,
        "linearity_error": deviation,
        "metadata": metadata,
    }
