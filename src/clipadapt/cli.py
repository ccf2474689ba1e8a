"""The ``clipadapt`` command line. Thin: parses, calls the library, prints a short summary.

Errors meant for users print one line naming the problem and the fix and exit with code 2;
``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import errno
import json
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from clipadapt.exceptions import ClipadaptError, ConfigError

EXAMPLES = """\
examples:
  clipadapt list-methods
  clipadapt extract ./my_images --backbone ViT-B-32:openai --out feats/my_images.safetensors
  clipadapt bench --bundle feats/my_images.safetensors --methods zeroshot,tip_adapter \\
      --shots 1,2,4 --seeds 1,2,3 --out results.jsonl
  clipadapt bench sweep.yaml --out results.jsonl --executor ray --tensorboard tb/
  clipadapt bench --profile paper --bundle-dir feats/ --out paper.jsonl
  clipadapt report results.jsonl --out report/ --compare published
  clipadapt fit --bundle feats/my_images.safetensors --method tip_adapter --shots 4 --out adapter/
  clipadapt evaluate --adapter adapter/ --bundle feats/my_images.safetensors
  clipadapt predict photo.jpg --adapter adapter/
  clipadapt run ./my_images --backbone world --method tip_adapter --shots 4 --out runs/demo
  clipadapt demo --out demo-output

Method options use NAME:key=value,key=value (e.g. tip_adapter:search_steps_beta=50).
Backbones: 'world' (the embedded model), ARCH:TAG (open_clip pretrained tag, e.g.
ViT-B-32:openai; downloads when online), or ARCH with --checkpoint FILE.
"""


def _int_list(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one integer")
    return values


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _shots_list(text: str) -> list[int]:
    values = _int_list(text)
    if any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"shots must be positive integers, got {text!r}")
    return values


def _write_json(path: str | None, obj: Any) -> None:
    if path:
        from clipadapt._utils import atomic_write_json

        atomic_write_json(path, obj)


def _split_choice(args: argparse.Namespace) -> Any:
    from clipadapt.tasks.classification import SplitChoice

    return SplitChoice(args.train_set, args.val_set, args.eval_set)


def _add_split_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--train-set", help="bundle group to train on as is (e.g. train_1shot)")
    p.add_argument(
        "--val-set", help="bundle group for validation, or 'none' (default: sampled val)"
    )
    p.add_argument("--eval-set", help="bundle group scored once (default: test)")


def _add_backbone_flags(p: argparse.ArgumentParser, required: bool = False) -> None:
    p.add_argument(
        "--backbone",
        required=required,
        default=None if required else None,
        help="'world', ARCH:TAG (e.g. ViT-B-32:openai) or ARCH with --checkpoint",
    )
    p.add_argument(
        "--checkpoint", help="local weights file for the backbone (safetensors or weights-only .pt)"
    )
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda:0 ...")


def _add_extract_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--data-root", help="folder holding the CoOp dataset folders (for registered names)"
    )
    p.add_argument(
        "--cache-dir", help="feature cache root (default $CLIPADAPT_CACHE or ~/.cache/clipadapt)"
    )
    p.add_argument(
        "--views", type=int, default=10, help="augmented views per train image (default 10)"
    )
    p.add_argument(
        "--templates",
        help="prompt templates: single, imagenet7, imagenet80, or a '|'-separated list",
    )
    p.add_argument("--descriptions", help="CuPL-style description JSON ({class: [sentences]})")
    p.add_argument(
        "--descriptions-match",
        choices=("name", "position"),
        default="name",
        help="match description keys to classes by name (default) or by position",
    )
    p.add_argument(
        "--negative-template", default="a photo of no {}.", help="negative prompt ('' to skip)"
    )
    p.add_argument("--batch-size", type=_positive_int, default=64)
    p.add_argument(
        "--workers", type=int, default=None, help="DataLoader workers (default: automatic)"
    )
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="clipadapt",
        description="Adapt CLIP-style models to few-shot classification on cached features.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    parser.add_argument(
        "--deterministic",
        action="store_true",
        help="use only deterministic kernels: torch.use_deterministic_algorithms(True), "
        "cudnn.benchmark off, CUBLAS_WORKSPACE_CONFIG=:4096:8 when unset (GPU runs repeat "
        "bit for bit; slower; see docs/reliability.md)",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("list-methods", help="list registered methods")
    p.add_argument("--filter", default="*", help="wildcard, e.g. '*adapter*'")
    p.add_argument("--json", help="also write the list as JSON to this file")

    p = sub.add_parser("info", help="show one method's card and hyperparameters")
    p.add_argument("method")

    p = sub.add_parser(
        "extract",
        help="encode a dataset's images once into a feature bundle",
        description="Encode train (clean + augmented views), val and test images and "
        "the class prompts into a feature bundle; features are cached, so a rerun "
        "encodes nothing and an interrupted run resumes.",
    )
    p.add_argument("dataset", help="registered dataset name (with --data-root) or a folder")
    _add_backbone_flags(p, required=True)
    _add_extract_flags(p)
    p.add_argument("--out", required=True, help="bundle file to write (.safetensors)")
    p.add_argument("--json", help="write a JSON summary here")

    p = sub.add_parser("fit", help="fit a method on a feature bundle and save it")
    p.add_argument("--bundle", required=True)
    p.add_argument("--method", required=True, help="NAME or NAME:key=value,...")
    p.add_argument("--shots", type=_positive_int)
    p.add_argument("--seed", type=int, default=1)
    _add_split_flags(p)
    p.add_argument("--out", required=True, help="folder for config.json + state.safetensors")
    p.add_argument("--json")

    p = sub.add_parser("evaluate", help="score a saved adapter on a bundle group")
    p.add_argument("--adapter", required=True)
    p.add_argument("--bundle", required=True)
    p.add_argument("--eval-set", default="test")
    p.add_argument("--json")

    p = sub.add_parser("run", help="extract + fit + evaluate in one command")
    p.add_argument("dataset")
    _add_backbone_flags(p, required=True)
    _add_extract_flags(p)
    p.add_argument("--method", required=True)
    p.add_argument("--shots", type=_positive_int, required=True)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--out", required=True, help="output folder (bundle, adapter, result.json)")
    p.add_argument("--json")

    p = sub.add_parser("predict", help="top-k classes for images with a saved adapter")
    p.add_argument("images", nargs="+")
    p.add_argument("--adapter", required=True)
    p.add_argument("--top", type=_positive_int, default=5)
    _add_backbone_flags(p)
    p.add_argument("--json")

    p = sub.add_parser(
        "bench",
        help="run a sweep: datasets × methods × shots × seeds (+ DG, episodes)",
        description="Each run appends one JSON line to --out; runs already there are "
        "skipped (a killed sweep resumes), --rerun forces them. The grid comes from a "
        "YAML file (see docs/benchmarks.md), from flags, or from --profile paper.",
    )
    p.add_argument("config", nargs="?", help="sweep YAML file (datasets, methods, shots, ...)")
    p.add_argument(
        "--profile",
        choices=("paper",),
        help="paper: 11 datasets × shots 1-16 × seeds 1-3 × all methods + ImageNet DG, "
        "skipping what is missing (with the list of what and why)",
    )
    p.add_argument("--bundle", action="append", help="a feature bundle (repeatable)")
    p.add_argument(
        "--dataset",
        action="append",
        help="an image dataset (registered name with --data-root, or a folder; repeatable), "
        "extracted once per --backbone through the feature cache",
    )
    p.add_argument("--bundle-dir", help="folder of <dataset>.safetensors bundles")
    p.add_argument("--data-root", help="folder of the CoOp datasets (image datasets)")
    p.add_argument("--cache-dir", help="feature cache for image datasets")
    p.add_argument(
        "--backbone", action="append", help="backbone(s) for image datasets (repeatable)"
    )
    p.add_argument("--episodes", action="append", help="episode file (.safetensors or .json)")
    p.add_argument(
        "--methods",
        help="comma-separated NAME or NAME:key=value specs; "
        "separate specs with options by ';' (or use '*' patterns)",
    )
    p.add_argument("--shots", type=_shots_list, help="default 1,2,4,8,16")
    p.add_argument("--seeds", type=_int_list, help="default 1,2,3")
    _add_split_flags(p)
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a key of the YAML file (value read as YAML, e.g. shots=[1,16])",
    )
    p.add_argument("--out", default="results.jsonl", help="results JSONL (appended)")
    p.add_argument("--rerun", action="store_true", help="run cells even if already in --out")
    p.add_argument("--executor", choices=("local", "ray"), default="local")
    p.add_argument(
        "--workers", type=_positive_int, default=1, help="local processes / local Ray CPUs"
    )
    p.add_argument("--address", help="Ray cluster address (default: start a local instance)")
    p.add_argument("--tensorboard", help="log training curves (loss, val score) to this folder")
    p.add_argument("--dry-run", action="store_true", help="list the cells and what is skipped")
    p.add_argument(
        "--fail-fast",
        action="store_true",
        help="stop at the first failing run (default: record it)",
    )
    p.add_argument("--device", default="cpu")
    p.add_argument("--no-progress", action="store_true")

    p = sub.add_parser(
        "report",
        help="paper-style tables, per-shot tables, plots and costs from results JSONL",
    )
    p.add_argument("results", nargs="+", help="results JSONL file(s)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--shots", type=_positive_int, help="shots of the main table (default: max)")
    p.add_argument(
        "--compare",
        choices=("published",),
        help="published: the papers' numbers beside ours, with the source of each",
    )

    p = sub.add_parser(
        "demo", help="the embedded world end to end: datasets, features, all methods"
    )
    p.add_argument("--out", default="demo-output")
    p.add_argument("--size", choices=("default", "small"), default="default")
    p.add_argument("--shots", type=_shots_list, default=[1, 4, 16])
    p.add_argument("--seeds", type=_int_list, default=[1])
    p.add_argument("--methods", default="*")
    p.add_argument("--cache-dir")
    p.add_argument("--no-progress", action="store_true")

    try:
        from clipadapt.world.cli import register_cli
    except ImportError:
        register_cli = None
    if register_cli is not None:
        register_cli(sub)
    return parser


def _split_method_specs(text: str) -> list[str]:
    from clipadapt.methods.base import list_methods

    if ";" in text:
        specs = [s.strip() for s in text.split(";") if s.strip()]
    elif ":" in text:
        specs = [text.strip()]
    else:
        specs = [s.strip() for s in text.split(",") if s.strip()]
    out: list[str] = []
    for spec in specs:
        if any(ch in spec.split(":")[0] for ch in "*?["):
            matched = list_methods(spec)
            if not matched:
                raise ConfigError(f"no method matches {spec!r}; see `clipadapt list-methods`")
            out.extend(matched)
        else:
            out.append(spec)
    return out


# ---------------------------------------------------------------------------------- commands
def cmd_list_methods(args: argparse.Namespace) -> int:
    from clipadapt.methods.base import list_methods, method_card

    rows = []
    for name in list_methods(args.filter):
        card = method_card(name)
        rows.append(
            {
                "name": name,
                "summary": card.summary,
                "trainable": card.trainable,
                "arxiv": card.arxiv,
            }
        )
        print(f"{name:<18} {'trainable' if card.trainable else 'training-free':<13} {card.summary}")
    _write_json(args.json, rows)
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from clipadapt.methods.base import get_method_class

    cls = get_method_class(args.method)
    card = cls.card
    print(f"{card.name}: {card.summary}")
    if card.paper:
        print(f"paper: {card.paper} (arXiv {card.arxiv})")
    print(
        f"needs: {', '.join(card.needs)}; trainable: {card.trainable}; uses views: {card.uses_views}"
    )
    if card.searched:
        print(
            "searched on validation data: "
            + "; ".join(f"{k} over {v}" for k, v in card.searched.items())
        )
    print("hyperparameters (defaults):")
    for key, value in sorted(cls._defaults().items()):
        print(f"  {key} = {value!r}")
    doc = (cls.__doc__ or "").strip()
    if doc:
        print("\n" + doc)
    return 0


def _load_dataset_and_text(args: argparse.Namespace) -> tuple[Any, list[str] | None, Any]:
    from clipadapt.data.datasets import load_dataset
    from clipadapt.data.prompts import load_descriptions, resolve_templates

    dataset = load_dataset(args.dataset, args.data_root)
    if getattr(dataset, "missing", None):
        missing = dataset.missing
        raise ConfigError(
            f"{len(missing)} image(s) listed in the split of {dataset.name} are missing under "
            f"{dataset.root} (e.g. {', '.join(map(str, missing[:3]))}); restore them or fix the split"
        )
    templates = resolve_templates(args.templates, dataset) if args.templates else None
    descriptions = None
    desc_path = args.descriptions or getattr(dataset, "descriptions", None)
    if desc_path:
        descriptions = load_descriptions(
            desc_path, dataset.classnames, match=args.descriptions_match
        )
    return dataset, templates, descriptions


def _encoder(args: argparse.Namespace, backbone_record: dict | None = None) -> Any:
    from clipadapt.encoders.clip import ClipEncoder, backbone_from_record, resolve_backbone

    if args.backbone:
        spec = resolve_backbone(args.backbone, args.checkpoint)
    elif backbone_record is not None:
        spec = backbone_from_record(backbone_record)
    else:
        raise ConfigError("no backbone known: pass --backbone (and --checkpoint)")
    return ClipEncoder(spec, device=args.device)


def _extract(args: argparse.Namespace, out_path: Path) -> tuple[Any, Any]:
    from clipadapt.features.extract import extract_dataset

    dataset, templates, descriptions = _load_dataset_and_text(args)
    encoder = _encoder(args)
    bundle, report = extract_dataset(
        dataset,
        encoder,
        out_path,
        cache_dir=args.cache_dir,
        views=args.views,
        templates=templates,
        descriptions=descriptions,
        negative_template=args.negative_template or None,
        batch_size=args.batch_size,
        num_workers=args.workers,
        progress=not args.no_progress,
    )
    encoded = ", ".join(f"{k} {v}" for k, v in report.encoded.items())
    kept = ", ".join(f"{k} {v}" for k, v in report.kept.items())
    print(
        f"extracted {dataset.name} with {encoder.backbone.display_name}: rows {kept}; "
        f"encoded now: {encoded} (0 = cache hit)"
    )
    if report.num_skipped:
        print(f"warning: {report.num_skipped} unreadable image(s) skipped:")
        for split, items in report.skipped.items():
            for item in items[:10]:
                print(f"  {split}: {item['path']} ({item['error']})")
    print(f"bundle: {out_path}")
    return bundle, report


def cmd_extract(args: argparse.Namespace) -> int:
    bundle, report = _extract(args, Path(args.out))
    _write_json(
        args.json,
        {
            "bundle": str(args.out),
            "encoded": report.encoded,
            "kept": report.kept,
            "skipped": report.skipped,
            "classes": bundle.num_classes,
        },
    )
    return 0


def _fit(
    bundle: Any,
    spec: str,
    shots: int | None,
    seed: int,
    choice: Any,
    out: Path,
    text_encoder: Any = None,
) -> Any:
    from clipadapt._utils import atomic_write_json
    from clipadapt.methods.base import create_method, parse_method_spec
    from clipadapt.tasks.classification import evaluate

    name, params = parse_method_spec(spec)
    method = create_method(name, **params)
    result = evaluate(
        method, bundle, shots=shots, seed=seed, choice=choice, text_encoder=text_encoder
    )
    method.save(out)
    atomic_write_json(
        out / "run.json",
        {
            "bundle": str(bundle.path) if bundle.path else None,
            "bundle_fingerprint": bundle.fingerprint(),
            "classnames": bundle.classnames,
            "backbone": bundle.metadata.get("backbone"),
            "backbone_spec": json.loads(bundle.metadata["backbone_spec"])
            if "backbone_spec" in bundle.metadata
            else None,
            "result": result.to_dict(),
        },
    )
    return result


def _print_result(result: Any) -> None:
    hp = ", ".join(
        f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
        for k, v in result.hyperparameters.items()
        if k != "source"
    )
    print(
        f"{result.method} on {result.dataset} ({result.shots}-shot, seed {result.seed}): "
        f"accuracy {result.accuracy:.2f}% on {result.eval_set} ({result.n_eval} rows); "
        f"fit {result.fit_seconds:.2f}s; {result.trainable_params} trainable params"
        + (f"; chosen {hp}" if hp else "")
    )


def cmd_fit(args: argparse.Namespace) -> int:
    from clipadapt.data.bundle import load_bundle

    bundle = load_bundle(args.bundle)
    result = _fit(bundle, args.method, args.shots, args.seed, _split_choice(args), Path(args.out))
    _print_result(result)
    print(f"saved adapter: {args.out}")
    _write_json(args.json, result.to_dict())
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
    }
    print(
        f"{method.card.name}: accuracy {accuracy:.2f}% on {args.eval_set} of {args.bundle} ({len(rows)} rows)"
    )
    _write_json(args.json, out)
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from clipadapt._utils import atomic_write_json
    from clipadapt.methods.base import get_method_class, parse_method_spec

    out = Path(args.out)
    bundle, _ = _extract(args, out / "features.safetensors")
    name, _ = parse_method_spec(args.method)
    text_encoder = None
    if "text_encoder" in get_method_class(name).card.needs:
        text_encoder = _encoder(args).text_tower()
    from clipadapt.tasks.classification import SplitChoice

    result = _fit(
        bundle, args.method, args.shots, args.seed, SplitChoice(), out / "adapter", text_encoder
    )
    _print_result(result)
    atomic_write_json(out / "result.json", result.to_dict())
    _write_json(args.json, result.to_dict())
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    import torch

    from clipadapt.features.transforms import CleanView, load_rgb
    from clipadapt.methods.base import load

    adapter_dir = Path(args.adapter)
    run_file = adapter_dir / "run.json"
    record = json.loads(run_file.read_text(encoding="utf-8")) if run_file.is_file() else {}
    method = load(adapter_dir)
    classnames = record.get("classnames") or [f"class_{i}" for i in range(method.n_classes_)]
    encoder = _encoder(args, record.get("backbone_spec"))
    view = CleanView(encoder.image_size, encoder.mean, encoder.std)
    images, names = [], []
    for path in args.images:
        if not Path(path).is_file():
            raise ConfigError(f"image {path} does not exist")
        try:
            images.append(view(load_rgb(path)))
        except Exception as error:
            raise ConfigError(
                f"cannot read image {path} ({type(error).__name__}: {error})"
            ) from None
        names.append(path)
    features = encoder.encode_images(torch.stack(images))
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
    _write_json(args.json, output)
    return 0


def _sweep_from_args(args: argparse.Namespace) -> Any:
    from clipadapt.bench.runner import (
        DatasetSpec,
        EpisodesSpec,
        SweepSpec,
        load_sweep,
        paper_profile,
        parse_overrides,
    )
    from clipadapt.data.bundle import load_bundle

    methods = _split_method_specs(args.methods) if args.methods else None
    if args.config:
        spec = load_sweep(args.config, args.set)
        # flags are relative to the working directory, YAML paths to the YAML file
        for key in ("bundle_dir", "data_root"):
            if getattr(args, key):
                setattr(spec, key, str(Path(getattr(args, key)).resolve()))
    elif args.profile == "paper":
        spec = paper_profile(args.bundle_dir, args.data_root, args.backbone or (), methods)
        if args.set:
            for key, value in parse_overrides(args.set).items():
                setattr(spec, key, value)
    else:
        spec = SweepSpec(bundle_dir=args.bundle_dir, data_root=args.data_root)
        if args.set:
            raise ConfigError("--set overrides keys of a YAML file; pass the file first")
    choice = {"train_set": args.train_set, "val_set": args.val_set, "eval_set": args.eval_set}
    for path in args.bundle or []:
        name = load_bundle(path).name  # a named file that is missing is an error, not a skip
        spec.datasets.append(DatasetSpec(name, bundle=str(Path(path).resolve()), **choice))
    for item in args.dataset or []:
        folder = Path(item)
        name = folder.name if folder.exists() else item
        images = str(folder.resolve()) if folder.exists() else item
        spec.datasets.append(DatasetSpec(name, images=images, **choice))
    for item in args.episodes or []:
        spec.episodes.append(EpisodesSpec(Path(item).stem, str(Path(item).resolve())))
    if methods:
        spec.methods = methods
    if args.shots:
        spec.shots = list(args.shots)
    if args.seeds:
        spec.seeds = list(args.seeds)
    if args.backbone:
        spec.backbones = list(args.backbone)
    if args.cache_dir:
        spec.cache_dir = str(Path(args.cache_dir).resolve())
    if not spec.methods:
        raise ConfigError("no methods: pass --methods, a YAML file with methods:, or --profile")
    if not (spec.datasets or spec.domain_generalization or spec.episodes):
        raise ConfigError(
            "nothing to run: pass a YAML file, --bundle, --dataset, --episodes or --profile paper"
        )
    return spec


def cmd_bench(args: argparse.Namespace) -> int:
    from clipadapt.bench.report import paper_table
    from clipadapt.bench.results import read_results
    from clipadapt.bench.runner import (
        CellSettings,
        LocalExecutor,
        RayExecutor,
        resolve_sweep,
        run_sweep,
    )

    spec = _sweep_from_args(args)
    progress = not args.no_progress
    if args.dry_run:
        resolved = resolve_sweep(spec, progress=progress)
        for cell in resolved.cells:
            print(
                f"{cell['task']:<22} {cell['dataset']:<18} {cell['method_spec']:<24} "
                f"K={cell['shots']} seed={cell['seed']}"
            )
        print(f"{len(resolved.cells)} cell(s)")
        _print_skipped(resolved.skipped)
        return 0
    if args.executor == "ray":
        executor: Any = RayExecutor(
            args.address, num_cpus=args.workers if not args.address else None
        )
    else:
        executor = LocalExecutor(args.workers)
    settings = CellSettings(
        device=args.device, tensorboard=args.tensorboard, keep_going=not args.fail_fast
    )
    started = time.perf_counter()
    records, resolved = run_sweep(
        spec, args.out, executor=executor, settings=settings, rerun=args.rerun, progress=progress
    )
    failed = [r for r in records if r.get("status") != "ok"]
    print(
        f"{len(records) - len(failed)} run(s) written to {args.out} in "
        f"{time.perf_counter() - started:.1f}s ({len(resolved.cells)} cells in the sweep)"
    )
    if failed:
        print(f"{len(failed)} run(s) failed (recorded with status error):")
        for method, error in sorted({(r["method"], r.get("error", "")) for r in failed}):
            print(f"  {method}: {error}")
    _print_skipped(resolved.skipped)
    table = paper_table(list(read_results(args.out)))
    if table.cells:
        print(f"\n{table.title}\n{table.markdown()}")
    if args.tensorboard:
        print(f"training curves: tensorboard --logdir {args.tensorboard}")
    return 0


def _print_skipped(skipped: list[tuple[str, str]]) -> None:
    if skipped:
        print(f"skipped {len(skipped)}:")
        for what, why in skipped:
            print(f"  {what}: {why}")


def cmd_report(args: argparse.Namespace) -> int:
    from clipadapt.bench.report import write_report
    from clipadapt.bench.results import read_results

    records = []
    for path in args.results:
        if not Path(path).is_file():
            raise ConfigError(f"results file {path} not found")
        records += list(read_results(path))
    written = write_report(records, args.out, shots=args.shots, compare=args.compare)
    if "table.md" in written:
        print(written["table.md"].read_text(encoding="utf-8"))
    for path in written.values():
        print(f"wrote {path}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from clipadapt.demo import run_demo

    run_demo(
        Path(args.out),
        size=args.size,
        shots=args.shots,
        seeds=args.seeds,
        methods=args.methods,
        cache_dir=args.cache_dir,
        progress=not args.no_progress,
    )
    return 0


COMMANDS = {
    "list-methods": cmd_list_methods,
    "info": cmd_info,
    "extract": cmd_extract,
    "fit": cmd_fit,
    "evaluate": cmd_evaluate,
    "run": cmd_run,
    "predict": cmd_predict,
    "bench": cmd_bench,
    "report": cmd_report,
    "demo": cmd_demo,
}


_ACCESS_HINT = (
    "not writable (or not readable) by this user; fix its permissions or choose another "
    "location (--out, --cache-dir)"
)
_SPACE_HINT = "disk full; free space there or choose another location (--out, --cache-dir)"
_OS_HINTS = {
    errno.ENOSPC: _SPACE_HINT,
    errno.EDQUOT: _SPACE_HINT,
    errno.EACCES: _ACCESS_HINT,
    errno.EPERM: _ACCESS_HINT,
    errno.EROFS: "read-only file system; choose another location (--out, --cache-dir)",
    errno.ENOTDIR: "a part of this path is a file, not a folder; choose another --out",
    errno.EEXIST: "exists and is not a folder; choose another --out",
    errno.EISDIR: "is a folder where a file is expected; choose another --out",
    errno.ENOENT: "does not exist; check the path",
}


def os_error_message(error: OSError) -> str:
    """One line for a failed file operation: the path, what the system said, and the fix."""
    where = error.filename or ""
    if error.filename2:
        where = f"{where} -> {error.filename2}"
    what = error.strerror or str(error)
    hint = _OS_HINTS.get(error.errno or -1)
    message = f"{where}: {what}" if where else what
    return f"{message}; {hint}" if hint else message


def _one_line(message: str) -> str:
    # a user error is one line on stderr, even when a parser's message spans several
    return " ".join(part.strip() for part in message.splitlines() if part.strip())


def set_deterministic() -> None:
    """Make torch use only deterministic kernels (the ``--deterministic`` flag).

    CPU runs are already bitwise repeatable; this matters on CUDA, where atomics-based
    scatter/index_add, cuBLAS split-K reductions and cuDNN's benchmarked algorithm choice can
    change the last bits from run to run. cuBLAS reads ``CUBLAS_WORKSPACE_CONFIG`` when its
    context is created, so it is set here, before any CUDA work, unless the user set it.
    """
    import os

    import torch

    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``clipadapt`` command. Returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    if args.command is None:
        parser.print_help()
        return 2
    handler = COMMANDS.get(args.command) or getattr(args, "handler", None)
    if handler is None:
        parser.print_help()
        return 2
    if args.deterministic:
        set_deterministic()
    try:
        return int(handler(args) or 0)
    except ClipadaptError as error:
        if args.debug:
            raise
        print(f"error: {_one_line(str(error))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            "interrupted; finished work is kept (rerun the same command to resume)", file=sys.stderr
        )
        return 130
    except OSError as error:
        if args.debug:
            raise
        print(f"error: {_one_line(os_error_message(error))}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
