"""The ``ehap`` command line: ``compress``, ``train``, ``eval``, ``bench``.

Flags are turned into the option dataclasses once (:func:`compress_options`); everything
else calls the library. User errors (every :class:`~ehap_fx.errors.EhapError`, and bad flag
values rejected by the options' validation) print one line on stderr and exit 1; Ctrl-C
exits 130. ``ehap compress`` writes into a hidden ``.OUT.partial`` folder next to ``--out`` and
renames it at the end, so ``--out`` is never half-written; an interrupted run keeps its saved
steps there for ``--resume`` (``cli.outputs.staging``).

With no arguments, ``ehap compress`` runs the embedded default: real images that an installed
package ships (scikit-learn's handwritten digits, 16x16), a ResNet-8 trained on them in-process,
then the whole job (prune, fine-tune, INT8, ONNX checked in onnxruntime) in about a minute on
two CPU cores, with real accuracies at every stage. ``--data DIR`` (or ``--download``) runs on
CIFAR; ``--synthetic`` on random CIFAR-shaped images, labelled as synthetic in every output.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from ehap_fx import process_group
from ehap_fx.checkpoint import Checkpoints
from ehap_fx.cli.flags import (
    PRESETS,
    UsageError,
    _pick,
    build_parser,
    compress_options,
    preset,
    resolve_defaults,
    source,
)
from ehap_fx.cli.inputs import (
    build_model,
    check_output,
    input_size,
    load_data,
    loaders,
    model_normalization,
    num_classes,
    train_digits_model,
)
from ehap_fx.cli.outputs import (
    CHECKPOINTS,
    _announce,
    _full_report,
    _image_shape,
    _scratch,
    _slug,
    _summary,
    _write_outputs,
    check_out,
    staging,
)
from ehap_fx.compress import RECIPE, compress
from ehap_fx.data import (
    Normalization,
)
from ehap_fx.errors import EhapError, reraise_interrupt
from ehap_fx.latency import BenchOptions, LatencyOptions
from ehap_fx.models import (
    NUM_CLASSES,
    get_model,
    load_pretrained,
)
from ehap_fx.models.resolve import library_of, resolve_model
from ehap_fx.passes.export import onnx_top1, session
from ehap_fx.passes.quantize import QAT_FINETUNE, QuantizeOptions
from ehap_fx.report import load_pruned
from ehap_fx.scoring.options import HessianOptions
from ehap_fx.sweep import SweepOptions, sweep
from ehap_fx.train import DistillOptions, FinetuneOptions, evaluate, finetune

__all__ = ["COMMANDS", "NUM_CLASSES", "PRESETS", "UsageError", "build_model", "build_parser",
           "compress_options", "load_data", "main", "model_normalization", "resolve_defaults", "source",
           "staging"]

log = logging.getLogger("ehap_fx")


# ---------------------------------------------------------------------------------------------
# Commands
# ---------------------------------------------------------------------------------------------


def cmd_compress(args) -> int:
    """``ehap compress``; under ``torchrun`` one rank of the group (gloo: models run on the CPU),
    rank 0 alone announcing and writing ``--out`` (see docs/distributed.md)."""
    with process_group.process_group_from_env(backend="gloo"), _sigterm_interrupts():
        if not process_group.is_main():
            logging.getLogger("ehap_fx").setLevel(logging.ERROR)  # rank 0 speaks
        return _compress_rank(args, process_group.is_main())


def _compress_rank(args, main: bool) -> int:
    start = time.perf_counter()
    torch.manual_seed(args.seed)
    resolve_defaults(args)
    opts = compress_options(args)
    if args.checkpoint_every is not None and args.checkpoint_every < 1:
        raise UsageError(f"--checkpoint-every={args.checkpoint_every} must be >= 1 optimizer steps")
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
    with staging(out, resume=args.resume) if main else _scratch() as tmp:
        checkpoints = Checkpoints(tmp / CHECKPOINTS, every=args.checkpoint_every)
        checkpoints.check("command", _command_identity(args))
        opts = replace(opts, export=tmp / "model_int8.onnx" if opts.quantize else None,
                       checkpoints=checkpoints)
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


# flags that change neither what a run computes nor its outputs: a resumed run may differ in them
_RESUME_FREE = {"out", "resume", "checkpoint_every", "quiet", "workers", "bench_threads"}


def _command_identity(args) -> dict:
    """The flags of a run (after the data source's defaults), as its checkpoints record them."""
    return {f"--{k.replace('_', '-')}": str(v) if isinstance(v, Path) else v
            for k, v in sorted(vars(args).items()) if k not in _RESUME_FREE and k != "resolved"}


@contextlib.contextmanager
def _sigterm_interrupts():
    """SIGTERM (a scheduler's stop) handled as Ctrl-C, so that the run keeps its saved steps."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    before = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, before)


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


COMMANDS = {"compress": cmd_compress, "train": cmd_train, "eval": cmd_eval, "bench": cmd_bench,
            "sweep": cmd_sweep}


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
        return COMMANDS[args.command](args)
    except KeyboardInterrupt:  # staging() has kept the saved steps or removed the partial outputs
        print("ehap: interrupted", file=sys.stderr)
        return 130
    except EhapError as e:
        try:
            reraise_interrupt(e)  # a Ctrl-C that a library wrapped before one of our wrappers saw it
        except KeyboardInterrupt:
            print("ehap: interrupted", file=sys.stderr)
            return 130
        print(f"ehap: error: {_one_line(e)}", file=sys.stderr)
        return 1


def _one_line(error: EhapError) -> str:
    """The error's message on one line; one re-raised from a DataLoader worker (which carries
    the worker's traceback) by its last line, the original message."""
    text = str(error)
    if "Original Traceback" in text:
        text = text.strip().splitlines()[-1].partition(": ")[2] or text
    return " ".join(text.split())
