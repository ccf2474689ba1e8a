"""Export checks: a method's ONNX graph and (when linear) its linear head reproduce its logits.

Like the shared suite (:mod:`clipadapt.testing.checks`), the checks take a registry name and
fit it on the suite's fixture (:func:`clipadapt.testing.make_fixture`: C=5, D=32), so a new
method is covered the moment it is registered (``tests/test_export.py`` parametrises over
:func:`clipadapt.list_methods`). Prompt-learning methods (``text_encoder`` in their needs) get a
tiny randomly initialised open_clip text tower, built offline.

Public API:
    - :func:`check_onnx_parity` ``(method_name, params=None)``: export to ONNX, run it with
      onnxruntime on the fixture's rows, compare with ``Adapter.logits``
      (:func:`onnx_parity` does the same for any fitted method and rows);
    - :func:`check_linear_export` ``(method_name, params=None)``: export the linear head when the
      method is linear (and check it), or check the error that names ``--format onnx``;
    - :func:`fit_on_fixture`, :func:`tiny_text_tower`: the fitted subjects of both checks.
"""

from __future__ import annotations

import functools
import json
import logging
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from clipadapt.methods.base import Adapter, create_method, method_card
from clipadapt.testing.checks import CheckFixture, make_fixture

#: The largest tolerated |exported logits - Adapter.logits| (float32 logits of scale ~100).
EXPORT_ATOL = 1e-4

_TINY_TOWER = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 16, "head_width": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}
_TINY_NAME = "clipadapt-export-check-tiny"


@functools.lru_cache(maxsize=1)
def tiny_text_tower() -> Any:
    """A tiny open_clip CLIP's frozen text tower (width 32 = the fixture's D), seeded, offline.

    Returns:
        A :class:`clipadapt.encoders.clip.TextTower` (the same one for every call).
    """
    import open_clip

    from clipadapt.encoders.clip import TextTower

    with tempfile.TemporaryDirectory(prefix="clipadapt-export-tower-") as tmp:
        # open_clip reads the config when it is added and keeps it after the folder is gone
        (Path(tmp) / f"{_TINY_NAME}.json").write_text(json.dumps(_TINY_TOWER), encoding="utf-8")
        open_clip.add_model_config(tmp)
    # random weights are the point here: silence open_clip's "no pretrained weights" warning
    logging.disable(logging.WARNING)
    try:
        with torch.random.fork_rng():
            torch.manual_seed(0)
            model = open_clip.create_model(_TINY_NAME)
    finally:
        logging.disable(logging.NOTSET)
    return TextTower.from_open_clip(model.eval(), open_clip.get_tokenizer(_TINY_NAME))


# fitted subjects shared by the checks (they only read them), keyed by (name, params)
_FITTED: dict[tuple[str, str], tuple[CheckFixture, Adapter]] = {}


def fit_on_fixture(
    method_name: str, params: Mapping[str, Any] | None = None
) -> tuple[CheckFixture, Adapter]:
    """Fit ``method_name`` on the check-suite fixture as the method is meant to run.

    Image-only methods are fitted without text, prompt learners with :func:`tiny_text_tower`.
    The result is shared between calls with the same arguments; callers must not modify it.

    Returns:
        (the fixture, the fitted method).
    """
    key = (method_name, repr(sorted(dict(params or {}).items())))
    if key not in _FITTED:
        _FITTED[key] = _fit(method_name, params)
    return _FITTED[key]


def _fit(method_name: str, params: Mapping[str, Any] | None) -> tuple[CheckFixture, Adapter]:
    card = method_card(method_name)
    tower = tiny_text_tower() if "text_encoder" in card.needs else None
    fx = make_fixture(text_encoder=tower)
    method = create_method(method_name, **dict(params or {}))
    method.fit(fx.train, fx.text if card.needs_text else None, fx.val)
    return fx, method


def _rows(fx: CheckFixture) -> Tensor:
    """Evaluation-like rows: the fixture's test and val features, and the same rows scaled
    (un-normalised), which the exported graph must normalise itself."""
    rows = torch.cat([fx.test.features, fx.val.features])
    return torch.cat([rows, 3.0 * rows[:7]])


def onnx_parity(
    method: Adapter,
    rows: Tensor,
    classnames: list[str] | None = None,
    *,
    atol: float = EXPORT_ATOL,
) -> dict[str, Any]:
    """Export a fitted method to ONNX and compare onnxruntime with ``Adapter.logits`` on ``rows``.

    Checks: batches of 1 row, 2 rows and all rows (the batch axis is dynamic) within ``atol``;
    the graph's input and output names and shapes; the metadata's class names, method name and
    feature width.

    Returns:
        ``{"max_abs_error": ..., "rows": ...}``.

    Raises:
        AssertionError: naming the check and the difference found.
    """
    import numpy as np

    from clipadapt.export import export_onnx, read_onnx_metadata
    from clipadapt.export.onnx_export import onnx_session

    name = method.card.name
    names = classnames or [f"label {i}" for i in range(int(method.n_classes_))]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"{name}.onnx"
        export_onnx(method, path, names)
        metadata = read_onnx_metadata(path)
        session = onnx_session(path)
    assert json.loads(metadata["classnames"]) == names, "check_onnx_parity: class names lost"
    assert metadata["method"] == name, "check_onnx_parity: method name lost"
    assert metadata["feature_dim"] == str(rows.shape[1]), "check_onnx_parity: width lost"
    (inp,), (out,) = session.get_inputs(), session.get_outputs()
    assert (inp.name, out.name) == ("features", "logits"), (inp.name, out.name)
    assert inp.shape[1] == rows.shape[1] and not isinstance(inp.shape[0], int), inp.shape
    worst = 0.0
    for batch in (rows[:1], rows[1:3], rows):
        got = session.run(None, {"features": batch.float().numpy()})[0]
        want = method.logits(batch).numpy()
        assert got.shape == want.shape, f"check_onnx_parity: shape {got.shape} != {want.shape}"
        worst = max(worst, float(np.abs(got - want).max()))
    assert worst <= atol, (
        f"check_onnx_parity: {name}'s ONNX logits differ from Adapter.logits by "
        f"{worst:.3g} > {atol:g}"
    )
    return {"max_abs_error": worst, "rows": int(rows.shape[0])}


def check_onnx_parity(
    method_name: str,
    params: Mapping[str, Any] | None = None,
    *,
    atol: float = EXPORT_ATOL,
) -> dict[str, Any]:
    """Fit ``method_name`` on the fixture and run :func:`onnx_parity` on the fixture's test and
    val rows (and some of them scaled, which the graph must normalise itself)."""
    fx, method = fit_on_fixture(method_name, params)
    return onnx_parity(method, _rows(fx), atol=atol)


def check_linear_export(
    method_name: str, params: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """Export the fitted method's linear head, or check the error for a non-linear method.

    A linear method's file must hold ``weight`` (C, D) and ``bias`` (C,) that reproduce
    ``Adapter.logits`` on the fixture's rows (``normalize(x) @ weight.T + bias``) within
    :data:`EXPORT_ATOL`, with the class names in its metadata. A non-linear method must fail
    with :class:`~clipadapt.export.NotLinearError` whose message names ``--format onnx``.

    Returns:
        ``{"linear": bool, "max_abs_error": float | None}``.

    Raises:
        AssertionError: naming the check and what was wrong.
    """
    from safetensors import safe_open

    from clipadapt.export import NotLinearError, export_linear

    fx, method = fit_on_fixture(method_name, params)
    names = [f"label {i}" for i in range(fx.num_classes)]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "head.safetensors"
        try:
            export_linear(method, path, names)
        except NotLinearError as error:
            assert "--format onnx" in str(error), f"check_linear_export: {error}"
            assert not path.exists(), "check_linear_export: a file was left after the error"
            return {"linear": False, "max_abs_error": None}
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata()
            weight, bias = handle.get_tensor("weight"), handle.get_tensor("bias")
            assert set(handle.keys()) == {"weight", "bias"}, list(handle.keys())
    assert weight.shape == (fx.num_classes, fx.dim) and bias.shape == (fx.num_classes,)
    assert json.loads(metadata["classnames"]) == names, "check_linear_export: class names lost"
    rows = _rows(fx)
    x = rows / rows.norm(dim=-1, keepdim=True)
    error = float((x @ weight.T + bias - method.logits(rows)).abs().max())
    assert error <= EXPORT_ATOL, (
        f"check_linear_export: {method_name}'s linear head differs from Adapter.logits by "
        f"{error:.3g} > {EXPORT_ATOL:g}"
    )
    return {"linear": True, "max_abs_error": error}
