"""One run of the command: load, inject (or plan, with ``--dry-run``), write and re-verify.

The report goes to stdout, progress to stderr. The model runs on the example input once
before injection (the reference for the written file), once inside ``inject_droppath`` to
capture its residuals, once more there to verify, and once loaded back from the written file.
"""

from __future__ import annotations

import argparse
import json
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..api import find_residuals, inject_droppath
from ..errors import (
    DropPathWarning,
    ExampleInputError,
    NoResidualError,
    OutputError,
    VerificationError,
)
from ..inputs import ExampleInputs, run_eval
from ..report import Report, SiteStatus, Verification
from ..verify import verify_eval
from .files import LoadedModel, load_source, summary
from .inputs import INPUT_OPTIONS, example_inputs
from .progress import Progress
from .sources import Source, check_spec
from .writing import atomic_output, check_output, torch_save, write_error, write_text


def _check_outputs(args: argparse.Namespace, source: Source, out: Path | None) -> None:
    """Refuse bad output paths before the model is loaded, so a refusal is quick."""
    inputs = source.input_files
    if args.example_inputs is not None:
        inputs.append(args.example_inputs)
    if out is not None and out.suffix == ".safetensors":
        raise OutputError(
            f"refusing to write {out}: the output is a whole model (a pickle of its code and "
            "weights), which .safetensors cannot hold; name it .pt (its state_dict() loads "
            "into the plain architecture)"
        )
    if out is not None:
        check_output(out, inputs, force=args.force)
    if args.json is not None:
        if out is not None and args.json.resolve() == out.resolve():
            raise OutputError(f"--json {args.json} is also the model output: pass another path")
        check_output(args.json, inputs, force=args.force, option="--json")


def _reference_outputs(model: nn.Module, inputs: ExampleInputs) -> Any:
    """The source model's eval outputs, computed before injection for the final comparison."""
    try:
        return run_eval(model, inputs)[0]
    except Exception as error:  # noqa: BLE001 - any failure means the input does not fit
        raise ExampleInputError(
            f"{type(model).__name__} fails on input {inputs.describe(origin=True)} "
            f"({summary(error)}): {INPUT_OPTIONS}"
        ) from None


def _reverify(path: Path, inputs: ExampleInputs | None, reference: Any) -> Verification | None:
    """Load the written file as a new process would and compare its eval outputs, bit for bit."""
    try:
        reloaded = torch.load(path, map_location="cpu", weights_only=False)
        verification = None if inputs is None else verify_eval(reloaded, inputs, reference)
    except VerificationError:
        raise
    except Exception as error:  # noqa: BLE001 - whatever it is, the written file is unusable
        raise VerificationError(
            f"the written model cannot be loaded and run ({summary(error)}); nothing was "
            "written: please report this model"
        ) from None
    if verification is not None and not verification.passed:
        raise VerificationError(
            f"the written model's eval outputs differ from the source model's on input "
            f"{verification.inputs}; nothing was written: please report this model"
        )
    return verification


def _write_model(
    model: nn.Module,
    out: Path,
    inputs: ExampleInputs | None,
    reference: Any,
    args: argparse.Namespace,
    progress: Progress,
) -> Verification | None:
    """Save ``model`` to a temporary file, re-verify it, and only then move it to ``out``."""
    with atomic_output(out, overwrite=args.force) as temporary:
        try:
            torch_save(model, temporary)
        except OSError as error:
            raise write_error(out, error) from None
        except Exception as error:  # noqa: BLE001 - pickling fails with many types
            raise OutputError(
                f"cannot pickle the rewritten model ({summary(error)}): please report this model"
            ) from None
        progress.stage(f"saved the model beside {out.name}, in a temporary file")
        written = _reverify(temporary, inputs, reference)
        progress.stage("loaded it back" + ("" if written is None else ", re-verified bit for bit"))
        return written


def _report_json(
    report: Report, source: Source, out: Path | None, written: Verification | None
) -> str:
    data = {
        "source": source.text,
        "output": None if out is None else str(out),
        **report.to_dict(),
        "written_verification": None if written is None else asdict(written),
    }
    return json.dumps(data, indent=2) + "\n"


def _inject(
    args: argparse.Namespace, model: nn.Module, inputs: ExampleInputs | None
) -> tuple[nn.Module, Report]:
    """``inject_droppath`` with the command's options; its verification hint in CLI terms."""
    if inputs is None:
        raise ExampleInputError(
            f"cannot infer an input for {type(model).__name__} (no conv, linear or "
            f"embedding layer): {INPUT_OPTIONS}"
        )
    try:
        with warnings.catch_warnings():  # the report says what was skipped, and the CLI why
            warnings.simplefilter("ignore", DropPathWarning)
            model, report = inject_droppath(
                model,
                args.max_drop,
                schedule=args.schedule,
                mode=args.mode,
                granularity=args.granularity,
                skip_compute=args.skip_compute,
                example_inputs=inputs,
                verify=not args.no_verify,
                return_report=True,
            )
    except VerificationError as error:
        raise VerificationError(f"{error} (here: --no-verify)") from None
    if not report.sites:
        raise NoResidualError("no residual site found: nothing written")
    if all(site.status is SiteStatus.SKIPPED for site in report.sites):
        print(report.table())
        raise NoResidualError(
            f"none of the {len(report.sites)} residual sites could take a DropPath "
            f"({report.sites[0].detail}): nothing written"
        )
    return model, report


def _inject_and_write(
    args: argparse.Namespace,
    loaded: LoadedModel,
    inputs: ExampleInputs | None,
    out: Path,
    progress: Progress,
) -> tuple[Report, Verification | None]:
    """Inject, print the report, then write ``out`` and compare the written model's outputs."""
    reference = None
    if not args.no_verify and inputs is not None:
        reference = _reference_outputs(loaded.model, inputs)
        progress.stage(f"ran the source model on input {inputs.describe()}")
    model, report = _inject(args, loaded.model, inputs)
    verified = "" if report.verification is None else ", verified"
    progress.stage(f"captured {len(report.sites)} residual sites, attached{verified}")
    print(report.table())
    written = _write_model(
        model, out, None if args.no_verify else inputs, reference, args, progress
    )
    check = "outputs not compared (--no-verify)" if written is None else written.describe()
    print(f"wrote {out}; reloaded it: {check}")
    return report, written


def _dry_run(
    loaded: LoadedModel, inputs: ExampleInputs | None, args: argparse.Namespace, progress: Progress
) -> Report:
    report = find_residuals(loaded.model, inputs, max_drop=args.max_drop, schedule=args.schedule)
    progress.stage(f"found {len(report.sites)} residual sites")
    print(report.table())
    return report


def run(args: argparse.Namespace, source: Source) -> None:
    """Load, inject (or plan, with ``--dry-run``), write and re-verify, printing the report."""
    progress = Progress(args.quiet)
    if source.spec is not None:  # a bad spec is a bad source, whatever its output path
        check_spec(source.spec)
    out = source.default_output() if args.output is None else args.output
    _check_outputs(args, source, None if args.dry_run else out)
    loaded = load_source(source)
    progress.stage(f"loaded {source.text}")
    print(f"source: {loaded.description}")
    unwrapped = None if loaded.unwrapped is None else loaded.unwrapped.describe()
    if unwrapped is not None:
        print(f"weights: {unwrapped}")
    inputs = example_inputs(loaded.model, args.input_shape, args.input_dtype, args.example_inputs)
    written = None
    if args.dry_run:
        report = _dry_run(loaded, inputs, args, progress)
        print(f"dry run: nothing written (would write {out})")
    else:
        report, written = _inject_and_write(args, loaded, inputs, out, progress)
    if args.json is not None:
        write_text(
            args.json,
            _report_json(report, source, None if args.dry_run else out, written),
            overwrite=args.force,
        )
        print(f"wrote report {args.json}")
