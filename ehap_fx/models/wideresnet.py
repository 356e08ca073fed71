"""Wide ResNets of Zagoruyko & Komodakis (2016) for 32x32 inputs.

WRN-d-k: a 3x3 stem conv (3->16), three groups of n = (d-4)/6 pre-activation blocks of widths
16k/32k/64k (stride 2 at the first block of groups 2 and 3), then BN -> ReLU -> global average
pooling -> ``fc``. Each block is BN -> ReLU -> conv3x3 -> BN -> ReLU -> [dropout] -> conv3x3,
added to the input; where the shape changes the shortcut is a 1x1 conv applied to the
pre-activated input (as in the authors' code). Traces with ``torch.fx.symbolic_trace``.

>>> model = wide_resnet(16, 4)
>>> sum(p.numel() for p in model.parameters())
2748890
>>> model(torch.zeros(2, 3, 32, 32)).shape
torch.Size([2, 10])
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ehap_fx.errors import ModelError
from ehap_fx.models.resnet_cifar import _init_weights


class WideBasic(nn.Module):
    """Pre-activation block with an optional 1x1 projection shortcut ``shortcut``."""

    def __init__(self, in_planes: int, planes: int, stride: int, dropout: float) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else None
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.shortcut: nn.Conv2d | None = None
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Conv2d(in_planes, planes, 1, stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        o1 = F.relu(self.bn1(x))
        y = F.relu(self.bn2(self.conv1(o1)))
        if self.dropout is not None:
            y = self.dropout(y)
        y = self.conv2(y)
        identity = x if self.shortcut is None else self.shortcut(o1)
        return y + identity


class WideResNet(nn.Module):
    """WRN-depth-widen; ``fc`` is the classifier head."""

    def __init__(
        self, depth: int = 28, widen: int = 8, num_classes: int = 10, dropout: float = 0.0
    ) -> None:
        super().__init__()
        if depth < 10 or (depth - 4) % 6:
            raise ModelError(f"WideResNet depth={depth} must be 6n+4 (10, 16, 22, 28, 40)")
        if widen < 1:
            raise ModelError(f"WideResNet widen={widen} must be >= 1")
        if not 0.0 <= dropout < 1.0:
            raise ModelError(f"WideResNet dropout={dropout} must be in [0, 1)")
        if num_classes < 1:
            raise ModelError(f"num_classes={num_classes} must be >= 1")
        self.depth, self.widen = depth, widen
        n = (depth - 4) // 6
        widths = (16 * widen, 32 * widen, 64 * widen)
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        in_planes = 16
        for i, planes in enumerate(widths):
            blocks = []
            for j in range(n):
                stride = 2 if (i > 0 and j == 0) else 1
                blocks.append(WideBasic(in_planes, planes, stride, dropout))
                in_planes = planes
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))
        self.bn = nn.BatchNorm2d(in_planes)
        self.fc = nn.Linear(in_planes, num_classes)
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)  # (N, 16, 32, 32)
        x = self.layer3(self.layer2(self.layer1(x)))  # (N, 64k, 8, 8)
        x = F.relu(self.bn(x))
        x = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)  # (N, 64k)
        return self.fc(x)


def wide_resnet(
    depth: int = 28, widen: int = 8, num_classes: int = 10, dropout: float = 0.0
) -> WideResNet:
    """WRN-``depth``-``widen`` (default WRN-28-8, the EHAP paper's wide model)."""
    return WideResNet(depth, widen, num_classes, dropout)
