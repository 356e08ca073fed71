"""Coupling rules of ops that keep, move, slice or join channels without parameters of their own:
activations and copies (``same_channels``), broadcasting binary ops, ``cat``/``stack``/``split``,
indexing and slicing, ``pad``, reshapes, reductions, ``permute``, ``softmax``, pixel shuffles.

Each rule is ``rule(a: Analysis, node) -> labels`` (``passes._analysis``); the tables that say
which op each serves are in ``passes.coupling``.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from ehap_fx.passes._analysis import Analysis, Labels, Pin, _flat_args, _norm_dim, _shape
from ehap_fx.passes._layers import _arg
from torch import fx
from torch.fx.passes.shape_prop import TensorMetadata

aten = torch.ops.aten


def same_channels(a: Analysis, node: fx.Node) -> Labels:
    """Channel c of the output is computed from channel c of the (first) input only."""
    x = node.args[0] if node.args else None
    labels, dim = a.labels(x), a.dim(x)
    src, out = _shape(x), _shape(node)
    if labels is None or out is None or src is None or len(out) <= dim or out[dim] != len(labels):
        raise Pin("output does not keep the input's channel dim")
    if dim != 1 and len(out) != len(src):
        raise Pin(f"op changes the rank of a value whose channels are dim {dim}")
    a.set_dim(node, dim)
    return labels


def elementwise(a: Analysis, node: fx.Node) -> Labels:
    """Broadcasting binary op: operands that carry the output's channel dim are unioned.

    The output's channel dim is that of the operands' labels, which must all align (a
    channels-last value times a ``(C,)`` layer-scale parameter aligns; a channels-first one
    added to a channels-last one does not)."""
    out = _shape(node)
    if out is None or len(out) < 2:
        raise Pin("elementwise op without a channel dim")
    # a one-element operand is a broadcast scalar, whichever dim its labels are
    operands = [(arg, shape) for arg in _flat_args(node) if (shape := _shape(arg)) and math.prod(shape) > 1]
    # where the labelled operands that are not broadcast along their channels put them
    at = set()
    for arg, shape in operands:
        d = a.dim(arg) + len(out) - len(shape)  # the output dim the operand's channels align with
        if a.labels(arg) is not None and 0 <= d < len(out) and (shape[a.dim(arg)] != 1 or out[d] == 1):
            at.add(d)
    if len(at) > 1:
        raise Pin(f"operands carry their channels at different dims {sorted(at)}")
    cdim = at.pop() if at else 1
    carried: list[Labels] = []
    for arg, shape in operands:
        dim = cdim - (len(out) - len(shape))  # the operand's dim aligned with the output's channels
        if dim < 0 or (shape[dim] == 1 and out[cdim] != 1):
            continue  # broadcast along channels: no coupling
        labels = a.labels(arg)
        if dim != a.dim(arg) or labels is None:
            raise Pin(f"operand {arg.name} {tuple(shape)} aligns its dim {dim} with channels")
        carried.append(labels)
    if not carried:
        raise Pin("no operand carries the channels")
    for other in carried[1:]:
        a.uf.union(carried[0], other)
    a.set_dim(node, cdim)
    return carried[0]


def concat(a: Analysis, node: fx.Node) -> Labels:
    """cat along channels concatenates labels; along another dim (batch, tokens, spatial) it
    unions them: channel c of the output is channel c of every part."""
    tensors = _arg(node, 0, "tensors")
    out = _shape(node)
    dim = _norm_dim(_arg(node, 1, "dim", 0), len(out))
    parts = [a.labels(t) for t in tensors]
    if any(p is None for p in parts):
        raise Pin("cat of a value without channel labels")
    dims = {a.dim(t) for t in tensors}
    if len(dims) != 1:
        raise Pin(f"cat of values with their channels at different dims {sorted(dims)}")
    cdim = dims.pop()
    a.set_dim(node, cdim)
    if dim == cdim:
        return np.concatenate(parts)
    for p in parts[1:]:
        a.uf.union(parts[0], p)
    return parts[0]


def stack(a: Analysis, node: fx.Node) -> Labels:
    """stack of same-shaped values (an FPN's merge: ``torch.stack(maps).sum(0)``): channel c of
    every part is one unit; a new dim at or before the channels moves them one dim on."""
    tensors = _arg(node, 0, "tensors")
    parts = [a.labels(t) for t in tensors]
    dims = {a.dim(t) for t in tensors}
    if any(p is None for p in parts) or len(dims) != 1:
        raise Pin("stack of values without channel labels at one dim")
    cdim = dims.pop()
    dim = _norm_dim(_arg(node, 1, "dim", 0), len(_shape(node)))
    for p in parts[1:]:
        a.uf.union(parts[0], p)
    a.set_dim(node, cdim + 1 if dim <= cdim else cdim)
    return parts[0]


def _stacked_dim(a: Analysis, node: Any) -> int | None:
    """The dim a ``stack`` node inserted (None for any other node)."""
    if not isinstance(node, fx.Node) or node.op != "call_function":
        return None
    if a.rules.for_function(node.target) is not stack:
        return None
    return _norm_dim(_arg(node, 1, "dim", 0), len(_shape(node)))


def split(a: Analysis, node: fx.Node) -> tuple[Labels, ...]:
    """split/chunk along channels slice the labels; along another dim each piece keeps them."""
    x = a.labels(node.args[0])
    metas = node.meta.get("tensor_meta")
    dim = _norm_dim(_arg(node, 2, "dim", 0), len(_shape(node.args[0])))
    if x is None or not isinstance(metas, (tuple, list)):
        raise Pin("split of a value without channel labels")
    a.set_dim(node, a.dim(node.args[0]))
    if dim != a.dim(node.args[0]):
        return tuple(x for _ in metas)
    sizes = [int(m.shape[dim]) for m in metas]  # LeViT's q, k, v split off each head at dim 3
    return tuple(np.split(x, np.cumsum(sizes)[:-1]))


def getitem(a: Analysis, node: fx.Node) -> Any:
    """Index a tuple (from split), or slice a tensor: a step-1 slice of channels keeps labels."""
    source, idx = node.args
    value = a.env.get(source)
    if isinstance(value, tuple):
        a.set_dim(node, a.dim(source))  # the pieces of a split keep its channel dim
        return value[idx]
    if value is None:
        raise Pin("indexing a value without channel labels")
    if a.dim(source) != 1:
        new = _moved_channels(idx, a.dim(source))
        if new is None:
            raise Pin(f"index {idx!r} of a value with channels at dim {a.dim(source)}")
        a.set_dim(node, new)
        return value
    dims = _channel_index(idx)
    if dims is None:
        raise Pin(f"index {idx!r} moves or reorders the channel dim")
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


def pad(a: Analysis, node: fx.Node) -> Labels:
    """F.pad: padding on the channel dim adds fresh zero channels (a pruned one shrinks the pad)."""
    x = a.labels(node.args[0])
    widths = _arg(node, 1, "pad")
    ndim = len(_shape(node.args[0]))
    if x is None or not isinstance(widths, (tuple, list)) or a.dim(node.args[0]) != 1:
        raise Pin("pad with unknown widths")
    covered = len(widths) // 2  # pad pairs apply to the last `covered` dims
    if covered > ndim - 1:
        raise Pin("pad of the batch dim")
    if covered < ndim - 1:
        return x  # spatial only: widths may be computed at run time ("same" padding)
    if any(isinstance(w, fx.Node) for w in widths):
        raise Pin("channel pad with widths computed at run time")
    front, back = widths[-2], widths[-1]
    if front < 0 or back < 0:
        raise Pin(f"negative channel pad {front, back}")
    mode = "constant" if node.target is aten.constant_pad_nd.default else _arg(node, 2, "mode", "constant")
    if mode != "constant" and (front or back):
        raise Pin("non-constant channel pad")
    zf, zb = a.uf.fresh(front), a.uf.fresh(back)
    a.touch(
        node,
        "pad",
        1,
        np.concatenate([zf, zb]),
        np.concatenate([np.arange(front), np.arange(front + len(x), front + len(x) + back)]),
    )
    return np.concatenate([zf, x, zb])


def reshape(a: Analysis, node: fx.Node) -> Labels:
    """view/reshape/flatten with the batch dim kept: channel c ↔ a block of output features.

    ``(N, C, H, W) → (N, C*H*W)`` repeats each label ``H*W`` times. Merging blocks of
    channels into one, ``(N, 1024) → (N, 64, 4, 4)``, unions each block (its 16 features go
    together). Splitting the channels into ``(N, g, C/g, ...)`` (a channel shuffle's first
    step) unions channel j of every group and puts the labels at dim 2; merging ``(N, A, B,
    ...)`` with channels at dim 2 back into ``(N, A*B, ...)`` tiles them. Anything else pins.
    """
    x = a.labels(node.args[0])
    src, dst = _shape(node.args[0]), _shape(node)
    moved = _channels_moved(x, src, dst, a.dim(node.args[0]))
    if moved is not None:
        a.set_dim(node, moved)
        return x
    if x is None or src is None or dst is None or len(dst) < 2 or src[0] != dst[0]:
        raise Pin("reshape that does not keep the batch dim")
    cdim = a.dim(node.args[0])
    if cdim >= 2:
        return _heads(a, node, x, src, dst, cdim)
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
    raise Pin(f"reshape {tuple(src)} → {tuple(dst)} mixes channels")


def _channels_moved(x: Labels | None, src: Any, dst: Any, cdim: int) -> int | None:
    """Where a reshape that leaves the channels whole puts them: a ``(C,)`` parameter viewed
    as ``(1, C, 1, 1)``; ``(N·T, C)`` ↔ ``(N, T, C)``, ``(N, T, C)`` ↔ ``(N, h, w, C)`` (only
    the dims before the channels regrouped). None for any other reshape."""
    if x is None or src is None or dst is None:
        return None
    if cdim == 0:
        return _unit_dims_moved(src, dst, 0)
    if cdim == 1 and src[0] == dst[0]:
        return None  # the batch dim and the channels stay: the rules below (size-1 dims are ambiguous)
    return _leading_dims_regrouped(src, dst, cdim)


def _leading_dims_regrouped(src: Any, dst: Any, cdim: int) -> int | None:
    """Where the channels at ``cdim`` land when a reshape keeps them and every dim after them
    as they are and only regroups the dims before them (same product): row-major, each element
    keeps its coordinates from ``cdim`` on. None for any other reshape."""
    tail = len(src) - cdim
    lead = len(dst) - tail
    if lead < 1 or tuple(src[cdim:]) != tuple(dst[lead:]) or math.prod(src[:cdim]) != math.prod(dst[:lead]):
        return None
    return lead


def _heads(a: Analysis, node: fx.Node, x: Labels, src: Any, dst: Any, cdim: int) -> Labels:
    """Reshapes of channels at dim ``cdim >= 2`` with the batch dim kept: merged with the dim
    before them, ``(N, …, A, C, …) → (N, …, A·C, …)``, channel ``(i, j)`` is label ``j`` (the
    labels tile: attention heads merged back); split, ``(N, …, C, …) → (N, …, g, C/g, …)``,
    channel ``j`` of every group is one unit, its labels at the per-group dim (attention heads
    split off)."""
    src, dst = tuple(src), tuple(dst)
    before = cdim - 1
    if (len(dst) == len(src) - 1 and dst[:before] == src[:before] and dst[before] == src[before] * src[cdim]
            and dst[cdim:] == src[cdim + 1:]):
        a.set_dim(node, cdim - 1)
        return np.tile(x, src[cdim - 1])
    if (len(dst) == len(src) + 1 and dst[:cdim] == src[:cdim] and dst[cdim] * dst[cdim + 1] == src[cdim]
            and dst[cdim + 2:] == src[cdim + 1:] and dst[cdim + 1] > 1):
        rows = x.reshape(dst[cdim], dst[cdim + 1])  # (g, C/g): channel j of each group is one unit
        for r in range(1, dst[cdim]):
            a.uf.union(rows[0], rows[r])
        a.set_dim(node, cdim + 1)
        return rows[0].copy()
    raise Pin(f"reshape {src} → {dst} of a value whose channels are dim {cdim}")


def matmul(a: Analysis, node: fx.Node) -> Labels:
    """``A @ B`` of equal ranks ≥ 3 (attention), in two exact forms::

        scores = q @ kᵀ   q (…, T, d), kᵀ (…, d, S): channel j of q and row j of kᵀ meet in
                          one product only, so they are one unit; the scores (…, T, S) carry
                          no channel (pinned labels at dim 1)
        out = p @ v       v (…, S, d): out[…, j] reads v[…, j] alone, so out keeps v's
                          channels; p's are pinned (its shape then never changes)

    Any other use pins."""
    x, y = node.args[0], node.args[1]
    sx, sy, out = _shape(x), _shape(y), _shape(node)
    lx, ly = a.labels(x), a.labels(y)
    if lx is None or ly is None or None in (sx, sy, out) or not len(sx) == len(sy) == len(out) >= 3:
        raise Pin("matmul of values without channel labels or of unequal ranks")
    last = len(out) - 1
    if a.dim(x) == last and a.dim(y) == last - 1:
        a.uf.union(lx, ly)
        a.set_dim(node, 1)
        return a._pinned_labels(int(out[1]), f"{node.format_node()}: attention scores carry no channel")
    if a.dim(y) == last and a.dim(x) != last:
        a.uf.pin(lx, f"{node.format_node()}: attention weights (the left operand) are not pruned")
        a.set_dim(node, last)
        return ly
    raise Pin(f"matmul of operands with channels at dims {a.dim(x)} and {a.dim(y)}")


def attention(a: Analysis, node: fx.Node) -> Labels:
    """``scaled_dot_product_attention(q, k, v, attn_mask, dropout_p, is_causal, *, scale)``,
    ``q (N, …, L, E)``, ``k (N, …, S, E)``, ``v (N, …, S, Ev)``, each with its channels at the
    last dim: ``matmul``'s two exact forms in one op::

        softmax(q @ kᵀ · scale) @ v    channel j of q and of k meet in one product only: one
                                       unit; out[…, j] reads v[…, j] alone: out keeps v's

    The scale stays the dense one: a given ``scale`` is a number, and the default
    ``1/sqrt(E)`` of the dense E is written in by ``passes.shrink.shrink_attention`` when q's
    channels shrink. A mask is pinned (its shape then never changes). Any other layout pins."""
    q, k, v = node.args[:3]
    shapes, labels = [_shape(t) for t in (q, k, v)], [a.labels(t) for t in (q, k, v)]
    out = _shape(node)
    if out is None or any(s is None or len(s) != len(out) for s in shapes) or any(x is None for x in labels):
        raise Pin("attention of values without channel labels or of unequal ranks")
    last = len(out) - 1
    if len(out) < 3 or any(a.dim(t) != last for t in (q, k, v)):
        raise Pin(f"attention of q, k, v with channels at dims {[a.dim(t) for t in (q, k, v)]}, not the last")
    mask = _arg(node, 3, "attn_mask")
    if isinstance(mask, fx.Node) and a.labels(mask) is not None:
        a.uf.pin(a.labels(mask), f"{node.format_node()}: an attention mask is not pruned")
    a.uf.union(labels[0], labels[1])
    a.set_dim(node, last)
    return labels[2]


def reshape_as(a: Analysis, node: fx.Node) -> Labels:
    """``x.reshape_as(other)`` / ``view_as``: the reshape to ``other``'s shape, whose channels
    must be where the reshape puts ``x``'s: unioned with them, so the two shapes shrink alike
    (LeViT's ``batch_norm(y.flatten(0, 1)).reshape_as(y)``)."""
    labels = reshape(a, node)
    other = node.args[1]
    theirs = a.labels(other)
    if theirs is None or a.dim(other) != a.dim(node) or len(theirs) != len(labels):
        raise Pin(f"reshape_as a value whose {len(labels)} channels are not at dim {a.dim(node)}")
    a.uf.union(labels, theirs)
    return labels


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


def reduce_spatial(a: Analysis, node: fx.Node) -> Labels:
    """mean/sum/amax over dims that exclude batch and channels keep channels (at a lower dim
    when dims before them go without ``keepdim``)."""
    return _reduce(a, node, _arg(node, 1, "dim"), _arg(node, 2, "keepdim", False), over_channels=False)


def reduce_additive(a: Analysis, node: fx.Node) -> Labels:
    """sum/mean: as ``reduce_spatial``, and also over the channels (with ``keepdim``): a removed
    channel is zero in the masked original and adds nothing to a sum, so the kept channels' sum
    is exact; ``passes.shrink.shrink_channel_mean`` divides a mean by the dense count, as the
    masked original does (GRN's ``x_g.mean(dim=-1)``). Such a result (one value per sample, its
    one-channel dim where the channels were) is a fresh unit of its own."""
    return _reduce(a, node, _arg(node, 1, "dim"), _arg(node, 2, "keepdim", False), over_channels=True)


def vector_norm(a: Analysis, node: fx.Node) -> Labels:
    """``x.norm(p, dim, keepdim)`` / ``torch.linalg.vector_norm(x, ord, dim, keepdim)``: over
    spatial dims per channel (GRN's ``x_g``); over the channels too for ``ord >= 0`` (a zero
    channel adds nothing to a p-norm, a max or a count of non-zeros), as a sum."""
    order = node.args[1] if len(node.args) > 1 else node.kwargs.get("ord", node.kwargs.get("p", 2))
    exact = order == "fro" or (isinstance(order, (int, float)) and order >= 0)
    return _reduce(a, node, _arg(node, 2, "dim"), _arg(node, 3, "keepdim", False), over_channels=exact)


def _reduce(a: Analysis, node: fx.Node, dims: Any, keepdim: bool, over_channels: bool) -> Labels:
    x = node.args[0]
    shape, labels, cdim = _shape(x), a.labels(x), a.dim(x)
    if dims is None or shape is None or labels is None:
        raise Pin("reduction over all dims")
    dims = {_norm_dim(d, len(shape)) for d in ((dims,) if isinstance(dims, int) else dims)}
    over_parts = dims == {0} and _stacked_dim(a, x) == 0 and cdim > 1  # a stack's parts: their sum
    if over_channels and cdim in dims and 0 not in dims and not over_parts:
        if not keepdim:
            raise Pin(f"reduction over the channels (dims {sorted(dims)}) without keepdim")
        a.set_dim(node, cdim)
        return a.uf.fresh(1)  # (N, ..., 1, ...): one value per sample, at the channels' dim
    if not over_parts and (0 in dims or cdim in dims):
        raise Pin(f"reduction over dims {sorted(dims)} includes batch or channels")
    out = _shape(node)
    new = cdim if keepdim else cdim - sum(d < cdim for d in dims)
    if out is None or len(out) <= new or out[new] != len(labels):
        raise Pin("reduction does not keep the channel dim")
    a.set_dim(node, new)
    return labels


def _permutation(node: fx.Node) -> tuple[int, ...]:
    dims = node.args[1:]
    return tuple(dims[0]) if len(dims) == 1 and isinstance(dims[0], (list, tuple)) else tuple(dims)


def keeps_leading_dims(a: Analysis, node: fx.Node) -> Labels:
    """unsqueeze/squeeze that leave dims 0 and 1 where they are."""
    src, dst = _shape(node.args[0]), _shape(node)
    if src is None or dst is None or len(dst) < 2 or src[:2] != dst[:2] or a.dim(node.args[0]) != 1:
        raise Pin("op moves the channel dim")
    return same_channels(a, node)


def moves_dims(a: Analysis, node: fx.Node) -> Labels:
    """permute/transpose: the channels follow their dim (``permute(0, 2, 3, 1)`` makes a
    value channels-last); the batch dim must stay dim 0."""
    x = node.args[0]
    src, labels = _shape(x), a.labels(x)
    if src is None or labels is None:
        raise Pin("permute of a value without channel labels")
    if node.target in ("permute", torch.permute, aten.permute.default):
        perm = tuple(_norm_dim(d, len(src)) for d in _permutation(node))
    else:
        d0, d1 = (_norm_dim(d, len(src)) for d in (_arg(node, 1, "dim0"), _arg(node, 2, "dim1")))
        perm = list(range(len(src)))
        perm[d0], perm[d1] = d1, d0
        perm = tuple(perm)
    if perm[0] != 0:
        raise Pin(f"permute {perm} moves the batch dim")
    a.set_dim(node, perm.index(a.dim(x)))
    return labels


def flatten(a: Analysis, node: fx.Node) -> Labels:
    """flatten of dims after the channels keeps them; of dims before them (LeViT's
    ``(N, T, C).flatten(0, 1)``) keeps them at a lower dim; from dim 1 of channels at dim 1
    it is a reshape to (N, features)."""
    x, ndim = node.args[0], len(_shape(node.args[0]))
    if node.op == "call_module":
        start, end = a.module(node).start_dim, a.module(node).end_dim
    else:
        start, end = _arg(node, 1, "start_dim", 0), _arg(node, 2, "end_dim", -1)
    start, end, cdim = _norm_dim(start, ndim), _norm_dim(end, ndim), a.dim(x)
    if start > cdim or start >= end or end < cdim:  # the channels are not among the merged dims
        at = cdim if start > cdim or start >= end else cdim - (end - start)
        labels, out = a.labels(x), _shape(node)
        if labels is None or out is None or len(out) <= at or out[at] != len(labels):
            raise Pin("flatten of a value without channel labels")
        a.set_dim(node, at)
        return labels
    if start == 1:
        return reshape(a, node)
    raise Pin(f"flatten of dims {start}..{end}, across the channels at dim {cdim}")


def no_channels(a: Analysis, node: fx.Node) -> None:
    """Ops that return shapes or sizes, not channel-carrying tensors."""
    return None


def pixel_shuffle(a: Analysis, node: fx.Node) -> Labels:
    """pixel_shuffle (``C·r² → C``): output channel ``c`` is input channels ``c·r² … c·r²+r²−1``,
    one unit; pixel_unshuffle (``C → C·r²``): each channel becomes ``r²`` (its labels repeat)."""
    x = node.args[0]
    labels, out = a.labels(x), _shape(node)
    if labels is None or out is None or a.dim(x) != 1:
        raise Pin("pixel shuffle of a value without channels at dim 1")
    c_in, c_out = len(labels), int(out[1])
    if c_in % c_out == 0:
        blocks = labels.reshape(c_out, c_in // c_out)
        for j in range(1, blocks.shape[1]):
            a.uf.union(blocks[:, 0], blocks[:, j])
        return blocks[:, 0].copy()
    if c_out % c_in == 0:
        return np.repeat(labels, c_out // c_in)
    raise Pin(f"pixel shuffle {c_in} → {c_out} channels")


def softmax(a: Analysis, node: fx.Node) -> Labels:
    """softmax / log_softmax over a dim other than the channels: per channel; over the
    channels each output depends on all of them (pinned)."""
    x = node.args[0]
    shape = _shape(x)
    dim = a.module(node).dim if node.op == "call_module" else _arg(node, 1, "dim")
    if dim is None or shape is None:
        raise Pin("softmax over an implicit dim")
    if _norm_dim(dim, len(shape)) == a.dim(x):
        raise Pin(f"softmax over the channel dim {dim}")
    return same_channels(a, node)


def aten_slice(a: Analysis, node: fx.Node) -> Labels:
    """``aten.slice.Tensor(x, dim, start, end, step)``: a slice of another dim keeps the
    channels; of the channel dim with step 1 it slices their labels (bounds rewritten by
    shrink); any other step there pins."""
    x = node.args[0]
    labels, shape = a.labels(x), _shape(x)
    if labels is None or shape is None:
        raise Pin("slice of a value without channel labels")
    dim = _norm_dim(_arg(node, 1, "dim", 0), len(shape))
    if dim == 0:
        raise Pin("slice of the batch dim")
    if dim != a.dim(x):
        return same_channels(a, node)
    if _arg(node, 4, "step", 1) != 1:
        raise Pin(f"slice of channels with step {_arg(node, 4, 'step', 1)}")
    start, stop, _ = slice(_arg(node, 2, "start"), _arg(node, 3, "end")).indices(len(labels))
    a.set_dim(node, dim)
    return labels[start:stop]


def _tuple_keeps_channels(a: Analysis, node: fx.Node) -> Labels:
    """The labels of the input of an op returning a tuple whose first tensor keeps its
    channels (at dim 1)."""
    x = node.args[0]
    labels, metas = a.labels(x), node.meta.get("tensor_meta")
    first = metas[0] if isinstance(metas, (tuple, list)) and metas else None
    if labels is None or a.dim(x) != 1 or not isinstance(first, TensorMetadata):
        raise Pin("op on a value without channels at dim 1")
    if len(first.shape) < 2 or first.shape[1] != len(labels):
        raise Pin("output does not keep the input's channel dim")
    return labels


def with_indices(a: Analysis, node: fx.Node) -> tuple:
    """max pooling that also returns indices: both keep the channels of the input."""
    labels = _tuple_keeps_channels(a, node)
    return labels, labels
