"""Residual detection and injection on synthetic models whose residual sites are known.

Every expected site comes from how the model is built (``BRANCHES``/``ADDS`` of the blocks in
``synthetic_models``). Placement is checked without the report: with only the DropPath modules
in train mode at rate 1, the injected model must compute what the original computes when the
outputs of the branch modules are replaced by zeros.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest
import torch
from helpers import synthetic_models as sm
from helpers.injection_checks import (
    MAX_DROP,
    Wrap,
    assert_report,
    assert_same_outputs,
    assert_same_training,
    assert_unchanged,
    check_injection,
    check_no_residual,
    check_placement,
    drop_paths,
    eval_outputs,
    expect,
    images,
    own_drop_paths,
    seeded,
    snapshot,
    tokens,
    train_step,
    vectors,
)
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

import droppath_inject.apply
import droppath_inject.verify
from droppath_inject import (
    DropPathInjectError,
    DropPathWarning,
    ExampleInputError,
    SiteStatus,
    VerificationError,
    find_residuals,
    inject_droppath,
    remove_droppath,
    set_drop_rates,
)

pytestmark = pytest.mark.usefixtures("single_thread")


# --- 1. not residuals --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("build", "inputs"),
    [
        pytest.param(sm.FPNWrapper, images(), id="fpn-top-down"),
        pytest.param(sm.UNetWrapper, images(), id="unet-add-skips-deep-supervision"),
        pytest.param(lambda: Wrap(sm.LeakyBranch()), vectors(), id="branch-hidden-is-output"),
    ],
)
def test_merges_whose_branch_leaks_are_not_residuals(
    build: Callable[[], nn.Module], inputs: tuple[Tensor, ...]
) -> None:
    """A 'branch' whose intermediate tensors are also model outputs is no residual branch."""
    check_no_residual(seeded(build), inputs)


@pytest.mark.parametrize(
    ("build", "inputs"),
    [
        pytest.param(lambda: Wrap(sm.PosEmbed()), tokens(), id="pos-embed-parameter"),
        pytest.param(lambda: Wrap(sm.FullPosEmbed(2)), tokens(), id="full-shape-parameter"),
        pytest.param(lambda: Wrap(sm.BufferBias()), images(sm.CHANNELS), id="bias-buffer"),
        pytest.param(
            lambda: Wrap(sm.GlobalContextAdd()), images(sm.CHANNELS), id="broadcast-context"
        ),
        pytest.param(lambda: Wrap(sm.RepVggParallel()), images(sm.CHANNELS), id="repvgg-sum"),
        pytest.param(lambda: Wrap(sm.ParallelSum()), vectors(), id="parallel-linears"),
    ],
)
def test_adds_that_are_not_residuals(
    build: Callable[[], nn.Module], inputs: tuple[Tensor, ...]
) -> None:
    """Parameters, buffers, broadcast context and equal-depth parallel branches: no site."""
    check_no_residual(seeded(build), inputs)


def test_broadcast_context_add_is_rejected_with_inferred_inputs() -> None:
    """Without example_inputs the inferred input still supplies shapes to reject broadcasting."""
    model = Wrap(sm.GlobalContextAdd())
    assert find_residuals(model).sites == []


# --- 2. residual blocks, one kind at a time ----------------------------------------------------


def conv_blocks(block: Callable[[], nn.Module], count: int = 2) -> Callable[[], nn.Module]:
    """A seeded factory of a conv net with ``count`` blocks of one kind."""
    return seeded(lambda: sm.conv_net([block() for _ in range(count)]))


@pytest.mark.parametrize(
    "block",
    [
        pytest.param(sm.PlainResidual, id="x+f(x)"),
        pytest.param(sm.SwappedResidual, id="f(x)+x"),
        pytest.param(sm.TorchAddResidual, id="torch.add"),
        pytest.param(sm.MethodAddResidual, id="x.add"),
        pytest.param(sm.InplaceBranchResidual, id="f(x).add_(x)"),
        pytest.param(sm.BasicBlock, id="out+=identity"),
        pytest.param(sm.LayerScaleResidual, id="layer-scale"),
    ],
)
def test_identity_skip_residuals(block: Callable[[], nn.Module]) -> None:
    """Three blocks of one kind: three sites, owned by the blocks, rates 0, 0.1, 0.2."""
    owners = ["blocks.0", "blocks.1", "blocks.2"]
    check_injection(conv_blocks(block, 3), images(), owners)


def test_repvgg_identity_bn_is_not_a_residual() -> None:
    """``conv1x1(x) + convkxk(x)`` then ``+= bn(x)``: one layer of parallel convs and a norm,
    which folds into a single conv (a re-parameterizable block), not a residual block. timm's
    byobnet drops there anyway, through its own ``drop_path``; its FastViT does not."""
    check_no_residual(conv_blocks(sm.RepVggIdentityBlock, 3), images())


def test_projection_shortcuts() -> None:
    """``downsample(x) + f(x)`` between BasicBlocks: the deeper side is the branch."""
    factory = seeded(
        lambda: sm.Net(
            sm.conv_bn(3, sm.CHANNELS),
            [sm.BasicBlock(), sm.ProjectionResidual(), sm.BasicBlock(8, 8)],
            nn.Conv2d(8, 3, 1),
        )
    )
    check_injection(
        factory,
        images(),
        ["blocks.0", "blocks.1", "blocks.2"],
        {"blocks.1": "blocks.1.downsample"},
    )


def test_strided_basic_block_with_downsample() -> None:
    """torchvision's BasicBlock with its conv1x1+BN downsample as the skip."""
    factory = seeded(
        lambda: sm.Net(
            sm.conv_bn(3, sm.CHANNELS),
            [sm.BasicBlock(), sm.BasicBlock(4, 8, 2)],
            nn.Conv2d(8, 3, 1),
        )
    )
    check_injection(
        factory, images(), ["blocks.0", "blocks.1"], {"blocks.1": "blocks.1.downsample"}
    )


@pytest.mark.parametrize(
    "options",
    [
        pytest.param({}, id="plain"),
        pytest.param({"mask": True}, id="mask-buffer"),
        pytest.param({"rel_bias": True}, id="relative-bias-parameter"),
        pytest.param({"mask": True, "rel_bias": True}, id="mask-and-bias"),
    ],
)
def test_pre_norm_transformer_blocks(options: dict[str, bool]) -> None:
    """Two residual adds per block, sharing its rate; side inputs do not break the branch."""
    factory = seeded(lambda: sm.token_net([sm.TransformerBlock(**options) for _ in range(3)]))
    check_injection(factory, tokens(), ["blocks.0", "blocks.1", "blocks.2"])


def test_transformer_blocks_with_a_mask_argument() -> None:
    """A key-padding mask passed through forward arguments is a side input of the branch."""
    mask = torch.tensor([[True, True, True, False], [True, True, False, False]])
    factory = seeded(sm.MaskedTokenNet)
    check_injection(factory, (*tokens(), mask), ["blocks.0", "blocks.1"])


def test_vector_layer_scale() -> None:
    """Layer scale on token features, ``x + gamma * mlp(x)``."""
    factory = seeded(
        lambda: sm.token_net([sm.LayerScaleResidual(sm.mlp(), shape=(sm.DIM,)) for _ in range(2)])
    )
    check_injection(factory, tokens(), ["blocks.0", "blocks.1"])


def test_block_computing_from_a_buffer_is_found() -> None:
    """An op on a buffer in the block's own forward (a traced constant) hides no residual."""
    check_injection(conv_blocks(sm.BufferScaledResidual), images(), ["blocks.0", "blocks.1"])


def test_injected_block_reads_its_buffers_live() -> None:
    """After injection, new buffer values (load_state_dict, .double()) reach the computation."""
    model = sm.randomize_norms(conv_blocks(sm.BufferScaledResidual)())
    original = copy.deepcopy(model)
    inject_droppath(model, example_inputs=images())
    assert len(drop_paths(model)) == 2
    state = original.state_dict()
    state["blocks.0.log_scale"] = state["blocks.0.log_scale"] + 1.0
    for m in (model, original):
        m.load_state_dict(state)
    assert_same_outputs(eval_outputs(original, images()), eval_outputs(model, images()))
    inputs = (images()[0].double(),)
    assert_same_outputs(
        eval_outputs(original.double(), inputs), eval_outputs(model.double(), inputs)
    )


@pytest.mark.parametrize(
    ("build", "inputs"),
    [
        pytest.param(
            lambda: sm.token_net([sm.TransformerBlock(mask=True)]), tokens(), id="mask-buffer"
        ),
        pytest.param(lambda: conv_blocks(sm.BufferScaledResidual)(), images(), id="buffer-op"),
    ],
)
def test_dry_run_leaves_module_attributes_alone(
    build: Callable[[], nn.Module], inputs: tuple[Tensor, ...]
) -> None:
    """find_residuals adds no attribute (such as traced tensor constants) to any module."""
    model = build()
    names = {path: set(vars(m)) for path, m in model.named_modules()}
    find_residuals(model, inputs)
    assert {path: set(vars(m)) for path, m in model.named_modules()} == names


def test_hooks_on_a_replaced_block_still_fire() -> None:
    """Forward hooks registered on a block before injection run on its replacement."""
    model = conv_blocks(sm.PlainResidual)()
    calls: list[str] = []
    model.blocks[0].register_forward_pre_hook(lambda m, a: calls.append("pre"))
    model.blocks[0].register_forward_hook(lambda m, a, out: calls.append("post"))
    inject_droppath(model, example_inputs=images())
    assert own_drop_paths(model, "blocks.0")
    calls.clear()
    eval_outputs(model, images())
    assert calls == ["pre", "post"]


# --- 3. nested residuals -----------------------------------------------------------------------


def test_nested_residuals() -> None:
    """Inner blocks execute their adds before the outer add: rates follow that order."""
    factory = seeded(
        lambda: sm.conv_net([sm.PlainResidual(), sm.NestedResidual(), sm.PlainResidual()])
    )
    owners = ["blocks.0", "blocks.1.body.1", "blocks.1.body.2", "blocks.1", "blocks.2"]
    model, _ = check_injection(factory, images(), owners)
    outer = model.get_submodule("blocks.1")
    assert own_drop_paths(model, "blocks.1.body.1")[0] not in own_drop_paths(model, "blocks.1")
    assert outer.get_submodule("body.1") is model.get_submodule("blocks.1.body.1")


# --- 4. untraceable model ----------------------------------------------------------------------


def test_untraceable_model_is_injected_piecewise() -> None:
    """A data-dependent early exit, which stops symbolic tracing, simply runs when captured."""
    factory = seeded(sm.EarlyExitNet)
    _, report = check_injection(factory, images(), ["blocks.0", "blocks.1", "blocks.2"])
    assert report.skipped == []
    assert find_residuals(factory()).skipped == []  # inferred input: captured too


def test_untraceable_model_keeps_its_early_exit() -> None:
    """Both paths of the data-dependent branch give the original's eval outputs."""
    model = sm.randomize_norms(seeded(lambda: sm.EarlyExitNet(limit=100.0))())
    original = copy.deepcopy(model)
    small, large = images()[0] * 1e-3, images()[0] * 1e3
    calls: list[int] = []
    for block in original.blocks:
        block.register_forward_hook(lambda m, a, out: calls.append(1))
    inject_droppath(model, example_inputs=(small,))
    assert len(drop_paths(model)) == 3
    for x, blocks_run in ((small, 3), (large, 1)):
        calls.clear()
        eval_outputs(original, (x,))
        assert len(calls) == blocks_run  # the early exit is taken only for the large input
        assert_same_outputs(eval_outputs(original, (x,)), eval_outputs(model, (x,)))


# --- 5. dropout inside branches ----------------------------------------------------------------


def dropout_net() -> nn.Module:
    def branch(dropout: nn.Module) -> nn.Sequential:
        return nn.Sequential(nn.Linear(sm.DIM, sm.DIM), dropout, nn.Linear(sm.DIM, sm.DIM))

    return sm.token_net(
        [
            sm.PlainResidual(branch(sm.FunctionalDropout(0.5))),
            sm.PlainResidual(branch(nn.Dropout(0.5))),
        ]
    )


def test_dropout_in_branches_stays_active_in_train_mode() -> None:
    """``F.dropout(training=self.training)`` and ``nn.Dropout`` keep following the mode."""
    factory = seeded(dropout_net)
    model, _ = check_injection(factory, tokens(), ["blocks.0", "blocks.1"])
    original = sm.randomize_norms(factory())
    inject_droppath(model, 0.0, example_inputs=tokens())
    assert_same_training(model, original, tokens())
    train_out, _ = train_step(model, tokens())
    assert not torch.equal(train_out, eval_outputs(model, tokens()))  # dropout did something
    assert_same_outputs(eval_outputs(original, tokens()), eval_outputs(model, tokens()))


def test_block_with_dropout_in_its_own_forward_keeps_train_behaviour() -> None:
    """A block whose own forward reads self.training is handled in both modes or skipped."""
    factory = seeded(lambda: sm.token_net([sm.OwnDropoutResidual(), sm.PreNormResidual()]))
    model, original = factory(), factory()
    _, report = inject_droppath(model, 0.0, example_inputs=tokens(), return_report=True)
    owners = [s.owner for s in report.sites]
    skipped = [s.module for s in report.skipped]
    assert "blocks.1" in owners
    assert ("blocks.0" in owners) != ("blocks.0" in skipped)
    assert_same_training(model, original, tokens())
    assert_same_outputs(eval_outputs(original, tokens()), eval_outputs(model, tokens()))


# --- 6. existing drop paths --------------------------------------------------------------------


def test_second_injection_updates_rates_without_nesting() -> None:
    """Calling it twice keeps the same DropPath objects and gives them the new rates."""
    model = sm.randomize_norms(conv_blocks(sm.PlainResidual, 3)())
    original = copy.deepcopy(model)
    inject_droppath(model, 0.1, example_inputs=images())
    first = dict(model.named_modules())
    layers = drop_paths(model)
    assert len(layers) == 3
    _, report = inject_droppath(
        model, 0.3, mode="batch", example_inputs=images(), return_report=True
    )
    after = dict(model.named_modules())
    assert after.keys() == first.keys() and all(after[k] is first[k] for k in first)
    assert drop_paths(model) == layers
    assert all(layer.mode == "batch" for layer in layers)
    rates = [0.0, 0.15, 0.3]
    assert [own_drop_paths(model, f"blocks.{i}")[0].drop_prob for i in range(3)] == [
        pytest.approx(r) for r in rates
    ]
    assert [s.rate for s in report.sites] == [pytest.approx(r) for r in rates]
    assert [s.owner for s in report.sites] == ["blocks.0", "blocks.1", "blocks.2"]
    assert all(s.status is SiteStatus.RE_RATED for s in report.sites)
    assert [s.previous_rate for s in report.sites] == [pytest.approx(r) for r in (0.0, 0.05, 0.1)]
    assert_same_outputs(eval_outputs(original, images()), eval_outputs(model, images()))


class DropPathLike(nn.Module):
    """A minimal stand-in for timm's DropPath (renamed to ``DropPath`` below)."""

    def __init__(self, drop_prob: float = 0.0) -> None:
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: Tensor) -> Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = x.new_empty(x.shape[0], *([1] * (x.ndim - 1))).bernoulli_(1 - self.drop_prob)
        return x * keep / (1 - self.drop_prob)


DropPathLike.__name__ = DropPathLike.__qualname__ = "DropPath"


def existing_drop_path(kind: str, rate: float) -> nn.Module:
    """A drop-path module of the given origin (timm and torchvision imported only here)."""
    if kind == "timm":
        return pytest.importorskip("timm.layers").DropPath(rate)
    if kind == "torchvision":
        return pytest.importorskip("torchvision.ops").StochasticDepth(rate, "row")
    return DropPathLike(rate)


class TimmStyleBlock(nn.Module):
    """``x + drop_path(f(x))``, like timm blocks built with ``drop_path_rate > 0``."""

    BRANCHES = ("f",)
    ADDS = 1

    def __init__(self, drop_path: nn.Module) -> None:
        super().__init__()
        self.f = sm.mlp()
        self.drop_path = drop_path

    def forward(self, x: Tensor) -> Tensor:
        return x + self.drop_path(self.f(x))


def existing_drop_path_net(kind: str) -> nn.Module:
    return sm.token_net(
        [
            TimmStyleBlock(existing_drop_path(kind, 0.05)),
            TimmStyleBlock(existing_drop_path(kind, 0.07)),
            sm.PreNormResidual(),
        ]
    )


def foreign_drop_paths(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if type(m).__name__ in ("DropPath", "StochasticDepth")]


@pytest.mark.parametrize("kind", ["local", "timm", "torchvision"])
def test_existing_drop_paths_are_re_rated_not_doubled(kind: str) -> None:
    """By default a drop path already on a branch gets the schedule's rate; ours go elsewhere."""
    model = seeded(lambda: existing_drop_path_net(kind))()
    original = copy.deepcopy(model)
    existing = foreign_drop_paths(model)
    assert len(existing) == 2
    schedule = [0.0, MAX_DROP / 2, MAX_DROP]
    for previous in ([0.05, 0.07], schedule[:2]):
        _, report = inject_droppath(model, MAX_DROP, example_inputs=tokens(), return_report=True)
        assert [s.owner for s in report.sites] == ["blocks.0", "blocks.1", "blocks.2"]
        assert [s.rate for s in report.sites] == [pytest.approx(r) for r in schedule]
        assert [s.status for s in report.sites[:2]] == [SiteStatus.RE_RATED] * 2
        assert [s.previous_rate for s in report.sites[:2]] == [pytest.approx(r) for r in previous]
        assert "re-rated 0.05 -> 0.00" in report.table() or previous != [0.05, 0.07]
        assert report.sites[2].status in (SiteStatus.INJECTED, SiteStatus.RE_RATED)
        assert len(drop_paths(model)) == 1 and own_drop_paths(model, "blocks.2")
        assert model.blocks[0].drop_path is existing[0] and model.blocks[1].drop_path is existing[1]
        assert len(foreign_drop_paths(model)) == 3  # the two existing ones and ours
    rate_of = "p" if kind == "torchvision" else "drop_prob"
    assert [getattr(m, rate_of) for m in existing] == [pytest.approx(r) for r in schedule[:2]]
    assert set_drop_rates(model, 0.4) == [pytest.approx(r) for r in (0.0, 0.2, 0.4)]
    assert [getattr(m, rate_of) for m in existing] == [pytest.approx(r) for r in (0.0, 0.2)]
    assert_same_outputs(eval_outputs(original, tokens()), eval_outputs(model, tokens()))
    remove_droppath(model)  # the existing drop paths get their own rates back
    assert [getattr(m, rate_of) for m in existing] == [0.05, 0.07]
    assert not drop_paths(model)


def test_existing_drop_paths_kept_on_request() -> None:
    model = seeded(lambda: existing_drop_path_net("timm"))()
    _, report = inject_droppath(
        model, MAX_DROP, example_inputs=tokens(), existing="keep", return_report=True
    )
    assert [s.status for s in report.sites] == [SiteStatus.KEPT] * 2 + [SiteStatus.INJECTED]
    assert [s.rate for s in report.sites] == [0.05, 0.07, pytest.approx(MAX_DROP)]
    assert [m.drop_prob for m in foreign_drop_paths(model)[:2]] == [0.05, 0.07]


# --- 7. failures leave the model untouched -----------------------------------------------------


def test_wrong_example_input_raises_and_changes_nothing() -> None:
    """An input the model cannot run raises ExampleInputError before anything is touched."""
    model = sm.randomize_norms(conv_blocks(sm.PlainResidual)())
    before = snapshot(model)
    wrong = torch.randn(2, 5, 8, 8)  # 5 channels, the stem wants 3
    with pytest.raises(ExampleInputError) as error:
        inject_droppath(model, example_inputs=wrong)
    assert isinstance(error.value, DropPathInjectError)
    assert_unchanged(model, before)
    with pytest.raises(ExampleInputError):
        find_residuals(model, wrong)
    assert_unchanged(model, before)


def test_failed_verification_restores_the_model(monkeypatch: pytest.MonkeyPatch) -> None:
    """Force the bitwise comparison to fail: every replaced block must be put back."""
    model = sm.randomize_norms(conv_blocks(sm.PlainResidual, 3)())
    before = snapshot(model)
    monkeypatch.setattr(droppath_inject.verify, "outputs_equal", lambda expected, actual: False)
    with pytest.raises(VerificationError):
        inject_droppath(model, example_inputs=images())
    assert_unchanged(model, before)


def test_failure_while_attaching_restores_the_model(monkeypatch: pytest.MonkeyPatch) -> None:
    """An error on the third block's attachment undoes the first two."""
    model = sm.randomize_norms(conv_blocks(sm.PlainResidual, 3)())
    before = snapshot(model)
    hook = droppath_inject.apply.Attacher._hook
    calls = []

    def failing(self: Any, *args: Any) -> None:
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("injected failure")
        hook(self, *args)

    monkeypatch.setattr(droppath_inject.apply.Attacher, "_hook", failing)
    with pytest.raises(RuntimeError, match="injected failure"):
        inject_droppath(model, example_inputs=images())
    assert len(calls) == 3
    assert_unchanged(model, before)
    assert all(not m._forward_hooks for m in model.modules())


def param_only_net() -> nn.Module:
    return sm.Net(nn.Identity(), [sm.ParamMatmulResidual(), sm.ParamMatmulResidual()], nn.Tanh())


def test_model_without_known_input_layer_needs_example_inputs() -> None:
    """No conv/linear/embedding: a clear ExampleInputError, and the model is left as it was."""
    model = seeded(param_only_net)()
    before = snapshot(model)
    with pytest.raises(ExampleInputError, match="example_inputs"):
        inject_droppath(model)
    assert_unchanged(model, before)


def test_model_without_known_input_layer_with_verify_false() -> None:
    """verify=False still needs one run, and so does the dry run: both say to pass an input;
    given one, the dry run finds both residuals."""
    model = seeded(param_only_net)()
    with pytest.raises(ExampleInputError, match="example_inputs"):
        inject_droppath(model, MAX_DROP, verify=False)
    with pytest.raises(ExampleInputError, match="cannot infer an example input for Net"):
        find_residuals(model)
    report = find_residuals(model, example_inputs=vectors())
    assert [s.owner for s in report.sites] == ["blocks.0", "blocks.1"]


def test_branch_no_module_computes_is_reported_not_rewritten() -> None:
    """``x + tanh(x @ w)``: no module returns the branch, so no hook can carry a DropPath. The
    sites are reported as skipped, with the reason and a warning, and the model is unchanged."""
    model = seeded(param_only_net)()
    before = snapshot(model)
    with pytest.warns(DropPathWarning, match="2 of 2 residual sites of Net got no DropPath"):
        _, report = inject_droppath(model, MAX_DROP, example_inputs=vectors(), return_report=True)
    assert [s.owner for s in report.sites] == ["blocks.0", "blocks.1"]
    assert [s.status for s in report.sites] == [SiteStatus.SKIPPED] * 2
    assert all("not the output of a module call" in s.detail for s in report.sites)
    assert "tanh()" in report.sites[0].detail
    assert_unchanged(model, before)


# --- 8. random residual networks ---------------------------------------------------------------


def nested_vector_block() -> nn.Module:
    inner = sm.PlainResidual(sm.mlp())
    outer = sm.PlainResidual(nn.Sequential(nn.Linear(sm.DIM, sm.DIM), inner, nn.ReLU()))
    return outer


#: kind -> (constructor, owner paths relative to the block in execution order, skip of each)
KINDS: dict[str, tuple[Callable[[], nn.Module], tuple[str, ...], tuple[str, ...]]] = {
    "identity": (lambda: sm.PlainResidual(sm.mlp()), ("",), ("identity",)),
    "swapped": (lambda: sm.SwappedResidual(sm.mlp()), ("",), ("identity",)),
    "torch_add": (lambda: sm.TorchAddResidual(sm.mlp()), ("",), ("identity",)),
    "method_add": (lambda: sm.MethodAddResidual(sm.mlp()), ("",), ("identity",)),
    "projection": (sm.LinearProjectionResidual, ("",), ("downsample",)),
    "pre_norm": (sm.PreNormResidual, ("",), ("identity",)),
    "pre_norm_pair": (sm.PreNormPair, ("",), ("identity",)),
    "layer_scale": (
        lambda: sm.LayerScaleResidual(sm.mlp(), shape=(sm.DIM,)),
        ("",),
        ("identity",),
    ),
    "nested": (nested_vector_block, ("f.1", ""), ("identity", "identity")),
    "plain": (lambda: nn.Sequential(nn.Linear(sm.DIM, sm.DIM), nn.ReLU()), (), ()),
    "parallel": (sm.ParallelSum, (), ()),
}


@settings(max_examples=25, deadline=None)
@given(
    spec=st.lists(st.sampled_from(sorted(KINDS)), min_size=1, max_size=6),
    max_drop=st.sampled_from([0.1, 0.25, 0.5]),
)
def test_random_residual_networks(spec: list[str], max_drop: float) -> None:
    """Sites, owners, blocks and rates match the spec; outputs and placement are exact."""
    torch.manual_seed(len(spec))
    model = sm.Net(
        nn.Linear(sm.DIM, sm.DIM), [KINDS[k][0]() for k in spec], nn.Linear(sm.DIM, sm.DIM)
    )
    skips = {
        f"blocks.{i}.{rel}" if rel else f"blocks.{i}": skip
        for i, kind in enumerate(spec)
        for rel, skip in zip(KINDS[kind][1], KINDS[kind][2], strict=True)
    }
    expected = expect(model, list(skips), skips)
    original = copy.deepcopy(model)
    _, report = inject_droppath(model, max_drop, example_inputs=vectors(), return_report=True)
    assert_report(report, expected, max_drop)
    assert len(drop_paths(model)) == sum(e.adds for e in expected)
    assert_same_outputs(eval_outputs(original, vectors()), eval_outputs(model, vectors()))
    if expected:
        check_placement(model, original, vectors(), expected)
