"""Import: Tip-Adapter caches and numpy arrays become validated bundles; round trips keep every
tensor; bad input is one line naming the file and the fix; nothing is unpickled."""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import clipadapt
from clipadapt.data.importers import import_arrays, import_tip_adapter
from clipadapt.exceptions import BundleError, ClipadaptError, ConfigError

C, D = 5, 16
CLASSNAMES = [f"species {i}" for i in range(C)]


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True)


def _cli(argv: list[str], capsys) -> tuple[int, str, str]:
    """``clipadapt`` with only the export/import verbs, errors handled as ``main`` does."""
    from clipadapt.cli.export_import import register_cli

    parser = argparse.ArgumentParser(prog="clipadapt")
    register_cli(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    try:
        code = args.handler(args)
    except ClipadaptError as error:
        print(f"error: {error}", file=sys.stderr)
        code = 2
    out, err = capsys.readouterr()
    return code, out, err


# ------------------------------------------------------------------ Tip-Adapter caches


def _tip_cache(directory: Path, shots=(1, 4), *, val: bool = True) -> dict[str, torch.Tensor]:
    """Files in Tip-Adapter's layout, with its dtypes: half keys/values from a half model."""
    g = torch.Generator().manual_seed(0)
    directory.mkdir(parents=True, exist_ok=True)
    made = {}
    for k in shots:
        labels = torch.arange(C).repeat_interleave(k)
        keys = _unit(torch.randn(C * k, D, generator=g)).half().T.contiguous()  # (D, N)
        values = F.one_hot(labels).half()  # (N, C)
        torch.save(keys, directory / f"keys_{k}shots.pt")
        torch.save(values, directory / f"values_{k}shots.pt")
        made[f"keys_{k}"], made[f"labels_{k}"] = keys, labels
    for split in ("val", "test") if val else ("test",):
        labels = torch.randint(0, C, (12,), generator=g)
        features = _unit(torch.randn(12, D, generator=g)).half()
        torch.save(features, directory / f"{split}_f.pt")
        torch.save(labels, directory / f"{split}_l.pt")
        made[f"{split}_f"], made[f"{split}_l"] = features, labels
    clip_weights = _unit(torch.randn(C, D, generator=g)).T.contiguous()  # (D, C), as theirs
    torch.save(clip_weights, directory / "text.pt")
    made["text"] = clip_weights
    (directory / "classes.txt").write_text("\n".join(CLASSNAMES) + "\n")
    return made


def test_tip_adapter_cache_round_trip(tmp_path, capsys) -> None:
    cache = tmp_path / "caches" / "dtd"
    made = _tip_cache(cache)
    out = tmp_path / "dtd.safetensors"
    code, stdout, err = _cli(
        [
            "import",
            "tip-adapter",
            "--cache-dir",
            str(cache),
            "--text-features",
            str(cache / "text.pt"),
            "--classnames",
            str(cache / "classes.txt"),
            "--backbone",
            "RN50",
            "--out",
            str(out),
            "--json",
            str(tmp_path / "s.json"),
        ],
        capsys,
    )
    assert code == 0, err
    bundle = clipadapt.load_bundle(out)
    t = bundle.tensors
    for k in (1, 4):
        assert torch.equal(t[f"train_{k}shot_features"], made[f"keys_{k}"].T)  # transposed
        assert t[f"train_{k}shot_features"].dtype == torch.float16
        assert torch.equal(t[f"train_{k}shot_labels"], made[f"labels_{k}"])
    for split in ("val", "test"):
        assert torch.equal(t[f"{split}_features"], made[f"{split}_f"])
        assert torch.equal(t[f"{split}_labels"], made[f"{split}_l"])
    assert torch.equal(t["text_features"], made["text"].T)
    assert bundle.classnames == CLASSNAMES and bundle.backbone == "RN50"
    assert "cache keys" in bundle.metadata["source"]
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["groups"] == {"test": 12, "train_1shot": 5, "train_4shot": 20, "val": 12}
    assert "5 classes, D=16" in stdout
    # the imported bundle runs a method as it is
    result = clipadapt.evaluate(clipadapt.create_method("tip_adapter"), bundle, shots=4)
    assert 0.0 <= result.accuracy <= 100.0 and result.n_eval == 12


def test_tip_adapter_one_k_without_val_or_text(tmp_path) -> None:
    cache = tmp_path / "imagenet"
    made = _tip_cache(cache, shots=(1, 16), val=False)
    bundle = import_tip_adapter(cache, tmp_path / "b.safetensors", shots=16)
    assert bundle.groups() == ["test", "train_16shot"]
    assert torch.equal(bundle.tensors["train_16shot_features"], made["keys_16"].T)
    assert not bundle.has_text() and bundle.classnames == [f"class_{i}" for i in range(C)]
    with pytest.raises(BundleError, match=r"no keys_8shots.pt \(K present: 1, 16\)"):
        import_tip_adapter(cache, tmp_path / "c.safetensors", shots=8)


class _Payload:
    """Unpickling this would create a marker file: the importers must never unpickle."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (
            lambda d: torch.save(_Payload(d / "pwned"), d / "keys_4shots.pt"),
            r"keys_4shots.pt: refused by weights-only loading .*never unpickles",
        ),
        (
            lambda d: torch.save({"keys": torch.zeros(D, 20)}, d / "keys_4shots.pt"),
            r"keys_4shots.pt: holds a dict, not a tensor",
        ),
        (
            lambda d: torch.save(torch.full((20, C), 0.2).half(), d / "values_4shots.pt"),
            r"values_4shots.pt: \(N, C\) labels must be one-hot .*row 0",
        ),
        (
            lambda d: torch.save(torch.zeros(20, D).half(), d / "keys_4shots.pt"),
            r"keys_4shots.pt: expected \(D, 20\) keys .*got \(20, 16\); it looks like \(N, D\)",
        ),
        (lambda d: (d / "values_4shots.pt").unlink(), r"values_4shots.pt: missing"),
        (lambda d: (d / "val_l.pt").unlink(), r"val_l.pt: missing"),
        (
            lambda d: torch.save(torch.zeros(12, D + 1).half(), d / "test_f.pt"),
            r"test_f.pt: feature width 17 differs from the cache keys' 16",
        ),
        (
            lambda d: torch.save(torch.full((12,), 7), d / "test_l.pt"),
            r"test_l.pt: label 7 is out of range for 5 classes",
        ),
    ],
)
def test_tip_adapter_bad_caches_fail_on_one_line(tmp_path, capsys, mutate, message) -> None:
    cache = tmp_path / "cache"
    _tip_cache(cache, shots=(4,))
    mutate(cache)
    out = tmp_path / "b.safetensors"
    code, _, err = _cli(
        ["import", "tip-adapter", "--cache-dir", str(cache), "--out", str(out)], capsys
    )
    assert code == 2
    assert len(err.strip().splitlines()) == 1, err
    assert re.search(message, err), err
    assert not out.exists() and not (cache / "pwned").exists()


def test_tip_adapter_empty_folder(tmp_path) -> None:
    with pytest.raises(BundleError, match=r"no Tip-Adapter cache here \(expected keys_"):
        import_tip_adapter(tmp_path, tmp_path / "b.safetensors")


def test_tip_adapter_text_features_of_the_wrong_width(tmp_path) -> None:
    cache = tmp_path / "cache"
    _tip_cache(cache, shots=(4,))
    torch.save(torch.randn(D + 2, C), cache / "bad_text.pt")
    with pytest.raises(BundleError, match=r"bad_text.pt: .* \(18, 5\) have no side of width 16"):
        import_tip_adapter(cache, tmp_path / "b.safetensors", text_features=cache / "bad_text.pt")
    torch.save(torch.randn(D, C + 1), cache / "six.pt")
    with pytest.raises(
        BundleError, match=r"six.pt: 6 classes, but the one-hot values .* 5 columns"
    ):
        import_tip_adapter(cache, tmp_path / "b.safetensors", text_features=cache / "six.pt")
    assert not (tmp_path / "b.safetensors").exists()


# ------------------------------------------------------------------ numpy arrays


def _arrays(directory: Path) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    directory.mkdir(parents=True, exist_ok=True)
    made = {
        "train_x": rng.normal(size=(20, D)),  # float64: stored as float32
        "train_y": np.repeat(np.arange(C), 4),
        "test_x": rng.normal(size=(10, D)).astype(np.float32),
        "test_y": rng.integers(0, C, 10),
        "text": rng.normal(size=(C, D)).astype(np.float32),
    }
    for name, value in made.items():
        np.save(directory / f"{name}.npy", value)
    (directory / "names.json").write_text(json.dumps(CLASSNAMES))
    return made


def test_npy_arrays_round_trip(tmp_path, capsys) -> None:
    made = _arrays(tmp_path)
    one_hot = np.eye(C, dtype=np.float32)[made["test_y"]]
    np.save(tmp_path / "test_onehot.npy", one_hot)
    out = tmp_path / "mine.safetensors"
    code, _, err = _cli(
        [
            "import",
            "arrays",
            "--group",
            "train",
            str(tmp_path / "train_x.npy"),
            str(tmp_path / "train_y.npy"),
            "--group",
            "test",
            str(tmp_path / "test_x.npy"),
            str(tmp_path / "test_onehot.npy"),
            "--text-features",
            str(tmp_path / "text.npy"),
            "--classnames",
            str(tmp_path / "names.json"),
            "--out",
            str(out),
        ],
        capsys,
    )
    assert code == 0, err
    t = clipadapt.load_bundle(out).tensors
    assert t["train_features"].dtype == torch.float32
    assert torch.equal(t["train_features"], torch.from_numpy(made["train_x"].astype(np.float32)))
    assert torch.equal(t["train_labels"], torch.from_numpy(made["train_y"]))
    assert torch.equal(t["test_features"], torch.from_numpy(made["test_x"]))
    assert torch.equal(t["test_labels"], torch.from_numpy(made["test_y"]))
    assert torch.equal(t["text_features"], torch.from_numpy(made["text"]))
    assert clipadapt.load_bundle(out).classnames == CLASSNAMES


def test_npz_arrays_round_trip_with_views_and_names(tmp_path) -> None:
    made = _arrays(tmp_path)
    views = np.random.default_rng(2).normal(size=(2, 20, D)).astype(np.float16)
    np.savez(
        tmp_path / "all.npz",
        train_4shot_features=made["train_x"].astype(np.float16),
        train_4shot_labels=made["train_y"],
        train_4shot_features_views=views,
        test_features=made["test_x"],
        test_labels=made["test_y"],
        text_features=made["text"],
        classnames=np.array(CLASSNAMES),
    )
    bundle = import_arrays(tmp_path / "b.safetensors", npz=tmp_path / "all.npz")
    t = bundle.tensors
    assert torch.equal(t["train_4shot_features"], torch.from_numpy(made["train_x"]).half())
    assert torch.equal(t["train_4shot_features_views"], torch.from_numpy(views))
    assert torch.equal(t["text_features"], torch.from_numpy(made["text"]))
    assert bundle.classnames == CLASSNAMES and bundle.shot_groups() == {4: "train_4shot"}
    # FILE.npz:KEY picks single arrays
    other = import_arrays(
        tmp_path / "c.safetensors",
        groups={"test": (f"{tmp_path / 'all.npz'}:test_features", tmp_path / "test_y.npy")},
    )
    assert torch.equal(other.tensors["test_features"], torch.from_numpy(made["test_x"]))
    assert other.classnames == [f"class_{i}" for i in range(C)]  # C from the largest label


def _group(tmp_path: Path, x: str = "train_x.npy", y: str = "train_y.npy") -> list[str]:
    return ["--group", "train", str(tmp_path / x), str(tmp_path / y)]


@pytest.mark.parametrize(
    ("setup", "extra", "message"),
    [
        (
            lambda d: np.save(d / "obj.npy", np.array([{"a": 1}], dtype=object)),
            ["--group", "test", "{d}/obj.npy", "{d}/test_y.npy"],
            r"obj.npy: holds Python objects \(a pickled array\)",
        ),
        (
            lambda d: np.save(d / "flat.npy", np.zeros(D)),
            ["--group", "test", "{d}/flat.npy", "{d}/test_y.npy"],
            r"flat.npy: features must be \(N, D\), got shape \(16,\)",
        ),
        (
            lambda d: np.save(d / "hot.npy", np.full((10, C), 0.2)),
            ["--group", "test", "{d}/test_x.npy", "{d}/hot.npy"],
            r"hot.npy: \(N, C\) labels must be one-hot",
        ),
        (
            lambda d: np.save(d / "frac.npy", np.full(10, 0.5)),
            ["--group", "test", "{d}/test_x.npy", "{d}/frac.npy"],
            r"frac.npy: labels must be whole class indices",
        ),
        (
            lambda d: np.save(d / "short.npy", np.zeros(9, dtype=np.int64)),
            ["--group", "test", "{d}/test_x.npy", "{d}/short.npy"],
            r"test_x.npy has 10 rows but .*short.npy has 9 labels",
        ),
        (
            lambda d: np.save(d / "nan.npy", np.full((10, D), np.nan, dtype=np.float32)),
            ["--group", "test", "{d}/nan.npy", "{d}/test_y.npy"],
            r"nan.npy: 10 row\(s\) contain NaN or Inf",
        ),
        (
            lambda d: np.save(d / "wide.npy", np.zeros((10, D + 1), dtype=np.float32)),
            ["--group", "test", "{d}/wide.npy", "{d}/test_y.npy"],
            r"feature widths differ",
        ),
        (
            lambda d: np.save(d / "big.npy", np.full(10, C + 3)),
            ["--group", "test", "{d}/test_x.npy", "{d}/big.npy", "--text-features", "{d}/text.npy"],
            r"big.npy: label 8 is out of range for 5 classes",
        ),
        (
            lambda d: (d / "three.txt").write_text("a\nb\nc\n"),
            ["--text-features", "{d}/text.npy", "--classnames", "{d}/three.txt"],
            r"three.txt has 3 class names but the text features \(\S*text.npy\) have 5 classes",
        ),
        (
            lambda d: np.savez(d / "odd.npz", train_features=np.zeros((2, D)), weights=np.zeros(3)),
            ["--npz", "{d}/odd.npz"],
            r"odd.npz: unknown array 'weights'",
        ),
        (
            lambda d: None,
            ["--group", "test", "{d}/missing.npy", "{d}/test_y.npy"],
            r"missing.npy: file not found",
        ),
        (
            lambda d: None,
            ["--group", "Test Set", "{d}/test_x.npy", "{d}/test_y.npy"],
            r"group name 'Test Set': use lower-case words",
        ),
    ],
)
def test_bad_arrays_fail_on_one_line(tmp_path, capsys, setup, extra, message) -> None:
    _arrays(tmp_path)
    setup(tmp_path)
    out = tmp_path / "b.safetensors"
    argv = ["import", "arrays", *_group(tmp_path), "--out", str(out)]
    argv += [a.replace("{d}", str(tmp_path)) for a in extra]
    code, _, err = _cli(argv, capsys)
    assert code == 2
    assert len(err.strip().splitlines()) == 1, err
    assert re.search(message, err), err
    assert not out.exists()


def test_arrays_needs_some_input_and_a_safetensors_name(tmp_path, capsys) -> None:
    code, _, err = _cli(["import", "arrays", "--out", str(tmp_path / "b.safetensors")], capsys)
    assert code == 2 and "--group NAME FEATURES LABELS" in err
    _arrays(tmp_path)
    with pytest.raises(ConfigError, match="must name a .safetensors file"):
        import_arrays(
            tmp_path / "b.npz",
            groups={"train": (tmp_path / "train_x.npy", tmp_path / "train_y.npy")},
        )
    with pytest.raises(SystemExit):  # argparse: the kind of import is required
        _cli(["import"], capsys)
