"""Does the per-conv latency table predict what the exported model measures? Wall vs kernel time.

``ehap_fx.latency.LatencyTable`` times each conv alone in a one-node ONNX model. Timed by the
wall, such a model also pays onnxruntime's layout transposes and its input/output copies
(proportional to the activations, absent inside a network); timed by the profiler's kernel
time (``latency.kernel_seconds``, the table since 2026-12-07) it does not. For fixed plans of
a model (channels only, blocks only, the recipe's ``both``, at ``--macs``), this prints each
table's predicted latency ratio next to the ratio measured on the exported INT8 files (PT2E
PTQ, timed interleaved in one run, median of per-round ratios and its 95 % interval):

    python tools/latency_table_check.py [--models resnet56 resnet32] [--macs 0.75 0.5] [--rounds 15]
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import tempfile
import time

import numpy as np
import torch
from ehap_fx.passes.cost import total_cost
from ehap_fx.passes.group import group_channels
from ehap_fx.passes.quantize import QuantizeOptions
from ehap_fx.passes.shrink import shrink
from ehap_fx.passes.trace import trace

from ehap_fx.isa import cpu_features
from ehap_fx.latency import BenchOptions, LatencyModel, LatencyOptions, LatencyTable, _conv_model, time_rounds
from ehap_fx.latency_loop import OnnxTimer, ratio_of
from ehap_fx.models import get_model
from ehap_fx.scoring import magnitude_scores
from ehap_fx.target import Target, measure, select_plan


class WallTable(LatencyTable):
    """The table as it was before 2026-12-07: the median wall time of the one-conv model."""

    def _measure(self, shape, cin, cout):
        import onnxruntime as ort

        o = self.options
        sess = ort.InferenceSession(_conv_model(shape, cin, cout, o.batch_size, o.precision).SerializeToString(),
                                    providers=["CPUExecutionProvider"])
        x = np.random.default_rng(0).integers(0, 255, (o.batch_size, cin, shape.height, shape.width)).astype(np.uint8)
        sess.run(None, {"x": x})
        times = []
        for _ in range(o.repeats):
            t = time.perf_counter()
            sess.run(None, {"x": x})
            times.append(time.perf_counter() - t)
        return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["resnet56"])
    p.add_argument("--macs", nargs="+", type=float, default=[0.75, 0.5])
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--rounds", type=int, default=15)
    args = p.parse_args()
    print(f"# {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC, {cpu_features().describe()}, "
          f"INT8 PT2E PTQ, onnxruntime default threads, batch {args.batch}, {args.rounds} interleaved rounds")
    print(f"| model | plan | MACs | wall table | kernel table | measured b{args.batch} [95 % CI] | measured b1 |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for name in args.models:
        torch.manual_seed(0)
        x = torch.randn(2, 3, 32, 32)
        gm = group_channels(trace(get_model(name).eval(), x)).graph_module
        scores = magnitude_scores(gm)
        opts = LatencyOptions(batch_size=args.batch, cache=None)
        models = {"wall": LatencyModel(gm, WallTable(opts)), "kernel": LatencyModel(gm, LatencyTable(opts))}
        plans = {f"{g} {m:g}": select_plan(gm, scores, Target(macs=m, granularity=g))
                 for m in args.macs for g in ("channel", "block", "both")}
        dense_cost = total_cost(gm).macs
        with tempfile.TemporaryDirectory() as folder:
            timer = OnnxTimer(x, BenchOptions(batches=(args.batch, 1)), quantize=QuantizeOptions(backend="pt2e"),
                              folder=folder)
            paths = {"dense": timer.onnx(gm, "dense")}
            small = {k: shrink(gm, plan).graph_module for k, plan in plans.items()}
            paths |= {k: timer.onnx(s, k.replace(" ", "_")) for k, s in small.items()}
            times = time_rounds(paths, BenchOptions(batches=(args.batch, 1), rounds=args.rounds))
        for k, plan in plans.items():
            pred = {t: measure(gm, Target(latency=1.0), plan, latency=m) / measure(gm, Target(latency=1.0), latency=m)
                    for t, m in models.items()}
            big, one = (ratio_of(b, times[k][b], times["dense"][b]) for b in (args.batch, 1))
            print(f"| {name} | {k} | {total_cost(small[k]).macs / dense_cost:.3f} | {pred['wall']:.3f} | "
                  f"{pred['kernel']:.3f} | {big.ratio:.3f} [{big.low:.3f}, {big.high:.3f}] | {one.ratio:.3f} |")


if __name__ == "__main__":
    main()
