"""Is the INT8 ONNX file right on this CPU? ResNet-56 PTQ, onnxruntime vs PyTorch INT8, full test set.

For each INT8 target (``auto`` = the scheme this CPU gets, plus any forced ones), quantizes the
pretrained ResNet-56 (``../shared/weights``) with FX PTQ, exports it, and runs the whole
CIFAR-10 test set (``../shared/data``) through the PyTorch INT8 model and the ONNX file in
onnxruntime: top-1 of each, their difference, argmax agreement and the largest logit difference
in output quantization steps. Forcing ``x86-vnni`` (8-bit weights) on a CPU without AVX512-VNNI
shows the int16 saturation that ``auto`` avoids; forcing ``x86-avx2`` on a VNNI CPU shows what
the 7-bit weights cost.

    python tools/int8_agreement.py [--targets auto x86-vnni x86-avx2] [--limit-test N]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import torch
from ehap_fx.passes.export import export, output_step, session
from ehap_fx.passes.quantize import QuantizeOptions, quantize, quiet_quantization_warnings, scheme

from ehap_fx.data import load_cifar
from ehap_fx.isa import INT8_TARGETS, cpu_features
from ehap_fx.models import normalization, pretrained_model

SHARED = Path(__file__).resolve().parents[2] / "shared"


@torch.no_grad()
def add_shared_args(p) -> None:
    """``--data`` and ``--weights``: the shared CIFAR-10 and pretrained ResNets (default ../shared)."""
    p.add_argument("--data", type=Path, default=SHARED / "data")
    p.add_argument("--weights", type=Path, default=SHARED / "weights")


def shared_missing(args) -> bool:
    """True (and says so) when the shared data or weights are not there: the tool skips cleanly."""
    if (args.data / "cifar-10-batches-py").is_dir() and args.weights.is_dir():
        return False
    print(f"skipped: needs CIFAR-10 under {args.data} and weights under {args.weights}")
    return True


def logits_of(model, loader) -> tuple[np.ndarray, np.ndarray]:
    out, labels = [], []
    with quiet_quantization_warnings():
        for x, y in loader:
            out.append(model(x).float().numpy())
            labels.append(y.numpy())
    return np.concatenate(out), np.concatenate(labels)


def ort_logits(path: Path, loader) -> np.ndarray:
    sess = session(path)
    name = sess.get_inputs()[0].name
    return np.concatenate([sess.run(None, {name: x.numpy()})[0] for x, _ in loader])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--targets", nargs="+", default=["auto", "x86-vnni", "x86-avx2"],
                   choices=("auto", *INT8_TARGETS))
    p.add_argument("--calibration-batches", type=int, default=16)
    p.add_argument("--limit-test", type=int)
    add_shared_args(p)
    args = p.parse_args(argv)
    if shared_missing(args):
        return 0
    torch.manual_seed(0)
    norm = normalization("resnet56")
    model = pretrained_model("resnet56", args.weights)
    train, test = load_cifar(args.data, split="train"), load_cifar(args.data, split="test")
    if args.limit_test:
        test = test.head(args.limit_test)
    loader = test.loader(500, normalization=norm)
    fp32, labels = logits_of(model, loader)
    x = torch.randn(2, 3, 32, 32)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for target in args.targets:
            chosen = scheme(target)
            q = quantize(model, x, train.loader(128, shuffle=True, normalization=norm),
                         QuantizeOptions(mode="ptq", target=target,
                                         calibration_batches=args.calibration_batches))
            path = Path(tmp) / f"resnet56_{chosen.target}.onnx"
            rep = export(q, x, path)
            torch_int8, _ = logits_of(q.graph_module, loader)
            ort = ort_logits(path, loader)
            step = output_step(onnx.load(str(path)))
            top = [100.0 * float((z.argmax(1) == labels).mean()) for z in (fp32, torch_int8, ort)]
            rows.append((target, chosen, *top, 100.0 * float((ort.argmax(1) == torch_int8.argmax(1)).mean()),
                         float(np.abs(ort - torch_int8).max()) / step, rep.quantized_conv_fraction))
    print(f"# {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, {cpu_features().describe()}, "
          f"torch {torch.__version__}, onnxruntime {onnxruntime.__version__}; ResNet-56 (pretrained), "
          f"FX PTQ ({args.calibration_batches} x 128 calibration images), {len(test)} CIFAR-10 test images")
    print("| target asked | scheme | fp32 top-1 | PyTorch INT8 top-1 | ONNX INT8 top-1 (ORT) "
          "| ONNX − PyTorch | argmax agreement | max diff (output steps) | QLinearConv |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for target, chosen, f32, tq, oq, agree, steps, qconv in rows:
        print(f"| {target} | {chosen.target}, {chosen.weight_bits}-bit weights | {f32:.2f} | {tq:.2f} | "
              f"{oq:.2f} | {oq - tq:+.2f} | {agree:.2f} % | {steps:.1f} | {100 * qconv:.0f} % |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
