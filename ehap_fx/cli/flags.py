"""The ``ehap`` parser, the data sources' presets, and flags turned into ``CompressOptions`` once."""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass, replace
from pathlib import Path

from ehap_fx.compress import RECIPE, CompressOptions
from ehap_fx.errors import EhapError
from ehap_fx.imagefolder import layout
from ehap_fx.isa import INT8_TARGETS, emulated_precision
from ehap_fx.latency import BenchOptions, LatencyOptions
from ehap_fx.latency_loop import LoopOptions
from ehap_fx.models import (
    DIGITS_MODEL,
)
from ehap_fx.passes.compensate import CompensateOptions
from ehap_fx.passes.quantize import QAT_FINETUNE, QAT_RANGES, QuantizeOptions
from ehap_fx.scoring.options import HessianOptions
from ehap_fx.target import Target
from ehap_fx.train import DistillOptions, FinetuneOptions

DEFAULT_DATA_DIR = Path("~/.cache/ehap-fx/data")

log = logging.getLogger("ehap_fx")

class UsageError(EhapError):
    """A flag value or combination the CLI cannot run with."""


# ---------------------------------------------------------------------------------------------
# Parser
# ---------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ehap", description="Hessian-aware structured pruning, INT8 QAT and ONNX export.",
        epilog="With no arguments: `ehap compress`, the embedded default (a ResNet-8 trained "
               "in-process on scikit-learn's real handwritten digits). `ehap COMMAND --help` lists "
               "each command's flags.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _compress_parser(sub)
    _train_parser(sub)
    _eval_parser(sub)
    _bench_parser(sub)
    _sweep_parser(sub)
    return parser


def _common(p: argparse.ArgumentParser, *, model: bool = True) -> None:
    if model:
        p.add_argument("--model",
                       help="the paper's names (resnet8..110, resnet56-b, wrn-28-8), torchvision:NAME, "
                            "timm:NAME, path/to/file.py:factory or module:attr (a class or a function, "
                            f"called with num_classes= when it takes it; default: {DIGITS_MODEL} on digits, "
                            "resnet56 on CIFAR)")
        p.add_argument("--weights", type=Path,
                       help="a state dict or a checkpoint holding one (read weights-only), or for "
                            "torchvision:/timm: models a pretrained tag (DEFAULT, IMAGENET1K_V1, pretrained, "
                            "a timm tag) taken from the library's local cache, never downloaded; a "
                            "pretrained head of another class count is replaced")
        p.add_argument("--num-classes", type=int,
                       help="classes of the model's output (default: the data's class count)")
        p.add_argument("--pretrained-dir", type=Path,
                       help="folder of torch.hub-named pretrained checkpoints (finds the model's)")
        p.add_argument("--pretrained", action="store_true",
                       help="the paper's public checkpoint of --model, from torch.hub's cache "
                            "(downloaded there, sha256-checked, when missing)")
    p.add_argument("--data", type=Path,
                   help="folder holding cifar-10-batches-py/ or cifar-100-python/, or an image folder: "
                        "train/ and val/ (or test/) of class folders (torchvision's ImageFolder layout, any "
                        "format Pillow reads), or images alone (unlabelled: ranking and PTQ calibration "
                        "only). Without it and without --download: scikit-learn's handwritten digits")
    p.add_argument("--input-size", type=int,
                   help="image folders: the side images are resized/cropped to (default: the model "
                        "library's, else 224)")
    p.add_argument("--mean", type=float, nargs=3, metavar=("R", "G", "B"),
                   help="normalisation mean of RGB in [0, 1] (default: the model's weights' or library's; "
                        "with --std)")
    p.add_argument("--std", type=float, nargs=3, metavar=("R", "G", "B"),
                   help="normalisation std (with --mean)")
    p.add_argument("--workers", type=int,
                   help="image folders: decoding processes (default: the cores but one, at most 8; 0: none)")
    p.add_argument("--dataset", choices=("cifar10", "cifar100", "digits"),
                   help="default: digits without --data/--download, else cifar10")
    p.add_argument("--download", action="store_true",
                   help=f"fetch CIFAR into --data (default {DEFAULT_DATA_DIR}) if missing")
    p.add_argument("--synthetic", action="store_true",
                   help="use synthetic (random) CIFAR-shaped data, labelled so in every output")
    p.add_argument("--limit-train", type=int, help="use only the first N training images")
    p.add_argument("--limit-test", type=int, help="use only the first N test images")
    p.add_argument("--batch-size", type=int, help="training batch size")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true", help="no progress bars or info messages")


def _compress_parser(sub) -> None:
    p = sub.add_parser("compress", help="prune, fine-tune, quantize and export a model",
                       description="Prune to a MACs/params target by Hessian-aware ranking, "
                                   "fine-tune, quantize to INT8 and export verified ONNX.")
    _common(p)
    t = p.add_mutually_exclusive_group()
    t.add_argument("--target-macs", type=float, help="fraction of dense MACs to keep (default 0.5)")
    t.add_argument("--target-params", type=float, help="fraction of dense params to keep")
    t.add_argument("--target-latency", type=float,
                   help="fraction of the dense onnxruntime latency to keep (measured, cached)")
    p.add_argument("--latency-batch", type=int, default=128, help="batch of the latency table")
    p.add_argument("--latency-precision", choices=("int8", "fp32"), default="int8")
    p.add_argument("--latency-loop-rounds", type=int, default=LoopOptions().max_rounds,
                   help="with --target-latency: plans exported to INT8 and timed against the dense INT8 "
                        "model, the plan corrected until the measured ratio meets the target (0: trust "
                        f"the per-conv table alone; default {LoopOptions().max_rounds})")
    p.add_argument("--latency-tolerance", type=float, default=LoopOptions().tolerance,
                   help="the latency loop's tolerance on measured/target - 1 (default "
                        f"{LoopOptions().tolerance})")
    p.add_argument("--round-to", type=int, default=RECIPE.round_to,
                   help=f"kept widths are multiples of this (default {RECIPE.round_to})")
    p.add_argument("--max-prune", type=float, default=0.8, help="max fraction of a group to remove")
    p.add_argument("--min-channels", type=int, default=1)
    p.add_argument("--steps", type=int, default=1, help="iterative pruning steps")
    p.add_argument("--granularity", choices=("channel", "block", "both"), default=RECIPE.granularity,
                   help="channel: narrow layers; block: drop whole residual blocks (depth pruning, "
                        f"widths stay: fastest in INT8); both (default {RECIPE.granularity})")
    p.add_argument("--capture", choices=("auto", "fx", "export"), default="auto",
                   help="how the model becomes a graph: auto (default: torch.fx, else torch.export, and "
                        "export where it keeps more channels prunable), fx, or export")
    p.add_argument("--scorer", choices=("hessian", "removal", "l1"),
                   help="hessian: the paper's trace sensitivity; removal: exact Gauss-Newton loss "
                        "increase of removing each channel, ranked per unit of the target's cost saved "
                        "(MAC, parameter or second; the default with real data: 4.15-6.19 points above "
                        "hessian after fine-tuning CIFAR ResNet-56/-32 at 0.5 MACs, docs/results.md); "
                        "l1: magnitude. Default on synthetic data: hessian (a random model's GGN is 0)")
    p.add_argument("--estimator", choices=("auto", "ggn", "mc", "hutchinson", "hybrid"),
                   help="Hessian estimator (default: auto, the exact GGN when it fits the memory "
                        "budget and the classes are few, else the Monte-Carlo GGN; hutchinson with "
                        "synthetic data, where a random model's saturated softmax makes the GGN zero)")
    p.add_argument("--hessian-dtype", choices=("auto", "fp32", "bf16", "fp16"), default="auto")
    p.add_argument("--hessian-batch", type=int, help="images per Hessian batch")
    p.add_argument("--probes", type=int,
                   help="fixed number of Hutchinson probes (default: adaptive; 4 on synthetic data)")
    p.add_argument("--max-probes", type=int, default=200)
    p.add_argument("--finetune-epochs", type=float, help="fine-tune epochs (0: no fine-tune)")
    p.add_argument("--no-compensate", action="store_true",
                   help="skip the least-squares repair of the surviving weights after pruning (default: "
                        "refit them to reproduce the activations of the dense model pruned (the fine-tuned "
                        "teacher with --prune-from teacher); with --finetune-epochs 0 "
                        "that is the post-training recipe)")
    p.add_argument("--compensate-images", type=int, default=CompensateOptions().images,
                   help=f"calibration images of that repair (no labels read; default "
                        f"{CompensateOptions().images})")
    p.add_argument("--finetune-steps", type=int, help="cap on fine-tune steps")
    p.add_argument("--lr", type=float, default=0.01, help="fine-tune learning rate")
    p.add_argument("--qat-epochs", type=float)
    p.add_argument("--qat-steps", type=int, help="cap on QAT steps")
    p.add_argument("--quant-mode", choices=("qat", "ptq"), default=RECIPE.quant_mode,
                   help=f"default {RECIPE.quant_mode} (QAT tied PTQ on ResNet-56 at 15-29x the cost, "
                        "docs/results.md); "
                        "QAT starts from the PTQ model and is kept only if it beats PTQ on held-out "
                        "training images")
    p.add_argument("--qat-ranges", choices=QAT_RANGES, default=QuantizeOptions().qat_ranges,
                   help="QAT's activation ranges: calibrated (PTQ's histogram on the calibration batches, "
                        "then held: QAT starts from the PTQ model) or moving (min/max of the training "
                        "batches)")
    p.add_argument("--backend", choices=("pt2e", "fx"), default=QuantizeOptions().backend,
                   help="INT8 path: pt2e (default: torchao's PT2E, the maintained one) or fx "
                        "(torch.ao's FX prepare/convert, deprecated upstream)")
    p.add_argument("--no-quantize", action="store_true", help="stop at the pruned fp32 model")
    p.add_argument("--int8-target", choices=("auto", *INT8_TARGETS), default="auto",
                   help="where the INT8 model will run: fixes the weight range its kernels compute "
                        "exactly (auto: this CPU; x86 without AVX512-VNNI gets 7-bit weights)")
    p.add_argument("--no-distill", action="store_true",
                   help="fine-tune and QAT from the labels alone (default: also distil from the dense "
                        "model's softened logits)")
    p.add_argument("--distill-alpha", type=float, default=RECIPE.distill.alpha,
                   help=f"weight of the teacher's soft targets in the loss "
                        f"(default {RECIPE.distill.alpha:g})")
    p.add_argument("--distill-temperature", type=float, default=RECIPE.distill.temperature,
                   help=f"softmax temperature (default {RECIPE.distill.temperature:g})")
    p.add_argument("--teacher", choices=("finetuned", "given"), default=RECIPE.distill.teacher,
                   help="distil from the dense model fine-tuned first with the same budget (one more "
                        "fine-tune; its top-1 is the report's baseline) or as given (default "
                        f"{RECIPE.distill.teacher})")
    p.add_argument("--prune-from", choices=("teacher", "given"), default=RECIPE.distill.start,
                   help="with --teacher finetuned, prune the fine-tuned teacher (ranked, pruned and "
                        "repaired toward it) or the dense model as given (default "
                        f"{RECIPE.distill.start})")
    p.add_argument("--bench-rounds", type=int, default=10,
                   help="onnxruntime timing rounds of the dense fp32 and the INT8 model at batch 1 and "
                        "128, for the report's speed-up (0: skip; default 10)")
    p.add_argument("--bench-threads", type=int,
                   help="onnxruntime threads of that timing (default: all cores)")
    p.add_argument("--train-epochs", type=float,
                   help="epochs of the in-process training of the digits model (default "
                        f"{PRESETS['digits'].train_epochs:g}; only without --weights on digits)")
    p.add_argument("--out", type=Path, help="output folder (default runs/compress-<model>)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run of this --out that was stopped (Ctrl-C, SIGTERM, a kill, a crash) "
                        "from the steps it saved in its hidden .OUT.partial folder: the same command and "
                        "flags plus --resume; the outputs equal an uninterrupted run's")
    p.add_argument("--checkpoint-every", type=int, metavar="STEPS",
                   help="also save each fine-tune and QAT every STEPS optimizer steps (default: at the end "
                        "of each step of the recipe only)")


def _train_parser(sub) -> None:
    p = sub.add_parser("train", help="train a baseline model from scratch",
                       description="Baseline training (SGD Nesterov, cosine, crop+flip); the "
                                   "checkpoint loads with `ehap compress --weights`.")
    _common(p)
    p.add_argument("--epochs", type=float, default=200.0)
    p.add_argument("--steps", type=int, help="cap on optimizer steps")
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--label-smoothing", type=float, default=0.0)
    p.add_argument("--out", type=Path, help="checkpoint path (default runs/<model>-<dataset>.pt)")


def _eval_parser(sub) -> None:
    p = sub.add_parser("eval", help="top-1 of a checkpoint or an .onnx file on a dataset")
    p.add_argument("path", type=Path, help=".onnx, pruned_state_dict.pt, pruned_model.pt or "
                                           "a state dict for --model")
    _common(p)


def _bench_parser(sub) -> None:
    p = sub.add_parser("bench", help="onnxruntime latency of an .onnx file")
    p.add_argument("path", type=Path)
    p.add_argument("--batch", type=int, nargs="+", default=[1, 128])
    p.add_argument("--threads", type=int, help="intra-op threads (default: onnxruntime's)")
    p.add_argument("--runs", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--quiet", action="store_true")


def _sweep_parser(sub) -> None:
    p = sub.add_parser(
        "sweep", help="the accuracy-latency front: several latency targets x scorers, timed in onnxruntime",
        description="Compress one model at several latency targets with each scorer, the same fine-tune "
                    "budget for every arm, quantize, export; then time every ONNX file side by side "
                    "(batch 1 and 128) and write front.md/json/png (ehap_fx.sweep). Resumable: rerun "
                    "the same command to finish an interrupted sweep.")
    _common(p)
    p.add_argument("--targets", type=float, nargs="+",
                   help="latency fractions of the dense INT8 estimate (default 0.5 0.35 0.25)")
    p.add_argument("--scorers", nargs="+", choices=("removal", "hessian", "l1"),
                   help="default: removal hessian l1")
    p.add_argument("--granularity", choices=("channel", "block", "both"),
                   help=f"default {RECIPE.granularity}")
    p.add_argument("--round-to", type=int, default=RECIPE.round_to)
    p.add_argument("--finetune-epochs", type=float, help="fine-tune epochs per arm (default 0.5; --quick 5)")
    p.add_argument("--finetune-steps", type=int, help="cap on fine-tune steps per arm")
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--distill", choices=("on", "off", "both"), default="on",
                   help="distil every arm from the teacher (both: each arm with and without)")
    p.add_argument("--teacher", choices=("finetuned", "given"), default="finetuned",
                   help="the dense model after the same fine-tune budget (default) or as given")
    p.add_argument("--quant-mode", choices=("qat", "ptq"), default="ptq")
    p.add_argument("--qat-steps", type=int)
    p.add_argument("--hessian-batch", type=int, help="default 256")
    p.add_argument("--bench-rounds", type=int, help="default 10")
    p.add_argument("--bench-threads", type=int)
    p.add_argument("--quick", action="store_true",
                   help="a small front on the digits (latency 0.8, 0.6; removal, l1; 60 steps): minutes")
    p.add_argument("--finished-only", action="store_true",
                   help="compute nothing new: time and tabulate the arms already finished in --out")
    p.add_argument("--out", type=Path, help="output folder (default runs/sweep-<model>)")


# ---------------------------------------------------------------------------------------------
# Flags -> options (the one place where flags become dataclasses)
# ---------------------------------------------------------------------------------------------


def source(args) -> str:
    """Where the images come from: ``"synthetic"``, ``"cifar"``, ``"folder"`` (an image folder,
    labelled), ``"images"`` (images alone) or ``"digits"`` (the default)."""
    if args.synthetic:
        return "synthetic"
    if args.data is not None and args.dataset not in ("cifar10", "cifar100") and not args.download:
        found = _folder_layout(args.data)
        if found is not None:
            return "folder" if found == "imagefolder" else "images"
    if args.data is not None or args.download or args.dataset in ("cifar10", "cifar100"):
        return "cifar"
    return "digits"


def _folder_layout(root: Path) -> str | None:
    """An image folder's layout (``imagefolder.layout``), None for a CIFAR folder or nothing."""
    if any((root / d).is_dir() for d in ("cifar-10-batches-py", "cifar-100-python")):
        return None
    if (root / "batches.meta").is_file() or (root / "meta").is_file():
        return None  # the CIFAR folder itself
    return layout(root)


FOLDERS = ("folder", "images")
# image folders: PIL decoding in workers, small Hessian batches (capped at the images there)
@dataclass(frozen=True)
class Preset:
    """The defaults a run's flags leave open, one per data source (:data:`PRESETS`); ``train_epochs``
    of the digits model trained in-process, ``train_images``/``test_images`` of synthetic data."""

    batch_size: int
    hessian_batch: int
    scorer: str
    estimator: str
    probes: int | None
    finetune_epochs: float
    finetune_steps: int | None
    calibration_batches: int
    qat_epochs: float = 1.0
    qat_steps: int | None = None
    train_epochs: float = 6.0
    train_images: int = 512
    test_images: int = 256


PRESETS = {
    # the embedded default (scikit-learn digits, real images): about a minute on 2 cores
    "digits": Preset(batch_size=64, hessian_batch=256, scorer=RECIPE.scorer, estimator="auto", probes=None,
                     finetune_epochs=2.0, finetune_steps=None, calibration_batches=8),
    # synthetic data: end to end in minutes on a CPU (a random model's GGN is 0: Hutchinson)
    "synthetic": Preset(batch_size=64, hessian_batch=32, scorer="hessian", estimator="hutchinson", probes=4,
                        finetune_epochs=1.0, finetune_steps=8, calibration_batches=2, qat_steps=4),
    # real CIFAR: one fine-tune epoch and one QAT epoch (raise them for accuracy)
    "cifar": Preset(batch_size=128, hessian_batch=256, scorer=RECIPE.scorer, estimator="auto", probes=None,
                    finetune_epochs=1.0, finetune_steps=None, calibration_batches=16),
}


FOLDER_PRESETS = {
    "folder": replace(PRESETS["cifar"], batch_size=64, hessian_batch=64),
    "images": replace(PRESETS["cifar"], batch_size=64, hessian_batch=64, finetune_epochs=0.0),
}


def preset(args):
    """The defaults of the run's data source (:data:`PRESETS`, :data:`FOLDER_PRESETS`)."""
    kind = source(args)
    return FOLDER_PRESETS[kind] if kind in FOLDERS else PRESETS[kind]


def resolve_defaults(args) -> None:
    """Fill the defaults that depend on the data source (dataset, model, data folder), once."""
    if args.synthetic and (args.data is not None or args.download):
        raise UsageError("give --data DIR (or --download) or --synthetic, not both")
    if args.dataset == "digits" and (args.data is not None or args.download):
        raise UsageError("--dataset digits ships with scikit-learn: drop --data/--download")
    kind = source(args)
    if getattr(args, "input_size", None) is not None and kind not in FOLDERS:
        raise UsageError(f"--input-size resizes image folders; {kind} images have a fixed size "
                         "(drop --input-size, or give --data an image folder)")
    if getattr(args, "input_size", None) is not None and args.input_size < 1:
        raise UsageError(f"--input-size={args.input_size} must be >= 1")
    if getattr(args, "num_classes", None) is not None and args.num_classes < 1:
        raise UsageError(f"--num-classes={args.num_classes} must be >= 1")
    if kind in FOLDERS:
        args.dataset = "imagefolder"
        if hasattr(args, "model") and args.model is None:
            raise UsageError(f"--data {str(args.data)!r} is an image folder: name its model, e.g. --model "
                             "torchvision:resnet18, timm:NAME or path/to/file.py:factory")
    if args.dataset is None:
        args.dataset = "digits" if kind == "digits" else "cifar10"
    if kind == "cifar" and args.data is None:
        args.data = DEFAULT_DATA_DIR.expanduser()
    if hasattr(args, "model") and args.model is None:
        args.model = DIGITS_MODEL if args.dataset == "digits" else "resnet56"
    if getattr(args, "hessian_dtype", "auto") != "auto" and (msg := emulated_precision(args.hessian_dtype)):
        raise UsageError(f"--hessian-dtype {args.hessian_dtype}: {msg}; use --hessian-dtype auto")


def compress_options(args) -> CompressOptions:
    """``compress()``'s options from the flags and the data source's preset (UsageError if bad)."""
    prof, show = preset(args), not args.quiet
    try:
        given = {k: v for k, v in (("macs", args.target_macs), ("params", args.target_params),
                                   ("latency", args.target_latency)) if v is not None}
        target = Target(**(given or {"macs": 0.5}), max_prune=args.max_prune,
                        min_channels=args.min_channels,
                        round_to=args.round_to,
                        steps=args.steps, granularity=args.granularity)
        hessian = HessianOptions(
            estimator=_pick(args.estimator, prof.estimator), dtype=args.hessian_dtype,
            batch_size=_pick(args.hessian_batch, prof.hessian_batch),
            probes=_pick(args.probes, prof.probes),
            max_probes=args.max_probes, min_probes=min(20, args.max_probes), seed=args.seed,
            data_seed=args.seed, progress=show)
        distill = None if args.no_distill else DistillOptions(args.distill_alpha, args.distill_temperature,
                                                              args.teacher, args.prune_from)
        epochs = _pick(args.finetune_epochs, prof.finetune_epochs)
        finetune = None if epochs == 0 else FinetuneOptions(
            epochs=epochs, lr=args.lr, max_steps=_pick(args.finetune_steps, prof.finetune_steps),
            progress=show, distill=distill)
        quantize = None if args.no_quantize else QuantizeOptions(
            backend=args.backend, mode=args.quant_mode, target=args.int8_target, qat_ranges=args.qat_ranges,
            finetune=replace(QAT_FINETUNE, epochs=_pick(args.qat_epochs, prof.qat_epochs),
                             max_steps=_pick(args.qat_steps, prof.qat_steps), progress=show,
                             distill=distill),
            calibration_batches=prof.calibration_batches)
        latency = LatencyOptions(batch_size=args.latency_batch, precision=args.latency_precision)
        bench = None if args.bench_rounds == 0 or quantize is None else BenchOptions(
            rounds=args.bench_rounds, threads=args.bench_threads)
        loop = None if args.latency_loop_rounds == 0 or target.kind != "latency" else LoopOptions(
            tolerance=args.latency_tolerance, max_rounds=args.latency_loop_rounds)
        compensate = None if args.no_compensate else CompensateOptions(images=args.compensate_images)
        return CompressOptions(target=target, scorer=_pick(args.scorer, prof.scorer), hessian=hessian,
                               finetune_options=finetune, quantize=quantize, latency=latency, bench=bench,
                               latency_loop=loop, compensate=compensate,
                               capture=getattr(args, "capture", "auto"))
    except ValueError as e:
        raise UsageError(str(e)) from e


def _pick(flag, default):
    return default if flag is None else flag
