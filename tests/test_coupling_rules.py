"""Coupling rules are values: a user's rule for a module of their own, passed in, never merged
into a global.

Model under test::

    x ─▶ conv0 (3 → 8) ─▶ Snake: x + sin²(x), channel by channel ─▶ conv1 (8 → 4) ─▶ out

No rule describes ``torch.sin`` or ``**``, so without a rule for ``Snake`` tracing goes into it
and conv0's 8 channels pin there; with ``same_channels`` for ``Snake`` it is one call and
conv0's channels prune (shrunk ≡ masked original).
"""

import dataclasses
import io
import pickle

import pytest
import torch
import torch.nn.functional as F
from ehap_fx.passes.capture import capture_groups
from ehap_fx.passes.coupling import (
    ATEN_RULES,
    COUPLING_RULES,
    FX_RULES,
    Rules,
    coupling_rules,
    pin,
    same_channels,
)
from ehap_fx.passes.group import group_channels, groups_of
from ehap_fx.passes.mask import mask_channels, random_plan
from ehap_fx.passes.shrink import PrunePlan, shrink
from ehap_fx.passes.trace import trace
from torch import fx, nn

from ehap_fx import _meta


class Snake(nn.Module):
    """x + sin²(x): each output channel from the same input channel alone."""

    def forward(self, x):
        return x + torch.sin(x) ** 2


class Reverse(nn.Module):
    """Reverses the channel order: no rule describes ``flip``."""

    def forward(self, x):
        return x.flip(1)


def model_with(act: nn.Module) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3), act, nn.Conv2d(8, 4, 1)).eval()


X = torch.randn(2, 3, 8, 8)
SNAKE_RULES = Rules(modules={Snake: same_channels})  # added to the default rules


def conv0_group(gm):
    """The group holding conv0's output channels."""
    (group,) = [g for g in groups_of(gm).groups if any(m.module == "0" and m.role == "out" for m in g.members)]
    return group


def test_without_a_rule_the_group_pins_naming_the_module():
    gm = group_channels(trace(model_with(Snake()), X)).graph_module
    group = conv0_group(gm)
    assert group.size == 8 and group.pinned is not None
    assert group.pinned.endswith("in module '1' (Snake): op not understood by the channel analysis"), group.pinned
    assert not groups_of(gm).prunable


@pytest.mark.parametrize("capture", ["fx", "auto"])
def test_with_a_rule_the_module_prunes_and_shrunk_equals_masked(capture):
    gm = group_channels(trace(model_with(Snake()), X, capture=capture, rules=SNAKE_RULES)).graph_module
    assert [n.target for n in gm.graph.nodes if n.op == "call_module"] == ["0", "1", "2"]  # Snake: one call
    group = conv0_group(gm)
    assert group.pinned is None and group.size == 8
    assert [(m.module, m.role) for m in group.members] == [("0", "out"), ("2", "in")]
    plan = random_plan(gm, 0.5, torch.Generator().manual_seed(0))
    small = shrink(gm, plan).graph_module
    with torch.no_grad():
        torch.testing.assert_close(small(X), mask_channels(gm, plan).graph_module(X), rtol=0, atol=1e-6)
    assert small.get_submodule("0").out_channels == 4
    assert conv0_group(small).pinned is None  # shrink grouped again with the rules the graph recorded
    buf = io.BytesIO()
    torch.save(small, buf)  # what report.py writes: the recorded rules pickle with the graph
    buf.seek(0)
    torch.testing.assert_close(torch.load(buf, weights_only=False)(X), small(X))


def test_rules_passed_to_group_channels_and_capture_groups():
    traced = trace(model_with(Snake()), X, rules=SNAKE_RULES)
    traced.meta.pop(_meta.RULES)  # as if traced with the rules, grouped without them
    assert conv0_group(group_channels(traced).graph_module).pinned is not None
    assert conv0_group(group_channels(traced, rules=SNAKE_RULES).graph_module).pinned is None
    gm = capture_groups(model_with(Snake()), X, rules=SNAKE_RULES)
    assert gm.meta[_meta.CAPTURED].capture == "fx" and conv0_group(gm).pinned is None


def test_grouping_with_no_rules_forgets_the_recorded_ones():
    """Rules given (here none, ``Rules()``) replace those the graph was traced with, in
    ``gm.meta`` too: grouping it again, as shrink does, uses the defaults alone."""
    traced = trace(model_with(Snake()), X, rules=SNAKE_RULES)
    assert traced.meta[_meta.RULES] is SNAKE_RULES
    gm = group_channels(traced, rules=Rules()).graph_module
    assert _meta.RULES not in gm.meta and conv0_group(gm).pinned is not None
    assert conv0_group(group_channels(gm).graph_module).pinned is not None


def test_a_pin_rule_keeps_the_module_whole_with_its_reason():
    gm = group_channels(trace(model_with(Reverse()), X)).graph_module
    assert "(Reverse): op not understood" in conv0_group(gm).pinned
    rules = Rules(modules={Reverse: pin("Reverse reorders its channels")})
    gm = group_channels(trace(model_with(Reverse()), X, rules=rules)).graph_module
    assert conv0_group(gm).pinned.endswith(": Reverse reorders its channels")
    assert pickle.loads(pickle.dumps(rules)).for_module(Reverse()) == pin("Reverse reorders its channels")


def test_composing_rules_leaves_the_defaults_unchanged():
    before = (dict(COUPLING_RULES.functions), dict(COUPLING_RULES.modules), COUPLING_RULES.any_dim)
    mine = Rules(functions={torch.sin: same_channels}, modules={Snake: same_channels})
    both = COUPLING_RULES | mine
    also = COUPLING_RULES.with_rules({Snake: same_channels, torch.sin: same_channels})
    for new in (both, also, coupling_rules(mine)):
        assert new.for_module(Snake()) is same_channels and new.for_function(torch.sin) is same_channels
        assert len(new.functions) == len(before[0]) + 1 and len(new.modules) == len(before[1]) + 1
    assert (dict(COUPLING_RULES.functions), dict(COUPLING_RULES.modules), COUPLING_RULES.any_dim) == before
    assert COUPLING_RULES.for_module(Snake()) is None and COUPLING_RULES.for_function(torch.sin) is None
    assert dict(COUPLING_RULES.functions) == {**FX_RULES.functions, **ATEN_RULES.functions}
    assert not set(FX_RULES.functions) & set(ATEN_RULES.functions)  # composed, not overwritten
    with pytest.raises(TypeError):
        COUPLING_RULES.modules[Snake] = same_channels  # read-only rows
    with pytest.raises(dataclasses.FrozenInstanceError):
        COUPLING_RULES.functions = {}  # nor can the rows be swapped for others
    with pytest.raises(TypeError, match="nn.Module subclasses"):
        Rules(modules={"Snake": same_channels})
    with pytest.raises(TypeError, match="not a Rules value"):
        group_channels(trace(model_with(Snake()), X), rules={Snake: same_channels})
    assert coupling_rules(None) is COUPLING_RULES and coupling_rules(Rules()) is COUPLING_RULES
    # a graph traced with the user's rules leaves the next default trace as it was
    trace(model_with(Snake()), X, rules=SNAKE_RULES)
    assert conv0_group(group_channels(trace(model_with(Snake()), X)).graph_module).pinned is not None


class _UnhashableRule:
    """Callable like a rule, but defines ``__eq__`` without ``__hash__``: not hashable."""

    def __call__(self, a, node):
        return same_channels(a, node)

    def __eq__(self, other):
        return isinstance(other, _UnhashableRule)


@pytest.mark.parametrize("rule", ["same_channels", _UnhashableRule()], ids=["not-callable", "unhashable"])
def test_a_rule_must_be_a_hashable_callable(rule):
    """A row whose rule is not callable (a name), or is callable but not hashable (``Rules``
    is a value: ``any_dim`` is a frozenset of rules), is refused when the ``Rules`` is made,
    for a function row and a module row alike."""
    with pytest.raises(TypeError, match="not hashable callables"):
        Rules(functions={torch.sin: rule})
    with pytest.raises(TypeError, match="not hashable callables"):
        Rules(modules={Snake: rule})


def _group_of(gm, module: str):
    (group,) = [g for g in groups_of(gm).groups if any(m.module == module and m.role == "out" for m in g.members)]
    return group


def _shrinks_as_masked(gm: fx.GraphModule) -> None:
    """Half of every prunable group's channels (a seeded random plan) go: the shrunk graph
    computes what the original with those channels zeroed computes."""
    plan = random_plan(gm, 0.5, torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(shrink(gm, plan).graph_module(X), mask_channels(gm, plan).graph_module(X))


class _FunctionalConvTranspose(nn.ConvTranspose2d):
    """``F.conv_transpose2d`` on the module's own tensors: the same op as the module."""

    def forward(self, x):
        return F.conv_transpose2d(x, self.weight, self.bias, self.stride, groups=self.groups)


@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("spelling", [nn.ConvTranspose2d, _FunctionalConvTranspose], ids=["module", "functional"])
def test_a_transposed_conv_prunes_its_input_unless_it_is_grouped(groups, spelling):
    """conv0 (3 → 8) ─▶ conv_transpose (8 → 8, groups) ─▶ conv1: ungrouped, conv0's channels are
    the transposed conv's weight rows (dim 0); grouped, they pin, naming the groups. The module
    and ``F.conv_transpose2d`` on its tensors are one op."""
    gm = group_channels(trace(model_with(spelling(8, 8, 2, stride=2, groups=groups)), X)).graph_module
    group = conv0_group(gm)
    if groups == 1:
        assert group.pinned is None
        assert [(m.module, m.role, m.dim) for m in group.members] == [("0", "out", 0), ("1", "in", 0)]
    else:
        assert group.pinned is not None and "grouped transposed conv (groups=2)" in group.pinned


def test_a_per_channel_prelu_goes_with_the_channels():
    """conv0 ─▶ nn.PReLU(8) ─▶ conv1: the slopes are sliced with conv0's channels (a ``norm``
    member); the functional spelling ``F.prelu(x, w)`` couples the same way."""
    gm = group_channels(trace(model_with(nn.PReLU(8)), X)).graph_module
    group = conv0_group(gm)
    assert group.pinned is None
    assert [(m.module, m.role) for m in group.members] == [("0", "out"), ("1", "norm"), ("2", "in")]


def test_a_shared_prelu_slope_is_no_member_of_the_channels_group():
    """conv0 ─▶ nn.PReLU() (one slope for every channel) ─▶ conv1: nothing to slice, so the
    group is conv0's rows and conv1's columns alone, and the slope stays whole (shrunk ≡ masked)."""
    torch.manual_seed(0)
    gm = group_channels(trace(model_with(nn.PReLU()), X)).graph_module
    group = conv0_group(gm)
    assert group.pinned is None and [(m.module, m.role) for m in group.members] == [("0", "out"), ("2", "in")]
    plan = random_plan(gm, 0.5, torch.Generator().manual_seed(0))
    small = shrink(gm, plan).graph_module
    with torch.no_grad():
        torch.testing.assert_close(small(X), mask_channels(gm, plan).graph_module(X))
    assert small.get_submodule("1").weight.shape == (1,)


@pytest.mark.parametrize("slopes", [1, 8])
def test_an_exported_prelu_prunes_with_its_slopes_shared_or_per_channel(slopes):
    """Captured by ``torch.export`` (``aten.prelu(x, weight)``): a shared slope (one element)
    couples nothing, a per-channel one is sliced with conv0's channels; both prune, shrunk ≡
    masked original."""
    torch.manual_seed(0)
    gm = group_channels(trace(model_with(nn.PReLU(slopes, init=0.1)), X, capture="export")).graph_module
    assert any(n.target is torch.ops.aten.prelu.default for n in gm.graph.nodes)
    assert conv0_group(gm).pinned is None and conv0_group(gm).size == 8
    _shrinks_as_masked(gm)


class FunctionalLinears(nn.Module):
    """fc0 (6 → 8) ─▶ relu ─▶ fc1 (8 → 4), written with ``F.linear`` on the layers' tensors."""

    def __init__(self):
        super().__init__()
        self.fc0, self.fc1 = nn.Linear(6, 8), nn.Linear(8, 4)

    def forward(self, x):
        h = torch.relu(nn.functional.linear(x, self.fc0.weight, self.fc0.bias))
        return nn.functional.linear(h, self.fc1.weight, self.fc1.bias)


def test_an_exported_functional_linear_keeps_its_channels_on_the_last_dim():
    """Captured by ``torch.export`` (``aten.linear`` on fc0's tensors): fc0's output channels are
    the last dim of ``(N, T, 8)``, so fc1 reads them as its input features and they prune."""
    torch.manual_seed(0)
    net = FunctionalLinears().eval()
    x = torch.randn(2, 5, 6)  # (N, T, features): the last dim is not dim 1
    gm = group_channels(trace(net, x, capture="export")).graph_module
    assert any(n.target is torch.ops.aten.linear.default for n in gm.graph.nodes)
    group = _group_of(gm, "fc0")
    assert group.pinned is None and group.size == 8
    assert [(m.module, m.role, m.dim) for m in group.members] == [("fc0", "out", 0), ("fc1", "in", 1)]
    assert _group_of(gm, "fc1").pinned == "model output"
    plan = random_plan(gm, 0.5, torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(shrink(gm, plan).graph_module(x), mask_channels(gm, plan).graph_module(x))


class _Rows(nn.Module):
    """fc0 (6 → 8) on ``(N, T, 6)``, then ``how``, then fc1: channels stay on the last dim."""

    def __init__(self, how: str):
        super().__init__()
        self.how = how
        self.fc0, self.fc1 = nn.Linear(6, 8), nn.Linear(4 if how == "groups" else 8, 3)

    def forward(self, x):
        h = self.fc0(x)
        if self.how == "split":  # along T: each piece keeps the channels, on the last dim
            h, _ = torch.split(h, [2, 3], dim=1)
        elif self.how == "first-token":  # (N, T, 8) → (N, 8): a class token's features, now at dim 1
            h = h[:, 0]
        else:  # (N, 8) → (N, 2, 4): channel j of each half is one unit, now at dim 2
            h = h.reshape(h.shape[0], 2, 4)
        return self.fc1(h)


@pytest.mark.parametrize("how, x, size", [("split", torch.randn(2, 5, 6), 8), ("groups", torch.randn(2, 6), 4),
                                          ("first-token", torch.randn(2, 5, 6), 8)])
def test_channels_off_dim_1_reach_the_next_linear(how, x, size):
    torch.manual_seed(0)
    gm = group_channels(trace(_Rows(how).eval(), x)).graph_module
    group = _group_of(gm, "fc0")
    assert group.pinned is None and group.size == size
    assert [(m.module, m.role) for m in group.members] == [("fc0", "out"), ("fc1", "in")]
    plan = random_plan(gm, 0.5, torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(shrink(gm, plan).graph_module(x), mask_channels(gm, plan).graph_module(x))


class _ChannelsLastMLP(nn.Module):
    """conv0 (3 → 8) ─▶ permute((0, 2, 3, 1)) ─▶ fc (8 → 8) ─▶ permute back ─▶ conv1 (8 → 4): a
    ConvNeXt block's MLP, the permutation passed as one tuple."""

    def __init__(self):
        super().__init__()
        self.conv0, self.fc, self.conv1 = nn.Conv2d(3, 8, 1), nn.Linear(8, 8), nn.Conv2d(8, 4, 1)

    def forward(self, x):
        h = torch.permute(self.conv0(x), (0, 2, 3, 1))  # (N, H, W, 8)
        return self.conv1(torch.permute(self.fc(h), (0, 3, 1, 2)))


def test_a_permutation_given_as_one_tuple_moves_the_channels():
    torch.manual_seed(0)
    gm = group_channels(trace(_ChannelsLastMLP().eval(), X)).graph_module
    for producer, consumer in (("conv0", "fc"), ("fc", "conv1")):
        group = _group_of(gm, producer)
        assert group.pinned is None and group.size == 8
        assert [(m.module, m.role) for m in group.members] == [(producer, "out"), (consumer, "in")]
    _shrinks_as_masked(gm)


class _SliceThenPool(nn.Module):
    """conv0 (3 → 8) ─▶ channels 2:6 ─▶ max_pool(return_indices) ─▶ conv1 (4 → 4)."""

    def __init__(self):
        super().__init__()
        self.conv0, self.conv1 = nn.Conv2d(3, 8, 3), nn.Conv2d(4, 4, 1)

    def forward(self, x):
        h = self.conv0(x)[:, 2:6]  # (N, 4, 6, 6)
        h, _ = nn.functional.max_pool2d(h, 2, return_indices=True)
        return self.conv1(h)


def test_a_channel_slice_and_a_pool_with_indices_keep_the_channels():
    """Exported (``aten.slice``, ``aten.max_pool2d_with_indices``): the step-1 slice of the
    channels slices their labels, the pool keeps them (its output's dim 1 is the channels,
    whatever H and W are). conv0's channels 2:6 go with conv1's inputs, the rest alone. (The fx
    capture pins at the pool: ``F.max_pool2d_with_indices`` has no coupling rule.)"""
    torch.manual_seed(0)
    gm = group_channels(trace(_SliceThenPool().eval(), X, capture="export")).graph_module
    groups = groups_of(gm)
    assert not groups.pinned or all(g.pinned in ("model input x", "model output") for g in groups.pinned)
    members = sorted([(m.module, m.role, m.index.flatten().tolist()) for m in g.members] for g in groups.prunable)
    assert members == [[("conv0", "out", [0, 1, 6, 7])], [("conv0", "out", [2, 3, 4, 5]), ("conv1", "in", [0, 1, 2, 3])]]
    _shrinks_as_masked(gm)


class _StridedSlice(nn.Module):
    """conv0 (3 → 8) ─▶ every second channel ─▶ conv1 (4 → 4)."""

    def __init__(self):
        super().__init__()
        self.conv0, self.conv1 = nn.Conv2d(3, 8, 3), nn.Conv2d(4, 4, 1)

    def forward(self, x):
        return self.conv1(self.conv0(x)[:, ::2])


def test_a_strided_slice_of_the_channels_pins_them_naming_the_step():
    """Exported, ``aten.slice(h, 1, 0, end, 2)``: channel labels are sliced only with step 1;
    a step over the channels pins conv0's outputs (and conv1's inputs stay whole)."""
    gm = group_channels(trace(_StridedSlice().eval(), X, capture="export")).graph_module
    assert any(n.target is torch.ops.aten.slice.Tensor and n.args[4:] == (2,) for n in gm.graph.nodes)
    out = _group_of(gm, "conv0")
    assert out.pinned is not None and "slice of channels with step 2" in out.pinned
    assert all(m.module != "conv1" or m.role != "in" for g in groups_of(gm).prunable for m in g.members)


class _StackSum(nn.Module):
    """conv0 (3 → 8) ─▶ stack([h, 2h]) (parts on dim ``dim``; ``[h]`` alone for one part)
    ─▶ sum(dim) ─▶ conv1 (8 → 4)."""

    def __init__(self, dim: int = 0, parts: int = 2):
        super().__init__()
        self.conv0, self.conv1 = nn.Conv2d(3, 8, 3), nn.Conv2d(8, 4, 1)
        self.dim, self.parts = dim, parts

    def forward(self, x):
        h = self.conv0(x)
        stacked = torch.stack([h, 2 * h][: self.parts], self.dim)  # (2, N, 8, H, W) for dim 0
        return self.conv1(stacked.sum(self.dim))  # (N, 8, H, W)


@pytest.mark.parametrize("dim", [0, 1])
def test_summing_a_stacks_parts_keeps_the_channels(dim):
    """A reduction over the dim a stack inserted sums its parts, not the batch or the channels:
    a stack at the channels' own dim (1) moves them one dim on (to 2), and either way they come
    back to dim 1 and conv0's group prunes."""
    torch.manual_seed(0)
    gm = group_channels(trace(_StackSum(dim).eval(), X)).graph_module
    group = _group_of(gm, "conv0")
    assert group.pinned is None and [(m.module, m.role) for m in group.members] == [("conv0", "out"), ("conv1", "in")]
    _shrinks_as_masked(gm)


def test_a_stack_of_one_part_keeps_its_channels():
    """``torch.stack([h])``: the stacked value's channels are its one part's, so conv0's group
    reaches conv1 through it and prunes (there is no second part to take the labels from)."""
    torch.manual_seed(0)
    gm = group_channels(trace(_StackSum(parts=1).eval(), X)).graph_module
    group = _group_of(gm, "conv0")
    assert group.pinned is None and [(m.module, m.role) for m in group.members] == [("conv0", "out"), ("conv1", "in")]
    _shrinks_as_masked(gm)


class _ChannelsLastMax(nn.Module):
    """conv0 (3 → 8) ─▶ NHWC ─▶ ``amax`` over H, W with ``keepdim`` given positionally
    ``(N, 1, 1, 8)`` ─▶ NCHW ─▶ conv1 (8 → 4): the reduced dims come before the channels."""

    def __init__(self):
        super().__init__()
        self.conv0, self.conv1 = nn.Conv2d(3, 8, 3), nn.Conv2d(8, 4, 1)

    def forward(self, x):
        h = self.conv0(x).permute(0, 2, 3, 1)
        return self.conv1(h.amax((1, 2), True).permute(0, 3, 1, 2))


def test_a_positional_keepdim_keeps_the_channels_where_they_were():
    """``amax(dims, True)``: the channels stay at dim 3 of the channels-last value (without
    ``keepdim`` they would fall to dim 1), so the permute back brings them to dim 1 and conv0's
    group prunes through the max."""
    torch.manual_seed(0)
    gm = group_channels(trace(_ChannelsLastMax().eval(), X)).graph_module
    group = _group_of(gm, "conv0")
    assert group.pinned is None and [(m.module, m.role) for m in group.members] == [("conv0", "out"), ("conv1", "in")]
    _shrinks_as_masked(gm)


def test_a_target_that_cannot_be_compared_is_not_pointwise():
    """``is_pointwise`` looks a call's target up in its tables; a callable whose ``==`` raises
    ``TypeError`` (an array-like, say) is simply not pointwise: a residual branch through it is
    not dropped as a constant."""
    from ehap_fx.passes.coupling import is_pointwise

    class Incomparable:
        __name__ = "incomparable"

        def __call__(self, x):
            return x

        def __eq__(self, other):
            raise TypeError("no ==")

        __hash__ = object.__hash__

    g = fx.Graph()
    node = g.call_function(Incomparable(), (g.placeholder("x"),))
    assert is_pointwise(fx.GraphModule(nn.Module(), g), node) is False


class _ScalarGain(nn.Module):
    """fc0 (6 → 8) ─▶ × a learned scalar gain ``(1,)`` reshaped to ``(1, 1)`` ─▶ fc1 (8 → 3)."""

    def __init__(self):
        super().__init__()
        self.fc0, self.fc1 = nn.Linear(6, 8), nn.Linear(8, 3)
        self.gain = nn.Parameter(torch.full((1,), 0.5))

    def forward(self, x):
        return self.fc1(self.fc0(x) * self.gain.reshape(1, 1))


def test_a_one_element_tensor_reshaped_to_2d_broadcasts_over_the_channels():
    """A one-element value reshaped to ``(1, 1)`` is a broadcast scalar: it couples nothing and
    fc0's channels prune."""
    torch.manual_seed(0)
    x = torch.randn(2, 6)
    gm = group_channels(trace(_ScalarGain().eval(), x)).graph_module
    group = _group_of(gm, "fc0")
    assert group.pinned is None and [(m.module, m.role) for m in group.members] == [("fc0", "out"), ("fc1", "in")]
    plan = random_plan(gm, 0.5, torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(shrink(gm, plan).graph_module(x), mask_channels(gm, plan).graph_module(x))


def test_a_one_element_parameter_reshaped_to_2d_lands_at_dim_1():
    """The gain's one label (dim 0 of its ``(1,)``) lands at dim 1 of the ``(1, 1)`` reshape,
    which has no dim 2: the reshape is understood, and the gain's group, alone, is pinned only
    because it touches no parameter (no pin reason names the reshape)."""
    torch.manual_seed(0)
    gm = group_channels(trace(_ScalarGain().eval(), torch.randn(2, 6))).graph_module
    (gain,) = [g for g in groups_of(gm).groups if any(m.role == "const" for m in g.members)]
    assert [(m.node, m.role) for m in gain.members] == [("gain", "const")]
    assert gain.pinned == "channels touch no parameter"
    assert not any("reshape" in g.pinned for g in groups_of(gm).pinned)


class _ScalarPerSample(nn.Module):
    """t (N,) ─▶ reshape (N, 1) ─▶ fc0 (1 → 8) ─▶ relu ─▶ fc1 (8 → 1) ─▶ view (N,): one number per
    sample in and out (a time step in, a regression out)."""

    def __init__(self):
        super().__init__()
        self.fc0, self.fc1 = nn.Linear(1, 8), nn.Linear(8, 1)

    def forward(self, t):
        return self.fc1(F.relu(self.fc0(t.reshape(-1, 1)))).view(-1)


def test_a_vector_reshaped_to_a_column_and_back_prunes_the_layers_between():
    """Reshapes between ``(N,)`` and ``(N, 1)`` have no channels to follow: the input's column
    and the one output pin, and fc0's 8 channels prune (shrunk ≡ masked original)."""
    torch.manual_seed(0)
    t = torch.randn(5)
    gm = group_channels(trace(_ScalarPerSample().eval(), t)).graph_module
    group = _group_of(gm, "fc0")
    assert group.pinned is None and [(m.module, m.role) for m in group.members] == [("fc0", "out"), ("fc1", "in")]
    assert group.size == 8
    assert _group_of(gm, "fc1").pinned is not None
    plan = random_plan(gm, 0.5, torch.Generator().manual_seed(0))
    assert len(plan.keep[group.id]) == 4
    with torch.no_grad():
        torch.testing.assert_close(shrink(gm, plan).graph_module(t), mask_channels(gm, plan).graph_module(t))


class _ReshapedScale(nn.Module):
    """conv0 (3 → 8) ─▶ × gamma viewed as ``(1, 8, 1, 1)`` ─▶ × its spatial L2 norm (``norm``
    with keywords only) ─▶ conv1 (8 → 4)."""

    def __init__(self, shape):
        super().__init__()
        self.conv0, self.conv1 = nn.Conv2d(3, 8, 3), nn.Conv2d(8, 4, 1)
        self.gamma = nn.Parameter(torch.linspace(0.5, 1.5, 8).reshape(shape))

    def forward(self, x):
        y = self.conv0(x) * self.gamma.reshape(1, -1, 1, 1)
        return self.conv1(y * y.norm(dim=(2, 3), keepdim=True))


@pytest.mark.parametrize("shape", [(8,), (8, 1, 1)])
def test_a_layer_scale_viewed_at_the_channels_dim_prunes_with_them(shape):
    """gamma, ``(8,)`` or ``(8, 1, 1)``, reshaped to ``(1, 8, 1, 1)``: its 8 values stay one per
    channel (only unit dims move), so they go with conv0's outputs, as does the per-channel
    spatial norm: shrunk ≡ masked original, gamma sliced."""
    torch.manual_seed(0)
    gm = group_channels(trace(_ReshapedScale(shape).eval(), X)).graph_module
    group = _group_of(gm, "conv0")
    assert group.pinned is None and group.size == 8
    assert sorted((m.module or m.node, m.role) for m in group.members) == [
        ("conv0", "out"), ("conv1", "in"), ("gamma", "const")]
    plan = random_plan(gm, 0.5, torch.Generator().manual_seed(0))
    small = shrink(gm, plan).graph_module
    with torch.no_grad():
        torch.testing.assert_close(small(X), mask_channels(gm, plan).graph_module(X))
    assert small.gamma.shape == (4, *shape[1:])


class _TokensTimesMatrix(nn.Module):
    """x (N, T, 6) ─▶ fc (6 → 8) ─▶ @ proj, a plain (8, 3) parameter ─▶ (N, T, 3)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 8)
        self.proj = nn.Parameter(torch.randn(8, 3))

    def forward(self, x):
        return self.fc(x) @ self.proj


def test_a_matmul_by_a_parameter_matrix_pins_its_input_channels():
    """``(N, T, 8) @ (8, 3)``, of unequal ranks, is neither attention form: fc's 8 channels, the
    rows proj would have to lose with them, pin whole, and the model prunes to itself."""
    torch.manual_seed(0)
    x = torch.randn(2, 5, 6)
    gm = group_channels(trace(_TokensTimesMatrix().eval(), x)).graph_module
    group = _group_of(gm, "fc")
    assert group.size == 8 and "of unequal ranks" in group.pinned
    assert groups_of(gm).prunable == ()
    plan = random_plan(gm, 0.5, torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(shrink(gm, plan).graph_module(x), mask_channels(gm, plan).graph_module(x))


class _EllipsisReorder(nn.Module):
    """fc0 (6 → 8) ─▶ ``y[..., [1, 0, 3, 2, 5, 4, 7, 6]]``: the pairs of channels swapped ─▶ fc1 (8 → 3)."""

    def __init__(self):
        super().__init__()
        self.fc0, self.fc1 = nn.Linear(6, 8), nn.Linear(8, 3)

    def forward(self, x):
        return self.fc1(self.fc0(x)[..., [1, 0, 3, 2, 5, 4, 7, 6]])


def test_an_index_after_an_ellipsis_pins_the_channels():
    """A leading ``...`` hides which dim the index reaches (here dim 1 of an (N, 8) value, which
    it reorders): fc0's channels pin, and the model prunes to itself."""
    torch.manual_seed(0)
    x = torch.randn(2, 6)
    gm = group_channels(trace(_EllipsisReorder().eval(), x)).graph_module
    assert _group_of(gm, "fc0").pinned is not None and groups_of(gm).prunable == ()
    plan = random_plan(gm, 0.5, torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(shrink(gm, plan).graph_module(x), mask_channels(gm, plan).graph_module(x))


class _CropAfterEllipsis(nn.Module):
    """conv0 (3 → 8) ─▶ ``h[:, ..., 1:5]``: the width cropped, dims 0 and 1 whole ─▶ conv1 (8 → 4)."""

    def __init__(self):
        super().__init__()
        self.conv0, self.conv1 = nn.Conv2d(3, 8, 3), nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.conv1(self.conv0(x)[:, ..., 1:5])


def test_an_ellipsis_after_the_batch_slice_leaves_the_channels_whole():
    """``h[:, ..., 1:5]`` indexes the last dim: conv0's 8 channels go to conv1 (shrunk ≡ masked)."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    gm = group_channels(trace(_CropAfterEllipsis().eval(), x)).graph_module
    group = _group_of(gm, "conv0")
    assert group.pinned is None and group.size == 8
    assert [(m.module, m.role) for m in group.members] == [("conv0", "out"), ("conv1", "in")]
    plan = random_plan(gm, 0.5, torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(shrink(gm, plan).graph_module(x), mask_channels(gm, plan).graph_module(x))


class _ConvOverTokens(nn.Module):
    """tokens (N, 5, 6) ─▶ fc0 (6 → 8): channels at dim 2 ─▶ ``nn.Conv1d(5, 4, 1)``, which reads
    dim 1 (the 5 tokens) as its channels."""

    def __init__(self):
        super().__init__()
        self.fc0, self.conv = nn.Linear(6, 8), nn.Conv1d(5, 4, 1)

    def forward(self, x):
        return self.conv(self.fc0(x))


def test_a_rule_that_reads_dim_1_pins_channels_that_sit_at_another_dim():
    """The conv's rule reads dim 1 of fc0's output, whose channels are dim 2: fc0's 8 channels
    pin there, and the conv's 5 input channels are fresh pinned labels (a size-5 dim, not 8)."""
    gm = group_channels(trace(_ConvOverTokens().eval(), torch.randn(2, 5, 6))).graph_module
    reason = "reads dim 1 of a value whose channels are dim 2"
    assert _group_of(gm, "fc0").pinned.endswith(reason)
    (conv_in,) = [g for g in groups_of(gm).groups if [(m.module, m.role) for m in g.members] == [("conv", "in")]]
    assert conv_in.size == 5 and conv_in.pinned.endswith(reason)
    assert groups_of(gm).prunable == ()


class _PooledTokens(nn.Module):
    """tokens (N, T, 6) ─▶ fc0 (6 → 8) ─▶ reduced over the tokens (dim 1) ─▶ (N, 8) ─▶ fc1 (8 → 3)."""

    def __init__(self, how):
        super().__init__()
        self.how, self.fc0, self.fc1 = how, nn.Linear(6, 8), nn.Linear(8, 3)

    def forward(self, x):
        y = self.fc0(x)
        return self.fc1(y.mean(1) if self.how == "mean" else torch.linalg.vector_norm(y, 2, 1))


@pytest.mark.parametrize("how", ["mean", "norm"])
def test_reducing_the_tokens_keeps_the_features(how):
    """A mean (ViT's pooling) or a norm over the tokens, without ``keepdim``, leaves fc0's
    features at dim 1 of the (N, 8) result: they prune (shrunk ≡ masked)."""
    torch.manual_seed(0)
    x = torch.randn(2, 5, 6)
    gm = group_channels(trace(_PooledTokens(how).eval(), x)).graph_module
    group = _group_of(gm, "fc0")
    assert group.pinned is None and [(m.module, m.role) for m in group.members] == [("fc0", "out"), ("fc1", "in")]
    plan = random_plan(gm, 0.5, torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(shrink(gm, plan).graph_module(x), mask_channels(gm, plan).graph_module(x))


class _Softmax(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.dim = dim

    def forward(self, x):
        return torch.softmax(x, self.dim)


@pytest.mark.parametrize("dim", [3, 1])
def test_a_softmax_over_the_width_keeps_the_channels_and_over_them_pins(dim):
    """conv0 (3 → 8) ─▶ ``torch.softmax(h, dim)``, the dim given positionally ─▶ conv1: over the
    width each channel is normalised alone (conv0's 8 prune); over the channels each output
    reads all of them (they pin, naming the dim)."""
    gm = group_channels(trace(model_with(_Softmax(dim)), X)).graph_module
    group = conv0_group(gm)
    if dim == 3:
        assert group.pinned is None and [(m.module, m.role) for m in group.members] == [("0", "out"), ("2", "in")]
    else:
        assert group.pinned.endswith("softmax over the channel dim 1")


class _FeaturesAsMaps(nn.Module):
    """fc (6 → 32) ─▶ view (N, 8, 2, 2): each channel is a block of 4 features ─▶ conv (8 → 4)."""

    def __init__(self):
        super().__init__()
        self.fc, self.conv = nn.Linear(6, 32), nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.conv(self.fc(x).view(-1, 8, 2, 2))


def test_features_viewed_as_maps_prune_in_blocks():
    """fc's 32 features are conv's 8 channels of 2×2: channel c is features 4c … 4c+3, one unit."""
    torch.manual_seed(0)
    x = torch.randn(3, 6)
    gm = group_channels(trace(_FeaturesAsMaps().eval(), x)).graph_module
    group = _group_of(gm, "fc")
    assert group.pinned is None and group.size == 8
    members = {(m.module, m.role): m.index.tolist() for m in group.members}
    assert members == {("fc", "out"): torch.arange(32).reshape(8, 4).tolist(),
                       ("conv", "in"): [[c] for c in range(8)]}
    plan = random_plan(gm, 0.5, torch.Generator().manual_seed(0))
    small = shrink(gm, plan).graph_module
    with torch.no_grad():
        torch.testing.assert_close(small(x), mask_channels(gm, plan).graph_module(x))
    assert small.fc.weight.shape == (16, 6)


class _ChannelsIntoBatch(nn.Module):
    """conv0 (3 → 4) ─▶ reshape (N·4, 1, H, W) ─▶ shared (1 → 2), the same filters on every
    channel ─▶ reshape (N, 8, H, W) ─▶ conv1 (8 → 4)."""

    def __init__(self):
        super().__init__()
        self.conv0, self.shared, self.conv1 = nn.Conv2d(3, 4, 3), nn.Conv2d(1, 2, 1), nn.Conv2d(8, 4, 1)

    def forward(self, x):
        n, _, h, w = x.shape
        y = self.conv0(x)
        z = self.shared(y.reshape(n * 4, 1, h - 2, w - 2))
        return self.conv1(z.reshape(n, 8, h - 2, w - 2))


def test_a_reshape_that_moves_channels_into_the_batch_or_back_pins_them():
    """Folding the channels into the batch dim, and unfolding them again, leaves no channel dim
    to follow: conv0's and the shared conv's channels pin at those reshapes."""
    gm = group_channels(trace(_ChannelsIntoBatch().eval(), X)).graph_module
    for module in ("conv0", "shared"):
        assert _group_of(gm, module).pinned.endswith("reshape that does not keep the batch dim"), module
    assert groups_of(gm).prunable == ()


class _TokensReindexed(nn.Module):
    """tokens (N, T, 6) ─▶ fc0 (6 → 8): channels at dim 2 ─▶ ``how`` ─▶ fc1 (8 → 3)."""

    def __init__(self, how):
        super().__init__()
        self.how, self.fc0, self.fc1 = how, nn.Linear(6, 8), nn.Linear(8, 3)

    def forward(self, x):
        y = self.fc0(x)  # (N, T, 8)
        if self.how == "bool":
            y = y[:, True]  # (N, 1, T, 8): a boolean index adds a dim, as None does
        elif self.how == "none":
            y = y[:, None]  # (N, 1, T, 8)
        elif self.how == "transposed-shape":
            y = y.reshape(y.shape[0], 8, y.shape[1]).transpose(1, 2)  # (N, 8, T): channels mixed with tokens
        else:
            y = y.reshape(y.shape[0], y.shape[1], 8, 1).squeeze(-1)  # (N, T, 8, 1): not a split into heads
        return self.fc1(y)


@pytest.mark.parametrize("how, reason", [
    ("bool", "index (slice(None, None, None), True) of a value with channels at dim 2"),
    ("none", "index (slice(None, None, None), None) of a value with channels at dim 2"),
    ("transposed-shape", "reshape (2, 5, 8) → (2, 8, 5) of a value whose channels are dim 2"),
    ("unit-last", "reshape (2, 5, 8) → (2, 5, 8, 1) of a value whose channels are dim 2"),
], ids=["bool", "none", "transposed-shape", "unit-last"])
def test_an_index_or_reshape_that_adds_or_mixes_dims_around_channels_at_dim_2_pins_them_there(how, reason):
    """Channels at dim 2 (tokens): ``x[:, True]`` and ``x[:, None]`` add a dim before them, a
    reshape to ``(N, C, T)`` mixes them with the tokens, and one to ``(N, T, C, 1)`` is neither
    the merge nor the split of attention heads (a head of one channel is no split): each pins
    fc0's channels at that node, naming it."""
    torch.manual_seed(0)
    gm = group_channels(trace(_TokensReindexed(how).eval(), torch.randn(2, 5, 6))).graph_module
    assert _group_of(gm, "fc0").pinned.endswith(reason)
    assert groups_of(gm).prunable == ()


class _CatAlongHeight(nn.Module):
    """conv0 (3 → 8) ─▶ cat along H of (h,) ─▶ conv1 (8 → 4), and of (h, 2h) ─▶ conv2 (8 → 4)."""

    def __init__(self):
        super().__init__()
        self.conv0, self.conv1, self.conv2 = nn.Conv2d(3, 8, 3), nn.Conv2d(8, 4, 1), nn.Conv2d(8, 4, 1)

    def forward(self, x):
        h = self.conv0(x)
        return self.conv1(torch.cat((h,), dim=2)) + self.conv2(torch.cat((h, 2 * h), dim=2))[:, :, :6]


def test_a_cat_along_another_dim_keeps_the_channels_of_its_parts():
    """Along H, every part carries the same channels (one part included): conv0's group reaches
    conv1 and prunes."""
    torch.manual_seed(0)
    gm = group_channels(trace(_CatAlongHeight().eval(), X)).graph_module
    group = _group_of(gm, "conv0")
    assert group.pinned is None
    assert sorted((m.module, m.role) for m in group.members) == [("conv0", "out"), ("conv1", "in"), ("conv2", "in")]


class _BatchHalves(nn.Module):
    """conv0 (3 → 8) ─▶ split into its batch halves (no dim given: dim 0) ─▶ product ─▶ conv1 (8 → 4)."""

    def __init__(self, form: str):
        super().__init__()
        self.conv0, self.conv1 = nn.Conv2d(3, 8, 3), nn.Conv2d(8, 4, 1)
        self.form = form

    def forward(self, x):
        h = self.conv0(x)
        first, second = h.split(h.shape[0] // 2) if self.form == "split" else torch.chunk(h, 2)
        return self.conv1(first * second)


@pytest.mark.parametrize("form", ["split", "chunk"])
def test_a_split_without_a_dim_splits_the_batch_and_each_piece_keeps_the_channels(form):
    """``h.split(n)`` / ``torch.chunk(h, 2)`` split dim 0 when no dim is given: both halves carry
    all 8 of conv0's channels, so conv0's group reaches conv1 and prunes."""
    torch.manual_seed(0)
    gm = group_channels(trace(_BatchHalves(form).eval(), X)).graph_module
    group = _group_of(gm, "conv0")
    assert group.pinned is None and [(m.module, m.role) for m in group.members] == [("conv0", "out"), ("conv1", "in")]
    _shrinks_as_masked(gm)


class _TokensBesideAVector(nn.Module):
    """tokens (N, T, 6) ─▶ tok (6 → 8) ─▶ logsumexp over T (no rule: pinned) ─┐
    tokens[:, 0] ─▶ side (6 → 4) ──────────────────────────────────────────────┴▶ cat ─▶ head (12 → 3)."""

    def __init__(self):
        super().__init__()
        self.tok, self.side, self.head = nn.Linear(6, 8), nn.Linear(6, 4), nn.Linear(12, 3)

    def forward(self, x):
        pooled = torch.logsumexp(self.tok(x), 1)  # (N, 8): its input's channels were dim 2
        return self.head(torch.cat([pooled, self.side(x[:, 0])], 1))


def test_an_op_without_a_rule_gives_its_two_dim_output_pinned_channels_at_dim_1():
    """The pinned output of an op no rule describes still has channels, at dim 1 when the
    output has no dim 2 (its input's channel dim): a cat beside it then keeps the other part's
    channels, and side's 4 prune."""
    torch.manual_seed(0)
    x = torch.randn(2, 5, 6)
    gm = group_channels(trace(_TokensBesideAVector().eval(), x)).graph_module
    group = _group_of(gm, "side")
    assert group.pinned is None and group.size == 4
    assert [(m.module, m.role) for m in group.members] == [("side", "out"), ("head", "in")]
    plan = random_plan(gm, 0.5, torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(shrink(gm, plan).graph_module(x), mask_channels(gm, plan).graph_module(x))


class _SpatialBias(nn.Module):
    """conv0 (3 → 8) ─▶ + a (1, 1, 6, 6) parameter (a position bias, the same for every
    channel) ─▶ conv1 (8 → 4)."""

    def __init__(self):
        super().__init__()
        self.conv0, self.conv1 = nn.Conv2d(3, 8, 3), nn.Conv2d(8, 4, 1)
        self.pos = nn.Parameter(torch.randn(1, 1, 6, 6))

    def forward(self, x):
        return self.conv1(self.conv0(x) + self.pos)


def test_an_operand_broadcast_along_the_channels_couples_nothing():
    """Adding a value that is the same for every channel (size 1 at the channel dim) leaves
    conv0's channels free to prune."""
    torch.manual_seed(0)
    gm = group_channels(trace(_SpatialBias().eval(), X)).graph_module
    group = _group_of(gm, "conv0")
    assert group.pinned is None and [(m.module, m.role) for m in group.members] == [("conv0", "out"), ("conv1", "in")]
    _shrinks_as_masked(gm)


class _OneChannelTimesScalar(nn.Module):
    """conv0 (3 → 1) ─▶ × s, a (1, 1, 1, 1) buffer ─▶ conv1 (1 → 4)."""

    def __init__(self):
        super().__init__()
        self.conv0, self.conv1 = nn.Conv2d(3, 1, 3), nn.Conv2d(1, 4, 1)
        self.register_buffer("s", torch.full((1, 1, 1, 1), 2.0))

    def forward(self, x):
        return self.conv1(self.conv0(x) * self.s)


def test_a_one_element_operand_is_a_scalar_even_for_a_one_channel_value():
    """``s`` is broadcast whatever the channels: it is no member of conv0's one-channel group
    (a per-channel constant would be sliced with it); it sits alone, with nothing to prune."""
    gm = group_channels(trace(_OneChannelTimesScalar().eval(), X)).graph_module
    group = _group_of(gm, "conv0")
    assert group.pinned is None and [(m.module, m.role) for m in group.members] == [("conv0", "out"), ("conv1", "in")]
    (alone,) = [g for g in groups_of(gm).groups if [(m.node, m.role) for m in g.members] == [("s", "const")]]
    assert not alone.prunable


class _UnsqueezeSqueeze(nn.Module):
    """conv0 (3 → 8) ─▶ unsqueeze(-1) ─▶ squeeze(-1) ─▶ unsqueeze(2) ─▶ squeeze(2) ─▶ conv1 (8 → 4)."""

    def __init__(self):
        super().__init__()
        self.conv0, self.conv1 = nn.Conv2d(3, 8, 3), nn.Conv2d(8, 4, 1)

    def forward(self, x):
        h = self.conv0(x).unsqueeze(-1).squeeze(-1)
        return self.conv1(torch.squeeze(torch.unsqueeze(h, 2), 2))


def test_unsqueeze_and_squeeze_after_the_channels_keep_them():
    torch.manual_seed(0)
    gm = group_channels(trace(_UnsqueezeSqueeze().eval(), X)).graph_module
    group = _group_of(gm, "conv0")
    assert group.pinned is None and [(m.module, m.role) for m in group.members] == [("conv0", "out"), ("conv1", "in")]
    _shrinks_as_masked(gm)


class _PixelShuffle(nn.Module):
    """conv0 (3 → 8) ─▶ pixel_shuffle(2) (8 → 2 channels) ─▶ conv1 (2 → 4), or
    conv0 ─▶ pixel_unshuffle(2) (8 → 32 channels) ─▶ conv1 (32 → 4)."""

    def __init__(self, unshuffle: bool):
        super().__init__()
        self.unshuffle = unshuffle
        self.conv0, self.conv1 = nn.Conv2d(3, 8, 3), nn.Conv2d(32 if unshuffle else 2, 4, 1)

    def forward(self, x):
        h = self.conv0(x)  # (N, 8, 6, 6)
        return self.conv1(F.pixel_unshuffle(h, 2) if self.unshuffle else F.pixel_shuffle(h, 2))


@pytest.mark.parametrize("unshuffle", [False, True], ids=["shuffle", "unshuffle"])
def test_pixel_shuffles_prune_whole_blocks_of_channels(unshuffle):
    """pixel_shuffle(2): output channel c is conv0's channels 4c … 4c+3, one unit (a group of 2
    units, 4 rows each); pixel_unshuffle(2): conv0's channel c is conv1's inputs 4c … 4c+3."""
    torch.manual_seed(0)
    gm = group_channels(trace(_PixelShuffle(unshuffle).eval(), X)).graph_module
    group = _group_of(gm, "conv0")
    assert group.pinned is None
    members = {(m.module, m.role): m.index.tolist() for m in group.members}
    if unshuffle:
        assert group.size == 8
        assert members == {("conv0", "out"): [[c] for c in range(8)],
                           ("conv1", "in"): [[4 * c + j for j in range(4)] for c in range(8)]}
    else:
        assert group.size == 2
        assert members == {("conv0", "out"): [[4 * c + j for j in range(4)] for c in range(2)],
                           ("conv1", "in"): [[0], [1]]}
    plan = PrunePlan.removing(groups_of(gm), {group.id: [0]})
    with torch.no_grad():
        torch.testing.assert_close(shrink(gm, plan).graph_module(X), mask_channels(gm, plan).graph_module(X))


class _CatBatches(nn.Module):
    """conv0 (3 → 8) and conv1 (3 → 8) on x ─▶ ``torch.cat`` with no dim (along the batch) ─▶
    conv2 (8 → 4)."""

    def __init__(self):
        super().__init__()
        self.conv0, self.conv1, self.conv2 = nn.Conv2d(3, 8, 3), nn.Conv2d(3, 8, 3), nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.conv2(torch.cat([self.conv0(x), self.conv1(x)]))  # (2N, 8, 6, 6)


def test_a_cat_without_a_dim_stacks_the_batches_and_unites_the_channels():
    """``torch.cat``'s dim defaults to 0: channel c of conv0 and of conv1 are both conv2's input c,
    one group of 8."""
    torch.manual_seed(0)
    gm = group_channels(trace(_CatBatches().eval(), X)).graph_module
    group = _group_of(gm, "conv0")
    assert group.pinned is None and group.size == 8
    assert sorted((m.module, m.role) for m in group.members) == [("conv0", "out"), ("conv1", "out"), ("conv2", "in")]
    _shrinks_as_masked(gm)



class _TokensCat(nn.Module):
    """tokens (N, 5, 6) ─▶ fc0 (6 → 4) and fc1 (6 → 4) ─▶ cat on the last dim (the channels)
    ─▶ fc2 (8 → 3)."""

    def __init__(self):
        super().__init__()
        self.fc0, self.fc1, self.fc2 = nn.Linear(6, 4), nn.Linear(6, 4), nn.Linear(8, 3)

    def forward(self, x):
        return self.fc2(torch.cat([self.fc0(x), self.fc1(x)], -1))


def test_a_cat_of_channels_last_values_keeps_them_last():
    """Both parts carry their channels on dim 2: so does the cat, and fc0's and fc1's 4 reach fc2
    (its inputs 0-3 and 4-7)."""
    torch.manual_seed(0)
    x = torch.randn(2, 5, 6)
    gm = group_channels(trace(_TokensCat().eval(), x)).graph_module
    for fc, at in (("fc0", [0, 1, 2, 3]), ("fc1", [4, 5, 6, 7])):
        group = _group_of(gm, fc)
        assert group.pinned is None
        assert {(m.module, m.role): m.index.flatten().tolist() for m in group.members} == {
            (fc, "out"): [0, 1, 2, 3], ("fc2", "in"): at}
    plan = random_plan(gm, 0.5, torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(shrink(gm, plan).graph_module(x), mask_channels(gm, plan).graph_module(x))


class _Crop(nn.Module):
    """conv0 (3 → 8) ─▶ F.pad with widths (-2, 1) on the channels: drops channels 0 and 1, adds a
    zero channel ─▶ conv1 (7 → 4)."""

    def __init__(self):
        super().__init__()
        self.conv0, self.conv1 = nn.Conv2d(3, 8, 3), nn.Conv2d(7, 4, 1)

    def forward(self, x):
        return self.conv1(F.pad(self.conv0(x), (0, 0, 0, 0, -2, 1)))


def test_a_negative_channel_pad_pins():
    """A negative pad width crops channels, which no rule follows: conv0's channels pin, and the
    model prunes to itself."""
    torch.manual_seed(0)
    gm = group_channels(trace(_Crop().eval(), X)).graph_module
    assert _group_of(gm, "conv0").pinned.endswith("negative channel pad (-2, 1)")
    _shrinks_as_masked(gm)



class _PadOneEnd(nn.Module):
    """conv0 (3 → 8) ─▶ F.pad with widths (front, back) on the channels, one of them 0: two
    zero channels before or after the eight ─▶ conv1 (10 → 4)."""

    def __init__(self, front: int, back: int):
        super().__init__()
        self.widths = (0, 0, 0, 0, front, back)
        self.conv0, self.conv1 = nn.Conv2d(3, 8, 3), nn.Conv2d(10, 4, 1)

    def forward(self, x):
        return self.conv1(F.pad(self.conv0(x), self.widths))


@pytest.mark.parametrize(("front", "back", "zeros"), [(0, 2, [8, 9]), (2, 0, [0, 1])])
def test_a_channel_pad_at_one_end_only_is_not_negative(front, back, zeros):
    """A width of 0 on one side is no crop: conv0's channels stay prunable and the two pad
    channels (conv1's inputs 8, 9 or 0, 1) are a member of their own group."""
    torch.manual_seed(0)
    gm = group_channels(trace(_PadOneEnd(front, back).eval(), X)).graph_module
    assert _group_of(gm, "conv0").pinned is None
    (pad,) = [g for g in groups_of(gm).prunable if any(m.role == "pad" for m in g.members)]
    assert [m.index.flatten().tolist() for m in pad.members if m.role == "pad"] == [zeros]
    _shrinks_as_masked(gm)


class _SqueezeTo2d(nn.Module):
    """conv0 (3 → 8, kernel 8 over 8×8: a 1×1 output) ─▶ ``flatten(2)`` to (N, 8, 1) ─▶
    ``squeeze(-1)`` to (N, 8) ─▶ fc (8 → 4)."""

    def __init__(self):
        super().__init__()
        self.conv0, self.fc = nn.Conv2d(3, 8, 8), nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(self.conv0(x).flatten(2).squeeze(-1))


def test_squeezing_to_two_dims_keeps_the_channels_at_dim_1():
    """A squeeze whose result has exactly two dims, (N, C), leaves dims 0 and 1 where they were:
    conv0's channels reach the linear's inputs."""
    torch.manual_seed(0)
    gm = group_channels(trace(_SqueezeTo2d().eval(), X)).graph_module
    group = _group_of(gm, "conv0")
    assert group.pinned is None and [(m.module, m.role) for m in group.members] == [("conv0", "out"), ("fc", "in")]
    _shrinks_as_masked(gm)


class _PadWidths(nn.Module):
    """The widths of a "same" pad of W, computed at run time (traced as a leaf: one opaque node)."""

    def forward(self, x):
        return (0, x.shape[-1] % 2, 0, 0)


class _OpaquePad(nn.Module):
    """conv0 (3 → 8) ─▶ F.pad(·, widths) ─▶ conv1 (8 → 4), ``widths`` a leaf module's output (of x)."""

    def __init__(self):
        super().__init__()
        self.conv0, self.widths, self.conv1 = nn.Conv2d(3, 8, 2), _PadWidths(), nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.conv1(F.pad(self.conv0(x), self.widths(x)))


def test_a_pad_whose_widths_are_one_opaque_value_pins():
    """The widths are one graph value, not a tuple: the rule cannot tell which dims they pad,
    so conv0's channels pin at the pad (naming it), and the model shrinks to itself (``shrink``
    leaves such a pad alone: it once tried to read the widths as a tuple and failed)."""
    torch.manual_seed(0)
    gm = group_channels(trace(_OpaquePad().eval(), X, leaf_modules=[_PadWidths])).graph_module
    assert any(n.op == "call_module" and n.target == "widths" for n in gm.graph.nodes)
    assert _group_of(gm, "conv0").pinned.endswith("pad with unknown widths")
    _shrinks_as_masked(gm)


class _ChannelPadWithValue(nn.Module):
    """conv0 (3 → 8) ─▶ F.pad(·, (0, 0, 0, 0, 1, 2), "constant", 0.0): one channel in front, two
    behind ─▶ conv1 (11 → 4)."""

    def __init__(self):
        super().__init__()
        self.conv0, self.conv1 = nn.Conv2d(3, 8, 3), nn.Conv2d(11, 4, 1)

    def forward(self, x):
        return self.conv1(F.pad(self.conv0(x), (0, 0, 0, 0, 1, 2), "constant", 0.0))


def test_an_exported_constant_channel_pad_prunes_its_pad_channels():
    """torch.export writes ``aten.pad(x, widths, "constant", 0.0)``: the mode is the third
    argument (the value the fourth), read there it is "constant", so the three pad channels are
    a prunable ``pad`` member (indices 0, 9, 10) and conv0's eight prune too."""
    torch.manual_seed(0)
    gm = group_channels(trace(_ChannelPadWithValue().eval(), X, capture="export")).graph_module
    assert [n.args[2:] for n in gm.graph.nodes if n.target is torch.ops.aten.pad.default] == [("constant", 0.0)]
    assert _group_of(gm, "conv0").pinned is None
    (pad,) = [g for g in groups_of(gm).prunable if any(m.role == "pad" for m in g.members)]
    assert [m.index.flatten().tolist() for m in pad.members if m.role == "pad"] == [[0, 9, 10]]
    _shrinks_as_masked(gm)


class _ChannelShuffle(nn.Module):
    """conv0 (3 → 8) ─▶ ShuffleNet's channel shuffle, ``view(N, 2, 4, H, W)`` ─▶ ``transpose(1, 2)``
    ─▶ ``reshape(N, 8, H, W)`` ─▶ conv1 (8 → 4): conv1's input channel 2j + i is conv0's 4i + j."""

    def __init__(self):
        super().__init__()
        self.conv0, self.conv1 = nn.Conv2d(3, 8, 3), nn.Conv2d(8, 4, 1)

    def forward(self, x):
        h = self.conv0(x)
        n, c, hh, ww = h.shape
        return self.conv1(h.view(n, 2, c // 2, hh, ww).transpose(1, 2).reshape(n, c, hh, ww))


def test_a_channel_shuffle_of_four_dim_values_prunes_channel_j_of_both_groups_together():
    """The view splits conv0's 8 channels into 2 groups of 4 with H, W kept after them: channel
    j of each group is one unit (conv0's j and 4 + j), the 4 units reach conv1 as its inputs
    (2j, 2j + 1) after the shuffle, and the model shrinks exactly."""
    torch.manual_seed(0)
    gm = group_channels(trace(_ChannelShuffle().eval(), X)).graph_module
    group = _group_of(gm, "conv0")
    assert group.pinned is None and group.size == 4
    members = {(m.module, m.role): m.index.tolist() for m in group.members}
    assert members == {("conv0", "out"): [[0, 4], [1, 5], [2, 6], [3, 7]],
                       ("conv1", "in"): [[0, 1], [2, 3], [4, 5], [6, 7]]}
    _shrinks_as_masked(gm)


class _TwoDimScalar(nn.Module):
    """fc0 (6 → 8) ─▶ × ``s``, a ``(1, 1)`` parameter read as it is ─▶ fc1 (8 → 3)."""

    def __init__(self):
        super().__init__()
        self.fc0, self.fc1 = nn.Linear(6, 8), nn.Linear(8, 3)
        self.s = nn.Parameter(torch.full((1, 1), 0.5))

    def forward(self, x):
        return self.fc1(self.fc0(x) * self.s)


def test_a_two_dim_one_element_parameter_is_a_scalar_with_its_one_channel_at_dim_1():
    """``s`` (1, 1) is a constant whose one label sits at dim 1 (it has no dim 2): a group of its
    own that touches no parameter, broadcast over fc0's channels, which prune."""
    torch.manual_seed(0)
    x = torch.randn(2, 6)
    gm = group_channels(trace(_TwoDimScalar().eval(), x)).graph_module
    (alone,) = [g for g in groups_of(gm).groups if any(m.role == "const" for m in g.members)]
    assert [(m.node, m.role, m.dim) for m in alone.members] == [("s", "const", 1)]
    assert alone.pinned == "channels touch no parameter"
    group = _group_of(gm, "fc0")
    assert group.pinned is None and [(m.module, m.role) for m in group.members] == [("fc0", "out"), ("fc1", "in")]
    plan = random_plan(gm, 0.5, torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(shrink(gm, plan).graph_module(x), mask_channels(gm, plan).graph_module(x))


class _TokensFlattened(nn.Module):
    """fc0 (6 → 4) on tokens ``(N, 3, 6)`` ─▶ ``torch.flatten(h, 1)`` ``(N, 12)`` (no end dim: the
    last) ─▶ fc1 (12 → 2): feature 4t + c of fc1's input is fc0's channel c of token t."""

    def __init__(self):
        super().__init__()
        self.fc0, self.fc1 = nn.Linear(6, 4), nn.Linear(12, 2)

    def forward(self, x):
        return self.fc1(torch.flatten(self.fc0(x), 1))


def test_flattening_tokens_to_the_last_dim_tiles_their_channels():
    """``flatten(h, 1)`` merges the tokens with the channels (dim 2, the last): the labels tile,
    so fc0's 4 channels are a group with 3 columns of fc1 each, and the model shrinks exactly."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 6)
    gm = group_channels(trace(_TokensFlattened().eval(), x)).graph_module
    group = _group_of(gm, "fc0")
    assert group.pinned is None
    assert {(m.module, m.role): m.index.tolist() for m in group.members} == {
        ("fc0", "out"): [[0], [1], [2], [3]], ("fc1", "in"): [[0, 4, 8], [1, 5, 9], [2, 6, 10], [3, 7, 11]]}
    plan = random_plan(gm, 0.5, torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(shrink(gm, plan).graph_module(x), mask_channels(gm, plan).graph_module(x))


class _OneChannelRead(nn.Module):
    """conv0 (3 → 8) ─▶ conv1 (8 → 4), plus ``h[:, 0]`` (conv0's channel 0, the channel dim
    indexed away) broadcast onto conv1's output."""

    def __init__(self):
        super().__init__()
        self.conv0, self.conv1 = nn.Conv2d(3, 8, 3), nn.Conv2d(8, 4, 1)

    def forward(self, x):
        h = self.conv0(x)
        return self.conv1(h) + h[:, 0].unsqueeze(1)


def test_an_integer_index_of_the_channel_dim_pins_the_channels():
    """``h[:, 0]`` reads one channel by its number: pruning would renumber it, so conv0's
    channels pin at the index, naming it, and the model shrinks to itself."""
    torch.manual_seed(0)
    gm = group_channels(trace(_OneChannelRead().eval(), X)).graph_module
    assert _group_of(gm, "conv0").pinned.endswith("moves or reorders the channel dim")
    _shrinks_as_masked(gm)


def test_a_flatten_module_repeats_each_channel_over_its_positions():
    """``nn.Flatten()`` (one module call, dims 1 to the last) of conv0's ``(N, 4, 2, 2)`` output
    is a reshape to ``(N, 16)``: fc's features 4c … 4c + 3 are conv0's channel c."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, stride=3), nn.Flatten(), nn.Linear(16, 2)).eval()
    gm = group_channels(trace(model, X)).graph_module
    assert any(n.op == "call_module" and n.target == "1" for n in gm.graph.nodes)
    group = conv0_group(gm)
    assert group.pinned is None
    assert {(m.module, m.role): m.index.tolist() for m in group.members} == {
        ("0", "out"): [[0], [1], [2], [3]], ("2", "in"): [[4 * c + k for k in range(4)] for c in range(4)]}


def test_the_coupling_rules_load_without_torchvision(monkeypatch):
    """torchvision is optional: with it missing, the rules module still loads (a fresh copy,
    ``torchvision.ops`` unimportable) and knows no stochastic depth."""
    import importlib.util
    import sys

    import ehap_fx.passes.coupling as coupling

    monkeypatch.setitem(sys.modules, "torchvision.ops", None)  # `from torchvision.ops import` raises ImportError
    spec = importlib.util.spec_from_file_location("_coupling_without_torchvision", coupling.__file__)
    fresh = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, fresh)  # its dataclasses look their module up there
    spec.loader.exec_module(fresh)
    assert fresh._STOCHASTIC_DEPTH == () and coupling._STOCHASTIC_DEPTH != ()
