"""Reasoning episodes: per-episode adaptation, accuracy and 95 % CI, file formats, sweeps."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

import numpy as np
import pytest
import torch

from clipadapt.bench.report import episodes_table
from clipadapt.bench.runner import load_sweep, run_sweep
from clipadapt.methods.base import create_method
from clipadapt.tasks.episodes import (
    EpisodeSet,
    encode_episodes,
    evaluate_episodes,
    load_episodes,
    mean_ci,
)
from test_bench import write_sweep

FLIPS = [0, 1, 2, 0, 1, 2]  # query labels flipped on purpose in each episode


def toy_episodes(flips=FLIPS, dim: int = 16, seed: int = 0) -> EpisodeSet:
    """Each episode: 3+3 support rows and 4+4 query rows around a positive and a negative
    centre; ``flips[e]`` query labels of episode e are inverted, so a method that separates the
    clusters scores exactly (8 - flips[e]) / 8."""
    gen = torch.Generator().manual_seed(seed)
    parts: dict[str, list[torch.Tensor]] = {k: [] for k in ("sf", "sl", "se", "qf", "ql", "qe")}
    for e, flip in enumerate(flips):
        centres = torch.nn.functional.normalize(torch.randn(2, dim, generator=gen), dim=1)
        for tag, per in (("s", 3), ("q", 4)):
            labels = torch.tensor([0, 1] * per)
            feats = centres[labels] + 0.05 * torch.randn(len(labels), dim, generator=gen)
            if tag == "q":
                labels = labels.clone()
                labels[:flip] = 1 - labels[:flip]
            parts[f"{tag}f"].append(feats)
            parts[f"{tag}l"].append(labels)
            parts[f"{tag}e"].append(torch.full((len(labels),), e))
    cat = {k: torch.cat(v) for k, v in parts.items()}
    return EpisodeSet(
        cat["sf"], cat["sl"], cat["se"], cat["qf"], cat["ql"], cat["qe"], name="toy_episodes"
    )


def test_episode_accuracy_and_confidence_interval() -> None:
    episodes = toy_episodes()
    result = evaluate_episodes(lambda: create_method("linear_probe", search=False), episodes)
    expected = [100.0 * (8 - f) / 8 for f in FLIPS]
    assert result["episode_accuracy"] == pytest.approx(expected)
    assert result["accuracy"] == pytest.approx(87.5)
    half = 1.96 * statistics.stdev(expected) / math.sqrt(len(expected))
    assert result["ci95"] == pytest.approx(half)
    assert result["n_episodes"] == 6 and result["method"] == "linear_probe"


def test_mean_ci_edge_cases() -> None:
    assert mean_ci([70.0]) == (70.0, 0.0)
    assert mean_ci([50.0, 100.0], z=1.0) == pytest.approx(
        (75.0, statistics.stdev([50, 100]) / 2**0.5)
    )
    with pytest.raises(ValueError):
        mean_ci([])


def test_text_methods_need_text_features() -> None:
    from clipadapt.exceptions import MissingTensorError

    with pytest.raises(MissingTensorError):
        evaluate_episodes(lambda: create_method("zeroshot"), toy_episodes())


def test_feature_file_round_trip(tmp_path: Path) -> None:
    episodes = toy_episodes()
    episodes.text_features = torch.nn.functional.normalize(torch.randn(2, 16), dim=1)
    loaded = load_episodes(episodes.save(tmp_path / "ep.safetensors"))
    assert loaded.num_episodes == 6 and loaded.name == "toy_episodes"
    for key in ("support_features", "query_labels", "query_episode", "text_features"):
        assert torch.equal(getattr(loaded, key), getattr(episodes, key))
    xs, ys = loaded.rows("support", 2)
    assert xs.shape == (6, 16) and ys.tolist() == [0, 1] * 3


def test_world_episode_json_is_read_and_encoded(tmp_path: Path) -> None:
    from PIL import Image

    from clipadapt.world.episodes import generate_episodes

    path = generate_episodes(tmp_path / "ep.json", n_episodes=2, n_support=2, n_query=1, seed=0)
    doc = json.loads(path.read_text())

    def mean_colour(paths: list[Path]) -> torch.Tensor:  # a stand-in image encoder
        rows = [
            np.asarray(Image.open(p).convert("RGB"), dtype=np.float32).mean((0, 1)) for p in paths
        ]
        return torch.tensor(np.stack(rows))

    seen: list[str] = []

    def texts(prompts: list[str]) -> torch.Tensor:
        seen.extend(prompts)
        return torch.eye(3)[:2] + 0.1

    episodes = encode_episodes(path, mean_colour, texts)
    assert episodes.num_episodes == 2 and episodes.support_features.shape == (8, 3)
    assert episodes.query_features.shape == (4, 3) and episodes.text_features.shape == (2, 3)
    labels = [item["label"] for ep in doc["episodes"] for item in ep["support"]]
    assert episodes.support_labels.tolist() == labels
    assert episodes.support_episode.tolist() == [0] * 4 + [1] * 4
    assert seen == ["a photo of something else.", "a photo of the concept."]


def test_episode_sweep_and_table(tmp_path: Path) -> None:
    toy_episodes().save(tmp_path / "toy.safetensors")
    write_sweep(
        tmp_path / "ep.yaml",
        datasets=[],
        methods=["linear_probe:search=false"],
        episodes=[{"name": "toy", "file": "toy.safetensors"}],
        seeds=[1],
    )
    out = tmp_path / "r.jsonl"
    records, resolved = run_sweep(load_sweep(tmp_path / "ep.yaml"), out, progress=False)
    (record,) = records
    assert record["task"] == "episodes" and record["accuracy"] == pytest.approx(87.5)
    assert record["n_episodes"] == 6 and record["ci95"] > 0
    assert run_sweep(load_sweep(tmp_path / "ep.yaml"), out, progress=False)[0] == []
    table = episodes_table(records)
    assert table is not None and f"87.5 ± {record['ci95']:.1f} (n=6)" in table
