"""Print the model-zoo table of docs/EXPERIMENTS.md: ``python tests/zoo_table.py`` (a minute).

Each row injects one zoo model exactly as tests/test_zoo.py does and states the ground truth
it is compared with; the tests are what assert it.
"""

from __future__ import annotations

import copy

import torch
from test_zoo import TIMM_DROP_PATH_RATE, ZOO, ZooModel, _schedule, _timm_drop_paths_in_call_order

from droppath_inject import SiteStatus, inject_droppath


def _ground_truth(entry: ZooModel, original: torch.nn.Module, x: torch.Tensor) -> tuple[int, str]:
    if entry.expected_sites is not None:
        source = "none by design" if entry.expected_sites(original, x) == 0 else "module attributes"
        if entry.spec.endswith(("efficientnet_b0", "convnext_tiny", "swin_t")):
            source = "StochasticDepth calls"
        return entry.expected_sites(copy.deepcopy(original), x), source
    native = entry.build(drop_path_rate=TIMM_DROP_PATH_RATE)
    return len(_timm_drop_paths_in_call_order(native, x)), "timm DropPath placement"


def main() -> None:
    print("| model | input | sites | ground truth | blocks | existing drop paths | eval bitwise |")
    print("|---|---|---|---|---|---|---|")
    for entry in ZOO:
        torch.manual_seed(0)
        model = entry.build()
        x = torch.randn(2, *entry.input_size)
        expected, source = _ground_truth(entry, model, x)
        _, report = inject_droppath(
            model, 0.1, schedule=_schedule(entry), example_inputs=x, return_report=True
        )
        existing = sum(s.status in (SiteStatus.RE_RATED, SiteStatus.KEPT) for s in report.sites)
        bitwise = "yes" if report.verification and report.verification.passed else "NO"
        print(
            f"| {entry.spec} | {'x'.join(map(str, entry.input_size[1:]))} | {len(report.sites)} "
            f"| {expected} ({source}) | {report.num_blocks} | {existing} | {bitwise} |"
        )


if __name__ == "__main__":
    main()
