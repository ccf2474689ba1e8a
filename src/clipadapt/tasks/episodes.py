"""Few-shot reasoning episodes (NODE-Adapter's Bongard-HOI-style visual-reasoning experiment).

An episode is a 2-way task: support images that show a hidden concept (label 1) and images that
do not (label 0, hard negatives), then query images to label. Each method is adapted afresh on
every episode's support set and scored by its query accuracy; the benchmark reports the mean
accuracy over episodes with a 95 % confidence interval.

Two file formats:

* **Image episodes** (JSON, written by ``clipadapt world episodes`` /
  :func:`clipadapt.world.episodes.generate_episodes`; ``format`` = "clipadapt-world-episodes")::

      {"format": "clipadapt-world-episodes", "version": 1, "image_root": "episodes_images",
       "episodes": [{"id": 0, "concept": {"type": ..., "description": ...},
                     "support": [{"image": "ep0000/s00.png", "label": 1}, ...],
                     "query":   [{"image": "ep0000/q00.png", "label": 0}, ...]}, ...]}

  Image paths are relative to ``image_root``, itself relative to the JSON file. Labels are 0/1.
  :func:`encode_episodes` turns it into feature episodes with a backbone. The same layout with
  ``format`` = "clipadapt-image-episodes" is written for benchmarks read from their release
  files (:mod:`clipadapt.data.bongard_hoi`); it may add ``"subsets": [names]`` (the benchmark's
  test splits, in table order), ``"subset_labels": {name: heading}`` and a ``"subset"`` name on
  every episode.

* **Feature episodes** (``.safetensors``, what the benchmark runs on; ``format`` metadata =
  "clipadapt-episode-features"): ``support_features`` (S, D), ``support_labels`` (S,),
  ``support_episode`` (S,) (episode index of each row), the same three ``query_*`` tensors, and
  ``text_features`` (2, D): the class prompts of label 0 and label 1. Rows of an episode need not
  be contiguous and episodes may have different sizes. Optional named subsets: ``episode_subset``
  (E,) (subset index of each episode) with the names in the ``subsets`` metadata (JSON list) and
  their table headings in ``subset_labels`` (JSON object).

Text: the concept is hidden at test time, so the default class prompts are generic (choice
(a) of the NODE-Adapter spec, "(inferred)"): :data:`GENERIC_PROMPTS`. Zero-shot is then at
chance by construction and every gain comes from the support set.

Confidence interval: ``z * std / sqrt(n)`` over per-episode accuracies with the sample standard
deviation and ``z`` = 1.96 (normal approximation, the few-shot literature's convention; a
parameter). With named subsets (Bongard-HOI's four test splits) each subset gets its mean and
interval, and the headline accuracy is the unweighted average of the subset means, as the
benchmark reports it, with the interval of that average (:func:`mean_ci_of_means`).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from clipadapt.data.bundle import save_bundle
from clipadapt.data.sets import TextFeatures, TrainSet, normalize_rows
from clipadapt.exceptions import BundleError, ConfigError
from clipadapt.methods.base import Adapter

TASK = "episodes"
FEATURE_FORMAT = "clipadapt-episode-features"
IMAGE_FORMAT = "clipadapt-world-episodes"
#: Image-episode files of benchmarks read from their release (same layout, optional subsets).
RELEASE_IMAGE_FORMAT = "clipadapt-image-episodes"
IMAGE_FORMATS = (IMAGE_FORMAT, RELEASE_IMAGE_FORMAT)
#: Class prompts (label 0, label 1) used when the concept is hidden.
GENERIC_PROMPTS = ("a photo of something else.", "a photo of the concept.")
CLASSNAMES = ("negative", "positive")


@dataclass
class EpisodeSet:
    """Feature episodes (see the module docstring for the tensor layout)."""

    support_features: Tensor
    support_labels: Tensor
    support_episode: Tensor
    query_features: Tensor
    query_labels: Tensor
    query_episode: Tensor
    text_features: Tensor | None = None
    name: str = "episodes"
    #: (E,) subset index of each episode, or None (one set)
    episode_subset: Tensor | None = None
    #: the subset names (``episode_subset`` indexes them), in table order
    subsets: tuple[str, ...] = ()
    #: table heading of each subset (default: its name)
    subset_labels: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for part in ("support", "query"):
            f, y, e = (getattr(self, f"{part}_{k}") for k in ("features", "labels", "episode"))
            if f.ndim != 2 or y.shape != (f.shape[0],) or e.shape != (f.shape[0],):
                raise BundleError(
                    f"{part}_features must be (N, D) with (N,) {part}_labels and {part}_episode"
                )
            if y.numel() and (int(y.min()) < 0 or int(y.max()) > 1):
                raise BundleError(f"{part}_labels must be 0 (negative) or 1 (positive)")
        if self.text_features is not None and self.text_features.shape != (
            2,
            self.support_features.shape[1],
        ):
            raise BundleError("text_features must be (2, D): label-0 and label-1 prompts")
        self.subsets = tuple(self.subsets)
        if self.episode_subset is not None:
            e = self.episode_subset
            if e.shape != (self.num_episodes,) or e.is_floating_point():
                raise BundleError(
                    f"episode_subset must be ({self.num_episodes},) integer subset indices, one "
                    "per episode"
                )
            if e.numel() and (int(e.min()) < 0 or int(e.max()) >= len(self.subsets)):
                raise BundleError(
                    f"episode_subset indexes {len(self.subsets)} subset name(s) "
                    f"({', '.join(self.subsets) or 'none given'}); values must be in "
                    f"[0, {len(self.subsets)})"
                )

    @property
    def num_episodes(self) -> int:
        return int(self.support_episode.max()) + 1 if self.support_episode.numel() else 0

    def rows(self, part: str, episode: int) -> tuple[Tensor, Tensor]:
        """(features (n, D), labels (n,)) of one episode's ``part`` ("support" or "query")."""
        mask = getattr(self, f"{part}_episode") == episode
        return getattr(self, f"{part}_features")[mask], getattr(self, f"{part}_labels")[mask]

    def save(self, path: str | Path) -> Path:
        """Write the feature-episode ``.safetensors`` file."""
        tensors = {
            f"{part}_{k}": getattr(self, f"{part}_{k}")
            for part in ("support", "query")
            for k in ("features", "labels", "episode")
        }
        if self.text_features is not None:
            tensors["text_features"] = self.text_features
        metadata = {"format": FEATURE_FORMAT, "dataset": self.name}
        if self.episode_subset is not None:
            tensors["episode_subset"] = self.episode_subset.long()
            metadata["subsets"] = json.dumps(list(self.subsets))
            metadata["subset_labels"] = json.dumps(self.subset_labels)
        return save_bundle(path, tensors, metadata)

    def subset_of(self, episode: int) -> str | None:
        """The subset name of ``episode`` (None without subsets)."""
        if self.episode_subset is None:
            return None
        return self.subsets[int(self.episode_subset[episode])]


def load_episodes(path: str | Path) -> EpisodeSet:
    """Read a feature-episode file.

    Raises:
        BundleError: missing file, wrong format or missing tensors (named).
    """
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise BundleError(f"{path}: episode file not found (make one with encode_episodes)")
    with safe_open(str(path), framework="pt") as handle:
        meta = handle.metadata() or {}
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
    if meta.get("format") != FEATURE_FORMAT:
        raise BundleError(f"{path}: not a feature-episode file (format {meta.get('format')!r})")
    need = [f"{p}_{k}" for p in ("support", "query") for k in ("features", "labels", "episode")]
    missing = [k for k in need if k not in tensors]
    if missing:
        raise BundleError(f"{path}: missing tensor(s) {', '.join(missing)}")
    subsets: tuple[str, ...] = ()
    labels: dict[str, str] = {}
    if "episode_subset" in tensors:
        try:
            subsets = tuple(json.loads(meta.get("subsets", "[]")))
            labels = dict(json.loads(meta.get("subset_labels", "{}")))
        except (json.JSONDecodeError, TypeError, ValueError):
            raise BundleError(
                f"{path}: metadata `subsets`/`subset_labels` is not valid JSON"
            ) from None
    try:
        return EpisodeSet(
            **{k: tensors[k] for k in need},
            text_features=tensors.get("text_features"),
            name=meta.get("dataset", path.stem),
            episode_subset=tensors.get("episode_subset"),
            subsets=subsets,
            subset_labels=labels,
        )
    except BundleError as error:
        raise BundleError(f"{path}: {error}") from None


def read_episode_doc(path: str | Path) -> dict[str, Any]:
    """The parsed image-episode JSON file (either format), its subsets checked.

    Raises:
        ConfigError: unreadable file, another format, no ``episodes`` list, or an episode whose
            ``subset`` is not one of ``subsets``.
    """
    path = Path(path)
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ConfigError(f"{path}: cannot read the episode file ({error})") from None
    if not isinstance(doc, dict) or doc.get("format") not in IMAGE_FORMATS:
        got = doc.get("format") if isinstance(doc, dict) else type(doc).__name__
        raise ConfigError(f"{path}: expected format {' or '.join(IMAGE_FORMATS)}, got {got!r}")
    if not isinstance(doc.get("episodes"), list):
        raise ConfigError(f"{path}: no `episodes` list")
    subsets = doc.get("subsets")
    if subsets is not None:
        if not isinstance(subsets, list) or not all(isinstance(x, str) for x in subsets):
            raise ConfigError(f"{path}: `subsets` must be a list of names")
        for i, episode in enumerate(doc["episodes"]):
            if not isinstance(episode, dict) or episode.get("subset") not in subsets:
                got = episode.get("subset") if isinstance(episode, dict) else episode
                raise ConfigError(
                    f"{path}: episode {i} has subset {got!r}, not one of {', '.join(subsets)}"
                )
    return doc


def read_episode_json(path: str | Path) -> tuple[list[dict[str, Any]], Path]:
    """The episodes of an image-episode JSON file and the folder their images are under."""
    doc = read_episode_doc(path)
    return doc["episodes"], Path(path).parent / doc.get("image_root", ".")


def encode_episodes(
    path: str | Path,
    encode_images: Callable[[list[Path]], Tensor],
    encode_texts: Callable[[list[str]], Tensor] | None = None,
    prompts: tuple[str, str] = GENERIC_PROMPTS,
) -> EpisodeSet:
    """Encode an image-episode JSON file into feature episodes.

    Args:
        path: the JSON file.
        encode_images: maps a list of image paths to (n, D) features.
        encode_texts: maps prompts to (n, D) features; None leaves ``text_features`` out
            (then only image-only methods can run).
        prompts: the class prompts of label 0 and label 1.
    """
    doc = read_episode_doc(path)
    episodes, root = doc["episodes"], Path(path).parent / doc.get("image_root", ".")
    subsets = tuple(doc.get("subsets") or ())
    out: dict[str, list] = {k: [] for k in ("sp", "sl", "se", "qp", "ql", "qe")}
    for e, episode in enumerate(episodes):
        for part, tag in (("support", "s"), ("query", "q")):
            for item in episode[part]:
                out[f"{tag}p"].append(root / item["image"])
                out[f"{tag}l"].append(int(item["label"]))
                out[f"{tag}e"].append(e)
    text = None
    if encode_texts is not None:
        text = normalize_rows(encode_texts(list(prompts)).float())
    return EpisodeSet(
        support_features=encode_images(out["sp"]).float(),
        support_labels=torch.tensor(out["sl"], dtype=torch.long),
        support_episode=torch.tensor(out["se"], dtype=torch.long),
        query_features=encode_images(out["qp"]).float(),
        query_labels=torch.tensor(out["ql"], dtype=torch.long),
        query_episode=torch.tensor(out["qe"], dtype=torch.long),
        text_features=text,
        name=Path(path).stem,
        episode_subset=(
            torch.tensor([subsets.index(e["subset"]) for e in episodes], dtype=torch.long)
            if subsets
            else None
        ),
        subsets=subsets,
        subset_labels=dict(doc.get("subset_labels") or {}),
    )


def mean_ci(values: Tensor | list[float], z: float = 1.96) -> tuple[float, float]:
    """(mean, half-width of the confidence interval) of per-episode accuracies.

    The half-width is ``z * s / sqrt(n)`` with the sample standard deviation ``s`` (0 for n=1).
    """
    v = torch.as_tensor(values, dtype=torch.float64)
    n = v.numel()
    if n == 0:
        raise ValueError("no episodes")
    std = float(v.std(unbiased=True)) if n > 1 else 0.0
    return float(v.mean()), z * std / math.sqrt(n)


def mean_ci_of_means(groups: list[Tensor | list[float]], z: float = 1.96) -> tuple[float, float]:
    """(unweighted mean of the group means, half-width of its confidence interval).

    The groups are independent samples (Bongard-HOI's four test splits); the variance of the
    average of ``k`` group means is ``sum(s_i^2 / n_i) / k^2`` with each group's sample
    variance ``s_i^2`` (0 for a group of one), so the half-width is
    ``z * sqrt(sum(s_i^2 / n_i)) / k``.

    Raises:
        ValueError: no groups, or an empty group.
    """
    if not groups:
        raise ValueError("no groups")
    means, variance = [], 0.0
    for group in groups:
        v = torch.as_tensor(group, dtype=torch.float64)
        if v.numel() == 0:
            raise ValueError("an empty group")
        means.append(float(v.mean()))
        if v.numel() > 1:
            variance += float(v.var(unbiased=True)) / v.numel()
    return sum(means) / len(means), z * math.sqrt(variance) / len(means)


def subset_summary(episodes: EpisodeSet, accuracies: list[float], z: float = 1.96) -> list[dict]:
    """Per-subset ``{"subset", "label", "accuracy", "ci95", "n_episodes"}``, in table order.

    Subsets without episodes are left out.
    """
    if episodes.episode_subset is None:
        return []
    acc = torch.as_tensor(accuracies, dtype=torch.float64)
    out = []
    for s, name in enumerate(episodes.subsets):
        chosen = acc[episodes.episode_subset == s]
        if not chosen.numel():
            continue
        mean, half = mean_ci(chosen, z=z)
        out.append(
            {
                "subset": name,
                "label": episodes.subset_labels.get(name, name),
                "accuracy": mean,
                "ci95": half,
                "n_episodes": int(chosen.numel()),
            }
        )
    return out


def episode_table_cells(record: dict[str, Any]) -> list[tuple[str, float, float, int]]:
    """The cells a report shows for one episode record: ``(heading, accuracy, ci95, n)``.

    One cell per subset and then ``"average"`` for a record with subsets (Bongard-HOI: the four
    test splits and their average, as the paper's table); otherwise the record's single
    accuracy, headed by its dataset name.
    """
    subsets = record.get("subsets") or []
    if not subsets:
        return [
            (
                str(record.get("dataset", "")),
                float(record["accuracy"]),
                float(record.get("ci95", 0.0)),
                int(record.get("n_episodes", 0)),
            )
        ]
    cells = [
        (s.get("label", s["subset"]), float(s["accuracy"]), float(s["ci95"]), int(s["n_episodes"]))
        for s in subsets
    ]
    cells.append(
        (
            "average",
            float(record["accuracy"]),
            float(record.get("ci95", 0.0)),
            int(record.get("n_episodes", 0)),
        )
    )
    return cells


def evaluate_episodes(
    make_method: Callable[[], Adapter],
    episodes: EpisodeSet,
    seed: int = 1,
    z: float = 1.96,
    device: str | torch.device = "cpu",
) -> dict[str, Any]:
    """Adapt a fresh method on every episode's support set and score its queries.

    Args:
        make_method: returns a new unfitted adapter (called once per episode).
        episodes: the feature episodes.
        seed: the method seed (the same for every episode).
        z: the normal quantile of the interval (1.96 for 95 %).
        device: where to fit and predict.

    Returns:
        ``{"task", "dataset", "accuracy" (mean %), "ci95" (half-width, points), "n_episodes",
        "episode_accuracy" (list), "fit_seconds" (total), "trainable_params" (last episode)}``.
        With named subsets also ``"subsets"`` (:func:`subset_summary`, one entry per subset) and
        ``"accuracy_pooled"`` / ``"ci95_pooled"`` (over all episodes); ``accuracy`` and ``ci95``
        are then the unweighted average of the subset means and its interval
        (:func:`mean_ci_of_means`), the benchmark's headline number.

    Raises:
        MissingTensorError: the method needs text and the file has no ``text_features``.
    """
    text = None
    if episodes.text_features is not None:
        text = TextFeatures(episodes.text_features.float(), list(CLASSNAMES)).to(device)
    accuracies = []
    fit_seconds = 0.0
    method: Adapter | None = None
    for e in range(episodes.num_episodes):
        method = make_method()
        if "seed" in method.get_params():
            method.set_params(seed=seed)
        xs, ys = episodes.rows("support", e)
        xq, yq = episodes.rows("query", e)
        train = TrainSet(xs, ys, None, f"episode{e}_support").to(device)
        started = time.perf_counter()
        if text is None:
            method.fit(train, None, None, num_classes=2)
        else:
            method.fit(train, text, None)
        fit_seconds += time.perf_counter() - started
        accuracies.append(method.score(xq.to(device), yq.to(device)))
    mean, half = mean_ci(accuracies, z=z)
    extra: dict[str, Any] = {}
    subsets = subset_summary(episodes, accuracies, z=z)
    if subsets:
        extra = {"subsets": subsets, "accuracy_pooled": mean, "ci95_pooled": half}
        acc = torch.as_tensor(accuracies, dtype=torch.float64)
        groups = [
            acc[episodes.episode_subset == episodes.subsets.index(s["subset"])] for s in subsets
        ]
        mean, half = mean_ci_of_means(groups, z=z)
    return {
        **extra,
        "task": TASK,
        "dataset": episodes.name,
        "method": method.card.name if method is not None else "",
        "accuracy": mean,
        "ci95": half,
        "n_episodes": len(accuracies),
        "episode_accuracy": accuracies,
        "fit_seconds": fit_seconds,
        "trainable_params": method.num_trainable_params() if method is not None else 0,
    }
