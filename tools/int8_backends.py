"""PT2E (the default INT8 path) against torch.ao FX, side by side, on real CIFAR-10 models.

For each model and each backend: PTQ (16 calibration batches of 128 training images), the ONNX
export and its onnxruntime check, then on the first ``--limit-test`` CIFAR-10 test images the
top-1 of fp32, of the PyTorch INT8 model and of the ONNX file in onnxruntime, the ORT-vs-PyTorch
argmax agreement, the QLinearConv share, the time to quantize (prepare + calibrate + convert)
and to export, and the onnxruntime latency of the fp32 model and of both INT8 files at batch 1
and 128, timed interleaved (``ehap_fx.latency.time_onnx``).

Models: the pretrained ResNet-56 (``../shared/weights``), and torchvision models at 32x32 with
their CIFAR-10 head, read from ``--checkpoints`` (default ``runs/cifar10-torchvision/``), where
``tools/train_cifar_torchvision.py`` writes them: trained from scratch on the shared CIFAR-10
(no weights can be downloaded; their accuracy is that of a short CPU training, and both
backends see the same model). A missing checkpoint stops the run, naming that command.

    OMP_NUM_THREADS=1 python tools/train_cifar_torchvision.py      # once: resnet18, mobilenet_v3_large
    python tools/int8_backends.py [--models resnet56 torchvision:resnet18 torchvision:mobilenet_v3_large]
        [--limit-test 2000] [--threads 2] [--checkpoints runs/cifar10-torchvision]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import onnxruntime
import torch
from ehap_fx.passes.export import export, export_onnx
from ehap_fx.passes.quantize import QuantizeOptions, quantize
from int8_agreement import add_shared_args, logits_of, ort_logits, shared_missing  # tools/ beside this script
from train_cifar_torchvision import checkpoint_path

from ehap_fx.data import CIFAR10_NORM, load_cifar
from ehap_fx.isa import cpu_features
from ehap_fx.latency import BenchOptions, time_onnx
from ehap_fx.models import normalization, pretrained_model
from ehap_fx.models.resolve import resolve_model


def build(spec: str, args):
    """(model in eval mode, normalisation, what it is)."""
    if spec == "resnet56":
        return pretrained_model("resnet56", args.weights), normalization("resnet56"), "pretrained (akamaster)"
    path = checkpoint_path(args.checkpoints, spec)
    if not path.is_file():
        raise SystemExit(f"{path} is missing: train it first with OMP_NUM_THREADS=1 python "
                         f"tools/train_cifar_torchvision.py --models {spec} --out {args.checkpoints}")
    meta = torch.load(path, weights_only=True)["meta"]
    model = resolve_model(spec, 10, weights=path).model
    return model.eval(), CIFAR10_NORM, (f"trained here: {meta['steps']} steps of {meta['batch_size']}, "
                                        f"{meta.get('train_cpu_s', meta['train_s']) / 60:.0f} CPU min")


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown CPU"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+",
                   default=["resnet56", "torchvision:resnet18", "torchvision:mobilenet_v3_large"])
    p.add_argument("--backends", nargs="+", default=["pt2e", "fx"], choices=("pt2e", "fx"))
    p.add_argument("--limit-test", type=int, default=2000)
    p.add_argument("--checkpoints", type=Path, default=Path(__file__).resolve().parents[1] / "runs"
                   / "cifar10-torchvision", help="where tools/train_cifar_torchvision.py wrote the torchvision models")
    p.add_argument("--threads", type=int, default=2, help="onnxruntime threads of the timing")
    p.add_argument("--rounds", type=int, default=5)
    add_shared_args(p)
    args = p.parse_args(argv)
    if shared_missing(args):
        return 0
    train, test = load_cifar(args.data, split="train"), load_cifar(args.data, split="test").head(args.limit_test)
    x = torch.randn(2, 3, 32, 32)
    rows, speed = [], []
    load = [os.getloadavg()[0]]
    started = datetime.now(timezone.utc)
    with tempfile.TemporaryDirectory() as tmp:
        for spec in args.models:
            model, norm, what = build(spec, args)
            loader = test.loader(250, normalization=norm)
            fp32, labels = logits_of(model, loader)
            files = {"fp32": export_onnx(model, x, Path(tmp) / f"{spec.replace(':', '_')}_fp32.onnx", dynamo=False)}
            for backend in args.backends:
                t = time.perf_counter()
                q = quantize(model, x, train.loader(128, shuffle=True, normalization=norm),
                             QuantizeOptions(backend=backend, mode="ptq", calibration_batches=16))
                quantize_s = time.perf_counter() - t
                path = Path(tmp) / f"{spec.replace(':', '_')}_{backend}.onnx"
                t = time.perf_counter()
                rep = export(q, x, path, float_model=model)
                export_s = time.perf_counter() - t
                torch_int8, _ = logits_of(q.graph_module, loader)
                ort = ort_logits(path, loader)
                top = [100.0 * float((z.argmax(1) == labels).mean()) for z in (fp32, torch_int8, ort)]
                agree = 100.0 * float((ort.argmax(1) == torch_int8.argmax(1)).mean())
                vs_fp32 = 100.0 * float((ort.argmax(1) == fp32.argmax(1)).mean())
                convs = sum(1 for c in rep.convs if c.op_type == "QLinearConv")
                rows.append((spec, what, backend, *top, vs_fp32, agree, convs, len(rep.convs), quantize_s,
                             export_s, rep.int8_bytes / 1024))
                load.append(os.getloadavg()[0])
                files[backend] = path
            ms = time_onnx(files, BenchOptions(batches=(1, 128), rounds=args.rounds, threads=args.threads))
            speed.append((spec, {k: {b: 1000 * s for b, s in v.items()} for k, v in ms.items()}))
            load.append(os.getloadavg()[0])
            print(f"done {spec}", file=sys.stderr, flush=True)
    print(f"# {started:%Y-%m-%d %H:%M}–{datetime.now(timezone.utc):%H:%M} UTC, {cpu_name()}, "
          f"{cpu_features().describe()}, {os.cpu_count()} cores, 1-min load average {min(load):.1f}–{max(load):.1f}, "
          f"torch {torch.__version__}, onnxruntime {onnxruntime.__version__}; PTQ (16 x 128 calibration "
          f"images), first {len(test)} CIFAR-10 test images")
    print("\n| model | backend | fp32 top-1 | PyTorch INT8 | ONNX INT8 (ORT) | ORT INT8 vs fp32 argmax "
          "| ORT vs PyTorch INT8 argmax | QLinearConv | quantize s | export s | INT8 file KiB |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for spec, what, backend, f32, tq, oq, vs_fp32, agree, qc, nc, qs, es, kib in rows:
        print(f"| {spec} ({what}) | {backend} | {f32:.2f} | {tq:.2f} | {oq:.2f} | {vs_fp32:.2f} % | {agree:.2f} % "
              f"| {qc}/{nc} | {qs:.1f} | {es:.1f} | {kib:.0f} |")
    print(f"\nonnxruntime, {args.threads} threads, median of {args.rounds} interleaved rounds, ms per batch:\n")
    print("| model | batch | fp32 | " + " | ".join(f"{b} INT8" for b in args.backends)
          + " | " + " | ".join(f"fp32/{b}" for b in args.backends) + " |")
    print("|---|---:|---:|" + "---:|" * (2 * len(args.backends)))
    for spec, ms in speed:
        for b in (1, 128):
            print(f"| {spec} | {b} | {ms['fp32'][b]:.2f} | " + " | ".join(f"{ms[k][b]:.2f}" for k in args.backends)
                  + " | " + " | ".join(f"{ms['fp32'][b] / ms[k][b]:.2f}x" for k in args.backends) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
