"""The unit of work of every sweep: a typed :class:`Cell`, built in one place.

A cell is one method spec fitted once (one draw of ``shots`` with ``seed``) and scored on one or
more datasets. It is a pure description: picklable, sent as is to a process pool or a Ray task,
and everything a worker needs is in it (bundle paths, the backbone record to rebuild a text
tower). Its ``run_id`` (and, for a cell that scores several datasets, ``outputs``) is the
resume key of the results store (:func:`clipadapt.bench.results.run_id`).

Tasks: ``classification`` (fit and score on one bundle), ``domain_generalization`` (fit on the
source, score on the source and each target) and ``episodes`` (adapt afresh on every episode).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple

from clipadapt.bench.results import RUN_KEY_VERSION, legacy_run_id, run_id
from clipadapt.methods.base import create_method, get_method_class, parse_method_spec
from clipadapt.tasks.classification import SplitChoice

if TYPE_CHECKING:
    from clipadapt.data.bundle import FeatureBundle

CLASSIFICATION = "classification"
DOMAIN_GENERALIZATION = "domain_generalization"
EPISODES = "episodes"


class MethodChoice(NamedTuple):
    """A method spec as typed (``tip_adapter:search_steps_beta=20``), its registry name, its
    options, and every hyperparameter it resolves to (defaults and preset filled in)."""

    spec: str
    name: str
    params: dict[str, Any]
    resolved: dict[str, Any] = {}


def checked_method(spec: str) -> MethodChoice:
    """Parse a method spec and validate its options (before any work).

    Raises:
        UnknownMethodError, ConfigError: unknown method or bad options.
    """
    name, params = parse_method_spec(spec)
    name = get_method_class(name).card.name
    method = create_method(name, **params)
    resolved = method.get_params()
    if params.get("preset") is not None:
        resolved["preset"] = params["preset"]
    return MethodChoice(spec, name, params, json_safe(resolved))


def json_safe(value: Any) -> Any:
    """``value`` as JSON would read it back (tuples become lists), so a cell's key is the same
    before and after a record's round trip through the results file."""
    import json

    return json.loads(json.dumps(value, default=str))


@dataclass(frozen=True)
class Cell:
    """One method spec × shots × seed on a dataset (or a DG source and its targets, or an
    episode file).

    Attributes:
        task: ``classification``, ``domain_generalization`` or ``episodes``.
        dataset: the dataset (DG: the source; episodes: the episode set's name).
        backbone: the bundle's backbone name (``episodes`` for episode cells).
        method, method_spec, params: the registry name, the spec as typed, its options.
        shots: K (None: the train group is used as is).
        seed: draw and method seed.
        train_set, val_set, eval_set: the bundle groups chosen (None: the defaults).
        bundle_fingerprint: content hash of the (source) bundle.
        dataset_fingerprint: the image files' fingerprint the bundle records (None for
            bundles made elsewhere).
        method_params: every hyperparameter the spec resolves to (defaults and preset).
        target_fingerprints: DG: each target bundle's content hash, in ``targets`` order.
        episodes_fingerprint: content hash of the feature-episode file.
        bundles: bundle files (or in-memory keys) to load, the (source) bundle first.
        targets, target_eval_set: DG targets (dataset names) and the group scored on them.
        episodes_file: the feature-episode file of an episode cell.
        backbone_record: the bundle's backbone record, from which a worker builds the text
            tower for methods that need it (:func:`clipadapt.features.pipeline.text_tower_for`).
        run_id: the resume key of the cell's (first) run.
        outputs: the run ids the cell produces (DG: source first, then each target).
    """

    task: str
    dataset: str
    backbone: str
    method: str
    method_spec: str
    params: dict[str, Any]
    shots: int | None
    seed: int
    train_set: str | None = None
    val_set: str | None = None
    eval_set: str | None = None
    bundle_fingerprint: str | None = None
    bundles: tuple[str, ...] = ()
    targets: tuple[str, ...] = ()
    target_eval_set: str | None = None
    episodes_file: str | None = None
    dataset_fingerprint: str | None = None
    method_params: dict[str, Any] = field(default_factory=dict)
    target_fingerprints: tuple[str, ...] = ()
    episodes_fingerprint: str | None = None
    backbone_record: dict[str, Any] | None = field(default=None, repr=False, compare=False)
    run_id: str = field(init=False)
    outputs: tuple[str, ...] = field(init=False)
    legacy_outputs: tuple[str, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        key = self.describe()
        if self.task == DOMAIN_GENERALIZATION:
            scored = zip(
                (self.dataset, *self.targets),
                (self.bundle_fingerprint, *self.target_fingerprints),
                strict=False,
            )
            outputs = tuple(
                run_id({**key, "dataset": name, "source": self.dataset, "scored_on": fp})
                for name, fp in scored
            )
            legacy = tuple(
                legacy_run_id({**key, "dataset": name, "source": self.dataset})
                for name in (self.dataset, *self.targets)
            )
        else:
            outputs = (run_id(key),)
            legacy = (legacy_run_id(key),)
        object.__setattr__(self, "outputs", outputs)
        object.__setattr__(self, "run_id", outputs[0])
        object.__setattr__(self, "legacy_outputs", legacy)

    @property
    def choice(self) -> SplitChoice:
        return SplitChoice(self.train_set, self.val_set, self.eval_set)

    @property
    def label(self) -> str:
        """``task/dataset/method/Kshot/seedS``: the cell's name in logs and TensorBoard."""
        return f"{self.task}/{self.dataset}/{self.method}/{self.shots}shot/seed{self.seed}"

    def describe(self) -> dict[str, Any]:
        """The fields a result record carries (the task's own fields only)."""
        out: dict[str, Any] = {
            "task": self.task,
            "dataset": self.dataset,
            "backbone": self.backbone,
            "method": self.method,
            "method_spec": self.method_spec,
            "params": self.params,
            "shots": self.shots,
            "seed": self.seed,
            "train_set": self.train_set,
            "val_set": self.val_set,
            "eval_set": self.eval_set,
        }
        out["method_params"] = self.method_params
        if self.task != EPISODES:
            out["bundle_fingerprint"] = self.bundle_fingerprint
            out["dataset_fingerprint"] = self.dataset_fingerprint
        if self.task == DOMAIN_GENERALIZATION:
            out["targets"] = list(self.targets)
            out["target_eval_set"] = self.target_eval_set
            out["target_fingerprints"] = list(self.target_fingerprints)
        if self.task == EPISODES:
            out["episodes_file"] = self.episodes_file
            out["episodes_fingerprint"] = self.episodes_fingerprint
        if "run_id" in vars(self):
            out["run_id"] = self.run_id
            out["key_version"] = RUN_KEY_VERSION
        return out


@dataclass(frozen=True)
class BundleSource:
    """A dataset of a sweep, resolved: the bundle, where it is, and which groups to use."""

    name: str
    key: str
    bundle: FeatureBundle
    choice: SplitChoice = SplitChoice()
    fingerprint: str = ""
    backbone_record: dict[str, Any] | None = None
    dataset_fingerprint: str | None = None

    @classmethod
    def of(
        cls,
        bundle: FeatureBundle,
        *,
        name: str | None = None,
        key: str | None = None,
        choice: SplitChoice | None = None,
    ) -> BundleSource:
        """Describe ``bundle`` (fingerprint and backbone record read once, not per cell).

        ``key`` is what a worker loads: the bundle file by default; an in-memory bundle gets a
        ``memory:<fingerprint>`` key and must be handed to the executor.
        """
        from clipadapt.features.pipeline import bundle_backbone_record

        fingerprint = bundle.fingerprint()
        if key is None:
            key = str(bundle.path) if bundle.path is not None else f"memory:{fingerprint}"
        return cls(
            name or bundle.name,
            key,
            bundle,
            choice or SplitChoice(),
            fingerprint,
            bundle_backbone_record(bundle),
            bundle.metadata.get("dataset_fingerprint"),
        )


def build_cell(
    task: str,
    method: MethodChoice,
    shots: int | None,
    seed: int,
    *,
    source: BundleSource | None = None,
    targets: Sequence[BundleSource] = (),
    target_eval_set: str = "test",
    episodes: tuple[str, str] | None = None,
) -> Cell:
    """The one way cells are made.

    Args:
        task: ``classification`` and ``domain_generalization`` take ``source`` (DG also
            ``targets`` and ``target_eval_set``); ``episodes`` takes ``episodes`` =
            ``(name, feature-episode file)``.
        method: from :func:`checked_method`.
        shots, seed: the draw.
    """
    common = {
        "task": task,
        "method": method.name,
        "method_spec": method.spec,
        "params": method.params,
        "method_params": method.resolved,
        "shots": shots,
        "seed": seed,
    }
    if task == EPISODES:
        if episodes is None:
            raise ValueError("an episodes cell needs episodes=(name, file)")
        name, file = episodes
        return Cell(
            dataset=name,
            backbone="episodes",
            episodes_file=file,
            episodes_fingerprint=episodes_fingerprint(file),
            **common,
        )
    if source is None:
        raise ValueError(f"a {task} cell needs its source bundle")
    dg = task == DOMAIN_GENERALIZATION
    return Cell(
        dataset=source.name,
        backbone=source.bundle.backbone,
        train_set=source.choice.train_set,
        val_set=source.choice.val_set,
        eval_set=source.choice.eval_set,
        bundle_fingerprint=source.fingerprint,
        bundles=(source.key, *(t.key for t in targets)),
        targets=tuple(t.name for t in targets),
        target_eval_set=target_eval_set if dg else None,
        backbone_record=source.backbone_record,
        dataset_fingerprint=source.dataset_fingerprint,
        target_fingerprints=tuple(t.fingerprint for t in targets),
        **common,
    )


def episodes_fingerprint(path: str) -> str | None:
    """The first 16 hex digits of a feature-episode file's sha256 (its metadata holds no
    paths, so this is a content hash); None when the file is not there."""
    from pathlib import Path

    from clipadapt._utils import sha256_file

    return sha256_file(path)[:16] if Path(path).is_file() else None


@dataclass
class Grid:
    """Methods × shots × seeds on one bundle (the demo's and :func:`run_grid`'s sweep)."""

    methods: Sequence[str]
    shots: Sequence[int | None]
    seeds: Sequence[int] = (1,)
    choice: SplitChoice = field(default_factory=SplitChoice)

    def cells(self, bundle: FeatureBundle | BundleSource) -> list[Cell]:
        """One classification cell per method × shots × seed (options validated first)."""
        source = bundle if isinstance(bundle, BundleSource) else None
        if source is None:
            source = BundleSource.of(bundle, choice=self.choice)  # type: ignore[arg-type]
        methods = [checked_method(spec) for spec in self.methods]
        return [
            build_cell(CLASSIFICATION, method, shots, seed, source=source)
            for method in methods
            for shots in self.shots
            for seed in self.seeds
        ]
