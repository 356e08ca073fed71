"""Compensation pass: repair the weights that survive pruning, so the pruned model reproduces
the dense model's activations without training and without labels.

Pruning removes channels; every layer reading them (a conv or linear consuming a pruned group,
every reader of a pruned residual stream) now sees less than it was trained on, and the error
compounds down the network. ``compensate`` refits those layers by least squares on unlabelled
calibration inputs, as the channel-pruning reconstructions (ThiNet; He et al. 2017) and
OBC/SparseGPT do. For each conv/linear of the pruned graph, in graph order::

    dense:   x ─▶ conv1 ─▶ bn ─▶ relu ─▶ conv2 ─▶ ...     Y = conv2(h)[:, kept]     (N·L, O')
    pruned:  x ─▶ conv1'─▶ bn'─▶ relu ─▶ conv2'─▶ ...     X = unfold(h')           (N·L, K)
                  (already repaired)                      E = Y − conv2'(h')

it accumulates ``H = Σ XᵀX`` over the layer's im2col-unfolded inputs *as the pruned model
computes them, its predecessors already repaired* (fitting on the unrepaired inputs compensates
twice: 10.75 % against 78.15 % in the issue's probe) and ``R = Σ XᵀE``, then solves
``(H + λI) ΔW = R`` by Cholesky in float64 and sets ``W ← W + ΔW``: the least-squares weights,
damped towards the current ones (``λ = damping · mean(diag H)``), never towards zero. Where a
ReLU follows (through a BatchNorm, and a residual add when the block's output is matched), the
entries it zeroes for the target need no exact value, only to stay zeroed: ``relu_rounds``
more solves with the same ``H`` replace those targets by the fit itself, moved back to the
ReLU's threshold where it crossed it (majorize-minimize steps of a convex loss that only counts
what the ReLU lets through). A layer
with a bias fits it too (a ones column of ``X``). A grouped conv solves one system per group; a
depthwise conv has no cross-channel freedom: ``kh·kw (+1)`` weights per channel. A layer whose
output already equals the dense one (``E`` exactly zero: its inputs did not change) is left
bitwise unchanged.

Both graphs run node by node over the whole calibration set (each node once for all batches,
each value freed after its last reader), so the repair costs about two forward passes plus the
``H`` accumulations and one small solve per layer. Memory: the calibration set's live
activations, and one layer's accumulators at a time: ``g·(K+1)²`` entries of ``H`` and
``(K+1)·O`` of ``R``, ``K = C_in·kh·kw/g``, float64 (a half dtype cannot hold sums of 10⁵
squared activations: the accumulators stay float64, the forward passes run in the model's own
dtype).

A pruned layer is paired with the dense one by node name (``shrink`` copies the graph) and its
output channels by ``node.meta["ehap.kept"]`` (``shrink.record_kept``). Both captures work: FX
``call_module`` convs and linears, and the ``F.conv*`` / ``aten.conv2d`` /
``aten.convolution`` / ``aten.linear`` / ``aten.addmm`` calls on one module's tensors.
"""

from __future__ import annotations

import contextlib
import copy
import operator
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from ehap_fx.passes._layers import _arg, functional_conv, functional_linear_spec
from torch import fx, nn
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from ehap_fx import _meta
from ehap_fx.errors import EhapError


@dataclass(frozen=True)
class CompensateOptions:
    """How ``compensate`` fits: on the first ``images`` calibration images, damping ``λ`` as a
    fraction of ``mean(diag H)``, at most ``max_rows`` rows of ``X`` per batch and layer (im2col
    positions sampled uniformly, seeded by ``seed``, when a batch has more: a big feature map's
    neighbouring positions say nearly the same; None keeps all). ``add_bias``: a conv/linear
    module without a bias gets one to fit (the mean shift the removed channels leave behind).
    ``match``: a conv feeding ``bn → add(·, stream)`` fits its own output (``"layer"``) or the
    block's (``"block"``). ``relu_rounds``: a conv whose output goes through BN (and that add)
    into a ReLU is refitted this many more times, each round freeing the entries the ReLU
    zeroes anyway from the fit (0: plain least squares; docs/results.md, issue 25: +0.3 pt on
    ResNet-56 and +0.5–0.8 pt on ResNet-32 at half the MACs, three rounds). ``mirror``: each
    calibration image's left-right mirror is fitted on too (twice the rows and the walk's work,
    no more images; for inputs whose mirror is as likely as themselves: with ``damping=0.1`` it
    brings ResNet-56 at the README job's latency target within 2 pt of dense, docs/results.md)."""

    images: int = 512
    damping: float = 1e-4
    max_rows: int | None = 8192
    seed: int = 0
    add_bias: bool = False
    match: str = "block"
    relu_rounds: int = 3
    mirror: bool = False

    def __post_init__(self) -> None:
        if self.images < 1:
            raise ValueError(f"images={self.images} must be >= 1")
        if self.damping < 0:
            raise ValueError(f"damping={self.damping} must be >= 0")
        if self.match not in ("layer", "block"):
            raise ValueError(f"match={self.match!r} must be 'layer' or 'block'")
        if self.max_rows is not None and self.max_rows < 1:
            raise ValueError(f"max_rows={self.max_rows} must be >= 1 or None")
        if self.relu_rounds < 0:
            raise ValueError(f"relu_rounds={self.relu_rounds} must be >= 0")


@dataclass(frozen=True)
class LayerFit:
    """One layer's repair: ``rows`` × ``columns`` (per group) fitted in ``groups`` systems, the
    relative squared error ``‖Y − out‖² / ‖Y‖²`` against the dense output before and after (on
    the fitted rows), and ``repaired`` False where the error was exactly zero."""

    node: str
    rows: int
    columns: int
    groups: int
    error_before: float
    error_after: float
    repaired: bool


@dataclass(frozen=True)
class Compensation:
    """What ``compensate`` did (``gm.meta["ehap.compensation"]``): per-layer fits, the images
    used, the time, and the largest accumulator pair (``H`` and ``R``) it held, in bytes."""

    layers: tuple[LayerFit, ...]
    images: int
    seconds: float
    accumulator_bytes: int

    def summary(self) -> dict:
        fitted = [f for f in self.layers if f.repaired]
        return {
            "images": self.images,
            "layers_repaired": len(fitted),
            "layers_unchanged": len(self.layers) - len(fitted),
            "seconds": round(self.seconds, 3),
            "accumulator_bytes": self.accumulator_bytes,
            "mean_error_before": _mean([f.error_before for f in fitted]),
            "mean_error_after": _mean([f.error_after for f in fitted]),
        }


def _mean(values: list[float]) -> float | None:
    return round(sum(values) / len(values), 6) if values else None


# ---------------------------------------------------------------------------------------------
# The layers a repair can fit
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Layer:
    """A conv or linear call: the input node, its tensors, and (convs) the geometry."""

    input: fx.Node
    weight: torch.Tensor
    bias: torch.Tensor | None
    conv: bool
    stride: Any = 1
    padding: Any = 0
    dilation: Any = 1
    groups: int = 1


_CONV_FORWARDS = (nn.Conv1d.forward, nn.Conv2d.forward)


def layer_of(gm: fx.GraphModule, node: fx.Node) -> _Layer | None:
    """The conv/linear ``node`` computes, in either capture; None for any other node (a
    transposed or 3-D conv, a conv with a non-zero padding mode, a subclass with its own forward)."""
    if node.op == "call_module":
        m = gm.get_submodule(node.target)
        if type(m).forward in _CONV_FORWARDS:  # a subclass with its own forward is traced into
            if m.padding_mode != "zeros":
                return None
            return _Layer(node.args[0], m.weight, m.bias, True, m.stride, m.padding, m.dilation, m.groups)
        if isinstance(m, nn.Linear) and type(m).forward is nn.Linear.forward:
            return _Layer(node.args[0], m.weight, m.bias, False)
        return None
    spec = functional_linear_spec(gm, node)
    if spec is not None:
        return _Layer(spec.input, spec.weight, spec.bias, False)
    spec = functional_conv(gm, node)
    if spec is None or spec.weight.dim() not in (3, 4) or spec.standardized is not None:
        return None  # a standardised weight is not the parameter a least-squares fit would set
    return _Layer(node.args[0], spec.weight, spec.bias, True, _arg(node, 3, "stride", 1),
                  _arg(node, 4, "padding", 0), _arg(node, 5, "dilation", 1), spec.groups)


def columns(layer: _Layer, x: torch.Tensor, pick: torch.Tensor | None = None) -> torch.Tensor:
    """The layer's input as least-squares rows: ``(rows, groups, K)``, ``K = C_in·kh·kw/g``
    for a conv (im2col, channel-major like the weight's flattened ``(C/g, kh, kw)``),
    ``in_features`` for a linear (all leading dims are rows). ``pick``: only these rows (flat
    indices of the output positions ``(N, *spatial)``), gathered without unfolding the rest.

    Built from ``kh·kw`` strided views of the zero-padded input: ``F.unfold`` (im2col) took
    half of the whole repair's time on a CPU."""
    if not layer.conv:
        cols = x.reshape(-1, 1, x.shape[-1])  # (rows, 1, I)
        return cols if pick is None else cols[pick]
    if x.dim() == 3:  # conv1d: (N, C, L) as (N, C, 1, L)
        x = x.unsqueeze(2)
    spatial = layer.weight.dim() - 2
    kernel = (1,) * (2 - spatial) + tuple(layer.weight.shape[2:])
    stride, dilation = _pair2(layer.stride, spatial, 1), _pair2(layer.dilation, spatial, 1)
    x = F.pad(x, _padding(layer.padding, kernel, dilation, spatial))
    n, c, hp, wp = x.shape
    out = [(size - d * (k - 1) - 1) // s + 1
           for size, d, k, s in zip((hp, wp), dilation, kernel, stride, strict=True)]  # (Ho, Wo)
    offsets = [(i * dilation[0], j * dilation[1]) for i in range(kernel[0]) for j in range(kernel[1])]
    if pick is None:
        span = [s * (o - 1) + 1 for s, o in zip(stride, out, strict=True)]
        taps = [x[:, :, i : i + span[0] : stride[0], j : j + span[1] : stride[1]]
                for i, j in offsets]  # each (N, C, Ho, Wo)
        cols = torch.stack(taps, 2).permute(0, 3, 4, 1, 2)  # (N, Ho, Wo, C, kh·kw)
    else:
        image, at = pick // (out[0] * out[1]), pick % (out[0] * out[1])
        row, col = at // out[1] * stride[0], at % out[1] * stride[1]
        x = x.permute(0, 2, 3, 1)  # (N, Hp, Wp, C)
        cols = torch.stack([x[image, row + i, col + j] for i, j in offsets], 2)  # (rows, C, kh·kw)
    return cols.reshape(-1, layer.groups, c // layer.groups * len(offsets))


def _pair2(v: Any, spatial: int, fill: int) -> tuple[int, int]:
    """A conv's stride/dilation/padding as two dims (a conv1d's as ``(fill, v)``)."""
    v = tuple(v) if isinstance(v, (tuple, list)) else (v,) * spatial
    return (fill, v[0]) if spatial == 1 else (v[0], v[1])


def _padding(padding: Any, kernel: tuple[int, int], dilation: tuple[int, int], spatial: int) -> list[int]:
    """``F.pad`` widths (last dim first) of a conv's ``padding``: ints, ``"valid"``, ``"same"``."""
    if padding == "valid":
        return [0, 0, 0, 0]
    if padding == "same":
        total = [d * (k - 1) for d, k in zip(dilation, kernel, strict=True)]
        return [total[1] // 2, total[1] - total[1] // 2, total[0] // 2, total[0] - total[0] // 2]
    p = _pair2(padding, spatial, 0)
    return [p[1], p[1], p[0], p[0]]


def targets(layer: _Layer, y: torch.Tensor) -> torch.Tensor:
    """The layer's output as rows matching ``columns``: ``(rows, groups, O/g)``."""
    if not layer.conv:
        return y.reshape(-1, 1, y.shape[-1])
    n, o = y.shape[:2]
    return y.reshape(n, o, -1).transpose(1, 2).reshape(-1, layer.groups, o // layer.groups)


# ---------------------------------------------------------------------------------------------
# Running a graph node by node over the calibration set
# ---------------------------------------------------------------------------------------------


class _Walk:
    """Runs ``gm`` one node at a time over every calibration batch; a value is dropped after
    its last reader has run (``release``)."""

    def __init__(self, gm: fx.GraphModule, batches: list[Any]):
        self.interp = fx.Interpreter(gm)
        self.batches = batches
        self.env: dict[fx.Node, list[Any]] = {}
        self.last: dict[fx.Node, fx.Node] = {}
        for node in gm.graph.nodes:
            for a in node.all_input_nodes:
                self.last[a] = node
        self.placeholders = list(gm.graph.find_nodes(op="placeholder"))

    def compute(self, node: fx.Node) -> list[Any]:
        if node.op == "placeholder":
            i = self.placeholders.index(node)
            return [b[i] if len(self.placeholders) > 1 else b for b in self.batches]
        if node.op == "get_attr":
            return [self.interp.fetch_attr(node.target)] * len(self.batches)
        out = []
        for b in range(len(self.batches)):
            args, kwargs = fx.node.map_arg((node.args, node.kwargs), lambda a, b=b: self.env[a][b])
            out.append(getattr(self.interp, node.op)(node.target, args, kwargs))
        return out

    def ensure(self, node: fx.Node) -> list[Any]:
        """``node``'s values, computed ahead of graph order (with what it reads) if need be."""
        if node not in self.env:
            for a in node.all_input_nodes:
                self.ensure(a)
            self.env[node] = self.compute(node)
        return self.env[node]

    def release(self, node: fx.Node) -> None:
        for a in node.all_input_nodes:
            if self.last.get(a) is node:
                self.env.pop(a, None)
        if not node.users:
            self.env.pop(node, None)


class _Reference:
    """The dense graph's values, computed lazily up to the node asked for by name."""

    def __init__(self, gm: fx.GraphModule, batches: list[Any]):
        self.walk = _Walk(gm, batches)
        self.nodes: Iterator[fx.Node] = iter(gm.graph.nodes)
        self.names = {n.name: n for n in gm.graph.nodes if n.op != "output"}
        self.done: set[fx.Node] = set()

    def value(self, name: str) -> tuple[fx.Node, list[Any]] | None:
        """The dense node of that name and its values; None when there is none, or when it was
        computed and dropped already (a value is read at most once, at its first request)."""
        target = self.names.get(name)
        if target is None or (target in self.done and target not in self.walk.env):
            return None
        while target not in self.walk.env:
            node = next(self.nodes)
            self.walk.env[node] = self.walk.compute(node)
            self.done.add(node)
            if node is not target:
                self.walk.release(node)
        return target, self.walk.env[target]


# ---------------------------------------------------------------------------------------------
# The pass
# ---------------------------------------------------------------------------------------------


def compensate(gm: fx.GraphModule, dense: fx.GraphModule, data: Iterable,
               options: CompensateOptions = CompensateOptions()) -> PassResult:
    """Return a copy of ``gm`` (a shrunk ``dense``) whose convs and linears are refitted, in
    graph order, to reproduce ``dense``'s outputs on the first ``options.images`` inputs of
    ``data`` (batches of inputs, or ``(x, ...)`` tuples: labels, if any, are ignored).

    ``dense`` is not modified (it runs in eval mode and is put back); the result is in eval
    mode's weights and carries a :class:`Compensation` in ``gm.meta["ehap.compensation"]``.
    """
    t0 = time.perf_counter()
    batches = calibration_inputs(data, options.images)
    images = sum(_count(b) for b in batches)
    if options.mirror:
        batches += [_mirrored(x) for x in batches]
    out = copy.deepcopy(gm)
    gen = torch.Generator().manual_seed(options.seed)
    fits, peak = [], 0
    with torch.no_grad(), _eval(out), _eval(dense):
        walk, ref = _Walk(out, batches), _Reference(dense, batches)
        for node in out.graph.nodes:
            if node.op == "output":
                break
            walk.ensure(node)
            layer = layer_of(out, node)
            paired = ref.value(node.name) if layer is not None else None
            if paired is not None:
                stream = _stream_error(out, node, walk, ref) if options.match == "block" else None
                fit, size = _repair(node, layer, paired, walk, gen, options, stream)
                fits.append(fit)
                peak = max(peak, size)
            walk.release(node)
    out.meta[_meta.COMPENSATION] = Compensation(
        tuple(fits), images, time.perf_counter() - t0, peak)
    return PassResult(out, any(f.repaired for f in fits))


def calibration_inputs(data: Iterable, images: int) -> list[Any]:
    """The first ``images`` inputs of ``data``, batch by batch: tensors, or the first element of
    ``(x, y)`` pairs (labels are never read). ``data`` may also be one tensor of inputs, or one
    ``(x, y)`` tuple of tensors (a tuple of two is a pair, as ``compress`` reads it)."""
    if isinstance(data, tuple) and len(data) == 2 and all(torch.is_tensor(t) for t in data):
        data = data[0]
    if torch.is_tensor(data):
        data = data.split(256)
    out, seen = [], 0
    for batch in data:
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        x = x[: images - seen]
        out.append(x)
        seen += _count(x)
        if seen >= images:
            break
    if not out:
        raise EhapError("compensate: the calibration data yielded no batch")
    return out


def _mirrored(x: Any) -> Any:
    """A batch of images (``(N, C, H, W)`` tensors, or a tuple of them) mirrored left to right."""
    if torch.is_tensor(x):
        return x.flip(-1)
    return type(x)(_mirrored(t) for t in x)


def _count(x: Any) -> int:
    return len(x) if torch.is_tensor(x) else len(x[0])


@contextlib.contextmanager
def _eval(gm: fx.GraphModule):
    training = gm.training
    gm.eval()
    try:
        yield gm
    finally:
        gm.train(training)


_ADDS = (operator.add, torch.add, "add", torch.ops.aten.add.Tensor)


def _stream_error(gm: fx.GraphModule, node: fx.Node, walk: _Walk, ref: _Reference) -> list | None:
    """For a conv whose output, through at most one eval-mode BatchNorm, is added to a residual
    stream (``bn(conv(h)) + s``): the stream's error ``(s_dense − s) / a`` in the conv's output
    units (``a``: the BN's per-channel scale), per batch; the conv that fits ``conv_dense(h_d) +
    (s_d − s)/a`` makes the block's output, not only its own, match the dense one. None for any
    other conv (and where the shapes or channels do not pair up)."""
    chain, scale = node, None
    users = list(chain.users)
    if len(users) == 1 and users[0].op == "call_module":
        bn = gm.get_submodule(users[0].target)
        if not isinstance(bn, nn.modules.batchnorm._BatchNorm) or bn.running_var is None:
            return None
        scale = torch.rsqrt(bn.running_var + bn.eps) * (bn.weight if bn.weight is not None else 1)
        chain, users = users[0], list(users[0].users)
    if len(users) != 1 or users[0].target not in _ADDS or users[0].kwargs:
        return None
    others = [a for a in users[0].args if a is not chain]
    if len(others) != 1 or not isinstance(others[0], fx.Node) or len(users[0].args) != 2:
        return None
    other = others[0]
    if _reaches_a_layer(gm, other, walk):
        return None  # the other branch is fitted later: it takes the block's error (no fitting twice)
    pruned, dense = walk.ensure(other), ref.value(other.name)
    if dense is None or not torch.is_tensor(pruned[0]) or pruned[0].shape != walk.env[node][0].shape:
        return None
    index = _dense_channels(other, dense[0])
    scale = scale.reshape(1, -1, *[1] * (pruned[0].dim() - 2)) if scale is not None else 1
    return [((d.index_select(1, index) if index is not None else d) - p) / scale
            for d, p in zip(dense[1], pruned, strict=True)]


def _reaches_a_layer(gm: fx.GraphModule, node: fx.Node, walk: _Walk) -> bool:
    """Does computing ``node`` now (ahead of graph order) run a conv/linear not yet fitted?"""
    if node in walk.env:
        return False
    return layer_of(gm, node) is not None or any(_reaches_a_layer(gm, a, walk) for a in node.all_input_nodes)


def _repair(node: fx.Node, layer: _Layer, paired: tuple[fx.Node, list[Any]], walk: _Walk,
            gen: torch.Generator, options: CompensateOptions, stream: list | None = None
            ) -> tuple[LayerFit, int]:
    """Fit one layer on ``walk``'s (repaired) inputs against the dense outputs (plus ``stream``,
    the residual stream's error, where it matches the block output); update its tensors in
    place and its values in ``walk``. Returns the fit and the accumulators' bytes."""
    dense_node, dense_out = paired
    index = _dense_channels(node, dense_node)
    outputs, inputs = walk.env[node], walk.env[layer.input]
    bias = layer.bias is not None or (options.add_bias and node.op == "call_module")
    if stream is None and index is None and all(torch.equal(y, got) for y, got in zip(dense_out, outputs,
                                                                                       strict=True)):
        return LayerFit(node.name, 0, 0, layer.groups, 0.0, 0.0, False), 0  # unchanged inputs: nothing to fit
    cut = _relu_after(walk.interp.module, node, stream is not None) if options.relu_rounds else None

    def batch(b: int, pick: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
        """Batch ``b``'s ``(Xᵀ, target, output)`` rows, and the ReLU's offsets when ``cut``."""
        xt, y, got = _rows(layer, inputs[b], dense_out[b], outputs[b], pick, index,
                           stream[b] if stream is not None else None, bias)
        if cut is None:
            return xt, y, got
        return xt, y, got, _offsets(layer, cut[1], walk.env[cut[2]][b] if cut[2] is not None else None,
                                    outputs[b], pick)

    h = r = None
    e2 = y2 = 0.0
    rows, picks, kept, held = 0, [], [], 0
    for b, got in enumerate(outputs):
        pick, positions = None, _positions(layer, got)
        if options.max_rows is not None and positions > options.max_rows:
            pick = torch.randperm(positions, generator=gen)[: options.max_rows]
        picks.append(pick)
        rows_b = batch(b, pick)
        xt, y, got = rows_b[:3]
        err = y - got
        # one batch's products in the activations' dtype (float32), summed in float64
        h = torch.bmm(xt, xt.transpose(1, 2)).double() + (h if h is not None else 0)  # (g, K+1, K+1)
        r = torch.bmm(xt, err.transpose(0, 1).to(xt.dtype)).double() + (r if r is not None else 0)
        e2 += float(err.double().square().sum())
        y2 += float(y.double().square().sum())
        rows += xt.shape[2]
        held += xt.numel() * xt.element_size() if cut is not None else 0
        kept.append(rows_b if cut is not None and held <= RELU_CACHE_BYTES else None)
    size = (h.numel() + r.numel()) * h.element_size()
    g, k = h.shape[0], h.shape[1] - bias
    if e2 == 0.0:
        return LayerFit(node.name, rows, k, g, 0.0, 0.0, False), size
    delta = solve(h, r, options.damping)  # (g, K+1, O/g)
    for _ in range(options.relu_rounds if cut is not None else 0):
        r_cut = sum(_relu_residual(*(kept[b] or batch(b, picks[b])), cut[0].reshape(g, -1), delta)
                    for b in range(len(outputs)))  # beyond the cache's budget, computed again
        delta = solve(h, r_cut, options.damping)
    after = e2 - 2 * float((delta * r).sum()) + float((delta * torch.bmm(h, delta)).sum())
    if bias and layer.bias is None:  # add_bias: a zero bias to fit
        module = walk.interp.module.get_submodule(node.target)
        module.bias = nn.Parameter(layer.weight.new_zeros(layer.weight.shape[0]))
        layer = replace(layer, bias=module.bias)
    _update(layer, delta)
    walk.env[node] = walk.compute(node)
    scale = max(y2, 1e-30)
    return LayerFit(node.name, rows, k, g, e2 / scale, max(after, 0.0) / scale, True), size


def _relu_after(gm: fx.GraphModule, node: fx.Node, block: bool
                ) -> tuple[torch.Tensor, torch.Tensor, fx.Node | None] | None:
    """``(a, c, s)`` for a conv whose output goes through one eval-mode BatchNorm into a ReLU,
    ``relu(a·y + c)`` per channel (``s`` None), or, with ``block`` (the conv fitted to the
    block's output), through the BatchNorm and an add of the stream ``s`` into one,
    ``relu(a·y + c + s)``; None for any other layer."""
    users = list(node.users)
    if len(users) != 1 or users[0].op != "call_module":
        return None
    bn = gm.get_submodule(users[0].target)
    if not isinstance(bn, nn.modules.batchnorm._BatchNorm) or bn.running_var is None:
        return None
    after, other = list(users[0].users), None
    if block and len(after) == 1 and after[0].target in _ADDS and len(after[0].args) == 2:
        (other,) = [x for x in after[0].args if x is not users[0]] or [None]
        after = list(after[0].users)
    if len(after) != 1 or not _is_relu(gm, after[0]) or (block and other is None):
        return None
    a = torch.rsqrt(bn.running_var + bn.eps) * (bn.weight if bn.weight is not None else 1)
    c = (bn.bias if bn.bias is not None else 0) - a * bn.running_mean
    return a.double(), c.double(), other


def _is_relu(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op == "call_module":
        return type(gm.get_submodule(node.target)) is nn.ReLU
    return node.target in (F.relu, torch.relu, torch.relu_, "relu", "relu_")


def _relu_residual(xt: torch.Tensor, y: torch.Tensor, got: torch.Tensor, off: torch.Tensor, a: torch.Tensor,
                   delta: torch.Tensor) -> torch.Tensor:
    """One batch's ``Xᵀ(Y' − out)`` for the next ``relu_rounds`` step. Where the ReLU after the
    layer (``relu(a·y + off)``) zeroes the target, any fit on the same side of its threshold
    gives the same activation: ``Y'`` is the current fit (``out + XΔW``) there, moved back to
    the threshold where it crossed it; elsewhere the target. The least squares on ``Y'`` is one
    majorize-minimize step of the convex loss ``Σ_live (y − f)² + Σ_dead ((a·f + off)₊ / a)²``,
    so each round lowers it; ``H`` is unchanged. The products run in ``xt``'s dtype, as the
    accumulation of ``R`` does."""
    dtype = xt.dtype
    a = a.to(dtype)
    fit = got.to(dtype) + torch.bmm(xt.transpose(1, 2), delta.to(dtype)).transpose(0, 1)  # (rows, g, O/g)
    dead = a * y.to(dtype) + off <= 0
    moved = torch.where(a != 0, ((a * fit + off).clamp_max(0) - off) / torch.where(a != 0, a, 1), fit)
    err = torch.where(dead, moved, y.to(dtype)) - got.to(dtype)
    return torch.bmm(xt, err.transpose(0, 1)).double()


def _offsets(layer: _Layer, c: torch.Tensor, stream: torch.Tensor | None, out: torch.Tensor,
             pick: torch.Tensor | None) -> torch.Tensor:
    """``off`` of ``relu(a·y + off)`` as rows: the BN's shift ``c`` plus the stream's values."""
    off = c.to(out.dtype).reshape(1, -1, *[1] * (out.dim() - 2))
    off = targets(layer, (off + stream) if stream is not None else off.expand_as(out))
    return (off[pick] if pick is not None else off).to(_product_dtype(out))


def _positions(layer: _Layer, out: torch.Tensor) -> int:
    """Rows a batch gives: output positions ``N·L`` (all leading dims of a linear's output)."""
    return out.numel() // out.shape[1 if layer.conv else -1]


def _rows(layer: _Layer, x: torch.Tensor, y: torch.Tensor, got: torch.Tensor, pick: torch.Tensor | None,
          index: torch.Tensor | None, stream: torch.Tensor | None, bias: bool
          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One batch as least squares: ``Xᵀ`` ``(g, K [+1], rows)`` in the product dtype, the target
    (the dense output's kept channels, plus the stream's error) and the current output as rows
    ``(rows, g, O/g)``; ``pick``: these rows only."""
    y = y.index_select(1 if layer.conv else y.dim() - 1, index) if index is not None else y
    y = y + stream if stream is not None else y
    y, got = targets(layer, y), targets(layer, got)
    if pick is not None:
        y, got = y[pick], got[pick]
    cols = columns(layer, x, pick)  # (rows, g, K)
    if bias:
        cols = torch.cat([cols, cols.new_ones(*cols.shape[:2], 1)], 2)
    return cols.permute(1, 2, 0).to(_product_dtype(cols)), y, got


def _product_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _dense_channels(node: fx.Node, dense_node: fx.Node) -> torch.Tensor | None:
    """Which of the dense node's output channels the pruned node keeps (None: all, in order)."""
    kept, base = node.meta.get(_meta.KEPT), dense_node.meta.get(_meta.KEPT)
    if kept is None or kept == base:
        return None
    position = {c: i for i, c in enumerate(base)} if base is not None else None
    try:
        return torch.tensor([position[c] for c in kept] if position is not None else list(kept))
    except KeyError as e:
        raise EhapError(
            f"compensate: {node.format_node()} keeps channel {e} that the dense graph's "
            f"{dense_node.name} no longer has: pass the graph the pruned one was shrunk from"
        ) from e


#: The most bytes of ``Xᵀ`` that ``relu_rounds`` keeps between its passes (beyond, recomputed).
RELU_CACHE_BYTES = 512 * 2**20

#: Above this many columns the factorisation runs in float32 (the accumulators stay float64):
#: on ResNet-50 the float64 Cholesky of its 1,000–2,300-column systems took half the repair.
FLOAT32_SOLVE_ABOVE = 1024


def solve(h: torch.Tensor, r: torch.Tensor, damping: float) -> torch.Tensor:
    """``(H + λI)⁻¹ R`` per group by Cholesky, ``λ = damping · mean(diag H)``; a factorisation
    that fails (a singular ``H``: dead inputs, too few rows) is retried with ``λ`` ×10, from
    ``1e-8 · mean(diag H)`` when ``damping`` is 0. float64, or float32 for systems of more than
    ``FLOAT32_SOLVE_ABOVE`` columns; the result is float64."""
    dtype = torch.float64 if h.shape[1] <= FLOAT32_SOLVE_ABOVE else torch.float32
    mean_diag = h.diagonal(dim1=1, dim2=2).mean(1).clamp_min(1e-30)  # (g,)
    lam = damping * mean_diag
    for _ in range(12):
        a = h.to(dtype, copy=True)
        a.diagonal(dim1=1, dim2=2).add_(lam[:, None].to(dtype))
        factor, info = torch.linalg.cholesky_ex(a)
        if not bool(info.any()):
            return torch.cholesky_solve(r.to(dtype), factor).double()
        lam = torch.maximum(lam * 10, 1e-8 * mean_diag)
    raise EhapError(f"compensate: H stays singular with damping {float((lam / mean_diag).max()):.1e}")


def _update(layer: _Layer, delta: torch.Tensor) -> None:
    """``W += ΔW``: ``delta`` is ``(g, K [+1 bias], O/g)`` as ``solve`` returns it."""
    w = layer.weight
    g, k1, per = delta.shape
    k = k1 - (layer.bias is not None)
    dw = delta[:, :k].permute(0, 2, 1).reshape(g * per, k)  # (O, K): group j's outputs j·O/g…
    w.data.add_(dw.reshape(w.shape).to(w.dtype))
    if layer.bias is not None:
        layer.bias.data.add_(delta[:, k].reshape(-1).to(layer.bias.dtype))


class Compensate(PassBase):
    """``compensate`` as a ``PassBase`` for a ``PassManager`` pipeline."""

    def __init__(self, dense: fx.GraphModule, data: Iterable,
                 options: CompensateOptions = CompensateOptions()):
        super().__init__()
        self.dense, self.data, self.options = dense, data, options

    def call(self, graph_module: fx.GraphModule) -> PassResult:
        return compensate(graph_module, self.dense, self.data, self.options)
