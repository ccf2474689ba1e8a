"""Progress reports: a bar on a terminal, plain lines anywhere else, nothing with --no-progress."""

from __future__ import annotations

import io
from pathlib import Path

from clipadapt._progress import progress


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_off_a_terminal_each_unit_is_one_line_when_units_are_few() -> None:
    out = io.StringIO()
    bar = progress(3, "bench", "cell", stream=out)
    for name in ("a", "b", "c"):
        bar.set_postfix_str(name)
        bar.update(1)
    bar.close()
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue()
    assert [line.split(" ")[1] for line in lines] == ["1/3", "2/3", "3/3"]
    assert lines[0].startswith("bench: 1/3 cell (33%)") and lines[0].endswith(" a")
    assert lines[-1].endswith(" c")


def test_off_a_terminal_many_units_print_one_line_per_step() -> None:
    out = io.StringIO()
    with progress(1000, "train", "img", stream=out, percent=10) as bar:
        for _ in range(250):
            bar.update(4)
    lines = out.getvalue().splitlines()
    assert len(lines) == 10  # one per 10 %, the last at 1000/1000, close adds nothing
    assert lines[-1].startswith("train: 1000/1000 img (100%)")


def test_close_prints_the_final_count_once_when_work_stops_early() -> None:
    out = io.StringIO()
    bar = progress(100, "x", stream=out, percent=50)
    bar.update(30)
    bar.close()
    bar.close()
    assert out.getvalue().splitlines() == [out.getvalue().splitlines()[0]]
    assert out.getvalue().startswith("x: 30/100 it (30%)")


def test_disabled_prints_nothing_and_a_terminal_gets_a_bar() -> None:
    quiet = _Terminal()
    bar = progress(5, "bench", stream=quiet, enabled=False)
    bar.update(5)
    bar.close()
    assert quiet.getvalue() == ""
    tty = _Terminal()
    with progress(5, "bench", stream=tty) as bar:
        bar.update(5)
    assert "\r" in tty.getvalue() and "5/5" in tty.getvalue()  # drawn in place by tqdm


def test_a_sweep_into_a_log_file_prints_lines_not_bar_redraws(tmp_path: Path, capsys) -> None:
    from clipadapt.bench.runner import Grid, run_grid
    from clipadapt.data.bundle import load_bundle
    from test_bench import toy_bundle

    bundle = load_bundle(toy_bundle(tmp_path / "b.safetensors", name="b"))
    run_grid(bundle, Grid(["zeroshot"], [1, 2], [1]), tmp_path / "r.jsonl", progress=True)
    err = capsys.readouterr().err  # pytest's capture is not a terminal, like a log file
    assert "\r" not in err
    lines = [line for line in err.splitlines() if line.startswith("bench:")]
    assert [line.split(" ")[1] for line in lines] == ["1/2", "2/2"]
    assert "zeroshot K=2" in lines[-1]
    run_grid(bundle, Grid(["zeroshot"], [4], [1]), tmp_path / "q.jsonl", progress=False)
    assert "bench:" not in capsys.readouterr().err  # --no-progress stays silent


def test_extraction_into_a_log_file_prints_lines(tmp_path: Path, tiny_encoder, capsys) -> None:
    from clipadapt.data.datasets import load_dataset
    from clipadapt.features.extract import extract_dataset
    from conftest import make_image_folder

    dataset = load_dataset(make_image_folder(tmp_path / "imgs", classes=2, per_class=4, size=24))
    capsys.readouterr()
    kwargs = dict(cache_dir=tmp_path / "c", views=1, batch_size=2, num_workers=0)
    extract_dataset(dataset, tiny_encoder, tmp_path / "b.safetensors", progress=True, **kwargs)
    err = capsys.readouterr().err
    assert "\r" not in err
    assert any(" img (100%)" in line for line in err.splitlines()), err
