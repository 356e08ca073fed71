"""tools/reproduce.py's settings, data, cache, Hessian worker and table: the budgets and scorer
variants, what a run reads, where it keeps its stages, how its rows are printed and merged."""

from __future__ import annotations

import copy
import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NamedTuple

import torch
from ehap_fx.passes.group import group_channels
from ehap_fx.passes.trace import trace

from ehap_fx.data import load_cifar, synthetic_cifar
from ehap_fx.errors import EhapError
from ehap_fx.models import NUM_CLASSES, find_pretrained, get_model, load_pretrained, normalization
from ehap_fx.scoring import rank
from ehap_fx.scoring.options import HessianOptions

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
