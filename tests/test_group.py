"""Channel-group analysis: exact groups, member indices and pin reasons on small graphs."""

import pytest
import torch
from ehap_fx.passes.group import group_channels, groups_of, producer_slices
from ehap_fx.passes.trace import trace

from ehap_fx.errors import GroupError
from tests.nets import GroupNormNet, SEDepthwise, SplitChunk, TinyOptionA, Unknown


def grouped(model, shape=(2, 3, 16, 16), **kw):
    return group_channels(trace(model.eval(), torch.randn(shape)), **kw).graph_module


def summary(gm):
    """{frozenset of (module-or-node, role)}: size} for the prunable groups."""
    return {
        frozenset((m.module or m.node, m.role) for m in g.members): g.size for g in groups_of(gm).prunable
    }


def test_option_a_stages_stay_separate():
    # The residual stream of stage 1 (4 ch) lives in all three stages at offsets 0, 2, 6;
    # the pad channels of stage 2 (4) live in stages 2-3; those of stage 3 (8) only in stage 3.
    groups = groups_of(grouped(TinyOptionA()))
    streams = [g for g in groups.prunable if any(m.module == "fc" and m.role == "in" for m in g.members)]
    assert sorted(g.size for g in streams) == [4, 4, 8]
    stage1 = next(g for g in streams if any(m.module == "conv1" for m in g.members))
    index = {(m.module or m.node): m.index[:, 0].tolist() for m in stage1.members}
    assert index["conv1"] == [0, 1, 2, 3]
    assert index["l2.conv2"] == [2, 3, 4, 5]  # padded by 2 in front
    assert index["l3.conv2"] == [6, 7, 8, 9]  # then by 4 more
    assert index["fc"] == [6, 7, 8, 9]
    pads = [g for g in streams if any(m.role == "pad" for m in g.members)]
    assert {g.size for g in pads} == {4, 8}
    pad2 = next(g for g in pads if g.size == 4)
    assert {m.node: m.index[:, 0].tolist() for m in pad2.members if m.role == "pad"} == {"pad": [0, 1, 6, 7]}
    assert next(m for m in pad2.members if m.module == "l3.conv2").index[:, 0].tolist() == [4, 5, 10, 11]
    assert sorted(g.size for g in groups.prunable) == [4, 4, 4, 8, 8, 16]


def test_split_and_chunk_offsets():
    groups = groups_of(grouped(SplitChunk()))
    stem = [g for g in groups.prunable if any(m.module == "stem" for m in g.members)]
    # split(16) halves: [0:16) feeds a and c (chunk 0); [16:32) feeds b twice (s1 + c1 add)
    assert sorted(g.size for g in stem) == [16, 16]
    first = next(g for g in stem if any(m.module == "a" for m in g.members))
    assert {m.module for m in first.members} == {"stem", "a", "c"}
    head = {
        m.module: m.index[:, 0].tolist() for g in groups.prunable for m in g.members if m.module == "head"
    }
    assert len(head) == 1 and len(next(iter(head.values()))) == 8


def test_depthwise_se_grouped_and_flatten():
    gm = grouped(SEDepthwise(), shape=(2, 3, 8, 8))
    groups = groups_of(gm)
    by_module = {}
    for g in groups.prunable:
        for m in g.members:
            by_module.setdefault((m.module or m.node, m.role), []).append(g)
    pw = by_module[("pw", "out")][0]
    # depthwise and the SE gate are coupled with the pointwise conv's channels, but the slice
    # x[:, 2:6] splits them: channels 2..5 also feed the classifier
    assert {m.module for m in by_module[("dw", "out")][0].members} >= {"pw", "bn", "se2"}
    # grouped conv (4 groups of 3 -> 2) couples position i of every group: 3 in-units, 2 out-units
    gconv_out = by_module[("gconv", "out")][0]
    assert gconv_out.size == 2
    assert gconv_out.members[0].index.tolist() == [[0, 2, 4, 6], [1, 3, 5, 7]]
    # flatten -> linear: each gconv channel is 16 features of fc
    fc_in = next(m for m in gconv_out.members if m.module == "fc")
    assert fc_in.index.shape == (2, 4 * 16)
    # the grouped conv couples pw channel i with i+3, i+6, i+9: 3 units of 4 channels in all
    pw_out = [
        next(m for m in g.members if m.module == "pw" and m.role == "out") for g in by_module[("pw", "out")]
    ]
    assert sorted(i for m in pw_out for i in m.index.flatten().tolist()) == list(range(12))
    assert sum(m.index.shape[0] for m in pw_out) == 3 and pw.size >= 1


def test_unknown_op_pins_with_reason():
    groups = groups_of(grouped(Unknown()))
    reasons = {g.pinned for g in groups.pinned}
    assert any("roll" in r and "not understood" in r for r in reasons)
    assert any("amax" in r and "channels" in r for r in reasons)
    assert not any(m.module == "b" and m.role == "out" for g in groups.prunable for m in g.members)


def test_exclude_pins_module():
    gm = grouped(TinyOptionA(), exclude=["l1.conv1"])
    pinned = [g for g in groups_of(gm).pinned if "excluded" in g.pinned]
    assert any(m.module == "l1.conv1" and m.role == "out" for g in pinned for m in g.members)
    with pytest.raises(GroupError, match="no_such"):
        grouped(TinyOptionA(), exclude=["no_such"])


def test_producer_slices_cover_all_conv_outputs():
    gm = grouped(TinyOptionA())
    owned = {}
    for g in groups_of(gm):
        for module, index in producer_slices(g):
            owned.setdefault(module, []).extend(index.flatten().tolist())
    for name, mod in gm.named_modules():
        if isinstance(mod, torch.nn.Conv2d):
            assert sorted(owned[name]) == list(range(mod.out_channels)), name


def test_requires_shapes():
    gm = torch.fx.symbolic_trace(TinyOptionA())
    with pytest.raises(GroupError, match="tensor_meta"):
        group_channels(gm)


def test_group_norm_couples_whole_groups():
    (group,) = groups_of(grouped(GroupNormNet())).prunable
    assert group.size == 2
    assert {m.module: m.index.tolist() for m in group.members if m.role == "out"} == {
        "a": [[0, 1, 2, 3], [4, 5, 6, 7]]
    }


class _Norms(torch.nn.Module):
    """a(3→8) → bn → prelu(8) → b(8→8) → gn(2 groups) → c(8→4) → instance norm (affine) → up
    (transposed, 4→2)."""

    def __init__(self):
        super().__init__()
        nn = torch.nn
        self.a, self.bn, self.prelu = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.PReLU(8)
        self.b, self.gn = nn.Conv2d(8, 8, 1), nn.GroupNorm(2, 8)
        self.c, self.inorm = nn.Conv2d(8, 4, 1), nn.InstanceNorm2d(4, affine=True)
        self.up = nn.ConvTranspose2d(4, 2, 2, stride=2)

    def forward(self, x):
        y = self.prelu(self.bn(self.a(x)))
        return self.up(self.inorm(self.c(self.gn(self.b(y)))))


def test_each_member_names_the_dim_of_its_weight_that_the_channels_index():
    """``Member.dim``: a conv's output channels are dim 0 of its weight ``(O, I, k, k)``, its
    input channels dim 1; a norm's (and a PReLU's) per-channel tensors ``(C,)`` dim 0; a
    transposed conv's input channels dim 0 of its weight ``(I, O, k, k)``. Each member's indices
    fit that dim of the module's weight."""
    gm = grouped(_Norms(), (2, 3, 6, 6))
    members = {g.size: sorted((m.module, m.role, m.dim) for m in g.members) for g in groups_of(gm).prunable}
    assert members == {
        8: [("a", "out", 0), ("b", "in", 1), ("bn", "norm", 0), ("prelu", "norm", 0)],
        2: [("b", "out", 0), ("c", "in", 1), ("gn", "norm", 0)],  # gn: 2 groups of 4 channels
        4: [("c", "out", 0), ("inorm", "norm", 0), ("up", "in", 0)],
    }
    for g in groups_of(gm).prunable:
        for m in g.members:
            weight = gm.get_submodule(m.module).weight
            assert int(m.index.max()) < weight.shape[m.dim], (m.module, m.role)


def test_groups_and_members_in_node_meta_are_frozen():
    """The analysis travels in ``node.meta`` and ``gm.meta``: a pass that could edit a group or
    a member in place would change what every other node reads."""
    import dataclasses

    gm = grouped(TinyOptionA())
    g = groups_of(gm).prunable[0]
    with pytest.raises(dataclasses.FrozenInstanceError):
        g.size = 1
    with pytest.raises(dataclasses.FrozenInstanceError):
        g.members[0].role = "in"


def test_a_channel_constant_has_batch_one_and_unit_spatial_dims():
    from ehap_fx.passes.group import is_channel_constant

    assert is_channel_constant((1, 8, 1, 1)) and is_channel_constant((1, 8))
    assert not is_channel_constant((2, 8, 1, 1))  # a batch of them is data, not a constant
    assert not is_channel_constant((1, 8, 2, 1)) and not is_channel_constant((8,))


class _Shared(torch.nn.Module):
    """conv0 (3 → 8) ─▶ conv1 (8 → 8) ─▶ relu ─▶ conv1 again: shared weights."""

    def __init__(self):
        super().__init__()
        self.conv0, self.conv1 = torch.nn.Conv2d(3, 8, 1), torch.nn.Conv2d(8, 8, 1)

    def forward(self, x):
        return self.conv1(torch.relu(self.conv1(self.conv0(x))))


def test_a_module_called_twice_pins_its_inputs_and_outputs():
    """Its weight serves both calls: conv0's channels (its first input) cannot shrink it for one
    call alone, so they pin, naming the sharing."""
    gm = grouped(_Shared())
    (g,) = [g for g in groups_of(gm).groups if any(m.module == "conv0" and m.role == "out" for m in g.members)]
    assert g.pinned == "module conv1 is called 2 times (shared weights)"
    assert not groups_of(gm).prunable


class _LayerScale(torch.nn.Module):
    """a (3 → 8) ─▶ × gamma, a (8, 1, 1) parameter read with ``get_attr`` ─▶ b (8 → 4)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Conv2d(3, 8, 1), torch.nn.Conv2d(8, 4, 1)
        self.gamma = torch.nn.Parameter(torch.rand(8, 1, 1) + 0.5)

    def forward(self, x):
        return self.b(self.a(x) * self.gamma)


def test_a_per_channel_constant_is_a_member_of_its_channels_group():
    """gamma's 8 values go with a's outputs: a ``"const"`` member (node ``gamma``, dim 0, value c
    for channel c), beside a's rows and b's columns."""
    gm = grouped(_LayerScale(), (2, 3, 5, 5))
    (group,) = groups_of(gm).prunable
    members = {(m.node, m.role): (m.dim, m.index[:, 0].tolist()) for m in group.members}
    assert members == {("a", "out"): (0, list(range(8))), ("gamma", "const"): (0, list(range(8))),
                       ("b", "in"): (1, list(range(8)))}


def test_pin_reasons_sum_the_channels_each_reason_holds():
    """TinyOptionA pins its 10 logits (the model output) and its 3 input channels, most first."""
    assert groups_of(grouped(TinyOptionA())).pin_reasons() == [(10, "model output"), (3, "model input x")]


class _FourReasons(torch.nn.Module):
    """a (3 → 8) ─▶ b (8 → 6, excluded) ─▶ flip (no rule) ─▶ c (6 → 5) ─▶ d (5 → 4)."""

    def __init__(self):
        super().__init__()
        nn = torch.nn
        self.a, self.b, self.c, self.d = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 6, 1), nn.Conv2d(6, 5, 1), nn.Conv2d(5, 4, 1)

    def forward(self, x):
        return self.d(self.c(self.b(self.a(x)).flip(1)))


def test_pin_reasons_name_the_three_largest_unless_told():
    """Four reasons: b excluded (its 8 inputs and 6 outputs), the flip (c's 6 inputs), the output
    (4), the input (3). The default is the top three; ``top=4`` gives all 27 pinned channels."""
    groups = groups_of(grouped(_FourReasons(), exclude=["b"]))
    counts = [c for c, _ in groups.pin_reasons(4)]
    assert counts == [8 + 6, 6, 4, 3] and sum(counts) == sum(g.size for g in groups.pinned)
    assert groups.pin_reasons() == groups.pin_reasons(4)[:3]
    assert [r for _, r in groups.pin_reasons(4)][::2] == ["module b excluded by the user", "model output"]


class _Chain(torch.nn.Module):
    """a (3 → 8) ─▶ relu ─▶ b (8 → 4): one prunable group, alone in every value it lives in."""

    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Conv2d(3, 8, 1), torch.nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


def test_a_group_alone_in_its_values_is_never_emptiable():
    """a's outputs are the only channels of the values they live in: emptied, b would read a
    zero-channel input, so the group must keep one (even though it is every candidate there is:
    the value's groups, {a's}, are all the candidates, not a proper part of them)."""
    from ehap_fx.passes.group import emptiable_groups

    gm = grouped(_Chain(), (2, 3, 5, 5))
    (group,) = groups_of(gm).prunable
    assert {(m.module, m.role) for m in group.members} == {("a", "out"), ("b", "in")}
    assert emptiable_groups(gm) == frozenset()
