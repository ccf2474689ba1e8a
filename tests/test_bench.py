"""Sweeps: YAML grids, resume after a real SIGKILL, process pool, TensorBoard curves."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import torch

from clipadapt.bench.results import read_results
from clipadapt.bench.runner import (
    CellSettings,
    LocalExecutor,
    load_sweep,
    resolve_sweep,
    run_sweep,
)
from clipadapt.cli import main
from clipadapt.data.bundle import save_bundle

REPO = Path(__file__).resolve().parents[1]


def toy_bundle(
    path: Path,
    classes: int = 5,
    dim: int = 16,
    train_per_class: int = 8,
    test_per_class: int = 10,
    seed: int = 0,
    spread: float = 0.35,
    name: str | None = None,
    classnames: list[str] | None = None,
    centres: torch.Tensor | None = None,
    with_text: bool = True,
    groups: tuple[str, ...] = ("train", "val", "test"),
) -> Path:
    """Gaussian clusters around random unit class centres (text features = the centres)."""
    gen = torch.Generator().manual_seed(seed)
    if centres is None:
        centres = torch.nn.functional.normalize(torch.randn(classes, dim, generator=gen), dim=1)
    tensors = {}
    for group in groups:
        per = test_per_class if group == "test" else train_per_class
        labels = torch.arange(classes).repeat_interleave(per)
        noise = spread * torch.randn(len(labels), dim, generator=gen)
        tensors[f"{group}_features"] = centres[labels] + noise
        tensors[f"{group}_labels"] = labels
    if with_text:
        tensors["text_features"] = centres.clone()
    names = classnames or [f"class {i}" for i in range(classes)]
    meta = {"classnames": json.dumps(names), "backbone": "toy-16d"}
    if name:
        meta["dataset"] = name
    return save_bundle(path, tensors, meta)


def write_sweep(path: Path, **extra) -> Path:
    import yaml

    data = {
        "bundle_dir": ".",
        "datasets": ["alpha", "beta"],
        "methods": ["zeroshot", "tip_adapter:search_steps_beta=20,search_steps_alpha=10"],
        "shots": [1, 2],
        "seeds": [1, 2],
        **extra,
    }
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture
def sweep_dir(tmp_path: Path) -> Path:
    toy_bundle(tmp_path / "alpha.safetensors", seed=1, name="alpha")
    toy_bundle(tmp_path / "beta.safetensors", seed=2, classes=4, name="beta")
    write_sweep(tmp_path / "sweep.yaml")
    return tmp_path


def test_yaml_sweep_runs_every_cell_once_and_skips_on_rerun(sweep_dir: Path) -> None:
    spec = load_sweep(sweep_dir / "sweep.yaml")
    out = sweep_dir / "r.jsonl"
    records, resolved = run_sweep(spec, out, progress=False)
    assert len(resolved.cells) == 2 * 2 * 2 * 2 and not resolved.skipped
    assert len(records) == 16 and all(r["status"] == "ok" for r in records)
    assert {(r["dataset"], r["method"]) for r in records} == {
        (d, m) for d in ("alpha", "beta") for m in ("zeroshot", "tip_adapter")
    }
    again, _ = run_sweep(spec, out, progress=False)
    assert again == []
    assert len(list(read_results(out))) == 16
    forced, _ = run_sweep(spec, out, progress=False, rerun=True)
    assert len(forced) == 16
    # the resolved grid is saved beside the results
    saved = json.loads((sweep_dir / "r.jsonl.sweep.json").read_text())
    assert saved["cells"] == 16 and saved["spec"]["shots"] == [1, 2]


def test_set_override_and_missing_data_is_listed(sweep_dir: Path) -> None:
    spec = load_sweep(sweep_dir / "sweep.yaml", ["shots=[1]", "datasets=[alpha, gamma]"])
    resolved = resolve_sweep(spec, progress=False)
    assert len(resolved.cells) == 1 * 2 * 2
    assert [w for w, _ in resolved.skipped] == ["gamma"]


def test_unknown_key_and_bad_method_fail_before_work(sweep_dir: Path) -> None:
    from clipadapt.exceptions import ConfigError, UnknownMethodError

    write_sweep(sweep_dir / "bad.yaml", shot=[1])
    with pytest.raises(ConfigError, match="unknown sweep key"):
        load_sweep(sweep_dir / "bad.yaml")
    write_sweep(sweep_dir / "bad2.yaml", methods=["zeroshot", "nope"])
    with pytest.raises(UnknownMethodError):
        resolve_sweep(load_sweep(sweep_dir / "bad2.yaml"), progress=False)


def test_image_only_bundle_runs_image_methods_and_skips_text_methods(tmp_path: Path) -> None:
    toy_bundle(tmp_path / "notext.safetensors", name="notext", with_text=False)
    code = main(
        [
            "bench",
            "--bundle",
            str(tmp_path / "notext.safetensors"),
            "--methods",
            "linear_probe:search=false;zeroshot",
            "--shots",
            "2",
            "--seeds",
            "1",
            "--out",
            str(tmp_path / "r.jsonl"),
            "--no-progress",
        ]
    )
    assert code == 0
    (record,) = read_results(tmp_path / "r.jsonl")
    assert record["method"] == "linear_probe" and record["accuracy"] > 50  # chance is 20


def test_cli_dry_run_lists_cells(sweep_dir: Path, capsys) -> None:
    assert main(["bench", str(sweep_dir / "sweep.yaml"), "--dry-run", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "16 cell(s)" in out


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


@pytest.mark.slow
def test_resume_after_sigkill_loses_nothing_and_duplicates_nothing(tmp_path: Path) -> None:
    for i, name in enumerate(("alpha", "beta")):
        toy_bundle(
            tmp_path / f"{name}.safetensors",
            classes=20,
            dim=64,
            train_per_class=16,
            seed=i,
            name=name,
        )
    # a trained method: each cell takes long enough for the poll below to kill mid-sweep
    write_sweep(
        tmp_path / "sweep.yaml",
        datasets=["alpha", "beta"],
        methods=["tip_adapter_f:epochs=10,search=false"],
        shots=[1, 2, 4],
        seeds=[1, 2],
    )
    out = tmp_path / "r.jsonl"
    cmd = [sys.executable, "-m", "clipadapt.cli", "bench", "sweep.yaml", "--out", "r.jsonl"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [*cmd, "--no-progress"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 120
    while len(_lines(out)) < 3 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = _lines(out)
    assert proc.returncode == -signal.SIGKILL
    assert 3 <= len(before) < 12, "the sweep must be killed part-way"
    finished = {json.loads(line)["run_id"] for line in before if line.strip().endswith("}")}

    # resume in this process (the same code path as the command; saves an interpreter start)
    spec = load_sweep(tmp_path / "sweep.yaml")
    run_sweep(spec, out, progress=False)
    after = _lines(out)
    assert after[: len(before)] == before  # nothing finished was lost or rewritten
    records = [json.loads(line) for line in after]
    counts = Counter(r["run_id"] for r in records)
    assert len(counts) == 12 and max(counts.values()) == 1
    assert finished <= set(counts)
    # a third run has nothing left to do
    assert run_sweep(spec, out, progress=False)[0] == []
    assert len(_lines(out)) == 12


@pytest.mark.slow
def test_process_pool_matches_sequential(sweep_dir: Path) -> None:
    spec = load_sweep(sweep_dir / "sweep.yaml", ["datasets=[alpha]", "seeds=[1]", "shots=[2]"])
    seq, _ = run_sweep(spec, sweep_dir / "seq.jsonl", progress=False)
    pool, _ = run_sweep(
        spec, sweep_dir / "pool.jsonl", progress=False, executor=LocalExecutor(workers=2)
    )
    acc = {r["run_id"]: r["accuracy"] for r in seq}
    assert {r["run_id"]: r["accuracy"] for r in pool} == acc


def test_tensorboard_receives_training_curves(sweep_dir: Path) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    spec = load_sweep(
        sweep_dir / "sweep.yaml",
        ["datasets=[alpha]", "seeds=[1]", "shots=[2]", "methods=['tip_adapter_f:epochs=4']"],
    )
    tb = sweep_dir / "tb"
    records, _ = run_sweep(
        spec, sweep_dir / "r.jsonl", progress=False, settings=CellSettings(tensorboard=str(tb))
    )
    assert records[0]["status"] == "ok"
    runs = [p.parent for p in tb.rglob("events.out.tfevents.*")]
    assert len(runs) == 1 and "tip_adapter_f" in str(runs[0])
    acc = EventAccumulator(str(runs[0]))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    loss_tag = next(t for t in tags if t.endswith("/loss"))
    losses = [e.value for e in acc.Scalars(loss_tag)]
    assert len(losses) == 4 and all(v == v for v in losses)
    assert any(t.endswith("/val_score") for t in tags)
    # a training-free method leaves no event file behind
    spec.methods = ["tip_adapter:search=false"]
    run_sweep(
        spec, sweep_dir / "r.jsonl", progress=False, settings=CellSettings(tensorboard=str(tb))
    )
    assert len(list(tb.rglob("events.out.tfevents.*"))) == 1


def test_profile_paper_runs_what_exists_and_lists_the_rest(tmp_path: Path, capsys) -> None:
    toy_bundle(tmp_path / "caltech101.safetensors", name="caltech101")
    toy_bundle(tmp_path / "dtd.safetensors", name="dtd", with_text=False)
    argv = ["bench", "--profile", "paper", "--bundle-dir", str(tmp_path), "--dry-run"]
    assert main([*argv, "--methods", "zeroshot,linear_probe", "--no-progress"]) == 0
    out = capsys.readouterr().out
    # caltech101: 2 methods × 5 shots × 3 seeds; dtd (no text): linear probe only
    assert "45 cell(s)" in out
    for name in ("imagenet", "stanford_cars", "sun397", "eurosat", "ucf101"):
        assert f"  {name}: no bundle" in out
    assert "zeroshot on dtd: needs `text_features`" in out
    assert "domain generalisation from imagenet: source missing" in out


def test_profile_fast_puts_each_methods_fast_preset_in_its_spec() -> None:
    from clipadapt.bench.spec import profile_methods
    from clipadapt.exceptions import ConfigError

    specs = ["zeroshot", "taskres", "taskres:lr=0.01", "taskres:preset=imagenet"]
    assert profile_methods(specs, "fast") == [
        "zeroshot",  # no fast preset: as typed
        "taskres:preset=fast",
        "taskres:preset=fast,lr=0.01",  # an explicit option still wins over the preset
        "taskres:preset=imagenet",  # an explicit preset wins over the profile
    ]
    assert profile_methods(specs, "paper") == specs == profile_methods(specs, None)
    with pytest.raises(ConfigError, match="unknown profile"):
        profile_methods(specs, "slow")


def test_bench_profile_fast_runs_the_fast_presets_and_keeps_them_apart(
    sweep_dir: Path, capsys
) -> None:
    from clipadapt.bench.report import paper_table

    out = sweep_dir / "r.jsonl"
    argv = ["bench", str(sweep_dir / "sweep.yaml"), "--set", "shots=[2]", "--set", "seeds=[1]"]
    argv += ["--set", "datasets=[alpha]", "--methods", "taskres", "--out", str(out)]
    assert main([*argv, "--profile", "fast", "--no-progress"]) == 0
    assert main([*argv, "--profile", "paper", "--no-progress"]) == 0
    capsys.readouterr()
    fast, paper = list(read_results(out))
    assert fast["method_spec"] == "taskres:preset=fast" and paper["method_spec"] == "taskres"
    # the preset resolved into the run's hyperparameters (9 of the rule's 100 epochs)
    assert (
        fast["params"]["epoch_scale"] == 0.09
        and fast["params"]["batch_size"] == 128
        and paper["params"]["epoch_scale"] == 1.0
    )
    assert fast["run_id"] != paper["run_id"]  # the resume key separates the two schedules
    # each resumes on its own: running the fast profile again runs nothing
    assert main([*argv, "--profile", "fast", "--no-progress"]) == 0
    assert len(list(read_results(out))) == 2
    assert paper_table(read_results(out)).rows == ["taskres", "taskres:preset=fast"]
    # a fast preset switches no need off: a method the bundle lacks tensors for is still
    # skipped with the reason, as without the profile
    dry = [*argv[:-4], "--methods", "hegraph_adapter", "--dry-run", "--no-progress"]
    assert main([*dry, "--profile", "fast"]) == 0
    assert "hegraph_adapter on alpha: needs `negative_text_features`" in capsys.readouterr().out


def test_run_grid_keeps_going_past_a_failing_method(tmp_path: Path) -> None:
    from clipadapt.bench.runner import Grid, run_grid
    from clipadapt.data.bundle import load_bundle

    bundle = load_bundle(toy_bundle(tmp_path / "b.safetensors", name="b"))
    grid = Grid(["zeroshot", "hegraph_adapter"], [1], [1])
    records = run_grid(bundle, grid, tmp_path / "r.jsonl", progress=False, keep_going=True)
    status = {r["method"]: r["status"] for r in records}
    assert status == {"zeroshot": "ok", "hegraph_adapter": "error"}
    assert "description_features" in next(r["error"] for r in records if r["status"] == "error")
    assert len(run_grid(bundle, grid, tmp_path / "r.jsonl", progress=False, keep_going=True)) == 1


@pytest.mark.slow
def test_bench_runs_coop_from_an_image_dataset_and_a_backbone(tmp_path: Path) -> None:
    """CoOp trains through the text tower: a bench cell carries the bundle's backbone record and
    the worker builds the tower from it, in process and in a process pool alike."""
    from conftest import make_image_folder

    images = make_image_folder(tmp_path / "tiny", classes=3, per_class=6, size=32)
    argv = ["bench", "--dataset", str(images), "--backbone", "world"]
    argv += ["--methods", "coop:n_ctx=4,epochs=2;zeroshot", "--shots", "1", "--seeds", "1"]
    argv += ["--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "r.jsonl")]
    assert main([*argv, "--no-progress"]) == 0
    records = {r["method"]: r for r in read_results(tmp_path / "r.jsonl")}
    assert set(records) == {"coop", "zeroshot"}
    coop = records["coop"]
    assert coop["status"] == "ok", coop.get("error")
    assert coop["trainable_params"] > 0 and 0 <= coop["accuracy"] <= 100
    assert coop["backbone"] == records["zeroshot"]["backbone"]

    # the same cell in a spawned worker process: same record
    (tmp_path / "sweep.yaml").write_text(
        "datasets: [{name: tiny, images: tiny}]\nbackbones: [world]\ncache_dir: cache\n"
        "methods: ['coop:n_ctx=4,epochs=2']\nshots: [1]\nseeds: [1]\n"
    )
    pooled, resolved = run_sweep(
        load_sweep(tmp_path / "sweep.yaml"),
        tmp_path / "pool.jsonl",
        progress=False,
        executor=LocalExecutor(workers=2),
    )
    assert not resolved.skipped
    (record,) = pooled
    assert record["status"] == "ok", record.get("error")
    assert record["run_id"] == coop["run_id"] and record["accuracy"] == coop["accuracy"]


def test_coop_on_a_bundle_without_backbone_is_skipped_with_the_reason(sweep_dir: Path) -> None:
    """A bundle made elsewhere records no backbone: CoOp cannot get a text tower, so the cell is
    listed as skipped with the fix instead of failing at run time."""
    spec = load_sweep(sweep_dir / "sweep.yaml", ["methods=[coop, zeroshot]", "shots=[1]"])
    resolved = resolve_sweep(spec, progress=False)
    assert {c.method for c in resolved.cells} == {"zeroshot"}
    reasons = dict(resolved.skipped)
    assert (
        "text tower" in reasons["coop on alpha"] and "clipadapt extract" in reasons["coop on alpha"]
    )
