"""The benchmark sections: training, reference ratio, extraction, prediction, sweep.

Each section returns plain dicts (the JSON report); :mod:`benchmarks.report` turns them into
Markdown. Sizes come from a :class:`Profile`: ``full`` is the ImageNet-16-shot shape of the
performance issue, ``quick`` a small problem for CI that checks the report is produced and the
reference parity holds, never wall-clock times.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import platform
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from benchmarks.measure import (
    BudgetExceeded,
    count_matmul_flops,
    gemm_rate,
    peak_memory,
    recording_plan,
    time_budget,
    timed,
)
from clipadapt.engine.train import limit_steps
from clipadapt.methods.base import create_method, list_methods, method_card, method_presets
from clipadapt.testing.checks import CheckFixture, make_fixture

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Profile:
    """Sizes and budgets of one benchmark run."""

    name: str
    classes: int
    dim: int
    shots: int
    views: int
    val_per_class: int
    test_per_class: int
    noise: float
    gemm_size: int
    probe_steps: int  # steps per timing probe (two probes: n and 2n steps)
    min_probe_seconds: float  # grow the probes until the n extra steps take this long
    full_budget_s: float  # run the whole paper schedule when its projection is within this
    reference_steps: int | None  # None: both implementations run the whole schedule
    extraction_images: int
    extraction_batch: int
    extraction_large_images: int  # ViT-B-32 at 224 px as a second, real-size encoder (0: skip)
    sweep_shots: tuple[int, ...]
    sweep_seeds: tuple[int, ...]
    sweep_methods: str
    sweep_size: str


PROFILES = {
    "full": Profile(
        name="full",
        classes=1000,
        dim=1024,
        shots=16,
        views=10,
        val_per_class=4,
        test_per_class=50,
        noise=0.16,
        gemm_size=2048,
        probe_steps=1,
        min_probe_seconds=3.0,
        full_budget_s=300.0,
        reference_steps=3,
        extraction_images=2048,
        extraction_batch=128,
        extraction_large_images=256,
        sweep_shots=(1, 2, 4, 8, 16),
        sweep_seeds=(1, 2, 3),
        sweep_methods="*",
        sweep_size="default",
    ),
    "quick": Profile(
        name="quick",
        classes=20,
        dim=64,
        shots=4,
        views=3,
        val_per_class=2,
        test_per_class=10,
        noise=0.3,
        gemm_size=256,
        probe_steps=2,
        min_probe_seconds=0.0,
        full_budget_s=30.0,
        reference_steps=None,
        extraction_images=64,
        extraction_batch=32,
        extraction_large_images=0,
        sweep_shots=(1, 2),
        sweep_seeds=(1,),
        sweep_methods="zeroshot,tip_adapter,tip_adapter_f",
        sweep_size="small",
    ),
}

#: Methods with a straightforward reference implementation (benchmarks/reference.py).
REFERENCE_METHODS = ("tip_adapter_f", "node_adapter", "hegraph_adapter")


def make_problem(profile: Profile) -> CheckFixture:
    """The synthetic problem: C classes x K shots x D dims with V augmented views, float32.

    Built with :func:`clipadapt.testing.make_fixture` (text vectors, shifted image clusters,
    negative and description features) with per-row noise ``profile.noise`` so accuracy stays
    well below 100 % and a parity check between implementations can fail.
    """
    return make_fixture(
        profile.classes,
        profile.dim,
        profile.shots,
        views=profile.views,
        val_per_class=profile.val_per_class,
        test_per_class=profile.test_per_class,
        noise_scale=profile.noise,
        seed=0,
    )


def machine() -> dict[str, Any]:
    """What ran the benchmark."""
    import os

    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": platform.python_version(),
    }


def method_options(name: str) -> dict[str, Any]:
    """Options of a benchmarked method: none, its defaults are the papers' ImageNet settings
    (the synthetic problem is ImageNet-shaped; per-dataset schedules are presets, e.g.
    HeGraphAdapter's, whose default is the schedule the paper uses for ImageNet)."""
    return {}


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 accuracy in percent."""
    if labels.numel() == 0:
        raise ValueError("accuracy of an empty set")
    return float((logits.argmax(dim=-1) == labels).float().mean() * 100.0)


# --------------------------------------------------------------------------------- training
def bench_training(
    name: str,
    problem: CheckFixture,
    profile: Profile,
    gemm_flops: float,
    device: str = "cpu",
    preset: str | None = None,
    budget: float | None = None,
) -> dict[str, Any]:
    """:func:`_bench_training`, with a probe that ran past the budget recorded, not raised."""
    try:
        return _bench_training(name, problem, profile, gemm_flops, device, preset, budget)
    except BudgetExceeded:
        return {
            "method": name,
            "preset": preset,
            "options": method_options(name),
            "steps": None,
            "epochs": None,
            "seconds_per_epoch": None,
            "fit_seconds": profile.full_budget_s if budget is None else budget,
            "fit_measured": False,
            "fit_unfinished": True,
            "flops": None,
            "peak_mib": None,
            "gemm_floor_seconds": None,
            "floor_ratio": None,
            "predict_rows_per_s": None,
            "test_accuracy": None,
        }


def _bench_training(
    name: str,
    problem: CheckFixture,
    profile: Profile,
    gemm_flops: float,
    device: str = "cpu",
    preset: str | None = None,
    budget: float | None = None,
) -> dict[str, Any]:
    """Time one method's fit with its paper schedule (or its ``preset``) on ``problem``.

    Two probes (``n`` and ``2n`` optimiser steps under :func:`limit_steps`) give the time per
    step and the fixed cost (setup, validation search); two FLOP-counted probes (1 and 2 steps)
    give the matmul FLOPs per step and the fixed FLOPs. When the projected full schedule fits
    ``profile.full_budget_s`` the whole schedule is run and measured; otherwise the total is
    projected and marked so. The GEMM floor is the schedule's matmul FLOPs over the measured
    GEMM rate.

    ``budget`` (seconds) replaces ``profile.full_budget_s`` when given; ``math.inf`` runs the
    whole schedule whatever its projection (the fast presets are always measured to the end).
    """
    options = method_options(name)
    train, text, val, test = problem.train, problem.text, problem.val, problem.test
    budget = profile.full_budget_s if budget is None else budget
    alarm = None if math.isinf(budget) else budget

    def fit(steps: int | None, with_val: bool = True) -> tuple[float, Any, Any]:
        method = create_method(name, preset=preset, **options)
        rows = val if with_val else None
        with recording_plan(steps) as plan, time_budget(alarm):
            seconds, _ = timed(lambda: method.fit(train, text, rows), device)
        return seconds, plan, method

    n = profile.probe_steps
    row: dict[str, Any] = {
        "method": name,
        "preset": preset,
        "options": options,
        "noise": profile.noise,
    }
    try:
        with peak_memory(device) as memory:
            t_n, plan, method = fit(n)
    except BudgetExceeded:
        # only a fit without a training loop (closed form, L-BFGS) can get here: its first
        # probe is the whole fit
        row.update(
            steps=0,
            epochs=None,
            seconds_per_epoch=None,
            fit_seconds=budget,
            fit_measured=False,
            fit_unfinished=True,
            flops=None,
            peak_mib=memory["peak_mib"],
            gemm_floor_seconds=None,
            floor_ratio=None,
            predict_rows_per_s=None,
            test_accuracy=None,
        )
        return row
    if not plan.loops:  # no training loop (closed form, L-BFGS): that fit was the whole fit
        flops, _ = count_matmul_flops(
            lambda: create_method(name, preset=preset, **options).fit(train, text, val)
        )
        row.update(
            steps=0,
            epochs=None,
            seconds_per_epoch=None,
            fit_seconds=t_n,
            fit_measured=True,
            flops=flops,
            peak_mib=memory["peak_mib"],
        )
        fitted = method
    else:
        # Probes run the real configuration (validation data included): a fixed cost such as
        # Tip-Adapter-F's α/β search cancels in the difference of two probes, and a grid
        # trained as several loops (one per grid point, each capped at the probe's steps) is
        # divided out. Cheap steps drown in noise over a few steps: grow the probes until the
        # extra steps take long enough to time, or cover a tenth of the run.
        loops = max(len(plan.loops), 1)
        t_2n, _, _ = fit(2 * n)
        per_run = max(plan.planned_steps // loops, 1)
        while t_2n - t_n < profile.min_probe_seconds and 2 * n < per_run // 10:
            n *= 4
            t_n, _, _ = fit(n)
            t_2n, _, _ = fit(2 * n)
        row["probe_steps"] = [n, 2 * n]
        per_step = max((t_2n - t_n) / (n * loops), 1e-9)
        fixed = max(t_n - loops * n * per_step, 0.0)
        fitted = method
        flops_1, _ = count_matmul_flops(lambda: fit(1))
        flops_2, _ = count_matmul_flops(lambda: fit(2))
        step_flops = max(flops_2 - flops_1, 0) / loops
        fixed_flops = max(flops_1 - loops * step_flops, 0)
        total_steps = plan.planned_steps
        projected = fixed + total_steps * per_step
        row.update(
            steps=total_steps,
            epochs=plan.epochs,
            seconds_per_epoch=per_step * plan.steps_per_epoch,
            seconds_per_step=per_step,
            fixed_seconds=fixed,
            flops=fixed_flops + total_steps * step_flops,
            flops_per_step=step_flops,
            peak_mib=memory["peak_mib"],
        )
        row.update(fit_seconds=projected, fit_measured=False)
        if projected <= budget:
            try:
                with peak_memory(device) as memory:
                    seconds, _, fitted = fit(None)
                row.update(fit_seconds=seconds, fit_measured=True, peak_mib=memory["peak_mib"])
            except BudgetExceeded:
                log.warning(
                    "%s: the whole schedule ran past the budget; keeping the projection", name
                )
    row["gemm_floor_seconds"] = row["flops"] / gemm_flops
    row["floor_ratio"] = row["fit_seconds"] / max(row["gemm_floor_seconds"], 1e-9)
    seconds, logits = timed(lambda: fitted.logits(test.features), device)
    row["predict_rows_per_s"] = test.features.shape[0] / seconds
    row["test_accuracy"] = accuracy(logits, test.labels) if row["fit_measured"] else None
    return row


def training_methods() -> list[str]:
    """Every registered method the synthetic problem can fit (CoOp needs the text tower)."""
    return [m for m in list_methods() if "text_encoder" not in method_card(m).needs]


def whole_fit_flops(name: str, problem: CheckFixture, preset: str | None = None) -> int:
    """Matrix-multiply FLOPs of one complete fit, counted (no projection).

    The probes of :func:`bench_training` give a training step's FLOPs, but a schedule that
    scores validation rows after every epoch (epoch selection) spends FLOPs per epoch that a
    step count does not see; counting a whole fit includes them, at the price of one more fit.
    """
    method = create_method(name, preset=preset, **method_options(name))
    flops, _ = count_matmul_flops(lambda: method.fit(problem.train, problem.text, problem.val))
    return flops


# --------------------------------------------------------------------------------- schedules
def schedule_methods() -> list[str]:
    """The methods of :func:`training_methods` with a ``fast`` preset."""
    return [m for m in training_methods() if "fast" in method_presets(m)]


#: What a schedules row keeps of each of its two training rows.
SCHEDULE_FIELDS = (
    "preset",
    "steps",
    "epochs",
    "flops",
    "flops_counted",
    "fit_seconds",
    "fit_measured",
    "fit_unfinished",
    "gemm_floor_seconds",
    "peak_mib",
    "test_accuracy",
)


def bench_schedules(
    name: str,
    problem: CheckFixture,
    profile: Profile,
    gemm_flops: float,
    device: str = "cpu",
    paper: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The paper schedule vs the ``fast`` preset of one method: FLOPs, fit seconds, accuracy.

    Both are measured like the training section measures a method (:func:`bench_training`);
    the paper schedule within ``profile.full_budget_s`` (projected beyond it, without an
    accuracy), the fast preset always to the end. ``paper``: the training section's row of the
    same method from this run, reused instead of measuring the paper schedule twice.

    FLOPs: the paper schedule's are the probes' projection (fixed + planned steps x FLOPs per
    step), which leaves out validation scoring repeated every epoch and so can only understate
    them; the fast preset's are counted over a whole fit (:func:`whole_fit_flops`, everything
    included). The ratio is therefore an upper bound.
    """
    if paper is None:
        paper = bench_training(name, problem, profile, gemm_flops, device)
    fast = bench_training(name, problem, profile, gemm_flops, device, "fast", budget=math.inf)
    paper, fast = {**paper, "flops_counted": False}, {**fast, "flops_counted": True}
    fast["flops"] = whole_fit_flops(name, problem, "fast")
    row: dict[str, Any] = {
        "method": name,
        "noise": profile.noise,
        "fast_options": method_presets(name)["fast"],
        "paper": {key: paper.get(key) for key in SCHEDULE_FIELDS},
        "fast": {key: fast.get(key) for key in SCHEDULE_FIELDS},
        "flops_ratio": None,
        "seconds_ratio": None,
        "accuracy_difference": None,
    }
    if paper.get("flops") and fast.get("flops") is not None:
        row["flops_ratio"] = fast["flops"] / paper["flops"]
    if paper.get("fit_seconds") and fast.get("fit_seconds") is not None:
        row["seconds_ratio"] = fast["fit_seconds"] / paper["fit_seconds"]
    if paper.get("test_accuracy") is not None and fast.get("test_accuracy") is not None:
        row["accuracy_difference"] = fast["test_accuracy"] - paper["test_accuracy"]
    return row


# --------------------------------------------------------------------------------- reference
def bench_reference(
    name: str, problem: CheckFixture, profile: Profile, device: str = "cpu"
) -> dict[str, Any]:
    """Ours vs the straightforward per-batch implementation: same data, options, seed and
    number of optimiser steps (``profile.reference_steps``; None: the whole schedule)."""
    from benchmarks.reference import REFERENCES

    options = method_options(name)
    train, text, test = problem.train, problem.text, problem.test
    # Without validation data: the validation searches (Tip-Adapter-F's α/β, the fusion
    # weight, NODE-Adapter's start) are shared code on both sides and would only dilute the
    # ratio of the training itself; both sides then use the documented defaults.
    val = None
    ours = create_method(name, **options)
    with limit_steps(profile.reference_steps):
        t_ours, _ = timed(lambda: ours.fit(train, text, val), device)
    reference = REFERENCES[name](**options)
    with limit_steps(profile.reference_steps):
        t_ref, _ = timed(lambda: reference.fit(train, text, val), device)
    acc_ours = accuracy(ours.logits(test.features), test.labels)
    acc_ref = accuracy(reference.logits(test.features), test.labels)
    return {
        "method": name,
        "noise": profile.noise,
        "steps": profile.reference_steps or "full schedule",
        "ours_seconds": t_ours,
        "reference_seconds": t_ref,
        "speedup": t_ref / max(t_ours, 1e-9),
        "ours_accuracy": acc_ours,
        "reference_accuracy": acc_ref,
        "accuracy_difference": acc_ours - acc_ref,
        "parity": abs(acc_ours - acc_ref) <= 0.2,
    }


# --------------------------------------------------------------------------------- extraction
def _pipeline_vs_bare(
    model: str, encode: Any, view: Any, paths: list[str], batch: int, cache_root: Path, device: str
) -> dict[str, Any]:
    """One extraction row: pipeline vs bare-encoder images/s over ``paths`` at batch ``batch``."""
    from clipadapt.features.cache import SplitCache
    from clipadapt.features.extract import extract_split
    from clipadapt.features.transforms import load_rgb

    count = len(paths)
    keys = [Path(p).name for p in paths]
    tensors = torch.stack([view(load_rgb(p)) for p in paths])
    encode(tensors[:batch])  # warm-up

    def bare() -> None:
        for start in range(0, count, batch):
            encode(tensors[start : start + batch])

    t_bare, _ = timed(bare, device)
    cache = SplitCache(cache_root, "bench", "bench", "images", {"view": view.describe()})
    t_pipe, result = timed(
        lambda: extract_split(
            encode, paths, keys, cache, view, batch_size=batch, progress=False, device=device
        ),
        device,
    )
    assert result.features.shape[0] == count
    return {
        "model": model,
        "images": count,
        "batch_size": batch,
        "image_size": view.size,
        "pipeline_images_per_s": count / t_pipe,
        "bare_encoder_images_per_s": count / t_bare,
        "ratio": t_bare / t_pipe,
    }


def bench_extraction(profile: Profile, device: str = "cpu") -> dict[str, Any]:
    """Pipeline images/s (decode, transform, encode, cache write) vs the bare encoder's forward
    throughput on pre-decoded tensors at the same batch size: with the embedded world CLIP
    (the small model), and in the full profile also with an open_clip ViT-B-32 at 224 px
    (randomly initialised: the same cost as the pretrained weights, no download)."""
    import open_clip
    from PIL import Image

    from clipadapt.encoders.clip import ClipEncoder, resolve_backbone
    from clipadapt.features.transforms import CleanView
    from clipadapt.world.generator import WorldGenerator

    encoder = ClipEncoder(resolve_backbone("world"), device=device)
    view = CleanView(encoder.image_size, encoder.mean, encoder.std)
    count, batch = profile.extraction_images, profile.extraction_batch
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        images, _, _ = WorldGenerator().batch(count, seed=0)
        paths = []
        for i, array in enumerate(images):
            path = root / "images" / f"{i:05d}.png"
            path.parent.mkdir(exist_ok=True)
            Image.fromarray(array).save(path)
            paths.append(str(path))
        result = _pipeline_vs_bare(
            encoder.backbone.display_name,
            encoder.encode_images,
            view,
            paths,
            batch,
            root / "cache-world",
            device,
        )
        if profile.extraction_large_images:
            model = open_clip.create_model("ViT-B-32", pretrained=None).eval().to(device)
            size = model.visual.image_size
            size = size[0] if isinstance(size, tuple) else size

            def encode_large(x: torch.Tensor) -> torch.Tensor:
                with torch.no_grad():
                    return model.encode_image(x.to(device)).float().cpu()

            result["large"] = _pipeline_vs_bare(
                "ViT-B-32 (random init)",
                encode_large,
                CleanView(size, encoder.mean, encoder.std),
                paths[: profile.extraction_large_images],
                64,
                root / "cache-vitb32",
                device,
            )
    return result


# --------------------------------------------------------------------------------- sweep
def bench_sweep(profile: Profile) -> dict[str, Any]:
    """Wall time of the whole grid (shots x seeds x methods) on one world bundle, through the
    same code path as ``make demo`` (dataset generation and feature extraction included, the
    `demo` presets for the methods that have one)."""
    from clipadapt.demo import run_demo

    with tempfile.TemporaryDirectory() as tmp:
        sink = io.StringIO()
        started = time.perf_counter()
        with contextlib.redirect_stdout(sink):
            run_demo(
                Path(tmp),
                size=profile.sweep_size,
                shots=profile.sweep_shots,
                seeds=profile.sweep_seeds,
                methods=profile.sweep_methods,
                progress=False,
                datasets=["world_species"],
            )
        seconds = time.perf_counter() - started
        lines = (Path(tmp) / "results.jsonl").read_text().splitlines()
    return {
        "dataset": "world_species",
        "size": profile.sweep_size,
        "shots": list(profile.sweep_shots),
        "seeds": list(profile.sweep_seeds),
        "methods": profile.sweep_methods,
        "runs": len(lines),
        "seconds": seconds,
    }


# --------------------------------------------------------------------------------- all
SECTIONS = ("training", "schedules", "reference", "extraction", "sweep")


def run_suite(
    profile: Profile,
    sections: tuple[str, ...] = SECTIONS,
    methods: list[str] | None = None,
    device: str = "cpu",
    progress: bool = True,
    checkpoint: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Run the chosen sections; returns the JSON-able report. ``checkpoint`` (if given) is
    called with the report so far after every measured row, so a long run that is stopped
    keeps what it measured."""
    save = checkpoint or (lambda report: None)
    report: dict[str, Any] = {
        "profile": asdict(profile),
        "machine": machine(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    # the first optimiser built in a process pays a few seconds of one-off imports: pay them
    # here, not inside the first method's timing
    torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))]).step()
    report["gemm_gflops"] = gemm_rate(profile.gemm_size, device=device) / 1e9
    say = print if progress else (lambda *a, **k: None)
    say(f"GEMM rate: {report['gemm_gflops']:.1f} GFLOP/s")
    problem = None
    if {"training", "schedules", "reference"} & set(sections):
        started = time.perf_counter()
        problem = make_problem(profile)
        say(
            f"problem: {problem.num_classes} classes x {profile.shots} shots, D={problem.dim}, "
            f"{len(problem.test)} test rows ({time.perf_counter() - started:.1f}s)"
        )
    if "training" in sections:
        rows = []
        for name in methods or training_methods():
            say(f"training: {name} ...", end=" ", flush=True)
            row = bench_training(name, problem, profile, report["gemm_gflops"] * 1e9, device)
            state = "measured" if row["fit_measured"] else "projected"
            if row.get("fit_unfinished"):
                state = "not finished within the budget"
            say(f"{row['fit_seconds']:.1f}s ({state})")
            rows.append(row)
            report["training"] = rows
            save(report)
    if "schedules" in sections:
        rows = []
        measured = {row["method"]: row for row in report.get("training", [])}
        for name in schedule_methods():
            if methods and name not in methods:
                continue
            say(f"schedules: {name} paper vs fast ...", end=" ", flush=True)
            row = bench_schedules(
                name, problem, profile, report["gemm_gflops"] * 1e9, device, measured.get(name)
            )
            ratio = row["flops_ratio"]
            say(f"FLOPs x{ratio:.3f}" if ratio is not None else "FLOPs —")
            rows.append(row)
            report["schedules"] = rows
            save(report)
        report["schedules_missing"] = [
            m
            for m in training_methods()
            if method_card(m).trainable and m not in schedule_methods()
        ]
    if "reference" in sections:
        rows = []
        for name in REFERENCE_METHODS:
            if methods and name not in methods:
                continue
            say(f"reference: {name} ...", end=" ", flush=True)
            try:
                row = bench_reference(name, problem, profile, device)
            except ImportError as error:
                row = {"method": name, "error": f"no reference implementation ({error})"}
            say(f"x{row.get('speedup', math.nan):.1f}")
            rows.append(row)
            report["reference"] = rows
            save(report)
    if "extraction" in sections:
        say("extraction ...", end=" ", flush=True)
        report["extraction"] = bench_extraction(profile, device)
        say(f"ratio {report['extraction']['ratio']:.2f}")
        save(report)
    if "sweep" in sections:
        say("sweep ...", end=" ", flush=True)
        report["sweep"] = bench_sweep(profile)
        say(f"{report['sweep']['seconds']:.0f}s")
    report["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
    return report
