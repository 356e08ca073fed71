"""The whole graph's latency: the per-conv table plus the memory-bound ops, fitted on this machine.

``LatencyModel`` sums single-conv timings; onnxruntime also runs the adds of residual
streams, the pads and slices of option-A shortcuts, pooling, the classifier, and the Q/DQ
boundaries between them. Those ops are memory-bound: their time follows the bytes they move,
and the bytes follow the kept widths. So the whole graph is modelled as

    seconds(plan) = conv_scale · Σ_convs table(conv at its kept widths)
                  + per_element · Σ_memory-bound ops (elements read + written, at kept widths)

with ``conv_scale`` and ``per_element`` fitted to whole-model measurements on this machine
(:meth:`WholeGraphModel.fit`: the dense INT8 file alone fixes ``per_element``; a pruned one
as well fixes both). Ops onnxruntime fuses into the conv before them (BatchNorm folded, ReLU
clamped by the QLinearConv's output range) and views cost nothing and are not counted.
FX call_module convs and torch.export's ATen convolutions alike are convs
(``passes._layers.functional_conv``); every other node with a tensor output is a memory-bound op.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from torch import fx, nn

from ehap_fx import _meta
from ehap_fx.latency import LatencyModel
from ehap_fx.passes._layers import functional_conv
from ehap_fx.passes.cost import removed_nodes
from ehap_fx.passes.group import KeptChannels, groups_of
from ehap_fx.passes.shrink import PrunePlan

#: Ops onnxruntime's INT8 graph does not run on their own: folded into the conv before them
#: (batch norm), fused as the conv's output clamp (ReLU family), or views (no data moved).
#: Matched by name fragment so that every spelling (module, F., torch., aten.) is one row.
FREE = ("batch_norm", "batchnorm", "relu", "hardtanh", "dropout", "identity", "view", "reshape",
        "flatten", "size", "_assert", "contiguous", "clone", "detach", "alias")


def _name(gm: fx.GraphModule, node: fx.Node) -> str:
    if node.op == "call_module":
        return type(gm.get_submodule(node.target)).__name__.lower()
    return str(getattr(node.target, "__name__", node.target)).lower()


def _is_conv(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op == "call_module":
        return isinstance(gm.get_submodule(node.target), nn.modules.conv._ConvNd)
    return node.op == "call_function" and functional_conv(gm, node) is not None


def memory_ops(gm: fx.GraphModule) -> list[fx.Node]:
    """The nodes modelled as memory-bound: computed, tensor-valued, neither convs nor free."""
    out = []
    for node in gm.graph.nodes:
        if node.op not in ("call_module", "call_function", "call_method") or _is_conv(gm, node):
            continue
        if "tensor_meta" not in node.meta or any(f in _name(gm, node) for f in FREE):
            continue
        out.append(node)
    return out


def _elements(node: fx.Node, kept: KeptChannels) -> int:
    """Elements per sample of ``node``'s output at its kept width."""
    meta = node.meta.get("tensor_meta")
    shape = getattr(meta, "shape", None)
    if shape is None or len(shape) < 2:
        return 0
    dim = getattr(node.meta.get(_meta.CHANNELS), "dim", 1)
    count = kept.count(node)
    full = math.prod(shape[1:])
    return full if count is None else full // max(1, int(shape[dim])) * count


def moved_elements(gm: fx.GraphModule, ops: Sequence[fx.Node], kept: KeptChannels) -> int:
    """Σ over ``ops`` still computed under ``kept`` of the elements each reads and writes."""

    def width(node: fx.Node) -> int:
        n = kept.count(node)
        return int(node.meta["tensor_meta"].shape[1] if n is None else n)

    gone = removed_nodes(gm, width)
    total = 0
    for node in ops:
        if node in gone:
            continue
        inputs = [a for a in node.all_input_nodes if "tensor_meta" in a.meta and a.op != "get_attr"]
        total += _elements(node, kept) + sum(_elements(a, kept) for a in inputs)
    return total


@dataclass
class WholeGraphModel:
    """``conv_scale · convs(kept) + per_element · moved elements(kept)`` (seconds at the
    table's batch); callable like ``LatencyModel``, so ``select_plan(latency=...)`` takes it."""

    convs: LatencyModel
    conv_scale: float = 1.0
    per_element: float = 0.0

    def __post_init__(self) -> None:
        self.ops = memory_ops(self.convs.gm)

    def parts(self, kept: KeptChannels) -> tuple[float, float]:
        """(conv-table seconds, moved elements) of the graph under ``kept``."""
        return self.convs(kept), float(moved_elements(self.convs.gm, self.ops, kept))

    def __call__(self, kept: KeptChannels) -> float:
        conv, moved = self.parts(kept)
        return self.conv_scale * conv + self.per_element * moved

    def kept(self, plan: PrunePlan | None = None) -> KeptChannels:
        groups = groups_of(self.convs.gm)
        return KeptChannels(groups, (plan or PrunePlan({})).masks(groups))

    @classmethod
    def fit(cls, convs: LatencyModel, measured: Sequence[tuple[PrunePlan | None, float]]) -> WholeGraphModel:
        """Fit to whole-model seconds of plans of ``convs.gm`` (``None``: the dense graph).

        One point fixes ``per_element`` with the table's convs as they are (the rest of the
        measured time is the memory-bound ops'); two or more fit both coefficients by least
        squares, kept non-negative (a negative fit falls back to the one-point form on the
        first point)."""
        if not measured:
            raise ValueError("fit needs at least one (plan, seconds) measurement")
        model = cls(convs)
        rows = [(*model.parts(model.kept(p)), s) for p, s in measured]
        if len(rows) >= 2:
            a = np.array([[c, m] for c, m, _ in rows])
            (scale, per), *_ = np.linalg.lstsq(a, np.array([s for *_, s in rows]), rcond=None)
            if scale > 0 and per >= 0:
                model.conv_scale, model.per_element = float(scale), float(per)
                return model
        conv, moved, seconds = rows[0]
        model.per_element = max(0.0, seconds - conv) / moved if moved else 0.0
        return model
