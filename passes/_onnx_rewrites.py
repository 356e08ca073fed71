"""Rewrites of an exported ONNX file that change how fast onnxruntime runs it, never what it computes."""

from __future__ import annotations

import numpy as np

#: the elementwise ops onnxruntime fuses with their Q/DQ into QLinearAdd / QLinearMul
_BINARY = ("Add", "Sub", "Mul", "Div")


def tile_channel_constants(model, max_elements: int = 1 << 22) -> int:
    """Tile each quantized per-channel constant operand of an elementwise op (``[1, C, 1, 1]``
    or ``[C, 1, 1]``, through its DequantizeLinear, and a QuantizeLinear before it if any) to
    the full ``[1, C, H, W]`` of the other operand, in ``model``.

    Why: onnxruntime runs QDQ graphs channels-last (its NHWC transformer makes ``[N, C, H, W]``
    ``[N, H, W, C]``), so a per-channel constant broadcasts along the innermost axis, which
    ``QLinearAdd`` walks in spans of C elements: on ResNet-56 with six blocks dropped (each
    leaves ``relu(x + c)``, ``c`` its BN's shift; ``passes.shrink``) each such add took 3.1-4.0 ms
    at batch 128 against 0.12 ms for an add of two full tensors, and the whole model ran at
    0.96 of dense INT8 instead of 0.77 (``tools/bench_broadcast.py``). Tiled, the constant
    broadcasts over the batch only. A constant the exporter shares between consumers gets one
    tiled copy per spatial size; per-axis quantized ones, non-static ``C, H, W`` and copies over
    ``max_elements`` are left alone. Returns the number of operands rewired.
    """
    from onnx import numpy_helper

    shapes = _static_shapes(model)
    if shapes is None:
        return 0
    graph, order, made, replaced = model.graph, [], {}, []
    init = {t.name: t for t in graph.initializer}
    producers = {o: n for n in graph.node for o in n.output}
    for node in graph.node:
        for k in (0, 1) if node.op_type in _BINARY and len(node.input) == 2 else ():
            found, other = _constant_chain(node.input[k], init, producers), shapes.get(node.input[1 - k])
            if found is None or other is None or len(other) != 4 or None in other[1:]:
                continue
            name, nodes = found
            c, h, w = other[1:]
            a = numpy_helper.to_array(init[name])
            if h * w == 1 or a.shape not in ((1, c, 1, 1), (c, 1, 1)) or c * h * w > max_elements:
                continue
            if (name, h, w) not in made:  # the exporter shares equal constants between blocks
                full = np.ascontiguousarray(np.broadcast_to(a.reshape(1, c, 1, 1), (1, c, h, w)))
                made[name, h, w] = _copy_chain(graph, order, name, nodes, full, f"_tiled_{h}x{w}")
            node.input[k] = made[name, h, w]
            replaced.append((name, nodes))
        order.append(node)
    if replaced:
        _drop_unused(graph, order, replaced)
    return len(replaced)


def _static_shapes(model) -> dict[str, list[int | None]] | None:
    """Every value's inferred shape (None for a symbolic dimension), or None when ONNX's shape
    inference fails (the file is then left as it is: tiling is an optimisation)."""
    from onnx import shape_inference

    try:
        inferred = shape_inference.infer_shapes(model)
    except Exception:  # noqa: BLE001
        return None
    shapes = {}
    for vi in [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]:
        dims = vi.type.tensor_type.shape.dim
        shapes[vi.name] = [d.dim_value if d.HasField("dim_value") else None for d in dims]
    return shapes


def _constant_chain(name: str, init: dict, producers: dict) -> tuple[str, list] | None:
    """The initializer behind ``name`` through a per-tensor DequantizeLinear (and a
    QuantizeLinear before it), and those nodes, the consumer's side first; else None."""

    def scalar(t: str) -> bool:  # a per-tensor scale or zero point
        if t in init:
            return int(np.prod(init[t].dims)) == 1
        p = producers.get(t)
        return p is not None and p.op_type == "Constant" and all(
            int(np.prod(a.t.dims)) == 1 for a in p.attribute if a.name == "value")

    nodes = []
    for op in ("DequantizeLinear", "QuantizeLinear"):
        p = producers.get(name)
        if p is None or p.op_type != op or not all(scalar(i) for i in p.input[1:]):
            return None
        nodes.append(p)
        name = p.input[0]
        if name in init:
            return name, nodes
    return None


def _copy_chain(graph, order: list, name: str, nodes: list, value: np.ndarray, suffix: str) -> str:
    """``value`` as a new initializer ``name + suffix`` through copies of ``nodes`` (appended
    to ``order``); returns the last copy's output."""
    from onnx import numpy_helper

    graph.initializer.append(numpy_helper.from_array(value, name + suffix))
    prev = name + suffix
    for p in reversed(nodes):
        clone = type(p)()
        clone.CopyFrom(p)
        clone.name = (p.name or p.output[0]) + suffix
        clone.input[0], clone.output[0] = prev, p.output[0] + suffix
        prev = clone.output[0]
        order.append(clone)
    return prev


def _drop_unused(graph, order: list, replaced: list) -> None:
    """``graph``'s nodes become ``order`` less the replaced chains nobody reads any more (a DQ
    first, then the Q it read), and their initializers go with them."""
    import collections

    reads = collections.Counter(i for n in order for i in n.input)
    reads.update(o.name for o in graph.output)
    dead = set()
    for _, nodes in replaced:
        for p in nodes:  # the consumer's side first: a dead DQ frees its Q
            if id(p) not in dead and reads[p.output[0]] == 0:
                dead.add(id(p))
                reads.subtract(p.input)
    del graph.node[:]
    graph.node.extend(n for n in order if id(n) not in dead)
    gone = {name for name, _ in replaced if reads[name] <= 0}
    kept = [t for t in graph.initializer if t.name not in gone]
    del graph.initializer[:]
    graph.initializer.extend(kept)
