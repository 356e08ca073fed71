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
