"""The demo's code path end to end on a reduced size (one small world dataset, two methods)."""

from __future__ import annotations

import json

from clipadapt.demo import resolve_method_names, run_demo


def test_demo_runs_end_to_end_on_a_reduced_size(tmp_path, capsys):
    out = tmp_path / "demo"
    files = run_demo(
        out,
        size="small",
        shots=(1, 2),
        seeds=(1,),
        methods="zeroshot,tip_adapter",
        datasets=["world_count"],
        progress=False,
    )
    records = [json.loads(line) for line in files["results"].read_text().splitlines()]
    assert {(r["method_spec"], r["shots"]) for r in records} == {
        ("zeroshot", 1),
        ("zeroshot", 2),
        ("zeroshot:text=auto", 1),
        ("zeroshot:text=auto", 2),
        ("tip_adapter", 1),
        ("tip_adapter", 2),
    }
    assert all(r["status"] == "ok" and 0 <= r["accuracy"] <= 100 for r in records)
    # the reference row's text is chosen on validation rows and says so; the names row is kept
    auto = [r for r in records if r["method_spec"] == "zeroshot:text=auto"]
    assert all(r["hyperparameters"]["source"].startswith("validation search") for r in auto)
    names = [r for r in records if r["method_spec"] == "zeroshot"]
    assert all(r["hyperparameters"]["text"] == "names" for r in names)
    table = files["table"].read_text()
    assert "| zeroshot (names only) |" in table and "| zeroshot (best text, val) |" in table
    assert "| zeroshot |" not in table and "world_count 2-shot" in table
    picked = auto[0]["hyperparameters"]["text"]
    assert f"the text chosen on validation, world_count: {picked} (1" in table
    assert files["plot"].stat().st_size > 5_000
    assert "[4/4] results" in capsys.readouterr().out


def test_method_patterns_resolve_in_order():
    assert resolve_method_names("zeroshot,tip*") == ["zeroshot", "tip_adapter", "tip_adapter_f"]
