"""Depth pruning: dropping whole residual blocks (``droppable_groups``, ``granularity="block"``).

Emptying a block's inner group leaves its second conv with no input: it computes its bias
alone, a per-channel constant. ``shrink`` folds that constant through the BN after it into a
buffer and erases the branch; the result must equal the masked original exactly, cost what
``plan_cost`` predicted, keep pruning (the buffer is a member of the stream's group) and go
through INT8 and ONNX like any other model.
"""

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision.models as tvm
from ehap_fx.passes.cost import plan_cost, total_cost
from ehap_fx.passes.depth import droppable_groups
from ehap_fx.passes.export import ExportOptions, export
from ehap_fx.passes.group import group_channels, groups_of
from ehap_fx.passes.mask import random_plan
from ehap_fx.passes.quantize import QuantizeOptions, constant_adds_as_convs, quantize
from ehap_fx.passes.shrink import PrunePlan, shrink
from ehap_fx.passes.trace import trace
from torch import nn

from ehap_fx.errors import ShrinkError
from ehap_fx.models import get_model
from ehap_fx.scoring import Ranking, magnitude_scores
from ehap_fx.target import Target, select_plan
from tests.nets import randomize_bn
from tests.test_shrink import assert_shrunk_equals_masked

pytestmark = pytest.mark.usefixtures("one_thread")


def grouped(name: str):
    x = torch.randn(4, 3, 32, 32)
    return group_channels(trace(randomize_bn(get_model(name)), x)).graph_module, x


def inner_owner(gm, gid: int) -> str:
    (owner,) = [m.module for m in groups_of(gm)[gid].members if m.role == "out"]
    return owner


@pytest.mark.parametrize("name,blocks", [("resnet20", 9), ("resnet20-b", 9), ("wrn-16-2", 6)])
def test_each_residual_block_inner_group_is_droppable(name, blocks):
    gm, _ = grouped(name)
    dropped = droppable_groups(gm)
    assert len(dropped) == blocks
    assert all(inner_owner(gm, g).endswith(".conv1") for g in dropped)


class Plain(nn.Module):
    """conv -> bn -> relu -> conv -> pool -> fc: no residual add to absorb a constant."""

    def __init__(self):
        super().__init__()
        self.a, self.bn, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.Conv2d(8, 8, 3)
        self.fc = nn.Linear(8, 2)

    def forward(self, x):
        y = self.b(F.relu(self.bn(self.a(x))))
        return self.fc(F.adaptive_avg_pool2d(y, 1).flatten(1))


class BranchIntoCat(nn.Module):
    """A residual-looking branch whose output is concatenated, not added."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):
        return torch.cat([self.b(F.relu(self.a(x))), x], 1)


class ScaledOutput(nn.Module):
    """conv -> x * s with a (1, 1, 1, 1) buffer and a (1, 8, 1, 1) parameter."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.register_buffer("s", torch.full((1, 1, 1, 1), 2.0))
        self.gamma = nn.Parameter(torch.randn(1, 8, 1, 1))

    def forward(self, x):
        return F.relu(self.conv(x) * self.s * self.gamma).mean((2, 3))


def test_constants_alone_make_no_prunable_group():
    gm = group_channels(trace(ScaledOutput(), torch.randn(2, 3, 8, 8))).graph_module
    groups = groups_of(gm)
    lonely = [g for g in groups if {m.role for m in g.members} == {"const"}]
    assert lonely and all(not g.prunable for g in lonely)  # the broadcast scalar: nothing to score
    # the per-channel parameter follows the conv's channels (pinned here: they reach the output)
    (conv,) = [g for g in groups if any(m.role == "out" for m in g.members)]
    assert "const" in {m.role for m in conv.members}


class LayerScaledBranch(nn.Module):
    """conv -> bn -> relu -> conv -> ``y.mul(gamma.reshape(1, -1, 1, 1))``, concatenated (timm's
    RDNet dense block) or added to the input (a layer-scaled residual block)."""

    def __init__(self, add: bool):
        super().__init__()
        self.add = add
        self.a, self.bn, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.Conv2d(8, 3, 1)
        self.gamma = nn.Parameter(torch.linspace(0.5, 1.5, 3))

    def forward(self, x):
        y = self.b(F.relu(self.bn(self.a(x)))).mul(self.gamma.reshape(1, -1, 1, 1))
        return x + y if self.add else torch.cat([x, y], 1)


class GatedBranchIntoCat(LayerScaledBranch):
    """The branch times a live but broadcast gate, ``(N, C, 1, 1)``, then concatenated: the
    product of a constant and the gate has no spatial extent, so nothing absorbs it."""

    def __init__(self):
        super().__init__(add=False)

    def forward(self, x):
        return torch.cat([x, self.b(F.relu(self.bn(self.a(x)))) * x.mean((2, 3), keepdim=True)], 1)


class CumsumBranch(nn.Module):
    """A residual block whose branch ends in a running sum down the rows: of a per-channel
    constant that is a ramp over H, no longer one value per channel, so nothing may fold it."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 3, 1)

    def forward(self, x):
        return F.relu(x + torch.cumsum(self.b(F.relu(self.a(x))), dim=2))


@pytest.mark.parametrize("make", [Plain, BranchIntoCat, lambda: LayerScaledBranch(add=False), GatedBranchIntoCat,
                                  CumsumBranch])
def test_a_constant_nothing_can_absorb_is_not_droppable(make):
    gm = group_channels(trace(make().eval(), torch.randn(2, 3, 8, 8))).graph_module
    assert droppable_groups(gm) == frozenset()
    first = groups_of(gm).prunable[0]
    with pytest.raises(ShrinkError, match="keep no channel"):
        shrink(gm, PrunePlan({first.id: ()}))


class GroupedSecondConv(nn.Module):
    """A residual block whose second conv is grouped::

        x ─▶ a(4→8) ─▶ bn ─▶ relu ─▶ b(8→4, groups) ─▶ (+) ─▶ relu
        └──────────────────────────────────────────────┘
    """

    def __init__(self, groups: int):
        super().__init__()
        self.a, self.bn = nn.Conv2d(4, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.b = nn.Conv2d(8, 4, 3, padding=1, groups=groups)

    def forward(self, x):
        return F.relu(x + self.b(F.relu(self.bn(self.a(x)))))


@pytest.mark.parametrize("groups", [1, 2, 4])
def test_a_block_whose_second_conv_is_grouped_is_not_droppable(groups):
    """The inner group stays prunable (channel j of each of the ``groups`` groups is one unit:
    8 / groups units), but only a ``groups=1`` reader may lose all its input: a grouped conv
    cannot be left with none, and shrink refuses such a plan."""
    gm = group_channels(trace(randomize_bn(GroupedSecondConv(groups)).eval(), torch.randn(2, 4, 8, 8)))
    gm = gm.graph_module
    (inner,) = [g for g in groups_of(gm).prunable if inner_owner(gm, g.id) == "a"]
    assert inner.size == 8 // groups
    if groups == 1:
        assert droppable_groups(gm) == {inner.id}
        assert_shrunk_equals_masked(gm, torch.randn(2, 4, 8, 8), PrunePlan({inner.id: ()}))
        return
    assert droppable_groups(gm) == frozenset()
    with pytest.raises(ShrinkError, match="keep no channel"):
        shrink(gm, PrunePlan({inner.id: ()}))


def test_a_layer_scaled_residual_branch_drops_through_its_scale():
    """The branch's constant times the (static) layer scale is still a per-channel constant,
    and the residual add absorbs it; a (1, C, 1, 1) operand alone absorbs nothing (above)."""
    gm = group_channels(trace(randomize_bn(LayerScaledBranch(add=True)).eval(), torch.randn(2, 3, 8, 8)))
    gm = gm.graph_module
    (inner,) = droppable_groups(gm)
    small = assert_shrunk_equals_masked(gm, torch.randn(2, 3, 8, 8), PrunePlan({inner: ()}))
    assert not any(isinstance(m, nn.Conv2d) for m in small.modules())
    assert plan_cost(gm, PrunePlan({inner: ()}).masks(groups_of(gm))) == total_cost(small)


class ResidualMLP(nn.Module):
    """Features (N, 6) ─▶ stem (6 → 8) ─▶ h; ``relu(h + fc2(relu(fc1(h))))`` (8 → 16 → 8) ─▶ head:
    a residual block of linears, its inner group the 16 features between fc1 and fc2."""

    def __init__(self):
        super().__init__()
        self.stem, self.fc1, self.fc2, self.head = nn.Linear(6, 8), nn.Linear(8, 16), nn.Linear(16, 8), nn.Linear(8, 2)

    def forward(self, x):
        h = self.stem(x)
        return self.head(F.relu(h + self.fc2(F.relu(self.fc1(h)))))


def test_a_residual_block_of_linears_drops_to_fc2s_bias():
    """Without its 16 features fc2 computes its bias alone: the block becomes ``relu(h + b2)``,
    shrunk ≡ masked, with no fc1 or fc2 left and the cost ``plan_cost`` predicted."""
    torch.manual_seed(0)
    x = torch.randn(3, 6)
    gm = group_channels(trace(ResidualMLP().eval(), x)).graph_module
    (inner,) = droppable_groups(gm)
    assert inner_owner(gm, inner) == "fc1" and groups_of(gm)[inner].size == 16
    small = assert_shrunk_equals_masked(gm, x, PrunePlan({inner: ()}))
    assert [name for name, m in small.named_modules() if isinstance(m, nn.Linear)] == ["stem", "head"]
    assert plan_cost(gm, PrunePlan({inner: ()}).masks(groups_of(gm))) == total_cost(small)


class PaddedBranch(nn.Module):
    """A residual block whose branch pads its channels: ``a`` (4 → 6), two zero channels
    (``F.pad``), ``b`` (8 → 4). a's 6 channels share their values with the zeros; the zeros
    have no producer."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(4, 6, 3, padding=1), nn.Conv2d(8, 4, 3, padding=1)

    def forward(self, x):
        return F.relu(x + self.b(F.pad(F.relu(self.a(x)), (0, 0, 0, 0, 1, 1))))


@pytest.mark.parametrize("make, x", [(PaddedBranch, torch.randn(2, 4, 8, 8)), (ResidualMLP, torch.randn(2, 5, 6))],
                         ids=["padded-branch", "mlp-on-tokens"])
def test_a_branch_that_folding_cannot_rebuild_is_not_droppable(make, x):
    """A padded branch: a's channels live in values that carry the pad's zeros too, and the
    zeros' group has no producer to drop. An MLP on tokens (N, T, C): its channels sit at dim 2,
    where folding's ``(1, C, 1, …)`` constants do not fit. Neither has a droppable group, though
    both have prunable ones."""
    gm = group_channels(trace(make().eval(), x)).graph_module
    assert len(groups_of(gm).prunable) >= 1
    assert droppable_groups(gm) == frozenset()


@pytest.mark.parametrize("name", ["resnet20", "resnet20-b", "wrn-16-2"])
def test_dropped_blocks_equal_the_masked_model_and_cost_what_was_planned(name):
    gm, x = grouped(name)
    dropped = sorted(droppable_groups(gm))
    plan = PrunePlan({g: () for g in dropped[::2]})
    small = assert_shrunk_equals_masked(gm, x, plan)
    assert plan_cost(gm, plan.masks(groups_of(gm))) == total_cost(small)
    convs = [m for m in small.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == sum(isinstance(m, nn.Conv2d) for m in gm.modules()) - 2 * len(dropped[::2])
    # the constants are ordinary buffers; the survivors can be dropped next
    assert sum(name.endswith("_constant") for name, _ in small.named_buffers()) == len(dropped[::2])
    assert len(droppable_groups(small)) == len(dropped) - len(dropped[::2])


class BiasedBlocks(nn.Module):
    """Two residual blocks whose convs carry biases (no BN after the second conv in block 0, a
    BN in block 1)::

        x ─▶ stem(3→8, bias) ─▶ [ conv_a(8→8, bias) ─▶ relu ─▶ conv_b(8→8, bias) (─▶ BN) ─▶ (+) ─▶ relu ] × 2
                             └─────────────────────────────────────────────────────┘
    """

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.a = nn.ModuleList(nn.Conv2d(8, 8, 3, padding=1) for _ in range(2))
        self.b = nn.ModuleList(nn.Conv2d(8, 8, 3, padding=1) for _ in range(2))
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        x = self.stem(x)
        for i in range(2):
            y = self.b[i](F.relu(self.a[i](x)))
            x = F.relu(x + (self.bn(y) if i == 1 else y))
        return self.fc(x.mean((2, 3)))


@pytest.mark.parametrize("block", [0, 1])
def test_a_dropped_block_keeps_its_conv_bias(block):
    """Dropping block ``block`` (its inner group emptied) leaves ``relu(x + c)`` with ``c`` the
    second conv's bias, through the BN in eval mode where there is one: the depth-pruned model
    equals the masked original, and the folded buffer is that constant exactly."""
    torch.manual_seed(0)
    model = randomize_bn(BiasedBlocks()).eval()
    for conv in (*model.a, *model.b):
        nn.init.uniform_(conv.bias, 0.5, 1.5)  # nonzero: a missing bias changes every output
    x = torch.randn(4, 3, 8, 8)
    gm = group_channels(trace(model, x)).graph_module
    inner = {inner_owner(gm, g): g for g in droppable_groups(gm)}
    assert set(inner) == {"a.0", "a.1"}
    small = assert_shrunk_equals_masked(gm, x, PrunePlan({inner[f"a.{block}"]: ()}))
    b, bn = model.b[block].bias.detach(), model.bn
    c = b if block == 0 else (b - bn.running_mean) / torch.sqrt(bn.running_var + bn.eps) * bn.weight + bn.bias
    (const,) = [v for n, v in small.named_buffers() if n.endswith("_constant")]
    torch.testing.assert_close(const, c.detach().reshape(1, 8, 1, 1), rtol=0, atol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(small(x), forward_dropping(model, x, block, const), rtol=0, atol=1e-5)


def forward_dropping(model: BiasedBlocks, x: torch.Tensor, block: int, c: torch.Tensor) -> torch.Tensor:
    """``model(x)`` with block ``block`` computing ``relu(x + c)``."""
    x = model.stem(x)
    for i in range(2):
        if i == block:
            x = F.relu(x + c)
            continue
        y = model.b[i](F.relu(model.a[i](x)))
        x = F.relu(x + (model.bn(y) if i == 1 else y))
    return model.fc(x.mean((2, 3)))


def test_bottleneck_blocks_drop_with_their_first_conv():
    # torchvision Bottleneck: conv1 -> conv2 -> conv3; conv3's input group is droppable (conv1's
    # is not: a constant would reach conv3), and dropping it leaves conv1 feeding nothing
    gm = group_channels(trace(randomize_bn(tvm.resnet50()), torch.randn(2, 3, 64, 64))).graph_module
    dropped = sorted(droppable_groups(gm))
    assert len(dropped) == 16 and all(inner_owner(gm, g).endswith(".conv2") for g in dropped)
    plan = PrunePlan({g: () for g in dropped[1::3]})
    small = assert_shrunk_equals_masked(gm, torch.randn(2, 3, 64, 64), plan)
    assert plan_cost(gm, plan.masks(groups_of(gm))) == total_cost(small)
    names = {n for n, m in small.named_modules() if isinstance(m, nn.Conv2d)}
    assert not any(f"{inner_owner(gm, g)[: -len('conv2')]}conv1" in names for g in dropped[1::3])


def test_a_dropped_blocks_constant_is_pruned_with_its_stream():
    gm, x = grouped("resnet20")
    small = shrink(gm, PrunePlan({g: () for g in sorted(droppable_groups(gm))[:3]})).graph_module
    const = [g for g in groups_of(small).prunable if any(m.role == "const" for m in g.members)]
    assert len(const) == 1  # the stage-1 stream: all three constants are added to it
    plan = random_plan(small, fraction=0.5, generator=torch.Generator().manual_seed(0))
    smaller = assert_shrunk_equals_masked(small, x, plan)
    kept = len(plan.keep[const[0].id])
    assert {b.shape for n, b in smaller.named_buffers() if n.endswith("_constant")} == {(1, kept, 1, 1)}


def test_block_granularity_only_drops_whole_blocks_and_meets_the_target():
    gm, _ = grouped("resnet20")
    target = Target(macs=0.6, granularity="block")
    plan = select_plan(gm, magnitude_scores(gm), target)
    assert plan.keep and all(k == () for k in plan.keep.values())
    assert set(plan.keep) <= droppable_groups(gm)
    ratio = plan_cost(gm, plan.masks(groups_of(gm))).macs / total_cost(gm).macs
    assert 0.5 < ratio <= 0.6


def test_whole_group_scores_decide_which_blocks_go():
    gm, _ = grouped("resnet20")
    dropped = sorted(droppable_groups(gm))
    scores = {g.id: torch.ones(g.size) for g in groups_of(gm).prunable}
    whole = {g: 1.0 for g in dropped}
    whole[dropped[-1]] = 0.0  # the last stage-3 block costs nothing to remove
    plan = select_plan(gm, Ranking(scores, whole=whole, per_cost=True), Target(macs=0.97, granularity="block"))
    assert set(plan.keep) == {dropped[-1]}


def test_granularity_validates():
    with pytest.raises(ValueError, match="granularity"):
        Target(macs=0.5, granularity="layer")


def test_constant_adds_become_exact_depthwise_convs():
    gm, x = grouped("resnet20")
    small = shrink(gm, PrunePlan({g: () for g in sorted(droppable_groups(gm))[:4]})).graph_module
    rewritten = copy.deepcopy(small)
    assert constant_adds_as_convs(rewritten) == 4
    assert not any(n.op == "get_attr" for n in rewritten.graph.nodes)
    torch.testing.assert_close(rewritten(x), small(x), rtol=0, atol=1e-6)


@pytest.mark.parametrize("backend", ["fx", "pt2e"])
def test_depth_pruned_model_quantizes_and_exports(backend, tmp_path):
    gm, x = grouped("resnet20")
    small = shrink(gm, PrunePlan({g: () for g in sorted(droppable_groups(gm))[::2]})).graph_module
    data = [(torch.randn(16, 3, 32, 32), torch.randint(0, 10, (16,))) for _ in range(4)]
    q = quantize(small, x[:2], data, QuantizeOptions(backend=backend, mode="ptq", calibration_batches=4))
    report = export(q, x[:2], tmp_path / "m.onnx", inputs=torch.randn(64, 3, 32, 32),
                    options=ExportOptions(fp32_reference=False))
    # FX does not observe get_attr constants: each block's `x + c` becomes a 1x1 depthwise conv
    extra = 5 if backend == "fx" else 0
    assert report.op_counts.get("QLinearConv", 0) == 19 - 2 * 5 + extra
    assert report.op_counts.get("QLinearAdd", 0) == 9 - extra
    assert "Add" not in report.op_counts  # no add left in float between DQ and Q
    assert report.argmax_agreement >= 0.95
    # PT2E's `x + c` reaches the file as a constant tiled to the block's [1, C, H, W]
    # (export.tile_channel_constants: onnxruntime's channels-last QLinearAdd is ~30x slower on
    # a [1, C, 1, 1] one); FX's became convs
    # the dropped blocks, every second of ResNet-20's nine: two of 16x32x32, one of 32x16x16, two of 64x8x8
    tiled = [[1, 16, 32, 32]] * 2 + [[1, 32, 16, 16]] + [[1, 64, 8, 8]] * 2
    assert constant_add_shapes(tmp_path / "m.onnx") == ([] if backend == "fx" else tiled)


def constant_add_shapes(path) -> list[list[int]]:
    """The shapes of the initializers that reach an Add of ``path`` through DequantizeLinear."""
    import onnx

    model = onnx.load(str(path))
    init = {t.name: list(t.dims) for t in model.graph.initializer}
    dq = {n.output[0]: n.input[0] for n in model.graph.node if n.op_type == "DequantizeLinear"}
    return [init[dq[i]] for n in model.graph.node if n.op_type == "Add" for i in n.input if dq.get(i) in init]


def test_tiling_a_channel_constant_changes_no_output():
    """tile_channel_constants on a hand-made QDQ graph: ORT's output is bit-identical; a
    constant two ops share gets one tiled copy, and the untiled one is gone."""
    import onnxruntime as ort
    from ehap_fx.passes.export import tile_channel_constants
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(np.array(0.05, np.float32), "s"),
             numpy_helper.from_array(np.array(128, np.uint8), "z"),
             numpy_helper.from_array(rng.integers(0, 256, (1, 8, 1, 1)).astype(np.uint8), "c"),
             numpy_helper.from_array(rng.integers(0, 256, (1, 8, 1, 1)).astype(np.uint8), "shared"),
             numpy_helper.from_array(rng.standard_normal((8, 1, 1)).astype(np.float32), "f")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["xd"]),
             helper.make_node("DequantizeLinear", ["c", "s", "z"], ["cd"]),
             helper.make_node("Add", ["xd", "cd"], ["sum"]),
             helper.make_node("DequantizeLinear", ["shared", "s", "z"], ["sd"]),
             helper.make_node("Mul", ["sum", "sd"], ["prod"]),
             helper.make_node("Sub", ["prod", "sd"], ["p"]),
             # a float constant quantized in the graph, with Constant-node scale and zero point
             # (as the TorchScript exporter writes them)
             helper.make_node("Constant", [], ["cs"], value=numpy_helper.from_array(np.array(0.05, np.float32))),
             helper.make_node("Constant", [], ["cz"], value=numpy_helper.from_array(np.array(128, np.uint8))),
             helper.make_node("QuantizeLinear", ["f", "cs", "cz"], ["fq"]),
             helper.make_node("DequantizeLinear", ["fq", "cs", "cz"], ["fd"]),
             helper.make_node("Add", ["fd", "p"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 8, 5, 7])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    x = rng.standard_normal((3, 8, 5, 7)).astype(np.float32)

    def run(m):
        return ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]

    before = run(model)
    assert tile_channel_constants(model) == 4
    init = {t.name: list(t.dims) for t in model.graph.initializer}
    assert init == {"s": [], "z": [], "c_tiled_5x7": [1, 8, 5, 7], "shared_tiled_5x7": [1, 8, 5, 7],
                    "f_tiled_5x7": [1, 8, 5, 7]}
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("DequantizeLinear") == 4 and ops.count("QuantizeLinear") == 2  # x's, c's, shared's, f's
    np.testing.assert_array_equal(run(model), before)
