"""Property test: random residual CNNs built from every coupling the analysis knows.

A drawn *program* is a list of ops applied to one running tensor ``x`` (N, C, 8, 8); each op
changes C its own way (or keeps it, moving channels to the last dim and back: a channels-last
MLP with a layer scale, ViT-style tokens). For every program and random plan: shrunk == masked original, and
the plan's predicted cost equals the shrunk graph's cost.
"""

import operator

import pytest
import torch
import torch.nn.functional as F
from ehap_fx.passes.cost import plan_cost, total_cost
from ehap_fx.passes.group import group_channels, groups_of
from ehap_fx.passes.mask import mask_channels, random_plan
from ehap_fx.passes.shrink import shrink
from ehap_fx.passes.trace import trace
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from torch import nn
from torchvision.ops import stochastic_depth

aten = torch.ops.aten

OPS = ["conv", "residual", "se", "cat", "split", "chunk", "pad", "slice", "grouped", "depthwise", "pool",
       "mlp_last", "layerscale", "cat_spatial", "tokens", "shuffle", "unflatten", "l2norm", "convT"]
#: The ops the libraries people bring use (ultralytics, transformers, smp, timm): every spelling
#: is checked under both captures (``test_library_ops_shrink_exactly``).
LIBRARY_OPS = ["prelu", "prelu_shared", "fprelu", "same", "group_norm_f", "pixel_shuffle", "softmax", "conv3d",
               "conv1d", "fpn_merge", "grn", "grn_last", "grn_hf", "cls_split"]
OPS += LIBRARY_OPS


def _randomize(module: nn.Module) -> nn.Module:
    """Distinct per-channel parameters (PReLU's 0.25 or a norm's ones would hide a wrong slice)."""
    for name, p in module.named_parameters():
        if p.dim() == 1:
            p.data.uniform_(0.1, 0.9) if "weight" in name or p.numel() == 1 else p.data.normal_(0, 0.5)
    return module


class Conv3dBlock(nn.Module):
    """A Conv3d network's ops on (N, C, 1, H, W): conv, BN, instance norm, adaptive and max/avg
    pooling, a trilinear resize and back."""

    def __init__(self, c, w):
        super().__init__()
        self.conv = nn.Conv3d(c, w, (1, 3, 3), padding=(0, 1, 1))
        self.bn, self.inorm = nn.BatchNorm3d(w), nn.InstanceNorm3d(w, affine=True)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool3d((1, 8, 8)), nn.MaxPool3d((1, 3, 3), 1, (0, 1, 1)))
        _randomize(self)

    def forward(self, x):
        y = self.pool(self.inorm(self.bn(self.conv(x.unsqueeze(2)))))
        y = F.interpolate(y, scale_factor=(1, 2, 2), mode="trilinear")
        return F.avg_pool3d(F.adaptive_max_pool3d(y, (1, 8, 8)), (1, 3, 3), 1, (0, 1, 1)).squeeze(2)


class Conv1dBlock(nn.Module):
    """A Conv1d network's ops on (N, C, H·W): conv, instance norm, adaptive max and avg pooling."""

    def __init__(self, c, w):
        super().__init__()
        self.conv, self.inorm = nn.Conv1d(c, w, 3, padding=1), nn.InstanceNorm1d(w, affine=True)
        self.pool = nn.Sequential(nn.AdaptiveMaxPool1d(64), nn.AvgPool1d(3, 1, 1))
        _randomize(self)

    def forward(self, x):
        n = x.shape[0]
        y = self.pool(self.inorm(self.conv(x.flatten(2))))  # (N, w, 64)
        return F.upsample_nearest(y.view(n, -1, 4, 16), size=(8, 8))  # a deprecated spelling, still used


class ChannelsLastMLP(nn.Module):
    """ConvNeXt's block without its LayerNorm: permute to (N, H, W, C), Linear c→w, GELU,
    Linear w→c, a (C,) layer scale, permute back, stochastic depth."""

    def __init__(self, c, w):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(c, w), nn.Linear(w, c)
        self.gamma = nn.Parameter(torch.rand(c) + 0.5)

    def forward(self, x):
        y = self.fc2(F.gelu(self.fc1(x.permute(0, 2, 3, 1)))) * self.gamma
        return stochastic_depth(y.permute(0, 3, 1, 2), 0.1, "row", training=False)


class GRN(nn.Module):
    """ConvNeXt-V2's global response norm, timm's spelling (``timm.layers.grn``): the L2 norm
    over space, divided by its mean over the channels, ``x + addcmul(bias, weight, x · x_n)``."""

    def __init__(self, c, channels_last):
        super().__init__()
        self.spatial, self.channel = ((1, 2), -1) if channels_last else ((2, 3), 1)
        self.shape = (1, 1, 1, -1) if channels_last else (1, -1, 1, 1)
        self.weight, self.bias = nn.Parameter(torch.rand(c) + 0.5), nn.Parameter(torch.randn(c))

    def forward(self, x):
        x_g = x.norm(p=2, dim=self.spatial, keepdim=True)
        x_n = x_g / (x_g.mean(dim=self.channel, keepdim=True) + 1e-6)
        return x + torch.addcmul(self.bias.view(self.shape), self.weight.view(self.shape), x * x_n)


class GRNHF(nn.Module):
    """The same in transformers' spelling (``ConvNextV2GRN``): ``torch.linalg.vector_norm``,
    (1, 1, 1, C) parameters, channels-last."""

    def __init__(self, c):
        super().__init__()
        self.weight, self.bias = nn.Parameter(torch.rand(1, 1, 1, c) + 0.5), nn.Parameter(torch.randn(1, 1, 1, c))

    def forward(self, x):
        g = torch.linalg.vector_norm(x, ord=2, dim=(1, 2), keepdim=True)
        n = g / (g.mean(dim=-1, keepdim=True) + 1e-6)
        return self.weight * (x * n) + self.bias + x


class GRNBlock(nn.Module):
    """A GRN after a 1x1 conv (timm's ``GlobalResponseNormMlp(use_conv=True)``) or, channels-last,
    after a Linear (ConvNeXt-V2's MLP): the GRN's channels are the layer's outputs."""

    def __init__(self, c, w, kind):
        super().__init__()
        self.kind = kind
        if kind == "grn":
            self.conv, self.grn = nn.Conv2d(c, w, 1), GRN(w, channels_last=False)
        else:
            self.fc1, self.grn = nn.Linear(c, w), GRN(w, channels_last=True) if kind == "grn_last" else GRNHF(w)

    def forward(self, x):
        if self.kind == "grn":
            return self.grn(self.conv(x))
        return self.grn(self.fc1(x.permute(0, 2, 3, 1))).permute(0, 3, 1, 2)


class Tokens(nn.Module):
    """ViT-style: (N, C, H, W) → (N, HW, C) tokens → MLP, token-mean and first-token gates → back."""

    def __init__(self, c, w):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(c, w), nn.Linear(w, c)

    def mixed(self, x):
        """(N, HW, C) tokens of ``x`` after a residual MLP over the channels."""
        t = x.flatten(2).transpose(1, 2)  # (N, HW, C)
        return t + self.fc2(F.gelu(self.fc1(t)))

    def forward(self, x):
        n, c, h, w = x.shape
        t = self.mixed(x)
        t = t * torch.sigmoid(t.mean(1, keepdim=True))  # (N, 1, C) gate, broadcast over tokens
        g = torch.sigmoid(t[:, 0] + t.mean(1))  # (N, C): the first token and the token mean
        return t.transpose(1, 2).reshape(n, c, h, w) * g.view(n, c, 1, 1)


class ClsSplit(Tokens):
    """CvT's stage with a class token: tokens (N, HW, C), an MLP over the channels, the first
    token split off along the tokens (``torch.split(t, [1, HW - 1], 1)``, the channels at dim
    2: the split's sizes count tokens, not channels) and put back."""

    def forward(self, x):
        n, c, h, w = x.shape
        t = self.mixed(x)
        cls, rest = torch.split(t, [1, h * w - 1], 1)  # (N, 1, C), (N, HW - 1, C)
        t = torch.cat([cls * torch.sigmoid(rest.mean(1, keepdim=True)), rest], 1)
        return t.transpose(1, 2).reshape(n, c, h, w)


class Program(nn.Module):
    """Interprets a list of op names; layers are created for the widths seen at build time."""

    def __init__(self, ops, widths, head):
        super().__init__()
        self.ops, self.head_kind = ops, head
        self.layers = nn.ModuleList()
        c = 3
        self.plan = []
        for op, w in zip(ops, widths):
            c = self._build(op, c, w)
        self.fc = nn.Linear(c * (16 if head == "flatten" else 1), 5)

    def _build(self, op, c, w):
        L = self.layers
        if op == "conv":
            L.append(nn.Sequential(nn.Conv2d(c, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU()))
            self.plan.append((op, len(L) - 1, None))
            return w
        if op == "residual":
            L.append(nn.Sequential(nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)))
            self.plan.append((op, len(L) - 1, None))
            return c
        if op == "se":
            L.append(nn.Sequential(nn.Linear(c, 2), nn.ReLU(), nn.Linear(2, c), nn.Sigmoid()))
            self.plan.append((op, len(L) - 1, None))
            return c
        if op == "cat":
            L.append(nn.Conv2d(c, w, 1))
            self.plan.append((op, len(L) - 1, None))
            return c + w
        if op == "split" and c >= 2:
            first = max(1, c // 3)
            L.append(nn.Conv2d(first, w, 1))
            self.plan.append((op, len(L) - 1, first))
            return w + c - first
        if op == "chunk" and c % 2 == 0:
            self.plan.append((op, None, None))
            return c // 2
        if op == "pad":
            self.plan.append((op, None, (1, w % 3)))
            return c + 1 + w % 3
        if op == "slice" and c >= 3:
            self.plan.append((op, None, (1, c - 1)))
            return c - 2
        if op == "grouped" and c % 2 == 0 and c >= 4:
            L.append(
                nn.Sequential(
                    nn.Conv2d(c, 2 * (w // 2 + 1), 3, padding=1, groups=2), nn.BatchNorm2d(2 * (w // 2 + 1))
                )
            )
            self.plan.append((op, len(L) - 1, None))
            return 2 * (w // 2 + 1)
        if op == "depthwise":
            L.append(
                nn.Sequential(nn.Conv2d(c, c, 3, padding=1, groups=c), nn.BatchNorm2d(c), nn.Hardswish())
            )
            self.plan.append((op, len(L) - 1, None))
            return c
        if op in ("mlp_last", "tokens", "cls_split"):
            L.append({"mlp_last": ChannelsLastMLP, "tokens": Tokens, "cls_split": ClsSplit}[op](c, w))
            self.plan.append((op, len(L) - 1, None))
            return c
        if op == "layerscale":
            L.append(nn.Conv2d(c, c, 3, padding=1))
            self.register_parameter(f"gamma{len(L) - 1}", nn.Parameter(torch.rand(c, 1, 1) + 0.5))
            self.plan.append((op, len(L) - 1, None))
            return c
        if op == "l2norm":  # SSD's L2Norm: a (C,) scale viewed as (1, C, 1, 1) times F.normalize over channels
            L.append(nn.Conv2d(c, c, 3, padding=1))
            self.register_parameter(f"scale{len(L) - 1}", nn.Parameter(torch.rand(c) + 0.5))
            self.plan.append((op, len(L) - 1, None))
            return c
        if op == "shuffle" and c % 2 == 0:
            self.plan.append((op, None, c // 2))
            return c
        if op == "unflatten":  # pooled features → Linear → (N, w, 2, 2) → upsampled
            L.append(nn.Linear(c, 4 * w))
            self.plan.append((op, len(L) - 1, w))
            return w
        if op == "convT":  # a decoder's transposed conv: its input channels go, its outputs stay
            L.append(nn.ConvTranspose2d(c, w, 3, padding=1))
            self.plan.append((op, len(L) - 1, None))
            return w
        if op in ("prelu", "prelu_shared"):
            L.append(_randomize(nn.Sequential(nn.Conv2d(c, w, 3, padding=1), nn.PReLU(w if op == "prelu" else 1))))
            self.plan.append((op, len(L) - 1, None))
            return w
        if op == "fprelu":  # F.prelu with a (C,) slope of the model's own
            L.append(nn.Conv2d(c, w, 3, padding=1))
            self.register_parameter(f"slope{len(L) - 1}", nn.Parameter(torch.rand(w) * 0.8 + 0.1))
            self.plan.append((op, len(L) - 1, None))
            return w
        if op == "same":  # padding="same" with an even kernel (asymmetric pad): aten.conv2d.padding
            L.append(nn.Conv2d(c, w, 4, padding="same", dilation=1))
            self.plan.append((op, len(L) - 1, None))
            return w
        if op == "group_norm_f":  # F.group_norm, 2 groups, its own (C,) weight and bias
            L.append(nn.Conv2d(c, 2 * (w // 2 + 1), 3, padding=1))
            self.register_parameter(f"gn_w{len(L) - 1}", nn.Parameter(torch.rand(2 * (w // 2 + 1)) + 0.5))
            self.register_parameter(f"gn_b{len(L) - 1}", nn.Parameter(torch.randn(2 * (w // 2 + 1))))
            self.plan.append((op, len(L) - 1, None))
            return 2 * (w // 2 + 1)
        if op == "pixel_shuffle":  # conv → 4w → PixelShuffle(2) (N, w, 16, 16) → F.pixel_unshuffle → 4w
            L.append(nn.Sequential(nn.Conv2d(c, 4 * w, 1), nn.PixelShuffle(2), nn.Conv2d(w, w, 3, padding=1)))
            self.plan.append((op, len(L) - 1, None))
            return 4 * w
        if op == "softmax":  # attention over the width, per channel
            L.append(nn.Sequential(nn.Conv2d(c, w, 1), nn.Softmax(dim=-1)))
            self.plan.append((op, len(L) - 1, None))
            return w
        if op == "fpn_merge":  # smp's FPN: two branches stacked and summed over the stack
            L.append(nn.ModuleList([nn.Conv2d(c, w, 3, padding=1), nn.Conv2d(c, w, 1)]))
            self.plan.append((op, len(L) - 1, None))
            return w
        if op in ("grn", "grn_last", "grn_hf"):
            L.append(GRNBlock(c, w, op))
            self.plan.append((op, len(L) - 1, None))
            return w
        if op in ("conv3d", "conv1d"):
            L.append(Conv3dBlock(c, w) if op == "conv3d" else Conv1dBlock(c, w))
            self.plan.append((op, len(L) - 1, None))
            return w
        if op == "cat_spatial":
            L.append(nn.Conv2d(c, c, 1))
            self.plan.append((op, len(L) - 1, None))
            return c
        self.plan.append(("pool", None, None))  # also the fallback for ops that do not fit c
        return c

    def forward(self, x):
        for op, i, arg in self.plan:
            layer = self.layers[i] if i is not None else None
            if op in ("conv", "grouped", "depthwise", "convT", "prelu", "prelu_shared", "same", "conv3d", "conv1d",
                      "grn", "grn_last", "grn_hf", "cls_split"):
                x = layer(x)
            elif op == "fpn_merge":
                x = F.dropout2d(torch.stack([layer[0](x), layer[1](x)]).sum(0), 0.2, training=False)
            elif op == "fprelu":
                x = F.prelu(layer(x), getattr(self, f"slope{i}"))
            elif op == "group_norm_f":
                x = F.group_norm(layer(x), 2, getattr(self, f"gn_w{i}"), getattr(self, f"gn_b{i}"))
            elif op == "pixel_shuffle":
                x = F.pixel_unshuffle(layer(x), 2)
            elif op == "softmax":
                y = layer[0](x)
                x = y * layer[1](y)
            elif op == "residual":
                x = F.relu(x + layer(x))
            elif op == "se":
                s = layer(x.mean((2, 3)))
                x = x * s.view(s.size(0), -1, 1, 1)
            elif op == "cat":
                x = torch.cat([x, layer(x)], 1)
            elif op == "split":
                a, b = torch.split(x, [arg, x.shape[1] - arg], 1)
                x = torch.cat([layer(a), b], dim=1)
            elif op == "chunk":
                a, b = x.chunk(2, 1)
                x = a * b
            elif op == "pad":
                x = F.pad(x, (0, 0, 0, 0, *arg))
            elif op == "slice":
                x = x[:, arg[0] : arg[1]]
            elif op in ("mlp_last", "tokens"):
                x = x + layer(x)
            elif op == "layerscale":
                x = x + getattr(self, f"gamma{i}") * layer(x)
            elif op == "l2norm":
                x = getattr(self, f"scale{i}").view(1, -1, 1, 1) * F.normalize(layer(x))
            elif op == "shuffle":  # ShuffleNet's, with the group width as a literal
                n, c, h, w = x.shape
                x = x.view(n, 2, arg, h, w).transpose(1, 2).reshape(n, c, h, w)
            elif op == "unflatten":
                x = F.interpolate(layer(x.mean((2, 3))).view(x.shape[0], arg, 2, 2), scale_factor=4)
            elif op == "cat_spatial":  # along the width, then pooled back to it
                x = F.avg_pool2d(torch.cat([x, layer(x)], dim=3), (1, 2))
            else:
                x = F.max_pool2d(x, 3, 1, 1)
        if self.head_kind == "flatten":
            return self.fc(F.adaptive_avg_pool2d(x, 4).flatten(1))
        return self.fc(x.mean((2, 3)))


def _harmless(reason: str) -> bool:
    """Pins every program may have: the model's input and output, and a one-channel layer
    scale (after a slice to one channel: a broadcast scalar with nothing to score it by)."""
    return ("model" in reason or reason == "channels touch no parameter"
            or reason.endswith("output channels (weight dim 1) are not pruned"))  # a transposed conv's


programs = st.tuples(
    st.lists(st.sampled_from(OPS), min_size=1, max_size=7),
    st.lists(st.integers(2, 9), min_size=7, max_size=7),
    st.sampled_from(["flatten", "mean"]),
    st.floats(0.2, 0.9),
    st.integers(0, 2**16),
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(programs)
@example((["slice", "se"], [2] * 7, "flatten", 0.5, 0))  # a 1-channel SE gate (N, 1) viewed as (N, 1, 1, 1)
def test_random_programs_shrink_exactly(program):
    ops, widths, head, fraction, seed = program
    torch.manual_seed(seed)
    model = Program(ops, widths, head).eval()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    x = torch.randn(2, 3, 8, 8)
    gm = group_channels(trace(model, x)).graph_module
    groups = groups_of(gm)
    assert not [g.pinned for g in groups.pinned if not _harmless(g.pinned)]  # only input/output pins
    plan = random_plan(gm, fraction, torch.Generator().manual_seed(seed))
    small = shrink(gm, plan).graph_module
    masked = mask_channels(gm, plan).graph_module
    with torch.no_grad():
        torch.testing.assert_close(small(x), masked(x), rtol=1e-5, atol=1e-5)
    assert plan_cost(gm, plan.masks(groups)) == total_cost(small)


def _check_program(ops, widths, head, fraction, seed, capture="auto"):
    torch.manual_seed(seed)
    model = Program(ops, widths, head).eval()
    x = torch.randn(2, 3, 8, 8)
    gm = group_channels(trace(model, x, capture=capture)).graph_module
    groups = groups_of(gm)
    assert not [g.pinned for g in groups.pinned if not _harmless(g.pinned)]
    plan = random_plan(gm, fraction, torch.Generator().manual_seed(seed))
    small = shrink(gm, plan).graph_module
    with torch.no_grad():
        torch.testing.assert_close(small(x), mask_channels(gm, plan).graph_module(x), rtol=1e-5, atol=1e-5)
    assert plan_cost(gm, plan.masks(groups)) == total_cost(small)
    return gm, plan, small


@pytest.mark.parametrize("op", OPS)
def test_each_op_between_convs_shrinks_exactly(op):
    """Every op once, between two convs (so its channels are prunable), each group halved."""
    gm, plan, small = _check_program(["conv", op, "conv"], [6, 8, 6, 6, 6, 6, 6], "mean", 0.5, 1)
    kept = {g.id: len(plan.keep.get(g.id, range(g.size))) for g in groups_of(gm).prunable}
    assert any(k < groups_of(gm)[g].size for g, k in kept.items())
    if op in ("mlp_last", "tokens"):  # the hidden Linear lost exactly what its group lost
        (hidden,) = [g for g in groups_of(gm).prunable if any(m.module == "layers.1.fc1" and m.role == "out" for m in g.members)]
        assert small.get_submodule("layers.1.fc1").out_features == kept[hidden.id] == 4
        assert small.get_submodule("layers.1.fc2").in_features == 4
    if op == "l2norm":  # the scale lost exactly what its conv's channels lost
        assert small.scale1.shape == (small.get_submodule("layers.1").out_channels,) == (3,)
    if op == "convT":  # its weight lost exactly the rows of the conv before it
        assert small.get_submodule("layers.1").in_channels == small.get_submodule("layers.0.0").out_channels == 3
        assert small.get_submodule("layers.1").weight.shape[:2] == (3, 8)
    if op == "layerscale":
        assert small.gamma1.shape == (small.get_submodule("layers.1").out_channels, 1, 1) == (3, 1, 1)


@pytest.mark.parametrize("capture", ["fx", "export"])
@pytest.mark.parametrize("op", LIBRARY_OPS)
@pytest.mark.filterwarnings("ignore:.*upsample.*deprecated:UserWarning", "ignore:Using padding='same'")
def test_library_ops_shrink_exactly(op, capture):
    """Each op the libraries use, between two convs, in both captures' spellings (``nn.PReLU``
    / ``aten.prelu``, ``padding="same"`` / ``aten.conv2d.padding``, ``F.group_norm`` /
    ``aten.group_norm``, 1-D and 3-D convs, norms and pools): its channels prune (a group
    loses channels), and shrunk ≡ masked original."""
    gm, plan, small = _check_program(["conv", op, "conv"], [6, 8, 6, 6, 6, 6, 6], "mean", 0.5, 1, capture)
    groups = groups_of(gm)
    # the op's own channels (its conv's outputs) are a prunable group, halved by the plan
    (own,) = [g for g in groups.prunable
              if any(m.role == "out" and m.module in ("layers.1", "layers.1.0", "layers.1.conv", "layers.1.fc1")
                     for m in g.members)]
    assert len(plan.keep[own.id]) == own.size // 2 >= 1
    if op == "prelu" and capture == "fx":
        assert small.get_submodule("layers.1.1").weight.shape == (4,)
    if op == "group_norm_f":
        (gn,) = [n for n in small.graph.nodes if "group_norm" in str(n.target)]
        assert gn.args[1] == 1  # 10 channels in 2 groups: half the groups (one) kept
    if op.startswith("grn"):  # the channel mean became a sum over the 4 kept, divided by the dense 8
        (div,) = [n for n in small.graph.nodes
                  if n.target in (operator.truediv, aten.div.Tensor) and isinstance(n.args[1], float)]
        assert div.args[0].target in ("sum", aten.sum.dim_IntList) and div.args[1] == 8.0


@pytest.mark.parametrize("capture", ["fx", "export"])
def test_transposed_conv_shrinks_exactly(capture):
    """``nn.ConvTranspose2d`` / ``aten.conv_transpose2d.input`` between two convs: its weight
    ``(in, out, k, k)`` loses exactly the rows (dim 0) of the channels the conv before it lost,
    its outputs (dim 1) stay, and shrunk ≡ masked original."""
    gm, plan, small = _check_program(["conv", "convT", "conv"], [6, 8, 6, 6, 6, 6, 6], "mean", 0.5, 1, capture)
    targets = {n.target for n in gm.graph.nodes}
    assert (aten.conv_transpose2d.input in targets) == (capture == "export")
    (fed,) = [g for g in groups_of(gm).prunable if any(m.role == "in" and m.dim == 0 for m in g.members)]
    assert fed.size == 6 and len(plan.keep[fed.id]) == 3
    assert [m.module for m in fed.members if m.role == "in"] == ["layers.1"]
    assert small.get_submodule("layers.1").weight.shape == (3, 8, 3, 3)
    assert small.get_submodule("layers.0.0").weight.shape[0] == 3
