"""Timing helpers shared by the benchmark scripts (imported from the scripts' own folder)."""

from __future__ import annotations

import statistics
import time


def _times(fn, repeat: int, warmup: bool) -> list[float]:
    if warmup:
        fn()  # page in outputs, spin up threads, build kernels
    out = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def best_time(fn, repeat: int) -> float:
    """Fastest of ``repeat`` calls of ``fn``, after one warm-up call."""
    return min(_times(fn, repeat, True))


def median_time(fn, repeat: int, warmup: bool = True) -> float:
    """Median of ``repeat`` calls of ``fn``, after one warm-up call unless ``warmup`` is False."""
    return statistics.median(_times(fn, repeat, warmup))
