"""Export: ONNX parity and linear heads for every registered method, the image graph on the
embedded world backbone, ``clipadapt export`` and the deploy page's example."""

from __future__ import annotations

import argparse
import json
import random
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

import clipadapt  # noqa: E402
from clipadapt.exceptions import ConfigError  # noqa: E402
from clipadapt.export import (  # noqa: E402
    NotLinearError,
    adapter_classnames,
    export_adapter,
    export_linear,
    export_onnx,
    linear_head,
    read_onnx_metadata,
)
from clipadapt.export.onnx_export import onnx_session, reference_image_logits  # noqa: E402
from clipadapt.testing import make_fixture  # noqa: E402
from clipadapt.testing.export_checks import (  # noqa: E402
    check_linear_export,
    check_onnx_parity,
    fit_on_fixture,
    onnx_parity,
)
from conftest import FAST_PARAMS, TINY_MODEL  # noqa: E402

REPO = Path(__file__).resolve().parents[1]

# Fewer epochs and smaller grids than the defaults: they only shorten the fits on the tiny
# fixture; the exported maths is the same at any setting.
PARAMS: dict[str, dict[str, object]] = {**FAST_PARAMS, "coop": {"n_ctx": 4, "epochs": 5}}

#: What the linearity test finds for each method at its default settings (the issue expected
#: zero-shot, the linear probes, TaskRes, NODE-Adapter and CoOp to be linear; GraphAdapter's
#: refined text classifier is linear too). A newly registered method must be added here.
LINEAR = {
    "zeroshot": True,
    "linear_probe": True,
    "zs_linear_probe": True,
    "taskres": True,
    "node_adapter": True,
    "coop": True,
    "graph_adapter": True,
    "tip_adapter": False,
    "tip_adapter_f": False,
    "clip_adapter": False,
    "hegraph_adapter": False,
}


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("name", clipadapt.list_methods())
def test_onnx_parity(name: str) -> None:
    result = check_onnx_parity(name, PARAMS.get(name))
    assert result["max_abs_error"] <= 1e-4


@pytest.mark.parametrize("name", clipadapt.list_methods())
def test_linear_export(name: str) -> None:
    assert name in LINEAR, f"{name} is registered but its expected linearity is not listed"
    result = check_linear_export(name, PARAMS.get(name))
    assert result["linear"] is LINEAR[name]


def test_a_sharp_cache_is_not_taken_for_a_linear_head() -> None:
    # exp(-50 (1 - x.k)) is ~0 on random directions (x.k ~ 0): only probing at and between the
    # cache keys shows the non-linearity
    fx = make_fixture()
    method = clipadapt.create_method("tip_adapter", search=False, alpha=1.0, beta=50.0)
    method.fit(fx.train, fx.text)
    with pytest.raises(NotLinearError, match="--format onnx"):
        linear_head(method)


def test_linearity_is_judged_on_the_fitted_model() -> None:
    fx = make_fixture()
    text_only = clipadapt.create_method("hegraph_adapter", classifier="text")
    text_only.fit(fx.train, fx.text, fx.val)
    weight, bias, _ = linear_head(text_only)
    x = fx.test.features
    torch.testing.assert_close(x @ weight.T + bias, text_only.logits(x), atol=1e-4, rtol=0)


def test_onnx_export_writes_nothing_when_the_check_fails(tmp_path, monkeypatch) -> None:
    from clipadapt.export import onnx_export

    _, method = fit_on_fixture("zeroshot")
    monkeypatch.setattr(onnx_export, "CHECK_BATCHES", (1,))
    monkeypatch.setattr(onnx_export, "max_feature_error", lambda *args: 0.5)
    with pytest.raises(onnx_export.ExportError, match="differs from Adapter.logits by 0.5"):
        export_onnx(method, tmp_path / "z.onnx")
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------ class names


def _saved(tmp_path: Path, name: str = "zeroshot") -> Path:
    _, method = fit_on_fixture(name, PARAMS.get(name))
    return method.save(tmp_path / "adapter")


def test_class_names_come_from_provenance_then_run_json(tmp_path) -> None:
    directory = _saved(tmp_path)
    assert adapter_classnames(directory, 5)[0] == [f"class_{i}" for i in range(5)]
    run = [f"run {i}" for i in range(5)]
    (directory / "run.json").write_text(json.dumps({"classnames": run}))
    assert adapter_classnames(directory, 5) == (run, str(directory / "run.json"))
    config = json.loads((directory / "config.json").read_text())
    config["provenance"] = {"classnames": [f"prov {i}" for i in range(5)]}
    (directory / "config.json").write_text(json.dumps(config))
    assert adapter_classnames(directory, 5)[0][0] == "prov 0"
    assert adapter_classnames(directory, 5, list("abcde"))[0] == list("abcde")
    with pytest.raises(ConfigError, match="3 class names for an adapter with 5 classes"):
        adapter_classnames(directory, 5, ["a", "b", "c"])
    method = clipadapt.load(directory)
    with pytest.raises(ConfigError, match="2 class names for an adapter with 5 classes"):
        export_onnx(method, tmp_path / "z.onnx", ["a", "b"])
    with pytest.raises(ConfigError, match="2 class names for an adapter with 5 classes"):
        export_linear(method, tmp_path / "z.safetensors", ["a", "b"])
    assert not (tmp_path / "z.onnx").exists() and not (tmp_path / "z.safetensors").exists()


def test_export_adapter_stores_the_class_names(tmp_path) -> None:
    directory = _saved(tmp_path)
    names = [f"kind {i}" for i in range(5)]
    (directory / "run.json").write_text(json.dumps({"classnames": names}))
    summary = export_adapter(directory, tmp_path / "z.onnx")
    assert json.loads(read_onnx_metadata(tmp_path / "z.onnx")["classnames"]) == names
    assert summary["classnames_source"].endswith("run.json")
    export_adapter(directory, tmp_path / "z.safetensors", "linear")
    from safetensors import safe_open

    with safe_open(str(tmp_path / "z.safetensors"), "pt") as handle:
        assert json.loads(handle.metadata()["classnames"]) == names


# ------------------------------------------------------------------ the image graph


def _world_images(count: int = 6) -> list[np.ndarray]:
    from clipadapt.world.generator import render, sample_scene

    return [render(sample_scene(random.Random(i)), seed=i) for i in range(count)]


def _resized(images: list[np.ndarray], height: int, width: int) -> np.ndarray:
    from PIL import Image

    out = [np.asarray(Image.fromarray(a).resize((width, height), Image.BICUBIC)) for a in images]
    return np.stack(out)


# (H, W): kept, crop only (odd offsets round half to even), up- and downsampled, portrait
SIZES = [(64, 64), (64, 89), (91, 64), (65, 64), (96, 96), (80, 100), (48, 70), (200, 150)]


def test_preprocessing_graph_matches_clean_view() -> None:
    from PIL import Image

    from clipadapt.export.preprocess import preprocessing_model
    from clipadapt.features.transforms import CleanView

    mean, std = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
    session = onnx_session(preprocessing_model(64, mean, std, 18, 8).SerializeToString())
    view = CleanView(64, mean, std)
    noise = np.random.default_rng(0)
    for height, width in SIZES:
        batches = {
            "world": _resized(_world_images(), height, width),
            "noise": noise.integers(0, 256, (4, height, width, 3), dtype=np.uint8),
        }
        for kind, batch in batches.items():
            want = torch.stack([view(Image.fromarray(a)) for a in batch]).numpy()
            got = session.run(None, {"image": batch.transpose(0, 3, 1, 2).copy()})[0]
            assert got.shape == want.shape == (len(batch), 3, 64, 64)
            levels = np.abs(got - want) * np.asarray(std).reshape(1, 3, 1, 1) * 255
            where = f"{kind} {height}x{width}"
            if height == 64 or width == 64:  # no resize: bitwise the same pixels
                assert levels.max() == 0, where
            assert levels.max() <= 1.0 + 1e-3, f"{where}: {levels.max():.3f} grey levels"
            assert (levels > 1e-3).mean() < 2e-3, f"{where}: {(levels > 1e-3).mean():.2%}"


@pytest.fixture(scope="module")
def world_run(tmp_path_factory):
    """A Tip-Adapter fitted by `clipadapt run` on a small world dataset (`--backbone world`)."""
    from clipadapt.cli import main
    from clipadapt.world.datasets import generate_world_datasets

    root = tmp_path_factory.mktemp("world_export")
    (data,) = generate_world_datasets(root / "data", size="small", names=["world_shades"])
    code = main(
        [
            "run",
            str(data),
            "--backbone",
            "world",
            "--method",
            "tip_adapter:search_steps_beta=20",
            "--shots",
            "2",
            "--views",
            "2",
            "--cache-dir",
            str(root / "cache"),
            "--out",
            str(root / "run"),
            "--no-progress",
        ]
    )
    assert code == 0
    return root, data


@pytest.fixture(scope="module")
def world_encoder():
    from clipadapt.encoders.clip import ClipEncoder, resolve_backbone

    return ClipEncoder(resolve_backbone("world"), device="cpu", precision="fp32")


def _cli(argv: list[str], capsys) -> tuple[int, str, str]:
    """``clipadapt`` with only this module's verbs, handled as the main entry point does."""
    from clipadapt.cli.export_import import register_cli
    from clipadapt.exceptions import ClipadaptError

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


def _image_files(data: Path) -> list[Path]:
    split = json.loads((data / "split.json").read_text())
    return [data / item[0] for item in split["test"][:: max(1, len(split["test"]) // 12)]]


@pytest.mark.parametrize("name", clipadapt.list_methods())
def test_onnx_parity_on_world_features(name, world_run, world_encoder) -> None:
    # fitted by the same path as `clipadapt fit` on the world bundle; the graph is fed the raw
    # stored embeddings (float16, not normalised), as a user's own extraction would give them
    root, _ = world_run
    bundle = clipadapt.load_bundle(root / "run" / "features.safetensors")
    method = clipadapt.create_method(name, **PARAMS.get(name, {}))
    tower = world_encoder.text_tower() if "text_encoder" in method.card.needs else None
    method = clipadapt.evaluate(method, bundle, shots=2, seed=1, text_encoder=tower).fitted
    rows = bundle.tensors["test_features"].float()
    assert (rows.norm(dim=-1) - 1).abs().max() > 0.1  # really raw
    result = onnx_parity(method, rows, bundle.classnames)
    assert result["max_abs_error"] <= 1e-4 and result["rows"] == 96


def test_image_graph_matches_clipadapt_on_the_world_backbone(
    world_run, world_encoder, tmp_path, capsys
) -> None:
    from clipadapt.features.transforms import CleanView, load_rgb

    root, data = world_run
    adapter = root / "run" / "adapter"
    code, out, err = _cli(
        ["export", "--adapter", str(adapter), "--with-encoder", "--out", str(tmp_path / "m.onnx")],
        capsys,
    )
    assert code == 0, err
    # a saved adapter carries its class names in its own config (provenance)
    assert "tip_adapter -> " in out and "provenance.classnames" in out
    metadata = read_onnx_metadata(tmp_path / "m.onnx")
    run = json.loads((adapter / "run.json").read_text())
    assert json.loads(metadata["classnames"]) == run["classnames"]
    assert metadata["image_size"] == "64" and metadata["method"] == "tip_adapter"
    session = onnx_session(tmp_path / "m.onnx")
    assert [i.name for i in session.get_inputs()] == ["image"]
    method = clipadapt.load(adapter)
    view = CleanView(64, world_encoder.mean, world_encoder.std)

    # clipadapt's own path, as `clipadapt predict` runs it: clean view, encoder, logits
    files = _image_files(data)
    pixels = torch.stack([view(load_rgb(str(f))) for f in files])
    want = method.logits(world_encoder.encode_images(pixels)).numpy()
    images = np.stack([np.asarray(load_rgb(str(f))) for f in files]).transpose(0, 3, 1, 2)
    got = session.run(None, {"image": images.copy()})[0]
    assert float(np.abs(got - want).max()) <= 1e-4
    one = session.run(None, {"image": images[:1].copy()})[0]
    assert float(np.abs(one - want[:1]).max()) <= 1e-4

    # other image sizes: the resize rounds a few pixels differently (see the test above)
    originals = [np.asarray(load_rgb(str(f))) for f in files]
    for height, width in SIZES[3:]:
        batch = _resized(originals, height, width)
        chw = torch.from_numpy(batch.transpose(0, 3, 1, 2).copy())
        expected = reference_image_logits(world_encoder, method, chw).numpy()
        got = session.run(None, {"image": chw.numpy()})[0]
        # within 0.1 % of the largest logit (about 0.07 here)
        assert float(np.abs(got - expected).max()) <= 1e-3 * float(np.abs(expected).max())
        assert (got.argmax(1) == expected.argmax(1)).all(), (height, width)


def test_image_graph_of_a_vit_backbone(tiny_model_dir, tmp_path) -> None:
    # the world model is a ResNet; a ViT tower (attention, class token) exports and checks too
    from clipadapt.encoders.clip import ClipEncoder, resolve_backbone

    spec = resolve_backbone(TINY_MODEL, tiny_model_dir / "tiny.safetensors")
    encoder = ClipEncoder(spec, device="cpu", precision="fp32")
    _, method = fit_on_fixture("tip_adapter", PARAMS["tip_adapter"])  # D = 32, as the tower
    summary = export_onnx(method, tmp_path / "vit.onnx", encoder=encoder)
    assert summary["max_abs_error"] <= 1e-4 and summary["metadata"]["image_size"] == "32"
    session = onnx_session(tmp_path / "vit.onnx")
    image = np.random.default_rng(3).integers(0, 256, (3, 3, 45, 40), dtype=np.uint8)
    want = reference_image_logits(encoder, method, torch.from_numpy(image)).numpy()
    got = session.run(None, {"image": image})[0]
    assert (got.argmax(1) == want.argmax(1)).all()
    assert float(np.abs(got - want).max()) <= 1e-3 * float(np.abs(want).max())


def test_image_graph_refuses_an_encoder_of_another_width(world_encoder, tmp_path) -> None:
    _, method = fit_on_fixture("zeroshot")  # D = 32; the world backbone's D is 128
    with pytest.raises(ConfigError, match="128-wide but the adapter was fitted on 32-wide"):
        export_onnx(method, tmp_path / "m.onnx", encoder=world_encoder)
    assert not (tmp_path / "m.onnx").exists()


def _python_block(markdown: str, first_line: str) -> str:
    blocks = re.findall(r"```python\n(.*?)```", markdown, flags=re.S)
    matching = [b for b in blocks if first_line in b]
    assert len(matching) == 1, f"expected one python block with {first_line!r}"
    return matching[0]


def test_deploy_example_classifies_one_image(world_run, world_encoder, tmp_path, capsys) -> None:
    import shutil

    from clipadapt.features.transforms import CleanView, load_rgb

    root, data = world_run
    adapter = root / "run" / "adapter"
    code, _, err = _cli(
        [
            "export",
            "--adapter",
            str(adapter),
            "--with-encoder",
            "--out",
            str(tmp_path / "model.onnx"),
        ],
        capsys,
    )
    assert code == 0, err
    image = _image_files(data)[0]
    shutil.copy(image, tmp_path / "photo.png")
    example = _python_block((REPO / "docs" / "deploy.md").read_text(), "ort.InferenceSession")
    assert len([line for line in example.splitlines() if line.strip()]) <= 12
    done = subprocess.run(
        [sys.executable, "-c", example], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    method = clipadapt.load(adapter)
    pixels = CleanView(64, world_encoder.mean, world_encoder.std)(load_rgb(str(image)))
    probs = method.logits(world_encoder.encode_images(pixels[None])).softmax(-1)[0]
    names = json.loads((adapter / "run.json").read_text())["classnames"]
    assert done.stdout.strip() == f"{names[int(probs.argmax())]}: {float(probs.max()):.1%}"


def test_deploy_linear_snippet_runs(tmp_path) -> None:
    fx, method = fit_on_fixture("zeroshot")
    names = [f"kind {i}" for i in range(5)]
    export_linear(method, tmp_path / "zs-head.safetensors", names)
    np.save(tmp_path / "features.npy", fx.test.features.numpy() * 3.0)
    snippet = _python_block((REPO / "docs" / "deploy.md").read_text(), "safe_open")
    code = "import numpy as np\nfeatures = np.load('features.npy')\n" + snippet
    code += "\nprint(json.dumps(predicted))\n"
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    want = [names[i] for i in method.predict(fx.test.features).tolist()]
    assert json.loads(done.stdout) == want


# ------------------------------------------------------------------ the command line


def test_cli_export_linear_and_its_errors(world_run, tmp_path, capsys) -> None:
    root, _ = world_run
    adapter = str(root / "run" / "adapter")
    code, _, err = _cli(
        ["export", "--adapter", adapter, "--format", "linear", "--out", str(tmp_path / "h.st")],
        capsys,
    )
    assert code == 2 and "not a linear head" in err and "--format onnx" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "h.st").exists()
    code, _, err = _cli(
        ["export", "--adapter", adapter, "--format", "linear", "--with-encoder", "--out", "x"],
        capsys,
    )
    assert code == 2 and "--with-encoder needs --format onnx" in err
    code, _, err = _cli(
        ["export", "--adapter", str(tmp_path / "nothing"), "--out", str(tmp_path / "x.onnx")],
        capsys,
    )
    assert code == 2 and "not a saved adapter" in err


def test_cli_export_features_graph_with_json_summary(tmp_path, capsys) -> None:
    directory = _saved(tmp_path, "linear_probe")
    names = tmp_path / "names.txt"
    names.write_text("\n".join(f"n{i}" for i in range(5)))
    code, out, err = _cli(
        [
            "export",
            "--adapter",
            str(directory),
            "--classnames",
            str(names),
            "--out",
            str(tmp_path / "lp.onnx"),
            "--json",
            str(tmp_path / "s.json"),
        ],
        capsys,
    )
    assert code == 0, err
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["method"] == "linear_probe" and summary["max_abs_error"] <= 1e-4
    assert json.loads(summary["metadata"]["classnames"]) == [f"n{i}" for i in range(5)]
    assert "features: float32 (N, 32)" in out
