"""``clipadapt world ...``: generate the world datasets and episodes, pre-train, evaluate.

The main command line calls :func:`register_cli` to add the ``world`` group. Handlers print a
short summary and return an exit code; user errors raise :class:`~clipadapt.exceptions.ConfigError`
or :class:`~clipadapt.exceptions.DatasetError`.
"""

from __future__ import annotations

import argparse
import json
import shlex
import time
from pathlib import Path
from typing import Any

from clipadapt.exceptions import ConfigError


def _generate(args: argparse.Namespace) -> int:
    from clipadapt.world.datasets import generate_world_datasets

    start = time.perf_counter()
    names = args.datasets.split(",") if args.datasets else None
    paths = generate_world_datasets(args.out, size=args.size, seed=args.seed, names=names)
    for p in paths:
        split = json.loads((p / "split.json").read_text())
        counts = ", ".join(f"{k} {len(v)}" for k, v in split.items())
        print(f"{p.name}: {counts}")
    print(f"{len(paths)} datasets in {args.out} ({time.perf_counter() - start:.1f}s)")
    return 0


def _twin_weights(text: str | None) -> tuple[float, ...] | None:
    from clipadapt.world.generator import TWIN_KINDS

    if not text:
        return None
    try:
        weights = tuple(float(w) for w in text.split(","))
    except ValueError:
        weights = ()
    if len(weights) != len(TWIN_KINDS) or min(weights) < 0 or sum(weights) <= 0:
        raise ConfigError(
            f"--twin-weights {text!r}: give {len(TWIN_KINDS)} comma-separated non-negative "
            f"numbers, one per twin kind ({','.join(TWIN_KINDS)}), e.g. 0.4,0.2,0.15,0.25"
        )
    return weights


def _pretrain(args: argparse.Namespace) -> int:
    import logging

    from clipadapt.world.pretrain import pretrain

    if not args.out.endswith(".safetensors"):
        raise ConfigError(f"--out must name a .safetensors file, got {args.out!r}")
    if args.family_size < 2:
        raise ConfigError(
            f"--family-size must be at least 2 (a scene and one twin), got {args.family_size}"
        )
    logging.getLogger("clipadapt.world.pretrain").setLevel(logging.INFO)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s")
    command = (
        f"clipadapt world pretrain --out {shlex.quote(args.out)} --steps {args.steps} "
        f"--batch-size {args.batch_size} --lr {args.lr} --warmup {args.warmup} "
        f"--seed {args.seed} --threads {args.threads}"
    )
    if args.init:
        command += f" --init {shlex.quote(args.init)} --step-offset {args.step_offset}"
    if args.twin_prob:
        command += f" --twin-prob {args.twin_prob}"
    if args.family_size != 2:
        command += f" --family-size {args.family_size}"
    if args.twin_weights:
        command += f" --twin-weights {args.twin_weights}"
    weights = _twin_weights(args.twin_weights)
    card = pretrain(
        args.out,
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
        warmup=args.warmup,
        log_every=args.log_every,
        threads=args.threads,
        command=command,
        init=args.init,
        step_offset=args.step_offset,
        twin_prob=args.twin_prob,
        family_size=args.family_size,
        twin_weights=weights,
    )
    curve = card["loss_curve"]
    print(
        f"wrote {args.out}: {card['steps_done']} steps in {card['train_seconds']:.0f}s, "
        f"loss {curve[0]['loss']:.3f} -> {curve[-1]['loss']:.3f}"
    )
    return 0


def _episodes(args: argparse.Namespace) -> int:
    from clipadapt.world.episodes import generate_episodes

    concepts = tuple(args.concepts.split(",")) if args.concepts else None
    kwargs: dict[str, Any] = {"concepts": concepts} if concepts else {}
    path = generate_episodes(
        args.out,
        n_episodes=args.n,
        n_support=args.support,
        n_query=args.query,
        seed=args.seed,
        **kwargs,
    )
    print(f"wrote {args.n} episodes to {path} (images in {Path(path).stem}_images/)")
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from clipadapt.world.evaluate import evaluate_world_model

    report = evaluate_world_model(
        args.card, args.data, size=args.size, seed=args.seed, update_card=args.update_card
    )
    print("| dataset | zero-shot (best text) | text | prototype 16 | linear probe 16 |")
    print("|---|---|---|---|---|")
    for name, r in report["datasets"].items():
        print(
            f"| {name} | {r['zero_shot_best']:.1f} | {r['best_text']} | "
            f"{r['prototype_16']:.1f} | {r['linear_probe_16']:.1f} |"
        )
    print(json.dumps(report["summary"]))
    print("\nwhat the image features carry (linear probes on one-object scenes):")
    print("| attribute | classes | chance | probe 16 | probe all |")
    print("|---|---|---|---|---|")
    for name, r in report["attribute_probes"].items():
        print(
            f"| {name} | {r['classes']} | {r['chance']:.1f} | {r['probe_16']:.1f} | "
            f"{r['probe_all']:.1f} |"
        )
    return 0


def register_cli(subparsers: Any) -> None:
    """Add the ``world`` command group (``generate``, ``pretrain``, ``episodes``, ``evaluate``)."""
    world = subparsers.add_parser(
        "world",
        help="the embedded procedural world and its small CLIP",
        description="The embedded procedural image world: write its datasets and reasoning "
        "episodes, pre-train its small CLIP, and measure that model. Everything runs offline "
        "on a CPU.",
        epilog="Example:\n  clipadapt world generate --out world-data --size small",
    )
    sub = world.add_subparsers(dest="world_command", required=True)

    p = sub.add_parser(
        "generate",
        help="write the world datasets (cached)",
        description="Write the world's image datasets as clipadapt dataset folders (split.json, "
        "dataset.json, the images) under --out, one folder per dataset; a folder already "
        "written with the same settings is kept.",
        epilog="Example:\n  clipadapt world generate --out world-data --size small "
        "--datasets world_count",
    )
    p.add_argument("--out", required=True, help="root folder of the dataset folders")
    p.add_argument(
        "--size",
        choices=("default", "small"),
        default="default",
        help="images per class (small: a few, for quick tries)",
    )
    p.add_argument("--seed", type=int, default=0, help="generator seed")
    p.add_argument("--datasets", help="comma-separated subset of the world dataset names")
    p.set_defaults(handler=_generate)

    p = sub.add_parser(
        "pretrain",
        help="train the world CLIP contrastively (CPU)",
        description="Train a world CLIP from scratch (or from --init) on generated image-caption "
        "pairs with the contrastive loss; writes the weights and a model card beside them.",
        epilog="Example:\n  clipadapt world pretrain --out my-world.safetensors --steps 200",
    )
    p.add_argument("--out", required=True, help="checkpoint .safetensors (card: same stem .json)")
    p.add_argument("--steps", type=int, default=2000, help="optimiser steps")
    p.add_argument("--batch-size", type=int, default=128, help="image-caption pairs per step")
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate")
    p.add_argument("--warmup", type=int, default=100, help="linear warm-up steps")
    p.add_argument("--seed", type=int, default=0, help="initialisation and data seed")
    p.add_argument("--log-every", type=int, default=25, help="steps between log lines")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--init", help="continue from this checkpoint instead of random weights")
    p.add_argument("--step-offset", type=int, default=0, help="data seed offset (continuations)")
    p.add_argument(
        "--twin-prob",
        type=float,
        default=0.0,
        help="share of scenes followed by a minimal-pair twin (shape, texture, stripe "
        "orientation or positions changed) in their batch; makes the loss need those attributes",
    )
    p.add_argument(
        "--family-size",
        type=int,
        default=2,
        help="scenes per twin family including the original (2: one twin); a family's twins "
        "all change the same attribute, so the batch holds several hard negatives at once",
    )
    p.add_argument(
        "--twin-weights",
        help="relative weights of the twin kinds shape,texture,orientation,swap "
        "(default: uniform over those that apply), e.g. 0.4,0.2,0.15,0.25",
    )
    p.set_defaults(handler=_pretrain)

    p = sub.add_parser(
        "episodes",
        help="write few-shot reasoning episodes (JSON + images)",
        description="Write few-shot reasoning episodes of the world (conjunctions, relations, "
        "counts): each episode has support and query images per label; the JSON file lists "
        "them and clipadapt bench --episodes scores methods on them.",
        epilog="Example:\n  clipadapt world episodes --out episodes/world.json --n 30",
    )
    p.add_argument("--out", required=True, help="episodes JSON file")
    p.add_argument("--n", type=int, default=30, help="number of episodes")
    p.add_argument("--support", type=int, default=4, help="support images per label")
    p.add_argument("--query", type=int, default=8, help="query images per label")
    p.add_argument("--seed", type=int, default=0, help="generator seed")
    p.add_argument("--concepts", help="comma-separated: conjunction,relation,count")
    p.set_defaults(handler=_episodes)

    p = sub.add_parser(
        "evaluate",
        help="zero-shot and 16-shot accuracy of a world CLIP",
        description="Measure a world CLIP on the world datasets: zero-shot accuracy and "
        "16-shot prototype and linear-probe accuracy, in percent, one row per dataset; then "
        "linear probes of what its image features carry.",
        epilog="Example:\n  clipadapt world evaluate --data world-data --size small",
    )
    p.add_argument("--card", help="model card JSON (default: the shipped one)")
    p.add_argument("--data", default="world-data", help="world datasets root (generated if absent)")
    p.add_argument(
        "--size", choices=("default", "small"), default="default", help="world dataset size"
    )
    p.add_argument("--seed", type=int, default=0, help="generator seed")
    p.add_argument("--update-card", action="store_true", help="record the result in the card")
    p.set_defaults(handler=_evaluate)
