"""Command line: choose models and sizes, run the figures, print or write the markdown."""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import timm
import torch
import torchvision

from .figures import Settings, measure_model, measure_scaling
from .models import DEFAULT_MODELS, MODELS, SCALING, SMOKE_SCALING
from .render import Environment, render

RESULTS = Path(__file__).with_name("RESULTS.md")
ROOT = Path(__file__).resolve().parent.parent
SMOKE = {"models": "resnet18", "reps": 2, "scaling_reps": 2, "image_size": 64, "batch": 2}


def _names(text: str, known: Sequence[str], what: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip() and n.strip() != "none"]
    unknown = [n for n in names if n not in known]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown {what} {unknown}; choose from {list(known)}")
    return names


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="Benchmark droppath_inject against its anchors; print a markdown table.",
    )
    parser.add_argument(
        "--models",
        default=",".join(DEFAULT_MODELS),
        help=f"comma-separated, of {list(MODELS)} ('none' for none)",
    )
    parser.add_argument(
        "--scaling",
        default=",".join(SCALING),
        help=f"scaling families, of {list(SCALING)} ('none' for none)",
    )
    parser.add_argument("--reps", type=int, default=7, help="repetitions, figures 1 to 4")
    parser.add_argument("--scaling-reps", type=int, default=3, help="repetitions, figure 5")
    parser.add_argument("--image-size", type=int, default=112, help="input height and width")
    parser.add_argument("--scaling-size", type=int, default=32, help="image size for scaling")
    parser.add_argument("--batch", type=int, default=4, help="batch size (figures 1 to 4)")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (CPU)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="one small model, 2 reps, 64 px, tiny scaling (a CI check)",
    )
    parser.add_argument(
        "--write",
        nargs="?",
        const=str(RESULTS),
        default=None,
        metavar="PATH",
        help=f"also write the markdown to PATH (default {RESULTS.name})",
    )
    args = parser.parse_args(argv)
    if args.smoke:
        for key, value in SMOKE.items():
            setattr(args, key, value)
    try:
        args.models = _names(args.models, list(MODELS), "models")
        args.scaling = _names(args.scaling, list(SCALING), "scaling families")
    except argparse.ArgumentTypeError as error:
        parser.error(str(error))
    if min(args.reps, args.scaling_reps) < 1 or args.batch < 2:
        parser.error("repetitions must be >= 1 and --batch >= 2 (row mode needs a batch)")
    return args


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _load() -> str:
    try:
        return "{:.2f} / {:.2f} / {:.2f} (1 / 5 / 15 min)".format(*os.getloadavg())
    except OSError:
        return "unknown"


def _commit() -> str:
    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()

    try:
        commit = git("rev-parse", "--short", "HEAD")
        dirty = git("status", "--porcelain", "--", "droppath_inject")
    except (OSError, subprocess.CalledProcessError):
        return "unknown commit"
    return f"commit {commit}" + (" with local changes to droppath_inject/" if dirty else "")


def _environment(
    args: argparse.Namespace, device: torch.device, load_before: str, commit: str
) -> Environment:
    gpu = f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""
    scaling = f"; scaling: batch 2×3×{args.scaling_size}×{args.scaling_size}"
    return Environment(
        date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        machine=f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPUs ({_cpu_name()})",
        versions=f"Python {platform.python_version()}, torch {torch.__version__}, "
        f"torchvision {torchvision.__version__}, timm {timm.__version__}",
        device=f"{device}{gpu}",
        threads=f"torch.set_num_threads({torch.get_num_threads()})",
        inputs=f"batch {args.batch}×3×{args.image_size}×{args.image_size}, random, seed 0"
        + (scaling if args.scaling else ""),
        reps=f"{args.reps} (figures 1 to 4), {args.scaling_reps} (figure 5)",
        load_before=load_before,
        load_after=_load(),
        commit=commit,
        command=" ".join(["python -m benchmarks", *args.argv]),
        smoke=args.smoke,
    )


def _progress(message: str, start: float) -> None:
    print(f"[{time.perf_counter() - start:6.1f} s] {message}", file=sys.stderr, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the chosen figures; print the markdown and, with ``--write``, save it."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    args.argv = argv
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    load_before, commit, start = _load(), _commit(), time.perf_counter()
    settings = Settings(args.image_size, args.batch, args.reps, device)
    # Figure 5 first: a process that has just trained the models injects up to a quarter
    # slower at depth 96 (allocator state: no module survives), which would blur its scaling.
    families = SMOKE_SCALING if args.smoke else SCALING
    scaling = {}
    for name in args.scaling:
        _progress(f"scaling: {name}", start)
        scaled = replace(settings, reps=args.scaling_reps)
        scaling[name] = measure_scaling(families[name], args.scaling_size, scaled)
    results = []
    for name in args.models:
        _progress(f"{name}: figures 1-4", start)
        results.append(measure_model(MODELS[name], settings))
    _progress("done", start)
    text = render(_environment(args, device, load_before, commit), results, scaling)
    print(text)
    if args.write:
        Path(args.write).write_text(text)
        _progress(f"wrote {args.write}", start)
    return 0
