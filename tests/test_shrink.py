"""Shrink pass: the shrunk graph equals the masked original and is an ordinary GraphModule."""

import io

import pytest
import torch
import torchvision.models as tvm
from ehap_fx.passes.cost import plan_cost, total_cost
from ehap_fx.passes.group import emptiable_groups, group_channels, groups_of
from ehap_fx.passes.mask import mask_channels, random_plan
from ehap_fx.passes.shrink import PrunePlan, shrink
from ehap_fx.passes.trace import trace
from torch import nn

from ehap_fx.errors import ShrinkError
from ehap_fx.models import get_model
from tests.nets import GroupNormNet, SEDepthwise, SplitChunk, TinyOptionA, Unknown, randomize_bn


def prepare(model, shape):
    x = torch.randn(shape)
    return group_channels(trace(randomize_bn(model), x)).graph_module, x


def assert_shrunk_equals_masked(gm, x, plan):
    small = shrink(gm, plan).graph_module
    masked = mask_channels(gm, plan).graph_module
    with torch.no_grad():
        expected, got = masked(x), small(x)
    scale = expected.abs().max().clamp_min(1.0)
    torch.testing.assert_close(got / scale, expected / scale, rtol=0, atol=2e-6)
    return small


SMALL = [
    (TinyOptionA, (2, 3, 16, 16)),
    (SplitChunk, (2, 3, 8, 8)),
    (SEDepthwise, (2, 3, 8, 8)),
    (GroupNormNet, (2, 3, 8, 8)),
    (Unknown, (2, 3, 8, 8)),
]


@pytest.mark.parametrize("make,shape", SMALL, ids=lambda v: getattr(v, "__name__", ""))
@pytest.mark.parametrize("seed", range(4))
def test_small_models_exact(make, shape, seed):
    gm, x = prepare(make(), shape)
    plan = random_plan(
        gm, fraction=[0.25, 0.5, 0.75, 0.9][seed], generator=torch.Generator().manual_seed(seed)
    )
    small = assert_shrunk_equals_masked(gm, x, plan)
    assert plan_cost(gm, plan.masks(groups_of(gm))) == total_cost(small)


PAPER_MODELS = [
    "resnet20",
    "resnet32",
    "resnet44",
    "resnet56",
    "resnet110",
    "resnet20-b",
    "resnet56-b",
    "resnet110-b",
    "wrn-28-8",
]


@pytest.mark.parametrize("name", PAPER_MODELS)
def test_paper_models_prune_half_exactly(name):
    gm, x = prepare(get_model(name), (2, 3, 32, 32))
    plan = random_plan(gm, 0.5, torch.Generator().manual_seed(1))
    small = assert_shrunk_equals_masked(gm, x, plan)
    for g in groups_of(gm).prunable:  # exact channel counts: every group keeps half
        assert len(plan.keep[g.id]) == max(1, round(g.size * 0.5))
    kept_convs = [m.out_channels for m in small.modules() if isinstance(m, torch.nn.Conv2d)]
    base_convs = [m.out_channels for m in gm.modules() if isinstance(m, torch.nn.Conv2d)]
    assert kept_convs == [max(1, round(c * 0.5)) for c in base_convs]


TORCHVISION = [
    "resnet18",
    "mobilenet_v2",
    "mobilenet_v3_small",
    "vgg11_bn",
    "resnext50_32x4d",
    "densenet121",
    "resnet50",
]


@pytest.mark.parametrize("name", TORCHVISION)
def test_torchvision_exact(name):
    gm, x = prepare(getattr(tvm, name)(num_classes=10), (2, 3, 64, 64))
    assert_shrunk_equals_masked(gm, x, random_plan(gm, 0.4, torch.Generator().manual_seed(2)))


def test_result_is_an_ordinary_graph_module(tmp_path):
    gm, x = prepare(TinyOptionA(), (2, 3, 16, 16))
    small = shrink(gm, random_plan(gm, 0.5)).graph_module
    retraced = torch.fx.symbolic_trace(small)
    torch.testing.assert_close(retraced(x), small(x))
    buf = io.BytesIO()
    torch.save(small, buf)
    buf.seek(0)
    torch.testing.assert_close(torch.load(buf, weights_only=False)(x), small(x))
    # shapes were re-propagated: tensor_meta tells the truth about the new widths
    for node in small.graph.nodes:
        if node.op == "call_module" and isinstance(small.get_submodule(node.target), torch.nn.Conv2d):
            assert node.meta["tensor_meta"].shape[1] == small.get_submodule(node.target).out_channels


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_onnx_export_of_shrunk_model(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    gm, x = prepare(SplitChunk(), (2, 3, 8, 8))
    small = shrink(gm, random_plan(gm, 0.5)).graph_module
    path = tmp_path / "small.onnx"
    torch.onnx.export(
        small,
        (x,),
        str(path),
        dynamo=False,
        opset_version=17,
        input_names=["x"],
        output_names=["y"],
        dynamic_axes={"x": {0: "n"}},
    )
    (got,) = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x.numpy()})
    torch.testing.assert_close(torch.from_numpy(got), small(x).detach(), rtol=1e-4, atol=1e-5)


def test_iterative_shrink_and_original_untouched():
    gm, x = prepare(TinyOptionA(), (2, 3, 16, 16))
    before = gm(x)
    once = shrink(gm, random_plan(gm, 0.75)).graph_module
    twice = assert_shrunk_equals_masked(once, x, random_plan(once, 0.5))
    torch.testing.assert_close(gm(x), before)
    assert total_cost(twice).params < total_cost(once).params < total_cost(gm).params


def test_option_a_pad_groups_can_go_entirely():
    gm, x = prepare(TinyOptionA(), (2, 3, 16, 16))
    pads = emptiable_groups(gm)
    # the zero channels padded on at the two stage transitions (4 and 8 of them)
    assert sorted(groups_of(gm)[g].size for g in pads) == [4, 8]
    small = assert_shrunk_equals_masked(gm, x, PrunePlan({g: () for g in pads}))
    assert small.get_submodule("fc").in_features == 4  # the last stream is as narrow as the first
    assert small.get_submodule("l3.conv2").out_channels == 4


def test_bad_plans_are_refused():
    gm, _ = prepare(TinyOptionA(), (2, 3, 16, 16))
    groups = groups_of(gm)
    prunable, pinned = groups.prunable[0], groups.pinned[0]
    with pytest.raises(ShrinkError, match="pinned"):
        shrink(gm, PrunePlan({pinned.id: (0,)}))
    with pytest.raises(ShrinkError, match="keep at least one"):
        shrink(gm, PrunePlan({prunable.id: ()}))
    with pytest.raises(ShrinkError, match="distinct indices"):
        shrink(gm, PrunePlan({prunable.id: (0, 0)}))
    for out_of_range in (prunable.size, -1):  # one past the end, one before the start
        with pytest.raises(ShrinkError, match=rf"distinct indices in \[0, {prunable.size}\)"):
            shrink(gm, PrunePlan({prunable.id: (0, out_of_range)}))
    with pytest.raises(ShrinkError, match="groups"):
        shrink(gm, PrunePlan({999: (0,)}))


def test_a_plan_as_long_as_its_group_must_still_name_each_channel_once():
    """A keep of ``size`` indices with one repeated removes a channel: refused as any other bad
    plan (the distinct-indices message for a prunable group, the pinned one for the model
    input's), where it once passed for a full keep and pruned a pinned input; a keep of every
    channel, in any order, is valid even for a pinned group and changes nothing."""
    gm, x = prepare(TinyOptionA(), (2, 3, 16, 16))
    groups = groups_of(gm)
    prunable, pinned = groups.prunable[0], groups.pinned[0]
    with pytest.raises(ShrinkError, match="distinct indices"):
        shrink(gm, PrunePlan({prunable.id: (0, 0, *range(1, prunable.size - 1))}))
    with pytest.raises(ShrinkError, match="pinned"):
        shrink(gm, PrunePlan({pinned.id: (0, 0, *range(1, pinned.size - 1))}))
    every = {pinned.id: tuple(reversed(range(pinned.size))), prunable.id: tuple(range(prunable.size))}
    small = shrink(gm, PrunePlan(every)).graph_module
    with torch.no_grad():
        torch.testing.assert_close(small(x), gm(x), rtol=0, atol=0)


def test_passes_chain_in_a_pass_manager():
    from ehap_fx.passes.cost import CountCost
    from ehap_fx.passes.group import GroupChannels
    from ehap_fx.passes.shrink import Shrink
    from torch.fx.passes.infra.pass_manager import PassManager

    gm, x = prepare(TinyOptionA(), (2, 3, 16, 16))  # already grouped: group ids are deterministic
    plan = random_plan(gm, 0.5, torch.Generator().manual_seed(3))
    fresh = trace(randomize_bn(TinyOptionA()), x)
    fresh.load_state_dict(gm.state_dict())
    result = PassManager([GroupChannels(), Shrink(plan), CountCost()])(fresh)
    assert result.modified
    expected = shrink(gm, plan).graph_module
    torch.testing.assert_close(result.graph_module(x), expected(x))
    assert total_cost(result.graph_module) == total_cost(expected)


def test_a_plan_is_frozen():
    """``gm.meta["ehap.plan"]`` is read by the report, the cost pass and the export: a plan that
    could be reassigned after shrinking would describe another model than the one it made."""
    import dataclasses

    plan = PrunePlan({0: (0, 2)})
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.keep = {}


class _FunctionalUpAndScale(torch.nn.Module):
    """conv0 (3 → 8) ─▶ × layer scale γ (8, 1, 1) ─▶ F.conv_transpose2d on up's own tensors
    (8 → 4, stride 2): γ and up's weight rows go with conv0's channels."""

    def __init__(self):
        super().__init__()
        self.conv0 = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.gamma = torch.nn.Parameter(torch.rand(8, 1, 1) + 0.5)
        self.up = torch.nn.ConvTranspose2d(8, 4, 2, stride=2)

    def forward(self, x):
        h = self.conv0(x) * self.gamma
        return torch.nn.functional.conv_transpose2d(h, self.up.weight, self.up.bias, stride=2)


def test_a_functional_transposed_conv_and_a_layer_scale_shrink_with_the_channels():
    """Shrunk ≡ masked; ``up.weight`` (read by the functional call) loses the rows, and γ stays a
    trainable ``nn.Parameter`` of the kept channels (fine-tuning trains it)."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 6, 6)
    gm = group_channels(trace(_FunctionalUpAndScale().eval(), x)).graph_module
    (g,) = [g for g in groups_of(gm).prunable if g.size == 8]
    small = assert_shrunk_equals_masked(gm, x, PrunePlan({g.id: (1, 2, 5)}))
    assert small.up.weight.shape == (3, 4, 2, 2)
    assert isinstance(small.gamma, torch.nn.Parameter) and small.gamma.requires_grad
    assert small.gamma.shape == (3, 1, 1) and any(p is small.gamma for p in small.parameters())


def test_fresh_attr_numbers_a_taken_name():
    from ehap_fx.passes.shrink import fresh_attr

    gm = group_channels(trace(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1)), torch.randn(1, 3, 4, 4))).graph_module
    gm.c, gm.c_1 = torch.zeros(1), torch.zeros(1)
    assert fresh_attr(gm, "free") == "free"
    assert fresh_attr(gm, "c") == "c_2"


class _SharedActivation(nn.Module):
    """stem (3 → 8) ─▶ act ─┬──────────────────────────────────────── + ─▶ relu ─▶ mean ─▶ fc
                            └─▶ a (8 → 8) ─▶ relu ─▶ b (8 → 8) ─▶ act ─┘
    one ``Hardtanh`` module ``act`` on the stem and on the residual branch."""

    def __init__(self):
        super().__init__()
        self.stem, self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 1)
        self.act, self.fc = nn.Hardtanh(-0.5, 0.5), nn.Linear(8, 2)

    def forward(self, x):
        x = self.act(self.stem(x))
        x = torch.relu(x + self.act(self.b(torch.relu(self.a(x)))))
        return self.fc(x.mean((2, 3)))


def test_folding_a_dropped_branch_leaves_the_modules_in_their_mode():
    """Dropping the branch folds b's bias through ``act`` (evaluated in eval mode) into a
    constant; ``act`` still runs on the stem, and a model shrunk in training mode keeps every
    module in training mode, ``act`` included (and equals the masked model)."""
    from ehap_fx.passes.depth import droppable_groups

    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    gm = group_channels(trace(_SharedActivation().eval(), x)).graph_module
    (inner,) = droppable_groups(gm)
    small = assert_shrunk_equals_masked(gm, x, PrunePlan({inner: ()}))
    assert [n.target for n in small.graph.nodes if n.op == "call_module"] == ["stem", "act", "fc"]
    small = shrink(gm.train(), PrunePlan({inner: ()})).graph_module
    assert all(m.training for m in small.modules())


class _PickOne(nn.Module):
    """conv0 (3 → 8) ─▶ relu ─▶ conv1 (8 → 4, padding 1) ─▶ + x[:, 0, None], the input's first
    channel (an integer index, not a slice)."""

    def __init__(self):
        super().__init__()
        self.conv0, self.conv1 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 4, 3, padding=1)

    def forward(self, x):
        return self.conv1(torch.relu(self.conv0(x))) + x[:, 0, None]


def test_an_integer_index_of_the_channels_is_left_as_it_is():
    """Only a slice of the channels is rewritten by shrink; ``x[:, 0]`` picks a pinned input
    channel and stays: conv0 loses two channels and the model equals the masked one."""
    torch.manual_seed(0)
    gm, x = prepare(_PickOne(), (2, 3, 6, 6))
    (group,) = groups_of(gm).prunable
    small = assert_shrunk_equals_masked(gm, x, PrunePlan.removing(groups_of(gm), {group.id: [1, 5]}))
    assert small.conv0.out_channels == 6


class _MeanOverChannels(nn.Module):
    """conv0 (3 → 8) ─▶ h + mean of h over its channels (GRN's normaliser, keepdim) ─▶ conv1 (8 → 4)."""

    def __init__(self):
        super().__init__()
        self.conv0, self.conv1 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 4, 1)

    def forward(self, x):
        h = self.conv0(x)
        return self.conv1(h + h.mean(1, keepdim=True))


def test_a_mean_over_pruned_channels_still_divides_by_all_of_them():
    """The masked model averages the kept channels with the zeroed ones (sum / 8): the shrunk one
    sums the 6 it keeps and divides by 8 too, and equals it."""
    torch.manual_seed(0)
    gm, x = prepare(_MeanOverChannels(), (2, 3, 6, 6))
    (group,) = groups_of(gm).prunable
    small = assert_shrunk_equals_masked(gm, x, PrunePlan.removing(groups_of(gm), {group.id: [1, 5]}))
    assert small.conv0.out_channels == 6



class _KeywordGroupsConv(nn.Conv2d):
    """A conv whose own forward gives ``groups`` by keyword after six positional arguments."""

    def forward(self, x):
        return torch.nn.functional.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation,
                                          groups=self.groups)


class _KeywordGroups(nn.Module):
    """conv0 (3 → 8) ─▶ dw, a depthwise ``_KeywordGroupsConv`` (8 → 8, groups=8) ─▶ relu ─▶ conv1 (8 → 4)."""

    def __init__(self):
        super().__init__()
        self.conv0, self.dw = nn.Conv2d(3, 8, 3, padding=1), _KeywordGroupsConv(8, 8, 3, padding=1, groups=8)
        self.conv1 = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.conv1(torch.relu(self.dw(self.conv0(x))))


def test_groups_given_by_keyword_are_rewritten_as_a_keyword():
    """Removing channels 1 and 5 leaves the depthwise call ``groups=6``, still a keyword (its six
    positional arguments unchanged): shrunk ≡ masked."""
    torch.manual_seed(0)
    gm, x = prepare(_KeywordGroups(), (2, 3, 6, 6))
    (group,) = groups_of(gm).prunable
    small = assert_shrunk_equals_masked(gm, x, PrunePlan.removing(groups_of(gm), {group.id: [1, 5]}))
    (conv,) = [n for n in small.graph.nodes if n.op == "call_function" and n.target is torch.conv2d]
    assert len(conv.args) == 6 and conv.kwargs == {"groups": 6}
    assert small.dw.weight.shape == (6, 1, 3, 3)


@pytest.mark.parametrize("fraction", [0.5, 0.3, 0.01])
def test_random_plan_keeps_the_rounded_fraction_of_each_group_and_at_least_one(fraction):
    """TinyOptionA's prunable groups: each keeps ``round(size · fraction)`` distinct channels in
    increasing order (at least one: 0.01 keeps one of every group)."""
    gm, _ = prepare(TinyOptionA(), (2, 3, 16, 16))
    plan = random_plan(gm, fraction, torch.Generator().manual_seed(0))
    sizes = {g.id: g.size for g in groups_of(gm).prunable}
    want = {4: {0.5: 2, 0.3: 1, 0.01: 1}, 8: {0.5: 4, 0.3: 2, 0.01: 1}, 16: {0.5: 8, 0.3: 5, 0.01: 1},
            2: {0.5: 1, 0.3: 1, 0.01: 1}}  # round(4 · 0.3) = 1, round(8 · 0.3) = 2, round(16 · 0.3) = 5
    assert set(plan.keep) == set(sizes) and set(sizes.values()) <= set(want)
    for gid, kept in plan.keep.items():
        assert len(kept) == want[sizes[gid]][fraction], (gid, sizes[gid])
        assert list(kept) == sorted(set(kept)) and 0 <= kept[0] and kept[-1] < sizes[gid]


def test_masking_reports_whether_it_masked_anything():
    """conv0 (3 → 8) ─▶ conv1 (8 → 4): a plan keeping all 8 channels masks nothing (``modified``
    False, no mask buffer); removing one channel masks conv0's output, one value (True)."""
    gm, _ = prepare(nn.Sequential(nn.Conv2d(3, 8, 1), nn.Conv2d(8, 4, 1)), (2, 3, 4, 4))
    (group,) = groups_of(gm).prunable
    nothing = mask_channels(gm, PrunePlan({group.id: tuple(range(8))}))
    assert not nothing.modified and not any(n.startswith("_ehap_mask") for n, _ in nothing.graph_module.named_buffers())
    one = mask_channels(gm, PrunePlan.removing(groups_of(gm), {group.id: [3]}))
    assert one.modified and [n for n, _ in one.graph_module.named_buffers()] == ["_ehap_mask_0"]
    assert one.graph_module._ehap_mask_0.flatten().tolist() == [1, 1, 1, 0, 1, 1, 1, 1]


def test_a_group_norm_shrunk_twice_keeps_its_channels_per_group():
    """conv (3 → 16) ─▶ GroupNorm(4 groups of 4) ─▶ relu ─▶ conv (16 → 4). One norm group goes
    (12 channels, 3 groups), then another from the shrunk model (8 channels, 2 groups): each
    shrunk model equals its masked original."""
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.GroupNorm(4, 16), nn.ReLU(), nn.Conv2d(16, 4, 1))
    torch.manual_seed(0)
    gm, x = prepare(model, (2, 3, 6, 6))
    (group,) = groups_of(gm).prunable
    once = assert_shrunk_equals_masked(gm, x, PrunePlan.removing(groups_of(gm), {group.id: [1]}))
    assert (once.get_submodule("1").num_channels, once.get_submodule("1").num_groups) == (12, 3)
    (group,) = groups_of(once).prunable
    twice = assert_shrunk_equals_masked(once, x, PrunePlan.removing(groups_of(once), {group.id: [0]}))
    assert (twice.get_submodule("1").num_channels, twice.get_submodule("1").num_groups) == (8, 2)


@pytest.mark.parametrize("channels,slopes,removed,kept", [
    (8, 1, [1, 6], [0.1]), (8, 8, [1, 6], [0.1, 0.3, 0.4, 0.5, 0.6, 0.8]), (2, 2, [1], [0.1])])
def test_a_prelu_keeps_a_shared_slope_and_loses_the_removed_channels_slopes(channels, slopes, removed, kept):
    """conv (3 → C) ─▶ PReLU (one shared slope, or one per channel: 0.1, 0.2, ...) ─▶ conv (C → 4):
    removing channels leaves the shared slope as it is, or the kept channels' slopes; shrunk ≡ masked."""
    torch.manual_seed(0)
    prelu = nn.PReLU(slopes)
    with torch.no_grad():
        prelu.weight.copy_(torch.arange(1, slopes + 1) / 10)
    model = nn.Sequential(nn.Conv2d(3, channels, 3, padding=1), prelu, nn.Conv2d(channels, 4, 1))
    gm, x = prepare(model, (2, 3, 6, 6))
    (group,) = groups_of(gm).prunable
    small = assert_shrunk_equals_masked(gm, x, PrunePlan.removing(groups_of(gm), {group.id: removed}))
    torch.testing.assert_close(small.get_submodule("1").weight.detach(), torch.tensor(kept))
    assert small.get_submodule("1").num_parameters == len(kept)


def test_shrunk_modules_describe_the_sizes_of_their_tensors():
    """After shrinking TinyOptionA to half its channels, every conv, BatchNorm and linear states
    the sizes its tensors have (``out_channels``, ``num_features``, ``in_features``, ...), as a
    module built with those arguments would: a BatchNorm rebuilt from ``num_features`` loads the
    shrunk state."""
    gm, x = prepare(TinyOptionA(), (2, 3, 16, 16))
    small = shrink(gm, random_plan(gm, 0.5, torch.Generator().manual_seed(0))).graph_module
    seen = set()
    for name, m in small.named_modules():
        if isinstance(m, nn.Conv2d):
            assert m.weight.shape[:2] == (m.out_channels, m.in_channels // m.groups), name
        elif isinstance(m, nn.BatchNorm2d):
            assert m.weight.shape == m.running_mean.shape == (m.num_features,), name
            nn.BatchNorm2d(m.num_features).load_state_dict(m.state_dict())
        elif isinstance(m, nn.Linear):
            assert m.weight.shape == (m.out_features, m.in_features), name
        seen.add(type(m))
    assert {nn.Conv2d, nn.BatchNorm2d, nn.Linear} <= seen
    assert small.bn1.num_features < 4
