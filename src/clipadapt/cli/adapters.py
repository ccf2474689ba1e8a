"""``clipadapt fit``, ``evaluate``, ``run`` and ``predict``: saved adapters.

A saved adapter records where its features came from (class names, backbone, bundle fingerprint)
in its ``config.json`` (``Adapter.save(..., provenance=...)``), so ``clipadapt.load(dir)`` alone
names its classes and knows which backbone encodes new images. ``run.json`` beside it keeps the
run's result.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from clipadapt.cli._common import (
    CLASSNAMES_HELP,
    add_backbone_flags,
    add_classnames_flag,
    add_extract_flags,
    add_split_flags,
    example,
    named_bundle,
    positive_int,
    print_result,
    require_adapter,
    require_bundle,
    require_path,
    split_choice,
    write_json,
)
from clipadapt.exceptions import ClipadaptError, ConfigError


def fit_and_save(
    bundle: Any,
    spec: str,
    shots: int | None,
    seed: int,
    choice: Any,
    out: Path,
    text_encoder: Any = None,
) -> Any:
    """Fit ``spec`` on a draw of ``bundle``, score it once, save it with its provenance."""
    from clipadapt._utils import atomic_write_json
    from clipadapt.features.pipeline import bundle_provenance
    from clipadapt.methods.base import create_method, parse_method_spec
    from clipadapt.tasks.classification import evaluate

    name, params = parse_method_spec(spec)
    method = create_method(name, **params)
    result = evaluate(
        method, bundle, shots=shots, seed=seed, choice=choice, text_encoder=text_encoder
    )
    provenance = bundle_provenance(bundle)
    result.fitted.save(out, provenance=provenance)  # evaluate fitted a clone of `method`
    atomic_write_json(out / "run.json", {**provenance, "result": result.to_dict()})
    return result


def adapter_provenance(adapter_dir: Path, method: Any) -> dict[str, Any]:
    """The saved provenance; adapters saved before it existed fall back to their run.json."""
    if method.provenance is not None:
        return dict(method.provenance)
    run_file = adapter_dir / "run.json"
    if run_file.is_file():
        try:
            return json.loads(run_file.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            pass
    return {}


def _names(names: list[str], limit: int = 4) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names)} in all)" if len(names) > limit else "")


def check_adapter_on_bundle(
    adapter_dir: Path,
    method: Any,
    provenance: dict[str, Any],
    bundle: Any,
    *,
    other_bundle: bool = False,
) -> None:
    """Refuse to score an adapter on features it was not fitted for.

    The class names must equal the bundle's, in label order (else a score compares labels of
    one dataset with predictions of another); the bundle must be the one it was fitted on
    (its fingerprint) unless ``other_bundle`` (e.g. a domain-shifted copy with the same classes).
    Adapters saved without provenance are checked by their class count.

    Raises:
        ConfigError: naming both sides and the fix.
    """
    fitted_names = provenance.get("classnames")
    where = provenance.get("bundle") or "its bundle"
    if fitted_names is None:
        if method.n_classes_ != bundle.num_classes:
            raise ConfigError(
                f"adapter {adapter_dir} predicts {method.n_classes_} classes but "
                f"{bundle.where} has {bundle.num_classes} ({_names(bundle.classnames)}); "
                "score it on the features it was fitted on"
            )
        return
    fitted_names = list(fitted_names)
    if fitted_names != list(bundle.classnames):
        first = next(
            (
                i
                for i, (a, b) in enumerate(zip(fitted_names, bundle.classnames, strict=False))
                if a != b
            ),
            min(len(fitted_names), bundle.num_classes),
        )
        raise ConfigError(
            f"adapter {adapter_dir} was fitted on {len(fitted_names)} classes "
            f"({_names(fitted_names)}) but {bundle.where} has {bundle.num_classes} "
            f"({_names(bundle.classnames)}); they first differ at label {first}; score the "
            f"adapter on a bundle of the classes it was fitted on ({where})"
        )
    recorded = provenance.get("bundle_fingerprint")
    if recorded and not other_bundle and recorded not in bundle.fingerprints():
        raise ConfigError(
            f"adapter {adapter_dir} was fitted on {where} (bundle fingerprint {recorded}), "
            f"but {bundle.where} has fingerprint {bundle.fingerprint()}: other features with "
            "the same class names (another extraction, backbone or version of the images); "
            "pass --other-bundle to score it there on purpose (e.g. a domain-shifted test set)"
        )


def print_warnings(warnings: list[str]) -> None:
    """One ``warning:`` line per warning of a run (on stdout, beside its result)."""
    for warning in warnings:
        print(f"warning: {warning}")


def cmd_fit(args: argparse.Namespace) -> int:
    require_bundle(args.bundle)  # before torch is imported: a typo answers at once
    from clipadapt.data.bundle import load_bundle

    bundle = named_bundle(load_bundle(args.bundle), args.classnames)
    result = fit_and_save(
        bundle, args.method, args.shots, args.seed, split_choice(args), Path(args.out)
    )
    print_result(result)
    print_warnings(result.warnings)
    print(f"saved adapter: {args.out}")
    write_json(args.json, result.to_dict())
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    require_adapter(args.adapter)
    require_bundle(args.bundle)
    from clipadapt.data.bundle import load_bundle
    from clipadapt.methods.base import load
    from clipadapt.tasks.classification import absent_classes

    method = load(args.adapter)
    bundle = named_bundle(load_bundle(args.bundle), args.classnames)
    provenance = adapter_provenance(Path(args.adapter), method)
    check_adapter_on_bundle(
        Path(args.adapter), method, provenance, bundle, other_bundle=args.other_bundle
    )
    if bundle.num_classes < 2:
        raise ConfigError(
            f"{bundle.where} has {bundle.num_classes} class(es): an accuracy over one class is "
            "100 % by construction, so it is refused"
        )
    rows = bundle.group(args.eval_set, "eval")
    started = time.perf_counter()
    accuracy = method.score(rows.features, rows.labels)
    absent = absent_classes(bundle.classnames, None, rows)
    warnings = []
    if absent:
        warnings.append(
            f"{len(absent['eval'])} class(es) have no row in {args.eval_set} "
            f"({_names(absent['eval'], 5)}): the accuracy is over the other classes only"
        )
    out = {
        "method": method.card.name,
        "bundle": str(args.bundle),
        "bundle_fingerprint": bundle.fingerprint(),
        "eval_set": args.eval_set,
        "rows": len(rows),
        "accuracy": accuracy,
        "predict_seconds": time.perf_counter() - started,
        "absent_classes": absent,
        "warnings": warnings,
        "fitted_on": provenance or None,
    }
    print(
        f"{method.card.name}: accuracy {accuracy:.2f}% on {args.eval_set} of {args.bundle} ({len(rows)} rows)"
    )
    print_warnings(warnings)
    write_json(args.json, out)
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from clipadapt._utils import atomic_write_json
    from clipadapt.cli.features import extract_from_args
    from clipadapt.features.pipeline import needs_text_tower
    from clipadapt.methods.base import parse_method_spec
    from clipadapt.tasks.classification import SplitChoice

    out = Path(args.out)
    name, _ = parse_method_spec(args.method)
    tower = needs_text_tower(name)  # an unknown method fails here, before any encoding
    bundle, text_encoder = extract_from_args(args, out / "features.safetensors", text_tower=tower)
    result = fit_and_save(
        bundle, args.method, args.shots, args.seed, SplitChoice(), out / "adapter", text_encoder
    )
    print_result(result)
    print_warnings(result.warnings)
    atomic_write_json(out / "result.json", result.to_dict())
    write_json(args.json, result.to_dict())
    return 0


def image_inputs(inputs: list[str]) -> list[Path]:
    """The images ``predict`` classifies: files as given, in order; a folder stands for its
    image files, found recursively and sorted by path.

    Raises:
        ConfigError: an input that does not exist, or a folder without image files.
    """
    for item in inputs:  # before any heavy import: a typo answers at once
        require_path(item, "image", "path", missing=f"image {item} does not exist")
    from clipadapt.data.datasets import IMAGE_EXTENSIONS

    found: list[Path] = []
    for item in map(Path, inputs):
        if not item.is_dir():
            found.append(item)
            continue
        images = sorted(
            p for p in item.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()
        )
        if not images:
            raise ConfigError(
                f"folder {item} holds no image files ({', '.join(sorted(IMAGE_EXTENSIONS))}); "
                "give image files or a folder of them"
            )
        found += images
    return found


def cmd_predict(args: argparse.Namespace) -> int:
    require_adapter(args.adapter)
    paths = image_inputs(args.images)
    from clipadapt.features.pipeline import encode_image_files, load_encoder
    from clipadapt.methods.base import load

    adapter_dir = Path(args.adapter)
    method = load(adapter_dir)
    provenance = adapter_provenance(adapter_dir, method)
    classnames = provenance.get("classnames")
    if classnames is not None and len(classnames) != method.n_classes_:
        raise ConfigError(
            f"adapter {adapter_dir} records {len(classnames)} class names but predicts "
            f"{method.n_classes_} classes; its config.json is inconsistent: fit it again"
        )
    if classnames is None:
        print(
            f"warning: {adapter_dir} records no class names (saved by an older clipadapt "
            "without run.json); classes are shown by index"
        )
        classnames = [f"class_{i}" for i in range(method.n_classes_)]
    backbone = args.backbone or provenance.get("backbone_spec")
    if not backbone:
        raise ConfigError("no backbone known: pass --backbone (and --checkpoint)")
    if args.backbone and not args.other_backbone:
        check_backbone(adapter_dir, provenance, args.backbone, args.checkpoint)
    encoder = load_encoder(backbone, checkpoint=args.checkpoint, device=args.device)
    skipped: list[tuple[str, str]] = []
    try:
        features = encode_image_files(encoder, paths, skipped=skipped)
    except ConfigError:
        if not skipped:
            raise
        listed = "; ".join(f"{path} ({reason})" for path, reason in skipped[:5])
        more = f"; and {len(skipped) - 5} more" if len(skipped) > 5 else ""
        raise ConfigError(
            f"cannot read image {listed}{more}: no readable image is left to classify"
        ) from None
    for path, reason in skipped:  # on stderr: stdout stays the predictions
        print(f"warning: skipped unreadable image {path} ({reason})", file=sys.stderr)
    unread = {path for path, _ in skipped}
    names = [str(p) for p in paths if str(p) not in unread]
    probs = method.logits(features).softmax(dim=-1)
    top = probs.topk(min(args.top, probs.shape[1]), dim=-1)
    output = []
    for path, values, index in zip(names, top.values.tolist(), top.indices.tolist(), strict=True):
        print(path)
        entries = []
        for p, i in zip(values, index, strict=True):
            print(f"  {p * 100:6.2f}%  {classnames[i]}")
            entries.append({"class": classnames[i], "index": i, "probability": p})
        output.append({"image": path, "top": entries})
    output += [{"image": path, "top": [], "skipped": reason} for path, reason in skipped]
    write_json(args.json, output)
    return 0


def check_backbone(
    adapter_dir: Path, provenance: dict[str, Any], backbone: str, checkpoint: str | None
) -> None:
    """Refuse a ``--backbone`` that is not the one the adapter's features came from (its
    features would be another model's, and the predictions meaningless).

    Raises:
        ConfigError: naming both backbones and the fix.
    """
    from clipadapt._utils import stable_hash
    from clipadapt.encoders.clip import backbone_from_record, resolve_backbone

    record = provenance.get("backbone_spec")
    recorded = provenance.get("backbone_key")
    if recorded is None and isinstance(record, dict):
        try:
            recorded = stable_hash(backbone_from_record(record).cache_key())
        except ClipadaptError:
            recorded = None  # its checkpoint is gone: nothing to compare with
    if recorded is None:
        return
    given = resolve_backbone(backbone, checkpoint)
    if stable_hash(given.cache_key()) != recorded:
        raise ConfigError(
            f"adapter {adapter_dir} was fitted on features of {provenance.get('backbone')}, "
            f"but --backbone gives {given.display_name}: its predictions would be meaningless; "
            "leave --backbone out (the adapter's own is used) or pass --other-backbone"
        )


def register_cli(sub: Any) -> None:
    """Add ``fit``, ``evaluate``, ``run`` and ``predict``."""
    p = sub.add_parser(
        "fit",
        help="fit a method on a feature bundle and save it",
        description="Fit one method on a few-shot draw of a feature bundle (K images per class "
        "from train, chosen by the seed; validation data for its searches), score it once on "
        "the evaluation group (accuracy in percent) and save the adapter with the class names, "
        "backbone and bundle it was fitted on.",
        epilog=example(
            "clipadapt fit --bundle feats/count.safetensors --method tip_adapter --shots 4 "
            "--out adapters/tip"
        ),
    )
    p.add_argument("--bundle", required=True, help="feature bundle (.safetensors)")
    p.add_argument(
        "--method",
        required=True,
        help="NAME or NAME:key=value,... (clipadapt list-methods; clipadapt info NAME)",
    )
    p.add_argument(
        "--shots",
        type=positive_int,
        help="images per class to train on (needed unless --train-set names a group)",
    )
    p.add_argument("--seed", type=int, default=1, help="which few-shot draw (and training seed)")
    add_split_flags(p)
    add_classnames_flag(p)
    p.add_argument("--out", required=True, help="folder for config.json + state.safetensors")
    p.add_argument("--json", help="also write the result as JSON to this file")
    p.set_defaults(handler=cmd_fit)

    p = sub.add_parser(
        "evaluate",
        help="score a saved adapter on a bundle group",
        description="Score a saved adapter on one group of a feature bundle: accuracy in "
        "percent over its rows. The bundle must have the adapter's classes in the same order, "
        "and be the bundle it was fitted on unless --other-bundle.",
        epilog=example(
            "clipadapt evaluate --adapter adapters/tip --bundle feats/count.safetensors"
        ),
    )
    p.add_argument("--adapter", required=True, help="saved adapter folder (clipadapt fit --out)")
    p.add_argument("--bundle", required=True, help="feature bundle (.safetensors)")
    p.add_argument("--eval-set", default="test", help="bundle group to score")
    add_classnames_flag(
        p,
        CLASSNAMES_HELP + " (give the file the adapter was fitted with: the names must match "
        "its classes)",
    )
    p.add_argument(
        "--other-bundle",
        action="store_true",
        help="score on a bundle other than the one the adapter was fitted on (same classes, "
        "e.g. a domain-shifted test set); without it such a bundle is refused",
    )
    p.add_argument("--json", help="also write the result as JSON to this file")
    p.set_defaults(handler=cmd_evaluate)

    p = sub.add_parser(
        "run",
        help="extract + fit + evaluate in one command",
        description="Encode a dataset into OUT/features.safetensors (through the feature "
        "cache), fit one method on a few-shot draw, score it once on test (accuracy in "
        "percent) and save the adapter in OUT/adapter and the result in OUT/result.json.",
        epilog=example(
            "clipadapt run world-data/world_count --backbone world --method tip_adapter "
            "--shots 4 --out runs/first"
        ),
    )
    p.add_argument("dataset", help="registered dataset name (with --data-root) or a folder")
    add_backbone_flags(p, required=True)
    add_extract_flags(p)
    p.add_argument("--method", required=True, help="NAME or NAME:key=value,...")
    p.add_argument("--shots", type=positive_int, required=True, help="images per class")
    p.add_argument("--seed", type=int, default=1, help="which few-shot draw (and training seed)")
    p.add_argument("--out", required=True, help="output folder (bundle, adapter, result.json)")
    p.add_argument("--json", help="also write the result as JSON to this file")
    p.set_defaults(handler=cmd_run)

    p = sub.add_parser(
        "predict",
        help="top-k classes for images with a saved adapter",
        description="Encode images with the backbone the adapter was fitted on and print each "
        "image's top classes with their probabilities. A folder stands for every image file "
        "under it (recursively, sorted by path); files that cannot be decoded are skipped "
        "with a warning naming them.",
        epilog=example("clipadapt predict photos/ --adapter adapters/tip --top 3"),
    )
    p.add_argument("images", nargs="+", help="image files and/or folders of images")
    p.add_argument("--adapter", required=True, help="saved adapter folder (clipadapt fit --out)")
    p.add_argument("--top", type=positive_int, default=5, help="classes shown per image")
    add_backbone_flags(p)
    p.add_argument(
        "--other-backbone",
        action="store_true",
        help="encode the images with --backbone even when the adapter was fitted on another "
        "backbone's features (refused without it)",
    )
    p.add_argument(
        "--json",
        help="also write the predictions as JSON to this file (skipped files are listed with "
        "the reason)",
    )
    p.set_defaults(handler=cmd_predict)
