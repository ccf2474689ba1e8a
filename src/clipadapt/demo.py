"""``clipadapt demo``: the embedded world end to end, offline.

Generates the world datasets (cached), extracts their features with the shipped world model
(cached), runs every registered method at the requested shots and seeds, and writes
``results.jsonl``, ``table.md`` and ``accuracy_vs_shots.png`` into the output folder.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path

from clipadapt.bench.report import markdown_table, plot_accuracy_vs_shots

log = logging.getLogger(__name__)


def resolve_method_names(spec: str) -> list[str]:
    """Comma-separated registry names or wildcard patterns -> registered names, in order.

    Raises:
        ConfigError: a name or pattern matches no registered method.
    """
    from clipadapt.exceptions import ConfigError
    from clipadapt.methods.base import list_methods

    names: list[str] = []
    for part in (p.strip() for p in spec.replace(";", ",").split(",")):
        if not part:
            continue
        matched = list_methods(part)
        if not matched:
            raise ConfigError(f"no method matches {part!r}; see `clipadapt list-methods`")
        names += [m for m in matched if m not in names]
    return names


def run_demo(
    out: Path,
    *,
    size: str = "default",
    shots: Sequence[int] = (1, 4, 16),
    seeds: Sequence[int] = (1,),
    methods: str = "*",
    cache_dir: str | Path | None = None,
    progress: bool = True,
    datasets: Sequence[str] | None = None,
    backbone: str = "world",
) -> dict[str, Path]:
    """Run the demo; returns the paths of the files it wrote."""
    from clipadapt.bench.cells import BundleSource, Grid
    from clipadapt.bench.execute import CellSettings
    from clipadapt.bench.runner import run_cells
    from clipadapt.data.datasets import load_dataset
    from clipadapt.features.pipeline import ensure_bundle, load_encoder
    from clipadapt.methods.base import method_presets
    from clipadapt.world.datasets import generate_world_datasets

    started = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cache = Path(cache_dir) if cache_dir is not None else out / "cache"
    print(f"[1/4] world datasets ({size}) -> {out / 'world-data'}")
    folders = generate_world_datasets(
        out / "world-data", size=size, names=list(datasets) if datasets is not None else None
    )
    encoder = load_encoder(backbone)
    print(f"[2/4] features with {encoder.backbone.display_name} -> {out / 'features'}")
    sources = []
    for folder in folders:
        dataset = load_dataset(str(folder))
        if not dataset.splits.get("train"):
            continue  # evaluation-only style-shifted variants: for domain generalisation runs
        bundle, _ = ensure_bundle(
            dataset,
            backbone,
            cache,
            out=out / "features" / f"{dataset.name}.safetensors",
            progress=progress,
        )
        sources.append(BundleSource.of(bundle))
    names = resolve_method_names(methods)
    print(f"[3/4] methods: {', '.join(names)}; shots {list(shots)}; seeds {list(seeds)}")
    results = out / "results.jsonl"
    if results.exists():
        results.unlink()
    # methods with a `demo` preset (a shortened schedule, not a paper setting) use it here so the
    # whole demo stays within minutes on 2 CPU cores; the table lists them
    specs = [f"{n}:preset=demo" if "demo" in method_presets(n) else n for n in names]
    shortened = [n for n in names if "demo" in method_presets(n)]
    grid = Grid(specs, list(shots), list(seeds))
    # the bench's cells, run in this process; CoOp's text tower comes from each bundle's backbone
    records = run_cells(
        [cell for source in sources for cell in grid.cells(source)],
        results,
        settings=CellSettings(keep_going=True),
        rerun=True,
        progress=progress,
        bundles={source.key: source.bundle for source in sources},
    )
    ok = [r for r in records if r.get("status") == "ok"]
    failed = [r for r in records if r.get("status") != "ok"]
    table = markdown_table(ok, with_std=len(seeds) > 1)
    if shortened:
        table += (
            f"\nShortened demo schedules (methods/presets/*.yaml `demo`): {', '.join(shortened)}; "
            "all other methods use their paper defaults.\n"
        )
    (out / "table.md").write_text(table, encoding="utf-8")
    plot = plot_accuracy_vs_shots(ok, out / "accuracy_vs_shots.png")
    print("[4/4] results\n")
    print(table)
    if failed:
        print(f"{len(failed)} run(s) could not run:")
        for r in {(r["method"], r["error"]) for r in failed}:
            print(f"  {r[0]}: {r[1]}")
    print(f"wrote {results}, {out / 'table.md'}, {plot} in {time.perf_counter() - started:.0f}s")
    return {"results": results, "table": out / "table.md", "plot": plot}
