"""``clipadapt episodes``: benchmark episode files in the format ``clipadapt bench --episodes``
reads (``episodes bongard-hoi``: the Bongard-HOI release's split files)."""

from __future__ import annotations

import argparse
from typing import Any

from clipadapt.cli._common import write_json

BONGARD_HOI_EXAMPLE = """Example:
  clipadapt episodes bongard-hoi --annotations bongard_hoi/bongard_hoi_release \\
      --images bongard_hoi/hake/images --out bongard_hoi/bongard_hoi_test.json"""


def cmd_bongard_hoi(args: argparse.Namespace) -> int:
    from clipadapt.data.bongard_hoi import bongard_hoi_episode_file
    from clipadapt.tasks.episodes import read_episode_doc

    out = bongard_hoi_episode_file(
        args.annotations,
        args.images,
        args.out,
        split=args.split,
        check_files=not args.no_check_files,
    )
    doc = read_episode_doc(out)
    counts: dict[str, int] = {}
    for episode in doc["episodes"]:
        counts[episode.get("subset", "all")] = counts.get(episode.get("subset", "all"), 0) + 1
    labels = doc.get("subset_labels") or {}
    print(f"wrote {len(doc['episodes'])} Bongard-HOI {args.split} episodes to {out}:")
    for subset, n in counts.items():
        print(f"  {subset} ({labels.get(subset, subset)}): {n}")
    print(f"run them: clipadapt bench --episodes {out} --backbone ViT-B-32:openai --methods ...")
    write_json(args.json, {"episodes": str(out), "split": args.split, "subsets": counts})
    return 0


def register_cli(sub: Any) -> None:
    """Add ``episodes`` and its sub-command ``bongard-hoi``."""
    group = sub.add_parser(
        "episodes",
        help="write benchmark episode files (Bongard-HOI) for clipadapt bench --episodes",
        description="Convert a reasoning benchmark's release into one image-episode JSON that "
        "`clipadapt bench --episodes FILE --backbone ...` encodes once and scores.",
        epilog=BONGARD_HOI_EXAMPLE,
    )
    kinds = group.add_subparsers(dest="episodes_kind", metavar="KIND", required=True)
    p = kinds.add_parser(
        "bongard-hoi",
        help="the Bongard-HOI split files -> one episode file (the four test splits)",
        description="Read the Bongard-HOI annotation files (bongard_hoi_<split>_<subset>.json: "
        "problems of 7 positive and 7 negative images sharing or lacking one human-object "
        "interaction) and write them as 2-way 6-shot episodes with one positive and one "
        "negative query each; the test split's four subsets (seen/unseen action × "
        "seen/unseen object) become the named subsets a sweep scores with 95 % intervals.",
        epilog=BONGARD_HOI_EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--annotations",
        required=True,
        metavar="DIR",
        help="the release's annotation folder (bongard_hoi_release/, from "
        "bongard_hoi_annotations.tar)",
    )
    p.add_argument(
        "--images",
        required=True,
        metavar="DIR",
        help="the image folder the annotations' im_path entries are relative to (the "
        "release's hake/images/)",
    )
    p.add_argument("--out", required=True, metavar="FILE", help="episode JSON to write")
    p.add_argument(
        "--split",
        choices=("test", "val", "train"),
        default="test",
        help="which split files to read (default test, the benchmark's table)",
    )
    p.add_argument(
        "--no-check-files",
        action="store_true",
        help="do not require every image to exist (encoding then names a missing one)",
    )
    p.add_argument("--json", help="write a JSON summary here")
    p.set_defaults(handler=cmd_bongard_hoi)
