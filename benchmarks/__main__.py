"""``python -m benchmarks``: run the performance suite, write a Markdown and a JSON report.

Examples:
    python -m benchmarks --quick                  # small sizes, a minute (what CI runs)
    python -m benchmarks                          # ImageNet-16-shot shape, the published table
    python -m benchmarks --sections training --methods tip_adapter_f,hegraph_adapter
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def build_parser() -> argparse.ArgumentParser:
    from benchmarks.suite import PROFILES, SECTIONS

    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="Time every method on an ImageNet-shaped synthetic problem against this "
        "machine's measured GEMM floor and against straightforward reference implementations; "
        "time extraction, prediction and a whole sweep. Writes REPORT.md and REPORT.json.",
    )
    parser.add_argument(
        "--quick", action="store_true", help="small sizes (CI): checks the report and parity"
    )
    parser.add_argument("--profile", choices=sorted(PROFILES), help="sizes (default: full)")
    parser.add_argument(
        "--sections", default=",".join(SECTIONS), help=f"comma list of {', '.join(SECTIONS)}"
    )
    parser.add_argument("--methods", help="comma list of methods (default: all that apply)")
    parser.add_argument(
        "--out",
        default="benchmark-output",
        help="output folder for report.md / report.json (default: benchmark-output)",
    )
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    parser.add_argument(
        "--budget",
        type=float,
        help="seconds a paper schedule may take before it is projected instead of run "
        "(default: the profile's, 300 s in full); a run reports accuracy only when measured",
    )
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    parser.add_argument(
        "--update",
        action="store_true",
        help="merge into an existing OUT/report.json: re-measured sections and method rows "
        "replace theirs, everything else is kept (the command line is recorded per section)",
    )
    parser.add_argument(
        "--check-parity",
        action="store_true",
        help="exit 1 when a reference accuracy differs by more than 0.2 points",
    )
    return parser


def merge_reports(old: dict, new: dict) -> dict:
    """``old`` with the sections and method rows measured in ``new`` replaced."""
    merged = dict(old)
    for key, value in new.items():
        if key in ("training", "schedules", "reference") and key in old:
            fresh = {row["method"]: row for row in value}
            kept = [fresh.pop(row["method"], row) for row in old[key]]
            merged[key] = kept + list(fresh.values())
        elif key == "commands":
            merged[key] = {**old.get(key, {}), **value}
        elif key not in ("started", "gemm_gflops", "machine", "profile") or key not in old:
            merged[key] = value
    merged.setdefault("gemm_by_section", {})
    for section in new.get("commands", {}):
        merged["gemm_by_section"][section] = new["gemm_gflops"]
    return merged


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import torch

    from benchmarks.report import render
    from benchmarks.suite import PROFILES, SECTIONS, run_suite
    from clipadapt._utils import atomic_write_text

    if args.threads:
        torch.set_num_threads(args.threads)
    profile = PROFILES[args.profile or ("quick" if args.quick else "full")]
    if args.budget is not None:
        profile = dataclasses.replace(profile, full_budget_s=args.budget)
    sections = tuple(s.strip() for s in args.sections.split(",") if s.strip())
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown:
        print(
            f"error: unknown section(s) {unknown}; choose from {', '.join(SECTIONS)}",
            file=sys.stderr,
        )
        return 2
    methods = [m.strip() for m in args.methods.split(",")] if args.methods else None
    command = "python -m benchmarks " + " ".join(
        shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    previous = None
    if args.update and (out / "report.json").is_file():
        previous = json.loads((out / "report.json").read_text())

    def write(report: dict) -> None:
        report = dict(report, commands={section: command.strip() for section in sections})
        # each method row keeps the command and GEMM rate it was measured with, so a report
        # merged from several --update runs still says where every row came from
        for key in ("training", "schedules", "reference"):
            if key in report:
                report[key] = [
                    {"command": command.strip(), "gemm_gflops": report.get("gemm_gflops"), **row}
                    for row in report[key]
                ]
        if "finished" not in report:
            report["finished"] = time.strftime("%Y-%m-%d %H:%M:%S") + " (partial)"
        if previous is not None:
            report = merge_reports(previous, report)
        atomic_write_text(out / "report.json", json.dumps(report, indent=1))
        atomic_write_text(out / "report.md", render(report))

    report = run_suite(profile, sections, methods, device=args.device, checkpoint=write)
    write(report)
    print(f"wrote {out / 'report.md'} and {out / 'report.json'}")
    if args.check_parity:
        bad = [r for r in report.get("reference", []) if not r.get("parity", False)]
        if bad:
            print(f"parity failed: {[r['method'] for r in bad]}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
