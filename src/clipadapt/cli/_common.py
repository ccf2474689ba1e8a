"""Argument types, flag sets and printing shared by the verb groups (no heavy imports here)."""

from __future__ import annotations

import argparse
import textwrap
from pathlib import Path
from typing import Any


class HelpFormatter(argparse.HelpFormatter):
    """The help layout of every verb: prose paragraphs are wrapped to the terminal, paragraphs
    with indented lines (example commands) are kept as written, and every option with a
    default shows it (``(default: 10)``) unless its help already says it."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        out = []
        for paragraph in text.strip("\n").split("\n\n"):
            lines = paragraph.splitlines()
            if any(line[:1].isspace() for line in lines):
                out.append("\n".join(indent + line for line in lines))
            else:
                out.append(
                    textwrap.fill(
                        " ".join(lines), width, initial_indent=indent, subsequent_indent=indent
                    )
                )
        return "\n\n".join(out)

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if text == argparse.SUPPRESS or "default" in text.lower():
            return text
        shown = default_text(action)
        if shown is None:
            return text
        return f"{text} (default: {shown})" if text else f"default: {shown}"


def default_text(action: argparse.Action) -> str | None:
    """How an option's default reads in help (``1,2,4`` for a list), %-escaped; None when
    there is nothing to show (no default, a flag, a required positional)."""
    default = action.default
    if default is None or default is False or default == [] or default == argparse.SUPPRESS:
        return None
    if not action.option_strings and action.nargs not in (argparse.OPTIONAL, "*"):
        return None
    if isinstance(default, list | tuple):
        default = ",".join(str(v) for v in default)
    return str(default).replace("%", "%%")  # help strings are %-formatted


def example(command: str) -> str:
    """A verb's ``Example:`` epilog: one command a user can copy (kept as written)."""
    return "Example:\n  " + command


def require_path(path: str | None, flag: str, kind: str = "file", missing: str = "") -> None:
    """Refuse a missing input path before any heavy import (a one-line error, exit 2).

    Args:
        path: the path given (None: the flag was not given; nothing to check).
        flag: how the user gave it (``--bundle``), for the message.
        kind: "file", "folder" or "path" (either).
        missing: the message when it does not exist (default: the flag, the path and "does
            not exist"), e.g. the one the library would give later, so both read the same.

    Raises:
        ConfigError: the path does not exist or is the wrong kind.
    """
    from clipadapt.exceptions import ConfigError

    if path is None:
        return
    where = Path(path)
    if not where.exists():
        raise ConfigError(missing or f"{flag} {path} does not exist; check the path")
    if kind == "file" and not where.is_file():
        raise ConfigError(f"{flag} {path} is a folder, not a file; give the file")
    if kind == "folder" and not where.is_dir():
        raise ConfigError(f"{flag} {path} is a file, not a folder; give the folder")


def require_bundle(path: str | None, flag: str = "--bundle") -> None:
    """:func:`require_path` for a feature bundle, with the loader's own message and fix."""
    require_path(
        path,
        flag,
        missing=f"{path}: feature bundle not found (create one with `clipadapt extract`)",
    )


def require_adapter(path: str | None, flag: str = "--adapter") -> None:
    """:func:`require_path` for a saved adapter folder, with the loader's own message and fix
    (its files are checked when it is loaded)."""
    require_path(
        path,
        flag,
        "folder",
        missing=f"{path}: not a saved adapter (the folder does not exist; create one with "
        "`clipadapt fit --out DIR`)",
    )


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


CLASSNAMES_HELP = (
    "class names for a bundle made without them (class_0 ...): one per line, line i = "
    "class i (CoOp's '<wnid> <name>' lines too); the count must be the bundle's class count"
)


def add_classnames_flag(p: argparse.ArgumentParser, help: str = CLASSNAMES_HELP) -> None:
    """``--classnames FILE``: real names for a bundle's classes (tables, predictions)."""
    p.add_argument("--classnames", metavar="FILE", help=help)


def named_bundle(bundle: Any, classnames_file: str | None) -> Any:
    """``bundle`` with the names of ``--classnames`` (as it is without the flag).

    Raises:
        ConfigError: the file's name count differs from the bundle's class count (both named).
    """
    if not classnames_file:
        return bundle
    from clipadapt.data.classnames import read_classnames, with_classnames

    return with_classnames(bundle, read_classnames(classnames_file, bundle.num_classes))


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
    """Where an ImageFolder tree's split lives, how its files are compared with the cache, and
    whether a registered dataset may be a partial copy."""
    p.add_argument(
        "--partial",
        action="store_true",
        help="accept a partial copy of a registered dataset or ImageNet variant (its class "
        "and image counts are not checked; its numbers are then not comparable with "
        "published ones)",
    )
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
