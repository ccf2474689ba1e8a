"""NODE-Adapter's paper schedule on the benchmarks' ImageNet-16-shot-shaped problem, per step.

Issue 21's speed targets on the synthetic problem of ``python -m benchmarks`` (1000 classes x
16 shots x 1024 dims, 10 views; :func:`benchmarks.suite.make_problem` with the ``full``
profile). A whole paper-schedule fit there takes hours on 2 cores, so this times what a fit is
made of, the same way on any checkout:

- ``same maths``: the spec's dynamics with the start search off (what both checkouts run), two
  probes of ``n`` and ``2n`` optimiser steps under ``limit_steps`` -> seconds per step and the
  fixed cost (after a 1-step warm-up that holds the row's peak memory); matmul FLOPs of a 1- and a 2-step fit -> FLOPs per step; this machine's GEMM
  rate measured in the same run -> the step's GEMM floor and how far the step is from it; the
  paper schedule's planned steps -> its projected fit time; peak resident memory of the probe;
- with ``new`` also: the same probes with the adjoint forced on and off (memory of both paths),
  the default configuration's fixed cost (its staged start search), and the ``fast`` preset's
  whole fit, measured to the end, with its start's and its trained test accuracy.

Each row runs in a fresh process, so its peak memory is its own.

One JSON line per row goes to ``--out`` (appended) and a readable line to stdout. Run it once
per checkout in one machine state, the checkout's package first on the path::

    PYTHONPATH=<old checkout>/src:. python benchmarks/node_scale.py old --out node-scale.jsonl
    PYTHONPATH=src:. python benchmarks/node_scale.py new --out node-scale.jsonl
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

import clipadapt
from benchmarks.measure import count_matmul_flops, gemm_rate, peak_memory, recording_plan
from benchmarks.suite import PROFILES, accuracy, make_problem

SAME_MATHS = {"search": False, "select_on_val": False}


def probe(problem: Any, options: dict[str, Any], steps: int) -> dict[str, Any]:
    """Seconds per optimiser step, fixed seconds, FLOPs and peak memory of ``options``."""

    def fit(limit: int | None) -> tuple[float, Any]:
        method = clipadapt.create_method("node_adapter", **options)
        with recording_plan(limit) as plan:
            started = time.perf_counter()
            method.fit(problem.train, problem.text, problem.val)
            seconds = time.perf_counter() - started
        return seconds, plan

    # a 1-step warm-up in the row's fresh process holds its peak memory; the timed probes
    # then run on memory the allocator already has (otherwise the first probe alone pays for
    # the page faults, which biases the difference of the two)
    with peak_memory() as memory:
        fit(1)
    t_n, plan = fit(steps)
    t_2n, _ = fit(2 * steps)
    per_step = max((t_2n - t_n) / steps, 1e-9)
    flops_1, _ = count_matmul_flops(lambda: fit(1))
    flops_2, _ = count_matmul_flops(lambda: fit(2))
    step_flops = max(flops_2 - flops_1, 0)
    return {
        "probe_steps": [steps, 2 * steps],
        "seconds_per_step": per_step,
        "fixed_seconds": max(t_n - steps * per_step, 0.0),
        "flops_per_step": step_flops,
        "fixed_flops": max(flops_1 - step_flops, 0),
        "planned_steps": plan.planned_steps,
        "peak_mib": memory["peak_mib"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("checkout", help="a label for the checkout on the path (old, new, ...)")
    parser.add_argument("--steps", type=int, default=2, help="probe steps n (probes: n and 2n)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, help="JSON lines are appended here")
    parser.add_argument(
        "--rows",
        help="comma list of same, adjoint, direct, default, fast (default: same on old, all on new)",
    )
    parser.add_argument("--profile", choices=sorted(PROFILES), default="full", help="problem size")
    parser.add_argument("--options", default="{}", help="JSON options added to every row's fit")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    new = args.checkout != "old"

    def emit(label: str, row: dict[str, Any]) -> None:
        row = {"checkout": args.checkout, "row": label, "commit_package": clipadapt.__file__, **row}
        rate = gemm_rate(2048)
        row["gemm_gflops"] = rate / 1e9
        if "flops_per_step" in row:
            floor = row["flops_per_step"] / rate
            row["step_floor_seconds"] = floor
            row["step_floor_ratio"] = row["seconds_per_step"] / max(floor, 1e-12)
            row["projected_fit_seconds"] = (
                row["fixed_seconds"] + row["planned_steps"] * row["seconds_per_step"]
            )
        shown = {k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()}
        print(json.dumps(shown), flush=True)
        if args.out:
            with args.out.open("a") as f:
                f.write(json.dumps(row) + "\n")

    # the spec's dynamics: the old checkout has no gradient term, the new one turns it off
    same = dict(SAME_MATHS, **({"gradient_gain": 0.0} if new else {}))
    rows = {
        "same": ("same maths (default back-propagation)", same, args.steps),
        "adjoint": ("same maths, adjoint=True", dict(same, adjoint=True), 1),
        "direct": (
            "same maths, direct, nothing recomputed",
            dict(same, adjoint=False, recompute=0.0),
            1,
        ),
        # the default configuration: its start search is a fixed cost on top of the same steps
        "default": ("default configuration", {}, 1),
    }
    wanted = args.rows.split(",") if args.rows else (list(rows) + ["fast"] if new else ["same"])
    if len(wanted) > 1:
        # one fresh process per row, so each row's peak memory is its own
        for name in wanted:
            argv = [sys.executable, __file__, args.checkout, "--rows", name]
            argv += ["--steps", str(args.steps), "--threads", str(args.threads)]
            argv += ["--profile", args.profile, "--options", args.options]
            argv += ["--out", str(args.out)] if args.out else []
            subprocess.run(argv, check=True)
        return
    name = wanted[0]
    problem = make_problem(PROFILES[args.profile])
    extra = json.loads(args.options)
    if name in rows:
        label, options, steps = rows[name]
        emit(label, probe(problem, {**options, **extra}, steps))
        return
    with peak_memory() as memory:
        method = clipadapt.create_method("node_adapter", preset="fast", **extra)
        started = time.perf_counter()
        method.fit(problem.train, problem.text, problem.val)
        seconds = time.perf_counter() - started
    # the "start": the same validation-chosen blend with no flow (t_end = 0)
    start = clipadapt.create_method("node_adapter", preset="fast", **{**extra, "t_end": 0.0})
    start.fit(problem.train, problem.text, problem.val)
    emit(
        "fast preset, whole fit",
        {
            "options": extra,
            "fit_seconds": seconds,
            "peak_mib": memory["peak_mib"],
            "test_accuracy": accuracy(method.logits(problem.test.features), problem.test.labels),
            "start_test_accuracy": accuracy(
                start.logits(problem.test.features), problem.test.labels
            ),
            "best_params": getattr(method, "best_params_", {}),
        },
    )


if __name__ == "__main__":
    main()
