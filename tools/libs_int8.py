"""A YOLO detector and an smp segmenter through the whole path: ``compress(model, x)``, PT2E
INT8 (``passes.quantize``, PTQ), ONNX, onnxruntime; dense fp32, pruned fp32, dense INT8 and
pruned INT8 timed side by side, interleaved round by round in one run (``latency.time_onnx``).

* ultralytics ``yolov8n`` (built from its yaml, random init) with ``Detect.export = True``: the
  head returns the decoded predictions only, as ultralytics' own ONNX export does (in eval it
  otherwise also returns the neck's feature maps, which would pin their channels).
* segmentation_models_pytorch ``Unet(resnet18)``, ``encoder_weights=None``.

No weights and no data can be had here: calibration is on Gaussian batches, so the INT8
numbers below say where the integer kernels run and how fast, not how accurate the model is.
Per INT8 file: which convs onnxruntime runs as ``QLinearConv`` (its optimised graph,
``passes.export.inspect_optimized``) and the largest |ORT − PyTorch INT8| output difference in
output quantization steps (``passes.export.export``'s check).

    python tools/libs_int8.py [--models yolov8n unet_resnet18] [--rounds 10] [--threads 1]
"""

from __future__ import annotations

import argparse
import datetime
import tempfile
import time
import warnings
from pathlib import Path

import torch
from ehap_fx.passes.export import ExportOptions, export, export_onnx, inspect_optimized
from ehap_fx.passes.quantize import QuantizeOptions
from ehap_fx.passes.quantize import quantize as quantize_pass
from ehap_fx.passes.trace import call_with
from torch.utils.flop_counter import FlopCounterMode

from ehap_fx import compress
from ehap_fx.isa import cpu_features
from ehap_fx.latency import BenchOptions, time_onnx

PTQ = QuantizeOptions(backend="pt2e", mode="ptq", calibration_batches=8)


def build(name: str) -> tuple[torch.nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    if name == "yolov8n":
        from ultralytics import YOLO

        model = YOLO("yolov8n.yaml").model.eval()
        model.model[-1].export = True  # decoded predictions (1, 84, anchors) only
        return model, torch.randn(1, 3, 320, 320)
    if name == "unet_resnet18":
        import segmentation_models_pytorch as smp

        return smp.Unet("resnet18", encoder_weights=None).eval(), torch.randn(1, 3, 256, 256)
    raise ValueError(f"name={name!r}")


def flops(model, x) -> int:
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        call_with(model, x)
    return int(counter.get_total_flops())


def run(name: str, out: Path, rounds: int, threads: int) -> list[str]:
    model, x = build(name)
    t = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pruned = compress(model, x).pruned
    compress_s = time.perf_counter() - t
    ratio = flops(pruned, x) / flops(model, x)
    calibration = [torch.randn(2, *x.shape[1:]) for _ in range(PTQ.calibration_batches)]
    check = torch.randn(4, *x.shape[1:])
    paths, lines = {}, [f"#### {name}, input {tuple(x.shape)}: compress {compress_s:.0f} s, FLOPs "
                        f"{ratio:.3f} of dense (FlopCounterMode)", ""]
    for label, m in (("dense", model), ("pruned", pruned)):
        paths[f"{label} fp32"] = export_onnx(m, x, out / f"{name}_{label}_fp32.onnx", dynamo=False)
        t = time.perf_counter()
        q = quantize_pass(m, x, calibration, PTQ)
        report = export(q, x, out / f"{name}_{label}_int8.onnx", inputs=check,
                        options=ExportOptions(fp32_reference=False, batch_size=2, min_quantized_convs=0.0))
        paths[f"{label} int8"] = report.path
        with torch.no_grad():
            scale = float(q.graph_module(check).abs().max())  # the size of the outputs compared
        float_convs = sorted({f"{c.kernel}" for c in report.convs if not c.quantized})
        lines.append(f"- {label} INT8 (PT2E PTQ, {time.perf_counter() - t:.0f} s): "
                     f"{sum(c.quantized for c in report.convs)}/{len(report.convs)} convs QLinearConv"
                     + (f" (float: kernels {', '.join(float_convs)})" if float_convs else "")
                     + f"; ORT vs PyTorch INT8: max |diff| {report.max_abs_diff:.3g}"
                     + (f" = {report.max_diff_steps:.2f} output steps" if report.max_diff_steps is not None else "")
                     + f", max |output| {scale:.3g}")
    counts, _ = inspect_optimized(paths["pruned int8"])
    lines.append(f"- pruned INT8 kernels: {', '.join(f'{k} {v}' for k, v in sorted(counts.items()) if 'QLinear' in k)}")
    times = time_onnx(paths, BenchOptions(batches=(1,), rounds=rounds, threads=threads))
    base = times["dense fp32"][1]
    lines += ["", "| model | ms (batch 1, median) | speed-up vs dense fp32 |", "|---|---:|---:|"]
    lines += [f"| {label} | {1e3 * t[1]:.1f} | {base / t[1]:.2f}× |" for label, t in times.items()]
    return lines + [""]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["yolov8n", "unet_resnet18"])
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    print(f"{date}; onnxruntime on {cpu_features().describe()}, {args.threads} intra-op thread(s), "
          f"{args.rounds} interleaved rounds of 20 runs\n", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or Path(tmp)
        for name in args.models:
            print("\n".join(run(name, out, args.rounds, args.threads)), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
