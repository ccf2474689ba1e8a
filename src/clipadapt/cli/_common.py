"""Argument types, flag sets and printing shared by the verb groups (no heavy imports here)."""

from __future__ import annotations

import argparse
from typing import Any


def int_list(text: str) -> list[int]:
    """``"1,2,4"`` -> ``[1, 2, 4]`` (an argparse type)."""
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one integer")
    return values


def positive_int(text: str) -> int:
    """An integer >= 1 (an argparse type)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def non_negative_int(text: str) -> int:
    """An integer >= 0 (an argparse type)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {value}")
    return value


def shots_list(text: str) -> list[int]:
    """Comma-separated positive shots (an argparse type)."""
    values = int_list(text)
    if any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"shots must be positive integers, got {text!r}")
    return values


def write_json(path: str | None, obj: Any) -> None:
    """Write the ``--json`` summary atomically when a path was given."""
    if path:
        from clipadapt._utils import atomic_write_json

        atomic_write_json(path, obj)


def split_choice(args: argparse.Namespace) -> Any:
    """The ``--train-set/--val-set/--eval-set`` flags as a ``SplitChoice``."""
    from clipadapt.tasks.classification import SplitChoice

    return SplitChoice(args.train_set, args.val_set, args.eval_set)


def add_split_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--train-set", help="bundle group to train on as is (e.g. train_1shot)")
    p.add_argument(
        "--val-set", help="bundle group for validation, or 'none' (default: sampled val)"
    )
    p.add_argument("--eval-set", help="bundle group scored once (default: test)")


def add_backbone_flags(p: argparse.ArgumentParser, required: bool = False) -> None:
    p.add_argument(
        "--backbone",
        required=required,
        default=None,
        help="'world', ARCH:TAG (e.g. ViT-B-32:openai) or ARCH with --checkpoint",
    )
    p.add_argument(
        "--checkpoint", help="local weights file for the backbone (safetensors or weights-only .pt)"
    )
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda:0 ...")


def add_extract_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--data-root", help="folder holding the CoOp dataset folders (for registered names)"
    )
    p.add_argument(
        "--cache-dir",
        help="feature cache root (default $CLIPADAPT_CACHE, else $XDG_CACHE_HOME/clipadapt, "
        "else ~/.cache/clipadapt)",
    )
    p.add_argument(
        "--views",
        type=non_negative_int,
        default=10,
        help="augmented views per train image (default 10; 0 for none)",
    )
    p.add_argument(
        "--templates",
        help="prompt templates: single, imagenet7, imagenet80 (join names with '+'), one "
        "template containing {}, or a .txt/.json file of templates",
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
    p.add_argument("--batch-size", type=positive_int, default=64)
    p.add_argument(
        "--workers",
        type=non_negative_int,
        default=None,
        help="DataLoader workers (default: automatic)",
    )
    add_dataset_flags(p)
    p.add_argument(
        "--no-progress",
        action="store_true",
        help="print no progress (a bar on a terminal, lines otherwise)",
    )


def add_dataset_flags(p: argparse.ArgumentParser) -> None:
    """Where an ImageFolder tree's split lives and how its files are compared with the cache."""
    p.add_argument(
        "--split-file",
        help="split of an ImageFolder tree: read from (or made and saved to) this file "
        "(default: beside the feature cache, <cache>/splits/; never inside the image folder)",
    )
    p.add_argument(
        "--resplit",
        action="store_true",
        help="make a new split of an ImageFolder tree as it is now (after images or classes "
        "were added or removed; results on the old split are not comparable)",
    )
    p.add_argument(
        "--fingerprint",
        choices=("stat", "content"),
        default="stat",
        help="how image files are compared with the cache: stat (size and modification "
        "time, default) or content (sha256 of every file; slower, for the suspicious)",
    )


def print_result(result: Any) -> None:
    """One line for a fitted and scored run (a ``RunResult``)."""
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


def print_skipped(skipped: list[tuple[str, str]]) -> None:
    """The ``skipped N:`` block of what a sweep could not run, with the reasons."""
    if skipped:
        print(f"skipped {len(skipped)}:")
        for what, why in skipped:
            print(f"  {what}: {why}")
