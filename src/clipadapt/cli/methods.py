"""``clipadapt list-methods`` and ``clipadapt info``: the method registry."""

from __future__ import annotations

import argparse
import re
from typing import Any

from clipadapt.cli._common import example, write_json

#: A path inside the source repository (``docs/methods/coop.md``, ``specs/x.md``): an installed
#: clipadapt has no such files, so ``info`` never prints one.
_REPO_PATH = re.compile(r"`{0,2}\b(?:docs|specs|src|tests|benchmarks)/[\w./§-]*\w`{0,2}")


def without_repo_paths(text: str) -> str:
    """``text`` with every repository-relative document path replaced by words."""
    return _REPO_PATH.sub("the project documentation", text)


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
    write_json(args.json, rows)
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from clipadapt.methods.base import get_method_class

    cls = get_method_class(args.method)
    card = cls.card

    def say(text: str) -> None:
        # an installed clipadapt has no repository documents: name none of them
        print(without_repo_paths(text))

    say(f"{card.name}: {card.summary}")
    if card.paper:
        say(f"paper: {card.paper} (arXiv {card.arxiv})")
    say(
        f"needs: {', '.join(card.needs)}; trainable: {card.trainable}; uses views: {card.uses_views}"
    )
    if card.searched:
        say(
            "searched on validation data: "
            + "; ".join(f"{k} over {v}" for k, v in card.searched.items())
        )
    say("hyperparameters (default, allowed values):")
    for key, value in sorted(cls._defaults().items()):
        say(f"  {key} = {value!r}  ({card.describe_option(key)})")
    doc = (cls.__doc__ or "").strip()
    if doc:
        say("\n" + doc)
    return 0


def register_cli(sub: Any) -> None:
    """Add ``list-methods`` and ``info``."""
    p = sub.add_parser(
        "list-methods",
        help="list registered methods",
        description="List the registered few-shot methods, one line each: name, whether it "
        "trains, and what it is.",
        epilog=example("clipadapt list-methods --filter '*adapter*'"),
    )
    p.add_argument("--filter", default="*", help="wildcard on the name, e.g. '*adapter*'")
    p.add_argument("--json", help="also write the list as JSON to this file")
    p.set_defaults(handler=cmd_list_methods)

    p = sub.add_parser(
        "info",
        help="show one method's card and hyperparameters",
        description="Show one method's card: its paper, what it needs from a feature bundle, "
        "which hyperparameters are searched on validation data, and every hyperparameter with "
        "its default and allowed values (set them as NAME:key=value,...).",
        epilog=example("clipadapt info tip_adapter"),
    )
    p.add_argument("method", help="registered method name (clipadapt list-methods)")
    p.set_defaults(handler=cmd_info)
