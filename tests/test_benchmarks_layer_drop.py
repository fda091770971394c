"""CI smoke run of the layer-drop benchmark (section 6 of RESULTS.md), so that it never rots."""

from __future__ import annotations

import copy
import importlib
import os
import platform
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
    tables = [
        [cell.strip() for cell in line.strip("|").split("|")]
        for line in result.stdout.splitlines()
        if line.startswith(("| llama", "| vit"))
    ]
    rows = [cells for cells in tables if len(cells) == 12]
    assert len(rows) == 2
    ratio = r"-?\d+\.\d+ \(-?\d+\.\d+–-?\d+\.\d+\)"
    for cells in rows:
        assert cells[4] == "4/4"  # every block of both models is proven skippable
        assert all(re.fullmatch(ratio, cells[i]) for i in (6, 7, 8))
        assert 0 < float(cells[6].split()[0]) < 1  # at max_drop 0.5 some layer was skipped
    # the half-batch reference: one row per model with a row-mode case
    halves = [cells for cells in tables if len(cells) == 6]
    assert [cells[0] for cells in halves] == ["vit_small"]
    assert halves[0][4] == "0.50"  # half the rows, half the FLOPs
    assert re.fullmatch(ratio, halves[0][5])


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


def test_shared_parameters_are_the_base_models_own_objects(layer_drop: ModuleType) -> None:
    import timm
    import torch

    from droppath_inject import inject_droppath

    torch.manual_seed(0)
    base = timm.create_model("vit_tiny_patch16_224", img_size=32, depth=2, embed_dim=48)
    x = torch.randn(2, 3, 32, 32)
    model = inject_droppath(
        copy.deepcopy(base), 0.5, granularity="block", skip_compute=True, example_inputs=(x,)
    )
    assert not any(p is q for p, q in zip(model.parameters(), base.parameters(), strict=True))
    layer_drop._share_parameters(model, base)
    assert all(p is q for p, q in zip(model.parameters(), base.parameters(), strict=True))
    with torch.no_grad():
        base.patch_embed.proj.weight.add_(1.0)  # a change to the base is seen by the copy
    assert torch.equal(base.eval()(x), model.eval()(x))


def test_share_is_the_measured_saving_over_the_flop_saving_with_an_interval(
    layer_drop: ModuleType,
) -> None:
    measured = [0.80, 0.78, 0.95, 0.70, 0.85, 0.90]
    ideal = [0.75, 0.76, 0.88, 0.70, 0.80, 0.82]
    share = layer_drop.Share.of(measured, ideal)
    mean = lambda values: sum(values) / len(values)  # noqa: E731
    assert share.value == pytest.approx((1 - mean(measured)) / (1 - mean(ideal)))
    assert share.low < share.value < share.high
    constant = layer_drop.Share.of([0.8] * 5, [0.75] * 5)
    assert (constant.low, constant.value, constant.high) == pytest.approx((0.8, 0.8, 0.8))


def test_fastest_runs_every_variant_once_per_round_in_a_rotated_order(
    layer_drop: ModuleType,
) -> None:
    calls: list[tuple[str, int]] = []
    steps = {name: (lambda seed, name=name: calls.append((name, seed))) for name in "abc"}
    best = layer_drop._fastest(steps, 4, tries=3)
    assert set(best) == {"a", "b", "c"} and all(t > 0 for t in best.values())
    assert all(seed == 4 for _, seed in calls)
    rounds = [[name for name, _ in calls[i : i + 3]] for i in range(0, 9, 3)]
    assert rounds == [["b", "c", "a"], ["c", "a", "b"], ["a", "b", "c"]]


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_keep_freed_memory_stops_page_faults_on_reallocated_tensors() -> None:
    script = (
        "import resource, sys, torch\n"
        "sys.path.insert(0, '.')\n"
        "from benchmarks.timing import keep_freed_memory\n"
        "kept = len(sys.argv) > 1 and keep_freed_memory()\n"
        "torch.set_num_threads(1)\n"
        "torch.ones(2 ** 22)  # 16 MiB, filled and freed\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
        "torch.ones(2 ** 22 - 2 ** 16)  # fits in the freed block, or takes fresh pages\n"
        "print(kept, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)\n"
    )
    outputs = [
        subprocess.run(
            [sys.executable, "-c", script, *extra],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split()  # fmt: skip
        for extra in ([], ["keep"])
    ]
    (default_kept, default_faults), (kept, kept_faults) = outputs
    assert (default_kept, kept) == ("False", "True")
    assert int(default_faults) >= 2**22 * 4 // 4096 // 2  # fresh pages: one fault each
    assert int(kept_faults) < 64
