"""What a dropped block's per-channel constant costs in onnxruntime, tiled or not, in one run.

A residual block dropped by ``passes.shrink`` leaves ``relu(x + c)``, ``c`` a ``[1, C, 1, 1]``
constant (its BN's shift). onnxruntime runs a QDQ INT8 graph channels-last, where that
constant broadcasts along the innermost axis; ``passes.export.tile_channel_constants`` writes
it as ``[1, C, H, W]`` instead. This builds ResNet-56 (random init: latency does not depend on
the weights) with the blocks the README job's plan dropped (``--drop``), quantizes it with PT2E
PTQ, exports it (tiled, as ``export`` writes it) and an untiled twin (the same file with the
constants cut back to ``[1, C, 1, 1]``), and times dense INT8, untiled and tiled interleaved
(``latency.time_rounds``), printing each one's median, its ratio to dense INT8 and what
onnxruntime's profiler puts in ``QLinearAdd``.

    python tools/bench_broadcast.py [--rounds 15] [--drop layer1.0 layer1.1 ...]
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import tempfile
from pathlib import Path

import numpy as np
import onnx
import torch
from ehap_fx.passes.depth import droppable_groups
from ehap_fx.passes.export import export_onnx
from ehap_fx.passes.group import group_channels, groups_of
from ehap_fx.passes.quantize import QuantizeOptions
from ehap_fx.passes.shrink import PrunePlan, shrink
from ehap_fx.passes.trace import trace
from onnx import numpy_helper

from ehap_fx.isa import cpu_features
from ehap_fx.latency import BenchOptions, time_rounds
from ehap_fx.models import get_model
from ehap_fx.qat import quantize_int8

# the blocks of ResNet-56 that the README job's 0.5-latency plan dropped on 2026-12-07
README_PLAN = ("layer1.0", "layer1.1", "layer1.2", "layer1.3", "layer1.5", "layer1.8")


def untiled(path: Path, out: Path) -> int:
    """``path`` with every tiled ``[1, C, H, W]`` constant of an Add cut back to ``[1, C, 1, 1]``."""
    model = onnx.load(str(path))
    init = {t.name: t for t in model.graph.initializer}
    dq = {n.output[0]: n.input[0] for n in model.graph.node if n.op_type == "DequantizeLinear"}
    cut = 0
    for node in model.graph.node:
        for name in (dq.get(i) for i in node.input if node.op_type == "Add"):
            if name in init and len(init[name].dims) == 4 and init[name].dims[0] == 1 and init[name].dims[2] > 1:
                a = numpy_helper.to_array(init[name])
                assert (a == a[:, :, :1, :1]).all(), f"{name} is not a tiled per-channel constant"
                init[name].CopyFrom(numpy_helper.from_array(np.ascontiguousarray(a[:, :, :1, :1]), name))
                cut += 1
    onnx.save(model, str(out))
    return cut


def add_milliseconds(path: Path, batch: int, runs: int = 10) -> float:
    """Milliseconds per run in QLinearAdd kernels, from onnxruntime's profiler."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.enable_profiling = True
    so.profile_file_prefix = str(path.with_suffix(""))
    s = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal((batch, 3, 32, 32), dtype=np.float32)
    for _ in range(runs):
        s.run(None, {s.get_inputs()[0].name: x})
    events = json.loads(Path(s.end_profiling()).read_text())
    total = sum(e["dur"] for e in events if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")
                and e["args"].get("op_name") == "QLinearAdd")
    return total / runs / 1000


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--drop", nargs="+", default=list(README_PLAN), help="ResNet-56 blocks to drop")
    args = p.parse_args()

    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32)
    dense = group_channels(trace(get_model("resnet56").eval(), x)).graph_module
    inner = {}
    for g in droppable_groups(dense):
        (owner,) = [m.module for m in groups_of(dense)[g].members if m.role == "out"]
        inner[owner.rsplit(".", 1)[0]] = g
    small = shrink(dense, PrunePlan({inner[b]: () for b in args.drop})).graph_module
    calib = [(torch.randn(16, 3, 32, 32), torch.zeros(16, dtype=torch.long)) for _ in range(2)]
    q = QuantizeOptions(mode="ptq", backend="pt2e", calibration_batches=2)
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        files = {"dense INT8": export_onnx(quantize_int8(dense, x, calib, q).graph_module, x, d / "dense.onnx", dynamo=True),
                 "tiled": export_onnx(quantize_int8(small, x, calib, q).graph_module, x, d / "tiled.onnx", dynamo=True)}
        files["untiled"] = d / "untiled.onnx"
        cut = untiled(files["tiled"], files["untiled"])
        times = time_rounds(files, BenchOptions(batches=(args.batch, 1), rounds=args.rounds))
        adds = {name: add_milliseconds(f, args.batch) for name, f in files.items()}
    print(f"# {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC, {cpu_features().describe()}, "
          f"onnxruntime default threads, {args.rounds} interleaved rounds")
    print(f"# ResNet-56 with {len(args.drop)} blocks dropped ({', '.join(args.drop)}); {cut} tiled constant initializer(s), shared by the blocks whose constants are equal")
    print(f"| model | b{args.batch} ms | / dense INT8 | b1 ms | / dense INT8 | QLinearAdd ms (b{args.batch}) |")
    print("|---|---:|---:|---:|---:|---:|")
    for name in files:
        ratio = {b: statistics.median(np.divide(times[name][b], times["dense INT8"][b])) for b in (args.batch, 1)}
        ms = {b: 1000 * statistics.median(times[name][b]) for b in (args.batch, 1)}
        print(f"| {name} | {ms[args.batch]:.2f} | {ratio[args.batch]:.3f} | {ms[1]:.3f} | {ratio[1]:.3f} | "
              f"{adds[name]:.2f} |")


if __name__ == "__main__":
    main()
