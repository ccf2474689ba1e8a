"""Export a fitted adapter's logits as an ONNX graph (optionally with the image tower).

Two graphs:

- **features** (default): input ``features`` float32 (N, D), image features from the adapter's
  backbone (raw or normalised: the graph L2-normalises them); output ``logits`` float32 (N, C).
- **image** (``encoder=...``): input ``image`` uint8 (N, 3, H, W) RGB, any H and W (one size per
  call); the graph resizes, centre-crops and normalises it as clipadapt's extraction does
  (:mod:`clipadapt.export.preprocess`), runs the image tower in float32, normalises the feature
  and applies the adapter; output ``logits`` float32 (N, C).

The adapter part is a trace of the method's own ``_logits`` on its fitted tensors
(:class:`~clipadapt.export._common.FeatureLogits`), recorded with PyTorch's TorchScript-based
ONNX exporter: Python decisions that depend only on fitted state (a cache's class layout, a
fusion weight of 0) are taken once at export, and every tensor operation is recorded with the
batch axis dynamic. Every export is then checked with onnxruntime against
:meth:`clipadapt.Adapter.logits` at several batch sizes and fails with :class:`ExportError` when
the largest difference exceeds ``atol``.

Metadata (``metadata_props``): ``classnames`` (JSON list in label order), ``method``,
``clipadapt_version``, ``feature_dim``, ``num_classes``, ``params`` (JSON), ``input``,
``output``, ``max_abs_error`` (the check's result), and with the encoder ``backbone``,
``image_size``, ``mean``, ``std``.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from clipadapt._utils import atomic_write_bytes
from clipadapt.exceptions import ConfigError
from clipadapt.export._common import (
    ExportError,
    FeatureLogits,
    base_metadata,
    frozen_copy,
    l2_normalize,
    random_unit_features,
    reference_logits,
)
from clipadapt.export.preprocess import IMAGE_INPUT, PIXELS, preprocessing_model
from clipadapt.methods.base import Adapter

log = logging.getLogger(__name__)

#: ONNX opset of every export (18: ``Resize`` with antialiasing and ``axes``).
OPSET = 18
#: The default tolerance of the export check, in logits.
ATOL = 1e-4
#: Batch sizes the export check runs (1 and odd sizes catch a batch size baked into a trace).
CHECK_BATCHES = (1, 3, 17)

FEATURES_INPUT = "features"
LOGITS_OUTPUT = "logits"


def require_onnx() -> None:
    """Raise a one-line ConfigError naming the extra to install when onnx is missing."""
    missing = []
    for name in ("onnx", "onnxruntime"):
        try:
            __import__(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise ConfigError(
            f"ONNX export needs {' and '.join(missing)}; install them with "
            "pip install 'clipadapt[export]'"
        )


class ImageLogits(nn.Module):
    """``(N, 3, S, S) normalised pixels -> (N, C) logits`` with a CLIP image tower.

    Args:
        encoder: a :class:`clipadapt.encoders.clip.ClipEncoder` (its model is deep-copied to the
            CPU in float32; the encoder is untouched).
        method: the fitted method.
    """

    def __init__(self, encoder: Any, method: Adapter) -> None:
        super().__init__()
        self.visual = copy.deepcopy(encoder.model.visual).float().cpu().eval()
        self.visual.requires_grad_(False)
        self.method = frozen_copy(method)

    def forward(self, pixels: Tensor) -> Tensor:
        # open_clip's encode_image is the visual tower's forward; normalised as clipadapt does
        return self.method._logits(l2_normalize(self.visual(pixels))).float()


@contextlib.contextmanager
def _symbolics() -> Iterator[None]:
    """Temporarily teach the TorchScript exporter ``aten::logaddexp`` (used by HeGraphAdapter's
    probability fusion), as ``max(a, b) + log(1 + exp(-|a - b|))``, the stable form."""
    from torch.onnx import register_custom_op_symbolic, unregister_custom_op_symbolic

    def logaddexp(g: Any, a: Any, b: Any) -> Any:
        top = g.op("Max", a, b)
        gap = g.op("Neg", g.op("Abs", g.op("Sub", a, b)))
        one = g.op("Constant", value_t=torch.tensor(1.0))
        return g.op("Add", top, g.op("Log", g.op("Add", one, g.op("Exp", gap))))

    register_custom_op_symbolic("aten::logaddexp", logaddexp, OPSET)
    try:
        yield
    finally:
        unregister_custom_op_symbolic("aten::logaddexp", OPSET)


@contextlib.contextmanager
def _no_attention_fastpath() -> Iterator[None]:
    """Frozen ``nn.MultiheadAttention`` (a ViT tower) takes a fused inference kernel that the
    exporter cannot translate; the unfused path computes the same attention."""
    enabled = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(enabled)


def _trace_to_onnx(module: nn.Module, example: Tensor, input_name: str) -> Any:
    """Trace ``module`` on ``example`` into an ``onnx.ModelProto`` with a dynamic batch axis."""
    import onnx

    buffer = io.BytesIO()
    with warnings.catch_warnings(), _symbolics(), _no_attention_fastpath():
        # the TorchScript exporter is deprecated in favour of torch.export, which cannot run
        # methods that branch in Python on their fitted tensors (e.g. Tip-Adapter's cache
        # layout); tracer warnings about such branches are expected, and the onnxruntime check
        # below is what proves the graph right at other batch sizes
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", UserWarning)
        # autograd stays on (nothing requires grad): methods that reuse buffers in place only
        # when gradients are off would otherwise record out= operations ONNX cannot express
        torch.onnx.export(
            module,
            (example,),
            buffer,
            dynamo=False,
            input_names=[input_name],
            output_names=[LOGITS_OUTPUT],
            dynamic_axes={input_name: {0: "batch"}, LOGITS_OUTPUT: {0: "batch"}},
            opset_version=OPSET,
            do_constant_folding=True,
        )
    return onnx.load_from_string(buffer.getvalue())


def onnx_session(model: bytes | str | Path) -> Any:
    """An onnxruntime CPU session for a serialised model or an ``.onnx`` path."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    source = str(model) if isinstance(model, Path) else model
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def max_feature_error(session: Any, method: Adapter, features: Tensor) -> float:
    """Largest |onnxruntime logits - Adapter.logits| over ``features`` (N, D)."""
    expected = reference_logits(method, features).numpy()
    got = session.run(None, {FEATURES_INPUT: features.cpu().float().numpy()})[0]
    if got.shape != expected.shape:
        raise ExportError(
            f"the ONNX graph gave logits of shape {got.shape}, expected {expected.shape}"
        )
    return float(abs(got - expected).max()) if expected.size else 0.0


def _set_metadata(model: Any, metadata: dict[str, str]) -> None:
    from onnx import helper

    del model.metadata_props[:]
    helper.set_model_props(model, metadata)
    model.producer_name = "clipadapt"
    model.doc_string = metadata.get("input", "")


def read_onnx_metadata(path: str | Path) -> dict[str, str]:
    """The ``metadata_props`` of an ONNX file as a dict (``classnames`` is a JSON list)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return {prop.key: prop.value for prop in model.metadata_props}


def export_onnx(
    method: Adapter,
    path: str | Path,
    classnames: list[str] | None = None,
    *,
    encoder: Any = None,
    backbone: str | None = None,
    atol: float = ATOL,
) -> dict[str, Any]:
    """Write ``method``'s logits as an ONNX model and check it with onnxruntime.

    Args:
        method: a fitted method (any registered one).
        path: the ``.onnx`` file to write (atomically).
        classnames: C names in label order (default ``class_i``).
        encoder: a :class:`clipadapt.encoders.clip.ClipEncoder` to include the image tower and
            its preprocessing (input ``image`` uint8 (N, 3, H, W)); None: input ``features``.
        backbone: a description of the backbone for the metadata (default: the encoder's).
        atol: the largest tolerated |ONNX - Adapter.logits| in the check.

    Returns:
        A summary: ``path``, ``input``, ``max_abs_error``, ``checked_batches``, ``metadata``.

    Raises:
        ConfigError: onnx/onnxruntime are not installed, or the encoder's feature width is not
            the adapter's.
        ExportError: the exported graph differs from ``Adapter.logits`` by more than ``atol``.
        NotFittedError: ``method`` is not fitted.

    Example:
        >>> method = clipadapt.load("adapters/tip")  # doctest: +SKIP
        >>> export_onnx(method, "tip.onnx", classnames)  # doctest: +SKIP
    """
    require_onnx()
    classnames = classnames or [f"class_{i}" for i in range(int(getattr(method, "n_classes_", 0)))]
    metadata = base_metadata(method, classnames)
    dim = int(method.dim_)
    if encoder is None:
        module: nn.Module = FeatureLogits(method)
        model = _trace_to_onnx(module, random_unit_features(2, dim, seed=1), FEATURES_INPUT)
        metadata["input"] = (
            f"{FEATURES_INPUT}: float32 (N, {dim}) image features of the adapter's backbone "
            "(L2-normalised inside the graph)"
        )
    else:
        model = _image_model(method, encoder, metadata, backbone)
    metadata["output"] = f"{LOGITS_OUTPUT}: float32 (N, {len(classnames)}) class logits"
    _set_metadata(model, metadata)
    data = model.SerializeToString()
    error, batches = _check(data, method, encoder, atol)
    metadata["max_abs_error"] = f"{error:.3g}"
    _set_metadata(model, metadata)
    atomic_write_bytes(path, model.SerializeToString())
    log.info("wrote %s (max |onnx - logits| %.3g)", path, error)
    return {
        "path": str(path),
        "format": "onnx",
        "input": metadata["input"],
        "max_abs_error": error,
        "checked_batches": list(batches),
        "metadata": metadata,
    }


def _image_model(
    method: Adapter, encoder: Any, metadata: dict[str, str], backbone: str | None
) -> Any:
    import onnx

    if getattr(encoder, "precision", "fp32") != "fp32":
        raise ConfigError(
            "export the image tower from an encoder in float32 "
            "(ClipEncoder(spec, device='cpu', precision='fp32')); the graph runs in float32"
        )
    size = int(encoder.image_size)
    with torch.no_grad():
        probe = encoder.encode_images(torch.zeros(1, 3, size, size))
    if probe.shape[1] != int(method.dim_):
        raise ConfigError(
            f"the backbone's features are {probe.shape[1]}-wide but the adapter was fitted on "
            f"{int(method.dim_)}-wide features; pass the backbone the adapter's bundle was "
            "extracted with (--backbone/--checkpoint)"
        )
    example = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    tower = _trace_to_onnx(ImageLogits(encoder, method), example, PIXELS)
    pre = preprocessing_model(size, encoder.mean, encoder.std, OPSET, tower.ir_version)
    model = onnx.compose.merge_models(pre, tower, io_map=[(PIXELS, PIXELS)])
    onnx.checker.check_model(model)
    metadata.update(
        {
            "input": (
                f"{IMAGE_INPUT}: uint8 (N, 3, H, W) RGB, 0-255, any H and W (one size per call); "
                f"resized (shorter side {size}, bicubic), centre-cropped to {size}x{size} and "
                "normalised inside the graph"
            ),
            "backbone": backbone or encoder.backbone.display_name,
            "image_size": str(size),
            "mean": json.dumps(list(encoder.mean)),
            "std": json.dumps(list(encoder.std)),
        }
    )
    return model


def _check(data: bytes, method: Adapter, encoder: Any, atol: float) -> tuple[float, tuple]:
    """Run the exported graph with onnxruntime against the adapter; return the largest error."""
    session = onnx_session(data)
    worst = 0.0
    if encoder is None:
        for batch in CHECK_BATCHES:
            x = random_unit_features(batch, int(method.dim_), seed=100 + batch)
            worst = max(worst, max_feature_error(session, method, x))
    else:
        # random pixels at the tower's own size: the preprocessing is then exact (no resize),
        # so any difference is the graph's; other sizes are measured in tests/test_export.py
        size = int(encoder.image_size)
        for batch in CHECK_BATCHES[:2]:
            generator = torch.Generator().manual_seed(200 + batch)
            image = torch.randint(0, 256, (batch, 3, size, size), generator=generator)
            image = image.to(torch.uint8)
            expected = reference_image_logits(encoder, method, image)
            got = session.run(None, {IMAGE_INPUT: image.numpy()})[0]
            worst = max(worst, float(abs(got - expected.numpy()).max()))
    if not worst <= atol:  # also catches NaN
        raise ExportError(
            f"{method.card.name}: the exported graph differs from Adapter.logits by {worst:.3g} "
            f"(tolerance {atol:g}); this method cannot be exported faithfully, please report it"
        )
    return worst, CHECK_BATCHES if encoder is None else CHECK_BATCHES[:2]


def reference_image_logits(encoder: Any, method: Adapter, image: Tensor) -> Tensor:
    """clipadapt's own path for uint8 (N, 3, H, W) images: the clean view (PIL), the encoder
    in float32, ``Adapter.logits``; what the image graph is checked against."""
    from PIL import Image

    from clipadapt.features.transforms import CleanView

    view = CleanView(int(encoder.image_size), encoder.mean, encoder.std)
    pixels = torch.stack(
        [view(Image.fromarray(img.permute(1, 2, 0).contiguous().numpy(), "RGB")) for img in image]
    )
    return reference_logits(method, encoder.encode_images(pixels))
