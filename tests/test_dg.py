"""Domain generalisation: class-subset mapping, subset accuracy, DG sweeps on toy bundles."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from clipadapt.bench.report import dg_table
from clipadapt.bench.runner import load_sweep, run_sweep
from clipadapt.data.bundle import load_bundle, save_bundle
from clipadapt.exceptions import ConfigError
from clipadapt.methods.base import create_method
from clipadapt.metrics import expected_calibration_error
from clipadapt.tasks.domain_generalization import (
    class_subset,
    evaluate_dg,
    subset_accuracy,
    subset_scores,
)
from test_bench import toy_bundle, write_sweep

NAMES = ["tench", "goldfish", "great white shark", "tiger shark", "hammerhead", "electric ray"]


@pytest.fixture
def bundles(tmp_path: Path) -> dict[str, Path]:
    gen = torch.Generator().manual_seed(3)
    centres = torch.nn.functional.normalize(torch.randn(6, 16, generator=gen), dim=1)
    src = toy_bundle(
        tmp_path / "source.safetensors",
        classes=6,
        centres=centres,
        classnames=NAMES,
        name="source",
        seed=1,
    )
    # full-class target (style shift: more noise), and a 3-class subset in another order
    full = toy_bundle(
        tmp_path / "shifted.safetensors",
        classes=6,
        centres=centres,
        classnames=NAMES,
        name="shifted",
        seed=2,
        spread=0.5,
        groups=("test",),
        with_text=False,
    )
    keep = [4, 0, 2]
    subset = toy_bundle(
        tmp_path / "subset.safetensors",
        classes=3,
        centres=centres[keep],
        classnames=["Hammerhead", "tench", "great_white_shark"],
        name="subset",
        seed=3,
        groups=("test",),
        with_text=False,
    )
    return {"source": src, "shifted": full, "subset": subset, "keep": keep}


def test_class_subset_by_name_and_by_metadata(bundles) -> None:
    source = load_bundle(bundles["source"])
    subset = load_bundle(bundles["subset"])
    assert class_subset(source.classnames, subset).tolist() == bundles["keep"]
    assert class_subset(source.classnames, load_bundle(bundles["shifted"])).tolist() == list(
        range(6)
    )
    # an explicit index list wins over names (ImageNet-A/R give WNID positions)
    tensors = dict(subset.tensors)
    meta = {**subset.metadata, "source_classes": json.dumps([5, 1, 3])}
    explicit = save_bundle(bundles["source"].parent / "explicit.safetensors", tensors, meta)
    assert class_subset(source.classnames, load_bundle(explicit)).tolist() == [5, 1, 3]
    bad = save_bundle(
        bundles["source"].parent / "bad.safetensors",
        tensors,
        {**subset.metadata, "classnames": json.dumps(["tench", "dolphin", "goldfish"])},
    )
    with pytest.raises(ConfigError, match="dolphin"):
        class_subset(source.classnames, load_bundle(bad))


def test_subset_accuracy_takes_argmax_over_the_subset_columns(bundles) -> None:
    source = load_bundle(bundles["source"])
    subset = load_bundle(bundles["subset"])
    method = create_method("zeroshot").fit(source.group("train", "train"), source.text(), None)
    rows = subset.group("test")
    index = class_subset(source.classnames, subset)
    logits = method.logits(rows.features)
    expected = 100.0 * float((logits[:, index].argmax(1) == rows.labels).float().mean())
    assert subset_accuracy(method, rows.features, rows.labels, index) == pytest.approx(expected)
    # calibration over the subset's classes (softmax over those columns), summed over batches
    accuracy, ece = subset_scores(method, rows.features, rows.labels, index, batch_size=7)
    assert accuracy == pytest.approx(expected)
    assert ece == pytest.approx(expected_calibration_error(logits[:, index], rows.labels), abs=1e-4)
    # restricting to the subset can only help: full-argmax mapped back is never better
    full_pred = logits.argmax(1)
    mapped = torch.full((6,), -1, dtype=torch.long)
    mapped[index] = torch.arange(3)
    full_acc = 100.0 * float((mapped[full_pred] == rows.labels).float().mean())
    assert expected >= full_acc
    assert expected > 90  # separable toy clusters


def test_evaluate_dg_records(bundles) -> None:
    source = load_bundle(bundles["source"])
    targets = [load_bundle(bundles["shifted"]), load_bundle(bundles["subset"])]
    records = evaluate_dg(
        create_method("tip_adapter", search=False), source, targets, shots=4, seed=1
    )
    assert [r["dataset"] for r in records] == ["source", "shifted", "subset"]
    assert [r["role"] for r in records] == ["source", "target", "target"]
    assert all(r["task"] == "domain_generalization" and r["source"] == "source" for r in records)
    assert [r["n_classes"] for r in records] == [6, 6, 3]
    assert records[2]["n_eval"] == 30 and 0 <= records[2]["accuracy"] <= 100
    # each record's calibration is of its own dataset
    assert all(0.0 <= r["ece"] <= 100.0 for r in records)
    assert records[0]["ece"] != records[2]["ece"]


def test_dg_sweep_resumes_and_reports(bundles, tmp_path: Path) -> None:
    write_sweep(
        tmp_path / "dg.yaml",
        datasets=[],
        methods=["zeroshot", "tip_adapter:search=false"],
        domain_generalization=[
            {"source": "source", "targets": ["shifted", "subset", "missing"], "shots": [2, 4]}
        ],
        seeds=[1, 2],
    )
    spec = load_sweep(tmp_path / "dg.yaml")
    out = tmp_path / "r.jsonl"
    records, resolved = run_sweep(spec, out, progress=False)
    assert len(resolved.cells) == 2 * 2 * 2
    assert len(records) == 8 * 3 and all(r["status"] == "ok" for r in records)
    assert any("missing" in what for what, _ in resolved.skipped)
    assert len({r["run_id"] for r in records}) == 24
    assert run_sweep(spec, out, progress=False)[0] == []
    table = dg_table(records)
    assert table is not None and table.columns == ["source", "shifted", "subset"]
    assert table.row_average("zeroshot") is not None
