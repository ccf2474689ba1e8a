"""clipadapt's clean view (resize, centre crop, normalise) as ONNX nodes, for ``--with-encoder``.

:class:`clipadapt.features.transforms.CleanView` resizes the shorter side to S with PIL's
bicubic filter, centre-crops S x S (torchvision's rounding) and normalises. The graph below does
the same on a uint8 image tensor of any size:

- output size: ``short -> S``, ``long -> floor(S * long / short)`` in double precision, as
  torchvision computes it;
- ONNX ``Resize`` in cubic mode with ``cubic_coeff_a=-0.5``, ``antialias=1`` and
  ``exclude_outside=1`` on uint8 pixels: PIL's filter (the antialiased Keys kernel with a = -0.5,
  weights renormalised at the borders, rounded back to 8 bits). onnxruntime's pixels equal
  PIL's when the size is kept; after a resize at most one grey level differs, on under 0.2 %
  of the pixels in the sizes measured by ``tests/test_export.py`` (fixed-point rounding);
- crop offsets ``round((size - S) / 2)`` with ``Round``'s half-to-even rule, which is Python's;
- ``(x / 255 - mean) / std`` in float32, the same operations in the same order as
  clipadapt's extraction (bitwise equal).

Input ``image``: uint8 (N, 3, H, W), RGB, any H and W (one size per call). Output ``pixels``:
float32 (N, 3, S, S), what the image tower takes.
"""

from __future__ import annotations

from typing import Any

#: Names of the preprocessing graph's input and output.
IMAGE_INPUT = "image"
PIXELS = "pixels"


def preprocessing_model(
    size: int,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    opset: int,
    ir_version: int,
) -> Any:
    """An ``onnx.ModelProto`` mapping ``image`` uint8 (N, 3, H, W) to ``pixels`` (N, 3, S, S).

    Args:
        size: S, the image tower's input side.
        mean, std: per-channel normalisation (3 values each).
        opset: ONNX opset (18 or later: ``Resize`` antialiasing and ``axes``).
        ir_version: the IR version of the model this graph is merged with.
    """
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    if opset < 18:
        raise ValueError(f"the preprocessing graph needs opset >= 18, got {opset}")
    nodes: list[Any] = []
    inits = []

    def const(name: str, value: Any, dtype: Any) -> str:
        inits.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
        return name

    def node(op: str, inputs: list[str], output: str, **attrs: Any) -> str:
        nodes.append(helper.make_node(op, inputs, [output], **attrs))
        return output

    s = const("pre_size", [size], np.int64)
    s_double = const("pre_size_f64", [float(size)], np.float64)
    two = const("pre_two", [2.0], np.float64)
    node("Shape", [IMAGE_INPUT], "pre_shape")
    h = node(
        "Slice",
        ["pre_shape", const("pre_2", [2], np.int64), const("pre_3", [3], np.int64)],
        "pre_h",
    )
    w = node("Slice", ["pre_shape", "pre_3", const("pre_4", [4], np.int64)], "pre_w")
    short = node("Min", [h, w], "pre_short")
    long = node("Max", [h, w], "pre_long")
    # torchvision: new_long = int(S * long / short), the product exact, the division in double
    scaled = node(
        "Mul", [node("Cast", [long], "pre_long_f64", to=TensorProto.DOUBLE), s_double], "pre_scaled"
    )
    ratio = node(
        "Div", [scaled, node("Cast", [short], "pre_short_f64", to=TensorProto.DOUBLE)], "pre_ratio"
    )
    new_long = node(
        "Cast", [node("Floor", [ratio], "pre_floor")], "pre_new_long", to=TensorProto.INT64
    )
    w_le_h = node("LessOrEqual", [w, h], "pre_w_le_h")
    new_h = node("Where", [w_le_h, new_long, s], "pre_new_h")
    new_w = node("Where", [w_le_h, s, new_long], "pre_new_w")
    sizes = node("Concat", [new_h, new_w], "pre_sizes", axis=0)
    resized = node(
        "Resize",
        [IMAGE_INPUT, "", "", sizes],
        "pre_resized",
        mode="cubic",
        cubic_coeff_a=-0.5,
        antialias=1,
        exclude_outside=1,
        coordinate_transformation_mode="half_pixel",
        axes=[2, 3],
    )

    def offset(extent: str, tag: str) -> str:
        # torchvision's int(round((extent - S) / 2.0)); ONNX Round is half-to-even like Python
        diff = node(
            "Cast",
            [node("Sub", [extent, s], f"pre_{tag}_diff")],
            f"pre_{tag}_diff_f64",
            to=TensorProto.DOUBLE,
        )
        half = node("Div", [diff, two], f"pre_{tag}_half")
        return node(
            "Cast", [node("Round", [half], f"pre_{tag}_round")], f"pre_{tag}", to=TensorProto.INT64
        )

    starts = node("Concat", [offset(new_h, "top"), offset(new_w, "left")], "pre_starts", axis=0)
    ends = node("Add", [starts, const("pre_size2", [size, size], np.int64)], "pre_ends")
    cropped = node(
        "Slice", [resized, starts, ends, const("pre_axes", [2, 3], np.int64)], "pre_cropped"
    )
    x = node("Cast", [cropped], "pre_float", to=TensorProto.FLOAT)
    x = node("Div", [x, const("pre_255", 255.0, np.float32)], "pre_unit")
    mean_t = const("pre_mean", np.asarray(mean, np.float32).reshape(1, -1, 1, 1), np.float32)
    std_t = const("pre_std", np.asarray(std, np.float32).reshape(1, -1, 1, 1), np.float32)
    x = node("Sub", [x, mean_t], "pre_centred")
    node("Div", [x, std_t], PIXELS)

    graph = helper.make_graph(
        nodes,
        "clipadapt_clean_view",
        [
            helper.make_tensor_value_info(
                IMAGE_INPUT, TensorProto.UINT8, ["batch", 3, "height", "width"]
            )
        ],
        [helper.make_tensor_value_info(PIXELS, TensorProto.FLOAT, ["batch", 3, size, size])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = ir_version
    onnx.checker.check_model(model)
    return model
