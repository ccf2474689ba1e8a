"""The ``clipadapt`` command: the top-level parser, dispatch to the verb groups, error mapping.

Each verb group is a module with ``register_cli(subparsers)`` that adds its sub-commands and sets
``handler`` on each (see :data:`VERB_GROUPS`); handlers import the library lazily, so
``clipadapt --help`` imports no torch, and handlers check the paths they are given before they
import it. Every verb gets one help layout (:class:`~clipadapt.cli._common.HelpFormatter`:
defaults shown, its ``Example:`` kept as written) and accepts the global ``--debug``/``-v`` after
the verb too. Errors meant for users print one line naming the problem and the fix and exit with
code 2; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import logging
import sys
from collections.abc import Sequence

from clipadapt.cli._common import HelpFormatter, default_text
from clipadapt.exceptions import ClipadaptError

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


#: The modules that add verbs, in the order of ``clipadapt --help``. A new verb group is a module
#: with ``register_cli(subparsers)`` (adding its sub-commands, each with ``set_defaults(handler=)``)
#: listed here.
VERB_GROUPS = (
    "clipadapt.cli.methods",  # list-methods, info
    "clipadapt.cli.features",  # extract
    "clipadapt.cli.adapters",  # fit, evaluate, run, predict
    "clipadapt.cli.bench",  # bench, report
    "clipadapt.cli.demo",  # demo
    "clipadapt.cli.export_import",  # export, import tip-adapter | arrays
    "clipadapt.cli.episodes",  # episodes bongard-hoi
)
#: Groups whose package may be left out of an install (their verbs then do not exist).
OPTIONAL_VERB_GROUPS = ("clipadapt.world.cli",)  # world generate | pretrain | episodes | evaluate


def build_parser() -> argparse.ArgumentParser:
    """The full ``clipadapt`` parser (global flags plus every verb group's sub-commands)."""
    parser = argparse.ArgumentParser(
        prog="clipadapt",
        description="Adapt CLIP-style models to few-shot classification on cached features.",
        epilog=EXAMPLES,
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    parser.add_argument(
        "--deterministic",
        action="store_true",
        help="use only deterministic kernels: torch.use_deterministic_algorithms(True), "
        "cudnn.benchmark off, CUBLAS_WORKSPACE_CONFIG=:4096:8 when unset (GPU runs repeat "
        "bit for bit; slower)",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in VERB_GROUPS:
        importlib.import_module(name).register_cli(sub)
    for name in OPTIONAL_VERB_GROUPS:
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        module.register_cli(sub)
    for _, verb in verb_parsers(parser):
        _teach(verb)
    return parser


def verb_parsers(parser: argparse.ArgumentParser) -> list[tuple[str, argparse.ArgumentParser]]:
    """Every sub-command parser under ``parser``, groups (``world``, ``import``) and their
    verbs alike, as ``("world generate", parser)`` in registration order."""
    found: list[tuple[str, argparse.ArgumentParser]] = []

    def walk(p: argparse.ArgumentParser, prefix: str) -> None:
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, child in action.choices.items():
                    path = f"{prefix} {name}".strip()
                    found.append((path, child))
                    walk(child, path)

    walk(parser, "")
    return found


def _teach(verb: argparse.ArgumentParser) -> None:
    """One help layout for every verb (defaults shown, examples kept as written), and the
    global ``--debug``/``-v`` accepted after the verb too (``clipadapt fit ... --debug``).

    The verb's copies default to SUPPRESS, so they set the value only when given and never
    reset what was given before the verb.
    """
    verb.formatter_class = HelpFormatter
    for action in verb._actions:
        # argparse prints nothing for an option without help, so its default would not show
        shown = default_text(action)
        if action.help is None and shown is not None:
            action.help = f"default: {shown}"
    given = verb._option_string_actions
    if "--debug" not in given:
        verb.add_argument(
            "--debug",
            action="store_true",
            default=argparse.SUPPRESS,
            help="show tracebacks on errors",
        )
    if "-v" not in given and "--verbose" not in given:
        verb.add_argument(
            "-v",
            "--verbose",
            action="store_true",
            default=argparse.SUPPRESS,
            help="log progress details",
        )


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
    handler = getattr(args, "handler", None)
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
