"""Building any transformers model type small, and a dummy input for its main modality.

The config of a model type is shrunk where it names its sizes the common way (2 layers per
stack, narrow widths, few heads, a small vocabulary and image), sub-configs of composite models
too, with every dropout off; the base model class comes from ``MODEL_MAPPING_NAMES``. The input
is the first of a few candidates (token ids, pixel values, audio features or samples, decoder
token ids for encoder-decoders) that the model runs on in eval mode.
"""

from __future__ import annotations

import contextlib
import inspect
import os
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")

#: Batch size and token counts, distinct from each other and from every size below, so the
#: batch dimension of a tensor is the only one of size ``BATCH``.
BATCH = 5
TOKENS = 7
DECODER_TOKENS = 6
IMAGE = 32
AUDIO_SAMPLES = 4000  # enough for wav2vec2-style conv feature extractors (12 frames)

LAYERS = 2
_INTS: dict[str, int] = {
    **dict.fromkeys(("num_hidden_layers", "num_layers", "n_layer", "n_layers", "encoder_layers",
                     "decoder_layers", "num_encoder_layers", "num_decoder_layers", "depth"),
                    LAYERS),
    **dict.fromkeys(("hidden_size", "d_model", "n_embd", "embed_dim", "dim", "word_embed_proj_dim",
                     "projection_dim"), 32),
    **dict.fromkeys(("intermediate_size", "ffn_dim", "encoder_ffn_dim", "decoder_ffn_dim", "d_ff",
                     "n_inner", "moe_intermediate_size", "shared_expert_intermediate_size"), 64),
    **dict.fromkeys(("num_attention_heads", "n_head", "n_heads", "encoder_attention_heads",
                     "decoder_attention_heads", "num_heads"), 4),
    "num_key_value_heads": 2, "head_dim": 8, "d_kv": 8, "num_experts": 4, "num_local_experts": 4,
    "n_routed_experts": 4, "num_experts_per_tok": 2, "n_group": 1, "topk_group": 1,
    "image_size": IMAGE, "patch_size": 4, "max_source_positions": 16,
}  # fmt: skip
_WIDTHS = {"hidden_size", "d_model", "n_embd", "embed_dim", "dim", "num_attention_heads",
           "num_heads", "n_head", "n_heads", "image_size", "patch_size", "head_dim"}  # fmt: skip
_LAYER_KEYS = ("num_hidden_layers", "num_layers", "n_layer", "n_layers", "depth")
_ENCODER_KEYS = ("encoder_layers", "num_encoder_layers")
_DECODER_KEYS = ("decoder_layers", "num_decoder_layers")
_DROPOUT_WORDS = ("dropout", "layerdrop", "drop_path", "prob")  # mask_time_prob: SpecAugment
SMALL_VOCAB = 128
MAX_PARAMETERS = 30_000_000


def sub_configs(config: Any) -> dict[str, Any]:
    """The configs nested in ``config`` (a composite model's text, vision, audio parts)."""
    from transformers import PretrainedConfig

    names = set(getattr(config, "sub_configs", {}) or {})
    names |= {k for k, v in vars(config).items() if isinstance(v, PretrainedConfig)}
    found = {name: getattr(config, name, None) for name in sorted(names)}
    return {name: value for name, value in found.items() if isinstance(value, PretrainedConfig)}


def _token_ids(config: Any) -> set[int]:
    ids: set[int] = set()
    for key, value in vars(config).items():
        if key.endswith(("token_id", "token_index", "token_ids")):
            values = value if isinstance(value, (list, tuple)) else [value]
            ids |= {v for v in values if isinstance(v, int) and not isinstance(v, bool)}
    return ids


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _depths_key(config: Any) -> str | None:
    """The attribute listing the layers of each stage, if the config has one."""
    for key in ("depths", "block_sizes"):
        value = getattr(config, key, None)
        if isinstance(value, (list, tuple)) and value and all(map(_is_int, value)):
            return key
    return None


def shrink(config: Any, widths: bool = True) -> Any:
    """``config`` with 2 layers per stack (and, with ``widths``, small sizes), dropout off."""
    staged = any(isinstance(getattr(config, k, None), (list, tuple)) for k in
                 ("hidden_sizes", "num_heads", "embed_dim", "depths"))  # fmt: skip
    depths = _depths_key(config) is not None
    for key, value in _INTS.items():
        if not _is_int(getattr(config, key, None)):
            continue
        if key in _WIDTHS and staged or (not widths and value != LAYERS):
            continue
        if depths and key in _LAYER_KEYS:  # ``depths`` counts them; these may alias num_stages
            continue
        with contextlib.suppress(AttributeError, NotImplementedError):  # derived from others
            setattr(config, key, value)
    if depths:
        key = _depths_key(config)
        setattr(config, key, [1] * len(getattr(config, key)))
    if widths and _is_int(getattr(config, "vocab_size", None)):
        config.vocab_size = max([SMALL_VOCAB, *(i + 1 for i in _token_ids(config) if i < 1 << 20)])
    for key, value in list(vars(config).items()):
        if any(word in key for word in _DROPOUT_WORDS) and isinstance(value, float):
            setattr(config, key, 0.0)
    _shrink_rope_sections(config)
    for name, sub in sub_configs(config).items():
        setattr(config, name, shrink(sub, widths))
    return config


def _shrink_rope_sections(config: Any) -> None:
    """Multimodal rotary sections (``mrope_section``) rescaled to sum to half the head size."""
    head_dim = getattr(config, "head_dim", None)
    heads = getattr(config, "num_attention_heads", None)
    if not _is_int(head_dim) and _is_int(heads) and _is_int(getattr(config, "hidden_size", None)):
        head_dim = config.hidden_size // heads
    default = None  # Qwen-VL models default to [16, 24, 24] where the config names none
    if "mrope_section" in getattr(type(config), "ignore_keys_at_rope_validation", ()):
        default = [16, 24, 24]
    for key in ("rope_parameters", "rope_scaling"):
        rope = getattr(config, key, None)
        sections = rope.get("mrope_section", default) if isinstance(rope, dict) else None
        if not _is_int(head_dim) or not isinstance(sections, list) or not sections:
            continue
        half, total = head_dim // 2, sum(sections)
        scaled = [max(1, round(s * half / total)) for s in sections[:-1]]
        rope["mrope_section"] = [*scaled, max(1, half - sum(scaled))]


def stack_layers(config: Any) -> tuple[int, ...]:
    """The layers of ``config``'s own stacks (encoder then decoder), from its attributes."""
    encoder = next((getattr(config, k) for k in _ENCODER_KEYS if _is_int(getattr(config, k, 0))
                    and getattr(config, k, 0)), None)  # fmt: skip
    decoder = next((getattr(config, k) for k in _DECODER_KEYS if _is_int(getattr(config, k, 0))
                    and getattr(config, k, 0)), None)  # fmt: skip
    single = next((getattr(config, k) for k in _LAYER_KEYS if _is_int(getattr(config, k, None))),
                  None)  # fmt: skip
    key = _depths_key(config)
    if key is not None:
        single = sum(getattr(config, key))
    if encoder is None and decoder is not None:
        encoder = single
    stacks = (encoder, decoder) if decoder is not None else (encoder or single,)
    return tuple(s for s in stacks if s is not None)


def model_class(model_type: str) -> type[nn.Module] | None:
    """The base model class of ``model_type`` in transformers' auto mapping, if any."""
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_MAPPING_NAMES

    name = MODEL_MAPPING_NAMES.get(model_type)
    if isinstance(name, (list, tuple)):
        name = name[0]
    found = getattr(transformers, name, None) if name else None
    return found if isinstance(found, type) else None


def _parameters_on_meta(cls: type[nn.Module], config: Any) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in cls(config).parameters())


def build(model_type: str) -> tuple[nn.Module, Any]:
    """The base model of ``model_type`` from a small config, random weights (seed 0).

    Raises whatever transformers raises when neither the shrunk config nor the one with only
    fewer layers builds (or the latter is over ``MAX_PARAMETERS``)."""
    import transformers

    cls = model_class(model_type)
    if cls is None:
        raise LookupError("no base model class in MODEL_MAPPING_NAMES")
    errors = []
    for widths in (True, False):
        config = shrink(transformers.AutoConfig.for_model(model_type), widths)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                if not widths and _parameters_on_meta(cls, config) > MAX_PARAMETERS:
                    raise ValueError(f"over {MAX_PARAMETERS:,} parameters with its own widths")
                torch.manual_seed(0)
                return cls(config), config
        except Exception as error:  # noqa: BLE001 - the next config may build
            errors.append(error)
    raise errors[0]


@dataclass(frozen=True)
class DummyInput:
    """Keyword arguments for one forward call, and which sub-configs they exercise."""

    kwargs: dict[str, Any]
    modalities: tuple[str, ...]

    def describe(self) -> str:
        return ", ".join(
            f"{k} {tuple(v.shape)}" if isinstance(v, Tensor) else f"{k}={v}"
            for k, v in self.kwargs.items()
        )


def _first_int(config: Any, keys: tuple[str, ...], default: int) -> int:
    for key in keys:
        value = getattr(config, key, None)
        if _is_int(value) and value > 0:
            return int(value)
        if isinstance(value, (list, tuple)) and value and _is_int(value[0]):
            return int(value[0])
    return default


def _part(config: Any, name: str) -> Any:
    return sub_configs(config).get(name, config)


def token_ids(config: Any, length: int = TOKENS, seed: int = 1) -> Tensor:
    """Token ids below the vocabulary size that are no special token of the config."""
    text = _part(config, "text_config")
    vocab = _first_int(text, ("vocab_size",), SMALL_VOCAB)
    special = _token_ids(text) | _token_ids(config)
    allowed = torch.tensor([i for i in range(min(vocab, 4 * SMALL_VOCAB)) if i not in special])
    generator = torch.Generator().manual_seed(seed)
    picks = torch.randint(len(allowed), (BATCH, length), generator=generator)
    return allowed[picks]


def _pixels(config: Any) -> Tensor:
    vision = _part(config, "vision_config")
    size = _first_int(vision, ("image_size", "img_size"), IMAGE)
    channels = _first_int(vision, ("num_channels", "in_channels", "in_chans"), 3)
    shape = (BATCH, channels, size, size)
    return torch.randn(shape, generator=torch.Generator().manual_seed(2))


def _audio_features(config: Any) -> list[Tensor]:
    audio = _part(config, "audio_config")
    bins = _first_int(audio, ("num_mel_bins", "feature_size", "input_feat_per_channel", "n_mels",
                              "num_mels"), 80)  # fmt: skip
    positions = getattr(audio, "max_source_positions", None)
    frames = 2 * positions if _is_int(positions) else 64
    generator = torch.Generator().manual_seed(3)
    return [torch.randn(BATCH, bins, frames, generator=generator),
            torch.randn(BATCH, frames, bins, generator=generator)]  # fmt: skip


def candidates(model: nn.Module, config: Any) -> list[DummyInput]:
    """Inputs to try, the model's main input first."""
    parameters = inspect.signature(model.forward).parameters
    main = getattr(model, "main_input_name", "input_ids")
    mains: list[DummyInput] = []
    if main == "pixel_values" or (main not in parameters and "pixel_values" in parameters):
        mains.append(DummyInput({"pixel_values": _pixels(config)}, ("vision_config",)))
    elif main == "input_values":  # a waveform: (B, N) or mono (B, 1, N)
        mains += [DummyInput({"input_values": torch.randn(shape)}, ("audio",))
                  for shape in ((BATCH, AUDIO_SAMPLES), (BATCH, 1, AUDIO_SAMPLES))]  # fmt: skip
    elif main == "input_features":
        mains += [DummyInput({"input_features": f}, ("audio_config",)) for f in
                  _audio_features(config)]  # fmt: skip
    elif "input_ids" in parameters:
        mains.append(DummyInput({"input_ids": token_ids(config)}, ("text_config",)))
    parts = sub_configs(config)
    image_tokens = any(k.startswith(("image_token", "video_token")) for k in vars(config))
    if ("input_ids" in parameters and "pixel_values" in parameters and "text_config" in parts
            and "vision_config" in parts and not image_tokens):  # fmt: skip
        both = {"input_ids": token_ids(config), "pixel_values": _pixels(config)}
        mains.insert(0, DummyInput(both, ("text_config", "vision_config")))
    if getattr(config, "is_encoder_decoder", False) and "decoder_input_ids" in parameters:
        decoder = token_ids(config, DECODER_TOKENS, seed=4)
        mains = [DummyInput({**m.kwargs, "decoder_input_ids": decoder}, m.modalities + ("decoder",))
                 for m in mains]  # fmt: skip
    if "use_cache" in parameters:  # hybrid models shrunk to no attention layer need no cache
        mains += [DummyInput({**m.kwargs, "use_cache": False}, m.modalities) for m in mains]
    return mains


def config_layers(config: Any, dummy: DummyInput) -> tuple[int, ...]:
    """The layers of the stacks the input runs through: the config's own (encoder, then the
    decoder where the input has decoder token ids), then those of the sub-configs its
    modalities name (text, vision, audio parts; an encoder and a decoder sub-config)."""
    own = stack_layers(config)
    if len(own) == 2 and "decoder" not in dummy.modalities:
        own = own[:1]  # no decoder input: the encoder alone runs
    parts = sub_configs(config)
    used = [n for n in ("encoder", "text_config", "vision_config", "audio_config", "decoder")
            if n in parts and (n in dummy.modalities or n in ("encoder", "decoder"))]  # fmt: skip
    if not used and len(parts) == 1:
        used = list(parts)
    return own + tuple(layers for name in used for layers in stack_layers(parts[name]))
