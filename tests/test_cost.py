"""Cost pass: MACs and parameters, cross-checked with Torch-Pruning's counter and known figures."""

import dataclasses

import pytest
import torch
import torchvision.models as tvm
from ehap_fx.passes.cost import Cost, NodeCost, plan_cost, total_cost
from ehap_fx.passes.group import group_channels, groups_of
from ehap_fx.passes.shrink import PrunePlan, shrink
from ehap_fx.passes.trace import trace
from torch import nn

from ehap_fx import _meta
from ehap_fx.models import get_model
from tests.nets import CountedNet, counted_net_cost


def conv_linear_macs(gm):
    total_cost(gm)
    return sum(
        n.meta[_meta.COST].macs
        for n in gm.graph.nodes
        if n.op == "call_module" and isinstance(gm.get_submodule(n.target), (nn.Conv2d, nn.Linear))
    )


def test_resnet56_matches_published_figures():
    # He et al. / DepGraph: ResNet-56 (option A) has 0.85M parameters and about 125M MACs
    gm = trace(get_model("resnet56").eval(), torch.randn(1, 3, 32, 32))
    cost = total_cost(gm)
    assert cost.params == 853_018
    assert conv_linear_macs(gm) == 125_485_706
    assert 125e6 < cost.macs < 128e6  # plus BN, ReLU and pooling, counted as Torch-Pruning does


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2", "vgg11_bn", "resnext50_32x4d"])
def test_matches_torch_pruning_per_module(name):
    tp = pytest.importorskip("torch_pruning")
    model = getattr(tvm, name)(num_classes=10).eval()
    x = torch.randn(1, 3, 64, 64)
    ops, params, layer_ops, _ = tp.utils.count_ops_and_params(model, x, layer_wise=True)
    gm = trace(model, x)
    cost = total_cost(gm)
    assert cost.params == params == sum(p.numel() for p in model.parameters())
    ours = {}
    for n in gm.graph.nodes:
        if n.op == "call_module" and _meta.COST in n.meta:
            ours[n.target] = ours.get(n.target, 0) + n.meta[_meta.COST].macs
    for qualname, module in model.named_modules():
        if layer_ops.get(module) and qualname in ours:
            assert ours[qualname] == layer_ops[module], qualname
    functional = sum(
        n.meta[_meta.COST].macs for n in gm.graph.nodes if n.op != "call_module" and _meta.COST in n.meta
    )
    assert cost.macs == ops + functional  # Torch-Pruning does not count functional ops


# CountedNet (tests/nets.py): each formula once, counted by hand in counted_net_cost
@pytest.mark.parametrize("kept", [(8, 4), (4, 2), (5, 1)])
def test_costs_equal_hand_counted_macs_for_a_plan_and_after_shrinking(kept):
    gm = group_channels(trace(CountedNet().eval(), torch.randn(2, 3, 8, 8))).graph_module
    a, b = sorted(groups_of(gm).prunable, key=lambda g: -g.size)
    assert (a.size, b.size) == (8, 4)
    plan = PrunePlan({a.id: tuple(range(8 - kept[0], 8)), b.id: tuple(range(kept[1]))})
    macs, params = counted_net_cost(*kept)
    assert plan_cost(gm, plan.masks(groups_of(gm))) == Cost(macs, params)
    assert total_cost(shrink(gm, plan).graph_module) == Cost(macs, params)
    if kept == (8, 4):
        assert (macs, params) == (18_265, 373) and total_cost(gm) == Cost(macs, params)
        conv = next(n for n in gm.graph.nodes if n.target == "a")
        assert conv.meta[_meta.COST] == NodeCost(8 * 8 * (9 * 3 * 8 + 8), 9 * 3 * 8 + 8)
        with pytest.raises(dataclasses.FrozenInstanceError):  # analysis in meta: frozen values
            conv.meta[_meta.COST].macs = 0
        assert params == sum(p.numel() for p in CountedNet().parameters())


class NormsNet(nn.Module):
    """Model under test: the norm and transposed-conv formulas, and a linear on (N, T, F)::

        x (3, 8, 8) ─▶ conv 3x3 (4) ─▶ InstanceNorm (no affine) ─▶ GroupNorm(2) ─▶ ConvTranspose 2x2/2 (2, 16, 16)
          ─▶ flatten(2) (2, 256) ─▶ LayerNorm(256) ─▶ fc 256 → 3 on each of the 2 rows"""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.inorm = nn.InstanceNorm2d(4)
        self.gn = nn.GroupNorm(2, 4)
        self.up = nn.ConvTranspose2d(4, 2, 2, stride=2)
        self.ln = nn.LayerNorm(256)
        self.fc = nn.Linear(256, 3)

    def forward(self, x):
        return self.fc(self.ln(self.up(self.gn(self.inorm(self.conv(x)))).flatten(2)))


def test_norms_transposed_conv_and_row_linear_equal_hand_counted_macs():
    gm = trace(NormsNet().eval(), torch.randn(2, 3, 8, 8))
    total_cost(gm)
    by_node = {n.target: n.meta[_meta.COST] for n in gm.graph.nodes if _meta.COST in n.meta}
    assert by_node == {
        "conv": NodeCost(8 * 8 * 9 * 3 * 4, 9 * 3 * 4),
        "inorm": NodeCost(4 * 8 * 8, 0),  # no affine: one op per element, no parameters
        "gn": NodeCost(2 * 4 * 8 * 8, 2 * 4),
        # each of the 8x8 input elements meets 2x2 x 2 weights; the bias once per output element
        "up": NodeCost(8 * 8 * 2 * 2 * 4 * 2 + 16 * 16 * 2, 2 * 2 * 4 * 2 + 2),
        "ln": NodeCost(2 * 2 * 256, 2 * 256),  # its parameters: weight and bias over normalized_shape
        "fc": NodeCost(2 * 256 * 3 + 3, 256 * 3 + 3),  # 2 rows; the bias counted once, as ptflops does
    }
    assert total_cost(gm).params == sum(p.numel() for p in gm.parameters())
    assert all(type(c.macs) is int and type(c.params) is int for c in by_node.values())  # counts, not floats


def test_an_export_capture_costs_what_the_hand_count_says():
    """CountedNet through torch.export (``aten.batch_norm``, ``aten.max_pool2d``, ...): the same
    18,265 MACs and 373 parameters as the module graph, counted by hand in ``counted_net_cost``."""
    gm = trace(CountedNet().eval(), torch.randn(2, 3, 8, 8), capture="export")
    assert total_cost(gm) == Cost(*counted_net_cost(8, 4)) == Cost(18_265, 373)


class LayerScaleNet(nn.Module):
    """conv a (8) ─▶ channels-last ─▶ x * gamma (a (8,) parameter) ─▶ channels-first ─▶ conv b (4)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.gamma = nn.Parameter(torch.rand(8) + 0.5)
        self.b = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.b((self.a(x).permute(0, 2, 3, 1) * self.gamma).permute(0, 3, 1, 2))


@pytest.mark.parametrize("kept", [8, 5])
def test_a_layer_scale_parameter_is_counted_and_loses_the_pruned_channels(kept):
    gm = group_channels(trace(LayerScaleNet().eval(), torch.randn(2, 3, 6, 6))).graph_module
    (group,) = [g for g in groups_of(gm).prunable if g.size == 8]
    plan = PrunePlan({group.id: tuple(range(kept))})
    params = (27 * kept + kept) + kept + (kept * 4 + 4)  # conv a, gamma, conv b
    assert plan_cost(gm, plan.masks(groups_of(gm))).params == params
    assert total_cost(shrink(gm, plan).graph_module).params == params


def test_unknown_modules_count_their_parameters_and_stale_costs_are_dropped():
    class Head(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 1, bias=False)
            self.bi = nn.Bilinear(4, 4, 2)  # no formula: its parameters only

        def forward(self, x):
            h = self.conv(x).mean((2, 3))
            return self.bi(h, h)

    gm = trace(Head().eval(), torch.randn(2, 3, 4, 4))
    assert total_cost(gm) == Cost(4 * 4 * 3 * 4, 3 * 4 + (4 * 4 * 2 + 2))
    bi = next(n for n in gm.graph.nodes if n.target == "bi")
    assert bi.meta[_meta.COST] == NodeCost(0, 4 * 4 * 2 + 2)
    # count_cost rewrites every node's entry: a stale cost on a node that costs nothing goes
    mean = next(n for n in gm.graph.nodes if n.target == "mean")
    mean.meta[_meta.COST] = NodeCost(10**6, 10**6)
    assert total_cost(gm) == Cost(4 * 4 * 3 * 4, 3 * 4 + (4 * 4 * 2 + 2))
    assert _meta.COST not in mean.meta



@pytest.mark.parametrize("slopes", [4, 1])
def test_prelu_counts_its_parameters(slopes):
    """Found by the #29 mutation work: PReLU's row counted its MACs but not its slopes. A
    per-channel PReLU loses the slopes of pruned channels; a shared one keeps its one."""
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.PReLU(slopes), nn.Conv2d(4, 2, 1)).eval()
    gm = group_channels(trace(model, torch.randn(2, 3, 4, 4))).graph_module
    assert total_cost(gm).params == (3 * 4 + 4) + slopes + (4 * 2 + 2)
    (g,) = groups_of(gm).prunable
    small = shrink(gm, PrunePlan({g.id: (0, 2, 3)})).graph_module
    assert total_cost(small).params == (3 * 3 + 3) + (3 if slopes == 4 else 1) + (3 * 2 + 2)
    assert sum(p.numel() for p in small.parameters()) == total_cost(small).params
    if slopes == 4:  # down to two channels: two slopes (not one, as a shared slope would be)
        two = shrink(gm, PrunePlan({g.id: (1, 2)})).graph_module
        assert total_cost(two).params == (3 * 2 + 2) + 2 + (2 * 2 + 2) == sum(p.numel() for p in two.parameters())


@pytest.mark.parametrize("slopes", [4, 1])
def test_prelu_costs_one_mac_per_output_element(slopes):
    """A PReLU multiplies each element by its slope: C · H · W MACs per sample, either way."""
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.PReLU(slopes), nn.Conv2d(4, 2, 1)).eval()
    gm = group_channels(trace(model, torch.randn(2, 3, 5, 5))).graph_module
    total_cost(gm)
    (node,) = [n for n in gm.graph.nodes if n.op == "call_module" and n.target == "1"]
    assert node.meta[_meta.COST].macs == 4 * 5 * 5


class _FunctionalLinears(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc0, self.fc1 = nn.Linear(6, 8), nn.Linear(8, 3)

    def forward(self, x):
        h = torch.relu(nn.functional.linear(x, self.fc0.weight, self.fc0.bias))
        return nn.functional.linear(h, self.fc1.weight, self.fc1.bias)


def test_a_core_aten_addmm_counts_its_input_features_not_its_bias():
    """Core ATen writes a linear as ``addmm(bias, x, weight.T)``: its MACs are ``in · out`` plus
    the bias adds, ``in`` read from ``x`` (the first argument is the bias, of ``out`` elements)."""
    x = torch.randn(2, 6)
    ep = torch.export.export(_FunctionalLinears().eval(), (x,)).run_decompositions()
    gm = group_channels(trace(ep, x)).graph_module
    total = total_cost(gm)
    addmms = [n.meta[_meta.COST] for n in gm.graph.nodes if n.target is torch.ops.aten.addmm.default]
    assert addmms == [NodeCost(6 * 8 + 8, 6 * 8 + 8), NodeCost(8 * 3 + 3, 8 * 3 + 3)]
    assert total == Cost(macs=56 + 8 + 27, params=56 + 27)  # + the relu's 8


class _TwoViews(nn.Module):
    """Two images in a list or a dict ─▶ the same conv a (3 → 4, 1x1) on each ─▶ their sum."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 1)

    def forward(self, xs):
        return self.a(xs[0]) + self.a(xs[1])


@pytest.mark.parametrize("container", [list, lambda views: dict(enumerate(views))], ids=["list", "dict"])
def test_a_list_input_is_costed_per_sample_whatever_the_batch(container):
    """Per sample: two 1x1 conv calls of 4·3·25 MACs and 4·25 for the bias each (the add counts
    nothing): 800 MACs at batch 1 and at batch 3, in either capture."""
    costs = {}
    for capture in ("fx", "export"):
        for n in (1, 3):
            xs = container([torch.randn(n, 3, 5, 5), torch.randn(n, 3, 5, 5)])
            costs[capture, n] = total_cost(trace(_TwoViews().eval(), (xs,), capture=capture)).macs
    assert costs["export", 1] == costs["export", 3] == 800
    assert costs["fx", 1] == costs["fx", 3] == 800


class _ScalarHead(nn.Module):
    """fc (6 → 1) ─▶ squeeze(1): one value per sample, ``(N,)`` ─▶ relu."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 1)

    def forward(self, x):
        return torch.relu(self.fc(x).squeeze(1))


class _PositionTable(nn.Module):
    """A learned table of 5 positions (5, 8) ─▶ embed, a linear (8 → 4) ─▶ added to x (N, 5, 4)."""

    def __init__(self):
        super().__init__()
        self.pos, self.embed = nn.Parameter(torch.randn(5, 8)), nn.Linear(8, 4)

    def forward(self, x):
        return x + self.embed(self.pos)


@pytest.mark.parametrize("batch", [2, 3])
def test_a_dim_0_that_is_no_multiple_of_the_batch_counts_one_row(batch):
    """The linear reads the (5, 8) table, whose dim 0 is no multiple of the batch (2 or 3): it
    counts one row, 8·4 MACs and 4 bias adds (``_rows_per_sample``'s rule: only a dim 0 of
    k·N rows counts k rows per sample); its parameters are the table's 40 and the linear's 36."""
    gm = trace(_PositionTable().eval(), torch.randn(batch, 5, 4), capture="fx")
    assert total_cost(gm) == Cost(8 * 4 + 4, 5 * 8 + 8 * 4 + 4)


@pytest.mark.parametrize("capture", ["fx", "export"])
def test_an_activation_on_one_value_per_sample_is_costed(capture):
    """The linear's 6 MACs and its bias, and one MAC for the ReLU of its one value per sample."""
    gm = trace(_ScalarHead().eval(), torch.randn(3, 6), capture=capture)
    cost = total_cost(gm)
    assert cost.params == 7 and cost.macs == 8


class _TokenSDPA(nn.Module):
    """q, k (8 → 4), v (8 → 6) on tokens (N, T, 8), one head, no head dim ─▶ scaled_dot_product_attention
    ─▶ (N, T, 6) ─▶ mean over T ─▶ ``@ w``, a (6, 3) parameter: a matmul of two 2-D values."""

    def __init__(self):
        super().__init__()
        self.q, self.k, self.v = nn.Linear(8, 4), nn.Linear(8, 4), nn.Linear(8, 6)
        self.w = nn.Parameter(torch.randn(6, 3))

    def forward(self, x):
        y = torch.nn.functional.scaled_dot_product_attention(self.q(x), self.k(x), self.v(x))
        return y.mean(1) @ self.w


def test_three_dim_attention_and_a_two_dim_matmul_are_counted_as_flop_counter_does():
    """The attention of (N, 10, ·) tokens without a head dim: 10·10·(4 + 6) MACs per sample;
    the (N, 6) @ (6, 3) matmul 6·3 per sample. Both as ``FlopCounterMode`` counts them (its FLOPs
    are 2 per MAC, for the batch of 2)."""
    from torch.utils.flop_counter import FlopCounterMode

    gm = trace(_TokenSDPA().eval(), torch.randn(2, 10, 8), capture="fx")
    total_cost(gm)
    macs = {str(n.target): n.meta[_meta.COST].macs for n in gm.graph.nodes
            if n.op == "call_function" and _meta.COST in n.meta}
    with torch.no_grad(), FlopCounterMode(display=False) as attention:
        torch.nn.functional.scaled_dot_product_attention(torch.randn(2, 10, 4), torch.randn(2, 10, 4),
                                                         torch.randn(2, 10, 6))
    with torch.no_grad(), FlopCounterMode(display=False) as matmul:
        torch.randn(2, 6) @ torch.randn(6, 3)
    assert attention.get_total_flops() // 2 // 2 == 10 * 10 * (4 + 6) and matmul.get_total_flops() // 2 // 2 == 6 * 3
    assert macs == {"<built-in function scaled_dot_product_attention>": 10 * 10 * (4 + 6),
                    "<built-in function matmul>": 6 * 3}


class _Einsum(nn.Module):
    """fc (3 → 6) ─▶ y (N, 6), viewed as (N, *view) ─▶ one einsum of ``y`` (``equation``,
    ``operands`` copies of y)."""

    def __init__(self, equation: str, operands: int, view: tuple = (6,)):
        super().__init__()
        self.fc, self.equation, self.operands, self.view = nn.Linear(3, 6), equation, operands, view

    def forward(self, x):
        y = self.fc(x).reshape(-1, *self.view)
        return torch.einsum(self.equation, *[y] * self.operands)


@pytest.mark.parametrize("equation,operands,view", [
    ("bk->kb", 1, (6,)), ("...k,...k->...", 2, (6,)), ("...k,...k->...", 2, (1, 2, 3)), ("bk,bj", 2, (6,)),
    ("bi,bj,bk->bijk", 3, (6,)), ("bk,bk->", 2, (6,))],
    ids=["one-operand", "ellipsis", "ellipsis-of-four-letters", "implicit-output", "three-operands", "scalar-output"])
def test_an_einsum_of_another_form_than_two_operands_to_an_output_is_not_counted(equation, operands, view):
    """Only ``"xy,yz->xz"``-like einsums of two operands are counted (``_einsum``'s docstring):
    one operand, ``...``, an implicit or empty output, three operands cost nothing, and the graph
    costs the linear's 3·6 + 6 MACs alone."""
    gm = trace(_Einsum(equation, operands, view).eval(), torch.randn(2, 3), capture="fx")
    assert total_cost(gm) == Cost(3 * 6 + 6, 3 * 6 + 6)
    (einsum,) = [n for n in gm.graph.nodes if n.target is torch.einsum]
    assert einsum.meta[_meta.COST] == NodeCost(0, 0)


class _Tables(nn.Module):
    """fc (8 → 4, no bias) of x (N, 8), and ``m @ v``: m (N, 3, 6), v a (6,) parameter vector
    (a batched matrix-vector product)."""

    def __init__(self):
        super().__init__()
        self.fc, self.v = nn.Linear(8, 4, bias=False), nn.Parameter(torch.randn(6))

    def forward(self, x, m):
        return self.fc(x), m @ self.v


def test_a_linear_without_bias_and_a_matrix_vector_product_are_counted_by_hand():
    """fc: 8·4 MACs and parameters, no bias; ``(N, 3, 6) @ (6,)``: 3 outputs of 6 MACs each per
    sample, and v's 6 parameters."""
    gm = trace(_Tables().eval(), (torch.randn(2, 8), torch.randn(2, 3, 6)), capture="fx")
    assert total_cost(gm) == Cost(8 * 4 + 3 * 6, 8 * 4 + 6)


class _RowsTimesVector(nn.Module):
    """fc (3 → 6) ─▶ y (N, 6) ─▶ ``y @ v``, v a (6,) parameter: one value per sample (N,)."""

    def __init__(self):
        super().__init__()
        self.fc, self.v = nn.Linear(3, 6), nn.Parameter(torch.randn(6))

    def forward(self, x):
        return self.fc(x) @ self.v


def test_a_batch_of_rows_times_a_vector_costs_the_same_per_sample_at_any_batch():
    """``(N, 6) @ (6,)`` takes at most 6 MACs per sample, whatever N (the output's one dim is the
    batch, not a channel dim); the graph costs the linear's 3·6 + 6 besides, per sample."""
    costs = []
    for batch in (2, 3):
        gm = trace(_RowsTimesVector().eval(), torch.randn(batch, 3), capture="fx")
        costs.append(total_cost(gm))
        (mv,) = [n for n in gm.graph.nodes if _meta.COST in n.meta and n.op == "call_function"]
        assert mv.meta[_meta.COST].macs <= 6
    assert costs[0] == costs[1] and costs[0].params == 3 * 6 + 6 + 6
    assert 3 * 6 + 6 <= costs[0].macs <= 3 * 6 + 6 + 6


class _OnlyAScalar(nn.Module):
    """A (4, 8) table times ``t``, the graph's one input, 0-d ─▶ tab (8 → 2) on its 4 rows."""

    def __init__(self):
        super().__init__()
        self.table, self.tab = nn.Parameter(torch.randn(4, 8)), nn.Linear(8, 2)

    def forward(self, t):
        return self.tab(self.table * t)


def test_a_graph_whose_one_input_is_0_d_has_a_batch_of_one():
    """No input has a batch dim: the batch is 1, so the linear's 4 rows of dim 0 are 4 rows per
    sample: 4·(8·2 + 2) MACs."""
    gm = trace(_OnlyAScalar().eval(), (torch.tensor(2.0),), capture="fx")
    cost = total_cost(gm)
    assert cost.params == 4 * 8 + 8 * 2 + 2
    (tab,) = [n for n in gm.graph.nodes if n.target == "tab"]
    assert tab.meta[_meta.COST].macs == 4 * (8 * 2 + 2)
