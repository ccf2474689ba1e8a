"""Prompt templates, ensembles, CuPL description files and negative prompts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES, SIMPLE_IMAGENET_TEMPLATES

from clipadapt.data.datasets import DATASETS, ImageDataset
from clipadapt.data.prompts import (
    DEFAULT_NEGATIVE_TEMPLATE,
    ENSEMBLES,
    TEMPLATES,
    class_prompts,
    format_prompt,
    load_descriptions,
    negative_prompts,
    resolve_templates,
)
from clipadapt.exceptions import ConfigError, DatasetError

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
META = DATA / "meta"
# String counts per file from ../shared/data/README.md ("cupl/*.json" bullet).
CUPL_COUNTS = {
    "caltech101": 3408,
    "oxford_flowers": 3045,
    "oxford_pets": 1314,
    "fgvc_aircraft": 2000,
    "ucf101": 1824,
    "dtd": 2820,
}


def _classnames(name: str) -> list[str]:
    return (META / "classnames" / f"{name}.txt").read_text(encoding="utf-8").splitlines()


def _dataset(template: str = "{} texture.", templates: list[str] | None = None) -> ImageDataset:
    return ImageDataset("toy", Path("."), ["a", "b"], {"train": []}, template, templates or [])


def test_templates_cover_the_registered_datasets():
    assert set(TEMPLATES) == set(DATASETS)
    assert TEMPLATES["dtd"] == "{} texture."
    assert TEMPLATES["eurosat"] == "a centered satellite photo of {}."
    assert TEMPLATES["food101"] == "a photo of {}, a type of food."
    assert all(spec.template == TEMPLATES[key] for key, spec in DATASETS.items())


def test_ensembles_come_from_open_clip():
    assert ENSEMBLES["imagenet7"] == [t("{}") for t in SIMPLE_IMAGENET_TEMPLATES]
    assert ENSEMBLES["imagenet7"][0] == "itap of a {}."
    assert ENSEMBLES["imagenet80"] == [t("{}") for t in OPENAI_IMAGENET_TEMPLATES]
    assert len(ENSEMBLES["imagenet80"]) == 80
    assert resolve_templates("imagenet80") == ENSEMBLES["imagenet80"]


def test_resolve_templates_forms(tmp_path):
    ds = _dataset(templates=["{} texture.", "a photo of a {} texture."])
    assert resolve_templates(None) == ["a photo of a {}."]
    assert resolve_templates(None, ds) == ["{} texture.", "a photo of a {} texture."]
    assert resolve_templates("single", ds) == ["{} texture."]
    assert resolve_templates("dtd") == ["{} texture."]
    both = resolve_templates("imagenet7+single")
    assert len(both) == 8 and both[-1] == "a photo of a {}."
    assert resolve_templates("a sketch of a {}.") == ["a sketch of a {}."]
    assert resolve_templates(["x {}", "y {}", "x {}"]) == ["x {}", "y {}"]
    txt = tmp_path / "t.txt"
    txt.write_text("# mine\nfirst {}\n\nsecond {}\n")
    assert resolve_templates(str(txt)) == ["first {}", "second {}"]
    js = tmp_path / "t.json"
    js.write_text(json.dumps(["one {}"]))
    assert resolve_templates(str(js)) == ["one {}"]


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("imagenet9", "unknown template set 'imagenet9'.*imagenet7"),
        ("a photo of {} and {}", "exactly one"),
        (["no placeholder"], r"templates\[0\].*exactly one"),
        ("missing/file.txt", "does not exist"),
        ([], "empty"),
    ],
)
def test_resolve_templates_errors(spec, message):
    with pytest.raises(ConfigError, match=message):
        resolve_templates(spec)


def test_format_and_class_prompts():
    assert format_prompt("a photo of a {}, a type of pet.", "american_pit_bull_terrier") == (
        "a photo of a american pit bull terrier, a type of pet."
    )
    prompts = class_prompts(["sea_lion", "cat"], ["a {}.", "the {}!"])
    assert prompts == [["a sea lion.", "the sea lion!"], ["a cat.", "the cat!"]]


def test_negative_prompts():
    assert DEFAULT_NEGATIVE_TEMPLATE == "a photo of no {}."
    assert negative_prompts(["golden_retriever"]) == ["a photo of no golden retriever."]
    assert negative_prompts(["cat"], "not a {}.") == ["not a cat."]
    with pytest.raises(ConfigError, match="negative template"):
        negative_prompts(["cat"], "no placeholder")


def _write(tmp_path: Path, data: object) -> Path:
    path = tmp_path / "desc.json"
    path.write_text(json.dumps(data) if not isinstance(data, str) else data)
    return path


def test_descriptions_match_by_normalised_name(tmp_path):
    path = _write(tmp_path, {"Sea  Lion": ["s1", "s2"], "cat": " only one "})
    assert load_descriptions(path, ["cat", "sea_lion"]) == [["only one"], ["s1", "s2"]]
    assert load_descriptions(path, ["x", "y"], match="position") == [["s1", "s2"], ["only one"]]


def test_descriptions_unknown_and_missing_classes(tmp_path):
    path = _write(tmp_path, {"cat": ["c"], "zebra": ["z"]})
    with pytest.raises(DatasetError) as info:
        load_descriptions(path, ["cat", "dog"])
    message = str(info.value)
    assert "the dataset lacks: 'zebra'" in message
    assert "without descriptions: 'dog'" in message
    assert 'match="position"' in message  # counts agree, so position matching is suggested
    with pytest.raises(DatasetError) as info:
        load_descriptions(path, ["cat", "dog", "cow"])
    assert "position" not in str(info.value)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ({"cat": [], "dog": ["d"]}, "empty description list.*'cat'"),
        ({"cat": ["c", 3], "dog": ["d"]}, "must be a list of strings"),
        ("{not json", "not valid JSON"),
        (["cat"], "expected a JSON object"),
        ({"Cat": ["a"], "cat": ["b"]}, "same class name"),
    ],
)
def test_description_file_errors(tmp_path, content, message):
    path = _write(tmp_path, content)
    with pytest.raises(DatasetError, match=message):
        load_descriptions(path, ["cat", "dog"])


def test_description_position_needs_equal_counts(tmp_path):
    path = _write(tmp_path, {"cat": ["c"]})
    with pytest.raises(DatasetError, match="1 classes in the file but 2"):
        load_descriptions(path, ["cat", "dog"], match="position")
    with pytest.raises(DatasetError, match="does not exist"):
        load_descriptions(tmp_path / "absent.json", ["cat"])
    with pytest.raises(ConfigError, match="match must be"):
        load_descriptions(path, ["cat"], match="fuzzy")  # type: ignore[arg-type]


@pytest.mark.realdata
@pytest.mark.parametrize("name", sorted(CUPL_COUNTS))
def test_real_cupl_files_match_by_name(name):
    path = META / "cupl" / f"{name}.json"
    if not path.is_file():
        pytest.skip("../shared/data is absent")
    classnames = _classnames(name)
    by_name = load_descriptions(path, classnames)
    assert len(by_name) == len(classnames)
    assert sum(len(d) for d in by_name) == CUPL_COUNTS[name]
    assert by_name == load_descriptions(path, classnames, match="position")


@pytest.mark.realdata
def test_real_imagenet_cupl_needs_position_matching():
    path = META / "cupl" / "imagenet.json"
    if not path.is_file():
        pytest.skip("../shared/data is absent")
    classnames = _classnames("imagenet")
    with pytest.raises(DatasetError, match=r"duplicate class names \('missile', 'sunglasses'\)"):
        load_descriptions(path, classnames)
    descriptions = load_descriptions(path, classnames, match="position")
    assert len(descriptions) == 1000
    assert sum(len(d) for d in descriptions) == 23700
    assert "tench" in descriptions[0][0].lower()


@pytest.mark.realdata
def test_real_split_classnames_match_cupl():
    from clipadapt.data.datasets import read_split_file

    split = META / "splits" / "split_zhou_OxfordPets.json"
    if not split.is_file():
        pytest.skip("../shared/data is absent")
    spec = DATASETS["oxford_pets"]
    ds = read_split_file(split, "images", check_files=False, expected=spec, template=spec.template)
    assert ds.classnames[1] == "american_bulldog"
    descriptions = load_descriptions(META / "cupl" / "oxford_pets.json", ds.classnames)
    assert sum("bulldog" in sentence.lower() for sentence in descriptions[1]) >= 30
    prompts = class_prompts(ds.classnames, ds.templates)
    assert prompts[1] == ["a photo of a american bulldog, a type of pet."]
