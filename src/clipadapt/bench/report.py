"""Tables and plots from result records: the tables and Figure 1 of a few-shot CLIP paper.

All tables take records as read from the results store (``read_results``); only ``status: ok``
records count, and a run id that appears more than once (``--rerun``) counts once, with its
newest line. Accuracy cells are the mean over seeds, ``± std`` the population standard
deviation over seeds (``statistics.pstdev``; shown when there are 2+ seeds), the ``average``
column is the unweighted mean of the row's cells (only when the row has every column), and the
best mean of each column is in bold. In the accuracy tables a cell below zero-shot CLIP on the
same dataset (a collapse: the adaptation made things worse) is marked ▼ (:func:`collapse_marks`);
the ECE table shows each run's expected calibration error (15 bins) the same way.

Nothing that differs is merged (:func:`label_records`): a row is one *method spec* (the method
with every hyperparameter it resolved to, labelled by the spec as typed, e.g.
``hegraph_adapter:edges=[pn]``), a column one *dataset as scored* (its name, backbone and bundle
fingerprint, and for runs on fixed groups the groups fitted and tuned on; a name shared by
different bundles, backbones or protocols gets one column each, labelled with the protocol, the
backbone and a short fingerprint). Within a cell only seeds are averaged (one line per seed,
the newest); :func:`merge_notes` says what was merged and what was kept apart.

:func:`write_report` writes everything into one folder and returns the paths it wrote.
"""

from __future__ import annotations

import csv
import io
import re
import statistics
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from clipadapt._utils import safe_name, stable_hash
from clipadapt.bench.results import latest_ok

ROW = "_row"
COLUMN = "_column"
#: The line under every table whose cells show "±" over seeds.
STD_NOTE = (
    "± is the population standard deviation over seeds (cells without ± ran one seed); "
    "accuracies are percentages."
)


def _classification(records: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in records if r.get("task", "classification") == "classification"]


def spec_key(record: dict[str, Any]) -> tuple[Any, str]:
    """What makes a row: the method and every hyperparameter it resolved to (``method_params``;
    older records: their ``params`` without the run seed, which ``evaluate`` sets per run)."""
    params = record.get("method_params")
    if params is None:
        params = {k: v for k, v in (record.get("params") or {}).items() if k != "seed"}
    return record.get("method"), stable_hash(params)


def data_key(record: dict[str, Any]) -> tuple[Any, Any, Any, Any]:
    """What makes a column: the dataset scored, its backbone, the fingerprint of the bundle
    (or episode file) it was scored on and, for a run on fixed groups (no shot count: e.g. fit
    on ``train_1shot``, tune on ``train_2shot``), which groups it fitted and tuned on; a K-shot
    run draws its rows, and its shots tell it apart."""
    fingerprint = (
        record.get("eval_bundle_fingerprint")
        or record.get("bundle_fingerprint")
        or record.get("episodes_fingerprint")
        or record.get("dataset_fingerprint")
    )
    protocol = None
    if record.get("shots") is None and record.get("train_set"):
        protocol = (record.get("train_set"), record.get("val_set"))
    return record.get("dataset"), record.get("backbone"), fingerprint, protocol


def label_records(records: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """The ``status: ok`` records (newest line per run id), each with a row and a column label.

    Rows: one per :func:`spec_key`, labelled by the shortest spec typed for it; two specs that
    share a label but resolve differently get a ``[params <hash>]`` suffix. Columns: one per
    :func:`data_key`, labelled by the dataset name, plus the backbone and/or a short bundle
    fingerprint where one name stands for several.
    """
    kept = latest_ok(records)
    spec_labels: dict[tuple[Any, str], str] = {}
    for r in kept:
        key = spec_key(r)
        label = str(r.get("method_spec") or r.get("method"))
        if key not in spec_labels or len(label) < len(spec_labels[key]):
            spec_labels[key] = label
    by_label: dict[str, list[tuple[Any, str]]] = defaultdict(list)
    for key, label in spec_labels.items():
        by_label[label].append(key)
    for label, keys in by_label.items():
        if len(keys) > 1:
            for key in keys:
                spec_labels[key] = f"{label} [params {key[1][:6]}]"
    data_labels: dict[tuple[Any, Any, Any, Any], str] = {}
    by_name: dict[Any, set[tuple[Any, Any, Any, Any]]] = defaultdict(set)
    for r in kept:
        by_name[r.get("dataset")].add(data_key(r))
    for name, keys in by_name.items():
        backbones = {k[1] for k in keys}
        prints = {k[2] for k in keys}
        protocols = {k[3] for k in keys}
        for key in keys:
            extra = []
            if len(protocols) > 1 and key[3] is not None:
                extra.append(f"fit {key[3][0]}, tune {key[3][1]}")
            if len(backbones) > 1:
                extra.append(str(key[1]))
            if len(prints) > 1:
                extra.append(str(key[2])[:6] if key[2] else "no fingerprint")
            data_labels[key] = f"{name} ({', '.join(extra)})" if extra else str(name)
    return [{**r, ROW: spec_labels[spec_key(r)], COLUMN: data_labels[data_key(r)]} for r in kept]


def _one_per_seed(records: list[dict[str, Any]], *keys: str) -> list[dict[str, Any]]:
    """One record per (``keys``..., seed): the newest, so a seed never counts twice."""
    newest: dict[tuple[Any, ...], dict[str, Any]] = {}
    for r in records:
        key = (*(r.get(k) for k in keys), r.get("seed"))
        if key not in newest or float(r.get("time") or 0) >= float(newest[key].get("time") or 0):
            newest[key] = r
    return list(newest.values())


def _labelled(records: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    records = list(records)
    if records and all(ROW in r for r in records):
        return records
    return label_records(records)


def summarize(
    records: Iterable[dict[str, Any]],
) -> dict[tuple[str, str, Any], tuple[float, float, int]]:
    """{(row, column, shots): (mean accuracy, std over seeds, number of seeds)}, rows and
    columns as labelled by :func:`label_records`."""
    groups: dict[tuple[str, str, Any], list[float]] = defaultdict(list)
    labelled = _one_per_seed(_labelled(records), ROW, COLUMN, "shots", "task")
    for r in labelled:
        groups[(r[ROW], r[COLUMN], r.get("shots"))].append(float(r["accuracy"]))
    return {
        k: (statistics.fmean(v), statistics.pstdev(v) if len(v) > 1 else 0.0, len(v))
        for k, v in groups.items()
    }


def merge_notes(records: Iterable[dict[str, Any]]) -> list[str]:
    """What the tables merged and what they kept apart, in words.

    One line per kind: how many result lines became how many table cells (seeds averaged),
    lines of one seed that were left out (an older duplicate), result files that share a cell,
    and every method name or dataset name that stands for several rows or columns (different
    specs, bundles or backbones) with their labels.
    """
    labelled = label_records(records)
    if not labelled:
        return []
    notes = []
    cells: dict[tuple[Any, ...], list[dict[str, Any]]] = defaultdict(list)
    for r in labelled:
        cells[(r.get("task"), r[ROW], r[COLUMN], r.get("shots"), r.get("role"))].append(r)
    kept = _one_per_seed(labelled, "task", ROW, COLUMN, "shots", "role")
    notes.append(
        f"merged: {len(kept)} result line(s) into {len(cells)} table cell(s), each the mean "
        "over seeds of one method spec on one dataset (one bundle and backbone) at one shot count"
    )
    if len(kept) < len(labelled):
        notes.append(
            f"left out: {len(labelled) - len(kept)} older line(s) of a seed that has a newer "
            "line in the same cell"
        )
    files = {
        key: sorted({str(r["_file"]) for r in rs if r.get("_file")}) for key, rs in cells.items()
    }
    shared = [(key, f) for key, f in files.items() if len(f) > 1]
    if shared:
        example = shared[0]
        notes.append(
            f"merged across files: {len(shared)} cell(s) hold runs of several results files "
            f"(e.g. {example[0][1]} on {example[0][2]}: {', '.join(example[1])})"
        )
    rows: dict[Any, set[str]] = defaultdict(set)
    columns: dict[Any, set[str]] = defaultdict(set)
    for r in labelled:
        rows[r.get("method")].add(r[ROW])
        columns[r.get("dataset")].add(r[COLUMN])
    for method, labels in sorted(rows.items(), key=lambda x: str(x[0])):
        if len(labels) > 1:
            notes.append(
                f"kept apart: {method} ran with {len(labels)} different specs, one row each: "
                + "; ".join(sorted(labels))
            )
    for dataset, labels in sorted(columns.items(), key=lambda x: str(x[0])):
        if len(labels) > 1:
            notes.append(
                f"kept apart: {dataset} names {len(labels)} different bundles or backbones, "
                "one column each: " + "; ".join(sorted(labels))
            )
    return notes


# ----------------------------------------------------------------------------- generic table
@dataclass
class Table:
    """A rows × columns table of (mean, std, n) cells with an optional average column.

    Attributes:
        title: shown above the Markdown table.
        corner: the header of the row-label column.
        rows, columns: labels in display order.
        cells: {(row, column): (mean, std, n)}.
        average: add the row-mean column.
        average_over: the columns the average is over (default: all; DG: the targets).
        column_digits: decimals of particular columns (default ``digits``).
        higher_is_better: bold the max (True) or min (False) of each column; None: no bold.
        digits: decimals shown.
        spread_note: the line under the Markdown table saying what "±" is (shown when a cell
            has ±).
        marks: {(row, column): mark} shown after a cell's text (e.g. :data:`COLLAPSE_MARK`).
        note: a line under the Markdown table (what the marks mean).
    """

    title: str
    corner: str
    rows: list[str]
    columns: list[str]
    cells: dict[tuple[str, str], tuple[float, float, int]]
    average: bool = True
    higher_is_better: bool | None = True
    digits: int = 1
    average_over: list[str] | None = None
    column_digits: dict[str, int] | None = None
    spread_note: str = STD_NOTE
    marks: dict[tuple[str, str], str] | None = None
    note: str | None = None

    def row_average(self, row: str) -> float | None:
        """Mean of the row over ``average_over`` (default all columns); None if one is missing."""
        columns = self.columns if self.average_over is None else self.average_over
        values = [self.cells[(row, c)][0] for c in columns if (row, c) in self.cells]
        if not values or len(values) < len(columns):
            return None
        return sum(values) / len(values)

    def _best(self) -> dict[str, float]:
        best: dict[str, float] = {}
        if self.higher_is_better is None:
            return best
        pick = max if self.higher_is_better else min
        for c in self.columns:
            values = [self.cells[(r, c)][0] for r in self.rows if (r, c) in self.cells]
            if len(values) > 1:
                best[c] = pick(values)
        if self.average:
            averages = [a for r in self.rows if (a := self.row_average(r)) is not None]
            if len(averages) > 1:
                best["average"] = pick(averages)
        return best

    def _text(self, mean: float, std: float, n: int, with_std: bool, column: str = "") -> str:
        digits = (self.column_digits or {}).get(column, self.digits)
        text = f"{mean:.{digits}f}"
        if with_std and n > 1:
            text += f" ± {std:.{digits}f}"
        return text

    def markdown(self, with_std: bool = True) -> str:
        """The table as GitHub Markdown ("–" marks a missing cell)."""
        best = self._best()
        header = [self.corner, *self.columns] + (["average"] if self.average else [])
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for r in self.rows:
            out = [r]
            for c in self.columns:
                if (r, c) not in self.cells:
                    out.append("–")
                    continue
                mean, std, n = self.cells[(r, c)]
                text = self._text(mean, std, n, with_std, c)
                text = f"**{text}**" if c in best and abs(mean - best[c]) < 1e-9 else text
                mark = (self.marks or {}).get((r, c))
                out.append(f"{text} {mark}" if mark else text)
            if self.average:
                a = self.row_average(r)
                text = "–" if a is None else f"{a:.{self.digits}f}"
                bold = a is not None and "average" in best and abs(a - best["average"]) < 1e-9
                out.append(f"**{text}**" if bold else text)
            lines.append("| " + " | ".join(out) + " |")
        text = "\n".join(lines) + "\n"
        if with_std and any(n > 1 for _, _, n in self.cells.values()):
            text += f"\n{self.spread_note}\n"
        if self.note:
            text += f"\n{self.note}\n"
        return text

    def csv(self) -> str:
        """The table as CSV: one ``mean`` and one ``std`` column per column (plus average)."""
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        header = [self.corner]
        for c in self.columns:
            header += [f"{c} mean", f"{c} std", f"{c} n"]
        writer.writerow(header + (["average"] if self.average else []))
        for r in self.rows:
            row: list[Any] = [r]
            for c in self.columns:
                mean, std, n = self.cells.get((r, c), (None, None, 0))
                row += [
                    "" if mean is None else round(mean, 4),
                    "" if std is None else round(std, 4),
                    n,
                ]
            if self.average:
                a = self.row_average(r)
                row.append("" if a is None else round(a, 4))
            writer.writerow(row)
        return buffer.getvalue()


def _stats(values: list[float]) -> tuple[float, float, int]:
    return (
        statistics.fmean(values),
        statistics.pstdev(values) if len(values) > 1 else 0.0,
        len(values),
    )


def _method_order(methods: Iterable[str]) -> list[str]:
    return sorted(set(methods))


#: The mark of a table cell whose mean accuracy is below zero-shot CLIP's on the same column.
COLLAPSE_MARK = "▼"
ZERO_SHOT = "zeroshot"


def zero_shot_accuracy(records: Iterable[dict[str, Any]]) -> dict[str, float]:
    """{column: zero-shot CLIP's mean accuracy there} from the ``zeroshot`` runs among the
    (labelled, classification) records, any shot count (zero-shot does not use the shots).
    Where zero-shot ran with several specs, the plain ``zeroshot`` row (else the first label)
    is the reference."""
    by: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in _one_per_seed(list(records), ROW, COLUMN, "shots"):
        if r.get("method") == ZERO_SHOT:
            by[r[COLUMN]][r[ROW]].append(float(r["accuracy"]))
    out = {}
    for column, rows in by.items():
        label = ZERO_SHOT if ZERO_SHOT in rows else sorted(rows)[0]
        out[column] = statistics.fmean(rows[label])
    return out


def collapse_marks(
    cells: dict[tuple[str, str], tuple[float, float, int]],
    reference: dict[str, float],
    column_of: Any = None,
) -> tuple[dict[tuple[str, str], str], str | None]:
    """Marks for the cells whose mean is below zero-shot on their dataset (a collapse), and the
    note saying so (None when no cell is marked). ``column_of`` maps a table column to the
    dataset column of ``reference`` (default: the same name); zero-shot's own rows are never
    marked, and a cell without a zero-shot reference is not judged."""
    marks = {}
    for (row, column), (mean, _, _) in cells.items():
        ref = reference.get(column_of(column) if column_of else column)
        if ref is not None and not row.startswith(ZERO_SHOT) and mean < ref - 1e-9:
            marks[(row, column)] = COLLAPSE_MARK
    if not marks:
        return {}, None
    return marks, (
        f"{COLLAPSE_MARK} below zero-shot CLIP on the same dataset (a collapse): "
        f"{len(marks)} cell(s)"
    )


# ----------------------------------------------------------------------------- paper tables
def paper_table(records: Iterable[dict[str, Any]], shots: int | None = None) -> Table:
    """Methods × datasets at one shot count, with the average column.

    The default shot count is :func:`default_shots`: the largest one every dataset has.

    Datasets with a fixed train group (shots None) are included as they are.
    """
    records = _classification(_labelled(records))
    if shots is None:
        shots = default_shots(records)
    groups: dict[tuple[str, str], list[float]] = defaultdict(list)
    for r in _one_per_seed(records, ROW, COLUMN, "shots"):
        if r.get("shots") in (shots, None):
            groups[(r[ROW], r[COLUMN])].append(float(r["accuracy"]))
    cells = {k: _stats(v) for k, v in groups.items()}
    title = f"{shots}-shot accuracy (%)" if shots is not None else "accuracy (%)"
    marks, note = collapse_marks(cells, zero_shot_accuracy(records))
    return Table(
        title,
        "method",
        _method_order(k[0] for k in cells),
        sorted({k[1] for k in cells}),
        cells,
        marks=marks,
        note=note,
    )


def ece_table(records: Iterable[dict[str, Any]], shots: int | None = None) -> Table | None:
    """Methods × datasets at one shot count (default :func:`default_shots`): expected
    calibration error (%, 15 bins, lower is better) of the runs that recorded it (``ece``);
    None when none did."""
    records = [r for r in _classification(_labelled(records)) if r.get("ece") is not None]
    if not records:
        return None
    if shots is None:
        shots = default_shots(records)
    groups: dict[tuple[str, str], list[float]] = defaultdict(list)
    for r in _one_per_seed(records, ROW, COLUMN, "shots"):
        if r.get("shots") in (shots, None):
            groups[(r[ROW], r[COLUMN])].append(float(r["ece"]))
    cells = {k: _stats(v) for k, v in groups.items()}
    return Table(
        (f"{shots}-shot " if shots is not None else "")
        + "expected calibration error (%, 15 bins, lower is better)",
        "method",
        _method_order(k[0] for k in cells),
        sorted({k[1] for k in cells}),
        cells,
        higher_is_better=False,
    )


def default_shots(records: Iterable[dict[str, Any]]) -> int | None:
    """The largest shot count every dataset has (else the largest run), for the main table."""
    per: dict[str, set[int]] = defaultdict(set)
    for r in _classification(records):
        if r.get("shots") is not None:
            per[r.get(COLUMN, r["dataset"])].add(int(r["shots"]))
    if not per:
        return None
    common = set.intersection(*per.values())
    return max(common) if common else max(max(v) for v in per.values())


def shots_tables(records: Iterable[dict[str, Any]]) -> dict[str, Table]:
    """Per dataset (and ``average`` over datasets): methods × shots, no average column.

    The ``average`` table's cell is the mean over datasets of the per-dataset seed means (only
    for methods that have that shot count on every dataset); its std is over datasets.
    """
    labelled = _classification(_labelled(records))
    stats = summarize(labelled)
    reference = zero_shot_accuracy(labelled)
    datasets = sorted({k[1] for k in stats})
    out: dict[str, Table] = {}
    for d in datasets:
        cells = {
            (m, f"{k}-shot"): v for (m, dd, k), v in stats.items() if dd == d and k is not None
        }
        if not cells:
            continue
        shots = sorted({k for (_, dd, k) in stats if dd == d and k is not None})
        marks, note = collapse_marks(cells, reference, lambda _column, d=d: d)
        out[d] = Table(
            f"{d}: accuracy (%) by shots",
            "method",
            _method_order(m for m, _ in cells),
            [f"{k}-shot" for k in shots],
            cells,
            average=False,
            marks=marks,
            note=note,
        )
    shots = sorted({k[2] for k in stats if k[2] is not None})
    methods = _method_order(k[0] for k in stats)
    avg: dict[tuple[str, str], tuple[float, float, int]] = {}
    for m in methods:
        for k in shots:
            values = [stats[(m, d, k)][0] for d in datasets if (m, d, k) in stats]
            if datasets and len(values) == len(datasets):
                avg[(m, f"{k}-shot")] = _stats(values)
    if avg and len(datasets) > 1:
        out["average"] = Table(
            f"average over {len(datasets)} datasets: accuracy (%) by shots",
            "method",
            _method_order(m for m, _ in avg),
            [f"{k}-shot" for k in shots],
            avg,
            average=False,
            spread_note="± is the population standard deviation over datasets (of each "
            "dataset's mean over seeds); accuracies are percentages.",
        )
    return out


def cost_table(records: Iterable[dict[str, Any]]) -> Table:
    """Methods × (fit seconds, predict seconds, trainable parameters), means over all runs."""
    groups: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in _classification(_labelled(records)):
        for key in ("fit_seconds", "predict_seconds", "trainable_params"):
            if r.get(key) is not None:
                groups[r[ROW]][key].append(float(r[key]))
    columns = {"fit_seconds": "fit s", "predict_seconds": "predict s", "trainable_params": "params"}
    cells = {}
    for m, values in groups.items():
        for key, label in columns.items():
            if values[key]:
                cells[(m, label)] = _stats(values[key])
    return Table(
        "cost per run (mean over runs; params at the runs' C, D, K)",
        "method",
        _method_order(groups),
        list(columns.values()),
        cells,
        average=False,
        higher_is_better=None,
        digits=3,
        column_digits={"params": 0},
        spread_note="± is the population standard deviation over runs.",
    )


def dg_table(records: Iterable[dict[str, Any]]) -> Table | None:
    """Domain generalisation: methods × (source, targets...), ``average`` over the targets."""
    dg = [r for r in _labelled(records) if r.get("task") == "domain_generalization"]
    if not dg:
        return None
    groups: dict[tuple[str, str], list[float]] = defaultdict(list)
    sources, targets = [], []
    for r in _one_per_seed(dg, ROW, COLUMN, "shots", "role"):
        label = r[COLUMN]
        (sources if r.get("role") == "source" else targets).append(label)
        groups[(r[ROW], label)].append(float(r["accuracy"]))
    cells = {k: _stats(v) for k, v in groups.items()}
    src = sorted(set(sources))
    tgt = sorted(set(targets) - set(src))
    return Table(
        "domain generalisation: accuracy (%) (average = target average)",
        "method",
        _method_order(k[0] for k in cells),
        [*src, *tgt],
        cells,
        average=bool(tgt),
        average_over=tgt,
    )


def episodes_table(records: Iterable[dict[str, Any]]) -> str | None:
    """Reasoning episodes: methods × episode sets, ``mean ± 95 % CI (n=episodes)``.

    An episode set whose records have named subsets (Bongard-HOI's four test splits) gets one
    column per subset and its ``average``, as the paper tabulates them
    (:func:`~clipadapt.tasks.episodes.episode_table_cells`); other sets get one column. The
    mean is over seeds; the interval is seed 1's (the first seed run): it is about episodes,
    not seeds. A note under the table says what ± is.
    """
    from clipadapt.tasks.episodes import episode_table_cells

    eps = [r for r in _labelled(records) if r.get("task") == "episodes"]
    if not eps:
        return None
    eps = _one_per_seed(eps, ROW, COLUMN)
    sets = sorted({r[COLUMN] for r in eps})
    methods = _method_order(r[ROW] for r in eps)
    by = defaultdict(list)
    for r in eps:
        by[(r[ROW], r[COLUMN])].append(r)
    # each set's column headings, from its first record with subsets (else the set's name)
    headings: dict[str, list[str]] = {}
    for s in sets:
        with_subsets = [r for r in eps if r[COLUMN] == s and r.get("subsets")]
        if with_subsets:
            cells = [h for h, *_ in episode_table_cells(with_subsets[0])]
            headings[s] = [f"{s}: {h}" if len(sets) > 1 else h for h in cells]
        else:
            headings[s] = [s]
    columns = [h for s in sets for h in headings[s]]
    lines = ["| method | " + " | ".join(columns) + " |", "|" + "---|" * (len(columns) + 1)]
    any_subsets = any(len(h) > 1 or r.get("subsets") for s, h in headings.items() for r in eps)
    for m in methods:
        row = []
        for s in sets:
            rs = sorted(by.get((m, s), []), key=lambda r: r.get("seed", 0))
            if not rs:
                row += ["–"] * len(headings[s])
                continue
            per_seed = [episode_table_cells(r) for r in rs]
            if any(len(c) != len(headings[s]) for c in per_seed):
                row += ["–"] * len(headings[s])  # a record of another split layout
                continue
            for i in range(len(headings[s])):
                mean = statistics.fmean(c[i][1] for c in per_seed)
                _, _, ci, n = per_seed[0][i]
                row.append(f"{mean:.1f} ± {ci:.1f} (n={n})")
        lines.append(f"| {m} | " + " | ".join(row) + " |")
    note = (
        "\n± is the half-width of the 95 % confidence interval over episodes (normal "
        "approximation, 1.96 standard errors; seed 1's when several seeds ran), n the number "
        "of episodes; accuracies are percentages"
    )
    if any_subsets:
        note += (
            "; `average` is the unweighted mean of the split accuracies, with the interval of "
            "that mean"
        )
    return "\n".join(lines) + "\n" + note + ".\n"


# ----------------------------------------------------------------------------- old API
def markdown_table(records: Iterable[dict[str, Any]], with_std: bool = True) -> str:
    """Rows: methods; columns: dataset × shots, then the average; best per column in bold."""
    stats = summarize(_classification(records))
    columns = sorted(
        {(k[1], k[2]) for k in stats}, key=lambda c: (c[0], c[1] if c[1] is not None else -1)
    )
    labels = {c: f"{c[0]} {c[1]}-shot" if c[1] is not None else c[0] for c in columns}
    cells = {(m, labels[(d, s)]): v for (m, d, s), v in stats.items()}
    table = Table(
        "accuracy (%)", "method", _method_order(k[0] for k in stats), list(labels.values()), cells
    )
    return table.markdown(with_std=with_std)


#: What the error bars of :func:`accuracy_vs_shots_figure` are, by task.
SPREAD = {
    "classification": "error bars: ± 1 standard deviation over seeds (population)",
    "episodes": "error bars: the 95 % confidence interval over episodes (seed 1's)",
}


def _shot_series(
    records: list[dict[str, Any]],
) -> tuple[str, dict[tuple[str, str], dict[int, tuple[float, float]]]]:
    """``(task, {(panel, method): {shots: (mean accuracy, error)}})`` of the records that have
    shots: classification (error = std over seeds) when there is any, else episodes (error =
    the 95 % interval over episodes)."""
    labelled = [r for r in _labelled(records) if r.get("shots") is not None]
    classification = _classification(labelled)
    series: dict[tuple[str, str], dict[int, tuple[float, float]]] = defaultdict(dict)
    if classification or not labelled:
        for (m, d, k), (mean, std, _) in summarize(classification).items():
            series[(d, m)][int(k)] = (mean, std)
        return "classification", series
    eps = _one_per_seed([r for r in labelled if r.get("task") == "episodes"], ROW, COLUMN, "shots")
    by: dict[tuple[str, str, int], list[dict[str, Any]]] = defaultdict(list)
    for r in eps:
        by[(r[COLUMN], r[ROW], int(r["shots"]))].append(r)
    for (d, m, k), rs in by.items():
        rs.sort(key=lambda r: r.get("seed", 0))
        mean = statistics.fmean(float(r["accuracy"]) for r in rs)
        series[(d, m)][k] = (mean, float(rs[0].get("ci95", 0.0)))
    return "episodes", series


def accuracy_vs_shots_figure(records: Iterable[dict[str, Any]]) -> Any:
    """The accuracy-vs-shots figure (a matplotlib ``Figure``; Agg backend).

    One panel per dataset plus an average panel: accuracy (%) vs shots per class on a log2 axis
    whose ticks are exactly the shot counts that ran (1, 2, 4, 8, 16), one line per method with
    error bars (classification: ± 1 population standard deviation over seeds; episodes: the 95 %
    interval over episodes), said in the title. A method keeps its colour and marker in every
    panel, and each method's points sit a little left or right of the true shot count, so lines
    that tie stay visible. The average panel (mean over datasets, no error bars: the spread of a
    mean over datasets is not the seeds') has a point only where the method ran on every
    dataset, and is left out when no method did.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullLocator

    records = list(records)
    task, series = _shot_series(records)
    datasets = sorted({d for d, _ in series})
    methods = sorted({m for _, m in series})
    # tab20's even entries are ten strong colours, the odd ones their light twins: step through
    # the strong ones first, and pair each with a distinct marker, so no two methods look alike
    colours = plt.get_cmap("tab20")
    markers = "osD^v<>ph*XPd8H"
    style = {
        m: (colours((2 * i) % 20 + (i // 10) % 2), markers[i % len(markers)])
        for i, m in enumerate(methods)
    }
    # a spread of at most ±0.2 octave: ties separate, and 1, 2, 4 ... stay far apart
    step = min(0.08, 0.4 / max(len(methods) - 1, 1))
    offset = {m: 2 ** ((i - (len(methods) - 1) / 2) * step) for i, m in enumerate(methods)}
    ticks = sorted({k for points in series.values() for k in points})

    def average(m: str) -> dict[int, tuple[float, float]]:
        out = {}
        for k in ticks:
            vals = [series[(d, m)][k][0] for d in datasets if k in series.get((d, m), {})]
            if len(vals) == len(datasets):
                out[k] = (sum(vals) / len(vals), 0.0)
        return out

    panels = list(datasets)
    if len(datasets) > 1 and any(average(m) for m in methods):
        panels.append("average")
    cols = max(1, min(3, len(panels)))
    rows = max(1, (len(panels) + cols - 1) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.4 * rows + 0.6), squeeze=False)
    for ax, panel in zip(axes.flat, panels, strict=False):
        for m in methods:
            points = average(m) if panel == "average" else series.get((panel, m), {})
            if not points:
                continue
            shots = sorted(points)
            colour, marker = style[m]
            ax.errorbar(
                [k * offset[m] for k in shots],
                [points[k][0] for k in shots],
                yerr=None if panel == "average" else [points[k][1] for k in shots],
                marker=marker,
                markersize=5,
                color=colour,
                capsize=2,
                linewidth=1.2,
                label=m,
            )
        ax.set_title(panel)
        ax.set_xscale("log", base=2)
        ax.set_xticks(ticks, labels=[str(k) for k in ticks])
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_xlabel("shots per class")
        ax.set_ylabel("accuracy (%)")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    handles = [plt.Line2D([], [], color=style[m][0], marker=style[m][1], label=m) for m in methods]
    fig.legend(handles=handles, loc="lower center", ncol=min(5, max(len(methods), 1)), fontsize=8)
    n_seeds = sorted({r.get("seed") for r in records if r.get("shots") is not None} - {None})
    fig.suptitle(
        f"accuracy (%) vs shots, mean over seeds ({len(n_seeds)} seed(s)); {SPREAD[task]}; "
        "points shifted slightly along x so tied lines stay visible"
        + ("; average panel: mean over datasets, no error bars" if "average" in panels else ""),
        fontsize=8,
        wrap=True,
    )
    fig.tight_layout(rect=(0, 0.08, 1, 0.95))
    return fig


def plot_accuracy_vs_shots(records: Iterable[dict[str, Any]], path: str | Path) -> Path:
    """Write :func:`accuracy_vs_shots_figure` of ``records`` to ``path`` (PNG); returns it."""
    import matplotlib.pyplot as plt

    fig = accuracy_vs_shots_figure(list(records))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------- published
_BACKBONE = re.compile(r"(RN50x16|RN50x4|RN101|RN50|ViT-[BL][-/]\d+)", re.IGNORECASE)


def canonical_backbone(name: str | None) -> str | None:
    """'OpenAI CLIP ViT-B/32', 'ViT-B-32:openai' -> 'ViT-B/32'; None when not recognised."""
    if not name:
        return None
    match = _BACKBONE.search(name)
    if match is None:
        return None
    text = match.group(1)
    return (
        text.upper()
        if text.lower().startswith("rn")
        else text.replace("-", "/", 2).replace("ViT/", "ViT-").replace("vit/", "ViT-")
    )


def load_published(path: str | Path | None = None) -> list[dict[str, Any]]:
    """The papers' published numbers (``bench/published.yaml``): a list of entries with
    ``method, dataset, shots, backbone, task, accuracy, source``."""
    import yaml

    if path is None:
        path = Path(__file__).with_name("published.yaml")
    data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    entries = []
    for table in data["tables"]:
        shared = {k: v for k, v in table.items() if k != "rows"}
        for row in table["rows"]:
            entries.append({**shared, **row})
    return entries


def compare_published(
    records: Iterable[dict[str, Any]], published: Sequence[dict[str, Any]] | None = None
) -> str:
    """Our numbers beside the papers' for every (task, method, dataset) we ran.

    Each published number at a shot count we ran is listed with its source and backbone (rows
    we have no run for are left out). ``ours`` is our mean over
    seeds at the same shots (a published ``shots: null``, zero-shot, matches our runs at any
    shots) on each of our backbones; Δ is given only when the backbones agree, since numbers
    from different backbones are not comparable.
    """
    published = load_published() if published is None else published
    ours: dict[tuple, list[float]] = defaultdict(list)
    labelled = _labelled(records)
    for r in _one_per_seed(labelled, ROW, COLUMN, "shots", "task", "role"):
        key = (
            r.get("task", "classification"),
            r["method"],
            r["dataset"],
            (
                canonical_backbone(r.get("backbone")) or str(r.get("backbone")),
                r[ROW],
                r[COLUMN],
            ),
        )
        ours[key + (r.get("shots"),)].append(float(r["accuracy"]))
        ours[key + ("any",)].append(float(r["accuracy"]))
    ran: dict[tuple, set] = {k[:3]: set() for k in ours}
    for k in ours:
        ran[k[:3]].add(k[3])
    lines = [
        "| task | method | dataset | shots | published | backbone | source | ours | our backbone | Δ |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    rows = [
        e for e in published if (e.get("task", "classification"), e["method"], e["dataset"]) in ran
    ]
    rows.sort(key=lambda e: (e.get("task", ""), e["dataset"], e["method"], e.get("shots") or 0))
    for e in rows:
        task = e.get("task", "classification")
        theirs = float(e["accuracy"])
        their_bb = canonical_backbone(e.get("backbone")) or e.get("backbone")
        for ident in sorted(ran[(task, e["method"], e["dataset"])]):
            bb, row, column = ident
            shots = e.get("shots") if e.get("shots") is not None else "any"
            mine = ours.get((task, e["method"], e["dataset"], ident, shots))
            if not mine:
                continue  # only numbers we can put ours beside
            mean = statistics.fmean(mine)
            ours_text = f"{mean:.2f} (n={len(mine)})"
            if row != e["method"] or column != e["dataset"]:
                ours_text += f" [{row} on {column}]"
            delta = f"{mean - theirs:+.2f}" if bb == their_bb else "–"
            lines.append(
                f"| {task} | {e['method']} | {e['dataset']} | {e.get('shots') or 'zero-shot'} | "
                f"{theirs:.2f} | {e.get('backbone')} | {e['source']} | {ours_text} | {bb} | {delta} |"
            )
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- one folder
def write_report(
    records: Iterable[dict[str, Any]],
    out: str | Path,
    shots: int | None = None,
    compare: str | None = None,
) -> dict[str, Path]:
    """Write the tables (Markdown + CSV), the plot and the cost table into ``out``.

    Args:
        records: result records (any tasks).
        out: the output folder.
        shots: the shot count of ``table.md`` (default: :func:`default_shots`); every shot
            count also gets ``table_{K}shot.md/.csv``.
        compare: "published" to add ``published.md`` (our numbers beside the papers').

    Returns:
        {name: path} of every file written (``report.md`` gathers all tables).
    """
    records = list(records)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    sections: list[str] = []

    def put(name: str, text: str) -> Path:
        path = out / name
        path.write_text(text, encoding="utf-8")
        written[name] = path
        return path

    labelled = label_records(records)
    classification = _classification(labelled)
    if classification:
        main = paper_table(classification, shots)
        put("table.md", main.markdown())
        put("table.csv", main.csv())
        sections.append(f"## {main.title}\n\n{main.markdown()}")
        for k in sorted({r["shots"] for r in classification if r.get("shots") is not None}):
            table = paper_table(classification, k)
            put(f"table_{k}shot.md", table.markdown())
            put(f"table_{k}shot.csv", table.csv())
        for name, table in shots_tables(classification).items():
            put(f"shots_{safe_name(name)}.md", table.markdown())
            put(f"shots_{safe_name(name)}.csv", table.csv())
            sections.append(f"## {table.title}\n\n{table.markdown()}")
        ece = ece_table(classification, shots)
        if ece is not None:
            put("ece.md", ece.markdown())
            put("ece.csv", ece.csv())
            sections.append(f"## {ece.title}\n\n{ece.markdown()}")
        cost = cost_table(classification)
        put("cost.md", cost.markdown(with_std=False))
        put("cost.csv", cost.csv())
        sections.append(f"## {cost.title}\n\n{cost.markdown(with_std=False)}")
        if any(r.get("shots") is not None for r in classification):
            plot = plot_accuracy_vs_shots(classification, out / "accuracy_vs_shots.png")
            written["accuracy_vs_shots.png"] = plot
            sections.append("![accuracy vs shots](accuracy_vs_shots.png)\n")
    dg = dg_table(labelled)
    if dg is not None:
        put("dg.md", dg.markdown())
        put("dg.csv", dg.csv())
        sections.append(f"## {dg.title}\n\n{dg.markdown()}")
    episodes = episodes_table(labelled)
    if episodes is not None:
        put("episodes.md", episodes)
        sections.append(f"## reasoning episodes: accuracy (%) ± 95 % CI\n\n{episodes}")
    if compare == "published":
        text = compare_published(labelled)
        put("published.md", text)
        sections.append(f"## ours vs published\n\n{text}")
    notes = merge_notes(records)
    if notes:
        put("merged.md", "".join(f"- {n}\n" for n in notes))
        sections.append("## what was merged\n\n" + "".join(f"- {n}\n" for n in notes))
    put("report.md", "\n".join(sections))
    return written
