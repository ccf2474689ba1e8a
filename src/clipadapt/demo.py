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

#: Zero-shot runs twice in the demo: with the class names only (CLIP's zero-shot), and with the
#: best text the dataset offers (names, descriptions or both), chosen on each run's validation
#: rows, the honest reference for the adapters. The table labels the two rows apart.
ZEROSHOT_ROWS: dict[str, str] = {
    "zeroshot": "zeroshot (names only)",
    "zeroshot:text=auto": "zeroshot (best text, val)",
}


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


def _chosen_texts(records: Sequence[dict], label: str) -> str:
    """``"world_count: descriptions (1, 4, 16-shot); ..."``: what ``text=auto`` chose where."""
    picks: dict[str, dict[str, list[str]]] = {}
    for r in sorted(records, key=lambda r: (r["dataset"], r.get("shots") or 0, r["seed"])):
        if r["method"] == label:
            text = r.get("hyperparameters", {}).get("text", "?")
            picks.setdefault(r["dataset"], {}).setdefault(text, []).append(str(r.get("shots")))
    return "; ".join(
        f"{dataset}: "
        + ", ".join(f"{text} ({', '.join(shots)}-shot)" for text, shots in by_text.items())
        for dataset, by_text in sorted(picks.items())
    )


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
    if "zeroshot" in specs:
        specs.insert(specs.index("zeroshot") + 1, "zeroshot:text=auto")
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
    # the table and plot name rows by method; the two zero-shot specs get their own labels
    # (the table labels a row by its method spec, so both fields carry the label)
    ok = [
        {**r, "method": label, "method_spec": label}
        if (label := ZEROSHOT_ROWS.get(r.get("method_spec", "")))
        else r
        for r in records
        if r.get("status") == "ok"
    ]
    failed = [r for r in records if r.get("status") != "ok"]
    table = markdown_table(ok, with_std=len(seeds) > 1)
    chosen = _chosen_texts(ok, ZEROSHOT_ROWS["zeroshot:text=auto"])
    if chosen:
        table += (
            f"\n{ZEROSHOT_ROWS['zeroshot:text=auto']}: the text chosen on validation, {chosen}.\n"
        )
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
