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

import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ehap_fx.data import CIFAR10_NORM, CIFAR100_NORM, DIGITS_NORM, IMAGENET_NORM, Normalization
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
    "CHECKPOINTS",
    "download_pretrained",
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
NUM_CLASSES = {"cifar10": 10, "cifar100": 100, "digits": 10}
DIGITS_MODEL = "resnet8"
"""The model of the embedded default (scikit-learn digits, 16x16): trained in-process in seconds."""


@dataclass(frozen=True)
class Checkpoint:
    """A public checkpoint of one of the paper's models: where it is and its sha256."""

    url: str
    sha256: str

    @property
    def file(self) -> str:
        return self.url.rsplit("/", 1)[1]


_AKAMASTER = "https://github.com/akamaster/pytorch_resnet_cifar10/raw/master/pretrained_models"
_CHENYAOFO = "https://github.com/chenyaofo/pytorch-cifar-models/releases/download/resnet"
_AKAMASTER_SHA256 = {  # CIFAR-10, option A; the file name carries the first 8 hex digits
    20: "12fca82f0bebc4135bf1f32f6e3710e61d5108578464b84fd6d7f5c1b04036c8",
    32: "d509ac1820d7f25398913559d7e81a13229b1e7adc5648e3bfa5e22dc137f850",
    44: "014dd6541728a1c700b1642ab640e211dc6eb8ed507d70697458dc8f8a0ae2e4",
    56: "4bfd97631478d6b638d2764fd2baff3edb1d7d82252d54439343b6596b9b5367",
}
CHECKPOINTS: dict[tuple[str, str], Checkpoint] = {
    **{(f"resnet{d}", "cifar10"): Checkpoint(f"{_AKAMASTER}/resnet{d}-{h[:8]}.th", h)
       for d, h in _AKAMASTER_SHA256.items()},
    ("resnet56-b", "cifar100"): Checkpoint(
        f"{_CHENYAOFO}/cifar100_resnet56-f2eff4c8.pt",
        "f2eff4c8461ca1e0d39af83a65f7243bf7d29ec421efee3064bcee93a3caaa73"),
}
"""The paper's public checkpoints (akamaster: BSD-2-Clause; chenyaofo: BSD-3-Clause), by
(model, dataset). ``EHAP_PRETRAINED_URL`` replaces the part before the file name (a mirror)."""

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
    if dataset == "digits":
        return DIGITS_NORM
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


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def download_pretrained(name: str, dataset: str = "cifar10", *, progress: bool = True) -> Path:
    """The public checkpoint of ``name`` on ``dataset`` in torch.hub's cache
    (``torch.hub.get_dir()/checkpoints``), downloaded there first if missing.

    The file's full sha256 is checked after the download and again on every later use; a
    failed download or a wrong hash raises :class:`WeightsError` naming the URL (or file)
    and ``--pretrained-dir``, and leaves no file behind.
    """
    _check_dataset(dataset)
    key = (name.strip().lower(), dataset)
    if key not in CHECKPOINTS:
        known = ", ".join(f"{m} ({d})" for m, d in CHECKPOINTS)
        raise WeightsError(f"no public checkpoint of {name!r} on {dataset}; known: {known}")
    ck = CHECKPOINTS[key]
    url = ck.url
    if mirror := os.environ.get("EHAP_PRETRAINED_URL"):
        url = f"{mirror.rstrip('/')}/{ck.file}"
    path = Path(torch.hub.get_dir()) / "checkpoints" / ck.file
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        try:  # writes a temporary file next to path, moved into place once the hash matches
            torch.hub.download_url_to_file(url, str(path), hash_prefix=ck.sha256, progress=progress)
        except Exception as e:  # URLError, HTTPError, OSError, the hash RuntimeError
            path.unlink(missing_ok=True)
            why = "wrong sha256" if "invalid hash" in str(e) else f"{type(e).__name__}: {e}"
            raise WeightsError(
                f"downloading {url} failed ({why}); without network, pass --pretrained-dir DIR "
                f"holding {ck.file} (Python: pretrained_model(name, DIR))"
            ) from e
    elif (digest := _sha256(path)) != ck.sha256:
        raise WeightsError(
            f"{path} has sha256 {digest[:12]}..., expected {ck.sha256[:12]}...: delete it to "
            "download again, or pass --pretrained-dir DIR with the right file"
        )
    return path


def pretrained_model(
    name: str, weights_dir: str | Path | None = None, dataset: str = "cifar10", *, progress: bool = True
) -> nn.Module:
    """``name`` with its pretrained weights on ``dataset``, in eval mode: from the torch.hub-named
    file in ``weights_dir``, or without it from torch.hub's cache (:func:`download_pretrained`).
    """
    _check_dataset(dataset)
    model = get_model(name, NUM_CLASSES[dataset])
    if weights_dir is None:
        path = download_pretrained(name, dataset, progress=progress)
    else:
        path = find_pretrained(name, weights_dir, dataset)
    return load_pretrained(model, path).eval()
