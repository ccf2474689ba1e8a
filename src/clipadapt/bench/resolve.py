"""Resolution: a :class:`~clipadapt.bench.spec.SweepSpec` -> the cells to run and what is skipped.

Every dataset is found as a bundle (``bundle:`` or ``<bundle_dir>/<name>.safetensors``) or
extracted once per backbone through :func:`clipadapt.features.pipeline.ensure_bundle`; image
episodes are encoded through the same pipeline. Whatever is missing (no bundle, no text features
for a text method, no backbone record for a method that needs the text tower, no such shots, a
DG source or target) is skipped with the reason, never an error. What would make runs fail is
found here, before any run: a bad method spec raises at once; a bundle that cannot be read, holds
NaN/Inf or out-of-range labels, lacks the evaluation group or has fewer than two classes is
listed in :attr:`ResolvedSweep.errors` (the runner then refuses to start).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
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
from clipadapt.bench.spec import FAST_PRESET, SweepDataset, SweepSpec
from clipadapt.data.bundle import FeatureBundle, load_bundle
from clipadapt.data.classnames import (
    CLASSNAMES_KEY,
    named_bundle_key,
    read_classnames,
    with_classnames,
)
from clipadapt.exceptions import ClipadaptError, ConfigError
from clipadapt.features.pipeline import NotExtracted, backbone_display_name, needs_text_tower
from clipadapt.methods.base import get_method_class


@dataclass
class ResolvedSweep:
    """The cells of a sweep and what was skipped (``[(what, why)]``).

    Attributes:
        cells: the cells to run.
        skipped: ``[(what, why)]`` left out because something is missing.
        bundles: dataset name -> its (first) bundle file.
        errors: ``[(what, why)]`` inputs that would make runs fail (bad bundles); a sweep with
            errors does not start.
        warnings: ``[(what, why)]`` things to know about the inputs (e.g. class names whose
            text embeddings cannot be told apart).
        classnames: class-name hash -> the names, once per sweep (records carry the hash).
    """

    cells: list[Cell]
    skipped: list[tuple[str, str]]
    bundles: dict[str, Path]
    errors: list[tuple[str, str]] = field(default_factory=list)
    warnings: list[tuple[str, str]] = field(default_factory=list)
    classnames: dict[str, list[str]] = field(default_factory=dict)
    planned: list[PlannedRun] = field(default_factory=list)
    to_extract: list[tuple[str, str]] = field(default_factory=list)


@dataclass(frozen=True)
class PlannedRun:
    """A run a dry run (``ResolveOptions(extract=False)``) lists but cannot key yet, because
    a bundle or an episode file it needs has not been encoded: what it would fit and score.

    Attributes:
        task, dataset, method_spec, shots, seed: as in a :class:`Cell`.
        targets: the domain-generalisation targets it would score (empty for other tasks).
        waits_for: the datasets (or episode files) encoded first.
    """

    task: str
    dataset: str
    method_spec: str
    shots: int | None
    seed: int
    targets: tuple[str, ...] = ()
    waits_for: tuple[str, ...] = ()


def _find_bundle(spec: SweepSpec, ds: SweepDataset) -> Path | None:
    if ds.bundle:
        return spec.path(ds.bundle)
    if spec.bundle_dir:
        candidate = spec.path(spec.bundle_dir) / f"{ds.name}.safetensors"
        if candidate.is_file():
            return candidate
    return None


def _extract(
    spec: SweepSpec,
    ds: SweepDataset,
    backbone: str,
    progress: bool,
    options: ResolveOptions,
) -> Path:
    """Encode an image dataset once per backbone (the feature cache makes reruns free).

    The bundle file is named after the dataset and where it is (two folders called ``imgs``
    get two bundles), and it is reused only while it was made from the same files with the
    same settings (:func:`~clipadapt.features.pipeline.ensure_bundle`).
    """
    from clipadapt._utils import safe_name, stable_hash
    from clipadapt.features.pipeline import ensure_bundle

    root = spec.path(spec.data_root) if spec.data_root else None
    images = ds.images or ds.name
    where = spec.path(images) if (ds.images and spec.path(images).exists()) else images
    identity = str(Path(where).resolve()) if isinstance(where, Path) else f"{root}:{where}"
    cache = spec.path(spec.cache_dir) if spec.cache_dir else None
    base = cache if cache is not None else Path(spec.base_dir) / "bench-features"
    name = f"{safe_name(ds.name)}-{stable_hash(identity, 8)}.safetensors"
    out = base / "bundles" / safe_name(backbone) / name
    ensure_bundle(
        str(where),
        backbone,
        cache,
        out=out,
        data_root=root,
        progress=progress,
        reuse=True,
        fingerprint=options.fingerprint,
        resplit=options.resplit,
        extract=options.extract,
        check_counts=options.check_counts,
    )
    return out


@dataclass(frozen=True)
class ResolveOptions:
    """How image datasets are read: ``fingerprint`` (``stat`` or ``content``), ``resplit``
    (make new splits of ImageFolder trees), ``extract`` (False: encode nothing; a dataset
    or episode file not encoded yet becomes :attr:`ResolvedSweep.planned` runs, for a dry
    run) and ``check_counts`` (False: a registered dataset may be a partial copy)."""

    fingerprint: str = "stat"
    resplit: bool = False
    extract: bool = True
    check_counts: bool = True


def bundle_problem(src: BundleSource, trains: bool = True) -> str | None:
    """Why no run can use this bundle (None: it is fine): unreadable values (NaN/Inf), labels
    out of range, no evaluation group, no rows to train on (only when ``trains``: a bundle
    that is only a domain-generalisation target is scored, never fitted), fewer than two
    classes."""
    bundle, choice = src.bundle, src.choice
    try:
        bundle.check()
    except ClipadaptError as error:
        return str(error)
    groups = bundle.groups()
    eval_set = choice.eval_set or "test"
    if eval_set not in groups:
        return (
            f"{bundle.where}: no evaluation group {eval_set!r} (groups: "
            f"{', '.join(groups) or 'none'}); set eval_set: (or --eval-set) to one of them"
        )
    for role, group in (("train", choice.train_set), ("val", choice.val_set)):
        if group not in (None, "none") and group not in groups:
            return (
                f"{bundle.where}: no {role} group {group!r} (groups: {', '.join(groups)}); "
                f"fix {role}_set:"
            )
    if trains and choice.train_set is None and "train" not in groups and not bundle.shot_groups():
        return f"{bundle.where}: no `train` group and no `train_{{K}}shot` group to fit on"
    if bundle.num_classes < 2:
        return (
            f"{bundle.where}: {bundle.num_classes} class(es) "
            f"({', '.join(bundle.classnames)}): an accuracy over one class is 100 % by "
            "construction; a classifier needs at least 2 classes"
        )
    return None


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


#: card need -> the bundle tensor that provides it (the text-derived ones)
_NEED_TENSORS = {
    "prompt_features": "text_features_all",
    "negative_features": "negative_text_features",
    "description_features": "description_features",
}


def _cannot_run(method: MethodChoice, src: BundleSource) -> str | None:
    """Why ``method`` cannot run on the bundle at all (None: it can)."""
    card = get_method_class(method.name).card
    if not src.bundle.has_text() and card.needs_text:
        return "needs `text_features`, which the bundle lacks"
    if needs_text_tower(method.name) and src.backbone_record is None:
        return _NO_TOWER
    lacking = [
        tensor
        for need, tensor in _NEED_TENSORS.items()
        if need in card.needs and tensor not in src.bundle.tensors
    ]
    # options can switch a need off (e.g. HeGraphAdapter's positive_nodes=templates), so a
    # spec with options runs and says for itself what it lacks; the fast preset (`--profile
    # fast`) is a shorter schedule, which switches no need off
    options = {k: v for k, v in method.params.items() if (k, v) != ("preset", FAST_PRESET)}
    if lacking and not options:
        return f"needs `{'`, `'.join(lacking)}`, which the bundle lacks"
    return None


def resolve_sweep(
    spec: SweepSpec, progress: bool = True, options: ResolveOptions | None = None
) -> ResolvedSweep:
    """Find or extract every dataset's bundle and list the cells; missing data is skipped.

    Each bundle is checked once (:func:`bundle_problem`); what is wrong with one goes to
    ``errors``, and no cell is made on it.

    Raises:
        ConfigError: an unknown method or bad method options (checked before any work).
    """
    from clipadapt.features.pipeline import classnames_hash

    options = options or ResolveOptions()
    methods = [checked_method(spec_str) for spec_str in spec.methods]
    if not methods:
        raise ConfigError("no methods given (methods: [...] or --methods)")
    skipped: list[tuple[str, str]] = []
    errors: list[tuple[str, str]] = []
    warnings: list[tuple[str, str]] = []
    classnames: dict[str, list[str]] = {}
    sources: dict[str, list[BundleSource]] = {}
    loaded: dict[Path, FeatureBundle] = {}
    # datasets not encoded yet (extract=False) -> the backbone names they would get
    pending: dict[str, list[str]] = {}
    planned: list[PlannedRun] = []
    to_extract: list[tuple[str, str]] = []

    def load(path: Path) -> FeatureBundle:
        if path not in loaded:
            loaded[path] = load_bundle(path)
        return loaded[path]

    wanted = list(spec.datasets)
    have = {d.name for d in wanted}
    # bundles that some run fits on; the rest are only domain-generalisation targets
    fitted = have | {dg.source for dg in spec.domain_generalization}
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
                    paths.append(_extract(spec, ds, backbone, progress, options))
                except NotExtracted:
                    pending.setdefault(ds.name, []).append(backbone_display_name(backbone))
                    to_extract.append((ds.name, backbone))
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
                errors.append((ds.name, str(error)))
                continue
            key = str(path)
            if ds.classnames:
                # a count mismatch is the user's error (ConfigError, exit 2), named at once
                names_file = spec.path(ds.classnames)
                bundle = with_classnames(bundle, read_classnames(names_file, bundle.num_classes))
                key = named_bundle_key(path, names_file)
            src = BundleSource.of(bundle, name=ds.name, key=key, choice=ds.choice)
            problem = bundle_problem(src, trains=ds.name in fitted)
            if problem is not None:
                errors.append((ds.name, problem))
                continue
            for warning in _recorded_warnings(bundle):
                warnings.append((ds.name, warning))
            classnames[classnames_hash(bundle.classnames)] = list(bundle.classnames)
            mine.append(src)
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
        for _ in pending.get(ds.name, []):
            planned += [
                PlannedRun(CLASSIFICATION, ds.name, method.spec, k, seed, waits_for=(ds.name,))
                for method in methods
                for k in spec.shots
                for seed in spec.seeds
            ]
    for dg in spec.domain_generalization:
        srcs = sources.get(dg.source, [])
        if not srcs and not pending.get(dg.source):
            skipped.append((f"domain generalisation from {dg.source}", "source missing"))
            continue
        for backbone in pending.get(dg.source, []):
            # the source is not encoded yet: list what it would score, by name
            names = [
                n
                for n in dg.targets
                if n != dg.source
                and (
                    backbone in pending.get(n, ())
                    or any(t.bundle.backbone == backbone for t in sources.get(n, []))
                )
            ]
            for n in dg.targets:
                if n != dg.source and n not in names:
                    skipped.append((f"DG target {n}", f"no bundle with backbone {backbone}"))
            if not names:
                continue
            waits = (dg.source, *(n for n in names if backbone in pending.get(n, ())))
            planned += [
                PlannedRun(DOMAIN_GENERALIZATION, dg.source, m.spec, k, seed, tuple(names), waits)
                for m in methods
                for k in dg.shots
                for seed in spec.seeds
            ]
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
            waiting = [
                n
                for n in dg.targets
                if n != src.name
                and not any(t.name == n for t in targets)
                and src.bundle.backbone in pending.get(n, ())
            ]
            missing = [
                n
                for n in dg.targets
                if n != src.name and not any(t.name == n for t in targets) and n not in waiting
            ]
            for n in missing:
                skipped.append((f"DG target {n}", f"no bundle with backbone {src.bundle.backbone}"))
            if waiting:
                # a target is not encoded yet: the run (source and every target) is listed,
                # not keyed; it becomes a cell once the targets are extracted
                scored = tuple(
                    n for n in dg.targets if n in waiting or any(t.name == n for t in targets)
                )
                waits = tuple(waiting)
                planned += [
                    PlannedRun(DOMAIN_GENERALIZATION, dg.source, m.spec, k, seed, scored, waits)
                    for m in methods
                    for k in dg.shots
                    for seed in spec.seeds
                ]
                continue
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
        if not path.is_file():
            hint = f"; {ep.hint}" if ep.hint else ""
            skipped.append((f"episodes {ep.name}", f"{path} not found{hint}"))
            continue
        if path.suffix == ".json":
            if not spec.backbones:
                skipped.append(
                    (f"episodes {ep.name}", "image episodes need a backbone (backbones: [world])")
                )
                continue
            try:
                from clipadapt.features.pipeline import ensure_episode_features

                path = ensure_episode_features(
                    path, spec.backbones[0], name=ep.name, extract=options.extract
                )
            except NotExtracted:
                to_extract.append((f"episodes {ep.name}", spec.backbones[0]))
                planned += [
                    PlannedRun(EPISODES, ep.name, method.spec, None, seed, waits_for=(ep.name,))
                    for method in methods
                    for seed in spec.seeds
                ]
                continue
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
    bundles = {n: Path(s[0].key.partition(CLASSNAMES_KEY)[0]) for n, s in sources.items() if s}
    return ResolvedSweep(cells, skipped, bundles, errors, warnings, classnames, planned, to_extract)


def _recorded_warnings(bundle: FeatureBundle) -> list[str]:
    """The warnings its extraction recorded in a bundle (``warnings`` metadata)."""
    import json

    try:
        found = json.loads(bundle.metadata.get("warnings") or "[]")
    except json.JSONDecodeError:
        return []
    return [str(w) for w in found] if isinstance(found, list) else []
