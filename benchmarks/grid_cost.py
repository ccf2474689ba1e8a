"""``python -m benchmarks.grid_cost``: what a ``clipadapt bench`` grid costs, cell by cell.

Runs the cells of one or more sweep YAML files through the bench (``run_cells``, in this
process), usually with fewer seeds than the grid, and measures this machine's float32 GEMM
rate (1024² products, the torch threads of this process) between cells. On a shared, loaded
machine a cell's wall time says little by itself; its wall time times the GEMM rate measured
around it is the work it needs in *GEMM-equivalent GFLOP*, which divides by an idle machine's
rate to give the idle wall time. The projection assumes the cell's elementwise work slows down
with the load as its GEMMs do (both share the same cores).

Writes one JSON line per cell to ``--out`` (cell, wall seconds, fit/predict seconds, the GEMM
rates before and after) and prints the projection: ``sum(work) x grid seeds / measured seeds /
(workers x idle rate)``.

Example (the issue-17 real grid, one seed measured, fast presets):
    python -m benchmarks.grid_cost docs/grids/vitb32-imagenet.yaml \\
        docs/grids/vitb32-image-only.yaml --bundle-dir ../shared/data/clip_vitb32 \\
        --profile fast --seeds 1 --threads 1 --out grid-cost.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

GEMM_SIZE = 1024


def project(rows: list[dict[str, Any]], idle_gflops: float, workers: int, factor: float) -> float:
    """Idle wall seconds of the grid: the cells' GEMM-equivalent work x ``factor`` (grid seeds
    / measured seeds) over ``workers`` cores at ``idle_gflops`` each (perfect balance)."""
    work = sum(row["work_gflop"] for row in rows)
    return work * factor / (workers * idle_gflops)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.grid_cost",
        description="Run a bench grid cell by cell with a GEMM reference between cells; "
        "project its wall time on an idle machine.",
    )
    parser.add_argument("configs", nargs="+", type=Path, help="sweep YAML files")
    parser.add_argument("--bundle-dir", type=Path, required=True)
    parser.add_argument(
        "--profile",
        choices=("paper", "fast"),
        default="paper",
        help="the schedules, as `clipadapt bench --profile` (fast: each method's fast preset)",
    )
    parser.add_argument("--seeds", default="1", help="seeds measured (default 1)")
    parser.add_argument("--grid-seeds", type=int, default=3, help="seeds of the real grid (3)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--workers", type=int, default=2, help="idle cores of the projection")
    parser.add_argument(
        "--idle-gflops",
        type=float,
        help="one idle core's float32 GEMM rate at 1024² (GFLOP/s) for the projection",
    )
    parser.add_argument("--out", type=Path, required=True, help="one JSON line per cell")
    args = parser.parse_args(argv)
    import torch

    from benchmarks.measure import gemm_rate
    from clipadapt.bench.resolve import resolve_sweep
    from clipadapt.bench.runner import run_cells
    from clipadapt.bench.spec import load_sweep, profile_methods

    torch.set_num_threads(args.threads)
    seeds = [int(s) for s in args.seeds.split(",")]
    rows: list[dict[str, Any]] = []
    for config in args.configs:
        spec = load_sweep(config, [f"seeds={seeds}"])
        spec.bundle_dir = str(args.bundle_dir.resolve())
        spec.methods = profile_methods(spec.methods, args.profile)
        resolved = resolve_sweep(spec, progress=False)
        for what, why in resolved.skipped:
            print(f"skipped: {what}: {why}")
        for cell in resolved.cells:
            before = gemm_rate(GEMM_SIZE) / 1e9
            started = time.perf_counter()
            records = run_cells([cell], None, progress=False)
            wall = time.perf_counter() - started
            after = gemm_rate(GEMM_SIZE) / 1e9
            ok = [r for r in records if r.get("status") == "ok"]
            row = {
                "config": config.name,
                "dataset": cell.dataset,
                "method": cell.method_spec,
                "shots": cell.shots,
                "seed": cell.seed,
                "status": "ok" if len(ok) == len(records) else "error",
                "wall_seconds": wall,
                "fit_seconds": sum(r.get("fit_seconds", 0.0) for r in ok),
                "predict_seconds": sum(r.get("predict_seconds", 0.0) for r in ok),
                "accuracy": [r.get("accuracy") for r in ok],
                "gemm_gflops_before_after": [before, after],
                "work_gflop": wall * (before + after) / 2.0,
                "load_average": list(os.getloadavg()),
                "threads": args.threads,
            }
            rows.append(row)
            with args.out.open("a") as handle:
                handle.write(json.dumps(row) + "\n")
            print(
                f"{row['dataset']} {row['method']} {row['shots']}-shot seed {row['seed']}: "
                f"{wall:.1f}s at {row['work_gflop'] / wall:.0f} GFLOP/s -> "
                f"{row['work_gflop']:.0f} GFLOP-equivalents",
                flush=True,
            )
    factor = args.grid_seeds / len(seeds)
    total = sum(row["work_gflop"] for row in rows)
    print(f"{len(rows)} cells, {total:,.0f} GEMM-equivalent GFLOP measured (x{factor:g} seeds)")
    by_method: dict[str, float] = {}
    for row in rows:
        by_method[row["method"]] = by_method.get(row["method"], 0.0) + row["work_gflop"]
    for method, work in sorted(by_method.items(), key=lambda item: -item[1]):
        print(f"  {method}: {work:,.0f} GFLOP-equivalents ({100 * work / max(total, 1e-9):.1f} %)")
    if args.idle_gflops:
        seconds = project(rows, args.idle_gflops, args.workers, factor)
        print(
            f"projected wall on {args.workers} idle cores at {args.idle_gflops:g} GFLOP/s each: "
            f"{seconds:,.0f} s ({seconds / 60:.1f} min)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
