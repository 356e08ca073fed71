"""Small models under test for the core passes, each exercising one coupling rule."""

import torch
import torch.nn.functional as F
from torch import nn


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every norm layer non-trivial statistics and affine parameters (eval mode)."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d, nn.GroupNorm)) and m.affine:
            m.weight.data.copy_(torch.randn(m.weight.shape, generator=g))
            m.bias.data.copy_(torch.randn(m.bias.shape, generator=g))
    return model.eval()


class OptionABlock(nn.Module):
    """conv-bn-relu-conv-bn + (x or pad(x[:, :, ::2, ::2])) -> relu: an option-A ResNet block."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.pad = (cout - cin) // 2

    def forward(self, x):
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        if self.pad:
            x = F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))
        return F.relu(out + x)


class TinyOptionA(nn.Module):
    """stem(4) -> block(4) -> block(4→8, pad 2+2) -> block(8→16, pad 4+4) -> pool -> fc."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(4)
        self.l1 = OptionABlock(4, 4, 1)
        self.l2 = OptionABlock(4, 8, 2)
        self.l3 = OptionABlock(8, 16, 2)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = self.l3(self.l2(self.l1(F.relu(self.bn1(self.conv1(x))))))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


class SplitChunk(nn.Module):
    """conv(32) -> split(16, dim=1) and chunk(2, dim=1) -> convs -> cat: constants to rewrite."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 32, 3, padding=1)
        self.a = nn.Conv2d(16, 8, 3, padding=1)
        self.b = nn.Conv2d(16, 8, 1)
        self.c = nn.Conv2d(16, 8, 1)
        self.head = nn.Conv2d(24, 6, 1)

    def forward(self, x):
        x = F.relu(self.stem(x))
        s0, s1 = torch.split(x, 16, 1)
        c0, c1 = torch.chunk(x, 2, 1)
        y = torch.cat([self.a(s0), self.b(s1 + c1), self.c(c0)], 1)
        return self.head(y)


class SEDepthwise(nn.Module):
    """pointwise -> depthwise -> squeeze-excitation gate -> flatten -> linear, plus a slice."""

    def __init__(self):
        super().__init__()
        self.pw = nn.Conv2d(3, 12, 1)
        self.bn = nn.BatchNorm2d(12)
        self.dw = nn.Conv2d(12, 12, 3, padding=1, groups=12)
        self.se1 = nn.Linear(12, 4)
        self.se2 = nn.Linear(4, 12)
        self.gconv = nn.Conv2d(12, 8, 1, groups=4)
        self.gbn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8 * 4 * 4 + 4 * 4 * 4, 5)

    def forward(self, x):
        x = F.hardswish(self.bn(self.pw(x)))
        x = self.dw(x)
        s = torch.sigmoid(self.se2(F.relu(self.se1(x.mean((2, 3))))))
        x = x * s.view(s.size(0), 12, 1, 1)
        y = self.gbn(self.gconv(x))
        y = F.adaptive_avg_pool2d(y, 4)
        z = F.max_pool2d(x[:, 2:6], 2)
        return self.fc(torch.cat([y.flatten(1), z.reshape(z.size(0), 64)], 1))


class Unknown(nn.Module):
    """An op the analysis does not know (torch.roll over channels) between two convs, and a max
    over the channels (a zeroed channel could be the max: not exact, unlike a sum or mean)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 1)
        self.b = nn.Conv2d(8, 8, 1)
        self.c = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        y = self.a(x)
        return self.c(torch.roll(self.b(y), 1, dims=1) + y.amax(1, keepdim=True))


class GroupNormNet(nn.Module):
    """conv(8) -> GroupNorm(2 groups of 4) -> conv: only whole norm groups can go."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.gn = nn.GroupNorm(2, 8)
        self.b = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.b(F.relu(self.gn(self.a(x))))


class CountedNet(nn.Module):
    """Model under test: every formula of the cost pass once, small enough to count by hand::

        x (3, 8, 8) ─▶ conv a 3x3 +bias ─▶ BN ─▶ ReLU ─▶ MaxPool 2 ─▶ depthwise 3x3 (8, 4, 4)
          ─▶ conv b 1x1 +bias (4, 4, 4) ─▶ F.relu ─▶ F.adaptive_avg_pool2d ─▶ flatten ─▶ fc (5)

    Group A: conv a's 8 outputs (BN, the depthwise conv's channels, conv b's inputs);
    group B: conv b's 4 outputs (fc's inputs)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.relu = nn.ReLU()
        self.pool = nn.MaxPool2d(2)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False)
        self.b = nn.Conv2d(8, 4, 1)
        self.fc = nn.Linear(4, 5)

    def forward(self, x):
        x = self.dw(self.pool(self.relu(self.bn(self.a(x)))))
        x = F.relu(self.b(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def counted_net_cost(a: int, b: int) -> tuple[int, int]:
    """MACs and parameters of ``CountedNet`` keeping ``a`` channels of group A and ``b`` of B, by hand."""
    macs = (
        8 * 8 * (9 * 3 * a + a)  # conv a at 8x8: 3x3 x 3 inputs per output, plus the bias add
        + 2 * a * 8 * 8  # BN: scale and shift per element
        + a * 8 * 8  # ReLU: one per output element
        + a * 8 * 8  # max pool: one per input element
        + 4 * 4 * 9 * a  # depthwise at 4x4: 3x3 x 1 input per output, stays depthwise when pruned
        + 4 * 4 * (a * b + b)  # conv b 1x1 plus bias
        + b * 4 * 4  # F.relu
        + b * 4 * 4  # F.adaptive_avg_pool2d: one per input element
        + (b * 5 + 5)  # fc
    )
    params = (9 * 3 * a + a) + 2 * a + 9 * a + (a * b + b) + (b * 5 + 5)
    return macs, params
