"""Resolution: a :class:`~clipadapt.bench.spec.SweepSpec` -> the cells to run and what is skipped.

Every dataset is found as a bundle (``bundle:`` or ``<bundle_dir>/<name>.safetensors``) or
extracted once per backbone through :func:`clipadapt.features.pipeline.ensure_bundle`; image
episodes are encoded through the same pipeline. Whatever is missing (no bundle, no text features
for a text method, no backbone record for a method that needs the text tower, no such shots, a
DG source or target) is skipped with the reason, never an error; a bad method spec is an error
before any work.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from clipadapt.bench.cells import (
    CLASSIFICATION,
    DOMAIN_GENERALIZATION,
    EPISODES,
    BundleSource,
    Cell,
    MethodChoice,
    build_cell,
    checked_method,
)
from clipadapt.bench.spec import SweepDataset, SweepSpec
from clipadapt.data.bundle import FeatureBundle, load_bundle
from clipadapt.exceptions import ClipadaptError, ConfigError
from clipadapt.features.pipeline import needs_text_tower
from clipadapt.methods.base import get_method_class


@dataclass
class ResolvedSweep:
    """The cells of a sweep and what was skipped (``[(what, why)]``)."""

    cells: list[Cell]
    skipped: list[tuple[str, str]]
    bundles: dict[str, Path]


def _find_bundle(spec: SweepSpec, ds: SweepDataset) -> Path | None:
    if ds.bundle:
        return spec.path(ds.bundle)
    if spec.bundle_dir:
        candidate = spec.path(spec.bundle_dir) / f"{ds.name}.safetensors"
        if candidate.is_file():
            return candidate
    return None


def _extract(spec: SweepSpec, ds: SweepDataset, backbone: str, progress: bool) -> Path:
    """Encode an image dataset once per backbone (the feature cache makes reruns free)."""
    from clipadapt._utils import safe_name
    from clipadapt.features.pipeline import ensure_bundle

    root = spec.path(spec.data_root) if spec.data_root else None
    images = ds.images or ds.name
    where = spec.path(images) if (ds.images and spec.path(images).exists()) else images
    cache = spec.path(spec.cache_dir) if spec.cache_dir else None
    base = cache if cache is not None else Path(spec.base_dir) / "bench-features"
    out = base / "bundles" / safe_name(backbone) / f"{safe_name(ds.name)}.safetensors"
    ensure_bundle(
        str(where), backbone, cache, out=out, data_root=root, progress=progress, reuse=True
    )
    return out


def _shots_for(src: BundleSource, shots: Sequence[int]) -> list[int | None]:
    """The sweep's shots, or the K of a fixed ``train_{K}shot`` train group (None otherwise)."""
    if not src.choice.train_set:
        return list(shots)
    match = re.fullmatch(r"train_(\d+)shot", src.choice.train_set)
    return [int(match.group(1)) if match else None]


def _has_shots(bundle: FeatureBundle, k: int) -> bool:
    return k in bundle.shot_groups() or bundle.has_group("train")


_NO_TOWER = (
    "needs the text tower, and the bundle records no backbone (`backbone_spec`) to build it "
    "from; extract the bundle with `clipadapt extract`, or list the images under `datasets:`"
)


def _cannot_run(method: MethodChoice, src: BundleSource) -> str | None:
    """Why ``method`` cannot run on the bundle at all (None: it can)."""
    if not src.bundle.has_text() and get_method_class(method.name).card.needs_text:
        return "needs `text_features`, which the bundle lacks"
    if needs_text_tower(method.name) and src.backbone_record is None:
        return _NO_TOWER
    return None


def resolve_sweep(spec: SweepSpec, progress: bool = True) -> ResolvedSweep:
    """Find or extract every dataset's bundle and list the cells; missing data is skipped.

    Raises:
        ConfigError: an unknown method or bad method options (checked before any work).
    """
    methods = [checked_method(spec_str) for spec_str in spec.methods]
    if not methods:
        raise ConfigError("no methods given (methods: [...] or --methods)")
    skipped: list[tuple[str, str]] = []
    sources: dict[str, list[BundleSource]] = {}
    loaded: dict[Path, FeatureBundle] = {}

    def load(path: Path) -> FeatureBundle:
        if path not in loaded:
            loaded[path] = load_bundle(path)
        return loaded[path]

    wanted = list(spec.datasets)
    have = {d.name for d in wanted}
    for dg in spec.domain_generalization:
        wanted += [SweepDataset(n) for n in (dg.source, *dg.targets) if n not in have]
        have |= {dg.source, *dg.targets}
    entries: list[tuple[SweepDataset, list[BundleSource]]] = []
    for ds in wanted:
        mine: list[BundleSource] = []
        entries.append((ds, mine))
        paths: list[Path] = []
        found = _find_bundle(spec, ds)
        if found is not None:
            if not found.is_file():
                skipped.append((ds.name, f"bundle {found} not found"))
                continue
            paths.append(found)
        elif ds.images or spec.data_root:
            if not spec.backbones:
                skipped.append((ds.name, "an image dataset needs `backbones: [...]`"))
                continue
            for backbone in spec.backbones:
                try:
                    paths.append(_extract(spec, ds, backbone, progress))
                except (ClipadaptError, OSError) as error:
                    skipped.append((f"{ds.name} ({backbone})", f"cannot extract: {error}"))
        else:
            skipped.append(
                (ds.name, "no bundle (set bundle_dir or bundle:) and no images (data_root/images:)")
            )
            continue
        for path in paths:
            try:
                bundle = load(path)
            except ClipadaptError as error:
                skipped.append((ds.name, str(error)))
                continue
            mine.append(BundleSource.of(bundle, name=ds.name, key=str(path), choice=ds.choice))
            sources.setdefault(ds.name, []).append(mine[-1])

    cells: list[Cell] = []
    for ds, srcs in entries[: len(spec.datasets)]:
        for src in srcs:
            shots = _shots_for(src, spec.shots)
            for method in methods:
                why = _cannot_run(method, src)
                if why is not None:
                    skipped.append((f"{method.name} on {ds.name}", why))
                    continue
                for k in shots:
                    if k is not None and not _has_shots(src.bundle, k):
                        skipped.append((f"{ds.name} {k}-shot", "no such shots in the bundle"))
                        continue
                    for seed in spec.seeds:
                        cells.append(build_cell(CLASSIFICATION, method, k, seed, source=src))
    for dg in spec.domain_generalization:
        srcs = sources.get(dg.source, [])
        if not srcs:
            skipped.append((f"domain generalisation from {dg.source}", "source missing"))
            continue
        for src in srcs:
            targets = [
                t
                for name in dg.targets
                for t in sources.get(name, [])
                if t.bundle.backbone == src.bundle.backbone
            ]
            if any(t.name == src.name for t in targets):
                skipped.append((f"DG target {src.name}", "is the source (scored as the source)"))
                targets = [t for t in targets if t.name != src.name]
            missing = [
                n for n in dg.targets if n != src.name and not any(t.name == n for t in targets)
            ]
            for n in missing:
                skipped.append((f"DG target {n}", f"no bundle with backbone {src.bundle.backbone}"))
            if not targets:
                continue
            for method in methods:
                if needs_text_tower(method.name) and src.backbone_record is None:
                    skipped.append((f"{method.name} on {dg.source}", _NO_TOWER))
                    continue
                for k in dg.shots if not src.choice.train_set else _shots_for(src, []):
                    if k is not None and not _has_shots(src.bundle, k):
                        skipped.append((f"DG {dg.source} {k}-shot", "no such shots in the bundle"))
                        continue
                    for seed in spec.seeds:
                        cell = build_cell(
                            DOMAIN_GENERALIZATION,
                            method,
                            k,
                            seed,
                            source=src,
                            targets=targets,
                            target_eval_set=dg.target_eval_set,
                        )
                        cells.append(cell)
    for ep in spec.episodes:
        path = spec.path(ep.file)
        if path.suffix == ".json":
            if not spec.backbones:
                skipped.append(
                    (f"episodes {ep.name}", "image episodes need a backbone (backbones: [world])")
                )
                continue
            try:
                from clipadapt.features.pipeline import ensure_episode_features

                path = ensure_episode_features(path, spec.backbones[0], name=ep.name)
            except (ClipadaptError, OSError) as error:
                skipped.append((f"episodes {ep.name}", str(error)))
                continue
        if not path.is_file():
            skipped.append((f"episodes {ep.name}", f"{path} not found"))
            continue
        for method in methods:
            for seed in spec.seeds:
                cells.append(
                    build_cell(EPISODES, method, None, seed, episodes=(ep.name, str(path)))
                )
    return ResolvedSweep(cells, skipped, {n: Path(s[0].key) for n, s in sources.items() if s})
