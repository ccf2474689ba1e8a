"""``clipadapt demo``: the embedded world end to end."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from clipadapt.cli._common import example, int_list, shots_list


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


def register_cli(sub: Any) -> None:
    """Add ``demo``."""
    p = sub.add_parser(
        "demo",
        help="the embedded world end to end: datasets, features, all methods",
        description="Generate the embedded world's datasets, encode them with its small CLIP "
        "and run every method on them through the bench (offline, CPU): results, tables and "
        "the accuracy-vs-shots plot land in --out.",
        epilog=example("clipadapt demo --size small --shots 1,4 --out demo-output"),
    )
    p.add_argument("--out", default="demo-output", help="output folder")
    p.add_argument(
        "--size", choices=("default", "small"), default="default", help="world dataset size"
    )
    p.add_argument("--shots", type=shots_list, default=[1, 4, 16], help="comma-separated shots")
    p.add_argument("--seeds", type=int_list, default=[1], help="comma-separated seeds")
    p.add_argument("--methods", default="*", help="comma-separated names or '*' patterns")
    p.add_argument("--cache-dir", help="feature cache root (default: the usual cache)")
    p.add_argument("--no-progress", action="store_true", help="print no progress")
    p.set_defaults(handler=cmd_demo)
