"""Shrink pass: physically remove pruned channels, so the model is genuinely smaller and faster.

Given the channels to keep in each group (a ``PrunePlan``), this rewrites a copy of the graph:
conv/linear weights and biases, norm parameters and running statistics, ``groups`` of
depthwise convs, and the shape constants baked into the graph (split sizes, pad widths,
channel slices, reshape sizes). The result is an ordinary ``GraphModule``: it runs,
re-traces, saves, loads and exports like any other model, and its output equals the
original's with the removed channels zeroed (``passes.mask.mask_channels``).

A plan may also empty a *droppable* group (``passes.depth.droppable_groups``: the inner
channels of a residual block): the convs that read it then compute their bias alone, a
per-channel constant, which is folded (in eval mode) through the pointwise ops after it into
one buffer; the block's branch disappears and its add reads the buffer (depth pruning).
"""

from __future__ import annotations

import copy
import math
import operator
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from ehap_fx.passes._analysis import module_rule, table_rule
from ehap_fx.passes._layers import (
    _FUNCTIONAL_CONV_PACKETS,
    _FUNCTIONAL_CONV_TRANSPOSE_PACKETS,
    _FUNCTIONAL_CONV_TRANSPOSES,
    _FUNCTIONAL_CONVS,
    _arg,
    _get_attr,
    aten,
    conv_groups_at,
    functional_conv,
    functional_conv_transpose,
    functional_linear_spec,
    is_transposed_conv,
)
from ehap_fx.passes.coupling import is_binary
from ehap_fx.passes.depth import droppable_groups, folded_nodes, reads_no_channel
from ehap_fx.passes.group import (
    ChannelGroups,
    ChannelSlots,
    KeptChannels,
    group_channels,
    groups_of,
)
from ehap_fx.passes.trace import refresh_shapes
from torch import fx, nn
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from ehap_fx import _meta
from ehap_fx.errors import ShrinkError


@dataclass(frozen=True)
class PrunePlan:
    """Which channels of each group survive: ``keep[group_id]`` lists kept channel indices.

    Groups that are not named keep all their channels.
    """

    keep: Mapping[int, tuple[int, ...]] = field(default_factory=dict)

    @classmethod
    def removing(cls, groups: ChannelGroups, remove: Mapping[int, Any]) -> PrunePlan:
        """The plan that removes ``remove[group_id]`` (channel indices) from each named group."""
        keep = {}
        for gid, idx in remove.items():
            drop = {int(i) for i in idx}
            keep[gid] = tuple(i for i in range(groups[gid].size) if i not in drop)
        return cls(keep)

    def validate(self, groups: ChannelGroups) -> None:
        """Raise ShrinkError naming the first group the plan cannot apply to."""
        for gid, kept in self.keep.items():
            if not 0 <= gid < len(groups):
                raise ShrinkError(f"plan names group {gid}, but the graph has {len(groups)} groups")
            g = groups[gid]
            if sorted(kept) == list(range(g.size)):  # every channel, once: nothing is removed
                continue
            if not g.prunable:
                raise ShrinkError(f"group {gid} is pinned ({g.pinned}) and cannot lose channels")
            if kept and (len(set(kept)) != len(kept) or min(kept) < 0 or max(kept) >= g.size):
                raise ShrinkError(f"group {gid} keep={kept} must be distinct indices in [0, {g.size})")

    def check_widths(self, gm: fx.GraphModule) -> None:
        """Raise ShrinkError if a value of ``gm`` would be left with no channels at all.

        A group may lose every channel when each tensor it lives in keeps others: the zero
        channels an option-A shortcut pads on (the tensors also carry the previous stage's
        channels) can go entirely, which a per-group floor of one channel would forbid. So
        may a droppable group (``droppable_groups``): its values vanish with its branch.
        """
        keep = KeptChannels(groups_of(gm), self.masks(groups_of(gm)))
        dropped = droppable_groups(gm) & {g for g, k in self.keep.items() if not k}
        for node in gm.graph.nodes:
            if keep.count(node) == 0:
                emptied = {int(g) for g in node.meta[_meta.CHANNELS].group}
                if emptied <= dropped:
                    continue
                emptied = sorted(emptied)
                raise ShrinkError(
                    f"{node.format_node()} would keep no channel: keep at least one "
                    f"channel of group(s) {emptied}"
                )

    def masks(self, groups: ChannelGroups) -> list[torch.Tensor]:
        """One boolean keep-mask per group."""
        out = []
        for g in groups:
            m = torch.ones(g.size, dtype=torch.bool)
            if g.id in self.keep:
                m[:] = False
                m[list(self.keep[g.id])] = True
            out.append(m)
        return out


class _Keep(KeptChannels):
    """A ``KeptChannels`` that is called on a node, as the rewrite rules want it."""

    def __init__(self, groups: ChannelGroups, plan: PrunePlan):
        super().__init__(groups, plan.masks(groups))

    def __call__(self, node: fx.Node, dim: int = 1) -> torch.Tensor:
        return self.mask(node, dim)


# ---------------------------------------------------------------------------------------------
# Rewrite rules
# ---------------------------------------------------------------------------------------------


def _param(t: torch.Tensor | None, index: torch.Tensor, dim: int = 0) -> nn.Parameter | None:
    if t is None:
        return None
    return nn.Parameter(t.detach().index_select(dim, index).clone(), requires_grad=t.requires_grad)


def _idx(mask: torch.Tensor) -> torch.Tensor:
    return mask.nonzero().flatten()


def shrink_functional_conv(gm: fx.GraphModule, node: fx.Node, keep: _Keep) -> None:
    """``F.conv2d(x, m.weight, m.bias, ..., groups)`` of a conv subclass: shrink its tensors
    as a conv module's, and the ``groups`` literal with them."""
    spec = functional_conv(gm, node)
    if spec is None:
        return
    if spec.standardized is not None:
        _shrink_standardized_conv(gm, node, spec, keep)
        return
    _shrink_conv_module(spec, keep(node.args[0]), keep(node))
    holder = gm.get_submodule(spec.owner)
    holder.weight = spec.weight
    if spec.bias is not None:
        holder.bias = spec.bias
    if _arg_present(node, conv_groups_at(node), "groups"):
        _set_arg(node, conv_groups_at(node), "groups", spec.groups)


def _shrink_standardized_conv(gm: fx.GraphModule, node: fx.Node, spec: Any, keep: _Keep) -> None:
    """A conv on a standardised weight (``passes._layers.StandardizedWeight``): the parameter
    loses the removed output rows (each is standardised over its own columns) and the
    ``(1, O, -1)`` reshape its count; removed input channels stay in the parameter, whose row
    statistics read them, and the conv reads the kept columns of the standardised weight
    (``index_select`` on dim 1, its index a buffer of the module)."""
    computed, holder = spec.standardized, gm.get_submodule(spec.owner)
    k_out = _idx(keep(node))
    holder.weight = _param(holder.weight, k_out)  # (O_keep, I/g, k...)
    if spec.bias is not None:
        holder.bias = _param(spec.bias, k_out)
    if computed.gain:  # timm's ScaledStdConv2d: a gain (O, 1, 1, 1) per row
        owner, _, name = computed.gain[0].target.rpartition(".")
        module = gm.get_submodule(owner)
        setattr(module, name, _param(getattr(module, name), k_out))
    flat = computed.flat
    _set_shape(flat, 1, len(k_out))  # reshape(w, (1, O_keep, -1))
    g = spec.groups
    if g == spec.in_channels == spec.out_channels:  # depthwise: in == out channels
        _set_arg(node, conv_groups_at(node), "groups", len(k_out))
        return
    per_in = spec.in_channels // g
    in_pos = _idx(keep(node.args[0]).reshape(g, per_in)[0])  # grouped: the same positions in every group
    if len(in_pos) == per_in:
        return
    columns = in_pos if spec.in_columns is None else spec.in_columns[in_pos]  # (I_keep/g,) of the param's
    if computed.index is not None:
        owner, _, name = computed.index.target.rpartition(".")
        setattr(gm.get_submodule(owner), name, columns.clone())
        return
    name = fresh_attr(holder, "ehap_in_columns")
    holder.register_buffer(name, columns.clone())
    aten_graph = isinstance(node.target, torch._ops.OpOverload)
    gather = aten.index_select.default if aten_graph else torch.index_select
    with gm.graph.inserting_before(node):
        index = gm.graph.get_attr(f"{spec.owner}.{name}")
        picked = gm.graph.call_function(gather, (computed.back, 1, index))  # (O_keep, I_keep/g, k...)
    _set_arg(node, 1, "weight", picked)


def _set_shape(node: fx.Node, dim: int, size: int) -> None:
    """Set entry ``dim`` of the literal shape of a ``reshape``/``view`` call, spelt
    ``x.reshape(a, b, c)`` or ``reshape(x, (a, b, c))``."""
    x, *rest = node.args
    unpacked = len(rest) != 1 or not isinstance(rest[0], (list, tuple))
    shape = list(rest if unpacked else rest[0])
    shape[dim] = size
    node.args = (x, *shape) if unpacked else (x, type(rest[0])(shape))


def _arg_present(node: fx.Node, pos: int, name: str) -> bool:
    return len(node.args) > pos or name in node.kwargs


def shrink_conv(gm: fx.GraphModule, node: fx.Node, keep: _Keep) -> None:
    _shrink_conv_module(gm.get_submodule(node.target), keep(node.args[0]), keep(node))


def _shrink_conv_module(conv: nn.Module, k_in: torch.Tensor, k_out: torch.Tensor) -> None:
    g = conv.groups
    if g == conv.in_channels == conv.out_channels:  # depthwise: in == out channels
        conv.groups = int(k_out.sum())
        conv.in_channels = conv.out_channels = conv.groups
        conv.weight = _param(conv.weight, _idx(k_out))  # (C_keep, 1, kh, kw)
        conv.bias = _param(conv.bias, _idx(k_out))
        return
    per_in = conv.in_channels // g
    in_pos = _idx(k_in.reshape(g, per_in)[0])  # grouped: the same positions in every group
    w = conv.weight.detach().index_select(0, _idx(k_out)).index_select(1, in_pos)
    conv.weight = nn.Parameter(
        w.clone(), requires_grad=conv.weight.requires_grad
    )  # (O_keep, I_keep/g, kh, kw)
    conv.bias = _param(conv.bias, _idx(k_out))
    conv.in_channels, conv.out_channels = len(in_pos) * g, int(k_out.sum())


def shrink_conv_transpose(gm: fx.GraphModule, node: fx.Node, keep: _Keep) -> None:
    """Input channels only (weight dim 0): its outputs are pinned (``passes._layer_rules.conv_transpose``)."""
    _shrink_conv_transpose_weight(gm.get_submodule(node.target), keep(node.args[0]))


def shrink_functional_conv_transpose(gm: fx.GraphModule, node: fx.Node, keep: _Keep) -> None:
    """``aten.conv_transpose2d(x, m.weight, m.bias, ...)`` / ``F.conv_transpose2d`` on a
    module's own tensors: slice ``m.weight`` as ``shrink_conv_transpose`` does (its bias goes
    with the pinned outputs)."""
    spec = functional_conv_transpose(gm, node)
    if spec is None:
        return
    _shrink_conv_transpose_weight(spec, keep(node.args[0]))
    gm.get_submodule(spec.owner).weight = spec.weight


def shrink_convolution(gm: fx.GraphModule, node: fx.Node, keep: _Keep) -> None:
    """Core ATen's ``aten.convolution``: a conv or a transposed one (its ``transposed`` flag)."""
    rewrite = shrink_functional_conv_transpose if is_transposed_conv(node) else shrink_functional_conv
    rewrite(gm, node, keep)


def _shrink_conv_transpose_weight(conv: Any, k_in: torch.Tensor) -> None:
    index = _idx(k_in)
    conv.weight = nn.Parameter(conv.weight.detach().index_select(0, index).clone(),
                               requires_grad=conv.weight.requires_grad)  # (I_keep, O/groups, k...)
    conv.in_channels = len(index)


def shrink_linear(gm: fx.GraphModule, node: fx.Node, keep: _Keep) -> None:
    lin = gm.get_submodule(node.target)
    k_in, k_out = _idx(keep(node.args[0], -1)), _idx(keep(node, -1))  # features: the last dim
    lin.weight = nn.Parameter(lin.weight.detach()[k_out][:, k_in].clone())  # (O_keep, I_keep)
    lin.bias = _param(lin.bias, k_out)
    lin.in_features, lin.out_features = len(k_in), len(k_out)


def shrink_norm(gm: fx.GraphModule, node: fx.Node, keep: _Keep) -> None:
    norm = gm.get_submodule(node.target)
    k = _idx(keep(node))
    for name in ("weight", "bias"):
        if getattr(norm, name, None) is not None:
            setattr(norm, name, _param(getattr(norm, name), k))
    for name in ("running_mean", "running_var"):
        if getattr(norm, name, None) is not None:
            setattr(norm, name, getattr(norm, name).index_select(0, k).clone())
    if isinstance(norm, nn.GroupNorm):
        per_group = norm.num_channels // norm.num_groups
        norm.num_channels = len(k)
        norm.num_groups = len(k) // per_group
    else:
        norm.num_features = len(k)


def shrink_prelu(gm: fx.GraphModule, node: fx.Node, keep: _Keep) -> None:
    """``nn.PReLU`` with a slope per channel loses the removed channels' slopes."""
    mod = gm.get_submodule(node.target)
    if mod.num_parameters > 1:
        k = _idx(keep(node))
        mod.weight = _param(mod.weight, k)
        mod.num_parameters = len(k)


def shrink_functional_group_norm(gm: fx.GraphModule, node: fx.Node, keep: _Keep) -> None:
    """``F.group_norm`` / ``aten.group_norm``: whole groups went, so ``num_groups`` shrinks by
    the same factor as the channels (its tensors are ``get_attr`` s, sliced as constants)."""
    k = keep(node)  # (C,) bool over the channels before shrinking
    per_group = len(k) // _arg(node, 1, "num_groups")
    _set_arg(node, 1, "num_groups", int(k.sum()) // per_group)


def shrink_constant(gm: fx.GraphModule, node: fx.Node, keep: _Keep) -> None:
    """A per-channel constant read with ``get_attr`` (``(1, C, 1, ...)``, a layer scale
    ``(C, 1, 1)``) loses the removed channels."""
    owner, _, name = node.target.rpartition(".")
    module = gm.get_submodule(owner)
    value = getattr(module, name)
    dim = node.meta[_meta.CHANNELS].dim  # 1 for (1, C, 1, 1), 0 for a layer scale (C, 1, 1)
    sliced = value.detach().index_select(dim, _idx(keep(node, dim))).clone()
    if isinstance(value, nn.Parameter):
        sliced = nn.Parameter(sliced, requires_grad=value.requires_grad)
    setattr(module, name, sliced)


def shrink_pad(gm: fx.GraphModule, node: fx.Node, keep: _Keep) -> None:
    widths = node.args[1] if len(node.args) > 1 else node.kwargs["pad"]
    if not isinstance(widths, (tuple, list)):
        return  # one value computed at run time (a leaf's output): the coupling rule pinned the channels
    widths = list(widths)
    if len(widths) // 2 != len(node.meta["tensor_meta"].shape) - 1:
        return  # the channel dim is not padded
    if not all(isinstance(w, int) and w >= 0 for w in widths[-2:]):
        return  # widths computed at run time, or a crop: the coupling rule pinned the channels
    k = keep(node)
    front, back = widths[-2], widths[-1]
    widths[-2], widths[-1] = int(k[:front].sum()), int(k[len(k) - back :].sum())
    _set_arg(node, 1, "pad", tuple(widths))


def shrink_split(gm: fx.GraphModule, node: fx.Node, keep: _Keep) -> None:
    sizes = _kept_split_sizes(node, keep)
    if sizes is None:
        return
    # chunk(x, n, 1) cannot express unequal pieces: it becomes split(x, sizes, 1)
    dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)
    node.target = torch.split if node.op == "call_function" else "split"
    node.args = (node.args[0], sizes, dim)
    node.kwargs = {}


def shrink_aten_split(gm: fx.GraphModule, node: fx.Node, keep: _Keep) -> None:
    """``aten.split`` / ``chunk`` / ``split_with_sizes`` of channels: ``split_with_sizes``."""
    sizes = _kept_split_sizes(node, keep)
    if sizes is not None:
        dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)
        node.target = aten.split_with_sizes.default
        node.args, node.kwargs = (node.args[0], sizes, dim), {}


def _kept_split_sizes(node: fx.Node, keep: _Keep) -> list[int] | None:
    """The kept size of each piece of a split of the channels (at dim 1, or at the last dim of
    attention heads: LeViT's q, k, v); None for a split of another dim (each piece then has all
    the channels: CvT's ``split(tokens, [1, h * w], 1)`` of ``(N, 1 + h·w, C)``, channels at
    dim 2, cuts off the class token)."""
    slots = node.meta[_meta.CHANNELS]  # one ChannelSlots per piece, at the input's channel dim
    ndim = len(node.args[0].meta["tensor_meta"].shape)
    dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)
    if any(s.dim != dim % ndim for s in slots):
        return None
    sizes = [int(keep.of(s).sum()) for s in slots]
    if 0 in sizes:
        raise ShrinkError(f"{node.format_node()}: the plan empties piece {sizes.index(0)} of the split")
    return sizes


def shrink_aten_slice(gm: fx.GraphModule, node: fx.Node, keep: _Keep) -> None:
    """``aten.slice.Tensor(x, dim, start, end)`` of the channels: the bounds of the kept ones."""
    source, dim = node.args[0], _arg(node, 1, "dim", 0)
    slots, ndim = source.meta[_meta.CHANNELS], len(source.meta["tensor_meta"].shape)
    if dim % ndim != slots.dim:
        return  # another dim: nothing about channels baked in
    start, stop, _ = slice(_arg(node, 2, "start"), _arg(node, 3, "end")).indices(len(slots))
    k_in = keep(source, slots.dim)
    new = (int(k_in[:start].sum()), int(k_in[:stop].sum()))
    if new[0] == new[1]:
        raise ShrinkError(f"{node.format_node()}: the plan empties the channel slice")
    node.args, node.kwargs = (source, dim, *new, _arg(node, 4, "step", 1)), {}


def shrink_functional_linear(gm: fx.GraphModule, node: fx.Node, keep: _Keep) -> None:
    """``aten.linear`` / ``aten.addmm`` on a module's tensors: slice them as ``shrink_linear``."""
    spec = functional_linear_spec(gm, node)
    if spec is None:
        return
    holder = gm.get_submodule(spec.owner)
    k_in, k_out = _idx(keep(spec.input, -1)), _idx(keep(node, -1))  # features: the last dim
    holder.weight = nn.Parameter(spec.weight.detach()[k_out][:, k_in].clone())  # (O_keep, I_keep)
    if spec.bias is not None:
        holder.bias = _param(spec.bias, k_out)


def shrink_getitem(gm: fx.GraphModule, node: fx.Node, keep: _Keep) -> None:
    source, idx = node.args
    if not isinstance(idx, tuple) or len(idx) < 2 or not isinstance(idx[1], slice) or idx[1] == slice(None):
        return
    if source.meta[_meta.CHANNELS].dim != 1:
        return  # channels elsewhere: the index leaves them whole (coupling.getitem)
    start, stop, _ = idx[1].indices(len(source.meta[_meta.CHANNELS]))
    k_in = keep(source)
    new = slice(int(k_in[:start].sum()), int(k_in[:stop].sum()))
    if new.start == new.stop:
        raise ShrinkError(f"{node.format_node()}: the plan empties the channel slice")
    node.args = (source, (idx[0], new, *idx[2:]))


def shrink_reshape(gm: fx.GraphModule, node: fx.Node, keep: _Keep) -> None:
    """Rewrite a literal channel size in view/reshape (e.g. ``x.view(n, 512 * 7 * 7)``)."""
    x, *rest = node.args
    unpacked = len(rest) != 1 or not isinstance(rest[0], (list, tuple))  # view(n, c) vs view((n, c))
    shape = list(rest if unpacked else rest[0])
    dim = node.meta[_meta.CHANNELS].dim  # 2 after a channel split (N, g, C/g, ...)
    if len(shape) <= dim or not isinstance(shape[dim], int) or shape[dim] == -1:
        return  # the channel size is computed at run time (or inferred): nothing baked in
    shape[dim] = int(keep(node, dim).sum())
    node.args = (x, *shape) if unpacked else (x, tuple(shape))


def shrink_channel_mean(gm: fx.GraphModule, node: fx.Node, keep: _Keep) -> None:
    """A mean over the channels (GRN's ``x_g.mean(dim=-1, keepdim=True)``, ``reduce_additive``):
    the masked original averages the kept channels and the zeroed ones, dividing by all ``C``;
    the shrunk graph sums the kept channels and divides by that same dense count."""
    x, dims = node.args[0], _arg(node, 1, "dim")
    slots = x.meta.get(_meta.CHANNELS) if isinstance(x, fx.Node) else None
    if dims is None or not isinstance(slots, ChannelSlots):
        return  # a mean over all dims pins its input: nothing removed
    shape = x.meta["tensor_meta"].shape  # the dense shape: meta is refreshed after the rewrite
    dims = {d % len(shape) for d in ((dims,) if isinstance(dims, int) else dims)}
    if slots.dim % len(shape) not in dims or bool(keep(x, slots.dim).all()):
        return  # over other dims, or no channel removed
    count = math.prod(int(shape[d]) for d in dims)  # (N, ..., C, ...) → C·(other reduced sizes)
    aten_graph = isinstance(node.target, torch._ops.OpOverload)
    node.target = {"mean": "sum", torch.mean: torch.sum}.get(node.target, aten.sum.dim_IntList)
    divide = aten.div.Tensor if aten_graph else operator.truediv
    with gm.graph.inserting_after(node):
        div = gm.graph.call_function(divide, (node, float(count)))
    div.meta = dict(node.meta)
    node.replace_all_uses_with(div, delete_user_cb=lambda user: user is not div)


def shrink_attention(gm: fx.GraphModule, node: fx.Node, keep: _Keep) -> None:
    """``scaled_dot_product_attention`` without a ``scale`` scales by ``1/sqrt(E)``, E the size
    of q's last dim: when q's channels shrink, the dense scale (the masked original's) is
    written in."""
    q = node.args[0]
    slots = q.meta.get(_meta.CHANNELS) if isinstance(q, fx.Node) else None
    if node.kwargs.get("scale") is not None or not isinstance(slots, ChannelSlots):
        return
    dense = int(q.meta["tensor_meta"].shape[-1])  # the dense shape: meta is refreshed after the rewrite
    if not bool(keep(q, slots.dim).all()):
        node.kwargs = {**node.kwargs, "scale": 1 / math.sqrt(dense)}


def _set_arg(node: fx.Node, pos: int, name: str, value: Any) -> None:
    if len(node.args) > pos:
        args = list(node.args)
        args[pos] = value
        node.args = tuple(args)
    else:
        node.kwargs = {**node.kwargs, name: value}


#: Rewrites for call_module nodes by module type.
MODULE_SHRINK: dict[type[nn.Module], Callable[[fx.GraphModule, fx.Node, _Keep], None]] = {
    nn.Conv1d: shrink_conv,
    nn.Conv2d: shrink_conv,
    nn.Conv3d: shrink_conv,
    nn.ConvTranspose1d: shrink_conv_transpose,
    nn.ConvTranspose2d: shrink_conv_transpose,
    nn.ConvTranspose3d: shrink_conv_transpose,
    nn.Linear: shrink_linear,
    nn.BatchNorm1d: shrink_norm,
    nn.BatchNorm2d: shrink_norm,
    nn.BatchNorm3d: shrink_norm,
    nn.InstanceNorm1d: shrink_norm,
    nn.InstanceNorm2d: shrink_norm,
    nn.InstanceNorm3d: shrink_norm,
    nn.GroupNorm: shrink_norm,
    nn.PReLU: shrink_prelu,
}

#: Rewrites for call_function targets / call_method names that bake in channel counts.
SHRINK: dict[Any, Callable[[fx.GraphModule, fx.Node, _Keep], None]] = {
    torch.nn.functional.pad: shrink_pad,
    **dict.fromkeys(_FUNCTIONAL_CONVS, shrink_functional_conv),
    **dict.fromkeys(_FUNCTIONAL_CONV_PACKETS, shrink_functional_conv),  # every overload (conv2d.padding)
    **dict.fromkeys(_FUNCTIONAL_CONV_TRANSPOSES, shrink_functional_conv_transpose),
    **dict.fromkeys(_FUNCTIONAL_CONV_TRANSPOSE_PACKETS, shrink_functional_conv_transpose),
    aten.convolution.default: shrink_convolution,  # core ATen: transposed or not
    aten.convolution: shrink_convolution,
    torch.nn.functional.group_norm: shrink_functional_group_norm,
    aten.group_norm: shrink_functional_group_norm,
    torch.split: shrink_split,
    "split": shrink_split,
    torch.chunk: shrink_split,
    "chunk": shrink_split,
    operator.getitem: shrink_getitem,
    "view": shrink_reshape,
    "reshape": shrink_reshape,
    torch.reshape: shrink_reshape,
    torch.mean: shrink_channel_mean,
    "mean": shrink_channel_mean,
    torch.nn.functional.scaled_dot_product_attention: shrink_attention,
    # ATen spellings (torch.export graphs; packets cover every overload)
    aten.split: shrink_aten_split,
    aten.split_with_sizes: shrink_aten_split,
    aten.chunk: shrink_aten_split,
    aten.slice: shrink_aten_slice,
    aten.pad: shrink_pad,
    aten.constant_pad_nd: shrink_pad,
    aten.view: shrink_reshape,
    aten.reshape: shrink_reshape,
    aten._unsafe_view: shrink_reshape,
    aten.linear: shrink_functional_linear,
    aten.addmm: shrink_functional_linear,
    aten.mean: shrink_channel_mean,
    aten.scaled_dot_product_attention: shrink_attention,
}


def _rewrite(gm: fx.GraphModule, node: fx.Node, keep: _Keep) -> None:
    if node.op == "call_module":
        rule = module_rule(MODULE_SHRINK, gm.get_submodule(node.target))
    elif node.op in ("call_function", "call_method"):
        rule = table_rule(SHRINK, node.target)
    elif node.op == "get_attr":
        rule = shrink_constant
    else:
        rule = None
    if rule is not None and _meta.CHANNELS in node.meta:
        rule(gm, node, keep)


def shrink(gm: fx.GraphModule, plan: PrunePlan) -> PassResult:
    """Return a copy of ``gm`` with the channels not kept by ``plan`` physically removed.

    ``gm`` must carry channel groups (``group_channels``); it is not modified. The result has
    fresh shapes and fresh channel groups, ready for another round of pruning.
    """
    groups = groups_of(gm)
    plan.validate(groups)
    plan.check_widths(gm)
    out = copy.deepcopy(gm)
    keep = _Keep(groups, plan)
    record_kept(out, keep)
    fold_dropped_branches(out, keep)
    for node in out.graph.nodes:
        _rewrite(out, node, keep)
    out.graph.lint()
    out.recompile()
    refresh_shapes(out)
    group_channels(out, groups.exclude)
    out.meta[_meta.PLAN] = plan
    modified = any(len(k) < groups[g].size for g, k in plan.keep.items())
    return PassResult(out, modified)


def record_kept(gm: fx.GraphModule, keep: KeptChannels) -> None:
    """``node.meta[KEPT]``: the channels each node's output keeps, as indices into the graph's
    channels before its first shrink (composed with what an earlier shrink recorded), so a pass
    can pair a pruned value with the dense one (``passes.compensate``). In place."""
    for node in gm.graph.nodes:
        slots = node.meta.get(_meta.CHANNELS)
        if not isinstance(slots, ChannelSlots):
            continue
        kept = _idx(keep.of(slots)).tolist()
        before = node.meta.get(_meta.KEPT)
        node.meta[_meta.KEPT] = tuple(before[i] for i in kept) if before is not None else tuple(kept)


def fold_dropped_branches(gm: fx.GraphModule, keep: KeptChannels) -> None:
    """Replace each conv/linear whose input keeps no channel by its output, the per-channel
    constant ``bias`` (zeros without one), fold it forward through pointwise ops (norms in
    eval mode) and read the result from a buffer; the dead branch is erased. In place."""
    values: dict[fx.Node, torch.Tensor] = {}
    with torch.no_grad():
        for node in folded_nodes(gm, keep.count):
            if reads_no_channel(gm, node, keep.count):
                mod = gm.get_submodule(node.target)
                shape = node.meta["tensor_meta"].shape
                bias = mod.bias.detach() if mod.bias is not None else torch.zeros(shape[1])
                values[node] = bias.reshape(1, -1, *[1] * (len(shape) - 2)).clone()
            else:
                values[node] = _evaluate(gm, node, values)
    for node, value in values.items():
        live = [u for u in node.users if u not in values]
        if not live:
            continue
        if not all(is_binary(u) for u in live):
            raise ShrinkError(
                f"{live[0].format_node()}: the plan turns its input {node.name} into a "
                "constant, which only a binary op (a residual add) can absorb; keep a "
                "channel of the group feeding it"
            )
        name = fresh_attr(gm, f"{node.name}_constant")
        gm.register_buffer(name, value)
        with gm.graph.inserting_before(node):
            const = gm.graph.get_attr(name)
        if _meta.CHANNELS in node.meta:
            const.meta[_meta.CHANNELS] = node.meta[_meta.CHANNELS]
        node.replace_all_uses_with(const)
    if values:
        used_before = {n.target for n in gm.graph.nodes if n.op == "call_module"}
        gm.graph.eliminate_dead_code()
        used_after = {n.target for n in gm.graph.nodes if n.op == "call_module"}
        for target in used_before - used_after:
            gm.delete_submodule(target)


def _evaluate(gm: fx.GraphModule, node: fx.Node, values: Mapping[fx.Node, torch.Tensor]) -> torch.Tensor:
    """``node``'s value from the folded ``values`` of its inputs; static inputs (parameters and
    ops of them, ``is_static``) are evaluated from ``gm``'s attributes."""
    if node.op == "get_attr":
        return _get_attr(gm, node.target).detach().clone()
    args, kwargs = fx.node.map_arg(
        (node.args, node.kwargs), lambda a: values[a].clone() if a in values else _evaluate(gm, a, values)
    )
    if node.op == "call_function":
        return node.target(*args, **kwargs)
    if node.op == "call_method":
        return getattr(args[0], node.target)(*args[1:], **kwargs)
    mod = gm.get_submodule(node.target)
    training = mod.training
    try:
        return mod.eval()(*args, **kwargs)
    finally:
        mod.train(training)


def fresh_attr(gm: fx.GraphModule, name: str) -> str:
    """``name``, or ``name_1``, ``name_2``, ...: the first that is not an attribute of ``gm``."""
    candidate, i = name, 1
    while hasattr(gm, candidate):
        candidate, i = f"{name}_{i}", i + 1
    return candidate


class Shrink(PassBase):
    """``shrink`` as a ``PassBase`` for a ``PassManager`` pipeline."""

    def __init__(self, plan: PrunePlan):
        super().__init__()
        self.plan = plan

    def requires(self, graph_module: fx.GraphModule) -> None:
        groups_of(graph_module)

    def call(self, graph_module: fx.GraphModule) -> PassResult:
        return shrink(graph_module, self.plan)
