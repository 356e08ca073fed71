"""capture="auto", the default: the graph that prunes, and a report that says which and why.

Models under test (hand-written look-alikes of what the libraries people bring do)::

    YoloLike:  x ─▶ stem ─▶ c2 ─▶ c3 ─┬─▶ upsample ─▶ cat(c2) ─▶ neck ─┐
                                       └───────────────────────────────┴─▶ Detect head
               Detect: per level cat(box conv, cls conv) → view(N, no, -1) → cat(dim 2) → split,
               anchors cached by comparing shapes (``if self.shape != shape``: FX cannot trace)
    HFLike:    pixel_values ─▶ conv ─▶ conv ─▶ pool ─▶ Out(logits=..., hidden_states=(h,)),
               a ``ModelOutput``-style dict-subclass dataclass (FX returns a plain dict)
    Wrapped:   conv ─▶ swish (an ``fx.wrap``-ped function: FX keeps it opaque) ─▶ conv
"""

from __future__ import annotations

import collections
import dataclasses

import pytest
import torch
import torch.nn.functional as F
import torch.utils._pytree as pytree
from ehap_fx.passes.capture import capture_groups, prunable_channels
from ehap_fx.passes.group import groups_of
from ehap_fx.passes.mask import mask_channels
from ehap_fx.passes.trace import call_with, trace
from torch import fx, nn

from ehap_fx.compress import compress
from ehap_fx.errors import TraceError
from ehap_fx.target import Target
from tests.nets import randomize_bn


def cbs(c_in: int, c_out: int, k: int = 3, s: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, k, s, k // 2, bias=False), nn.BatchNorm2d(c_out), nn.SiLU())


class Detect(nn.Module):
    """ultralytics' Detect, reduced: per level a box and a class branch, concatenated."""

    def __init__(self, nc: int, chs: tuple[int, ...], reg: int = 4):
        super().__init__()
        self.nc, self.no = nc, nc + reg
        self.box = nn.ModuleList(nn.Sequential(cbs(c, 16), nn.Conv2d(16, reg, 1)) for c in chs)
        self.cls = nn.ModuleList(nn.Sequential(cbs(c, 16), nn.Conv2d(16, nc, 1)) for c in chs)
        self.shape = None

    def forward(self, xs: list[torch.Tensor]):
        xs = [torch.cat((b(x), c(x)), 1) for x, b, c in zip(xs, self.box, self.cls)]
        shape = xs[0].shape
        if self.shape != shape[2:]:  # anchors cached per map size: Python control flow on a shape
            self.anchors = torch.cat([torch.arange(x.shape[2] * x.shape[3]) for x in xs]).float()
            self.shape = shape[2:]
        y = torch.cat([x.view(shape[0], self.no, -1) for x in xs], 2)  # (N, no, A)
        box, cls = y.split((self.no - self.nc, self.nc), 1)
        return torch.cat((box + self.anchors, cls.sigmoid()), 1), xs


class YoloLike(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem, self.c2, self.c3 = cbs(3, 16, s=2), cbs(16, 32, s=2), cbs(32, 64, s=2)
        self.neck = cbs(64 + 32, 32)
        self.detect = Detect(3, (32, 64))

    def forward(self, x):
        p2 = self.c2(self.stem(x))
        p3 = self.c3(p2)
        n2 = self.neck(torch.cat([F.interpolate(p3, scale_factor=2.0, mode="nearest"), p2], 1))
        return self.detect([n2, p3])


@dataclasses.dataclass
class Out(collections.OrderedDict):
    """transformers' ``ModelOutput`` in small: a dataclass that is a dict, a pytree node."""

    logits: torch.Tensor | None = None
    hidden_states: tuple | None = None

    def __post_init__(self):
        for f in dataclasses.fields(self):
            if getattr(self, f.name) is not None:
                self[f.name] = getattr(self, f.name)


pytree.register_pytree_node(Out, lambda o: (list(o.values()), list(o.keys())),
                            lambda values, keys: Out(**dict(zip(keys, values))))


class HFLike(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed, self.stage = cbs(3, 16), cbs(16, 32, s=2)
        self.classifier = nn.Linear(32, 5)

    def forward(self, pixel_values):
        h = self.stage(self.embed(pixel_values))
        return Out(logits=self.classifier(h.mean((2, 3))), hidden_states=(h,))


@fx.wrap
def swish(x):
    return x * torch.sigmoid(x)


class Wrapped(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 8, 3, padding=1)

    def forward(self, x):
        return self.b(swish(self.a(x)))


def _leaves(out):
    return [t for t in pytree.tree_leaves(out) if torch.is_tensor(t)]


def _assert_pruned_exactly(model, x, res):
    """Every output leaf keeps its shape, and the pruned model equals the masked original
    (on the graph the same capture made) to fp32 rounding of the output's scale."""
    gm = capture_groups(model, x)
    assert gm.meta["ehap.captured"].capture == res.report.capture["capture"]
    masked = mask_channels(gm, res.pruned.meta["ehap.plan"]).graph_module
    with torch.no_grad():
        dense, got, want = call_with(model, x), call_with(res.pruned, x), call_with(masked, x)
    assert pytree.tree_structure(got) == pytree.tree_structure(dense)
    assert [t.shape for t in _leaves(got)] == [t.shape for t in _leaves(dense)]
    for g, w in zip(_leaves(got), _leaves(want)):
        torch.testing.assert_close(g, w, rtol=0, atol=1e-5 * max(1.0, float(w.abs().max())))


def test_a_detector_fx_cannot_trace_prunes_through_export_by_default():
    torch.manual_seed(0)
    model = randomize_bn(YoloLike()).eval()
    x = torch.randn(1, 3, 32, 32)
    with pytest.raises(TraceError, match="torch.fx cannot trace"):
        trace(model, x, capture="fx")
    with pytest.warns(UserWarning, match="no data"):
        res = compress(model, x, target=Target(macs=0.5, round_to=1))
    assert res.report.capture["capture"] == "export" and res.report.capture["asked"] == "auto"
    assert res.report.capture["why"].startswith("torch.fx cannot trace it")
    assert res.report.cost_after["macs_ratio"] <= 0.5
    _assert_pruned_exactly(model, x, res)


def test_model_output_dataclass_keeps_its_type():
    torch.manual_seed(0)
    model = randomize_bn(HFLike()).eval()
    x = torch.randn(2, 3, 16, 16)
    assert type(call_with(trace(model, x, capture="fx"), x)) is dict  # what FX alone gives
    gm = trace(model, x)  # the default: auto
    assert gm.meta["ehap.captured"].capture == "export" and "Out" in gm.meta["ehap.captured"].why
    with pytest.warns(UserWarning, match="no data"):
        res = compress(model, x, target=Target(macs=0.6, round_to=1))
    out = res.pruned(x)
    assert isinstance(out, Out) and out.logits.shape == (2, 5) and out.hidden_states[0].shape == (2, 32, 8, 8)
    _assert_pruned_exactly(model, x, res)


def test_export_is_taken_when_it_sees_into_what_fx_keeps_opaque():
    torch.manual_seed(0)
    model, x = Wrapped().eval(), torch.randn(2, 3, 8, 8)
    fx_gm = capture_groups(model, x, capture="fx")
    assert any("swish" in g.pinned for g in groups_of(fx_gm).pinned)  # 16 channels pinned by FX
    gm = capture_groups(model, x)
    captured = gm.meta["ehap.captured"]
    assert captured.capture == "export"
    # pinned inside FX: a's 16 outputs (swish's input) and swish's 16 outputs
    assert captured.why == "torch.export keeps 16 channels prunable, torch.fx 0 (32 pinned inside)"
    assert prunable_channels(gm) == 16 and prunable_channels(fx_gm) == 0
    # modules named by exclude only exist in an FX graph: auto keeps it
    kept = capture_groups(model, x, exclude=["a"])
    assert kept.meta["ehap.captured"].capture == "fx" and "exclude" in kept.meta["ehap.captured"].why



def test_auto_keeps_the_fx_graph_and_says_why_when_export_fails(monkeypatch):
    """FX pinned channels inside (the opaque swish) and torch.export failed: the FX graph, and
    the report names both, with the first line of export's error."""
    import ehap_fx.passes.capture as capture_pass

    def refuse(model, example_inputs):
        raise TraceError("export said no\n  (its traceback)")

    monkeypatch.setattr(capture_pass, "export_capture", refuse)
    gm = capture_groups(Wrapped().eval(), torch.randn(2, 3, 8, 8))
    captured = gm.meta["ehap.captured"]
    assert captured.capture == "fx" and captured.asked == "auto"
    assert captured.why == "torch.fx traced it with 32 channels pinned inside; torch.export failed (export said no)"
    with pytest.raises(dataclasses.FrozenInstanceError):  # the record in gm.meta is a value
        captured.why = "edited"

class Flipped(nn.Module):
    """conv a (3 → 8) ─▶ flip of the channels (no coupling rule in either capture) ─▶ conv b (8 → 6)
    ─▶ relu ─▶ conv c (6 → 4)."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 6, 3, padding=1), nn.Conv2d(6, 4, 1)

    def forward(self, x):
        return self.c(torch.relu(self.b(torch.flip(self.a(x), [1]))))


def test_auto_keeps_the_fx_graph_when_export_prunes_no_more():
    """Both captures pin a's 8 channels at the flip (16 pinned inside: its input and output) and
    keep b's 6 prunable: a tie keeps the FX graph, and the report gives both counts."""
    gm = capture_groups(Flipped().eval(), torch.randn(2, 3, 6, 6))
    assert gm.meta["ehap.captured"].capture == "fx"
    assert gm.meta["ehap.captured"].why == "torch.fx keeps 6 channels prunable, torch.export 6"
    assert any(n.op == "call_module" for n in gm.graph.nodes)


def test_a_whole_fx_graph_stays_fx():
    model = nn.Sequential(cbs(3, 8), cbs(8, 4)).eval()
    gm = capture_groups(model, torch.randn(1, 3, 8, 8))
    assert gm.meta["ehap.captured"].capture == "fx"
    res = compress(model, torch.randn(1, 3, 8, 8), scorer="l1", target=Target(macs=0.7, round_to=1))
    assert res.report.capture == {"capture": "fx", "asked": "auto",
                                  "why": "torch.fx traced the whole model: only its inputs and outputs are pinned"}


class DataBranch(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)

    def forward(self, x):
        y = self.conv(x)
        return y if y.sum() > 0 else -y  # a tensor value steers Python: neither capture follows it


def test_one_error_names_both_failures_and_the_fix():
    with pytest.raises(TraceError) as err:
        compress(DataBranch(), torch.randn(1, 3, 8, 8), scorer="l1")
    msg = str(err.value)
    assert msg.startswith("neither capture works on DataBranch")
    assert "[symbolic_trace] torch.fx cannot trace DataBranch" in msg
    assert "[torch.export] torch.export cannot capture DataBranch" in msg
    assert "leaf_modules" in msg and "torch.cond" in msg
    with pytest.raises(TraceError, match=r"exclude=\[.c2.0.\] names module calls"):
        capture_groups(YoloLike().eval(), torch.randn(1, 3, 32, 32), exclude=["c2.0"])
