"""What a sweep runs, as written by the user: a YAML file, ``--set`` overrides, or flags.

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

Nothing here touches data: :mod:`clipadapt.bench.resolve` turns a :class:`SweepSpec` into cells.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from clipadapt.data.datasets import list_datasets
from clipadapt.exceptions import ConfigError
from clipadapt.tasks.classification import SplitChoice

#: The CoOp suite of the papers (registered dataset names).
PAPER_DATASETS = tuple(list_datasets())
#: ImageNet's distribution-shift targets (bundle names looked up in ``bundle_dir``).
PAPER_DG_TARGETS = ("imagenet_v2", "imagenet_sketch", "imagenet_a", "imagenet_r")
#: The Bongard-HOI episode file of the paper profile (``clipadapt episodes bongard-hoi``
#: writes it), looked up in ``bundle_dir`` and then in ``<data_root>/bongard_hoi/``.
PAPER_EPISODES_FILE = "bongard_hoi_test.json"
_EPISODES_HINT = (
    "make it with `clipadapt episodes bongard-hoi --annotations bongard_hoi/bongard_hoi_release "
    f"--images bongard_hoi/hake/images --out <bundle_dir>/{PAPER_EPISODES_FILE}` (optional)"
)


@dataclass
class SweepDataset:
    """One dataset of a sweep: a feature bundle, or an image dataset extracted through the cache.

    Attributes:
        name: the dataset name (a registered CoOp name, or any name with ``bundle``/``images``).
        bundle: a ``.safetensors`` bundle; default ``<bundle_dir>/<name>.safetensors``.
        images: a registered dataset name or a dataset folder, encoded once per backbone.
        train_set, val_set, eval_set: bundle groups (see ``SplitChoice``).
        classnames: a class-name file (one per line) given to the bundle, for bundles made
            without names (``class_0`` ...); part of the bundle's fingerprint, so of the run
            key.
    """

    name: str
    bundle: str | None = None
    images: str | None = None
    train_set: str | None = None
    val_set: str | None = None
    eval_set: str | None = None
    classnames: str | None = None

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
    """Reasoning episodes: a feature-episode ``.safetensors`` or an image-episode ``.json``
    (``hint``: how to make the file, said when it is missing)."""

    name: str
    file: str
    hint: str = ""


@dataclass
class SweepSpec:
    """Everything a sweep runs (environment, grid and tasks), as read from YAML or flags.

    Relative paths resolve against ``base_dir`` (the YAML file's folder, else the working
    directory).
    """

    datasets: list[SweepDataset] = field(default_factory=list)
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


def _int_list(value: Any, what: str, *, positive: bool = False) -> list[int]:
    """A YAML list of integers (``shots: [1, 4]``), or one integer; anything else is an error
    naming the key and the value."""
    items = _as_list(value, what)
    out = []
    for item in items:
        # YAML reads `four` as a string and `1.5` as a float: neither is a count
        if isinstance(item, bool) or not isinstance(item, int):
            kind = "positive integers" if positive else "integers"
            where = f" in {value!r}" if isinstance(value, list) else ""
            raise ConfigError(f"{what} must be a list of {kind}, got {item!r}{where}")
        out.append(item)
    if positive and any(v < 1 for v in out):
        raise ConfigError(f"{what} must be positive, got {out}")
    return out


def sweep_from_dict(data: dict[str, Any], base_dir: str | Path = ".") -> SweepSpec:
    """Build a :class:`SweepSpec` from a parsed YAML mapping (unknown keys are an error)."""
    known = {f.name for f in dataclasses.fields(SweepSpec)} - {"base_dir"}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"unknown sweep key(s) {unknown}; valid keys: {sorted(known)}")
    datasets = []
    for item in _as_list(data.get("datasets"), "datasets"):
        if isinstance(item, str):
            datasets.append(SweepDataset(item))
        elif (
            isinstance(item, dict)
            and len(item) == 1
            and isinstance(next(iter(item.values())), dict)
        ):
            ((name, opts),) = item.items()
            datasets.append(_build(SweepDataset, {"name": name, **opts}, "datasets"))
        elif isinstance(item, dict):
            datasets.append(_build(SweepDataset, item, "datasets"))
        else:
            raise ConfigError(f"a dataset entry must be a name or a mapping, got {item!r}")
    dg = []
    for item in _as_list(data.get("domain_generalization"), "domain_generalization"):
        if not isinstance(item, dict):
            raise ConfigError(
                f"a domain_generalization entry is a mapping (source:, targets:), got {item!r}"
            )
        item = dict(item)
        item["targets"] = [str(t) for t in _as_list(item.get("targets"), "targets")]
        item["shots"] = _int_list(item.get("shots", [16]), "shots", positive=True)
        dg.append(_build(DGSpec, item, "domain_generalization"))
    episodes = []
    for e in _as_list(data.get("episodes"), "episodes"):
        if not isinstance(e, dict):
            raise ConfigError(f"an episodes entry is a mapping (name:, file:), got {e!r}")
        episodes.append(_build(EpisodesSpec, dict(e), "episodes"))
    spec = SweepSpec(
        datasets=datasets,
        methods=[str(m) for m in _as_list(data.get("methods"), "methods")],
        shots=_int_list(data.get("shots", [1, 2, 4, 8, 16]), "shots", positive=True),
        seeds=_int_list(data.get("seeds", [1, 2, 3]), "seeds"),
        backbones=[str(b) for b in _as_list(data.get("backbones"), "backbones")],
        domain_generalization=dg,
        episodes=episodes,
        bundle_dir=data.get("bundle_dir"),
        data_root=data.get("data_root"),
        cache_dir=data.get("cache_dir"),
        base_dir=str(base_dir),
    )
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
    ImageNet 16-shot → V2/Sketch/A/R, plus the Bongard-HOI episodes when their file
    (:data:`PAPER_EPISODES_FILE`) is in ``bundle_dir`` or ``<data_root>/bongard_hoi/``. What is
    missing is skipped, with the reason, by :func:`clipadapt.bench.resolve.resolve_sweep`."""
    from clipadapt.methods.base import list_methods

    candidates = [
        Path(folder).expanduser() / PAPER_EPISODES_FILE
        for folder in (bundle_dir, data_root and Path(data_root) / "bongard_hoi")
        if folder
    ]
    found = next((p for p in candidates if p.is_file()), None)
    where = found or (candidates[0] if candidates else Path(PAPER_EPISODES_FILE))
    return SweepSpec(
        episodes=[EpisodesSpec("bongard_hoi", str(where.resolve()), _EPISODES_HINT)],
        datasets=[SweepDataset(name) for name in PAPER_DATASETS],
        methods=list(methods) if methods else list_methods(),
        shots=[1, 2, 4, 8, 16],
        seeds=[1, 2, 3],
        backbones=list(backbones),
        domain_generalization=[DGSpec("imagenet", list(PAPER_DG_TARGETS), [16])],
        bundle_dir=bundle_dir,
        data_root=data_root,
    )


def split_method_specs(text: str) -> list[str]:
    """``--methods`` text -> method specs: ``;`` separates specs with options, else ``,``;
    wildcard names (``*adapter*``) expand to the registered methods they match."""
    from clipadapt.methods.base import list_methods

    if ";" in text:
        specs = [s.strip() for s in text.split(";") if s.strip()]
    elif ":" in text:
        specs = [text.strip()]
    else:
        specs = [s.strip() for s in text.split(",") if s.strip()]
    out: list[str] = []
    for spec in specs:
        if any(ch in spec.split(":")[0] for ch in "*?["):
            matched = list_methods(spec)
            if not matched:
                raise ConfigError(f"no method matches {spec!r}; see `clipadapt list-methods`")
            out.extend(matched)
        else:
            out.append(spec)
    return out


#: ``bench --profile``: ``paper`` runs every method with its defaults (the papers' schedules),
#: ``fast`` with its ``fast`` preset where it has one (``methods/presets/<name>.yaml``).
SCHEDULE_PROFILES = ("paper", "fast")
FAST_PRESET = "fast"


def profile_methods(methods: Sequence[str], profile: str | None) -> list[str]:
    """The method specs of a schedule profile (:data:`SCHEDULE_PROFILES`).

    ``fast`` puts ``preset=fast`` in front of the options of every spec whose method has a
    ``fast`` preset (``taskres:lr=0.01`` -> ``taskres:preset=fast,lr=0.01``: an explicit option
    still wins over the preset); a spec that names a ``preset=`` itself, and a method without a
    fast preset, stay as typed. ``paper`` and None change nothing. The preset is part of the
    spec, so records, the resume key and report rows keep the two profiles apart.

    Raises:
        ConfigError: an unknown profile. UnknownMethodError: an unknown method.
    """
    from clipadapt.methods.base import get_method_class, method_presets, parse_method_spec

    if profile is not None and profile not in SCHEDULE_PROFILES:
        raise ConfigError(
            f"unknown profile {profile!r}; choose one of {', '.join(SCHEDULE_PROFILES)}"
        )
    if profile != "fast":
        return list(methods)
    out = []
    for text in methods:
        name, params = parse_method_spec(text)
        has_fast = FAST_PRESET in method_presets(get_method_class(name).card.name)
        if "preset" in params or not has_fast:
            out.append(text)
            continue
        rest = text.partition(":")[2].strip()
        out.append(f"{name}:preset={FAST_PRESET}" + (f",{rest}" if rest else ""))
    return out


def sweep_from_args(args: argparse.Namespace) -> SweepSpec:
    """The sweep of a ``clipadapt bench`` command line: a YAML file (with ``--set``), the paper
    grid (``--profile`` without a file), or flags alone; ``--bundle``, ``--dataset``,
    ``--episodes``, ``--methods`` ... add to or replace what the file says. ``--profile`` also
    chooses the schedules of every method (:func:`profile_methods`), with a file or without.

    Raises:
        ConfigError: no methods, nothing to run, or ``--set`` without a YAML file.
    """
    from clipadapt.data.bundle import load_bundle

    methods = split_method_specs(args.methods) if args.methods else None
    if args.config:
        spec = load_sweep(args.config, args.set)
        # flags are relative to the working directory, YAML paths to the YAML file
        for key in ("bundle_dir", "data_root"):
            if getattr(args, key):
                setattr(spec, key, str(Path(getattr(args, key)).resolve()))
    elif args.profile in SCHEDULE_PROFILES:
        spec = paper_profile(args.bundle_dir, args.data_root, args.backbone or (), methods)
        if args.set:
            data = {k: v for k, v in spec.to_dict().items() if k != "base_dir"}
            data.update(parse_overrides(args.set))
            spec = sweep_from_dict(data, base_dir=spec.base_dir)
    else:
        spec = SweepSpec(bundle_dir=args.bundle_dir, data_root=args.data_root)
        if args.set:
            raise ConfigError("--set overrides keys of a YAML file; pass the file first")
    choice = {"train_set": args.train_set, "val_set": args.val_set, "eval_set": args.eval_set}
    names_file = getattr(args, "classnames", None)
    if names_file and not args.bundle:
        raise ConfigError(
            f"--classnames {names_file} names the classes of the --bundle files; pass --bundle "
            "(in a YAML file, give a dataset `classnames: FILE`)"
        )
    for path in args.bundle or []:
        name = load_bundle(path).name  # a named file that is missing is an error, not a skip
        names = str(Path(names_file).resolve()) if names_file else None
        spec.datasets.append(
            SweepDataset(name, bundle=str(Path(path).resolve()), classnames=names, **choice)
        )
    for item in args.dataset or []:
        folder = Path(item)
        name = folder.name if folder.exists() else item
        images = str(folder.resolve()) if folder.exists() else item
        spec.datasets.append(SweepDataset(name, images=images, **choice))
    for item in args.episodes or []:
        spec.episodes.append(EpisodesSpec(Path(item).stem, str(Path(item).resolve())))
    if methods:
        spec.methods = methods
    if args.shots:
        spec.shots = list(args.shots)
    if args.seeds:
        spec.seeds = list(args.seeds)
    if args.backbone:
        spec.backbones = list(args.backbone)
    if args.cache_dir:
        spec.cache_dir = str(Path(args.cache_dir).resolve())
    if not spec.methods:
        raise ConfigError("no methods: pass --methods, a YAML file with methods:, or --profile")
    spec.methods = profile_methods(spec.methods, getattr(args, "profile", None))
    if not (spec.datasets or spec.domain_generalization or spec.episodes):
        raise ConfigError(
            "nothing to run: pass a YAML file, --bundle, --dataset, --episodes or --profile paper"
        )
    return spec
