"""The ``droppath-inject`` command line: load a model, inject DropPath, write it, re-verify it.

The report goes to stdout; every failure is one line on stderr and an exit code that says which
kind of problem it was (see ``EPILOG``). Output files are written atomically and the written
model is loaded back and compared, bit for bit, with the source model before it is kept.
"""

from __future__ import annotations

import argparse
import json
import math
import signal
import sys
import warnings
from collections.abc import Sequence
from dataclasses import asdict
from enum import IntEnum
from pathlib import Path
from typing import Any, NoReturn

import torch
from torch import nn

from . import __version__
from .api import find_residuals, inject_droppath
from .errors import (
    DropPathInjectError,
    DropPathWarning,
    ExampleInputError,
    NoResidualError,
    VerificationError,
)
from .inputs import ExampleInputs, infer_example_inputs, run_eval
from .layers import MODES
from .report import Report, SiteStatus
from .schedule import SCHEDULES
from .sources import SourceError, check_spec, load_source, parse_spec
from .verify import Verification, count_elements, outputs_equal
from .writing import OutputError, atomic_output, check_output, write_text

PROG = "droppath-inject"


class ExitCode(IntEnum):
    """What kind of problem ended the run."""

    OK = 0
    BUG = 1
    USAGE = 2
    SOURCE = 3
    MODEL = 4
    VERIFICATION = 5
    OUTPUT = 6
    NO_RESIDUAL = 7
    INTERRUPTED = 130
    TERMINATED = 143


EPILOG = """\
SOURCE is one of:
  torchvision:NAME, timm:NAME   built with random weights, or with --weights FILE
  MODEL.pt                      a full model saved with torch.save(model); needs --trust-pickle,
                                since unpickling runs code from the file
  WEIGHTS.pt, WEIGHTS.safetensors  a state_dict, with --arch torchvision:NAME or timm:NAME

exit codes:
  0    success (with --dry-run: the plan was printed, nothing written)
  1    unexpected error: a bug, please report it
  2    bad arguments (e.g. --max-drop outside [0, 1], a malformed --input-shape)
  3    unusable source: missing, unreadable or corrupt file, not a model, a full pickle without
       --trust-pickle, a TorchScript archive, a state_dict without --arch, an unknown spec
  4    unusable model: the input shape does not fit it, no input can be inferred, injection failed
  5    verification failed: eval outputs changed, in memory or in the written file
  6    output refused or failed: it exists (without --force), it is the input, its directory is
       missing or not writable
  7    no residual site found (or none could take a DropPath): nothing written
  130  interrupted (SIGINT, Ctrl-C)
  143  terminated (SIGTERM, as kill, Docker and SLURM send)
On any error nothing is written.
"""


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line, like every other error of the command."""

    def error(self, message: str) -> NoReturn:
        self.exit(ExitCode.USAGE, f"{self.prog}: error: {message} (see --help)\n")


def _rate(text: str) -> float:
    try:
        rate = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0.0 <= rate <= 1.0 or math.isnan(rate):
        raise argparse.ArgumentTypeError(f"{text} is outside [0, 1]; use e.g. 0.1")
    return rate


def _shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(part) for part in text.split(","))
    except ValueError:
        shape = ()
    if not shape or min(shape) < 1:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a shape: give positive integers separated by commas, e.g. 1,3,224,224"
        )
    return shape


def build_parser() -> argparse.ArgumentParser:
    """The command's arguments; ``--help`` documents the sources and exit codes."""
    parser = _Parser(
        prog=PROG,
        description="Put DropPath (stochastic depth) on every residual branch of a model,\n"
        "check that its eval outputs are bit-identical, write it, and check the written file.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("source", metavar="SOURCE", help="a model file or spec (see below)")
    parser.add_argument(
        "-o",
        "--output",
        metavar="OUT",
        type=Path,
        help="where to write the model (default: SOURCE's directory and name + _droppath.pt; "
        "for a spec, ./NAME_droppath.pt)",
    )
    parser.add_argument(
        "--max-drop",
        metavar="RATE",
        type=_rate,
        default=0.1,
        help="rate of the deepest block (default: 0.1)",
    )
    parser.add_argument("--schedule", choices=SCHEDULES, default="linear", help="rates by depth")
    parser.add_argument(
        "--mode", choices=MODES, default="row", help="row: per sample; batch: per batch"
    )
    parser.add_argument(
        "--input-shape",
        type=_shape,
        metavar="1,3,224,224",
        help="shape of the random input used to verify (default: inferred from the model)",
    )
    parser.add_argument(
        "--arch", metavar="SPEC", help="architecture to load a state_dict SOURCE into"
    )
    parser.add_argument(
        "--weights", metavar="FILE", type=Path, help="state_dict or .safetensors for a spec"
    )
    parser.add_argument(
        "--trust-pickle",
        action="store_true",
        help="allow unpickling a full model file, which runs code from it",
    )
    parser.add_argument("--no-verify", action="store_true", help="skip comparing eval outputs")
    parser.add_argument("--dry-run", action="store_true", help="print the plan, write no model")
    parser.add_argument("--json", metavar="REPORT.json", type=Path, help="also write the report")
    parser.add_argument("--force", action="store_true", help="replace existing output files")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return parser


def _check_combinations(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    is_spec = parse_spec(args.source) is not None
    if args.weights is not None and not is_spec:
        parser.error("--weights goes with a spec SOURCE; for a state_dict file use --arch SPEC")
    if args.arch is not None and is_spec:
        parser.error("--arch goes with a state_dict SOURCE; with a spec use --weights FILE")
    if args.arch is not None and parse_spec(args.arch) is None:
        parser.error(f"--arch takes torchvision:NAME or timm:NAME, got {args.arch!r}")


def _input_files(args: argparse.Namespace) -> list[Path]:
    files = [] if parse_spec(args.source) else [Path(args.source)]
    return files + ([args.weights] if args.weights is not None else [])


def _output_path(args: argparse.Namespace) -> Path:
    """``-o``, else ``NAME_droppath.pt`` beside a source file, or in the current directory."""
    if args.output is not None:
        return args.output
    spec = parse_spec(args.source)
    if spec is not None:
        return Path(f"{spec[1]}_droppath.pt")
    source = Path(args.source)
    return source.with_name(f"{source.stem}_droppath.pt")


def _check_outputs(args: argparse.Namespace, out: Path | None) -> None:
    """Refuse bad output paths before the model is loaded, so a refusal is quick."""
    inputs = _input_files(args)
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


def _summary(error: BaseException) -> str:
    """``Type: first line of the message``."""
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__


def _example_inputs(model: nn.Module, shape: tuple[int, ...] | None) -> ExampleInputs | None:
    """A seeded random tensor of ``shape`` in the model's dtype, else the library's inferred one."""
    if shape is None:
        return infer_example_inputs(model)
    parameter = next((p for p in model.parameters() if p.is_floating_point()), None)
    dtype = parameter.dtype if parameter is not None else torch.float32
    generator = torch.Generator().manual_seed(0)
    return ExampleInputs((torch.randn(shape, generator=generator).to(dtype),))


def _reference_outputs(model: nn.Module, inputs: ExampleInputs) -> Any:
    """The source model's eval outputs, computed before injection for the final comparison."""
    try:
        return run_eval(model, inputs)[0]
    except Exception as error:  # noqa: BLE001 - any failure means the input does not fit
        raise ExampleInputError(
            f"{type(model).__name__} fails on input {inputs.describe()} ({_summary(error)}): "
            "pass --input-shape with a shape that fits the model"
        ) from None


def _reverify(path: Path, inputs: ExampleInputs | None, reference: Any) -> Verification | None:
    """Load the written file as a new process would and compare its eval outputs, bit for bit."""
    try:
        reloaded = torch.load(path, map_location="cpu", weights_only=False)
        outputs = None if inputs is None else run_eval(reloaded, inputs)[0]
    except Exception as error:  # noqa: BLE001 - whatever it is, the written file is unusable
        raise VerificationError(
            f"the written model cannot be loaded and run ({_summary(error)}); nothing was "
            "written: please report this model"
        ) from None
    if inputs is None:
        return None
    passed = outputs_equal(reference, outputs)
    if not passed:
        raise VerificationError(
            f"the written model's eval outputs differ from the source model's on input "
            f"{inputs.describe()}; nothing was written: please report this model"
        )
    return Verification(passed, count_elements(outputs), inputs.describe())


def _write_model(
    model: nn.Module, out: Path, inputs: ExampleInputs | None, reference: Any, force: bool
) -> Verification | None:
    """Save ``model`` to a temporary file, re-verify it, and only then move it to ``out``."""
    with atomic_output(out, overwrite=force) as temporary:
        try:
            torch.save(model, temporary)
        except OSError as error:
            raise OutputError(f"cannot write {out}: {error.strerror or error}") from None
        except Exception as error:  # noqa: BLE001 - pickling fails with many types
            raise OutputError(
                f"cannot pickle the rewritten model ({_summary(error)}): please report this model"
            ) from None
        return _reverify(temporary, inputs, reference)


def _report_json(
    report: Report, source: str, out: Path | None, written: Verification | None
) -> str:
    data = {
        "source": source,
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
            "embedding layer): pass --input-shape"
        )
    try:
        with warnings.catch_warnings():  # the report says what was skipped, and the CLI why
            warnings.simplefilter("ignore", DropPathWarning)
            model, report = inject_droppath(
                model,
                args.max_drop,
                schedule=args.schedule,
                mode=args.mode,
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
    args: argparse.Namespace, model: nn.Module, inputs: ExampleInputs | None, out: Path
) -> tuple[Report, Verification | None]:
    """Inject, print the report, then write ``out`` and compare the written model's outputs."""
    reference = None if args.no_verify or inputs is None else _reference_outputs(model, inputs)
    model, report = _inject(args, model, inputs)
    print(report.table())
    written = _write_model(model, out, None if args.no_verify else inputs, reference, args.force)
    check = "outputs not compared (--no-verify)" if written is None else written.describe()
    print(f"wrote {out}; reloaded it: {check}")
    return report, written


def run(args: argparse.Namespace) -> None:
    """Load, inject (or plan, with ``--dry-run``), write and re-verify, printing the report."""
    for spec in (args.source, args.arch):  # a bad spec is a bad source, whatever its output path
        if spec is not None and parse_spec(spec) is not None:
            check_spec(spec)
    out = None if args.dry_run else _output_path(args)
    _check_outputs(args, out)
    loaded = load_source(
        args.source, arch=args.arch, weights=args.weights, trust_pickle=args.trust_pickle
    )
    print(f"source: {loaded.description}")
    inputs = _example_inputs(loaded.model, args.input_shape)
    if args.dry_run:
        report = find_residuals(
            loaded.model, inputs, max_drop=args.max_drop, schedule=args.schedule
        )
        print(report.table())
        print(f"dry run: nothing written (would write {_output_path(args)})")
        written = None
    else:
        report, written = _inject_and_write(args, loaded.model, inputs, out)
    if args.json is not None:
        write_text(args.json, _report_json(report, args.source, out, written), overwrite=args.force)
        print(f"wrote report {args.json}")


_EXIT_CODES: tuple[tuple[type[DropPathInjectError], ExitCode], ...] = (
    (SourceError, ExitCode.SOURCE),
    (OutputError, ExitCode.OUTPUT),
    (VerificationError, ExitCode.VERIFICATION),
    (NoResidualError, ExitCode.NO_RESIDUAL),
    (DropPathInjectError, ExitCode.MODEL),
)


def _fail(message: str, code: ExitCode) -> int:
    print(f"{PROG}: error: {' '.join(message.split())}", file=sys.stderr)
    return code


class _Terminated(BaseException):
    """SIGTERM, raised where the process is, so that partial outputs are removed on the way out
    (a ``BaseException``, like ``KeyboardInterrupt``: no ``except Exception`` swallows it)."""


def _raise_terminated(signum: int, frame: object) -> None:
    raise _Terminated


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script and of ``python -m droppath_inject``."""
    parser = build_parser()
    args = parser.parse_args(argv)
    _check_combinations(parser, args)
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        run(args)
    except KeyboardInterrupt:
        return _fail("interrupted; nothing was written", ExitCode.INTERRUPTED)
    except _Terminated:
        return _fail("terminated (SIGTERM); nothing was written", ExitCode.TERMINATED)
    except DropPathInjectError as error:
        code = next(code for kind, code in _EXIT_CODES if isinstance(error, kind))
        return _fail(str(error), code)
    except Exception as error:  # noqa: BLE001 - one line, never a traceback
        return _fail(f"unexpected {_summary(error)}: this is a bug, please report it", ExitCode.BUG)
    finally:
        signal.signal(signal.SIGTERM, previous)
    return ExitCode.OK
