"""CI smoke run of the skip_compute benchmark (figure 6), so that it never rots."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]


def test_skipping_benchmark_smoke_prints_ideal_and_measured_ratios() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.skipping", "--smoke"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    row = next(line for line in result.stdout.splitlines() if "resnet18" in line)
    cells = [cell.strip() for cell in row.strip("|").split("|")]
    assert cells[1] == "batch" and cells[3] == "8/8"
    ratio = r"\d+\.\d+ \(\d+\.\d+–\d+\.\d+\)"
    assert re.fullmatch(ratio, cells[5]) and re.fullmatch(ratio, cells[6])
    ideal = float(cells[5].split()[0])
    assert 0 < ideal < 1, "at max_drop 0.5 some branch must be dropped and its FLOPs saved"
