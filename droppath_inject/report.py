"""What an injection found and did: residual sites, skipped modules, verification."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from enum import Enum
from typing import Any

from .attach import AttachKind
from .granularity import LayerDropReport
from .version import __version__


@dataclass(frozen=True)
class Verification:
    """The result of comparing eval outputs before and after injection."""

    passed: bool
    compared_elements: int
    inputs: str

    def describe(self) -> str:
        verdict = "bit-identical" if self.passed else "DIFFERENT"
        return (
            f"eval outputs {verdict} on input {self.inputs} ({self.compared_elements:,} elements)"
        )


class SiteStatus(Enum):
    """What became of a residual site."""

    INJECTED = "injected"  # a new DropPath of this package carries the schedule's rate
    RE_RATED = "re-rated"  # a drop path already there was given the schedule's rate
    KEPT = "kept"  # a drop path already there keeps its own rate (existing="keep")
    SKIPPED = "skipped"  # no DropPath could be attached; ``detail`` says why


class SkipCompute(Enum):
    """What a dropped branch (or layer) costs under ``skip_compute=True``."""

    SKIPS_LAYER = "skips the dropped layer (kept rows only)"
    KEPT_ROWS = "computes kept rows only"
    KEPT_ROWS_BATCH_NORM_GATHERED = "computes kept rows only (BatchNorm statistics from kept rows)"
    KEPT_ROWS_UNLESS_BATCH_NORM_TRAINS = (
        "computes kept rows only, but masks while a BatchNorm in it trains"
    )
    MASKS = "masks"


@dataclass(frozen=True)
class SkipPlan:
    """How a site's dropped branch runs, and why it keeps the mask where it does."""

    how: SkipCompute
    reason: str = ""

    def describe(self) -> str:
        return f"{self.how.value}: {self.reason}" if self.reason else self.how.value


@dataclass(frozen=True)
class Site:
    """One residual add: its owner block, the branch and skip operands, and the rate applied.

    ``branch`` names what computes the branch (its module, where there is one); ``attached_to``
    is the module carrying the rate (a hooked module, a drop-path slot or an existing drop
    path); ``previous_rate`` is an existing drop path's rate before re-rating; ``detail`` is
    free text for people (how skip-compute runs, why a site was skipped), never parsed.
    ``shared_with`` names the other modules carrying the site's DropPath when its branch is a
    sum of parallel paths (attention and MLP of a parallel block): one decision for all.
    """

    owner: str
    block_index: int
    branch: str
    skip: str
    rate: float
    status: SiteStatus
    attached_to: str = ""
    how: AttachKind | None = None
    previous_rate: float | None = None
    detail: str = ""
    skip_compute: SkipPlan | None = None
    shared_with: tuple[str, ...] = ()

    def describe(self) -> str:
        """The status as the report's table shows it."""
        if self.status is SiteStatus.RE_RATED and self.previous_rate is not None:
            text = f"re-rated {self.previous_rate:.2f} -> {self.rate:.2f}"
        else:
            text = self.status.value
        if self.how is not None:
            how = self.how.value
            carriers = " + ".join(m for m in (self.attached_to, *self.shared_with) if m)
            text += f" ({how} {carriers})" if carriers else f" ({how})"
        if self.skip_compute is not None:
            text += f", {self.skip_compute.describe()}"
        return f"{text}: {self.detail}" if self.detail else text


@dataclass(frozen=True)
class SkipCheck:
    """The check at injection that skipping computes what the mask does (``skip_verify``):
    how many skipping branches and layers it covered, how many mask after it, the training
    forwards and backwards it ran, and the largest difference seen relative to each tensor's
    magnitude."""

    checked: int
    demoted: int
    forwards: int
    largest_difference: float
    tolerance: float

    def describe(self) -> str:
        return (
            f"{self.checked - self.demoted} of {self.checked} skipping branches or layers agree "
            f"with the mask under forced decisions (largest difference "
            f"{self.largest_difference:.1e} <= {self.tolerance:.0e}; {self.forwards} training "
            "forwards and backwards)"
        )


@dataclass(frozen=True)
class Skipped:
    """A module left untouched, and why."""

    module: str
    reason: str


def _plain(value: Any) -> Any:
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, float) and value == 0.0:
        return 0.0  # never -0.0
    return value


@dataclass(frozen=True)
class Parameters:
    """The arguments an injection (or dry run) was made with, as plain values.

    ``schedule`` is the schedule's name, or the qualified name of a callable schedule.
    """

    max_drop: float
    schedule: str
    mode: str
    existing: str
    skip_compute: bool = False
    gather_batch_norm: bool = False
    granularity: str = "branch"


@dataclass
class Report:
    """The result of ``find_residuals`` or ``inject_droppath``; ``str()`` renders it as a table.

    ``sites`` are the residual adds in execution order, ``skipped`` the modules left untouched,
    ``num_blocks`` how many blocks the schedule spans, ``verification`` the bitwise check
    (None in a dry run or with ``verify=False``), ``parameters`` the call's arguments.

    Example:
        >>> import torchvision
        >>> from droppath_inject import find_residuals
        >>> report = find_residuals(torchvision.models.resnet18(), max_drop=0.1)
        >>> report.sites[-1].status, round(report.sites[-1].rate, 2), report.sites[-1].branch
        (<SiteStatus.INJECTED: 'injected'>, 0.1, 'layer4.1.bn2')
        >>> sorted(report.to_dict())
        ['layer_drop', 'num_blocks', 'parameters', 'sites', 'skip_check', 'skipped', 'verification',
         'version']
    """

    sites: list[Site] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    num_blocks: int = 0
    verification: Verification | None = None
    layer_drop: LayerDropReport | None = None  # granularity="block": each block's handling
    skip_check: SkipCheck | None = None  # skip_compute=True: the forced-decision check
    parameters: Parameters | None = None

    @property
    def injected(self) -> list[Site]:
        """Sites that carry the schedule's rate (a new DropPath, or a re-rated drop path)."""
        return [s for s in self.sites if s.status in (SiteStatus.INJECTED, SiteStatus.RE_RATED)]

    def to_dict(self) -> dict[str, Any]:
        """Plain data for JSON (enums as their values), with the package version.

        The keys are stable: ``version``, ``parameters``, ``num_blocks``, ``sites``, ``skipped``,
        ``verification`` and ``layer_drop`` (None unless ``granularity="block"``), each site with
        the fields of ``Site``.
        """
        data: dict[str, Any] = {"version": __version__, **_plain(asdict(self))}
        return data

    def shortfall(self, model_name: str) -> str | None:
        """A warning when nothing was found, some sites or modules got no DropPath, or, with
        ``skip_compute``, some sites still compute what they drop."""
        if not self.sites:
            untouched = "; ".join(f"{s.module or '<model>'}: {s.reason}" for s in self.skipped[:3])
            found = f" ({untouched})" if untouched else ""
            return f"no residual site found in {model_name}: nothing was injected{found}"
        parts = []
        missed = [s for s in self.sites if s.status is SiteStatus.SKIPPED]
        if missed:
            parts.append(f"{len(missed)} of {len(self.sites)} residual sites of {model_name} got "
                         f"no DropPath ({missed[0].branch}: {missed[0].detail})")  # fmt: skip
        if self.skipped:
            first = self.skipped[0]
            parts.append(f"{len(self.skipped)} modules of {model_name} were left untouched "
                         f"({first.module or '<model>'}: {first.reason})")  # fmt: skip
        masking = [
            s
            for s in self.sites
            if s.skip_compute is not None
            and s.skip_compute.how is SkipCompute.MASKS
            and s.status is not SiteStatus.SKIPPED
        ]
        if masking:
            first_site = masking[0]
            assert first_site.skip_compute is not None
            parts.append(f"skip_compute=True, but {len(masking)} of {len(self.sites)} residual "
                         f"sites of {model_name} still compute their dropped branches, masked "
                         f"({first_site.branch}: {first_site.skip_compute.reason})")  # fmt: skip
        return "; ".join(parts) or None

    def table(self) -> str:
        """A readable, fixed-width rendering."""
        header = ("#", "block", "branch", "skip", "rate", "drop path")
        rows = [
            (str(s.block_index), s.owner, s.branch, s.skip, f"{s.rate + 0.0:.4f}", s.describe())
            for s in self.sites
        ]
        widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
        lines = [f"{len(self.sites)} residual sites in {self.num_blocks} blocks"]
        for row in [header, tuple("-" * w for w in widths), *rows]:
            lines.append(
                "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
            )
        if self.skipped:
            lines.append(f"{len(self.skipped)} modules left untouched:")
            lines += [f"  {s.module or '<model>'}: {s.reason}" for s in self.skipped]
        if self.layer_drop is not None:
            lines.append(self._layer_drop_lines(self.layer_drop))
        if self.verification is not None:
            lines.append(f"verification: {self.verification.describe()}")
        if self.skip_check is not None:
            lines.append(f"skip_compute check: {self.skip_check.describe()}")
        return "\n".join(lines)

    @staticmethod
    def _layer_drop_lines(layer_drop: LayerDropReport) -> str:
        counts = ", ".join(
            f"{sum(b.handling is h for b in layer_drop.blocks)} {h.value}"
            for h in dict.fromkeys(b.handling for b in layer_drop.blocks)
        )
        lines = [f"granularity {layer_drop.granularity.value}: {counts}"]
        lines += [f"  block {b.block_index} ({b.module}): {b.reason}" for b in layer_drop.blocks
                  if b.reason]  # fmt: skip
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()
