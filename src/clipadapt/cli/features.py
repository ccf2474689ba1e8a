"""``clipadapt extract``: a dataset's images -> a feature bundle, through the feature pipeline."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from clipadapt.cli._common import add_backbone_flags, add_extract_flags, example, write_json


def print_extraction(bundle: Any, report: Any) -> None:
    """What an extraction encoded (0 = cache hit), re-encoded because files changed, kept and
    skipped, its warnings, and where the bundle is."""
    encoded = ", ".join(f"{k} {v}" for k, v in report.encoded.items())
    kept = ", ".join(f"{k} {v}" for k, v in report.kept.items())
    print(
        f"extracted {bundle.name} with {bundle.backbone}: rows {kept}; "
        f"encoded now: {encoded} (0 = cache hit)"
    )
    if report.changed:
        changed = ", ".join(f"{k} {v}" for k, v in report.changed.items())
        print(
            f"note: image files changed since they were cached (size or modification time, or "
            f"content with --fingerprint content): the cache shards holding them were encoded "
            f"again ({changed} image(s), counted in 'encoded now')"
        )
    for warning in report.warnings:
        print(f"warning: {warning}")
    if report.num_skipped:
        print(f"warning: {report.num_skipped} unreadable image(s) skipped:")
        for split, items in report.skipped.items():
            for item in items[:10]:
                print(f"  {split}: {item['path']} ({item['error']})")
    print(f"bundle: {report.bundle_path}")


def extract_from_args(
    args: argparse.Namespace, out: Path, text_tower: bool = False, on_report: Any = None
) -> tuple[Any, Any]:
    """``ensure_bundle`` with the extraction flags of ``extract``/``run``; returns
    ``(bundle, text tower or None)``."""
    from clipadapt.features.pipeline import ensure_bundle

    return ensure_bundle(
        args.dataset,
        args.backbone,
        args.cache_dir,
        out=out,
        data_root=args.data_root,
        checkpoint=args.checkpoint,
        device=args.device,
        views=args.views,
        templates=args.templates,
        descriptions=args.descriptions,
        descriptions_match=args.descriptions_match,
        negative_template=args.negative_template,
        batch_size=args.batch_size,
        num_workers=args.workers,
        progress=not args.no_progress,
        text_tower=text_tower,
        on_report=on_report or print_extraction,
        fingerprint=args.fingerprint,
        split_file=args.split_file,
        resplit=args.resplit,
        check_counts=not getattr(args, "partial", False),
    )


def cmd_extract(args: argparse.Namespace) -> int:
    reports = []

    def report(bundle: Any, extraction: Any) -> None:
        reports.append(extraction)
        print_extraction(bundle, extraction)

    bundle, _ = extract_from_args(args, Path(args.out), on_report=report)
    (extraction,) = reports
    write_json(
        args.json,
        {
            "bundle": str(args.out),
            "encoded": extraction.encoded,
            "kept": extraction.kept,
            "skipped": extraction.skipped,
            "classes": bundle.num_classes,
        },
    )
    return 0


def register_cli(sub: Any) -> None:
    """Add ``extract``."""
    p = sub.add_parser(
        "extract",
        help="encode a dataset's images once into a feature bundle",
        description="Encode train (clean + augmented views), val and test images and "
        "the class prompts into a feature bundle; features are cached, so a rerun "
        "encodes nothing and an interrupted run resumes.",
        epilog=example(
            "clipadapt extract world-data/world_count --backbone world "
            "--out feats/count.safetensors"
        ),
    )
    p.add_argument("dataset", help="registered dataset name (with --data-root) or a folder")
    add_backbone_flags(p, required=True)
    add_extract_flags(p)
    p.add_argument("--out", required=True, help="bundle file to write (.safetensors)")
    p.add_argument("--json", help="also write a JSON summary to this file")
    p.set_defaults(handler=cmd_extract)
