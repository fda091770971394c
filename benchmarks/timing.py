"""Timing helpers: wall-clock seconds of a call, variants interleaved, ratios per repetition."""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Stat:
    """Median, minimum and maximum of repeated measurements (or of per-repetition ratios)."""

    median: float
    low: float
    high: float

    @classmethod
    def of(cls, values: Sequence[float]) -> Stat:
        if not values:
            raise ValueError("no measurements")
        return cls(statistics.median(values), min(values), max(values))

    def format(self, digits: int = 2, scale: float = 1.0) -> str:
        """``median (min–max)``, each value multiplied by ``scale``."""
        m, lo, hi = (v * scale for v in (self.median, self.low, self.high))
        return f"{m:.{digits}f} ({lo:.{digits}f}–{hi:.{digits}f})"


def keep_freed_memory() -> bool:
    """Make glibc's ``malloc`` keep freed memory for reuse instead of unmapping it.

    PyTorch's CPU tensors come from ``malloc``; by default glibc hands large blocks back to the
    kernel when they are freed, so every new activation of a train step first takes page
    faults on fresh pages: thousands per step, more for some tensor sizes than for others.
    Raising the mmap and trim thresholds (what a caching allocator such as jemalloc gives) takes
    that size-dependent noise out of CPU timings. Returns False where the C library is not glibc.
    """
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    libc = ctypes.CDLL(name)
    mallopt = getattr(libc, "mallopt", None)
    if mallopt is None:
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # from glibc's malloc.h
    return bool(mallopt(m_trim_threshold, 1 << 30)) and bool(mallopt(m_mmap_threshold, 1 << 25))


def synchronize(device: torch.device) -> None:
    """Wait for queued device work, so that wall-clock time covers it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(
    fn: Callable[[], object], device: torch.device, number: int = 1, *, collect: bool = False
) -> float:
    """Seconds per call of ``fn``, averaged over ``number`` back-to-back calls.

    ``collect`` runs Python's garbage collector first, untimed, so that garbage left by an
    earlier measurement is not collected (and paid for) during this one.
    """
    if collect:
        gc.collect()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(number):
        fn()
    synchronize(device)
    return (time.perf_counter() - start) / number


def interleaved(
    variants: Mapping[str, Callable[[], object]],
    reps: int,
    device: torch.device,
    *,
    warmup: int = 1,
    number: int = 1,
    before: Callable[[int], None] = lambda rep: None,
    collect: bool = False,
) -> dict[str, list[float]]:
    """Seconds per call of each variant in each repetition, the variants run in turn.

    Repetition ``r`` runs the variants in an order rotated by ``r`` (A B C, B C A, C A B, ...)
    so that drift and position effects hit every variant alike. ``before(r)`` runs, untimed,
    before each timed call (e.g. to seed the RNG identically for every variant); ``collect``
    as in ``time_call``.
    """
    names = list(variants)
    for _ in range(warmup):
        for name in names:
            before(-1)
            variants[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for rep in range(reps):
        shift = rep % len(names)
        for name in names[shift:] + names[:shift]:
            before(rep)
            times[name].append(time_call(variants[name], device, number, collect=collect))
    return times


def ratios(numerator: Sequence[float], denominator: Sequence[float]) -> Stat:
    """Per-repetition ratios of two interleaved series, summarised."""
    return Stat.of([a / b for a, b in zip(numerator, denominator, strict=True)])
