"""Prunability beyond torchvision: ``compress(model, example_input)`` as written, on the models
of ultralytics, Hugging Face transformers, segmentation_models_pytorch and timm, with
Torch-Pruning 1.6.1 in the same run, side by side (random init, eval mode, no data).

Per model, each part in its own subprocess with a timeout and memory watchdog (the guarded
runner of ``tools/prunability.py``):

* **ehap-fx**: ``compress(model, x)``, nothing else. FLOPs before and after counted on ATen
  ops with ``torch.utils.flop_counter.FlopCounterMode`` (FX and export graphs count alike);
  "pruned" is ≤ 0.55 of the dense FLOPs. Checks: every output leaf keeps its shape; shrunk ≡
  masked original (``passes.mask`` on the graph the same capture makes) within 1e-4 of the
  output's scale; ONNX ≡ PyTorch in onnxruntime (same tolerance). The capture that ran.
* **Torch-Pruning**: ``MagnitudePruner`` (L1, ``round_to=8``, uniform ratios 0.15/0.30/0.45,
  the first at ≤ 0.5 of its own MACs count), the output layers ignored as its examples do
  (ultralytics: the Detect/Segment/Pose/OBB/Classify head's last convs/linear; transformers:
  ``classifier``; smp: ``segmentation_head``; timm: ``get_classifier()``). FLOPs counted the
  same way as ehap-fx's.

Results are cached per model in ``--cache`` (resumable).

    python tools/prunability_libs.py --library ultralytics transformers smp timm \\
        [--models ...] [--timeout 900] [--cache docs/prunability_libs.json] [--markdown FILE]
"""

from __future__ import annotations

import argparse
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
YOLO_SIDE, SEG_SIDE, CLS_SIDE = 256, 256, 224
YOLO_TASKS = {"": "detect", "-seg": "segment", "-cls": "classify", "-pose": "pose", "-obb": "obb"}
HF = ["ResNet", "ConvNext", "ConvNextV2", "MobileNetV1", "MobileNetV2", "EfficientNet", "RegNet", "BiT",
      "MobileViT", "MobileViTV2", "PoolFormer", "Van", "EfficientFormer", "SwiftFormer", "LevitNoTeacher", "Cvt",
      "FocalNet"]
HF_SEG = ["Segformer", "MobileViT", "MobileNetV2", "MobileViTV2"]
SMP_ARCHS = ["Unet", "UnetPlusPlus", "FPN", "PSPNet", "DeepLabV3", "DeepLabV3Plus", "Linknet", "MAnet", "PAN",
             "UPerNet", "Segformer"]
SMP_ENCODERS = ["resnet18", "mobilenet_v2", "efficientnet-b0"]
TIMM = ["resnet18", "resnet50d", "resnext26ts", "seresnext26d_32x4d", "regnetx_002", "regnety_002",
        "efficientnet_b0", "efficientnet_lite0", "tf_efficientnet_b0", "mobilenetv2_050", "mobilenetv3_small_050",
        "mobilenetv4_conv_small", "ghostnet_050", "ghostnetv2_100", "hrnet_w18_small", "dla34", "dpn48b",
        "densenet121", "vgg11", "repvgg_a0", "mobileone_s0", "convnext_atto", "convnextv2_atto", "cspresnet50",
        "cspdarknet53", "darknet17", "rexnet_100", "fbnetc_100", "mnasnet_050", "lcnet_050", "tinynet_e",
        "gernet_s", "resnest14d", "res2net50_14w_8s", "selecsls42b", "skresnet18", "xception41", "inception_v3",
        "nf_resnet26", "regnetz_b16", "efficientvit_b0", "fastvit_t8", "edgenext_xx_small", "rdnet_tiny",
        "vovnet39a", "ese_vovnet19b_dw", "hgnetv2_b0", "tresnet_m", "nasnetalarge", "pnasnet5large"]


def model_names(library: str) -> list[str]:
    if library == "ultralytics":
        return [f"yolo{v}{s}{t}" for v in ("v8", "11") for t in YOLO_TASKS for s in "nsmlx"]
    if library == "transformers":
        return [f"{c}ForImageClassification" for c in HF] + [f"{c}ForSemanticSegmentation" for c in HF_SEG]
    if library == "smp":
        return [f"{a}/{e}" for a in SMP_ARCHS for e in SMP_ENCODERS]
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
        side = CLS_SIDE if name.endswith("-cls") else YOLO_SIDE
        return model, torch.randn(1, 3, side, side)
    if library == "transformers":
        import transformers as T

        cls = name.replace("ForImageClassification", "").replace("ForSemanticSegmentation", "")
        config_cls = {"LevitNoTeacher": "Levit"}.get(cls, cls)
        config = getattr(T, f"{config_cls}Config")()
        head = name[len(cls):]
        model_cls = getattr(T, ("Levit" if cls == "LevitNoTeacher" else cls) + head)
        model = model_cls(config).eval()
        side = getattr(config, "image_size", CLS_SIDE)
        side = side if isinstance(side, int) else side[0]
        return model, torch.randn(1, getattr(config, "num_channels", 3), min(side, CLS_SIDE), min(side, CLS_SIDE))
    if library == "smp":
        import segmentation_models_pytorch as smp

        arch, encoder = name.split("/")
        return getattr(smp, arch)(encoder, encoder_weights=None).eval(), torch.randn(1, 3, SEG_SIDE, SEG_SIDE)
    if library == "timm":
        import timm

        model = timm.create_model(name, pretrained=False).eval()
        side = min(CLS_SIDE, model.pretrained_cfg.get("input_size", (3, CLS_SIDE, CLS_SIDE))[-1])
        side = max(side, model.pretrained_cfg.get("min_input_size", (3, 32, 32))[-1])
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
    from torch import nn

    if library == "ultralytics":  # its yolov8 example: the head's final prediction layers
        head = model.model[-1]
        return [m for m in head.modules() if isinstance(m, nn.Conv2d) and m.out_channels in
                (getattr(head, "nc", -1), 4 * getattr(head, "reg_max", 16), getattr(head, "nm", -1),
                 getattr(head, "nk", -1), getattr(head, "ne", -1), 1)] + [head.dfl] * hasattr(head, "dfl") + [
            m for m in head.modules() if isinstance(m, nn.Linear)]
    if library == "transformers":
        return [m for n, m in model.named_modules() if n.startswith(("classifier", "decode_head.classifier",
                                                                     "segmentation_head"))]
    if library == "smp":
        return [model.segmentation_head]
    return [model.get_classifier()]


def run_tp(library: str, name: str) -> dict:
    import torch
    import torch_pruning as tp

    model, x = build(library, name)
    row: dict = {}
    t = time.perf_counter()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
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
                f"{tb.lineno})", "seconds": round(time.perf_counter() - t, 1)}
    row.update(flops_ratio=round(ratio, 4), status="pruned" if ratio <= PRUNED_AT else "not reached",
               shape_kept=base.shapes(dense) == base.shapes(out), seconds=round(time.perf_counter() - t, 1))
    return row


def run_one(library: str, name: str, part: str) -> dict:
    import resource

    import torch

    torch.set_num_threads(1)
    if part == "tp":
        row = {"tp": run_tp(library, name)}
    else:
        model, x = build(library, name)
        row = {"input": list(x.shape), "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 2),
               "ehap": run_ehap(model, x)}
    row[part]["peak_gib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)
    return row


def run_part(library: str, name: str, part: str, args) -> dict:
    limit = int(args.memory_fraction * base.available_bytes())
    t = time.time()
    rc, out, err, why = base.run_guarded([sys.executable, __file__, "--one", library, name, part], args.timeout, limit)
    line = next((ln for ln in out.splitlines() if ln.startswith("ROW ")), None)
    if line is not None:
        row = json.loads(line[4:])
    else:
        tail = err.strip().splitlines()[-1:] or [f"exit code {rc}"]
        row = {part: {"status": "error", "error": why or tail[0][:300]}}
    row[part]["wall_s"] = round(time.time() - t, 1)
    return row


def _ok(e: dict) -> bool:
    return (e.get("status") == "pruned" and e.get("shape_kept") and e.get("masked_ok") and e.get("onnx_ok")) is True


def markdown(rows: list[dict], meta: dict) -> str:
    out = [f"Run: {meta.get('date')}, {meta.get('cpu')}; {meta.get('versions')}.",
           f"Command: `{meta.get('command')}` (resumable: `{meta.get('cache')}`).", ""]
    for lib in ("ultralytics", "transformers", "smp", "timm"):
        mine = [r for r in rows if r["library"] == lib]
        if not mine:
            continue
        ok = sum(_ok(r.get("ehap", {})) for r in mine)
        tp_ok = sum(r.get("tp", {}).get("status") == "pruned" and r["tp"].get("shape_kept") is True for r in mine)
        out += [f"### {lib}: ehap-fx {ok} of {len(mine)} run, Torch-Pruning {tp_ok}", "",
                "| model | input | ehap-fx | capture | FLOPs | shape | ≡ masked | ONNX | s | Torch-Pruning | FLOPs | s |",
                "|---|---|---|---|---:|---|---|---|---:|---|---:|---:|"]
        for r in mine:
            e, tpr = r.get("ehap", {}), r.get("tp", {})
            yn = (lambda v: "yes" if v is True else ("**no**" if v is False else "–"))
            out.append(f"| {r['model']} | {'×'.join(map(str, r.get('input', [])[2:]))} | {e.get('status')} | "
                       f"{e.get('capture', {}).get('capture', '–')} | {e.get('flops_ratio', '–')} | "
                       f"{yn(e.get('shape_kept'))} | {yn(e.get('masked_ok'))} | {yn(e.get('onnx_ok'))} | "
                       f"{e.get('seconds', '')} | {tpr.get('status', '–')} | {tpr.get('flops_ratio', '–')} | "
                       f"{tpr.get('seconds', '')} |")
        notes = [f"- {r['model']} ({part}): {r[part].get('error', '')[:300]}" for r in mine for part in ("ehap", "tp")
                 if r.get(part, {}).get("status") in ("error", "not reached", "pinned") and r[part].get("error")]
        notes += [f"- {r['model']} (ehap-fx pins): {'; '.join(r['ehap'].get('pinned', []))[:400]}" for r in mine
                  if r.get("ehap", {}).get("status") == "not reached"]
        out += [""] + notes + [""]
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--library", nargs="+", default=["ultralytics", "transformers", "smp", "timm"])
    p.add_argument("--models", nargs="*")
    p.add_argument("--timeout", type=int, default=900)
    p.add_argument("--cache", type=Path, default=Path("docs/prunability_libs.json"))
    p.add_argument("--markdown", type=Path)
    p.add_argument("--no-tp", action="store_true", help="run the ehap-fx part only")
    p.add_argument("--report-only", action="store_true")
    p.add_argument("--memory-fraction", type=float, default=0.5)
    p.add_argument("--one", nargs=3, metavar=("LIBRARY", "NAME", "PART"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.one:
        print("ROW " + json.dumps(run_one(*args.one)))
        return 0
    cache = json.loads(args.cache.read_text()) if args.cache.exists() else {"meta": {}, "rows": {}}
    todo = [(lib, n) for lib in args.library for n in model_names(lib) if not args.models or n in args.models]
    for lib, name in [] if args.report_only else todo:
        key = f"{lib}:{name}"
        row = cache["rows"].get(key, {"library": lib, "model": name})
        for part in ("ehap",) if args.no_tp else ("ehap", "tp"):
            if row.get(part, {}).get("status") not in (None,) and "timeout" not in row[part].get("error", ""):
                continue
            row.update(run_part(lib, name, part, args))
        row["load"] = os.getloadavg()[0]
        cache["rows"][key] = row
        cache["meta"] = {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "cpu": base._cpu(),
                         "versions": base._versions(), "cache": str(args.cache),
                         "command": "python tools/prunability_libs.py " + " ".join(argv or sys.argv[1:])}
        args.cache.write_text(json.dumps(cache, indent=1))
        e, tpr = row.get("ehap", {}), row.get("tp", {})
        print(f"{key}: ehap {e.get('status')} {e.get('flops_ratio', '')} ok={_ok(e)} / TP {tpr.get('status')} "
              f"{tpr.get('flops_ratio', '')}", flush=True)
    if args.markdown:
        args.markdown.write_text(markdown(list(cache["rows"].values()), cache["meta"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
