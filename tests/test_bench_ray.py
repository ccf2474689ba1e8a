"""The Ray executor gives the same records as the local one (local Ray instance, 2 CPUs)."""

from __future__ import annotations

from pathlib import Path

import pytest

from clipadapt.bench.results import read_results
from clipadapt.bench.runner import LocalExecutor, RayExecutor, load_sweep, run_sweep
from test_bench import toy_bundle, write_sweep

pytest.importorskip("ray")

pytestmark = pytest.mark.slow


def test_ray_matches_local(tmp_path: Path) -> None:
    toy_bundle(tmp_path / "alpha.safetensors", seed=1, name="alpha")
    toy_bundle(tmp_path / "beta.safetensors", seed=2, classes=4, name="beta")
    write_sweep(
        tmp_path / "sweep.yaml",
        methods=["zeroshot", "tip_adapter:search=false", "tip_adapter_f:epochs=3,search=false"],
        shots=[1, 4],
        seeds=[1],
        domain_generalization=[{"source": "alpha", "targets": ["beta"], "shots": [2]}],
    )
    spec = load_sweep(tmp_path / "sweep.yaml")
    import ray

    # one local instance for both Ray sweeps (the executor reuses a running instance)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        _compare(spec, tmp_path)
        _coop_on_ray(tmp_path)
    finally:
        ray.shutdown()


def _coop_on_ray(tmp_path: Path) -> None:
    """A Ray worker builds CoOp's text tower from the cell's backbone record."""
    from conftest import make_image_folder

    make_image_folder(tmp_path / "tiny", classes=3, per_class=6, size=32)
    (tmp_path / "coop.yaml").write_text(
        "datasets: [{name: tiny, images: tiny}]\nbackbones: [world]\ncache_dir: cache\n"
        "methods: ['coop:n_ctx=4,epochs=2']\nshots: [1]\nseeds: [1]\n"
    )
    spec = load_sweep(tmp_path / "coop.yaml")
    (local,), _ = run_sweep(spec, tmp_path / "coop-local.jsonl", progress=False)
    (remote,), _ = run_sweep(
        spec, tmp_path / "coop-ray.jsonl", progress=False, executor=RayExecutor(num_cpus=2)
    )
    assert remote["status"] == local["status"] == "ok", remote.get("error")
    assert remote["accuracy"] == local["accuracy"] and remote["run_id"] == local["run_id"]


def _compare(spec, tmp_path: Path) -> None:
    local, _ = run_sweep(spec, tmp_path / "local.jsonl", progress=False, executor=LocalExecutor())
    remote, resolved = run_sweep(
        spec, tmp_path / "ray.jsonl", progress=False, executor=RayExecutor(num_cpus=2)
    )
    assert len(local) == len(remote) == 2 * 3 * 2 + 3 * 2
    key = ("accuracy", "hyperparameters", "trainable_params", "n_train", "n_eval", "status")

    def by_id(records):
        return {r["run_id"]: tuple(r.get(k) for k in key) for r in records}

    assert by_id(remote) == by_id(local)
    # the driver alone wrote the file: one line per run, no duplicates
    lines = list(read_results(tmp_path / "ray.jsonl"))
    assert len(lines) == len({r["run_id"] for r in lines}) == len(remote)
    # resuming with Ray skips everything
    assert (
        run_sweep(spec, tmp_path / "ray.jsonl", progress=False, executor=RayExecutor(num_cpus=2))[0]
        == []
    )
