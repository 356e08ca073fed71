"""Prunability beyond torchvision: ``compress(model, example_input)`` as written, on the models
of ultralytics, Hugging Face transformers, segmentation_models_pytorch and timm, with
Torch-Pruning 1.6.1 in the same run, side by side (random init, eval mode, no data).

The lists (``model_names``): every YOLO task (detect, segment, classify, pose, obb) × size
(n, s, m, l, x) of v8 and 11, built from the package's yaml; the transformers
``…ForImageClassification`` / ``…ForSemanticSegmentation`` CNNs and hybrids that build from a
default config (``SKIP`` says why one is left out); every smp architecture × three encoders
(DPT: a ViT encoder); one model (the smallest) of each timm CNN or hybrid family, with
``padding='same'`` ``tf_`` models among them. Inputs: see ``YOLO_SIDE`` and below.

Per model, both parts in a worker process (imports paid once per worker) with a per-row
timeout and memory watchdog (``Worker``):

* **ehap-fx**: ``compress(model, x)``, nothing else. FLOPs before and after counted on ATen
  ops with ``torch.utils.flop_counter.FlopCounterMode`` (FX and export graphs count alike);
  "pruned" is ≤ 0.55 of the dense FLOPs. Checks: every output leaf keeps its shape; shrunk ≡
  masked original (``passes.mask`` on the graph the same capture makes) within 1e-4 of the
  output's scale; ONNX ≡ PyTorch in onnxruntime (same tolerance). The capture that ran.
* **Torch-Pruning**: ``MagnitudePruner`` (L1, ``round_to=8``, uniform ratios 0.15/0.30/0.45,
  the first at ≤ 0.5 of its own MACs count), set up as its own examples do: ultralytics as
  ``examples/yolov8/yolov8_pruning.py`` (each ``C2f`` rebuilt with its chunked ``cv1`` split in
  two convs, ``C2fSplit``; the whole head ignored), elsewhere the classifier / segmentation
  head ignored. FLOPs counted as for ehap-fx; its errors name the dependency it was at.

Results are cached per model in ``--cache`` (resumable; several runs may share it).

    python tools/prunability_libs.py --library ultralytics transformers smp timm \\
        [--models ...] [--timeout 900] [--cache docs/prunability_libs.json] [--markdown FILE] \\
        [--interleave] [--reverse] [--rerun ehap tp] [--report-only]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time
import traceback
import warnings
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import prunability as base  # noqa: E402  (tools/prunability.py: runner, checks, ONNX check)

PRUNED_AT = 0.55
FLOOR_BYTES = 5 * 2**28  # 1.25 GiB: a row is stopped when the machine's available memory falls below
# Input sides, chosen so that the lists run in about an hour on 2 cores shared with other jobs
# (the FLOPs ratio of a CNN hardly depends on the side): YOLO n/s at 256, m at 224, l/x at 160;
# YOLO classify 160; transformers and timm 128 (or the size a model is fixed to, or its minimum);
# smp 128 (a multiple of 32).
YOLO_SIDE, YOLO_CLS_SIDE, CLS_SIDE, SEG_SIDE = 256, 160, 128, 128
YOLO_BIG_SIDE = {"m": 224, "l": 160, "x": 160}
YOLO_TASKS = {"": "detect", "-seg": "segment", "-cls": "classify", "-pose": "pose", "-obb": "obb"}
HF = ["ResNet", "ConvNext", "ConvNextV2", "MobileNetV1", "MobileNetV2", "EfficientNet", "RegNet", "Bit", "HGNetV2",
      "PPLCNet", "TextNet", "PoolFormer", "MobileViT", "MobileViTV2", "Levit", "Cvt", "FocalNet", "SwiftFormer",
      "PvtV2", "Segformer", "Dinat"]
HF_SEG = ["Segformer", "MobileNetV2", "MobileViT", "MobileViTV2", "UperNet"]
HF_FIXED = {"Levit"}  # attention biases for one resolution: the config's image_size
HF_CONFIG = {"EfficientNet": {"width_coefficient": 1.0, "depth_coefficient": 1.0, "hidden_dim": 1280}}  # B0, not B7


def _hf_config(T, cls: str):
    """The default config (small overrides in ``HF_CONFIG``); UperNet on a ConvNeXt-T backbone
    (its default backbone is a ResNet-50)."""
    if cls == "UperNet":
        stages = ["stage1", "stage2", "stage3", "stage4"]
        backbone = T.ConvNextConfig(out_features=stages, hidden_sizes=[96, 192, 384, 768], depths=[3, 3, 9, 3])
        return T.UperNetConfig(backbone_config=backbone)  # lists: ConvNext's tuple defaults fail its __init__
    return getattr(T, f"{cls}Config")(**HF_CONFIG.get(cls, {}))
SMP_ARCHS = ["Unet", "UnetPlusPlus", "MAnet", "Linknet", "FPN", "PSPNet", "PAN", "DeepLabV3", "DeepLabV3Plus",
             "UPerNet", "Segformer", "DPT"]
SMP_ENCODERS = ["resnet18", "mobilenet_v2", "efficientnet-b0"]
SMP_DPT_ENCODER = "tu-vit_tiny_patch16_224"  # DPT takes a ViT-style encoder only: one (a CNN fails its check)
TIMM = ["resnet18", "resnet50d", "seresnext26d_32x4d", "resnetv2_50", "resnext26ts", "regnetx_002", "regnety_002",
        "regnetz_b16", "efficientnet_b0", "efficientnet_lite0", "tf_efficientnet_b0", "tf_efficientnetv2_b0",
        "mixnet_s", "mobilenetv2_050", "mobilenetv3_small_050", "mobilenetv4_conv_small", "mnasnet_050",
        "fbnetc_100", "hardcorenas_a", "lcnet_050", "tinynet_e", "ghostnet_050", "ghostnetv2_100", "repghostnet_050",
        "convnext_atto", "convnextv2_atto", "densenet121", "dla34", "dpn48b", "hrnet_w18_small", "inception_v3",
        "xception41", "vgg11", "repvgg_a0", "mobileone_s0", "res2net50_14w_8s", "resnest14d", "rexnet_100",
        "selecsls42b", "skresnet18", "tresnet_m", "cspresnet50", "cspdarknet53", "darknet17", "nf_resnet26",
        "gernet_s", "hgnet_tiny", "hgnetv2_b0", "ese_vovnet19b_dw", "inception_next_atto", "rdnet_tiny",
        "starnet_s050", "mambaout_femto", "fastvit_t8", "efficientvit_b0", "efficientformer_l1", "mobilevit_xxs",
        "mobilevitv2_050", "edgenext_xx_small", "levit_128s", "botnet26t_256", "poolformer_s12"]
SKIP = {"transformers:DinatForImageClassification": "needs the natten package (neighbourhood-attention kernels), "
        "not installed"}


def model_names(library: str) -> list[str]:
    if library == "ultralytics":
        return [f"yolo{v}{s}{t}" for s in "nsmlx" for t in YOLO_TASKS for v in ("v8", "11")]
    if library == "transformers":
        return [f"{c}ForImageClassification" for c in HF] + [f"{c}ForSemanticSegmentation" for c in HF_SEG]
    if library == "smp":
        return [f"{a}/{e}" for e in SMP_ENCODERS for a in SMP_ARCHS if a != "DPT"] + [f"DPT/{SMP_DPT_ENCODER}"]
    if library == "timm":
        return TIMM
    raise ValueError(f"library={library!r}")


def build(library: str, name: str):
    """The model (random init, eval mode) and its example input."""
    import torch

    torch.manual_seed(0)
    if library == "ultralytics":
        from ultralytics import YOLO

        model = YOLO(f"{name}.yaml").model.eval()  # built from the package's yaml
        size = name[len("yolo11")]  # yolov8n / yolo11n: the size letter
        side = YOLO_CLS_SIDE if name.endswith("-cls") else YOLO_BIG_SIDE.get(size, YOLO_SIDE)
        return model, torch.randn(1, 3, side, side)
    if library == "transformers":
        import transformers as T

        cls = name.replace("ForImageClassification", "").replace("ForSemanticSegmentation", "")
        config = _hf_config(T, cls)  # random init
        model = getattr(T, name)(config).eval()
        side = config.image_size if cls in HF_FIXED else CLS_SIDE
        return model, torch.randn(1, getattr(config, "num_channels", 3), side, side)
    if library == "smp":
        import segmentation_models_pytorch as smp

        arch, encoder = name.split("/")
        side = 224 if arch == "DPT" else SEG_SIDE  # the ViT's patch grid
        return getattr(smp, arch)(encoder, encoder_weights=None).eval(), torch.randn(1, 3, side, side)
    if library == "timm":
        import timm

        model = timm.create_model(name, pretrained=False).eval()
        cfg = model.pretrained_cfg
        side = cfg["input_size"][-1] if cfg.get("fixed_input_size") else CLS_SIDE
        side = max(side, cfg.get("min_input_size", (3, 32, 32))[-1])
        return model, torch.randn(1, 3, side, side)
    raise ValueError(library)


def flops(model, x) -> int:
    import torch
    from ehap_fx.passes.trace import call_with
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        call_with(model, x)
    return int(counter.get_total_flops())


def run_ehap(model, x) -> dict:
    import torch
    from ehap_fx.passes.capture import capture_groups
    from ehap_fx.passes.group import groups_of
    from ehap_fx.passes.mask import mask_channels
    from ehap_fx.passes.trace import call_with

    from ehap_fx.compress import compress

    row: dict = {}
    dense_flops = flops(model, x)
    t = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            res = compress(model, x)
        except Exception as e:
            row.update(status="error", error=f"{type(e).__name__}: {str(e)[:600]}")
            if type(e).__name__ == "TargetError":
                row["status"] = "pinned"
            row["seconds"] = round(time.perf_counter() - t, 1)
            return row
    row["seconds"] = round(time.perf_counter() - t, 1)
    row["capture"] = res.report.capture
    pruned = res.pruned
    ratio = flops(pruned, x) / dense_flops
    row.update(flops_ratio=round(ratio, 4), macs_ratio=round(res.report.cost_after["macs_ratio"], 4),
               status="pruned" if ratio <= PRUNED_AT else "not reached")
    row["pinned"] = [f"{c} ch: {r[:240]}" for c, r in groups_of(pruned).pin_reasons(3)]
    with torch.no_grad():
        dense, out = call_with(model, x), call_with(pruned, x)
        row["shape_kept"] = base.shapes(dense) == base.shapes(out)
        gm = capture_groups(model, x)
        masked = mask_channels(gm, pruned.meta["ehap.plan"]).graph_module
        diff, scale = base.max_diff(call_with(masked, x), out)
        row.update(masked_diff=diff, out_scale=scale, masked_ok=base.close(diff, scale, 1e-4))
    row.update(base.onnx_check(pruned, x, out))
    return row


def _tp_ignored(library: str, model) -> list:
    """The layers Torch-Pruning's own examples leave whole: the YOLOv8 example ignores the whole
    ``Detect`` head (here: whichever head the task has, ``model.model[-1]``); elsewhere the
    classifier or segmentation head."""
    if library == "ultralytics":
        return [model.model[-1]]
    if library == "transformers":
        return [m for n, m in model.named_modules() if n.startswith(("classifier", "decode_head.classifier",
                                                                     "segmentation_head"))]
    if library == "smp":
        return [model.segmentation_head]
    return [model.get_classifier()]


class C2fSplit:
    """What Torch-Pruning's YOLOv8 example does before pruning (its ``C2f_v2``): a ``C2f`` block
    (yolo11's ``C3k2`` inherits its forward) computes ``cv1(x).chunk(2, 1)``, which TP's graph
    cannot follow; the block is rebuilt with ``cv1`` split into two convs, same weights, same
    output::

        x ─ cv1 (2c) ─ chunk ─┬─ y0 ─────────────┐          x ─┬─ cv0 (c) ─────────────┐
                              └─ y1 ─ m0 ─ … ────┴ cat ─ cv2   └─ cv1 (c) ─ m0 ─ … ────┴ cat ─ cv2
    """

    @staticmethod
    def apply(model) -> int:
        import copy

        import torch
        from torch import nn
        from ultralytics.nn.modules.block import C2f

        class Split(nn.Module):
            def __init__(self, block):
                super().__init__()
                c = block.c
                self.cv0, self.cv1 = copy.deepcopy(block.cv1), copy.deepcopy(block.cv1)
                for conv, part in ((self.cv0, slice(0, c)), (self.cv1, slice(c, 2 * c))):
                    conv.conv.weight = nn.Parameter(block.cv1.conv.weight.detach()[part].clone())
                    conv.conv.out_channels = c
                    bn = conv.bn
                    for k in ("weight", "bias"):
                        setattr(bn, k, nn.Parameter(getattr(block.cv1.bn, k).detach()[part].clone()))
                    for k in ("running_mean", "running_var"):
                        setattr(bn, k, getattr(block.cv1.bn, k)[part].clone())
                    bn.num_features = c
                self.m, self.cv2 = block.m, block.cv2
                for k in ("i", "f", "type", "np"):  # ultralytics' routing attributes
                    if hasattr(block, k):
                        setattr(self, k, getattr(block, k))

            def forward(self, x):
                y = [self.cv0(x), self.cv1(x)]
                y.extend(m(y[-1]) for m in self.m)
                return self.cv2(torch.cat(y, 1))

        n = 0
        for parent in list(model.modules()):
            for name, child in list(parent.named_children()):
                if isinstance(child, C2f) and type(child).forward is C2f.forward:
                    setattr(parent, name, Split(child))
                    n += 1
        return n


def _tp_prepare(library: str, model) -> None:
    if library == "ultralytics":
        C2fSplit.apply(model)


def run_tp(library: str, name: str) -> dict:
    import torch
    import torch_pruning as tp

    model, x = build(library, name)
    row: dict = {}
    t = time.perf_counter()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with torch.no_grad():
                reference = model(x)
            _tp_prepare(library, model)
            dense_flops = flops(model, x)
            with torch.no_grad():
                dense = model(x)
            base_macs, _ = tp.utils.count_ops_and_params(model, x)
            pruner = tp.pruner.MagnitudePruner(model, x, importance=tp.importance.MagnitudeImportance(p=1),
                                               pruning_ratio=0.45, iterative_steps=3,
                                               ignored_layers=_tp_ignored(library, model), round_to=8)
            for _ in range(3):
                pruner.step()
                macs, _ = tp.utils.count_ops_and_params(model, x)
                if macs <= 0.5 * base_macs:
                    break
            with torch.no_grad():
                out = model(x)
            ratio = flops(model, x) / dense_flops
    except Exception as e:
        tb = traceback.extract_tb(e.__traceback__)[-1]
        return {"status": "error", "error": f"{type(e).__name__}: {str(e)[:300]} ({Path(tb.filename).name}:"
                f"{tb.lineno}{_tp_where(e)})", "seconds": round(time.perf_counter() - t, 1)}
    row.update(flops_ratio=round(ratio, 4), status="pruned" if ratio <= PRUNED_AT else "not reached",
               shape_kept=base.shapes(dense) == base.shapes(out), seconds=round(time.perf_counter() - t, 1))
    changed = [f"output {i}: {a} -> {b}" for i, (a, b) in enumerate(zip(base.shapes(dense), base.shapes(out))) if a != b]
    if changed:
        row["shape_changed"] = "; ".join(changed)[:300]
    diff, scale = base.max_diff(reference, dense)  # its preparation (C2f split) keeps the outputs
    row["prepared_ok"] = base.close(diff, scale, 1e-4)
    return row


def _tp_where(e: Exception) -> str:
    """The layer Torch-Pruning was at when it failed: the innermost ``dep`` (a dependency, whose
    repr names both layers and the op between them) or ``layer``/``module`` in its frames."""
    tb, found = e.__traceback__, ""
    while tb is not None:
        if "torch_pruning" in tb.tb_frame.f_code.co_filename:
            local = tb.tb_frame.f_locals
            for key in ("dep", "layer", "module"):
                if key in local and local[key] is not None:
                    found = f", at {key} {str(local[key]).splitlines()[0][:200]}"
                    break
        tb = tb.tb_next
    return found


def run_one(library: str, name: str, parts: list[str]) -> None:
    """Both parts in one process (torch and the library imported once), one ``ROW`` line each as
    it finishes, so that a part stopped by the timeout or the watchdog loses only itself."""
    import resource

    import torch

    torch.set_num_threads(1)
    for part in parts:
        t = time.time()
        if part == "tp":
            row = {"tp": run_tp(library, name)}
        else:
            model, x = build(library, name)
            row = {"input": list(x.shape), "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 2),
                   "ehap": run_ehap(model, x)}
        row[part].update(peak_gib=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
                         wall_s=round(time.time() - t, 1))
        print("ROW " + json.dumps(row), flush=True)


class Worker:
    """A child process that runs rows sent on its stdin (``--serve``): torch and the libraries
    are imported once, not once per row (on a loaded 2-core machine the imports took ~25 s of a
    row's ~90). The parent keeps the per-row guard of ``tools/prunability.py``: wall-clock
    timeout and memory watchdog; a child stopped by either, or after ``rows`` rows, is
    replaced by a fresh one."""

    def __init__(self, args, rows: int = 8):
        self.args, self.rows, self.proc, self.done = args, rows, None, 0

    def _start(self) -> None:
        import queue
        import subprocess
        import threading

        self.proc = subprocess.Popen([sys.executable, __file__, "--serve"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=1,
                                     env={**os.environ, "PYTHONWARNINGS": "ignore"})
        self.lines, self.err, self.done = queue.Queue(), [], 0
        threading.Thread(target=lambda: [self.lines.put(ln) for ln in self.proc.stdout], daemon=True).start()
        threading.Thread(target=lambda: [self.err.append(ln) for ln in self.proc.stderr], daemon=True).start()

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None

    def _why_stop(self, t0: float, limit: int) -> str | None:
        peak = base.rss_bytes(self.proc.pid)
        if peak > limit:
            return f"stopped by the memory watchdog at {peak / 2**30:.1f} GiB > {limit / 2**30:.1f} GiB"
        if base.available_bytes() < FLOOR_BYTES:
            return (f"stopped by the memory watchdog at {peak / 2**30:.1f} GiB: the machine's available "
                    f"memory fell below {FLOOR_BYTES / 2**30:.1f} GiB")
        if time.time() - t0 > self.args.timeout:
            return f"timeout {self.args.timeout:.0f} s"
        return None

    def run(self, library: str, name: str, parts: list[str]) -> dict:
        import queue

        if self.proc is None or self.proc.poll() is not None or self.done >= self.rows:
            self.stop()
            self._start()
        for _ in range(120):  # other jobs hold the memory: wait (up to 4 min) rather than start and be stopped
            if base.available_bytes() > FLOOR_BYTES + 2**30:
                break
            time.sleep(2)
        limit = max(int(self.args.memory_fraction * base.available_bytes()), 3 * 2**30)
        self.proc.stdin.write(f"{library} {name} {','.join(parts)}\n")
        self.proc.stdin.flush()
        row, why, t0 = {}, None, time.time()
        while True:
            try:
                line = self.lines.get(timeout=0.2)
            except queue.Empty:
                line = None
            if line is not None and line.startswith("ROW "):
                row.update(json.loads(line[4:]))
            elif line is not None and line.startswith("DONE"):
                break
            if self.proc.poll() is not None:
                break
            why = self._why_stop(t0, limit)
            if why:
                self.stop()
                break
        self.done += 1
        tail = [ln.strip() for ln in self.err if ln.strip()][-1:] or ["the worker exited"]
        for part in parts:
            row.setdefault(part, {"status": "error", "error": why or tail[0][:300]})
        return row


def serve() -> None:
    """``--serve``: one ``LIBRARY NAME PARTS`` line in, its ``ROW`` lines and ``DONE`` out."""
    for line in sys.stdin:
        library, name, parts = line.split()
        run_one(library, name, parts.split(","))
        print("DONE", flush=True)


def save_row(path: Path, key: str, row: dict, meta: dict) -> None:
    """Merge one row into the cache under an exclusive lock: several runs (one per library) may
    share the file."""
    import fcntl

    path.touch()
    with path.open("r+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        text = f.read()
        cache = json.loads(text) if text.strip() else {"meta": {}, "rows": {}}
        cache["rows"][key] = row
        commands = [c for c in cache["meta"].get("commands", []) if c != meta["command"]] + [meta["command"]]
        cache["meta"] = {**{k: v for k, v in meta.items() if k != "command"}, "commands": commands}
        f.seek(0)
        f.truncate()
        f.write(json.dumps(cache, indent=1))


def _ok(e: dict) -> bool:
    return (e.get("status") == "pruned" and e.get("shape_kept") and e.get("masked_ok") and e.get("onnx_ok")) is True


def markdown(rows: list[dict], meta: dict) -> str:
    commands = meta.get("commands", [meta.get("command")])
    out = [f"Run: {meta.get('date')}, {meta.get('cpu')}; {meta.get('versions')}.",
           f"Command (resumable: `{meta.get('cache')}`): `python tools/prunability_libs.py --library ultralytics "
           f"transformers smp timm --markdown docs/prunability_libs.md`; the rows come from {len(commands)} runs of "
           "it on parts of the lists (their command lines are in the cache's `meta`).", ""]
    yn = (lambda v: "yes" if v is True else ("**no**" if v is False else "–"))
    for lib in ("ultralytics", "transformers", "smp", "timm"):
        order = {n: i for i, n in enumerate(model_names(lib))}
        mine = sorted((r for r in rows if r["library"] == lib), key=lambda r: order.get(r["model"], len(order)))
        if not mine:
            continue
        ok = sum(_ok(r.get("ehap", {})) for r in mine)
        tp_ok = sum(r.get("tp", {}).get("status") == "pruned" and r["tp"].get("shape_kept") is True for r in mine)
        out += [f"### {lib}: {len(mine)} models; pruned to ≤ {PRUNED_AT} of the FLOPs with every check passing: "
                f"ehap-fx {ok}, Torch-Pruning {tp_ok} (shape kept)", "",
                "| model | input | ehap-fx | capture | FLOPs | shape | ≡ masked | ONNX | s | Torch-Pruning | FLOPs | shape "
                "| s |", "|---|---|---|---|---:|---|---|---|---:|---|---:|---|---:|"]
        for r in mine:
            e, tpr = r.get("ehap", {}), r.get("tp", {})
            if "skipped" in r:
                out.append(f"| {r['model']} | – | skipped | | | | | | | skipped | | | |")
                continue
            out.append(f"| {r['model']} | {'×'.join(map(str, r.get('input', [])[2:]))} | {e.get('status')} | "
                       f"{e.get('capture', {}).get('capture', '–')} | {e.get('flops_ratio', '–')} | "
                       f"{yn(e.get('shape_kept'))} | {yn(e.get('masked_ok'))} | {yn(e.get('onnx_ok'))} | "
                       f"{e.get('seconds', '')} | {tpr.get('status', '–')} | {tpr.get('flops_ratio', '–')} | "
                       f"{yn(tpr.get('shape_kept'))} | {tpr.get('seconds', '')} |")
        notes = [f"- {r['model']}: skipped, {r['skipped']}" for r in mine if "skipped" in r]
        notes += [f"- {r['model']} ({'ehap-fx' if part == 'ehap' else 'Torch-Pruning'}): {r[part]['error'][:400]}"
                  for r in mine for part in ("ehap", "tp") if r.get(part, {}).get("error")]
        notes += [f"- {r['model']} (Torch-Pruning changed the outputs): {r['tp']['shape_changed']}" for r in mine
                  if r.get("tp", {}).get("shape_changed")]
        notes += [f"- {r['model']} (ehap-fx ONNX): {r['ehap']['onnx_error'][:300]}" for r in mine
                  if r.get("ehap", {}).get("onnx_error")]
        notes += [f"- {r['model']} (ehap-fx, largest pins): {'; '.join(r['ehap'].get('pinned', []))[:400]}"
                  for r in mine if r.get("ehap", {}).get("status") == "not reached"]
        out += [""] + notes + [""]
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--library", nargs="+", default=["ultralytics", "transformers", "smp", "timm"])
    p.add_argument("--models", nargs="*")
    p.add_argument("--timeout", type=int, default=900, help="seconds per row, both parts")
    p.add_argument("--cache", type=Path, default=Path("docs/prunability_libs.json"))
    p.add_argument("--markdown", type=Path)
    p.add_argument("--no-tp", action="store_true", help="run the ehap-fx part only")
    p.add_argument("--rerun", nargs="*", default=[], choices=["ehap", "tp"], help="parts to run again")
    p.add_argument("--no-retry", action="store_true",
                   help="leave parts stopped by the clock or the memory watchdog as they are (default: "
                        "run them again)")
    p.add_argument("--reverse", action="store_true", help="last model first (a second run on the same list)")
    p.add_argument("--interleave", action="store_true", help="one model of each library in turn")
    p.add_argument("--report-only", action="store_true")
    p.add_argument("--memory-fraction", type=float, default=0.5)
    p.add_argument("--one", nargs=3, metavar=("LIBRARY", "NAME", "PARTS"), help=argparse.SUPPRESS)
    p.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.one:
        run_one(args.one[0], args.one[1], args.one[2].split(","))
        return 0
    if args.serve:
        serve()
        return 0
    worker = Worker(args)
    lists = [[(lib, n) for n in model_names(lib) if not args.models or n in args.models] for lib in args.library]
    todo = [row for rows in itertools.zip_longest(*lists) for row in rows if row] if args.interleave else sum(lists, [])
    todo = todo[::-1] if args.reverse else todo
    versions = None if args.report_only else _versions()
    for lib, name in [] if args.report_only else todo:
        key = f"{lib}:{name}"
        cache = json.loads(args.cache.read_text()) if args.cache.exists() and args.cache.read_text().strip() else {}
        row = cache.get("rows", {}).get(key, {"library": lib, "model": name})
        if key in SKIP:
            row.update(skipped=SKIP[key])
            parts = []
        else:
            parts = [part for part in (("ehap",) if args.no_tp else ("ehap", "tp")) if part in args.rerun
                     or row.get(part, {}).get("status") is None
                     or (not args.no_retry and _retry(row[part].get("error", "")))]
        if not parts and "skipped" not in row:
            continue
        if parts:
            row.update(worker.run(lib, name, parts))
        row["load"] = os.getloadavg()[0]
        meta = {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "cpu": base._cpu(),
                "versions": versions, "cache": str(args.cache),
                "command": "python tools/prunability_libs.py " + " ".join(argv or sys.argv[1:])}
        save_row(args.cache, key, row, meta)
        e, tpr = row.get("ehap", {}), row.get("tp", {})
        print(f"{key}: ehap {e.get('status')} {e.get('flops_ratio', '')} ok={_ok(e)} / TP {tpr.get('status')} "
              f"{tpr.get('flops_ratio', '')}", flush=True)
    worker.stop()
    if args.markdown:
        cache = json.loads(args.cache.read_text())
        args.markdown.write_text(markdown(list(cache["rows"].values()), cache["meta"]))
    return 0


def _retry(error: str) -> bool:
    """A part stopped by the clock or the memory watchdog (other jobs share the machine's memory)
    runs again on the next pass."""
    return "timeout" in error or "memory watchdog" in error


def _versions() -> str:
    from importlib.metadata import version

    libs = ("torch", "torchvision", "torch-pruning", "ultralytics", "transformers", "segmentation_models_pytorch",
            "timm", "onnxruntime")  # from the package metadata: the parent imports no torch (0.7 GiB)
    return ", ".join(f"{lib} {version(lib)}" for lib in libs)


if __name__ == "__main__":
    sys.exit(main())
