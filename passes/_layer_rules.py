"""Coupling rules of layers with per-channel parameters: convs, linears, norms, PReLU, in each
spelling (module, ``F.*`` on a module's own tensors, ATen).

A rule records the parameters the channels index (``Analysis.touch``: a conv's ``weight`` dim 1
for its inputs, dim 0 for its outputs) or unions the ``(C,)`` tensors a functional norm reads
with the channels, so that shrink slices them together.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from ehap_fx.passes._analysis import Analysis, Labels, Pin, _shape
from ehap_fx.passes._layers import (
    _arg,
    functional_conv,
    functional_conv_transpose,
    functional_linear_spec,
    is_transposed_conv,
)
from ehap_fx.passes._shape_rules import _tuple_keeps_channels, same_channels
from torch import fx

aten = torch.ops.aten


def norm_layer(a: Analysis, node: fx.Node) -> Labels:
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


def functional_norm(a: Analysis, node: fx.Node) -> Labels:
    """``F.batch_norm`` / ``F.instance_norm`` (what a norm subclass with its own ``forward``
    calls): per channel; its statistics and affine tensors (``get_attr`` of shape ``(C,)``,
    labelled as per-channel constants) are unioned with the channels, so they are sliced
    with them."""
    return _union_norm_tensors(a, node, same_channels(a, node))


def _union_norm_tensors(a: Analysis, node: fx.Node, labels: Labels) -> Labels:
    if a.dim(node.args[0]) != 1:
        raise Pin("batch norm of a value whose channels are not dim 1")
    names = _NORM_TENSORS.get(node.target, _F_NORM_TENSORS)
    return _union_channel_tensors(a, node, labels, enumerate(names, start=1))


def _union_channel_tensors(a: Analysis, node: fx.Node, labels: Labels, args) -> Labels:
    """The ``(C,)`` tensors at ``args`` (position, name) of ``node`` sliced with its channels."""
    for pos, name in args:
        t = _arg(node, pos, name)
        if t is None:
            continue
        if not isinstance(t, fx.Node) or a.labels(t) is None or _shape(t) != (len(labels),):
            raise Pin(f"{name} is not a per-channel tensor")
        a.uf.union(labels, a.labels(t))
    return labels


def group_norm(a: Analysis, node: fx.Node) -> Labels:
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


def layer_norm(a: Analysis, node: fx.Node) -> Labels:
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
        raise Pin("LayerNorm normalises over the channel dim")
    return same_channels(a, node)


def conv(a: Analysis, node: fx.Node) -> Labels:
    """Conv: fresh output channels; input channels index ``weight`` dim 1.

    Depthwise (groups == in == out) passes channels through. Other grouped convs couple the
    i-th channel of every group (removing it from all groups keeps them equal).
    """
    mod = a.module(node) if node.op == "call_module" else _functional_conv_module(a, node)
    x = a.labels(node.args[0])
    if x is None:
        raise Pin("conv input has no channel labels")
    g, cin, cout = mod.groups, mod.in_channels, mod.out_channels
    if g == cin == cout:
        a.touch(node, "out", 0, x)
        return x
    per_in, per_out = cin // g, cout // g
    out = a.uf.fresh(cout)
    if g > 1:
        if per_in == 1:
            raise Pin(f"depthwise conv with channel multiplier {per_out}")
        for rows in (x.reshape(g, per_in), out.reshape(g, per_out)):
            for r in range(1, g):
                a.uf.union(rows[0], rows[r])
    columns = np.arange(cin) % per_in  # input channel c ↔ weight column c mod (I/g)
    picked = getattr(mod, "in_columns", None)  # a standardised weight's columns a shrink kept
    a.touch(node, "in", 1, x, columns if picked is None else picked.numpy()[columns])
    a.touch(node, "out", 0, out)
    return out


def conv_transpose(a: Analysis, node: fx.Node) -> Labels:
    """Transposed conv, weight ``(in, out/groups, k...)``: the roles of a conv's weight dims
    swap. Its input channels index ``weight`` dim 0 and go with their producer (a decoder after
    a reshape); its output channels (dim 1 of the weight) are pinned, since no scorer reads that
    dim of a weight yet. ``nn.ConvTranspose*d``, ``F.conv_transpose*d`` on a module's own
    tensors, ``aten.conv_transpose*d`` and core ATen's ``aten.convolution(transposed=True)``::

        x (C) ──▶ conv_transpose ──▶ y (O, pinned)
        channel c of x ↔ weight[c, :, ...]
    """
    if node.op == "call_module":
        mod = a.module(node)
        if len(node.args) > 1 or node.kwargs:
            raise Pin("transposed conv called with output_size")
    else:
        mod = _functional_layer_checked(a, node, functional_conv_transpose(a.gm, node), "F.conv_transpose")
    if a.labels(node.args[0]) is None or a.dim(node.args[0]) != 1:
        raise Pin("transposed conv input has no channel labels at dim 1")
    if mod.groups != 1:
        raise Pin(f"grouped transposed conv (groups={mod.groups})")
    a.touch(node, "in", 0, a.labels(node.args[0]))
    kind = type(mod).__name__ if node.op == "call_module" else f"transposed conv '{mod.owner}':"
    reason = f"{kind} output channels (weight dim 1) are not pruned"
    return a._pinned_labels(mod.out_channels, reason)


def convolution(a: Analysis, node: fx.Node) -> Labels:
    """Core ATen's ``aten.convolution``: a conv, or a transposed one (its ``transposed`` flag)."""
    return conv_transpose(a, node) if is_transposed_conv(node) else conv(a, node)


def _functional_conv_module(a: Analysis, node: fx.Node) -> Any:
    """``functional_conv``, checked: its tensors read once, by this call alone."""
    return _functional_layer_checked(a, node, functional_conv(a.gm, node), "F.conv")


def _functional_layer_checked(a: Analysis, node: fx.Node, spec: Any, what: str) -> Any:
    """``spec`` (a functional conv's, transposed or not), checked: its tensors are one module's
    weight and bias, read once, by this call alone (so that shrink may slice them)."""
    if spec is None:
        raise Pin(f"{what} on tensors that are not one module's weight and bias")
    computed = getattr(spec, "standardized", None)  # its chain reads the weight twice, by itself
    chain = computed.nodes if computed is not None else ()
    own = (computed.index, *computed.gain[:1]) if computed is not None else ()  # its column index, its gain
    reads = [n for n in a.gm.graph.nodes if n.op == "get_attr" and n.target.startswith(spec.owner + ".")
             and n not in own]
    if len(reads) != 1 + (spec.bias is not None) or any(len(r.users) != 1 for r in reads if r not in chain):
        raise Pin(f"{spec.owner}'s tensors are read elsewhere too")
    return spec


def linear(a: Analysis, node: fx.Node) -> Labels:
    """Linear over the last dim, (N, F) or (N, ..., F) (a pointwise conv on a channels-last
    tensor): fresh output features at the last dim; input features index ``weight`` dim 1.
    An input whose channels are another dim has them pinned (``Analysis.anchor``)."""
    shape = _shape(node.args[0])
    if a.labels(node.args[0]) is None or shape is None or len(shape) < 2:
        raise Pin("linear on an input without (N, ..., features)")
    d = a.dim(node.args[0])
    why = f"{node.format_node()}: mixes the last dim of a value whose channels are dim {d}"
    x = a.anchor(node.args[0], -1, why)
    mod = a.module(node)
    out = a.uf.fresh(mod.out_features)
    a.touch(node, "in", 1, x)
    a.touch(node, "out", 0, out)
    a.set_dim(node, len(shape) - 1)
    return out


def prelu(a: Analysis, node: fx.Node) -> Labels:
    """PReLU (``nn.PReLU``, ``F.prelu``, ``aten.prelu``): per channel. A per-channel slope
    ``(C,)`` goes with the channels (``weight`` dim 0); a shared one (one element) does not
    couple them."""
    labels = same_channels(a, node)
    if a.dim(node.args[0]) != 1:
        raise Pin("PReLU of a value whose channels are not dim 1")
    if node.op == "call_module":
        if a.module(node).num_parameters > 1:
            a.touch(node, "norm", 0, labels)
        return labels
    w = _arg(node, 1, "weight")
    if not isinstance(w, fx.Node) or _shape(w) is None:
        raise Pin("PReLU slope is not a tensor of the graph")
    if math.prod(_shape(w)) == 1:
        return labels
    if a.labels(w) is None or _shape(w) != (len(labels),):
        raise Pin(f"PReLU slope of shape {_shape(w)} is not per channel")
    a.uf.union(labels, a.labels(w))
    return labels


def functional_group_norm(a: Analysis, node: fx.Node) -> Labels:
    """``F.group_norm(x, num_groups, weight, bias)`` / ``aten.group_norm``: as ``group_norm``
    (whole groups are one unit), its ``(C,)`` tensors sliced with the channels; shrink
    rewrites ``num_groups``."""
    labels = same_channels(a, node)
    groups = _arg(node, 1, "num_groups")
    if a.dim(node.args[0]) != 1 or not isinstance(groups, int) or len(labels) % groups:
        where = a.dim(node.args[0])
        raise Pin(f"group norm with num_groups={groups} over {len(labels)} channels at dim {where}")
    rows = labels.reshape(groups, len(labels) // groups)
    for j in range(1, rows.shape[1]):
        a.uf.union(rows[:, 0], rows[:, j])
    return _union_channel_tensors(a, node, labels, ((2, "weight"), (3, "bias")))


def aten_norm_tuple(a: Analysis, node: fx.Node) -> tuple:
    """``_native_batch_norm_legit_no_training`` (core ATen's eval batch norm) returns
    ``(out, mean, rstd)``: ``out`` as ``functional_norm``'s, the statistics empty."""
    return (_union_norm_tensors(a, node, _tuple_keeps_channels(a, node)), None, None)


def functional_linear(a: Analysis, node: fx.Node) -> Labels:
    """``aten.linear`` / ``aten.addmm`` on one module's tensors: as an ``nn.Linear``."""
    spec = functional_linear_spec(a.gm, node)
    if spec is None:
        raise Pin("linear on tensors that are not one module's weight and bias")
    x, shape = spec.input, _shape(spec.input)
    if a.labels(x) is None or shape is None or len(shape) < 2:
        raise Pin("linear on an input without (N, ..., features)")
    why = f"{node.format_node()}: mixes the last dim of a value whose channels are dim {a.dim(x)}"
    x_labels = a.anchor(x, -1, why)
    out = a.uf.fresh(spec.out_features)
    a.touch(node, "in", 1, x_labels, module=spec.owner)
    a.touch(node, "out", 0, out, module=spec.owner)
    a.set_dim(node, len(shape) - 1)
    return out
