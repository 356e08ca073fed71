"""Compensation pass: each repaired layer is the least-squares fit of the dense layer's output on
the inputs the repaired pruned model itself produces, computed here independently
(``F.unfold`` + ``torch.linalg.lstsq``, float64), layer by layer in graph order.

Model under test (TinyOptionA, a pruned option-A ResNet)::

    x ─▶ conv1' ─▶ bn ─▶ relu ─▶ [conv1' ─▶ bn ─▶ relu ─▶ conv2' ─▶ bn] ─(+ stream)─▶ ... ─▶ fc'
          fitted on x           fitted on the repaired stream          fitted on the pooled stream
"""

import copy
import dataclasses
import time
from dataclasses import replace

import ehap_fx.passes.compensate as compensate_module
import pytest
import torch
import torch.nn.functional as F
from ehap_fx.passes.compensate import CompensateOptions, Compensation, calibration_inputs, compensate
from ehap_fx.passes.group import group_channels, groups_of
from ehap_fx.passes.mask import random_plan
from ehap_fx.passes.shrink import PrunePlan, shrink
from ehap_fx.passes.trace import trace
from torch import fx, nn

from ehap_fx import _meta
from tests.nets import SEDepthwise, TinyOptionA, randomize_bn

EXACT = CompensateOptions(images=10**6, damping=0.0, max_rows=None, relu_rounds=0)  # plain least squares


def values_by_name(gm: fx.GraphModule, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every node's output of ``gm(x)``, by node name."""
    out = {}

    class Record(fx.Interpreter):
        def run_node(self, n):
            out[n.name] = super().run_node(n)
            return out[n.name]

    with torch.no_grad():
        Record(gm).run(x)
    return out


def lstsq_fit(module: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The least-squares weights (and the design matrix) of ``module`` mapping its input ``x`` to
    ``y`` (float64), solved per group with ``torch.linalg.lstsq``: ``(g, K [+1], O/g)``."""
    if isinstance(module, nn.Linear):
        a, b, g = x.reshape(-1, 1, x.shape[-1]), y.reshape(-1, 1, y.shape[-1]), 1
    else:
        g = module.groups
        kernel, dilation, padding, stride = module.kernel_size, module.dilation, _int_padding(module), module.stride
        if x.dim() == 3:  # conv1d: (N, C, L) as (N, C, 1, L)
            x, kernel, dilation = x.unsqueeze(2), (1, *kernel), (1, *dilation)
            padding, stride = (0, *padding), (1, *stride)
        cols = F.unfold(x, kernel, dilation, padding, stride)
        a = cols.transpose(1, 2).reshape(-1, g, cols.shape[1] // g)  # (N·L, g, K)
        b = y.flatten(2).transpose(1, 2).reshape(-1, g, y.shape[1] // g)  # (N·L, g, O/g)
    if module.bias is not None:
        a = torch.cat([a, torch.ones(*a.shape[:2], 1, dtype=a.dtype)], 2)
    a, b = a.transpose(0, 1), b.transpose(0, 1)  # (g, rows, K), (g, rows, O/g)
    return torch.linalg.lstsq(a, b).solution, a


def _int_padding(module: nn.Conv2d) -> tuple[int, ...]:
    """A conv's ``padding`` as ints: ``"valid"`` is 0, ``"same"`` ``d·(k − 1) / 2`` (even here)."""
    if module.padding == "valid":
        return (0,) * len(module.kernel_size)
    if module.padding == "same":
        total = [d * (k - 1) for d, k in zip(module.dilation, module.kernel_size, strict=True)]
        assert all(t % 2 == 0 for t in total)  # F.unfold pads both sides alike
        return tuple(t // 2 for t in total)
    return module.padding


class Conv1dNet(nn.Module):
    """conv a (3 → 8, k 3, padding 1) ─▶ relu ─▶ conv b (8 → 6, k 3, dilation 2, padding 2)
    ─▶ relu ─▶ conv c (6 → 6, k 3, stride 2) ─▶ mean ─▶ fc (6 → 4): sequences, (N, C, L)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv1d(3, 8, 3, padding=1), nn.Conv1d(8, 6, 3, padding=2, dilation=2)
        self.c, self.fc = nn.Conv1d(6, 6, 3, stride=2), nn.Linear(6, 4)

    def forward(self, x):
        return self.fc(self.c(F.relu(self.b(F.relu(self.a(x))))).mean(2))


class SameValid(nn.Module):
    """conv a (3 → 8, 3x3, "same") ─▶ relu ─▶ conv b (8 → 8, 3x3, "valid") ─▶ relu ─▶ conv c
    (8 → 6, 3x3 dilated 2, "same") ─▶ mean ─▶ fc (6 → 4): string paddings."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 3, padding="same"), nn.Conv2d(8, 8, 3, padding="valid")
        self.c, self.fc = nn.Conv2d(8, 6, 3, padding="same", dilation=2), nn.Linear(6, 4)

    def forward(self, x):
        return self.fc(self.c(F.relu(self.b(F.relu(self.a(x))))).mean((2, 3)))


class Asymmetric(nn.Module):
    """conv a (3 → 8, 1x3, padding (0, 1)) ─▶ relu ─▶ conv b (8 → 8, 3x1, stride (2, 1), padding
    (1, 0)) ─▶ relu ─▶ conv c (8 → 6, 3x3, dilation (1, 2), padding (1, 2)) ─▶ mean ─▶ fc (6 → 4):
    each conv's height and width differ in kernel, stride, dilation or padding."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, (1, 3), padding=(0, 1)), nn.Conv2d(8, 8, (3, 1), stride=(2, 1), padding=(1, 0))
        self.c, self.fc = nn.Conv2d(8, 6, 3, padding=(1, 2), dilation=(1, 2)), nn.Linear(6, 4)

    def forward(self, x):
        return self.fc(self.c(F.relu(self.b(F.relu(self.a(x))))).mean((2, 3)))


def as_solution(module: nn.Module) -> torch.Tensor:
    """``module``'s weights (and bias) in ``lstsq_fit``'s layout."""
    o = module.weight.shape[0]
    g = getattr(module, "groups", 1)
    w = module.weight.reshape(g, o // g, -1).transpose(1, 2)  # (g, K, O/g)
    if module.bias is not None:
        w = torch.cat([w, module.bias.reshape(g, 1, o // g)], 1)
    return w


def pruned_pair(make, shape, fraction, seed=0):
    gm = group_channels(trace(randomize_bn(make()).double(), torch.randn(shape, dtype=torch.float64)))
    gm = gm.graph_module
    plan = random_plan(gm, fraction, torch.Generator().manual_seed(seed))
    return gm, shrink(gm, plan).graph_module


def block_target(gm: fx.GraphModule, node: fx.Node, y, got, want):
    """``y`` plus the residual stream's error in ``node``'s output units, where ``node`` feeds
    ``bn`` then ``add(bn, s)``: ``(s_dense − s) / a`` (``a``: the BN's scale); else ``y``."""
    (bn_node,) = node.users
    bn = gm.get_submodule(bn_node.target)
    (add,) = bn_node.users
    (other,) = (a for a in add.args if a is not bn_node)
    s_dense = want[other.name].index_select(1, torch.tensor(other.meta[_meta.KEPT]))
    with torch.no_grad():  # the BN scale of a module whose parameters require grad
        a = (bn.weight / (bn.running_var + bn.eps).sqrt()).reshape(1, -1, 1, 1)
    return y + (s_dense - got[other.name]) / a


@pytest.mark.parametrize("match", ["layer", "block"])
@pytest.mark.parametrize("make,shape,add_bias", [
    (TinyOptionA, (48, 3, 12, 12), False), (SEDepthwise, (384, 3, 8, 8), False), (SameValid, (48, 3, 8, 8), False),
    (Conv1dNet, (48, 3, 16), False), (TinyOptionA, (48, 3, 12, 12), True), (Asymmetric, (48, 3, 8, 8), False)],
    ids=["option-a-resnet", "depthwise-grouped-linear", "same-valid-padding", "conv1d", "option-a-add-bias",
         "asymmetric-convs"])
def test_each_layer_is_the_lstsq_optimum_on_the_repaired_inputs(make, shape, add_bias, match, one_thread):
    """``add_bias``: TinyOptionA's convs have none; each refitted conv gets one, fitted with it."""
    dense, small = pruned_pair(make, shape, 0.5)
    x = torch.randn(shape, dtype=torch.float64)
    options = replace(EXACT, match=match, add_bias=add_bias)
    fixed = compensate(small, dense, [x[: len(x) // 2], x[len(x) // 2 :]], options).graph_module
    fits = fixed.meta[_meta.COMPENSATION].layers
    assert sum(f.repaired for f in fits) >= 3
    got, want = values_by_name(fixed, x), values_by_name(dense, x)
    checked = 0
    for fit in fits:
        node = next(n for n in fixed.graph.nodes if n.name == fit.node)
        module = fixed.get_submodule(node.target)
        y = want[node.name]
        kept = node.meta[_meta.KEPT]
        y = y.index_select(1 if module.weight.dim() > 2 else -1, torch.tensor(kept))
        if match == "block" and node.target.endswith("conv2"):  # TinyOptionA's bn2(conv2) + stream
            y = block_target(fixed, node, y, got, want)
        solution, a = lstsq_fit(module, got[node.args[0].name], y)
        if add_bias and fit.repaired and module.weight.dim() > 2:  # the convs (fc has its bias)
            assert isinstance(module.bias, nn.Parameter) and small.get_submodule(node.target).bias is None
        if not fit.repaired:  # its output already equals the dense one
            torch.testing.assert_close(got[node.name], y, rtol=0, atol=1e-12)
            continue
        # the fitted outputs agree to float64 rounding, amplified by the conditioning of A
        cond = torch.linalg.cond(a).max()
        pred_tol = 64 * torch.finfo(torch.float64).eps * float(cond) * float(y.abs().max())
        torch.testing.assert_close(a @ as_solution(module), a @ solution, rtol=0, atol=pred_tol)
        if torch.linalg.matrix_rank(a).min() == a.shape[-1]:  # a unique optimum: the weights too
            scale = float(solution.abs().max())
            torch.testing.assert_close(as_solution(module), solution, rtol=0,
                                       atol=64 * torch.finfo(torch.float64).eps * float(cond) ** 2 * scale)
            checked += 1
        assert fit.error_after <= fit.error_before
    assert checked >= 2


class ZeroChannels(nn.Module):
    """conv a (8, bias) ─▶ relu ─▶ conv b (8) ─▶ relu ─▶ conv c (6) ─▶ pool ─▶ fc."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 8, 3, padding=1)
        self.c = nn.Conv2d(8, 6, 1)
        self.fc = nn.Linear(6, 4)

    def forward(self, x):
        x = F.relu(self.b(F.relu(self.a(x))))
        return self.fc(self.c(x).mean((2, 3)))


def test_a_layer_whose_removed_inputs_were_exactly_zero_is_unchanged(one_thread):
    model = ZeroChannels()
    with torch.no_grad():  # a's channels 1, 4, 6 are exactly zero: b reads nothing from them
        model.a.weight[[1, 4, 6]] = 0
        model.a.bias[[1, 4, 6]] = 0
    gm = group_channels(trace(model, torch.randn(2, 3, 8, 8))).graph_module
    a_out, b_out = (next(g.id for g in groups_of(gm).prunable if g.members[0].module == m) for m in "ab")
    plan = PrunePlan.removing(groups_of(gm), {a_out: [1, 4, 6], b_out: [0, 3]})  # b's are not zero
    small = shrink(gm, plan).graph_module
    start = time.perf_counter()
    fixed = compensate(small, gm, torch.randn(64, 3, 8, 8)).graph_module
    wall = time.perf_counter() - start
    assert 0 < fixed.meta[_meta.COMPENSATION].seconds <= wall  # the call's own time, not a timing claim
    fits = {f.node: f for f in fixed.meta[_meta.COMPENSATION].layers}
    assert not fits["b"].repaired and fits["c"].repaired
    assert torch.equal(fixed.b.weight, small.b.weight) and torch.equal(fixed.b.bias, small.b.bias)
    assert torch.equal(fixed.a.weight, small.a.weight)
    assert not torch.equal(fixed.c.weight, small.c.weight)
    assert fits["c"].error_after < fits["c"].error_before
    with pytest.raises(dataclasses.FrozenInstanceError):  # the record in the graph's meta is read-only
        fixed.meta[_meta.COMPENSATION].images = 0
    with pytest.raises(dataclasses.FrozenInstanceError):
        fits["c"].repaired = False


def test_inputs_are_left_alone_and_labels_are_not_needed(one_thread):
    dense, small = pruned_pair(TinyOptionA, (4, 3, 12, 12), 0.5)
    dense_sd, small_sd = copy.deepcopy(dense.state_dict()), copy.deepcopy(small.state_dict())
    x = torch.randn(40, 3, 12, 12, dtype=torch.float64)
    labelled = compensate(small, dense, [(x, torch.zeros(40, dtype=torch.long))]).graph_module
    bare = compensate(small, dense, x).graph_module
    for k, v in bare.state_dict().items():
        assert torch.equal(v, labelled.state_dict()[k]), k
    for before, module in ((dense_sd, dense), (small_sd, small)):
        for k, v in module.state_dict().items():
            assert torch.equal(v, before[k]), k
    assert len(calibration_inputs([x[:30], x[30:]], 35)[1]) == 5


def test_calibration_inputs_are_the_first_images_in_batches_of_at_most_256():
    """One tensor of 600 images is cut into batches of 256 (the last short), as is the ``x`` of
    one ``(x, y)`` pair; a list of batches is read until ``images`` are in hand, the batch that
    reaches it cut and none after it taken (not even an empty one)."""
    x, y = torch.randn(600, 2), torch.zeros(600, dtype=torch.long)
    assert [len(b) for b in calibration_inputs(x, 600)] == [256, 256, 88]
    assert [len(b) for b in calibration_inputs((x, y), 520)] == [256, 256, 8]
    got = calibration_inputs([x[:4], (x[4:8], y[4:8]), x[8:12]], 8)
    assert len(got) == 2 and torch.equal(torch.cat(got), x[:8])
    assert [len(b) for b in calibration_inputs([x[:4], x[4:8], x[8:12]], 6)] == [4, 2]


def test_both_captures_give_the_same_repair(one_thread):
    model = randomize_bn(SEDepthwise()).double()
    x = torch.randn(64, 3, 8, 8, dtype=torch.float64)
    results = []
    for capture in ("fx", "export"):
        gm = group_channels(trace(copy.deepcopy(model), x[:2], capture=capture)).graph_module
        plan = PrunePlan({g.id: tuple(range(1, g.size, 2)) or (0,) for g in groups_of(gm).prunable})
        fixed = compensate(shrink(gm, plan).graph_module, gm, x).graph_module
        info: Compensation = fixed.meta[_meta.COMPENSATION]
        assert sum(f.repaired for f in info.layers) >= 3
        results.append(fixed(x))
    torch.testing.assert_close(results[1], results[0], rtol=0, atol=1e-9)


def test_the_repair_brings_the_logits_back(one_thread):
    dense, small = pruned_pair(TinyOptionA, (4, 3, 12, 12), 0.6, seed=1)
    calib, held_out = torch.randn(256, 3, 12, 12, dtype=torch.float64), torch.randn(256, 3, 12, 12,
                                                                                      dtype=torch.float64)
    fixed = compensate(small, dense, calib).graph_module
    with torch.no_grad():
        ref = dense(held_out)
        before, after = (small(held_out) - ref).square().mean(), (fixed(held_out) - ref).square().mean()
    assert after < 0.5 * before


def test_compress_repairs_by_default_on_unlabelled_data(one_thread):
    from ehap_fx.compress import compress
    from ehap_fx.target import Target

    model = randomize_bn(TinyOptionA())
    gen = torch.Generator().manual_seed(0)
    calib, held_out = torch.randn(256, 3, 12, 12, generator=gen), torch.randn(256, 3, 12, 12, generator=gen)
    with torch.no_grad():
        eval_data = [(held_out, model(held_out).argmax(1))]  # top-1 = agreement with the dense model
    batches = list(calib.split(64))  # images alone: no labels anywhere
    target = Target(macs=0.6, round_to=1)
    on = compress(model, calib[:1], data=batches, eval_data=eval_data, target=target)
    off = compress(model, calib[:1], data=batches, eval_data=eval_data, target=target, compensate=None)
    acc = on.report.accuracy
    assert acc["dense"] == 100.0 and acc["pruned"] == off.report.accuracy["pruned"]
    assert acc["compensated"] >= acc["pruned"]
    with torch.no_grad():
        ref = model(held_out)
        before, after = ((m(held_out) - ref).square().mean() for m in (off.pruned, on.pruned))
    assert after < 0.5 * before
    assert on.report.compensation["images"] == 256 and on.report.compensation["layers_repaired"] >= 3
    assert on.report.compensation["recipe"] == "post-training (no fine-tune)"
    assert "compensated" not in off.report.accuracy and off.report.compensation is None


def test_the_cli_repairs_as_compress_does_and_can_be_told_not_to():
    import inspect

    from ehap_fx import cli
    from ehap_fx.compress import compress

    default = inspect.signature(compress).parameters["compensate"].default
    for flags, want in (([], default), (["--no-compensate"], None),
                        (["--compensate-images", "256"], CompensateOptions(images=256))):
        args = cli.build_parser().parse_args(["compress", "--data", "somewhere", *flags])
        cli.resolve_defaults(args)
        assert cli.compress_options(args).compensate == want


def test_solve_raises_the_damping_tenfold_until_the_factorisation_succeeds():
    """``H = diag(1, -1e-3)`` (rounding can leave a Gram matrix that indefinite): with
    ``damping=1e-4`` Cholesky fails at ``λ = 5e-5`` and ``5e-4`` and succeeds at ``5e-3``, so the
    result is ``(H + 5e-3·I)⁻¹ R``; a damping that shrank on failure would never get there."""
    from ehap_fx.passes.compensate import solve

    h = torch.diag(torch.tensor([1.0, -1e-3], dtype=torch.float64))[None]  # (g=1, 2, 2)
    r = torch.ones(1, 2, 1, dtype=torch.float64)
    lam = 1e-4 * 0.4995 * 100  # damping · mean(diag H), raised twice
    want = torch.tensor([[[1 / (1 + lam)], [1 / (-1e-3 + lam)]]], dtype=torch.float64)
    torch.testing.assert_close(solve(h, r, 1e-4), want)


def test_the_summary_averages_the_repaired_layers_to_six_decimals():
    """The report's mean errors: over the repaired layers only (an exact layer is no repair),
    rounded to 6 decimals as the report prints them."""
    from ehap_fx.passes.compensate import LayerFit

    fits = (LayerFit("a", 10, 4, 1, 0.1234564, 0.0000014, True),
            LayerFit("b", 10, 4, 1, 0.2, 0.0000002, True),
            LayerFit("c", 10, 4, 1, 0.0, 0.0, False))
    s = Compensation(fits, images=8, seconds=1.23456, accumulator_bytes=64).summary()
    assert s["mean_error_before"] == 0.161728 and s["mean_error_after"] == 0.000001
    assert s["seconds"] == 1.235 and s["images"] == 8
    assert Compensation(fits[2:], 8, 0.0, 0).summary()["mean_error_before"] is None


class _TwoBranches(nn.Module):
    """x ─▶ conv0 (3 → 8) ─▶ relu ─▶ conv_s (8 → 4) ─┐
       x ─▶ conv_b (3 → 4) ─▶ bn ──────────────────── + ─▶ out"""

    def __init__(self, affine: bool = True):
        super().__init__()
        self.conv0, self.conv_s = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 4, 1)
        self.conv_b, self.bn = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4, affine=affine)

    def forward(self, x):
        return self.conv_s(torch.relu(self.conv0(x))) + self.bn(self.conv_b(x))


def test_block_matching_refits_a_layer_whose_own_output_is_unchanged(one_thread):
    """Pruning conv0 changes conv_s's inputs, and its refit leaves an error on the sum; conv_b
    reads the unchanged input and outputs what it did, yet under ``match="block"`` it is refitted
    to take the other branch's error (``layer`` matching leaves it alone)."""
    torch.manual_seed(0)
    x = torch.randn(64, 3, 6, 6, dtype=torch.float64)
    dense = group_channels(trace(randomize_bn(_TwoBranches()).eval().double(), x[:2])).graph_module
    (g,) = [g for g in groups_of(dense).prunable if g.size == 8]  # conv0's channels
    small = shrink(dense, PrunePlan({g.id: (0, 2, 4, 6)})).graph_module
    fits = {}
    for match in ("layer", "block"):
        fixed = compensate(small, dense, x, replace(EXACT, match=match)).graph_module
        fits[match] = {f.node: f for f in fixed.meta[_meta.COMPENSATION].layers}
    assert fits["layer"]["conv_s"].repaired and not fits["layer"]["conv_b"].repaired
    b = fits["block"]["conv_b"]
    assert b.repaired and b.error_after < b.error_before


@pytest.mark.parametrize("edge", [{"images": 1}, {"damping": 0.0}, {"max_rows": 1}, {"max_rows": None},
                                  {"match": "layer"}, {"match": "block"}])
def test_options_accept_each_range_up_to_its_edge(edge):
    """The smallest valid value of each option is taken as given (one image, no damping, one row)."""
    options = CompensateOptions(**edge)
    assert all(getattr(options, k) == v for k, v in edge.items())


@pytest.mark.parametrize("edge, match", [({"images": 0}, "images=0"), ({"damping": -1e-9}, "damping="),
                                         ({"max_rows": 0}, "max_rows=0"), ({"match": "logits"}, "match='logits'")])
def test_options_refuse_a_value_past_its_edge_naming_it(edge, match):
    with pytest.raises(ValueError, match=match):
        CompensateOptions(**edge)


def test_a_batch_of_max_rows_rows_is_used_whole_and_the_accumulators_are_reported(one_thread):
    """``max_rows`` at the rows per batch of convs b and c (16·6·6): their rows are taken whole,
    so the repair is bit for bit the one without a cap (a's 16·8·8 rows are sampled, but a reads
    the unpruned input: nothing to fit). The report's accumulator bytes are the largest layer's
    ``H`` and ``R`` in float64: ``8·g·(K + 1)·(K + 1 + O/g)``."""
    dense, small = pruned_pair(SameValid, (16, 3, 8, 8), 0.5)
    x = torch.randn(32, 3, 8, 8, dtype=torch.float64)
    batches = [x[:16], x[16:]]
    uncapped = compensate(small, dense, batches, EXACT).graph_module
    capped = compensate(small, dense, batches, replace(EXACT, max_rows=16 * 6 * 6)).graph_module
    for name, p in uncapped.named_parameters():
        assert torch.equal(p, capped.get_parameter(name)), name
    report = uncapped.meta[_meta.COMPENSATION]
    fits = [f for f in report.layers if f.rows]
    assert {f.node for f in fits} == {"a", "b", "c", "fc"} and all(f.groups == 1 for f in fits)
    outs = {f.node: uncapped.get_submodule(f.node).weight.shape[0] for f in fits}
    assert report.accumulator_bytes == max(8 * (f.columns + 1) * (f.columns + 1 + outs[f.node]) for f in fits)


def test_the_pass_in_a_pass_manager_is_compensate(one_thread):
    """``Compensate(dense, data, options)`` in a ``PassManager`` repairs as ``compensate`` does."""
    from ehap_fx.passes.compensate import Compensate
    from torch.fx.passes.infra.pass_manager import PassManager

    dense, small = pruned_pair(SameValid, (16, 3, 8, 8), 0.5)
    x = torch.randn(32, 3, 8, 8, dtype=torch.float64)
    want = compensate(copy.deepcopy(small), dense, x, EXACT).graph_module
    got = PassManager([Compensate(dense, x, EXACT)])(copy.deepcopy(small)).graph_module
    for name, p in want.named_parameters():
        assert torch.equal(p, got.get_parameter(name)), name
    assert [f.node for f in got.meta[_meta.COMPENSATION].layers] == ["a", "b", "c", "fc"]


@pytest.mark.parametrize("affine", [True, False])
def test_block_matching_fits_the_other_branch_to_the_streams_error_in_its_units(affine, one_thread):
    """conv_b's target is its dense output plus the sum's remaining error ``s_dense − s`` (conv_s
    refitted first) divided by the BN scale ``a = γ / √(var + ε)`` (``γ = 1`` without an affine
    BN): the fit equals ``lstsq`` on that target."""
    torch.manual_seed(0)
    x = torch.randn(64, 3, 6, 6, dtype=torch.float64)
    dense = group_channels(trace(randomize_bn(_TwoBranches(affine)).eval().double(), x[:2])).graph_module
    (g,) = [g for g in groups_of(dense).prunable if g.size == 8]
    small = shrink(dense, PrunePlan({g.id: (0, 2, 4, 6)})).graph_module
    fixed = compensate(small, dense, x, replace(EXACT, match="block")).graph_module
    got, want = values_by_name(fixed, x), values_by_name(dense, x)
    bn = fixed.bn
    with torch.no_grad():
        a = (bn.weight if affine else 1) / (bn.running_var + bn.eps).sqrt()
    y = want["conv_b"] + (want["conv_s"] - got["conv_s"]) / a.reshape(1, -1, 1, 1)
    solution, design = lstsq_fit(fixed.conv_b, x, y)
    cond = float(torch.linalg.cond(design).max())
    tol = 64 * torch.finfo(torch.float64).eps * cond * float(y.abs().max())
    torch.testing.assert_close(design @ as_solution(fixed.conv_b).detach(), design @ solution, rtol=0, atol=tol)


class _OddStream(nn.Module):
    """x ─▶ conv0 (3 → 8) ─▶ relu ─▶ h ─▶ conv_b (8 → 8) ─▶ bn ─▶ + s ─▶ relu ─▶ conv_c (8 → 4),
    ``s`` no residual stream of conv_b's shape: h's spatial mean ``(N, 8, 1, 1)``, broadcast over
    the positions, or ``x.size(2)``, a number. Or ``s = h``, a stream, but conv_b reaches it
    through a module that is no BatchNorm: an ``nn.ReLU``."""

    def __init__(self, stream: str):
        super().__init__()
        self.stream = stream
        self.conv0, self.conv_b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.bn, self.conv_c = nn.BatchNorm2d(8), nn.Conv2d(8, 4, 1)
        self.after_b = nn.ReLU() if stream == "relu-module" else self.bn

    def forward(self, x):
        h = torch.relu(self.conv0(x))
        s = {"broadcast": lambda: h.mean((2, 3), keepdim=True), "number": lambda: x.size(2)}.get(self.stream, lambda: h)()
        return self.conv_c(torch.relu(self.after_b(self.conv_b(h)) + s))


@pytest.mark.parametrize("stream", ["broadcast", "number", "relu-module"])
def test_block_matching_fits_a_conv_added_to_no_stream_of_its_shape_as_layer_matching_does(stream, one_thread):
    """A broadcast mean or a number added after conv_b's BN is no per-position error for conv_b
    to take, and a stream reached through a ReLU module is no BN's affine output, which the
    error is scaled back through: ``match="block"`` repairs the model exactly as
    ``match="layer"`` does."""
    torch.manual_seed(0)
    x = torch.randn(32, 3, 6, 6, dtype=torch.float64)
    dense = group_channels(trace(randomize_bn(_OddStream(stream)).eval().double(), x[:2])).graph_module
    (g,) = [g for g in groups_of(dense).prunable if any(m.module == "conv0" for m in g.members)]
    small = shrink(dense, PrunePlan.removing(groups_of(dense), {g.id: [1, 2, 5]})).graph_module
    layer, block = (compensate(small, dense, x, replace(EXACT, match=m)).graph_module for m in ("layer", "block"))
    assert {f.node for f in block.meta[_meta.COMPENSATION].layers if f.repaired} >= {"conv_b", "conv_c"}
    for name, p in layer.named_parameters():
        assert torch.equal(p, block.get_parameter(name)), name


def test_each_fit_reports_the_rows_and_columns_it_was_fitted_on(one_thread):
    """ZeroChannels with a keeping 5 of 8 channels and b 6 of 8, over two batches (5 and 3
    images of 8x8): b and c fit one row per output position (8·64 = 512), b on 5·3·3 = 45 columns
    plus its bias, c on 6; fc one row per image (8) on c's 6 features. a reads the unpruned input:
    its 512 rows on 3·3·3 = 27 columns have no error, and it is left alone. ``max_rows=100`` takes
    100 rows of each conv batch."""
    torch.manual_seed(0)
    model = ZeroChannels()
    gm = group_channels(trace(model, torch.randn(2, 3, 8, 8))).graph_module
    a_out, b_out = (next(g.id for g in groups_of(gm).prunable if g.members[0].module == m) for m in "ab")
    small = shrink(gm, PrunePlan.removing(groups_of(gm), {a_out: [1, 4, 6], b_out: [0, 3]})).graph_module
    x = torch.randn(8, 3, 8, 8)
    data = [x[:5], x[5:]]
    fits = {f.node: f for f in compensate(small, gm, data).graph_module.meta[_meta.COMPENSATION].layers}
    assert {n: (f.rows, f.columns, f.groups, f.repaired) for n, f in fits.items()} == {
        "a": (512, 27, 1, False), "b": (512, 45, 1, True), "c": (512, 6, 1, True), "fc": (8, 6, 1, True)}
    capped = compensate(small, gm, data, CompensateOptions(max_rows=100)).graph_module
    rows = {f.node: f.rows for f in capped.meta[_meta.COMPENSATION].layers}
    assert rows == {"a": 200, "b": 200, "c": 200, "fc": 8}


def test_a_layer_a_second_shrink_left_alone_is_not_fitted_and_reports_no_rows(one_thread):
    """A twice-shrunk ZeroChannels compensated against the once-shrunk graph (a at 5 of 8
    channels in both; b from 8 to 6 in the second): a keeps the channels it kept and reads the
    same input, so nothing is fitted (0 rows, 0 columns) and its tensors stay as they were; b
    reads the same input but lost output channels, so it is fitted on its 8·64 = 512 rows and
    5·3·3 = 45 columns, with no error to remove; c and fc are repaired. An unshrunk copy fits nothing, so holds no
    accumulators."""
    torch.manual_seed(0)
    gm = group_channels(trace(ZeroChannels(), torch.randn(2, 3, 8, 8))).graph_module
    a_out = next(g.id for g in groups_of(gm).prunable if g.members[0].module == "a")
    once = shrink(gm, PrunePlan.removing(groups_of(gm), {a_out: [1, 4, 6]})).graph_module
    b_out = next(g.id for g in groups_of(once).prunable if g.members[0].module == "b")
    twice = shrink(once, PrunePlan.removing(groups_of(once), {b_out: [0, 3]})).graph_module
    fixed = compensate(twice, once, torch.randn(8, 3, 8, 8)).graph_module
    fits = {f.node: f for f in fixed.meta[_meta.COMPENSATION].layers}
    assert (fits["a"].rows, fits["a"].columns, fits["a"].groups, fits["a"].repaired) == (0, 0, 1, False)
    assert fits["a"].error_before == fits["a"].error_after == 0.0
    assert (fits["b"].rows, fits["b"].columns, fits["b"].repaired) == (512, 45, False)
    assert fits["c"].repaired and fits["fc"].repaired
    assert torch.equal(fixed.a.weight, twice.a.weight) and torch.equal(fixed.a.bias, twice.a.bias)
    alone = compensate(copy.deepcopy(gm), gm, torch.randn(8, 3, 8, 8)).graph_module.meta[_meta.COMPENSATION]
    assert {f.rows for f in alone.layers} == {0} and alone.accumulator_bytes == 0  # an unshrunk copy: no fit


class _ConvBnRelu(nn.Module):
    """conv a (3 → 8) ─▶ relu ─▶ conv b (8 → 8) ─▶ bn ─▶ relu ─▶ mean ─▶ fc (8 → 4); with
    ``stream``, bn's output is added to ``s = conv_s(relu(conv_0(x)))`` before that relu."""

    def __init__(self, stream: bool = False):
        super().__init__()
        self.a, self.b, self.bn, self.fc = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3), nn.BatchNorm2d(8), \
            nn.Linear(8, 4)
        self.stream = stream
        if stream:
            self.conv_0, self.conv_s = nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 1)

    def forward(self, x):
        s = self.conv_s(F.relu(self.conv_0(x))) if self.stream else None  # fitted first: conv b takes the sum's error
        h = self.bn(self.b(F.relu(self.a(x))))
        return self.fc(F.relu(h + s if self.stream else h).mean((2, 3)))


@pytest.mark.parametrize("stream", [False, True], ids=["bn-relu", "bn-add-relu"])
def test_relu_rounds_lower_the_loss_the_relu_sees_round_after_round(stream, one_thread, monkeypatch):
    """``relu_rounds`` refits a conv that feeds BN then ReLU (conv b, after half of conv a's
    channels went; with ``stream``, BN then ``+ s`` then ReLU, conv b fitted to the sum) to the
    loss the activation sees: ``Σ (y − f)²`` where the ReLU passes the target and
    ``Σ ((a·f + c + s)₊ / a)²`` (a fit crossing the threshold) where it zeroes it, ``a``, ``c``
    the BN's scale and shift. Each round is a majorize-minimize step: the loss, computed here
    from the graph's values, never rises from one round count to the next, and falls."""
    torch.manual_seed(0)
    x = torch.randn(32, 3, 8, 8, dtype=torch.float64)
    dense = group_channels(trace(randomize_bn(_ConvBnRelu(stream)).eval().double(), x[:2])).graph_module
    (g,) = [g for g in groups_of(dense).prunable if "a" in {m.node for m in g.members}]
    small = shrink(dense, PrunePlan({g.id: (0, 2, 4, 6)})).graph_module
    want = values_by_name(dense, x)
    bn = dense.bn
    with torch.no_grad():
        a = (bn.weight / (bn.running_var + bn.eps).sqrt()).reshape(1, -1, 1, 1)
        c = bn.bias.reshape(1, -1, 1, 1) - a * bn.running_mean.reshape(1, -1, 1, 1)
    s = want["conv_s"] if stream else 0  # conv_0 and conv_s keep every channel: s is as dense
    live = a * want["b"] + c + s > 0
    losses, inputs = [], []
    for rounds in range(5):
        fixed = compensate(small, dense, x, replace(EXACT, relu_rounds=rounds)).graph_module
        got = values_by_name(fixed, x)
        inputs.append(got["a"])
        assert torch.equal(inputs[-1], inputs[0])  # conv b's inputs are the same in every run
        f = got["b"]
        if stream:
            assert torch.equal(got["conv_s"], want["conv_s"])
        losses.append(float(torch.where(live, want["b"] - f, (a * f + c + s).clamp_min(0) / a).square().sum()))
    assert all(after <= before * (1 + 1e-9) for before, after in zip(losses, losses[1:])), losses
    assert losses[-1] < 0.995 * losses[0], losses
    # the rows each round reads are kept between rounds up to a memory budget, computed again past it
    monkeypatch.setattr(compensate_module, "RELU_CACHE_BYTES", 0)
    again = compensate(small, dense, x, replace(EXACT, relu_rounds=4)).graph_module
    assert torch.equal(again.b.weight, fixed.b.weight) and torch.equal(again.b.bias, fixed.b.bias)


def test_mirror_fits_on_each_image_and_its_mirror_image(one_thread):
    """``mirror=True`` is the repair on the calibration images followed by their left-right
    mirrors, bit for bit; the report still counts the images, not the views."""
    dense, small = pruned_pair(TinyOptionA, (16, 3, 12, 12), 0.5)
    x = torch.randn(16, 3, 12, 12, dtype=torch.float64)
    options = replace(EXACT, relu_rounds=2)
    mirrored = compensate(small, dense, [x], replace(options, mirror=True)).graph_module
    by_hand = compensate(small, dense, [x, x.flip(3)], replace(options, images=32)).graph_module
    plain = compensate(small, dense, [x], options).graph_module
    for name, p in mirrored.named_parameters():
        torch.testing.assert_close(p, dict(by_hand.named_parameters())[name], rtol=0, atol=0)
    assert any(not torch.equal(p, dict(plain.named_parameters())[n]) for n, p in mirrored.named_parameters())
    assert mirrored.meta[_meta.COMPENSATION].images == 16
