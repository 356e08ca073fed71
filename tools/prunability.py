"""Prunability table: ``compress(model, example_input)`` as a new user calls it, on every
torchvision 0.29 classification, segmentation and detection model, with Torch-Pruning 1.6.1
on the same models in the same run, side by side.

For each model (random init, eval mode, 1×3×64×64 or the model's minimum input size), in its
own subprocess with a timeout:

* **ehap-fx**: ``compress(model, x)`` with nothing else (L1 ranking, ``Target(macs=0.5)``):
  status ``pruned`` (MACs ≤ 0.55 of dense), ``pinned`` (the target is out of reach: the
  largest pin reasons, by channels) or ``error``; the output keeps its shape (every leaf);
  shrunk ≡ masked original (``passes.mask``) to fp32 rounding; the pruned graph re-traces with
  ``torch.fx``; its ONNX export (TorchScript exporter, opset 17) matches PyTorch in onnxruntime.
  Detection models do not trace whole (FX cannot follow their data-dependent control flow):
  their row says where tracing stops, and ``compress`` runs on ``model.backbone`` (with its
  FPN: a dict of feature maps).
* **Torch-Pruning**: ``MagnitudePruner`` (L1, ``round_to=8`` like ehap-fx's default), uniform
  channel ratios 0.15, 0.30, 0.45 (``iterative_steps=3``), stopping at the first whose MACs are
  ≤ 0.5 of dense (uniform ratio r keeps about (1 - r)² of the MACs; where ``round_to=8``
  fails, once more without it, noted); the final
  classifier (or segmentation/detection heads) ignored, as in its torchvision example. Status
  and whether every output keeps its shape.

Results are cached per model in a JSON file (``--cache``), so a run resumes where it stopped.

    python tools/prunability.py [--kinds classification segmentation detection] [--models ...]
        [--timeout 900] [--cache docs/prunability.json] [--redo] [--markdown docs/prunability.md]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
import traceback
import warnings
from datetime import datetime, timezone
from pathlib import Path

TARGET = 0.5
PRUNED_AT = 0.55  # MACs ratio that counts as pruned
SIDE = 64


def model_names(kinds: list[str]) -> list[tuple[str, str]]:
    import torchvision.models as tvm

    modules = {"classification": tvm, "segmentation": tvm.segmentation, "detection": tvm.detection}
    return [(k, n) for k in kinds for n in tvm.list_models(module=modules[k])]


def num_params(name: str) -> int:
    """Parameters of the model as its weights' meta states them (read, not downloaded)."""
    import torchvision.models as tvm

    try:
        return int(tvm.get_model_weights(name).DEFAULT.meta["num_params"])
    except Exception:
        return 10**12


def input_side(name: str) -> tuple[int, int]:
    """64×64, or the model's minimum input size: the smallest ``min_size`` among its weights'
    meta (read, not downloaded; a ViT takes exactly its ``image_size``, 224 without weights)."""
    import torchvision.models as tvm

    if name.startswith("vit_"):
        return 224, 224
    try:
        weights = list(tvm.get_model_weights(name))
    except Exception:
        return SIDE, SIDE
    sizes = [w.meta["min_size"] for w in weights if "min_size" in w.meta]
    if not sizes:
        return SIDE, SIDE
    smallest = min(sizes, key=lambda s: s[0] * s[1])
    return max(SIDE, smallest[0]), max(SIDE, smallest[1])


# Copies of the weights a part holds at its peak (model, masked original, pruned model, the
# ONNX exporter's graph, its serialised file, the onnxruntime session; Torch-Pruning: the
# model, its dependency graph's views, the op counter), measured on resnet50 / vgg16 to be
# below these with the activations of one 224×224 image.
COPIES = {"ehap": 5.0, "tp": 3.0}
BASE_BYTES = 0.8 * 2**30  # torch, torchvision, onnxruntime imported
FLOOR_BYTES = 2 * 2**30  # a part is stopped when the machine's available memory falls below this


def footprint(name: str, part: str, side: tuple[int, int]) -> int:
    """Predicted peak RSS of one part's subprocess, from the weights' parameter count."""
    acts = 400 * 2**20 * (side[0] * side[1]) / (224 * 224)  # one image's activations, generously
    return int(BASE_BYTES + COPIES[part] * 4 * num_params(name) + acts)


def available_bytes() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 2**62


def rss_bytes(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def run_guarded(cmd: list[str], timeout: float, limit: int) -> tuple[int, str, str, str | None]:
    """Run ``cmd`` with a wall-clock ``timeout`` and a memory watchdog: its RSS polled every
    0.2 s and the process killed (by this tool, never the kernel's OOM killer) past ``limit``
    bytes. Returns (returncode, stdout, stderr, why it was stopped or None)."""
    import tempfile

    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, text=True,
                                env={**os.environ, "PYTHONWARNINGS": "ignore"})
        t0, why, peak = time.time(), None, 0
        while proc.poll() is None:
            peak = max(peak, rss_bytes(proc.pid))
            if peak > limit:
                why = f"stopped by the memory watchdog at {peak / 2**30:.1f} GiB > {limit / 2**30:.1f} GiB"
            elif available_bytes() < FLOOR_BYTES:  # the machine is shared: others' jobs grow too
                why = (f"stopped by the memory watchdog at {peak / 2**30:.1f} GiB: the machine's available "
                       f"memory fell below {FLOOR_BYTES / 2**30:.1f} GiB")
            elif time.time() - t0 > timeout:
                why = f"timeout {timeout:.0f} s"
            if why:
                proc.kill()
                proc.wait()
                break
            time.sleep(0.2)
        out.seek(0)
        err.seek(0)
        return proc.returncode, out.read(), err.read(), why


def build(kind: str, name: str):
    import torchvision.models as tvm

    extra = {"weights_backbone": None} if kind != "classification" else {}
    if kind == "classification" and name in ("inception_v3", "googlenet"):
        extra["aux_logits"] = False  # eval-mode models return one tensor; the aux heads are training-only
        extra["init_weights"] = True
    return tvm.get_model(name, weights=None, **extra).eval()


def leaves(out) -> list:
    import torch

    return [t for t in torch.utils._pytree.tree_leaves(out) if torch.is_tensor(t)]


def shapes(out) -> list[list[int]]:
    return [list(t.shape) for t in leaves(out)]


def max_diff(a, b) -> tuple[float, float]:
    """max |a - b| over all output leaves, and max |a| (the scale it is relative to)."""
    la, lb = leaves(a), leaves(b)
    if [t.shape for t in la] != [t.shape for t in lb]:
        return float("inf"), 0.0
    diff = max((float((x.float() - y.float()).abs().max()) for x, y in zip(la, lb) if x.numel()), default=0.0)
    scale = max((float(x.float().abs().max()) for x in la if x.numel()), default=0.0)
    return diff, scale


def close(diff: float, scale: float, rtol: float) -> bool:
    """``diff`` within ``rtol`` of the output's scale. Random-init networks can have outputs
    near 1e-12 (efficientnet, mnasnet): an absolute tolerance would pass anything there."""
    return diff <= rtol * scale if scale > 0 else diff == 0


def judged(e: dict) -> dict:
    """The checks of a row, re-judged from its stored numbers (rows cached by an older,
    absolute tolerance are judged like new ones)."""
    out = dict(e)
    if "masked_diff" in e:
        out["masked_ok"] = close(e["masked_diff"], e["out_scale"], 1e-4)
    if "onnx_diff" in e:
        out["onnx_ok"] = close(e["onnx_diff"], e["out_scale"], 1e-4)
    return out


def pin_reasons(gm, top: int = 4) -> list[str]:
    """The largest pin reasons (by channels pinned)."""
    from ehap_fx.passes.group import groups_of

    return [f"{c} ch: {r[:160]}" for c, r in groups_of(gm).pin_reasons(top)]


def run_ehap(model, x) -> dict:
    import torch
    from ehap_fx.passes.group import group_channels
    from ehap_fx.passes.mask import mask_channels
    from ehap_fx.passes.trace import call_with, trace

    from ehap_fx.compress import compress

    row: dict = {}
    t = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            res = compress(model, x)
        except Exception as e:
            row.update(status="error", error=f"{type(e).__name__}: {str(e)[:400]}")
            if type(e).__name__ == "TargetError":
                row["status"] = "pinned"
                gm = group_channels(trace(model, x)).graph_module
                row["pinned"] = pin_reasons(gm)
            row["seconds"] = round(time.perf_counter() - t, 1)
            return row
    row["seconds"] = round(time.perf_counter() - t, 1)
    row["granularity"] = res.report.target["granularity"]  # the default's (rows before it: "channel")
    ratio = res.report.cost_after["macs_ratio"]
    row.update(macs_ratio=round(ratio, 4), params_ratio=round(res.report.cost_after["params_ratio"], 4))
    row["status"] = "pruned" if ratio <= PRUNED_AT else "pinned"
    row["pinned"] = pin_reasons(res.pruned) if ratio > PRUNED_AT else []
    pruned = res.pruned
    with torch.no_grad():
        dense = call_with(model, x)
        out = call_with(pruned, x)
        row["shape_kept"] = shapes(dense) == shapes(out)
        # shrunk ≡ masked original, on the graph compress traced
        gm = group_channels(trace(model, x)).graph_module
        masked = mask_channels(gm, pruned.meta["ehap.plan"]).graph_module
        diff, scale = max_diff(call_with(masked, x), out)
        row.update(masked_diff=diff, out_scale=scale, masked_ok=close(diff, scale, 1e-4))
    try:
        again = torch.fx.symbolic_trace(pruned)
        with torch.no_grad():
            row["retrace_ok"] = close(*max_diff(call_with(again, x), out), 1e-6)
    except Exception as e:
        row["retrace_ok"] = False
        row["retrace_error"] = f"{type(e).__name__}: {str(e)[:200]}"
    row.update(onnx_check(pruned, x, out))
    return row


def onnx_check(pruned, x, out) -> dict:
    import tempfile

    import numpy as np
    import onnxruntime as ort
    import torch

    inputs = tuple(x.values()) if isinstance(x, dict) else (x if isinstance(x, tuple) else (x,))
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "m.onnx"
        exporter = "torchscript"
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                try:
                    torch.onnx.export(pruned, inputs, str(path), opset_version=17, dynamo=False)
                except Exception:  # e.g. adaptive pooling to a size that is no factor: try torch.export
                    exporter = "dynamo"
                    torch.onnx.export(pruned, inputs, str(path), opset_version=18, dynamo=True)
            sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
            feed = {i.name: t.numpy() for i, t in zip(sess.get_inputs(), inputs)}
            got = [torch.from_numpy(np.asarray(v)) for v in sess.run(None, feed)]
        except Exception as e:
            return {"onnx_ok": False, "onnx_error": f"{exporter}: {type(e).__name__}: {str(e)[:200]}"}
    diff, scale = max_diff(leaves(out), got)
    return {"onnx_diff": diff, "onnx_ok": close(diff, scale, 1e-4), "onnx_exporter": exporter}


def _ignored(kind: str, model, name: str = "") -> list:
    """Layers Torch-Pruning leaves whole: the classifier / segmentation head, and for detection
    what its own example (``examples/torchvision_models/torchvision_pruning.py``) ignores per
    model (its FPN for Faster R-CNN, the prediction convs elsewhere)."""
    from torch import nn

    if kind == "classification":
        return [m for m in model.modules() if (isinstance(m, nn.Linear) and m.out_features == 1000)
                or (isinstance(m, nn.Conv2d) and m.out_channels == 1000)]  # squeezenet's classifier is a conv
    if kind == "segmentation":
        return [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.out_channels == 21]
    paths = {
        "ssd": ["head"],
        "fasterrcnn": ["rpn.head.cls_logits", "rpn.head.bbox_pred", "backbone.fpn", "roi_heads"],
        "fcos": ["head.classification_head.cls_logits", "head.regression_head.bbox_reg",
                 "head.regression_head.bbox_ctrness"],
        "keypointrcnn": ["rpn.head.cls_logits", "backbone.fpn.layer_blocks", "rpn.head.bbox_pred",
                         "roi_heads.box_head", "roi_heads.box_predictor", "roi_heads.keypoint_predictor"],
        "maskrcnn": ["rpn.head.cls_logits", "rpn.head.bbox_pred", "roi_heads.box_predictor", "roi_heads.mask_predictor"],
        "retinanet": ["head.classification_head.cls_logits", "head.regression_head.bbox_reg"],
    }
    key = next((k for k in paths if name.startswith(k)), None)
    if key is None:
        return [getattr(model, h) for h in ("roi_heads", "rpn", "head") if hasattr(model, h)]
    return [model.get_submodule(path) for path in paths[key]]


def run_tp(kind: str, name: str, x) -> dict:
    """Torch-Pruning with ``round_to=8``; if that fails, once more without it (noted), on the
    model rebuilt from the same seed (no second copy of the weights held)."""
    row = _run_tp(kind, name, fresh(kind, name), x, round_to=8)
    if row["status"] == "error":
        retry = _run_tp(kind, name, fresh(kind, name), x, round_to=None)
        if retry["status"] != "error":
            retry["note"] = f"round_to=8 failed ({row['error'][:120]}); this is round_to=None"
            return retry
    return row


def fresh(kind: str, name: str):
    import torch

    torch.manual_seed(0)
    return build(kind, name)


def _run_tp(kind: str, name: str, model, x, round_to) -> dict:
    import torch
    import torch_pruning as tp
    from torchvision.models.vision_transformer import VisionTransformer

    vit = isinstance(model, VisionTransformer)
    if vit:  # as its example does: whole attention heads, and the model's hidden_dim updated
        round_to = model.encoder.layers[0].num_heads

    row: dict = {}
    t = time.perf_counter()
    # a detection model takes a list of images; Torch-Pruning unpacks a tuple of inputs
    example = ([x[0]],) if kind == "detection" else x
    call = (lambda: model([x[0]])) if kind == "detection" else (lambda: model(x))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with torch.no_grad():
                dense_out = call()
            base, _ = tp.utils.count_ops_and_params(model, example)
            pruner = tp.pruner.MagnitudePruner(
                model, example, importance=tp.importance.MagnitudeImportance(p=1), pruning_ratio=0.45,
                iterative_steps=3, ignored_layers=_ignored(kind, model, name), round_to=round_to,
            )
            macs = base
            for _ in range(3):
                pruner.step()
                if vit:
                    model.hidden_dim = model.conv_proj.out_channels
                macs, _ = tp.utils.count_ops_and_params(model, example)
                if macs <= TARGET * base:
                    break
            with torch.no_grad():
                out = call()
    except Exception as e:
        tb = traceback.extract_tb(e.__traceback__)[-1]
        row.update(status="error", error=f"{type(e).__name__}: {str(e)[:300]} ({Path(tb.filename).name}:{tb.lineno})")
        row["seconds"] = round(time.perf_counter() - t, 1)
        return row
    row["seconds"] = round(time.perf_counter() - t, 1)
    ratio = macs / base
    row.update(macs_ratio=round(ratio, 4), status="pruned" if ratio <= PRUNED_AT else "not reached")
    row["shape_kept"] = shapes(dense_out) == shapes(out)
    return row


def run_one(kind: str, name: str, part: str) -> dict:
    """One part (``ehap`` or ``tp``) of one model's row, in this (fresh) process."""
    import resource

    import torch

    torch.set_num_threads(2)
    h, w = input_side(name)
    torch.manual_seed(1)
    x = torch.randn(1, 3, h, w)
    model = fresh(kind, name)
    row: dict = {"input": [1, 3, h, w], "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 2)}
    if part == "tp":
        side = backbone_side(model) if kind == "detection" else None
        del model
        row["tp"] = run_tp(kind, name, x if kind != "detection" else torch.randn(1, 3, side, side))
    elif kind == "detection":
        row["whole_model"] = whole_model_trace(model, x)
        side = backbone_side(model)
        backbone = model.backbone.eval()
        del model
        row["ehap"] = run_ehap(backbone, torch.randn(1, 3, side, side))
        row["ehap"]["on"] = f"model.backbone at 1x3x{side}x{side}"
    else:
        row["ehap"] = run_ehap(model, x)
    row[part]["peak_gib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)
    return row


def backbone_side(model) -> int:
    """A detection backbone's input side: the transform's fixed size (SSD: 300 or 320; its
    valid-padded extra layers need it), else 256."""
    fixed = getattr(getattr(model, "transform", None), "fixed_size", None)
    return int(fixed[0]) if fixed else 256


def whole_model_trace(model, x) -> str:
    """Whether FX traces the whole detection model: as called (a list of images), then
    called by a wrapper that builds the list (so the list itself is no Proxy) with the
    transform, heads and anchor generator as ``leaf_modules``."""
    from ehap_fx.passes.trace import trace
    from torch import nn

    class OneImage(nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, x):
            return self.m([x[0]])

    leaves = [f"m.{h}" for h in ("transform", "rpn", "roi_heads", "head", "anchor_generator") if hasattr(model, h)]
    tries = []
    for what, call in (("as called", lambda: trace(model, [x[0]])),
                       (f"wrapped, leaf_modules={leaves}", lambda: trace(OneImage(model), x, leaf_modules=leaves))):
        try:
            call()
            return f"traced ({what})"
        except Exception as e:
            tries.append(f"{what}: {type(e).__name__}: {str(e).splitlines()[0][:240]}")
    return " | ".join(tries)


def run_part(kind: str, name: str, part: str, args) -> dict:
    """One part in a guarded subprocess: refused before it starts when its predicted
    footprint exceeds the memory limit, stopped by the watchdog if it grows past it."""
    side = input_side(name)
    limit = int(args.memory_fraction * available_bytes())
    need = footprint(name, part, side)
    if need > limit:
        return {part: {"status": "skipped", "error": f"predicted {need / 2**30:.1f} GiB > limit "
                       f"{limit / 2**30:.1f} GiB ({args.memory_fraction:g} of the memory available now; "
                       f"raise --memory-fraction on a larger machine)", "predicted_gib": round(need / 2**30, 1)}}
    t = time.time()
    rc, out, err, why = run_guarded([sys.executable, __file__, "--one", kind, name, part], args.timeout, limit)
    line = next((ln for ln in out.splitlines() if ln.startswith("ROW ")), None)
    if line is not None:
        row = json.loads(line[4:])
    else:
        tail = err.strip().splitlines()[-1:] or [f"exit code {rc}"]
        why = why or ("killed by a signal" if rc < 0 else tail[0][:300])
        row = {part: {"status": "error", "error": why}}
    row[part]["wall_s"] = round(time.time() - t, 1)
    row[part]["predicted_gib"] = round(need / 2**30, 1)
    return row


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()}, {os.cpu_count()} cores"
    except OSError:
        pass
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"


def _versions() -> str:
    from importlib.metadata import version

    import torch
    import torch_pruning
    import torchvision

    # the package metadata: torch_pruning.__version__ of the 1.6.1 wheel still reads 1.6.0
    return (f"torch {torch.__version__}, torchvision {torchvision.__version__}, "
            f"Torch-Pruning {version('torch-pruning')} (its __version__: {torch_pruning.__version__})")


def main(argv=None) -> int:
    from prunability_table import _cell, _failed, markdown, summary  # (it reads this module's checks)

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--kinds", nargs="+", default=["classification", "segmentation", "detection"])
    p.add_argument("--models", nargs="*", help="only these model names")
    p.add_argument("--skip", nargs="*", default=[], help="model names to leave out")
    p.add_argument("--timeout", type=int, default=900)
    p.add_argument("--cache", type=Path, default=Path("docs/prunability.json"))
    p.add_argument("--markdown", type=Path, help="write the table here")
    p.add_argument("--notes", type=Path, help="a markdown file of reading notes, put after the header")
    p.add_argument("--redo", nargs="*", choices=["ehap", "tp"], default=None,
                   help="run the selected models again: both parts, or only those named (e.g. --redo ehap "
                        "after a change of ehap-fx's defaults, keeping Torch-Pruning's cached results)")
    p.add_argument("--report-only", action="store_true", help="run nothing: print and write what is cached")
    p.add_argument("--memory-fraction", type=float, default=0.5,
                   help="a part may use this fraction of the memory available when it starts")
    p.add_argument("--one", nargs=3, metavar=("KIND", "NAME", "PART"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.one:
        print("ROW " + json.dumps(run_one(*args.one)))
        return 0
    cache = json.loads(args.cache.read_text()) if args.cache.exists() else {"meta": {}, "rows": {}}
    todo = [(k, n) for k, n in model_names(args.kinds) if (not args.models or n in args.models) and n not in args.skip]
    todo.sort(key=lambda kn: num_params(kn[1]))  # small models first: a stopped run covers most
    redo = set() if args.redo is None else set(args.redo or ("ehap", "tp"))
    for kind, name in [] if args.report_only else todo:
        old = cache["rows"].get(name)
        if old and not redo and not _failed(old):
            continue
        row = {"kind": kind, "model": name}
        for part in ("ehap", "tp"):
            if old and part not in redo and old.get(part, {}).get("status") not in (None, "error", "skipped"):
                row[part] = old[part]  # a part that already ran to a result is kept
                row.update({k: v for k, v in old.items() if k in ("input", "params_m", "whole_model")})
                continue
            row.update({k: v for k, v in run_part(kind, name, part, args).items() if k not in row or k == part})
        row["wall_s"] = round(sum(row[p].get("wall_s", 0) for p in ("ehap", "tp")), 1)
        row["load"] = os.getloadavg()[0]
        cache["rows"][name] = row
        cache["meta"] = {
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "cpu": _cpu(),
            "versions": _versions(),
            "command": "python tools/prunability.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        }
        args.cache.write_text(json.dumps(cache, indent=1))
        e, tpr = row.get("ehap", {}), row.get("tp", {})
        print(f"{name}: ehap {_cell(e)} / TP {_cell(tpr)} ({row['wall_s']} s, load {row['load']:.1f})", flush=True)
    order = {n: i for i, (_, n) in enumerate(model_names(["classification", "segmentation", "detection"]))}
    rows = sorted(cache["rows"].values(), key=lambda r: order.get(r["model"], 1e9))
    missing = [n for _, n in model_names(args.kinds) if n not in cache["rows"]]
    print(summary(rows) + (f"\nnot run: {', '.join(missing)}" if missing else ""))
    if args.markdown:
        meta = {**cache["meta"], "missing": missing, "notes": args.notes.read_text() if args.notes else ""}
        args.markdown.write_text(markdown(rows, meta))
    return 0


if __name__ == "__main__":
    sys.exit(main())
