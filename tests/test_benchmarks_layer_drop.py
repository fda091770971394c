"""CI smoke run of the layer-drop benchmark (section 6 of RESULTS.md), so that it never rots."""

from __future__ import annotations

import importlib
import os
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def layer_drop(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """``benchmarks.layer_drop``, importable from the repository root (it is not installed)."""
    monkeypatch.syspath_prepend(str(ROOT))
    return importlib.import_module("benchmarks.layer_drop")


@pytest.mark.slow
def test_layer_drop_benchmark_smoke_prints_ideal_and_measured_ratios() -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.layer_drop", "--smoke"],
        cwd=ROOT, capture_output=True, text=True, timeout=300, check=False, env=env,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    rows = [line for line in result.stdout.splitlines() if line.startswith(("| llama", "| vit"))]
    assert len(rows) == 2
    ratio = r"\d+\.\d+ \(\d+\.\d+–\d+\.\d+\)"
    for row in rows:
        cells = [cell.strip() for cell in row.strip("|").split("|")]
        assert cells[4] == "4/4"  # every block of both models is proven skippable
        assert all(re.fullmatch(ratio, cells[i]) for i in (6, 7, 8))
        assert 0 < float(cells[6].split()[0]) < 1  # at max_drop 0.5 some layer was skipped


def test_write_section_replaces_only_its_own_section(
    tmp_path: Path, layer_drop: ModuleType
) -> None:
    BEGIN, END, write_section = layer_drop.BEGIN, layer_drop.END, layer_drop.write_section
    results = tmp_path / "RESULTS.md"
    results.write_text("# Benchmarks\n\nfigure 1\n")
    write_section(f"{BEGIN}\nfirst\n{END}\n", results)
    results.write_text(results.read_text() + "\n## Later\n")
    write_section(f"{BEGIN}\nsecond\n{END}\n", results)
    assert (
        results.read_text() == f"# Benchmarks\n\nfigure 1\n\n{BEGIN}\nsecond\n{END}\n\n## Later\n"
    )
