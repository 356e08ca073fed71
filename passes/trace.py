"""Trace pass: turn an ``nn.Module`` into a ``GraphModule`` whose nodes carry tensor shapes.

Every later pass reads ``node.meta["tensor_meta"]`` (written by torch.fx's ``ShapeProp``), so
tracing and shape propagation are one step here. When symbolic tracing fails, the error names
the submodule and the source line that broke it and says how to fix it (leaf modules or
``concrete_args``), instead of a bare FX stack trace.

Two captures (``capture=``): ``"fx"``, ``symbolic_trace`` (module calls, torch functions);
``"export"``, ``torch.export`` (an ATen graph, what PT2 compilers, PT2E quantization and the
dynamo ONNX exporter read; Python control flow on shapes is specialised away). An exported
graph is unlifted (``ExportedProgram.module()``: parameters read with ``get_attr`` under
their own names) into an ``ExportedGraph``; the same group/cost/shrink passes run on it, and
``passes.program.exported_program`` exports the result again. ``"auto"`` (the default) tries
FX, then export, and names both failures when neither works (``passes.capture`` also takes
export when it keeps more channels prunable than a partial FX graph).
"""

from __future__ import annotations

import functools
import inspect
import operator
import traceback
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from ehap_fx.passes.coupling import COUPLING_RULES, Rules, coupling_rules, record_rules
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from ehap_fx import _meta
from ehap_fx.errors import TraceError, reraise_interrupt

CAPTURES = ("fx", "export", "auto")

_TORCH_DIR = str(Path(torch.__file__).parent)


class _NamingTracer(fx.Tracer):
    """A tracer that remembers which submodule it was inside when tracing failed."""

    def __init__(self, leaf_modules: Sequence[str | type[nn.Module]] = (), rules: Rules = COUPLING_RULES):
        super().__init__()
        self.rules = rules
        self.leaf_names = {m for m in leaf_modules if isinstance(m, str)}
        self.leaf_types = tuple(m for m in leaf_modules if isinstance(m, type))
        self.failed_module: tuple[str, str] | None = None

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if module_qualified_name in self.leaf_names or isinstance(m, self.leaf_types):
            return True
        if self.rules.for_module(m) is not None:  # a rule describes it, or the base whose forward it inherits
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
                check = user.op == "call_function" and user.target in _SPECIALIZATION_CHECKS
                if check and user not in checks:
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
        reraise_interrupt(e)
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
    model: nn.Module | torch.export.ExportedProgram,
    example_inputs: Any,
    *,
    leaf_modules: Sequence[str | type[nn.Module]] = (),
    concrete_args: dict[str, Any] | None = None,
    capture: str = "auto",
    dynamic_shapes: Any = "batch",
    rules: Rules | None = None,
) -> fx.GraphModule:
    """Capture ``model`` as a graph (``capture``: ``"fx"``, ``"export"`` or ``"auto"``, see the
    module docstring; an ``ExportedProgram`` is always taken as exported) and propagate the
    shapes of ``example_inputs``. ``dynamic_shapes`` is for export only (torch.export's
    argument; ``"batch"``: dim 0 of every tensor input, static when that does not export).
    ``rules``: coupling rules for modules of your own, added to the default ones
    (``passes.coupling``): torch.fx keeps a module they describe as one call, and the graph
    records them for ``group_channels``.

    >>> gm = trace(nn.Sequential(nn.Conv2d(3, 8, 3)), torch.randn(2, 3, 8, 8), capture="export")
    >>> [str(n.target) for n in gm.graph.nodes if n.op == "call_function"]
    ['aten.conv2d.default']
    """
    if capture not in CAPTURES:
        raise ValueError(f"capture={capture!r} must be one of {CAPTURES}")
    if capture == "export" or isinstance(model, torch.export.ExportedProgram):
        gm = export_capture(model, example_inputs, dynamic_shapes)
        return _captured(gm, "export", capture, "asked for", rules)
    traced = functools.partial(fx_trace, model, example_inputs, leaf_modules=leaf_modules,
                               concrete_args=concrete_args, rules=rules)
    if capture == "fx":
        return _captured(traced(), "fx", capture, "asked for", rules)
    try:
        gm = traced()
        fx_output_check(model, gm, example_inputs)
        return _captured(gm, "fx", capture, "torch.fx traced it", rules)
    except TraceError as fx_error:
        try:
            gm = export_capture(model, example_inputs, dynamic_shapes)
        except TraceError as export_error:
            raise both_failed(model, fx_error, export_error) from export_error
        why = f"torch.fx cannot trace it: {str(fx_error).splitlines()[0][:300]}"
        return _captured(gm, "export", capture, why, rules)


def fx_output_check(model: nn.Module, gm: fx.GraphModule, example_inputs: Any) -> None:
    """Raise TraceError when the FX graph returns another structure than ``model`` does:
    symbolic tracing rebuilds a ``dict`` subclass (Hugging Face's ``ModelOutput``) or a
    dataclass as a plain ``dict`` (``out.logits`` would break); torch.export keeps it."""
    with torch.no_grad():
        want = torch.utils._pytree.tree_structure(call_with(model, example_inputs))
        got = torch.utils._pytree.tree_structure(call_with(gm, example_inputs))
    if want != got:
        raise TraceError(f"torch.fx returns {_container(got)} where {type(model).__name__} returns "
                         f"{_container(want)}: symbolic tracing does not keep that output type")


def _container(spec: Any) -> str:
    return getattr(spec.type, "__name__", str(spec.type)) if spec.type is not None else "a tensor"


@dataclass(frozen=True)
class Captured:
    """Which capture made a graph (``"fx"`` or ``"export"``; ``gm.meta["ehap.captured"]``),
    what was asked (``capture=``), and why."""

    capture: str
    asked: str
    why: str

    def as_dict(self) -> dict:
        return {"capture": self.capture, "asked": self.asked, "why": self.why}


def _captured(gm: fx.GraphModule, capture: str, asked: str, why: str, rules: Rules | None) -> fx.GraphModule:
    gm.meta[_meta.CAPTURED] = Captured(capture, asked, why)
    if rules is not None:
        record_rules(gm, rules)
    return gm


def both_failed(model: nn.Module, fx_error: TraceError, export_error: TraceError) -> TraceError:
    """One error for ``capture="auto"`` when neither capture works: what each failed on."""
    return TraceError(
        f"neither capture works on {type(model).__name__}.\n[symbolic_trace] {fx_error}\n"
        f"[torch.export] {export_error}\n"
        "Fix: make one of them work: for torch.fx, leaf_modules=[...] for the submodule named above "
        "(kept whole, its channels never pruned) or concrete_args; for torch.export, replace the "
        "data-dependent branch with tensor ops (torch.where, torch.cond)."
    )


def fx_trace(
    model: nn.Module,
    example_inputs: Any,
    *,
    leaf_modules: Sequence[str | type[nn.Module]] = (),
    concrete_args: dict[str, Any] | None = None,
    rules: Rules | None = None,
) -> fx.GraphModule:
    """Symbolically trace ``model`` and propagate the shapes of ``example_inputs``.

    ``example_inputs`` is a tensor, a tuple of positional inputs, or a dict of keyword inputs;
    ``forward`` parameters it does not give are fixed at their defaults (``concrete_args``),
    so the graph takes exactly the given inputs.

    ``leaf_modules`` (qualified names or types) are kept as opaque calls; the channel-group
    pass pins what it cannot see into. A module ``rules`` describe is one call too, grouped by its
    rule. The model is not modified: the result shares its parameters, so deep-copy the model
    first if a later pass must not touch them.

    >>> gm = trace(nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU()), torch.randn(1, 3, 8, 8))
    >>> [n.meta["tensor_meta"].shape for n in gm.graph.nodes if n.op == "call_module"]
    [torch.Size([1, 8, 6, 6]), torch.Size([1, 8, 6, 6])]
    """
    if isinstance(model, fx.GraphModule) and not leaf_modules and concrete_args is None:
        return propagate_shapes(model, *_as_tuple(example_inputs))
    concrete = _bind(model, example_inputs, concrete_args)
    tracer = _NamingTracer(leaf_modules, coupling_rules(rules))
    try:
        graph = tracer.trace(model, concrete_args=concrete or None)
    except Exception as e:
        reraise_interrupt(e)
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


# ---------------------------------------------------------------------------------------------
# Capture by torch.export
# ---------------------------------------------------------------------------------------------

aten = torch.ops.aten


@dataclass(frozen=True)
class ExportCapture:
    """How ``torch.export`` captured a graph (``gm.meta["ehap.capture"]``), so that a shrunk
    copy is exported the same way: example inputs, dynamic shapes, and whether the program
    was decomposed to core ATen (``run_decompositions``) rather than the training IR."""

    args: tuple
    kwargs: dict
    dynamic_shapes: Any
    decomposed: bool


class ExportedGraph(fx.GraphModule):
    """The unlifted graph of an ``ExportedProgram`` (ATen ops, parameters and buffers read
    with ``get_attr`` under their state-dict names) as an ordinary ``GraphModule``.

    ``.train()`` / ``.eval()`` work (``ExportedProgram.module()`` refuses them): they set the
    ``training`` flag of every ``aten.batch_norm`` and ``aten.dropout`` call, so fine-tuning
    updates BatchNorm statistics as the module would; a batch norm without running statistics
    (a weight standardisation, a BatchNorm with ``track_running_stats=False``) computes batch
    statistics in either mode and keeps its flag. (Core ATen's
    ``_native_batch_norm_legit_no_training`` has no flag: such a graph stays in eval mode.)
    """

    def train(self, mode: bool = True) -> ExportedGraph:
        super().train(mode)
        if _set_training_flags(self.graph, mode):
            self.recompile()
        return self


_TRAINING_FLAG = {aten.batch_norm.default: 5, aten.dropout.default: 2, aten.dropout_.default: 2}  # `train` at


def _set_training_flags(graph: fx.Graph, mode: bool) -> bool:
    changed = False
    for node in graph.nodes:
        pos = _TRAINING_FLAG.get(node.target) if node.op == "call_function" else None
        stats = node.args[3:5] if node.target is aten.batch_norm.default else ()
        if len(stats) == 2 and stats[0] is None and stats[1] is None:
            continue  # no running statistics: batch statistics in either mode (a weight standardisation)
        if pos is not None and len(node.args) > pos and node.args[pos] != mode:
            node.args = (*node.args[:pos], mode, *node.args[pos + 1 :])
            changed = True
    return changed


def export_capture(
    model: nn.Module | torch.export.ExportedProgram, example_inputs: Any, dynamic_shapes: Any = "batch"
) -> ExportedGraph:
    """``torch.export`` ``model`` (or take an ``ExportedProgram``), unlift it into an
    ``ExportedGraph`` and propagate the shapes of ``example_inputs``."""
    if isinstance(model, torch.export.ExportedProgram):
        ep, capture = model, _capture_of_program(model, example_inputs)
    else:
        ep, capture = _export(model, *_args_kwargs(example_inputs), dynamic_shapes)
    args, kwargs = capture.args, capture.kwargs
    unlifted = ep.module()
    _drop_guards(unlifted)
    _slice_copies_as_setitem(unlifted)
    unlifted.graph._tracer_cls = None  # export's tracer cannot re-trace a pickled copy
    gm = ExportedGraph(unlifted, unlifted.graph, type(model).__name__)
    gm.training = False
    gm.meta[_meta.CAPTURE] = capture
    return propagate_shapes(gm, *args, *kwargs.values())


def _drop_guards(gm: fx.GraphModule) -> None:
    """Erase the input-shape guard call of an unlifted program (``_guards_fn``, which cannot
    be pickled); ``passes.program.exported_program`` exports the guards again."""
    for node in gm.graph.find_nodes(op="call_module"):
        if node.target == "_guards_fn" and not node.users:
            gm.graph.erase_node(node)


def _slice_copies_as_setitem(gm: fx.GraphModule) -> None:
    """Write each in-place copy into a slice of a tensor, ``copy_(slice(base, d, a, b, s), src)``
    (what export makes of ``y[:, 2::3] = f(y[:, 2::3])``, as YOLO's pose head decodes its
    keypoints), as the assignment ``base[:, a:b:s] = src`` (``operator.setitem``).

    Same values. Why: torch.onnx's TorchScript exporter drops such a copy from a traced graph
    when the slice it writes is a separate ``aten.slice`` call (the ONNX model then returned the
    keypoints undecoded, 250 off), while the same write as an assignment, as in eager mode,
    exports as ``ScatterND``. A chain of slices (one per dim) becomes one index tuple.
    """
    for node in list(gm.graph.find_nodes(op="call_function", target=aten.copy_.default)):
        dest, src = node.args[:2]
        chain = []  # the slices from `dest` up to the base tensor, innermost first
        while (isinstance(dest, fx.Node) and dest.target is aten.slice.Tensor and len(dest.users) == 1
               and not dest.kwargs):
            chain.append(dest)
            dest = dest.args[0]
        if not chain or node.users or node.kwargs or not isinstance(dest, fx.Node):
            continue
        index: list[Any] = []
        for sl in reversed(chain):  # outermost first; a slice keeps every dim, so dims do not shift
            dim, start, end, step = (list(sl.args[1:]) + [0, None, None, 1][len(sl.args) - 1 :])[:4]
            rank = len(sl.meta["val"].shape) if "val" in sl.meta else None
            if rank is None:
                break
            dim = dim % rank
            index += [slice(None)] * (dim + 1 - len(index))
            if index[dim] != slice(None):
                break  # two slices of one dim: leave the copy as it is
            index[dim] = slice(start, end, step)
        else:
            with gm.graph.inserting_before(node):
                put = gm.graph.call_function(operator.setitem, (dest, tuple(index), src))
            put.meta.update({k: v for k, v in node.meta.items() if k in ("nn_module_stack", "stack_trace")})
            gm.graph.erase_node(node)
            for sl in chain:
                gm.graph.erase_node(sl)
    gm.recompile()


def _args_kwargs(example_inputs: Any) -> tuple[tuple, dict]:
    if isinstance(example_inputs, dict):
        return (), dict(example_inputs)
    return _as_tuple(example_inputs), {}


def _export(model: nn.Module, args: tuple, kwargs: dict, dynamic_shapes: Any) -> tuple[Any, ExportCapture]:
    """The ``ExportedProgram`` and how it was exported: with a dynamic batch dim of every
    tensor input for ``"batch"`` (static when that fails: a model may fix its batch)."""
    if dynamic_shapes == "batch":
        batch, args2, kwargs2 = _batch_dims(args, kwargs), batches_of_two(args), batches_of_two(kwargs)
        try:
            ep = torch.export.export(model, args2, kwargs2, dynamic_shapes=batch)
            return ep, ExportCapture(args2, kwargs2, batch, False)
        except Exception as e:
            reraise_interrupt(e)
            dynamic_shapes = None
    try:
        ep = torch.export.export(model, args, kwargs, dynamic_shapes=dynamic_shapes)
        return ep, ExportCapture(args, kwargs, dynamic_shapes, False)
    except Exception as e:
        reraise_interrupt(e)
        raise TraceError(
            f"torch.export cannot capture {type(model).__name__}, at {_user_frame(e)}: "
            f"{type(e).__name__}: {_first_lines(str(e))}\n"
            "Fix: rewrite data-dependent branches with tensor ops (torch.where, torch.cond), or "
            "use capture='fx'."
        ) from e


def _first_lines(text: str, n: int = 4) -> str:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return "\n".join(lines[:n]) + (" ..." if len(lines) > n else "")


def _batch_dims(args: tuple, kwargs: dict) -> Any:
    batch = torch.export.Dim("batch", min=1, max=65536)

    def spec(t):
        return {0: batch} if isinstance(t, torch.Tensor) and t.dim() > 0 else None

    return {k: spec(v) for k, v in kwargs.items()} if kwargs else tuple(spec(a) for a in args)


def batches_of_two(inputs: Any) -> Any:
    """Batches of at least two (torch.export specialises a dim of size 1)."""

    def grow(t):
        return torch.cat([t, t]) if isinstance(t, torch.Tensor) and t.dim() > 0 and t.shape[0] == 1 else t

    if isinstance(inputs, dict):
        return {k: grow(v) for k, v in inputs.items()}
    return tuple(grow(t) for t in inputs)


def _capture_of_program(ep: torch.export.ExportedProgram, example_inputs: Any) -> ExportCapture:
    """How to export ``ep.module()`` as ``ep`` was; ``example_inputs`` None: ``ep``'s own."""
    if example_inputs is None and ep.example_inputs is None:
        raise TraceError("the ExportedProgram keeps no example inputs: pass example_inputs")
    args, kwargs = ep.example_inputs if example_inputs is None else _args_kwargs(example_inputs)
    dynamic = _dynamic_shapes_of(ep)
    if dynamic is not None:
        args, kwargs = batches_of_two(args), batches_of_two(kwargs)
    return ExportCapture(tuple(args), dict(kwargs), dynamic, _is_core_aten(ep))


def _dynamic_shapes_of(ep: torch.export.ExportedProgram) -> Any:
    """Dynamic shapes that export ``ep.module()`` again as ``ep`` was: each symbolic dim of a
    user input becomes a ``Dim`` with the range ``ep`` constrains it to (one ``Dim`` per
    symbol, so dims that were equal stay equal)."""
    dims: dict[str, Any] = {}
    specs = []
    for node in ep.graph.find_nodes(op="placeholder"):
        if node.name not in ep.graph_signature.user_inputs:
            continue
        shape = getattr(node.meta.get("val"), "shape", ())
        spec = {i: _dim_of(ep, d, dims) for i, d in enumerate(shape) if isinstance(d, torch.SymInt)}
        specs.append(spec or None)
    return tuple(specs) if any(specs) else None


def _dim_of(ep: torch.export.ExportedProgram, size: torch.SymInt, dims: dict[str, Any]) -> Any:
    """The ``Dim`` of one symbolic size: its symbol's (with ``ep``'s range), or a size derived
    from one symbol by ``a·s + b`` (another input's ``2 * s0``) as that ``Dim`` derived the same
    way, which torch.export needs spelt out (``Dim.DYNAMIC`` there raises a constraint
    violation); any other expression ``Dim.DYNAMIC``, for export to infer."""
    import sympy

    expr = size.node.expr
    if expr.is_Symbol and expr in ep.range_constraints:
        return _symbol_dim(ep, expr, dims)
    (base, *more) = sorted(expr.free_symbols, key=str) or [None]
    if base is None or more or base not in ep.range_constraints or sympy.degree(expr, base) != 1:
        return torch.export.Dim.DYNAMIC
    a, b = expr.coeff(base, 1), expr.coeff(base, 0)
    if not (a.is_Integer and b.is_Integer):
        return torch.export.Dim.DYNAMIC
    return int(a) * _symbol_dim(ep, base, dims) + int(b)  # (a·s + b): a derived Dim


def _symbol_dim(ep: torch.export.ExportedProgram, symbol: Any, dims: dict[str, Any]) -> Any:
    if str(symbol) not in dims:
        bounds = ep.range_constraints[symbol]
        upper = int(bounds.upper) if bounds.upper.is_finite else None
        dims[str(symbol)] = torch.export.Dim(str(symbol), min=max(int(bounds.lower), 1), max=upper)
    return dims[str(symbol)]


_CORE_ONLY = (aten.convolution.default, aten._native_batch_norm_legit_no_training.default, aten.addmm.default)
_TRAINING_IR_ONLY = (aten.conv2d.default, aten.batch_norm.default, aten.linear.default)


def _is_core_aten(ep: torch.export.ExportedProgram) -> bool:
    targets = {n.target for n in ep.graph.nodes if n.op == "call_function"}
    return any(t in targets for t in _CORE_ONLY) and not any(t in targets for t in _TRAINING_IR_ONLY)
