"""compress(model, example_input) as a new user calls it: no data, any input signature, any
output structure, and bad input stopped with an error that names the fix.

Models under test::

    Stem:      x (N,3,40,48) → conv-bn-relu → conv-bn-relu → pool → fc(7)        one tensor
    TwoInputs: (a, b) → conv(a) + conv(b) → conv → {"logits": fc, "aux": (map, map)}
"""

import warnings

import pytest
import torch
import torch.nn.functional as F
from ehap_fx.passes.group import group_channels
from ehap_fx.passes.mask import mask_channels
from ehap_fx.passes.trace import call_with, trace
from torch import nn

from ehap_fx.compress import compress
from ehap_fx.errors import EhapError, TraceError
from ehap_fx.scoring.options import HessianOptions
from ehap_fx.target import Target
from tests.nets import randomize_bn

HUTCH = HessianOptions(estimator="hutchinson", dtype="fp32", batch_size=8, probes=4, progress=False)


def stem(classes: int = 7) -> nn.Module:
    torch.manual_seed(0)
    return randomize_bn(
        nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, classes),
        )
    )


class TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(2, 16, 3, padding=1)
        self.mid = nn.Conv2d(16, 24, 3, padding=1)
        self.fc = nn.Linear(24, 5)
        self.head = nn.Conv2d(24, 4, 1)

    def forward(self, a, b, scale: float = 1.0):
        h = F.relu(self.mid(F.relu(self.a(a) + self.b(b))))
        m = self.head(h) * scale
        return {"logits": self.fc(h.mean((2, 3))), "aux": (m, m.amax(1))}


def _shapes(out):
    return [t.shape for t in torch.utils._pytree.tree_leaves(out)]


def _assert_exact(model, x, result):
    """The pruned model equals the original with the removed channels zeroed."""
    gm = group_channels(trace(model, x)).graph_module
    masked = mask_channels(gm, result.pruned.meta["ehap.plan"]).graph_module
    with torch.no_grad():
        got, want = call_with(result.pruned, x), call_with(masked, x)
    for g, w in zip(torch.utils._pytree.tree_leaves(got), torch.utils._pytree.tree_leaves(want)):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


def test_no_data_ranks_by_l1_with_one_warning_at_any_input_size():
    model, x = stem(), torch.randn(2, 3, 40, 48)  # not CIFAR-shaped: once a refusal
    with pytest.warns(UserWarning) as record:
        res = compress(model, x, target=Target(macs=0.5, round_to=1))
    ours = [w for w in record if "compress()" in str(w.message)]
    assert len(ours) == 1 and "data=" in str(ours[0].message) and "L1" in str(ours[0].message)
    assert res.report.ranking[0]["scorer"] == "l1"
    assert res.report.data.startswith("none")
    assert res.report.cost_after["macs_ratio"] <= 0.5
    assert res.pruned(x).shape == (2, 7)
    assert res.report.channels_after["0"] < 16 or res.report.channels_after["3"] < 32
    _assert_exact(model, x, res)


def test_explicit_l1_without_data_is_silent():
    model, x = stem(), torch.randn(1, 3, 24, 24)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        res = compress(model, x, scorer="l1", target=Target(macs=0.7, round_to=1))
    assert res.report.ranking[0]["scorer"] == "l1" and res.report.data.startswith("none")
    # pruned to the target, past it by at most one channel: the costliest, a conv1 channel with
    # its conv2 inputs, 3*9*576 + 32*9*144 = 57,024 of the ~912,600 MACs (0.0625)
    assert 0.7 - 0.0625 <= res.report.cost_after["macs_ratio"] <= 0.7
    _assert_exact(model, x, res)


def test_hessian_without_data_ranks_on_synthetic_inputs_labelled_by_the_model():
    model, x = stem(), torch.randn(1, 3, 20, 20)
    res = compress(model, x, scorer="hessian", hessian=HUTCH, target=Target(macs=0.6, round_to=1))
    assert res.report.data.startswith("synthetic") and "own predictions" in res.report.data
    assert res.report.ranking[0]["scorer"] == "hessian"
    assert res.report.cost_after["macs_ratio"] <= 0.6
    _assert_exact(model, x, res)


@pytest.mark.parametrize("form", ["tuple", "dict", "dict-reordered"])
def test_several_inputs_and_nested_outputs_keep_every_shape(form):
    torch.manual_seed(0)
    model = TwoInputs().eval()
    a, b = torch.randn(2, 3, 12, 12), torch.randn(2, 2, 12, 12)
    x = {"tuple": (a, b), "dict": {"a": a, "b": b}, "dict-reordered": {"b": b, "a": a}}[form]
    with pytest.warns(UserWarning, match="no data"):
        res = compress(model, x, target=Target(macs=0.6, round_to=1))
    with torch.no_grad():
        assert _shapes(call_with(res.pruned, x)) == _shapes(model(a, b))
    after = res.report.channels_after
    assert after["a"] == after["b"] < 16 or after["mid"] < 24  # an inner group was pruned
    assert res.report.channels_after["head"] == 4 and res.report.channels_after["fc"] == 5
    assert res.report.cost_after["macs_ratio"] <= 0.6
    _assert_exact(model, x, res)


def test_segmentation_like_output_with_a_loss_fn():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 3, 1)).eval()
    x = torch.randn(4, 3, 8, 8)
    data = (torch.randn(8, 3, 8, 8), torch.randn(8, 3, 8, 8))  # one (x, y) pair of tensors
    res = compress(model, x, data=data, loss_fn=F.mse_loss, hessian=HUTCH, target=Target(macs=0.6, round_to=1),
                   compensate=None)  # pruned == masked holds before a repair
    assert res.pruned(x).shape == x.shape and res.report.ranking[0]["scorer"] == "hessian"
    _assert_exact(model, x, res)
    synthetic = compress(model, x, loss_fn=F.mse_loss, scorer="hessian", hessian=HUTCH,
                         target=Target(macs=0.6, round_to=1))  # labels: the model's own outputs
    assert synthetic.report.data.startswith("synthetic") and synthetic.pruned(x).shape == x.shape


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)

    def forward(self, x):
        y = self.conv(x)
        if y.sum() > 0:  # control flow on a tensor value: FX cannot trace it
            return y
        return -y


def test_untraceable_model_names_the_fix():
    with pytest.raises(TraceError, match="leaf_modules|concrete_args"):
        compress(DataDependent(), torch.randn(1, 3, 8, 8), scorer="l1")


def test_a_hessian_on_a_non_tensor_output_asks_for_a_loss_fn():
    model = TwoInputs().eval()
    with pytest.raises(EhapError, match="several inputs"):
        compress(model, (torch.randn(1, 3, 8, 8), torch.randn(1, 2, 8, 8)), scorer="hessian")

    class DictOut(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3)

        def forward(self, x):
            return {"out": self.conv(x)}

    with pytest.raises(EhapError, match="loss_fn=") as err:
        compress(DictOut(), torch.randn(1, 3, 8, 8), scorer="hessian")
    assert "dict" in str(err.value) and "scorer='l1'" in str(err.value)


def test_a_loss_that_is_not_a_scalar_is_refused_before_estimating():
    model = stem()
    data = [(torch.randn(8, 3, 16, 16), torch.randint(0, 7, (8,)))]
    per_sample = lambda out, y: F.cross_entropy(out, y, reduction="none")
    with pytest.raises(EhapError, match=r"not a scalar.*\.mean\(\)"):
        compress(model, torch.randn(1, 3, 16, 16), data=data, loss_fn=per_sample, hessian=HUTCH)


def test_forward_arguments_without_a_value_are_named():
    with pytest.raises(TraceError, match=r"needs \['b'\]"):
        compress(TwoInputs(), torch.randn(1, 3, 8, 8), scorer="l1")


@pytest.mark.parametrize(
    "name",
    ["convnext_tiny", pytest.param("shufflenet_v2_x0_5", marks=pytest.mark.slow), pytest.param("swin_t", marks=pytest.mark.slow)],
)
def test_torchvision_models_users_have_prune_exactly(name):
    """ConvNeXt (channels-last MLPs, layer scales, stochastic depth), ShuffleNet (channel
    shuffles) and Swin (token MLPs) with nothing but the call: ≤ 0.55 of the MACs, and the
    pruned model equals the masked original relative to its output's scale."""
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.get_model(name).eval()
    for n, p in model.named_parameters():
        if n.endswith("layer_scale"):  # 1e-6 at init would hide every block from the check
            p.data.uniform_(0.5, 1.5)
    randomize_bn(model)
    x = torch.randn(2, 3, 64, 64)
    with pytest.warns(UserWarning, match="no data"):
        res = compress(model, x)
    assert res.report.cost_after["macs_ratio"] <= 0.55
    gm = group_channels(trace(model, x)).graph_module
    masked = mask_channels(gm, res.pruned.meta["ehap.plan"]).graph_module
    with torch.no_grad():
        got, want = res.pruned(x), masked(x)
    assert got.shape == (2, 1000)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4 * float(want.abs().max()))


def test_default_scorer_with_data_is_the_clis():
    """compress() and the CLI rank with the same default: the removal criterion with data and
    cross-entropy, the paper's trace with a loss_fn (the removal criterion is exact for CE only)."""
    model, x = stem(), torch.randn(1, 3, 16, 16)
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(8, 3, 16, 16, generator=g), torch.randint(0, 7, (8,), generator=g)) for _ in range(2)]
    opts = HessianOptions(dtype="fp32", batch_size=8, progress=False)
    res = compress(model, x, data=data, hessian=opts, target=Target(macs=0.7, round_to=1))
    assert res.report.ranking[0]["scorer"] == "removal" and res.report.target["scorer"] == "removal"
    _assert_exact(model, x, res)
    with_loss = compress(model, x, data=data, hessian=HUTCH, target=Target(macs=0.7, round_to=1),
                   loss_fn=lambda out, y: F.cross_entropy(out, y))
    assert with_loss.report.ranking[0]["scorer"] == "hessian"
