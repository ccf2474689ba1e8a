"""The ``clipadapt`` command line. Thin: parses, calls the library, prints a short summary.

:mod:`clipadapt.cli.main` holds the parser, dispatch and error mapping; each verb group lives in
its own module (``methods``, ``features``, ``adapters``, ``bench``, ``demo``; the world's in
:mod:`clipadapt.world.cli`) and registers its sub-commands with ``register_cli(subparsers)``.
"""

from __future__ import annotations

from clipadapt.cli.main import build_parser, main, os_error_message, set_deterministic

__all__ = ["build_parser", "main", "os_error_message", "set_deterministic"]
