"""INT8 quantization of a (pruned) graph: quantization-aware training or calibration only.

Why a pass: after ``shrink`` the model is a smaller ``GraphModule``; this pass turns it into an
INT8 model whose ONNX export onnxruntime runs as QLinearConv/QLinearAdd/QGemm kernels
(``passes.export``). One scheme everywhere, the one those kernels want:

* weights: symmetric, per output channel, int8 (-128..127, zero point 0), or 7-bit (-64..63)
  for a target whose kernels would saturate (``QuantizeOptions.target``, see ``ehap_fx.isa``:
  x86 without AVX512-VNNI adds u8·s8 pairs in int16);
* activations: affine, per tensor, uint8 (0..255).

Two backends build the same scheme:

* ``"pt2e"`` (the default): torchao's PT2E (``prepare_qat_pt2e`` / ``prepare_pt2e``,
  ``convert_pt2e``), the maintained path, on a ``torch.export`` graph with a dynamic batch,
  annotated by ``passes._ort_quantizer`` (the x86 scheme, placed where onnxruntime fuses
  integer kernels); the same for graphs of either capture (``capture="fx"`` or ``"export"``).
* ``"fx"``: ``torch.ao`` FX graph mode (``prepare_qat_fx`` / ``prepare_fx``, ``convert_fx``),
  conv+BN(+ReLU) fused for QAT, ``FakeQuantize`` observers, while torch still ships it.
  Deprecated upstream; its warnings are silenced only around our own calls
  (:func:`quiet_quantization_warnings`).

Two modes: ``"qat"`` fine-tunes with fake quantization (freezing BN statistics, then the
observers, part-way through), ``"ptq"`` only runs ``calibration_batches`` batches through the
observers (no labels needed). QAT starts where PTQ ends (``qat_ranges="calibrated"``, the
default): its activation ranges are PTQ's histogram calibration on the same batches, held
while QAT trains the weights (:func:`calibrate_ranges`), so step 0 of QAT is the PTQ model.

>>> from torch import nn
>>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU())
>>> data = [(torch.randn(4, 3, 8, 8), torch.zeros(4, dtype=torch.long))] * 2
>>> res = quantize(net, torch.randn(2, 3, 8, 8), data, QuantizeOptions(mode="ptq"))
>>> res.mode, res.calibration_batches, type(res.graph_module).__name__
('ptq', 2, 'GraphModule')
"""

from __future__ import annotations

import contextlib
import copy
import logging
import operator
import time
import types
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from ehap_fx.passes.group import is_channel_constant
from ehap_fx.passes.shrink import fresh_attr
from torch import fx, nn

from ehap_fx import _meta
from ehap_fx.errors import QuantizeError, reraise_interrupt
from ehap_fx.isa import INT8_TARGETS, WEIGHT_RANGES, cpu_features, int8_target
from ehap_fx.train_options import FinetuneOptions

BACKENDS = ("fx", "pt2e")
MODES = ("qat", "ptq")
QAT_RANGES = ("calibrated", "moving")
ACTIVATION_RANGE = (0, 255)  # quint8, per-tensor affine
WEIGHT_RANGE = WEIGHT_RANGES["x86-vnni"]  # qint8, per-channel symmetric; 7-bit where kernels saturate
QAT_FINETUNE = FinetuneOptions(epochs=1.0, lr=1e-3, weight_decay=0.0, progress=False)


@dataclass(frozen=True)
class QuantizeOptions:
    """How to quantize. The defaults: PT2E backend, PTQ (``calibration_batches`` observed, the
    recipe's mode); ``mode="qat"`` adds a short fine-tune (``finetune``: 1 epoch, lr 1e-3, no
    weight decay, distillation when a teacher is given).

    ``finetune`` is the QAT loop's :class:`~ehap_fx.train_options.FinetuneOptions` (epochs,
    learning rate, distillation, ...). ``freeze_bn_after`` / ``freeze_observers_after`` are
    fractions of the QAT steps after which BatchNorm statistics, then the activation/weight
    ranges, stop updating (1.0: never). ``calibration_batches`` is the number of batches
    observed in PTQ mode, and QAT's activation ranges are calibrated on. ``ptq_fallback`` (QAT
    only, ``ehap_fx.qat.quantize_int8``): also calibrate a PTQ model and keep QAT only if it ends
    with a lower loss on held-out training images QAT does not train on (``ehap_fx.qat.hold_out``;
    the report says which won). ``qat_ranges``: where QAT's
    activation ranges come from. ``"calibrated"`` (default): PTQ's histogram calibration on
    ``calibration_batches`` batches, then held (:func:`calibrate_ranges`); ``"moving"``: torch.ao's
    moving-average min/max of the training batches, frozen at ``freeze_observers_after``. Min/max
    ranges are wider than the histogram's (one outlier sets the scale): on the README's ResNet-56
    job QAT with moving ranges ended 0.22 ± 0.13 pt under PTQ, with calibrated ones it tied
    (−0.02 / −0.08 ± 0.12 pt, two seeds; docs/results.md). ``target`` is where the INT8
    model will run (``"auto"``: this CPU; ``"x86-vnni"``, ``"x86-avx2"``, ``"arm64"``): it fixes
    the weight range (:func:`scheme`).
    """

    backend: str = "pt2e"
    mode: str = "ptq"
    target: str = "auto"
    finetune: FinetuneOptions = QAT_FINETUNE
    freeze_bn_after: float = 0.5
    freeze_observers_after: float = 0.75
    calibration_batches: int = 16
    ptq_fallback: bool = True
    qat_ranges: str = "calibrated"

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"backend={self.backend!r} must be one of {BACKENDS}")
        if self.mode not in MODES:
            raise ValueError(f"mode={self.mode!r} must be one of {MODES}")
        if self.qat_ranges not in QAT_RANGES:
            raise ValueError(f"qat_ranges={self.qat_ranges!r} must be one of {QAT_RANGES}")
        if self.target != "auto" and self.target not in INT8_TARGETS:
            raise ValueError(f"target={self.target!r} must be 'auto' or one of {INT8_TARGETS}")
        if not isinstance(self.finetune, FinetuneOptions):
            raise TypeError(f"finetune={self.finetune!r} must be a FinetuneOptions")
        for name in ("freeze_bn_after", "freeze_observers_after"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name}={value} must be a fraction of the QAT steps in [0, 1]")
        if self.calibration_batches < 1:
            raise ValueError(f"calibration_batches={self.calibration_batches} must be >= 1")


@dataclass(frozen=True)
class Int8Scheme:
    """The integer ranges one INT8 target computes exactly, and why they were chosen."""

    target: str
    weight_range: tuple[int, int]
    activation_range: tuple[int, int]
    reason: str

    @property
    def weight_bits(self) -> int:
        return (self.weight_range[1] - self.weight_range[0] + 1).bit_length() - 1

    def as_dict(self) -> dict:
        return {"target": self.target, "weight_bits": self.weight_bits,
                "weight_range": list(self.weight_range),
                "activation_range": list(self.activation_range), "reason": self.reason}


def scheme(target: str = "auto") -> Int8Scheme:
    """The :class:`Int8Scheme` of ``target`` (``"auto"``: this CPU's, see ``ehap_fx.isa``).

    >>> scheme("x86-avx2").weight_range, scheme("x86-avx2").weight_bits
    ((-64, 63), 7)
    >>> scheme("x86-vnni").weight_bits
    8
    """
    resolved = int8_target(target)
    why = {
        "x86-vnni": "AVX512-VNNI accumulates u8*s8 in int32: full 8-bit weights are exact",
        "x86-avx2": "x86 without AVX512-VNNI adds u8*s8 pairs in saturating int16 "
                    "(255*127*2 > 32767): 7-bit weights (255*64*2 <= 32767) never saturate",
        "arm64": "ARM64 kernels widen u8*s8 products to int32: full 8-bit weights are exact",
    }[resolved]
    source = f"auto on {cpu_features().describe()}" if target == "auto" else "given"
    return Int8Scheme(resolved, WEIGHT_RANGES[resolved], ACTIVATION_RANGE, f"{source}: {why}")


@dataclass(frozen=True)
class QuantizeResult:
    """The INT8 model (``graph_module``) and how it was made.

    ``graph_module`` runs the integer model in PyTorch: real quantized kernels for ``"fx"``,
    Q/DQ-simulated arithmetic for ``"pt2e"``. Export it with ``passes.export.export``.
    """

    graph_module: fx.GraphModule
    backend: str
    mode: str
    steps: int = 0
    losses: tuple[float, ...] = ()
    calibration_batches: int = 0
    seconds: float = 0.0
    scheme: Int8Scheme = field(default_factory=lambda: scheme("x86-vnni"))
    modified: bool = field(default=True)
    check: dict | None = None  # QAT against PTQ on held-out batches (ehap_fx.qat.quantize_int8)


# ---------------------------------------------------------------------------------------------
# Warnings: torch.ao and the TorchScript exporter announce their deprecation on every call.
# ---------------------------------------------------------------------------------------------

_DEPRECATION_MESSAGES = (
    r".*torch\.ao\.quantization.*deprecated.*",
    r".*quantized tensor creation functions.*deprecated.*",
    r".*legacy TorchScript-based ONNX export.*",
    r".*torch\.jit\.(trace|trace_method|script)` is deprecated.*",
    r".*Constant folding - Only steps=1 can be constant folded.*",
    r".*must run observer before calling calculate_qparams.*",
    r".*is an Enum subclass.*",
)


@contextlib.contextmanager
def quiet_quantization_warnings() -> Iterator[None]:
    """Silence the known deprecation chatter of torch.ao / TorchScript export, for our calls only."""
    with warnings.catch_warnings():
        for message in _DEPRECATION_MESSAGES:
            warnings.filterwarnings("ignore", message=message)
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.ao")
        yield


# ---------------------------------------------------------------------------------------------
# The pass and its steps
# ---------------------------------------------------------------------------------------------

Batches = Iterable[Any]


Train = Callable[[fx.GraphModule, Batches, QuantizeOptions], Any]
"""A QAT loop: fine-tunes the prepared graph in place, returns an object with ``steps`` and
``losses`` (``ehap_fx.qat.qat_finetune``, or a compiler's own)."""


def quantize(
    model: nn.Module,
    example_input: torch.Tensor,
    data: Batches | None,
    options: QuantizeOptions = QuantizeOptions(),
    *,
    train: Train | None = None,
    calibration: Batches | None = None,
) -> QuantizeResult:
    """Quantize a copy of ``model`` (``nn.Module`` or ``GraphModule``) to INT8.

    ``data`` yields ``(x, y)`` batches (``x`` alone is enough for PTQ); PTQ observes its first
    ``calibration_batches`` batches, QAT trains on it with ``train`` (the pass has no training
    loop of its own: ``ehap_fx.qat.quantize_int8`` is this pass with ``ehap_fx.qat.qat_finetune``),
    after calibrating its activation ranges (``qat_ranges="calibrated"``). ``calibration``:
    the batches calibrated on, when not the first of ``data`` (pass the same list to a PTQ and
    a QAT call and QAT starts from that PTQ model). The input model is not modified.
    """
    if data is None:
        raise QuantizeError(
            f"{options.mode} needs data: pass batches of (x, y) for QAT, or of x for PTQ "
            "(e.g. ehap_fx.data.synthetic_cifar(512).loader(64), labelled synthetic)"
        )
    start = time.perf_counter()
    calibration = data if calibration is None else calibration
    chosen = scheme(options.target)
    prepared = prepare(model, example_input, options, chosen)
    steps, losses, seen = 0, (), 0
    if options.mode == "qat":
        if train is None:
            raise QuantizeError(
                "mode='qat' fine-tunes the prepared graph: pass train= (ehap_fx.qat.qat_finetune), "
                "or call ehap_fx.qat.quantize_int8, which does"
            )
        if options.qat_ranges == "calibrated":
            seen = calibrate_ranges(prepared, calibration, options.calibration_batches)
        result = train(prepared, data, options)
        steps, losses = result.steps, tuple(result.losses)
    else:
        seen = calibrate(prepared, calibration, options.calibration_batches)
    converted = convert(prepared, options)
    return QuantizeResult(
        converted, options.backend, options.mode, steps, losses, seen, time.perf_counter() - start, chosen
    )


def prepare(
    model: nn.Module, example_input: torch.Tensor, options: QuantizeOptions, chosen: Int8Scheme | None = None
) -> fx.GraphModule:
    """A copy of ``model`` with observers (PTQ) or fake quantizers (QAT) inserted, for the
    weight range of ``chosen`` (default: ``scheme(options.target)``)."""
    model = copy.deepcopy(model)
    model.train(options.mode == "qat")
    example = _batch_of_two(example_input)
    weights = (chosen or scheme(options.target)).weight_range
    calibrated = options.qat_ranges == "calibrated"
    try:
        with quiet_quantization_warnings():
            if options.backend == "fx":
                return _prepare_fx(model, example, options.mode == "qat", weights, calibrated)
            return _prepare_pt2e(model, example, options.mode == "qat", weights, calibrated)
    except QuantizeError:
        raise
    except Exception as e:
        reraise_interrupt(e)
        raise QuantizeError(
            f"{options.backend} {options.mode} prepare failed on {type(model).__name__}: "
            f"{type(e).__name__}: {e}; try backend={_other(options.backend)!r}"
        ) from e


@torch.no_grad()
def calibrate(prepared: nn.Module, data: Batches, batches: int) -> int:
    """Run up to ``batches`` batches of ``data`` through ``prepared``'s observers; returns the count."""
    _set_mode(prepared, train=False)
    seen = 0
    with quiet_quantization_warnings():
        for batch in data:
            if seen == batches:
                break
            x = batch[0] if isinstance(batch, (tuple, list)) else batch
            prepared(x)
            seen += 1
    if seen == 0:
        raise QuantizeError("calibration data yielded no batches; pass at least one batch of x")
    return seen


def histogram_quantizers(prepared: nn.Module) -> list[tuple[str, nn.Module]]:
    """The fake quantizers of a QAT graph whose ranges come from PTQ's histogram
    (``qat_ranges="calibrated"``: the activations'), with their names."""
    return [(n, m) for n, m in prepared.named_modules() if hasattr(m, "fake_quant_enabled")
            and type(m.activation_post_process).__name__ == "HistogramObserver"]


@torch.no_grad()
def calibrate_ranges(prepared: nn.Module, data: Batches, batches: int) -> int:
    """PTQ's calibration on a QAT graph: QAT then starts from the PTQ model.

    With fake quantization off (the float network, as PTQ's observers see it, BN on its
    running statistics), ``batches`` batches of ``data`` go through; the activation quantizers'
    histogram observers (``qat_ranges="calibrated"``) set their scale and zero point once from
    them and stop observing, so the ranges hold while QAT trains the weights (the weight
    quantizers keep tracking their weights until the observers freeze). Returns the count.
    """
    quantizers = [m for m in prepared.modules() if hasattr(m, "fake_quant_enabled") and hasattr(m, "scale")]
    ranges = [m for _, m in histogram_quantizers(prepared)]
    if not ranges:
        raise QuantizeError("calibrate_ranges: the graph has no histogram-observed activation quantizers "
                            "(prepare it with qat_ranges='calibrated')")
    for m in quantizers:
        m.disable_fake_quant()
    for m in ranges:  # observe without recomputing the histogram's search at every batch
        m.disable_observer()
    hooks = [m.register_forward_pre_hook(lambda m, args: m.activation_post_process(args[0].detach()))
             for m in ranges]
    try:
        seen = calibrate(prepared, data, batches)
    finally:
        for h in hooks:
            h.remove()
    for m in ranges:
        scale, zero_point = m.calculate_qparams()
        m.scale.resize_(scale.shape).copy_(scale)
        m.zero_point.resize_(zero_point.shape).copy_(zero_point)
    for m in quantizers:
        m.enable_fake_quant()
    return seen


def convert(prepared: fx.GraphModule, options: QuantizeOptions) -> fx.GraphModule:
    """The INT8 model of a prepared (and trained or calibrated) graph, in eval mode."""
    _set_mode(prepared, train=False)
    with quiet_quantization_warnings():
        if options.backend == "fx":
            from torch.ao.quantization.quantize_fx import convert_fx

            converted = convert_fx(prepared).eval()
            saturate_weights(converted, scheme(options.target).weight_range)
            return converted
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e

        return _bind_train_eval(convert_pt2e(prepared))


def saturate_weights(converted: nn.Module, weight_range: tuple[int, int]) -> int:
    """Clamp the integer weights of torch.ao's quantized modules into ``weight_range``, as the
    fake quantizers (and PT2E's conversion) do; returns the number of weights moved. In place.

    A symmetric per-channel observer sets ``scale = max|w| / ((hi - lo) / 2)``, so a channel's
    largest positive weight lands on ``round((hi - lo) / 2) = hi + 1``; ``convert_fx`` then
    clamps only to the dtype's (-128, 127): harmless for 8 bits (128 -> 127), but 7-bit weights
    reached +64 against the x86-avx2 scheme's (-64, 63), where AVX2's int16 pair sums saturate.
    """
    lo, hi = weight_range
    moved = 0
    for m in converted.modules():
        if not callable(getattr(m, "weight", None)) or not hasattr(m, "set_weight_bias"):
            continue
        w = m.weight()
        if not (w.is_quantized and w.qscheme() in (torch.per_channel_symmetric, torch.per_channel_affine)):
            continue  # packed, the symmetric weights read back as affine with zero points 0
        ints = w.int_repr()  # (C_out, ...) int8
        clamped = ints.clamp(lo, hi)
        moved += int((clamped != ints).sum())
        clamped = torch._make_per_channel_quantized_tensor(
            clamped, w.q_per_channel_scales(), w.q_per_channel_zero_points(), w.q_per_channel_axis())
        m.set_weight_bias(clamped, m.bias())
    return moved


# ---------------------------------------------------------------------------------------------
# Backends
# ---------------------------------------------------------------------------------------------


def fx_qconfig_mapping(qat: bool, weight_range: tuple[int, int] = WEIGHT_RANGE, calibrated: bool = False):
    """The torch.ao ``QConfigMapping`` of the scheme: FakeQuantize for QAT, observers for PTQ.
    ``calibrated`` (QAT): the activation quantizers observe with PTQ's histogram
    (:func:`calibrate_ranges`), not a moving min/max."""
    from torch.ao.quantization import (
        FakeQuantize,
        HistogramObserver,
        MovingAverageMinMaxObserver,
        MovingAveragePerChannelMinMaxObserver,
        PerChannelMinMaxObserver,
        QConfig,
        QConfigMapping,
    )

    act_kw = dict(
        dtype=torch.quint8,
        qscheme=torch.per_tensor_affine,
        quant_min=ACTIVATION_RANGE[0],
        quant_max=ACTIVATION_RANGE[1],
        reduce_range=False,
    )
    w_kw = dict(
        dtype=torch.qint8,
        qscheme=torch.per_channel_symmetric,
        ch_axis=0,
        quant_min=weight_range[0],
        quant_max=weight_range[1],
    )
    if qat:
        act = FakeQuantize.with_args(
            observer=HistogramObserver if calibrated else MovingAverageMinMaxObserver, **act_kw)
        weight = FakeQuantize.with_args(observer=MovingAveragePerChannelMinMaxObserver, **w_kw)
    else:
        act = HistogramObserver.with_args(**act_kw)
        weight = PerChannelMinMaxObserver.with_args(**w_kw)
    return QConfigMapping().set_global(QConfig(activation=act, weight=weight))


def _prepare_fx(
    model: nn.Module, example: torch.Tensor, qat: bool, weights: tuple[int, int], calibrated: bool = False
) -> fx.GraphModule:
    from torch.ao.quantization.quantize_fx import prepare_fx, prepare_qat_fx

    if isinstance(model, fx.GraphModule):
        constant_adds_as_convs(model)
    fn = prepare_qat_fx if qat else prepare_fx
    return fn(model, fx_qconfig_mapping(qat, weights, calibrated), (example,))


_ADDS = (operator.add, operator.iadd, torch.add, "add")


def constant_adds_as_convs(gm: fx.GraphModule) -> int:
    """Rewrite ``x + c`` (``c`` a per-channel constant ``(1, C, 1, 1)`` read with ``get_attr``,
    what a dropped residual block leaves, see ``passes.shrink``) into a 1x1 depthwise conv with
    weight 1 and bias ``c``. FX quantization does not observe ``get_attr`` constants, so the
    add would run in float between a DequantizeLinear and a QuantizeLinear (measured: 45 % of
    the onnxruntime INT8 latency of a depth-pruned ResNet-56); the conv computes the same
    (weight 1 is exact in symmetric int8) and quantizes like any conv. In place; returns the
    number of adds rewritten."""
    count = 0
    for node in list(gm.graph.nodes):
        if node.op not in ("call_function", "call_method") or node.target not in _ADDS or node.kwargs:
            continue
        if len(node.args) != 2 or not all(isinstance(a, fx.Node) for a in node.args):
            continue
        const, x = node.args if node.args[0].op == "get_attr" else node.args[::-1]
        if const.op != "get_attr" or x.op == "get_attr":
            continue
        owner, _, name = const.target.rpartition(".")
        value = getattr(gm.get_submodule(owner), name)
        shape = tuple(x.meta["tensor_meta"].shape) if "tensor_meta" in x.meta else ()
        conv2d_constant = value.dim() == 4 and is_channel_constant(value.shape)
        if not conv2d_constant or len(shape) != 4 or shape[1] != value.shape[1]:
            continue
        c = value.shape[1]
        conv = nn.Conv2d(c, c, 1, groups=c, bias=True)
        with torch.no_grad():
            conv.weight.fill_(1.0)
            conv.bias.copy_(value.detach().flatten())
        target = fresh_attr(gm, f"{name}_add")
        gm.add_submodule(target, conv)
        with gm.graph.inserting_before(node):
            new = gm.graph.call_module(target, (x,))
        new.meta = dict(node.meta)
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        count += 1
    if count:
        gm.graph.eliminate_dead_code()
        gm.recompile()
    return count


def _prepare_pt2e(
    model: nn.Module, example: torch.Tensor, qat: bool, weights: tuple[int, int], calibrated: bool = False
) -> fx.GraphModule:
    pytree_log = logging.getLogger("torch.utils._pytree")  # torchao's import-time notice
    level = pytree_log.level
    pytree_log.setLevel(logging.ERROR)
    try:
        from ehap_fx.passes._ort_quantizer import OrtQuantizer
        from torchao.quantization.pt2e.quantize_pt2e import prepare_pt2e, prepare_qat_pt2e
    except ImportError as e:
        raise QuantizeError(
            f"backend='pt2e' (the default INT8 path) needs torchao ({e}): pip install torchao "
            "(ehap-fx[quant]), or use backend='fx' (CLI: --backend fx)"
        ) from e
    finally:
        pytree_log.setLevel(level)
    batch = torch.export.Dim("batch", min=1, max=65536)
    exported = torch.export.export(model, (example,), dynamic_shapes=({0: batch},))
    fn = prepare_qat_pt2e if qat else prepare_pt2e
    prepared = fn(exported.module(), OrtQuantizer(qat, weights, calibrated))
    return _bind_train_eval(prepared)


def _bind_train_eval(gm: fx.GraphModule) -> fx.GraphModule:
    """Make ``.train()``/``.eval()`` of an exported graph switch its BN and dropout ops.

    ``gm.meta[_meta.BN_FROZEN]`` keeps BatchNorm on running statistics even in train mode
    (the PT2E counterpart of torch.ao's ``freeze_bn_stats``).
    """
    from torchao.quantization.pt2e import move_exported_model_to_eval, move_exported_model_to_train

    def train(self, mode: bool = True):
        if mode and not self.meta.get(_meta.BN_FROZEN, False):
            move_exported_model_to_train(self)
        else:
            move_exported_model_to_eval(self)
        self.training = mode
        return self

    gm.train = types.MethodType(train, gm)
    gm.eval = types.MethodType(lambda self: self.train(False), gm)
    return gm


def _set_mode(model: nn.Module, train: bool) -> None:
    with quiet_quantization_warnings():
        model.train(train)


def _batch_of_two(x: torch.Tensor) -> torch.Tensor:
    """torch.export specializes a batch of 1; the dynamic batch dimension needs >= 2."""
    if not isinstance(x, torch.Tensor) or x.dim() < 1:
        raise QuantizeError(f"example_input must be a batched tensor, got {type(x).__name__}")
    return x if x.shape[0] >= 2 else torch.cat([x, x])


def _other(backend: str) -> str:
    return "pt2e" if backend == "fx" else "fx"
