"""Depth pruning: which channel groups may go entirely, by dropping the branch they live in.

A residual block whose inner group loses every channel computes its last conv's bias alone, a
per-channel constant ``c``: the block becomes ``relu(x + c)``. :func:`droppable_groups` finds
where that is legal (``Target(granularity="block")``), :func:`folded_nodes` the nodes a plan
turns into constants (``shrink`` folds them into buffers, ``cost`` counts them). Reads the
``node.meta`` of ``passes.group.group_channels``; writes nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from ehap_fx.passes._analysis import _shape
from ehap_fx.passes.coupling import is_binary, is_pointwise
from ehap_fx.passes.group import ChannelGroup, ChannelSlots, groups_of, same_dim
from torch import fx, nn

from ehap_fx import _meta

CONV_OR_LINEAR = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def reads_no_channel(gm: fx.GraphModule, node: fx.Node, count: Callable[[fx.Node], int | None]) -> bool:
    """Is ``node`` a conv/linear whose input keeps no channel (``count(input) == 0``)? What a
    dropped group leaves: it then computes its bias alone, a per-channel constant."""
    if node.op != "call_module" or not isinstance(gm.get_submodule(node.target), CONV_OR_LINEAR):
        return False
    x = node.args[0]
    if not isinstance(x, fx.Node) or not isinstance(slots := x.meta.get(_meta.CHANNELS), ChannelSlots):
        return False
    dim = -1 if isinstance(gm.get_submodule(node.target), nn.Linear) else 1
    return same_dim(x, slots.dim, dim) and count(x) == 0


def folded_nodes(gm: fx.GraphModule, count: Callable[[fx.Node], int | None]) -> list[fx.Node]:
    """The nodes that become per-channel constants under the kept channel ``count`` of each
    node, in graph order: convs/linears that read no channel (``reads_no_channel``) and the
    pointwise ops of such constants only. ``shrink`` folds them into buffers."""
    constant: dict[fx.Node, None] = {}
    for node in gm.graph.nodes:
        inputs = node.all_input_nodes
        if reads_no_channel(gm, node, count) or (
            any(a in constant for a in inputs)
            and all(a in constant or is_static(a) for a in inputs)
            and is_pointwise(gm, node)
        ):
            constant[node] = None
    return list(constant)


def is_static(node: fx.Node) -> bool:
    """Is ``node`` computed from parameters and buffers alone (a ``get_attr``, or ops of
    them such as a layer scale's ``gamma.reshape(1, -1, 1, 1)``), whatever the input?"""
    if node.op == "get_attr":
        return True
    inputs = node.all_input_nodes
    return node.op in ("call_function", "call_method") and bool(inputs) and all(is_static(a) for a in inputs)


def droppable_groups(gm: fx.GraphModule) -> frozenset[int]:
    """Prunable groups that may lose *all* their channels by dropping the branch they live in
    (depth pruning).

    A group qualifies when the values it lives in carry nothing else, only convs/linears
    (``groups=1``) read them, and what those readers compute from an empty input (their bias,
    a per-channel constant) flows through pointwise ops into a binary op with a live operand:
    the residual add of a ResNet block, whose inner group is the typical case. ``shrink`` then
    folds the constant into a buffer, and the block becomes ``relu(x + c)``.
    """
    nodes_of: dict[int, list[fx.Node]] = {}
    for n in gm.graph.nodes:
        if isinstance(s := n.meta.get(_meta.CHANNELS), ChannelSlots):
            for gid in set(s.group.tolist()):
                nodes_of.setdefault(gid, []).append(n)
    return frozenset(g.id for g in groups_of(gm).prunable if _droppable(gm, g, nodes_of.get(g.id, [])))


def _droppable(gm: fx.GraphModule, group: ChannelGroup, nodes: list[fx.Node]) -> bool:
    roles = {m.role for m in group.members}
    if not roles <= {"out", "norm", "in"} or not {"out", "in"} <= roles:
        return False
    inside = set(nodes)
    for n in nodes:
        if n.op not in ("call_module", "call_function", "call_method"):
            return False
        if not bool((n.meta[_meta.CHANNELS].group == group.id).all()):
            return False  # the value carries other channels too
        if n.meta[_meta.CHANNELS].dim != 1:
            return False  # folding builds (1, C, 1, ...) constants
    readers = {u for n in nodes for u in n.users if u not in inside}
    for r in readers:
        mod = gm.get_submodule(r.target) if r.op == "call_module" else None
        if not isinstance(mod, CONV_OR_LINEAR) or getattr(mod, "groups", 1) != 1:
            return False
        if r.all_input_nodes != [r.args[0]] or r.args[0] not in inside:
            return False
    return constant_flows_into_live_ops(gm, readers)


def constant_flows_into_live_ops(gm: fx.GraphModule, start: Iterable[fx.Node]) -> bool:
    """If the nodes ``start`` computed per-channel constants, would every use of them (through
    pointwise ops) end in a binary op with a live operand, so that folding them is legal?"""
    constant = set(start)
    stack = list(constant)
    while stack:
        for user in stack.pop().users:
            if user in constant:
                continue
            live = [a for a in user.all_input_nodes if a not in constant and not is_static(a)]
            if is_pointwise(gm, user) and not live:
                constant.add(user)  # a constant's activation, or times a layer scale
                stack.append(user)
            elif not (is_binary(user) and any(_shape(a) == _shape(user) is not None for a in live)):
                # the constant would reach a reduction, a reshape or the output, or a binary op
                # whose live operand does not give the result its shape (a broadcast scale)
                return False
    return True

