"""The structures of Torch-Pruning 1.6.1's own test models (its ``tests/``), written afresh:
concat, cascaded concat, concat-split, cat over a non-feature dim, split into shared and
unshared blocks, reshape into a transposed-conv decoder, a single-channel output, and several
inputs and outputs. Each builder returns ``(model, example_input)``; sizes are small."""

import torch
import torch.nn.functional as F
from torch import nn


def _cbg(cin: int, cout: int, act: bool = True) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 1), nn.BatchNorm2d(cout), *([nn.GELU()] if act else [])]


class WideDeep(nn.Module):
    """concat: an MLP (32→32→16→1, BatchNorm1d) and a linear (32→3), cat on the last dim → 1."""

    def __init__(self, d: int = 32):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(d, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Dropout(0.2),
            nn.Linear(32, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, 1),
        )
        self.linear = nn.Linear(d, 3)
        self.lin2 = nn.Linear(4, 1)

    def forward(self, x):
        x = x.reshape(x.shape[0], -1)
        return torch.sigmoid(self.lin2(torch.concat([self.linear(x), self.mlp(x)], dim=-1)))


class CascadedConcat(nn.Module):
    """cat(cat(cat(b1, b2), b3), b4) → 1×1 conv to 10: widths c, 2c, 3c, 6c."""

    def __init__(self, c: int = 10):
        super().__init__()
        self.block1 = nn.Sequential(*_cbg(c, c), *_cbg(c, c, act=False))
        self.block2 = nn.Sequential(*_cbg(c, 2 * c), *_cbg(2 * c, 2 * c, act=False))
        self.block3 = nn.Sequential(*_cbg(c, 3 * c, act=False))
        self.block4 = nn.Sequential(*_cbg(c, 6 * c, act=False))
        self.output = nn.Conv2d(12 * c, 10, 1)

    def forward(self, x):
        y = torch.cat([torch.cat([torch.cat([self.block1(x), self.block2(x)], 1), self.block3(x)], 1), self.block4(x)], 1)
        return self.output(y)


class ConcatSplit(nn.Module):
    """split(block1(x), (c, c)) → cat(first piece, parallel(x)) → block2, + second piece."""

    def __init__(self, c: int = 10):
        super().__init__()
        self.block1 = nn.Sequential(*_cbg(c, c), *_cbg(c, 2 * c, act=False))
        self.parallel_path = nn.Sequential(*_cbg(c, c), *_cbg(c, c, act=False))
        self.block2 = nn.Sequential(*_cbg(2 * c, c, act=False))

    def forward(self, x):
        x3 = self.parallel_path(x)
        x1, x2 = torch.split(self.block1(x), (self.block2[0].in_channels - x3.shape[1], x3.shape[1]), 1)
        return self.block2(torch.cat([x1, x3], dim=1)) + x2


class NonFeatureDimCat(nn.Module):
    """cat(block1(x), parallel(x)) along the height → conv → split along the height → conv."""

    def __init__(self, c: int = 16):
        super().__init__()
        self.block1 = nn.Sequential(*_cbg(c, c), *_cbg(c, c, act=False))
        self.parallel_path = nn.Sequential(*_cbg(c, c), *_cbg(c, c, act=False))
        self.conv1, self.conv2 = nn.Conv2d(c, c, 1), nn.Conv2d(c, c, 1)

    def forward(self, x):
        x1, x2 = self.block1(x), self.parallel_path(x)
        y = self.conv1(torch.cat([x1, x2], dim=2))
        a, _ = torch.split(y, [x1.shape[2], x2.shape[2]], dim=2)
        return self.conv2(a)


class Split(nn.Module):
    """split(block1(x), [c, c, 2c]) → the same block2_1 on the first two pieces (shared
    weights), block2_2 on the third; three outputs."""

    def __init__(self, c: int = 8):
        super().__init__()
        self.block1 = nn.Sequential(*_cbg(c, c), *_cbg(c, 4 * c, act=False))
        self.block2_1 = nn.Sequential(*_cbg(c, c, act=False))
        self.block2_2 = nn.Sequential(*_cbg(2 * c, c, act=False))

    def forward(self, x):
        x = self.block1(x)
        c1, c2 = self.block2_1[0].in_channels, self.block2_2[0].in_channels
        x1, x2, x3 = torch.split(x, [c1, c1, c2], dim=1)
        return self.block2_1(x1), self.block2_1(x2), self.block2_2(x3)


class Reshape(nn.Module):
    """Linear 64→1024 viewed as (N, 64, 4, 4) → two transposed convs → flatten → Linear."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(64, 1024)
        self.up1 = nn.ConvTranspose2d(64, 32, 4, stride=2, padding=1)
        self.up2 = nn.ConvTranspose2d(32, 16, 4, stride=2, padding=1)
        self.final = nn.Linear(16 * 16 * 16, 10)

    def forward(self, x):
        x = F.relu(self.linear(x)).view(-1, self.up1.in_channels, 4, 4)
        return self.final(torch.flatten(F.relu(self.up2(F.relu(self.up1(x)))), 1))


class SingleChannelOutput(nn.Module):
    """conv-bn-relu ×3, the last to one channel (which must stay)."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.conv2, self.bn2 = nn.Conv2d(16, 64, 2, stride=2), nn.BatchNorm2d(64)
        self.conv3, self.bn3 = nn.Conv2d(64, 1, 3, 1, 1), nn.BatchNorm2d(1)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        return F.relu(self.bn3(self.conv3(x)))


class MultipleInputsOutputs(nn.Module):
    """fc1(x1), fc2(x2) → cat → fc3; returns all three."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(128, 32), nn.Linear(64, 32), nn.Linear(64, 100)

    def forward(self, x1, x2):
        x1, x2 = F.relu(self.fc1(x1)), F.relu(self.fc2(x2))
        return x1, x2, F.relu(self.fc3(torch.cat([x1, x2], dim=1)))


BUILDERS = {
    "concat": lambda: (WideDeep(), torch.randn(4, 32)),
    "cascaded_concat": lambda: (CascadedConcat(), torch.randn(2, 10, 7, 7)),
    "concat_split": lambda: (ConcatSplit(), torch.randn(2, 10, 7, 7)),
    "non_feature_dim_cat": lambda: (NonFeatureDimCat(), torch.randn(2, 16, 7, 7)),
    "split": lambda: (Split(), torch.randn(2, 8, 7, 7)),
    "reshape": lambda: (Reshape(), torch.randn(2, 64)),
    "single_channel_output": lambda: (SingleChannelOutput(), torch.randn(2, 3, 32, 32)),
    "multiple_inputs_outputs": lambda: (
        MultipleInputsOutputs(), {"x1": torch.randn(2, 128), "x2": torch.randn(2, 64)}
    ),
}
