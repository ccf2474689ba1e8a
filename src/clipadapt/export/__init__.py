"""Use a fitted adapter outside clipadapt: ONNX graphs and linear heads (``docs/deploy.md``).

- :func:`export_onnx`: the adapter's logits for any registered method as an ONNX graph on
  image features, or with ``encoder=`` on uint8 images (tower and preprocessing included);
- :func:`export_linear`: ``weight`` (C, D) + ``bias`` (C,) as safetensors, for methods whose
  prediction is a linear head on the normalised features (checked, see :func:`linear_head`);
- :func:`export_adapter`: either one from a saved adapter folder, with class names and the
  backbone read from what was saved beside it (what ``clipadapt export`` calls).

Every export is verified against :meth:`clipadapt.Adapter.logits` before it is written.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from clipadapt.exceptions import ConfigError
from clipadapt.export._common import (
    ExportError,
    FeatureLogits,
    adapter_backbone_record,
    adapter_classnames,
    frozen_copy,
)
from clipadapt.export.linear import NotLinearError, export_linear, is_linear, linear_head
from clipadapt.export.onnx_export import export_onnx, read_onnx_metadata

FORMATS = ("onnx", "linear")

__all__ = [
    "FORMATS",
    "ExportError",
    "FeatureLogits",
    "NotLinearError",
    "adapter_backbone_record",
    "adapter_classnames",
    "export_adapter",
    "export_linear",
    "export_onnx",
    "frozen_copy",
    "is_linear",
    "linear_head",
    "read_onnx_metadata",
]


def _encoder_for(directory: Path, backbone: str | None, checkpoint: str | None) -> tuple[Any, str]:
    from clipadapt.encoders.clip import ClipEncoder, backbone_from_record, resolve_backbone

    if backbone is not None:
        spec = resolve_backbone(backbone, checkpoint)
    else:
        record = adapter_backbone_record(directory)
        if record is None:
            raise ConfigError(
                f"{directory}: no backbone is recorded with this adapter; pass --backbone "
                "(e.g. --backbone world, or ARCH:TAG, or ARCH --checkpoint FILE)"
            )
        spec = backbone_from_record(record)
    # float32 on the CPU: the export is traced and checked there
    return ClipEncoder(spec, device="cpu", precision="fp32"), spec.display_name


def export_adapter(
    adapter: str | Path,
    out: str | Path,
    format: str = "onnx",
    *,
    with_encoder: bool = False,
    classnames: list[str] | None = None,
    backbone: str | None = None,
    checkpoint: str | None = None,
) -> dict[str, Any]:
    """Export a saved adapter folder (``clipadapt fit --out DIR``) to ``out``.

    Args:
        adapter: the adapter folder (``config.json`` + ``state.safetensors``).
        out: the file to write (``.onnx`` or ``.safetensors``).
        format: ``"onnx"`` (every method) or ``"linear"`` (linear heads only).
        with_encoder: ONNX only: include the image tower and its preprocessing.
        classnames: explicit class names; default: saved with the adapter, else ``class_i``.
        backbone, checkpoint: the backbone for ``with_encoder`` (default: the one recorded
            with the adapter).

    Returns:
        The summary of :func:`export_onnx` / :func:`export_linear`, plus ``method``,
        ``classnames_source``.

    Raises:
        ConfigError: an unknown format, ``with_encoder`` with ``linear``, bad class names, no
            backbone known; :class:`NotLinearError` for a non-linear method with ``linear``.
        CheckpointError: the folder is not a saved adapter.
        ExportError: the export does not reproduce the adapter's logits.
    """
    from clipadapt.methods.base import load

    if format not in FORMATS:
        raise ConfigError(f"unknown export format {format!r}; choose one of {', '.join(FORMATS)}")
    if with_encoder and format != "onnx":
        raise ConfigError("--with-encoder needs --format onnx (a linear head has no image tower)")
    directory = Path(adapter)
    method = load(directory)
    names, source = adapter_classnames(directory, int(method.n_classes_), classnames)
    if format == "linear":
        summary = export_linear(method, out, names)
    else:
        encoder, backbone_name = (None, None)
        if with_encoder:
            encoder, backbone_name = _encoder_for(directory, backbone, checkpoint)
        summary = export_onnx(method, out, names, encoder=encoder, backbone=backbone_name)
    summary.update({"method": method.card.name, "classnames_source": source})
    return summary
