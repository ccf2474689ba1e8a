"""A command line that teaches: every verb's help has a description, its defaults and one example;
global flags work after the verb; needed options are required; path errors and help answer fast,
without torch; ``info`` names no repository document; ``create_method`` takes the CLI's spec."""

from __future__ import annotations

import argparse
import re
import shlex
import subprocess
import sys

import pytest

import clipadapt
from clipadapt.cli import build_parser, main
from clipadapt.cli.main import verb_parsers
from clipadapt.cli.methods import without_repo_paths
from clipadapt.exceptions import ConfigError

#: ``Example:`` then a command, on the same line or the next.
EXAMPLE = re.compile(r"^Example:\s*(\n\s+)?clipadapt \S", re.MULTILINE)
#: A path inside the source repository, which an installed clipadapt does not have.
REPO_PATH = re.compile(r"\b(docs|specs|src|tests|benchmarks)/\S")

VERBS = verb_parsers(build_parser())


def test_the_walk_finds_every_verb_and_group():
    names = {name for name, _ in VERBS}
    assert {"fit", "predict", "bench", "report", "import arrays", "world generate"} <= names
    assert {"import", "world"} <= names  # the groups themselves too
    assert len(names) >= 19


@pytest.mark.parametrize("name,parser", VERBS, ids=[n for n, _ in VERBS])
def test_every_verb_help_has_a_description_its_defaults_and_one_example(name, parser):
    text = parser.format_help()
    assert (parser.description or "").strip(), f"{name} has no description"
    assert len(EXAMPLE.findall(text)) == 1, f"{name}: no single 'Example:' line\n{text}"
    assert not REPO_PATH.search(text), f"{name} points at a repository file\n{text}"
    for action in parser._actions:
        if not action.option_strings or action.help == argparse.SUPPRESS:
            continue
        meaningful = action.default not in (None, False, [], argparse.SUPPRESS)
        if meaningful:  # every default is shown, by the formatter or the help text itself
            assert "default" in parser._get_formatter()._get_help_string(action).lower(), (
                f"{name} {action.option_strings[0]} hides its default {action.default!r}"
            )


@pytest.mark.parametrize("name,parser", VERBS, ids=[n for n, _ in VERBS])
def test_every_example_parses(name, parser):
    """An example a user copies is a valid command line of its own verb."""
    text = parser.format_help()
    example = text[text.index("Example:") + len("Example:") :].split("\n\n")[0]
    argv = shlex.split(example.replace("\\\n", " "))[1:]
    assert " ".join(argv).startswith(name.split()[0])
    build_parser().parse_args(argv)  # SystemExit (a usage error) fails the test


def test_defaults_are_shown_by_the_formatter():
    parser = dict(VERBS)["demo"]
    text = " ".join(parser.format_help().split())
    assert "(default: 1,4,16)" in text and "(default: demo-output)" in text


@pytest.mark.parametrize("where", ["before", "after"])
def test_debug_and_verbose_work_before_and_after_the_verb(where):
    verb = ["fit", "--bundle", "b.safetensors", "--method", "zeroshot", "--out", "o"]
    flags = ["--debug", "-v"]
    argv = flags + verb if where == "before" else verb + flags
    args = build_parser().parse_args(argv)
    assert args.debug is True and args.verbose is True
    plain = build_parser().parse_args(verb)
    assert plain.debug is False and plain.verbose is False
    # given before the verb, the verb's own copy (absent) does not reset it
    assert build_parser().parse_args(["--debug", *verb]).debug is True


def test_debug_after_the_verb_shows_the_traceback(tmp_path, capsys):
    argv = ["fit", "--bundle", str(tmp_path / "no.safetensors"), "--method", "zeroshot"]
    argv += ["--out", str(tmp_path / "o")]
    assert main(argv) == 2
    assert "feature bundle not found" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="feature bundle not found"):
        main([*argv, "--debug"])


#: Verbs that do something useful without any argument (they are not run here).
RUN_WITHOUT_ARGUMENTS = {"list-methods", "demo", "world evaluate"}


@pytest.mark.parametrize("name", [n for n, _ in VERBS if n not in RUN_WITHOUT_ARGUMENTS], ids=str)
def test_a_verb_without_its_needed_options_exits_2_naming_them(name, capsys):
    try:
        code = main(name.split())
    except SystemExit as stop:  # argparse: required options or sub-command
        code = stop.code
    assert code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert any(word in err for word in ("required", "give ", "pass ")), err


def test_info_never_points_at_repository_documents(capsys):
    for name in clipadapt.list_methods():
        assert main(["info", name]) == 0
        out = capsys.readouterr().out
        assert not REPO_PATH.search(out), f"info {name} names a repository file:\n{out}"
        assert out.startswith(f"{name}: ")


def test_repository_paths_are_reworded():
    text = "Defaults follow ``specs/node_adapter.md`` §3 and docs/methods/coop.md."
    assert without_repo_paths(text) == (
        "Defaults follow the project documentation §3 and the project documentation."
    )


_PROBE = """\
import sys, time
from clipadapt.cli import main
started = time.perf_counter()
try:
    code = main({argv!r})
except SystemExit as stop:
    code = stop.code
sys.stderr.write(f"\\nRC={{code}} TORCH={{'torch' in sys.modules}} S={{time.perf_counter() - started:.3f}}")
"""


@pytest.mark.parametrize(
    "argv",
    [
        ["--help"],
        ["fit", "--help"],
        ["fit", "--bundle", "missing.safetensors", "--method", "tip_adapter", "--out", "a"],
        ["evaluate", "--adapter", "missing", "--bundle", "missing.safetensors"],
        ["predict", "missing.jpg", "--adapter", "."],
        ["bench", "--bundle", "missing.safetensors", "--methods", "zeroshot"],
        ["report", "missing.jsonl", "--out", "r"],
        ["export", "--adapter", "missing", "--out", "x.onnx"],
        ["import", "tip-adapter", "--cache-dir", "missing", "--out", "b.safetensors"],
        ["import", "arrays", "--npz", "missing.npz", "--out", "b.safetensors"],
    ],
    ids=lambda argv: "-".join(a for a in argv[:2] if "." not in a),
)
def test_help_and_path_errors_answer_fast_without_torch(argv, tmp_path):
    done = subprocess.run(
        [sys.executable, "-c", _PROBE.format(argv=argv)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    message, _, tail = done.stderr.rpartition("\nRC=")
    code, torch_loaded, seconds = (part.split("=")[-1] for part in tail.split())
    assert torch_loaded == "False", done.stderr
    if "--help" in argv:
        assert code in ("0", "None") and "usage: clipadapt" in done.stdout
    else:
        assert code == "2" and "missing" in message and "Traceback" not in message
        assert message.startswith("error: ") and message.count("\n") == 1, message
    assert float(seconds) < 1.0, f"{argv} took {seconds}s"


def test_create_method_accepts_the_cli_spec():
    method = clipadapt.create_method("tip_adapter:search_steps_beta=50")
    assert method.get_params()["search_steps_beta"] == 50
    both = clipadapt.create_method("tip_adapter:search_steps_beta=50", search_steps_alpha=7)
    assert both.get_params()["search_steps_beta"] == 50
    assert both.get_params()["search_steps_alpha"] == 7
    same = clipadapt.create_method("tip_adapter:search_steps_beta=50", search_steps_beta=50)
    assert same.get_params()["search_steps_beta"] == 50
    with pytest.raises(ConfigError, match="search_steps_beta=50 in the spec vs 20"):
        clipadapt.create_method("tip_adapter:search_steps_beta=50", search_steps_beta=20)
    with pytest.raises(ConfigError, match="no_such_option"):
        clipadapt.create_method("tip_adapter:no_such_option=1")


def test_create_method_takes_a_preset_in_the_spec():
    from clipadapt.methods.base import method_presets

    presets = method_presets("tip_adapter")
    if not presets:
        pytest.skip("no tip_adapter presets installed")
    name = sorted(presets)[0]
    from_spec = clipadapt.create_method(f"tip_adapter:preset={name}")
    as_keyword = clipadapt.create_method("tip_adapter", preset=name)
    assert from_spec.get_params() == as_keyword.get_params()
    with pytest.raises(ConfigError, match="preset"):
        clipadapt.create_method(f"tip_adapter:preset={name}", preset="other")
