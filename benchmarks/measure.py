"""Measuring tools of the benchmark suite: GEMM rate, matmul FLOPs, peak memory, step plans.

Everything here measures in the running process; nothing is a constant typed in by hand.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

from clipadapt.engine import train as train_engine


def gemm_rate(size: int = 2048, repeats: int = 5, device: str = "cpu") -> float:
    """This machine's float32 matrix-multiply rate in FLOP/s (best of ``repeats`` square GEMMs).

    The best rather than the mean: the floor a method is compared with should be what the
    hardware reaches, not what it reached while something else ran.
    """
    g = torch.Generator().manual_seed(0)
    a = torch.randn(size, size, generator=g).to(device)
    b = torch.randn(size, size, generator=g).to(device)
    a @ b  # warm-up: thread pool start, page faults
    best = float("inf")
    for _ in range(repeats):
        _sync(device)
        started = time.perf_counter()
        a @ b
        _sync(device)
        best = min(best, time.perf_counter() - started)
    return 2.0 * size**3 / best


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


class _MatmulFlops(TorchDispatchMode):
    """Counts FLOPs of the ops torch's flop counter knows (mm, addmm, bmm, convolutions,
    attention). Unlike ``FlopCounterMode`` it installs no module hooks, which break
    ``autograd.grad`` inside a backward pass (torchdiffeq's adjoint method)."""

    def __init__(self) -> None:
        super().__init__()
        self.flops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = flop_registry.get(func._overloadpacket)
        if formula is not None:
            self.flops += int(formula(*args, **kwargs, out_val=out))
        return out


def count_matmul_flops(fn: Callable[[], Any]) -> tuple[int, Any]:
    """(FLOPs of the matrix products — mm, addmm, bmm, convolutions, attention — run by
    ``fn``, forward and backward; ``fn``'s result)."""
    counter = _MatmulFlops()
    with counter:
        result = fn()
    return counter.flops, result


def _rss_bytes() -> int | None:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


@contextlib.contextmanager
def peak_memory(device: str = "cpu", interval: float = 0.005) -> Iterator[dict[str, float | None]]:
    """Peak extra memory (MiB) used inside the block: resident set size sampled every
    ``interval`` seconds on CPU (Linux ``/proc``; None elsewhere), the CUDA allocator's peak
    on a GPU. The result dict is filled when the block exits."""
    out: dict[str, float | None] = {"peak_mib": None}
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        yield out
        out["peak_mib"] = (torch.cuda.max_memory_allocated() - before) / 2**20
        return
    base = _rss_bytes()
    if base is None:
        yield out
        return
    peak = [base]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            value = _rss_bytes()
            if value is not None and value > peak[0]:
                peak[0] = value
            stop.wait(interval)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield out
    finally:
        stop.set()
        thread.join()
        value = _rss_bytes()
        if value is not None:
            peak[0] = max(peak[0], value)
        out["peak_mib"] = (peak[0] - base) / 2**20


@dataclass
class StepPlan:
    """What the training loops of one fit planned and did (filled by :func:`recording_plan`)."""

    loops: list[dict[str, int]] = field(default_factory=list)

    @property
    def planned_steps(self) -> int:
        return sum(loop["planned_steps"] for loop in self.loops)

    @property
    def steps_per_epoch(self) -> int:
        return self.loops[0]["iters_per_epoch"] if self.loops else 0

    @property
    def epochs(self) -> int:
        return self.loops[0]["epochs"] if self.loops else 0


@contextlib.contextmanager
def recording_plan(max_steps: int | None = None) -> Iterator[StepPlan]:
    """Run the block with :func:`clipadapt.engine.train.limit_steps` and record the planned
    schedule of every :func:`~clipadapt.engine.train.train_loop` call inside it."""
    plan = StepPlan()
    original = train_engine._epoch_batches

    def recorded(num_rows: int, config: train_engine.TrainConfig) -> tuple[int, int]:
        iters, rows = original(num_rows, config)
        plan.loops.append(
            {
                "epochs": int(config.epochs),
                "iters_per_epoch": int(iters),
                "planned_steps": int(config.epochs * iters),
            }
        )
        return iters, rows

    train_engine._epoch_batches = recorded
    try:
        with train_engine.limit_steps(max_steps):
            yield plan
    finally:
        train_engine._epoch_batches = original


def timed(fn: Callable[[], Any], device: str = "cpu") -> tuple[float, Any]:
    """(seconds, result) of one call."""
    _sync(device)
    started = time.perf_counter()
    result = fn()
    _sync(device)
    return time.perf_counter() - started, result


class BudgetExceeded(Exception):
    """A measured call ran past its wall-clock budget (see :func:`time_budget`)."""


@contextlib.contextmanager
def time_budget(seconds: float | None) -> Iterator[None]:
    """Raise :class:`BudgetExceeded` in the block once ``seconds`` have passed.

    A SIGALRM timer (main thread, Unix): the exception surfaces at the next Python-level
    operation, so a long fit stops within one optimiser step. No-op where SIGALRM is missing.
    """
    import signal

    if seconds is None or not hasattr(signal, "setitimer"):
        yield
        return

    def expire(signum: int, frame: Any) -> None:
        raise BudgetExceeded(f"over the {seconds:.0f} s budget")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
