"""Which calls of a graph are layers: ``F.conv2d`` / ATen convs, their transposed forms, and
``aten.linear`` / ``aten.addmm`` on one module's own ``weight`` and ``bias``.

A conv subclass with its own ``forward`` (timm's ``Conv2dSame``) traces to ``F.conv2d`` on
``get_attr`` tensors, and a ``torch.export`` graph has no module calls at all: the coupling
rules, shrink, cost and the latency tables recognise such a call here as the layer it is, from
its arguments and the weight's shape.

A conv's weight may also be computed from the module's parameter per output channel: weight
standardisation (Hugging Face's BiT, timm's ``StdConv2d``) normalises each output row of the
weight over its input columns before the conv (``standardized_weight``). Such a conv is the
same layer, its parameter sliced by rows; its input columns are picked after the
standardisation, whose statistics read all of them.
"""

from __future__ import annotations

import functools
import operator
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx

aten = torch.ops.aten


def _arg(node: fx.Node, pos: int, name: str, default: Any = None) -> Any:
    """Argument ``name`` of a call, given at position ``pos`` or as a keyword."""
    if len(node.args) > pos:
        return node.args[pos]
    return node.kwargs.get(name, default)


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

#: Transposed convs, weight ``(in, out/groups, k...)``; core ATen spells them
#: ``aten.convolution(..., transposed=True, ...)``.
_FUNCTIONAL_CONV_TRANSPOSES = (
    F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d,
    aten.conv_transpose1d.default, aten.conv_transpose2d.input, aten.conv_transpose3d.input,  # training IR
)
_FUNCTIONAL_CONV_TRANSPOSE_PACKETS = (aten.conv_transpose1d, aten.conv_transpose2d, aten.conv_transpose3d)


def is_transposed_conv(node: fx.Node) -> bool:
    """A ``F.conv_transpose*`` / ATen transposed conv call, any overload, core ATen's
    ``aten.convolution`` with ``transposed=True`` included."""
    if node.op != "call_function":
        return False
    if isinstance(node.target, torch._ops.OpOverload):
        packet = node.target.overloadpacket
        if packet is aten.convolution:
            return bool(_arg(node, 6, "transposed"))
        return packet in _FUNCTIONAL_CONV_TRANSPOSE_PACKETS
    try:
        return node.target in _FUNCTIONAL_CONV_TRANSPOSES
    except TypeError:
        return False


def conv_groups_at(node: fx.Node) -> int:
    """The position of ``groups`` in a functional conv call (transposed or not): 8 for
    ``aten.convolution``, else 6."""
    return 8 if node.target is aten.convolution.default else 6


def functional_conv_owner(gm: fx.GraphModule, node: fx.Node) -> str | None:
    """For ``F.conv2d(x, <m>.weight, <m>.bias, ...)`` (a conv subclass's own ``forward``, as
    timm's ``Conv2dSame``) or a transposed conv on such tensors, the path ``m`` of the module
    holding the weight; None otherwise. (The traced graph keeps ``m`` only as a holder of its
    tensors: what the conv is comes from the call's arguments and the weight's shape,
    ``functional_conv`` / ``functional_conv_transpose``.)"""
    if node.op != "call_function" or not (is_functional_conv(node.target) or is_transposed_conv(node)):
        return None
    w, b = _arg(node, 1, "weight"), _arg(node, 2, "bias")
    if isinstance(w, fx.Node) and w.op != "get_attr" and not is_transposed_conv(node):
        computed = standardized_weight(w)
        w = computed.param if computed is not None else None
    if not isinstance(w, fx.Node) or w.op != "get_attr" or not w.target.endswith(".weight"):
        return None
    owner = w.target.rpartition(".")[0]
    if b is not None and getattr(b, "target", None) != f"{owner}.bias":
        return None
    return owner


def functional_conv(gm: fx.GraphModule, node: fx.Node) -> Any:
    """The conv an ``F.conv*`` call on get_attr tensors computes, with the attributes the
    conv rule, shrink and cost read (``groups``, ``in_channels``, ``out_channels``,
    ``kernel_size``, ``weight``, ``bias``); None when it is not such a call (a transposed conv
    included: ``functional_conv_transpose``)."""
    spec = _functional_layer(gm, node)
    if spec is None or is_transposed_conv(node):
        return None
    weight = spec.weight  # (out, in/groups, k...)
    computed = standardized_weight(_arg(node, 1, "weight"))
    columns = None  # the weight's input columns the conv reads, where a shrink picked some
    if computed is not None and computed.index is not None:
        columns = _get_attr(gm, computed.index.target)
    per_group = weight.shape[1] if columns is None else len(columns)
    return SimpleNamespace(**vars(spec), in_channels=per_group * spec.groups, out_channels=weight.shape[0],
                           standardized=computed, in_columns=columns)


def functional_conv_transpose(gm: fx.GraphModule, node: fx.Node) -> Any:
    """As ``functional_conv``, for a transposed conv (``aten.conv_transpose2d``,
    ``F.conv_transpose2d``, ``aten.convolution`` with ``transposed=True``) on one module's
    tensors: its weight is ``(in, out/groups, k...)``."""
    spec = _functional_layer(gm, node)
    if spec is None or not is_transposed_conv(node):
        return None
    weight = spec.weight  # (in, out/groups, k...)
    return SimpleNamespace(**vars(spec), in_channels=weight.shape[0],
                           out_channels=weight.shape[1] * spec.groups)


def _get_attr(gm: fx.GraphModule, target: str) -> Any:
    return functools.reduce(getattr, target.split("."), gm)


@dataclass(frozen=True)
class StandardizedWeight:
    """A conv weight standardised per output channel (weight standardisation: BiT, timm's
    ``StdConv2d``), in either capture's spelling::

        param (O, I/g, k…) ─ reshape (1, O, -1) ─ batch_norm(training, no stats, no affine)
              └──────────────────────────────────────────── reshape_as ─ [index_select(·, 1, index)] ─▶ conv

    ``batch_norm`` of a ``(1, O, K)`` value in training mode normalises each of the ``O`` rows
    over its ``K = I/g·k…`` elements: output channel ``o`` of the conv reads row ``o`` of the
    parameter alone, so rows are sliced as a conv's are. Every input column enters the row's
    statistics, so removing input channels cannot slice the parameter's columns; a shrink
    picks the kept columns after the standardisation instead (``gather``, ``index``: a
    ``get_attr`` of the column indices). The norm's weight may be a per-row gain (timm's
    ``ScaledStdConv2d``: ``(gain * scale).view(-1)``, ``gain`` of shape ``(O, 1, 1, 1)``),
    sliced with the rows."""

    param: fx.Node
    flat: fx.Node
    norm: fx.Node
    back: fx.Node
    gather: fx.Node | None = None
    index: fx.Node | None = None
    gain: tuple[fx.Node, ...] = ()  # timm's ScaledStdConv2d: a (O, 1, 1, 1) gain, first, its ops

    @property
    def nodes(self) -> tuple[fx.Node, ...]:
        chain = (self.param, self.flat, self.norm, self.back, self.gather, self.index, *self.gain)
        return tuple(n for n in chain if n is not None)


_RESHAPES = ("reshape", "view", torch.reshape, aten.reshape.default, aten.view.default)
_RESHAPE_AS = ("reshape_as", "view_as", aten.reshape_as.default, aten.view_as.default)
_GATHERS = (torch.index_select, aten.index_select.default)
_CHAIN_OPS = (*_RESHAPES, *_RESHAPE_AS, *_GATHERS, F.batch_norm, aten.batch_norm.default,
              operator.mul, torch.mul, aten.mul.Tensor, "mul")


def _calls(node: Any, targets: tuple) -> bool:
    """A call of one of ``targets`` (functions and ATen overloads; strings: method names)."""
    if not isinstance(node, fx.Node) or node.op not in ("call_function", "call_method"):
        return False
    method = node.op == "call_method"
    return any(node.target is t or node.target == t for t in targets if isinstance(t, str) == method)


def _meta_shape(node: fx.Node) -> tuple[int, ...] | None:
    meta = node.meta.get("tensor_meta")
    return tuple(meta.shape) if hasattr(meta, "shape") else None


def _norm_tensors(node: Any) -> tuple[list, Any] | None:
    """``(input, running_mean, running_var, weight, bias)`` and ``training`` of a batch norm
    call, ``F.batch_norm`` or ``aten.batch_norm``; None for any other node."""
    if _calls(node, (F.batch_norm,)):
        names = ("input", "running_mean", "running_var", "weight", "bias")
        tensors = [_arg(node, i, name) for i, name in enumerate(names)]
    elif _calls(node, (aten.batch_norm.default,)):
        names = ("input", "weight", "bias", "running_mean", "running_var")
        found = dict(zip(names, (_arg(node, i, name) for i, name in enumerate(names))))
        tensors = [found[n] for n in ("input", "running_mean", "running_var", "weight", "bias")]
    else:
        return None
    return tensors, _arg(node, 5, "training", False)


def _gain(node: Any, rows: int) -> tuple[fx.Node, ...] | None:
    """timm's ``ScaledStdConv2d`` gain: ``(gain * scale).view(-1)`` of a ``get_attr`` ``(O, 1, 1,
    1)`` (or ``(O,)``) by a number, each value read by the next alone: the nodes, gain first."""
    if not _calls(node, _RESHAPES) or len(node.users) != 1:
        return None
    chain, x = [node], node.args[0]
    if _calls(x, (operator.mul, torch.mul, aten.mul.Tensor, "mul")) and len(x.users) == 1:
        tensors = [a for a in x.args if isinstance(a, fx.Node)]
        if len(tensors) != 1 or not all(isinstance(a, (fx.Node, int, float)) for a in x.args):
            return None
        chain, x = [x, *chain], tensors[0]
    shape = _meta_shape(x) if isinstance(x, fx.Node) else None
    if x is None or x.op != "get_attr" or len(x.users) != 1 or shape is None or shape[0] != rows or any(
            n != 1 for n in shape[1:]) or _meta_shape(node) != (rows,):
        return None
    return (x, *chain)


def standardized_weight(w: Any) -> StandardizedWeight | None:
    """The standardisation ``w`` (a conv's weight argument) computes from one parameter, when it
    is exactly ``StandardizedWeight``'s chain, each value read by the next alone; else None."""
    gather = index = None
    if _calls(w, _GATHERS) and len(w.users) == 1:
        gather, index, w = w, _arg(w, 2, "index"), w.args[0]
        if _arg(gather, 1, "dim") != 1 or not isinstance(index, fx.Node) or index.op != "get_attr":
            return None
    if not _calls(w, _RESHAPE_AS) or len(w.users) != 1:
        return None
    back, norm, param = w, w.args[0], w.args[1]
    found = _norm_tensors(norm)
    if found is None or found[1] is not True or len(norm.users) != 1:
        return None  # batch statistics (training=True) of the flattened rows
    (flat, mean, var, gain, bias) = found[0]
    if not _calls(flat, _RESHAPES) or len(flat.users) != 1 or flat.args[0] is not param:
        return None
    if not isinstance(param, fx.Node) or param.op != "get_attr" or set(param.users) != {flat, back}:
        return None
    shape, flat_shape = _meta_shape(param), _meta_shape(flat)
    if shape is None or len(shape) < 3 or flat_shape is None or flat_shape[:2] != (1, shape[0]) or len(
            flat_shape) != 3:
        return None  # not one row per output channel
    gain_chain = () if gain is None else _gain(gain, shape[0])
    if mean is not None or var is not None or bias is not None or gain_chain is None:
        return None
    return StandardizedWeight(param, flat, norm, back, gather, index, gain_chain)


def weight_chain(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Is ``node`` part of a ``StandardizedWeight`` that a functional conv reads (its rule and
    shrink describe the whole chain)?"""
    if node.op == "get_attr" and not any(_calls(u, _CHAIN_OPS) for u in node.users):
        return False  # a weight its conv reads directly (the common case, checked first: it is cheap)
    frontier = [node]
    for _ in range(7):  # gain → mul → view → norm → back → gather → conv
        users = [u for n in frontier for u in n.users]
        for user in users:
            if is_functional_conv(user.target) and functional_conv_owner(gm, user) is not None:
                computed = standardized_weight(_arg(user, 1, "weight"))
                if computed is not None and node in computed.nodes:
                    return True
        frontier = [u for u in users if _calls(u, _CHAIN_OPS)]  # only along the chain's own ops
    return False


def _functional_layer(gm: fx.GraphModule, node: fx.Node) -> SimpleNamespace | None:
    owner = functional_conv_owner(gm, node)
    if owner is None:
        return None
    holder = gm.get_submodule(owner)
    weight, bias = holder.weight, getattr(holder, "bias", None) if _arg(node, 2, "bias") is not None else None
    groups = _arg(node, conv_groups_at(node), "groups", 1)
    return SimpleNamespace(groups=groups, kernel_size=tuple(weight.shape[2:]), weight=weight, bias=bias,
                           owner=owner)


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
    if (node.op == "get_attr" or _calls(node, _CHAIN_OPS)) and weight_chain(gm, node):
        return True  # a standardised conv weight: the conv's rule reads the chain
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

