"""Reproduce the EHAP table: Hessian pruning in fp32 vs half precision vs L1, fine-tune, INT8, ONNX.

For each model, MACs target and scorer, every stage is evaluated on the test set and cached:

    dense (pretrained) → dense fine-tuned (same budget as the pruned models) → dense INT8 ONNX
    rank (Hessian fp32 / half, or L1) → prune (before fine-tune) → fine-tune → INT8 → ONNX

Scorers: ``hessian-fp32`` / ``hessian-half`` (the paper's Hutchinson estimator; half is fp16 on
CUDA, bf16 on a CPU), ``ggn-fp32`` / ``ggn-half`` (the exact Gauss-Newton trace in the same
formula), ``removal-fp32`` / ``removal-half`` (``ehap_fx.scoring.removal``: the exact Gauss-Newton loss
increase of removing each channel, ranked per MAC saved), ``l1`` (the magnitude control).
A ranking does not depend on the target, so one Hessian per scorer
serves all targets (one-shot pruning). Each Hessian runs in a fresh subprocess so that its
peak memory (CUDA ``max_memory_allocated``, or the peak RSS on a CPU, also given as growth over
the RSS after setup) belongs to that precision alone.

Resumable: a stage is done when its ``metrics.json`` exists (with its checkpoint next to it),
so an interrupted run picks up where it stopped. Layout, keyed by what each stage depends on::

    --out/<dataset>-<rank hash>/<model>/dense, rank-<scorer>, <scorer>-<target>/pruned
    --out/<dataset>-<rank hash>/<model>/ft-<budget hash>/dense-ft, dense-int8, <scorer>-<target>/{ft,int8}
    --out/<dataset>-<rank hash>/results-<budget hash>.{json,md}
 ``--quick`` runs tiny budgets on a slice of the
shared CIFAR-10 (synthetic data when absent) in a few minutes.

    python tools/reproduce.py --quick
    python tools/reproduce.py --models resnet56 --targets 0.5 --scorers hessian-fp32 hessian-half l1
    python tools/reproduce.py --long --device cuda      # the GPU budget
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import subprocess
import sys
import time
from dataclasses import asdict, replace
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from ehap_fx.passes.cost import total_cost
from ehap_fx.passes.export import INPUT, ExportOptions, export, onnx_top1, session
from ehap_fx.passes.group import groups_of
from ehap_fx.passes.quantize import QAT_FINETUNE, QuantizeOptions
from ehap_fx.passes.shrink import PrunePlan, shrink
from reproduce_parts import (  # noqa: E402  (tools/ is on sys.path when run as a script)
    DEFAULT_SCORERS,
    LONG,
    MODELS,
    QUICK,
    QUICK_TARGETS,
    ROOT,
    SCORERS,
    SHARED,
    TARGETS,
    Budget,
    Data,
    ReproduceError,
    Variant,
    _to,
    dense_model,
    example_input,
    grouped,
    hessian_batch,
    hessian_options,
    load_data,
    merge_rows,
    rank_worker,
    scorer_of,
    stage,
    table,
    test_loader,
    train_loader,
    variant_of,
)
from scipy.stats import spearmanr
from tqdm.auto import tqdm

from ehap_fx.compress import prune
from ehap_fx.isa import cpu_features
from ehap_fx.models import NUM_CLASSES
from ehap_fx.qat import quantize_int8
from ehap_fx.scoring import Ranking, magnitude_scores, rank
from ehap_fx.scoring.removal import joint_order
from ehap_fx.target import Target
from ehap_fx.train import FinetuneOptions, evaluate, finetune, recalibrate_bn

# ---------------------------------------------------------------------------------------------
# Stages
# ---------------------------------------------------------------------------------------------


class Run:
    """One model on one budget: the stages, with their cache folders."""

    def __init__(self, name: str, budget: Budget, data: Data, data_root: Path, weights: Path | None,
                 out: Path, log):
        self.name, self.budget, self.data, self.data_root, self.log = name, budget, data, data_root, log
        self.dir = out / budget.rank_key() / name  # dense, rank-*, */pruned
        self.ft_dir = self.dir / f"ft-{budget.key()}"  # dense-ft, dense-int8, */ft, */int8
        self.model, self.origin = dense_model(name, budget, weights)
        self.base = total_cost(grouped(self.model, budget))

    def _cost(self, gm) -> dict:
        c = total_cost(gm)
        return {"macs": c.macs, "params": c.params, "macs_ratio": c.macs / self.base.macs,
                "params_ratio": c.params / self.base.params}

    def _finetune(self, model, folder: Path, share: int = 1) -> dict:
        """Fine-tune on ``1/share`` of the budget (a cosine schedule of its own) and save it."""
        res = self._train(model, share)
        torch.save(model.state_dict(), folder / "model.pt")
        return {"top1": evaluate(model, test_loader(self.data, self.budget, self.name)), "steps": res.steps,
                "finetune_seconds": round(res.seconds, 1), "final_loss": res.losses[-1]}

    def _train(self, model, share: int = 1, seed: int = 0):
        b = self.budget
        opts = FinetuneOptions(epochs=b.epochs / share, lr=b.lr, progress=True,
                               max_steps=None if b.max_steps is None else max(1, b.max_steps // share))
        return finetune(_to(model, b.device), train_loader(self.data, b, self.name, seed=seed), opts)

    def dense(self) -> dict:
        def fn(folder):
            torch.save(self.model.state_dict(), folder / "model.pt")
            m = _to(copy.deepcopy(self.model), self.budget.device)
            return {"top1": evaluate(m, test_loader(self.data, self.budget, self.name)),
                    "origin": self.origin, **self._cost(grouped(self.model, self.budget))}
        return stage(self.dir / "dense", fn, f"{self.name} dense", self.log)

    def dense_ft(self) -> dict:
        return stage(self.ft_dir / "dense-ft", lambda f: self._finetune(copy.deepcopy(self.model), f),
                     f"{self.name} dense fine-tune", self.log)

    def dense_int8(self) -> dict:
        def fn(folder):
            m = copy.deepcopy(self.model)
            m.load_state_dict(torch.load(self.ft_dir / "dense-ft" / "model.pt", map_location="cpu"))
            return self._int8(grouped(m, self.budget), folder)
        return stage(self.ft_dir / "dense-int8", fn, f"{self.name} dense INT8", self.log)

    def rank(self, scorer: str) -> dict:
        scorer = variant_of(scorer).ranking

        def fn(folder):
            gm = grouped(self.model, self.budget)
            if scorer == "l1":
                t = time.perf_counter()
                torch.save(rank(gm, None, "l1").scores, folder / "scores.pt")
                return {"scorer": "l1", "seconds": round(time.perf_counter() - t, 3)}
            return self._hessian_subprocess(scorer, folder)
        return stage(self.dir / f"rank-{scorer}", fn, f"{self.name} rank {scorer}", self.log)

    def _hessian_subprocess(self, scorer: str, folder: Path) -> dict:
        # the batch goes to the worker as a small file: loading CIFAR there would set its peak RSS
        torch.save(hessian_batch(self.budget, self.name, self.data.train), folder / "batch.pt")
        spec = {"batch": str(folder / "batch.pt"), "model": self.name, "budget": asdict(self.budget),
                "scorer": scorer, "threads": torch.get_num_threads(),
                "dense": str(self.dir / "dense" / "model.pt"), "out": str(folder),
                "data_root": str(self.data_root)}
        (folder / "spec.json").write_text(json.dumps(spec))
        cmd = [sys.executable, str(Path(__file__).resolve()), "--rank-worker", str(folder / "spec.json")]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise ReproduceError(f"Hessian worker for {scorer} failed (rc={proc.returncode}):\n"
                                 f"{proc.stderr[-3000:]}")
        return json.loads((folder / "summary.json").read_text())

    def _pruned_dir(self, scorer: str, target: float) -> Path:
        """A gradual variant's pruned model depends on the fine-tune budget too."""
        return (self.ft_dir if variant_of(scorer).gradual else self.dir) / f"{scorer}-{target}" / "pruned"

    def _rebuild(self, scorer: str, target: float):
        if variant_of(scorer).steps > 1:
            path = self._pruned_dir(scorer, target) / "model.pt"
            return torch.load(path, map_location="cpu", weights_only=False)  # our own GraphModule
        plan = json.loads((self._pruned_dir(scorer, target) / "plan.json").read_text())
        keep = PrunePlan({int(g): tuple(k) for g, k in plan.items()})
        return shrink(grouped(self.model, self.budget), keep).graph_module

    def _cached_ranking(self, ranking: str, gm) -> Ranking:
        """The rank stage's ranking: channel scores (and whole-group scores of the removal criterion)."""
        folder = self.dir / f"rank-{ranking}"
        scores = torch.load(folder / "scores.pt")
        if {g.id: g.size for g in groups_of(gm).prunable if g.id in scores} != \
                {g: len(s) for g, s in scores.items()}:
            raise ReproduceError(f"cached scores of {ranking} do not match {self.name}'s groups; "
                                 f"delete {folder}")
        if scorer_of(ranking) != "removal":
            return Ranking(scores)
        whole = folder / "whole.pt"  # only dropping whole groups needs these
        return Ranking(scores, whole=torch.load(whole) if whole.exists() else None, per_cost=True)

    def _pruned_graph(self, scorer: str, target: float):
        """``ehap_fx.compress.prune``: one-shot, or (``-iter``, ``-gradual``) the ranking
        re-estimated on the pruned graph after each step (geometric MACs schedule to
        ``target``), with BN statistics re-estimated (``-iter``) or a share of the fine-tune
        budget (``-gradual``) between steps; the first step uses the cached ranking of the
        dense model."""
        v = variant_of(scorer)
        gm = grouped(self.model, self.budget)
        first = self._cached_ranking(v.ranking, gm)
        if v.granularity != "channel" and first.per_cost and first.whole is None:
            raise ReproduceError(f"{self.dir / f'rank-{v.ranking}'} predates whole-group scores; delete it")
        batch = hessian_batch(self.budget, self.name, self.data.train) if v.steps > 1 and v.ranking != "l1" else None

        def ranker(gm, step: int) -> Ranking:
            ranking = first if step == 1 else rank(gm, batch, scorer_of(v.ranking),
                                                   hessian_options(v.ranking, self.budget))
            return replace(ranking, choose=self._channel_scores(v, gm))

        def between(gm, step: int) -> None:
            if v.gradual:  # each share sees other images than the final one (seed 0)
                self._train(gm, v.steps, seed=10 + step + 1)
            else:
                recalibrate_bn(gm, train_loader(self.data, self.budget, self.name, seed=2), batches=20)
            gm.cpu()

        target = Target(macs=target, round_to=self.budget.round_to, granularity=v.granularity, steps=v.steps)
        pruned = prune(gm, target, ranker, between=between)
        return pruned.graph_module, pruned.steps[-1].plan

    def _channel_scores(self, v: Variant, gm) -> dict | None:
        """What picks the kept channels within each width (None: the ranking's own scores)."""
        if v.channels == "l1":
            return magnitude_scores(gm)
        if v.channels == "joint":
            cached = self.dir / f"rank-{v.ranking}" / "joint.pt"
            if cached.exists():
                joint = torch.load(cached)
            else:  # a rank stage from before joint matrices: its batch and settings again
                batch = hessian_batch(self.budget, self.name, self.data.train)
                joint = rank(gm, batch, "removal", hessian_options(v.ranking, self.budget)).result.joint
            return {g: joint_order(q) for g, q in joint.items()}
        return None

    def prune(self, scorer: str, target: float) -> dict:
        def fn(folder):
            gm, plan = self._pruned_graph(scorer, target)
            if variant_of(scorer).steps > 1:
                torch.save(gm, folder / "model.pt")  # later plans apply to pruned graphs
            else:
                (folder / "plan.json").write_text(json.dumps({str(g): list(k) for g, k in plan.keep.items()}))
            pruned = _to(gm, self.budget.device)
            return {"top1": evaluate(pruned, test_loader(self.data, self.budget, self.name)),
                    **self._cost(pruned)}
        return stage(self._pruned_dir(scorer, target), fn, f"{self.name} prune {scorer} @ {target}", self.log)

    def pruned_ft(self, scorer: str, target: float) -> dict:
        v = variant_of(scorer)
        return stage(self.ft_dir / f"{scorer}-{target}" / "ft",
                     lambda f: self._finetune(self._rebuild(scorer, target), f, v.steps if v.gradual else 1),
                     f"{self.name} fine-tune {scorer} @ {target}", self.log)

    def pruned_int8(self, scorer: str, target: float) -> dict:
        def fn(folder):
            gm = self._rebuild(scorer, target)
            gm.load_state_dict(torch.load(self.ft_dir / f"{scorer}-{target}" / "ft" / "model.pt",
                                          map_location="cpu"))
            return self._int8(gm, folder)
        return stage(self.ft_dir / f"{scorer}-{target}" / "int8", fn,
                     f"{self.name} INT8 {scorer} @ {target}", self.log)

    def _int8(self, gm, folder: Path) -> dict:
        """QAT (or PTQ) on the CPU FX backend, ONNX export verified, ORT top-1 and latency."""
        b = self.budget
        gm = gm.cpu().eval()
        opts = QuantizeOptions(mode="qat" if b.qat_steps else "ptq",
                               finetune=replace(QAT_FINETUNE, max_steps=b.qat_steps or None, lr=b.qat_lr),
                               calibration_batches=b.calibration_batches)
        loader = train_loader(self.data, b, self.name, seed=1)
        q = quantize_int8(gm, example_input(b).cpu(), loader, opts)
        tests = test_loader(self.data, b, self.name)
        inputs = torch.cat([x for x, _ in tests])[:512]
        rep = export(q, example_input(b).cpu(), folder / "model_int8.onnx", inputs=inputs, float_model=gm,
                     options=ExportOptions(threads=1))
        ort_top1 = onnx_top1(folder / "model_int8.onnx", tests)
        lat = {f"int8_{k}": v for k, v in onnx_latency(folder / "model_int8.onnx", b).items()}
        lat.update({f"fp32_{k}": v for k, v in onnx_latency(folder / "model_int8_fp32.onnx", b).items()})
        return {"top1": ort_top1, "torch_int8_agreement": rep.argmax_agreement, "mode": q.mode,
                "qat_steps": q.steps, "int8_bytes": rep.int8_bytes, "fp32_bytes": rep.fp32_bytes,
                "quantized_conv_fraction": rep.quantized_conv_fraction, **lat}

    def all(self, scorers, targets) -> list[dict]:
        """Every stage for this model; one result row per (scorer, target) plus the dense row.

        Order: rankings, then per target the pruned and fine-tuned models of every scorer, the
        dense fine-tune, and the INT8 stages last, so that a run cut short has the comparison.
        """
        dense = self.dense()
        ranks = {s: self.rank(s) for s in scorers}
        runs = [(s, t) for t in targets for s in scorers]
        pruned = {k: self.prune(*k) for k in runs}
        ft = {k: self.pruned_ft(*k) for k in runs}
        dense_ft = self.dense_ft()
        int8 = {k: self.pruned_int8(*k) for k in runs}
        dense_int8 = self.dense_int8()
        rows = [{"model": self.name, "scorer": "dense", "target": 1.0, "dense": dense["top1"],
                 "pruned": dense["top1"], "finetuned": dense_ft["top1"], "int8_onnx": dense_int8["top1"],
                 **_cost_fields(dense), **_latency_fields(dense_int8)}]
        for s, t in runs:
            rows.append({"model": self.name, "scorer": s, "target": t, "dense": dense["top1"],
                         "pruned": pruned[s, t]["top1"], "finetuned": ft[s, t]["top1"],
                         "int8_onnx": int8[s, t]["top1"], **_cost_fields(pruned[s, t]),
                         **_latency_fields(int8[s, t]), **_rank_fields(ranks[s]),
                         **self.agreement(s, t)})
        return rows

    def agreement(self, scorer: str, target: float) -> dict:
        """Spearman of all channel scores, and Jaccard overlap of the pruned channel sets, with
        the fp32 run of the same estimator (``hessian-fp32`` for L1; empty when not run)."""
        v = variant_of(scorer)
        ranking = v.ranking
        if v.steps > 1:
            return {}  # later steps rank a pruned graph: no channel-for-channel comparison
        reference = "hessian-fp32" if ranking == "l1" else ranking.split("-")[0] + "-fp32"
        ref = self.dir / f"rank-{reference}" / "scores.pt"
        same_variant = reference if ranking == "l1" else scorer.replace(ranking, reference, 1)
        ref_plan = self.dir / f"{same_variant}-{target}" / "pruned" / "plan.json"
        if not (ref.exists() and ref_plan.exists()):
            return {}
        a, b = torch.load(self.dir / f"rank-{ranking}" / "scores.pt"), torch.load(ref)
        ids = sorted(set(a) & set(b))
        rho = spearmanr(torch.cat([a[g] for g in ids]).numpy(), torch.cat([b[g] for g in ids]).numpy())
        mine = _removed(self.dir / f"{scorer}-{target}" / "pruned" / "plan.json", a)
        theirs = _removed(ref_plan, b)
        return {"spearman_vs_fp32": float(rho.statistic),
                "pruned_jaccard_vs_fp32": len(mine & theirs) / max(1, len(mine | theirs))}


def _removed(plan_path: Path, scores: dict) -> set[tuple[int, int]]:
    """The ``(group, channel)`` pairs a cached plan removes."""
    keep = {int(g): set(k) for g, k in json.loads(plan_path.read_text()).items()}
    return {(g, c) for g, k in keep.items() for c in range(len(scores[g])) if c not in k}


def _cost_fields(m: dict) -> dict:
    return {"macs": m["macs"], "params": m["params"], "macs_ratio": m["macs_ratio"],
            "params_ratio": m["params_ratio"]}


def _latency_fields(m: dict) -> dict:
    return {k: m[k] for k in ("int8_b1_ms", "int8_b128_ms", "fp32_b1_ms", "fp32_b128_ms", "int8_bytes")}


def _rank_fields(r: dict) -> dict:
    keys = ("estimator", "dtype", "probes", "batch_size", "seconds", "peak_memory", "rss_growth",
            "peak_memory_kind", "retries")
    return {f"hessian_{k}": r.get(k) for k in keys}


# ---------------------------------------------------------------------------------------------
# onnxruntime: accuracy and latency
# ---------------------------------------------------------------------------------------------


def onnx_latency(path: Path, budget: Budget) -> dict:
    """Median milliseconds per run at batch 1 and batch 128, one onnxruntime thread."""
    sess = session(path, threads=1)
    quick = budget.max_steps is not None and budget.max_steps <= 5
    out = {}
    for batch, runs in ((1, 20 if quick else 200), (128, 2 if quick else 10)):
        x = np.random.default_rng(0).standard_normal((batch, 3, 32, 32)).astype(np.float32)
        sess.run(None, {INPUT: x})
        times = []
        for _ in range(runs):
            t = time.perf_counter()
            sess.run(None, {INPUT: x})
            times.append(time.perf_counter() - t)
        out[f"b{batch}_ms"] = round(1000 * float(np.median(times)), 3)
    return out


def time_hessians(run: Run, scorers, repeats: int) -> str:
    """Each Hessian scorer ``repeats`` times, alternating, each in a fresh subprocess (no cache):
    median seconds and peak memory, and their ratios to the first scorer, as a Markdown table."""
    run.dense()
    scorers = list(dict.fromkeys(variant_of(s).ranking for s in scorers if not s.startswith("l1")))
    runs: dict[str, list[dict]] = {s: [] for s in scorers}
    for i in tqdm(range(repeats), desc="hessian timing"):
        for s in scorers:
            folder = run.dir / "timing" / f"{s}-{i}"
            folder.mkdir(parents=True, exist_ok=True)
            runs[s].append(run._hessian_subprocess(s, folder))
    med = {s: {k: float(np.median([r[k] for r in rs])) for k in ("seconds", "peak_memory", "rss_growth")}
           for s, rs in runs.items()}
    ref = med[scorers[0]]
    lines = [f"| scorer | runs | median s | s / {scorers[0]} | peak MiB | peak / {scorers[0]} | "
             "growth MiB | growth / ref |", "|---|---|---|---|---|---|---|---|"]
    for s, m in med.items():
        each = ", ".join(f"{r['seconds']:.1f}" for r in runs[s])
        lines.append(f"| {s} | {each} | {m['seconds']:.1f} | "
                     f"{m['seconds'] / ref['seconds']:.2f} | {m['peak_memory'] / 2**20:.0f} | "
                     f"{m['peak_memory'] / ref['peak_memory']:.2f} | {m['rss_growth'] / 2**20:.0f} | "
                     f"{m['rss_growth'] / ref['rss_growth']:.2f} |")
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny budgets on a data slice (CI, minutes)")
    p.add_argument("--long", action="store_true", help="the GPU budget: 30 epochs, 1000 QAT steps, "
                   "200 probes on 256 images")
    p.add_argument("--models", nargs="+", choices=MODELS + ("resnet20", "resnet44"),
                   help=f"default: {' '.join(MODELS)}")
    p.add_argument("--targets", nargs="+", type=float,
                   help=f"default: {' '.join(map(str, TARGETS))} (--quick: {QUICK_TARGETS[0]})")
    p.add_argument("--scorers", nargs="+", default=list(DEFAULT_SCORERS), choices=SCORERS)
    p.add_argument("--dataset", default="cifar10", choices=tuple(NUM_CLASSES))
    p.add_argument("--epochs", type=float, help="fine-tune epochs (default 0.5)")
    p.add_argument("--max-steps", type=int, help="cap on fine-tune steps")
    p.add_argument("--qat-steps", type=int, help="QAT steps (default 0 = PTQ)")
    p.add_argument("--probes", type=int, help="Hutchinson probes (default 16)")
    p.add_argument("--hessian-batch", type=int, help="Hessian batch size (default 128)")
    p.add_argument("--round-to", type=int, help="kept widths multiple of this (default 1)")
    p.add_argument("--threads", type=int, help="torch threads (1 is far faster on a busy CPU)")
    p.add_argument("--seed", type=int, help="Hessian batch, probes, fine-tune order (default 0)")
    p.add_argument("--train-limit", type=int)
    p.add_argument("--test-limit", type=int)
    p.add_argument("--synthetic", action="store_true", help="synthetic data instead of CIFAR")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--data-root", type=Path, default=SHARED / "data")
    p.add_argument("--weights", type=Path, default=SHARED / "weights")
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "reproduce")
    p.add_argument("--time-hessian", type=int, metavar="N",
                   help="only time the Hessian scorers: N alternating fresh runs each, ratios printed")
    p.add_argument("--rank-worker", type=Path, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def budget_from(args) -> Budget:
    if args.quick and args.long:
        raise ReproduceError("--quick and --long are exclusive")
    base = QUICK if args.quick else LONG if args.long else Budget()
    missing = not (args.data_root / "cifar-10-batches-py").exists()
    synthetic = args.synthetic or (missing and args.dataset == "cifar10")
    if args.dataset == "cifar100" and not (args.data_root / "cifar-100-python").exists():
        raise ReproduceError(f"no CIFAR-100 under {args.data_root} (shared/data has none); "
                             "pass --data-root or --synthetic")
    overrides = {k: v for k, v in dict(
        epochs=args.epochs, max_steps=args.max_steps, qat_steps=args.qat_steps, probes=args.probes,
        hessian_batch=args.hessian_batch, round_to=args.round_to, train_limit=args.train_limit,
        test_limit=args.test_limit, seed=args.seed,
    ).items() if v is not None}
    return replace(base, dataset=args.dataset, device=args.device, synthetic=synthetic, **overrides)


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    if args.rank_worker is not None:
        rank_worker(args.rank_worker)
        return []
    if args.threads:
        torch.set_num_threads(args.threads)
    budget = budget_from(args)
    data = load_data(budget, args.data_root)
    log = tqdm.write
    log(f"budget {budget.rank_key()}/ft-{budget.key()}: {budget}\ndata: {data.describe}")
    rows = []
    targets = args.targets or list(QUICK_TARGETS if args.quick else TARGETS)
    if args.time_hessian:
        for name in args.models or MODELS:
            print(f"{name}, {budget.probes} probes on {budget.hessian_batch} images, "
                  f"{torch.get_num_threads()} thread(s):")
            print(time_hessians(Run(name, budget, data, args.data_root, args.weights, args.out, log),
                                args.scorers, args.time_hessian))
        return []
    for name in args.models or MODELS:
        run = Run(name, budget, data, args.data_root, args.weights, args.out, log)
        rows.extend(run.all(args.scorers, targets))
    stem = args.out / budget.rank_key() / f"results-{budget.key()}"
    meta = {"budget": asdict(budget), "data": data.describe, "argv": sys.argv[1:] if argv is None else argv,
            "machine": f"{cpu_features().describe()}, {os.cpu_count()} cores",
            "torch": torch.__version__, "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    rows = merge_rows(stem.with_suffix(".json"), rows)
    stem.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    md = table(rows)
    stem.with_suffix(".md").write_text(md + "\n")
    print(md)
    print(f"\nresults: {stem.with_suffix('.json')}")
    return rows


if __name__ == "__main__":
    main()
