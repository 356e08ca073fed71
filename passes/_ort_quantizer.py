"""A PT2E quantizer that puts Q/DQ pairs where onnxruntime fuses them into integer kernels.

torchao's ``X86InductorQuantizer`` follows Inductor's recipe: a conv that feeds a residual
``add`` keeps a float output (oneDNN fuses the sum as a post-op). onnxruntime cannot fuse
``DQ -> Conv -> Add -> Q``, so half the convs of a ResNet stayed float (FusedConv) when
we exported that graph. This quantizer annotates the ONNX-friendly way, like the QDQ
placement of ``torch.ao`` FX: every conv(+BN)(+ReLU) and linear quantizes its own output,
every residual add(+ReLU) quantizes its inputs and its output. Scheme: weights symmetric
per-channel int8 (-128..127, axis 0; 7-bit -64..63 for targets whose kernels saturate, see
``passes.quantize.scheme``), activations per-tensor affine uint8 (0..255).

    x --Q--DQ--> conv --bn--relu--Q--DQ--> conv --bn--Q--DQ--> add --relu--Q--DQ--> ...
                  ^ w: per-channel int8                    shortcut --Q--DQ--^
"""

from __future__ import annotations

import torch
from torch.fx import GraphModule, Node
from torchao.quantization.pt2e import (
    FakeQuantize,
    HistogramObserver,
    MovingAverageMinMaxObserver,
    MovingAveragePerChannelMinMaxObserver,
    PerChannelMinMaxObserver,
)
from torchao.quantization.pt2e.quantizer import (
    QuantizationAnnotation,
    QuantizationSpec,
    Quantizer,
)

aten = torch.ops.aten
_KEY = "quantization_annotation"
CONV = (aten.conv2d.default,)
LINEAR = (aten.linear.default,)
BATCH_NORM = (aten.batch_norm.default,)
RELU = (aten.relu.default, aten.relu_.default)
ADD = (aten.add.Tensor, aten.add_.Tensor)


def activation_spec(qat: bool, calibrated: bool = False) -> QuantizationSpec:
    """Per-tensor affine uint8 (0..255): a histogram for PTQ; fake-quantized for QAT, observed by
    a moving min/max or (``calibrated``: ``passes.quantize.calibrate_ranges``) PTQ's histogram."""
    if qat:
        observer = HistogramObserver if calibrated else MovingAverageMinMaxObserver
        ctr = FakeQuantize.with_args(observer=observer)
    else:
        ctr = HistogramObserver
    return QuantizationSpec(
        dtype=torch.uint8,
        quant_min=0,
        quant_max=255,
        qscheme=torch.per_tensor_affine,
        is_dynamic=False,
        observer_or_fake_quant_ctr=ctr,
    )


def weight_spec(qat: bool, weight_range: tuple[int, int] = (-128, 127)) -> QuantizationSpec:
    """Per-output-channel symmetric int8 (-128..127, or 7-bit -64..63 where kernels saturate; axis 0)."""
    ctr = (
        FakeQuantize.with_args(observer=MovingAveragePerChannelMinMaxObserver)
        if qat
        else PerChannelMinMaxObserver
    )
    return QuantizationSpec(
        dtype=torch.int8,
        quant_min=weight_range[0],
        quant_max=weight_range[1],
        qscheme=torch.per_channel_symmetric,
        ch_axis=0,
        is_dynamic=False,
        observer_or_fake_quant_ctr=ctr,
    )


class OrtQuantizer(Quantizer):
    """Annotates conv(+BN)(+ReLU), linear and residual add(+ReLU) for onnxruntime's QDQ fusion."""

    def __init__(self, qat: bool, weight_range: tuple[int, int] = (-128, 127),
                 calibrated: bool = False) -> None:
        super().__init__()
        self.act, self.weight = activation_spec(qat, calibrated), weight_spec(qat, weight_range)

    def annotate(self, model: GraphModule) -> GraphModule:
        for node in model.graph.nodes:
            if node.op != "call_function" or _KEY in node.meta:
                continue
            if node.target in CONV or node.target in LINEAR:
                self._annotate_weighted(node)
            elif node.target in ADD and _is_float_activation(node):
                self._annotate_add(node)
        return model

    def validate(self, model: GraphModule) -> None:
        pass

    def _annotate_weighted(self, node: Node) -> None:
        x, w = node.args[0], node.args[1]
        chain = _follow(node, BATCH_NORM) if node.target in CONV else [node]
        chain = _follow(chain[-1], RELU, chain)
        _mark(chain[1:])
        node.meta[_KEY] = QuantizationAnnotation(
            input_qspec_map={x: self.act, w: self.weight},
            _annotated=True,
            output_qspec=self.act if len(chain) == 1 else None,
        )
        if len(chain) > 1:
            chain[-1].meta[_KEY] = QuantizationAnnotation(output_qspec=self.act, _annotated=True)

    def _annotate_add(self, node: Node) -> None:
        a, b = node.args[0], node.args[1]
        chain = _follow(node, RELU)
        _mark(chain[1:])
        node.meta[_KEY] = QuantizationAnnotation(
            input_qspec_map={a: self.act, b: self.act},
            _annotated=True,
            output_qspec=self.act if len(chain) == 1 else None,
        )
        if len(chain) > 1:
            chain[-1].meta[_KEY] = QuantizationAnnotation(output_qspec=self.act, _annotated=True)


def _follow(node: Node, targets: tuple, chain: list[Node] | None = None) -> list[Node]:
    """``chain`` (default ``[node]``) extended by node's only user when that user is in targets."""
    chain = chain or [node]
    users = list(node.users)
    if len(users) == 1 and users[0].op == "call_function" and users[0].target in targets:
        return [*chain, users[0]]
    return chain


def _mark(nodes: list[Node]) -> None:
    for n in nodes:
        n.meta[_KEY] = QuantizationAnnotation(_annotated=True)


def _is_float_activation(node: Node) -> bool:
    """An add of two float feature maps (not ``num_batches_tracked += 1``)."""
    args = node.args[:2]
    if not all(isinstance(a, Node) for a in args):
        return False
    vals = [a.meta.get("val") for a in args]
    return all(isinstance(v, torch.Tensor) and v.is_floating_point() and v.dim() >= 2 for v in vals)
