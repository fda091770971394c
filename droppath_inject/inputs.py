"""Example inputs: inferring one for common vision models, and running it without side effects."""

from __future__ import annotations

import inspect
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, fx, nn

from .errors import ExampleInputError
from .tracing import training_mode

#: Batch size of inferred inputs: 2, so that per-sample ops and batch statistics are exercised.
INFERRED_BATCH = 2
_DEFAULT_IMAGE_SIZE = 224


@dataclass(frozen=True)
class ExampleInputs:
    """Positional and keyword arguments of one forward call."""

    args: tuple[Any, ...]
    kwargs: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def from_user(cls, value: Any) -> ExampleInputs:
        """Accept a tensor, a tuple/list of positional arguments, or a dict of keyword arguments."""
        if isinstance(value, ExampleInputs):
            return value
        if isinstance(value, Tensor):
            return cls((value,))
        if isinstance(value, (tuple, list)):
            return cls(tuple(value))
        if isinstance(value, Mapping):
            return cls((), dict(value))
        raise TypeError(
            "example_inputs must be a tensor, a tuple or list of forward arguments, or a dict of "
            f"keyword arguments, got {type(value).__name__}"
        )

    def describe(self) -> str:
        """Shapes of the tensor arguments, e.g. ``(2, 3, 224, 224)``."""
        values = [*self.args, *self.kwargs.values()]
        return ", ".join(
            str(tuple(v.shape)) if isinstance(v, Tensor) else type(v).__name__ for v in values
        )


def resolve_inputs(model: nn.Module, example_inputs: Any, required: bool) -> ExampleInputs | None:
    """``example_inputs`` as given, else an inferred input, else None (or an error if required)."""
    if example_inputs is not None:
        return ExampleInputs.from_user(example_inputs)
    inputs = infer_example_inputs(model)
    if inputs is None and required:
        raise ExampleInputError(
            f"cannot infer an example input for {type(model).__name__} (no conv, linear or "
            "embedding layer found): pass example_inputs=... (the arguments of one forward call)"
        )
    return inputs


def _first_weight_layer(model: nn.Module) -> nn.Module | None:
    layers = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear, nn.Embedding)
    return next((m for m in model.modules() if isinstance(m, layers)), None)


def _image_size(model: nn.Module) -> tuple[int, ...] | None:
    """Spatial size a model documents: timm's patch embedding or ``pretrained_cfg``, an
    ``image_size``/``img_size`` attribute, a Hugging Face ``config.image_size``, torchvision.

    timm keeps ``pretrained_cfg`` at the pretrained size when a model is built with another
    ``img_size``; its patch embedding knows the size the model was built for.
    """
    built_for = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if isinstance(built_for, (tuple, list)) and all(isinstance(v, int) for v in built_for):
        return tuple(built_for)
    config = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None)
    if isinstance(config, Mapping) and "input_size" in config:
        return tuple(config["input_size"][1:])
    for owner in (model, getattr(model, "config", None)):  # the model's own, then Hugging Face's
        size = getattr(owner, "image_size", None) or getattr(owner, "img_size", None)
        if isinstance(size, int):
            return (size, size)
        if isinstance(size, (tuple, list)) and all(isinstance(v, int) for v in size):
            return tuple(size)
    if type(model).__name__ == "Inception3":  # torchvision's inception_v3 needs 299 x 299
        return (299, 299)
    return None


def infer_example_inputs(model: nn.Module) -> ExampleInputs | None:
    """A seeded random batch shaped for ``model``'s first conv/linear/embedding layer, or None."""
    layer = _first_weight_layer(model)
    if layer is None:
        return None
    weight = layer.weight
    if isinstance(layer, nn.Embedding):
        tokens = torch.zeros(INFERRED_BATCH, 16, dtype=torch.long, device=weight.device)
        return ExampleInputs((tokens,))
    if isinstance(layer, nn.Linear):
        shape: tuple[int, ...] = (INFERRED_BATCH, layer.in_features)
    else:
        spatial_dims = weight.ndim - 2
        size = _image_size(model)
        if size is None or len(size) != spatial_dims:
            size = (_DEFAULT_IMAGE_SIZE,) * spatial_dims
        shape = (INFERRED_BATCH, layer.in_channels, *size)
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(shape, generator=generator)
    return ExampleInputs((sample.to(dtype=weight.dtype, device=weight.device),))


@contextmanager
def side_effect_free_eval(model: nn.Module) -> Iterator[None]:
    """Eval mode, no grad and a forked RNG: running the model changes none of its state."""
    devices = [p.device for p in model.parameters() if p.device.type == "cuda"][:1]
    with training_mode(model, False), torch.no_grad(), torch.random.fork_rng(devices=devices):
        yield


def run_eval(
    model: nn.Module, inputs: ExampleInputs, capture: Mapping[str, nn.Module] = {}
) -> tuple[Any, dict[str, ExampleInputs]]:
    """Eval outputs of ``model``, and the arguments each module in ``capture`` first received."""
    captured: dict[str, ExampleInputs] = {}
    handles = []
    for path, module in capture.items():

        def record(_: nn.Module, args: tuple, kwargs: dict, path: str = path) -> None:
            captured.setdefault(path, ExampleInputs(tuple(args), dict(kwargs)))

        handles.append(module.register_forward_pre_hook(record, with_kwargs=True))
    try:
        with side_effect_free_eval(model):
            outputs = model(*inputs.args, **inputs.kwargs)
    finally:
        for handle in handles:
            handle.remove()
    return outputs, captured


def positional_arguments(module: nn.Module, inputs: ExampleInputs) -> tuple[Any, ...] | None:
    """``inputs`` as the positional arguments of a traced graph's placeholders, if expressible."""
    signature = inspect.signature(module.forward)
    if any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in signature.parameters.values()):
        return None if inputs.kwargs else tuple(inputs.args)
    try:
        bound = signature.bind(*inputs.args, **inputs.kwargs)
    except TypeError:
        return None
    bound.apply_defaults()
    return tuple(bound.arguments.values())


def propagate_shapes(graph_module: fx.GraphModule, args: tuple[Any, ...]) -> None:
    """Record each node's output shape in ``node.meta["tensor_meta"]`` by running ``args``."""
    from torch.fx.passes.shape_prop import ShapeProp

    with side_effect_free_eval(graph_module):
        ShapeProp(graph_module).propagate(*args)
