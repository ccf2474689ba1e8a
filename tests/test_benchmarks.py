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
from benchmarks.suite import PROFILES, REFERENCE_METHODS, training_methods


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
    assert [row["method"] for row in report["reference"]] == list(REFERENCE_METHODS)
    for row in report["reference"]:
        assert row["parity"], row
        assert row["reference_seconds"] > 0 and row["ours_seconds"] > 0
    assert report["extraction"]["images"] == PROFILES["quick"].extraction_images
    assert report["extraction"]["ratio"] > 0
    assert report["sweep"]["runs"] == 2 * 3  # shots (1, 2) x three methods x one seed
    for heading in ("## Training", "## Reference ratio", "## Extraction", "## Sweep"):
        assert heading in markdown
