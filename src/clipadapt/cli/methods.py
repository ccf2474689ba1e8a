"""``clipadapt list-methods`` and ``clipadapt info``: the method registry."""

from __future__ import annotations

import argparse
from typing import Any

from clipadapt.cli._common import write_json


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
    print("hyperparameters (default, allowed values):")
    for key, value in sorted(cls._defaults().items()):
        print(f"  {key} = {value!r}  ({card.describe_option(key)})")
    doc = (cls.__doc__ or "").strip()
    if doc:
        print("\n" + doc)
    return 0


def register_cli(sub: Any) -> None:
    """Add ``list-methods`` and ``info``."""
    p = sub.add_parser("list-methods", help="list registered methods")
    p.add_argument("--filter", default="*", help="wildcard, e.g. '*adapter*'")
    p.add_argument("--json", help="also write the list as JSON to this file")
    p.set_defaults(handler=cmd_list_methods)

    p = sub.add_parser("info", help="show one method's card and hyperparameters")
    p.add_argument("method")
    p.set_defaults(handler=cmd_info)
