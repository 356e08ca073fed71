"""The accuracy–latency front: one model compressed at several latency targets with each
scorer, every arm with the same fine-tune budget, quantized, then timed in onnxruntime side by
side.

    dense ── fine-tune (budget B) ──▶ dense fp32 ●, dense INT8 ●     (and the teacher)
      │
      └─▶ for target t, scorer s:  compress(Target(latency=t, granularity)) ── fine-tune B
                                   (distilled from the teacher) ── INT8 ── ONNX
    then every ONNX file timed in one interleaved run (batch 1 and 128): speed-up over dense
    fp32, top-1 of each ONNX file in onnxruntime, predicted vs measured latency.

Resumable: each arm is written to ``<out>/arms/<name>/`` through a temporary folder renamed
when done, so an interrupted sweep restarts from the arms it has not finished. The table
(``front.md``, ``front.json``) and the plot (``front.png``) are rebuilt from the finished
arms at the end. ``ehap sweep`` is the command line.
"""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import statistics
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from torch import nn

from ehap_fx.compress import RECIPE, compress
from ehap_fx.errors import EhapError
from ehap_fx.isa import cpu_features
from ehap_fx.latency import BenchOptions, LatencyOptions, time_rounds
from ehap_fx.latency_loop import ratio_of
from ehap_fx.passes.export import export, export_onnx, onnx_top1
from ehap_fx.passes.quantize import QuantizeOptions
from ehap_fx.progress import bar as tqdm
from ehap_fx.qat import quantize_int8
from ehap_fx.scoring import SCORERS, HessianOptions
from ehap_fx.target import Target
from ehap_fx.train import DistillOptions, FinetuneOptions, evaluate, finetune


@dataclass(frozen=True)
class SweepOptions:
    """What the front spans and the budget every arm gets.

    ``targets`` are latency fractions (of the dense model's estimated INT8 latency at
    ``latency.batch_size``, the per-conv onnxruntime table); ``distill`` lists the arms'
    distillation settings (``(True, False)`` runs both, side by side), ``distill_options`` how
    (its ``teacher``: the dense model after the same fine-tune budget, ``"finetuned"``, or as
    given, ``"given"``).
    """

    targets: tuple[float, ...] = (0.5, 0.35, 0.25)
    scorers: tuple[str, ...] = (RECIPE.scorer, *(s for s in SCORERS if s != RECIPE.scorer))
    granularity: str = RECIPE.granularity
    round_to: int = RECIPE.round_to
    finetune: FinetuneOptions = FinetuneOptions(epochs=0.5, progress=False)
    distill: tuple[bool, ...] = (True,)
    distill_options: DistillOptions = DistillOptions()
    quantize: QuantizeOptions = QuantizeOptions(mode="ptq")
    hessian: HessianOptions = HessianOptions()
    latency: LatencyOptions = LatencyOptions()
    bench: BenchOptions = BenchOptions()
    progress: bool = True

    def __post_init__(self) -> None:
        if not self.targets or not all(0 < t <= 1 for t in self.targets):
            raise ValueError(f"targets={self.targets} must be latency fractions in (0, 1]")
        bad = [s for s in self.scorers if s not in SCORERS]
        if not self.scorers or bad:
            raise ValueError(f"scorers={self.scorers} must be some of {SCORERS}")
        if not self.distill or not all(isinstance(d, bool) for d in self.distill):
            raise ValueError(f"distill={self.distill} must be a non-empty tuple of True/False")
        if self.finetune.distill is not None:
            raise ValueError("finetune.distill must be None: the sweep sets it per arm (distill=)")


@dataclass(frozen=True)
class Arm:
    target: float
    scorer: str
    distill: bool

    @property
    def name(self) -> str:
        return f"{self.scorer}-t{self.target:g}" + ("" if self.distill else "-nodistill")


@dataclass
class SweepResult:
    rows: list[dict]
    dense: dict
    timing: dict  # {file: {batch: median ms}}
    out: Path
    machine: dict = field(default_factory=dict)
    rounds: dict = field(default_factory=dict)  # {file: {batch: [ms of each interleaved round]}}


def arms(options: SweepOptions) -> list[Arm]:
    """Every (target, scorer, distill) arm: the first distillation setting's whole front
    first, then the others (an interrupted sweep has a front, not half of every comparison)."""
    return [Arm(t, s, d) for d in options.distill for t in options.targets for s in options.scorers]


def sweep(
    model: nn.Module,
    example_input: torch.Tensor,
    train: Iterable,
    test: Iterable,
    out: str | Path,
    options: SweepOptions = SweepOptions(),
    *,
    calibration: Iterable | None = None,
    name: str = "model",
    finished_only: bool = False,
) -> SweepResult:
    """Run (or resume) the front of ``model`` into ``out``; returns its rows.

    ``train`` yields shuffled ``(x, y)`` training batches (the fine-tune and QAT data),
    ``test`` the evaluation batches, ``calibration`` the PTQ batches (default ``train``).
    ``finished_only``: compute nothing new; time and tabulate the arms already finished (e.g.
    while another process works on the rest).
    """
    out = Path(out)
    (out / "arms").mkdir(parents=True, exist_ok=True)
    dense = _stage(out / "dense",
                   lambda d: _dense(model, example_input, restart(train), test, calibration, options, d))
    teacher = _teacher(model, out / "dense", options)
    todo = arms(options)
    if finished_only:
        todo = [a for a in todo if (out / "arms" / a.name / "result.json").exists()]
        if not todo or not (out / "dense" / "result.json").exists():
            raise EhapError(f"{out}: no finished arms (or no dense baseline) to tabulate yet")
    bar = tqdm(todo, desc="sweep", unit="arm", disable=not options.progress)
    for arm in bar:
        bar.set_postfix_str(arm.name)
        _stage(out / "arms" / arm.name,
               lambda d, arm=arm: _arm(model, example_input, restart(train), test, arm, teacher, options, d))
    rows = [json.loads((out / "arms" / a.name / "result.json").read_text()) for a in todo]
    timing, rounds = _time_all(out, dense, rows, options)
    result = SweepResult(rows, dense, timing, out, {"isa": cpu_features().describe(), "model": name}, rounds)
    write_front(result, options)
    return result


def restart(batches: Iterable) -> Iterable:
    """``batches`` from their first epoch (``CifarLoader.restarted``), so that the dense stage
    and every arm, in this process or a resumed one, see the same batches in the same order."""
    return batches.restarted() if hasattr(batches, "restarted") else batches


# ---------------------------------------------------------------------------------------------
# Stages
# ---------------------------------------------------------------------------------------------


def _stage(folder: Path, fn) -> dict:
    """``fn(tmp)`` into a temporary sibling of ``folder``, renamed when done; a finished
    ``folder`` (its ``result.json``) is read instead of recomputed."""
    done = folder / "result.json"
    if done.exists():
        return json.loads(done.read_text())
    tmp = folder.with_name(f".{folder.name}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        start = time.perf_counter()
        result = fn(tmp)
        result["seconds"] = round(time.perf_counter() - start, 1)
        (tmp / "result.json").write_text(json.dumps(result, indent=1))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    return result


def _dense(model, x, train, test, calibration, options: SweepOptions, folder: Path) -> dict:
    """The dense baselines: top-1 as given, after the arms' fine-tune budget, and in INT8."""
    gm = copy.deepcopy(model).eval()
    given = evaluate(gm, test)
    start = time.perf_counter()
    finetune(gm, train, options.finetune)
    finetune_s = time.perf_counter() - start
    torch.save(gm.state_dict(), folder / "finetuned.pt")
    ptq = options.quantize.mode == "ptq" and calibration is not None
    q = quantize_int8(gm, x, calibration if ptq else train, options.quantize)
    rep = export(q, x, folder / "dense_int8.onnx", float_model=None)
    export_onnx(gm, x, folder / "dense_fp32.onnx", dynamo=False)
    return {
        "top1_given": given,
        "top1_finetuned": evaluate(gm, test),
        "top1_int8_onnx": onnx_top1(rep.path, test),
        "top1_fp32_onnx": onnx_top1(folder / "dense_fp32.onnx", test),
        "finetune_seconds": round(finetune_s, 1),
        "quantized_conv_fraction": rep.quantized_conv_fraction,
        "test_images": sum(len(y) for _, y in test),
    }


def _teacher(model: nn.Module, dense_folder: Path, options: SweepOptions) -> nn.Module:
    teacher = copy.deepcopy(model)
    if options.distill_options.teacher == "finetuned":
        teacher.load_state_dict(torch.load(dense_folder / "finetuned.pt", weights_only=True))
    return teacher.eval().requires_grad_(False)


def _arm(model, x, train, test, arm: Arm, teacher, options: SweepOptions, folder: Path) -> dict:
    distill = options.distill_options if arm.distill else None
    ft = replace(options.finetune, distill=distill)
    q = replace(options.quantize, finetune=replace(options.quantize.finetune, distill=distill))
    res = compress(
        model, x, data=train, eval_data=test,
        target=Target(latency=arm.target, granularity=options.granularity, round_to=options.round_to),
        scorer=arm.scorer, hessian=options.hessian, finetune_options=ft, quantize=q,
        export=folder / "model_int8.onnx", latency=options.latency,
        teacher=teacher if arm.distill else None,
    )
    r = res.report
    return {
        **asdict(arm), "name": arm.name,
        "macs_ratio": r.cost_after["macs_ratio"], "params_ratio": r.cost_after["params_ratio"],
        "params": r.cost_after["params"],
        "predicted_latency_ratio": r.target.get("latency_ratio"),
        "accuracy": r.accuracy,
        "quantized_conv_fraction": r.export["quantized_conv_fraction"] if r.export else None,
        "stage_seconds": r.seconds,
    }


def _time_all(out: Path, dense: dict, rows: list[dict], options: SweepOptions) -> tuple[dict, dict]:
    """Every ONNX file of the front in one interleaved onnxruntime run: the median ms of each
    file at each batch, and the ms of every round."""
    paths = {"dense_fp32": out / "dense" / "dense_fp32.onnx", "dense_int8": out / "dense" / "dense_int8.onnx"}
    paths |= {r["name"]: out / "arms" / r["name"] / "model_int8.onnx" for r in rows}
    rounds = {n: {str(b): [1000 * s for s in v] for b, v in per.items()}
              for n, per in time_rounds(paths, options.bench).items()}
    return {n: {b: statistics.median(v) for b, v in per.items()} for n, per in rounds.items()}, rounds


# ---------------------------------------------------------------------------------------------
# The table and the plot
# ---------------------------------------------------------------------------------------------


def stderr_pt(top1: float, n: int) -> float:
    """Binomial standard error, in points, of a top-1 of ``top1`` % on ``n`` images."""
    p = top1 / 100
    return 100 * math.sqrt(max(p * (1 - p), 0.0) / n)


def front_rows(result: SweepResult) -> list[dict]:
    """One flat row per model: dense fp32, dense INT8, then the arms, with speed-ups over
    dense fp32 and the latency prediction against the measurement (both relative to dense INT8
    at batch 128, the table's batch)."""
    t, d = result.timing, result.dense
    base = t["dense_fp32"]

    def speed(name: str) -> dict:
        return {f"ms_b{b}": t[name][b] for b in base} | {f"speedup_b{b}": base[b] / t[name][b] for b in base}

    rows = [{"name": "dense fp32", "scorer": "dense", "top1": d["top1_finetuned"], **speed("dense_fp32")},
            {"name": "dense INT8", "scorer": "dense", "top1": d["top1_int8_onnx"], **speed("dense_int8")}]
    big = max(base, key=int)
    for r in result.rows:  # the median of per-round ratios, and its 95 % interval (a noisy machine shows)
        measured = ratio_of(int(big), result.rounds[r["name"]][big], result.rounds["dense_int8"][big])
        predicted = r["predicted_latency_ratio"]
        rows.append({
            "name": r["name"], "scorer": r["scorer"], "target": r["target"], "distill": r["distill"],
            "macs_ratio": r["macs_ratio"], "params": r["params"],
            "top1_pruned": r["accuracy"].get("pruned"), "top1_finetuned": r["accuracy"].get("finetuned"),
            "top1": r["accuracy"].get("int8_onnx"), **speed(r["name"]),
            "predicted_ratio": predicted, "measured_ratio": measured.ratio,
            "measured_interval": [measured.low, measured.high],
            "prediction_error": None if predicted is None else predicted / measured.ratio - 1,
        })
    return rows


def write_front(result: SweepResult, options: SweepOptions) -> None:
    rows = front_rows(result)
    n = result.dense.get("test_images")
    (result.out / "front.json").write_text(json.dumps(
        {"machine": result.machine, "options": _plain(options), "dense": result.dense, "rows": rows,
         "timing_ms": result.timing, "timing_rounds_ms": result.rounds}, indent=1))
    (result.out / "front.md").write_text(render_front(rows, result, options, n))
    plot_front(rows, result.out / "front.png", result.machine.get("model", "model"))


def render_front(rows: list[dict], result: SweepResult, options: SweepOptions, n: int | None) -> str:
    b = sorted(result.timing["dense_fp32"], key=int)
    ft = options.finetune
    bench = options.bench
    teacher = "budget-matched fine-tuned" if options.distill_options.teacher == "finetuned" else "given"
    steps = f" (max {ft.max_steps} steps)" if ft.max_steps else ""
    lines = [f"# Accuracy–latency front: {result.machine.get('model')}", "",
             f"- machine: {result.machine['isa']}; onnxruntime threads {bench.threads or 'default'}, "
             f"median of {bench.rounds} interleaved rounds",
             f"- budget per arm: fine-tune {ft.epochs:g} epoch(s){steps}, lr {ft.lr:g}; INT8 "
             f"{options.quantize.mode}; distillation {options.distill_options} from the {teacher} "
             "dense model",
             f"- targets: latency fractions {options.targets} of dense INT8 (per-conv table, batch "
             f"{options.latency.batch_size}), granularity {options.granularity}, "
             f"round_to {options.round_to}", "",
             "| model | MACs | params | pruned | fine-tuned | INT8 ONNX top-1 | "
             + " | ".join(f"b{x} ms | b{x} speed-up" for x in b)
             + " | latency predicted / measured [95 % interval] (vs dense INT8) | error |",
             "|---|---:|---:|---:|---:|---:|" + "---:|---:|" * len(b) + "---:|---:|"]
    for r in rows:
        se = f" ± {stderr_pt(r['top1'], n):.2f}" if n and r.get("top1") is not None else ""
        cells = [r["name"], _f(r.get("macs_ratio"), 3), _f(r.get("params"), 0), _f(r.get("top1_pruned"), 2),
                 _f(r.get("top1_finetuned"), 2), _f(r.get("top1"), 2) + se]
        cells += [c for x in b for c in (_f(r[f"ms_b{x}"], 3), _f(r[f"speedup_b{x}"], 2) + "×")]
        if r.get("predicted_ratio") is not None:
            low, high = r["measured_interval"]
            cells += [f"{r['predicted_ratio']:.3f} / {r['measured_ratio']:.3f} [{low:.3f}, {high:.3f}]",
                      f"{100 * r['prediction_error']:+.0f} %"]
        else:
            cells += ["", ""]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", f"Dense fp32 top-1 is the dense model after the same fine-tune budget "
                  f"({result.dense['top1_given']:.2f} % as given); ± is the binomial standard error on "
                  f"{n or '?'} test images. Speed-ups are over dense fp32 in the same run.", ""]
    return "\n".join(lines) + "\n"


def plot_front(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    big = max((k for k in rows[0] if k.startswith("speedup_b")),
              key=lambda k: int(k.removeprefix("speedup_b")))
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    lines: dict[tuple, list[dict]] = {}
    for r in rows[2:]:
        lines.setdefault((r["scorer"], r["distill"]), []).append(r)
    for (scorer, distill), pts in sorted(lines.items()):
        pts = sorted(pts, key=lambda r: r[big])
        ax.plot([r[big] for r in pts], [r["top1"] for r in pts], "o-",
                label=f"{scorer}" + ("" if distill else " (no distillation)"))
    for r, marker in zip(rows[:2], ("s", "D"), strict=True):
        ax.plot([r[big]], [r["top1"]], marker, color="black", label=r["name"])
    ax.set_xlabel(f"INT8 onnxruntime speed-up over dense fp32 (batch {big.removeprefix('speedup_b')})")
    ax.set_ylabel("top-1 % (the ONNX file in onnxruntime)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _f(v, digits: int) -> str:
    if v is None:
        return ""
    return f"{v:,.0f}" if digits == 0 else f"{v:.{digits}f}"


def _plain(options: SweepOptions) -> dict:
    d = asdict(options)
    d["latency"]["cache"] = str(d["latency"]["cache"])
    return d
