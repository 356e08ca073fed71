"""Removal sensitivity: the exact Gauss-Newton loss increase of removing each group channel.

HAP's channel score ``Tr(H_c)/p_c · ‖w_c‖²`` approximates the loss increase of zeroing one
producer's weights: it treats the channel's Hessian block as a multiple of the identity and
drops the cross terms between the members of a group. A channel of a residual stream is
written by many convs and read by many more, so those cross terms are most of its effect.

Removing channel ``c`` of a group is exactly the same, for the loss, as zeroing the input
slice ``W_k[:, c]`` of every consumer ``k`` (conv/linear ``"in"`` members): nothing else reads
the channel. Along that direction ``δ`` the second-order loss change is ``½ δᵀHδ``; with the
Gauss-Newton matrix ``G`` (equal to ``H`` per layer for piecewise-linear nets, see
``ehap_fx.scoring.ggn``) it is exact and noise-free::

    ½ δᵀGδ = ½ · 1/N Σ_n Σ_k ( Σ_consumers ⟨W[:, c], (J_nᵀ a_nk)[:, c]⟩ )²

the same per-sample gradients as the GGN traces, contracted with the weights before squaring
(optimal brain damage on the whole group, cross terms included). Scores are in loss units,
so ``select_plan`` (``Ranking(..., per_cost=True)``) can rank them per unit of cost saved.

At scale the exact pass costs one backward per class and sample; ``HessianOptions.estimator``
``"auto"`` (default) takes it when it is cheap and fits the memory budget, else the
Monte-Carlo form (``ehap_fx.scoring.ggn_mc.mc_removal``: labels drawn from the softmax, one backward
per draw, unbiased). Its limit is the matrices themselves: ``Σ_groups size²`` floats (twice,
with transients) must fit the budget, or :class:`MemoryBudgetError` says so.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ehap_fx.errors import HessianError, MemoryBudgetError
from ehap_fx.scoring.budget import fmt_bytes, resolve_budget
from ehap_fx.scoring.ggn import ggn_removal
from ehap_fx.scoring.ggn_mc import mc_removal
from ehap_fx.scoring.options import DTYPES, HessianOptions
from ehap_fx.scoring.plan import Plan, plan_pass
from ehap_fx.scoring.setup import peak_memory, prepare, start_device


@dataclass(frozen=True)
class RemovalResult:
    """``scores[group id]``: ``(size,)`` loss increase (fp32, CPU) of removing each channel;
    ``whole[group id]``: of removing all the group's channels at once (cross terms included);
    ``joint[group id]``: ``(size, size)`` ``Q`` with ``1_Sᵀ Q 1_S`` the loss increase of removing
    any set ``S`` of its channels together (``scores`` is its diagonal, ``whole`` its sum)."""

    scores: dict[int, torch.Tensor]
    whole: dict[int, float]
    joint: dict[int, torch.Tensor]
    dtype: str
    seconds: float
    peak_memory: int
    peak_memory_kind: str
    batch_size: int
    n_batches: int
    method: str = "exact"  # "exact" (GGN) or "mc" (sampled labels)
    choice: str = ""

    def summary(self) -> dict:
        return {
            "estimator": "removal",
            "method": self.method,
            "choice": self.choice,
            "dtype": self.dtype,
            "seconds": round(self.seconds, 3),
            "peak_memory": self.peak_memory,
            "peak_memory_kind": self.peak_memory_kind,
            "batch_size": self.batch_size,
            "n_batches": self.n_batches,
        }


def consumer_slices(groups: Sequence) -> dict[str, list[tuple[int, torch.Tensor]]]:
    """Per consumer module (a conv/linear reading group channels), ``(group id, index)``:
    channel ``c`` of the group is input channels ``index[c]`` (dim 1) of its weight."""
    out: dict[str, list[tuple[int, torch.Tensor]]] = {}
    for g in groups:
        for m in g.members:
            if m.role == "in" and m.module is not None:
                out.setdefault(m.module, []).append((g.id, m.index))
    return out


def estimate_removal(
    model: nn.Module,
    data,
    groups: Sequence,
    options: HessianOptions | None = None,
    *,
    device: torch.device | str | None = None,
    part: tuple[int, int] | None = None,
) -> RemovalResult:
    """``½ δᵀGδ`` for removing every channel of every group in ``groups``.

    ``data`` and the precision, Hessian batch size/count, chunk and memory options are those
    of ``estimate_hessian`` (``HessianOptions``); ``estimator`` ``"mc"`` forces the
    Monte-Carlo form (``mc_samples`` draws; ``None`` means ``min_probes``), ``"auto"``
    chooses, any other the exact pass. ``part=(rank, world)``: that share of the samples of
    the MC form (the parts' matrices sum to the whole). A group that no conv/linear reads
    cannot be scored: ``HessianError`` names it.
    """
    opts = options or HessianOptions()
    slices, sizes = _checked_slices(groups)
    device = start_device(model, device)
    start = time.perf_counter()
    s = prepare(model, data, opts, list(slices), F.cross_entropy, device)
    plan = _plan(s, opts, sizes, part)
    if part is not None and plan.estimator != "mc":
        raise HessianError("part= splits the MC form's samples; shard the exact pass's data")
    xs = [x for x, _ in s.batches]
    if plan.estimator == "mc":
        if xs[0].is_floating_point():
            for p in s.params:
                p.requires_grad_(False)
        joint = mc_removal(s.model, slices, sizes, xs, opts.mc_samples or opts.min_probes,
                           opts.seed, chunk=plan.mc_chunk, autocast=s.autocast, part=part)
    else:
        pslices = {(f"{n}.weight" if n else "weight"): v for n, v in slices.items()}
        joint = {g.id: torch.zeros(g.size, g.size, device=device) for g in groups}
        for x in xs:
            batch = ggn_removal(s.model, pslices, sizes, x, chunk=plan.ggn_chunk, autocast=s.autocast)
            for k, q in batch.items():
                joint[k] += q
        joint = {k: q / len(xs) for k, q in joint.items()}
    peak, mem_kind = peak_memory(device)
    return removal_result(
        {k: q.cpu() for k, q in joint.items()}, dtype={v: k for k, v in DTYPES.items()}[s.dtype],
        seconds=time.perf_counter() - start, peak_memory=peak, peak_memory_kind=mem_kind,
        batch_size=opts.batch_size, n_batches=opts.n_batches,
        method="mc" if plan.estimator == "mc" else "exact", choice=plan.reason)


def choose_removal(model: nn.Module, data, groups: Sequence, options: HessianOptions | None = None,
                   *, device: torch.device | str | None = None) -> Plan:
    """The plan (exact or MC, chunks) ``estimate_removal`` would follow, without running it."""
    opts = options or HessianOptions()
    slices, sizes = _checked_slices(groups)
    s = prepare(model, data, opts, list(slices), F.cross_entropy, start_device(model, device))
    return _plan(s, opts, sizes, None)


def _checked_slices(groups: Sequence):
    other = sorted({m.module for g in groups for m in g.members
                    if m.role == "in" and m.module and m.dim != 1})
    if other:
        raise HessianError(
            f"{other[0]} reads its input channels at weight dim 0 (a transposed conv), which the removal "
            "criterion does not model: use scorer='hessian' or scorer='l1' for this model")
    slices = consumer_slices(groups)
    read = {gid for entries in slices.values() for gid, _ in entries}
    missing = [g.id for g in groups if g.id not in read]
    if missing:
        raise HessianError(
            f"groups {missing[:5]} have no conv/linear consumer: their removal cannot "
            "be scored; use scorer='hessian' or exclude them"
        )
    return slices, {g.id: g.size for g in groups}


def _plan(s, opts: HessianOptions, sizes: dict[int, int], part) -> Plan:
    """``plan_pass`` with the matrices reserved: exact unless ``"auto"`` or ``"mc"``."""
    matrices = 8 * sum(n * n for n in sizes.values())  # fp32, the sum and one batch's
    budget, how = resolve_budget(opts.memory_budget, s.device)
    if matrices > budget // 2:
        raise MemoryBudgetError(
            f"the removal criterion keeps a size x size matrix per group: {fmt_bytes(matrices)} "
            f"for these {len(sizes)} groups > half of {fmt_bytes(budget)} ({how}): raise "
            "memory_budget or use scorer='hessian'")
    kind = opts.estimator if opts.estimator in ("auto", "mc") else "ggn"
    return plan_pass(s, dataclasses.replace(opts, estimator=kind),
                     weights=sum(p.numel() for p in s.params), extra=matrices, part=part)


def removal_result(joint: dict[int, torch.Tensor], **fields) -> RemovalResult:
    """A :class:`RemovalResult` from the joint matrices (scores: diagonals, whole: sums)."""
    return RemovalResult(
        scores={k: q.diagonal().clone() for k, q in joint.items()},
        whole={k: float(q.sum()) for k, q in joint.items()},
        joint=joint, **fields)


def joint_order(joint: torch.Tensor) -> torch.Tensor:
    """Channel scores (higher = kept longer) from greedy removal under the joint loss ``Q``
    (``RemovalResult.joint``): each next channel is the one whose removal, together with those
    already removed, adds least to ``1_Sᵀ Q 1_S`` (on a tie, the lowest index). Any prefix of
    the order is the greedy set of its size, so
    ``select_plan(gm, Ranking(scores, choose={g: joint_order(q)}), target)`` removes channels by it."""
    size = joint.shape[0]
    removed = torch.zeros(size, dtype=torch.bool)
    cross = torch.zeros(size)  # Σ_{s ∈ S} Q[s, c]
    position = torch.empty(size)
    diag = joint.diagonal()
    for step in range(size):
        added = (diag + 2 * cross).masked_fill(removed, float("inf"))
        c = int(added.argmin())
        removed[c], position[c] = True, step
        cross += joint[c]
    return position
