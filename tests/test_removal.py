"""Removal sensitivity (``ehap_fx.scoring.removal``): ½ δᵀGδ for removing each group channel.

Checked against two independent references: the exact Hessian of a tiny ReLU net
(``torch.func.hessian``; within one layer H = G for piecewise-linear nets), and forward-mode
``J δ`` on ResNet-20, whose residual-stream groups are read by many convs at once (the cross
terms that HAP's per-member sum leaves out).
"""

import copy
import dataclasses
import time

import pytest
import torch
import torch.nn.functional as F
from ehap_fx.passes.depth import droppable_groups
from ehap_fx.passes.group import group_channels, groups_of
from ehap_fx.passes.trace import trace
from scipy.stats import spearmanr
from torch import nn
from torch.func import functional_call, hessian, jvp

from ehap_fx.compress import compress
from ehap_fx.data import synthetic_cifar
from ehap_fx.errors import EhapError, MemoryBudgetError
from ehap_fx.models import get_model
from ehap_fx.scoring import Ranking
from ehap_fx.scoring.budget import fmt_bytes
from ehap_fx.scoring.options import HessianOptions
from ehap_fx.scoring.removal import choose_removal, estimate_removal, joint_order
from ehap_fx.target import Target, select_plan

FP32 = HessianOptions(dtype="fp32", batch_size=16, progress=False)


pytestmark = pytest.mark.usefixtures("one_thread")


def grouped(net: nn.Module, x: torch.Tensor):
    gm = group_channels(trace(copy.deepcopy(net).eval(), x[:2])).graph_module
    return gm, groups_of(gm).prunable


def removal_direction(gm, group, c) -> dict[str, torch.Tensor]:
    """Minus the input slices of every consumer that reads channel ``c`` of ``group``."""
    params = dict(gm.named_parameters())
    out = {}
    for m in group.members:
        if m.role == "in":
            name = f"{m.module}.weight"
            w = params[name].detach()
            d = out.setdefault(name, torch.zeros_like(w))
            i = m.index[c].unique()
            d[:, i] = -w[:, i]
    return out


def tiny_relu() -> nn.Module:
    torch.manual_seed(3)
    net = nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Conv2d(4, 4, 3, padding=1, groups=2), nn.ReLU(),  # grouped: channel i of both groups
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3),
    )
    with torch.no_grad():
        net[1].running_mean.uniform_(-0.2, 0.2)
        net[1].running_var.uniform_(0.5, 1.5)
        for m in (net[0], net[3], net[7]):
            m.weight.mul_(2.0)
    return net.eval()


def test_tiny_relu_net_matches_exact_hessian_quadratic_form():
    torch.manual_seed(0)
    x, y = torch.randn(16, 2, 5, 5), torch.randint(0, 3, (16,))
    gm, groups = grouped(tiny_relu(), x)
    result = estimate_removal(gm, (x, y), groups, FP32)
    params = {n: p.detach() for n, p in gm.named_parameters()}
    checked = 0
    for g in groups:
        for c in range(g.size):
            delta = removal_direction(gm, g, c)
            (name,) = delta  # one consumer layer per group in this net
            w0 = params[name]

            def loss(w, name=name):
                return F.cross_entropy(functional_call(gm, {**params, name: w}, (x,)), y)

            h = hessian(loss)(w0).reshape(w0.numel(), w0.numel())
            d = delta[name].flatten()
            exact = 0.5 * float(d @ h @ d)
            assert result.scores[g.id][c].item() == pytest.approx(exact, rel=1e-4, abs=1e-9)
            checked += 1
    assert checked == sum(g.size for g in groups) >= 4


@pytest.fixture(scope="module")
def resnet20_removal():
    """ResNet-20 with mild BN statistics, 16 random images, and its removal scores."""
    torch.manual_seed(0)
    net = get_model("resnet20").eval()
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_var.uniform_(0.5, 1.5)
            m.bias.data.normal_(0, 0.1)
    x, y = torch.randn(16, 3, 32, 32), torch.randint(0, 10, (16,))
    gm, groups = grouped(net, x)
    return gm, groups, x, estimate_removal(gm, (x, y), groups, FP32)


def forward_mode_reference(gm, x, delta: dict[str, torch.Tensor]) -> float:
    """½ δᵀGδ from forward-mode ``J δ``: ½ mean_n (E_p[(Jδ)²] − E_p[Jδ]²)."""
    params = {n: p.detach() for n, p in gm.named_parameters()}
    prob = functional_call(gm, params, (x,)).softmax(-1)
    _, jd = jvp(lambda p: functional_call(gm, {**params, **p}, (x,)),
                ({k: params[k] for k in delta},), (delta,))
    return float(0.5 * ((prob * jd**2).sum(-1) - (prob * jd).sum(-1) ** 2).mean())


def test_resnet20_stream_groups_match_forward_mode_reference(resnet20_removal):
    gm, groups, x, result = resnet20_removal
    streams = [g for g in groups if sum(m.role == "in" for m in g.members) > 1]
    assert len(streams) >= 2  # option-A stage streams, read by several convs and the head
    for g in [*streams, groups[1], groups[-2]]:
        for c in (0, g.size - 1):
            ref = forward_mode_reference(gm, x, removal_direction(gm, g, c))
            assert result.scores[g.id][c].item() == pytest.approx(ref, rel=1e-3)


def test_whole_group_score_includes_cross_terms(resnet20_removal):
    # removing all of a group at once: the residual-block inner groups that depth pruning
    # drops, and a stream group; δ summed over the channels
    gm, groups, x, result = resnet20_removal
    dropped = droppable_groups(gm)
    stream = max(groups, key=lambda g: sum(m.role == "in" for m in g.members))
    for g in [g for g in groups if g.id in dropped][:2] + [stream]:
        delta = {}
        for c in range(g.size):
            for k, v in removal_direction(gm, g, c).items():
                delta[k] = delta.get(k, 0) + v  # the channels' slices are disjoint
        ref = forward_mode_reference(gm, x, delta)
        assert result.whole[g.id] == pytest.approx(ref, rel=1e-3)
        assert result.whole[g.id] != pytest.approx(float(result.scores[g.id].sum()), rel=0.05)


def test_joint_matrix_gives_the_loss_of_removing_any_set_together(resnet20_removal):
    gm, groups, x, result = resnet20_removal
    stream = max(groups, key=lambda g: sum(m.role == "in" for m in g.members))
    for g in (stream, groups[1]):
        chosen = torch.randperm(g.size, generator=torch.Generator().manual_seed(g.id))[: g.size // 3]
        delta = {}
        for c in chosen.tolist():
            for k, v in removal_direction(gm, g, c).items():
                delta[k] = delta.get(k, 0) + v
        indicator = torch.zeros(g.size)
        indicator[chosen] = 1
        q = result.joint[g.id]
        assert float(indicator @ q @ indicator) == pytest.approx(forward_mode_reference(gm, x, delta), rel=1e-3)
        assert torch.equal(q.diagonal(), result.scores[g.id])


def test_joint_order_removes_greedily_by_the_joint_loss():
    # channels 0 and 1 cost little alone but add up (strongly correlated); 2 costs more alone
    q = torch.tensor([[1.0, 0.9, 0.0], [0.9, 1.1, 0.0], [0.0, 0.0, 1.5]])
    order = joint_order(q)
    assert order.tolist() == [0.0, 2.0, 1.0]  # 0 first; then 2 (adds 1.5) before 1 (adds 1.1 + 1.8)
    assert joint_order(torch.diag(torch.tensor([3.0, 1.0, 2.0]))).tolist() == [2.0, 0.0, 1.0]  # no cross terms: by diagonal


def test_bf16_ranks_like_fp32():
    torch.manual_seed(0)
    x, y = torch.randn(32, 3, 32, 32), torch.randint(0, 10, (32,))
    gm, groups = grouped(get_model("resnet20"), x)
    a = estimate_removal(gm, (x, y), groups, HessianOptions(dtype="fp32", batch_size=32, progress=False))
    b = estimate_removal(gm, (x, y), groups, HessianOptions(dtype="bf16", batch_size=32, progress=False))
    assert b.dtype == "bf16"
    flat = [torch.cat([r.scores[g.id] for g in groups]) for r in (a, b)]
    assert spearmanr(flat[0], flat[1]).statistic > 0.95


def test_per_cost_ranking_prunes_the_channels_that_save_most_per_unit_of_score():
    # group 1 (conv a's outputs) lives at 16x16, group 2 (conv b's) at 4x4: a channel of
    # group 1 saves far more MACs. Group 2 scores a little lower, so a plain ranking takes it
    # first; per cost, group 1 goes first.
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(4),
                        nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 1))
    gm, groups = grouped(net, torch.randn(2, 3, 16, 16))
    first, second = groups
    scores = {first.id: torch.ones(8), second.id: torch.full((8,), 0.9)}
    target = Target(macs=0.9, round_to=1)
    plain = select_plan(gm, scores, target)
    per_cost = select_plan(gm, Ranking(scores, per_cost=True), target)
    assert set(plain.keep) == {second.id}
    assert set(per_cost.keep) == {first.id}


def test_rank_gives_each_scorer_its_scores_and_only_removal_ranks_per_cost():
    """``rank``: the removal criterion's loss units rank per unit of cost (its ``whole`` the group
    sums), the Hessian's scores are plain with standard errors, L1 is the magnitude control;
    removal refuses a custom loss, and an unknown scorer is a ``ValueError``."""
    from ehap_fx.scoring.ranking import magnitude_scores, rank

    torch.manual_seed(0)
    x, y = torch.randn(16, 2, 5, 5), torch.randint(0, 3, (16,))
    gm, groups = grouped(tiny_relu(), x)
    removal = rank(gm, (x, y), "removal", FP32)
    assert removal.per_cost and removal.summary["scorer"] == "removal" and removal.summary["method"] == "exact"
    assert removal.whole == removal.result.whole and removal.scores is removal.result.scores
    hessian = rank(gm, (x, y), "hessian", dataclasses.replace(FP32, estimator="hutchinson", probes=2))
    assert not hessian.per_cost and hessian.whole is None and hessian.summary["scorer"] == "hessian"
    assert set(hessian.stderr) == set(hessian.scores) == {g.id for g in groups}
    l1 = rank(gm, None, "l1")
    assert not l1.per_cost and l1.summary == {"scorer": "l1"}
    assert all(torch.equal(l1.scores[g], s) for g, s in magnitude_scores(gm).items())
    with pytest.raises(EhapError, match="scorer='removal' is exact for cross-entropy only"):
        rank(gm, (x, y), "removal", FP32, loss_fn=F.cross_entropy)
    with pytest.raises(ValueError, match="scorer='taylor' must be one of"):
        rank(gm, (x, y), "taylor")


def test_compress_with_removal_scorer_meets_the_target():
    torch.manual_seed(0)
    model = get_model("resnet20")
    loader = synthetic_cifar(64, seed=0).loader(32)
    x = torch.zeros(2, 3, 32, 32)
    res = compress(model, x, data=loader, target=Target(macs=0.6, round_to=1), scorer="removal",
                   hessian=HessianOptions(dtype="fp32", batch_size=32, progress=False))
    assert res.report.ranking[0]["estimator"] == "removal"
    assert 0.55 < res.report.cost_after["macs_ratio"] <= 0.6
    with pytest.raises(EhapError, match="cross-entropy"):
        compress(model, x, data=loader, scorer="removal", loss_fn=F.cross_entropy)


def test_joint_order_takes_the_least_quadratic_form_at_every_step():
    # the oracle: 1_Sᵀ Q 1_S computed outright for each candidate set, no incremental sums
    g = torch.Generator().manual_seed(0)
    a = torch.randn(6, 6, generator=g)
    q = a @ a.T / 6 - 0.3 * torch.eye(6)  # cross terms of both signs, not a diagonal
    position = joint_order(q)
    removed: list[int] = []
    for step in range(6):
        loss = {c: float(q[removed + [c]][:, removed + [c]].sum()) for c in range(6) if c not in removed}
        best = min(loss, key=loss.get)
        assert position[best] == step, (step, loss)
        removed.append(best)
    # the 2 of 2·Q[S, c] counts both off-diagonal entries: 1.2 + 2·0.04 < 1.3 < 1.2 + 3·0.04
    q = torch.tensor([[1.0, 0.04, 0.0], [0.04, 1.2, 0.0], [0.0, 0.0, 1.3]])
    assert joint_order(q).tolist() == [0.0, 1.0, 2.0]
    # ties go to the lower index (argmin's first minimum)
    assert joint_order(torch.eye(3)).tolist() == [0.0, 1.0, 2.0]


def test_the_removal_matrices_must_fit_half_the_memory_budget():
    torch.manual_seed(0)
    x, y = torch.randn(16, 2, 5, 5), torch.randint(0, 3, (16,))
    gm, groups = grouped(tiny_relu(), x)
    matrices = 8 * sum(g.size**2 for g in groups)  # fp32: the running sum and one batch's, per group
    budget = 2 * matrices - 2  # half of it is one byte short
    with pytest.raises(MemoryBudgetError, match=rf"matrix per group: {fmt_bytes(matrices)} for these "
                                                rf"{len(groups)} groups > half of {fmt_bytes(budget)}"):
        choose_removal(gm, (x, y), groups, dataclasses.replace(FP32, memory_budget=budget))
    try:  # exactly half: the matrices fit (whatever else the tiny budget refuses)
        choose_removal(gm, (x, y), groups, dataclasses.replace(FP32, memory_budget=2 * matrices))
    except MemoryBudgetError as e:
        assert "matrix per group" not in str(e)
    # the plan choose_removal names is the one estimate_removal follows
    plan = choose_removal(gm, (x, y), groups, FP32)
    start = time.perf_counter()
    result = estimate_removal(gm, (x, y), groups, FP32)
    wall = time.perf_counter() - start
    assert (plan.estimator, result.method, result.choice) == ("ggn", "exact", plan.reason)
    assert 0 < result.seconds <= wall  # the call's own time, not a timing claim
    with pytest.raises(dataclasses.FrozenInstanceError):
        result.scores = {}
    assert choose_removal(gm, (x, y), groups, dataclasses.replace(FP32, estimator="mc")).estimator == "mc"


def test_mc_removal_draws_min_probes_labels_unless_told():
    torch.manual_seed(0)
    x, y = torch.randn(16, 2, 5, 5), torch.randint(0, 3, (16,))
    gm, groups = grouped(tiny_relu(), x)
    mc = dataclasses.replace(FP32, estimator="mc", min_probes=3)
    by_default, three, two = (estimate_removal(gm, (x, y), groups, dataclasses.replace(mc, mc_samples=n))
                              for n in (None, 3, 2))
    assert by_default.method == three.method == "mc"
    for g in groups:  # the same seeded draws: equal to the last bit with 3, not with 2
        assert torch.equal(by_default.joint[g.id], three.joint[g.id])
        assert not torch.equal(by_default.joint[g.id], two.joint[g.id])


def test_exact_removal_averages_over_batches():
    # ½ δᵀGδ is a mean over samples: two batches of 8 give what one batch of 16 gives
    torch.manual_seed(0)
    x, y = torch.randn(16, 2, 5, 5), torch.randint(0, 3, (16,))
    gm, groups = grouped(tiny_relu(), x)
    one = estimate_removal(gm, (x, y), groups, dataclasses.replace(FP32, n_batches=1))
    two = estimate_removal(gm, [(x[:8], y[:8]), (x[8:], y[8:])], groups,
                           dataclasses.replace(FP32, batch_size=8, n_batches=2))
    assert two.n_batches == 2
    for g in groups:
        torch.testing.assert_close(two.joint[g.id], one.joint[g.id], rtol=1e-5, atol=1e-9)


def test_removal_refuses_groups_it_cannot_score_and_a_part_of_the_exact_pass():
    """Only the input slices of conv/linear weights (dim 1) are modelled: a transposed conv's
    (dim 0) and a group that no conv/linear reads are ``HessianError``s naming them, raised before
    any work; ``part=`` splits the MC form's samples, the exact pass is split by data shards."""
    from ehap_fx.passes.group import ChannelGroup, Member

    from ehap_fx.errors import HessianError

    torch.manual_seed(0)
    x, y = torch.randn(8, 2, 5, 5), torch.randint(0, 3, (8,))
    gm, groups = grouped(tiny_relu(), x)
    index = torch.arange(2)[:, None]
    transposed = ChannelGroup(7, 2, (Member("t", "up", "in", 0, index), Member("u", "conv", "in", 1, index)))
    with pytest.raises(HessianError, match="up reads its input channels at weight dim 0"):
        estimate_removal(gm, (x, y), [transposed], FP32)
    unread = ChannelGroup(9, 2, (Member("o", "head", "out", 0, index), Member("n", "bn", "norm", 0, index)))
    with pytest.raises(HessianError, match=r"groups \[9\] have no conv/linear consumer"):
        estimate_removal(gm, (x, y), [*groups, unread], FP32)
    with pytest.raises(HessianError, match="part= splits the MC form's samples"):
        estimate_removal(gm, (x, y), groups, dataclasses.replace(FP32, estimator="ggn", batch_size=8), part=(0, 2))


def test_a_removal_result_reads_its_scores_and_whole_off_the_joint_matrix_and_reports_plainly():
    from ehap_fx.scoring.removal import removal_result

    q = torch.tensor([[1.0, -0.5], [-0.5, 2.0]])
    r = removal_result({3: q}, dtype="bf16", seconds=1.23456, peak_memory=5, peak_memory_kind="process_peak_rss",
                       batch_size=4, n_batches=2, method="mc", choice="why")
    assert torch.equal(r.scores[3], torch.tensor([1.0, 2.0])) and r.whole == {3: 2.0}
    r.scores[3][0] = 9.0  # the scores are a copy: the joint matrix is left as it was
    assert q[0, 0] == 1.0
    assert r.summary() == {"estimator": "removal", "method": "mc", "choice": "why", "dtype": "bf16",
                           "seconds": 1.235, "peak_memory": 5, "peak_memory_kind": "process_peak_rss",
                           "batch_size": 4, "n_batches": 2}


def test_the_magnitude_control_is_the_l1_norm_of_each_producer_row():
    """``magnitude_scores(gm)`` is the L1 control: per channel, ``Σ|w|`` over the conv's row
    (not the L2 norm, which ranks the same rows differently)."""
    from ehap_fx.scoring import magnitude_scores

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(2, 4, 3), nn.ReLU(), nn.Conv2d(4, 3, 3), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 2))
    gm, groups = grouped(net, torch.randn(2, 2, 8, 8))
    got = {g.size: magnitude_scores(gm)[g.id] for g in groups}
    assert sorted(got) == [3, 4]
    for size, conv in ((4, net[0]), (3, net[2])):
        torch.testing.assert_close(got[size], conv.weight.detach().abs().flatten(1).sum(1))
