"""Run a grid of (bundle × method × shots × seed) cells and append one JSON line per cell.

Cells already in the results file (same run id, status ok) are skipped, so a killed sweep resumes
where it stopped; ``rerun=True`` forces them again.
"""

from __future__ import annotations

import logging
import platform
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from clipadapt.bench.results import append_result, finished_ids, run_id
from clipadapt.data.bundle import FeatureBundle
from clipadapt.exceptions import ClipadaptError
from clipadapt.methods.base import create_method, get_method_class, parse_method_spec
from clipadapt.tasks.classification import SplitChoice, evaluate

log = logging.getLogger(__name__)


@dataclass
class Grid:
    """The cells of a sweep on one bundle."""

    methods: Sequence[str]
    shots: Sequence[int | None]
    seeds: Sequence[int] = (1,)
    choice: SplitChoice = field(default_factory=SplitChoice)

    def cells(self, bundle: FeatureBundle) -> list[dict[str, Any]]:
        out = []
        for spec in self.methods:
            name, params = parse_method_spec(spec)
            name = get_method_class(name).card.name
            create_method(name, **params)  # validate options before any work
            for shots in self.shots:
                for seed in self.seeds:
                    cell = {
                        "task": "classification",
                        "dataset": bundle.name,
                        "backbone": bundle.backbone,
                        "method": name,
                        "method_spec": spec,
                        "params": params,
                        "shots": shots,
                        "seed": seed,
                        "train_set": self.choice.train_set,
                        "val_set": self.choice.val_set,
                        "eval_set": self.choice.eval_set,
                        "bundle_fingerprint": bundle.fingerprint(),
                    }
                    cell["run_id"] = run_id(cell)
                    out.append(cell)
        return out


def run_grid(
    bundle: FeatureBundle,
    grid: Grid,
    out: str | Path | None,
    *,
    rerun: bool = False,
    progress: bool = True,
    text_encoder: object | None = None,
    device: str = "cpu",
    keep_going: bool = False,
) -> list[dict[str, Any]]:
    """Run every cell not yet finished in ``out``; return the records of this call's runs.

    With ``keep_going`` a cell that fails with a user-facing error (e.g. a method needing a
    tensor the bundle lacks) is recorded with ``status: "error"`` and the sweep continues.
    """
    cells = grid.cells(bundle)
    done = set() if (rerun or out is None) else finished_ids(out)
    todo = [c for c in cells if c["run_id"] not in done]
    if len(todo) < len(cells):
        log.info(
            "%d of %d cells already in %s; skipping them", len(cells) - len(todo), len(cells), out
        )
    records = []
    bar = tqdm(todo, desc=f"bench {bundle.name}", unit="run", disable=not progress)
    for cell in bar:
        bar.set_postfix_str(f"{cell['method']} K={cell['shots']} seed={cell['seed']}")
        method = create_method(cell["method"], **cell["params"])
        try:
            result = evaluate(
                method,
                bundle,
                shots=cell["shots"],
                seed=cell["seed"],
                choice=grid.choice,
                text_encoder=text_encoder,
                device=device,
            )
        except ClipadaptError as error:
            if not keep_going:
                raise
            record = {**cell, "status": "error", "error": str(error), "time": time.time()}
            log.warning("%s failed on %s: %s", cell["method"], bundle.name, error)
            if out is not None:
                append_result(out, record)
            records.append(record)
            continue
        record = {
            **cell,
            **result.to_dict(),
            "status": "ok",
            "time": time.time(),
            "versions": _versions(),
            "device": device,
        }
        record["method_spec"] = cell["method_spec"]
        if out is not None:
            append_result(out, record)
        records.append(record)
    return records


def _versions() -> dict[str, str]:
    from clipadapt import __version__

    return {
        "clipadapt": __version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
