"""ONNX export of the INT8 model, verified in onnxruntime before anyone ships it.

Why: an INT8 export can "work" and still be slow or wrong. onnxruntime only runs a conv in
integer arithmetic when its QDQ optimizer fuses ``DQ -> Conv -> Q`` into ``QLinearConv``;
a misplaced Q/DQ leaves the conv in float (slower than the fp32 model). And the exporter,
the runtime and PyTorch's kernels can each round differently. So :func:`export` writes the
file and then checks it: it runs it in onnxruntime at two batch sizes (the batch axis is
dynamic), counts the integer kernels in the ORT-optimised graph (warning when convs stayed
float), compares the logits with the PyTorch INT8 model (max difference in output
quantization steps, argmax agreement) and reports the file size against the fp32 export.

* FX models (``torch.ao`` ``convert_fx``) go through the TorchScript exporter
  (``dynamo=False``), which writes the quantized ops as QuantizeLinear/DequantizeLinear.
* PT2E models go through ``torch.export`` with a dynamic batch and ``dynamo=True``.
"""

from __future__ import annotations

import collections
import os
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from ehap_fx.passes._onnx_rewrites import tile_channel_constants
from ehap_fx.passes.quantize import QuantizeResult, quiet_quantization_warnings
from torch import nn

from ehap_fx.errors import QuantizeError, reraise_interrupt
from ehap_fx.isa import cpu_features

INPUT, OUTPUT = "input", "logits"
QUANTIZED_KERNELS = (
    "QLinearConv",
    "QLinearMatMul",
    "QGemm",
    "QLinearAdd",
    "MatMulInteger",
    "ConvInteger",
    "QLinearGlobalAveragePool",
    "QLinearConcat",
    "QLinearMul",
)
FLOAT_CONVS = ("Conv", "FusedConv", "NchwcConv")


class QuantizeWarning(UserWarning):
    """An INT8 export that runs but not as intended (e.g. convs left in float)."""


@dataclass(frozen=True)
class ExportOptions:
    """ONNX export settings; ``min_quantized_convs`` is the QLinearConv share below which we warn."""

    opset: int = 17
    verify: bool = True
    batch_size: int = 128
    threads: int | None = None
    min_quantized_convs: float = 0.9
    fp32_reference: bool = True

    def __post_init__(self) -> None:
        if not 13 <= self.opset <= 21:
            raise ValueError(f"opset={self.opset} must be in [13, 21] (per-channel QDQ needs 13)")
        if self.batch_size < 2:
            raise ValueError(f"batch_size={self.batch_size} must be >= 2 to check a dynamic batch")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads={self.threads} must be >= 1 or None")
        if not 0.0 <= self.min_quantized_convs <= 1.0:
            raise ValueError(f"min_quantized_convs={self.min_quantized_convs} must be in [0, 1]")


@dataclass(frozen=True)
class ConvStatus:
    """One convolution of the ORT-optimised graph: which kernel runs it, and its channels."""

    name: str
    op_type: str
    in_channels: int
    out_channels: int
    kernel: tuple[int, ...]

    @property
    def quantized(self) -> bool:
        return self.op_type in ("QLinearConv", "ConvInteger")


@dataclass(frozen=True)
class ExportReport:
    """What the verification found; ``summary()`` gives it in a few lines."""

    path: Path
    backend: str
    opset: int
    int8_bytes: int
    fp32_bytes: int | None
    op_counts: dict[str, int]
    convs: tuple[ConvStatus, ...]
    n_inputs: int = 0
    batch_sizes: tuple[int, ...] = ()
    max_abs_diff: float = float("nan")
    output_step: float | None = None
    argmax_agreement: float = float("nan")
    isa: str = ""  # the CPU onnxruntime ran the check on (ehap_fx.isa), e.g. "x86_64 AVX2"
    metadata: dict[str, str] | None = None  # what export() wrote into the file's metadata_props

    @property
    def quantized_conv_fraction(self) -> float:
        return sum(c.quantized for c in self.convs) / max(1, len(self.convs))

    @property
    def max_diff_steps(self) -> float | None:
        """Largest |ORT - PyTorch| logit difference, in output quantization steps."""
        return None if self.output_step is None else self.max_abs_diff / self.output_step

    @property
    def size_ratio(self) -> float | None:
        return None if self.fp32_bytes is None else self.fp32_bytes / self.int8_bytes

    def summary(self) -> str:
        q = sum(c.quantized for c in self.convs)
        kernels = ", ".join(f"{k} {v}" for k, v in sorted(self.op_counts.items()) if k in QUANTIZED_KERNELS)
        lines = [
            f"{self.path} ({self.backend}, opset {self.opset}): "
            f"{q}/{len(self.convs)} convs QLinearConv; {kernels}",
            f"  size {self.int8_bytes / 1024:.1f} KiB int8"
            + (
                f" vs {self.fp32_bytes / 1024:.1f} KiB fp32 ({self.size_ratio:.2f}x smaller)"
                if self.fp32_bytes
                else ""
            ),
        ]
        if self.n_inputs:
            steps = f" = {self.max_diff_steps:.2f} output steps" if self.output_step else ""
            lines.append(
                f"  vs PyTorch INT8 on {self.n_inputs} inputs (batches "
                f"{self.batch_sizes}; onnxruntime on {self.isa}): "
                f"argmax agreement {100 * self.argmax_agreement:.2f}%,"
                f" max |diff| {self.max_abs_diff:.4g}{steps}"
            )
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Export
# ---------------------------------------------------------------------------------------------


def export_onnx(
    model: nn.Module,
    example_input: torch.Tensor,
    path: str | Path,
    *,
    dynamo: bool,
    opset: int = 17,
    metadata: dict[str, str] | None = None,
) -> Path:
    """Write ``model`` to ONNX with a dynamic batch axis (input ``input``, output ``logits``),
    ``metadata`` in the file's ``metadata_props``. Written to ``<path>.tmp`` and renamed, so
    an error or an interrupt leaves no half file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with quiet_quantization_warnings(), torch.no_grad():
            if dynamo:
                _export_dynamo(model, example_input, tmp, opset)
            else:
                torch.onnx.export(
                    model,
                    (example_input,),
                    str(tmp),
                    dynamo=False,
                    opset_version=opset,
                    input_names=[INPUT],
                    output_names=[OUTPUT],
                    dynamic_axes={INPUT: {0: "batch"}, OUTPUT: {0: "batch"}},
                )
        _rewrite(tmp, strip=dynamo, metadata=metadata or {})
        os.replace(tmp, path)
    except Exception as e:
        reraise_interrupt(e)
        how = "torch.export + dynamo=True" if dynamo else "TorchScript (dynamo=False)"
        raise QuantizeError(
            f"ONNX export of {type(model).__name__} via {how} failed: {type(e).__name__}: {e}"
        ) from e
    finally:  # KeyboardInterrupt too
        tmp.unlink(missing_ok=True)
    return path


def _export_dynamo(model: nn.Module, example_input: torch.Tensor, path: Path, opset: int) -> None:
    x = example_input if example_input.shape[0] >= 2 else torch.cat([example_input] * 2)
    batch = torch.export.Dim("batch", min=1, max=65536)
    exported = torch.export.export(model, (x,), dynamic_shapes=({0: batch},))
    torch.onnx.export(
        exported,
        f=str(path),
        dynamo=True,
        opset_version=max(opset, 18),
        input_names=[INPUT],
        output_names=[OUTPUT],
        verbose=False,
        external_data=False,
    )


def _rewrite(path: Path, *, strip: bool, metadata: dict[str, str]) -> None:
    """Add ``metadata`` to the model's ``metadata_props``; ``strip``: drop the per-node stack
    traces the dynamo exporter writes (they double the file size); tile the per-channel
    constants onnxruntime would broadcast slowly (:func:`tile_channel_constants`)."""
    import onnx

    model = onnx.load(str(path))
    tile_channel_constants(model)
    if strip:
        for node in model.graph.node:
            del node.metadata_props[:]
            node.doc_string = ""
    for key, value in metadata.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, str(value)
    onnx.save(model, str(path))


def export(
    quantized: QuantizeResult,
    example_input: torch.Tensor,
    path: str | Path,
    *,
    inputs: torch.Tensor | None = None,
    float_model: nn.Module | None = None,
    options: ExportOptions = ExportOptions(),
) -> ExportReport:
    """Export the INT8 model to ``path`` and verify it (see the module docstring).

    ``inputs`` (e.g. 512 test images) are compared with the PyTorch INT8 model;
    ``float_model`` is exported next to it as ``<stem>_fp32.onnx`` for the size comparison.
    """
    metadata = {
        "ehap.int8_target": quantized.scheme.target,
        "ehap.weight_bits": str(quantized.scheme.weight_bits),
        "ehap.int8_scheme": quantized.scheme.reason,
    }
    path = export_onnx(
        quantized.graph_module,
        example_input,
        path,
        dynamo=quantized.backend == "pt2e",
        opset=options.opset,
        metadata=metadata,
    )
    fp32_bytes = None
    if float_model is not None and options.fp32_reference:
        fp32_path = path.with_name(path.stem + "_fp32.onnx")
        float_model = float_model.eval()
        export_onnx(float_model, example_input, fp32_path, dynamo=False, opset=options.opset)
        fp32_bytes = fp32_path.stat().st_size
    counts, convs = inspect_optimized(path)
    opset = max(options.opset, 18) if quantized.backend == "pt2e" else options.opset
    report = ExportReport(
        path, quantized.backend, opset, path.stat().st_size, fp32_bytes, counts, convs,
        isa=cpu_features().describe(), metadata=metadata,
    )
    _warn_float_convs(report, options.min_quantized_convs)
    if options.verify and inputs is not None:
        report = compare_with_torch(report, quantized.graph_module, inputs, options)
    return report


# ---------------------------------------------------------------------------------------------
# Verification
# ---------------------------------------------------------------------------------------------


def session(
    path: str | Path,
    threads: int | None = None,
    optimized_path: str | Path | None = None,
    level: str = "all",
    spinning: bool = True,
):
    """An onnxruntime CPU session (``level``: "extended" or "all" graph optimisations).

    ``spinning=False`` stops idle worker threads from busy-waiting after a run: needed when
    several sessions take turns on few cores (a benchmark), where one session's spinning
    threads steal the cores from the next one's run.
    """
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if level == "all"
        else ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    )
    if threads is not None:
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
    if not spinning:
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if optimized_path is not None:
        so.optimized_model_filepath = str(optimized_path)
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def inspect_optimized(path: str | Path) -> tuple[dict[str, int], tuple[ConvStatus, ...]]:
    """Op counts and per-conv status of the graph onnxruntime actually runs.

    Uses the "extended" level (which contains the QDQ fusions) so that the saved graph is
    portable; the "all" level only adds layout changes of float convs (NCHWc).
    """
    import onnx

    with tempfile.TemporaryDirectory() as tmp:
        opt = Path(tmp) / "optimized.onnx"
        session(path, threads=1, optimized_path=opt, level="extended")
        model = onnx.load(str(opt))
    counts = dict(collections.Counter(n.op_type for n in model.graph.node))
    return counts, conv_table(model)


def conv_table(model) -> tuple[ConvStatus, ...]:
    """Each Conv/QLinearConv node of an ONNX graph with its channel counts, in graph order."""
    from onnx import numpy_helper

    shapes = {t.name: tuple(t.dims) for t in model.graph.initializer}
    shapes.update(
        {
            n.output[0]: tuple(numpy_helper.to_array(n.attribute[0].t).shape)
            for n in model.graph.node
            if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value"
        }
    )
    out = []
    for node in model.graph.node:
        if node.op_type not in (*FLOAT_CONVS, "QLinearConv", "ConvInteger"):
            continue
        w = node.input[3] if node.op_type == "QLinearConv" else node.input[1]
        shape = shapes.get(w, ())
        groups = next((a.i for a in node.attribute if a.name == "group"), 1)
        cout, cin = (shape[0], shape[1] * groups) if len(shape) >= 2 else (-1, -1)
        out.append(ConvStatus(node.name, node.op_type, cin, cout, tuple(shape[2:])))
    return tuple(out)


def _warn_float_convs(report: ExportReport, minimum: float) -> None:
    floats = [c for c in report.convs if not c.quantized]
    if floats and report.quantized_conv_fraction < minimum:
        names = ", ".join(f"{c.name} ({c.in_channels}->{c.out_channels})" for c in floats[:5])
        warnings.warn(
            f"{report.path}: {len(floats)} of {len(report.convs)} convs stay float in "
            f"onnxruntime ({names}{', ...' if len(floats) > 5 else ''}); their Q/DQ pairs "
            "were not fused into QLinearConv, so they run slower than fp32. Check the "
            "quantization backend (try the other one) and the ops around those convs.",
            QuantizeWarning,
            stacklevel=3,
        )


@torch.no_grad()
def compare_with_torch(
    report: ExportReport,
    torch_model: nn.Module,
    inputs: torch.Tensor,
    options: ExportOptions = ExportOptions(),
) -> ExportReport:
    """``report`` completed with the ORT vs PyTorch INT8 comparison over ``inputs``.

    ORT runs ``inputs`` in batches of ``options.batch_size`` and once more at batch 1, so a
    file whose batch axis is not dynamic fails here with a clear error.
    """
    import onnx

    sess = session(report.path, threads=options.threads)
    chunks = list(torch.split(inputs, options.batch_size))
    try:
        ort_out = np.concatenate([sess.run(None, {INPUT: c.numpy()})[0] for c in chunks])
        single = sess.run(None, {INPUT: inputs[:1].numpy()})[0]
    except Exception as e:
        reraise_interrupt(e)
        raise QuantizeError(
            f"onnxruntime could not run {report.path} at batch sizes "
            f"{sorted({len(c) for c in chunks} | {1})}: {e}"
        ) from e
    with quiet_quantization_warnings():
        ref = torch.cat([torch_model(c) for c in chunks]).float().numpy()
    if not np.allclose(single[0], ort_out[0], atol=1e-5):
        raise QuantizeError(
            f"{report.path}: batch 1 and batch {len(chunks[0])} disagree on "
            "input 0; the exported graph mixes samples across the batch"
        )
    diff = float(np.abs(ort_out - ref).max())
    agree = float((ort_out.argmax(1) == ref.argmax(1)).mean())
    step = output_step(onnx.load(str(report.path)))
    return ExportReport(
        **{
            **report.__dict__,
            "n_inputs": len(inputs),
            "batch_sizes": tuple(sorted({1, *(len(c) for c in chunks)})),
            "max_abs_diff": diff,
            "output_step": step,
            "argmax_agreement": agree,
        }
    )


def onnx_top1(path: str | Path, batches, threads: int | None = None) -> float:
    """Top-1 (%) of the ONNX file itself in onnxruntime over ``(x, y)`` batches: what ships."""
    sess = session(path, threads=threads)
    name = sess.get_inputs()[0].name
    correct = total = 0
    for x, y in batches:
        logits = sess.run(None, {name: x.numpy()})[0]
        correct += int((logits.argmax(1) == y.numpy()).sum())
        total += len(y)
    if total == 0:
        raise QuantizeError(f"no batches to evaluate {path} on")
    return 100.0 * correct / total


def output_step(model) -> float | None:
    """The quantization step (scale) of the graph output, when a DequantizeLinear produces it."""
    from onnx import numpy_helper

    producers = {o: n for n in model.graph.node for o in n.output}
    consts = {t.name: t for t in model.graph.initializer}
    consts.update(
        {n.output[0]: n.attribute[0].t for n in model.graph.node if n.op_type == "Constant" and n.attribute}
    )
    name = model.graph.output[0].name
    for _ in range(4):  # walk back through Identity/Reshape-like ops
        node = producers.get(name)
        if node is None:
            return None
        if node.op_type == "DequantizeLinear":
            scale = consts.get(node.input[1])
            return None if scale is None else float(numpy_helper.to_array(scale).max())
        name = node.input[0]
    return None
