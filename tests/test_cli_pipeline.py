"""End to end through the command line on a generated ImageFolder and the tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from clipadapt.cli import main
from clipadapt.data.bundle import load_bundle
from conftest import TINY_MODEL, make_image_folder


@pytest.fixture()
def workspace(tmp_path: Path, tiny_model_dir: Path) -> dict[str, Path]:
    folder = make_image_folder(tmp_path / "images", classes=3, per_class=12)
    (folder / "green_disc" / "broken.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    (folder / "blue_bar" / "empty.png").write_bytes(b"")
    return {
        "images": folder,
        "ckpt": tiny_model_dir / "tiny.safetensors",
        "cache": tmp_path / "cache",
        "bundle": tmp_path / "feats" / "images.safetensors",
        "tmp": tmp_path,
    }


def _extract(ws: dict[str, Path], *extra: str) -> dict:
    summary = ws["tmp"] / "extract.json"
    code = main(
        [
            "extract",
            str(ws["images"]),
            "--backbone",
            TINY_MODEL,
            "--checkpoint",
            str(ws["ckpt"]),
            "--out",
            str(ws["bundle"]),
            "--cache-dir",
            str(ws["cache"]),
            "--views",
            "2",
            "--device",
            "cpu",
            "--no-progress",
            "--json",
            str(summary),
            *extra,
        ]
    )
    assert code == 0
    return json.loads(summary.read_text())


def test_extract_caches_skips_corrupt_and_feeds_every_command(workspace, capsys):
    ws = workspace
    first = _extract(ws)
    assert sum(first["encoded"].values()) > 0
    skipped = [s["path"] for items in first["skipped"].values() for s in items]
    assert sorted(Path(p).name for p in skipped) == ["broken.jpg", "empty.png"]
    out = capsys.readouterr().out
    assert "2 unreadable image(s) skipped" in out and "broken.jpg" in out
    bundle = load_bundle(ws["bundle"])
    total_rows = sum(first["kept"].values())
    assert total_rows == 36  # 38 files, 2 unreadable: reported, not silently dropped
    assert bundle.tensors["train_features_views"].shape[0] == 2
    assert bundle.num_classes == 3 and "negative_text_features" in bundle.tensors
    before = load_file(str(ws["bundle"]))

    second = _extract(ws)
    assert all(v == 0 for v in second["encoded"].values()), (
        "a rerun with the same key encodes nothing"
    )
    after = load_file(str(ws["bundle"]))
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)

    adapter = ws["tmp"] / "adapter"
    fit_json = ws["tmp"] / "fit.json"
    assert (
        main(
            [
                "fit",
                "--bundle",
                str(ws["bundle"]),
                "--method",
                "tip_adapter:search_steps_beta=10",
                "--shots",
                "2",
                "--seed",
                "1",
                "--out",
                str(adapter),
                "--json",
                str(fit_json),
            ]
        )
        == 0
    )
    fitted = json.loads(fit_json.read_text())
    assert fitted["method"] == "tip_adapter" and fitted["n_train"] == 6
    assert 0 <= fitted["accuracy"] <= 100
    assert {p.name for p in adapter.iterdir()} == {"config.json", "state.safetensors", "run.json"}

    eval_json = ws["tmp"] / "eval.json"
    assert (
        main(
            [
                "evaluate",
                "--adapter",
                str(adapter),
                "--bundle",
                str(ws["bundle"]),
                "--json",
                str(eval_json),
            ]
        )
        == 0
    )
    assert json.loads(eval_json.read_text())["accuracy"] == pytest.approx(fitted["accuracy"])

    image = next((ws["images"] / "red_square").glob("*.png"))
    pred_json = ws["tmp"] / "pred.json"
    assert (
        main(
            [
                "predict",
                str(image),
                "--adapter",
                str(adapter),
                "--top",
                "3",
                "--json",
                str(pred_json),
            ]
        )
        == 0
    )
    top = json.loads(pred_json.read_text())[0]["top"]
    assert len(top) == 3 and sum(t["probability"] for t in top) == pytest.approx(1.0, abs=1e-4)
    assert {t["class"] for t in top} == {"red_square", "green_disc", "blue_bar"}

    # the saved adapter alone names its classes and its backbone: run.json is not needed
    import clipadapt

    provenance = clipadapt.load(adapter).provenance
    fitted_on = load_bundle(ws["bundle"])
    assert (
        provenance["classnames"] == fitted_on.classnames == ["blue_bar", "green_disc", "red_square"]
    )
    assert provenance["bundle_fingerprint"] == fitted_on.fingerprint()
    assert provenance["backbone_spec"]["model_name"] == TINY_MODEL
    (adapter / "run.json").unlink()
    predict = ["predict", str(image), "--adapter", str(adapter), "--top", "3"]
    assert main([*predict, "--json", str(pred_json)]) == 0
    assert json.loads(pred_json.read_text())[0]["top"] == top

    # a folder: every image file under it, sorted by path; unreadable ones skipped, named
    capsys.readouterr()
    folder = ["predict", str(ws["images"]), "--adapter", str(adapter), "--top", "1"]
    assert main([*folder, "--json", str(pred_json)]) == 0
    err = capsys.readouterr().err
    listed = json.loads(pred_json.read_text())
    unreadable = {"broken.jpg", "empty.png"}
    expected = sorted(
        str(p) for p in ws["images"].rglob("*.*") if p.is_file() and p.name not in unreadable
    )
    assert [e["image"] for e in listed if not e.get("skipped")] == expected
    assert {Path(e["image"]).name for e in listed if e.get("skipped")} == unreadable
    for name in unreadable:
        assert f"warning: skipped unreadable image {ws['images']}" in err and name in err
    assert (
        main(["predict", str(ws["images"] / "blue_bar" / "empty.png"), "--adapter", str(adapter)])
        == 2
    )  # nothing readable left: an error, not an empty answer
    assert "cannot read image" in capsys.readouterr().err

    results = ws["tmp"] / "results.jsonl"
    args = [
        "bench",
        "--bundle",
        str(ws["bundle"]),
        "--methods",
        "zeroshot,tip_adapter",
        "--shots",
        "1,2",
        "--seeds",
        "1,2",
        "--out",
        str(results),
        "--no-progress",
    ]
    assert main(args) == 0
    lines = [json.loads(x) for x in results.read_text().splitlines()]
    assert len(lines) == 8
    for line in lines:
        for key in (
            "method",
            "dataset",
            "shots",
            "seed",
            "accuracy",
            "hyperparameters",
            "fit_seconds",
            "predict_seconds",
            "trainable_params",
        ):
            assert key in line
    assert main(args) == 0  # finished cells are skipped on a rerun
    assert len(results.read_text().splitlines()) == 8


def test_interrupted_extraction_resumes_and_matches_uninterrupted(tmp_path, tiny_encoder):
    from clipadapt.features.cache import SplitCache
    from clipadapt.features.extract import extract_split
    from clipadapt.features.transforms import CleanView

    folder = make_image_folder(tmp_path / "imgs", classes=2, per_class=10)
    paths = sorted(str(p) for p in folder.rglob("*.*"))
    keys = [str(Path(p).relative_to(folder)) for p in paths]
    view = CleanView(tiny_encoder.image_size, tiny_encoder.mean, tiny_encoder.std)
    key = {"test": "resume"}

    calls = {"n": 0}

    def failing(images):
        calls["n"] += 1
        if calls["n"] > 2:
            raise KeyboardInterrupt
        return tiny_encoder.encode_images(images)

    cache = SplitCache(tmp_path / "c1", "tiny", "imgs", "test", key)
    with pytest.raises(KeyboardInterrupt):
        extract_split(failing, paths, keys, cache, view, shard_size=4, batch_size=4, progress=False)
    assert len(json.loads(cache.manifest_path.read_text())["shards"]) == 2

    encoded = {"n": 0}

    def counting(images):
        encoded["n"] += images.shape[0]
        return tiny_encoder.encode_images(images)

    resumed = extract_split(
        counting,
        paths,
        keys,
        SplitCache(tmp_path / "c1", "tiny", "imgs", "test", key),
        view,
        shard_size=4,
        batch_size=4,
        progress=False,
    )
    assert encoded["n"] == len(paths) - 8 and resumed.encoded_items == len(paths) - 8
    clean = extract_split(
        tiny_encoder.encode_images,
        paths,
        keys,
        SplitCache(tmp_path / "c2", "tiny", "imgs", "test", key),
        view,
        shard_size=4,
        batch_size=4,
        progress=False,
    )
    assert torch.equal(resumed.features, clean.features)
    assert torch.equal(resumed.kept, clean.kept)
    shards1 = sorted((p.name, p.read_bytes()) for p in cache.dir.glob("shard-*"))
    shards2 = sorted((p.name, p.read_bytes()) for p in (tmp_path / "c2").rglob("shard-*"))
    assert shards1 == shards2, "resumed cache must be byte-identical to an uninterrupted one"


def test_corrupted_shard_is_reextracted(tmp_path, tiny_encoder):
    from clipadapt.features.cache import SplitCache
    from clipadapt.features.extract import extract_split
    from clipadapt.features.transforms import CleanView

    folder = make_image_folder(tmp_path / "imgs", classes=2, per_class=4)
    paths = sorted(str(p) for p in folder.rglob("*.*"))
    view = CleanView(tiny_encoder.image_size, tiny_encoder.mean, tiny_encoder.std)
    cache = SplitCache(tmp_path / "c", "tiny", "imgs", "test", {"k": 1})
    first = extract_split(
        tiny_encoder.encode_images, paths, paths, cache, view, shard_size=4, progress=False
    )
    shard = next(cache.dir.glob("shard-00001*"))
    shard.write_bytes(shard.read_bytes()[:-8] + b"\x00" * 8)
    again = extract_split(
        tiny_encoder.encode_images,
        paths,
        paths,
        SplitCache(tmp_path / "c", "tiny", "imgs", "test", {"k": 1}),
        view,
        shard_size=4,
        progress=False,
    )
    assert again.encoded_items == 4
    assert torch.equal(first.features, again.features)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["list-methods", "--filter", "nothing_like_this"], None),
        (
            ["fit", "--bundle", "missing.safetensors", "--method", "zeroshot", "--out", "x"],
            "not found",
        ),
        (
            [
                "bench",
                "--bundle",
                "missing.safetensors",
                "--methods",
                "zeroshot",
                "--out",
                "r.jsonl",
            ],
            "not found",
        ),
        (["info", "no_such_method"], "unknown method"),
        (["extract", "no/such/folder", "--backbone", "world", "--out", "b.safetensors"], None),
    ],
)
def test_cli_errors_are_one_line(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code = main(argv)
    err = capsys.readouterr().err
    if argv[0] == "list-methods":
        assert code == 0
        return
    assert code == 2
    assert "Traceback" not in err and err.startswith("error: ")
    if message:
        assert message in err


def test_bad_flag_values_exit_2(capsys):
    with pytest.raises(SystemExit) as info:
        main(["bench", "--bundle", "b", "--methods", "zeroshot", "--shots", "0,1", "--out", "r"])
    assert info.value.code == 2
    assert "shots must be positive" in capsys.readouterr().err


def test_unknown_method_in_bench(tmp_path, capsys):
    from clipadapt.data.bundle import save_bundle

    gen = torch.Generator().manual_seed(0)
    path = save_bundle(
        tmp_path / "b.safetensors",
        {
            "test_features": torch.randn(6, 8, generator=gen),
            "test_labels": torch.arange(6) % 2,
            "train_features": torch.randn(6, 8, generator=gen),
            "train_labels": torch.arange(6) % 2,
            "text_features": torch.randn(2, 8, generator=gen),
        },
        {"classnames": json.dumps(["a", "b"])},
    )
    code = main(
        [
            "bench",
            "--bundle",
            str(path),
            "--methods",
            "zeroshot,nope",
            "--shots",
            "1",
            "--seeds",
            "1",
            "--out",
            str(tmp_path / "r.jsonl"),
        ]
    )
    assert code == 2
    assert "unknown method 'nope'" in capsys.readouterr().err


def test_auto_workers_leave_the_cpu_to_torch_and_feed_an_accelerator(monkeypatch) -> None:
    import clipadapt.features.extract as extract

    monkeypatch.setattr(extract.os, "cpu_count", lambda: 2)
    monkeypatch.setattr(extract.torch, "get_num_threads", lambda: 2)
    assert extract._auto_workers(10_000, "cpu") == 0  # both cores already run torch
    assert extract._auto_workers(10_000, "cuda") == 1  # the encoder leaves the cores free
    assert extract._auto_workers(100, "cuda") == 0  # too few images to pay a process start
    monkeypatch.setattr(extract.os, "cpu_count", lambda: 16)
    monkeypatch.setattr(extract.torch, "get_num_threads", lambda: 8)
    assert extract._auto_workers(10_000, "cpu") == 4
