"""Capture choice: which graph of a model the pipeline prunes, and why.

``compress(model, x)`` takes models from any library. ``torch.fx`` symbolic tracing sees
module calls (what ``leaf_modules`` and ``exclude`` name) but stops at Python control flow
(ultralytics' heads, Hugging Face's ``ModelOutput`` classes, segmentation_models_pytorch's
decoders); ``torch.export`` follows those (shape branches are specialised away) but gives an
ATen graph. ``capture="auto"`` picks per model::

    FX traces, same output type? ── no ──▶ export ── fails ──▶ one error naming both
        │ yes
    only input/output pins? ── yes ──▶ FX
        │ no (a partial FX graph: an op or module it cannot see into)
    export keeps more channels prunable? ── yes ──▶ export, else FX

The choice and its reason go to ``gm.meta["ehap.captured"]`` (``Captured``), which
``compress`` writes into its report.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ehap_fx.passes.coupling import Rules
from ehap_fx.passes.group import group_channels, groups_of
from ehap_fx.passes.trace import CAPTURES, Captured, both_failed, export_capture, fx_output_check, fx_trace
from torch import fx, nn

from ehap_fx import _meta
from ehap_fx.errors import TraceError


def prunable_channels(gm: fx.GraphModule) -> int:
    """Channels in prunable groups of a grouped graph."""
    return sum(g.size for g in groups_of(gm).prunable)


def _inner_pins(gm: fx.GraphModule) -> int:
    """Channels pinned for a reason other than being the model's input or output."""
    edges = ("model input", "model output")
    return sum(g.size for g in groups_of(gm).pinned if not g.pinned.startswith(edges))


def capture_groups(
    model: nn.Module,
    example_inputs: Any,
    *,
    capture: str = "auto",
    leaf_modules: Sequence[str | type[nn.Module]] = (),
    concrete_args: dict[str, Any] | None = None,
    exclude: Sequence[str] = (),
    rules: Rules | None = None,
) -> fx.GraphModule:
    """Capture ``model`` (``capture``: ``"fx"``, ``"export"`` or ``"auto"``, module docstring),
    group its channels (``passes.group.group_channels`` with ``exclude`` and ``rules``, coupling
    rules added to the default ones, ``passes.coupling``) and record the choice in
    ``gm.meta["ehap.captured"]``.
    ``exclude`` and ``leaf_modules`` name modules, so with either given ``"auto"`` keeps a graph
    FX traced (an export graph has no module calls).

    >>> import torch
    >>> gm = capture_groups(nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 4, 1)), torch.randn(1, 3, 8, 8))
    >>> gm.meta["ehap.captured"].capture, gm.meta["ehap.captured"].why
    ('fx', 'torch.fx traced the whole model: only its inputs and outputs are pinned')
    """
    if capture not in CAPTURES:
        raise ValueError(f"capture={capture!r} must be one of {CAPTURES}")
    if capture == "export":
        return _record(group_channels(export_capture(model, example_inputs), exclude, rules).graph_module,
                       Captured("export", capture, "asked for"))
    try:
        gm = fx_trace(model, example_inputs, leaf_modules=leaf_modules, concrete_args=concrete_args,
                      rules=rules)
        if capture == "auto":
            fx_output_check(model, gm, example_inputs)
    except TraceError as fx_error:
        if capture == "fx":
            raise
        return _export_instead(model, example_inputs, fx_error, exclude, rules)
    gm = group_channels(gm, exclude, rules).graph_module
    if capture == "fx":
        return _record(gm, Captured("fx", capture, "asked for"))
    pinned = _inner_pins(gm)
    inside = f"torch.fx traced it with {pinned} channels pinned inside"
    if not pinned:
        return _record(gm, Captured("fx", capture, "torch.fx traced the whole model: only its inputs and "
                                                   "outputs are pinned"))
    if exclude or leaf_modules:
        why = f"{inside}; export not tried: exclude/leaf_modules name module calls"
        return _record(gm, Captured("fx", capture, why))
    try:
        ex = group_channels(export_capture(model, example_inputs), rules=rules).graph_module
    except TraceError as e:
        why = f"{inside}; torch.export failed ({str(e).splitlines()[0][:200]})"
        return _record(gm, Captured("fx", capture, why))
    n_fx, n_ex = prunable_channels(gm), prunable_channels(ex)
    if n_ex > n_fx:
        why = f"torch.export keeps {n_ex} channels prunable, torch.fx {n_fx} ({pinned} pinned inside)"
        return _record(ex, Captured("export", capture, why))
    why = f"torch.fx keeps {n_fx} channels prunable, torch.export {n_ex}"
    return _record(gm, Captured("fx", capture, why))


def _export_instead(model: nn.Module, example_inputs: Any, fx_error: TraceError, exclude: Sequence[str],
                    rules: Rules | None):
    if exclude:
        raise TraceError(f"{fx_error}\nexclude={list(exclude)} names module calls, which only a torch.fx "
                         "graph has: fix the trace, or drop exclude to prune the torch.export graph"
                         ) from fx_error
    try:
        gm = export_capture(model, example_inputs)
    except TraceError as export_error:
        raise both_failed(model, fx_error, export_error) from export_error
    reason = str(fx_error).splitlines()[0]
    why = f"torch.fx cannot trace it: {reason[:300]}"
    return _record(group_channels(gm, rules=rules).graph_module, Captured("export", "auto", why))


def _record(gm: fx.GraphModule, captured: Captured) -> fx.GraphModule:
    gm.meta[_meta.CAPTURED] = captured
    return gm
