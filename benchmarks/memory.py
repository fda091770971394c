"""Memory of one call, peak and allocated: allocator events on the CPU, statistics on CUDA.

On the CPU, ``torch.profiler`` with ``profile_memory=True`` records every allocation and free
of torch's CPU allocator with its size and time; the running sum of those events, from the
start of the call, peaks at the most bytes the call held at once beyond what was allocated
before it, and the positive events add up to all it allocated. On CUDA, the caching
allocator's statistics give the same quantities directly.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch._C._autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from .timing import synchronize


@contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Silence the profiler backend's start/stop lines, written to file descriptor 2."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _cpu_events(fn: Callable[[], object]) -> list[int]:
    """Signed sizes of the CPU allocator's allocations (+) and frees (-) during ``fn``, in order."""
    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [
        e
        for e in prof.profiler.kineto_results.events()
        if e.name() == "[memory]" and e.device_type() == DeviceType.CPU
    ]
    return [e.nbytes() for e in sorted(events, key=lambda e: e.start_ns())]


@dataclass(frozen=True)
class MemoryUse:
    """What one call did with memory: its peak beyond the memory allocated before it, and all
    it allocated (bytes and number of allocations)."""

    peak: int
    allocated: int
    allocations: int


def _cpu_use(fn: Callable[[], object]) -> MemoryUse:
    live = peak = 0
    sizes = _cpu_events(fn)
    for size in sizes:
        live += size
        peak = max(peak, live)
    grown = [size for size in sizes if size > 0]
    return MemoryUse(peak, sum(grown), len(grown))


def _cuda_use(fn: Callable[[], object], device: torch.device) -> MemoryUse:
    keys = ("allocated_bytes.all.allocated", "allocation.all.allocated")
    synchronize(device)
    before = torch.cuda.memory_allocated(device)
    counts = [torch.cuda.memory_stats(device).get(k, 0) for k in keys]
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    synchronize(device)
    stats = torch.cuda.memory_stats(device)
    return MemoryUse(
        torch.cuda.max_memory_allocated(device) - before,
        stats.get(keys[0], 0) - counts[0],
        stats.get(keys[1], 0) - counts[1],
    )


def memory_use(fn: Callable[[], object], device: torch.device) -> MemoryUse:
    """Peak and allocations of one call of ``fn`` (exact counts, unlike times)."""
    if device.type == "cuda":
        return _cuda_use(fn, device)
    return _cpu_use(fn)
