"""Benchmark sweeps: datasets × backbones × methods × shots × seeds, resumable, local or on Ray.

Two entry points:

* :func:`run_grid` runs methods × shots × seeds on one in-memory bundle (the demo uses it);
* :func:`run_sweep` runs a :class:`SweepSpec` (from flags, a YAML file or ``--profile paper``):
  classification cells on every dataset, domain-generalisation cells (fit on a source, score on
  targets) and reasoning-episode cells, through a local executor (in process, or a process pool)
  or Ray. Each cell is a pure function of its description; results are written only by the
  driver, one fsynced JSON line per run, so a killed sweep resumes where it stopped and a
  rerun of the same command skips finished runs (``rerun=True`` forces them).

A sweep YAML file (paths are relative to the file)::

    bundle_dir: ../shared/data/clip_vitb32      # <name>.safetensors bundles
    datasets:
      - caltech101                              # bundle_dir/caltech101.safetensors
      - name: imagenet                          # a bundle with explicit groups
        bundle: feats/imagenet.safetensors
        train_set: train_1shot
        val_set: none
        eval_set: train_4shot
      - name: my_photos                         # an image dataset, through the feature cache
        images: ./my_photos
    backbones: [ViT-B-32:openai]                # for image datasets only
    methods: [zeroshot, tip_adapter, "tip_adapter_f:epochs=10"]
    shots: [1, 2, 4, 8, 16]
    seeds: [1, 2, 3]
    domain_generalization:
      - source: imagenet
        targets: [imagenet_v2, imagenet_sketch, imagenet_a, imagenet_r]
        shots: [16]
    episodes:
      - name: world_episodes
        file: episodes.safetensors              # or an image-episode .json (needs a backbone)
"""

from __future__ import annotations

import dataclasses
import logging
import platform
import re
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from clipadapt.bench.results import append_result, finished_ids, run_id
from clipadapt.data.bundle import FeatureBundle, load_bundle
from clipadapt.data.datasets import list_datasets
from clipadapt.exceptions import ClipadaptError, ConfigError, MissingTensorError
from clipadapt.methods.base import create_method, get_method_class, parse_method_spec
from clipadapt.tasks.classification import SplitChoice, evaluate

log = logging.getLogger(__name__)

#: The CoOp suite of the papers (registered dataset names).
PAPER_DATASETS = tuple(list_datasets())
#: ImageNet's distribution-shift targets (bundle names looked up in ``bundle_dir``).
PAPER_DG_TARGETS = ("imagenet_v2", "imagenet_sketch", "imagenet_a", "imagenet_r")


# ----------------------------------------------------------------------------- one bundle
@dataclass
class Grid:
    """The cells of a sweep on one bundle."""

    methods: Sequence[str]
    shots: Sequence[int | None]
    seeds: Sequence[int] = (1,)
    choice: SplitChoice = field(default_factory=SplitChoice)

    def cells(self, bundle: FeatureBundle) -> list[dict[str, Any]]:
        """One classification cell per method × shots × seed (options validated first)."""
        out = []
        for spec in self.methods:
            name, params = _checked_spec(spec)
            for shots in self.shots:
                for seed in self.seeds:
                    cell = {
                        "task": "classification",
                        "dataset": bundle.name,
                        "backbone": bundle.backbone,
                        "method": name,
                        "method_spec": spec,
                        "params": params,
                        "shots": shots,
                        "seed": seed,
                        "train_set": self.choice.train_set,
                        "val_set": self.choice.val_set,
                        "eval_set": self.choice.eval_set,
                        "bundle_fingerprint": bundle.fingerprint(),
                    }
                    cell["run_id"] = run_id(cell)
                    out.append(cell)
        return out


def _checked_spec(spec: str) -> tuple[str, dict[str, Any]]:
    name, params = parse_method_spec(spec)
    name = get_method_class(name).card.name
    create_method(name, **params)  # validate options before any work
    return name, params


def run_grid(
    bundle: FeatureBundle,
    grid: Grid,
    out: str | Path | None,
    *,
    rerun: bool = False,
    progress: bool = True,
    text_encoder: object | None = None,
    device: str = "cpu",
    keep_going: bool = False,
) -> list[dict[str, Any]]:
    """Run every cell not yet finished in ``out``; return the records of this call's runs.

    With ``keep_going`` a cell that fails with a user-facing error (e.g. a method needing a
    tensor the bundle lacks) is recorded with ``status: "error"`` and the sweep continues.
    """
    cells = grid.cells(bundle)
    done = set() if (rerun or out is None) else finished_ids(out)
    todo = [c for c in cells if c["run_id"] not in done]
    if len(todo) < len(cells):
        log.info(
            "%d of %d cells already in %s; skipping them", len(cells) - len(todo), len(cells), out
        )
    records = []
    bar = tqdm(todo, desc=f"bench {bundle.name}", unit="run", disable=not progress)
    for cell in bar:
        bar.set_postfix_str(f"{cell['method']} K={cell['shots']} seed={cell['seed']}")
        method = create_method(cell["method"], **cell["params"])
        try:
            result = evaluate(
                method, bundle, cell["shots"], cell["seed"], grid.choice, text_encoder, device
            )
        except ClipadaptError as error:
            if not keep_going:
                raise
            record = {**cell, "status": "error", "error": str(error), "time": time.time()}
            log.warning("%s failed on %s: %s", cell["method"], bundle.name, error)
            if out is not None:
                append_result(out, record)
            records.append(record)
            continue
        record = _ok_record(cell, result.to_dict(), device)
        if out is not None:
            append_result(out, record)
        records.append(record)
    return records


def _ok_record(cell: dict[str, Any], result: dict[str, Any], device: str) -> dict[str, Any]:
    record = {**cell, **result, "status": "ok", "time": time.time()}
    record.update(versions=_versions(), device=device, method_spec=cell["method_spec"])
    record.pop("outputs", None)
    record.pop("bundles", None)
    return record


def _versions() -> dict[str, str]:
    from clipadapt import __version__

    return {
        "clipadapt": __version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


# ----------------------------------------------------------------------------- sweep spec
@dataclass
class DatasetSpec:
    """One dataset of a sweep: a feature bundle, or an image dataset extracted through the cache.

    Attributes:
        name: the dataset name (a registered CoOp name, or any name with ``bundle``/``images``).
        bundle: a ``.safetensors`` bundle; default ``<bundle_dir>/<name>.safetensors``.
        images: a registered dataset name or a dataset folder, encoded once per backbone.
        train_set, val_set, eval_set: bundle groups (see ``SplitChoice``).
    """

    name: str
    bundle: str | None = None
    images: str | None = None
    train_set: str | None = None
    val_set: str | None = None
    eval_set: str | None = None

    @property
    def choice(self) -> SplitChoice:
        return SplitChoice(self.train_set, self.val_set, self.eval_set)


@dataclass
class DGSpec:
    """Domain generalisation: fit on ``source``, score unchanged on each of ``targets``."""

    source: str
    targets: list[str]
    shots: list[int] = field(default_factory=lambda: [16])
    target_eval_set: str = "test"


@dataclass
class EpisodesSpec:
    """Reasoning episodes: a feature-episode ``.safetensors`` or an image-episode ``.json``."""

    name: str
    file: str


@dataclass
class SweepSpec:
    """Everything a sweep runs (environment, grid and tasks), as read from YAML or flags.

    Relative paths resolve against ``base_dir`` (the YAML file's folder, else the working
    directory).
    """

    datasets: list[DatasetSpec] = field(default_factory=list)
    methods: list[str] = field(default_factory=list)
    shots: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16])
    seeds: list[int] = field(default_factory=lambda: [1, 2, 3])
    backbones: list[str] = field(default_factory=list)
    domain_generalization: list[DGSpec] = field(default_factory=list)
    episodes: list[EpisodesSpec] = field(default_factory=list)
    bundle_dir: str | None = None
    data_root: str | None = None
    cache_dir: str | None = None
    base_dir: str = "."

    def path(self, value: str | Path) -> Path:
        p = Path(value).expanduser()
        return p if p.is_absolute() else Path(self.base_dir) / p

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _as_list(value: Any, what: str) -> list[Any]:
    if value is None:
        return []
    if isinstance(value, (str, int)):
        return [value]
    if isinstance(value, list):
        return value
    raise ConfigError(f"{what} must be a list, got {type(value).__name__}")


def sweep_from_dict(data: dict[str, Any], base_dir: str | Path = ".") -> SweepSpec:
    """Build a :class:`SweepSpec` from a parsed YAML mapping (unknown keys are an error)."""
    known = {f.name for f in dataclasses.fields(SweepSpec)} - {"base_dir"}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"unknown sweep key(s) {unknown}; valid keys: {sorted(known)}")
    datasets = []
    for item in _as_list(data.get("datasets"), "datasets"):
        if isinstance(item, str):
            datasets.append(DatasetSpec(item))
        elif (
            isinstance(item, dict)
            and len(item) == 1
            and isinstance(next(iter(item.values())), dict)
        ):
            ((name, opts),) = item.items()
            datasets.append(_build(DatasetSpec, {"name": name, **opts}, "datasets"))
        elif isinstance(item, dict):
            datasets.append(_build(DatasetSpec, item, "datasets"))
        else:
            raise ConfigError(f"a dataset entry must be a name or a mapping, got {item!r}")
    dg = []
    for item in _as_list(data.get("domain_generalization"), "domain_generalization"):
        item = dict(item)
        item["targets"] = [str(t) for t in _as_list(item.get("targets"), "targets")]
        item["shots"] = [int(s) for s in _as_list(item.get("shots", [16]), "shots")]
        dg.append(_build(DGSpec, item, "domain_generalization"))
    episodes = [
        _build(EpisodesSpec, dict(e), "episodes")
        for e in _as_list(data.get("episodes"), "episodes")
    ]
    spec = SweepSpec(
        datasets=datasets,
        methods=[str(m) for m in _as_list(data.get("methods"), "methods")],
        shots=[int(s) for s in _as_list(data.get("shots", [1, 2, 4, 8, 16]), "shots")],
        seeds=[int(s) for s in _as_list(data.get("seeds", [1, 2, 3]), "seeds")],
        backbones=[str(b) for b in _as_list(data.get("backbones"), "backbones")],
        domain_generalization=dg,
        episodes=episodes,
        bundle_dir=data.get("bundle_dir"),
        data_root=data.get("data_root"),
        cache_dir=data.get("cache_dir"),
        base_dir=str(base_dir),
    )
    if any(s < 1 for s in spec.shots):
        raise ConfigError(f"shots must be positive, got {spec.shots}")
    return spec


def _build(cls: type, data: dict[str, Any], what: str) -> Any:
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"unknown key(s) {unknown} in a {what} entry; valid: {sorted(names)}")
    try:
        return cls(**data)
    except TypeError as error:
        raise ConfigError(f"bad {what} entry {data!r}: {error}") from None


def load_sweep(path: str | Path, overrides: Sequence[str] = ()) -> SweepSpec:
    """Read a sweep YAML file; ``overrides`` are ``key=value`` strings (values parsed as YAML).

    Example:
        >>> spec = load_sweep("grid.yaml", ["shots=[1,16]", "seeds=[1]"])  # doctest: +SKIP
    """
    import yaml

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as error:
        raise ConfigError(
            f"cannot read the sweep file {path}: {yaml_problem(error)}; fix the YAML syntax there"
        ) from None
    except OSError as error:
        raise ConfigError(f"cannot read the sweep file {path}: {error}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a sweep file is a mapping (datasets:, methods:, ...)")
    data.update(parse_overrides(overrides))
    return sweep_from_dict(data, base_dir=path.resolve().parent)


def yaml_problem(error: Exception) -> str:
    """A YAML parser error on one line: where (line, column) and what."""
    mark = getattr(error, "problem_mark", None)
    problem = getattr(error, "problem", None) or str(error).splitlines()[0]
    context = getattr(error, "context", None)
    what = f"{context}, {problem}" if context else problem
    if mark is not None:
        return f"line {mark.line + 1}, column {mark.column + 1}: {what}"
    return what


def parse_overrides(overrides: Sequence[str]) -> dict[str, Any]:
    """``["shots=[1,16]", "bundle_dir=feats"]`` -> ``{"shots": [1, 16], "bundle_dir": "feats"}``."""
    import yaml

    out = {}
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set expects key=value, got {item!r}")
        try:
            out[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError as error:
            raise ConfigError(f"--set {item!r}: {yaml_problem(error)}") from None
    return out


def paper_profile(
    bundle_dir: str | None = None,
    data_root: str | None = None,
    backbones: Sequence[str] = (),
    methods: Sequence[str] | None = None,
) -> SweepSpec:
    """The papers' protocol: 11 CoOp datasets × shots 1-16 × seeds 1-3 × all methods, plus
    ImageNet 16-shot → V2/Sketch/A/R. What is missing is skipped by :func:`resolve_sweep`."""
    from clipadapt.methods.base import list_methods

    return SweepSpec(
        datasets=[DatasetSpec(name) for name in PAPER_DATASETS],
        methods=list(methods) if methods else list_methods(),
        shots=[1, 2, 4, 8, 16],
        seeds=[1, 2, 3],
        backbones=list(backbones),
        domain_generalization=[DGSpec("imagenet", list(PAPER_DG_TARGETS), [16])],
        bundle_dir=bundle_dir,
        data_root=data_root,
    )


# ----------------------------------------------------------------------------- resolution
@dataclass
class Source:
    """A resolved dataset: its bundle file and the split choice to use on it."""

    name: str
    path: Path
    bundle: FeatureBundle
    choice: SplitChoice


@dataclass
class ResolvedSweep:
    """The cells of a sweep and what was skipped (``[(what, why)]``)."""

    cells: list[dict[str, Any]]
    skipped: list[tuple[str, str]]
    bundles: dict[str, Path]


def _find_bundle(spec: SweepSpec, ds: DatasetSpec) -> Path | None:
    if ds.bundle:
        return spec.path(ds.bundle)
    if spec.bundle_dir:
        candidate = spec.path(spec.bundle_dir) / f"{ds.name}.safetensors"
        if candidate.is_file():
            return candidate
    return None


def _extract(spec: SweepSpec, ds: DatasetSpec, backbone: str, progress: bool) -> Path:
    """Encode an image dataset once per backbone (the feature cache makes reruns free)."""
    from clipadapt._utils import safe_name
    from clipadapt.data.datasets import load_dataset
    from clipadapt.data.prompts import load_descriptions
    from clipadapt.encoders.clip import ClipEncoder, resolve_backbone
    from clipadapt.features.extract import extract_dataset

    root = spec.path(spec.data_root) if spec.data_root else None
    images = ds.images or ds.name
    where = spec.path(images) if (ds.images and spec.path(images).exists()) else images
    dataset = load_dataset(where if isinstance(where, str) else str(where), root)
    descriptions = None
    if getattr(dataset, "descriptions", None) is not None:
        descriptions = load_descriptions(dataset.descriptions, dataset.classnames)
    cache = spec.path(spec.cache_dir) if spec.cache_dir else None
    encoder = ClipEncoder(resolve_backbone(backbone), device="auto")
    base = cache if cache is not None else Path(spec.base_dir) / "bench-features"
    out = base / "bundles" / safe_name(backbone) / f"{safe_name(ds.name)}.safetensors"
    if out.is_file():
        return out
    extract_dataset(
        dataset, encoder, out, cache_dir=cache, descriptions=descriptions, progress=progress
    )
    return out


def resolve_sweep(spec: SweepSpec, progress: bool = True) -> ResolvedSweep:
    """Find or extract every dataset's bundle and list the cells; missing data is skipped.

    Raises:
        ConfigError: an unknown method or bad method options (checked before any work).
    """
    specs = [(spec_str, *_checked_spec(spec_str)) for spec_str in spec.methods]
    if not specs:
        raise ConfigError("no methods given (methods: [...] or --methods)")
    skipped: list[tuple[str, str]] = []
    sources: dict[str, list[Source]] = {}
    loaded: dict[Path, FeatureBundle] = {}

    def load(path: Path) -> FeatureBundle:
        if path not in loaded:
            loaded[path] = load_bundle(path)
        return loaded[path]

    wanted = list(spec.datasets)
    have = {d.name for d in wanted}
    for dg in spec.domain_generalization:
        wanted += [DatasetSpec(n) for n in (dg.source, *dg.targets) if n not in have]
        have |= {dg.source, *dg.targets}
    entries: list[tuple[DatasetSpec, list[Source]]] = []
    for ds in wanted:
        mine: list[Source] = []
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
            mine.append(Source(ds.name, path, bundle, ds.choice))
            sources.setdefault(ds.name, []).append(mine[-1])

    cells: list[dict[str, Any]] = []
    for ds, srcs in entries[: len(spec.datasets)]:
        for src in srcs:
            shots = _shots_for(src, spec.shots)
            for spec_str, name, params in specs:
                if not src.bundle.has_text() and get_method_class(name).card.needs_text:
                    skipped.append(
                        (f"{name} on {ds.name}", "needs `text_features`, which the bundle lacks")
                    )
                    continue
                for k in shots:
                    if k is not None and not _has_shots(src.bundle, k):
                        skipped.append((f"{ds.name} {k}-shot", "no such shots in the bundle"))
                        continue
                    for seed in spec.seeds:
                        cells.append(_cell("classification", src, spec_str, name, params, k, seed))
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
            for spec_str, name, params in specs:
                for k in dg.shots if not src.choice.train_set else _shots_for(src, []):
                    if k is not None and not _has_shots(src.bundle, k):
                        skipped.append((f"DG {dg.source} {k}-shot", "no such shots in the bundle"))
                        continue
                    for seed in spec.seeds:
                        cell = _cell("domain_generalization", src, spec_str, name, params, k, seed)
                        cell["targets"] = [t.name for t in targets]
                        cell["target_eval_set"] = dg.target_eval_set
                        cell["bundles"] = [str(src.path)] + [str(t.path) for t in targets]
                        cell["outputs"] = [
                            run_id({**cell, "dataset": d, "source": src.name})
                            for d in [src.name, *cell["targets"]]
                        ]
                        cell["run_id"] = cell["outputs"][0]
                        cells.append(cell)
    for ep in spec.episodes:
        path = spec.path(ep.file)
        if path.suffix == ".json":
            try:
                path = _encode_episode_file(spec, ep, path)
            except (ClipadaptError, OSError) as error:
                skipped.append((f"episodes {ep.name}", str(error)))
                continue
        if not path.is_file():
            skipped.append((f"episodes {ep.name}", f"{path} not found"))
            continue
        for spec_str, name, params in specs:
            for seed in spec.seeds:
                cell = {
                    "task": "episodes",
                    "dataset": ep.name,
                    "backbone": "episodes",
                    "method": name,
                    "method_spec": spec_str,
                    "params": params,
                    "shots": None,
                    "seed": seed,
                    "episodes_file": str(path),
                    "train_set": None,
                    "val_set": None,
                    "eval_set": None,
                }
                cell["run_id"] = run_id(cell)
                cell["outputs"] = [cell["run_id"]]
                cells.append(cell)
    return ResolvedSweep(cells, skipped, {n: s[0].path for n, s in sources.items() if s})


def _shots_for(src: Source, shots: Sequence[int]) -> list[int | None]:
    """The sweep's shots, or the K of a fixed ``train_{K}shot`` train group (None otherwise)."""
    if not src.choice.train_set:
        return list(shots)
    match = re.fullmatch(r"train_(\d+)shot", src.choice.train_set)
    return [int(match.group(1)) if match else None]


def _has_shots(bundle: FeatureBundle, k: int) -> bool:
    return k in bundle.shot_groups() or bundle.has_group("train")


def _cell(
    task: str, src: Source, spec_str: str, name: str, params: dict, shots: int | None, seed: int
) -> dict[str, Any]:
    cell = {
        "task": task,
        "dataset": src.name,
        "backbone": src.bundle.backbone,
        "method": name,
        "method_spec": spec_str,
        "params": params,
        "shots": shots,
        "seed": seed,
        "train_set": src.choice.train_set,
        "val_set": src.choice.val_set,
        "eval_set": src.choice.eval_set,
        "bundle_fingerprint": src.bundle.fingerprint(),
        "bundles": [str(src.path)],
    }
    cell["run_id"] = run_id(cell)
    cell["outputs"] = [cell["run_id"]]
    return cell


def _encode_episode_file(spec: SweepSpec, ep: EpisodesSpec, path: Path) -> Path:
    """Encode an image-episode JSON with the sweep's first backbone (cached beside it)."""
    from clipadapt._utils import safe_name
    from clipadapt.encoders.clip import ClipEncoder, resolve_backbone
    from clipadapt.features.transforms import CleanView, load_rgb
    from clipadapt.tasks.episodes import encode_episodes

    if not spec.backbones:
        raise ConfigError("image episodes need a backbone (backbones: [world])")
    backbone = spec.backbones[0]
    out = path.with_name(f"{path.stem}.{safe_name(backbone)}.safetensors")
    if out.is_file() and out.stat().st_mtime >= path.stat().st_mtime:
        return out
    encoder = ClipEncoder(resolve_backbone(backbone), device="auto")
    view = CleanView(encoder.image_size, encoder.mean, encoder.std)

    def images(paths: list[Path]) -> torch.Tensor:
        chunks = []
        for start in range(0, len(paths), 256):
            batch = torch.stack([view(load_rgb(p)) for p in paths[start : start + 256]])
            chunks.append(encoder.encode_images(batch, normalize=True))
        return torch.cat(chunks)

    with torch.no_grad():
        episodes = encode_episodes(
            path, images, lambda texts: encoder.encode_text(texts, normalize=True)
        )
    episodes.name = ep.name
    return episodes.save(out)


# ----------------------------------------------------------------------------- execution
@dataclass(frozen=True)
class CellSettings:
    """Per-sweep settings every cell sees (picklable, sent to workers)."""

    device: str = "cpu"
    tensorboard: str | None = None
    keep_going: bool = True


_BUNDLE_CACHE: dict[str, FeatureBundle] = {}


def _bundle(path: str, provided: dict[str, FeatureBundle] | None = None) -> FeatureBundle:
    if provided and path in provided:
        return provided[path]
    if path not in _BUNDLE_CACHE:
        _BUNDLE_CACHE[path] = load_bundle(path)
    return _BUNDLE_CACHE[path]


def execute_cell(
    cell: dict[str, Any],
    settings: CellSettings = CellSettings(),
    bundles: dict[str, FeatureBundle] | None = None,
) -> list[dict[str, Any]]:
    """Run one cell and return its records (one per dataset scored); never writes files.

    ``bundles`` maps a bundle path to an already loaded bundle (Ray passes them through its
    object store); other paths are read from disk once per process.
    """
    from clipadapt.bench.tensorboard import training_curves

    try:
        method = create_method(cell["method"], **cell["params"])
        run_name = f"{cell['task']}/{cell['dataset']}/{cell['method']}/{cell['shots']}shot/seed{cell['seed']}"
        with training_curves(settings.tensorboard, run_name):
            if cell["task"] == "classification":
                bundle = _bundle(cell["bundles"][0], bundles)
                choice = SplitChoice(cell["train_set"], cell["val_set"], cell["eval_set"])
                result = evaluate(
                    method, bundle, cell["shots"], cell["seed"], choice, device=settings.device
                )
                return [_ok_record(cell, result.to_dict(), settings.device)]
            if cell["task"] == "domain_generalization":
                from clipadapt.tasks.domain_generalization import evaluate_dg

                source, *targets = (_bundle(p, bundles) for p in cell["bundles"])
                choice = SplitChoice(cell["train_set"], cell["val_set"], cell["eval_set"])
                results = evaluate_dg(
                    method,
                    source,
                    targets,
                    cell["shots"],
                    cell["seed"],
                    choice,
                    target_eval_set=cell["target_eval_set"],
                    device=settings.device,
                )
                out = []
                for rid, res in zip(cell["outputs"], results, strict=True):
                    out.append({**_ok_record(cell, res, settings.device), "run_id": rid})
                return out
            if cell["task"] == "episodes":
                from clipadapt.tasks.episodes import evaluate_episodes, load_episodes

                episodes = load_episodes(cell["episodes_file"])
                res = evaluate_episodes(
                    lambda: create_method(cell["method"], **cell["params"]),
                    episodes,
                    seed=cell["seed"],
                    device=settings.device,
                )
                return [_ok_record(cell, res, settings.device)]
            raise ConfigError(f"unknown task {cell['task']!r}")
    except (ClipadaptError, MissingTensorError) as error:
        if not settings.keep_going:
            raise
        log.warning("%s failed on %s: %s", cell["method"], cell["dataset"], error)
        record = {**cell, "status": "error", "error": str(error), "time": time.time()}
        record.pop("outputs", None)
        record.pop("bundles", None)
        return [record]


def _pool_init() -> None:
    # Several workers share few cores: one BLAS thread each avoids oversubscription.
    torch.set_num_threads(1)


class LocalExecutor:
    """Run cells in this process (``workers=1``) or in a process pool of ``workers``."""

    def __init__(self, workers: int = 1) -> None:
        if workers < 1:
            raise ConfigError(f"workers must be at least 1, got {workers}")
        self.workers = workers

    def map(
        self, cells: Sequence[dict[str, Any]], settings: CellSettings
    ) -> Iterator[list[dict[str, Any]]]:
        """Yield each cell's records as cells finish (order not guaranteed with a pool)."""
        if self.workers == 1:
            for cell in cells:
                yield execute_cell(cell, settings)
            return
        import multiprocessing

        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(self.workers, mp_context=context, initializer=_pool_init) as pool:
            pending = {pool.submit(execute_cell, cell, settings) for cell in cells}
            while pending:
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                for future in done:
                    yield future.result()


class RayExecutor:
    """Each cell a Ray task; bundles go through Ray's object store once per sweep.

    Args:
        address: an existing cluster ("auto", "ray://host:10001"); None starts a local instance.
        num_cpus: CPUs of the local instance (ignored with ``address``).
        cpus_per_task: CPUs reserved per cell.
    """

    def __init__(
        self, address: str | None = None, num_cpus: int | None = None, cpus_per_task: float = 1
    ) -> None:
        try:
            import ray  # noqa: F401
        except ImportError:
            raise ConfigError("the Ray executor needs Ray: pip install 'clipadapt[ray]'") from None
        self.address = address
        self.num_cpus = num_cpus
        self.cpus_per_task = cpus_per_task

    def map(
        self, cells: Sequence[dict[str, Any]], settings: CellSettings
    ) -> Iterator[list[dict[str, Any]]]:
        import ray

        started_here = not ray.is_initialized()
        if started_here:
            if self.address:
                ray.init(address=self.address, log_to_driver=False)
            else:
                ray.init(
                    num_cpus=self.num_cpus,
                    include_dashboard=False,
                    log_to_driver=False,
                    configure_logging=False,
                )
        try:
            task = ray.remote(num_cpus=self.cpus_per_task)(_ray_cell)
            refs: dict[str, Any] = {}
            pending = []
            for cell in cells:
                for path in cell.get("bundles", []):
                    if path not in refs:
                        refs[path] = ray.put(load_bundle(path))
                bundle_refs = [refs[p] for p in cell.get("bundles", [])]
                pending.append(task.remote(cell, settings, cell.get("bundles", []), *bundle_refs))
            while pending:
                done, pending = ray.wait(pending, num_returns=1)
                yield ray.get(done[0])
        finally:
            if started_here:
                ray.shutdown()


def _ray_cell(
    cell: dict[str, Any], settings: CellSettings, paths: list[str], *bundles: FeatureBundle
) -> list[dict[str, Any]]:
    torch.set_num_threads(1)
    return execute_cell(cell, settings, dict(zip(paths, bundles, strict=True)))


def run_cells(
    cells: Sequence[dict[str, Any]],
    out: str | Path | None,
    *,
    executor: LocalExecutor | RayExecutor | None = None,
    settings: CellSettings = CellSettings(),
    rerun: bool = False,
    progress: bool = True,
    on_record: Callable[[dict[str, Any]], None] | None = None,
) -> list[dict[str, Any]]:
    """Run the cells not yet finished in ``out`` and append their records (driver only).

    A cell is finished when every run it produces (``outputs``) has a ``status: ok`` line; a
    record whose run id is already there is never written twice.
    """
    executor = executor or LocalExecutor()
    done = set() if (rerun or out is None) else finished_ids(out)
    todo = [c for c in cells if not set(c.get("outputs", [c["run_id"]])) <= done]
    if len(todo) < len(cells):
        log.info(
            "%d of %d cells already in %s; skipping them", len(cells) - len(todo), len(cells), out
        )
    written: set[str] = set() if rerun else set(done)
    records: list[dict[str, Any]] = []
    bar = tqdm(total=len(todo), desc="bench", unit="cell", disable=not progress)
    try:
        for cell_records in executor.map(todo, settings):
            for record in cell_records:
                if record.get("status") == "ok" and record["run_id"] in written:
                    continue
                if out is not None:
                    append_result(out, record)
                if record.get("status") == "ok":
                    written.add(record["run_id"])
                records.append(record)
                if on_record is not None:
                    on_record(record)
            last = cell_records[-1] if cell_records else {}
            bar.set_postfix_str(f"{last.get('dataset')} {last.get('method')} K={last.get('shots')}")
            bar.update(1)
    finally:
        bar.close()
    return records


def run_sweep(
    spec: SweepSpec,
    out: str | Path,
    *,
    executor: LocalExecutor | RayExecutor | None = None,
    settings: CellSettings = CellSettings(),
    rerun: bool = False,
    progress: bool = True,
) -> tuple[list[dict[str, Any]], ResolvedSweep]:
    """Resolve ``spec``, save it beside ``out`` (``<out>.sweep.json``) and run its cells.

    Returns:
        (records written by this call, the resolved sweep with its skipped list).
    """
    from clipadapt._utils import atomic_write_json

    resolved = resolve_sweep(spec, progress=progress)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(
        out.with_name(out.name + ".sweep.json"),
        {"spec": spec.to_dict(), "cells": len(resolved.cells), "skipped": resolved.skipped},
    )
    records = run_cells(
        resolved.cells, out, executor=executor, settings=settings, rerun=rerun, progress=progress
    )
    return records, resolved
