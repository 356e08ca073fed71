"""onnxruntime CPU speed of dense vs pruned, fp32 vs INT8 ResNet-56, side by side in one run.

Builds, from the pretrained ResNet-56 (``../shared/weights``; random init when absent):

* dense fp32, dense INT8 (PTQ, or ``--qat-steps`` of QAT),
* pruned fp32 / INT8 for each ``--round-to``: ``trace -> group_channels -> select_plan``
  (L1 magnitude or ``--scorer removal``, ``Target(macs=--macs, round_to=...)``) ``-> shrink``, optionally
  fine-tuned (``--finetune-steps``) before quantization; with ``--granularity block`` also
  a depth-pruned one (whole residual blocks dropped, ``Target(granularity="block")``).

Then times every ONNX file in onnxruntime (``--threads`` intra-op threads) at batch 1 and
``--batch``, the models interleaved round by round so machine noise hits all alike, and prints
median latency, throughput and the ratio to dense fp32; then, for each INT8 model, which
convs onnxruntime runs as QLinearConv and their channel counts; with CIFAR-10 test top-1 of
every model (in onnxruntime) when ``../shared/data`` is present.

    python tools/bench_onnx.py [--rounds 20] [--round-to 8 16] [--granularity channel block]
                               [--macs 0.5] [--scorer l1|removal] [--profile] [--out DIR]
    python tools/bench_onnx.py --pipeline --rounds 3   # FX vs PT2E quantization step times

``--capture fx export`` also prunes a ``torch.export`` capture of the model under the same
plan (``passes.program.plan_for``) and quantizes it with PT2E (``pruned r16 export ...``).
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from ehap_fx.passes.cost import total_cost
from ehap_fx.passes.export import ExportReport, export, export_onnx, onnx_top1
from ehap_fx.passes.group import group_channels
from ehap_fx.passes.program import kept_outputs, plan_for
from ehap_fx.passes.quantize import QAT_FINETUNE, QuantizeOptions, QuantizeResult
from ehap_fx.passes.shrink import shrink
from ehap_fx.passes.trace import trace

from ehap_fx import _meta
from ehap_fx.errors import TargetError
from ehap_fx.isa import cpu_features
from ehap_fx.latency import BenchOptions, time_onnx
from ehap_fx.models import get_model, normalization, pretrained_model
from ehap_fx.qat import quantize_int8
from ehap_fx.scoring import Ranking, rank
from ehap_fx.scoring.options import HessianOptions
from ehap_fx.target import Target, select_plan
from ehap_fx.train import FinetuneOptions, finetune

SHARED = Path(__file__).resolve().parents[2] / "shared"
X = torch.randn(2, 3, 32, 32)


@dataclass
class Entry:
    name: str
    path: Path
    macs: int
    report: ExportReport | None = None
    top1: float | None = None


def load_data(data_dir: Path):
    from ehap_fx.data import load_cifar, synthetic_cifar

    if (data_dir / "cifar-10-batches-py" / "test_batch").exists():
        return load_cifar(data_dir, split="train"), load_cifar(data_dir, split="test")
    print(f"CIFAR-10 not found under {data_dir}: SYNTHETIC data for calibration, no accuracy")
    return synthetic_cifar(2048, seed=0), None


def base_model(weights_dir: Path):
    try:
        return pretrained_model("resnet56", weights_dir), "pretrained"
    except Exception as e:  # no weights: still a valid speed benchmark
        print(f"pretrained ResNet-56 unavailable ({e}); RANDOM weights (speed only)")
        return get_model("resnet56").eval(), "random"


def ranking(gm, train, args, norm) -> Ranking:
    """The ranking of ``--scorer``: L1, or the removal criterion (``ehap_fx.scoring.removal``, bf16, on
    ``--hessian-batch`` training images)."""
    batch = next(iter(train.loader(args.hessian_batch, shuffle=True, normalization=norm)))
    opts = HessianOptions(dtype="bf16", batch_size=args.hessian_batch, progress=False)
    return rank(gm, batch, args.scorer, opts)


def pruned_model(gm, target: Target, scores: Ranking, train, args, norm):
    plan = select_plan(gm, scores, target)
    small = shrink(gm, plan).graph_module
    if args.finetune_steps:
        finetune(
            small,
            train.loader(128, shuffle=True, augment=True, normalization=norm),
            FinetuneOptions(max_steps=args.finetune_steps, lr=0.01, progress=False),
        )
    return small.eval()


def int8(model, train, args, norm, path: Path, inputs, backend: str) -> ExportReport:
    mode = "qat" if args.qat_steps else "ptq"
    opts = QuantizeOptions(
        backend=backend,
        mode=mode,
        finetune=replace(QAT_FINETUNE, max_steps=args.qat_steps or None),
        calibration_batches=args.calibration_batches,
    )
    loader = train.loader(128, shuffle=True, augment=mode == "qat", normalization=norm)
    q = quantize_int8(model, X, loader, opts)
    return export(q, X, path, inputs=inputs)


def export_captured(exported, gm, small, label: str, train, args, norm, out: Path, inputs) -> list[Entry]:
    """The torch.export capture pruned under the plan that made ``small`` from ``gm``
    (``plan_for``: the same kept channels), fine-tuned alike, in fp32 and PT2E INT8."""
    plan = plan_for(exported, kept_outputs(gm, small.meta[_meta.PLAN]))
    small_e = shrink(exported, plan).graph_module
    if args.finetune_steps:
        finetune(
            small_e,
            train.loader(128, shuffle=True, augment=True, normalization=norm),
            FinetuneOptions(max_steps=args.finetune_steps, lr=0.01, progress=False),
        )
    small_e.eval()
    macs, name = total_cost(small_e).macs, f"pruned {label} export"
    fp32 = export_onnx(small_e, X, out / f"pruned_{label}_export_fp32.onnx", dynamo=True)
    path = out / f"pruned_{label}_export_int8_pt2e.onnx"
    report = int8(small_e, train, args, norm, path, inputs, "pt2e")
    return [Entry(f"{name} fp32", fp32, macs), Entry(f"{name} int8 pt2e", path, macs, report)]


def time_models(entries: list[Entry], batch: int, rounds: int, threads: int) -> dict:
    """Median seconds per run for each entry and batch size, interleaved across entries."""
    med = time_onnx({e.name: e.path for e in entries}, BenchOptions((1, batch), rounds, threads))
    return {(name, b): s for name, per in med.items() for b, s in per.items()}


def print_table(entries: list[Entry], med: dict, batch: int) -> None:
    base1, baseb = med[(entries[0].name, 1)], med[(entries[0].name, batch)]
    dense_macs = entries[0].macs
    print(
        f"\n| model | MACs | top-1 % | b=1 ms | b=1 speed-up | b={batch} ms | img/s | "
        f"b={batch} speed-up | QLinearConv |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for e in entries:
        l1, lb = med[(e.name, 1)], med[(e.name, batch)]
        top1 = f"{e.top1:.2f}" if e.top1 is not None else "n/a"
        convs = f"{sum(c.quantized for c in e.report.convs)}/{len(e.report.convs)}" if e.report else "-"
        print(
            f"| {e.name} | {e.macs / dense_macs:.2f} | {top1} | {1e3 * l1:.2f} | "
            f"{base1 / l1:.2f}x | {1e3 * lb:.1f} | {batch / lb:.0f} | {baseb / lb:.2f}x | "
            f"{convs} |"
        )


def print_profile(entries: list[Entry], batch: int, threads: int, runs: int = 5) -> None:
    """Share of onnxruntime kernel time per op type, for each INT8 model (ORT's profiler)."""
    import collections
    import json

    import onnxruntime as ort

    x = np.random.default_rng(0).standard_normal((batch, 3, 32, 32), np.float32)
    for e in entries:
        if e.report is None:
            continue
        so = ort.SessionOptions()
        so.enable_profiling, so.intra_op_num_threads = True, threads
        so.profile_file_prefix = str(Path(tempfile.gettempdir()) / "ehap_bench_onnx_profile")
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        s = ort.InferenceSession(str(e.path), so, providers=["CPUExecutionProvider"])
        for _ in range(runs):
            s.run(None, {"input": x})
        profile = Path(s.end_profiling())
        events = json.loads(profile.read_text())
        profile.unlink()
        per_op = collections.Counter()
        for ev in events:
            if ev.get("cat") == "Node" and ev["name"].endswith("_kernel_time"):
                per_op[ev["args"]["op_name"]] += ev["dur"]
        total = sum(per_op.values())
        shares = ", ".join(f"{op} {100 * t / total:.1f}%" for op, t in per_op.most_common(6))
        print(f"\nORT kernel time, {e.name}, batch {batch}, {threads} thread(s): "
              f"{total / runs / 1e3:.1f} ms/run; {shares}")


def print_convs(entries: list[Entry]) -> None:
    for e in entries:
        if e.report is None:
            continue
        print(f"\nper-conv kernels, {e.name}:")
        widths = [
            f"{c.in_channels}->{c.out_channels}{'' if c.quantized else '(' + c.op_type + ')'}"
            for c in e.report.convs
        ]
        for i in range(0, len(widths), 12):
            print("  " + " ".join(widths[i : i + 12]))


def bench_pipeline(args) -> None:
    """Seconds of each quantization step, FX vs PT2E, on ResNet-20 (QAT), in one run."""
    from ehap_fx.passes.quantize import convert, prepare

    from ehap_fx.data import synthetic_cifar
    from ehap_fx.qat import qat_finetune

    data = synthetic_cifar(512, seed=0).loader(32, shuffle=True)
    out = args.out or Path(tempfile.mkdtemp(prefix="bench_pipeline_"))
    out.mkdir(parents=True, exist_ok=True)
    steps, reports = {b: {} for b in ("fx", "pt2e")}, {}
    for _ in range(args.rounds):
        for b in steps:
            opts = QuantizeOptions(mode="qat", backend=b, finetune=replace(QAT_FINETUNE, max_steps=4))
            t = time.perf_counter()
            p = prepare(get_model("resnet20"), X, opts)
            t1 = time.perf_counter()
            qat_finetune(p, data, opts)
            t2 = time.perf_counter()
            q = convert(p, opts)
            t3 = time.perf_counter()
            with torch.no_grad():
                q(torch.randn(512, 3, 32, 32))
            t4 = time.perf_counter()
            result = QuantizeResult(q, b, "qat")
            reports[b] = export(result, X, out / f"pipeline_resnet20_{b}.onnx")
            t5 = time.perf_counter()
            for k, v in {
                "prepare": t1 - t,
                "4 QAT steps (batch 32)": t2 - t1,
                "convert": t3 - t2,
                "PyTorch INT8, 512 images": t4 - t3,
                "ONNX export + ORT graph check": t5 - t4,
            }.items():
                steps[b].setdefault(k, []).append(v)
    print(
        f"\nResNet-20 QAT pipeline, median of {args.rounds} interleaved rounds, "
        f"{max(args.threads)} threads, {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC"
    )
    print("| step | fx s | pt2e s | pt2e / fx |\n|---|---|---|---|")
    for k in steps["fx"]:
        fx, pt = statistics.median(steps["fx"][k]), statistics.median(steps["pt2e"][k])
        print(f"| {k} | {fx:.2f} | {pt:.2f} | {pt / fx:.1f}x |")
    entries = [Entry(f"resnet20 int8 {b}", r.path, 0, r) for b, r in reports.items()]
    med = time_models(entries, args.batch, max(args.rounds, 5), max(args.threads))
    print(f"\nonnxruntime, same ResNet-20 QAT graph from each backend ({max(args.threads)} threads)")
    print(f"| backend | QLinearConv | b=1 ms | b={args.batch} ms | b={args.batch} fx/backend |")
    print("|---|---|---|---|---|")
    for e in entries:
        lb = med[(e.name, args.batch)]
        print(
            f"| {e.name} | {sum(c.quantized for c in e.report.convs)}/{len(e.report.convs)} | "
            f"{1e3 * med[(e.name, 1)]:.2f} | {1e3 * lb:.1f} | "
            f"{med[(entries[0].name, args.batch)] / lb:.2f}x |"
        )


def variants(args) -> list[tuple[str, Target]]:
    """The pruned models to build: one per ``--round-to`` (channel), one depth-pruned (block)."""
    out = []
    if "channel" in args.granularity:
        out += [(f"r{r}", Target(macs=args.macs, round_to=r)) for r in args.round_to]
    if "block" in args.granularity:
        out.append(("blocks", Target(macs=args.macs, granularity="block")))
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--threads", type=int, nargs="+", default=[2], help="one table per thread count")
    ap.add_argument("--macs", type=float, default=0.5)
    ap.add_argument("--round-to", type=int, nargs="+", default=[8, 16])
    ap.add_argument(
        "--granularity",
        nargs="+",
        choices=("channel", "block"),
        default=["channel"],
        help="channel: one pruned model per --round-to; block: one depth-pruned model",
    )
    ap.add_argument("--backend", choices=("fx", "pt2e"), nargs="+", default=["fx"])
    ap.add_argument(
        "--capture",
        choices=("fx", "export"),
        nargs="+",
        default=["fx"],
        help="export: also the torch.export capture pruned under the same plan (INT8 by PT2E)",
    )
    ap.add_argument("--qat-steps", type=int, default=0, help="0: post-training quantization")
    ap.add_argument("--calibration-batches", type=int, default=16)
    ap.add_argument("--finetune-steps", type=int, default=0)
    ap.add_argument(
        "--scorer",
        choices=("l1", "removal"),
        default="l1",
        help="ranking of the pruned models: L1 magnitude, or the removal criterion",
    )
    ap.add_argument("--hessian-batch", type=int, default=256, help="images for --scorer removal")
    ap.add_argument("--data", type=Path, default=SHARED / "data")
    ap.add_argument("--weights", type=Path, default=SHARED / "weights")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--test-limit", type=int, default=None, help="score only the first N test images")
    ap.add_argument("--pipeline", action="store_true", help="only time the FX vs PT2E QAT steps")
    ap.add_argument("--profile", action="store_true", help="per-op share of ORT time of each INT8 model")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    torch.set_num_threads(max(args.threads))
    if args.pipeline:
        return bench_pipeline(args)
    out = args.out or Path(tempfile.mkdtemp(prefix="bench_onnx_"))
    out.mkdir(parents=True, exist_ok=True)
    train, test = load_data(args.data)
    if test is not None and args.test_limit:
        test = test.head(args.test_limit)
    model, source = base_model(args.weights)
    norm = normalization("resnet56")
    inputs = next(iter((test or train).loader(512, normalization=norm)))[0]
    gm = group_channels(trace(model, X)).graph_module
    entries = [
        Entry("dense fp32", export_onnx(model, X, out / "dense_fp32.onnx", dynamo=False), total_cost(gm).macs)
    ]
    for b in args.backend:
        path = out / f"dense_int8_{b}.onnx"
        entries.append(
            Entry(f"dense int8 {b}", path, entries[0].macs, int8(gm, train, args, norm, path, inputs, b))
        )
    scores = ranking(gm, train, args, norm)
    exported = None
    if "export" in args.capture:
        exported = group_channels(trace(model, X, capture="export")).graph_module
    for label, target in variants(args):
        try:
            small = pruned_model(gm, target, scores, train, args, norm)
        except TargetError as e:
            print(f"skipping {label}: {e}")
            continue
        if exported is not None:
            entries += export_captured(exported, gm, small, label, train, args, norm, out, inputs)
        macs = total_cost(small).macs
        entries.append(
            Entry(
                f"pruned {label} fp32",
                export_onnx(small, X, out / f"pruned_{label}_fp32.onnx", dynamo=False),
                macs,
            )
        )
        for b in args.backend:
            path = out / f"pruned_{label}_int8_{b}.onnx"
            entries.append(
                Entry(f"pruned {label} int8 {b}", path, macs, int8(small, train, args, norm, path, inputs, b))
            )
    if test is not None:
        for e in entries:
            e.top1 = onnx_top1(e.path, test.loader(500, normalization=norm), threads=max(args.threads))
    report(entries, args, source, len(test) if test is not None else 0)
    print(f"\nONNX files in {out}")


def report(entries: list[Entry], args, source: str, n_test: int) -> None:
    """One timing table per thread count, then per-conv kernels, profiles and export summaries."""
    quant = f"{'/'.join(args.backend)} {f'QAT {args.qat_steps} steps' if args.qat_steps else 'PTQ'}"
    for threads in args.threads:
        med = time_models(entries, args.batch, args.rounds, threads)
        print(
            f"\n{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, "
            f"{cpu_features().describe()}, {os.cpu_count()} CPUs visible, "
            f"onnxruntime {__import__('onnxruntime').__version__}, {threads} thread(s); "
            f"ResNet-56 ({source} weights), INT8 = {quant}, pruned = {args.scorer} select_plan to "
            f"{args.macs} MACs (fine-tune {args.finetune_steps} steps); median of {args.rounds} "
            f"interleaved rounds; speed-up = dense fp32 latency / model latency; top-1 on "
            f"{n_test} CIFAR-10 test images (onnxruntime)"
        )
        print_table(entries, med, args.batch)
    print_convs(entries)
    if args.profile:
        print_profile(entries, args.batch, max(args.threads))
    for e in entries:
        if e.report is not None:
            print(f"\n{e.name}: {e.report.summary()}")


if __name__ == "__main__":
    main()
