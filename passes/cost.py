"""Cost pass: multiply-accumulates (MACs) and parameters per node, per sample.

Pruning targets are stated in these numbers, so they must be exact and must also be
computable for a *plan* without rewriting the graph: every formula here is a function of the
node's input and output channel counts, and ``plan_cost`` evaluates them with the counts a
plan keeps. Conventions follow ptflops / Torch-Pruning's ``count_ops_and_params`` for the
modules both count (conv and linear MACs plus bias adds, 2 ops per element for affine norms,
1 per element for activations and pooling), and also count functional activations/pooling.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from ehap_fx.passes._analysis import module_rule, table_rule
from ehap_fx.passes._layers import (
    aten,
    functional_conv,
    functional_conv_owner,
    functional_conv_transpose,
    functional_linear_spec,
    layer_tensor,
)
from ehap_fx.passes.coupling import POOLING_MODULES
from ehap_fx.passes.depth import folded_nodes
from ehap_fx.passes.group import KeptChannels, groups_of
from torch import fx, nn
from torch.fx.passes.infra.pass_base import PassBase, PassResult
from torch.fx.passes.shape_prop import TensorMetadata

from ehap_fx import _meta


@dataclass(frozen=True)
class NodeCost:
    """MACs (per sample) and parameters of one node, stored in ``node.meta["ehap.cost"]``."""

    macs: int
    params: int


@dataclass(frozen=True)
class Cost:
    """Totals of a whole graph."""

    macs: int
    params: int


def _spatial(meta: TensorMetadata) -> int:
    return math.prod(meta.shape[2:])


def _channel_dim(node: fx.Node) -> int:
    slots = node.meta.get(_meta.CHANNELS)
    return getattr(slots, "dim", 1)


def _per_channel(node: fx.Node) -> int:
    """Elements per channel and sample: ``H*W`` channels-first, ``H*W`` too channels-last; one
    for a value of one element per sample (``(N,)``: a squeezed scalar head)."""
    shape = node.meta["tensor_meta"].shape
    if len(shape) < 2:
        return 1
    return math.prod(shape[1:]) // max(1, shape[_channel_dim(node)])


def _conv(mod: nn.Module, node: fx.Node, c_in: int, c_out: int) -> NodeCost:
    g = mod.groups
    if g == mod.in_channels == mod.out_channels:
        g = c_in  # depthwise stays depthwise when pruned
    k = math.prod(mod.kernel_size)
    hw = _spatial(node.meta["tensor_meta"])
    bias = c_out if mod.bias is not None else 0
    return NodeCost(hw * (k * (c_in // g) * c_out + bias), k * (c_in // g) * c_out + bias)


def _conv_transpose(mod: nn.Module, node: fx.Node, c_in: int, c_out: int) -> NodeCost:
    """Each input element meets ``k · c_out/groups`` weights (a conv's count, seen from its input)."""
    k = math.prod(mod.kernel_size)
    weights = k * c_in * (c_out // mod.groups)
    bias = c_out if mod.bias is not None else 0
    macs = _spatial(node.args[0].meta["tensor_meta"]) * weights + _spatial(node.meta["tensor_meta"]) * bias
    return NodeCost(macs, weights + bias)


def _linear(mod: nn.Module, node: fx.Node, c_in: int, c_out: int) -> NodeCost:
    bias = c_out if mod.bias is not None else 0
    rows = math.prod(node.meta["tensor_meta"].shape[1:-1])  # extra leading dims, 1 for (N, F)
    return NodeCost(rows * c_in * c_out + bias, c_in * c_out + bias)


def _norm(mod: nn.Module, node: fx.Node, c_in: int, c_out: int) -> NodeCost:
    affine = getattr(mod, "affine", getattr(mod, "elementwise_affine", False))
    elems = c_out * _per_channel(node)
    params = 2 * c_out if affine and not isinstance(mod, nn.LayerNorm) else 0
    if isinstance(mod, nn.LayerNorm) and affine:
        params = 2 * math.prod(mod.normalized_shape)
    return NodeCost(elems * (2 if affine else 1), params)


def _per_output_element(mod, node: fx.Node, c_in: int, c_out: int) -> NodeCost:
    return NodeCost(c_out * _per_channel(node), 0)


def _prelu(mod: nn.PReLU, node: fx.Node, c_in: int, c_out: int) -> NodeCost:
    """One slope per channel (shrinking with them), or one shared slope."""
    return NodeCost(c_out * _per_channel(node), c_out if mod.num_parameters > 1 else 1)


def _per_input_element(mod, node: fx.Node, c_in: int, c_out: int) -> NodeCost:
    return NodeCost(c_in * _per_channel(node.args[0]), 0)


def _aten_norm(mod, node: fx.Node, c_in: int, c_out: int) -> NodeCost:
    """``aten.batch_norm``: as a BatchNorm module (its parameters are counted as tensors)."""
    affine = len(node.args) > 1 and node.args[1] is not None
    return NodeCost(c_out * _per_channel(node) * (2 if affine else 1), 0)


def _matmul(mod, node: fx.Node, c_in: int, c_out: int) -> NodeCost:
    """A matmul ``(…, n, k) @ (…, k, m)`` (attention's scores and its mix of values): ``k``
    MACs per output element, ``k = c_in`` and ``m = c_out`` the kept sizes of the last dims
    (``_formula_dim``: q's channels in the scores, v's in the mix; any other dim is pinned)."""
    a, out = node.args[0].meta.get("tensor_meta"), node.meta.get("tensor_meta")
    if not (isinstance(a, TensorMetadata) and isinstance(out, TensorMetadata)):
        return NodeCost(0, 0)
    if min(len(a.shape), len(out.shape)) < 2:
        return NodeCost(0, 0)
    return NodeCost(math.prod(out.shape[1:-1]) * c_out * c_in, 0)


def _attention(mod, node: fx.Node, c_in: int, c_out: int) -> NodeCost:
    """``scaled_dot_product_attention(q, k, v)``, ``q (N, …, L, E)``, ``k (N, …, S, E)``,
    ``v (N, …, S, Ev)``: the scores ``L·S·E`` and the mix ``L·S·Ev`` MACs per head, ``E = c_in``
    and ``Ev = c_out`` the kept sizes of q's and the output's last dims."""
    q, k, v = (arg.meta.get("tensor_meta") for arg in node.args[:3])
    if not all(isinstance(t, TensorMetadata) and len(t.shape) >= 3 for t in (q, k, v)):
        return NodeCost(0, 0)
    heads = math.prod(q.shape[1:-2])
    return NodeCost(heads * q.shape[-2] * k.shape[-2] * (c_in + c_out), 0)


def _einsum(mod, node: fx.Node, c_in: int, c_out: int) -> NodeCost:
    """``einsum("bhlk,bhtk->bhlt", q, k)`` of two operands (CvT's attention): one MAC per
    combination of its letters, per row of the output's dim 0 (pinned inputs, as a matmul's).
    Other forms (one or three operands, ``...``) are not counted."""
    equation, *operands = node.args
    if len(operands) == 1 and isinstance(operands[0], (list, tuple)):
        operands = list(operands[0])  # einsum(eq, [a, b]) and aten.einsum(eq, [a, b])
    if not isinstance(equation, str) or "..." in equation or "->" not in equation or len(operands) != 2:
        return NodeCost(0, 0)
    inputs, output = equation.replace(" ", "").split("->")
    sizes: dict[str, int] = {}
    for letters, arg in zip(inputs.split(","), operands):
        meta = arg.meta.get("tensor_meta") if isinstance(arg, fx.Node) else None
        if not isinstance(meta, TensorMetadata) or len(meta.shape) != len(letters):
            return NodeCost(0, 0)
        sizes.update(zip(letters, (int(n) for n in meta.shape)))
    if not output:
        return NodeCost(0, 0)
    return NodeCost(math.prod(n for letter, n in sizes.items() if letter != output[0]), 0)


CostFn = Callable[[nn.Module | None, fx.Node, int, int], NodeCost]

#: Cost formulas for call_module nodes by module type.
MODULE_COST: dict[type[nn.Module], CostFn] = {
    nn.Conv1d: _conv,
    nn.Conv2d: _conv,
    nn.Conv3d: _conv,
    **dict.fromkeys((nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d), _conv_transpose),
    nn.Linear: _linear,
    nn.BatchNorm1d: _norm,
    nn.BatchNorm2d: _norm,
    nn.BatchNorm3d: _norm,
    nn.GroupNorm: _norm,
    nn.LayerNorm: _norm,
    nn.InstanceNorm1d: _norm,
    nn.InstanceNorm2d: _norm,
    nn.InstanceNorm3d: _norm,
    **dict.fromkeys((nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.Upsample), _per_output_element),
    nn.PReLU: _prelu,
    **dict.fromkeys(POOLING_MODULES, _per_input_element),
}

#: Cost formulas for functional calls (Torch-Pruning does not count these).
FUNCTION_COST: dict[object, CostFn] = {
    **dict.fromkeys((F.relu, torch.relu, F.relu6, F.leaky_relu, F.elu, "relu"), _per_output_element),
    **dict.fromkeys(
        (F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d, F.adaptive_max_pool2d), _per_input_element
    ),
    # ATen spellings of what the module rows count (torch.export graphs; packets: every overload)
    **dict.fromkeys(
        (aten.relu, aten.relu_, aten.hardtanh, aten.hardtanh_, aten.leaky_relu, aten.leaky_relu_, aten.elu,
         aten.elu_, aten.prelu, aten._prelu_kernel,  # in place too: nn.ReLU6(inplace=True) is hardtanh_
         aten.upsample_nearest1d, aten.upsample_nearest2d, aten.upsample_nearest3d, aten.upsample_linear1d,
         aten.upsample_bilinear2d, aten.upsample_bicubic2d, aten.upsample_trilinear3d,
         aten._upsample_nearest_exact2d), _per_output_element
    ),
    **dict.fromkeys(
        (aten.max_pool1d, aten.max_pool2d, aten.max_pool3d, aten.max_pool2d_with_indices,
         aten.max_pool3d_with_indices, aten.avg_pool1d, aten.avg_pool2d, aten.avg_pool3d,
         aten.adaptive_avg_pool1d, aten.adaptive_avg_pool2d, aten._adaptive_avg_pool2d,
         aten.adaptive_avg_pool3d, aten._adaptive_avg_pool3d, aten.adaptive_max_pool1d,
         aten.adaptive_max_pool2d, aten.adaptive_max_pool3d),
        _per_input_element
    ),
    aten.batch_norm: _aten_norm,
    **dict.fromkeys((torch.matmul, operator.matmul, torch.bmm, torch.mm, "matmul", "bmm", "mm", aten.matmul,
                     aten.bmm, aten.mm), _matmul),
    **dict.fromkeys((F.scaled_dot_product_attention, aten.scaled_dot_product_attention), _attention),
    **dict.fromkeys((torch.einsum, aten.einsum), _einsum),
}


def _channels(node: fx.Node, dim: int | None = None) -> int:
    meta = node.meta.get("tensor_meta")
    if not isinstance(meta, TensorMetadata) or len(meta.shape) < (2 if dim is None else 1):
        return 0
    if len(meta.shape) == 1 and dim not in (0, -1):
        return 1  # (N,): one value per sample, no channel dim
    return int(meta.shape[_channel_dim(node) if dim is None else dim])


def _formula_dim(fn: CostFn, node: fx.Node) -> int:
    """The dim whose channel counts the formula takes: a conv's dim 1, a linear's last dim,
    otherwise wherever the node's channels are."""
    if fn is _conv:
        return 1
    if fn in (_linear, _matmul, _attention):
        return -1
    return _channel_dim(node)


def _cost_fn(gm: fx.GraphModule, node: fx.Node) -> tuple[CostFn | None, nn.Module | None]:
    if node.op == "call_module":
        mod = gm.get_submodule(node.target)
        return module_rule(MODULE_COST, mod), mod
    if (spec := functional_conv(gm, node)) is not None:  # F.conv2d on a conv's own weight
        return _conv, spec
    if (spec := functional_conv_transpose(gm, node)) is not None:  # aten.conv_transpose2d on its own weight
        return _conv_transpose, spec
    if (spec := functional_linear_spec(gm, node)) is not None:  # aten.linear / addmm
        return _linear, spec
    if node.op in ("call_function", "call_method"):
        return table_rule(FUNCTION_COST, node.target), None
    return None, None


def _batch(gm: fx.GraphModule) -> int:
    """The samples the graph's shapes were propagated with: dim 0 of its first tensor input."""
    for node in gm.graph.find_nodes(op="placeholder"):
        for meta in _tensor_metas(node.meta.get("tensor_meta")):  # a list of tensors: its first
            if len(meta.shape):
                return max(1, int(meta.shape[0]))
    return 1


def _tensor_metas(meta: Any) -> Iterator[TensorMetadata]:
    """The ``TensorMetadata`` in a placeholder's meta: itself, or those of a list, tuple or
    dict of tensors (ShapeProp keeps the container)."""
    if isinstance(meta, TensorMetadata):
        yield meta
    elif isinstance(meta, (list, tuple)):
        for m in meta:
            yield from _tensor_metas(m)
    elif isinstance(meta, dict):
        for m in meta.values():
            yield from _tensor_metas(m)


def _rows_per_sample(node: fx.Node, batch: int) -> int:
    """Rows of dim 0 per sample: 1, or the patches / tokens a model folded into the batch dim
    (MobileViT's unfolded patches ``(N·P, T, C)``, LeViT's ``(N·T, C)`` BatchNorm1d input). The
    formulas count one row of dim 0; a dim 0 that is no multiple of the batch is counted so."""
    meta = node.meta.get("tensor_meta")
    if not isinstance(meta, TensorMetadata) or not len(meta.shape):
        return 1
    rows = int(meta.shape[0])
    return rows // batch if rows > batch and rows % batch == 0 else 1


def _node_cost(gm, node, seen: set[str], count: Callable[[fx.Node], int], batch: int = 1) -> NodeCost | None:
    fn, mod = _cost_fn(gm, node)
    params = 0
    linear = functional_linear_spec(gm, node)
    key = functional_conv_owner(gm, node) or (linear.owner if linear else node.target)  # whose parameters
    if layer_tensor(gm, node):
        return None  # a functional conv's or linear's weight or bias: counted by its formula
    if node.op == "get_attr" and node.target not in seen:
        seen.add(node.target)
        try:
            p = gm.get_parameter(node.target)
        except AttributeError:  # a buffer or constant, not a parameter
            p = None
        params = 0 if p is None else p.numel()
        slots = node.meta.get(_meta.CHANNELS)
        if params and slots is not None and p.dim() > slots.dim:  # a layer scale loses channels too
            params = params // p.shape[slots.dim] * count(node, slots.dim)
    if fn is None:
        if mod is not None and node.target not in seen:  # unknown module: count its parameters
            seen.add(node.target)
            params = sum(p.numel() for p in mod.parameters())
        return NodeCost(0, params) if params else None
    inp = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else node
    inp = linear.input if linear else inp
    dim = _formula_dim(fn, node)
    c = fn(mod, node, count(inp, dim), count(node, dim))
    c = NodeCost(c.macs * _rows_per_sample(node, batch), c.params)
    if mod is not None:
        if key in seen:  # a module called twice has its parameters counted once
            c = NodeCost(c.macs, 0)
        seen.add(key)
    return c


def count_cost(gm: fx.GraphModule) -> PassResult:
    """Write ``NodeCost`` into ``node.meta["ehap.cost"]`` for every node that costs something."""
    seen: set[str] = set()
    batch = _batch(gm)
    for node in gm.graph.nodes:
        c = _node_cost(gm, node, seen, _channels, batch)
        if c is None:
            node.meta.pop(_meta.COST, None)
        else:
            node.meta[_meta.COST] = c
    return PassResult(gm, False)


def total_cost(gm: fx.GraphModule) -> Cost:
    """MACs (per sample) and parameters of the whole graph (runs ``count_cost``)."""
    count_cost(gm)
    costs = [n.meta[_meta.COST] for n in gm.graph.nodes if _meta.COST in n.meta]
    return Cost(sum(c.macs for c in costs), sum(c.params for c in costs))


def conv_widths(gm: nn.Module) -> dict[str, int]:
    """Output channels of every conv and linear module (``out_channels``/``out_features``), by name."""
    return {name: m.out_channels if isinstance(m, nn.modules.conv._ConvNd) else m.out_features
            for name, m in gm.named_modules() if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear))}


def plan_cost(gm: fx.GraphModule, keep_masks: list[torch.Tensor]) -> Cost:
    """Cost the graph would have after keeping ``keep_masks[group_id]`` of each group.

    Exact for every op this module counts: the same formulas, evaluated at the kept channel
    counts read from each node's ``ChannelSlots``. Used to choose a plan without shrinking.
    """
    kept = KeptChannels(groups_of(gm), keep_masks)

    def count(node: fx.Node, dim: int | None = None) -> int:
        n = kept.count(node, dim)
        return _channels(node, dim) if n is None else n

    seen: set[str] = set()
    batch = _batch(gm)
    total = Cost(0, 0)
    gone = removed_nodes(gm, count)
    for node in gm.graph.nodes:
        if node in gone:
            continue
        c = _node_cost(gm, node, seen, count, batch)
        if c is not None:
            total = Cost(total.macs + c.macs, total.params + c.params)
    return total


def removed_nodes(gm: fx.GraphModule, count: Callable[[fx.Node], int | None]) -> set[fx.Node]:
    """Nodes ``shrink`` will fold into constants or erase, given the kept channel ``count``
    of each node (``shrink.fold_dropped_branches``): a conv/linear whose input keeps no channel,
    pointwise ops of such constants, and whatever then feeds nothing that is still computed
    (the rest of a dropped branch, e.g. the first conv of a bottleneck)."""
    constant = set(folded_nodes(gm, count))
    if not constant:
        return constant
    live: set[fx.Node] = set()
    for node in reversed(gm.graph.nodes):
        if node.op == "output" or any(u in live and u not in constant for u in node.users):
            live.add(node)
    return {n for n in gm.graph.nodes if n in constant or n not in live}


class CountCost(PassBase):
    """``count_cost`` as a ``PassBase``."""

    def call(self, graph_module: fx.GraphModule) -> PassResult:
        return count_cost(graph_module)
