"""Differential test: our channel partition against Torch-Pruning's DependencyGraph.

A *unit* is the set of (conv/linear, output channel) pairs that are removed together. For
six torchvision models both tools must find exactly the same units. ResNeXt differs on
purpose: Torch-Pruning leaves grouped convs' balance to the pruner (it must remove the same
number of channels from every group), we encode it in the partition (channel i of every
group is one unit), so each of our units is a union of Torch-Pruning units there.
"""

import pytest
import torch
import torchvision.models as tvm
from ehap_fx.passes.group import group_channels, groups_of, producer_slices
from ehap_fx.passes.trace import trace
from torch import nn

tp = pytest.importorskip("torch_pruning")


def torch_pruning_units(model, x):
    graph = tp.DependencyGraph().build_dependency(model, example_inputs=x)
    names = {m: n for n, m in model.named_modules()}
    head = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    units = set()
    for group in graph.get_all_groups(ignored_layers=[head], root_module_types=(nn.Conv2d, nn.Linear)):
        outs = {}
        for item in group:
            mod = item.dep.target.module
            if isinstance(mod, (nn.Conv2d, nn.Linear)) and graph.is_out_channel_pruning_fn(item.dep.handler):
                outs[names[mod]] = [int(getattr(i, "idx", i)) for i in item.idxs]
        for i in range(len(next(iter(outs.values())))):
            units.add(frozenset((name, idx[i]) for name, idx in outs.items()))
    return units


def our_units(model, x):
    gm = group_channels(trace(model, x)).graph_module
    units = set()
    for g in groups_of(gm).prunable:
        slices = list(producer_slices(g))
        for i in range(g.size):
            unit = frozenset((name, int(j)) for name, index in slices for j in index[i])
            if unit:
                units.add(unit)
    return units


def units_of(name):
    model = getattr(tvm, name)(num_classes=10).eval()
    x = torch.randn(1, 3, 64, 64)
    return torch_pruning_units(model, x), our_units(model, x)


@pytest.mark.parametrize(
    "name", ["resnet18", "resnet50", "mobilenet_v2", "mobilenet_v3_small", "densenet121", "vgg11_bn"]
)
def test_same_partition(name):
    theirs, ours = units_of(name)
    assert ours == theirs


def test_resnext_grouped_convs_are_coarser_by_design():
    theirs, ours = units_of("resnext50_32x4d")
    owner = {pair: unit for unit in ours for pair in unit}
    for unit in theirs:  # every Torch-Pruning unit lies inside one of ours
        assert len({owner[pair] for pair in unit}) == 1
    assert len(ours) < len(theirs)
    grouped = [u for u in ours if len(u) == 32 and len({name for name, _ in u}) == 1]
    assert grouped, "channel i of all 32 groups of a grouped conv should form one unit"
