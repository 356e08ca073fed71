"""What ``ehap`` runs on: ``--model`` (with its weights and normalisation) and ``--data``."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from ehap_fx.cli.flags import FOLDERS, PRESETS, UsageError, _pick, source
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
from ehap_fx.errors import DataError, ModelError
from ehap_fx.imagefolder import check_classes, load_image_folder
from ehap_fx.models import (
    NUM_CLASSES,
    download_pretrained,
    find_pretrained,
    get_model,
    load_pretrained,
    normalization,
)
from ehap_fx.models.resolve import ResolvedModel, library_of, resolve_model
from ehap_fx.train import FinetuneOptions, finetune

log = logging.getLogger("ehap_fx")


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
