"""``clipadapt fit``, ``evaluate``, ``run`` and ``predict``: saved adapters.

A saved adapter records where its features came from (class names, backbone, bundle fingerprint)
in its ``config.json`` (``Adapter.save(..., provenance=...)``), so ``clipadapt.load(dir)`` alone
names its classes and knows which backbone encodes new images. ``run.json`` beside it keeps the
run's result.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from clipadapt.cli._common import (
    add_backbone_flags,
    add_extract_flags,
    add_split_flags,
    positive_int,
    print_result,
    split_choice,
    write_json,
)
from clipadapt.exceptions import ConfigError


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


def cmd_fit(args: argparse.Namespace) -> int:
    from clipadapt.data.bundle import load_bundle

    bundle = load_bundle(args.bundle)
    result = fit_and_save(
        bundle, args.method, args.shots, args.seed, split_choice(args), Path(args.out)
    )
    print_result(result)
    print(f"saved adapter: {args.out}")
    write_json(args.json, result.to_dict())
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from clipadapt.data.bundle import load_bundle
    from clipadapt.methods.base import load

    method = load(args.adapter)
    bundle = load_bundle(args.bundle)
    rows = bundle.group(args.eval_set, "eval")
    started = time.perf_counter()
    accuracy = method.score(rows.features, rows.labels)
    out = {
        "method": method.card.name,
        "bundle": str(args.bundle),
        "eval_set": args.eval_set,
        "rows": len(rows),
        "accuracy": accuracy,
        "predict_seconds": time.perf_counter() - started,
        "fitted_on": adapter_provenance(Path(args.adapter), method) or None,
    }
    print(
        f"{method.card.name}: accuracy {accuracy:.2f}% on {args.eval_set} of {args.bundle} ({len(rows)} rows)"
    )
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
    atomic_write_json(out / "result.json", result.to_dict())
    write_json(args.json, result.to_dict())
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from clipadapt.features.pipeline import encode_image_files, load_encoder
    from clipadapt.methods.base import load

    adapter_dir = Path(args.adapter)
    method = load(adapter_dir)
    provenance = adapter_provenance(adapter_dir, method)
    classnames = provenance.get("classnames") or [f"class_{i}" for i in range(method.n_classes_)]
    backbone = args.backbone or provenance.get("backbone_spec")
    if not backbone:
        raise ConfigError("no backbone known: pass --backbone (and --checkpoint)")
    encoder = load_encoder(backbone, checkpoint=args.checkpoint, device=args.device)
    names = list(args.images)
    features = encode_image_files(encoder, names)
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
    write_json(args.json, output)
    return 0


def register_cli(sub: Any) -> None:
    """Add ``fit``, ``evaluate``, ``run`` and ``predict``."""
    p = sub.add_parser("fit", help="fit a method on a feature bundle and save it")
    p.add_argument("--bundle", required=True)
    p.add_argument("--method", required=True, help="NAME or NAME:key=value,...")
    p.add_argument("--shots", type=positive_int)
    p.add_argument("--seed", type=int, default=1)
    add_split_flags(p)
    p.add_argument("--out", required=True, help="folder for config.json + state.safetensors")
    p.add_argument("--json")
    p.set_defaults(handler=cmd_fit)

    p = sub.add_parser("evaluate", help="score a saved adapter on a bundle group")
    p.add_argument("--adapter", required=True)
    p.add_argument("--bundle", required=True)
    p.add_argument("--eval-set", default="test")
    p.add_argument("--json")
    p.set_defaults(handler=cmd_evaluate)

    p = sub.add_parser("run", help="extract + fit + evaluate in one command")
    p.add_argument("dataset")
    add_backbone_flags(p, required=True)
    add_extract_flags(p)
    p.add_argument("--method", required=True)
    p.add_argument("--shots", type=positive_int, required=True)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--out", required=True, help="output folder (bundle, adapter, result.json)")
    p.add_argument("--json")
    p.set_defaults(handler=cmd_run)

    p = sub.add_parser("predict", help="top-k classes for images with a saved adapter")
    p.add_argument("images", nargs="+")
    p.add_argument("--adapter", required=True)
    p.add_argument("--top", type=positive_int, default=5)
    add_backbone_flags(p)
    p.add_argument("--json")
    p.set_defaults(handler=cmd_predict)
