"""``CompressReport``: what ``compress()`` did, built once from its steps' results (``steps``).

JSON-ready through ``to_dict()``; ``ehap_fx.report`` writes it as report.json and report.md.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from ehap_fx.edge import Inputs
from ehap_fx.passes.cost import Cost
from ehap_fx.steps import Bench, Captured, Quantized, Repaired, Shrunk, Teachers, Tuned, plain

TARGET_FIELDS = ("kind", "fraction", "round_to", "max_prune", "steps", "granularity")
#: report.export's fields, read from ``passes.export.ExportReport``
EXPORT_FIELDS = ("int8_bytes", "fp32_bytes", "quantized_conv_fraction", "op_counts", "argmax_agreement",
                 "max_abs_diff", "max_diff_steps", "isa")


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


def cost_dict(c: Cost, base: Cost | None = None) -> dict:
    d = {"macs": c.macs, "params": c.params}
    if base is not None:
        d.update(macs_ratio=c.macs / base.macs, params_ratio=c.params / base.params)
    return d


def build(run: Inputs, options, captured: Captured, teachers: Teachers, shrunk: Shrunk, repaired: Repaired,
          tuned: Tuned, quantized: Quantized, bench: Bench) -> CompressReport:
    """The report of one ``compress()`` run from its steps' results."""
    target = options.target
    steps = shrunk.pruned.steps
    accuracy = {k: v for k, v in (
        ("dense", captured.top1), ("dense_finetuned", teachers.top1), ("pruned", shrunk.top1),
        ("compensated", repaired.top1), ("finetuned", tuned.top1), ("int8_torch", quantized.top1),
        ("int8_onnx", quantized.onnx_top1)) if v is not None}
    seconds = {k: v for k, v in (
        ("trace_group", captured.seconds), ("teacher_finetune", teachers.seconds),
        *((f"rank_{s.step}", s.seconds) for s in steps),
        ("latency_loop", shrunk.pruned.loop.seconds if shrunk.pruned.loop is not None else None),
        ("compensate", repaired.seconds), ("finetune", tuned.seconds), ("quantize", quantized.seconds),
        ("export", quantized.export_seconds), ("bench", bench.seconds)) if v is not None}
    return CompressReport(
        data=run.name,
        target={**{k: getattr(target, k) for k in TARGET_FIELDS}, "scorer": run.scorer,
                "pruned_from": "dense_finetuned" if teachers.start is not None else "dense",
                **(shrunk.latency or {})},
        cost_before=cost_dict(captured.cost),
        cost_after=cost_dict(shrunk.cost, captured.cost),
        channels_before=captured.widths,
        channels_after=shrunk.widths,
        groups=[r for s in steps for r in _groups(s)],
        pinned=captured.pinned,
        ranking=[{"step": s.step, **s.ranking.summary} for s in steps],
        accuracy=accuracy,
        finetune={**plain(tuned.result), "distill": tuned.distill} if tuned.result is not None else None,
        quantize=_quantize(options.quantize, quantized),
        export=_export(quantized),
        latency=bench.latency,
        latency_loop=shrunk.pruned.loop.as_dict() if shrunk.pruned.loop is not None else None,
        compensation=repaired.summary,
        seconds={k: round(v, 3) for k, v in seconds.items()},
        capture=captured.how,
    )


def _groups(step) -> list[GroupRecord]:
    scores, stderr = step.ranking.scores, step.ranking.stderr
    return [GroupRecord(step.step, g.id, g.size, len(step.plan.keep.get(g.id, range(g.size))),
                        tuple(f"{m.module or m.node}:{m.role}" for m in g.members),
                        tuple(scores[g.id].tolist()),
                        tuple(stderr[g.id].tolist()) if stderr is not None else None)
            for g in step.groups.prunable if g.id in scores]


def _quantize(options, q: Quantized) -> dict | None:
    if q.result is None:
        return None
    r = q.result
    return {
        "backend": r.backend,
        "mode": r.mode,  # the kept model's: "ptq" when QAT ran but did not beat PTQ (check)
        "asked": options.mode,
        "qat_ranges": options.qat_ranges if options.mode == "qat" else None,
        "check": r.check,
        "steps": r.steps,
        "calibration_batches": r.calibration_batches,
        "seconds": round(r.seconds, 3),
        "scheme": r.scheme.as_dict(),
        "distill": q.distill,
    }


def _export(q: Quantized) -> dict | None:
    if q.export is None:
        return None
    rep = q.export
    return {"path": str(rep.path), **{k: getattr(rep, k) for k in EXPORT_FIELDS}, "summary": rep.summary()}
