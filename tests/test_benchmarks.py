"""The benchmark suite's quick mode: the report is produced and the reference parity holds.

Wall-clock times are never asserted (they depend on the machine and its load); what is checked
is that every section measured something and that our implementations agree with the
straightforward references within 0.2 accuracy points.
"""

from __future__ import annotations

import json

import pytest

from benchmarks.__main__ import main
from benchmarks.measure import count_matmul_flops, recording_plan
from benchmarks.suite import PROFILES, REFERENCE_METHODS, schedule_methods, training_methods


def test_matmul_flop_count_and_step_plan() -> None:
    import torch

    a, b = torch.randn(8, 16), torch.randn(16, 4)
    flops, out = count_matmul_flops(lambda: a @ b)
    assert flops == 2 * 8 * 16 * 4 and out.shape == (8, 4)

    from clipadapt.methods.base import create_method
    from clipadapt.testing.checks import make_fixture

    fx = make_fixture(5, 16, 4)
    with recording_plan(3) as plan:
        create_method("tip_adapter_f", epochs=4, batch_size=8).fit(fx.train, fx.text, fx.val)
    assert plan.loops and plan.planned_steps == 4 * 3  # 20 rows / 8 = 3 batches per epoch


@pytest.mark.slow
def test_quick_benchmark_writes_report_with_parity(tmp_path, capsys) -> None:
    out = tmp_path / "bench"
    assert main(["--quick", "--check-parity", "--threads", "1", "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    markdown = (out / "report.md").read_text()
    assert report["profile"] == {**report["profile"], "name": "quick"}
    assert report["gemm_gflops"] > 0
    names = [row["method"] for row in report["training"]]
    assert names == training_methods()
    for row in report["training"]:
        assert row["fit_seconds"] > 0 and row["predict_rows_per_s"] > 0
        assert row["fit_measured"]  # the quick problem always runs the whole schedule
        assert 0.0 <= row["test_accuracy"] <= 100.0
        if row["steps"]:
            assert row["flops_per_step"] > 0 and row["floor_ratio"] > 0
    # the quick problem is hard enough that accuracy does not saturate (parity can fail)
    assert any(row["test_accuracy"] < 95.0 for row in report["training"])
    # paper vs fast: every method with a fast preset, both schedules measured to the end on
    # the quick problem, FLOPs counted for both
    assert [row["method"] for row in report["schedules"]] == schedule_methods()
    for row in report["schedules"]:
        for side in ("paper", "fast"):
            assert row[side]["fit_measured"] and row[side]["flops"] > 0, (row["method"], side)
            assert 0.0 <= row[side]["test_accuracy"] <= 100.0
        assert row["flops_ratio"] == row["fast"]["flops"] / row["paper"]["flops"]
        assert row["accuracy_difference"] is not None
    assert [row["method"] for row in report["reference"]] == list(REFERENCE_METHODS)
    for row in report["reference"]:
        assert row["parity"], row
        assert row["reference_seconds"] > 0 and row["ours_seconds"] > 0
    assert report["extraction"]["images"] == PROFILES["quick"].extraction_images
    assert report["extraction"]["ratio"] > 0
    assert report["sweep"]["runs"] == 2 * 3  # shots (1, 2) x three methods x one seed
    headings = (
        "## Training",
        "## Paper vs fast",
        "## Reference ratio",
        "## Extraction",
        "## Sweep",
    )
    for heading in headings:
        assert heading in markdown


def test_update_merges_rows_and_keeps_the_rest() -> None:
    from benchmarks.__main__ import merge_reports

    old = {
        "started": "t0",
        "gemm_gflops": 100.0,
        "training": [{"method": "a", "fit_seconds": 1.0}, {"method": "b", "fit_seconds": 2.0}],
        "sweep": {"seconds": 5.0},
        "commands": {"training": "old", "sweep": "old"},
    }
    new = {
        "started": "t1",
        "gemm_gflops": 90.0,
        "training": [{"method": "b", "fit_seconds": 3.0}, {"method": "c", "fit_seconds": 4.0}],
        "commands": {"training": "new"},
    }
    merged = merge_reports(old, new)
    assert [(r["method"], r["fit_seconds"]) for r in merged["training"]] == [
        ("a", 1.0),
        ("b", 3.0),
        ("c", 4.0),
    ]
    assert merged["sweep"] == {"seconds": 5.0} and merged["started"] == "t0"
    assert merged["commands"] == {"training": "new", "sweep": "old"}
    assert merged["gemm_by_section"] == {"training": 90.0}
