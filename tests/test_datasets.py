"""Dataset readers: CoOp registry and layouts, real split files, ImageFolder splits, errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from clipadapt.data import datasets as ds_module
from clipadapt.data.datasets import (
    DATASETS,
    IMAGE_EXTENSIONS,
    get_dataset_spec,
    list_datasets,
    load_dataset,
    make_imagefolder_split,
    read_split_file,
)
from clipadapt.exceptions import ConfigError, DatasetError

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
SPLITS = DATA / "meta" / "splits"
REAL_SPLITS = {
    "caltech101": ("split_zhou_Caltech101.json", 100, (4128, 1649, 2465)),
    "dtd": ("split_zhou_DescribableTextures.json", 47, (2820, 1128, 1692)),
    "oxford_pets": ("split_zhou_OxfordPets.json", 37, (2944, 736, 3669)),
}


def _real_split(name: str) -> Path:
    path = SPLITS / REAL_SPLITS[name][0]
    if not path.is_file():
        pytest.skip("../shared/data is absent")
    return path


def _touch(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")


def _tree(root: Path, sizes: dict[str, int], ext: str = ".jpg") -> Path:
    for classname, n in sizes.items():
        for i in range(n):
            _touch(root / classname / f"img_{i:03d}{ext}")
    return root


def _write_split(path: Path, split: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(split))
    return path


# ---------------------------------------------------------------------------------- registry


def test_packaged_tables_are_listed_in_package_data():
    """The dataset table and the templates are data files: an install must ship them."""
    import fnmatch
    import tomllib

    repo = Path(__file__).resolve().parents[1]
    package = repo / "src" / "clipadapt"
    config = tomllib.loads((repo / "pyproject.toml").read_text(encoding="utf-8"))
    patterns = config["tool"]["setuptools"]["package-data"]["clipadapt"]
    data_files = [
        p.relative_to(package).as_posix()
        for p in package.rglob("*")
        if p.is_file() and p.suffix not in (".py", ".pyc") and "__pycache__" not in p.parts
    ]
    assert "data/datasets.yaml" in data_files and "data/templates.yaml" in data_files
    unlisted = [f for f in data_files if not any(fnmatch.fnmatch(f, pat) for pat in patterns)]
    assert not unlisted, f"add these to [tool.setuptools.package-data]: {unlisted}"


def test_registry_has_the_eleven_coop_datasets():
    assert list_datasets() == [
        "imagenet",
        "caltech101",
        "oxford_pets",
        "stanford_cars",
        "oxford_flowers",
        "food101",
        "fgvc_aircraft",
        "sun397",
        "dtd",
        "eurosat",
        "ucf101",
    ]
    assert DATASETS["dtd"].split_file == "split_zhou_DescribableTextures.json"
    assert DATASETS["caltech101"].sizes == {"train": 4128, "val": 1649, "test": 2465}
    assert DATASETS["imagenet"].sizes == {"train": 1281167, "test": 50000}
    assert DATASETS["stanford_cars"].image_dir == ""
    classes = {key: spec.num_classes for key, spec in DATASETS.items()}
    assert classes == {
        "imagenet": 1000,
        "caltech101": 100,
        "oxford_pets": 37,
        "stanford_cars": 196,
        "oxford_flowers": 102,
        "food101": 101,
        "fgvc_aircraft": 100,
        "sun397": 397,
        "dtd": 47,
        "eurosat": 10,
        "ucf101": 101,
    }


@pytest.mark.parametrize(
    ("name", "key"),
    [("fgvc", "fgvc_aircraft"), ("OxfordPets", "oxford_pets"), ("Flowers102", "oxford_flowers")],
)
def test_aliases_and_display_names(name, key):
    assert get_dataset_spec(name).key == key


def test_unknown_name_lists_known_datasets(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DatasetError, match="unknown dataset 'imagenett'.*caltech101.*ucf101"):
        load_dataset("imagenett")
    with pytest.raises(DatasetError, match="known datasets: imagenet"):
        get_dataset_spec("nope")


# -------------------------------------------------------------------------- real split files


@pytest.mark.realdata
@pytest.mark.parametrize("name", sorted(REAL_SPLITS))
def test_real_split_files(name):
    path = _real_split(name)
    _, num_classes, sizes = REAL_SPLITS[name]
    ds = read_split_file(path, "images", check_files=False, expected=DATASETS[name])
    assert ds.num_classes == num_classes
    assert tuple(ds.sizes()[s] for s in ("train", "val", "test")) == sizes
    raw = json.loads(path.read_text())
    for split in ("train", "val", "test"):
        labels = ds.labels(split)
        assert labels.tolist() == [row[1] for row in raw[split]]
        names = [item.classname for item in ds.split(split)]
        assert names == [ds.classnames[label] for label in labels.tolist()]
        assert names == [row[2] for row in raw[split]]
    assert torch.equal(torch.unique(ds.labels("train")), torch.arange(num_classes))
    reference = (DATA / "meta" / "classnames" / f"{name}.txt").read_text().splitlines()
    norm = [c.replace("_", " ").lower() for c in ds.classnames]
    assert norm == [c.replace("_", " ").lower() for c in reference]
    assert ds.split("train")[0].path.is_absolute()


@pytest.mark.realdata
def test_real_split_requires_images_unless_told():
    path = _real_split("dtd")
    with pytest.raises(DatasetError, match=r"2820 of 2820 train images .* are missing"):
        read_split_file(path, "nowhere")
    with pytest.raises(DatasetError, match=r"47 classes \(expected 100\).*Caltech101"):
        read_split_file(path, "nowhere", check_files=False, expected=DATASETS["caltech101"])


@pytest.mark.realdata
def test_coop_layout_with_real_split(tmp_path):
    """A DTD folder in the CoOp layout: the real split file plus empty image files."""
    path = _real_split("dtd")
    root = tmp_path / "dtd"
    root.mkdir()
    shutil.copy(path, root / path.name)
    raw = json.loads(path.read_text())
    for split in raw.values():
        for rel, _, _ in split:
            _touch(root / "images" / rel)
    ds = load_dataset("dtd", tmp_path)
    assert ds.name == "dtd" and ds.template == "{} texture." and ds.templates == ["{} texture."]
    assert ds.sizes() == {"train": 2820, "val": 1128, "test": 1692}
    assert ds.split_path == root / path.name
    assert all(p.is_file() for p in ds.paths("val")[:10])
    draw = ds.draw(16, seed=1)
    assert draw.train_index.numel() == 16 * 47 and draw.val_index.numel() == 4 * 47
    # a removed image is reported by count and name; allow_missing drops it
    gone = root / "images" / raw["test"][0][0]
    gone.unlink()
    with pytest.raises(DatasetError, match=f"1 of 1692 test images.*{raw['test'][0][0]}"):
        load_dataset("dtd", tmp_path)
    dropped = load_dataset("dtd", tmp_path, allow_missing=True)
    assert dropped.missing == [raw["test"][0][0]]
    assert dropped.sizes()["test"] == 1691


# ------------------------------------------------------------------------------ CoOp layouts


def test_missing_coop_split_file_is_not_regenerated(tmp_path):
    _tree(tmp_path / "caltech-101" / "101_ObjectCategories", {"a": 3, "b": 3})
    with pytest.raises(DatasetError) as info:
        load_dataset("caltech101", tmp_path, make_split=True)
    message = str(info.value)
    assert "split_zhou_Caltech101.json does not exist" in message
    assert "does not regenerate" in message
    assert not list((tmp_path / "caltech-101").glob("*.json"))


def test_missing_coop_root_and_data_root(tmp_path, monkeypatch):
    with pytest.raises(DatasetError, match=r"dataset root .*eurosat does not exist.*eurosat/2750/"):
        load_dataset("eurosat", tmp_path)
    monkeypatch.delenv("CLIPADAPT_DATA_ROOT", raising=False)
    with pytest.raises(DatasetError, match="pass data_root"):
        load_dataset("eurosat")
    monkeypatch.setenv("CLIPADAPT_DATA_ROOT", str(tmp_path))
    with pytest.raises(DatasetError, match="dataset root"):
        load_dataset("eurosat")


def test_coop_counts_are_checked(tmp_path):
    root = tmp_path / "eurosat"
    _tree(root / "2750", {"Forest": 2, "River": 2})
    split = {
        "train": [["Forest/img_000.jpg", 0, "Forest"], ["River/img_000.jpg", 1, "River"]],
        "val": [["Forest/img_001.jpg", 0, "Forest"]],
        "test": [["River/img_001.jpg", 1, "River"]],
    }
    _write_split(root / "split_zhou_EuroSAT.json", split)
    with pytest.raises(DatasetError, match=r"2 classes \(expected 10\).*check_counts=False"):
        load_dataset("eurosat", tmp_path)
    ds = load_dataset("eurosat", tmp_path, check_counts=False)
    assert ds.classnames == ["Forest", "River"]
    assert ds.template == "a centered satellite photo of {}."
    custom = _write_split(tmp_path / "elsewhere.json", split)
    assert (
        load_dataset("eurosat", tmp_path, split_file=custom, check_counts=False).split_path
        == custom
    )


def test_fgvc_txt_layout(tmp_path):
    root = tmp_path / "fgvc_aircraft"
    root.mkdir()
    (root / "variants.txt").write_text("707-320\nA300B4\nDC-3\n")
    rows = {
        "train": ["0001 707-320", "0002 A300B4", "0003 DC-3", "0004 DC-3"],
        "val": ["0005 707-320"],
        "test": ["0006 A300B4", ""],
    }
    for split, lines in rows.items():
        (root / f"images_variant_{split}.txt").write_text("\n".join(lines) + "\n")
    for i in range(1, 7):
        _touch(root / "images" / f"{i:04d}.jpg")
    ds = load_dataset("fgvc", tmp_path, check_counts=False)
    assert ds.classnames == ["707-320", "A300B4", "DC-3"]
    assert ds.labels("train").tolist() == [0, 1, 2, 2]
    assert ds.split("test")[0].path == root / "images" / "0006.jpg"
    assert ds.template == "a photo of a {}, a type of aircraft."
    (root / "images_variant_val.txt").write_text("0005 Concorde\n")
    with pytest.raises(DatasetError, match=r"line 1: variant 'Concorde' is not in .*variants.txt"):
        load_dataset("fgvc_aircraft", tmp_path, check_counts=False)
    (root / "images_variant_val.txt").unlink()
    with pytest.raises(DatasetError, match="images_variant_val.txt does not exist"):
        load_dataset("fgvc_aircraft", tmp_path, check_counts=False)


def test_imagenet_folder_layout(tmp_path):
    root = tmp_path / "imagenet"
    wnids = ["n02", "n01", "n03"]
    (root).mkdir()
    (root / "classnames.txt").write_text("n01 tench\nn02 great white shark\nn03 missile\n")
    for wnid in wnids:
        _tree(root / "images" / "train", {wnid: 6})
        _tree(root / "images" / "val", {wnid: 2}, ext=".JPEG")
    (root / "images" / "train" / "n01" / "notes.txt").write_text("not an image")
    ds = load_dataset("imagenet", tmp_path, check_counts=False)
    assert ds.classnames == ["tench", "great white shark", "missile"]
    assert set(ds.splits) == {"train", "test"}
    assert ds.sizes() == {"train": 18, "test": 6}
    draw = ds.draw(2, seed=1)
    assert draw.val_source == "train"  # no val split: carved from unused train images
    assert not set(draw.train_index.tolist()) & set(draw.val_index.tolist())
    with pytest.raises(DatasetError, match=r"18 train images \(expected 1281167\)"):
        load_dataset("imagenet", tmp_path)
    (root / "classnames.txt").write_text("n01 tench\n")
    with pytest.raises(DatasetError, match=r"2 class folder\(s\) .* have no line in"):
        load_dataset("imagenet", tmp_path, check_counts=False)


# ---------------------------------------------------------------------------- ImageFolder


def test_imagefolder_split_is_deterministic_and_saved(tmp_path):
    sizes = {"cat": 10, "dog": 7, "sea_lion": 3}
    first = _tree(tmp_path / "one", sizes)
    second = _tree(tmp_path / "two", sizes)
    a = load_dataset(first)
    load_dataset(second)
    saved_at = ds_module.split_path_for(first)
    # the split is kept beside the cache, never written into the user's image tree
    assert not (first / "split.json").exists() and not (second / "split.json").exists()
    assert saved_at.read_text() == ds_module.split_path_for(second).read_text()
    assert a.sizes() == {"train": 10, "val": 4, "test": 6}  # per class round-half-up
    assert a.classnames == ["cat", "dog", "sea_lion"] and a.name == "one"
    assert a.split_path == saved_at
    assert a.fingerprint() == load_dataset(second).fingerprint()  # independent of location
    _touch(first / "cat" / "img_999.jpg")
    with pytest.raises(DatasetError, match="no longer matches the folder: 1 image.*--resplit"):
        load_dataset(first)
    assert load_dataset(first, resplit=True).fingerprint() != a.fingerprint()
    (first / "cat" / "img_999.jpg").unlink()
    assert load_dataset(first, resplit=True).fingerprint() == a.fingerprint()
    other = make_imagefolder_split(first, seed=1)
    saved = json.loads(saved_at.read_text())
    assert other != {k: saved[k] for k in ("train", "val", "test")}
    # the saved split is reused: a new seed does not change an existing split
    again = load_dataset(first, split_seed=7)
    assert [i.path for i in again.split("test")] == [i.path for i in a.split("test")]
    assert set(saved) == {"train", "val", "test", "clipadapt"}
    assert saved["clipadapt"]["made_by"] == "make_imagefolder_split"
    assert saved["train"][0] == ["cat/" + Path(saved["train"][0][0]).name, 0, "cat"]


def test_imagefolder_split_ignores_listing_order(tmp_path, monkeypatch):
    root = _tree(tmp_path / "tree", {"b": 9, "a": 6})
    _touch(root / "a" / "sub" / "x.png")
    expected = make_imagefolder_split(root, seed=3)
    real_walk, real_iterdir = ds_module.os.walk, Path.iterdir

    def reversed_walk(top, **kwargs):
        for dirpath, dirnames, filenames in real_walk(top, **kwargs):
            dirnames.reverse()
            yield dirpath, dirnames, filenames[::-1]

    monkeypatch.setattr(ds_module.os, "walk", reversed_walk)
    monkeypatch.setattr(Path, "iterdir", lambda self: iter(sorted(real_iterdir(self))[::-1]))
    assert make_imagefolder_split(root, seed=3) == expected


def test_imagefolder_split_per_class_and_extensions(tmp_path):
    root = tmp_path / "tree"
    exts = sorted(IMAGE_EXTENSIONS)
    for i, ext in enumerate(exts):
        _touch(root / "mixed" / f"{i}{ext.upper() if i % 2 else ext}")
    _touch(root / "mixed" / "nested" / "deep.png")
    _touch(root / "mixed" / ".hidden.jpg")
    (root / "mixed" / "labels.csv").write_text("x")
    _tree(root, {"single": 1, "pair": 2})
    (root / ".cache").mkdir()
    split = make_imagefolder_split(root, val_fraction=0.25, test_fraction=0.25)
    by_class: dict[str, dict[str, int]] = {}
    for name, rows in split.items():
        for _, _, classname in rows:
            by_class.setdefault(classname, {}).setdefault(name, 0)
            by_class[classname][name] += 1
    assert sum(by_class["mixed"].values()) == len(exts) + 1  # 9 images; csv and hidden skipped
    assert by_class["mixed"] == {"train": 5, "val": 2, "test": 2}
    assert by_class["single"] == {"train": 1}
    assert by_class["pair"] == {"train": 1, "test": 1}
    assert any(rel == "mixed/nested/deep.png" for rows in split.values() for rel, _, _ in rows)


def test_split_file_argument_and_cache_location(tmp_path, monkeypatch):
    root = _tree(tmp_path / "tree", {"a": 4, "b": 4})
    target = tmp_path / "splits" / "mine.json"
    ds = load_dataset(root, split_file=target)
    assert target.is_file() and not (root / "split.json").exists()
    assert ds.split_path == target
    assert load_dataset(root, split_file=target).sizes() == ds.sizes()

    # without split_file: under the cache root (a read-only tree works the same way, since
    # nothing is written into it), or under split_dir when given
    monkeypatch.setenv("CLIPADAPT_CACHE", str(tmp_path / "cache"))
    root.chmod(0o555)
    try:
        ro = load_dataset(root)
    finally:
        root.chmod(0o755)
    assert ro.split_path.parent == tmp_path / "cache" / "splits"
    assert not (root / "split.json").exists()
    assert load_dataset(root).split_path == ro.split_path  # found again on the next load
    mine = load_dataset(root, split_dir=tmp_path / "elsewhere")
    assert mine.split_path.parent == tmp_path / "elsewhere"


def test_one_cache_root_for_features_and_splits(tmp_path, monkeypatch):
    """Features and the splits of read-only folders share one documented cache root."""
    from clipadapt.features.cache import default_cache_dir

    monkeypatch.delenv("CLIPADAPT_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "clipadapt"
    assert (
        ds_module.fallback_split_path(tmp_path).parent == tmp_path / "xdg" / "clipadapt" / "splits"
    )
    monkeypatch.setenv("CLIPADAPT_CACHE", str(tmp_path / "mine"))
    assert default_cache_dir() == tmp_path / "mine"
    assert ds_module.fallback_split_path(tmp_path).parent == tmp_path / "mine" / "splits"
    monkeypatch.delenv("CLIPADAPT_CACHE")
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "clipadapt"


def test_make_split_false_requires_a_split(tmp_path):
    root = _tree(tmp_path / "tree", {"a": 2})
    with pytest.raises(DatasetError, match="has no split.json; pass make_split=True"):
        load_dataset(root, make_split=False)


def test_clipadapt_dataset_folder(tmp_path):
    root = _tree(tmp_path / "pets", {"n01": 3, "n02": 3})
    split = make_imagefolder_split(root, val_fraction=0.0, test_fraction=0.34)
    (root / "split.json").write_text(json.dumps(split))
    meta = {
        "name": "my_pets",
        "classnames": ["tabby cat", "beagle"],
        "template": "a photo of a {}, a type of pet.",
        "templates": "imagenet7",
        "domain_of": {"tabby cat": "cats"},
    }
    (root / "dataset.json").write_text(json.dumps(meta))
    (root / "descriptions.json").write_text(json.dumps({"tabby cat": ["x"], "beagle": ["y"]}))
    ds = load_dataset(str(root))
    assert ds.name == "my_pets"
    assert ds.classnames == ["tabby cat", "beagle"]
    assert {item.classname for item in ds.split("train")} == {"tabby cat", "beagle"}
    assert ds.template == "a photo of a {}, a type of pet."
    assert len(ds.templates) == 7
    assert ds.descriptions == root / "descriptions.json"
    assert ds.metadata == {"domain_of": {"tabby cat": "cats"}}
    assert ds.sizes() == {"train": 4, "val": 0, "test": 2}
    assert load_dataset(root / "split.json").sizes() == ds.sizes()
    named_like_coop = _tree(tmp_path / "dtd", {"x": 2})
    assert load_dataset(named_like_coop).classnames == ["x"]  # a Path is never a registry name

    meta["templates"] = "single+imagenet7"
    (root / "dataset.json").write_text(json.dumps(meta))
    assert load_dataset(root).templates[:2] == ["a photo of a {}, a type of pet.", "itap of a {}."]
    meta["templates"] = ["no braces"]
    (root / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(DatasetError, match=r"dataset.json: 'templates'.*exactly one"):
        load_dataset(root)
    meta["templates"] = "imagenet7"
    meta["classnames"] = ["only one"]
    (root / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(DatasetError, match="2 classes in the splits but 1 class names"):
        load_dataset(root)
    meta["classnames"], meta["template"] = ["a", "b"], "no placeholder"
    (root / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(DatasetError, match=r"dataset.json: 'template'.*exactly one"):
        load_dataset(root)
    meta["template"], meta["descriptions"] = "{}", "gpt.json"
    (root / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(DatasetError, match="'gpt.json', which does not exist"):
        load_dataset(root)


# ---------------------------------------------------------------------------------- errors


def _folder_with_split(tmp_path: Path, split: object) -> Path:
    root = _tree(tmp_path / "data", {"a": 2, "b": 2, "c": 2})
    text = split if isinstance(split, str) else json.dumps(split)
    (root / "split.json").write_text(text)
    return root


def _rows(*rows: tuple) -> list[list]:
    return [list(r) for r in rows]


@pytest.mark.parametrize(
    ("split", "message"),
    [
        ('{"train": [["a/img_000.jpg", 0, "a"],', r"not valid JSON \(line 1, column"),
        ([1, 2], "expected a JSON object"),
        ({}, "has none of 'train', 'val', 'test'"),
        ({"train": [], "tests": []}, "unknown key.*'tests'"),
        ({"train": [["a/img_000.jpg", "0", "a"]]}, r"train\[0\] is .*integer label"),
        ({"train": [["a/img_000.jpg", True, "a"]]}, r"train\[0\]"),
        ({"train": [["a/img_000.jpg", -1, "a"]]}, "negative label"),
        (
            {"train": _rows(("a/img_000.jpg", 0, "a"), ("b/img_000.jpg", 0, "b"))},
            r"label 0 is called 'a' in train\[0\] but 'b' in train\[1\]",
        ),
        (
            {"train": _rows(("a/img_000.jpg", 0, "a"), ("c/img_000.jpg", 2, "c"))},
            "labels are not contiguous: no entry has label 1",
        ),
        (
            {
                "train": _rows(("a/img_000.jpg", 0, "a")),
                "test": _rows(("b/img_000.jpg", 1, "b")),
            },
            r"1 class\(es\) have zero training images: 1 \('b'\)",
        ),
        ({"train": []}, "lists no images"),
    ],
)
def test_split_file_errors(tmp_path, split, message):
    root = _folder_with_split(tmp_path, split)
    with pytest.raises(DatasetError, match=message) as info:
        load_dataset(root)
    assert "split.json" in str(info.value) or "JSON" in str(info.value)


def test_missing_images_are_counted_and_listed(tmp_path):
    rows = _rows(*[(f"a/gone_{i}.jpg", 0, "a") for i in range(7)], ("a/img_000.jpg", 0, "a"))
    root = _folder_with_split(tmp_path, {"train": rows})
    with pytest.raises(DatasetError) as info:
        load_dataset(root)
    message = str(info.value)
    assert "7 of 8 train images" in message and "a/gone_0.jpg" in message
    assert "(4 more)" in message and "allow_missing=True" in message
    ds = load_dataset(root, allow_missing=True)
    assert len(ds.missing) == 7 and ds.sizes() == {"train": 1}
    assert load_dataset(root, check_files=False).sizes() == {"train": 8}


def test_evaluation_only_dataset(tmp_path):
    rows = _rows(("a/img_000.jpg", 0, "a"), ("b/img_000.jpg", 1, "b"))
    root = _folder_with_split(tmp_path, {"train": [], "test": rows})
    ds = load_dataset(root)
    assert ds.sizes() == {"train": 0, "test": 2} and ds.classnames == ["a", "b"]
    with pytest.raises(DatasetError, match="no training images .*evaluation-only"):
        ds.draw(1, seed=1)


def test_all_images_of_a_class_missing_is_an_empty_class(tmp_path):
    rows = _rows(("a/img_000.jpg", 0, "a"), ("b/gone.jpg", 1, "b"))
    root = _folder_with_split(tmp_path, {"train": rows})
    with pytest.raises(DatasetError, match="zero training images: 1 \\('b'\\)"):
        load_dataset(root, allow_missing=True)


def test_imagefolder_errors(tmp_path):
    with pytest.raises(DatasetError, match="dataset root .*missing does not exist"):
        load_dataset(tmp_path / "missing")
    flat = tmp_path / "flat"
    _touch(flat / "x.jpg")
    with pytest.raises(DatasetError, match=r"no class folders \(found 1 images directly"):
        load_dataset(flat)
    root = _tree(tmp_path / "tree", {"a": 2})
    (root / "empty_class").mkdir()
    _touch(root / "empty_class" / "readme.txt")
    with pytest.raises(DatasetError, match=r"1 class folder\(s\) contain no images: empty_class"):
        load_dataset(root)
    assert not (root / "split.json").exists()
    with pytest.raises(ConfigError, match="sum to less than 1"):
        load_dataset(root, val_fraction=0.5, test_fraction=0.5)
    text = tmp_path / "notes.txt"
    text.write_text("x")
    with pytest.raises(DatasetError, match="is a file"):
        load_dataset(text)
