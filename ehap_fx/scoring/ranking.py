"""rank(gm, data, scorer, options) -> Ranking: the one seam between a graph and its scorers,
used by compress, the CLI and every tool; ``select_plan(gm, ranking, target)`` reads it.

``"hessian"``: the paper's trace sensitivity (``ehap_fx.scoring.hessian``); ``"removal"``: the exact
Gauss-Newton loss increase of removing each channel (``ehap_fx.scoring.removal``, ranked per unit of
cost saved); ``"l1"``: weight magnitude. In a process group the estimates are split over the
ranks (``ehap_fx.scoring.distributed``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx

from ehap_fx.errors import EhapError
from ehap_fx.passes.group import groups_of, producer_modules, producer_slices
from ehap_fx.scoring.distributed import estimate_hessian_distributed, estimate_removal_distributed
from ehap_fx.scoring.hessian import group_sensitivity, group_stderr
from ehap_fx.scoring.options import HessianOptions

SCORERS = ("hessian", "removal", "l1")


@dataclass(frozen=True)
class Ranking:
    """What a scorer says about the prunable groups of one graph (``ehap_fx.scoring.ranking.rank``):
    ``scores[group_id]`` a ``(size,)`` tensor (higher = more important), ``stderr`` theirs (None:
    exact); ``whole[group_id]`` the score of removing the group entirely (``granularity="block"``;
    default the sum of its channel scores); ``per_cost``: rank per unit of the target's cost saved
    (right for loss units, such as ``ehap_fx.scoring.removal``'s; wrong for L1 norms, whose sums over
    producers already favour costly channels); ``choose`` picks the channels a group keeps once
    ``scores`` has set how many (e.g. ``magnitude_scores(gm)``); ``summary`` the scorer and its
    estimate for the report; ``result`` the estimate itself (``HessianResult``, ``RemovalResult``)."""

    scores: Mapping[int, torch.Tensor]
    stderr: Mapping[int, torch.Tensor] | None = None
    whole: Mapping[int, float] | None = None
    summary: dict = field(default_factory=dict)
    per_cost: bool = False
    choose: Mapping[int, torch.Tensor] | None = None
    result: Any = field(default=None, repr=False, compare=False)


def rank(gm: fx.GraphModule, data, scorer: str, options: HessianOptions = HessianOptions(), *,
         loss_fn: Callable | None = None) -> Ranking:
    """Scores of every prunable group of ``gm`` (``passes.group.group_channels`` first) by
    ``scorer``, on ``(x, y)`` batches ``data`` (unused by ``"l1"``), with ``options`` for the
    Hessian and removal estimates and ``loss_fn(output, y)`` for outputs that are not logits."""
    if scorer not in SCORERS:
        raise ValueError(f"scorer={scorer!r} must be one of {SCORERS}")
    if scorer == "l1":
        return Ranking(magnitude_scores(gm), summary={"scorer": "l1"})
    groups = groups_of(gm).prunable
    if scorer == "removal":
        if loss_fn is not None:
            raise EhapError("scorer='removal' is exact for cross-entropy only: drop loss_fn, or "
                            "use scorer='hessian' with estimator='hutchinson'")
        removal = estimate_removal_distributed(gm, data, groups, options)
        summary = {"scorer": "removal", **removal.summary()}
        return Ranking(removal.scores, whole=removal.whole, summary=summary, per_cost=True, result=removal)
    result = estimate_hessian_distributed(gm, data, options, names=producer_modules(groups),
                                          loss_fn=loss_fn, groups=groups)
    return Ranking(group_sensitivity(groups, result), stderr=group_stderr(groups, result),
                   summary={"scorer": "hessian", **result.summary()}, result=result)


def magnitude_scores(gm: fx.GraphModule, p: int = 1) -> dict[int, torch.Tensor]:
    """The L1 (``p=1``) control: per group channel, Σ over producers of ``‖w_c‖_p``."""
    scores = {}
    for g in groups_of(gm).prunable:
        total = torch.zeros(g.size)
        for name, index in producer_slices(g):
            w = gm.get_submodule(name).weight.detach().float()
            norms = w.flatten(1).norm(p=p, dim=1)  # (out_channels,)
            total += norms[index].sum(1)
        scores[g.id] = total
    return scores
