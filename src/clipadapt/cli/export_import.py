"""``clipadapt export`` and ``clipadapt import {tip-adapter,arrays}``.

The main command line calls :func:`register_cli` to add both verbs. Handlers (set as
``handler`` on the parsed namespace) call :mod:`clipadapt.export` and
:mod:`clipadapt.data.importers`, print a short summary and return an exit code; user errors
raise :class:`~clipadapt.exceptions.ClipadaptError` subclasses, which the main entry point
prints on one line with exit code 2. Nothing heavy is imported until a handler runs.
"""

from __future__ import annotations

import argparse
from typing import Any

EXPORT_EXAMPLE = """Example:
  clipadapt export --adapter adapters/tip --format onnx --with-encoder --out tip.onnx"""

IMPORT_EXAMPLE = """Example:
  clipadapt import arrays --npz features.npz --out feats/mine.safetensors"""

TIP_EXAMPLE = """Example:
  clipadapt import tip-adapter --cache-dir caches/dtd --text-features dtd_text.pt \\
      --classnames dtd_classes.txt --out feats/dtd.safetensors"""

ARRAYS_EXAMPLE = """Example:
  clipadapt import arrays --group train train_x.npy train_y.npy \\
      --group test test_x.npy test_y.npy --text-features text.npy --out feats/mine.safetensors"""


def _write_json(path: str | None, obj: Any) -> None:
    if path:
        from clipadapt._utils import atomic_write_json

        atomic_write_json(path, obj)


def _classnames(path: str | None) -> list[str] | None:
    if path is None:
        return None
    from clipadapt.data.importers import read_classnames

    return read_classnames(path)


def _export(args: argparse.Namespace) -> int:
    from clipadapt.cli._common import require_adapter

    require_adapter(args.adapter)  # before torch is imported
    from clipadapt.export import export_adapter

    summary = export_adapter(
        args.adapter,
        args.out,
        args.format,
        with_encoder=args.with_encoder,
        classnames=_classnames(args.classnames),
        backbone=args.backbone,
        checkpoint=args.checkpoint,
    )
    print(
        f"{summary['method']} -> {summary['path']} ({args.format}); "
        f"max |exported - adapter logits| {summary['max_abs_error']:.2g}"
    )
    print(f"input: {summary['metadata']['input']}")
    print(f"class names: {summary['classnames_source']}")
    _write_json(args.json, summary)
    return 0


def _bundle_summary(bundle: Any, out: str) -> dict[str, Any]:
    groups = {g: int(bundle.tensors[f"{g}_labels"].shape[0]) for g in bundle.groups()}
    counts = ", ".join(f"{g} {n}" for g, n in groups.items())
    text = "text features" if bundle.has_text() else "no text features"
    print(f"{out}: {bundle.num_classes} classes, D={bundle.dim}; {counts}; {text}")
    return {
        "bundle": out,
        "classes": bundle.num_classes,
        "dim": bundle.dim,
        "groups": groups,
        "text_features": bundle.has_text(),
    }


def _import_tip(args: argparse.Namespace) -> int:
    from clipadapt.cli._common import require_path

    require_path(args.cache_dir, "--cache-dir", "folder")  # before torch is imported
    from clipadapt.data.importers import import_tip_adapter

    bundle = import_tip_adapter(
        args.cache_dir,
        args.out,
        shots=args.shots,
        text_features=args.text_features,
        classnames=args.classnames,
        backbone=args.backbone,
    )
    _write_json(args.json, _bundle_summary(bundle, args.out))
    return 0


def _import_arrays(args: argparse.Namespace) -> int:
    from clipadapt.cli._common import require_path
    from clipadapt.exceptions import ConfigError

    # files are checked before numpy and torch are imported (FILE.npz:KEY names FILE.npz)
    for given in [args.npz, args.text_features, *(f for g in args.group or [] for f in g[1:])]:
        if given is not None:
            file = given.split(".npz:")[0] + ".npz" if ".npz:" in given else given
            require_path(file, "file", missing=f"{file}: file not found")
    from clipadapt.data.importers import import_arrays

    if not args.group and not args.npz:
        raise ConfigError("give the arrays: --group NAME FEATURES LABELS (repeat it) or --npz FILE")
    groups: dict[str, tuple[str, str]] = {}
    for name, features, labels in args.group or []:
        if name in groups:
            raise ConfigError(f"--group {name} is given twice")
        groups[name] = (features, labels)
    bundle = import_arrays(
        args.out,
        groups=groups,
        npz=args.npz,
        text_features=args.text_features,
        classnames=args.classnames,
        backbone=args.backbone,
    )
    _write_json(args.json, _bundle_summary(bundle, args.out))
    return 0


def register_cli(subparsers: Any) -> None:
    """Add the ``export`` verb and the ``import`` group (``tip-adapter``, ``arrays``)."""
    raw = argparse.RawDescriptionHelpFormatter

    p = subparsers.add_parser(
        "export",
        help="write a saved adapter as an ONNX graph or a linear head",
        description="Export a saved adapter for use outside clipadapt. --format onnx works for "
        "every method: a graph from image features (N, D) to class logits, or with "
        "--with-encoder from uint8 RGB images (N, 3, H, W) to logits (resize, crop, normalise "
        "and the image tower inside). --format linear writes weight (C, D) and bias (C) as "
        "safetensors for methods whose prediction is a linear head on the normalised features. "
        "Class names go into the file's metadata. Every export is checked against the "
        "adapter's own logits before it is written.",
        epilog=EXPORT_EXAMPLE,
        formatter_class=raw,
    )
    p.add_argument("--adapter", required=True, help="saved adapter folder (clipadapt fit --out)")
    p.add_argument(
        "--format", choices=("onnx", "linear"), default="onnx", help="output format (default onnx)"
    )
    p.add_argument(
        "--with-encoder",
        action="store_true",
        help="onnx only: include the image tower and its preprocessing",
    )
    p.add_argument(
        "--backbone",
        help="backbone for --with-encoder (default: the one recorded with the adapter), "
        "e.g. world or ViT-B-32:openai",
    )
    p.add_argument("--checkpoint", help="local weights file for --backbone ARCH")
    p.add_argument(
        "--classnames",
        help="class names in label order, a JSON list or one per line (default: those saved "
        "with the adapter, else class_0 ...)",
    )
    p.add_argument("--out", required=True, help="file to write (.onnx or .safetensors)")
    p.add_argument("--json", help="write a JSON summary here")
    p.set_defaults(handler=_export)

    imp = subparsers.add_parser(
        "import",
        help="convert features made elsewhere into a feature bundle",
        description="Convert features made by other tools into a validated clipadapt feature "
        "bundle. Only data is read: torch files weights-only, numpy files without pickle.",
        epilog=IMPORT_EXAMPLE,
        formatter_class=raw,
    )
    sub = imp.add_subparsers(dest="import_kind", metavar="KIND", required=True)

    p = sub.add_parser(
        "tip-adapter",
        help="a Tip-Adapter cache folder (keys_Kshots.pt, values_Kshots.pt, val/test _f/_l.pt)",
        description="Convert Tip-Adapter's cache folder: keys_{K}shots.pt (D, N) and "
        "values_{K}shots.pt (N, C) one-hot become train_{K}shot_features/labels, "
        "{val,test}_f.pt / _l.pt become val_* and test_*. Tip-Adapter does not cache its "
        "text classifier: pass it with --text-features to fit methods that use text.",
        epilog=TIP_EXAMPLE,
        formatter_class=raw,
    )
    p.add_argument("--cache-dir", required=True, help="the Tip-Adapter cache folder")
    p.add_argument("--shots", type=int, help="import only this K (default: every K present)")
    p.add_argument(
        "--text-features",
        help="class text features, (D, C) as Tip-Adapter's clip_classifier returns or (C, D): "
        ".pt (weights-only), .npy or FILE.npz:KEY",
    )
    p.add_argument("--classnames", help="class names in label order (JSON list or one per line)")
    p.add_argument("--backbone", help="backbone name to record in the bundle (e.g. RN50)")
    p.add_argument("--out", required=True, help="bundle file to write (.safetensors)")
    p.add_argument("--json", help="write a JSON summary here")
    p.set_defaults(handler=_import_tip)

    p = sub.add_parser(
        "arrays",
        help="numpy arrays (.npy files or one .npz)",
        description="Convert numpy features and labels into a bundle. Give each group "
        "(train, val, test, train_4shot, ...) as --group NAME FEATURES LABELS, or one .npz "
        "whose arrays are named like bundle tensors (train_features, train_labels, "
        "text_features, classnames as a string array). Features are (N, D) floats, labels "
        "class indices (N,) or one-hot (N, C); FILE.npz:KEY picks one array of an .npz.",
        epilog=ARRAYS_EXAMPLE,
        formatter_class=raw,
    )
    p.add_argument(
        "--group",
        nargs=3,
        action="append",
        metavar=("NAME", "FEATURES", "LABELS"),
        help="one labelled group; repeat for each group",
    )
    p.add_argument("--npz", help="an .npz holding arrays named like bundle tensors")
    p.add_argument("--text-features", help="class text features (C, D): .npy or FILE.npz:KEY")
    p.add_argument("--classnames", help="class names in label order (JSON list or one per line)")
    p.add_argument("--backbone", help="backbone name to record in the bundle")
    p.add_argument("--out", required=True, help="bundle file to write (.safetensors)")
    p.add_argument("--json", help="write a JSON summary here")
    p.set_defaults(handler=_import_arrays)
