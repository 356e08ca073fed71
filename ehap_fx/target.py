"""Target selection: turn per-channel sensitivities into a pruning plan that meets a budget.

All prunable channels of all groups are ranked globally (least sensitive first) and removed
in that order until the graph's cost, computed exactly for the plan (``plan_cost``: removing
a channel shrinks its producers *and* consumers), meets the target. Channels go in blocks so
that every group keeps a multiple of ``round_to`` channels: on AVX-512 CPUs onnxruntime's
conv kernels run odd widths far slower, so MACs alone do not buy speed.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace

import torch
from torch import fx

from ehap_fx.errors import TargetError
from ehap_fx.latency import LatencyModel
from ehap_fx.passes.cost import plan_cost
from ehap_fx.passes.depth import droppable_groups
from ehap_fx.passes.group import (
    ChannelGroup,
    KeptChannels,
    emptiable_groups,
    groups_of,
)
from ehap_fx.passes.shrink import PrunePlan
from ehap_fx.scoring.ranking import Ranking

#: Kept widths of each group are multiples of this by default. 16 suits onnxruntime's INT8
#: kernels better (docs/int8.md: 0.5-MACs ResNet-56 INT8 runs 3.7x faster than dense fp32 at
#: round_to=16, 1.8x at 8) but is coarse: whole 16-channel groups are kept or (option-A pad
#: groups) dropped. Use 16, or a latency target, for INT8 speed.
DEFAULT_ROUND_TO = 8
KINDS = ("macs", "params", "latency")
GRANULARITIES = ("channel", "block", "both")


@dataclass(frozen=True)
class Target:
    """What to keep: a fraction of the dense ``macs``, ``params`` or ``latency`` (exactly one).

    ``latency`` is the estimated onnxruntime latency (``ehap_fx.latency``): channels are then
    ranked by sensitivity per second saved, as in HALP.

    ``max_prune`` caps the fraction of any group's channels that may go, ``min_channels``
    is a floor per group (neither applies to groups whose values all keep other channels, such
    as the zero channels of option-A shortcuts: those may go entirely, see
    ``passes.group.emptiable_groups``), ``round_to`` makes kept widths multiples of it (groups smaller
    than ``round_to`` are left whole unless ``round_to=1``), ``steps`` > 1 prunes iteratively,
    re-ranking between steps.

    ``granularity`` says what may go: ``"channel"`` channels of any group (widths shrink);
    ``"block"`` only whole droppable groups (``passes.depth.droppable_groups``: a residual
    block's inner channels, so the block goes and the widths stay: depth pruning, which the
    INT8 kernels like best); ``"both"`` channels, and droppable groups may go to zero.
    """

    macs: float | None = None
    params: float | None = None
    latency: float | None = None
    max_prune: float = 0.8
    min_channels: int = 1
    round_to: int = DEFAULT_ROUND_TO
    steps: int = 1
    granularity: str = "channel"

    def __post_init__(self):
        set_ = {k: getattr(self, k) for k in KINDS if getattr(self, k) is not None}
        if len(set_) != 1:
            raise ValueError(f"give exactly one of macs=, params= or latency= (got {set_ or 'none'})")
        ((kind, value),) = set_.items()
        if not 0 < value <= 1:
            raise ValueError(
                f"target {kind}={value} must be in (0, 1]: the fraction of the dense model to keep"
            )
        if not 0 <= self.max_prune < 1:
            raise ValueError(f"max_prune={self.max_prune} must be in [0, 1)")
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"granularity={self.granularity!r} must be one of {GRANULARITIES}")
        if self.min_channels < 1 or self.round_to < 1 or self.steps < 1:
            raise ValueError(
                f"min_channels={self.min_channels}, round_to={self.round_to}, steps={self.steps} must be >= 1"
            )

    @property
    def kind(self) -> str:
        return next(k for k in KINDS if getattr(self, k) is not None)

    @property
    def fraction(self) -> float:
        return getattr(self, self.kind)

    def at_step(self, step: int) -> Target:
        """The one-step target to reach after ``step`` of ``steps`` (geometric schedule)."""
        return replace(self, steps=1, **{self.kind: self.fraction ** (step / self.steps)})


@dataclass(frozen=True)
class _Block:
    group: int
    keep_after: int  # channels the group keeps once this block is gone
    score: float  # ranking key (monotone within a group)


def _kept_counts(size: int, target: Target, emptiable: bool) -> list[int]:
    """Allowed kept widths of a group, largest first (the full width is always allowed).
    An emptiable group (``emptiable_groups``) may go to zero: its values keep other channels."""
    floor = 0 if emptiable else max(target.min_channels, math.ceil(size * (1 - target.max_prune)))
    step = target.round_to
    counts = [k for k in range(size - 1, floor - 1, -1) if k % step == 0]
    return [size, *counts]


Saving = Callable[[int, int], float]  # (group id, kept width) -> cost saved vs. the full width


def _blocks(
    group: ChannelGroup, scores: torch.Tensor, target: Target, saving: Saving | None, emptiable: bool
) -> list[_Block]:
    """Removal steps of one group, each with its ranking key: the mean sensitivity of the
    channels it removes, or (with ``saving``) their total sensitivity per unit of cost saved.
    Steps that save nothing (a width the kernels run no faster) merge into the next one."""
    ordered = scores.sort().values
    counts = _kept_counts(group.size, target, emptiable)
    blocks, running, saved, pending = [], -math.inf, 0.0, 0.0
    for before, after in zip(counts, counts[1:], strict=False):
        block = ordered[group.size - before : group.size - after]
        if saving is None:
            key = float(block.mean())
        else:
            now, pending = saving(group.id, after), pending + float(block.sum())
            if now <= saved:
                continue
            key, saved, pending = pending / (now - saved), now, 0.0
        running = max(running, key)  # a group loses its weakest channels first
        blocks.append(_Block(group.id, after, running))
    return blocks


def _whole(group: ChannelGroup, score: float, scores: torch.Tensor, saving: Saving | None) -> _Block:
    """The one removal step of a group that goes entirely (``granularity="block"``)."""
    key = score / saving(group.id, 0) if saving is not None else float(scores.mean())
    return _Block(group.id, 0, key)


def _plan(order: list[_Block], n: int, scores: Mapping[int, torch.Tensor]) -> PrunePlan:
    kept: dict[int, int] = {}
    for b in order[:n]:
        kept[b.group] = b.keep_after
    return top_channels(scores, kept)


def top_channels(scores: Mapping[int, torch.Tensor], widths: Mapping[int, int]) -> PrunePlan:
    """The plan that keeps, in each group ``g`` of ``widths``, its ``widths[g]`` highest-scoring channels."""
    return PrunePlan(
        {g: tuple(sorted(scores[g].argsort(descending=True)[:k].tolist())) for g, k in widths.items()}
    )


def measure(
    gm: fx.GraphModule, target: Target, plan: PrunePlan | None = None, *, latency: LatencyModel | None = None
) -> float:
    """The target's quantity (MACs, params, or estimated seconds) of ``gm`` under ``plan``
    (the dense graph when None), computed without shrinking."""
    groups = groups_of(gm)
    masks = (plan or PrunePlan({})).masks(groups)
    if target.kind == "latency":
        if latency is None:
            raise TargetError("a latency target needs a LatencyModel: latency=LatencyModel(gm, table)")
        return latency(KeptChannels(groups, masks))
    return getattr(plan_cost(gm, masks), target.kind)


def select_plan(
    gm: fx.GraphModule,
    ranking: Ranking | Mapping[int, torch.Tensor],
    target: Target,
    *,
    base: float | None = None,
    latency: LatencyModel | None = None,
) -> PrunePlan:
    """The plan that removes the least sensitive channels until ``gm`` meets ``target``.

    ``ranking`` is a :class:`Ranking`, or its scores alone (``{group_id: (size,) tensor}``,
    e.g. ``magnitude_scores(gm)``); groups without scores are left whole. ``base`` overrides
    the dense value the target's fraction is relative to (iterative pruning passes the original
    model's, with ``target.at_step(step)``). A latency target needs ``latency`` (a ``LatencyModel``
    of ``gm``) and ranks per second saved. Raises TargetError stating the reachable minimum."""
    ranking = ranking if isinstance(ranking, Ranking) else Ranking(ranking)
    scores, whole, per_cost = ranking.scores, ranking.whole, ranking.per_cost
    groups = groups_of(gm)
    keep_by = _keep_by(scores, ranking.choose)
    if target.kind == "latency" and latency is None:
        raise TargetError("a latency target needs a LatencyModel: "
                          "select_plan(..., latency=LatencyModel(gm, table))")

    def value(plan: PrunePlan) -> float:
        return measure(gm, target, plan, latency=latency)

    dense = value(PrunePlan({}))
    base = base if base is not None else dense
    goal = target.fraction * base
    saving = None
    if target.kind == "latency" or per_cost:

        def saving(group: int, kept: int) -> float:
            return dense - value(PrunePlan({group: tuple(range(kept))}))

    scored = [g for g in groups.prunable if g.id in scores]
    if target.granularity == "block":
        droppable = droppable_groups(gm)
        whole = whole or {}
        blocks = [
            _whole(g, float(whole.get(g.id, scores[g.id].sum())), scores[g.id].float().cpu(), saving)
            for g in scored
            if g.id in droppable
        ]
    else:
        emptiable = emptiable_groups(gm)
        if target.granularity == "both":
            emptiable |= droppable_groups(gm)
        blocks = [
            b
            for g in scored
            for b in _blocks(g, scores[g.id].float().cpu(), target, saving, g.id in emptiable)
        ]
    order = sorted(blocks, key=lambda b: b.score)

    def cost(n: int) -> float:
        return value(_plan(order, n, keep_by))

    if dense <= goal:
        return PrunePlan({})
    if cost(len(order)) > goal:
        smallest = f"the smallest reachable is {cost(len(order)) / base:.3f} of the dense {target.kind}"
        if target.granularity == "block":
            raise TargetError(
                f"target {target.kind}={target.fraction} is unreachable with "
                f"granularity='block' ({len(order)} droppable blocks): {smallest}; raise the target, "
                "or use granularity='both' to narrow layers too"
            )
        raise TargetError(
            f"target {target.kind}={target.fraction} is unreachable: with "
            f"max_prune={target.max_prune}, min_channels={target.min_channels} and "
            f"round_to={target.round_to} {smallest}; raise the target or max_prune, or lower round_to"
            + (f", or use granularity='both' to drop whole blocks too ({len(blocks_left)} droppable)"
               if target.granularity == "channel" and (blocks_left := droppable_groups(gm)) else "")
        )
    lo, hi = 0, len(order)  # cost(lo) > goal >= cost(hi); cost falls as blocks go
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if cost(mid) <= goal else (mid, hi)
    chosen = _refill(order[:hi], goal, value, keep_by)
    return _plan(chosen, len(chosen), keep_by)


def _keep_by(scores: Mapping[int, torch.Tensor], choose: Mapping[int, torch.Tensor] | None):
    """The scores that pick each group's kept channels: ``choose``, checked, else ``scores``."""
    if choose is None:
        return scores
    wrong = [g for g, s in scores.items() if g not in choose or len(choose[g]) != len(s)]
    if wrong:
        raise TargetError(f"choose has no scores, or scores of another size, for groups {wrong}; "
                          "give it one (size,) tensor per scored group")
    return choose


def _refill(chosen: list[_Block], goal: float, value, scores) -> list[_Block]:
    """Give back removed blocks while the target still holds, most sensitive first.

    The block that crosses the goal may remove far more than needed (one block of a residual
    stream shrinks every conv on it): restoring the last block of another group can bring the
    plan back up to the goal. Only a group's last removed block is restorable (widths nest).
    """
    while True:
        last = {b.group: i for i, b in enumerate(chosen)}
        for i in sorted(last.values(), key=lambda i: -chosen[i].score):
            trial = chosen[:i] + chosen[i + 1 :]
            if value(_plan(trial, len(trial), scores)) <= goal:
                chosen = trial
                break
        else:
            return chosen
