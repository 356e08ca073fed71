"""Which calls of a graph are layers: ``F.conv2d`` / ATen convs, their transposed forms, and
``aten.linear`` / ``aten.addmm`` on one module's own ``weight`` and ``bias``.

A conv subclass with its own ``forward`` (timm's ``Conv2dSame``) traces to ``F.conv2d`` on
``get_attr`` tensors, and a ``torch.export`` graph has no module calls at all: the coupling
rules, shrink, cost and the latency tables recognise such a call here as the layer it is, from
its arguments and the weight's shape.
"""

from __future__ import annotations

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
    return SimpleNamespace(**vars(spec), in_channels=weight.shape[1] * spec.groups,
                           out_channels=weight.shape[0])


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

