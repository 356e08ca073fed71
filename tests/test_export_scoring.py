"""Ranking with data on graphs torch.export captured: the Hessian trace with the user's
``loss_fn`` on a segmentation and a detection look-alike (outputs that are not class logits),
the removal criterion on a classifier FX cannot trace, and the latency model on export graphs.

Models under test::

    SegLike:  x ─▶ (H, W divisible by 8? else raise: FX cannot trace the check)
              ─▶ enc1 ─▶ enc2 ─▶ enc3 ─┬─ lateral convs ─▶ interpolate ─▶ stack ─▶ sum(0)  (smp's FPN merge)
                                       └────────────────────────────────────────────────┘
              ─▶ head conv(K) ─▶ interpolate to (H, W): per-pixel logits (N, K, H, W)
    YoloLike: tests/test_capture_auto.py (cat/view/split head, anchors cached per shape)
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from ehap_fx.passes.capture import capture_groups
from ehap_fx.passes.group import KeptChannels, groups_of
from ehap_fx.passes.mask import mask_channels
from ehap_fx.passes.shrink import PrunePlan
from ehap_fx.passes.trace import call_with
from torch import nn

from ehap_fx.compress import compress
from ehap_fx.latency import LatencyModel, LatencyOptions, LatencyTable
from ehap_fx.scoring import HessianOptions
from ehap_fx.target import Target
from tests.nets import randomize_bn
from tests.test_capture_auto import YoloLike, cbs

HUTCH = HessianOptions(estimator="hutchinson", dtype="fp32", batch_size=4, probes=4, progress=False)


class SegLike(nn.Module):
    def __init__(self, classes: int = 3):
        super().__init__()
        self.enc = nn.ModuleList([cbs(3, 16, s=2), cbs(16, 32, s=2), cbs(32, 48, s=2)])
        self.lateral = nn.ModuleList([nn.Conv2d(c, 24, 1) for c in (16, 32, 48)])
        self.head = nn.Conv2d(24, classes, 3, padding=1)

    def forward(self, x):
        h, w = x.shape[-2:]
        if h % 8 or w % 8:  # smp's check_input_shape: symbolic tracing cannot follow it
            raise RuntimeError(f"input {h}x{w} is not divisible by 8")
        feats = []
        for enc in self.enc:
            x = enc(x)
            feats.append(x)
        size = feats[0].shape[-2:]
        maps = [F.interpolate(lat(f), size=size, mode="bilinear") for lat, f in zip(self.lateral, feats)]
        return F.interpolate(self.head(torch.stack(maps).sum(0)), scale_factor=2.0, mode="bilinear")


class ClsLike(SegLike):
    """The same encoder as a classifier (class logits): a shape check FX cannot trace."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(48, 5)

    def forward(self, x):
        if x.shape[-1] % 8:
            raise RuntimeError("width not divisible by 8")
        for enc in self.enc:
            x = enc(x)
        return self.fc(x.mean((2, 3)))


def _exact(model, x, res):
    gm = capture_groups(model, x)
    masked = mask_channels(gm, res.pruned.meta["ehap.plan"]).graph_module
    with torch.no_grad():
        got, want = call_with(res.pruned, x), call_with(masked, x)
    for g, w in zip(torch.utils._pytree.tree_leaves(got), torch.utils._pytree.tree_leaves(want)):
        torch.testing.assert_close(g, w, rtol=0, atol=1e-5 * max(1.0, float(w.abs().max())))


def test_segmentation_ranks_with_a_pixel_wise_loss_on_the_export_graph():
    torch.manual_seed(0)
    model, x = randomize_bn(SegLike()).eval(), torch.randn(1, 3, 32, 32)
    g = torch.Generator().manual_seed(1)
    data = (torch.randn(8, 3, 32, 32, generator=g), torch.randint(0, 3, (8, 32, 32), generator=g))
    res = compress(model, x, data=data, loss_fn=F.cross_entropy, hessian=HUTCH,
                   target=Target(macs=0.5, round_to=1), compensate=None)  # pruned == masked: before a repair
    assert res.report.capture["capture"] == "export"
    assert res.report.ranking[0]["scorer"] == "hessian"
    scores = [s for grp in res.report.groups for s in grp.scores]
    assert scores and any(s > 0 for s in scores)  # Hutchinson traces of the loss's Hessian, per channel
    assert res.report.cost_after["macs_ratio"] <= 0.5
    assert res.pruned(x).shape == (1, 3, 32, 32)
    _exact(model, x, res)


def test_detector_ranks_with_a_loss_of_its_outputs_on_the_export_graph():
    """The loss: MSE of the decoded boxes and scores against targets (a distillation-style
    loss that needs no box matching), on the first output of (predictions, feature maps)."""
    torch.manual_seed(0)
    model, x = randomize_bn(YoloLike()).eval(), torch.randn(1, 3, 32, 32)
    g = torch.Generator().manual_seed(1)
    images = torch.randn(8, 3, 32, 32, generator=g)
    with torch.no_grad():
        targets = model(images)[0] + 0.1 * torch.randn(8, 7, 80, generator=g)  # (N, 4 + 3 classes, 80 anchors)
    res = compress(model, x, data=(images, targets), loss_fn=lambda out, y: F.mse_loss(out[0], y),
                   hessian=HUTCH, target=Target(macs=0.5, round_to=1), compensate=None)
    assert res.report.capture["capture"] == "export" and res.report.ranking[0]["scorer"] == "hessian"
    assert any(s > 0 for grp in res.report.groups for s in grp.scores)
    assert res.report.cost_after["macs_ratio"] <= 0.5
    _exact(model, x, res)
    # the default repair reads the images of the one (x, y) tuple and moves the pruned outputs
    # toward the dense ones (it fits them in least squares on these very images)
    fixed = compress(model, x, data=(images, targets), loss_fn=lambda out, y: F.mse_loss(out[0], y),
                     hessian=HUTCH, target=Target(macs=0.5, round_to=1))
    assert fixed.report.compensation["images"] == len(images) and fixed.report.compensation["layers_repaired"] > 0
    with torch.no_grad():
        dense, before, after = model(images)[0], res.pruned(images)[0], fixed.pruned(images)[0]
    assert (after - dense).square().sum() < (before - dense).square().sum()


def test_removal_criterion_on_a_classifier_fx_cannot_trace():
    torch.manual_seed(0)
    model, x = randomize_bn(ClsLike()).eval(), torch.randn(1, 3, 16, 16)
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(8, 3, 16, 16, generator=g), torch.randint(0, 5, (8,), generator=g)) for _ in range(2)]
    res = compress(model, x, data=data, hessian=HessianOptions(dtype="fp32", batch_size=8, progress=False),
                   target=Target(macs=0.6, round_to=1), compensate=None)
    assert res.report.capture["capture"] == "export" and res.report.ranking[0]["scorer"] == "removal"
    assert res.report.cost_after["macs_ratio"] <= 0.6
    _exact(model, x, res)


class ModelTable(LatencyTable):
    """A deterministic table: seconds ∝ H·W·Cin·Cout (no onnxruntime)."""

    def __init__(self):
        super().__init__(LatencyOptions(cache=None))

    def _measure(self, shape, cin, cout):
        return shape.height * shape.width * cin * cout * shape.kernel[0] * shape.kernel[1] * 1e-12


@pytest.mark.parametrize("ir", ["training", "core"])
def test_latency_model_counts_the_convs_of_an_export_graph(ir):
    """The same convs, the same estimate: an export graph (ATen convs, ``padding="same"``
    included) and the FX graph of the same model, dense and under one plan."""
    torch.manual_seed(0)
    model = nn.Sequential(cbs(3, 16), nn.Conv2d(16, 24, 3, padding="same"), nn.ReLU(), cbs(24, 8, s=2)).eval()
    x = torch.randn(2, 3, 16, 16)
    fx_gm = capture_groups(model, x, capture="fx")
    src = torch.export.export(model, (x,))
    ex = capture_groups(src if ir == "training" else src.run_decompositions(), x, capture="export")
    assert len(LatencyModel(fx_gm, ModelTable()).convs) == len(LatencyModel(ex, ModelTable()).convs) == 3
    for gm_a, gm_b in ((fx_gm, ex),):
        ga, gb = groups_of(gm_a), groups_of(gm_b)
        dense_a = LatencyModel(gm_a, ModelTable())(KeptChannels(ga, PrunePlan({}).masks(ga)))
        dense_b = LatencyModel(gm_b, ModelTable())(KeptChannels(gb, PrunePlan({}).masks(gb)))
        assert dense_a == pytest.approx(dense_b, rel=1e-12) and dense_a > 0
        # half of the 16-wide group: its two convs lose half their output / input channels
        (sixteen,) = [g for g in gb.prunable if g.size == 16]
        plan = PrunePlan({sixteen.id: tuple(range(8))})
        halved = LatencyModel(gm_b, ModelTable())(KeptChannels(gb, plan.masks(gb)))
        # conv 1 (3→16, 3×3 at 16×16) and conv 2 (16→24) each lose half
        first = 16 * 16 * 3 * 16 * 9e-12
        second = 16 * 16 * 16 * 24 * 9e-12
        assert dense_b - halved == pytest.approx((first + second) / 2, rel=1e-9)
