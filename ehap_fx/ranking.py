"""rank(gm, data, scorer, options) -> Ranking: the one seam between a graph and its scorers,
used by compress, the CLI and every tool; ``select_plan(gm, ranking, target)`` reads it.

``"hessian"``: the paper's trace sensitivity (``ehap_fx.hessian``); ``"removal"``: the exact
Gauss-Newton loss increase of removing each channel (``ehap_fx.removal``, ranked per unit of
cost saved); ``"l1"``: weight magnitude. In a process group the estimates are split over the
ranks (``ehap_fx.distributed_hessian``).
"""

from __future__ import annotations

from collections.abc import Callable

from torch import fx

from ehap_fx.distributed_hessian import estimate_hessian_distributed, estimate_removal_distributed
from ehap_fx.errors import EhapError
from ehap_fx.hessian import HessianOptions, group_sensitivity, group_stderr
from ehap_fx.passes.group import groups_of, producer_modules
from ehap_fx.target import Ranking, magnitude_scores

SCORERS = ("hessian", "removal", "l1")


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
