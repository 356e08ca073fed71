"""The ``ehap`` command line: ``compress``, ``train``, ``eval``, ``bench``.

Flags are turned into the option dataclasses once (:func:`compress_options`); everything
else calls the library. User errors (every :class:`~ehap_fx.errors.EhapError`, and bad flag
values rejected by the options' validation) print one line on stderr and exit 1; Ctrl-C
exits 130. ``ehap compress`` writes into a hidden temporary folder next to ``--out`` and
renames it at the end, so a failed or interrupted run leaves nothing half-written.

With no arguments, ``ehap compress`` runs the embedded default: real images that an installed
package ships (scikit-learn's handwritten digits, 16x16), a ResNet-8 trained on them in-process,
then the whole job (prune, fine-tune, INT8, ONNX checked in onnxruntime) in about a minute on
two CPU cores, with real accuracies at every stage. ``--data DIR`` (or ``--download``) runs on
CIFAR; ``--synthetic`` on random CIFAR-shaped images, labelled as synthetic in every output.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shlex
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from ehap_fx import process_group
from ehap_fx import report as rep
from ehap_fx.compress import RECIPE, CompressOptions, compress
from ehap_fx.data import (
    CIFAR10_NORM,
    CIFAR100_NORM,
    DIGITS_NORM,
    IMAGENET_NORM,
    Normalization,
    load_cifar,
    load_digits,
    synthetic_cifar,
)
from ehap_fx.errors import DataError, EhapError, ModelError
from ehap_fx.imagefolder import check_classes, layout, load_image_folder
from ehap_fx.isa import INT8_TARGETS, emulated_precision
from ehap_fx.latency import BenchOptions, LatencyOptions
from ehap_fx.latency_loop import LoopOptions
from ehap_fx.models import (
    DIGITS_MODEL,
    NUM_CLASSES,
    download_pretrained,
    find_pretrained,
    get_model,
    load_pretrained,
    normalization,
)
from ehap_fx.models.resolve import ResolvedModel, library_of, resolve_model
from ehap_fx.passes.compensate import CompensateOptions
from ehap_fx.passes.export import onnx_top1, session
from ehap_fx.passes.quantize import QAT_FINETUNE, QAT_RANGES, QuantizeOptions
from ehap_fx.report import ZERO_SCORES, all_scores_zero, load_pruned
from ehap_fx.scoring.options import HessianOptions
from ehap_fx.sweep import SweepOptions, sweep
from ehap_fx.target import Target
from ehap_fx.train import DistillOptions, FinetuneOptions, evaluate, finetune

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
                        "refit them to reproduce the dense model's activations; with --finetune-epochs 0 "
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
    p.add_argument("--bench-rounds", type=int, default=10,
                   help="onnxruntime timing rounds of the dense fp32 and the INT8 model at batch 1 and "
                        "128, for the report's speed-up (0: skip; default 10)")
    p.add_argument("--bench-threads", type=int,
                   help="onnxruntime threads of that timing (default: all cores)")
    p.add_argument("--train-epochs", type=float,
                   help="epochs of the in-process training of the digits model (default "
                        f"{PRESETS['digits'].train_epochs:g}; only without --weights on digits)")
    p.add_argument("--out", type=Path, help="output folder (default runs/compress-<model>)")
    p.set_defaults(func=cmd_compress)


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
    p.set_defaults(func=cmd_train)


def _eval_parser(sub) -> None:
    p = sub.add_parser("eval", help="top-1 of a checkpoint or an .onnx file on a dataset")
    p.add_argument("path", type=Path, help=".onnx, pruned_state_dict.pt, pruned_model.pt or "
                                           "a state dict for --model")
    _common(p)
    p.set_defaults(func=cmd_eval)


def _bench_parser(sub) -> None:
    p = sub.add_parser("bench", help="onnxruntime latency of an .onnx file")
    p.add_argument("path", type=Path)
    p.add_argument("--batch", type=int, nargs="+", default=[1, 128])
    p.add_argument("--threads", type=int, help="intra-op threads (default: onnxruntime's)")
    p.add_argument("--runs", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_bench)


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
    p.set_defaults(func=cmd_sweep)


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
                                                              args.teacher)
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


# ---------------------------------------------------------------------------------------------
# Models and data
# ---------------------------------------------------------------------------------------------


def build_model(args, num_classes: int) -> tuple[nn.Module, Path | str | None]:
    """``--model`` (see ``ehap_fx.models.resolve``) with ``--weights``, ``--pretrained-dir`` or
    ``--pretrained``, in eval mode, and the weights it was loaded from (a file or a library's
    pretrained tag; None: none). ``args.resolved`` keeps what the model's library said."""
    given = [f for f, v in (("--weights", args.weights), ("--pretrained-dir", args.pretrained_dir),
                            ("--pretrained", args.pretrained)) if v]
    if len(given) > 1:
        raise UsageError(f"give one of {', '.join(given)}, not several")
    name = args.model
    if given and given[0] != "--weights" and library_of(name) != "ehap":
        raise UsageError(f"{given[0]} needs one of the paper's model names; use --weights with {name}")
    if library_of(name) != "ehap":
        args.resolved = resolve_model(name, num_classes, args.weights)
        if args.resolved.weights is not None:
            log.info("loaded weights %s%s", args.resolved.weights,
                     f" ({args.resolved.head})" if args.resolved.head else "")
        return args.resolved.model, args.resolved.weights
    model = get_model(name, num_classes)
    path = args.weights
    if args.pretrained_dir is not None:
        path = find_pretrained(args.model, args.pretrained_dir, args.dataset)
    elif args.pretrained:
        path = download_pretrained(args.model, args.dataset, progress=not args.quiet)
    if path is not None:
        load_pretrained(model, path)
        log.info("loaded weights %s", path)
    return model.eval(), path


def model_normalization(args) -> Normalization:
    """``--mean``/``--std``; else the model's: its pretrained weights' or library's on image
    folders (ImageNet statistics when it says none), the dataset's for other models on CIFAR
    and digits, the checkpoint source's for the paper's models."""
    if (getattr(args, "mean", None) is None) != (getattr(args, "std", None) is None):
        raise UsageError("give --mean and --std together (three values each, RGB in [0, 1])")
    if getattr(args, "mean", None) is not None:
        try:
            return Normalization(tuple(args.mean), tuple(args.std))
        except ValueError as e:
            raise UsageError(str(e)) from e
    resolved: ResolvedModel | None = getattr(args, "resolved", None)
    pretrained_tag = resolved is not None and resolved.weights is not None and ":" in resolved.weights
    if resolved is not None and resolved.normalization is not None and (
            args.dataset == "imagefolder" or pretrained_tag):
        return resolved.normalization
    if args.dataset == "imagefolder":
        return IMAGENET_NORM
    if library_of(args.model) != "ehap":
        return {"cifar10": CIFAR10_NORM, "cifar100": CIFAR100_NORM, "digits": DIGITS_NORM}[args.dataset]
    return normalization(args.model, args.dataset)


def num_classes(args, data) -> int:
    """``--num-classes``, else the data's (CIFAR's, the digits', an image folder's class folders)."""
    have = data.num_classes if args.dataset == "imagefolder" else NUM_CLASSES[args.dataset]
    if getattr(args, "num_classes", None) is not None:
        if data.num_classes and args.num_classes < have:
            raise UsageError(f"--num-classes={args.num_classes} is fewer than the {have} classes of "
                             f"{data.describe()}")
        return args.num_classes
    if not have:
        raise UsageError(f"{data.describe()}: images without labels have no class count; give "
                         "--num-classes (that of the model's weights)")
    return have


def input_size(args) -> int:
    """An image folder's side: ``--input-size``, else the model library's, else 224."""
    resolved = getattr(args, "resolved", None)
    if args.input_size is not None:
        return args.input_size
    return resolved.input_size if resolved is not None and resolved.input_size else 224


def check_output(model: nn.Module, example: torch.Tensor, classes: int, spec: str) -> None:
    """A model of another class count than the data's cannot be scored: say so before any work."""
    try:
        with torch.no_grad():
            out = model.eval()(example.expand(2, *example.shape[1:]))
    except Exception as e:
        raise ModelError(f"--model {spec!r} fails on a {tuple(example.shape[1:])} input: "
                         f"{type(e).__name__}: {' '.join(str(e).split())[:200]}") from e
    if not torch.is_tensor(out) or out.dim() != 2 or out.shape[1] != classes:
        what = tuple(out.shape) if torch.is_tensor(out) else type(out).__name__
        raise ModelError(f"--model {spec!r} outputs {what}, not (N, {classes}) logits for the data's "
                         f"{classes} classes: give --num-classes, or a factory taking num_classes=")


def load_data(args, *, train: bool = True):
    """(train split or None, test split) as CifarData: the digits, CIFAR from --data, or synthetic."""
    for flag in ("limit_train", "limit_test", "batch_size"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            raise UsageError(f"--{flag.replace('_', '-')}={getattr(args, flag)} must be >= 1")
    kind = source(args)
    if kind in FOLDERS:
        return _load_folder(args, kind, train)
    if kind == "synthetic":
        k = NUM_CLASSES[args.dataset]
        sizes = PRESETS["synthetic"]
        tr = synthetic_cifar(args.limit_train or sizes.train_images, k, args.seed) if train else None
        te = synthetic_cifar(args.limit_test or sizes.test_images, k, args.seed, split="test")
        log.warning("DATA IS SYNTHETIC (random CIFAR-shaped images): figures are not CIFAR "
                    "figures; pass --data DIR for real CIFAR")
        return tr, te
    if kind == "digits":
        tr, te = (load_digits("train") if train else None), load_digits("test")
    else:
        if not args.data.exists() and not args.download:
            raise DataError(f"--data {str(args.data)!r} does not exist: give the folder holding "
                            f"{'cifar-10-batches-py' if args.dataset == 'cifar10' else 'cifar-100-python'}/ "
                            "(or add --download)")
        tr = load_cifar(args.data, args.dataset, "train", download=args.download) if train else None
        te = load_cifar(args.data, args.dataset, "test", download=args.download)
    if tr is not None and args.limit_train:
        tr = tr.head(args.limit_train)
    if args.limit_test:
        te = te.head(args.limit_test)
    return tr, te


def _load_folder(args, kind: str, train: bool):
    """(train or None, test) of an image folder; images alone serve as both (no labels)."""
    size = args.input_size or 224  # the model's default is applied once it is known (resized)
    if kind == "images":
        every = load_image_folder(args.data, size=size)
        return (every.head(args.limit_train) if args.limit_train else every) if train else None, (
            every.head(args.limit_test) if args.limit_test else every)
    tr = load_image_folder(args.data, "train", size=size) if train else None
    te = load_image_folder(args.data, "test", size=size)
    if tr is not None:
        check_classes(tr, te)
        tr = tr.head(args.limit_train) if args.limit_train else tr
    return tr, te.head(args.limit_test) if args.limit_test else te


def loaders(args, train, test, norm, batch: int):
    """(training loader or None, test loader or None: images without labels have no top-1)."""
    if args.dataset != "imagefolder":
        augment = args.dataset != "digits"  # crop + flip are CIFAR's: a flipped digit is another digit
        tr = None if train is None else train.loader(batch, shuffle=True, augment=augment, seed=args.seed,
                                                     normalization=norm)
        return tr, test.loader(256, normalization=norm)
    workers = getattr(args, "workers", None)
    if workers is not None and workers < 0:
        raise UsageError(f"--workers={workers} must be >= 0")
    tr = None if train is None else train.loader(batch, shuffle=train.labelled, augment=train.labelled,
                                                 seed=args.seed, normalization=norm, workers=workers)
    te = test.loader(64, normalization=norm, workers=workers) if test.labelled else None
    return tr, te


def train_digits_model(model: nn.Module, train, norm, args) -> str:
    """Train the embedded default's model on the digits in-process; returns what to report
    as its weights."""
    epochs = _pick(args.train_epochs, PRESETS["digits"].train_epochs)
    try:
        options = FinetuneOptions(epochs=epochs, lr=0.1, weight_decay=5e-4, progress=not args.quiet)
    except ValueError as e:
        raise UsageError(f"--train-epochs: {e}") from e
    log.info("training %s on %s in-process (%g epochs)", args.model, train.describe(), epochs)
    result = finetune(model, train.loader(64, shuffle=True, seed=args.seed, normalization=norm), options)
    model.eval()
    return f"trained in-process on {train.describe()} ({result.steps} steps, seed {args.seed})"


# ---------------------------------------------------------------------------------------------
# Output folder: written to a temporary sibling, renamed at the end
# ---------------------------------------------------------------------------------------------


def check_out(out: Path) -> None:
    """Refuse to replace a non-empty folder that is not an earlier ehap output."""
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / "report.json").exists())):
        raise UsageError(f"--out {str(out)!r} exists and is not an ehap output folder; "
                         "choose another --out")


@contextlib.contextmanager
def staging(out: Path) -> Iterator[Path]:
    """A temporary folder next to ``out``, renamed to ``out`` on success, removed otherwise."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        with _uninterruptible():  # a second Ctrl-C must not stop the cleanup halfway
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    with _uninterruptible():
        if out.exists():
            out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def _uninterruptible() -> Iterator[None]:
    """SIGINT ignored inside (the CLI's main thread), restored after."""
    before = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, before)


# ---------------------------------------------------------------------------------------------
# Commands
# ---------------------------------------------------------------------------------------------


def cmd_compress(args) -> int:
    """``ehap compress``; under ``torchrun`` one rank of the group (gloo: models run on the CPU),
    rank 0 alone announcing and writing ``--out`` (see docs/distributed.md)."""
    with process_group.process_group_from_env(backend="gloo"):
        if not process_group.is_main():
            logging.getLogger("ehap_fx").setLevel(logging.ERROR)  # rank 0 speaks
        return _compress_rank(args, process_group.is_main())


def _compress_rank(args, main: bool) -> int:
    start = time.perf_counter()
    torch.manual_seed(args.seed)
    resolve_defaults(args)
    opts = compress_options(args)
    prof = preset(args)
    out = args.out or Path("runs") / f"compress-{_slug(args.model)}"
    check_out(out)
    train, test = load_data(args)
    model, path = build_model(args, num_classes(args, train))
    if args.dataset == "imagefolder":
        train, test = train.resized(input_size(args)), test.resized(input_size(args))
        if args.hessian_batch is None and len(train) < opts.hessian.batch_size:  # a small folder
            opts = replace(opts, hessian=replace(opts.hessian, batch_size=len(train)))
    norm = model_normalization(args)
    weights = str(path) if path is not None else None  # the checkpoint file, not its folder
    if args.dataset == "digits" and weights is None:
        weights = train_digits_model(model, train, norm, args)
    train_loader, test_loader = loaders(args, train, test, norm, _pick(args.batch_size, prof.batch_size))
    shape = (1, *_image_shape(train))
    example = torch.randn(shape, generator=torch.Generator().manual_seed(args.seed))
    if library_of(args.model) != "ehap":
        check_output(model, example, num_classes(args, train), args.model)
    if main:
        _announce(args, opts, train, test, out)
    with staging(out) if main else _scratch() as tmp:
        opts = replace(opts, export=tmp / "model_int8.onnx" if opts.quantize else None)
        result = compress(model, example, data=train_loader, eval_data=test_loader,
                          data_name=train.describe(), **vars(opts))
        report = _full_report(args, result, train, test, norm, time.perf_counter() - start, weights)
        if report.get("export"):  # name the final folder, not the temporary one
            for key in ("path", "summary"):
                report["export"][key] = str(report["export"][key]).replace(str(tmp), str(out))
        _write_outputs(tmp, args, result, report, model)
    if main:
        _summary(out, report, args)
    return 0


SWEEP_DEFAULTS = {"targets": [0.5, 0.35, 0.25], "scorers": ["removal", "hessian", "l1"], "hessian_batch": 256,
                  "bench_rounds": 10, "granularity": RECIPE.granularity, "finetune_epochs": 0.5}
# the budget is epochs capped by steps: 0.5 epoch of the 1,437 digits at batch 128 was 6 steps, and
# 6 steps left every pruned arm at chance (11-23 %); 5 epochs capped at 60 steps recover (issue 27)
QUICK_SWEEP = {"targets": [0.8, 0.6], "scorers": ["removal", "l1"], "finetune_epochs": 5.0,
               "finetune_steps": 60, "bench_rounds": 3,
               "hessian_batch": 128, "train_epochs": 3,
               # whole blocks: a latency cut every machine's conv timings can reach on a 16x16 model
               "granularity": "both"}


def cmd_sweep(args) -> int:
    if args.quick and (args.data is not None or args.download or args.synthetic):
        raise UsageError("--quick runs on the embedded digits: drop --data/--download/--synthetic")
    for k, v in (QUICK_SWEEP if args.quick else SWEEP_DEFAULTS).items():
        if getattr(args, k, None) is None:  # flags given explicitly win over --quick
            setattr(args, k, v)
    resolve_defaults(args)
    if args.dataset == "imagefolder":
        raise UsageError("ehap sweep runs on CIFAR and the digits; for an image folder use ehap compress "
                         "at each target")
    try:
        options = SweepOptions(
            targets=tuple(args.targets), scorers=tuple(dict.fromkeys(args.scorers)),
            granularity=args.granularity, round_to=args.round_to,
            finetune=FinetuneOptions(epochs=args.finetune_epochs, lr=args.lr, max_steps=args.finetune_steps,
                                     progress=False),
            distill={"on": (True,), "off": (False,), "both": (True, False)}[args.distill],
            distill_options=DistillOptions(teacher=args.teacher),
            quantize=QuantizeOptions(mode=args.quant_mode,
                                     finetune=replace(QAT_FINETUNE, max_steps=args.qat_steps)),
            hessian=HessianOptions(batch_size=args.hessian_batch, seed=args.seed, data_seed=args.seed,
                                   progress=False),
            latency=LatencyOptions(),
            bench=BenchOptions(rounds=args.bench_rounds, threads=args.bench_threads),
            progress=not args.quiet)
    except ValueError as e:
        raise UsageError(str(e)) from e
    torch.manual_seed(args.seed)
    model, path = build_model(args, NUM_CLASSES[args.dataset])
    train, test = load_data(args)
    norm = model_normalization(args)
    if args.dataset == "digits" and path is None:
        train_digits_model(model, train, norm, args)
    augment = args.dataset != "digits"
    loader = train.loader(_pick(args.batch_size, 128), shuffle=True, augment=augment, seed=args.seed,
                          normalization=norm)
    out = args.out or Path("runs") / f"sweep-{_slug(args.model)}"
    example = torch.randn((1, *_image_shape(train)), generator=torch.Generator().manual_seed(args.seed))
    result = sweep(model, example, loader, test.loader(256, normalization=norm), out, options,
                   calibration=train.loader(128, normalization=norm),
                   name=f"{args.model} on {train.describe()}", finished_only=args.finished_only)
    print(f"ehap: front of {len(result.rows)} arms in {out}/ (front.md, front.json, front.png)")
    print((out / "front.md").read_text())
    return 0


@contextlib.contextmanager
def _scratch() -> Iterator[Path]:
    """Where a rank other than 0 writes: a temporary folder, removed at the end."""
    with tempfile.TemporaryDirectory(prefix="ehap-rank-") as folder:
        yield Path(folder)


def _image_shape(data) -> tuple[int, ...]:
    """(3, H, W) of a dataset's images: CIFAR-shaped tensors in memory or an image folder's."""
    return tuple(data.image_shape) if hasattr(data, "image_shape") else tuple(data.images.shape[1:])


def _announce(args, opts, train, test, out) -> None:
    log.info("compress %s: target %s=%s (round_to %d), scorer %s, data %s / %s -> %s",
             args.model, opts.target.kind, opts.target.fraction, opts.target.round_to,
             opts.scorer, train.describe(), test.describe(), out)


def _full_report(args, result, train, test, norm, seconds: float, weights: str | None) -> dict:
    report = result.report.to_dict()
    report["run"] = {
        "command": "ehap " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv else "ehap",
        "model": args.model, "dataset": args.dataset,
        "weights": weights,
        "synthetic": bool(train.synthetic),
        "data_detail": f"train: {train.describe()}; test: {test.describe()}",
        "normalization": {"mean": list(norm.mean), "std": list(norm.std)},
        "seconds": round(seconds, 2),
        "onnx": "model_int8.onnx" if result.onnx_path else None,
        "input_shape": list(_image_shape(train)),
        "num_classes": num_classes(args, train),
        "model_library": library_of(args.model),
        "head": getattr(getattr(args, "resolved", None), "head", None),
    }
    return report


def _write_outputs(folder: Path, args, result, report: dict, dense: nn.Module) -> None:
    saved = report["run"]["pruned_state_dict"] = rep.save_pruned(
        result.pruned, folder, model=args.model, num_classes=report["run"]["num_classes"],
        groups=report["groups"], dense=dense, input_shape=tuple(report["run"]["input_shape"]))
    report["run"]["pruned_checkpoint"] = "pruned_model.pt (torch.save(gm))" + (
        "; pruned_state_dict.pt (weights, widths; ehap_fx.report.load_pruned)" if saved else "")
    if result.onnx_path is not None:
        _tag_onnx(result.onnx_path, report["run"])
    rep.write_json(report, folder / "report.json")
    (folder / "report.md").write_text(rep.render_markdown(report))
    rep.plot_channels(report, folder / "channels.png")
    rep.plot_sensitivity(report, folder / "sensitivity.png")


def _tag_onnx(path: Path, run: dict) -> None:
    """Record model, dataset, normalisation and the synthetic flag in the ONNX metadata."""
    model = onnx.load(str(path))
    for key, value in (("ehap.model", run["model"]), ("ehap.dataset", run["dataset"]),
                       ("ehap.normalization", json.dumps(run["normalization"])),
                       ("ehap.synthetic_data", str(run["synthetic"]))):
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(model, str(path))


def _summary(out: Path, report: dict, args) -> None:
    b, a = report["cost_before"], report["cost_after"]
    acc = ", ".join(f"{k} {v:.2f}%" for k, v in report.get("accuracy", {}).items())
    files = ", ".join(sorted(p.name for p in out.iterdir()))
    lines = [f"ehap: outputs in {out}/ ({files})",
             f"  MACs {b['macs']:,} -> {a['macs']:,} ({a['macs_ratio']:.3f}), params "
             f"{b['params']:,} -> {a['params']:,} ({a['params_ratio']:.3f})",
             f"  top-1: {acc or 'not evaluated'}  [{report['data']}]"]
    if "latency_ratio" in report["target"]:
        lines.insert(2, f"  estimated onnxruntime latency: {report['target']['latency_ratio']:.3f} of dense")
    if report.get("latency_loop"):
        loop = report["latency_loop"]
        lines.insert(3, "  measured INT8 latency / dense INT8: " + ", ".join(
            f"batch {b}: {r:.3f} ±{100 * loop['noise'][b]:.1f}%" for b, r in loop["measured_ratio"].items())
            + f" (asked {loop['target']:g}; {loop['status']}, {len(loop['rounds'])} round(s))")
        if loop["status"] != "met":
            lines.insert(4, f"  WARNING: latency loop: {loop['message']}")
    if report.get("export"):
        e, q = report["export"], report["quantize"]
        lines.append(f"  INT8 ({q['scheme']['target']}, {q['scheme']['weight_bits']}-bit weights): "
                     f"{100 * e['quantized_conv_fraction']:.0f}% of convs QLinearConv, onnxruntime on "
                     f"{e['isa']} agrees with PyTorch INT8 on {100 * e['argmax_agreement']:.2f}% of argmaxes")
    if report.get("latency"):
        lat = report["latency"]
        lines.append("  onnxruntime on this CPU, dense fp32 -> INT8: " + ", ".join(
            f"batch {b}: {lat['ms']['dense_fp32'][b]:.2f} -> {lat['ms']['int8'][b]:.2f} ms "
            f"({lat['speedup'][b]:.2f}x)" for b in lat["speedup"]))
    if all_scores_zero(report):
        lines.append(f"  WARNING: {ZERO_SCORES}")
    if report["run"]["dataset"] == "digits":
        lines += ["  NOTE: the embedded default (scikit-learn's real 8x8 handwritten digits, a model trained",
                  "  here). The real job, CIFAR-10 and its pretrained ResNet-56 (downloaded once), to half",
                  "  the INT8 latency (the paper's setting: --target-macs 0.5):",
                  "    ehap compress --model resnet56 --download --pretrained --target-latency 0.5",
                  "  offline: --data DIR (holding cifar-10-batches-py/) --pretrained-dir DIR"]
    if report["run"]["synthetic"]:
        lines += ["  NOTE: this ran on SYNTHETIC data (random images): the numbers above mean nothing.",
                  "  To run on real CIFAR-10 (folder holding cifar-10-batches-py/; --download fetches it):",
                  f"    ehap compress --model {args.model} --data PATH/TO/CIFAR --pretrained-dir "
                  "PATH/TO/WEIGHTS --target-macs 0.5 --out runs/real"]
    print("\n".join(lines))


def _slug(name: str) -> str:
    return name.replace(":", "-").replace("/", "-")


def cmd_train(args) -> int:
    torch.manual_seed(args.seed)
    resolve_defaults(args)
    try:
        options = FinetuneOptions(epochs=args.epochs, lr=args.lr, weight_decay=args.weight_decay,
                                  label_smoothing=args.label_smoothing, max_steps=args.steps,
                                  progress=not args.quiet)
    except ValueError as e:
        raise UsageError(str(e)) from e
    out = args.out or Path("runs") / f"{_slug(args.model)}-{args.dataset}.pt"
    train, test = load_data(args)
    model, _ = build_model(args, num_classes(args, train))
    if args.dataset == "imagefolder":
        train, test = train.resized(input_size(args)), test.resized(input_size(args))
    norm = model_normalization(args)
    loader, test_loader = loaders(args, train, test, norm, args.batch_size or 128)
    if test_loader is None:
        raise UsageError(f"ehap train learns from labels: {train.describe()} has none")
    result = finetune(model, loader, options, eval_loader=test_loader)
    top1 = evaluate(model, test_loader)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + f".partial-{os.getpid()}")
    try:
        torch.save({"state_dict": model.state_dict(), "arch": args.model, "dataset": args.dataset,
                    "top1": top1, "steps": result.steps, "synthetic": bool(train.synthetic)}, tmp)
        tmp.replace(out)
    finally:
        tmp.unlink(missing_ok=True)
    print(f"ehap: saved {out} ({result.steps} steps, top-1 {top1:.2f}% on {test.describe()}); "
          f"use it with: ehap compress --model {args.model} --weights {out}")
    return 0


def cmd_eval(args) -> int:
    path = args.path
    if not path.is_file():
        raise UsageError(f"{str(path)!r} does not exist or is not a file")
    resolve_defaults(args)
    _, test = load_data(args, train=False)
    if args.dataset == "imagefolder":
        if not test.labelled:
            raise UsageError(f"top-1 needs labels: {test.describe()} has none")
        dims = session(path).get_inputs()[0].shape[2:] if path.suffix == ".onnx" else []
        side = dims[-1] if dims and isinstance(dims[-1], int) and args.input_size is None else None
        test = test.resized(side or input_size(args))
    if path.suffix == ".onnx":
        norm = _onnx_normalization(path) or model_normalization(args)
        top1 = onnx_top1(path, test.loader(args.batch_size or 256, normalization=norm))
    else:
        model, arch = _load_checkpoint(path, args, num_classes(args, test))
        if arch is not None:  # the checkpoint names its architecture: use its normalisation
            args.model = arch
        norm = model_normalization(args)
        top1 = evaluate(model, test.loader(args.batch_size or 256, normalization=norm))
    print(f"ehap: top-1 {top1:.2f}% of {path} on {test.describe()}")
    return 0


def _load_checkpoint(path: Path, args, num_classes: int) -> tuple[nn.Module, str | None]:
    """(model in eval mode, architecture name recorded in the file or None)."""
    obj = None
    with contextlib.suppress(Exception):  # a whole pickled GraphModule is not weights-only
        obj = torch.load(path, weights_only=True, map_location="cpu")
    arch = obj.get("arch") if isinstance(obj, dict) and isinstance(obj.get("arch"), str) else None
    if obj is None or (isinstance(obj, dict) and "plans" in obj):
        return load_pruned(path), arch
    name = arch or args.model
    if library_of(name) != "ehap":
        return resolve_model(name, num_classes, path).model, arch
    return load_pretrained(get_model(name, num_classes), path).eval(), arch


def _onnx_normalization(path: Path):
    meta = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
    if "ehap.normalization" not in meta:
        return None
    norm = json.loads(meta["ehap.normalization"])
    return Normalization(tuple(norm["mean"]), tuple(norm["std"]))


def cmd_bench(args) -> int:
    if not args.path.is_file():
        raise UsageError(f"{str(args.path)!r} does not exist or is not a file")
    if args.runs < 1 or args.warmup < 0 or min(args.batch) < 1:
        raise UsageError(f"--runs={args.runs} must be >= 1, --warmup={args.warmup} >= 0, "
                         f"--batch={args.batch} >= 1")
    sess = session(args.path, threads=args.threads)
    name = sess.get_inputs()[0].name
    dims = sess.get_inputs()[0].shape[1:]  # the exported image shape; the batch axis is dynamic
    image = tuple(dims) if all(isinstance(d, int) for d in dims) else (3, 32, 32)
    print(f"{args.path} (onnxruntime CPU, threads={args.threads or 'default'}, "
          f"median of {args.runs} runs)")
    print(f"{'batch':>6} {'ms/batch':>10} {'ms/image':>10} {'images/s':>10}")
    for b in args.batch:
        x = np.random.default_rng(0).standard_normal((b, *image), dtype=np.float32)
        for _ in range(args.warmup):
            sess.run(None, {name: x})
        times = []
        for _ in range(args.runs):
            t = time.perf_counter()
            sess.run(None, {name: x})
            times.append(time.perf_counter() - t)
        ms = 1000 * float(np.median(times))
        print(f"{b:>6} {ms:>10.3f} {ms / b:>10.4f} {1000 * b / ms:>10.1f}")
    return 0


# ---------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    """Run ``ehap``; returns the exit status (0 ok, 1 user error, 2 usage, 130 Ctrl-C)."""
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv or ["compress"])
    if args.command is None:
        parser.print_help()
        return 2
    # our own info messages only: libraries' (matplotlib's "generated new fontManager", the ONNX
    # optimizer's "Replaced initializer ...") stay at their warnings
    logging.basicConfig(format="ehap: %(message)s", stream=sys.stderr, level=logging.WARNING)
    log.setLevel(logging.WARNING if args.quiet else logging.INFO)
    try:
        return args.func(args)
    except KeyboardInterrupt:  # staging() has removed the partial outputs (SIGINT ignored meanwhile)
        print("ehap: interrupted; no partial outputs were left behind", file=sys.stderr)
        return 130
    except EhapError as e:
        print(f"ehap: error: {_one_line(e)}", file=sys.stderr)
        return 1


def _one_line(error: EhapError) -> str:
    """The error's message on one line; one re-raised from a DataLoader worker (which carries
    the worker's traceback) by its last line, the original message."""
    text = str(error)
    if "Original Traceback" in text:
        text = text.strip().splitlines()[-1].partition(": ")[2] or text
    return " ".join(text.split())
