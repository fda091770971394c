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
from .python_state import python_state_kept, training_mode

#: Batch size of inferred inputs: 2, so that per-sample ops and batch statistics are exercised.
INFERRED_BATCH = 2
_DEFAULT_IMAGE_SIZE = 224


Setting = tuple[str, object]


@dataclass(frozen=True)
class InputOrigin:
    """Where an inferred input's shape came from: a layer's attributes (``layer`` is its class
    name, or ``"the model"`` for its configuration) and the model settings that sized it."""

    layer: str
    layer_settings: tuple[Setting, ...]
    model_settings: tuple[Setting, ...] = ()

    def describe(self) -> str:
        """E.g. ``inferred from the first Linear layer (in_features=48)``."""

        def text(settings: tuple[Setting, ...]) -> str:
            return ", ".join(f"{name}={value}" for name, value in settings)

        if self.layer == "the model":
            return f"inferred from {text(self.layer_settings)}"
        described = f"inferred from the first {self.layer} layer ({text(self.layer_settings)})"
        return described + (f" and {text(self.model_settings)}" if self.model_settings else "")


@dataclass(frozen=True)
class ExampleInputs:
    """Positional and keyword arguments of one forward call; ``origin`` if they were inferred."""

    args: tuple[Any, ...]
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    origin: InputOrigin | None = field(default=None, compare=False)

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

    def describe(self, origin: bool = False) -> str:
        """Shapes of the tensor arguments, e.g. ``(2, 3, 224, 224)``; with ``origin``, where an
        inferred one came from: ``(2, 48) inferred from the first Linear layer (in_features=48)``.
        """
        values = [*self.args, *self.kwargs.values()]
        shapes = ", ".join(
            str(tuple(v.shape)) if isinstance(v, Tensor) else type(v).__name__ for v in values
        )
        if origin and self.origin is not None:
            return f"{shapes} {self.origin.describe()}"
        return shapes


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


_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_WEIGHT_LAYERS = (*_CONVS, nn.Linear, nn.Embedding)
_TOKENS = 16


def _first_weight_layer(model: nn.Module) -> nn.Module | None:
    return next((m for m in model.modules() if isinstance(m, _WEIGHT_LAYERS)), None)


def _sizes(value: Any) -> tuple[int, ...] | None:
    """``value`` as a spatial size: an int for a square, or a tuple/list of ints."""
    if isinstance(value, int) and not isinstance(value, bool):
        return (value, value)
    if isinstance(value, (tuple, list)) and value and all(isinstance(v, int) for v in value):
        return tuple(value)
    return None


def _image_size(model: nn.Module) -> tuple[tuple[int, ...], str] | None:
    """Spatial size a model documents, and where: timm's patch embedding or ``pretrained_cfg``,
    an ``image_size``/``img_size`` attribute, a Hugging Face ``config.image_size``, torchvision.

    timm keeps ``pretrained_cfg`` at the pretrained size when a model is built with another
    ``img_size``; its patch embedding knows the size the model was built for.
    """
    built_for = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if isinstance(built_for, (tuple, list)) and _sizes(built_for) is not None:
        return tuple(built_for), "patch_embed.img_size"
    config = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None)
    if isinstance(config, Mapping) and "input_size" in config:
        return tuple(config["input_size"][1:]), "pretrained_cfg input_size"
    for prefix, owner in (("", model), ("config.", getattr(model, "config", None))):
        for name in ("image_size", "img_size"):
            size = _sizes(getattr(owner, name, None))
            if size is not None:
                return size, f"{prefix}{name}"
    if type(model).__name__ == "Inception3":  # torchvision's inception_v3 needs 299 x 299
        return (299, 299), "torchvision's Inception3 size"
    return None


def _config_int(model: nn.Module, name: str) -> int | None:
    value = getattr(getattr(model, "config", None), name, None)
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def _first_weight(model: nn.Module) -> Tensor | None:
    return next((p for p in model.parameters()), None)


def _tokens(vocab: int, origin: InputOrigin, device: torch.device) -> ExampleInputs:
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (INFERRED_BATCH, _TOKENS), generator=generator)
    return ExampleInputs((ids.to(device),), origin=origin)


def _float_input(shape: tuple[int, ...], like: Tensor | None, origin: InputOrigin) -> ExampleInputs:
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(shape, generator=generator)
    if like is not None:
        dtype = like.dtype if like.is_floating_point() else torch.float32
        sample = sample.to(dtype=dtype, device=like.device)
    return ExampleInputs((sample,), origin=origin)


def _from_config(model: nn.Module, layer: nn.Module | None) -> ExampleInputs | None:
    """A Hugging Face config's token ids (``vocab_size``) or images (``num_channels``)."""
    weight = _first_weight(model)
    device = weight.device if weight is not None else torch.device("cpu")
    channels = _config_int(model, "num_channels")
    documented = _image_size(model)
    if channels is not None and documented is not None and not isinstance(layer, nn.Embedding):
        size, where = documented
        settings = (("config.num_channels", channels), (where, _size_text(size)))
        origin = InputOrigin("the model", settings)
        return _float_input((INFERRED_BATCH, channels, *size), weight, origin)
    vocab = _config_int(model, "vocab_size")
    if vocab is None or isinstance(layer, _CONVS):  # BEiT's vocab_size is for its image tokens
        return None
    if isinstance(layer, nn.Embedding):
        vocab = min(vocab, layer.num_embeddings)
    return _tokens(vocab, InputOrigin("the model", (("config.vocab_size", vocab),)), device)


def _size_text(size: tuple[int, ...]) -> object:
    return size[0] if len(set(size)) == 1 else "x".join(map(str, size))


def token_vocabulary(model: nn.Module) -> int | None:
    """How many token ids ``model`` takes: its first embedding's size, or ``config.vocab_size``."""
    embedding = next((m for m in model.modules() if isinstance(m, nn.Embedding)), None)
    vocab = _config_int(model, "vocab_size")
    if embedding is None:
        return vocab
    return embedding.num_embeddings if vocab is None else min(vocab, embedding.num_embeddings)


def infer_example_inputs(model: nn.Module) -> ExampleInputs | None:
    """A seeded random batch shaped for ``model``, or None: from a Hugging Face config's
    ``vocab_size`` or ``num_channels``, else its first conv/linear/embedding layer; token
    models get integer ids in ``[0, vocab_size)``. The value records where its shape came from.
    """
    layer = _first_weight_layer(model)
    configured = _from_config(model, layer)
    if configured is not None:
        return configured
    if layer is None:
        return None
    weight = layer.weight
    assert isinstance(weight, Tensor)
    kind = type(layer).__name__
    if isinstance(layer, nn.Embedding):
        origin = InputOrigin(kind, (("num_embeddings", layer.num_embeddings),))
        return _tokens(layer.num_embeddings, origin, weight.device)
    if isinstance(layer, nn.Linear):
        origin = InputOrigin(kind, (("in_features", layer.in_features),))
        return _float_input((INFERRED_BATCH, layer.in_features), weight, origin)
    assert isinstance(layer, _CONVS)
    spatial_dims = weight.ndim - 2
    documented = _image_size(model)
    if documented is None or len(documented[0]) != spatial_dims:
        size, where = (_DEFAULT_IMAGE_SIZE,) * spatial_dims, "default size"
    else:
        size, where = documented
    settings = (("in_channels", layer.in_channels),)
    origin = InputOrigin(kind, settings, ((where, _size_text(size)),))
    return _float_input((INFERRED_BATCH, layer.in_channels, *size), weight, origin)


@contextmanager
def side_effect_free_eval(model: nn.Module) -> Iterator[None]:
    """Eval mode, no grad, a forked RNG and the modules' Python attributes put back after:
    running the model changes none of its state (``python_state``)."""
    devices = [p.device for p in model.parameters() if p.device.type == "cuda"][:1]
    with (
        python_state_kept(model),
        training_mode(model, False),
        torch.no_grad(),
        torch.random.fork_rng(devices=devices),
    ):
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
