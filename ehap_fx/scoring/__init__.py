"""The scoring tier: what each prunable channel group is worth, behind one door.

    ranking = rank(gm, data, scorer, options)   # scorer: "hessian" | "removal" | "l1"

``rank`` returns a :class:`Ranking` that ``ehap_fx.target.select_plan`` turns into a plan. Behind
it: the paper's Hessian trace (``hessian``: Hutchinson, ``ggn`` exact Gauss-Newton, ``ggn_mc``
Monte-Carlo labels), the removal criterion (``removal``), the batches they draw (``sampling``),
BatchNorm folding (``fold``), the memory budget that picks an estimator that fits (``budget``),
and the same estimates split over the ranks of a process group (``distributed``). Imports only
the foundation and ``ehap_fx.passes`` (tests/test_layering.py).
"""

from ehap_fx.scoring.options import HessianOptions
from ehap_fx.scoring.ranking import SCORERS, Ranking, magnitude_scores, rank

__all__ = ["SCORERS", "HessianOptions", "Ranking", "magnitude_scores", "rank"]
