"""Report tables from a hand-written JSONL: means, stds, averages, bold, CSV, plots, published."""

from __future__ import annotations

import csv
import io
import json
import statistics
from pathlib import Path

import pytest

from clipadapt.bench.report import (
    COLLAPSE_MARK,
    canonical_backbone,
    compare_published,
    cost_table,
    dg_table,
    ece_table,
    load_published,
    paper_table,
    shots_tables,
    write_report,
)
from clipadapt.bench.results import read_results
from clipadapt.cli import main

# (method, dataset, shots, seed, accuracy)
RUNS = [
    ("zeroshot", "pets", 1, 1, 80.0),
    ("zeroshot", "pets", 1, 2, 80.0),
    ("zeroshot", "pets", 16, 1, 80.0),
    ("zeroshot", "pets", 16, 2, 80.0),
    ("zeroshot", "dtd", 1, 1, 40.0),
    ("zeroshot", "dtd", 1, 2, 40.0),
    ("zeroshot", "dtd", 16, 1, 40.0),
    ("zeroshot", "dtd", 16, 2, 40.0),
    ("tip", "pets", 1, 1, 81.0),
    ("tip", "pets", 1, 2, 83.0),
    ("tip", "pets", 16, 1, 86.0),
    ("tip", "pets", 16, 2, 88.0),
    ("tip", "dtd", 1, 1, 44.0),
    ("tip", "dtd", 1, 2, 46.0),
    ("tip", "dtd", 16, 1, 60.0),
    ("tip", "dtd", 16, 2, 63.0),
]


def _record(method, dataset, shots, seed, acc, **extra):
    return {
        "run_id": f"{method}-{dataset}-{shots}-{seed}-{extra.get('task', 'c')}",
        "task": "classification",
        "method": method,
        "dataset": dataset,
        "shots": shots,
        "seed": seed,
        "accuracy": acc,
        "backbone": "OpenAI CLIP ViT-B/32",
        "fit_seconds": 2.0 if method == "tip" else 0.0,
        "predict_seconds": 0.5,
        "trainable_params": 0,
        "status": "ok",
        **extra,
    }


@pytest.fixture
def results(tmp_path: Path) -> Path:
    lines = [_record(*run) for run in RUNS]
    # a failed run and a superseded duplicate (a --rerun) must not count
    lines.append({**_record("tip", "pets", 16, 1, 0.0), "status": "error", "error": "boom"})
    lines.insert(0, _record("tip", "dtd", 16, 2, 10.0))  # older line of the same run id
    path = tmp_path / "results.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines) + '{"torn": ')
    return path


def test_paper_table_numbers(results: Path) -> None:
    table = paper_table(list(read_results(results)))
    assert table.title.startswith("16-shot")  # the largest shots every dataset has
    assert table.columns == ["dtd", "pets"] and table.rows == ["tip", "zeroshot"]
    mean, std, n = table.cells[("tip", "dtd")]
    assert (mean, n) == (61.5, 2) and std == pytest.approx(1.5)  # pstdev of 60, 63
    assert table.cells[("tip", "pets")][:2] == (87.0, 1.0)
    assert table.row_average("tip") == pytest.approx((61.5 + 87.0) / 2)
    assert table.row_average("zeroshot") == pytest.approx(60.0)
    md = table.markdown()
    assert "| tip | **61.5 ± 1.5** | **87.0 ± 1.0** | **74.2** |" in md
    assert "| zeroshot | 40.0 ± 0.0 | 80.0 ± 0.0 | 60.0 |" in md
    rows = list(csv.reader(io.StringIO(table.csv())))
    assert rows[0][:4] == ["method", "dtd mean", "dtd std", "dtd n"]
    assert rows[1][0] == "tip" and float(rows[1][1]) == 61.5 and float(rows[1][-1]) == 74.25
    one = paper_table(list(read_results(results)), shots=1)
    assert one.cells[("tip", "dtd")][0] == 45.0


def test_shot_tables_and_average(results: Path) -> None:
    tables = shots_tables(list(read_results(results)))
    assert set(tables) == {"dtd", "pets", "average"}
    assert tables["pets"].columns == ["1-shot", "16-shot"]
    avg = tables["average"]
    # average over datasets of the seed means: tip 1-shot (82 + 45) / 2
    assert avg.cells[("tip", "1-shot")][0] == pytest.approx(63.5)
    assert avg.cells[("tip", "16-shot")][0] == pytest.approx(statistics.fmean([87.0, 61.5]))
    assert avg.cells[("tip", "16-shot")][1] == pytest.approx(statistics.pstdev([87.0, 61.5]))


def test_incomplete_row_has_no_average(results: Path) -> None:
    records = [*read_results(results), _record("coop", "pets", 16, 1, 90.0)]
    table = paper_table(records)
    assert table.row_average("coop") is None
    assert "| coop | – | **90.0** | – |" in table.markdown()


def test_runs_below_zero_shot_are_marked_as_collapse(results: Path) -> None:
    # "bad" falls below zero-shot on pets (80) at 16 shots but not on dtd (40); at 1 shot it
    # is below on both
    records = [
        *read_results(results),
        _record("bad", "pets", 16, 1, 79.0),
        _record("bad", "pets", 16, 2, 80.5),  # mean 79.75 < 80
        _record("bad", "dtd", 16, 1, 41.0),
        _record("bad", "pets", 1, 1, 12.0),
        _record("bad", "dtd", 1, 1, 39.9),
    ]
    table = paper_table(records)
    assert table.marks == {("bad", "pets"): COLLAPSE_MARK}
    md = table.markdown()
    assert f"| bad | 41.0 | 79.8 ± 0.8 {COLLAPSE_MARK} | 60.4 |" in md
    assert f"{COLLAPSE_MARK} below zero-shot CLIP on the same dataset" in md
    assert "| tip | **61.5 ± 1.5** | **87.0 ± 1.0** | **74.2** |" in md  # above: unmarked
    assert set(paper_table(records, shots=1).marks) == {("bad", "pets"), ("bad", "dtd")}
    tables = shots_tables(records)
    assert set(tables["pets"].marks) == {("bad", "1-shot"), ("bad", "16-shot")}
    assert set(tables["dtd"].marks) == {("bad", "1-shot")}
    # no zero-shot run, nothing to judge against: no marks, no note
    alone = [r for r in records if r["method"] != "zeroshot"]
    assert not paper_table(alone).marks and COLLAPSE_MARK not in paper_table(alone).markdown()


def test_ece_table_and_report_section(results: Path, tmp_path: Path) -> None:
    records = list(read_results(results))
    assert ece_table(records) is None  # no run recorded an ECE
    for r, ece in zip(records, range(len(records)), strict=False):
        r["ece"] = float(ece)
    calibrated = [
        _record("tip", "pets", 16, 1, 86.0, ece=3.0),
        _record("tip", "pets", 16, 2, 88.0, ece=5.0),
        _record("zeroshot", "pets", 16, 1, 80.0, ece=2.0),
    ]
    table = ece_table(calibrated)
    assert table is not None and "calibration error" in table.title
    assert table.cells[("tip", "pets")][:2] == (4.0, 1.0)
    assert "| zeroshot | **2.0** |" in table.markdown()  # lower is better
    written = write_report(calibrated, tmp_path / "r")
    assert "ece.md" in written and "ece.csv" in written
    assert "expected calibration error" in written["report.md"].read_text(encoding="utf-8")


def test_fixed_group_protocols_of_one_bundle_get_a_column_each() -> None:
    # the issue-17 ImageNet grid: one bundle, fit on train_1shot / tune on train_2shot and the
    # other way round, no shot count; the two protocols must not merge into one cell
    records = []
    for train, val, accs in (
        ("train_1shot", "train_2shot", (60.0, 61.0)),
        ("train_2shot", "train_1shot", (63.0, 64.0)),
    ):
        for seed, acc in zip((1, 2), accs, strict=True):
            r = _record("tip", "imagenet", None, seed, acc, train_set=train, val_set=val)
            records.append(r | {"run_id": f"{train}-{seed}", "bundle_fingerprint": "abc"})
    table = paper_table(records)
    one, two = (
        "imagenet (fit train_1shot, tune train_2shot)",
        "imagenet (fit train_2shot, tune train_1shot)",
    )
    assert table.columns == [one, two]
    assert table.cells[("tip", one)][:3] == (60.5, 0.5, 2)
    assert table.cells[("tip", two)][:3] == (63.5, 0.5, 2)


def test_cost_table(results: Path) -> None:
    table = cost_table(list(read_results(results)))
    assert table.cells[("tip", "fit s")][0] == 2.0 and table.cells[("zeroshot", "fit s")][0] == 0.0
    assert "**" not in table.markdown()


def test_dg_table_target_average() -> None:
    base = {"task": "domain_generalization", "source": "imagenet"}
    records = []
    for method, accs in {"zs": (60, 50, 30, 20), "tip": (65, 55, 35, 10)}.items():
        for role, dataset, acc in zip(
            ("source", "target", "target", "target"),
            ("imagenet", "v2", "sketch", "a"),
            accs,
            strict=True,
        ):
            records.append(
                _record(method, dataset, 16, 1, float(acc), **base, role=role)
                | {"run_id": f"{method}{dataset}"}
            )
    table = dg_table(records)
    assert table is not None and table.columns == ["imagenet", "a", "sketch", "v2"]
    assert table.row_average("zs") == pytest.approx((50 + 30 + 20) / 3)
    assert table.row_average("tip") == pytest.approx((55 + 35 + 10) / 3)
    assert "| zs | 60.0 | **20.0** | 30.0 | 50.0 | **33.3** |" in table.markdown()


def test_write_report_files_and_plot(results: Path, tmp_path: Path) -> None:
    out = tmp_path / "report"
    written = write_report(list(read_results(results)), out, compare="published")
    for name in (
        "table.md",
        "table_1shot.md",
        "table_16shot.csv",
        "table.csv",
        "shots_average.md",
        "cost.md",
        "report.md",
        "accuracy_vs_shots.png",
        "published.md",
    ):
        assert written[name].is_file() and written[name].stat().st_size > 0, name
    png = written["accuracy_vs_shots.png"].read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_report_cli(results: Path, tmp_path: Path, capsys) -> None:
    assert main(["report", str(results), "--out", str(tmp_path / "r"), "--shots", "1"]) == 0
    out = capsys.readouterr().out
    assert "| tip | **45.0 ± 1.0** | **82.0 ± 1.0** | **63.5** |" in out
    assert (tmp_path / "r" / "accuracy_vs_shots.png").stat().st_size > 0
    assert main(["report", str(tmp_path / "nope.jsonl"), "--out", str(tmp_path / "x")]) == 2


def test_published_data_has_a_source_per_number() -> None:
    entries = load_published()
    assert len(entries) > 100
    for e in entries:
        assert e["source"] and isinstance(e["accuracy"], (int, float)), e
        assert {"method", "dataset", "backbone", "task"} <= set(e), e
    # spot checks against the spec tables
    tip_log = {
        (e["method"], e["dataset"], e["shots"]): e["accuracy"]
        for e in entries
        if e["backbone"] == "RN50" and "exp.log" in e["source"]
    }
    assert tip_log[("tip_adapter_f", "imagenet", 16)] == 65.51
    assert tip_log[("tip_adapter", "fgvc_aircraft", 1)] == 19.05


def test_compare_published_puts_ours_beside_theirs() -> None:
    published = [
        {
            "task": "classification",
            "method": "zeroshot",
            "dataset": "imagenet",
            "shots": 16,
            "backbone": "ViT-B/32",
            "accuracy": 62.05,
            "source": "paper T4",
        },
    ]
    ours = [_record("zeroshot", "imagenet", 16, s, a) for s, a in ((1, 60.0), (2, 61.0))]
    text = compare_published(ours, published)
    assert "| 62.05 | ViT-B/32 | paper T4 | 60.50 (n=2) | ViT-B/32 | -1.55 |" in text
    assert "| 8 |" not in compare_published(ours, [{**published[0], "shots": 8}])
    other = [{**published[0], "backbone": "RN50", "shots": None}]
    # a different backbone is listed beside ours, without a difference
    assert "| 62.05 | RN50 | paper T4 | 60.50 (n=2) | ViT-B/32 | – |" in compare_published(
        ours, other
    )


def test_default_shots_is_the_largest_common_one() -> None:
    from clipadapt.bench.report import default_shots

    runs = [_record("m", "a", k, 1, 50.0) for k in (1, 2, 16)]
    runs += [_record("m", "b", k, 1, 50.0) for k in (1, 2)]
    assert default_shots(runs) == 2
    assert default_shots([_record("m", "a", 4, 1, 1.0), _record("m", "b", 8, 1, 1.0)]) == 8


def test_canonical_backbone() -> None:
    assert canonical_backbone("OpenAI CLIP ViT-B/32") == "ViT-B/32"
    assert canonical_backbone("ViT-B-32:openai") == "ViT-B/32"
    assert canonical_backbone("RN50") == "RN50"
    assert canonical_backbone("world") is None


def test_markdown_table_keeps_the_demo_layout(results: Path) -> None:
    from clipadapt.bench.report import markdown_table

    md = markdown_table(list(read_results(results)), with_std=False)
    header = md.splitlines()[0]
    assert header == "| method | dtd 1-shot | dtd 16-shot | pets 1-shot | pets 16-shot | average |"
    assert "| tip | **45.0** | **61.5** | **82.0** | **87.0** | **68.9** |" in md
