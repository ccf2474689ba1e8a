"""Where NODE-Adapter's fast-preset fit holds its memory: live bytes against resident ones.

The memory budget of ``node_adapter`` (``memory_budget_gb``) is resident memory, counted as
``RESIDENT_PER_SAVED_BYTE`` times what autograd keeps. This measures the two sides on the
benchmarks' synthetic problem: the process's resident set (``/proc/self/statm``) and, from the
C allocator (glibc's ``mallinfo2``), the bytes in use and the free bytes its heap keeps, each
sampled every 5 ms and kept per phase of the fit (the start search, each optimiser step's
forward solve and backward pass, the no-grad solves of validation and the final prototypes).
Growth is counted from the start of the fit, after the problem is built. Linux with glibc only.

    PYTHONPATH=src:. python benchmarks/node_memory.py --options '{"start_bar": false}'

One JSON line goes to stdout (and is appended to ``--out``).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

import clipadapt
from benchmarks.measure import _rss_bytes
from benchmarks.suite import PROFILES, make_problem
from clipadapt.methods.node_adapter import NodeAdapter

MIB = 2**20


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        )
    ]


def _mallinfo() -> Callable[[], _MallInfo2]:
    try:
        libc = ctypes.CDLL("libc.so.6")
        info = libc.mallinfo2
    except (OSError, AttributeError):
        print("node_memory: needs Linux with glibc >= 2.33 (mallinfo2)", file=sys.stderr)
        raise SystemExit(2) from None
    info.restype = _MallInfo2
    return info


def _resident() -> int:
    # the page size comes from the system there, not a constant
    return _rss_bytes() or 0


class PhaseMemory:
    """Per-phase maxima of resident growth and live growth, and the free heap at the former."""

    def __init__(self) -> None:
        self.mallinfo = _mallinfo()
        self.phase = "setup"
        self.stats: dict[str, dict[str, int]] = {}
        self._stop = threading.Event()
        first = self.mallinfo()
        self._resident0 = _resident()
        self._live0 = first.uordblks + first.hblkhd

    def _sample(self) -> None:
        while not self._stop.is_set():
            resident, info = _resident(), self.mallinfo()
            live = info.uordblks + info.hblkhd
            row = self.stats.setdefault(self.phase, {"resident_mib": 0, "live_mib": 0})
            grown = (resident - self._resident0) // MIB
            if grown > row["resident_mib"]:
                row["resident_mib"] = grown
                row["free_heap_mib_then"] = info.fordblks // MIB
            row["live_mib"] = max(row["live_mib"], (live - self._live0) // MIB)
            self._stop.wait(0.005)

    @contextlib.contextmanager
    def sampling(self) -> Iterator[PhaseMemory]:
        thread = threading.Thread(target=self._sample, daemon=True)
        thread.start()
        try:
            yield self
        finally:
            self._stop.set()
            thread.join()


@contextlib.contextmanager
def phases(memory: PhaseMemory) -> Iterator[None]:
    """Name the phase while the fit runs its search, solves and backward passes."""
    counts = {"step": 0}

    def solve_name() -> str:
        if torch.is_grad_enabled():
            counts["step"] += 1
            return f"step {counts['step']} forward"
        return "no-grad solves"

    def backward_name() -> str:
        return f"step {counts['step']} backward"

    patched = [
        (NodeAdapter, "_search_starts", lambda: "search"),
        (NodeAdapter, "_refine", solve_name),
        (torch.Tensor, "backward", backward_name),
    ]
    originals = [(owner, name, getattr(owner, name)) for owner, name, _ in patched]

    def named(original: Callable, phase: Callable[[], str]) -> Callable:
        def run(*args: Any, **kwargs: Any) -> Any:
            before, memory.phase = memory.phase, phase()
            try:
                return original(*args, **kwargs)
            finally:
                memory.phase = "other" if before == "setup" else before

        return run

    for (owner, name, phase), (_, _, original) in zip(patched, originals, strict=True):
        setattr(owner, name, named(original, phase))
    try:
        yield
    finally:
        for owner, name, original in originals:
            setattr(owner, name, original)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--profile", choices=sorted(PROFILES), default="full", help="problem size")
    parser.add_argument("--options", default="{}", help="JSON options of the fast-preset fit")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, help="the JSON line is appended here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    problem = make_problem(PROFILES[args.profile])
    extra = json.loads(args.options)
    memory = PhaseMemory()
    started = time.perf_counter()
    with memory.sampling(), phases(memory):
        method = clipadapt.create_method("node_adapter", preset="fast", **extra)
        method.fit(problem.train, problem.text, problem.val)
    keys = ("adjoint", "activation_gib", "recomputed_evaluations", "epoch")
    row = {
        "profile": args.profile,
        "options": extra,
        "fit_seconds": time.perf_counter() - started,
        "best_params": {k: v for k, v in method.best_params_.items() if k in keys},
        "phases": memory.stats,
    }
    print(json.dumps(row), flush=True)
    if args.out:
        with args.out.open("a") as f:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
