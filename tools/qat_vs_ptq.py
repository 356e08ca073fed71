"""QAT against PTQ at equal data on a pruned, fine-tuned ResNet-56 (shared CIFAR-10).

Prunes the pretrained ResNet-56 (L1, ``--macs``, ``--round-to``), fine-tunes it
``--finetune-epochs``, then builds INT8 models from it: PTQ (16 calibration batches) and QAT
variants of ``--steps`` steps each (defaults; lr 1e-4; distilled from the fp32 model), each
scored on every test image in PyTorch INT8. The fine-tuned model and each finished variant are
cached in ``--out``, so a rerun resumes. See docs/int8.md ("QAT against PTQ").

    python tools/qat_vs_ptq.py [--steps 98] [--variants ptq qat_default qat_lr1e-4 qat_distill]

``--readme``: the README command's recipe instead (``ehap compress --model resnet56 --data
../shared/data --pretrained-dir ../shared/weights --target-latency 0.5 --finetune-epochs 1``:
its flags parsed by the CLI itself, so scorer, granularity, rounding, fine-tune, distillation
and the QAT length are the CLI's defaults). The model is pruned and fine-tuned once by
``compress`` (no quantization), then quantized both ways from the same fine-tuned weights and
the same training batches: PTQ (the CLI's calibration batches) and QAT (the CLI's one epoch,
distilled from the fine-tune's teacher, ``ptq_fallback`` off), each scored on every test image; the
row ``check`` is the guarded default's choice (cross-entropy of both INT8 models on the same
calibration batches), ``qat_minus_ptq`` the paired difference of their test top-1 with its
standard error (per image, both models on the same images). Both INT8 models and the dense
fp32 model are exported to ONNX and timed side by side in onnxruntime (``--bench-rounds``; a
rerun re-times only). ``--qat-seed`` draws the INT8 step's batches (PTQ's calibration, QAT's
epoch) in another order from the same fine-tuned model (a second seed of the comparison);
``--qat-ranges`` is QuantizeOptions.qat_ranges, ``--qat-lr`` the QAT loop's learning rate.

    python tools/qat_vs_ptq.py --readme [--out runs/qat_vs_ptq] [--bench-rounds 20]
        [--qat-seed 1] [--qat-ranges calibrated|moving] [--qat-lr 1e-3]
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from dataclasses import replace
from pathlib import Path

import torch
from ehap_fx.passes.export import export, export_onnx, onnx_top1
from ehap_fx.passes.group import group_channels
from ehap_fx.passes.quantize import QAT_FINETUNE, QuantizeOptions
from ehap_fx.passes.shrink import shrink
from ehap_fx.passes.trace import trace

from ehap_fx.data import load_cifar
from ehap_fx.models import normalization, pretrained_model
from ehap_fx.qat import quantize_int8
from ehap_fx.scoring import magnitude_scores
from ehap_fx.target import Target, select_plan
from ehap_fx.train import DistillOptions, FinetuneOptions, evaluate, finetune

SHARED = Path(__file__).resolve().parents[2] / "shared"


def variants(steps: int) -> dict[str, QuantizeOptions]:
    qat = replace(QAT_FINETUNE, max_steps=steps)
    return {  # ptq_fallback off: each row is the method itself, not the guarded default
        "ptq": QuantizeOptions(mode="ptq"),
        "qat_default": QuantizeOptions(mode="qat", finetune=qat, ptq_fallback=False),
        "qat_lr1e-4": QuantizeOptions(mode="qat", finetune=replace(qat, lr=1e-4), ptq_fallback=False),
        "qat_distill": QuantizeOptions(mode="qat", finetune=replace(qat, distill=DistillOptions()), ptq_fallback=False),
    }


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=SHARED / "data")
    p.add_argument("--weights", type=Path, default=SHARED / "weights")
    p.add_argument("--macs", type=float, default=0.5)
    p.add_argument("--round-to", type=int, default=16)
    p.add_argument("--finetune-epochs", type=float, default=0.5)
    p.add_argument("--steps", type=int, default=98)
    p.add_argument("--variants", nargs="+", default=list(variants(1)))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=Path("runs/qat_vs_ptq"))
    p.add_argument("--readme", action="store_true", help="the README command's recipe (module docstring)")
    p.add_argument("--bench-rounds", type=int, default=10, help="--readme: onnxruntime timing rounds (0: none)")
    p.add_argument("--qat-seed", type=int, default=1, help="--readme: the INT8 step's data order")
    p.add_argument("--qat-ranges", choices=["calibrated", "moving"], default=QuantizeOptions().qat_ranges,
                   help="--readme: QuantizeOptions.qat_ranges")
    p.add_argument("--qat-lr", type=float, default=QAT_FINETUNE.lr, help="--readme: the QAT loop's learning rate")
    args = p.parse_args(argv)
    if args.readme:
        return readme_recipe(args.data, args.weights, args.out, args.bench_rounds, args.qat_seed, args.qat_ranges,
                             args.qat_lr)
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    norm = normalization("resnet56")
    train = load_cifar(args.data, split="train")
    test = load_cifar(args.data, split="test").loader(500, normalization=norm)
    x = torch.randn(2, 3, 32, 32)
    cached = args.out / f"pruned_ft_{args.macs}_{args.round_to}_{args.finetune_epochs}.pt"
    if cached.exists():
        gm = torch.load(cached, weights_only=False)
    else:
        gm = group_channels(trace(pretrained_model("resnet56", args.weights).eval(), x)).graph_module
        gm = shrink(gm, select_plan(gm, magnitude_scores(gm), Target(macs=args.macs, round_to=args.round_to)))
        gm = gm.graph_module
        finetune(gm, train.loader(128, shuffle=True, augment=True, normalization=norm, seed=0),
                 FinetuneOptions(epochs=args.finetune_epochs))
        torch.save(gm, cached)
    path = args.out / f"results_{cached.stem}_{args.steps}.json"
    res = json.loads(path.read_text()) if path.exists() else {}
    if "fp32" not in res:
        res["fp32"] = evaluate(gm, test)
    for name, opts in variants(args.steps).items():
        if name not in args.variants or name in res:
            continue
        start = time.time()
        loader = train.loader(128, shuffle=True, augment=opts.mode == "qat", normalization=norm, seed=1)
        teacher = copy.deepcopy(gm).eval() if opts.finetune.distill else None
        q = quantize_int8(gm, x, loader, opts, teacher=teacher)
        res[name] = {"top1": evaluate(q.graph_module, test), "steps": q.steps, "seconds": round(time.time() - start, 1)}
        path.write_text(json.dumps(res, indent=1))
        print(name, res[name], flush=True)
    print(json.dumps(res, indent=1))


README_FLAGS = ["--model", "resnet56", "--target-latency", "0.5", "--finetune-epochs", "1"]


def readme_recipe(data: Path, weights: Path, out: Path, bench_rounds: int = 10, qat_seed: int = 1,
                  qat_ranges: str = "calibrated", qat_lr: float = QAT_FINETUNE.lr) -> None:
    """PTQ against QAT on the README command's pruned, fine-tuned ResNet-56 (module docstring)."""
    from ehap_fx import cli
    from ehap_fx.compress import compress
    from ehap_fx.qat import check_loss

    args = cli.build_parser().parse_args(
        ["compress", *README_FLAGS, "--data", str(data), "--pretrained-dir", str(weights)])
    cli.resolve_defaults(args)
    opts = cli.compress_options(args)
    prof = cli.PRESETS[cli.source(args)]
    torch.manual_seed(args.seed)
    model, _ = cli.build_model(args, cli.NUM_CLASSES[args.dataset])
    train, test = cli.load_data(args)
    norm = cli.model_normalization(args)

    def loader(seed: int):
        return train.loader(prof.batch_size, shuffle=True, augment=True, seed=seed, normalization=norm)

    test_loader = test.loader(500, normalization=norm)
    x = torch.randn((1, *train.images.shape[1:]), generator=torch.Generator().manual_seed(args.seed))
    out.mkdir(parents=True, exist_ok=True)
    cached, path = out / "readme_pruned_ft.pt", out / "results_readme.json"
    res = json.loads(path.read_text()) if path.exists() else {}
    if cached.exists():
        saved = torch.load(cached, weights_only=False)
        gm, teacher = saved if isinstance(saved, tuple) else (saved, None)  # (a file of the first version)
    else:
        start = time.time()
        r = compress(model, x, data=loader(args.seed), eval_data=test_loader,
                     **vars(replace(opts, quantize=None, bench=None)))
        gm, teacher = r.pruned, r.teacher  # QAT distils from the fine-tune's teacher, as compress does
        torch.save((gm, teacher), cached)
        res["recipe"] = {"flags": " ".join(README_FLAGS), "scorer": opts.scorer,
                         "macs_ratio": r.report.cost_after["macs_ratio"],
                         "accuracy": r.report.accuracy, "seconds": round(time.time() - start, 1)}
        path.write_text(json.dumps(res, indent=1))
    if "check" in res:  # finished: time the files again
        _time_readme(out, res, path, bench_rounds)
        return
    if "fp32" not in res:
        res["fp32"] = evaluate(gm, test_loader)
    built, correct = {}, {}
    res["int8_step"] = {"seed": qat_seed, "qat_ranges": qat_ranges, "qat_lr": qat_lr}
    qat_opts = replace(opts.quantize, ptq_fallback=False, qat_ranges=qat_ranges,
                       finetune=replace(opts.quantize.finetune, lr=qat_lr))
    for name, q_opts in (("ptq", replace(opts.quantize, mode="ptq")), ("qat", qat_opts)):
        start = time.time()
        q = quantize_int8(gm, x, loader(qat_seed), q_opts, teacher=teacher)  # the same batches for both
        built[name], correct[name] = q.graph_module, _correct(q.graph_module, test_loader)
        rep = export(q, x, out / f"readme_{name}.onnx")
        res[name] = {"top1": 100.0 * float(correct[name].mean()), "steps": q.steps,  # = evaluate()
                     "onnx_top1": onnx_top1(rep.path, test_loader),
                     "seconds": round(time.time() - start, 1)}
        path.write_text(json.dumps(res, indent=1))
        print(name, res[name], flush=True)
    d = correct["qat"] - correct["ptq"]  # per image: +1 QAT alone right, -1 PTQ alone right
    res["qat_minus_ptq"] = {"pt": round(100 * float(d.mean()), 2),
                            "se_pt": round(100 * float(d.std() / len(d) ** 0.5), 2),
                            "only_qat_right": int((d > 0).sum()), "only_ptq_right": int((d < 0).sum())}
    batches = [(b[0], b[1]) for _, b in zip(range(opts.quantize.calibration_batches), loader(qat_seed))]
    losses = {n: check_loss(m, batches) for n, m in built.items()}
    res["check"] = {**{f"{n}_loss": v for n, v in losses.items()},
                    "kept": "qat" if losses["qat"] <= losses["ptq"] else "ptq",
                    "test_images": sum(len(y) for _, y in test_loader)}
    export_onnx(model.eval(), x, out / "readme_dense_fp32.onnx", dynamo=False)
    path.write_text(json.dumps(res, indent=1))
    _time_readme(out, res, path, bench_rounds)


@torch.no_grad()
def _correct(model, loader) -> torch.Tensor:
    """1.0 where ``model``'s top-1 is right, per test image (in the loader's order)."""
    return torch.cat([(model(x).argmax(1) == y).float() for x, y in loader])


def _time_readme(out: Path, res: dict, path: Path, rounds: int) -> None:
    """The dense fp32 model and both INT8 files, interleaved in onnxruntime (2 threads)."""
    from ehap_fx.isa import cpu_features
    from ehap_fx.latency import BenchOptions, time_onnx

    if rounds > 0:
        files = {n: out / f"readme_{n}.onnx" for n in ("dense_fp32", "ptq", "qat")}
        med = time_onnx(files, BenchOptions(rounds=rounds, threads=2))
        res["latency_ms"] = {n: {str(b): round(1000 * t, 3) for b, t in per.items()} for n, per in med.items()}
        res["speedup_vs_dense_fp32"] = {n: {str(b): round(med["dense_fp32"][b] / t, 3) for b, t in per.items()}
                                        for n, per in med.items()}
        res["timing"] = {"isa": cpu_features().describe(), "rounds": rounds, "threads": 2,
                         "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
        path.write_text(json.dumps(res, indent=1))
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
