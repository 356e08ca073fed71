"""Spellings that model libraries write, each checked shrunk ≡ masked with exact widths.

Models under test::

    InheritsBN:   conv → FrozenishBN (subclass of BatchNorm2d, forward inherited) → relu → conv
    BNAct:        conv → BatchNormAct2d (own forward: F.batch_norm on its buffers, then SiLU) → conv
    every Net:    conv → norm → depthwise conv → F.pad with widths computed from x.size()
                  ("same" padding) → conv; the convs nn.Conv2d or Conv2dSame (own forward:
                  F.conv2d on its weight)
    StdNet:       weight-standardised convs (BiT, timm's StdConv2d), one of them grouped
    TokenNet:     LeViT's linear + BatchNorm1d on flatten(0, 1) + reshape_as, and its subsample
    Attention:    softmax(q @ kᵀ) @ v, whose matmuls the cost counts
    PatchNet:     MobileViT's 2×2 patches folded into the batch dim around a linear
    HeadAttention: LeViT's attention, q, k, v split off per head, q·kᵀ and p·v
    RunTimePad:   BoTNet's F.pad of a flattened value by a width computed from its size
    SDPA:         scaled_dot_product_attention, counted as FlopCounterMode counts it
"""

import math

import pytest
import torch
import torch.nn.functional as F
from ehap_fx.passes.cost import plan_cost, total_cost
from ehap_fx.passes.group import group_channels, groups_of
from ehap_fx.passes.mask import mask_channels, random_plan
from ehap_fx.passes.shrink import shrink
from ehap_fx.passes.trace import trace
from torch import nn

from ehap_fx import _meta
from tests.nets import randomize_bn


class FrozenishBN(nn.BatchNorm2d):
    """A subclass that only changes construction: the same op as BatchNorm2d."""

    def __init__(self, c):
        super().__init__(c)
        self.weight.requires_grad_(False)


class BatchNormAct2d(nn.BatchNorm2d):
    """timm's pattern: the norm calls F.batch_norm itself, then an activation."""

    def __init__(self, c):
        super().__init__(c)
        self.act = nn.SiLU()

    def forward(self, x):
        x = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.1, self.eps)
        return self.act(x)


@torch.fx.wrap
def same_pad_amount(size: int, k: int, s: int) -> int:
    """TensorFlow-style "same" padding of one dim (opaque to FX: a graph call on x.size())."""
    return max((math.ceil(size / s) - 1) * s + k - size, 0)


def pad_same(x, k: int, s: int = 1):
    """F.pad with widths computed from the input's size at run time."""
    ph, pw = same_pad_amount(x.size(-2), k, s), same_pad_amount(x.size(-1), k, s)
    return F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])


class Conv2dSame(nn.Conv2d):
    """timm's pattern: a conv subclass whose forward pads "same" and calls F.conv2d on its
    own weight and bias (traced into: the graph reads them with get_attr)."""

    def forward(self, x):
        x = pad_same(x, self.kernel_size[0], self.stride[0])
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class Net(nn.Module):
    def __init__(self, norm, conv=nn.Conv2d):
        super().__init__()
        self.conv1, self.norm = conv(3, 12, 3), norm(12)
        self.dw = conv(12, 12, 3, groups=12)
        self.conv2 = conv(12, 6, 3, stride=2)

    def forward(self, x):
        y = self.norm(self.conv1(x))
        y = F.relu(y) if not isinstance(self.norm, BatchNormAct2d) else y
        return self.conv2(pad_same(self.dw(y), 3, 2)).mean((2, 3))


@pytest.mark.parametrize(
    "norm, conv",
    [(nn.BatchNorm2d, nn.Conv2d), (FrozenishBN, nn.Conv2d), (BatchNormAct2d, nn.Conv2d), (nn.BatchNorm2d, Conv2dSame)],
)
def test_norm_and_conv_spellings_shrink_exactly(norm, conv):
    torch.manual_seed(0)
    model = randomize_bn(Net(norm, conv))
    x = torch.randn(2, 3, 11, 11)
    gm = group_channels(trace(model, x)).graph_module
    groups = groups_of(gm)
    (inner,) = groups.prunable
    assert inner.size == 12
    if norm is FrozenishBN:  # kept as one call, with BatchNorm2d's rule
        assert any(n.op == "call_module" and n.target == "norm" for n in gm.graph.nodes)
    plan = random_plan(gm, 0.5, torch.Generator().manual_seed(0))
    small = shrink(gm, plan).graph_module
    with torch.no_grad():
        torch.testing.assert_close(small(x), mask_channels(gm, plan).graph_module(x), rtol=1e-5, atol=1e-5)
    assert small.conv1.weight.shape[0] == small.dw.weight.shape[0] == small.conv2.weight.shape[1] == 6
    assert small.norm.running_mean.shape == small.norm.weight.shape == (6,)
    if conv is Conv2dSame:  # the functional calls are kept, the depthwise one's groups rewritten
        (dw,) = [n for n in small.graph.nodes if n.target is F.conv2d and n.args[1].target == "dw.weight"]
        assert dw.args[6] == 6
    assert plan_cost(gm, plan.masks(groups)) == total_cost(small)


class StdConv2d(nn.Conv2d):
    """Weight standardisation (Hugging Face's BiT ``WeightStandardizedConv2d``, timm's
    ``StdConv2d``): each output row of the weight normalised over its input columns by
    ``F.batch_norm`` in training mode, then ``F.conv2d``."""

    def forward(self, x):
        w = F.batch_norm(self.weight.reshape(1, self.out_channels, -1), None, None, training=True, momentum=0.0,
                         eps=1e-6).reshape_as(self.weight)
        return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)


class ScaledStdConv2d(nn.Conv2d):
    """timm's ``ScaledStdConv2d`` (NFNets): as ``StdConv2d``, the norm's weight a per-row gain
    ``(gain * scale).view(-1)``, ``gain`` of shape ``(O, 1, 1, 1)``."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.gain = nn.Parameter(torch.rand(self.out_channels, 1, 1, 1) + 0.5)
        self.scale = self.weight[0].numel() ** -0.5

    def forward(self, x):
        w = F.batch_norm(self.weight.reshape(1, self.out_channels, -1), None, None,
                         weight=(self.gain * self.scale).view(-1), training=True, momentum=0.0,
                         eps=1e-6).reshape_as(self.weight)
        return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)


class StdNet(nn.Module):
    """std conv (3 → 12) → relu → grouped std conv (12 → 8, groups=2) → relu → std conv (8 → 4)
    (the first two scaled std convs with a gain when ``scaled``)."""

    def __init__(self, scaled=False):
        super().__init__()
        first = ScaledStdConv2d if scaled else StdConv2d
        self.conv1 = first(3, 12, 3)
        self.conv2 = first(12, 8, 3, groups=2, bias=False)
        self.conv3 = StdConv2d(8, 4, 1)

    def forward(self, x):
        return self.conv3(F.relu(self.conv2(F.relu(self.conv1(x)))))


@pytest.mark.parametrize("scaled", [False, True])
@pytest.mark.parametrize("capture", ["fx", "export"])
def test_standardized_weight_conv_shrinks_exactly(capture, scaled):
    """Rows of a standardised weight (and of its gain) prune with the conv's outputs; its
    input channels are picked after the standardisation (the row statistics read every
    column), twice in a row."""
    from ehap_fx.passes.capture import capture_groups

    torch.manual_seed(0)
    model, x = StdNet(scaled).eval(), torch.randn(2, 3, 10, 10)
    gm = capture_groups(model, x, capture=capture)
    assert sorted(g.size for g in groups_of(gm).prunable) == [4, 6]  # conv2's 8 as 4 pairs, conv1's 12 as 6
    assert all(g.pinned.startswith(("model input", "model output")) for g in groups_of(gm).pinned)  # the chain too
    plan = random_plan(gm, 0.5, torch.Generator().manual_seed(0))
    small = shrink(gm, plan).graph_module.train().eval()  # the export graph's flags: batch stats stay
    with torch.no_grad():
        torch.testing.assert_close(small(x), mask_channels(gm, plan).graph_module(x), rtol=1e-5, atol=1e-5)
    assert small.conv1.weight.shape == (6, 3, 3, 3)  # 12 rows → 6 (3 per group of conv2)
    assert small.conv2.weight.shape == (4, 6, 3, 3)  # all 6 columns per group kept in the parameter
    assert small.conv2.ehap_in_columns.shape == (3,) and small.conv3.ehap_in_columns.shape == (4,)
    if scaled:
        assert small.conv1.gain.shape == (6, 1, 1, 1) and small.conv2.gain.shape == (4, 1, 1, 1)
    assert plan_cost(gm, plan.masks(groups_of(gm))).macs == total_cost(small).macs
    assert sorted(g.size for g in groups_of(small).prunable) == [2, 3]  # the shrunk graph prunes again
    plan2 = random_plan(small, 0.5, torch.Generator().manual_seed(1))
    smaller = shrink(small, plan2).graph_module
    with torch.no_grad():
        torch.testing.assert_close(smaller(x), mask_channels(small, plan2).graph_module(x), rtol=1e-5, atol=1e-5)
    assert smaller.conv3.ehap_in_columns.shape == (2,)



class StdConv1d(nn.Conv1d):
    """``StdConv2d``'s weight standardisation on a ``Conv1d``: a 3-D weight ``(O, I, k)``."""

    def forward(self, x):
        w = F.batch_norm(self.weight.reshape(1, self.out_channels, -1), None, None, training=True, momentum=0.0,
                         eps=1e-6).reshape_as(self.weight)
        return F.conv1d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)


def test_a_standardized_conv1d_weight_prunes_as_a_conv2d_one():
    """A 3-D weight is a conv weight too (``len(shape) >= 3``): std conv1d (3 → 8) → relu → std
    conv1d (8 → 4) has conv1's 8 rows as one prunable group, and shrinks exactly."""
    torch.manual_seed(0)
    model = nn.Sequential(StdConv1d(3, 8, 3), nn.ReLU(), StdConv1d(8, 4, 1)).eval()
    x = torch.randn(2, 3, 10)
    gm = group_channels(trace(model, x)).graph_module
    (group,) = groups_of(gm).prunable
    assert group.size == 8 and {(m.module, m.role) for m in group.members} == {("0", "out"), ("2", "in")}
    plan = random_plan(gm, 0.5, torch.Generator().manual_seed(0))
    small = shrink(gm, plan).graph_module
    with torch.no_grad():
        torch.testing.assert_close(small(x), mask_channels(gm, plan).graph_module(x), rtol=1e-5, atol=1e-5)
    assert small.get_submodule("0").weight.shape == (4, 3, 3)


class PeekStdConv2d(nn.Conv2d):
    """``StdConv2d`` whose flattened weight rows are read once more, by a ``mean`` added to the
    output: not the standardisation chain alone."""

    def forward(self, x):
        flat = self.weight.reshape(1, self.out_channels, -1)
        w = F.batch_norm(flat, None, None, training=True, momentum=0.0, eps=1e-6).reshape_as(self.weight)
        return F.conv2d(x, w, self.bias, self.stride, self.padding) + flat.mean()


class PeekStdNet(nn.Module):
    """PeekStdConv2d (3 → 8) → relu → std conv (8 → 4)."""

    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = PeekStdConv2d(3, 8, 3), StdConv2d(8, 4, 1)

    def forward(self, x):
        return self.conv2(F.relu(self.conv1(x)))


def test_a_standardized_weight_read_by_another_op_is_not_pruned():
    """Slicing conv1's weight rows would change ``flat.mean()`` too: the chain is not
    recognised and conv1's 8 channels pin (taken for the chain, they prune and the shrunk model
    is off the masked one by ~0.04)."""
    torch.manual_seed(0)
    _assert_first_conv_pins(PeekStdNet().eval(), "conv1", "conv2")


def _assert_first_conv_pins(model: nn.Module, first: str, second: str) -> None:
    """``first``'s 8 output channels (read by ``second``) pin, and the model shrinks to what
    masking gives."""
    x = torch.randn(2, 3, 8, 8)
    gm = group_channels(trace(model, x)).graph_module
    assert not any(m.module == first for g in groups_of(gm).prunable for m in g.members)
    (into,) = [g for g in groups_of(gm) if (second, "in") in {(m.module, m.role) for m in g.members}]
    assert into.size == 8 and into.pinned is not None
    plan = random_plan(gm, 0.5, torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(shrink(gm, plan).graph_module(x), mask_channels(gm, plan).graph_module(x),
                                   rtol=1e-5, atol=1e-5)


class RowsStdConv2d(nn.Conv2d):
    """``StdConv2d`` whose standardised weight has its rows (dim 0) reordered by
    ``index_select`` with a buffer of indices: shrink picks columns (dim 1) that way, not rows."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.register_buffer("rows", torch.arange(self.out_channels).flip(0))

    def forward(self, x):
        w = F.batch_norm(self.weight.reshape(1, self.out_channels, -1), None, None, training=True, momentum=0.0,
                         eps=1e-6).reshape_as(self.weight)
        return F.conv2d(x, torch.index_select(w, 0, self.rows), self.bias)


class RowsStdNet(nn.Module):
    """RowsStdConv2d (3 → 8) → relu → std conv (8 → 4)."""

    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = RowsStdConv2d(3, 8, 3), StdConv2d(8, 4, 1)

    def forward(self, x):
        return self.conv2(F.relu(self.conv1(x)))


def test_a_standardized_weight_gathered_along_its_rows_is_not_pruned():
    """Only a gather of the columns (``index_select`` at dim 1) belongs to the chain: one at dim
    0 is not recognised, so conv1's 8 channels pin and the model shrinks to what masking gives."""
    torch.manual_seed(0)
    _assert_first_conv_pins(RowsStdNet().eval(), "conv1", "conv2")


class PeekConv2d(nn.Conv2d):
    """``F.conv2d`` on its own weight and bias, one of which a ``mean`` added to the output
    reads again (a regulariser in ``forward``, a weight tied elsewhere)."""

    def __init__(self, *args, peek: str = "weight", **kwargs):
        super().__init__(*args, **kwargs)
        self.peek = peek

    def forward(self, x):
        return F.conv2d(x, self.weight, self.bias) + getattr(self, self.peek).mean()


@pytest.mark.parametrize("peek", ["weight", "bias"])
def test_a_functional_conv_whose_tensors_are_read_again_is_not_pruned(peek):
    """Slicing the conv's rows would change the ``mean`` too: its 8 channels pin, naming why."""
    torch.manual_seed(0)
    model = nn.Sequential(PeekConv2d(3, 8, 3, peek=peek), nn.ReLU(), nn.Conv2d(8, 4, 1)).eval()
    _assert_first_conv_pins(model, "0", "2")
    gm = group_channels(trace(model, torch.randn(2, 3, 8, 8))).graph_module
    assert any(g.pinned.endswith("0's tensors are read elsewhere too") for g in groups_of(gm).pinned)


class FunctionalGroupNorm(nn.GroupNorm):
    """A ``GroupNorm`` whose own forward calls ``F.group_norm`` (timm's ``GroupNorm1`` does)."""

    def forward(self, x):
        return F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)


class GNNet(nn.Module):
    """conv a (3 → 8) → FunctionalGroupNorm (2 groups of 4) → relu → conv b (8 → 4)."""

    def __init__(self):
        super().__init__()
        self.a, self.gn, self.b = nn.Conv2d(3, 8, 3, padding=1), FunctionalGroupNorm(2, 8), nn.Conv2d(8, 4, 1)
        with torch.no_grad():
            self.gn.weight.uniform_(0.5, 1.5)
            self.gn.bias.uniform_(-0.5, 0.5)

    def forward(self, x):
        return self.b(F.relu(self.gn(self.a(x))))


@pytest.mark.parametrize("capture", ["fx", "export"])
def test_a_functional_group_norm_prunes_whole_groups_with_its_affine(capture):
    """Whole norm groups go (one unit of 4 channels each); the norm's weight and bias lose the
    same 4 channels and ``num_groups`` drops to 1: shrunk ≡ masked."""
    from ehap_fx.passes.capture import capture_groups
    from ehap_fx.passes.shrink import PrunePlan

    torch.manual_seed(0)
    x = torch.randn(2, 3, 6, 6)
    gm = capture_groups(GNNet().eval(), x, capture=capture)
    (group,) = groups_of(gm).prunable
    assert group.size == 2 and {m.module: m.index.tolist() for m in group.members if m.role == "out"} == {
        "a": [[0, 1, 2, 3], [4, 5, 6, 7]]}
    plan = PrunePlan.removing(groups_of(gm), {group.id: [0]})
    small = shrink(gm, plan).graph_module
    with torch.no_grad():
        torch.testing.assert_close(small(x), mask_channels(gm, plan).graph_module(x), rtol=1e-5, atol=1e-5)
    assert small.gn.weight.shape == small.gn.bias.shape == (4,)
    assert torch.equal(small.gn.weight, gm.gn.weight[4:])


class AbsGainStdConv2d(ScaledStdConv2d):
    """``ScaledStdConv2d`` whose gain is ``|gain|``, computed in forward: not a parameter the
    chain can slice as it stands."""

    def forward(self, x):
        w = F.batch_norm(self.weight.reshape(1, self.out_channels, -1), None, None,
                         weight=(self.gain.abs() * self.scale).view(-1), training=True, momentum=0.0,
                         eps=1e-6).reshape_as(self.weight)
        return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)


def test_a_standardized_weight_with_a_computed_gain_is_not_pruned():
    """``|gain|`` is computed in forward, so the chain (whose gain is a parameter it slices) is
    not recognised: the first conv's 8 channels pin, and the model prunes to itself."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    model = nn.Sequential(AbsGainStdConv2d(3, 8, 3), nn.ReLU(), StdConv2d(8, 4, 1)).eval()
    gm = group_channels(trace(model, x)).graph_module
    assert not any(m.module == "0" for g in groups_of(gm).prunable for m in g.members)
    plan = random_plan(gm, 0.5, torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(shrink(gm, plan).graph_module(x), mask_channels(gm, plan).graph_module(x),
                                   rtol=1e-5, atol=1e-5)


class SharedGainStdConv2d(ScaledStdConv2d):
    """``ScaledStdConv2d`` whose gain is read once more, by a ``mean`` added to the output:
    slicing the gain's rows would change that mean too."""

    def forward(self, x):
        gain = self.gain
        w = F.batch_norm(self.weight.reshape(1, self.out_channels, -1), None, None,
                         weight=(gain * self.scale).view(-1), training=True, momentum=0.0,
                         eps=1e-6).reshape_as(self.weight)
        return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups) + gain.mean()


class WholeWeightStdConv2d(nn.Conv2d):
    """One mean and variance over the whole weight, ``reshape(1, 1, -1)``, not one per output
    row: every row's standardisation reads every other row."""

    def forward(self, x):
        w = F.batch_norm(self.weight.reshape(1, 1, -1), None, None, training=True, momentum=0.0,
                         eps=1e-6).reshape_as(self.weight)
        return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)


@pytest.mark.parametrize("first", [SharedGainStdConv2d, WholeWeightStdConv2d])
def test_a_standardization_that_pruning_would_change_is_not_pruned(first):
    """A gain read elsewhere too, or statistics over the whole weight: removing rows would
    change what the kept rows compute, so the chain is not recognised and the first conv's 8
    channels pin (the model prunes to itself)."""
    torch.manual_seed(0)
    _assert_first_conv_pins(nn.Sequential(first(3, 8, 3), nn.ReLU(), StdConv2d(8, 4, 1)).eval(), "0", "2")


def test_a_core_aten_linear_prunes_its_features():
    """Core ATen writes ``nn.Linear`` as ``addmm(bias, x, permute(weight, [1, 0]))``: fc0's 8
    features are its weight's rows and fc1's columns, and prune (shrunk ≡ masked)."""
    torch.manual_seed(0)
    net, x = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)).eval(), torch.randn(2, 6)
    gm = group_channels(trace(torch.export.export(net, (x,)).run_decompositions(), x)).graph_module
    assert {n.target for n in gm.graph.nodes} >= {torch.ops.aten.addmm.default, torch.ops.aten.permute.default}
    (group,) = groups_of(gm).prunable
    assert group.size == 8 and sorted((m.module, m.role, m.dim) for m in group.members) == [
        ("0", "out", 0), ("2", "in", 1)]
    plan = random_plan(gm, 0.5, torch.Generator().manual_seed(0))
    small = shrink(gm, plan).graph_module
    with torch.no_grad():
        torch.testing.assert_close(small(x), mask_channels(gm, plan).graph_module(x))
    assert dict(small.named_parameters())["0.weight"].shape == (4, 6)
    # each weight counted once, by its addmm: (6·8 + 8) + (8·3 + 3), then 4 of fc0's 8 rows kept
    assert (total_cost(gm).params, total_cost(small).params) == (6 * 8 + 8 + 8 * 3 + 3, 6 * 4 + 4 + 4 * 3 + 3)


class AddmmMLP(nn.Module):
    """A linear written out as ``addmm(bias, x, weight.t())``: the training IR keeps ``aten.t``
    (core ATen writes ``permute(weight, [1, 0])``, above)."""

    def __init__(self):
        super().__init__()
        self.fc0, self.fc1 = nn.Linear(6, 8), nn.Linear(8, 3)

    def forward(self, x):
        h = torch.relu(torch.addmm(self.fc0.bias, x, self.fc0.weight.t()))
        return torch.addmm(self.fc1.bias, h, self.fc1.weight.t())


def test_an_addmm_on_a_transposed_weight_prunes_its_features():
    """``aten.t`` of a linear weight is the same 2-D transpose as core ATen's permute: fc0's 8
    features are its weight's rows and fc1's columns, and prune (shrunk ≡ masked)."""
    torch.manual_seed(0)
    net, x = AddmmMLP().eval(), torch.randn(2, 6)
    gm = group_channels(trace(torch.export.export(net, (x,)), x)).graph_module
    assert torch.ops.aten.t.default in {n.target for n in gm.graph.nodes}
    (group,) = groups_of(gm).prunable
    assert group.size == 8 and sorted((m.module, m.role, m.dim) for m in group.members) == [
        ("fc0", "out", 0), ("fc1", "in", 1)]
    plan = random_plan(gm, 0.5, torch.Generator().manual_seed(0))
    small = shrink(gm, plan).graph_module
    with torch.no_grad():
        torch.testing.assert_close(small(x), mask_channels(gm, plan).graph_module(x))
    assert dict(small.named_parameters())["fc0.weight"].shape == (4, 6)


class LinearBN(nn.Module):
    """LeViT's ``MLPLayerWithBN``: a linear on tokens ``(N, T, C)``, its BatchNorm1d on
    ``flatten(0, 1)`` (``(N·T, C)``, channels at dim 1), ``reshape_as`` back."""

    def __init__(self, i, o):
        super().__init__()
        self.linear, self.bn = nn.Linear(i, o, bias=False), nn.BatchNorm1d(o)

    def forward(self, x):
        x = self.linear(x)
        return self.bn(x.flatten(0, 1)).reshape_as(x)


class TokenNet(nn.Module):
    """tokens (N, 16, 8) → LinearBN (8 → 16) → hardswish → LeViT's subsample: view (N, 4, 4, C),
    [:, ::2, ::2], reshape (N, 4, C) → LinearBN (16 → 12) → hardswish → LinearBN (12 → 4)."""

    def __init__(self):
        super().__init__()
        self.up, self.mid, self.down = LinearBN(8, 16), LinearBN(16, 12), LinearBN(12, 4)

    def forward(self, x):
        y = F.hardswish(self.up(x))
        n, _, c = y.shape
        y = y.view(n, 4, 4, c)[:, ::2, ::2].reshape(n, -1, c)
        return self.down(F.hardswish(self.mid(y)))


@pytest.mark.parametrize("capture", ["fx", "export"])
def test_token_linear_bn_and_subsample_shrink_exactly(capture):
    """flatten(0, 1) and reshape_as move the channels between dims 2 and 1; a reshape that
    only regroups the dims before the channels keeps them."""
    from ehap_fx.passes.capture import capture_groups

    torch.manual_seed(0)
    model, x = randomize_bn(TokenNet()).eval(), torch.randn(2, 16, 8)
    gm = capture_groups(model, x, capture=capture)
    assert sorted(g.size for g in groups_of(gm).prunable) == [12, 16]
    plan = random_plan(gm, 0.5, torch.Generator().manual_seed(0))
    small = shrink(gm, plan).graph_module
    with torch.no_grad():
        torch.testing.assert_close(small(x), mask_channels(gm, plan).graph_module(x), rtol=1e-5, atol=1e-5)
    assert small.get_submodule("up.linear").weight.shape == (8, 8)
    assert small.get_submodule("mid.linear").weight.shape == (6, 8)
    assert small.get_submodule("down.linear").weight.shape == (4, 6)
    assert plan_cost(gm, plan.masks(groups_of(gm))) == total_cost(small)


class Attention(nn.Module):
    """tokens (N, T, 8) → q, k (8 → 4), v (8 → 6) → softmax(q @ kᵀ) @ v → linear (6 → 8)."""

    def __init__(self, einsum=False):
        super().__init__()
        self.q, self.k, self.v, self.proj = nn.Linear(8, 4), nn.Linear(8, 4), nn.Linear(8, 6), nn.Linear(6, 8)
        self.einsum = einsum

    def forward(self, x):
        q, k = self.q(x), self.k(x)
        scores = torch.einsum("btk,bsk->bts", q, k) if self.einsum else q @ k.transpose(-2, -1)
        return self.proj(torch.matmul(scores.softmax(-1), self.v(x)))


@pytest.mark.parametrize("einsum", [False, True])
@pytest.mark.parametrize("capture", ["fx", "export"])
def test_attention_matmuls_are_counted(capture, einsum):
    """q @ kᵀ (or CvT's einsum) costs T·T·4 MACs per sample and scores @ v T·T·6
    (FlopCounterMode counts them too): a MACs target then means what the FLOPs say."""
    from ehap_fx.passes.capture import capture_groups

    model, x = Attention(einsum).eval(), torch.randn(2, 10, 8)
    gm = capture_groups(model, x, capture=capture)
    total_cost(gm)
    matmuls = sorted(n.meta[_meta.COST].macs for n in gm.graph.nodes if _meta.COST in n.meta
                     and n.op == "call_function" and ("matmul" in str(n.target) or "einsum" in str(n.target)))
    assert matmuls == [10 * 10 * 4, 10 * 10 * 6]


def test_one_head_attention_on_three_dim_tokens_prunes_q_with_k_and_v_with_proj():
    """Rank-3 operands, ``(N, T, 4) @ (N, 4, T)`` and ``(N, T, T) @ (N, T, 6)``: channel j of q
    and of k are one unit (4 units), v's 6 go with proj's columns; shrunk ≡ masked."""
    torch.manual_seed(0)
    x = torch.randn(2, 10, 8)
    gm = group_channels(trace(Attention().eval(), x)).graph_module
    members = sorted([(m.module, m.role) for m in g.members] for g in groups_of(gm).prunable)
    assert members == [[("q", "out"), ("k", "out")], [("v", "out"), ("proj", "in")]]
    assert sorted(g.size for g in groups_of(gm).prunable) == [4, 6]
    plan = random_plan(gm, 0.5, torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(shrink(gm, plan).graph_module(x), mask_channels(gm, plan).graph_module(x))


class PatchNet(nn.Module):
    """MobileViT's unfolding: conv (3 → 8) → (N, C, H, W) as 2×2 patches, the patch position
    folded into the batch dim, (N·4, H·W/4, C) → linear (8 → 8) → folded back → conv (8 → 4)."""

    def __init__(self):
        super().__init__()
        self.conv1, self.linear, self.conv2 = nn.Conv2d(3, 8, 1), nn.Linear(8, 8), nn.Conv2d(8, 4, 1)

    def forward(self, x):
        y = self.conv1(x)
        n, c, h, w = y.shape
        y = y.reshape(n, c, h // 2, 2, w // 2, 2).permute(0, 3, 5, 2, 4, 1).reshape(n * 4, h * w // 4, c)
        y = self.linear(y)
        c = y.shape[-1]
        y = y.reshape(n, 2, 2, h // 2, w // 2, c).permute(0, 5, 3, 1, 4, 2).reshape(n, c, h, w)
        return self.conv2(y)


@pytest.mark.parametrize("capture", ["fx", "export"])
def test_patches_folded_into_the_batch_dim_are_counted(capture):
    """A linear on (N·4, T, C) costs 4 rows of T per sample; the channels follow the patch
    reshapes (only the dims before them regrouped)."""
    from ehap_fx.passes.capture import capture_groups

    torch.manual_seed(0)
    model, x = PatchNet().eval(), torch.randn(2, 3, 8, 8)
    gm = capture_groups(model, x, capture=capture)
    assert sorted(g.size for g in groups_of(gm).prunable) == [8, 8]
    total_cost(gm)
    (linear,) = [n for n in gm.graph.nodes if _meta.COST in n.meta and "linear" in str(n.target)]
    assert linear.meta[_meta.COST].macs == 4 * (16 * 8 * 8 + 8)  # 4 patches of 16 tokens, + its bias
    plan = random_plan(gm, 0.5, torch.Generator().manual_seed(0))
    small = shrink(gm, plan).graph_module
    with torch.no_grad():
        torch.testing.assert_close(small(x), mask_channels(gm, plan).graph_module(x), rtol=1e-5, atol=1e-5)
    assert small.linear.weight.shape == (4, 4)
    assert plan_cost(gm, plan.masks(groups_of(gm))) == total_cost(small)


class HeadAttention(nn.Module):
    """LeViT's attention on tokens (N, T, 8): linear in (8 → 8) → qkv linear (8 → 2 heads ×
    (4 + 4 + 6)) viewed (N, T, 2, 14), split on the last dim into q, k, v, heads to dim 1;
    softmax(q·kᵀ·scale) · v, heads merged back (N, T, 12), hardswish, projection (12 → 8),
    residual, linear out (8 → 3)."""

    def __init__(self):
        super().__init__()
        self.inp, self.qkv, self.proj, self.out = nn.Linear(8, 8), nn.Linear(8, 28), nn.Linear(12, 8), nn.Linear(8, 3)

    def forward(self, x):
        x = self.inp(x)
        n, t, _ = x.shape
        q, k, v = self.qkv(x).view(n, t, 2, -1).split([4, 4, 6], dim=3)
        q, k, v = q.permute(0, 2, 1, 3), k.permute(0, 2, 1, 3), v.permute(0, 2, 1, 3)
        att = (q @ k.transpose(-2, -1) * 0.5).softmax(-1)
        y = (att @ v).transpose(1, 2).reshape(n, t, 12)
        return self.out(x + self.proj(F.hardswish(y)))


@pytest.mark.parametrize("capture", ["fx", "export"])
def test_attention_head_dims_shrink_exactly(capture):
    """q·kᵀ ties q's dim j to k's dim j (of every head: the heads split off the channels);
    p·v keeps v's dims; the heads merged back tile them."""
    from ehap_fx.passes.capture import capture_groups

    torch.manual_seed(0)
    model, x = HeadAttention().eval(), torch.randn(2, 5, 8)
    gm = capture_groups(model, x, capture=capture)
    assert sorted(g.size for g in groups_of(gm).prunable) == [4, 6, 8]  # q·k dims, v dims, residual
    plan = random_plan(gm, 0.5, torch.Generator().manual_seed(0))
    small = shrink(gm, plan).graph_module
    with torch.no_grad():
        torch.testing.assert_close(small(x), mask_channels(gm, plan).graph_module(x), rtol=1e-5, atol=1e-5)
    assert small.qkv.weight.shape == (2 * (2 + 2 + 3), 4)  # per head: 2 q, 2 k, 3 v dims kept
    assert small.proj.weight.shape == (4, 2 * 3)
    assert plan_cost(gm, plan.masks(groups_of(gm))) == total_cost(small)


class RunTimePad(nn.Module):
    """timm's ``rel_logits_1d`` (BoTNet): ``F.pad`` of a flattened ``(N, F)`` value by a width
    computed from its size (a graph node): conv (3 → 8) → relu → conv (8 → 2), flattened,
    padded by ``F - 1``."""

    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 2, 1)

    def forward(self, x):
        y = self.conv2(F.relu(self.conv1(x))).flatten(1)
        return F.pad(y, [0, y.shape[-1] - 1])


def test_pad_with_run_time_widths_stays_and_the_rest_shrinks():
    """The pad's channels are pinned (its widths are graph nodes); shrink leaves it alone."""
    torch.manual_seed(0)
    model, x = RunTimePad().eval(), torch.randn(2, 3, 4, 4)
    gm = group_channels(trace(model, x)).graph_module
    assert [g.size for g in groups_of(gm).prunable] == [8]
    plan = random_plan(gm, 0.5, torch.Generator().manual_seed(0))
    small = shrink(gm, plan).graph_module
    with torch.no_grad():
        torch.testing.assert_close(small(x), mask_channels(gm, plan).graph_module(x), rtol=1e-5, atol=1e-5)
    assert small.conv1.weight.shape[0] == 4


class SDPA(nn.Module):
    """q, k (8 → 4), v (8 → 6) on tokens (N, 2 heads, T, 8) → scaled_dot_product_attention."""

    def __init__(self):
        super().__init__()
        self.q, self.k, self.v = nn.Linear(8, 4), nn.Linear(8, 4), nn.Linear(8, 6)

    def forward(self, x):
        return F.scaled_dot_product_attention(self.q(x), self.k(x), self.v(x))


@pytest.mark.parametrize("capture", ["fx", "export"])
def test_scaled_dot_product_attention_is_counted_as_flop_counter_does(capture):
    from ehap_fx.passes.capture import capture_groups
    from torch.utils.flop_counter import FlopCounterMode

    model, x = SDPA().eval(), torch.randn(2, 2, 10, 8)
    gm = capture_groups(model, x, capture=capture)
    total_cost(gm)
    (sdpa,) = [n for n in gm.graph.nodes if "scaled_dot_product" in str(n.target)]
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        F.scaled_dot_product_attention(torch.randn(2, 2, 10, 4), torch.randn(2, 2, 10, 4), torch.randn(2, 2, 10, 6))
    assert sdpa.meta[_meta.COST].macs == counter.get_total_flops() // 2 // 2 == 2 * 10 * 10 * (4 + 6)


class MapSDPA(nn.Module):
    """scaled_dot_product_attention over the rows of a conv's map (N, 4, 6, 10): the
    channels are dim 1, the heads' dim, so the attention pins them."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)

    def forward(self, x):
        y = self.conv(x)
        return F.scaled_dot_product_attention(y, y, y)


@pytest.mark.parametrize("capture", ["fx", "export"])
def test_attention_on_channels_at_dim_1_pins_and_counts_its_last_dims(capture):
    from ehap_fx.passes.capture import capture_groups

    gm = capture_groups(MapSDPA().eval(), torch.randn(1, 3, 6, 10), capture=capture)
    assert not groups_of(gm).prunable
    total_cost(gm)
    (sdpa,) = [n for n in gm.graph.nodes if "scaled_dot_product" in str(n.target)]
    assert sdpa.meta[_meta.COST].macs == 4 * 6 * 6 * (10 + 10)  # per channel (head): L·S·(E + Ev)


class MapSDPAThenLinear(MapSDPA):
    """MapSDPA on a (N, 4, 6, 4) map, then a linear (4 → 5) over its last dim: the conv's 4
    channels and the attention's 4 last-dim features are different dims of equal size."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 5)

    def forward(self, x):
        return self.fc(super().forward(x))


def test_attention_on_channels_at_dim_1_pins_them_whatever_reads_its_last_dim():
    """The conv's channels are the attention's heads (dim 1), not its features (the last dim),
    so they pin even where the next linear reads a last dim of the same size, and the model
    prunes to itself."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 6, 4)
    gm = group_channels(trace(MapSDPAThenLinear().eval(), x)).graph_module
    assert not groups_of(gm).prunable
    (conv,) = [g for g in groups_of(gm) if ("conv", "out") in {(m.module, m.role) for m in g.members}]
    assert "not the last" in conv.pinned
    plan = random_plan(gm, 0.5, torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(shrink(gm, plan).graph_module(x), mask_channels(gm, plan).graph_module(x))


class HeadsSDPA(nn.Module):
    """Segformer's (and most Hugging Face models') attention on tokens (N, T, 8): linear in
    (8 → 8) → q, k, v linears (8 → 8), each viewed (N, T, 2 heads, 4) with the heads to dim 1
    → scaled_dot_product_attention (``scale`` given, as Segformer passes it, or its default
    ``1/sqrt(4)``; ``mask``: an additive mask (N, 1, T, T) a linear computes from the tokens)
    → heads merged back (N, T, 8) → projection (8 → 8), residual, linear out (8 → 3)."""

    def __init__(self, form):
        super().__init__()
        self.form = form
        self.inp, self.proj, self.out = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 3)
        self.q, self.k, self.v, self.m = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 5)

    def forward(self, x):
        x = self.inp(x)
        n, t, _ = x.shape
        q, k, v = (f(x).view(n, t, 2, 4).transpose(1, 2) for f in (self.q, self.k, self.v))
        kwargs = {"scale": 0.3} if self.form == "scale" else {}
        if self.form == "mask":
            kwargs["attn_mask"] = self.m(x).view(n, 1, t, t)
        y = F.scaled_dot_product_attention(q, k, v, **kwargs).transpose(1, 2).reshape(n, t, 8)
        return self.out(x + self.proj(y))


@pytest.mark.parametrize("form", ["scale", "default_scale", "mask"])
@pytest.mark.parametrize("capture", ["fx", "export"])
def test_scaled_dot_product_attention_head_dims_shrink_exactly(capture, form):
    """As q·kᵀ and p·v: q's dim j and k's dim j (of every head) are one unit, the output
    keeps v's dims. The default scale is the dense ``1/sqrt(4)``, written in when q shrinks;
    a mask keeps its size (its linear's outputs pinned)."""
    from ehap_fx.passes.capture import capture_groups

    torch.manual_seed(0)
    model, x = HeadsSDPA(form).eval(), torch.randn(2, 5, 8)
    gm = capture_groups(model, x, capture=capture)
    assert sorted(g.size for g in groups_of(gm).prunable) == [4, 4, 8]  # q·k dims, v dims, residual
    plan = random_plan(gm, 0.5, torch.Generator().manual_seed(0))
    small = shrink(gm, plan).graph_module
    with torch.no_grad():
        torch.testing.assert_close(small(x), mask_channels(gm, plan).graph_module(x), rtol=1e-5, atol=1e-5)
    assert small.q.weight.shape == small.k.weight.shape == small.v.weight.shape == (2 * 2, 4)
    if form == "mask":
        assert small.m.weight.shape == (5, 4)
    assert plan_cost(gm, plan.masks(groups_of(gm))) == total_cost(small)


class BareLinear(nn.Module):
    """fc0 (6 → 8) → relu → ``F.linear(·, w)`` with ``w`` a bare ``(4, 8)`` parameter, no bias: no
    module's ``weight``, so no layer whose rows and columns a shrink could slice."""

    def __init__(self):
        super().__init__()
        self.fc0 = nn.Linear(6, 8)
        self.w = nn.Parameter(torch.randn(4, 8))

    def forward(self, x):
        return F.linear(torch.relu(self.fc0(x)), self.w)


def test_an_exported_linear_on_a_bare_parameter_pins_its_input():
    """``aten.linear(h, w)`` is a layer only when ``w`` is some module's ``.weight``: here it is
    not, so fc0's 8 outputs pin at it, and the model shrinks to itself."""
    torch.manual_seed(0)
    x = torch.randn(2, 6)
    gm = group_channels(trace(BareLinear().eval(), x, capture="export")).graph_module
    (fc0,) = [g for g in groups_of(gm) if ("fc0", "out") in {(m.module, m.role) for m in g.members}]
    assert fc0.pinned.endswith("linear on tensors that are not one module's weight and bias")
    assert not groups_of(gm).prunable
    plan = random_plan(gm, 0.5, torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(shrink(gm, plan).graph_module(x), mask_channels(gm, plan).graph_module(x))
