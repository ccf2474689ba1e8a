"""ImageNet-V2/-Sketch/-A/-R in their release layouts, and domain generalisation onto them.

Miniature trees in the exact layouts (a few WNID or index folders, a few world-rendered images
each) stand in for the releases; extraction runs with the embedded ``world`` backbone through
``features.extract`` and DG through ``tasks.domain_generalization``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from clipadapt.data.bundle import FeatureBundle, load_bundle, save_bundle
from clipadapt.data.datasets import ImageDataset, load_dataset
from clipadapt.data.imagenet_variants import (
    VARIANTS,
    bundle_metadata,
    find_variant,
    imagenet_indices,
    imagenet_wnids,
    list_imagenet_variants,
    load_imagenet_variant,
    read_imagenet_classnames,
    register_imagenet_variants,
    subset_wnids,
)
from clipadapt.exceptions import ConfigError, DatasetError
from clipadapt.methods.base import create_method
from clipadapt.tasks.domain_generalization import class_mapping, evaluate_dg, subset_accuracy
from world_images import world_image

# Four ImageNet classes (index: WNID, ImageNet name), looked up by hand in the ILSVRC 2012 class
# list: 0 tench (in neither A nor R), 1 goldfish (R only), 6 stingray (A and R), 15 robin (A
# only). In the miniature world they are drawn as the concepts on the right.
TENCH, GOLDFISH, STINGRAY, ROBIN = "n01440764", "n01443537", "n01498041", "n01558993"
CONCEPTS = {
    TENCH: ("circle", "red"),
    GOLDFISH: ("square", "blue"),
    STINGRAY: ("triangle", "green"),
    ROBIN: ("star", "yellow"),
}


def names_file(path: Path) -> Path:
    """CoOp's classnames.txt layout: ``<wnid> <name>`` for all 1000 classes (our four named
    after their world concept, the rest ``class <i>``)."""
    lines = []
    for i, wnid in enumerate(imagenet_wnids()):
        shape, colour = CONCEPTS.get(wnid, (f"{i}", "class"))
        lines.append(f"{wnid} {colour} {shape}")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


def variant_tree(data_root: Path, key: str, wnids: list[str], per_class: int = 3, **kw) -> Path:
    """``<data_root>/<folder>/<image dir>/<class folder>/<images>`` plus classnames.txt."""
    spec = VARIANTS[key]
    root = data_root / spec.folder
    image_dir = root / kw.get("image_dir", spec.image_dirs[0])
    index = dict(zip(imagenet_wnids(), range(1000), strict=True))
    for wnid in wnids:
        folder = str(index[wnid]) if spec.layout == "index" else wnid
        shape, colour = CONCEPTS[wnid]
        for i in range(per_class):
            ext = kw.get("ext", ".png")
            world_image(image_dir / folder / f"{key}_{i}{ext}", shape, colour, f"{key}{i}")
    if kw.get("names", True):
        names_file(root / "classnames.txt")
    (image_dir / "README.txt").write_text("release notes, not a class folder\n")
    return root


def imagenet_tree(data_root: Path, wnids: list[str], per_class: int = 4) -> Path:
    """CoOp's ImageNet layout: images/train/<wnid>, images/val/<wnid>, classnames.txt."""
    root = data_root / "imagenet"
    for wnid in wnids:
        shape, colour = CONCEPTS[wnid]
        for split in ("train", "val"):
            for i in range(per_class):
                world_image(
                    root / "images" / split / wnid / f"{i}.JPEG", shape, colour, split + str(i)
                )
    names_file(root / "classnames.txt")
    return root


# ------------------------------------------------------------------------------- the lists


def test_shipped_wnid_lists() -> None:
    wnids = imagenet_wnids()
    assert len(wnids) == 1000 == len(set(wnids)) and wnids == sorted(wnids)
    assert (wnids[0], wnids[1], wnids[999]) == (TENCH, GOLDFISH, "n15075141")
    for key in ("imagenet_a", "imagenet_r"):
        subset = subset_wnids(key)
        assert len(subset) == 200 == len(set(subset)) and subset == sorted(subset)
        assert set(subset) <= set(wnids)
    # hand-checked ImageNet indices: A starts stingray 6, goldfinch 11, junco 13, robin 15,
    # jay 17; R starts goldfish 1, great white shark 2, hammerhead 4
    assert imagenet_indices(subset_wnids("imagenet_a")[:5]) == [6, 11, 13, 15, 17]
    assert imagenet_indices(subset_wnids("imagenet_r")[:3]) == [1, 2, 4]
    assert subset_wnids("imagenet_sketch") == wnids
    with pytest.raises(ConfigError, match="n99999999"):
        imagenet_indices(["n99999999"])


def test_registry_and_names() -> None:
    assert list_imagenet_variants() == [
        "imagenet_v2",
        "imagenet_sketch",
        "imagenet_a",
        "imagenet_r",
    ]
    assert find_variant("ImageNet-A") is VARIANTS["imagenet_a"]
    assert find_variant("imagenetv2") is VARIANTS["imagenet_v2"]
    assert find_variant("dtd") is None
    table: dict = {"dtd": object()}
    assert set(register_imagenet_variants(table)) == {"dtd", *VARIANTS}
    with pytest.raises(ConfigError, match="imagenet_a"):
        register_imagenet_variants({"imagenet_a": object()})


# ------------------------------------------------------------------------------- loading


def test_imagenet_a_tree_labels_and_mapping(tmp_path: Path) -> None:
    variant_tree(tmp_path, "imagenet_a", [ROBIN, STINGRAY], per_class=2)
    ds = load_imagenet_variant("imagenet_a", tmp_path, check_counts=False)
    assert isinstance(ds, ImageDataset) and ds.name == "imagenet_a"
    assert set(ds.splits) == {"test"} and len(ds.split("test")) == 4  # README.txt ignored
    # classes in ImageNet order, label = rank of the folder, names from classnames.txt
    assert ds.classnames == ["green triangle", "yellow star"]
    assert ds.labels("test").tolist() == [0, 0, 1, 1]
    assert ds.metadata["wnids"] == [STINGRAY, ROBIN]
    assert ds.metadata["imagenet_classes"] == [6, 15]
    assert ds.template == "a photo of a {}."
    meta = bundle_metadata(ds)
    assert json.loads(meta["wnids"]) == [STINGRAY, ROBIN]
    assert json.loads(meta["imagenet_classes"]) == [6, 15]
    assert ds.metadata["bundle_metadata"] == meta
    # the complete release is required unless asked otherwise
    with pytest.raises(
        DatasetError, match=r"2 class folders \(expected 200; missing e.g. n01531178"
    ):
        load_imagenet_variant("imagenet_a", tmp_path)
    with pytest.raises(DatasetError, match="imagenet-rendition does not exist"):
        load_imagenet_variant("imagenet_r", tmp_path, check_counts=False)


def test_a_refuses_a_class_outside_its_200(tmp_path: Path) -> None:
    variant_tree(tmp_path, "imagenet_a", [TENCH, ROBIN], per_class=1)
    with pytest.raises(DatasetError, match=f"{TENCH} are not among ImageNet-A's 200"):
        load_imagenet_variant("imagenet_a", tmp_path, check_counts=False)


def test_v2_index_folders_sorted_numerically(tmp_path: Path) -> None:
    root = variant_tree(
        tmp_path, "imagenet_v2", [STINGRAY, ROBIN, GOLDFISH], per_class=1, ext=".jpeg"
    )
    ds = load_imagenet_variant("imagenet_v2", tmp_path, check_counts=False)
    # folders "1", "15", "6": numeric order 1, 6, 15 (not the string order 1, 15, 6)
    assert ds.metadata["imagenet_classes"] == [1, 6, 15]
    assert ds.classnames == ["blue square", "green triangle", "yellow star"]
    assert [p.parent.name for p in ds.paths("test")] == ["1", "6", "15"]
    (root / "imagenetv2-matched-frequency-format-val" / "1000").mkdir()
    with pytest.raises(DatasetError, match="1000 are not ImageNet class indices"):
        load_imagenet_variant("imagenet_v2", tmp_path, check_counts=False)


def test_sketch_archive_folder_and_imagenet_classnames_fallback(tmp_path: Path) -> None:
    variant_tree(tmp_path, "imagenet_sketch", [TENCH], per_class=2, image_dir="sketch", names=False)
    with pytest.raises(DatasetError, match="classnames.txt"):
        load_imagenet_variant("imagenet_sketch", tmp_path, check_counts=False)
    names_file(tmp_path / "imagenet" / "classnames.txt")
    ds = load_imagenet_variant("ImageNet-Sketch", tmp_path, check_counts=False)
    assert ds.classnames == ["red circle"] and len(ds.split("test")) == 2
    # a plain list of 1000 names in class-index order works as well
    plain = tmp_path / "names.txt"
    plain.write_text("\n".join(f"name {i}" for i in range(1000)) + "\n")
    ds = load_imagenet_variant(
        "imagenet_sketch", tmp_path, classnames_file=plain, check_counts=False
    )
    assert ds.classnames == ["name 0"]
    plain.write_text("only\ntwo\n")
    with pytest.raises(DatasetError, match="2 class names, expected 1000"):
        read_imagenet_classnames(plain)


def test_layout_errors_name_the_fix(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="imagenet-rendition does not exist.*imagenet-r/"):
        load_imagenet_variant("imagenet_r", tmp_path)
    (tmp_path / "imagenet-rendition" / "imagenet-r" / GOLDFISH).mkdir(parents=True)
    names_file(tmp_path / "imagenet-rendition" / "classnames.txt")
    with pytest.raises(DatasetError, match=f"contain no images: {GOLDFISH}"):
        load_imagenet_variant("imagenet_r", tmp_path, check_counts=False)
    with pytest.raises(DatasetError, match="unknown ImageNet variant"):
        load_imagenet_variant("imagenet_b", tmp_path)


# ------------------------------------------------------------------------------- DG end to end


@pytest.fixture(scope="module")
def world_encoder():
    from clipadapt.encoders.clip import ClipEncoder, resolve_backbone

    return ClipEncoder(resolve_backbone("world"), device="cpu")


def _extract(dataset: ImageDataset, encoder, out: Path) -> Path:
    from clipadapt.features.extract import extract_dataset

    extract_dataset(
        dataset, encoder, out, cache_dir=out.parent / "cache", views=0, num_workers=0,
        progress=False,
    )  # fmt: skip
    return out


@pytest.fixture(scope="module")
def dg_bundles(tmp_path_factory: pytest.TempPathFactory, world_encoder) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("dg_data")
    out = root / "feats"
    imagenet_tree(root, [TENCH, GOLDFISH, STINGRAY, ROBIN])
    variant_tree(root, "imagenet_a", [STINGRAY, ROBIN], per_class=4)
    variant_tree(root, "imagenet_r", [GOLDFISH, STINGRAY], per_class=4)
    source = load_dataset("imagenet", root, check_counts=False)
    # the extraction records the source's own sorted train WNIDs by itself
    paths = {"source": _extract(source, world_encoder, out / "imagenet.safetensors")}
    # a bundle made elsewhere carries no WNIDs: the same tensors without that metadata
    plain = load_bundle(paths["source"])
    meta = {k: v for k, v in plain.metadata.items() if k not in ("wnids", "imagenet_classes")}
    paths["source_plain"] = save_bundle(out / "imagenet_plain.safetensors", plain.tensors, meta)
    for key in ("imagenet_a", "imagenet_r"):
        ds = load_imagenet_variant(key, root, check_counts=False)
        paths[key] = _extract(ds, world_encoder, out / f"{key}.safetensors")
    return paths


def test_extracted_variant_bundle_carries_its_imagenet_classes(dg_bundles) -> None:
    source = load_bundle(dg_bundles["source"])
    assert json.loads(source.metadata["wnids"]) == sorted(CONCEPTS)
    assert json.loads(source.metadata["imagenet_classes"]) == [0, 1, 6, 15]
    bundle = load_bundle(dg_bundles["imagenet_a"])
    assert bundle.name == "imagenet_a" and bundle.groups() == ["test"]
    assert bundle.classnames == ["green triangle", "yellow star"]
    assert json.loads(bundle.metadata["imagenet_classes"]) == [6, 15]
    assert json.loads(bundle.metadata["wnids"]) == [STINGRAY, ROBIN]
    assert bundle.tensor("test_labels").tolist() == [0] * 4 + [1] * 4


def test_subset_mapping_hand_computed(dg_bundles) -> None:
    source = load_bundle(dg_bundles["source"])  # sorted WNIDs: tench, goldfish, stingray, robin
    a, r = load_bundle(dg_bundles["imagenet_a"]), load_bundle(dg_bundles["imagenet_r"])
    index, rule = class_mapping(source.classnames, a, source.metadata)
    assert (index.tolist(), rule) == ([2, 3], "wnids")
    index, rule = class_mapping(source.classnames, r, source.metadata)
    assert (index.tolist(), rule) == ([1, 2], "wnids")
    # without the source's WNIDs a 4-class source falls back to the (shared) class names
    plain = load_bundle(dg_bundles["source_plain"])
    index, rule = class_mapping(plain.classnames, a, plain.metadata)
    assert (index.tolist(), rule) == ([2, 3], "names")
    # an explicit source_classes list still wins
    explicit = FeatureBundle(a.tensors, {**a.metadata, "source_classes": "[0, 1]"})
    assert class_mapping(source.classnames, explicit, source.metadata)[1] == "source_classes"
    # a target class the source lacks is named
    three = {"wnids": json.dumps([TENCH, GOLDFISH, STINGRAY])}
    with pytest.raises(ConfigError, match=f"not source classes \\(WNIDs {ROBIN}\\)"):
        class_mapping(source.classnames[:3], a, three)


def test_dg_restricts_logits_to_the_target_columns(dg_bundles) -> None:
    source = load_bundle(dg_bundles["source"])
    targets = [load_bundle(dg_bundles["imagenet_a"]), load_bundle(dg_bundles["imagenet_r"])]
    records = evaluate_dg(create_method("zeroshot"), source, targets, shots=2, seed=1)
    assert [r["dataset"] for r in records] == ["imagenet", "imagenet_a", "imagenet_r"]
    assert [r.get("class_mapping") for r in records] == [None, "wnids", "wnids"]
    assert [r["n_classes"] for r in records] == [4, 2, 2]
    # the restricted argmax by hand: zero-shot logits of the 4-way source, columns [2, 3]
    method = create_method("zeroshot").fit(source.group("train", "train"), source.text(), None)
    rows = targets[0].group("test")
    logits = method.logits(rows.features)
    by_hand = 100.0 * float((logits[:, [2, 3]].argmax(1) == rows.labels).float().mean())
    assert records[1]["accuracy"] == pytest.approx(by_hand)
    # the world model tells the two concepts apart; the wrong columns give another answer
    assert by_hand >= 75.0
    wrong = subset_accuracy(method, rows.features, rows.labels, torch.tensor([3, 2]))
    assert wrong < by_hand


def test_thousand_class_source_in_imagenet_order(dg_bundles) -> None:
    """A complete ImageNet source without WNIDs (like the real ViT-B/32 feature file): the
    target's imagenet_classes index its columns directly."""
    small = load_bundle(dg_bundles["source"])
    text = small.tensor("text_features").float()
    gen = torch.Generator().manual_seed(0)
    full = torch.nn.functional.normalize(torch.randn(1000, text.shape[1], generator=gen), dim=1)
    full[[0, 1, 6, 15]] = text  # tench, goldfish, stingray, robin at their ImageNet indices
    source = FeatureBundle(
        {
            "text_features": full,
            "train_features": full + 0.01 * torch.randn(full.shape, generator=gen),
            "train_labels": torch.arange(1000),
            "test_features": full,
            "test_labels": torch.arange(1000),
        },
        {"dataset": "imagenet", "backbone": small.backbone},
    )
    target = load_bundle(dg_bundles["imagenet_a"])
    index, rule = class_mapping(source.classnames, target, source.metadata)
    assert (index.tolist(), rule) == ([6, 15], "imagenet_classes")
    full_records = evaluate_dg(create_method("zeroshot"), source, [target], shots=1, seed=1)
    small_records = evaluate_dg(create_method("zeroshot"), small, [target], shots=1, seed=1)
    # same text rows in the two target columns -> the same restricted predictions
    assert full_records[1]["accuracy"] == pytest.approx(small_records[1]["accuracy"])


def test_paper_profile_lists_dg_cells_for_variant_bundles(dg_bundles, tmp_path: Path) -> None:
    from clipadapt.bench.resolve import resolve_sweep
    from clipadapt.bench.spec import paper_profile

    bundle_dir = tmp_path / "bundles"
    bundle_dir.mkdir()
    for name, key in (
        ("imagenet", "source"),
        ("imagenet_a", "imagenet_a"),
        ("imagenet_r", "imagenet_r"),
    ):
        (bundle_dir / f"{name}.safetensors").write_bytes(Path(dg_bundles[key]).read_bytes())
    spec = paper_profile(str(bundle_dir), methods=["zeroshot"])
    spec.seeds = [1]
    resolved = resolve_sweep(spec, progress=False)
    dg = [c for c in resolved.cells if c.task == "domain_generalization"]
    assert len(dg) == 1 and list(dg[0].targets) == ["imagenet_a", "imagenet_r"]
    assert dg[0].shots == 16
    skipped = dict(resolved.skipped)
    assert "DG target imagenet_v2" in skipped and "DG target imagenet_a" not in skipped
