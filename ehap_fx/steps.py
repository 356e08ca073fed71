"""The steps of ``compress()``'s recipe, each returning what it did as a value.

    capture → teachers → prune (rank → plan → shrink, × target.steps) → repair → fine-tune
            → quantize + export → bench

Every step takes the graph and the checked options, changes nothing it was not given, and
returns a result that :func:`ehap_fx.compress_report.build` turns into the report; the recipe
(:func:`ehap_fx.compress.compress`) only chains them. ``top1`` is the run's evaluation (None
without ``eval_data``).
"""

from __future__ import annotations

import copy
import functools
import itertools
import logging
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import fx, nn

from ehap_fx import _meta, distributed, process_group
from ehap_fx.checkpoint import loaders_of, rng_state, set_rng_state
from ehap_fx.edge import Inputs
from ehap_fx.errors import EhapError, TargetError
from ehap_fx.isa import cpu_features
from ehap_fx.latency import BenchOptions, LatencyModel, LatencyOptions, LatencyTable, time_onnx
from ehap_fx.latency_loop import Delivered, LoopOptions, LoopReport, OnnxTimer, deliver
from ehap_fx.passes.capture import capture_groups
from ehap_fx.passes.compensate import compensate as repair_pass
from ehap_fx.passes.cost import Cost, conv_widths, total_cost
from ehap_fx.passes.export import ExportReport, export, export_onnx, onnx_top1
from ehap_fx.passes.group import ChannelGroups, groups_of
from ehap_fx.passes.quantize import QuantizeOptions, QuantizeResult
from ehap_fx.passes.shrink import PrunePlan, shrink
from ehap_fx.qat import quantize_int8
from ehap_fx.scoring import Ranking, rank
from ehap_fx.target import Target, measure, select_plan
from ehap_fx.train import FinetuneResult, evaluate, finetune

log = logging.getLogger("ehap_fx")

Top1 = Callable[[nn.Module], "float | None"]


def top1_on(eval_data: Iterable | None) -> Top1:
    """The run's evaluation: top-1 on ``eval_data``, or None without it."""
    return (lambda m: evaluate(m, eval_data)) if eval_data is not None else (lambda m: None)


def restored(options, name: str, run: Inputs) -> Any | None:
    """The value step ``name`` saved in ``options.checkpoints`` (None: none saved, or no
    checkpoints), with the run's random streams put back as they were when it was saved."""
    ck = getattr(options, "checkpoints", None)
    saved = ck.load(name) if ck is not None else None
    if saved is None:
        return None
    set_rng_state(saved["rng"], _streams(run))
    log.info("resumed: %s from %s", name, ck.path(name))
    return saved["value"]


def checkpoint(options, name: str, value: Any, run: Inputs) -> None:
    """Save step ``name``'s ``value`` with the run's random streams (``ehap_fx.checkpoint``)."""
    ck = getattr(options, "checkpoints", None)
    if ck is not None:
        ck.save(name, {"value": value, "rng": rng_state(_streams(run))})


def _streams(run: Inputs) -> list:
    return loaders_of(run.data, run.train, run.images, run.eval_data)


# ---------------------------------------------------------------------------------------------
# capture, teachers
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Captured:
    """The traced, grouped copy of the model (rank 0's weights on every rank) and its dense cost."""

    graph_module: fx.GraphModule
    cost: Cost
    widths: dict[str, int]
    pinned: list[dict]  # the groups that cannot shrink, with why
    how: dict  # which capture made the graph, and why (passes.capture)
    seconds: float
    top1: float | None


def capture(model: nn.Module, example_input, options, top1: Top1) -> Captured:
    t = time.perf_counter()
    gm = capture_groups(copy.deepcopy(model).eval(), example_input, capture=options.capture,
                        leaf_modules=options.leaf_modules, exclude=options.exclude, rules=options.rules)
    process_group.broadcast_module(gm)  # under torchrun: every rank starts from rank 0's weights
    seconds = time.perf_counter() - t
    pinned = [{"group": g.id, "size": g.size, "reason": g.pinned} for g in groups_of(gm).pinned]
    return Captured(gm, total_cost(gm), conv_widths(gm), pinned, gm.meta[_meta.CAPTURED].as_dict(), seconds,
                    top1(gm))


@dataclass(frozen=True)
class Teachers:
    """The model distilled from (None without distillation) and the frozen dense copy timed
    against the INT8 file (None without a timing), each made only when needed."""

    teacher: nn.Module | None
    dense: nn.Module | None
    seconds: float | None = None  # the default teacher's fine-tune
    top1: float | None = None  # its top-1: the baseline at equal budget
    start: fx.GraphModule | None = None  # a trainable copy of the fine-tuned teacher, to prune

    def pruned_from(self, dense: fx.GraphModule) -> fx.GraphModule:
        """The graph pruning starts from: the fine-tuned teacher (``DistillOptions.start``), else
        ``dense``."""
        return self.start if self.start is not None else dense


def teachers(gm: fx.GraphModule, teacher: nn.Module | None, options, run: Inputs, top1: Top1) -> Teachers:
    """With ``DistillOptions.teacher="finetuned"`` and a fine-tune budget the teacher is the dense
    graph fine-tuned first with that budget from the labels alone (and, with
    ``DistillOptions.start="teacher"``, a trainable copy of it is what gets pruned); else the one
    given, else a frozen dense copy."""
    tune, quantize = options.finetune_options, options.quantize
    distill = (tune.distill if tune is not None else None) or (
        quantize.finetune.distill if quantize is not None else None)
    if distill is None:
        teacher = None
    default = distill is not None and teacher is None
    train_teacher = default and tune is not None and distill.teacher == "finetuned"
    as_given = default and not train_teacher
    timed = options.bench is not None and options.export is not None
    dense = copy.deepcopy(gm).eval().requires_grad_(False) if timed or as_given else None
    if not train_teacher:
        return Teachers(dense if as_given else teacher, dense if timed else None)
    tuned = copy.deepcopy(gm)

    def start() -> fx.GraphModule | None:
        if distill.start != "teacher":
            return None
        return copy.deepcopy(tuned).train(gm.training).requires_grad_(True)

    if (saved := restored(options, "teacher", run)) is not None:
        tuned.load_state_dict(saved["state_dict"])
        tuned.eval().requires_grad_(False)
        return Teachers(tuned, dense if timed else None, saved["seconds"], saved["top1"], start())
    t = time.perf_counter()
    finetune(tuned, distributed.shard_loader(run.data), replace(tune, distill=None),
             checkpoints=options.checkpoints, name="teacher")
    tuned.eval().requires_grad_(False)
    seconds = time.perf_counter() - t
    log.info("teacher: the dense model fine-tuned with the same budget (%.0f s)", seconds)
    taught = Teachers(tuned, dense if timed else None, seconds, top1(tuned), start())
    checkpoint(options, "teacher",
               {"state_dict": tuned.state_dict(), "seconds": seconds, "top1": taught.top1},
               run)
    return taught


# ---------------------------------------------------------------------------------------------
# prune: rank → plan → shrink
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PruneStep:
    """One rank → select → shrink step of :func:`prune` (``groups``: of the graph it ranked)."""

    step: int
    ranking: Ranking
    plan: PrunePlan
    groups: ChannelGroups
    seconds: float


@dataclass(frozen=True)
class Pruned:
    """:func:`prune`'s shrunk graph, its steps, and the dense value of the target's quantity."""

    graph_module: fx.GraphModule
    steps: tuple[PruneStep, ...]
    dense: float
    loop: LoopReport | None = None  # the last step's measured latency loop, when one ran


def prune(gm: fx.GraphModule, target: Target, ranker: Callable[[fx.GraphModule, int], Ranking], *,
          between: Callable[[fx.GraphModule, int], Any] | None = None, latency: LatencyTable | None = None,
          loop: Callable[..., Delivered] | None = None) -> Pruned:
    """The pruning loop: ``ranker(gm, step)`` → ``select_plan`` → ``shrink``, ``target.steps``
    times toward ``target.at_step(step)`` of the dense value, ``between(gm, step)`` (a fine-tune,
    a BN re-estimate) after every step but the last. A latency target needs ``latency`` (a table).
    ``loop`` (``latency_loop.deliver`` with its timer and options bound) replaces the last
    step's ``select_plan``: that plan is measured against the dense ``gm`` and corrected."""
    steps, dense, original, report = [], None, gm, None
    for step in range(1, target.steps + 1):
        t = time.perf_counter()
        ranking = ranker(gm, step)
        seconds = time.perf_counter() - t
        model_latency = LatencyModel(gm, latency) if latency is not None else None
        if dense is None:
            dense = measure(gm, target, latency=model_latency)
        if loop is not None and step == target.steps:
            got = loop(gm, ranking, target.at_step(step), base=dense, latency=model_latency,
                       reference=original)
            plan, report = got.plan, got.report
        else:
            plan = select_plan(gm, ranking, target.at_step(step), base=dense, latency=model_latency)
        plan = process_group.broadcast_object(plan)  # rank 0's plan on every rank (latency timings differ)
        steps.append(PruneStep(step, ranking, plan, groups_of(gm), seconds))
        gm = shrink(gm, plan).graph_module
        if between is not None and step < target.steps:
            between(gm, step)
    return Pruned(gm, tuple(steps), dense, report)


@dataclass(frozen=True)
class Shrunk:
    """:func:`prune_to_target`'s result: the pruned graph and what it measured on it."""

    pruned: Pruned
    cost: Cost
    widths: dict[str, int]
    latency: dict | None  # a latency target: the model's predicted seconds before and after
    top1: float | None

    @property
    def graph_module(self) -> fx.GraphModule:
        return self.pruned.graph_module


def prune_to_target(gm: fx.GraphModule, example_input, run: Inputs, options, teacher: nn.Module | None,
                    top1: Top1) -> Shrunk:
    """:func:`prune` with the run's scorer, the fine-tune between steps, the latency table and
    loop of a latency target; a target out of reach names the largest pins."""
    if (saved := restored(options, "prune", run)) is not None:
        return _replayed(gm, saved)
    target, tune = options.target, options.finetune_options
    table = LatencyTable(options.latency or LatencyOptions()) if target.kind == "latency" else None

    def between(g: fx.GraphModule, step: int) -> None:
        finetune(g, distributed.shard_loader(run.data), tune,
                 teacher=teacher if tune.distill is not None else None)

    try:
        pruned = prune(gm, target, lambda g, _: rank(g, run.data, run.scorer, options.hessian,
                                                     loss_fn=run.loss_fn),
                       between=between if tune is not None else None, latency=table,
                       loop=_latency_loop(options.latency_loop, table, example_input, run.data,
                                          options.quantize))
    except TargetError as e:  # say what holds the channels back
        reasons = "; ".join(f"{c} channels: {r}" for c, r in groups_of(gm).pin_reasons())
        raise TargetError(f"{e}. Largest pins: {reasons}") from e
    out = pruned.graph_module
    latency = None
    if table is not None:
        after = measure(out, target, latency=LatencyModel(out, table))
        latency = {"latency_before_s": pruned.dense, "latency_after_s": after,
                   "latency_ratio": after / pruned.dense}
        if (loaded := table.load_summary()) is not None:
            latency["latency_table_load"] = loaded
            log.warning("%s", loaded)
        if process_group.is_main():
            table.save()
    if pruned.loop is not None:
        log.info("%s", pruned.loop.summary())
    widths = conv_widths(out)
    process_group.check_replicas(widths)
    shrunk = Shrunk(pruned, total_cost(out), widths, latency, top1(out))
    checkpoint(options, "prune", {"steps": [(s.step, s.ranking, s.plan, s.seconds) for s in pruned.steps],
                                  "dense": pruned.dense, "loop": pruned.loop, "latency": latency,
                                  "top1": shrunk.top1, "state_dict": out.state_dict()}, run)
    return shrunk


def _replayed(gm: fx.GraphModule, saved: dict) -> Shrunk:
    """A saved :func:`prune_to_target`: its plans replayed on the dense ``gm`` with ``shrink``
    (as ``report.load_pruned`` does), then its weights (the fine-tunes between steps')."""
    steps = []
    for step, ranking, plan, seconds in saved["steps"]:
        steps.append(PruneStep(step, ranking, plan, groups_of(gm), seconds))
        gm = shrink(gm, plan).graph_module
    gm.load_state_dict(saved["state_dict"])
    return Shrunk(Pruned(gm, tuple(steps), saved["dense"], saved["loop"]), total_cost(gm), conv_widths(gm),
                  saved["latency"], saved["top1"])


def _latency_loop(options: LoopOptions | None, table: LatencyTable | None, example_input, data,
                  quantize: QuantizeOptions | None) -> Callable[..., Delivered] | None:
    """``deliver`` with an onnxruntime timer bound (the run's INT8 backend, PTQ on the first
    batches of ``data``), deciding at the table's batch; None without a latency target."""
    if options is None or table is None:
        return None
    if not torch.is_tensor(example_input):
        raise EhapError("the latency loop exports one-input models: pass latency_loop=None for "
                        f"an example_input of type {type(example_input).__name__}")
    batch = table.options.batch_size
    bench = replace(options.bench, batches=tuple(sorted({*options.bench.batches, batch}, reverse=True)))
    calibration = list(itertools.islice(data, options.calibration_batches)) if data is not None else None
    timer = OnnxTimer(example_input, bench, calibration=calibration, quantize=quantize,
                      batches=options.calibration_batches)
    return functools.partial(deliver, timer=timer, options=options, batch=batch)


# ---------------------------------------------------------------------------------------------
# repair, fine-tune
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Repaired:
    """The least-squares repair (``passes.compensate``): its summary, or nothing when none ran."""

    graph_module: fx.GraphModule
    summary: dict | None = None
    seconds: float | None = None
    top1: float | None = None


def repair(gm: fx.GraphModule, dense: fx.GraphModule | None, run: Inputs, options, top1: Top1) -> Repaired:
    """Refit the surviving weights of the pruned ``gm`` to reproduce ``dense``'s activations on the
    user's own images (none: ``gm`` as it is)."""
    if dense is None:
        return Repaired(gm)
    if (saved := restored(options, "repair", run)) is not None:
        gm = copy.deepcopy(gm)
        gm.load_state_dict(saved["state_dict"])
        return Repaired(gm.train(saved["training"]), saved["summary"], saved["seconds"], saved["top1"])
    t = time.perf_counter()
    gm = repair_pass(gm, dense, run.images, options.compensate).graph_module
    process_group.broadcast_module(gm)  # one repair on every rank (rank 0's)
    seconds = time.perf_counter() - t
    recipe = "start of the fine-tune" if options.finetune_options else "post-training (no fine-tune)"
    summary = {**gm.meta[_meta.COMPENSATION].summary(), "recipe": recipe,
               "options": plain(options.compensate)}
    repaired = Repaired(gm, summary, seconds, top1(gm))
    checkpoint(options, "repair", {"state_dict": gm.state_dict(), "training": gm.training, "summary": summary,
                                   "seconds": seconds, "top1": repaired.top1}, run)
    return repaired


@dataclass(frozen=True)
class Tuned:
    """The fine-tune (in place on the graph it was given), when one ran."""

    result: FinetuneResult | None = None
    distill: dict | None = None
    seconds: float | None = None
    top1: float | None = None


def tune(gm: fx.GraphModule, run: Inputs, options, teacher: nn.Module | None, top1: Top1) -> Tuned:
    tune = options.finetune_options
    if tune is None:
        return Tuned()
    if (saved := restored(options, "finetune", run)) is not None:
        gm.load_state_dict(saved["state_dict"])
        gm.eval()
        return Tuned(saved["result"], saved["distill"], saved["seconds"], saved["top1"])
    t = time.perf_counter()
    distilling = tune.distill is not None
    result = finetune(gm, run.train, tune, eval_loader=run.eval_data,
                      teacher=teacher if distilling else None, checkpoints=options.checkpoints)
    seconds = time.perf_counter() - t
    distill = plain(tune.distill) if distilling and teacher is not None else None
    tuned = Tuned(result, distill, seconds, top1(gm))
    checkpoint(options, "finetune", {"state_dict": gm.state_dict(), "result": result, "distill": distill,
                                     "seconds": seconds, "top1": tuned.top1}, run)
    return tuned


# ---------------------------------------------------------------------------------------------
# quantize, export, bench
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Quantized:
    """The INT8 model and its ONNX file (when ``export``), as checked in onnxruntime."""

    result: QuantizeResult | None = None
    distill: dict | None = None
    export: ExportReport | None = None
    seconds: float | None = None
    export_seconds: float | None = None
    top1: float | None = None
    onnx_top1: float | None = None

    @property
    def model(self) -> nn.Module | None:
        return self.result.graph_module if self.result is not None else None

    @property
    def onnx_path(self) -> Path | None:
        return Path(self.export.path) if self.export is not None else None


def quantize_and_export(gm: fx.GraphModule, example_input, run: Inputs, options, teacher: nn.Module | None,
                        top1: Top1) -> Quantized:
    """INT8 (PTQ on rank 0's first batches on every rank; QAT on this rank's share, kept only if it
    beats PTQ) and, with ``options.export``, the ONNX file written by rank 0 and checked there."""
    q_opts = options.quantize
    if q_opts is None:
        return Quantized()
    first = list(itertools.islice(run.data, q_opts.calibration_batches)) if run.data is not None else None
    calibration = process_group.broadcast_object(first)  # one choice on every rank
    data = run.train if q_opts.mode == "qat" else calibration
    t = time.perf_counter()
    q = quantize_int8(gm, example_input, data, q_opts, teacher=teacher, calibration=calibration,
                      checkpoints=options.checkpoints)
    seconds = time.perf_counter() - t
    distill = plain(q_opts.finetune.distill) if q_opts.mode == "qat" and teacher is not None else None
    q_top1 = top1(q.graph_module)
    if options.export is None or not process_group.is_main():  # only rank 0 writes
        return Quantized(q, distill, seconds=seconds, top1=q_top1)
    t = time.perf_counter()
    check = run.eval_data if run.eval_data is not None else run.data
    inputs = torch.cat([x for x, _ in _take(check, 512)])[:512]
    rep = export(q, example_input, options.export, inputs=inputs, float_model=gm)
    export_seconds = time.perf_counter() - t
    onnx = onnx_top1(rep.path, run.eval_data) if run.eval_data is not None else None
    return Quantized(q, distill, rep, seconds, export_seconds, q_top1, onnx)


@dataclass(frozen=True)
class Bench:
    """onnxruntime milliseconds of the dense fp32 model and the INT8 file, and the speed-up."""

    latency: dict | None = None
    seconds: float | None = None


def bench(dense: nn.Module | None, example_input, quantized: Quantized,
          options: BenchOptions | None) -> Bench:
    if dense is None or quantized.onnx_path is None:
        return Bench()
    t = time.perf_counter()
    latency = measure_speedup(dense, example_input, quantized.onnx_path, options)
    return Bench(latency, time.perf_counter() - t)


def measure_speedup(dense: nn.Module, example_input, int8_path: Path, options: BenchOptions) -> dict:
    """onnxruntime latency of ``dense`` (exported to fp32 ONNX in a temp folder) and of the INT8
    file, interleaved (``latency.time_onnx``): milliseconds per batch and the speed-up."""
    with tempfile.TemporaryDirectory() as tmp:
        fp32 = export_onnx(dense.eval(), example_input, Path(tmp) / "dense_fp32.onnx", dynamo=False)
        med = time_onnx({"dense_fp32": fp32, "int8": int8_path}, options)
    return {
        "isa": cpu_features().describe(),
        "threads": options.threads,
        "rounds": options.rounds,
        "ms": {name: {str(b): round(1000 * s, 3) for b, s in per.items()} for name, per in med.items()},
        "speedup": {str(b): round(med["dense_fp32"][b] / med["int8"][b], 3) for b in options.batches},
    }


def _take(batches: Iterable, n: int) -> list:
    out, seen = [], 0
    for batch in batches:
        x, y = batch if isinstance(batch, (tuple, list)) else (batch, None)  # images alone
        out.append((x, y))
        seen += len(x)
        if seen >= n:
            break
    return out


def plain(obj: Any) -> Any:
    """A dataclass result as JSON-able plain values (tensors become lists)."""
    if hasattr(obj, "__dataclass_fields__"):
        return {k: plain(v) for k, v in asdict(obj).items()}
    if isinstance(obj, dict):
        return {k: plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [plain(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    return obj
