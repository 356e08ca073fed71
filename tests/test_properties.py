"""Property test: random residual CNNs built from every coupling the analysis knows.

A drawn *program* is a list of ops applied to one running tensor ``x`` (N, C, 8, 8); each op
changes C its own way. For every program and random plan: shrunk == masked original, and
the plan's predicted cost equals the shrunk graph's cost.
"""

import torch
import torch.nn.functional as F
from ehap_fx.passes.cost import plan_cost, total_cost
from ehap_fx.passes.group import group_channels, groups_of
from ehap_fx.passes.mask import mask_channels, random_plan
from ehap_fx.passes.shrink import shrink
from ehap_fx.passes.trace import trace
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

OPS = ["conv", "residual", "se", "cat", "split", "chunk", "pad", "slice", "grouped", "depthwise", "pool"]


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
        self.plan.append(("pool", None, None))  # also the fallback for ops that do not fit c
        return c

    def forward(self, x):
        for op, i, arg in self.plan:
            layer = self.layers[i] if i is not None else None
            if op in ("conv", "grouped", "depthwise"):
                x = layer(x)
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
            else:
                x = F.max_pool2d(x, 3, 1, 1)
        if self.head_kind == "flatten":
            return self.fc(F.adaptive_avg_pool2d(x, 4).flatten(1))
        return self.fc(x.mean((2, 3)))


programs = st.tuples(
    st.lists(st.sampled_from(OPS), min_size=1, max_size=7),
    st.lists(st.integers(2, 9), min_size=7, max_size=7),
    st.sampled_from(["flatten", "mean"]),
    st.floats(0.2, 0.9),
    st.integers(0, 2**16),
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(programs)
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
    assert not [g.pinned for g in groups.pinned if "model" not in g.pinned]  # only input/output pins
    plan = random_plan(gm, fraction, torch.Generator().manual_seed(seed))
    small = shrink(gm, plan).graph_module
    masked = mask_channels(gm, plan).graph_module
    with torch.no_grad():
        torch.testing.assert_close(small(x), masked(x), rtol=1e-5, atol=1e-5)
    assert plan_cost(gm, plan.masks(groups)) == total_cost(small)
