"""The coupling rule tables, as values, and the public way to add rules for your own modules.

A coupling rule says how an op ties the channels of its inputs and outputs (``passes.group``).
The rules are looked up in a ``Rules`` value, never in a global that import-time code changes:
``FX_RULES`` (torch.fx call targets, method names and module types) and ``ATEN_RULES`` (the
ATen ops of ``torch.export`` graphs), composed into ``COUPLING_RULES``. An op without a rule
pins its channels with a reason; nothing is guessed.

A rule for a module of your own (what Torch-Pruning's ``customized_pruners`` are for). Without
one, tracing goes into its ``forward`` and pins the channels at the first op no rule describes,
naming the module; with one, the module is one call and its rule describes it.
``same_channels`` says "output channel c comes from input channel c alone" (an activation, a
per-channel op without parameters); ``pin(reason)`` keeps the channels, with that reason. Pass
your ``Rules`` to ``trace`` (the graph records them, so ``group_channels`` and ``shrink`` use
them), ``group_channels``, ``capture_groups`` or ``compress``: they are added to
``COUPLING_RULES`` (``coupling_rules(rules)``), a row of yours replacing the default's:

>>> import torch
>>> from torch import nn
>>> from ehap_fx.passes.group import group_channels, groups_of
>>> from ehap_fx.passes.trace import trace
>>> class Snake(nn.Module):  # x + sin²(x), channel by channel
...     def forward(self, x):
...         return x + torch.sin(x) ** 2
>>> model, x = nn.Sequential(nn.Conv2d(3, 8, 3), Snake(), nn.Conv2d(8, 4, 1)), torch.randn(1, 3, 8, 8)
>>> conv_out = groups_of(group_channels(trace(model, x)).graph_module).groups[1]  # conv 0's outputs
>>> conv_out.size, conv_out.pinned.split(" in ")[-1]
(8, "module '1' (Snake): op not understood by the channel analysis")
>>> rules = Rules(modules={Snake: same_channels})
>>> [g.size for g in groups_of(group_channels(trace(model, x, rules=rules)).graph_module).prunable]
[8]

A rule is any ``rule(a: Analysis, node) -> labels`` (the built-in ones are in
``passes._shape_rules`` and ``passes._layer_rules``): it reads the input's labels with
``a.labels(node.args[0])``, makes fresh ones with ``a.uf.fresh(n)``, unions with
``a.uf.union``, and raises ``Pin(reason)`` for a use it cannot describe. Shrink rewrites only
what its own tables know, so a module with per-channel parameters of its own needs more than
a coupling rule: for such a module, ``pin`` it.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from ehap_fx.passes._analysis import Analysis, Labels, Pin, Rule, Rules
from ehap_fx.passes._layer_rules import (
    aten_norm_tuple,
    conv,
    conv_transpose,
    convolution,
    functional_group_norm,
    functional_linear,
    functional_norm,
    group_norm,
    layer_norm,
    linear,
    norm_layer,
    prelu,
)
from ehap_fx.passes._layers import _FUNCTIONAL_CONV_TRANSPOSES, _FUNCTIONAL_CONVS
from ehap_fx.passes._shape_rules import (
    aten_slice,
    attention,
    concat,
    elementwise,
    flatten,
    getitem,
    keeps_leading_dims,
    matmul,
    moves_dims,
    no_channels,
    pad,
    pixel_shuffle,
    reduce_additive,
    reduce_spatial,
    reshape,
    reshape_as,
    same_channels,
    softmax,
    split,
    stack,
    vector_norm,
    with_indices,
)
from torch import fx, nn

from ehap_fx import _meta

__all__ = ["ATEN_RULES", "COUPLING_RULES", "FX_RULES", "Analysis", "Labels", "Pin", "Rule", "Rules",
           "coupling_rules", "pin", "same_channels"]

aten = torch.ops.aten


@dataclass(frozen=True)
class _Pinned:
    """The rule ``pin(reason)`` makes (a value, so that a graph recording its rules pickles)."""

    reason: str

    def __call__(self, a: Analysis, node: fx.Node) -> Labels:
        raise Pin(self.reason)


def pin(reason: str) -> Rule:
    """A rule that pins the op's channels with ``reason``: a module of yours that mixes its
    channels in a way no rule describes, kept as one call instead of traced into."""
    return _Pinned(reason)


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



#: Rules that read channels at any dim (``Analysis.dim``); the others see only values whose
#: channels are dim 1, and a channels-last input pins.
_ANY_DIM = frozenset(
    {same_channels, layer_norm, linear, elementwise, concat, split, getitem, moves_dims,
     keeps_leading_dims, reduce_spatial, reduce_additive, vector_norm, reshape, functional_norm, no_channels,
     aten_slice, functional_linear, softmax, stack, flatten, reshape_as, matmul, attention}
)


#: torch.fx rows: call_function targets and call_method names.
_FX_FUNCTIONS: dict[Any, Rule] = {
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
    "reshape_as": reshape_as,  # to the other's shape, whose channels must land where these do
    "view_as": reshape_as,
    operator.matmul: matmul,  # attention: q @ kᵀ unions q's and k's channels, p @ v keeps v's
    torch.matmul: matmul,
    "matmul": matmul,
    F.scaled_dot_product_attention: attention,  # q's and k's channels one unit, out keeps v's
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
    **dict.fromkeys(_FUNCTIONAL_CONVS, convolution),  # on a conv module's own weight: as that module (core
    # ATen's aten.convolution.default with transposed=True: as a transposed one)
    **dict.fromkeys(_FUNCTIONAL_CONV_TRANSPOSES, conv_transpose),  # inputs at weight dim 0, outputs pinned
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



_ATEN_UNARY = (
    aten.relu, aten.relu_, aten.hardtanh, aten.hardtanh_, aten.gelu, aten.silu, aten.silu_,
    aten.hardswish, aten.hardswish_, aten.hardsigmoid, aten.hardsigmoid_, aten.sigmoid, aten.tanh,
    aten.leaky_relu, aten.leaky_relu_, aten.elu, aten.elu_, aten.mish, aten.mish_, aten.clamp, aten.clamp_min,
    aten.abs, aten.neg, aten.dropout, aten.dropout_,
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
#: ``Rules.for_function`` looks the overload up first, then its packet.
_ATEN_FUNCTIONS: dict[Any, Rule] = {
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
    aten.reshape_as: reshape_as,
    aten.view_as: reshape_as,
    aten.matmul: matmul,
    aten.scaled_dot_product_attention: attention,
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
    aten.convolution: convolution,  # core ATen: a conv, or a transposed one (its `transposed` flag)
    aten.conv_transpose1d: conv_transpose,  # (x, w, b, stride, padding, output_padding, groups, dilation)
    aten.conv_transpose2d: conv_transpose,  # inputs index weight dim 0; outputs pinned
    aten.conv_transpose3d: conv_transpose,
    aten.batch_norm: functional_norm,  # (x, weight, bias, running_mean, running_var, training, ...)
    aten.instance_norm: functional_norm,
    aten._native_batch_norm_legit_no_training: aten_norm_tuple,  # core ATen's eval batch norm
    aten.layer_norm: layer_norm,
    aten.linear: functional_linear,  # (x, w, b) on one module's tensors: as that nn.Linear
    aten.addmm: functional_linear,  # core ATen: addmm(b, x, permute(w, [1, 0]))
    aten.sym_size: no_channels,  # dynamic sizes, not tensors
}


#: Rules for call_module nodes, keyed by module type (a subclass that inherits ``forward``
#: uses its base's rule: ``Rules.for_module``).
_MODULES: dict[type[nn.Module], Rule] = {
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


FX_RULES = Rules(_FX_FUNCTIONS, _MODULES, _ANY_DIM)
ATEN_RULES = Rules(_ATEN_FUNCTIONS, any_dim=_ANY_DIM)
#: The default rules: torch.fx's and ATen's spellings, composed (a new value; neither changes).
COUPLING_RULES = FX_RULES | ATEN_RULES


def coupling_rules(rules: Rules | None = None) -> Rules:
    """The rules the passes use: ``COUPLING_RULES`` with ``rules`` added (theirs win)."""
    if rules is not None and not isinstance(rules, Rules):
        raise TypeError(f"rules={rules!r} is not a Rules value: Rules(modules={{MyModule: same_channels}})")
    return COUPLING_RULES | rules if rules else COUPLING_RULES


def record_rules(gm: fx.GraphModule, rules: Rules | None) -> None:
    """``gm.meta["ehap.rules"]``: the user's rules a graph was traced or grouped with (none:
    no entry), so that the passes grouping it again (``shrink``) use them too."""
    coupling_rules(rules)  # checks the type
    if rules:
        gm.meta[_meta.RULES] = rules
    else:
        gm.meta.pop(_meta.RULES, None)


def known_module(mod: nn.Module, rules: Rules = COUPLING_RULES) -> bool:
    """Does a rule describe ``mod`` (itself, or a base whose ``forward`` it inherits)? Such
    modules are kept as one call when tracing."""
    return rules.for_module(mod) is not None
