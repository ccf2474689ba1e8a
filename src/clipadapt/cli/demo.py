"""``clipadapt demo``: the embedded world end to end."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from clipadapt.cli._common import int_list, shots_list


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
        "demo", help="the embedded world end to end: datasets, features, all methods"
    )
    p.add_argument("--out", default="demo-output")
    p.add_argument("--size", choices=("default", "small"), default="default")
    p.add_argument("--shots", type=shots_list, default=[1, 4, 16])
    p.add_argument("--seeds", type=int_list, default=[1])
    p.add_argument("--methods", default="*")
    p.add_argument("--cache-dir")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(handler=cmd_demo)
