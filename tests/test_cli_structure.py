"""The command line's shape: verb groups register themselves, help is fast and torch-free."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from clipadapt.cli import build_parser
from clipadapt.cli.main import OPTIONAL_VERB_GROUPS, VERB_GROUPS

VERBS = {
    "list-methods",
    "info",
    "extract",
    "fit",
    "evaluate",
    "run",
    "predict",
    "bench",
    "report",
    "demo",
    "world",
}


def _verbs(parser) -> dict:
    action = next(a for a in parser._actions if a.dest == "command")
    return action.choices


def test_every_verb_comes_from_a_group_module_with_a_handler():
    verbs = _verbs(build_parser())
    assert VERBS <= set(verbs)
    leaves = []
    for name, sub in verbs.items():
        nested = [a for a in sub._actions if isinstance(a, argparse._SubParsersAction)]
        if nested:  # a nested group (world, import): its own sub-commands carry the handlers
            leaves += [(f"{name} {k}", p) for k, p in nested[0].choices.items()]
        else:
            leaves.append((name, sub))
    for name, sub in leaves:
        assert callable(sub.get_default("handler")), f"{name} has no handler"
    # every group is a module of its own; the main module only dispatches
    assert len(set(VERB_GROUPS) | set(OPTIONAL_VERB_GROUPS)) >= 6


@pytest.mark.parametrize("argv", [["--help"], ["bench", "--help"], ["predict", "--help"]])
def test_help_answers_without_importing_torch(argv):
    code = (
        "import sys\n"
        "from clipadapt.cli import main\n"
        "try:\n"
        f"    main({argv!r})\n"
        "except SystemExit:\n"
        "    pass\n"
        "sys.stderr.write('TORCH=' + str('torch' in sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "usage: clipadapt" in done.stdout
    assert done.stderr.strip().endswith("TORCH=False"), done.stderr[-2000:]


def test_python_dash_m_runs_the_same_command():
    done = subprocess.run(
        [sys.executable, "-m", "clipadapt.cli", "list-methods", "--filter", "coop"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("coop")
