"""Target selection: plans meet MACs/params/latency targets exactly, ranked globally."""

import numpy as np
import pytest
import torch
from ehap_fx.passes.cost import total_cost
from ehap_fx.passes.depth import droppable_groups
from ehap_fx.passes.group import KeptChannels, emptiable_groups, group_channels, groups_of
from ehap_fx.passes.shrink import PrunePlan, shrink
from ehap_fx.passes.trace import trace

from ehap_fx.errors import TargetError
from ehap_fx.latency import LatencyModel, LatencyOptions, LatencyTable
from ehap_fx.models import get_model
from ehap_fx.scoring import Ranking, magnitude_scores
from ehap_fx.target import Target, measure, select_plan
from tests.nets import CountedNet, TinyOptionA, counted_net_cost


@pytest.fixture(scope="module")
def resnet56():
    return group_channels(trace(get_model("resnet56").eval(), torch.randn(1, 3, 32, 32))).graph_module


def widths(gm):
    return [m.out_channels for m in gm.modules() if isinstance(m, torch.nn.Conv2d)]


@pytest.mark.parametrize(
    "target", [Target(macs=0.5), Target(macs=0.35), Target(params=0.3), Target(macs=0.5, round_to=1)]
)
def test_plan_meets_target_tightly(resnet56, target):
    plan = select_plan(resnet56, magnitude_scores(resnet56), target)
    small = shrink(resnet56, plan).graph_module
    got = getattr(total_cost(small), target.kind) / getattr(total_cost(resnet56), target.kind)
    assert target.fraction - 0.05 < got <= target.fraction
    assert all(w % target.round_to == 0 for w in widths(small))
    for g in groups_of(resnet56).prunable:  # max_prune: no group loses more than 80 % ...
        if g.id in emptiable_groups(resnet56):
            continue  # ... except the pad groups, which may go entirely
        assert len(plan.keep.get(g.id, range(g.size))) >= 0.2 * g.size


def test_least_sensitive_channels_go_first(resnet56):
    scores = {g.id: torch.arange(g.size, dtype=torch.float) for g in groups_of(resnet56).prunable}
    target = Target(macs=0.5, round_to=1)
    plan = select_plan(resnet56, scores, target)
    for gid, kept in plan.keep.items():  # the kept channels are always the top-scoring ones
        size = groups_of(resnet56)[gid].size
        assert list(kept) == list(range(size - len(kept), size))


def test_choose_picks_the_channels_within_the_widths_the_scores_set(resnet56):
    scores = magnitude_scores(resnet56)
    reverse = {g: torch.arange(len(s), 0, -1, dtype=torch.float) for g, s in scores.items()}  # 0 first
    target = Target(macs=0.5, round_to=1)
    plain, chosen = select_plan(resnet56, scores, target), select_plan(resnet56, Ranking(scores, choose=reverse), target)
    assert {g: len(k) for g, k in chosen.keep.items()} == {g: len(k) for g, k in plain.keep.items()}
    assert all(list(k) == list(range(len(k))) for k in chosen.keep.values())
    assert chosen.keep != plain.keep
    with pytest.raises(TargetError, match=r"choose has no scores, or scores of another size, for groups \[1\]"):
        select_plan(resnet56, Ranking(scores, choose={**reverse, 1: torch.ones(3)}), target)


def test_unreachable_target_states_the_minimum(resnet56):
    with pytest.raises(TargetError, match=r"smallest reachable is 0\.\d+ of the dense macs"):
        select_plan(resnet56, magnitude_scores(resnet56), Target(macs=0.05))
    # channel granularity on a model with droppable blocks: the message names the way out
    with pytest.raises(TargetError, match=r"or use granularity='both' to drop whole blocks too \(\d+ droppable\)"):
        select_plan(resnet56, magnitude_scores(resnet56), Target(macs=0.05))
    with pytest.raises(TargetError) as both:
        select_plan(resnet56, magnitude_scores(resnet56), Target(macs=0.001, granularity="both"))
    assert "granularity='both' to drop" not in str(both.value)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({}, "exactly one"),
        ({"macs": 0.5, "params": 0.5}, "exactly one"),
        ({"macs": 1.5}, r"\(0, 1\]"),
        ({"macs": 0.5, "max_prune": 1.0}, "max_prune"),
        ({"macs": 0.5, "round_to": 0}, "round_to"),
    ],
)
def test_target_validates(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Target(**kwargs)


class ModelTable(LatencyTable):
    """A deterministic stand-in for onnxruntime: time ∝ MACs, but widths off multiples of 16
    cost as much as the next multiple of 16 (what AVX-512 kernels do)."""

    def __init__(self):
        super().__init__(LatencyOptions(cache=None))

    def _measure(self, shape, cin, cout):
        pad = lambda c: -(-c // 16) * 16  # noqa: E731
        return shape.height * shape.width * pad(cin) * pad(cout) * 1e-9


def test_latency_target_prefers_widths_the_kernels_like(resnet56):
    model = LatencyModel(resnet56, ModelTable())
    groups = groups_of(resnet56)
    plan = select_plan(resnet56, magnitude_scores(resnet56), Target(latency=0.6, round_to=8), latency=model)
    dense = model(KeptChannels(groups, PrunePlan({}).masks(groups)))
    assert 0.55 * dense < model(KeptChannels(groups, plan.masks(groups))) <= 0.6 * dense
    # removing 8 of 16 channels saves nothing under this table, so it ranks last: widths are 16-multiples
    assert all(w % 16 == 0 for w in widths(shrink(resnet56, plan).graph_module))
    # the option-A pad groups may go entirely, narrowing the later streams to 16 too; then every
    # conv is 16 wide and 16-wide convs cannot get faster under this table
    half = select_plan(resnet56, magnitude_scores(resnet56), Target(latency=0.45, round_to=8), latency=model)
    assert set(widths(shrink(resnet56, half).graph_module)) == {16}
    with pytest.raises(TargetError, match="smallest reachable is 0.448"):
        select_plan(resnet56, magnitude_scores(resnet56), Target(latency=0.4, round_to=8), latency=model)
    with pytest.raises(TargetError, match="LatencyModel"):
        select_plan(resnet56, magnitude_scores(resnet56), Target(latency=0.5))


def test_latency_table_measures_and_caches(tmp_path, monkeypatch):
    pytest.importorskip("onnxruntime")
    from ehap_fx import latency

    monkeypatch.setattr(latency, "_busy_seconds", lambda: None)  # the machine's load unknown: quiet
    gm = group_channels(
        trace(torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, padding=1)).eval(), torch.randn(1, 3, 8, 8))
    )
    options = LatencyOptions(batch_size=2, repeats=1, cache=tmp_path / "lat.json")
    table = LatencyTable(options)
    model = LatencyModel(gm.graph_module, table)
    groups = groups_of(gm.graph_module)
    seconds = model(KeptChannels(groups, PrunePlan({}).masks(groups)))
    assert seconds > 0 and table.measured == 1
    table.save()
    again = LatencyTable(options)
    assert LatencyModel(gm.graph_module, again)(KeptChannels(groups, PrunePlan({}).masks(groups))) == seconds
    assert again.measured == 0


class BusyClock:
    """``_busy_seconds`` of a machine where other processes run ``cores`` cores' worth of CPU
    time during each timed entry (read twice per entry, at OtherLoad's enter and exit) whose
    wall time the fake ``perf_counter`` makes one second."""

    def __init__(self, cores):
        self.cores, self.calls = list(cores), 0

    def __call__(self):
        n, self.calls = self.calls, self.calls + 1
        return sum(self.cores[: (n + 1) // 2])


@pytest.mark.parametrize("cores, cached", [
    ([0.0, 0.0, 0.0], True),
    ([0.0, 0.2, 1.0], True),  # 0.4 cores on average: at most max_busy (0.5)
    ([0.0, 1.6, 0.2], False),  # 0.6 on average: planned with, not cached
    # a tick of this process's own time read as another's, -0.3: summed as read (0.5 on average),
    # not clipped entry by entry (0.6), which would bias every short window upward
    ([-0.3, 0.9, 0.9], True),
])
def test_a_table_timed_under_load_is_used_but_not_cached(tmp_path, monkeypatch, cores, cached):
    import itertools
    import time

    from ehap_fx import latency

    monkeypatch.setattr(latency, "_busy_seconds", BusyClock(cores))
    monkeypatch.setattr(time, "perf_counter", itertools.count().__next__)  # each entry takes 1 s
    monkeypatch.setattr(time, "process_time", lambda: 0.0)
    monkeypatch.setattr(LatencyTable, "_measure", lambda self, shape, cin, cout: cout * 1e-3)
    options = LatencyOptions(batch_size=2, repeats=1, cache=tmp_path / "lat.json")
    table = LatencyTable(options)
    shape = latency.ConvShape((3, 3), (1, 1), (1, 1), (1, 1), 1, False, 8, 8, (8, 8))
    assert [table.seconds(shape, 3, c) for c in (8, 16, 24)] == [8e-3, 16e-3, 24e-3]  # used either way
    assert table.busy == pytest.approx(max(0.0, sum(cores) / 3)) and table.measured == 3
    summary = table.load_summary()
    assert (summary is None) == cached
    if not cached:
        assert "3 new entries" in summary and "0.6 cores busy" in summary and "not cached" in summary
    table.save()
    monkeypatch.setattr(latency, "_busy_seconds", lambda: None)  # the load unknown: never judged loaded
    again = LatencyTable(options)
    again.seconds(shape, 3, 8)
    assert again.measured == (0 if cached else 1) and again.load_summary() is None


@pytest.mark.parametrize("precision", ["int8", "fp32"])
def test_the_table_times_compute_kernels_not_layout_changes(tmp_path, monkeypatch, precision):
    """kernel_seconds sums the profiler's compute kernels of each run (QLinearConv / Conv) and
    leaves out the layout changes onnxruntime wraps a lone conv in; a model of layout changes
    alone has no kernel time to give and says so; the profile files go with the call."""
    pytest.importorskip("onnxruntime")
    from onnx import TensorProto, helper

    from ehap_fx.errors import EhapError
    from ehap_fx.latency import ConvShape, _conv_model, kernel_seconds

    monkeypatch.chdir(tmp_path)
    shape = ConvShape((3, 3), (1, 1), (1, 1), (1, 1), 1, False, 8, 8, (8, 8))
    model = _conv_model(shape, 16, 16, 2, precision)
    x = np.zeros((2, 16, 8, 8), np.uint8 if precision == "int8" else np.float32)
    assert kernel_seconds(model, {"x": x}, repeats=3) > 0
    node = helper.make_node("Transpose", ["x"], ["y"], perm=[0, 2, 3, 1])
    layout_only = helper.make_model(helper.make_graph(
        [node], "t", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 16, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 8, 8, 16])]),
        opset_imports=[helper.make_opsetid("", 13)])
    with pytest.raises(EhapError, match="0 kernel events"):
        kernel_seconds(layout_only, {"x": x.astype(np.float32)}, repeats=3)
    assert list(tmp_path.iterdir()) == []


def test_round_to_16_reaches_half_the_macs_by_dropping_option_a_pad_groups():
    # every 16-channel group of ResNet-20 is either whole or gone at round_to=16; only the
    # pad groups (whose tensors keep the previous stage's channels) may go entirely
    gm = group_channels(trace(get_model("resnet20").eval(), torch.zeros(2, 3, 32, 32))).graph_module
    groups = groups_of(gm)
    pads = emptiable_groups(gm)
    assert len(pads) == 2 and all(sum(m.role == "pad" for m in groups[g].members) for g in pads)
    plan = select_plan(gm, magnitude_scores(gm), Target(macs=0.5, round_to=16))
    kept = {g.id: len(plan.keep.get(g.id, range(g.size))) for g in groups.prunable}
    assert all(k % 16 == 0 for k in kept.values())
    assert all(k > 0 for g, k in kept.items() if g not in pads)
    assert 0 in [kept[g] for g in pads]  # 0.5 is out of reach otherwise
    small = shrink(gm, plan).graph_module
    # 16-channel blocks are coarse, but blocks given back after the goal is crossed land it close
    assert 0.48 * total_cost(gm).macs < total_cost(small).macs <= 0.5 * total_cost(gm).macs


@pytest.fixture(scope="module")
def counted():
    """CountedNet (tests/nets.py): group A (8 channels) and B (4), MACs counted by hand."""
    gm = group_channels(trace(CountedNet().eval(), torch.randn(2, 3, 8, 8))).graph_module
    a, b = sorted(groups_of(gm).prunable, key=lambda g: -g.size)
    return gm, a.id, b.id


def kept_widths(plan: PrunePlan, a: int, b: int) -> tuple[int, int]:
    return len(plan.keep.get(a, range(8))), len(plan.keep.get(b, range(4)))


# MACs of CountedNet as a fraction of the dense 18,265, by kept widths (a, b):
#   a=8: 1.0 .9901 .9802 .9703 (b = 4..1) | a=4: .5059 .4995 .4931 .4867 | a=2: .2589 .2543 .2496 .2449
# B's channels least sensitive (LOW_B): B goes to its floor 1 (max_prune 0.8) before A loses
# any. At 0.5 that crosses at (4, 1) = .4867; then removed blocks are given back, most
# sensitive first, while the goal holds: A's (5, 1) = .6076 does not fit, B's (4, 2) and
# (4, 3) do, (4, 4) = .5059 not. A least sensitive (LOW_A): (3, 4) = .3824 is the first to
# meet 0.5. ONE_A: a single channel of A is the least sensitive of all, and goes alone though
# it saves 12x what a channel of B saves (the plain ranking is by sensitivity, not per MAC).
LOW_B = (10 + torch.arange(8.0), torch.tensor([1.0, 3.0, 0.0, 2.0]))
LOW_A = (torch.arange(8.0), torch.tensor([11.0, 13.0, 10.0, 12.0]))
ONE_A = (torch.tensor([100.0, 100, 0, 100, 100, 100, 100, 100]), torch.tensor([50.0, 60, 70, 80]))


@pytest.mark.parametrize("sensitivity,fraction,widths", [
    (LOW_B, 0.99, (8, 2)),  # (8, 3) = .9901 misses by 0.0001
    (LOW_B, 0.975, (8, 1)),  # B down to one channel: min_channels=1 by default
    (LOW_B, 0.5, (4, 3)),
    (LOW_B, 9124 / 18265, (4, 3)),  # (4, 3) exactly at the goal: given back (the goal is met, not beaten)
    (LOW_B, 0.51, (4, 4)),  # every B channel given back
    (LOW_B, 0.3, (2, 4)),  # A at its floor 2 = ceil(0.2 * 8)
    (LOW_A, 0.5, (3, 4)),
    (ONE_A, 0.98, (7, 4)),  # not (8, 1) = .9703, which B's channels alone would reach
])
def test_select_plan_removes_least_sensitive_first_then_gives_back_what_fits(counted, sensitivity, fraction, widths):
    gm, a, b = counted
    scores = dict(zip((a, b), sensitivity, strict=True))
    plan = select_plan(gm, scores, Target(macs=fraction, round_to=1))
    assert kept_widths(plan, a, b) == widths
    dense = counted_net_cost(8, 4)[0]
    assert counted_net_cost(*widths)[0] <= fraction * dense
    for g, w in zip((a, b), widths, strict=True):  # the top-scoring channels stay
        assert list(plan.keep.get(g, range(len(scores[g])))) == sorted(scores[g].argsort(descending=True)[:w].tolist())


def test_per_cost_ranking_divides_sensitivity_by_the_macs_a_block_saves(counted):
    # a channel of A saves 2,256 MACs, one of B 181 (by hand: counted_net_cost(8, 4) minus
    # (7, 4), (8, 3)); A's channels are twice as sensitive, so per MAC saved they go first
    gm, a, b = counted
    scores = {a: torch.ones(8), b: torch.full((4,), 0.5)}
    target = Target(macs=0.98, round_to=1)
    assert kept_widths(select_plan(gm, scores, target), a, b) == (8, 1)  # (8, 2) = .9802 misses
    assert kept_widths(select_plan(gm, Ranking(scores, per_cost=True), target), a, b) == (7, 4)


def test_unreachable_minimum_is_the_floors_of_max_prune_and_min_channels(counted):
    gm, a, b = counted
    scores = {a: torch.arange(8.0), b: torch.arange(4.0)}
    # floors: A max(3, ceil(8 * 0.5)) = 4, B max(3, ceil(4 * 0.5)) = 3
    smallest = counted_net_cost(4, 3)[0] / counted_net_cost(8, 4)[0]
    with pytest.raises(TargetError, match=rf"smallest reachable is {smallest:.3f} of the dense macs"):
        select_plan(gm, scores, Target(macs=0.2, max_prune=0.5, min_channels=3, round_to=1))
    plan = select_plan(gm, scores, Target(macs=smallest, max_prune=0.5, min_channels=3, round_to=1))
    assert kept_widths(plan, a, b) == (4, 3)
    # round_to=4: A keeps 8 or 4; B (4 wide, no smaller multiple of 4) stays whole
    plan = select_plan(gm, scores, Target(macs=0.6, round_to=4))
    assert kept_widths(plan, a, b) == (4, 4)
    assert select_plan(gm, scores, Target(macs=1.0)) == PrunePlan({})


def test_at_step_follows_a_geometric_schedule():
    t = Target(params=0.25, steps=2, round_to=4)
    assert t.at_step(1) == Target(params=0.5, round_to=4)
    assert t.at_step(2) == Target(params=0.25, round_to=4)
    assert (t.kind, t.fraction) == ("params", 0.25)


@pytest.mark.parametrize("kwargs", [{"macs": 1.0}, {"latency": 1e-3, "max_prune": 0.0}, {"params": 0.5, "min_channels": 1},
                                    {"macs": 0.5, "granularity": "both"}, {"macs": 0.5, "granularity": "block"}])
def test_target_accepts_its_boundaries(kwargs):
    assert Target(**kwargs).fraction == next(v for k, v in kwargs.items() if k in ("macs", "params", "latency"))


@pytest.mark.parametrize("kwargs,match", [
    ({"macs": 0.0}, r"\(0, 1\]"),
    ({"macs": 0.5, "max_prune": -0.1}, "max_prune"),
    ({"macs": 0.5, "min_channels": 0}, "min_channels"),
    ({"macs": 0.5, "steps": 0}, "steps"),
    ({"macs": 0.5, "granularity": "layer"}, "granularity"),
    ({"macs": 0.5, "latency": 0.5}, "exactly one"),
])
def test_target_refuses_values_outside_its_ranges(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Target(**kwargs)


def test_target_defaults_are_the_documented_ones_and_frozen():
    """Keep at least 20 % of a group (``max_prune=0.8``) and one channel, widths in multiples of
    ``DEFAULT_ROUND_TO`` = 8, one step, channel granularity; a target is a frozen value."""
    import dataclasses

    from ehap_fx.target import DEFAULT_ROUND_TO

    t = Target(macs=0.5)
    assert DEFAULT_ROUND_TO == 8
    assert (t.max_prune, t.min_channels, t.round_to, t.steps, t.granularity) == (0.8, 1, 8, 1, "channel")
    assert (t.params, t.latency, t.kind, t.fraction) == (None, None, "macs", 0.5)
    with pytest.raises(dataclasses.FrozenInstanceError):
        t.macs = 0.4


def test_block_granularity_without_whole_scores_drops_the_block_of_least_mean_channel_score():
    """A plain ranking with no ``whole`` scores: each droppable block is ranked by the mean of its
    channel scores and goes entirely; with a goal that dropping either of two blocks meets, the
    one whose channels score lower goes (whichever of the two it is)."""
    gm = group_channels(trace(TinyOptionA().eval(), torch.randn(2, 3, 16, 16))).graph_module
    first, second = sorted(droppable_groups(gm))[:2]
    dense = total_cost(gm).macs
    goal = max(measure(gm, Target(macs=1.0), PrunePlan({g: ()})) for g in (first, second)) / dense
    for low, high in ((first, second), (second, first)):
        scores = {g.id: torch.full((g.size,), 5.0) for g in groups_of(gm).prunable}
        scores[low] = torch.linspace(0.0, 4.0, len(scores[low]))  # mean 2
        scores[high] = torch.full((len(scores[high]),), 3.0)
        assert select_plan(gm, scores, Target(macs=goal, granularity="block")) == PrunePlan({low: ()})


def test_block_granularity_per_cost_drops_the_block_with_least_loss_per_mac_saved():
    # two residual blocks of TinyOptionA (tests/nets.py), either of which alone meets the goal;
    # the one that saves more MACs loses less per MAC saved, though its loss is the larger
    gm = group_channels(trace(TinyOptionA().eval(), torch.randn(2, 3, 16, 16))).graph_module
    dense = total_cost(gm).macs
    saved = {g: dense - measure(gm, Target(macs=1.0), PrunePlan({g: ()})) for g in droppable_groups(gm)}
    big, small = sorted(saved, key=saved.get, reverse=True)[:2]
    assert saved[big] > 1.1 * saved[small]
    whole = {big: 1.0 * saved[big], small: 1.1 * saved[small]}  # per MAC: 1.0 against 1.1
    scores = {g.id: torch.ones(g.size) for g in groups_of(gm).prunable}
    ranking = Ranking(scores, whole={**dict.fromkeys(saved, 1e9), **whole}, per_cost=True)
    goal = (dense - saved[small]) / dense  # either block alone meets it
    plan = select_plan(gm, ranking, Target(macs=goal, granularity="block"))
    assert plan == PrunePlan({big: ()})
    # ranked by loss alone, the smaller loss would go: the other block
    assert whole[small] < whole[big]


def test_granularity_both_lets_a_droppable_group_go_to_zero():
    # TinyOptionA's residual-block inner groups are droppable: with "both" the least sensitive
    # one may lose every channel (the block goes); with "channel" max_prune keeps half of it
    # at least
    gm = group_channels(trace(TinyOptionA().eval(), torch.randn(2, 3, 16, 16))).graph_module
    drop = min(droppable_groups(gm))
    scores = {g.id: torch.ones(g.size) + (g.id != drop) for g in groups_of(gm).prunable}
    goal = measure(gm, Target(macs=1.0), PrunePlan({drop: ()})) / total_cost(gm).macs
    both = select_plan(gm, scores, Target(macs=goal, granularity="both", round_to=1, max_prune=0.5))
    assert both == PrunePlan({drop: ()})
    channel = select_plan(gm, scores, Target(macs=goal, granularity="channel", round_to=1, max_prune=0.5))
    size = next(g.size for g in groups_of(gm).prunable if g.id == drop)
    assert len(channel.keep.get(drop, range(size))) >= size // 2


def test_a_ranking_compares_and_prints_by_its_scores_not_the_estimate_behind_them():
    """``Ranking.result`` (the ``HessianResult`` or ``RemovalResult`` it came from) only rides
    along for the report: two rankings of the same scores are equal whatever their estimates,
    and the repr leaves the estimate (per-probe rows, matrices) out."""
    scores = {0: torch.tensor([1.0, 2.0])}
    a, b = Ranking(scores, result="estimate a"), Ranking(scores, result="estimate b")
    assert a == b
    assert "scores=" in repr(a) and "estimate a" not in repr(a)


@pytest.mark.parametrize("loaded", [False, True])
def test_compress_says_when_its_latency_table_was_timed_under_load(tmp_path, monkeypatch, loaded, caplog):
    """A loaded table plans (the target is met by its estimate either way), the report's target
    and a warning say so, and the cache file is not written; a quiet one is cached, silently."""
    pytest.importorskip("onnxruntime")
    import itertools

    from ehap_fx import latency
    from ehap_fx.compress import compress

    ticks = itertools.count(step=1000.0)  # other processes: a thousand CPU seconds per reading
    monkeypatch.setattr(latency, "_busy_seconds", ticks.__next__ if loaded else (lambda: 0.0))
    cache = tmp_path / "lat.json"
    with pytest.warns(UserWarning, match="L1"):
        res = compress(TinyOptionA().eval(), torch.randn(2, 3, 8, 8),
                       target=Target(latency=0.8, round_to=1, granularity="both"),
                       latency=LatencyOptions(batch_size=4, repeats=1, cache=cache), latency_loop=None)
    target = res.report.target
    assert target["latency_ratio"] <= 0.8
    assert ("latency_table_load" in target) == loaded and cache.exists() != loaded
    if loaded:
        assert "not cached" in target["latency_table_load"]
        assert any("not cached" in r.getMessage() for r in caplog.records if r.levelname == "WARNING")


def test_latency_options_refuse_a_negative_max_busy():
    with pytest.raises(ValueError, match="max_busy=-0.1 must be >= 0"):
        LatencyOptions(max_busy=-0.1)
