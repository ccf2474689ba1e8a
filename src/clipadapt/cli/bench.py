"""``clipadapt bench`` (sweeps) and ``clipadapt report`` (tables and plots from results)."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from clipadapt.cli._common import (
    add_dataset_flags,
    add_split_flags,
    int_list,
    positive_int,
    print_skipped,
    shots_list,
)
from clipadapt.exceptions import ClipadaptError, ConfigError


def dry_run(resolved: Any, out: str, rerun: bool) -> int:
    """Print what is done, what would run and what would fail; exit 2 when anything would."""
    from clipadapt.bench.results import finished_ids

    done = set() if rerun else finished_ids(out)
    finished = [c for c in resolved.cells if set(c.outputs) <= done]
    todo = [c for c in resolved.cells if not set(c.outputs) <= done]
    for label, cells in (("done", finished), ("run", todo)):
        for cell in cells:
            print(
                f"{label:<5} {cell.task:<22} {cell.dataset:<18} {cell.method_spec:<24} "
                f"K={cell.shots} seed={cell.seed}"
            )
    for what, why in resolved.errors:
        print(f"fail  {what}: {why}")
    print(
        f"{len(resolved.cells)} cell(s): {len(finished)} done in {out}, {len(todo)} would run; "
        f"{len(resolved.errors)} input problem(s) would stop the sweep"
    )
    print_warnings(resolved.warnings)
    print_skipped(resolved.skipped)
    return 2 if resolved.errors else 0


def print_warnings(warnings: list[tuple[str, str]]) -> None:
    """The ``warning:`` lines about a sweep's inputs (e.g. indistinguishable class names)."""
    for what, why in warnings:
        print(f"warning: {what}: {why}")


def cmd_bench(args: argparse.Namespace) -> int:
    from clipadapt.bench.execute import CellSettings, LocalExecutor, RayExecutor
    from clipadapt.bench.report import merge_notes, paper_table
    from clipadapt.bench.resolve import ResolveOptions, resolve_sweep
    from clipadapt.bench.results import latest_ok, read_results
    from clipadapt.bench.runner import check_inputs, run_cells, write_sweep_file
    from clipadapt.bench.spec import sweep_from_args
    from clipadapt.encoders.clip import select_device

    spec = sweep_from_args(args)
    progress = not args.no_progress
    device = str(select_device(args.device))  # before any work: a GPU this machine lacks
    options = ResolveOptions(fingerprint=args.fingerprint, resplit=args.resplit)
    resolved = resolve_sweep(spec, progress=progress, options=options)
    if args.dry_run:
        return dry_run(resolved, args.out, args.rerun)
    check_inputs(resolved)  # exit 2 before any run: bad bundles
    if not resolved.cells:
        print_skipped(resolved.skipped)
        raise ConfigError(
            "nothing to run: every cell of the sweep was skipped (reasons above); fix the "
            "inputs or the methods"
        )
    if args.executor == "ray":
        executor: Any = RayExecutor(
            args.address, num_cpus=args.workers if not args.address else None
        )
    else:
        executor = LocalExecutor(args.workers)
    settings = CellSettings(
        device=device, tensorboard=args.tensorboard, keep_going=not args.fail_fast
    )
    out = Path(args.out)
    write_sweep_file(spec, resolved, out)
    print_warnings(resolved.warnings)
    started = time.perf_counter()
    try:
        records = run_cells(
            resolved.cells,
            out,
            executor=executor,
            settings=settings,
            rerun=args.rerun,
            progress=progress,
        )
    except ClipadaptError as error:  # --fail-fast: a run failed (what ran is kept)
        print(f"error: a run failed, the sweep stopped (--fail-fast): {error}", file=sys.stderr)
        return 1
    failed = [r for r in records if r.get("status") != "ok"]
    print(
        f"{len(records) - len(failed)} run(s) written to {args.out} in "
        f"{time.perf_counter() - started:.1f}s ({len(resolved.cells)} cells in the sweep)"
    )
    if failed:
        print(f"{len(failed)} run(s) failed (recorded with status error):")
        for method, error in sorted({(r["method"], r.get("error", "")) for r in failed}):
            print(f"  {method}: {error}")
    warned = sorted(
        {
            (r.get("dataset"), w)
            for r in records
            if r.get("status") == "ok"
            for w in r.get("warnings") or ()
        }
    )
    for dataset, warning in warned:
        print(f"warning: {dataset}: {warning}")
    print_skipped(resolved.skipped)
    # the summary is this invocation's sweep: its runs, finished now or before (resumed)
    mine = {rid for cell in resolved.cells for rid in cell.outputs}
    records_here = [r for r in latest_ok(read_results(out)) if r.get("run_id") in mine]
    table = paper_table(records_here)
    if table.cells:
        print(f"\n{table.title} (this sweep's runs)\n{table.markdown()}")
        for note in merge_notes(records_here):
            print(note)
    if args.tensorboard:
        print(f"training curves: tensorboard --logdir {args.tensorboard}")
    return 1 if failed else 0


def cmd_report(args: argparse.Namespace) -> int:
    from clipadapt.bench.report import write_report
    from clipadapt.bench.results import read_results

    records = []
    for path in args.results:
        if not Path(path).is_file():
            raise ConfigError(f"results file {path} not found")
        records += [{**r, "_file": str(path)} for r in read_results(path)]
    written = write_report(records, args.out, shots=args.shots, compare=args.compare)
    if "table.md" in written:
        print(written["table.md"].read_text(encoding="utf-8"))
    if "merged.md" in written:
        print(written["merged.md"].read_text(encoding="utf-8"))
    for path in written.values():
        print(f"wrote {path}")
    return 0


def register_cli(sub: Any) -> None:
    """Add ``bench`` and ``report``."""
    p = sub.add_parser(
        "bench",
        help="run a sweep: datasets × methods × shots × seeds (+ DG, episodes)",
        description="Each run appends one JSON line to --out; runs already there are "
        "skipped (a killed sweep resumes), --rerun forces them. The grid comes from a "
        "YAML file (see docs/benchmarks.md), from flags, or from --profile paper. Method "
        "options and every bundle (finite values, labels in range, the evaluation group, "
        "two classes or more) are checked before any run starts.",
        epilog="exit status: 0 when every run of the sweep is ok; 1 when any run failed "
        "(recorded with status error; with --fail-fast the sweep stops there); 2 on bad "
        "input found before any run (method options, a bundle with NaN/Inf, out-of-range "
        "labels or no test group, a device this machine lacks, nothing to run).",
    )
    p.add_argument("config", nargs="?", help="sweep YAML file (datasets, methods, shots, ...)")
    p.add_argument(
        "--profile",
        choices=("paper",),
        help="paper: 11 datasets × shots 1-16 × seeds 1-3 × all methods + ImageNet DG, "
        "skipping what is missing (with the list of what and why)",
    )
    p.add_argument("--bundle", action="append", help="a feature bundle (repeatable)")
    p.add_argument(
        "--dataset",
        action="append",
        help="an image dataset (registered name with --data-root, or a folder; repeatable), "
        "extracted once per --backbone through the feature cache",
    )
    p.add_argument("--bundle-dir", help="folder of <dataset>.safetensors bundles")
    p.add_argument("--data-root", help="folder of the CoOp datasets (image datasets)")
    p.add_argument("--cache-dir", help="feature cache for image datasets")
    p.add_argument(
        "--backbone", action="append", help="backbone(s) for image datasets (repeatable)"
    )
    p.add_argument("--episodes", action="append", help="episode file (.safetensors or .json)")
    p.add_argument(
        "--methods",
        help="comma-separated NAME or NAME:key=value specs; "
        "separate specs with options by ';' (or use '*' patterns)",
    )
    p.add_argument("--shots", type=shots_list, help="default 1,2,4,8,16")
    p.add_argument("--seeds", type=int_list, help="default 1,2,3")
    add_split_flags(p)
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a key of the YAML file (value read as YAML, e.g. shots=[1,16])",
    )
    p.add_argument("--out", default="results.jsonl", help="results JSONL (appended)")
    p.add_argument("--rerun", action="store_true", help="run cells even if already in --out")
    p.add_argument("--executor", choices=("local", "ray"), default="local")
    p.add_argument(
        "--workers", type=positive_int, default=1, help="local processes / local Ray CPUs"
    )
    p.add_argument("--address", help="Ray cluster address (default: start a local instance)")
    p.add_argument("--tensorboard", help="log training curves (loss, val score) to this folder")
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="list what is done (in --out), what would run and what would fail, and what is "
        "skipped; run nothing (exit 2 when something would fail)",
    )
    add_dataset_flags(p)
    p.add_argument(
        "--fail-fast",
        action="store_true",
        help="stop at the first failing run (default: record it)",
    )
    p.add_argument("--device", default="cpu")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(handler=cmd_bench)

    p = sub.add_parser(
        "report",
        help="paper-style tables, per-shot tables, plots and costs from results JSONL",
    )
    p.add_argument("results", nargs="+", help="results JSONL file(s)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--shots", type=positive_int, help="shots of the main table (default: max)")
    p.add_argument(
        "--compare",
        choices=("published",),
        help="published: the papers' numbers beside ours, with the source of each",
    )
    p.set_defaults(handler=cmd_report)
