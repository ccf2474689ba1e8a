"""The papers' DG and Bongard-HOI experiments through the command line, on miniature copies of
the releases in their exact layouts (WNID folder names from the shipped lists, V2's index
folders, the Bongard-HOI annotation files), encoded with the embedded ``world`` backbone:
``extract <variant>``, ``bench`` (DG sweep, episodes, ``--profile paper --dry-run``),
``report``, ``episodes bongard-hoi`` and ``--classnames`` on bench/fit/evaluate/import."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from clipadapt.bench.results import read_results
from clipadapt.cli.main import main
from clipadapt.data.bundle import load_bundle
from clipadapt.data.imagenet_variants import imagenet_wnids
from clipadapt.tasks.domain_generalization import class_mapping
from test_bench import toy_bundle, write_sweep
from test_bongard_hoi import TEST_SPLITS, make_release
from test_imagenet_variants import (
    CONCEPTS,
    GOLDFISH,
    ROBIN,
    STINGRAY,
    TENCH,
    imagenet_tree,
    variant_tree,
)

VARIANT_CLASSES = {
    "imagenet_v2": [TENCH, GOLDFISH, ROBIN],
    "imagenet_sketch": [GOLDFISH, STINGRAY],
    "imagenet_a": [STINGRAY, ROBIN],
    "imagenet_r": [GOLDFISH, STINGRAY],
}


def _extract(name: str, data_root: Path, out: Path, *extra: str) -> int:
    return main(
        [
            "extract", name, "--data-root", str(data_root), "--backbone", "world",
            "--views", "0", "--workers", "0", "--no-progress",
            "--cache-dir", str(data_root / "cache"), "--out", str(out), *extra,
        ]
    )  # fmt: skip


@pytest.fixture(scope="module")
def dg_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Miniature ImageNet + V2/Sketch/A/R trees and their bundles, extracted by the CLI."""
    root = tmp_path_factory.mktemp("dg_cli")
    imagenet_tree(root, sorted(CONCEPTS), per_class=3)
    for key, wnids in VARIANT_CLASSES.items():
        variant_tree(root, key, wnids, per_class=2)
    for name in ("imagenet", *VARIANT_CLASSES):
        assert _extract(name, root, root / "feats" / f"{name}.safetensors", "--partial") == 0
    return root


def test_extract_variant_needs_the_complete_release_or_partial(dg_root: Path, capsys) -> None:
    capsys.readouterr()
    assert _extract("imagenet_a", dg_root, dg_root / "a.safetensors") == 2
    err = capsys.readouterr().err
    assert "2 class folders (expected 200" in err and "--partial" in err
    assert err.count("\n") == 1  # one line, no traceback
    assert not (dg_root / "a.safetensors").exists()


def test_extracted_bundles_carry_the_class_mapping(dg_root: Path) -> None:
    feats = dg_root / "feats"
    source = load_bundle(feats / "imagenet.safetensors")
    # ImageNet's loader records its sorted train WNIDs
    assert json.loads(source.metadata["wnids"]) == [TENCH, GOLDFISH, STINGRAY, ROBIN]
    assert json.loads(source.metadata["imagenet_classes"]) == [0, 1, 6, 15]
    v2 = load_bundle(feats / "imagenet_v2.safetensors")
    assert json.loads(v2.metadata["imagenet_classes"]) == [0, 1, 15]  # folders 0, 1, 15
    assert v2.tensor("test_labels").tolist() == [0, 0, 1, 1, 2, 2]
    # by hand: the source's columns are tench 0, goldfish 1, stingray 2, robin 3
    expected = {"imagenet_v2": [0, 1, 3], "imagenet_sketch": [1, 2], "imagenet_a": [2, 3],
                "imagenet_r": [1, 2]}  # fmt: skip
    for key, columns in expected.items():
        target = load_bundle(feats / f"{key}.safetensors")
        index, rule = class_mapping(source.classnames, target, source.metadata)
        assert (index.tolist(), rule) == (columns, "wnids"), key


def test_bundle_metadata_is_part_of_the_extraction_key() -> None:
    from clipadapt.data.imagenet_variants import subset_wnids, wnid_metadata
    from clipadapt.features.extract import extraction_settings

    settings = {
        "views": 0, "aug_scale": (0.5, 1.0), "seed": 0, "templates": ["a photo of a {}."],
        "descriptions": None, "negative_template": None, "splits": ["test"],
    }  # fmt: skip
    plain = extraction_settings({"b": 1}, **settings)
    assert extraction_settings({"b": 1}, **settings, bundle_metadata={}) == plain
    a = extraction_settings(
        {"b": 1}, **settings, bundle_metadata=wnid_metadata(subset_wnids("imagenet_a")[:2])
    )
    r = extraction_settings(
        {"b": 1}, **settings, bundle_metadata=wnid_metadata(subset_wnids("imagenet_r")[:2])
    )
    assert len({plain, a, r}) == 3


def test_variants_stay_out_of_the_classification_lists() -> None:
    from clipadapt.bench.spec import PAPER_DATASETS, paper_profile
    from clipadapt.data.datasets import list_datasets

    for key in VARIANT_CLASSES:
        assert key not in list_datasets() and key not in PAPER_DATASETS
    spec = paper_profile()
    assert all(d.name not in VARIANT_CLASSES for d in spec.datasets)
    assert spec.domain_generalization[0].targets == list(VARIANT_CLASSES)


def test_dg_sweep_and_report_through_the_cli(dg_root: Path, tmp_path: Path, capsys) -> None:
    sweep = write_sweep(
        tmp_path / "dg.yaml",
        bundle_dir=str(dg_root / "feats"),
        datasets=[],
        methods=["zeroshot", "tip_adapter:search=false"],
        seeds=[1],
        domain_generalization=[
            {"source": "imagenet", "targets": list(VARIANT_CLASSES), "shots": [2]}
        ],
    )
    out = tmp_path / "dg.jsonl"
    assert main(["bench", str(sweep), "--out", str(out), "--no-progress"]) == 0
    records = list(read_results(out))
    assert len(records) == 2 * 5 and all(r["status"] == "ok" for r in records)
    by = {(r["method"], r["dataset"]): r for r in records}
    for key, wnids in VARIANT_CLASSES.items():
        record = by[("zeroshot", key)]
        assert record["class_mapping"] == "wnids" and record["n_classes"] == len(wnids)
    # the world model tells the four concepts apart, restricted to each target's columns
    assert by[("zeroshot", "imagenet_a")]["accuracy"] >= 75.0
    capsys.readouterr()
    assert main(["bench", str(sweep), "--out", str(out), "--no-progress"]) == 0
    assert len(list(read_results(out))) == 10  # resumed: nothing ran twice
    assert main(["report", str(out), "--out", str(tmp_path / "report")]) == 0
    dg = (tmp_path / "report" / "dg.md").read_text()
    for key in ("imagenet", *VARIANT_CLASSES, "average"):
        assert key in dg


def test_paper_dry_run_lists_dg_cells_and_encodes_nothing(dg_root: Path, tmp_path: Path, capsys):
    # bundles present: the DG cell is listed with the targets it scores
    base = ["bench", "--profile", "paper", "--methods", "zeroshot", "--seeds", "1", "--dry-run"]
    argv = [*base, "--bundle-dir", str(dg_root / "feats"), "--out", str(tmp_path / "p.jsonl")]
    assert main([*argv, "--no-progress"]) == 0
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if x.startswith("run") and "domain_gen" in x)
    assert "imagenet" in line and "K=16" in line
    assert line.endswith("-> imagenet_v2, imagenet_sketch, imagenet_a, imagenet_r")
    assert "episodes bongard_hoi:" in out and "clipadapt episodes bongard-hoi" in out
    assert "domain generalisation from imagenet: source missing" not in out
    # images only: the DG runs are planned, nothing is encoded
    cache = tmp_path / "cache"
    argv = [*base, "--data-root", str(dg_root), "--backbone", "world", "--partial",
            "--cache-dir", str(cache), "--out", str(tmp_path / "q.jsonl")]  # fmt: skip
    assert main([*argv, "--no-progress"]) == 0
    out = capsys.readouterr().out
    plan = [x for x in out.splitlines() if x.startswith("plan") and "domain_gen" in x]
    assert len(plan) == 1
    assert "-> imagenet_v2, imagenet_sketch, imagenet_a, imagenet_r (after encoding" in plan[0]
    for name in ("imagenet", *VARIANT_CLASSES):
        assert f"encode {name} with world" in out
    assert "dtd (world): cannot extract" in out  # the CoOp datasets absent from the root
    assert not list(cache.rglob("*.safetensors")) and not list(cache.rglob("*.pt"))
    # the source's bundle exists, the targets are not encoded yet: matched by backbone
    only = tmp_path / "only_source"
    only.mkdir()
    (only / "imagenet.safetensors").write_bytes(
        (dg_root / "feats/imagenet.safetensors").read_bytes()
    )
    assert main([*argv, "--bundle-dir", str(only), "--no-progress"]) == 0
    out = capsys.readouterr().out
    (plan,) = [x for x in out.splitlines() if x.startswith("plan") and "domain_gen" in x]
    assert plan.endswith(
        "-> imagenet_v2, imagenet_sketch, imagenet_a, imagenet_r (after encoding imagenet_v2, "
        "imagenet_sketch, imagenet_a, imagenet_r)"
    )
    assert "encode imagenet with" not in out
    assert not list(cache.rglob("*.safetensors"))


def test_bongard_hoi_episodes_through_the_cli(tmp_path: Path, capsys) -> None:
    annotations, images = make_release(tmp_path / "bongard_hoi")
    episodes = tmp_path / "bongard_hoi" / "bongard_hoi_test.json"
    argv = ["episodes", "bongard-hoi", "--annotations", str(annotations), "--images",
            str(images), "--out", str(episodes)]  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "wrote 7 Bongard-HOI test episodes" in out and "seen_obj_unseen_act" in out
    assert main([*argv[:-2], "--out", str(tmp_path / "x.json"), "--annotations", "nope"]) == 2
    assert "nope" in capsys.readouterr().err
    # the paper profile finds the file under <data_root>/bongard_hoi/ and plans its runs
    dry = ["bench", "--profile", "paper", "--data-root", str(tmp_path), "--backbone", "world",
           "--methods", "zeroshot", "--seeds", "1", "--dry-run", "--no-progress",
           "--out", str(tmp_path / "d.jsonl")]  # fmt: skip
    assert main(dry) == 0
    assert "plan  episodes" in capsys.readouterr().out
    results = tmp_path / "hoi.jsonl"
    bench = ["bench", "--episodes", str(episodes), "--backbone", "world", "--methods",
             "linear_probe:search=false", "--seeds", "1", "--out", str(results), "--no-progress"]  # fmt: skip
    assert main(bench) == 0
    (record,) = list(read_results(results))
    assert [s["subset"] for s in record["subsets"]] == list(TEST_SPLITS)
    assert main(["report", str(results), "--out", str(tmp_path / "report")]) == 0
    table = (tmp_path / "report" / "episodes.md").read_text()
    header = table.splitlines()[0]
    for heading in ("seen act. / seen obj.", "unseen act. / seen obj.", "seen act. / unseen obj.",
                    "unseen act. / unseen obj.", "average"):  # fmt: skip
        assert heading in header
    cells = [c.strip() for c in table.splitlines()[2].split("|")[2:-1]]
    assert len(cells) == 5
    for cell, split in zip(cells, record["subsets"], strict=False):
        assert cell == f"{split['accuracy']:.1f} ± {split['ci95']:.1f} (n={split['n_episodes']})"
    assert cells[4] == f"{record['accuracy']:.1f} ± {record['ci95']:.1f} (n=7)"
    assert "± is the half-width of the 95 % confidence interval" in table


def _names(path: Path, names: list[str]) -> Path:
    path.write_text("\n".join(names) + "\n")
    return path


def test_classnames_on_bench_fit_evaluate(tmp_path: Path, capsys) -> None:
    bundle = toy_bundle(tmp_path / "feats.safetensors", classes=5, classnames=None, name="feats")
    names = _names(tmp_path / "names.txt", ["ant", "bee", "cat", "dog", "eel"])
    wrong = _names(tmp_path / "four.txt", ["ant", "bee", "cat", "dog"])
    out = tmp_path / "r.jsonl"
    run = ["bench", "--bundle", str(bundle), "--methods", "zeroshot", "--shots", "1",
           "--seeds", "1", "--out", str(out), "--no-progress"]  # fmt: skip
    assert main(run) == 0
    assert main([*run, "--classnames", str(names)]) == 0
    first, second = list(read_results(out))  # other names: another run, not resumed as the same
    assert first["run_id"] != second["run_id"]
    sweep = json.loads(Path(f"{out}.sweep.json").read_text())
    assert ["ant", "bee", "cat", "dog", "eel"] in sweep["classnames"].values()
    assert main([*run, "--classnames", str(names)]) == 0
    assert len(list(read_results(out))) == 2  # the same names: resumed
    capsys.readouterr()
    assert main([*run, "--classnames", str(wrong)]) == 2
    err = capsys.readouterr().err
    assert "four.txt has 4 class names but 5 are needed" in err
    # fit / evaluate
    adapter = tmp_path / "adapter"
    fit = ["fit", "--bundle", str(bundle), "--method", "zeroshot", "--shots", "2", "--out",
           str(adapter)]  # fmt: skip
    assert main([*fit, "--classnames", str(wrong)]) == 2
    assert "four.txt has 4 class names but 5 are needed" in capsys.readouterr().err
    assert main([*fit, "--classnames", str(names)]) == 0
    saved = json.loads((adapter / "run.json").read_text())
    assert saved["classnames"] == ["ant", "bee", "cat", "dog", "eel"]
    evaluate = ["evaluate", "--adapter", str(adapter), "--bundle", str(bundle)]
    assert main([*evaluate, "--classnames", str(names)]) == 0
    capsys.readouterr()
    assert main(evaluate) == 2  # class_0 ... are not the names it was fitted on
    assert "ant" in capsys.readouterr().err


def test_classnames_on_import(tmp_path: Path, capsys) -> None:
    gen = torch.Generator().manual_seed(0)
    np.save(tmp_path / "x.npy", torch.randn(6, 8, generator=gen).numpy())
    np.save(tmp_path / "y.npy", np.array([0, 1, 2, 0, 1, 2]))
    np.save(tmp_path / "t.npy", torch.randn(3, 8, generator=gen).numpy())
    wnids = imagenet_wnids()[:3]
    coop = tmp_path / "classnames.txt"  # CoOp's '<wnid> <name>' lines; ImageNet repeats names
    coop.write_text(f"{wnids[0]} tench\n{wnids[1]} crane\n{wnids[2]} crane\n")
    out = tmp_path / "b.safetensors"
    base = ["import", "arrays", "--group", "test", str(tmp_path / "x.npy"),
            str(tmp_path / "y.npy"), "--text-features", str(tmp_path / "t.npy"), "--out", str(out)]  # fmt: skip
    assert main([*base, "--classnames", str(coop)]) == 0
    assert load_bundle(out).classnames == ["tench", "crane", "crane"]
    two = _names(tmp_path / "two.txt", ["a", "b"])
    capsys.readouterr()
    assert main([*base, "--classnames", str(two)]) == 2
    err = capsys.readouterr().err
    assert "two.txt has 2 class names but the text features" in err and "have 3 classes" in err
