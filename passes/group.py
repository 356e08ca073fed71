"""Channel-group analysis: which channels of a traced CNN must be pruned together.

Removing output channel 3 of a conv is only legal if every tensor that carries that channel
loses it too: the BN after it, the next conv's input, the other operand of a residual add,
the matching slice of a concat, the 16 features a flatten turns it into. This pass finds those
couplings on the FX graph and partitions all channels into groups.

How it works. Every channel of every value along dim 1 gets a *label*. Producers (conv and
linear outputs, zero channels made by ``F.pad``) create fresh labels; channel-preserving ops
pass their input's labels on; ops that force channels to be equal (``add``, ``mul``, grouped
convs, group norms) union labels in a union-find. Example, an option-A ResNet stage
transition (4 → 8 channels, pad of 2 on each side)::

    x (a b c d) ──▶ x[:, :, ::2, ::2] ──▶ F.pad ──▶ (z0 z1 a b c d z2 z3) ──┐
    conv (e0 … e7) ──▶ bn ──────────────────────────────────────────────▶ add ──▶ out

The add unions ``e2≡a, e3≡b, e4≡c, e5≡d`` (these channels live in both stages: removing one
removes it everywhere) and ``e0≡z0, e1≡z1, e6≡z2, e7≡z3`` (removing one only shrinks the pad).
After propagation, each union-find root is one removable *unit*; units that touch exactly the
same parameters form a ``ChannelGroup``, whose channel ``i`` maps to ``member.index[i]`` in
each member. Here: one group of the 4 first-stage units and one of the 4 pad units; a
"same-width" analysis that treated ``pad`` as elementwise would merge them (and crash).

An op missing from the rule tables *pins* its channels (never pruned, with a reason in
``ChannelGroup.pinned``); so do graph inputs and outputs and modules excluded by the user.
Nothing is guessed.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from ehap_fx.passes._analysis import Analysis, Pin, Rules, _flat_labels, _map_meta
from ehap_fx.passes._layers import layer_tensor
from ehap_fx.passes.coupling import coupling_rules, record_rules
from torch import fx, nn
from torch.fx.passes.infra.pass_base import PassBase, PassResult
from torch.fx.passes.shape_prop import TensorMetadata

from ehap_fx import _meta
from ehap_fx.errors import GroupError

# ---------------------------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Member:
    """One place where a group's channels live.

    ``index`` has shape ``(group.size, k)``: channel ``i`` of the group is the ``k`` indices
    ``index[i]`` along ``dim`` of the member's tensor (``k > 1`` after a flatten, where one
    channel feeds ``H*W`` features of a linear layer, or in a grouped conv).

    ``role`` says what the member is: ``"out"`` output channels of a conv/linear weight
    (``dim=0``), ``"in"`` its input channels (``dim=1``), ``"norm"`` per-channel parameters
    and buffers of a norm layer (``dim=0``), ``"pad"`` zero channels made by ``F.pad``
    (``dim=1`` of the pad's output), ``"const"`` a per-channel constant ``(1, C, 1, ...)`` read
    with ``get_attr`` (``dim=1``; what a dropped residual branch leaves, see
    ``passes.depth.droppable_groups``).
    """

    node: str
    module: str | None
    role: str
    dim: int
    index: torch.Tensor


@dataclass(frozen=True)
class ChannelGroup:
    """Channels that can only be removed together; ``pinned`` says why it never is."""

    id: int
    size: int
    members: tuple[Member, ...]
    pinned: str | None = None

    @property
    def prunable(self) -> bool:
        return self.pinned is None


@dataclass(frozen=True)
class ChannelSlots:
    """Where each channel (dim ``dim``, 1 unless channels-last) of a node's output lives:
    ``group[c]``'s channel ``index[c]``."""

    group: torch.Tensor  # (C,) int64 group ids
    index: torch.Tensor  # (C,) int64 channel index within the group
    dim: int = 1  # the tensor dim these channels are (3 for a channels-last (N, H, W, C))

    def __len__(self) -> int:
        return len(self.group)


@dataclass(frozen=True)
class ChannelGroups:
    """All channel groups of a graph, stored in ``gm.meta["ehap.groups"]``."""

    groups: tuple[ChannelGroup, ...]
    exclude: tuple[str, ...] = ()  # modules the user pinned, kept for re-analysis after shrink

    def __iter__(self) -> Iterator[ChannelGroup]:
        return iter(self.groups)

    def __len__(self) -> int:
        return len(self.groups)

    def __getitem__(self, group_id: int) -> ChannelGroup:
        return self.groups[group_id]

    @property
    def prunable(self) -> tuple[ChannelGroup, ...]:
        return tuple(g for g in self.groups if g.prunable)

    @property
    def pinned(self) -> tuple[ChannelGroup, ...]:
        return tuple(g for g in self.groups if not g.prunable)

    def pin_reasons(self, top: int = 3) -> list[tuple[int, str]]:
        """The ``top`` reasons that pin the most channels, as ``(channels, reason)``."""
        by: dict[str, int] = {}
        for g in self.pinned:
            by[g.pinned] = by.get(g.pinned, 0) + g.size
        return sorted(((c, r) for r, c in by.items()), key=lambda cr: -cr[0])[:top]


def producer_slices(group: ChannelGroup) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(module_name, index)`` for every conv/linear whose output channels the group owns.

    ``index`` is a ``(group.size, k)`` LongTensor of output-channel indices (dim 0 of
    ``module.weight``); this is what Hessian and magnitude scores reduce over.
    """
    for m in group.members:
        if m.role == "out" and m.module is not None:
            yield m.module, m.index


def producer_modules(groups: Iterable[ChannelGroup]) -> list[str]:
    """Sorted names of the conv/linear modules whose output channels ``groups`` own: the
    weights a Hessian ranking of those groups needs."""
    return sorted({name for g in groups for name, _ in producer_slices(g)})


class KeptChannels:
    """Which channels of any node survive, given one boolean keep-mask per group.

    ``of(slots)`` maps a node's ``ChannelSlots`` to its ``(C,)`` keep-mask; ``mask(node)`` and
    ``count(node)`` read the slots from the node (nodes without slots keep all channels).
    """

    def __init__(self, groups: ChannelGroups, masks: Sequence[torch.Tensor]):
        self.flat = torch.cat(list(masks)) if len(masks) else torch.ones(0, dtype=torch.bool)
        sizes = torch.tensor([g.size for g in groups], dtype=torch.long)
        self.offset = torch.cumsum(sizes, 0) - sizes

    def of(self, slots: ChannelSlots) -> torch.Tensor:
        return self.flat[self.offset[slots.group] + slots.index]

    def mask(self, node: fx.Node, dim: int | None = None) -> torch.Tensor:
        """Keep-mask of the node's channels; of its ``dim`` when given (all kept when the
        channels are another dim: only the channel dim of a value ever shrinks)."""
        slots = node.meta.get(_meta.CHANNELS)
        if not isinstance(slots, ChannelSlots):
            raise GroupError(f"{node.format_node()}: no channel slots; rerun group_channels")
        if dim is not None and not same_dim(node, slots.dim, dim):
            return torch.ones(node.meta["tensor_meta"].shape[dim], dtype=torch.bool)
        return self.of(slots)

    def count(self, node: fx.Node, dim: int | None = None) -> int | None:
        """Kept channels of the node's output (along ``dim`` when given), or None when it
        carries no channel slots."""
        slots = node.meta.get(_meta.CHANNELS)
        if not isinstance(slots, ChannelSlots):
            return None
        if dim is not None and not same_dim(node, slots.dim, dim):
            return int(node.meta["tensor_meta"].shape[dim])
        return int(self.of(slots).sum())


def same_dim(node: fx.Node, a: int, b: int) -> bool:
    """Are dims ``a`` and ``b`` the same dim of ``node``'s value (negative dims counted from the end)?"""
    meta = node.meta.get("tensor_meta")
    if not isinstance(meta, TensorMetadata):
        return a == b
    return a % len(meta.shape) == b % len(meta.shape)


def emptiable_groups(gm: fx.GraphModule) -> frozenset[int]:
    """Prunable groups that may lose *all* their channels: every value they live in also
    carries channels of a group that never empties (a pinned one, or one that is alone in
    some value and so keeps at least one channel). The zero channels an option-A shortcut
    pads on are the typical case: dropping them all narrows the next stage's stream.
    """
    groups = groups_of(gm)
    candidates = {g.id for g in groups.prunable}
    shared = [
        set(s.group.tolist())
        for n in gm.graph.nodes
        if isinstance(s := n.meta.get(_meta.CHANNELS), ChannelSlots) and len(s)
    ]
    changed = True
    while changed:
        changed = False
        for present in shared:
            if present <= candidates:  # nothing else keeps this value non-empty
                candidates -= present
                changed = True
    return frozenset(candidates)


def is_channel_constant(shape: Sequence[int]) -> bool:
    """A per-channel constant's shape, ``(1, C, 1, ...)``: what a dropped block leaves."""
    return len(shape) >= 2 and shape[0] == 1 and all(d == 1 for d in shape[2:])


def per_channel_dim(shape: Sequence[int]) -> int | None:
    """The one dim of a constant that is not 1: ``(1, C, 1, 1)`` → 1 (a dropped block's
    constant), ``(C, 1, 1)`` → 0 (a layer scale), ``(1, 1, C)`` → 2; None otherwise. Whether it
    lines up with some value's channels is for the op that reads it to check."""
    big = [d for d, n in enumerate(shape) if n != 1]
    if not big:  # one channel: (1, 1, 1, 1) as a dropped block's, (1,) as a layer scale's
        return (1 if len(shape) >= 2 else 0) if len(shape) else None
    return big[0] if len(big) == 1 else None


def groups_of(gm: fx.GraphModule) -> ChannelGroups:
    """The groups computed by ``group_channels``; raises if the pass has not run."""
    groups = gm.meta.get(_meta.GROUPS)
    if groups is None:
        raise GroupError("graph has no channel groups: run group_channels(gm) first")
    return groups


# ---------------------------------------------------------------------------------------------
# The pass
# ---------------------------------------------------------------------------------------------


def _checked(a: Analysis, node: fx.Node, value: Any) -> Any:
    """Never trust a rule blindly: its labels must match the channel count ShapeProp saw."""
    expected = _map_meta(node, lambda c: c, a.dim(node))
    got = _map_meta_like(value)
    if got != expected:
        raise Pin(f"rule produced {got} channels where the tensor has {expected}")
    return value


def _map_meta_like(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return len(value)
    if isinstance(value, tuple):
        return tuple(_map_meta_like(v) for v in value)
    return None


def _has_params(module: nn.Module) -> bool:
    return next(module.parameters(), None) is not None


def _constant(a: Analysis, node: fx.Node) -> Any:
    meta = node.meta.get("tensor_meta")
    dim = per_channel_dim(meta.shape) if isinstance(meta, TensorMetadata) else None
    if dim is not None:  # a per-channel constant: a dropped branch's, a layer scale (C, 1, 1)
        labels = a.uf.fresh(int(meta.shape[dim]))
        a.touch(node, "const", dim, labels)
        a.set_dim(node, dim)
        return labels
    return a.fresh_pinned(node, f"constant tensor {node.target}")


def _where(node: fx.Node) -> str:
    """`` in module 'path' (Type)``: the innermost module whose code made the node (both
    captures record ``nn_module_stack``), so a pin reason names the op and the module."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return ""
    path, kind = list(stack.values())[-1]
    name = kind.rpartition(".")[2] if isinstance(kind, str) else getattr(kind, "__name__", str(kind))
    return f" in module '{path}' ({name})"


def _visit(a: Analysis, node: fx.Node) -> Any:
    if node.op == "placeholder":
        return a.fresh_pinned(node, f"model input {node.name}")
    if layer_tensor(a.gm, node):
        return None  # a functional conv's or linear's weight or bias: its rule reads it
    if node.op == "get_attr":
        return _constant(a, node)
    if node.op == "output":
        a.pin_inputs(node, "model output")
        return None
    if node.op == "call_module" and a.calls_per_module[node.target] > 1 and _has_params(a.module(node)):
        reason = f"module {node.target} is called {a.calls_per_module[node.target]} times (shared weights)"
        a.pin_inputs(node, reason)
        return a.fresh_pinned(node, reason)
    rule = a.rules.rule_for(a.gm, node)
    what = node.format_node()
    x = node.args[0] if node.args else None
    if rule is not None and rule not in a.rules.any_dim and a.labels(x) is not None and a.dim(x) != 1:
        a.anchor(x, 1, f"{what}: reads dim 1 of a value whose channels are dim {a.dim(x)}")  # its input
    if rule is None:
        reason = f"{what}{_where(node)}: op not understood by the channel analysis"
    else:
        try:
            value = _checked(a, node, rule(a, node))
        except Pin as p:
            reason = f"{what}{_where(node)}: {p}"
        else:
            if node.op == "call_module" and node.target in a.exclude:
                reason = f"module {node.target} excluded by the user"
                a.pin_inputs(node, reason)
                for labels in _flat_labels(value):
                    a.uf.pin(labels, reason)
            return value
    a.pin_inputs(node, reason)
    return a.fresh_pinned(node, reason)


def _build_groups(a: Analysis) -> tuple[ChannelGroups, np.ndarray, np.ndarray]:
    """Cluster units (union-find roots) by the parameters they touch; returns groups and,
    for each label, its group id and channel index within the group."""
    roots = a.uf.roots()
    # (unit, touch, index) triples, deduplicated and sorted: a unit's touches are contiguous
    trip = np.zeros((0, 3), dtype=np.int64)
    if a.touches:
        rows = [
            np.stack([roots[t.labels], np.full(len(t.labels), i), t.index], 1)
            for i, t in enumerate(a.touches)
        ]
        trip = np.unique(np.concatenate(rows), axis=0)
    pairs, pair_start, pair_count = np.unique(trip[:, :2], axis=0, return_index=True, return_counts=True)
    touched_units, first_pair = np.unique(pairs[:, 0], return_index=True)
    last_pair = np.append(first_pair[1:], len(pairs))
    pin_of_root: dict[int, str] = {}
    for label, reason in a.uf.pins.items():
        pin_of_root.setdefault(int(roots[label]), reason)
    # signature = the touches (with how many indices each) + the pin reason
    clusters: dict[tuple, list[int]] = {}
    where = dict(zip(touched_units.tolist(), zip(first_pair.tolist(), last_pair.tolist())))
    for u in np.unique(roots).tolist():
        lo, hi = where.get(u, (0, 0))
        touches = tuple(zip(pairs[lo:hi, 1].tolist(), pair_count[lo:hi].tolist()))
        sig = (touches, pin_of_root.get(u))
        clusters.setdefault(sig, []).append(u)
    group_of_unit = np.full(len(roots), -1, dtype=np.int64)
    index_of_unit = np.full(len(roots), -1, dtype=np.int64)
    groups = []
    for gid, ((touches, pinned), units) in enumerate(clusters.items()):
        first = np.array([where[u][0] for u in units], dtype=np.int64) if touches else None
        members = []
        for j, (t_id, count) in enumerate(touches):
            idx = pair_start[first + j][:, None] + np.arange(count)[None, :]  # (size, count)
            t = a.touches[t_id]
            members.append(Member(t.node, t.module, t.role, t.dim, torch.from_numpy(trip[idx, 2])))
        if pinned is None and all(m.role == "const" for m in members):
            pinned = "channels touch no parameter"  # nothing to score them by
        groups.append(ChannelGroup(gid, len(units), tuple(members), pinned))
        group_of_unit[units] = gid
        index_of_unit[units] = np.arange(len(units))
    return ChannelGroups(tuple(groups)), group_of_unit[roots], index_of_unit[roots]


def _slots(value: Any, group_of: np.ndarray, index_of: np.ndarray, dim: int) -> Any:
    if isinstance(value, np.ndarray):
        return ChannelSlots(torch.from_numpy(group_of[value]), torch.from_numpy(index_of[value]), dim)
    if isinstance(value, tuple):
        return tuple(_slots(v, group_of, index_of, dim) for v in value)
    return None


def group_channels(gm: fx.GraphModule, exclude: Iterable[str] = (), rules: Rules | None = None) -> PassResult:
    """Partition the channels of a traced graph into groups that must be pruned together.

    Needs ``tensor_meta`` on the nodes (``passes.trace.trace``). Writes ``ChannelSlots`` to
    ``node.meta["ehap.channels"]`` and ``ChannelGroups`` to ``gm.meta["ehap.groups"]``.
    ``exclude`` names modules whose channels must never be pruned. ``rules``: coupling rules
    added to the default ones (``passes.coupling``); by default those ``trace`` was given.

    >>> from torch import nn
    >>> from ehap_fx.passes.trace import trace
    >>> gm = trace(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(),
    ...                          nn.Conv2d(8, 4, 1)), torch.randn(1, 3, 8, 8))
    >>> groups = group_channels(gm).graph_module.meta["ehap.groups"]
    >>> [(g.size, [m.role for m in g.members]) for g in groups.prunable]
    [(8, ['out', 'norm', 'in'])]
    """
    missing = [n.name for n in gm.graph.find_nodes(op="placeholder") if "tensor_meta" not in n.meta]
    if missing:
        raise GroupError(f"nodes {missing[:5]} have no tensor_meta: trace the model with trace() first")
    unknown = set(exclude) - {name for name, _ in gm.named_modules()}
    if unknown:
        raise GroupError(f"exclude={sorted(unknown)} names no module of the graph")
    rules = rules if rules is not None else gm.meta.get(_meta.RULES)
    record_rules(gm, rules)
    a = Analysis(gm, frozenset(exclude), coupling_rules(rules))
    for node in gm.graph.nodes:
        a.env[node] = _visit(a, node)
    groups, group_of, index_of = _build_groups(a)
    for node in gm.graph.nodes:
        slots = _slots(a.env.get(node), group_of, index_of, a.dim(node))
        if slots is None:
            node.meta.pop(_meta.CHANNELS, None)
        else:
            node.meta[_meta.CHANNELS] = slots
    gm.meta[_meta.GROUPS] = ChannelGroups(groups.groups, tuple(sorted(exclude)))
    return PassResult(gm, False)


class GroupChannels(PassBase):
    """``group_channels`` as a ``PassBase`` for a ``PassManager`` pipeline."""

    def __init__(self, exclude: Sequence[str] = (), rules: Rules | None = None):
        super().__init__()
        self.exclude = tuple(exclude)
        self.rules = rules

    def call(self, graph_module: fx.GraphModule) -> PassResult:
        return group_channels(graph_module, self.exclude, self.rules)
