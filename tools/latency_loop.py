"""Latency asked vs latency delivered: the per-conv table alone against the measured loop.

For each model and each ``--targets`` latency fraction (the recipe's granularity and rounding,
L1 ranking: latency does not depend on the weights, random init unless ``--pretrained``):

* ``table``: ``select_plan`` on the per-conv onnxruntime table alone (what ``--latency-loop-rounds 0``
  delivers), and
* ``loop``: ``latency_loop.deliver`` (plan, export INT8, time against dense INT8, correct),

then every INT8 file (dense, and both plans of every target) is timed in ONE interleaved
onnxruntime run at ``--batches`` (default 128 and 1): the ratio to dense INT8 is the median of
the per-round ratios with its 95 % bootstrap interval. Prints a markdown table and writes
``--out`` (JSON). Models: ``resnet56``, ``resnet32``, ``resnet20`` (CIFAR, 32×32) and any
torchvision classifier by name (``tv:mobilenet_v2``, ``tv:resnet18``; ``--tv-size`` input side);
``--capture export`` captures with torch.export; ``--backend`` quantizes with PT2E (the default,
as ``compress``) or torch.ao FX (which writes a dropped block's constant add as a 1x1 conv).

    nice -n 5 python tools/latency_loop.py --models resnet56 --targets 0.7 0.5 0.35 \\
        --out runs/latency_loop.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch
from ehap_fx.passes.cost import total_cost
from ehap_fx.passes.group import group_channels
from ehap_fx.passes.quantize import QuantizeOptions
from ehap_fx.passes.shrink import shrink
from ehap_fx.passes.trace import trace

from ehap_fx.compress import RECIPE
from ehap_fx.errors import TargetError
from ehap_fx.isa import cpu_features
from ehap_fx.latency import BenchOptions, LatencyModel, LatencyOptions, LatencyTable, OtherLoad, time_rounds
from ehap_fx.latency_loop import LoopOptions, OnnxTimer, deliver, ratio_of
from ehap_fx.models import get_model
from ehap_fx.scoring import magnitude_scores
from ehap_fx.target import select_plan


def build(name: str, tv_size: int) -> tuple[torch.nn.Module, torch.Tensor]:
    if name.startswith("tv:"):
        import torchvision

        return getattr(torchvision.models, name[3:])(num_classes=10).eval(), torch.randn(2, 3, tv_size, tv_size)
    return get_model(name).eval(), torch.randn(2, 3, 32, 32)


def run_model(name: str, args, folder: Path) -> dict:
    model, x = build(name, args.tv_size)
    t0 = time.perf_counter()
    gm = group_channels(trace(model, x, capture=args.capture)).graph_module
    table = LatencyTable(LatencyOptions(batch_size=args.batch))
    latency = LatencyModel(gm, table)
    scores = magnitude_scores(gm)
    quant = QuantizeOptions(mode="ptq", backend=args.backend)
    bench = BenchOptions(batches=(args.batch, 1), rounds=args.loop_rounds)
    options = LoopOptions(tolerance=args.tolerance, max_rounds=args.max_rounds, bench=bench)
    timer = OnnxTimer(x, bench, quantize=quant, folder=folder / "loop")
    plans, rows = {}, []
    for t in args.targets:
        target = RECIPE.target(latency=t)
        row = {"target": t}
        try:
            plans[f"table-{t}"] = select_plan(gm, scores, target, latency=latency)
            got = deliver(gm, scores, target, latency=latency, timer=timer, options=options, batch=args.batch)
        except TargetError as e:
            rows.append({**row, "error": str(e)})
            continue
        plans[f"loop-{t}"] = got.plan
        rep = got.report
        row |= {"status": rep.status, "message": rep.message, "rounds": len(rep.rounds),
                "loop_seconds": round(rep.seconds, 1),
                "goals": [round(r.goal, 4) for r in rep.rounds], "models": [r.model for r in rep.rounds],
                "predicted_rounds": [r.predicted for r in rep.rounds],
                "measured_rounds": [r.at(args.batch).ratio for r in rep.rounds],
                "predicted_table": rep.rounds[0].predicted, "predicted_loop": rep.delivered.predicted,
                "in_loop": {str(m.batch): [m.ratio, m.low, m.high] for m in rep.delivered.measured}}
        rows.append(row)
    table.save()
    if (loaded := table.load_summary()) is not None:
        print(f"{name}: {loaded}", flush=True)
    # every file in one interleaved run
    paths = {"dense": timer.onnx(gm, "final_dense")}
    macs = {}
    for key, plan in plans.items():
        small = shrink(gm, plan).graph_module
        macs[key] = total_cost(small).macs / total_cost(gm).macs
        paths[key] = timer.onnx(small, f"final_{key}")
    final = BenchOptions(batches=(args.batch, 1), rounds=args.final_rounds)
    with OtherLoad() as load:
        times = time_rounds(paths, final)
    for row in rows:
        for kind in ("table", "loop"):
            key = f"{kind}-{row['target']}"
            if key in paths:
                row[f"macs_{kind}"] = macs[key]
                row[f"final_{kind}"] = {str(b): vars(ratio_of(b, times[key][b], times["dense"][b]))
                                        for b in final.batches}
    return {"model": name, "capture": args.capture, "backend": args.backend, "rows": rows, "final_busy_cores": load.cores,
            "seconds": round(time.perf_counter() - t0),
            "dense_int8_ms": {str(b): 1000 * sorted(v)[len(v) // 2] for b, v in times["dense"].items()}}


def markdown(results: list[dict], batch: int) -> str:
    lines = [f"| model | target | plan | MACs | predicted | measured b{batch} [95 % CI] | measured b1 | loop |",
             "|---|---:|---|---:|---:|---:|---:|---|"]
    for res in results:
        for r in res["rows"]:
            if "error" in r:
                lines.append(f"| {res['model']} | {r['target']} | — | | | unreachable | | {r['error'][:60]} |")
                continue
            for kind in ("table", "loop"):
                f = r.get(f"final_{kind}")
                if f is None:
                    continue
                big, one = f[str(batch)], f["1"]
                pred = r["predicted_table"] if kind == "table" else r["predicted_loop"]
                loop = f"{r['status']}, {r['rounds']} rounds, {r['loop_seconds']:.0f} s" if kind == "loop" else ""
                lines.append(f"| {res['model']} | {r['target']} | {kind} | {r[f'macs_{kind}']:.3f} | {pred:.3f} | "
                             f"{big['ratio']:.3f} [{big['low']:.3f}, {big['high']:.3f}] | {one['ratio']:.3f} | {loop} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["resnet56"])
    p.add_argument("--targets", nargs="+", type=float, default=[0.7, 0.5, 0.35])
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--capture", choices=("fx", "export"), default="fx")
    p.add_argument("--backend", choices=("pt2e", "fx"), default="pt2e",
                   help="INT8 backend of every file (pt2e: compress's default; an export capture needs it)")
    p.add_argument("--tv-size", type=int, default=64)
    p.add_argument("--tolerance", type=float, default=0.1)
    p.add_argument("--max-rounds", type=int, default=4)
    p.add_argument("--loop-rounds", type=int, default=9, help="interleaved rounds per loop timing")
    p.add_argument("--final-rounds", type=int, default=15, help="interleaved rounds of the final timing")
    p.add_argument("--out", type=Path, default=Path("runs/latency_loop.json"))
    args = p.parse_args()
    torch.manual_seed(0)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            results.append(run_model(name, args, Path(tmp) / name.replace(":", "_")))
            print(markdown(results[-1:], args.batch), flush=True)
    meta = {"date": datetime.datetime.now().isoformat(timespec="minutes"), "isa": cpu_features().describe(),
            "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "load_average": os.getloadavg(), "args": {k: str(v) for k, v in vars(args).items()}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    print(f"\n{meta}\n")
    print(markdown(results, args.batch))


if __name__ == "__main__":
    main()
