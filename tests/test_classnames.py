"""Class names from a file for bundles that have none (``--classnames FILE``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from clipadapt.data.bundle import FeatureBundle, load_bundle, save_bundle
from clipadapt.data.classnames import read_classnames, with_classnames
from clipadapt.exceptions import ConfigError


def test_one_name_per_line(tmp_path: Path) -> None:
    path = tmp_path / "names.txt"
    path.write_text("tench\n  goldfish \ngreat white shark\n\n\n", encoding="utf-8")
    assert read_classnames(path, 3) == ["tench", "goldfish", "great white shark"]
    assert read_classnames(path) == ["tench", "goldfish", "great white shark"]


def test_count_mismatch_names_both_counts_and_the_file(tmp_path: Path) -> None:
    path = tmp_path / "names.txt"
    path.write_text("a\nb\n")
    with pytest.raises(ConfigError) as info:
        read_classnames(path, 1000)
    message = str(info.value)
    assert str(path) in message and "2 class names" in message and "1000" in message


def test_bad_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        read_classnames(tmp_path / "absent.txt", 2)
    gap = tmp_path / "gap.txt"
    gap.write_text("a\n\nb\n")
    with pytest.raises(ConfigError, match="line 2 is empty"):
        read_classnames(gap, 3)
    binary = tmp_path / "bin.txt"
    binary.write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(ConfigError, match="cannot read"):
        read_classnames(binary, 1)


def test_coop_wnid_lines_drop_the_wnid(tmp_path: Path) -> None:
    path = tmp_path / "classnames.txt"
    path.write_text("n01440764 tench\nn01443537 goldfish\n")
    assert read_classnames(path, 2) == ["tench", "goldfish"]
    mixed = tmp_path / "mixed.txt"
    mixed.write_text("n01440764 tench\ngoldfish\n")  # not all WNID lines: read verbatim
    assert read_classnames(mixed, 2) == ["n01440764 tench", "goldfish"]


def test_with_classnames_gives_a_bundle_real_names(tmp_path: Path) -> None:
    tensors = {"test_features": torch.randn(4, 8), "test_labels": torch.tensor([0, 1, 2, 0])}
    path = save_bundle(tmp_path / "b.safetensors", tensors, {"dataset": "x"})
    bundle = load_bundle(path)
    assert bundle.classnames == ["class_0", "class_1", "class_2"]
    names = tmp_path / "names.txt"
    names.write_text("cat\ndog\nbird\n")
    named = with_classnames(bundle, read_classnames(names, bundle.num_classes))
    assert isinstance(named, FeatureBundle) and named.classnames == ["cat", "dog", "bird"]
    assert json.loads(named.metadata["classnames"]) == ["cat", "dog", "bird"]
    assert bundle.classnames[0] == "class_0"  # the original is unchanged
    with pytest.raises(ConfigError, match="2 class names given"):
        with_classnames(bundle, ["cat", "dog"])
