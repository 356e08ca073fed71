"""CIFAR ResNets of He et al. 2016, §4.2, in both shortcut variants.

Depth 6n+2: a 3x3 stem conv (3->16), three stages of n BasicBlocks (widths 16/32/64, stride 2
at the first block of stages 2 and 3), global average pooling and a linear head named ``fc``.

* Option A (``shortcut="A"``): a parameter-free shortcut; where the shape changes it
  subsamples by 2 and zero-pads the channels (:class:`PadShortcut`). These are the models of
  akamaster/pytorch_resnet_cifar10, whose checkpoints load with :func:`load_pretrained`.
* Option B (``shortcut="B"``): a 1x1 conv (stride 2) + BN projection named ``downsample``,
  as in chenyaofo/pytorch-cifar-models.

Everything traces with ``torch.fx.symbolic_trace``: the option-A shortcut becomes a
``getitem`` (strided slice) and an ``F.pad`` node, which the channel-group pass maps exactly.

>>> model = resnet_cifar(20)
>>> sum(p.numel() for p in model.parameters())
269722
>>> model(torch.zeros(2, 3, 32, 32)).shape
torch.Size([2, 10])
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ehap_fx.errors import ModelError, WeightsError

DEPTHS = (20, 32, 44, 56, 110)
WIDTHS = (16, 32, 64)


class PadShortcut(nn.Module):
    """Option-A shortcut: ``x[:, :, ::2, ::2]`` then zero channel padding of ``pad`` each side.

    (N, C, H, W) -> (N, C + 2*pad, H/2, W/2). Written as a plain forward (not a lambda) so
    that FX traces it into ``getitem`` + ``F.pad`` nodes.
    """

    def __init__(self, pad: int) -> None:
        super().__init__()
        self.pad = pad

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, ::2, ::2]  # (N, C, H/2, W/2)
        return F.pad(x, (0, 0, 0, 0, self.pad, self.pad))  # (N, C + 2*pad, H/2, W/2)

    def extra_repr(self) -> str:
        return f"pad={self.pad}"


class BasicBlock(nn.Module):
    """conv3x3 -> BN -> ReLU -> conv3x3 -> BN, + shortcut, -> ReLU."""

    def __init__(self, in_planes: int, planes: int, stride: int, shortcut: str) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_planes != planes:
            self.downsample = _make_shortcut(in_planes, planes, stride, shortcut)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        identity = x if self.downsample is None else self.downsample(x)
        return F.relu(out + identity)


def _make_shortcut(in_planes: int, planes: int, stride: int, shortcut: str) -> nn.Module:
    if shortcut == "A":
        if stride != 2 or planes != 2 * in_planes:
            raise ModelError(
                f"option-A shortcut needs stride 2 and doubled width, got {stride=}, "
                f"{in_planes=}, {planes=}; use shortcut='B'"
            )
        return PadShortcut(planes // 4)
    return nn.Sequential(
        nn.Conv2d(in_planes, planes, 1, stride, bias=False),
        nn.BatchNorm2d(planes),
    )


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for 32x32 inputs; ``fc`` is the classifier head."""

    def __init__(self, depth: int = 56, num_classes: int = 10, shortcut: str = "A") -> None:
        super().__init__()
        if depth < 8 or (depth - 2) % 6:
            raise ModelError(f"CIFAR ResNet depth={depth} must be 6n+2 (20, 32, 44, 56, 110)")
        if shortcut not in ("A", "B"):
            raise ModelError(f"shortcut={shortcut!r} must be 'A' (pad) or 'B' (1x1 conv)")
        if num_classes < 1:
            raise ModelError(f"num_classes={num_classes} must be >= 1")
        self.depth, self.shortcut = depth, shortcut
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(3, WIDTHS[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(WIDTHS[0])
        in_planes = WIDTHS[0]
        for i, planes in enumerate(WIDTHS):
            blocks = []
            for j in range(n):
                stride = 2 if (i > 0 and j == 0) else 1
                blocks.append(BasicBlock(in_planes, planes, stride, shortcut))
                in_planes = planes
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))
        self.fc = nn.Linear(WIDTHS[-1], num_classes)
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))  # (N, 16, 32, 32)
        x = self.layer3(self.layer2(self.layer1(x)))  # (N, 64, 8, 8)
        x = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)  # (N, 64)
        return self.fc(x)


def _init_weights(model: nn.Module) -> None:
    """Kaiming-normal (fan-out) convs, BN at (1, 0), PyTorch's default linear head (torchvision)."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def resnet_cifar(depth: int = 56, num_classes: int = 10, shortcut: str = "A") -> CifarResNet:
    """A CIFAR ResNet of ``depth`` (6n+2) with option-A or option-B shortcuts."""
    return CifarResNet(depth, num_classes, shortcut)


# Head names used by the known checkpoint sources, mapped to ours (``fc``).
_HEAD_ALIASES = {"linear.": "fc."}
_PREFIXES = ("module.", "_orig_mod.")


def read_state_dict(path: str | Path) -> OrderedDict[str, torch.Tensor]:
    """The state dict in a checkpoint file, with ``module.`` prefixes stripped and heads renamed.

    Accepts a plain state dict or a dict holding one under ``state_dict``/``model``.
    Loaded with ``weights_only=True`` on the CPU (no code in the file is run).
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"checkpoint {str(path)!r} does not exist or is not a file")
    try:
        obj = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as e:  # unpickling / zip errors all mean "not a usable checkpoint"
        raise WeightsError(
            f"cannot read checkpoint {str(path)!r} with torch.load(weights_only=True): {e}"
        ) from e
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError(f"checkpoint {str(path)!r} holds no state dict of tensors")
    return OrderedDict((_canonical_key(k), v) for k, v in obj.items())


def _canonical_key(key: str) -> str:
    for prefix in _PREFIXES:
        while key.startswith(prefix):
            key = key[len(prefix):]
    for old, new in _HEAD_ALIASES.items():
        if key.startswith(old):
            key = new + key[len(old):]
    return key


def load_pretrained(model: nn.Module, path: str | Path) -> nn.Module:
    """Load checkpoint ``path`` into ``model`` strictly; returns ``model``.

    Raises :class:`~ehap_fx.errors.WeightsError` naming the missing, unexpected and
    wrongly-shaped keys when the checkpoint does not fit the architecture.
    """
    state = read_state_dict(path)
    own = model.state_dict()
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own]
    shapes = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in state and state[k].shape != own[k].shape
    ]
    if missing or unexpected or shapes:
        raise WeightsError(_mismatch_message(path, model, missing, unexpected, shapes))
    model.load_state_dict(state, strict=True)
    return model


def _mismatch_message(path, model, missing, unexpected, shapes) -> str:
    def few(items: list[str]) -> str:
        return ", ".join(items[:6]) + (f" ... ({len(items)} in all)" if len(items) > 6 else "")

    parts = [f"checkpoint {str(Path(path).name)!r} does not fit {type(model).__name__}"]
    if missing:
        parts.append(f"missing keys: {few(missing)}")
    if unexpected:
        parts.append(f"unexpected keys: {few(unexpected)}")
    if shapes:
        parts.append(f"shape mismatches: {few(shapes)}")
    parts.append(
        "check the model name (depth, shortcut option A/B) and num_classes match the checkpoint"
    )
    return "; ".join(parts)
