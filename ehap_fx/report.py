"""The output folder of ``ehap compress``: checkpoints, report.json, report.md and plots.

One folder per run::

    pruned_model.pt         the pruned torch.fx GraphModule, pickled whole (torch.save(gm))
    pruned_state_dict.pt    its state dict + model name + kept widths (loads weights_only=True)
    model_int8.onnx         the INT8 model (QLinearConv), verified in onnxruntime
    model_int8_fp32.onnx    the pruned fp32 model, for size/latency comparison
    report.json             CompressReport.to_dict() plus a "run" section (command, data, ...)
    report.md               the same for humans
    channels.png            output channels per conv before/after
    sensitivity.png         per-channel sensitivity per group, kept vs pruned

:func:`load_pruned` rebuilds the pruned model from ``pruned_state_dict.pt`` without
unpickling code: it builds the dense model, replays each step's kept channel indices with
``shrink`` and loads the weights strictly.
"""

from __future__ import annotations

import copy
import json
import logging
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import fx, nn

from ehap_fx.errors import WeightsError
from ehap_fx.models import get_model
from ehap_fx.passes.cost import conv_widths
from ehap_fx.passes.group import group_channels
from ehap_fx.passes.shrink import PrunePlan, shrink
from ehap_fx.passes.trace import trace

REPORT_KEYS = ("data", "target", "cost_before", "cost_after", "channels_before", "channels_after",
               "groups", "pinned", "ranking", "accuracy", "finetune", "quantize", "export",
               "seconds", "capture", "run")
PRUNED_MODEL, PRUNED_STATE = "pruned_model.pt", "pruned_state_dict.pt"
ZERO_SCORES = ("every channel score is 0, so the ranking was arbitrary (a saturated softmax, e.g. of a "
               "random model, makes the GGN, and so the removal scores, exactly 0): use --scorer hessian "
               "--estimator hutchinson, or a trained model")
ONNX_NAME = "model_int8.onnx"
log = logging.getLogger("ehap_fx")


# ---------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------


def save_pruned(gm: fx.GraphModule, folder: Path, *, model: str, num_classes: int,
                groups: list[Mapping[str, Any]], dense: nn.Module,
                input_shape: tuple[int, ...] = (3, 32, 32)) -> bool:
    """Write ``pruned_model.pt`` (whole GraphModule) and ``pruned_state_dict.pt``.

    The state-dict file carries the kept channel indices of every step (recomputed from the
    report's scores, as ``select_plan`` keeps the top-scored channels); it is written only
    when rebuilding ``dense`` from it reproduces ``gm``'s outputs on two inputs of
    ``input_shape`` (one image, no batch axis). Returns whether it was.
    """
    torch.save(gm, folder / PRUNED_MODEL)
    ckpt = {"state_dict": gm.state_dict(), "arch": model, "num_classes": num_classes,
            "channels": conv_widths(gm), "plans": kept_indices(groups), "input_shape": list(input_shape)}
    try:
        rebuilt = _rebuild(ckpt, copy.deepcopy(dense))
        x = torch.randn(2, *input_shape, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            torch.testing.assert_close(rebuilt(x), gm.eval()(x), rtol=1e-4, atol=1e-4)
    except Exception as e:  # never fail a finished run over the convenience file
        log.warning("not writing %s: rebuilding the pruned model from it failed (%s); "
                    "use %s", PRUNED_STATE, " ".join(str(e).split())[:200], PRUNED_MODEL)
        return False
    torch.save(ckpt, folder / PRUNED_STATE)
    return True


def kept_indices(groups: list[Mapping[str, Any]]) -> list[list[list]]:
    """Per pruning step, ``[group_id, [kept channel indices]]`` for every shrunk group."""
    steps: dict[int, list[list]] = {}
    for g in groups:
        if g["kept"] < g["size"]:
            order = torch.tensor(g["scores"], dtype=torch.float32).argsort(descending=True)
            steps.setdefault(g["step"], []).append([g["group"], sorted(order[: g["kept"]].tolist())])
    return [steps.get(s, []) for s in range(1, max(steps, default=0) + 1)]


def load_pruned(path: str | Path, model: nn.Module | None = None) -> fx.GraphModule:
    """The pruned model from a ``pruned_state_dict.pt`` (or a whole ``pruned_model.pt``).

    ``pruned_state_dict.pt`` is read with ``weights_only=True``; the dense architecture is
    ``get_model(arch)`` unless ``model`` (a dense instance of the same class) is given, and
    each step's kept channels are replayed with ``shrink``. ``pruned_model.pt`` holds
    pickled code: load only files you trust.
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"checkpoint {str(path)!r} does not exist or is not a file")
    try:
        obj = torch.load(path, weights_only=True, map_location="cpu")
    except Exception:  # a whole pickled GraphModule is not weights-only
        try:
            obj = torch.load(path, weights_only=False, map_location="cpu")
        except Exception as e:  # not a torch file at all
            raise WeightsError(f"{str(path)!r} is not a checkpoint torch.load can read ({type(e).__name__}: "
                               f"{e}); pass a state dict, a pruned_state_dict.pt or pruned_model.pt of "
                               "ehap compress, or an .onnx file") from e
    if isinstance(obj, nn.Module):
        return obj.eval()
    if not (isinstance(obj, dict) and "plans" in obj and "state_dict" in obj):
        raise WeightsError(f"{str(path)!r} is not a pruned checkpoint of ehap compress "
                           "(needs 'state_dict' and 'plans')")
    return _rebuild(obj, model)


def _rebuild(ckpt: dict, model: nn.Module | None) -> fx.GraphModule:
    if model is None:
        model = get_model(ckpt["arch"], ckpt["num_classes"])
    shape = tuple(ckpt.get("input_shape", (3, 32, 32)))  # (C, H, W) the model was pruned at
    gm = group_channels(trace(model.eval(), torch.zeros(1, *shape))).graph_module
    for plan in ckpt["plans"]:
        gm = shrink(gm, PrunePlan({int(g): tuple(idx) for g, idx in plan})).graph_module
    try:
        gm.load_state_dict(ckpt["state_dict"], strict=True)
    except RuntimeError as e:
        raise WeightsError(f"pruned checkpoint does not fit {ckpt['arch']}: {e}") from e
    return gm.eval()


# ---------------------------------------------------------------------------------------------
# report.json
# ---------------------------------------------------------------------------------------------


def write_json(report: Mapping[str, Any], path: Path) -> None:
    path.write_text(json.dumps(report, indent=1, default=_json_default) + "\n")


def _json_default(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON serializable")


# ---------------------------------------------------------------------------------------------
# report.md
# ---------------------------------------------------------------------------------------------


def _fmt_int(n: int) -> str:
    return f"{n:,}"


def _ratio(after: dict, kind: str) -> str:
    r = after.get(f"{kind}_ratio")
    return f"{r:.3f}" if r is not None else "-"


def render_markdown(report: Mapping[str, Any]) -> str:
    """report.md: data, costs, per-layer widths, pinned groups, Hessian, accuracies, ONNX."""
    run = report.get("run", {})
    lines = [f"# ehap compress: {run.get('model', 'model')}", ""]
    lines += _data_section(report, run)
    lines += _cost_section(report)
    if all_scores_zero(report):
        lines += [f"> **WARNING:** {ZERO_SCORES}.", ""]
    lines += _ranking_section(report)
    lines += _latency_section(report)
    lines += _repair_section(report)
    lines += _accuracy_section(report)
    lines += _export_section(report)
    lines += _speed_section(report)
    lines += _channels_section(report)
    lines += _pinned_section(report)
    lines += _files_section(run)
    return "\n".join(lines) + "\n"


def _data_section(report, run) -> list[str]:
    out = []
    if run.get("synthetic"):
        out += ["> **WARNING: SYNTHETIC DATA.** This run used random CIFAR-shaped images, not",
                "> CIFAR. Accuracies, sensitivities and the pruning plan below carry no real-world",
                "> meaning. Re-run with `--data DIR` (the folder holding `cifar-10-batches-py/`).",
                ""]
    out += ["## Run", "",
            f"- data: **{report['data']}**" + (f" ({run['data_detail']})" if run.get("data_detail") else ""),
            f"- model: `{run.get('model')}`, weights: {run.get('weights') or 'random init'}",
            f"- target: {report['target']}",
            *([f"- capture: {c['capture']} (asked: {c['asked']}; {c['why']})"]
              if (c := report.get("capture")) else []),
            f"- command: `{run.get('command', '')}`",
            f"- total time: {run.get('seconds', 0):.1f} s; stages: {report.get('seconds')}", ""]
    return out


def all_scores_zero(report: Mapping[str, Any]) -> bool:
    """Whether a Hessian or removal ranking scored every channel 0 (the plan is then arbitrary)."""
    scores = [s for g in report["groups"] for s in g["scores"]]
    return report["target"].get("scorer") in ("hessian", "removal") and bool(scores) and not any(scores)


def _cost_section(report) -> list[str]:
    b, a = report["cost_before"], report["cost_after"]
    return ["## Cost", "", "| | before | after | ratio |", "|---|---:|---:|---:|",
            f"| MACs | {_fmt_int(b['macs'])} | {_fmt_int(a['macs'])} | {_ratio(a, 'macs')} |",
            f"| params | {_fmt_int(b['params'])} | {_fmt_int(a['params'])} | {_ratio(a, 'params')} |",
            ""]


def _ranking_section(report) -> list[str]:
    out = ["## Ranking", ""]
    if report["target"].get("pruned_from") == "dense_finetuned":
        out += ["Ranked and pruned: the dense model fine-tuned first with the same budget (the teacher; "
                "`--prune-from given` prunes the model as given).", ""]
    for r in report["ranking"]:
        scorer = r.get("scorer")
        if scorer == "l1":
            out.append(f"- step {r['step']}: L1 weight magnitude (no Hessian, no data)")
            continue
        mem = r.get("peak_memory", 0) / 2**20
        figures = (f"dtype {r['dtype']}, {r['seconds']:.2f} s, peak memory {mem:.0f} MiB "
                   f"({r['peak_memory_kind']}), batch {r['batch_size']} x {r['n_batches']}")
        if scorer == "removal":
            out.append(f"- step {r['step']}: removal criterion (the exact Gauss-Newton loss increase "
                       f"of removing each channel, cross terms of shared streams included), {figures}")
        else:
            out.append(f"- step {r['step']}: Hessian trace sensitivity (the paper's), estimator "
                       f"{r['estimator']}, probes {r['probes']}, retries {r['retries']}, "
                       f"converged {r['converged']}, {figures}")
    return out + [""]


def _latency_section(report) -> list[str]:
    """A latency target: what was asked, what the table predicted, what was measured."""
    t, loop = report["target"], report.get("latency_loop")
    if t.get("kind") != "latency":
        return []
    out = ["## Latency: asked and delivered", "",
           f"- asked: {t['fraction']:g} of the dense model's INT8 latency"]
    if t.get("latency_ratio") is not None:
        out.append(f"- the per-conv table's estimate of the plan: {t['latency_ratio']:.3f}")
    if not loop:
        return out + ["- not measured (no latency loop ran: `--latency-loop-rounds 0`, or no INT8 timer)", ""]
    out.append(f"- measured in the loop on {loop['isa']}, tolerance ±{100 * loop['tolerance']:.0f} % at "
               f"batch {loop['batch']}: {loop['status']} after {len(loop['rounds'])} round(s), "
               f"{loop['seconds']:.0f} s: {loop['message']}")
    out += ["", "| batch | predicted | measured (interleaved medians) | noise |", "|---:|---:|---:|---:|"]
    out += [f"| {b} | {loop['predicted_ratio']:.3f} | {r:.3f} | {loop['noise'].get(b, float('nan')):.3f} |"
            for b, r in loop["measured_ratio"].items()]
    return out + [""]


def _repair_section(report) -> list[str]:
    c = report.get("compensation")
    if not c:
        return []
    err = ""
    if c.get("mean_error_before") is not None:
        err = (f"; mean relative squared error of the layer outputs {c['mean_error_before']:.4g} → "
               f"{c['mean_error_after']:.4g}")
    return ["## Post-training repair", "",
            f"- layer-wise least squares against the dense model ({c['recipe']}): {c['images']} "
            f"calibration images (no labels), {c['layers_repaired']} layers refitted, "
            f"{c['layers_unchanged']} unchanged, {c['seconds']:.1f} s, accumulators "
            f"{c['accumulator_bytes'] / 2**20:.1f} MiB{err}", ""]


def _accuracy_section(report) -> list[str]:
    acc = report.get("accuracy") or {}
    if not acc:
        return ["## Accuracy", "", "not evaluated", ""]
    out = ["## Accuracy (top-1 %)", "", "| stage | top-1 |", "|---|---:|"]
    out += [f"| {k} | {v:.2f} |" for k, v in acc.items()]
    return out + [""]


def _export_section(report) -> list[str]:
    e, q = report.get("export"), report.get("quantize")
    out = ["## INT8 and onnxruntime check", ""]
    if q:
        out.append(f"- quantization: backend {q['backend']}, mode {q['mode']}, QAT steps "
                   f"{q['steps']}, calibration batches {q['calibration_batches']}")
        if q.get("check"):
            out.append(f"- QAT against PTQ: {q['check']['reason']}")
        if q.get("scheme"):
            sc = q["scheme"]
            out.append(f"- scheme: target {sc['target']}, {sc['weight_bits']}-bit symmetric per-channel "
                       f"weights {tuple(sc['weight_range'])}, uint8 affine activations "
                       f"({sc['reason']})")
    if not e:
        return out + ["- no ONNX export", ""]
    out += [f"- quantized convs (QLinearConv): {100 * e['quantized_conv_fraction']:.1f}%",
            f"- size: {e['int8_bytes']:,} bytes int8 vs {e['fp32_bytes'] or 0:,} bytes fp32",
            f"- onnxruntime ({e.get('isa') or 'this CPU'}) vs PyTorch INT8: argmax agreement "
            f"{100 * e['argmax_agreement']:.2f}%, "
            f"max |diff| {e['max_abs_diff']:.4g}"
            + (f" = {e['max_diff_steps']:.2f} output steps" if e.get("max_diff_steps") is not None else ""),
            "", "```", e["summary"], "```", ""]
    return out


def _speed_section(report) -> list[str]:
    lat = report.get("latency")
    if not lat:
        return []
    acc = report.get("accuracy") or {}
    out = [f"## Speed: onnxruntime on this machine ({lat['isa']}; threads "
           f"{lat['threads'] or 'default'}, median of {lat['rounds']} interleaved rounds)", "",
           "| batch | dense fp32 ms | INT8 ms | speed-up |", "|---:|---:|---:|---:|"]
    ms = lat["ms"]
    out += [f"| {b} | {ms['dense_fp32'][b]:.3f} | {ms['int8'][b]:.3f} | {lat['speedup'][b]:.2f}x |"
            for b in lat["speedup"]]
    if "dense" in acc and "int8_onnx" in acc:
        same = (f", {acc['dense_finetuned']:.2f} % fine-tuned with the same budget (the teacher)"
                if "dense_finetuned" in acc else "")
        out += ["", f"top-1: dense {acc['dense']:.2f} % as given{same} (PyTorch fp32) vs the INT8 ONNX file "
                    f"{acc['int8_onnx']:.2f} % (onnxruntime)"]
    return out + [""]


def _channels_section(report) -> list[str]:
    before, after = report["channels_before"], report["channels_after"]
    out = ["## Channels per layer", "", "| layer | before | after |", "|---|---:|---:|"]
    out += [f"| {k} | {v} | {after.get(k, 'dropped')} |" for k, v in before.items()]  # depth pruning
    return out + [""]


def _pinned_section(report) -> list[str]:
    out = ["## Pinned groups (never pruned)", ""]
    if not report["pinned"]:
        return out + ["none", ""]
    out += ["| group | channels | reason |", "|---:|---:|---|"]
    out += [f"| {p['group']} | {p['size']} | {p['reason']} |" for p in report["pinned"]]
    return out + [""]


def _files_section(run) -> list[str]:
    """The files this run wrote (an INT8 export or a weights-only state dict only when made)."""
    out = ["## Files", "",
           f"- `{PRUNED_MODEL}`: the pruned GraphModule, `torch.save(gm)`. Load (trusted files only):",
           f"  `gm = torch.load('{PRUNED_MODEL}', weights_only=False)`"]
    if run.get("pruned_state_dict"):
        out += [f"- `{PRUNED_STATE}`: state dict, model name and kept widths (weights only). Load:",
                f"  `from ehap_fx.report import load_pruned; gm = load_pruned('{PRUNED_STATE}')`"]
    if run.get("onnx"):
        shape = ", ".join(str(d) for d in run.get("input_shape", (3, 32, 32)))
        out += [f"- `{ONNX_NAME}`: INT8 ONNX (input `input` (N, {shape}) normalised, output `logits`);"
                " `model_int8_fp32.onnx`: the pruned fp32 model",
                f"- evaluate: `ehap eval {ONNX_NAME} [--data DIR]`; latency: `ehap bench {ONNX_NAME}`"]
    return [*out, "- `report.json`, `channels.png`, `sensitivity.png`", ""]


# ---------------------------------------------------------------------------------------------
# Plots
# ---------------------------------------------------------------------------------------------


def plot_channels(report: Mapping[str, Any], path: Path) -> None:
    """Bar chart: output channels of every conv/linear before and after pruning."""
    plt = _pyplot()
    names = list(report["channels_before"])
    before = [report["channels_before"][n] for n in names]
    after = [report["channels_after"].get(n, 0) for n in names]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.18 * len(names)), 3.6))
    x = range(len(names))
    ax.bar(x, before, color="#c8c8c8", label="before")
    ax.bar(x, after, color="#1f77b4", label="after")
    ax.set_xticks(list(x), names, rotation=90, fontsize=6)
    ax.set_ylabel("output channels")
    ax.set_title(f"channels per layer ({_title(report)})")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_sensitivity(report: Mapping[str, Any], path: Path) -> None:
    """Per-channel sensitivity per group (log scale), kept channels in blue, pruned in red."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.0, 3.6))
    for i, g in enumerate(report["groups"]):
        scores = sorted(g["scores"], reverse=True)
        kept, gone = scores[: g["kept"]], scores[g["kept"]:]
        ax.scatter([i] * len(kept), kept, s=6, color="#1f77b4", label="kept" if i == 0 else None)
        ax.scatter([i] * len(gone), gone, s=6, color="#d62728", label="pruned" if i == 0 else None)
    scores = [s for g in report["groups"] for s in g["scores"]]
    if scores and min(scores) > 0:
        ax.set_yscale("log")
    elif scores:
        ax.set_yscale("symlog", linthresh=max(1e-12, max(abs(s) for s in scores) * 1e-6))
    ax.set_xlabel("group (step, id in report.json order)")
    ax.set_ylabel("channel sensitivity")
    ax.set_title(f"sensitivity per group ({_title(report)})")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _title(report) -> str:
    return "SYNTHETIC DATA" if report.get("run", {}).get("synthetic") else report["data"]


def _pyplot():
    import matplotlib  # here, not at the top: heavy, and only the two plots need it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
