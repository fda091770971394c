"""The batch dimension, one rate per layer, and mixture-of-experts layers (issue 19, classes 3,
4 and 6).

Truths come from the libraries and from the test models' own code, never from the package:
``nn.TransformerEncoderLayer.batch_first`` says where the samples are; a module written
sequence-first says so by construction; T5's config gives its encoder and decoder layers and
``T5Block.layer`` its sublayers. Decisions are read off each DropPath's forward hook: the
output divided by the input is the keep mask, which must be constant along every dimension but
the batch.
"""

from __future__ import annotations

import os
import warnings
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from droppath_inject import DropPath, DropPathWarning, SiteStatus, inject_droppath
from droppath_inject.granularity import BlockHandling
from droppath_inject.report import SkipCompute

os.environ.setdefault("HF_HUB_OFFLINE", "1")

pytestmark = pytest.mark.usefixtures("single_thread")

BATCH, TIME, DIM = 8, 6, 16


def _masks(model: nn.Module, run: Any, steps: int = 2) -> list[tuple[Tensor, Tensor]]:
    """(input, keep mask) of every DropPath call in ``steps`` training forwards of ``run``."""
    seen: list[tuple[Tensor, Tensor]] = []

    def record(_: nn.Module, args: tuple[Tensor, ...], out: Tensor) -> None:
        x = args[0].detach()
        seen.append((x, out.detach() / x))

    handles = [m.register_forward_hook(record) for m in model.modules() if isinstance(m, DropPath)]
    model.train()
    torch.manual_seed(3)
    try:
        for _ in range(steps):
            run(model)
    finally:
        for handle in handles:
            handle.remove()
    assert seen, "no DropPath was called"
    return seen


def _assert_per_sample(masks: list[tuple[Tensor, Tensor]], batch_dim: int, batch: int) -> None:
    """Each mask is one value per sample along ``batch_dim`` (constant along every other
    dimension), and samples differ somewhere: row decisions over the batch, nothing else."""
    varied = False
    for x, mask in masks:
        assert x.shape[batch_dim] == batch, tuple(x.shape)
        per_sample = mask.movedim(batch_dim, 0).reshape(batch, -1)
        assert torch.equal(per_sample.amax(1), per_sample.amin(1)), "a decision not per sample"
        varied |= bool(per_sample[:, 0].unique().numel() > 1)
    assert varied, "every sample got the same decision: not row mode"


def _encoder(batch_first: bool, norm_first: bool = False) -> nn.TransformerEncoder:
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(
        DIM, 2, 32, dropout=0.0, batch_first=batch_first, norm_first=norm_first
    )
    return nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)


def _sequence(batch_first: bool, time: int = TIME) -> Tensor:
    shape = (BATCH, time, DIM) if batch_first else (time, BATCH, DIM)
    return torch.randn(shape, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("time", [TIME, BATCH], ids=["T!=B", "T==B"])
@pytest.mark.parametrize("batch_first", [False, True], ids=["seq-first", "batch-first"])
def test_transformer_encoder_draws_one_decision_per_sample(batch_first: bool, time: int) -> None:
    """torch's own encoder: decisions along dimension 1 when ``batch_first`` is False, along 0
    when True, also when the sequence is as long as the batch (sizes cannot tell them apart).
    Main drew one decision per time step on the sequence-first layout."""
    model = _encoder(batch_first)
    x = _sequence(batch_first, time)
    inject_droppath(model, 0.5, schedule="uniform", example_inputs=x)
    layer = model.layers[0]
    assert isinstance(layer, nn.TransformerEncoderLayer)
    truth = 0 if layer.self_attn.batch_first else 1
    _assert_per_sample(_masks(model, lambda m: m(x)), truth, BATCH)


class SequenceFirstBlock(nn.Module):
    """A fairseq-style pre-norm layer on ``(T, B, C)``: attention, and a convolution over time
    that moves to channels-first ``(B, C, T)`` and back inside its branch."""

    def __init__(self) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(DIM), nn.LayerNorm(DIM)
        self.attn = nn.MultiheadAttention(DIM, 2)  # batch_first=False: (T, B, C)
        self.conv = nn.Conv1d(DIM, DIM, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.norm1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        h = self.norm2(x).permute(1, 2, 0)  # (B, C, T)
        return x + self.conv(h).permute(2, 0, 1)  # back to (T, B, C)


class SequenceFirstNet(nn.Module):
    """Token ids ``(B, T)`` in, transposed to ``(T, B, C)`` for the layers, as fairseq does."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(32, DIM)
        self.layers = nn.ModuleList([SequenceFirstBlock() for _ in range(2)])

    def forward(self, tokens: Tensor) -> Tensor:
        x = self.embed(tokens).transpose(0, 1)
        for layer in self.layers:
            x = layer(x)
        return x.transpose(0, 1)


def test_sequence_first_layers_and_a_channels_first_branch() -> None:
    """Every residual of the sequence-first layers gets a DropPath (main skipped the conv
    branch, which returns to ``(T, B, C)`` by a permute no module returns) and every decision
    is per sample, along dimension 1 of the layers' tensors (main drew per time step)."""
    torch.manual_seed(0)
    model = SequenceFirstNet()
    for module in model.modules():  # layer norms start at ones and zeros: randomize them
        if isinstance(module, nn.LayerNorm):
            nn.init.normal_(module.weight)
            nn.init.normal_(module.bias)
    tokens = torch.randint(0, 32, (BATCH, TIME), generator=torch.Generator().manual_seed(1))
    with warnings.catch_warnings():
        warnings.simplefilter("error", DropPathWarning)
        _, report = inject_droppath(
            model, 0.5, schedule="uniform", example_inputs=tokens, return_report=True
        )
    assert [s.status for s in report.sites] == [SiteStatus.INJECTED] * 4
    masks = _masks(model, lambda m: m(tokens))
    for x, _ in masks:  # the truth, by construction: the layers hold (T, B, C) or (B, C, T)
        assert tuple(x.shape) in ((TIME, BATCH, DIM), (BATCH, DIM, TIME))
    seq_first = [(x, m) for x, m in masks if x.shape[1] == BATCH]
    channels_first = [(x, m) for x, m in masks if x.shape[0] == BATCH]
    assert seq_first and channels_first
    _assert_per_sample(seq_first, 1, BATCH)
    _assert_per_sample(channels_first, 0, BATCH)


class WindowBlock(nn.Module):
    """Windows folded into the batch dimension, ``(B*nW, N, C)``, with a residual over the
    windows: no dimension of that branch holds the samples alone."""

    WINDOWS = 2

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(DIM)
        self.attn = nn.MultiheadAttention(DIM, 2, batch_first=True)

    def forward(self, x: Tensor) -> Tensor:
        b, t, c = x.shape
        windows = x.reshape(b * self.WINDOWS, t // self.WINDOWS, c)
        h = self.norm(windows)
        windows = windows + self.attn(h, h, h, need_weights=False)[0]
        return windows.reshape(b, t, c)


def test_folded_batch_is_skipped_with_a_reason_never_drawn_per_window() -> None:
    """Main hooked the attention and drew one decision per window (``B * nW`` of them); the
    site must be skipped, said in the report and by one DropPathWarning."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(DIM, DIM), WindowBlock(), WindowBlock())
    x = torch.randn(BATCH, TIME, DIM, generator=torch.Generator().manual_seed(1))
    with pytest.warns(DropPathWarning, match="batch dimension") as caught:
        _, report = inject_droppath(model, 0.5, example_inputs=x, return_report=True)
    assert sum(issubclass(w.category, DropPathWarning) for w in caught) == 1
    assert len(report.sites) == 2
    assert all(s.status is SiteStatus.SKIPPED and "batch" in s.detail for s in report.sites)
    assert not any(isinstance(m, DropPath) for m in model.modules())


def test_layer_skip_masks_a_sequence_first_layer_along_its_batch() -> None:
    """Block granularity with ``skip_compute``: a pre-norm sequence-first layer proves
    ``out = x + branches`` but skipping gathers rows of dimension 0 (time steps here), so it
    masks, says why, warns, and its shared decision is per sample along dimension 1. Main
    skipped time steps."""
    model = _encoder(batch_first=False, norm_first=True)
    x = _sequence(batch_first=False)
    with pytest.warns(DropPathWarning, match="skip_compute"):
        _, report = inject_droppath(
            model, 0.5, schedule="uniform", example_inputs=x, granularity="block",
            skip_compute=True, return_report=True,
        )  # fmt: skip
    assert report.layer_drop is not None
    for block in report.layer_drop.blocks:
        assert block.handling is BlockHandling.SHARED and "dimension 1" in block.reason
    layer = model.layers[0]
    assert isinstance(layer, nn.TransformerEncoderLayer) and not layer.self_attn.batch_first
    masks = _masks(model, lambda m: m(x).sum().backward())
    _assert_per_sample(masks, 1, BATCH)
    for first, second in zip(masks[::2], masks[1::2], strict=True):  # one decision per layer
        assert torch.equal(first[1][0, :, 0], second[1][0, :, 0])


def _t5(decoder_layers: int) -> Any:
    transformers = pytest.importorskip("transformers")
    config = transformers.T5Config(
        vocab_size=64, d_model=16, d_kv=8, d_ff=32, num_layers=2,
        num_decoder_layers=decoder_layers, num_heads=2, dropout_rate=0.0,
    )  # fmt: skip
    torch.manual_seed(0)
    return transformers.T5Model(config).eval()


def _seq2seq_inputs() -> dict[str, Tensor]:
    generator = torch.Generator().manual_seed(1)
    return {
        "input_ids": torch.randint(0, 64, (3, 7), generator=generator),
        "decoder_input_ids": torch.randint(0, 64, (3, 5), generator=generator),
    }


@pytest.mark.parametrize("decoder_layers", [2, 3])
def test_t5_one_layer_one_rate_encoder_then_decoder(decoder_layers: int) -> None:
    """T5 keeps each layer's sublayers in ``T5Block.layer``: a block per ``T5Block``
    (``num_layers + num_decoder_layers``, main gave one per sublayer: 10 for 2 + 2), encoder
    layers first, every sublayer's residual at its layer's rate."""
    model = _t5(decoder_layers)
    _, report = inject_droppath(model, 0.3, example_inputs=_seq2seq_inputs(), return_report=True)
    config = model.config
    stacks = [("encoder", model.encoder.block), ("decoder", model.decoder.block)]
    layers = [(f"{name}.block.{i}", block) for name, blocks in stacks for i, block in
              enumerate(blocks)]  # fmt: skip
    assert report.num_blocks == config.num_layers + config.num_decoder_layers == len(layers)
    for index, (path, block) in enumerate(layers):
        sites = [s for s in report.sites if s.block_index == index]
        assert sorted(s.owner for s in sites) == [f"{path}.layer.{j}" for j in
                                                  range(len(block.layer))]  # fmt: skip
        assert len({s.rate for s in sites}) == 1
        assert all(s.status is SiteStatus.INJECTED for s in sites)
    rates = [next(s.rate for s in report.sites if s.block_index == i) for i in range(len(layers))]
    assert rates == sorted(rates) and rates[0] == 0.0 and rates[-1] == pytest.approx(0.3)


def _qwen2_moe() -> Any:
    transformers = pytest.importorskip("transformers")
    config = transformers.Qwen2MoeConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, moe_intermediate_size=8,
        shared_expert_intermediate_size=16, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, num_experts=4, num_experts_per_tok=2, use_cache=False,
    )  # fmt: skip
    torch.manual_seed(0)
    return transformers.Qwen2MoeModel(config)


def test_moe_decisions_are_per_sample_never_per_token() -> None:
    """``Qwen2MoeModel`` flattens tokens to ``(B*T, H)`` in its MoE block: no DropPath may
    draw there (main drew one decision per token on the shared expert's sum)."""
    model = _qwen2_moe()
    ids = torch.randint(0, 64, (4, 12), generator=torch.Generator().manual_seed(1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DropPathWarning)
        inject_droppath(model, 0.5, schedule="uniform", example_inputs=ids)
    masks = _masks(model, lambda m: m(ids))
    hidden = (4, 12, model.config.hidden_size)  # the model's hidden states, batch first
    assert all(tuple(x.shape) == hidden for x, _ in masks)
    _assert_per_sample(masks, 0, 4)


@pytest.mark.parametrize("mode", ["row", "batch"])
def test_moe_layer_skipping_never_raises(mode: str) -> None:
    """``granularity="block", skip_compute=True`` on ``Qwen2MoeModel``: main raised a raw
    RuntimeError in the first training step. Every layer skips or says why it does not, and
    any layer that does not is warned about."""
    model = _qwen2_moe()
    ids = torch.randint(0, 64, (4, 12), generator=torch.Generator().manual_seed(1))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, report = inject_droppath(
            model, 0.5, schedule="uniform", mode=mode, example_inputs=ids,  # type: ignore[arg-type]
            granularity="block", skip_compute=True, return_report=True,
        )  # fmt: skip
    model.train()
    for seed in range(3):
        torch.manual_seed(seed)
        model(ids).last_hidden_state.sum().backward()
    assert report.layer_drop is not None
    assert len(report.layer_drop.blocks) == model.config.num_hidden_layers
    masked = [b for b in report.layer_drop.blocks if b.handling is not BlockHandling.SKIPPED]
    assert all(b.reason for b in masked)
    warned = [w for w in caught if issubclass(w.category, DropPathWarning)]
    unattached = [s for s in report.sites if s.status is SiteStatus.SKIPPED]
    assert len(warned) == (1 if masked or unattached or report.skipped else 0)


def test_post_norm_bert_layers_skip_their_branches() -> None:
    """A post-norm BERT layer cannot skip whole (a norm follows its last add), so main ran it
    masked under ``granularity="block", skip_compute=True``; now each of its branches (in
    ``BertAttention`` and in the layer) skips on its own, and nothing is warned about."""
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(
        vocab_size=64, hidden_size=16, num_hidden_layers=3, num_attention_heads=2,
        intermediate_size=32,
    )  # fmt: skip
    model = transformers.BertModel(config)
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(1))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, report = inject_droppath(
            model, 0.2, example_inputs=ids, granularity="block", skip_compute=True,
            return_report=True,
        )  # fmt: skip
    assert not [w for w in caught if issubclass(w.category, DropPathWarning)]
    layers = config.num_hidden_layers
    assert len(report.sites) == 2 * layers  # the attention's and the feed-forward's add
    assert {s.skip_compute.how for s in report.sites if s.skip_compute} == {SkipCompute.KEPT_ROWS}
    assert report.layer_drop is not None
    assert [b.module for b in report.layer_drop.blocks] == [
        f"encoder.layer.{i}" for i in range(layers)
    ]
    assert all(b.reason.startswith("its branches skip on their own") for b in
               report.layer_drop.blocks)  # fmt: skip


@pytest.mark.parametrize("granularity", ["branch", "block"])
def test_skip_compute_warns_once_when_sites_mask(granularity: str) -> None:
    """A sequence-first ``nn.TransformerEncoder`` holds the samples in dimension 1, where no
    rows of dimension 0 can be run: every site masks, and one DropPathWarning counts them."""
    model = _encoder(batch_first=False, norm_first=True)
    assert not model.layers[0].self_attn.batch_first
    sites = 2 * len(model.layers)
    with pytest.warns(DropPathWarning) as caught:
        _, report = inject_droppath(
            model, 0.5, example_inputs=_sequence(batch_first=False), skip_compute=True,
            granularity=granularity, return_report=True,  # type: ignore[arg-type]
        )  # fmt: skip
    warned = [str(w.message) for w in caught if issubclass(w.category, DropPathWarning)]
    assert len(warned) == 1
    assert warned[0].startswith(
        f"skip_compute=True, but {sites} of {sites} residual sites of TransformerEncoder still "
        "compute their dropped branches, masked (layers.0.self_attn: the branch holds the "
        "samples in another dimension than 0"
    )
    assert len(report.sites) == sites
    assert all(s.skip_compute is not None and s.skip_compute.how is SkipCompute.MASKS
               for s in report.sites)  # fmt: skip


def test_an_unbatched_input_draws_no_decision() -> None:
    """Without an example input, ``nn.TransformerEncoder`` gets a 2-d input inferred from its
    first linear layer, which torch's attention reads as one unbatched ``(L, E)`` sequence: main
    drew one decision per token. No dimension holds samples, so every site is skipped, with the
    reason, in one DropPathWarning."""
    model = _encoder(batch_first=False)
    with pytest.warns(DropPathWarning, match="batch") as caught:
        _, report = inject_droppath(model, 0.5, return_report=True)
    assert sum(issubclass(w.category, DropPathWarning) for w in caught) == 1
    assert report.sites and all(s.status is SiteStatus.SKIPPED for s in report.sites)
    assert not any(isinstance(m, DropPath) for m in model.modules())
