"""Program pass: a shrunk export-captured graph as an ``ExportedProgram`` again.

PT2 compilers and runtimes (Inductor, ExecuTorch, PT2E quantization, the dynamo ONNX
exporter) take ``torch.export`` programs. ``trace(model, x, capture="export")`` unlifts one
into an ``ExportedGraph`` (ATen ops, parameters read with ``get_attr``), the ordinary passes
group, cost and shrink it, and :func:`exported_program` exports the result once more, with
the capture's example inputs and dynamic shapes (``gm.meta["ehap.capture"]``). Re-exporting,
rather than editing the program's lifted graph, is what keeps everything consistent at once:
the state dict and constants hold the sliced tensors under their old names, the graph
signature lists them, every ``FakeTensor`` in ``node.meta["val"]`` and every symbolic shape
(a dynamic batch, its range constraints) is derived again from the shrunk graph, which is
the graph that runs.

Plans move between captures by what they keep of each layer (:func:`kept_outputs`,
:func:`plan_for`): group ids differ between an FX and an export graph of the same model,
module names do not.

>>> import torch
>>> from torch import nn
>>> from ehap_fx.passes.group import group_channels, groups_of
>>> from ehap_fx.passes.shrink import PrunePlan, shrink
>>> from ehap_fx.passes.trace import trace
>>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 1))
>>> gm = group_channels(trace(net, torch.randn(2, 3, 8, 8), capture="export")).graph_module
>>> plan = plan_for(gm, {"0": range(4)})  # keep output channels 0..3 of conv "0"
>>> ep = exported_program(shrink(gm, plan).graph_module)
>>> tuple(ep.state_dict["0.weight"].shape), tuple(ep.state_dict["2.weight"].shape)
((4, 3, 3, 3), (4, 4, 1, 1))
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping

import torch
from ehap_fx.passes.group import ChannelGroup, groups_of
from ehap_fx.passes.shrink import PrunePlan
from ehap_fx.passes.trace import ExportCapture
from torch import fx

from ehap_fx import _meta
from ehap_fx.errors import ShrinkError, TraceError, reraise_interrupt


def capture_of(gm: fx.GraphModule) -> ExportCapture:
    """How ``gm`` was captured by torch.export; TraceError for an FX-traced graph."""
    capture = gm.meta.get(_meta.CAPTURE)
    if not isinstance(capture, ExportCapture):
        raise TraceError(
            f"{type(gm).__name__} was not captured by torch.export: trace(model, x, capture='export')"
        )
    return capture


def exported_program(gm: fx.GraphModule) -> torch.export.ExportedProgram:
    """Export an export-captured graph (shrunk or not) again, as it was captured: the same
    example inputs and dynamic shapes, decomposed to core ATen when the capture was. The
    graph's train/eval mode is kept (``ExportedGraph.train``: QAT exports in train mode)."""
    capture = capture_of(gm)
    gm = _without_unread_parameters(gm)
    try:
        ep = torch.export.export(gm, capture.args, capture.kwargs, dynamic_shapes=capture.dynamic_shapes)
    except Exception as e:
        reraise_interrupt(e)
        raise ShrinkError(
            f"torch.export of the shrunk {type(gm).__name__} failed: {type(e).__name__}: {e}"
        ) from e
    return ep.run_decompositions() if capture.decomposed else ep


def _without_unread_parameters(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy of ``gm`` without the parameters no node reads (a branch that the capture did
    not take keeps its unpruned weights otherwise: stale shapes in the state dict)."""
    unread = [n for n in gm.graph.find_nodes(op="get_attr") if not n.users and _is_parameter(gm, n.target)]
    if not unread:
        return gm
    gm = copy.deepcopy(gm)
    for node in gm.graph.find_nodes(op="get_attr"):
        if not node.users and _is_parameter(gm, node.target):
            owner, _, name = node.target.rpartition(".")
            delattr(gm.get_submodule(owner), name)
            gm.graph.erase_node(node)
    gm.recompile()
    return gm


def _is_parameter(gm: fx.GraphModule, target: str) -> bool:
    try:
        gm.get_parameter(target)
    except AttributeError:
        return False
    return True


def kept_outputs(gm: fx.GraphModule, plan: PrunePlan) -> dict[str, frozenset[int]]:
    """The output channels of each conv/linear (by module name) that ``plan`` keeps."""
    masks = plan.masks(groups_of(gm))
    kept: dict[str, set[int]] = {}
    for group in groups_of(gm):
        for m in _producers(group):
            rows = m.index[masks[group.id]]  # (kept, k) output-channel indices
            kept.setdefault(m.module, set()).update(rows.flatten().tolist())
    return {name: frozenset(idx) for name, idx in kept.items()}


def plan_for(gm: fx.GraphModule, kept: Mapping[str, Iterable[int]]) -> PrunePlan:
    """The plan of ``gm`` that keeps output channels ``kept[module]`` of each named conv/linear
    (others keep all): e.g. ``kept_outputs`` of a plan made on another capture of the model.

    Raises ShrinkError when the groups of ``gm`` cannot keep exactly that (the captures
    couple channels differently, or a pinned group would lose some)."""
    wanted = {name: set(idx) for name, idx in kept.items()}
    keep = {}
    for group in groups_of(gm).prunable:
        rows = [i for i in range(group.size) if _row_kept(group, i, wanted)]
        if len(rows) < group.size:
            keep[group.id] = tuple(rows)
    plan = PrunePlan(keep)
    plan.validate(groups_of(gm))
    got = kept_outputs(gm, plan)
    for name, idx in wanted.items():
        if got.get(name) != frozenset(idx):
            raise ShrinkError(
                f"{name}: the plan can keep output channels {sorted(got.get(name, ()))[:8]}..., not "
                f"{sorted(idx)[:8]}...: this graph groups its channels differently"
            )
    return plan


def _producers(group: ChannelGroup):
    return [m for m in group.members if m.role == "out" and m.module is not None]


def _row_kept(group: ChannelGroup, i: int, wanted: dict[str, set[int]]) -> bool:
    producers = [m for m in _producers(group) if m.module in wanted]
    if not producers:
        return True
    votes = {all(int(c) in wanted[m.module] for c in m.index[i]) for m in producers}
    if len(votes) > 1:
        raise ShrinkError(f"group {group.id} channel {i}: its layers disagree on whether it is kept")
    return votes.pop()
