"""Plots and tables people can read: the accuracy-vs-shots figure's ticks, error bars, markers
and offsets are read back from the figure (Agg), and every table says what its "±" is."""

from __future__ import annotations

import statistics

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402
from matplotlib.container import ErrorbarContainer  # noqa: E402

from clipadapt.bench.report import (  # noqa: E402
    STD_NOTE,
    accuracy_vs_shots_figure,
    episodes_table,
    paper_table,
    shots_tables,
)

SHOTS = (1, 2, 4, 8, 16)


def _record(method: str, dataset: str, shots: int, seed: int, accuracy: float, **extra):
    return {
        "status": "ok",
        "task": "classification",
        "method": method,
        "method_spec": method,
        "method_params": {"m": method},
        "dataset": dataset,
        "backbone": "world",
        "bundle_fingerprint": f"fp-{dataset}",
        "shots": shots,
        "seed": seed,
        "accuracy": accuracy,
        "run_id": f"{method}-{dataset}-{shots}-{seed}",
        **extra,
    }


@pytest.fixture()
def records() -> list[dict]:
    rows = []
    for dataset, base in (("pets", 60.0), ("dtd", 40.0)):
        for k in SHOTS:
            for seed, noise in ((1, -1.0), (2, 1.0), (3, 0.0)):
                rows.append(_record("tip", dataset, k, seed, base + k + noise))
                # two methods that tie exactly: both must stay visible
                rows.append(_record("lp_a", dataset, k, seed, base + 2 * k))
                rows.append(_record("lp_b", dataset, k, seed, base + 2 * k))
    return rows


def _panel(fig, title: str):
    return next(ax for ax in fig.axes if ax.get_title() == title)


def _bars(ax) -> dict[str, ErrorbarContainer]:
    return {c.get_label(): c for c in ax.containers if isinstance(c, ErrorbarContainer)}


def test_ticks_are_exactly_the_shot_counts_on_a_log2_axis(records):
    fig = accuracy_vs_shots_figure(records)
    try:
        for title in ("pets", "dtd", "average"):
            ax = _panel(fig, title)
            assert ax.get_xscale() == "log"
            assert list(ax.get_xticks()) == list(SHOTS)
            assert [t.get_text() for t in ax.get_xticklabels()] == ["1", "2", "4", "8", "16"]
            assert len(ax.xaxis.get_minorticklocs()) == 0
    finally:
        plt.close(fig)


def test_error_bars_are_the_std_over_seeds_and_the_caption_says_so(records):
    fig = accuracy_vs_shots_figure(records)
    try:
        bars = _bars(_panel(fig, "pets"))
        assert set(bars) == {"tip", "lp_a", "lp_b"}
        tip = bars["tip"]
        _, ys = tip.lines[0].get_data()
        assert list(ys) == pytest.approx([60.0 + k for k in SHOTS])
        (segments,) = tip.lines[2]  # the vertical bars: one segment per shot count
        half = [(seg[1][1] - seg[0][1]) / 2 for seg in segments.get_segments()]
        assert half == pytest.approx([statistics.pstdev([-1.0, 1.0, 0.0])] * len(SHOTS))
        caption = fig._suptitle.get_text()
        assert "standard deviation over seeds" in caption and "3 seed(s)" in caption
        # the average panel has no error bars: its spread would be over datasets, not seeds
        assert all(c.lines[2] == () for c in _bars(_panel(fig, "average")).values())
    finally:
        plt.close(fig)


def test_tied_lines_stay_visible(records):
    fig = accuracy_vs_shots_figure(records)
    try:
        bars = _bars(_panel(fig, "dtd"))
        a, b = bars["lp_a"].lines[0], bars["lp_b"].lines[0]
        assert list(a.get_ydata()) == list(b.get_ydata())  # the same numbers ...
        xa, xb = a.get_xdata(), b.get_xdata()
        assert all(x != y for x, y in zip(xa, xb, strict=True))  # ... drawn side by side
        for xs in (xa, xb):  # close to the true shot count: well within a quarter octave
            assert all(abs(x / k - 1) < 0.2 for x, k in zip(xs, SHOTS, strict=True))
        assert a.get_marker() != b.get_marker()
    finally:
        plt.close(fig)


def test_episode_plots_use_the_95_percent_interval():
    rows = [
        {
            **_record("tip", "bongard", k, seed, 70.0 + k),
            "task": "episodes",
            "episodes_fingerprint": "e",
            "ci95": 3.0 + k / 10,
            "n_episodes": 20,
        }
        for k in (1, 2, 4)
        for seed in (1, 2)
    ]
    fig = accuracy_vs_shots_figure(rows)
    try:
        ax = _panel(fig, "bongard")
        (segments,) = _bars(ax)["tip"].lines[2]
        half = [(seg[1][1] - seg[0][1]) / 2 for seg in segments.get_segments()]
        assert half == pytest.approx([3.1, 3.2, 3.4])
        assert list(ax.get_xticks()) == [1, 2, 4]
        assert "95 % confidence interval" in fig._suptitle.get_text()
    finally:
        plt.close(fig)


def test_every_table_says_what_plus_minus_is(records):
    main = paper_table(records, 16).markdown()
    assert " ± " in main and main.rstrip().endswith(STD_NOTE)
    tables = shots_tables(records)
    assert tables["pets"].markdown().rstrip().endswith(STD_NOTE)
    average = tables["average"].markdown()
    assert "over datasets" in average.splitlines()[-1] and " ± " in average
    one_seed = [r for r in records if r["seed"] == 1]
    assert "±" not in paper_table(one_seed, 16).markdown()  # no ±, nothing to explain
    episodes = episodes_table(
        [
            {
                **_record("tip", "bongard", None, 1, 70.0),
                "task": "episodes",
                "episodes_fingerprint": "e",
                "ci95": 3.0,
                "n_episodes": 20,
            }
        ]
    )
    assert episodes is not None
    assert "± is the half-width of the 95 % confidence interval over episodes" in episodes
    assert episodes.rstrip().endswith("accuracies are percentages.")
