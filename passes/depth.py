"""Depth pruning: which channel groups may go entirely, by dropping the branch they live in.

A residual block whose inner group loses every channel computes its last conv's bias alone, a
per-channel constant ``c``: the block becomes ``relu(x + c)``. :func:`droppable_groups` finds
where that is legal (``Target(granularity="block")``), :func:`folded_nodes` the nodes a plan
turns into constants (``shrink`` folds them into buffers, ``cost`` counts them). Reads the
``node.meta`` of ``passes.group.group_channels``; writes nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from types import SimpleNamespace

import torch
from ehap_fx.passes._layers import functional_conv, functional_linear_spec, layer_tensor
from ehap_fx.passes.coupling import is_binary, is_pointwise
from ehap_fx.passes.group import ChannelGroup, ChannelSlots, groups_of, same_dim
from torch import fx, nn

from ehap_fx import _meta

CONV_OR_LINEAR = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def conv_or_linear(gm: fx.GraphModule, node: fx.Node) -> SimpleNamespace | None:
    """The conv/linear ``node`` computes, in any capture: ``input`` (its activation),
    ``bias`` (None without one), ``groups`` and ``dim`` (the channel dim of its input, 1 or
    -1); None for any other node. An ``nn.Conv*d`` / ``nn.Linear`` call, or a functional one on
    one module's tensors (``F.conv2d`` in a conv subclass's ``forward``, a torch.export graph's
    ``aten.conv2d`` / ``aten.convolution`` / ``aten.linear`` / ``aten.addmm``)."""
    if node.op == "call_module":
        mod = gm.get_submodule(node.target)
        if not isinstance(mod, CONV_OR_LINEAR):
            return None
        dim = -1 if isinstance(mod, nn.Linear) else 1
        return SimpleNamespace(input=node.args[0], bias=mod.bias, groups=getattr(mod, "groups", 1), dim=dim)
    if (conv := functional_conv(gm, node)) is not None:
        return SimpleNamespace(input=node.args[0], bias=conv.bias, groups=conv.groups, dim=1)
    if (spec := functional_linear_spec(gm, node)) is not None:
        return SimpleNamespace(input=spec.input, bias=spec.bias, groups=1, dim=-1)
    return None


def reads_no_channel(gm: fx.GraphModule, node: fx.Node, count: Callable[[fx.Node], int | None]) -> bool:
    """Is ``node`` a conv/linear whose input keeps no channel (``count(input) == 0``)? What a
    dropped group leaves: it then computes its bias alone, a per-channel constant."""
    layer = conv_or_linear(gm, node)
    if layer is None:
        return False
    x = layer.input
    if not isinstance(x, fx.Node) or not isinstance(slots := x.meta.get(_meta.CHANNELS), ChannelSlots):
        return False
    return same_dim(x, slots.dim, layer.dim) and count(x) == 0


def folded_value(gm: fx.GraphModule, node: fx.Node) -> torch.Tensor:
    """What the conv/linear ``node`` computes from an input with no channel: its bias (zeros
    without one) as a ``(1, C, 1, ...)`` constant, shaped for ``node``'s output."""
    shape = node.meta["tensor_meta"].shape
    bias = conv_or_linear(gm, node).bias
    bias = bias.detach() if bias is not None else torch.zeros(shape[1])
    return bias.reshape(1, -1, *[1] * (len(shape) - 2)).clone()  # (1, C, 1, ...)


def folded_nodes(gm: fx.GraphModule, count: Callable[[fx.Node], int | None]) -> list[fx.Node]:
    """The nodes that become per-channel constants under the kept channel ``count`` of each
    node, in graph order: convs/linears that read no channel (``reads_no_channel``) and the
    pointwise ops of such constants and parameters (an ATen batch norm's ``get_attr``
    statistics) only. ``shrink`` folds them into buffers."""
    constant: dict[fx.Node, None] = {}
    for node in gm.graph.nodes:
        inputs = node.all_input_nodes
        if reads_no_channel(gm, node, count) or (
            any(a in constant for a in inputs)
            and all(a in constant or a.op == "get_attr" for a in inputs)
            and is_pointwise(gm, node)
        ):
            constant[node] = None
    return list(constant)


def droppable_groups(gm: fx.GraphModule) -> frozenset[int]:
    """Prunable groups that may lose *all* their channels by dropping the branch they live in
    (depth pruning).

    A group qualifies when the values it lives in carry nothing else, only convs/linears
    (``groups=1``; modules, or functional ones on their own tensors: ``conv_or_linear``) read
    them, and what those readers compute from an empty input (their bias, a per-channel
    constant) flows through pointwise ops into a binary op with a live operand:
    the residual add of a ResNet block, whose inner group is the typical case. ``shrink`` then
    folds the constant into a buffer, and the block becomes ``relu(x + c)``.
    """
    nodes_of: dict[int, list[fx.Node]] = {}
    for n in gm.graph.nodes:
        for gid in {int(g) for s in _slots(n) for g in s.group}:
            nodes_of.setdefault(gid, []).append(n)
    return frozenset(g.id for g in groups_of(gm).prunable if _droppable(gm, g, nodes_of.get(g.id, [])))


def _droppable(gm: fx.GraphModule, group: ChannelGroup, nodes: list[fx.Node]) -> bool:
    roles = {m.role for m in group.members}
    if not roles <= {"out", "norm", "in", "const"} or not {"out", "in"} <= roles:
        return False
    inside = set(nodes)
    for n in nodes:
        if n.op == "get_attr":  # a norm's (C,) tensors in a torch.export graph
            if not all(u in inside for u in n.users):
                return False  # the parameter is read outside the branch too
            continue
        if n.op not in ("call_module", "call_function", "call_method"):
            return False
        for s in _slots(n):
            if not bool((s.group == group.id).all()):
                return False  # the value carries other channels too
            if s.dim != 1:
                return False  # folding builds (1, C, 1, ...) constants
    readers = {u for n in nodes for u in n.users if u not in inside}
    for r in readers:
        layer = conv_or_linear(gm, r)
        if layer is None or layer.groups != 1 or layer.input not in inside:
            return False
        if not all(a is layer.input or layer_tensor(gm, a) for a in r.all_input_nodes):
            return False  # it reads another activation, not just its weight and bias
    return constant_flows_into_live_ops(gm, readers)


def _slots(node: fx.Node) -> list[ChannelSlots]:
    """The channels of ``node``'s value, or of each tensor of its tuple (core ATen's batch
    norm: ``(y, mean, invstd)``, the statistics empty in eval mode)."""
    slots = node.meta.get(_meta.CHANNELS)
    if isinstance(slots, tuple):
        return [s for s in slots if isinstance(s, ChannelSlots)]
    return [slots] if isinstance(slots, ChannelSlots) else []


def constant_flows_into_live_ops(gm: fx.GraphModule, start: Iterable[fx.Node]) -> bool:
    """If the nodes ``start`` computed per-channel constants, would every use of them (through
    pointwise ops) end in a binary op with a live operand, so that folding them is legal?"""
    constant = set(start)
    stack = list(constant)
    while stack:
        for user in stack.pop().users:
            if user in constant:
                continue
            live = [a for a in user.all_input_nodes if a not in constant and a.op != "get_attr"]
            if is_pointwise(gm, user) and not live:
                constant.add(user)
                stack.append(user)
            elif not (is_binary(user) and live):
                return False  # the constant would reach a reduction, a reshape or the output
    return True
