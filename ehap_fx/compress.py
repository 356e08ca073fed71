"""compress(): the whole EHAP pipeline on one screen.

    trace → group channels → rank (Hessian or L1) → select plan → shrink   (× target.steps)
          → fine-tune → INT8 (QAT or PTQ) → ONNX export, verified in onnxruntime

Each step is one of the passes in ``ehap_fx.passes`` (usable alone on a ``GraphModule``);
this function only chains them and records what happened in a ``CompressReport``.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import fx, nn

from ehap_fx import distributed
from ehap_fx.errors import EhapError
from ehap_fx.hessian import HessianOptions, group_sensitivity, group_stderr
from ehap_fx.latency import LatencyModel, LatencyOptions, LatencyTable
from ehap_fx.passes.cost import Cost, total_cost
from ehap_fx.passes.group import ChannelGroups, group_channels, groups_of, producer_modules
from ehap_fx.passes.shrink import shrink
from ehap_fx.passes.trace import trace
from ehap_fx.removal import estimate_removal
from ehap_fx.target import Target, magnitude_scores, measure, select_plan
from ehap_fx.train import FinetuneOptions, evaluate, finetune

log = logging.getLogger("ehap_fx")

SCORERS = ("hessian", "removal", "l1")


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
    seconds: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class CompressResult:
    """The pruned ``GraphModule``, the INT8 model and ONNX file when asked for, and the report."""

    pruned: fx.GraphModule
    report: CompressReport
    quantized: nn.Module | None = None
    onnx_path: Path | None = None


def conv_widths(gm: nn.Module) -> dict[str, int]:
    """Output channels of every conv/linear, by module name."""
    return {
        name: (m.out_channels if isinstance(m, nn.modules.conv._ConvNd) else m.out_features)
        for name, m in gm.named_modules()
        if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear))
    }


def _cost_dict(c: Cost, base: Cost | None = None) -> dict:
    d = {"macs": c.macs, "params": c.params}
    if base is not None:
        d.update(macs_ratio=c.macs / base.macs, params_ratio=c.params / base.params)
    return d


def _rank(
    gm, data, scorer: str, hessian: HessianOptions, loss_fn
) -> tuple[dict, dict | None, dict, dict | None]:
    """Scores per prunable group (higher = keep), their standard errors, a summary, and the
    scores of removing each group whole (None: the sums of its channel scores)."""
    if scorer == "l1":
        return magnitude_scores(gm), None, {"scorer": "l1"}, None
    groups = groups_of(gm)
    if scorer == "removal":
        if loss_fn is not None:
            raise EhapError(
                "scorer='removal' is exact for cross-entropy only: drop loss_fn, or "
                "use scorer='hessian' with estimator='hutchinson'"
            )
        removal = estimate_removal(gm, data, groups.prunable, hessian)
        return removal.scores, None, {"scorer": "removal", **removal.summary()}, removal.whole
    names = producer_modules(groups.prunable)
    # estimate_hessian itself, split over the ranks inside a torch.distributed process group
    result = distributed.estimate_hessian_distributed(
        gm, data, hessian, names=names, loss_fn=loss_fn, groups=groups.prunable
    )
    scores = group_sensitivity(groups.prunable, gm, result)
    stderr = group_stderr(groups.prunable, gm, result)
    return scores, stderr, {"scorer": "hessian", **result.summary()}, None


def _record(step: int, groups: ChannelGroups, plan, scores, stderr) -> list[GroupRecord]:
    out = []
    for g in groups.prunable:
        if g.id not in scores:
            continue
        kept = len(plan.keep.get(g.id, range(g.size)))
        members = tuple(f"{m.module or m.node}:{m.role}" for m in g.members)
        se = tuple(stderr[g.id].tolist()) if stderr is not None else None
        out.append(GroupRecord(step, g.id, g.size, kept, members, tuple(scores[g.id].tolist()), se))
    return out


def compress(
    model: nn.Module,
    example_input: torch.Tensor,
    *,
    data: Iterable | None = None,
    eval_data: Iterable | None = None,
    loss_fn: Callable | None = None,
    target: Target = Target(macs=0.5),
    scorer: str = "hessian",
    hessian: HessianOptions = HessianOptions(),
    finetune_options: FinetuneOptions | None = None,
    quantize: Any = None,
    export: str | Path | None = None,
    exclude: Sequence[str] = (),
    leaf_modules: Sequence[str | type[nn.Module]] = (),
    data_name: str | None = None,
    latency: LatencyOptions | None = None,
) -> CompressResult:
    """Prune ``model`` to ``target`` by Hessian-aware channel ranking, then optionally
    fine-tune, quantize to INT8 and export to ONNX.

    ``data`` yields ``(x, y)`` batches (e.g. ``ehap_fx.data.load_cifar(...).loader(128)``);
    without it, ranking runs on labelled synthetic data and the report says so. ``eval_data``
    adds top-1 accuracies at each stage. ``quantize`` is a ``passes.quantize.QuantizeOptions``
    (or None to stay fp32); ``export`` an ONNX path (needs ``quantize``). A latency target
    measures a per-conv onnxruntime table (``latency`` options, cached on disk). The input
    model is not modified.

    ``scorer``: ``"hessian"`` (the paper's per-channel trace sensitivity, ``hessian`` options),
    ``"removal"`` (``ehap_fx.removal``: the exact Gauss-Newton loss increase of removing each
    channel, ranked per unit of cost saved; same precision/batch options) or ``"l1"``.
    """
    if scorer not in SCORERS:
        raise ValueError(f"scorer={scorer!r} must be one of {SCORERS}")
    if export is not None and quantize is None:
        raise EhapError("export= writes the INT8 model: also pass quantize=QuantizeOptions()")
    if data is None:
        data, data_name = _synthetic_like(model, example_input)
        log.warning("no data given: ranking on %s; pass data= for a meaningful ranking", data_name)
    seconds: dict[str, float] = {}
    t = time.perf_counter()
    gm = group_channels(
        trace(copy.deepcopy(model).eval(), example_input, leaf_modules=leaf_modules), exclude
    ).graph_module
    distributed.broadcast_module(gm)  # under torchrun: every rank starts from rank 0's weights
    seconds["trace_group"] = time.perf_counter() - t
    base = total_cost(gm)
    report = CompressReport(
        data=data_name or "user data",
        target={
            "kind": target.kind,
            "fraction": target.fraction,
            "round_to": target.round_to,
            "max_prune": target.max_prune,
            "steps": target.steps,
            "granularity": target.granularity,
            "scorer": scorer,
        },
        cost_before=_cost_dict(base),
        channels_before=conv_widths(gm),
        pinned=[{"group": g.id, "size": g.size, "reason": g.pinned} for g in groups_of(gm).pinned],
    )
    if eval_data is not None:
        report.accuracy["dense"] = evaluate(gm, eval_data)
    gm = _prune(gm, data, target, scorer, hessian, loss_fn, finetune_options, latency, report, seconds)
    report.channels_after = conv_widths(gm)
    distributed.check_replicas(report.channels_after)
    train_data = distributed.shard_loader(data)  # this rank's share for DDP training
    if eval_data is not None:
        report.accuracy["pruned"] = evaluate(gm, eval_data)
    if finetune_options is not None:
        t = time.perf_counter()
        result = finetune(gm, train_data, finetune_options, eval_loader=eval_data)
        seconds["finetune"] = time.perf_counter() - t
        report.finetune = _plain(result)
        if eval_data is not None:
            report.accuracy["finetuned"] = evaluate(gm, eval_data)
    out = CompressResult(gm, report)
    if quantize is not None:
        qdata = train_data if getattr(quantize, "mode", None) == "qat" else data  # PTQ: same batches
        export = export if distributed.is_main() else None  # only rank 0 writes
        _quantize_and_export(out, example_input, qdata, eval_data, quantize, export, seconds)
    report.seconds = {k: round(v, 3) for k, v in seconds.items()}
    return out


def _quantize_and_export(
    out: CompressResult, example_input, data, eval_data, options, export, seconds
) -> None:
    from ehap_fx.passes.export import export as export_onnx
    from ehap_fx.passes.quantize import quantize as quantize_pass

    t = time.perf_counter()
    q = quantize_pass(out.pruned, example_input, data, options)
    seconds["quantize"] = time.perf_counter() - t
    out.quantized = q.graph_module
    out.report.quantize = {
        "backend": q.backend,
        "mode": q.mode,
        "steps": q.steps,
        "calibration_batches": q.calibration_batches,
        "seconds": round(q.seconds, 3),
    }
    if eval_data is not None:
        out.report.accuracy["int8_torch"] = evaluate(q.graph_module, eval_data)
    if export is not None:
        t = time.perf_counter()
        inputs = torch.cat([x for x, _ in _take(eval_data if eval_data is not None else data, 512)])[:512]
        rep = export_onnx(q, example_input, export, inputs=inputs, float_model=out.pruned)
        seconds["export"] = time.perf_counter() - t
        out.onnx_path = Path(export)
        out.report.export = {
            "path": str(rep.path),
            "int8_bytes": rep.int8_bytes,
            "fp32_bytes": rep.fp32_bytes,
            "quantized_conv_fraction": rep.quantized_conv_fraction,
            "op_counts": rep.op_counts,
            "argmax_agreement": rep.argmax_agreement,
            "max_abs_diff": rep.max_abs_diff,
            "max_diff_steps": rep.max_diff_steps,
            "summary": rep.summary(),
        }


def _prune(gm, data, target, scorer, hessian, loss_fn, finetune_options, latency, report, seconds):
    """The pruning loop: rank → select → shrink, ``target.steps`` times (fine-tuning between)."""
    base = total_cost(gm)
    table = LatencyTable(latency or LatencyOptions()) if target.kind == "latency" else None
    dense_value = None
    for step in range(1, target.steps + 1):
        t = time.perf_counter()
        scores, stderr, summary, whole = _rank(gm, data, scorer, hessian, loss_fn)
        seconds[f"rank_{step}"] = time.perf_counter() - t
        model_latency = LatencyModel(gm, table) if table is not None else None
        if dense_value is None:
            dense_value = measure(gm, target, latency=model_latency)
        fraction = target.at_step(step)
        plan = select_plan(
            gm,
            scores,
            target,
            fraction=fraction,
            base=dense_value,
            latency=model_latency,
            per_cost=scorer == "removal",
            whole=whole,
        )
        plan = distributed.broadcast_object(plan)  # rank 0's plan on every rank (latency timings differ)
        report.ranking.append({"step": step, **summary})
        report.groups.extend(_record(step, groups_of(gm), plan, scores, stderr))
        gm = shrink(gm, plan).graph_module
        if finetune_options is not None and step < target.steps:
            finetune(gm, distributed.shard_loader(data), finetune_options)
    report.cost_after = _cost_dict(total_cost(gm), base)
    if table is not None:
        after = measure(gm, target, latency=LatencyModel(gm, table))
        report.target.update(
            latency_before_s=dense_value, latency_after_s=after, latency_ratio=after / dense_value
        )
        if distributed.is_main():
            table.save()
    return gm


def _take(batches: Iterable, n: int) -> list:
    out, seen = [], 0
    for x, y in batches:
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


def _synthetic_like(model: nn.Module, example_input: torch.Tensor):
    from ehap_fx.data import synthetic_cifar

    with torch.no_grad():
        classes = copy.deepcopy(model).eval()(example_input).shape[-1]
    if tuple(example_input.shape[1:]) != (3, 32, 32):
        raise EhapError(
            f"no data given and example_input {tuple(example_input.shape)} is not CIFAR-shaped: pass data="
        )
    synthetic = synthetic_cifar(512, num_classes=classes, seed=0)
    return synthetic.loader(128, shuffle=True, seed=0), synthetic.name
