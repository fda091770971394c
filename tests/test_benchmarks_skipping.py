"""CI smoke run of the skip_compute benchmark (``benchmarks/SKIPPING.md``), so that it never
rots: the structure of its tables, not its timings."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
RATIO = r"-?\d+\.\d+ \(-?\d+\.\d+–-?\d+\.\d+\)"


def _tables(stdout: str) -> dict[str, list[dict[str, str]]]:
    """Each granularity's table, as one mapping from column to cell per row."""
    tables: dict[str, list[dict[str, str]]] = {}
    for section in stdout.split("## Granularity `")[1:]:
        name, body = section.split("`", 1)
        table = body.split("\n\n")[1]  # the table after the heading; other sections follow
        lines = table.splitlines()
        columns = [cell.strip() for cell in lines[0].strip("|").split("|")]
        tables[name] = [
            dict(zip(columns, (cell.strip() for cell in line.strip("|").split("|")), strict=True))
            for line in lines[2:]
        ]
    return tables


def test_skipping_benchmark_smoke_reports_every_granularity_and_mode() -> None:
    run = subprocess.Popen(
        [sys.executable, "-m", "benchmarks.skipping", "--smoke"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    from benchmarks.skipping import BENCHES

    depth = len(BENCHES["vit_small"].build("smoke").model.blocks)  # timm's blocks, 2 adds each
    stdout, stderr = run.communicate(timeout=120)
    assert run.returncode == 0, stderr
    tables = _tables(stdout)
    assert set(tables) == {"branch", "block"}
    for granularity, rows in tables.items():
        assert [row["mode"] for row in rows] == ["batch", "fixed", "row"]
        for row in rows:
            counts = re.fullmatch(r"(\d+)/(\d+)(?: sites, (\d+)/(\d+) blocks)?", row["skipping"])
            assert counts, row["skipping"]
            assert int(counts[2]) == 2 * depth
            if granularity == "block":
                assert counts[4] is not None and int(counts[4]) == depth
            for column in ("mask / no drop", "ideal skip / mask (FLOPs)", "measured skip / mask",
                           "half-batch reference"):  # fmt: skip
                assert re.fullmatch(RATIO, row[column]), (column, row[column])
            # a dash only where no seed dropped anything: no saving to share
            assert re.fullmatch(RATIO, row["share of ideal saving"]) or (
                row["share of ideal saving"] == "—" and row["target met"] == "no saving to make"
            )
            assert row["target met"] in {"yes", "no", "no saving to make"}
            breaks = row["graph breaks (skip, small config)"]  # counted in fixed mode only
            assert re.fullmatch(r"\d+|[A-Z]\w+", breaks) or (
                row["mode"] != "fixed" and breaks == "not counted"
            )
        fixed = next(row for row in rows if row["mode"] == "fixed")
        ideal = float(fixed["ideal skip / mask (FLOPs)"].split()[0])
        # at max_drop 0.5 the last block keeps exactly round(0.5 * B) rows under any seed,
        # so a skipping model must execute fewer FLOPs than the mask
        assert 0 < ideal < 1
