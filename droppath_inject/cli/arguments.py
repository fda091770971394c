"""The command's arguments and exit codes, as ``--help`` documents them."""

from __future__ import annotations

import argparse
import math
from enum import IntEnum
from pathlib import Path
from typing import NoReturn

from .. import __version__
from ..granularity import Granularity
from ..layers import MODES
from ..schedule import SCHEDULES
from .inputs import INPUT_DTYPES

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
A weights file may be a training checkpoint holding the state_dict under "state_dict",
"model", "state_dict_ema" or "model_ema", with DDP's "module." prefix on its keys.

exit codes:
  0    success (with --dry-run: the plan was printed, nothing written)
  1    unexpected error: a bug, please report it
  2    bad arguments (e.g. --max-drop outside [0, 1], a malformed --input-shape)
  3    unusable source: missing, unreadable or corrupt file, not a model, a full pickle without
       --trust-pickle, a TorchScript archive, a state_dict without --arch, an unknown spec
  4    unusable model or input: the input does not fit the model or is too large, no input can
       be inferred, an unreadable --example-inputs file, injection failed
  5    verification failed: eval outputs changed, in memory or in the written file
  6    output refused or failed: it exists (without --force), it is the input, its directory is
       missing or not writable, it is named .safetensors, or writing it failed (no space left
       on device, disk quota exceeded, read-only file system: the cause is named)
  7    no residual site found (or none could take a DropPath): nothing written
  130  interrupted (SIGINT, Ctrl-C)
  143  terminated (SIGTERM, as kill, Docker and SLURM send)
On any error nothing is written. Progress goes to stderr, one line per stage (--quiet: none).
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
    return rate + 0.0  # -0.0 is 0


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


def _add_input_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--input-shape",
        type=_shape,
        metavar="1,3,224,224",
        help="shape of the random input used to verify (default: inferred from the model)",
    )
    parser.add_argument(
        "--input-dtype",
        choices=INPUT_DTYPES,
        help="dtype of the --input-shape input (default: the model's); long: token ids in "
        "[0, vocabulary size)",
    )
    parser.add_argument(
        "--example-inputs",
        metavar="INPUTS.pt",
        type=Path,
        help="the arguments of one forward call, saved with torch.save: a tensor, a tuple or "
        "list of positional tensors, or a dict of keyword tensors",
    )


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
        "--mode",
        choices=MODES,
        default="row",
        help="row: per sample; batch: per batch; fixed: exactly round((1-p)B) samples kept",
    )
    parser.add_argument(
        "--granularity",
        choices=[g.value for g in Granularity],
        default=Granularity.BRANCH.value,
        help="branch: a decision per residual branch; block: one per block, shared by its "
        "branches (layer drop)",
    )
    parser.add_argument(
        "--skip-compute",
        action="store_true",
        help="in training, do not compute what is dropped (a dropped block is not run, or runs "
        "on its kept rows); the same expected output as the mask",
    )
    _add_input_options(parser)
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
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress lines on stderr")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return parser


def check_input_options(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse input options that do not combine (exit 2)."""
    if args.example_inputs is not None and args.input_shape is not None:
        parser.error("--example-inputs and --input-shape exclude each other: pass one")
    if args.input_dtype is not None and args.input_shape is None:
        parser.error(
            "--input-dtype goes with --input-shape, e.g. --input-shape 2,16 --input-dtype long"
        )
