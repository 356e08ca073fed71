"""Removal sensitivity: the exact Gauss-Newton loss increase of removing each group channel.

HAP's channel score ``Tr(H_c)/p_c · ‖w_c‖²`` approximates the loss increase of zeroing one
producer's weights: it treats the channel's Hessian block as a multiple of the identity and
drops the cross terms between the members of a group. A channel of a residual stream is
written by many convs and read by many more, so those cross terms are most of its effect.

Removing channel ``c`` of a group is exactly the same, for the loss, as zeroing the input
slice ``W_k[:, c]`` of every consumer ``k`` (conv/linear ``"in"`` members): nothing else reads
the channel. Along that direction ``δ`` the second-order loss change is ``½ δᵀHδ``; with the
Gauss-Newton matrix ``G`` (equal to ``H`` per layer for piecewise-linear nets, see
``ehap_fx.ggn``) it is exact and noise-free::

    ½ δᵀGδ = ½ · 1/N Σ_n Σ_k ( Σ_consumers ⟨W[:, c], (J_nᵀ a_nk)[:, c]⟩ )²

the same per-sample gradients as the GGN traces, contracted with the weights before squaring
(optimal brain damage on the whole group, cross terms included). Scores are in loss units,
so ``select_plan(..., per_cost=True)`` can rank them per MAC saved.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ehap_fx.errors import HessianError
from ehap_fx.ggn import ggn_removal
from ehap_fx.hessian import DTYPES, HessianOptions, _peak_memory, _prepare, start_device


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

    def summary(self) -> dict:
        return {
            "estimator": "removal",
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
) -> RemovalResult:
    """``½ δᵀGδ`` for removing every channel of every group in ``groups``.

    ``data`` and the precision, Hessian batch size/count and chunk options are those of
    ``estimate_hessian`` (``HessianOptions``; the estimator and probe options do not apply).
    A group that no conv/linear reads cannot be scored: ``HessianError`` names it.
    """
    opts = options or HessianOptions()
    slices = consumer_slices(groups)
    read = {gid for entries in slices.values() for gid, _ in entries}
    missing = [g.id for g in groups if g.id not in read]
    if missing:
        raise HessianError(
            f"groups {missing[:5]} have no conv/linear consumer: their removal cannot "
            "be scored; use scorer='hessian' or exclude them"
        )
    device = start_device(model, device)
    start = time.perf_counter()
    s = _prepare(model, data, opts, list(slices), F.cross_entropy, device)
    sizes = {g.id: g.size for g in groups}
    pslices = {(f"{n}.weight" if n else "weight"): v for n, v in slices.items()}
    joint = {g.id: torch.zeros(g.size, g.size, device=device) for g in groups}
    for x, _ in s.batches:
        batch = ggn_removal(s.model, pslices, sizes, x, chunk=opts.ggn_chunk, autocast=s.autocast)
        for k, q in batch.items():
            joint[k] += q
    joint = {k: (q / len(s.batches)).cpu() for k, q in joint.items()}
    peak, kind = _peak_memory(device)
    return RemovalResult(
        scores={k: q.diagonal().clone() for k, q in joint.items()},
        whole={k: float(q.sum()) for k, q in joint.items()},
        joint=joint,
        dtype={v: k for k, v in DTYPES.items()}[s.dtype],
        seconds=time.perf_counter() - start,
        peak_memory=peak,
        peak_memory_kind=kind,
        batch_size=opts.batch_size,
        n_batches=opts.n_batches,
    )


def joint_order(joint: torch.Tensor) -> torch.Tensor:
    """Channel scores (higher = kept longer) from greedy removal under the joint loss ``Q``
    (``RemovalResult.joint``): each next channel is the one whose removal, together with those
    already removed, adds least to ``1_Sᵀ Q 1_S``. Any prefix of the order is the greedy set of
    its size, so ``select_plan(..., choose={g: joint_order(q)})`` removes channels by it."""
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
