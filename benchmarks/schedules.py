"""``python -m benchmarks.schedules``: paper vs fast schedule of a method, fitted and scored.

One JSON line per (problem, method, schedule, seed): fit seconds, validation and test accuracy,
the hyperparameters chosen, this machine's GEMM rate just before and after the fit (so a time
measured on a loaded machine can be read as a ratio to a GEMM), and the load average.

Problems:

- ``synthetic``: the benchmark suite's ImageNet-shaped problem (:func:`benchmarks.suite.make_problem`
  with the ``full`` profile: 1000 classes x 16 shots x 1024 dims, 10 views, 4 validation and 50
  test rows per class);
- ``imagenet-1shot``: the real CLIP ViT-B/32 ImageNet bundle, fit on ``train_1shot``, validate
  on ``train_2shot``, score on ``train_4shot`` (three disjoint draws);
- ``imagenet-2shot``: fit on ``train_2shot``, validate on ``train_1shot``, score on ``train_4shot``;
- ``world``: an embedded-world dataset (``--world-dataset``, generated and encoded with the
  shipped world CLIP under ``--cache``) at ``--shots``, drawn per seed like ``clipadapt bench``
  (validation: ``min(K, 4)`` per class from its val split; score on its test split); the text
  tower comes with it, so CoOp runs here;
- ``bundle``: any feature bundle (``--bundle``) at ``--shots``, drawn per seed the same way
  (the real image-only bundles: their pre-drawn ``train_{K}shot`` groups, validation rows drawn
  per seed from ``val``, scored on ``test``).

Schedules: ``paper`` is the method's default (the paper's schedule), ``fast`` its ``fast``
preset (``methods/presets/<name>.yaml``); ``--options`` adds hyperparameters on top of both
(exploring a candidate preset). Nothing here chooses anything: the numbers are reported, and
the fast presets were chosen on validation accuracy only (see docs/methods/<name>.md).

Example:
    python -m benchmarks.schedules --problem imagenet-1shot --methods taskres --out s.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

PROBLEMS = ("synthetic", "imagenet-1shot", "imagenet-2shot", "world", "bundle")
#: (train, validation) groups of the real ImageNet problems; every one scores on train_4shot.
IMAGENET_GROUPS = {
    "imagenet-1shot": ("train_1shot", "train_2shot"),
    "imagenet-2shot": ("train_2shot", "train_1shot"),
}
DEFAULT_BUNDLE = Path("../shared/data/clip_vitb32/imagenet.safetensors")


def load_problem(problem: str, bundle: Path) -> tuple[Any, Any, Any, Any]:
    """(train, text, val, test) of a problem."""
    if problem == "synthetic":
        from benchmarks.suite import PROFILES, make_problem

        fixture = make_problem(PROFILES["full"])
        return fixture.train, fixture.text, fixture.val, fixture.test
    import clipadapt
    from clipadapt.tasks.classification import SplitChoice, prepare_sets

    loaded = clipadapt.load_bundle(bundle)
    train_set, val_set = IMAGENET_GROUPS[problem]
    train, val, test = prepare_sets(loaded, None, 1, SplitChoice(train_set, val_set, "train_4shot"))
    return train, loaded.text(), val, test


def load_world(dataset: str, cache: Path) -> tuple[Any, Any]:
    """(bundle, text tower) of one embedded-world dataset, generated and encoded once."""
    from clipadapt.data.datasets import load_dataset
    from clipadapt.features.pipeline import ensure_bundle
    from clipadapt.world.datasets import generate_world_datasets

    (folder,) = generate_world_datasets(cache / "world-data", names=[dataset])
    return ensure_bundle(
        load_dataset(str(folder)),
        "world",
        cache / "feature-cache",
        out=cache / "features" / f"{dataset}.safetensors",
        progress=False,
        text_tower=True,
    )


def draw(bundle: Any, tower: Any, shots: int, seed: int) -> tuple[Any, Any, Any, Any]:
    """(train, text or None, val, test) of one K-shot draw, as ``clipadapt bench`` draws it."""
    from clipadapt.tasks.classification import prepare_sets

    train, val, test = prepare_sets(bundle, shots, seed)
    return train, bundle.text(tower) if bundle.has_text() else None, val, test


def run_one(
    problem: str,
    data: tuple[Any, Any, Any, Any],
    name: str,
    schedule: str,
    seed: int,
    options: dict[str, Any],
    shots: int | None = None,
    count_flops: bool = False,
) -> dict[str, Any]:
    """Fit one schedule of one method and score it (validation and test rows); with
    ``count_flops`` the fit counts its matrix-multiply FLOPs (and its seconds include the
    counting)."""
    from benchmarks.measure import count_matmul_flops, gemm_rate
    from clipadapt.methods.base import create_method

    train, text, val, test = data

    def make() -> Any:
        method = create_method(name, preset="fast" if schedule == "fast" else None, **options)
        if "seed" in method.get_params():
            method.set_params(seed=seed)
        return method

    method = make()
    before = gemm_rate(1024) / 1e9
    started = time.perf_counter()
    flops = None
    if count_flops:  # the counted fit is the scored fit (its seconds include the counting)
        flops, _ = count_matmul_flops(lambda: method.fit(train, text, val))
    else:
        method.fit(train, text, val)
    seconds = time.perf_counter() - started
    after = gemm_rate(1024) / 1e9
    return {
        "problem": problem,
        "shots": shots,
        "method": name,
        "schedule": schedule,
        "options": options,
        "params": method.get_params(),
        "seed": seed,
        "fit_seconds": seconds,
        "flops": flops,
        "val_accuracy": method.score(val.features, val.labels),
        "test_accuracy": method.score(test.features, test.labels),
        "hyperparameters": {k: v for k, v in method.best_params_.items() if k != "tried"},
        "gemm_gflops_before_after": [before, after],
        "load_average": list(os.getloadavg()),
        "threads": __import__("torch").get_num_threads(),
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def summarize(rows: list[dict[str, Any]]) -> str:
    """A Markdown table of runs (JSON lines of this tool) per method: one row per schedule
    (``fast`` / ``paper`` plus ``--options``), one column group per problem: FLOPs as a
    fraction of the plain paper schedule's on the same problem, validation and test accuracy,
    and the test difference to the paper schedule; the mean validation accuracy over the
    problems is what a fast preset is chosen by."""
    import statistics

    def label(row: dict[str, Any]) -> str:
        options = json.dumps(row["options"], sort_keys=True) if row["options"] else ""
        return f"{row['schedule']} + {options}" if options else row["schedule"]

    problems = sorted(
        {r["problem"] + (f" {r['shots']}-shot" if r.get("shots") else "") for r in rows}
    )
    cells: dict[tuple[str, str, str], dict[str, Any]] = {}
    for r in rows:  # the newest line of a (method, schedule, problem) wins; seeds are averaged
        problem = r["problem"] + (f" {r['shots']}-shot" if r.get("shots") else "")
        cells.setdefault((r["method"], label(r), problem), {"runs": []})["runs"].append(r)
    out = []
    for method in sorted({k[0] for k in cells}):
        labels = sorted({k[1] for k in cells if k[0] == method}, key=lambda x: (x != "paper", x))
        header = ["schedule"]
        for problem in problems:
            header += [f"{problem}: FLOPs / paper", "val", "test", "Δ test"]
        header.append("mean val")
        out += [f"**{method}**\n", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for name in labels:
            line, vals = [name], []
            for problem in problems:
                cell = cells.get((method, name, problem))
                paper = cells.get((method, "paper", problem))
                if cell is None:
                    line += ["–"] * 4
                    continue

                def mean(key: str, runs: list[dict[str, Any]]) -> float | None:
                    values = [r[key] for r in runs if r.get(key) is not None]
                    return statistics.fmean(values) if values else None

                flops, val, test = (
                    mean(k, cell["runs"]) for k in ("flops", "val_accuracy", "test_accuracy")
                )
                base_flops = mean("flops", paper["runs"]) if paper else None
                base_test = mean("test_accuracy", paper["runs"]) if paper else None
                vals.append(val)
                line += [
                    f"{flops / base_flops:.3f}" if flops and base_flops else "–",
                    f"{val:.2f}",
                    f"{test:.2f}",
                    f"{test - base_test:+.2f}" if base_test is not None else "–",
                ]
            line.append(f"{statistics.fmean(vals):.2f}" if len(vals) == len(problems) else "–")
            out.append("| " + " | ".join(line) + " |")
        out.append("")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.schedules",
        description="Fit methods with their paper and fast schedules on the synthetic "
        "ImageNet-shaped problem or the real ImageNet bundle; one JSON line per run.",
    )
    parser.add_argument(
        "--summarize",
        nargs="+",
        type=Path,
        metavar="JSONL",
        help="print the Markdown table of runs written earlier (no runs)",
    )
    parser.add_argument("--problem", choices=PROBLEMS)
    parser.add_argument("--methods", help="comma list of method names")
    parser.add_argument("--schedules", default="paper,fast", help="comma list of paper, fast")
    parser.add_argument("--seeds", default="1", help="comma list of seeds (default 1)")
    parser.add_argument("--options", default="{}", help="JSON hyperparameters for every fit")
    parser.add_argument(
        "--count-flops",
        action="store_true",
        help="count each fit's matrix-multiply FLOPs (its seconds then include the counting)",
    )
    parser.add_argument("--bundle", type=Path, default=DEFAULT_BUNDLE, help="ImageNet / any bundle")
    parser.add_argument("--world-dataset", default="world_species", help="world: the dataset")
    parser.add_argument("--shots", default="1,4,16", help="world: comma list of shots")
    parser.add_argument(
        "--cache", type=Path, default=Path("schedules-cache"), help="world: data and features"
    )
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    parser.add_argument("--out", type=Path, help="JSON lines are appended here")
    args = parser.parse_args(argv)
    if args.summarize:
        rows = [json.loads(line) for path in args.summarize for line in path.open() if line.strip()]
        print(summarize(rows))
        return 0
    if not (args.problem and args.methods and args.out):
        parser.error("--problem, --methods and --out are needed to run (or --summarize)")
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    schedules = [s.strip() for s in args.schedules.split(",") if s.strip()]
    if set(schedules) - {"paper", "fast"}:
        print(
            f"error: --schedules takes paper and/or fast, got {args.schedules!r}", file=sys.stderr
        )
        return 2
    if args.problem not in ("synthetic", "world") and not args.bundle.is_file():
        print(f"error: {args.bundle}: no such bundle; pass --bundle", file=sys.stderr)
        return 2
    options = json.loads(args.options)
    seeds = [int(s) for s in args.seeds.split(",")]
    names = [m.strip() for m in args.methods.split(",") if m.strip()]
    if args.problem in ("world", "bundle"):
        if args.problem == "world":
            bundle, tower = load_world(args.world_dataset, args.cache)
        else:
            import clipadapt

            bundle, tower = clipadapt.load_bundle(args.bundle), None
        label = f"{args.problem}:{bundle.name}"
        cases = [
            (int(k), seed, draw(bundle, tower, int(k), seed))
            for k in args.shots.split(",")
            for seed in seeds
        ]
    else:
        data = load_problem(args.problem, args.bundle)
        label = args.problem
        cases = [(None, seed, data) for seed in seeds]
    for name in names:
        for schedule in schedules:
            for shots, seed, data in cases:
                row = run_one(label, data, name, schedule, seed, options, shots, args.count_flops)
                with args.out.open("a") as handle:
                    handle.write(json.dumps(row) + "\n")
                print(
                    f"{label} {'' if shots is None else f'{shots}-shot '}{name} {schedule} "
                    f"seed {seed}: fit {row['fit_seconds']:.1f}s val {row['val_accuracy']:.2f} "
                    f"test {row['test_accuracy']:.2f}"
                    + ("" if row["flops"] is None else f" GFLOP {row['flops'] / 1e9:.1f}"),
                    flush=True,
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())
