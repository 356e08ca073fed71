"""The coupling engine: channel labels, their union-find, the state of one analysis run, and
``Rules``, the value that says which rule serves which op.

Every channel of every value carries a label; the channels are dim 1 unless a rule moved
them (a ``permute`` to channels-last, a ``Linear`` over the last dim): ``Analysis.dim(node)``
says which dim. A rule, ``rule(a: Analysis, node) -> labels``, returns the labels of the
node's output (a tuple for ops returning tuples, None for non-tensors), creating fresh labels
for producers, unioning labels that must stay equal, and recording ``_Touch`` es where
parameters are indexed by channels. A rule that meets a use it cannot describe exactly
raises ``Pin(reason)``; an op without a rule is pinned by the pass. Only the rules in
``Rules.any_dim`` read channels at a dim other than 1; any other rule meeting such a value
pins it. The rules themselves are in ``passes._shape_rules`` and ``passes._layer_rules``, the
tables in ``passes.coupling``, the walk over the graph in ``passes.group``.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import numpy as np
import torch
from ehap_fx.passes._layers import functional_conv_owner
from torch import fx, nn
from torch.fx.passes.shape_prop import TensorMetadata

# ---------------------------------------------------------------------------------------------
# Label bookkeeping
# ---------------------------------------------------------------------------------------------

Labels = np.ndarray  # (C,) int64 labels of the channels along dim 1


class _UnionFind:
    """Union-find over channel labels, with pin reasons attached to labels."""

    def __init__(self) -> None:
        self.parent: list[int] = []
        self.pins: dict[int, str] = {}

    def fresh(self, n: int) -> Labels:
        start = len(self.parent)
        self.parent.extend(range(start, start + n))
        return np.arange(start, start + n, dtype=np.int64)

    def find(self, x: int) -> int:
        parent = self.parent
        root = x
        while parent[root] != root:
            root = parent[root]
        while parent[x] != root:
            parent[x], x = root, parent[x]
        return root

    def union(self, a: Labels, b: Labels) -> None:
        for x, y in zip(a.tolist(), b.tolist()):
            rx, ry = self.find(x), self.find(y)
            if rx != ry:
                self.parent[max(rx, ry)] = min(rx, ry)

    def pin(self, labels: Labels, reason: str) -> None:
        for x in labels.tolist():
            self.pins.setdefault(x, reason)

    def roots(self) -> np.ndarray:
        return np.array([self.find(x) for x in range(len(self.parent))], dtype=np.int64)


@dataclass
class _Touch:
    """Channels a node's parameters (or pad zeros) are indexed by: ``labels[p]`` ↔ ``index[p]``."""

    node: str
    module: str | None
    role: str
    dim: int
    labels: Labels
    index: np.ndarray


class Analysis:
    """State of one run of the channel analysis over a graph."""

    def __init__(self, gm: fx.GraphModule, exclude: frozenset[str], rules: Rules):
        self.gm = gm
        self.exclude = exclude
        self.rules = rules
        self.uf = _UnionFind()
        self.env: dict[fx.Node, Any] = {}
        self.touches: list[_Touch] = []
        self.cdim: dict[fx.Node, int] = {}  # the channel dim of a value, where it is not 1
        self.calls_per_module = defaultdict(int)
        for n in gm.graph.nodes:
            if n.op == "call_module":
                self.calls_per_module[n.target] += 1

    # --- helpers used by the rules ------------------------------------------------------------

    def labels(self, arg: Any) -> Labels | None:
        return self.env.get(arg) if isinstance(arg, fx.Node) else None

    def dim(self, arg: Any) -> int:
        """The dim of ``arg`` that its labels describe (1 unless a rule moved the channels)."""
        return self.cdim.get(arg, 1) if isinstance(arg, fx.Node) else 1

    def set_dim(self, node: fx.Node, dim: int) -> None:
        if dim == 1:
            self.cdim.pop(node, None)
        else:
            self.cdim[node] = dim

    def anchor(self, arg: fx.Node, dim: int, reason: str) -> Labels | None:
        """The labels of ``arg`` at ``dim``. When its channels are another dim, those are
        pinned: then no dim of ``arg`` ever changes size, so fresh pinned labels describe
        ``dim`` exactly, and replace the old ones (later readers see channels at ``dim``)."""
        labels = self.labels(arg)
        shape = _shape(arg)
        if labels is None or shape is None or _norm_dim(dim, len(shape)) == self.dim(arg):
            return labels
        self.uf.pin(labels, reason)
        if not -len(shape) <= dim < len(shape):
            return None  # no such dim (a (C,) vector read as (N, C)): pinned, nothing to label
        self.env[arg] = self._pinned_labels(int(shape[dim]), reason)
        self.set_dim(arg, _norm_dim(dim, len(shape)))
        return self.env[arg]

    def fresh_pinned(self, node: fx.Node, reason: str) -> Any:
        """Fresh pinned labels shaped like the node's output (tensor, tuple of tensors, or None),
        at the channel dim of its first input that has one, when the output has that dim
        (pinned labels never prune, so any dim is exact; this one keeps later ops aligned)."""
        dims = [self.dim(arg) for arg in _flat_args(node) if self.labels(arg) is not None]
        meta = node.meta.get("tensor_meta")
        dim = dims[0] if dims and isinstance(meta, TensorMetadata) and len(meta.shape) > dims[0] else 1
        self.set_dim(node, dim)
        return _map_meta(node, lambda c: self._pinned_labels(c, reason), dim)

    def _pinned_labels(self, channels: int, reason: str) -> Labels:
        labels = self.uf.fresh(channels)
        self.uf.pin(labels, reason)
        return labels

    def pin_inputs(self, node: fx.Node, reason: str) -> None:
        for arg in _flat_args(node):
            for labels in _flat_labels(self.env.get(arg)):
                self.uf.pin(labels, reason)

    def touch(self, node: fx.Node, role: str, dim: int, labels: Labels, index=None, module=None) -> None:
        module = module or (node.target if node.op == "call_module" else functional_conv_owner(self.gm, node))
        idx = np.arange(len(labels)) if index is None else np.asarray(index)
        self.touches.append(_Touch(node.name, module, role, dim, labels, idx))

    def module(self, node: fx.Node) -> nn.Module:
        return self.gm.get_submodule(node.target)


def _map_meta(node: fx.Node, fn: Callable[[int], Labels], dim: int = 1) -> Any:
    """Apply ``fn(channels)`` to each tensor in the node's ``tensor_meta`` (None for non-tensors):
    ``channels`` is its size along ``dim``."""

    def go(meta):
        if isinstance(meta, TensorMetadata):
            return fn(int(meta.shape[dim])) if len(meta.shape) > dim else None
        if isinstance(meta, (tuple, list)):
            return tuple(go(m) for m in meta)
        return None

    return go(node.meta.get("tensor_meta"))


def _flat_args(node: fx.Node) -> list[fx.Node]:
    out: list[fx.Node] = []
    fx.node.map_arg((node.args, node.kwargs), out.append)
    return out


def _flat_labels(value: Any) -> Iterator[Labels]:
    if isinstance(value, np.ndarray):
        yield value
    elif isinstance(value, tuple):
        for v in value:
            yield from _flat_labels(v)


def _shape(node: Any) -> tuple[int, ...] | None:
    meta = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
    return tuple(meta.shape) if isinstance(meta, TensorMetadata) else None


def _norm_dim(dim: int, ndim: int) -> int:
    return dim + ndim if dim < 0 else dim


class Pin(Exception):
    """Raised by a rule that finds its op used in a way it cannot describe exactly: the pass
    pins the channels the node reads and makes, with ``f"{node}{where}: {reason}"``."""


# ---------------------------------------------------------------------------------------------
# Rules: which rule serves which op, as one immutable value
# ---------------------------------------------------------------------------------------------

Rule = Callable[[Analysis, fx.Node], Any]


@dataclass(frozen=True, eq=False)
class Rules:
    """Coupling rules as a value: ``functions`` keyed by call_function target or call_method
    name (an ATen ``OpOverloadPacket`` covers every overload of the op), ``modules`` keyed by
    ``nn.Module`` type (a subclass that inherits ``forward`` uses its base's rule), and
    ``any_dim``, the rules that read channels at any dim (``Analysis.dim``; the others see
    channels-last inputs pinned first).

    Never changed in place: ``a | b`` and ``a.with_rules({...})`` are new values in which the
    rows of ``b`` win. ``passes.coupling.COUPLING_RULES`` is the default set; the passes take a
    user's ``Rules`` as rows added to it.
    """

    functions: Mapping[Any, Rule] = field(default_factory=dict)
    modules: Mapping[type[nn.Module], Rule] = field(default_factory=dict)
    any_dim: frozenset[Rule] = frozenset()

    def __post_init__(self) -> None:
        bad = [k for k in self.modules if not (isinstance(k, type) and issubclass(k, nn.Module))]
        if bad:
            raise TypeError(f"Rules(modules=...) keys must be nn.Module subclasses, got {bad}")
        rows = {**self.functions, **self.modules}
        bad = [k for k, rule in rows.items() if not callable(rule) or getattr(rule, "__hash__", None) is None]
        if bad:
            raise TypeError(f"the rules for {bad} are not hashable callables: a rule is rule(a, node) -> "
                            "labels")
        object.__setattr__(self, "functions", MappingProxyType(dict(self.functions)))
        object.__setattr__(self, "modules", MappingProxyType(dict(self.modules)))
        object.__setattr__(self, "any_dim", frozenset(self.any_dim))

    def __len__(self) -> int:
        return len(self.functions) + len(self.modules)

    def __or__(self, other: Rules) -> Rules:
        if not isinstance(other, Rules):
            return NotImplemented
        return Rules({**self.functions, **other.functions}, {**self.modules, **other.modules},
                     self.any_dim | other.any_dim)

    def with_rules(self, rows: Mapping[Any, Rule]) -> Rules:
        """A new value with ``rows`` added: ``nn.Module`` subclasses as module rows, any other
        key (a function, a method name, an ATen op) as a function row."""
        is_module = {k: isinstance(k, type) and issubclass(k, nn.Module) for k in rows}
        return self | Rules({k: r for k, r in rows.items() if not is_module[k]},
                            {k: r for k, r in rows.items() if is_module[k]})

    def for_function(self, target: Any) -> Rule | None:
        """The rule for a call_function target or call_method name (None: no rule)."""
        return table_rule(self.functions, target)

    def for_module(self, mod: nn.Module) -> Rule | None:
        """The rule for a module (None: no rule; a subclass with its own ``forward`` has none)."""
        return module_rule(self.modules, mod)

    def rule_for(self, gm: fx.GraphModule, node: fx.Node) -> Rule | None:
        if node.op == "call_module":
            return self.for_module(gm.get_submodule(node.target))
        return self.for_function(node.target)

    # an immutable value: copies are itself (a GraphModule deep-copies its meta); it pickles by
    # rows (a user's: the default tables hold keys such as F.max_pool2d that do not pickle)
    def __copy__(self) -> Rules:
        return self

    def __deepcopy__(self, memo: dict) -> Rules:
        return self

    def __reduce__(self) -> tuple:
        return Rules, (dict(self.functions), dict(self.modules), self.any_dim)


def table_rule(table: Mapping[Any, Any], target: Any) -> Any:
    """``table``'s entry for a call target: the target itself, else (an ATen ``OpOverload``)
    its ``OpOverloadPacket``; None for unknown or unhashable targets."""
    try:
        rule = table.get(target)
    except TypeError:  # unhashable target
        return None
    if rule is None and isinstance(target, torch._ops.OpOverload):
        rule = table.get(target.overloadpacket)
    return rule


def module_rule(table: Mapping[type[nn.Module], Any], mod: nn.Module) -> Any:
    """The entry of ``table`` for ``mod``'s type, or for the nearest base class in the table
    whose ``forward`` it inherits (``class FrozenBN(nn.BatchNorm2d)`` with no ``forward`` of
    its own is a BatchNorm2d; one with its own ``forward`` is traced into instead)."""
    for cls in type(mod).__mro__:
        if cls in table:
            return table[cls] if type(mod).forward is cls.forward else None
    return None

