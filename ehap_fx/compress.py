"""compress(): the whole EHAP pipeline on one screen.

    trace → group channels → rank (Hessian or L1) → select plan → shrink   (× target.steps)
          → fine-tune → INT8 (QAT or PTQ) → ONNX export, verified in onnxruntime

Each step is one of the passes in ``ehap_fx.passes`` (usable alone on a ``GraphModule``);
this function only chains them and records what happened in a ``CompressReport``.
"""

from __future__ import annotations

import copy
import functools
import itertools
import logging
import tempfile
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import fx, nn

from ehap_fx import _meta, distributed, process_group
from ehap_fx.data import OwnLabels, yields_images_only
from ehap_fx.errors import ArgumentError, DataError, EhapError, TargetError
from ehap_fx.isa import cpu_features
from ehap_fx.latency import BenchOptions, LatencyModel, LatencyOptions, LatencyTable, time_onnx
from ehap_fx.latency_loop import Delivered, LoopOptions, LoopReport, OnnxTimer, deliver
from ehap_fx.passes.capture import capture_groups
from ehap_fx.passes.compensate import CompensateOptions
from ehap_fx.passes.compensate import compensate as repair
from ehap_fx.passes.cost import Cost, conv_widths, total_cost
from ehap_fx.passes.coupling import Rules
from ehap_fx.passes.export import export as export_int8
from ehap_fx.passes.export import export_onnx as export_fp32
from ehap_fx.passes.export import onnx_top1
from ehap_fx.passes.group import ChannelGroups, groups_of
from ehap_fx.passes.quantize import QAT_FINETUNE, QuantizeOptions
from ehap_fx.passes.shrink import PrunePlan, shrink
from ehap_fx.passes.trace import call_with
from ehap_fx.qat import quantize as quantize_int8
from ehap_fx.scoring import SCORERS, HessianOptions, Ranking, rank
from ehap_fx.target import DEFAULT_ROUND_TO, Target, measure, select_plan
from ehap_fx.train import DistillOptions, FinetuneOptions, evaluate, finetune

log = logging.getLogger("ehap_fx")


@dataclass(frozen=True)
class Recipe:
    """The default recipe: what ``compress()`` and ``ehap compress`` do where they are not told
    otherwise, one value for both. Chosen from the accuracy–latency front (docs/results.md,
    "Accuracy at speed"): the ranking (``scorer``, with data), what may go (``granularity``,
    ``round_to``), distillation from the dense model during fine-tuning and QAT (``distill``)
    and the INT8 mode (``quant_mode``): PTQ. On the README's ResNet-56 job QAT (391 steps,
    starting from the PTQ model) ties PTQ (−0.02 and −0.08 pt, ±0.12, two seeds) at 15–29× its
    cost, and a QAT learning rate ten times higher loses 0.42 pt; ``quant_mode="qat"`` still
    runs it, kept only if it beats PTQ on held-out training images (``ptq_fallback``).

    ``compress()`` trains only when asked (it is a graph pass first): its ``target`` and
    ``scorer`` defaults are the recipe's, and ``finetune_options=RECIPE.finetune(epochs)``,
    ``quantize=RECIPE.quantize()`` give it the CLI's training half.

    >>> RECIPE.target(latency=0.5).granularity == RECIPE.granularity
    True
    """

    scorer: str = "removal"
    granularity: str = "both"
    round_to: int = DEFAULT_ROUND_TO
    distill: DistillOptions | None = DistillOptions()
    quant_mode: str = "ptq"

    def target(self, **fraction: float) -> Target:
        """``Target`` of the given fraction (default ``macs=0.5``) with the recipe's granularity
        and rounding."""
        return Target(**(fraction or {"macs": 0.5}), granularity=self.granularity, round_to=self.round_to)

    def finetune(self, epochs: float = 1.0, **options: Any) -> FinetuneOptions:
        """The fine-tune of ``epochs``, distilled as the recipe says (``options``: the rest)."""
        return FinetuneOptions(epochs=epochs, **{"distill": self.distill, **options})

    def quantize(self, **options: Any) -> QuantizeOptions:
        """INT8 in the recipe's mode; QAT's loop distilled as the recipe says."""
        return QuantizeOptions(mode=self.quant_mode, finetune=replace(QAT_FINETUNE, distill=self.distill),
                               **options)


#: The one default recipe (see :class:`Recipe`).
RECIPE = Recipe()


@dataclass(frozen=True)
class CompressOptions:
    """``compress``'s keyword arguments of these names as one typed value: the CLI builds one from
    its flags and a preset (``ehap_fx.cli.PRESETS``), then calls
    ``compress(model, x, data=..., **vars(options))``."""

    target: Target = RECIPE.target()
    scorer: str | None = None
    hessian: HessianOptions = HessianOptions()
    finetune_options: FinetuneOptions | None = None
    quantize: QuantizeOptions | None = None
    latency: LatencyOptions | None = None
    bench: BenchOptions | None = None
    latency_loop: LoopOptions | None = None
    compensate: CompensateOptions | None = CompensateOptions()

    def __post_init__(self) -> None:
        if self.scorer is not None and self.scorer not in SCORERS:
            raise ValueError(f"scorer={self.scorer!r} must be one of {SCORERS}")


@dataclass(frozen=True)
class GroupRecord:
    """One prunable group in the report: its members, scores, and what was kept."""

    step: int
    group: int
    size: int
    kept: int
    members: tuple[str, ...]
    scores: tuple[float, ...]
    stderr: tuple[float, ...] | None


@dataclass
class CompressReport:
    """Everything ``compress`` measured, JSON-ready through ``to_dict()``."""

    data: str
    target: dict
    cost_before: dict
    cost_after: dict = field(default_factory=dict)
    channels_before: dict[str, int] = field(default_factory=dict)
    channels_after: dict[str, int] = field(default_factory=dict)
    groups: list[GroupRecord] = field(default_factory=list)
    pinned: list[dict] = field(default_factory=list)
    ranking: list[dict] = field(default_factory=list)  # per step: scorer + Hessian summary
    accuracy: dict[str, float] = field(default_factory=dict)
    finetune: dict | None = None
    quantize: dict | None = None
    export: dict | None = None
    latency: dict | None = None  # onnxruntime: dense fp32 vs the INT8 file, per batch size
    latency_loop: dict | None = None  # a latency target measured in the loop (latency_loop.LoopReport)
    compensation: dict | None = None  # the least-squares repair after pruning (passes.compensate)
    seconds: dict[str, float] = field(default_factory=dict)
    capture: dict = field(default_factory=dict)  # which capture made the graph, and why (passes.capture)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class CompressResult:
    """The pruned ``GraphModule``, the INT8 model and ONNX file when asked for, the report, and the
    teacher distilled from (e.g. to distil a later QAT from the same model)."""

    pruned: fx.GraphModule
    report: CompressReport
    quantized: nn.Module | None = None
    onnx_path: Path | None = None
    teacher: nn.Module | None = None  # the frozen model distilled from, when distilling


def _cost_dict(c: Cost, base: Cost | None = None) -> dict:
    d = {"macs": c.macs, "params": c.params}
    if base is not None:
        d.update(macs_ratio=c.macs / base.macs, params_ratio=c.params / base.params)
    return d


def compress(
    model: nn.Module,
    example_input: torch.Tensor | tuple | dict,
    *,
    data: Iterable | None = None,
    eval_data: Iterable | None = None,
    loss_fn: Callable | None = None,
    target: Target = RECIPE.target(),
    scorer: str | None = None,
    hessian: HessianOptions = HessianOptions(),
    finetune_options: FinetuneOptions | None = None,
    quantize: QuantizeOptions | None = None,
    export: str | Path | None = None,
    exclude: Sequence[str] = (),
    leaf_modules: Sequence[str | type[nn.Module]] = (),
    data_name: str | None = None,
    latency: LatencyOptions | None = None,
    teacher: nn.Module | None = None,
    capture: str = "auto",
    bench: BenchOptions | None = None,
    latency_loop: LoopOptions | None = None,
    compensate: CompensateOptions | None = CompensateOptions(),
    rules: Rules | None = None,
) -> CompressResult:
    """Prune ``model`` to ``target`` by Hessian-aware channel ranking, then optionally
    fine-tune, quantize to INT8 and export to ONNX.

    ``example_input`` is one input tensor, a tuple of positional inputs or a dict of keyword
    inputs; the outputs (a tensor, or tuples/dicts of them) keep their shapes.

    ``data`` yields ``(x, y)`` batches (e.g. ``ehap_fx.data.load_cifar(...).loader(128)``).
    Without it the default ranking is L1 weight magnitude (one warning says so); a Hessian
    ``scorer`` asked for explicitly then ranks on synthetic inputs shaped like
    ``example_input``, labelled by the model's own predictions, and the report says so.
    ``loss_fn(output, y)`` (a scalar) says how to score outputs that are not class logits. ``eval_data``
    adds top-1 accuracies at each stage. ``quantize`` is a ``passes.quantize.QuantizeOptions``
    (or None to stay fp32); ``export`` an ONNX path (needs ``quantize``). A latency target
    measures a per-conv onnxruntime table (``latency`` options, cached on disk). The input
    model is not modified.

    ``scorer``: ``"hessian"`` (the paper's per-channel trace sensitivity, ``hessian`` options),
    ``"removal"`` (``ehap_fx.scoring.removal``: the exact Gauss-Newton loss increase of removing each
    channel, ranked per unit of cost saved; same precision/batch options) or ``"l1"``
    (default: :data:`RECIPE`'s, ``"removal"``, with ``data``, as the CLI; ``"hessian"`` with
    data and a ``loss_fn``; ``"l1"`` without data). ``target`` defaults to ``RECIPE.target()``
    (0.5 of the MACs, the recipe's granularity and rounding).

    Training happens only when asked: ``finetune_options=RECIPE.finetune(1)`` and
    ``quantize=RECIPE.quantize()`` are the CLI's (distilled, QAT kept only if it beats PTQ).
    Distillation: when ``finetune_options.distill`` (or ``quantize.finetune.distill``) is set,
    fine-tuning (and QAT) also learn from ``teacher``'s softened logits — by default
    (``DistillOptions.teacher="finetuned"``) the dense model fine-tuned first with the same
    ``finetune_options`` from the labels alone (``report.accuracy["dense_finetuned"]``: the
    baseline at equal budget), or the dense ``model`` as given (``teacher="given"``, or
    without a fine-tune).

    ``rules``: coupling rules for modules of your own, added to the default ones
    (``passes.coupling``): ``Rules(modules={MyAct: same_channels})``.

    ``capture``: ``"auto"`` (default: FX, else torch.export, and export where it keeps more
    channels prunable than a partial FX graph; ``report.capture`` says which ran and why,
    ``passes.capture``), ``"fx"`` (symbolic_trace) or ``"export"`` (an ATen graph;
    ``passes.program.exported_program(result.pruned)`` is the pruned ``ExportedProgram``;
    quantize with ``backend="pt2e"``).

    ``bench`` (with ``export``): time the dense fp32 model and the INT8 file in onnxruntime on
    this machine (``report.latency``: milliseconds per batch size, the speed-up).

    ``latency_loop`` (with a latency target): measure the plan, not only predict it — export
    the candidate and the dense model to INT8 ONNX, time them interleaved and correct the plan
    until the measured ratio meets the target (``ehap_fx.latency_loop.deliver``;
    ``report.latency_loop``: rounds, predicted and measured ratios per batch, noise, or why
    the loop stopped, e.g. a machine too noisy to decide).
    ``compensate`` (with ``data``; None turns it off): after pruning, refit the surviving weights
    layer by layer to reproduce the dense model's activations on ``compensate.images`` inputs of
    ``data`` (``passes.compensate``; no labels read). Without ``finetune_options`` that is the
    post-training recipe; with it, the fine-tune starts from the repaired model.
    ``report.accuracy["pruned"]`` is the top-1 before the repair, ``["compensated"]`` after.
    ``data`` may yield inputs alone (no labels): the ranking then draws its labels from the
    model's own softmax (Monte-Carlo, as the GGN estimators assume); fine-tuning needs labels.
    """
    target, quantize, finetune_options, bench = _edge_options(target, quantize, finetune_options, hessian,
                                                              latency, bench, export)
    images = data  # the user's own batches, for the repair (which reads no labels)
    data, data_name = _edge_data(model, data, eval_data, data_name, finetune_options, quantize, loss_fn)
    scorer = _default_scorer(scorer, data, loss_fn)
    CompressOptions(target, scorer, hessian, finetune_options, quantize, latency, bench, latency_loop,
                    compensate)  # validates
    compensate = compensate if data is not None else None  # the user's data only, never synthetic
    if export is not None and quantize is None:
        raise EhapError("export= writes the INT8 model: also pass quantize=RECIPE.quantize() (PTQ) or True")
    if scorer != "l1":
        _check_loss(model, example_input, data, loss_fn, scorer)
    if data is None and scorer != "l1":
        data, data_name = synthetic_like(model, example_input, hessian, loss_fn)
        log.warning("no data given: ranking on %s; pass data= for a meaningful ranking", data_name)
    seconds: dict[str, float] = {}
    t = time.perf_counter()
    gm = capture_groups(copy.deepcopy(model).eval(), example_input, capture=capture,
                        leaf_modules=leaf_modules, exclude=exclude, rules=rules)
    process_group.broadcast_module(gm)  # under torchrun: every rank starts from rank 0's weights
    seconds["trace_group"] = time.perf_counter() - t
    base = total_cost(gm)
    report = CompressReport(
        data=data_name or ("none (L1 ranking needs no data)" if data is None else "user data"),
        target={**{k: getattr(target, k) for k in ("kind", "fraction", "round_to", "max_prune", "steps",
                                                      "granularity")}, "scorer": scorer},
        cost_before=_cost_dict(base),
        channels_before=conv_widths(gm),
        pinned=[{"group": g.id, "size": g.size, "reason": g.pinned} for g in groups_of(gm).pinned],
        capture=gm.meta[_meta.CAPTURED].as_dict(),
    )
    if eval_data is not None:
        report.accuracy["dense"] = evaluate(gm, eval_data)
    teacher, dense = _teacher_and_dense(gm, teacher, finetune_options, quantize, bench, export,
                                        data, eval_data, report, seconds)
    table = LatencyTable(latency or LatencyOptions()) if target.kind == "latency" else None
    reference = copy.deepcopy(gm).eval() if compensate is not None else None  # what the repair matches

    def between(gm: fx.GraphModule, step: int) -> None:
        finetune(gm, distributed.shard_loader(data), finetune_options,
                 teacher=teacher if finetune_options.distill is not None else None)

    try:
        pruned = prune(gm, target, lambda g, _: rank(g, data, scorer, hessian, loss_fn=loss_fn),
                       between=between if finetune_options is not None else None, latency=table,
                       loop=_latency_loop(latency_loop, table, example_input, data, quantize))
    except TargetError as e:  # say what holds the channels back
        reasons = "; ".join(f"{c} channels: {r}" for c, r in groups_of(gm).pin_reasons())
        raise TargetError(f"{e}. Largest pins: {reasons}") from e
    gm = pruned.graph_module
    report.cost_after = _cost_dict(total_cost(gm), base)
    _record_pruning(report, pruned, target, table, seconds)
    report.channels_after = conv_widths(gm)
    process_group.check_replicas(report.channels_after)
    train_data = distributed.shard_loader(data)  # this rank's share for DDP training
    if eval_data is not None:
        report.accuracy["pruned"] = evaluate(gm, eval_data)
    gm = _compensate(gm, reference, images, compensate, report, eval_data, seconds,
                     recipe="start of the fine-tune" if finetune_options else "post-training (no fine-tune)")
    del reference
    if finetune_options is not None:
        t = time.perf_counter()
        result = finetune(gm, train_data, finetune_options, eval_loader=eval_data,
                          teacher=teacher if finetune_options.distill is not None else None)
        seconds["finetune"] = time.perf_counter() - t
        report.finetune = {**_plain(result), "distill": _plain(finetune_options.distill)
                           if finetune_options.distill is not None and teacher is not None else None}
        if eval_data is not None:
            report.accuracy["finetuned"] = evaluate(gm, eval_data)
    out = CompressResult(gm, report, teacher=teacher)
    if quantize is not None:
        # PTQ and the QAT-against-PTQ check: rank 0's first batches on every rank (one choice)
        first = list(itertools.islice(data, quantize.calibration_batches)) if data is not None else None
        calibration = process_group.broadcast_object(first)
        qdata = train_data if quantize.mode == "qat" else calibration
        export = export if process_group.is_main() else None  # only rank 0 writes
        _quantize_and_export(out, example_input, qdata, eval_data, quantize, export, seconds, teacher,
                             calibration=calibration)
    if dense is not None and out.onnx_path is not None:
        t = time.perf_counter()
        report.latency = measure_speedup(dense, example_input, out.onnx_path, bench)
        seconds["bench"] = time.perf_counter() - t
    report.seconds = {k: round(v, 3) for k, v in seconds.items()}
    return out


def _compensate(gm: fx.GraphModule, reference: fx.GraphModule, data, options: CompensateOptions,
                report: CompressReport, eval_data, seconds: dict, recipe: str) -> fx.GraphModule:
    """The least-squares repair of the pruned ``gm`` against the dense ``reference`` (none: ``gm``
    as it is), recorded."""
    if reference is None:
        return gm
    t = time.perf_counter()
    gm = repair(gm, reference, data, options).graph_module
    process_group.broadcast_module(gm)  # one repair on every rank (rank 0's)
    seconds["compensate"] = time.perf_counter() - t
    report.compensation = {**gm.meta[_meta.COMPENSATION].summary(), "recipe": recipe,
                           "options": _plain(options)}
    if eval_data is not None:
        report.accuracy["compensated"] = evaluate(gm, eval_data)
    return gm


def measure_speedup(dense: nn.Module, example_input, int8_path: Path, options: BenchOptions) -> dict:
    """onnxruntime latency of ``dense`` (exported to fp32 ONNX in a temp folder) and of the INT8
    file, interleaved (``latency.time_onnx``): milliseconds per batch and the speed-up."""
    with tempfile.TemporaryDirectory() as tmp:
        fp32 = export_fp32(dense.eval(), example_input, Path(tmp) / "dense_fp32.onnx", dynamo=False)
        med = time_onnx({"dense_fp32": fp32, "int8": int8_path}, options)
    return {
        "isa": cpu_features().describe(),
        "threads": options.threads,
        "rounds": options.rounds,
        "ms": {name: {str(b): round(1000 * s, 3) for b, s in per.items()} for name, per in med.items()},
        "speedup": {str(b): round(med["dense_fp32"][b] / med["int8"][b], 3) for b in options.batches},
    }


def _quantize_and_export(
    out: CompressResult, example_input, data, eval_data, options, export, seconds, teacher, calibration=None
) -> None:
    t = time.perf_counter()
    q = quantize_int8(out.pruned, example_input, data, options, teacher=teacher, calibration=calibration)
    distill = options.finetune.distill if options.mode == "qat" and teacher is not None else None
    seconds["quantize"] = time.perf_counter() - t
    out.quantized = q.graph_module
    out.report.quantize = {
        "backend": q.backend,
        "mode": q.mode,  # the kept model's: "ptq" when QAT ran but did not beat PTQ (check)
        "asked": options.mode,
        "qat_ranges": options.qat_ranges if options.mode == "qat" else None,
        "check": q.check,
        "steps": q.steps,
        "calibration_batches": q.calibration_batches,
        "seconds": round(q.seconds, 3),
        "scheme": q.scheme.as_dict(),
        "distill": asdict(distill) if distill is not None else None,
    }
    if eval_data is not None:
        out.report.accuracy["int8_torch"] = evaluate(q.graph_module, eval_data)
    if export is not None:
        t = time.perf_counter()
        inputs = torch.cat([x for x, _ in _take(eval_data if eval_data is not None else data, 512)])[:512]
        rep = export_int8(q, example_input, export, inputs=inputs, float_model=out.pruned)
        seconds["export"] = time.perf_counter() - t
        out.onnx_path = Path(export)
        fields = ("int8_bytes", "fp32_bytes", "quantized_conv_fraction", "op_counts", "argmax_agreement",
                  "max_abs_diff", "max_diff_steps", "isa")
        out.report.export = {"path": str(rep.path), **{k: getattr(rep, k) for k in fields},
                             "summary": rep.summary()}
        if eval_data is not None:
            out.report.accuracy["int8_onnx"] = onnx_top1(rep.path, eval_data)


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


def _record_pruning(report: CompressReport, pruned: Pruned, target: Target, table, seconds: dict) -> None:
    """The steps of ``pruned`` in ``report`` (rankings, groups, cost, latency) and ``seconds``."""
    gm = pruned.graph_module
    for s in pruned.steps:
        seconds[f"rank_{s.step}"] = s.seconds
        report.ranking.append({"step": s.step, **s.ranking.summary})
        scores, stderr = s.ranking.scores, s.ranking.stderr
        for g in (g for g in s.groups.prunable if g.id in scores):
            members = tuple(f"{m.module or m.node}:{m.role}" for m in g.members)
            se = tuple(stderr[g.id].tolist()) if stderr is not None else None
            report.groups.append(GroupRecord(s.step, g.id, g.size, len(s.plan.keep.get(g.id, range(g.size))),
                                             members, tuple(scores[g.id].tolist()), se))
    if table is not None:
        after = measure(gm, target, latency=LatencyModel(gm, table))
        report.target.update(latency_before_s=pruned.dense, latency_after_s=after,
                             latency_ratio=after / pruned.dense)
        if process_group.is_main():
            table.save()
    if pruned.loop is not None:
        report.latency_loop = pruned.loop.as_dict()
        seconds["latency_loop"] = pruned.loop.seconds
        log.info("%s", pruned.loop.summary())


def _take(batches: Iterable, n: int) -> list:
    out, seen = [], 0
    for batch in batches:
        x, y = batch if isinstance(batch, (tuple, list)) else (batch, None)  # images alone
        out.append((x, y))
        seen += len(x)
        if seen >= n:
            break
    return out


def _plain(obj: Any) -> Any:
    """A dataclass result as JSON-able plain values (tensors become lists)."""
    if hasattr(obj, "__dataclass_fields__"):
        return {k: _plain(v) for k, v in asdict(obj).items()}
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    return obj


def _teacher_and_dense(gm: fx.GraphModule, teacher, options: FinetuneOptions | None,
                       quantize: QuantizeOptions | None, bench, export, data, eval_data, report, seconds):
    """``(teacher, dense)``: the teacher distilled from (None without distillation; the one given;
    with ``DistillOptions.teacher="finetuned"`` and a fine-tune budget, the dense graph fine-tuned
    first with that budget; else a frozen dense copy) and the frozen dense copy for the speed-up
    timing (None without it), made only when one of them needs it."""
    distill = (options.distill if options is not None else None) or (
        quantize.finetune.distill if quantize is not None else None)
    if distill is None:
        teacher = None
    default = distill is not None and teacher is None
    train_teacher = default and options is not None and distill.teacher == "finetuned"
    as_given = default and not train_teacher
    timed = bench is not None and export is not None
    dense = copy.deepcopy(gm).eval().requires_grad_(False) if timed or as_given else None
    if train_teacher:
        teacher = _finetuned_teacher(gm, data, options, eval_data, report, seconds)
    return (dense if as_given else teacher), (dense if timed else None)


def _finetuned_teacher(gm: fx.GraphModule, data, options: FinetuneOptions, eval_data, report,
                       seconds) -> nn.Module:
    """The default teacher: the dense graph fine-tuned with the student's budget from the labels
    alone, frozen; its top-1 is the baseline the pruned model is measured against."""
    t = time.perf_counter()
    teacher = copy.deepcopy(gm)
    finetune(teacher, distributed.shard_loader(data), replace(options, distill=None))
    teacher.eval().requires_grad_(False)
    seconds["teacher_finetune"] = time.perf_counter() - t
    if eval_data is not None:
        report.accuracy["dense_finetuned"] = evaluate(teacher, eval_data)
    log.info("teacher: the dense model fine-tuned with the same budget (%.0f s)",
             seconds["teacher_finetune"])
    return teacher


def _default_scorer(scorer: str | None, data, loss_fn=None) -> str:
    """The scorer asked for; else the recipe's with data (``RECIPE.scorer``, the CLI's default
    too), the paper's ``"hessian"`` when a ``loss_fn`` replaces cross-entropy and the recipe's is
    the removal criterion (exact for cross-entropy only), and ``"l1"`` (with one warning)
    without data."""
    if scorer is not None:
        return scorer
    if data is not None:
        return "hessian" if loss_fn is not None and RECIPE.scorer == "removal" else RECIPE.scorer
    warnings.warn(
        "compress(): no data given, so channels are ranked by L1 weight magnitude. A Hessian "
        "ranking needs data=: (inputs, labels) batches from the task (scorer='hessian' or "
        "'removal'); scorer='hessian' without data ranks on synthetic inputs labelled by the "
        "model's own predictions.",
        UserWarning,
        stacklevel=3,
    )
    return "l1"


def _model_output(model: nn.Module, example_input) -> Any:
    with torch.no_grad():
        return call_with(copy.deepcopy(model).eval(), example_input)


def _check_loss(model: nn.Module, example_input, data, loss_fn, scorer: str) -> None:
    """A Hessian scorer needs one input tensor and a scalar loss of the output: say what to
    change before any estimate starts."""
    if not torch.is_tensor(example_input):
        raise EhapError(
            f"scorer={scorer!r} ranks with (x, y) tensor batches, and example_input is a "
            f"{type(example_input).__name__}: use scorer='l1' for models with several inputs"
        )
    batch = _peek(data) if data is not None else None
    out = _model_output(model, batch[0] if batch is not None else example_input)
    if loss_fn is None:
        if not torch.is_tensor(out) or out.dim() != 2:
            what = f"a {type(out).__name__}" if not torch.is_tensor(out) else f"shaped {tuple(out.shape)}"
            raise EhapError(
                f"scorer={scorer!r} needs a loss: the model's output is {what}, not (N, classes) "
                "logits; pass loss_fn=lambda output, y: ... returning a scalar (e.g. "
                "F.mse_loss(output['out'], y)), or scorer='l1'"
            )
        return
    if data is not None and batch is None:
        return  # a one-shot iterator: not read ahead
    y = batch[1] if batch is not None else _own_labels(out, loss_fn)
    try:
        loss = loss_fn(out, y)
    except Exception as e:
        raise EhapError(f"loss_fn(output, y) failed on a first batch: {type(e).__name__}: {e}") from e
    if not torch.is_tensor(loss) or loss.dim() != 0:
        shape = tuple(loss.shape) if torch.is_tensor(loss) else type(loss).__name__
        raise EhapError(
            f"loss_fn returned {shape}, not a scalar: reduce it (e.g. .mean()) so that the "
            "Hessian of one number is estimated"
        )


def _peek(data) -> tuple | None:
    """The first ``(x, y)`` batch (a few samples of it), when reading it does not consume the data."""
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(torch.is_tensor(t) for t in data):
        return data[0][:2], data[1][:2]  # an (x, y) pair of tensors
    if iter(data) is data:  # a one-shot iterator: leave it alone
        return None
    for x, y in data:
        return x[:2], y[:2]
    return None


def _own_labels(out, loss_fn):
    """What the model predicts, as training labels: classes for logits, else the output itself."""
    if loss_fn is None and torch.is_tensor(out) and out.dim() == 2:
        return out.argmax(1)
    return torch.utils._pytree.tree_map(lambda t: t.detach() if torch.is_tensor(t) else t, out)


def synthetic_like(model: nn.Module, example_input: torch.Tensor, hessian: HessianOptions, loss_fn=None):
    """Gaussian inputs shaped like ``example_input`` (its mean and std), as many as the Hessian
    options draw, labelled by the model's own predictions (argmax of logits; the output itself
    when ``loss_fn`` says how to compare outputs), in batches of 64 (one ``(x, y)`` pair for
    labels that are not class indices), and their name."""
    n = hessian.batch_size * hessian.n_batches
    gen = torch.Generator().manual_seed(0)
    x = example_input.detach().float()
    mean, std = float(x.mean()), float(x.std()) if x.numel() > 1 else 1.0
    std = std if std > 0 else 1.0
    work = copy.deepcopy(model).eval()
    batches = []
    with torch.no_grad():
        for i in range(0, n, 64):
            xb = torch.randn((min(64, n - i), *x.shape[1:]), generator=gen) * std + mean
            xb = xb.to(example_input.dtype)
            batches.append((xb, _own_labels(work(xb), loss_fn)))
    if not all(torch.is_tensor(y) and y.dim() == 1 for _, y in batches):
        # labels that are not class indices: one (x, y) pair (sampling.draw_batches reads a
        # list of batches only when its labels are 1-D)
        batches = (torch.cat([x for x, _ in batches]), torch.cat([y for _, y in batches]))
    name = (f"synthetic: {n} Gaussian inputs shaped like example_input, labelled by the model's "
            "own predictions")
    return batches, name


# ---------------------------------------------------------------------------------------------
# The edge: compress()'s arguments checked once, with the fix named
# ---------------------------------------------------------------------------------------------


def _edge_options(target, quantize, finetune_options, hessian, latency, bench, export):
    """``(target, quantize, finetune_options, bench)`` as compress() uses them: a float target is
    the fraction of MACs kept (``RECIPE.target(macs=...)``), ``quantize=True/False`` the recipe's
    INT8 or none, ``bench=True`` the default timing; anything else of the wrong kind is refused,
    naming what fits."""
    if isinstance(target, (int, float)) and not isinstance(target, bool):
        try:
            target = RECIPE.target(macs=float(target))
        except ValueError as e:
            raise TargetError(f"target={target!r}, a fraction of the MACs to keep: {e}") from e
    if quantize is True:
        quantize = RECIPE.quantize()
    if quantize is False:
        quantize = None
    if bench is True:
        bench = BenchOptions()
    if bench is False:
        bench = None
    if finetune_options is False:
        finetune_options = None
    for name, value, kind, fix in (
        ("target", target, Target, "Target(macs=0.5), RECIPE.target(latency=0.5) or a float (MACs kept)"),
        ("quantize", quantize, QuantizeOptions, "RECIPE.quantize() (PTQ), QuantizeOptions(), True or None"),
        ("finetune_options", finetune_options, FinetuneOptions, "RECIPE.finetune(epochs=1) or None"),
        ("hessian", hessian, HessianOptions, "HessianOptions(...)"),
        ("latency", latency, LatencyOptions, "LatencyOptions(...) or None"),
        ("bench", bench, BenchOptions, "BenchOptions(...), True or None"),
        ("export", export, (str, Path), "a path such as 'out/model_int8.onnx', or None"),
    ):
        if value is not None and not isinstance(value, kind):
            raise ArgumentError(f"compress({name}={value!r:.60}): expected {fix}")
    if target is None:
        raise ArgumentError("compress(target=None): expected Target(macs=0.5), RECIPE.target(...) or a float")
    return target, quantize, finetune_options, bench


def _edge_data(model: nn.Module, data, eval_data, data_name: str | None, finetune_options, quantize, loss_fn):
    """``(data, data_name)``: images alone (a tensor, a list of tensors, a loader of bare
    tensors) become ``(x, y)`` batches labelled by the model's own predictions, which is all
    ranking and PTQ calibration need; the steps that learn from or score against labels are
    named and refused."""
    if eval_data is not None and yields_images_only(eval_data):
        raise DataError("eval_data yields images without labels: top-1 accuracy needs (images, labels) "
                        "batches; pass labelled batches or eval_data=None")
    if data is None or not yields_images_only(data, dense_targets=loss_fn is not None):
        return data, data_name
    needs = [what for what, on in (
        ("fine-tuning (finetune_options)", finetune_options is not None),
        ("QAT (quantize mode='qat')", quantize is not None and quantize.mode == "qat"),
        ("loss_fn(output, y)", loss_fn is not None)) if on]
    if needs:
        raise DataError(f"data yields images without labels, and {' and '.join(needs)} needs labels: pass "
                        "(images, labels) batches, or leave those out (ranking and PTQ calibration need "
                        "none: finetune_options=None, quantize=RECIPE.quantize(), PTQ)")
    name = f"{data_name or 'user data'} (unlabelled: ranked against the dense model's own predictions)"
    return OwnLabels(data, model), name
