"""The example input of a run: ``--example-inputs FILE``, a random ``--input-shape`` of
``--input-dtype``, or the library's inferred one; its size checked before it is allocated."""

from __future__ import annotations

import math
import os
import pickle
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import ExampleInputError
from ..inputs import ExampleInputs, infer_example_inputs, token_vocabulary

INPUT_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float64": torch.float64,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "long": torch.long,
    "int": torch.int32,
}
#: Printed by every error about an input: the options that give another one.
INPUT_OPTIONS = (
    "pass --input-shape with a shape that fits the model (with --input-dtype long for token "
    "ids), or --example-inputs INPUTS.pt"
)
_GIB = 1024**3


def _memory_bytes() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, OSError, ValueError):
        return None


def check_size(shape: tuple[int, ...], dtype: torch.dtype) -> None:
    """Refuse an input larger than a quarter of this machine's memory, before allocating it
    (the model's activations need several times the input)."""
    needed = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    memory = _memory_bytes()
    limit = (memory // 4) if memory else 64 * _GIB
    if needed > limit:
        dims = "x".join(map(str, shape))
        have = f"this machine has {memory / _GIB:.0f} GiB" if memory else "the limit is 64 GiB"
        raise ExampleInputError(
            f"the example input {dims} {str(dtype).removeprefix('torch.')} needs "
            f"{needed / _GIB:,.0f} GiB and {have}: pass a smaller --input-shape"
        )


def _model_dtype(model: nn.Module) -> torch.dtype:
    parameter = next((p for p in model.parameters() if p.is_floating_point()), None)
    return parameter.dtype if parameter is not None else torch.float32


def random_input(model: nn.Module, shape: tuple[int, ...], dtype: torch.dtype | None) -> Any:
    """A seeded random tensor: floats in the model's dtype (or ``dtype``), integers in the
    range of the model's vocabulary."""
    dtype = dtype or _model_dtype(model)
    check_size(shape, dtype)
    generator = torch.Generator().manual_seed(0)
    if dtype.is_floating_point:
        return torch.randn(shape, generator=generator).to(dtype)
    vocab = token_vocabulary(model)
    if vocab is None:
        raise ExampleInputError(
            f"--input-dtype {str(dtype).removeprefix('torch.')}: {type(model).__name__} has no "
            "nn.Embedding and no config.vocab_size to take token ids from: pass "
            "--example-inputs INPUTS.pt"
        )
    return torch.randint(0, vocab, shape, generator=generator, dtype=dtype)


def load_example_inputs(path: Path) -> ExampleInputs:
    """``torch.load(path, weights_only=True)`` as the arguments of one forward call."""
    try:
        value = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ExampleInputError(f"--example-inputs: no such file: {path}") from None
    except (OSError, pickle.UnpicklingError, RuntimeError, EOFError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise ExampleInputError(
            f"--example-inputs: cannot read {path} ({type(error).__name__}: {first[:120]}): save "
            "tensors with torch.save(x), torch.save((x, mask)) or torch.save({'input_ids': x})"
        ) from None
    inputs = None
    if isinstance(value, (Tensor, tuple, list, dict)):
        inputs = ExampleInputs.from_user(value)
    if inputs is None or not all(
        isinstance(v, Tensor) for v in (*inputs.args, *inputs.kwargs.values())
    ):
        raise ExampleInputError(
            f"--example-inputs: {path} holds a {type(value).__name__}"
            f"{'' if inputs is None else ' of values beyond tensors'}: save a tensor, "
            "a tuple or list of positional tensors, or a dict of keyword tensors"
        )
    return inputs


def example_inputs(
    model: nn.Module,
    shape: tuple[int, ...] | None,
    dtype_name: str | None,
    file: Path | None,
) -> ExampleInputs | None:
    """The run's input: from ``file``, of ``shape``, or inferred (None if none can be)."""
    if file is not None:
        return load_example_inputs(file)
    if shape is not None:
        dtype = None if dtype_name is None else INPUT_DTYPES[dtype_name]
        try:
            return ExampleInputs((random_input(model, shape, dtype),))
        except (RuntimeError, MemoryError) as error:  # an allocation the size check let by
            raise ExampleInputError(
                f"cannot allocate the example input {'x'.join(map(str, shape))} "
                f"({type(error).__name__}): pass a smaller --input-shape"
            ) from None
    return infer_example_inputs(model)
