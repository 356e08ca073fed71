"""Pretrained-compatible CIFAR models of the EHAP paper, by name.

Names: ``resnet{20,32,44,56,110}`` (option-A shortcuts, the akamaster checkpoints),
``resnet56-b`` etc. (option-B 1x1-conv shortcuts, the chenyaofo checkpoints) and
``wrn-28-8`` (any ``wrn-{6n+4}-{k}``). Every model's classifier head is called ``fc``.

>>> model = get_model("resnet20")
>>> type(model).__name__, model.depth, model.shortcut
('CifarResNet', 20, 'A')
>>> normalization("resnet56-b", "cifar100").mean
(0.507, 0.4865, 0.4409)
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from ehap_fx.data import CIFAR10_NORM, CIFAR100_NORM, IMAGENET_NORM, Normalization
from ehap_fx.errors import ModelError, WeightsError
from ehap_fx.models.resnet_cifar import (
    DEPTHS,
    CifarResNet,
    load_pretrained,
    read_state_dict,
    resnet_cifar,
)
from ehap_fx.models.wideresnet import WideResNet, wide_resnet

__all__ = [
    "MODEL_NAMES",
    "NUM_CLASSES",
    "CifarResNet",
    "WideResNet",
    "find_pretrained",
    "get_model",
    "load_pretrained",
    "normalization",
    "pretrained_model",
    "pretrained_pattern",
    "read_state_dict",
    "resnet_cifar",
    "wide_resnet",
]

MODEL_NAMES: tuple[str, ...] = (
    *(f"resnet{d}" for d in DEPTHS),
    *(f"resnet{d}-b" for d in DEPTHS),
    "wrn-16-4",
    "wrn-16-8",
    "wrn-28-8",
    "wrn-28-10",
)
NUM_CLASSES = {"cifar10": 10, "cifar100": 100}

_RESNET = re.compile(r"resnet(\d+)(?:-([ab]))?")
_WRN = re.compile(r"wrn-(\d+)-(\d+)")


@dataclass(frozen=True)
class _Spec:
    family: str  # "resnet" or "wrn"
    depth: int
    shortcut: str = ""  # "A" or "B" for ResNets
    widen: int = 0  # k for WideResNets


def _parse(name: str) -> _Spec:
    key = name.strip().lower()
    if m := _RESNET.fullmatch(key):
        return _Spec("resnet", int(m[1]), shortcut=(m[2] or "a").upper())
    if m := _WRN.fullmatch(key):
        return _Spec("wrn", int(m[1]), widen=int(m[2]))
    raise ModelError(f"unknown model name={name!r}; known: {', '.join(MODEL_NAMES)}")


def get_model(name: str, num_classes: int = 10, *, dropout: float = 0.0) -> nn.Module:
    """A freshly initialised model by name (see :data:`MODEL_NAMES`; other valid depths parse).

    ``dropout`` applies to WideResNets only.
    """
    spec = _parse(name)
    try:
        if spec.family == "resnet":
            return resnet_cifar(spec.depth, num_classes, spec.shortcut)
        return wide_resnet(spec.depth, spec.widen, num_classes, dropout)
    except ModelError as e:
        raise ModelError(f"model {name!r}: {e}; known: {', '.join(MODEL_NAMES)}") from e


def _check_dataset(dataset: str) -> None:
    if dataset not in NUM_CLASSES:
        raise ModelError(f"unknown dataset={dataset!r}; known: {', '.join(NUM_CLASSES)}")


def normalization(name: str, dataset: str = "cifar10") -> Normalization:
    """The input normalisation that goes with model ``name``'s pretrained weights.

    Option-A ResNets on CIFAR-10 (akamaster) used ImageNet statistics; everything else
    uses the dataset's own (for CIFAR-100 these are also chenyaofo's).
    """
    spec = _parse(name)
    _check_dataset(dataset)
    if dataset == "cifar10" and spec.family == "resnet" and spec.shortcut == "A":
        return IMAGENET_NORM
    return CIFAR10_NORM if dataset == "cifar10" else CIFAR100_NORM


def pretrained_pattern(name: str, dataset: str = "cifar10") -> str:
    """The torch.hub-style file-name glob of ``name``'s checkpoint on ``dataset``.

    ``resnet56-*.th`` (akamaster, CIFAR-10, option A), ``cifar100_resnet56-*.pt``
    (chenyaofo, option B).
    """
    spec = _parse(name)
    _check_dataset(dataset)
    if spec.family == "resnet" and spec.shortcut == "A" and dataset == "cifar10":
        return f"resnet{spec.depth}-*.th"
    if spec.family == "resnet" and spec.shortcut == "B":
        return f"{dataset}_resnet{spec.depth}-*.pt"
    raise WeightsError(
        f"no known pretrained source for {name!r} on {dataset}: option-A ResNets have "
        "CIFAR-10 weights (akamaster), option-B ResNets ('-b') CIFAR-10/100 weights (chenyaofo)"
    )


def find_pretrained(name: str, weights_dir: str | Path, dataset: str = "cifar10") -> Path:
    """The checkpoint of ``name`` on ``dataset`` in ``weights_dir``, by torch.hub file name.

    Raises :class:`WeightsError` naming the pattern and folder when there is none (or
    more than one).
    """
    pattern = pretrained_pattern(name, dataset)
    folder = Path(weights_dir).expanduser()
    found = sorted(folder.glob(pattern)) if folder.is_dir() else []
    if len(found) != 1:
        names = ", ".join(p.name for p in found)
        what = f"{len(found)} files ({names})" if found else "no file"
        raise WeightsError(
            f"{what} matching {pattern!r} in {str(folder)!r} for {name} on {dataset}; "
            "pass the checkpoint path explicitly"
        )
    return found[0]


def pretrained_model(name: str, weights_dir: str | Path, dataset: str = "cifar10") -> nn.Module:
    """``get_model`` + ``find_pretrained`` + ``load_pretrained`` in one call (eval mode)."""
    _check_dataset(dataset)
    model = get_model(name, NUM_CLASSES[dataset])
    return load_pretrained(model, find_pretrained(name, weights_dir, dataset)).eval()
