"""Sweep every timm model family: this package's placement against timm's own.

For the smallest model of each family (fewest parameters, counted on the meta device), built
with random weights and constant-initialised parameters randomized:

- truth: the calls of timm's own drop paths (and rate-0 ``drop_path`` slots) in a model built
  with ``drop_path_rate=0.1``;
- found: the residual sites ``inject_droppath`` gives a DropPath in the same model built at 0;
- placement: zeroing timm's drop paths equals dropping ours, bitwise, on shared weights;
- eval: the injected model's eval outputs are bit-identical to the original's.

    python -m sweeps.timm_families                   # print the table
    python -m sweeps.timm_families --write docs/SWEEP_TIMM.md
"""

from __future__ import annotations

import argparse
import re
import time
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import timm
import torch
from torch import nn

from droppath_inject import Site, SiteStatus, inject_droppath
from droppath_inject.attach import AttachKind

from .placement import calls_of, library_drop_paths, randomize_constant_parameters, same_placement

RATE = 0.1
_SMALL_FIRST = re.compile(r"atto|femto|pico|nano|tiny|micro|mini|small|xxs|xs|_s\d|18|b0|002|_t")
CANDIDATES_PER_FAMILY = 4


@dataclass(frozen=True)
class Row:
    """One family's result; ``note`` says why a row is not a plain match."""

    family: str
    model: str
    truth: int
    found: int
    placement: bool | None
    bitwise: bool | None
    note: str = ""
    unbuilt: int = 0  # sites timm gives rate 0 and no module at all (so no truth to count)

    @property
    def matches(self) -> bool:
        return (
            self.truth + self.unbuilt == self.found
            and self.placement is not False
            and self.bitwise is True
        )


def _parameters_on_meta(name: str) -> int | None:
    try:
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = timm.create_model(name, pretrained=False)
    except Exception:  # noqa: BLE001 - a model that cannot be built on meta is not a candidate
        return None
    return sum(p.numel() for p in model.parameters())


def smallest_model(family: str) -> str | None:
    """The model of ``family`` with the fewest parameters (among the likely-small names)."""
    names = timm.list_models(module=family)
    names = sorted(names, key=lambda n: (not _SMALL_FIRST.search(n), len(n), n))
    sizes = {n: _parameters_on_meta(n) for n in names[:CANDIDATES_PER_FAMILY]}
    built = {n: s for n, s in sizes.items() if s is not None}
    return min(built, key=lambda n: (built[n], n)) if built else None


def _input(model: nn.Module) -> torch.Tensor:
    size = model.pretrained_cfg.get("input_size", (3, 224, 224))
    channels, height, width = size
    if height > 128 and "fixed_input_size" not in model.pretrained_cfg:
        height = width = 128
    return torch.randn(2, channels, height, width, generator=torch.Generator().manual_seed(1))


def sweep_model(family: str, name: str) -> Row:
    """Build ``name`` natively dropped and plain on shared weights, inject, compare."""
    torch.manual_seed(0)
    try:
        native = timm.create_model(name, pretrained=False, drop_path_rate=RATE)
    except TypeError as error:
        return Row(family, name, 0, 0, None, None, f"no drop_path_rate ({error})")
    randomize_constant_parameters(native)
    plain = timm.create_model(name, pretrained=False, drop_path_rate=0.0)  # some default to > 0
    plain.load_state_dict(native.state_dict())
    x = _input(native)
    try:
        calls_of(native, [], x)
    except Exception:  # noqa: BLE001 - the fixed-size models: try their own input size
        x = torch.randn(2, *native.pretrained_cfg["input_size"])
    return compare(family, name, native, plain, x)


def compare(family: str, name: str, native: nn.Module, plain: nn.Module, x: object) -> Row:
    """Inject ``plain`` (rate 0, the weights of ``native``) and compare with ``native``'s own
    drop paths: counts, placement on shared weights, eval bitwise."""
    truth = calls_of(native, library_drop_paths(native), x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, report = inject_droppath(plain, RATE, example_inputs=x, return_report=True)
    attached = [s for s in report.sites if s.status is not SiteStatus.SKIPPED]
    skipped = [s for s in report.sites if s.status is SiteStatus.SKIPPED]
    note = f"{len(skipped)} skipped: {skipped[0].detail}" if skipped else ""
    bitwise = report.verification is not None and report.verification.passed
    if not truth:
        return Row(family, name, truth, len(attached), None, bitwise, note)
    placement = same_placement(plain, native, x, dropping_only=False)
    if len(attached) > truth and not placement:
        # timm builds no module at all where its rate is 0 (ResNet's first block): compare the
        # sites both drop, where the rates are above 0, counted the same way on both sides
        dropping = calls_of(native, library_drop_paths(native, dropping_only=True), x)
        ours = sum(s.rate > 0 for s in attached)
        if dropping == ours and same_placement(plain, native, x, dropping_only=True):
            zero = len(attached) - ours
            note = (f"timm builds no module where its rate is 0 ({zero} sites, rate 0 here "
                    f"too); the {ours} sites dropped at rate > 0 match")  # fmt: skip
            return Row(family, name, truth, len(attached), True, bitwise, note, zero)
    if not placement:
        note = "; ".join(filter(None, [note, _unslotted(plain, attached)]))
    return Row(family, name, truth, len(attached), placement, bitwise, note)


def _unslotted(model: nn.Module, attached: list[Site]) -> str:
    """Where the library put no drop path nor slot but we found a residual (hooked sites), by
    the class of the block owning the add: the residuals it chose not to drop."""
    hooked = Counter(
        type(model.get_submodule(s.owner)).__name__
        for s in attached
        if s.how is AttachKind.FORWARD_HOOK
    )
    if not hooked:
        return ""
    listed = ", ".join(f"{count} x {name}" for name, count in hooked.most_common(3))
    return f"residuals with no library drop path or slot: {listed}"


def run(families: list[str]) -> list[Row]:
    rows = []
    for family in families:
        name = smallest_model(family)
        if name is None:
            continue
        try:
            rows.append(sweep_model(family, name))
        except Exception as error:  # noqa: BLE001 - one broken family must not stop the sweep
            rows.append(failed_row(family, name, error))
        print(_line(rows[-1]), flush=True)
    return rows


def _yes(value: bool | None) -> str:
    return "-" if value is None else ("yes" if value else "NO")


def _line(row: Row) -> str:
    note = row.note.replace("|", "/").splitlines()[0][:240] if row.note else ""
    truth = f"{row.truth} + {row.unbuilt} unbuilt" if row.unbuilt else str(row.truth)
    return (
        f"| {row.family} | {row.model} | {truth} | {row.found} | {_yes(row.placement)} "
        f"| {_yes(row.bitwise)} | {note} |"
    )


def markdown(summary: str, first_column: str, rows: list[Row]) -> str:
    """The table: a summary sentence, then one line per row."""
    lines = [
        summary,
        "",
        f"| {first_column} | model | truth | found | placement equal | eval bitwise | note |",
        "|---|---|---|---|---|---|---|",
    ]
    return "\n".join(lines + [_line(row) for row in rows]) + "\n"


def failed_row(family: str, name: str, error: Exception) -> Row:
    """The row of a model the sweep could not build or run, with the error's first line."""
    first = str(error).splitlines()[0][:100] if str(error) else ""
    return Row(family, name, 0, 0, None, None, f"{type(error).__name__}: {first}")


def table(rows: list[Row]) -> str:
    applicable = [row for row in rows if row.bitwise is not None]
    matching = sum(row.matches for row in applicable)
    summary = (
        f"{matching} of the {len(applicable)} timm families that take `drop_path_rate` match "
        f"timm's own placement, bitwise on shared weights; {len(rows) - len(applicable)} take "
        f"none (timm {timm.__version__}, torch {torch.__version__})."
    )
    return markdown(summary, "family", rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", nargs="*", help="default: every family timm lists")
    parser.add_argument("--write", type=Path, help="write the table (Markdown) here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    start = time.perf_counter()
    rows = run(args.families or sorted(timm.list_modules()))
    text = table(rows) + f"\nSwept in {time.perf_counter() - start:.0f} s.\n"
    print(text)
    if args.write:
        args.write.write_text(text)


if __name__ == "__main__":
    main()
