"""Coupling rules of the channel-group pass: how each op maps channel labels.

Every channel of every value carries a label; the channels are dim 1 unless a rule moved
them (a ``permute`` to channels-last, a ``Linear`` over the last dim): ``_Analysis.dim(node)``
says which dim. A rule receives the analysis state and a node, and returns the labels of the
node's output (a tuple for ops returning tuples, None for non-tensors), creating fresh labels
for producers, unioning labels that must stay equal, and recording ``_Touch`` es where
parameters are indexed by channels. A rule that meets a use it cannot describe exactly
raises ``_Pin``; an op without a rule is pinned by the pass. Only the rules in ``ANY_DIM``
read channels at a dim other than 1; any other rule meeting such a value pins it. See
``passes/group.py`` for the whole picture.
"""

from __future__ import annotations

import math
import operator
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.passes.shape_prop import TensorMetadata

aten = torch.ops.aten

# ---------------------------------------------------------------------------------------------
# Label bookkeeping
# ---------------------------------------------------------------------------------------------

Labels = np.ndarray  # (C,) int64 labels of the channels along dim 1


class _UnionFind:
    """Union-find over channel labels, with pin reasons attached to labels."""

    def __init__(self) -> None:
        self.parent: list[int] = []
        self.pins: dict[int, str] = {}

    def fresh(self, n: int) -> Labels:
        start = len(self.parent)
        self.parent.extend(range(start, start + n))
        return np.arange(start, start + n, dtype=np.int64)

    def find(self, x: int) -> int:
        parent = self.parent
        root = x
        while parent[root] != root:
            root = parent[root]
        while parent[x] != root:
            parent[x], x = root, parent[x]
        return root

    def union(self, a: Labels, b: Labels) -> None:
        for x, y in zip(a.tolist(), b.tolist()):
            rx, ry = self.find(x), self.find(y)
            if rx != ry:
                self.parent[max(rx, ry)] = min(rx, ry)

    def pin(self, labels: Labels, reason: str) -> None:
        for x in labels.tolist():
            self.pins.setdefault(x, reason)

    def roots(self) -> np.ndarray:
        return np.array([self.find(x) for x in range(len(self.parent))], dtype=np.int64)


@dataclass
class _Touch:
    """Channels a node's parameters (or pad zeros) are indexed by: ``labels[p]`` ↔ ``index[p]``."""

    node: str
    module: str | None
    role: str
    dim: int
    labels: Labels
    index: np.ndarray


class _Analysis:
    """State of one run of the channel analysis over a graph."""

    def __init__(self, gm: fx.GraphModule, exclude: frozenset[str]):
        self.gm = gm
        self.exclude = exclude
        self.uf = _UnionFind()
        self.env: dict[fx.Node, Any] = {}
        self.touches: list[_Touch] = []
        self.cdim: dict[fx.Node, int] = {}  # the channel dim of a value, where it is not 1
        self.calls_per_module = defaultdict(int)
        for n in gm.graph.nodes:
            if n.op == "call_module":
                self.calls_per_module[n.target] += 1

    # --- helpers used by the rules ------------------------------------------------------------

    def labels(self, arg: Any) -> Labels | None:
        return self.env.get(arg) if isinstance(arg, fx.Node) else None

    def dim(self, arg: Any) -> int:
        """The dim of ``arg`` that its labels describe (1 unless a rule moved the channels)."""
        return self.cdim.get(arg, 1) if isinstance(arg, fx.Node) else 1

    def set_dim(self, node: fx.Node, dim: int) -> None:
        if dim == 1:
            self.cdim.pop(node, None)
        else:
            self.cdim[node] = dim

    def anchor(self, arg: fx.Node, dim: int, reason: str) -> Labels | None:
        """The labels of ``arg`` at ``dim``. When its channels are another dim, those are
        pinned: then no dim of ``arg`` ever changes size, so fresh pinned labels describe
        ``dim`` exactly, and replace the old ones (later readers see channels at ``dim``)."""
        labels = self.labels(arg)
        shape = _shape(arg)
        if labels is None or shape is None or _norm_dim(dim, len(shape)) == self.dim(arg):
            return labels
        self.uf.pin(labels, reason)
        if not -len(shape) <= dim < len(shape):
            return None  # no such dim (a (C,) vector read as (N, C)): pinned, nothing to label
        self.env[arg] = self._pinned_labels(int(shape[dim]), reason)
        self.set_dim(arg, _norm_dim(dim, len(shape)))
        return self.env[arg]

    def fresh_pinned(self, node: fx.Node, reason: str) -> Any:
        """Fresh pinned labels shaped like the node's output (tensor, tuple of tensors, or None),
        at the channel dim of its first input that has one, when the output has that dim
        (pinned labels never prune, so any dim is exact; this one keeps later ops aligned)."""
        dims = [self.dim(arg) for arg in _flat_args(node) if self.labels(arg) is not None]
        meta = node.meta.get("tensor_meta")
        dim = dims[0] if dims and isinstance(meta, TensorMetadata) and len(meta.shape) > dims[0] else 1
        self.set_dim(node, dim)
        return _map_meta(node, lambda c: self._pinned_labels(c, reason), dim)

    def _pinned_labels(self, channels: int, reason: str) -> Labels:
        labels = self.uf.fresh(channels)
        self.uf.pin(labels, reason)
        return labels

    def pin_inputs(self, node: fx.Node, reason: str) -> None:
        for arg in _flat_args(node):
            for labels in _flat_labels(self.env.get(arg)):
                self.uf.pin(labels, reason)

    def touch(self, node: fx.Node, role: str, dim: int, labels: Labels, index=None, module=None) -> None:
        module = module or (node.target if node.op == "call_module" else functional_conv_owner(self.gm, node))
        idx = np.arange(len(labels)) if index is None else np.asarray(index)
        self.touches.append(_Touch(node.name, module, role, dim, labels, idx))

    def module(self, node: fx.Node) -> nn.Module:
        return self.gm.get_submodule(node.target)


def _map_meta(node: fx.Node, fn: Callable[[int], Labels], dim: int = 1) -> Any:
    """Apply ``fn(channels)`` to each tensor in the node's ``tensor_meta`` (None for non-tensors):
    ``channels`` is its size along ``dim``."""

    def go(meta):
        if isinstance(meta, TensorMetadata):
            return fn(int(meta.shape[dim])) if len(meta.shape) > dim else None
        if isinstance(meta, (tuple, list)):
            return tuple(go(m) for m in meta)
        return None

    return go(node.meta.get("tensor_meta"))


def _flat_args(node: fx.Node) -> list[fx.Node]:
    out: list[fx.Node] = []
    fx.node.map_arg((node.args, node.kwargs), out.append)
    return out


def _flat_labels(value: Any) -> Iterator[Labels]:
    if isinstance(value, np.ndarray):
        yield value
    elif isinstance(value, tuple):
        for v in value:
            yield from _flat_labels(v)


def _shape(node: Any) -> tuple[int, ...] | None:
    meta = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
    return tuple(meta.shape) if isinstance(meta, TensorMetadata) else None


def _norm_dim(dim: int, ndim: int) -> int:
    return dim + ndim if dim < 0 else dim


def _arg(node: fx.Node, pos: int, name: str, default: Any = None) -> Any:
    if len(node.args) > pos:
        return node.args[pos]
    return node.kwargs.get(name, default)


class _Pin(Exception):
    """Raised by a rule that finds its op used in a way it cannot describe exactly."""


# ---------------------------------------------------------------------------------------------
# Coupling rules: how each op maps input channel labels to output channel labels
# ---------------------------------------------------------------------------------------------


def same_channels(a: _Analysis, node: fx.Node) -> Labels:
    """Channel c of the output is computed from channel c of the (first) input only."""
    x = node.args[0] if node.args else None
    labels, dim = a.labels(x), a.dim(x)
    src, out = _shape(x), _shape(node)
    if labels is None or out is None or src is None or len(out) <= dim or out[dim] != len(labels):
        raise _Pin("output does not keep the input's channel dim")
    if dim != 1 and len(out) != len(src):
        raise _Pin(f"op changes the rank of a value whose channels are dim {dim}")
    a.set_dim(node, dim)
    return labels


def norm_layer(a: _Analysis, node: fx.Node) -> Labels:
    """BatchNorm / InstanceNorm: per-channel statistics and affine parameters."""
    labels = same_channels(a, node)
    mod = a.module(node)
    if getattr(mod, "affine", False) or getattr(mod, "track_running_stats", False):
        a.touch(node, "norm", 0, labels)
    return labels


_F_NORM_TENSORS = ("running_mean", "running_var", "weight", "bias")  # F.batch_norm's order
#: ATen norms take ``(input, weight, bias, running_mean, running_var, ...)``
_NORM_TENSORS = dict.fromkeys(
    (aten.batch_norm.default, aten.instance_norm.default, aten._native_batch_norm_legit_no_training.default),
    ("weight", "bias", "running_mean", "running_var"),
)


def functional_norm(a: _Analysis, node: fx.Node) -> Labels:
    """``F.batch_norm`` / ``F.instance_norm`` (what a norm subclass with its own ``forward``
    calls): per channel; its statistics and affine tensors (``get_attr`` of shape ``(C,)``,
    labelled as per-channel constants) are unioned with the channels, so they are sliced
    with them."""
    return _union_norm_tensors(a, node, same_channels(a, node))


def _union_norm_tensors(a: _Analysis, node: fx.Node, labels: Labels) -> Labels:
    if a.dim(node.args[0]) != 1:
        raise _Pin("batch norm of a value whose channels are not dim 1")
    names = _NORM_TENSORS.get(node.target, _F_NORM_TENSORS)
    return _union_channel_tensors(a, node, labels, enumerate(names, start=1))


def _union_channel_tensors(a: _Analysis, node: fx.Node, labels: Labels, args) -> Labels:
    """The ``(C,)`` tensors at ``args`` (position, name) of ``node`` sliced with its channels."""
    for pos, name in args:
        t = _arg(node, pos, name)
        if t is None:
            continue
        if not isinstance(t, fx.Node) or a.labels(t) is None or _shape(t) != (len(labels),):
            raise _Pin(f"{name} is not a per-channel tensor")
        a.uf.union(labels, a.labels(t))
    return labels


def group_norm(a: _Analysis, node: fx.Node) -> Labels:
    """GroupNorm normalises over whole groups: only whole groups can go, so they are one unit."""
    labels = same_channels(a, node)
    mod = a.module(node)
    per_group = len(labels) // mod.num_groups
    rows = labels.reshape(mod.num_groups, per_group)
    for j in range(1, per_group):
        a.uf.union(rows[:, 0], rows[:, j])
    if mod.affine:
        a.touch(node, "norm", 0, labels)
    return labels


def layer_norm(a: _Analysis, node: fx.Node) -> Labels:
    """LayerNorm (module or ``F.layer_norm``) over trailing dims that exclude the channel dim
    acts per channel. Over the channels (a channels-last LayerNorm) it pins: each channel's
    output depends on the statistics of all of them, so removing one changes the others."""
    shape = _shape(node.args[0])
    if node.op == "call_module":
        normalized = a.module(node).normalized_shape
    else:
        normalized = _arg(node, 1, "normalized_shape")
    normalized = (normalized,) if isinstance(normalized, int) else tuple(normalized)
    if shape is None or a.dim(node.args[0]) >= len(shape) - len(normalized):
        raise _Pin("LayerNorm normalises over the channel dim")
    return same_channels(a, node)


def conv(a: _Analysis, node: fx.Node) -> Labels:
    """Conv: fresh output channels; input channels index ``weight`` dim 1.

    Depthwise (groups == in == out) passes channels through. Other grouped convs couple the
    i-th channel of every group (removing it from all groups keeps them equal).
    """
    mod = a.module(node) if node.op == "call_module" else _functional_conv_module(a, node)
    x = a.labels(node.args[0])
    if x is None:
        raise _Pin("conv input has no channel labels")
    g, cin, cout = mod.groups, mod.in_channels, mod.out_channels
    if g == cin == cout:
        a.touch(node, "out", 0, x)
        return x
    per_in, per_out = cin // g, cout // g
    out = a.uf.fresh(cout)
    if g > 1:
        if per_in == 1:
            raise _Pin(f"depthwise conv with channel multiplier {per_out}")
        for rows in (x.reshape(g, per_in), out.reshape(g, per_out)):
            for r in range(1, g):
                a.uf.union(rows[0], rows[r])
    a.touch(node, "in", 1, x, np.arange(cin) % per_in)
    a.touch(node, "out", 0, out)
    return out


def conv_transpose(a: _Analysis, node: fx.Node) -> Labels:
    """Transposed conv, weight ``(in, out/groups, k...)``: its input channels index ``weight``
    dim 0 and go with their producer (a decoder after a reshape); its output channels (dim 1
    of the weight) are pinned, since no scorer reads that dim of a weight yet."""
    mod = a.module(node)
    if a.labels(node.args[0]) is None or a.dim(node.args[0]) != 1:
        raise _Pin("transposed conv input has no channel labels at dim 1")
    if mod.groups != 1:
        raise _Pin(f"grouped transposed conv (groups={mod.groups})")
    if len(node.args) > 1 or node.kwargs:
        raise _Pin("transposed conv called with output_size")
    a.touch(node, "in", 0, a.labels(node.args[0]))
    reason = f"{type(mod).__name__} output channels (weight dim 1) are not pruned"
    return a._pinned_labels(mod.out_channels, reason)


_FUNCTIONAL_CONVS = (
    F.conv1d, F.conv2d, F.conv3d, torch.conv1d, torch.conv2d, torch.conv3d,
    aten.conv1d.default, aten.conv2d.default, aten.conv3d.default,  # torch.export's training IR
    aten.convolution.default,  # core ATen: (x, w, b, stride, padding, dilation, transposed, _, groups)
)


def is_functional_conv(target: Any) -> bool:
    """An ``F.conv*`` / ATen conv target, any overload (``aten.conv2d.padding``: ``padding="same"``)."""
    try:
        if target in _FUNCTIONAL_CONVS:
            return True
    except TypeError:
        return False
    return isinstance(target, torch._ops.OpOverload) and target.overloadpacket in _FUNCTIONAL_CONV_PACKETS


_FUNCTIONAL_CONV_PACKETS = (aten.conv1d, aten.conv2d, aten.conv3d, aten.convolution)


def conv_groups_at(node: fx.Node) -> int:
    """The position of ``groups`` in a functional conv call: 8 for ``aten.convolution``, else 6."""
    return 8 if node.target is aten.convolution.default else 6


def functional_conv_owner(gm: fx.GraphModule, node: fx.Node) -> str | None:
    """For ``F.conv2d(x, <m>.weight, <m>.bias, ...)`` (a conv subclass's own ``forward``, as
    timm's ``Conv2dSame``), the path ``m`` of the module holding the weight; None otherwise.
    (The traced graph keeps ``m`` only as a holder of its tensors: what the conv is comes
    from the call's arguments and the weight's shape, ``functional_conv``.)"""
    if node.op != "call_function" or not is_functional_conv(node.target):
        return None
    if node.target is aten.convolution.default and node.args[6]:
        return None  # a transposed conv: its weight is (in, out/groups, ...)
    w, b = _arg(node, 1, "weight"), _arg(node, 2, "bias")
    if not isinstance(w, fx.Node) or w.op != "get_attr" or not w.target.endswith(".weight"):
        return None
    owner = w.target.rpartition(".")[0]
    if b is not None and getattr(b, "target", None) != f"{owner}.bias":
        return None
    return owner


def functional_conv(gm: fx.GraphModule, node: fx.Node) -> Any:
    """The conv an ``F.conv*`` call on get_attr tensors computes, with the attributes the
    conv rule, shrink and cost read (``groups``, ``in_channels``, ``out_channels``,
    ``kernel_size``, ``weight``, ``bias``); None when it is not such a call."""
    owner = functional_conv_owner(gm, node)
    if owner is None:
        return None
    holder = gm.get_submodule(owner)
    weight, bias = holder.weight, getattr(holder, "bias", None) if _arg(node, 2, "bias") is not None else None
    groups = _arg(node, conv_groups_at(node), "groups", 1)
    return SimpleNamespace(
        groups=groups, in_channels=weight.shape[1] * groups, out_channels=weight.shape[0],
        kernel_size=tuple(weight.shape[2:]), weight=weight, bias=bias, owner=owner,
    )


def _functional_conv_module(a: _Analysis, node: fx.Node) -> Any:
    """``functional_conv``, checked: its tensors read once, by this call alone."""
    spec = functional_conv(a.gm, node)
    if spec is None:
        raise _Pin("F.conv on tensors that are not one module's weight and bias")
    reads = [n for n in a.gm.graph.nodes if n.op == "get_attr" and n.target.startswith(spec.owner + ".")]
    if len(reads) != 1 + (spec.bias is not None) or any(len(r.users) != 1 for r in reads):
        raise _Pin(f"{spec.owner}'s tensors are read elsewhere too")
    return spec


def linear(a: _Analysis, node: fx.Node) -> Labels:
    """Linear over the last dim, (N, F) or (N, ..., F) (a pointwise conv on a channels-last
    tensor): fresh output features at the last dim; input features index ``weight`` dim 1.
    An input whose channels are another dim has them pinned (``_Analysis.anchor``)."""
    shape = _shape(node.args[0])
    if a.labels(node.args[0]) is None or shape is None or len(shape) < 2:
        raise _Pin("linear on an input without (N, ..., features)")
    d = a.dim(node.args[0])
    why = f"{node.format_node()}: mixes the last dim of a value whose channels are dim {d}"
    x = a.anchor(node.args[0], -1, why)
    mod = a.module(node)
    out = a.uf.fresh(mod.out_features)
    a.touch(node, "in", 1, x)
    a.touch(node, "out", 0, out)
    a.set_dim(node, len(shape) - 1)
    return out


def elementwise(a: _Analysis, node: fx.Node) -> Labels:
    """Broadcasting binary op: operands that carry the output's channel dim are unioned.

    The output's channel dim is that of the operands' labels, which must all align (a
    channels-last value times a ``(C,)`` layer-scale parameter aligns; a channels-first one
    added to a channels-last one does not)."""
    out = _shape(node)
    if out is None or len(out) < 2:
        raise _Pin("elementwise op without a channel dim")
    # a one-element operand is a broadcast scalar, whichever dim its labels are
    operands = [(arg, shape) for arg in _flat_args(node) if (shape := _shape(arg)) and math.prod(shape) > 1]
    # where the labelled operands that are not broadcast along their channels put them
    at = set()
    for arg, shape in operands:
        d = a.dim(arg) + len(out) - len(shape)  # the output dim the operand's channels align with
        if a.labels(arg) is not None and 0 <= d < len(out) and (shape[a.dim(arg)] != 1 or out[d] == 1):
            at.add(d)
    if len(at) > 1:
        raise _Pin(f"operands carry their channels at different dims {sorted(at)}")
    cdim = at.pop() if at else 1
    carried: list[Labels] = []
    for arg, shape in operands:
        dim = cdim - (len(out) - len(shape))  # the operand's dim aligned with the output's channels
        if dim < 0 or (shape[dim] == 1 and out[cdim] != 1):
            continue  # broadcast along channels: no coupling
        labels = a.labels(arg)
        if dim != a.dim(arg) or labels is None:
            raise _Pin(f"operand {arg.name} {tuple(shape)} aligns its dim {dim} with channels")
        carried.append(labels)
    if not carried:
        raise _Pin("no operand carries the channels")
    for other in carried[1:]:
        a.uf.union(carried[0], other)
    a.set_dim(node, cdim)
    return carried[0]


def concat(a: _Analysis, node: fx.Node) -> Labels:
    """cat along channels concatenates labels; along another dim (batch, tokens, spatial) it
    unions them: channel c of the output is channel c of every part."""
    tensors = _arg(node, 0, "tensors")
    out = _shape(node)
    dim = _norm_dim(_arg(node, 1, "dim", 0), len(out))
    parts = [a.labels(t) for t in tensors]
    if any(p is None for p in parts):
        raise _Pin("cat of a value without channel labels")
    dims = {a.dim(t) for t in tensors}
    if len(dims) != 1:
        raise _Pin(f"cat of values with their channels at different dims {sorted(dims)}")
    cdim = dims.pop()
    a.set_dim(node, cdim)
    if dim == cdim:
        return np.concatenate(parts)
    for p in parts[1:]:
        a.uf.union(parts[0], p)
    return parts[0]


def stack(a: _Analysis, node: fx.Node) -> Labels:
    """stack of same-shaped values (an FPN's merge: ``torch.stack(maps).sum(0)``): channel c of
    every part is one unit; a new dim at or before the channels moves them one dim on."""
    tensors = _arg(node, 0, "tensors")
    parts = [a.labels(t) for t in tensors]
    dims = {a.dim(t) for t in tensors}
    if any(p is None for p in parts) or len(dims) != 1:
        raise _Pin("stack of values without channel labels at one dim")
    cdim = dims.pop()
    dim = _norm_dim(_arg(node, 1, "dim", 0), len(_shape(node)))
    for p in parts[1:]:
        a.uf.union(parts[0], p)
    a.set_dim(node, cdim + 1 if dim <= cdim else cdim)
    return parts[0]


def _stacked_dim(node: Any) -> int | None:
    """The dim a ``stack`` node inserted (None for any other node)."""
    if not isinstance(node, fx.Node) or node.op != "call_function":
        return None
    if table_rule(COUPLING, node.target) is not stack:
        return None
    return _norm_dim(_arg(node, 1, "dim", 0), len(_shape(node)))


def split(a: _Analysis, node: fx.Node) -> tuple[Labels, ...]:
    """split/chunk along channels slice the labels; along another dim each piece keeps them."""
    x = a.labels(node.args[0])
    metas = node.meta.get("tensor_meta")
    dim = _norm_dim(_arg(node, 2, "dim", 0), len(_shape(node.args[0])))
    if x is None or not isinstance(metas, (tuple, list)):
        raise _Pin("split of a value without channel labels")
    a.set_dim(node, a.dim(node.args[0]))
    if dim != a.dim(node.args[0]):
        return tuple(x for _ in metas)
    if dim != 1:
        raise _Pin(f"split of channels at dim {dim}")
    sizes = [int(m.shape[1]) for m in metas]
    return tuple(np.split(x, np.cumsum(sizes)[:-1]))


def getitem(a: _Analysis, node: fx.Node) -> Any:
    """Index a tuple (from split), or slice a tensor: a step-1 slice of channels keeps labels."""
    source, idx = node.args
    value = a.env.get(source)
    if isinstance(value, tuple):
        a.set_dim(node, a.dim(source))  # the pieces of a split keep its channel dim
        return value[idx]
    if value is None:
        raise _Pin("indexing a value without channel labels")
    if a.dim(source) != 1:
        new = _moved_channels(idx, a.dim(source))
        if new is None:
            raise _Pin(f"index {idx!r} of a value with channels at dim {a.dim(source)}")
        a.set_dim(node, new)
        return value
    dims = _channel_index(idx)
    if dims is None:
        raise _Pin(f"index {idx!r} moves or reorders the channel dim")
    return value[dims]


def _moved_channels(idx: Any, cdim: int) -> int | None:
    """Where ``x[idx]`` puts channels that were at ``cdim`` (> 1), when it leaves them whole
    and keeps the batch dim (``tokens[:, 0]``: dim 2 → dim 1); None otherwise."""
    items = idx if isinstance(idx, tuple) else (idx,)
    if any(not isinstance(i, (int, slice)) or isinstance(i, bool) for i in items):
        return None  # Ellipsis, None, tensors, lists: dims move in ways not followed here
    if not items or not isinstance(items[0], slice) or len(items) > cdim and items[cdim] != slice(None):
        return None
    if any(isinstance(v, fx.Node) for i in items if isinstance(i, slice) for v in (i.start, i.stop, i.step)):
        return None
    return cdim - sum(isinstance(i, int) for i in items[:cdim])


def _channel_index(idx: Any) -> slice | None:
    """The slice that ``x[idx]`` applies to dim 1, or None when dims 0/1 do not survive as such."""
    items = idx if isinstance(idx, tuple) else (idx,)
    if any(isinstance(i, fx.Node) for i in items) or (items[:1] == (Ellipsis,) and len(items) > 1):
        return None  # advanced indexing may move dims; a leading Ellipsis hides where dim 1 is
    lead = []
    for item in items[:2]:
        if item is Ellipsis:
            break
        lead.append(item)
    for item in lead:
        if not isinstance(item, slice) or any(
            isinstance(v, fx.Node) for v in (item.start, item.stop, item.step)
        ):
            return None
    if len(lead) < 2:
        return slice(None)
    return lead[1] if lead[1].step in (None, 1) else None


def pad(a: _Analysis, node: fx.Node) -> Labels:
    """F.pad: padding on the channel dim adds fresh zero channels (a pruned one shrinks the pad)."""
    x = a.labels(node.args[0])
    widths = _arg(node, 1, "pad")
    ndim = len(_shape(node.args[0]))
    if x is None or not isinstance(widths, (tuple, list)) or a.dim(node.args[0]) != 1:
        raise _Pin("pad with unknown widths")
    covered = len(widths) // 2  # pad pairs apply to the last `covered` dims
    if covered > ndim - 1:
        raise _Pin("pad of the batch dim")
    if covered < ndim - 1:
        return x  # spatial only: widths may be computed at run time ("same" padding)
    if any(isinstance(w, fx.Node) for w in widths):
        raise _Pin("channel pad with widths computed at run time")
    front, back = widths[-2], widths[-1]
    if front < 0 or back < 0:
        raise _Pin(f"negative channel pad {front, back}")
    mode = "constant" if node.target is aten.constant_pad_nd.default else _arg(node, 2, "mode", "constant")
    if mode != "constant" and (front or back):
        raise _Pin("non-constant channel pad")
    zf, zb = a.uf.fresh(front), a.uf.fresh(back)
    a.touch(
        node,
        "pad",
        1,
        np.concatenate([zf, zb]),
        np.concatenate([np.arange(front), np.arange(front + len(x), front + len(x) + back)]),
    )
    return np.concatenate([zf, x, zb])


def reshape(a: _Analysis, node: fx.Node) -> Labels:
    """view/reshape/flatten with the batch dim kept: channel c ↔ a block of output features.

    ``(N, C, H, W) → (N, C*H*W)`` repeats each label ``H*W`` times. Merging blocks of
    channels into one, ``(N, 1024) → (N, 64, 4, 4)``, unions each block (its 16 features go
    together). Splitting the channels into ``(N, g, C/g, ...)`` (a channel shuffle's first
    step) unions channel j of every group and puts the labels at dim 2; merging ``(N, A, B,
    ...)`` with channels at dim 2 back into ``(N, A*B, ...)`` tiles them. Anything else pins.
    """
    x = a.labels(node.args[0])
    src, dst = _shape(node.args[0]), _shape(node)
    if x is not None and src is not None and dst is not None and a.dim(node.args[0]) == 0:
        moved = _unit_dims_moved(src, dst, 0)  # a (C,) parameter viewed as (1, C, 1, 1)
        if moved is not None:
            a.set_dim(node, moved)
            return x
    if x is None or src is None or dst is None or len(dst) < 2 or src[0] != dst[0]:
        raise _Pin("reshape that does not keep the batch dim")
    cdim = a.dim(node.args[0])
    if cdim == 2 and len(src) >= 3 and dst[1] == src[1] * src[2] and tuple(dst[2:]) == tuple(src[3:]):
        return np.tile(x, src[1])  # (N, A, B, ...) → (N, A*B, ...): channel (i, j) is label j
    if cdim != 1:
        raise _Pin(f"reshape {tuple(src)} → {tuple(dst)} of a value whose channels are dim {cdim}")
    c_in, c_out = src[1], dst[1]
    if c_out == c_in and (len(src) == 2 or len(dst) >= 2):
        return x
    if c_out > c_in and c_out % c_in == 0:
        return np.repeat(x, c_out // c_in)
    if len(dst) >= 3 and dst[1] * dst[2] == c_in and tuple(dst[3:]) == tuple(src[2:]) and c_out > 1:
        rows = x.reshape(dst[1], dst[2])  # (g, C/g): channel j of each group is one unit
        for r in range(1, dst[1]):
            a.uf.union(rows[0], rows[r])
        a.set_dim(node, 2)
        return rows[0].copy()
    if c_in > c_out and c_in % c_out == 0:
        blocks = x.reshape(c_out, c_in // c_out)
        for j in range(1, blocks.shape[1]):
            a.uf.union(blocks[:, 0], blocks[:, j])
        return blocks[:, 0].copy()
    raise _Pin(f"reshape {tuple(src)} → {tuple(dst)} mixes channels")


def _unit_dims_moved(src: tuple[int, ...], dst: tuple[int, ...], cdim: int) -> int | None:
    """Where the channels at ``cdim`` land when a reshape only inserts or drops size-1 dims
    (the other dims in the same order); None for any other reshape."""
    if math.prod(src) == 1:  # one channel: a broadcast scalar, wherever it lands (binary ops skip it)
        return 1 if len(dst) >= 2 else None
    big_src = [d for d, n in enumerate(src) if n != 1]
    big_dst = [d for d, n in enumerate(dst) if n != 1]
    if src[cdim] == 1 or [src[d] for d in big_src] != [dst[d] for d in big_dst]:
        return None
    return big_dst[big_src.index(cdim)]


def reduce_spatial(a: _Analysis, node: fx.Node) -> Labels:
    """mean/sum/amax over dims that exclude batch and channels keep channels (at a lower dim
    when dims before them go without ``keepdim``)."""
    return _reduce(a, node, _arg(node, 1, "dim"), _arg(node, 2, "keepdim", False), over_channels=False)


def reduce_additive(a: _Analysis, node: fx.Node) -> Labels:
    """sum/mean: as ``reduce_spatial``, and also over the channels (with ``keepdim``): a removed
    channel is zero in the masked original and adds nothing to a sum, so the kept channels' sum
    is exact; ``passes.shrink.shrink_channel_mean`` divides a mean by the dense count, as the
    masked original does (GRN's ``x_g.mean(dim=-1)``). Such a result (one value per sample, its
    one-channel dim where the channels were) is a fresh unit of its own."""
    return _reduce(a, node, _arg(node, 1, "dim"), _arg(node, 2, "keepdim", False), over_channels=True)


def vector_norm(a: _Analysis, node: fx.Node) -> Labels:
    """``x.norm(p, dim, keepdim)`` / ``torch.linalg.vector_norm(x, ord, dim, keepdim)``: over
    spatial dims per channel (GRN's ``x_g``); over the channels too for ``ord >= 0`` (a zero
    channel adds nothing to a p-norm, a max or a count of non-zeros), as a sum."""
    order = node.args[1] if len(node.args) > 1 else node.kwargs.get("ord", node.kwargs.get("p", 2))
    exact = order == "fro" or (isinstance(order, (int, float)) and order >= 0)
    return _reduce(a, node, _arg(node, 2, "dim"), _arg(node, 3, "keepdim", False), over_channels=exact)


def _reduce(a: _Analysis, node: fx.Node, dims: Any, keepdim: bool, over_channels: bool) -> Labels:
    x = node.args[0]
    shape, labels, cdim = _shape(x), a.labels(x), a.dim(x)
    if dims is None or shape is None or labels is None:
        raise _Pin("reduction over all dims")
    dims = {_norm_dim(d, len(shape)) for d in ((dims,) if isinstance(dims, int) else dims)}
    over_parts = dims == {0} and _stacked_dim(x) == 0 and cdim > 1  # a stack's parts: their sum
    if over_channels and cdim in dims and 0 not in dims and not over_parts:
        if not keepdim:
            raise _Pin(f"reduction over the channels (dims {sorted(dims)}) without keepdim")
        a.set_dim(node, cdim)
        return a.uf.fresh(1)  # (N, ..., 1, ...): one value per sample, at the channels' dim
    if not over_parts and (0 in dims or cdim in dims):
        raise _Pin(f"reduction over dims {sorted(dims)} includes batch or channels")
    out = _shape(node)
    new = cdim if keepdim else cdim - sum(d < cdim for d in dims)
    if out is None or len(out) <= new or out[new] != len(labels):
        raise _Pin("reduction does not keep the channel dim")
    a.set_dim(node, new)
    return labels


def _permutation(node: fx.Node) -> tuple[int, ...]:
    dims = node.args[1:]
    return tuple(dims[0]) if len(dims) == 1 and isinstance(dims[0], (list, tuple)) else tuple(dims)


def keeps_leading_dims(a: _Analysis, node: fx.Node) -> Labels:
    """unsqueeze/squeeze that leave dims 0 and 1 where they are."""
    src, dst = _shape(node.args[0]), _shape(node)
    if src is None or dst is None or len(dst) < 2 or src[:2] != dst[:2] or a.dim(node.args[0]) != 1:
        raise _Pin("op moves the channel dim")
    return same_channels(a, node)


def moves_dims(a: _Analysis, node: fx.Node) -> Labels:
    """permute/transpose: the channels follow their dim (``permute(0, 2, 3, 1)`` makes a
    value channels-last); the batch dim must stay dim 0."""
    x = node.args[0]
    src, labels = _shape(x), a.labels(x)
    if src is None or labels is None:
        raise _Pin("permute of a value without channel labels")
    if node.target in ("permute", torch.permute, aten.permute.default):
        perm = tuple(_norm_dim(d, len(src)) for d in _permutation(node))
    else:
        d0, d1 = (_norm_dim(d, len(src)) for d in (_arg(node, 1, "dim0"), _arg(node, 2, "dim1")))
        perm = list(range(len(src)))
        perm[d0], perm[d1] = d1, d0
        perm = tuple(perm)
    if perm[0] != 0:
        raise _Pin(f"permute {perm} moves the batch dim")
    a.set_dim(node, perm.index(a.dim(x)))
    return labels


def flatten(a: _Analysis, node: fx.Node) -> Labels:
    """flatten from dim >= 2 keeps channels; from dim 1 it is a reshape to (N, features)."""
    if node.op == "call_module":
        start = a.module(node).start_dim
    else:
        start = _arg(node, 1, "start_dim", 0)
    start = _norm_dim(start, len(_shape(node.args[0])))
    if start >= 2:
        return same_channels(a, node)
    if start == 1:
        return reshape(a, node)
    raise _Pin("flatten of the batch dim")


def no_channels(a: _Analysis, node: fx.Node) -> None:
    """Ops that return shapes or sizes, not channel-carrying tensors."""
    return None


def prelu(a: _Analysis, node: fx.Node) -> Labels:
    """PReLU (``nn.PReLU``, ``F.prelu``, ``aten.prelu``): per channel. A per-channel slope
    ``(C,)`` goes with the channels (``weight`` dim 0); a shared one (one element) does not
    couple them."""
    labels = same_channels(a, node)
    if a.dim(node.args[0]) != 1:
        raise _Pin("PReLU of a value whose channels are not dim 1")
    if node.op == "call_module":
        if a.module(node).num_parameters > 1:
            a.touch(node, "norm", 0, labels)
        return labels
    w = _arg(node, 1, "weight")
    if not isinstance(w, fx.Node) or _shape(w) is None:
        raise _Pin("PReLU slope is not a tensor of the graph")
    if math.prod(_shape(w)) == 1:
        return labels
    if a.labels(w) is None or _shape(w) != (len(labels),):
        raise _Pin(f"PReLU slope of shape {_shape(w)} is not per channel")
    a.uf.union(labels, a.labels(w))
    return labels


def functional_group_norm(a: _Analysis, node: fx.Node) -> Labels:
    """``F.group_norm(x, num_groups, weight, bias)`` / ``aten.group_norm``: as ``group_norm``
    (whole groups are one unit), its ``(C,)`` tensors sliced with the channels; shrink
    rewrites ``num_groups``."""
    labels = same_channels(a, node)
    groups = _arg(node, 1, "num_groups")
    if a.dim(node.args[0]) != 1 or not isinstance(groups, int) or len(labels) % groups:
        where = a.dim(node.args[0])
        raise _Pin(f"group norm with num_groups={groups} over {len(labels)} channels at dim {where}")
    rows = labels.reshape(groups, len(labels) // groups)
    for j in range(1, rows.shape[1]):
        a.uf.union(rows[:, 0], rows[:, j])
    return _union_channel_tensors(a, node, labels, ((2, "weight"), (3, "bias")))


def pixel_shuffle(a: _Analysis, node: fx.Node) -> Labels:
    """pixel_shuffle (``C·r² → C``): output channel ``c`` is input channels ``c·r² … c·r²+r²−1``,
    one unit; pixel_unshuffle (``C → C·r²``): each channel becomes ``r²`` (its labels repeat)."""
    x = node.args[0]
    labels, out = a.labels(x), _shape(node)
    if labels is None or out is None or a.dim(x) != 1:
        raise _Pin("pixel shuffle of a value without channels at dim 1")
    c_in, c_out = len(labels), int(out[1])
    if c_in % c_out == 0:
        blocks = labels.reshape(c_out, c_in // c_out)
        for j in range(1, blocks.shape[1]):
            a.uf.union(blocks[:, 0], blocks[:, j])
        return blocks[:, 0].copy()
    if c_out % c_in == 0:
        return np.repeat(labels, c_out // c_in)
    raise _Pin(f"pixel shuffle {c_in} → {c_out} channels")


def softmax(a: _Analysis, node: fx.Node) -> Labels:
    """softmax / log_softmax over a dim other than the channels: per channel; over the
    channels each output depends on all of them (pinned)."""
    x = node.args[0]
    shape = _shape(x)
    dim = a.module(node).dim if node.op == "call_module" else _arg(node, 1, "dim")
    if dim is None or shape is None:
        raise _Pin("softmax over an implicit dim")
    if _norm_dim(dim, len(shape)) == a.dim(x):
        raise _Pin(f"softmax over the channel dim {dim}")
    return same_channels(a, node)


#: Ops that keep channels but mix or resize the spatial dims (a per-channel constant would
#: not stay one through them).
_SPATIAL = (
    F.max_pool1d, F.max_pool2d, F.max_pool3d,
    F.avg_pool1d, F.avg_pool2d, F.avg_pool3d,
    F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d,
    F.adaptive_max_pool1d, F.adaptive_max_pool2d, F.adaptive_max_pool3d,
    F.lp_pool1d, F.lp_pool2d,
    F.interpolate, F.upsample, F.upsample_nearest, F.upsample_bilinear,
)
POOLING_MODULES = (
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d,
    nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d,
    nn.LPPool1d, nn.LPPool2d,
)
_SPATIAL_MODULES = (*POOLING_MODULES, nn.Upsample)  # UpsamplingNearest2d/Bilinear2d inherit its forward

try:  # torchvision's stochastic depth: scales whole samples (identity in eval mode)
    from torchvision.ops import stochastic_depth as _tv_stochastic_depth

    _STOCHASTIC_DEPTH: tuple = (_tv_stochastic_depth,)
except ImportError:  # pragma: no cover - torchvision is optional
    _STOCHASTIC_DEPTH = ()

_UNARY_FUNCTIONS = (
    F.relu,
    torch.relu,
    F.relu6,
    F.gelu,
    F.silu,
    F.hardswish,
    F.hardsigmoid,
    F.sigmoid,
    torch.sigmoid,
    torch.tanh,
    F.tanh,
    F.leaky_relu,
    F.elu,
    F.mish,
    F.hardtanh,
    F.dropout,
    F.dropout2d,
    *_SPATIAL,
    *_STOCHASTIC_DEPTH,
    torch.clone,
    operator.neg,
    torch.clamp,
    torch.abs,
)
_UNARY_METHODS = (
    "relu",
    "relu_",
    "sigmoid",
    "sigmoid_",
    "tanh",
    "clone",
    "contiguous",
    "clamp",
    "clamp_",
    "clamp_min",
    "neg",
    "abs",
    "float",
    "half",
    "bfloat16",
    "to",
    "type_as",
    "detach",
)
_UNARY_MODULES = (
    nn.ReLU,
    nn.ReLU6,
    nn.GELU,
    nn.SiLU,
    nn.Hardswish,
    nn.Hardsigmoid,
    nn.Sigmoid,
    nn.Tanh,
    nn.LeakyReLU,
    nn.ELU,
    nn.Mish,
    nn.Hardtanh,
    nn.Dropout,
    nn.Dropout2d,
    nn.Identity,
    *_SPATIAL_MODULES,
)
_BINARY = (
    operator.add,
    operator.iadd,
    operator.sub,
    operator.isub,
    operator.mul,
    operator.imul,
    operator.truediv,
    torch.add,
    torch.sub,
    torch.mul,
    torch.div,
    torch.maximum,
    torch.minimum,
    "add",
    "add_",
    "sub",
    "sub_",
    "mul",
    "mul_",
    "div",
    "div_",
)

def is_pointwise(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Does the op act on each element (eval-mode norms: each channel) on its own, so that a
    per-channel constant ``(1, C, 1, ...)`` stays one? (Pooling and resizing do not.)"""
    if node.op == "call_module":
        mod = gm.get_submodule(node.target)
        return isinstance(
            mod, (*_UNARY_MODULES, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
        ) and not isinstance(mod, _SPATIAL_MODULES)
    if node.op not in ("call_function", "call_method"):
        return False
    try:
        return node.target in _UNARY_FUNCTIONS + _UNARY_METHODS + _BINARY and node.target not in _SPATIAL
    except TypeError:
        return False


def is_binary(node: fx.Node) -> bool:
    """A broadcasting elementwise op of two tensors (add, mul, ...)."""
    try:
        return node.op in ("call_function", "call_method") and node.target in _BINARY
    except TypeError:
        return False


#: Rules for call_function targets and call_method names.
COUPLING: dict[Any, Callable[[_Analysis, fx.Node], Any]] = {
    **{op: same_channels for op in _UNARY_FUNCTIONS + _UNARY_METHODS},
    **{op: elementwise for op in _BINARY},
    torch.cat: concat,  # offsets along channels, union along batch
    torch.stack: stack,  # parts unioned, channels one dim on when stacked before them
    torch.concat: concat,
    torch.split: split,  # labels sliced by the split sizes
    "split": split,
    torch.chunk: split,
    "chunk": split,
    operator.getitem: getitem,  # tuple element, or a channel slice with step 1
    F.pad: pad,  # zero channels on the channel dim become prunable pad units
    torch.flatten: flatten,  # flatten(x, 1): each channel becomes H*W features
    "flatten": flatten,
    "view": reshape,  # only when the batch dim is kept and channels map to blocks
    "reshape": reshape,
    torch.reshape: reshape,
    torch.mean: reduce_additive,  # over spatial dims; over channels with keepdim (shrink: sum / dense C)
    "mean": reduce_additive,
    torch.sum: reduce_additive,
    "sum": reduce_additive,
    "norm": vector_norm,  # x.norm(p, dim, keepdim): per channel over spatial dims (GRN)
    torch.norm: vector_norm,
    torch.linalg.vector_norm: vector_norm,
    torch.addcmul: elementwise,  # input + value · t1 · t2, broadcasting (GRN's bias + weight · x)
    "addcmul": elementwise,
    "amax": reduce_spatial,
    torch.amax: reduce_spatial,
    "permute": moves_dims,  # channels follow their dim (channels-last and back)
    torch.permute: moves_dims,
    "transpose": moves_dims,
    torch.transpose: moves_dims,
    F.layer_norm: layer_norm,  # per channel unless it normalises over them
    F.normalize: same_channels,  # any dim, any p: a zeroed channel adds nothing to the norm (SSD's L2Norm)
    F.batch_norm: functional_norm,  # its (C,) tensors are sliced with the channels
    **dict.fromkeys(_FUNCTIONAL_CONVS, conv),  # on a conv module's own weight: as that module
    F.instance_norm: functional_norm,
    F.group_norm: functional_group_norm,  # whole groups, num_groups rewritten by shrink
    F.prelu: prelu,  # a (C,) slope is sliced with the channels
    F.pixel_shuffle: pixel_shuffle,
    F.pixel_unshuffle: pixel_shuffle,
    torch.pixel_shuffle: pixel_shuffle,
    torch.pixel_unshuffle: pixel_shuffle,
    **dict.fromkeys((F.softmax, F.log_softmax, torch.softmax, torch.log_softmax, "softmax", "log_softmax"),
                    softmax),  # per channel unless over them
    "unsqueeze": keeps_leading_dims,
    "squeeze": keeps_leading_dims,
    torch.unsqueeze: keeps_leading_dims,
    torch.squeeze: keeps_leading_dims,
    "size": no_channels,  # shapes, not tensors
    "dim": no_channels,
    getattr: no_channels,
}

# ---------------------------------------------------------------------------------------------
# ATen spellings: the ops of torch.export graphs (the training IR and core ATen), where they
# mean what an FX row above means; see docs/core.md "torch.export graphs"
# ---------------------------------------------------------------------------------------------


def aten_slice(a: _Analysis, node: fx.Node) -> Labels:
    """``aten.slice.Tensor(x, dim, start, end, step)``: a slice of another dim keeps the
    channels; of the channel dim with step 1 it slices their labels (bounds rewritten by
    shrink); any other step there pins."""
    x = node.args[0]
    labels, shape = a.labels(x), _shape(x)
    if labels is None or shape is None:
        raise _Pin("slice of a value without channel labels")
    dim = _norm_dim(_arg(node, 1, "dim", 0), len(shape))
    if dim == 0:
        raise _Pin("slice of the batch dim")
    if dim != a.dim(x):
        return same_channels(a, node)
    if _arg(node, 4, "step", 1) != 1:
        raise _Pin(f"slice of channels with step {_arg(node, 4, 'step', 1)}")
    start, stop, _ = slice(_arg(node, 2, "start"), _arg(node, 3, "end")).indices(len(labels))
    a.set_dim(node, dim)
    return labels[start:stop]


def _tuple_keeps_channels(a: _Analysis, node: fx.Node) -> Labels:
    """The labels of the input of an op returning a tuple whose first tensor keeps its
    channels (at dim 1)."""
    x = node.args[0]
    labels, metas = a.labels(x), node.meta.get("tensor_meta")
    first = metas[0] if isinstance(metas, (tuple, list)) and metas else None
    if labels is None or a.dim(x) != 1 or not isinstance(first, TensorMetadata):
        raise _Pin("op on a value without channels at dim 1")
    if len(first.shape) < 2 or first.shape[1] != len(labels):
        raise _Pin("output does not keep the input's channel dim")
    return labels


def aten_norm_tuple(a: _Analysis, node: fx.Node) -> tuple:
    """``_native_batch_norm_legit_no_training`` (core ATen's eval batch norm) returns
    ``(out, mean, rstd)``: ``out`` as ``functional_norm``'s, the statistics empty."""
    return (_union_norm_tensors(a, node, _tuple_keeps_channels(a, node)), None, None)


def with_indices(a: _Analysis, node: fx.Node) -> tuple:
    """max pooling that also returns indices: both keep the channels of the input."""
    labels = _tuple_keeps_channels(a, node)
    return labels, labels


def functional_linear_spec(gm: fx.GraphModule, node: fx.Node) -> Any:
    """The linear layer an ``aten.linear(x, w, b)`` or ``aten.addmm(b, x, w.T)`` (core ATen)
    on one module's ``weight`` and ``bias`` computes: ``input`` (the data node), ``owner``,
    ``weight``, ``bias``, ``in_features``, ``out_features``; None when it is not such a call."""
    if node.op != "call_function" or node.target not in (aten.linear.default, aten.addmm.default):
        return None
    if node.target is aten.linear.default:
        x, w, b = node.args[0], node.args[1], _arg(node, 2, "bias")
    else:
        b, x, wt = node.args[:3]
        if node.kwargs or not (isinstance(wt, fx.Node) and _is_transpose_2d(wt)):
            return None
        w = wt.args[0]
    if not isinstance(w, fx.Node) or w.op != "get_attr" or not w.target.endswith(".weight"):
        return None
    owner = w.target.rpartition(".")[0]
    if b is not None and getattr(b, "target", None) != f"{owner}.bias":
        return None
    holder = gm.get_submodule(owner)
    weight = holder.weight
    return SimpleNamespace(
        input=x, owner=owner, weight=weight, bias=holder.bias if b is not None else None,
        in_features=weight.shape[1], out_features=weight.shape[0],
    )


def _is_transpose_2d(node: fx.Node) -> bool:
    if node.target is aten.t.default:
        return True
    return node.target is aten.permute.default and list(node.args[1]) == [1, 0]


def layer_tensor(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Is ``node`` a weight or bias that only functional convs/linears read (a ``get_attr``,
    or core ATen's 2-D transpose of a linear weight)? Their rules describe its channels."""
    if not node.users:
        return False
    if node.op == "get_attr":
        return all(_reads_as_layer_tensor(gm, user, node) for user in node.users)
    if node.op == "call_function" and _is_transpose_2d(node) and node.args[0].op == "get_attr":
        return all(functional_linear_spec(gm, user) is not None for user in node.users)
    return False


def _reads_as_layer_tensor(gm: fx.GraphModule, user: fx.Node, node: fx.Node) -> bool:
    if functional_conv_owner(gm, user) is not None:
        return node is _arg(user, 1, "weight") or node is _arg(user, 2, "bias")
    if user.op == "call_function" and _is_transpose_2d(user):
        return layer_tensor(gm, user)
    spec = functional_linear_spec(gm, user)
    return spec is not None and node is not spec.input


def functional_linear(a: _Analysis, node: fx.Node) -> Labels:
    """``aten.linear`` / ``aten.addmm`` on one module's tensors: as an ``nn.Linear``."""
    spec = functional_linear_spec(a.gm, node)
    if spec is None:
        raise _Pin("linear on tensors that are not one module's weight and bias")
    x, shape = spec.input, _shape(spec.input)
    if a.labels(x) is None or shape is None or len(shape) < 2:
        raise _Pin("linear on an input without (N, ..., features)")
    why = f"{node.format_node()}: mixes the last dim of a value whose channels are dim {a.dim(x)}"
    x_labels = a.anchor(x, -1, why)
    out = a.uf.fresh(spec.out_features)
    a.touch(node, "in", 1, x_labels, module=spec.owner)
    a.touch(node, "out", 0, out, module=spec.owner)
    a.set_dim(node, len(shape) - 1)
    return out


_ATEN_UNARY = (
    aten.relu, aten.relu_, aten.hardtanh, aten.hardtanh_, aten.gelu, aten.silu, aten.silu_,
    aten.hardswish, aten.hardswish_, aten.hardsigmoid, aten.sigmoid, aten.tanh, aten.leaky_relu,
    aten.elu, aten.mish, aten.clamp, aten.clamp_min, aten.abs, aten.neg, aten.dropout, aten.dropout_,
    aten.clone, aten.alias, aten._to_copy, aten.to, aten.contiguous,
    aten.feature_dropout, aten.feature_dropout_, aten.alpha_dropout, aten.feature_alpha_dropout,
    aten.type_as, aten.sigmoid_, aten.tanh_, aten.relu6, aten.hardtanh, aten.softplus, aten.gelu_,
    aten.max_pool1d, aten.max_pool2d, aten.max_pool3d, aten.avg_pool1d, aten.avg_pool2d, aten.avg_pool3d,
    aten.adaptive_avg_pool1d, aten.adaptive_avg_pool2d, aten._adaptive_avg_pool2d,
    aten.adaptive_avg_pool3d, aten._adaptive_avg_pool3d,
    aten.upsample_nearest1d, aten.upsample_nearest2d, aten.upsample_nearest3d,
    aten._upsample_nearest_exact1d, aten._upsample_nearest_exact2d, aten._upsample_nearest_exact3d,
    aten.upsample_linear1d, aten.upsample_bilinear2d, aten.upsample_bicubic2d, aten.upsample_trilinear3d,
    aten._upsample_bilinear2d_aa, aten._upsample_bicubic2d_aa,
)
_ATEN_BINARY = (aten.add, aten.add_, aten.sub, aten.mul, aten.mul_, aten.div, aten.maximum, aten.minimum)

#: Rows keyed by ATen ``OpOverloadPacket`` (every overload) or ``OpOverload`` (that one);
#: ``_rule_for`` looks the overload up first, then its packet.
ATEN_COUPLING: dict[Any, Callable[[_Analysis, fx.Node], Any]] = {
    **{op: same_channels for op in _ATEN_UNARY},  # activations, dropout, copies, pooling, resizing
    **{op: elementwise for op in _ATEN_BINARY},  # broadcasting: residual adds, SE gates
    aten.cat: concat,  # cat.default(tensors, dim)
    aten.stack: stack,  # parts unioned; sum/mean over the stacked dim 0 reduces them
    aten.concat: concat,
    aten.split_with_sizes: split,  # (x, sizes, dim)
    aten.split: split,  # split.Tensor(x, size, dim): pieces read from the shapes
    aten.chunk: split,
    aten.pad: pad,  # pad.default(x, pad, mode, value): the training IR's F.pad
    aten.constant_pad_nd: pad,  # core ATen's constant pad
    aten.view: reshape,
    aten.reshape: reshape,
    aten._unsafe_view: reshape,
    aten.flatten: flatten,  # flatten.using_ints(x, start_dim, end_dim)
    aten.permute: moves_dims,
    aten.transpose: moves_dims,  # transpose.int(x, dim0, dim1)
    aten.mean: reduce_additive,  # mean.dim(x, dims, keepdim); mean.default (all dims) pins
    aten.sum: reduce_additive,
    aten.linalg_vector_norm: vector_norm,  # (x, ord, dim, keepdim)
    aten.addcmul: elementwise,  # (input, t1, t2, value)
    aten.amax: reduce_spatial,
    aten.unsqueeze: keeps_leading_dims,
    aten.squeeze: keeps_leading_dims,
    aten.slice: aten_slice,  # slice.Tensor(x, dim, start, end, step)
    aten.max_pool2d_with_indices: with_indices,  # core ATen's max pooling: (out, indices)
    aten.max_pool3d_with_indices: with_indices,
    aten.adaptive_max_pool1d: with_indices,
    aten.adaptive_max_pool2d: with_indices,
    aten.adaptive_max_pool3d: with_indices,
    aten.prelu: prelu,  # (x, weight): a (C,) slope goes with the channels, a shared one does not
    aten._prelu_kernel: prelu,  # core ATen's
    aten.group_norm: functional_group_norm,  # (x, num_groups, weight, bias, eps, cudnn)
    aten.pixel_shuffle: pixel_shuffle,  # C·r² → C: blocks of r² channels are one unit
    aten.pixel_unshuffle: pixel_shuffle,  # C → C·r²: each channel repeats
    aten.softmax: softmax,  # softmax.int(x, dim, dtype): per channel unless over them
    aten._softmax: softmax,
    aten.log_softmax: softmax,
    aten._log_softmax: softmax,
    aten.conv1d: conv,  # on one module's weight and bias: as that conv (functional_conv)
    aten.conv2d: conv,
    aten.conv3d: conv,
    aten.convolution: conv,  # core ATen; transposed convs pin
    aten.batch_norm: functional_norm,  # (x, weight, bias, running_mean, running_var, training, ...)
    aten.instance_norm: functional_norm,
    aten._native_batch_norm_legit_no_training: aten_norm_tuple,  # core ATen's eval batch norm
    aten.layer_norm: layer_norm,
    aten.linear: functional_linear,  # (x, w, b) on one module's tensors: as that nn.Linear
    aten.addmm: functional_linear,  # core ATen: addmm(b, x, permute(w, [1, 0]))
    aten.sym_size: no_channels,  # dynamic sizes, not tensors
}
COUPLING.update(ATEN_COUPLING)


def table_rule(table: dict[Any, Any], target: Any) -> Any:
    """``table``'s entry for a call target: the target itself, else (an ATen ``OpOverload``)
    its ``OpOverloadPacket``; None for unknown or unhashable targets."""
    try:
        rule = table.get(target)
    except TypeError:  # unhashable target
        return None
    if rule is None and isinstance(target, torch._ops.OpOverload):
        rule = table.get(target.overloadpacket)
    return rule


#: Rules for call_module nodes, keyed by module type (a subclass that inherits ``forward``
#: uses its base's rule: ``module_rule``).
MODULE_COUPLING: dict[type[nn.Module], Callable[[_Analysis, fx.Node], Any]] = {
    nn.Conv1d: conv,
    nn.Conv2d: conv,
    nn.Conv3d: conv,
    nn.ConvTranspose1d: conv_transpose,
    nn.ConvTranspose2d: conv_transpose,
    nn.ConvTranspose3d: conv_transpose,
    nn.Linear: linear,
    nn.BatchNorm1d: norm_layer,
    nn.BatchNorm2d: norm_layer,
    nn.BatchNorm3d: norm_layer,
    nn.InstanceNorm1d: norm_layer,
    nn.InstanceNorm2d: norm_layer,
    nn.InstanceNorm3d: norm_layer,
    nn.GroupNorm: group_norm,
    nn.PReLU: prelu,
    nn.PixelShuffle: pixel_shuffle,
    nn.PixelUnshuffle: pixel_shuffle,
    nn.Softmax: softmax,
    nn.LogSoftmax: softmax,
    nn.LayerNorm: layer_norm,
    nn.Flatten: flatten,
    **{m: same_channels for m in _UNARY_MODULES},
}


def module_rule(table: dict[type[nn.Module], Any], mod: nn.Module) -> Any:
    """The entry of ``table`` for ``mod``'s type, or for the nearest base class in the table
    whose ``forward`` it inherits (``class FrozenBN(nn.BatchNorm2d)`` with no ``forward`` of
    its own is a BatchNorm2d; one with its own ``forward`` is traced into instead)."""
    for cls in type(mod).__mro__:
        if cls in table:
            return table[cls] if type(mod).forward is cls.forward else None
    return None


def known_module(mod: nn.Module) -> bool:
    """Does a rule describe ``mod`` (itself, or a base whose ``forward`` it inherits)? Such
    modules are kept as one call when tracing."""
    return module_rule(MODULE_COUPLING, mod) is not None


#: Rules that read channels at any dim (``_Analysis.dim``); the others see only values whose
#: channels are dim 1, and a channels-last input pins.
ANY_DIM = frozenset(
    {same_channels, layer_norm, linear, elementwise, concat, split, getitem, moves_dims,
     keeps_leading_dims, reduce_spatial, reduce_additive, vector_norm, reshape, functional_norm, no_channels,
     aten_slice, functional_linear, softmax, stack}
)


def _rule_for(a: _Analysis, node: fx.Node) -> Callable[[_Analysis, fx.Node], Any] | None:
    if node.op == "call_module":
        return module_rule(MODULE_COUPLING, a.module(node))
    return table_rule(COUPLING, node.target)
