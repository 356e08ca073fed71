"""Which ranking prunes a pretrained CIFAR ResNet best, one-shot, before any fine-tune?

For each scorer (L1, the paper's trace formula with the exact GGN trace, the removal
sensitivity of ``ehap_fx.scoring.removal``) and each selection (plain global ranking, or per unit of
MACs saved), prune the pretrained model to ``--macs`` with ``round_to=1``, re-estimate the BN
statistics on ``--recal-batches`` training batches (no gradient step), and report top-1 on the
first ``--test-limit`` test images, with the kept params and the stream widths. A cheap proxy
for "which ranking is worth fine-tuning"; ``tools/reproduce.py`` does the fine-tuned table.

    python tools/compare_rankings.py --model resnet56 --macs 0.5
"""

from __future__ import annotations

import argparse
import copy
import time
from dataclasses import replace
from pathlib import Path

import torch
from ehap_fx.passes.cost import total_cost
from ehap_fx.passes.group import group_channels, groups_of
from ehap_fx.passes.shrink import shrink
from ehap_fx.passes.trace import trace

from ehap_fx.data import load_cifar
from ehap_fx.models import normalization, pretrained_model
from ehap_fx.scoring import rank
from ehap_fx.scoring.options import HessianOptions
from ehap_fx.target import Target, select_plan
from ehap_fx.train import evaluate, recalibrate_bn

SHARED = Path(__file__).resolve().parents[2] / "shared"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="resnet56")
    p.add_argument("--macs", type=float, default=0.5)
    p.add_argument("--hessian-batch", type=int, default=256)
    p.add_argument("--recal-batches", type=int, default=20)
    p.add_argument("--test-limit", type=int, default=2000)
    p.add_argument("--data", type=Path, default=SHARED / "data")
    p.add_argument("--weights", type=Path, default=SHARED / "weights")
    p.add_argument("--threads", type=int)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    norm = normalization(args.model)
    train = load_cifar(args.data, split="train")
    test = load_cifar(args.data, split="test").head(args.test_limit).loader(500, normalization=norm)
    model = pretrained_model(args.model, args.weights)
    gm = group_channels(trace(copy.deepcopy(model), torch.zeros(2, 3, 32, 32))).graph_module
    groups = groups_of(gm).prunable
    batch = next(iter(train.loader(args.hessian_batch, shuffle=True, seed=123, normalization=norm)))
    opts = HessianOptions(dtype="fp32", batch_size=args.hessian_batch, progress=False)
    t = time.perf_counter()
    removal = rank(gm, batch, "removal", opts)
    t_removal = time.perf_counter() - t
    t = time.perf_counter()
    trace_scores = rank(gm, batch, "hessian", opts)
    t_trace = time.perf_counter() - t
    print(f"{args.model}, pretrained, dense top-1 {evaluate(gm, test):.2f} % on {args.test_limit} test "
          f"images; one Hessian batch of {args.hessian_batch} training images; removal "
          f"{t_removal:.1f} s, GGN trace {t_trace:.1f} s")
    streams = [g.id for g in groups if sum(m.role == "in" for m in g.members) > 1]
    print("\n| ranking | selection | MACs kept | params kept | stream widths | top-1 after BN re-estimation |")
    print("|---|---|---|---|---|---|")
    base = total_cost(gm)
    for name, ranking in (("L1", rank(gm, None, "l1")), ("exact GGN trace, paper formula", trace_scores),
                          ("removal ½δᵀGδ", removal)):
        for per_cost in (False, True):
            plan = select_plan(gm, replace(ranking, per_cost=per_cost), Target(macs=args.macs, round_to=1))
            small = shrink(gm, plan).graph_module
            recalibrate_bn(small, train.loader(128, shuffle=True, seed=1, normalization=norm),
                           args.recal_batches)
            cost = total_cost(small)
            widths = "/".join(str(len(plan.keep.get(g, range(groups_of(gm)[g].size)))) for g in streams)
            print(f"| {name} | {'per MAC' if per_cost else 'plain'} | {cost.macs / base.macs:.3f} | "
                  f"{cost.params / 1e3:.0f} K | {widths} | {evaluate(small, test):.2f} % |", flush=True)


if __name__ == "__main__":
    main()
