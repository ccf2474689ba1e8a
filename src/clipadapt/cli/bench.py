"""``clipadapt bench`` (sweeps) and ``clipadapt report`` (tables and plots from results)."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from clipadapt.cli._common import (
    add_classnames_flag,
    add_dataset_flags,
    add_split_flags,
    example,
    int_list,
    positive_int,
    print_skipped,
    require_path,
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
            scored = f" -> {', '.join(cell.targets)}" if cell.targets else ""
            print(
                f"{label:<5} {cell.task:<22} {cell.dataset:<18} {cell.method_spec:<24} "
                f"K={cell.shots} seed={cell.seed}{scored}"
            )
    planned = getattr(resolved, "planned", [])
    for name, backbone in getattr(resolved, "to_extract", []):
        print(f"encode {name} with {backbone} (not encoded yet; a dry run encodes nothing)")
    for run in planned:
        scored = f" -> {', '.join(run.targets)}" if run.targets else ""
        print(
            f"plan  {run.task:<22} {run.dataset:<18} {run.method_spec:<24} "
            f"K={run.shots} seed={run.seed}{scored} (after encoding {', '.join(run.waits_for)})"
        )
    for what, why in resolved.errors:
        print(f"fail  {what}: {why}")
    print(
        f"{len(resolved.cells)} cell(s): {len(finished)} done in {out}, {len(todo)} would run; "
        f"{len(resolved.errors)} input problem(s) would stop the sweep"
    )
    if planned:
        print(f"{len(planned)} more run(s) after encoding what is listed above")
    print_warnings(resolved.warnings)
    print_skipped(resolved.skipped)
    return 2 if resolved.errors else 0


def print_warnings(warnings: list[tuple[str, str]]) -> None:
    """The ``warning:`` lines about a sweep's inputs (e.g. indistinguishable class names)."""
    for what, why in warnings:
        print(f"warning: {what}: {why}")


def cmd_bench(args: argparse.Namespace) -> int:
    # inputs named by path are checked before torch is imported, so a typo answers at once;
    # a sweep runs what it has and lists the rest as skipped, so only "every input is
    # missing" stops it here (as it would later, with "nothing to run")
    require_path(args.config, "sweep file")
    given = [*(args.bundle or []), *(args.episodes or []), *filter(None, [args.bundle_dir])]
    if given and not (args.config or args.profile or args.dataset or args.dry_run):
        missing = [path for path in given if not Path(path).exists()]
        if len(missing) == len(given):
            raise ConfigError(
                f"nothing to run: {', '.join(missing)} not found; check the paths (clipadapt "
                "extract makes a feature bundle)"
            )
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
    options = ResolveOptions(
        fingerprint=args.fingerprint,
        resplit=args.resplit,
        extract=not args.dry_run,
        check_counts=not args.partial,
    )
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
    for path in args.results:  # before matplotlib and the library are imported
        if not Path(path).is_file():
            raise ConfigError(f"results file {path} not found")
    from clipadapt.bench.report import write_report
    from clipadapt.bench.results import read_results

    records = []
    for path in args.results:
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
        "YAML file (datasets, methods, shots, seeds, ...), from flags, or from --profile "
        "paper|fast. Method "
        "options and every bundle (finite values, labels in range, the evaluation group, "
        "two classes or more) are checked before any run starts.",
        epilog="exit status: 0 when every run of the sweep is ok; 1 when any run failed "
        "(recorded with status error; with --fail-fast the sweep stops there); 2 on bad "
        "input found before any run (method options, a bundle with NaN/Inf, out-of-range "
        "labels or no test group, a device this machine lacks, nothing to run).\n\n"
        + example(
            "clipadapt bench --bundle feats/count.safetensors --methods zeroshot,tip_adapter "
            "--shots 1,2,4 --seeds 1,2 --out results.jsonl"
        ),
    )
    p.add_argument("config", nargs="?", help="sweep YAML file (datasets, methods, shots, ...)")
    p.add_argument(
        "--profile",
        choices=("paper", "fast"),
        help="the schedules: paper = every method's defaults (the papers'), fast = its `fast` "
        "preset where it has one (an explicit preset= in a method spec wins; the preset "
        "goes into each record's method spec). Without a YAML file also the grid: 11 "
        "datasets × shots 1-16 × seeds 1-3 × all methods + ImageNet DG, skipping what is "
        "missing (with the list of what and why)",
    )
    p.add_argument("--bundle", action="append", help="a feature bundle (repeatable)")
    add_classnames_flag(
        p,
        "class names for the --bundle files made without them (class_0 ...): one per line, "
        "line i = class i; each bundle must have that many classes. The names are part of "
        "the run key (other names are another run). In YAML: a dataset's `classnames: FILE`",
    )
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
    p.add_argument("--shots", type=shots_list, help="comma-separated shots (default 1,2,4,8,16)")
    p.add_argument("--seeds", type=int_list, help="comma-separated seeds (default 1,2,3)")
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
    p.add_argument(
        "--executor",
        choices=("local", "ray"),
        default="local",
        help="where cells run: this machine's processes or a Ray cluster",
    )
    p.add_argument(
        "--workers", type=positive_int, default=1, help="local processes / local Ray CPUs"
    )
    p.add_argument("--address", help="Ray cluster address (default: start a local instance)")
    p.add_argument("--tensorboard", help="log training curves (loss, val score) to this folder")
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="list what is done (in --out), what would run and what would fail, and what is "
        "skipped; run and encode nothing (what needs encoding first is listed as planned "
        "runs; exit 2 when something would fail)",
    )
    add_dataset_flags(p)
    p.add_argument(
        "--fail-fast",
        action="store_true",
        help="stop at the first failing run (default: record it)",
    )
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:0 or auto")
    p.add_argument("--no-progress", action="store_true", help="print no progress")
    p.set_defaults(handler=cmd_bench)

    p = sub.add_parser(
        "report",
        help="paper-style tables, per-shot tables, plots and costs from results JSONL",
        description="Read result lines (clipadapt bench --out) and write into one folder: the "
        "paper-style table (mean accuracy in percent ± the standard deviation over seeds), one "
        "table per shot count and per dataset, the accuracy-vs-shots plot (error bars: the same "
        "standard deviation), the cost table, and domain-generalisation and episode tables "
        "when present. Rows that differ in any setting are never merged.",
        epilog=example("clipadapt report results.jsonl --out report"),
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
