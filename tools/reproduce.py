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
import hashlib
import json
import os
import resource
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from ehap_fx.passes.cost import total_cost
from ehap_fx.passes.export import INPUT, ExportOptions, export, onnx_top1, session
from ehap_fx.passes.group import group_channels, groups_of
from ehap_fx.passes.quantize import QAT_FINETUNE, QuantizeOptions
from ehap_fx.passes.shrink import PrunePlan, shrink
from ehap_fx.passes.trace import trace
from scipy.stats import spearmanr
from tqdm.auto import tqdm

from ehap_fx.compress import prune
from ehap_fx.data import load_cifar, synthetic_cifar
from ehap_fx.errors import EhapError
from ehap_fx.isa import cpu_features
from ehap_fx.models import NUM_CLASSES, find_pretrained, get_model, load_pretrained, normalization
from ehap_fx.qat import quantize
from ehap_fx.scoring import Ranking, magnitude_scores, rank
from ehap_fx.scoring.options import HessianOptions
from ehap_fx.scoring.removal import joint_order
from ehap_fx.target import Target
from ehap_fx.train import FinetuneOptions, evaluate, finetune, recalibrate_bn

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
MODELS = ("resnet32", "resnet56")
TARGETS = (0.7, 0.5, 0.35)
SCORERS = ("hessian-fp32", "hessian-half", "ggn-fp32", "ggn-half", "removal-fp32", "removal-half", "l1",
           "removal-fp32-block", "removal-half-block", "l1-block", "removal-fp32-both", "removal-half-both",
           "l1-both", "removal-fp32-iter", "removal-half-iter", "removal-fp32-gradual", "removal-half-gradual",
           "l1-gradual", "removal-fp32-mag", "removal-half-mag", "removal-fp32-joint", "removal-half-joint")
ITER_STEPS = 4  # "-iter" / "-gradual": re-rank after each of this many steps
DEFAULT_SCORERS = ("hessian-fp32", "hessian-half", "l1")
QUICK_TARGETS = (0.5,)  # --quick: one target keeps CI within minutes


class ReproduceError(EhapError):
    """A reproduction run that cannot go on (missing data, inconsistent cache)."""


@dataclass(frozen=True)
class Budget:
    """Everything that changes the numbers; its hash names the cache folder.

    The defaults are the 2-core CPU budget (``LONG`` is the GPU one). ``epochs`` of
    fine-tuning (SGD Nesterov, cosine from ``lr``) for the dense baseline and every
    pruned model alike; INT8 by ``qat_steps`` of QAT (0: PTQ on ``calibration_batches``);
    Hessian: Hutchinson with ``probes`` Rademacher probes on one batch of ``hessian_batch``
    training images. ``train_limit``/``test_limit`` keep the first images of each split.
    ``round_to=1`` (any width) keeps every scorer's MACs within ~1% of the target, so that
    accuracies compare at equal cost (with 8, one block of a coupled residual group can
    overshoot a 0.5 target to 0.41).
    """

    dataset: str = "cifar10"
    epochs: float = 0.5
    lr: float = 0.01
    batch_size: int = 128
    max_steps: int | None = None
    qat_steps: int = 0
    qat_lr: float = 1e-3
    calibration_batches: int = 16
    hessian_batch: int = 128
    probes: int = 16
    train_limit: int | None = None
    test_limit: int | None = None
    synthetic: bool = False
    device: str = "cpu"
    round_to: int = 1
    seed: int = 0

    def __post_init__(self) -> None:
        if self.dataset not in NUM_CLASSES:
            raise ValueError(f"dataset={self.dataset!r} must be one of {tuple(NUM_CLASSES)}")
        if not self.epochs > 0:
            raise ValueError(f"epochs={self.epochs} must be > 0")
        for name in ("batch_size", "hessian_batch", "probes", "calibration_batches", "round_to"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if self.qat_steps < 0:
            raise ValueError(f"qat_steps={self.qat_steps} must be >= 0 (0 = PTQ)")

    @property
    def half(self) -> str:
        """The half precision of this device: fp16 on CUDA, bf16 on a CPU."""
        return "fp16" if self.device.startswith("cuda") else "bf16"

    def key(self) -> str:
        """Hash of every setting: names the fine-tune / INT8 stages and the results."""
        return _hash(asdict(self))

    def rank_key(self) -> str:
        """Hash of the settings the dense, ranking and pruning stages depend on, so that a
        longer fine-tune reuses the Hessians."""
        return f"{self.dataset}-{_hash({k: getattr(self, k) for k in RANK_FIELDS})}"


RANK_FIELDS = ("dataset", "hessian_batch", "probes", "train_limit", "test_limit", "synthetic", "device",
               "round_to", "seed")


def _hash(d: dict) -> str:
    return hashlib.sha1(json.dumps(d, sort_keys=True).encode()).hexdigest()[:10]


LONG = Budget(epochs=30.0, qat_steps=1000, hessian_batch=256, probes=200)
QUICK = Budget(epochs=1.0, max_steps=2, qat_steps=2, calibration_batches=2, hessian_batch=32,
               probes=2, train_limit=256, test_limit=256, batch_size=64)


class Variant(NamedTuple):
    """How a scorer prunes: its ranking, the target's granularity, the pruning steps, whether
    a share of the fine-tune budget runs between them (else BN is re-estimated), and what picks
    the channels within the widths the ranking sets: the ranking itself, ``"l1"`` norms, or
    ``"joint"`` (greedy under the removal criterion's joint loss, ``removal.joint_order``)."""

    ranking: str
    granularity: str = "channel"
    steps: int = 1
    gradual: bool = False
    channels: str = "ranking"


def variant_of(scorer: str) -> Variant:
    """``"removal-half-block"`` ranks like ``"removal-half"`` and drops whole residual blocks
    (``Target(granularity="block")``, depth pruning); ``-both`` narrows layers and may drop
    blocks; ``-iter`` prunes channels in ``ITER_STEPS`` steps, re-ranking between them;
    ``-gradual`` also fine-tunes between them, each step taking an equal share of the same
    fine-tune budget (the last share after the last step); ``-mag`` lets the ranking set each
    group's width and the L1 norms choose its channels (``Ranking(..., choose=...)``), ``-joint``
    the greedy joint-removal order of the same criterion."""
    for suffix, how in (("-block", ("block", 1)), ("-both", ("both", 1)), ("-iter", ("channel", ITER_STEPS)),
                        ("-gradual", ("channel", ITER_STEPS, True)), ("-mag", ("channel", 1, False, "l1")),
                        ("-joint", ("channel", 1, False, "joint"))):
        if scorer.endswith(suffix):
            return Variant(scorer[: -len(suffix)], *how)
    return Variant(scorer)


def scorer_of(ranking: str) -> str:
    """The ``ehap_fx.scoring.ranking.rank`` scorer of a ranking: ``"l1"``, ``"removal"``, or ``"hessian"``
    (the trace formula, with the Hutchinson or the exact GGN estimator)."""
    return ranking.split("-")[0] if ranking.startswith(("l1", "removal")) else "hessian"


def hessian_options(scorer: str, budget: Budget) -> HessianOptions | None:
    """The Hessian settings of ``scorer``; None for the L1 control."""
    scorer = variant_of(scorer).ranking
    if scorer == "l1":
        return None
    estimator, precision = scorer.split("-")
    dtype = budget.half if precision == "half" else "fp32"
    probes = budget.probes if estimator == "hessian" else None
    return HessianOptions(estimator="hutchinson" if estimator == "hessian" else "ggn", dtype=dtype,
                          batch_size=budget.hessian_batch, probes=probes, seed=budget.seed,
                          data_seed=budget.seed, progress=False)


# ---------------------------------------------------------------------------------------------
# Data, models, cache
# ---------------------------------------------------------------------------------------------


@dataclass
class Data:
    train: object
    test: object
    describe: str


def load_data(budget: Budget, root: Path) -> Data:
    if budget.synthetic:
        n = budget.train_limit or 512
        train = synthetic_cifar(n, num_classes=NUM_CLASSES[budget.dataset], seed=0)
        test = synthetic_cifar(budget.test_limit or 256, num_classes=NUM_CLASSES[budget.dataset], seed=1)
        return Data(train, test, f"{train.name} ({n} train / {len(test)} test)")
    try:
        train = load_cifar(root, budget.dataset, "train")
        test = load_cifar(root, budget.dataset, "test")
    except EhapError as e:
        raise ReproduceError(f"{budget.dataset} not found under {root}: {e}; pass --data-root, or "
                             "--quick for synthetic data") from e
    if budget.train_limit:
        train = train.head(budget.train_limit)
    if budget.test_limit:
        test = test.head(budget.test_limit)
    return Data(train, test, f"{train.describe()} / {test.describe()}")


def train_loader(data: Data, budget: Budget, model: str, seed: int = 0):
    return data.train.loader(budget.batch_size, shuffle=True, augment=True, seed=budget.seed + seed,
                             normalization=normalization(model, budget.dataset))


def test_loader(data: Data, budget: Budget, model: str):
    return data.test.loader(500, normalization=normalization(model, budget.dataset))


def dense_model(name: str, budget: Budget, weights: Path | None) -> tuple[torch.nn.Module, str]:
    """The pretrained model (or a seeded random one when there are no weights), and its origin."""
    model = get_model(name, NUM_CLASSES[budget.dataset])
    if weights is not None:
        try:
            path = find_pretrained(name, weights, budget.dataset)
            return load_pretrained(model, path).eval(), path.name
        except EhapError:
            pass
    torch.manual_seed(budget.seed)
    return get_model(name, NUM_CLASSES[budget.dataset]).eval(), "random init (no weights found)"


def example_input(budget: Budget) -> torch.Tensor:
    return torch.zeros(2, 3, 32, 32, device=budget.device)


def grouped(model: torch.nn.Module, budget: Budget):
    return group_channels(trace(copy.deepcopy(model).eval(), example_input(budget).cpu())).graph_module


def stage(folder: Path, fn, desc: str, log) -> dict:
    """Run ``fn(folder)`` unless ``folder/metrics.json`` exists; its dict is the stage result."""
    done = folder / "metrics.json"
    if done.exists():
        log(f"[cached] {desc}")
        return json.loads(done.read_text())
    log(f"[run] {desc}")
    folder.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    metrics = fn(folder)
    metrics["stage_seconds"] = round(time.perf_counter() - t, 2)
    tmp = done.with_suffix(".tmp")
    tmp.write_text(json.dumps(metrics, indent=1))
    os.replace(tmp, done)
    return metrics


def _to(model, device):
    return model.to(torch.device(device))


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
        q = quantize(gm, example_input(b).cpu(), loader, opts)
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


# ---------------------------------------------------------------------------------------------
# Hessian worker (a fresh process per precision, so peak memory is its own)
# ---------------------------------------------------------------------------------------------


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def rank_worker(spec_path: Path) -> None:
    spec = json.loads(spec_path.read_text())
    budget = Budget(**spec["budget"])
    torch.set_num_threads(spec["threads"])
    out = Path(spec["out"])
    model = get_model(spec["model"], NUM_CLASSES[budget.dataset])
    model.load_state_dict(torch.load(spec["dense"], map_location="cpu"))
    gm = grouped(model.eval(), budget)
    if "batch" in spec:
        x, y = torch.load(spec["batch"])
    else:
        x, y = hessian_batch(budget, spec["model"], load_data(budget, Path(spec["data_root"])).train)
    opts = hessian_options(spec["scorer"], budget)
    device = torch.device(budget.device)
    gm = gm.to(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    base = _rss()
    ranking = rank(gm, (x, y), scorer_of(spec["scorer"]), opts)
    result = ranking.result
    if ranking.per_cost:  # the removal criterion: its whole-group scores and joint matrices
        torch.save(ranking.whole, out / "whole.pt")
        torch.save(result.joint, out / "joint.pt")
    torch.save({g: s.cpu() for g, s in ranking.scores.items()}, out / "scores.pt")
    summary = {**result.summary(), "scorer": spec["scorer"], "base_rss": base,
               "rss_growth": result.peak_memory - base if device.type == "cpu" else None}
    (out / "summary.json").write_text(json.dumps(summary))


def hessian_batch(budget: Budget, model: str, data) -> tuple[torch.Tensor, torch.Tensor]:
    """``hessian_batch`` training images drawn with ``budget.seed``, normalised, no augmentation."""
    gen = torch.Generator().manual_seed(budget.seed)
    idx = torch.randperm(len(data), generator=gen)[: budget.hessian_batch]
    norm = normalization(model, budget.dataset)
    return norm(data.images[idx]), data.labels[idx]


# ---------------------------------------------------------------------------------------------
# Table and CLI
# ---------------------------------------------------------------------------------------------


def table(rows: list[dict]) -> str:
    """The results as a Markdown table."""
    head = ("| model | scorer | target | MACs (M) | MACs kept | params (K) | pruned top-1 | "
            "fine-tuned top-1 | INT8 ONNX top-1 | ρ vs fp32 | pruned-set Jaccard vs fp32 | "
            "Hessian s | Hessian peak MiB (growth) | "
            "ONNX INT8 ms b1 / b128 | ONNX fp32 ms b1 / b128 |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['scorer']} | {r['target']} | {r['macs'] / 1e6:.1f} | "
            f"{r['macs_ratio']:.3f} | {r['params'] / 1e3:.1f} | {r['pruned']:.2f} | {r['finetuned']:.2f} | "
            f"{r['int8_onnx']:.2f} | {_fmt(r.get('spearman_vs_fp32'))} | "
            f"{_fmt(r.get('pruned_jaccard_vs_fp32'))} | {_hessian_cells(r)} | "
            f"{r['int8_b1_ms']:.2f} / {r['int8_b128_ms']:.1f} | "
            f"{r['fp32_b1_ms']:.2f} / {r['fp32_b128_ms']:.1f} |")
    return "\n".join(lines)


def _fmt(value: float | None) -> str:
    return "" if value is None else f"{value:.3f}"


def _hessian_cells(r: dict) -> str:
    """``seconds | peak MiB (growth MiB)``, blank for the L1 control and the dense row."""
    hs, mem, growth = (r.get(f"hessian_{k}") for k in ("seconds", "peak_memory", "rss_growth"))
    if mem is None:
        return f"{'' if hs is None else f'{hs:.1f}'} | "
    extra = "" if growth is None else f" ({growth / 2**20:.0f})"
    return f"{hs:.1f} | {mem / 2**20:.0f}{extra}"


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


def merge_rows(path: Path, rows: list[dict]) -> list[dict]:
    """``rows`` added to those already saved in ``path`` for this budget (a run of a subset of
    models, scorers or targets replaces its own rows only), in a stable order."""
    old = json.loads(path.read_text())["rows"] if path.exists() else []
    key = _row_key
    mine = {key(r) for r in rows}
    return sorted([r for r in old if key(r) not in mine] + rows, key=key)


def _row_key(r: dict) -> tuple:
    order = ("dense", *SCORERS)
    model = MODELS.index(r["model"]) if r["model"] in MODELS else len(MODELS)
    return (model, r["model"], -r["target"] if r["scorer"] != "dense" else -2.0, order.index(r["scorer"]))


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
