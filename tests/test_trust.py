"""Numbers you can trust: no stale features, no mixed-up resumes, no silent meaningless accuracies.

One test per case of the issue (and of the bench's exit codes). Each runs the ``clipadapt``
command in process, as a user would, on small ImageFolder trees encoded with the embedded world
backbone, or on small hand-made bundles where the images do not matter.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from clipadapt.bench.results import read_results
from clipadapt.cli import main
from clipadapt.data.bundle import load_bundle
from conftest import make_image_folder

WORLD_CARD = Path(__file__).resolve().parents[1] / "src/clipadapt/world/assets/world_clip.json"


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """``clipadapt argv`` in process: (exit code, stdout, stderr)."""
    capsys.readouterr()
    try:
        code = main([str(a) for a in argv])
    except SystemExit as stop:  # argparse refuses a flag value before the handler
        code = stop.code if isinstance(stop.code, int) else 1
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def extract(folder: Path, out: Path, cache: Path, *extra: Any) -> list[Any]:
    return [
        "extract",
        folder,
        "--backbone",
        "world",
        "--device",
        "cpu",
        "--views",
        "0",
        "--cache-dir",
        cache,
        "--out",
        out,
        "--no-progress",
        *extra,
    ]


def bundle_file(
    path: Path, *, classes: tuple[str, ...] = ("cat", "dog", "owl"), seed: int = 0, **edits: Any
) -> Path:
    """A small separable bundle (train/val/test, text features); ``edits`` replace tensors
    (None drops one)."""
    gen = torch.Generator().manual_seed(seed)
    centres = torch.nn.functional.normalize(torch.randn(len(classes), 8, generator=gen), dim=1)
    tensors: dict[str, torch.Tensor] = {}
    for group, per in (("train", 6), ("val", 3), ("test", 5)):
        labels = torch.arange(len(classes)).repeat_interleave(per)
        noise = 0.2 * torch.randn(len(labels), 8, generator=gen)
        tensors[f"{group}_features"] = centres[labels] + noise
        tensors[f"{group}_labels"] = labels
    tensors["text_features"] = centres.clone()
    for key, value in edits.items():
        if value is None:
            tensors.pop(key, None)
        else:
            tensors[key] = value
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(
        {k: v.contiguous() for k, v in tensors.items()},
        str(path),
        metadata={"classnames": json.dumps(list(classes)), "backbone": "toy"},
    )
    return path


def bench(out: Path, *extra: Any) -> list[Any]:
    return ["bench", "--out", out, "--no-progress", "--shots", "1", "--seeds", "1", *extra]


def features_of(path: Path) -> torch.Tensor:
    return load_bundle(path).tensors["test_features"].float()


def paint(folder: Path, colour: str = "white") -> None:
    """Overwrite every image under ``folder`` in place (same names, new pixels)."""
    for image in sorted(folder.rglob("*")):
        if image.suffix in (".png", ".jpg"):
            Image.new("RGB", (24, 24), colour).save(image)


# ----------------------------------------------------------------------------- 1 stale features


def test_overwritten_images_are_encoded_again(tmp_path, capsys):
    """Case 1: rewriting every image and extracting again re-encodes and says so."""
    images = make_image_folder(tmp_path / "imgs", classes=2, per_class=4, size=24)
    args = extract(images, tmp_path / "a.safetensors", tmp_path / "cache")
    assert run(args, capsys)[0] == 0
    before = features_of(tmp_path / "a.safetensors")
    paint(images)
    code, out, _ = run(args, capsys)
    assert code == 0
    assert "encoded now: train 4, val 2, test 2" in out
    assert "image files changed since they were cached" in out
    after = features_of(tmp_path / "a.safetensors")
    assert not torch.equal(before, after)
    # all-white images give one feature row, repeated
    assert torch.allclose(after, after[:1].expand_as(after))


def test_other_folder_with_same_names_gets_its_own_features(tmp_path, capsys):
    """Case 1: a different folder with the same basename and file names, other pixels."""
    first = make_image_folder(tmp_path / "x" / "imgs", classes=2, per_class=4, size=24)
    second = tmp_path / "y" / "imgs"
    shutil.copytree(first, second)
    paint(second, "black")
    cache = tmp_path / "cache"
    assert run(extract(first, tmp_path / "x.safetensors", cache), capsys)[0] == 0
    assert run(extract(second, tmp_path / "y.safetensors", cache), capsys)[0] == 0
    fresh = tmp_path / "fresh.safetensors"
    assert run(extract(second, fresh, tmp_path / "empty-cache"), capsys)[0] == 0
    assert not torch.equal(
        features_of(tmp_path / "x.safetensors"), features_of(tmp_path / "y.safetensors")
    )
    assert torch.equal(features_of(tmp_path / "y.safetensors"), features_of(fresh))


def test_bench_keeps_same_named_folders_apart(tmp_path, capsys):
    """Case 1: ``bench --dataset a/imgs --dataset b/imgs`` (3 and 2 classes)."""
    a = make_image_folder(tmp_path / "a" / "imgs", classes=3, per_class=5, size=24)
    b = make_image_folder(tmp_path / "b" / "imgs", classes=2, per_class=5, size=24, seed=1)
    out = tmp_path / "r.jsonl"
    argv = bench(
        out,
        "--dataset",
        a,
        "--dataset",
        b,
        "--backbone",
        "world",
        "--methods",
        "zeroshot",
        "--cache-dir",
        tmp_path / "cache",
    )
    code, stdout, err = run(argv, capsys)
    assert code == 0, err
    records = list(read_results(out))
    assert len(records) == 2
    assert len({r["bundle_fingerprint"] for r in records}) == 2
    assert sorted(r["n_eval"] for r in records) == [4, 6]  # 2 and 3 classes, 2 test images each
    assert "imgs (" in stdout  # two columns in the summary, labelled apart


def test_bench_reuses_a_bundle_only_while_its_images_are_unchanged(tmp_path, capsys):
    """Case 1: the bundle ``bench --dataset`` keeps is made again when an image changes, and
    the run with the new features is not taken for the old one."""
    images = make_image_folder(tmp_path / "imgs", classes=2, per_class=5, size=24)
    out = tmp_path / "r.jsonl"
    argv = bench(
        out,
        "--dataset",
        images,
        "--backbone",
        "world",
        "--methods",
        "zeroshot",
        "--cache-dir",
        tmp_path / "cache",
    )
    assert run(argv, capsys)[0] == 0
    code, stdout, _ = run(argv, capsys)
    assert code == 0 and "0 run(s) written" in stdout  # unchanged: resumed
    paint(images / "red_square")
    code, stdout, _ = run(argv, capsys)
    assert code == 0 and "1 run(s) written" in stdout
    records = list(read_results(out))
    assert records[0]["bundle_fingerprint"] != records[1]["bundle_fingerprint"]
    assert records[0]["dataset_fingerprint"] != records[1]["dataset_fingerprint"]


def test_bundle_fingerprint_does_not_depend_on_where_the_checkpoint_sits(tmp_path, capsys):
    """The same features extracted with the same checkpoint from two install locations."""
    images = make_image_folder(tmp_path / "imgs", classes=2, per_class=4, size=24)
    prints = []
    for where in ("one", "two"):
        folder = tmp_path / where / "checkout"
        folder.mkdir(parents=True)
        shutil.copy(WORLD_CARD, folder / WORLD_CARD.name)
        shutil.copy(WORLD_CARD.with_suffix(".safetensors"), folder / "world_clip.safetensors")
        out = tmp_path / f"{where}.safetensors"
        argv = extract(images, out, tmp_path / f"cache-{where}")
        argv[argv.index("world")] = folder / WORLD_CARD.name
        assert run(argv, capsys)[0] == 0
        bundle = load_bundle(out)
        assert str(folder) in bundle.metadata["backbone_spec"]  # the paths do differ
        prints.append(bundle.fingerprint())
    assert prints[0] == prints[1]


# ----------------------------------------------------------------------------- 2 wrong resumes


def test_resume_key_covers_the_bundle(tmp_path, capsys):
    """Case 2: another bundle written to the same path is not skipped as already done."""
    path = bundle_file(tmp_path / "feats.safetensors")
    out = tmp_path / "r.jsonl"
    argv = bench(out, "--bundle", path, "--methods", "zeroshot")
    assert run(argv, capsys)[0] == 0
    bundle_file(path, seed=5)  # same name, classes and groups; other features
    code, stdout, _ = run(argv, capsys)
    assert code == 0 and "1 run(s) written" in stdout
    first, second = read_results(out)
    assert first["run_id"] != second["run_id"]


def _episode_file(path: Path, seed: int) -> Path:
    from clipadapt.tasks.episodes import EpisodeSet

    gen = torch.Generator().manual_seed(seed)
    labels = torch.tensor([0, 1] * 4)
    episode = torch.arange(2).repeat_interleave(4)
    return EpisodeSet(
        support_features=torch.randn(8, 8, generator=gen),
        support_labels=labels,
        support_episode=episode,
        query_features=torch.randn(8, 8, generator=gen),
        query_labels=labels.clone(),
        query_episode=episode.clone(),
        text_features=torch.randn(2, 8, generator=gen),
        name="eps",
    ).save(path)


def test_resume_key_covers_the_episode_file(tmp_path, capsys):
    """Case 2: another episode file written to the same path runs again."""
    path = _episode_file(tmp_path / "eps.safetensors", 0)
    out = tmp_path / "r.jsonl"
    argv = [
        "bench",
        "--episodes",
        path,
        "--methods",
        "zeroshot",
        "--seeds",
        "1",
        "--out",
        out,
        "--no-progress",
    ]
    assert run(argv, capsys)[0] == 0
    _episode_file(path, 1)
    code, stdout, _ = run(argv, capsys)
    assert code == 0 and "1 run(s) written" in stdout
    assert len({r["episodes_fingerprint"] for r in read_results(out)}) == 2


def test_old_results_lines_are_not_resumed_and_say_why(tmp_path, capsys, caplog):
    """Results written with the old key (no fingerprints) run again, a warning says why, and
    the report counts the new line only."""
    path = bundle_file(tmp_path / "feats.safetensors")
    out = tmp_path / "r.jsonl"
    argv = bench(out, "--bundle", path, "--methods", "zeroshot")
    assert run(argv, capsys)[0] == 0
    (new,) = read_results(out)
    old = {k: v for k, v in new.items() if k not in ("key_version", "legacy_run_id")}
    old.update(run_id=new["legacy_run_id"], accuracy=12.5)  # the id the old key gave it
    out.write_text(json.dumps(old) + "\n")
    with caplog.at_level("WARNING"):
        code, stdout, _ = run(argv, capsys)
    assert code == 0 and "1 run(s) written" in stdout
    assert "written by an older clipadapt" in caplog.text and "run again" in caplog.text
    assert "12.5" not in stdout  # the summary holds the new run only
    code, stdout, _ = run(["report", out, "--out", tmp_path / "rep"], capsys)
    assert code == 0 and "12.5" not in stdout and "merged: 1 result line(s)" in stdout


# ----------------------------------------------------------------------------- 3 reports merge


def test_report_keeps_method_specs_apart(tmp_path, capsys):
    """Case 3: ablations of one method are rows of their own, never one averaged row."""
    path = bundle_file(tmp_path / "feats.safetensors")
    out = tmp_path / "r.jsonl"
    specs = "tip_adapter:search=false,alpha=0.1;tip_adapter:search=false,alpha=50"
    assert run(bench(out, "--bundle", path, "--methods", specs), capsys)[0] == 0
    code, stdout, _ = run(["report", out, "--out", tmp_path / "rep"], capsys)
    assert code == 0
    table = (tmp_path / "rep" / "table.md").read_text()
    assert "| tip_adapter:search=false,alpha=0.1 |" in table
    assert "| tip_adapter:search=false,alpha=50 |" in table
    assert "kept apart: tip_adapter ran with 2 different specs" in stdout


def test_report_keeps_bundles_with_one_name_apart(tmp_path, capsys):
    """Case 3: a second sweep with another bundle of the same name into the same file."""
    out = tmp_path / "r.jsonl"
    first = bundle_file(tmp_path / "a" / "feats.safetensors")
    second = bundle_file(tmp_path / "b" / "feats.safetensors", classes=("x", "y"), seed=3)
    assert run(bench(out, "--bundle", first, "--methods", "zeroshot"), capsys)[0] == 0
    code, stdout, _ = run(bench(out, "--bundle", second, "--methods", "zeroshot"), capsys)
    assert code == 0
    # bench prints the summary of this invocation's runs: the second bundle only
    summary = stdout.split("this sweep's runs")[1]
    assert summary.count("| zeroshot |") == 1 and "| method | feats | average |" in summary
    code, stdout, _ = run(["report", out, "--out", tmp_path / "rep"], capsys)
    table = (tmp_path / "rep" / "table.md").read_text()
    assert table.splitlines()[0].count("feats (") == 2  # two columns, never one mean
    assert "kept apart: feats names 2 different bundles" in stdout


def test_report_says_what_it_merged_across_files(tmp_path, capsys):
    path = bundle_file(tmp_path / "feats.safetensors")
    one, two = tmp_path / "one.jsonl", tmp_path / "two.jsonl"
    assert run(bench(one, "--bundle", path, "--methods", "zeroshot"), capsys)[0] == 0
    argv = bench(two, "--bundle", path, "--methods", "zeroshot")
    argv[argv.index("--seeds") + 1] = "2"
    assert run(argv, capsys)[0] == 0
    code, stdout, _ = run(["report", one, two, "--out", tmp_path / "rep"], capsys)
    assert code == 0
    assert "merged: 2 result line(s) into 1 table cell(s)" in stdout
    assert "merged across files: 1 cell(s)" in stdout and "one.jsonl" in stdout
    assert (tmp_path / "rep" / "merged.md").is_file()


# ----------------------------------------------------------------------------- 4 silent nonsense


def _fit(bundle: Path, out: Path, method: str = "zeroshot", shots: str = "2") -> list[Any]:
    return ["fit", "--bundle", bundle, "--method", method, "--shots", shots, "--out", out]


def test_evaluate_refuses_an_adapter_of_other_classes(tmp_path, capsys):
    """Case 4: an adapter fitted on another dataset."""
    fitted_on = bundle_file(tmp_path / "pets.safetensors")
    other = bundle_file(tmp_path / "birds.safetensors", classes=("crow", "wren", "owl"))
    assert run(_fit(fitted_on, tmp_path / "ad"), capsys)[0] == 0
    code, out, err = run(["evaluate", "--adapter", tmp_path / "ad", "--bundle", other], capsys)
    assert code == 2 and "Traceback" not in err
    assert "cat, dog, owl" in err and "crow, wren, owl" in err and "differ at label 0" in err


def test_evaluate_refuses_another_bundle_of_the_same_classes_unless_asked(tmp_path, capsys):
    fitted_on = bundle_file(tmp_path / "a.safetensors")
    other = bundle_file(tmp_path / "b.safetensors", seed=9)
    assert run(_fit(fitted_on, tmp_path / "ad"), capsys)[0] == 0
    argv = ["evaluate", "--adapter", tmp_path / "ad", "--bundle", other]
    code, _, err = run(argv, capsys)
    assert code == 2 and "--other-bundle" in err and load_bundle(other).fingerprint() in err
    assert run([*argv, "--other-bundle"], capsys)[0] == 0
    code, out, _ = run(["evaluate", "--adapter", tmp_path / "ad", "--bundle", fitted_on], capsys)
    assert code == 0 and "accuracy" in out


def test_predict_refuses_another_backbone(tmp_path, capsys):
    """Case 4: predictions through a backbone the adapter was not fitted on (same width)."""
    from safetensors.torch import load_file

    images = make_image_folder(tmp_path / "imgs", classes=2, per_class=4, size=24)
    bundle = tmp_path / "w.safetensors"
    assert run(extract(images, bundle, tmp_path / "cache"), capsys)[0] == 0
    assert run(_fit(bundle, tmp_path / "ad", "zeroshot", "1"), capsys)[0] == 0
    other = tmp_path / "other"
    other.mkdir()
    shutil.copy(WORLD_CARD, other / WORLD_CARD.name)
    weights = load_file(str(WORLD_CARD.with_suffix(".safetensors")))
    save_file(
        {k: v + 0.01 if v.is_floating_point() else v for k, v in weights.items()},
        str(other / "world_clip.safetensors"),
    )
    photo = next(images.rglob("*.png"))
    argv = ["predict", photo, "--adapter", tmp_path / "ad", "--device", "cpu"]
    code, out, _ = run(argv, capsys)
    assert code == 0 and ("red_square" in out or "green_disc" in out)
    code, _, err = run([*argv, "--backbone", other / WORLD_CARD.name], capsys)
    assert code == 2 and "--other-backbone" in err and "was fitted on features of" in err
    assert run([*argv, "--backbone", other / WORLD_CARD.name, "--other-backbone"], capsys)[0] == 0


def test_one_class_is_an_error(tmp_path, capsys):
    """Case 4: one class scores 100 % by construction."""
    path = bundle_file(tmp_path / "one.safetensors", classes=("cat",))
    code, _, err = run(_fit(path, tmp_path / "ad"), capsys)
    assert code == 2 and "1 class(es) (cat)" in err and "at least 2 classes" in err
    code, _, err = run(
        bench(tmp_path / "r.jsonl", "--bundle", path, "--methods", "zeroshot"), capsys
    )
    assert code == 2 and "at least 2 classes" in err


def test_a_class_absent_from_test_is_a_warning_in_summary_and_record(tmp_path, capsys):
    """Case 4: a class with one image and --shots 4: its image goes to train, test has none."""
    images = make_image_folder(tmp_path / "imgs", classes=3, per_class=6, size=24)
    for extra in sorted((images / "blue_bar").iterdir())[1:]:
        extra.unlink()
    code, out, _ = run(
        [
            "run",
            images,
            "--backbone",
            "world",
            "--device",
            "cpu",
            "--views",
            "0",
            "--cache-dir",
            tmp_path / "cache",
            "--method",
            "zeroshot",
            "--shots",
            "4",
            "--out",
            tmp_path / "run",
            "--no-progress",
        ],
        capsys,
    )
    assert code == 0
    assert "warning: 1 class(es) have no row in the evaluation set test (blue_bar)" in out
    result = json.loads((tmp_path / "run" / "result.json").read_text())
    assert result["absent_classes"]["eval"] == ["blue_bar"]
    assert any("blue_bar" in w for w in result["warnings"])
    code, out, _ = run(
        bench(
            tmp_path / "r.jsonl",
            "--dataset",
            images,
            "--backbone",
            "world",
            "--methods",
            "zeroshot",
            "--cache-dir",
            tmp_path / "cache",
        ),
        capsys,
    )
    assert code == 0 and "warning: imgs: 1 class(es) have no row in the evaluation set" in out
    (record,) = read_results(tmp_path / "r.jsonl")
    assert record["absent_classes"] == {"eval": ["blue_bar"], "val": ["blue_bar"]}


def test_indistinguishable_class_names_warn_at_extraction(tmp_path, capsys):
    """Case 4: class names the world tokenizer does not know map to one text embedding."""
    images = make_image_folder(tmp_path / "imgs", classes=3, per_class=4, size=24)
    (images / "red_square").rename(images / "zorblat")
    (images / "green_disc").rename(images / "quoxil")
    code, out, _ = run(extract(images, tmp_path / "b.safetensors", tmp_path / "cache"), capsys)
    assert code == 0
    assert "warning: 2 class name(s) map to (near-)identical text embeddings" in out
    assert "'quoxil', 'zorblat'" in out and "blue_bar" not in out.split("warning:")[1]
    # recorded in the bundle, so the bench shows it when it reuses the bundle
    assert "zorblat" in load_bundle(tmp_path / "b.safetensors").metadata["warnings"]


def test_split_is_never_written_into_the_image_tree(tmp_path, capsys):
    """Case 4: the split of an ImageFolder tree lives beside the cache (or at --split-file)."""
    images = make_image_folder(tmp_path / "imgs", classes=2, per_class=4, size=24)
    before = sorted(p.relative_to(images) for p in images.rglob("*"))
    assert run(extract(images, tmp_path / "b.safetensors", tmp_path / "cache"), capsys)[0] == 0
    assert sorted(p.relative_to(images) for p in images.rglob("*")) == before
    assert len(list((tmp_path / "cache" / "splits").glob("imgs-*.json"))) == 1
    mine = tmp_path / "my-split.json"
    argv = extract(images, tmp_path / "c.safetensors", tmp_path / "cache", "--split-file", mine)
    assert run(argv, capsys)[0] == 0 and mine.is_file()


def test_split_that_no_longer_matches_is_reported_with_resplit(tmp_path, capsys):
    """Case 4: classes and images added after the split was made are not silently ignored."""
    images = make_image_folder(tmp_path / "imgs", classes=2, per_class=4, size=24)
    argv = extract(images, tmp_path / "b.safetensors", tmp_path / "cache")
    assert run(argv, capsys)[0] == 0
    make_image_folder(tmp_path / "more", classes=3, per_class=4, size=24)
    shutil.copytree(tmp_path / "more" / "blue_bar", images / "blue_bar")
    code, _, err = run(argv, capsys)
    assert code == 2 and "Traceback" not in err
    assert "no longer matches the folder" in err and "new class folder(s) blue_bar" in err
    assert "--resplit" in err
    code, out, _ = run([*argv, "--resplit"], capsys)
    assert code == 0 and load_bundle(tmp_path / "b.safetensors").num_classes == 3


def test_removed_image_error_names_a_fix_the_cli_has(tmp_path, capsys):
    """Case 4: the error for a removed image named ``allow_missing=True``, which the CLI lacks."""
    images = make_image_folder(tmp_path / "imgs", classes=2, per_class=4, size=24)
    argv = extract(images, tmp_path / "b.safetensors", tmp_path / "cache")
    assert run(argv, capsys)[0] == 0
    next((images / "green_disc").iterdir()).unlink()
    code, _, err = run(argv, capsys)
    assert code == 2 and "1 image(s) removed" in err and "--resplit" in err
    assert "allow_missing=True to drop" not in err
    assert run([*argv, "--resplit"], capsys)[0] == 0


# ----------------------------------------------------------------------------- 5 options


@pytest.mark.parametrize(
    "spec",
    [
        "tip_adapter:search_steps_beta=-5",
        "tip_adapter:search_steps_alpha=0",
        "clip_adapter:epochs=-1",
        "clip_adapter:logit_scale=.nan",
        "node_adapter:solver=foo",
    ],
)
def test_bad_method_options_stop_the_sweep_before_any_run(spec, tmp_path, capsys):
    """Case 5: every option is checked before the first run (no traceback, nothing written)."""
    path = bundle_file(tmp_path / "feats.safetensors")
    out = tmp_path / "r.jsonl"
    code, _, err = run(bench(out, "--bundle", path, "--methods", f"zeroshot;{spec}"), capsys)
    assert code == 2 and "Traceback" not in err and spec.split(":")[1].split("=")[0] in err
    assert not out.exists()


def test_yaml_shots_not_a_number(tmp_path, capsys):
    """Case 5: ``shots: four`` in a sweep file."""
    bundle_file(tmp_path / "alpha.safetensors")
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text("bundle_dir: .\ndatasets: [alpha]\nmethods: [zeroshot]\nshots: four\n")
    code, _, err = run(["bench", sweep, "--out", tmp_path / "r.jsonl"], capsys)
    assert code == 2 and "Traceback" not in err
    assert "shots must be a list of positive integers, got 'four'" in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("verb", ["bench", "extract"])
def test_device_cuda_without_a_gpu(verb, tmp_path, capsys):
    """Case 5: ``--device cuda`` on a CPU machine."""
    if verb == "bench":
        path = bundle_file(tmp_path / "feats.safetensors")
        argv = bench(tmp_path / "r.jsonl", "--bundle", path, "--methods", "zeroshot")
    else:
        images = make_image_folder(tmp_path / "imgs", classes=2, per_class=2, size=16)
        argv = extract(images, tmp_path / "b.safetensors", tmp_path / "cache")
        argv.remove("--device"), argv.remove("cpu")
    code, _, err = run([*argv, "--device", "cuda"], capsys)
    assert code == 2 and "Traceback" not in err
    assert "CUDA is not available on this machine" in err and "--device cpu" in err


def test_negative_views_are_refused(tmp_path, capsys):
    """Case 5: ``--views -1`` was accepted (and gave a bundle without views)."""
    images = make_image_folder(tmp_path / "imgs", classes=2, per_class=2, size=16)
    argv = extract(images, tmp_path / "b.safetensors", tmp_path / "cache")
    argv[argv.index("--views") + 1] = "-1"
    code, _, err = run(argv, capsys)
    assert code == 2 and "--views" in err and "expected an integer >= 0" in err
    assert not (tmp_path / "b.safetensors").exists()


def test_dry_run_shows_done_would_run_and_would_fail(tmp_path, capsys):
    good = bundle_file(tmp_path / "good.safetensors")
    bad = bundle_file(tmp_path / "bad.safetensors", test_features=None, test_labels=None)
    out = tmp_path / "r.jsonl"
    assert run(bench(out, "--bundle", good, "--methods", "zeroshot"), capsys)[0] == 0
    argv = bench(
        out, "--bundle", good, "--bundle", bad, "--methods", "zeroshot,tip_adapter", "--dry-run"
    )
    code, stdout, _ = run(argv, capsys)
    assert code == 2
    lines = stdout.splitlines()
    assert any(line.startswith("done") and "zeroshot" in line for line in lines)
    assert any(line.startswith("run") and "tip_adapter" in line for line in lines)
    assert any(line.startswith("fail") and "no evaluation group 'test'" in line for line in lines)
    assert "1 done in" in stdout and "1 would run" in stdout and "1 input problem(s)" in stdout
    assert len(list(read_results(out))) == 1  # nothing ran


# ----------------------------------------------------------------------------- bench exit codes


@pytest.mark.parametrize(
    ("edits", "fragment"),
    [
        ({"train_features": torch.full((18, 8), float("nan"))}, "NaN or Inf"),
        ({"test_features": None, "test_labels": None}, "no evaluation group 'test'"),
        ({"val_labels": torch.tensor([0, 1, 7] * 3)}, "label 7 is out of range for 3 classes"),
    ],
    ids=["nan_features", "no_test_group", "labels_out_of_range"],
)
def test_bench_refuses_a_bad_bundle_before_any_run(edits, fragment, tmp_path, capsys):
    """Issue 18.1: exit 2 and a one-line reason, before any cell runs (a good bundle in the
    same sweep does not run either)."""
    good = bundle_file(tmp_path / "good.safetensors")
    bad = bundle_file(tmp_path / "bad.safetensors", **edits)
    out = tmp_path / "r.jsonl"
    code, stdout, err = run(
        bench(out, "--bundle", good, "--bundle", bad, "--methods", "zeroshot"), capsys
    )
    assert code == 2 and "Traceback" not in err and err.count("\n") == 1
    assert fragment in err and "bad.safetensors" in err and "no run was started" in err
    assert not out.exists()


def test_bench_exit_codes_for_failed_and_good_runs(tmp_path, capsys):
    """Issue 18.1: 1 when a run failed (it is recorded), 0 only when every run is ok."""
    good = bundle_file(tmp_path / "good.safetensors")
    out = tmp_path / "r.jsonl"
    # with an option set, HeGraphAdapter runs and fails: the bundle has no descriptions
    diverges = "zeroshot;hegraph_adapter:epochs=1"
    code, stdout, _ = run(bench(out, "--bundle", good, "--methods", diverges), capsys)
    assert code == 1 and "1 run(s) failed" in stdout
    assert [r["status"] for r in read_results(out)] == ["ok", "error"]
    code, _, err = run(bench(out, "--bundle", good, "--methods", diverges, "--fail-fast"), capsys)
    assert code == 1 and "--fail-fast" in err
    assert (
        run(bench(tmp_path / "ok.jsonl", "--bundle", good, "--methods", "zeroshot"), capsys)[0] == 0
    )


def test_bench_help_documents_the_exit_codes(capsys):
    code, out, _ = run(["bench", "--help"], capsys)
    assert code == 0
    text = " ".join(out.split())
    assert "exit status: 0 when every run of the sweep is ok; 1 when any run failed" in text
    assert "2 on bad input found before any run" in text


# ----------------------------------------------------------------------------- provenance


def test_records_carry_their_provenance(tmp_path, capsys):
    """Templates and descriptions (name and hash), class names (hash; names once per sweep),
    the few-shot draw (rule and index hash), and the kept epoch of trained methods."""
    images = make_image_folder(tmp_path / "imgs", classes=2, per_class=6, size=24)
    (tmp_path / "desc.json").write_text(
        json.dumps({"red square": ["a red square"], "green disc": ["a green disc"]})
    )
    bundle = tmp_path / "b.safetensors"
    argv = extract(
        images,
        bundle,
        tmp_path / "cache",
        "--descriptions",
        tmp_path / "desc.json",
        "--templates",
        "imagenet7",
    )
    assert run(argv, capsys)[0] == 0
    out = tmp_path / "r.jsonl"
    methods = "zeroshot;tip_adapter_f:epochs=3;clip_adapter:epochs=2,ratio_grid=[0.6]"
    code, _, err = run(bench(out, "--bundle", bundle, "--methods", methods), capsys)
    assert code == 0, err
    records = {r["method"]: r for r in read_results(out)}
    zs = records["zeroshot"]
    assert zs["text"]["templates_name"] == "imagenet7" and zs["text"]["templates_count"] == 7
    assert len(zs["text"]["templates_sha256"]) == 64
    assert zs["text"]["descriptions_file"] == "desc.json"
    assert len(zs["text"]["descriptions_file_sha256"]) == 64
    assert zs["draw"]["rule"].startswith("draw_few_shot") and zs["draw"]["train_index_sha"]
    assert zs["checkpoint"] is None  # nothing trained
    sweep = json.loads((tmp_path / "r.jsonl.sweep.json").read_text())
    assert sweep["classnames"] == {zs["classnames_sha256"]: ["green_disc", "red_square"]}
    assert "classnames" not in zs  # the names are stored once, in the sweep file
    tip_f = records["tip_adapter_f"]["checkpoint"]
    assert tip_f["rule"] == "validation accuracy" and 1 <= tip_f["epoch"] <= 3
    assert records["clip_adapter"]["checkpoint"] == {
        "rule": "last epoch (no selection)",
        "epoch": 2,
    }
