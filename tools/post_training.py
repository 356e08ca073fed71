"""Post-training pruning: the least-squares repair (``passes.compensate``) against BN
re-estimation and against nothing, no fine-tuning, no labels (issue #25).

For a pretrained CIFAR ResNet from ``--weights`` and each target, scorer and calibration seed:
``--images`` unlabelled training images (a seeded shuffle) rank the channels (``l1``, or the
removal criterion with labels drawn from the model's own softmax), the plan is shrunk, and the
pruned model is scored on every test image as it is (``pruned``), with its BatchNorm statistics
re-estimated on the calibration images (``+bn``), repaired (``+repair``) and repaired then
BN-re-estimated (``+repair+bn``). The repair's time and peak RSS increase are printed beside
one forward+backward pass of the dense model over the same calibration images (cross-entropy on
its own labels), timed in the same process: the ratio the issue bounds (≤ 3×).

    python tools/post_training.py --model resnet56 --targets macs=0.5 latency=0.5 \\
        --scorers l1 removal --seeds 0 1 [--images 512] [--granularity channel|both] [--round-to 8]
        [--json runs/post_training.json]

``--scorers obs removal+obs removal*obs``: the repair-aware selections of
``tools/obs_selection.py`` (issue #25, item 2) on the same plans.

``--resnet50``: the repair's time and memory on a torchvision ResNet-50 at 224 (random init,
``--images`` random inputs, an L1 plan at half the MACs), no accuracy.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import threading
import time
from dataclasses import replace
from pathlib import Path

import psutil
import torch
import torch.nn.functional as F
from ehap_fx.passes.compensate import CompensateOptions, compensate
from ehap_fx.passes.group import group_channels
from ehap_fx.passes.shrink import shrink
from ehap_fx.passes.trace import trace

from ehap_fx.compress import RECIPE
from ehap_fx.data import OwnLabels, load_cifar
from ehap_fx.errors import TargetError
from ehap_fx.latency import LatencyModel, LatencyOptions, LatencyTable
from ehap_fx.models import get_model, normalization, pretrained_model
from ehap_fx.scoring import HessianOptions, rank
from ehap_fx.target import select_plan
from ehap_fx.train import evaluate, recalibrate_bn


class PeakRss:
    """The peak resident memory of this process while the block runs, sampled every 10 ms."""

    def __init__(self):
        self.proc, self.peak, self.stop = psutil.Process(os.getpid()), 0, threading.Event()

    def _sample(self):
        while not self.stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(0.01)

    def __enter__(self):
        self.before = self.proc.memory_info().rss
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()

    @property
    def increase_mb(self) -> float:
        return (self.peak - self.before) / 2**20


def forward_backward_seconds(gm, batches) -> float:
    """One forward+backward over ``batches`` (cross-entropy on the model's own labels)."""
    model = copy.deepcopy(gm).train()
    t = time.perf_counter()
    for x, y in OwnLabels(batches, gm):
        F.cross_entropy(model(x), y).backward()
    return time.perf_counter() - t


def calibration(train, norm, images: int, seed: int) -> list[torch.Tensor]:
    out, seen = [], 0
    for x, _ in train.loader(128, shuffle=True, seed=seed, normalization=norm):
        out.append(x[: images - seen])
        seen += len(out[-1])
        if seen >= images:
            return out
    return out


def parse_target(text: str) -> dict:
    kind, value = text.split("=")
    return {kind: float(value)}


def run_model(args) -> list[dict]:
    model = pretrained_model(args.model, args.weights)
    norm = normalization(args.model)
    train = load_cifar(args.data, split="train")
    test = load_cifar(args.data, split="test").loader(500, normalization=norm, limit=args.test_images)
    gm = group_channels(trace(model.eval(), torch.randn(1, 3, 32, 32))).graph_module
    dense_top1 = args.dense if args.dense is not None else evaluate(gm, test)
    print(f"{args.model}: dense {dense_top1:.2f} % on {args.test_images or 10000} test images", flush=True)
    rows = []
    for seed in args.seeds:
        batches = calibration(train, norm, args.images, seed)
        fwd_bwd = forward_backward_seconds(gm, batches)
        for target_text in args.targets:
            target = replace(RECIPE.target(**parse_target(target_text)), granularity=args.granularity,
                             round_to=args.round_to)
            latency = (LatencyModel(gm, LatencyTable(LatencyOptions())) if target.kind == "latency" else None)
            for scorer in args.scorers:
                ranking = ranking_of(gm, batches, scorer)
                try:
                    plan = select_plan(gm, ranking, target, latency=latency)
                except TargetError as e:
                    print(f"| {args.model} | {target_text} | {scorer} | {seed} | unreachable: {e} |", flush=True)
                    continue
                row = evaluate_plan(gm, shrink(gm, plan).graph_module, batches, test, args)
                row.update(model=args.model, target=target_text, scorer=scorer, seed=seed, dense=dense_top1,
                           round_to=args.round_to,
                           fwd_bwd_s=round(fwd_bwd, 2), ratio=round(row["repair_s"] / fwd_bwd, 2))
                print(line(row), flush=True)
                rows.append(row)
    return rows


def ranking_of(gm, batches, scorer: str):
    """``l1``, ``removal`` (labels drawn from the model), or the OBS selections of
    ``tools/obs_selection.py``: ``obs``, ``removal+obs`` (OBS chooses within the removal
    criterion's counts), ``removal*obs`` (removal scores times the error fraction OBS leaves)."""
    import obs_selection as obs

    if scorer == "obs":
        return obs.obs_ranking(gm, batches)
    base = scorer.split("+")[0].split("*")[0]
    hessian = HessianOptions(batch_size=128, n_batches=len(batches), progress=False)
    ranking = rank(gm, OwnLabels(batches, gm), base, hessian)
    if scorer == "removal+obs":
        return replace(ranking, choose=obs.obs_ranking(gm, batches).choose)
    if scorer == "removal*obs":
        fraction = obs.repair_fraction(gm, batches)
        return replace(ranking, scores={k: v * fraction[k] for k, v in ranking.scores.items()}, whole=None)
    return ranking


def evaluate_plan(gm, small, batches, test, args) -> dict:
    labelled = [(x, None) for x in batches]
    bn = copy.deepcopy(small)
    recalibrate_bn(bn, labelled)
    with PeakRss() as rss:
        t = time.perf_counter()
        options = CompensateOptions(images=sum(len(x) for x in batches), mirror=args.flip, add_bias=args.add_bias,
                                    match=args.match,
                                    damping=args.damping, relu_rounds=args.relu_rounds, max_rows=args.max_rows)
        fixed = compensate(small, gm, batches, options)
        seconds = time.perf_counter() - t
    fixed = fixed.graph_module
    fixed_bn = copy.deepcopy(fixed)
    recalibrate_bn(fixed_bn, labelled)
    after_bn = evaluate(fixed_bn, test) if args.bn_after else float("nan")
    info = fixed.meta["ehap.compensation"].summary()
    return {"pruned": evaluate(small, test), "+bn": evaluate(bn, test), "+repair": evaluate(fixed, test),
            "+repair+bn": after_bn, "repair_s": round(seconds, 2),
            "repair_rss_mb": round(rss.increase_mb, 1), "layers": info["layers_repaired"],
            "accumulator_mb": round(info["accumulator_bytes"] / 2**20, 2)}


def line(r: dict) -> str:
    plan = r["scorer"] if r.get("round_to", 8) == 8 else f"{r['scorer']}, round_to {r['round_to']}"
    return (f"| {r['model']} | {r['target']} | {plan} | {r['seed']} | {r['pruned']:.2f} | {r['+bn']:.2f} | "
            f"**{r['+repair']:.2f}** | {r['+repair+bn']:.2f} | {r['dense'] - r['+repair']:.2f} | "
            f"{r['repair_s']:.0f} s | {r['fwd_bwd_s']:.0f} s | {r['ratio']:.2f}× | {r['repair_rss_mb']:.0f} MB |")


HEADER = ("| model | target | plan | seed | pruned | +BN | +repair | +repair+BN | dense − repair | repair | "
          "fwd+bwd | ratio | repair ΔRSS |\n|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")


def run_resnet50(args) -> list[dict]:
    import torchvision

    model = torchvision.models.resnet50().eval()
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(args.images, 3, 224, 224, generator=gen)
    batches = list(x.split(args.batch))
    gm = group_channels(trace(model, x[:1])).graph_module
    fwd_bwd = forward_backward_seconds(gm, batches)
    plan = select_plan(gm, rank(gm, None, "l1"), RECIPE.target(macs=0.5))
    small = shrink(gm, plan).graph_module
    with PeakRss() as rss:
        t = time.perf_counter()
        fixed = compensate(small, gm, batches, CompensateOptions(images=args.images)).graph_module
        seconds = time.perf_counter() - t
    info = fixed.meta["ehap.compensation"].summary()
    row = {"model": "resnet50@224", "images": args.images, "repair_s": round(seconds, 2), "fwd_bwd_s":
           round(fwd_bwd, 2), "ratio": round(seconds / fwd_bwd, 2), "repair_rss_mb": round(rss.increase_mb, 1),
           "accumulator_mb": round(info["accumulator_bytes"] / 2**20, 2), "layers": info["layers_repaired"]}
    print(row, flush=True)
    return [row]


def run_cost(args) -> list[dict]:
    """The repair's cost side by side in one process: ``--model``'s 0.5-MACs L1 plan
    (``--round-to``), ``--images`` Gaussian inputs in batches of 128, each ``relu_rounds`` ×
    ``max_rows`` setting timed in turn, against one forward+backward over the same inputs."""
    gm = group_channels(trace(get_model(args.model).eval(), torch.randn(1, 3, 32, 32))).graph_module
    target = replace(RECIPE.target(macs=0.5), granularity="channel", round_to=args.round_to)
    small = shrink(gm, select_plan(gm, rank(gm, None, "l1"), target))
    x = list(torch.randn(args.images, 3, 32, 32, generator=torch.Generator().manual_seed(0)).split(128))
    fwd_bwd = forward_backward_seconds(gm, x)
    rows = []
    print("| relu_rounds | max_rows | repair | fwd+bwd | ratio |\n|---:|---:|---:|---:|---:|", flush=True)
    for max_rows in (32768, 8192, 4096):
        for relu_rounds in (0, 3):
            t = time.perf_counter()
            compensate(small.graph_module, gm, x, CompensateOptions(relu_rounds=relu_rounds, max_rows=max_rows))
            row = {"relu_rounds": relu_rounds, "max_rows": max_rows, "repair_s": round(time.perf_counter() - t, 2),
                   "fwd_bwd_s": round(fwd_bwd, 2)}
            row["ratio"] = round(row["repair_s"] / fwd_bwd, 2)
            print(f"| {relu_rounds} | {max_rows} | {row['repair_s']:.1f} s | {fwd_bwd:.1f} s | {row['ratio']:.2f}× |",
                  flush=True)
            rows.append(row)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="resnet56")
    p.add_argument("--data", default="../shared/data")
    p.add_argument("--weights", default="../shared/weights")
    p.add_argument("--targets", nargs="+", default=["macs=0.5"])
    p.add_argument("--scorers", nargs="+", default=["l1", "removal"],
                   choices=("l1", "removal", "obs", "removal+obs", "removal*obs"))
    p.add_argument("--round-to", type=int, default=RECIPE.round_to, help="kept widths' multiple")
    p.add_argument("--granularity", default="channel",
                   help="what may go (default channel: the issue's probe; the recipe's is both)")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    p.add_argument("--images", type=int, default=512)
    p.add_argument("--batch", type=int, default=16, help="ResNet-50: images per batch")
    p.add_argument("--test-images", type=int, help="first N test images (default: all)")
    p.add_argument("--add-bias", action=argparse.BooleanOptionalAction, default=CompensateOptions().add_bias)
    p.add_argument("--match", choices=("block", "layer"), default=CompensateOptions().match)
    p.add_argument("--damping", type=float, default=CompensateOptions().damping,
                   help="the repair's damping, a fraction of mean(diag H)")
    p.add_argument("--max-rows", type=int, default=CompensateOptions().max_rows,
                   help="rows of X per batch and layer (im2col positions sampled beyond)")
    p.add_argument("--relu-rounds", type=int, default=CompensateOptions().relu_rounds,
                   help="EM rounds that free the fit from entries a following ReLU zeroes anyway")
    p.add_argument("--flip", action="store_true",
                   help="the repair also sees each calibration image mirrored (the same images, two views)")
    p.add_argument("--threads", type=int)
    p.add_argument("--bn-after", action="store_true", help="also score the repaired model BN-re-estimated")
    p.add_argument("--dense", type=float, help="the dense top-1, measured before (skips scoring it)")
    p.add_argument("--resnet50", action="store_true")
    p.add_argument("--cost", action="store_true", help="time the repair's settings side by side (Gaussian inputs)")
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if not (args.resnet50 or args.cost):
        print(HEADER, flush=True)
    rows = run_resnet50(args) if args.resnet50 else run_cost(args) if args.cost else run_model(args)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows},
                                        indent=1))


if __name__ == "__main__":
    main()
