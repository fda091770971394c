"""The benchmark suite: its timing and memory helpers, and a smoke run of its entry point."""

from __future__ import annotations

import importlib
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
RATIO = re.compile(r"\d+\.\d+ \(\d+\.\d+–\d+\.\d+\)")  # median (min–max)
CPU = torch.device("cpu")


@pytest.fixture
def timing(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """``benchmarks.timing``, importable from the repository root (it is not installed)."""
    monkeypatch.syspath_prepend(str(ROOT))
    return importlib.import_module("benchmarks.timing")


@pytest.fixture
def memory(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """``benchmarks.memory``, likewise."""
    monkeypatch.syspath_prepend(str(ROOT))
    return importlib.import_module("benchmarks.memory")


def test_stat_is_median_min_max(timing: ModuleType) -> None:
    Stat, ratios = timing.Stat, timing.ratios
    assert Stat.of([3.0, 1.0, 2.0, 10.0]) == Stat(2.5, 1.0, 10.0)
    assert Stat.of([2.0]).format() == "2.00 (2.00–2.00)"
    assert ratios([2.0, 3.0, 8.0], [1.0, 3.0, 2.0]) == Stat(2.0, 1.0, 4.0)


def test_interleaved_rotates_the_order_and_seeds_every_call(timing: ModuleType) -> None:
    calls: list[str] = []
    seeds: list[int] = []
    variants = {name: (lambda name=name: calls.append(name)) for name in "abc"}
    times = timing.interleaved(variants, 3, CPU, warmup=1, before=seeds.append)
    assert calls == list("abcabcbcacab")
    assert seeds == [-1] * 3 + [0] * 3 + [1] * 3 + [2] * 3
    assert {name: len(t) for name, t in times.items()} == {"a": 3, "b": 3, "c": 3}


def test_cpu_memory_use_counts_peak_and_allocations(memory: ModuleType) -> None:
    mib = 2**20

    def two_buffers() -> None:
        first = torch.empty(mib, dtype=torch.uint8)
        second = torch.empty(2 * mib, dtype=torch.uint8)
        del first, second
        third = torch.empty(mib, dtype=torch.uint8)  # after both were freed: no new peak
        del third

    assert memory.memory_use(two_buffers, CPU) == memory.MemoryUse(
        peak=3 * mib, allocated=4 * mib, allocations=3
    )


@pytest.mark.slow
def test_smoke_run_prints_and_writes_every_figure(tmp_path: Path) -> None:
    out = tmp_path / "RESULTS.md"
    run = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--smoke", "--write", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr
    text = out.read_text()
    assert text.strip() == run.stdout.strip()
    for heading in (
        "## Targets",
        "## 1. Injection and verification, in eval forwards",
        "## 2. Eval forward, injected / original",
        "## 3. Train step time",
        "## 4. Peak memory of a train step",
        "## 5. Injection time against depth",
    ):
        assert heading in text
    for column in (
        "injection / forward",
        "verification / forward",
        "injected / original",
        "injected / plain",
        "allocated bytes, injected / original",
        "per node / shallowest",
    ):
        assert column in text
    for line in (
        _row(text, "## 1.", "torchvision resnet18"),
        _row(text, "## 2.", "torchvision resnet18"),
        _row(text, "## 3.", "torchvision resnet18"),
        _row(text, "## 4.", "torchvision resnet18"),
        _row(text, "## 5.", "torchvision ResNet-34"),
        _row(text, "## 5.", "timm ViT depth 4"),
    ):
        assert RATIO.search(line), line
    assert f"torch {torch.__version__}" in text
    assert "| 8 |" in _row(text, "## 1.", "torchvision resnet18")  # one site per BasicBlock


def _row(text: str, section: str, label: str) -> str:
    """The first table row starting with ``label`` in the section starting with ``section``."""
    body = text.split(f"\n{section}", 1)[1].split("\n## ", 1)[0]
    return next(line for line in body.splitlines() if line.startswith(f"| {label}"))
