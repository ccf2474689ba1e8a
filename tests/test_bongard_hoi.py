"""Bongard-HOI: the release's per-split episode files, encoded with the world backbone, scored
per test split and on average with 95 % intervals (``tasks.episodes``), and run by ``bench``."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

import pytest
import torch

from clipadapt.data.bongard_hoi import (
    SPLIT_LABELS,
    TEST_SPLITS,
    annotation_path,
    bongard_hoi_episode_file,
    read_bongard_hoi,
)
from clipadapt.exceptions import ConfigError, DatasetError
from clipadapt.methods.base import create_method
from clipadapt.tasks.episodes import (
    EpisodeSet,
    encode_episodes,
    episode_table_cells,
    evaluate_episodes,
    load_episodes,
    mean_ci,
    mean_ci_of_means,
    read_episode_doc,
)
from world_images import world_image

# (action, object) of each problem per split, drawn as (colour, shape): positives show the
# colour on the shape, the hard negatives the same shape in another colour ("same object,
# another action")
PROBLEMS = {
    "seen_obj_seen_act": [("ride", "bicycle", "red", "circle", "blue")],
    "seen_obj_unseen_act": [
        ("hold", "cup", "green", "square", "purple"),
        ("wash", "car", "yellow", "triangle", "cyan"),
    ],
    "unseen_obj_seen_act": [("ride", "horse", "orange", "star", "green")],
    "unseen_obj_unseen_act": [
        ("feed", "giraffe", "blue", "hexagon", "red"),
        ("inspect", "kite", "pink", "diamond", "yellow"),
        ("repair", "umbrella", "purple", "heart", "orange"),
    ],
}
IMAGE_DIRS = ("hico_20160224_det/images/test2015", "openimages/images", "pic/image/val")


def _entry(rel: str) -> dict:
    # the release's image objects also carry boxes, unused for whole-image CLIP evaluation
    return {
        "im_path": f"./{rel}",
        "crop_bbox": [3, 4, 60, 62],
        "sub_bbox": [3, 4, 30, 62],
        "obj_bbox": [20, 10, 60, 50],
    }


def make_release(root: Path) -> tuple[Path, Path]:
    """A miniature Bongard-HOI release: hake/images/... and bongard_hoi_release/*.json."""
    images = root / "hake" / "images"
    annotations = root / "bongard_hoi_release"
    annotations.mkdir(parents=True)
    count = 0
    for split, problems in PROBLEMS.items():
        doc = []
        for action, obj, colour, shape, other in problems:
            sides = []
            for side_colour in (colour, other):
                side = []
                for _ in range(7):  # six support images, then the query
                    count += 1
                    rel = f"{IMAGE_DIRS[count % 3]}/{count:08d}.jpg"
                    world_image(images / rel, shape, side_colour, count)
                    side.append(_entry(rel))
                sides.append(side)
            doc.append([sides[0], sides[1], f"{action}++{obj}"])
        annotation_path(annotations, "test", split).write_text(json.dumps(doc))
    return annotations, images


@pytest.fixture(scope="module")
def release(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return make_release(tmp_path_factory.mktemp("bongard"))


@pytest.fixture(scope="module")
def world_images_encoder():
    from clipadapt.encoders.clip import ClipEncoder, resolve_backbone
    from clipadapt.features.transforms import CleanView, load_rgb

    encoder = ClipEncoder(resolve_backbone("world"), device="cpu")
    view = CleanView(encoder.image_size, encoder.mean, encoder.std)

    def images(paths: list[Path]) -> torch.Tensor:
        batch = torch.stack([view(load_rgb(p)) for p in paths])
        return encoder.encode_images(batch, normalize=True)

    def texts(prompts: list[str]) -> torch.Tensor:
        return encoder.encode_text(prompts, normalize=True)

    return images, texts


# ------------------------------------------------------------------------------- reading


def test_problems_become_two_way_six_shot_episodes(release) -> None:
    annotations, images = release
    episodes = read_bongard_hoi(annotations, images)
    assert [e["subset"] for e in episodes] == [s for s in TEST_SPLITS for _ in PROBLEMS[s]]
    first = episodes[0]
    assert first["concept"] == {
        "type": "hoi",
        "rule": "ride++bicycle",
        "description": "ride bicycle",
    }
    assert [item["label"] for item in first["support"]] == [1] * 6 + [0] * 6
    assert [item["label"] for item in first["query"]] == [1, 0]
    # "./" dropped: paths relative to the image folder; the query is the last of each side
    problem = json.loads(annotation_path(annotations, "test", TEST_SPLITS[0]).read_text())[0]
    assert first["query"][0]["image"] == problem[0][6]["im_path"][2:]
    assert first["support"][6]["image"] == problem[1][0]["im_path"][2:]
    assert all((images / item["image"]).is_file() for item in first["support"])
    only = read_bongard_hoi(annotations, images, subsets=["unseen_obj_unseen_act"])
    assert len(only) == 3 and {e["subset"] for e in only} == {"unseen_obj_unseen_act"}


def test_release_errors_name_file_and_fix(release, tmp_path: Path) -> None:
    annotations, images = release
    with pytest.raises(DatasetError, match="unknown Bongard-HOI test split"):
        read_bongard_hoi(annotations, images, subsets=["seen_obj"])
    with pytest.raises(DatasetError, match="bongard_hoi_val_seen_obj_seen_act.json does not exist"):
        read_bongard_hoi(annotations, images, split="val")
    bad = tmp_path / "bad"
    bad.mkdir()
    doc = json.loads(annotation_path(annotations, "test", TEST_SPLITS[0]).read_text())
    annotation_path(bad, "test", TEST_SPLITS[0]).write_text(json.dumps([doc[0], doc[0][:2]]))
    with pytest.raises(
        DatasetError, match=r"seen_obj_seen_act.json, problem 1: expected \[positives"
    ):
        read_bongard_hoi(bad, images, subsets=TEST_SPLITS[:1])
    with pytest.raises(DatasetError, match="98 of 98 Bongard-HOI images are missing"):
        read_bongard_hoi(annotations, tmp_path)


def test_episode_file_round_trip(release, tmp_path: Path) -> None:
    annotations, images = release
    out = bongard_hoi_episode_file(annotations, images, tmp_path / "sub" / "bongard_hoi.json")
    doc = read_episode_doc(out)
    assert doc["format"] == "clipadapt-image-episodes" and doc["subsets"] == list(TEST_SPLITS)
    assert doc["subset_labels"] == SPLIT_LABELS
    assert not Path(doc["image_root"]).is_absolute()  # the pair can move together
    assert (out.parent / doc["image_root"] / doc["episodes"][0]["query"][0]["image"]).is_file()
    doc["episodes"][0]["subset"] = "seen_act"
    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps(doc))
    with pytest.raises(ConfigError, match="episode 0 has subset 'seen_act'"):
        read_episode_doc(broken)


# ------------------------------------------------------------------------------- scoring


def test_mean_ci_of_means_hand_computed() -> None:
    # means 75 and 100; only the first group varies: s^2 = 1250, n = 2
    mean, half = mean_ci_of_means([[100.0, 50.0], [100.0]])
    assert mean == pytest.approx(87.5)
    assert half == pytest.approx(1.96 * math.sqrt(1250 / 2) / 2)  # = 24.5
    assert mean_ci_of_means([[50.0, 100.0, 100.0]]) == pytest.approx(mean_ci([50.0, 100.0, 100.0]))
    with pytest.raises(ValueError):
        mean_ci_of_means([[1.0], []])


def test_encoded_episodes_score_per_split_and_average(
    release, world_images_encoder, tmp_path
) -> None:
    annotations, images = release
    encode_images, encode_texts = world_images_encoder
    path = bongard_hoi_episode_file(annotations, images, tmp_path / "bongard_hoi.json")
    episodes = encode_episodes(path, encode_images, encode_texts)
    assert episodes.num_episodes == 7 and episodes.subsets == TEST_SPLITS
    assert episodes.episode_subset.tolist() == [0, 1, 1, 2, 3, 3, 3]
    assert episodes.support_features.shape[0] == 7 * 12 and episodes.query_features.shape[0] == 14
    assert episodes.subset_of(4) == "unseen_obj_unseen_act"
    loaded = load_episodes(episodes.save(tmp_path / "bongard_hoi.safetensors"))
    assert loaded.subsets == TEST_SPLITS and torch.equal(
        loaded.episode_subset, episodes.episode_subset
    )
    assert loaded.subset_labels == SPLIT_LABELS

    result = evaluate_episodes(lambda: create_method("linear_probe", search=False), loaded)
    per_episode = result["episode_accuracy"]
    assert len(per_episode) == 7 and set(per_episode) <= {0.0, 50.0, 100.0}
    assert [s["subset"] for s in result["subsets"]] == list(TEST_SPLITS)
    assert [s["n_episodes"] for s in result["subsets"]] == [1, 2, 1, 3]
    groups = [[per_episode[0]], per_episode[1:3], [per_episode[3]], per_episode[4:]]
    for summary, group in zip(result["subsets"], groups, strict=True):
        assert summary["accuracy"] == pytest.approx(statistics.fmean(group))
        assert summary["ci95"] == pytest.approx(mean_ci(group)[1])
        assert summary["label"] == SPLIT_LABELS[summary["subset"]]
    # the headline is the unweighted average of the four split accuracies, as in the paper
    assert result["accuracy"] == pytest.approx(
        statistics.fmean(statistics.fmean(g) for g in groups)
    )
    assert result["ci95"] == pytest.approx(mean_ci_of_means(groups)[1])
    assert result["accuracy_pooled"] == pytest.approx(statistics.fmean(per_episode))
    assert result["accuracy_pooled"] >= 75  # the support set teaches the colour; chance is 50
    cells = episode_table_cells(result)
    assert [c[0] for c in cells] == [*SPLIT_LABELS.values(), "average"]
    assert cells[-1][1:] == (result["accuracy"], result["ci95"], 7)


def test_episode_set_rejects_bad_subsets() -> None:
    from clipadapt.exceptions import BundleError

    x = torch.randn(4, 3)
    y = torch.tensor([0, 1, 0, 1])
    e = torch.tensor([0, 0, 1, 1])
    with pytest.raises(BundleError, match="values must be in"):
        EpisodeSet(x, y, e, x, y, e, episode_subset=torch.tensor([0, 2]), subsets=("a", "b"))
    with pytest.raises(BundleError, match=r"must be \(2,\)"):
        EpisodeSet(x, y, e, x, y, e, episode_subset=torch.tensor([0]), subsets=("a",))
    plain = EpisodeSet(x, y, e, x, y, e)
    assert plain.subset_of(0) is None


def test_bench_runs_the_bongard_hoi_file(release, tmp_path: Path) -> None:
    from clipadapt.bench.report import episodes_table
    from clipadapt.bench.runner import load_sweep, run_sweep
    from test_bench import write_sweep

    annotations, images = release
    bongard_hoi_episode_file(annotations, images, tmp_path / "bongard_hoi.json")
    write_sweep(
        tmp_path / "hoi.yaml",
        datasets=[],
        backbones=["world"],
        methods=["linear_probe:search=false"],
        episodes=[{"name": "bongard_hoi", "file": "bongard_hoi.json"}],
        seeds=[1],
    )
    records, _ = run_sweep(load_sweep(tmp_path / "hoi.yaml"), tmp_path / "r.jsonl", progress=False)
    (record,) = records
    assert record["status"] == "ok" and record["dataset"] == "bongard_hoi"
    assert [s["subset"] for s in record["subsets"]] == list(TEST_SPLITS)
    assert record["n_episodes"] == 7
    table = episodes_table(records)
    assert table is not None and f"{record['accuracy']:.1f} ± {record['ci95']:.1f} (n=7)" in table
