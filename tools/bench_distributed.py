"""Benchmark ``ehap_fx.distributed``: 1 process vs N gloo processes, side by side in one run.

For each world size (1 = plain ``estimate_hessian``/``finetune``, no process group), a fresh
set of processes (``torch.multiprocessing.spawn``, gloo on 127.0.0.1, one intra-op thread
each) builds the same model and data and times, after one warm-up call:

* ``hutchinson``: a fixed number of probes, split over the ranks (``shard="probes"``);
* ``ggn``: the exact GGN trace, its Hessian batch split over the ranks (``shard="data"``);
* ``finetune``: DDP fine-tuning steps over a sharded loader (each rank a batch of ``--batch``).

It prints wall and CPU seconds (the slowest rank; CPU time is what a rank would take with a
core of its own, the honest figure on a loaded machine), the speed-up over 1 process (for
fine-tuning in samples per second: N ranks train N batches per step), and the largest
relative difference of the mean traces from the 1-process estimate over the same probes and
data.

    python tools/bench_distributed.py --world 2            # ResNet-20, about a minute on 2 cores
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import socket
import tempfile
import time
from datetime import datetime, timezone

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ehap_fx.data import synthetic_cifar
from ehap_fx.distributed import shard_loader
from ehap_fx.isa import cpu_features
from ehap_fx.models import get_model
from ehap_fx.scoring.distributed import SEED_STRIDE, estimate_hessian_distributed
from ehap_fx.scoring.hessian import estimate_hessian
from ehap_fx.scoring.options import HessianOptions
from ehap_fx.train import FinetuneOptions, finetune


def _options(args) -> dict[str, HessianOptions]:
    base = HessianOptions(estimator="hutchinson", dtype="fp32", batch_size=args.hessian_batch,
                          probes=args.probes, progress=False)
    return {"hutchinson": base, "ggn": dataclasses.replace(base, estimator="ggn", probes=None)}


def _hessian_batch(args):
    return next(iter(synthetic_cifar(args.hessian_batch, seed=0).loader(args.hessian_batch)))


def _timed(fn):
    """((wall s, CPU s of this process), result) of the second call."""
    fn()  # warm-up
    t, c = time.perf_counter(), time.process_time()
    out = fn()
    return (time.perf_counter() - t, time.process_time() - c), out


def _measure(args) -> dict:
    torch.manual_seed(0)
    model = get_model(args.model)
    batch = _hessian_batch(args)
    out = {}
    for name, opts in _options(args).items():
        secs, res = _timed(lambda o=opts: estimate_hessian_distributed(model, batch, o))
        out[name] = (secs, res.probe_traces)
    data = synthetic_cifar(args.batch * args.steps * args.world, seed=1)
    loader = shard_loader(data.loader(args.batch, shuffle=True, seed=0))
    ft = FinetuneOptions(max_steps=args.steps, progress=False)
    secs, _ = _timed(lambda: finetune(get_model(args.model), loader, ft))
    out["finetune"] = (secs, None)
    return out


def _rank(r: int, world: int, port: int, args, path: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=r,
                            world_size=world)
    try:
        got = _measure(args)
        torch.save(got, os.path.join(path, f"rank{r}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _reference(args) -> dict:
    """The 1-process traces over the probes the N ranks drew (chunk r: seed r * SEED_STRIDE)."""
    torch.manual_seed(0)
    model = get_model(args.model)
    batch = _hessian_batch(args)
    opts = _options(args)
    share = [args.probes // args.world + (r < args.probes % args.world) for r in range(args.world)]
    chunks = [dataclasses.replace(opts["hutchinson"], probes=n, seed=r * SEED_STRIDE)
              for r, n in enumerate(share)]
    rows = torch.cat([estimate_hessian(model, batch, o).probe_traces for o in chunks])
    return {"hutchinson": rows, "ggn": estimate_hessian(model, batch, opts["ggn"]).probe_traces}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="resnet20")
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--probes", type=int, default=8)
    p.add_argument("--hessian-batch", type=int, default=64)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=4)
    args = p.parse_args()
    torch.set_num_threads(1)
    single = _measure(argparse.Namespace(**{**vars(args), "world": 1}))
    with tempfile.TemporaryDirectory() as path:
        mp.spawn(_rank, args=(args.world, _free_port(), args, path), nprocs=args.world, join=True)
        ranks = [torch.load(os.path.join(path, f"rank{r}.pt"), weights_only=False)
                 for r in range(args.world)]
    ref = _reference(args)
    print(f"# {args.model}, world {args.world} (gloo, 1 thread/rank), {cpu_features().describe()}, "
          f"{os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}, torch {torch.__version__}, "
          f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC")
    print(f"# hutchinson: {args.probes} probes, ggn: exact; Hessian batch {args.hessian_batch}; "
          f"finetune: {args.steps} steps of batch {args.batch} per rank")
    print(f"| part | 1 process wall s | {args.world} ranks wall s | speed-up (wall) "
          f"| 1 process CPU s | busiest rank CPU s | speed-up (CPU) | max rel. diff vs 1 process |")
    print("|---|---|---|---|---|---|---|---|")
    for name in ("hutchinson", "ggn", "finetune"):
        (one, one_cpu), many = single[name][0], max(r[name][0][0] for r in ranks)
        many_cpu = max(r[name][0][1] for r in ranks)
        work = args.world if name == "finetune" else 1  # DDP: world x the samples per step
        diff = "-"
        if name in ref:
            got = ranks[0][name][1].mean(0)
            want = ref[name].mean(0)
            diff = f"{float((got - want).abs().max() / want.abs().max()):.1e}"
        print(f"| {name} | {one:.2f} | {many:.2f} | {work * one / many:.2f}x | {one_cpu:.2f} "
              f"| {many_cpu:.2f} | {work * one_cpu / many_cpu:.2f}x | {diff} |")


if __name__ == "__main__":
    main()
