"""Trace pass: turn an ``nn.Module`` into a ``GraphModule`` whose nodes carry tensor shapes.

Every later pass reads ``node.meta["tensor_meta"]`` (written by torch.fx's ``ShapeProp``), so
tracing and shape propagation are one step here. When symbolic tracing fails, the error names
the submodule and the source line that broke it and says how to fix it (leaf modules or
``concrete_args``), instead of a bare FX stack trace.
"""

from __future__ import annotations

import inspect
import operator
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from ehap_fx.errors import TraceError
from ehap_fx.passes._coupling import known_module

_TORCH_DIR = str(Path(torch.__file__).parent)


class _NamingTracer(fx.Tracer):
    """A tracer that remembers which submodule it was inside when tracing failed."""

    def __init__(self, leaf_modules: Sequence[str | type[nn.Module]] = ()):
        super().__init__()
        self.leaf_names = {m for m in leaf_modules if isinstance(m, str)}
        self.leaf_types = tuple(m for m in leaf_modules if isinstance(m, type))
        self.failed_module: tuple[str, str] | None = None

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if module_qualified_name in self.leaf_names or isinstance(m, self.leaf_types):
            return True
        if known_module(m):  # a subclass of a known module that inherits its forward: one call
            return True
        return super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m, forward, args, kwargs):
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_module is None:  # the innermost module is the first to see it
                self.failed_module = (self.path_of_module(m), type(m).__name__)
            raise


def _user_frame(exc: BaseException) -> str:
    """The innermost traceback frame outside torch itself, as ``file:line: code``."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if not f.filename.startswith(_TORCH_DIR)]
    if not frames:
        return "unknown location"
    f = frames[-1]
    return f"{f.filename}:{f.lineno}: `{(f.line or '').strip()}`"


def _as_tuple(example_inputs: Any) -> tuple:
    if isinstance(example_inputs, dict):
        return tuple(example_inputs.values())
    return tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)


def call_with(module: nn.Module, example_inputs: Any) -> Any:
    """Call ``module`` the way ``example_inputs`` says: a dict as keyword inputs, a tuple or
    list as positional inputs, anything else (a tensor) as the one input."""
    if isinstance(example_inputs, dict):
        return module(**example_inputs)
    return module(*_as_tuple(example_inputs))


def _bind(model: nn.Module, example_inputs: Any, concrete_args: dict[str, Any] | None) -> dict[str, Any]:
    """``concrete_args`` for every ``forward`` parameter that ``example_inputs`` does not give:
    its default value (``targets=None`` of a detection model, a ``scale=1.0``), so the graph's
    inputs are exactly the given ones. Missing parameters without a default raise TraceError."""
    concrete = dict(concrete_args or {})
    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return concrete
    if any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in params):
        return concrete  # *args / **kwargs: leave the tracer's defaults alone
    names = [p.name for p in params]
    if isinstance(example_inputs, dict):
        given = set(example_inputs)
        unknown = given - set(names)
        if unknown:
            raise TraceError(
                f"example_input names {sorted(unknown)}, but {type(model).__name__}.forward takes {names}"
            )
    else:
        given = set(names[: len(_as_tuple(example_inputs))])
    missing = []
    for p in params:
        if p.name in given or p.name in concrete:
            continue
        if p.default is inspect.Parameter.empty:
            missing.append(p.name)
        else:
            concrete[p.name] = p.default
    if missing:
        raise TraceError(
            f"{type(model).__name__}.forward needs {missing}, which example_input does not give: "
            f"pass them in example_input (a tuple in order, or a dict {{name: tensor}})"
        )
    return concrete


_SPECIALIZATION_CHECKS = (torch._assert, torch.fx._symbolic_trace._assert_is_none, operator.eq)


def _drop_specialized(model: nn.Module, graph: fx.Graph, concrete: dict[str, Any]) -> None:
    """Erase the placeholders of ``concrete_args`` and the checks FX adds on them, so the
    graph's inputs are exactly the given ones (ShapeProp and ``refresh_shapes`` need them all)."""
    try:
        names = list(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError):
        return
    placeholders = graph.find_nodes(op="placeholder")
    if len(placeholders) != len(names):
        return
    order = {n: i for i, n in enumerate(graph.nodes)}
    for name, node in zip(names, placeholders):
        if name not in concrete:
            continue
        checks, stack = set(), [node]
        while stack:
            for user in stack.pop().users:
                if user.op == "call_function" and user.target in _SPECIALIZATION_CHECKS and user not in checks:
                    checks.add(user)
                    stack.append(user)
        for check in sorted(checks, key=order.__getitem__, reverse=True):
            if not check.users:
                graph.erase_node(check)
        if not node.users:
            graph.erase_node(node)


def propagate_shapes(gm: fx.GraphModule, *example_inputs: Any) -> fx.GraphModule:
    """Run ``ShapeProp`` so every node carries ``tensor_meta``; errors name the failing node."""
    try:
        with torch.no_grad():
            ShapeProp(gm).propagate(*example_inputs)
    except Exception as e:  # ShapeProp wraps the failing node's error in its message
        raise TraceError(
            f"shape propagation failed: {e}. Check that example_input has the shape and dtype "
            "the model expects (e.g. torch.randn(1, 3, 32, 32) for CIFAR)."
        ) from e
    return gm


def refresh_shapes(gm: fx.GraphModule) -> fx.GraphModule:
    """Re-run shape propagation with zero inputs shaped like the placeholders' recorded meta.

    Used after a pass changed channel counts: stale ``tensor_meta`` would lie about shapes.
    """
    inputs = []
    for node in gm.graph.find_nodes(op="placeholder"):
        meta = node.meta.get("tensor_meta")
        if meta is None:
            raise TraceError(f"placeholder {node.name} has no tensor_meta: trace the model with trace()")
        inputs.append(torch.zeros(meta.shape, dtype=meta.dtype))
    return propagate_shapes(gm, *inputs)


def trace(
    model: nn.Module,
    example_inputs: Any,
    *,
    leaf_modules: Sequence[str | type[nn.Module]] = (),
    concrete_args: dict[str, Any] | None = None,
) -> fx.GraphModule:
    """Symbolically trace ``model`` and propagate the shapes of ``example_inputs``.

    ``example_inputs`` is a tensor, a tuple of positional inputs, or a dict of keyword inputs;
    ``forward`` parameters it does not give are fixed at their defaults (``concrete_args``),
    so the graph takes exactly the given inputs.

    ``leaf_modules`` (qualified names or types) are kept as opaque calls; the channel-group
    pass pins what it cannot see into. The model is not modified: the result shares its
    parameters, so deep-copy the model first if a later pass must not touch them.

    >>> gm = trace(nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU()), torch.randn(1, 3, 8, 8))
    >>> [n.meta["tensor_meta"].shape for n in gm.graph.nodes if n.op == "call_module"]
    [torch.Size([1, 8, 6, 6]), torch.Size([1, 8, 6, 6])]
    """
    if isinstance(model, fx.GraphModule) and not leaf_modules and concrete_args is None:
        return propagate_shapes(model, *_as_tuple(example_inputs))
    concrete = _bind(model, example_inputs, concrete_args)
    tracer = _NamingTracer(leaf_modules)
    try:
        graph = tracer.trace(model, concrete_args=concrete or None)
    except Exception as e:
        where = (
            f"inside submodule '{tracer.failed_module[0]}' ({tracer.failed_module[1]})"
            if tracer.failed_module
            else f"in {type(model).__name__}.forward"
        )
        leaf_hint = (
            f"trace(model, x, leaf_modules=['{tracer.failed_module[0]}']) to keep it as one opaque "
            "call (its channels are then never pruned)"
            if tracer.failed_module
            else "leaf_modules=[...] for the submodule that does it"
        )
        raise TraceError(
            f"torch.fx cannot trace {type(model).__name__} {where}, at {_user_frame(e)}: "
            f"{type(e).__name__}: {e}\n"
            f"Fix: use {leaf_hint}, or pass concrete_args for inputs that steer Python control "
            "flow, or rewrite data-dependent branches with tensor ops."
        ) from e
    _drop_specialized(model, graph, concrete)
    gm = fx.GraphModule(tracer.root, graph, type(model).__name__)
    if isinstance(example_inputs, dict):  # placeholders follow forward's order, not the dict's
        order = [n.target for n in graph.find_nodes(op="placeholder")]
        example_inputs = tuple(example_inputs[k] for k in order if k in example_inputs)
    return propagate_shapes(gm, *_as_tuple(example_inputs))
