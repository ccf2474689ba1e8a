"""Regression anchors on the real CLIP ViT-B/32 ImageNet bundle (skipped when absent).

Protocol of the bundle's README: fit on the 1-shot draw, choose hyperparameters on the 2-shot
draw, score once on the 4-shot draw (three disjoint sets of ImageNet train images).
"""

from __future__ import annotations

import pytest

import clipadapt
from clipadapt.tasks.classification import SplitChoice
from conftest import real_data

pytestmark = pytest.mark.realdata

CHOICE = SplitChoice(train_set="train_1shot", val_set="train_2shot", eval_set="train_4shot")


@pytest.fixture(scope="module")
def imagenet():
    return clipadapt.load_bundle(real_data("clip_vitb32", "imagenet.safetensors"))


@pytest.fixture(scope="module")
def zero_shot(imagenet):
    return clipadapt.evaluate(clipadapt.create_method("zeroshot"), imagenet, choice=CHOICE)


def test_zero_shot_matches_the_readme(zero_shot):
    assert zero_shot.accuracy == pytest.approx(58.9, abs=0.3)
    assert zero_shot.n_eval == 4000


def test_tip_adapter_beats_zero_shot_with_val_only_search(imagenet, zero_shot):
    result = clipadapt.evaluate(clipadapt.create_method("tip_adapter"), imagenet, choice=CHOICE)
    assert result.val_set == "train_2shot"
    assert "validation search on train_2shot" in result.hyperparameters["source"]
    assert result.accuracy >= zero_shot.accuracy + 0.8


def test_bench_cli_on_the_real_bundle(imagenet, tmp_path):
    import json

    from clipadapt.cli import main

    out = tmp_path / "results.jsonl"
    code = main(
        [
            "bench",
            "--bundle",
            str(imagenet.path),
            "--methods",
            "zeroshot",
            "--train-set",
            "train_1shot",
            "--val-set",
            "train_2shot",
            "--eval-set",
            "train_4shot",
            "--seeds",
            "1",
            "--out",
            str(out),
            "--no-progress",
        ]
    )
    assert code == 0
    (line,) = [json.loads(x) for x in out.read_text().splitlines()]
    assert line["accuracy"] == pytest.approx(58.9, abs=0.3)
    assert line["eval_set"] == "train_4shot" and line["train_set"] == "train_1shot"
