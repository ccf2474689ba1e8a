"""The README's five-minute tour, run as written: its shell commands one by one, then its Python
block, in a fresh empty folder, offline, through the ``clipadapt`` command."""

from __future__ import annotations

import os
import re
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def tour_blocks() -> list[tuple[str, str]]:
    """``(language, code)`` of every fenced block of the README's tour section, in order."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    start = text.index("## A five-minute tour")
    end = text.find("\n## ", start + 1)
    section = text[start : end if end != -1 else len(text)]
    return re.findall(r"```(\w+)\n(.*?)```", section, flags=re.DOTALL)


def shell_commands(code: str) -> list[str]:
    """The commands of a bash block: continuation lines joined, comment lines dropped."""
    joined = code.replace("\\\n", " ")
    return [
        line.strip() for line in joined.splitlines() if line.strip() and not line.startswith("#")
    ]


def test_the_tour_has_its_steps():
    blocks = tour_blocks()
    assert [lang for lang, _ in blocks] == ["bash", "python"]
    commands = shell_commands(blocks[0][1])
    assert all(c.startswith("clipadapt ") for c in commands)
    verbs = [c.split()[1] for c in commands]
    for verb in ("extract", "fit", "evaluate", "predict", "bench", "report", "run"):
        assert verb in verbs
    # the tour uses only the embedded backbone: it must run offline
    for command in commands:
        if "--backbone" in command:
            assert "--backbone world" in command, command


def test_readme_tour(tmp_path):
    """Runs every command of the tour in an empty folder, offline; each must exit 0."""
    work = tmp_path / "tour"
    work.mkdir()
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    shim = bin_dir / "clipadapt"  # `clipadapt` as installed, on this interpreter
    shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m clipadapt.cli "$@"\n')
    shim.chmod(0o755)
    env = {
        **os.environ,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "CLIPADAPT_CACHE": str(tmp_path / "cache"),  # a fresh feature cache
    }
    (bash, commands_code), (python, python_code) = tour_blocks()
    assert (bash, python) == ("bash", "python")
    started = time.perf_counter()
    outputs = {}
    for command in shell_commands(commands_code):
        done = subprocess.run(
            ["bash", "-c", command],
            cwd=work,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0, f"{command}\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}"
        outputs[command.split()[1]] = done.stdout
    done = subprocess.run(
        [sys.executable, "-c", python_code],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    seconds = time.perf_counter() - started
    cpu = resource.getrusage(resource.RUSAGE_CHILDREN)

    # what the tour says it makes is there, and accuracies read as percentages
    assert re.search(r"accuracy \d+\.\d+% on test", outputs["evaluate"])
    assert re.search(r"^\s+\d+\.\d+%  \S", outputs["predict"], flags=re.MULTILINE)
    assert outputs["predict"].count("three_identical_shapes/") >= 3
    assert (work / "feats" / "count.safetensors").is_file()
    assert (work / "adapters" / "tip" / "config.json").is_file()
    assert len((work / "results.jsonl").read_text().splitlines()) == 2 * 3 * 2
    assert (work / "report" / "accuracy_vs_shots.png").is_file()
    assert "± is the population standard deviation over seeds" in outputs["report"]
    assert (work / "runs" / "first" / "result.json").is_file()
    assert re.match(r"\d+\.\d %", done.stdout)
    # wall time depends on the machine's load; CPU time of the commands is the steadier figure
    print(f"README tour: {seconds:.1f}s wall, {cpu.ru_utime + cpu.ru_stime:.1f}s CPU")
