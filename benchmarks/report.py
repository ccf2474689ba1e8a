"""Markdown rendering of a benchmark report (the JSON written beside it holds every number)."""

from __future__ import annotations

from typing import Any

#: Targets of the performance issue, checked in the report (2 CPU cores; see docs/performance.md).
FLOOR_RATIO_TARGET = 2.0
NO_CACHE_FIT_TARGET_S = 60.0
REFERENCE_SPEEDUP_TARGET = 10.0
EXTRACTION_RATIO_TARGET = 0.9
CACHE_METHODS = frozenset({"tip_adapter", "tip_adapter_f", "hegraph_adapter"})


def _f(value: Any, digits: int = 1) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return str(value)


def _mark(ok: bool) -> str:
    return "yes" if ok else "**no**"


def training_table(rows: list[dict[str, Any]]) -> str:
    """One row per method; the two targets of the performance issue in their own columns:
    every method within 2x of its GEMM floor, and the methods without a training cache
    (everything but Tip-Adapter-F and HeGraphAdapter) fitting in 60 s."""
    head = (
        f"| method | steps | s/epoch | fit s | GEMM floor s | fit / floor | peak MiB "
        f"| predict rows/s | test acc % | ≤ {FLOOR_RATIO_TARGET:g}x floor "
        f"| ≤ {NO_CACHE_FIT_TARGET_S:.0f} s (no cache) |\n"
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---|\n"
    )
    lines = []
    for r in rows:
        fit = _f(r["fit_seconds"]) + ("" if r["fit_measured"] else " (projected)")
        no_cache = r["method"] not in CACHE_METHODS
        if r.get("fit_unfinished"):
            fit = f"> {r['fit_seconds']:.0f} (stopped)"
            lines.append(
                f"| {r['method']} | — | — | {fit} | — | — | {_f(r['peak_mib'], 0)} | — | — "
                f"| {_mark(False)} | {_mark(False) if no_cache else '—'} |"
            )
            continue
        # a fit with (almost) no matrix products (zero-shot) has no floor to be measured against
        has_floor = r["gemm_floor_seconds"] >= 0.01
        floor_ok = _mark(r["floor_ratio"] <= FLOOR_RATIO_TARGET) if has_floor else "—"
        ratio = _f(r["floor_ratio"], 2) if has_floor else "—"
        fit_ok = _mark(r["fit_seconds"] <= NO_CACHE_FIT_TARGET_S) if no_cache else "—"
        lines.append(
            f"| {r['method']} | {_f(r['steps'])} | {_f(r.get('seconds_per_epoch'), 2)} | {fit} "
            f"| {_f(r['gemm_floor_seconds'], 2)} | {ratio} "
            f"| {_f(r['peak_mib'], 0)} | {_f(r['predict_rows_per_s'], 0)} "
            f"| {_f(r['test_accuracy'], 2)} | {floor_ok} | {fit_ok} |"
        )
    return head + "\n".join(lines) + "\n"


#: Targets of the fast presets (issue 17): at most this share of the paper schedule's training
#: FLOPs, test accuracy within this many points of the paper schedule's.
FAST_FLOPS_TARGET = 0.1
FAST_ACCURACY_TARGET = 0.5


def _schedule_seconds(side: dict[str, Any]) -> str:
    if side.get("fit_unfinished"):
        return f"> {side['fit_seconds']:.0f} (stopped)"
    return _f(side.get("fit_seconds")) + ("" if side.get("fit_measured") else " (projected)")


def schedules_table(rows: list[dict[str, Any]]) -> str:
    """Paper schedule vs ``fast`` preset per method, with the two targets of the fast presets."""
    head = (
        "| method | fast preset | paper GFLOP | fast GFLOP | FLOPs ratio | paper fit s "
        "| fast fit s | paper acc % | fast acc % | Δ acc (pt) "
        f"| ≤ {FAST_FLOPS_TARGET:g} FLOPs | within {FAST_ACCURACY_TARGET:g} pt |\n"
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---|\n"
    )
    lines = []
    for r in rows:
        paper, fast = r["paper"], r["fast"]
        options = ", ".join(f"{k}={v}" for k, v in r["fast_options"].items())
        gflop = [None if s.get("flops") is None else s["flops"] / 1e9 for s in (paper, fast)]
        ratio, diff = r.get("flops_ratio"), r.get("accuracy_difference")
        lines.append(
            f"| {r['method']} | {options} | {_f(gflop[0], 0)} | {_f(gflop[1], 0)} "
            f"| {_f(ratio, 3)} | {_schedule_seconds(paper)} | {_schedule_seconds(fast)} "
            f"| {_f(paper.get('test_accuracy'), 2)} | {_f(fast.get('test_accuracy'), 2)} "
            f"| {'—' if diff is None else f'{diff:+.2f}'} "
            f"| {'—' if ratio is None else _mark(ratio <= FAST_FLOPS_TARGET)} "
            f"| {'—' if diff is None else _mark(abs(diff) <= FAST_ACCURACY_TARGET)} |"
        )
    return head + "\n".join(lines) + "\n"


def reference_table(rows: list[dict[str, Any]]) -> str:
    head = (
        "| method | steps | ours s | reference s | speed-up | ours acc % | reference acc % "
        "| difference (pt) | parity (≤ 0.2) | speed-up ≥ 10 |\n"
        "|---|---|---:|---:|---:|---:|---:|---:|---|---|\n"
    )
    lines = []
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['method']} | {r['error']} |" + " |" * 8)
            continue
        lines.append(
            f"| {r['method']} | {r['steps']} | {_f(r['ours_seconds'], 2)} "
            f"| {_f(r['reference_seconds'], 2)} | {_f(r['speedup'], 1)}x "
            f"| {_f(r['ours_accuracy'], 2)} | {_f(r['reference_accuracy'], 2)} "
            f"| {r['accuracy_difference']:+.2f} | {_mark(r['parity'])} "
            f"| {_mark(r['speedup'] >= REFERENCE_SPEEDUP_TARGET)} |"
        )
    return head + "\n".join(lines) + "\n"


def provenance(rows: list[dict[str, Any]]) -> str:
    """Which command (and GEMM rate) measured which rows, when a merged report mixes runs."""
    groups: dict[tuple[str, float | None], list[str]] = {}
    for r in rows:
        groups.setdefault((r.get("command", "?"), r.get("gemm_gflops")), []).append(r["method"])
    if len(groups) < 2:
        return ""
    lines = ["Rows by run (a report merged from several `--update` runs):\n"]
    for (command, rate), methods in groups.items():
        at = f" at {rate:.1f} GFLOP/s" if rate else ""
        lines.append(f"- `{command}`{at}: {', '.join(methods)}")
    return "\n".join(lines) + "\n"


def _extraction_line(e: dict[str, Any]) -> str:
    return (
        f"- {e['images']} generated 64px PNG images, {e['model']} at {e['image_size']} px, "
        f"batch {e['batch_size']}: pipeline (decode, transform, encode, cache write) "
        f"**{e['pipeline_images_per_s']:.0f} images/s**, bare encoder on pre-decoded "
        f"tensors {e['bare_encoder_images_per_s']:.0f} images/s, ratio **{e['ratio']:.2f}** "
        f"(target ≥ {EXTRACTION_RATIO_TARGET}: {_mark(e['ratio'] >= EXTRACTION_RATIO_TARGET)}).\n"
    )


def render(report: dict[str, Any]) -> str:
    """The Markdown report: machine, commands, then one table per section."""
    m = report["machine"]
    p = report["profile"]
    commands = sorted(set(report.get("commands", {}).values()))
    out = [
        f"# clipadapt benchmark ({p['name']})\n",
        "Command(s): " + ", ".join(f"`{c}`" for c in commands) + "  ",
        f"Run: {report['started']} to {report['finished']}  ",
        f"Machine: {m['processor']}, {m['cpu_count']} CPUs, torch {m['torch']} "
        f"({m['torch_threads']} threads), CUDA: {m['cuda'] or 'none'}, Python {m['python']}  ",
        f"Measured float32 GEMM rate: **{report['gemm_gflops']:.1f} GFLOP/s** "
        f"({p['gemm_size']}² matrices, best of 5)\n",
        f"Problem: {p['classes']} classes x {p['shots']} shots x {p['dim']} dims, "
        f"{p['views']} augmented views, {p['classes'] * p['test_per_class']:,} test rows, "
        f"float32 (synthetic, `clipadapt.testing.make_fixture`, noise {p['noise']}).\n",
    ]
    if "training" in report:
        out += [
            "## Training (paper schedules)\n",
            "`fit s` is the whole fit (validation search included) with the method's default, "
            "paper schedule; *(projected)* = fixed cost + planned steps x time per step, both "
            "measured on two probes of n and 2n steps (n grows from "
            f"{p['probe_steps']} until the extra steps take {p['min_probe_seconds']:g} s), when "
            f"the whole schedule would take longer than {p['full_budget_s']:.0f} s. "
            "`GEMM floor` = the schedule's matrix-multiply FLOPs (counted with "
            "`torch.utils.flop_counter`) / the measured GEMM rate. Targets: every method "
            f"within {FLOOR_RATIO_TARGET:g}x of its floor; the methods without a training cache "
            f"also fit in ≤ {NO_CACHE_FIT_TARGET_S:.0f} s.\n",
            training_table(report["training"]),
            provenance(report["training"]),
        ]
    if "schedules" in report:
        out += [
            "## Paper vs fast schedules\n",
            "Each method's default (paper) schedule against its `fast` preset "
            "(`methods/presets/<name>.yaml`), measured like the training table. GFLOP: the "
            "fit's matrix-multiply FLOPs, projected from the probes for the paper schedule "
            "(validation scoring repeated every epoch left out, so they can only be "
            "understated) and counted over a whole fit for the fast preset, so the ratio is "
            "an upper bound. The paper schedule runs to the end when its "
            f"projection is within {p['full_budget_s']:.0f} s (`--budget`), else it is "
            "projected and has no accuracy; the fast preset always runs to the end. Targets: "
            f"≤ {FAST_FLOPS_TARGET:g} of the paper FLOPs, test accuracy within "
            f"{FAST_ACCURACY_TARGET:g} points.\n",
            schedules_table(report["schedules"]),
            provenance(report["schedules"]),
        ]
        if report.get("schedules_missing"):
            out.append(
                "Trainable methods without a `fast` preset: "
                + ", ".join(report["schedules_missing"])
                + ".\n"
            )
    if "reference" in report:
        out += [
            "## Reference ratio\n",
            "Ours vs a straightforward per-batch implementation written from the spec "
            "(`benchmarks/reference.py`), same data, options, seed and optimiser steps.\n",
            reference_table(report["reference"]),
            provenance(report["reference"]),
        ]
    if "extraction" in report:
        e = report["extraction"]
        out += ["## Extraction\n", _extraction_line(e)]
        if "large" in e:
            out.append(_extraction_line(e["large"]))
    if "sweep" in report:
        s = report["sweep"]
        out += [
            "## Sweep\n",
            f"{s['runs']} runs ({s['methods']} x shots {s['shots']} x seeds {s['seeds']}) on "
            f"`{s['dataset']}` ({s['size']} size) through the `make demo` code path, "
            f"generation and extraction included: **{s['seconds']:.0f} s** wall time.\n",
        ]
    return "\n".join(out)
